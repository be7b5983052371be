//! `vkube`: the CLI and the control-plane process, one binary.

mod cli;
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
    /// Create a virtual cluster (or start an existing one) and wait until it answers.
    Create(cli::create::CreateArgs),
    /// Add a kubeconfig context for a virtual cluster, or print its kubeconfig.
    Connect(cli::connect::ConnectArgs),
    /// List the virtual clusters on the host.
    List(cli::list::ListArgs),
    /// Delete a virtual cluster and everything it put on the host.
    Delete(cli::delete::DeleteArgs),
    /// Stop a virtual cluster's control plane and remove its host pods (its state is kept).
    Pause(cli::pause::PauseArgs),
    /// Start a paused virtual cluster again; its workloads come back.
    Resume(cli::pause::ResumeArgs),
    /// The local dev host cluster (real upstream processes, nodes simulated by kwok).
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Run the control-plane process (proxy and syncer) of one virtual cluster.
    Run(Box<vkube::controlplane::RunArgs>),
    /// Write what the upstream components need before they start (the chart's init container).
    Prepare(vkube::controlplane::PrepareArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The control-plane process logs what it does; CLI commands show their own progress and only
    // warnings from below.
    init_tracing(if matches!(cli.command, Command::Run(_) | Command::Prepare(_)) { "info" } else { "warn" });
    // One crypto provider for every TLS user in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Create(a) => a.run().await,
            Command::Connect(a) => a.run().await,
            Command::List(a) => a.run().await,
            Command::Delete(a) => a.run().await,
            Command::Pause(a) => a.run().await,
            Command::Resume(a) => a.run().await,
            Command::Dev(cmd) => cmd.run().await,
            Command::Run(a) => vkube::controlplane::run(*a).await,
            Command::Prepare(a) => vkube::controlplane::prepare(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Structured logs on stderr; `RUST_LOG` filters, `VKUBE_LOG_FORMAT=json` for machines.
fn init_tracing(level: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,vkube={level},vkube_syncer={level},vkube_apiproxy={level},kube_client::client::builder=off"
        ))
    });
    let json = std::env::var("VKUBE_LOG_FORMAT").is_ok_and(|f| f == "json");
    use std::io::IsTerminal;
    // Colours only on a terminal: logs of local control planes go to files.
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
