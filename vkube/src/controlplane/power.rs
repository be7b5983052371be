//! Sleep mode in `vkube run --supervise`: the cluster goes to sleep after `--sleep-after` without
//! activity, in a `--sleep-schedule` window, or on `vkube sleep`; asleep, its host pods are gone
//! and etcd and kube-control-plane (API server and controller manager) are stopped, while it keeps
//! serving the proxy's port. A request that counts as activity (or `vkube wake`) wakes it: the
//! components start, the request is held until the virtual API server answers, and the syncer
//! recreates the host pods. The state, the last activity and the CLI's requests live as
//! annotations on the control plane's host Service, so a restart comes back as it was.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use vkube_apiproxy::sleep::{Power, SleepControl};
use vkube_core::contract::{
    ANNOTATION_LAST_ACTIVITY, ANNOTATION_LAST_ACTIVITY_BY, ANNOTATION_PODS_REMOVED, ANNOTATION_POWER,
    ANNOTATION_POWER_REQUEST, ANNOTATION_POWER_SINCE,
};

use super::schedule::Schedule;
use super::supervisor::{Child, Supervisor};
use super::{etcd, ingress_wake};
use crate::names;

/// `vkube run`'s sleep-mode flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SleepArgs {
    /// Put the cluster to sleep after this long without activity (e.g. 30m). Off when unset.
    /// Needs --supervise.
    #[arg(long, env = "VKUBE_SLEEP_AFTER", value_parser = super::parse_duration)]
    pub sleep_after: Option<Duration>,
    /// Put the cluster to sleep when a window starts: `DAYS HH:MM-HH:MM [ZONE]`, e.g.
    /// "Mon-Fri 19:00-08:00 Europe/Berlin". A request still wakes it. Needs --supervise.
    #[arg(long, env = "VKUBE_SLEEP_SCHEDULE")]
    pub sleep_schedule: Option<Schedule>,
    /// Users whose requests count as activity although they are service accounts or `system:`
    /// users (comma-separated; e.g. an in-cluster CI runner).
    #[arg(long, env = "VKUBE_SLEEP_COUNTED_USERS", value_delimiter = ',')]
    pub sleep_counted_users: Vec<String>,
    /// How long a request that wakes the cluster is held before it gets 503 (Retry-After).
    #[arg(long, env = "VKUBE_WAKE_TIMEOUT", default_value = "60s", value_parser = super::parse_duration)]
    pub wake_timeout: Duration,
    /// Where ingress traffic reaches a sleeping cluster (plain HTTP, the control plane Service's
    /// `wake` port): asleep, its host Ingresses point here and a request for one of their host
    /// names wakes it. Off when unset, and where no ingress class is allowed.
    #[arg(long, env = "VKUBE_WAKE_LISTEN")]
    pub wake_listen: Option<std::net::SocketAddr>,
    /// The host ingress controller's Prometheus metrics (traefik's kubernetesIngress provider or
    /// ingress-nginx; plain HTTP), read every few seconds while the cluster is awake: requests
    /// through its host Ingresses count as activity, so a web app in use does not go to sleep.
    /// Every address the host name has is read (a headless Service: each replica). Off when
    /// unset, and where no ingress class is allowed.
    #[arg(long, env = "VKUBE_INGRESS_METRICS", value_parser = super::ingress_activity::parse_url)]
    pub ingress_metrics: Option<http::Uri>,
}

/// What sleep mode tells Prometheus.
#[derive(Clone)]
pub struct PowerMetrics {
    sleeps: Counter,
    wake_seconds: Histogram,
    asleep: Gauge,
}

impl PowerMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = PowerMetrics {
            sleeps: Counter::default(),
            wake_seconds: Histogram::new([0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0]),
            asleep: Gauge::default(),
        };
        registry.register("vkube_sleeps", "Times the virtual cluster went to sleep", m.sleeps.clone());
        registry.register(
            "vkube_wake_seconds",
            "From the decision to wake to the virtual API server answering",
            m.wake_seconds.clone(),
        );
        registry.register("vkube_asleep", "1 while the virtual cluster sleeps", m.asleep.clone());
        m
    }
}

/// What vkube's operations (`vkube snapshot`, `restore`, `reset`, served through the proxy) ask
/// of the controller, which alone starts and stops the components.
pub enum Op {
    /// etcd's snapshot into this file; a sleeping cluster's etcd runs alone for it, its
    /// workloads stay asleep.
    Snapshot { to: PathBuf, reply: oneshot::Sender<anyhow::Result<etcd::Saved>> },
    /// etcd's data made from this snapshot (`None`: emptied, a reset) with the syncer and the
    /// components stopped; a running cluster then starts again and the syncer makes the host
    /// match (lost host pods recreated, host copies of objects that are gone removed).
    /// `work` holds `db` (its directory goes when the op is done, not when the client leaves).
    Restore { db: Option<PathBuf>, work: Option<tempfile::TempDir>, reply: oneshot::Sender<anyhow::Result<()>> },
}

/// Starts and stops the syncer (on its own runtime thread); `recreate` on wake.
pub trait SyncerRunner: Send {
    fn start(&mut self, recreate_lost_pods: bool) -> anyhow::Result<()>;
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}

pub struct PowerController<S: SyncerRunner> {
    pub host: kube::Client,
    pub admin: kube::Client,
    pub name: String,
    pub namespace: String,
    pub ctl: SleepControl,
    pub supervisor: Supervisor,
    pub children: (Child, Child),
    pub syncer: S,
    pub args: SleepArgs,
    pub metrics: PowerMetrics,
    /// The syncer's health: its initial sync done, host pods a sleep removed are all back.
    pub syncer_health: vkube_syncer::health::Health,
    /// The loopback ports the components listen on, with what listens there.
    pub ports: Vec<(u16, &'static str)>,
    /// Host pods were removed by a sleep and are not all back yet (`ANNOTATION_PODS_REMOVED`).
    pub pods_removed: bool,
    pub etcd: etcd::EtcdData,
    pub ops: mpsc::Receiver<Op>,
    /// With `--wake-listen`: the host names its wake listener answers for, set when the host
    /// Ingresses are pointed at it.
    pub sleeping_hosts: Option<ingress_wake::SleepingHosts>,
    /// When to point the host Ingresses at the wake listener again (the last try failed).
    pub redirect_retry: Option<Instant>,
}

/// What a previous control plane left on the host Service.
pub struct Persisted {
    pub power: Power,
    /// It died going to sleep (`GoingToSleep`).
    pub half_asleep: bool,
    pub pods_removed: bool,
}

/// How often the idle time and the schedule are checked, and the activity persisted if it changed.
const TICK: Duration = Duration::from_secs(1);
const PERSIST_EVERY: Duration = Duration::from_secs(10);
const REDIRECT_RETRY: Duration = Duration::from_secs(10);

impl<S: SyncerRunner> PowerController<S> {
    /// What the last control plane left: asleep or not (and whether it had finished going to
    /// sleep), whether host pods it removed are still to be recreated, and the last activity
    /// (restored).
    pub async fn persisted(&self) -> anyhow::Result<Persisted> {
        let svc = self.services().get_opt(&names::service(&self.name)).await.with_context(|| {
            format!("reading the sleep state on the host Service {}/{}", self.namespace, names::service(&self.name))
        })?;
        let annotations = svc.map(|s| s.metadata.annotations.unwrap_or_default()).unwrap_or_default();
        if let (Some(at), Some(by)) =
            (annotations.get(ANNOTATION_LAST_ACTIVITY), annotations.get(ANNOTATION_LAST_ACTIVITY_BY))
            && let Ok(t) = at.parse::<jiff::Timestamp>()
        {
            self.ctl.activity.restore(SystemTime::from(t), by.clone());
        }
        let power = annotations.get(ANNOTATION_POWER).map(String::as_str);
        Ok(Persisted {
            power: if matches!(power, Some("Sleeping" | "GoingToSleep")) { Power::Sleeping } else { Power::Running },
            half_asleep: power == Some("GoingToSleep"),
            pods_removed: annotations.contains_key(ANNOTATION_PODS_REMOVED),
        })
    }

    /// Brings the cluster to `initial` (what was persisted) and then keeps deciding.
    /// Stops the syncer and the components when `shutdown` says so (the state stays persisted).
    pub async fn run(
        mut self,
        initial: Persisted,
        resuming: bool,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        self.pods_removed = initial.pods_removed;
        match initial.power {
            Power::Sleeping => {
                // It was asleep, or going to sleep when the last process died: finish the job.
                self.ctl.power.send_replace(Power::GoingToSleep);
                self.remove_host_pods().await;
                self.redirect_ingresses().await;
                // What the last process left running (it died while going to sleep or waking).
                self.supervisor.stop_all().await;
                self.ctl.power.send_replace(Power::Sleeping);
                self.metrics.asleep.set(1);
                if initial.half_asleep {
                    self.persist_power("Sleeping").await;
                    self.event("Sleeping", "went to sleep (finished after a restart of the control plane)").await;
                }
                tracing::info!("the virtual cluster sleeps; a request that counts as activity wakes it");
                give_back_code_pages();
            }
            _ => {
                let started = tokio::select! {
                    r = self.start_components() => r.map(Some),
                    _ = shutdown.wait_for(|s| *s) => Ok(None),
                };
                match started {
                    Ok(Some(())) => {}
                    Ok(None) => {
                        self.supervisor.stop_all().await;
                        return Ok(());
                    }
                    Err(e) => {
                        self.supervisor.stop_all().await;
                        return Err(e);
                    }
                }
                if let Some(hosts) = &self.sleeping_hosts {
                    // Woken moments before a restart, the syncer may still hold Ingresses here.
                    match ingress_wake::still_leading_here(&self.host, &self.namespace, &self.name).await {
                        Ok(names) => *hosts.write().unwrap_or_else(|e| e.into_inner()) = names,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not read which host Ingresses lead to the wake listener")
                        }
                    }
                }
                // Host pods a sleep removed are recreated, even if the last wake was cut short.
                if let Err(e) = self.syncer.start(resuming || self.pods_removed) {
                    self.supervisor.stop_all().await;
                    return Err(e);
                }
                self.ctl.power.send_replace(Power::Running);
            }
        }
        let decided = tokio::select! {
            r = self.decide() => r,
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        self.syncer.stop().await;
        self.supervisor.stop_all().await;
        decided
    }

    async fn decide(&mut self) -> anyhow::Result<()> {
        let mut awake_since = Instant::now();
        let mut persisted_activity = self.ctl.activity.last();
        let mut last_persist = Instant::now();
        let mut slept_window = self.args.sleep_schedule.as_ref().and_then(|s| s.window_at(jiff::Timestamp::now()));
        let mut requests = self.requests();
        let mut tick = tokio::time::interval(TICK);
        loop {
            let mut wake_asked = false;
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.ctl.wake.notified() => wake_asked = true,
                Some(op) = self.ops.recv() => {
                    self.operate(op).await?;
                    awake_since = Instant::now();
                    continue;
                }
                Some(request) = requests.next() => {
                    self.clear_request().await;
                    let asleep = *self.ctl.power.borrow() == Power::Sleeping;
                    match request.as_str() {
                        "sleep" if asleep => {}
                        "sleep" => self.sleep("requested with `vkube sleep`").await,
                        "wake" => self.wake("requested with `vkube wake`").await?,
                        other => tracing::warn!(request = other, "unknown power request ignored (expected sleep or wake)"),
                    }
                    awake_since = Instant::now();
                    continue;
                }
            }
            // The window now, whatever the state: a cluster woken inside a window stays awake
            // until the next one starts.
            let window = self.args.sleep_schedule.as_ref().and_then(|s| s.window_at(jiff::Timestamp::now()));
            let new_window = window.is_some() && window != slept_window;
            slept_window = window;
            if self.pods_removed && self.syncer_health.initial_sync_done() {
                self.patch_annotations([(ANNOTATION_PODS_REMOVED, None)]).await;
                self.pods_removed = false;
            }
            let power = *self.ctl.power.borrow();
            if power == Power::Sleeping {
                // Only a request that counts wakes it; the proxy notified `wake`, or nothing did.
                if wake_asked {
                    self.wake("a request that counts as activity").await?;
                    awake_since = Instant::now();
                } else if self.redirect_retry.is_some_and(|at| Instant::now() >= at) {
                    self.redirect_ingresses().await;
                }
                continue;
            }
            let now = SystemTime::now();
            let last = self.ctl.activity.last();
            if last != persisted_activity && last_persist.elapsed() >= PERSIST_EVERY {
                if let Some((at, by)) = &last {
                    self.persist_activity(*at, by).await;
                }
                persisted_activity = last.clone();
                last_persist = Instant::now();
            }
            if new_window && let Some(schedule) = &self.args.sleep_schedule {
                let why = format!("its schedule ({schedule})");
                self.sleep(&why).await;
                continue;
            }
            if let Some(after) = self.args.sleep_after {
                let since_activity = last.and_then(|(at, _)| now.duration_since(at).ok()).unwrap_or(Duration::MAX);
                let idle = since_activity.min(awake_since.elapsed());
                if idle >= after {
                    self.sleep(&format!("no activity for {} s", idle.as_secs())).await;
                }
            }
        }
    }

    async fn operate(&mut self, op: Op) -> anyhow::Result<()> {
        match op {
            Op::Snapshot { to, reply } => {
                let _ = reply.send(self.snapshot(&to).await);
            }
            Op::Restore { db, work, reply } => {
                if reply.is_closed() {
                    return Ok(()); // the client left before its turn: nothing is stopped for it
                }
                let (restored, running) = self.restore(db.as_deref()).await;
                drop(work);
                let what = if db.is_some() { "Restored" } else { "Reset" };
                match &restored {
                    Ok(()) => {
                        self.event(
                            what,
                            &format!(
                                "etcd's data {}",
                                if db.is_some() {
                                    "restored from a snapshot"
                                } else {
                                    "emptied: the cluster is new again"
                                }
                            ),
                        )
                        .await
                    }
                    Err(e) => self.event("RestoreFailed", &format!("{e:#}")).await,
                }
                let _ = reply.send(restored);
                running?;
            }
        }
        Ok(())
    }

    async fn snapshot(&mut self, to: &Path) -> anyhow::Result<etcd::Saved> {
        if *self.ctl.power.borrow() == Power::Running {
            return self.etcd.save(to).await;
        }
        self.ports_free()?;
        self.supervisor.start(self.children.0.clone()).await;
        let saved = match self.etcd.wait_healthy(Duration::from_secs(60)).await {
            Ok(()) => self.etcd.save(to).await,
            Err(e) => Err(e),
        };
        self.supervisor.stop_all().await;
        saved
    }

    /// Replaces etcd's data (the old stays if that fails): (what the client is told, and whether
    /// a running cluster runs again; an error there ends the control plane, which restarts).
    async fn restore(&mut self, db: Option<&Path>) -> (anyhow::Result<()>, anyhow::Result<()>) {
        let running = *self.ctl.power.borrow() == Power::Running;
        // Written first: whatever happens from here, the next syncers recreate the host pods of the
        // restored virtual pods rather than take their absence for a loss.
        self.mark_pods_removed().await;
        if running {
            // Requests that count are held meanwhile, as during a wake.
            self.ctl.power.send_replace(Power::Waking);
            self.syncer.stop().await;
            self.supervisor.stop_all().await;
        }
        let replaced = match db {
            Some(db) => self.etcd.restore(db).await,
            None => self.etcd.reset(),
        };
        if !running {
            return (replaced, Ok(()));
        }
        let again = async {
            self.start_components().await?;
            self.syncer.start(true)?;
            anyhow::Ok(())
        };
        match again.await {
            Ok(()) => {
                self.ctl.power.send_replace(Power::Running);
                (replaced, Ok(()))
            }
            Err(e) => {
                let e = e.context("starting the components again after replacing etcd's data");
                (Err(anyhow::anyhow!("{e:#}")), Err(e))
            }
        }
    }

    /// Host pods must be made for every virtual pod (`ANNOTATION_PODS_REMOVED`), until a syncer
    /// has finished its initial sync: after a sleep, a restore, a fork.
    pub async fn mark_pods_removed(&mut self) {
        self.pods_removed = true;
        self.patch_annotations([(ANNOTATION_PODS_REMOVED, Some(jiff::Timestamp::now().to_string()))]).await;
    }

    async fn start_components(&mut self) -> anyhow::Result<()> {
        let (etcd, control_plane) = self.children.clone();
        let cp = control_plane.name;
        self.supervisor.start(etcd).await;
        // Its controller manager starts once its API server answers (hack/kube-control-plane).
        self.supervisor.start(control_plane).await;
        super::wait_virtual_ready(&self.admin, Duration::from_millis(50)).await.with_context(|| {
            format!(
                "see {} and {} (`vkube logs {} {cp}`)",
                self.supervisor.log_path(cp).display(),
                self.supervisor.log_path(super::components::ETCD).display(),
                self.name
            )
        })
    }

    /// Asleep, its ports are free and any process may take one: waking then must not start a
    /// component that cannot listen (or an API server that would talk to someone else's etcd).
    fn ports_free(&self) -> anyhow::Result<()> {
        for (port, what) in &self.ports {
            if std::net::TcpListener::bind(("127.0.0.1", *port)).is_err() {
                anyhow::bail!(
                    "port {port} ({what}) on 127.0.0.1 is taken by another process (`ss -ltnp 'sport = :{port}'` names it); \
                     the cluster wakes once it is free"
                );
            }
        }
        Ok(())
    }

    /// Host pods removed, syncer and components stopped; the proxy answers for the cluster.
    async fn sleep(&mut self, why: &str) {
        tracing::info!(why, "the virtual cluster goes to sleep");
        self.ctl.power.send_replace(Power::GoingToSleep);
        // Written first: a process that dies from here on comes back asleep and finishes, and
        // the syncers after it recreate the host pods until one has looked at every pod.
        self.pods_removed = true;
        let now = jiff::Timestamp::now().to_string();
        self.patch_annotations([
            (ANNOTATION_POWER, Some("GoingToSleep".into())),
            (ANNOTATION_POWER_SINCE, Some(now.clone())),
            (ANNOTATION_PODS_REMOVED, Some(now)),
        ])
        .await;
        self.syncer.stop().await;
        self.remove_host_pods().await;
        self.redirect_ingresses().await;
        self.supervisor.stop_all().await;
        self.ctl.power.send_replace(Power::Sleeping);
        self.persist_power("Sleeping").await;
        self.metrics.sleeps.inc();
        self.metrics.asleep.set(1);
        self.event("Sleeping", &format!("went to sleep: {why}; its workloads' host pods were removed")).await;
        give_back_code_pages();
    }

    async fn wake(&mut self, why: &str) -> anyhow::Result<()> {
        if *self.ctl.power.borrow() == Power::Running {
            return Ok(());
        }
        let started = Instant::now();
        tracing::info!(why, "the virtual cluster wakes");
        self.ctl.power.send_replace(Power::Waking);
        let components = match self.ports_free() {
            Ok(()) => self.start_components().await,
            Err(e) => Err(e),
        };
        if let Err(e) = components {
            // Back to sleep rather than half awake: the next request tries again.
            tracing::error!(error = %e, "waking failed; the cluster stays asleep");
            self.supervisor.stop_all().await;
            self.ctl.power.send_replace(Power::Sleeping);
            self.event("WakeFailed", &format!("could not wake: {e:#}")).await;
            return Ok(());
        }
        self.syncer.start(true)?;
        self.ctl.power.send_replace(Power::Running);
        self.redirect_retry = None;
        let took = started.elapsed().as_secs_f64();
        self.metrics.wake_seconds.observe(took);
        self.metrics.asleep.set(0);
        tracing::info!(seconds = took, "the virtual cluster is awake");
        self.persist_power("Running").await;
        self.event("Woken", &format!("woke in {took:.1} s: {why}; its host pods are being recreated")).await;
        Ok(())
    }

    async fn remove_host_pods(&self) {
        let removed = super::remove_host_pods(&self.host, &self.namespace, &self.name, None).await;
        if let Err(e) = removed {
            tracing::error!(error = %e, "removing the host pods of a sleeping cluster failed; they keep running until it wakes");
        }
    }

    /// With `--wake-listen`, the host Ingresses lead to it while the cluster sleeps (the syncer
    /// puts their backends back when it wakes). One that could not be pointed there is tried
    /// again while the cluster sleeps (`decide`).
    async fn redirect_ingresses(&mut self) {
        let Some(hosts) = &self.sleeping_hosts else { return };
        let (names, failed) = ingress_wake::redirect(&self.host, &self.namespace, &self.name).await;
        tracing::info!(hosts = ?names, "host Ingresses point at the wake listener while asleep");
        *hosts.write().unwrap_or_else(|e| e.into_inner()) = names;
        self.redirect_retry = failed.map(|e| {
            tracing::warn!(error = %e, "could not point every host Ingress at the wake listener; trying again in 10 s");
            Instant::now() + REDIRECT_RETRY
        });
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.host.clone(), &self.namespace)
    }

    /// Sets (`Some`) or removes (`None`) annotations of the host Service.
    async fn patch_annotations<const N: usize>(&self, annotations: [(&str, Option<String>); N]) {
        let patch = vkube_kubeclient::patch::MetadataPatch::annotations(annotations);
        let svc = names::service(&self.name);
        if let Err(e) =
            self.services().patch(&svc, &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch)).await
        {
            tracing::warn!(error = %e, service = svc, "could not write the sleep state on the host Service");
        }
    }

    async fn persist_power(&self, power: &str) {
        self.patch_annotations([
            (ANNOTATION_POWER, Some(power.to_string())),
            (ANNOTATION_POWER_SINCE, Some(jiff::Timestamp::now().to_string())),
        ])
        .await;
    }

    async fn persist_activity(&self, at: SystemTime, by: &str) {
        let at = jiff::Timestamp::try_from(at).unwrap_or_else(|_| jiff::Timestamp::now());
        self.patch_annotations([
            (ANNOTATION_LAST_ACTIVITY, Some(at.to_string())),
            (ANNOTATION_LAST_ACTIVITY_BY, Some(by.to_string())),
        ])
        .await;
    }

    async fn clear_request(&self) {
        self.patch_annotations([(ANNOTATION_POWER_REQUEST, None)]).await;
    }

    /// `vkube sleep` / `vkube wake`: the request annotation on the host Service, watched by name.
    fn requests(&self) -> futures::stream::BoxStream<'static, String> {
        use kube::runtime::WatchStreamExt;
        let by_name =
            kube::runtime::watcher::Config::default().fields(&format!("metadata.name={}", names::service(&self.name)));
        kube::runtime::watcher(self.services(), by_name)
            .default_backoff()
            .applied_objects()
            .filter_map(|svc| {
                std::future::ready(
                    svc.ok().and_then(|s| s.metadata.annotations.and_then(|mut a| a.remove(ANNOTATION_POWER_REQUEST))),
                )
            })
            .boxed()
    }

    /// A host Event on the control plane's Service (the virtual cluster may be asleep).
    async fn event(&self, reason: &str, note: &str) {
        super::service_event(&self.host, "vkube", &self.namespace, &self.name, "Power", reason, note).await;
    }
}

/// Asleep, the process runs little of its code: the pages it ran while awake leave its resident
/// memory (`code_pages`).
fn give_back_code_pages() {
    match super::code_pages::give_back() {
        Ok(kib) => tracing::info!(mib = kib as f64 / 1024.0, "code pages given back while asleep"),
        Err(e) => {
            tracing::warn!(error = %e, "could not give the code pages back; the sleeping process keeps them resident")
        }
    }
}
