//! The addresses of this cluster's host pods, as the host reports them (never as the tenant
//! writes its virtual pods' status): the addresses a selector-less Service's endpoints may name
//! without the admin's ranges (`policy::endpoints`). Kept from the host pod watch (about 100
//! bytes per pod), beside which of the tenant's Endpoints and EndpointSlices name which address,
//! so that an address becoming or ceasing to be a pod's brings back exactly those.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;

use crate::context::Key;

/// A virtual object naming addresses: its kind (`Endpoints`, `EndpointSlice`) and key.
pub type Naming = (&'static str, Key);

#[derive(Default)]
pub struct PodIps(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    by_pod: HashMap<String, Vec<IpAddr>>,
    /// How many pods hold each address (one, unless the host reuses it before a watch says so).
    held: HashMap<IpAddr, u32>,
    /// What each of the tenant's endpoint objects named when last looked at, and the reverse.
    by_object: HashMap<Naming, Vec<IpAddr>>,
    named_by: HashMap<IpAddr, BTreeSet<Naming>>,
}

impl Inner {
    /// Records the addresses host pod `pod` holds (none once it is gone); the endpoint objects
    /// naming an address it took or gave up.
    fn set(&mut self, pod: &str, ips: Vec<IpAddr>) -> BTreeSet<Naming> {
        let Inner { by_pod, held, named_by, .. } = self;
        let before = if ips.is_empty() { by_pod.remove(pod) } else { by_pod.insert(pod.to_string(), ips.clone()) };
        let before = before.unwrap_or_default();
        if before == ips {
            return BTreeSet::new();
        }
        let mut changed = vec![];
        for ip in &before {
            if let Some(n) = held.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(ip);
                    changed.push(*ip);
                }
            }
        }
        for ip in ips {
            let n = held.entry(ip).or_default();
            *n += 1;
            if *n == 1 {
                changed.push(ip);
            }
        }
        changed.iter().filter_map(|ip| named_by.get(ip)).flatten().cloned().collect()
    }
}

impl PodIps {
    /// Records the addresses host pod `pod` holds (none once it is gone); the endpoint objects
    /// naming an address it took or gave up.
    pub fn set(&self, pod: &str, ips: Vec<IpAddr>) -> BTreeSet<Naming> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).set(pod, ips)
    }

    /// Forgets the pods `keep` says are gone (an initial list that failed part way reports pods
    /// it never reports gone); the endpoint objects naming an address given up. `keep` is asked
    /// under the lock, so a pod recreated meanwhile under the same name is not forgotten.
    pub fn retain_pods(&self, keep: impl Fn(&str) -> bool) -> BTreeSet<Naming> {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = inner.by_pod.keys().filter(|p| !keep(p)).cloned().collect();
        let mut naming = BTreeSet::new();
        for pod in gone {
            naming.extend(inner.set(&pod, vec![]));
        }
        naming
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).held.contains_key(ip)
    }

    /// Records the addresses `object` names (none: it is gone).
    pub fn named(&self, object: Naming, ips: Vec<IpAddr>) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { by_object, named_by, .. } = &mut *inner;
        let before =
            if ips.is_empty() { by_object.remove(&object) } else { by_object.insert(object.clone(), ips.clone()) };
        for ip in before.unwrap_or_default() {
            if let Some(set) = named_by.get_mut(&ip) {
                set.remove(&object);
                if set.is_empty() {
                    named_by.remove(&ip);
                }
            }
        }
        for ip in ips {
            named_by.entry(ip).or_default().insert(object.clone());
        }
    }
}

/// The addresses a host pod holds for itself: none for a pod on its node's network (the node's
/// address), one being deleted (its sandbox, and with it the address, may already be gone) or
/// one that has finished (the host may give its address to another pod) (pure).
pub fn of(p: &Pod) -> Vec<IpAddr> {
    if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) || p.metadata.deletion_timestamp.is_some() {
        return vec![];
    }
    let Some(status) = &p.status else { return vec![] };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return vec![];
    }
    let listed = status.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    let mut ips: Vec<IpAddr> =
        status.pod_ip.as_deref().into_iter().chain(listed).filter_map(vkube_core::policy::endpoints::parse).collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_pods_own_addresses_while_it_runs() {
        let running = pod(serde_json::json!({"status": {"phase": "Running", "podIP": "10.244.0.5",
            "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00::5"}]}}));
        assert_eq!(of(&running), ["10.244.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        let done = pod(serde_json::json!({"status": {"phase": "Succeeded", "podIP": "10.244.0.5"}}));
        assert!(of(&done).is_empty(), "a finished pod's address may be another's");
        let deleting = pod(serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-07T00:00:00Z"},
            "status": {"phase": "Running", "podIP": "10.244.0.5"}}));
        assert!(of(&deleting).is_empty(), "a pod being deleted may have given its address up");
        let node = pod(serde_json::json!({"spec": {"containers": [], "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "172.18.0.2"}}));
        assert!(of(&node).is_empty(), "the node's address is not the pod's");
        assert!(of(&pod(serde_json::json!({}))).is_empty());
        let mapped = pod(serde_json::json!({"status": {"phase": "Running", "podIP": "::ffff:10.244.0.9"}}));
        assert_eq!(of(&mapped), ["10.244.0.9".parse::<IpAddr>().unwrap()], "read as Go reads it");
    }

    #[test]
    fn an_address_is_held_until_every_pod_holding_it_lets_go() {
        let ips = PodIps::default();
        let a: IpAddr = "10.244.0.5".parse().unwrap();
        let ep: Naming = ("Endpoints", ("b".into(), "db".into()));
        ips.named(ep.clone(), vec![a]);
        assert_eq!(ips.set("p", vec![a]), BTreeSet::from([ep.clone()]), "a pod took an address an Endpoints names");
        assert!(ips.set("p", vec![a]).is_empty(), "unchanged");
        assert!(ips.set("q", vec![a]).is_empty(), "reused before p's watch event: still held");
        assert!(ips.set("p", vec![]).is_empty());
        assert!(ips.contains(&a), "q still holds it");
        assert_eq!(ips.set("q", vec!["10.244.0.6".parse().unwrap()]), BTreeSet::from([ep.clone()]), "given up");
        assert!(!ips.contains(&a));
        assert!(ips.set("gone", vec![]).is_empty(), "a pod never seen");
        ips.named(ep, vec![]);
        assert!(ips.set("r", vec![a]).is_empty(), "an object gone names nothing");
        ips.retain_pods(|p| p != "r");
        assert!(!ips.contains(&a), "a pod the store does not have is forgotten");
    }
}
