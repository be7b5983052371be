//! How virtual objects are named and marked on the host. This is a contract: changing it
//! orphans every host object synced under the old scheme, so changes need a migration.
//!
//! - A namespaced virtual object `<name>` in virtual namespace `<ns>` of virtual cluster `<vc>`
//!   becomes `<name>-x-<ns>-x-<vc>` in the cluster's host namespace, when that is at most 63
//!   characters and unambiguous (neither `<name>` nor `<ns>` contains `-x-`, starts with `x-` or
//!   ends with `-x`, so the separators can only be read one way). Otherwise it is the first 46
//!   characters of that string (trailing `-`/`.` trimmed), `-`, and the first 16 hex digits (64
//!   bits, so a tenant cannot search for a collision) of SHA-256 of `<vc>/<ns>/<name>` (`/`
//!   cannot occur in any of the three).
//! - Every host object carries the labels `vkube.dev/cluster=<vc>` (ownership; host watches
//!   select on it) and `vkube.dev/namespace=<ns>`, and the annotations `vkube.dev/object-kind`,
//!   `-name`, `-namespace` and `-uid` naming the virtual object it mirrors. A host object without
//!   them, or with another cluster's, is never modified or deleted.
//! - A host Secret holding a pod's service-account token also carries `vkube.dev/token=true`.
//! - Tenant label and annotation keys reach the host in the tenant domain `t.vkube.dev`, so no
//!   host tool acting on labels or annotations (other namespaces' NetworkPolicies, CNI, service
//!   meshes, external-dns, Prometheus, secret reflectors) reads them, and no tenant forges our
//!   marks: `key` becomes `t.vkube.dev/key`, `prefix/key` becomes `prefix.t.vkube.dev/key`
//!   (reversible: one suffix is stripped per pass). Keys the platform admin lists
//!   ([`Translator::with_verbatim_keys`]: exact keys or `prefix/*`) are copied as they are,
//!   never one in our domain. A prefix too long to extend (over 241 characters) becomes the first
//!   16 hex digits of its SHA-256, `.t.vkube.dev` (not reversible: it reads back as `<hash>/key`).
//! - Label selectors keep their terms (keys translated the same way) and gain
//!   `vkube.dev/cluster=<vc>` and `vkube.dev/namespace=<ns>`, so they only ever match objects of
//!   the same virtual cluster and namespace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use sha2::{Digest, Sha256};

pub use crate::contract::{
    ANNOTATION_KIND, ANNOTATION_NAME, ANNOTATION_NAMESPACE, ANNOTATION_UID, DOMAIN, LABEL_CLUSTER, LABEL_NAMESPACE,
    LABEL_TOKEN,
};

const SEPARATOR: &str = "-x-";
const MAX_NAME: usize = 63;
const HASHED_PREFIX: usize = 46;
/// Where tenant label and annotation keys live on the host.
pub const TENANT_DOMAIN: &str = "t.vkube.dev";
/// The longest DNS subdomain a key prefix may be.
const MAX_PREFIX: usize = 253;

/// The virtual object a host object mirrors, read from its marks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    /// Whether the marks name virtual object `kind` `namespace`/`name` (of any uid).
    pub fn is(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.kind == kind && self.namespace == namespace && self.name == name
    }
}

/// Translation between one virtual cluster and its host namespace.
#[derive(Clone, Debug)]
pub struct Translator {
    cluster: String,
    host_namespace: String,
    /// Label and annotation keys the admin lets through as they are (exact, or `prefix/*`).
    verbatim: std::sync::Arc<[String]>,
}

impl Translator {
    pub fn new(cluster: impl Into<String>, host_namespace: impl Into<String>) -> Self {
        Translator { cluster: cluster.into(), host_namespace: host_namespace.into(), verbatim: Default::default() }
    }

    /// The same, copying the label and annotation keys `keys` (exact, or `prefix/*`) verbatim.
    pub fn with_verbatim_keys(mut self, keys: Vec<String>) -> Self {
        self.verbatim = keys.into();
        self
    }

    /// The host key of a tenant's label or annotation key.
    pub fn host_key(&self, key: &str) -> String {
        if !is_reserved_key(key) && self.is_verbatim(key) {
            return key.to_string();
        }
        match key.split_once('/') {
            None => format!("{TENANT_DOMAIN}/{key}"),
            Some((prefix, name)) if prefix.len() + 1 + TENANT_DOMAIN.len() <= MAX_PREFIX => {
                format!("{prefix}.{TENANT_DOMAIN}/{name}")
            }
            Some((prefix, name)) => {
                format!("{}.{TENANT_DOMAIN}/{name}", short_hash(prefix))
            }
        }
    }

    /// The tenant's key a host key stands for (the inverse of [`Self::host_key`]).
    pub fn virtual_key(&self, key: &str) -> String {
        match key.split_once('/') {
            Some((TENANT_DOMAIN, name)) => name.to_string(),
            Some((prefix, name)) => match prefix.strip_suffix(TENANT_DOMAIN).and_then(|p| p.strip_suffix('.')) {
                Some(original) => format!("{original}/{name}"),
                None => key.to_string(),
            },
            None => key.to_string(),
        }
    }

    /// Whether a host label or annotation key is one the syncer writes (its own contract, the
    /// tenant domain, the admin's verbatim keys); any other was added on the host (an admission
    /// webhook, a controller) and is left there.
    pub fn writes_key(&self, key: &str) -> bool {
        is_reserved_key(key) || self.is_verbatim(key)
    }

    /// Gives `desired` the labels and annotations of `current` the syncer does not write, so an
    /// update keeps what the host's own machinery added instead of fighting it.
    pub fn keep_host_keys(&self, desired: &mut ObjectMeta, current: &ObjectMeta) {
        for (want, have) in [(&mut desired.labels, &current.labels), (&mut desired.annotations, &current.annotations)] {
            let added: Vec<(&String, &String)> = have.iter().flatten().filter(|(k, _)| !self.writes_key(k)).collect();
            if !added.is_empty() {
                let want = want.get_or_insert_with(Default::default);
                for (k, v) in added {
                    want.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }

    fn is_verbatim(&self, key: &str) -> bool {
        self.verbatim.iter().any(|k| match k.strip_suffix("/*") {
            Some(prefix) => key.split_once('/').is_some_and(|(p, _)| p == prefix),
            None => k == key,
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn host_namespace(&self) -> &str {
        &self.host_namespace
    }

    /// The host name of the virtual object `name` in virtual namespace `namespace`.
    pub fn host_name(&self, namespace: &str, name: &str) -> String {
        let readable = format!("{name}{SEPARATOR}{namespace}{SEPARATOR}{}", self.cluster);
        if readable.len() <= MAX_NAME && unambiguous(name) && unambiguous(namespace) {
            return readable;
        }
        let prefix = readable[..readable.len().min(HASHED_PREFIX)].trim_end_matches(['-', '.']);
        format!("{prefix}-{}", short_hash(&format!("{}/{namespace}/{name}", self.cluster)))
    }

    /// The label selector (string form) that matches every host object of this virtual cluster.
    pub fn cluster_selector(&self) -> String {
        format!("{LABEL_CLUSTER}={}", self.cluster)
    }

    /// Host labels for a virtual object's labels: reserved keys rewritten, ownership added.
    pub fn host_labels(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> =
            labels.into_iter().flatten().map(|(k, v)| (self.host_key(k), v.clone())).collect();
        out.insert(LABEL_CLUSTER.into(), self.cluster.clone());
        out.insert(LABEL_NAMESPACE.into(), namespace.into());
        out
    }

    /// The virtual labels a host object's labels stand for (the inverse of [`Self::host_labels`]).
    pub fn virtual_labels(&self, labels: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
        labels
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != LABEL_CLUSTER && k.as_str() != LABEL_NAMESPACE)
            .map(|(k, v)| (self.virtual_key(k), v.clone()))
            .collect()
    }

    /// A map selector (Service `.spec.selector`) that can only match pods of the same virtual
    /// cluster and namespace.
    pub fn host_selector(&self, namespace: &str, selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        self.host_labels(namespace, Some(selector))
    }

    /// A `LabelSelector` (affinity, topology spread, ...) confined to the same virtual cluster
    /// and namespace. `namespace` is the virtual namespace the selector applies to.
    pub fn host_label_selector(&self, namespace: &str, selector: &LabelSelector) -> LabelSelector {
        let match_expressions = selector.match_expressions.as_ref().map(|exprs| {
            exprs
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.key = self.host_key(&e.key);
                    e
                })
                .collect()
        });
        LabelSelector {
            match_labels: Some(self.host_labels(namespace, selector.match_labels.as_ref())),
            match_expressions,
        }
    }

    /// A selector of this virtual cluster's host pods that `selector` matches, in the virtual
    /// namespaces `namespaces` (`None`: in any of the cluster's namespaces; empty: in none).
    pub fn host_pods_selector(&self, namespaces: Option<&[String]>, selector: &LabelSelector) -> LabelSelector {
        let mut host = self.host_label_selector("", selector);
        if let Some(ml) = host.match_labels.as_mut() {
            ml.remove(LABEL_NAMESPACE);
        }
        if let Some(list) = namespaces {
            // No namespace at all: a value no host pod of ours has (namespace names are never empty).
            let values = if list.is_empty() { vec![String::new()] } else { list.to_vec() };
            host.match_expressions.get_or_insert_with(Vec::new).push(LabelSelectorRequirement {
                key: LABEL_NAMESPACE.into(),
                operator: "In".into(),
                values: Some(values),
            });
        }
        host
    }

    /// The ownership annotations of the host copy of a virtual object.
    pub fn owner_annotations(&self, kind: &str, namespace: &str, name: &str, uid: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ANNOTATION_KIND.to_string(), kind.to_string()),
            (ANNOTATION_NAME.to_string(), name.to_string()),
            (ANNOTATION_NAMESPACE.to_string(), namespace.to_string()),
            (ANNOTATION_UID.to_string(), uid.to_string()),
        ])
    }

    /// Metadata of the host copy of a virtual object: translated name, our namespace, labels
    /// and annotations with their keys translated (minus kubectl's last-applied copy), our marks.
    pub fn host_meta(&self, kind: &str, meta: &ObjectMeta) -> ObjectMeta {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let name = meta.name.as_deref().unwrap_or_default();
        let mut annotations: BTreeMap<String, String> = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != LAST_APPLIED)
            .map(|(k, v)| (self.host_key(k), v.clone()))
            .collect();
        annotations.extend(self.owner_annotations(kind, ns, name, meta.uid.as_deref().unwrap_or_default()));
        ObjectMeta {
            name: Some(self.host_name(ns, name)),
            namespace: Some(self.host_namespace.clone()),
            labels: Some(self.host_labels(ns, meta.labels.as_ref())),
            annotations: Some(annotations),
            ..Default::default()
        }
    }

    /// The virtual object a host object mirrors, if this virtual cluster owns it. `None` means
    /// "not ours": never modify or delete it.
    pub fn owner(&self, meta: &ObjectMeta) -> Option<Owner> {
        let labels = meta.labels.as_ref()?;
        if labels.get(LABEL_CLUSTER) != Some(&self.cluster) {
            return None;
        }
        let ann = meta.annotations.as_ref()?;
        let get = |k: &str| ann.get(k).filter(|v| !v.is_empty()).cloned();
        Some(Owner {
            kind: get(ANNOTATION_KIND)?,
            name: get(ANNOTATION_NAME)?,
            namespace: get(ANNOTATION_NAMESPACE)?,
            uid: get(ANNOTATION_UID)?,
        })
    }
}

/// A name or namespace whose `-x-` separators could not be misread.
fn unambiguous(part: &str) -> bool {
    !part.contains(SEPARATOR) && !part.starts_with("x-") && !part.ends_with("-x")
}

/// kubectl's copy of the applied manifest: large and meaningless on the host.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Whether a label or annotation key is in our domain.
/// A virtual namespace's name and labels.
pub type NamespaceLabels = (String, BTreeMap<String, String>);

/// The virtual namespaces a namespace selector means: `None` for all of them (an empty
/// selector), else those whose labels it matches. On the host every pod of the cluster shares one
/// namespace, so namespace selectors (policy peers, affinity terms) become this list. A selector
/// kube cannot read matches nothing (the safe side).
pub fn namespaces_matching(selector: &LabelSelector, namespaces: &[NamespaceLabels]) -> Option<Vec<String>> {
    use kube_core::{Selector, SelectorExt};
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector.match_expressions.as_ref().is_none_or(|e| e.is_empty());
    if empty {
        return None;
    }
    Some(match Selector::try_from(selector.clone()) {
        Ok(s) => namespaces.iter().filter(|(_, labels)| s.matches(labels)).map(|(n, _)| n.clone()).collect(),
        Err(_) => vec![],
    })
}

pub fn is_reserved_key(key: &str) -> bool {
    key.split_once('/').is_some_and(|(p, _)| is_reserved_prefix(p))
}

fn is_reserved_prefix(prefix: &str) -> bool {
    prefix == DOMAIN || prefix.ends_with(&format!(".{DOMAIN}"))
}

/// Host text (an event's or a kubelet's message) with a host object's name, alone or as
/// `namespace/name`, given back as the tenant knows the object.
pub fn names_back(text: &str, host_ns: &str, host_name: &str, ns: &str, name: &str) -> String {
    if host_name.is_empty() {
        return text.to_string();
    }
    text.replace(&format!("{host_ns}/{host_name}"), &format!("{ns}/{name}")).replace(host_name, name)
}

/// The first 8 bytes of `text`'s SHA-256, as 16 hex digits: 64 bits keep names that must be short
/// (host names, keys) apart.
pub fn short_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn keys_the_host_added_are_kept_and_ours_follow_the_tenant() {
        let tr = Translator::new("vc", "host-ns").with_verbatim_keys(vec!["team".into()]);
        let meta = |labels: serde_json::Value| -> ObjectMeta {
            serde_json::from_value(serde_json::json!({"labels": labels})).unwrap()
        };
        let current = meta(serde_json::json!({
            "vkube.dev/cluster": "vc", "t.vkube.dev/app": "old", "team": "a",
            "sidecar.istio.io/inject": "true", "webhook.corp/added": "yes"}));
        let mut desired = meta(serde_json::json!({"vkube.dev/cluster": "vc", "t.vkube.dev/app": "new"}));
        tr.keep_host_keys(&mut desired, &current);
        let got = desired.labels.unwrap();
        assert_eq!(got["t.vkube.dev/app"], "new", "ours follow the tenant");
        assert_eq!(got["webhook.corp/added"], "yes", "the host's stay");
        assert_eq!(got["sidecar.istio.io/inject"], "true");
        assert!(!got.contains_key("team"), "a verbatim key is ours: the tenant removed it");
    }
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn t() -> Translator {
        Translator::new("team-a", "vkube-team-a")
    }

    /// Hashed names are part of the contract with host objects already written: a change here
    /// would orphan them on an upgrade.
    #[test]
    fn hashed_names_and_keys_stay_as_written() {
        let long = "a".repeat(60);
        assert_eq!(t().host_name("default", &long), format!("{}-3ae7f5b767ffdc61", "a".repeat(46)));
        let prefix = format!("{}.example.com", "x".repeat(250));
        assert_eq!(t().host_key(&format!("{prefix}/k")), format!("0fdd8e874c03e2aa.{TENANT_DOMAIN}/k"));
    }

    #[test]
    fn short_names_are_readable() {
        assert_eq!(t().host_name("default", "web"), "web-x-default-x-team-a");
    }

    #[test]
    fn the_scheme_is_stable() {
        // Pinned values (checked independently with Python's hashlib): if these change, existing
        // host objects are orphaned.
        let long = "a-very-long-deployment-name-that-goes-on-and-on-0123456789";
        assert_eq!(t().host_name("default", long), "a-very-long-deployment-name-that-goes-on-and-o-a962a860bb72ace4");
        assert_eq!(t().host_name("x-b", "a"), "a-x-x-b-x-team-a-57963de5949613ea");
    }

    #[test]
    fn long_names_are_hashed_within_limits() {
        let name = "n".repeat(253);
        let host = t().host_name("some-namespace", &name);
        assert!(host.len() <= 63, "{host}");
        assert!(host.starts_with("nnnn"));
        assert_ne!(host, t().host_name("some-namespace", &"n".repeat(252)));
    }

    #[test]
    fn separators_inside_names_cannot_collide() {
        let tr = t();
        // Without the ambiguity rule these two would both be "a-x-x-b-x-team-a".
        assert_ne!(tr.host_name("b", "a-x"), tr.host_name("x-b", "a"));
        assert_ne!(tr.host_name("c", "a-x-b"), tr.host_name("b-x-c", "a"));
        assert_ne!(tr.host_name("b-x", "a"), tr.host_name("x", "a-x-b"));
    }

    #[test]
    fn no_collisions_in_a_dense_sample() {
        let tr = t();
        let parts = ["a", "x", "a-x", "x-a", "a-x-a", "b", "x-x", "a-x-x", "default", "kube-system", "web"];
        let mut seen = std::collections::HashMap::new();
        for ns in parts {
            for name in parts {
                let host = tr.host_name(ns, name);
                assert!(host.len() <= 63);
                if let Some(prev) = seen.insert(host.clone(), (ns, name)) {
                    panic!("{host}: both {prev:?} and {:?}", (ns, name));
                }
            }
        }
    }

    #[test]
    fn different_clusters_never_share_names() {
        let a = Translator::new("a", "ns");
        let b = Translator::new("b", "ns");
        assert_ne!(a.host_name("default", "web"), b.host_name("default", "web"));
    }

    #[test]
    fn hashed_prefix_does_not_end_in_a_separator() {
        let host = t().host_name("default", &format!("{}.{}", "a".repeat(51), "b".repeat(20)));
        assert!(!host.contains(".-"), "{host}");
    }

    #[test]
    fn labels_round_trip_and_reserved_keys_cannot_be_forged() {
        let tr = t();
        let user = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            (LABEL_CLUSTER.to_string(), "team-b".to_string()),
            ("tenant.vkube.dev/x".to_string(), "1".to_string()),
        ]);
        let host = tr.host_labels("default", Some(&user));
        assert_eq!(host[LABEL_CLUSTER], "team-a", "the tenant's value must not win");
        assert_eq!(host["vkube.dev.t.vkube.dev/cluster"], "team-b");
        assert_eq!(host["tenant.vkube.dev.t.vkube.dev/x"], "1");
        assert_eq!(host["t.vkube.dev/app"], "web");
        assert_eq!(host[LABEL_NAMESPACE], "default");
        assert_eq!(tr.virtual_labels(Some(&host)), user);
    }

    #[test]
    fn tenant_keys_stay_in_the_tenant_domain_unless_the_admin_lets_them_through() {
        let tr = t().with_verbatim_keys(vec!["app.kubernetes.io/*".into(), "team".into(), "vkube.dev/*".into()]);
        let cases = [
            ("role", "t.vkube.dev/role"),
            ("k8s.v1.cni.cncf.io/networks", "k8s.v1.cni.cncf.io.t.vkube.dev/networks"),
            ("sidecar.istio.io/inject", "sidecar.istio.io.t.vkube.dev/inject"),
            ("t.vkube.dev/app", "t.vkube.dev.t.vkube.dev/app"),
            ("app.kubernetes.io/name", "app.kubernetes.io/name"),
            ("team", "team"),
            ("sub.app.kubernetes.io/name", "sub.app.kubernetes.io.t.vkube.dev/name"),
            ("vkube.dev/cluster", "vkube.dev.t.vkube.dev/cluster"),
        ];
        for (key, host) in cases {
            assert_eq!(tr.host_key(key), host, "{key}");
            assert_eq!(tr.virtual_key(host), key, "{host} reads back");
        }
        let long = format!("{}/k", "p".repeat(245));
        let hashed = tr.host_key(&long);
        assert!(hashed.ends_with(".t.vkube.dev/k") && hashed.len() < 63, "{hashed}");
    }

    #[test]
    fn selectors_are_confined_to_the_virtual_namespace() {
        let tr = t();
        let sel = tr.host_selector("default", &BTreeMap::from([("app".to_string(), "web".to_string())]));
        assert_eq!(sel["t.vkube.dev/app"], "web");
        assert_eq!(sel[LABEL_CLUSTER], "team-a");
        assert_eq!(sel[LABEL_NAMESPACE], "default");

        let ls = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "vkube.dev/cluster".into(),
                operator: "In".into(),
                values: Some(vec!["team-b".into()]),
            }]),
        };
        let host = tr.host_label_selector("prod", &ls);
        let ml = host.match_labels.unwrap();
        assert_eq!(ml[LABEL_CLUSTER], "team-a");
        assert_eq!(ml[LABEL_NAMESPACE], "prod");
        assert_eq!(host.match_expressions.unwrap()[0].key, "vkube.dev.t.vkube.dev/cluster");
    }

    #[test]
    fn ownership_requires_our_cluster_and_all_marks() {
        let tr = t();
        let mut meta = ObjectMeta {
            labels: Some(tr.host_labels("default", None)),
            annotations: Some(tr.owner_annotations("Pod", "default", "web", "uid-1")),
            ..Default::default()
        };
        assert_eq!(
            tr.owner(&meta),
            Some(Owner { kind: "Pod".into(), namespace: "default".into(), name: "web".into(), uid: "uid-1".into() })
        );
        assert_eq!(Translator::new("team-b", "vkube-team-a").owner(&meta), None, "another cluster's object");
        meta.annotations.as_mut().unwrap().remove(ANNOTATION_UID);
        assert_eq!(tr.owner(&meta), None, "incomplete marks");
        assert_eq!(tr.owner(&ObjectMeta::default()), None);
    }
}
