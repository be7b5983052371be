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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Served by the proxy itself, unauthenticated.
    Health(Health),
    /// `/api/v1/namespaces/{ns}/pods/{name}/{log|exec|attach|portforward}`.
    HostPod { namespace: String, name: String, subresource: HostSubresource },
    /// `POST /api/v1/namespaces/{ns}/services`: the host Service is created first so both share
    /// one ClusterIP.
    CreateService { namespace: String },
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

pub fn route(method: &Method, path: &str) -> Route {
    match path {
        "/healthz" => return Route::Health(Health::Healthz),
        "/livez" => return Route::Health(Health::Livez),
        "/readyz" => return Route::Health(Health::Readyz),
        "/metrics" => return Route::Health(Health::Metrics),
        _ => {}
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, sub] => {
            let subresource = match *sub {
                "log" => HostSubresource::Log,
                "exec" => HostSubresource::Exec,
                "attach" => HostSubresource::Attach,
                "portforward" => HostSubresource::PortForward,
                _ => return Route::Forward,
            };
            Route::HostPod { namespace: ns.to_string(), name: name.to_string(), subresource }
        }
        ["api", "v1", "namespaces", ns, "services"] if method == Method::POST => {
            Route::CreateService { namespace: ns.to_string() }
        }
        _ => Route::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_subresources_go_to_the_host() {
        assert_eq!(
            route(&Method::GET, "/api/v1/namespaces/default/pods/web-1/log"),
            Route::HostPod { namespace: "default".into(), name: "web-1".into(), subresource: HostSubresource::Log }
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/namespaces/a/pods/p/exec"),
            Route::HostPod { namespace: "a".into(), name: "p".into(), subresource: HostSubresource::Exec }
        );
        for sub in ["attach", "portforward"] {
            assert!(matches!(
                route(&Method::GET, &format!("/api/v1/namespaces/a/pods/p/{sub}")),
                Route::HostPod { .. }
            ));
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
            assert_eq!(route(&Method::GET, p), Route::Forward, "{p}");
        }
    }

    #[test]
    fn only_service_creation_is_intercepted() {
        assert_eq!(
            route(&Method::POST, "/api/v1/namespaces/default/services"),
            Route::CreateService { namespace: "default".into() }
        );
        assert_eq!(route(&Method::GET, "/api/v1/namespaces/default/services"), Route::Forward);
        assert_eq!(route(&Method::PUT, "/api/v1/namespaces/default/services/x"), Route::Forward);
    }

    #[test]
    fn health_paths() {
        assert_eq!(route(&Method::GET, "/readyz"), Route::Health(Health::Readyz));
        assert_eq!(route(&Method::GET, "/metrics"), Route::Health(Health::Metrics));
        assert_eq!(route(&Method::GET, "/readyz/etcd"), Route::Forward);
    }
}
