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
    #[arg(long, default_value = "30s", value_parser = vkube::controlplane::parse_positive_duration)]
    pub interval: Duration,
    /// Check once and exit (from a CronJob, or by hand).
    #[arg(long)]
    pub once: bool,
    /// Say what is due, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also serve the dashboard here (e.g. 0.0.0.0:8080), for viewers whose host token may list
    /// Services in every namespace (sign in with the token, or send it as a bearer).
    #[arg(long)]
    pub dashboard_listen: Option<std::net::SocketAddr>,
    /// How often an open dashboard page refreshes itself.
    #[arg(long, default_value = "15s", value_parser = vkube::controlplane::parse_duration)]
    pub dashboard_refresh: Duration,
    /// `json`: one JSON object per line for each expired cluster (`yaml`: one document each).
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

/// The last activity is written down every 10 s: an inactivity deadline gets that much more
/// (and some), so a cluster in use is not deleted between two writes.
const INACTIVITY_GRACE_SECONDS: i64 = 15;

/// Whether `c` is due for deletion now.
fn due(c: &Cluster) -> bool {
    let grace = if c.expiry_reason == Some(Reason::Inactivity) { INACTIVITY_GRACE_SECONDS } else { 0 };
    c.expires_in_seconds.is_some_and(|s| s <= -grace)
}

impl PlatformArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        // Stops with the process (the runtime's end drops it).
        if let Some(addr) = self.dashboard_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("listening on {addr} for the dashboard: {e}"))?;
            tracing::info!(listen = %listener.local_addr()?, "dashboard serving (host credentials needed)");
            let dashboard = super::dashboard::Dashboard::new(
                host.clone(),
                super::dashboard::auth::Auth::host(host.clone()),
                self.dashboard_refresh,
            );
            tokio::spawn(async move {
                if let Err(e) = super::dashboard::serve(listener, dashboard).await {
                    tracing::error!(error = %e, "the dashboard stopped serving");
                }
            });
        }
        loop {
            match clusters::list(&host, None, None).await {
                Ok(all) => {
                    for c in all.iter().filter(|c| due(c)) {
                        let Some(done) = self.expire(&host, c).await else { continue };
                        match self.output {
                            super::Output::Json => println!("{}", serde_json::to_string(&done)?),
                            super::Output::Yaml => print!("---\n{}", serde_saphyr::to_string(&done)?),
                            super::Output::Table => println!(
                                "{}/{}: {} ({} at {})",
                                done.namespace,
                                done.name,
                                done.outcome,
                                match done.reason {
                                    Some(Reason::Ttl) => "TTL",
                                    Some(Reason::Inactivity) => "inactivity",
                                    None => "-",
                                },
                                done.expires_at.as_deref().unwrap_or("-")
                            ),
                        }
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

    /// Deletes the cluster if it is still due when read again (its TTL may have been moved,
    /// someone may have used it since the list); `None` if it is not.
    async fn expire(&self, host: &kube::Client, listed: &Cluster) -> Option<Expired> {
        let target = super::Target { name: listed.name.clone(), namespace: Some(listed.namespace.clone()) };
        let c = match clusters::get(host, &target).await {
            Ok(Some(c)) if due(&c) => c,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(cluster = listed.name, error = %format!("{e:#}"), "reading an expired cluster again failed; trying next round");
                return None;
            }
        };
        let why = match c.expiry_reason {
            Some(Reason::Ttl) => format!("its TTL ended at {}", c.expires_at.as_deref().unwrap_or("?")),
            _ => format!(
                "no activity since {} (last by {})",
                c.last_activity.as_deref().or(c.created.as_deref()).unwrap_or("its creation"),
                c.last_activity_by.as_deref().map(clusters::printable).unwrap_or_else(|| "nobody".into())
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
        if c.mode == Mode::Local && !target.local_dir().exists() {
            tracing::warn!(
                cluster = c.name,
                namespace = c.namespace,
                "an expired local cluster runs on another machine: run `vkube platform` or `vkube delete` there"
            );
            out.outcome = "skipped";
            return Some(out);
        }
        if self.dry_run {
            return Some(out);
        }
        // What it used goes with it: its totals stay in the log.
        let mut with_usage = [c.clone()];
        let total = match clusters::with_usage(host, Some(&c.namespace), &mut with_usage).await {
            Ok(()) => with_usage[0].usage.total(),
            Err(_) => Default::default(),
        };
        tracing::info!(
            cluster = c.name,
            namespace = c.namespace,
            reason = why,
            core_hours = total.cpu_core_seconds / 3600.0,
            gib_hours = total.memory_gib_seconds / 3600.0,
            pod_hours = total.pod_seconds / 3600.0,
            hours_awake = total.awake_seconds / 3600.0,
            hours_asleep = total.asleep_seconds / 3600.0,
            "deleting an expired virtual cluster"
        );
        let note = format!("deleting the virtual cluster: {why}");
        vkube::controlplane::service_event(host, "vkube-platform", &c.namespace, &c.name, "Delete", "Expired", &note)
            .await;
        match super::delete::delete(host, &c, false).await {
            Ok(()) => out.outcome = "deleted",
            Err(e) => {
                tracing::error!(cluster = c.name, error = %format!("{e:#}"), "deleting an expired virtual cluster failed; `vkube delete` it by hand if it is no longer listed");
                out.outcome = "failed";
                out.error = Some(format!("{e:#}"));
            }
        }
        Some(out)
    }
}
