//! `vkube certs check NAME` and `vkube certs rotate NAME [--ca]`: the cluster's certificates, as
//! its host Secret holds them (the one copy every control plane start and renewal reads).

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams};
use serde::Serialize;
use vkube::names;
use vkube::pki_store::{self, Rotation};

use super::clusters::{self, Mode, Status};
use super::{Output, Target};

/// `vkube certs check` exits with this when a certificate has expired or expires within the
/// warning window.
pub const EXIT_EXPIRING: u8 = 3;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Show every certificate of a cluster and when it expires (exit 3 if one expires soon).
    #[command(
        after_help = "Examples:\n  vkube certs check team-a\n  vkube certs check team-a --warn-within 90d -o json"
    )]
    Check(CheckArgs),
    /// Issue the cluster's certificates again; the running control plane applies them at once.
    #[command(after_help = "Examples:
  vkube certs rotate team-a         # leaves only: every kubeconfig keeps working
  vkube certs rotate team-a --ca    # new CAs too: kubeconfigs must be fetched again")]
    Rotate(RotateArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub target: Target,
    /// Exit 3 if a certificate expires within this long.
    #[arg(long, default_value = "30d", value_parser = vkube::controlplane::parse_duration)]
    pub warn_within: Duration,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    pub target: Target,
    /// Replace the certificate authorities too (restarts the control plane; every kubeconfig
    /// handed out stops working and must be fetched again).
    #[arg(long)]
    pub ca: bool,
    /// How long to wait for the control plane to apply the new certificates.
    #[arg(long, default_value = "2m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct Certificate {
    /// The file's name without `.crt` (`ca`, `apiserver`, `admin`, ...).
    pub name: String,
    pub common_name: String,
    /// RFC 3339.
    pub not_after: String,
    pub days_left: i64,
}

impl CertsCommand {
    pub async fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self {
            CertsCommand::Check(a) => a.run().await,
            CertsCommand::Rotate(a) => a.run().await.map(|()| std::process::ExitCode::SUCCESS),
        }
    }
}

/// The certificates in the cluster's PKI Secret, soonest expiry first (None: no Secret yet, the
/// control plane has not started once).
pub async fn certificates(host: &kube::Client, target: &Target) -> anyhow::Result<Option<Vec<Certificate>>> {
    let Some(bundle) = pki_store::load(host, &target.namespace(), &target.name).await? else { return Ok(None) };
    let now = time::OffsetDateTime::now_utc();
    let mut out = vec![];
    for (file, pem) in &bundle.files {
        let Some(name) = file.strip_suffix(".crt") else { continue };
        let info = vkube_pki::CertInfo::parse(pem).map_err(|e| anyhow::anyhow!("{file} in the PKI Secret: {e}"))?;
        let not_after = k8s_openapi::jiff::Timestamp::from_second(info.not_after.unix_timestamp())
            .map(|t| t.to_string())
            .unwrap_or_default();
        out.push(Certificate {
            name: name.to_string(),
            common_name: info.common_name,
            not_after,
            days_left: (info.not_after - now).whole_days(),
        });
    }
    out.sort_by(|a, b| (a.days_left, &a.name).cmp(&(b.days_left, &b.name)));
    Ok(Some(out))
}

impl CheckArgs {
    async fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let host = super::host_client().await?;
        clusters::require(&host, &self.target).await?;
        let certs = certificates(&host, &self.target).await?.ok_or_else(|| {
            anyhow::anyhow!(
                "virtual cluster {} has no certificates yet (no Secret {} in {}): its control plane has not started once",
                self.target.name,
                names::pki_secret(&self.target.name),
                self.target.namespace()
            )
        })?;
        let warn_days = (self.warn_within.as_secs() / 86_400) as i64;
        let expiring: Vec<&Certificate> = certs.iter().filter(|c| c.days_left < warn_days).collect();
        if !self.output.print(&certs)? {
            println!("{:<20} {:<36} {:<22} DAYS LEFT", "NAME", "SUBJECT", "EXPIRES");
            for c in &certs {
                println!("{:<20} {:<36} {:<22} {}", c.name, c.common_name, c.not_after, c.days_left);
            }
        }
        if expiring.is_empty() {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let names: Vec<&str> = expiring.iter().map(|c| c.name.as_str()).collect();
        eprintln!(
            "{} expire within {warn_days} days: leaves renew by themselves while the control plane runs; `vkube certs rotate {}{}` replaces them now",
            names.join(", "),
            self.target.name,
            if expiring.iter().any(|c| c.name.ends_with("ca")) { " --ca" } else { "" }
        );
        Ok(std::process::ExitCode::from(EXIT_EXPIRING))
    }
}

impl RotateArgs {
    async fn run(self) -> anyhow::Result<()> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, &self.target).await?;
        let ns = cluster.namespace.clone();
        let ip = vkube::controlplane::service_ip(&host, &ns, &cluster.name).await?;
        let spec = pki_store::spec(&cluster.name, &ns, ip);
        let rotation = if self.ca { Rotation::CertificateAuthorities } else { Rotation::Leaves };
        let (bundle, changes) = pki_store::rotate(&host, &ns, &cluster.name, &spec, rotation).await?;
        let mut issued = changes.created;
        issued.extend(changes.renewed);
        eprintln!("issued again: {}", issued.join(", "));
        let running = matches!(cluster.status, Status::Ready | Status::NotReady);
        if !running {
            eprintln!("the control plane is not running: it uses the new certificates when it starts");
        } else if self.ca {
            // The proxy and the controller manager read their CAs at start.
            eprintln!("restarting the control plane with the new certificate authorities");
            restart(&host, &self.target, &cluster, self.timeout).await?;
        }
        if running {
            eprintln!("waiting for the control plane to publish the new admin kubeconfig");
            let want = bundle.get("admin.crt").unwrap_or_default().to_string();
            wait_published(&host, &self.target, &want, self.timeout).await?;
        }
        if self.ca {
            eprintln!(
                "new certificate authorities: every kubeconfig of {0} made before stops working; fetch the admin one again \
                 (`vkube connect {0}`, or `vkube connect {0} --print`); pods get the new CA in their kube-root-ca.crt, and \
                 service-account tokens stay valid",
                cluster.name
            );
        } else {
            eprintln!("new leaf certificates from the same CAs: every kubeconfig keeps working");
        }
        Ok(())
    }
}

/// Restarts a cluster's control plane (it reads its CAs at start) and waits until it is back.
pub async fn restart(
    host: &kube::Client,
    target: &Target,
    cluster: &clusters::Cluster,
    timeout: Duration,
) -> anyhow::Result<()> {
    match cluster.mode {
        Mode::Local => {
            vkube_localenv::process::stop_all_recorded(&target.local_dir())?;
            super::create::CreateArgs::resume_local(target, timeout).await
        }
        Mode::Chart => {
            let pods: Api<Pod> = Api::namespaced(host.clone(), &cluster.namespace);
            let lp = ListParams::default().labels(&format!("{}={}", names::LABEL_CONTROL_PLANE, cluster.name));
            pods.delete_collection(&DeleteParams::default(), &lp).await.context("restarting the control-plane pod")?;
            let sts: Api<StatefulSet> = Api::namespaced(host.clone(), &cluster.namespace);
            vkube_kubeclient::wait::until(timeout, Duration::from_secs(1), || {
                let (sts, name) = (sts.clone(), cluster.name.clone());
                async move {
                    let s = sts.get(&name).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
                    let fresh = s.updated_replicas.unwrap_or(0) > 0 || s.current_revision == s.update_revision;
                    Ok((s.ready_replicas.unwrap_or(0) > 0 && fresh).then_some(()))
                }
            })
            .await
            .map_err(|e| anyhow::anyhow!("the control plane did not come back within {} s: {e}", timeout.as_secs()))
        }
    }
}

/// Until the admin kubeconfig Secret carries `admin_crt`: the control plane has the new files.
pub async fn wait_published(
    host: &kube::Client,
    target: &Target,
    admin_crt: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ns = &target.namespace();
    let secrets: Api<Secret> = Api::namespaced(host.clone(), ns);
    let name = names::kubeconfig_secret(&target.name);
    vkube_kubeclient::wait::until(timeout, Duration::from_millis(500), || {
        let (secrets, name) = (secrets.clone(), name.clone());
        async move {
            let Some(secret) = secrets.get_opt(&name).await.map_err(|e| e.to_string())? else { return Ok(None) };
            let yaml = secret.data.and_then(|d| d.get(names::KUBECONFIG_KEY).cloned()).unwrap_or_default();
            let kc =
                kube::config::Kubeconfig::from_yaml(&String::from_utf8_lossy(&yaml.0)).map_err(|e| e.to_string())?;
            let published = kc
                .auth_infos
                .iter()
                .filter_map(|a| a.auth_info.as_ref()?.client_certificate_data.clone())
                .any(|b64| decode_base64(&b64).is_some_and(|pem| pem == admin_crt));
            Ok(published.then_some(()))
        }
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "the control plane did not apply the new certificates within {} s ({e}); `vkube logs {} vkube` shows why",
            timeout.as_secs(),
            target.name
        )
    })
}

fn decode_base64(s: &str) -> Option<String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).ok().and_then(|b| String::from_utf8(b).ok())
}
