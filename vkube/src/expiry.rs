//! When a cluster is deleted by itself: at the end of its TTL (`vkube create --ttl`) or after a
//! time without activity (`--delete-after-inactivity`), as written on its host Service and read
//! by `vkube list` (time left) and `vkube platform` (which deletes it).

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use vkube_core::contract::{ANNOTATION_DELETE_AFTER_INACTIVITY, ANNOTATION_EXPIRES_AT, ANNOTATION_LAST_ACTIVITY};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// Its TTL ends.
    Ttl,
    /// Nobody used it for the time it was given.
    Inactivity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Expiry {
    pub at: Timestamp,
    pub reason: Reason,
}

impl Expiry {
    /// The annotations `vkube create --ttl --delete-after-inactivity` writes (from `now`).
    pub fn annotations(
        now: Timestamp,
        ttl: Option<std::time::Duration>,
        inactivity: Option<std::time::Duration>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut a = BTreeMap::new();
        if let Some(ttl) = ttl {
            let at = now.checked_add(SignedDuration::try_from(ttl)?)?;
            a.insert(ANNOTATION_EXPIRES_AT.to_string(), at.to_string());
        }
        if let Some(d) = inactivity {
            anyhow::ensure!(d.as_secs() > 0, "--delete-after-inactivity must be at least a second");
            a.insert(ANNOTATION_DELETE_AFTER_INACTIVITY.to_string(), d.as_secs().to_string());
        }
        Ok(a)
    }

    /// The earlier of its TTL's end and its last activity (or creation, before any) plus the
    /// inactivity allowed; none if neither is set. Unreadable values count as unset.
    pub fn of(annotations: &BTreeMap<String, String>, created: Option<Timestamp>) -> Option<Expiry> {
        let ttl = annotations
            .get(ANNOTATION_EXPIRES_AT)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|at| Expiry { at, reason: Reason::Ttl });
        let inactivity = annotations.get(ANNOTATION_DELETE_AFTER_INACTIVITY).and_then(|s| {
            let allowed = SignedDuration::from_secs(s.parse::<i64>().ok()?);
            let last = annotations.get(ANNOTATION_LAST_ACTIVITY).and_then(|t| t.parse::<Timestamp>().ok());
            let since = match (last, created) {
                (Some(l), Some(c)) => l.max(c),
                (l, c) => l.or(c)?,
            };
            Some(Expiry { at: since.checked_add(allowed).ok()?, reason: Reason::Inactivity })
        });
        match (ttl, inactivity) {
            (Some(a), Some(b)) => Some(if b.at < a.at { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Seconds left (negative once due).
    pub fn seconds_left(&self, now: Timestamp) -> i64 {
        self.at.duration_since(now).as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_earlier_of_ttl_and_inactivity() {
        let created = Some(t("2026-12-04T10:00:00Z"));
        let now = t("2026-12-04T10:00:00Z");
        let a = Expiry::annotations(now, Some(Duration::from_secs(7200)), Some(Duration::from_secs(1800))).unwrap();
        let e = Expiry::of(&a, created).unwrap();
        assert_eq!((e.at, e.reason), (t("2026-12-04T10:30:00Z"), Reason::Inactivity), "idle since creation");
        let mut active = a.clone();
        active.insert(ANNOTATION_LAST_ACTIVITY.into(), "2026-12-04T11:45:00Z".into());
        let e = Expiry::of(&active, created).unwrap();
        assert_eq!((e.at, e.reason), (t("2026-12-04T12:00:00Z"), Reason::Ttl), "used lately: the TTL ends first");
        assert_eq!(e.seconds_left(t("2026-12-04T11:59:00Z")), 60);
        assert_eq!(Expiry::of(&BTreeMap::new(), created), None);
        let mut junk = BTreeMap::new();
        junk.insert(ANNOTATION_EXPIRES_AT.to_string(), "soon".to_string());
        assert_eq!(Expiry::of(&junk, created), None);
        assert!(Expiry::annotations(now, None, Some(Duration::from_millis(10))).is_err());
    }
}
