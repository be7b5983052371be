//! The CLI commands an admin or CI runs against a host cluster.

pub mod certs;
pub mod clusters;
pub mod connect;
pub mod create;
pub mod dashboard;
pub mod delete;
pub mod describe;
pub mod helm;
pub mod list;
pub mod logs;
pub mod pause;
pub mod platform;
pub mod sleep;
pub mod snapshot;
pub mod upgrade;
pub mod usage;
pub mod version;

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{Args, ValueEnum};
use serde::Serialize;
use vkube::names;

/// How a command that prints data prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

impl Output {
    /// Prints `data` as JSON or YAML and returns true; false for a table, which the caller prints.
    pub fn print<T: Serialize>(self, data: &T) -> anyhow::Result<bool> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(data)?),
            Output::Yaml => print!("{}", serde_saphyr::to_string(data)?),
            Output::Table => return Ok(false),
        }
        Ok(true)
    }
}

/// The host kubeconfig context chosen with `--context` (default: the file's current context).
pub static HOST_CONTEXT: OnceLock<String> = OnceLock::new();

/// Which virtual cluster a command is about.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The virtual cluster's name.
    pub name: String,
    /// Host namespace (default: vkube-NAME).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

impl Target {
    pub fn namespace(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| names::default_namespace(&self.name))
    }

    /// Where a local control plane of this cluster keeps its state.
    pub fn local_dir(&self) -> PathBuf {
        local_root().join(self.namespace()).join(&self.name)
    }
}

/// Local control planes, one directory per host namespace and name.
pub fn local_root() -> PathBuf {
    vkube_localenv::upstream::state_root().join("local")
}

/// The host kubeconfig file and its current context, as kubectl would pick them.
pub fn host_kubeconfig() -> anyhow::Result<(PathBuf, Option<String>)> {
    let path = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).next())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
        .ok_or_else(|| anyhow::anyhow!("no host kubeconfig: set KUBECONFIG (e.g. eval \"$(vkube dev env)\")"))?;
    let kc = kube::config::Kubeconfig::read_from(&path)
        .map_err(|e| anyhow::anyhow!("reading the host kubeconfig {}: {e}", path.display()))?;
    let Some(chosen) = HOST_CONTEXT.get() else { return Ok((path, kc.current_context)) };
    if !kc.contexts.iter().any(|c| &c.name == chosen) {
        let known: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!("no context {chosen} in {} (it has: {})", path.display(), known.join(", "));
    }
    Ok((path, Some(chosen.clone())))
}

/// A client of the host: the kubeconfig's, or inside a pod of the host without one (`vkube
/// platform` as a Deployment) its ServiceAccount's.
pub async fn host_client() -> anyhow::Result<kube::Client> {
    let no_kubeconfig = std::env::var_os("KUBECONFIG").is_none()
        && std::env::var_os("HOME").is_none_or(|h| !PathBuf::from(h).join(".kube/config").exists());
    if no_kubeconfig && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return vkube_kubeclient::client::host(None, None)
            .await
            .map_err(|e| anyhow::anyhow!("the pod's in-cluster credentials: {e}"));
    }
    let (path, context) = host_kubeconfig()?;
    Ok(vkube_kubeclient::client::from_kubeconfig_file(&path, context.as_deref()).await?)
}
