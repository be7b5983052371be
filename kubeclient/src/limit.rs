//! A token bucket on one client's writes (create, update, patch, delete): a tenant creating
//! 10,000 objects slows itself, not the host API server it shares with others. Reads and
//! watches are not limited (informers hold one long request each; lists happen at start).
//! The same layer counts every request this cluster sends to the host, and the time its writes
//! waited for a token: what one tenant costs the host API server, on `/metrics`.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Method, Request};
use kube::client::Body;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::buffer::Buffer;

/// Writes per second, and how many may go at once after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRate {
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// read (get, list, watch) | write (create, update, patch, delete)
    kind: &'static str,
}

/// The tower layer limiting a client's writes to `rate`; clients made with one share its bucket
/// and its counters.
#[derive(Clone)]
pub struct WriteLimit {
    limiter: Arc<DefaultDirectRateLimiter>,
    requests: Family<RequestLabels, Counter>,
    /// Seconds writes spent waiting for a token.
    waited: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl WriteLimit {
    pub fn new(rate: WriteRate) -> Self {
        WriteLimit {
            limiter: Arc::new(RateLimiter::direct(Quota::per_second(rate.qps).allow_burst(rate.burst))),
            requests: Family::default(),
            waited: Counter::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vkube_host_requests",
            "Requests this cluster sent to the host API server (syncer and proxy), reads and writes",
            self.requests.clone(),
        );
        registry.register(
            "vkube_host_write_wait_seconds",
            "Time host writes spent waiting for the cluster's write bucket (--host-qps, --host-burst)",
            self.waited.clone(),
        );
    }
}

impl<S> tower::Layer<S> for WriteLimit
where
    S: tower::Service<Request<Body>> + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<tower::BoxError> + Send + Sync,
{
    /// Behind a buffer: a write waiting for its token owns a handle on the client, not the
    /// client (kube's stack cannot be cloned).
    type Service = Limited<Buffer<Request<Body>, S::Future>>;
    fn layer(&self, inner: S) -> Self::Service {
        Limited { inner: Buffer::new(inner, 1024), limit: self.clone() }
    }
}

#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limit: WriteLimit,
}

fn is_write(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

impl<S, B> tower::Service<Request<B>> for Limited<S>
where
    S: tower::Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service that was polled ready goes with this call; a fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let write = is_write(req.method());
        self.limit.requests.get_or_create(&RequestLabels { kind: if write { "write" } else { "read" } }).inc();
        if !write {
            return Box::pin(inner.call(req));
        }
        let limit = self.limit.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            limit.limiter.until_ready().await;
            limit.waited.inc_by(started.elapsed().as_secs_f64());
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::{Duration, Instant};
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn writes_wait_for_tokens_and_reads_do_not() {
        let rate = WriteRate { qps: NonZeroU32::new(20).unwrap(), burst: NonZeroU32::new(5).unwrap() };
        let limit = WriteLimit::new(rate);
        let svc = limit.layer(tower::service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(()) }));
        let req = |m: Method| Request::builder().method(m).uri("/").body(Body::empty()).unwrap();

        let started = Instant::now();
        for _ in 0..100 {
            svc.clone().oneshot(req(Method::GET)).await.unwrap();
        }
        // Limited, they would take 4.75 s; a loaded machine may take some of a second anyway.
        assert!(started.elapsed() < Duration::from_secs(1), "reads are not limited");

        let started = Instant::now();
        for _ in 0..15 {
            svc.clone().oneshot(req(Method::POST)).await.unwrap();
        }
        // 5 at once, then 10 more at 20/s: about half a second.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(2), "{took:?}");

        let mut registry = Registry::default();
        limit.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("vkube_host_requests_total{kind=\"read\"} 100"), "{text}");
        assert!(text.contains("vkube_host_requests_total{kind=\"write\"} 15"), "{text}");
        let waited: f64 = text
            .lines()
            .find(|l| l.starts_with("vkube_host_write_wait_seconds_total"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((0.4..2.0).contains(&waited), "10 writes one after another waited about 50 ms each: {waited}");
    }
}
