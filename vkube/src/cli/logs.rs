//! `vkube logs NAME [COMPONENT] [-f]`: the control plane's own logs: the log files of a local
//! control plane; in chart mode the vkube container's log, and the log files of the components
//! it supervises, printed by the pod's own vkube through exec.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, ListParams, LogParams};
use vkube::names;

use super::Target;
use super::clusters::{self, Mode};

/// The control plane's processes: vkube and its children (kube-control-plane is kube-apiserver
/// and kube-controller-manager in one process, so one log).
pub const COMPONENTS: [&str; 3] = ["vkube", vkube::controlplane::components::CONTROL_PLANE, "etcd"];

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube logs team-a                      # the vkube process (proxy and syncer)
  vkube logs team-a kube-control-plane --tail 50   # kube-apiserver and kube-controller-manager
  vkube logs team-a -f")]
pub struct LogsArgs {
    #[command(flatten)]
    pub target: Target,
    /// vkube (default), kube-control-plane (kube-apiserver and kube-controller-manager) or etcd.
    #[arg(default_value = "vkube", value_parser = clap::builder::PossibleValuesParser::new(COMPONENTS))]
    pub component: String,
    /// Keep printing what is logged.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Read this file instead (what the chart's pod runs, through exec, for the upstream
    /// components `vkube run` supervises: their logs are files on its volume).
    #[arg(long, hide = true)]
    pub file: Option<PathBuf>,
}

impl LogsArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        if let Some(file) = &self.file {
            return self.print_file(file).await;
        }
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        match cluster.mode {
            Mode::Local => self.local().await,
            Mode::Chart => self.chart(&host, &cluster.namespace).await,
        }
    }

    async fn local(&self) -> anyhow::Result<()> {
        let path = self.target.local_dir().join("logs").join(format!("{}.log", self.component));
        if !path.exists() {
            anyhow::bail!(
                "{} is missing: the logs of a local cluster are on the machine that created it",
                path.display()
            );
        }
        self.print_file(&path).await
    }

    /// Prints a log file (its last `tail` lines), then follows it as `tail -f` does.
    async fn print_file(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let lines: Vec<&str> = text.lines().collect();
        let from = self.tail.map(|n| lines.len().saturating_sub(n)).unwrap_or(0);
        let mut out = std::io::stdout().lock();
        for l in &lines[from..] {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
        drop(out);
        if !self.follow {
            return Ok(());
        }
        // Follow by size, as `tail -f`: a restarted process truncates or recreates its file.
        let mut pos = file.stream_position()?;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            let mut file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            if len < pos {
                pos = 0;
            }
            if len > pos {
                file.seek(SeekFrom::Start(pos))?;
                let mut chunk = vec![];
                file.read_to_end(&mut chunk)?;
                pos += chunk.len() as u64;
                std::io::stdout().write_all(&chunk)?;
                std::io::stdout().flush()?;
            }
        }
    }

    async fn chart(&self, host: &kube::Client, ns: &str) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(host.clone(), ns);
        let lp = ListParams::default().labels(&format!("{}={}", names::LABEL_CONTROL_PLANE, self.target.name));
        let pod = pods.list(&lp).await?.items.into_iter().next().and_then(|p| p.metadata.name).ok_or_else(|| {
            anyhow::anyhow!(
                "no control-plane pod of {} in {ns} (paused? `vkube list` shows its state)",
                self.target.name
            )
        })?;
        if self.component != "vkube" {
            return self.supervised(&pods, &pod).await;
        }
        let params = LogParams {
            container: Some(self.component.clone()),
            follow: self.follow,
            tail_lines: self.tail.map(|n| n as i64),
            ..Default::default()
        };
        let mut lines =
            pods.log_stream(&pod, &params).await.with_context(|| format!("reading the logs of {ns}/{pod}"))?.lines();
        while let Some(line) = tokio::select! {
            l = lines.try_next() => l?,
            _ = tokio::signal::ctrl_c() => None,
        } {
            println!("{line}");
        }
        Ok(())
    }

    /// A supervised component's log file in the chart's pod, printed by the pod's own vkube
    /// (`--file`) through exec: the image has no shell.
    async fn supervised(&self, pods: &Api<Pod>, pod: &str) -> anyhow::Result<()> {
        let file = format!("{CHART_STATE_DIR}/logs/{}.log", self.component);
        let mut command = vec!["/vkube".to_string(), "logs".into(), self.target.name.clone(), "--file".into(), file];
        command.extend(self.tail.map(|n| format!("--tail={n}")));
        command.extend(self.follow.then(|| "--follow".to_string()));
        let params = AttachParams::default().container("vkube").stdin(false).stdout(true).stderr(true);
        let mut attached =
            pods.exec(pod, command, &params).await.with_context(|| format!("running vkube logs in the pod {pod}"))?;
        let mut output = attached.stdout().context("the exec's output")?;
        let mut stdout = tokio::io::stdout();
        tokio::select! {
            r = tokio::io::copy(&mut output, &mut stdout) => { r?; }
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    }
}

/// Where the chart's `vkube run --supervise` keeps its state (`VKUBE_STATE_DIR`, the volume).
const CHART_STATE_DIR: &str = "/data";
