//! What the virtual cluster shows of the host's storage, kept in step every minute: the
//! StorageClasses the platform admin lets claims name (`--storage-classes`), as the host has
//! them, and the views of host volumes bound to claims (`claims`), swept once their claim is
//! gone.
//!
//! Classes: tenants see what they may use, a claim naming no class gets the class the host would
//! give it (the host's default, marked default here too when the admin lists it), and a claim
//! can grow where the host class allows it (the virtual API server checks that against its own
//! copy of the class). The copies are read-only views, made again from the host at every pass:
//! parameters are left out (they may name the host's Secrets; allowed topologies, node labels
//! a virtual scheduler needs, stay), a
//! tenant's edit is undone, a copy whose class left the list or the host is deleted, and a class
//! of the tenant's own under a listed name is left alone. A class the control plane may not read
//! (the chart grants `get` on the listed ones) keeps the copy it has.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};

use crate::context::Context;
use vkube_core::contract::LABEL_FROM_HOST;

/// The labels of what the syncer shows of the host's storage (class copies, volume views).
pub fn from_host_labels() -> std::collections::BTreeMap<String, String> {
    [(LABEL_FROM_HOST.to_string(), "true".to_string())].into()
}

/// Whether the syncer made this object (only those are changed or deleted).
pub fn is_from_host(labels: &std::collections::BTreeMap<String, String>) -> bool {
    labels.get(LABEL_FROM_HOST).is_some_and(|v| v == "true")
}

/// The annotations that make a class the default (the beta one is still read by the API server).
const DEFAULT_CLASS: [&str; 2] =
    ["storageclass.kubernetes.io/is-default-class", "storageclass.beta.kubernetes.io/is-default-class"];

/// Keeps the views in step with the host every `every`, from the start; never returns.
pub async fn keep_in_step(ctx: &Context, every: Duration) {
    loop {
        if let Err(e) = classes(ctx).await {
            tracing::warn!(error = %e, "showing the host's StorageClasses in the virtual cluster failed; retrying");
        }
        if let Err(e) = crate::claims::sweep_views(ctx).await {
            tracing::warn!(error = %e, "deleting the views of volumes whose claim is gone failed; retrying");
        }
        tokio::time::sleep(every).await;
    }
}

async fn classes(ctx: &Context) -> kube::Result<()> {
    let host: Api<StorageClass> = Api::all(ctx.host.clone());
    let virt: Api<StorageClass> = Api::all(ctx.virt.clone());
    let mut desired = BTreeMap::new();
    let mut unread = BTreeSet::new();
    for name in &ctx.policy.storage.classes {
        match host.get_opt(name).await {
            Ok(Some(h)) => {
                desired.insert(name.clone(), view(&h));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(class = %name, error = %e,
                    "reading a listed host StorageClass failed (the control plane needs get on it; the chart grants it for policy.storageClasses)");
                unread.insert(name.clone());
            }
        }
    }
    let pp = crate::sync::post_params();
    for current in virt.list(&ListParams::default()).await?.items {
        let name = current.name_any();
        let ours = is_from_host(current.labels());
        match desired.remove(&name) {
            Some(_) if !ours => {
                tracing::info!(class = %name, "the tenant has a StorageClass of this name; left as it is")
            }
            Some(mut d) if differs(&d, &current) => {
                if fixed_differs(&d, &current) {
                    virt.delete(&name, &DeleteParams::default()).await?;
                    virt.create(&pp, &d).await?;
                } else {
                    d.metadata.resource_version = current.metadata.resource_version.clone();
                    virt.replace(&name, &pp, &d).await?;
                }
                tracing::info!(class = %name, "virtual copy of a host StorageClass updated");
            }
            Some(_) => {}
            None if ours && !unread.contains(&name) => {
                virt.delete(&name, &DeleteParams::default()).await?;
                tracing::info!(class = %name, "virtual copy of a StorageClass no longer listed or on the host deleted");
            }
            None => {}
        }
    }
    for d in desired.into_values() {
        virt.create(&pp, &d).await?;
        tracing::info!(class = %d.name_any(), "host StorageClass shown in the virtual cluster");
    }
    Ok(())
}

/// The virtual copy of a host class (pure).
pub fn view(h: &StorageClass) -> StorageClass {
    let default = DEFAULT_CLASS.iter().any(|k| h.annotations().get(*k).is_some_and(|v| v == "true"));
    StorageClass {
        metadata: ObjectMeta {
            name: h.metadata.name.clone(),
            labels: Some(from_host_labels()),
            annotations: default.then(|| [(DEFAULT_CLASS[0].to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        provisioner: h.provisioner.clone(),
        reclaim_policy: h.reclaim_policy.clone(),
        volume_binding_mode: h.volume_binding_mode.clone(),
        allow_volume_expansion: h.allow_volume_expansion,
        mount_options: h.mount_options.clone(),
        parameters: None,
        allowed_topologies: h.allowed_topologies.clone(),
    }
}

/// Whether the current copy differs from the desired one in what the view holds.
fn differs(d: &StorageClass, c: &StorageClass) -> bool {
    d.metadata.labels != c.metadata.labels
        || d.metadata.annotations != c.metadata.annotations
        || d.allow_volume_expansion != c.allow_volume_expansion
        || d.mount_options != c.mount_options
        || fixed_differs(d, c)
}

/// Whether they differ in what the API server does not let change (made again to change it).
fn fixed_differs(d: &StorageClass, c: &StorageClass) -> bool {
    // The API server defaults the reclaim policy and binding mode; the host's copy has them set.
    d.provisioner != c.provisioner
        || d.reclaim_policy != c.reclaim_policy
        || d.volume_binding_mode != c.volume_binding_mode
        || d.parameters.as_ref().is_some_and(|p| !p.is_empty()) != c.parameters.as_ref().is_some_and(|p| !p.is_empty())
        || d.allowed_topologies != c.allowed_topologies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(annotations: &[(&str, &str)]) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some("fast".into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                labels: Some([("team".to_string(), "storage".to_string())].into()),
                ..Default::default()
            },
            provisioner: "ebs.csi.aws.com".into(),
            reclaim_policy: Some("Delete".into()),
            volume_binding_mode: Some("WaitForFirstConsumer".into()),
            allow_volume_expansion: Some(true),
            parameters: Some([("csi.storage.k8s.io/provisioner-secret-name".to_string(), "keys".to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_view_keeps_what_tenants_use_and_not_the_hosts_parameters() {
        let v = view(&host(&[("note", "internal")]));
        assert_eq!(v.provisioner, "ebs.csi.aws.com");
        assert_eq!(v.allow_volume_expansion, Some(true));
        assert_eq!(v.volume_binding_mode.as_deref(), Some("WaitForFirstConsumer"));
        assert_eq!(v.parameters, None, "parameters may name the host's Secrets");
        assert_eq!(v.metadata.annotations, None, "the host's own annotations stay there");
        assert_eq!(v.metadata.labels, Some([(LABEL_FROM_HOST.to_string(), "true".to_string())].into()));
        assert!(is_from_host(v.labels()));
    }

    #[test]
    fn the_hosts_default_is_the_default_here_too() {
        for key in DEFAULT_CLASS {
            let v = view(&host(&[(key, "true")]));
            assert_eq!(v.annotations().get(DEFAULT_CLASS[0]).map(String::as_str), Some("true"), "{key}");
        }
        assert_eq!(view(&host(&[(DEFAULT_CLASS[0], "false")])).metadata.annotations, None);
    }

    #[test]
    fn an_edit_is_undone_and_a_changed_provisioner_makes_the_copy_again() {
        let d = view(&host(&[]));
        let mut edited = d.clone();
        edited.allow_volume_expansion = Some(false);
        assert!(differs(&d, &edited) && !fixed_differs(&d, &edited));
        let mut moved = d.clone();
        moved.provisioner = "other".into();
        assert!(differs(&d, &moved) && fixed_differs(&d, &moved));
        assert!(!differs(&d, &d.clone()));
    }
}
