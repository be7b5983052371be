//! `vkube create NAME`: the Helm chart on a real host, or local processes with `--local`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch};
use vkube::local::{LocalControlPlane, LocalOptions};
use vkube::names;
use vkube_localenv::Lifetime;
use vkube_localenv::process::{is_alive, read_recorded, stop_all_recorded};

use super::Target;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube create team-a --local              # local processes, e.g. on `vkube dev up`
  vkube create team-a --label team=a       # the Helm chart, in host namespace vkube-team-a
  vkube create ci-42 --wait=false -f values.yaml
  vkube create ci-43 --local --from-snapshot golden.snapshot   # a fork of a snapshot's state")]
pub struct CreateArgs {
    #[command(flatten)]
    pub target: Target,
    /// Run the control plane as local processes against the host in KUBECONFIG (a host whose
    /// pods cannot run it, such as `vkube dev up`).
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub policy: vkube::controlplane::PolicyArgs,
    /// Chart values files (chart mode).
    #[arg(long = "values", short = 'f', value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Chart values, `key=value` (chart mode).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Wait until the virtual cluster answers (`--wait=false` to return once it is installed).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub wait: bool,
    /// How long to wait.
    #[arg(long, default_value = "5m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: Duration,
    /// Extra flags for the control-plane process in local mode (`vkube run --help`).
    #[arg(long = "run-arg", value_name = "FLAG")]
    pub run_args: Vec<String>,
    /// Sleep mode: put the cluster to sleep after this long without activity, e.g. 30m; a
    /// request wakes it. Off by default.
    #[arg(long, value_parser = vkube::controlplane::parse_duration)]
    pub sleep_after: Option<Duration>,
    /// Sleep mode: sleep when a window starts, `DAYS HH:MM-HH:MM [ZONE]`, e.g.
    /// "Mon-Fri 19:00-08:00 Europe/Berlin".
    #[arg(long)]
    pub sleep_schedule: Option<vkube::controlplane::schedule::Schedule>,
    /// Sleep mode: the host ingress controller's Prometheus metrics (traefik or ingress-nginx,
    /// plain HTTP), e.g. http://traefik-metrics.traefik:9100/metrics: requests through the
    /// cluster's Ingresses count as activity while it is awake.
    #[arg(long, value_name = "URL", value_parser = vkube::controlplane::ingress_activity::parse_url)]
    pub ingress_metrics: Option<http::Uri>,
    /// Start with the state of this snapshot (`vkube snapshot`, of any cluster): a fork with its
    /// own identity (certificates, service-account keys, host names; pods get fresh tokens).
    #[arg(long, value_name = "FILE")]
    pub from_snapshot: Option<PathBuf>,
    /// Scheduled snapshots: take one this often while the cluster runs (e.g. 6h), kept by its
    /// control plane (`vkube snapshots NAME`).
    #[arg(long, value_parser = vkube::controlplane::parse_duration)]
    pub snapshot_schedule: Option<Duration>,
    /// Scheduled snapshots: how many are kept (the newest).
    #[arg(long, default_value_t = 7)]
    pub snapshot_keep: usize,
    /// A label of the cluster (`team=a`), for `vkube list -l team=a`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Delete the cluster this long from now (e.g. 2h), with everything it has on the host;
    /// `vkube list` shows the time left, `vkube platform` deletes it.
    #[arg(long, value_parser = vkube::controlplane::parse_duration)]
    pub ttl: Option<Duration>,
    /// Delete the cluster after this long without activity (e.g. 7d; activity as sleep mode
    /// counts it).
    #[arg(long, value_parser = vkube::controlplane::parse_duration)]
    pub delete_after_inactivity: Option<Duration>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE, e.g. team=a"))?;
    let domain = vkube_core::contract::DOMAIN;
    let prefix = k.split_once('/').map(|(p, _)| p).unwrap_or_default();
    if prefix == domain || prefix.ends_with(&format!(".{domain}")) || prefix == "app.kubernetes.io" {
        return Err(format!("{k:?}: labels under {domain}/ and app.kubernetes.io/ are vkube's own"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl CreateArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let started = Instant::now();
        // Refused before anything is made.
        vkube::expiry::Expiry::annotations(
            k8s_openapi::jiff::Timestamp::now(),
            self.ttl,
            self.delete_after_inactivity,
        )?;
        if self.ingress_metrics.is_some() && self.policy.ingress_classes.is_empty() {
            anyhow::bail!(
                "--ingress-metrics needs --ingress-classes: only Ingresses that reach the host have traffic to count"
            );
        }
        if let Some(file) = &self.from_snapshot {
            if !self.wait {
                anyhow::bail!("--from-snapshot needs --wait: the snapshot is restored once the cluster answers");
            }
            let f = std::fs::File::open(file).with_context(|| format!("opening the snapshot {}", file.display()))?;
            vkube::snapshot::read_manifest(f)?.check_for(&self.target.name, true)?;
        }
        let work = async {
            if self.local {
                // Restored before the components first start (`vkube run --initial-snapshot`).
                self.create_local().await
            } else {
                self.create_chart().await?;
                match &self.from_snapshot {
                    Some(file) => super::snapshot::restore(&self.target, file, true).await.map(drop),
                    None => Ok(()),
                }
            }
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| {
            anyhow::anyhow!(
                "virtual cluster {} did not become ready within {} s; `vkube list` shows its state, `vkube delete {}` removes it",
                self.target.name,
                self.timeout.as_secs(),
                self.target.name
            )
        })??;
        eprintln!(
            "virtual cluster {} ready in {:.1} s\n  kubeconfig: vkube connect {} -n {} --print > {}.kubeconfig",
            self.target.name,
            started.elapsed().as_secs_f64(),
            self.target.name,
            self.target.namespace(),
            self.target.name
        );
        Ok(())
    }

    /// Starts a local control plane again with the settings it was created with.
    pub async fn resume_local(target: &Target, timeout: Duration) -> anyhow::Result<()> {
        let state = vkube::local::LocalState::read(&target.local_dir())?.ok_or_else(|| {
            anyhow::anyhow!("no local state for {} on this machine: it was created elsewhere", target.name)
        })?;
        let args = CreateArgs {
            target: target.clone(),
            local: true,
            policy: state.policy,
            values: vec![],
            set: vec![],
            wait: true,
            timeout,
            run_args: state.run_args,
            labels: vec![],
            ttl: None,
            delete_after_inactivity: None,
            from_snapshot: None,
            snapshot_schedule: None,
            snapshot_keep: 7,
            sleep_after: None,
            sleep_schedule: None,
            ingress_metrics: None,
        };
        tokio::time::timeout(timeout, args.create_local()).await.map_err(|_| anyhow::anyhow!("timed out"))?
    }

    async fn create_local(&self) -> anyhow::Result<()> {
        let dir = self.target.local_dir();
        let recorded = read_recorded(&dir)?;
        if !recorded.is_empty() && recorded.iter().all(is_alive) {
            eprintln!("virtual cluster {} is already running locally", self.target.name);
            return Ok(());
        }
        // Leftovers of a crashed run go; data and certificates stay.
        stop_all_recorded(&dir)?;
        let (host_kubeconfig, host_context) = super::host_kubeconfig()?;
        let opts = LocalOptions {
            name: self.target.name.clone(),
            namespace: self.target.namespace(),
            dir,
            lifetime: Lifetime::Detached,
            vkube_binary: std::env::current_exe().context("locating the vkube binary")?,
            host_kubeconfig: std::fs::canonicalize(&host_kubeconfig).unwrap_or(host_kubeconfig),
            host_context,
            policy: self.policy.clone(),
            run_args: self.run_args.iter().cloned().chain(self.sleep_args()).chain(self.initial_snapshot()?).collect(),
        };
        eprintln!("creating virtual cluster {} in host namespace {} (local processes)", opts.name, opts.namespace);
        let progress = |step: &str| eprintln!("  {step}");
        let cp = LocalControlPlane::start(&opts, &progress)
            .await
            .with_context(|| format!("logs are in {}", opts.dir.join("logs").display()))?;
        cp.detach();
        self.label(&super::host_client().await?).await
    }

    /// Puts the admin's labels (which `vkube list` selects by) and the expiry on the
    /// control-plane Service.
    async fn label(&self, host: &kube::Client) -> anyhow::Result<()> {
        let expiry = vkube::expiry::Expiry::annotations(
            k8s_openapi::jiff::Timestamp::now(),
            self.ttl,
            self.delete_after_inactivity,
        )?;
        if self.labels.is_empty() && expiry.is_empty() {
            return Ok(());
        }
        let patch = vkube_kubeclient::patch::MetadataPatch::annotations(expiry.into_iter().map(|(k, v)| (k, Some(v))))
            .with_labels(self.labels.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
        Api::<Service>::namespaced(host.clone(), &self.target.namespace())
            .patch(&names::service(&self.target.name), &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch))
            .await
            .context("labelling the cluster (its control-plane Service)")?;
        Ok(())
    }

    /// `vkube run`'s sleep-mode and scheduled-snapshot flags for what was asked.
    fn sleep_args(&self) -> Vec<String> {
        let mut args = vec![];
        if let Some(d) = self.sleep_after {
            args.push(format!("--sleep-after={}s", d.as_secs()));
        }
        if let Some(s) = &self.sleep_schedule {
            args.push(format!("--sleep-schedule={s}"));
        }
        if let Some(url) = &self.ingress_metrics {
            args.push(format!("--ingress-metrics={url}"));
        }
        if let Some(d) = self.snapshot_schedule {
            args.push(format!("--snapshot-schedule={}s", d.as_secs()));
            args.push(format!("--snapshot-keep={}", self.snapshot_keep));
        }
        args
    }

    /// `vkube run --initial-snapshot` for `--from-snapshot` (an absolute path: it runs elsewhere).
    fn initial_snapshot(&self) -> anyhow::Result<Option<String>> {
        let Some(file) = &self.from_snapshot else { return Ok(None) };
        let abs = std::fs::canonicalize(file).with_context(|| format!("the snapshot {}", file.display()))?;
        Ok(Some(format!("--initial-snapshot={}", abs.display())))
    }

    /// The chart's sleep-mode and scheduled-snapshot values for what was asked.
    fn sleep_sets(&self) -> Vec<String> {
        let after = self.sleep_after.map(|d| format!("--set=sleep.after={}s", d.as_secs()));
        // --set-string: a schedule has commas and spaces that --set would split.
        let schedule = self.sleep_schedule.as_ref().map(|s| format!("--set-string=sleep.schedule={s}"));
        let metrics = self.ingress_metrics.as_ref().map(|url| format!("--set-string=sleep.ingressMetrics={url}"));
        let snapshots = self.snapshot_schedule.map(|d| {
            [
                format!("--set=snapshots.schedule={}s", d.as_secs()),
                format!("--set=snapshots.keep={}", self.snapshot_keep),
            ]
        });
        after.into_iter().chain(schedule).chain(metrics).chain(snapshots.into_iter().flatten()).collect()
    }

    async fn create_chart(&self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let (name, ns) = (self.target.name.clone(), self.target.namespace());
        eprintln!("creating virtual cluster {name} in host namespace {ns} (Helm chart)");
        eprintln!("  [1/3] host namespace and service range");
        vkube::local::ensure_namespace(&host, &ns, &name, self.policy.pod_security).await?;
        let cidr = vkube::local::host_service_cidr(&host).await?;
        eprintln!("  [2/3] installing the chart");
        let chart = super::helm::chart()?;
        let chart_path = chart.path().display().to_string();
        let mut args: Vec<String> =
            ["upgrade", "--install", &name, &chart_path, "-n", &ns].iter().map(|s| s.to_string()).collect();
        args.push(format!("--set=serviceCIDR={cidr}"));
        args.extend(self.policy.to_helm_sets());
        args.extend(self.sleep_sets());
        args.extend(super::helm::value_args(&self.values, &self.set));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        super::helm::run(&refs)?;
        self.label(&host).await?;
        if !self.wait {
            return Ok(());
        }
        eprintln!("  [3/3] waiting for the control plane (StatefulSet {name}) and its kubeconfig");
        wait_chart_ready(&host, &self.target).await
    }
}

/// Waits until the chart's control plane runs its StatefulSet's current spec, is ready, and has
/// published its admin kubeconfig, printing what changes. A pod of an older revision that is not
/// ready is deleted: the StatefulSet controller waits for it forever instead of replacing it (a
/// rollback from a broken version).
pub async fn wait_chart_ready(host: &kube::Client, target: &Target) -> anyhow::Result<()> {
    let (name, ns) = (target.name.clone(), target.namespace());
    let sts: Api<StatefulSet> = Api::namespaced(host.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(host.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(host.clone(), &ns);
    let selector = ListParams::default().labels(&format!("{}={name}", names::LABEL_CONTROL_PLANE));
    let mut last = String::new();
    loop {
        let set = sts.get_opt(&name).await?.ok_or_else(|| anyhow::anyhow!("StatefulSet {ns}/{name} is gone"))?;
        let status = set.status.clone().unwrap_or_default();
        let observed = status.observed_generation >= set.metadata.generation;
        let updated = observed && status.update_revision.is_some() && status.current_revision == status.update_revision;
        let ready = status.ready_replicas.unwrap_or(0) > 0;
        let kubeconfig = secrets.get_opt(&names::kubeconfig_secret(&name)).await?.is_some();
        let now = format!("control plane updated: {updated}, ready: {ready}, kubeconfig published: {kubeconfig}");
        if now != last {
            eprintln!("    {now}");
            last = now;
        }
        if updated && ready && kubeconfig {
            return Ok(());
        }
        for pod in pods.list(&selector).await?.items {
            let revision = pod.labels().get("controller-revision-hash").cloned();
            let pod_ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if observed && !pod_ready && revision.is_some() && revision != status.update_revision {
                eprintln!("    replacing pod {} of an older revision that is not ready", pod.name_any());
                // The StatefulSet controller may replace it first: then this one is gone already.
                vkube_kubeclient::delete::delete_exactly(
                    &pods,
                    &pod.metadata,
                    None,
                    vkube_kubeclient::delete::Exactly::Object,
                )
                .await?;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
