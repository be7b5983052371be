//! PersistentVolumeClaims: the claim is made on the host, where the storage is, if it asks only
//! for storage the admin allows (`policy::storage`); its status (bound, capacity) flows back, and
//! once the host has bound it the virtual claim is bound too, to a view of its host volume: a
//! virtual PersistentVolume of the same name (capacity, modes, class, node affinity; no source
//! but a placeholder), which `kubectl get pvc` shows and the virtual scheduler needs (a pod whose
//! claim is not bound there is never placed). The virtual scheduler's choice of node for a claim
//! waiting for its first consumer (`volume.kubernetes.io/selected-node`) reaches the host claim,
//! so the host provisions the volume where the pod will run.

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch};
use serde_json::json;

use crate::context::Context;
use crate::mirror::{Mirror, meta_differs};
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::refs::RefKind;
use crate::sync::Result;

impl Mirror for PersistentVolumeClaim {
    const KIND: &'static str = "PersistentVolumeClaim";

    /// A claim refused after it crossed (the admin took its class off the list, the tenant
    /// changed it) keeps its host copy: deleting it would delete the tenant's data.
    const KEEPS_A_REFUSED_COPY: bool = true;

    /// Host storage is provisioned once a pod uses the claim (or always, if the admin asks), and
    /// then kept while the virtual claim exists: a StatefulSet scaled to zero keeps its data.
    fn wanted(ctx: &Context, v: &Self) -> bool {
        let (ns, name) = crate::informer::key_of(v);
        ctx.opts.sync_all_claims
            || ctx.refs.is_used(RefKind::PersistentVolumeClaim, &ns, &name)
            || crate::sync::host_get(ctx.stores.host::<Self>(), ctx, &ctx.tr.host_name(&ns, &name)).is_some()
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        let ns = v.metadata.namespace.as_deref().unwrap_or_default();
        ctx.policy.check_claim(v)?;
        let spec = host_claim_spec(&ctx.tr, ns, v.spec.clone().unwrap_or_default());
        // The binding marks are ours (below), the node the virtual scheduler chose is the host's.
        let mut meta = v.metadata.clone();
        let marks = meta.annotations.as_mut().map(|a| {
            a.remove(BIND_COMPLETED);
            a.remove(BOUND_BY_CONTROLLER);
            a.remove(SELECTED_NODE)
        });
        let mut metadata = ctx.tr.host_meta(Self::KIND, &meta);
        if let Some(node) = marks.flatten().filter(|n| selectable(ctx, n)) {
            metadata.annotations.get_or_insert_default().insert(SELECTED_NODE.into(), node);
        }
        Ok(PersistentVolumeClaim { metadata, spec: Some(spec), status: None })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        // The spec is immutable but for the requested size and the attributes class (a storage
        // tier); labels and annotations follow.
        let (d_spec, c_spec) = (mutable_spec(d), mutable_spec(c));
        meta_differs(d, c) || d_spec != c_spec
    }

    /// The host filled in what the tenant left out (its default class, the volume bound), and
    /// the API server refuses any change to it: only what may change is carried over.
    fn update(desired: Self, current: &Self) -> Self {
        let (requests, attributes_class) = mutable_spec(&desired);
        let mut spec = current.spec.clone().unwrap_or_default();
        spec.resources.get_or_insert_default().requests = requests;
        spec.volume_attributes_class_name = attributes_class;
        PersistentVolumeClaim { metadata: desired.metadata, spec: Some(spec), status: None }
    }

    /// Its volume's view goes with it.
    async fn gone(ctx: &Context, ns: &str, name: &str, host: Option<&Self>) {
        if let Err(e) = drop_view(ctx, ns, name, host).await {
            tracing::warn!(namespace = ns, name, error = %e, "deleting the view of a deleted claim's volume failed; the from_host loop sweeps it");
        }
    }

    async fn back(ctx: &Context, v: &Self, h: &Self) -> Result<()> {
        bind(ctx, v, h, false).await?;
        // A host claim without a status yet has nothing to say.
        if v.status == h.status || h.status.is_none() {
            return Ok(());
        }
        let patch = Self { status: h.status.clone(), ..Default::default() };
        let api: Api<Self> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
        api.patch_status(
            v.metadata.name.as_deref().unwrap_or_default(),
            &crate::sync::patch_params(),
            &Patch::Merge(&patch),
        )
        .await?;
        ctx.metrics.wrote(Self::KIND, "status");
        Ok(())
    }
}

/// The marks of a claim bound by the persistent-volume controller, which the virtual scheduler
/// reads (the virtual cluster runs none: its claims are bound here).
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// The node a scheduler chose for a claim waiting for its first consumer.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The placeholder driver of the virtual views of host volumes: nothing mounts them.
pub const VIEW_DRIVER: &str = "host.vkube.dev";

/// Whether the virtual scheduler may choose this node for a claim: it places pods only on the
/// host nodes the admin allows, and nothing else names a node for a host claim.
fn selectable(ctx: &Context, node: &str) -> bool {
    ctx.policy.scheduling.virtual_scheduler && crate::pods::down::pod_nodes(ctx).contains(node)
}

/// Binds the virtual claim once the host has bound its copy (see the module's doc), and keeps
/// its view's size in step (a claim grown). The claim is bound once: a claim's volume never
/// changes. Costs nothing once done, until the host copy's size changes, unless `recheck` (the
/// view may be gone).
async fn bind(ctx: &Context, v: &PersistentVolumeClaim, h: &PersistentVolumeClaim, recheck: bool) -> Result<()> {
    let bound_on_host = h.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let Some(volume) = h.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty() && bound_on_host)
    else {
        return Ok(());
    };
    let bound_to = v.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or_default();
    if !bound_to.is_empty() && bound_to != volume {
        let msg = format!(
            "the claim names volume {bound_to} (written before: a restored or forked cluster), but the host bound it to {volume}: it runs on {volume}; recreate the claim to see that here"
        );
        crate::sync::warn(ctx, v, "VolumeNameConflict", &msg).await;
        return Ok(());
    }
    let done = bound_to == volume && v.annotations().contains_key(BIND_COMPLETED);
    let capacity = |c: &PersistentVolumeClaim| c.status.as_ref().and_then(|s| s.capacity.clone());
    if done && capacity(v) == capacity(h) && !recheck {
        return Ok(());
    }
    let volumes: Api<PersistentVolume> = Api::all(ctx.virt.clone());
    let phase = match volumes.get_opt(&volume).await? {
        Some(pv) if !is_view(&pv) => {
            let msg = format!(
                "the host bound this claim to volume {volume}, but a PersistentVolume of that name made in this cluster is in the way: the claim is shown unbound here (delete that PersistentVolume to have it bound)"
            );
            crate::sync::warn(ctx, v, "VolumeNameConflict", &msg).await;
            return Ok(());
        }
        Some(pv) => {
            let want = capacity(h);
            if want.is_some() && pv.spec.as_ref().and_then(|s| s.capacity.clone()) != want {
                let grown = json!({"spec": {"capacity": want}});
                volumes.patch(&volume, &crate::sync::patch_params(), &Patch::Merge(&grown)).await?;
            }
            pv.status.and_then(|s| s.phase)
        }
        None => {
            // The host volume's node affinity, if the control plane may read it (the chart
            // grants it with the virtual scheduler, the one reader of it here); a failed read is
            // tried again rather than leaving a view without it.
            let host = match Api::<PersistentVolume>::all(ctx.host.clone()).get_opt(&volume).await {
                Ok(pv) => pv,
                Err(kube::Error::Api(e)) if e.code == 403 => None,
                Err(e) => return Err(e.into()),
            };
            volumes.create(&crate::sync::post_params(), &volume_view(&volume, v, h, host.as_ref())).await?;
            ctx.metrics.wrote("PersistentVolume", "create");
            None
        }
    };
    if phase.as_deref() != Some("Bound") {
        let bound = json!({"status": {"phase": "Bound"}});
        volumes.patch_status(&volume, &crate::sync::patch_params(), &Patch::Merge(&bound)).await?;
    }
    if done {
        return Ok(());
    }
    // Preconditions: a claim recreated under this name meanwhile is not bound to this volume.
    let patch = json!({
        "metadata": {
            "uid": v.metadata.uid,
            "resourceVersion": v.metadata.resource_version,
            "annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"},
        },
        "spec": {"volumeName": volume},
    });
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
    api.patch(&v.name_any(), &crate::sync::patch_params(), &Patch::Merge(&patch)).await?;
    ctx.metrics.wrote(<PersistentVolumeClaim as Mirror>::KIND, "bind");
    Ok(())
}

/// Whether a virtual PersistentVolume is a view the syncer made.
fn is_view(pv: &PersistentVolume) -> bool {
    crate::from_host::is_from_host(pv.labels())
}

/// The virtual view of the host volume a claim is bound to (pure): what the tenant and the
/// virtual scheduler read of it, nothing of its source.
pub fn volume_view(
    name: &str,
    v: &PersistentVolumeClaim,
    h: &PersistentVolumeClaim,
    host: Option<&PersistentVolume>,
) -> PersistentVolume {
    let (hs, status) = (h.spec.clone().unwrap_or_default(), h.status.clone().unwrap_or_default());
    let host_spec = host.and_then(|p| p.spec.clone()).unwrap_or_default();
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(crate::from_host::labels()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: status.capacity.or(host_spec.capacity),
            access_modes: status.access_modes.or(host_spec.access_modes),
            storage_class_name: hs.storage_class_name,
            volume_mode: hs.volume_mode,
            volume_attributes_class_name: hs.volume_attributes_class_name,
            persistent_volume_reclaim_policy: host_spec.persistent_volume_reclaim_policy,
            node_affinity: host_spec.node_affinity,
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: v.metadata.namespace.clone(),
                name: v.metadata.name.clone(),
                uid: v.metadata.uid.clone(),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: VIEW_DRIVER.into(),
                volume_handle: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Deletes the view of a deleted claim's volume (the host copy names it).
async fn drop_view(ctx: &Context, ns: &str, name: &str, h: Option<&PersistentVolumeClaim>) -> kube::Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(ctx.virt.clone());
    let claim = (ns.to_string(), name.to_string());
    let candidates = match h.and_then(|h| h.spec.as_ref()).and_then(|s| s.volume_name.clone()) {
        Some(volume) => volumes.get_opt(&volume).await?.into_iter().collect(),
        // The host copy went first (held by its pods until they were gone).
        None => volumes.list(&views()).await?.items,
    };
    for pv in candidates.iter().filter(|pv| is_view(pv) && claim_of(pv) == claim) {
        delete_view(&volumes, pv).await?;
    }
    Ok(())
}

/// Selects the views.
fn views() -> kube::api::ListParams {
    kube::api::ListParams::default().labels(&format!("{}=true", vkube_core::contract::LABEL_FROM_HOST))
}

/// The claim a view was made for: (namespace, name).
fn claim_of(pv: &PersistentVolume) -> (String, String) {
    let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.clone()).unwrap_or_default();
    (claim.namespace.unwrap_or_default(), claim.name.unwrap_or_default())
}

/// Deletes the views whose claim is gone (or is another claim of the same name now), for those
/// [`drop_view`] missed (deleted while the syncer was down), and makes again those of bound
/// claims that the tenant deleted; run by the from_host loop.
pub async fn sweep_views(ctx: &Context) -> kube::Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(ctx.virt.clone());
    let claims = ctx.stores.virt::<PersistentVolumeClaim>();
    let all = volumes.list(&kube::api::ListParams::default()).await?.items;
    // A bound claim whose view went (the tenant deleted it): made again.
    let names: std::collections::BTreeSet<String> = all.iter().map(|pv| pv.name_any()).collect();
    for v in claims.state() {
        let volume = v.spec.as_ref().and_then(|s| s.volume_name.clone()).unwrap_or_default();
        if !v.annotations().contains_key(BIND_COMPLETED) || volume.is_empty() || names.contains(&volume) {
            continue;
        }
        let host_name = ctx.tr.host_name(&v.namespace().unwrap_or_default(), &v.name_any());
        let host = crate::sync::host_get(ctx.stores.host::<PersistentVolumeClaim>(), ctx, &host_name);
        // Only where the host bound it to that volume (not a claim restored with its old name).
        let host_volume = |h: &PersistentVolumeClaim| h.spec.as_ref().and_then(|s| s.volume_name.clone());
        if let Some(h) = host.filter(|h| host_volume(h).as_deref() == Some(volume.as_str()))
            && let Err(e) = bind(ctx, &v, &h, true).await
        {
            tracing::warn!(volume, error = %e, "making again the view of a bound claim's volume failed; retried at the next pass");
        }
    }
    for pv in all.into_iter().filter(is_view) {
        let (ns, name) = claim_of(&pv);
        let uid = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).and_then(|c| c.uid.clone());
        let current = claims.get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns));
        if current.is_none_or(|c| c.metadata.uid != uid)
            && let Err(e) = delete_view(&volumes, &pv).await
        {
            tracing::warn!(volume = %pv.name_any(), error = %e, "deleting the view of a volume whose claim is gone failed; retried at the next pass");
        }
    }
    Ok(())
}

/// Deletes a view, which the virtual API server holds while it is Bound (`pv-protection`);
/// already gone is done.
async fn delete_view(volumes: &Api<PersistentVolume>, pv: &PersistentVolume) -> kube::Result<()> {
    let name = pv.name_any();
    let gone = |r: kube::Result<()>| match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    };
    // Deleted first: an object being deleted gains no finalizer (the protection controller would
    // add its own again between a release and the deletion).
    gone(volumes.delete(&name, &DeleteParams::default()).await.map(drop))?;
    let none = json!({"metadata": {"finalizers": null}});
    gone(volumes.patch(&name, &crate::sync::patch_params(), &Patch::Merge(&none)).await.map(drop))
}

/// What of a claim's spec may change once it is made: the requested size, the attributes class.
type MutableSpec = (
    Option<std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    Option<String>,
);

fn mutable_spec(c: &PersistentVolumeClaim) -> MutableSpec {
    let spec = c.spec.as_ref();
    (
        spec.and_then(|s| s.resources.as_ref()).and_then(|r| r.requests.clone()),
        spec.and_then(|s| s.volume_attributes_class_name.clone()),
    )
}

/// A virtual claim's spec as the host's (pure; ephemeral volumes' templates use it too): claims
/// on other claims are translated; volumes and selectors naming host objects are not the
/// tenant's to choose.
pub fn host_claim_spec(tr: &Translator, ns: &str, vs: PersistentVolumeClaimSpec) -> PersistentVolumeClaimSpec {
    let data_source = vs.data_source.map(|mut d| {
        d.name = tr.host_name(ns, &d.name);
        d
    });
    let data_source = data_source.filter(|d| d.kind == "PersistentVolumeClaim" && d.api_group.is_none());
    PersistentVolumeClaimSpec {
        access_modes: vs.access_modes,
        resources: vs.resources,
        storage_class_name: vs.storage_class_name,
        volume_mode: vs.volume_mode,
        volume_attributes_class_name: vs.volume_attributes_class_name,
        data_source_ref: data_source.clone().map(|d| k8s_openapi::api::core::v1::TypedObjectReference {
            api_group: d.api_group,
            kind: d.kind,
            name: d.name,
            namespace: None,
        }),
        data_source,
        selector: None,
        volume_name: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_of_a_host_volume_shows_its_placement_and_size_not_its_source() {
        let claim = |v: serde_json::Value| -> PersistentVolumeClaim { serde_json::from_value(v).unwrap() };
        let v = claim(serde_json::json!({"metadata": {"name": "data", "namespace": "db", "uid": "u-1"}}));
        let h = claim(serde_json::json!({
            "metadata": {"name": "data-x-db-x-team"},
            "spec": {"storageClassName": "fast", "volumeMode": "Filesystem", "volumeName": "pvc-9"},
            "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"]},
        }));
        let host: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-9"},
            "spec": {"capacity": {"storage": "3Gi"}, "nfs": {"server": "10.0.0.9", "path": "/exports/team"},
                     "persistentVolumeReclaimPolicy": "Retain",
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions":
                         [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}]}}},
        }))
        .unwrap();
        let view = serde_json::to_value(volume_view("pvc-9", &v, &h, Some(&host))).unwrap();
        let spec = &view["spec"];
        assert_eq!(spec["capacity"]["storage"], "2Gi", "the size the host claim shows (which follows it as it grows)");
        assert_eq!(spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0], "z1");
        assert_eq!(spec["claimRef"]["uid"], "u-1");
        assert_eq!(
            (&spec["storageClassName"], &spec["persistentVolumeReclaimPolicy"]),
            (&"fast".into(), &"Retain".into())
        );
        assert_eq!(spec["csi"]["driver"], VIEW_DRIVER);
        assert!(spec.get("nfs").is_none() && !view.to_string().contains("10.0.0.9"), "nothing of the source: {view}");
        // Unreadable host volume: what the claim says of it.
        let view = serde_json::to_value(volume_view("pvc-9", &v, &h, None)).unwrap();
        assert_eq!(
            (&view["spec"]["capacity"]["storage"], &view["spec"]["accessModes"][0]),
            (&"2Gi".into(), &"ReadWriteOnce".into())
        );
    }
}
