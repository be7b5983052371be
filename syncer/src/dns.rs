//! The virtual cluster's own DNS: CoreDNS in the virtual kube-system, answering from the
//! virtual API server. Its pods are synced to the host like any workload; its Service's
//! ClusterIP (the same on both sides) is the nameserver of every synced pod.

/// The CoreDNS image; the chart's values can override it. Its tag is `COREDNS_VERSION` of
/// hack/versions.env, the version the dev host's real node builds and imports under this name.
pub const DEFAULT_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.15.0";

pub fn manifests(image: &str, cluster_domain: &str) -> Vec<serde_json::Value> {
    let corefile = format!(
        ".:53 {{\n    errors\n    health {{\n        lameduck 5s\n    }}\n    ready\n    kubernetes {cluster_domain} in-addr.arpa ip6.arpa {{\n        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }}\n    forward . /etc/resolv.conf\n    cache 30\n    loop\n    reload\n    loadbalance\n}}\n"
    );
    let labels = serde_json::json!({"k8s-app": "kube-dns"});
    vec![
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]}),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]}),
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile}}),
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {
                    "serviceAccountName": "coredns",
                    // Its upstream is the host's resolver.
                    "dnsPolicy": "Default",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "coredns", "image": image, "args": ["-conf", "/etc/coredns/Corefile"],
                        "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}, "readOnlyRootFilesystem": true},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}]}],
                    "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}}),
        serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {"selector": labels, "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coredns_serves_the_cluster_domain_from_the_virtual_api() {
        let m = manifests("img", "cluster.local");
        let kinds: Vec<&str> = m.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            vec!["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service"]
        );
        assert!(m[3]["data"]["Corefile"].as_str().unwrap().contains("kubernetes cluster.local"));
        assert_eq!(m[5]["metadata"]["name"], "kube-dns");
    }

    #[test]
    fn default_image_is_the_pinned_coredns() {
        let pinned = vkube_core::versions::versions().coredns;
        assert_eq!(DEFAULT_IMAGE, format!("registry.k8s.io/coredns/coredns:{pinned}"));
    }
}
