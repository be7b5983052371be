//! The addresses of this cluster's host pods, as the host reports them (never as the tenant
//! writes its virtual pods' status): the addresses a selector-less Service's endpoints may name
//! without the admin's ranges (`policy::endpoints`). Kept from the host pod watch, about 100
//! bytes per pod.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;

#[derive(Default)]
pub struct PodIps(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    by_pod: HashMap<String, Vec<IpAddr>>,
    /// How many pods hold each address (one, unless the host reuses it before a watch says so).
    held: HashMap<IpAddr, u32>,
}

impl PodIps {
    /// Records the addresses host pod `pod` holds (none once it is gone); whether they changed.
    pub fn set(&self, pod: &str, ips: Vec<IpAddr>) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { by_pod, held } = &mut *inner;
        let before = if ips.is_empty() { by_pod.remove(pod) } else { by_pod.insert(pod.to_string(), ips.clone()) };
        let before = before.unwrap_or_default();
        if before == ips {
            return false;
        }
        for ip in &before {
            if let Some(n) = held.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(ip);
                }
            }
        }
        for ip in ips {
            *held.entry(ip).or_default() += 1;
        }
        true
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).held.contains_key(ip)
    }
}

/// The addresses a host pod holds for itself: none for a pod on its node's network (the node's
/// address) or one that has finished (the host may give its address to another pod) (pure).
pub fn of(p: &Pod) -> Vec<IpAddr> {
    if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return vec![];
    }
    let Some(status) = &p.status else { return vec![] };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return vec![];
    }
    let listed = status.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    let mut ips: Vec<IpAddr> =
        status.pod_ip.as_deref().into_iter().chain(listed).filter_map(|s| s.parse().ok()).collect();
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
        let node = pod(serde_json::json!({"spec": {"containers": [], "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "172.18.0.2"}}));
        assert!(of(&node).is_empty(), "the node's address is not the pod's");
        assert!(of(&pod(serde_json::json!({}))).is_empty());
    }

    #[test]
    fn an_address_is_held_until_every_pod_holding_it_lets_go() {
        let ips = PodIps::default();
        let a: IpAddr = "10.244.0.5".parse().unwrap();
        assert!(ips.set("p", vec![a]));
        assert!(!ips.set("p", vec![a]), "unchanged");
        assert!(ips.set("q", vec![a]), "reused before p's watch event");
        assert!(ips.set("p", vec![]));
        assert!(ips.contains(&a), "q still holds it");
        assert!(ips.set("q", vec!["10.244.0.6".parse().unwrap()]));
        assert!(!ips.contains(&a));
        assert!(!ips.set("gone", vec![]), "a pod never seen");
    }
}
