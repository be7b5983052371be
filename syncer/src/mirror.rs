//! Kinds whose host copy is a translated copy of the virtual object, kept in step and removed
//! when the virtual object goes or is no longer wanted: configmaps, secrets, endpoints, endpoint
//! slices, claims, network policies, ingresses. Every [`Mirror`] is a [`SyncedKind`] reconciled
//! here.

use std::fmt::Debug;
use std::future::Future;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::{Context, Key};
use crate::informer::Change;
use crate::kind::SyncedKind;
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::queue::Action;
use crate::sync::{self, HostCopy, Result};

pub trait Mirror:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;

    /// Which host objects the host watch sees (see [`SyncedKind::host_watch`]).
    fn host_watch(tr: &Translator) -> watcher::Config {
        crate::kind::owned_by_cluster(tr)
    }

    /// What a change of a virtual object enqueues (see [`SyncedKind::on_virtual_change`]).
    fn on_virtual_change(ctx: &Context, v: &Self, _change: Change) {
        ctx.queues.of::<Self>().add(crate::informer::key_of(v));
    }

    /// Whether this virtual object belongs on the host at all.
    fn wanted(_ctx: &Context, _v: &Self) -> bool {
        true
    }

    /// What the tenant is told about a live object that is not wanted on the host.
    fn not_wanted(_ctx: &Context, _v: &Self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The host copy (pure). `Err` keeps it off the host with a Warning event (and removes a copy
    /// made before, unless [`Mirror::KEEPS_A_REFUSED_COPY`]).
    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal>;

    /// Whether a host copy made before stays, as it is, when the object is refused now: the
    /// copy holds something of the tenant's that deleting would destroy (a claim's volume).
    const KEEPS_A_REFUSED_COPY: bool = false;

    /// Whether the current host copy differs from the desired one in what we manage.
    fn differs(desired: &Self, current: &Self) -> bool;

    /// Whether the current host copy, though it differs, stays as it is for now: looked at
    /// again in a second (not counted as pending work).
    fn hold(_ctx: &Context, _v: &Self, _current: &Self) -> bool {
        false
    }

    /// Whether a difference can only be fixed by deleting and recreating (immutable objects).
    fn needs_recreate(_current: &Self) -> bool {
        false
    }

    /// The update sent for a copy that differs: by default the desired copy whole; a kind whose
    /// host copy holds what the host filled in and will not let go (a claim's volume and class)
    /// carries the desired changes onto the current copy instead.
    fn update(desired: Self, _current: &Self) -> Self {
        desired
    }

    /// What goes with a virtual object deleted, besides its host copy (`host`, if it was still
    /// there): best effort, what the kind keeps must be swept otherwise too (deleted while the
    /// syncer was down).
    fn gone(_ctx: &Context, _ns: &str, _name: &str, _host: Option<&Self>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// What flows back to the virtual object once the host copy exists.
    fn back(_ctx: &Context, _v: &Self, _h: &Self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

impl<M: Mirror> SyncedKind for M {
    const KIND: &'static str = <M as Mirror>::KIND;
    type Virtual = M;
    type VirtualStored = M;
    type Host = M;
    type HostStored = M;

    fn host_watch(tr: &Translator) -> watcher::Config {
        <M as Mirror>::host_watch(tr)
    }

    fn on_virtual_change(ctx: &Context, v: &M, change: Change) {
        <M as Mirror>::on_virtual_change(ctx, v, change)
    }

    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        reconcile::<M>(ctx, key)
    }
}

async fn reconcile<M: Mirror>(ctx: &Context, (ns, name): Key) -> Result<Action> {
    let host_name = ctx.tr.host_name(&ns, &name);
    let v = ctx.stores.virt::<M>().get(&ObjectRef::new(&name).within(&ns));
    let h = sync::host_get(ctx.stores.host::<M>(), ctx, &host_name);
    let live = v.as_ref().filter(|v| v.meta().deletion_timestamp.is_none());
    if let Some(v) = live
        && !M::wanted(ctx, v)
    {
        M::not_wanted(ctx, v).await;
    }
    let wanted = live.filter(|v| M::wanted(ctx, v));
    let Some(v) = wanted else {
        let ours = h.filter(|h| sync::mirrors(ctx, h.as_ref(), M::KIND, &ns, &name).is_some());
        if let Some(h) = &ours {
            sync::delete_host(ctx, M::KIND, h.as_ref(), None).await?;
        }
        if v.is_none() {
            M::gone(ctx, &ns, &name, ours.as_deref()).await;
        }
        return Ok(Action::Done);
    };
    let uid = v.meta().uid.clone().unwrap_or_default();
    let desired = match M::host_copy(ctx, v) {
        Ok(d) => d,
        Err(r) => {
            match sync::classify(ctx, h, M::KIND, &ns, &name, &uid) {
                HostCopy::Ours(h) if M::KEEPS_A_REFUSED_COPY => M::back(ctx, v, &h).await?,
                HostCopy::Ours(h) | HostCopy::Stale(h) => sync::delete_host(ctx, M::KIND, h.as_ref(), None).await?,
                HostCopy::Absent | HostCopy::Foreign(_) => {}
            }
            sync::refuse(ctx, M::KIND, v.as_ref(), &r).await;
            return Ok(Action::Done);
        }
    };
    match sync::classify(ctx, h, M::KIND, &ns, &name, &uid) {
        HostCopy::Absent => {
            return sync::or_told(ctx, M::KIND, v.as_ref(), sync::create_host(ctx, M::KIND, &desired).await).await;
        }
        HostCopy::Foreign(_) => {
            sync::collision(ctx, v.as_ref(), &host_name).await;
            return Ok(Action::RequeueAfter(std::time::Duration::from_secs(300)));
        }
        HostCopy::Stale(h) => {
            sync::delete_host(ctx, M::KIND, h.as_ref(), None).await?;
            return Ok(Action::RequeueAfter(after_delete(h.as_ref())));
        }
        HostCopy::Ours(h) => {
            let mut desired = desired;
            ctx.tr.keep_host_keys(desired.meta_mut(), h.meta());
            if M::differs(&desired, &h) {
                if M::hold(ctx, v, &h) {
                    // Looked at again in a second from outside the queue: a held object is not
                    // work still to do, which the initial sync (and the health behind it) waits for.
                    let (queue, key) = (ctx.queues.of::<M>().clone(), (ns, name));
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        queue.add(key);
                    });
                    return Ok(Action::Done);
                }
                if M::needs_recreate(&h) {
                    sync::delete_host(ctx, M::KIND, h.as_ref(), None).await?;
                    return Ok(Action::RequeueAfter(after_delete(h.as_ref())));
                }
                let updated = sync::replace_host(ctx, M::KIND, h.as_ref(), M::update(desired, &h)).await;
                // A refused update is told and tried again later; the copy's state still flows back.
                let told = sync::or_told_update(ctx, M::KIND, v.as_ref(), updated).await;
                M::back(ctx, v, &h).await?;
                return told;
            }
            M::back(ctx, v, &h).await?;
        }
    }
    Ok(Action::Done)
}

/// When to look again after deleting a host copy so a new one can be made: soon, unless it was
/// already being deleted (held by a finalizer): then its removal event brings us back.
fn after_delete<K: Resource>(h: &K) -> std::time::Duration {
    if h.meta().deletion_timestamp.is_some() {
        std::time::Duration::from_secs(30)
    } else {
        std::time::Duration::from_millis(200)
    }
}

/// Labels and annotations as managed on host copies.
pub fn meta_differs<K: Resource>(desired: &K, current: &K) -> bool {
    desired.meta().labels != current.meta().labels || desired.meta().annotations != current.meta().annotations
}
