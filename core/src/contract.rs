//! Every label and annotation key vkube writes on host or virtual objects, in one place: they are
//! a contract with everything already running (changing one orphans the objects marked under the
//! old key, so changes need a migration). Tenant keys in this domain are rewritten
//! (`naming::rewrite_key`), so a tenant can never set these.

/// Our domain: keys under it (or under `*.vkube.dev`) are reserved.
pub const DOMAIN: &str = "vkube.dev";

/// The field manager of every write vkube makes (control plane, syncer, proxy, CLI).
pub const FIELD_MANAGER: &str = "vkube";

/// The control plane Service's port that a sleeping cluster's host Ingresses lead to (plain
/// HTTP: a request wakes it).
pub const WAKE_PORT_NAME: &str = "wake";

// Ownership marks on every host object of a virtual cluster (`naming`).

/// The virtual cluster a host object belongs to (host watches select on it).
pub const LABEL_CLUSTER: &str = "vkube.dev/cluster";
/// The virtual namespace of the object a host object mirrors.
pub const LABEL_NAMESPACE: &str = "vkube.dev/namespace";
pub const ANNOTATION_KIND: &str = "vkube.dev/object-kind";
pub const ANNOTATION_NAME: &str = "vkube.dev/object-name";
pub const ANNOTATION_NAMESPACE: &str = "vkube.dev/object-namespace";
pub const ANNOTATION_UID: &str = "vkube.dev/object-uid";
/// The value of [`ANNOTATION_UID`] while the virtual object is being created (the proxy creates
/// the host Service first); the syncer adopts such a host object once the virtual one exists.
pub const PENDING_UID: &str = "pending";
/// When a host Service was marked pending (RFC 3339): a pending copy still being created must not
/// be taken for an orphan.
pub const ANNOTATION_PENDING_SINCE: &str = "vkube.dev/pending-since";

// Host pods.

/// The downward-API annotation holding the virtual pod's labels (`metadata.labels` format).
pub const ANNOTATION_OBJECT_LABELS: &str = "vkube.dev/object-labels";
/// The downward-API annotation holding the virtual pod's annotations (`metadata.annotations`
/// format), on host pods whose downward-API volumes read them all.
pub const ANNOTATION_OBJECT_ANNOTATIONS: &str = "vkube.dev/object-annotations";
/// The downward-API annotation holding the virtual pod's service account.
pub const ANNOTATION_SERVICE_ACCOUNT: &str = "vkube.dev/service-account";
/// With tokens delivered in annotations (`--token-delivery=annotation`): the downward-API
/// annotation holding the pod's virtual service-account token for the API server's own audience;
/// `<this>-<short hash of the audience>` holds one for another audience. The pod's
/// `vkube.dev/token-expires` says when the first of them expires.
pub const ANNOTATION_POD_TOKEN: &str = "vkube.dev/sa-token";

// Host Secrets holding a pod's virtual service-account token.

/// On host Secrets holding a pod's service-account token (one per pod: kept out of the syncer's
/// Secret watch, which would otherwise hold one per pod in memory).
pub const LABEL_TOKEN: &str = "vkube.dev/token";
/// When the token expires (RFC 3339), to renew it in time (on a host pod whose tokens are in its
/// annotations: when the first of them expires).
pub const ANNOTATION_TOKEN_EXPIRES: &str = "vkube.dev/token-expires";
/// When the token is due for renewal (RFC 3339; on a host pod: the first of them): as a
/// kubelet, at 80 % of a short token's life, else `--token-renew-before` before it expires. Tokens
/// written without it are renewed by their expiry.
pub const ANNOTATION_TOKEN_RENEW_AT: &str = "vkube.dev/token-renew-at";
/// The audience the token was requested for.
pub const ANNOTATION_TOKEN_AUDIENCE: &str = "vkube.dev/token-audience";
/// On a pod's host Secret of projected certificates: when each is due for refresh (a JSON object
/// of RFC 3339 times by projection key).
pub const ANNOTATION_CERTIFICATES_REFRESH: &str = "vkube.dev/certificates-refresh";

// Other objects the syncer marks.

/// Marks virtual nodes the syncer made (only those are ever deleted).
pub const LABEL_FAKE_NODE: &str = "vkube.dev/fake-node";
/// Marks what the syncer shows in the virtual cluster of the host's storage: copies of host
/// StorageClasses, views of host volumes bound to claims (only those are ever changed or deleted).
pub const LABEL_FROM_HOST: &str = "vkube.dev/from-host";
/// On a virtual node, with a virtual scheduler: this prefix and a listed host RuntimeClass's name
/// (`true`; a name over 63 characters shortened with a hash: `runtime_classes::node_label`)
/// where the host node has the labels the class selects on; the class's view selects on it, so
/// the virtual scheduler places the class's pods where the host runs its handler.
pub const LABEL_RUNTIME_CLASS_PREFIX: &str = "runtimeclass.vkube.dev/";
/// On a host pod: the nodes it was kept off because the tenant closed them (cordon, taints),
/// comma-separated: a copy not placed yet is made again when that list is stale.
pub const ANNOTATION_KEPT_OFF: &str = "vkube.dev/kept-off";
/// On a virtual node: the host node's taints its last refresh put there (`key:effect`,
/// comma-separated); the node's other taints are the tenant's own, and stay.
pub const ANNOTATION_HOST_TAINTS: &str = "vkube.dev/host-taints";
/// On a virtual node: the resources (capacity, allocatable) its last refresh took from the host
/// node, comma-separated; the node's other resources are the tenant's own (an extended resource
/// it gave the node for its virtual scheduler), and stay.
pub const ANNOTATION_HOST_RESOURCES: &str = "vkube.dev/host-resources";
/// The kubelet port virtual nodes advertise: the virtual API server's connections to it go
/// through vkube's egress proxy, which serves them itself (`vkube_apiproxy::kubelet`).
pub const KUBELET_PORT: u16 = 10250;
/// The virtual cluster's resource metrics API (`metrics.k8s.io`) is an APIService of this
/// ExternalName Service (never copied to the host), whose name the virtual API server dials
/// through vkube's egress proxy, which serves it itself (`vkube_apiproxy::resource_metrics`).
/// `.invalid` never resolves anywhere else.
pub const RESOURCE_METRICS_SERVICE: (&str, &str) = ("kube-system", "vkube-metrics");
pub const RESOURCE_METRICS_HOST: &str = "resource-metrics.vkube.invalid";
pub const RESOURCE_METRICS_PORT: u16 = 443;
/// On the host Service named by the syncer's `Options::proxy_service`: the time up to which
/// host events were mirrored.
pub const ANNOTATION_EVENTS_MIRRORED_UNTIL: &str = "vkube.dev/events-mirrored-until";

// The control plane's own host objects (`vkube/src/names.rs`).

/// Marks every control-plane object of a virtual cluster on the host; the value is its name.
pub const LABEL_CONTROL_PLANE: &str = "vkube.dev/control-plane";
/// On the host Service: the cluster is paused (its host pods were removed on purpose; the next
/// control plane recreates them rather than treating them as lost).
pub const ANNOTATION_PAUSED: &str = "vkube.dev/paused";
/// On the host Service of a control plane run as local processes: `local`.
pub const ANNOTATION_MODE: &str = "vkube.dev/mode";
/// On the chart's pod template: the upstream versions its image runs (charts/vkube/Chart.yaml).
pub const ANNOTATION_KUBERNETES_VERSION: &str = "vkube.dev/kubernetes-version";
pub const ANNOTATION_ETCD_VERSION: &str = "vkube.dev/etcd-version";

// Sleep mode, on the control plane's host Service: what `vkube run` persists and what the CLI asks.

/// `Running` or `Sleeping`: what the control plane was last (a restarted one comes back so).
pub const ANNOTATION_POWER: &str = "vkube.dev/power";
/// Since when (RFC 3339) the cluster is in its [`ANNOTATION_POWER`] state.
pub const ANNOTATION_POWER_SINCE: &str = "vkube.dev/power-since";
/// The last request that counted as activity: when (RFC 3339) and by whom.
pub const ANNOTATION_LAST_ACTIVITY: &str = "vkube.dev/last-activity";
pub const ANNOTATION_LAST_ACTIVITY_BY: &str = "vkube.dev/last-activity-by";
/// Set by `vkube sleep` / `vkube wake` (`sleep` or `wake`); the control plane acts and removes it.
pub const ANNOTATION_POWER_REQUEST: &str = "vkube.dev/power-request";
/// The host pods were removed on purpose (going to sleep; RFC 3339): the next syncers recreate
/// them, until one has done its initial sync, which removes the mark.
pub const ANNOTATION_PODS_REMOVED: &str = "vkube.dev/pods-removed";
/// On the host Service of a chart's cluster: the last `vkube upgrade` (JSON: the snapshot taken
/// before it, the versions, the Helm revision to go back to), until `--rollback` or the next one.
pub const ANNOTATION_UPGRADE: &str = "vkube.dev/upgrade";
/// On the host Service: when (RFC 3339) the cluster is deleted (`vkube create --ttl`).
pub const ANNOTATION_EXPIRES_AT: &str = "vkube.dev/expires-at";
/// On the host Service: seconds without activity after which the cluster is deleted
/// (`vkube create --delete-after-inactivity`).
pub const ANNOTATION_DELETE_AFTER_INACTIVITY: &str = "vkube.dev/delete-after-inactivity";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_in_our_domain_and_distinct() {
        let keys = [
            LABEL_CLUSTER,
            LABEL_NAMESPACE,
            ANNOTATION_KIND,
            ANNOTATION_NAME,
            ANNOTATION_NAMESPACE,
            ANNOTATION_UID,
            ANNOTATION_PENDING_SINCE,
            ANNOTATION_OBJECT_LABELS,
            ANNOTATION_SERVICE_ACCOUNT,
            LABEL_TOKEN,
            ANNOTATION_TOKEN_EXPIRES,
            ANNOTATION_TOKEN_RENEW_AT,
            ANNOTATION_TOKEN_AUDIENCE,
            LABEL_FAKE_NODE,
            ANNOTATION_EVENTS_MIRRORED_UNTIL,
            LABEL_CONTROL_PLANE,
            ANNOTATION_PAUSED,
            ANNOTATION_MODE,
            ANNOTATION_KUBERNETES_VERSION,
            ANNOTATION_ETCD_VERSION,
            ANNOTATION_POWER,
            ANNOTATION_POWER_SINCE,
            ANNOTATION_LAST_ACTIVITY,
            ANNOTATION_LAST_ACTIVITY_BY,
            ANNOTATION_POWER_REQUEST,
            ANNOTATION_PODS_REMOVED,
            ANNOTATION_UPGRADE,
            ANNOTATION_EXPIRES_AT,
            ANNOTATION_DELETE_AFTER_INACTIVITY,
        ];
        for k in keys {
            assert!(crate::naming::is_reserved_key(k), "{k}");
        }
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }
}
