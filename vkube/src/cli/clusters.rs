//! Finding virtual clusters on a host: each has a Service labelled `vkube.dev/control-plane`.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;
use vkube::local::LocalState;
use vkube::names;
use vkube_localenv::process::{is_alive, read_recorded};

use super::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Local processes on this machine (`--local`).
    Local,
    /// The Helm chart, a pod on the host.
    Chart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    Ready,
    Paused,
    NotReady,
    /// Local processes that do not run (on this machine).
    Stopped,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cluster {
    pub name: String,
    pub namespace: String,
    pub mode: Mode,
    pub status: Status,
    pub ready: bool,
    pub endpoint: Option<String>,
    pub created: Option<String>,
}

pub async fn list(host: &kube::Client, namespace: Option<&str>) -> anyhow::Result<Vec<Cluster>> {
    let api: Api<Service> = match namespace {
        Some(ns) => Api::namespaced(host.clone(), ns),
        None => Api::all(host.clone()),
    };
    let services = api.list(&ListParams::default().labels(names::LABEL_CONTROL_PLANE)).await?;
    let mut out = vec![];
    for svc in services.items {
        let name = svc.labels().get(names::LABEL_CONTROL_PLANE).cloned().unwrap_or_default();
        if svc.name_any() != names::service(&name) {
            continue;
        }
        out.push(describe(host, &svc, &name).await);
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

pub async fn get(host: &kube::Client, target: &Target) -> anyhow::Result<Option<Cluster>> {
    let ns = target.namespace();
    let svc = Api::<Service>::namespaced(host.clone(), &ns).get_opt(&names::service(&target.name)).await?;
    Ok(match svc {
        Some(s) if s.labels().contains_key(names::LABEL_CONTROL_PLANE) => Some(describe(host, &s, &target.name).await),
        _ => None,
    })
}

/// The cluster, or an error that says what exists.
pub async fn require(host: &kube::Client, target: &Target) -> anyhow::Result<Cluster> {
    get(host, target).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "virtual cluster {} not found in host namespace {}; `vkube list` shows what exists",
            target.name,
            target.namespace()
        )
    })
}

async fn describe(host: &kube::Client, svc: &Service, name: &str) -> Cluster {
    let namespace = svc.namespace().unwrap_or_default();
    let annotations = svc.annotations();
    let mode = if annotations.get(names::ANNOTATION_MODE).map(String::as_str) == Some("local") {
        Mode::Local
    } else {
        Mode::Chart
    };
    let paused = annotations.contains_key(names::ANNOTATION_PAUSED);
    let target = Target { name: name.to_string(), namespace: Some(namespace.clone()) };
    let (status, endpoint) = match mode {
        Mode::Local => {
            let dir = target.local_dir();
            let endpoint = LocalState::read(&dir).ok().flatten().map(|s| s.endpoint());
            let recorded = read_recorded(&dir).unwrap_or_default();
            let status = if paused {
                Status::Paused
            } else if recorded.is_empty() || !recorded.iter().all(is_alive) {
                Status::Stopped
            } else if answers(&dir.join("kubeconfig")).await {
                Status::Ready
            } else {
                Status::NotReady
            };
            (status, endpoint)
        }
        Mode::Chart => {
            let sts = Api::<StatefulSet>::namespaced(host.clone(), &namespace).get_opt(name).await.ok().flatten();
            let ready = sts.and_then(|s| s.status).and_then(|s| s.ready_replicas).unwrap_or(0) > 0;
            let status = if paused {
                Status::Paused
            } else if ready {
                Status::Ready
            } else {
                Status::NotReady
            };
            (status, Some(format!("https://{}.{namespace}.svc:443", names::service(name))))
        }
    };
    Cluster {
        name: name.to_string(),
        namespace,
        mode,
        ready: status == Status::Ready,
        status,
        endpoint,
        created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
    }
}

/// Whether the virtual cluster behind a kubeconfig answers `/readyz` within a second or two.
pub async fn answers(kubeconfig: &std::path::Path) -> bool {
    let Ok(client) = vkube_kubeclient::client::from_kubeconfig_file(kubeconfig, None).await else { return false };
    let req = http::Request::get("/readyz").body(vec![]).expect("static request");
    matches!(tokio::time::timeout(Duration::from_secs(3), client.request_text(req)).await, Ok(Ok(_)))
}
