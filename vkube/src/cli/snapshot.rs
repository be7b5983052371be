//! `vkube snapshot NAME -o FILE`, `vkube restore NAME --from FILE`, `vkube reset NAME`: a virtual
//! cluster's state saved, put back, or emptied. They call the cluster's API proxy with its admin
//! kubeconfig (`/vkube/v1/...`, authorized by the virtual API server's RBAC), directly for a
//! local cluster and through a port-forward to the control-plane pod for a chart's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use kube::client::ConfigExt;
use tokio::io::AsyncWriteExt;
use vkube_apiproxy::ProxyBody;
use vkube_apiproxy::route::Operation;

use super::clusters::{self, Mode};
use super::{Output, Target, connect};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube snapshot team-a -o team-a.snapshot
  vkube snapshot team-a -o - > team-a.snapshot
  vkube snapshot team-a -o team-a-with-keys.snapshot --include-pki

Taken from a running or a sleeping cluster (its workloads stay asleep). Restore it with
`vkube restore team-a --from team-a.snapshot`, or make a new cluster from it with
`vkube create NEW --from-snapshot team-a.snapshot`.")]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: Target,
    /// The file to write (`-`: standard output).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: String,
    /// Include the cluster's certificates and keys (whoever holds the file can then act as the
    /// cluster's admin: keep it as safe as the admin kubeconfig).
    #[arg(long, conflicts_with = "scheduled")]
    pub include_pki: bool,
    /// Download a scheduled snapshot the control plane keeps (`vkube snapshots NAME`) instead.
    #[arg(long, value_name = "SNAPSHOT")]
    pub scheduled: Option<String>,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube snapshots team-a
  vkube restore team-a --scheduled team-a-20261203T020000Z.snapshot

Scheduled snapshots are taken by the control plane while the cluster runs (`vkube create
--snapshot-schedule 6h --snapshot-keep 7`, chart values snapshots.schedule and snapshots.keep) and
kept in its state directory (the chart's volume).")]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube restore team-a --from team-a.snapshot
  vkube restore team-a --from team-a-with-keys.snapshot --include-pki

The cluster's state becomes the snapshot's: its control plane stops, etcd's data is replaced and it
starts again; the host follows (pods recreated, host copies of objects that are gone removed). A
snapshot of another cluster, of a newer vkube or Kubernetes, or damaged, is refused and nothing
changes. The cluster keeps its current certificates unless --include-pki puts back the file's.")]
pub struct RestoreArgs {
    #[command(flatten)]
    pub target: Target,
    /// The snapshot file (`vkube snapshot`).
    #[arg(long = "from", value_name = "FILE", required_unless_present = "scheduled", conflicts_with = "scheduled")]
    pub from: Option<PathBuf>,
    /// A scheduled snapshot the control plane keeps (`vkube snapshots NAME`).
    #[arg(long, value_name = "SNAPSHOT")]
    pub scheduled: Option<String>,
    /// Put back the certificates and keys the file holds (`vkube snapshot --include-pki`) too:
    /// kubeconfigs and tokens of that time work again, later ones stop. The control plane restarts.
    #[arg(long, conflicts_with = "scheduled")]
    pub include_pki: bool,
    /// How long to wait for the control plane to come back with them.
    #[arg(long, default_value = "5m", value_parser = vkube::controlplane::parse_duration)]
    pub timeout: std::time::Duration,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube reset team-a

Everything in the virtual cluster is deleted: it is as freshly created (same name, certificates and
kubeconfig), and its workloads' host objects are removed. Take a snapshot first to keep it.")]
pub struct ResetArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

impl SnapshotArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let started = Instant::now();
        let proxy = ProxyClient::connect(&self.target).await?;
        eprintln!("taking a snapshot of virtual cluster {}", self.target.name);
        let query = match (&self.scheduled, self.include_pki) {
            (Some(kept), _) => format!("?from={}", encode(kept)),
            (None, true) => "?pki=true".into(),
            (None, false) => String::new(),
        };
        let path = format!("{}{query}", Operation::Snapshot.path());
        let resp = proxy.call(Operation::Snapshot.method(), &path, vkube_apiproxy::empty(), None).await?;
        let summary: serde_json::Value = resp
            .headers()
            .get("x-vkube-snapshot")
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
            .unwrap_or_default();
        let mut body = resp.into_body();
        let to_stdout = self.output == "-";
        let partial = PathBuf::from(format!("{}.partial", self.output));
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
            Box::new(tokio::io::stdout())
        } else {
            // Owner-only: a snapshot holds every Secret of the cluster (and with --include-pki its keys).
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .await
                .with_context(|| format!("creating {}", partial.display()))?;
            Box::new(file)
        };
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| anyhow::anyhow!("the snapshot stream broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await?;
                bytes += data.len() as u64;
            }
        }
        out.flush().await?;
        drop(out);
        if !to_stdout {
            std::fs::rename(&partial, &self.output).with_context(|| format!("writing {}", self.output))?;
        }
        eprintln!(
            "snapshot of {} taken in {:.1} s: {} bytes ({} bytes of etcd data{}){}",
            self.target.name,
            started.elapsed().as_secs_f64(),
            bytes,
            summary["etcdBytes"],
            if self.include_pki { ", with its certificates and keys" } else { "" },
            if to_stdout { String::new() } else { format!(" -> {}", self.output) }
        );
        Ok(())
    }
}

impl RestoreArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let pki = match (&self.from, self.include_pki) {
            (Some(file), true) => Some(pki_of(&self.target, file)?),
            _ => None,
        };
        let result = match (&self.from, &self.scheduled) {
            (Some(file), _) => restore(&self.target, file, false).await?,
            (None, Some(kept)) => {
                let proxy = ProxyClient::connect(&self.target).await?;
                eprintln!("restoring virtual cluster {} from its kept snapshot {kept}", self.target.name);
                let path = format!("{}?from={}", Operation::Restore.path(), encode(kept));
                json_of(proxy.call(Operation::Restore.method(), &path, vkube_apiproxy::empty(), None).await?).await?
            }
            (None, None) => bail!("say what to restore: --from FILE or --scheduled SNAPSHOT"),
        };
        if let Some(files) = pki {
            put_back_pki(&self.target, files, self.timeout).await?;
        }
        if !self.output.print(&result)? {
            eprintln!(
                "virtual cluster {} restored from its snapshot of {} in {:.1} s",
                self.target.name,
                result["created"],
                result["seconds"].as_f64().unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl ListArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let proxy = ProxyClient::connect(&self.target).await?;
        let resp = proxy.call(Operation::List.method(), Operation::List.path(), vkube_apiproxy::empty(), None).await?;
        let kept: Vec<vkube::controlplane::operations::Kept> = serde_json::from_value(json_of(resp).await?)?;
        if self.output.print(&kept)? {
            return Ok(());
        }
        if kept.is_empty() {
            eprintln!(
                "virtual cluster {} keeps no scheduled snapshots (`vkube create --snapshot-schedule 6h` takes them)",
                self.target.name
            );
            return Ok(());
        }
        println!("{:<48} {:>12}  CREATED", "NAME", "BYTES");
        for k in kept {
            println!("{:<48} {:>12}  {}", k.name, k.bytes, k.created);
        }
        Ok(())
    }
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl ResetArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let proxy = ProxyClient::connect(&self.target).await?;
        eprintln!("resetting virtual cluster {}: everything in it is deleted", self.target.name);
        let resp =
            proxy.call(Operation::Reset.method(), Operation::Reset.path(), vkube_apiproxy::empty(), None).await?;
        let result = json_of(resp).await?;
        if !self.output.print(&result)? {
            eprintln!(
                "virtual cluster {} reset in {:.1} s",
                self.target.name,
                result["seconds"].as_f64().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// The certificates and keys a snapshot of `target` holds (the whole file is read and checked).
fn pki_of(target: &Target, file: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let dir = tempfile::tempdir()?;
    let f = std::fs::File::open(file).with_context(|| format!("opening the snapshot {}", file.display()))?;
    let manifest = vkube::snapshot::read(std::io::BufReader::new(f), dir.path())?;
    manifest.check_for(&target.name, false)?;
    if !manifest.has_pki() {
        bail!("{} holds no certificates and keys: it was taken without --include-pki", file.display());
    }
    let pki = dir.path().join(vkube::snapshot::PKI_PREFIX);
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&pki)? {
        let entry = entry?;
        files.insert(entry.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(entry.path())?);
    }
    Ok(files)
}

/// Writes a snapshot's certificates and keys into the cluster's PKI Secret and restarts its control
/// plane with them (it reads its CAs at start), waiting until it publishes the admin kubeconfig.
async fn put_back_pki(
    target: &Target,
    files: std::collections::BTreeMap<String, String>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let host = super::host_client().await?;
    let cluster = clusters::require(&host, target).await?;
    let ns = target.namespace();
    let ip = vkube::controlplane::service_ip(&host, &ns, &target.name).await?;
    let spec = vkube::pki_store::spec(&target.name, &ns, ip);
    let (bundle, _) = vkube::pki_store::replace(&host, &ns, &target.name, &spec, files).await?;
    eprintln!("put back its certificates and keys; restarting the control plane with them");
    super::certs::restart(&host, target, &cluster, timeout).await?;
    super::certs::wait_published(&host, target, bundle.get("admin.crt").unwrap_or_default(), timeout).await?;
    eprintln!(
        "kubeconfigs of the snapshot's time work again, later ones do not: fetch it again with `vkube connect {}`",
        target.name
    );
    Ok(())
}

/// Makes `target`'s state the snapshot's (`fork`: a snapshot of another cluster, for a new one).
pub async fn restore(target: &Target, file: &Path, fork: bool) -> anyhow::Result<serde_json::Value> {
    // The manifest first: a file that is not a snapshot, or of another cluster, fails here.
    let manifest = vkube::snapshot::read_manifest(
        std::fs::File::open(file).with_context(|| format!("opening the snapshot {}", file.display()))?,
    )?;
    manifest.check_for(&target.name, fork)?;
    let proxy = ProxyClient::connect(target).await?;
    eprintln!(
        "restoring virtual cluster {} from the snapshot of {} taken {}",
        target.name, manifest.cluster, manifest.created
    );
    let f = tokio::fs::File::open(file).await?;
    let len = f.metadata().await?.len();
    let frames = tokio_util::io::ReaderStream::new(f).map_ok(Frame::data).map_err(vkube_apiproxy::BoxError::from);
    let path = format!("{}{}", Operation::Restore.path(), if fork { "?fork=true" } else { "" });
    let resp =
        proxy.call(Operation::Restore.method(), &path, StreamBody::new(frames).boxed_unsync(), Some(len)).await?;
    json_of(resp).await
}

async fn json_of(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<serde_json::Value> {
    let body = resp.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&body).context("the control plane's answer is not JSON")
}

/// An HTTPS client of the cluster's API proxy with its admin credentials.
struct ProxyClient {
    base: String,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        ProxyBody,
    >,
    /// The port-forward it goes through (a chart's cluster), stopped with it.
    forward: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ProxyClient {
    fn drop(&mut self) {
        if let Some(f) = self.forward.take() {
            f.abort();
        }
    }
}

impl ProxyClient {
    async fn connect(target: &Target) -> anyhow::Result<Self> {
        let host = super::host_client().await?;
        let cluster = clusters::require(&host, target).await?;
        let kc = connect::admin_kubeconfig(&host, target).await?;
        let (kc, forward) = match cluster.mode {
            Mode::Local => (kc, None),
            Mode::Chart => {
                let (kc, task) = connect::port_forward(host, target, kc, 0).await?;
                (kc, Some(task))
            }
        };
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("the cluster's admin kubeconfig")?;
        let connector = config.rustls_https_connector().context("the cluster's admin kubeconfig")?;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(ProxyClient { base: config.cluster_url.to_string().trim_end_matches('/').to_string(), client, forward })
    }

    /// Sends one request; a refusal is an error with the control plane's message.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: ProxyBody,
        len: Option<u64>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(len) = len {
            req = req.header(http::header::CONTENT_LENGTH, len).header(http::header::CONTENT_TYPE, "application/gzip");
        }
        let resp = self.client.request(req.body(body)?).await.context("reaching the cluster's API proxy")?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_else(|_| Bytes::new());
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{message} ({status})")
    }
}
