//! `vkube list`.

use clap::Args;

use super::Output;
use super::clusters::{Status, human_age};

/// "5m ago" for an RFC 3339 time.
fn ago(at: &str) -> String {
    match at.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => {
            let secs = k8s_openapi::jiff::Timestamp::now().duration_since(t).as_secs().max(0) as u64;
            format!("{} ago", human_age(secs))
        }
        Err(_) => at.to_string(),
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube list\n  vkube list -l team=a -o json")]
pub struct ListArgs {
    /// Only this host namespace (default: all).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only clusters whose labels (`vkube create --label`) match this selector, e.g. `team=a`.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

impl ListArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let clusters = super::clusters::list(&host, self.namespace.as_deref(), self.selector.as_deref()).await?;
        if self.output.print(&clusters)? {
            return Ok(());
        }
        println!(
            "{:<20} {:<24} {:<6} {:<18} {:<8} {:<7} {:<24} {:<10} {:<32} LABELS",
            "NAME", "NAMESPACE", "MODE", "STATUS", "VERSION", "AGE", "LAST ACTIVITY", "EXPIRES", "ENDPOINT"
        );
        for c in &clusters {
            let mode = serde_json::to_value(c.mode)?.as_str().unwrap_or_default().to_string();
            let status = serde_json::to_value(c.status)?.as_str().unwrap_or_default().to_string();
            let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let status = match (&c.power_since, c.status) {
                (Some(since), Status::Sleeping) => format!("{status} {}", ago(since)),
                _ => status,
            };
            let activity = match (&c.last_activity, &c.last_activity_by) {
                (Some(at), Some(by)) => format!("{} ({})", ago(at), super::clusters::printable(by)),
                _ => "-".into(),
            };
            let expires = match c.expires_in_seconds {
                Some(s) if s <= 0 => "due".to_string(),
                Some(s) => format!("in {}", human_age(s as u64)),
                None => "-".into(),
            };
            println!(
                "{:<20} {:<24} {:<6} {:<18} {:<8} {:<7} {:<24} {:<10} {:<32} {}",
                c.name,
                c.namespace,
                mode,
                status,
                c.kubernetes_version.as_deref().unwrap_or("-"),
                c.age_seconds.map(human_age).unwrap_or_else(|| "-".into()),
                activity,
                expires,
                c.endpoint.as_deref().unwrap_or("-"),
                if labels.is_empty() { "-".to_string() } else { labels.join(",") }
            );
        }
        if clusters.is_empty() {
            eprintln!("no virtual clusters (create one with `vkube create NAME`)");
        }
        Ok(())
    }
}
