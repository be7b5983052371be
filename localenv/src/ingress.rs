//! The dev host's ingress controller, with a real node: traefik as a local process (like the
//! node's own components), serving the host's Ingresses of class [`CLASS`] on a loopback port,
//! so a tenant's Ingress really routes to its pods (and a sleeping cluster's to its wake port).
//! It reads the host API with a service account of its own, as in-cluster controllers do.

use std::path::Path;

use crate::process::ProcessSpec;
use crate::upstream::Upstream;
use crate::{Result, host};

/// The host's ingress class that traefik serves.
pub const CLASS: &str = "traefik";
/// Not `vkube-*`: that is where virtual clusters live (`vkube create ingress` would take it).
const NAMESPACE: &str = "traefik";

/// What traefik needs on the host: its class, a service account that may read what it routes by
/// (and write Ingresses' status), and a long-lived token of it (the dev host lives for days).
const OBJECTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: traefik}
spec: {controller: traefik.io/ingress-controller}
---
apiVersion: v1
kind: Namespace
metadata: {name: traefik}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: traefik, namespace: traefik}
---
apiVersion: v1
kind: Secret
metadata:
  name: traefik-token
  namespace: traefik
  annotations: {kubernetes.io/service-account.name: traefik}
type: kubernetes.io/service-account-token
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: vkube-dev-traefik}
rules:
- apiGroups: [""]
  resources: [services, secrets, nodes, endpoints]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses, ingressclasses]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses/status]
  verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: vkube-dev-traefik}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vkube-dev-traefik}
subjects: [{kind: ServiceAccount, name: traefik, namespace: traefik}]
"#;

/// Makes traefik's objects on the host and returns its token (filled in by the controller
/// manager's token controller).
pub async fn install(client: &kube::Client) -> Result<String> {
    host::apply_objects(client, "traefik's objects", OBJECTS).await?;
    host::service_account_token(client, NAMESPACE, "traefik-token", "traefik's").await
}

/// traefik serving Ingresses of class [`CLASS`] on `127.0.0.1:port` (plain HTTP) and its
/// Prometheus metrics on `127.0.0.1:metrics` (`/metrics`, what `vkube run --ingress-metrics`
/// reads), reading the host API at `server` with `token`, from a static configuration in `dir`
/// (private: it holds the token, which traefik takes from no other source once it has any flag).
/// No dashboard, API or ping.
pub fn spec(
    up: &Upstream,
    dir: &Path,
    (port, metrics): (u16, u16),
    server: &str,
    ca: &Path,
    token: &str,
) -> Result<ProcessSpec> {
    let config = serde_json::json!({
        "entryPoints": {
            // The Ingresses' routers use the default entry point only, never the metrics one.
            "web": {"address": format!("127.0.0.1:{port}"), "asDefault": true},
            "metrics": {"address": format!("127.0.0.1:{metrics}")},
        },
        "metrics": {"prometheus": {"entryPoint": "metrics"}},
        "providers": {"kubernetesIngress": {
            "endpoint": server,
            "certAuthFilePath": ca.display().to_string(),
            "token": token,
            // Its class only; the address it writes in the Ingresses' status is where it listens.
            "ingressClass": CLASS,
            "ingressEndpoint": {"ip": "127.0.0.1"},
        }},
        "log": {"level": "INFO", "noColor": true},
        "global": {"checkNewVersion": false, "sendAnonymousUsage": false},
    });
    // YAML is a superset of JSON: traefik reads it by its name.
    let file = dir.join("traefik.yaml");
    host::write_private(&file, &config.to_string())?;
    Ok(ProcessSpec::new("traefik", up.traefik(), &dir.join("logs")).arg(format!("--configFile={}", file.display())))
}
