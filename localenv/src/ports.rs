//! Free loopback ports, so several environments can run side by side.
//!
//! A port is handed out now and bound later (seconds later for components that start after the
//! API server), so it is drawn from below the kernel's ephemeral range: ports in that range are
//! also the source ports of every process's outgoing connections, and one taken meanwhile by a
//! client makes the component's listen fail with "address already in use" (seen in CI: the
//! controller manager exited and the cluster never got its default service account).

use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::Mutex;

/// Where ports are drawn from: above the registered ports servers on a node use (10250 and
/// the like), below Services' node ports (30000 up), outside the ephemeral range.
const POOL: Range<u16> = 16_000..30_000;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that nothing listens on now, that no outgoing connection will take as its
/// source port, and that this process has not handed out before.
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let ephemeral = ephemeral_range();
    let pool: Vec<u16> = POOL.filter(|p| !ephemeral.contains(p)).collect();
    // A random start, so processes drawing at the same moment rarely meet.
    let start = if pool.is_empty() { 0 } else { fastrand::usize(..pool.len()) };
    let found = pool.iter().cycle().skip(start).take(pool.len()).copied().find(|&p| !handed.contains(&p) && is_free(p));
    let port = found.unwrap_or_else(|| {
        loop {
            // The pool is used up or inside the ephemeral range on this machine: the kernel's pick.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("binding an ephemeral loopback port");
            if !handed.contains(&port) {
                break port;
            }
        }
    });
    handed.insert(port);
    port
}

/// Whether a loopback port is free to bind now.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The kernel's range for outgoing connections' source ports (Linux's default when unreadable).
fn ephemeral_range() -> Range<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    parse_range(&text).unwrap_or(32_768..61_000)
}

fn parse_range(text: &str) -> Option<Range<u16>> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    Some(lo..hi.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_range_is_read_inclusive() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32_768..61_000));
        assert_eq!(parse_range(""), None);
    }

    #[test]
    fn ports_come_from_outside_the_ephemeral_range_and_are_never_handed_out_twice() {
        let ephemeral = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), ports.len(), "{ports:?}");
        if POOL.clone().any(|p| !ephemeral.contains(&p)) {
            assert!(ports.iter().all(|p| POOL.contains(p) && !ephemeral.contains(p)), "{ports:?}");
        }
    }
}
