//! The end-to-end test harness: a real host cluster (the same one `vkube dev up` starts) in a
//! temporary directory, on dynamically chosen ports so tests run in parallel. Every process is
//! stopped when the environment is dropped; if the test failed, each component's log is printed
//! first and the directory is kept for inspection.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vkube::local::{LocalControlPlane, LocalOptions};
use vkube_localenv::host::dump_logs;
use vkube_localenv::{HostCluster, HostOptions, Lifetime, Upstream};

pub use vkube_localenv::wait::until;

/// A selector-less Service `cache` and the EndpointSlice `cache-1` the tenant manages for it.
pub const SELECTORLESS_SERVICE_WITH_SLICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: cache}
spec:
  ports: [{port: 6379, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cache-1
  labels: {kubernetes.io/service-name: cache, endpointslice.kubernetes.io/managed-by: tenant}
addressType: IPv4
endpoints: [{addresses: [192.0.2.20]}]
ports: [{port: 6379, protocol: TCP}]
"#;

pub struct TestEnv {
    pub host: HostCluster,
    pub upstream: Upstream,
    dir: Option<tempfile::TempDir>,
}

impl TestEnv {
    /// A host cluster with `nodes` simulated nodes.
    pub async fn start(nodes: usize) -> TestEnv {
        Self::start_with(HostOptions { nodes, ..Default::default() }).await
    }

    /// A host cluster with `opts.nodes` simulated nodes and `opts.real_nodes` real ones.
    pub async fn start_with(opts: HostOptions) -> TestEnv {
        let upstream = Upstream::locate().expect("upstream binaries");
        let dir = tempfile::Builder::new().prefix("vkube-e2e-").tempdir().expect("temp dir");
        let progress = |step: &str| eprintln!("[{}] {step}", dir_name(dir.path()));
        let host = match HostCluster::start(dir.path(), &opts, &progress).await {
            Ok(h) => h,
            Err(e) => {
                dump_dir_logs(&dir.path().join("logs"));
                panic!("host cluster did not start: {e}");
            }
        };
        TestEnv { host, upstream, dir: Some(dir) }
    }

    pub fn dir(&self) -> &Path {
        &self.host.dir
    }

    pub async fn client(&self) -> kube::Client {
        self.host.client().await.expect("host client")
    }

    /// A virtual cluster on this host, its control plane as local processes (stopped on drop).
    pub async fn virtual_cluster(&self, name: &str) -> VirtualCluster {
        self.virtual_cluster_with(name, &[]).await
    }

    /// A virtual cluster whose control-plane process gets extra flags (`vkube run --help`).
    pub async fn virtual_cluster_with(&self, name: &str, run_args: &[&str]) -> VirtualCluster {
        self.virtual_cluster_with_policy(name, Default::default(), run_args).await
    }

    /// A virtual cluster under the admin's isolation policy `policy`.
    pub async fn virtual_cluster_with_policy(
        &self,
        name: &str,
        policy: vkube::controlplane::PolicyArgs,
        run_args: &[&str],
    ) -> VirtualCluster {
        let opts = LocalOptions {
            name: name.into(),
            namespace: vkube::names::default_namespace(name),
            dir: self.dir().join("virtual").join(name),
            lifetime: Lifetime::Attached,
            vkube_binary: vkube_bin(),
            host_kubeconfig: self.host.kubeconfig.clone(),
            host_context: None,
            policy,
            run_args: run_args.iter().map(|s| s.to_string()).collect(),
        };
        let progress = |step: &str| eprintln!("[virtual {name}] {step}");
        match LocalControlPlane::start(&opts, &progress).await {
            Ok(cp) => VirtualCluster { cp, opts, upstream: self.upstream.clone() },
            Err(e) => {
                dump_dir_logs(&opts.dir.join("logs"));
                panic!("virtual cluster {name} did not start: {e:#}");
            }
        }
    }

    /// `kubectl apply -f -` against the host cluster.
    pub fn apply(&self, yaml: &str) -> String {
        kubectl_apply(&self.upstream, &self.host.kubeconfig, yaml)
    }

    /// Runs the pinned kubectl against the host cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.upstream, &self.host.kubeconfig, args)
    }

    /// Runs kubectl against the host and returns stdout, failing the test on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_ok(&self.upstream, &self.host.kubeconfig, args)
    }

    /// Every host object still labelled as virtual cluster `name`'s (synced) or its control
    /// plane's, in any namespace: a sweep of every listable resource type the host serves, which
    /// must include every kind the syncer writes (`kind::host_resources`, the list `vkube delete`
    /// cleans up by).
    pub fn labelled_host_objects(&self, name: &str) -> Vec<String> {
        let types = self.kubectl_ok(&["api-resources", "--verbs=list", "-o", "name"]);
        let types: Vec<&str> = types.lines().filter(|t| !t.is_empty()).collect();
        for ar in vkube_syncer::kind::host_resources() {
            let full = if ar.group.is_empty() { ar.plural.clone() } else { format!("{}.{}", ar.plural, ar.group) };
            assert!(types.contains(&full.as_str()), "the sweep covers {full}: {types:?}");
        }
        let mut left = vec![];
        for label in [vkube_syncer::naming::LABEL_CLUSTER, vkube::names::LABEL_CONTROL_PLANE] {
            let selector = format!("{label}={name}");
            let out = self.kubectl_ok(&["get", &types.join(","), "-A", "-l", &selector, "-o", "name"]);
            left.extend(out.lines().filter(|l| !l.is_empty()).map(str::to_string));
        }
        left
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(&self.host.logs(), 60);
            if let Some(dir) = self.dir.take() {
                eprintln!("kept the failed environment's directory: {}", dir.keep().display());
            }
        }
    }
}

/// Prints the tail of every log in a directory (components that failed to start).
fn dump_dir_logs(dir: &Path) {
    let logs: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| (e.file_name().to_string_lossy().to_string(), e.path())).collect())
        .unwrap_or_default();
    dump_logs(&logs, 40);
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
}

/// Runs the pinned kubectl with the given kubeconfig.
pub fn kubectl(up: &Upstream, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(up.kubectl())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBECTL_KUBERC")
        .output()
        .expect("running kubectl")
}

/// Runs kubectl with `input` on stdin (`apply -f -` and the like).
pub fn kubectl_stdin(up: &Upstream, kubeconfig: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(up.kubectl())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing to kubectl");
    child.wait_with_output().expect("kubectl output")
}

/// `kubectl apply -f -` of `yaml`, which must succeed; returns stdout.
pub fn kubectl_apply(up: &Upstream, kubeconfig: &Path, yaml: &str) -> String {
    let out = kubectl_stdin(up, kubeconfig, &["apply", "-f", "-"], yaml);
    assert!(
        out.status.success(),
        "kubectl apply failed ({}):\n{}{}\n--- manifest ---\n{yaml}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`kubectl`], but the command must succeed; returns stdout.
pub fn kubectl_ok(up: &Upstream, kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(up, kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The built `vkube` binary next to the running executable (a test in `target/<profile>/deps/`,
/// or a binary in `target/<profile>/`); the test command builds it first.
pub fn vkube_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|d| d.join("vkube")).collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo build --bins` first (hack/test.sh does)",
            candidates[candidates.len() - 1].display()
        )
    })
}

/// Runs `kubectl port-forward <target...> :<port>` (e.g. `["-n", "ns", "deploy/web"]`) and
/// returns it with the local port it chose.
pub fn port_forward(up: &Upstream, kubeconfig: &Path, target: &[&str], port: u16) -> (std::process::Child, u16) {
    use std::io::Read;
    let mut pf = Command::new(up.kubectl())
        .arg("port-forward")
        .args(target)
        .arg(format!(":{port}"))
        .env("KUBECONFIG", kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl port-forward");
    let mut stdout = pf.stdout.take().expect("stdout");
    let mut first = String::new();
    let mut buf = [0u8; 256];
    while !first.contains('\n') {
        let n = stdout.read(&mut buf).expect("reading kubectl");
        assert!(n > 0, "kubectl port-forward exited");
        first.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // "Forwarding from 127.0.0.1:PORT -> <port>"
    let local: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected kubectl output: {first}"));
    // kubectl prints a line per connection: a closed pipe would end it.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (pf, local)
}

/// A plain-HTTP GET of `path` from `addr` (`host:port`), with a bearer token if given: the
/// status code and the whole response.
pub fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_get_host(addr, addr, path, bearer)
}

/// [`http_get`] with `host` as the Host header (a name-based virtual host: an Ingress's).
pub fn http_get_host(addr: &str, host: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting");
    // A stalled answer fails the test here rather than outlasting an `eventually`'s deadline.
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").expect("sending");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading");
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Checks that bytes sent through `kubectl port-forward` come back (kwok's default rule echoes
/// them), proving the stream reaches the pod end to end.
pub fn port_forward_echoes(up: &Upstream, kubeconfig: &Path, target: &str, port: u16, payload: &[u8]) {
    use std::io::{Read, Write};
    let (mut pf, local) = port_forward(up, kubeconfig, &[target], port);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", local)).expect("connecting to the forward");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    conn.write_all(payload).expect("writing");
    let mut echoed = vec![0u8; payload.len()];
    conn.read_exact(&mut echoed).expect("reading the echo");
    assert_eq!(echoed, payload);
    let _ = pf.kill();
    let _ = pf.wait();
}

pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    match until(timeout, Duration::from_millis(250), f).await {
        Ok(v) => v,
        Err(last) => panic!("{what}: not within {} s: {last}", timeout.as_secs()),
    }
}

/// The names of the objects `api` lists, sorted (an error as text, for [`eventually`]).
pub async fn sorted_names<K>(api: &kube::Api<K>) -> Result<Vec<String>, String>
where
    K: kube::Resource + Clone + std::fmt::Debug + k8s_openapi::serde::de::DeserializeOwned,
{
    let list = api.list(&Default::default()).await.map_err(|e| e.to_string())?;
    let mut names: Vec<String> = list.items.iter().map(kube::ResourceExt::name_any).collect();
    names.sort();
    Ok(names)
}

/// A virtual cluster started by the harness.
pub struct VirtualCluster {
    pub cp: LocalControlPlane,
    pub opts: LocalOptions,
    upstream: Upstream,
}

impl VirtualCluster {
    /// Waits for a Warning event on virtual object `object` in `ns` whose message contains
    /// `needle`.
    pub async fn warned(&self, ns: &str, object: &str, needle: &str) -> k8s_openapi::api::core::v1::Event {
        use kube::api::{Api, ListParams};
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.client().await, ns);
        let what = format!("a Warning event on {ns}/{object} containing {needle:?}");
        eventually(&what, Duration::from_secs(20), || async {
            let list = api
                .list(&ListParams::default().fields(&format!("involvedObject.name={object},type=Warning")))
                .await
                .map_err(|e| e.to_string())?
                .items;
            Ok(list.into_iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains(needle))))
        })
        .await
    }

    /// How this cluster's objects are named and marked on the host.
    pub fn translator(&self) -> vkube_syncer::naming::Translator {
        vkube_syncer::naming::Translator::new(self.name(), self.host_namespace())
    }

    /// The host objects of kind `K` the syncer made for this cluster.
    pub async fn host_list<K>(&self, env: &TestEnv) -> Vec<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: kube::Api<K> = kube::Api::namespaced(env.client().await, self.host_namespace());
        let selector = format!("{}={}", vkube_syncer::naming::LABEL_CLUSTER, self.name());
        api.list(&kube::api::ListParams::default().labels(&selector)).await.expect("host list").items
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// The host namespace its objects are synced into.
    pub fn host_namespace(&self) -> &str {
        &self.opts.namespace
    }

    /// The admin kubeconfig (through the proxy).
    pub fn kubeconfig(&self) -> PathBuf {
        self.cp.kubeconfig()
    }

    /// The API proxy's `host:port`, as the admin kubeconfig names it.
    pub fn proxy_address(&self) -> String {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("admin kubeconfig");
        let server = kc.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).expect("a server");
        server.trim_start_matches("https://").trim_end_matches('/').to_string()
    }

    pub async fn client(&self) -> kube::Client {
        self.cp.client().await.expect("virtual cluster client")
    }

    /// A client through the proxy that authenticates with `token` only.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut kc = kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("admin kubeconfig");
        for user in &mut kc.auth_infos {
            user.auth_info = Some(serde_json::from_value(serde_json::json!({"token": token})).expect("auth info"));
        }
        vkube_localenv::client::from_kubeconfig(kc, None).await.expect("client with a token")
    }

    /// Runs the pinned kubectl against the virtual cluster, through the proxy.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.upstream, &self.kubeconfig(), args)
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_ok(&self.upstream, &self.kubeconfig(), args)
    }

    /// Runs kubectl straight against the virtual API server, bypassing the proxy (works while
    /// the control-plane process is down).
    pub fn kubectl_direct_ok(&self, args: &[&str]) -> String {
        kubectl_ok(&self.upstream, &self.cp.direct_kubeconfig(), args)
    }

    /// `kubectl apply -f -` through the proxy.
    pub fn apply(&self, yaml: &str) -> String {
        kubectl_apply(&self.upstream, &self.kubeconfig(), yaml)
    }

    /// `kubectl apply -f -` through the proxy, returning the whole output (it may fail).
    pub fn try_apply(&self, yaml: &str) -> Output {
        kubectl_stdin(&self.upstream, &self.kubeconfig(), &["apply", "-f", "-"], yaml)
    }

    /// Kills the control-plane process (proxy and syncer) at once; upstream components stay.
    pub fn kill_controller(&mut self) {
        self.cp.kill_controller();
    }

    /// Starts the control-plane process again and waits until it answers.
    pub async fn start_controller(&mut self) {
        self.cp.start_controller().await.expect("restarting the control-plane process");
    }

    /// Stops every process of this control plane and starts them again on the same state.
    pub async fn restart(&mut self) {
        self.cp.stop_all();
        let name = self.opts.name.clone();
        let progress = |step: &str| eprintln!("[virtual {name} restart] {step}");
        self.cp = LocalControlPlane::start(&self.opts, &progress).await.expect("restarting the control plane");
    }
}

impl Drop for VirtualCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(&self.cp.logs(), 80);
        }
    }
}

/// The CLI with its own state directory and the host's kubeconfig; whatever it leaves running
/// is stopped when the test ends, pass or fail.
pub struct Cli {
    pub state: tempfile::TempDir,
    pub host_kubeconfig: PathBuf,
}

impl Cli {
    pub fn new(env: &TestEnv) -> Self {
        Cli { state: tempfile::tempdir().unwrap(), host_kubeconfig: env.host.kubeconfig.clone() }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(&vkube_bin(), args)
    }

    /// [`Cli::command`] with another vkube binary (an older version, for an upgrade).
    pub fn command_of(&self, binary: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(binary);
        c.args(args).env("VKUBE_STATE", self.state.path()).env("KUBECONFIG", &self.host_kubeconfig);
        // Local clusters keep snapshots on this machine's disk, which other work shares: the
        // tests' snapshots are small, and a disk filled by builds must not refuse them.
        c.env("VKUBE_SNAPSHOT_MAX_FULL_PERCENT", "99");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vkube {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["list", "-o", "json"])).unwrap()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        vkube_localenv::process::stop_strays(self.state.path(), Duration::from_secs(5));
    }
}
