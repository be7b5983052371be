//! `vkube version [NAME]`: this client's version and the upstream versions it runs; with a NAME,
//! what each component of that cluster runs.

use clap::Args;
use serde::Serialize;

use super::describe::{self, Component};
use super::{Output, Target};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube version\n  vkube version team-a -o json")]
pub struct VersionArgs {
    /// A virtual cluster: also show its components' versions.
    pub name: Option<String>,
    /// Host namespace (default: vkube-NAME).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Serialize)]
struct Versions {
    client: ClientVersions,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<Vec<Component>>,
}

/// This binary and the upstream versions it was built to run (`hack/versions.env`).
#[derive(Debug, Serialize)]
struct ClientVersions {
    vkube: String,
    kubernetes: String,
    etcd: String,
}

impl VersionArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let pinned = vkube_core::versions::versions();
        let client = ClientVersions {
            vkube: format!("v{}", env!("CARGO_PKG_VERSION")),
            kubernetes: pinned.kubernetes,
            etcd: pinned.etcd,
        };
        let server = match &self.name {
            Some(name) => {
                let host = super::host_client().await?;
                let target = Target { name: name.clone(), namespace: self.namespace.clone() };
                Some(describe::describe(&host, &target).await?.components)
            }
            None => None,
        };
        let versions = Versions { client, server };
        if self.output.print(&versions)? {
            return Ok(());
        }
        let c = &versions.client;
        println!("Client: vkube {} (Kubernetes {}, etcd {})", c.vkube, c.kubernetes, c.etcd);
        if let (Some(name), Some(server)) = (&self.name, &versions.server) {
            println!("Server: {name}");
            for k in server {
                println!("  {:<24} {}", k.name, k.version.as_deref().unwrap_or("unknown"));
            }
        }
        Ok(())
    }
}
