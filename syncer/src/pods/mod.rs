//! Pods: the virtual pod runs as its host copy; scheduling, status and deletion flow back.
//!
//! The syncer plays the kubelet's part for the virtual cluster: it binds virtual pods to the node
//! their host copy landed on, reports their status, and finalizes their deletion once the host
//! copy is gone (with the grace period the tenant asked for).

pub mod status;
pub mod translate;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::ObjectRef;

use crate::context::{Context, Key};
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};
use translate::PodEnv;

pub const KIND: &str = "Pod";

pub async fn reconcile(ctx: &Context, (ns, name): Key) -> Result<Action> {
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.vpods.get(&ObjectRef::new(&name).within(&ns));
    let h = sync::host_get(&ctx.stores.hpods, ctx, &host_name);

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
            update_host(ctx, &v, &h).await?;
            if bind(ctx, &v, &h).await? {
                // The binding changes the virtual pod; its watch event brings us back to compare
                // the status with the fresh object.
                return Ok(Action::Done);
            }
            report_status(ctx, &v, &h).await?;
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
    let env = PodEnv {
        translator: &ctx.tr,
        policy: &ctx.policy,
        api_ip: &ctx.opts.api_ip,
        dns_ip: &dns_ip,
        cluster_domain: &ctx.opts.cluster_domain,
    };
    let desired = match translate::host_pod(&env, v) {
        Ok(p) => p,
        Err(r) => {
            sync::refuse(ctx, KIND, v, &r).await;
            return Ok(Action::Done);
        }
    };
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    let sa = v.spec.as_ref().map(crate::refs::service_account).unwrap_or_else(|| "default".into());
    for (secret, audience) in translate::token_secrets(&ctx.tr, v) {
        let ensured = crate::tokens::ensure(ctx, ns, &sa, &secret, audience.as_deref()).await;
        if let Err(sync::SyncError::Collision(_)) = ensured {
            let msg = format!(
                "the host Secret {}/{secret} that would hold this pod's service-account token exists and is not managed by this virtual cluster; the pod is not started",
                ctx.host_ns()
            );
            sync::warn(ctx, v, "HostNameConflict", &msg).await;
            return Ok(Action::RequeueAfter(Duration::from_secs(300)));
        }
        ensured?;
    }
    sync::or_collision(ctx, v, sync::create_host(ctx, KIND, &desired).await).await
}

/// Whether the virtual pod has run on the host: only its host copy's status gives it a host IP.
fn ran_on_host(v: &Pod) -> bool {
    v.status.as_ref().and_then(|s| s.host_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
}

/// Deletes the virtual pod for good (grace 0), as a kubelet confirms a pod has stopped.
async fn finalize_virtual(ctx: &Context, v: &Pod) -> Result<Action> {
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: v.metadata.uid.clone().map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..Default::default()
    };
    match api.delete(v.metadata.name.as_deref().unwrap_or_default(), &dp).await {
        Ok(_) => ctx.metrics.wrote(KIND, "finalize"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::Done)
}

/// Spec changes Kubernetes allows after creation (images, deadlines, tolerations, scheduling
/// gates) and label or annotation changes, carried to the host copy.
async fn update_host(ctx: &Context, v: &Pod, h: &Pod) -> Result<()> {
    let Some(dns_ip) = ctx.dns_ip() else { return Ok(()) };
    let env = PodEnv {
        translator: &ctx.tr,
        policy: &ctx.policy,
        api_ip: &ctx.opts.api_ip,
        dns_ip: &dns_ip,
        cluster_domain: &ctx.opts.cluster_domain,
    };
    let Ok(desired) = translate::host_pod(&env, v) else { return Ok(()) };
    if let Some(updated) = updated_host_pod(&desired, h) {
        sync::replace_host(ctx, KIND, h, updated).await?;
    }
    Ok(())
}

/// The host pod with the mutable fields of `desired`, if any of them differ (pure).
pub fn updated_host_pod(desired: &Pod, current: &Pod) -> Option<Pod> {
    let mut next = current.clone();
    next.metadata.labels = desired.metadata.labels.clone();
    next.metadata.annotations = desired.metadata.annotations.clone();
    if let (Some(ns), Some(ds)) = (next.spec.as_mut(), desired.spec.as_ref()) {
        for c in ns.containers.iter_mut() {
            if let Some(d) = ds.containers.iter().find(|d| d.name == c.name) {
                c.image = d.image.clone();
            }
        }
        for c in ns.init_containers.iter_mut().flatten() {
            if let Some(d) = ds.init_containers.iter().flatten().find(|d| d.name == c.name) {
                c.image = d.image.clone();
            }
        }
        ns.active_deadline_seconds = ds.active_deadline_seconds;
        ns.tolerations = ds.tolerations.clone();
        ns.scheduling_gates = ds.scheduling_gates.clone();
    }
    let changed = serde_json::to_value(&next.metadata.labels).ok()
        != serde_json::to_value(&current.metadata.labels).ok()
        || next.metadata.annotations != current.metadata.annotations
        || serde_json::to_value(&next.spec).ok() != serde_json::to_value(&current.spec).ok();
    changed.then_some(next)
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
    match api.create_subresource::<Binding, serde_json::Value>("binding", name, &PostParams::default(), &binding).await
    {
        Ok(_) => ctx.metrics.wrote(KIND, "bind"),
        // Already bound (our own earlier attempt).
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(true)
}

async fn report_status(ctx: &Context, v: &Pod, h: &Pod) -> Result<()> {
    let desired = status::virtual_status(h, v);
    if !status::differs(v.status.as_ref(), &desired) {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let patch = serde_json::json!({ "status": desired });
    api.patch_status(v.metadata.name.as_deref().unwrap_or_default(), &PatchParams::default(), &Patch::Merge(patch))
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
    fn only_mutable_fields_move_and_nothing_moves_when_equal() {
        let current = pod(serde_json::json!({
            "metadata": {"name": "h", "labels": {"a": "1"}, "resourceVersion": "7"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx:1"}]}}));
        let mut desired = current.clone();
        desired.metadata.resource_version = None;
        assert!(updated_host_pod(&desired, &current).is_none());

        desired.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        desired.spec.as_mut().unwrap().node_name = None;
        desired.metadata.labels = Some([("a".to_string(), "2".to_string())].into());
        let next = updated_host_pod(&desired, &current).unwrap();
        assert_eq!(next.spec.as_ref().unwrap().containers[0].image.as_deref(), Some("nginx:2"));
        assert_eq!(next.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"), "scheduling is the host's");
        assert_eq!(next.metadata.labels.unwrap()["a"], "2");
        assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
    }
}
