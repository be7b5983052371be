//! The virtual cluster's resource metrics API (`metrics.k8s.io/v1beta1`: `kubectl top`, and the
//! HorizontalPodAutoscaler's CPU and memory targets), read from the host's. The virtual API
//! server has it as an aggregated API whose Service is an ExternalName of
//! [`RESOURCE_METRICS_HOST`]; its connection there goes through the egress proxy, which hands it
//! here. TLS with a certificate for the Service's name signed by the kubelet CA (the APIService's
//! `caBundle`), and only the virtual API server's front-proxy client certificate gets a request
//! served: the aggregator has already authorized the user for the resource.
//!
//! Each answer joins the virtual objects the request selects (read from the virtual API server
//! with their label and field selectors) with the host's metrics of their host copies: pods by
//! their translated names among this cluster's host pods (a list in the host namespace by the
//! cluster's label, which only the syncer writes), nodes by name (a virtual node is the host
//! node of its name). Nothing else of the host shows: a host pod that is not a copy of a pod
//! the tenant has, or a node the virtual cluster does not show, is never answered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use vkube_core::contract::{LABEL_NAMESPACE, RESOURCE_METRICS_SERVICE};
use vkube_core::naming::Translator;

pub use vkube_core::contract::RESOURCE_METRICS_HOST as HOST;

use crate::error::ProxyError;
use crate::tls::{self, TlsError};
use crate::{Proxy, ProxyBody};

/// The user of the virtual API server's front-proxy client certificate, which the aggregator
/// presents to the APIs it proxies.
pub const CLIENT_USER: &str = "front-proxy-client";
const GROUP_VERSION: &str = "metrics.k8s.io/v1beta1";
/// Host reads of node metrics at once (one GET per node: the control plane may get a host
/// node's metrics by name, not list them all).
const NODE_READS: usize = 8;
/// How long a host answer is reused: metrics-server scrapes every 15 s by default, and each of
/// the virtual cluster's autoscalers asks every 15 s.
const HOST_REUSE: Duration = Duration::from_secs(10);

/// The host nodes the virtual cluster may show (those the host ran its pods on; with
/// `sync_all_nodes`, those the admin allows): a tenant's own Node of another name is answered
/// nothing of the host.
pub type ShownNodes = Arc<dyn Fn() -> BTreeSet<String> + Send + Sync>;

pub struct ResourceMetrics {
    proxy: Arc<Proxy>,
    /// A certificate of the kubelet CA for the Service's name; only the aggregator served.
    tls: tls::InProcessServer,
    shown_nodes: ShownNodes,
    /// Host answers by virtual namespace (`None`: all), and by node.
    pods: moka::future::Cache<Option<String>, Arc<BTreeMap<String, Value>>>,
    nodes: moka::future::Cache<String, Option<Value>>,
}

impl ResourceMetrics {
    /// `ca_*_pem`: the kubelet CA, which signs the serving certificate (and is the APIService's
    /// `caBundle`); `front_proxy_ca_pem`: the CA of the clients served.
    pub fn new(
        proxy: Arc<Proxy>,
        ca_cert_pem: &str,
        ca_key_pem: &str,
        front_proxy_ca_pem: &str,
        shown_nodes: ShownNodes,
    ) -> Result<Arc<Self>, TlsError> {
        let tls =
            tls::InProcessServer::new(ca_cert_pem, ca_key_pem, front_proxy_ca_pem, CLIENT_USER, "resource metrics")?;
        // Made now: a CA that cannot sign fails the start, not each request.
        tls.config(&service_host())?;
        Ok(Arc::new(ResourceMetrics { proxy, tls, shown_nodes, pods: cache(HOST_REUSE), nodes: cache(HOST_REUSE) }))
    }

    /// Serves one connection the virtual API server opened to [`HOST`].
    pub async fn serve<IO>(self: Arc<Self>, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        self.tls
            .serve(io, &service_host(), move |req| {
                let this = this.clone();
                async move { this.handle(req).await }
            })
            .await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let answer = match (Asked::parse(req.method(), req.uri().path()), Selectors::parse(req.uri().query())) {
            (Ok(asked), Ok(sel)) => self.answer(asked, sel).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match answer {
            Ok(body) => {
                let mut resp = Response::new(crate::full(serde_json::to_vec(&body).unwrap_or_default().into()));
                resp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                resp
            }
            Err(e) => {
                tracing::debug!(error = %e, path = req.uri().path(), "resource metrics request refused");
                e.into_response()
            }
        }
    }

    async fn answer(&self, asked: Asked, sel: Selectors) -> Result<Value, ProxyError> {
        match asked {
            Asked::Discovery => Ok(discovery()),
            Asked::Pods { namespace, name } => {
                let pods = self.virtual_pods(namespace.as_deref(), name.as_deref(), &sel).await?;
                // No pod selected, nothing to ask the host.
                let host = if pods.is_empty() { Default::default() } else { self.host_pod_metrics(namespace).await? };
                let items = pod_metrics(&self.proxy.translator, &pods, &host);
                one_or_list(items, name, "PodMetrics", "pods")
            }
            Asked::Nodes { name } => {
                let mut nodes = self.virtual_nodes(name.as_deref(), &sel).await?;
                let shown = (self.shown_nodes)();
                nodes.retain(|n| n.metadata.name.as_ref().is_some_and(|n| shown.contains(n)));
                let names: Vec<String> = nodes.iter().map(|n| n.metadata.name.clone().unwrap_or_default()).collect();
                let host = futures::stream::iter(names)
                    .map(|n| self.host_node_metrics(n))
                    .buffered(NODE_READS)
                    .collect::<Vec<_>>()
                    .await;
                let items = nodes
                    .iter()
                    .zip(host)
                    .filter_map(|(n, h)| h.transpose().map(|h| h.map(|h| node_metrics(n, &h))))
                    .collect::<Result<Vec<_>, _>>()?;
                one_or_list(items, name, "NodeMetrics", "nodes")
            }
        }
    }

    async fn virtual_pods(
        &self,
        ns: Option<&str>,
        name: Option<&str>,
        sel: &Selectors,
    ) -> Result<Vec<Pod>, ProxyError> {
        let api: Api<Pod> = match ns {
            Some(ns) => Api::namespaced(self.proxy.admin.clone(), ns),
            None => Api::all(self.proxy.admin.clone()),
        };
        if let Some(name) = name {
            return Ok(api.get_opt(name).await.map_err(virtual_error)?.into_iter().collect());
        }
        Ok(api.list(&sel.list_params()).await.map_err(virtual_error)?.items)
    }

    async fn virtual_nodes(&self, name: Option<&str>, sel: &Selectors) -> Result<Vec<Node>, ProxyError> {
        let api: Api<Node> = Api::all(self.proxy.admin.clone());
        if let Some(name) = name {
            return Ok(api.get_opt(name).await.map_err(virtual_error)?.into_iter().collect());
        }
        Ok(api.list(&sel.list_params()).await.map_err(virtual_error)?.items)
    }

    /// This cluster's host pods' metrics (of one virtual namespace's, or all), by host name.
    async fn host_pod_metrics(&self, namespace: Option<String>) -> Result<Arc<BTreeMap<String, Value>>, ProxyError> {
        let read = async {
            let tr = &self.proxy.translator;
            let mut selector = tr.cluster_selector();
            if let Some(ns) = &namespace {
                selector.push_str(&format!(",{LABEL_NAMESPACE}={ns}"));
            }
            let query =
                form_urlencoded::Serializer::new(String::new()).append_pair("labelSelector", &selector).finish();
            let path = format!("/apis/{GROUP_VERSION}/namespaces/{}/pods?{query}", tr.host_namespace());
            let list = self.host_get(&path, None).await?.unwrap_or_default();
            let by_name = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| Some((i["metadata"]["name"].as_str()?.to_string(), i.clone())))
                .collect();
            Ok(Arc::new(by_name))
        };
        self.pods.try_get_with(namespace.clone(), read).await.map_err(unshared)
    }

    /// The host's metrics of a node (`None`: none yet).
    async fn host_node_metrics(&self, name: String) -> Result<Option<Value>, ProxyError> {
        let path = format!("/apis/{GROUP_VERSION}/nodes/{name}");
        self.nodes.try_get_with(name.clone(), self.host_get(&path, Some(&name))).await.map_err(unshared)
    }

    /// A GET of the host's metrics API (of the object `name`, or a list): `None` when that
    /// object has no metrics (not scraped yet), an error naming what to do when the host serves
    /// no metrics API or refuses the control plane.
    async fn host_get(&self, path: &str, name: Option<&str>) -> Result<Option<Value>, ProxyError> {
        let req = Request::get(path).body(Vec::new()).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        match self.proxy.host.request::<Value>(req).await {
            Ok(v) => Ok(Some(v)),
            Err(kube::Error::Api(e))
                if e.code == 404 && name.is_some_and(|n| e.message.contains(&format!("\"{n}\" not found"))) =>
            {
                Ok(None)
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 503 => Err(ProxyError::Unavailable(format!(
                "the host cluster serves no resource metrics API ({GROUP_VERSION}: {}); the host's admin installs \
                 metrics-server there",
                e.message
            ))),
            Err(kube::Error::Api(e)) if e.code == 403 => Err(ProxyError::Forbidden(format!(
                "the control plane may not read the host's resource metrics ({}); the host's admin grants it (the \
                 chart's Role for pods; its ClusterRole, with rbac.readHostNodes, for nodes)",
                e.message
            ))),
            Err(e) => Err(ProxyError::upstream("reading the host's resource metrics", e)),
        }
    }
}

fn cache<K, V>(ttl: Duration) -> moka::future::Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::future::Cache::builder().max_capacity(1024).time_to_live(ttl).build()
}

/// The name the aggregator checks the serving certificate for: the Service's.
fn service_host() -> String {
    let (ns, name) = RESOURCE_METRICS_SERVICE;
    format!("{name}.{ns}.svc")
}

/// A cached load's error, for this request (moka shares one among the requests that waited).
fn unshared(e: Arc<ProxyError>) -> ProxyError {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => match shared.as_ref() {
            ProxyError::Unavailable(m) => ProxyError::Unavailable(m.clone()),
            ProxyError::Forbidden(m) => ProxyError::Forbidden(m.clone()),
            ProxyError::BadRequest(m) => ProxyError::BadRequest(m.clone()),
            other => ProxyError::upstream("reading the host's resource metrics", other.to_string()),
        },
    }
}

fn virtual_error(e: kube::Error) -> ProxyError {
    match e {
        kube::Error::Api(e) if e.code == 400 => ProxyError::BadRequest(e.message),
        e => ProxyError::upstream("reading the virtual cluster", e),
    }
}

/// What the aggregator asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Discovery,
    Pods { namespace: Option<String>, name: Option<String> },
    Nodes { name: Option<String> },
}

impl Asked {
    fn parse(method: &Method, path: &str) -> Result<Self, ProxyError> {
        if method != Method::GET {
            return Err(ProxyError::BadRequest(format!("{method} {path}: the resource metrics API is read-only")));
        }
        let rest = path.strip_prefix("/apis/metrics.k8s.io/v1beta1").map(|r| r.trim_end_matches('/'));
        let segments: Vec<&str> = rest.map(|r| r.split('/').skip(1).collect()).unwrap_or_default();
        let some = |s: &&str| Some(s.to_string());
        Ok(match (rest, segments.as_slice()) {
            (Some(""), _) => Asked::Discovery,
            (Some(_), ["pods"]) => Asked::Pods { namespace: None, name: None },
            (Some(_), ["namespaces", ns, "pods"]) if !ns.is_empty() => Asked::Pods { namespace: some(ns), name: None },
            (Some(_), ["namespaces", ns, "pods", name]) if !ns.is_empty() && !name.is_empty() => {
                Asked::Pods { namespace: some(ns), name: some(name) }
            }
            (Some(_), ["nodes"]) => Asked::Nodes { name: None },
            (Some(_), ["nodes", name]) if !name.is_empty() => Asked::Nodes { name: some(name) },
            // `/apis` (aggregated discovery: the aggregator falls back to the version's), OpenAPI
            // (the aggregator skips an API that has none), anything else.
            _ => return Err(ProxyError::NotFound(format!("{path}: not served"))),
        })
    }
}

/// The label and field selectors of a list, applied to the virtual objects. Fields as
/// metrics-server takes them: the object's name and namespace only (the virtual list is the
/// control plane's: any other field would tell a user who may read metrics what the pods hold).
#[derive(Debug, Default, PartialEq, Eq)]
struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selectors {
    fn parse(query: Option<&str>) -> Result<Self, ProxyError> {
        let mut s = Selectors::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match k.as_ref() {
                "labelSelector" if !v.is_empty() => s.labels = Some(v.into_owned()),
                "fieldSelector" if !v.is_empty() => {
                    for term in v.split(',') {
                        let key = term.split(['=', '!']).next().unwrap_or_default().trim();
                        if key != "metadata.name" && key != "metadata.namespace" {
                            return Err(ProxyError::BadRequest(format!(
                                "field label not supported: {key} (metadata.name and metadata.namespace are)"
                            )));
                        }
                    }
                    s.fields = Some(v.into_owned());
                }
                "watch" if v == "true" || v == "1" => {
                    return Err(ProxyError::BadRequest(
                        "the resource metrics API serves get and list, not watch".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(s)
    }

    fn list_params(&self) -> ListParams {
        ListParams { label_selector: self.labels.clone(), field_selector: self.fields.clone(), ..Default::default() }
    }
}

fn discovery() -> Value {
    let resource = |name: &str, kind: &str, namespaced: bool| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["get", "list"]});
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [resource("nodes", "NodeMetrics", false), resource("pods", "PodMetrics", true)],
    })
}

/// The virtual pods' metrics: each pod whose host copy the host has metrics of, under its
/// virtual name, namespace and labels, with the containers the virtual pod has.
fn pod_metrics(tr: &Translator, pods: &[Pod], host: &BTreeMap<String, Value>) -> Vec<Value> {
    pods.iter()
        .filter_map(|p| {
            let (ns, name) = (p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?);
            let h = host.get(&tr.host_name(ns, name))?;
            let spec = p.spec.as_ref();
            let names: Vec<&str> = spec
                .into_iter()
                .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
                .map(|c| c.name.as_str())
                .collect();
            let containers: Vec<&Value> = h["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["name"].as_str().is_some_and(|n| names.contains(&n)))
                .collect();
            Some(json!({
                "metadata": {"name": name, "namespace": ns, "labels": p.metadata.labels.clone().unwrap_or_default(),
                    "creationTimestamp": h["metadata"]["creationTimestamp"]},
                "timestamp": h["timestamp"],
                "window": h["window"],
                "containers": containers,
            }))
        })
        .collect()
}

fn node_metrics(node: &Node, host: &Value) -> Value {
    json!({
        "metadata": {"name": node.metadata.name, "labels": node.metadata.labels.clone().unwrap_or_default(),
            "creationTimestamp": host["metadata"]["creationTimestamp"]},
        "timestamp": host["timestamp"],
        "window": host["window"],
        "usage": host["usage"],
    })
}

/// A GET's one item (404 without it) or a list of them.
fn one_or_list(items: Vec<Value>, name: Option<String>, kind: &str, resource: &str) -> Result<Value, ProxyError> {
    let with_kind = |mut v: Value| {
        v["kind"] = json!(kind);
        v["apiVersion"] = json!(GROUP_VERSION);
        v
    };
    match name {
        Some(name) => items
            .into_iter()
            .next()
            .map(with_kind)
            .ok_or_else(|| ProxyError::NotFound(format!("{resource}.metrics.k8s.io \"{name}\" not found"))),
        None => Ok(json!({
            "kind": format!("{kind}List"),
            "apiVersion": GROUP_VERSION,
            "metadata": {},
            "items": items,
        })),
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn status_of(e: &ProxyError) -> StatusCode {
        e.status()
    }

    fn tr() -> Translator {
        Translator::new("team", "vkube-team")
    }

    #[test]
    fn the_aggregators_requests_are_parsed() {
        let get = |p: &str| Asked::parse(&Method::GET, p);
        assert_eq!(get("/apis/metrics.k8s.io/v1beta1").unwrap(), Asked::Discovery);
        assert_eq!(get("/apis/metrics.k8s.io/v1beta1/").unwrap(), Asked::Discovery);
        assert_eq!(get("/apis/metrics.k8s.io/v1beta1/pods").unwrap(), Asked::Pods { namespace: None, name: None });
        assert_eq!(
            get("/apis/metrics.k8s.io/v1beta1/namespaces/web/pods/a").unwrap(),
            Asked::Pods { namespace: Some("web".into()), name: Some("a".into()) }
        );
        assert_eq!(get("/apis/metrics.k8s.io/v1beta1/nodes/n1").unwrap(), Asked::Nodes { name: Some("n1".into()) });
        for path in [
            "/apis",
            "/openapi/v2",
            "/apis/metrics.k8s.io",
            "/apis/metrics.k8s.io/v1beta1x",
            "/apis/metrics.k8s.io/v1beta1/namespaces//pods",
            "/apis/metrics.k8s.io/v1beta1/namespaces/web/pods/a/log",
            "/apis/metrics.k8s.io/v1beta1/secrets",
        ] {
            assert_eq!(get(path).map(|_| ()).map_err(|e| status_of(&e)), Err(StatusCode::NOT_FOUND), "{path}");
        }
        let write = Asked::parse(&Method::DELETE, "/apis/metrics.k8s.io/v1beta1/pods");
        assert_eq!(write.map_err(|e| status_of(&e)), Err(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn selectors_go_to_the_virtual_list() {
        let s = Selectors::parse(Some("labelSelector=app%3Dweb&fieldSelector=&limit=5")).unwrap();
        assert_eq!(s, Selectors { labels: Some("app=web".into()), fields: None });
        let s = Selectors::parse(Some("fieldSelector=metadata.name%3Da,metadata.namespace!%3Db")).unwrap();
        assert_eq!(s.fields.as_deref(), Some("metadata.name=a,metadata.namespace!=b"));
        for query in
            ["fieldSelector=status.podIP%3D10.0.0.1", "fieldSelector=metadata.name%3Da,spec.nodeName%3Dn", "watch=true"]
        {
            let e = Selectors::parse(Some(query)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{query}");
        }
    }

    fn pod(ns: &str, name: &str, containers: &[&str]) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"app": "web"}},
            "spec": {"containers": containers.iter().map(|c| json!({"name": c})).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    fn host_item(name: &str, containers: &[&str]) -> (String, Value) {
        let containers: Vec<Value> =
            containers.iter().map(|c| json!({"name": c, "usage": {"cpu": "5m", "memory": "1Mi"}})).collect();
        (
            name.to_string(),
            json!({"metadata": {"name": name, "namespace": "vkube-team", "creationTimestamp": "2026-12-07T15:00:00Z"},
                "timestamp": "2026-12-07T14:59:50Z", "window": "15s", "containers": containers}),
        )
    }

    #[test]
    fn pods_are_joined_with_their_host_copies_metrics_under_their_virtual_names() {
        let tr = tr();
        let host: BTreeMap<String, Value> = [
            host_item(&tr.host_name("web", "a"), &["app", "injected"]),
            // Not a copy of a pod asked for: never shown.
            host_item(&tr.host_name("other", "b"), &["app"]),
        ]
        .into();
        let pods = [pod("web", "a", &["app"]), pod("web", "not-scraped-yet", &["app"])];
        let items = pod_metrics(&tr, &pods, &host);
        assert_eq!(items.len(), 1);
        let a = &items[0];
        assert_eq!(a["metadata"]["name"], "a");
        assert_eq!(a["metadata"]["namespace"], "web");
        assert_eq!(a["metadata"]["labels"]["app"], "web");
        assert_eq!(a["window"], "15s");
        assert_eq!(a["containers"], json!([{"name": "app", "usage": {"cpu": "5m", "memory": "1Mi"}}]), "only its own");
    }

    #[test]
    fn a_get_of_a_pod_without_metrics_is_404_and_lists_have_their_kind() {
        let e = one_or_list(vec![], Some("a".into()), "PodMetrics", "pods").unwrap_err();
        assert_eq!((e.status(), e.to_string()), (StatusCode::NOT_FOUND, "pods.metrics.k8s.io \"a\" not found".into()));
        let one =
            one_or_list(vec![json!({"metadata": {"name": "a"}})], Some("a".into()), "PodMetrics", "pods").unwrap();
        assert_eq!((one["kind"].as_str(), one["apiVersion"].as_str()), (Some("PodMetrics"), Some(GROUP_VERSION)));
        let list = one_or_list(vec![], None, "NodeMetrics", "nodes").unwrap();
        assert_eq!(list["kind"], "NodeMetricsList");
        assert_eq!(list["items"], json!([]));
    }

    #[test]
    fn discovery_lists_pods_and_nodes() {
        let d = discovery();
        assert_eq!(d["groupVersion"], GROUP_VERSION);
        let names: Vec<&str> = d["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["nodes", "pods"]);
    }
}
