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
//! `host_pod`, `upgrade`, `error` (what the proxy itself answers), `status`, `metrics`; and the
//! virtual API server's way out, `egress`, with what it answers in-process: `kubelet` and
//! `resource_metrics` (the virtual cluster's `metrics.k8s.io`).

pub mod auth;
mod connections;
pub mod egress;
pub mod error;
pub mod headers;
mod host_pod;
mod host_proxy;
pub mod kubelet;
pub mod metrics;
pub mod resource_metrics;
pub mod route;
mod services;
pub mod sleep;
pub mod status;
pub mod tls;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use vkube_core::naming::Translator;
use vkube_core::policy::Policy;

use crate::auth::{Authenticator, Identity, ReviewLimit};
use crate::error::ProxyError;
use crate::metrics::{DropLabels, ErrorLabels, Metrics, RequestLabels, RouteLabels};
use crate::route::{Health, Route};
use crate::tls::{ClientCerts, ServingCert, TlsError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 flow-control windows for clients that speak HTTP/2 to the proxy (kubectl does): large
/// enough for a list of thousands of pods (the default 64 KiB made 16 concurrent lists 4x slower).
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// How often an idle HTTP/2 client is pinged; one that does not answer within the header
/// timeout is dropped.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
type UpstreamClient = HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A request body read whole, at most `max` bytes; `what` names it and `advice` says what to do
/// when it is larger (413).
pub(crate) async fn read_limited(
    body: hyper::body::Incoming,
    max: usize,
    what: &str,
    advice: &str,
) -> Result<bytes::Bytes, ProxyError> {
    use http_body_util::BodyExt;
    let collected =
        http_body_util::Limited::new(body, max).collect().await.map_err(|e| match e
            .downcast_ref::<http_body_util::LengthLimitError>()
        {
            Some(_) => ProxyError::TooLarge(format!("{what} is over {} MiB; {advice}", max >> 20)),
            None => ProxyError::BadRequest(format!("reading the request body: {e}")),
        })?;
    Ok(collected.to_bytes())
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
    pub limits: ProxyLimits,
    /// Sleep mode: what counts as activity, and waking on it (`Sleep::always_running` without).
    pub sleep: sleep::Sleep,
    /// What serves vkube's own operations once authorized (none: they answer 404).
    pub operations: Option<Operations>,
}

/// Serves one of vkube's own operations (`route::Operation`) that the proxy has authorized.
pub type Operations = Arc<
    dyn Fn(
            route::Operation,
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>
        + Send
        + Sync,
>;

/// What bounds the load one client can put on the proxy (and through it on the API servers).
#[derive(Clone, Copy, Debug)]
pub struct ProxyLimits {
    /// Connections served at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold at once; more are closed at once.
    pub max_connections_per_address: usize,
    pub tls_handshake_timeout: Duration,
    /// For every HTTP/1 request's headers, and any connection's first request.
    pub header_read_timeout: Duration,
    /// Reviews of bearer tokens never seen valid.
    pub token_reviews: ReviewLimit,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_connections: 1024,
            max_connections_per_address: 256,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            token_reviews: ReviewLimit::default(),
        }
    }
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
    limits: ProxyLimits,
    sleep: sleep::Sleep,
    operations: Option<Operations>,
}

/// What is known about a connection once its TLS handshake is done.
struct Connection {
    /// The verified client-certificate identity; `Some(None)` for a certificate that failed.
    cert_identity: Option<Option<Identity>>,
    peer: std::net::IpAddr,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, registry: &mut Registry) -> Result<Arc<Self>, TlsError> {
        let client_certs = ClientCerts::new(&cfg.virtual_ca_pem)?;
        let server = tls::server_config(cfg.serving.clone(), &client_certs)?;
        // hyper-rustls sets ALPN from the enabled versions: HTTP/1.1 only.
        let tls = tls::client_config(&cfg.virtual_ca_pem, &cfg.front_proxy_cert_pem, &cfg.front_proxy_key_pem)?;
        // No Nagle delay: exec, attach and port-forward sessions travel on these connections in
        // small writes, which would otherwise wait for the delayed ACK of the previous one.
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let upstream = HttpClient::builder(TokioExecutor::new()).build(https);
        let metrics = Metrics::register(registry);
        registry.register(
            "vkube_activity",
            "Requests that counted as activity (sleep mode), by user (bounded) and verb",
            cfg.sleep.activity.counted.clone(),
        );
        Ok(Arc::new(Proxy {
            translator: cfg.translator,
            policy: cfg.policy,
            virtual_server: cfg.virtual_server,
            upstream,
            auth: Authenticator::new(client_certs, cfg.admin.clone(), cfg.limits.token_reviews, metrics.auth.clone()),
            admin: cfg.admin,
            host: cfg.host,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            metrics,
            ready: cfg.ready,
            live: cfg.live,
            limits: cfg.limits,
            sleep: cfg.sleep,
            operations: cfg.operations,
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
        // Over the cap, new connections wait in the listen backlog until one closes.
        let slots = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let per_address = connections::PerAddress::new(self.limits.max_connections_per_address);
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = &mut shutdown => break,
            };
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
            let Some(held) = per_address.try_hold(peer.ip()) else {
                self.metrics.dropped_connections.get_or_create(&DropLabels { reason: "per_address_limit" }).inc();
                tracing::debug!(%peer, "the address holds its share of connections: closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let proxy = self.clone();
            let registry = registry.clone();
            let watcher = graceful.watcher();
            // One client connection: TLS within `tls_handshake_timeout`, the first request's
            // headers within `header_read_timeout` (and every later HTTP/1 request's), then served
            // until it ends.
            let slots = connections::Slots::new(permit, held);
            tokio::spawn(async move {
                let limits = proxy.limits;
                let dropped = |reason| proxy.metrics.dropped_connections.get_or_create(&DropLabels { reason }).inc();
                let tls = match tokio::time::timeout(limits.tls_handshake_timeout, proxy.acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        dropped("tls_handshake_timeout");
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let certs: Option<Vec<CertificateDer<'static>>> =
                    tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
                let conn = Arc::new(Connection {
                    cert_identity: certs.filter(|c| !c.is_empty()).map(|chain| {
                        if proxy.auth.verify_chain(&chain) { Identity::from_cert(&chain[0]) } else { None }
                    }),
                    peer: peer.ip(),
                });
                let served = Arc::new(AtomicBool::new(false));
                let service = {
                    let (proxy, served) = (proxy.clone(), served.clone());
                    let slots = slots.clone();
                    hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        served.store(true, Ordering::Relaxed);
                        req.extensions_mut().insert(slots.clone());
                        let (proxy, conn, registry) = (proxy.clone(), conn.clone(), registry.clone());
                        async move { Ok::<_, Infallible>(proxy.handle(req, &conn, &registry).await) }
                    })
                };
                // hyper's HTTP/1 header timeout does not cover HTTP/2, nor a connection that never sends
                // a byte (hyper waits for one to tell the protocol): this does, for the first request.
                let first_request = async {
                    tokio::time::sleep(limits.header_read_timeout).await;
                    if served.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                };
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_concurrent_streams(1000)
                    .keep_alive_interval(Some(H2_KEEP_ALIVE))
                    .keep_alive_timeout(limits.header_read_timeout);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                let result = tokio::select! {
                    r = watcher.watch(conn.into_owned()) => Some(r),
                    () = first_request => None,
                };
                match result {
                    None => {
                        dropped("first_request_timeout");
                        tracing::debug!(%peer, "no request within the header timeout");
                    }
                    Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
                    Some(Ok(())) => {}
                }
            });
        }
        graceful.shutdown().await;
    }

    async fn handle(&self, req: Request<Incoming>, conn: &Connection, registry: &Registry) -> Response<ProxyBody> {
        let started = Instant::now();
        let (route_name, result) = match canonical_request(req) {
            Err(e) => ("invalid", Err(e)),
            Ok((req, path)) => {
                let route = route::route(req.method(), &path);
                let route_name = match route {
                    Route::Health(_) => "health",
                    Route::PodLog { .. } => "pod_log",
                    Route::PodSession => "pod_session",
                    Route::HostProxy { .. } => "host_proxy",
                    Route::CreateService { .. } => "create_service",
                    Route::PatchService => "patch_service",
                    Route::Refused(_) => "refused",
                    Route::Operation(_) => "operation",
                    Route::Forward => "forward",
                };
                (route_name, self.dispatch(route, req, conn, registry).await)
            }
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

    async fn dispatch(
        &self,
        route: Route,
        req: Request<Incoming>,
        conn: &Connection,
        registry: &Registry,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Route::Health(h) = route {
            return Ok(self.health(h, registry).await);
        }
        if let Route::Operation(op) = route {
            return self.operation(op, req, conn).await;
        }
        let background = sleep::background(req.uri(), req.headers());
        if self.sleep.power() != sleep::Power::Running {
            self.wake_for(&req, conn, background).await?;
        }
        let id = self.identify(&req, conn).await?.ok_or(ProxyError::Unauthorized)?;
        let counted = background.is_none() && self.sleep.counts_user(&id.user);
        if counted {
            self.sleep.activity.record(&id.user, sleep::verb(req.method()));
        }
        match route {
            Route::PodLog { namespace, name } => self.pod_log(req, &id, &namespace, &name).await,
            Route::PodSession => {
                let session = counted.then(|| self.sleep.activity.clone());
                self.forward(req, &id, session).await
            }
            Route::HostProxy { namespace, target, name, rest } => {
                self.host_proxy(req, &id, &namespace, target, &name, &rest).await
            }
            Route::CreateService { namespace } => self.create_service(req, &id, &namespace).await,
            Route::PatchService => self.patch_service(req, &id).await,
            Route::Refused(why) => Err(ProxyError::Forbidden(why)),
            Route::Health(_) | Route::Operation(_) | Route::Forward => self.forward(req, &id, None).await,
        }
    }

    /// vkube's own operations, for the cluster's admins: authorized by the virtual API server
    /// (RBAC on the path: `cluster-admin` may, others only if a role names it), never counted as
    /// activity and never waking the cluster. Asleep, there is no API server to ask: only a
    /// client certificate of the group `system:masters` (which the API server allows everything,
    /// whatever RBAC says) gets through.
    async fn operation(
        &self,
        op: route::Operation,
        req: Request<Incoming>,
        conn: &Connection,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(serve) = self.operations.clone() else {
            return Err(ProxyError::NotFound(format!(
                "{} is served only by a control plane that runs its own components (vkube run --supervise)",
                op.path()
            )));
        };
        let user = if self.sleep.power() == sleep::Power::Running {
            let id = self.identify(&req, conn).await?.ok_or(ProxyError::Unauthorized)?;
            let acting = self.auth.effective(&id, req.headers()).await?;
            let (path, verb) = op.authorization(req.uri().query());
            if !self.auth.allowed_path(&acting, path, verb).await? {
                return Err(ProxyError::Forbidden(format!(
                    "forbidden: User \"{}\" cannot {verb} path \"{path}\"",
                    acting.user
                )));
            }
            acting.user
        } else {
            let impersonating = req.headers().keys().any(|k| k.as_str().starts_with("impersonate-"));
            match &conn.cert_identity {
                Some(None) => return Err(ProxyError::Unauthorized),
                Some(Some(id)) if !impersonating && id.groups.iter().any(|g| g == "system:masters") => id.user.clone(),
                _ => {
                    return Err(ProxyError::Asleep(format!(
                        "the virtual cluster is {}: only the admin kubeconfig's client certificate (group system:masters) \
                         may call {} until it runs; use it, or `vkube wake` first",
                        self.sleep.power().as_str(),
                        op.path()
                    )));
                }
            }
        };
        tracing::info!(user = %user, operation = op.path(), "serving a vkube operation");
        serve(op, req).await
    }

    /// A request finding the cluster asleep: one that counts wakes it and is held until it runs;
    /// the others (background, service accounts, tokens not seen lately, which cannot be reviewed
    /// while the API server sleeps) get 503 with `Retry-After`, and do not wake it.
    async fn wake_for(
        &self,
        req: &Request<Incoming>,
        conn: &Connection,
        background: Option<&'static str>,
    ) -> Result<(), ProxyError> {
        let user = match &conn.cert_identity {
            // A certificate not of this cluster's CA: as unauthorized as when awake.
            Some(None) => return Err(ProxyError::Unauthorized),
            Some(Some(id)) => Some(id.user.clone()),
            None => self.auth.known_user(req.headers()).await,
        };
        let why_not = match (background, user) {
            (Some(why), _) => why,
            (None, None) => {
                "credentials it cannot check while asleep: a bearer token is checked by the API server, \
                 so only one used in the last hour wakes it; use a client certificate or `vkube wake`"
            }
            (None, Some(u)) if !self.sleep.counts_user(&u) => "a service account or system user",
            (None, Some(u)) => {
                tracing::info!(user = %u, path = %req.uri().path(), "a request wakes the virtual cluster");
                return self.sleep.wake_and_wait().await;
            }
        };
        Err(ProxyError::Asleep(match self.sleep.power() {
            sleep::Power::Waking => format!("the virtual cluster is starting; retry shortly ({why_not})"),
            _ => format!(
                "the virtual cluster is asleep and this request does not wake it ({why_not}); \
                 a request of a user, or `vkube wake`, wakes it"
            ),
        }))
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

    /// `Ok(None)`: not authenticated (401); `Err`: a token could not be reviewed (429 over the
    /// limit of reviews, 503 when the review failed).
    async fn identify(&self, req: &Request<Incoming>, conn: &Connection) -> Result<Option<Identity>, ProxyError> {
        match &conn.cert_identity {
            // A presented certificate decides: a bad one is not rescued by a token.
            Some(id) => Ok(id.clone()),
            None => self.auth.authenticate_token(req.headers(), conn.peer).await,
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
            // Asleep, the proxy is what must be reachable (to be woken): ready. Waking, not yet.
            Health::Readyz if self.sleep.power() == sleep::Power::Sleeping => {
                text(StatusCode::OK, "ok (Sleeping)".into())
            }
            Health::Readyz if self.sleep.power() != sleep::Power::Running => {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}", self.sleep.power().as_str()))
            }
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

    /// Sends a request to the virtual API server as `id`; data on an upgraded stream counts
    /// toward `session`'s activity when given.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        id: &Identity,
        session: Option<Arc<sleep::Activity>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| upgrade::client(&mut req));
        let (parts, body) = req.into_parts();
        self.send_upstream(parts, body.map_err(BoxError::from).boxed_unsync(), id, client_upgrade, session).await
    }

    /// Sends a request whose body the proxy has already read (or rewritten).
    async fn forward_parts(
        &self,
        parts: http::request::Parts,
        body: ProxyBody,
        id: &Identity,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.send_upstream(parts, body, id, None, None).await
    }

    async fn send_upstream(
        &self,
        mut parts: http::request::Parts,
        body: ProxyBody,
        id: &Identity,
        client_upgrade: Option<upgrade::ClientUpgrade>,
        session: Option<Arc<sleep::Activity>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = client_upgrade.is_some();
        headers::sanitize_request(&mut parts.headers, upgrade);
        headers::add_identity(&mut parts.headers, id);
        parts.uri = self.upstream_uri(&parts.uri);
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);
        let client = &self.upstream;
        let resp =
            client.request(req).await.map_err(|e| ProxyError::upstream("the virtual API server is unreachable", e))?;
        upgrade::relay(resp, client_upgrade, "the virtual API server", session)
    }

    fn upstream_uri(&self, uri: &Uri) -> Uri {
        let mut parts = self.virtual_server.clone().into_parts();
        parts.path_and_query = uri.path_and_query().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| self.virtual_server.clone())
    }
}

/// The request with its path canonicalised (`route::canonicalize`), and that path; 400 if the
/// path is ambiguous. Everything after this sees, and forwards, only the canonical spelling.
fn canonical_request(req: Request<Incoming>) -> Result<(Request<Incoming>, route::CanonicalPath), ProxyError> {
    let path = route::canonicalize(req.uri().path()).map_err(ProxyError::BadRequest)?;
    let (mut parts, body) = req.into_parts();
    if path.path != parts.uri.path() {
        let pq = match parts.uri.query() {
            Some(q) => format!("{}?{q}", path.path),
            None => path.path.clone(),
        };
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = Some(pq.parse().map_err(|e| ProxyError::BadRequest(format!("the request path: {e}")))?);
        parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(format!("the request URI: {e}")))?;
    }
    Ok((Request::from_parts(parts, body), path))
}
