//! The syncer: objects of a virtual cluster mirrored into one host namespace.
//!
//! Module map:
//! - `naming`: the translation contract everything (and the API proxy) shares;
//! - `policy`: the admin's isolation policy, enforced at the host boundary;
//! - one module per synced kind: `pods`, `services`, `configs` (configmaps, secrets),
//!   `endpoints`, `claims`, `tokens` (virtual service-account tokens for host pods), `nodes`
//!   (virtual nodes), `events` (host events shown on virtual objects), `dns` (CoreDNS),
//!   `networkpolicies` (when the admin turns them on);
//! - the shape they share: `sync` (ownership, collisions, refusals), `mirror` (plain copies);
//! - the machinery: `informer` (watches + stores), `queue` (keyed work queue), `refs` (what
//!   pods use), `context`, `metrics`.

pub mod claims;
pub mod compact;
pub mod configs;
pub mod context;
pub mod dns;
pub mod endpoints;
pub mod endpointslices;
pub mod events;
pub mod informer;
pub mod metrics;
pub mod mirror;
pub mod networkpolicies;
pub mod nodes;
pub mod pods;
pub mod queue;
pub mod refs;
pub mod services;
pub mod sync;
pub mod tokens;

pub use vkube_core::{naming, policy};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event, Namespace, Node, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use context::{Context, Key, Options, Queues, Stores};
use informer::{Change, Informer, key_of};
pub use metrics::Metrics;
use naming::Translator;
use policy::Policy;
use queue::{Worker, queue};
use refs::RefKind;

pub const FIELD_MANAGER: &str = "vkube-syncer";

/// Everything the syncer is told at start.
pub struct Config {
    pub translator: Translator,
    pub policy: Policy,
    pub options: Options,
    pub virt: Client,
    pub host: Client,
    pub coredns_image: String,
    /// Registered by the caller (`Metrics::register`) before its registry is served.
    pub metrics: Metrics,
}

/// How often every object is looked at again, whatever the watches said (drift repair).
const RESYNC: Duration = Duration::from_secs(600);

/// Runs the syncer until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) {
    let metrics = cfg.metrics.clone();
    let host_ns = cfg.translator.host_namespace().to_string();
    let owned = watcher::Config::default().labels(&cfg.translator.cluster_selector()).any_semantic();
    let all = watcher::Config::default().any_semantic();
    let (virt, host) = (cfg.virt.clone(), cfg.host.clone());

    let vpods = Informer::new("virtual pods", Api::<Pod>::all(virt.clone()), all.clone());
    let hpods = Informer::new("host pods", Api::<Pod>::namespaced(host.clone(), &host_ns), owned.clone())
        .slimmed(pods::slim_host_pod);
    let vservices = Informer::new("virtual services", Api::<Service>::all(virt.clone()), all.clone());
    let hservices = Informer::new("host services", Api::<Service>::namespaced(host.clone(), &host_ns), owned.clone());
    let vconfigmaps = Informer::new("virtual configmaps", Api::<ConfigMap>::all(virt.clone()), all.clone());
    let hconfigmaps =
        Informer::new("host configmaps", Api::<ConfigMap>::namespaced(host.clone(), &host_ns), owned.clone());
    let vsecrets = Informer::new("virtual secrets", Api::<Secret>::all(virt.clone()), all.clone());
    // Token Secrets (one per pod) are not watched: see `tokens`.
    let copies = watcher::Config::default()
        .labels(&format!("{},!{}", cfg.translator.cluster_selector(), naming::LABEL_TOKEN))
        .any_semantic();
    let hsecrets = Informer::new("host secrets", Api::<Secret>::namespaced(host.clone(), &host_ns), copies);
    let vendpoints = Informer::new("virtual endpoints", Api::<Endpoints>::all(virt.clone()), all.clone());
    let hendpoints =
        Informer::new("host endpoints", Api::<Endpoints>::namespaced(host.clone(), &host_ns), owned.clone());
    let vslices = Informer::new("virtual endpointslices", Api::<EndpointSlice>::all(virt.clone()), all.clone());
    let hslices =
        Informer::new("host endpointslices", Api::<EndpointSlice>::namespaced(host.clone(), &host_ns), owned.clone());
    let vpvcs = Informer::new("virtual claims", Api::<PersistentVolumeClaim>::all(virt.clone()), all.clone());
    let hpvcs =
        Informer::new("host claims", Api::<PersistentVolumeClaim>::namespaced(host.clone(), &host_ns), owned.clone());
    let vnodes = Informer::new("virtual nodes", Api::<Node>::all(virt.clone()), all.clone().labels(nodes::LABEL_FAKE));
    let hevents = Informer::new("host events", Api::<Event>::namespaced(host.clone(), &host_ns), all.clone());
    let vnamespaces = Informer::new("virtual namespaces", Api::<Namespace>::all(virt.clone()), all.clone());
    let vnetpols = Informer::new("virtual networkpolicies", Api::<NetworkPolicy>::all(virt.clone()), all.clone());
    let hnetpols =
        Informer::new("host networkpolicies", Api::<NetworkPolicy>::namespaced(host.clone(), &host_ns), owned.clone());

    let (pods_q, pods_w) = queue::<Key>("Pod", metrics.clone());
    let (services_q, services_w) = queue::<Key>("Service", metrics.clone());
    let (configmaps_q, configmaps_w) = queue::<Key>("ConfigMap", metrics.clone());
    let (secrets_q, secrets_w) = queue::<Key>("Secret", metrics.clone());
    let (endpoints_q, endpoints_w) = queue::<Key>("Endpoints", metrics.clone());
    let (slices_q, slices_w) = queue::<Key>("EndpointSlice", metrics.clone());
    let (pvcs_q, pvcs_w) = queue::<Key>("PersistentVolumeClaim", metrics.clone());
    let (netpols_q, netpols_w) = queue::<Key>("NetworkPolicy", metrics.clone());
    let (tokens_q, tokens_w) = queue::<String>("ServiceAccountToken", metrics.clone());
    let (nodes_q, nodes_w) = queue::<String>("Node", metrics.clone());
    let (events_q, events_w) = queue::<String>("Event", metrics.clone());

    let ctx = Arc::new(Context {
        tr: cfg.translator,
        policy: cfg.policy,
        opts: cfg.options,
        virt: virt.clone(),
        host,
        stores: Stores {
            vpods: vpods.store(),
            hpods: hpods.store(),
            vservices: vservices.store(),
            hservices: hservices.store(),
            vconfigmaps: vconfigmaps.store(),
            hconfigmaps: hconfigmaps.store(),
            vsecrets: vsecrets.store(),
            hsecrets: hsecrets.store(),
            vendpoints: vendpoints.store(),
            hendpoints: hendpoints.store(),
            vendpointslices: vslices.store(),
            hendpointslices: hslices.store(),
            vpvcs: vpvcs.store(),
            hpvcs: hpvcs.store(),
            vnodes: vnodes.store(),
            hevents: hevents.store(),
            vnamespaces: vnamespaces.store(),
            vnetworkpolicies: vnetpols.store(),
            hnetworkpolicies: hnetpols.store(),
        },
        refs: Default::default(),
        queues: Queues {
            pods: pods_q,
            services: services_q,
            configmaps: configmaps_q,
            secrets: secrets_q,
            endpoints: endpoints_q,
            endpointslices: slices_q,
            pvcs: pvcs_q,
            networkpolicies: netpols_q,
            tokens: tokens_q,
            nodes: nodes_q,
            events: events_q,
        },
        recorder: Recorder::new(virt.clone(), Reporter { controller: "vkube-syncer".into(), instance: None }),
        dns_ip: Default::default(),
        events_mark: Default::default(),
        metrics,
    });

    let mut vpods = vpods;
    let c = ctx.clone();
    vpods.on_change(move |p, change| {
        let (ns, name) = key_of(p);
        let changed = match change {
            Change::Deleted => {
                // Its token Secrets go with it.
                for (secret, _) in pods::translate::token_secrets(&c.tr, p) {
                    c.queues.tokens.add(secret);
                }
                c.refs.remove(&ns, &name)
            }
            Change::Applied | Change::Listed => c.refs.update(&ns, &name, refs::pod_refs(p)),
        };
        for (kind, tns, tname) in changed {
            match kind {
                RefKind::ConfigMap => c.queues.configmaps.add((tns, tname)),
                RefKind::Secret => c.queues.secrets.add((tns, tname)),
                RefKind::PersistentVolumeClaim => c.queues.pvcs.add((tns, tname)),
                RefKind::Node => c.queues.nodes.add(tname),
            }
        }
        c.queues.pods.add((ns, name));
    });
    let mut vservices = vservices;
    let c = ctx.clone();
    vservices.on_change(move |s, _| {
        c.queues.services.add(key_of(s));
        c.queues.endpoints.add(key_of(s));
        // A selector added or removed changes which of its slices are the tenant's.
        let (ns, name) = key_of(s);
        for slice in c.stores.vendpointslices.state() {
            let of_service =
                slice.metadata.labels.as_ref().and_then(|l| l.get(endpointslices::LABEL_SERVICE_NAME)) == Some(&name);
            if of_service && slice.metadata.namespace.as_deref() == Some(ns.as_str()) {
                c.queues.endpointslices.add(key_of(slice.as_ref()));
            }
        }
    });
    let mut vconfigmaps = vconfigmaps;
    let c = ctx.clone();
    vconfigmaps.on_change(move |o, _| c.queues.configmaps.add(key_of(o)));
    let mut vsecrets = vsecrets;
    let c = ctx.clone();
    vsecrets.on_change(move |o, _| c.queues.secrets.add(key_of(o)));
    let mut vendpoints = vendpoints;
    let c = ctx.clone();
    vendpoints.on_change(move |o, _| c.queues.endpoints.add(key_of(o)));
    let mut vslices = vslices;
    let c = ctx.clone();
    vslices.on_change(move |o, _| c.queues.endpointslices.add(key_of(o)));
    let mut hslices = hslices;
    hslices.on_change(owner_handler(&ctx));
    let mut vpvcs = vpvcs;
    let c = ctx.clone();
    vpvcs.on_change(move |o, _| c.queues.pvcs.add(key_of(o)));
    let mut vnodes = vnodes;
    let c = ctx.clone();
    vnodes.on_change(move |o, _| c.queues.nodes.add(key_of(o).1));
    let mut hevents = hevents;
    let c = ctx.clone();
    hevents.on_change(move |o, change| {
        // A relist brings every event the host still keeps; those already mirrored (up to the
        // recorded mark) would cost two requests each for nothing.
        if change == Change::Applied || (change == Change::Listed && events::after_mark(&c, o)) {
            c.queues.events.add(key_of(o).1);
        }
    });

    let mut hpods = hpods;
    hpods.on_change(owner_handler(&ctx));
    let mut hservices = hservices;
    hservices.on_change(owner_handler(&ctx));
    let mut hconfigmaps = hconfigmaps;
    hconfigmaps.on_change(owner_handler(&ctx));
    let mut hsecrets = hsecrets;
    hsecrets.on_change(owner_handler(&ctx));
    let mut hendpoints = hendpoints;
    hendpoints.on_change(owner_handler(&ctx));
    let mut hpvcs = hpvcs;
    hpvcs.on_change(owner_handler(&ctx));
    let mut vnetpols = vnetpols;
    let c = ctx.clone();
    vnetpols.on_change(move |o, _| c.queues.networkpolicies.add(key_of(o)));
    let mut hnetpols = hnetpols;
    hnetpols.on_change(owner_handler(&ctx));
    let mut vnamespaces = vnamespaces;
    let c = ctx.clone();
    vnamespaces.on_change(move |_, _| {
        // Namespace labels decide what namespace selectors in policies match.
        if c.opts.sync_network_policies {
            c.stores.vnetworkpolicies.state().iter().for_each(|p| c.queues.networkpolicies.add(key_of(p.as_ref())));
        }
    });

    events::load_mark(&ctx).await;
    let stores_ready = {
        let s = &ctx.stores;
        let waits = (
            s.vpods.wait_until_ready(),
            s.hpods.wait_until_ready(),
            s.vservices.wait_until_ready(),
            s.hservices.wait_until_ready(),
            s.vconfigmaps.wait_until_ready(),
            s.hconfigmaps.wait_until_ready(),
            s.vsecrets.wait_until_ready(),
            s.hsecrets.wait_until_ready(),
        );
        let more = (
            s.vendpoints.wait_until_ready(),
            s.hendpoints.wait_until_ready(),
            s.vendpointslices.wait_until_ready(),
            s.hendpointslices.wait_until_ready(),
            s.vpvcs.wait_until_ready(),
            s.hpvcs.wait_until_ready(),
            s.vnodes.wait_until_ready(),
            s.hevents.wait_until_ready(),
        );
        let policies = (
            s.vnamespaces.wait_until_ready(),
            s.vnetworkpolicies.wait_until_ready(),
            s.hnetworkpolicies.wait_until_ready(),
        );
        async move {
            let _ = futures::join!(waits.0, waits.1, waits.2, waits.3, waits.4, waits.5, waits.6, waits.7);
            let _ = futures::join!(more.0, more.1, more.2, more.3, more.4, more.5, more.6, more.7);
            let _ = futures::join!(policies.0, policies.1, policies.2);
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(vpods.run());
    tasks.spawn(hpods.run());
    tasks.spawn(vservices.run());
    tasks.spawn(hservices.run());
    tasks.spawn(vconfigmaps.run());
    tasks.spawn(hconfigmaps.run());
    tasks.spawn(vsecrets.run());
    tasks.spawn(hsecrets.run());
    tasks.spawn(vendpoints.run());
    tasks.spawn(hendpoints.run());
    tasks.spawn(vslices.run());
    tasks.spawn(hslices.run());
    tasks.spawn(vpvcs.run());
    tasks.spawn(hpvcs.run());
    tasks.spawn(vnodes.run());
    tasks.spawn(hevents.run());
    tasks.spawn(vnamespaces.run());
    tasks.spawn(vnetpols.run());
    tasks.spawn(hnetpols.run());

    let coredns_image = cfg.coredns_image;
    let c = ctx.clone();
    let started = std::time::Instant::now();
    let main =
        async move {
            stores_ready.await;
            tracing::info!(pods = c.stores.vpods.len(), host_pods = c.stores.hpods.len(), "caches ready; syncing");
            let n = c.opts.concurrency;
            let mut workers = tokio::task::JoinSet::new();
            spawn_worker(&mut workers, pods_w, n, c.clone(), |c, k| async move { pods::reconcile(&c, k).await });
            spawn_worker(
                &mut workers,
                services_w,
                n,
                c.clone(),
                |c, k| async move { services::reconcile(&c, k).await },
            );
            spawn_worker(&mut workers, configmaps_w, n, c.clone(), |c, k| async move {
                mirror::reconcile::<ConfigMap>(&c, k).await
            });
            spawn_worker(&mut workers, secrets_w, n, c.clone(), |c, k| async move {
                mirror::reconcile::<Secret>(&c, k).await
            });
            spawn_worker(&mut workers, endpoints_w, n, c.clone(), |c, k| async move {
                mirror::reconcile::<Endpoints>(&c, k).await
            });
            spawn_worker(&mut workers, slices_w, n, c.clone(), |c, k| async move {
                mirror::reconcile::<EndpointSlice>(&c, k).await
            });
            spawn_worker(&mut workers, pvcs_w, n, c.clone(), |c, k| async move {
                mirror::reconcile::<PersistentVolumeClaim>(&c, k).await
            });
            spawn_worker(&mut workers, netpols_w, n, c.clone(), |c, k| async move {
                networkpolicies::reconcile(&c, k).await
            });
            spawn_worker(&mut workers, tokens_w, n, c.clone(), |c, k| async move { tokens::reconcile(&c, k).await });
            spawn_worker(&mut workers, nodes_w, n, c.clone(), |c, k| async move { nodes::reconcile(&c, k).await });
            // Events matter less than workloads: a few at a time, so a burst's events do not hold up
            // its pods.
            spawn_worker(&mut workers, events_w, 2, c.clone(), |c, k| async move { events::reconcile(&c, k).await });
            c.queues.services.add(("default".into(), "kubernetes".into()));
            let marker = c.clone();
            workers.spawn(async move { events::keep_mark(&marker, Duration::from_secs(5)).await });
            while let Err(e) = dns::ensure(&c.virt, &coredns_image, &c.opts.cluster_domain).await {
                tracing::warn!(error = %e, "installing CoreDNS in the virtual cluster failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            while !c.queues.all_idle() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let took = started.elapsed().as_secs_f64();
            c.metrics.initial_sync_seconds.set(took);
            tracing::info!(seconds = took, pods = c.stores.vpods.len(), "initial sync done");
            // Token Secrets orphaned while we were down.
            tokens::sweep(&c).await;
            let mut tick = tokio::time::interval(RESYNC);
            tick.tick().await;
            loop {
                tick.tick().await;
                resync(&c);
                tokens::sweep(&c).await;
            }
        };
    tokio::select! {
        _ = main => {}
        _ = shutdown => {}
    }
    tasks.abort_all();
}

fn spawn_worker<K, F, Fut>(set: &mut tokio::task::JoinSet<()>, w: Worker<K>, n: usize, ctx: Arc<Context>, f: F)
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + std::fmt::Debug + 'static,
    F: Fn(Arc<Context>, K) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = sync::Result<queue::Action>> + Send + 'static,
{
    set.spawn(async move { w.run(n, move |k| f(ctx.clone(), k)).await });
}

/// Queues the virtual object a host object of ours mirrors.
fn owner_handler<K: Resource + DeserializeOwned>(ctx: &Arc<Context>) -> impl Fn(&K, Change) + Send + Sync + 'static {
    let c = ctx.clone();
    move |o: &K, _| enqueue_owner(&c, o.meta())
}

fn enqueue_owner(c: &Context, meta: &kube::api::ObjectMeta) {
    let Some(o) = c.tr.owner(meta) else { return };
    let key = (o.namespace, o.name);
    let q = &c.queues;
    match o.kind.as_str() {
        pods::KIND => q.pods.add(key),
        services::KIND => q.services.add(key),
        "ConfigMap" => q.configmaps.add(key),
        "Secret" => q.secrets.add(key),
        "Endpoints" => q.endpoints.add(key),
        "EndpointSlice" => q.endpointslices.add(key),
        "PersistentVolumeClaim" => q.pvcs.add(key),
        networkpolicies::KIND => q.networkpolicies.add(key),
        _ => {}
    }
}

/// Every object looked at again.
fn resync(c: &Context) {
    let s = &c.stores;
    s.vpods.state().iter().for_each(|o| c.queues.pods.add(key_of(o.as_ref())));
    s.vservices.state().iter().for_each(|o| c.queues.services.add(key_of(o.as_ref())));
    s.vconfigmaps.state().iter().for_each(|o| c.queues.configmaps.add(key_of(o.as_ref())));
    s.vsecrets.state().iter().for_each(|o| c.queues.secrets.add(key_of(o.as_ref())));
    s.vendpoints.state().iter().for_each(|o| c.queues.endpoints.add(key_of(o.as_ref())));
    s.vendpointslices.state().iter().for_each(|o| c.queues.endpointslices.add(key_of(o.as_ref())));
    s.vpvcs.state().iter().for_each(|o| c.queues.pvcs.add(key_of(o.as_ref())));
    s.vnodes.state().iter().for_each(|o| c.queues.nodes.add(key_of(o.as_ref()).1));
    s.vnetworkpolicies.state().iter().for_each(|o| c.queues.networkpolicies.add(key_of(o.as_ref())));
    s.hnetworkpolicies.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hpods.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hservices.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hconfigmaps.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hsecrets.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hendpoints.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hendpointslices.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
    s.hpvcs.state().iter().for_each(|o| enqueue_owner(c, &o.metadata));
}
