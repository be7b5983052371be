//! EndpointSlices the tenant manages for selector-less Services (the modern form of Endpoints):
//! copied to the host with the Service name translated, so the host's proxies route to them.
//! Slices made by the virtual cluster's own controllers are not copied: the host's controllers
//! make those (from the host Service's selector, or by mirroring the copied Endpoints). Their
//! addresses are held to the same rule as Endpoints' (`policy::endpoints`); FQDN slices (which
//! the host's proxies do not route, and a controller might resolve anywhere) do not cross.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::informer::Change;
use crate::mirror::{Mirror, meta_differs};
use crate::policy::Refusal;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The virtual cluster's own slice controllers.
const CONTROLLERS: [&str; 2] = ["endpointslice-controller.k8s.io", "endpointslicemirroring-controller.k8s.io"];

/// Whether a virtual slice is the tenant's own, for a Service without a selector (pure).
pub fn is_tenant_slice(slice: &EndpointSlice, service: Option<&Service>) -> bool {
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    let managed_by = labels.get(LABEL_MANAGED_BY).map(String::as_str).unwrap_or_default();
    // (An ExternalName has no selector, and no host Service either.)
    let selectorless = service
        .filter(|s| vkube_core::services::has_host_copy(s))
        .and_then(|s| s.spec.as_ref())
        .is_some_and(|sp| sp.selector.as_ref().is_none_or(|m| m.is_empty()));
    labels.contains_key(LABEL_SERVICE_NAME) && !CONTROLLERS.contains(&managed_by) && selectorless
}

impl Mirror for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";

    /// What it names is kept (`pod_ips`), so that it is looked at again when one of those
    /// addresses becomes or stops being a pod's.
    fn on_virtual_change(ctx: &Context, v: &Self, change: Change) {
        crate::endpoints::note_and_queue(ctx, v, change, addresses(v));
    }

    fn wanted(ctx: &Context, v: &Self) -> bool {
        let ns = v.metadata.namespace.clone().unwrap_or_default();
        let svc_name = v.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned().unwrap_or_default();
        let svc = ctx.stores.virt::<k8s_openapi::api::core::v1::Service>().get(&ObjectRef::new(&svc_name).within(&ns));
        is_tenant_slice(v, svc.as_deref())
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        if v.address_type == "FQDN" {
            return Err(Refusal {
                reason: "EndpointNotAllowed",
                message: "refused by the host's isolation policy: addressType: Unsupported value: \"FQDN\": only IPv4 and IPv6 slices reach the host".into(),
            });
        }
        ctx.policy.check_endpoint_addresses(|ip| ctx.pod_ips.contains(ip), addresses(v))?;
        let ns = v.metadata.namespace.clone().unwrap_or_default();
        let mut metadata = ctx.tr.host_meta(Self::KIND, &v.metadata);
        // The host's proxies find slices by the (host) Service name.
        let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
        if let Some(svc) = v.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
            labels.insert(LABEL_SERVICE_NAME.into(), ctx.tr.host_name(&ns, svc));
        }
        let mut endpoints = v.endpoints.clone();
        for e in endpoints.iter_mut().flatten() {
            // References to virtual objects mean nothing on the host.
            e.target_ref = None;
            e.node_name = None;
        }
        Ok(EndpointSlice { metadata, address_type: v.address_type.clone(), endpoints, ports: v.ports.clone() })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.endpoints != c.endpoints || d.ports != c.ports || d.address_type != c.address_type
    }
}

/// The addresses a slice names, each with its field.
fn addresses(v: &EndpointSlice) -> impl Iterator<Item = (String, &str)> {
    v.endpoints.iter().flatten().enumerate().flat_map(|(i, e)| {
        e.addresses.iter().enumerate().map(move |(j, a)| (format!("endpoints[{i}].addresses[{j}]"), a.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tenants_slices_of_selectorless_services() {
        let slice = |managed_by: Option<&str>| -> EndpointSlice {
            let mut labels = serde_json::json!({"kubernetes.io/service-name": "db"});
            if let Some(m) = managed_by {
                labels[LABEL_MANAGED_BY] = serde_json::json!(m);
            }
            serde_json::from_value(serde_json::json!({"metadata": {"name": "db-1", "labels": labels}, "addressType": "IPv4", "endpoints": []}))
                .unwrap()
        };
        let selectorless: Service =
            serde_json::from_value(serde_json::json!({"spec": {"ports": [{"port": 5432}]}})).unwrap();
        let selected: Service =
            serde_json::from_value(serde_json::json!({"spec": {"selector": {"app": "db"}}})).unwrap();
        assert!(is_tenant_slice(&slice(None), Some(&selectorless)));
        assert!(is_tenant_slice(&slice(Some("my-operator")), Some(&selectorless)));
        assert!(!is_tenant_slice(&slice(Some("endpointslicemirroring-controller.k8s.io")), Some(&selectorless)));
        assert!(!is_tenant_slice(&slice(None), Some(&selected)));
        assert!(!is_tenant_slice(&slice(None), None));
    }
}
