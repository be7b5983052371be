//! Service creation through the proxy: the host copy is created first, so the virtual Service is
//! born with the host's ClusterIP (the only address pods, which run on the host, can reach).
//! The request is first dry-run against the virtual API server as the user, so RBAC and
//! validation answer exactly as they would without us; the isolation policy answers next. A
//! server dry run (`?dryRun=All`) is checked the same way and never writes to the host.

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch};
use vkube_core::contract::{ANNOTATION_PENDING_SINCE, ANNOTATION_UID, PENDING_UID};
use vkube_core::services::host_service;
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use crate::auth::Identity;
use crate::error::ProxyError;
use crate::{Proxy, ProxyBody, full};

/// Service manifests are small; anything bigger is not a Service.
const MAX_BODY: usize = 1 << 20;

impl Proxy {
    pub(crate) async fn create_service(
        &self,
        req: Request<Incoming>,
        id: &Identity,
        namespace: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(body).await?;
        // What the user asked for is what the proxy checks: a body it cannot read is refused, not
        // passed on unchecked.
        let requested =
            parse_service(parts.headers.get(header::CONTENT_TYPE), &bytes).map_err(ProxyError::BadRequest)?;
        let requested_ip = requested.cluster_ip.clone();

        // The dry run answers RBAC, validation and admission as the user, and gives us the
        // Service as JSON, whatever the request's encoding, with its final name.
        let mut dry_parts = with_dry_run(&parts);
        dry_parts.headers.insert(header::ACCEPT, "application/json".parse().expect("static header"));
        let dry = self.forward_parts(dry_parts, full(bytes.clone()), id).await?;
        if !dry.status().is_success() {
            return Ok(dry);
        }
        let dry_bytes = dry.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let mut svc = serde_json::from_slice::<Service>(&dry_bytes).map_err(|e| {
            ProxyError::upstream("the virtual API server's dry run of the Service create answered no Service", e)
        })?;
        self.policy
            .check_cluster_ips(requested.cluster_ip.as_deref(), &requested.cluster_ips)
            .map_err(|why| ProxyError::Invalid(format!("Service \"{}\" is invalid: {why}", name(&svc))))?;
        svc.metadata.namespace = Some(namespace.to_string());
        svc.metadata.generate_name = None;
        svc.metadata.uid = None;
        svc.metadata.resource_version = None;
        svc.metadata.creation_timestamp = None;
        svc.metadata.managed_fields = None;
        if let Some(spec) = svc.spec.as_mut()
            && spec.cluster_ip.as_deref() != Some("None")
        {
            spec.cluster_ip = requested_ip.filter(|ip| !ip.is_empty());
            spec.cluster_ips = None;
        }
        if !self.policy.allow_node_port_choice
            && (!requested.node_ports.is_empty() || requested.health_check_node_port.is_some())
        {
            return Err(ProxyError::Invalid(format!(
                "Service \"{}\" is invalid: spec.ports[*].nodePort, spec.healthCheckNodePort: Forbidden: node ports \
                 are chosen by the host in this virtual cluster; leave them empty (the platform admin can let tenants \
                 choose them: policy.allowNodePortChoice)",
                name(&svc)
            )));
        }
        // Node ports as asked for: the dry run's are the virtual API server's choice, not the host's.
        set_node_ports(&mut svc, &requested.node_ports, requested.health_check_node_port);

        if !vkube_core::services::has_host_copy(&svc) {
            // An ExternalName, the resource metrics API's (the tenant made it again) among them:
            // never copied to the host, so nothing to make there first.
            return self.forward_parts(parts, full(bytes), id).await;
        }
        let mut desired = host_service(&self.translator, &self.policy, &svc)
            .map_err(|r| ProxyError::Forbidden(format!("services \"{}\" is forbidden: {r}", name(&svc))))?;
        if is_dry_run(parts.uri.query()) {
            // Checked like a real create, answered by the virtual API server's own dry run, and
            // nothing written to the host, not even briefly.
            return self.forward_parts(parts, full(bytes), id).await;
        }
        let ann = desired.metadata.annotations.get_or_insert_with(Default::default);
        ann.insert(ANNOTATION_UID.into(), PENDING_UID.into());
        ann.insert(ANNOTATION_PENDING_SINCE.into(), k8s_openapi::jiff::Timestamp::now().to_string());
        let hosts: Api<Service> = Api::namespaced(self.host.clone(), self.translator.host_namespace());
        let created = match hosts.create(&vkube_kubeclient::params::post_params(), &desired).await {
            Ok(c) => c,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Err(ProxyError::AlreadyExists(format!(
                    "the host copy of service \"{}\" still exists (a deletion in progress?); try again shortly",
                    name(&svc)
                )));
            }
            Err(kube::Error::Api(e)) if e.code == 422 => {
                return Err(ProxyError::Invalid(format!(
                    "service \"{}\" cannot be created on the host: {}",
                    name(&svc),
                    e.message
                )));
            }
            Err(e) => return Err(ProxyError::upstream("creating the host copy of the service", e)),
        };
        if let (Some(spec), Some(host_spec)) = (svc.spec.as_mut(), created.spec.as_ref()) {
            spec.cluster_ip = host_spec.cluster_ip.clone();
            spec.cluster_ips = host_spec.cluster_ips.clone();
        }
        // The same node ports on both sides: the host's.
        let host_ports: Requested = created.clone().into();
        set_node_ports(&mut svc, &host_ports.node_ports, host_ports.health_check_node_port);
        let body = Bytes::from(serde_json::to_vec(&svc).map_err(|e| ProxyError::BadRequest(e.to_string()))?);
        let mut parts = parts;
        parts.headers.insert(header::CONTENT_TYPE, "application/json".parse().expect("static header"));
        parts.headers.insert(header::CONTENT_LENGTH, body.len().into());
        // Not `?`: a create that failed to reach the virtual API server must not leave its host
        // copy behind either.
        let resp = self.forward_parts(parts, full(body), id).await;
        let host_name = created.metadata.name.clone().unwrap_or_default();
        if resp.as_ref().is_ok_and(|r| r.status().is_success()) {
            // Adopt at once rather than at the syncer's next look (it adopts if this fails).
            match self.virtual_service_uid(namespace, name(&svc)).await {
                Some(uid) => {
                    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_UID: uid, ANNOTATION_PENDING_SINCE: null}}});
                    if let Err(e) =
                        hosts.patch(&host_name, &vkube_kubeclient::params::patch_params(), &Patch::Merge(patch)).await
                    {
                        tracing::warn!(error = %e, service = host_name, "adopting the host service failed; the syncer will");
                    }
                }
                None => tracing::warn!(
                    service = host_name,
                    "created service not found; the syncer will adopt its host copy"
                ),
            }
            return resp;
        }
        if let Err(e) = delete_exactly(&hosts, &created.metadata, None, Exactly::Object).await {
            tracing::warn!(error = %e, service = host_name, "removing the host copy of a failed service create failed; the syncer will");
        }
        resp
    }

    /// A patch of a Service: a server-side apply (which creates the Service if it does not exist)
    /// has its ClusterIPs checked like a create's; other patches cannot create and are forwarded.
    pub(crate) async fn patch_service(
        &self,
        req: Request<Incoming>,
        id: &Identity,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let media = media_type(req.headers().get(header::CONTENT_TYPE));
        if !media.starts_with("application/apply-patch") {
            return self.forward(req, id, None).await;
        }
        let (parts, body) = req.into_parts();
        let bytes = read_body(body).await?;
        let requested =
            parse_service(parts.headers.get(header::CONTENT_TYPE), &bytes).map_err(ProxyError::BadRequest)?;
        self.policy.check_cluster_ips(requested.cluster_ip.as_deref(), &requested.cluster_ips).map_err(|why| {
            ProxyError::Invalid(format!(
                "Service \"{}\" is invalid: {why}",
                parts.uri.path().rsplit('/').next().unwrap_or_default()
            ))
        })?;
        self.forward_parts(parts, full(bytes), id).await
    }

    async fn virtual_service_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), namespace);
        api.get_opt(name).await.ok().flatten().and_then(|s| s.metadata.uid)
    }
}

fn name(s: &Service) -> &str {
    s.metadata.name.as_deref().unwrap_or_default()
}

/// The ClusterIPs a create request asks for: all the proxy needs to read from its body.
#[derive(Debug, Default, PartialEq, Eq)]
struct Requested {
    cluster_ip: Option<String>,
    cluster_ips: Vec<String>,
    /// Node ports asked for by hand, as (port, protocol, node port).
    node_ports: Vec<(i32, String, i32)>,
    health_check_node_port: Option<i32>,
}

impl From<Service> for Requested {
    fn from(s: Service) -> Self {
        let spec = s.spec.unwrap_or_default();
        let node_ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| asked_port(p.port, p.protocol.as_deref(), p.node_port))
            .collect();
        Requested {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips.unwrap_or_default(),
            node_ports,
            health_check_node_port: spec.health_check_node_port.filter(|p| *p != 0),
        }
    }
}

/// A port's node port, if one is asked for, as (port, protocol, node port).
fn asked_port(port: i32, protocol: Option<&str>, node_port: Option<i32>) -> Option<(i32, String, i32)> {
    Some((port, protocol.unwrap_or("TCP").to_string(), node_port.filter(|np| *np != 0)?))
}

/// Gives `svc` the node ports of `from` (by port and protocol; `None` where it has none) and
/// its health-check node port.
fn set_node_ports(svc: &mut Service, from: &[(i32, String, i32)], health_check: Option<i32>) {
    if let Some(spec) = svc.spec.as_mut() {
        for p in spec.ports.iter_mut().flatten() {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            p.node_port = from.iter().find(|(port, proto, _)| *port == p.port && *proto == protocol).map(|n| n.2);
        }
        spec.health_check_node_port = health_check;
    }
}

/// The Kubernetes protobuf encoding (kubectl's default): the `runtime.Unknown` envelope after a
/// magic prefix, holding a `v1.Service`; only the fields read are declared (tags from
/// k8s.io/api/core/v1/generated.proto), the rest is skipped.
mod pb {
    pub const MAGIC: &[u8] = b"k8s\0";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Unknown {
        #[prost(message, optional, tag = "1")]
        pub type_meta: Option<TypeMeta>,
        #[prost(bytes = "vec", optional, tag = "2")]
        pub raw: Option<Vec<u8>>,
        #[prost(string, optional, tag = "3")]
        pub content_encoding: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeMeta {
        #[prost(string, optional, tag = "2")]
        pub kind: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Service {
        #[prost(message, optional, tag = "2")]
        pub spec: Option<ServiceSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServiceSpec {
        #[prost(message, repeated, tag = "1")]
        pub ports: Vec<ServicePort>,
        #[prost(string, optional, tag = "3")]
        pub cluster_ip: Option<String>,
        #[prost(int32, optional, tag = "12")]
        pub health_check_node_port: Option<i32>,
        #[prost(string, repeated, tag = "18")]
        pub cluster_ips: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServicePort {
        #[prost(string, optional, tag = "2")]
        pub protocol: Option<String>,
        #[prost(int32, optional, tag = "3")]
        pub port: Option<i32>,
        #[prost(int32, optional, tag = "5")]
        pub node_port: Option<i32>,
    }
}

fn parse_protobuf(body: &[u8]) -> Result<Requested, String> {
    use prost::Message;
    let envelope = body.strip_prefix(pb::MAGIC).ok_or("no Kubernetes protobuf prefix")?;
    let unknown = pb::Unknown::decode(envelope).map_err(|e| e.to_string())?;
    if unknown.content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err("encoded content is not supported".into());
    }
    let kind = unknown.type_meta.and_then(|t| t.kind).unwrap_or_default();
    if kind != "Service" {
        return Err(format!("it holds kind {kind:?}, not Service"));
    }
    let raw = unknown.raw.filter(|r| !r.is_empty()).ok_or("it holds no object")?;
    let svc = pb::Service::decode(raw.as_slice()).map_err(|e| e.to_string())?;
    let spec = svc.spec.unwrap_or_default();
    let node_ports = spec
        .ports
        .iter()
        .filter_map(|p| asked_port(p.port.unwrap_or_default(), p.protocol.as_deref(), p.node_port))
        .collect();
    Ok(Requested {
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        node_ports,
        health_check_node_port: spec.health_check_node_port.filter(|p| *p != 0),
    })
}

/// A Service manifest, at most `MAX_BODY`.
async fn read_body(body: Incoming) -> Result<Bytes, ProxyError> {
    crate::read_limited(body, MAX_BODY, "the Service manifest", "a Service is far smaller: check what is being sent")
        .await
}

/// The media type of a Content-Type, lower case, without parameters; JSON if there is none.
fn media_type(content_type: Option<&header::HeaderValue>) -> String {
    let value = content_type.and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// A create's or apply's ClusterIPs, from JSON, YAML or protobuf. `Err` names the problem.
fn parse_service(content_type: Option<&header::HeaderValue>, body: &[u8]) -> Result<Requested, String> {
    let media = media_type(content_type);
    match media.as_str() {
        "application/json" => serde_json::from_slice::<Service>(body)
            .map(Requested::from)
            .map_err(|e| format!("the request body is not a Service in JSON: {e}")),
        "application/yaml" | "application/apply-patch+yaml" => std::str::from_utf8(body)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_saphyr::from_str::<Service>(t).map_err(|e| e.to_string()))
            .map(Requested::from)
            .map_err(|e| format!("the request body is not a Service in YAML: {e}")),
        "application/vnd.kubernetes.protobuf" => {
            parse_protobuf(body).map_err(|e| format!("the request body is not a Service in protobuf: {e}"))
        }
        other => Err(format!(
            "Service creations and applies through this proxy must be JSON, YAML or protobuf, not {other:?}: send Content-Type: application/json (application/apply-patch+yaml to apply)"
        )),
    }
}

/// Whether the request asks for a dry run (any `dryRun` value: the API server refuses one it does
/// not know, and the proxy must not write for it either).
fn is_dry_run(query: Option<&str>) -> bool {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes()).any(|(k, _)| k == "dryRun")
}

fn with_dry_run(parts: &http::request::Parts) -> http::request::Parts {
    let mut p = Request::new(()).into_parts().0;
    p.method = parts.method.clone();
    p.headers = parts.headers.clone();
    p.version = parts.version;
    let path = parts.uri.path();
    let query = match parts.uri.query() {
        Some(q) if !q.is_empty() => format!("{q}&dryRun=All"),
        _ => "dryRun=All".into(),
    };
    p.uri = format!("{path}?{query}").parse().unwrap_or_else(|_| parts.uri.clone());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ports_asked_for_are_kept_and_the_dry_runs_dropped() {
        let json = header::HeaderValue::from_static("application/json");
        let body = br#"{"kind":"Service","spec":{"type":"NodePort","healthCheckNodePort":31000,"ports":[
            {"port":80,"nodePort":30555},{"port":53,"protocol":"UDP"},{"port":53,"protocol":"TCP","nodePort":30553}]}}"#;
        let asked = parse_service(Some(&json), body).unwrap();
        assert_eq!(asked.node_ports, vec![(80, "TCP".into(), 30555), (53, "TCP".into(), 30553)]);
        assert_eq!(asked.health_check_node_port, Some(31000));
        // What the dry run answered: placeholders everywhere.
        let mut dry: Service = serde_json::from_value(serde_json::json!({"spec": {"healthCheckNodePort": 32770,
            "ports": [{"port": 80, "nodePort": 32769}, {"port": 53, "protocol": "UDP", "nodePort": 32771},
                      {"port": 53, "protocol": "TCP", "nodePort": 32772}]}}))
        .unwrap();
        set_node_ports(&mut dry, &asked.node_ports, asked.health_check_node_port);
        let got: Vec<Option<i32>> = dry.spec.as_ref().unwrap().ports.iter().flatten().map(|p| p.node_port).collect();
        assert_eq!(got, vec![Some(30555), None, Some(30553)]);
        assert_eq!(dry.spec.unwrap().health_check_node_port, Some(31000));
    }

    #[test]
    fn dry_runs_are_recognised_however_spelled() {
        for (q, dry) in [
            (None, false),
            (Some("fieldManager=kubectl-create"), false),
            (Some("dryRun=All"), true),
            (Some("fieldManager=x&dryRun=All"), true),
            (Some("dry%52un=All"), true),
            (Some("dryRun="), true),
            (Some("dryRun=bogus"), true),
            (Some("dryrun=All"), false), // not a parameter the API server knows: a real create
        ] {
            assert_eq!(is_dry_run(q), dry, "{q:?}");
        }
    }

    /// A Service `web` with clusterIP 10.96.0.10 as kube-apiserver 1.37 encodes it in protobuf,
    /// the encoding kubectl sends (captured from a real API server; metadata and status included).
    const KUBECTL_PROTOBUF: &[u8] = include_bytes!("../tests/data/service-create.pb");

    #[test]
    fn kubectls_protobuf_is_read() {
        let proto = header::HeaderValue::from_static("application/vnd.kubernetes.protobuf");
        let got = parse_service(Some(&proto), KUBECTL_PROTOBUF).unwrap();
        assert_eq!(got.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(got.cluster_ips, vec!["10.96.0.10".to_string()]);
    }

    #[test]
    fn bodies_the_proxy_cannot_read_are_refused() {
        let json = header::HeaderValue::from_static("application/json; charset=utf-8");
        let yaml = header::HeaderValue::from_static("application/yaml");
        let proto = header::HeaderValue::from_static("application/vnd.kubernetes.protobuf");
        let ok = br#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"x"},"spec":{"clusterIP":"10.96.0.10"}}"#;
        assert_eq!(parse_service(Some(&json), ok).unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        assert!(parse_service(None, ok).is_ok());
        let y = b"apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.10}\n";
        assert_eq!(parse_service(Some(&yaml), y).unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        let apply = header::HeaderValue::from_static("application/apply-patch+yaml");
        assert_eq!(parse_service(Some(&apply), y).unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        for (ct, body, needle) in [
            (Some(&json), &b"{not json"[..], "not a Service in JSON"),
            (Some(&json), &b""[..], "not a Service in JSON"),
            (Some(&json), &br#"{"spec": {"clusterIP": 7}}"#[..], "not a Service in JSON"),
            (Some(&yaml), &b"spec: [1"[..], "not a Service in YAML"),
            (Some(&proto), &b"k8s\0\xff\xff"[..], "not a Service in protobuf"),
            (Some(&proto), &b"{}"[..], "no Kubernetes protobuf prefix"),
            (Some(&proto), &b"k8s\0\n\x04\n\x02v1"[..], "holds kind \"\", not Service"),
            (Some(&proto), &KUBECTL_PROTOBUF[..KUBECTL_PROTOBUF.len() - 40], "not a Service in protobuf"),
            (
                Some(&header::HeaderValue::from_static("application/cbor")),
                &b"\xa0"[..],
                "must be JSON, YAML or protobuf",
            ),
        ] {
            let err = parse_service(ct, body).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
