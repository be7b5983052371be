//! Finding virtual clusters on a host: each has a Service labelled `vkube.dev/control-plane`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;
use vkube::local::LocalState;
use vkube::names;
use vkube_localenv::process::{is_alive, read_recorded};

use anyhow::Context;

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
    /// Sleep mode: its workloads and upstream components stopped; a request wakes it.
    Sleeping,
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
    /// Seconds since it was created.
    pub age_seconds: Option<u64>,
    /// The virtual API server's version: what it answers when ready (local), or its image's tag
    /// (chart).
    pub kubernetes_version: Option<String>,
    /// The labels the admin gave at `vkube create --label`.
    pub labels: BTreeMap<String, String>,
    /// Sleep mode: since when (RFC 3339) it is Running or Sleeping, as its control plane wrote.
    pub power_since: Option<String>,
    /// The last request that counted as activity (sleep mode): when (RFC 3339) and by whom.
    pub last_activity: Option<String>,
    pub last_activity_by: Option<String>,
    /// When it is deleted by itself (`vkube create --ttl`, `--delete-after-inactivity`), why,
    /// and the seconds left (negative: due, `vkube platform` deletes it).
    pub expires_at: Option<String>,
    pub expiry_reason: Option<vkube::expiry::Reason>,
    pub expires_in_seconds: Option<i64>,
    /// What it used, per day (`vkube usage`, the dashboard), from [`with_usage`].
    #[serde(skip)]
    pub usage: vkube::usage::Ledger,
}

/// Clusters in `namespace` (default: all), only those whose labels match `selector` if given.
pub async fn list(
    host: &kube::Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> anyhow::Result<Vec<Cluster>> {
    let api: Api<Service> = match namespace {
        Some(ns) => Api::namespaced(host.clone(), ns),
        None => Api::all(host.clone()),
    };
    let labels = match selector {
        Some(s) => format!("{},{s}", names::LABEL_CONTROL_PLANE),
        None => names::LABEL_CONTROL_PLANE.to_string(),
    };
    let services = api.list(&ListParams::default().labels(&labels)).await.with_context(|| {
        format!("listing the virtual clusters{}", selector.map(|s| format!(" with labels {s}")).unwrap_or_default())
    })?;
    let mut out = vec![];
    for svc in services.items {
        let name = svc.labels().get(names::LABEL_CONTROL_PLANE).cloned().unwrap_or_default();
        if svc.name_any() != names::service(&name) {
            continue;
        }
        out.push(status_of(host, &svc, &name).await);
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// Reads each cluster's usage ledger (its ConfigMap) into `clusters`: one list per namespace
/// asked, or one for the whole host.
pub async fn with_usage(host: &kube::Client, namespace: Option<&str>, clusters: &mut [Cluster]) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = match namespace {
        Some(ns) => Api::namespaced(host.clone(), ns),
        None => Api::all(host.clone()),
    };
    let lp = ListParams::default().labels(names::LABEL_CONTROL_PLANE);
    let ledgers = api.list(&lp).await.context("reading the clusters' usage ledgers")?;
    for c in clusters.iter_mut() {
        let wanted = names::usage_configmap(&c.name);
        if let Some(cm) =
            ledgers.items.iter().find(|cm| cm.name_any() == wanted && cm.namespace().as_deref() == Some(&c.namespace))
        {
            c.usage = vkube::usage::Ledger::from_data(cm.data.as_ref());
        }
    }
    Ok(())
}

pub async fn get(host: &kube::Client, target: &Target) -> anyhow::Result<Option<Cluster>> {
    let ns = target.namespace();
    let svc = Api::<Service>::namespaced(host.clone(), &ns).get_opt(&names::service(&target.name)).await?;
    Ok(match svc {
        Some(s) if s.labels().contains_key(names::LABEL_CONTROL_PLANE) => Some(status_of(host, &s, &target.name).await),
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

async fn status_of(host: &kube::Client, svc: &Service, name: &str) -> Cluster {
    let namespace = svc.namespace().unwrap_or_default();
    let annotations = svc.annotations();
    let mode = if annotations.get(names::ANNOTATION_MODE).map(String::as_str) == Some("local") {
        Mode::Local
    } else {
        Mode::Chart
    };
    let paused = annotations.contains_key(names::ANNOTATION_PAUSED);
    let sleeping = annotations.get(names::ANNOTATION_POWER).is_some_and(|p| p == "Sleeping");
    let target = Target { name: name.to_string(), namespace: Some(namespace.clone()) };
    let (status, endpoint, kubernetes_version) = match mode {
        Mode::Local => {
            let dir = target.local_dir();
            let endpoint = LocalState::read(&dir).ok().flatten().map(|s| s.endpoint());
            let recorded = read_recorded(&dir).unwrap_or_default();
            let mut version = None;
            let status = if paused {
                Status::Paused
            } else if recorded.is_empty() || !recorded.iter().all(is_alive) {
                Status::Stopped
            } else if sleeping {
                Status::Sleeping
            } else if let Some(v) = server_version(&dir.join("kubeconfig")).await {
                version = Some(v);
                Status::Ready
            } else {
                Status::NotReady
            };
            (status, endpoint, version)
        }
        Mode::Chart => {
            let sts = Api::<StatefulSet>::namespaced(host.clone(), &namespace).get_opt(name).await.ok().flatten();
            let version = sts.as_ref().and_then(|s| template_annotation(s, names::ANNOTATION_KUBERNETES_VERSION));
            let ready = sts.and_then(|s| s.status).and_then(|s| s.ready_replicas).unwrap_or(0) > 0;
            let status = if paused {
                Status::Paused
            } else if ready {
                Status::Ready
            } else {
                Status::NotReady
            };
            (status, Some(format!("https://{}.{namespace}.svc:443", names::service(name))), version)
        }
    };
    let created = svc.metadata.creation_timestamp.as_ref();
    let expiry = vkube::expiry::Expiry::of(annotations, created.map(|t| t.0));
    Cluster {
        name: name.to_string(),
        namespace,
        mode,
        ready: status == Status::Ready,
        status,
        endpoint,
        created: created.map(|t| t.0.to_string()),
        age_seconds: created.map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0).as_secs().max(0) as u64),
        kubernetes_version,
        labels: admin_labels(svc),
        power_since: annotations.get(names::ANNOTATION_POWER_SINCE).cloned(),
        last_activity: annotations.get(names::ANNOTATION_LAST_ACTIVITY).cloned(),
        last_activity_by: annotations.get(names::ANNOTATION_LAST_ACTIVITY_BY).cloned(),
        expires_at: expiry.map(|e| e.at.to_string()),
        expiry_reason: expiry.map(|e| e.reason),
        expires_in_seconds: expiry.map(|e| e.seconds_left(k8s_openapi::jiff::Timestamp::now())),
        usage: Default::default(),
    }
}

/// The labels of the control-plane Service that the admin set (not vkube's or Helm's own).
fn admin_labels(svc: &Service) -> BTreeMap<String, String> {
    let ours =
        |k: &str| k == names::LABEL_CONTROL_PLANE || k.starts_with("app.kubernetes.io/") || k.starts_with("helm.sh/");
    svc.labels().iter().filter(|(k, _)| !ours(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// An annotation of the StatefulSet's pod template (the chart writes the upstream versions its
/// image runs there).
pub fn template_annotation(sts: &StatefulSet, key: &str) -> Option<String> {
    sts.spec.template.metadata.as_ref()?.annotations.as_ref()?.get(key).cloned()
}

/// A text a tenant chose (a user name), safe to print on a terminal: control characters escaped.
pub fn printable(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// "3d4h", "5m": an age as kubectl prints it.
pub fn human_age(seconds: u64) -> String {
    let (d, h, m) = (seconds / 86_400, seconds % 86_400 / 3_600, seconds % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// The virtual API server's version, if the cluster behind a kubeconfig is ready (answers
/// `/readyz`) within a few seconds. Marked as no activity: looking does not wake a cluster.
pub async fn server_version(kubeconfig: &std::path::Path) -> Option<String> {
    let client = vkube_kubeclient::client::from_kubeconfig_file(kubeconfig, None).await.ok()?;
    let work = async {
        let ready = http::Request::get("/readyz").body(vec![]).ok()?;
        client.request_text(ready).await.ok()?;
        let version =
            http::Request::get("/version").header(vkube_apiproxy::sleep::IGNORE_HEADER, "1").body(vec![]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&client.request_text(version).await.ok()?).ok()?;
        v["gitVersion"].as_str().map(String::from)
    };
    tokio::time::timeout(Duration::from_secs(3), work).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectls() {
        assert_eq!(human_age(42), "42s");
        assert_eq!(human_age(5 * 60 + 3), "5m");
        assert_eq!(human_age(2 * 3600 + 7 * 60), "2h7m");
        assert_eq!(human_age(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }
}
