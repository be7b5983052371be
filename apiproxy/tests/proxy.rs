//! The proxy served in-process on 127.0.0.1:0, in front of a fake API server (plain HTTP on
//! 127.0.0.1:0) that answers TokenReview, SubjectAccessReview and pod lookups as told. What is
//! checked is the status the proxy answers for each authentication and authorization outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vkube_apiproxy::sleep::{Power, Sleep};
use vkube_apiproxy::tls::{self, ServingCert};
use vkube_apiproxy::{Proxy, ProxyConfig, ProxyLimits};
use vkube_pki::{Bundle, BundleSpec, LeafSpec};

const TOKEN: &str = "alices-token";
const LOG_PATH: &str = "/api/v1/namespaces/default/pods/web/log";

/// How the fake API server answers SubjectAccessReviews.
#[derive(Clone, Copy)]
enum Sar {
    Allow,
    Deny,
    /// 500 with a Kubernetes Status: the review could not be made.
    Fail,
}

fn json(code: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn kube_status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(
        code,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code.as_u16()}),
    )
}

fn fake_answer(sar: Sar, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/apis/authentication.k8s.io/v1/tokenreviews" => json(
            StatusCode::CREATED,
            serde_json::json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {}, "spec": {"token": TOKEN},
                "status": {"authenticated": true, "user": {"username": "alice", "groups": ["dev"]}}}),
        ),
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" => match sar {
            Sar::Fail => kube_status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
            Sar::Allow | Sar::Deny => json(
                StatusCode::CREATED,
                serde_json::json!({"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                    "metadata": {}, "spec": {}, "status": {"allowed": matches!(sar, Sar::Allow)}}),
            ),
        },
        path => proxy_objects(req, path).unwrap_or_else(|| kube_status(StatusCode::NOT_FOUND, "NotFound")),
    }
}

/// The host copy's metadata of virtual `kind` `name` (namespace default, uid `u-NAME`).
fn host_meta(kind: &str, name: &str) -> serde_json::Value {
    let tr = vkube_core::naming::Translator::new("vc", "host-ns");
    serde_json::to_value(tr.host_meta(
        kind,
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("u-{name}")),
            ..Default::default()
        },
    ))
    .unwrap()
}

/// What the proxy subresources look up and reach: virtual pods `site` and `net` (whose host copy is
/// on the host's network), Services `site` (a selector) and `manual` (none), their host copies, and
/// the host API server's proxy paths, answered with what was asked of them.
fn proxy_objects(req: &Request<Incoming>, path: &str) -> Option<Response<Full<Bytes>>> {
    let meta = |name: &str| serde_json::json!({"name": name, "namespace": "default", "uid": format!("u-{name}")});
    let ok = |v| Some(json(StatusCode::OK, v));
    match path {
        "/api/v1/namespaces/default/pods/site" | "/api/v1/namespaces/default/pods/net" => {
            let name = path.rsplit('/').next().unwrap();
            ok(
                serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta(name), "spec": {"containers": [{"name": "c"}]}}),
            )
        }
        "/api/v1/namespaces/host-ns/pods/site-x-default-x-vc" => ok(
            serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": host_meta("Pod", "site"), "spec": {"containers": [{"name": "c"}]}}),
        ),
        "/api/v1/namespaces/host-ns/pods/net-x-default-x-vc" => {
            ok(serde_json::json!({"kind": "Pod", "apiVersion": "v1",
            "metadata": host_meta("Pod", "net"), "spec": {"hostNetwork": true, "containers": [{"name": "c"}]}}))
        }
        "/api/v1/namespaces/default/services/site" => ok(serde_json::json!({"kind": "Service", "apiVersion": "v1",
            "metadata": meta("site"), "spec": {"selector": {"app": "web"}}})),
        "/api/v1/namespaces/default/services/manual" => {
            ok(serde_json::json!({"kind": "Service", "apiVersion": "v1", "metadata": meta("manual"), "spec": {}}))
        }
        "/api/v1/namespaces/host-ns/services/site-x-default-x-vc" => {
            ok(serde_json::json!({"kind": "Service", "apiVersion": "v1", "metadata": host_meta("Service", "site")}))
        }
        p if p.starts_with("/api/v1/namespaces/host-ns/") && (p.contains("/proxy") || p.ends_with("/exec")) => {
            let mut headers: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
            headers.sort();
            let mut resp = json(
                StatusCode::OK,
                serde_json::json!({"method": req.method().as_str(), "path": p, "query": req.uri().query(), "headers": headers}),
            );
            if let Some(base) = p.strip_suffix("/page") {
                return Some(
                    Response::builder()
                        .header("content-type", "text/html; charset=utf-8")
                        .body(Full::new(Bytes::from(format!("<a href=\"{base}/next\">next</a>"))))
                        .unwrap(),
                );
            }
            if p.ends_with("/redirect") {
                let to = p.replace("/redirect", "/elsewhere");
                *resp.status_mut() = StatusCode::FOUND;
                resp.headers_mut().insert("location", to.parse().unwrap());
            }
            Some(resp)
        }
        _ => None,
    }
}

/// A fake virtual (and host) API server; its address.
async fn fake_api_server(sar: Sar) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(fake_answer(sar, &req))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn client_of(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn pki() -> Bundle {
    let mut b = Bundle::default();
    let spec = BundleSpec {
        cas: vec![("ca".into(), "ca".into())],
        leaves: vec![
            LeafSpec::server("apiserver", "ca", &["localhost".into()], &["127.0.0.1".parse().unwrap()]),
            LeafSpec::client("front-proxy-client", "ca", "front-proxy-client", None),
            LeafSpec::client("alice", "ca", "alice", Some("dev")),
            LeafSpec::client("root", "ca", "root", Some("system:masters")),
            LeafSpec::client("kubelet-client", "ca", vkube_apiproxy::kubelet::CLIENT_USER, None),
        ],
        key_pairs: vec![],
    };
    b.ensure(&spec, Default::default(), vkube_pki::OffsetDateTime::now_utc()).unwrap();
    b
}

struct Running {
    addr: SocketAddr,
    pki: Bundle,
    proxy: Arc<Proxy>,
}

/// Serves a proxy whose virtual and host API servers are at `api`.
async fn serve_proxy(api: SocketAddr) -> Running {
    serve_proxy_with(api, Default::default()).await
}

async fn serve_proxy_with(api: SocketAddr, limits: ProxyLimits) -> Running {
    serve_sleepy_proxy(api, limits, Sleep::always_running()).await
}

async fn serve_sleepy_proxy(api: SocketAddr, limits: ProxyLimits, sleep: Sleep) -> Running {
    serve_proxy_serving(api, limits, sleep, None).await
}

async fn serve_proxy_serving(
    api: SocketAddr,
    limits: ProxyLimits,
    sleep: Sleep,
    operations: Option<vkube_apiproxy::Operations>,
) -> Running {
    let pki = pki();
    let get = |f: &str| pki.get(f).unwrap().to_string();
    let mut registry = Registry::default();
    let proxy = Proxy::new(
        ProxyConfig {
            translator: vkube_core::naming::Translator::new("vc", "host-ns"),
            policy: Default::default(),
            // Nothing listens there: forwarded requests find the virtual API server down.
            virtual_server: format!("https://{}", closed_port().await).parse().unwrap(),
            virtual_ca_pem: get("ca.crt"),
            front_proxy_cert_pem: get("front-proxy-client.crt"),
            front_proxy_key_pem: get("front-proxy-client.key"),
            admin: client_of(api),
            host: client_of(api),
            serving: ServingCert::new(&get("apiserver.crt"), &get("apiserver.key")).unwrap(),
            ready: std::sync::Arc::new(|| Ok(())),
            live: std::sync::Arc::new(|| Ok(())),
            limits,
            sleep,
            operations,
        },
        &mut registry,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve(listener, Arc::new(registry), std::future::pending()));
    Running { addr, pki, proxy }
}

enum Credential {
    None,
    Token,
    Cert,
    /// A client certificate in the group system:masters (the admin kubeconfig's).
    Masters,
}

impl Running {
    async fn get(&self, path: &str, cred: Credential, headers: &[(&str, &str)]) -> (StatusCode, serde_json::Value) {
        self.request(http::Method::GET, path, cred, headers).await
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        cred: Credential,
        headers: &[(&str, &str)],
    ) -> (StatusCode, serde_json::Value) {
        self.send(method, path, cred, headers, Bytes::new()).await
    }

    /// A TLS connection to the proxy, with alice's client certificate for `Credential::Cert`.
    async fn connect(&self, cred: &Credential) -> tokio_rustls::client::TlsStream<TcpStream> {
        let ca = self.pki.get("ca.crt").unwrap();
        let config = match cred {
            Credential::Cert => {
                tls::client_config(ca, self.pki.get("alice.crt").unwrap(), self.pki.get("alice.key").unwrap())
            }
            Credential::Masters => {
                tls::client_config(ca, self.pki.get("root.crt").unwrap(), self.pki.get("root.key").unwrap())
            }
            _ => rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(tls::root_store(ca).unwrap()).with_no_client_auth())
                .map_err(Into::into),
        }
        .unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .unwrap()
    }

    /// One HTTP/1.1 request over TLS: the status and body.
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        cred: Credential,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (StatusCode, serde_json::Value) {
        let stream = self.connect(&cred).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if matches!(cred, Credential::Token) {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
        let code = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or_else(|_| String::from_utf8_lossy(&body).into());
        (code, value)
    }
}

const AS_BOB: &[(&str, &str)] = &[("impersonate-user", "bob")];

#[tokio::test]
async fn unauthenticated_requests_get_401_and_are_counted() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let (code, body) = proxy.get(LOG_PATH, Credential::None, &[]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "Unauthorized");
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("vkube_proxy_errors_total{kind=\"unauthorized\"} 1"), "{metrics}");
    assert!(metrics.contains("vkube_proxy_unauthorized_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_denied_review_is_403() {
    let proxy = serve_proxy(fake_api_server(Sar::Deny).await).await;
    for cred in [Credential::Token, Credential::Cert] {
        let (code, body) = proxy.get(LOG_PATH, cred, &[]).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["reason"], "Forbidden");
    }
    let (code, body) = proxy.get(LOG_PATH, Credential::Cert, AS_BOB).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cannot impersonate"), "{body}");
}

#[tokio::test]
async fn an_allowed_review_gets_past_authorization() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    // The fake server knows no pods: the lookup after authorization answers.
    let (code, body) = proxy.get(LOG_PATH, Credential::Cert, AS_BOB).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["message"], "pods \"web\" not found");
}

#[tokio::test]
async fn a_failing_review_is_503_not_403() {
    let proxy = serve_proxy(fake_api_server(Sar::Fail).await).await;
    for headers in [&[][..], AS_BOB] {
        let (code, body) = proxy.get(LOG_PATH, Credential::Cert, headers).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["reason"], "ServiceUnavailable");
        assert!(body["message"].as_str().unwrap().contains("try again"), "{body}");
    }
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    assert!(metrics.as_str().unwrap().contains("vkube_proxy_errors_total{kind=\"upstream\"} 2"), "{metrics}");
}

#[tokio::test]
async fn an_unreachable_reviewer_is_503_not_403() {
    let proxy = serve_proxy(closed_port().await).await;
    for headers in [&[][..], AS_BOB] {
        let (code, body) = proxy.get(LOG_PATH, Credential::Cert, headers).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["reason"], "ServiceUnavailable");
    }
}

#[tokio::test]
async fn an_unreachable_virtual_api_server_is_503() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let (code, body) = proxy.get("/api/v1/namespaces", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("the virtual API server is unreachable"), "{body}");
    // Service creation starts with a dry run forwarded the same way.
    let svc = Bytes::from_static(br#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"x"}}"#);
    let path = "/api/v1/namespaces/default/services";
    let (code, body) = proxy.send(http::Method::POST, path, Credential::Cert, JSON, svc).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

#[tokio::test]
async fn a_service_body_the_proxy_cannot_read_is_400_and_goes_nowhere() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let path = "/api/v1/namespaces/default/services";
    for (headers, body) in [
        (JSON, &b"{not json"[..]),
        (JSON, &b""[..]),
        (&[("content-type", "application/vnd.kubernetes.protobuf")][..], &b"k8s\0\n"[..]),
    ] {
        let (code, answer) =
            proxy.send(http::Method::POST, path, Credential::Cert, headers, Bytes::from_static(body)).await;
        // 400, not the 503 of a forwarded request (nothing listens at the virtual API server).
        assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["reason"], "BadRequest");
    }
    let big = Bytes::from(vec![b' '; 2 << 20]);
    let (code, answer) = proxy.send(http::Method::POST, path, Credential::Cert, JSON, big).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
}

#[tokio::test]
async fn paths_are_routed_as_the_api_server_reads_them() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    // An encoded "log" is the proxy's own log route (authorized, then the pod is looked up),
    // never forwarded to the virtual API server's (which would 503 here: nothing listens).
    for path in ["/api/v1/namespaces/default/pods/web/%6Cog", "/api/v1/namespaces/default/pods/w%65b/lo%67"] {
        let (code, body) = proxy.get(path, Credential::Cert, &[]).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["message"], "pods \"web\" not found");
    }
    for path in [
        "/api/v1/namespaces/default/pods/web%2Flog",
        "/api/v1/namespaces/default/pods/x/..%2F",
        "/api//v1",
        "/api/v1/namespaces/default/pods/%2e%2e/log",
    ] {
        let (code, body) = proxy.get(path, Credential::Cert, &[]).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    for path in ["/api/v1/nodes/n/pr%6Fxy/metrics", "/api/v1/proxy/namespaces/default/pods/web"] {
        let (code, body) = proxy.get(path, Credential::Cert, &[]).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(body["message"].as_str().unwrap().contains("not served"), "{body}");
        let (code, _) = proxy.get(path, Credential::None, &[]).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "refusals come after authentication");
    }
}

#[tokio::test]
async fn an_unreachable_token_reviewer_is_503_not_401() {
    let proxy = serve_proxy(closed_port().await).await;
    let (code, body) = proxy.get("/api/v1/namespaces", Credential::Token, &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("could not review the bearer token"), "{body}");
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    assert!(metrics.as_str().unwrap().contains("vkube_proxy_token_reviews_total{result=\"failed\"} 1"), "{metrics}");
}

fn quick_limits(max_connections: usize) -> ProxyLimits {
    ProxyLimits {
        max_connections,
        tls_handshake_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Reads until the peer closes (Ok) or `within` passes (Err).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(mut s: S, within: Duration) -> Result<(), ()> {
    let mut buf = [0u8; 64];
    tokio::time::timeout(within, async { while s.read(&mut buf).await.is_ok_and(|n| n > 0) {} }).await.map_err(|_| ())
}

#[tokio::test]
async fn silent_clients_are_dropped() {
    let proxy = serve_proxy_with(fake_api_server(Sar::Allow).await, quick_limits(64)).await;
    // No TLS handshake at all.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(tcp, Duration::from_secs(5)).await.is_ok(), "no handshake: dropped");
    // A handshake, then nothing.
    let tls = proxy.connect(&Credential::Cert).await;
    assert!(closed_within(tls, Duration::from_secs(5)).await.is_ok(), "no request: dropped");
    // Half the headers of a request, then nothing.
    let mut tls = proxy.connect(&Credential::Cert).await;
    tls.write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(closed_within(tls, Duration::from_secs(5)).await.is_ok(), "partial headers: dropped");
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("vkube_proxy_dropped_connections_total{reason=\"tls_handshake_timeout\"} 1"), "{metrics}");
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let proxy = serve_proxy_with(fake_api_server(Sar::Allow).await, quick_limits(1)).await;
    let hog = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The one slot is taken: this request waits until the hog is dropped (its handshake
    // timeout), then is served.
    let started = std::time::Instant::now();
    let (code, _) = proxy.get("/healthz", Credential::None, &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(700), "waited for the slot: {:?}", started.elapsed());
    drop(hog);
}

/// A TCP connection to the proxy from `source` (another loopback address is another client).
async fn tcp_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn one_address_holds_only_its_share_of_the_connections() {
    let limits = ProxyLimits { max_connections_per_address: 2, ..Default::default() };
    let proxy = serve_proxy_with(fake_api_server(Sar::Allow).await, limits).await;
    // Two idle connections (a TLS handshake is waited for 10 s) take 127.0.0.2's share.
    let hogs = [tcp_from("127.0.0.2", proxy.addr).await, tcp_from("127.0.0.2", proxy.addr).await];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = tcp_from("127.0.0.2", proxy.addr).await;
    assert!(closed_within(third, Duration::from_millis(500)).await.is_ok(), "over its share: closed at once");
    let (code, _) = proxy.get("/healthz", Credential::None, &[]).await;
    assert_eq!(code, StatusCode::OK, "another address is served meanwhile");
    drop(hogs);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = tcp_from("127.0.0.2", proxy.addr).await;
    assert!(closed_within(again, Duration::from_millis(500)).await.is_err(), "its share back once they closed");
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("vkube_proxy_dropped_connections_total{reason=\"per_address_limit\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_sleeping_cluster_wakes_for_a_user_and_not_for_background_requests() {
    let (sleep, ctl) = Sleep::new(Power::Sleeping, vec![], Duration::from_secs(5));
    let proxy = serve_sleepy_proxy(fake_api_server(Sar::Allow).await, Default::default(), sleep).await;
    // Reachable while asleep: that is how it gets woken.
    let (code, body) = proxy.get("/readyz", Credential::None, &[]).await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, Some("ok (Sleeping)")));
    let asleep = |code: StatusCode, body: &serde_json::Value| {
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["message"].as_str().unwrap().contains("is asleep and this request does not wake it"), "{body}");
    };
    let (code, body) = proxy.get("/api/v1/pods?watch=true", Credential::Cert, &[]).await;
    asleep(code, &body);
    let (code, body) = proxy.get("/api/v1/pods", Credential::Cert, &[("x-vkube-sleep-ignore", "1")]).await;
    asleep(code, &body);
    // A token never reviewed cannot be told from a random one without the API server.
    let (code, body) = proxy.get("/api/v1/pods", Credential::Token, &[]).await;
    asleep(code, &body);
    assert_eq!(*ctl.power.borrow(), Power::Sleeping, "nothing above woke it");
    assert!(ctl.activity.last().is_none());

    let woken = tokio::spawn(async move {
        ctl.wake.notified().await;
        ctl.power.send_replace(Power::Waking);
        tokio::time::sleep(Duration::from_millis(300)).await;
        ctl.power.send_replace(Power::Running);
        ctl
    });
    let started = std::time::Instant::now();
    // Held until it runs, then forwarded (to a virtual API server that is not there: 503 of another kind).
    let (code, body) = proxy.get("/api/v1/namespaces", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("the virtual API server is unreachable"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300), "held while waking: {:?}", started.elapsed());
    let ctl = woken.await.unwrap();
    assert_eq!(ctl.activity.last().unwrap().1, "alice");
    let (_, metrics) = proxy.get("/metrics", Credential::None, &[]).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("vkube_activity_total{user=\"alice\",verb=\"get\"} 1"), "{metrics}");
    assert!(metrics.contains("vkube_proxy_errors_total{kind=\"asleep\"} 3"), "{metrics}");
}

#[tokio::test]
async fn a_token_seen_while_awake_wakes_a_sleeping_cluster() {
    let (sleep, ctl) = Sleep::new(Power::Running, vec![], Duration::from_secs(5));
    let proxy = serve_sleepy_proxy(fake_api_server(Sar::Allow).await, Default::default(), sleep).await;
    // Awake, the token is reviewed (alice's) and its request forwarded.
    let (_, body) = proxy.get("/api/v1/namespaces", Credential::Token, &[]).await;
    assert!(body["message"].as_str().unwrap().starts_with("the virtual API server is unreachable"), "{body}");
    ctl.power.send_replace(Power::Sleeping);
    let woken = tokio::spawn(async move {
        ctl.wake.notified().await;
        ctl.power.send_replace(Power::Running);
        ctl
    });
    // Asleep, the same token still names a user who counts: it wakes the cluster and is served.
    let (code, body) = proxy.get("/api/v1/namespaces", Credential::Token, &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("the virtual API server is unreachable"), "{body}");
    let ctl = tokio::time::timeout(Duration::from_secs(5), woken).await.expect("woken").unwrap();
    assert_eq!(*ctl.power.borrow(), Power::Running);
}

/// Operations that answer 200 and count their calls.
fn counted_operations() -> (vkube_apiproxy::Operations, Arc<std::sync::atomic::AtomicUsize>) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let ops: vkube_apiproxy::Operations = Arc::new(move |op, _req| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(Response::new(vkube_apiproxy::full(Bytes::from(format!("\"{}\"", op.path()))))) })
    });
    (ops, calls)
}

#[tokio::test]
async fn vkube_operations_need_rbac_on_their_path_and_never_wake_the_cluster() {
    use std::sync::atomic::Ordering::SeqCst;
    let (ops, calls) = counted_operations();
    let allowed =
        serve_proxy_serving(fake_api_server(Sar::Allow).await, Default::default(), Sleep::always_running(), Some(ops))
            .await;
    let (code, body) = allowed.get("/vkube/v1/snapshot", Credential::Token, &[]).await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, Some("/vkube/v1/snapshot")));
    let (code, _) = allowed.get("/vkube/v1/restore", Credential::Token, &[]).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "restore is a POST");
    assert_eq!(calls.load(SeqCst), 1);

    let (ops, calls) = counted_operations();
    let denied =
        serve_proxy_serving(fake_api_server(Sar::Deny).await, Default::default(), Sleep::always_running(), Some(ops))
            .await;
    for cred in [Credential::Token, Credential::Cert] {
        let (code, body) = denied.request(http::Method::POST, "/vkube/v1/reset", cred, &[]).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(body["message"].as_str().unwrap().contains("cannot create path \"/vkube/v1/reset\""), "{body}");
    }
    let (code, body) = denied.get("/vkube/v1/snapshot?pki=true", Credential::Token, &[]).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cannot create path \"/vkube/v1/snapshot/pki\""), "{body}");
    let (code, _) = denied.get("/vkube/v1/snapshot", Credential::None, &[]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(SeqCst), 0, "nothing refused reached the operation");

    // Asleep, nothing can ask RBAC: only the admin's system:masters certificate, unimpersonated.
    let (ops, calls) = counted_operations();
    let (sleep, ctl) = Sleep::new(Power::Sleeping, vec![], Duration::from_secs(5));
    let asleep = serve_proxy_serving(fake_api_server(Sar::Allow).await, Default::default(), sleep, Some(ops)).await;
    for (cred, headers) in [(Credential::Token, &[][..]), (Credential::Cert, &[]), (Credential::Masters, AS_BOB)] {
        let (code, body) = asleep.get("/vkube/v1/snapshot", cred, headers).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["message"].as_str().unwrap().contains("system:masters"), "{body}");
    }
    let (code, _) = asleep.get("/vkube/v1/snapshot", Credential::Masters, &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(*ctl.power.borrow(), Power::Sleeping, "an operation never wakes it");
    assert!(ctl.activity.last().is_none(), "nor counts as activity");

    // A control plane that serves none answers 404.
    let none = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let (code, _) = none.get("/vkube/v1/snapshot", Credential::Token, &[]).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pod_and_service_proxies_reach_only_the_host_copy_with_the_hosts_credentials() {
    let proxy = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let headers =
        &[("impersonate-user", "bob"), ("x-remote-user", "root"), ("content-type", "text/plain"), ("x-custom", "1")];
    let (code, body) = proxy
        .send(
            http::Method::POST,
            "/api/v1/namespaces/default/pods/site:8080/proxy/a/b?q=1",
            Credential::Token,
            headers,
            Bytes::from("payload"),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/api/v1/namespaces/host-ns/pods/site-x-default-x-vc:8080/proxy/a/b");
    assert_eq!(body["query"], "q=1");
    let sent: Vec<&str> = body["headers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    assert!(sent.contains(&"content-type"), "{sent:?}");
    for never in ["authorization", "impersonate-user", "x-remote-user", "x-custom"] {
        assert!(!sent.contains(&never), "{never} reached the host: {sent:?}");
    }

    let (code, body) =
        proxy.get("/api/v1/namespaces/default/services/https:site:443/proxy/", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/api/v1/namespaces/host-ns/services/https:site-x-default-x-vc:443/proxy/");

    // A redirect the host wrote for its own path comes back with the virtual one.
    let stream = proxy.connect(&Credential::Cert).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/api/v1/namespaces/default/pods/site/proxy/redirect")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "/api/v1/namespaces/default/pods/site/proxy/elsewhere");

    // So are the links the host wrote into an HTML page.
    let (code, page) =
        proxy.get("/api/v1/namespaces/default/pods/http:site:80/proxy/page", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(page, r#"<a href="/api/v1/namespaces/default/pods/http:site:80/proxy/next">next</a>"#);

    for (path, why) in [
        ("/api/v1/namespaces/default/pods/net/proxy/", "host's network"),
        ("/api/v1/namespaces/default/services/manual/proxy/", "only Services with a selector"),
        ("/api/v1/namespaces/default/pods/gone/proxy/", "not found"),
    ] {
        let (code, body) = proxy.get(path, Credential::Cert, &[]).await;
        assert!(matches!(code, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND), "{path}: {code} {body}");
        assert!(body["message"].as_str().unwrap().contains(why), "{path}: {body}");
    }
    let denied = serve_proxy(fake_api_server(Sar::Deny).await).await;
    let (code, body) = denied.get("/api/v1/namespaces/default/pods/site/proxy/", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cannot get resource \"pods/proxy\""), "{body}");
}

/// The virtual nodes' kubelet behind the egress socket: a CONNECT to the kubelet port of any
/// address is served in-process over TLS (a certificate for that address, from the virtual
/// cluster's CA), only to the API server's kubelet-client certificate, and only exec, attach and
/// port-forward, which go to the host copy's subresource; other ports of addresses that are not
/// this cluster's Services are refused.
#[tokio::test]
async fn the_virtual_nodes_kubelet_serves_only_the_api_server() {
    use vkube_apiproxy::kubelet::{self, Kubelet};
    let running = serve_proxy(fake_api_server(Sar::Allow).await).await;
    let pki = &running.pki;
    let kubelet = Kubelet::new(running.proxy.clone(), pki.get("ca.crt").unwrap(), pki.get("ca.key").unwrap()).unwrap();
    let (ca_crt, ca_key) = (pki.get("ca.crt").unwrap(), pki.get("ca.key").unwrap());
    let metrics = vkube_apiproxy::resource_metrics::ResourceMetrics::new(
        running.proxy.clone(),
        ca_crt,
        ca_key,
        ca_crt,
        Arc::new(std::collections::BTreeSet::new),
    );
    let in_process = vkube_apiproxy::egress::InProcess { kubelet, metrics: metrics.unwrap() };
    let dir = std::env::temp_dir().join(format!("vkube-kubelet-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("egress.sock");
    tokio::spawn({
        let socket = socket.clone();
        async move { vkube_apiproxy::egress::serve(&socket, Arc::new(|_| false), in_process).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    /// CONNECT through the egress socket: its status line, and the stream if it was 200.
    async fn connect(socket: &std::path::Path, target: &str) -> (String, tokio::net::UnixStream) {
        let mut unix = tokio::net::UnixStream::connect(socket).await.unwrap();
        unix.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if unix.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let status = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
        (status, unix)
    }
    /// A TLS session to the kubelet at 10.9.8.7 (its certificate checked for that address).
    async fn tls(
        socket: &std::path::Path,
        pki: &Bundle,
        client: Option<&str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::UnixStream>> {
        let ip: std::net::IpAddr = "10.9.8.7".parse().unwrap();
        tls_to(socket, pki, client, &format!("{ip}:{}", kubelet::PORT), ServerName::IpAddress(ip.into())).await
    }
    async fn tls_to(
        socket: &std::path::Path,
        pki: &Bundle,
        client: Option<&str>,
        target: &str,
        server: ServerName<'static>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::UnixStream>> {
        let (status, unix) = connect(socket, target).await;
        assert!(status.contains(" 200"), "{status}");
        let ca = pki.get("ca.crt").unwrap();
        let config = match client {
            Some(name) => tls::client_config(
                ca,
                pki.get(&format!("{name}.crt")).unwrap(),
                pki.get(&format!("{name}.key")).unwrap(),
            )
            .unwrap(),
            None => rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(tls::root_store(ca).unwrap())
                .with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server, unix).await
    }
    async fn ask(
        stream: tokio_rustls::client::TlsStream<tokio::net::UnixStream>,
        method: &str,
        path: &str,
    ) -> Result<(StatusCode, serde_json::Value), hyper::Error> {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder().method(method).uri(path).header("host", "10.9.8.7").body(Full::new(Bytes::new()));
        let resp = sender.send_request(req.unwrap()).await?;
        let code = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok((code, serde_json::from_slice(&body).unwrap_or_else(|_| String::from_utf8_lossy(&body).into())))
    }

    let (code, body) = ask(
        tls(&socket, pki, Some("kubelet-client")).await.unwrap(),
        "POST",
        "/exec/default/site/c?command=id&output=1",
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body["path"], "/api/v1/namespaces/host-ns/pods/site-x-default-x-vc/exec",
        "the host copy's exec: {body}"
    );
    assert_eq!(body["query"], "container=c&command=id&stdout=true", "{body}");
    let (code, body) =
        ask(tls(&socket, pki, Some("kubelet-client")).await.unwrap(), "GET", "/containerLogs/default/site/c")
            .await
            .unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    assert!(body.to_string().contains("serves exec, attach and portForward only"), "{body}");
    let (code, body) =
        ask(tls(&socket, pki, Some("kubelet-client")).await.unwrap(), "POST", "/exec/default/site/other?command=id")
            .await
            .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST, "a container the virtual pod lacks: {body}");

    // Another certificate of the same CA (a user's) gets no answer; none at all, no handshake.
    if let Ok(stream) = tls(&socket, pki, Some("alice")).await {
        assert!(ask(stream, "POST", "/exec/default/site/c?command=id").await.is_err(), "alice was served");
    }
    let anonymous = match tls(&socket, pki, None).await {
        Ok(stream) => ask(stream, "POST", "/exec/default/site/c?command=id").await.is_err(),
        Err(_) => true,
    };
    assert!(anonymous, "a client without a certificate was served");

    // Any other port of an address that is not one of this cluster's Services: refused.
    let (status, _) = connect(&socket, "10.9.8.7:8080").await;
    assert!(status.contains(" 403"), "{status}");

    // The resource metrics API's name: served in-process with a certificate for its Service's
    // name, to the front-proxy client certificate only (the aggregator's), never to the kubelet
    // client's; any other port of that name is refused (names are never dialled).
    let target = format!("{}:443", vkube_apiproxy::resource_metrics::HOST);
    let metrics = |client| {
        let server = ServerName::try_from("vkube-metrics.kube-system.svc").unwrap();
        tls_to(&socket, pki, client, &target, server)
    };
    let (code, body) =
        ask(metrics(Some("front-proxy-client")).await.unwrap(), "GET", "/apis/metrics.k8s.io/v1beta1").await.unwrap();
    assert_eq!((code, &body["groupVersion"]), (StatusCode::OK, &serde_json::json!("metrics.k8s.io/v1beta1")), "{body}");
    let (code, _) = ask(metrics(Some("front-proxy-client")).await.unwrap(), "GET", "/apis").await.unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND, "aggregated discovery: the aggregator falls back to the version's");
    if let Ok(stream) = metrics(Some("kubelet-client")).await {
        assert!(ask(stream, "GET", "/apis/metrics.k8s.io/v1beta1").await.is_err(), "the kubelet client was served");
    }
    let (status, _) = connect(&socket, &format!("{}:8443", vkube_apiproxy::resource_metrics::HOST)).await;
    assert!(status.contains(" 403"), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
