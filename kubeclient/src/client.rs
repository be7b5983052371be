//! The one way vkube builds Kubernetes clients: from a kubeconfig (file or in memory). Clients
//! have no read timeout, so watches, log follows and exec sessions stay open.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::Result;
use crate::limit::WriteLimit;

pub async fn from_kubeconfig_file(path: &Path, context: Option<&str>) -> Result<Client> {
    from_kubeconfig(Kubeconfig::read_from(path)?, context).await
}

pub async fn from_kubeconfig(kubeconfig: Kubeconfig, context: Option<&str>) -> Result<Client> {
    let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    config.read_timeout = None;
    Ok(Client::try_from(config)?)
}

/// A client for `server` trusting `ca_pem`, authenticating with a client certificate.
pub async fn from_pem(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Client> {
    let kc = vkube_pki::kubeconfig::with_client_cert(
        "vkube",
        server,
        ca_pem,
        vkube_pki::kubeconfig::ClientCert { cert_pem, key_pem },
    );
    from_kubeconfig(kc, None).await
}

/// The host cluster client: in-cluster credentials when no kubeconfig is given and we run in a
/// pod, else the kubeconfig (explicit path, `$KUBECONFIG`, `~/.kube/config`).
pub async fn host(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Client> {
    Ok(Client::try_from(host_config(kubeconfig, context).await?)?)
}

/// The host client whose writes draw on `limit` (the control plane's: one tenant's burst of
/// objects must not starve the host API server). Clients given clones of one limit share its
/// bucket. Build it on the runtime that will use it (the limit's queue runs there).
pub async fn host_limited(kubeconfig: Option<&Path>, context: Option<&str>, limit: &WriteLimit) -> Result<Client> {
    let config = host_config(kubeconfig, context).await?;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(limit).build())
}

async fn host_config(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Config> {
    let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let mut config = match kubeconfig {
        Some(path) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None => match Config::incluster() {
            Ok(c) if context.is_none() => c,
            _ => Config::from_kubeconfig(&options).await?,
        },
    };
    config.read_timeout = None;
    Ok(config)
}
