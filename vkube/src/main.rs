//! `vkube`: the CLI and the control-plane process, one binary.

mod dev;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vkube", version, about = "Virtual Kubernetes clusters inside one namespace of a host cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The local dev host cluster (real upstream processes, nodes simulated by kwok).
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Dev(cmd) => cmd.run().await,
        }
    })
}

/// Structured logs on stderr; `RUST_LOG` filters, `VKUBE_LOG_FORMAT=json` for machines.
fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,vkube=info,kube_client::client::builder=off"));
    let json = std::env::var("VKUBE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
