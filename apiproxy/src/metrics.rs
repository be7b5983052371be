//! Prometheus metrics of the proxy.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// forward | host_pod | create_service | patch_service | health | refused (proxy subresources) | invalid (path)
    pub route: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `ProxyError::kind`: unauthorized | forbidden | bad_request | not_found | too_large | already_exists |
    /// invalid | unavailable | upstream
    pub kind: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers (streams and upgrades continue after).
    pub duration: Family<RouteLabels, Histogram>,
    /// Also counted as `errors{kind="unauthorized"}`; kept for the dashboards and tests that read it.
    pub unauthorized: Counter,
    /// Errors the proxy answered itself (answers relayed from an API server are not counted).
    pub errors: Family<ErrorLabels, Counter>,
    pub auth: crate::auth::AuthMetrics,
    /// Connections dropped by the proxy's own limits, by reason.
    pub dropped_connections: Family<DropLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// tls_handshake_timeout | first_request_timeout | per_address_limit
    pub reason: &'static str,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
            }),
            unauthorized: Counter::default(),
            errors: Family::default(),
            auth: Default::default(),
            dropped_connections: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("vkube_proxy");
        sub.register("requests", "Requests answered, by route and HTTP status", m.requests.clone());
        sub.register("request_duration_seconds", "Time to response headers, by route", m.duration.clone());
        sub.register("unauthorized", "Requests refused with 401", m.unauthorized.clone());
        sub.register("errors", "Errors the proxy answered itself, by kind", m.errors.clone());
        sub.register("token_reviews", "TokenReviews sent to the virtual API server, by result", m.auth.reviews.clone());
        sub.register(
            "token_reviews_limited",
            "Unknown bearer tokens refused without a TokenReview (rate limit)",
            m.auth.limited.clone(),
        );
        sub.register(
            "dropped_connections",
            "Connections dropped by the proxy's timeouts, by reason",
            m.dropped_connections.clone(),
        );
        m
    }
}
