//! Names and labels of the host objects that make up a virtual cluster's control plane (the
//! synced workloads are named by `vkube_syncer::naming`).

use std::collections::BTreeMap;

/// Marks every control-plane object of a virtual cluster on the host.
pub const LABEL_CONTROL_PLANE: &str = "vkube.dev/control-plane";

pub fn default_namespace(name: &str) -> String {
    format!("vkube-{name}")
}

pub fn pki_secret(name: &str) -> String {
    format!("vkube-{name}-pki")
}

pub fn kubeconfig_secret(name: &str) -> String {
    format!("vkube-{name}-kubeconfig")
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

/// On the host Service: the cluster is paused (its host pods were removed on purpose; the next
/// control plane recreates them rather than treating them as lost).
pub const ANNOTATION_PAUSED: &str = "vkube.dev/paused";

/// On the host Service of a control plane run as local processes: `local`.
pub const ANNOTATION_MODE: &str = "vkube.dev/mode";

/// The key of the admin kubeconfig in its Secret.
pub const KUBECONFIG_KEY: &str = "config";
