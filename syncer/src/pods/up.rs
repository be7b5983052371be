//! The upward path of a pod (host → virtual): bound to its host copy's node, its status shown,
//! its deletion finished once the copy is gone, as a kubelet does.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use super::{KIND, status};
use crate::context::{Context, Key};
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};

pub async fn reflect(ctx: &Context, (ns, name): Key) -> Result<Action> {
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<Pod>().get(&ObjectRef::new(&name).within(&ns)).map(|p| Arc::new(p.load()));
    let h = sync::host_get(ctx.stores.host::<Pod>(), ctx, &host_name).map(|p| Arc::new(p.load()));
    let key = (ns, name);
    let uid = v.as_ref().and_then(|v| v.metadata.uid.clone()).unwrap_or_default();
    let (Some(v), HostCopy::Ours(h)) = (v, sync::classify(ctx, h, KIND, &key.0, &key.1, &uid)) else {
        // A copy gone, left behind or never made: the downward path deals with it (a copy lost
        // on the host makes the virtual pod go, as on a node loss).
        ctx.queues.of::<Pod>().add(key);
        return Ok(Action::Done);
    };
    // The host watch shows the copy: should it go, the downward path acts at once.
    ctx.copies_unseen.seen(&uid);
    // Generations are each object's own: the host copy's tells of the virtual pod's only when
    // the downward path knows the copy carries the pod's current spec.
    let carried = ctx
        .carried
        .get(&key)
        .filter(|c| c.generation == v.metadata.generation && h.metadata.generation >= c.host_generation);
    let deleting = v.metadata.deletion_timestamp.is_some();
    if deleting || h.metadata.deletion_timestamp.is_some() {
        // Being deleted here or on the host (evicted, drained): the host kubelet's last words (a
        // terminal phase, exit codes, the host's DisruptionTarget) are shown, as a kubelet reports
        // them before a pod goes; the copy's disappearance brings the downward path to finish it.
        // Not to a pod never bound (it has shown nothing of a node), nor when a lost copy is made
        // again (after a wake: the copy sleep deleted is not the pod's end).
        let bound = v.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        if bound && (deleting || !ctx.opts.recreate_lost_pods) {
            report_status(ctx, &v, &h, carried.is_some()).await?;
        }
        return Ok(Action::Done);
    }
    if bind(ctx, &v, &h).await? {
        // The binding changes the virtual pod; its watch event brings us back to compare the
        // status with the fresh object.
        return Ok(Action::Done);
    }
    // Bound now: with `bound-secret` delivery its tokens can be issued, naming its node (before
    // its status is shown: `v` is still the pod as it was, not started).
    let tokens = crate::tokens::ensure_bound(ctx, &v, &h).await;
    // Shown whatever became of the tokens (a copy that failed must not stay hidden).
    report_status(ctx, &v, &h, carried.is_some()).await?;
    if let Err(e) = tokens {
        let sync::SyncError::Collision(secret) = e else { return Err(e) };
        let msg = format!(
            "the host Secret {secret} that holds this pod's service-account token is not managed by this virtual cluster (made since the pod was created): its token is not written"
        );
        sync::warn(ctx, v.as_ref(), "HostNameConflict", &msg).await;
        return Ok(Action::RequeueAfter(std::time::Duration::from_secs(300)));
    }
    // Bound now: its pod certificates can be asked for, naming its node as a kubelet's do.
    match crate::pod_certificates::ensure(ctx, &v).await {
        Ok(look_again) => Ok(look_again.map_or(Action::Done, Action::RequeueAfter)),
        Err(sync::SyncError::Collision(secret)) => {
            let msg = format!(
                "the host Secret {secret} that holds this pod's certificates is not managed by this virtual cluster (made since the pod started): its certificates are not written or renewed"
            );
            sync::warn(ctx, v.as_ref(), "HostNameConflict", &msg).await;
            Ok(Action::RequeueAfter(std::time::Duration::from_secs(300)))
        }
        Err(e) => Err(e),
    }
}

/// Deletes the virtual pod for good (grace 0), as a kubelet confirms a pod has stopped. A bound
/// pod a finalizer still holds (a Job's tracking) first gets a terminal phase (`status::stopped`,
/// with a DisruptionTarget when the copy was `lost`, not deleted with it): its controller may wait
/// for one before it lets the pod go.
pub(super) async fn finalize(ctx: &Context, v: &Pod, lost: bool) -> Result<Action> {
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let bound = v.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let held = v.metadata.finalizers.as_ref().is_some_and(|f| !f.is_empty());
    if bound
        && held
        && let Some(stopped) = status::stopped(v, lost)
    {
        // A merge patch: lists are replaced whole, each state with them (merged, a running state
        // would stay beside the terminated one). Of the pod as read (a newer status, or a new pod
        // of the same name, is a conflict: looked at again).
        let mut patch = Pod { status: Some(stopped), ..Default::default() };
        patch.metadata.resource_version = v.metadata.resource_version.clone();
        let name = v.metadata.name.as_deref().unwrap_or_default();
        match api.patch_status(name, &sync::patch_params(), &Patch::Merge(&patch)).await {
            Ok(_) => ctx.metrics.wrote(KIND, "status"),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::Done),
            // Changed since it was read: its watch event brings it back.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Action::RequeueAfter(std::time::Duration::from_secs(1)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if delete_exactly(&api, &v.metadata, Some(0), Exactly::Object).await? {
        ctx.metrics.wrote(KIND, "finalize");
    }
    Ok(Action::Done)
}

/// Binds the virtual pod to the virtual node named like its host copy's node. True if it bound.
async fn bind(ctx: &Context, v: &Pod, h: &Pod) -> Result<bool> {
    let Some(node) = h.spec.as_ref().and_then(|s| s.node_name.clone()) else { return Ok(false) };
    if v.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
        ctx.bindings_unseen.seen(v.metadata.uid.as_deref().unwrap_or_default());
        return Ok(false);
    }
    let uid = v.metadata.uid.clone().unwrap_or_default();
    if ctx.bindings_unseen.pending(&uid) {
        // Bound by us already, the virtual pod's watch not showing it yet: that event brings us
        // back (another binding would be refused, 409, a request each; a tenth of a burst's pods).
        return Ok(true);
    }
    // `h`, our host copy, runs there: the host's word for that node.
    crate::nodes::ensure(ctx, &node, true).await?;
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
    ctx.bindings_unseen.sent(uid);
    Ok(true)
}

async fn report_status(ctx: &Context, v: &Pod, h: &Pod, host_current: bool) -> Result<()> {
    let desired = status::virtual_status(h, v, host_current);
    if !status::differs(v.status.as_ref(), &desired) {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let mut patch = Pod { status: Some(desired), ..Default::default() };
    let ending = v.metadata.deletion_timestamp.is_some() || h.metadata.deletion_timestamp.is_some();
    if ending || !status::gate_types(v).is_empty() {
        // The whole condition list is replaced: a gate condition the tenant set since this pod
        // was read must not be lost, nor, once the pod is ending, a DisruptionTarget or the
        // terminal phase `finalize` wrote meanwhile (a conflict brings a retry with the fresh pod).
        patch.metadata.resource_version = v.metadata.resource_version.clone();
    }
    match api
        .patch_status(v.metadata.name.as_deref().unwrap_or_default(), &sync::patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => ctx.metrics.wrote(KIND, "status"),
        // Finalized meanwhile (its copy gone).
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
