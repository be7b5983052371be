//! Prometheus metrics of the syncer.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub kind: &'static str,
    /// create | update | delete | status | bind
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub kind: &'static str,
    /// quota | webhook | forbidden | invalid
    pub reason: &'static str,
}

/// A short, bounded name for an error, for the `error` label.
pub trait ErrorLabel {
    fn label(&self) -> &'static str;
}

fn buckets() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

#[derive(Clone)]
pub struct Metrics {
    /// Writes made to keep host (and virtual) objects in sync.
    pub synced: Family<OperationLabels, Counter>,
    /// From a key being queued to its reconcile finishing.
    pub sync_latency: Family<KindLabel, Histogram>,
    pub reconcile_duration: Family<KindLabel, Histogram>,
    pub errors: Family<ErrorLabels, Counter>,
    pub queue_depth: Family<KindLabel, Gauge>,
    /// Objects kept off the host by the isolation policy.
    pub refused: Family<KindLabel, Counter>,
    /// Host objects that hit the per-object write cap (once per object and minute).
    pub write_capped: Family<KindLabel, Counter>,
    /// Host copies the host itself refused to create (its quota, limit ranges, webhooks).
    pub host_refused: Family<RefusalLabels, Counter>,
    /// From start to the first moment every queue was empty with caches ready (the initial
    /// sync, or the resync after a restart); 0 until then.
    pub initial_sync_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            synced: Family::default(),
            sync_latency: Family::new_with_constructor(buckets),
            reconcile_duration: Family::new_with_constructor(buckets),
            errors: Family::default(),
            queue_depth: Family::default(),
            refused: Family::default(),
            host_refused: Family::default(),
            write_capped: Family::default(),
            initial_sync_seconds: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("vkube_syncer");
        r.register("synced", "Writes made to keep objects in sync, by kind and operation", m.synced.clone());
        r.register(
            "sync_latency_seconds",
            "From a change being noticed to its sync finishing, by kind",
            m.sync_latency.clone(),
        );
        r.register("reconcile_duration_seconds", "Duration of one reconcile, by kind", m.reconcile_duration.clone());
        r.register("errors", "Failed reconciles, by kind and error", m.errors.clone());
        r.register("queue_depth", "Keys waiting to be reconciled, by kind", m.queue_depth.clone());
        r.register("refused", "Objects kept off the host by the isolation policy, by kind", m.refused.clone());
        r.register(
            "write_capped",
            "Host objects written as often as a minute allows, by kind (a write loop, or a tenant fighting itself)",
            m.write_capped.clone(),
        );
        r.register(
            "host_refused",
            "Host copies the host refused to create, by kind and reason (quota, webhook, forbidden, invalid)",
            m.host_refused.clone(),
        );
        r.register(
            "initial_sync_seconds",
            "From start until caches were ready and every queue first drained (0 until then)",
            m.initial_sync_seconds.clone(),
        );
        m
    }

    pub fn wrote(&self, kind: &'static str, operation: &'static str) {
        self.synced.get_or_create(&OperationLabels { kind, operation }).inc();
    }
}
