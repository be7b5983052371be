//! The syncer: objects of a virtual cluster mirrored into one host namespace.
//!
//! Module map:
//! - `naming`, `policy`: re-exported from `vkube-core` (the naming contract and the admin's
//!   isolation policy, shared with the API proxy);
//! - `kind`: the one list of synced kinds and the description each gives (`SyncedKind`);
//! - one module per synced kind: `pods`, `services`, `configs` (configmaps, secrets),
//!   `endpoints`, `endpointslices`, `claims`, `networkpolicies` and `ingresses` (when the admin
//!   turns them on);
//! - the loops beside them: `tokens` (virtual service-account tokens for host pods), `nodes`
//!   (virtual nodes), `events` (host events shown on virtual objects), `dns` (CoreDNS);
//! - the shape they share: `sync` (ownership, collisions, refusals), `mirror` (plain copies),
//!   `budget` (writes per host object per minute);
//! - the machinery: `informer` (watches + stores), `queue` (keyed work queue), `refs` (what
//!   pods and Ingresses use), `context`, `health` (for the control plane's probes), `metrics`.

pub mod budget;
pub mod builtin;
pub mod claims;
pub mod compact;
pub mod configs;
pub mod context;
pub mod disruption_budgets;
pub mod dns;
pub mod endpoints;
pub mod endpointslices;
pub mod events;
pub mod from_host;
pub mod health;
pub mod informer;
pub mod ingress_classes;
pub mod ingresses;
pub mod kind;
pub mod metrics;
pub mod mirror;
pub mod networkpolicies;
pub mod nodes;
pub mod pod_certificates;
pub mod pod_ips;
pub mod pods;
pub mod priority_classes;
pub mod queue;
#[cfg(test)]
mod reconcile_tests;
pub mod refs;
pub mod runtime_classes;
pub mod services;
pub mod storage;
pub mod sync;
pub mod tokens;
pub mod trust_bundles;
pub mod unseen;

pub use vkube_core::{naming, policy};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource};
use tokio::task::JoinSet;

use compact::Compact;
use context::{Context, Key, Options, Queues, Stores};
use informer::{Change, Informer, key_of};
use kind::{KindQueues, KindStores, KindVisitor, SyncedKind};
pub use metrics::Metrics;
use naming::Translator;
use policy::Policy;
use queue::{Queue, Worker, queue};

pub use vkube_core::contract::FIELD_MANAGER;

/// Everything the syncer is told at start.
pub struct Config {
    pub translator: Translator,
    pub policy: Policy,
    pub options: Options,
    pub virt: Client,
    pub host: Client,
    pub coredns_image: String,
    /// The CA certificate (PEM) that signs the resource metrics API's serving certificate: the
    /// `caBundle` of its APIService.
    pub resource_metrics_ca: String,
    /// Registered by the caller (`Metrics::register`) before its registry is served.
    pub metrics: Metrics,
    /// Told when the caches are filled and when the syncer stops.
    pub health: health::Health,
    /// Filled with the store of this cluster's host Services once it exists, for whoever else
    /// in the process needs them (the virtual API server's egress proxy): one watch, not two.
    /// Replaced by each run of the syncer (a cluster that slept and woke runs it again).
    pub host_services: SharedStore<k8s_openapi::api::core::v1::Service>,
    /// Filled, like `host_services`, with what the current run knows of the host nodes the
    /// virtual cluster may show (the resource metrics API answers for those only).
    pub shown_nodes: SharedNodes,
}

/// The host nodes a run of the syncer may show the tenant: those the host showed this run's
/// pods on, and with `sync_all_nodes` those the admin's node selector allows.
#[derive(Clone, Default)]
pub struct ShownNodes {
    used: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    listed: Arc<std::sync::RwLock<std::collections::BTreeMap<String, String>>>,
}

impl ShownNodes {
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        let mut names = self.used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        names.extend(self.listed.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        names
    }
}

/// The current run's [`ShownNodes`] (none before a run has started).
pub type SharedNodes = Arc<std::sync::RwLock<Option<ShownNodes>>>;

/// A store the syncer fills for others in the process, the current run's.
pub type SharedStore<K> = Arc<std::sync::RwLock<Option<Store<K>>>>;

/// Why the syncer stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("a watch or work loop ended: {0}")]
    TaskEnded(String),
}

/// How often every object is looked at again, whatever the watches said (drift repair).
pub(crate) const RESYNC: Duration = Duration::from_secs(600);

/// Runs the syncer until `shutdown` resolves (`Ok`) or one of its loops ends (`Err`, also told
/// to `cfg.health`). Wiring only: the synced kinds' informers and queues ([`Kinds`]), the loops
/// beside them ([`Sides`]), the context they share, then [`sync_forever`].
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), Stopped> {
    let health = cfg.health.clone();
    let (virt, host) = (cfg.virt.clone(), cfg.host.clone());
    let streamed = informer::streams_lists(&virt, "default").await;
    tracing::info!(streamed, "the virtual informers' initial state: streamed in their watches, else listed whole");
    let mut kinds = Kinds::new(&virt, &host, &cfg.translator, &cfg.metrics, streamed);
    kind::each_kind(&mut kinds);
    let sides = Sides::new(&virt, &host, cfg.translator.host_namespace(), &cfg.metrics, &mut kinds);

    let Kinds { stores, queues, start, ready, workers, resync, .. } = kinds;
    *cfg.host_services.write().unwrap_or_else(|e| e.into_inner()) = Some(stores.host::<Service>().clone());
    let shown = ShownNodes::default();
    *cfg.shown_nodes.write().unwrap_or_else(|e| e.into_inner()) = Some(shown.clone());
    let ctx = Arc::new(Context {
        tr: cfg.translator,
        policy: cfg.policy,
        opts: cfg.options,
        virt: virt.clone(),
        host,
        stores: Stores {
            kinds: stores,
            vnodes: sides.vnodes.store(),
            vnamespaces: sides.vnamespaces.store(),
            hevents: sides.hevents.store(),
        },
        refs: Default::default(),
        carried: Default::default(),
        unschedulable: Default::default(),
        bound_tokens: Default::default(),
        bindings_unseen: Default::default(),
        copies_unseen: Default::default(),
        pod_nodes: Default::default(),
        nodes_used: shown.used,
        pod_certificates: Default::default(),
        pod_ips: Default::default(),
        queues: sides.queues(queues),
        recorder: Recorder::new(virt, Reporter { controller: "vkube-syncer".into(), instance: None }),
        dns_ip: Default::default(),
        host_nodes: shown.listed,
        node_refreshed: Default::default(),
        node_failures: Default::default(),
        bound_node_reads: Default::default(),
        events_mark: Default::default(),
        absent_classes: Default::default(),
        runtime_class_scheduling: Default::default(),
        classes_shown: Default::default(),
        metrics: cfg.metrics,
        health: cfg.health,
        budget: budget::WriteBudget::new(budget::WRITES_PER_MINUTE),
        started: std::time::Instant::now(),
    });

    // Before the host events watch starts: a relist skips what is already mirrored.
    events::load_mark(&ctx).await;
    let mut tasks = JoinSet::new();
    for wire in start {
        wire(&ctx, &mut tasks);
    }
    let side_workers = sides.start(&ctx, &mut tasks);
    let builtin = builtin::manifests(&cfg.coredns_image, &ctx.opts.cluster_domain, &cfg.resource_metrics_ca);
    let work = sync_forever(ctx, ready, workers, side_workers, resync, builtin);
    let result = tokio::select! {
        stopped = work => Err(stopped),
        Some(ended) = tasks.join_next() => Err(Stopped::TaskEnded(describe(ended))),
        _ = shutdown => Ok(()),
    };
    tasks.abort_all();
    if let Err(e) = &result {
        tracing::error!(error = %e, "the syncer stopped");
        health.stopped(e.to_string());
    }
    result
}

/// Once the caches are filled: the host's classes read ([`from_host::read_classes`]), the
/// workers, readiness once the listed host classes are shown, the initial sync (CoreDNS
/// installed, every queue drained once, orphaned tokens swept), then the resync every
/// [`RESYNC`]. Returns only if a worker or loop ends.
async fn sync_forever(
    c: Arc<Context>,
    ready: Vec<BoxFuture<'static, ()>>,
    workers: Vec<SpawnWorkers>,
    side_workers: SideWorkers,
    resync: Vec<fn(&Context)>,
    builtin: Vec<serde_json::Value>,
) -> Stopped {
    let started = std::time::Instant::now();
    futures::future::join_all(ready).await;
    c.health.syncing();
    // Ready once the listed host classes are shown, or 30 s from now whatever holds them up (the
    // host nodes' and classes' reads below, the views' writes through the tenant's admission
    // webhooks). Its own set: its end is no worker's.
    let mut readiness = JoinSet::new();
    let shown = c.clone();
    readiness.spawn(async move {
        if tokio::time::timeout(Duration::from_secs(30), shown.classes_shown.notified()).await.is_err() {
            tracing::warn!("showing the listed host classes took over 30 s; ready without them");
        }
        shown.health.classes_shown();
    });
    tracing::info!(
        pods = c.stores.virt::<Pod>().len(),
        host_pods = c.stores.host::<Pod>().len(),
        "caches ready; syncing"
    );
    if c.opts.sync_all_nodes {
        nodes::list_host_nodes_once(&c, None).await;
    }
    // Bounded: the host client has no read timeout, and the workers wait for it.
    if tokio::time::timeout(Duration::from_secs(30), from_host::read_classes(&c)).await.is_err() {
        tracing::warn!("reading the listed host classes took over 30 s; syncing without them until the next pass");
    }
    let n = c.opts.concurrency;
    let mut running = JoinSet::new();
    for spawn in workers {
        spawn(c.clone(), n, &mut running);
    }
    side_workers.spawn(&c, &mut running);
    c.queues.upward::<Service>().add((services::API_SERVICE.0.into(), services::API_SERVICE.1.into()));
    let initial = async {
        while let Err(e) = builtin::ensure(&c.virt, &builtin).await {
            tracing::warn!(error = %e, "installing CoreDNS and the resource metrics API in the virtual cluster failed; retrying");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        while !c.queues.all_idle() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = started.elapsed().as_secs_f64();
        c.metrics.initial_sync_seconds.set(took);
        c.health.synced();
        tracing::info!(seconds = took, pods = c.stores.virt::<Pod>().len(), "initial sync done");
        // Token Secrets orphaned while we were down.
        tokens::sweep(&c).await;
    };
    // A worker that ends during the initial sync would leave its queue undrained for ever.
    tokio::select! {
        _ = initial => {}
        Some(ended) = running.join_next() => return Stopped::TaskEnded(describe(ended)),
    }
    let mut tick = tokio::time::interval(RESYNC);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let host_pods = c.stores.host::<Pod>();
                let forgotten = c.pod_ips.retain_pods(|name| {
                    host_pods.get(&kube::runtime::reflector::ObjectRef::new(name).within(c.host_ns())).is_some()
                });
                endpoints::requeue(&c, forgotten);
                resync.iter().for_each(|r| r(&c));
                c.stores.vnodes.state().iter().for_each(|n| c.queues.nodes.add(key_of(n.as_ref()).1));
                tokens::sweep(&c).await;
            }
            Some(ended) = running.join_next() => return Stopped::TaskEnded(describe(ended)),
        }
    }
}

/// The loops beside the synced kinds: virtual nodes, host events, virtual namespaces (watched
/// for namespace selectors), tokens.
struct Sides {
    vnodes: Informer<Node>,
    hevents: Informer<Event, Compact<Event>>,
    vnamespaces: Informer<Namespace>,
    queues: (Queue<String>, Queue<String>, Queue<String>),
    workers: SideWorkers,
}

struct SideWorkers {
    tokens: Worker<String>,
    nodes: Worker<String>,
    events: Worker<String>,
}

impl Sides {
    /// The informers (their stores counted in `kinds`' readiness) and queues.
    fn new(virt: &Client, host: &Client, host_ns: &str, metrics: &Metrics, kinds: &mut Kinds) -> Self {
        let all = watcher::Config::default().any_semantic();
        let v = |c| informer::initial(c, kinds.virt_streamed);
        let vnodes =
            Informer::new("virtual nodes", Api::<Node>::all(virt.clone()), v(all.clone().labels(nodes::LABEL_FAKE)));
        let hevents = Informer::new(
            "host events",
            Api::<Event>::namespaced(host.clone(), host_ns),
            informer::host_paged(all.clone()),
        );
        let vnamespaces = Informer::new("virtual namespaces", Api::<Namespace>::all(virt.clone()), v(all));
        let (tokens_q, tokens) = queue::<String>("ServiceAccountToken", metrics.clone());
        let (nodes_q, nodes) = queue::<String>("Node", metrics.clone());
        let (events_q, events) = queue::<String>("Event", metrics.clone());
        kinds.wait_for(vnodes.store());
        kinds.wait_for(hevents.store());
        kinds.wait_for(vnamespaces.store());
        let workers = SideWorkers { tokens, nodes, events };
        Sides { vnodes, hevents, vnamespaces, queues: (tokens_q, nodes_q, events_q), workers }
    }

    /// Every queue: the synced kinds' and these loops'.
    fn queues(&self, kinds: KindQueues) -> Queues {
        let (tokens, nodes, events) = self.queues.clone();
        Queues { kinds, tokens, nodes, events }
    }

    /// Attaches the handlers and starts the watches.
    fn start(self, ctx: &Arc<Context>, tasks: &mut JoinSet<()>) -> SideWorkers {
        let Sides { mut vnodes, mut hevents, mut vnamespaces, workers, .. } = self;
        let c = ctx.clone();
        vnodes.on_change(move |o, _| {
            c.queues.nodes.add(key_of(o).1);
            let waiting = std::mem::take(&mut *c.unschedulable.lock().unwrap_or_else(|e| e.into_inner()));
            waiting.into_iter().for_each(|k| c.queues.of::<k8s_openapi::api::core::v1::Pod>().add(k));
        });
        let c = ctx.clone();
        hevents.on_change(move |o, change| {
            // A relist brings every event the host still keeps; those already mirrored (up to the
            // recorded mark) would cost two requests each for nothing.
            if change == Change::Applied || (change == Change::Listed && events::after_mark(&c, o)) {
                c.queues.events.add(key_of(o).1);
            }
        });
        let c = ctx.clone();
        vnamespaces.on_change(move |_, _| {
            // Namespace labels decide what namespace selectors in policies match.
            if c.opts.sync_network_policies {
                let q = c.queues.of::<NetworkPolicy>();
                c.stores.virt::<NetworkPolicy>().state().iter().for_each(|p| q.add(key_of(p.as_ref())));
            }
        });
        tasks.spawn(vnodes.run());
        tasks.spawn(hevents.run());
        tasks.spawn(vnamespaces.run());
        workers
    }
}

impl SideWorkers {
    fn spawn(self, c: &Arc<Context>, running: &mut JoinSet<()>) {
        let n = c.opts.concurrency;
        let SideWorkers { tokens, nodes, events } = self;
        spawn_worker(running, tokens, n, c.clone(), |c, k| async move { tokens::reconcile(&c, k).await });
        spawn_worker(running, nodes, n, c.clone(), |c, k| async move { nodes::reconcile(&c, k).await });
        // Events matter less than workloads: a few at a time, so a burst's events do not hold up
        // its pods.
        spawn_worker(running, events, 2, c.clone(), |c, k| async move { events::reconcile(&c, k).await });
        if c.opts.sync_all_nodes {
            let lister = c.clone();
            running.spawn(async move { nodes::list_host_nodes(&lister, Duration::from_secs(60)).await });
        }
        let shown = c.clone();
        running.spawn(async move { from_host::keep_in_step(&shown, Duration::from_secs(60)).await });
        if c.opts.proxy_service.is_some() {
            let marker = c.clone();
            running.spawn(async move { events::keep_mark(&marker, Duration::from_secs(5)).await });
        }
    }
}

fn describe(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "returned".into(),
        Err(e) if e.is_panic() => "panicked (see the log above)".into(),
        Err(e) => e.to_string(),
    }
}

type Wire = Box<dyn FnOnce(&Arc<Context>, &mut JoinSet<()>) + Send>;
type SpawnWorkers = Box<dyn FnOnce(Arc<Context>, usize, &mut JoinSet<()>) + Send>;

/// What [`kind::each_kind`] builds: each synced kind's two informers and queue first, then,
/// once the context holding their stores and queues exists, their handlers, watches and workers.
struct Kinds<'a> {
    virt: &'a Client,
    host: &'a Client,
    tr: &'a Translator,
    metrics: &'a Metrics,
    /// Whether the virtual informers' initial state is streamed ([`informer::streams_lists`]).
    virt_streamed: bool,
    stores: KindStores,
    queues: KindQueues,
    /// Attaches a kind's handlers and starts its watches.
    start: Vec<Wire>,
    /// Resolves once a store has listed.
    ready: Vec<BoxFuture<'static, ()>>,
    workers: Vec<SpawnWorkers>,
    resync: Vec<fn(&Context)>,
}

impl<'a> Kinds<'a> {
    fn new(virt: &'a Client, host: &'a Client, tr: &'a Translator, metrics: &'a Metrics, virt_streamed: bool) -> Self {
        Kinds {
            virt,
            host,
            tr,
            metrics,
            virt_streamed,
            stores: Default::default(),
            queues: Default::default(),
            start: vec![],
            ready: vec![],
            workers: vec![],
            resync: vec![],
        }
    }

    fn wait_for<S: Resource<DynamicType = ()> + Clone + Send + Sync + 'static>(&mut self, store: Store<S>) {
        self.ready.push(Box::pin(async move {
            let _ = store.wait_until_ready().await;
        }));
    }
}

impl KindVisitor for Kinds<'_> {
    fn visit<K: SyncedKind>(&mut self) {
        let all = informer::initial(watcher::Config::default().any_semantic(), self.virt_streamed);
        let mut virt: Informer<K::Virtual, K::VirtualStored> =
            Informer::new(format!("virtual {}", K::KIND), Api::all(self.virt.clone()), all);
        let host_api = Api::namespaced(self.host.clone(), self.tr.host_namespace());
        let mut host: Informer<K::Host, K::HostStored> =
            Informer::new(format!("host {}", K::KIND), host_api, informer::host_paged(K::host_watch(self.tr)));
        if let Some(slim) = K::SLIM_HOST {
            host = host.slimmed(slim);
        }
        let (q, w) = queue::<Key>(K::KIND, self.metrics.clone());
        let (up_q, up_w) = K::UPWARD_QUEUE.map(|name| queue::<Key>(name, self.metrics.clone())).unzip();
        self.stores.insert::<K>(virt.store(), host.store());
        self.queues.insert::<K>(q, up_q);
        self.wait_for(virt.store());
        self.wait_for(host.store());
        self.start.push(Box::new(move |ctx, tasks| {
            let c = ctx.clone();
            virt.on_change(move |o, change| K::on_virtual_change(&c, o, change));
            let c = ctx.clone();
            host.on_change(move |o, change| K::on_host_change(&c, o, change));
            tasks.spawn(virt.run());
            tasks.spawn(host.run());
        }));
        self.workers.push(Box::new(move |ctx, n, set| {
            if let Some(up_w) = up_w {
                spawn_worker(set, up_w, n, ctx.clone(), |c, k| async move { K::reflect(&c, k).await });
            }
            spawn_worker(set, w, n, ctx, |c, k| async move { K::reconcile(&c, k).await })
        }));
        self.resync.push(resync::<K>);
    }
}

fn spawn_worker<K, F, Fut>(set: &mut JoinSet<()>, w: Worker<K>, n: usize, ctx: Arc<Context>, f: F)
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + std::fmt::Debug + 'static,
    F: Fn(Arc<Context>, K) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = sync::Result<queue::Action>> + Send + 'static,
{
    set.spawn(async move { w.run(n, move |k| f(ctx.clone(), k)).await });
}

/// Every object of kind `K` looked at again (downward), and every host copy's owner (upward).
fn resync<K: SyncedKind>(c: &Context) {
    let q = c.queues.of::<K>();
    c.stores.virt::<K>().state().iter().for_each(|o| q.add(key_of(o.as_ref())));
    c.stores.host::<K>().state().iter().for_each(|o| kind::enqueue_owner(c, o.meta()));
}
