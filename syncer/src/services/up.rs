//! The upward path of a Service (host → virtual): what the host allocated for the host copy
//! (its node ports, load-balancer status) shown on the virtual Service, the DNS Service's address
//! told to the pods' path, and the virtual `default/kubernetes` kept on the proxy's address, its
//! Endpoints on the proxy's host endpoints. An address that differs is the downward path's to
//! follow (it recreates the virtual Service).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use super::{DNS_SERVICE, KIND, cluster_ip};
use crate::context::{Context, Key};
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};

pub async fn reflect(ctx: &Context, (ns, name): Key) -> Result<Action> {
    if (ns.as_str(), name.as_str()) == super::API_SERVICE {
        return api_service(ctx).await;
    }
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<Service>().get(&ObjectRef::new(&name).within(&ns));
    let h = sync::host_get(ctx.stores.host::<Service>(), ctx, &host_name);
    let uid = v.as_ref().and_then(|v| v.metadata.uid.clone()).unwrap_or_default();
    let (Some(v), HostCopy::Ours(h)) = (v, sync::classify(ctx, h, KIND, &ns, &name, &uid)) else {
        // A copy gone, left behind, pending adoption or never made: the downward path deals with it.
        ctx.queues.of::<Service>().add((ns, name));
        return Ok(Action::Done);
    };
    if v.metadata.deletion_timestamp.is_some() {
        return Ok(Action::Done);
    }
    if super::allocation_differs(&v, &h) {
        // The virtual Service is recreated with the host's allocation: the downward path does it,
        // so the deletion's own event is handled after it, not alongside.
        ctx.queues.of::<Service>().add((ns, name));
        return Ok(Action::Done);
    }
    report_back(ctx, &v, &h).await?;
    if (ns.as_str(), name.as_str()) == DNS_SERVICE {
        *ctx.dns_ip.write().unwrap_or_else(|e| e.into_inner()) = cluster_ip(&h).map(str::to_string);
    }
    // A host change may also be a drift of the copy (edited on the host): the downward path
    // compares it (a Service's translation is cheap, and host changes of Services are rare).
    ctx.queues.of::<Service>().add((ns, name));
    Ok(Action::Done)
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
            let patch =
                Service { spec: Some(ServiceSpec { ports: Some(ports), ..Default::default() }), ..Default::default() };
            vapi.patch(name, &sync::patch_params(), &Patch::Merge(&patch)).await?;
            ctx.metrics.wrote(KIND, "update_virtual");
        }
    }
    let host_lb = h.status.as_ref().and_then(|s| s.load_balancer.clone());
    let virt_lb = v.status.as_ref().and_then(|s| s.load_balancer.clone());
    if host_lb != virt_lb && host_lb.is_some() {
        let patch = Service {
            status: Some(ServiceStatus { load_balancer: host_lb, ..Default::default() }),
            ..Default::default()
        };
        vapi.patch_status(name, &sync::patch_params(), &Patch::Merge(&patch)).await?;
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
        return api_endpoints(ctx).await;
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
    api_endpoints(ctx).await
}

/// The virtual `default/kubernetes` Endpoints, as a cluster's API servers publish themselves:
/// where the API is served, the addresses and port of the host Service in front of the proxy
/// (its API server publishes none: `--endpoint-reconciler-type=none`). The virtual controller
/// manager mirrors them into an EndpointSlice.
async fn api_endpoints(ctx: &Context) -> Result<Action> {
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let Some(proxy) = &ctx.opts.proxy_service else { return Ok(Action::Done) };
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let lp = kube::api::ListParams::default().labels(&format!("kubernetes.io/service-name={proxy}"));
    let (mut ready, mut not_ready, mut port) = (BTreeSet::new(), BTreeSet::new(), None);
    let slices = slices.list(&lp).await?.items;
    if slices.is_empty() {
        // A host whose pods cannot reach the proxy (simulated nodes) has none: looked at again
        // at the next resync.
        return Ok(Action::Done);
    }
    for s in slices.into_iter().filter(|s| s.address_type == "IPv4") {
        for e in s.endpoints.into_iter().flatten() {
            let is_ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            (if is_ready { &mut ready } else { &mut not_ready }).extend(e.addresses);
        }
        port = port.or(s.ports.iter().flatten().find_map(|p| p.port));
    }
    // The proxy's pod not ready yet (vkube starts in it) or its slice not filled yet: shown as it
    // is, and looked at again in a while.
    let again = if ready.is_empty() || !not_ready.is_empty() {
        Action::RequeueAfter(Duration::from_secs(30))
    } else {
        Action::Done
    };
    let Some(port) = port.filter(|_| !ready.is_empty() || !not_ready.is_empty()) else { return Ok(again) };
    let addresses =
        |ips: BTreeSet<String>| Some(ips.into_iter().map(|ip| EndpointAddress { ip, ..Default::default() }).collect());
    let subsets = vec![EndpointSubset {
        addresses: addresses(ready),
        not_ready_addresses: addresses(not_ready),
        ports: Some(vec![EndpointPort {
            name: Some("https".into()),
            port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }];
    let current = ctx.stores.virt::<Endpoints>().get(&ObjectRef::new("kubernetes").within("default"));
    let have = current.as_ref().and_then(|c| c.subsets.as_deref());
    if crate::endpoints::canonical(have) == crate::endpoints::canonical(Some(&subsets)) {
        return Ok(again);
    }
    let desired = Endpoints {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("kubernetes".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        subsets: Some(subsets),
    };
    let api: Api<Endpoints> = Api::namespaced(ctx.virt.clone(), "default");
    api.patch("kubernetes", &kube::api::PatchParams::apply(crate::FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await?;
    ctx.metrics.wrote(KIND, "api_endpoints");
    Ok(again)
}
