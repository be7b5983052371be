//! Whether the syncer is doing its job, for the control plane's probes. `/readyz`: not until its
//! caches are filled and the classes the admin lists are shown (a pod naming one would be
//! refused), and never again once it has stopped (a cluster whose objects no longer reach the
//! host is not ready, whatever its API server says). `/livez`: failing once it has stopped, so
//! the kubelet restarts the control plane rather than leave it unready for ever.

use std::sync::{Arc, RwLock};

#[derive(Clone, Debug, Default)]
pub struct Health(Arc<RwLock<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    state: State,
    /// The `from_host` loop's first pass of this run is done (or gave up waiting for it).
    classes_shown: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Starting,
    /// Caches filled, the initial sync under way.
    Syncing,
    /// The initial sync is done (every object looked at once).
    Synced,
    Stopped(String),
}

impl Health {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn syncing(&self) {
        let mut s = self.write();
        if s.state == State::Starting {
            s.state = State::Syncing;
        }
    }

    pub(crate) fn synced(&self) {
        let mut s = self.write();
        if s.state == State::Syncing {
            s.state = State::Synced;
        }
    }

    pub(crate) fn classes_shown(&self) {
        self.write().classes_shown = true;
    }

    /// Whether this run of the syncer has looked at every object once.
    pub fn initial_sync_done(&self) -> bool {
        self.read().state == State::Synced
    }

    /// The syncer stopped for `why`; the first reason is kept.
    pub fn stopped(&self, why: impl Into<String>) {
        let mut s = self.write();
        if !matches!(s.state, State::Stopped(_)) {
            s.state = State::Stopped(why.into());
        }
    }

    /// A new run of the syncer begins (the cluster woke): starting again, whatever came before.
    pub fn restart(&self) {
        *self.write() = Inner::default();
    }

    /// `Err` once the syncer has stopped (nothing but a restart brings it back).
    pub fn alive(&self) -> Result<(), String> {
        match &self.read().state {
            State::Stopped(why) => Err(format!("the syncer stopped: {why}")),
            _ => Ok(()),
        }
    }

    /// `Err` says why the syncer is not ready.
    pub fn check(&self) -> Result<(), String> {
        let s = self.read();
        match &s.state {
            State::Syncing | State::Synced if s.classes_shown => Ok(()),
            State::Syncing | State::Synced => Err("the syncer is showing the host's classes the admin lists".into()),
            State::Starting => Err("the syncer is still filling its caches".into()),
            State::Stopped(why) => Err(format!("the syncer stopped: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_syncing() {
        let h = Health::default();
        assert!(h.check().is_err());
        assert_eq!(h.alive(), Ok(()), "starting is alive");
        h.syncing();
        assert!(h.check().unwrap_err().contains("classes"), "not before the listed classes are shown");
        h.classes_shown();
        assert_eq!(h.check(), Ok(()));
        assert!(!h.initial_sync_done());
        h.synced();
        assert!(h.initial_sync_done() && h.check().is_ok());
        h.stopped("a watch task ended");
        assert!(h.alive().is_err());
        h.syncing();
        h.stopped("later");
        assert_eq!(h.check(), Err("the syncer stopped: a watch task ended".into()));
        h.restart();
        h.syncing();
        assert!(h.check().is_err(), "a new run shows the classes again");
    }
}
