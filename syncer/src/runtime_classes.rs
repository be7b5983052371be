//! The host RuntimeClasses the platform admin lets tenants' pods ask for (`--runtime-classes`), as
//! the virtual cluster shows them ([`crate::from_host`]): the virtual API server admits a pod
//! naming one (it refuses a class it does not have) and counts its overhead, as the host will.
//! The class's scheduling (node labels and tolerations of the nodes that run the handler) is shown
//! only with a virtual scheduler, which places the pod: its node selector as the syncer's mark
//! ([`node_label`]) of the virtual nodes whose host node meets it (`crate::nodes`), its
//! tolerations as they are; the host copy goes without them, the host's admission adding the
//! class's own again. With the host's scheduler it is left out: the host adds it to the host
//! copy, while in the virtual cluster it would pin the pod to nodes (those its pods already run
//! on) that need not show it.

use k8s_openapi::api::node::v1::{RuntimeClass, Scheduling};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vkube_core::contract::LABEL_RUNTIME_CLASS_PREFIX;

use crate::from_host::{HostView, labels};
use crate::policy::Policy;

/// The label of virtual nodes whose host node runs this class's handler (its node selector met):
/// the class's name, or for a name longer than a label's 63 characters its start and a hash.
pub fn node_label(class: &str) -> String {
    const MAX: usize = 63;
    if class.len() <= MAX {
        return format!("{LABEL_RUNTIME_CLASS_PREFIX}{class}");
    }
    let hash = vkube_core::naming::short_hash(class);
    let start = class[..MAX - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{LABEL_RUNTIME_CLASS_PREFIX}{start}-{hash}")
}

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
            scheduling: h.scheduling.as_ref().filter(|_| policy.scheduling.virtual_scheduler).map(|s| Scheduling {
                // The nodes that run the handler, as the syncer marks them (`crate::nodes`): not
                // the host's labels, which virtual nodes do not show.
                node_selector: s
                    .node_selector
                    .as_ref()
                    .filter(|s| !s.is_empty())
                    .map(|_| [(node_label(h.metadata.name.as_deref().unwrap_or_default()), "true".to_string())].into()),
                tolerations: s.tolerations.clone(),
            }),
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
            "scheduling": {"nodeSelector": {"sandbox.example.com/runsc": "true"},
                "tolerations": [{"key": "sandbox.example.com/runsc", "operator": "Exists", "effect": "NoSchedule"}]}
        }))
        .unwrap();
        let v = RuntimeClass::view(&host, &Policy::default());
        assert_eq!(v.handler, "runsc");
        assert_eq!(v.overhead, host.overhead);
        assert_eq!(v.scheduling, None);
        let mut own_scheduler = Policy::default();
        own_scheduler.scheduling.virtual_scheduler = true;
        let placed = RuntimeClass::view(&host, &own_scheduler);
        let scheduling = serde_json::to_value(&placed.scheduling).unwrap();
        let marked = serde_json::json!({"nodeSelector": {"runtimeclass.vkube.dev/gvisor": "true"},
            "tolerations": [{"key": "sandbox.example.com/runsc", "operator": "Exists", "effect": "NoSchedule"}]});
        assert_eq!(scheduling, marked, "the virtual scheduler places the pod: it sees where, by the syncer's mark");
        assert!(RuntimeClass::differs(&placed, &v));
        assert!(crate::from_host::is_from_host(v.labels()) && v.annotations().is_empty());

        let mut edited = v.clone();
        edited.scheduling = host.scheduling.clone();
        assert!(RuntimeClass::differs(&v, &edited) && !RuntimeClass::fixed_differs(&v, &edited));
        let long = "a".repeat(60) + ".sandbox.example.com";
        let label = node_label(&long);
        let name = label.strip_prefix(LABEL_RUNTIME_CLASS_PREFIX).unwrap();
        assert!(name.len() <= 63 && name.starts_with("aaaa") && label != node_label(&format!("{long}2")), "{label}");
        assert_eq!(node_label("gvisor"), "runtimeclass.vkube.dev/gvisor");

        let mut moved = v.clone();
        moved.handler = "runc".into();
        assert!(RuntimeClass::differs(&v, &moved) && RuntimeClass::fixed_differs(&v, &moved));
        assert!(!RuntimeClass::differs(&v, &v.clone()));
    }
}
