//! Watches feeding a store and the sync queues. Handlers see every object the watch reports,
//! including, after a relist, the objects that vanished while the watch was down (kube-runtime's
//! reflector drops those silently), so deletions are never missed. Handlers see the object as
//! watched; the store keeps it in the informer's stored form (`S`: as is, or compact).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::compact::StoredAs;

type Handler<K> = Box<dyn Fn(&K, Change) + Send + Sync>;

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Created or changed while watching.
    Applied,
    /// Found by a (re)list: it may have changed while the watch was down, or not at all.
    Listed,
    Deleted,
}

pub struct Informer<K: Resource<DynamicType = ()> + Clone + 'static, S: StoredAs<K> = K> {
    name: String,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<S>,
    store: Store<S>,
    handlers: Vec<Handler<K>>,
    /// Drops what the syncer never reads before an object is stored (memory).
    slim: Option<fn(&mut K)>,
}

impl<K, S> Informer<K, S>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    S: StoredAs<K>,
{
    pub fn new(name: impl Into<String>, api: Api<K>, config: watcher::Config) -> Self {
        let writer = Writer::default();
        let store = writer.as_reader();
        Informer { name: name.into(), api, config, writer, store, handlers: vec![], slim: None }
    }

    /// Applies `f` to every object before it is stored and handed to handlers.
    pub fn slimmed(mut self, f: fn(&mut K)) -> Self {
        self.slim = Some(f);
        self
    }

    pub fn store(&self) -> Store<S> {
        self.store.clone()
    }

    /// Calls `f` for every change, in watch order, after the store has been updated.
    pub fn on_change(&mut self, f: impl Fn(&K, Change) + Send + Sync + 'static) {
        self.handlers.push(Box::new(f));
    }

    /// Drives the watch forever (with kube-runtime's backoff on errors).
    pub async fn run(self) {
        let Informer { name, api, config, mut writer, store, handlers, slim } = self;
        let mut before_relist: HashMap<ObjectRef<S>, Arc<S>> = HashMap::new();
        let notify = |o: &K, c: Change| handlers.iter().for_each(|h| h(o, c));
        loop {
            let stream = watch(api.clone(), config.clone()).default_backoff().modify(move |o: &mut K| {
                o.managed_fields_mut().clear();
                o.annotations_mut().remove(crate::naming::LAST_APPLIED);
                if let Some(f) = slim {
                    f(o);
                }
            });
            futures::pin_mut!(stream);
            // An error while the initial state arrives: streamed, the watch goes on without the
            // object it could not read, which must not pass for gone (its host copy would be
            // deleted), so that state is not taken and is asked for again.
            let (mut initial, mut incomplete) = (false, false);
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(watch = %name, error = %e, "watch failed; retrying with backoff");
                        incomplete |= initial;
                        continue;
                    }
                };
                if let Event::Init = event {
                    (initial, incomplete) = (true, false);
                    before_relist = store.state().into_iter().map(|o| (ObjectRef::from_obj(o.as_ref()), o)).collect();
                }
                if let (Event::InitDone, true) = (&event, incomplete) {
                    break;
                }
                let stored = match &event {
                    Event::Apply(o) => Event::Apply(S::store(o.clone())),
                    Event::InitApply(o) => Event::InitApply(S::store(o.clone())),
                    Event::Delete(o) => Event::Delete(S::store(o.clone())),
                    Event::Init => Event::Init,
                    Event::InitDone => Event::InitDone,
                };
                writer.apply_watcher_event(&stored);
                match &event {
                    Event::Apply(o) => notify(o, Change::Applied),
                    Event::InitApply(o) => notify(o, Change::Listed),
                    Event::Delete(o) => notify(o, Change::Deleted),
                    Event::Init => {}
                    Event::InitDone => {
                        initial = false;
                        for (key, old) in before_relist.drain() {
                            if store.get(&key).is_none() {
                                notify(&old.load(), Change::Deleted);
                            }
                        }
                        tracing::debug!(watch = %name, objects = store.len(), "listed");
                    }
                }
            }
            tracing::warn!(watch = %name, "the initial state came with errors (or the watch ended); asking again in 5 s");
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    }
}

/// `config`, streaming its initial state if `streamed`.
pub fn initial(config: watcher::Config, streamed: bool) -> watcher::Config {
    if streamed { config.streaming_lists() } else { config }
}

/// Objects per page of a list: kube-runtime's 500 decoded at once leave fragmented pages behind
/// after a restart; 100 keep the burst small.
const PAGE: u32 = 100;

/// `config` for the syncer's host informers, in [`PAGE`]s. Their lists (resource version 0) of
/// Events are read from etcd in pages of the limit (the API server keeps no watch cache for
/// Events: upstream's `DefaultWatchCacheSizes`); the other kinds' come whole from the watch
/// cache whatever the limit (checked), and yet a restart with 1,000 pods held 45.6-46.4 MiB
/// after its resync with pages of 100 against 53.1-53.3 with 500 (43 steady; A/B runs of
/// otherwise identical binaries, docs/benchmarks-notes.md): kept for that, the mechanism is
/// not found.
pub fn host_paged(config: watcher::Config) -> watcher::Config {
    config.page_size(PAGE)
}

/// `config` listing consistently (the most recent state, read through), in [`PAGE`]s: for the
/// usage meter's host watches, which count what runs and must not miss a pod.
pub fn consistent_paged(config: watcher::Config) -> watcher::Config {
    config.list_semantic(watcher::ListSemantic::MostRecent).page_size(PAGE)
}

/// Whether the API server streams a watch's initial state (`sendInitialEvents`, the WatchList
/// feature: on by default in Kubernetes 1.32 and from 1.34, off in 1.33 and before 1.32), asked
/// with a watch of ConfigMaps in `namespace` that matches none. Streamed, an informer's initial
/// state arrives one object at a time instead of in a whole list decoded at once: a restart's
/// burst of memory is half as high and what it leaves behind is not fragmented (at 1,000 pods,
/// 40 MiB resident after a restart against 65 MiB with lists, the steady state being 43).
///
/// Only the virtual API server's informers stream: a host upgraded to a release with the feature
/// off would refuse it for good (this is asked once, at start); the virtual API server is ours,
/// one, and pinned. (A streamed state is asked at resource version 0, as the syncer's lists are:
/// both are answered from the API server's watch cache.)
pub async fn streams_lists(client: &kube::Client, namespace: &str) -> bool {
    use kube::api::{WatchEvent, WatchParams};
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), namespace);
    let params = WatchParams::streaming_lists().fields("metadata.name=vkube-probe-matches-nothing").timeout(10);
    let probe = async {
        let stream = api.watch(&params, "0").await.ok()?;
        futures::pin_mut!(stream);
        match stream.next().await? {
            Ok(WatchEvent::Bookmark(b)) => Some(b.metadata.annotations.contains_key("k8s.io/initial-events-end")),
            _ => Some(false),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), probe).await.ok().flatten().unwrap_or(false)
}

/// The (namespace, name) of an object, the key every queue uses.
pub fn key_of<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, Response};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::client::Body;
    use tokio::sync::mpsc;
    use tower_test::mock::{self, Handle};

    use super::*;

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    fn added(name: &str, data: serde_json::Value) -> serde_json::Value {
        let meta = serde_json::json!({"name": name, "namespace": "ns", "resourceVersion": "1"});
        serde_json::json!({"type": "ADDED", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}})
    }

    fn initial_end() -> serde_json::Value {
        let meta = serde_json::json!({"resourceVersion": "2", "annotations": {"k8s.io/initial-events-end": "true"}});
        serde_json::json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}})
    }

    /// The next request: a watch.
    async fn next_watch(server: &mut ApiServer) -> (String, mock::SendResponse<Response<Body>>) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(60), server.next_request())
            .await
            .expect("a watch within 60 s")
            .expect("the informer is still there");
        let uri = req.uri().to_string();
        assert!(uri.contains("watch=true"), "{uri}");
        (uri, send)
    }

    /// Answers the next request, a watch streaming its initial state, with `events`.
    async fn stream(server: &mut ApiServer, events: &[serde_json::Value]) {
        let (uri, send) = next_watch(server).await;
        assert!(uri.contains("sendInitialEvents=true"), "{uri}");
        let body: Vec<u8> =
            events.iter().flat_map(|e| serde_json::to_vec(e).unwrap().into_iter().chain([b'\n'])).collect();
        send.send_response(Response::builder().body(Body::from(body)).unwrap());
    }

    /// Changes the handler saw, up to and including `last`.
    async fn changes_until(
        seen: &mut mpsc::UnboundedReceiver<(String, Change)>,
        last: (&str, Change),
    ) -> Vec<(String, Change)> {
        let mut got = vec![];
        while got.last().map(|(n, c): &(String, Change)| (n.as_str(), *c)) != Some(last) {
            let next = tokio::time::timeout(Duration::from_secs(60), seen.recv()).await;
            got.push(next.expect("a change within 60 s").expect("the informer is running"));
        }
        got
    }

    /// A streamed initial state in which one object cannot be read goes on without it; that
    /// object must not be reported deleted (its host copy or virtual object would be deleted).
    #[tokio::test(start_paused = true)]
    async fn an_initial_state_that_came_with_errors_is_not_taken_for_the_truth() {
        let (svc, mut server) = mock::pair::<Request<Body>, Response<Body>>();
        let api = Api::<ConfigMap>::namespaced(kube::Client::new(svc, "default"), "ns");
        let mut informer = Informer::<ConfigMap>::new("test", api, initial(watcher::Config::default(), true));
        let (tx, mut seen) = mpsc::unbounded_channel();
        informer.on_change(move |o, c| drop(tx.send((o.name_any(), c))));
        let store = informer.store();
        tokio::spawn(informer.run());
        let ok = serde_json::json!({"k": "v"});
        let gone = serde_json::json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status",
            "status": "Failure", "reason": "Expired", "message": "too old resource version", "code": 410}});

        // Both objects listed; then the watch expires, so the state is asked for again.
        stream(&mut server, &[added("a", ok.clone()), added("b", ok.clone()), initial_end(), gone]).await;
        changes_until(&mut seen, ("b", Change::Listed)).await;
        // This time "b" cannot be decoded: the state is dropped and asked for again.
        stream(&mut server, &[added("a", ok.clone()), added("b", serde_json::json!("not a map")), initial_end()]).await;
        stream(&mut server, &[added("a", ok.clone()), added("b", ok), initial_end()]).await;
        let mut changes = changes_until(&mut seen, ("b", Change::Listed)).await;
        // That state taken whole, the watch goes on from it: every change of it has been seen.
        let (uri, _held) = next_watch(&mut server).await;
        assert!(uri.contains("resourceVersion=2") && !uri.contains("sendInitialEvents"), "{uri}");
        changes.extend(std::iter::from_fn(|| seen.try_recv().ok()));
        assert!(!changes.iter().any(|(_, c)| *c == Change::Deleted), "nothing reported deleted: {changes:?}");
        assert_eq!(store.len(), 2);
    }
}
