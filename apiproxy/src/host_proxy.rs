//! `pods/{name}/proxy` and `services/{name}/proxy`: authorized against the virtual cluster, then
//! sent to the host API server for the host copy, with the control plane's host credentials. The
//! host API server dials the host pod's address, or the endpoints the host made for the host
//! Service from its selector: never an address the tenant wrote (a virtual pod's status, a
//! selector-less Service's EndpointSlices), which is why the virtual API server does not serve
//! these.

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::{Pod, Service};

use crate::auth::Identity;
use crate::error::ProxyError;
use crate::route::{ProxyName, ProxyTarget, proxy_verb};
use crate::{Proxy, ProxyBody, headers, upgrade};

/// An HTML page uncompressed, whose links the host API server rewrote: `text/html`, no content
/// encoding.
fn is_plain_html(h: &http::HeaderMap) -> bool {
    let html = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/html"));
    let encoded = h.get(header::CONTENT_ENCODING).is_some_and(|e| e.as_bytes() != b"identity");
    html && !encoded
}

/// The largest HTML page whose links are given back the virtual path.
const MAX_HTML: usize = 16 << 20;

/// The largest request body sent through a proxy subresource (read whole: the host client takes
/// a body in one piece).
const MAX_BODY: usize = 4 << 20;

impl Proxy {
    pub(crate) async fn host_proxy(
        &self,
        mut req: Request<Incoming>,
        id: &Identity,
        namespace: &str,
        target: ProxyTarget,
        name: &ProxyName,
        rest: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (resource, object) = (target.resource(), name.name.as_str());
        let verb = proxy_verb(req.method());
        self.authorize_subresource(id, req.headers(), namespace, resource, "proxy", object, verb).await?;
        let host_name = match target {
            ProxyTarget::Pod => self.proxied_pod(namespace, object).await?,
            ProxyTarget::Service => self.proxied_service(namespace, object).await?,
        };

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| upgrade::client(&mut req));
        let (parts, body) = req.into_parts();
        let body = crate::read_limited(
            body,
            MAX_BODY,
            "a request through a proxy subresource",
            "use kubectl port-forward for more",
        )
        .await?;
        let host_ns = self.translator.host_namespace();
        let host_prefix = format!("/api/v1/namespaces/{host_ns}/{resource}/{}/proxy", name.with_name(&host_name));
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let mut host_req = Request::builder().method(parts.method).uri(format!("{host_prefix}{rest}{query}"));
        if let Some(h) = host_req.headers_mut() {
            *h = headers::for_host_proxy(&parts.headers, upgrade);
        }
        let host_req =
            host_req.body(kube::client::Body::from(body)).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let mut resp = self
            .host
            .send(host_req)
            .await
            .map_err(|e| ProxyError::upstream("the host API server is unreachable", e))?;
        // A redirect the host API server rewrote to its own path is given back the virtual one.
        let virtual_prefix = format!("/api/v1/namespaces/{namespace}/{resource}/{}/proxy", name.with_name(object));
        if let Some(location) = resp.headers().get(header::LOCATION).and_then(|l| l.to_str().ok())
            && let Some(after) = location.strip_prefix(&host_prefix)
            && let Ok(v) = HeaderValue::from_str(&format!("{virtual_prefix}{after}"))
        {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        if !is_plain_html(resp.headers()) {
            return upgrade::relay(resp, client_upgrade, "the host API server", None);
        }
        // So are the links the host API server rewrote in an HTML page (it prefixes them with its
        // own path, as a browser going through the proxy needs).
        let (mut parts, body) = resp.into_parts();
        let page = http_body_util::Limited::new(body, MAX_HTML)
            .collect()
            .await
            .map_err(|e| ProxyError::upstream("reading an HTML page from the host API server", e))?
            .to_bytes();
        let page = String::from_utf8_lossy(&page).replace(&host_prefix, &virtual_prefix);
        crate::headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, crate::full(page.into())))
    }

    /// The host name of the host copy of pod `namespace/name`, if the host may dial it: not a
    /// pod on the host's network (its address is the node's, and every port of the node would be
    /// reachable).
    async fn proxied_pod(&self, namespace: &str, name: &str) -> Result<String, ProxyError> {
        let virtual_pod: Pod = self.virtual_object("pods", namespace, name).await?;
        let host: Pod = self.host_copy("Pod", &virtual_pod.metadata).await?;
        if host.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Err(ProxyError::Forbidden(format!(
                "pods \"{name}\" is forbidden: pods/proxy does not reach a pod on the host's network; use kubectl port-forward"
            )));
        }
        Ok(host.metadata.name.unwrap_or_default())
    }

    /// The host name of the host copy of Service `namespace/name`, if the host may dial its
    /// endpoints: only a Service with a selector, whose endpoints the host finds among this
    /// cluster's pods (a selector-less Service's are the tenant's own addresses).
    async fn proxied_service(&self, namespace: &str, name: &str) -> Result<String, ProxyError> {
        let virtual_svc: Service = self.virtual_object("services", namespace, name).await?;
        let has_selector = virtual_svc.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty());
        if !has_selector {
            return Err(ProxyError::Forbidden(format!(
                "services \"{name}\" is forbidden: services/proxy reaches only Services with a selector (this one's endpoints are addresses written in the virtual cluster); use kubectl port-forward to one of its pods"
            )));
        }
        let host: Service = self.host_copy("Service", &virtual_svc.metadata).await?;
        Ok(host.metadata.name.unwrap_or_default())
    }
}
