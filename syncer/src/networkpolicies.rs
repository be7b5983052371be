//! NetworkPolicies, when the admin turns their sync on (`--sync-network-policies`): the host copy
//! selects the same pods and peers, confined to this virtual cluster. On the host every pod of
//! the cluster shares one namespace, so a peer's namespace selector is resolved against the
//! virtual namespaces' labels (and the copies are updated when those change). NetworkPolicies only
//! add allowances, so egress is held to what the admin allows (`policy::egress`): an ipBlock only
//! inside the admin's ranges, and a rule to every destination means the cluster's pods, its
//! control plane and those ranges. Ingress ipBlocks are copied as they are (they open only the
//! tenant's own pods). Off, the tenant's policies get a Warning saying they are not enforced,
//! instead of silently doing nothing.

use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::context::Context;
use crate::mirror::{Mirror, meta_differs};
use crate::naming::{NamespaceLabels, Translator, namespaces_matching};
use crate::policy::Refusal;
use crate::sync::{self, Result};

pub const KIND: &str = "NetworkPolicy";

impl Mirror for NetworkPolicy {
    const KIND: &'static str = KIND;

    fn wanted(ctx: &Context, _v: &Self) -> bool {
        ctx.opts.sync_network_policies
    }

    async fn not_wanted(ctx: &Context, v: &Self) {
        let note = "network policies are not enforced in this virtual cluster: its admin has not turned on their sync \
                    to the host (--sync-network-policies, chart value sync.networkPolicies)";
        sync::warn(ctx, v, "NotEnforced", note).await;
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        Ok(host_policy(&ctx.tr, v, &ctx.namespace_labels(), &ctx.policy.egress_ranges))
    }

    /// The tenant is told of egress ranges left out (the rest of its policy applies: refusing
    /// it whole would drop its ingress rules too).
    async fn back(ctx: &Context, v: &Self, _h: &Self) -> Result<()> {
        let rules = v.spec.iter().flat_map(|s| s.egress.iter().flatten()).enumerate();
        let blocks = rules.flat_map(|(i, r)| {
            r.to.iter().flatten().enumerate().filter_map(move |(j, p)| {
                p.ip_block.as_ref().map(|b| (format!("spec.egress[{i}].to[{j}].ipBlock.cidr"), b.cidr.as_str()))
            })
        });
        if let Some(why) = vkube_core::policy::egress::violation(&ctx.policy.egress_ranges, blocks) {
            let note = format!(
                "narrowed by the host's isolation policy: {why}; the host's copy allows only what of it the admin's \
                 ranges hold (the rest of the policy applies)"
            );
            sync::warn(ctx, v, "EgressNotAllowed", &note).await;
        }
        Ok(())
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.spec != c.spec
    }
}

/// The host copy of virtual policy `v`, given every virtual namespace with its labels and the
/// ranges the admin lets egress reach (pure).
pub fn host_policy(
    tr: &Translator,
    v: &NetworkPolicy,
    namespaces: &[NamespaceLabels],
    egress_ranges: &[ipnet::IpNet],
) -> NetworkPolicy {
    let ns = v.metadata.namespace.clone().unwrap_or_default();
    let vs = v.spec.clone().unwrap_or_default();
    let own = [ns.clone()];
    let peers = |list: Option<Vec<NetworkPolicyPeer>>| {
        list.map(|l| l.iter().map(|p| host_peer(tr, &ns, p, namespaces)).collect::<Vec<_>>())
    };
    let spec = NetworkPolicySpec {
        pod_selector: Some(tr.host_pods_selector(Some(&own), &vs.pod_selector.unwrap_or_default())),
        policy_types: vs.policy_types,
        ingress: vs.ingress.map(|rules| {
            rules
                .into_iter()
                .map(|mut r| {
                    r.from = peers(r.from.take());
                    r
                })
                .collect()
        }),
        egress: vs.egress.map(|rules| {
            rules
                .into_iter()
                .filter_map(|mut r| {
                    r.to = match r.to.take() {
                        Some(to) if !to.is_empty() => {
                            // A range is narrowed to what of it the admin allows; a rule left
                            // without a peer goes (with no `to` it would allow every destination).
                            let to: Vec<NetworkPolicyPeer> =
                                to.into_iter().flat_map(|p| narrowed(p, egress_ranges)).collect();
                            if to.is_empty() {
                                return None;
                            }
                            peers(Some(to))
                        }
                        // Every destination: every one the cluster may reach.
                        _ => Some(reachable(tr, egress_ranges)),
                    };
                    Some(r)
                })
                .collect()
        }),
    };
    NetworkPolicy { metadata: tr.host_meta(KIND, &v.metadata), spec: Some(spec) }
}

/// An egress peer within the admin's ranges: as it is, or its range's part the admin allows.
fn narrowed(p: NetworkPolicyPeer, ranges: &[ipnet::IpNet]) -> Vec<NetworkPolicyPeer> {
    let Some(block) = &p.ip_block else { return vec![p] };
    let except = block.except.clone().unwrap_or_default();
    vkube_core::policy::egress::within(ranges, &block.cidr, &except)
        .into_iter()
        .map(|(cidr, except)| NetworkPolicyPeer {
            ip_block: Some(IPBlock { cidr: cidr.to_string(), except: (!except.is_empty()).then_some(except) }),
            ..Default::default()
        })
        .collect()
}

/// What the cluster's pods may reach on the host: its pods, its control plane (the virtual API
/// server, in the chart's pod) and the admin's ranges.
fn reachable(tr: &Translator, ranges: &[ipnet::IpNet]) -> Vec<NetworkPolicyPeer> {
    let control_plane = LabelSelector {
        match_labels: Some([(vkube_core::contract::LABEL_CONTROL_PLANE.to_string(), tr.cluster().to_string())].into()),
        ..Default::default()
    };
    let pods = [tr.host_pods_selector(None, &LabelSelector::default()), control_plane]
        .map(|s| NetworkPolicyPeer { pod_selector: Some(s), ..Default::default() });
    let blocks = ranges.iter().map(|r| NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr: r.to_string(), except: None }),
        ..Default::default()
    });
    pods.into_iter().chain(blocks).collect()
}

/// A peer as the host sees it: pods of this virtual cluster in the namespaces the virtual peer
/// means (its policy's own, or those its namespace selector matches), or the same ipBlock.
fn host_peer(tr: &Translator, ns: &str, p: &NetworkPolicyPeer, namespaces: &[NamespaceLabels]) -> NetworkPolicyPeer {
    if p.ip_block.is_some() {
        return p.clone();
    }
    let scope = match &p.namespace_selector {
        None => Some(vec![ns.to_string()]),
        Some(sel) => namespaces_matching(sel, namespaces),
    };
    let pods: LabelSelector = p.pod_selector.clone().unwrap_or_default();
    NetworkPolicyPeer {
        pod_selector: Some(tr.host_pods_selector(scope.as_deref(), &pods)),
        namespace_selector: None,
        ip_block: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_are_confined_and_namespace_selectors_resolved() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let v: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {"role": "client"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "ops"}}, "podSelector": {"matchLabels": {"role": "probe"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "nobody"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                    "ports": [{"port": 80}]}],
                "egress": [{"to": [{"namespaceSelector": {}}]}],
            }
        }))
        .unwrap();
        let namespaces = vec![
            ("shop".to_string(), labels(&[("team", "shop")])),
            ("ops".to_string(), labels(&[("team", "ops")])),
            ("ops-2".to_string(), labels(&[("team", "ops")])),
        ];
        let h = serde_json::to_value(host_policy(&tr, &v, &namespaces, &[])).unwrap();
        assert_eq!(h["metadata"]["name"], "web-x-shop-x-team-a");
        assert_eq!(h["metadata"]["annotations"]["vkube.dev/object-kind"], "NetworkPolicy");
        let own = serde_json::json!([{"key": "vkube.dev/namespace", "operator": "In", "values": ["shop"]}]);
        assert_eq!(
            h["spec"]["podSelector"]["matchLabels"],
            serde_json::json!({"t.vkube.dev/app": "web", "vkube.dev/cluster": "team-a"})
        );
        assert_eq!(h["spec"]["podSelector"]["matchExpressions"], own);
        let from = &h["spec"]["ingress"][0]["from"];
        assert_eq!(
            from[0]["podSelector"]["matchLabels"],
            serde_json::json!({"t.vkube.dev/role": "client", "vkube.dev/cluster": "team-a"})
        );
        assert_eq!(from[0]["podSelector"]["matchExpressions"], own);
        assert_eq!(from[1]["podSelector"]["matchLabels"]["t.vkube.dev/role"], "probe");
        assert_eq!(from[1]["podSelector"]["matchExpressions"][0]["values"], serde_json::json!(["ops", "ops-2"]));
        assert!(from[1].get("namespaceSelector").is_none(), "never another host namespace: {from}");
        assert_eq!(from[2]["podSelector"]["matchExpressions"][0]["values"], serde_json::json!([""]), "matches nothing");
        assert_eq!(from[3], serde_json::json!({"ipBlock": {"cidr": "10.0.0.0/8"}}));
        assert_eq!(h["spec"]["ingress"][0]["ports"], serde_json::json!([{"port": 80}]));
        let to = &h["spec"]["egress"][0]["to"][0];
        assert_eq!(
            to["podSelector"],
            serde_json::json!({"matchLabels": {"vkube.dev/cluster": "team-a"}}),
            "every namespace of the cluster only"
        );
    }

    #[test]
    fn egress_to_everything_is_what_the_cluster_may_reach() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let v: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "out", "namespace": "shop"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{}, {"to": [], "ports": [{"port": 53, "protocol": "UDP"}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "203.0.113.16/28"}}]}]}
        }))
        .unwrap();
        let ranges = ["203.0.113.0/24".parse().unwrap()];
        let h = serde_json::to_value(host_policy(&tr, &v, &[], &ranges)).unwrap();
        let want = serde_json::json!([
            {"podSelector": {"matchLabels": {"vkube.dev/cluster": "team-a"}}},
            {"podSelector": {"matchLabels": {"vkube.dev/control-plane": "team-a"}}},
            {"ipBlock": {"cidr": "203.0.113.0/24"}},
        ]);
        assert_eq!(h["spec"]["egress"][0]["to"], want, "no `to`: not every destination on the host");
        assert_eq!(h["spec"]["egress"][1]["to"], want, "an empty `to` alike");
        assert_eq!(h["spec"]["egress"][1]["ports"], serde_json::json!([{"port": 53, "protocol": "UDP"}]));
        let narrowed = serde_json::json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}]);
        assert_eq!(h["spec"]["egress"][2]["to"], narrowed, "the internet narrowed to the admin's range");
        assert_eq!(
            h["spec"]["egress"][3]["to"],
            serde_json::json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}, {"ipBlock": {"cidr": "203.0.113.16/28"}}])
        );
        let none = host_policy(&tr, &v, &[], &[]);
        assert_eq!(none.spec.unwrap().egress.unwrap().len(), 2, "rules left with no peer go, not to everything");
    }
}
