//! `vkube pause NAME` / `vkube resume NAME`: the control plane stops and the cluster's host pods
//! go (nothing runs, nothing is lost: the virtual cluster's state is in its datastore); resume
//! starts the control plane, which recreates a host pod for every virtual pod.

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::apps::v1::StatefulSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, Patch};
use vkube::names;

use super::Target;
use super::clusters::{self, Mode, Status};

/// How long a paused chart control plane may take to stop (its grace period is 30 s).
const CONTROL_PLANE_STOP: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube pause team-a\n  vkube resume team-a")]
pub struct PauseArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube resume team-a\n  vkube resume team-a --timeout 10m")]
pub struct ResumeArgs {
    #[command(flatten)]
    pub target: Target,
    /// How long to wait for the control plane.
    #[arg(long, default_value = "5m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: std::time::Duration,
}

impl PauseArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        if cluster.status == Status::Paused {
            // A pause cut short (the host busy) may have left host pods: they go now.
            let n = vkube::controlplane::remove_host_pods(&host, &cluster.namespace, &cluster.name, Some(0)).await?;
            eprintln!("virtual cluster {} is already paused (removed {n} host pod(s) left behind)", cluster.name);
            return Ok(());
        }
        let ns = cluster.namespace.clone();
        // Marked first: whatever happens next, the next control plane knows the host pods were
        // removed on purpose.
        let svc: Api<Service> = Api::namespaced(host.clone(), &ns);
        let patch = vkube_kubeclient::patch::MetadataPatch::annotations([(names::ANNOTATION_PAUSED, Some("true"))]);
        svc.patch(&names::service(&cluster.name), &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch))
            .await?;
        eprintln!("pausing virtual cluster {}", cluster.name);
        match cluster.mode {
            Mode::Local => {
                let stopped = vkube_localenv::process::stop_all_recorded(&self.target.local_dir())?;
                eprintln!("  stopped {}", stopped.join(", "));
            }
            Mode::Chart => {
                let sts: Api<StatefulSet> = Api::namespaced(host.clone(), &ns);
                let patch = serde_json::json!({"spec": {"replicas": 0}});
                sts.patch(&cluster.name, &vkube_kubeclient::params::patch_params(), &Patch::Merge(patch))
                    .await
                    .context("scaling the control plane to 0")?;
                eprintln!("  control plane scaled to 0; waiting for its pod to stop");
                // Its syncer would recreate the host pods removed below while it shuts down.
                let pods: Api<Pod> = Api::namespaced(host.clone(), &ns);
                let selector =
                    ListParams::default().labels(&format!("{}={}", names::LABEL_CONTROL_PLANE, cluster.name));
                vkube_kubeclient::wait::until(CONTROL_PLANE_STOP, Duration::from_secs(1), || {
                    let pods = pods.clone();
                    let selector = selector.clone();
                    async move {
                        let left = pods.list(&selector).await.map_err(|e| e.to_string())?.items.len();
                        if left == 0 { Ok(Some(())) } else { Err(format!("{left} control-plane pod(s) still there")) }
                    }
                })
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the control plane did not stop within {} s ({e}); `kubectl -n {ns} get pods` shows why; run `vkube pause {}` again",
                        CONTROL_PLANE_STOP.as_secs(),
                        cluster.name
                    )
                })?;
            }
        }
        let n = vkube::controlplane::remove_host_pods(&host, &ns, &cluster.name, Some(0)).await?;
        eprintln!(
            "  removed {n} host pod(s); virtual cluster {} paused (`vkube resume {}` restores it)",
            cluster.name, cluster.name
        );
        Ok(())
    }
}

impl ResumeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        eprintln!("resuming virtual cluster {}", cluster.name);
        match cluster.mode {
            Mode::Local => {
                super::create::CreateArgs::resume_local(&self.target, self.timeout).await?;
            }
            Mode::Chart => {
                let sts: Api<StatefulSet> = Api::namespaced(host.clone(), &cluster.namespace);
                let patch = serde_json::json!({"spec": {"replicas": 1}});
                sts.patch(&cluster.name, &vkube_kubeclient::params::patch_params(), &Patch::Merge(patch))
                    .await
                    .context("scaling the control plane to 1")?;
                tokio::time::timeout(self.timeout, super::create::wait_chart_ready(&host, &self.target))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the control plane did not become ready within {} s; `vkube describe {}` shows why",
                            self.timeout.as_secs(),
                            cluster.name
                        )
                    })??;
            }
        }
        eprintln!("virtual cluster {} resumed", cluster.name);
        Ok(())
    }
}
