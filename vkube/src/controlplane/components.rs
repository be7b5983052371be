//! Command lines of a virtual cluster's upstream components: etcd, and kube-apiserver with
//! kube-controller-manager in one process (`kube-control-plane`, hack/kube-control-plane: upstream's
//! two commands sharing one Go runtime and one copy of their code, ~100 MiB less resident memory).

use std::path::Path;

/// Kubernetes' default node-port range (the dev host's; a host with another sets the chart's
/// `serviceNodePortRange`).
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

/// Where the components listen and keep their data.
pub struct Layout<'a> {
    pub cert_dir: &'a Path,
    pub data_dir: &'a Path,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub apiserver_port: u16,
    pub service_cidr: &'a str,
    /// The host's node-port range, so a virtual Service can carry its host copy's node ports.
    pub node_port_range: &'a str,
    /// The admission configuration (Pod Security defaults), see [`admission_config`].
    pub admission_config: &'a Path,
    /// Whether etcd syncs its writes to disk. Off for local control planes (dev and CI
    /// clusters are throwaway, like the dev host's own etcd), on in the chart.
    pub durable: bool,
}

/// Admission configuration of the virtual API server: Pod Security enforced by default at the
/// admin's level, so a pod the host would refuse is refused at once, with the API server's own
/// message (the syncer still enforces the policy at the host boundary whatever the tenant does).
pub fn admission_config(level: vkube_core::policy::PodSecurityLevel) -> String {
    let l = level.as_str();
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n- name: PodSecurity\n  configuration:\n    apiVersion: pod-security.admission.config.k8s.io/v1\n    kind: PodSecurityConfiguration\n    defaults:\n      enforce: \"{l}\"\n      enforce-version: \"latest\"\n      audit: \"{l}\"\n      audit-version: \"latest\"\n      warn: \"{l}\"\n      warn-version: \"latest\"\n    exemptions:\n      usernames: []\n      runtimeClasses: []\n      namespaces: []\n"
    )
}

/// Controllers that make no sense without real nodes or volumes behind the virtual cluster: the
/// syncer creates the virtual nodes and copies volume state from the host. (Taint eviction
/// runs: it evicts for the NoExecute taints a tenant puts on its virtual nodes, and for the
/// host's shown there, as the host does for the host copies.)
pub const DISABLED_CONTROLLERS: [&str; 7] = [
    "node-ipam-controller",
    "node-lifecycle-controller",
    "device-taint-eviction-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-attach-detach-controller",
    "persistentvolume-expander-controller",
    "ttl-controller",
];

/// The Go runtime settings a component starts with, chosen from measurements of memory against
/// CPU and latency (docs/benchmarks-notes.md, "Go runtime settings"). GO* variables in the
/// control-plane process's own environment take precedence (an operator's override).
pub fn go_defaults(component: &str) -> &'static [(&'static str, &'static str)] {
    match component {
        // Most of an idle cluster's own memory is the API server's heap; a collector that runs
        // at half the heap's growth holds 40 MiB less idle and 70 MiB less with 1,000 pods.
        // (The controller manager in the same process: its heap is 35 MiB, 1.4 MiB less.)
        // etcd: 2-4 MiB less idle and 9-12 MiB less with 1,000 pods, for 5 % more of its CPU.
        CONTROL_PLANE | ETCD => &[("GOGC", "50")],
        _ => &[],
    }
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

pub fn etcd(l: &Layout<'_>) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", l.etcd_client_port);
    let peer = format!("http://127.0.0.1:{}", l.etcd_peer_port);
    vec![
        "--name=vkube".into(),
        format!("--data-dir={}", l.data_dir.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=vkube={peer}"),
        "--log-level=warn".into(),
        // A virtual cluster's datastore is small: keep etcd's own footprint small too.
        "--quota-backend-bytes=2147483648".into(),
        "--snapshot-count=10000".into(),
    ]
    .into_iter()
    .chain((!l.durable).then(|| "--unsafe-no-fsync".to_string()))
    .collect()
}

/// The virtual cluster's datastore.
pub const ETCD: &str = "etcd";

/// The process running kube-apiserver and kube-controller-manager.
pub const CONTROL_PLANE: &str = "kube-control-plane";

/// `kube-control-plane APISERVER-FLAGS... --- CONTROLLER-MANAGER-FLAGS... [--- SCHEDULER-FLAGS...]`
/// (the scheduler with its kubeconfig, for a virtual scheduler).
pub fn control_plane(
    controller_manager_kubeconfig: &Path,
    scheduler_kubeconfig: Option<&Path>,
    l: &Layout<'_>,
) -> Vec<String> {
    let mut args = apiserver(l);
    args.push("---".into());
    args.extend(controller_manager(controller_manager_kubeconfig, l));
    if let Some(kubeconfig) = scheduler_kubeconfig {
        args.push("---".into());
        args.extend(scheduler(kubeconfig));
    }
    args
}

fn scheduler(kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        // Nothing to serve: its health is the process's.
        "--secure-port=0".into(),
        "--profiling=false".into(),
        // Its API server is its own (as the controller manager's).
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
    ]
}

fn apiserver(l: &Layout<'_>) -> Vec<String> {
    let c = l.cert_dir;
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", l.etcd_client_port),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", l.apiserver_port),
        // Clients reach it only through the proxy: no endpoints to publish.
        "--endpoint-reconciler-type=none".into(),
        format!("--tls-cert-file={}", file(c, "apiserver.crt")),
        format!("--tls-private-key-file={}", file(c, "apiserver.key")),
        format!("--client-ca-file={}", file(c, "ca.crt")),
        "--authorization-mode=RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", file(c, "sa.pub")),
        format!("--service-account-signing-key-file={}", file(c, "sa.key")),
        // The host's range, so a virtual Service can carry its host copy's ClusterIP.
        format!("--service-cluster-ip-range={}", l.service_cidr),
        format!("--service-node-port-range={}", l.node_port_range),
        // The tenant may ask for anything; the syncer decides what reaches the host.
        "--allow-privileged=true".into(),
        format!("--requestheader-client-ca-file={}", file(c, "front-proxy-ca.crt")),
        "--requestheader-allowed-names=front-proxy-client".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-uid-headers=X-Remote-Uid".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!("--proxy-client-cert-file={}", file(c, "front-proxy-client.crt")),
        format!("--proxy-client-key-file={}", file(c, "front-proxy-client.key")),
        format!("--admission-control-config-file={}", l.admission_config.display()),
        // Exec, attach and port-forward reach the virtual nodes' kubelet, which vkube serves
        // behind the egress proxy (`vkube_apiproxy::kubelet`), with certificates of a CA the
        // tenant's CSRs never get: a Node the tenant points at its own Service is not trusted.
        format!("--kubelet-client-certificate={}", file(c, "kubelet-client.crt")),
        format!("--kubelet-client-key={}", file(c, "kubelet-client.key")),
        format!("--kubelet-certificate-authority={}", file(c, &format!("{}.crt", crate::pki_store::KUBELET_CA))),
        // Webhooks, aggregated APIs and proxies reach only this cluster's Services (`egress`).
        format!("--egress-selector-config-file={}", file(c, super::EGRESS_FILE)),
        "--profiling=false".into(),
    ]
}

fn controller_manager(kubeconfig: &Path, l: &Layout<'_>) -> Vec<String> {
    let c = l.cert_dir;
    let controllers: Vec<String> =
        std::iter::once("*".to_string()).chain(DISABLED_CONTROLLERS.iter().map(|d| format!("-{d}"))).collect();
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        "--secure-port=0".into(),
        format!("--root-ca-file={}", file(c, "ca.crt")),
        format!("--service-account-private-key-file={}", file(c, "sa.key")),
        "--use-service-account-credentials=true".into(),
        format!("--service-cluster-ip-range={}", l.service_cidr),
        format!("--cluster-signing-cert-file={}", file(c, "ca.crt")),
        format!("--cluster-signing-key-file={}", file(c, "ca.key")),
        format!("--controllers={}", controllers.join(",")),
        // Its API server is its own: no need for the default 20 requests/s, which makes a
        // 1,000-replica scale-up take a minute.
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
        "--profiling=false".into(),
    ]
}

/// A component's kubeconfig: its own client certificate (`LEAF.crt`, `LEAF.key` in the bundle).
pub fn component_kubeconfig(server: &str, bundle: &vkube_pki::Bundle, leaf: &str) -> String {
    let kc = vkube_pki::kubeconfig::with_client_cert(
        "virtual",
        server,
        bundle.get("ca.crt").unwrap_or_default(),
        vkube_pki::kubeconfig::ClientCert {
            cert_pem: bundle.get(&format!("{leaf}.crt")).unwrap_or_default(),
            key_pem: bundle.get(&format!("{leaf}.key")).unwrap_or_default(),
        },
    );
    vkube_pki::kubeconfig::to_yaml(&kc)
}
