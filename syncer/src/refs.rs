//! What a pod refers to (configmaps, secrets, claims, its service account, its node), and an
//! index of those references, so "is this configmap used?" is a lookup, not a scan of all pods.
//! Ingresses' TLS Secrets are in it too, under users named `ingress:NAME` (`ingresses`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, PodSpec};

/// The kinds of object a pod can refer to by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefKind {
    ConfigMap,
    Secret,
    PersistentVolumeClaim,
    /// The (virtual) node the pod is bound to; cluster-scoped.
    Node,
}

/// Everything one pod refers to: (kind, name), namespaced in the pod's namespace except nodes.
pub fn pod_refs(pod: &Pod) -> BTreeSet<(RefKind, String)> {
    let mut out = BTreeSet::new();
    if let Some(spec) = &pod.spec {
        spec_refs(spec, &mut out);
    }
    out
}

/// The claims the virtual cluster makes for a pod's generic ephemeral volumes (`POD-VOLUME`, as
/// the ephemeral-volume controller names them).
pub fn ephemeral_claims(pod: &Pod) -> impl Iterator<Item = String> + '_ {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let volumes = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    volumes.filter(|v| v.ephemeral.is_some()).map(move |v| format!("{name}-{}", v.name))
}

fn spec_refs(spec: &PodSpec, out: &mut BTreeSet<(RefKind, String)>) {
    use RefKind::*;
    for vol in spec.volumes.iter().flatten() {
        if let Some(cm) = &vol.config_map {
            out.insert((ConfigMap, cm.name.clone()));
        }
        if let Some(s) = vol.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            out.insert((Secret, s));
        }
        if let Some(pvc) = &vol.persistent_volume_claim {
            out.insert((PersistentVolumeClaim, pvc.claim_name.clone()));
        }
        if let Some(s) = vol.csi.as_ref().and_then(|c| c.node_publish_secret_ref.as_ref()) {
            out.insert((Secret, s.name.clone()));
        }
        for src in vol.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map {
                out.insert((ConfigMap, cm.name.clone()));
            }
            if let Some(s) = &src.secret {
                out.insert((Secret, s.name.clone()));
            }
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(ContainerEnv::from)
        .chain(spec.ephemeral_containers.iter().flatten().map(ContainerEnv::from));
    for c in containers {
        for e in c.env.into_iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    out.insert((ConfigMap, r.name.clone()));
                }
                if let Some(r) = &from.secret_key_ref {
                    out.insert((Secret, r.name.clone()));
                }
            }
        }
        for e in c.env_from.into_iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                out.insert((ConfigMap, r.name.clone()));
            }
            if let Some(r) = &e.secret_ref {
                out.insert((Secret, r.name.clone()));
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        out.insert((Secret, s.name.clone()));
    }
    if let Some(node) = &spec.node_name {
        out.insert((Node, node.clone()));
    }
}

pub fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name.clone().unwrap_or_else(|| "default".into())
}

/// The env-bearing parts of containers and ephemeral containers alike.
struct ContainerEnv<'a> {
    env: Option<&'a Vec<k8s_openapi::api::core::v1::EnvVar>>,
    env_from: Option<&'a Vec<k8s_openapi::api::core::v1::EnvFromSource>>,
}

impl<'a> From<&'a Container> for ContainerEnv<'a> {
    fn from(c: &'a Container) -> Self {
        ContainerEnv { env: c.env.as_ref(), env_from: c.env_from.as_ref() }
    }
}

impl<'a> From<&'a EphemeralContainer> for ContainerEnv<'a> {
    fn from(c: &'a EphemeralContainer) -> Self {
        ContainerEnv { env: c.env.as_ref(), env_from: c.env_from.as_ref() }
    }
}

type Target = (RefKind, String, String);

/// Which virtual pods refer to which objects. Updated from the virtual pod watch.
#[derive(Default)]
pub struct RefIndex {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (kind, namespace, name) -> pods (namespace, name) referring to it.
    users: HashMap<Target, HashSet<(String, String)>>,
    /// pod (namespace, name) -> what it refers to.
    refs: HashMap<(String, String), BTreeSet<(RefKind, String)>>,
}

impl RefIndex {
    /// Records a pod's current references; returns the targets whose use changed (old and new).
    pub fn update(&self, namespace: &str, name: &str, refs: BTreeSet<(RefKind, String)>) -> Vec<Target> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let pod = (namespace.to_string(), name.to_string());
        let old = inner.refs.insert(pod.clone(), refs.clone()).unwrap_or_default();
        let target = |(k, n): &(RefKind, String)| {
            let ns = if *k == RefKind::Node { String::new() } else { namespace.to_string() };
            (*k, ns, n.clone())
        };
        let mut changed = vec![];
        for r in old.difference(&refs) {
            let t = target(r);
            if let Some(set) = inner.users.get_mut(&t) {
                set.remove(&pod);
                if set.is_empty() {
                    inner.users.remove(&t);
                }
            }
            changed.push(t);
        }
        for r in refs.difference(&old) {
            let t = target(r);
            inner.users.entry(t.clone()).or_default().insert(pod.clone());
            changed.push(t);
        }
        changed
    }

    /// Forgets a deleted pod; returns what it referred to.
    pub fn remove(&self, namespace: &str, name: &str) -> Vec<Target> {
        self.update(namespace, name, BTreeSet::new())
    }

    /// Whether any pod refers to the object (`namespace` is empty for nodes).
    pub fn is_used(&self, kind: RefKind, namespace: &str, name: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.users.get(&(kind, namespace.to_string(), name.to_string())).is_some_and(|s| !s.is_empty())
    }

    /// Whether the index knows the pod at all (it has seen it since start).
    pub fn knows(&self, namespace: &str, name: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.refs.contains_key(&(namespace.to_string(), name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RefKind::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec})).unwrap()
    }

    #[test]
    fn every_kind_of_reference_is_found() {
        let p = pod(serde_json::json!({
            "serviceAccountName": "robot",
            "nodeName": "node-1",
            "imagePullSecrets": [{"name": "pull"}],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "init-env"}}]}],
            "containers": [{"name": "c",
                "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "a"}}},
                        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "b"}}}],
                "envFrom": [{"configMapRef": {"name": "cm-from"}}]}],
            "volumes": [
                {"name": "v1", "configMap": {"name": "cm-vol"}},
                {"name": "v2", "secret": {"secretName": "s-vol"}},
                {"name": "v3", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "v4", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt"}},
                    {"secret": {"name": "s-proj"}}]}}]
        }));
        let refs = pod_refs(&p);
        let want: BTreeSet<(RefKind, String)> = [
            (ConfigMap, "cm-env"),
            (ConfigMap, "cm-from"),
            (ConfigMap, "cm-vol"),
            (ConfigMap, "kube-root-ca.crt"),
            (Secret, "init-env"),
            (Secret, "s-env"),
            (Secret, "s-vol"),
            (Secret, "s-proj"),
            (Secret, "pull"),
            (PersistentVolumeClaim, "data"),
            (Node, "node-1"),
        ]
        .into_iter()
        .map(|(k, n)| (k, n.to_string()))
        .collect();
        assert_eq!(refs, want);
    }

    #[test]
    fn the_index_tracks_use_until_the_last_pod_goes() {
        let idx = RefIndex::default();
        let refs = |names: &[&str]| names.iter().map(|n| (ConfigMap, n.to_string())).collect::<BTreeSet<_>>();
        idx.update("ns", "a", refs(&["shared", "only-a"]));
        idx.update("ns", "b", refs(&["shared"]));
        assert!(idx.is_used(ConfigMap, "ns", "shared"));
        assert!(!idx.is_used(ConfigMap, "other", "shared"), "namespaces are separate");
        let changed = idx.remove("ns", "a");
        assert!(changed.contains(&(ConfigMap, "ns".into(), "only-a".into())));
        assert!(!idx.is_used(ConfigMap, "ns", "only-a"));
        assert!(idx.is_used(ConfigMap, "ns", "shared"));
        idx.update("ns", "b", refs(&[]));
        assert!(!idx.is_used(ConfigMap, "ns", "shared"));
    }

    #[test]
    fn nodes_are_cluster_scoped_in_the_index() {
        let idx = RefIndex::default();
        idx.update("a", "p", [(Node, "n1".to_string())].into());
        idx.update("b", "q", [(Node, "n1".to_string())].into());
        idx.remove("a", "p");
        assert!(idx.is_used(Node, "", "n1"));
        idx.remove("b", "q");
        assert!(!idx.is_used(Node, "", "n1"));
    }
}
