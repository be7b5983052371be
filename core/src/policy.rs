//! The isolation policy enforced at the host boundary. The tenant is cluster-admin inside its
//! virtual cluster, so this is where the platform admin's rules hold: whatever the tenant creates,
//! an object that breaks them never reaches the host. Pure: objects in, refusals out.
//!
//! Pod checks follow the Pod Security Standards (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>):
//! `baseline` (the default) and `restricted`; `privileged` turns them off.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Capabilities, Container, PodSpec, SecurityContext, ServiceSpec};

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

/// What the platform admin allows; set on the control-plane process, never by the tenant.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub pod_security: PodSecurityLevel,
    pub allow_node_ports: bool,
    pub allow_load_balancers: bool,
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

/// Capabilities the baseline level lets containers add.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

const SAFE_SYSCTLS: [&str; 9] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
];

/// Volume types the restricted level allows.
const RESTRICTED_VOLUMES: [&str; 8] =
    ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

impl Policy {
    /// Checks a pod spec; every violation is named in the refusal.
    pub fn check_pod(&self, spec: &PodSpec) -> Result<(), Refusal> {
        let level = self.pod_security;
        if level == PodSecurityLevel::Privileged {
            return Ok(());
        }
        let mut v: Vec<String> = vec![];
        if spec.host_network == Some(true) {
            v.push("hostNetwork=true".into());
        }
        if spec.host_pid == Some(true) {
            v.push("hostPID=true".into());
        }
        if spec.host_ipc == Some(true) {
            v.push("hostIPC=true".into());
        }
        for vol in spec.volumes.iter().flatten() {
            if vol.host_path.is_some() {
                v.push(format!("hostPath volume {:?}", vol.name));
            }
        }
        if let Some(sc) = &spec.security_context {
            for s in sc.sysctls.iter().flatten() {
                if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
                    v.push(format!("unsafe sysctl {:?}", s.name));
                }
            }
            if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
                v.push("windows hostProcess".into());
            }
            if sc.seccomp_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
                v.push("seccompProfile Unconfined".into());
            }
            if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
                v.push("appArmorProfile Unconfined".into());
            }
            if let Some(t) = sc.se_linux_options.as_ref().and_then(|o| o.type_.as_deref())
                && !["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"].contains(&t)
            {
                v.push(format!("seLinuxOptions type {t:?}"));
            }
        }
        for (kind, c) in containers(spec) {
            let where_ = format!("{kind} {:?}", c.name);
            for p in c.ports.iter().flatten() {
                if p.host_port.is_some_and(|hp| hp != 0) {
                    v.push(format!("{where_}: hostPort {}", p.host_port.unwrap_or_default()));
                }
            }
            if let Some(sc) = &c.security_context {
                baseline_container(sc, &where_, &mut v);
            }
        }
        if level == PodSecurityLevel::Restricted {
            restricted(spec, &mut v);
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(Refusal {
                reason: "PodSecurity",
                message: format!(
                    "refused by the host's isolation policy (pod security level {:?}): {}",
                    level.as_str(),
                    v.join("; ")
                ),
            })
        }
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
        if spec.external_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
            return Err(Refusal {
                reason: "ExternalIPsNotAllowed",
                message: "refused by the host's isolation policy: services may not set externalIPs".into(),
            });
        }
        Ok(())
    }
}

/// Every container of the pod with the fields the checks read; ephemeral containers
/// (`kubectl debug`) included, since they run on the host like the others.
fn containers(spec: &PodSpec) -> impl Iterator<Item = (&'static str, Container)> + '_ {
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|e| {
        let c = Container {
            name: e.name.clone(),
            ports: e.ports.clone(),
            security_context: e.security_context.clone(),
            ..Default::default()
        };
        ("ephemeralContainer", c)
    });
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainer", c.clone()))
        .chain(spec.containers.iter().map(|c| ("container", c.clone())))
        .chain(ephemeral)
}

fn baseline_container(sc: &SecurityContext, where_: &str, v: &mut Vec<String>) {
    if sc.privileged == Some(true) {
        v.push(format!("{where_}: privileged=true"));
    }
    let allowed: BTreeSet<&str> = BASELINE_CAPABILITIES.into_iter().collect();
    for cap in sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).into_iter().flatten() {
        if !allowed.contains(cap.trim_start_matches("CAP_")) {
            v.push(format!("{where_}: adds capability {cap}"));
        }
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        v.push(format!("{where_}: procMount {}", sc.proc_mount.as_deref().unwrap_or_default()));
    }
    if sc.seccomp_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
        v.push(format!("{where_}: seccompProfile Unconfined"));
    }
    if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ == "Unconfined") {
        v.push(format!("{where_}: appArmorProfile Unconfined"));
    }
    if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
        v.push(format!("{where_}: windows hostProcess"));
    }
}

fn restricted(spec: &PodSpec, v: &mut Vec<String>) {
    for vol in spec.volumes.iter().flatten() {
        let json = serde_json::to_value(vol).unwrap_or_default();
        let kinds: Vec<&String> =
            json.as_object().map(|o| o.keys().filter(|k| *k != "name").collect()).unwrap_or_default();
        for k in kinds {
            if !RESTRICTED_VOLUMES.contains(&k.as_str()) {
                v.push(format!("volume {:?} of type {k}", vol.name));
            }
        }
    }
    let pod_sc = spec.security_context.as_ref();
    let pod_non_root = pod_sc.and_then(|s| s.run_as_non_root) == Some(true);
    let pod_seccomp = pod_sc.and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.clone());
    for (kind, c) in containers(spec) {
        let where_ = format!("{kind} {:?}", c.name);
        let sc = c.security_context.as_ref();
        if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
            v.push(format!("{where_}: allowPrivilegeEscalation must be false"));
        }
        let non_root = sc.and_then(|s| s.run_as_non_root).unwrap_or(pod_non_root);
        if !non_root {
            v.push(format!("{where_}: runAsNonRoot must be true"));
        }
        if sc.and_then(|s| s.run_as_user).or(pod_sc.and_then(|s| s.run_as_user)) == Some(0) {
            v.push(format!("{where_}: runAsUser must not be 0"));
        }
        let seccomp = sc.and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.clone()).or(pod_seccomp.clone());
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault") | Some("Localhost")) {
            v.push(format!("{where_}: seccompProfile must be RuntimeDefault or Localhost"));
        }
        let caps: Option<&Capabilities> = sc.and_then(|s| s.capabilities.as_ref());
        if !caps.and_then(|c| c.drop.as_ref()).is_some_and(|d| d.iter().any(|x| x == "ALL")) {
            v.push(format!("{where_}: capabilities must drop ALL"));
        }
        for cap in caps.and_then(|c| c.add.as_ref()).into_iter().flatten() {
            if cap != "NET_BIND_SERVICE" {
                v.push(format!("{where_}: may only add NET_BIND_SERVICE, not {cap}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).unwrap()
    }

    fn baseline() -> Policy {
        Policy::default()
    }

    #[test]
    fn an_ordinary_pod_passes() {
        let spec =
            pod(serde_json::json!({"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}],
            "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "CAP_CHOWN"]}}}],
            "volumes": [{"name": "data", "emptyDir": {}}]}));
        assert_eq!(baseline().check_pod(&spec), Ok(()));
    }

    #[test]
    fn each_baseline_violation_is_refused_and_named() {
        let cases = [
            (serde_json::json!({"hostNetwork": true, "containers": [{"name": "c"}]}), "hostNetwork"),
            (serde_json::json!({"hostPID": true, "containers": [{"name": "c"}]}), "hostPID"),
            (serde_json::json!({"hostIPC": true, "containers": [{"name": "c"}]}), "hostIPC"),
            (
                serde_json::json!({"containers": [{"name": "c"}], "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                "hostPath",
            ),
            (serde_json::json!({"containers": [{"name": "c", "securityContext": {"privileged": true}}]}), "privileged"),
            (
                serde_json::json!({"initContainers": [{"name": "i", "securityContext": {"privileged": true}}], "containers": [{"name": "c"}]}),
                "initContainer \"i\": privileged",
            ),
            (
                serde_json::json!({"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}),
                "SYS_ADMIN",
            ),
            (
                serde_json::json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                "hostPort 8080",
            ),
            (
                serde_json::json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}, "containers": [{"name": "c"}]}),
                "kernel.msgmax",
            ),
            (
                serde_json::json!({"containers": [{"name": "c", "securityContext": {"procMount": "Unmasked"}}]}),
                "procMount",
            ),
            (
                serde_json::json!({"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "dbg", "securityContext": {"privileged": true}}]}),
                "ephemeralContainer \"dbg\": privileged",
            ),
        ];
        for (json, needle) in cases {
            let err = baseline().check_pod(&pod(json.clone())).expect_err(&json.to_string());
            assert!(err.message.contains(needle), "{needle} not in {}", err.message);
            assert_eq!(err.reason, "PodSecurity");
        }
    }

    #[test]
    fn privileged_level_allows_everything_and_restricted_asks_more() {
        let spec = pod(
            serde_json::json!({"hostNetwork": true, "containers": [{"name": "c", "securityContext": {"privileged": true}}]}),
        );
        let privileged = Policy { pod_security: PodSecurityLevel::Privileged, ..Default::default() };
        assert_eq!(privileged.check_pod(&spec), Ok(()));

        let restricted = Policy { pod_security: PodSecurityLevel::Restricted, ..Default::default() };
        let plain = pod(serde_json::json!({"containers": [{"name": "c"}]}));
        let err = restricted.check_pod(&plain).unwrap_err();
        assert!(err.message.contains("runAsNonRoot"), "{}", err.message);
        let hardened = pod(serde_json::json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "cfg", "configMap": {"name": "x"}}]}));
        assert_eq!(restricted.check_pod(&hardened), Ok(()));
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
        let ext: ServiceSpec = serde_json::from_value(serde_json::json!({"externalIPs": ["1.2.3.4"]})).unwrap();
        assert_eq!(baseline().check_service(&ext).unwrap_err().reason, "ExternalIPsNotAllowed");
        let cip: ServiceSpec = serde_json::from_value(serde_json::json!({"ports": [{"port": 80}]})).unwrap();
        assert_eq!(baseline().check_service(&cip), Ok(()));
    }
}
