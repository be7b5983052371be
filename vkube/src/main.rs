//! `vkube`: the CLI and the control-plane process, one binary.

mod cli;
mod dev;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// glibc's allocator keeps what a burst freed (a wake's new threads, a restart's initial lists)
/// in per-thread arenas for good; jemalloc's background threads return freed pages to the system
/// within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const START_HERE: &str = "Start here:
  vkube dev up && eval \"$(vkube dev env)\"  # a local host cluster (or use your own in KUBECONFIG)
  vkube create team-a --local                # a virtual cluster on it (the Helm chart without --local)
  vkube connect team-a -- kubectl get ns     # kubectl against the virtual cluster

Exit codes: 0 success, 1 error (the message says what to do next), 2 usage error,
3 `vkube certs check` found a certificate that expires soon; `vkube connect -- CMD` exits with CMD's code.";

#[derive(Parser)]
#[command(
    name = "vkube",
    version,
    about = "Virtual Kubernetes clusters inside one namespace of a host cluster",
    arg_required_else_help = true,
    after_help = START_HERE
)]
struct Cli {
    /// The host kubeconfig's context to use (default: its current context).
    #[arg(long, global = true, value_name = "CONTEXT")]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a virtual cluster (or start an existing one) and wait until it answers.
    Create(Box<cli::create::CreateArgs>),
    /// Add a kubeconfig context for a virtual cluster, or print its kubeconfig.
    Connect(cli::connect::ConnectArgs),
    /// List the virtual clusters on the host.
    List(cli::list::ListArgs),
    /// What each virtual cluster used of the host (requests over time, sleep, activity) and
    /// what it cost at the given prices.
    Usage(cli::usage::UsageArgs),
    /// The host-wide housekeeper: deletes the clusters whose TTL ended or that sat unused for
    /// the time they were given.
    Platform(cli::platform::PlatformArgs),
    /// Serve a web page of every virtual cluster (state, activity, use, savings, expiry) on
    /// this machine, with the host kubeconfig's credentials.
    Dashboard(cli::dashboard::DashboardArgs),
    /// Show one virtual cluster in full: components, policy, host resources, certificates.
    Describe(cli::describe::DescribeArgs),
    /// Print the control plane's logs (local files or the chart pod's containers).
    Logs(cli::logs::LogsArgs),
    /// Check or rotate a virtual cluster's certificates.
    #[command(subcommand)]
    Certs(cli::certs::CertsCommand),
    /// Print the client's version, and with a NAME the cluster's components' versions.
    Version(cli::version::VersionArgs),
    /// Print a shell completion script (`source <(vkube completion bash)`).
    #[command(
        after_help = "Examples:\n  source <(vkube completion bash)\n  vkube completion zsh > \"${fpath[1]}/_vkube\""
    )]
    Completion { shell: clap_complete::Shell },
    /// Delete a virtual cluster and everything it put on the host.
    Delete(cli::delete::DeleteArgs),
    /// Stop a virtual cluster's control plane and remove its host pods (its state is kept).
    Pause(cli::pause::PauseArgs),
    /// Start a paused virtual cluster again; its workloads come back.
    Resume(cli::pause::ResumeArgs),
    /// Put a virtual cluster to sleep now: host pods and upstream components stop, its proxy
    /// stays and the first request that counts wakes it (local clusters).
    Sleep(cli::sleep::PowerArgs),
    /// Wake a sleeping virtual cluster and wait until it answers.
    Wake(cli::sleep::PowerArgs),
    /// Save a virtual cluster's state to a file (running or asleep).
    Snapshot(cli::snapshot::SnapshotArgs),
    /// List the snapshots a virtual cluster's control plane keeps (scheduled and taken on request).
    Snapshots(cli::snapshot::ListArgs),
    /// Make a virtual cluster's state a snapshot's again.
    Restore(cli::snapshot::RestoreArgs),
    /// Empty a virtual cluster: as freshly created, with the same name and credentials.
    Reset(cli::snapshot::ResetArgs),
    /// Move a virtual cluster to this vkube's version after a snapshot; `--rollback` undoes it.
    Upgrade(Box<cli::upgrade::UpgradeArgs>),
    /// The local dev host cluster (real upstream processes, nodes simulated by kwok).
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Run the control-plane process (proxy and syncer) of one virtual cluster.
    Run(Box<vkube::controlplane::RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(c) = cli.context.clone() {
        let _ = cli::HOST_CONTEXT.set(c);
    }
    // The control-plane process logs what it does; CLI commands show their own progress and only
    // warnings from below.
    init_tracing(if matches!(cli.command, Command::Run(_) | Command::Platform(_) | Command::Dashboard(_)) {
        "info"
    } else {
        "warn"
    });
    // One crypto provider for every TLS user in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = rt.block_on(async move {
        match cli.command {
            Command::Create(a) => ok((*a).run().await),
            Command::Connect(a) => a.run().await,
            Command::List(a) => ok(a.run().await),
            Command::Usage(a) => ok(a.run().await),
            Command::Platform(a) => ok(a.run().await),
            Command::Dashboard(a) => ok(a.run().await),
            Command::Describe(a) => ok(a.run().await),
            Command::Logs(a) => ok(a.run().await),
            Command::Certs(cmd) => cmd.run().await,
            Command::Version(a) => ok(a.run().await),
            Command::Completion { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "vkube", &mut std::io::stdout());
                Ok(ExitCode::SUCCESS)
            }
            Command::Delete(a) => ok(a.run().await),
            Command::Pause(a) => ok(a.run().await),
            Command::Resume(a) => ok(a.run().await),
            Command::Sleep(a) => ok(a.sleep().await),
            Command::Wake(a) => ok(a.wake().await),
            Command::Snapshot(a) => ok(a.run().await),
            Command::Snapshots(a) => ok(a.run().await),
            Command::Restore(a) => ok(a.run().await),
            Command::Reset(a) => ok(a.run().await),
            Command::Upgrade(a) => ok((*a).run().await),
            Command::Dev(cmd) => ok(cmd.run().await),
            Command::Run(a) => ok(vkube::controlplane::run(*a).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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
