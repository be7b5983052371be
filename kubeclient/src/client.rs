//! The one way vkube builds Kubernetes clients: from a kubeconfig (file or in memory). Clients
//! have no read timeout, so watches, log follows and exec sessions stay open.

use std::path::Path;

use http::Response;
use http_body_util::BodyExt;
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::{Body, ClientBuilder, ConfigExt, DynBody, retry::RetryPolicy};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tower::retry::RetryLayer;
use tower::util::BoxService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use crate::Result;
use crate::limit::WriteLimit;

pub async fn from_kubeconfig_file(path: &Path, context: Option<&str>) -> Result<Client> {
    from_kubeconfig(Kubeconfig::read_from(path)?, context).await
}

pub async fn from_kubeconfig(kubeconfig: Kubeconfig, context: Option<&str>) -> Result<Client> {
    let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    config.read_timeout = None;
    Ok(builder(config)?.build())
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
    Ok(builder(host_config(kubeconfig, context).await?)?.build())
}

/// The host client whose writes draw on `limit` (the control plane's: one tenant's burst of
/// objects must not starve the host API server). Clients given clones of one limit share its
/// bucket. Build it on the runtime that will use it (the limit's queue runs there).
pub async fn host_limited(kubeconfig: Option<&Path>, context: Option<&str>, limit: &WriteLimit) -> Result<Client> {
    let config = host_config(kubeconfig, context).await?;
    Ok(builder(config)?.with_layer(limit).build())
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

/// kube-client's `GenericService`, which it does not export.
type GenericService = BoxService<http::Request<Body>, Response<Box<DynBody>>, BoxError>;

/// kube's own client stack (kube-client's `ClientBuilder::try_from`: TLS, timeouts, retries of
/// server errors, authentication, extra headers) on connections with TCP_NODELAY. Without it a
/// small write that follows another waits for the peer's delayed ACK (up to 40 ms on Linux):
/// every frame of an exec, attach or port-forward session vkube relays. Left out: kube's trace
/// layer (vkube logs a failure where it handles it), the expiry of an exec plugin's client
/// certificate (`Client::valid_until`, which nothing here reads), compression (kube's `gzip` is
/// off). A kubeconfig with a proxy gets kube's own stack, which says the proxy is not supported.
fn builder(config: Config) -> Result<ClientBuilder<GenericService>> {
    if config.proxy_url.is_some() {
        return Ok(ClientBuilder::try_from(config)?);
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let mut connector = TimeoutConnector::new(config.rustls_https_connector_with_connector(tcp)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = hyper_util::client::legacy::Builder::new(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http)
        .map_response(|res: Response<hyper::body::Incoming>| {
            res.map(|b| Box::new(b.map_err(BoxError::from)) as Box<DynBody>)
        })
        .boxed();
    Ok(ClientBuilder::new(service, config.default_namespace))
}
