//! Events the host records about our host copies (scheduling, image pulls, probes) shown on
//! the virtual objects, with host names translated back.

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::ANNOTATION_EVENTS_MIRRORED_UNTIL;

use crate::context::Context;
use crate::naming::Owner;
use crate::queue::Action;
use crate::sync::Result;

pub const KIND: &str = "Event";

/// When the event last happened.
pub fn last_seen(e: &Event) -> Option<Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Whether a listed event may not have been mirrored yet: newer than the mark (the same second
/// counts as newer, timestamps have second resolution).
pub fn after_mark(ctx: &Context, e: &Event) -> bool {
    let mark = *ctx.events_mark.read().unwrap_or_else(|p| p.into_inner());
    match (mark, last_seen(e)) {
        (Some(m), Some(t)) => t.as_second() >= m.as_second(),
        _ => true,
    }
}

/// Reads the mark at start.
pub async fn load_mark(ctx: &Context) {
    let Some(svc) = &ctx.opts.proxy_service else { return };
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let mark = api
        .get_opt(svc)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.metadata.annotations)
        .and_then(|a| a.get(ANNOTATION_EVENTS_MIRRORED_UNTIL).and_then(|v| v.parse::<Timestamp>().ok()));
    *ctx.events_mark.write().unwrap_or_else(|p| p.into_inner()) = mark;
}

/// Writes the mark down every `every` while it moves.
pub async fn keep_mark(ctx: &Context, every: std::time::Duration) {
    let Some(svc) = &ctx.opts.proxy_service else { return };
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let mut written = *ctx.events_mark.read().unwrap_or_else(|p| p.into_inner());
    loop {
        tokio::time::sleep(every).await;
        let now = *ctx.events_mark.read().unwrap_or_else(|p| p.into_inner());
        if now == written {
            continue;
        }
        let patch = vkube_kubeclient::patch::MetadataPatch::annotations([(
            ANNOTATION_EVENTS_MIRRORED_UNTIL,
            now.map(|t| t.to_string()),
        )]);
        match api.patch(svc, &crate::sync::patch_params(), &Patch::Merge(&patch)).await {
            Ok(_) => written = now,
            Err(e) => tracing::debug!(error = %e, "recording the events mark failed; retrying"),
        }
    }
}

/// The virtual copy of a host event about the host copy of `owner` (pure).
pub fn virtual_event(ctx_host_ns: &str, host: &Event, owner: &Owner) -> Event {
    let host_obj = host.involved_object.name.clone().unwrap_or_default();
    let suffix = host
        .metadata
        .name
        .as_deref()
        .and_then(|n| n.strip_prefix(&format!("{host_obj}.")))
        .map(str::to_string)
        .unwrap_or_else(|| host.metadata.uid.clone().unwrap_or_default());
    let translate = |s: &str| vkube_core::naming::names_back(s, ctx_host_ns, &host_obj, &owner.namespace, &owner.name);
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{suffix}", owner.name)),
            namespace: Some(owner.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: host.involved_object.api_version.clone(),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: Some(owner.namespace.clone()),
            uid: Some(owner.uid.clone()),
            field_path: host.involved_object.field_path.clone(),
            ..Default::default()
        },
        reason: host.reason.clone(),
        // The host scheduler's reasons, without the host's node counts and taints.
        message: match host.reason.as_deref() {
            Some("FailedScheduling") => {
                host.message.as_deref().map(vkube_core::policy::scheduling::host_scheduling_message)
            }
            // The host kubelet's refusals (OutOfcpu and the like), without the node's figures.
            _ => host.message.as_deref().map(|m| vkube_core::policy::scheduling::host_kubelet_message(&translate(m))),
        },
        type_: host.type_.clone(),
        count: host.count,
        first_timestamp: host.first_timestamp.clone(),
        last_timestamp: host.last_timestamp.clone(),
        event_time: host.event_time.clone(),
        series: host.series.clone(),
        action: host.action.clone(),
        source: host.source.clone(),
        reporting_component: host.reporting_component.clone().or_else(|| Some("vkube-syncer".into())),
        reporting_instance: host.reporting_instance.clone(),
        related: None,
    }
}

/// What changes when an event recurs (a merge patch of the mirrored event: each field set, or
/// removed where the host's has none).
#[derive(serde::Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Recurrence<'a> {
    count: Option<i32>,
    last_timestamp: &'a Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    message: &'a Option<String>,
    series: &'a Option<k8s_openapi::api::core::v1::EventSeries>,
}

/// The virtual object a host event is about, if it is about one of our host copies.
fn owner_of(ctx: &Context, e: &Event) -> Option<Owner> {
    let name = e.involved_object.name.as_deref()?;
    let o = &e.involved_object;
    let meta = ctx.stores.kinds.host_meta(o.api_version.as_deref()?, o.kind.as_deref()?, ctx.host_ns(), name)?;
    ctx.tr.owner(&meta)
}

pub async fn reconcile(ctx: &Context, host_event: String) -> Result<Action> {
    let Some(e) = ctx.stores.hevents.get(&ObjectRef::new(&host_event).within(ctx.host_ns())).map(|e| e.load()) else {
        // Expired on the host; the virtual copy expires by its own TTL.
        return Ok(Action::Done);
    };
    let Some(owner) = owner_of(ctx, &e) else { return Ok(Action::Done) };
    let seen = last_seen(&e);
    let desired = virtual_event(ctx.host_ns(), &e, &owner);
    let api: Api<Event> = Api::namespaced(ctx.virt.clone(), &owner.namespace);
    match api.create(&crate::sync::post_params(), &desired).await {
        Ok(_) => ctx.metrics.wrote(KIND, "create"),
        Err(kube::Error::Api(err)) if err.code == 409 => {
            let patch = Recurrence {
                count: desired.count,
                last_timestamp: &desired.last_timestamp,
                message: &desired.message,
                series: &desired.series,
            };
            api.patch(
                desired.metadata.name.as_deref().unwrap_or_default(),
                &crate::sync::patch_params(),
                &Patch::Merge(&patch),
            )
            .await?;
            ctx.metrics.wrote(KIND, "update");
        }
        // The virtual namespace is being deleted: nothing to show the event on.
        Err(kube::Error::Api(err)) if err.code == 403 || err.code == 404 => {}
        Err(err) => return Err(err.into()),
    }
    if let Some(t) = seen {
        let mut mark = ctx.events_mark.write().unwrap_or_else(|p| p.into_inner());
        if mark.is_none_or(|m| t > m) {
            *mark = Some(t);
        }
    }
    Ok(Action::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_host_events_are_translated_back() {
        let host: Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-x-shop-x-vc.187a2b", "namespace": "vkube-vc"},
            "involvedObject": {"kind": "Pod", "name": "web-x-shop-x-vc", "namespace": "vkube-vc", "apiVersion": "v1"},
            "reason": "Scheduled", "type": "Normal", "count": 1,
            "message": "Successfully assigned vkube-vc/web-x-shop-x-vc to kwok-node-0"
        }))
        .unwrap();
        let owner = Owner { kind: "Pod".into(), namespace: "shop".into(), name: "web".into(), uid: "u1".into() };
        let v = virtual_event("vkube-vc", &host, &owner);
        assert_eq!(v.metadata.name.as_deref(), Some("web.187a2b"));
        assert_eq!(v.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(v.message.as_deref(), Some("Successfully assigned shop/web to kwok-node-0"));
        assert_eq!(v.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(v.involved_object.name.as_deref(), Some("web"));
        let failed: Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-x-shop-x-vc.187a2c", "namespace": "vkube-vc"},
            "involvedObject": {"kind": "Pod", "name": "web-x-shop-x-vc", "namespace": "vkube-vc", "apiVersion": "v1"},
            "reason": "FailedScheduling", "type": "Warning",
            "message": "0/4 nodes are available: 4 node(s) had untolerated taint {corp/pool: finance}. preemption: 0/4 nodes are available: 4 Preemption is not helpful for scheduling."
        }))
        .unwrap();
        let v = virtual_event("vkube-vc", &failed, &owner);
        assert_eq!(v.message.as_deref(), Some("0 nodes are available: node(s) had a taint the pod does not tolerate."));
    }
}
