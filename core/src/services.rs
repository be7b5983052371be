//! The host copy of a virtual Service. It carries the SAME ClusterIP as the virtual Service, so
//! pods (which run on the host) reach what the tenant sees. The API proxy creates it before the
//! virtual Service (marked [`PENDING_UID`](crate::contract::PENDING_UID)); the syncer keeps it in
//! step afterwards.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use crate::naming::Translator;
use crate::policy::{Policy, Refusal};

pub const KIND: &str = "Service";

/// Whether a virtual Service gets a host copy: not an ExternalName, a DNS alias the virtual
/// cluster's own DNS answers for its pods, which a copy would only publish in the host's DNS, under
/// a name of the tenant's choosing (nothing of the tenant's reads it there: Ingress backends may
/// not be ExternalNames, pods resolve through the virtual DNS); and not the resource metrics
/// API's, whose name only the virtual API server's egress proxy answers (made again by the tenant
/// as another type, it still has nothing on the host to reach).
pub fn has_host_copy(v: &Service) -> bool {
    let at = (v.metadata.namespace.as_deref().unwrap_or_default(), v.metadata.name.as_deref().unwrap_or_default());
    v.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("ExternalName")
        && at != crate::contract::RESOURCE_METRICS_SERVICE
}

/// The host copy of a virtual Service (pure). Node ports and the health-check node port are the
/// virtual Service's where the policy lets tenants choose them (a port taken on the host is
/// refused there), else left for the host to choose.
pub fn host_service(tr: &Translator, policy: &Policy, v: &Service) -> Result<Service, Refusal> {
    let vs = v.spec.clone().unwrap_or_default();
    policy.check_service(&vs)?;
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    let selector = vs.selector.as_ref().filter(|s| !s.is_empty()).map(|s| tr.host_selector(ns, s));
    let spec = ServiceSpec {
        type_: vs.type_,
        ports: vs.ports.map(|ps| {
            ps.into_iter()
                .map(|p| ServicePort { node_port: p.node_port.filter(|_| policy.allow_node_port_choice), ..p })
                .collect()
        }),
        selector,
        health_check_node_port: vs.health_check_node_port.filter(|_| policy.allow_node_port_choice),
        cluster_ip: vs.cluster_ip.clone().filter(|ip| !ip.is_empty()),
        cluster_ips: vs.cluster_ips.clone().filter(|ips| !ips.is_empty()),
        ip_families: vs.ip_families,
        ip_family_policy: vs.ip_family_policy,
        session_affinity: vs.session_affinity,
        session_affinity_config: vs.session_affinity_config,
        publish_not_ready_addresses: vs.publish_not_ready_addresses,
        external_traffic_policy: vs.external_traffic_policy,
        internal_traffic_policy: vs.internal_traffic_policy,
        load_balancer_class: vs.load_balancer_class,
        load_balancer_source_ranges: vs.load_balancer_source_ranges,
        allocate_load_balancer_node_ports: vs.allocate_load_balancer_node_ports,
        traffic_distribution: vs.traffic_distribution,
        ..Default::default()
    };
    Ok(Service { metadata: tr.host_meta(KIND, &v.metadata), spec: Some(spec), status: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_name_stays_in_the_virtual_cluster() {
        let external = svc(serde_json::json!({"spec": {"type": "ExternalName", "externalName": "db.example.com"}}));
        assert!(!has_host_copy(&external));
        assert!(has_host_copy(&svc(serde_json::json!({"spec": {"type": "ClusterIP"}}))));
        assert!(has_host_copy(&svc(serde_json::json!({"spec": {}}))), "ClusterIP by default");
        let (ns, name) = crate::contract::RESOURCE_METRICS_SERVICE;
        let metrics =
            svc(serde_json::json!({"metadata": {"namespace": ns, "name": name}, "spec": {"type": "ClusterIP"}}));
        assert!(!has_host_copy(&metrics), "the resource metrics API's, whatever its type");
        let elsewhere = svc(serde_json::json!({"metadata": {"namespace": "default", "name": name}, "spec": {}}));
        assert!(has_host_copy(&elsewhere));
    }

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_copy_keeps_the_ip_and_confines_the_selector() {
        let tr = Translator::new("vc", "host-ns");
        let v = svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u"},
            "spec": {"clusterIP": "10.96.3.4", "selector": {"app": "web"}, "ports": [{"port": 80, "nodePort": 30001}]}}));
        let chooser = Policy { allow_node_port_choice: true, ..Default::default() };
        let h = host_service(&tr, &chooser, &v).unwrap();
        let s = h.spec.unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("10.96.3.4"));
        let sel = s.selector.unwrap();
        assert_eq!(sel["t.vkube.dev/app"], "web");
        assert_eq!(sel["vkube.dev/namespace"], "shop");
        assert_eq!(sel["vkube.dev/cluster"], "vc");
        assert_eq!(s.ports.unwrap()[0].node_port, Some(30001), "the node port chosen, where allowed");
        let host_chooses = host_service(&tr, &Policy::default(), &v).unwrap().spec.unwrap();
        assert_eq!(host_chooses.ports.unwrap()[0].node_port, None, "else the host chooses");
        assert_eq!(h.metadata.name.as_deref(), Some("web-x-shop-x-vc"));
    }

    #[test]
    fn selectorless_services_stay_selectorless() {
        let tr = Translator::new("vc", "host-ns");
        let v = svc(
            serde_json::json!({"metadata": {"name": "ext", "namespace": "shop"}, "spec": {"ports": [{"port": 5432}]}}),
        );
        assert_eq!(host_service(&tr, &Policy::default(), &v).unwrap().spec.unwrap().selector, None);
    }

    #[test]
    fn node_ports_are_refused_by_default() {
        let tr = Translator::new("vc", "host-ns");
        let v = svc(
            serde_json::json!({"metadata": {"name": "np", "namespace": "shop"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
        );
        assert_eq!(host_service(&tr, &Policy::default(), &v).unwrap_err().reason, "NodePortNotAllowed");
    }
}
