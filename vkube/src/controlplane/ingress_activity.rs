//! Ingress traffic counts as activity while the cluster is awake (`vkube run --ingress-metrics
//! URL`). Awake, requests go from the host's ingress controller straight to the tenant's pods,
//! past everything vkube sees, so a web app in use would go to sleep under its visitors. The
//! controller's own Prometheus metrics count the requests per backend: read every few seconds
//! while the cluster runs, a count that grew for one of the cluster's own host Ingresses is
//! activity of `ingress:HOST` (its first rule's host).
//!
//! Controllers understood, by the metric each serves (whichever the text holds):
//! - traefik (its `kubernetesIngress` provider): `traefik_service_requests_total`, label
//!   `service` = `NS-SERVICE-PORT@kubernetes` (its name for a path's backend: the port's name,
//!   else its number; the syncer writes numbers);
//! - ingress-nginx: `nginx_ingress_controller_requests`, labels `namespace` and `ingress`.
//!
//! A default backend is not attributed (traefik names it `default-backend` whatever the Ingress).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::Api;
use vkube_apiproxy::sleep::{Power, Sleep};

const TRAEFIK: &str = "traefik_service_requests_total";
const NGINX: &str = "nginx_ingress_controller_requests";

/// A scrape that takes longer is given up (and tried at the next look).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// A sample line is short; a longer one is not metrics (and would grow without bound).
const MAX_LINE: usize = 64 << 10;

/// How often the metrics are read: a quarter of `--sleep-after` (so traffic is seen well before
/// the cluster would sleep), within 2 to 30 seconds; every 30 s without it (activity still
/// counts for `--delete-after-inactivity`).
pub fn every(sleep_after: Option<Duration>) -> Duration {
    sleep_after.map_or(Duration::from_secs(30), |a| (a / 4).clamp(Duration::from_secs(2), Duration::from_secs(30)))
}

/// `--ingress-metrics`: plain HTTP (a controller serves its metrics in the cluster, unencrypted).
pub fn parse_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if uri.scheme_str() != Some("http") || uri.host().is_none() || userinfo {
        return Err(format!("{s:?}: expected http://HOST:PORT/PATH, e.g. http://traefik-metrics.traefik:9100/metrics"));
    }
    Ok(uri)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReadLabels {
    /// ok | failed
    result: &'static str,
}

/// What the readings tell Prometheus: `vkube_ingress_metrics_reads_total{result}`, so a URL
/// that stopped answering (and traffic that no longer keeps the cluster awake) shows.
#[derive(Clone, Default)]
pub struct Reads(prometheus_client::metrics::family::Family<ReadLabels, prometheus_client::metrics::counter::Counter>);

impl Reads {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let reads = Reads::default();
        registry.register(
            "vkube_ingress_metrics_reads",
            "Readings of the ingress controller's metrics (--ingress-metrics), by result",
            reads.0.clone(),
        );
        reads
    }

    fn record(&self, ok: bool) {
        self.0.get_or_create(&ReadLabels { result: if ok { "ok" } else { "failed" } }).inc();
    }
}

/// Reads the controller's metrics every `every` while the cluster runs, and counts the requests
/// through the cluster's host Ingresses as activity. The URL's host name is resolved each time
/// and every address it has is read (a headless Service: each replica of the controller, whose
/// counters are its own). The first reading of an address after a start, a wake or any change
/// of power (and after a counter went down: the controller restarted) is only a baseline.
pub async fn count(
    url: http::Uri,
    every: Duration,
    host: kube::Client,
    namespace: String,
    cluster: String,
    sleep: Sleep,
    reads: Reads,
) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let ingresses: Api<Ingress> = Api::namespaced(host, &namespace);
    let mut power = sleep.power_changes();
    let mut before: Totals = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if power.has_changed().unwrap_or(true) {
            before.clear();
        }
        if *power.borrow_and_update() != Power::Running {
            continue;
        }
        let read = async {
            let listed = super::ingress_wake::owned(&ingresses, &namespace, &cluster)
                .await
                .context("listing the host Ingresses")?;
            let counted: Vec<Counted> = listed.iter().map(|i| Counted::of(&namespace, i)).collect();
            // Each address on its own: one replica that does not answer leaves the others'.
            let addrs = addresses(&url).await?;
            let pages = futures::future::join_all(addrs.iter().map(|a| scrape(&client, &url, *a, &namespace))).await;
            let (mut now, mut read, mut failed) = (Totals::new(), 0, vec![]);
            for (addr, page) in addrs.into_iter().zip(pages) {
                match page {
                    Ok(lines) => {
                        read += 1;
                        now.extend(totals(&lines, &namespace, &counted).into_iter().map(|(i, t)| ((addr, i), t)))
                    }
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            if read == 0 {
                anyhow::bail!("{}", failed.join("; "));
            }
            if !failed.is_empty() {
                tracing::debug!(failed = failed.join("; "), "some of the ingress controller's replicas did not answer");
            }
            anyhow::Ok((now, counted))
        };
        let read = read.await;
        // Asleep or woken meanwhile: what was read may span the change.
        if power.has_changed().unwrap_or(true) {
            continue;
        }
        reads.record(read.is_ok());
        match read {
            Ok((now, counted)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(url = %url, "reading the ingress controller's metrics again");
                }
                for i in grown(&before, &now) {
                    if let Some(c) = counted.iter().find(|c| c.name == i) {
                        sleep.ingress_traffic(&c.entry);
                    }
                }
                before = now;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(url = %url, error = format!("{e:#}"), "could not read the ingress controller's metrics: ingress traffic does not keep the cluster awake meanwhile (--ingress-metrics)");
            }
            Err(_) => {}
        }
    }
}

/// Requests counted per controller address and host Ingress (by name).
type Totals = HashMap<(std::net::SocketAddr, String), f64>;

/// The host Ingresses whose requests grew between two readings, each once: at an address read
/// both times (a new address, or one whose counter went down, is a baseline).
fn grown(before: &Totals, now: &Totals) -> BTreeSet<String> {
    now.iter()
        .filter(|(k, total)| before.get(*k).is_some_and(|b| *total > b))
        .map(|((_, name), _)| name.clone())
        .collect()
}

/// Every address the URL's host name has now.
async fn addresses(url: &http::Uri) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let host = url.host().unwrap_or_default();
    let port = url.port_u16().unwrap_or(80);
    let found: BTreeSet<std::net::SocketAddr> =
        tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
    anyhow::ensure!(!found.is_empty(), "{host} has no address");
    Ok(found.into_iter().collect())
}

/// The lines of the metrics at `addr` (the URL's path, its Host header) that [`totals`] reads
/// for host namespace `namespace`, kept as they stream in: a large page is never held whole, nor
/// the other namespaces' lines.
async fn scrape(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &http::Uri,
    addr: std::net::SocketAddr,
    namespace: &str,
) -> anyhow::Result<String> {
    let ours = [format!("service=\"{namespace}-"), format!("namespace=\"{namespace}\"")];
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()))
        // The text format (not protobuf or OpenMetrics, which a controller may prefer).
        .header(http::header::ACCEPT, "text/plain; version=0.0.4")
        .body(Empty::new())?;
    let work = async {
        let res = client.request(req).await?;
        anyhow::ensure!(res.status().is_success(), "{url} at {addr} answered {}", res.status());
        let mut body = res.into_body();
        let (mut kept, mut partial) = (String::new(), Vec::<u8>::new());
        let mut keep = |line: &[u8]| {
            if !(line.starts_with(TRAEFIK.as_bytes()) || line.starts_with(NGINX.as_bytes())) {
                return;
            }
            let line = String::from_utf8_lossy(line);
            if ours.iter().any(|o| line.contains(o.as_str())) {
                kept.push_str(&line);
                kept.push('\n');
            }
        };
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            partial.extend_from_slice(&data);
            let complete = partial.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            partial[..complete].split(|b| *b == b'\n').for_each(&mut keep);
            partial.drain(..complete);
            anyhow::ensure!(partial.len() <= MAX_LINE, "{url} at {addr}: a line longer than {MAX_LINE} bytes");
        }
        keep(&partial);
        Ok(kept)
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("{url} at {addr} did not answer within {SCRAPE_TIMEOUT:?}"))?
}

/// What one host Ingress's requests are counted by.
#[derive(Debug)]
struct Counted {
    /// The host Ingress's name (ingress-nginx's `ingress` label).
    name: String,
    /// Who the activity is of: its first rule's host, else the virtual Ingress's `NS/NAME`.
    entry: String,
    /// traefik's names of its paths' backends.
    traefik_services: BTreeSet<String>,
}

impl Counted {
    fn of(namespace: &str, ing: &Ingress) -> Counted {
        let spec = ing.spec.clone().unwrap_or_default();
        let rules = spec.rules.iter().flatten();
        let first_host = rules.clone().filter_map(|r| r.host.clone()).find(|h| !h.is_empty());
        let virtual_name = || {
            let ann = ing.metadata.annotations.clone().unwrap_or_default();
            let get = |k: &str| ann.get(k).cloned().unwrap_or_default();
            format!(
                "{}/{}",
                get(vkube_core::contract::ANNOTATION_NAMESPACE),
                get(vkube_core::contract::ANNOTATION_NAME)
            )
        };
        let backends =
            rules.flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter())).filter_map(|p| p.backend.service.as_ref());
        let traefik_services = backends
            .map(|b| {
                let port = b.port.as_ref();
                let port = match port.and_then(|p| p.name.clone()).filter(|n| !n.is_empty()) {
                    Some(name) => name,
                    None => port.and_then(|p| p.number).unwrap_or_default().to_string(),
                };
                format!("{}@kubernetes", traefik_normalize(&format!("{namespace}-{}-{port}", b.name)))
            })
            .collect();
        Counted {
            name: ing.metadata.name.clone().unwrap_or_default(),
            entry: first_host.unwrap_or_else(virtual_name),
            traefik_services,
        }
    }
}

/// traefik's `provider.Normalize`: runs of anything but letters and digits become one `-`.
fn traefik_normalize(name: &str) -> String {
    name.split(|c: char| !c.is_alphanumeric()).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("-")
}

/// Requests counted so far per host Ingress (by name): the sum of its series. An Ingress without
/// any series counts 0.
fn totals(text: &str, namespace: &str, counted: &[Counted]) -> HashMap<String, f64> {
    let mut out: HashMap<String, f64> = counted.iter().map(|c| (c.name.clone(), 0.0)).collect();
    let mut by_service: HashMap<&str, Vec<&str>> = HashMap::new();
    for c in counted {
        for service in &c.traefik_services {
            by_service.entry(service.as_str()).or_default().push(c.name.as_str());
        }
    }
    for s in text.lines().filter_map(sample) {
        let names = match s.name {
            TRAEFIK => s.label("service").and_then(|service| by_service.get(service)).cloned().unwrap_or_default(),
            NGINX if s.label("namespace") == Some(namespace) => s.label("ingress").into_iter().collect(),
            _ => vec![],
        };
        for name in names {
            if let Some(total) = out.get_mut(name) {
                *total += s.value;
            }
        }
    }
    out
}

/// One sample of Prometheus' text format.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    /// Escapes undone.
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl Sample<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
}

/// A sample line, `name{key="value",...} value [timestamp]`; `None` for anything else.
fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_start();
    if line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = vec![];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let quoted = after.trim_start().strip_prefix('"')?;
            let mut chars = quoted.char_indices();
            let mut value = String::new();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => value.push(match chars.next()?.1 {
                        'n' => '\n',
                        other => other,
                    }),
                    '"' => break i + 1,
                    c => value.push(c),
                }
            };
            labels.push((key.trim(), value));
            rest = quoted[end..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{
        HTTPIngressPath, HTTPIngressRuleValue, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
        ServiceBackendPort,
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn ingress(name: &str, host: Option<&str>, backends: &[(&str, ServiceBackendPort)]) -> Ingress {
        let paths = backends
            .iter()
            .map(|(svc, port)| HTTPIngressPath {
                path: Some("/".into()),
                path_type: "Prefix".into(),
                backend: IngressBackend {
                    service: Some(IngressServiceBackend { name: svc.to_string(), port: Some(port.clone()) }),
                    resource: None,
                },
            })
            .collect();
        Ingress {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    [
                        (vkube_core::contract::ANNOTATION_NAMESPACE, "shop"),
                        (vkube_core::contract::ANNOTATION_NAME, "front"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                rules: Some(vec![IngressRule {
                    host: host.map(str::to_string),
                    http: Some(HTTPIngressRuleValue { paths }),
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn number(n: i32) -> ServiceBackendPort {
        ServiceBackendPort { number: Some(n), name: None }
    }

    #[test]
    fn samples_are_read_with_their_labels_and_escapes() {
        let s = |name, labels: &[(&'static str, &str)], value| Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        };
        let line = r#"traefik_service_requests_total{code="200",method="GET",service="ns-web-80@kubernetes"} 3"#;
        let read = sample(line).expect("a sample");
        assert_eq!(read, s(TRAEFIK, &[("code", "200"), ("method", "GET"), ("service", "ns-web-80@kubernetes")], 3.0));
        assert_eq!(read.label("service"), Some("ns-web-80@kubernetes"));
        assert_eq!(
            sample(r#"m{a="x\"y\\z\n",b="}",} 1.5e3 1700000000000"#),
            Some(s("m", &[("a", "x\"y\\z\n"), ("b", "}")], 1500.0))
        );
        assert_eq!(sample("up 1"), Some(s("up", &[], 1.0)));
        for not in ["# TYPE m counter", "", "m{a=\"unterminated} 1", "m{a=1} 2", "m{a=\"x\"}", "m{a=\"x\"} NaNa"] {
            assert_eq!(sample(not), None, "{not}");
        }
    }

    #[test]
    fn traefik_names_a_backend_by_namespace_service_and_port() {
        let named = ServiceBackendPort { name: Some("http".into()), number: None };
        let c = Counted::of(
            "vkube-a",
            &ingress(
                "front-x-shop-x-a",
                Some("shop.example.com"),
                &[("web-x-shop-x-a", number(80)), ("api-x-shop-x-a", named)],
            ),
        );
        assert_eq!(
            c.traefik_services.iter().map(String::as_str).collect::<Vec<_>>(),
            ["vkube-a-api-x-shop-x-a-http@kubernetes", "vkube-a-web-x-shop-x-a-80@kubernetes"]
        );
        assert_eq!(c.entry, "shop.example.com");
        assert_eq!(Counted::of("vkube-a", &ingress("f", None, &[])).entry, "shop/front", "no host: the virtual name");
        assert_eq!(traefik_normalize("a--b.c_d"), "a-b-c-d");
    }

    #[test]
    fn only_the_clusters_own_backends_and_ingresses_count() {
        let counted = [
            Counted::of(
                "vkube-a",
                &ingress("front-x-shop-x-a", Some("shop.example.com"), &[("web-x-shop-x-a", number(80))]),
            ),
            Counted::of(
                "vkube-a",
                &ingress("idle-x-shop-x-a", Some("idle.example.com"), &[("idle-x-shop-x-a", number(80))]),
            ),
        ];
        let text = r#"
# HELP traefik_service_requests_total How many HTTP requests processed on a service.
# TYPE traefik_service_requests_total counter
traefik_service_requests_total{code="200",method="GET",protocol="http",service="vkube-a-web-x-shop-x-a-80@kubernetes"} 5
traefik_service_requests_total{code="502",method="GET",protocol="http",service="vkube-a-web-x-shop-x-a-80@kubernetes"} 2
traefik_service_requests_total{code="200",method="GET",protocol="http",service="vkube-a-b-web-x-shop-x-a-80@kubernetes"} 100
traefik_service_requests_total{code="200",method="GET",protocol="http",service="vkube-b-web-x-shop-x-a-80@kubernetes"} 100
traefik_service_requests_bytes_total{code="200",method="GET",protocol="http",service="vkube-a-web-x-shop-x-a-80@kubernetes"} 999
nginx_ingress_controller_requests{namespace="vkube-a",ingress="front-x-shop-x-a",status="200"} 4
nginx_ingress_controller_requests{namespace="vkube-b",ingress="front-x-shop-x-a",status="200"} 100
nginx_ingress_controller_requests_total{namespace="vkube-a",ingress="front-x-shop-x-a"} 100
"#;
        let t = totals(text, "vkube-a", &counted);
        assert_eq!(t["front-x-shop-x-a"], 11.0);
        assert_eq!(t["idle-x-shop-x-a"], 0.0);
        assert_eq!(t.len(), 2);
    }

    #[tokio::test]
    async fn a_page_is_read_as_it_streams_keeping_only_the_lines_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let page = format!(
            "# TYPE x counter\n{}\ntraefik_service_requests_total{{service=\"ns-web-80@kubernetes\"}} 3\nother 1\ntraefik_service_requests_total{{service=\"ns2-web-80@kubernetes\"}} 5\nnginx_ingress_controller_requests{{namespace=\"ns2\",ingress=\"a\"}} 4\nnginx_ingress_controller_requests{{namespace=\"ns\",ingress=\"a\"}} 2",
            "filler 1\n".repeat(20_000)
        );
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let n = conn.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).to_string();
            conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
            // Chunks of 7 bytes: lines split across frames.
            for chunk in page.as_bytes().chunks(7) {
                conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
                conn.write_all(chunk).await.unwrap();
                conn.write_all(b"\r\n").await.unwrap();
            }
            conn.write_all(b"0\r\n\r\n").await.unwrap();
            request
        });
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let url = parse_url("http://metrics.example:9100/metrics").unwrap();
        let kept = scrape(&client, &url, addr, "ns").await.unwrap();
        assert_eq!(
            kept,
            "traefik_service_requests_total{service=\"ns-web-80@kubernetes\"} 3\nnginx_ingress_controller_requests{namespace=\"ns\",ingress=\"a\"} 2\n",
            "the lines of the cluster's namespace only"
        );
        let request = server.await.unwrap().to_ascii_lowercase();
        assert!(
            request.starts_with("get /metrics http/1.1") && request.contains("host: metrics.example:9100"),
            "{request}"
        );
    }

    #[test]
    fn growth_counts_only_against_an_earlier_reading_of_the_same_address() {
        let (a, b): (std::net::SocketAddr, std::net::SocketAddr) =
            ("10.0.0.1:9100".parse().unwrap(), "10.0.0.2:9100".parse().unwrap());
        let reading = |values: &[(std::net::SocketAddr, &str, f64)]| -> Totals {
            values.iter().map(|(addr, name, v)| ((*addr, name.to_string()), *v)).collect()
        };
        let before = reading(&[(a, "web", 5.0), (a, "api", 7.0), (b, "web", 3.0)]);
        let now = reading(&[(a, "web", 5.0), (a, "api", 2.0), (b, "web", 4.0), (a, "new", 9.0)]);
        // web grew at b; api went down at a (the controller restarted: a baseline); new is new.
        assert_eq!(grown(&before, &now), ["web".to_string()].into());
        assert!(grown(&Totals::new(), &now).is_empty(), "the first reading is a baseline");
    }

    #[test]
    fn reading_is_more_frequent_than_sleeping() {
        assert_eq!(every(Some(Duration::from_secs(1800))), Duration::from_secs(30));
        assert_eq!(every(Some(Duration::from_secs(20))), Duration::from_secs(5));
        assert_eq!(every(Some(Duration::from_secs(1))), Duration::from_secs(2));
        assert_eq!(every(None), Duration::from_secs(30));
        assert!(parse_url("http://traefik.traefik:9100/metrics").is_ok());
        for bad in ["https://x/metrics", "x:9100", "/metrics", "http://user:secret@x:9100/metrics"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
