//! Pod logs, exec, attach and port-forward: authorized against the virtual cluster, then sent
//! to the host API server for the host pod that mirrors the virtual one, with the control plane's
//! own host credentials (never the client's).

use http::{Request, Response};
use hyper::body::Incoming;
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::auth::Identity;
use crate::error::ProxyError;
use crate::route::HostSubresource;
use crate::{Proxy, ProxyBody, headers, upgrade};

impl Proxy {
    pub(crate) async fn host_pod(
        &self,
        mut req: Request<Incoming>,
        id: &Identity,
        namespace: &str,
        name: &str,
        sub: HostSubresource,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let acting = self.auth.effective(id, req.headers()).await?;
        let attrs = ResourceAttributes {
            namespace: Some(namespace.into()),
            verb: Some(sub.verb().into()),
            group: Some(String::new()),
            resource: Some("pods".into()),
            subresource: Some(sub.as_str().into()),
            name: Some(name.into()),
            ..Default::default()
        };
        if !self.auth.allowed(&acting, attrs).await? {
            return Err(ProxyError::Forbidden(format!(
                "pods \"{name}\" is forbidden: User \"{}\" cannot {} resource \"pods/{}\" in API group \"\" in the namespace \"{namespace}\"",
                acting.user,
                sub.verb(),
                sub.as_str()
            )));
        }

        let virtual_pod = Api::<Pod>::namespaced(self.admin.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| ProxyError::upstream(format!("looking up pod {namespace}/{name}"), e))?
            .ok_or_else(|| ProxyError::NotFound(format!("pods \"{name}\" not found")))?;
        // The host pod must be ours and mirror exactly this virtual pod: a colliding host pod that
        // someone else owns must never be reached.
        let host_name = self.translator.host_name(namespace, name);
        let host_ns = self.translator.host_namespace();
        let host_pod = Api::<Pod>::namespaced(self.host.clone(), host_ns)
            .get_opt(&host_name)
            .await
            .map_err(|e| ProxyError::upstream("looking up the host pod", e))?;
        let mirrors = host_pod
            .as_ref()
            .and_then(|p| self.translator.owner(&p.metadata))
            .is_some_and(|o| o.is("Pod", namespace, name) && Some(&o.uid) == virtual_pod.metadata.uid.as_ref());
        if !mirrors {
            return Err(ProxyError::Unavailable(format!(
                "pod \"{name}\" is not running on the host yet; try again in a moment"
            )));
        }

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, _body) = req.into_parts();
        headers::sanitize_request(&mut parts.headers, upgrade, false);
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let path = format!("/api/v1/namespaces/{host_ns}/pods/{host_name}/{}{query}", sub.as_str());
        let mut host_req = Request::builder().method(parts.method).uri(path);
        if let Some(h) = host_req.headers_mut() {
            *h = parts.headers;
        }
        let host_req = host_req.body(kube::client::Body::empty()).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let resp = self
            .host
            .send(host_req)
            .await
            .map_err(|e| ProxyError::upstream("the host API server is unreachable", e))?;
        upgrade::relay(resp, client_upgrade, "the host API server")
    }
}
