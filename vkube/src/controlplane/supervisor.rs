//! `vkube run --supervise`: the upstream components (etcd, and kube-apiserver with
//! kube-controller-manager in one process, `kube-control-plane`) as children of the control-plane
//! process, so it can stop them while the cluster sleeps and start them again on the first
//! request. Each child is restarted when it dies (backoff 1 s doubling to 30 s; reset after a
//! minute of running) and stopped with SIGTERM, then SIGKILL.
//!
//! The children run in their own process groups and survive a crash or restart of `vkube run` (the
//! virtual API server keeps answering); the next `vkube run` finds them in `supervised.json` (same
//! shape as the local mode's `processes.json`) and adopts each one whose command line is the one it
//! would start, so an upgrade or crash of the control-plane process does not restart its API
//! server. Any other leftover is stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::components;

/// The file in the state directory listing the running children.
pub const RECORD_FILE: &str = "supervised.json";
const STOP_GRACE: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before dying is restarted at once, not after the grown backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Where the upstream components come from and where they keep their data (`vkube run`'s flags).
#[derive(clap::Args, Debug, Clone)]
pub struct SuperviseArgs {
    /// Run etcd and kube-control-plane (kube-apiserver and kube-controller-manager) as children
    /// of this process (needed for sleep mode). Without it they run beside it.
    #[arg(long, env = "VKUBE_SUPERVISE")]
    pub supervise: bool,
    /// Logs (`logs/NAME.log`), etcd's data (`etcd/`) and the record of the children.
    #[arg(long, env = "VKUBE_STATE_DIR", default_value = "/var/lib/vkube")]
    pub state_dir: PathBuf,
    #[arg(long, env = "VKUBE_ETCD_BINARY", default_value = "etcd")]
    pub etcd_binary: PathBuf,
    /// Makes etcd's data directory from a snapshot (`vkube restore`, `vkube reset`).
    #[arg(long, env = "VKUBE_ETCDUTL_BINARY", default_value = "etcdutl")]
    pub etcdutl_binary: PathBuf,
    /// kube-apiserver and kube-controller-manager in one process (hack/kube-control-plane).
    #[arg(long, env = "VKUBE_CONTROL_PLANE_BINARY", default_value = components::CONTROL_PLANE)]
    pub control_plane_binary: PathBuf,
    #[arg(long, env = "VKUBE_ETCD_CLIENT_PORT", default_value_t = 2379)]
    pub etcd_client_port: u16,
    #[arg(long, env = "VKUBE_ETCD_PEER_PORT", default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// The host's node-port range, given to the virtual API server.
    #[arg(long, env = "VKUBE_SERVICE_NODE_PORT_RANGE", default_value = components::DEFAULT_NODE_PORT_RANGE)]
    pub service_node_port_range: String,
    /// A new cluster starts with this snapshot's state (`vkube create --local --from-snapshot`):
    /// restored into etcd's empty data directory before etcd first starts; ignored once it has data.
    #[arg(long, env = "VKUBE_INITIAL_SNAPSHOT")]
    pub initial_snapshot: Option<PathBuf>,
    /// etcd syncs every write to disk (off for throwaway local clusters).
    #[arg(long, env = "VKUBE_ETCD_DURABLE")]
    pub etcd_durable: bool,
}

/// The components, in the order they start.
pub const COMPONENTS: [&str; 2] = [components::ETCD, components::CONTROL_PLANE];

/// One child's command line.
#[derive(Clone, Debug)]
pub struct Child {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl Child {
    /// What the child runs: its command line, the contents of the files it names (the
    /// admission configuration, kubeconfigs) and its environment (`child_env`: Go settings), so
    /// a child started under other settings is never adopted for this one.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (k, v) in child_env(self.name, std::env::vars_os()) {
            h.update(k.as_encoded_bytes());
            h.update([b'=']);
            h.update(v.as_encoded_bytes());
            h.update([0]);
        }
        for a in std::iter::once(self.program.display().to_string()).chain(self.args.iter().cloned()) {
            h.update(a.as_bytes());
            h.update([0]);
            if let Some((_, path)) = a.split_once('=')
                && path.starts_with('/')
                && let Ok(bytes) = std::fs::read(path)
            {
                h.update(&bytes);
            }
            h.update([0]);
        }
        format!("{:x}", h.finalize())
    }
}

/// What is written down about a running child (localenv's `Recorded`, which `vkube pause`,
/// `delete` and `dev down` read to stop leftovers of a crashed `vkube run`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    pub program: PathBuf,
    pub log: PathBuf,
    /// [`Child::fingerprint`] of what it was started as.
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabel {
    component: &'static str,
}

#[derive(Clone, Default)]
pub struct SupervisorMetrics {
    restarts: Family<ComponentLabel, Counter>,
}

impl SupervisorMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = SupervisorMetrics::default();
        registry.register(
            "vkube_component_restarts",
            "Upstream components restarted after they died (supervised control planes)",
            m.restarts.clone(),
        );
        m
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Supervisor {
    state_dir: PathBuf,
    metrics: SupervisorMetrics,
    records: Arc<Mutex<BTreeMap<&'static str, Recorded>>>,
    /// Started children, oldest first (stopped newest first).
    running: Vec<(&'static str, Running)>,
    /// What a previous `vkube run` left running: adopted by `start` if it matches, else stopped.
    leftovers: Vec<Recorded>,
}

impl Supervisor {
    /// Reads what a previous `vkube run` left running from `state_dir` (it crashed, was killed
    /// or upgraded).
    pub fn new(state_dir: &Path, metrics: SupervisorMetrics) -> anyhow::Result<Supervisor> {
        std::fs::create_dir_all(state_dir.join("logs"))
            .with_context(|| format!("creating {}", state_dir.join("logs").display()))?;
        let (leftovers, mut unknown): (Vec<Recorded>, Vec<Recorded>) =
            read_records(state_dir).into_iter().filter(is_alive).partition(|r| leak_name(&r.name).is_some());
        // A component of an older version (kube-apiserver and kube-controller-manager ran apart
        // before kube-control-plane): nothing will adopt it, and it holds the ports. The
        // controller manager first: its watches would hold the API server's graceful shutdown.
        unknown.sort_by_key(|r| !r.name.contains("controller-manager"));
        for old in unknown {
            tracing::info!(component = old.name, pid = old.pid, "stopping the previous version's component");
            stop_pid(old.pid, STOP_GRACE);
        }
        let records = leftovers.iter().filter_map(|r| Some((leak_name(&r.name)?, r.clone()))).collect();
        Ok(Supervisor {
            state_dir: state_dir.into(),
            metrics,
            records: Arc::new(Mutex::new(records)),
            running: vec![],
            leftovers,
        })
    }

    /// Starts `child` (or adopts the previous run's, if it runs this very command line with the
    /// same files) and keeps it running until [`Supervisor::stop_all`].
    pub async fn start(&mut self, child: Child) {
        let fingerprint = child.fingerprint();
        let adopted = match self.leftovers.iter().position(|r| r.name == child.name) {
            Some(i) => {
                let old = self.leftovers.remove(i);
                if runs(&old, &child) && old.fingerprint == fingerprint {
                    tracing::info!(
                        component = child.name,
                        pid = old.pid,
                        "adopted from the previous control-plane process"
                    );
                    Some(old.pid)
                } else {
                    tracing::info!(
                        component = child.name,
                        pid = old.pid,
                        "stopping the previous control-plane process's, started with other settings"
                    );
                    let _ = tokio::task::spawn_blocking(move || stop_pid(old.pid, STOP_GRACE)).await;
                    None
                }
            }
            None => None,
        };
        let (stop, stopped) = watch::channel(false);
        let log = self.log_path(child.name);
        let records = self.records.clone();
        let state_dir = self.state_dir.clone();
        let restarts = self.metrics.restarts.get_or_create(&ComponentLabel { component: child.name }).clone();
        let name = child.name;
        let task = tokio::spawn(keep_running(child, fingerprint, adopted, log, stopped, restarts, move |rec| {
            let mut all = records.lock().unwrap_or_else(|e| e.into_inner());
            match rec {
                Some(r) => all.insert(name, r),
                None => all.remove(name),
            };
            write_records_to(&state_dir, &all);
        }));
        self.running.push((name, Running { stop, task }));
    }

    /// Whether any child is running or restarting.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Stops every child, newest first, each waited for before the next, and whatever the
    /// previous run left that was not adopted.
    pub async fn stop_all(&mut self) {
        while let Some((name, r)) = self.running.pop() {
            let _ = r.stop.send(true);
            if let Err(e) = r.task.await {
                tracing::warn!(component = name, error = %e, "its supervisor task failed");
            }
        }
        for old in std::mem::take(&mut self.leftovers).into_iter().rev() {
            tracing::info!(component = %old.name, pid = old.pid, "stopping a child of the previous control-plane process");
            let pid = old.pid;
            let _ = tokio::task::spawn_blocking(move || stop_pid(pid, STOP_GRACE)).await;
            self.records.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, r| r.pid != old.pid);
        }
        self.write_records();
    }

    /// Where a child's output goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{name}.log"))
    }

    /// The pid of a running child.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|r| r.pid)
    }

    fn write_records(&self) {
        // Recorded: what runs now, adopted leftovers included (a kill before they are adopted
        // or stopped leaves them findable).
        write_records_to(&self.state_dir, &self.records.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A running child: spawned by this process, or adopted from the previous one (not our child:
/// watched through /proc).
enum Proc {
    Spawned(tokio::process::Child),
    Adopted(u32),
}

impl Proc {
    /// Its pid; 0 once a spawned child was reaped (never signalled: 0 is our own group).
    fn pid(&self) -> u32 {
        match self {
            Proc::Spawned(c) => c.id().unwrap_or_default(),
            Proc::Adopted(pid) => *pid,
        }
    }

    /// Until it exits.
    async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        match self {
            Proc::Spawned(c) => c.wait().await.ok(),
            Proc::Adopted(pid) => {
                while kill(Pid::from_raw(*pid as i32), None).is_ok() && !is_zombie(Pid::from_raw(*pid as i32)) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            }
        }
    }

    /// SIGTERM, SIGKILL after the grace period.
    async fn stop(&mut self, name: &str) {
        if self.pid() == 0 {
            return;
        }
        let pid = Pid::from_raw(self.pid() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, self.wait()).await.is_err() {
            tracing::warn!(component = name, %pid, "did not stop within its grace period; killing it");
            let _ = kill(pid, Signal::SIGKILL);
            let _ = self.wait().await;
        }
    }
}

/// The child's life: started (or adopted), restarted with backoff when it dies, stopped when asked.
async fn keep_running(
    child: Child,
    fingerprint: String,
    mut adopted: Option<u32>,
    log: PathBuf,
    mut stop: watch::Receiver<bool>,
    restarts: Counter,
    record: impl Fn(Option<Recorded>),
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let spawned = match adopted.take() {
            Some(pid) => Ok(Proc::Adopted(pid)),
            None => spawn(&child, &log).map(Proc::Spawned),
        };
        let mut proc = match spawned {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(component = child.name, error = %e, "could not start; retrying");
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = proc.pid();
        if matches!(proc, Proc::Spawned(_)) {
            tracing::info!(component = child.name, pid, "started");
        }
        record(Some(Recorded {
            name: child.name.into(),
            pid,
            program: child.program.clone(),
            log: log.clone(),
            fingerprint: fingerprint.clone(),
        }));
        let exited = tokio::select! {
            status = proc.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        match exited {
            Some(status) => {
                record(None);
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(
                    component = child.name, status = ?status, log = %log.display(),
                    restart_in_seconds = backoff.as_secs(), "exited; restarting it"
                );
                restarts.inc();
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            None => {
                proc.stop(child.name).await;
                record(None);
                tracing::info!(component = child.name, "stopped");
                return;
            }
        }
    }
}

/// Whether the recorded process runs exactly `child`'s command line.
fn runs(rec: &Recorded, child: &Child) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", rec.pid)) else { return false };
    let argv: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    rec.program == child.program && argv.get(1..) == Some(child.args.as_slice())
}

/// The component names are the supervisor's own static strings; a record naming another is not
/// adopted.
fn leak_name(name: &str) -> Option<&'static str> {
    COMPONENTS.into_iter().find(|n| *n == name)
}

/// Waits `d`; true if asked to stop meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// A child's environment: its component's Go defaults (`components::go_defaults`), then what of
/// this process's environment it gets, which takes precedence: where programs are, and the Go
/// runtime's settings (GOGC, GOMEMLIMIT, GOMAXPROCS, GODEBUG). Never the host's in-cluster
/// variables (`KUBERNETES_SERVICE_*`, beside the host token in the chart's container: a child
/// that fell back to in-cluster configuration would act on the host as the control plane) nor
/// vkube's own settings.
fn child_env(
    component: &str,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> BTreeMap<std::ffi::OsString, std::ffi::OsString> {
    let defaults = components::go_defaults(component).iter().map(|(k, v)| (k.into(), v.into()));
    let inherited = vars.filter(|(k, _)| {
        let k = k.to_string_lossy();
        matches!(k.as_ref(), "PATH" | "HOME" | "TZ" | "LANG") || k.starts_with("GO")
    });
    defaults.chain(inherited).collect()
}

fn spawn(child: &Child, log: &Path) -> std::io::Result<tokio::process::Child> {
    let out = std::fs::File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    tokio::process::Command::new(&child.program)
        .args(&child.args)
        .env_clear()
        .envs(child_env(child.name, std::env::vars_os()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own group: a signal meant for the control-plane process is not its children's.
        .process_group(0)
        .spawn()
}

fn read_records(dir: &Path) -> Vec<Recorded> {
    std::fs::read_to_string(dir.join(RECORD_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn write_records_to(dir: &Path, records: &BTreeMap<&'static str, Recorded>) {
    let list: Vec<&Recorded> = records.values().collect();
    let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
    let written = serde_json::to_vec_pretty(&list)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, dir.join(RECORD_FILE)));
    if let Err(e) = written {
        tracing::warn!(error = %e, dir = %dir.display(), "could not record the running children");
    }
}

/// Whether `rec`'s pid still runs its program (a pid reused by another program is not ours).
fn is_alive(rec: &Recorded) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", rec.pid)) else { return false };
    let exe = exe.to_string_lossy();
    let running = Path::new(exe.trim_end_matches(" (deleted)"));
    // The program may have been given by name (found on PATH) or through a symlink.
    running == rec.program
        || std::fs::canonicalize(&rec.program).is_ok_and(|p| p == running)
        || (rec.program.components().count() == 1 && running.file_name() == rec.program.file_name())
}

fn stop_pid(pid: u32, grace: Duration) {
    let pid = Pid::from_raw(pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    if !exits_within(pid, grace) {
        let _ = kill(pid, Signal::SIGKILL);
        // Gone (or a zombie, which holds no port) before a successor starts.
        exits_within(pid, Duration::from_secs(2));
    }
}

fn exits_within(pid: Pid, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if kill(pid, None).is_err() || is_zombie(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// etcd's data directory, in the state directory.
pub fn etcd_data_dir(args: &SuperviseArgs) -> PathBuf {
    args.state_dir.join("etcd")
}

/// The two children of a supervised control plane, etcd and kube-control-plane, with the flags
/// `components` writes.
pub fn children(
    args: &SuperviseArgs,
    cert_dir: &Path,
    apiserver_port: u16,
    service_cidr: &str,
    virtual_scheduler: bool,
) -> (Child, Child) {
    let data_dir = etcd_data_dir(args);
    let admission = cert_dir.join(super::ADMISSION_FILE);
    let layout = components::Layout {
        cert_dir,
        data_dir: &data_dir,
        etcd_client_port: args.etcd_client_port,
        etcd_peer_port: args.etcd_peer_port,
        apiserver_port,
        service_cidr,
        node_port_range: &args.service_node_port_range,
        admission_config: &admission,
        durable: args.etcd_durable,
    };
    let kubeconfig = cert_dir.join(super::CONTROLLER_MANAGER_KUBECONFIG);
    let scheduler = virtual_scheduler.then(|| cert_dir.join(super::SCHEDULER_KUBECONFIG));
    (
        Child { name: components::ETCD, program: args.etcd_binary.clone(), args: components::etcd(&layout) },
        Child {
            name: components::CONTROL_PLANE,
            program: args.control_plane_binary.clone(),
            args: components::control_plane(&kubeconfig, scheduler.as_deref(), &layout),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &'static str, script: &str) -> Child {
        Child { name, program: "/bin/sh".into(), args: vec!["-c".into(), script.into()] }
    }

    fn env_of(component: &str, vars: &[(&str, &str)]) -> Vec<(String, String)> {
        let vars = vars.iter().map(|(k, v)| (k.into(), v.into()));
        child_env(component, vars)
            .into_iter()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn children_get_no_host_credentials_or_vkube_settings() {
        let env =
            ["KUBERNETES_SERVICE_HOST", "KUBERNETES_PORT", "VKUBE_HOST_KUBECONFIG", "GOMEMLIMIT", "PATH", "RUST_LOG"]
                .map(|k| (k, "x"));
        let keys: Vec<String> = env_of("etcd", &env).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["GOGC", "GOMEMLIMIT", "PATH"]);
    }

    #[test]
    fn components_start_with_their_go_defaults_unless_the_operator_sets_them() {
        let own = |k: &str, v: &str| (k.to_string(), v.to_string());
        for component in COMPONENTS {
            assert_eq!(env_of(component, &[("PATH", "/bin")]), [own("GOGC", "50"), own("PATH", "/bin")]);
            assert_eq!(env_of(component, &[("GOGC", "200")]), [own("GOGC", "200")]);
        }
    }

    #[tokio::test]
    async fn children_are_restarted_recorded_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = SupervisorMetrics::register(&mut registry);
        let mut s = Supervisor::new(dir.path(), metrics.clone()).unwrap();
        // One that dies at once (restarted), one that runs until stopped (and ignores nothing).
        s.start(sh("flaky", "echo ran; exit 3")).await;
        s.start(sh("steady", "sleep 600; true")).await;
        let restarts = || metrics.restarts.get_or_create(&ComponentLabel { component: "flaky" }).get();
        // Polled: a loaded machine may take a while to run and reap it.
        let deadline = Instant::now() + Duration::from_secs(15);
        while restarts() < 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let runs = std::fs::read_to_string(dir.path().join("logs/flaky.log")).unwrap_or_default();
        let steady = s.pid("steady").expect("recorded while running");
        let recorded = read_records(dir.path());
        assert!(recorded.iter().any(|r| r.pid == steady && r.name == "steady"), "{recorded:?}");
        assert!(is_alive(&recorded.iter().find(|r| r.name == "steady").unwrap().clone()));
        assert!(restarts() >= 1, "restarted after exiting: {}, log {runs:?}", restarts());
        s.stop_all().await;
        assert!(s.is_empty());
        assert!(kill(Pid::from_raw(steady as i32), None).is_err(), "stopped and reaped");
        assert!(read_records(dir.path()).is_empty(), "nothing recorded once stopped");
    }

    /// A process of ours, reaped by a thread of this test once it exits. Returned once its
    /// command line shows: `spawn` returns as soon as the exec has begun, before the kernel sets
    /// the new program's arguments (an empty `/proc/PID/cmdline` would not be adopted).
    fn stray(program: &str, args: &[&str]) -> (u32, std::thread::JoinHandle<()>) {
        let mut child = std::process::Command::new(program).args(args).spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().is_empty() {
            assert!(Instant::now() < deadline, "{program} never showed its command line");
            std::thread::sleep(Duration::from_millis(5));
        }
        (pid, std::thread::spawn(move || drop(child.wait())))
    }

    #[tokio::test]
    async fn a_previous_runs_children_are_adopted_if_they_match_else_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (same, same_reaper) = stray("/bin/sleep", &["600"]);
        let (other, other_reaper) = stray("/bin/sleep", &["599"]);
        let (older, older_reaper) = stray("/bin/sleep", &["598"]);
        let sleep = |name, arg: &str| Child { name, program: "/bin/sleep".into(), args: vec![arg.into()] };
        let rec = |name: &str, pid| Recorded {
            name: name.into(),
            pid,
            program: "/bin/sleep".into(),
            log: PathBuf::new(),
            fingerprint: sleep("etcd", "600").fingerprint(),
        };
        // etcd as it would start, the control plane with other flags, and a component an older
        // version ran apart (kube-apiserver, now inside kube-control-plane).
        let cp = components::CONTROL_PLANE;
        let old = [rec("etcd", same), rec(cp, other), rec("kube-apiserver", older)];
        std::fs::write(dir.path().join(RECORD_FILE), serde_json::to_string(&old).unwrap()).unwrap();

        let mut s = Supervisor::new(dir.path(), SupervisorMetrics::default()).unwrap();
        // Exited (its reaper thread ends) by the time `new` returns: it holds the ports.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !older_reaper.is_finished() {
            assert!(Instant::now() < deadline, "the older version's component is stopped at once");
            std::thread::sleep(Duration::from_millis(20));
        }
        s.start(sleep("etcd", "600")).await;
        s.start(sleep(cp, "600")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.pid("etcd"), Some(same), "the same command line is adopted, not restarted");
        other_reaper.join().unwrap();
        assert!(!is_alive(&rec("x", other)), "one with other flags is replaced");
        let replaced = s.pid(cp).unwrap();
        assert_ne!(replaced, other);
        s.stop_all().await;
        same_reaper.join().unwrap();
        assert!(!is_alive(&rec("x", same)), "stopped once adopted");
        assert!(!is_alive(&rec("x", replaced)));
        assert!(read_records(dir.path()).is_empty());
    }

    #[test]
    fn the_fingerprint_follows_the_files_a_child_names() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("admission.yaml");
        std::fs::write(&conf, "level: baseline").unwrap();
        let child = Child {
            name: components::CONTROL_PLANE,
            program: "/bin/true".into(),
            args: vec![format!("--admission-control-config-file={}", conf.display())],
        };
        let before = child.fingerprint();
        assert_eq!(child.fingerprint(), before);
        std::fs::write(&conf, "level: restricted").unwrap();
        assert_ne!(child.fingerprint(), before, "a restart with a stricter policy must not adopt the old API server");
    }
}
