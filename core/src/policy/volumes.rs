//! Which volumes may reach the host: an allowlist, whatever the Pod Security level. A volume type
//! not on it (nfs, iscsi, rbd, cephfs, flexVolume, cinder, azureFile, ...) reaches storage or
//! credentials of the host's, and a projection the syncer does not answer from the virtual cluster
//! would be answered by the host's API server and signers.

use k8s_openapi::api::core::v1::{PodSpec, Volume};

use super::Storage;

/// Volume types every tenant may use (the syncer translates what each refers to).
const ALLOWED: [&str; 9] = [
    "configMap",
    "secret",
    "downwardAPI",
    "emptyDir",
    "persistentVolumeClaim",
    "ephemeral",
    "projected",
    "image",
    "csi",
];

/// Projected sources the syncer translates (a service-account token becomes the virtual one,
/// trust bundles and pod certificates the virtual cluster's).
const PROJECTIONS: [&str; 6] =
    ["configMap", "secret", "downwardAPI", "serviceAccountToken", "clusterTrustBundle", "podCertificate"];

/// The podCertificate key types the syncer makes keys of (the RSA ones and ECDSAP521 are not yet).
pub const POD_CERTIFICATE_KEY_TYPES: [&str; 3] = ["ECDSAP256", "ECDSAP384", "ED25519"];

/// The type keys a volume sets (normally one).
pub fn types(vol: &Volume) -> Vec<String> {
    keys(&serde_json::to_value(vol).unwrap_or_default(), &["name"])
}

fn keys(json: &serde_json::Value, skip: &[&str]) -> Vec<String> {
    json.as_object().map(|o| o.keys().filter(|k| !skip.contains(&k.as_str())).cloned().collect()).unwrap_or_default()
}

/// Every volume the allowlist refuses, naming its field. `host_path` says whether hostPath is
/// allowed (the privileged level); `csi_drivers` are the inline CSI drivers the admin lists;
/// ephemeral volumes' claims are held to `storage`.
pub fn violations(spec: &PodSpec, host_path: bool, csi_drivers: &[String], storage: &Storage) -> Vec<String> {
    let mut v = vec![];
    for (i, vol) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}] ({:?})", vol.name);
        for t in types(vol) {
            if !(ALLOWED.contains(&t.as_str()) || (t == "hostPath" && host_path)) {
                v.push(format!("{field}: volume type {t} is not allowed"));
            }
        }
        if let Some(csi) = &vol.csi
            && !csi_drivers.contains(&csi.driver)
        {
            v.push(format!(
                "{field}: CSI driver {:?} is not allowed (the platform admin lists the allowed ones)",
                csi.driver
            ));
        }
        for (j, src) in vol.projected.iter().flat_map(|p| p.sources.iter().flatten()).enumerate() {
            for t in keys(&serde_json::to_value(src).unwrap_or_default(), &[]) {
                if !PROJECTIONS.contains(&t.as_str()) {
                    v.push(format!("{field}.projected.sources[{j}]: projection {t} is not allowed"));
                }
            }
            if let Some(c) = &src.pod_certificate
                && !POD_CERTIFICATE_KEY_TYPES.contains(&c.key_type.as_str())
            {
                v.push(format!(
                    "{field}.projected.sources[{j}].podCertificate.keyType: {:?} is not supported yet (supported: {})",
                    c.key_type,
                    POD_CERTIFICATE_KEY_TYPES.join(", ")
                ));
            }
        }
        if let Some(e) = vol.ephemeral.as_ref().and_then(|e| e.volume_claim_template.as_ref()) {
            if e.spec.volume_name.as_deref().is_some_and(|n| !n.is_empty()) {
                v.push(format!("{field}.ephemeral.volumeClaimTemplate.spec.volumeName: binding a host volume by name is not allowed"));
            }
            if e.spec.selector.is_some() {
                v.push(format!(
                    "{field}.ephemeral.volumeClaimTemplate.spec.selector: selecting host volumes is not allowed"
                ));
            }
            let annotations = e.metadata.as_ref().and_then(|m| m.annotations.as_ref());
            v.extend(storage.violations(&format!("{field}.ephemeral.volumeClaimTemplate.spec"), annotations, &e.spec));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(volumes: serde_json::Value, csi: &[&str]) -> Vec<String> {
        let spec: PodSpec = serde_json::from_value(json!({"containers": [{"name": "c"}], "volumes": volumes})).unwrap();
        let csi: Vec<String> = csi.iter().map(|s| s.to_string()).collect();
        violations(&spec, false, &csi, &Storage::default())
    }

    #[test]
    fn the_allowlist_lets_ordinary_volumes_through() {
        let ok = json!([
            {"name": "a", "configMap": {"name": "x"}},
            {"name": "b", "secret": {"secretName": "x"}},
            {"name": "c", "emptyDir": {}},
            {"name": "d", "downwardAPI": {"items": []}},
            {"name": "e", "persistentVolumeClaim": {"claimName": "x"}},
            {"name": "f", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}, {"configMap": {"name": "x"}}, {"clusterTrustBundle": {"path": "b", "name": "x"}}, {"podCertificate": {"signerName": "x/y", "keyType": "ECDSAP256", "credentialBundlePath": "c"}}]}},
            {"name": "g", "image": {"reference": "busybox"}},
            {"name": "h", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}},
            {"name": "i", "csi": {"driver": "secrets-store.csi.k8s.io"}},
        ]);
        assert_eq!(check(ok, &["secrets-store.csi.k8s.io"]), Vec::<String>::new());
    }

    #[test]
    fn everything_else_is_refused_and_named() {
        let cases = [
            (json!({"name": "v", "nfs": {"server": "10.0.0.1", "path": "/"}}), "volume type nfs"),
            (json!({"name": "v", "iscsi": {"targetPortal": "1", "iqn": "x", "lun": 0}}), "volume type iscsi"),
            (json!({"name": "v", "rbd": {"monitors": ["m"], "image": "i"}}), "volume type rbd"),
            (json!({"name": "v", "cephfs": {"monitors": ["m"]}}), "volume type cephfs"),
            (json!({"name": "v", "flexVolume": {"driver": "x"}}), "volume type flexVolume"),
            (json!({"name": "v", "cinder": {"volumeID": "x"}}), "volume type cinder"),
            (json!({"name": "v", "azureFile": {"secretName": "s", "shareName": "x"}}), "volume type azureFile"),
            (json!({"name": "v", "hostPath": {"path": "/"}}), "volume type hostPath"),
            (json!({"name": "v", "csi": {"driver": "hostpath.csi.k8s.io"}}), "CSI driver \"hostpath.csi.k8s.io\""),
            (
                json!({"name": "v", "projected": {"sources": [{"podCertificate": {"signerName": "x/y", "keyType": "RSA3072", "credentialBundlePath": "c"}}]}}),
                "podCertificate.keyType: \"RSA3072\" is not supported",
            ),
            (
                json!({"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {"volumeName": "pv-of-another-tenant"}}}}),
                "volumeName",
            ),
            (
                json!({"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {"selector": {"matchLabels": {"a": "b"}}}}}}),
                "selector",
            ),
        ];
        for (vol, needle) in cases {
            let v = check(json!([vol]), &[]);
            assert!(v.iter().any(|m| m.contains(needle) && m.contains("spec.volumes[0]")), "{needle} not in {v:?}");
        }
    }
}
