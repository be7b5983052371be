//! `vkube sleep NAME` / `vkube wake NAME`: sleep mode by hand. The control plane keeps running and
//! acts on a request annotation on its host Service; this waits until it says it is done.

use std::time::{Duration, Instant};

use clap::Args;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch};
use vkube::names;

use super::Target;
use super::clusters::{self, Status};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube sleep team-a\n  vkube wake team-a --timeout 2m")]
pub struct PowerArgs {
    #[command(flatten)]
    pub target: Target,
    /// How long to wait for the control plane to finish.
    #[arg(long, default_value = "2m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: Duration,
}

impl PowerArgs {
    pub async fn sleep(self) -> anyhow::Result<()> {
        self.request("sleep", "Sleeping").await
    }

    pub async fn wake(self) -> anyhow::Result<()> {
        self.request("wake", "Running").await
    }

    async fn request(self, request: &str, want: &str) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        if matches!(cluster.status, Status::Stopped | Status::Paused) {
            anyhow::bail!(
                "virtual cluster {} is {:?}: start it with `vkube resume {}` first",
                cluster.name,
                cluster.status,
                cluster.name
            );
        }
        let svc: Api<Service> = Api::namespaced(host, &cluster.namespace);
        let name = names::service(&cluster.name);
        let power = |s: &Service| s.metadata.annotations.as_ref().and_then(|a| a.get(names::ANNOTATION_POWER)).cloned();
        let since =
            |s: &Service| s.metadata.annotations.as_ref().and_then(|a| a.get(names::ANNOTATION_POWER_SINCE)).cloned();
        let before = svc.get(&name).await?;
        if power(&before).as_deref().unwrap_or("Running") == want && cluster.status != Status::NotReady {
            eprintln!("virtual cluster {} is already {}", cluster.name, want.to_lowercase());
            return Ok(());
        }
        let patch =
            vkube_kubeclient::patch::MetadataPatch::annotations([(names::ANNOTATION_POWER_REQUEST, Some(request))]);
        svc.patch(&name, &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch)).await?;
        eprintln!("asked virtual cluster {} to {request}; waiting (up to {} s)", cluster.name, self.timeout.as_secs());
        let started = Instant::now();
        let old_since = since(&before);
        vkube_kubeclient::wait::until(self.timeout, Duration::from_millis(250), || {
            let (svc, name) = (svc.clone(), name.clone());
            let old_since = old_since.clone();
            async move {
                let s = svc.get(&name).await.map_err(|e| e.to_string())?;
                Ok((power(&s).as_deref() == Some(want) && since(&s) != old_since).then_some(()))
            }
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "virtual cluster {} did not become {} within {} s ({e}); `vkube logs {}` shows why",
                cluster.name,
                want.to_lowercase(),
                self.timeout.as_secs(),
                cluster.name
            )
        })?;
        eprintln!(
            "virtual cluster {} is {} ({:.1} s)",
            cluster.name,
            want.to_lowercase(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
