//! Names and labels of the host objects that make up a virtual cluster's control plane (the
//! synced workloads are named by `vkube_core::naming`; every key is in `vkube_core::contract`).

use std::collections::BTreeMap;

pub use vkube_core::contract::{
    ANNOTATION_ETCD_VERSION, ANNOTATION_KUBERNETES_VERSION, ANNOTATION_LAST_ACTIVITY, ANNOTATION_LAST_ACTIVITY_BY,
    ANNOTATION_MODE, ANNOTATION_PAUSED, ANNOTATION_POWER, ANNOTATION_POWER_REQUEST, ANNOTATION_POWER_SINCE,
    ANNOTATION_UPGRADE, LABEL_CONTROL_PLANE,
};

pub fn default_namespace(name: &str) -> String {
    format!("vkube-{name}")
}

pub fn pki_secret(name: &str) -> String {
    format!("vkube-{name}-pki")
}

pub fn kubeconfig_secret(name: &str) -> String {
    format!("vkube-{name}-kubeconfig")
}

/// The ConfigMap of the cluster's usage ledger (`vkube::usage`): its own object, not an
/// annotation of the Service, which every kube-proxy watches.
pub fn usage_configmap(name: &str) -> String {
    format!("vkube-{name}-usage")
}

/// The host Service in front of the proxy (kubectl in the host cluster, in-cluster clients).
pub fn service(name: &str) -> String {
    name.to_string()
}

pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CONTROL_PLANE.to_string(), name.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "vkube".to_string()),
    ])
}

/// The key of the admin kubeconfig in its Secret.
pub const KUBECONFIG_KEY: &str = "config";
