//! Service-account tokens for host pods: a token of the pod's VIRTUAL service account, bound to
//! the virtual pod (TokenRequest on the virtual API server, so it stops working when the pod is
//! deleted), kept in a host Secret of the pod's own that its projected volume reads. The host
//! never issues a token to a tenant pod.
//!
//! With `--token-delivery=annotation` the tokens are annotations of the host pod instead (its
//! projected volume reads them through the downward API): written with the pod, one host write
//! fewer per pod and no Secret, renewed by a metadata patch when the pod is reconciled (every pod
//! is at every resync; a renewal due sooner is queued), gone with the pod. Their values are not
//! kept in the host pod store.
//!
//! There is one such Secret per pod and the syncer rarely needs them again, so they are not
//! watched (memory): they are written before their pod, removed when the virtual pod is deleted
//! (their names follow from its spec), and a sweep (at start, then with every resync) lists their
//! metadata to renew tokens well before they expire and remove any whose pod is gone. A token
//! due for renewal before the next sweep (short lifetimes) has its renewal queued for that time.
//! A pod's trust-bundle Secret (`trust_bundles`) and certificate Secret (`pod_certificates`) are
//! swept with them: refreshed, or removed with their pod.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch};
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::{
    ANNOTATION_POD_TOKEN, ANNOTATION_TOKEN_AUDIENCE, ANNOTATION_TOKEN_EXPIRES, ANNOTATION_TOKEN_RENEW_AT, LABEL_TOKEN,
};
use vkube_kubeclient::delete::{Exactly, delete_exactly};
use vkube_kubeclient::patch::MetadataPatch;

use crate::context::{Context, TokenLifetime};
use crate::pods::translate;
use crate::queue::Action;
use crate::sync::{self, Result, SyncError};

pub const KIND: &str = "ServiceAccountToken";
/// The host namespace's Secrets, where pods' own Secrets are.
pub(crate) fn api(ctx: &Context) -> Api<Secret> {
    Api::namespaced(ctx.host.clone(), ctx.host_ns())
}

/// Makes sure the host Secret `secret_name` holds a valid token of `pod`'s virtual service
/// account, bound to `pod`, for `audience` (None: the API server's own audience).
pub async fn ensure(ctx: &Context, pod: &Pod, secret_name: &str, audience: Option<&str>) -> Result<()> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    // Created blind: on the pod-creation path the Secret is almost always new, and a look first
    // would be one more host request per pod.
    let secret = issue(ctx, pod, secret_name, audience).await?;
    let pp = crate::sync::post_params();
    match api(ctx).create(&pp, &secret).await {
        Ok(_) => {
            ctx.metrics.wrote(KIND, "create");
            schedule_renewal(ctx, &secret.metadata);
            return Ok(());
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let Some(current) = api(ctx).get_metadata_opt(secret_name).await? else {
        // Gone again in between: the next reconcile creates it.
        return Err(SyncError::Raced(format!("token Secret {secret_name}")));
    };
    match ctx.tr.owner(&current.metadata) {
        // Ours and good; one left by an earlier pod of the same name is replaced (its token is
        // void), and so is one that expires soon.
        Some(o) if o.is(KIND, ns, name) => {
            if o.uid == uid && !expires_soon(ctx, &current.metadata, || pod.clone()) {
                schedule_renewal(ctx, &current.metadata);
                return Ok(());
            }
            let current = Secret { metadata: current.metadata, ..Default::default() };
            let meta = secret.metadata.clone();
            sync::replace_host(ctx, KIND, &current, secret).await?;
            schedule_renewal(ctx, &meta);
            Ok(())
        }
        _ => Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns()))),
    }
}

/// Makes the host Secret `secret_name` free for `pod`'s token before its host copy is created:
/// absent, or this pod's; one left by an earlier pod of the same name is deleted (as read), so
/// the kubelet waits for the new token rather than mounting a void one; anyone else's is a
/// [`SyncError::Collision`]. Metadata only.
pub async fn clear_for(ctx: &Context, pod: &Pod, secret_name: &str) -> Result<()> {
    let (ns, name) = crate::informer::key_of(pod);
    let Some(s) = api(ctx).get_metadata_opt(secret_name).await? else { return Ok(()) };
    match ctx.tr.owner(&s.metadata) {
        Some(o) if o.is(KIND, &ns, &name) => {
            if Some(&o.uid) != pod.metadata.uid.as_ref()
                && delete_exactly(&api(ctx), &s.metadata, None, Exactly::AsRead).await?
            {
                ctx.metrics.wrote(KIND, "delete");
            }
            Ok(())
        }
        _ => Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns()))),
    }
}

/// With `TokenDelivery::BoundSecret`: once `pod` is bound, and while it or its host copy `host`
/// has not started (the host kubelet waits for them), its token Secrets are written, or found,
/// once per run.
pub async fn ensure_bound(ctx: &Context, pod: &Pod, host: &Pod) -> Result<()> {
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let pending = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Pending");
    if ctx.opts.token_delivery != crate::context::TokenDelivery::BoundSecret
        || !bound
        || !(pending(pod) || pending(host))
    {
        return Ok(());
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if ctx.bound_tokens.lock().unwrap_or_else(|e| e.into_inner()).contains(&uid) {
        return Ok(());
    }
    for (secret, audience) in crate::pods::translate::token_secrets(&ctx.tr, pod) {
        ensure(ctx, pod, &secret, audience.as_deref()).await?;
    }
    ctx.bound_tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
    Ok(())
}

/// A fresh token Secret for `pod`.
async fn issue(ctx: &Context, pod: &Pod, secret_name: &str, audience: Option<&str>) -> Result<Secret> {
    let issued = request(ctx, pod, audience).await?;
    let mut meta = pods_secret_meta(ctx, KIND, pod, secret_name);
    let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
    if let Some((expires, renew_at)) = issued.expires {
        ann.insert(ANNOTATION_TOKEN_EXPIRES.into(), expires.to_string());
        ann.insert(ANNOTATION_TOKEN_RENEW_AT.into(), renew_at.to_string());
    }
    if let Some(a) = audience {
        ann.insert(ANNOTATION_TOKEN_AUDIENCE.into(), a.to_string());
    }
    Ok(Secret {
        metadata: meta,
        data: Some([("token".to_string(), ByteString(issued.token.into_bytes()))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

/// A token as issued, and when it expires and is due for renewal.
struct Issued {
    token: String,
    expires: Option<(Timestamp, Timestamp)>,
}

/// How long a token for `audience` lives: what the pod's projections of it ask for (the shortest
/// `expirationSeconds`), within `--token-lifetime`. The default projection's 3607 s for the API
/// server's own audience, which the API server extends to a year, gets the whole lifetime.
fn lifetime(limits: &TokenLifetime, pod: &Pod, audience: Option<&str>) -> Duration {
    let asked = translate::token_expirations(pod, audience)
        .into_iter()
        .filter(|s| audience.is_some() || *s != EXTENDED_EXPIRATION_SECONDS)
        .min();
    asked.map_or(limits.lifetime, |s| limits.lifetime.min(Duration::from_secs(s.max(0) as u64)))
}

/// The `expirationSeconds` the API server extends to a year for its own audience (the
/// ServiceAccount admission plugin's default projection).
const EXTENDED_EXPIRATION_SECONDS: i64 = 3607;

/// When a token issued at `now` expiring at `expires` is due for renewal: `--token-renew-before`
/// before its end if it lives `--token-lifetime`; a shorter one (its projection asked for less, or
/// the API server gave less) at 80 % of its life, as a kubelet renews.
fn renew_at(limits: &TokenLifetime, now: Timestamp, expires: Timestamp) -> Timestamp {
    // Whole seconds, as the API server counts them (its expiry is its issue second + the life).
    let life = Duration::from_secs((expires.as_second() - now.as_second()).max(0) as u64);
    // A minute's slack: the API server counts the lifetime from its own clock.
    let full = life + Duration::from_secs(60) >= limits.lifetime;
    let before = if full { limits.renew_before } else { life / 5 };
    expires - k8s_openapi::jiff::SignedDuration::from_secs(before.as_secs() as i64)
}

/// A token of `pod`'s virtual service account bound to `pod`, for `audience` (TokenRequest on
/// the virtual API server), and when it expires and is due for renewal.
async fn request(ctx: &Context, pod: &Pod, audience: Option<&str>) -> Result<Issued> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let sa = pod.spec.as_ref().map(crate::refs::service_account).unwrap_or_else(|| "default".into());
    let now = Timestamp::now();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(lifetime(&ctx.opts.tokens, pod, audience).as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.virt.clone(), ns);
    let issued = sas.create_token_request(&sa, &crate::sync::post_params(), &request).await?;
    let status = issued.status.ok_or_else(|| SyncError::NoToken(format!("{ns}/{sa}")))?;
    let token = status.token.ok_or_else(|| SyncError::NoToken(format!("{ns}/{sa}")))?;
    let expires = status.expiration_timestamp.map(|t| (t.0, renew_at(&ctx.opts.tokens, now, t.0)));
    Ok(Issued { token, expires })
}

/// Tokens delivered in annotations: the host pod annotations that give `pod` a fresh token per
/// audience its projections ask for, and when the first expires. Empty if it asks for none.
pub async fn pod_annotations(ctx: &Context, pod: &Pod) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut first: Option<(Timestamp, Timestamp)> = None;
    for audience in translate::token_audiences(pod) {
        let issued = request(ctx, pod, audience.as_deref()).await?;
        out.insert(translate::token_annotation(audience.as_deref()), issued.token);
        first = match (first, issued.expires) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.min(b.1))),
            (a, b) => a.or(b),
        };
    }
    if let (Some((expires, renew_at)), false) = (first, out.is_empty()) {
        out.insert(ANNOTATION_TOKEN_EXPIRES.into(), expires.to_string());
        out.insert(ANNOTATION_TOKEN_RENEW_AT.into(), renew_at.to_string());
    }
    Ok(out)
}

/// Tokens delivered in annotations, renewed if they expire soon: by a metadata patch of the host
/// pod of its own, so neither the pod's other updates (which the host may refuse) nor a refused or
/// terminating pod hold it up. Returns the host pod as it now is. A renewal that fails is told on
/// the virtual pod and tried again in a minute; one due before the next resync is queued. Pods
/// whose tokens are in Secrets have nothing to renew here.
pub async fn renew_pod_annotations(ctx: &Context, v: &Pod, h: Arc<Pod>) -> Arc<Pod> {
    let Some(have) = h.metadata.annotations.as_ref().filter(|a| a.contains_key(ANNOTATION_TOKEN_EXPIRES)) else {
        return h;
    };
    if !expires_soon(ctx, &h.metadata, || v.clone()) {
        schedule_pod_renewal(ctx, v, have);
        return h;
    }
    match renew_in_annotations(ctx, v, &h).await {
        Ok(renewed) => {
            if let Some(a) = renewed.metadata.annotations.as_ref() {
                schedule_pod_renewal(ctx, v, a);
            }
            Arc::new(renewed)
        }
        Err(e) => {
            let note = format!("the pod's service-account token could not be renewed (tried again in a minute): {e}");
            sync::warn(ctx, v, "TokenNotRenewed", &note).await;
            ctx.queues.of::<Pod>().add_after(crate::informer::key_of(v), SOONEST_RENEWAL);
            h
        }
    }
}

async fn renew_in_annotations(ctx: &Context, v: &Pod, h: &Pod) -> Result<Pod> {
    let fresh = pod_annotations(ctx, v).await?;
    let name = h.metadata.name.as_deref().unwrap_or_default();
    sync::spend(ctx, crate::pods::KIND, name)?;
    let patch = MetadataPatch::annotations(fresh.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))));
    let api: Api<Pod> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let mut renewed = api.patch(name, &sync::patch_params(), &Patch::Merge(&patch)).await?;
    ctx.metrics.wrote(KIND, "renew");
    crate::pods::slim_host_pod(&mut renewed);
    Ok(renewed)
}

/// Gives the desired host pod the token annotations the host pod has, so its update leaves them
/// as they are (`renew_pod_annotations` renews them). The store holds their expiry, not their
/// values (`slim_host_pod`); a value it did hold would be kept as it is, never removed.
pub fn keep_pod_annotations(h: &ObjectMeta, desired: &mut ObjectMeta) {
    let kept = h.annotations.iter().flatten().filter(|(k, _)| is_pod_token_key(k));
    desired.annotations.get_or_insert_with(BTreeMap::new).extend(kept.map(|(k, v)| (k.clone(), v.clone())));
}

/// Whether a host pod annotation is one of the token annotations (values or expiry).
pub fn is_pod_token_key(key: &str) -> bool {
    key == ANNOTATION_TOKEN_EXPIRES
        || key == ANNOTATION_TOKEN_RENEW_AT
        || key.strip_prefix(ANNOTATION_POD_TOKEN).is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// Queues the pod's reconcile for the renewal of its annotation tokens if due before the next
/// resync (which looks at every pod).
pub fn schedule_pod_renewal(ctx: &Context, v: &Pod, annotations: &BTreeMap<String, String>) {
    if !annotations.contains_key(ANNOTATION_TOKEN_EXPIRES) {
        return;
    }
    let due = renewal_due_in(&ctx.opts.tokens, Some(annotations));
    if due < crate::RESYNC {
        ctx.queues.of::<Pod>().add_after(crate::informer::key_of(v), due.max(SOONEST_RENEWAL));
    }
}

/// How long until the token of this Secret (or the first of this host pod's annotation tokens)
/// is due for renewal (zero: now, or unknown): its renewal time, or for a token written without
/// one, `--token-renew-before` before its expiry.
fn renewal_due_in(limits: &TokenLifetime, annotations: Option<&BTreeMap<String, String>>) -> Duration {
    let at = |key: &str| annotations.and_then(|a| a.get(key)).and_then(|t| t.parse::<Timestamp>().ok());
    let left = |t: Timestamp| Duration::from_secs(t.duration_since(Timestamp::now()).as_secs().max(0) as u64);
    match (at(ANNOTATION_TOKEN_RENEW_AT), at(ANNOTATION_TOKEN_EXPIRES)) {
        (Some(renew), _) => left(renew),
        (None, Some(expires)) => left(expires).saturating_sub(limits.renew_before),
        (None, None) => Duration::ZERO,
    }
}

/// The metadata of a pod's own host Secret `secret_name` (owner kind `kind`): marked with the
/// pod's identity only (its labels and annotations are the pod's business, not the Secret's), and
/// labelled so the Secret mirror leaves it alone and the sweep here finds it.
pub(crate) fn pods_secret_meta(ctx: &Context, kind: &str, pod: &Pod, secret_name: &str) -> ObjectMeta {
    let identity = ObjectMeta {
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    };
    let mut meta = ctx.tr.host_meta(kind, &identity);
    meta.name = Some(secret_name.to_string());
    meta.labels.get_or_insert_with(BTreeMap::new).insert(LABEL_TOKEN.into(), "true".into());
    meta
}

/// Writes a pod's own host Secret of owner kind `kind` (trust bundles, certificates): created if
/// there is no `current` one, else replaced (the caller checked `current` is ours).
pub(crate) async fn write_pods_secret(
    ctx: &Context,
    kind: &'static str,
    current: Option<Secret>,
    desired: Secret,
) -> Result<()> {
    let Some(current) = current else {
        return match api(ctx).create(&sync::post_params(), &desired).await {
            Ok(_) => {
                ctx.metrics.wrote(kind, "create");
                Ok(())
            }
            // Written meanwhile (the sweep and the pod's reconcile): compared again on the retry.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Err(SyncError::Raced(format!("{kind} Secret {}", desired.metadata.name.unwrap_or_default())))
            }
            Err(e) => Err(e.into()),
        };
    };
    sync::replace_host(ctx, kind, &current, desired).await
}

/// Whether the token(s) written with `meta` (a token Secret's, or a host pod's with annotation
/// delivery) are due for renewal now. Those written before tokens had a renewal time all lived
/// `--token-lifetime`, whatever their pod asked: renewed once if it asks for a shorter one (the
/// Secret's audience; any of the pod's for annotations, which hold them all). `pod` is read only
/// for those.
fn expires_soon(ctx: &Context, meta: &ObjectMeta, pod: impl FnOnce() -> Pod) -> bool {
    due_now(&ctx.opts.tokens, meta, pod)
}

fn due_now(limits: &TokenLifetime, meta: &ObjectMeta, pod: impl FnOnce() -> Pod) -> bool {
    let annotations = meta.annotations.as_ref();
    let written_before_renewal_times = annotations
        .is_some_and(|a| a.contains_key(ANNOTATION_TOKEN_EXPIRES) && !a.contains_key(ANNOTATION_TOKEN_RENEW_AT));
    if renewal_due_in(limits, annotations).is_zero() {
        return true;
    }
    if !written_before_renewal_times {
        return false;
    }
    let pod = pod();
    let shorter = |audience: Option<&str>| lifetime(limits, &pod, audience) < limits.lifetime;
    if meta.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_TOKEN)) {
        shorter(annotations.and_then(|a| a.get(ANNOTATION_TOKEN_AUDIENCE)).map(String::as_str))
    } else {
        translate::token_audiences(&pod).iter().any(|a| shorter(a.as_deref()))
    }
}

/// Queues the renewal of a token due before the next sweep would find it (short lifetimes); the
/// sweep finds the others, so the default year-long tokens hold no timer each. Never sooner than
/// a minute: a token the API server issued shorter than asked (its maximum expiration) would
/// otherwise be renewed in a loop.
fn schedule_renewal(ctx: &Context, meta: &ObjectMeta) {
    let due = renewal_due_in(&ctx.opts.tokens, meta.annotations.as_ref());
    if let (true, Some(name)) = (due < crate::RESYNC, meta.name.clone()) {
        ctx.queues.tokens.add_after(name, due.max(SOONEST_RENEWAL));
    }
}

const SOONEST_RENEWAL: Duration = Duration::from_secs(60);

/// The owner kinds of a pod's own Secrets, swept here.
fn is_pods_own(kind: &str) -> bool {
    [KIND, crate::trust_bundles::KIND, crate::pod_certificates::KIND].contains(&kind)
}

/// The virtual pod a pod's Secret of ours was written for, if it still exists.
fn pod_of(ctx: &Context, meta: &ObjectMeta) -> Option<std::sync::Arc<crate::compact::Compact<Pod>>> {
    let owner = ctx.tr.owner(meta).filter(|o| is_pods_own(&o.kind))?;
    let pod = ctx.stores.virt::<Pod>().get(&ObjectRef::new(&owner.name).within(&owner.namespace))?;
    (pod.metadata.uid.as_deref() == Some(owner.uid.as_str())).then_some(pod)
}

/// A pod's host Secret `secret_name`: a token renewed if it expires soon, trust bundles
/// refreshed, while the pod exists; removed if its pod is gone.
pub async fn reconcile(ctx: &Context, secret_name: String) -> Result<Action> {
    let Some(current) = api(ctx).get_metadata_opt(&secret_name).await? else { return Ok(Action::Done) };
    let Some(owner) = ctx.tr.owner(&current.metadata).filter(|o| is_pods_own(&o.kind)) else {
        return Ok(Action::Done);
    };
    if let Some(pod) = pod_of(ctx, &current.metadata) {
        if owner.kind == crate::trust_bundles::KIND {
            crate::trust_bundles::ensure(ctx, &pod.load()).await?;
        } else if owner.kind == crate::pod_certificates::KIND {
            // Refreshed on the pod's upward path, which knows whether it is due.
            ctx.queues.upward::<Pod>().add((owner.namespace, owner.name));
        } else if expires_soon(ctx, &current.metadata, || pod.load()) {
            let audience =
                current.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_TOKEN_AUDIENCE)).cloned();
            ensure(ctx, &pod.load(), &secret_name, audience.as_deref()).await?;
        } else {
            schedule_renewal(ctx, &current.metadata);
        }
        return Ok(Action::Done);
    }
    // Its pod is gone (or is a newer pod of the same name, whose own reconcile replaces the
    // Secret): deleted only as read, so a replacement made meanwhile stays.
    if delete_exactly(&api(ctx), &current.metadata, None, Exactly::AsRead).await? {
        ctx.metrics.wrote(KIND, "delete");
    }
    Ok(Action::Done)
}

/// Lists this virtual cluster's pods' Secrets (metadata only, a page at a time) and queues those
/// whose pod is gone, whose token expires soon, or that hold trust bundles (looked at again).
pub async fn sweep(ctx: &Context) {
    if let Err(e) = sweep_pages(ctx).await {
        tracing::warn!(error = %e, "listing token Secrets failed; they are swept again at the next resync");
    }
}

async fn sweep_pages(ctx: &Context) -> Result<()> {
    let mut lp = ListParams::default().labels(&ctx.tr.cluster_selector()).limit(500);
    // The pods whose certificate Secrets are there.
    let mut certified = std::collections::HashSet::new();
    loop {
        let page = api(ctx).list_metadata(&lp).await?;
        for s in &page.items {
            let Some(owner) = ctx.tr.owner(&s.metadata).filter(|o| is_pods_own(&o.kind)) else { continue };
            if owner.kind == crate::pod_certificates::KIND && pod_of(ctx, &s.metadata).is_some() {
                // Refreshed on the pod's upward path, which knows what is due.
                certified.insert(owner.uid.clone());
                ctx.queues.upward::<Pod>().add((owner.namespace, owner.name));
                continue;
            }
            let act = owner.kind != KIND
                || pod_of(ctx, &s.metadata).is_none_or(|p| expires_soon(ctx, &s.metadata, || p.load()));
            match (act, s.metadata.name.clone()) {
                (true, Some(name)) => ctx.queues.tokens.add(name),
                // A token due before the next sweep (a restart lost its timer): queued for its time.
                (false, Some(_)) => schedule_renewal(ctx, &s.metadata),
                _ => {}
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(next) => lp = lp.continue_token(&next),
            None => break,
        }
    }
    let pods = ctx.stores.virt::<Pod>();
    let alive = |(ns, name): &crate::context::Key, uid: &str| {
        pods.get(&ObjectRef::new(name).within(ns)).is_some_and(|p| p.metadata.uid.as_deref() == Some(uid))
    };
    for lost in ctx.pod_certificates.prune(alive, &certified) {
        ctx.queues.upward::<Pod>().add(lost);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn limits() -> TokenLifetime {
        TokenLifetime { lifetime: Duration::from_secs(365 * DAY), renew_before: Duration::from_secs(30 * DAY) }
    }

    fn pod(projections: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {
            "containers": [{"name": "c"}],
            "volumes": [{"name": "v", "projected": {"sources": projections}}]}}))
        .unwrap()
    }

    #[test]
    fn tokens_live_as_long_as_their_projections_ask_within_the_lifetime() {
        let p = pod(serde_json::json!([
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"serviceAccountToken": {"path": "vault", "audience": "vault", "expirationSeconds": 900}},
            {"serviceAccountToken": {"path": "vault-2", "audience": "vault", "expirationSeconds": 600}},
            {"serviceAccountToken": {"path": "other", "audience": "other"}},
        ]));
        let l = limits();
        assert_eq!(lifetime(&l, &p, None), l.lifetime, "the default projection: a year, as the API server extends it");
        assert_eq!(lifetime(&l, &p, Some("vault")), Duration::from_secs(600), "the shortest asked");
        assert_eq!(lifetime(&l, &p, Some("other")), l.lifetime, "none asked");
        let own = pod(serde_json::json!([{"serviceAccountToken": {"path": "t", "expirationSeconds": 1200}}]));
        assert_eq!(lifetime(&l, &own, None), Duration::from_secs(1200), "not the extended default: as asked");
        let long = pod(
            serde_json::json!([{"serviceAccountToken": {"path": "t", "audience": "a", "expirationSeconds": 999_999_999}}]),
        );
        assert_eq!(lifetime(&l, &long, Some("a")), l.lifetime, "never beyond --token-lifetime");
    }

    #[test]
    fn short_tokens_are_renewed_at_80_percent_of_their_life_long_ones_a_margin_before_the_end() {
        let l = limits();
        let now: Timestamp = "2026-12-06T00:00:00Z".parse().unwrap();
        let at = |secs: i64| now + k8s_openapi::jiff::SignedDuration::from_secs(secs);
        assert_eq!(renew_at(&l, now, at(600)), at(480));
        assert_eq!(renew_at(&l, now, at(3600)), at(2880));
        assert_eq!(renew_at(&l, now, at(365 * DAY as i64)), at(335 * DAY as i64), "30 days before a year's end");
        assert_eq!(renew_at(&l, now, now), now, "an expired one: now");
        let admin = TokenLifetime { lifetime: Duration::from_secs(600), renew_before: Duration::from_secs(540) };
        assert_eq!(renew_at(&admin, now, at(599)), at(59), "the admin's --token-renew-before for the full lifetime");
    }

    #[test]
    fn tokens_written_before_renewal_times_are_renewed_once_if_their_pod_asks_for_shorter_ones() {
        let l = limits();
        let in_days = |d: i64| (Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(24 * d)).to_string();
        let default_only =
            || pod(serde_json::json!([{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]));
        let short = || {
            pod(serde_json::json!([
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"serviceAccountToken": {"path": "vault", "audience": "vault", "expirationSeconds": 600}},
            ]))
        };
        let meta = |pairs: &[(&str, String)], secret: bool| ObjectMeta {
            annotations: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
            labels: secret.then(|| [(LABEL_TOKEN.to_string(), "true".to_string())].into()),
            ..Default::default()
        };
        let old = [(ANNOTATION_TOKEN_EXPIRES, in_days(300))];
        let vault = [(ANNOTATION_TOKEN_EXPIRES, in_days(300)), (ANNOTATION_TOKEN_AUDIENCE, "vault".into())];
        assert!(due_now(&l, &meta(&vault, true), short), "a year-long vault token where the pod asks for 10 minutes");
        assert!(!due_now(&l, &meta(&old, true), short), "that pod's default token: its year is what it asks");
        assert!(due_now(&l, &meta(&old, false), short), "annotations hold every audience's token");
        assert!(!due_now(&l, &meta(&old, false), default_only), "the default projection's token alone");
        let current = [(ANNOTATION_TOKEN_EXPIRES, in_days(300)), (ANNOTATION_TOKEN_RENEW_AT, in_days(1))];
        assert!(!due_now(&l, &meta(&current, false), || panic!(
            "the pod is read only for tokens without a renewal time"
        )));
        let ending = [(ANNOTATION_TOKEN_EXPIRES, in_days(10))];
        assert!(due_now(&l, &meta(&ending, true), default_only), "within --token-renew-before of its end, as before");
    }
}
