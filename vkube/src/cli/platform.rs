//! `vkube platform`: the host-wide housekeeper. Every `--interval` it deletes the virtual clusters
//! whose TTL ended or that saw no activity for the time they were given (`vkube create --ttl`,
//! `--delete-after-inactivity`), with everything they have on the host, as `vkube delete` does:
//! a host Event on the cluster's Service and a log line say why.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use vkube::expiry::Reason;

use super::clusters::{self, Cluster, Mode};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube platform\n  vkube platform --once --dry-run -o json")]
pub struct PlatformArgs {
    /// How often the clusters are checked.
    #[arg(long, default_value = "30s", value_parser = vkube::controlplane::parse_duration)]
    pub interval: Duration,
    /// Check once and exit (from a CronJob, or by hand).
    #[arg(long)]
    pub once: bool,
    /// Say what is due, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// `json`: one JSON object per expired cluster on stdout.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: super::Output,
}

/// One expired cluster and what was done.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Expired {
    pub name: String,
    pub namespace: String,
    pub reason: Option<Reason>,
    pub expires_at: Option<String>,
    /// `deleted`, `due` (dry run), `skipped` (a local cluster of another machine) or `failed`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PlatformArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        loop {
            match clusters::list(&host, None, None).await {
                Ok(all) => {
                    for c in all.iter().filter(|c| c.expires_in_seconds.is_some_and(|s| s <= 0)) {
                        let done = self.expire(&host, c).await;
                        if self.output.print(&done)? {
                            continue;
                        }
                        println!(
                            "{}/{}: {} ({:?} at {})",
                            done.namespace,
                            done.name,
                            done.outcome,
                            done.reason,
                            done.expires_at.as_deref().unwrap_or("-")
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "listing the virtual clusters failed; trying again")
                }
            }
            if self.once {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }

    async fn expire(&self, host: &kube::Client, c: &Cluster) -> Expired {
        let why = match c.expiry_reason {
            Some(Reason::Ttl) => format!("its TTL ended at {}", c.expires_at.as_deref().unwrap_or("?")),
            _ => format!(
                "no activity since {} (last by {})",
                c.last_activity.as_deref().or(c.created.as_deref()).unwrap_or("its creation"),
                c.last_activity_by.as_deref().unwrap_or("nobody")
            ),
        };
        let mut out = Expired {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            reason: c.expiry_reason,
            expires_at: c.expires_at.clone(),
            outcome: "due",
            error: None,
        };
        let here = super::Target { name: c.name.clone(), namespace: Some(c.namespace.clone()) }.local_dir().exists();
        if c.mode == Mode::Local && !here {
            tracing::warn!(
                cluster = c.name,
                namespace = c.namespace,
                "an expired local cluster runs on another machine: run `vkube platform` or `vkube delete` there"
            );
            out.outcome = "skipped";
            return out;
        }
        if self.dry_run {
            return out;
        }
        tracing::info!(cluster = c.name, namespace = c.namespace, reason = why, "deleting an expired virtual cluster");
        let note = format!("deleting the virtual cluster: {why}");
        vkube::controlplane::service_event(host, "vkube-platform", &c.namespace, &c.name, "Delete", "Expired", &note)
            .await;
        match super::delete::delete(host, c, false).await {
            Ok(()) => out.outcome = "deleted",
            Err(e) => {
                tracing::error!(cluster = c.name, error = %format!("{e:#}"), "deleting an expired virtual cluster failed; trying again next round");
                out.outcome = "failed";
                out.error = Some(format!("{e:#}"));
            }
        }
        out
    }
}
