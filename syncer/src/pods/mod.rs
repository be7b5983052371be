//! Pods: the virtual pod runs as its host copy; scheduling, status and deletion flow back.
//!
//! The syncer plays the kubelet's part for the virtual cluster. Two paths, each with its queue:
//! - downward ([`down`], on virtual changes): the host copy is created from the translated virtual
//!   pod ([`translate`]), kept in line with it ([`patch`]), and deleted with it;
//! - upward ([`up`], on host changes): the virtual pod is bound to the node its host copy landed
//!   on, shows its status ([`status`]), and its deletion is finished once the copy is gone.
//!
//! A host status change thus never translates the virtual pod again, and a virtual change that
//! the host copy already carries (the echo of the upward path's own writes) is not sent down.

pub mod down;
pub mod patch;
pub mod status;
pub mod translate;
pub mod up;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;

use vkube_core::contract::{ANNOTATION_TOKEN_EXPIRES, ANNOTATION_TOKEN_RENEW_AT};

use crate::compact::Compact;
use crate::context::{Context, Key};
use crate::informer::{Change, key_of};
use crate::kind::SyncedKind;
use crate::queue::Action;
use crate::refs::{self, RefKind};
use crate::sync::Result;

pub const KIND: &str = "Pod";

impl SyncedKind for Pod {
    const KIND: &'static str = KIND;
    type Virtual = Pod;
    type VirtualStored = Compact<Pod>;
    type Host = Pod;
    type HostStored = Compact<Pod>;
    const SLIM_HOST: Option<fn(&mut Pod)> = Some(slim_host_pod);
    const UPWARD_QUEUE: Option<&'static str> = Some("PodStatus");

    /// The copy's addresses are kept (`pod_ips`): when one is taken or given up, the tenant's
    /// Endpoints and EndpointSlices naming it are looked at again.
    fn on_host_change(c: &Context, h: &Pod, change: Change) {
        let ours = c.tr.owner(&h.metadata).is_some_and(|o| o.kind == KIND);
        let ips = if ours && change != Change::Deleted { crate::pod_ips::of(h) } else { vec![] };
        crate::endpoints::requeue(c, c.pod_ips.set(h.metadata.name.as_deref().unwrap_or_default(), ips));
        crate::kind::enqueue_owner(c, &h.metadata);
    }

    /// What a pod uses (configmaps, secrets, claims, its node) is synced while it is used, if
    /// the pod itself may reach the host, and its token Secrets go with it. The pod goes down
    /// unless its host copy already carries this state, and up (its binding and status are
    /// compared again: the tenant may have written them).
    fn on_virtual_change(c: &Context, p: &Pod, change: Change) {
        let (ns, name) = key_of(p);
        let changed = match change {
            Change::Deleted => {
                // (Tokens in annotations go with the host pod; Secrets left from before the
                // admin switched to them are found by the sweep.)
                if c.opts.token_delivery.in_secrets() {
                    for (secret, _) in translate::token_secrets(&c.tr, p) {
                        c.queues.tokens.add(secret);
                    }
                    c.bound_tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(p.metadata.uid.as_deref().unwrap_or_default());
                }
                if !crate::trust_bundles::projections(p).is_empty() {
                    c.queues.tokens.add(crate::trust_bundles::secret_name(&c.tr, &ns, &name));
                }
                if !crate::pod_certificates::projections(p).is_empty() {
                    c.queues.tokens.add(crate::pod_certificates::secret_name(&c.tr, &ns, &name));
                    c.pod_certificates.forget(p.metadata.uid.as_deref().unwrap_or_default());
                }
                c.carried.forget(&(ns.clone(), name.clone()));
                c.refs.remove(&ns, &name)
            }
            // A pod the policy refuses never reaches the host: neither does what it refers to.
            Change::Applied | Change::Listed => {
                let allowed =
                    p.spec.as_ref().is_some_and(|s| c.policy.check_pod(p.metadata.annotations.as_ref(), s).is_ok());
                let mut used = if allowed { refs::pod_refs(p) } else { Default::default() };
                if allowed && c.policy.scheduling.virtual_scheduler {
                    // Placed here, its ephemeral volumes are the virtual cluster's claims (see
                    // `translate::volume`).
                    used.extend(refs::ephemeral_claims(p).map(|n| (RefKind::PersistentVolumeClaim, n)));
                }
                c.refs.update(&ns, &name, used)
            }
        };
        for (kind, tns, tname) in changed {
            match kind {
                RefKind::ConfigMap => c.queues.of::<k8s_openapi::api::core::v1::ConfigMap>().add((tns, tname)),
                RefKind::Secret => c.queues.of::<k8s_openapi::api::core::v1::Secret>().add((tns, tname)),
                RefKind::PersistentVolumeClaim => {
                    c.queues.of::<k8s_openapi::api::core::v1::PersistentVolumeClaim>().add((tns, tname))
                }
                RefKind::Node => c.queues.nodes.add(tname),
            }
        }
        let key = (ns, name);
        let carried = change == Change::Applied && c.carried.get(&key).is_some_and(|r| r.fingerprint == fingerprint(p));
        if change != Change::Deleted {
            c.queues.upward::<Pod>().add(key.clone());
        }
        if !carried {
            c.queues.of::<Pod>().add(key);
        }
    }

    fn reconcile(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        down::reconcile(ctx, key)
    }

    fn reflect(ctx: &Context, key: Key) -> impl Future<Output = Result<Action>> + Send {
        up::reflect(ctx, key)
    }
}

/// Every projected volume source of a pod: (its volume's name, its place among the volume's
/// sources, the source).
pub fn projected_sources(
    v: &Pod,
) -> impl Iterator<Item = (&str, usize, &k8s_openapi::api::core::v1::VolumeProjection)> {
    let volumes = v.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    volumes.flat_map(|vol| {
        let sources = vol.projected.iter().flat_map(|p| p.sources.iter().flatten());
        sources.enumerate().map(|(index, s)| (vol.name.as_str(), index, s))
    })
}

/// What the downward path last found or made a host copy carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// The [`fingerprint`] of the virtual pod the host copy carries.
    pub fingerprint: u64,
    /// The virtual pod's generation it carries,
    pub generation: Option<i64>,
    /// from this generation of the host copy on (its writes bumped it).
    pub host_generation: Option<i64>,
}

/// [`Carried`] by virtual pod, kept in memory (after a restart, the downward path of every
/// listed pod fills it again).
#[derive(Default)]
pub struct CarriedIndex(Mutex<HashMap<Key, Carried>>);

impl CarriedIndex {
    pub fn get(&self, key: &Key) -> Option<Carried> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied()
    }

    /// Records what the host copy of `key` carries; true if that changed.
    pub fn record(&self, key: &Key, c: Carried) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), c) != Some(c)
    }

    pub fn forget(&self, key: &Key) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// What of a virtual pod the downward path carries to an existing host copy, hashed: the pod's
/// identity and generation (its spec), labels, annotations, whether it is being deleted, and the
/// readiness-gate conditions its tenant sets. Status the upward path writes is not in it.
pub fn fingerprint(p: &Pod) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let m = &p.metadata;
    (&m.uid, m.generation, &m.labels, &m.annotations, m.deletion_timestamp.is_some()).hash(&mut h);
    let gates = status::gate_types(p);
    for c in p.status.iter().flat_map(|s| s.conditions.iter().flatten()).filter(|c| gates.contains(&c.type_)) {
        (&c.type_, &c.status, &c.reason).hash(&mut h);
    }
    h.finish()
}

/// The fields of a host pod the syncer keeps in memory (the rest of the spec is the virtual
/// pod's, translated, and never needed again): metadata, the node, container names, images and resources,
/// the fields that may change after creation, and the status. Applied to the host pod watch.
pub fn slim_host_pod(p: &mut Pod) {
    // Token values (tokens delivered in annotations): a kilobyte per pod the syncer never reads
    // back, and which an update then cannot write back stale. Their expiry and renewal time stay.
    if let Some(a) = p.metadata.annotations.as_mut() {
        a.retain(|k, _| {
            k == ANNOTATION_TOKEN_EXPIRES || k == ANNOTATION_TOKEN_RENEW_AT || !crate::tokens::is_pod_token_key(k)
        });
    }
    if let Some(spec) = p.spec.take() {
        let slim = |c: &k8s_openapi::api::core::v1::Container| k8s_openapi::api::core::v1::Container {
            name: c.name.clone(),
            image: c.image.clone(),
            resources: c.resources.clone(),
            ..Default::default()
        };
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            // Its addresses are the node's then (`pod_ips`).
            host_network: spec.host_network,
            containers: spec.containers.iter().map(slim).collect(),
            init_containers: spec.init_containers.map(|cs| cs.iter().map(slim).collect()),
            active_deadline_seconds: spec.active_deadline_seconds,
            tolerations: spec.tolerations,
            scheduling_gates: spec.scheduling_gates,
            ephemeral_containers: spec.ephemeral_containers.map(|cs| {
                cs.into_iter()
                    .map(|c| k8s_openapi::api::core::v1::EphemeralContainer { name: c.name, ..Default::default() })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_no_token_value_but_its_expiry() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({"metadata": {"annotations": {
            "vkube.dev/sa-token": "jwt", "vkube.dev/sa-token-0123456789abcdef": "jwt2",
            "vkube.dev/token-expires": "2027-01-01T00:00:00Z", "vkube.dev/sa-tokens": "not ours to drop",
            "vkube.dev.t.vkube.dev/sa-token": "the tenant's own"}}}))
        .unwrap();
        slim_host_pod(&mut p);
        let kept: Vec<&str> = p.metadata.annotations.as_ref().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(kept, ["vkube.dev.t.vkube.dev/sa-token", "vkube.dev/sa-tokens", "vkube.dev/token-expires"]);
    }

    /// An update of a host pod whose tokens are annotations (as the store holds it: no values)
    /// leaves its tokens alone, even when the annotations' patch sends every wanted entry.
    #[test]
    fn an_update_neither_removes_nor_rewrites_the_tokens() {
        let ann =
            |entries: &[(&str, &str)]| Some(entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let expiry = ("vkube.dev/token-expires", "2027-01-01T00:00:00Z");
        let mut h = Pod::default();
        h.metadata.annotations = ann(&[("t.vkube.dev/a", "1"), expiry, ("vkube.dev/sa-token", "jwt")]);
        slim_host_pod(&mut h);
        let mut desired = Pod::default();
        desired.metadata.annotations = ann(&[("t.vkube.dev/a", "1"), ("t.vkube.dev/new", "2")]);
        crate::tokens::keep_pod_annotations(&h.metadata, &mut desired.metadata);
        let patch = patch::host_pod_patch(&desired, &h).expect("the new annotation");
        let sent = serde_json::to_value(patch.metadata.unwrap().annotations.unwrap()).unwrap();
        assert_eq!(sent, serde_json::json!({"t.vkube.dev/a": "1", "t.vkube.dev/new": "2", expiry.0: expiry.1}));
    }
}
