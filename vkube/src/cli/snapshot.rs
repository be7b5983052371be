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

use vkube::controlplane::operations::Kept;

use super::clusters::{self, Mode};
use super::{Output, Target, connect};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube snapshot team-a -o team-a.snapshot
  vkube snapshot team-a -o - > team-a.snapshot
  vkube snapshot team-a -o team-a-with-keys.snapshot --include-pki
  vkube snapshot team-a --keep --label before-experiment   # kept by the control plane

Taken from a running or a sleeping cluster (its workloads stay asleep). Restore it with
`vkube restore team-a --from team-a.snapshot`, or make a new cluster from it with
`vkube create NEW --from-snapshot team-a.snapshot`.")]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: Target,
    /// The file to write (`-`: standard output).
    #[arg(long, short = 'o', value_name = "FILE", required_unless_present = "keep")]
    pub output: Option<String>,
    /// Include the cluster's certificates and keys (whoever holds the file can then act as the
    /// cluster's admin: keep it as safe as the admin kubeconfig).
    #[arg(long, conflicts_with_all = ["kept", "keep"])]
    pub include_pki: bool,
    /// Download a snapshot the control plane keeps (`vkube snapshots NAME`) instead.
    #[arg(long, value_name = "SNAPSHOT", alias = "scheduled")]
    pub kept: Option<String>,
    /// Have the control plane take one and keep it (in its state directory, the chart's volume)
    /// instead of downloading it; prints its name. `vkube restore NAME --kept SNAPSHOT` puts it back.
    #[arg(long, conflicts_with_all = ["output", "kept"])]
    pub keep: bool,
    /// With --keep: a label for it (part of its name); the newest 5 of each label are kept.
    #[arg(long, requires = "keep", default_value = vkube::controlplane::operations::DEFAULT_LABEL)]
    pub label: String,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  vkube snapshots team-a
  vkube restore team-a --kept team-a-20261203T020000Z.snapshot

The control plane keeps scheduled snapshots, taken while the cluster runs (`vkube create
--snapshot-schedule 6h --snapshot-keep 7`, chart values snapshots.schedule and snapshots.keep), and
snapshots taken on request (`vkube snapshot NAME --keep`, `vkube upgrade`), in its state directory
(the chart's volume).")]
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
    #[arg(long = "from", value_name = "FILE", required_unless_present = "kept", conflicts_with = "kept")]
    pub from: Option<PathBuf>,
    /// A snapshot the control plane keeps (`vkube snapshots NAME`).
    #[arg(long, value_name = "SNAPSHOT", alias = "scheduled")]
    pub kept: Option<String>,
    /// Put back the certificates and keys the file holds (`vkube snapshot --include-pki`) too:
    /// kubeconfigs and tokens of that time work again, later ones stop. The control plane restarts.
    #[arg(long, conflicts_with = "kept")]
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
        if self.keep {
            let kept = keep(&self.target, &self.label).await?;
            eprintln!(
                "snapshot of {} taken and kept in {:.1} s: {} bytes; `vkube restore {} --kept {}` puts it back",
                self.target.name,
                started.elapsed().as_secs_f64(),
                kept.bytes,
                self.target.name,
                kept.name
            );
            println!("{}", kept.name);
            return Ok(());
        }
        let output = self.output.clone().unwrap_or_default();
        let proxy = ProxyClient::connect(&self.target).await?;
        eprintln!("taking a snapshot of virtual cluster {}", self.target.name);
        let query = match (&self.kept, self.include_pki) {
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
        let to_stdout = output == "-";
        let partial = PathBuf::from(format!("{output}.partial"));
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
            std::fs::rename(&partial, &output).with_context(|| format!("writing {output}"))?;
        }
        eprintln!(
            "snapshot of {} taken in {:.1} s: {} bytes ({} bytes of etcd data{}){}",
            self.target.name,
            started.elapsed().as_secs_f64(),
            bytes,
            summary["etcdBytes"],
            if self.include_pki { ", with its certificates and keys" } else { "" },
            if to_stdout { String::new() } else { format!(" -> {output}") }
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
        let result = match (&self.from, &self.kept) {
            (Some(file), _) => restore(&self.target, file, false).await?,
            (None, Some(kept)) => restore_kept(&self.target, kept).await?,
            (None, None) => bail!("say what to restore: --from FILE or --kept SNAPSHOT"),
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
        let kept = kept(&self.target).await?;
        if self.output.print(&kept)? {
            return Ok(());
        }
        if kept.is_empty() {
            eprintln!(
                "virtual cluster {} keeps no snapshots (`vkube create --snapshot-schedule 6h` takes them on a schedule, `vkube snapshot {} --keep` now)",
                self.target.name, self.target.name
            );
            return Ok(());
        }
        println!("{:<56} {:<10} {:>12}  CREATED", "NAME", "TAKEN", "BYTES");
        for k in kept {
            let taken = if k.scheduled { "scheduled" } else { "on request" };
            println!("{:<56} {:<10} {:>12}  {}", k.name, taken, k.bytes, k.created);
        }
        Ok(())
    }
}

/// The snapshots `target`'s control plane keeps, newest first.
pub async fn kept(target: &Target) -> anyhow::Result<Vec<Kept>> {
    let proxy = ProxyClient::connect(target).await?;
    let resp = proxy.call(Operation::List.method(), Operation::List.path(), vkube_apiproxy::empty(), None).await?;
    Ok(serde_json::from_value(json_of(resp).await?)?)
}

/// Has `target`'s control plane take a snapshot and keep it under `label`.
pub async fn keep(target: &Target, label: &str) -> anyhow::Result<Kept> {
    vkube::controlplane::operations::check_label(label).map_err(anyhow::Error::msg)?;
    let proxy = ProxyClient::connect(target).await?;
    eprintln!("taking a snapshot of virtual cluster {} for its control plane to keep", target.name);
    let path = format!("{}?label={}", Operation::Keep.path(), encode(label));
    Ok(serde_json::from_value(
        json_of(proxy.call(Operation::Keep.method(), &path, vkube_apiproxy::empty(), None).await?).await?,
    )?)
}

/// Makes `target`'s state that of a snapshot its control plane keeps.
pub async fn restore_kept(target: &Target, kept: &str) -> anyhow::Result<serde_json::Value> {
    let proxy = ProxyClient::connect(target).await?;
    eprintln!("restoring virtual cluster {} from its kept snapshot {kept}", target.name);
    let path = format!("{}?from={}", Operation::Restore.path(), encode(kept));
    json_of(proxy.call(Operation::Restore.method(), &path, vkube_apiproxy::empty(), None).await?).await
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
