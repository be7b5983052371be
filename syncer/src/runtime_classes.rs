//! The host RuntimeClasses the platform admin lets tenants' pods ask for (`--runtime-classes`), as
//! the virtual cluster shows them ([`crate::from_host`]): the virtual API server admits a pod
//! naming one (it refuses a class it does not have) and counts its overhead, as the host will.
//! The class's scheduling (node labels and tolerations of the nodes that run the handler) is shown
//! only with a virtual scheduler, which places the pod: its virtual nodes then show the labels
//! those classes select on (`crate::nodes`), and the host copy goes without the class's
//! tolerations, which the host's admission adds again. With the host's scheduler it is left out:
//! the host adds it to the host copy, while in the virtual cluster it would pin the pod to labels
//! its nodes (those its pods already run on) need not show.

use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::from_host::{HostView, labels};
use crate::policy::Policy;

impl HostView for RuntimeClass {
    const LISTED_BY: &'static str = "--runtime-classes, policy.scheduling.runtimeClasses";

    fn listed(policy: &Policy) -> &[String] {
        &policy.scheduling.runtime_classes
    }

    fn view(h: &Self, policy: &Policy) -> Self {
        RuntimeClass {
            metadata: ObjectMeta { name: h.metadata.name.clone(), labels: Some(labels()), ..Default::default() },
            handler: h.handler.clone(),
            overhead: h.overhead.clone(),
            scheduling: h.scheduling.clone().filter(|_| policy.scheduling.virtual_scheduler),
        }
    }

    fn differs(d: &Self, c: &Self) -> bool {
        d.metadata.labels != c.metadata.labels
            || d.overhead != c.overhead
            || d.scheduling != c.scheduling
            || Self::fixed_differs(d, c)
    }

    fn fixed_differs(d: &Self, c: &Self) -> bool {
        d.handler != c.handler
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn the_view_keeps_the_handler_and_overhead_and_the_scheduling_only_for_a_virtual_scheduler() {
        let host: RuntimeClass = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gvisor", "annotations": {"note": "internal"}},
            "handler": "runsc",
            "overhead": {"podFixed": {"memory": "64Mi"}},
            "scheduling": {"nodeSelector": {"sandbox.example.com/runsc": "true"}}
        }))
        .unwrap();
        let v = RuntimeClass::view(&host, &Policy::default());
        assert_eq!(v.handler, "runsc");
        assert_eq!(v.overhead, host.overhead);
        assert_eq!(v.scheduling, None);
        let mut own_scheduler = Policy::default();
        own_scheduler.scheduling.virtual_scheduler = true;
        let placed = RuntimeClass::view(&host, &own_scheduler);
        assert_eq!(placed.scheduling, host.scheduling, "the virtual scheduler places the pod: it sees where");
        assert!(RuntimeClass::differs(&placed, &v));
        assert!(crate::from_host::is_from_host(v.labels()) && v.annotations().is_empty());

        let mut edited = v.clone();
        edited.scheduling = host.scheduling.clone();
        assert!(RuntimeClass::differs(&v, &edited) && !RuntimeClass::fixed_differs(&v, &edited));
        let mut moved = v.clone();
        moved.handler = "runc".into();
        assert!(RuntimeClass::differs(&v, &moved) && RuntimeClass::fixed_differs(&v, &moved));
        assert!(!RuntimeClass::differs(&v, &v.clone()));
    }
}
