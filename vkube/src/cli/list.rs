//! `vkube list`.

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this host namespace (default: all).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

impl ListArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let clusters = super::clusters::list(&host, self.namespace.as_deref()).await?;
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&clusters)?),
            Output::Table => {
                println!("{:<20} {:<24} {:<6} {:<9} ENDPOINT", "NAME", "NAMESPACE", "MODE", "STATUS");
                for c in &clusters {
                    let mode = serde_json::to_value(c.mode)?.as_str().unwrap_or_default().to_string();
                    let status = serde_json::to_value(c.status)?.as_str().unwrap_or_default().to_string();
                    println!(
                        "{:<20} {:<24} {:<6} {:<9} {}",
                        c.name,
                        c.namespace,
                        mode,
                        status,
                        c.endpoint.as_deref().unwrap_or("-")
                    );
                }
                if clusters.is_empty() {
                    eprintln!("no virtual clusters (create one with `vkube create NAME`)");
                }
            }
        }
        Ok(())
    }
}
