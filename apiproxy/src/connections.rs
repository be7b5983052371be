//! Connections held per client address: one place (an IPv6 /64 counts as one) may hold only part
//! of the proxy's connection slots, so idle connections from one client cannot keep every other
//! client waiting in the listen backlog.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct PerAddress {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's slots (of all, and of its address), held while anything of it is open: the
/// connection, and any stream upgraded from it (exec, attach, port-forward).
#[derive(Clone)]
pub struct Slots(#[allow(dead_code)] Arc<(tokio::sync::OwnedSemaphorePermit, Held)>);

impl Slots {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, held: Held) -> Self {
        Slots(Arc::new((permit, held)))
    }
}

/// One connection counted against its address until dropped.
pub struct Held {
    by: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerAddress { max: max.max(1), held: Mutex::new(HashMap::new()) })
    }

    /// A slot for a connection from `peer`, unless its address already holds its share.
    pub fn try_hold(self: &Arc<Self>, peer: IpAddr) -> Option<Held> {
        let key = crate::auth::address_key(peer);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held { by: self.clone(), key })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.by.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_its_share_and_gets_it_back() {
        let limit = PerAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (one, two) = (limit.try_hold(a).unwrap(), limit.try_hold(a).unwrap());
        assert!(limit.try_hold(a).is_none(), "a third from the same address");
        assert!(limit.try_hold("192.0.2.2".parse().unwrap()).is_some(), "another address is not held back");
        drop(one);
        let three = limit.try_hold(a).expect("a slot given back");
        // IPv6: one /64 is one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let held: Vec<Held> = ["2001:db8::1", "2001:db8::2"].iter().map(|s| limit.try_hold(v6(s)).unwrap()).collect();
        assert!(limit.try_hold(v6("2001:db8::ffff")).is_none(), "the same /64");
        assert!(limit.try_hold(v6("2001:db8:0:1::1")).is_some(), "another /64");
        drop((two, three, held));
        assert!(limit.held.lock().unwrap().is_empty(), "nothing kept for addresses gone");
    }
}
