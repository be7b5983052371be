//! Virtual nodes: a virtual pod is bound to a node named like the host node its copy runs on.
//! The node exists while pods are bound to it (created on first use, removed after the last).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::queue::Action;
use crate::refs::RefKind;
use crate::sync::Result;

pub const KIND: &str = "Node";
/// How long a new virtual node is kept even with no pod bound to it yet.
const NEW_NODE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub use vkube_core::contract::LABEL_FAKE_NODE as LABEL_FAKE;

/// Host node labels worth showing in the virtual cluster (placement, not host internals).
fn visible_label(key: &str) -> bool {
    key.starts_with("kubernetes.io/")
        || key.starts_with("topology.kubernetes.io/")
        || key.starts_with("node.kubernetes.io/instance-type")
        || key.starts_with("beta.kubernetes.io/")
}

/// The virtual node for host node `host` (pure).
pub fn virtual_node(name: &str, host: Option<&Node>) -> Node {
    let mut labels: BTreeMap<String, String> = host
        .and_then(|h| h.metadata.labels.as_ref())
        .into_iter()
        .flatten()
        .filter(|(k, _)| visible_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_FAKE.into(), "true".into());
    labels.entry("kubernetes.io/hostname".into()).or_insert_with(|| name.to_string());
    Node {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    }
}

/// Its status: Ready, with the host node's capacity and addresses when known.
pub fn virtual_node_status(host: Option<&Node>) -> NodeStatus {
    let hs = host.and_then(|h| h.status.as_ref());
    let default_capacity: BTreeMap<String, Quantity> = [("cpu", "16"), ("memory", "64Gi"), ("pods", "110")]
        .into_iter()
        .map(|(k, v)| (k.into(), Quantity(v.into())))
        .collect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    NodeStatus {
        capacity: Some(hs.and_then(|s| s.capacity.clone()).unwrap_or_else(|| default_capacity.clone())),
        allocatable: Some(hs.and_then(|s| s.allocatable.clone()).unwrap_or(default_capacity)),
        addresses: hs.and_then(|s| s.addresses.clone()),
        // Versions and OS, never the machine's identity (machine ID, system UUID, boot ID).
        node_info: hs.and_then(|s| s.node_info.clone()).map(|i| k8s_openapi::api::core::v1::NodeSystemInfo {
            machine_id: String::new(),
            system_uuid: String::new(),
            boot_id: String::new(),
            ..i
        }),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("VirtualNodeReady".into()),
            message: Some("vkube: pods bound here run on the host node of the same name".into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }]),
        ..Default::default()
    }
}

/// Makes sure the virtual node exists before a pod is bound to it.
pub async fn ensure(ctx: &Context, name: &str) -> Result<()> {
    if ctx.stores.vnodes.get(&ObjectRef::new(name)).is_some() {
        return Ok(());
    }
    // Reading host nodes needs a ClusterRole; without it the node gets default capacity.
    let host = match Api::<Node>::all(ctx.host.clone()).get_opt(name).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(node = name, error = %e, "host node not readable; using defaults");
            None
        }
    };
    let api: Api<Node> = Api::all(ctx.virt.clone());
    match api.create(&crate::sync::post_params(), &virtual_node(name, host.as_ref())).await {
        Ok(_) => ctx.metrics.wrote(KIND, "create"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let status = virtual_node_status(host.as_ref());
    api.patch_status(name, &crate::sync::patch_params(), &Patch::Merge(serde_json::json!({ "status": status })))
        .await?;
    Ok(())
}

/// Removes a virtual node no pod is bound to any more (only nodes the syncer made).
pub async fn reconcile(ctx: &Context, name: String) -> Result<Action> {
    let node = ctx.stores.vnodes.get(&ObjectRef::new(&name));
    let used = ctx.refs.is_used(RefKind::Node, "", &name);
    match node {
        Some(n) if !used && n.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_FAKE)) => {
            // A node is made just before the first pod is bound to it: give the binding time to
            // show in the pod watch before taking the node for unused.
            let age = n
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0).as_secs())
                .unwrap_or(i64::MAX);
            if age < NEW_NODE_GRACE.as_secs() as i64 {
                return Ok(Action::RequeueAfter(NEW_NODE_GRACE));
            }
            let api: Api<Node> = Api::all(ctx.virt.clone());
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => ctx.metrics.wrote(KIND, "delete"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        None if used => ensure(ctx, &name).await?,
        _ => {}
    }
    Ok(Action::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_nodes_show_placement_labels_and_capacity() {
        let host: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "z1", "secret.corp/team": "x"}},
            "status": {"capacity": {"cpu": "4", "pods": "110"}, "allocatable": {"cpu": "3"},
                "nodeInfo": {"machineID": "m-1", "systemUUID": "u-1", "bootID": "b-1", "kernelVersion": "6.1",
                    "osImage": "Debian", "containerRuntimeVersion": "containerd://2.1", "kubeletVersion": "v1.37.2",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}
        }))
        .unwrap();
        let n = virtual_node("n1", Some(&host));
        let labels = n.metadata.labels.unwrap();
        assert_eq!(labels["topology.kubernetes.io/zone"], "z1");
        assert_eq!(labels[LABEL_FAKE], "true");
        assert!(!labels.contains_key("secret.corp/team"));
        let s = virtual_node_status(Some(&host));
        assert_eq!(s.capacity.unwrap()["cpu"].0, "4");
        let info = s.node_info.unwrap();
        assert_eq!((info.machine_id.as_str(), info.system_uuid.as_str(), info.boot_id.as_str()), ("", "", ""));
        assert_eq!(info.kubelet_version, "v1.37.2");
        assert_eq!(s.conditions.unwrap()[0].status, "True");
        assert_eq!(virtual_node_status(None).allocatable.unwrap()["pods"].0, "110");
    }
}
