//! PersistentVolumeClaims: the claim is made on the host, where the storage is, if it asks only
//! for storage the admin allows (`policy::storage`); its status (bound, capacity) flows back.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec};
use kube::api::{Api, Patch};

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
        Ok(PersistentVolumeClaim {
            metadata: ctx.tr.host_meta(Self::KIND, &v.metadata),
            spec: Some(spec),
            status: None,
        })
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

    async fn back(ctx: &Context, v: &Self, h: &Self) -> Result<()> {
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
