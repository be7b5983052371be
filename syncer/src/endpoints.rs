//! Endpoints of selector-less Services: the tenant lists the addresses, so the host needs them
//! too (the host's mirroring controller turns them into EndpointSlices). Services with a
//! selector get their endpoints from the host's own controllers. An address crosses only if it
//! is one of the cluster's pods or in the admin's ranges (`policy::endpoints`).

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::informer::Change;
use crate::mirror::{Mirror, meta_differs};
use crate::policy::Refusal;

impl Mirror for Endpoints {
    const KIND: &'static str = "Endpoints";

    fn wanted(ctx: &Context, v: &Self) -> bool {
        let (ns, name) = crate::informer::key_of(v);
        if ns == "default" && name == "kubernetes" {
            return false;
        }
        let svc: Option<std::sync::Arc<Service>> = ctx.stores.virt::<Service>().get(&ObjectRef::new(&name).within(&ns));
        // (An ExternalName has no selector, and no host Service either.)
        svc.is_some_and(|s| {
            vkube_core::services::has_host_copy(&s)
                && s.spec.as_ref().is_some_and(|sp| sp.selector.as_ref().is_none_or(|m| m.is_empty()))
        })
    }

    /// What it names is kept (`pod_ips`), so that it is looked at again when one of those
    /// addresses becomes or stops being a pod's.
    fn on_virtual_change(ctx: &Context, v: &Self, change: Change) {
        note_and_queue(ctx, v, change, addresses(v));
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        ctx.policy.check_endpoint_addresses(|ip| ctx.pod_ips.contains(ip), addresses(v))?;
        let mut subsets = v.subsets.clone();
        for s in subsets.iter_mut().flatten() {
            for a in s.addresses.iter_mut().flatten().chain(s.not_ready_addresses.iter_mut().flatten()) {
                // References to virtual objects mean nothing on the host.
                a.target_ref = None;
                a.node_name = None;
            }
        }
        Ok(Endpoints { metadata: ctx.tr.host_meta(Self::KIND, &v.metadata), subsets })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        // The host stores subsets repacked (addresses merged by IP, subsets by port set): compare
        // in that form, or a tenant's duplicates would be written back for ever.
        meta_differs(d, c) || canonical(d.subsets.as_deref()) != canonical(c.subsets.as_deref())
    }
}

/// Queues `objects` (Endpoints and EndpointSlices, from `pod_ips`): an address they name became,
/// or stopped being, one of the cluster's pods.
pub fn requeue(ctx: &Context, objects: std::collections::BTreeSet<crate::pod_ips::Naming>) {
    for (kind, key) in objects {
        match kind {
            <Endpoints as Mirror>::KIND => ctx.queues.of::<Endpoints>().add(key),
            _ => ctx.queues.of::<k8s_openapi::api::discovery::v1::EndpointSlice>().add(key),
        }
    }
}

/// Records the addresses a tenant's endpoint object names (`pod_ips`; none once it is deleted),
/// and queues it. Only objects that may cross are kept: the virtual controllers' Endpoints and
/// slices change with every pod of a Service and never reach the host. (One whose Service loses
/// its selector is kept from its next change; its reconcile, which that Service change queues,
/// checks it meanwhile.)
pub fn note_and_queue<'a, M: Mirror>(
    ctx: &Context,
    v: &M,
    change: Change,
    named: impl Iterator<Item = (String, &'a str)>,
) {
    let key = crate::informer::key_of(v);
    let ips = if change == Change::Deleted || !M::wanted(ctx, v) {
        vec![]
    } else {
        named.filter_map(|(_, ip)| vkube_core::policy::endpoints::parse(ip)).collect()
    };
    ctx.pod_ips.named((M::KIND, key.clone()), ips);
    ctx.queues.of::<M>().add(key);
}

/// The addresses an Endpoints names, each with its field.
fn addresses(v: &Endpoints) -> impl Iterator<Item = (String, &str)> {
    v.subsets.iter().flatten().enumerate().flat_map(|(i, s)| {
        let ready = s.addresses.iter().flatten().enumerate().map(move |(j, a)| (i, "addresses", j, a));
        let not_ready =
            s.not_ready_addresses.iter().flatten().enumerate().map(move |(j, a)| (i, "notReadyAddresses", j, a));
        ready.chain(not_ready).map(|(i, list, j, a)| (format!("subsets[{i}].{list}[{j}].ip"), a.ip.as_str()))
    })
}

/// Subsets as the API server repacks them (its `RepackSubsets`), in a fixed order: each address
/// once (by IP: target refs are never copied; ready wins over not ready), grouped with the set
/// of ports it serves (pure).
pub fn canonical(subsets: Option<&[EndpointSubset]>) -> Vec<EndpointSubset> {
    use std::collections::{BTreeMap, BTreeSet};
    // Port (as JSON, sortable) -> IP -> ready; the first address seen for an IP is kept.
    let mut by_port: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    let mut addresses: BTreeMap<String, EndpointAddress> = BTreeMap::new();
    for s in subsets.into_iter().flatten() {
        let ports: Vec<Option<&EndpointPort>> = match s.ports.as_deref() {
            Some(p) if !p.is_empty() => p.iter().map(Some).collect(),
            _ => vec![None],
        };
        for port in ports {
            let key = serde_json::to_string(&port).unwrap_or_default();
            let ips = by_port.entry(key).or_default();
            for (a, ready) in s
                .addresses
                .iter()
                .flatten()
                .map(|a| (a, true))
                .chain(s.not_ready_addresses.iter().flatten().map(|a| (a, false)))
            {
                addresses.entry(a.ip.clone()).or_insert_with(|| a.clone());
                let r = ips.entry(a.ip.clone()).or_insert(ready);
                *r |= ready;
            }
        }
    }
    // Address set -> the ports it serves.
    let mut groups: BTreeMap<Vec<(String, bool)>, BTreeSet<String>> = BTreeMap::new();
    for (port, ips) in by_port {
        groups.entry(ips.into_iter().collect()).or_default().insert(port);
    }
    groups
        .into_iter()
        .map(|(ips, ports)| {
            let pick = |want: bool| -> Option<Vec<EndpointAddress>> {
                let list: Vec<EndpointAddress> =
                    ips.iter().filter(|(_, r)| *r == want).filter_map(|(ip, _)| addresses.get(ip).cloned()).collect();
                (!list.is_empty()).then_some(list)
            };
            let ports: Vec<EndpointPort> = ports.iter().filter_map(|p| serde_json::from_str(p).ok()).collect();
            EndpointSubset {
                addresses: pick(true),
                not_ready_addresses: pick(false),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subsets(json: serde_json::Value) -> Vec<EndpointSubset> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn what_the_host_repacks_compares_equal() {
        // Two target refs behind one IP (the refs are dropped on the way), two subsets with the
        // same ports, an address both ready and not: the host stores one subset, one address.
        let tenant = subsets(serde_json::json!([
            {"addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "TCP"}]},
            {"addresses": [{"ip": "10.0.0.3"}], "notReadyAddresses": [{"ip": "10.0.0.2"}], "ports": [{"port": 80, "protocol": "TCP"}]},
        ]));
        let host = subsets(serde_json::json!([
            {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}], "ports": [{"port": 80, "protocol": "TCP"}]},
        ]));
        assert_eq!(canonical(Some(&tenant)), canonical(Some(&host)));
        let other = subsets(
            serde_json::json!([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "TCP"}]}]),
        );
        assert_ne!(canonical(Some(&tenant)), canonical(Some(&other)), "a real change still differs");
        let split = subsets(serde_json::json!([
            {"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]},
            {"addresses": [{"ip": "10.0.0.2"}], "ports": [{"port": 80, "protocol": "TCP"}]},
        ]));
        assert_eq!(canonical(Some(&split)).len(), 2, "different port sets stay apart");
    }
}
