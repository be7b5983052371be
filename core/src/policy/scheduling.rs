//! Where a host pod may run is the platform admin's choice, not the tenant's. The admin's node
//! selector and tolerations go on every host pod; of the tenant's scheduling inputs only those
//! the admin allows survive, and every one dropped is named so the tenant can be told:
//!
//! - `nodeName` becomes required node affinity on that node (the host scheduler still checks
//!   taints, capacity and the admin's selector), and only for a node the cluster's pods already
//!   run on (what its virtual nodes show, so a virtual DaemonSet still gets one pod per node);
//!   where the admin allows it (`bind_node_name`) it stays `nodeName` on such a node that the host
//!   has not cordoned or tainted against the admin's tolerations (with its RuntimeClass's), and
//!   that meets its RuntimeClass's node selector, and the host's kubelet admits or
//!   rejects the pod (ports, resources, the admin's selector) as a tenant's own kubelet would;
//! - node selector and node affinity keep label keys the admin lists and `metadata.name` fields
//!   naming such nodes; their other keys are matched against the virtual cluster's nodes (which
//!   the tenant may label), among those its pods may be pinned to: a node selector or affinity
//!   term is pinned to the nodes that match (kept off those that do not, for a term that only
//!   asks for labels to be absent), a term no node matches is dropped, and a pod whose required
//!   terms all go is unschedulable, as on a cluster of its own;
//! - virtual nodes the tenant cordoned, or tainted (NoSchedule, NoExecute) with a taint the pod
//!   does not tolerate, are kept from the pod (`metadata.name NotIn`, and out of the nodes it is
//!   pinned to), unschedulable if they are all the nodes it may go to; a pod the tenant bound by
//!   `nodeName` goes there regardless (a NoExecute taint then evicts it);
//! - tolerations only for taints the admin lists as tolerable; the node-condition ones the
//!   virtual cluster's own controllers add (DaemonSets), those for taints only the tenant put
//!   on its virtual nodes (honoured above), and those a toleration of the pod's listed
//!   RuntimeClass covers (the host's admission adds the class's), are dropped without a word;
//! - runtime classes from the admin's list only (empty: the host's default);
//! - priority classes from the admin's list of host classes only (empty: the host's default
//!   priority); another class is dropped and told, unless it only orders the tenant's pods among
//!   themselves (a virtual scheduler's) or is a built-in `system-` class the host admits in its
//!   own `kube-system` only.

use crate::contract::LABEL_RUNTIME_CLASS_PREFIX;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Toleration,
};

/// The admin's scheduling rules for host pods.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduling {
    /// Added to every host pod's node selector (wins over the tenant's).
    pub node_selector: BTreeMap<String, String>,
    /// Added to every host pod.
    pub tolerations: Vec<Toleration>,
    /// Taint keys a tenant's tolerations may name.
    pub tolerable_taints: Vec<String>,
    /// Node label keys a tenant's node selector and node affinity may use.
    pub tenant_node_labels: Vec<String>,
    /// Runtime classes a tenant may ask for.
    pub runtime_classes: Vec<String>,
    /// Host PriorityClasses a tenant's pods may name (the virtual cluster shows them).
    pub priority_classes: Vec<String>,
    /// Whether a pod the tenant binds by `nodeName` keeps it on the host, bypassing the host
    /// scheduler, where [`Nodes::bindable`] says the node may take it.
    pub bind_node_name: bool,
    /// Whether the virtual cluster schedules its pods itself (its own kube-scheduler, on virtual
    /// nodes that show every host node the admin's selector allows): a pod reaches the host only
    /// once bound, as a pod reaches a kubelet, and keeps its node there as with `bind_node_name`.
    pub virtual_scheduler: bool,
}

/// Only delay eviction from a failing node (the virtual API server adds them to every pod).
pub const DEFAULT_TOLERABLE_TAINTS: [&str; 2] = ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"];
/// Placement labels with no host internals in them.
pub const DEFAULT_TENANT_NODE_LABELS: [&str; 5] = [
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "node.kubernetes.io/instance-type",
];
/// The built-in priority classes (`system-cluster-critical`, `system-node-critical`): every
/// cluster has them, and a host admits them in its `kube-system` only.
pub const SYSTEM_PRIORITY_PREFIX: &str = "system-";
/// Node-condition taints a DaemonSet controller tolerates for its pods: not the tenant's words.
const CONTROLLER_TAINT_PREFIX: &str = "node.kubernetes.io/";

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            node_selector: BTreeMap::new(),
            tolerations: vec![],
            tolerable_taints: DEFAULT_TOLERABLE_TAINTS.map(String::from).to_vec(),
            tenant_node_labels: DEFAULT_TENANT_NODE_LABELS.map(String::from).to_vec(),
            runtime_classes: vec![],
            priority_classes: vec![],
            bind_node_name: false,
            virtual_scheduler: false,
        }
    }
}

/// The nodes a tenant's pod may be pinned to, as the syncer knows them.
#[derive(Clone, Copy)]
pub struct Nodes<'a> {
    /// Whether the cluster's pods run on (or may be pinned to) this host node.
    pub known: &'a (dyn Fn(&str) -> bool + Sync),
    /// The known nodes whose virtual nodes' labels satisfy this predicate.
    #[allow(clippy::type_complexity)] // a test of labels in, node names out
    pub labelled: &'a (dyn Fn(&dyn Fn(&BTreeMap<String, String>) -> bool) -> Vec<String> + Sync),
    /// The known nodes closed to a pod with these tolerations (see [`Closed`]).
    pub closed: &'a (dyn Fn(&[Toleration]) -> Closed + Sync),
    /// Whether a toleration needs no host copy, so it is dropped without a word: it is for taints
    /// only the tenant put on its virtual nodes (honoured there, `closed`; no host taint it could
    /// be for), or the host adds it itself (one of the pod's RuntimeClass's).
    pub needless: &'a (dyn Fn(&Toleration) -> bool + Sync),
    /// Whether a pod may be bound to this node directly: the cluster's pods run there and the
    /// host has neither cordoned it nor tainted it against the admin's tolerations (with those the
    /// host adds for the pod's RuntimeClass).
    pub bindable: &'a (dyn Fn(&str) -> bool + Sync),
}

/// The known nodes a pod may not go to: cordoned by the tenant, or carrying a NoSchedule or
/// NoExecute taint of the tenant's the pod does not tolerate.
#[derive(Debug, Default, PartialEq)]
pub struct Closed {
    pub nodes: Vec<String>,
    /// Whether they are every node the cluster's pods may go to.
    pub every_known: bool,
}

/// What became of a tenant's scheduling inputs.
#[derive(Debug, Default, PartialEq)]
pub struct Placement {
    /// What was dropped, by field, for the tenant to be told.
    pub dropped: Vec<String>,
    /// Why no node can take the pod (its node selector matches none), as a scheduler says it.
    pub unschedulable: Option<String>,
    /// The nodes the pod is kept off because the tenant closed them (`metadata.name NotIn`), of
    /// those that matter to it (`closed_for`; empty if none does), when the tenant had closed
    /// any and the pod is left to the host's scheduler; the copy records it.
    pub kept_off: Option<Vec<String>>,
}

impl Scheduling {
    /// Rewrites a host pod spec's scheduling inputs against the nodes the pod may be pinned to.
    pub fn apply(&self, spec: &mut PodSpec, nodes: &Nodes<'_>) -> Placement {
        let known_node = nodes.known;
        let mut dropped = vec![];
        let mut unschedulable = None;
        let mut kept_off = None;
        let pinned = pinned_names(spec.affinity.as_ref().and_then(|a| a.node_affinity.as_ref()), known_node);
        if let Some(rc) = spec.runtime_class_name.take() {
            if self.runtime_classes.contains(&rc) {
                spec.runtime_class_name = Some(rc);
            } else {
                dropped.push(format!("spec.runtimeClassName {rc:?}"));
            }
        }
        if let Some(pc) = spec.priority_class_name.take() {
            if self.priority_classes.contains(&pc) {
                // The host's admission gives the pod that class's priority and preemption policy.
                spec.priority_class_name = Some(pc);
            } else if !self.virtual_scheduler && !pc.starts_with(SYSTEM_PRIORITY_PREFIX) {
                dropped.push(format!(
                    "spec.priorityClassName {pc:?} (the host runs the pod at its default priority; classes the platform admin offers: {})",
                    super::listed(&self.priority_classes)
                ));
            }
        }

        let mut selector: BTreeMap<String, String> = BTreeMap::new();
        let mut virtual_only: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in spec.node_selector.take().unwrap_or_default() {
            if self.node_selector.get(&k) == Some(&v) {
                // The admin's own: every host pod asks for it.
                continue;
            }
            if self.tenant_node_labels.contains(&k) && !self.node_selector.contains_key(&k) {
                selector.insert(k, v);
            } else {
                virtual_only.insert(k, v);
            }
        }
        selector.extend(self.node_selector.clone());
        spec.node_selector = (!selector.is_empty()).then_some(selector);
        let mut matching = (!virtual_only.is_empty()).then(|| {
            (nodes.labelled)(&|labels: &BTreeMap<String, String>| {
                virtual_only.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
        });
        let bound = spec.node_name.is_some();
        if let (Some(m), Some(node)) = (matching.as_mut(), spec.node_name.as_ref()) {
            // Bound by the tenant: that node or none, as its kubelet would admit it.
            m.retain(|n| n == node);
        }
        // Bound by the tenant: its kubelet admits it whatever the node's cordon and taints.
        let closed =
            if bound { Closed::default() } else { (nodes.closed)(spec.tolerations.as_deref().unwrap_or_default()) };
        if let Some(m) = matching.as_mut() {
            m.retain(|n| !closed.nodes.contains(n));
        }
        if matching.as_ref().is_some_and(Vec::is_empty) {
            let keys: Vec<&String> = virtual_only.keys().collect();
            let also = if closed.nodes.is_empty() { "" } else { " that is not cordoned or tainted against it" };
            let marks: Vec<&&String> = keys.iter().filter(|k| k.starts_with(LABEL_RUNTIME_CLASS_PREFIX)).collect();
            let unmet = format!(
                "0 nodes are available: no node of this cluster{also} matches the pod's node selector on {keys:?}"
            );
            // A tenant's label under the marks' prefix does not stay: telling it to label a node
            // would send it round in circles.
            unschedulable = Some(match (marks.is_empty(), spec.runtime_class_name.as_deref()) {
                (true, _) => format!(
                    "{unmet} (labels the host's nodes do not show: label a node of this cluster, or ask the platform admin to allow the key)"
                ),
                (false, None) => format!(
                    "{unmet}: {marks:?} are the syncer's marks of the nodes that run a RuntimeClass (shown with a virtual scheduler only, never set by hand): name the class in spec.runtimeClassName instead"
                ),
                // The virtual API server added the mark from the class's view; the node the pod
                // is bound to does not run the class (any more).
                (false, Some(class)) => format!(
                    "{unmet}: {marks:?} marks the nodes that run RuntimeClass {class:?}, and no node that may take the pod does now: delete the pod to have it placed again"
                ),
            });
        } else if closed.every_known {
            unschedulable = Some(format!(
                "0 nodes are available: every node of this cluster is cordoned or has a taint the pod does not tolerate ({}): uncordon or untaint one, or add a toleration",
                closed.nodes.join(", ")
            ));
        }

        let affinity = spec.affinity.get_or_insert_with(Default::default);
        let mut node_affinity = affinity.node_affinity.take().unwrap_or_default();
        if !self.node_affinity(&mut node_affinity, nodes, &mut dropped) && unschedulable.is_none() {
            unschedulable = Some(
                "0 nodes are available: no node of this cluster matches the pod's required node affinity (on labels the host's nodes do not show: label a node of this cluster, or ask the platform admin to allow the key)".to_string(),
            );
        }
        if let Some(node) = spec.node_name.take() {
            let keeps = self.bind_node_name || self.virtual_scheduler;
            if keeps && known_node(&node) && (nodes.bindable)(&node) {
                // Its kubelet admits it or not, as the tenant's own would.
                spec.node_name = Some(node);
            } else if known_node(&node) {
                pin(&mut node_affinity, "In", std::slice::from_ref(&node));
            } else {
                dropped.push(format!("spec.nodeName {node:?} (not a node of this virtual cluster)"));
            }
        }
        if let Some(nodes) = matching.filter(|m| !m.is_empty() && !bound) {
            pin(&mut node_affinity, "In", &nodes);
        } else if !closed.nodes.is_empty() {
            // A term pinned to closed nodes only (a DaemonSet's pod, the tenant's own node
            // field) can never be met: without it, and unschedulable if no term is left.
            if !unpin(&mut node_affinity, &closed.nodes) && unschedulable.is_none() {
                unschedulable = Some(format!(
                    "0 nodes are available: the nodes the pod's node affinity names are cordoned or have a taint the pod does not tolerate ({}): uncordon or untaint one, or add a toleration",
                    closed.nodes.join(", ")
                ));
            }
            let kept: Vec<String> = closed_for(pinned.as_ref(), closed.nodes).into_iter().collect();
            if !kept.is_empty() {
                pin(&mut node_affinity, "NotIn", &kept);
            }
            kept_off = Some(kept);
        }
        let empty = node_affinity.required_during_scheduling_ignored_during_execution.is_none()
            && node_affinity.preferred_during_scheduling_ignored_during_execution.is_none();
        affinity.node_affinity = (!empty).then_some(node_affinity);
        if affinity.node_affinity.is_none() && affinity.pod_affinity.is_none() && affinity.pod_anti_affinity.is_none() {
            spec.affinity = None;
        }

        let mut tolerations = vec![];
        for (i, t) in spec.tolerations.take().unwrap_or_default().into_iter().enumerate() {
            let key = t.key.clone().unwrap_or_default();
            if self.tolerable_taints.contains(&key) {
                tolerations.push(t);
            } else if !key.starts_with(CONTROLLER_TAINT_PREFIX) && !(nodes.needless)(&t) {
                let what = if key.is_empty() { "every taint".to_string() } else { format!("key {key:?}") };
                dropped.push(format!("spec.tolerations[{i}] ({what})"));
            }
        }
        for t in &self.tolerations {
            if !tolerations.contains(t) {
                tolerations.push(t.clone());
            }
        }
        spec.tolerations = (!tolerations.is_empty()).then_some(tolerations);
        Placement { dropped, unschedulable, kept_off }
    }

    /// The tenant's node affinity, rewritten (see the module's notes). False if it had required
    /// terms and no node of the cluster can meet any of them.
    fn node_affinity(&self, a: &mut NodeAffinity, nodes: &Nodes<'_>, dropped: &mut Vec<String>) -> bool {
        let field = "spec.affinity.nodeAffinity";
        let mut satisfiable = true;
        if let Some(required) = a.required_during_scheduling_ignored_during_execution.take() {
            let (mut unmatched, mut any) = (false, false);
            let terms: Vec<NodeSelectorTerm> = required
                .node_selector_terms
                .into_iter()
                .enumerate()
                .filter_map(|(i, t)| {
                    match self.term(t, nodes, &format!("{field}.required…nodeSelectorTerms[{i}]"), dropped) {
                        Term::Kept(t) => Some(t),
                        Term::Empty => None,
                        Term::Any => {
                            any = true;
                            None
                        }
                        Term::Unmatched => {
                            unmatched = true;
                            None
                        }
                    }
                })
                .collect();
            satisfiable = any || !(terms.is_empty() && unmatched);
            // Terms are ORed: one every node meets makes the whole requirement moot.
            a.required_during_scheduling_ignored_during_execution =
                (!terms.is_empty() && !any).then_some(NodeSelector { node_selector_terms: terms });
        }
        if let Some(preferred) = a.preferred_during_scheduling_ignored_during_execution.take() {
            let kept: Vec<_> = preferred
                .into_iter()
                .enumerate()
                .filter_map(|(i, mut p)| {
                    let at = format!("{field}.preferred…[{i}].preference");
                    match self.term(p.preference, nodes, &at, dropped) {
                        Term::Kept(t) => p.preference = t,
                        // (One every node meets weighs on none.)
                        Term::Empty | Term::Any | Term::Unmatched => return None,
                    }
                    Some(p)
                })
                .collect();
            a.preferred_during_scheduling_ignored_during_execution = (!kept.is_empty()).then_some(kept);
        }
        satisfiable
    }

    /// A node selector term with what the tenant may not ask removed, and its expressions on
    /// labels the host does not show matched against the cluster's nodes.
    fn term(&self, t: NodeSelectorTerm, nodes: &Nodes<'_>, at: &str, dropped: &mut Vec<String>) -> Term {
        let (expressions, virtual_only): (Vec<NodeSelectorRequirement>, Vec<NodeSelectorRequirement>) =
            t.match_expressions.unwrap_or_default().into_iter().partition(|e| self.tenant_node_labels.contains(&e.key));
        let mut fields: Vec<NodeSelectorRequirement> = t
            .match_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|f| {
                let ok = f.key == "metadata.name"
                    && f.operator == "In"
                    && f.values.as_ref().is_some_and(|v| !v.is_empty() && v.iter().all(|n| (nodes.known)(n)));
                if !ok {
                    dropped.push(format!(
                        "{at}.matchFields {:?} {} {:?}",
                        f.key,
                        f.operator,
                        f.values.clone().unwrap_or_default()
                    ));
                }
                ok
            })
            .collect();
        if !virtual_only.is_empty() {
            let meets = |labels: &BTreeMap<String, String>| virtual_only.iter().all(|r| satisfies(labels, r));
            if virtual_only.iter().all(|r| r.operator == "NotIn" || r.operator == "DoesNotExist") {
                // Only asks for labels to be absent: kept off the nodes that have them, free to
                // go to nodes the cluster has not seen.
                let excluded = (nodes.labelled)(&|labels: &BTreeMap<String, String>| !meets(labels));
                if excluded.is_empty() && expressions.is_empty() && fields.is_empty() {
                    return Term::Any;
                }
                if !excluded.is_empty() {
                    fields.push(name_requirement("NotIn", &excluded));
                }
            } else {
                let matching = (nodes.labelled)(&meets);
                if matching.is_empty() {
                    return Term::Unmatched;
                }
                fields.push(name_requirement("In", &matching));
            }
        }
        if expressions.is_empty() && fields.is_empty() {
            return Term::Empty;
        }
        Term::Kept(NodeSelectorTerm {
            match_expressions: (!expressions.is_empty()).then_some(expressions),
            match_fields: (!fields.is_empty()).then_some(fields),
        })
    }
}

/// What became of a node selector term.
enum Term {
    Kept(NodeSelectorTerm),
    /// Nothing the host may be asked was left in it.
    Empty,
    /// Every node meets it (it asks only for labels no node of the cluster has to be absent).
    Any,
    /// Its expressions on labels the host does not show match no node of the cluster.
    Unmatched,
}

/// Whether node labels satisfy a requirement, as the scheduler evaluates it.
fn satisfies(labels: &BTreeMap<String, String>, r: &NodeSelectorRequirement) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let label = labels.get(&r.key);
    let number = |s: &String| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => label.is_some_and(|l| values.contains(l)),
        "NotIn" => label.is_none_or(|l| !values.contains(l)),
        "Exists" => label.is_some(),
        "DoesNotExist" => label.is_none(),
        "Gt" | "Lt" => match (label.and_then(number), values.first().and_then(number)) {
            (Some(l), Some(v)) => (r.operator == "Gt" && l > v) || (r.operator == "Lt" && l < v),
            _ => false,
        },
        _ => false,
    }
}

fn name_requirement(operator: &str, nodes: &[String]) -> NodeSelectorRequirement {
    NodeSelectorRequirement { key: "metadata.name".into(), operator: operator.into(), values: Some(nodes.to_vec()) }
}

/// Why the host scheduler keeps nodes from a pod, as the tenant may see it: the reasons it
/// gives that say nothing of the host (resources, ports, the pod's own affinity), without how
/// many host nodes there are or which taints they carry; its preemption part goes (nothing of
/// a tenant's preempts on the host). Anything else is summed up in a word.
pub fn host_scheduling_message(message: &str) -> String {
    /// Reasons of the upstream scheduler's filter plugins that tell nothing of the host.
    const SHOWN: [&str; 13] = [
        "pod has unbound immediate PersistentVolumeClaims",
        "node(s) had no available volume zone",
        "node(s) didn't match Pod's node affinity/selector",
        "node(s) didn't have free ports for the requested pod ports",
        "node(s) didn't match pod affinity rules",
        "node(s) didn't match pod anti-affinity rules",
        "node(s) didn't satisfy existing pods anti-affinity rules",
        "node(s) didn't match pod topology spread constraints",
        "node(s) had volume node affinity conflict",
        "node(s) didn't find available persistent volumes to bind",
        "node(s) were unschedulable",
        "node(s) exceed max volume count",
        "Too many pods",
    ];
    let filters = message.split(". preemption:").next().unwrap_or_default();
    let Some((_, reasons)) = filters.split_once(" nodes are available: ") else {
        return "the host cannot place the pod now".to_string();
    };
    let mut shown: Vec<String> = vec![];
    for reason in reasons.trim_end_matches('.').split(", ") {
        // "3 Insufficient cpu": the count is the host's.
        let reason = reason.split_once(' ').filter(|(n, _)| n.parse::<u32>().is_ok()).map_or(reason, |(_, r)| r);
        let said = if reason.starts_with("node(s) had untolerated taint") {
            "node(s) had a taint the pod does not tolerate".to_string()
        } else if SHOWN.contains(&reason)
            || reason
                .strip_prefix("Insufficient ")
                .is_some_and(|r| r.chars().all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c)))
        {
            reason.to_string()
        } else {
            "other constraints of the host".to_string()
        };
        if !shown.contains(&said) {
            shown.push(said);
        }
    }
    format!("0 nodes are available: {}.", shown.join(", "))
}

/// What the host kubelet says of a pod (why it refused one bound to its node, why it evicted
/// one), as the tenant may see it (a pod's status message and conditions, the kubelet's events):
/// which resource ran short, without the node's capacity, threshold and what is left of it after
/// the other tenants' pods; taints unnamed. Any other message is as it was.
pub fn host_kubelet_message(message: &str) -> String {
    const SHORT: &str = "Node didn't have enough resource: ";
    const TAINT: &str = "node(s) had untolerated taint";
    // An eviction for node pressure: "The node was low on resource: memory. Threshold quantity:
    // 100Mi, available: 50Mi. Container app was using 200Mi, ..." (the pod's own use stays).
    const THRESHOLD: &str = "Threshold quantity: ";
    if let Some(at) = message.find(SHORT) {
        let rest = &message[at + SHORT.len()..];
        let resource = rest.split(',').next().unwrap_or_default();
        return format!("{}{SHORT}{resource}", &message[..at]);
    }
    if let Some(at) = message.find(TAINT) {
        return format!("{}node(s) had a taint the pod does not tolerate", &message[..at]);
    }
    if let Some(at) = message.find(THRESHOLD) {
        let rest = &message[at..];
        // The figures end with the sentence after "available: ".
        let end = rest.find("available: ").and_then(|a| rest[a..].find(". ").map(|e| a + e + 2));
        return match end {
            Some(end) => format!("{}{}", &message[..at], &rest[end..]),
            None => message[..at].trim_end().to_string(),
        };
    }
    message.to_string()
}

/// Takes `closed` out of the required terms' `metadata.name In` lists, and drops the terms left
/// with none. False if terms were required and none is left.
fn unpin(a: &mut NodeAffinity, closed: &[String]) -> bool {
    let Some(required) = a.required_during_scheduling_ignored_during_execution.as_mut() else { return true };
    required.node_selector_terms.retain_mut(|t| {
        t.match_fields.iter_mut().flatten().filter(|f| f.key == "metadata.name" && f.operator == "In").all(|f| {
            let values = f.values.get_or_insert_with(Vec::new);
            values.retain(|n| !closed.contains(n));
            !values.is_empty()
        })
    });
    !required.node_selector_terms.is_empty()
}

/// The nodes a pod is pinned to by name (`metadata.name In`) if every required term of its node
/// affinity pins it so (a DaemonSet's pod), all terms' names together. Only pins the host copy
/// keeps count: those naming `known` nodes only (`Scheduling::term` drops the others).
pub fn pinned_names(a: Option<&NodeAffinity>, known: &dyn Fn(&str) -> bool) -> Option<BTreeSet<String>> {
    let terms = &a?.required_during_scheduling_ignored_during_execution.as_ref()?.node_selector_terms;
    let mut names = BTreeSet::new();
    for t in terms {
        let kept = |f: &&NodeSelectorRequirement| {
            f.key == "metadata.name"
                && f.operator == "In"
                && f.values.as_ref().is_some_and(|v| !v.is_empty() && v.iter().all(|n| known(n)))
        };
        // Requirements of one term are ANDed: any one pin bounds where the term lets it go.
        let pin = t.match_fields.iter().flatten().find(kept)?;
        names.extend(pin.values.iter().flatten().cloned());
    }
    (!terms.is_empty()).then_some(names)
}

/// Of the closed nodes, those that can matter to a pod pinned to `pinned` by name: closing any
/// other leaves where it may go as it was, so its copy is not made again for it.
pub fn closed_for(pinned: Option<&BTreeSet<String>>, closed: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    closed.into_iter().filter(|n| pinned.is_none_or(|p| p.contains(n))).collect()
}

/// Requires one of `nodes` (`In`) or none of them (`NotIn`) in every required term (terms are
/// ORed, so each gets it).
fn pin(a: &mut NodeAffinity, operator: &str, nodes: &[String]) {
    let req = name_requirement(operator, nodes);
    let required = a
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector { node_selector_terms: vec![NodeSelectorTerm::default()] });
    for t in &mut required.node_selector_terms {
        t.match_fields.get_or_insert_with(Vec::new).push(req.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admin() -> Scheduling {
        Scheduling {
            node_selector: [("pool".to_string(), "tenants".to_string())].into(),
            tolerations: vec![
                serde_json::from_value(
                    json!({"key": "dedicated", "operator": "Equal", "value": "tenants", "effect": "NoSchedule"}),
                )
                .unwrap(),
            ],
            runtime_classes: vec!["gvisor".into()],
            priority_classes: vec!["batch".into()],
            ..Default::default()
        }
    }

    /// Against nodes `node-1` (labelled `disk=ssd` in the virtual cluster) and `node-2`.
    fn placed(s: &Scheduling, spec: serde_json::Value) -> (serde_json::Value, Placement) {
        placed_closing(s, spec, &[])
    }

    /// Like [`placed`], with `closed` cordoned or tainted by the tenant (`drain`), which a pod
    /// tolerating `drain` may still go to.
    fn placed_closing(s: &Scheduling, spec: serde_json::Value, closed: &[&str]) -> (serde_json::Value, Placement) {
        let mut spec: PodSpec = serde_json::from_value(spec).unwrap();
        let labels = |n: &str| -> BTreeMap<String, String> {
            if n == "node-1" { [("disk".to_string(), "ssd".to_string())].into() } else { BTreeMap::new() }
        };
        let labelled = |meets: &dyn Fn(&BTreeMap<String, String>) -> bool| -> Vec<String> {
            ["node-1", "node-2"].into_iter().filter(|n| meets(&labels(n))).map(String::from).collect()
        };
        let closed = |tolerations: &[Toleration]| {
            if tolerations.iter().any(|t| t.key.as_deref() == Some("drain")) {
                return Closed::default();
            }
            Closed { nodes: closed.iter().map(|n| n.to_string()).collect(), every_known: closed.len() == 2 }
        };
        let known = |n: &str| n == "node-1" || n == "node-2";
        let needless = |t: &Toleration| t.key.as_deref() == Some("drain");
        // node-2: the host cordoned it, or tainted it against the admin's tolerations.
        let bindable = |n: &str| n == "node-1";
        let nodes =
            Nodes { known: &known, labelled: &labelled, closed: &closed, needless: &needless, bindable: &bindable };
        let placement = s.apply(&mut spec, &nodes);
        (serde_json::to_value(spec).unwrap(), placement)
    }

    fn apply(s: &Scheduling, spec: serde_json::Value) -> (serde_json::Value, Vec<String>) {
        let (host, placement) = placed(s, spec);
        assert_eq!(placement.unschedulable, None);
        (host, placement.dropped)
    }

    #[test]
    fn the_admin_decides_and_the_tenant_is_told() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!({"nodeName": "control-plane"}), "spec.nodeName \"control-plane\""),
            (json!({"tolerations": [{"operator": "Exists"}]}), "tolerations[0] (every taint)"),
            (
                json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}),
                "key \"node-role.kubernetes.io/control-plane\"",
            ),
            (json!({"runtimeClassName": "privileged-runc"}), "runtimeClassName \"privileged-runc\""),
            (
                json!({"priorityClassName": "critical"}),
                "priorityClassName \"critical\" (the host runs the pod at its default priority; classes the platform admin offers: batch)",
            ),
            (
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["control-plane"]}]}]}}}}),
                "matchFields \"metadata.name\" In",
            ),
            (
                json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference":
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["cp"]}]}}]}}}),
                "preferred…[0].preference.matchFields \"metadata.name\" In [\"cp\"]",
            ),
        ];
        for (spec, needle) in cases {
            let mut spec = spec;
            spec["containers"] = json!([{"name": "c"}]);
            let (host, dropped) = apply(&admin(), spec.clone());
            assert!(dropped.iter().any(|d| d.contains(needle)), "{needle} not in {dropped:?} for {spec}");
            assert_eq!(host["nodeSelector"], json!({"pool": "tenants"}), "the admin's selector, alone: {host}");
            assert_eq!(
                host["tolerations"],
                json!([{"key": "dedicated", "operator": "Equal", "value": "tenants", "effect": "NoSchedule"}])
            );
            assert_eq!(host.get("nodeName"), None);
            assert_eq!(host.get("affinity"), None, "nothing of the tenant's node choice left: {host}");
            assert_eq!(host.get("runtimeClassName"), None);
            assert_eq!(host.get("priorityClassName"), None);
        }
    }

    #[test]
    fn a_priority_class_crosses_only_from_the_admins_list_and_goes_quietly_where_it_means_nothing_to_the_host() {
        let spec = |class: &str| json!({"containers": [{"name": "c"}], "priorityClassName": class});
        let (host, dropped) = apply(&admin(), spec("batch"));
        assert_eq!((host["priorityClassName"].as_str(), dropped), (Some("batch"), vec![]));
        // Built in everywhere (a tenant's CoreDNS names it); the host admits it in kube-system only.
        let (host, dropped) = apply(&admin(), spec("system-cluster-critical"));
        assert_eq!((host.get("priorityClassName"), dropped), (None, vec![]));
        // With a virtual scheduler the tenant's own classes order its pods in the virtual cluster.
        let virtual_scheduler = Scheduling { virtual_scheduler: true, ..admin() };
        let (host, dropped) = apply(&virtual_scheduler, spec("tenants-own"));
        assert_eq!((host.get("priorityClassName"), dropped), (None, vec![]));
        let (host, _) = apply(&virtual_scheduler, spec("batch"));
        assert_eq!(host["priorityClassName"], "batch");
    }

    #[test]
    fn what_the_admin_allows_survives() {
        let spec = json!({"containers": [{"name": "c"}], "nodeName": "node-1",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "runtimeClassName": "gvisor",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]},
                                      {"key": "secret-hw", "operator": "DoesNotExist"}]}]}}}});
        let (host, dropped) = apply(&admin(), spec);
        assert_eq!(dropped, Vec::<String>::new(), "the controller's disk-pressure toleration goes quietly");
        assert_eq!(host["nodeSelector"], json!({"kubernetes.io/os": "linux", "pool": "tenants"}));
        assert_eq!(host["runtimeClassName"], "gvisor");
        assert_eq!(host.get("nodeName"), None, "the host scheduler places it");
        assert_eq!(
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            json!([{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}],
                    "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}])
        );
        let keys: Vec<&str> =
            host["tolerations"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["node.kubernetes.io/not-ready", "dedicated"]);
    }

    #[test]
    fn where_the_admin_allows_it_a_bound_pod_stays_bound_to_a_node_that_may_take_it() {
        let bound = |node: &str| json!({"containers": [{"name": "c"}], "nodeName": node});
        let admin = Scheduling { bind_node_name: true, ..admin() };
        let (host, placement) = placed(&admin, bound("node-1"));
        assert_eq!(placement, Placement::default());
        assert_eq!(host["nodeName"], "node-1", "its kubelet admits it or not");
        assert_eq!(host.get("affinity"), None);
        assert_eq!(host["nodeSelector"], json!({"pool": "tenants"}), "which the kubelet checks too");
        // A node the host cordoned or tainted: the host scheduler's, as without the setting.
        let (host, _) = placed(&admin, bound("node-2"));
        assert_eq!(host.get("nodeName"), None);
        assert_eq!(
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}])
        );
        let (host, placement) = placed(&admin, bound("elsewhere"));
        assert_eq!((host.get("nodeName"), host.get("affinity")), (None, None));
        assert_eq!(placement.dropped, ["spec.nodeName \"elsewhere\" (not a node of this virtual cluster)"]);
        // Without the setting, never.
        let (host, _) = placed(&Scheduling { bind_node_name: false, ..admin }, bound("node-1"));
        assert_eq!(host.get("nodeName"), None);
    }

    #[test]
    fn a_node_selector_the_host_does_not_show_is_matched_against_the_clusters_nodes() {
        let (host, placement) =
            placed(&admin(), json!({"containers": [{"name": "c"}], "nodeSelector": {"disk": "ssd"}}));
        assert_eq!(placement, Placement::default());
        assert_eq!(host["nodeSelector"], json!({"pool": "tenants"}), "the tenant's key never reaches the host");
        assert_eq!(
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]),
            "pinned to the node labelled so"
        );
        let (host, placement) =
            placed(&admin(), json!({"containers": [{"name": "c"}], "nodeSelector": {"pool": "tenants"}}));
        assert_eq!(placement, Placement::default(), "the admin's own key and value: every host pod has it");
        assert_eq!(host.get("affinity"), None);
        let bound = json!({"containers": [{"name": "c"}], "nodeName": "node-2", "nodeSelector": {"disk": "ssd"}});
        let (_, placement) = placed(&admin(), bound);
        assert!(placement.unschedulable.is_some(), "bound to a node the selector does not match");
        let bound = json!({"containers": [{"name": "c"}], "nodeName": "node-1", "nodeSelector": {"disk": "ssd"}});
        let (host, placement) = placed(&admin(), bound);
        assert_eq!(placement, Placement::default());
        assert_eq!(
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]),
            "pinned once"
        );
        for selector in [
            json!({"disk": "hdd"}),
            json!({"pool": "system"}),
            json!({"node-role.kubernetes.io/control-plane": ""}),
            json!({"runtimeclass.vkube.dev/gvisor": "true"}),
        ] {
            let mark = selector.as_object().unwrap().keys().any(|k| k.starts_with(LABEL_RUNTIME_CLASS_PREFIX));
            let (host, placement) = placed(&admin(), json!({"containers": [{"name": "c"}], "nodeSelector": selector}));
            let why = placement.unschedulable.expect("no node matches");
            assert!(why.starts_with("0 nodes are available"), "{why}");
            assert_eq!(why.contains("spec.runtimeClassName instead"), mark, "{why}");
            assert_eq!(why.contains("label a node"), !mark, "{why}");
            assert_eq!(host["nodeSelector"], json!({"pool": "tenants"}), "the admin's selector, alone: {host}");
        }
        // A pod of the class (the virtual API server added the mark) bound to a node that lacks it.
        let bound = json!({"containers": [{"name": "c"}], "runtimeClassName": "gvisor", "nodeName": "node-2",
            "nodeSelector": {"runtimeclass.vkube.dev/gvisor": "true"}});
        let why = placed(&admin(), bound).1.unschedulable.expect("its node does not run the class");
        assert!(why.contains("RuntimeClass \"gvisor\"") && why.contains("delete the pod"), "{why}");
    }

    #[test]
    fn nodes_the_tenant_cordoned_or_tainted_are_kept_from_pods_that_do_not_tolerate_it() {
        let required = |host: &serde_json::Value| {
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                .clone()
        };
        let plain = json!({"containers": [{"name": "c"}]});
        let (host, placement) = placed_closing(&admin(), plain.clone(), &["node-2"]);
        assert_eq!(placement, Placement { kept_off: Some(vec!["node-2".into()]), ..Default::default() });
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-2"]}]}])
        );
        let (host, placement) = placed_closing(&admin(), plain.clone(), &["node-1", "node-2"]);
        let why = placement.unschedulable.expect("every node closed");
        assert!(why.starts_with("0 nodes are available: every node") && why.contains("node-1, node-2"), "{why}");
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-1", "node-2"]}]}])
        );
        // A toleration of the tenant's taint opens them (and is dropped from the host pod: only
        // the virtual cluster knows the taint).
        let tolerant = json!({"containers": [{"name": "c"}], "tolerations": [{"key": "drain", "operator": "Exists"}]});
        let (host, placement) = placed_closing(&admin(), tolerant, &["node-1", "node-2"]);
        assert_eq!(placement.unschedulable, None);
        assert_eq!(host.get("affinity"), None);
        assert_eq!(placement.dropped, Vec::<String>::new(), "honoured in the virtual cluster: no word");
        let other = json!({"containers": [{"name": "c"}], "tolerations": [{"key": "dedicated", "operator": "Exists"}]});
        let (_, placement) = placed_closing(&admin(), other, &[]);
        assert_eq!(placement.dropped, ["spec.tolerations[0] (key \"dedicated\")"]);
        // A node selector matched against the open nodes only.
        let ssd = json!({"containers": [{"name": "c"}], "nodeSelector": {"disk": "ssd"}});
        let (_, placement) = placed_closing(&admin(), ssd.clone(), &["node-1"]);
        let why = placement.unschedulable.expect("the one ssd node is closed");
        assert!(why.contains("not cordoned or tainted"), "{why}");
        let (host, placement) = placed_closing(&admin(), ssd, &["node-2"]);
        assert_eq!(placement, Placement::default());
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}])
        );
        // A DaemonSet's pod (pinned by node affinity) for a closed node waits, with no term that
        // cannot be met on the host; one for an open node keeps its pin.
        let daemon = |node: &str| {
            json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}}})
        };
        let (_, placement) = placed_closing(&admin(), daemon("node-2"), &["node-2"]);
        let why = placement.unschedulable.expect("its node is closed");
        assert!(why.contains("node affinity names"), "{why}");
        // Another node closed cannot matter to it: no NotIn, and an empty record (its copy is
        // made again if its own node closes before the host places it; a copy made while no
        // node was closed has no record, as any pod's).
        let (host, placement) = placed_closing(&admin(), daemon("node-1"), &["node-2"]);
        assert_eq!(placement, Placement { kept_off: Some(vec![]), ..Default::default() });
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}])
        );
        // Pinned to either node, one closed: the closed one's term goes, and it matters (its
        // reopening would let the pod go there again).
        let either = json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}]}}}});
        let (host, placement) = placed_closing(&admin(), either, &["node-2"]);
        assert_eq!(placement.kept_off, Some(vec!["node-2".into()]));
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]},
                                    {"key": "metadata.name", "operator": "NotIn", "values": ["node-2"]}]}])
        );
        // Pinned to a node the cluster's pods cannot go to: the pin goes (with a word), and the
        // pod, free to go anywhere, is kept off every closed node.
        let (host, placement) = placed_closing(&admin(), daemon("ghost"), &["node-2"]);
        assert_eq!(placement.kept_off, Some(vec!["node-2".into()]));
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-2"]}]}])
        );
        // Bound by the tenant: there, as a kubelet admits it.
        let bound = json!({"containers": [{"name": "c"}], "nodeName": "node-2"});
        let (host, placement) = placed_closing(&admin(), bound, &["node-1", "node-2"]);
        assert_eq!(placement, Placement::default());
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}])
        );
    }

    #[test]
    fn only_the_closed_nodes_a_pod_pinned_by_name_may_go_to_matter_to_it() {
        let affinity = |terms: serde_json::Value| -> NodeAffinity {
            serde_json::from_value(
                json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}),
            )
            .unwrap()
        };
        let name_in =
            |nodes: &[&str]| json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": nodes}]});
        let closed = || ["node-1".to_string(), "node-2".to_string(), "node-3".to_string()];
        let set = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();

        let known = |n: &str| n != "ghost";
        let pinned = |a: &NodeAffinity| pinned_names(Some(a), &known);
        let daemon = affinity(json!([name_in(&["node-2"])]));
        assert_eq!(pinned(&daemon), Some(set(&["node-2"])));
        assert_eq!(closed_for(pinned(&daemon).as_ref(), closed()), set(&["node-2"]));
        // Terms are ORed: the names of all of them.
        let either = affinity(json!([name_in(&["node-1"]), name_in(&["node-3"])]));
        assert_eq!(closed_for(pinned(&either).as_ref(), closed()), set(&["node-1", "node-3"]));
        // A term that does not pin by name, or only to a node the copy cannot be pinned to (the
        // host copy goes without that pin), may go anywhere: every closed node matters.
        let labels = json!({"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]});
        for unpinned in [
            affinity(json!([name_in(&["node-1"]), labels])),
            affinity(json!([name_in(&["ghost"])])),
            affinity(json!([name_in(&["node-1", "ghost"])])),
            affinity(json!([])),
            NodeAffinity::default(),
        ] {
            assert_eq!(pinned(&unpinned), None, "{unpinned:?}");
            assert_eq!(closed_for(pinned(&unpinned).as_ref(), closed()), set(&["node-1", "node-2", "node-3"]));
        }
        assert_eq!(pinned_names(None, &known), None);
    }

    #[test]
    fn node_affinity_on_labels_the_host_does_not_show_is_matched_against_the_clusters_nodes() {
        let affinity = |kind: &str, terms: serde_json::Value| {
            let spec = if kind == "required" {
                json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}})
            } else {
                json!({"preferredDuringSchedulingIgnoredDuringExecution": terms})
            };
            json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": spec}})
        };
        let required = |host: &serde_json::Value| {
            host["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                .clone()
        };
        let ssd = json!([{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]);
        let (host, placement) = placed(&admin(), affinity("required", ssd));
        assert_eq!(placement, Placement::default(), "matched, not dropped");
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}])
        );
        // Terms are ORed: one no node meets goes, the others stay.
        let either = json!([{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["hdd"]}]},
                            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]);
        let (host, placement) = placed(&admin(), affinity("required", either));
        assert_eq!(placement, Placement::default());
        assert_eq!(
            required(&host),
            json!([{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}])
        );
        let control_plane =
            json!([{"matchExpressions": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]);
        let (host, placement) = placed(&admin(), affinity("required", control_plane));
        let why = placement.unschedulable.expect("no node of the cluster is a control-plane node");
        assert!(why.contains("required node affinity"), "{why}");
        assert_eq!(host.get("affinity"), None);
        // Asking for a label to be absent keeps the pod off the nodes that have it, and no more.
        let not_ssd = json!([{"matchExpressions": [{"key": "disk", "operator": "DoesNotExist"}]}]);
        let (host, placement) = placed(&admin(), affinity("required", not_ssd));
        assert_eq!(placement, Placement::default());
        assert_eq!(
            required(&host),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["node-1"]}]}])
        );
        // A term every node meets (no node has hdd) makes the ORed requirement moot.
        let either = json!([{"matchExpressions": [{"key": "disk", "operator": "NotIn", "values": ["hdd"]}]},
                            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]);
        let (host, placement) = placed(&admin(), affinity("required", either));
        assert_eq!(placement, Placement::default());
        assert_eq!(host.get("affinity"), None, "{host}");
        // Preferences: matched the same way; one no node meets goes, without a word.
        let prefer = |key: &str, value: &str| json!([{"weight": 5, "preference": {"matchExpressions": [{"key": key, "operator": "In", "values": [value]}]}}]);
        let (host, placement) = placed(&admin(), affinity("preferred", prefer("disk", "ssd")));
        assert_eq!(placement, Placement::default());
        assert_eq!(
            host["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"],
            json!([{"weight": 5, "preference": {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}}])
        );
        let (host, placement) = placed(&admin(), affinity("preferred", prefer("kubernetes.io/hostname", "cp")));
        assert_eq!(placement, Placement::default());
        assert_eq!(host.get("affinity"), None);
        // Operators as the scheduler reads them.
        let labels: BTreeMap<String, String> =
            [("cores".to_string(), "8".to_string()), ("disk".to_string(), "ssd".to_string())].into();
        let r = |key: &str, operator: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        assert!(satisfies(&labels, &r("cores", "Gt", &["4"])) && !satisfies(&labels, &r("cores", "Lt", &["4"])));
        assert!(!satisfies(&labels, &r("disk", "Gt", &["4"])), "not a number");
        assert!(satisfies(&labels, &r("disk", "NotIn", &["hdd"])) && satisfies(&labels, &r("gpu", "NotIn", &["a100"])));
        assert!(!satisfies(&labels, &r("disk", "Bogus", &[])));
    }

    #[test]
    fn the_host_schedulers_reasons_reach_the_tenant_without_the_hosts_details() {
        let host = "0/5 nodes are available: 1 Insufficient cpu, 1 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, 1 node(s) had untolerated taint {corp/secret-pool: finance}. preemption: 0/5 nodes are available: 5 Preemption is not helpful for scheduling.";
        assert_eq!(
            host_scheduling_message(host),
            "0 nodes are available: Insufficient cpu, Insufficient nvidia.com/gpu, node(s) had a taint the pod does not tolerate."
        );
        let ports = "0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports.";
        assert_eq!(
            host_scheduling_message(ports),
            "0 nodes are available: node(s) didn't have free ports for the requested pod ports."
        );
        let plugin = "0/3 nodes are available: 3 node(s) were rejected by corp-placement plugin on rack r12.";
        assert_eq!(host_scheduling_message(plugin), "0 nodes are available: other constraints of the host.");
        assert_eq!(
            host_kubelet_message(
                "Pod was rejected: Node didn't have enough resource: cpu, requested: 1500, used: 1900, capacity: 2000"
            ),
            "Pod was rejected: Node didn't have enough resource: cpu"
        );
        assert_eq!(
            host_kubelet_message(
                "Node didn't have enough resource: example.com/gpu, requested: 1, used: 3, capacity: 4"
            ),
            "Node didn't have enough resource: example.com/gpu"
        );
        assert_eq!(
            host_kubelet_message(
                "Pod was rejected: Predicate TaintToleration failed: node(s) had untolerated taint {team-b: gpu}"
            ),
            "Pod was rejected: Predicate TaintToleration failed: node(s) had a taint the pod does not tolerate"
        );
        assert_eq!(
            host_kubelet_message(
                "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. Container app was using 200Mi, request is 0, has larger consumption of memory. "
            ),
            "The node was low on resource: memory. Container app was using 200Mi, request is 0, has larger consumption of memory. "
        );
        assert_eq!(
            host_kubelet_message(
                "The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi, available: 10Mi."
            ),
            "The node was low on resource: ephemeral-storage."
        );
        let ports =
            "Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports";
        assert_eq!(host_kubelet_message(ports), ports);
        assert_eq!(
            host_scheduling_message("running PreBind plugin \"VolumeBinding\": binding volumes: pv-7 on node n-3"),
            "the host cannot place the pod now"
        );
    }

    #[test]
    fn a_daemonset_pod_keeps_its_node() {
        let spec = json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]}}}});
        let (host, dropped) = apply(&Scheduling::default(), spec.clone());
        assert_eq!(dropped, Vec::<String>::new());
        assert_eq!(host["affinity"], spec["affinity"]);
    }
}
