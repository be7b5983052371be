//! The virtual nodes' kubelet. The virtual API server sends `pods/exec`, `pods/attach` and
//! `pods/portforward` to the kubelet of the pod's node once its own authorization and admission
//! have passed (a tenant's webhook or policy on these connects is asked, as on any cluster). Its
//! connection to `<node address>:10250` goes through the egress proxy, which hands it here instead
//! of to the network: TLS with a certificate for the address dialled, signed by the cluster's
//! kubelet CA (which the virtual API server trusts for kubelets, and which signs nothing a tenant
//! can ask for: its CSRs are signed with the cluster CA), and only the API server's kubelet-client
//! certificate of that CA gets a request served. Each request goes on, as the control plane, to
//! the host API server for the pod's host copy.

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::ProxyError;
use crate::route::HostSubresource;
use crate::tls::{self, TlsError};
use crate::{Proxy, ProxyBody};

/// The user of the virtual API server's client certificate for kubelets.
pub const CLIENT_USER: &str = "kube-apiserver-kubelet-client";
/// The file stem of the kubelet CA in the cluster's certificates (`kubelet-ca.crt`, `.key`).
pub const CA: &str = "kubelet-ca";
pub use vkube_core::contract::KUBELET_PORT as PORT;

pub struct Kubelet {
    proxy: Arc<Proxy>,
    /// A certificate of the kubelet CA for each address dialled (the API server opens a
    /// connection per session); only the API server's kubelet-client certificate served.
    tls: tls::InProcessServer,
}

impl Kubelet {
    pub fn new(proxy: Arc<Proxy>, ca_cert_pem: &str, ca_key_pem: &str) -> Result<Arc<Self>, TlsError> {
        let tls = tls::InProcessServer::new(ca_cert_pem, ca_key_pem, ca_cert_pem, CLIENT_USER, "kubelet")?;
        Ok(Arc::new(Kubelet { proxy, tls }))
    }

    /// Serves one connection the virtual API server opened to `host` (a node's address).
    pub async fn serve<IO>(self: Arc<Self>, io: IO, host: String)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        self.tls
            .serve(io, &host, move |req| {
                let kubelet = this.clone();
                async move { kubelet.handle(req).await }
            })
            .await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let asked = match Asked::parse(req.method(), req.uri().path(), req.uri().query()) {
            Ok(a) => a,
            Err(why) => return self.proxy.error_response(ProxyError::NotFound(why)),
        };
        tracing::debug!(subresource = asked.sub.as_str(), namespace = %asked.namespace, pod = %asked.pod, "kubelet request");
        match self.proxy.pod_on_host(req, &asked.namespace, &asked.pod, asked.sub, Some(&asked.query), None).await {
            Ok(resp) => resp,
            Err(e) => self.proxy.error_response(e),
        }
    }
}

/// A kubelet request of the virtual API server, in the API's terms: the pod and subresource,
/// and the query that subresource takes on the host API server.
#[derive(Debug, PartialEq, Eq)]
struct Asked {
    sub: HostSubresource,
    namespace: String,
    pod: String,
    query: String,
}

impl Asked {
    /// `/exec/{ns}/{pod}/{container}`, `/attach/{ns}/{pod}/{container}` (query `input`,
    /// `output`, `error`, `tty`, `command`) and `/portForward/{ns}/{pod}` (query `port`, a comma
    /// list), as the API server builds them (`pkg/registry/core/pod/strategy.go`).
    fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Self, String> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (sub, namespace, pod, container) = match segments.as_slice() {
            ["exec", ns, pod, container] => (HostSubresource::Exec, ns, pod, Some(container)),
            ["attach", ns, pod, container] => (HostSubresource::Attach, ns, pod, Some(container)),
            ["portForward", ns, pod] => (HostSubresource::PortForward, ns, pod, None),
            _ => return Err(format!("{method} {path}: this kubelet serves exec, attach and portForward only")),
        };
        if namespace.is_empty() || pod.is_empty() || container.is_some_and(|c| c.is_empty()) {
            return Err(format!("{path}: a namespace, pod and container are needed"));
        }
        let mut out = form_urlencoded::Serializer::new(String::new());
        if let Some(c) = container {
            out.append_pair("container", c);
        }
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = |v: &str| if v == "1" || v == "true" { "true" } else { "false" };
            match key.as_ref() {
                "input" => out.append_pair("stdin", flag(&value)),
                "output" => out.append_pair("stdout", flag(&value)),
                "error" => out.append_pair("stderr", flag(&value)),
                "tty" => out.append_pair("tty", flag(&value)),
                "command" if sub == HostSubresource::Exec => out.append_pair("command", &value),
                "port" if sub == HostSubresource::PortForward => {
                    value.split(',').fold(&mut out, |out, port| out.append_pair("ports", port.trim()))
                }
                _ => &mut out,
            };
        }
        Ok(Asked { sub, namespace: namespace.to_string(), pod: pod.to_string(), query: out.finish() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(path: &str, query: &str) -> Result<Asked, String> {
        Asked::parse(&Method::POST, path, Some(query))
    }

    #[test]
    fn kubelet_requests_become_the_apis_subresources() {
        let a = asked("/exec/team/web/app", "command=sh&command=-c&command=echo+hi&input=1&output=1&tty=1").unwrap();
        assert_eq!(a.sub, HostSubresource::Exec);
        assert_eq!((a.namespace.as_str(), a.pod.as_str()), ("team", "web"));
        assert_eq!(a.query, "container=app&command=sh&command=-c&command=echo+hi&stdin=true&stdout=true&tty=true");

        let a = asked("/attach/team/web/app", "output=1&error=1&command=id").unwrap();
        assert_eq!(a.sub, HostSubresource::Attach);
        assert_eq!(a.query, "container=app&stdout=true&stderr=true", "attach takes no command");

        let a = asked("/portForward/team/web", "port=80%2C8080").unwrap();
        assert_eq!(a.sub, HostSubresource::PortForward);
        assert_eq!(a.query, "ports=80&ports=8080");
        assert_eq!(asked("/portForward/team/web", "").unwrap().query, "");
    }

    #[test]
    fn anything_else_is_not_served() {
        for path in [
            "/containerLogs/team/web/app",
            "/run/team/web/app",
            "/exec/team/web",
            "/exec/team/web/uid/app",
            "/exec//web/app",
            "/portForward/team",
            "/pods",
            "/",
        ] {
            assert!(asked(path, "").is_err(), "{path} was served");
        }
    }
}
