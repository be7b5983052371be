//! PodDisruptionBudgets, when the admin turns their sync on (`--sync-pod-disruption-budgets`):
//! the host copy guards the same pods (its selector confined to the cluster and namespace), so
//! evictions on the host (a node drain, a node pool upgrade, the cluster autoscaler's scale-down)
//! respect the tenant's budgets as they would on a cluster of its own. Off by default: a budget
//! that allows no disruption holds up the admin's drains for as long as it stands (as a host
//! tenant's would), which the admin accepts by turning it on. Off, the tenant's budgets get a
//! Warning saying host evictions do not see them, instead of silently guarding nothing.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};

use crate::context::Context;
use crate::mirror::{Mirror, meta_differs};
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::sync::{self, Result};

pub const KIND: &str = "PodDisruptionBudget";

impl Mirror for PodDisruptionBudget {
    const KIND: &'static str = KIND;

    fn wanted(ctx: &Context, _v: &Self) -> bool {
        ctx.opts.sync_pod_disruption_budgets
    }

    async fn not_wanted(ctx: &Context, v: &Self) {
        let note = "the host's evictions (node drains, upgrades) do not see this budget: the virtual cluster's admin \
                    has not turned on their sync to the host (--sync-pod-disruption-budgets, chart value \
                    sync.podDisruptionBudgets)";
        sync::warn(ctx, v, "NotEnforced", note).await;
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        Ok(host_budget(&ctx.tr, v))
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.spec != c.spec
    }
}

/// The host copy of virtual budget `v` (pure): the same numbers and eviction policy, over the
/// host copies of the pods it selects.
pub fn host_budget(tr: &Translator, v: &PodDisruptionBudget) -> PodDisruptionBudget {
    let ns = v.metadata.namespace.clone().unwrap_or_default();
    let spec = v.spec.clone().unwrap_or_default();
    // No selector selects no pods (policy/v1): it stays none, not every pod of the namespace.
    let selector = spec.selector.as_ref().map(|s| tr.host_pods_selector(Some(std::slice::from_ref(&ns)), s));
    PodDisruptionBudget {
        metadata: tr.host_meta(KIND, &v.metadata),
        spec: Some(PodDisruptionBudgetSpec { selector, ..spec }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::json;
    use vkube_core::contract::{LABEL_CLUSTER, LABEL_NAMESPACE};

    use super::*;

    fn budget(spec: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"namespace": "web", "name": "db", "uid": "u1"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn a_budget_guards_the_host_copies_of_the_pods_it_selects_and_no_others() {
        let tr = Translator::new("team", "vkube-team");
        let v = budget(json!({"maxUnavailable": 1, "selector": {"matchLabels": {"app": "db"}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow"}));
        let h = host_budget(&tr, &v);
        assert_eq!(h.metadata.name.as_deref(), Some(tr.host_name("web", "db").as_str()));
        let spec = h.spec.unwrap();
        assert_eq!(spec.max_unavailable, v.spec.as_ref().unwrap().max_unavailable);
        assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
        let sel: LabelSelector = spec.selector.unwrap();
        let labels = sel.match_labels.unwrap();
        assert_eq!(labels.get(LABEL_CLUSTER).map(String::as_str), Some("team"));
        assert!(labels.keys().any(|k| k.ends_with("/app")) && !labels.contains_key("app"), "{labels:?}");
        let expr = sel.match_expressions.unwrap();
        assert!(expr.iter().any(|e| e.key == LABEL_NAMESPACE && e.values.as_deref() == Some(&["web".to_string()][..])));
    }

    #[test]
    fn no_selector_stays_none() {
        let tr = Translator::new("team", "vkube-team");
        let h = host_budget(&tr, &budget(json!({"minAvailable": 1})));
        assert_eq!(h.spec.unwrap().selector, None);
    }
}
