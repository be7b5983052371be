//! Services: the host copy and the virtual Service carry the SAME ClusterIP, so pods (which run
//! on the host) reach what the tenant sees. The proxy creates the host copy first when a Service
//! is created through it; otherwise the host copy asks for the virtual IP, and if the host has
//! given that IP away, the virtual Service is recreated with the host's.
//!
//! Two paths: downward ([`down`], on virtual changes) creates, updates and deletes the host
//! copy, and recreates the virtual Service when the host gave its copy another address; upward
//! ([`up`], on host changes) brings back node ports and load-balancer status, and sends the
//! downward path any host change (a drift is repaired as before).

mod down;
mod up;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use vkube_core::contract::{ANNOTATION_PENDING_SINCE, ANNOTATION_UID, PENDING_UID};

use crate::context::{Context, Key};
use crate::endpointslices::LABEL_SERVICE_NAME;
use crate::informer::{Change, key_of};
use crate::kind::SyncedKind;
use crate::mirror::meta_differs;
use crate::queue::Action;
use crate::sync::Result;

pub use vkube_core::services::{KIND, host_service};

impl SyncedKind for Service {
    const KIND: &'static str = KIND;
    type Virtual = Service;
    type VirtualStored = Service;
    type Host = Service;
    type HostStored = Service;

    /// Its Endpoints follow it, and a selector added or removed changes which of its slices are
    /// the tenant's and which Ingresses may route to it. What the host allocated is compared
    /// again too (the tenant may have edited it).
    fn on_virtual_change(c: &Context, s: &Service, _: Change) {
        let (ns, name) = key_of(s);
        c.queues.of::<Service>().add((ns.clone(), name.clone()));
        c.queues.upward::<Service>().add((ns.clone(), name.clone()));
        c.queues.of::<Endpoints>().add((ns.clone(), name.clone()));
        crate::ingresses::backends_changed(c, &ns, &name);
        for slice in c.stores.virt::<EndpointSlice>().state() {
            let of_service = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) == Some(&name);
            if of_service && slice.metadata.namespace.as_deref() == Some(ns.as_str()) {
                c.queues.of::<EndpointSlice>().add(key_of(slice.as_ref()));
            }
        }
    }

    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        down::reconcile(ctx, key)
    }

    const UPWARD_QUEUE: Option<&'static str> = Some("ServiceStatus");

    fn reflect(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        up::reflect(ctx, key)
    }
}

/// How long a host Service marked pending (since [`ANNOTATION_PENDING_SINCE`]) is taken to be
/// still being created rather than an orphan.
pub const PENDING_GRACE: Duration = Duration::from_secs(60);

/// The virtual Service in front of the API server (never copied to the host).
pub const API_SERVICE: (&str, &str) = ("default", "kubernetes");

/// Neither can change on the virtual side: a virtual Service whose address, or whose
/// health-check node port (both set), differs from its host copy's is recreated with the host's.
fn allocation_differs(v: &Service, h: &Service) -> bool {
    let (hc_host, hc_virtual) = (health_check_node_port(h), health_check_node_port(v));
    cluster_ip(h) != cluster_ip(v) || (hc_host.is_some() && hc_virtual.is_some() && hc_host != hc_virtual)
}

/// The namespace and name of the virtual cluster's DNS Service.
pub const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

pub(crate) fn cluster_ip(s: &Service) -> Option<&str> {
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
