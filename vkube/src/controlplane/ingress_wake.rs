//! Waking on ingress traffic. Asleep, a cluster's workloads are gone and the host ingress
//! controller would answer its Ingresses with errors that wake nothing; so going to sleep
//! points every backend of the cluster's host Ingresses at the control plane's own Service
//! (port `wake`), where `vkube run --wake-listen` answers plain HTTP: a request for one of
//! those Ingresses' host names wakes the cluster and gets a page that retries in a few
//! seconds. Waking, the syncer puts the tenant's backends back (the host copy differs from
//! what the virtual Ingress wants), so nothing needs undoing here.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, Ingress, IngressBackend, IngressServiceBackend, IngressSpec, ServiceBackendPort,
};
use kube::api::{Api, ListParams};
use vkube_apiproxy::sleep::{Power, Sleep};
use vkube_syncer::naming::Translator;

use crate::names;

/// The control plane Service's port that ingress traffic reaches while the cluster sleeps.
pub const PORT_NAME: &str = "wake";
/// The port number on that Service (the chart's and local mode's), and the chart pod's port.
pub const SERVICE_PORT: i32 = 80;
pub const POD_PORT: i32 = 8080;

/// The host names of the cluster's sleeping Ingresses, which the wake listener answers for.
pub type SleepingHosts = Arc<RwLock<Vec<String>>>;

/// Points every backend of the cluster's host Ingresses at the wake port of its control plane's
/// Service and returns their host names. Idempotent (a restart while asleep does it again).
pub async fn redirect(host: &kube::Client, namespace: &str, cluster: &str) -> kube::Result<Vec<String>> {
    let api: Api<Ingress> = Api::namespaced(host.clone(), namespace);
    let selector = Translator::new(cluster, namespace).cluster_selector();
    let mut hosts = vec![];
    for ing in api.list(&ListParams::default().labels(&selector)).await?.items {
        let Some(spec) = ing.spec.as_ref() else { continue };
        hosts.extend(rule_hosts(spec));
        let asleep = asleep_spec(spec, &names::service(cluster));
        if *spec != asleep {
            // A replace, as the syncer writes its copies (the Role grants no patch of Ingresses).
            let name = ing.metadata.name.clone().unwrap_or_default();
            let replaced = Ingress { spec: Some(asleep), status: None, ..ing };
            api.replace(&name, &Default::default(), &replaced).await?;
        }
    }
    hosts.sort();
    hosts.dedup();
    Ok(hosts)
}

/// The spec with every path's backend replaced by the control plane's wake port (pure).
pub fn asleep_spec(spec: &IngressSpec, service: &str) -> IngressSpec {
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: service.to_string(),
            port: Some(ServiceBackendPort { name: Some(PORT_NAME.into()), number: None }),
        }),
        resource: None,
    };
    let mut spec = spec.clone();
    spec.default_backend = None;
    for rule in spec.rules.iter_mut().flatten() {
        for path in rule.http.iter_mut().flat_map(|h| h.paths.iter_mut()) {
            *path = HTTPIngressPath { backend: backend.clone(), ..path.clone() };
        }
    }
    spec
}

fn rule_hosts(spec: &IngressSpec) -> impl Iterator<Item = String> + '_ {
    spec.rules.iter().flatten().filter_map(|r| r.host.clone()).filter(|h| !h.is_empty())
}

/// Whether `host` (a request's Host, without its port) is one of `hosts`, whose `*.suffix`
/// entries match one more label, as an Ingress rule's wildcard does.
pub fn serves(hosts: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    hosts.iter().map(|h| h.to_ascii_lowercase()).any(|h| match h.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
        None => host == h,
    })
}

/// Serves the wake port: asleep, a request for a sleeping Ingress's host name wakes the cluster
/// (counted as activity by `ingress`); every request gets 503 with `Retry-After` and a page that
/// reloads itself, or 404 for a host name none of its Ingresses has.
pub async fn serve(listener: tokio::net::TcpListener, sleep: Sleep, hosts: SleepingHosts, cluster: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (sleep, hosts, cluster) = (sleep.clone(), hosts.clone(), cluster.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = answer(&sleep, &hosts, &cluster, req.headers());
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    sleep: &Sleep,
    hosts: &SleepingHosts,
    cluster: &str,
    headers: &http::HeaderMap,
) -> http::Response<Full<Bytes>> {
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let host = host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(h, _)| h);
    let known = serves(&hosts.read().unwrap_or_else(|e| e.into_inner()), host);
    let respond = |status: http::StatusCode, content_type: &'static str, body: String| {
        let mut res = http::Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        res.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        res
    };
    if !known {
        return respond(
            http::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("no Ingress of virtual cluster {cluster} serves the host name {host:?}\n"),
        );
    }
    let power = sleep.power();
    if power == Power::Sleeping {
        sleep.wake_from_ingress(host);
    }
    let host = html_escape::encode_text(host);
    let mut res = respond(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><meta http-equiv=\"refresh\" content=\"5\"><title>Waking up</title>\
             <p>{host} is served by virtual cluster {cluster}, which was asleep and is waking up \
             ({}). This page reloads itself.</p>\n",
            power.as_str()
        ),
    );
    res.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("5"));
    res
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{HTTPIngressRuleValue, IngressRule, IngressTLS};

    use super::*;

    fn path(p: &str, service: &str) -> HTTPIngressPath {
        HTTPIngressPath {
            path: Some(p.into()),
            path_type: "Prefix".into(),
            backend: IngressBackend {
                service: Some(IngressServiceBackend {
                    name: service.into(),
                    port: Some(ServiceBackendPort { number: Some(8080), name: None }),
                }),
                resource: None,
            },
        }
    }

    #[test]
    fn asleep_every_path_goes_to_the_wake_port_and_the_rest_stays() {
        let spec = IngressSpec {
            ingress_class_name: Some("web".into()),
            rules: Some(vec![IngressRule {
                host: Some("shop.team-a.example.com".into()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![path("/", "web-x-default-x-a"), path("/api", "api-x-default-x-a")],
                }),
            }]),
            tls: Some(vec![IngressTLS {
                hosts: Some(vec!["shop.team-a.example.com".into()]),
                secret_name: Some("tls".into()),
            }]),
            ..Default::default()
        };
        let asleep = asleep_spec(&spec, "a");
        let paths = &asleep.rules.as_ref().unwrap()[0].http.as_ref().unwrap().paths;
        assert_eq!(paths.iter().map(|p| p.path.as_deref().unwrap()).collect::<Vec<_>>(), ["/", "/api"]);
        for p in paths {
            let svc = p.backend.service.as_ref().unwrap();
            assert_eq!((svc.name.as_str(), svc.port.as_ref().unwrap().name.as_deref()), ("a", Some(PORT_NAME)));
        }
        assert_eq!((&asleep.ingress_class_name, &asleep.tls), (&spec.ingress_class_name, &spec.tls));
        assert_eq!(asleep_spec(&asleep, "a"), asleep, "idempotent");
        assert_eq!(rule_hosts(&spec).collect::<Vec<_>>(), ["shop.team-a.example.com"]);
    }

    #[test]
    fn host_names_match_exactly_or_one_label_under_a_wildcard() {
        let hosts = vec!["shop.example.com".to_string(), "*.apps.example.com".to_string()];
        assert!(serves(&hosts, "shop.example.com"));
        assert!(serves(&hosts, "SHOP.example.com"));
        assert!(serves(&hosts, "a.apps.example.com"));
        assert!(!serves(&hosts, "b.a.apps.example.com"), "a wildcard matches one label");
        assert!(!serves(&hosts, "apps.example.com"));
        assert!(!serves(&hosts, "other.example.com"));
        assert!(!serves(&hosts, ""));
        assert!(!serves(&hosts, "<b>x.apps.example.com"), "only a host name's characters under a wildcard");
    }
}
