//! The host StorageClasses the platform admin lets claims name (`--storage-classes`), as the
//! virtual cluster shows them ([`crate::from_host`]): a claim naming no class gets the class the
//! host would give it (the host's default, marked default here too when the admin lists it), and
//! a claim can grow where the host class allows it. Parameters are left out (they may name the
//! host's Secrets); allowed topologies, node labels a virtual scheduler needs, stay.

use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::from_host::{HostView, labels};
use crate::policy::Policy;

/// The annotations that make a class the default (the beta one is still read by the API server).
const DEFAULT_CLASS: [&str; 2] =
    ["storageclass.kubernetes.io/is-default-class", "storageclass.beta.kubernetes.io/is-default-class"];

impl HostView for StorageClass {
    const LISTED_BY: &'static str = "--storage-classes, policy.storageClasses";

    fn listed(policy: &Policy) -> &[String] {
        &policy.storage.classes
    }

    fn view(h: &Self, _policy: &Policy) -> Self {
        let default = DEFAULT_CLASS.iter().any(|k| h.annotations().get(*k).is_some_and(|v| v == "true"));
        StorageClass {
            metadata: ObjectMeta {
                name: h.metadata.name.clone(),
                labels: Some(labels()),
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

    fn differs(d: &Self, c: &Self) -> bool {
        d.metadata.labels != c.metadata.labels
            || d.metadata.annotations != c.metadata.annotations
            || d.allow_volume_expansion != c.allow_volume_expansion
            || d.mount_options != c.mount_options
            || Self::fixed_differs(d, c)
    }

    fn fixed_differs(d: &Self, c: &Self) -> bool {
        // The API server defaults the reclaim policy and binding mode; the host's copy has them set.
        d.provisioner != c.provisioner
            || d.reclaim_policy != c.reclaim_policy
            || d.volume_binding_mode != c.volume_binding_mode
            || d.parameters.as_ref().is_some_and(|p| !p.is_empty())
                != c.parameters.as_ref().is_some_and(|p| !p.is_empty())
            || d.allowed_topologies != c.allowed_topologies
    }
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
        let v = StorageClass::view(&host(&[("note", "internal")]), &Policy::default());
        assert_eq!(v.provisioner, "ebs.csi.aws.com");
        assert_eq!(v.allow_volume_expansion, Some(true));
        assert_eq!(v.volume_binding_mode.as_deref(), Some("WaitForFirstConsumer"));
        assert_eq!(v.parameters, None, "parameters may name the host's Secrets");
        assert_eq!(v.metadata.annotations, None, "the host's own annotations stay there");
        assert_eq!(
            v.metadata.labels,
            Some([(vkube_core::contract::LABEL_FROM_HOST.to_string(), "true".to_string())].into())
        );
        assert!(crate::from_host::is_from_host(v.labels()));
    }

    #[test]
    fn the_hosts_default_is_the_default_here_too() {
        for key in DEFAULT_CLASS {
            let v = StorageClass::view(&host(&[(key, "true")]), &Policy::default());
            assert_eq!(v.annotations().get(DEFAULT_CLASS[0]).map(String::as_str), Some("true"), "{key}");
        }
        assert_eq!(
            StorageClass::view(&host(&[(DEFAULT_CLASS[0], "false")]), &Policy::default()).metadata.annotations,
            None
        );
    }

    #[test]
    fn an_edit_is_undone_and_a_changed_provisioner_makes_the_copy_again() {
        let d = StorageClass::view(&host(&[]), &Policy::default());
        let mut edited = d.clone();
        edited.allow_volume_expansion = Some(false);
        assert!(StorageClass::differs(&d, &edited) && !StorageClass::fixed_differs(&d, &edited));
        let mut moved = d.clone();
        moved.provisioner = "other".into();
        assert!(StorageClass::differs(&d, &moved) && StorageClass::fixed_differs(&d, &moved));
        assert!(!StorageClass::differs(&d, &d.clone()));
    }
}
