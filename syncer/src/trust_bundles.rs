//! ClusterTrustBundles projected into pods, answered from the VIRTUAL cluster as a kubelet
//! answers them from its own: the host's bundles are never read for a tenant. A pod's projections
//! (`projected.sources[].clusterTrustBundle`, by name or by signer and label selector) become
//! items of one host Secret of the pod's own, written before the pod and looked at again with
//! every sweep of the pods' Secrets (a changed bundle reaches the pod within a resync).
//!
//! As the kubelet: the certificates of the bundles selected are deduplicated and written as PEM
//! (sorted, where the kubelet shuffles them once per start); a projection that matches nothing is
//! an empty file if optional, and otherwise its key is left out of the Secret, so the host
//! kubelet cannot mount the volume and the pod does not start.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{ClusterTrustBundleProjection, Pod, Secret};
use kube::api::{Api, ListParams};

use crate::context::Context;
use crate::naming::Translator;
use crate::sync::{Result, SyncError};

/// The owner kind our marks give a pod's trust-bundle Secret.
pub const KIND: &str = "ClusterTrustBundle";

/// The host Secret holding pod `pod`'s projected trust bundles.
pub fn secret_name(tr: &Translator, namespace: &str, pod: &str) -> String {
    format!("{}-ctb", tr.host_name(namespace, pod))
}

/// The key one projection's bundle is kept under in that Secret: the same query, the same key.
pub fn key(src: &ClusterTrustBundleProjection) -> String {
    let query = serde_json::json!([src.name, src.signer_name, src.label_selector, src.optional]);
    format!("bundle-{}", vkube_core::naming::short_hash(&query.to_string()))
}

/// The pod's trust-bundle projections.
pub fn projections(v: &Pod) -> Vec<&ClusterTrustBundleProjection> {
    crate::pods::projected_sources(v).filter_map(|(_, _, s)| s.cluster_trust_bundle.as_ref()).collect()
}

/// What a kubelet writes for `src` given the cluster's `bundles`: None when the pod must not
/// start (nothing matches a projection that is not optional).
pub fn anchors(src: &ClusterTrustBundleProjection, bundles: &[ClusterTrustBundle]) -> Option<String> {
    use kube::core::{Selector, SelectorExt};
    let selected: Vec<&ClusterTrustBundle> = match (&src.name, &src.signer_name) {
        (Some(name), _) => bundles.iter().filter(|b| b.metadata.name.as_ref() == Some(name)).collect(),
        (None, Some(signer)) => {
            // As the kubelet: no selector matches nothing, an empty one everything.
            let selector = src.label_selector.clone().and_then(|s| Selector::try_from(s).ok());
            let empty = BTreeMap::new();
            bundles
                .iter()
                .filter(|b| b.spec.signer_name.as_ref() == Some(signer))
                .filter(|b| selector.as_ref().is_some_and(|s| s.matches(b.metadata.labels.as_ref().unwrap_or(&empty))))
                .collect()
        }
        (None, None) => vec![],
    };
    if selected.is_empty() {
        return src.optional.unwrap_or(false).then(String::new);
    }
    let certificates: BTreeSet<Vec<u8>> = selected
        .iter()
        .flat_map(|b| pem::parse_many(b.spec.trust_bundle.as_bytes()).unwrap_or_default())
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Some(certificates.into_iter().map(|der| pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)).collect())
}

/// The Secret's data for the pod's projections from the cluster's `bundles` (a key left out: a
/// required projection that matches nothing).
pub fn data(v: &Pod, bundles: &[ClusterTrustBundle]) -> BTreeMap<String, ByteString> {
    projections(v)
        .into_iter()
        .filter_map(|src| Some((key(src), ByteString(anchors(src, bundles)?.into_bytes()))))
        .collect()
}

/// Makes sure the pod's trust-bundle Secret holds what the virtual cluster's bundles say now.
pub async fn ensure(ctx: &Context, pod: &Pod) -> Result<()> {
    if projections(pod).is_empty() {
        return Ok(());
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let secret_name = secret_name(&ctx.tr, ns, name);
    // Few and cluster-wide: read when a pod needs them rather than watched by every cluster.
    let bundles = Api::<ClusterTrustBundle>::all(ctx.virt.clone()).list(&ListParams::default()).await?.items;
    let meta = crate::tokens::pods_secret_meta(ctx, KIND, pod, &secret_name);
    let desired =
        Secret { metadata: meta, data: Some(data(pod, &bundles)), type_: Some("Opaque".into()), ..Default::default() };
    let api: Api<Secret> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let current = api.get_opt(&secret_name).await?;
    if let Some(c) = &current {
        match ctx.tr.owner(&c.metadata) {
            Some(o) if o.is(KIND, ns, name) => {
                if o.uid == pod.metadata.uid.clone().unwrap_or_default() && c.data == desired.data {
                    return Ok(());
                }
            }
            _ => return Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns()))),
        }
    }
    crate::tokens::write_pods_secret(ctx, KIND, current, desired).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec![cn.into()]).unwrap().self_signed(&key).unwrap().pem()
    }

    fn bundle(name: &str, signer: Option<&str>, labels: serde_json::Value, pems: &[&str]) -> ClusterTrustBundle {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"signerName": signer, "trustBundle": pems.concat()},
        }))
        .unwrap()
    }

    fn projection(json: serde_json::Value) -> ClusterTrustBundleProjection {
        serde_json::from_value(json).unwrap()
    }

    fn count(pems: &str) -> usize {
        pem::parse_many(pems).unwrap().len()
    }

    #[test]
    fn bundles_are_selected_as_a_kubelet_selects_them() {
        let (a, b, c) = (cert("a"), cert("b"), cert("c"));
        let bundles = vec![
            bundle("by-name", None, serde_json::json!({}), &[&a, &a]),
            bundle("s1", Some("example.com/s"), serde_json::json!({"live": "yes"}), &[&a, &b]),
            bundle("s2", Some("example.com/s"), serde_json::json!({"live": "no"}), &[&c]),
            bundle("other", Some("example.com/other"), serde_json::json!({"live": "yes"}), &[&c]),
        ];
        // By name, duplicates removed.
        let by_name = anchors(&projection(serde_json::json!({"path": "p", "name": "by-name"})), &bundles).unwrap();
        assert_eq!(count(&by_name), 1);
        assert!(by_name.starts_with("-----BEGIN CERTIFICATE-----\n") && !by_name.contains('\r'));
        // By signer: an empty selector takes every bundle of the signer, not another signer's.
        let all = serde_json::json!({"path": "p", "signerName": "example.com/s", "labelSelector": {}});
        assert_eq!(count(&anchors(&projection(all), &bundles).unwrap()), 3);
        let live = serde_json::json!({"path": "p", "signerName": "example.com/s", "labelSelector": {"matchLabels": {"live": "yes"}}});
        assert_eq!(count(&anchors(&projection(live), &bundles).unwrap()), 2);
        // No selector matches nothing: required, the pod must not start; optional, an empty file.
        let none = serde_json::json!({"path": "p", "signerName": "example.com/s"});
        assert_eq!(anchors(&projection(none.clone()), &bundles), None);
        let mut optional = none;
        optional["optional"] = serde_json::json!(true);
        assert_eq!(anchors(&projection(optional), &bundles), Some(String::new()));
        assert_eq!(anchors(&projection(serde_json::json!({"path": "p", "name": "missing"})), &bundles), None);
    }

    #[test]
    fn a_required_projection_that_matches_nothing_leaves_its_key_out() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [], "volumes": [{"name": "v", "projected": {"sources": [
                {"clusterTrustBundle": {"path": "a", "name": "there"}},
                {"clusterTrustBundle": {"path": "b", "name": "missing"}},
            ]}}]},
        }))
        .unwrap();
        let bundles = vec![bundle("there", None, serde_json::json!({}), &[&cert("x")])];
        let data = data(&pod, &bundles);
        let there = projection(serde_json::json!({"path": "a", "name": "there"}));
        assert_eq!(data.keys().cloned().collect::<Vec<_>>(), vec![key(&there)]);
        // The key depends on the query, not on the path it is written to.
        assert_eq!(key(&there), key(&projection(serde_json::json!({"path": "elsewhere", "name": "there"}))));
    }
}
