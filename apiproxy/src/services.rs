//! Service creation through the proxy: the host copy is created first, so the virtual Service is
//! born with the host's ClusterIP (the only address pods, which run on the host, can reach).
//! The request is first dry-run against the virtual API server as the user, so RBAC and
//! validation answer exactly as they would without us; the isolation policy answers next.

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use vkube_syncer::naming::ANNOTATION_UID;
use vkube_syncer::services::{ANNOTATION_PENDING_SINCE, host_service};
use vkube_syncer::sync::PENDING_UID;

use crate::auth::Identity;
use crate::{Proxy, ProxyBody, full, status};

/// Service manifests are small; anything bigger is not a Service.
const MAX_BODY: usize = 1 << 20;

impl Proxy {
    pub(crate) async fn create_service(
        &self,
        req: Request<Incoming>,
        id: &Identity,
        namespace: &str,
    ) -> Response<ProxyBody> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let (parts, body) = req.into_parts();
        let bytes = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status::bad_request(&format!("reading the request body: {e}")),
        };
        let parsed: Option<Service> = if is_json { serde_json::from_slice(&bytes).ok() } else { None };
        // YAML or protobuf bodies, or generated names: the syncer aligns the ClusterIP afterwards.
        let Some(mut svc) = parsed.filter(|s| s.metadata.name.as_deref().is_some_and(|n| !n.is_empty())) else {
            return self.forward_parts(parts, full(bytes), id).await;
        };
        svc.metadata.namespace = Some(namespace.to_string());

        let dry = self.forward_parts(with_dry_run(&parts), full(bytes.clone()), id).await;
        if !dry.status().is_success() {
            return dry;
        }
        let mut desired = match host_service(&self.translator, &self.policy, &svc) {
            Ok(d) => d,
            Err(r) => {
                return status::status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("services \"{}\" is forbidden: {r}", name(&svc)),
                );
            }
        };
        let ann = desired.metadata.annotations.get_or_insert_with(Default::default);
        ann.insert(ANNOTATION_UID.into(), PENDING_UID.into());
        ann.insert(ANNOTATION_PENDING_SINCE.into(), k8s_openapi::jiff::Timestamp::now().to_string());
        let hosts: Api<Service> = Api::namespaced(self.host.clone(), self.translator.host_namespace());
        let created = match hosts
            .create(&PostParams { field_manager: Some("vkube".into()), ..Default::default() }, &desired)
            .await
        {
            Ok(c) => c,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return status::status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!(
                        "the host copy of service \"{}\" still exists (a deletion in progress?); try again shortly",
                        name(&svc)
                    ),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 422 => {
                return status::status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!("service \"{}\" cannot be created on the host: {}", name(&svc), e.message),
                );
            }
            Err(e) => return status::unavailable(&format!("creating the host copy of the service: {e}")),
        };
        if let (Some(spec), Some(host_spec)) = (svc.spec.as_mut(), created.spec.as_ref()) {
            spec.cluster_ip = host_spec.cluster_ip.clone();
            spec.cluster_ips = host_spec.cluster_ips.clone();
        }
        let body = match serde_json::to_vec(&svc) {
            Ok(b) => Bytes::from(b),
            Err(e) => return status::bad_request(&e.to_string()),
        };
        let mut parts = parts;
        parts.headers.insert(header::CONTENT_LENGTH, body.len().into());
        let resp = self.forward_parts(parts, full(body), id).await;
        let host_name = created.metadata.name.clone().unwrap_or_default();
        if resp.status().is_success() {
            // Adopt now rather than at the syncer's next look; the syncer does it if this fails.
            let (rparts, rbody) = resp.into_parts();
            let rbytes = rbody.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if let Ok(v) = serde_json::from_slice::<Service>(&rbytes)
                && let Some(uid) = v.metadata.uid
            {
                let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_UID: uid, ANNOTATION_PENDING_SINCE: null}}});
                if let Err(e) = hosts.patch(&host_name, &PatchParams::default(), &Patch::Merge(patch)).await {
                    tracing::warn!(error = %e, service = host_name, "adopting the host service failed; the syncer will");
                }
            }
            return Response::from_parts(rparts, full(rbytes));
        }
        let dp = DeleteParams {
            preconditions: created
                .metadata
                .uid
                .clone()
                .map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
            ..Default::default()
        };
        if let Err(e) = hosts.delete(&host_name, &dp).await {
            tracing::warn!(error = %e, service = host_name, "removing the host copy of a failed service create failed; the syncer will");
        }
        resp
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
