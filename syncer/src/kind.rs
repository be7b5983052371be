//! The one list of kinds the syncer mirrors to the host, and the one description each of them
//! gives ([`SyncedKind`]). The list ([`each_kind`]) drives the informers, stores, queues,
//! readiness, owner lookup, resync, idle checks, and what `vkube delete` and the end-to-end
//! tests sweep from the host. Adding a kind: one file implementing [`SyncedKind`] (or
//! [`crate::mirror::Mirror`] for a plain translated copy) and one line in [`each_kind`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::discovery::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::compact::StoredAs;
use crate::context::{Context, Key};
use crate::informer::{Change, key_of};
use crate::naming::Translator;
use crate::queue::{Action, Queue};
use crate::sync::Result;

/// An API type the syncer watches.
pub trait Watched:
    Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static
{
}
impl<K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static> Watched
    for K
{
}

/// A kind whose virtual objects (keyed by namespace and name) get host copies in the host
/// namespace, each marked as owned by this cluster with [`SyncedKind::KIND`] as its owner kind.
pub trait SyncedKind: Sized + Send + Sync + 'static {
    /// The owner kind recorded on host copies (the virtual object's kind).
    const KIND: &'static str;
    type Virtual: Watched;
    /// How the virtual store keeps objects (as they are, or compact: see `compact`).
    type VirtualStored: StoredAs<Self::Virtual>;
    type Host: Watched + Resource<Scope = NamespaceResourceScope>;
    type HostStored: StoredAs<Self::Host>;

    /// Which host objects the host watch sees: this cluster's.
    fn host_watch(tr: &Translator) -> watcher::Config {
        owned_by_cluster(tr)
    }

    /// Drops what the syncer never reads from host objects before they are stored (memory).
    const SLIM_HOST: Option<fn(&mut Self::Host)> = None;

    /// What a change of a virtual object enqueues: itself, and whatever depends on it.
    fn on_virtual_change(ctx: &Context, v: &Self::Virtual, _change: Change) {
        ctx.queues.of::<Self>().add(key_of(v));
    }

    /// What a change of a host copy enqueues: the virtual object it mirrors.
    fn on_host_change(ctx: &Context, h: &Self::Host, _change: Change) {
        enqueue_owner(ctx, h.meta());
    }

    /// Brings the host copy of the virtual object `key` in line with it (virtual → host), and,
    /// for kinds without an upward path, the host copy's state back.
    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send;

    /// The queue of the upward path (host → virtual), for kinds whose host copies' state flows
    /// back: host events run [`SyncedKind::reflect`] from it instead of `reconcile`, so a status
    /// change on the host does not translate the virtual object again. `None`: host events run
    /// `reconcile`, which repairs a copy that drifted.
    const UPWARD_QUEUE: Option<&'static str> = None;

    /// Brings the host copy's state back to the virtual object `key` (upward path).
    fn reflect(_ctx: &Context, _key: Key) -> impl Future<Output = Result<Action>> + Send {
        async { Ok(Action::Done) }
    }
}

/// Queues the virtual object a host object of ours mirrors (on its kind's upward path).
pub fn enqueue_owner(c: &Context, meta: &ObjectMeta) {
    let Some(o) = c.tr.owner(meta) else { return };
    if let Some(q) = c.queues.kinds.for_host_change(&o.kind) {
        q.add((o.namespace, o.name));
    }
}

/// A watch of the host objects this cluster owns.
pub fn owned_by_cluster(tr: &Translator) -> watcher::Config {
    watcher::Config::default().labels(&tr.cluster_selector()).any_semantic()
}

/// Something done once per synced kind (see [`each_kind`]).
pub trait KindVisitor {
    fn visit<K: SyncedKind>(&mut self);
}

/// The one list of synced kinds.
pub fn each_kind(v: &mut impl KindVisitor) {
    v.visit::<Pod>();
    v.visit::<Service>();
    v.visit::<ConfigMap>();
    v.visit::<Secret>();
    v.visit::<Endpoints>();
    v.visit::<EndpointSlice>();
    v.visit::<PersistentVolumeClaim>();
    v.visit::<NetworkPolicy>();
    v.visit::<Ingress>();
    v.visit::<PodDisruptionBudget>();
}

/// Every host resource type the syncer writes (each once): what a cluster's cleanup deletes
/// and what "nothing is left" checks.
pub fn host_resources() -> Vec<ApiResource> {
    struct Collect(Vec<ApiResource>);
    impl KindVisitor for Collect {
        fn visit<K: SyncedKind>(&mut self) {
            let ar = ApiResource::erase::<K::Host>(&());
            if !self.0.iter().any(|a| a.group == ar.group && a.plural == ar.plural) {
                self.0.push(ar);
            }
        }
    }
    let mut c = Collect(vec![]);
    each_kind(&mut c);
    c.0
}

/// The stores of every synced kind, by kind.
#[derive(Default)]
pub struct KindStores {
    by_type: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// Metadata of a host copy by its host API group and kind (`group/Kind`), namespace and name.
    host_meta: HashMap<String, HostMetaFn>,
}

type HostMetaFn = Box<dyn Fn(&str, &str) -> Option<ObjectMeta> + Send + Sync>;

struct StorePair<K: SyncedKind> {
    virt: Store<K::VirtualStored>,
    host: Store<K::HostStored>,
}

impl KindStores {
    pub(crate) fn insert<K: SyncedKind>(&mut self, virt: Store<K::VirtualStored>, host: Store<K::HostStored>) {
        let by_name = host.clone();
        self.host_meta.insert(
            format!("{}/{}", <K::Host as Resource>::group(&()), <K::Host as Resource>::kind(&())),
            Box::new(move |ns, name| by_name.get(&ObjectRef::new(name).within(ns)).map(|o| o.meta().clone())),
        );
        self.by_type.insert(TypeId::of::<K>(), Box::new(StorePair::<K> { virt, host }));
    }

    /// The metadata of a host copy of ours of `api_version` (`v1`, `group/v1`) and `kind` (e.g.
    /// what a host event is about).
    pub fn host_meta(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<ObjectMeta> {
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or_default();
        self.host_meta.get(&format!("{group}/{kind}")).and_then(|f| f(ns, name))
    }

    fn pair<K: SyncedKind>(&self) -> &StorePair<K> {
        self.by_type
            .get(&TypeId::of::<K>())
            .and_then(|p| p.downcast_ref())
            .unwrap_or_else(|| panic!("{} is not in kind::each_kind", K::KIND))
    }

    /// The virtual objects of kind `K`.
    pub fn virt<K: SyncedKind>(&self) -> &Store<K::VirtualStored> {
        &self.pair::<K>().virt
    }

    /// This cluster's host copies of kind `K`.
    pub fn host<K: SyncedKind>(&self) -> &Store<K::HostStored> {
        &self.pair::<K>().host
    }
}

/// The work queues of every synced kind (downward, and upward for those that have one), by kind
/// and by owner kind name.
#[derive(Default)]
pub struct KindQueues {
    by_type: HashMap<TypeId, KindQueue>,
    by_name: HashMap<&'static str, KindQueue>,
}

#[derive(Clone)]
struct KindQueue {
    down: Queue<Key>,
    up: Option<Queue<Key>>,
}

impl KindQueues {
    pub(crate) fn insert<K: SyncedKind>(&mut self, down: Queue<Key>, up: Option<Queue<Key>>) {
        let q = KindQueue { down, up };
        self.by_type.insert(TypeId::of::<K>(), q.clone());
        self.by_name.insert(K::KIND, q);
    }

    fn get<K: SyncedKind>(&self) -> &KindQueue {
        self.by_type.get(&TypeId::of::<K>()).unwrap_or_else(|| panic!("{} is not in kind::each_kind", K::KIND))
    }

    /// The downward queue of kind `K`: its virtual objects to bring to the host.
    pub fn of<K: SyncedKind>(&self) -> &Queue<Key> {
        &self.get::<K>().down
    }

    /// The upward queue of kind `K` (its downward one for kinds without an upward path).
    pub fn upward<K: SyncedKind>(&self) -> &Queue<Key> {
        let q = self.get::<K>();
        q.up.as_ref().unwrap_or(&q.down)
    }

    /// The queue a change of a host object whose owner mark names `kind` goes to, if that is a
    /// synced kind: its upward one, or its downward one for kinds without.
    pub fn for_host_change(&self, kind: &str) -> Option<&Queue<Key>> {
        self.by_name.get(kind).map(|q| q.up.as_ref().unwrap_or(&q.down))
    }

    pub fn all_idle(&self) -> bool {
        self.by_name.values().all(|q| q.down.is_idle() && q.up.as_ref().is_none_or(Queue::is_idle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    #[test]
    fn host_copies_are_found_by_group_and_kind() {
        let mut host = Writer::<NetworkPolicy>::default();
        let meta = ObjectMeta { name: Some("p".into()), namespace: Some("h".into()), ..Default::default() };
        host.apply_watcher_event(&watcher::Event::Apply(NetworkPolicy { metadata: meta, ..Default::default() }));
        let mut stores = KindStores::default();
        stores.insert::<NetworkPolicy>(Writer::default().as_reader(), host.as_reader());
        assert!(stores.host_meta("networking.k8s.io/v1", "NetworkPolicy", "h", "p").is_some());
        assert!(stores.host_meta("projectcalico.org/v3", "NetworkPolicy", "h", "p").is_none(), "another API's kind");
        assert!(stores.host_meta("networking.k8s.io/v1", "NetworkPolicy", "h", "q").is_none());
    }

    #[test]
    fn host_resources_are_listed_once_each() {
        let plurals: Vec<_> = host_resources().into_iter().map(|a| a.plural).collect();
        assert_eq!(
            plurals,
            [
                "pods",
                "services",
                "configmaps",
                "secrets",
                "endpoints",
                "endpointslices",
                "persistentvolumeclaims",
                "networkpolicies",
                "ingresses",
                "poddisruptionbudgets"
            ]
        );
    }
}
