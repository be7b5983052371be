//! Where the virtual API server may connect. Its "cluster" and "controlplane" egress (admission
//! webhooks, aggregated APIs, service and node proxies, kubelets) goes through this HTTP CONNECT
//! proxy on a unix socket, which opens only connections to addresses the caller allows (this
//! cluster's own host Services): a tenant's webhook URL or APIService cannot make the control
//! plane call the host's API server, a cloud metadata service or another tenant. Connections to
//! the kubelet port of any other address (the virtual nodes' addresses, which the host's nodes
//! give) never reach the network: vkube serves them itself (`kubelet`), as it serves the resource
//! metrics API's name (`resource_metrics`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;

use crate::kubelet::{self, Kubelet};
use crate::resource_metrics::{self, ResourceMetrics};

/// What vkube answers itself on the virtual API server's way out.
#[derive(Clone)]
pub struct InProcess {
    pub kubelet: Arc<Kubelet>,
    pub metrics: Arc<ResourceMetrics>,
}

/// Whether the virtual API server may connect to an address.
pub type Allowed = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// Serves CONNECT on the unix socket `path` (replacing a stale one) until the task is dropped.
pub async fn serve(path: &Path, allowed: Allowed, in_process: InProcess) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (allowed, in_process) = (allowed.clone(), in_process.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| connect(req, allowed.clone(), in_process.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "egress connection ended");
            }
        });
    }
}

fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r
}

async fn connect(
    req: Request<Incoming>,
    allowed: Allowed,
    in_process: InProcess,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::CONNECT {
        return Ok(answer(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT"));
    }
    let metrics = req.uri().authority().is_some_and(|a| {
        a.host() == resource_metrics::HOST && a.port_u16() == Some(vkube_core::contract::RESOURCE_METRICS_PORT)
    });
    if metrics {
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => in_process.metrics.serve(TokioIo::new(upgraded)).await,
                Err(e) => tracing::debug!(error = %e, "egress upgrade failed"),
            }
        });
        return Ok(answer(StatusCode::OK, ""));
    }
    // Only literal addresses: the API server resolves Services to their ClusterIPs itself, and a
    // name would be resolved here, where the tenant does not choose the resolver's answers.
    let target: Option<SocketAddr> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let service = target.filter(|t| allowed(*t));
    let kubelet_host = req
        .uri()
        .authority()
        .filter(|a| service.is_none() && a.port_u16() == Some(kubelet::PORT))
        .map(|a| a.host().trim_start_matches('[').trim_end_matches(']').to_string());
    if let Some(host) = kubelet_host {
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => in_process.kubelet.serve(TokioIo::new(upgraded), host).await,
                Err(e) => tracing::debug!(error = %e, "egress upgrade failed"),
            }
        });
        return Ok(answer(StatusCode::OK, ""));
    }
    let Some(target) = service else {
        tracing::warn!(target = ?req.uri().authority().map(|a| a.as_str()), "egress refused: not one of this cluster's Services");
        return Ok(answer(StatusCode::FORBIDDEN, "not one of this virtual cluster's Services"));
    };
    let mut tcp = match tokio::net::TcpStream::connect(target).await {
        Ok(tcp) => tcp,
        Err(e) => return Ok(answer(StatusCode::BAD_GATEWAY, &format!("connecting to {target}: {e}"))),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut tcp).await;
            }
            Err(e) => tracing::debug!(error = %e, "egress upgrade failed"),
        }
    });
    Ok(answer(StatusCode::OK, ""))
}

/// The virtual API server's egress configuration: through [`serve`] on `socket`, "cluster"
/// traffic (webhooks and APIServices naming a Service, service and node proxies) and
/// "controlplane" traffic (webhooks with a URL; the virtual API server has no audit, tracing or
/// authentication webhooks of its own). etcd stays direct.
pub fn config(socket: &Path) -> String {
    let via = |name: &str| {
        format!(
            "- name: {name}\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      uds:\n        udsName: {}\n",
            socket.display()
        )
    };
    format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n{}{}",
        via("cluster"),
        via("controlplane")
    )
}
