//! The Pod Security Standards (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>),
//! checked field by field as k8s.io/pod-security-admission v0.37 does: `baseline` and
//! `restricted`; `privileged` turns them off. Every container counts: init containers (sidecars
//! too) and ephemeral ones (`kubectl debug`) run on the host like the others.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HTTPGetAction, LifecycleHandler, PodSpec, Probe, SELinuxOptions, SecurityContext,
    TCPSocketAction,
};

use super::PodSecurityLevel;

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

/// Sysctls namespaced per pod (upstream's list for 1.37).
const SAFE_SYSCTLS: [&str; 14] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_notsent_lowat",
];

const SELINUX_TYPES: [&str; 5] = ["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"];

/// The deprecated per-container AppArmor annotation, still honoured by kubelets.
const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// Volume types the restricted level allows.
const RESTRICTED_VOLUMES: [&str; 8] =
    ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

/// Every violation of `level` in a pod, each naming its field.
pub fn violations(
    level: PodSecurityLevel,
    annotations: Option<&BTreeMap<String, String>>,
    spec: &PodSpec,
) -> Vec<String> {
    let mut v = vec![];
    if level == PodSecurityLevel::Privileged {
        return v;
    }
    baseline(annotations, spec, &mut v);
    if level == PodSecurityLevel::Restricted {
        restricted(spec, &mut v);
    }
    v
}

/// Every container of the pod with the fields the checks read.
pub(super) fn containers(spec: &PodSpec) -> impl Iterator<Item = (&'static str, Container)> + '_ {
    let ephemeral = spec.ephemeral_containers.iter().flatten().map(|e| {
        let c = Container {
            name: e.name.clone(),
            ports: e.ports.clone(),
            security_context: e.security_context.clone(),
            liveness_probe: e.liveness_probe.clone(),
            readiness_probe: e.readiness_probe.clone(),
            startup_probe: e.startup_probe.clone(),
            lifecycle: e.lifecycle.clone(),
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

fn baseline(annotations: Option<&BTreeMap<String, String>>, spec: &PodSpec, v: &mut Vec<String>) {
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
    for (key, value) in annotations.into_iter().flatten() {
        if key.starts_with(APPARMOR_ANNOTATION_PREFIX)
            && !(value == "runtime/default" || value.starts_with("localhost/"))
        {
            v.push(format!("annotation {key}={value:?}"));
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
        se_linux(sc.se_linux_options.as_ref(), "securityContext", v);
    }
    for (kind, c) in containers(spec) {
        let where_ = format!("{kind} {:?}", c.name);
        for p in c.ports.iter().flatten() {
            if let Some(hp) = p.host_port.filter(|hp| *hp != 0) {
                v.push(format!("{where_}: hostPort {hp}"));
            }
        }
        if let Some(sc) = &c.security_context {
            baseline_container(sc, &where_, v);
        }
        host_probes(&c, &where_, v);
    }
}

fn baseline_container(sc: &SecurityContext, where_: &str, v: &mut Vec<String>) {
    if sc.privileged == Some(true) {
        v.push(format!("{where_}: privileged=true"));
    }
    for cap in sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).into_iter().flatten() {
        if !BASELINE_CAPABILITIES.contains(&cap.trim_start_matches("CAP_")) {
            v.push(format!("{where_}: adds capability {cap}"));
        }
    }
    if let Some(m) = sc.proc_mount.as_deref().filter(|m| *m != "Default") {
        v.push(format!("{where_}: procMount {m}"));
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
    se_linux(sc.se_linux_options.as_ref(), &format!("{where_}: securityContext"), v);
}

/// SELinux: only the container types, never a user or role of the tenant's choosing.
fn se_linux(opts: Option<&SELinuxOptions>, where_: &str, v: &mut Vec<String>) {
    let Some(o) = opts else { return };
    if let Some(t) = o.type_.as_deref().filter(|t| !SELINUX_TYPES.contains(t)) {
        v.push(format!("{where_}.seLinuxOptions.type {t:?}"));
    }
    if let Some(u) = o.user.as_deref().filter(|u| !u.is_empty()) {
        v.push(format!("{where_}.seLinuxOptions.user {u:?}"));
    }
    if let Some(r) = o.role.as_deref().filter(|r| !r.is_empty()) {
        v.push(format!("{where_}.seLinuxOptions.role {r:?}"));
    }
}

/// Probes and lifecycle hooks with a `host`: the node's kubelet would connect wherever the
/// tenant says (the host's metadata service, its API server).
fn host_probes(c: &Container, where_: &str, v: &mut Vec<String>) {
    let mut check = |name: &str, http: Option<&HTTPGetAction>, tcp: Option<&TCPSocketAction>| {
        let hosts = [http.and_then(|h| h.host.as_deref()), tcp.and_then(|t| t.host.as_deref())];
        for h in hosts.into_iter().flatten().filter(|h| !h.is_empty()) {
            v.push(format!("{where_}: {name}.host {h:?}"));
        }
    };
    for (name, p) in [
        ("livenessProbe", &c.liveness_probe),
        ("readinessProbe", &c.readiness_probe),
        ("startupProbe", &c.startup_probe),
    ] {
        let p: Option<&Probe> = p.as_ref();
        check(name, p.and_then(|p| p.http_get.as_ref()), p.and_then(|p| p.tcp_socket.as_ref()));
    }
    let l = c.lifecycle.as_ref();
    for (name, h) in [
        ("lifecycle.postStart", l.and_then(|l| l.post_start.as_ref())),
        ("lifecycle.preStop", l.and_then(|l| l.pre_stop.as_ref())),
    ] {
        let h: Option<&LifecycleHandler> = h;
        check(name, h.and_then(|h| h.http_get.as_ref()), h.and_then(|h| h.tcp_socket.as_ref()));
    }
}

fn restricted(spec: &PodSpec, v: &mut Vec<String>) {
    for vol in spec.volumes.iter().flatten() {
        for k in super::volumes::types(vol) {
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
    use serde_json::json;

    fn check(level: PodSecurityLevel, pod: serde_json::Value) -> Vec<String> {
        let annotations: Option<BTreeMap<String, String>> =
            pod.get("annotations").map(|a| serde_json::from_value(a.clone()).unwrap());
        let mut spec = pod.clone();
        spec.as_object_mut().unwrap().remove("annotations");
        violations(level, annotations.as_ref(), &serde_json::from_value(spec).unwrap())
    }

    /// One case per baseline field of the upstream list, at pod, container, init (sidecar) and
    /// ephemeral-container level where the field exists there.
    #[test]
    fn each_baseline_field_is_refused_and_named() {
        let c = |sc: serde_json::Value| json!({"containers": [{"name": "c", "securityContext": sc}]});
        let init = |sc: serde_json::Value| json!({"initContainers": [{"name": "side", "restartPolicy": "Always", "securityContext": sc}], "containers": [{"name": "c"}]});
        let eph = |sc: serde_json::Value| json!({"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "dbg", "securityContext": sc}]});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (json!({"hostNetwork": true, "containers": [{"name": "c"}]}), "hostNetwork"),
            (json!({"hostPID": true, "containers": [{"name": "c"}]}), "hostPID"),
            (json!({"hostIPC": true, "containers": [{"name": "c"}]}), "hostIPC"),
            (
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                "hostPath",
            ),
            (c(json!({"privileged": true})), "container \"c\": privileged"),
            (init(json!({"privileged": true})), "initContainer \"side\": privileged"),
            (eph(json!({"privileged": true})), "ephemeralContainer \"dbg\": privileged"),
            (c(json!({"capabilities": {"add": ["SYS_ADMIN"]}})), "SYS_ADMIN"),
            (c(json!({"capabilities": {"add": ["CAP_NET_RAW"]}})), "CAP_NET_RAW"),
            (
                eph(json!({"capabilities": {"add": ["SYS_PTRACE"]}})),
                "ephemeralContainer \"dbg\": adds capability SYS_PTRACE",
            ),
            (
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                "hostPort 8080",
            ),
            (
                json!({"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "dbg", "ports": [{"containerPort": 1, "hostPort": 9}]}]}),
                "hostPort 9",
            ),
            (
                json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}, "containers": [{"name": "c"}]}),
                "kernel.msgmax",
            ),
            (c(json!({"procMount": "Unmasked"})), "procMount"),
            (
                json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}, "containers": [{"name": "c"}]}),
                "seccompProfile Unconfined",
            ),
            (c(json!({"seccompProfile": {"type": "Unconfined"}})), "container \"c\": seccompProfile Unconfined"),
            (
                json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}, "containers": [{"name": "c"}]}),
                "appArmorProfile Unconfined",
            ),
            (init(json!({"appArmorProfile": {"type": "Unconfined"}})), "initContainer \"side\": appArmorProfile"),
            (
                json!({"annotations": {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}, "containers": [{"name": "c"}]}),
                "container.apparmor.security.beta.kubernetes.io/c",
            ),
            (
                json!({"securityContext": {"windowsOptions": {"hostProcess": true}}, "containers": [{"name": "c"}]}),
                "windows hostProcess",
            ),
            (c(json!({"windowsOptions": {"hostProcess": true}})), "container \"c\": windows hostProcess"),
            (
                json!({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}, "containers": [{"name": "c"}]}),
                "securityContext.seLinuxOptions.type \"spc_t\"",
            ),
            (
                json!({"securityContext": {"seLinuxOptions": {"user": "system_u"}}, "containers": [{"name": "c"}]}),
                "seLinuxOptions.user",
            ),
            (
                json!({"securityContext": {"seLinuxOptions": {"role": "system_r"}}, "containers": [{"name": "c"}]}),
                "seLinuxOptions.role",
            ),
            (
                c(json!({"seLinuxOptions": {"type": "unconfined_t"}})),
                "container \"c\": securityContext.seLinuxOptions.type",
            ),
            (
                init(json!({"seLinuxOptions": {"user": "root"}})),
                "initContainer \"side\": securityContext.seLinuxOptions.user",
            ),
            (
                eph(json!({"seLinuxOptions": {"role": "sysadm_r"}})),
                "ephemeralContainer \"dbg\": securityContext.seLinuxOptions.role",
            ),
            (
                json!({"containers": [{"name": "c", "livenessProbe": {"httpGet": {"host": "169.254.169.254", "port": 80}}}]}),
                "livenessProbe.host \"169.254.169.254\"",
            ),
            (
                json!({"containers": [{"name": "c", "readinessProbe": {"tcpSocket": {"host": "10.0.0.1", "port": 22}}}]}),
                "readinessProbe.host",
            ),
            (
                json!({"initContainers": [{"name": "i", "startupProbe": {"httpGet": {"host": "kubernetes.default", "port": 443}}}], "containers": [{"name": "c"}]}),
                "initContainer \"i\": startupProbe.host",
            ),
            (
                json!({"containers": [{"name": "c", "lifecycle": {"preStop": {"httpGet": {"host": "10.0.0.1", "port": 80}}}}]}),
                "lifecycle.preStop.host",
            ),
            (
                json!({"containers": [{"name": "c", "lifecycle": {"postStart": {"tcpSocket": {"host": "10.0.0.1", "port": 80}}}}]}),
                "lifecycle.postStart.host",
            ),
        ];
        for (pod, needle) in cases {
            let v = check(PodSecurityLevel::Baseline, pod.clone());
            assert!(v.iter().any(|m| m.contains(needle)), "{needle} not in {v:?} for {pod}");
            assert_eq!(check(PodSecurityLevel::Privileged, pod.clone()), Vec::<String>::new(), "{pod}");
        }
    }

    #[test]
    fn what_baseline_allows_passes() {
        let ok = json!({
            "annotations": {"container.apparmor.security.beta.kubernetes.io/c": "runtime/default"},
            "securityContext": {"sysctls": [{"name": "net.ipv4.tcp_keepalive_probes", "value": "3"}],
                "seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"}},
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 0}],
                "livenessProbe": {"httpGet": {"port": 80, "path": "/"}},
                "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "CAP_CHOWN"]}, "procMount": "Default",
                    "seccompProfile": {"type": "RuntimeDefault"}, "seLinuxOptions": {"type": "container_init_t"}}}],
            "volumes": [{"name": "data", "emptyDir": {}}]});
        assert_eq!(check(PodSecurityLevel::Baseline, ok), Vec::<String>::new());
    }

    #[test]
    fn restricted_asks_more() {
        let plain = json!({"containers": [{"name": "c"}]});
        let v = check(PodSecurityLevel::Restricted, plain);
        for needle in ["allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "drop ALL"] {
            assert!(v.iter().any(|m| m.contains(needle)), "{needle} not in {v:?}");
        }
        let hardened = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "cfg", "configMap": {"name": "x"}}]});
        assert_eq!(check(PodSecurityLevel::Restricted, hardened), Vec::<String>::new());
    }
}
