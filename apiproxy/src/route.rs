//! Which requests the proxy handles itself. Pure: a path and method in, a route out.

use http::Method;

/// Pod subresources served by the host's kubelets, so they go to the host API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostSubresource {
    Log,
    Exec,
    Attach,
    PortForward,
}

impl HostSubresource {
    pub fn as_str(self) -> &'static str {
        match self {
            HostSubresource::Log => "log",
            HostSubresource::Exec => "exec",
            HostSubresource::Attach => "attach",
            HostSubresource::PortForward => "portforward",
        }
    }

    /// The verb RBAC checks: logs are read; the streaming ones create a session.
    pub fn verb(self) -> &'static str {
        match self {
            HostSubresource::Log => "get",
            _ => "create",
        }
    }
}

/// What a `proxy` subresource reaches: a pod, or a Service's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyTarget {
    Pod,
    Service,
}

impl ProxyTarget {
    pub fn resource(self) -> &'static str {
        match self {
            ProxyTarget::Pod => "pods",
            ProxyTarget::Service => "services",
        }
    }
}

/// The name segment of a `proxy` subresource: `[scheme:]name[:port]`, as the API server reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyName {
    /// `http` or `https`, if given.
    pub scheme: Option<String>,
    pub name: String,
    /// A port number or name, if given.
    pub port: Option<String>,
}

impl ProxyName {
    /// Parses the segment; `Err` says what is wrong.
    pub fn parse(segment: &str) -> Result<Self, String> {
        let parts: Vec<&str> = segment.split(':').collect();
        let (scheme, name, port) = match parts.as_slice() {
            [name] => (None, *name, None),
            [name, port] => (None, *name, Some(*port)),
            [scheme, name, port] => (Some(*scheme), *name, Some(*port)),
            _ => return Err(format!("{segment:?} is not [scheme:]name[:port]")),
        };
        if let Some(s) = scheme.filter(|s| !s.is_empty() && !matches!(*s, "http" | "https")) {
            return Err(format!("the scheme {s:?} is not http or https"));
        }
        if name.is_empty() {
            return Err(format!("{segment:?} names no object"));
        }
        let filled = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
        Ok(ProxyName { scheme: filled(scheme), name: name.to_string(), port: filled(port) })
    }

    /// The segment again, for the object named `name` (the host copy's). With a scheme, the port
    /// is always written, empty if none (`http:name` would read as name `http`, port `name`).
    pub fn with_name(&self, name: &str) -> String {
        let port = self.port.as_deref().unwrap_or_default();
        match (&self.scheme, &self.port) {
            (Some(scheme), _) => format!("{scheme}:{name}:{port}"),
            (None, Some(_)) => format!("{name}:{port}"),
            (None, None) => name.to_string(),
        }
    }
}

/// The RBAC verb of a `proxy` request, as the API server derives it from the method.
pub fn proxy_verb(method: &Method) -> &'static str {
    match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    }
}

/// vkube's own endpoints under `/vkube/v1/` (a prefix the API server does not serve), for the
/// cluster's admins: what `vkube snapshot`, `vkube restore` and `vkube reset` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `GET /vkube/v1/snapshot[?pki=true | ?from=KEPT]`: a snapshot file, new or kept.
    Snapshot,
    /// `POST /vkube/v1/restore[?fork=true]`, a snapshot file as the body, or
    /// `?from=KEPT` for one the control plane keeps.
    Restore,
    /// `POST /vkube/v1/reset`: back to a freshly created cluster.
    Reset,
    /// `GET /vkube/v1/snapshots`: the snapshots the control plane keeps (scheduled and taken).
    List,
    /// `POST /vkube/v1/keep[?label=LABEL]`: a snapshot taken now and kept by the control plane
    /// (`vkube snapshot --keep`, and before `vkube upgrade`), not downloaded.
    Keep,
}

impl Operation {
    pub const ALL: [Operation; 5] =
        [Operation::Snapshot, Operation::Restore, Operation::Reset, Operation::List, Operation::Keep];

    pub fn path(self) -> &'static str {
        match self {
            Operation::Snapshot => "/vkube/v1/snapshot",
            Operation::Restore => "/vkube/v1/restore",
            Operation::Reset => "/vkube/v1/reset",
            Operation::List => "/vkube/v1/snapshots",
            Operation::Keep => "/vkube/v1/keep",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Operation::Snapshot | Operation::List => Method::GET,
            Operation::Restore | Operation::Reset | Operation::Keep => Method::POST,
        }
    }

    /// What RBAC checks for a request with this query: (non-resource path, verb). A snapshot
    /// with the cluster's keys (`pki=true`, its CA and service-account keys: whoever has them is
    /// the cluster's admin) needs `create` on `/vkube/v1/snapshot/pki`, more than a `get` on
    /// every path.
    pub fn authorization(self, query: Option<&str>) -> (&'static str, &'static str) {
        let pki = form_urlencoded::parse(query.unwrap_or_default().as_bytes()).any(|(k, _)| k == "pki");
        match self {
            Operation::Snapshot if pki => ("/vkube/v1/snapshot/pki", "create"),
            _ => (self.path(), self.verb()),
        }
    }

    /// The verb RBAC checks on the path (a non-resource URL): what `cluster-admin` may do,
    /// granted to others only by a ClusterRole naming the path.
    pub fn verb(self) -> &'static str {
        match self {
            Operation::Snapshot | Operation::List => "get",
            Operation::Restore | Operation::Reset | Operation::Keep => "create",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Served by the proxy itself, unauthenticated.
    Health(Health),
    /// `/api/v1/namespaces/{ns}/pods/{name}/log`: read from the host copy.
    PodLog { namespace: String, name: String },
    /// `/api/v1/namespaces/{ns}/pods/{name}/{exec|attach|portforward}`: to the virtual API server
    /// (its authorization and admission), which reaches the host copy through vkube's kubelet
    /// (`kubelet`); the stream's data counts as activity (sleep mode).
    PodSession,
    /// `/api/v1/namespaces/{ns}/{pods|services}/{[scheme:]name[:port]}/proxy{rest}`: through the
    /// host API server to the host copy, which the host dials, never an address the tenant chose.
    HostProxy { namespace: String, target: ProxyTarget, name: ProxyName, rest: String },
    /// `POST /api/v1/namespaces/{ns}/services`: the host Service is created first so both share
    /// one ClusterIP.
    CreateService { namespace: String },
    /// `PATCH /api/v1/namespaces/{ns}/services/{name}`: a server-side apply can create the
    /// Service, so its ClusterIPs are checked like a create's.
    PatchService,
    /// Refused (403) with this message: the API server would dial an address the tenant chose.
    Refused(String),
    /// vkube's own operation, served by the control plane.
    Operation(Operation),
    /// Everything else: the virtual API server.
    Forward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthz,
    Livez,
    Readyz,
    Metrics,
}

/// A request path in the one spelling the proxy routes on and forwards, so that what the proxy
/// matches is what the API server (which percent-decodes) will serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalPath {
    /// What is forwarded: unreserved characters decoded, other escapes kept (upper-case hex).
    pub path: String,
    /// The segments fully decoded, as the API server reads them (no trailing empty segment).
    pub segments: Vec<String>,
}

/// Canonicalises a request path, or says why it is refused (answer 400): an encoded `/`, an
/// empty segment (`//`), a `.`/`..` segment (encoded or not), a malformed escape or non-UTF-8.
/// These have no legitimate use against the Kubernetes API, and each could make the proxy's
/// routing and the API server's disagree.
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, String> {
    let rest = raw.strip_prefix('/').ok_or_else(|| format!("the request path {raw:?} must start with /"))?;
    let parts: Vec<&str> = if rest.is_empty() { vec![] } else { rest.split('/').collect() };
    let mut path = String::with_capacity(raw.len());
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        path.push('/');
        if part.is_empty() {
            if i + 1 == parts.len() {
                break; // a trailing slash: forwarded as sent, not a segment
            }
            return Err(format!("the request path {raw:?} has an empty segment (//); remove it"));
        }
        let (kept, decoded) = decode_segment(part).map_err(|why| format!("the request path {raw:?} {why}"))?;
        if decoded == "." || decoded == ".." {
            return Err(format!("the request path {raw:?} has a dot segment ({decoded}); send the resolved path"));
        }
        path.push_str(&kept);
        segments.push(decoded);
    }
    if path.is_empty() {
        path.push('/');
    }
    Ok(CanonicalPath { path, segments })
}

/// One segment: (the forwarded spelling, the fully decoded text).
fn decode_segment(seg: &str) -> Result<(String, String), String> {
    let bytes = seg.as_bytes();
    let (mut kept, mut decoded) = (String::with_capacity(seg.len()), Vec::with_capacity(seg.len()));
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            kept.push(b as char);
            decoded.push(b);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let v = hex
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| "has a malformed percent escape".to_string())?;
        match v {
            b'/' => return Err("has an encoded / (%2F) in a segment".into()),
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => kept.push(b as char),
            b => kept.push_str(&format!("%{b:02X}")),
        }
        decoded.push(v);
        i += 3;
    }
    let decoded = String::from_utf8(decoded).map_err(|_| "is not UTF-8 once decoded".to_string())?;
    Ok((kept, decoded))
}

pub fn route(method: &Method, path: &CanonicalPath) -> Route {
    match path.path.as_str() {
        "/healthz" => return Route::Health(Health::Healthz),
        "/livez" => return Route::Health(Health::Livez),
        "/readyz" => return Route::Health(Health::Readyz),
        "/metrics" => return Route::Health(Health::Metrics),
        p if p.starts_with("/vkube/") => {
            return match Operation::ALL.into_iter().find(|o| o.path() == p) {
                Some(op) if op.method() == method => Route::Operation(op),
                Some(op) => Route::Refused(format!("{p} answers {} only", op.method())),
                None => Route::Refused(format!("{p} is not one of vkube's endpoints")),
            };
        }
        _ => {}
    }
    let segments: Vec<&str> = path.segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        // The virtual API server would dial the pod, service endpoint or node address, all of
        // which the tenant controls (its nodes' addresses, its EndpointSlices): pods and Services
        // are proxied by the host API server to their host copies instead, nodes not at all.
        ["api", "v1", "namespaces", ns, kind @ ("pods" | "services"), name, "proxy", ..] => {
            let target = if *kind == "pods" { ProxyTarget::Pod } else { ProxyTarget::Service };
            match ProxyName::parse(name) {
                Ok(name) => {
                    // What follows `/proxy` as sent (a trailing slash included): the path on the target.
                    let rest = path.path.splitn(9, '/').nth(8).map(|r| format!("/{r}")).unwrap_or_default();
                    Route::HostProxy { namespace: ns.to_string(), target, name, rest }
                }
                Err(why) => Route::Refused(format!("{kind}/proxy: {why}")),
            }
        }
        ["api", "v1", kind @ "nodes", name, "proxy", ..] => Route::Refused(format!(
            "{kind} \"{name}\" is forbidden: the {kind}/proxy subresource is not served by this virtual cluster \
             (it would reach the node address the virtual cluster chooses); use kubectl port-forward or exec instead"
        )),
        ["api", "v1", "proxy", ..] => {
            Route::Refused("the legacy /api/v1/proxy paths are not served by this virtual cluster".into())
        }
        ["api", "v1", "namespaces", ns, "pods", name, "log"] => {
            Route::PodLog { namespace: ns.to_string(), name: name.to_string() }
        }
        ["api", "v1", "namespaces", _, "pods", _, "exec" | "attach" | "portforward"] => Route::PodSession,
        ["api", "v1", "namespaces", ns, "services"] if method == Method::POST => {
            Route::CreateService { namespace: ns.to_string() }
        }
        ["api", "v1", "namespaces", _, "services", _] if method == Method::PATCH => Route::PatchService,
        _ => Route::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: &Method, path: &str) -> Route {
        route(method, &canonicalize(path).unwrap())
    }

    #[test]
    fn pod_logs_go_to_the_host_and_sessions_to_the_virtual_api_server() {
        assert_eq!(
            r(&Method::GET, "/api/v1/namespaces/default/pods/web-1/log"),
            Route::PodLog { namespace: "default".into(), name: "web-1".into() }
        );
        for sub in ["exec", "attach", "portforward"] {
            for method in [Method::GET, Method::POST] {
                assert_eq!(r(&method, &format!("/api/v1/namespaces/a/pods/p/{sub}")), Route::PodSession);
            }
        }
    }

    #[test]
    fn other_pod_paths_are_forwarded() {
        for p in [
            "/api/v1/namespaces/a/pods/p",
            "/api/v1/namespaces/a/pods/p/status",
            "/api/v1/namespaces/a/pods/p/binding",
            "/api/v1/namespaces/a/pods",
            "/api/v1/pods",
            "/apis/apps/v1/namespaces/a/deployments/d/scale",
        ] {
            assert_eq!(r(&Method::GET, p), Route::Forward, "{p}");
        }
    }

    #[test]
    fn only_service_creation_is_intercepted() {
        assert_eq!(
            r(&Method::POST, "/api/v1/namespaces/default/services"),
            Route::CreateService { namespace: "default".into() }
        );
        assert_eq!(r(&Method::GET, "/api/v1/namespaces/default/services"), Route::Forward);
        assert_eq!(r(&Method::PUT, "/api/v1/namespaces/default/services/x"), Route::Forward);
        assert_eq!(r(&Method::PATCH, "/api/v1/namespaces/default/services/x"), Route::PatchService);
        assert_eq!(r(&Method::PATCH, "/api/v1/namespaces/default/services/x/status"), Route::Forward);
    }

    #[test]
    fn vkube_operations() {
        assert_eq!(r(&Method::GET, "/vkube/v1/snapshot"), Route::Operation(Operation::Snapshot));
        assert_eq!(r(&Method::POST, "/vkube/v1/restore"), Route::Operation(Operation::Restore));
        assert_eq!(r(&Method::POST, "/vkube/v1/%72eset"), Route::Operation(Operation::Reset));
        assert_eq!(r(&Method::POST, "/vkube/v1/keep"), Route::Operation(Operation::Keep));
        assert!(matches!(r(&Method::GET, "/vkube/v1/keep"), Route::Refused(_)));
        assert!(matches!(r(&Method::POST, "/vkube/v1/snapshot"), Route::Refused(_)));
        assert!(matches!(r(&Method::GET, "/vkube/v1/other"), Route::Refused(_)));
        assert_eq!(r(&Method::GET, "/apis/vkube/v1/snapshot"), Route::Forward);
    }

    #[test]
    fn health_paths() {
        assert_eq!(r(&Method::GET, "/readyz"), Route::Health(Health::Readyz));
        assert_eq!(r(&Method::GET, "/metrics"), Route::Health(Health::Metrics));
        assert_eq!(r(&Method::GET, "/readyz/etcd"), Route::Forward);
    }

    #[test]
    fn encoded_spellings_route_like_the_api_server_reads_them() {
        for (raw, canonical) in [
            ("/api/v1/namespaces/default/pods/web/%65xec", "/api/v1/namespaces/default/pods/web/exec"),
            ("/api/v1/namespaces/default/pods/web/%6c%6F%67", "/api/v1/namespaces/default/pods/web/log"),
            ("/%61pi/v1/namespaces/a/pods/p/portforward", "/api/v1/namespaces/a/pods/p/portforward"),
            (
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3aadmin",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/system%3Aadmin",
            ),
            ("/api/v1/namespaces/", "/api/v1/namespaces/"),
            ("/", "/"),
        ] {
            assert_eq!(canonicalize(raw).unwrap().path, canonical, "{raw}");
        }
        assert_eq!(r(&Method::POST, "/api/v1/namespaces/default/pods/web/%65xec"), Route::PodSession);
        assert!(matches!(r(&Method::GET, "/api/v1/namespaces/a/pods/p/%6cog/"), Route::PodLog { .. }));
        assert_eq!(canonicalize("/apis/x/v1/clusterroles/system%3aadmin").unwrap().segments[4], "system:admin");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for raw in [
            "/api/v1/namespaces/default/pods/web%2Fexec",
            "/api/v1/namespaces/default/pods/web%2fexec",
            "/api/v1//namespaces/default/pods",
            "/api/v1/namespaces/default/pods/web/../../kube-system/pods",
            "/api/v1/namespaces/default/pods/./web/exec",
            "/api/v1/namespaces/default/pods/%2e%2e/exec",
            "/api/v1/namespaces/default/pods/%2E/exec",
            "/api/v1/namespaces/%zz/pods",
            "/api/v1/namespaces/%6/pods",
            "/api/v1/namespaces/%ff/pods",
            "api/v1/pods",
        ] {
            assert!(canonicalize(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn pod_and_service_proxies_go_to_the_host_with_their_path() {
        let host = |p: &str| match r(&Method::GET, p) {
            Route::HostProxy { namespace, target, name, rest } => (namespace, target, name.with_name("x"), rest),
            other => panic!("{p}: {other:?}"),
        };
        let s = String::from;
        assert_eq!(host("/api/v1/namespaces/default/pods/web/proxy"), (s("default"), ProxyTarget::Pod, s("x"), s("")));
        assert_eq!(
            host("/api/v1/namespaces/a/pods/web:8080/proxy/metrics"),
            (s("a"), ProxyTarget::Pod, s("x:8080"), s("/metrics"))
        );
        assert_eq!(
            host("/api/v1/namespaces/default/services/https:api:443/proxy/"),
            (s("default"), ProxyTarget::Service, s("https:x:443"), s("/"))
        );
        assert_eq!(
            host("/api/v1/namespaces/default/services/%61pi/pr%6fxy/a%20b/c"),
            (s("default"), ProxyTarget::Service, s("x"), s("/a%20b/c")),
            "encoded spellings are the same route, the rest as forwarded"
        );
        assert_eq!(host("/api/v1/namespaces/d/services/http:web:/proxy").2, "http:x:", "an empty port stays empty");
        for bad in ["/api/v1/namespaces/d/pods/file:web:80/proxy", "/api/v1/namespaces/d/pods/a:b:c:d/proxy"] {
            assert!(matches!(r(&Method::GET, bad), Route::Refused(_)), "{bad}");
        }
        assert_eq!(proxy_verb(&Method::POST), "create");
        assert_eq!(proxy_verb(&Method::HEAD), "get");
    }

    #[test]
    fn node_and_legacy_proxies_are_refused() {
        for p in
            ["/api/v1/nodes/n1/proxy/configz", "/api/v1/nodes/n1/proxy", "/api/v1/proxy/namespaces/default/pods/web"]
        {
            assert!(matches!(r(&Method::GET, p), Route::Refused(_)), "{p}");
        }
        assert_eq!(
            r(&Method::GET, "/api/v1/namespaces/default/services/proxy"),
            Route::Forward,
            "a Service named proxy"
        );
        assert_eq!(r(&Method::GET, "/api/v1/nodes/proxy"), Route::Forward, "a node named proxy");
    }
}
