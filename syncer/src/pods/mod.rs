//! Pods: the virtual pod runs as its host copy; scheduling, status and deletion flow back.
//!
//! The syncer plays the kubelet's part for the virtual cluster: it binds virtual pods to the node
//! their host copy landed on, reports their status, and finalizes their deletion once the host
//! copy is gone (with the grace period the tenant asked for).

pub mod status;
pub mod translate;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use crate::compact::Compact;
use crate::context::{Context, Key};
use crate::informer::{Change, key_of};
use crate::kind::SyncedKind;
use crate::queue::Action;
use crate::refs::{self, RefKind};
use crate::sync::{self, HostCopy, Result};
use translate::PodEnv;

pub const KIND: &str = "Pod";

impl SyncedKind for Pod {
    const KIND: &'static str = KIND;
    type Virtual = Pod;
    type VirtualStored = Compact<Pod>;
    type Host = Pod;
    type HostStored = Compact<Pod>;
    const SLIM_HOST: Option<fn(&mut Pod)> = Some(slim_host_pod);

    /// What a pod uses (configmaps, secrets, claims, its node) is synced while it is used, if
    /// the pod itself may reach the host, and its token Secrets go with it.
    fn on_virtual_change(c: &Context, p: &Pod, change: Change) {
        let (ns, name) = key_of(p);
        let changed = match change {
            Change::Deleted => {
                for (secret, _) in translate::token_secrets(&c.tr, p) {
                    c.queues.tokens.add(secret);
                }
                if !crate::trust_bundles::projections(p).is_empty() {
                    c.queues.tokens.add(crate::trust_bundles::secret_name(&c.tr, &ns, &name));
                }
                c.refs.remove(&ns, &name)
            }
            // A pod the policy refuses never reaches the host: neither does what it refers to.
            Change::Applied | Change::Listed => {
                let allowed =
                    p.spec.as_ref().is_some_and(|s| c.policy.check_pod(p.metadata.annotations.as_ref(), s).is_ok());
                c.refs.update(&ns, &name, if allowed { refs::pod_refs(p) } else { Default::default() })
            }
        };
        for (kind, tns, tname) in changed {
            match kind {
                RefKind::ConfigMap => c.queues.of::<k8s_openapi::api::core::v1::ConfigMap>().add((tns, tname)),
                RefKind::Secret => c.queues.of::<k8s_openapi::api::core::v1::Secret>().add((tns, tname)),
                RefKind::PersistentVolumeClaim => {
                    c.queues.of::<k8s_openapi::api::core::v1::PersistentVolumeClaim>().add((tns, tname))
                }
                RefKind::Node => c.queues.nodes.add(tname),
            }
        }
        c.queues.of::<Pod>().add((ns, name));
    }

    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        reconcile(ctx, key)
    }
}

pub async fn reconcile(ctx: &Context, (ns, name): Key) -> Result<Action> {
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<Pod>().get(&ObjectRef::new(&name).within(&ns)).map(|p| Arc::new(p.load()));
    let h = sync::host_get(ctx.stores.host::<Pod>(), ctx, &host_name).map(|p| Arc::new(p.load()));

    let Some(v) = v else {
        // The virtual pod is gone (force-deleted, or while we were down): so goes its copy.
        if let Some(h) = h
            && sync::mirrors(ctx, h.as_ref(), KIND, &ns, &name).is_some()
            && h.metadata.deletion_timestamp.is_none()
        {
            sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
        }
        return Ok(Action::Done);
    };
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let copy = sync::classify(ctx, h, KIND, &ns, &name, &uid);

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
            _ => finalize_virtual(ctx, &v).await,
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
        HostCopy::Absent => create(ctx, &v).await,
        HostCopy::Ours(h) => {
            if h.metadata.deletion_timestamp.is_some() {
                // Evicted or deleted on the host: the virtual pod follows once the copy is gone.
                return Ok(Action::Done);
            }
            let host_current = !update_host(ctx, &v, &h).await?;
            if bind(ctx, &v, &h).await? {
                // The binding changes the virtual pod; its watch event brings us back to compare
                // the status with the fresh object.
                return Ok(Action::Done);
            }
            report_status(ctx, &v, &h, host_current).await?;
            Ok(Action::Done)
        }
    }
}

async fn create(ctx: &Context, v: &Pod) -> Result<Action> {
    if ran_on_host(v) && !ctx.opts.recreate_lost_pods {
        // Its host copy ran and is gone (evicted, deleted on the host, lost while we were down):
        // the virtual pod goes too and its controller makes a new one, as on a real node loss.
        return finalize_virtual(ctx, v).await;
    }
    let Some(dns_ip) = ctx.dns_ip() else {
        // Pods are told the virtual DNS address; it exists moments after start.
        return Ok(Action::RequeueAfter(Duration::from_millis(500)));
    };
    let links = service_links_for(ctx, v);
    let namespaces = ctx.namespace_labels();
    let nodes = if pins_nodes(v) { pod_nodes(ctx) } else { Default::default() };
    let known_node = |n: &str| nodes.contains(n);
    let desired = match translate::host_pod(&pod_env(ctx, &dns_ip, &links, &namespaces, &known_node), v) {
        Ok(t) => {
            if !t.dropped.is_empty() {
                let note = format!(
                    "not carried to the host (the platform admin decides where pods run): {}",
                    t.dropped.join("; ")
                );
                sync::warn(ctx, v, "SchedulingDropped", &note).await;
            }
            t.pod
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
    for (secret, audience) in translate::token_secrets(&ctx.tr, v) {
        let ensured = crate::tokens::ensure(ctx, v, &secret, audience.as_deref()).await;
        if let Some(later) = held_by_another(ctx, v, &secret, "service-account token", ensured).await? {
            return Ok(later);
        }
    }
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let secret = crate::trust_bundles::secret_name(&ctx.tr, ns, v.metadata.name.as_deref().unwrap_or_default());
    let ensured = crate::trust_bundles::ensure(ctx, v).await;
    if let Some(later) = held_by_another(ctx, v, &secret, "projected trust bundles", ensured).await? {
        return Ok(later);
    }
    sync::or_told(ctx, KIND, v, sync::create_host(ctx, KIND, &desired).await).await
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
    known_node: &'a (dyn Fn(&str) -> bool + Sync),
) -> PodEnv<'a> {
    PodEnv {
        translator: &ctx.tr,
        policy: &ctx.policy,
        api_ip: &ctx.opts.api_ip,
        dns_ip,
        cluster_domain: &ctx.opts.cluster_domain,
        service_links,
        namespaces,
        known_node,
    }
}

/// Whether the pod names host nodes (its node, or nodes in its affinity's fields).
fn pins_nodes(v: &Pod) -> bool {
    let Some(spec) = v.spec.as_ref() else { return false };
    spec.node_name.is_some() || spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref()).is_some()
}

/// The host nodes this cluster's pods run on, as the host says (not the virtual nodes, which the
/// tenant can create at will), and with `--sync-all-nodes` those the admin's selector allows.
fn pod_nodes(ctx: &Context) -> std::collections::BTreeSet<String> {
    let mut nodes: std::collections::BTreeSet<String> =
        ctx.stores.host::<Pod>().state().iter().filter_map(|p| p.load().spec.and_then(|s| s.node_name)).collect();
    nodes.extend(ctx.host_nodes.read().unwrap_or_else(|e| e.into_inner()).iter().cloned());
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

/// Whether the virtual pod has run on the host: only its host copy's status gives it a host IP.
fn ran_on_host(v: &Pod) -> bool {
    v.status.as_ref().and_then(|s| s.host_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
}

/// Deletes the virtual pod for good (grace 0), as a kubelet confirms a pod has stopped.
async fn finalize_virtual(ctx: &Context, v: &Pod) -> Result<Action> {
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    if delete_exactly(&api, &v.metadata, Some(0), Exactly::Object).await? {
        ctx.metrics.wrote(KIND, "finalize");
    }
    Ok(Action::Done)
}

/// Spec changes Kubernetes allows after creation (images, deadlines, tolerations, scheduling
/// gates) and label or annotation changes, carried to the host copy; says whether the copy in
/// hand may not carry the virtual spec (just written, refused, or not compared yet).
async fn update_host(ctx: &Context, v: &Pod, h: &Pod) -> Result<bool> {
    let Some(dns_ip) = ctx.dns_ip() else { return Ok(true) };
    // Environment variables and affinity cannot change after creation: no service links or
    // namespace labels to gather here (this runs for every pod at every resync).
    // Node affinity cannot change either: no nodes to look up (what is dropped was told at creation).
    let mut desired = match translate::host_pod(&pod_env(ctx, &dns_ip, &[], &[], &|_| false), v) {
        Ok(t) => t.pod,
        // Something added since creation (an ephemeral container) breaks the policy: it stays
        // off the host, and the tenant is told.
        Err(r) => {
            sync::refuse(ctx, KIND, v, &r).await;
            return Ok(true);
        }
    };
    let mut behind = false;
    // What the host's own machinery added stays (no fight with its webhooks and controllers).
    ctx.tr.keep_host_keys(&mut desired.metadata, &h.metadata);
    let api: Api<Pod> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let pp = sync::patch_params();
    let name = h.metadata.name.as_deref().unwrap_or_default();
    if let Some(patch) = host_pod_patch(&desired, h) {
        sync::spend(ctx, KIND, name)?;
        api.patch(name, &pp, &Patch::Strategic(patch)).await?;
        ctx.metrics.wrote(KIND, "update");
        behind = true;
    }
    if let Some(patch) = resize_patch(&desired, h) {
        // In-place resize: container resources change only through their own subresource. The
        // host may refuse what the virtual cluster accepted (its quota, its limit ranges): the
        // tenant is told, and the host pod keeps running as it is.
        match api.patch_subresource("resize", name, &pp, &Patch::Strategic(patch)).await {
            Ok(_) => {
                ctx.metrics.wrote(KIND, "resize");
                behind = true;
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 403 | 422) => {
                let note = format!("the host refused the resize: {}", e.message);
                sync::warn(ctx, v, "ResizeRefused", &note).await;
                behind = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(added) = new_ephemeral_containers(&desired, h) {
        // `kubectl debug`: ephemeral containers can only be added, through their subresource.
        let patch = serde_json::json!({"spec": {"ephemeralContainers": added}});
        api.patch_subresource("ephemeralcontainers", name, &pp, &Patch::Strategic(patch)).await?;
        ctx.metrics.wrote(KIND, "ephemeral");
        behind = true;
    }
    let gates = status::gates_down(v, h);
    if !gates.is_empty() {
        // Readiness gates: the tenant's conditions go to the host copy, whose kubelet counts them
        // (a strategic merge: the kubelet's own conditions stay).
        sync::spend(ctx, KIND, name)?;
        let patch = serde_json::json!({"status": {"conditions": gates}});
        api.patch_status(name, &pp, &Patch::Strategic(patch)).await?;
        ctx.metrics.wrote(KIND, "gates");
    }
    Ok(behind)
}

/// A patch of the `resize` subresource giving the host pod's containers the resources of
/// `desired`'s, if any differ (pure). Requests and limits that are gone are removed.
pub fn resize_patch(desired: &Pod, current: &Pod) -> Option<serde_json::Value> {
    use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
    use serde_json::{Map, Value, json};
    let quantities = |want: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
                      have: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| {
        let (want, have) = (want.clone().unwrap_or_default(), have.clone().unwrap_or_default());
        let mut m: Map<String, Value> = want.iter().map(|(k, q)| (k.clone(), json!(q.0))).collect();
        m.extend(have.keys().filter(|k| !want.contains_key(*k)).map(|k| (k.clone(), Value::Null)));
        Value::Object(m)
    };
    let changed = |want: &[Container], have: &[Container]| -> Vec<Value> {
        want.iter()
            .filter_map(|d| {
                let c = have.iter().find(|c| c.name == d.name)?;
                let (dr, cr) = (d.resources.clone().unwrap_or_default(), c.resources.clone().unwrap_or_default());
                let same = |r: &ResourceRequirements| {
                    (r.requests.clone().unwrap_or_default(), r.limits.clone().unwrap_or_default())
                };
                (same(&dr) != same(&cr)).then(|| {
                    json!({"name": d.name, "resources": {
                        "requests": quantities(&dr.requests, &cr.requests),
                        "limits": quantities(&dr.limits, &cr.limits),
                    }})
                })
            })
            .collect()
    };
    let (ds, cs) = (desired.spec.clone().unwrap_or_default(), current.spec.clone().unwrap_or_default());
    let mut spec = Map::new();
    let containers = changed(&ds.containers, &cs.containers);
    if !containers.is_empty() {
        spec.insert("containers".into(), Value::Array(containers));
    }
    // Sidecars (init containers that keep running) can be resized too.
    let init =
        changed(ds.init_containers.as_deref().unwrap_or_default(), cs.init_containers.as_deref().unwrap_or_default());
    if !init.is_empty() {
        spec.insert("initContainers".into(), Value::Array(init));
    }
    (!spec.is_empty()).then(|| json!({"spec": spec}))
}

/// The desired ephemeral containers the host pod does not have yet (pure).
pub fn new_ephemeral_containers(
    desired: &Pod,
    current: &Pod,
) -> Option<Vec<k8s_openapi::api::core::v1::EphemeralContainer>> {
    let have: Vec<&str> =
        current.spec.iter().flat_map(|s| s.ephemeral_containers.iter().flatten()).map(|c| c.name.as_str()).collect();
    let added: Vec<_> = desired
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| !have.contains(&c.name.as_str()))
        .cloned()
        .collect();
    (!added.is_empty()).then_some(added)
}

/// The fields of a host pod the syncer keeps in memory (the rest of the spec is the virtual
/// pod's, translated, and never needed again): metadata, the node, container names, images and resources,
/// the fields that may change after creation, and the status. Applied to the host pod watch.
pub fn slim_host_pod(p: &mut Pod) {
    if let Some(spec) = p.spec.take() {
        let slim = |c: &k8s_openapi::api::core::v1::Container| k8s_openapi::api::core::v1::Container {
            name: c.name.clone(),
            image: c.image.clone(),
            resources: c.resources.clone(),
            ..Default::default()
        };
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            containers: spec.containers.iter().map(slim).collect(),
            init_containers: spec.init_containers.map(|cs| cs.iter().map(slim).collect()),
            active_deadline_seconds: spec.active_deadline_seconds,
            tolerations: spec.tolerations,
            scheduling_gates: spec.scheduling_gates,
            ephemeral_containers: spec.ephemeral_containers.map(|cs| {
                cs.into_iter()
                    .map(|c| k8s_openapi::api::core::v1::EphemeralContainer { name: c.name, ..Default::default() })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

/// A strategic-merge patch that gives the host pod the mutable fields of `desired` (images,
/// deadline, tolerations, scheduling gates, labels, annotations), if any differ (pure).
pub fn host_pod_patch(desired: &Pod, current: &Pod) -> Option<serde_json::Value> {
    use serde_json::{Map, Value, json};
    let mut meta = Map::new();
    for (field, want, have) in [
        ("labels", &desired.metadata.labels, &current.metadata.labels),
        ("annotations", &desired.metadata.annotations, &current.metadata.annotations),
    ] {
        let (want, have) = (want.clone().unwrap_or_default(), have.clone().unwrap_or_default());
        if want != have {
            let mut m: Map<String, Value> = want.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            for gone in have.keys().filter(|k| !want.contains_key(*k)) {
                m.insert(gone.clone(), Value::Null);
            }
            meta.insert(field.into(), Value::Object(m));
        }
    }
    let mut spec = Map::new();
    let (ds, cs) = (desired.spec.clone().unwrap_or_default(), current.spec.clone().unwrap_or_default());
    let images = |want: &[k8s_openapi::api::core::v1::Container], have: &[k8s_openapi::api::core::v1::Container]| {
        let changed: Vec<Value> = want
            .iter()
            .filter(|d| have.iter().find(|c| c.name == d.name).is_some_and(|c| c.image != d.image))
            .map(|d| json!({"name": d.name, "image": d.image}))
            .collect();
        (!changed.is_empty()).then_some(Value::Array(changed))
    };
    if let Some(v) = images(&ds.containers, &cs.containers) {
        spec.insert("containers".into(), v);
    }
    if let Some(v) =
        images(ds.init_containers.as_deref().unwrap_or_default(), cs.init_containers.as_deref().unwrap_or_default())
    {
        spec.insert("initContainers".into(), v);
    }
    if ds.active_deadline_seconds != cs.active_deadline_seconds {
        spec.insert("activeDeadlineSeconds".into(), json!(ds.active_deadline_seconds));
    }
    // Tolerations can only be added (the host refuses a removal, and its own admission may have
    // added some): send the current list plus what is missing, if anything is.
    let have = cs.tolerations.clone().unwrap_or_default();
    let missing: Vec<_> = ds.tolerations.iter().flatten().filter(|t| !have.contains(t)).cloned().collect();
    if !missing.is_empty() {
        spec.insert("tolerations".into(), json!(have.into_iter().chain(missing).collect::<Vec<_>>()));
    }
    let gates = |g: &Option<Vec<k8s_openapi::api::core::v1::PodSchedulingGate>>| {
        g.iter().flatten().map(|g| g.name.clone()).collect::<Vec<_>>()
    };
    if gates(&ds.scheduling_gates) != gates(&cs.scheduling_gates) {
        // The list merges by name: replace it whole, so removed gates go.
        let mut list = vec![json!({"$patch": "replace"})];
        list.extend(gates(&ds.scheduling_gates).into_iter().map(|n| json!({"name": n})));
        spec.insert("schedulingGates".into(), Value::Array(list));
    }
    if meta.is_empty() && spec.is_empty() {
        return None;
    }
    let mut patch = Map::new();
    if !meta.is_empty() {
        patch.insert("metadata".into(), Value::Object(meta));
    }
    if !spec.is_empty() {
        patch.insert("spec".into(), Value::Object(spec));
    }
    Some(Value::Object(patch))
}

/// Binds the virtual pod to the virtual node named like its host copy's node. True if it bound.
async fn bind(ctx: &Context, v: &Pod, h: &Pod) -> Result<bool> {
    let Some(node) = h.spec.as_ref().and_then(|s| s.node_name.clone()) else { return Ok(false) };
    if v.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
        return Ok(false);
    }
    crate::nodes::ensure(ctx, &node).await?;
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    let name = v.metadata.name.as_deref().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..Default::default() },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), ns);
    match api.create_subresource::<Binding, serde_json::Value>("binding", name, &sync::post_params(), &binding).await {
        Ok(_) => ctx.metrics.wrote(KIND, "bind"),
        // Already bound (our own earlier attempt).
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(true)
}

async fn report_status(ctx: &Context, v: &Pod, h: &Pod, host_current: bool) -> Result<()> {
    let desired = status::virtual_status(h, v, host_current);
    if !status::differs(v.status.as_ref(), &desired) {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let mut patch = serde_json::json!({ "status": desired });
    if !status::gate_types(v).is_empty() {
        // The whole condition list is replaced: a gate condition the tenant set since this pod
        // was read must not be lost (a conflict brings a retry with the fresh pod).
        patch["metadata"] = serde_json::json!({"resourceVersion": v.metadata.resource_version});
    }
    api.patch_status(v.metadata.name.as_deref().unwrap_or_default(), &sync::patch_params(), &Patch::Merge(patch))
        .await?;
    ctx.metrics.wrote(KIND, "status");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn resize_patch_carries_changed_resources_only() {
        let res = |cpu: &str, mem: Option<&str>| {
            let mut requests = serde_json::json!({"cpu": cpu});
            if let Some(m) = mem {
                requests["memory"] = m.into();
            }
            serde_json::json!({"requests": requests, "limits": {"cpu": "1"}})
        };
        let with = |app: serde_json::Value, side: serde_json::Value| {
            pod(serde_json::json!({"spec": {
                "containers": [{"name": "app", "resources": app}, {"name": "other", "resources": res("1", None)}],
                "initContainers": [{"name": "side", "restartPolicy": "Always", "resources": side}]}}))
        };
        let current = with(res("100m", Some("64Mi")), res("10m", None));
        assert_eq!(resize_patch(&current, &current), None);
        let desired = with(res("200m", None), res("20m", None));
        assert_eq!(
            resize_patch(&desired, &current),
            Some(serde_json::json!({"spec": {
                "containers": [{"name": "app", "resources": {"requests": {"cpu": "200m", "memory": null}, "limits": {"cpu": "1"}}}],
                "initContainers": [{"name": "side", "resources": {"requests": {"cpu": "20m"}, "limits": {"cpu": "1"}}}],
            }}))
        );
    }

    #[test]
    fn only_new_ephemeral_containers_are_added() {
        let current =
            pod(serde_json::json!({"spec": {"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "a"}]}}));
        let desired = pod(serde_json::json!({"spec": {"containers": [{"name": "c"}],
            "ephemeralContainers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}}));
        let added = new_ephemeral_containers(&desired, &current).unwrap();
        assert_eq!(added.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
        assert!(new_ephemeral_containers(&current, &current).is_none());
    }

    #[test]
    fn only_mutable_fields_move_and_nothing_moves_when_equal() {
        let full = pod(serde_json::json!({
            "metadata": {"name": "h", "labels": {"a": "1", "old": "x"}, "resourceVersion": "7"},
            "spec": {"nodeName": "n1", "schedulingGates": [{"name": "g1"}, {"name": "g2"}],
                "containers": [{"name": "c", "image": "nginx:1", "env": [{"name": "E", "value": "v"}]}, {"name": "d", "image": "busybox"}]}}));
        let mut current = full.clone();
        slim_host_pod(&mut current);
        assert_eq!(current.spec.as_ref().unwrap().containers[0].env, None, "slimmed");
        assert_eq!(current.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        assert!(host_pod_patch(&full, &current).is_none(), "a slim copy is no difference");

        let mut desired = full.clone();
        desired.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        desired.spec.as_mut().unwrap().scheduling_gates =
            Some(vec![serde_json::from_value(serde_json::json!({"name": "g2"})).unwrap()]);
        desired.metadata.labels = Some([("a".to_string(), "2".to_string())].into());
        let patch = host_pod_patch(&desired, &current).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({
                "metadata": {"labels": {"a": "2", "old": null}},
                "spec": {"containers": [{"name": "c", "image": "nginx:2"}],
                    "schedulingGates": [{"$patch": "replace"}, {"name": "g2"}]}})
        );
    }

    #[test]
    fn tolerations_are_only_ever_added() {
        let t = |key: &str| serde_json::json!({"key": key, "operator": "Exists"});
        let with = |keys: &[&str]| {
            pod(
                serde_json::json!({"spec": {"containers": [{"name": "c"}], "tolerations": keys.iter().map(|k| t(k)).collect::<Vec<_>>()}}),
            )
        };
        // The host's admission added one (a runtime class's): nothing to send.
        assert!(host_pod_patch(&with(&["a"]), &with(&["a", "host-added"])).is_none());
        // A new one: the host's list plus it, never a list without the host's.
        let patch = host_pod_patch(&with(&["a", "b"]), &with(&["a", "host-added"])).unwrap();
        assert_eq!(patch["spec"]["tolerations"], serde_json::json!([t("a"), t("host-added"), t("b")]));
    }
}
