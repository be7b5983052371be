//! The downward path of a Service (virtual → host): its host copy created with the virtual
//! address where the host allows, kept in line, deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::{ANNOTATION_PENDING_SINCE, ANNOTATION_UID, PENDING_UID};
use vkube_kubeclient::delete::{Exactly, delete_exactly};
use vkube_kubeclient::patch::MetadataPatch;

use super::{KIND, PENDING_GRACE, asks_for_ports, cluster_ip, differs, host_service, pending_fresh};
use crate::context::{Context, Key};
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};

pub async fn reconcile(ctx: &Context, (ns, name): Key) -> Result<Action> {
    if (ns.as_str(), name.as_str()) == super::API_SERVICE {
        // Not copied to the host: its address follows the host Service in front of the proxy.
        ctx.queues.upward::<Service>().add((ns, name));
        return Ok(Action::Done);
    }
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<Service>().get(&ObjectRef::new(&name).within(&ns));
    let h = sync::host_get(ctx.stores.host::<Service>(), ctx, &host_name);
    let Some(v) = v.filter(|v| v.metadata.deletion_timestamp.is_none()) else {
        if let Some(h) = h
            && sync::mirrors(ctx, h.as_ref(), KIND, &ns, &name).is_some()
        {
            if pending_fresh(&h) {
                return Ok(Action::RequeueAfter(PENDING_GRACE));
            }
            sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
        }
        return Ok(Action::Done);
    };
    let uid = v.metadata.uid.clone().unwrap_or_default();
    // An ExternalName (made so, or changed to it since), the resource metrics API's: none on the
    // host, and nothing to refuse.
    let desired = match vkube_core::services::has_host_copy(&v).then(|| host_service(&ctx.tr, &ctx.policy, &v)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(r)) => {
            sync::refuse(ctx, KIND, v.as_ref(), &r).await;
            None
        }
    };
    let Some(desired) = desired else {
        if let HostCopy::Ours(h) | HostCopy::Stale(h) = sync::classify(ctx, h, KIND, &ns, &name, &uid) {
            // A copy the proxy has just made for a Service made again under this name, which
            // this store may not show yet: looked at again once it is adopted or left behind.
            if pending_fresh(&h) {
                return Ok(Action::RequeueAfter(PENDING_GRACE));
            }
            sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
        }
        return Ok(Action::Done);
    };
    match sync::classify(ctx, h, KIND, &ns, &name, &uid) {
        HostCopy::Foreign(_) => {
            sync::collision(ctx, v.as_ref(), &host_name).await;
            Ok(Action::RequeueAfter(Duration::from_secs(300)))
        }
        HostCopy::Stale(h) => {
            sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
            Ok(Action::RequeueAfter(Duration::from_millis(500)))
        }
        HostCopy::Absent => create(ctx, &v, desired).await,
        HostCopy::Ours(h) => {
            if h.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_UID)).map(String::as_str)
                == Some(PENDING_UID)
            {
                adopt(ctx, &h, &uid).await?;
            }
            if super::allocation_differs(&v, &h) {
                return follow_host_ip(ctx, &v, &h).await;
            }
            let mut desired = desired;
            ctx.tr.keep_host_keys(&mut desired.metadata, &h.metadata);
            if differs(&desired, &h) {
                let mut next = desired;
                // Keep what the host allocated.
                if let (Some(n), Some(c)) = (next.spec.as_mut(), h.spec.as_ref()) {
                    n.cluster_ip = c.cluster_ip.clone();
                    n.cluster_ips = c.cluster_ips.clone();
                    // The host's health-check node port while the tenant's Service needs one.
                    let local = n.external_traffic_policy.as_deref() == Some("Local")
                        && n.type_.as_deref() == Some("LoadBalancer");
                    n.health_check_node_port = c.health_check_node_port.filter(|_| local);
                    for p in n.ports.iter_mut().flatten() {
                        p.node_port = c
                            .ports
                            .iter()
                            .flatten()
                            .find(|cp| cp.port == p.port && cp.protocol == p.protocol)
                            .and_then(|cp| cp.node_port);
                    }
                }
                sync::replace_host(ctx, KIND, h.as_ref(), next).await?;
            }
            Ok(Action::Done)
        }
    }
}

async fn create(ctx: &Context, v: &Service, desired: Service) -> Result<Action> {
    // A virtual ClusterIP the proxy did not check (a Service made by a PUT, or given its address
    // by a tenant's webhook) is taken on the host only where the policy allows: else the host
    // chooses, the virtual Service follows, and the tenant is told why.
    let spec = desired.spec.as_ref();
    let (ip, ips) = (spec.and_then(|s| s.cluster_ip.as_deref()), spec.and_then(|s| s.cluster_ips.as_deref()));
    if let Err(r) = ctx.policy.check_cluster_ips(ip, ips.unwrap_or_default()) {
        sync::refuse(ctx, KIND, v, &r).await;
        return sync::or_told(ctx, KIND, v, sync::create_host(ctx, KIND, &host_chooses(desired)).await).await;
    }
    match sync::create_host(ctx, KIND, &desired).await {
        Ok(_) => Ok(Action::Done),
        // The virtual IP or a node port is taken (or not valid) on the host: let the host
        // choose, then the virtual Service follows it.
        Err(sync::SyncError::HostRefused { code: 422, message, .. }) if asks_for_ports(&desired) => {
            tracing::info!(service = ?desired.metadata.name, reason = %message, "virtual ClusterIP or node port not available on the host; taking the host's");
            // A node port in the way keeps the address (the virtual Service need not be recreated).
            let retry = if message.contains("odePort") { ports_to_host(desired) } else { host_chooses(desired) };
            sync::or_told(ctx, KIND, v, sync::create_host(ctx, KIND, &retry).await).await
        }
        Err(e) => sync::or_told(ctx, KIND, v, Err::<(), _>(e)).await,
    }
}

/// The host copy with its address and node ports left for the host to choose (headless stays
/// headless).
fn host_chooses(desired: Service) -> Service {
    let mut desired = ports_to_host(desired);
    if let Some(s) = desired.spec.as_mut()
        && s.cluster_ip.as_deref() != Some("None")
    {
        s.cluster_ip = None;
        s.cluster_ips = None;
    }
    desired
}

/// The host copy with its node ports left for the host to choose.
fn ports_to_host(mut desired: Service) -> Service {
    if let Some(s) = desired.spec.as_mut() {
        s.health_check_node_port = None;
        for p in s.ports.iter_mut().flatten() {
            p.node_port = None;
        }
    }
    desired
}

async fn adopt(ctx: &Context, h: &Service, uid: &str) -> Result<()> {
    let api: Api<Service> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let patch = MetadataPatch::annotations([(ANNOTATION_UID, Some(uid)), (ANNOTATION_PENDING_SINCE, None)]);
    api.patch(h.metadata.name.as_deref().unwrap_or_default(), &sync::patch_params(), &Patch::Merge(&patch)).await?;
    ctx.metrics.wrote(KIND, "adopt");
    Ok(())
}

/// Recreates the virtual Service with the host copy's ClusterIP (the only one pods can reach)
/// and node ports.
/// The host copy is marked pending first, so the brief absence of the virtual object is not
/// taken for a deletion.
async fn follow_host_ip(ctx: &Context, v: &Service, h: &Service) -> Result<Action> {
    let (ns, name) =
        (v.metadata.namespace.as_deref().unwrap_or_default(), v.metadata.name.as_deref().unwrap_or_default());
    tracing::info!(namespace = ns, name, virtual_ip = ?cluster_ip(v), host_ip = ?cluster_ip(h), "recreating the virtual Service with the host's ClusterIP");
    mark_pending(ctx, h.metadata.name.as_deref().unwrap_or_default()).await?;
    let vapi: Api<Service> = Api::namespaced(ctx.virt.clone(), ns);
    delete_exactly(&vapi, &v.metadata, None, Exactly::Object).await?;
    let mut next = Service { metadata: v.metadata.clone(), spec: v.spec.clone(), status: None };
    next.metadata.uid = None;
    next.metadata.resource_version = None;
    next.metadata.creation_timestamp = None;
    next.metadata.managed_fields = None;
    if let (Some(s), Some(hs)) = (next.spec.as_mut(), h.spec.as_ref()) {
        s.cluster_ip = hs.cluster_ip.clone();
        s.cluster_ips = hs.cluster_ips.clone();
        s.health_check_node_port = hs.health_check_node_port;
        // The tenant's ports, each with its host copy's node port (matched by port and protocol).
        let proto = |p: &ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        for p in s.ports.iter_mut().flatten() {
            p.node_port =
                hs.ports.iter().flatten().find(|h| h.port == p.port && proto(h) == proto(p)).and_then(|h| h.node_port);
        }
    }
    vapi.create(&sync::post_params(), &next).await?;
    ctx.metrics.wrote(KIND, "recreate_virtual");
    Ok(Action::Done)
}

pub async fn mark_pending(ctx: &Context, host_name: &str) -> Result<()> {
    let api: Api<Service> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = MetadataPatch::annotations([
        (ANNOTATION_UID, Some(PENDING_UID.to_string())),
        (ANNOTATION_PENDING_SINCE, Some(now)),
    ]);
    api.patch(host_name, &sync::patch_params(), &Patch::Merge(&patch)).await?;
    Ok(())
}
