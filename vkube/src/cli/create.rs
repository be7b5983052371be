//! `vkube create NAME`.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use vkube::local::{LocalControlPlane, LocalOptions};
use vkube_localenv::Lifetime;
use vkube_localenv::process::{is_alive, read_recorded, stop_all_recorded};

use super::Target;

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub target: Target,
    /// Run the control plane as local processes against the host in KUBECONFIG (a host whose
    /// pods cannot run it, such as `vkube dev up`).
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub policy: vkube::controlplane::PolicyArgs,
    /// Extra flags for the control-plane process (`vkube run --help`), e.g. --sync-all-secrets.
    #[arg(long = "run-arg", value_name = "FLAG")]
    pub run_args: Vec<String>,
}

impl CreateArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        if !self.local {
            anyhow::bail!("only --local is available in this build: the Helm-based install is not implemented yet");
        }
        let started = Instant::now();
        let dir = self.target.local_dir();
        let recorded = read_recorded(&dir)?;
        if !recorded.is_empty() && recorded.iter().all(is_alive) {
            eprintln!("virtual cluster {} is already running locally", self.target.name);
            return Ok(());
        }
        // Leftovers of a crashed run go; data and certificates stay.
        stop_all_recorded(&dir)?;
        let (host_kubeconfig, host_context) = super::host_kubeconfig()?;
        let opts = LocalOptions {
            name: self.target.name.clone(),
            namespace: self.target.namespace(),
            dir,
            lifetime: Lifetime::Detached,
            vkube_binary: std::env::current_exe().context("locating the vkube binary")?,
            host_kubeconfig: std::fs::canonicalize(&host_kubeconfig).unwrap_or(host_kubeconfig),
            host_context,
            policy: self.policy,
            run_args: self.run_args,
        };
        eprintln!("creating virtual cluster {} in host namespace {} (local processes)", opts.name, opts.namespace);
        let progress = |step: &str| eprintln!("  {step}");
        let cp = LocalControlPlane::start(&opts, &progress)
            .await
            .with_context(|| format!("logs are in {}", opts.dir.join("logs").display()))?;
        let endpoint = cp.state.endpoint();
        cp.detach();
        eprintln!(
            "virtual cluster {} ready in {:.1} s at {endpoint}\n  kubeconfig: vkube connect {} --print > {}.kubeconfig",
            opts.name,
            started.elapsed().as_secs_f64(),
            opts.name,
            opts.name
        );
        Ok(())
    }
}
