//! The shape every synced kind shares: classify the host copy (absent, ours, stale, someone
//! else's), never touch what is not ours, tell the tenant why with a Warning event.

use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vkube_kubeclient::delete::{Exactly, delete_exactly};

use crate::context::Context;
use crate::metrics::ErrorLabel;
use crate::naming::Owner;
use crate::policy::Refusal;

pub use vkube_core::contract::PENDING_UID;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// A host object of that name exists and is not ours (host watches only see ours).
    #[error("host object {0} exists and is not managed by this virtual cluster")]
    Collision(String),
    /// An object changed under our feet between two requests; the retry sees it as it is now.
    #[error("{0} changed while being written; retrying")]
    Raced(String),
    /// The virtual API server answered a TokenRequest without a token.
    #[error("the TokenRequest for {0} was answered without a token")]
    NoToken(String),
    /// This host object was written as often as a minute allows ([`crate::budget`]).
    #[error("{0} was written too often in the last minute; backing off")]
    Throttled(String),
    /// The host refused to create the copy (its quota, limit ranges, admission webhooks): the
    /// message is the host's, with host names replaced by virtual ones.
    #[error("the host cluster refused it: {message}")]
    HostRefused { code: u16, reason: &'static str, message: String },
}

impl ErrorLabel for SyncError {
    fn label(&self) -> &'static str {
        match self {
            SyncError::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            SyncError::Kube(kube::Error::Api(e)) if e.code == 404 => "not_found",
            SyncError::Kube(kube::Error::Api(e)) if e.code == 403 => "forbidden",
            SyncError::Kube(kube::Error::Api(e)) if e.code == 422 => "invalid",
            SyncError::Kube(kube::Error::Api(_)) => "api",
            SyncError::Kube(_) => "transport",
            SyncError::Collision(_) => "collision",
            SyncError::Raced(_) => "raced",
            SyncError::NoToken(_) => "no_token",
            SyncError::HostRefused { .. } => "host_refused",
            SyncError::Throttled(_) => "throttled",
        }
    }
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The host copy of a virtual object, as found.
pub enum HostCopy<K> {
    Absent,
    /// Ours, mirroring exactly this virtual object.
    Ours(Arc<K>),
    /// Ours, but left by an earlier virtual object of the same name (or a pending one to adopt).
    Stale(Arc<K>),
    /// Not ours: never modified or deleted.
    Foreign(Arc<K>),
}

pub fn host_get<K>(store: &Store<K>, ctx: &Context, host_name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(host_name).within(ctx.host_ns()))
}

/// Where the host copy stands relative to the virtual object (`kind`, `namespace`, `name`,
/// `uid`). A host object of ours whose uid is [`PENDING_UID`] counts as ours (it is adopted).
pub fn classify<K: Resource>(
    ctx: &Context,
    h: Option<Arc<K>>,
    kind: &str,
    ns: &str,
    name: &str,
    uid: &str,
) -> HostCopy<K> {
    let Some(h) = h else { return HostCopy::Absent };
    match ctx.tr.owner(h.meta()) {
        Some(o) if o.is(kind, ns, name) => {
            if o.uid == uid || o.uid == PENDING_UID {
                HostCopy::Ours(h)
            } else {
                HostCopy::Stale(h)
            }
        }
        _ => HostCopy::Foreign(h),
    }
}

/// Whether a host object is ours and mirrors the virtual object `kind` `ns`/`name` (any uid).
pub fn mirrors<K: Resource>(ctx: &Context, h: &K, kind: &str, ns: &str, name: &str) -> Option<Owner> {
    ctx.tr.owner(h.meta()).filter(|o| o.is(kind, ns, name))
}

pub use vkube_kubeclient::params::{patch_params, post_params};

/// Spends one write on host object `name` of `kind`, or says to back off.
pub fn spend(ctx: &Context, kind: &'static str, name: &str) -> Result<()> {
    match ctx.budget.spend(kind, name, std::time::Instant::now()) {
        crate::budget::Spend::Allowed => Ok(()),
        crate::budget::Spend::Capped { first } => {
            if first {
                ctx.metrics.write_capped.get_or_create(&crate::metrics::KindLabel { kind }).inc();
                tracing::warn!(kind, name, "host object written too often; backing off");
            }
            Err(SyncError::Throttled(format!("{kind} {}/{name}", ctx.host_ns())))
        }
    }
}

/// Deletes a host object we own (by name, with a uid precondition so nothing else is hit). One
/// already being deleted (held by a finalizer) is left to finish: its removal brings us back.
pub async fn delete_host<K>(ctx: &Context, kind: &'static str, h: &K, grace: Option<i64>) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    delete_host_exactly(ctx, kind, h, grace, Exactly::Object).await
}

/// Like [`delete_host`], with `Exactly::AsRead`: not if it changed since it was read.
pub async fn delete_host_exactly<K>(
    ctx: &Context,
    kind: &'static str,
    h: &K,
    grace: Option<i64>,
    exactly: Exactly,
) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if h.meta().deletion_timestamp.is_some() {
        return Ok(());
    }
    spend(ctx, kind, h.meta().name.as_deref().unwrap_or_default())?;
    let api: Api<K> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let grace = grace.map(|g| g.max(0) as u32);
    if delete_exactly(&api, h.meta(), grace, exactly).await? {
        ctx.metrics.wrote(kind, "delete");
    }
    Ok(())
}

/// Creates a host object; says whether this call created it. If one of that name exists it is
/// checked: ours (a race with our own earlier write) is fine, the host watch brings it; anything
/// else is a [`SyncError::Collision`] (host watches select our objects only, so a foreign one is
/// first met here).
pub async fn create_host<K>(ctx: &Context, kind: &'static str, desired: &K) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let name = desired.meta().name.clone().unwrap_or_default();
    spend(ctx, kind, &name)?;
    match api.create(&post_params(), desired).await {
        Ok(_) => {
            ctx.metrics.wrote(kind, "create");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get_opt(&name).await?;
            let want = ctx.tr.owner(desired.meta());
            let found = existing.as_ref().and_then(|o| ctx.tr.owner(o.meta()));
            match (want, found) {
                (Some(w), Some(o)) if o.is(&w.kind, &w.namespace, &w.name) => Ok(false),
                // Gone again in between: the next reconcile creates it.
                _ if existing.is_none() => Ok(false),
                _ => Err(SyncError::Collision(format!("{}/{name}", ctx.host_ns()))),
            }
        }
        Err(e) => Err(refused_or(ctx, desired.meta(), e)),
    }
}

/// A host refusal of a write (forbidden: quota, admission, webhook; invalid) as
/// [`SyncError::HostRefused`], in the tenant's names; other errors as they are.
fn refused_or(
    ctx: &Context,
    desired: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    e: kube::Error,
) -> SyncError {
    match e {
        kube::Error::Api(e) if matches!(e.code, 403 | 422) => {
            let name = desired.name.as_deref().unwrap_or_default();
            let virtual_name = ctx.tr.owner(desired).map(|o| o.name).unwrap_or_default();
            SyncError::HostRefused {
                code: e.code,
                reason: refusal_reason(&e),
                message: e.message.replace(name, &virtual_name).replace(ctx.host_ns(), "(host namespace)"),
            }
        }
        e => e.into(),
    }
}

/// What kind of host refusal an API error is, for the metric.
fn refusal_reason(e: &kube::core::Status) -> &'static str {
    if e.message.contains("exceeded quota") {
        "quota"
    } else if e.message.contains("admission webhook") {
        "webhook"
    } else if e.code == 403 {
        "forbidden"
    } else {
        "invalid"
    }
}

/// Tells the tenant why a create did not happen: a collision (Warning, slow retry) or a host
/// refusal (Warning quoting the host, retried with the queue's backoff: the quota may free up).
pub async fn or_told<V: Resource<DynamicType = ()>, T>(
    ctx: &Context,
    kind: &'static str,
    v: &V,
    r: Result<T>,
) -> Result<crate::queue::Action> {
    match r {
        Ok(_) => Ok(crate::queue::Action::Done),
        Err(SyncError::Collision(name)) => {
            collision(ctx, v, name.rsplit('/').next().unwrap_or_default()).await;
            Ok(crate::queue::Action::RequeueAfter(std::time::Duration::from_secs(300)))
        }
        Err(e @ SyncError::HostRefused { .. }) => {
            told_refused(ctx, kind, v, &e).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Tells the tenant why an update of a host copy did not happen: a host refusal is told and
/// tried again in 5 minutes (the tenant often cannot take the change back: a claim does not
/// shrink), not at the backoff's pace, which would repeat the write and the Warning twice a
/// minute for good.
pub async fn or_told_update<V: Resource<DynamicType = ()>>(
    ctx: &Context,
    kind: &'static str,
    v: &V,
    r: Result<()>,
) -> Result<crate::queue::Action> {
    match r {
        Err(e @ SyncError::HostRefused { .. }) => {
            told_refused(ctx, kind, v, &e).await;
            Ok(crate::queue::Action::RequeueAfter(std::time::Duration::from_secs(300)))
        }
        other => other.map(|_| crate::queue::Action::Done),
    }
}

async fn told_refused<V: Resource<DynamicType = ()>>(ctx: &Context, kind: &'static str, v: &V, e: &SyncError) {
    if let SyncError::HostRefused { reason, .. } = e {
        ctx.metrics.host_refused.get_or_create(&crate::metrics::RefusalLabels { kind, reason }).inc();
    }
    warn(ctx, v, "HostRefused", &e.to_string()).await;
}

/// Replaces a host object we own with `desired` (carrying the current resourceVersion).
pub async fn replace_host<K>(ctx: &Context, kind: &'static str, current: &K, mut desired: K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    spend(ctx, kind, &current.name_any())?;
    let (meta, have) = (desired.meta_mut(), current.meta());
    meta.resource_version = have.resource_version.clone();
    meta.uid = have.uid.clone();
    // What the host's machinery holds it by (a claim's `pvc-protection`, which keeps its volume
    // while a pod uses it) stays: the syncer never sets either.
    meta.finalizers = have.finalizers.clone();
    meta.owner_references = have.owner_references.clone();
    let api: Api<K> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    api.replace(&current.name_any(), &post_params(), &desired).await.map_err(|e| refused_or(ctx, desired.meta(), e))?;
    ctx.metrics.wrote(kind, "update");
    Ok(())
}

/// A Warning event on a virtual object: how the tenant learns why something is not synced.
pub async fn warn<K: Resource<DynamicType = ()>>(ctx: &Context, v: &K, reason: &str, message: &str) {
    let reference: ObjectReference = v.object_ref(&());
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(message, 1000)),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, reason, "could not record an event in the virtual cluster");
    }
}

/// Reports a refusal by the isolation policy.
pub async fn refuse<K: Resource<DynamicType = ()>>(ctx: &Context, kind: &'static str, v: &K, r: &Refusal) {
    ctx.metrics.refused.get_or_create(&crate::metrics::KindLabel { kind }).inc();
    tracing::info!(kind, namespace = ?v.meta().namespace, name = ?v.meta().name, reason = r.reason, "refused");
    warn(ctx, v, r.reason, &r.message).await;
}

/// Reports a host object with the same name that vkube does not own.
pub async fn collision<K: Resource<DynamicType = ()>>(ctx: &Context, v: &K, host_name: &str) {
    warn(
        ctx,
        v,
        "HostNameConflict",
        &format!(
            "a host object {}/{host_name} exists that this virtual cluster does not own; it is left alone and this object is not synced (rename it, or ask the host admin)",
            ctx.host_ns()
        ),
    )
    .await;
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
