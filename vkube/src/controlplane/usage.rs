//! Usage accounting in `vkube run`: what the cluster's host pods request (and their limits), its
//! host claims' storage, time awake and asleep, what sleeping saved, and the requests that
//! counted as activity, integrated over time into the per-day [`Ledger`] in the cluster's usage
//! ConfigMap on the host (`vkube usage` reads it there, even while the cluster is paused) and
//! into `vkube_usage_*` counters on `/metrics`.
//!
//! The figures follow the host's watch events: a pod counts from the moment it is bound to a
//! node until it finishes or is deleted, to the event. A restarted control plane goes on from the
//! ledger's `accountedUntil` (pods that ran meanwhile are counted; time awake is not).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use vkube_apiproxy::sleep::{Activity, Power};

use crate::names;
use crate::usage::{Day, LEDGER_KEY, Ledger, MAX_LEDGER_BYTES, PodResources, by_day, claim_bytes, holds_resources};

/// `vkube run`'s accounting flags.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageArgs {
    /// How often the usage ledger is written to the host Service (and at shutdown). A crash
    /// loses at most this much of time awake and of activity.
    #[arg(long, env = "VKUBE_USAGE_PERSIST_EVERY", default_value = "60s", value_parser = super::parse_positive_duration)]
    pub usage_persist_every: Duration,
}

/// How often time awake or asleep and the activity counts are added when nothing else changed.
const TICK: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

type FloatCounter = Family<ClusterLabel, Counter<f64, std::sync::atomic::AtomicU64>>;

/// `vkube_usage_*`: the ledger's figures as counters (from the kept days on, at a restart).
#[derive(Clone, Default)]
pub struct UsageMetrics {
    awake: FloatCounter,
    asleep: FloatCounter,
    cpu: FloatCounter,
    memory: FloatCounter,
    cpu_limit: FloatCounter,
    memory_limit: FloatCounter,
    pods: FloatCounter,
    storage: FloatCounter,
    saved_cpu: FloatCounter,
    saved_memory: FloatCounter,
    requests: Family<ClusterLabel, Counter>,
}

impl UsageMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = UsageMetrics::default();
        let mut reg = |name: &str, help: &str, c: &FloatCounter| registry.register(name, help, c.clone());
        reg("vkube_usage_awake_seconds", "Seconds the control plane ran awake", &m.awake);
        reg("vkube_usage_asleep_seconds", "Seconds the cluster slept (sleep mode)", &m.asleep);
        reg("vkube_usage_cpu_core_seconds", "CPU its host pods requested, integrated over time", &m.cpu);
        reg("vkube_usage_memory_gib_seconds", "Memory its host pods requested, integrated over time", &m.memory);
        reg("vkube_usage_cpu_limit_core_seconds", "CPU limits of its host pods over time", &m.cpu_limit);
        reg("vkube_usage_memory_limit_gib_seconds", "Memory limits of its host pods over time", &m.memory_limit);
        reg("vkube_usage_pod_seconds", "Host pods that held resources, over time", &m.pods);
        reg("vkube_usage_storage_gib_seconds", "Storage its host claims requested, over time", &m.storage);
        reg("vkube_usage_saved_cpu_core_seconds", "CPU requests released by sleeping, over time", &m.saved_cpu);
        reg("vkube_usage_saved_memory_gib_seconds", "Memory requests released by sleeping, over time", &m.saved_memory);
        registry.register("vkube_usage_requests", "Requests that counted as activity", m.requests.clone());
        m
    }

    fn add(&self, cluster: &str, d: &Day) {
        let l = ClusterLabel { cluster: cluster.into() };
        for (c, v) in [
            (&self.awake, d.awake_seconds),
            (&self.asleep, d.asleep_seconds),
            (&self.cpu, d.cpu_core_seconds),
            (&self.memory, d.memory_gib_seconds),
            (&self.cpu_limit, d.cpu_limit_core_seconds),
            (&self.memory_limit, d.memory_limit_gib_seconds),
            (&self.pods, d.pod_seconds),
            (&self.storage, d.storage_gib_seconds),
            (&self.saved_cpu, d.saved_cpu_core_seconds),
            (&self.saved_memory, d.saved_memory_gib_seconds),
        ] {
            if v > 0.0 {
                c.get_or_create(&l).inc_by(v);
            }
        }
        self.requests.get_or_create(&l).inc_by(d.requests);
    }
}

/// What the cluster holds on the host now.
/// What the cluster holds on the host now: pods by uid (with their creation), claims' bytes.
#[derive(Default)]
struct Held {
    pods: HashMap<String, (PodResources, Option<jiff::Timestamp>)>,
    claims: HashMap<String, (f64, Option<jiff::Timestamp>)>,
}

impl Held {
    fn pods_total(&self) -> PodResources {
        self.pods.values().fold(PodResources::default(), |a, (r, _)| a.plus(*r))
    }

    fn storage(&self) -> f64 {
        self.claims.values().map(|(b, _)| b).sum()
    }
}

pub struct Tracker {
    pub host: kube::Client,
    pub name: String,
    pub namespace: String,
    pub power: watch::Receiver<Power>,
    pub activity: Arc<Activity>,
    pub metrics: UsageMetrics,
    pub args: UsageArgs,
}

/// The tracker's running state: the ledger and what was last added to it.
struct Books {
    ledger: Ledger,
    held: Held,
    /// Up to when the ledger is accounted.
    last: jiff::Timestamp,
    power: Power,
    /// What its pods requested the last time it ran awake (what sleeping saves).
    before_sleep: PodResources,
    counted: HashMap<String, u64>,
    /// Both first lists are counted back: until then the ledger stays accounted until where the
    /// last process left it.
    counted_back: bool,
}

impl Books {
    /// Adds what was held from `last` to `now`, each part in its own day.
    fn advance(&mut self, now: jiff::Timestamp, metrics: &UsageMetrics, cluster: &str) {
        if now <= self.last {
            return;
        }
        let held = self.held.pods_total();
        for (at, seconds) in by_day(self.last, now) {
            let mut d = Day::default();
            d.hold(held, self.held.pods.len() as f64, self.held.storage(), seconds);
            if self.power == Power::Sleeping {
                d.asleep(self.before_sleep, seconds);
            } else {
                d.awake_seconds = seconds;
            }
            self.add(at, &d, metrics, cluster);
        }
        self.last = now;
        if self.power == Power::Running {
            self.before_sleep = held;
        }
    }

    fn add(&mut self, at: jiff::Timestamp, d: &Day, metrics: &UsageMetrics, cluster: &str) {
        metrics.add(cluster, d);
        let day = self.ledger.day(at);
        *day = day.plus(d);
    }

    /// Requests counted since the last look.
    fn count_activity(&mut self, activity: &Activity, now: jiff::Timestamp, metrics: &UsageMetrics, cluster: &str) {
        let mut d = Day::default();
        for (user, n) in activity.by_user() {
            let before = self.counted.insert(user.clone(), n).unwrap_or(0);
            if n > before {
                d.count_requests(&user, n - before);
            }
        }
        if d.requests > 0 {
            self.add(now, &d, metrics, cluster);
        }
    }
}

/// A watched object's figure (`None`: it holds nothing now), with its creation.
type Figure<T> = Option<(T, Option<jiff::Timestamp>)>;

/// What a watch event changes: pods by uid (only while they hold resources), claims.
enum Change {
    Pod(String, Figure<PodResources>),
    Claim(String, Figure<f64>),
    /// A (re)list begins: the next `Listed` replaces everything of that kind.
    Relist(bool),
    Listed(bool),
}

fn created(meta: &kube::api::ObjectMeta) -> Option<jiff::Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

fn pod_change(pod: &Pod, gone: bool) -> Option<Change> {
    let uid = pod.metadata.uid.clone()?;
    let held = (!gone && holds_resources(pod)).then(|| (PodResources::of_pod(pod), created(&pod.metadata)));
    Some(Change::Pod(uid, held))
}

fn claim_change(claim: &PersistentVolumeClaim, gone: bool) -> Option<Change> {
    let uid = claim.metadata.uid.clone()?;
    Some(Change::Claim(uid, (!gone).then(|| (claim_bytes(claim), created(&claim.metadata)))))
}

/// A watch's events as changes; `pods` says which kind a relist is of.
fn changes<K: Clone + Send + 'static>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    change: fn(&K, bool) -> Option<Change>,
    pods: bool,
) -> futures::stream::BoxStream<'static, Change> {
    events
        .default_backoff()
        .filter_map(move |e| {
            std::future::ready(match e {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => change(&o, false),
                Ok(watcher::Event::Delete(o)) => change(&o, true),
                Ok(watcher::Event::Init) => Some(Change::Relist(pods)),
                Ok(watcher::Event::InitDone) => Some(Change::Listed(pods)),
                Err(e) => {
                    tracing::warn!(error = %e, "the usage accounting's watch failed; retrying with backoff");
                    None
                }
            })
        })
        .boxed()
}

impl Tracker {
    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.host.clone(), &self.namespace)
    }

    /// The ledger the last process wrote, read again until the host answers (a ledger started
    /// afresh would overwrite the history); `None` if asked to stop meanwhile.
    async fn read_ledger(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Ledger> {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.configmaps().get_opt(&names::usage_configmap(&self.name)).await {
                Ok(cm) => return Some(Ledger::from_data(cm.as_ref().and_then(|c| c.data.as_ref()))),
                Err(e) => tracing::warn!(error = %e, "could not read the usage ledger; trying again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Accounts until `shutdown`, then writes the ledger a last time.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some(ledger) = self.read_ledger(&mut shutdown).await else { return };
        let started = jiff::Timestamp::now();
        // Pods that ran while no control plane counted are counted from the last account; a new
        // ledger starts now.
        let from = ledger.accounted_until.as_deref().and_then(|t| t.parse().ok()).unwrap_or(started);
        let total = ledger.total();
        self.metrics.add(&self.name, &total);
        let before_sleep =
            PodResources { cpu: ledger.before_sleep_cpu, memory: ledger.before_sleep_memory, ..Default::default() };
        let mut books = Books {
            ledger,
            held: Held::default(),
            last: started,
            power: *self.power.borrow(),
            before_sleep,
            counted: HashMap::new(),
            counted_back: false,
        };
        let selector = vkube_core::naming::Translator::new(&self.name, &self.namespace).cluster_selector();
        // Consistent lists in small pages (a restart's burst of decoded pods kept small).
        let config = vkube_syncer::informer::consistent_paged(watcher::Config::default().labels(&selector));
        let pods = changes(
            watcher(Api::<Pod>::namespaced(self.host.clone(), &self.namespace), config.clone()),
            pod_change,
            true,
        );
        let claims = changes(
            watcher(Api::<PersistentVolumeClaim>::namespaced(self.host.clone(), &self.namespace), config),
            claim_change,
            false,
        );
        let mut events = futures::stream::select(pods, claims);
        let mut power = self.power.clone();
        let mut power_open = true;
        let mut tick = tokio::time::interval(TICK);
        let mut persist = tokio::time::interval(self.args.usage_persist_every);
        persist.tick().await;
        // What a (re)list finds, before it replaces what was held; the first list of each kind
        // also counts back to `from`.
        let (mut listing_pods, mut listing_claims) = (None::<Held>, None::<Held>);
        let (mut first_pods, mut first_claims) = (true, true);
        loop {
            tokio::select! {
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => break,
                _ = tick.tick() => {
                    let now = jiff::Timestamp::now();
                    books.advance(now, &self.metrics, &self.name);
                    books.count_activity(&self.activity, now, &self.metrics, &self.name);
                }
                _ = persist.tick() => {
                    books.advance(jiff::Timestamp::now(), &self.metrics, &self.name);
                    self.persist(&mut books).await;
                }
                changed = power.changed(), if power_open => {
                    books.advance(jiff::Timestamp::now(), &self.metrics, &self.name);
                    match changed {
                        Ok(()) => books.power = *power.borrow_and_update(),
                        Err(_) => power_open = false,
                    }
                }
                Some(change) = events.next() => {
                    books.advance(jiff::Timestamp::now(), &self.metrics, &self.name);
                    match change {
                        Change::Relist(true) => listing_pods = Some(Held::default()),
                        Change::Relist(false) => listing_claims = Some(Held::default()),
                        Change::Listed(true) => {
                            let listed = listing_pods.take().unwrap_or_default();
                            if std::mem::take(&mut first_pods) {
                                self.count_back(&mut books, from, &listed);
                            }
                            books.held.pods = listed.pods;
                        }
                        Change::Listed(false) => {
                            let listed = listing_claims.take().unwrap_or_default();
                            if std::mem::take(&mut first_claims) {
                                self.count_back(&mut books, from, &listed);
                            }
                            books.held.claims = listed.claims;
                        }
                        Change::Pod(uid, held) => {
                            let into = listing_pods.as_mut().unwrap_or(&mut books.held);
                            match held {
                                Some(r) => into.pods.insert(uid, r),
                                None => into.pods.remove(&uid),
                            };
                        }
                        Change::Claim(uid, bytes) => {
                            let into = listing_claims.as_mut().unwrap_or(&mut books.held);
                            match bytes {
                                Some(b) => into.claims.insert(uid, b),
                                None => into.claims.remove(&uid),
                            };
                        }
                    }
                    books.counted_back = !first_pods && !first_claims;
                }
            }
        }
        books.advance(jiff::Timestamp::now(), &self.metrics, &self.name);
        books.count_activity(&self.activity, jiff::Timestamp::now(), &self.metrics, &self.name);
        self.persist(&mut books).await;
    }

    /// What the first list finds ran before it was listed, since the last account (`from`)
    /// or its creation if later; a new ledger counts from this process's start.
    fn count_back(&self, books: &mut Books, from: jiff::Timestamp, listed: &Held) {
        let until = books.last;
        let since = |created: &Option<jiff::Timestamp>| created.map_or(from, |c| c.max(from));
        for (r, created) in listed.pods.values() {
            for (at, seconds) in by_day(since(created), until) {
                let mut d = Day::default();
                d.hold(*r, 1.0, 0.0, seconds);
                books.add(at, &d, &self.metrics, &self.name);
            }
        }
        for (bytes, created) in listed.claims.values() {
            for (at, seconds) in by_day(since(created), until) {
                let mut d = Day::default();
                d.hold(PodResources::default(), 0.0, *bytes, seconds);
                books.add(at, &d, &self.metrics, &self.name);
            }
        }
    }

    async fn persist(&self, books: &mut Books) {
        // Until the first lists are counted back, the time since the last account is still owed.
        if books.counted_back {
            books.ledger.accounted_until = Some(books.last.to_string());
        }
        books.ledger.before_sleep_cpu = books.before_sleep.cpu;
        books.ledger.before_sleep_memory = books.before_sleep.memory;
        let ledger = books.ledger.to_json_within(MAX_LEDGER_BYTES);
        let name = names::usage_configmap(&self.name);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(names::labels(&self.name)),
                ..Default::default()
            },
            data: Some([(LEDGER_KEY.to_string(), ledger)].into()),
            ..Default::default()
        };
        let apply = PatchParams::apply(crate::FIELD_MANAGER).force();
        if let Err(e) = self.configmaps().patch(&name, &apply, &Patch::Apply(&cm)).await {
            tracing::warn!(error = %e, configmap = name, "could not write the usage ledger");
        }
    }
}
