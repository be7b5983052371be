//! What a tenant's claim (a PersistentVolumeClaim, or a pod's ephemeral volume template) may ask
//! of the host's storage. A claim binds any available volume of its class: with a class the admin
//! did not mean for tenants (one of volumes made by hand, an empty class) it could take a volume
//! made for someone else (another team's share, a node's local disk). So a claim names no class
//! (the host's default) or one the admin lists, and asks for a volume attributes class (a storage
//! tier) only if the admin lists it. (A volume by name or selector never crosses: claims drop
//! them, ephemeral volumes are refused with them, `volumes`.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaimSpec;

/// The deprecated annotation naming a claim's class (read by the host before the spec's field).
const BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Storage {
    /// StorageClasses tenants' claims may name; a claim naming none gets the host's default.
    pub classes: Vec<String>,
    /// VolumeAttributesClasses tenants' claims may name.
    pub attributes_classes: Vec<String>,
}

impl Storage {
    /// Every field of a claim spec at `field` (e.g. `spec`) the host must not take, named; the
    /// class the deprecated annotation names is held to the same list, as the host reads it first
    /// should the admin copy it verbatim (pure).
    pub fn violations(
        &self,
        field: &str,
        annotations: Option<&BTreeMap<String, String>>,
        spec: &PersistentVolumeClaimSpec,
    ) -> Vec<String> {
        let mut v = vec![];
        let annotated = annotations.and_then(|a| a.get(BETA_CLASS)).map(|c| (format!("annotation {BETA_CLASS}"), c));
        let named = spec.storage_class_name.as_ref().map(|c| (format!("{field}.storageClassName"), c));
        for (what, class) in named.into_iter().chain(annotated) {
            v.extend(self.class_violation(&what, class));
        }
        if let Some(c) = spec.volume_attributes_class_name.as_deref().filter(|c| !c.is_empty())
            && !self.attributes_classes.iter().any(|a| a == c)
        {
            v.push(format!(
                "{field}.volumeAttributesClassName: {c:?} is not one the platform admin allows \
                 (policy.volumeAttributesClasses: {})",
                super::listed(&self.attributes_classes)
            ));
        }
        v
    }

    fn class_violation(&self, field: &str, class: &str) -> Option<String> {
        match class {
            "" => Some(format!(
                "{field}: \"\" (no class) binds volumes made by hand, which are not this cluster's; \
                 leave it out for the host's default class"
            )),
            c if self.classes.iter().any(|a| a == c) => None,
            c => Some(format!(
                "{field}: {c:?} is not one the platform admin allows (policy.storageClasses: {}); \
                 leave it out for the host's default class (a default StorageClass of the virtual cluster's own \
                 fills it in: unmark it as default)",
                super::listed(&self.classes)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> PersistentVolumeClaimSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_default_class_or_one_the_admin_lists() {
        let storage = Storage { classes: vec!["fast".into()], attributes_classes: vec!["gold".into()] };
        let ok = |v: serde_json::Value| storage.violations("spec", None, &spec(v));
        assert!(ok(serde_json::json!({"accessModes": ["ReadWriteOnce"]})).is_empty(), "the host's default");
        assert!(ok(serde_json::json!({"storageClassName": "fast", "volumeAttributesClassName": "gold"})).is_empty());
        let none = ok(serde_json::json!({"storageClassName": ""}));
        assert!(none[0].starts_with("spec.storageClassName: \"\" (no class)"), "{none:?}");
        let other = ok(serde_json::json!({"storageClassName": "nfs-static"}));
        assert!(other[0].contains("\"nfs-static\" is not one the platform admin allows (policy.storageClasses: fast)"));
        let tier = ok(serde_json::json!({"volumeAttributesClassName": "platinum"}));
        assert!(tier[0].starts_with("spec.volumeAttributesClassName: \"platinum\""), "{tier:?}");
        let nothing = Storage::default().violations("x", None, &spec(serde_json::json!({"storageClassName": "fast"})));
        assert!(nothing[0].contains("(policy.storageClasses: none)"), "{nothing:?}");
        let beta = BTreeMap::from([(BETA_CLASS.to_string(), "nfs-static".to_string())]);
        let annotated = storage.violations("spec", Some(&beta), &spec(serde_json::json!({})));
        assert!(annotated[0].starts_with("annotation volume.beta.kubernetes.io/storage-class: \"nfs-static\""));
    }
}
