//! `vkube connect NAME`: the admin kubeconfig (from its host Secret) as a context of your
//! kubeconfig, printed, or reached through a port-forward when its endpoint is not reachable
//! from here (a cluster on a remote host).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::config::Kubeconfig;
use vkube::names;

use super::Target;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube connect team-a                          # a context vkube-team-a in your kubeconfig
  vkube connect team-a -- kubectl get pods -A   # one command with the cluster's kubeconfig
  vkube connect team-a --port-forward -- helm list -A
  vkube connect team-a --print > team-a.kubeconfig

With a command after --, its exit code is vkube's; nothing is added to your kubeconfig and a
port-forward started for it stops with it.")]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the kubeconfig instead of adding a context.
    #[arg(long)]
    pub print: bool,
    /// Reach the cluster through a port-forward to its control-plane pod; keeps running.
    #[arg(long)]
    pub port_forward: bool,
    /// Local port for `--port-forward` (default: any free port).
    #[arg(long, default_value_t = 0)]
    pub local_port: u16,
    /// The kubeconfig file to add the context to (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig_file: Option<PathBuf>,
    /// Make the new context the current one.
    #[arg(long)]
    pub switch: bool,
    /// Run this command with KUBECONFIG set to the cluster's (a private temporary file).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl ConnectArgs {
    pub async fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let host = super::host_client().await?;
        let mut kc = admin_kubeconfig(&host, &self.target).await?;
        let context = format!("vkube-{}", self.target.name);
        rename(&mut kc, &context);
        let forwarding = if self.port_forward {
            let (forwarded, listener) = port_forward(host, &self.target, kc, self.local_port).await?;
            kc = forwarded;
            Some(listener)
        } else {
            None
        };
        if !self.command.is_empty() {
            let code = self.run_command(&kc).await;
            if let Some(f) = forwarding {
                f.abort();
            }
            return code;
        }
        if self.print {
            print!("{}", vkube_pki::kubeconfig::to_yaml(&kc));
        } else {
            let file = self.kubeconfig_file.clone().map(Ok).unwrap_or_else(default_kubeconfig_file)?;
            merge_into(&file, kc, self.switch)?;
            let how = if forwarding.is_some() { " (through this port-forward)" } else { "" };
            eprintln!("added context {context} to {}{how}", file.display());
            if !self.switch {
                eprintln!("  kubectl --context {context} get namespaces");
            }
        }
        if let Some(f) = forwarding {
            eprintln!("Ctrl-C to stop the port-forward");
            tokio::select! {
                _ = f => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Ok(std::process::ExitCode::SUCCESS)
    }

    /// Runs `command` with the kubeconfig in a private file that goes when it ends; its exit code.
    async fn run_command(&self, kc: &Kubeconfig) -> anyhow::Result<std::process::ExitCode> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("kubeconfig");
        vkube_kubeclient::write_private(&file, &vkube_pki::kubeconfig::to_yaml(kc))?;
        let status = tokio::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("KUBECONFIG", &file)
            .status()
            .await
            .with_context(|| format!("running {:?} (is it installed and on PATH?)", self.command[0]))?;
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
        Ok(std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)))
    }
}

/// Listens on a local port that forwards to the control-plane pod; the kubeconfig that goes
/// through it, and the task that serves it.
pub async fn port_forward(
    host: kube::Client,
    target: &Target,
    mut kc: Kubeconfig,
    local_port: u16,
) -> anyhow::Result<(Kubeconfig, tokio::task::JoinHandle<()>)> {
    let ns = target.namespace();
    let pods: Api<Pod> = Api::namespaced(host, &ns);
    let pod = pods
        .list(&ListParams::default().labels(&format!("{}={}", names::LABEL_CONTROL_PLANE, target.name)))
        .await?
        .items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no running control-plane pod of {} in {ns}", target.name))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local_port)).await?;
    let port = listener.local_addr()?.port();
    // The serving certificate names the in-cluster Service: keep verifying against that name.
    for c in kc.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        c.server = Some(format!("https://127.0.0.1:{port}"));
        c.tls_server_name = Some(format!("{}.{ns}.svc", names::service(&target.name)));
    }
    eprintln!("forwarding 127.0.0.1:{port} -> {ns}/{pod}:8443");
    let serve = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (pods, pod) = (pods.clone(), pod.clone());
            tokio::spawn(async move {
                let mut fwd = match pods.portforward(&pod, &[8443]).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(error = %e, "port-forward failed");
                        return;
                    }
                };
                if let Some(mut upstream) = fwd.take_stream(8443) {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
                drop(fwd);
            });
        }
    });
    Ok((kc, serve))
}

/// The admin kubeconfig a control plane published in its host Secret.
pub async fn admin_kubeconfig(host: &kube::Client, target: &Target) -> anyhow::Result<Kubeconfig> {
    let ns = target.namespace();
    let name = names::kubeconfig_secret(&target.name);
    let secret = Api::<Secret>::namespaced(host.clone(), &ns)
        .get_opt(&name)
        .await
        .with_context(|| format!("reading Secret {ns}/{name}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "virtual cluster {} not found in host namespace {ns} (no Secret {name}), or its control plane has not started yet; `vkube list` shows what exists",
                target.name
            )
        })?;
    let yaml = secret
        .data
        .and_then(|d| d.get(names::KUBECONFIG_KEY).cloned())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| anyhow::anyhow!("Secret {ns}/{name} has no {} key", names::KUBECONFIG_KEY))?;
    Ok(Kubeconfig::from_yaml(&yaml)?)
}

/// Names the cluster, user and context of a one-context kubeconfig `name`.
fn rename(kc: &mut Kubeconfig, name: &str) {
    for c in &mut kc.clusters {
        c.name = name.into();
    }
    for u in &mut kc.auth_infos {
        u.name = name.into();
    }
    for c in &mut kc.contexts {
        c.name = name.into();
        if let Some(ctx) = c.context.as_mut() {
            ctx.cluster = name.into();
            ctx.user = Some(name.into());
        }
    }
    kc.current_context = Some(name.into());
}

fn default_kubeconfig_file() -> anyhow::Result<PathBuf> {
    Ok(super::host_kubeconfig()?.0)
}

/// Adds (or replaces) the entries of `kc` in the kubeconfig file.
fn merge_into(file: &std::path::Path, kc: Kubeconfig, switch: bool) -> anyhow::Result<()> {
    let mut existing = if file.exists() { Kubeconfig::read_from(file)? } else { Kubeconfig::default() };
    let name = kc.current_context.clone().unwrap_or_default();
    existing.clusters.retain(|c| c.name != name);
    existing.auth_infos.retain(|c| c.name != name);
    existing.contexts.retain(|c| c.name != name);
    existing.clusters.extend(kc.clusters);
    existing.auth_infos.extend(kc.auth_infos);
    existing.contexts.extend(kc.contexts);
    if switch || existing.current_context.is_none() {
        existing.current_context = Some(name);
    }
    existing.api_version.get_or_insert_with(|| "v1".into());
    existing.kind.get_or_insert_with(|| "Config".into());
    vkube_kubeclient::write_private(file, &vkube_pki::kubeconfig::to_yaml(&existing))?;
    Ok(())
}
