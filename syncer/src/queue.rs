//! A keyed work queue, client-go style: a key is queued at most once, never reconciled by two
//! workers at once (a key queued while it runs is run again right after), failures back off per
//! key. Scheduling and de-duplication are kube-runtime's `scheduler`.
//!
//! Why not kube-runtime's `Controller`: it only calls the reconciler for objects present in its
//! primary store, but a syncer must also act on keys whose virtual object is gone (to delete the
//! host copy) without putting a finalizer on every tenant object.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::scheduler::{ScheduleRequest, scheduler};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics::{KindLabel, Metrics};

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Done,
    RequeueAfter(Duration),
}

/// The sending side: cheap to clone, shared by every event handler.
pub struct Queue<K> {
    tx: mpsc::UnboundedSender<ScheduleRequest<K>>,
    /// Keys waiting (not yet handed to a worker): when first queued, and when due.
    waiting: Arc<Mutex<HashMap<K, (Instant, Instant)>>>,
    /// Reconciles running now.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    kind: &'static str,
    metrics: Metrics,
}

impl<K> Clone for Queue<K> {
    fn clone(&self) -> Self {
        Queue {
            tx: self.tx.clone(),
            waiting: self.waiting.clone(),
            in_flight: self.in_flight.clone(),
            kind: self.kind,
            metrics: self.metrics.clone(),
        }
    }
}

/// The receiving side, consumed by [`Worker::run`].
pub struct Worker<K> {
    rx: mpsc::UnboundedReceiver<ScheduleRequest<K>>,
    queue: Queue<K>,
}

pub fn queue<K: Clone + Eq + Hash>(kind: &'static str, metrics: Metrics) -> (Queue<K>, Worker<K>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Queue { tx, waiting: Arc::default(), in_flight: Arc::default(), kind, metrics };
    (queue.clone(), Worker { rx, queue })
}

impl<K: Clone + Eq + Hash> Queue<K> {
    /// Nothing running and nothing due within a second (slow retries scheduled for later, like
    /// a collision looked at again in five minutes, do not count).
    pub fn is_idle(&self) -> bool {
        let soon = Instant::now() + Duration::from_secs(1);
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
            && !self.waiting.lock().unwrap_or_else(|e| e.into_inner()).values().any(|(_, due)| *due <= soon)
    }

    pub fn add(&self, key: K) {
        self.add_after(key, Duration::ZERO);
    }

    pub fn add_after(&self, key: K, delay: Duration) {
        let due = Instant::now() + delay;
        {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let entry = w.entry(key.clone()).or_insert_with(|| (Instant::now(), due));
            entry.1 = entry.1.min(due);
            self.metrics.queue_depth.get_or_create(&KindLabel { kind: self.kind }).set(w.len() as i64);
        }
        let _ = self.tx.send(ScheduleRequest { message: key, run_at: due });
    }

    /// Takes a key off the waiting set; returns when it was first queued.
    fn popped(&self, key: &K) -> Option<Instant> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let at = w.remove(key).map(|(first, _)| first);
        self.metrics.queue_depth.get_or_create(&KindLabel { kind: self.kind }).set(w.len() as i64);
        at
    }
}

#[derive(Default)]
struct Running<K> {
    running: HashSet<K>,
    dirty: HashSet<K>,
    failures: HashMap<K, u32>,
}

impl<K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static> Worker<K> {
    /// Runs reconciles, `concurrency` at a time, until the queue's senders are all gone.
    pub async fn run<F, Fut, E>(self, concurrency: usize, reconcile: F)
    where
        F: Fn(K) -> Fut,
        Fut: Future<Output = Result<Action, E>>,
        E: std::fmt::Display + crate::metrics::ErrorLabel,
    {
        let Worker { rx, queue } = self;
        let state: Mutex<Running<K>> =
            Mutex::new(Running { running: HashSet::new(), dirty: HashSet::new(), failures: HashMap::new() });
        let kind = queue.kind;
        let labels = KindLabel { kind };
        scheduler(tokio_stream_from(rx))
            .for_each_concurrent(concurrency, |key| {
                let (queue, state, reconcile, labels) = (&queue, &state, &reconcile, &labels);
                async move {
                    queue.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _done = InFlight(&queue.in_flight);
                    let queued_at = queue.popped(&key);
                    {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        if !s.running.insert(key.clone()) {
                            s.dirty.insert(key);
                            return;
                        }
                    }
                    loop {
                        let started = Instant::now();
                        // Every log line of a reconcile names its kind and key.
                        let span = tracing::info_span!("reconcile", kind, key = ?key);
                        let result = reconcile(key.clone()).instrument(span).await;
                        let m = &queue.metrics;
                        m.reconcile_duration.get_or_create(labels).observe(started.elapsed().as_secs_f64());
                        if let Some(at) = queued_at {
                            m.sync_latency.get_or_create(labels).observe(at.elapsed().as_secs_f64());
                        }
                        let retry = {
                            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                            match &result {
                                Ok(_) => {
                                    s.failures.remove(&key);
                                    None
                                }
                                Err(_) => {
                                    let n = s.failures.entry(key.clone()).or_insert(0);
                                    *n += 1;
                                    Some(backoff(*n))
                                }
                            }
                        };
                        match result {
                            Ok(Action::Done) => {}
                            Ok(Action::RequeueAfter(d)) => queue.add_after(key.clone(), d),
                            Err(e) => {
                                m.errors.get_or_create(&crate::metrics::ErrorLabels { kind, error: e.label() }).inc();
                                tracing::warn!(kind, key = ?key, error = %e, "sync failed; retrying");
                                queue.add_after(key.clone(), retry.unwrap_or(Duration::from_secs(1)));
                            }
                        }
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        if s.dirty.remove(&key) {
                            continue;
                        }
                        s.running.remove(&key);
                        break;
                    }
                }
            })
            .await;
    }
}

/// Counts a reconcile as running until dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// 100 ms doubling per consecutive failure, at most 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(9).saturating_sub(1))).min(Duration::from_secs(30))
}

fn tokio_stream_from<T>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct E;
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("boom")
        }
    }
    impl crate::metrics::ErrorLabel for E {
        fn label(&self) -> &'static str {
            "test"
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(20), Duration::from_millis(25_600));
        assert!(backoff(50) <= Duration::from_secs(30));
    }

    #[tokio::test]
    async fn duplicates_collapse_and_failures_retry() {
        let metrics = Metrics::default();
        let (q, w) = queue::<String>("test", metrics);
        let runs = Arc::new(AtomicUsize::new(0));
        let fails_left = Arc::new(AtomicUsize::new(2));
        for _ in 0..5 {
            q.add("a".to_string());
        }
        let (r, f) = (runs.clone(), fails_left.clone());
        let task = tokio::spawn(w.run(4, move |_k: String| {
            let (r, f) = (r.clone(), f.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) > 0 {
                    f.fetch_sub(1, Ordering::SeqCst);
                    return Err(E);
                }
                Ok(Action::Done)
            }
        }));
        // One run for the five adds, two retries after failures (polled: a loaded machine may
        // stall the backoff timers), and no more after them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // (Longer than the next backoff, 400 ms: a stray retry would show.)
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        drop(q);
        task.abort();
    }
}
