//! Services: the host copy and the virtual Service carry the SAME ClusterIP, so pods (which run
//! on the host) reach what the tenant sees. The proxy creates the host copy first when a Service
//! is created through it; otherwise the host copy asks for the virtual IP, and if the host has
//! given that IP away, the virtual Service is recreated with the host's.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::{ANNOTATION_PENDING_SINCE, ANNOTATION_UID, PENDING_UID};
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use crate::context::{Context, Key};
use crate::endpointslices::LABEL_SERVICE_NAME;
use crate::informer::{Change, key_of};
use crate::kind::SyncedKind;
use crate::mirror::meta_differs;
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};

pub use vkube_core::services::{KIND, host_service};

impl SyncedKind for Service {
    const KIND: &'static str = KIND;
    type Virtual = Service;
    type VirtualStored = Service;
    type Host = Service;
    type HostStored = Service;

    /// Its Endpoints follow it, and a selector added or removed changes which of its slices are
    /// the tenant's.
    fn on_virtual_change(c: &Context, s: &Service, _: Change) {
        let (ns, name) = key_of(s);
        c.queues.of::<Service>().add((ns.clone(), name.clone()));
        c.queues.of::<Endpoints>().add((ns.clone(), name.clone()));
        for slice in c.stores.virt::<EndpointSlice>().state() {
            let of_service = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) == Some(&name);
            if of_service && slice.metadata.namespace.as_deref() == Some(ns.as_str()) {
                c.queues.of::<EndpointSlice>().add(key_of(slice.as_ref()));
            }
        }
    }

    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        reconcile(ctx, key)
    }
}

/// How long a host Service marked pending (since [`ANNOTATION_PENDING_SINCE`]) is taken to be
/// still being created rather than an orphan.
pub const PENDING_GRACE: Duration = Duration::from_secs(60);

/// The namespace and name of the virtual cluster's DNS Service.
pub const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

fn cluster_ip(s: &Service) -> Option<&str> {
    s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()).filter(|ip| !ip.is_empty())
}

fn health_check_node_port(s: &Service) -> Option<i32> {
    s.spec.as_ref().and_then(|s| s.health_check_node_port).filter(|p| *p != 0)
}

/// Whether a host copy asks for an address or node port of its own (else the host chooses all).
fn asks_for_ports(s: &Service) -> bool {
    let spec = s.spec.as_ref();
    cluster_ip(s).is_some_and(|ip| ip != "None")
        || health_check_node_port(s).is_some()
        || spec.iter().flat_map(|s| s.ports.iter().flatten()).any(|p| p.node_port.is_some_and(|np| np != 0))
}

/// Whether the managed part of the host copy differs (ClusterIP is immutable and handled apart).
fn differs(desired: &Service, current: &Service) -> bool {
    let (d, c) = (desired.spec.clone().unwrap_or_default(), current.spec.clone().unwrap_or_default());
    let ports = |s: &ServiceSpec| {
        s.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port, p.target_port.clone(), p.protocol.clone()))
            .collect::<Vec<_>>()
    };
    let ports_c =
        ports(&c).into_iter().map(|(n, port, t, proto)| (n, port, t, proto.or(Some("TCP".into())))).collect::<Vec<_>>();
    let ports_d =
        ports(&d).into_iter().map(|(n, port, t, proto)| (n, port, t, proto.or(Some("TCP".into())))).collect::<Vec<_>>();
    meta_differs(desired, current)
        || d.selector != c.selector
        || ports_d.len() != ports_c.len()
        || ports_d
            .iter()
            .zip(&ports_c)
            .any(|(a, b)| a.0 != b.0 || a.1 != b.1 || a.3 != b.3 || (a.2.is_some() && a.2 != b.2))
        || d.type_.as_deref().unwrap_or("ClusterIP") != c.type_.as_deref().unwrap_or("ClusterIP")
        || (d.external_traffic_policy.is_some() && d.external_traffic_policy != c.external_traffic_policy)
}

/// Whether a pending host copy is still within its creation window.
pub fn pending_fresh(h: &Service) -> bool {
    let ann = h.metadata.annotations.as_ref();
    if ann.and_then(|a| a.get(ANNOTATION_UID)).map(String::as_str) != Some(PENDING_UID) {
        return false;
    }
    ann.and_then(|a| a.get(ANNOTATION_PENDING_SINCE))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .is_some_and(|since| {
            k8s_openapi::jiff::Timestamp::now().duration_since(since).as_secs() < PENDING_GRACE.as_secs() as i64
        })
}

pub async fn reconcile(ctx: &Context, (ns, name): Key) -> Result<Action> {
    if (ns.as_str(), name.as_str()) == ("default", "kubernetes") {
        return api_service(ctx).await;
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
    let desired = match host_service(&ctx.tr, &ctx.policy, &v) {
        Ok(d) => d,
        Err(r) => {
            if let HostCopy::Ours(h) | HostCopy::Stale(h) = sync::classify(ctx, h, KIND, &ns, &name, &uid) {
                sync::delete_host(ctx, KIND, h.as_ref(), None).await?;
            }
            sync::refuse(ctx, KIND, v.as_ref(), &r).await;
            return Ok(Action::Done);
        }
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
            // Neither can change on the virtual side: a virtual Service whose address, or whose
            // health-check node port (both set), differs from its host copy's is recreated.
            let (hc_host, hc_virtual) = (health_check_node_port(&h), health_check_node_port(&v));
            if cluster_ip(&h) != cluster_ip(&v) || (hc_host.is_some() && hc_virtual.is_some() && hc_host != hc_virtual)
            {
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
            report_back(ctx, &v, &h).await?;
            if (ns.as_str(), name.as_str()) == DNS_SERVICE {
                *ctx.dns_ip.write().unwrap_or_else(|e| e.into_inner()) = cluster_ip(&h).map(str::to_string);
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
        Ok(()) => Ok(Action::Done),
        // The virtual IP or a node port is taken (or not valid) on the host: let the host
        // choose, then the virtual Service follows it.
        Err(sync::SyncError::HostRefused { code: 422, message, .. }) if asks_for_ports(&desired) => {
            tracing::info!(service = ?desired.metadata.name, reason = %message, "virtual ClusterIP or node port not available on the host; taking the host's");
            // A node port in the way keeps the address (the virtual Service need not be recreated).
            let retry = if message.contains("odePort") { ports_to_host(desired) } else { host_chooses(desired) };
            sync::or_told(ctx, KIND, v, sync::create_host(ctx, KIND, &retry).await).await
        }
        Err(e) => sync::or_told(ctx, KIND, v, Err(e)).await,
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
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_UID: uid, ANNOTATION_PENDING_SINCE: null}}});
    api.patch(h.metadata.name.as_deref().unwrap_or_default(), &sync::patch_params(), &Patch::Merge(patch)).await?;
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
    let patch =
        serde_json::json!({"metadata": {"annotations": {ANNOTATION_UID: PENDING_UID, ANNOTATION_PENDING_SINCE: now}}});
    api.patch(host_name, &sync::patch_params(), &Patch::Merge(patch)).await?;
    Ok(())
}

/// Node ports and load-balancer addresses come from the host.
async fn report_back(ctx: &Context, v: &Service, h: &Service) -> Result<()> {
    let vapi: Api<Service> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    let name = v.metadata.name.as_deref().unwrap_or_default();
    let host_ports: BTreeMap<(i32, String), i32> = h
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| p.node_port.map(|np| ((p.port, p.protocol.clone().unwrap_or("TCP".into())), np)))
        .collect();
    if !host_ports.is_empty()
        && let Some(vs) = v.spec.as_ref()
    {
        let mut ports = vs.ports.clone().unwrap_or_default();
        let mut changed = false;
        for p in ports.iter_mut() {
            let want = host_ports.get(&(p.port, p.protocol.clone().unwrap_or("TCP".into()))).copied();
            if want.is_some() && p.node_port != want {
                p.node_port = want;
                changed = true;
            }
        }
        if changed {
            // A JSON merge patch replaces the list whole: exactly the ports, with host node ports.
            let patch = serde_json::json!({"spec": {"ports": ports}});
            vapi.patch(name, &sync::patch_params(), &Patch::Merge(patch)).await?;
            ctx.metrics.wrote(KIND, "update_virtual");
        }
    }
    let host_lb = h.status.as_ref().and_then(|s| s.load_balancer.clone());
    let virt_lb = v.status.as_ref().and_then(|s| s.load_balancer.clone());
    if host_lb != virt_lb && host_lb.is_some() {
        vapi.patch_status(
            name,
            &sync::patch_params(),
            &Patch::Merge(serde_json::json!({"status": {"loadBalancer": host_lb}})),
        )
        .await?;
        ctx.metrics.wrote(KIND, "status");
    }
    Ok(())
}

/// The virtual `default/kubernetes` Service must carry the ClusterIP of the host Service in front
/// of the proxy: in-cluster clients resolving `kubernetes.default` reach the virtual API server.
async fn api_service(ctx: &Context) -> Result<Action> {
    let vapi: Api<Service> = Api::namespaced(ctx.virt.clone(), "default");
    let current = ctx.stores.virt::<Service>().get(&ObjectRef::new("kubernetes").within("default"));
    let want = ctx.opts.api_ip.as_str();
    let Some(current) = current else {
        // The API server recreates it within seconds; then we fix its IP.
        return Ok(Action::RequeueAfter(Duration::from_secs(2)));
    };
    if cluster_ip(&current) == Some(want) {
        return Ok(Action::Done);
    }
    let mut next = Service { metadata: current.metadata.clone(), spec: current.spec.clone(), status: None };
    next.metadata.uid = None;
    next.metadata.resource_version = None;
    next.metadata.creation_timestamp = None;
    next.metadata.managed_fields = None;
    if let Some(s) = next.spec.as_mut() {
        s.cluster_ip = Some(want.to_string());
        s.cluster_ips = Some(vec![want.to_string()]);
    }
    delete_exactly(&vapi, &current.metadata, None, Exactly::Object).await?;
    match vapi.create(&sync::post_params(), &next).await {
        Ok(_) => ctx.metrics.wrote(KIND, "api_service"),
        // The API server recreated it first: try again.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 422 => {
            return Ok(Action::RequeueAfter(Duration::from_millis(500)));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Action::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::Translator;
    use crate::policy::Policy;

    #[test]
    fn differences_that_matter() {
        let tr = Translator::new("vc", "host-ns");
        let v: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}))
        .unwrap();
        let d = host_service(&tr, &Policy::default(), &v).unwrap();
        let mut current = d.clone();
        current.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.9".into());
        current.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("TCP".into());
        assert!(!differs(&d, &current), "host defaults are not differences");
        current.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
        assert!(differs(&d, &current));
    }
}
