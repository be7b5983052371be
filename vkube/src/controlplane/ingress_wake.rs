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
use vkube_syncer::ingresses::leads_only_to;
use vkube_syncer::naming::Translator;

use crate::names;

/// The control plane Service's port that ingress traffic reaches while the cluster sleeps.
pub const PORT_NAME: &str = vkube_core::contract::WAKE_PORT_NAME;
/// The port number on that Service (the chart's and local mode's), and the chart pod's port.
pub const SERVICE_PORT: i32 = 80;
pub const POD_PORT: i32 = 8080;

/// The host names (lowercase; exact or `*.suffix`) of the cluster's sleeping Ingresses, which
/// the wake listener answers for.
pub type SleepingHosts = Arc<RwLock<Vec<String>>>;

/// Points every backend of the cluster's host Ingresses (its own copies only) at the wake port
/// of its control plane's Service. Returns the host names of them all, and the first failure if
/// one could not be pointed (each is tried; a conflict with the ingress controller's status
/// write is read again). Idempotent: done again after a restart while asleep, and retried.
pub async fn redirect(host: &kube::Client, namespace: &str, cluster: &str) -> (Vec<String>, Option<kube::Error>) {
    let api: Api<Ingress> = Api::namespaced(host.clone(), namespace);
    let listed = match owned(&api, namespace, cluster).await {
        Ok(l) => l,
        Err(e) => return (vec![], Some(e)),
    };
    let hosts = host_names(listed.iter().filter_map(|i| i.spec.as_ref()));
    let mut failed = None;
    for ing in listed {
        if let Err(e) = point_at_wake(&api, ing, &names::service(cluster)).await {
            failed.get_or_insert(e);
        }
    }
    (hosts, failed)
}

/// The host names of the cluster's host Ingresses that still lead to the wake port: after a
/// restart while the syncer holds them (a wake moments ago), the listener answers for them.
pub async fn still_leading_here(host: &kube::Client, namespace: &str, cluster: &str) -> kube::Result<Vec<String>> {
    let api: Api<Ingress> = Api::namespaced(host.clone(), namespace);
    let service = names::service(cluster);
    let listed = owned(&api, namespace, cluster).await?;
    let held = listed.iter().filter_map(|i| i.spec.as_ref()).filter(|s| leads_only_to(s, &service, PORT_NAME));
    Ok(host_names(held))
}

/// The rules' host names, lowercase, each once.
fn host_names<'a>(specs: impl Iterator<Item = &'a IngressSpec>) -> Vec<String> {
    let rules = specs.flat_map(|s| s.rules.iter().flatten());
    let names: std::collections::BTreeSet<String> =
        rules.filter_map(|r| r.host.as_deref()).filter(|h| !h.is_empty()).map(str::to_ascii_lowercase).collect();
    names.into_iter().collect()
}

/// The cluster's own host Ingresses (its label and ownership annotations).
pub(super) async fn owned(api: &Api<Ingress>, namespace: &str, cluster: &str) -> kube::Result<Vec<Ingress>> {
    let tr = Translator::new(cluster, namespace);
    let listed = api.list(&ListParams::default().labels(&tr.cluster_selector())).await?;
    Ok(listed.items.into_iter().filter(|i| tr.owner(&i.metadata).is_some()).collect())
}

async fn point_at_wake(api: &Api<Ingress>, mut ing: Ingress, service: &str) -> kube::Result<()> {
    let name = ing.metadata.name.clone().unwrap_or_default();
    for _ in 0..3 {
        let spec = ing.spec.clone().unwrap_or_default();
        let asleep = asleep_spec(&spec, service);
        if spec == asleep {
            return Ok(());
        }
        // A replace, as the syncer writes its copies (the Role grants no patch of Ingresses).
        let replaced = Ingress { spec: Some(asleep), status: None, ..ing.clone() };
        match api.replace(&name, &Default::default(), &replaced).await {
            Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(&name).await? {
                Some(fresh) => ing = fresh,
                None => return Ok(()),
            },
            other => return other.map(drop),
        }
    }
    Err(kube::Error::Api(
        kube::core::Status::failure(&format!("Ingress {name} kept changing"), "Conflict").with_code(409).boxed(),
    ))
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

/// Which of `hosts` (lowercase) serves `host` (a request's Host, without its port): an exact
/// name, or a `*.suffix` one more DNS label under it, as an Ingress rule's wildcard matches.
pub fn served_by<'a>(hosts: &'a [String], host: &str) -> Option<&'a str> {
    let host = host.to_ascii_lowercase();
    let under = |suffix: &str| {
        host.strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    hosts.iter().map(String::as_str).find(|h| match h.strip_prefix("*.") {
        Some(suffix) => under(suffix),
        None => host == *h,
    })
}

/// Connections served at once (each lives at most [`HEADER_TIMEOUT`] without a request): the
/// port needs no credentials, so a flood must not exhaust the control plane's memory or files.
const MAX_CONNECTIONS: usize = 256;
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the wake port: a request for a sleeping Ingress's host name wakes the cluster if it
/// sleeps or is going to (counted as activity of `ingress:` and the matching host entry) and
/// gets 503 with `Retry-After` and a page that reloads itself; another host name gets 404. The
/// answers name neither the cluster nor its state: public users of the Ingress see them.
pub async fn serve(listener: tokio::net::TcpListener, sleep: Sleep, hosts: SleepingHosts) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: not a busy loop meanwhile.
                tracing::debug!(error = %e, "accepting on the wake port failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (sleep, hosts) = (sleep.clone(), hosts.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = answer(&sleep, &hosts, req.headers());
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

fn answer(sleep: &Sleep, hosts: &SleepingHosts, headers: &http::HeaderMap) -> http::Response<Full<Bytes>> {
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let host = host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(h, _)| h);
    let matched = served_by(&hosts.read().unwrap_or_else(|e| e.into_inner()), host).map(str::to_string);
    let respond = |status: http::StatusCode, content_type: &'static str, body: String| {
        let mut res = http::Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
        res
    };
    let Some(entry) = matched else {
        let body = "no sleeping Ingress here serves this host name\n".to_string();
        return respond(http::StatusCode::NOT_FOUND, "text/plain; charset=utf-8", body);
    };
    if matches!(sleep.power(), Power::Sleeping | Power::GoingToSleep) {
        // The entry, not the Host as sent: a wildcard's names must not fill the activity labels.
        sleep.wake_from_ingress(&entry);
    }
    let mut res = respond(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><meta http-equiv=\"refresh\" content=\"5\"><title>Waking up</title>\
             <p>{} was asleep and is waking up. This page reloads itself.</p>\n",
            html_escape::encode_text(host)
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
        assert_eq!(host_names([&spec, &asleep].into_iter()), ["shop.team-a.example.com"]);
        assert!(leads_only_to(&asleep, "a", PORT_NAME) && !leads_only_to(&spec, "a", PORT_NAME));
    }

    #[test]
    fn host_names_match_exactly_or_one_label_under_a_wildcard() {
        let hosts = vec!["*.apps.example.com".to_string(), "shop.example.com".to_string()];
        assert_eq!(served_by(&hosts, "shop.example.com"), Some("shop.example.com"));
        assert_eq!(served_by(&hosts, "SHOP.example.com"), Some("shop.example.com"));
        assert_eq!(served_by(&hosts, "a.apps.example.com"), Some("*.apps.example.com"), "the entry, not the name");
        assert_eq!(served_by(&hosts, "b.a.apps.example.com"), None, "a wildcard matches one label");
        for no in ["apps.example.com", "other.example.com", "", "<b>x.apps.example.com"] {
            assert_eq!(served_by(&hosts, no), None, "{no}");
        }
    }

    #[test]
    fn a_known_host_name_wakes_a_sleeping_cluster_and_others_do_not() {
        let hosts: SleepingHosts = Arc::new(RwLock::new(vec!["*.apps.example.com".into()]));
        let (sleep, ctl) = Sleep::new(Power::Sleeping, vec![], std::time::Duration::from_secs(1));
        let ask = |host: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::HOST, host.parse().unwrap());
            answer(&sleep, &hosts, &h)
        };
        let res = ask("elsewhere.example.com:80");
        assert_eq!(res.status(), http::StatusCode::NOT_FOUND);
        assert!(ctl.activity.last().is_none(), "an unknown host name is no activity");
        let res = ask("Shop.apps.example.com:80");
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "5");
        assert_eq!(ctl.activity.last().map(|(_, by)| by).as_deref(), Some("ingress:*.apps.example.com"));
        ctl.power.send_replace(Power::Running);
        let before = ctl.activity.last();
        assert_eq!(ask("shop.apps.example.com").status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ctl.activity.last(), before, "awake, nothing to wake");
    }
}
