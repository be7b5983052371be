//! The TLS API proxy kubectl talks to.
//!
//! Every request is authenticated here (client certificate of the virtual CA, or a bearer token
//! the virtual API server accepts); anything else gets 401. Authenticated requests go to the
//! virtual API server as front-proxy requests (`X-Remote-User`/`-Group`/`-Extra-*` over a
//! connection authenticated with the front-proxy client certificate), so the API server applies
//! its own RBAC, impersonation (`kubectl --as`) and audit exactly as for a direct client. Pod
//! logs, exec, attach and port-forward are authorized against the virtual cluster, then sent to
//! the host API server for the translated host pod with the control plane's host credentials.
//!
//! Module map: `route` (which handler, pure), `auth`, `headers` (header hygiene, pure), `tls`,
//! `host_pod`, `upgrade`, `error` (what the proxy itself answers), `status`, `metrics`.

pub mod auth;
pub mod error;
pub mod headers;
mod host_pod;
pub mod metrics;
pub mod route;
mod services;
pub mod status;
pub mod tls;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use vkube_core::naming::Translator;
use vkube_core::policy::Policy;

use crate::auth::{Authenticator, Identity};
use crate::error::ProxyError;
use crate::metrics::{ErrorLabels, Metrics, RequestLabels, RouteLabels};
use crate::route::{Health, Route};
use crate::tls::{ClientCerts, ServingCert, TlsError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 flow-control windows for clients that speak HTTP/2 to the proxy (kubectl does): large
/// enough for a list of thousands of pods (the default 64 KiB made 16 concurrent lists 4x slower).
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
type UpstreamClient = HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// What the proxy needs to know. PEM strings come from the control plane's PKI bundle.
pub struct ProxyConfig {
    pub translator: Translator,
    /// The admin's isolation policy (Services created through the proxy are checked at once).
    pub policy: Policy,
    /// The virtual API server, e.g. `https://127.0.0.1:6443`.
    pub virtual_server: Uri,
    pub virtual_ca_pem: String,
    pub front_proxy_cert_pem: String,
    pub front_proxy_key_pem: String,
    /// A privileged client of the virtual API server (token and access reviews, pod lookups).
    pub admin: kube::Client,
    /// The control plane's own client of the host API server.
    pub host: kube::Client,
    pub serving: Arc<ServingCert>,
    /// What else must hold for `/readyz` (the syncer syncing): `Err` says what does not.
    pub ready: ReadyCheck,
    /// What else must hold for `/livez` and `/healthz` (the syncer not stopped for good).
    pub live: ReadyCheck,
}

pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct Proxy {
    translator: Translator,
    policy: Policy,
    virtual_server: Uri,
    /// HTTP/1.1 with a pool of keep-alive connections: concurrent requests travel on their own
    /// connections, handled on every core (one shared HTTP/2 connection is one task and capped
    /// GET throughput at 16 concurrent clients at 0.8 of direct), and upgrades, watches and log
    /// follows need no special path.
    upstream: UpstreamClient,
    auth: Authenticator,
    admin: kube::Client,
    host: kube::Client,
    acceptor: TlsAcceptor,
    metrics: Metrics,
    ready: ReadyCheck,
    live: ReadyCheck,
}

/// What is known about a connection once its TLS handshake is done.
struct Connection {
    /// The verified client-certificate identity; `Some(None)` for a certificate that failed.
    cert_identity: Option<Option<Identity>>,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, registry: &mut Registry) -> Result<Arc<Self>, TlsError> {
        let client_certs = ClientCerts::new(&cfg.virtual_ca_pem)?;
        let server = tls::server_config(cfg.serving.clone(), &client_certs)?;
        // hyper-rustls sets ALPN from the enabled versions: HTTP/1.1 only.
        let tls = tls::client_config(&cfg.virtual_ca_pem, &cfg.front_proxy_cert_pem, &cfg.front_proxy_key_pem)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        let upstream = HttpClient::builder(TokioExecutor::new()).build(https);
        Ok(Arc::new(Proxy {
            translator: cfg.translator,
            policy: cfg.policy,
            virtual_server: cfg.virtual_server,
            upstream,
            auth: Authenticator::new(client_certs, cfg.admin.clone()),
            admin: cfg.admin,
            host: cfg.host,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            metrics: Metrics::register(registry),
            ready: cfg.ready,
            live: cfg.live,
        }))
    }

    /// Serves until `shutdown` resolves, then lets open requests finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        registry: Arc<Registry>,
        shutdown: impl Future<Output = ()>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = tcp.set_nodelay(true);
            let proxy = self.clone();
            let registry = registry.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match proxy.acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let certs: Option<Vec<CertificateDer<'static>>> =
                    tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
                let conn = Arc::new(Connection {
                    cert_identity: certs.filter(|c| !c.is_empty()).map(|chain| {
                        if proxy.auth.verify_chain(&chain) { Identity::from_cert(&chain[0]) } else { None }
                    }),
                });
                let service = hyper::service::service_fn(move |req| {
                    let (proxy, conn, registry) = (proxy.clone(), conn.clone(), registry.clone());
                    async move { Ok::<_, Infallible>(proxy.handle(req, &conn, &registry).await) }
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http2()
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_concurrent_streams(1000);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        graceful.shutdown().await;
    }

    async fn handle(&self, req: Request<Incoming>, conn: &Connection, registry: &Registry) -> Response<ProxyBody> {
        let started = Instant::now();
        let route = route::route(req.method(), req.uri().path());
        let route_name = match route {
            Route::Health(_) => "health",
            Route::HostPod { .. } => "host_pod",
            Route::CreateService { .. } => "create_service",
            Route::Forward => "forward",
        };
        let result = match route {
            Route::Health(h) => Ok(self.health(h, registry).await),
            route => match self.identify(&req, conn).await {
                None => Err(ProxyError::Unauthorized),
                Some(id) => match route {
                    Route::HostPod { namespace, name, subresource } => {
                        self.host_pod(req, &id, &namespace, &name, subresource).await
                    }
                    Route::CreateService { namespace } => self.create_service(req, &id, &namespace).await,
                    _ => self.forward(req, &id).await,
                },
            },
        };
        let response = result.unwrap_or_else(|e| self.error_response(e));
        self.metrics
            .duration
            .get_or_create(&RouteLabels { route: route_name })
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&RequestLabels { route: route_name, code: response.status().as_u16() })
            .inc();
        response
    }

    /// Counts and logs an error the proxy answers itself, and answers it.
    fn error_response(&self, e: ProxyError) -> Response<ProxyBody> {
        match &e {
            ProxyError::Unauthorized => {
                self.metrics.unauthorized.inc();
            }
            ProxyError::Upstream { .. } => tracing::warn!(error = %e, "an API server call failed"),
            _ => tracing::debug!(error = %e, "request refused"),
        }
        self.metrics.errors.get_or_create(&ErrorLabels { kind: e.kind() }).inc();
        e.into_response()
    }

    async fn identify(&self, req: &Request<Incoming>, conn: &Connection) -> Option<Identity> {
        match &conn.cert_identity {
            // A presented certificate decides: a bad one is not rescued by a token.
            Some(id) => id.clone(),
            None => self.auth.authenticate_token(req.headers()).await,
        }
    }

    async fn health(&self, h: Health, registry: &Registry) -> Response<ProxyBody> {
        let text = |code: StatusCode, body: String| {
            Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(full(Bytes::from(body)))
                .expect("static response")
        };
        match h {
            Health::Healthz | Health::Livez => match (self.live)() {
                Ok(()) => text(StatusCode::OK, "ok".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not live: {why}")),
            },
            Health::Readyz => {
                if let Err(why) = (self.ready)() {
                    return text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"));
                }
                let req = Request::get("/readyz").body(vec![]).expect("static request");
                match self.admin.request_text(req).await {
                    Ok(_) => text(StatusCode::OK, "ok".into()),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("virtual API server not ready: {e}")),
                }
            }
            Health::Metrics => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, registry) {
                    Ok(()) => Response::builder()
                        .header(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(full(Bytes::from(out)))
                        .expect("static response"),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }
    }

    /// Sends a request to the virtual API server as `id`.
    async fn forward(&self, mut req: Request<Incoming>, id: &Identity) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        self.send_upstream(parts, body.map_err(BoxError::from).boxed_unsync(), id, client_upgrade).await
    }

    /// Sends a request whose body the proxy has already read (or rewritten).
    async fn forward_parts(
        &self,
        parts: http::request::Parts,
        body: ProxyBody,
        id: &Identity,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.send_upstream(parts, body, id, None).await
    }

    async fn send_upstream(
        &self,
        mut parts: http::request::Parts,
        body: ProxyBody,
        id: &Identity,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = client_upgrade.is_some();
        headers::sanitize_request(&mut parts.headers, upgrade, true);
        headers::add_identity(&mut parts.headers, id);
        parts.uri = self.upstream_uri(&parts.uri);
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);
        let client = &self.upstream;
        let resp =
            client.request(req).await.map_err(|e| ProxyError::upstream("the virtual API server is unreachable", e))?;
        upgrade::relay(resp, client_upgrade, "the virtual API server")
    }

    fn upstream_uri(&self, uri: &Uri) -> Uri {
        let mut parts = self.virtual_server.clone().into_parts();
        parts.path_and_query = uri.path_and_query().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| self.virtual_server.clone())
    }
}
