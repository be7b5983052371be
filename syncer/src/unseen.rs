//! Writes the syncer sent whose watch event has not come yet. A reconcile in between reads a store
//! that is behind and would send them again, to be refused (409) at a request each, or for a
//! host copy, with a token requested and its Secret written again first: about a tenth of a
//! burst's pods were bound twice, one in fifty made twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a write sent counts as pending: its watch event comes within moments; after this,
/// the store is believed again (a host copy lost meanwhile is made again).
const PENDING: Duration = Duration::from_secs(10);

/// Objects (by the virtual object's uid) a write was sent for, and when.
#[derive(Default)]
pub struct Unseen(Mutex<HashMap<String, Instant>>);

impl Unseen {
    /// Whether a write for `uid` was sent moments ago and its watch has not shown it.
    pub fn pending(&self, uid: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(uid).is_some_and(|at| at.elapsed() < PENDING)
    }

    pub fn sent(&self, uid: String) {
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Objects deleted before their watch showed the write leave nothing behind for long.
        sent.retain(|_, at| at.elapsed() < PENDING);
        sent.insert(uid, Instant::now());
    }

    /// The watch shows the write for `uid`.
    pub fn seen(&self, uid: &str) {
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !sent.is_empty() {
            sent.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_pending_from_sent_until_seen() {
        let unseen = Unseen::default();
        assert!(!unseen.pending("a"));
        unseen.sent("a".into());
        assert!(unseen.pending("a") && !unseen.pending("b"));
        unseen.seen("a");
        assert!(!unseen.pending("a"));
    }

    #[test]
    fn a_write_sent_long_ago_is_no_longer_pending_and_goes() {
        let unseen = Unseen::default();
        let long_ago = Instant::now().checked_sub(PENDING).unwrap();
        unseen.0.lock().unwrap().insert("old".into(), long_ago);
        assert!(!unseen.pending("old"));
        unseen.sent("new".into());
        assert_eq!(unseen.0.lock().unwrap().len(), 1, "the old one went");
    }
}
