//! Service-account tokens for host pods: a token of the pod's VIRTUAL service account, bound to
//! the virtual pod (TokenRequest on the virtual API server, so it stops working when the pod is
//! deleted), kept in a host Secret of the pod's own that its projected volume reads. The host
//! never issues a token to a tenant pod.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::ObjectRef;

use crate::context::{Context, Key};
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result, SyncError};

pub const KIND: &str = "ServiceAccountToken";
/// When the token expires (RFC 3339), to renew it in time.
const ANNOTATION_EXPIRES: &str = "vkube.dev/token-expires";
const ANNOTATION_AUDIENCE: &str = "vkube.dev/token-audience";
/// Long, as a kubelet's tokens are with the API server's extended expiration: the binding to the
/// pod is what ends it.
const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renewed when less than this is left.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often tokens in use are checked for renewal.
const RECHECK: Duration = Duration::from_secs(24 * 3600);

/// Makes sure the host Secret `secret_name` holds a valid token of `pod`'s virtual service
/// account, bound to `pod`, for `audience` (None: the API server's own audience).
pub async fn ensure(ctx: &Context, pod: &Pod, secret_name: &str, audience: Option<&str>) -> Result<()> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let existing = sync::host_get(&ctx.stores.hsecrets, ctx, secret_name);
    let current = match sync::classify(ctx, existing, KIND, ns, name, uid) {
        HostCopy::Foreign(_) => return Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns()))),
        HostCopy::Ours(s) if !expires_soon(&s) => return Ok(()),
        // Renewed, or replaced when an earlier pod of the same name left it (its token is void).
        HostCopy::Ours(s) | HostCopy::Stale(s) => Some(s),
        HostCopy::Absent => None,
    };
    let sa = pod.spec.as_ref().map(crate::refs::service_account).unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(LIFETIME.as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.virt.clone(), ns);
    let issued = sas.create_token_request(&sa, &PostParams::default(), &request).await?;
    let status = issued.status.ok_or_else(|| SyncError::Other("TokenRequest returned no token".into()))?;
    let token = status.token.ok_or_else(|| SyncError::Other("TokenRequest returned no token".into()))?;
    // The pod's identity only: its labels and annotations are the pod's business, not the token's.
    let identity = ObjectMeta {
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    };
    let mut meta = ctx.tr.host_meta(KIND, &identity);
    meta.name = Some(secret_name.to_string());
    let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
    if let Some(expires) = status.expiration_timestamp {
        ann.insert(ANNOTATION_EXPIRES.into(), expires.0.to_string());
    }
    if let Some(a) = audience {
        ann.insert(ANNOTATION_AUDIENCE.into(), a.to_string());
    }
    let secret = Secret {
        metadata: meta,
        data: Some([("token".to_string(), ByteString(token.into_bytes()))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match current {
        Some(current) => sync::replace_host(ctx, KIND, current.as_ref(), secret).await,
        None => sync::create_host(ctx, KIND, &secret).await,
    }
}

fn expires_soon(s: &Secret) -> bool {
    let Some(at) = s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_EXPIRES)) else { return true };
    let Ok(at) = at.parse::<k8s_openapi::jiff::Timestamp>() else { return true };
    let left = at.duration_since(k8s_openapi::jiff::Timestamp::now());
    left.as_secs() < RENEW_BEFORE.as_secs() as i64
}

/// Renews the token Secrets of a virtual pod (well before they expire) and removes them once the
/// pod is gone.
pub async fn reconcile(ctx: &Context, (ns, pod): Key) -> Result<Action> {
    let ours: Vec<_> = ctx
        .stores
        .hsecrets
        .state()
        .into_iter()
        .filter(|s| sync::mirrors(ctx, s.as_ref(), KIND, &ns, &pod).is_some())
        .collect();
    if let Some(v) = ctx.stores.vpods.get(&ObjectRef::new(&pod).within(&ns)) {
        let v = v.load();
        let uid = v.metadata.uid.clone().unwrap_or_default();
        // Those of an earlier pod of the same name are replaced before the new pod starts.
        let renew = ours.iter().filter(|s| ctx.tr.owner(&s.metadata).is_some_and(|o| o.uid == uid) && expires_soon(s));
        for s in renew {
            let audience = s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_AUDIENCE)).cloned();
            let name = s.metadata.name.clone().unwrap_or_default();
            ensure(ctx, &v, &name, audience.as_deref()).await?;
        }
        return Ok(if ours.is_empty() { Action::Done } else { Action::RequeueAfter(RECHECK) });
    }
    for s in ours {
        sync::delete_host(ctx, KIND, s.as_ref(), None).await?;
    }
    Ok(Action::Done)
}

/// The key a host token Secret belongs to, if it is one of ours: its pod's.
pub fn key_of_host(ctx: &Context, s: &Secret) -> Option<Key> {
    ctx.tr.owner(&s.metadata).filter(|o| o.kind == KIND).map(|o| (o.namespace, o.name))
}

/// Drops the token itself from host token Secrets before they are stored: the syncer only reads
/// their marks and expiry (memory: one Secret per pod).
pub fn slim_host_secret(s: &mut Secret) {
    let kind = s.metadata.annotations.as_ref().and_then(|a| a.get(crate::naming::ANNOTATION_KIND));
    let is_token = kind.is_some_and(|k| k == KIND);
    if is_token {
        s.data = None;
    }
}
