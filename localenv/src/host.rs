//! The dev host cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
//! with simulated nodes, all local processes. kwok serves the kubelet API, so `kubectl logs`,
//! `exec`, `attach` and `port-forward` work on its pods.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};
use vkube_pki::{Bundle, BundleSpec, LeafSpec, Validity, kubeconfig};

use crate::node::{self, RealNode};
use crate::process::{self, Lifetime, ProcessGroup, ProcessSpec, log_tail};
use crate::upstream::Upstream;
use crate::{Error, Progress, Result, ingress, io_err, metrics_server, ports, wait};

pub use vkube_kubeclient::write_private;

pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// kwok hands out pod IPs from here; it must not overlap the service range.
pub const POD_CIDR: &str = "10.244.0.1/16";
const FIELD_MANAGER: &str = "vkube-dev";

#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Simulated (kwok) nodes.
    pub nodes: usize,
    /// Real nodes (0 or 1: the node's bridge and cgroups are the machine's).
    pub real_nodes: usize,
    pub lifetime: Lifetime,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions { nodes: 3, real_nodes: 0, lifetime: Lifetime::Attached }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostPorts {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub scheduler: u16,
    pub controller_manager: u16,
    pub kwok: u16,
    /// The ingress controller's HTTP port, with a real node (none in older state files).
    #[serde(default)]
    pub ingress: u16,
    /// Its Prometheus metrics (`/metrics`, plain HTTP), with a real node.
    #[serde(default)]
    pub ingress_metrics: u16,
    /// metrics-server's HTTPS port on the node's address, with a real node.
    #[serde(default)]
    pub metrics_server: u16,
}

impl HostPorts {
    fn allocate() -> Self {
        HostPorts {
            etcd_client: ports::free_port(),
            etcd_peer: ports::free_port(),
            apiserver: ports::free_port(),
            scheduler: ports::free_port(),
            controller_manager: ports::free_port(),
            kwok: ports::free_port(),
            ingress: ports::free_port(),
            ingress_metrics: ports::free_port(),
            metrics_server: ports::free_port(),
        }
    }

    fn all_free(&self) -> bool {
        [self.etcd_client, self.etcd_peer, self.apiserver, self.scheduler, self.controller_manager, self.kwok]
            .into_iter()
            .all(ports::is_free)
    }
}

/// What `state.json` in the cluster directory records, so a restart reuses the same ports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostState {
    pub ports: HostPorts,
    /// Whether it has a real node: pods then reach the machine at the node's address.
    #[serde(default)]
    pub real_node: bool,
}

pub struct HostCluster {
    pub dir: PathBuf,
    pub ports: HostPorts,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Whether it has a real node (started last).
    real_node: bool,
    /// Dropped before `processes`: it is torn down while the API server still answers.
    node: Option<RealNode>,
    processes: ProcessGroup,
}

impl HostCluster {
    /// Starts a host cluster in `dir` (created if missing). Certificates, etcd data and ports from
    /// an earlier run in the same directory are reused, so kubeconfigs stay valid.
    pub async fn start(dir: &Path, opts: &HostOptions, progress: Progress<'_>) -> Result<Self> {
        let up = Upstream::locate()?;
        if opts.real_nodes > 1 {
            return Err(Error::Node(format!(
                "{} real nodes asked for; one machine holds one (its bridge {} and cgroups are the machine's)",
                opts.real_nodes,
                node::BRIDGE
            )));
        }
        if opts.real_nodes > 0 {
            up.check_node()?;
        }
        for sub in ["pki", "logs", "etcd", "kwok"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let mut ports = match read_state(dir)? {
            Some(state) if state.ports.all_free() => state.ports,
            _ => HostPorts::allocate(),
        };
        // Only a real node's ingress controller and metrics-server listen there: re-picked alone
        // if taken, so the API server's port (in every kubeconfig handed out) stays.
        if opts.real_nodes > 0 {
            for port in [&mut ports.ingress, &mut ports.ingress_metrics, &mut ports.metrics_server] {
                if *port == 0 || !ports::is_free(*port) {
                    *port = ports::free_port();
                }
            }
        }
        let mut host = HostCluster {
            dir: dir.to_path_buf(),
            kubeconfig: dir.join("kubeconfig"),
            ports,
            real_node: opts.real_nodes > 0,
            node: None,
            processes: ProcessGroup::new(dir, opts.lifetime),
        };
        host.write_state(opts.real_nodes > 0)?;
        let total = if opts.real_nodes > 0 { 8 } else { 7 };
        progress(&format!("[1/{total}] certificates and kubeconfigs"));
        let pki = host.write_pki()?;
        progress(&format!("[2/{total}] etcd"));
        host.processes.spawn(host.etcd(&up))?;
        progress(&format!("[3/{total}] kube-apiserver"));
        host.processes.spawn(host.apiserver(&up))?;
        let client = host.client().await?;
        wait_api_ready(&client, &mut host.processes, "kube-apiserver", &dir.join("logs"), Duration::from_secs(90))
            .await?;
        // An earlier run's, whose metrics-server does not run (yet): it would fail discovery.
        metrics_server::remove_api_service(&client).await?;
        progress(&format!("[4/{total}] kube-controller-manager and kube-scheduler"));
        host.processes.spawn(host.controller_manager(&up))?;
        host.processes.spawn(host.scheduler(&up))?;
        progress(&format!("[5/{total}] kwok debugging rules (logs, exec, attach, port-forward)"));
        install_kwok_crds(&client, &up).await?;
        host.install_kwok_rules(&client).await?;
        progress(&format!("[6/{total}] kwok with {} simulated nodes", opts.nodes));
        host.processes.spawn(host.kwok(&up))?;
        ensure_nodes(&client, opts.nodes).await?;
        if let Err(e) = host.wait_nodes_ready(&client, opts.nodes).await {
            // kwok v0.8.0 can die as it starts ("fatal error: concurrent map writes" in its CEL
            // setup, a race of its own): started once more, then it must work.
            if host.processes.check_running().is_ok() {
                return Err(e);
            }
            progress("kwok exited while starting (a known race of kwok's); starting it again");
            host.processes.stop("kwok", true);
            host.processes.spawn(host.kwok(&up))?;
            host.wait_nodes_ready(&client, opts.nodes).await?;
        }
        progress(&format!("[7/{total}] default service account"));
        host.wait_default_service_account(&client).await?;
        if opts.real_nodes > 0 {
            progress(&format!(
                "[8/{total}] a real node: containerd, kubelet and kube-proxy on bridge {} ({}), traefik serving \
                 ingress class {} on http://127.0.0.1:{}, and metrics-server (metrics.k8s.io, kubectl top)",
                node::BRIDGE,
                node::ADDRESS,
                ingress::CLASS,
                host.ports.ingress
            ));
            host.start_real_node(&up, &pki, &client, opts.lifetime, progress).await?;
            host.start_ingress(&up, &client).await?;
            host.start_metrics_server(&up, &client).await?;
        }
        Ok(host)
    }

    async fn start_real_node(
        &mut self,
        up: &Upstream,
        pki: &Bundle,
        client: &Client,
        lifetime: Lifetime,
        progress: Progress<'_>,
    ) -> Result<()> {
        let get = |f: &str| pki.get(f).unwrap_or_default();
        let access = node::HostAccess {
            server: self.server(),
            ca_pem: get("ca.crt"),
            node_cert: (get("node.crt"), get("node.key")),
            proxy_cert: (get("kube-proxy.crt"), get("kube-proxy.key")),
            serving_cert: (get("kubelet.crt"), get("kubelet.key")),
        };
        let dir = self.dir.join("node");
        let started = tokio::task::block_in_place(|| RealNode::start(&dir, up, &access, lifetime, progress))?;
        node::ensure_volumes(client, &dir).await?;
        let real = self.node.insert(started);
        let nodes: Api<Node> = Api::all(client.clone());
        let timeout = Duration::from_secs(90);
        let res = wait::until(timeout, Duration::from_millis(200), || {
            let failed = real.check_running().err();
            let nodes = nodes.clone();
            async move {
                if let Some(e) = failed {
                    return Err(e.to_string());
                }
                let node = nodes.get_opt(node::NAME).await.map_err(|e| e.to_string())?;
                match node {
                    Some(n) if node_ready(&n) => Ok(Some(())),
                    Some(_) => Err(format!("node {} registered, not Ready yet", node::NAME)),
                    None => Err(format!("node {} not registered yet", node::NAME)),
                }
            }
        })
        .await;
        res.map_err(|detail| Error::NotReady {
            component: "kubelet".into(),
            seconds: timeout.as_secs(),
            detail,
            log: dir.join("logs/kubelet.log").display().to_string(),
        })
    }

    /// The ingress controller, once the node can run what it routes to: it must listen.
    async fn start_ingress(&mut self, up: &Upstream, client: &Client) -> Result<()> {
        let token = ingress::install(client).await?;
        let ca = self.dir.join("pki/ca.crt");
        let (port, metrics) = (self.ports.ingress, self.ports.ingress_metrics);
        self.processes.spawn(ingress::spec(up, &self.dir, (port, metrics), &self.server(), &ca, &token)?)?;
        self.wait_running("traefik", Duration::from_secs(30), || async move {
            let listening = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            Ok((listening(port) && listening(metrics)).then_some(()))
        })
        .await?;
        // Still running a moment later (not someone else on its port).
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.processes.check_running()
    }

    /// metrics-server, once the node's kubelet serves what it scrapes: the host API server must
    /// answer `metrics.k8s.io` through it.
    async fn start_metrics_server(&mut self, up: &Upstream, client: &Client) -> Result<()> {
        let port = self.ports.metrics_server;
        let token = metrics_server::install(client, port).await?;
        let ca = self.dir.join("pki/ca.crt");
        self.processes.spawn(metrics_server::spec(up, &self.dir, port, &self.server(), &ca, &token)?)?;
        self.wait_running("metrics-server", Duration::from_secs(90), || {
            let client = client.clone();
            async move {
                metrics_server::api_service_available(&client).await?;
                let req = http::Request::get(metrics_server::NODES_PATH).body(vec![]).map_err(|e| e.to_string())?;
                client
                    .request_text(req)
                    .await
                    .map(|_| Some(()))
                    .map_err(|e| format!("GET {}: {e}", metrics_server::NODES_PATH))
            }
        })
        .await
    }

    /// Waits for `check` while every host process runs: one that exits is reported at once,
    /// with its log, rather than as `component` timing out.
    async fn wait_running<T, F, Fut>(&mut self, component: &str, timeout: Duration, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Option<T>, String>>,
    {
        let processes = &mut self.processes;
        let waited = wait::until(timeout, Duration::from_millis(200), || {
            let exited = processes.check_running().err();
            let checked = check();
            async move {
                match exited {
                    Some(e) => Ok(Some(Err(e))),
                    None => checked.await.map(|found| found.map(Ok)),
                }
            }
        })
        .await;
        waited.unwrap_or_else(|detail| Err(self.not_ready(component, timeout, detail)))
    }

    /// Imports images into the real node's containerd (an error without a real node).
    pub fn import_images(&self, specs: &[crate::image::ImageSpec]) -> Result<()> {
        let node = self.node.as_ref().ok_or_else(|| Error::Node("this host has no real node".into()))?;
        tokio::task::block_in_place(|| node.import_images(&Upstream::locate()?, specs))
    }

    pub async fn client(&self) -> Result<Client> {
        Ok(crate::client::from_kubeconfig_file(&self.kubeconfig, None).await?)
    }

    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.pid(name)
    }

    /// The log file of every component, by name.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let node = self.node.iter().flat_map(RealNode::logs);
        self.processes.logs().into_iter().chain(node).collect()
    }

    /// Leaves a detached cluster running (its processes are recorded in `processes.json`, its
    /// real node's in `node/`).
    pub fn detach(self) {
        if let Some(node) = self.node {
            node.detach();
        }
        self.processes.detach();
    }

    /// Undoes a detached cluster's real node in `dir` (`vkube dev down`); the rest is stopped
    /// by `process::stop_all_recorded`.
    pub fn teardown_real_node(dir: &Path) -> Result<Vec<String>> {
        node::teardown_detached(&dir.join("node"))
    }

    /// Whether an already started cluster in `dir` is running and answering.
    pub async fn is_up(dir: &Path) -> bool {
        let Ok(recorded) = process::read_recorded(dir) else { return false };
        if recorded.is_empty() || !recorded.iter().all(process::is_alive) {
            return false;
        }
        match crate::client::from_kubeconfig_file(&dir.join("kubeconfig"), None).await {
            Ok(client) => readyz(&client).await.is_ok(),
            Err(_) => false,
        }
    }

    fn write_state(&self, real_node: bool) -> Result<()> {
        write_json(&self.dir.join("state.json"), &HostState { ports: self.ports.clone(), real_node })
    }

    fn pki_path(&self, file: &str) -> String {
        self.dir.join("pki").join(file).display().to_string()
    }

    fn write_pki(&self) -> Result<Bundle> {
        let pki_dir = self.dir.join("pki");
        let mut bundle = read_bundle(&pki_dir)?;
        let spec = host_pki_spec();
        bundle.ensure(&spec, Validity::default(), time::OffsetDateTime::now_utc())?;
        write_bundle(&pki_dir, &bundle)?;
        let ca = bundle.get("ca.crt").unwrap_or_default();
        for (file, user) in [
            ("kubeconfig", "admin"),
            ("controller-manager.kubeconfig", "controller-manager"),
            ("scheduler.kubeconfig", "scheduler"),
        ] {
            let cfg = kubeconfig::with_client_cert(
                "vkube-dev",
                &self.server(),
                ca,
                kubeconfig::ClientCert {
                    cert_pem: bundle.get(&format!("{user}.crt")).unwrap_or_default(),
                    key_pem: bundle.get(&format!("{user}.key")).unwrap_or_default(),
                },
            );
            write_private(&self.dir.join(file), &kubeconfig::to_yaml(&cfg))?;
        }
        Ok(bundle)
    }

    fn etcd(&self, up: &Upstream) -> ProcessSpec {
        let p = &self.ports;
        let client = format!("http://127.0.0.1:{}", p.etcd_client);
        let peer = format!("http://127.0.0.1:{}", p.etcd_peer);
        ProcessSpec::new("etcd", up.etcd(), &self.dir.join("logs")).args([
            "--name=host".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=host={peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ])
    }

    fn apiserver(&self, up: &Upstream) -> ProcessSpec {
        let p = &self.ports;
        ProcessSpec::new("kube-apiserver", up.kube_apiserver(), &self.dir.join("logs"))
            .args([format!("--etcd-servers=http://127.0.0.1:{}", p.etcd_client)])
            .args(if self.real_node {
                // Pods on the real node reach it through the `kubernetes` Service, whose endpoint is
                // the node's address (the bridge is made later: it listens on every address).
                vec![
                    "--bind-address=0.0.0.0".to_string(),
                    format!("--advertise-address={}", node::ADDRESS),
                    "--endpoint-reconciler-type=lease".into(),
                    // Aggregated APIs (metrics-server) reached at their EndpointSlice's address,
                    // not through a ClusterIP kube-proxy would have to program first.
                    "--enable-aggregator-routing=true".into(),
                ]
            } else {
                // Loopback cannot be a Service endpoint; simulated nodes have no pods that need one.
                vec![
                    "--bind-address=127.0.0.1".to_string(),
                    "--advertise-address=127.0.0.1".into(),
                    "--endpoint-reconciler-type=none".into(),
                ]
            })
            .args([
                format!("--secure-port={}", p.apiserver),
                format!("--tls-cert-file={}", self.pki_path("apiserver.crt")),
                format!("--tls-private-key-file={}", self.pki_path("apiserver.key")),
                format!("--client-ca-file={}", self.pki_path("ca.crt")),
                "--authorization-mode=Node,RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", self.pki_path("sa.pub")),
                format!("--service-account-signing-key-file={}", self.pki_path("sa.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--allow-privileged=true".into(),
                format!("--requestheader-client-ca-file={}", self.pki_path("front-proxy-ca.crt")),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!("--proxy-client-cert-file={}", self.pki_path("front-proxy-client.crt")),
                format!("--proxy-client-key-file={}", self.pki_path("front-proxy-client.key")),
                format!("--kubelet-certificate-authority={}", self.pki_path("ca.crt")),
                // A real kubelet authenticates the API server for logs, exec and port-forward.
                format!("--kubelet-client-certificate={}", self.pki_path("apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", self.pki_path("apiserver-kubelet-client.key")),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--enable-priority-and-fairness=false".into(),
                "--max-requests-inflight=0".into(),
                "--max-mutating-requests-inflight=0".into(),
                // /debug/pprof for the host's admin: what a tenant costs the host API server is
                // profiled there (docs/benchmarks-notes.md, "Host load").
                "--profiling=true".into(),
            ])
    }

    fn controller_manager(&self, up: &Upstream) -> ProcessSpec {
        ProcessSpec::new("kube-controller-manager", up.kube_controller_manager(), &self.dir.join("logs")).args([
            format!("--kubeconfig={}", self.dir.join("controller-manager.kubeconfig").display()),
            format!("--authentication-kubeconfig={}", self.dir.join("controller-manager.kubeconfig").display()),
            format!("--authorization-kubeconfig={}", self.dir.join("controller-manager.kubeconfig").display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.controller_manager),
            format!("--root-ca-file={}", self.pki_path("ca.crt")),
            format!("--service-account-private-key-file={}", self.pki_path("sa.key")),
            "--use-service-account-credentials=true".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--cluster-signing-cert-file={}", self.pki_path("ca.crt")),
            format!("--cluster-signing-key-file={}", self.pki_path("ca.key")),
            // kwok hands out pod IPs and there is no cloud.
            "--controllers=*,-node-ipam-controller".into(),
            // kwok renews node leases from one process on a 2-core machine: under a burst of
            // thousands of pods it falls minutes behind (5 min was seen to run out at 10,000), and
            // nodes marked NotReady would touch every pod. Simulated nodes never die.
            "--node-monitor-grace-period=1h".into(),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--profiling=false".into(),
        ])
    }

    fn scheduler(&self, up: &Upstream) -> ProcessSpec {
        let kc = self.dir.join("scheduler.kubeconfig").display().to_string();
        ProcessSpec::new("kube-scheduler", up.kube_scheduler(), &self.dir.join("logs")).args([
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.scheduler),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--profiling=false".into(),
        ])
    }

    fn kwok(&self, up: &Upstream) -> ProcessSpec {
        let stages = std::fs::read_dir(up.kwok_stages())
            .map(|rd| {
                let mut v: Vec<String> = rd.filter_map(|e| e.ok()).map(|e| e.path().display().to_string()).collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        ProcessSpec::new("kwok", up.kwok(), &self.dir.join("logs"))
            // kwok reads ~/.kwok/kwok.yaml when it exists: keep a user's file out of our cluster.
            .env("HOME", self.dir.join("kwok").display().to_string())
            .args([
                format!("--kubeconfig={}", self.kubeconfig.display()),
                format!("--config={}", stages.join(",")),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                format!("--cidr={POD_CIDR}"),
                "--node-ip=127.0.0.1".into(),
                "--node-name=localhost".into(),
                format!("--node-port={}", self.ports.kwok),
                format!("--server-address=127.0.0.1:{}", self.ports.kwok),
                format!("--tls-cert-file={}", self.pki_path("kwok.crt")),
                format!("--tls-private-key-file={}", self.pki_path("kwok.key")),
                format!("--enable-crds={}", KWOK_DEBUG_KINDS.join(",")),
            ])
    }

    async fn install_kwok_rules(&self, client: &Client) -> Result<()> {
        let log_file = self.dir.join("kwok/container.log");
        // kwok serves log files in the CRI format kubelets write.
        let lines: String = (1..=5)
            .map(|i| format!("2026-01-01T00:00:0{i}.000000000Z stdout F vkube dev: simulated container log line {i}\n"))
            .collect();
        std::fs::write(&log_file, lines).map_err(io_err("writing the simulated container log"))?;
        let log = log_file.display().to_string();
        let work_dir = self.dir.join("kwok").display().to_string();
        let rules = [
            ("ClusterLogs", serde_json::json!({"logs": [{"logsFile": log, "follow": true}]})),
            ("ClusterExec", serde_json::json!({"execs": [{"local": {"workDir": work_dir}}]})),
            // Port-forwarded connections are echoed back: enough to prove the stream is wired.
            ("ClusterPortForward", serde_json::json!({"forwards": [{"command": ["cat"]}]})),
            ("ClusterAttach", serde_json::json!({"attaches": [{"logsFile": log}]})),
        ];
        for (kind, spec) in rules {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &kwok_resource(kind));
            let obj = serde_json::json!({
                "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": kind,
                "metadata": {"name": "vkube-dev-default"}, "spec": spec,
            });
            api.patch("vkube-dev-default", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
        }
        Ok(())
    }

    async fn wait_nodes_ready(&self, client: &Client, n: usize) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let timeout = Duration::from_secs(60);
        wait::until(timeout, Duration::from_millis(200), || {
            let nodes = nodes.clone();
            async move {
                let list = nodes.list(&Default::default()).await.map_err(|e| e.to_string())?;
                let ready = list.items.iter().filter(|n| node_ready(n)).count();
                Ok((ready >= n).then_some(()))
                    .and_then(|r| if r.is_none() { Err(format!("{ready} of {n} nodes Ready")) } else { Ok(r) })
            }
        })
        .await
        .map_err(|d| self.not_ready("kwok", timeout, d))
    }

    /// The controller manager makes it.
    async fn wait_default_service_account(&mut self, client: &Client) -> Result<()> {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.wait_running("kube-controller-manager", Duration::from_secs(60), || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.map(|o| o.map(drop)).map_err(|e| e.to_string()) }
        })
        .await
    }

    fn not_ready(&self, component: &str, timeout: Duration, detail: String) -> Error {
        Error::NotReady {
            component: component.into(),
            seconds: timeout.as_secs(),
            detail,
            log: self.dir.join("logs").join(format!("{component}.log")).display().to_string(),
        }
    }
}

/// Applies YAML documents (`---`-separated, each of a kind [`resource`] knows) on the host,
/// server-side, as [`FIELD_MANAGER`]; `what` names them in errors.
pub(crate) async fn apply_objects(client: &Client, what: &str, docs: &str) -> Result<()> {
    for doc in docs.split("\n---\n") {
        let obj: DynamicObject = serde_saphyr::from_str(doc).map_err(|e| Error::Node(format!("{what}: {e}")))?;
        let kind = obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or_default();
        let ar = resource(kind).ok_or_else(|| Error::Node(format!("{what}: unexpected kind {kind:?}")))?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
    }
    Ok(())
}

/// The API resource of each kind the host's own components' objects use ([`apply_objects`]).
pub(crate) fn resource(kind: &str) -> Option<ApiResource> {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::IngressClass;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    Some(match kind {
        "IngressClass" => ApiResource::erase::<IngressClass>(&()),
        "Namespace" => ApiResource::erase::<Namespace>(&()),
        "ServiceAccount" => ApiResource::erase::<ServiceAccount>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "EndpointSlice" => ApiResource::erase::<EndpointSlice>(&()),
        "ClusterRole" => ApiResource::erase::<ClusterRole>(&()),
        "ClusterRoleBinding" => ApiResource::erase::<ClusterRoleBinding>(&()),
        "RoleBinding" => ApiResource::erase::<RoleBinding>(&()),
        "APIService" => ApiResource::erase::<APIService>(&()),
        _ => return None,
    })
}

/// The token of a service account's long-lived token Secret `namespace/secret`, once the
/// controller manager's token controller has filled it in; `whose` names it in errors.
pub(crate) async fn service_account_token(
    client: &Client,
    namespace: &str,
    secret: &str,
    whose: &str,
) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    wait::until(Duration::from_secs(60), Duration::from_millis(200), || {
        let secrets = secrets.clone();
        async move {
            let s = secrets.get(secret).await.map_err(|e| e.to_string())?;
            let token = s.data.and_then(|d| d.get("token").cloned());
            Ok(token.map(|t| String::from_utf8_lossy(&t.0).to_string()))
        }
    })
    .await
    .map_err(|d| Error::Node(format!("{whose} service account token was not filled in: {d}")))
}

const KWOK_DEBUG_KINDS: [&str; 8] =
    ["Logs", "ClusterLogs", "Exec", "ClusterExec", "PortForward", "ClusterPortForward", "Attach", "ClusterAttach"];

/// The API resource of one of kwok's debugging kinds.
pub fn kwok_resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "Logs" | "ClusterLogs" => kind.to_lowercase(),
        "Attach" | "ClusterAttach" => format!("{}es", kind.to_lowercase()),
        _ => format!("{}s", kind.to_lowercase()),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kwok.x-k8s.io", "v1alpha1", kind), &plural)
}

fn host_pki_spec() -> BundleSpec {
    let dns: Vec<String> = vkube_pki::api_server_names();
    let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().expect("ip"), "10.96.0.1".parse().expect("ip")];
    BundleSpec {
        cas: vec![("ca".into(), "vkube-dev-ca".into()), ("front-proxy-ca".into(), "vkube-dev-front-proxy-ca".into())],
        leaves: vec![
            LeafSpec::server("apiserver", "ca", &dns, &ips),
            LeafSpec::server("kwok", "ca", &["localhost".to_string()], &ips[..1]),
            LeafSpec::client("admin", "ca", "vkube-dev-admin", Some("system:masters")),
            LeafSpec::client("controller-manager", "ca", "system:kube-controller-manager", None),
            LeafSpec::client("scheduler", "ca", "system:kube-scheduler", None),
            LeafSpec::client("front-proxy-client", "front-proxy-ca", "front-proxy-client", None),
            // The real node's: the API server's client identity at the kubelet, the kubelet's
            // and kube-proxy's at the API server, the kubelet's serving certificate.
            LeafSpec::client("apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", Some("system:masters")),
            LeafSpec::client("node", "ca", &format!("system:node:{}", node::NAME), Some("system:nodes")),
            LeafSpec::client("kube-proxy", "ca", "system:kube-proxy", None),
            LeafSpec::server("kubelet", "ca", &[node::NAME.to_string()], &[node::ADDRESS.parse().expect("ip")]),
        ],
        key_pairs: vec!["sa".into()],
    }
}

async fn install_kwok_crds(client: &Client, up: &Upstream) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = up.kwok_crds();
    let entries = std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?;
    let mut names = vec![];
    for entry in entries.filter_map(|e| e.ok()) {
        let text =
            std::fs::read_to_string(entry.path()).map_err(io_err(format!("reading {}", entry.path().display())))?;
        let crd: CustomResourceDefinition = serde_saphyr_from_str(&text, &entry.path())?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd)).await?;
        names.push(name);
    }
    wait::until(Duration::from_secs(30), Duration::from_millis(100), || {
        let crds = crds.clone();
        let names = names.clone();
        async move {
            for name in &names {
                let crd = crds.get(name).await.map_err(|e| e.to_string())?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if !established {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await
    .map_err(|detail| Error::NotReady { component: "kwok CRDs".into(), seconds: 30, detail, log: String::new() })
}

fn serde_saphyr_from_str<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    // The CRD files are YAML; JSON is what k8s-openapi types deserialize from most reliably, so
    // go through serde_json::Value.
    let value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| Error::State { path: path.to_path_buf(), reason: e.to_string() })?;
    serde_json::from_value(value).map_err(|e| Error::State { path: path.to_path_buf(), reason: e.to_string() })
}

async fn ensure_nodes(client: &Client, n: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..n {
        let name = format!("kwok-node-{i}");
        if nodes.get_opt(&name).await?.is_some() {
            continue;
        }
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node-role.kubernetes.io/agent": "",
                },
            },
        }))
        .expect("static node manifest");
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the API server behind `client` answers `/readyz`, failing early if a process of
/// `group` exits.
pub async fn wait_api_ready(
    client: &Client,
    group: &mut ProcessGroup,
    component: &str,
    log_dir: &Path,
    timeout: Duration,
) -> Result<()> {
    let res = wait::until(timeout, Duration::from_millis(100), || {
        let failed = group.check_running().err();
        async move {
            if let Some(e) = failed {
                return Err(e.to_string());
            }
            readyz(client).await.map(|_| Some(()))
        }
    })
    .await;
    group.check_running()?;
    res.map_err(|detail| Error::NotReady {
        component: component.into(),
        seconds: timeout.as_secs(),
        detail,
        log: log_dir.join(format!("{component}.log")).display().to_string(),
    })
}

async fn readyz(client: &Client) -> Result<(), String> {
    let req = http::Request::get("/readyz").body(vec![]).map_err(|e| e.to_string())?;
    client.request_text(req).await.map(|_| ()).map_err(|e| e.to_string())
}

pub fn read_state(dir: &Path) -> Result<Option<HostState>> {
    let path = dir.join("state.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| Error::State { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("state serializes");
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// Reads a bundle stored as files in `dir` (missing dir: empty bundle).
pub fn read_bundle(dir: &Path) -> Result<Bundle> {
    let mut bundle = Bundle::default();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(bundle) };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        let text =
            std::fs::read_to_string(entry.path()).map_err(io_err(format!("reading {}", entry.path().display())))?;
        bundle.files.insert(name, text);
    }
    Ok(bundle)
}

/// Writes a bundle as files in `dir`, readable only by the owner.
pub fn write_bundle(dir: &Path, bundle: &Bundle) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for (name, text) in &bundle.files {
        write_private(&dir.join(name), text)?;
    }
    Ok(())
}

/// Prints the last lines of each component log to stderr (for failed tests).
pub fn dump_logs(logs: &[(String, PathBuf)], lines: usize) {
    for (name, path) in logs {
        eprintln!("===== {name} ({}) =====\n{}", path.display(), log_tail(path, lines));
    }
}
