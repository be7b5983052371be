//! Virtual nodes: a virtual pod is bound to a node named like the host node its copy runs on.
//! The node exists while pods are bound to it (created on first use, removed after the last,
//! unless the tenant labelled, tainted or cordoned it).
//! It shows the host node's placement labels, capacity, conditions and the taints the tenant's
//! pods would have to tolerate there (none the admin's tolerations already cover), refreshed
//! every few minutes; never the host's identity (machine, system and boot IDs). Taints the
//! tenant puts on it stay (the virtual controller manager evicts for its NoExecute ones). With a
//! virtual scheduler it is also marked with the listed RuntimeClasses whose node selector the host
//! node meets (the classes' views select on those marks).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, Taint, Toleration,
};
use k8s_openapi::api::node::v1::{RuntimeClass, Scheduling};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::queue::Action;
use crate::refs::RefKind;
use crate::sync::Result;

pub const KIND: &str = "Node";
/// How long a new virtual node is kept even with no pod bound to it yet.
const NEW_NODE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a used virtual node is brought up to date with its host node.
pub(crate) const REFRESH: std::time::Duration = std::time::Duration::from_secs(300);
/// How soon a refresh that failed is due again.
pub(crate) const REFRESH_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

pub use vkube_core::contract::LABEL_FAKE_NODE as LABEL_FAKE;
use vkube_core::contract::{ANNOTATION_HOST_RESOURCES, ANNOTATION_HOST_TAINTS, LABEL_RUNTIME_CLASS_PREFIX};

/// Host node labels worth showing in the virtual cluster (placement, not host internals), and the
/// syncer's own marks of the RuntimeClasses a node runs ([`LABEL_RUNTIME_CLASS_PREFIX`]).
fn visible_label(key: &str) -> bool {
    key.starts_with("kubernetes.io/")
        || key.starts_with("topology.kubernetes.io/")
        || key.starts_with("node.kubernetes.io/instance-type")
        || key.starts_with("beta.kubernetes.io/")
        || key.starts_with(LABEL_RUNTIME_CLASS_PREFIX)
}

/// The node selectors of the listed host RuntimeClasses that have one, by class, where virtual
/// nodes show which classes they run (with a virtual scheduler, which places by them).
fn placed_classes(ctx: &Context) -> ClassSelectors {
    if !ctx.policy.scheduling.virtual_scheduler {
        return ClassSelectors::new();
    }
    let classes = ctx.runtime_class_scheduling.read().unwrap_or_else(|e| e.into_inner());
    classes
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), s.node_selector.clone().filter(|s| !s.is_empty())?)))
        .collect()
}

/// A listed RuntimeClass's name to the host node labels it selects on.
pub type ClassSelectors = BTreeMap<String, BTreeMap<String, String>>;

/// Keeps the scheduling of the listed host RuntimeClasses a `from_host` pass read (`unread`: those
/// it could not read, whose last scheduling stays); if what virtual nodes show of them changes,
/// every virtual node is refreshed now.
pub fn runtime_classes_read(ctx: &Context, read: &BTreeMap<String, RuntimeClass>, unread: &BTreeSet<String>) {
    let before = placed_classes(ctx);
    {
        let mut kept = ctx.runtime_class_scheduling.write().unwrap_or_else(|e| e.into_inner());
        kept.retain(|name, _| unread.contains(name));
        kept.extend(read.iter().filter_map(|(name, c)| Some((name.clone(), c.scheduling.clone()?))));
    }
    if placed_classes(ctx) != before {
        for node in ctx.stores.vnodes.state() {
            let name = node.name_any();
            ctx.node_refreshed.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            ctx.queues.nodes.add(name);
        }
    }
}

/// The scheduling the host's admission adds to a pod of this listed RuntimeClass (its node
/// selector and tolerations), as last read.
pub fn class_scheduling(ctx: &Context, class: &str) -> Option<Scheduling> {
    ctx.runtime_class_scheduling.read().unwrap_or_else(|e| e.into_inner()).get(class).cloned()
}

/// The virtual node for host node `host` (pure), marked with the `classes` whose node selector
/// the host node's labels meet (the host node's own labels under the marks' prefix are not
/// shown: the marks are the syncer's).
pub fn virtual_node(name: &str, host: Option<&Node>, classes: &ClassSelectors) -> Node {
    let host_labels = host.and_then(|h| h.metadata.labels.as_ref());
    let mut labels: BTreeMap<String, String> = host_labels
        .into_iter()
        .flatten()
        .filter(|(k, _)| visible_label(k) && !k.starts_with(LABEL_RUNTIME_CLASS_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (class, selector) in classes {
        if host.is_some_and(|h| meets(h, selector)) {
            labels.insert(crate::runtime_classes::node_label(class), "true".into());
        }
    }
    labels.insert(LABEL_FAKE.into(), "true".into());
    labels.entry("kubernetes.io/hostname".into()).or_insert_with(|| name.to_string());
    Node {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    }
}

/// The merge patch of a virtual node's labels that makes its host-shown keys the host node's
/// (a value to set, or null to remove), the hostname and the tenant's own keys aside.
fn visible_labels_change(host: &Node, current: &Node, classes: &ClassSelectors) -> BTreeMap<String, Option<String>> {
    let want = virtual_node("", Some(host), classes).metadata.labels.unwrap_or_default();
    let have = current.metadata.labels.clone().unwrap_or_default();
    let shown = |k: &String| visible_label(k) && k != "kubernetes.io/hostname";
    let mut change: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (k, v) in want.iter().filter(|(k, _)| shown(k)) {
        if have.get(k) != Some(v) {
            change.insert(k.clone(), Some(v.clone()));
        }
    }
    for k in have.keys().filter(|k| shown(k) && !want.contains_key(*k)) {
        change.insert(k.clone(), None);
    }
    change
}

/// The host node's taints a tenant's pod would meet there: those the admin's tolerations (added
/// to every host pod) do not already tolerate. With no host node known, none: not the
/// `not-ready` taint the API server puts on every new node, which nothing here would lift.
/// NoExecute ones are shown as NoSchedule: the host evicts its copies itself (and the virtual
/// pods go with them), while the virtual taint eviction would act on a view up to a refresh old
/// and without what else lets host pods stay (a host webhook's tolerations).
pub fn virtual_taints(host: Option<&Node>, admin: &[Toleration]) -> Vec<Taint> {
    let taints = host.and_then(|h| h.spec.as_ref()).and_then(|s| s.taints.clone()).unwrap_or_default();
    let mut shown: Vec<Taint> = vec![];
    for mut t in taints.into_iter().filter(|t| !admin.iter().any(|tol| tolerates(tol, t))) {
        if t.effect == "NoExecute" {
            t.effect = "NoSchedule".into();
            t.time_added = None;
        }
        // Once per key and effect, as the API server wants them.
        if !shown.iter().any(|s| taint_id(s) == taint_id(&t)) {
            shown.push(t);
        }
    }
    shown
}

/// A taint's identity on a node (the API server allows one per key and effect).
fn taint_id(t: &Taint) -> String {
    format!("{}:{}", t.key, t.effect)
}

/// The taints a virtual node should carry, and the annotation that records which of them came
/// from the host: the host's (`host`, from [`virtual_taints`]) and the tenant's own, which are
/// those on the node now (`current`) that the last refresh did not put there (`mirrored`, the
/// node's `ANNOTATION_HOST_TAINTS`; none on a node of a vkube that kept no tenant taints, whose
/// taints all came from the host). A host taint that went from the host goes; one of the
/// tenant's with a host taint's key and effect gives way to it.
pub fn merged_taints(host: Vec<Taint>, current: &[Taint], mirrored: Option<&str>) -> (Vec<Taint>, String) {
    let record = host.iter().map(taint_id).collect::<Vec<_>>().join(",");
    let from_host: std::collections::BTreeSet<String> = host.iter().map(taint_id).collect();
    let tenants = current.iter().filter(|t| {
        let id = taint_id(t);
        mirrored.is_some_and(|m| !m.split(',').any(|m| m == id)) && !from_host.contains(&id)
    });
    let mut taints = host.clone();
    taints.extend(tenants.cloned());
    (taints, record)
}

/// The taint a cordoned node carries for the scheduler (its node lifecycle controller's).
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// What a virtual node shows while its host node is gone and pods are still bound to it: the
/// taint and Ready condition a node lifecycle controller gives a node it lost touch with, so
/// neither the virtual scheduler nor a DaemonSet places anything there. Recorded as the host's
/// taint: the refresh after the host node is back takes it off.
fn gone_taint(effect: &str) -> Taint {
    Taint { key: "node.kubernetes.io/unreachable".into(), effect: effect.into(), ..Default::default() }
}

/// A virtual node's Ready condition of vkube's own making (no host node's to show).
fn ready(status: &str, reason: &str, message: &str) -> Vec<NodeCondition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    vec![NodeCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(format!("vkube: {message}")),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    }]
}

/// The resources (capacity or allocatable) of a node's status, by name.
fn resource_names(status: Option<&NodeStatus>) -> std::collections::BTreeSet<String> {
    let maps = status.into_iter().flat_map(|s| [s.capacity.as_ref(), s.allocatable.as_ref()]);
    maps.flatten().flat_map(|m| m.keys().cloned()).collect()
}

/// The resources the last refresh took from the host (`ANNOTATION_HOST_RESOURCES`; `None` on a
/// node no refresh of this kind has recorded yet).
fn host_resources(node: &Node) -> Option<std::collections::BTreeSet<String>> {
    let record = node.metadata.annotations.as_ref()?.get(ANNOTATION_HOST_RESOURCES)?;
    Some(record.split(',').filter(|r| !r.is_empty()).map(String::from).collect())
}

/// The resources the tenant gave a virtual node itself (an extended resource for its virtual
/// scheduler): those its last refresh did not take from the host (every one on a node without
/// the record, made by an older vkube).
pub fn tenant_resources(node: &Node) -> std::collections::BTreeSet<String> {
    let shown = resource_names(node.status.as_ref());
    match host_resources(node) {
        Some(host) => shown.difference(&host).cloned().collect(),
        None => shown,
    }
}

/// Whether the tenant closed this virtual node to a pod with `tolerations`: cordoned it, or put
/// a NoSchedule or NoExecute taint of its own on it that they do not tolerate. (The host's taints
/// shown there are the host scheduler's to enforce, on what it sees now.)
pub fn closed_to(node: &Node, tolerations: &[Toleration]) -> bool {
    let tolerated = |t: &Taint| tolerations.iter().any(|tol| tolerates(tol, t));
    let cordon = Taint { key: UNSCHEDULABLE_TAINT.into(), effect: "NoSchedule".into(), ..Default::default() };
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) && !tolerated(&cordon) {
        return true;
    }
    tenant_taints(node).any(|t| t.effect != "PreferNoSchedule" && !tolerated(t))
}

/// Whether `tol` names a taint key only the tenant's own taints carry on its virtual nodes (and
/// at least one does): the virtual cluster honours it (`closed_to`) and the host has no taint it
/// could be for, so the host pod goes without it and nothing is lost. Not a toleration without a
/// key (it tolerates the host's taints too).
pub fn for_tenant_taints_only<'a>(nodes: impl IntoIterator<Item = &'a Node>, tol: &Toleration) -> bool {
    let Some(key) = tol.key.as_deref().filter(|k| !k.is_empty()) else { return false };
    let mut tenants = false;
    for n in nodes {
        let own: std::collections::HashSet<String> = tenant_taints(n).map(taint_id).collect();
        for t in n.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default().iter().filter(|t| t.key == key) {
            if !own.contains(&taint_id(t)) {
                return false;
            }
            tenants = true;
        }
    }
    tenants
}

/// The taints the tenant put on a virtual node: those its last refresh did not (none before the
/// first refresh of this vkube: every taint is then the host's).
fn tenant_taints(node: &Node) -> impl Iterator<Item = &Taint> {
    let mirrored = node.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_HOST_TAINTS));
    let mirrored: std::collections::HashSet<&str> = mirrored.map(|m| m.split(',').collect()).unwrap_or_default();
    let taints = if node.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_HOST_TAINTS)) {
        node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default()
    } else {
        &[]
    };
    taints.iter().filter(move |t| !mirrored.contains(taint_id(t).as_str()))
}

/// Whether the tenant cordoned, tainted or labelled this virtual node (a label the host's are not
/// shown under): kept while it does, pods or not, so a drained node stays closed and a node the
/// tenant labelled for its selectors keeps the label.
fn marked_by_tenant(node: &Node) -> bool {
    let labelled = node.metadata.labels.iter().flatten().any(|(k, _)| !visible_label(k) && k != LABEL_FAKE);
    labelled || node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) || tenant_taints(node).next().is_some()
}

/// Whether toleration `wide` tolerates every taint `narrow` does, as long (a pod with `wide` loses
/// nothing without `narrow`).
pub fn covers(wide: &Toleration, narrow: &Toleration) -> bool {
    let exists = |t: &Toleration| t.operator.as_deref() == Some("Exists");
    let (wide_key, narrow_key) = (wide.key.as_deref().unwrap_or_default(), narrow.key.as_deref().unwrap_or_default());
    let key = (wide_key.is_empty() && exists(wide)) || (!narrow_key.is_empty() && wide_key == narrow_key);
    let value = exists(wide)
        || (!exists(narrow)
            && wide.value.as_deref().unwrap_or_default() == narrow.value.as_deref().unwrap_or_default());
    let wide_effect = wide.effect.as_deref().unwrap_or_default();
    let effect = wide_effect.is_empty() || narrow.effect.as_deref() == Some(wide_effect);
    let seconds = match (wide.toleration_seconds, narrow.toleration_seconds) {
        (None, _) => true,
        (Some(w), Some(n)) => n <= w,
        (Some(_), None) => false,
    };
    key && value && effect && seconds
}

/// Whether `tol` tolerates `taint`, as the scheduler decides it.
fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let effect = tol.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = tol.key.as_deref().unwrap_or_default();
    match tol.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => key == taint.key && tol.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default(),
    }
}

/// Its status: the host node's capacity, addresses and conditions when known (else Ready with
/// default capacity, and its name as its address). Its kubelet is vkube's (`KUBELET_PORT`),
/// whatever address the virtual API server dials.
pub fn virtual_node_status(name: &str, host: Option<&Node>) -> NodeStatus {
    let hs = host.and_then(|h| h.status.as_ref());
    let default_capacity: BTreeMap<String, Quantity> = [("cpu", "16"), ("memory", "64Gi"), ("pods", "110")]
        .into_iter()
        .map(|(k, v)| (k.into(), Quantity(v.into())))
        .collect();
    NodeStatus {
        capacity: Some(hs.and_then(|s| s.capacity.clone()).unwrap_or_else(|| default_capacity.clone())),
        allocatable: Some(hs.and_then(|s| s.allocatable.clone()).unwrap_or(default_capacity)),
        addresses: Some(
            hs.and_then(|s| s.addresses.clone())
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| vec![NodeAddress { type_: "Hostname".into(), address: name.into() }]),
        ),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(vkube_core::contract::KUBELET_PORT) }),
        }),
        // Versions and OS, never the machine's identity (machine ID, system UUID, boot ID).
        node_info: hs.and_then(|s| s.node_info.clone()).map(|i| k8s_openapi::api::core::v1::NodeSystemInfo {
            machine_id: String::new(),
            system_uuid: String::new(),
            boot_id: String::new(),
            ..i
        }),
        conditions: Some(hs.and_then(|s| s.conditions.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| {
            ready("True", "VirtualNodeReady", "pods bound here run on the host node of the same name")
        })),
        ..Default::default()
    }
}

/// Whether the host shows this cluster's pods may run on host node `name`: one of its host pods
/// runs there, or it is a host node shown to all (`--sync-all-nodes`), as the pinnable nodes
/// were read at most 2 s ago (`pods::down::pod_nodes`). Not a virtual pod's `nodeName`, which
/// the tenant writes.
fn host_runs_ours_on(ctx: &Context, name: &str) -> bool {
    crate::pods::down::pod_nodes(ctx).contains(name)
}

/// Makes sure the virtual node exists before a pod is bound to it. `verified`: the host shows
/// this cluster's pods on that host node (a pod's host copy placed there); only then is the host
/// node read (a tenant's pod may name any node): others get defaults, and nothing of the host.
/// Reading host nodes needs a ClusterRole; without it the node gets default capacity.
pub async fn ensure(ctx: &Context, name: &str, verified: bool) -> Result<()> {
    let first_evidence = verified && ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
    if ctx.stores.vnodes.get(&ObjectRef::new(name)).is_some() {
        if first_evidence {
            // Made with defaults (a tenant's pod named it first): refreshed from the host now.
            ctx.node_refreshed.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
            ctx.queues.nodes.add(name.to_string());
        }
        return Ok(());
    }
    let read = if verified { host_node(ctx, name).await.ok() } else { None };
    let (host, gone) = (read.clone().flatten(), matches!(read, Some(None)));
    let api: Api<Node> = Api::all(ctx.virt.clone());
    match api.create(&crate::sync::post_params(), &virtual_node(name, host.as_ref(), &placed_classes(ctx))).await {
        Ok(_) => {
            ctx.metrics.wrote(KIND, "create");
            refresh(ctx, name, host.as_ref(), gone, None).await
        }
        // There already (the store is behind): refreshed as it is, the tenant's taints kept.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let current = api.get_opt(name).await?;
            refresh(ctx, name, host.as_ref(), gone, current.as_ref()).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The host node, if the host says (`Err`: not readable, for now or without the ClusterRole;
/// the node then gets defaults).
async fn host_node(ctx: &Context, name: &str) -> std::result::Result<Option<Node>, kube::Error> {
    Api::<Node>::all(ctx.host.clone()).get_opt(name).await.inspect_err(|e| {
        tracing::debug!(node = name, error = %e, "host node not readable; using defaults");
    })
}

/// Makes a node's refresh due again after a failure, not at once (the tenant must not be able to
/// drive host reads by failing them): [`REFRESH_RETRY`] after the first, twice as long after each
/// failure in a row, up to [`REFRESH`] (a failing host is not read harder). The delay.
fn refresh_again_soon(ctx: &Context, name: &str) -> std::time::Duration {
    let failures = {
        let mut failures = ctx.node_failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(name.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = retry_delay(failures);
    if let Some(at) = std::time::Instant::now().checked_sub(REFRESH - delay) {
        ctx.node_refreshed.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), at);
    }
    delay
}

/// How long a node's refresh waits after `failures` failures in a row (at least one).
fn retry_delay(failures: u32) -> std::time::Duration {
    REFRESH_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(4)).min(REFRESH)
}

/// Whether the host node may take a pod the tenant bound to it, directly (the admin's
/// `Scheduling::bind_node_name`): the host has not cordoned it, the admin's tolerations (every
/// host pod carries them) with those of `class` (the scheduling the host adds for the pod's
/// RuntimeClass) tolerate each of its NoSchedule and NoExecute taints, and its labels meet the
/// class's node selector (a virtual node's mark of the class may be the tenant's). Read at that
/// moment (at most 2 s before: a burst of pods bound to one node costs one read; a cordon counts
/// at once after that); a node not readable takes none. The node, if it does.
pub async fn takes_bound_pods(ctx: &Context, name: &str, class: Option<&Scheduling>) -> Option<Node> {
    const READ_FOR: std::time::Duration = std::time::Duration::from_secs(2);
    let cached = {
        let mut reads = ctx.bound_node_reads.lock().unwrap_or_else(|e| e.into_inner());
        reads.retain(|_, (at, _)| at.elapsed() < READ_FOR);
        reads.get(name).map(|(_, node)| node.clone())
    };
    let node = match cached {
        Some(node) => node,
        None => {
            let node = host_node(ctx, name).await.ok().flatten();
            let mut reads = ctx.bound_node_reads.lock().unwrap_or_else(|e| e.into_inner());
            reads.insert(name.to_string(), (std::time::Instant::now(), node.clone()));
            node
        }
    };
    let class_tolerations = class.and_then(|c| c.tolerations.as_deref()).unwrap_or_default();
    let tolerations = [ctx.policy.scheduling.tolerations.as_slice(), class_tolerations].concat();
    let selector = class.and_then(|c| c.node_selector.as_ref());
    node.filter(|n| open_to(n, &tolerations) && selector.is_none_or(|s| meets(n, s)))
}

/// Whether a node's labels meet a node selector.
fn meets(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn open_to(node: &Node, tolerations: &[Toleration]) -> bool {
    let spec = node.spec.as_ref();
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    spec.and_then(|s| s.unschedulable) != Some(true)
        && taints
            .iter()
            .filter(|t| t.effect != "PreferNoSchedule")
            .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)))
}

/// Brings the virtual node's labels, taints and status to what its host node shows, writing only
/// what differs from `current` (heartbeat times aside); the tenant's own labels, taints and
/// resources stay. `gone`: the host says its node is no more while pods are still bound to the
/// virtual one, which then keeps what it showed, closed and not Ready.
async fn refresh(ctx: &Context, name: &str, host: Option<&Node>, gone: bool, current: Option<&Node>) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.virt.clone());
    // The resources the last refresh took from the host; on a node of an older vkube (no
    // record), all it shows, once: a resource the host dropped then goes, rather than passing
    // for the tenant's for good (and being taken out of pods silently).
    let had =
        current.map(|c| host_resources(c).unwrap_or_else(|| resource_names(c.status.as_ref()))).unwrap_or_default();
    let mut host_taints = virtual_taints(host, &ctx.policy.scheduling.tolerations);
    let status = if gone {
        // As a node lifecycle controller shows a node it lost touch with: the virtual taint
        // eviction moves pods bound there after their toleration (the host's copies are gone).
        host_taints.extend([gone_taint("NoSchedule"), gone_taint("NoExecute")]);
        let mut status = current.and_then(|c| c.status.clone()).unwrap_or_default();
        for resources in [status.capacity.as_mut(), status.allocatable.as_mut()].into_iter().flatten() {
            resources.retain(|name, _| had.contains(name));
        }
        status.conditions = Some(ready("Unknown", "HostNodeGone", "the host node is gone; pods bound here do not run"));
        status
    } else {
        virtual_node_status(name, host)
    };
    let host_now = resource_names(Some(&status));
    // The record never names fewer than the status holds of the host's: before the status, the
    // names it had and those it gets; after, those it has.
    let owned: std::collections::BTreeSet<String> = had.union(&host_now).cloned().collect();
    let joined = |names: &std::collections::BTreeSet<String>| names.iter().cloned().collect::<Vec<_>>().join(",");
    let annotation =
        |key: &str| current.and_then(|n| n.metadata.annotations.as_ref()).and_then(|a| a.get(key)).cloned();
    let (have_record, have_resources) = (annotation(ANNOTATION_HOST_TAINTS), annotation(ANNOTATION_HOST_RESOURCES));
    // The host's placement labels (a node first made with defaults gets them once the host shows
    // our pods there); the tenant's own keys are left alone.
    let labels = match (host, current) {
        (Some(h), Some(c)) => visible_labels_change(h, c, &placed_classes(ctx)),
        _ => BTreeMap::new(),
    };
    let have_taints = current.and_then(|n| n.spec.as_ref()).and_then(|s| s.taints.clone()).unwrap_or_default();
    // A new node's taints are the API server's `not-ready` one: none of the tenant's yet.
    let (taints, record) =
        merged_taints(host_taints, if current.is_some() { &have_taints } else { &[] }, have_record.as_deref());
    // The version each write is made at: every write below answers with the node it left.
    let mut version = current.and_then(|n| n.metadata.resource_version.clone());
    if current.is_none()
        || !labels.is_empty()
        || have_taints != taints
        || have_record.as_ref() != Some(&record)
        || have_resources.as_ref() != Some(&joined(&owned))
    {
        // One patch at the version read: the whole taint list (a taint the tenant adds
        // meanwhile is not lost: the conflict brings the node back with it), the records, the
        // labels that changed.
        let mut patch = serde_json::json!({
            "metadata": {
                "labels": labels,
                "annotations": {ANNOTATION_HOST_TAINTS: record, ANNOTATION_HOST_RESOURCES: joined(&owned)},
            },
            "spec": {"taints": taints},
        });
        at_version(&mut patch, version.as_deref());
        let node = api.patch(name, &crate::sync::patch_params(), &Patch::Merge(&patch)).await?;
        version = node.metadata.resource_version;
        ctx.metrics.wrote(KIND, "taints");
    }
    // What this sets, heartbeats and the tenant's own resources aside (the API server defaults
    // other fields).
    let unstamped = |s: Option<&NodeStatus>| {
        let s = s.cloned().unwrap_or_default();
        let mut conditions = s.conditions.unwrap_or_default();
        for c in conditions.iter_mut() {
            c.last_heartbeat_time = None;
            c.last_transition_time = None;
        }
        let hosts = |m: Option<BTreeMap<String, Quantity>>| {
            m.map(|m| m.into_iter().filter(|(k, _)| owned.contains(k)).collect::<BTreeMap<_, _>>())
        };
        (hosts(s.capacity), hosts(s.allocatable), s.addresses, s.daemon_endpoints, s.node_info, conditions)
    };
    if current.is_none() || unstamped(current.and_then(|n| n.status.as_ref())) != unstamped(Some(&status)) {
        // A merge patch: the tenant's resources stay; those the host no longer has go (null).
        let mut patch = serde_json::json!({"status": status});
        for dropped in owned.difference(&host_now) {
            patch["status"]["capacity"][dropped.as_str()] = serde_json::Value::Null;
            patch["status"]["allocatable"][dropped.as_str()] = serde_json::Value::Null;
        }
        let node = api.patch_status(name, &crate::sync::patch_params(), &Patch::Merge(&patch)).await?;
        version = node.metadata.resource_version;
        ctx.metrics.wrote(KIND, "status");
    }
    if owned != host_now {
        // At the version the status was written at: if anything came between, the wider record
        // stays (safe) and the next refresh narrows it.
        let mut patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION_HOST_RESOURCES: joined(&host_now)}}});
        at_version(&mut patch, version.as_deref());
        match api.patch(name, &crate::sync::patch_params(), &Patch::Merge(&patch)).await {
            Ok(_) => ctx.metrics.wrote(KIND, "resources"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Makes a merge patch apply only to the object at `version` (a precondition), if known.
fn at_version(patch: &mut serde_json::Value, version: Option<&str>) {
    if let Some(v) = version {
        patch["metadata"]["resourceVersion"] = v.into();
    }
}

/// With `--sync-all-nodes`: every `every`, the host nodes the admin's node selector allows
/// become `ctx.host_nodes`, and those that came, went or changed are reconciled (a virtual node
/// each), a refresh due at once: a host node's cordon, taints, capacity or its going reach the
/// virtual scheduler within a listing, not a refresh period.
/// Never returns; a failed list is logged and tried again.
pub async fn list_host_nodes(ctx: &Context, every: std::time::Duration) {
    let mut last = None;
    loop {
        tokio::time::sleep(every).await;
        // After a failure, the most recent state (the host may no longer serve that version:
        // its etcd restored from a backup, say).
        last = list_host_nodes_once(ctx, last.as_deref()).await;
    }
}

/// One listing of the host nodes the admin's node selector allows (see [`list_host_nodes`]);
/// also run before the pod workers start, so pods pinned to those nodes keep their pins. After
/// a listing at `after` (its resourceVersion, returned), the next is served from the host API
/// server's watch cache, never older than that one (a node that is there is not taken for gone
/// by a stale cache of another API server); the first reads the most recent state.
pub async fn list_host_nodes_once(ctx: &Context, after: Option<&str>) -> Option<String> {
    let selector: Vec<String> = ctx.policy.scheduling.node_selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let params = kube::api::ListParams::default().labels(&selector.join(","));
    let params = match after {
        Some(version) => params.matching(kube::api::VersionMatch::NotOlderThan).at(version),
        None => params,
    };
    match Api::<Node>::all(ctx.host.clone()).list_metadata(&params).await {
        Ok(list) => {
            let now: BTreeMap<String, String> = list
                .items
                .into_iter()
                .filter_map(|n| Some((n.metadata.name?, n.metadata.resource_version.unwrap_or_default())))
                .collect();
            let before =
                std::mem::replace(&mut *ctx.host_nodes.write().unwrap_or_else(|e| e.into_inner()), now.clone());
            for name in changed_nodes(&before, &now) {
                ctx.node_refreshed.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                ctx.queues.nodes.add(name);
            }
            list.metadata.resource_version.filter(|v| !v.is_empty())
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing host nodes failed (--sync-all-nodes needs list on nodes); retrying");
            None
        }
    }
}

/// The host nodes that came, went or changed (another resourceVersion) between two listings
/// (name to resourceVersion).
fn changed_nodes(before: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let came_or_changed = now.iter().filter(|(name, version)| before.get(*name) != Some(version)).map(|(n, _)| n);
    let went = before.keys().filter(|name| !now.contains_key(*name));
    came_or_changed.chain(went).cloned().collect()
}

/// Whether a virtual node should exist: pods are bound to it, or it is a host node shown to all.
fn wanted(ctx: &Context, name: &str) -> bool {
    ctx.refs.is_used(RefKind::Node, "", name)
        || ctx.host_nodes.read().unwrap_or_else(|e| e.into_inner()).contains_key(name)
}

async fn delete(ctx: &Context, name: &str) -> Result<()> {
    ctx.node_failures.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    match Api::<Node>::all(ctx.virt.clone()).delete(name, &DeleteParams::default()).await {
        Ok(_) => ctx.metrics.wrote(KIND, "delete"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Removes a virtual node no longer wanted (only nodes the syncer made).
pub async fn reconcile(ctx: &Context, name: String) -> Result<Action> {
    let node = ctx.stores.vnodes.get(&ObjectRef::new(&name));
    // Kept only for nodes the host showed this run's pods on (`ensure`, below): a Node the
    // tenant makes and marks, or names in a pod's nodeName, is not one its pods may be pinned to.
    let used = wanted(ctx, &name)
        || (ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).contains(&name)
            && node.as_deref().is_some_and(marked_by_tenant));
    // Made by the syncer (the tenant's own Nodes are left alone).
    let ours = |n: &Node| n.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_FAKE));
    if !used && !node.as_deref().is_some_and(ours) {
        // The host's evidence is forgotten with the node it was for (not while a new node waits
        // out its grace before its first pod shows: its evidence then stays).
        ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
    }
    // (Each lock in a statement of its own: `host_runs_ours_on` takes it too.)
    let seen = ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).contains(&name);
    if used && !seen && host_runs_ours_on(ctx, &name) {
        ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone());
    }
    match node {
        Some(n) if !used && ours(&n) => {
            // A node is made just before the first pod is bound to it: give the binding time to
            // show in the pod watch before taking the node for unused.
            let age = n
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0).as_secs())
                .unwrap_or(i64::MAX);
            if age < NEW_NODE_GRACE.as_secs() as i64 {
                let left = NEW_NODE_GRACE.as_secs() as i64 - age;
                return Ok(Action::RequeueAfter(std::time::Duration::from_secs(left.max(1) as u64)));
            }
            ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            delete(ctx, &name).await?;
        }
        None if used => {
            let verified = ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).contains(&name);
            ensure(ctx, &name, verified).await?
        }
        Some(n) if ours(&n) => {
            // At most once per REFRESH per node, however often the tenant edits it (each refresh
            // reads the host node).
            // (`until_due`: how long until it is, so a retry after a failed one is not put off
            // to the next period.)
            let until_due = {
                let mut last = ctx.node_refreshed.lock().unwrap_or_else(|e| e.into_inner());
                let now = std::time::Instant::now();
                let until_due = last
                    .get(&name)
                    .map_or(std::time::Duration::ZERO, |t| REFRESH.saturating_sub(now.duration_since(*t)));
                if until_due.is_zero() {
                    last.insert(name.clone(), now);
                }
                until_due
            };
            let due = until_due.is_zero();
            // Only a node the host showed this cluster's pods on is read: a tenant's pod may
            // name any node, and its virtual node then shows defaults, nothing of the host.
            // (A used node with host evidence was added to `nodes_used` above.)
            let verified = ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).contains(&name);
            if !verified {
                // Made with defaults, or shown from the host before a restart (this run has no
                // evidence of it yet): what it shows stays.
                return Ok(Action::RequeueAfter(REFRESH));
            }
            let host = if due { host_node(ctx, &name).await } else { Ok(None) };
            let gone = due && matches!(host, Ok(None));
            if gone && !wanted(ctx, &name) {
                // Kept for the tenant's marks, but its host node is gone.
                ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                delete(ctx, &name).await?;
                return Ok(Action::Done);
            }
            // Not readable now: what the node shows stays (defaults are for a node made so),
            // read again soon; not before the next refresh if the host forbids it (no
            // ClusterRole: asking again changes nothing) or asks for less (429).
            let host = match host {
                Ok(host) => host,
                Err(kube::Error::Api(e)) if matches!(e.code, 403 | 429) => return Ok(Action::RequeueAfter(REFRESH)),
                Err(_) => return Ok(Action::RequeueAfter(refresh_again_soon(ctx, &name))),
            };
            if due {
                if let Err(e) = refresh(ctx, &name, host.as_ref(), gone, Some(&n)).await {
                    // A conflict with the tenant's own edit, say.
                    refresh_again_soon(ctx, &name);
                    return Err(e);
                }
                ctx.node_failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            }
            return Ok(Action::RequeueAfter(if due { REFRESH } else { until_due }));
        }
        _ => {}
    }
    Ok(Action::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_nodes_show_placement_labels_and_capacity() {
        let host: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "z1", "secret.corp/team": "x"}},
            "status": {"capacity": {"cpu": "4", "pods": "110"}, "allocatable": {"cpu": "3"},
                "nodeInfo": {"machineID": "m-1", "systemUUID": "u-1", "bootID": "b-1", "kernelVersion": "6.1",
                    "osImage": "Debian", "containerRuntimeVersion": "containerd://2.1", "kubeletVersion": "v1.37.2",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}
        }))
        .unwrap();
        let n = virtual_node("n1", Some(&host), &ClassSelectors::new());
        let labels = n.metadata.labels.unwrap();
        assert_eq!(labels["topology.kubernetes.io/zone"], "z1");
        assert_eq!(labels[LABEL_FAKE], "true");
        assert!(!labels.contains_key("secret.corp/team"));
        // Marked with the listed RuntimeClasses whose node selector the host node meets, never
        // showing the labels they select on.
        let selects = |k: &str, v: &str| -> BTreeMap<String, String> { [(k.to_string(), v.to_string())].into() };
        let classes: ClassSelectors = [
            ("team-x".to_string(), selects("secret.corp/team", "x")),
            ("team-y".to_string(), selects("secret.corp/team", "y")),
        ]
        .into();
        let mut host = host.clone();
        host.metadata.labels.as_mut().unwrap().insert("runtimeclass.vkube.dev/team-y".into(), "true".into());
        let labels = virtual_node("n1", Some(&host), &classes).metadata.labels.unwrap();
        assert_eq!(labels.get("runtimeclass.vkube.dev/team-x").map(String::as_str), Some("true"));
        assert!(!labels.contains_key("runtimeclass.vkube.dev/team-y") && !labels.contains_key("secret.corp/team"));
        let s = virtual_node_status("n1", Some(&host));
        assert_eq!(s.capacity.unwrap()["cpu"].0, "4");
        let kubelet = s.daemon_endpoints.and_then(|d| d.kubelet_endpoint).map(|k| k.port);
        assert_eq!(kubelet, Some(10250), "the port vkube's egress proxy serves as the kubelet");
        let info = s.node_info.unwrap();
        assert_eq!((info.machine_id.as_str(), info.system_uuid.as_str(), info.boot_id.as_str()), ("", "", ""));
        assert_eq!(info.kubelet_version, "v1.37.2");
        assert_eq!(s.conditions.unwrap()[0].status, "True");
        let unknown = virtual_node_status("n2", None);
        assert_eq!(unknown.allocatable.unwrap()["pods"].0, "110");
        let address = &unknown.addresses.unwrap()[0];
        assert_eq!((address.type_.as_str(), address.address.as_str()), ("Hostname", "n2"), "one to dial");
    }

    #[test]
    fn a_node_made_with_defaults_gets_the_hosts_placement_labels_and_keeps_the_tenants() {
        let node = |labels: serde_json::Value| -> Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n1", "labels": labels}})).unwrap()
        };
        let host = node(serde_json::json!({"kubernetes.io/hostname": "n1", "kubernetes.io/os": "linux",
            "topology.kubernetes.io/zone": "z1", "corp/secret": "x"}));
        let made = node(serde_json::json!({"kubernetes.io/hostname": "n1", LABEL_FAKE: "true", "disk": "ssd",
            "topology.kubernetes.io/region": "gone"}));
        let change = visible_labels_change(&host, &made, &ClassSelectors::new());
        let want: BTreeMap<String, Option<String>> = [
            ("kubernetes.io/os".to_string(), Some("linux".to_string())),
            ("topology.kubernetes.io/region".to_string(), None),
            ("topology.kubernetes.io/zone".to_string(), Some("z1".to_string())),
        ]
        .into();
        assert_eq!(change, want, "the host's placement labels, not its others, not the tenant's disk");
        let up_to_date = node(serde_json::json!({"kubernetes.io/hostname": "n1", "kubernetes.io/os": "linux",
            "topology.kubernetes.io/zone": "z1", "disk": "ssd"}));
        assert!(visible_labels_change(&host, &up_to_date, &ClassSelectors::new()).is_empty());
        // A RuntimeClass's mark comes and goes with the class (and is never the tenant's mark).
        let classes: ClassSelectors =
            [("secret".to_string(), [("corp/secret".to_string(), "x".to_string())].into())].into();
        let change = visible_labels_change(&host, &up_to_date, &classes);
        let marked: BTreeMap<String, Option<String>> =
            [("runtimeclass.vkube.dev/secret".to_string(), Some("true".to_string()))].into();
        assert_eq!(change, marked);
        let mut with_mark = up_to_date.clone();
        with_mark.metadata.labels.as_mut().unwrap().insert("runtimeclass.vkube.dev/secret".into(), "true".into());
        let gone: BTreeMap<String, Option<String>> = [("runtimeclass.vkube.dev/secret".to_string(), None)].into();
        assert_eq!(visible_labels_change(&host, &with_mark, &ClassSelectors::new()), gone);
        let mut tenants = node(serde_json::json!({"runtimeclass.vkube.dev/secret": "true"}));
        assert!(!marked_by_tenant(&tenants));
        tenants.metadata.labels.as_mut().unwrap().insert("disk".into(), "ssd".into());
        assert!(marked_by_tenant(&tenants));
    }

    #[test]
    fn virtual_nodes_carry_the_taints_tenant_pods_would_meet() {
        let host: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"taints": [
                {"key": "pool", "value": "tenants", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
                {"key": "gpu", "value": "true", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}
        }))
        .unwrap();
        let admin: Vec<Toleration> = serde_json::from_value(serde_json::json!([
            {"key": "pool", "operator": "Equal", "value": "tenants", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists"}]))
        .unwrap();
        let keys: Vec<String> = virtual_taints(Some(&host), &admin).into_iter().map(|t| t.key).collect();
        assert_eq!(keys, vec!["gpu"], "the admin's tolerations cover the rest");
        assert!(virtual_taints(None, &admin).is_empty(), "no stale not-ready taint without a host node");
        let everything: Vec<Toleration> = serde_json::from_value(serde_json::json!([{"operator": "Exists"}])).unwrap();
        assert!(virtual_taints(Some(&host), &everything).is_empty());
        let wrong_value: Vec<Toleration> =
            serde_json::from_value(serde_json::json!([{"key": "gpu", "value": "false"}])).unwrap();
        let shown = virtual_taints(Some(&host), &wrong_value);
        assert_eq!(shown.len(), 3);
        assert_eq!(shown[1].effect, "NoSchedule", "the host evicts its copies itself: no virtual eviction for it");
        let conditions = virtual_node_status("n1", Some(&host)).conditions.unwrap();
        assert_eq!((conditions[0].type_.as_str(), conditions[0].status.as_str()), ("Ready", "False"), "the host's");
    }

    #[test]
    fn a_node_the_tenant_cordoned_or_tainted_is_closed_to_pods_that_do_not_tolerate_it() {
        let node = |spec: serde_json::Value, record: Option<&str>| -> Node {
            let mut n: Node =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}, "spec": spec})).unwrap();
            if let Some(r) = record {
                n.metadata.annotations = Some([(ANNOTATION_HOST_TAINTS.to_string(), r.to_string())].into());
            }
            n
        };
        let tolerations = |v: serde_json::Value| -> Vec<Toleration> { serde_json::from_value(v).unwrap() };
        let none = tolerations(serde_json::json!([]));
        assert!(!closed_to(&node(serde_json::json!({}), Some("")), &none));
        let cordoned = node(serde_json::json!({"unschedulable": true}), None);
        assert!(closed_to(&cordoned, &none));
        let daemon = tolerations(
            serde_json::json!([{"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]),
        );
        assert!(!closed_to(&cordoned, &daemon), "a DaemonSet's pods tolerate the cordon");
        let taints = |effect: &str| serde_json::json!({"taints": [{"key": "gpu", "effect": "NoSchedule"}, {"key": "drain", "value": "now", "effect": effect}]});
        let tainted = |effect: &str| node(taints(effect), Some("gpu:NoSchedule"));
        assert!(closed_to(&tainted("NoSchedule"), &none));
        assert!(closed_to(&tainted("NoExecute"), &none));
        assert!(!closed_to(&tainted("PreferNoSchedule"), &none), "a preference only");
        assert!(!closed_to(&tainted("NoExecute"), &tolerations(serde_json::json!([{"key": "drain", "value": "now"}]))));
        assert!(closed_to(
            &tainted("NoExecute"),
            &tolerations(serde_json::json!([{"key": "drain", "value": "later"}]))
        ));
        let host_only =
            node(serde_json::json!({"taints": [{"key": "gpu", "effect": "NoSchedule"}]}), Some("gpu:NoSchedule"));
        assert!(!closed_to(&host_only, &none), "the host's taint: the host scheduler's to enforce");
        assert!(!closed_to(&node(taints("NoSchedule"), None), &none), "not refreshed yet: all the host's");

        let nodes = [tainted("NoSchedule"), host_only.clone()];
        let only = |t: serde_json::Value| for_tenant_taints_only(&nodes, &serde_json::from_value(t).unwrap());
        assert!(only(serde_json::json!({"key": "drain", "operator": "Exists"})), "for the tenant's taint");
        assert!(!only(serde_json::json!({"key": "gpu", "operator": "Exists"})), "for the host's");
        assert!(!only(serde_json::json!({"key": "other", "operator": "Exists"})), "for no taint at all");
        assert!(!only(serde_json::json!({"operator": "Exists"})), "every taint, the host's too");
        let both = [
            tainted("NoSchedule"),
            node(serde_json::json!({"taints": [{"key": "drain", "effect": "NoSchedule"}]}), Some("drain:NoSchedule")),
        ];
        assert!(
            !for_tenant_taints_only(&both, &serde_json::from_value(serde_json::json!({"key": "drain"})).unwrap()),
            "a key the host taints a node with too"
        );
    }

    #[test]
    fn a_bound_pod_goes_straight_only_to_a_host_node_open_to_it() {
        let node = |spec: serde_json::Value| -> Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}, "spec": spec})).unwrap()
        };
        let admin: Vec<Toleration> =
            serde_json::from_value(serde_json::json!([{"key": "pool", "value": "tenants", "effect": "NoSchedule"}]))
                .unwrap();
        assert!(open_to(&node(serde_json::json!({})), &[]));
        assert!(!open_to(&node(serde_json::json!({"unschedulable": true})), &admin), "cordoned by the host");
        let tainted = |key: &str, effect: &str| {
            node(serde_json::json!({"taints": [{"key": key, "value": "tenants", "effect": effect}]}))
        };
        assert!(!open_to(&tainted("gpu", "NoSchedule"), &admin));
        assert!(!open_to(&tainted("gpu", "NoExecute"), &admin));
        assert!(open_to(&tainted("gpu", "PreferNoSchedule"), &admin), "a preference only");
        assert!(open_to(&tainted("pool", "NoSchedule"), &admin), "the admin's tolerations cover it");
        assert!(!open_to(&tainted("pool", "NoSchedule"), &[]));
        let every: Vec<Toleration> = serde_json::from_value(serde_json::json!([{"operator": "Exists"}])).unwrap();
        assert!(open_to(&tainted("gpu", "NoExecute"), &every), "an admin's toleration of every taint");
        let no_schedule: Vec<Toleration> =
            serde_json::from_value(serde_json::json!([{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]))
                .unwrap();
        assert!(!open_to(&tainted("gpu", "NoExecute"), &no_schedule), "another effect");
    }

    #[test]
    fn a_toleration_covers_those_it_tolerates_at_least_as_much_as() {
        let t = |json: serde_json::Value| -> Toleration { serde_json::from_value(json).unwrap() };
        let class = t(serde_json::json!({"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}));
        assert!(covers(&class, &class.clone()));
        assert!(covers(&class, &t(serde_json::json!({"key": "sandbox", "value": "gvisor", "effect": "NoSchedule"}))));
        assert!(!covers(&class, &t(serde_json::json!({"key": "sandbox", "operator": "Exists"}))), "every effect");
        assert!(!covers(&class, &t(serde_json::json!({"operator": "Exists", "effect": "NoSchedule"}))), "every key");
        assert!(!covers(&class, &t(serde_json::json!({"key": "other", "operator": "Exists", "effect": "NoSchedule"}))));
        let equal = t(serde_json::json!({"key": "sandbox", "value": "gvisor"}));
        assert!(!covers(&equal, &t(serde_json::json!({"key": "sandbox", "value": "kata"}))));
        assert!(!covers(&equal, &t(serde_json::json!({"key": "sandbox", "operator": "Exists"}))), "every value");
        let everything = t(serde_json::json!({"operator": "Exists"}));
        assert!(covers(
            &everything,
            &t(serde_json::json!({"key": "x", "effect": "NoExecute", "tolerationSeconds": 5}))
        ));
        let for_a_while = t(serde_json::json!({"key": "x", "operator": "Exists", "tolerationSeconds": 60}));
        assert!(covers(
            &for_a_while,
            &t(serde_json::json!({"key": "x", "operator": "Exists", "tolerationSeconds": 30}))
        ));
        assert!(!covers(&for_a_while, &t(serde_json::json!({"key": "x", "operator": "Exists"}))), "for ever");
    }

    #[test]
    fn failed_refreshes_in_a_row_wait_twice_as_long_each_up_to_the_refresh_period() {
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), REFRESH);
    }

    #[test]
    fn a_listing_names_the_host_nodes_that_came_went_or_changed() {
        let listing = |nodes: &[(&str, &str)]| -> BTreeMap<String, String> {
            nodes.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        let before = listing(&[("a", "1"), ("b", "5"), ("c", "7")]);
        let now = listing(&[("a", "1"), ("b", "6"), ("d", "2")]);
        assert_eq!(changed_nodes(&before, &now), ["b", "d", "c"], "b cordoned, d came, c went");
        assert!(changed_nodes(&now, &now).is_empty());
    }

    #[test]
    fn the_tenants_resources_are_those_no_refresh_took_from_the_host() {
        let node = |record: Option<&str>| -> Node {
            let mut n: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}, "status": {
                "capacity": {"cpu": "4", "example.com/slots": "1"},
                "allocatable": {"cpu": "4", "nvidia.com/gpu": "1", "example.com/slots": "1"}}}))
            .unwrap();
            if let Some(r) = record {
                n.metadata.annotations = Some([(ANNOTATION_HOST_RESOURCES.to_string(), r.to_string())].into());
            }
            n
        };
        let names = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(tenant_resources(&node(Some("cpu,nvidia.com/gpu"))), names(&["example.com/slots"]));
        assert_eq!(
            tenant_resources(&node(None)),
            names(&["cpu", "example.com/slots", "nvidia.com/gpu"]),
            "no record: any of them"
        );
        assert_eq!(resource_names(node(None).status.as_ref()).len(), 3);
    }

    #[test]
    fn the_tenants_own_taints_stay_through_a_refresh_and_the_hosts_follow_the_host() {
        let taint = |key: &str, effect: &str| Taint { key: key.into(), effect: effect.into(), ..Default::default() };
        let ids = |t: &[Taint]| t.iter().map(taint_id).collect::<Vec<_>>();
        // The last refresh put gpu:NoSchedule; the tenant added evict:NoExecute since.
        let current = [taint("gpu", "NoSchedule"), taint("evict", "NoExecute")];
        let (taints, record) = merged_taints(vec![taint("gpu", "NoSchedule")], &current, Some("gpu:NoSchedule"));
        assert_eq!(ids(&taints), ["gpu:NoSchedule", "evict:NoExecute"]);
        assert_eq!(record, "gpu:NoSchedule");
        // The host lifted gpu and added disk: gpu goes, disk comes, the tenant's stays.
        let (taints, record) = merged_taints(vec![taint("disk", "NoSchedule")], &current, Some("gpu:NoSchedule"));
        assert_eq!(ids(&taints), ["disk:NoSchedule", "evict:NoExecute"]);
        assert_eq!(record, "disk:NoSchedule");
        // A node of an older vkube (no record): every taint it carries came from the host.
        let (taints, record) = merged_taints(vec![taint("disk", "NoSchedule")], &current, None);
        assert_eq!((ids(&taints), record.as_str()), (vec!["disk:NoSchedule".to_string()], "disk:NoSchedule"));
        // The tenant's taint with a host taint's key and effect: the host's, once.
        let mut theirs = taint("gpu", "NoSchedule");
        theirs.value = Some("mine".into());
        let (taints, _) = merged_taints(vec![taint("gpu", "NoSchedule")], &[theirs], Some(""));
        assert_eq!(ids(&taints), ["gpu:NoSchedule"]);
        assert_eq!(taints[0].value, None);
        // No host taints and nothing of the tenant's: none, and an empty record.
        assert_eq!(merged_taints(vec![], &[], None), (vec![], String::new()));
    }
}
