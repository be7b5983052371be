//! `vkube describe NAME`: one cluster in full: its state, what each component runs and whether it
//! is healthy, the policy in force, what it holds on the host, and when its certificates expire.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Service};
use kube::api::{Api, ListParams};
use serde::Serialize;
use vkube::controlplane::components::CONTROL_PLANE;
use vkube::local::LocalState;
use vkube::names;
use vkube_localenv::process::{is_alive, read_recorded, read_supervised};
use vkube_syncer::naming::LABEL_CLUSTER;

use super::clusters::{self, Cluster, Mode, human_age};
use super::{Output, Target, certs};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube describe team-a\n  vkube describe team-a -o json | jq '.components'")]
pub struct DescribeArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Serialize)]
pub struct Description {
    #[serde(flatten)]
    pub cluster: Cluster,
    pub components: Vec<Component>,
    /// The isolation and sync settings the control plane runs with (`vkube run` flag names).
    pub policy: BTreeMap<String, String>,
    pub host: HostResources,
    /// Empty until the control plane has started once.
    pub certificates: Vec<certs::Certificate>,
}

/// One process (local) or container (chart) of the control plane.
#[derive(Debug, Serialize)]
pub struct Component {
    pub name: String,
    pub version: Option<String>,
    pub running: bool,
    /// Running, and for the API server and the proxy: `/readyz` answered.
    pub healthy: bool,
    pub restarts: Option<i32>,
}

/// What the cluster's workloads hold on the host.
#[derive(Debug, Default, Serialize)]
pub struct HostResources {
    pub pods: usize,
    pub running_pods: usize,
    pub services: usize,
    /// Sum of what the host pods that have not finished request (as the scheduler counts it).
    pub cpu_requests_millicores: u64,
    pub memory_requests_bytes: u64,
}

impl DescribeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let d = describe(&host, &self.target).await?;
        if self.output.print(&d)? {
            return Ok(());
        }
        let c = &d.cluster;
        println!("Name:        {}", c.name);
        println!("Namespace:   {}", c.namespace);
        println!("Mode:        {}", serde_json::to_value(c.mode)?.as_str().unwrap_or_default());
        println!("Status:      {}", serde_json::to_value(c.status)?.as_str().unwrap_or_default());
        println!("Kubernetes:  {}", c.kubernetes_version.as_deref().unwrap_or("-"));
        println!("Endpoint:    {}", c.endpoint.as_deref().unwrap_or("-"));
        println!("Age:         {}", c.age_seconds.map(human_age).unwrap_or_else(|| "-".into()));
        if let Some(since) = &c.power_since {
            println!("Power since: {since}");
        }
        let by = c.last_activity_by.as_deref().map(|u| format!(" by {u}")).unwrap_or_default();
        println!("Activity:    {}{by}", c.last_activity.as_deref().unwrap_or("-"));
        let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Labels:      {}", if labels.is_empty() { "-".to_string() } else { labels.join(",") });
        println!("Components:");
        for k in &d.components {
            let state = match (k.running, k.healthy) {
                (true, true) => "healthy",
                (true, false) => "running, not ready",
                (false, _) => "not running",
            };
            let restarts = k.restarts.map(|r| format!(", {r} restarts")).unwrap_or_default();
            println!("  {:<24} {:<10} {state}{restarts}", k.name, k.version.as_deref().unwrap_or("-"));
        }
        println!("Policy:");
        for (k, v) in &d.policy {
            println!("  {k}={v}");
        }
        let h = &d.host;
        println!("Host:");
        println!("  pods: {} ({} running), services: {}", h.pods, h.running_pods, h.services);
        println!(
            "  requests: cpu {}m, memory {} MiB",
            h.cpu_requests_millicores,
            h.memory_requests_bytes / (1024 * 1024)
        );
        println!("Certificates:");
        for cert in &d.certificates {
            println!("  {:<20} expires {} ({} days)", cert.name, cert.not_after, cert.days_left);
        }
        Ok(())
    }
}

pub async fn describe(host: &kube::Client, target: &Target) -> anyhow::Result<Description> {
    let cluster = clusters::require(host, target).await?;
    let ns = &cluster.namespace;
    let (components, policy) = match cluster.mode {
        Mode::Local => local_components(target).await,
        Mode::Chart => chart_components(host, &cluster).await?,
    };
    let host_resources = host_resources(host, ns, &cluster.name).await?;
    let certificates = certs::certificates(host, target).await?.unwrap_or_default();
    Ok(Description { cluster, components, policy, host: host_resources, certificates })
}

/// The recorded processes of a local control plane (`vkube run` and the children it supervises;
/// none while it sleeps) and the flags `vkube run` got.
async fn local_components(target: &Target) -> (Vec<Component>, BTreeMap<String, String>) {
    let dir = target.local_dir();
    let recorded: Vec<_> = read_supervised(&dir).into_iter().chain(read_recorded(&dir).unwrap_or_default()).collect();
    let proxy_version = clusters::server_version(&dir.join("kubeconfig")).await;
    let direct_version = clusters::server_version(&dir.join("direct.kubeconfig")).await;
    let mut components = vec![];
    for rec in &recorded {
        let running = is_alive(rec);
        let (version, healthy) = match rec.name.as_str() {
            CONTROL_PLANE => (direct_version.clone(), running && direct_version.is_some()),
            // The API server's /readyz checks etcd.
            "etcd" => (version_of_cache_dir(&rec.program), running && direct_version.is_some()),
            "vkube" => (vkube_version(&rec.program), running && proxy_version.is_some()),
            _ => (version_of_cache_dir(&rec.program), running),
        };
        components.push(Component { name: rec.name.clone(), version, running, healthy, restarts: None });
    }
    let policy = LocalState::read(&dir)
        .ok()
        .flatten()
        .map(|s| s.policy.to_args().iter().map(|a| flag_pair(a)).collect())
        .unwrap_or_default();
    (components, policy)
}

/// `--pod-security=restricted` → ("pod-security", "restricted"); a bare `--flag` is "true".
fn flag_pair(arg: &str) -> (String, String) {
    let arg = arg.trim_start_matches("--");
    match arg.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (arg.to_string(), "true".to_string()),
    }
}

/// Upstream binaries live in `<cache>/upstream/<component>-<version>/`.
fn version_of_cache_dir(program: &std::path::Path) -> Option<String> {
    let dir = program.parent()?.file_name()?.to_str()?;
    dir.rsplit_once("-v").map(|(_, v)| format!("v{v}"))
}

fn vkube_version(program: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(|v| format!("v{v}"))
}

/// The containers of the chart's pod, and the policy from the vkube container's environment.
async fn chart_components(
    host: &kube::Client,
    cluster: &Cluster,
) -> anyhow::Result<(Vec<Component>, BTreeMap<String, String>)> {
    let ns = &cluster.namespace;
    let sts = Api::<StatefulSet>::namespaced(host.clone(), ns)
        .get_opt(&cluster.name)
        .await
        .with_context(|| format!("reading StatefulSet {ns}/{}", cluster.name))?;
    let pods = Api::<Pod>::namespaced(host.clone(), ns)
        .list(&ListParams::default().labels(&format!("{}={}", names::LABEL_CONTROL_PLANE, cluster.name)))
        .await?;
    let pod = pods.items.into_iter().next();
    let statuses: Vec<ContainerStatus> = pod
        .and_then(|p| p.status)
        .map(|s| {
            s.init_container_statuses.into_iter().flatten().chain(s.container_statuses.into_iter().flatten()).collect()
        })
        .unwrap_or_default();
    let spec = sts.as_ref().and_then(|s| s.spec.template.spec.as_ref());
    let mut components = vec![];
    let mut policy = BTreeMap::new();
    for c in spec.iter().flat_map(|s| s.containers.iter()) {
        let status = statuses.iter().find(|s| s.name == c.name);
        let running = status.and_then(|s| s.state.as_ref()).is_some_and(|s| s.running.is_some());
        let healthy = running && status.is_some_and(|s| s.ready);
        components.push(Component {
            name: c.name.clone(),
            version: c.image.as_deref().and_then(|i| i.rsplit_once(':')).map(|(_, t)| t.to_string()),
            running,
            healthy,
            restarts: status.map(|s| s.restart_count),
        });
        if c.name == "vkube" {
            for e in c.env.iter().flatten() {
                if let (Some(key), Some(v)) = (policy_env(&e.name), e.value.as_ref()) {
                    policy.insert(key, v.clone());
                }
            }
            // Its children, at the versions its image runs (the chart says which); its readiness
            // is the virtual API server's own (through the proxy). Their restarts are in its
            // metrics (`vkube_component_restarts_total`), not visible from here.
            let annotation = |key: &str| sts.as_ref().and_then(|s| super::clusters::template_annotation(s, key));
            for (child, key) in
                [("etcd", names::ANNOTATION_ETCD_VERSION), (CONTROL_PLANE, names::ANNOTATION_KUBERNETES_VERSION)]
            {
                components.push(Component {
                    name: child.into(),
                    version: annotation(key),
                    running,
                    healthy,
                    restarts: None,
                });
            }
        }
    }
    components.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((components, policy))
}

/// `VKUBE_POD_SECURITY` → `pod-security`: the flag an env var of `vkube run` stands for, for the
/// settings that are policy (not where things are or how to log).
fn policy_env(var: &str) -> Option<String> {
    const NOT_POLICY: [&str; 13] = [
        "SUPERVISE",
        "STATE_DIR",
        "ETCD_DURABLE",
        "NAME",
        "NAMESPACE",
        "CERT_DIR",
        "VIRTUAL_SERVER",
        "LISTEN",
        "ENDPOINT",
        "LOG_FORMAT",
        "HOST_KUBECONFIG",
        "HOST_CONTEXT",
        "USAGE_PERSIST_EVERY",
    ];
    let rest = var.strip_prefix("VKUBE_")?;
    (!NOT_POLICY.contains(&rest)).then(|| rest.to_lowercase().replace('_', "-"))
}

async fn host_resources(host: &kube::Client, ns: &str, cluster: &str) -> anyhow::Result<HostResources> {
    let lp = ListParams::default().labels(&format!("{LABEL_CLUSTER}={cluster}"));
    let pods = Api::<Pod>::namespaced(host.clone(), ns).list(&lp).await.context("listing the cluster's host pods")?;
    let services = Api::<Service>::namespaced(host.clone(), ns).list_metadata(&lp).await?;
    let mut r = HostResources { pods: pods.items.len(), services: services.items.len(), ..Default::default() };
    for pod in &pods.items {
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            r.running_pods += 1;
        }
        if vkube::usage::holds_resources(pod) {
            let held = vkube::usage::PodResources::of_pod(pod);
            r.cpu_requests_millicores += (held.cpu * 1000.0).round() as u64;
            r.memory_requests_bytes += held.memory.round() as u64;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_flags_from_both_forms() {
        assert_eq!(flag_pair("--pod-security=restricted"), ("pod-security".into(), "restricted".into()));
        assert_eq!(flag_pair("--allow-node-ports"), ("allow-node-ports".into(), "true".into()));
        assert_eq!(policy_env("VKUBE_POD_SECURITY").as_deref(), Some("pod-security"));
        assert_eq!(policy_env("VKUBE_ENDPOINT"), None);
        assert_eq!(policy_env("RUST_LOG"), None);
    }

    #[test]
    fn upstream_versions_from_the_cache_layout() {
        let p = std::path::Path::new("/c/upstream/kubernetes-v1.37.2/kube-control-plane");
        assert_eq!(version_of_cache_dir(p).as_deref(), Some("v1.37.2"));
        let p = std::path::Path::new("/c/upstream/etcd-v3.6.16/etcd");
        assert_eq!(version_of_cache_dir(p).as_deref(), Some("v3.6.16"));
    }
}
