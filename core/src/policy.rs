//! The isolation policy enforced at the host boundary. The tenant is cluster-admin inside its
//! virtual cluster, so this is where the platform admin's rules hold: whatever the tenant creates,
//! an object that breaks them never reaches the host. Pure: objects in, refusals out.
//!
//! - `pod_security`: the Pod Security Standards, field by field;
//! - `volumes`: the volume types that may reach the host (an allowlist);
//! - `scheduling`: where host pods may run (the admin's selector and tolerations, and what of
//!   the tenant's node choice survives);
//! - `cluster_ips`: which hand-picked Service addresses may be taken on the host;
//! - `endpoints`: which addresses a selector-less Service's endpoints may name on the host;
//! - `egress`: which address ranges tenants' NetworkPolicies may open egress to;
//! - `storage`: which storage classes and volumes a claim may ask of the host;
//! - `ingresses`: which ingress classes and host names tenants' Ingresses may use.

pub mod cluster_ips;
pub mod egress;
pub mod endpoints;
pub mod ingresses;
pub mod pod_security;
pub mod scheduling;
pub mod storage;
pub mod volumes;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodSpec, ServiceSpec};

pub use scheduling::Scheduling;
pub use storage::Storage;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    Privileged,
    #[default]
    Baseline,
    Restricted,
}

impl std::str::FromStr for PodSecurityLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "privileged" => Ok(Self::Privileged),
            "baseline" => Ok(Self::Baseline),
            "restricted" => Ok(Self::Restricted),
            _ => Err(format!("unknown pod security level {s:?}: use privileged, baseline or restricted")),
        }
    }
}

impl PodSecurityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

/// What an admin's list allows, as a refusal names it: `a, b`, or `none`.
pub(crate) fn listed<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let all: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if all.is_empty() { "none".into() } else { all.join(", ") }
}

/// What the platform admin allows; set on the control-plane process, never by the tenant.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub pod_security: PodSecurityLevel,
    pub allow_node_ports: bool,
    pub allow_load_balancers: bool,
    /// Load balancer classes tenants' LoadBalancer Services may name (none: the host's default
    /// load balancer only).
    pub load_balancer_classes: Vec<String>,
    /// Let tenants choose their node ports (and health-check node ports) by hand; else the host
    /// chooses, so no tenant can take a port the host's admin or another team counts on.
    pub allow_node_port_choice: bool,
    /// Inline CSI volume drivers tenants may use (none unless the admin lists them).
    pub csi_drivers: Vec<String>,
    /// The storage classes tenants' claims may name.
    pub storage: Storage,
    pub scheduling: Scheduling,
    /// The host's service ranges: a tenant's hand-picked ClusterIPs must be in them, above their
    /// static bands (none known: no hand-picked address is taken on the host).
    pub service_ranges: Vec<ipnet::IpNet>,
    /// Ranges the endpoints of selector-less Services may name besides the cluster's own pods
    /// (none unless the admin lists them).
    pub endpoint_ranges: Vec<ipnet::IpNet>,
    /// Ranges tenants' NetworkPolicies may open their pods' egress to besides the cluster's
    /// pods and control plane (none unless the admin lists them).
    pub egress_ranges: Vec<ipnet::IpNet>,
    pub ingresses: ingresses::Ingresses,
}

/// Why an object is kept off the host, in words a tenant can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Policy {
    /// Checks a pod (its annotations and spec) against the Pod Security level and the volume
    /// allowlist; every violation is named in the refusal.
    pub fn check_pod(&self, annotations: Option<&BTreeMap<String, String>>, spec: &PodSpec) -> Result<(), Refusal> {
        let level = self.pod_security;
        let security = pod_security::violations(level, annotations, spec);
        if !security.is_empty() {
            return Err(Refusal {
                reason: "PodSecurity",
                message: format!(
                    "refused by the host's isolation policy (pod security level {:?}): {}",
                    level.as_str(),
                    security.join("; ")
                ),
            });
        }
        let volumes =
            volumes::violations(spec, level == PodSecurityLevel::Privileged, &self.csi_drivers, &self.storage);
        if !volumes.is_empty() {
            return Err(Refusal {
                reason: "VolumeNotAllowed",
                message: format!("refused by the host's isolation policy: {}", volumes.join("; ")),
            });
        }
        Ok(())
    }

    /// Checks a service spec: node ports, load balancers and external IPs expose the host.
    pub fn check_service(&self, spec: &ServiceSpec) -> Result<(), Refusal> {
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        if type_ == "NodePort" && !self.allow_node_ports {
            return Err(Refusal {
                reason: "NodePortNotAllowed",
                message: "refused by the host's isolation policy: NodePort services are not allowed in this virtual cluster (ask the platform admin to enable them, or use type ClusterIP)".into(),
            });
        }
        if type_ == "LoadBalancer" && !self.allow_load_balancers {
            return Err(Refusal {
                reason: "LoadBalancerNotAllowed",
                message: "refused by the host's isolation policy: LoadBalancer services are not allowed in this virtual cluster (ask the platform admin to enable them, or use type ClusterIP)".into(),
            });
        }
        if let Some(class) = spec.load_balancer_class.as_deref()
            && !self.load_balancer_classes.iter().any(|c| c == class)
        {
            return Err(Refusal {
                reason: "LoadBalancerNotAllowed",
                message: format!(
                    "refused by the host's isolation policy: spec.loadBalancerClass: {class:?} is not one the platform \
                     admin allows (policy.loadBalancerClasses: {}); leave it out for the host's default load balancer",
                    listed(&self.load_balancer_classes)
                ),
            });
        }
        if spec.external_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
            return Err(Refusal {
                reason: "ExternalIPsNotAllowed",
                message: "refused by the host's isolation policy: services may not set externalIPs".into(),
            });
        }
        Ok(())
    }

    /// Checks a claim against the storage the admin allows (`storage::Storage`).
    pub fn check_claim(&self, claim: &k8s_openapi::api::core::v1::PersistentVolumeClaim) -> Result<(), Refusal> {
        let spec = claim.spec.clone().unwrap_or_default();
        let violations = self.storage.violations("spec", claim.metadata.annotations.as_ref(), &spec);
        if violations.is_empty() {
            return Ok(());
        }
        Err(Refusal {
            reason: "StorageNotAllowed",
            message: format!("refused by the host's isolation policy: {}", violations.join("; ")),
        })
    }

    /// Checks the addresses `(field, ip)` a selector-less Service's endpoints name
    /// (`endpoints::violation`); `own_pod` says whether an address is one of the cluster's pods.
    pub fn check_endpoint_addresses<'a>(
        &self,
        own_pod: impl Fn(&std::net::IpAddr) -> bool,
        addresses: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<(), Refusal> {
        match endpoints::violation(&self.endpoint_ranges, own_pod, addresses) {
            None => Ok(()),
            Some(why) => Err(Refusal {
                reason: "EndpointNotAllowed",
                message: format!("refused by the host's isolation policy: {why}"),
            }),
        }
    }

    /// Checks the ClusterIPs a tenant picked by hand (`cluster_ips::violation`).
    pub fn check_cluster_ips(&self, cluster_ip: Option<&str>, cluster_ips: &[String]) -> Result<(), Refusal> {
        match cluster_ips::violation(&self.service_ranges, cluster_ips::of(cluster_ip, cluster_ips)) {
            None => Ok(()),
            Some(why) => Err(Refusal { reason: "ClusterIPNotAllowed", message: why }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> Policy {
        Policy::default()
    }

    #[test]
    fn pods_are_checked_for_security_then_volumes() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({"containers": [{"name": "c"}],
            "volumes": [{"name": "share", "nfs": {"server": "10.0.0.1", "path": "/"}}]}))
        .unwrap();
        assert_eq!(baseline().check_pod(None, &spec).unwrap_err().reason, "VolumeNotAllowed");
        let privileged = Policy { pod_security: PodSecurityLevel::Privileged, ..Default::default() };
        assert_eq!(privileged.check_pod(None, &spec).unwrap_err().reason, "VolumeNotAllowed", "whatever the level");
        let mut root: PodSpec = serde_json::from_value(serde_json::json!({"containers": [{"name": "c"}],
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}))
        .unwrap();
        assert_eq!(baseline().check_pod(None, &root).unwrap_err().reason, "PodSecurity");
        assert_eq!(privileged.check_pod(None, &root), Ok(()), "hostPath is what the privileged level is for");
        root.host_network = Some(true);
        assert!(baseline().check_pod(None, &root).unwrap_err().message.contains("hostNetwork=true"));
    }

    #[test]
    fn node_ports_and_load_balancers_need_the_admin() {
        let np: ServiceSpec =
            serde_json::from_value(serde_json::json!({"type": "NodePort", "ports": [{"port": 80}]})).unwrap();
        assert_eq!(baseline().check_service(&np).unwrap_err().reason, "NodePortNotAllowed");
        let allowed = Policy { allow_node_ports: true, ..Default::default() };
        assert_eq!(allowed.check_service(&np), Ok(()));
        let lb: ServiceSpec = serde_json::from_value(serde_json::json!({"type": "LoadBalancer"})).unwrap();
        assert_eq!(baseline().check_service(&lb).unwrap_err().reason, "LoadBalancerNotAllowed");
        let classed: ServiceSpec = serde_json::from_value(
            serde_json::json!({"type": "LoadBalancer", "loadBalancerClass": "example.com/public"}),
        )
        .unwrap();
        let lbs = Policy { allow_load_balancers: true, ..Default::default() };
        assert!(
            lbs.check_service(&classed).unwrap_err().message.contains("spec.loadBalancerClass: \"example.com/public\"")
        );
        let listed = Policy { load_balancer_classes: vec!["example.com/public".into()], ..lbs };
        assert_eq!(listed.check_service(&classed), Ok(()));
        let ext: ServiceSpec = serde_json::from_value(serde_json::json!({"externalIPs": ["1.2.3.4"]})).unwrap();
        assert_eq!(baseline().check_service(&ext).unwrap_err().reason, "ExternalIPsNotAllowed");
        let cip: ServiceSpec = serde_json::from_value(serde_json::json!({"ports": [{"port": 80}]})).unwrap();
        assert_eq!(baseline().check_service(&cip), Ok(()));
    }
}
