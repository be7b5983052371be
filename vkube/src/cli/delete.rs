//! `vkube delete NAME`: the control plane and everything the cluster put on the host.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::discovery::ApiResource;
use vkube::names;
use vkube_syncer::naming::LABEL_CLUSTER;

use super::Target;
use super::clusters::{self, Mode};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube delete team-a --wait\n  vkube delete ci-42 -n ci")]
pub struct DeleteArgs {
    #[command(flatten)]
    pub target: Target,
    /// Wait until the host namespace (if vkube created it) is gone.
    #[arg(long)]
    pub wait: bool,
}

impl DeleteArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        delete(&host, &cluster, self.wait).await
    }
}

/// Stops or uninstalls `cluster`'s control plane and removes everything it has on the host (its
/// namespace too if vkube created it; with `wait`, until that is gone) and its local state.
pub async fn delete(host: &kube::Client, cluster: &clusters::Cluster, wait: bool) -> anyhow::Result<()> {
    let target = Target { name: cluster.name.clone(), namespace: Some(cluster.namespace.clone()) };
    let ns = cluster.namespace.clone();
    eprintln!("deleting virtual cluster {} from host namespace {ns}", cluster.name);
    match cluster.mode {
        Mode::Local => {
            let stopped = vkube_localenv::process::stop_all_recorded(&target.local_dir())?;
            eprintln!(
                "  stopped {}",
                if stopped.is_empty() { "nothing (not running)".into() } else { stopped.join(", ") }
            );
        }
        Mode::Chart if super::helm::available() => {
            eprintln!("  uninstalling the Helm release");
            super::helm::run(&["uninstall", &cluster.name, "-n", &ns, "--wait", "--ignore-not-found"])?;
        }
        Mode::Chart => {
            eprintln!("  no Helm here: stopping the control plane, then removing the release's records");
            stop_chart_control_plane(host, &ns, &cluster.name).await?;
        }
    }
    eprintln!("  removing synced workloads and control-plane objects");
    remove_all(host, &ns, &cluster.name).await?;
    if cluster.mode == Mode::Chart {
        // What `helm uninstall` would have removed (gone already if it ran).
        let release = ListParams::default().labels(&format!("owner=helm,name={}", cluster.name));
        let secrets = ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&());
        delete_labelled(host, &ns, &secrets, &release, &DeleteParams::default()).await?;
    }
    let ns_api: Api<Namespace> = Api::all(host.clone());
    let ours = ns_api
        .get_opt(&ns)
        .await?
        .and_then(|n| n.metadata.labels)
        .is_some_and(|l| l.get(names::LABEL_CONTROL_PLANE) == Some(&cluster.name));
    if ours {
        eprintln!("  deleting host namespace {ns} (vkube created it)");
        match ns_api.delete(&ns, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context("deleting the host namespace"),
        }
        if wait {
            vkube_localenv::wait::until(Duration::from_secs(120), Duration::from_millis(500), || {
                let ns_api = ns_api.clone();
                let ns = ns.clone();
                async move { ns_api.get_opt(&ns).await.map(|n| n.is_none().then_some(())).map_err(|e| e.to_string()) }
            })
            .await
            .map_err(|e| anyhow::anyhow!("host namespace {ns} still exists after 120 s: {e}"))?;
        }
    }
    let dir = target.local_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    eprintln!("virtual cluster {} deleted", cluster.name);
    Ok(())
}

/// Deletes a chart's StatefulSet and waits until its pod is gone: a syncer still running would
/// recreate what is removed next.
async fn stop_chart_control_plane(host: &kube::Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let control = ListParams::default().labels(&format!("{}={name}", names::LABEL_CONTROL_PLANE));
    match Api::<StatefulSet>::namespaced(host.clone(), ns).delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).context("deleting the control plane's StatefulSet"),
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(host.clone(), ns);
    vkube_localenv::wait::until(Duration::from_secs(120), Duration::from_millis(500), || {
        let (pods, control) = (pods.clone(), control.clone());
        async move { pods.list(&control).await.map(|l| l.items.is_empty().then_some(())).map_err(|e| e.to_string()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("the control plane's pod in {ns} is still there after 120 s: {e}"))
}

/// Deletes every object of the cluster from the host namespace: synced workloads (every host
/// kind the syncer writes, labelled with the cluster) and control-plane objects (labelled as its
/// control plane), and the cluster-wide RBAC the chart may have made.
pub async fn remove_all(host: &kube::Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let synced = ListParams::default().labels(&format!("{LABEL_CLUSTER}={name}"));
    let control = ListParams::default().labels(&format!("{}={name}", names::LABEL_CONTROL_PLANE));
    let now = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    for ar in vkube_syncer::kind::host_resources() {
        for lp in [&synced, &control] {
            delete_labelled(host, ns, &ar, lp, &now).await?;
        }
    }
    let control_plane_only = [
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<Role>(&()),
        ApiResource::erase::<RoleBinding>(&()),
        ApiResource::erase::<ResourceQuota>(&()),
        ApiResource::erase::<LimitRange>(&()),
    ];
    for ar in control_plane_only {
        delete_labelled(host, ns, &ar, &control, &now).await?;
    }
    for name in Api::<ClusterRoleBinding>::all(host.clone())
        .list(&control)
        .await?
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
    {
        let _ = Api::<ClusterRoleBinding>::all(host.clone()).delete(&name, &DeleteParams::default()).await;
    }
    for name in
        Api::<ClusterRole>::all(host.clone()).list(&control).await?.items.into_iter().filter_map(|o| o.metadata.name)
    {
        let _ = Api::<ClusterRole>::all(host.clone()).delete(&name, &DeleteParams::default()).await;
    }
    Ok(())
}

/// Deletes the objects of type `ar` that `lp` selects: as a collection, or one by one where the
/// type has no collection delete (Services).
async fn delete_labelled(
    host: &kube::Client,
    ns: &str,
    ar: &ApiResource,
    lp: &ListParams,
    dp: &DeleteParams,
) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(host.clone(), ns, ar);
    let context = || format!("deleting {} in {ns}", ar.plural);
    match api.delete_collection(dp, lp).await {
        Ok(_) => return Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(kube::Error::Api(e)) if e.code == 405 => {}
        Err(e) => return Err(e).with_context(context),
    }
    for o in api.list(lp).await.with_context(context)?.items {
        let Some(name) = o.metadata.name else { continue };
        match api.delete(&name, dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(context),
        }
    }
    Ok(())
}
