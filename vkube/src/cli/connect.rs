//! `vkube connect NAME`: the admin kubeconfig from its host Secret.

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use vkube::names;

use super::Target;

#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the kubeconfig instead of adding a context to the current kubeconfig.
    #[arg(long)]
    pub print: bool,
}

impl ConnectArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let ns = self.target.namespace();
        let name = names::kubeconfig_secret(&self.target.name);
        let secret = Api::<Secret>::namespaced(host, &ns)
            .get_opt(&name)
            .await
            .with_context(|| format!("reading Secret {ns}/{name}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "virtual cluster {} not found in host namespace {ns} (no Secret {name}); `vkube list` shows what exists",
                    self.target.name
                )
            })?;
        let yaml = secret
            .data
            .and_then(|d| d.get(names::KUBECONFIG_KEY).cloned())
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| anyhow::anyhow!("Secret {ns}/{name} has no {} key", names::KUBECONFIG_KEY))?;
        if self.print {
            print!("{yaml}");
            return Ok(());
        }
        anyhow::bail!("only --print is available in this build");
    }
}
