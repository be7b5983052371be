//! What every sync module shares: clients, stores, queues, the translator and the policy.

use std::sync::RwLock;

use k8s_openapi::api::core::v1::{Event, Namespace, Node};
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;

use crate::compact::Compact;
use crate::kind::{KindQueues, KindStores, SyncedKind};
use crate::metrics::Metrics;
use crate::naming::Translator;
use crate::policy::Policy;
use crate::queue::Queue;
use crate::refs::RefIndex;

/// A namespaced key: (namespace, name) of the virtual object.
pub type Key = (String, String);

/// Settings of the syncer (the admin's, like the policy).
#[derive(Clone, Debug)]
pub struct Options {
    pub cluster_domain: String,
    /// Copy every configmap, not only those pods use.
    pub sync_all_configmaps: bool,
    /// Copy every secret, not only those pods use.
    pub sync_all_secrets: bool,
    /// Provision every claim on the host, not only those pods use.
    pub sync_all_claims: bool,
    /// Copy NetworkPolicies to the host (confined to the cluster); off, tenants are told they are
    /// not enforced.
    pub sync_network_policies: bool,
    /// Copy PodDisruptionBudgets to the host (`disruption_budgets`).
    pub sync_pod_disruption_budgets: bool,
    /// Show every host node the admin's node selector allows as a virtual node from the start,
    /// not only those running this cluster's pods.
    pub sync_all_nodes: bool,
    /// Reconciles running at once per kind.
    pub concurrency: usize,
    /// ClusterIP of the host Service in front of the API proxy (`kubernetes.default` for pods).
    pub api_ip: String,
    /// Recreate host copies of pods that ran and are gone, instead of deleting the virtual pod
    /// (after `vkube pause` removed them on purpose).
    pub recreate_lost_pods: bool,
    /// The host Service in front of the proxy (ours): where the virtual API is served (the
    /// virtual `default/kubernetes` Endpoints show its addresses), and where how far host events
    /// have been mirrored is kept, so a restart does not mirror them all again.
    pub proxy_service: Option<String>,
    /// How long the tokens given to host pods live and when they are renewed.
    pub tokens: TokenLifetime,
    /// Where host pods read their tokens from.
    pub token_delivery: TokenDelivery,
}

/// Where a host pod reads its virtual service-account tokens from (the platform admin's choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenDelivery {
    /// A host Secret of the pod's own, which its projected volume reads: only those who can read
    /// Secrets in the host namespace can read the token. Two host writes per pod.
    #[default]
    Secret,
    /// Annotations of the host pod, which its projected volume reads through the downward API:
    /// one host write per pod, no host Secret, but whoever can read pods in the host namespace
    /// can read the tokens.
    Annotation,
    /// A host Secret of the pod's own, as `Secret`, written once the pod is bound to a node: its
    /// tokens name the node (`authentication.kubernetes.io/node-name`), as a kubelet's do. The
    /// pod starts once its host kubelet retries the mount (typically half a second later, with a
    /// `FailedMount` event on the host), and the name is looked up before the pod is created.
    BoundSecret,
}

impl TokenDelivery {
    /// Whether tokens are kept in host Secrets of the pods' own.
    pub fn in_secrets(self) -> bool {
        matches!(self, TokenDelivery::Secret | TokenDelivery::BoundSecret)
    }
}

impl std::str::FromStr for TokenDelivery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "secret" => Ok(TokenDelivery::Secret),
            "annotation" => Ok(TokenDelivery::Annotation),
            "bound-secret" => Ok(TokenDelivery::BoundSecret),
            other => Err(format!("{other:?}: token delivery is `secret`, `bound-secret` or `annotation`")),
        }
    }
}

/// The lifetime of the virtual service-account tokens host pods get: long, as a kubelet's are
/// with the API server's extended expiration (the binding to the pod is what ends a token), and
/// renewed when less than `renew_before` is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLifetime {
    pub lifetime: std::time::Duration,
    pub renew_before: std::time::Duration,
}

impl Default for TokenLifetime {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        TokenLifetime {
            lifetime: std::time::Duration::from_secs(365 * DAY),
            renew_before: std::time::Duration::from_secs(30 * DAY),
        }
    }
}

/// Every store: the synced kinds' (by kind) and those of the loops beside them.
pub struct Stores {
    pub kinds: KindStores,
    /// Virtual nodes the syncer made (`nodes`).
    pub vnodes: Store<Node>,
    /// What namespace selectors are matched against.
    pub vnamespaces: Store<Namespace>,
    /// Host events in the host namespace (`events`).
    pub hevents: Store<Compact<Event>>,
}

impl Stores {
    /// The virtual objects of synced kind `K`.
    pub fn virt<K: SyncedKind>(&self) -> &Store<K::VirtualStored> {
        self.kinds.virt::<K>()
    }

    /// This cluster's host copies of synced kind `K`.
    pub fn host<K: SyncedKind>(&self) -> &Store<K::HostStored> {
        self.kinds.host::<K>()
    }
}

/// Every work queue: the synced kinds' (by kind) and those of the loops beside them.
pub struct Queues {
    pub kinds: KindQueues,
    /// Host token Secrets that may need renewing or removing.
    pub tokens: Queue<String>,
    pub nodes: Queue<String>,
    /// Host event names.
    pub events: Queue<String>,
}

impl Queues {
    pub fn of<K: SyncedKind>(&self) -> &Queue<Key> {
        self.kinds.of::<K>()
    }

    pub fn upward<K: SyncedKind>(&self) -> &Queue<Key> {
        self.kinds.upward::<K>()
    }

    pub fn all_idle(&self) -> bool {
        self.kinds.all_idle() && self.tokens.is_idle() && self.nodes.is_idle() && self.events.is_idle()
    }
}

pub struct Context {
    pub tr: Translator,
    pub policy: Policy,
    pub opts: Options,
    /// The virtual API server, as the control plane (cluster-admin).
    pub virt: Client,
    /// The host API server, with the control plane's host credentials.
    pub host: Client,
    pub stores: Stores,
    pub refs: RefIndex,
    pub queues: Queues,
    /// What each pod's host copy carries of it, as the downward path last saw.
    pub carried: crate::pods::CarriedIndex,
    /// Pods whose placement hangs on the virtual nodes: those no node of the cluster can take
    /// (no host copy), and those whose host copy, not yet placed, is kept off nodes the tenant
    /// closed; looked at again when a virtual node changes (labelled, reopened, one comes).
    pub unschedulable: std::sync::Mutex<std::collections::BTreeSet<Key>>,
    /// The host nodes this cluster's pods may be pinned to, and when they were read from the
    /// host pods (kept a moment: many pods created at once need them alike).
    pub pod_nodes: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<std::collections::BTreeSet<String>>)>>,
    /// With `TokenDelivery::BoundSecret`: uids of the bound pods whose token Secrets this run
    /// has written or found.
    pub bound_tokens: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Virtual pods this syncer bound, their watch not showing it yet (no second binding).
    pub bindings_unseen: crate::unseen::Unseen,
    /// Virtual pods whose host copy this syncer made, the host watch not showing it yet (no
    /// second copy, token or Secret).
    pub copies_unseen: crate::unseen::Unseen,
    /// Pod certificates asked for and not answered yet, and until when those issued are fresh.
    pub pod_certificates: crate::pod_certificates::Requests,
    /// The addresses of the cluster's host pods (what selector-less Services' endpoints may name).
    pub pod_ips: crate::pod_ips::PodIps,
    /// Events on virtual objects (refusals, collisions).
    pub recorder: Recorder,
    /// ClusterIP of the virtual cluster's DNS Service, once it is synced.
    pub dns_ip: RwLock<Option<String>>,
    /// With `sync_all_nodes`: the host nodes the admin's node selector allows, as last listed
    /// (name to resourceVersion).
    pub host_nodes: std::sync::Arc<RwLock<std::collections::BTreeMap<String, String>>>,
    /// Host nodes this run's pods have used (verified on the host, as pods ran there): their
    /// virtual nodes stay without pods while the tenant has marked them (its own labels or
    /// taints, a cordon), and pods may still be pinned to them meanwhile.
    pub nodes_used: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// When each virtual node was last brought up to date with its host node.
    pub node_refreshed: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Failed refreshes in a row per virtual node (each waits longer: `nodes::refresh_again_soon`).
    pub node_failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Host nodes as read for pods bound to them (`nodes::takes_bound_pods`), and when: kept a
    /// moment, so a burst of pods bound to a node costs one read, not one each.
    pub bound_node_reads: std::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, Option<k8s_openapi::api::core::v1::Node>)>,
    >,
    /// Host events up to this time are mirrored (best effort, as events are).
    pub events_mark: RwLock<Option<k8s_openapi::jiff::Timestamp>>,
    /// Classes the admin lists that the host does not have, as (kind, name), from the last
    /// `from_host` pass: a pod is not given such a PriorityClass on the host (checked again
    /// then), which would refuse it.
    pub absent_classes: RwLock<std::collections::BTreeSet<(&'static str, String)>>,
    /// The scheduling of the listed host RuntimeClasses that have one, as the `from_host` loop
    /// last read each (`nodes::runtime_classes_read`; up to its minute old).
    pub runtime_class_scheduling: RwLock<std::collections::BTreeMap<String, k8s_openapi::api::node::v1::Scheduling>>,
    /// Told when the `from_host` loop's first pass is done: the syncer is not ready before the
    /// classes the admin lists are shown (a pod naming one would be refused by the virtual API
    /// server, a claim or Ingress would miss the default).
    pub classes_shown: tokio::sync::Notify,
    pub metrics: Metrics,
    pub health: crate::health::Health,
    /// Writes per host object per minute.
    pub budget: crate::budget::WriteBudget,
    /// When this syncer started (a wake starts one).
    pub started: std::time::Instant,
}

impl Context {
    pub fn host_ns(&self) -> &str {
        self.tr.host_namespace()
    }

    /// Every virtual namespace with its labels (what namespace selectors are matched against).
    pub fn namespace_labels(&self) -> Vec<crate::naming::NamespaceLabels> {
        let namespaces = self.stores.vnamespaces.state();
        namespaces
            .iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n.metadata.labels.clone().unwrap_or_default()))
            .collect()
    }

    pub fn dns_ip(&self) -> Option<String> {
        self.dns_ip.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
