//! `vkube dev up|down|env`: the local dev host cluster, left running between commands.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use vkube_localenv::{HostCluster, HostOptions, Lifetime, Upstream, process, upstream};

#[derive(Subcommand)]
pub enum DevCommand {
    /// Start the dev host cluster (harmless when it already runs).
    #[command(
        after_help = "Examples:\n  vkube dev up\n  vkube dev up --nodes 10 && eval \"$(vkube dev env)\"\n  vkube dev up --real-nodes 1   # pods really run (root; hack/debian-deps.sh)"
    )]
    Up {
        /// Number of simulated nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Real nodes (0 or 1): containerd, kubelet and kube-proxy on this machine, so pods
        /// really run. Needs root and hack/debian-deps.sh; adds the bridge vkube0 (10.88.0.1/16),
        /// iptables chains, cgroups and sysctls, all undone by `vkube dev down`.
        #[arg(long, default_value_t = 0)]
        real_nodes: usize,
    },
    /// Stop the dev host cluster and every local virtual cluster; no process is left behind.
    #[command(after_help = "Example:\n  vkube dev down")]
    Down,
    /// Print shell exports: KUBECONFIG for the dev host, the pinned kubectl and helm first on PATH.
    /// Use as `eval "$(vkube dev env)"`.
    #[command(after_help = "Example:\n  eval \"$(vkube dev env)\"; kubectl get nodes")]
    Env,
}

/// Where the dev host cluster keeps its state.
pub fn host_dir() -> PathBuf {
    upstream::state_root().join("dev/host")
}

impl DevCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            DevCommand::Up { nodes, real_nodes } => up(nodes, real_nodes).await,
            DevCommand::Down => down(),
            DevCommand::Env => env(),
        }
    }
}

async fn up(nodes: usize, real_nodes: usize) -> anyhow::Result<()> {
    let dir = host_dir();
    if HostCluster::is_up(&dir).await {
        let state = vkube_localenv::host::read_state(&dir).ok().flatten();
        let ingress = state.filter(|s| s.real_node).map(|s| ingress_line(&s.ports)).unwrap_or_default();
        eprintln!("dev host cluster already running ({}){ingress}", dir.display());
        return Ok(());
    }
    // Whatever is left of an earlier run (a crashed component) goes first; data and certificates
    // stay, so existing kubeconfigs keep working.
    HostCluster::teardown_real_node(&dir)?;
    process::stop_all_recorded(&dir)?;
    let start = Instant::now();
    eprintln!("starting the dev host cluster in {}", dir.display());
    let progress = |step: &str| eprintln!("  {step}");
    let host = HostCluster::start(&dir, &HostOptions { nodes, real_nodes, lifetime: Lifetime::Detached }, &progress)
        .await
        .context("starting the dev host cluster (logs are in the directory above, under logs/)")?;
    if real_nodes > 0 {
        // The chart's pod can run on it: `vkube create NAME` (chart mode) works on this host.
        eprintln!("  the image of the chart's control plane (vkube as this binary)");
        let exe = std::env::current_exe().context("locating the vkube binary")?;
        let name = vkube_localenv::node::vkube_image_name(env!("CARGO_PKG_VERSION"));
        host.import_images(&[vkube_localenv::node::control_plane_image(&Upstream::locate()?, (&name, &exe))?])?;
    }
    let kubeconfig = host.kubeconfig.clone();
    let ingress = (real_nodes > 0).then(|| ingress_line(&host.ports));
    host.detach();
    eprintln!(
        "dev host cluster ready in {:.1} s\n  export KUBECONFIG={}\n  or: eval \"$(vkube dev env)\"{}",
        start.elapsed().as_secs_f64(),
        kubeconfig.display(),
        ingress.unwrap_or_default()
    );
    Ok(())
}

/// How to reach the real node's ingress controller.
fn ingress_line(ports: &vkube_localenv::host::HostPorts) -> String {
    format!(
        "\n  Ingresses of class {} (vkube create NAME --ingress-classes={0} --ingress-hosts=... \
         --ingress-metrics=http://127.0.0.1:{}/metrics): curl -H 'Host: NAME' http://127.0.0.1:{}/",
        vkube_localenv::ingress::CLASS,
        ports.ingress_metrics,
        ports.ingress
    )
}

fn down() -> anyhow::Result<()> {
    let mut stopped = vec![];
    // Local virtual clusters first: their control planes talk to the host.
    for ns in std::fs::read_dir(crate::cli::local_root()).into_iter().flatten().filter_map(|e| e.ok()) {
        for cluster in std::fs::read_dir(ns.path()).into_iter().flatten().filter_map(|e| e.ok()) {
            stopped.extend(process::stop_all_recorded(&cluster.path())?);
        }
    }
    // The real node before the API server: its teardown stops its processes and undoes what it
    // changed on the machine.
    stopped.extend(HostCluster::teardown_real_node(&host_dir())?);
    stopped.extend(process::stop_all_recorded(&host_dir())?);
    // Whatever else still runs from our state (a start that crashed before recording it).
    let strays = process::stop_strays(&upstream::state_root(), Duration::from_secs(10));
    if strays > 0 {
        stopped.push(format!("{strays} unrecorded process(es)"));
    }
    if stopped.is_empty() {
        eprintln!("nothing was running");
    } else {
        eprintln!("stopped {}", stopped.join(", "));
    }
    Ok(())
}

fn env() -> anyhow::Result<()> {
    let up = Upstream::locate()?;
    let dirs: Vec<String> = up.path_dirs().iter().map(|d| d.display().to_string()).collect();
    println!("export KUBECONFIG={}", host_dir().join("kubeconfig").display());
    println!("export PATH={}:\"$PATH\"", dirs.join(":"));
    Ok(())
}
