//! What the virtual cluster shows of the host's cluster-wide classes the platform admin lists
//! (StorageClasses `--storage-classes`, PriorityClasses `--priority-classes`, RuntimeClasses
//! `--runtime-classes`, IngressClasses `--ingress-classes`), as the host has them, kept in step every minute with the views of host
//! volumes bound to claims (`claims`).
//!
//! Tenants see what they may use, and the virtual API server checks what names them against
//! its own copy (a claim's growth, a pod's priority). The copies are read-only views, made again
//! from the host at every pass ([`HostView::view`] leaves out what names the host's internals):
//! a tenant's edit is undone, a copy whose class left the list or the host is deleted, and an
//! object of the tenant's own under a listed name is left alone. A class the control plane may
//! not read (the chart grants `get` on the listed ones) keeps the copy it has.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::ClusterResourceScope;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use serde::{Serialize, de::DeserializeOwned};

use crate::context::Context;
use crate::policy::Policy;
use vkube_core::contract::LABEL_FROM_HOST;

/// The labels of what the syncer shows of the host (class copies, volume views).
pub fn labels() -> BTreeMap<String, String> {
    [(LABEL_FROM_HOST.to_string(), "true".to_string())].into()
}

/// Whether the syncer made this object (only those are changed or deleted).
pub fn is_from_host(labels: &BTreeMap<String, String>) -> bool {
    labels.get(LABEL_FROM_HOST).is_some_and(|v| v == "true")
}

/// A cluster-wide host kind the virtual cluster shows by name.
pub trait HostView:
    kube::Resource<Scope = ClusterResourceScope, DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Where the admin lists the names, for the log (the flag and the chart value).
    const LISTED_BY: &'static str;
    /// The names the admin lists.
    fn listed(policy: &Policy) -> &[String];
    /// The virtual copy of a host object (pure), labelled with [`labels`].
    fn view(host: &Self, policy: &Policy) -> Self;
    /// Whether the current copy differs from the desired one in what the view holds.
    fn differs(desired: &Self, current: &Self) -> bool;
    /// Whether they differ in what the API server does not let change (made again to change it).
    fn fixed_differs(desired: &Self, current: &Self) -> bool;
}

/// Keeps the views in step with the host every `every`, from the start (the first pass told in
/// `Context::classes_shown`); never returns.
pub async fn keep_in_step(ctx: &Context, every: Duration) {
    pass(ctx).await;
    ctx.classes_shown.notify_one();
    loop {
        tokio::time::sleep(every).await;
        pass(ctx).await;
    }
}

/// What translating a pod needs of the host's classes, read before the syncer's workers start
/// (a pod translated before it would be refused by the host for an absent PriorityClass, or held
/// off a node its RuntimeClass's tolerations and node selector let it onto). Host reads only: the
/// views, which the tenant's webhooks can slow, are left to [`keep_in_step`].
pub async fn read_classes(ctx: &Context) {
    use k8s_openapi::api::{node::v1::RuntimeClass, scheduling::v1::PriorityClass};
    read::<PriorityClass>(ctx).await;
    let classes = read::<RuntimeClass>(ctx).await;
    crate::nodes::runtime_classes_read(ctx, &classes.objects, &classes.unread);
}

/// One pass over every kind.
async fn pass(ctx: &Context) {
    use k8s_openapi::api::{networking::v1::IngressClass, node::v1::RuntimeClass};
    use k8s_openapi::api::{scheduling::v1::PriorityClass, storage::v1::StorageClass};
    show::<StorageClass>(ctx).await;
    show::<PriorityClass>(ctx).await;
    // What the host has is kept whatever becomes of the views (the tenant may block them).
    let classes = read::<RuntimeClass>(ctx).await;
    crate::nodes::runtime_classes_read(ctx, &classes.objects, &classes.unread);
    show_read(ctx, classes).await;
    show::<IngressClass>(ctx).await;
    if let Err(e) = crate::claims::sweep_views(ctx).await {
        tracing::warn!(error = %e, "deleting the views of volumes whose claim is gone failed; retrying");
    }
}

/// One pass for a kind: [`read`], then [`show_read`].
async fn show<K: HostView>(ctx: &Context) {
    let listed = read::<K>(ctx).await;
    show_read(ctx, listed).await;
}

/// The listed host objects of a kind, as read.
struct Listed<K> {
    /// Those the host has.
    objects: BTreeMap<String, K>,
    /// Those that could not be read (not readable: no `get` on them, the host not answering).
    unread: BTreeSet<String>,
}

/// Reads the listed host objects of a kind by name, and records those the host lacks
/// (`Context::absent_classes`).
async fn read<K: HostView>(ctx: &Context) -> Listed<K> {
    let kind = K::KIND;
    let listed = K::listed(&ctx.policy);
    let host: Api<K> = Api::all(ctx.host.clone());
    let (mut objects, mut unread) = (BTreeMap::new(), BTreeSet::new());
    for name in listed {
        match host.get_opt(name).await {
            Ok(Some(h)) => {
                objects.insert(name.clone(), h);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(kind, name = %name, error = %e, listed_by = K::LISTED_BY,
                    "reading a listed host object failed (the control plane needs get on it; the chart grants it for the names listed)");
                unread.insert(name.clone());
            }
        }
    }
    let mut absent = ctx.absent_classes.write().unwrap_or_else(|e| e.into_inner());
    absent.retain(|(k, _)| *k != kind);
    let missing = listed.iter().filter(|n| !objects.contains_key(*n) && !unread.contains(*n));
    absent.extend(missing.map(|n| (kind, n.clone())));
    drop(absent);
    Listed { objects, unread }
}

/// [`try_show`], a failure logged (tried again at the next pass).
async fn show_read<K: HostView>(ctx: &Context, listed: Listed<K>) {
    if let Err(e) = try_show::<K>(ctx, listed).await {
        tracing::warn!(kind = K::KIND, error = %e, "showing the listed host objects in the virtual cluster failed; retrying");
    }
}

/// Makes the virtual copies of the listed host objects match the host's, and deletes the
/// copies of those no longer listed or on the host. A copy that fails is logged, and the others
/// go on.
async fn try_show<K: HostView>(ctx: &Context, listed: Listed<K>) -> kube::Result<()> {
    let kind = K::KIND;
    let virt: Api<K> = Api::all(ctx.virt.clone());
    let Listed { objects, unread } = listed;
    let mut desired: BTreeMap<String, K> =
        objects.into_iter().map(|(name, h)| (name, K::view(&h, &ctx.policy))).collect();
    let pp = crate::sync::post_params();
    let failed = |name: &str, e: kube::Error| {
        tracing::warn!(kind, name = %name, error = %e, "keeping a virtual copy of a host object in step failed; retrying at the next pass");
    };
    for current in virt.list(&ListParams::default()).await?.items {
        let name = current.name_any();
        let ours = is_from_host(current.labels());
        match desired.remove(&name) {
            Some(_) if !ours => {
                tracing::info!(kind, name = %name, "the tenant has one of this name; left as it is")
            }
            Some(mut d) if K::differs(&d, &current) => {
                let written = if K::fixed_differs(&d, &current) {
                    match virt.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => virt.create(&pp, &d).await,
                        Err(e) => Err(e),
                    }
                } else {
                    d.meta_mut().resource_version = current.meta().resource_version.clone();
                    virt.replace(&name, &pp, &d).await
                };
                match written {
                    Ok(_) => tracing::info!(kind, name = %name, "virtual copy of a host object updated"),
                    Err(e) => failed(&name, e),
                }
            }
            Some(_) => {}
            None if ours && !unread.contains(&name) => match virt.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(kind, name = %name, "virtual copy of a host object no longer listed or on the host deleted")
                }
                Err(e) => failed(&name, e),
            },
            None => {}
        }
    }
    for d in desired.into_values() {
        match virt.create(&pp, &d).await {
            Ok(_) => tracing::info!(kind, name = %d.name_any(), "host object shown in the virtual cluster"),
            Err(e) => failed(&d.name_any(), e),
        }
    }
    Ok(())
}
