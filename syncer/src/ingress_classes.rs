//! The host IngressClasses the platform admin lets tenants' Ingresses use (`--ingress-classes`),
//! as the virtual cluster shows them ([`crate::from_host`]): tenants and their tools (charts,
//! certificate solvers) find the classes they may name, and the admin's first class is the
//! virtual default, so the virtual API server gives an Ingress naming none the class its host
//! copy gets ([`vkube_core::policy::ingresses::Ingresses::class`]). The controller stays, its
//! parameters (a host object by name) do not.

use k8s_openapi::api::networking::v1::{IngressClass, IngressClassSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::from_host::{HostView, labels};
use crate::policy::Policy;

/// The annotation that makes an IngressClass the default.
const DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

impl HostView for IngressClass {
    const LISTED_BY: &'static str = "--ingress-classes, policy.ingress.classes";

    fn listed(policy: &Policy) -> &[String] {
        &policy.ingresses.classes
    }

    fn view(h: &Self, policy: &Policy) -> Self {
        let default = policy.ingresses.classes.first().is_some_and(|first| h.metadata.name.as_ref() == Some(first));
        IngressClass {
            metadata: ObjectMeta {
                name: h.metadata.name.clone(),
                labels: Some(labels()),
                annotations: default.then(|| [(DEFAULT_CLASS.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            spec: Some(IngressClassSpec {
                controller: h.spec.as_ref().and_then(|s| s.controller.clone()),
                parameters: None,
            }),
        }
    }

    fn differs(d: &Self, c: &Self) -> bool {
        d.metadata.labels != c.metadata.labels
            || d.metadata.annotations != c.metadata.annotations
            || c.spec.as_ref().is_some_and(|s| s.parameters.is_some())
            || Self::fixed_differs(d, c)
    }

    fn fixed_differs(d: &Self, c: &Self) -> bool {
        let controller = |i: &Self| i.spec.as_ref().and_then(|s| s.controller.clone());
        controller(d) != controller(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn host(name: &str) -> IngressClass {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {DEFAULT_CLASS: "true", "note": "internal"}},
            "spec": {"controller": "traefik.io/ingress-controller",
                "parameters": {"apiGroup": "k8s.example.com", "kind": "Settings", "name": "host-only"}}
        }))
        .unwrap()
    }

    #[test]
    fn the_admins_first_class_is_the_default_and_the_hosts_parameters_stay_there() {
        let mut policy = Policy::default();
        policy.ingresses.classes = vec!["web".into(), "internal".into()];
        let web = IngressClass::view(&host("web"), &policy);
        assert_eq!(web.annotations().get(DEFAULT_CLASS).map(String::as_str), Some("true"));
        let spec = web.spec.clone().unwrap();
        assert_eq!((spec.controller.as_deref(), spec.parameters), (Some("traefik.io/ingress-controller"), None));
        assert!(crate::from_host::is_from_host(web.labels()));
        // The host's default is not the tenant's: the admin's first class is.
        let internal = IngressClass::view(&host("internal"), &policy);
        assert!(internal.annotations().is_empty());

        let mut edited = web.clone();
        edited.metadata.annotations = None;
        assert!(IngressClass::differs(&web, &edited) && !IngressClass::fixed_differs(&web, &edited));
        let mut moved = web.clone();
        moved.spec.as_mut().unwrap().controller = Some("other".into());
        assert!(IngressClass::differs(&web, &moved) && IngressClass::fixed_differs(&web, &moved));
        assert!(!IngressClass::differs(&web, &web.clone()));
    }
}
