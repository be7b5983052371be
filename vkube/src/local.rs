//! A virtual control plane as local processes (`vkube run` and its children: etcd, and
//! kube-apiserver with kube-controller-manager in one process) against a host cluster whose pods
//! cannot run it (the dev host; CI). The same pieces the Helm chart runs in its pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use vkube_localenv::process::ProcessGroup;
use vkube_localenv::{Lifetime, ProcessSpec, Progress, Upstream, ports};

use crate::controlplane::PolicyArgs;
use crate::controlplane::components::CONTROL_PLANE;
use crate::controlplane::ingress_wake;
use crate::{FIELD_MANAGER, names};

#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub name: String,
    pub namespace: String,
    /// This cluster's state directory (certificates, etcd data, logs, processes).
    pub dir: PathBuf,
    pub lifetime: Lifetime,
    pub vkube_binary: PathBuf,
    pub host_kubeconfig: PathBuf,
    pub host_context: Option<String>,
    /// The admin's isolation policy.
    pub policy: PolicyArgs,
    /// Extra flags for `vkube run`.
    pub run_args: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalPorts {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub proxy: u16,
    /// Ingress traffic for a sleeping cluster (`--wake-listen`); none in older state files.
    #[serde(default)]
    pub wake: Option<u16>,
}

/// What `state.json` records: enough to restart the same cluster on the same ports, so
/// kubeconfigs handed out stay valid.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalState {
    pub name: String,
    pub namespace: String,
    pub ports: LocalPorts,
    pub host_kubeconfig: PathBuf,
    pub host_context: Option<String>,
    pub policy: PolicyArgs,
    /// Extra flags for `vkube run` (beyond the policy).
    pub run_args: Vec<String>,
    /// The host's service range (the virtual API server's too).
    #[serde(default)]
    pub service_cidr: String,
    /// Where pods on the host reach this machine (a real node of the dev host runs here: its
    /// bridge address); None when no pod can (kwok nodes only).
    #[serde(default)]
    pub pod_address: Option<String>,
}

impl LocalState {
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.proxy)
    }

    pub fn read(dir: &Path) -> anyhow::Result<Option<LocalState>> {
        let path = dir.join("state.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

pub struct LocalControlPlane {
    pub state: LocalState,
    pub dir: PathBuf,
    group: ProcessGroup,
    vkube_binary: PathBuf,
    upstream: Upstream,
}

const CONTROLLER: &str = "vkube";

impl LocalControlPlane {
    pub async fn start(opts: &LocalOptions, progress: Progress<'_>) -> anyhow::Result<Self> {
        let up = Upstream::locate()?;
        let dir = &opts.dir;
        for sub in ["pki", "logs", "etcd"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.display()))?;
        }
        let host = vkube_localenv::client::from_kubeconfig_file(&opts.host_kubeconfig, opts.host_context.as_deref())
            .await
            .context("connecting to the host cluster")?;
        let ports = match LocalState::read(dir)? {
            Some(s)
                if [s.ports.etcd_client, s.ports.etcd_peer, s.ports.apiserver, s.ports.proxy]
                    .into_iter()
                    .chain(s.ports.wake)
                    .all(ports::is_free) =>
            {
                s.ports
            }
            _ => LocalPorts {
                etcd_client: ports::free_port(),
                etcd_peer: ports::free_port(),
                apiserver: ports::free_port(),
                proxy: ports::free_port(),
                wake: Some(ports::free_port()),
            },
        };
        let service_cidr = host_service_cidr(&host).await?;
        let state = LocalState {
            service_cidr: service_cidr.clone(),
            pod_address: local_node_address(&host).await?,
            name: opts.name.clone(),
            namespace: opts.namespace.clone(),
            ports,
            host_kubeconfig: opts.host_kubeconfig.clone(),
            host_context: opts.host_context.clone(),
            policy: opts.policy.clone(),
            run_args: opts.run_args.clone(),
        };
        std::fs::write(dir.join("state.json"), serde_json::to_string_pretty(&state)?)?;

        progress("[1/4] host namespace and Service");
        ensure_namespace(&host, &state.namespace, &state.name, state.policy.pod_security).await?;
        ensure_local_service(&host, &state).await?;

        progress("[2/4] certificates (kept in a host Secret)");
        let cert_dir = dir.join("pki");
        let apiserver_url = format!("https://127.0.0.1:{}", state.ports.apiserver);
        // The rest of what the components read, `vkube run --supervise` writes.
        let (bundle, _) = crate::controlplane::sync_pki(&host, &state.namespace, &state.name, &cert_dir).await?;
        let group = ProcessGroup::new(dir, opts.lifetime);
        let admin_kubeconfig = crate::controlplane::admin_kubeconfig(&state.name, &state.endpoint(), &bundle);
        vkube_localenv::host::write_private(&dir.join("kubeconfig"), &admin_kubeconfig)?;
        // Straight to the virtual API server, bypassing the proxy: for benchmarks' baselines and
        // for tests that act while the control-plane process is down.
        let direct = crate::controlplane::admin_kubeconfig(&state.name, &apiserver_url, &bundle);
        vkube_localenv::host::write_private(&dir.join("direct.kubeconfig"), &direct)?;
        let mut cp =
            LocalControlPlane { state, dir: dir.clone(), group, vkube_binary: opts.vkube_binary.clone(), upstream: up };
        let scheduler = if cp.state.policy.virtual_scheduler { ", kube-scheduler" } else { "" };
        progress(&format!(
            "[3/4] vkube run: etcd, kube-apiserver, kube-controller-manager{scheduler}, the proxy and the syncer"
        ));
        cp.start_controller().await?;
        progress("[4/4] the default service account");
        cp.wait_default_service_account().await?;
        Ok(cp)
    }

    /// Pods on a real node reach the proxy at the node's address (the host Service's endpoint).
    fn listen_address(&self) -> &'static str {
        if self.state.pod_address.is_some() { "0.0.0.0" } else { "127.0.0.1" }
    }

    fn controller_spec(&self) -> ProcessSpec {
        let s = &self.state;
        ProcessSpec::new(CONTROLLER, &self.vkube_binary, &self.dir.join("logs"))
            .args([
                "run".to_string(),
                format!("--name={}", s.name),
                format!("--namespace={}", s.namespace),
                format!("--virtual-server=https://127.0.0.1:{}", s.ports.apiserver),
                format!("--listen={}:{}", self.listen_address(), s.ports.proxy),
                format!("--cert-dir={}", self.dir.join("pki").display()),
                format!("--endpoint={}", s.endpoint()),
                format!("--host-kubeconfig={}", s.host_kubeconfig.display()),
                // The upstream components are its children (sleep mode stops and starts them).
                "--supervise".to_string(),
                format!("--state-dir={}", self.dir.display()),
                format!("--etcd-binary={}", self.upstream.etcd().display()),
                format!("--etcdutl-binary={}", self.upstream.etcdutl().display()),
                format!("--control-plane-binary={}", self.upstream.kube_control_plane().display()),
                format!("--etcd-client-port={}", s.ports.etcd_client),
                format!("--etcd-peer-port={}", s.ports.etcd_peer),
            ])
            .args(s.ports.wake.map(|p| format!("--wake-listen={}:{p}", self.listen_address())))
            .args((!s.service_cidr.is_empty()).then(|| format!("--service-cidr={}", s.service_cidr)))
            .args(s.host_context.iter().map(|c| format!("--host-context={c}")))
            .args(s.policy.to_args())
            .args(s.run_args.iter().cloned())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
    }

    /// Starts `vkube run` and waits until its proxy says it is ready.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        self.group.spawn(self.controller_spec())?;
        let client = self.client().await?;
        // It starts etcd and the virtual API server first: minutes on a loaded 2-core machine.
        let timeout = Duration::from_secs(180);
        let group = &mut self.group;
        let res = vkube_localenv::wait::until(timeout, Duration::from_millis(100), || {
            let failed = group.check_running().err();
            let client = client.clone();
            async move {
                if let Some(e) = failed {
                    return Err(e.to_string());
                }
                // Ready when awake and synced, or when asleep (nothing else to wait for); asking
                // anything else would wake a sleeping cluster.
                let ready = http::Request::get("/readyz").body(vec![]).map_err(|e| e.to_string())?;
                client.request_text(ready).await.map(|_| Some(())).map_err(|e| e.to_string())
            }
        })
        .await;
        self.group.check_running()?;
        res.map_err(|e| {
            anyhow::anyhow!(
                "the vkube control plane did not answer within {} s: {e} (log: {})",
                timeout.as_secs(),
                self.dir.join("logs/vkube.log").display()
            )
        })
    }

    /// Pods can be created once the controller-manager has made the `default` service account.
    async fn wait_default_service_account(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client, "default");
        let timeout = Duration::from_secs(60);
        vkube_localenv::wait::until(timeout, Duration::from_millis(100), || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.map(|o| o.map(|_| ())).map_err(|e| e.to_string()) }
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the default service account did not appear within {} s: {e} (log: {})",
                timeout.as_secs(),
                self.dir.join(format!("logs/{CONTROL_PLANE}.log")).display()
            )
        })
    }

    /// Kills the control-plane process at once (crash tests); the upstream components it started
    /// stay up until the next one replaces them.
    pub fn kill_controller(&mut self) {
        self.group.stop(CONTROLLER, true);
    }

    /// Stops every process, newest first.
    pub fn stop_all(&mut self) {
        self.group.stop_all();
    }

    pub fn controller_pid(&self) -> Option<u32> {
        self.group.pid(CONTROLLER)
    }

    /// The pid of one of its processes (`etcd`, `kube-control-plane`, `vkube`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        if name == CONTROLLER {
            return self.group.pid(name);
        }
        let children = vkube_localenv::process::read_supervised(&self.dir);
        children.iter().find(|r| r.name == name).filter(|r| vkube_localenv::process::is_alive(r)).map(|r| r.pid)
    }

    /// The admin kubeconfig (through the proxy).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// An admin kubeconfig straight to the virtual API server (no proxy).
    pub fn direct_kubeconfig(&self) -> PathBuf {
        self.dir.join("direct.kubeconfig")
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(vkube_localenv::client::from_kubeconfig_file(&self.kubeconfig(), None).await?)
    }

    /// Its processes' logs: `vkube run`'s and its children's.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let children = crate::controlplane::supervisor::COMPONENTS;
        let children = children.map(|c| (c.to_string(), self.dir.join("logs").join(format!("{c}.log"))));
        children.into_iter().chain(self.group.logs()).collect()
    }

    pub fn detach(self) {
        self.group.detach();
    }
}

/// Creates the host namespace if missing. One still being deleted (a recent `vkube delete` of the
/// same name) is waited for first: nothing can be created in it until it is gone.
/// Creates the host namespace unless it exists, labelled as the cluster's and, as a second gate
/// behind the syncer's own check, with the host's Pod Security admission enforcing `level`.
pub async fn ensure_namespace(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    level: vkube_core::policy::PodSecurityLevel,
) -> anyhow::Result<()> {
    const TERMINATING_WAIT: Duration = Duration::from_secs(120);
    let api: Api<Namespace> = Api::all(host.clone());
    if let Some(existing) = api.get_opt(namespace).await? {
        if existing.metadata.deletion_timestamp.is_none() {
            return Ok(());
        }
        eprintln!("  host namespace {namespace} is being deleted; waiting until it is gone");
        let uid = existing.metadata.uid.unwrap_or_default();
        let gone =
            kube::runtime::wait::await_condition(api.clone(), namespace, kube::runtime::conditions::is_deleted(&uid));
        match tokio::time::timeout(TERMINATING_WAIT, gone).await {
            Ok(r) => r.with_context(|| format!("waiting for host namespace {namespace} to be deleted"))?,
            Err(_) => anyhow::bail!(
                "host namespace {namespace} is still being deleted after {}s; see `kubectl get namespace {namespace} -o yaml` \
                 (status.conditions say what blocks it) and retry",
                TERMINATING_WAIT.as_secs()
            ),
        };
    }
    let mut labels = names::labels(cluster);
    labels.insert("pod-security.kubernetes.io/enforce".into(), level.as_str().into());
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(namespace.into()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    };
    match api.create(&Default::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating host namespace {namespace}")),
    }
}

/// The address of a real node of the dev host, which runs on this machine
/// (`vkube dev up --real-nodes 1`): pods reach the machine there.
async fn local_node_address(host: &kube::Client) -> anyhow::Result<Option<String>> {
    let selector = ListParams::default().labels(&format!("{}=true", vkube_localenv::node::NODE_LABEL));
    let nodes = match Api::<k8s_openapi::api::core::v1::Node>::all(host.clone()).list(&selector).await {
        Ok(nodes) => nodes,
        // A host kubeconfig that may not list nodes: no real node of ours to look for.
        Err(kube::Error::Api(e)) if e.code == 403 => return Ok(None),
        Err(e) => return Err(e).context("listing the host's nodes"),
    };
    Ok(nodes.items.iter().find_map(|n| {
        let addresses = n.status.as_ref()?.addresses.as_ref()?;
        addresses.iter().find(|a| a.type_ == "InternalIP").map(|a| a.address.clone())
    }))
}

/// The host Service in front of the proxy (and of the wake listener, for Ingresses while the
/// cluster sleeps). Locally there is no pod to select, but its ClusterIP is still what synced
/// pods are told the API server is. With a real node, an EndpointSlice sends it to the proxy at
/// the node's address (`pod_address`); loopback cannot be an endpoint.
async fn ensure_local_service(host: &kube::Client, state: &LocalState) -> anyhow::Result<()> {
    let (namespace, cluster) = (&state.namespace, &state.name);
    // (name, Service port, the chart pod's port, where this process listens)
    let ports = [
        ("https", 443, 8443, Some(state.ports.proxy)),
        (ingress_wake::PORT_NAME, ingress_wake::SERVICE_PORT, ingress_wake::POD_PORT, state.ports.wake),
    ];
    let ports = ports.into_iter().filter_map(|(name, port, pod, local)| Some((name, port, pod, local?)));
    // Without an endpoint the target port is only what the chart's pod would listen on.
    let targets = state.pod_address.is_some();
    let svc = Service {
        metadata: ObjectMeta {
            name: Some(names::service(cluster)),
            labels: Some(names::labels(cluster)),
            annotations: Some([(names::ANNOTATION_MODE.to_string(), "local".to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(
                ports
                    .clone()
                    .map(|(name, port, pod, local)| ServicePort {
                        name: Some(name.into()),
                        port,
                        target_port: Some(IntOrString::Int(if targets { i32::from(local) } else { pod })),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            selector: None::<BTreeMap<String, String>>,
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(host.clone(), namespace)
        .patch(&names::service(cluster), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&svc))
        .await
        .context("creating the host Service of the control plane")?;
    let Some(address) = state.pod_address.as_deref() else { return Ok(()) };
    let mut labels = names::labels(cluster);
    labels.insert("kubernetes.io/service-name".into(), names::service(cluster));
    labels.insert("endpointslice.kubernetes.io/managed-by".into(), "vkube.dev".into());
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-local", names::service(cluster))),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint { addresses: vec![address.to_string()], ..Default::default() }]),
        ports: Some(
            ports
                .map(|(name, _, _, local)| EndpointPort {
                    name: Some(name.into()),
                    port: Some(i32::from(local)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    };
    let name = slice.metadata.name.clone().unwrap_or_default();
    Api::<EndpointSlice>::namespaced(host.clone(), namespace)
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&slice))
        .await
        .context("creating the EndpointSlice of the control plane's host Service")?;
    Ok(())
}

/// The host's service range (ServiceCIDR objects, Kubernetes 1.33+): the virtual API server
/// must allocate from the same range.
pub async fn host_service_cidr(host: &kube::Client) -> anyhow::Result<String> {
    let cidrs = Api::<ServiceCIDR>::all(host.clone()).list(&Default::default()).await.context(
        "reading the host's ServiceCIDR objects (needs Kubernetes 1.33 or later and list permission on servicecidrs)",
    )?;
    let mut items = cidrs.items;
    items.sort_by_key(|c| c.metadata.name.as_deref() != Some("kubernetes"));
    items
        .iter()
        .flat_map(|c| c.spec.iter().flat_map(|s| s.cidrs.iter().flatten()))
        .find(|c| !c.contains(':'))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the host has no IPv4 ServiceCIDR; vkube needs the host's service range"))
}
