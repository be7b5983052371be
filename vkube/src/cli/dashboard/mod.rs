//! The dashboard: every virtual cluster on the host with its state, labels, last activity, use
//! over time, savings and time to expiry, and a page per cluster. Served by `vkube dashboard` on
//! the admin's machine and by `vkube platform --dashboard-listen` host-wide; see `auth` for who
//! may look.

pub mod auth;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

use self::auth::{Auth, Decision, KEY_COOKIE, TOKEN_COOKIE};
use super::clusters::{self, Cluster};

/// The cluster list is read from the host at most this often, however many viewers refresh.
const FRESH_FOR: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube dashboard\n  vkube dashboard --listen 127.0.0.1:8090")]
pub struct DashboardArgs {
    /// Where to serve the page (this machine only by default).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// How often an open page refreshes itself.
    #[arg(long, default_value = "15s", value_parser = vkube::controlplane::parse_duration)]
    pub refresh: Duration,
}

impl DashboardArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let key = auth::new_key()?;
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {}: {e} (choose another with --listen)", self.listen))?;
        let addr = listener.local_addr()?;
        // The URL on stdout alone (a script can read it); how to use it on stderr.
        println!("http://{addr}/?key={key}");
        eprintln!("dashboard of the virtual clusters: open the URL above (it holds this run's key); Ctrl-C stops it");
        let dashboard = Dashboard::new(host, Auth::Key(key), self.refresh);
        tokio::select! {
            r = serve(listener, dashboard) => r.map_err(Into::into),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }
}

pub struct Dashboard {
    host: kube::Client,
    auth: Auth,
    refresh: Duration,
    listed: Mutex<Option<(Instant, Arc<Vec<Cluster>>)>>,
}

impl Dashboard {
    pub fn new(host: kube::Client, auth: Auth, refresh: Duration) -> Arc<Dashboard> {
        Arc::new(Dashboard { host, auth, refresh, listed: Mutex::new(None) })
    }

    async fn clusters(&self) -> anyhow::Result<Arc<Vec<Cluster>>> {
        let mut listed = self.listed.lock().await;
        if let Some((at, clusters)) = listed.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return Ok(clusters.clone());
        }
        let mut listed_now = clusters::list(&self.host, None, None).await?;
        clusters::with_usage(&self.host, None, &mut listed_now).await?;
        let clusters = Arc::new(listed_now);
        *listed = Some((Instant::now(), clusters.clone()));
        Ok(clusters)
    }
}

/// Serves the dashboard on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, dashboard: Arc<Dashboard>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let dashboard = dashboard.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&dashboard, req).await) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!(error = %e, "dashboard connection ended");
            }
        });
    }
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, "text/html; charset=utf-8".parse().expect("a valid header"));
    // No script runs on these pages, and they are not to be framed.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
            .parse()
            .expect("a valid header"),
    );
    headers.insert(header::CACHE_CONTROL, "no-store".parse().expect("a valid header"));
    r
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Full<Bytes>> {
    let mut r = html(StatusCode::SEE_OTHER, String::new());
    if let Ok(v) = to.parse() {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| c.parse().ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// A cookie kept for `max_age` (a browser restarted meanwhile still has it).
fn session_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!("{name}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", max_age.as_secs())
}

fn query_value(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

const LOGIN_FORM: &str = "Sign in with your host credentials: a bearer token of a user that may list Services in every \
namespace (e.g. <code>kubectl create token NAME -n NS</code>), or send it as <code>Authorization: Bearer</code>.\
<form method=\"post\" action=\"/login\"><input type=\"password\" name=\"token\" autocomplete=\"off\" size=\"60\"> \
<button type=\"submit\">Sign in</button></form>";

async fn handle(d: &Dashboard, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    let cookies = req.headers().get(header::COOKIE).and_then(|v| v.to_str().ok()).map(str::to_string);
    match &d.auth {
        // The key in the URL becomes a cookie, and leaves the address bar.
        Auth::Key(_) => {
            if let Some(key) = query_value(&req, "key")
                && matches!(d.auth.decide(Some(&key), None).await, Decision::Allowed(_))
            {
                // The key is good for this run: a working day is enough.
                return redirect(&path, Some(session_cookie(KEY_COOKIE, &key, Duration::from_secs(12 * 3600))));
            }
        }
        Auth::Host { .. } if path == "/login" && req.method() == Method::POST => {
            let Ok(body) = Limited::new(req.into_body(), 16 * 1024).collect().await else {
                return html(StatusCode::BAD_REQUEST, page::refused("Bad sign-in", LOGIN_FORM));
            };
            let body = body.to_bytes();
            let token = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.trim().to_string());
            return match token {
                Some(t) if !t.is_empty() && !t.contains([';', ',', ' ']) => {
                    // Checked again at each request; an hour, as short-lived tokens go.
                    redirect("/", Some(session_cookie(TOKEN_COOKIE, &t, Duration::from_secs(3600))))
                }
                _ => html(StatusCode::BAD_REQUEST, page::refused("Bad sign-in", LOGIN_FORM)),
            };
        }
        Auth::Host { .. } => {}
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
        .or_else(|| auth::cookie(cookies.as_deref(), TOKEN_COOKIE).map(str::to_string));
    let key = auth::cookie(cookies.as_deref(), KEY_COOKIE);
    match d.auth.decide(key, bearer.as_deref()).await {
        Decision::Allowed(user) => tracing::debug!(user, path, "dashboard page"),
        Decision::Unauthenticated => {
            let what = match d.auth {
                Auth::Key(_) => "Open the URL that <code>vkube dashboard</code> printed: it holds this run's key.",
                Auth::Host { .. } => LOGIN_FORM,
            };
            return html(StatusCode::UNAUTHORIZED, page::refused("Sign-in needed", what));
        }
        Decision::Forbidden(user) => {
            tracing::info!(user, "dashboard refused: the user may not list Services in every namespace");
            return html(
                StatusCode::FORBIDDEN,
                page::refused(
                    "Not allowed",
                    "Your host user may not list Services in every namespace, which this page shows.",
                ),
            );
        }
        Decision::Unavailable(e) => {
            tracing::warn!(error = e, "dashboard: the host could not review a viewer's credentials");
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                page::refused("Try again", "The host API server could not check your credentials just now."),
            );
        }
    }
    if req.method() != Method::GET {
        return html(StatusCode::METHOD_NOT_ALLOWED, page::refused("Only GET", "This page only shows."));
    }
    let clusters = match d.clusters().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "dashboard: listing the virtual clusters failed");
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                page::refused("Try again", "The virtual clusters could not be listed from the host just now."),
            );
        }
    };
    let now = jiff::Timestamp::now();
    let refresh = d.refresh.as_secs().max(1);
    if path == "/" {
        return html(StatusCode::OK, page::overview(&clusters, now, refresh));
    }
    let one = path.strip_prefix("/clusters/").and_then(|rest| rest.split_once('/'));
    match one.and_then(|(ns, name)| clusters.iter().find(|c| c.namespace == ns && c.name == name)) {
        Some(c) => html(StatusCode::OK, page::cluster(c, now, refresh)),
        None => html(
            StatusCode::NOT_FOUND,
            page::refused("Not found", "No such virtual cluster: <a href=\"/\">all clusters</a>."),
        ),
    }
}
