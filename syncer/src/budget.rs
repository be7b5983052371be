//! A cap on writes per host object per minute. Whatever makes a reconcile write the same object
//! again and again (the host canonicalising what we send, a finalizer holding a deletion, a
//! tenant controller fighting another), one object costs the host at most this many writes a
//! minute; past it the key backs off like a failed reconcile, and a metric counts it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// A write a second on average: more than any object of a tenant's needs.
pub const WRITES_PER_MINUTE: u32 = 60;
/// Keys kept before stale windows are swept (a sweep is one pass over the map).
const SWEEP_AT: usize = 4096;

/// (kind, host name) → (start of its window, writes in it).
type Spent = HashMap<(&'static str, String), (Instant, u32)>;

pub struct WriteBudget {
    per_minute: u32,
    spent: Mutex<Spent>,
}

/// What spending one write gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Spend {
    Allowed,
    /// Over the cap; `first` is true for the first refusal in this window (what the metric counts).
    Capped {
        first: bool,
    },
}

impl WriteBudget {
    pub fn new(per_minute: u32) -> Self {
        WriteBudget { per_minute, spent: Mutex::default() }
    }

    pub fn spend(&self, kind: &'static str, host_name: &str, now: Instant) -> Spend {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        if spent.len() >= SWEEP_AT {
            spent.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = spent.entry((kind, host_name.to_string())).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 <= self.per_minute {
            Spend::Allowed
        } else {
            Spend::Capped { first: entry.1 == self.per_minute + 1 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_writes_per_minute() {
        let b = WriteBudget::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.spend("Endpoints", "a", t0), Spend::Allowed);
        }
        assert_eq!(b.spend("Endpoints", "a", t0), Spend::Capped { first: true });
        assert_eq!(b.spend("Endpoints", "a", t0), Spend::Capped { first: false });
        assert_eq!(b.spend("Endpoints", "b", t0), Spend::Allowed, "another key is not held back");
        assert_eq!(b.spend("Pod", "a", t0), Spend::Allowed, "nor another kind");
        assert_eq!(b.spend("Endpoints", "a", t0 + WINDOW), Spend::Allowed, "a new minute");
    }
}
