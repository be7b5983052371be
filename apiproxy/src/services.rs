//! Service creation through the proxy: the host copy is created first, so the virtual Service is
//! born with the host's ClusterIP (the only address pods, which run on the host, can reach).
//! The request is first dry-run against the virtual API server as the user, so RBAC and
//! validation answer exactly as they would without us; the isolation policy answers next.

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
        let bytes = http_body_util::Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the request body: {e}")))?
            .to_bytes();
        // A ClusterIP the user asked for is honoured on the host when we can read the request
        // (kubectl sends protobuf, so usually the host chooses).
        let requested: Option<Service> = serde_json::from_slice(&bytes).ok();
        let requested_ip = requested.as_ref().and_then(|s| s.spec.as_ref()).and_then(|s| s.cluster_ip.clone());

        // The dry run answers RBAC, validation and admission as the user, and gives us the
        // Service as JSON, whatever the request's encoding, with its final name.
        let mut dry_parts = with_dry_run(&parts);
        dry_parts.headers.insert(header::ACCEPT, "application/json".parse().expect("static header"));
        let dry = self.forward_parts(dry_parts, full(bytes.clone()), id).await?;
        if !dry.status().is_success() {
            return Ok(dry);
        }
        let dry_bytes = dry.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let Ok(mut svc) = serde_json::from_slice::<Service>(&dry_bytes) else {
            return self.forward_parts(parts, full(bytes), id).await;
        };
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

        let mut desired = host_service(&self.translator, &self.policy, &svc)
            .map_err(|r| ProxyError::Forbidden(format!("services \"{}\" is forbidden: {r}", name(&svc))))?;
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

    async fn virtual_service_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), namespace);
        api.get_opt(name).await.ok().flatten().and_then(|s| s.metadata.uid)
    }
}

fn name(s: &Service) -> &str {
    s.metadata.name.as_deref().unwrap_or_default()
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
