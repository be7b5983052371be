//! The proxy served in-process on 127.0.0.1:0, in front of a fake API server (plain HTTP on
//! 127.0.0.1:0) that answers TokenReview, SubjectAccessReview and pod lookups as told. What is
//! checked is the status the proxy answers for each authentication and authorization outcome.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use vkube_apiproxy::tls::{self, ServingCert};
use vkube_apiproxy::{Proxy, ProxyConfig};
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
        _ => kube_status(StatusCode::NOT_FOUND, "NotFound"),
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
        ],
        key_pairs: vec![],
    };
    b.ensure(&spec, Default::default(), vkube_pki::OffsetDateTime::now_utc()).unwrap();
    b
}

struct Running {
    addr: SocketAddr,
    pki: Bundle,
}

/// Serves a proxy whose virtual and host API servers are at `api`.
async fn serve_proxy(api: SocketAddr) -> Running {
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
        },
        &mut registry,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.serve(listener, Arc::new(registry), std::future::pending()));
    Running { addr, pki }
}

enum Credential {
    None,
    Token,
    Cert,
}

impl Running {
    async fn get(&self, path: &str, cred: Credential, headers: &[(&str, &str)]) -> (StatusCode, serde_json::Value) {
        self.request(http::Method::GET, path, cred, headers).await
    }

    /// One HTTP/1.1 request over TLS: the status and body.
    async fn request(
        &self,
        method: http::Method,
        path: &str,
        cred: Credential,
        headers: &[(&str, &str)],
    ) -> (StatusCode, serde_json::Value) {
        let ca = self.pki.get("ca.crt").unwrap();
        let config = match cred {
            Credential::Cert => {
                tls::client_config(ca, self.pki.get("alice.crt").unwrap(), self.pki.get("alice.key").unwrap())
            }
            _ => rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(tls::root_store(ca).unwrap()).with_no_client_auth())
                .map_err(Into::into),
        }
        .unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if matches!(cred, Credential::Token) {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
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
    let (code, body) =
        proxy.request(http::Method::POST, "/api/v1/namespaces/default/services", Credential::Cert, &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
