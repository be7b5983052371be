//! The dev host's resource metrics, with a real node: the upstream metrics-server as a local
//! process (like the ingress controller), serving `metrics.k8s.io` through the host API server's
//! aggregation layer, so `kubectl top pod` and the host's PodMetrics give the real CPU and memory
//! use of pods on the real node. It scrapes the kubelet's `/metrics/resource` (the real node's
//! only: kwok's nodes serve none) and reads the host API with a service account of its own.

use std::path::Path;

use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::Api;
use kube::config::AuthInfo;
use vkube_pki::kubeconfig;

use crate::process::ProcessSpec;
use crate::upstream::Upstream;
use crate::{Result, host, node};

pub const NAMESPACE: &str = "kube-system";
/// Its service account, token Secret (`-token`), Service and EndpointSlice.
pub const NAME: &str = "metrics-server";
/// What the host API server serves through it.
pub const API_SERVICE: &str = "v1beta1.metrics.k8s.io";
/// The API that answers once the aggregation works (an empty list before the first scrapes).
pub const NODES_PATH: &str = "/apis/metrics.k8s.io/v1beta1/nodes";

/// What metrics-server needs on the host (upstream's manifests, `manifests/base`, less the
/// Deployment): a service account that may read pods and nodes and the kubelet's metrics, check
/// the callers the API server hands on (auth-delegator, the front proxy's CA in kube-system), a
/// long-lived token of it; a selector-less Service whose EndpointSlice names where the process
/// listens (`ADDRESS`:`PORT`, filled in), and the APIService. The API server dials the endpoint
/// itself (`--enable-aggregator-routing`), not the ClusterIP.
const OBJECTS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: metrics-server, namespace: kube-system}
---
apiVersion: v1
kind: Secret
metadata:
  name: metrics-server-token
  namespace: kube-system
  annotations: {kubernetes.io/service-account.name: metrics-server}
type: kubernetes.io/service-account-token
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: vkube-dev-metrics-server}
rules:
- apiGroups: [""]
  resources: [nodes/metrics]
  verbs: [get]
- apiGroups: [""]
  resources: [pods, nodes]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: vkube-dev-metrics-server}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vkube-dev-metrics-server}
subjects: [{kind: ServiceAccount, name: metrics-server, namespace: kube-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "vkube-dev-metrics-server:auth-delegator"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:auth-delegator"}
subjects: [{kind: ServiceAccount, name: metrics-server, namespace: kube-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: vkube-dev-metrics-server-auth-reader, namespace: kube-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: extension-apiserver-authentication-reader}
subjects: [{kind: ServiceAccount, name: metrics-server, namespace: kube-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:aggregated-metrics-reader
  labels:
    rbac.authorization.k8s.io/aggregate-to-view: "true"
    rbac.authorization.k8s.io/aggregate-to-edit: "true"
    rbac.authorization.k8s.io/aggregate-to-admin: "true"
rules:
- apiGroups: [metrics.k8s.io]
  resources: [pods, nodes]
  verbs: [get, list, watch]
---
apiVersion: v1
kind: Service
metadata: {name: metrics-server, namespace: kube-system}
spec:
  ports: [{name: https, port: 443, protocol: TCP, targetPort: PORT}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: metrics-server
  namespace: kube-system
  labels: {kubernetes.io/service-name: metrics-server, endpointslice.kubernetes.io/managed-by: vkube-dev}
addressType: IPv4
endpoints: [{addresses: ["ADDRESS"], conditions: {ready: true}}]
ports: [{name: https, port: PORT, protocol: TCP}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  service: {name: metrics-server, namespace: kube-system, port: 443}
  group: metrics.k8s.io
  version: v1beta1
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
"#;

/// [`OBJECTS`] for a metrics-server listening on the node's address and `port`.
fn objects(port: u16) -> String {
    OBJECTS.replace("PORT", &port.to_string()).replace("ADDRESS", node::ADDRESS)
}

/// Makes metrics-server's objects on the host and returns its token (filled in by the
/// controller manager's token controller).
pub async fn install(client: &kube::Client, port: u16) -> Result<String> {
    host::apply_objects(client, "metrics-server's objects", &objects(port)).await?;
    host::service_account_token(client, NAMESPACE, &format!("{NAME}-token"), "metrics-server's").await
}

/// Deletes the APIService, if any: one left by an earlier run whose metrics-server does not run
/// (a host without a real node, or one still starting) makes every discovery of the host fail
/// (`kubectl`, Helm, the namespace controller). Made again when metrics-server starts.
pub async fn remove_api_service(client: &kube::Client) -> Result<()> {
    let api: Api<APIService> = Api::all(client.clone());
    match api.delete(API_SERVICE, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether the APIService's `Available` condition is true; else its message.
pub async fn api_service_available(client: &kube::Client) -> std::result::Result<(), String> {
    let api: Api<APIService> = Api::all(client.clone());
    let svc = api.get(API_SERVICE).await.map_err(|e| e.to_string())?;
    let conditions = svc.status.and_then(|s| s.conditions).unwrap_or_default();
    match conditions.into_iter().find(|c| c.type_ == "Available") {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "APIService {API_SERVICE} not Available: {}: {}",
            c.reason.unwrap_or_default(),
            c.message.unwrap_or_default()
        )),
        None => Err(format!("APIService {API_SERVICE} has no Available condition yet")),
    }
}

/// metrics-server on the node's address and `port` (HTTPS, a self-signed certificate in `dir`'s
/// `metrics-server/`: the APIService skips its verification, as upstream's does), reading the
/// host API at `server` with `token` from a private kubeconfig there, also for delegated
/// authentication and authorization; scraping the real node's kubelet every 15 s at its
/// InternalIP, verified with the host CA (`ca`, which signed the kubelet's serving certificate).
pub fn spec(up: &Upstream, dir: &Path, port: u16, server: &str, ca: &Path, token: &str) -> Result<ProcessSpec> {
    let own = dir.join("metrics-server");
    std::fs::create_dir_all(own.join("certs")).map_err(crate::io_err(format!("creating {}", own.display())))?;
    let ca_pem = std::fs::read_to_string(ca).map_err(crate::io_err(format!("reading {}", ca.display())))?;
    let mut cfg = kubeconfig::with_client_cert(
        "vkube-dev",
        server,
        &ca_pem,
        kubeconfig::ClientCert { cert_pem: "", key_pem: "" },
    );
    for user in &mut cfg.auth_infos {
        user.auth_info = Some(AuthInfo { token: Some(token.to_string().into()), ..Default::default() });
    }
    let kc = own.join("kubeconfig");
    host::write_private(&kc, &kubeconfig::to_yaml(&cfg))?;
    let kc = kc.display().to_string();
    Ok(ProcessSpec::new("metrics-server", up.metrics_server(), &dir.join("logs")).args([
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        format!("--bind-address={}", node::ADDRESS),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", own.join("certs").display()),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--kubelet-certificate-authority={}", ca.display()),
        format!("--node-selector={}=true", node::NODE_LABEL),
        "--metric-resolution=15s".into(),
    ]))
}

#[cfg(test)]
mod tests {
    use kube::api::DynamicObject;

    use super::*;

    #[test]
    fn the_objects_name_where_it_listens_and_parse() {
        let docs = objects(18443);
        assert!(!docs.contains("PORT") && !docs.contains("ADDRESS"), "{docs}");
        let parsed: Vec<DynamicObject> = docs.split("\n---\n").map(|d| serde_saphyr::from_str(d).unwrap()).collect();
        let slice = parsed.iter().find(|o| o.types.as_ref().unwrap().kind == "EndpointSlice").unwrap();
        assert_eq!(slice.data["endpoints"][0]["addresses"][0], node::ADDRESS);
        assert_eq!(slice.data["ports"][0]["port"], 18443);
        let svc = parsed.iter().find(|o| o.types.as_ref().unwrap().kind == "Service").unwrap();
        assert_eq!(svc.data["spec"]["ports"][0]["targetPort"], 18443);
        for o in &parsed {
            let kind = &o.types.as_ref().unwrap().kind;
            assert!(host::resource(kind).is_some(), "no resource for {kind}");
        }
    }
}
