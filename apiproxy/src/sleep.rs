//! Sleep mode at the proxy: which requests count as activity (and are kept as the cluster's last
//! activity), which wake a sleeping cluster and are held until it is back, and which get `503`
//! with `Retry-After` instead. The state itself is driven by `vkube run` (`SleepControl`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Uri};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, watch};

use crate::error::ProxyError;

/// A request with this header never counts as activity (monitoring, dashboards).
pub const IGNORE_HEADER: &str = "x-vkube-sleep-ignore";

/// Distinct users kept in `vkube_activity_total`; later ones count as `other`.
const MAX_USERS: usize = 32;

/// Where a virtual cluster's control plane stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Running,
    /// Removing its host pods and stopping its upstream components.
    GoingToSleep,
    Sleeping,
    /// Starting its upstream components; requests that count are held meanwhile.
    Waking,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::Running => "Running",
            Power::GoingToSleep => "GoingToSleep",
            Power::Sleeping => "Sleeping",
            Power::Waking => "Waking",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActivityLabels {
    pub user: String,
    pub verb: &'static str,
}

/// The requests that counted as activity: the last one (when, by whom), and a count per user
/// (and per user and verb, for Prometheus).
#[derive(Default)]
pub struct Activity {
    last: Mutex<Option<(SystemTime, String)>>,
    /// Per user since this process started: the first [`MAX_USERS`] users seen by name, later ones as `other`.
    by_user: Mutex<HashMap<String, u64>>,
    pub counted: Family<ActivityLabels, Counter>,
    /// Signalled on every counted request (the persister writes the last one down, throttled).
    pub changed: Notify,
}

impl Activity {
    pub fn record(&self, user: &str, verb: &'static str) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((SystemTime::now(), user.to_string()));
        let label = {
            let mut users = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
            let label = if users.contains_key(user) || users.len() < MAX_USERS { user } else { "other" };
            *users.entry(label.to_string()).or_default() += 1;
            label.to_string()
        };
        self.counted.get_or_create(&ActivityLabels { user: label, verb }).inc();
        self.changed.notify_one();
    }

    /// Data flowing on an open exec, attach or port-forward session: keeps the cluster awake
    /// without counting as a request.
    pub fn touch(&self) {
        if let Some((at, _)) = self.last.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            *at = SystemTime::now();
        }
    }

    /// Requests counted per user since this process started.
    pub fn by_user(&self) -> HashMap<String, u64> {
        self.by_user.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn last(&self) -> Option<(SystemTime, String)> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last activity as persisted before a restart (kept unless something newer counted).
    pub fn restore(&self, at: SystemTime, by: String) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|(t, _)| *t < at) {
            *last = Some((at, by));
        }
    }
}

/// The proxy's view of sleep mode.
#[derive(Clone)]
pub struct Sleep {
    power: watch::Receiver<Power>,
    wake: Arc<Notify>,
    pub activity: Arc<Activity>,
    /// Users that count although they are service accounts or `system:` users.
    counted_users: Arc<Vec<String>>,
    wake_timeout: Duration,
}

/// What `vkube run` drives sleep mode with.
pub struct SleepControl {
    pub power: watch::Sender<Power>,
    /// Notified by the proxy when a request that counts finds the cluster asleep.
    pub wake: Arc<Notify>,
    pub activity: Arc<Activity>,
}

impl Sleep {
    pub fn new(initial: Power, counted_users: Vec<String>, wake_timeout: Duration) -> (Sleep, SleepControl) {
        let (tx, rx) = watch::channel(initial);
        let wake = Arc::new(Notify::new());
        let activity = Arc::new(Activity::default());
        let sleep = Sleep {
            power: rx,
            wake: wake.clone(),
            activity: activity.clone(),
            counted_users: Arc::new(counted_users),
            wake_timeout,
        };
        (sleep, SleepControl { power: tx, wake, activity })
    }

    /// A cluster without sleep mode: always running.
    pub fn always_running() -> Sleep {
        Sleep::new(Power::Running, vec![], Duration::from_secs(60)).0
    }

    pub fn power(&self) -> Power {
        *self.power.borrow()
    }

    /// The power as it changes (every transition marks it changed, even one back to the same).
    pub fn power_changes(&self) -> watch::Receiver<Power> {
        self.power.clone()
    }

    /// Whether requests of `user` count: people and outside tools do; the cluster's own service
    /// accounts and `system:` users do not, unless the admin listed them.
    pub fn counts_user(&self, user: &str) -> bool {
        !user.starts_with("system:") || self.counted_users.iter().any(|u| u == user)
    }

    /// A request for a host name of one of the cluster's sleeping Ingresses (`entry`, as their
    /// rule has it): activity (of `ingress:ENTRY`) that wakes the cluster, without waiting.
    pub fn wake_from_ingress(&self, entry: &str) {
        self.activity.record(&ingress_user(entry), "get");
        self.wake.notify_one();
    }

    /// Requests through one of the cluster's Ingresses while it is awake, seen in the ingress
    /// controller's metrics (`entry` as for [`Sleep::wake_from_ingress`]): activity of the same
    /// user, counted once per reading that saw some.
    pub fn ingress_traffic(&self, entry: &str) {
        self.activity.record(&ingress_user(entry), "traffic");
    }

    /// Wakes the cluster if it sleeps and waits until it runs (held, not refused); `Asleep`
    /// if it is not back within the wake timeout.
    pub async fn wake_and_wait(&self) -> Result<(), ProxyError> {
        let mut power = self.power.clone();
        if *power.borrow() == Power::Running {
            return Ok(());
        }
        self.wake.notify_one();
        match tokio::time::timeout(self.wake_timeout, power.wait_for(|p| *p == Power::Running)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ProxyError::Asleep(format!(
                "the virtual cluster did not wake within {} s; retry shortly",
                self.wake_timeout.as_secs()
            ))),
        }
    }
}

/// Whose activity ingress traffic is: `ingress:` and the Ingress rule's host entry.
fn ingress_user(entry: &str) -> String {
    format!("ingress:{entry}")
}

/// Why a request is background noise rather than activity, whoever sends it: watches and log
/// follows (long-running reads that tools keep open), and requests marked with
/// [`IGNORE_HEADER`]. `None`: it counts if its user does.
pub fn background(uri: &Uri, headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key(IGNORE_HEADER) {
        return Some("ignored");
    }
    // The legacy watch paths: /api/v1/watch/..., /apis/GROUP/VERSION/watch/...
    let path = uri.path();
    if path.starts_with("/api/v1/watch/") || path == "/api/v1/watch" || path.split('/').nth(4) == Some("watch") {
        return Some("watch");
    }
    // As the API server reads these booleans: anything but "0" and "false" is true.
    let query = uri.query().unwrap_or_default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let on = v != "0" && !v.eq_ignore_ascii_case("false");
        match &*k {
            "watch" if on => return Some("watch"),
            "follow" if on => return Some("follow"),
            _ => {}
        }
    }
    None
}

/// The verb label of a counted request.
pub fn verb(method: &Method) -> &'static str {
    match *method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bg(uri: &str, ignore: bool) -> Option<&'static str> {
        let mut h = HeaderMap::new();
        if ignore {
            h.insert(IGNORE_HEADER, "1".parse().unwrap());
        }
        background(&uri.parse().unwrap(), &h)
    }

    #[test]
    fn watches_follows_and_marked_requests_are_background() {
        assert_eq!(bg("/api/v1/pods", false), None);
        assert_eq!(bg("/api/v1/pods?limit=500", false), None);
        assert_eq!(bg("/api/v1/namespaces/a/pods?watch=true&resourceVersion=1", false), Some("watch"));
        assert_eq!(bg("/api/v1/pods?watch=1", false), Some("watch"));
        assert_eq!(bg("/api/v1/pods?watch=false", false), None);
        assert_eq!(bg("/api/v1/pods?watch=0", false), None);
        assert_eq!(bg("/api/v1/pods?watch=True", false), Some("watch"));
        assert_eq!(bg("/api/v1/pods?watch=", false), Some("watch"));
        assert_eq!(bg("/api/v1/watch/namespaces/a/pods", false), Some("watch"));
        assert_eq!(bg("/apis/apps/v1/watch/deployments", false), Some("watch"));
        assert_eq!(bg("/apis/apps/v1/namespaces/watch/deployments", false), None, "a namespace named watch");
        assert_eq!(bg("/api/v1/namespaces/a/pods/p/log?follow=true", false), Some("follow"));
        assert_eq!(bg("/api/v1/pods", true), Some("ignored"));
    }

    #[test]
    fn service_accounts_and_system_users_do_not_count_unless_listed() {
        let (s, _) = Sleep::new(Power::Running, vec!["system:serviceaccount:ci:runner".into()], Duration::from_secs(1));
        assert!(s.counts_user("alice"));
        assert!(s.counts_user("kubernetes-admin"));
        assert!(!s.counts_user("system:serviceaccount:default:poller"));
        assert!(!s.counts_user("system:kube-controller-manager"));
        assert!(s.counts_user("system:serviceaccount:ci:runner"));
    }

    #[test]
    fn activity_keeps_the_last_and_bounds_its_labels() {
        let a = Activity::default();
        assert!(a.last().is_none());
        a.touch();
        assert!(a.last().is_none(), "a session's data is not a first activity");
        for i in 0..(MAX_USERS + 5) {
            a.record(&format!("user-{i}"), "get");
        }
        assert_eq!(a.last().unwrap().1, format!("user-{}", MAX_USERS + 4));
        assert_eq!(a.counted.get_or_create(&ActivityLabels { user: "other".into(), verb: "get" }).get(), 5);
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        a.restore(old, "earlier".into());
        assert_ne!(a.last().unwrap().1, "earlier", "a persisted activity older than the last is not restored");
    }

    #[tokio::test]
    async fn a_request_that_finds_it_asleep_wakes_it_and_waits() {
        let (s, ctl) = Sleep::new(Power::Sleeping, vec![], Duration::from_secs(5));
        let waker = tokio::spawn(async move {
            ctl.wake.notified().await;
            ctl.power.send_replace(Power::Waking);
            tokio::time::sleep(Duration::from_millis(50)).await;
            ctl.power.send_replace(Power::Running);
            ctl
        });
        s.wake_and_wait().await.unwrap();
        assert_eq!(s.power(), Power::Running);
        let _ctl = waker.await.unwrap();

        let (s, _ctl) = Sleep::new(Power::Sleeping, vec![], Duration::from_millis(50));
        let e = s.wake_and_wait().await.unwrap_err();
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
}
