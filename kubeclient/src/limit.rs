//! A token bucket on one client's writes (create, update, patch, delete): a tenant creating
//! 10,000 objects slows itself, not the host API server it shares with others. Reads and
//! watches are not limited (informers hold one long request each; lists happen at start).

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Method, Request};
use kube::client::Body;
use tower::buffer::Buffer;

/// Writes per second, and how many may go at once after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRate {
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The tower layer limiting a client's writes to `rate`.
#[derive(Clone)]
pub struct WriteLimit {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl WriteLimit {
    pub fn new(rate: WriteRate) -> Self {
        WriteLimit { limiter: Arc::new(RateLimiter::direct(Quota::per_second(rate.qps).allow_burst(rate.burst))) }
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
        Limited { inner: Buffer::new(inner, 1024), limiter: self.limiter.clone() }
    }
}

#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
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
        if !is_write(req.method()) {
            return Box::pin(inner.call(req));
        }
        let limiter = self.limiter.clone();
        Box::pin(async move {
            limiter.until_ready().await;
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
        let svc = WriteLimit::new(rate).layer(tower::service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(()) }));
        let req = |m: Method| Request::builder().method(m).uri("/").body(Body::empty()).unwrap();

        let started = Instant::now();
        for _ in 0..100 {
            svc.clone().oneshot(req(Method::GET)).await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_millis(100), "reads are not limited");

        let started = Instant::now();
        for _ in 0..15 {
            svc.clone().oneshot(req(Method::POST)).await.unwrap();
        }
        // 5 at once, then 10 more at 20/s: about half a second.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(2), "{took:?}");
    }
}
