//! What the control plane keeps in every virtual cluster, applied at each start of the syncer
//! (server-side apply: repeatable, and it repairs what the tenant may have broken): CoreDNS
//! (`crate::dns`) and the registration of the resource metrics API, which vkube serves itself.

use base64::Engine;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use vkube_core::contract::{RESOURCE_METRICS_HOST, RESOURCE_METRICS_PORT, RESOURCE_METRICS_SERVICE};

use crate::sync::Result;

/// Everything applied: CoreDNS with `image` for `cluster_domain`, and the resource metrics API
/// whose serving certificate `metrics_ca_pem` signed.
pub fn manifests(image: &str, cluster_domain: &str, metrics_ca_pem: &str) -> Vec<Value> {
    let mut all = crate::dns::manifests(image, cluster_domain);
    all.extend(resource_metrics(metrics_ca_pem));
    all
}

/// `metrics.k8s.io/v1beta1` as an aggregated API of an ExternalName Service (no address of its
/// own, never copied to the host) whose name vkube's egress proxy answers; and, as
/// metrics-server's own manifests do, reading it is part of the `view`, `edit` and `admin` roles.
fn resource_metrics(ca_pem: &str) -> Vec<Value> {
    let (ns, name) = RESOURCE_METRICS_SERVICE;
    let port = i32::from(RESOURCE_METRICS_PORT);
    vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ExternalName", "externalName": RESOURCE_METRICS_HOST,
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}}),
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1beta1.metrics.k8s.io"},
            "spec": {"group": "metrics.k8s.io", "version": "v1beta1", "groupPriorityMinimum": 100, "versionPriority": 100,
                "service": {"name": name, "namespace": ns, "port": port},
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem)}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:aggregated-metrics-reader", "labels": {
                "rbac.authorization.k8s.io/aggregate-to-view": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                "rbac.authorization.k8s.io/aggregate-to-admin": "true"}},
            "rules": [{"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}]}),
    ]
}

/// Applies `manifests` in the virtual cluster.
pub async fn ensure(virt: &kube::Client, manifests: &[Value]) -> Result<()> {
    for m in manifests {
        let (group, version) = match m["apiVersion"].as_str().unwrap_or("v1").split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), m["apiVersion"].as_str().unwrap_or("v1").to_string()),
        };
        let kind = m["kind"].as_str().unwrap_or_default();
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
        let name = m["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let api: Api<DynamicObject> = match m["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(virt.clone(), ns, &ar),
            None => Api::all_with(virt.clone(), &ar),
        };
        api.patch(&name, &PatchParams::apply(crate::FIELD_MANAGER).force(), &Patch::Apply(m)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_api_names_a_service_with_no_host_copy_and_the_ca_that_signs_its_certificate() {
        let all = manifests("coredns:x", "cluster.local", "PEM");
        let svc = all.iter().find(|m| m["kind"] == "Service" && m["metadata"]["name"] == "vkube-metrics").unwrap();
        assert_eq!(svc["spec"]["externalName"], RESOURCE_METRICS_HOST);
        let api = all.iter().find(|m| m["kind"] == "APIService").unwrap();
        assert_eq!(api["spec"]["service"]["name"], svc["metadata"]["name"]);
        assert_eq!(api["spec"]["service"]["namespace"], svc["metadata"]["namespace"]);
        assert_eq!(api["spec"]["caBundle"], "UEVN", "base64 of the PEM");
        assert!(all.iter().any(|m| m["kind"] == "Deployment"), "CoreDNS too");
    }
}
