//! Pod logs, exec, attach and port-forward: sent to the host API server for the host pod that
//! mirrors the virtual one, with the control plane's own host credentials (never the client's).
//! Logs are authorized here against the virtual cluster; exec, attach and port-forward reach here
//! from the virtual API server (`kubelet`), after its own authorization and admission.

use http::{Request, Response};
use hyper::body::Incoming;
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;

use std::sync::Arc;

use crate::auth::Identity;
use crate::error::ProxyError;
use crate::route::HostSubresource;
use crate::sleep::Activity;
use crate::{Proxy, ProxyBody, headers, upgrade};

/// The query parameters each subresource takes (`PodExecOptions`, `PodAttachOptions`,
/// `PodLogOptions`, `PodPortForwardOptions`), and of those the ones that may repeat. Anything
/// else is dropped: e.g. `insecureSkipTLSVerifyBackend`, which would have the host API server
/// skip verifying the kubelet.
fn params(sub: HostSubresource) -> (&'static [&'static str], &'static [&'static str]) {
    match sub {
        HostSubresource::Exec => (&["command", "container", "stdin", "stdout", "stderr", "tty"], &["command"]),
        HostSubresource::Attach => (&["container", "stdin", "stdout", "stderr", "tty"], &[]),
        HostSubresource::Log => (
            &["container", "follow", "previous", "sinceSeconds", "sinceTime", "timestamps", "tailLines", "limitBytes"],
            &[],
        ),
        HostSubresource::PortForward => (&["ports"], &["ports"]),
    }
}

/// The query sent to the host for `sub`: only its own parameters, each once unless it may
/// repeat (two values are two readings a parser could pick from), and a `container` only if the
/// virtual pod has it. `Err` says what is wrong.
pub(crate) fn host_query(sub: HostSubresource, query: Option<&str>, containers: &[&str]) -> Result<String, String> {
    let (allowed, repeatable) = params(sub);
    let mut out = form_urlencoded::Serializer::new(String::new());
    let mut seen: Vec<String> = vec![];
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !allowed.contains(&key.as_ref()) {
            tracing::debug!(parameter = %key, subresource = sub.as_str(), "query parameter dropped");
            continue;
        }
        if seen.iter().any(|k| *k == key) && !repeatable.contains(&key.as_ref()) {
            return Err(format!("the query parameter {key} is given more than once"));
        }
        if key == "container" && !containers.contains(&value.as_ref()) {
            return Err(format!("container {value:?} is not in the pod's spec; choose one of {containers:?}"));
        }
        seen.push(key.to_string());
        out.append_pair(&key, &value);
    }
    Ok(out.finish())
}

/// Every container the pod's spec names: containers, init and ephemeral containers.
fn container_names(pod: &Pod) -> Vec<&str> {
    let Some(spec) = pod.spec.as_ref() else { return vec![] };
    let init = spec.init_containers.iter().flatten().map(|c| c.name.as_str());
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|c| c.name.as_str());
    spec.containers.iter().map(|c| c.name.as_str()).chain(init).chain(ephemeral).collect()
}

impl Proxy {
    /// Asks the virtual cluster whether the acting identity of `id` may `verb` the `subresource`
    /// of `resource` `name` in `namespace`; `Forbidden` in the API server's words if not.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn authorize_subresource(
        &self,
        id: &Identity,
        headers: &http::HeaderMap,
        namespace: &str,
        resource: &str,
        subresource: &str,
        name: &str,
        verb: &str,
    ) -> Result<(), ProxyError> {
        let acting = self.auth.effective(id, headers).await?;
        let attrs = ResourceAttributes {
            namespace: Some(namespace.into()),
            verb: Some(verb.into()),
            group: Some(String::new()),
            resource: Some(resource.into()),
            subresource: Some(subresource.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        if !self.auth.allowed(&acting, attrs).await? {
            return Err(ProxyError::Forbidden(format!(
                "{resource} \"{name}\" is forbidden: User \"{}\" cannot {verb} resource \"{resource}/{subresource}\" in API group \"\" in the namespace \"{namespace}\"",
                acting.user,
            )));
        }
        Ok(())
    }

    /// The virtual object `name` of `resource` (`pods`, `services`) in `namespace`, read as the
    /// control plane; `NotFound` in the API server's words if there is none.
    pub(crate) async fn virtual_object<K>(&self, resource: &str, namespace: &str, name: &str) -> Result<K, ProxyError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::<K>::namespaced(self.admin.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| ProxyError::upstream(format!("looking up {resource} {namespace}/{name}"), e))?
            .ok_or_else(|| ProxyError::NotFound(format!("{resource} \"{name}\" not found")))
    }

    /// The host copy of the virtual object `of` (of `kind`), read from the host, if it is ours
    /// and mirrors exactly that object: a colliding host object that someone else owns, or one
    /// left by an earlier object of the same name, is never reached.
    pub(crate) async fn host_copy<K>(&self, kind: &str, of: &ObjectMeta) -> Result<K, ProxyError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let (namespace, name) = (of.namespace.as_deref().unwrap_or_default(), of.name.as_deref().unwrap_or_default());
        let host_name = self.translator.host_name(namespace, name);
        let copy = Api::<K>::namespaced(self.host.clone(), self.translator.host_namespace())
            .get_opt(&host_name)
            .await
            .map_err(|e| ProxyError::upstream(format!("looking up the host copy of {kind} {namespace}/{name}"), e))?;
        copy.filter(|c| {
            self.translator
                .owner(c.meta())
                .is_some_and(|o| o.is(kind, namespace, name) && Some(&o.uid) == of.uid.as_ref())
        })
        .ok_or_else(|| {
            ProxyError::Unavailable(format!(
                "{} \"{name}\" is not running on the host yet; try again in a moment",
                kind.to_lowercase()
            ))
        })
    }

    /// Pod logs, for a user of the virtual cluster: authorized there, then read from the host.
    pub(crate) async fn pod_log(
        &self,
        req: Request<Incoming>,
        id: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let sub = HostSubresource::Log;
        self.authorize_subresource(id, req.headers(), namespace, "pods", sub.as_str(), name, sub.verb()).await?;
        let query = req.uri().query().map(str::to_string);
        self.pod_on_host(req, namespace, name, sub, query.as_deref(), None).await
    }

    /// Sends `sub` of the virtual pod `namespace/name` (with `query`, the subresource's own
    /// parameters) to the host API server for its host copy, upgrades relayed; whoever calls has
    /// authorized it.
    pub(crate) async fn pod_on_host(
        &self,
        mut req: Request<Incoming>,
        namespace: &str,
        name: &str,
        sub: HostSubresource,
        query: Option<&str>,
        session: Option<Arc<Activity>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let virtual_pod: Pod = self.virtual_object("pods", namespace, name).await?;
        let containers = container_names(&virtual_pod);
        let query = host_query(sub, query, &containers)
            .map_err(|why| ProxyError::BadRequest(format!("pods \"{name}\" {}: {why}", sub.as_str())))?;
        let host_pod: Pod = self.host_copy("Pod", &virtual_pod.metadata).await?;
        let (host_ns, host_name) = (self.translator.host_namespace(), host_pod.metadata.name.unwrap_or_default());

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| upgrade::client(&mut req));
        let (parts, _body) = req.into_parts();
        let query = if query.is_empty() { query } else { format!("?{query}") };
        let path = format!("/api/v1/namespaces/{host_ns}/pods/{host_name}/{}{query}", sub.as_str());
        let mut host_req = Request::builder().method(parts.method).uri(path);
        if let Some(h) = host_req.headers_mut() {
            *h = headers::for_host_subresource(&parts.headers, upgrade);
        }
        let host_req = host_req.body(kube::client::Body::empty()).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let resp = self
            .host
            .send(host_req)
            .await
            .map_err(|e| ProxyError::upstream("the host API server is unreachable", e))?;
        upgrade::relay(resp, client_upgrade, "the host API server", session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HostSubresource::*;

    #[test]
    fn only_each_subresources_own_parameters_reach_the_host() {
        let containers = ["app", "init", "debugger"];
        for (sub, query, expected) in [
            (
                Exec,
                "command=sh&command=-c&command=id&container=app&stdin=true&stdout=true&tty=true",
                Ok("command=sh&command=-c&command=id&container=app&stdin=true&stdout=true&tty=true"),
            ),
            (Exec, "command=id&insecureSkipTLSVerifyBackend=true&foo=bar", Ok("command=id")),
            (Exec, "command=id&container=debugger", Ok("command=id&container=debugger")),
            (Exec, "command=id&container=app&container=sidecar", Err("more than once")),
            (Exec, "command=id&container=sidecar", Err("container \"sidecar\" is not in the pod's spec")),
            (Exec, "command=id&container=%61pp", Ok("command=id&container=app")),
            (Attach, "container=init&stdin=true&command=id", Ok("container=init&stdin=true")),
            (
                Log,
                "container=app&follow=true&tailLines=10&insecureSkipTLSVerifyBackend=true",
                Ok("container=app&follow=true&tailLines=10"),
            ),
            (Log, "limitBytes=5&limitBytes=6", Err("more than once")),
            (Log, "", Ok("")),
            (PortForward, "ports=80&ports=8080&container=app", Ok("ports=80&ports=8080")),
        ] {
            let got = host_query(sub, Some(query), &containers);
            match expected {
                Ok(q) => assert_eq!(got.as_deref(), Ok(q), "{sub:?} {query}"),
                Err(needle) => assert!(got.as_ref().is_err_and(|e| e.contains(needle)), "{sub:?} {query}: {got:?}"),
            }
        }
        assert_eq!(host_query(Log, None, &containers).as_deref(), Ok(""));
    }
}
