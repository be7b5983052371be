//! Service-account tokens for host pods: a token of the VIRTUAL service account (TokenRequest on
//! the virtual API server), kept in a host Secret that the pod's projected volume reads. The host
//! never issues a token to a tenant pod.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::context::{Context, Key};
use crate::queue::Action;
use crate::refs::RefKind;
use crate::sync::{self, Result, SyncError};

pub const KIND: &str = "ServiceAccountToken";
/// When the token expires (RFC 3339), to renew it in time.
const ANNOTATION_EXPIRES: &str = "vkube.dev/token-expires";
const ANNOTATION_AUDIENCE: &str = "vkube.dev/token-audience";
const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renewed when less than this is left.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often tokens in use are checked for renewal.
const RECHECK: Duration = Duration::from_secs(24 * 3600);

/// Makes sure the host Secret `secret_name` holds a valid token of virtual service account
/// `ns`/`sa` for `audience` (None: the API server's own audience).
pub async fn ensure(ctx: &Context, ns: &str, sa: &str, secret_name: &str, audience: Option<&str>) -> Result<()> {
    let existing = sync::host_get(&ctx.stores.hsecrets, ctx, secret_name);
    if let Some(s) = &existing {
        if sync::mirrors(ctx, s.as_ref(), KIND, ns, sa).is_none() {
            return Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns())));
        }
        if !expires_soon(s) {
            return Ok(());
        }
    }
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.virt.clone(), ns);
    let account = sas.get(sa).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(LIFETIME.as_secs() as i64),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = sas.create_token_request(sa, &PostParams::default(), &request).await?;
    let status = issued.status.ok_or_else(|| SyncError::Other("TokenRequest returned no token".into()))?;
    let token = status.token.ok_or_else(|| SyncError::Other("TokenRequest returned no token".into()))?;
    let mut meta = ctx.tr.host_meta(KIND, &account.metadata);
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
    match existing {
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

/// Renews the token Secrets of a service account pods use (well before they expire) and removes
/// them once no pod uses it.
pub async fn reconcile(ctx: &Context, (ns, sa): Key) -> Result<Action> {
    let ours: Vec<_> = ctx
        .stores
        .hsecrets
        .state()
        .into_iter()
        .filter(|s| sync::mirrors(ctx, s.as_ref(), KIND, &ns, &sa).is_some())
        .collect();
    if ctx.refs.is_used(RefKind::ServiceAccountToken, &ns, &sa) {
        for s in ours.iter().filter(|s| expires_soon(s)) {
            let audience = s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_AUDIENCE)).cloned();
            let name = s.metadata.name.clone().unwrap_or_default();
            ensure(ctx, &ns, &sa, &name, audience.as_deref()).await?;
        }
        return Ok(Action::RequeueAfter(RECHECK));
    }
    for s in ours {
        sync::delete_host(ctx, KIND, s.as_ref(), None).await?;
    }
    Ok(Action::Done)
}

/// The key a host token Secret belongs to, if it is one of ours.
pub fn key_of_host(ctx: &Context, s: &Secret) -> Option<Key> {
    ctx.tr.owner(&s.metadata).filter(|o| o.kind == KIND).map(|o| (o.namespace, o.name))
}
