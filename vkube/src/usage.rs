//! What a virtual cluster uses of its host, as its control plane accounts it (`vkube run`) and
//! the CLI reads it (`vkube usage`, the dashboard): the ledger kept in the cluster's usage
//! ConfigMap on the host (`names::usage_configmap`), one entry per UTC day, and how a pod's or a
//! claim's requests are counted (the way the scheduler and OpenCost count them).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ResourceRequirements};
use serde::{Deserialize, Serialize};

/// Days kept in the ledger.
pub const KEPT_DAYS: usize = 92;
/// Users named per day in `requestsByUser` (the first of the day); the others count as `other`.
pub const USERS_PER_DAY: usize = 10;
/// The most the ledger may take as JSON: past it, the oldest days lose their users, then go.
pub const MAX_LEDGER_BYTES: usize = 128 * 1024;
/// A user name longer than this is cut and marked with a hash of the whole (the tenant chooses
/// user names, e.g. with `--as`).
const MAX_USER_CHARS: usize = 64;
/// The key of the ledger in its ConfigMap.
pub const LEDGER_KEY: &str = "ledger";
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A Kubernetes quantity as a number (`250m` → 0.25, `1Gi` → 1073741824, `1e3` → 1000).
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * factor)
}

/// What a pod holds of a node: requests and limits of CPU (cores) and memory (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodResources {
    pub cpu: f64,
    pub memory: f64,
    pub cpu_limit: f64,
    pub memory_limit: f64,
}

impl PodResources {
    fn of(r: Option<&ResourceRequirements>) -> PodResources {
        let get = |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>, k: &str| {
            m.and_then(|m| m.get(k)).and_then(|q| quantity(&q.0)).unwrap_or(0.0)
        };
        let (req, lim) = (r.and_then(|r| r.requests.as_ref()), r.and_then(|r| r.limits.as_ref()));
        // A limit without a request requests the limit (the API server defaults it so).
        let cpu_limit = get(lim, "cpu");
        let memory_limit = get(lim, "memory");
        PodResources {
            cpu: if req.is_some_and(|m| m.contains_key("cpu")) { get(req, "cpu") } else { cpu_limit },
            memory: if req.is_some_and(|m| m.contains_key("memory")) { get(req, "memory") } else { memory_limit },
            cpu_limit,
            memory_limit,
        }
    }

    pub fn plus(self, o: PodResources) -> PodResources {
        PodResources {
            cpu: self.cpu + o.cpu,
            memory: self.memory + o.memory,
            cpu_limit: self.cpu_limit + o.cpu_limit,
            memory_limit: self.memory_limit + o.memory_limit,
        }
    }

    fn max(self, o: PodResources) -> PodResources {
        PodResources {
            cpu: self.cpu.max(o.cpu),
            memory: self.memory.max(o.memory),
            cpu_limit: self.cpu_limit.max(o.cpu_limit),
            memory_limit: self.memory_limit.max(o.memory_limit),
        }
    }

    /// The pod's effective resources, as the scheduler counts them: the pod-level resources if
    /// it sets them, else its containers and sidecars (init containers that keep running)
    /// together or the largest one-shot init container if that is more; plus the runtime
    /// class's overhead.
    pub fn of_pod(pod: &Pod) -> PodResources {
        let Some(spec) = pod.spec.as_ref() else { return PodResources::default() };
        let overhead = spec.overhead.as_ref().map(|o| PodResources {
            cpu: o.get("cpu").and_then(|q| quantity(&q.0)).unwrap_or(0.0),
            memory: o.get("memory").and_then(|q| quantity(&q.0)).unwrap_or(0.0),
            ..Default::default()
        });
        let containers = PodResources::of_containers(spec);
        let pod_level = PodResources::of(spec.resources.as_ref());
        // Pod-level values replace the containers' sum where they are set.
        let pick = |p: f64, c: f64| if p > 0.0 { p } else { c };
        PodResources {
            cpu: pick(pod_level.cpu, containers.cpu),
            memory: pick(pod_level.memory, containers.memory),
            cpu_limit: pick(pod_level.cpu_limit, containers.cpu_limit),
            memory_limit: pick(pod_level.memory_limit, containers.memory_limit),
        }
        .plus(overhead.unwrap_or_default())
    }

    fn of_containers(spec: &k8s_openapi::api::core::v1::PodSpec) -> PodResources {
        let mut sidecars = PodResources::default();
        let mut init = PodResources::default();
        for c in spec.init_containers.iter().flatten() {
            let r = PodResources::of(c.resources.as_ref());
            if c.restart_policy.as_deref() == Some("Always") {
                sidecars = sidecars.plus(r);
            } else {
                // A one-shot init container runs beside the sidecars started before it.
                init = init.max(r.plus(sidecars));
            }
        }
        let running = spec.containers.iter().fold(sidecars, |a, c| a.plus(PodResources::of(c.resources.as_ref())));
        running.max(init)
    }
}

/// Whether a pod holds its resources on a node: bound to one and not finished (a pending pod
/// holds nothing yet, Succeeded or Failed pods nothing any more).
pub fn holds_resources(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
        && !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// A user name as the ledger keeps it: long ones cut, with a hash of the whole.
fn user_key(user: &str) -> String {
    if user.chars().count() <= MAX_USER_CHARS {
        return user.to_string();
    }
    use sha2::{Digest, Sha256};
    let cut: String = user.chars().take(MAX_USER_CHARS - 9).collect();
    let hash = Sha256::digest(user.as_bytes());
    format!("{cut}~{:02x}{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2], hash[3])
}

/// The storage a claim requests, in bytes.
pub fn claim_bytes(claim: &PersistentVolumeClaim) -> f64 {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| quantity(&q.0))
        .unwrap_or(0.0)
}

/// One UTC day of a cluster's use. Resource figures are integrals over time: a pod requesting
/// 0.5 cores for two hours adds 3,600 core-seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Day {
    /// Seconds its control plane ran awake, and asleep (sleep mode).
    pub awake_seconds: f64,
    pub asleep_seconds: f64,
    /// CPU and memory its host pods requested, and their limits.
    pub cpu_core_seconds: f64,
    pub memory_gib_seconds: f64,
    pub cpu_limit_core_seconds: f64,
    pub memory_limit_gib_seconds: f64,
    /// Host pods that held resources, summed over time.
    pub pod_seconds: f64,
    /// Storage its host claims requested.
    pub storage_gib_seconds: f64,
    /// What its workloads requested before it went to sleep, times the time asleep.
    pub saved_cpu_core_seconds: f64,
    pub saved_memory_gib_seconds: f64,
    /// Requests that counted as activity (sleep mode's rules), per user (the busiest
    /// [`USERS_PER_DAY`], the others as `other`).
    pub requests: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests_by_user: BTreeMap<String, u64>,
}

impl Day {
    /// Holding `r` of pods (`pods` of them) and `storage` bytes of claims for `seconds`.
    pub fn hold(&mut self, r: PodResources, pods: f64, storage: f64, seconds: f64) {
        self.cpu_core_seconds += r.cpu * seconds;
        self.memory_gib_seconds += r.memory / GIB * seconds;
        self.cpu_limit_core_seconds += r.cpu_limit * seconds;
        self.memory_limit_gib_seconds += r.memory_limit / GIB * seconds;
        self.pod_seconds += pods * seconds;
        self.storage_gib_seconds += storage / GIB * seconds;
    }

    /// Asleep for `seconds`, its workloads having requested `before` when it went to sleep.
    pub fn asleep(&mut self, before: PodResources, seconds: f64) {
        self.asleep_seconds += seconds;
        self.saved_cpu_core_seconds += before.cpu * seconds;
        self.saved_memory_gib_seconds += before.memory / GIB * seconds;
    }

    pub fn count_requests(&mut self, user: &str, n: u64) {
        self.requests += n;
        let user = user_key(user);
        let key = if self.requests_by_user.contains_key(&user) || self.requests_by_user.len() < USERS_PER_DAY {
            user
        } else {
            "other".to_string()
        };
        *self.requests_by_user.entry(key).or_default() += n;
    }

    /// Every figure to a thousandth (what the ledger keeps).
    fn round(&mut self) {
        for v in [
            &mut self.awake_seconds,
            &mut self.asleep_seconds,
            &mut self.cpu_core_seconds,
            &mut self.memory_gib_seconds,
            &mut self.cpu_limit_core_seconds,
            &mut self.memory_limit_gib_seconds,
            &mut self.pod_seconds,
            &mut self.storage_gib_seconds,
            &mut self.saved_cpu_core_seconds,
            &mut self.saved_memory_gib_seconds,
        ] {
            *v = (*v * 1000.0).round() / 1000.0;
        }
    }

    /// This day and `o` together (a total over days; the busiest users kept).
    pub fn plus(&self, o: &Day) -> Day {
        let mut sum = Day {
            awake_seconds: self.awake_seconds + o.awake_seconds,
            asleep_seconds: self.asleep_seconds + o.asleep_seconds,
            cpu_core_seconds: self.cpu_core_seconds + o.cpu_core_seconds,
            memory_gib_seconds: self.memory_gib_seconds + o.memory_gib_seconds,
            cpu_limit_core_seconds: self.cpu_limit_core_seconds + o.cpu_limit_core_seconds,
            memory_limit_gib_seconds: self.memory_limit_gib_seconds + o.memory_limit_gib_seconds,
            pod_seconds: self.pod_seconds + o.pod_seconds,
            storage_gib_seconds: self.storage_gib_seconds + o.storage_gib_seconds,
            saved_cpu_core_seconds: self.saved_cpu_core_seconds + o.saved_cpu_core_seconds,
            saved_memory_gib_seconds: self.saved_memory_gib_seconds + o.saved_memory_gib_seconds,
            requests: self.requests + o.requests,
            requests_by_user: self.requests_by_user.clone(),
        };
        for (user, n) in &o.requests_by_user {
            *sum.requests_by_user.entry(user.clone()).or_default() += n;
        }
        if sum.requests_by_user.len() > USERS_PER_DAY {
            let mut by_count: Vec<(String, u64)> = std::mem::take(&mut sum.requests_by_user).into_iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            for (i, (user, n)) in by_count.into_iter().enumerate() {
                let key = if i < USERS_PER_DAY - 1 && user != "other" { user } else { "other".into() };
                *sum.requests_by_user.entry(key).or_default() += n;
            }
        }
        sum
    }
}

/// A cluster's use, per UTC day (`2026-12-04`), as persisted on its host Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ledger {
    /// Up to when (RFC 3339) the figures are accounted: a restarted control plane counts the
    /// pods that ran meanwhile from here.
    pub accounted_until: Option<String>,
    /// What its pods requested the last time it ran awake (cores, bytes): what a sleep that
    /// outlives a restart goes on saving.
    pub before_sleep_cpu: f64,
    pub before_sleep_memory: f64,
    pub days: BTreeMap<String, Day>,
}

impl Ledger {
    /// The ledger in its ConfigMap's data (empty if there is none or it is unreadable).
    pub fn from_data(data: Option<&BTreeMap<String, String>>) -> Ledger {
        data.and_then(|d| d.get(LEDGER_KEY)).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default()
    }

    /// The ledger as JSON within [`MAX_LEDGER_BYTES`]: figures to a thousandth; past the bound
    /// the oldest days lose their users, then go.
    pub fn to_json_within(&mut self, max: usize) -> String {
        for d in self.days.values_mut() {
            d.round();
        }
        loop {
            let json = serde_json::to_string(self).unwrap_or_default();
            if json.len() <= max || self.days.is_empty() {
                return json;
            }
            match self.days.values_mut().find(|d| !d.requests_by_user.is_empty()) {
                Some(d) => d.requests_by_user.clear(),
                None => {
                    self.days.pop_first();
                }
            }
        }
    }

    /// The day `at` falls on (UTC), created if new; the oldest days beyond [`KEPT_DAYS`] go.
    pub fn day(&mut self, at: jiff::Timestamp) -> &mut Day {
        let key = day_of(at);
        if !self.days.contains_key(&key) {
            while self.days.len() >= KEPT_DAYS {
                self.days.pop_first();
            }
        }
        self.days.entry(key).or_default()
    }

    /// The days from `first` (a `YYYY-MM-DD`) on.
    pub fn since<'a>(&'a self, first: &str) -> impl Iterator<Item = (&'a String, &'a Day)> {
        self.days.range(first.to_string()..)
    }

    /// Everything since `first`.
    pub fn total_since(&self, first: &str) -> Day {
        self.since(first).fold(Day::default(), |sum, (_, d)| sum.plus(d))
    }

    /// Everything kept.
    pub fn total(&self) -> Day {
        self.total_since("")
    }
}

/// The UTC day of `at`, as the ledger names it.
pub fn day_of(at: jiff::Timestamp) -> String {
    at.strftime("%Y-%m-%d").to_string()
}

/// `from`..`to` cut at UTC midnights: each part's start and its length in seconds.
pub fn by_day(from: jiff::Timestamp, to: jiff::Timestamp) -> Vec<(jiff::Timestamp, f64)> {
    const DAY: i64 = 86_400;
    let mut parts = vec![];
    let mut at = from;
    while at < to {
        let next_midnight = jiff::Timestamp::from_second((at.as_second().div_euclid(DAY) + 1) * DAY).unwrap_or(to);
        let end = next_midnight.min(to);
        parts.push((at, end.duration_since(at).as_secs_f64()));
        at = end;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("250m"), Some(0.25));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("1Gi"), Some(1073741824.0));
        assert_eq!(quantity("128Mi"), Some(134217728.0));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("1.5k"), Some(1500.0));
        assert_eq!(quantity("12Qi"), None);
        assert_eq!(quantity("4000000001n"), Some(4.000000001));
        assert_eq!(quantity("1500u"), Some(0.0015));
        assert_eq!(quantity("1Ei"), Some(1024f64.powi(6)));
        assert_eq!(quantity("2E"), Some(2e18));
    }

    #[test]
    fn a_pod_counts_as_the_scheduler_counts_it() {
        let p = pod(r#"
spec:
  overhead: {cpu: 10m}
  initContainers:
  - {name: big-setup, resources: {requests: {cpu: "2", memory: 64Mi}}}
  - {name: proxy, restartPolicy: Always, resources: {requests: {cpu: 100m, memory: 32Mi}}}
  - {name: late-setup, resources: {requests: {cpu: 500m, memory: 1Gi}}}
  containers:
  - {name: a, resources: {requests: {cpu: 250m, memory: 128Mi}, limits: {cpu: "1", memory: 256Mi}}}
  - {name: b, resources: {limits: {cpu: 500m, memory: 64Mi}}}
"#);
        let r = PodResources::of_pod(&p);
        // CPU: the one-shot `big-setup` (2) beats the running set (0.1 + 0.25 + 0.5); + overhead.
        assert!((r.cpu - 2.01).abs() < 1e-9, "{r:?}");
        // Memory: `late-setup` beside the sidecar (1 GiB + 32 MiB) beats 32 + 128 + 64 MiB.
        assert_eq!(r.memory, 1024f64.powi(3) + 32.0 * 1024f64.powi(2));
        assert_eq!(r.cpu_limit, 1.5, "limits likewise: the running set (1 + 0.5) beats the init containers (none)");
        assert_eq!(PodResources::of_pod(&pod("spec: {containers: [{name: a}]}")), PodResources::default());
        let pod_level = pod(
            "spec: {resources: {requests: {cpu: \"8\"}}, containers: [{name: a, resources: {requests: {cpu: 1m, memory: 1Mi}}}]}",
        );
        let r = PodResources::of_pod(&pod_level);
        assert_eq!((r.cpu, r.memory), (8.0, 1024.0 * 1024.0), "pod-level requests win where set");
        assert!(!holds_resources(&pod("spec: {nodeName: n, containers: []}\nstatus: {phase: Succeeded}")));
        assert!(holds_resources(&pod("spec: {nodeName: n, containers: []}\nstatus: {phase: Running}")));
        assert!(!holds_resources(&pod("spec: {containers: []}\nstatus: {phase: Pending}")), "not bound yet");
    }

    #[test]
    fn days_add_up_keep_the_busiest_users_and_a_bounded_history() {
        let mut l = Ledger::default();
        let t: jiff::Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        let r = PodResources { cpu: 0.5, memory: GIB, cpu_limit: 1.0, memory_limit: 2.0 * GIB };
        l.day(t).hold(r, 2.0, 10.0 * GIB, 3600.0);
        l.day(t).asleep(r, 7200.0);
        for u in 0..15 {
            l.day(t).count_requests(&format!("user-{u}"), 1);
        }
        let d = &l.days["2026-12-04"];
        assert_eq!((d.cpu_core_seconds, d.memory_gib_seconds, d.pod_seconds), (1800.0, 3600.0, 7200.0));
        assert_eq!((d.storage_gib_seconds, d.saved_cpu_core_seconds), (36_000.0, 3600.0));
        assert_eq!((d.requests, d.requests_by_user.len(), d.requests_by_user["other"]), (15, 11, 5));
        l.day("2026-12-05T01:00:00Z".parse().unwrap()).hold(r, 1.0, 0.0, 100.0);
        assert_eq!(l.total_since("2026-12-05").pod_seconds, 100.0);
        assert_eq!(l.total().pod_seconds, 7300.0);
        let summed = l.total().requests_by_user;
        assert!(summed.len() <= USERS_PER_DAY, "{summed:?}");
        assert_eq!(summed.values().sum::<u64>(), 15);
        let mut t = t;
        for _ in 0..200 {
            t = t.checked_add(jiff::SignedDuration::from_hours(24)).unwrap();
            l.day(t).awake_seconds += 1.0;
        }
        assert_eq!(l.days.len(), KEPT_DAYS);
        assert!(l.days.keys().next().unwrap() > &"2027".to_string(), "the oldest days went");
        let text = l.to_json_within(MAX_LEDGER_BYTES);
        let mut a = BTreeMap::new();
        a.insert(LEDGER_KEY.to_string(), text);
        assert_eq!(Ledger::from_data(Some(&a)), l);
    }

    #[test]
    fn a_hostile_ledger_stays_bounded() {
        let mut l = Ledger::default();
        let mut t: jiff::Timestamp = "2026-09-01T10:00:00Z".parse().unwrap();
        let long = "u".repeat(8192);
        for _ in 0..KEPT_DAYS {
            for i in 0..20 {
                l.day(t).count_requests(&format!("{long}{i}"), 1);
            }
            l.day(t).hold(PodResources { cpu: 1.0 / 3.0, ..Default::default() }, 1.0, 0.0, 1.0 / 7.0);
            t = t.checked_add(jiff::SignedDuration::from_hours(24)).unwrap();
        }
        let names: Vec<&String> = l.days.values().next().unwrap().requests_by_user.keys().collect();
        assert!(names.iter().all(|n| n.chars().count() <= 64), "{names:?}");
        assert_eq!(names.len(), USERS_PER_DAY + 1, "ten named and other");
        let json = l.to_json_within(MAX_LEDGER_BYTES);
        assert!(json.len() <= MAX_LEDGER_BYTES, "{}", json.len());
        assert_eq!(l.days.len(), KEPT_DAYS, "users dropped before days");
        assert!(!l.days.values().last().unwrap().requests_by_user.is_empty(), "the newest days keep theirs");
        assert!(json.contains("\"cpuCoreSeconds\":0.048,"), "rounded to a thousandth");
        let small = l.to_json_within(2000);
        assert!(small.len() <= 2000 && l.days.len() < KEPT_DAYS, "then the oldest days go");
    }

    #[test]
    fn intervals_are_cut_at_utc_midnight() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let parts = by_day(t("2026-12-04T23:59:00Z"), t("2026-12-06T00:01:00Z"));
        let days: Vec<(String, f64)> = parts.iter().map(|(at, s)| (day_of(*at), *s)).collect();
        assert_eq!(
            days,
            [("2026-12-04".to_string(), 60.0), ("2026-12-05".to_string(), 86_400.0), ("2026-12-06".to_string(), 60.0)]
        );
        assert!(by_day(t("2026-12-04T10:00:00Z"), t("2026-12-04T10:00:00Z")).is_empty());
    }
}
