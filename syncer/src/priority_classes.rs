//! The host PriorityClasses the platform admin lets tenants' pods name (`--priority-classes`), as
//! the virtual cluster shows them ([`crate::from_host`]): the virtual API server admits a pod
//! naming one (and gives it the host's value, which a virtual scheduler's preemption then uses),
//! and the host copy keeps the name, so the host's admission gives it the host's priority and
//! preemption policy ([`vkube_core::policy::scheduling`]). Never the host's default: the
//! virtual cluster's own default, if the tenant makes one, decides its pods' classes there.

use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::from_host::{HostView, labels};
use crate::policy::Policy;

impl HostView for PriorityClass {
    const LISTED_BY: &'static str = "--priority-classes, policy.scheduling.priorityClasses";

    fn listed(policy: &Policy) -> &[String] {
        &policy.scheduling.priority_classes
    }

    fn view(h: &Self, _policy: &Policy) -> Self {
        PriorityClass {
            metadata: ObjectMeta { name: h.metadata.name.clone(), labels: Some(labels()), ..Default::default() },
            value: h.value,
            preemption_policy: h.preemption_policy.clone(),
            description: h.description.clone(),
            // One default per cluster: a tenant's own would refuse the copy.
            global_default: None,
        }
    }

    fn differs(d: &Self, c: &Self) -> bool {
        d.metadata.labels != c.metadata.labels
            || d.description != c.description
            || c.global_default == Some(true)
            || Self::fixed_differs(d, c)
    }

    fn fixed_differs(d: &Self, c: &Self) -> bool {
        // The API server defaults the preemption policy; the host's copy has it set.
        d.value != c.value || d.preemption_policy != c.preemption_policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn the_view_is_the_hosts_priority_and_never_the_default() {
        let host: PriorityClass = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "batch", "labels": {"team": "platform"}, "annotations": {"note": "internal"}},
            "value": 1000, "preemptionPolicy": "Never", "globalDefault": true, "description": "batch jobs"
        }))
        .unwrap();
        let v = PriorityClass::view(&host, &Policy::default());
        assert_eq!((v.value, v.preemption_policy.as_deref()), (Some(1000), Some("Never")));
        assert_eq!(v.global_default, None);
        assert_eq!(v.description.as_deref(), Some("batch jobs"));
        assert!(crate::from_host::is_from_host(v.labels()) && v.labels().len() == 1);
        assert!(v.annotations().is_empty());

        let mut edited = v.clone();
        edited.global_default = Some(true);
        assert!(PriorityClass::differs(&v, &edited) && !PriorityClass::fixed_differs(&v, &edited));
        let mut revalued = v.clone();
        revalued.value = Some(1_000_000);
        assert!(PriorityClass::differs(&v, &revalued) && PriorityClass::fixed_differs(&v, &revalued));
        assert!(!PriorityClass::differs(&v, &v.clone()));
    }
}
