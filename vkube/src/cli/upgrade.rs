//! `vkube upgrade NAME`: the cluster moves to this vkube's version (chart: `helm upgrade` with the
//! built-in chart; local: its control plane restarted with this binary), after a snapshot its
//! control plane keeps; `vkube upgrade NAME --rollback` puts back the version it ran and the
//! state of that snapshot. What an upgrade did is recorded where the rollback finds it: on the
//! host Service (chart) or in the local state directory (local), until the rollback or the next
//! upgrade. An upgrade cut short is finished by running the command again, with its first record.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch};
use serde::{Deserialize, Serialize};
use vkube::controlplane::operations::UPGRADE_LABEL;
use vkube::names;
use vkube_localenv::process::{is_alive, read_recorded, stop_all_recorded};

use super::clusters::{self, Cluster, Mode};
use super::{Output, Target};

/// A local cluster's record, in its state directory.
const LOCAL_RECORD: &str = "upgrade.json";
/// Where a local cluster's previous `vkube` binaries are kept for a rollback, one directory per
/// upgrade (`upgrades/SNAPSHOT/vkube`: named `vkube` as every vkube binary, so tools that find
/// the cluster's processes by name find it too).
const LOCAL_BINARIES: &str = "upgrades";

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube upgrade team-a                        # to this vkube's version, values kept
  vkube upgrade team-a --set sync.hostQPS=40  # and a changed value (chart)
  vkube upgrade team-a --rollback             # the version and the state from before

A snapshot is taken first and kept by the control plane (`vkube snapshots team-a`); --rollback
puts back the previous version and restores that snapshot: changes made since are undone.")]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: Target,
    /// Chart values files (chart mode), over the values the cluster has.
    #[arg(long = "values", short = 'f', value_name = "FILE", conflicts_with = "rollback")]
    pub values: Vec<PathBuf>,
    /// Chart values, `key=value` (chart mode), over the values the cluster has.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "rollback")]
    pub set: Vec<String>,
    /// Undo the last upgrade: the previous version, and the state of the snapshot taken before it.
    #[arg(long)]
    pub rollback: bool,
    /// How long to wait for the control plane.
    #[arg(long, default_value = "5m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: Duration,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// What an upgrade did, for its rollback.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeRecord {
    /// The kept snapshot taken before it (`vkube snapshots NAME`).
    pub snapshot: String,
    /// When it started (RFC 3339).
    pub at: String,
    pub from_version: Option<String>,
    pub from_kubernetes: Option<String>,
    pub to_version: String,
    pub to_kubernetes: String,
    /// Chart: the Helm revision it ran before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm_revision: Option<u64>,
    /// Local: the `vkube` binary it ran before (a copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// The new version runs; false while it is underway (or was cut short).
    pub finished: bool,
}

/// Where a cluster's record is kept.
enum Store {
    Chart { services: Box<Api<Service>>, name: String },
    Local { dir: PathBuf },
}

impl Store {
    fn of(host: &kube::Client, cluster: &Cluster, target: &Target) -> Store {
        match cluster.mode {
            Mode::Chart => Store::Chart {
                services: Box::new(Api::namespaced(host.clone(), &cluster.namespace)),
                name: names::service(&cluster.name),
            },
            Mode::Local => Store::Local { dir: target.local_dir() },
        }
    }

    async fn load(&self) -> anyhow::Result<Option<UpgradeRecord>> {
        let text = match self {
            Store::Chart { services, name } => {
                let svc = services.get(name).await.context("reading the cluster's host Service")?;
                svc.metadata.annotations.and_then(|mut a| a.remove(names::ANNOTATION_UPGRADE))
            }
            Store::Local { dir } => match std::fs::read_to_string(dir.join(LOCAL_RECORD)) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).context("reading the upgrade record"),
            },
        };
        text.map(|t| serde_json::from_str(&t).context("the upgrade record is not readable")).transpose()
    }

    async fn save(&self, record: Option<&UpgradeRecord>) -> anyhow::Result<()> {
        match self {
            Store::Chart { services, name } => {
                let value = record.map(serde_json::to_string).transpose()?;
                let patch = vkube_kubeclient::patch::MetadataPatch::annotations([(names::ANNOTATION_UPGRADE, value)]);
                services
                    .patch(name, &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch))
                    .await
                    .context("recording the upgrade on the cluster's host Service")?;
            }
            Store::Local { dir } => match record {
                Some(r) => write_replacing(&dir.join(LOCAL_RECORD), serde_json::to_string_pretty(r)?.as_bytes())?,
                None => match std::fs::remove_file(dir.join(LOCAL_RECORD)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                },
            },
        }
        Ok(())
    }
}

/// Writes `path` whole or not at all (a crash leaves the old file).
fn write_replacing(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

impl UpgradeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let started = Instant::now();
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        let store = Store::of(&host, &cluster, &self.target);
        let record = if self.rollback {
            self.roll_back(&host, &cluster, &store).await?
        } else {
            self.upgrade(&host, &cluster, &store).await?
        };
        let mut out = serde_json::to_value(&record)?;
        out["rolledBack"] = self.rollback.into();
        out["seconds"] = started.elapsed().as_secs_f64().into();
        if !self.output.print(&out)? {
            let from = record.from_version.as_deref().unwrap_or("its previous version");
            if self.rollback {
                eprintln!(
                    "virtual cluster {} rolled back to {from} with its state of {} in {:.1} s",
                    cluster.name,
                    record.at,
                    started.elapsed().as_secs_f64()
                );
            } else {
                eprintln!(
                    "virtual cluster {} upgraded from {from} to {} in {:.1} s; `vkube upgrade {} --rollback` puts back {from} and its state of now (snapshot {})",
                    cluster.name,
                    record.to_version,
                    started.elapsed().as_secs_f64(),
                    cluster.name,
                    record.snapshot
                );
            }
        }
        Ok(())
    }

    async fn upgrade(&self, host: &kube::Client, cluster: &Cluster, store: &Store) -> anyhow::Result<UpgradeRecord> {
        let mut record = match store.load().await? {
            Some(r) if !r.finished => {
                eprintln!(
                    "the upgrade of {} started at {} did not finish: going on with it (snapshot {} stays the rollback's)",
                    cluster.name, r.at, r.snapshot
                );
                r
            }
            _ => self.start(host, cluster, store).await?,
        };
        let work = async {
            match cluster.mode {
                Mode::Chart => {
                    eprintln!("  upgrading the chart release {} (values kept)", cluster.name);
                    self.helm_upgrade()?;
                    super::create::wait_chart_ready(host, &self.target).await
                }
                Mode::Local => {
                    eprintln!("  restarting the control plane with this vkube ({})", record.to_version);
                    stop_all_recorded(&self.target.local_dir())?;
                    super::create::CreateArgs::resume_local(&self.target, self.timeout).await
                }
            }
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| {
            anyhow::anyhow!(
                "the control plane did not come back within {} s; run `vkube upgrade {}` again to go on, or `--rollback`",
                self.timeout.as_secs(),
                cluster.name
            )
        })??;
        record.finished = true;
        store.save(Some(&record)).await?;
        if cluster.mode == Mode::Local {
            remove_binaries_but(&self.target.local_dir(), record.binary.as_deref());
        }
        Ok(record)
    }

    /// The snapshot, the versions, what to go back to: recorded before anything changes.
    async fn start(&self, host: &kube::Client, cluster: &Cluster, store: &Store) -> anyhow::Result<UpgradeRecord> {
        eprintln!("upgrading virtual cluster {}", cluster.name);
        let components = super::describe::describe(host, &self.target).await?.components;
        let from_version = components.iter().find(|c| c.name == "vkube").and_then(|c| c.version.clone());
        let kept = super::snapshot::keep(&self.target, UPGRADE_LABEL)
            .await
            .context("taking the snapshot an upgrade starts with (a paused cluster: `vkube resume` it first)")?;
        eprintln!("  snapshot {} kept by the control plane", kept.name);
        let (helm_revision, binary) = match cluster.mode {
            Mode::Chart => (Some(helm_revision(cluster)?), None),
            Mode::Local => (None, Some(keep_running_binary(&self.target.local_dir(), &kept.name)?)),
        };
        let record = UpgradeRecord {
            snapshot: kept.name,
            at: jiff::Timestamp::now().to_string(),
            from_version,
            from_kubernetes: cluster.kubernetes_version.clone(),
            to_version: format!("v{}", env!("CARGO_PKG_VERSION")),
            to_kubernetes: vkube_core::versions::versions().kubernetes,
            helm_revision,
            binary,
            finished: false,
        };
        store.save(Some(&record)).await?;
        Ok(record)
    }

    fn helm_upgrade(&self) -> anyhow::Result<()> {
        let chart = super::helm::chart()?;
        let (name, ns) = (self.target.name.clone(), self.target.namespace());
        let mut args: Vec<String> =
            ["upgrade", &name, &chart.path().display().to_string(), "-n", &ns].iter().map(|s| s.to_string()).collect();
        // The new chart's defaults, under the values the cluster was given (and these).
        args.push("--reset-then-reuse-values".into());
        args.extend(super::helm::value_args(&self.values, &self.set));
        super::helm::run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    async fn roll_back(&self, host: &kube::Client, cluster: &Cluster, store: &Store) -> anyhow::Result<UpgradeRecord> {
        let Some(record) = store.load().await? else {
            bail!("no upgrade of {} is recorded: nothing to roll back", cluster.name);
        };
        // The snapshot first, if the control plane answers: without it a rollback would put back
        // the version and not the state. One that does not answer (the new version does not
        // start) is what a rollback is for: the version goes back first.
        match super::snapshot::kept(&self.target).await {
            Ok(kept) if !kept.iter().any(|k| k.name == record.snapshot) => bail!(
                "the snapshot taken before the upgrade ({}) is gone from the control plane; nothing changed (`vkube snapshots {}` lists what it keeps)",
                record.snapshot,
                cluster.name
            ),
            Ok(_) => {}
            Err(e) => eprintln!("  the control plane does not answer ({e:#}): the previous version first"),
        }
        eprintln!(
            "rolling virtual cluster {} back to {}",
            cluster.name,
            record.from_version.as_deref().unwrap_or("its previous version")
        );
        let work = async {
            match cluster.mode {
                Mode::Chart => {
                    let revision = record.helm_revision.context("the upgrade record has no Helm revision")?;
                    eprintln!("  helm rollback to revision {revision}");
                    super::helm::run(&["rollback", &cluster.name, &revision.to_string(), "-n", &cluster.namespace])?;
                    super::create::wait_chart_ready(host, &self.target).await
                }
                Mode::Local => {
                    let binary = record.binary.clone().context("the upgrade record has no previous binary")?;
                    if !binary.exists() {
                        bail!("the previous vkube binary {} is gone; nothing changed", binary.display());
                    }
                    eprintln!("  restarting the control plane with {}", binary.display());
                    stop_all_recorded(&self.target.local_dir())?;
                    self.resume_with(&binary).await
                }
            }
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| {
            anyhow::anyhow!(
                "the control plane did not come back within {} s; run `vkube upgrade {} --rollback` again",
                self.timeout.as_secs(),
                cluster.name
            )
        })??;
        eprintln!("  restoring the snapshot {}", record.snapshot);
        super::snapshot::restore_kept(&self.target, &record.snapshot).await.with_context(|| {
            format!(
                "the previous version runs again, but the state of before the upgrade was not put back; run `vkube upgrade {} --rollback` again",
                cluster.name
            )
        })?;
        store.save(None).await?;
        Ok(record)
    }

    /// `vkube resume` run by another vkube binary, on the same host and state.
    async fn resume_with(&self, binary: &Path) -> anyhow::Result<()> {
        // Awaited, not blocking: the rollback's timeout can fire while it runs (and kills it).
        let mut cmd = tokio::process::Command::new(binary);
        cmd.kill_on_drop(true);
        if let Some(context) = super::HOST_CONTEXT.get() {
            cmd.args(["--context", context]);
        }
        let timeout = format!("{}s", self.timeout.as_secs());
        cmd.args(["resume", &self.target.name, "-n", &self.target.namespace(), "--timeout", &timeout]);
        let status = cmd.status().await.with_context(|| format!("running {}", binary.display()))?;
        if !status.success() {
            bail!("{} resume {} failed ({status})", binary.display(), self.target.name);
        }
        Ok(())
    }
}

/// The Helm revision the cluster's release is at.
fn helm_revision(cluster: &Cluster) -> anyhow::Result<u64> {
    let status = super::helm::output(&["status", &cluster.name, "-n", &cluster.namespace, "-o", "json"])?;
    let status: serde_json::Value = serde_json::from_str(&status).context("helm status is not JSON")?;
    status["version"].as_u64().context("helm status has no revision")
}

/// A copy of the `vkube` binary a local control plane runs (from its process: the file may have
/// been replaced since), for the rollback of the upgrade that kept `snapshot` to start again.
fn keep_running_binary(dir: &Path, snapshot: &str) -> anyhow::Result<PathBuf> {
    let recorded = read_recorded(dir)?;
    let vkube = recorded
        .iter()
        .find(|r| r.name == "vkube")
        .with_context(|| format!("no vkube process recorded in {}: `vkube resume` the cluster first", dir.display()))?;
    let source =
        if is_alive(vkube) { PathBuf::from(format!("/proc/{}/exe", vkube.pid)) } else { vkube.program.clone() };
    let kept = dir.join(LOCAL_BINARIES).join(snapshot.trim_end_matches(".snapshot")).join("vkube");
    std::fs::create_dir_all(kept.parent().unwrap_or(dir))?;
    let tmp = kept.with_extension("tmp");
    std::fs::copy(&source, &tmp).with_context(|| format!("keeping a copy of {}", source.display()))?;
    std::fs::rename(&tmp, &kept)?;
    Ok(kept)
}

/// Removes the kept binaries of earlier upgrades (the cluster now runs this one's new version).
fn remove_binaries_but(dir: &Path, keep: Option<&Path>) {
    for entry in std::fs::read_dir(dir.join(LOCAL_BINARIES)).into_iter().flatten().flatten() {
        if keep.is_none_or(|k| !k.starts_with(entry.path())) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
