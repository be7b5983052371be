//! The downward path of a pod (virtual → host): its host copy created, kept in line, deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;

use super::{Carried, KIND, fingerprint, patch, status, translate, up};
use crate::context::{Context, Key, TokenDelivery};
use crate::informer::key_of;
use crate::kind::SyncedKind;
use crate::queue::Action;
use crate::refs::{self, RefKind};
use crate::sync::{self, HostCopy, Result};
use translate::PodEnv;

pub async fn reconcile(ctx: &Context, (ns, name): Key) -> Result<Action> {
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<Pod>().get(&ObjectRef::new(&name).within(&ns)).map(|p| Arc::new(p.load()));
    let h = sync::host_get(ctx.stores.host::<Pod>(), ctx, &host_name).map(|p| Arc::new(p.load()));

    let Some(v) = v else {
        // The virtual pod is gone (force-deleted, or while we were down): so goes its copy.
        ctx.carried.forget(&(ns.clone(), name.clone()));
        if let Some(h) = h
            && sync::mirrors(ctx, h.as_ref(), KIND, &ns, &name).is_some()
            && h.metadata.deletion_timestamp.is_none()
        {
            sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
        }
        return Ok(Action::Done);
    };
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let mut copy = sync::classify(ctx, h, KIND, &ns, &name, &uid);
    if let HostCopy::Ours(h) = copy {
        // Whatever else happens to the pod (refused, terminating), its tokens stay valid.
        copy = HostCopy::Ours(crate::tokens::renew_pod_annotations(ctx, &v, h).await);
    }
    let key = (ns, name);
    // Made moments ago, the host watch not showing it yet (what `create` recorded of it stays).
    let unseen = matches!(copy, HostCopy::Absent) && ctx.copies_unseen.pending(&uid);
    match copy {
        HostCopy::Ours(_) => ctx.copies_unseen.seen(&uid),
        _ if !unseen => ctx.carried.forget(&key),
        _ => {}
    }

    if v.metadata.deletion_timestamp.is_some() {
        return match copy {
            HostCopy::Ours(h) => {
                if h.metadata.deletion_timestamp.is_none() {
                    sync::delete_host(ctx, KIND, h.as_ref(), v.metadata.deletion_grace_period_seconds).await?;
                }
                // The host pod's disappearance brings us back; this is a safety net.
                Ok(Action::RequeueAfter(Duration::from_secs(30)))
            }
            // Nothing (of ours) runs it: finish the deletion as a kubelet would.
            _ => up::finalize(ctx, &v, false).await,
        };
    }

    match copy {
        HostCopy::Foreign(_) => {
            sync::collision(ctx, v.as_ref(), &host_name).await;
            Ok(Action::RequeueAfter(Duration::from_secs(300)))
        }
        HostCopy::Stale(h) => {
            // Left by an earlier pod of the same name: it goes before the new one starts.
            if h.metadata.deletion_timestamp.is_none() {
                sync::delete_host(ctx, KIND, h.as_ref(), Some(0)).await?;
            }
            Ok(Action::RequeueAfter(Duration::from_millis(500)))
        }
        // Looked at once the host watch shows it.
        HostCopy::Absent if unseen => Ok(Action::RequeueAfter(Duration::from_secs(1))),
        HostCopy::Absent => create(ctx, &v).await,
        HostCopy::Ours(h) => {
            if h.metadata.deletion_timestamp.is_some() {
                // Evicted or deleted on the host: the virtual pod follows once the copy is gone.
                return Ok(Action::Done);
            }
            let Some(dns_ip) = ctx.dns_ip() else {
                // Known moments after start (the DNS Service's upward path).
                return Ok(Action::RequeueAfter(Duration::from_millis(500)));
            };
            if placement_stale(ctx, &v, &h) || unplaced_but_bound(ctx.policy.scheduling.virtual_scheduler, &v, &h) {
                // Kept off a node the tenant has reopened since (or not off one it closed), or
                // waiting for the host's scheduler while the virtual one has placed the pod (the
                // setting turned on meanwhile): a copy that never ran is made again, as a
                // scheduler would look again, or bound where the virtual cluster placed it.
                // As read: not if the host placed it meanwhile.
                let as_read = vkube_kubeclient::delete::Exactly::AsRead;
                sync::delete_host_exactly(ctx, KIND, h.as_ref(), Some(0), as_read).await?;
                return Ok(Action::RequeueAfter(Duration::from_millis(500)));
            }
            if let Some(host_generation) = update_host(ctx, &v, &h, &dns_ip).await? {
                let carried =
                    Carried { fingerprint: fingerprint(&v), generation: v.metadata.generation, host_generation };
                if ctx.carried.record(&key, carried) {
                    // What the virtual pod's status may say of its generation changed.
                    ctx.queues.upward::<Pod>().add(key);
                }
            }
            Ok(Action::Done)
        }
    }
}

async fn create(ctx: &Context, v: &Pod) -> Result<Action> {
    if ran_on_host(v) && !ctx.opts.recreate_lost_pods {
        // Its host copy ran and is gone (evicted, deleted on the host, lost while we were down):
        // the virtual pod goes too and its controller makes a new one, as on a real node loss.
        return up::finalize(ctx, v, true).await;
    }
    let scheduling = &ctx.policy.scheduling;
    if scheduling.virtual_scheduler && v.spec.as_ref().is_none_or(|s| s.node_name.is_none()) {
        // Scheduled in the virtual cluster: it reaches the host once bound, as a pod reaches its
        // kubelet (the binding brings it back).
        return Ok(Action::Done);
    }
    let Some(dns_ip) = ctx.dns_ip() else {
        // Pods are told the virtual DNS address; it exists moments after start.
        return Ok(Action::RequeueAfter(Duration::from_millis(500)));
    };
    let links = service_links_for(ctx, v);
    let namespaces = ctx.namespace_labels();
    // Looked up only for pods that name nodes or node labels the host does not show.
    let nodes = std::sync::OnceLock::new();
    let nodes = || nodes.get_or_init(|| pod_nodes(ctx));
    let known = |n: &str| nodes().contains(n);
    let labelled = |meets: &dyn Fn(&BTreeMap<String, String>) -> bool| -> Vec<String> {
        nodes().iter().filter(|n| virtual_node_labels_meet(ctx, n, meets)).cloned().collect()
    };
    let closed = |tolerations: &[k8s_openapi::api::core::v1::Toleration]| {
        // The virtual nodes first (a few): the host pods are scanned only if one is closed.
        let closed = closed_nodes(ctx, tolerations);
        if closed.is_empty() {
            return translate::Closed::default();
        }
        let every_known = !nodes().is_empty() && nodes().is_subset(&closed);
        translate::Closed { nodes: closed.into_iter().collect(), every_known }
    };
    // Set once the host node a pod is bound to was read and may take it (below).
    let bound_open = std::sync::atomic::AtomicBool::new(false);
    let bound_to = v.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let bindable = |n: &str| bound_open.load(std::sync::atomic::Ordering::Relaxed) && bound_to == Some(n);
    // The host's admission adds the class's tolerations (the virtual one did, from its view).
    let class = v
        .spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_deref())
        .filter(|class| scheduling.runtime_classes.iter().any(|listed| listed == class))
        .and_then(|class| crate::nodes::class_scheduling(ctx, class));
    let class_tolerations = class.as_ref().and_then(|c| c.tolerations.clone()).unwrap_or_default();
    let needless = |t: &k8s_openapi::api::core::v1::Toleration| {
        class_tolerations.iter().any(|c| crate::nodes::covers(c, t))
            || crate::nodes::for_tenant_taints_only(ctx.stores.vnodes.state().iter().map(|n| n.as_ref()), t)
    };
    let env = pod_env(
        ctx,
        &dns_ip,
        &links,
        &namespaces,
        translate::Nodes {
            known: &known,
            labelled: &labelled,
            closed: &closed,
            needless: &needless,
            bindable: &bindable,
        },
    );
    let mut translated = translate::host_pod(&env, v);
    // Bound by the tenant where the admin lets it stay bound: the host node is read only for a
    // pod otherwise ready to go (one that waits costs the host nothing), and if it may take the
    // pod, the pod is translated again, bound.
    let keeps_node = scheduling.bind_node_name || scheduling.virtual_scheduler;
    if let (Ok(t), Some(node)) = (&translated, bound_to)
        && t.unschedulable.is_none()
        && keeps_node
    {
        let open = if known(node) { crate::nodes::takes_bound_pods(ctx, node, class.as_ref()).await } else { None };
        match open {
            Some(host_node) => {
                bound_open.store(true, std::sync::atomic::Ordering::Relaxed);
                translated = translate::host_pod(&env, v);
                if scheduling.virtual_scheduler
                    && let Ok(t) = translated.as_mut()
                {
                    // Placed by the virtual scheduler, which counted them on the virtual node the
                    // tenant gave them to: resources the host node does not have are its own.
                    let vnode = ctx.stores.vnodes.get(&ObjectRef::new(node));
                    let tenants = vnode.map(|n| crate::nodes::tenant_resources(&n)).unwrap_or_default();
                    translate::drop_tenant_resources(&mut t.pod, &host_node, &tenants);
                }
            }
            None if scheduling.virtual_scheduler => {
                // Bound by the virtual scheduler to a node the host does not offer now: it
                // waits, as a pod bound to a node whose kubelet is away; looked at again.
                let msg = format!(
                    "the host node {node} does not take pods now (cordoned, tainted against the platform's tolerations, not running the pod's RuntimeClass, gone or not readable on the host): the pod waits for it; delete it to have it scheduled again"
                );
                sync::warn(ctx, v, "HostNodeUnavailable", &msg).await;
                return Ok(Action::RequeueAfter(Duration::from_secs(30)));
            }
            // The host scheduler's way (below): node affinity on a known node, else dropped.
            None => {}
        }
    }
    let mut desired = match translated {
        Ok(mut t) => {
            if let Some(why) = t.unschedulable {
                return unschedulable(ctx, v, &why).await;
            }
            if let Some(spec) = t.pod.spec.as_mut()
                && let Some(class) = spec.priority_class_name.clone()
                && host_lacks_priority_class(ctx, &class).await?
            {
                t.dropped.push(translate::drop_absent_priority_class(spec));
            }
            if !t.dropped.is_empty() {
                let note = format!(
                    "not carried to the host (the platform admin decides where and how pods run): {}",
                    t.dropped.join("; ")
                );
                sync::warn(ctx, v, "SchedulingDropped", &note).await;
            }
            let mut pod = t.pod;
            if let Some(kept_off) = t.kept_off {
                // Recorded so that a copy not placed yet can be made again if the list goes stale.
                let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
                annotations.insert(vkube_core::contract::ANNOTATION_KEPT_OFF.into(), kept_off.join(","));
            }
            pod
        }
        Err(r) => {
            sync::refuse(ctx, KIND, v, &r).await;
            return Ok(Action::Done);
        }
    };
    if let Some(conflict) = foreign_reference(ctx, v).await? {
        let msg = format!(
            "{conflict}; the pod is not started until it is (its data would be what the pod reads): rename the object in this cluster, or ask the host admin"
        );
        sync::warn(ctx, v, "HostNameConflict", &msg).await;
        return Ok(Action::RequeueAfter(Duration::from_secs(60)));
    }
    match ctx.opts.token_delivery {
        TokenDelivery::Secret => {
            for (secret, audience) in translate::token_secrets(&ctx.tr, v) {
                let ensured = crate::tokens::ensure(ctx, v, &secret, audience.as_deref()).await;
                if let Some(later) = held_by_another(ctx, v, &secret, "service-account token", ensured).await? {
                    return Ok(later);
                }
            }
        }
        TokenDelivery::BoundSecret => {
            // Written once the pod is bound (the upward path); the names must be free or ours.
            for (secret, _) in translate::token_secrets(&ctx.tr, v) {
                let free = crate::tokens::clear_for(ctx, v, &secret).await;
                if let Some(later) = held_by_another(ctx, v, &secret, "service-account token", free).await? {
                    return Ok(later);
                }
            }
        }
        TokenDelivery::Annotation => {
            let tokens = crate::tokens::pod_annotations(ctx, v).await?;
            crate::tokens::schedule_pod_renewal(ctx, v, &tokens);
            desired.metadata.annotations.get_or_insert_with(Default::default).extend(tokens);
        }
    }
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let secret = crate::trust_bundles::secret_name(&ctx.tr, ns, v.metadata.name.as_deref().unwrap_or_default());
    let ensured = crate::trust_bundles::ensure(ctx, v).await;
    if let Some(later) = held_by_another(ctx, v, &secret, "projected trust bundles", ensured).await? {
        return Ok(later);
    }
    // Pod certificates are written once the pod is bound (the upward path); the name must be free
    // or ours before the pod may mount it.
    let secret = crate::pod_certificates::secret_name(&ctx.tr, ns, v.metadata.name.as_deref().unwrap_or_default());
    let free = crate::pod_certificates::name_free(ctx, v).await;
    if let Some(later) = held_by_another(ctx, v, &secret, "pod certificates", free).await? {
        return Ok(later);
    }
    if kept_off(&desired).is_some() {
        // Kept off nodes the tenant closed: looked at again if one reopens before it is placed.
        ctx.unschedulable.lock().unwrap_or_else(|e| e.into_inner()).insert(key_of(v));
    }
    let created = sync::create_host(ctx, KIND, &desired).await;
    if let Ok(false) = created {
        // One of ours was there already (the host watch had not brought it): compared once it has.
        return Ok(Action::RequeueAfter(Duration::from_secs(1)));
    }
    if created.is_ok() {
        ctx.copies_unseen.sent(v.metadata.uid.clone().unwrap_or_default());
        // A new host copy is at generation 1 and carries this pod.
        let carried =
            Carried { fingerprint: fingerprint(v), generation: v.metadata.generation, host_generation: Some(1) };
        ctx.carried.record(&key_of(v), carried);
    }
    sync::or_told(ctx, KIND, v, created).await
}

/// When the host Secret `secret` that would hold the pod's own data (`holds`) is another's, the
/// pod is not started and its tenant is told; the reconcile looks again later.
async fn held_by_another(
    ctx: &Context,
    v: &Pod,
    secret: &str,
    holds: &str,
    ensured: Result<()>,
) -> Result<Option<Action>> {
    match ensured {
        Err(sync::SyncError::Collision(_)) => {
            let msg = format!(
                "the host Secret {}/{secret} that would hold this pod's {holds} exists and is not managed by this virtual cluster; the pod is not started",
                ctx.host_ns()
            );
            sync::warn(ctx, v, "HostNameConflict", &msg).await;
            Ok(Some(Action::RequeueAfter(Duration::from_secs(300))))
        }
        other => other.map(|()| None),
    }
}

/// A ConfigMap or Secret the pod refers to whose host name a host object not of this cluster
/// holds (the host's kubelet would give the pod that object's data), described; `None` when
/// every reference is ours or not on the host yet. Only names not in our stores are looked up,
/// and only their metadata is read.
async fn foreign_reference(ctx: &Context, v: &Pod) -> Result<Option<String>> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    for (kind, name) in refs::pod_refs(v) {
        let host_name = ctx.tr.host_name(ns, &name);
        let (kind, found) = match kind {
            RefKind::ConfigMap if sync::host_get(ctx.stores.host::<ConfigMap>(), ctx, &host_name).is_none() => {
                let api: Api<ConfigMap> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
                (<ConfigMap as SyncedKind>::KIND, api.get_metadata_opt(&host_name).await?.map(|m| m.metadata))
            }
            RefKind::Secret if sync::host_get(ctx.stores.host::<Secret>(), ctx, &host_name).is_none() => {
                let api: Api<Secret> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
                (<Secret as SyncedKind>::KIND, api.get_metadata_opt(&host_name).await?.map(|m| m.metadata))
            }
            _ => continue,
        };
        if let Some(meta) = found
            && ctx.tr.owner(&meta).filter(|o| o.is(kind, ns, &name)).is_none()
        {
            return Ok(Some(format!(
                "{kind} {name:?}: the host {kind} {}/{host_name} is not managed by this virtual cluster",
                ctx.host_ns()
            )));
        }
    }
    Ok(None)
}

fn pod_env<'a>(
    ctx: &'a Context,
    dns_ip: &'a str,
    service_links: &'a [k8s_openapi::api::core::v1::EnvVar],
    namespaces: &'a [crate::naming::NamespaceLabels],
    nodes: translate::Nodes<'a>,
) -> PodEnv<'a> {
    PodEnv {
        translator: &ctx.tr,
        policy: &ctx.policy,
        api_ip: &ctx.opts.api_ip,
        dns_ip,
        cluster_domain: &ctx.opts.cluster_domain,
        service_links,
        namespaces,
        nodes,
        token_delivery: ctx.opts.token_delivery,
    }
}

/// Whether the labels of virtual node `name` (which the tenant may label) pass `meets`.
fn virtual_node_labels_meet(ctx: &Context, name: &str, meets: &dyn Fn(&BTreeMap<String, String>) -> bool) -> bool {
    let Some(node) = ctx.stores.vnodes.get(&ObjectRef::new(name)) else { return false };
    meets(node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
}

/// The nodes the tenant closed to a pod with `tolerations` (see `nodes::closed_to`), among those
/// its pods may go to (a drained node the tenant keeps is one; a Node it makes is not, so the
/// list a host pod carries stays bounded by the host's nodes).
fn closed_nodes(
    ctx: &Context,
    tolerations: &[k8s_openapi::api::core::v1::Toleration],
) -> std::collections::BTreeSet<String> {
    let nodes = ctx.stores.vnodes.state();
    let closed =
        nodes.iter().filter(|n| crate::nodes::closed_to(n, tolerations)).filter_map(|n| n.metadata.name.clone());
    let closed: std::collections::BTreeSet<String> = closed.collect();
    if closed.is_empty() {
        return closed;
    }
    let known = pod_nodes(ctx);
    closed.into_iter().filter(|n| known.contains(n)).collect()
}

/// The nodes a host copy not placed yet was kept off because the tenant closed them, if any.
fn kept_off(h: &Pod) -> Option<std::collections::BTreeSet<String>> {
    if h.spec.as_ref().is_none_or(|s| s.node_name.is_some()) {
        return None;
    }
    let list = h.metadata.annotations.as_ref()?.get(vkube_core::contract::ANNOTATION_KEPT_OFF)?;
    Some(list.split(',').filter(|n| !n.is_empty()).map(String::from).collect())
}

/// Whether a host copy still waiting for a node was kept off nodes other than those the tenant
/// has closed to it now, of those that can matter to it (`scheduling::closed_for`: a DaemonSet's
/// pod only minds its own node); its affinity cannot change: it is made again. Pods whose copy
/// waits so are looked at again when a virtual node changes.
fn placement_stale(ctx: &Context, v: &Pod, h: &Pod) -> bool {
    let Some(kept_off) = kept_off(h) else { return false };
    let Some(spec) = v.spec.as_ref().filter(|s| s.node_name.is_none()) else { return false };
    ctx.unschedulable.lock().unwrap_or_else(|e| e.into_inner()).insert(key_of(v));
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let nodes = pod_nodes(ctx);
    let known = |n: &str| nodes.contains(n);
    let affinity = spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref());
    let pinned = vkube_core::policy::scheduling::pinned_names(affinity, &known);
    kept_off != vkube_core::policy::scheduling::closed_for(pinned.as_ref(), closed_nodes(ctx, tolerations))
}

/// Whether the host copy waits for the host's scheduler while the virtual scheduler has bound the
/// virtual pod: a copy made before the admin turned the virtual scheduler on.
fn unplaced_but_bound(virtual_scheduler: bool, v: &Pod, h: &Pod) -> bool {
    let bound = |p: &Pod| p.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    virtual_scheduler && bound(v) && !bound(h)
}

/// How soon a pod no node can take is looked at again at the latest; a change of a virtual node
/// (the tenant labels one, or one comes) brings it back at once.
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(300);

/// A pod no node of the cluster can take stays pending with nothing on the host, told as a
/// scheduler tells it: `PodScheduled` false (reason `Unschedulable`) and a `FailedScheduling`
/// Warning event; looked at again when a virtual node changes.
async fn unschedulable(ctx: &Context, v: &Pod, why: &str) -> Result<Action> {
    ctx.unschedulable.lock().unwrap_or_else(|e| e.into_inner()).insert(key_of(v));
    let told = v.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
        c.iter().any(|c| c.type_ == "PodScheduled" && c.status == "False" && c.message.as_deref() == Some(why))
    });
    if !told {
        let condition = serde_json::json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": why, "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()});
        let patch = serde_json::json!({"status": {"conditions": [condition]}});
        let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
        let name = v.metadata.name.as_deref().unwrap_or_default();
        api.patch_status(name, &sync::patch_params(), &Patch::Strategic(&patch)).await?;
        ctx.metrics.wrote(KIND, "unschedulable");
        sync::warn(ctx, v, "FailedScheduling", why).await;
    }
    Ok(Action::RequeueAfter(UNSCHEDULABLE_RETRY))
}

/// The host nodes this cluster's pods run on, as the host says (not the virtual nodes, which the
/// tenant can create at will), those they ran on in this run whose virtual nodes the tenant
/// keeps, and with `--sync-all-nodes` those the admin's selector allows.
/// Read from every host pod at most every `POD_NODES_FOR` (a scale-up asks for them per pod).
pub(crate) fn pod_nodes(ctx: &Context) -> std::sync::Arc<std::collections::BTreeSet<String>> {
    const POD_NODES_FOR: Duration = Duration::from_secs(2);
    let mut cached = ctx.pod_nodes.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, nodes)) = cached.as_ref().filter(|(at, _)| at.elapsed() < POD_NODES_FOR) {
        return nodes.clone();
    }
    let mut nodes: std::collections::BTreeSet<String> =
        ctx.stores.host::<Pod>().state().iter().filter_map(|p| p.load().spec.and_then(|s| s.node_name)).collect();
    nodes.extend(ctx.host_nodes.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
    // Nodes this run's pods used whose virtual node stays (the tenant marked it).
    let used = ctx.nodes_used.lock().unwrap_or_else(|e| e.into_inner()).clone();
    nodes.extend(used.into_iter().filter(|n| ctx.stores.vnodes.get(&ObjectRef::new(n)).is_some()));
    let nodes = std::sync::Arc::new(nodes);
    *cached = Some((std::time::Instant::now(), nodes.clone()));
    nodes
}

/// The Service variables the virtual pod gets (unless it turned service links off), from the
/// Services of its namespace that exist now, as a kubelet computes them when starting it.
fn service_links_for(ctx: &Context, v: &Pod) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    if v.spec.as_ref().and_then(|s| s.enable_service_links) == Some(false) {
        return vec![];
    }
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    let services = ctx.stores.virt::<k8s_openapi::api::core::v1::Service>().state();
    let in_ns: Vec<&k8s_openapi::api::core::v1::Service> =
        services.iter().filter(|s| s.metadata.namespace.as_deref() == Some(ns)).map(|s| s.as_ref()).collect();
    translate::service_links(&in_ns)
}

/// Whether the host lacks a PriorityClass the admin lists (it would refuse the pod): the last
/// `from_host` pass found none, and the host still has none now (a pod's class cannot be given
/// back once it runs without it).
async fn host_lacks_priority_class(ctx: &Context, class: &str) -> Result<bool> {
    const KIND: &str = "PriorityClass";
    let key = (KIND, class.to_string());
    if !ctx.absent_classes.read().unwrap_or_else(|e| e.into_inner()).contains(&key) {
        return Ok(false);
    }
    let host: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(ctx.host.clone());
    let lacks = host.get_opt(class).await?.is_none();
    if !lacks {
        ctx.absent_classes.write().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }
    Ok(lacks)
}

/// Whether the virtual pod has run on the host: only its host copy's status gives it a host IP.
fn ran_on_host(v: &Pod) -> bool {
    v.status.as_ref().and_then(|s| s.host_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
}

/// Spec changes Kubernetes allows after creation (images, deadlines, tolerations, scheduling
/// gates, resources, ephemeral containers), label or annotation changes and the tenant's
/// readiness-gate conditions, carried to the host copy. Returns the host copy's generation from
/// which it carries the virtual pod, or `None` if it does not (refused).
async fn update_host(ctx: &Context, v: &Pod, h: &Pod, dns_ip: &str) -> Result<Option<Option<i64>>> {
    // Environment variables and affinity cannot change after creation: no service links or
    // namespace labels to gather here (this runs for every pod at every resync).
    // Node affinity cannot change either: no nodes to look up (what is dropped was told at creation).
    let mut desired = match translate::host_pod(&pod_env(ctx, dns_ip, &[], &[], translate::NO_NODES), v) {
        Ok(t) => t.pod,
        // Something added since creation (an ephemeral container) breaks the policy: it stays
        // off the host, and the tenant is told.
        Err(r) => {
            sync::refuse(ctx, KIND, v, &r).await;
            return Ok(None);
        }
    };
    // What the host's own machinery added stays (no fight with its webhooks and controllers).
    ctx.tr.keep_host_keys(&mut desired.metadata, &h.metadata);
    crate::tokens::keep_pod_annotations(&h.metadata, &mut desired.metadata);
    // Made at creation, with the placement (which an update does not compute).
    let kept_off = vkube_core::contract::ANNOTATION_KEPT_OFF;
    if let Some(list) = h.metadata.annotations.as_ref().and_then(|a| a.get(kept_off)) {
        desired.metadata.annotations.get_or_insert_with(Default::default).insert(kept_off.into(), list.clone());
    }
    let api: Api<Pod> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let pp = sync::patch_params();
    let name = h.metadata.name.as_deref().unwrap_or_default();
    let mut carries = true;
    // Each write answers with the host copy, whose generation it may have moved on.
    let mut generation = h.metadata.generation;
    let mut wrote = |p: Pod| generation = generation.max(p.metadata.generation);
    if let Some(patch) = patch::host_pod_patch(&desired, h) {
        sync::spend(ctx, KIND, name)?;
        wrote(api.patch(name, &pp, &Patch::Strategic(&patch)).await?);
        ctx.metrics.wrote(KIND, "update");
    }
    if let Some(patch) = patch::resize_patch(&desired, h) {
        // In-place resize: container resources change only through their own subresource. The
        // host may refuse what the virtual cluster accepted (its quota, its limit ranges): the
        // tenant is told, and the host pod keeps running as it is.
        match api.patch_subresource("resize", name, &pp, &Patch::Strategic(&patch)).await {
            Ok(p) => {
                wrote(p);
                ctx.metrics.wrote(KIND, "resize");
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 403 | 422) => {
                let note = format!("the host refused the resize: {}", e.message);
                sync::warn(ctx, v, "ResizeRefused", &note).await;
                carries = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(patch) = patch::ephemeral_patch(&desired, h) {
        // `kubectl debug`: ephemeral containers can only be added, through their subresource.
        wrote(api.patch_subresource("ephemeralcontainers", name, &pp, &Patch::Strategic(&patch)).await?);
        ctx.metrics.wrote(KIND, "ephemeral");
    }
    let gates = status::gates_down(v, h);
    if !gates.is_empty() {
        // Readiness gates: the tenant's conditions go to the host copy, whose kubelet counts them
        // (a strategic merge: the kubelet's own conditions stay).
        sync::spend(ctx, KIND, name)?;
        let patch = Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus { conditions: Some(gates), ..Default::default() }),
            ..Default::default()
        };
        api.patch_status(name, &pp, &Patch::Strategic(&patch)).await?;
        ctx.metrics.wrote(KIND, "gates");
    }
    Ok(carries.then_some(generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_waiting_for_the_host_scheduler_goes_once_the_virtual_one_bound_the_pod() {
        let pod = |node: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({"spec": {"containers": [], "nodeName": node}})).unwrap()
        };
        assert!(unplaced_but_bound(true, &pod(Some("n1")), &pod(None)));
        assert!(!unplaced_but_bound(false, &pod(Some("n1")), &pod(None)), "the host's scheduler places it");
        assert!(!unplaced_but_bound(true, &pod(Some("n1")), &pod(Some("n1"))), "placed");
        assert!(!unplaced_but_bound(true, &pod(None), &pod(None)), "not bound here yet");
    }
}
