//! vkube's own operations behind the API proxy (`vkube_apiproxy::route::Operation`), served once
//! the proxy has authorized them: a snapshot file streamed out, a snapshot file taken in and
//! restored (or forked), a reset, and the snapshots kept in the state directory: scheduled ones
//! (taken every `--snapshot-schedule` while the cluster runs, the newest `--snapshot-keep`) and
//! ones taken on request (`POST /vkube/v1/keep?label=L`, before an upgrade). Files are
//! spooled in the state directory, never held in memory; the power controller does what needs
//! the components stopped (`power::Op`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use vkube_apiproxy::error::ProxyError;
use vkube_apiproxy::route::Operation;
use vkube_apiproxy::{BoxError, ProxyBody};

use super::power::Op;
use crate::snapshot::{self, Manifest, Source};

/// The largest snapshot file a restore takes (etcd's own quota is 2 GiB, compressed less).
const MAX_UPLOAD: u64 = 4 << 30;
/// Where scheduled snapshots are kept, under `Operations::dir`.
const SCHEDULED: &str = "scheduled";
/// Where snapshots taken on request are kept, under `Operations::dir`.
const TAKEN: &str = "taken";
/// Snapshots taken on request kept per label (the newest), and in all: a tenant's admin asking
/// again and again cannot fill the host's disk.
const TAKEN_KEEP_PER_LABEL: usize = 5;
const TAKEN_KEEP: usize = 20;
/// The label of a snapshot taken on request without one.
pub const DEFAULT_LABEL: &str = "manual";
/// The label `vkube upgrade` keeps its snapshot under: only the newest of it is kept, and it is
/// outside the bound in all, so snapshots of other labels never rotate it away.
pub const UPGRADE_LABEL: &str = "before-upgrade";
/// `vkube run`'s scheduled snapshots and the room kept ones may take.
#[derive(clap::Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// Take a snapshot this often while the cluster runs (e.g. 6h), kept in
    /// STATE_DIR/snapshots/scheduled (`vkube snapshots NAME` lists them). Off when unset.
    #[arg(long, env = "VKUBE_SNAPSHOT_SCHEDULE", value_parser = super::parse_duration)]
    pub snapshot_schedule: Option<Duration>,
    /// How many scheduled snapshots are kept: the newest.
    #[arg(long, env = "VKUBE_SNAPSHOT_KEEP", default_value_t = 7)]
    pub snapshot_keep: usize,
    /// A snapshot taken on request is not kept if its volume (the chart's, or the machine's
    /// disk for a local cluster) would be fuller than this, in percent, afterwards.
    #[arg(long, env = "VKUBE_SNAPSHOT_MAX_FULL_PERCENT", default_value_t = 90,
          value_parser = clap::value_parser!(u64).range(1..=100))]
    pub snapshot_max_full_percent: u64,
}

/// A kept snapshot, as `vkube snapshots` lists it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Kept {
    pub name: String,
    pub bytes: u64,
    /// RFC 3339.
    pub created: String,
    /// Taken by the schedule (else on request: `vkube snapshot --keep`, `vkube upgrade`); a
    /// control plane older than snapshots on request lists only scheduled ones.
    #[serde(default = "scheduled_by_default")]
    pub scheduled: bool,
}

fn scheduled_by_default() -> bool {
    true
}

/// A label for a snapshot taken on request: part of its file name, so plain and short.
pub fn check_label(label: &str) -> Result<(), String> {
    let plain = label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if label.is_empty() || label.len() > 20 || !plain || label.starts_with('-') {
        return Err(format!(
            "snapshot label {label:?}: 1 to 20 of a-z, 0-9 and '-', not starting with '-' (e.g. before-upgrade)"
        ));
    }
    Ok(())
}

pub struct Operations {
    pub ops: mpsc::Sender<Op>,
    /// Where files are spooled (`STATE_DIR/snapshots`).
    pub dir: PathBuf,
    pub name: String,
    pub namespace: String,
    pub host: kube::Client,
    /// One restore spooled at a time: a tenant's admin cannot fill the disk with parallel uploads.
    pub uploads: tokio::sync::Semaphore,
    /// Snapshot files being taken or streamed out at once (each is on disk until it is read).
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// `--snapshot-max-full-percent`.
    pub max_full_percent: u64,
}

/// Removes the work directories of requests a crash cut short (`tempdir_in` names them `.tmp*`).
pub fn remove_leftovers(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Operations {
    pub fn handler(self: &Arc<Self>) -> vkube_apiproxy::Operations {
        let this = self.clone();
        Arc::new(move |op, req| {
            let this = this.clone();
            Box::pin(async move { this.serve(op, req).await })
        })
    }

    fn kept_dir(&self, scheduled: bool) -> PathBuf {
        self.dir.join(if scheduled { SCHEDULED } else { TAKEN })
    }

    /// The kept snapshots, scheduled and taken on request, newest first.
    pub fn kept(&self) -> Vec<Kept> {
        let mut kept: Vec<(SystemTime, Kept)> = [true, false]
            .into_iter()
            .flat_map(|scheduled| {
                let entries = std::fs::read_dir(self.kept_dir(scheduled)).into_iter().flatten().flatten();
                entries.filter_map(move |e| {
                    let meta = e.metadata().ok().filter(|m| m.is_file())?;
                    let name = e.file_name().to_str()?.to_string();
                    let modified = meta.modified().ok()?;
                    let created = jiff::Timestamp::try_from(modified).ok()?.to_string();
                    let kept = Kept { name, bytes: meta.len(), created, scheduled };
                    kept.name.ends_with(".snapshot").then_some((modified, kept))
                })
            })
            .collect();
        kept.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.name.cmp(&a.1.name)));
        kept.into_iter().map(|(_, k)| k).collect()
    }

    /// The path of a kept snapshot by its name, if there is one.
    fn kept_path(&self, name: &str) -> Result<PathBuf, ProxyError> {
        match self.kept().into_iter().find(|k| k.name == name) {
            Some(k) => Ok(self.kept_dir(k.scheduled).join(name)),
            None => Err(ProxyError::NotFound(format!(
                "no kept snapshot {name:?} (`vkube snapshots {}` lists them)",
                self.name
            ))),
        }
    }

    /// Takes a snapshot every `every` while `power` says the cluster runs (asleep nothing
    /// changes), counting from the newest kept one, and keeps the newest `keep`.
    pub async fn schedule(
        self: Arc<Self>,
        every: Duration,
        keep: usize,
        mut power: tokio::sync::watch::Receiver<vkube_apiproxy::sleep::Power>,
    ) {
        loop {
            // Asleep (or starting), wait for it to run rather than poll: a sleeping cluster idles.
            if power.wait_for(|p| *p == vkube_apiproxy::sleep::Power::Running).await.is_err() {
                return;
            }
            let newest = self.kept().into_iter().find(|k| k.scheduled);
            let newest = std::fs::metadata(self.kept_dir(true).join(newest.map(|k| k.name).unwrap_or_default()))
                .and_then(|m| m.modified())
                .ok();
            let due = newest.map(|t| t + every).unwrap_or(SystemTime::now());
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
            if SystemTime::now() < due || *power.borrow() != vkube_apiproxy::sleep::Power::Running {
                continue;
            }
            match self.keep_one(None, keep).await {
                Ok(kept) => tracing::info!(snapshot = kept.name, "scheduled snapshot taken"),
                Err(e) => {
                    tracing::error!(error = %e, "a scheduled snapshot failed; trying again in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }

    /// Takes a snapshot and keeps it: scheduled (`label` None, the newest `keep` of them stay)
    /// or on request (its label's newest few stay, and a bounded number in all).
    async fn keep_one(&self, label: Option<&str>, keep: usize) -> Result<Kept, ProxyError> {
        let _permit = self.downloads.clone().acquire_owned().await.map_err(|_| stopping())?;
        let (_work, archive, _) = self.take(false).await?;
        if label.is_some() {
            // Taken, it already holds its space: refused, it goes with its work directory.
            check_space(&self.dir, self.max_full_percent)?;
        }
        let dir = self.kept_dir(label.is_none());
        std::fs::create_dir_all(&dir).map_err(failed("creating the kept snapshots' directory"))?;
        let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let stem = match label {
            Some(label) => format!("{}-{label}-{stamp}", self.name),
            None => format!("{}-{stamp}", self.name),
        };
        // A link, not a rename: two taken in one second get their own names, neither replaced.
        let mut name = format!("{stem}.snapshot");
        for n in 2.. {
            match std::fs::hard_link(&archive, dir.join(&name)) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => {
                    name = format!("{stem}-{n}.snapshot")
                }
                done => {
                    done.map_err(failed("keeping the snapshot"))?;
                    break;
                }
            }
        }
        let same: Vec<Kept> = self.kept().into_iter().filter(|k| k.scheduled == label.is_none()).collect();
        let old = match label {
            None => same.into_iter().skip(keep.max(1)).collect(),
            Some(_) => rotated(same, &self.name),
        };
        for k in old {
            let _ = std::fs::remove_file(dir.join(&k.name));
        }
        self.kept()
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| ProxyError::Failed("the kept snapshot went".into()))
    }

    async fn serve(&self, op: Operation, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let query: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let flag = |name: &str| param(name).is_some_and(|v| v.is_empty() || v == "true");
        std::fs::create_dir_all(&self.dir).map_err(failed("creating the snapshot directory"))?;
        let from = param("from");
        match op {
            Operation::Snapshot => {
                let permit = self.downloads.clone().acquire_owned().await.map_err(|_| stopping())?;
                match from {
                    Some(name) => stream_file(&self.kept_path(&name)?, None, permit).await,
                    None => self.snapshot(flag("pki"), permit).await,
                }
            }
            Operation::Restore => {
                let fork = flag("fork");
                let stored = from.map(|name| self.kept_path(&name)).transpose()?;
                self.restore(req.into_body(), stored, fork).await
            }
            Operation::List => {
                Ok(json(serde_json::to_value(self.kept()).map_err(|e| ProxyError::Failed(e.to_string()))?))
            }
            Operation::Keep => {
                let label = param("label").unwrap_or_else(|| DEFAULT_LABEL.into());
                check_label(&label).map_err(ProxyError::BadRequest)?;
                let kept = self.keep_one(Some(&label), 0).await?;
                tracing::info!(snapshot = kept.name, "snapshot taken and kept on request");
                Ok(json(serde_json::to_value(kept).map_err(|e| ProxyError::Failed(e.to_string()))?))
            }
            Operation::Reset => {
                let started = Instant::now();
                self.replace(None, None).await?;
                tracing::info!("the virtual cluster was reset");
                Ok(json(serde_json::json!({"cluster": self.name, "seconds": started.elapsed().as_secs_f64()})))
            }
        }
    }

    async fn snapshot(
        &self,
        pki: bool,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (work, archive, manifest) = self.take(pki).await?;
        let response = stream_file(&archive, Some(&manifest), permit).await;
        // The open file stays readable once its directory is gone.
        drop(work);
        response
    }

    /// A new snapshot file (in a work directory that goes when it is dropped), and its manifest.
    async fn take(&self, pki: bool) -> Result<(tempfile::TempDir, PathBuf, Manifest), ProxyError> {
        std::fs::create_dir_all(&self.dir).map_err(failed("creating the snapshot directory"))?;
        let work = tempfile::tempdir_in(&self.dir).map_err(failed("creating a work directory"))?;
        let db = work.path().join(snapshot::ETCD_DB);
        let (reply, answer) = oneshot::channel();
        self.send(Op::Snapshot { to: db.clone(), reply }).await?;
        let saved = answer.await.map_err(|_| stopping())?.map_err(|e| ProxyError::Failed(format!("{e:#}")))?;
        let mut parts = vec![(snapshot::ETCD_DB.to_string(), Source::File(db))];
        if pki {
            let bundle = crate::pki_store::load(&self.host, &self.namespace, &self.name)
                .await
                .map_err(|e| ProxyError::upstream("reading the cluster's certificates from the host", e))?
                .unwrap_or_default();
            parts.extend(
                bundle
                    .files
                    .into_iter()
                    .map(|(k, v)| (format!("{}{k}", snapshot::PKI_PREFIX), Source::Bytes(v.into()))),
            );
        }
        let archive = work.path().join("snapshot.tar.gz");
        let manifest = Manifest::new(&self.name, &self.namespace);
        let written = {
            let archive = archive.clone();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::create(&archive)?;
                snapshot::write(std::io::BufWriter::new(file), manifest, parts)
            })
            .await
            .map_err(|e| ProxyError::Failed(format!("writing the snapshot: {e}")))?
            .map_err(|e| ProxyError::Failed(format!("writing the snapshot: {e:#}")))?
        };
        let _ = std::fs::remove_file(work.path().join(snapshot::ETCD_DB));
        tracing::info!(etcd_bytes = saved.bytes, pki, "snapshot taken");
        Ok((work, archive, written))
    }

    async fn restore(
        &self,
        mut body: Incoming,
        stored: Option<PathBuf>,
        fork: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        let _one_at_a_time = self.uploads.acquire().await.map_err(|_| stopping())?;
        let work = tempfile::tempdir_in(&self.dir).map_err(failed("creating a work directory"))?;
        let upload = match stored {
            Some(path) => path,
            None => {
                let upload = work.path().join("upload.tar.gz");
                let mut file = tokio::fs::File::create(&upload).await.map_err(failed("spooling the snapshot"))?;
                let mut size = 0u64;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| ProxyError::BadRequest(format!("reading the snapshot sent: {e}")))?;
                    if let Ok(data) = frame.into_data() {
                        size += data.len() as u64;
                        if size > MAX_UPLOAD {
                            return Err(ProxyError::TooLarge(format!(
                                "a snapshot file may be at most {MAX_UPLOAD} bytes"
                            )));
                        }
                        file.write_all(&data).await.map_err(failed("spooling the snapshot"))?;
                    }
                }
                file.flush().await.map_err(failed("spooling the snapshot"))?;
                upload
            }
        };
        let parts = work.path().join("parts");
        let manifest = tokio::task::spawn_blocking({
            let parts = parts.clone();
            move || snapshot::read(std::io::BufReader::new(std::fs::File::open(&upload)?), &parts)
        })
        .await
        .map_err(|e| ProxyError::Failed(format!("reading the snapshot: {e}")))?
        .map_err(|e| ProxyError::BadRequest(format!("{e:#}")))?;
        manifest.check_for(&self.name, fork).map_err(|e| ProxyError::BadRequest(format!("{e:#}")))?;
        self.replace(Some(parts.join(snapshot::ETCD_DB)), Some(work)).await?;
        tracing::info!(from = %manifest.cluster, taken = %manifest.created, fork, "restored from a snapshot");
        let mut out = summary(&manifest);
        out["seconds"] = started.elapsed().as_secs_f64().into();
        Ok(json(out))
    }

    /// etcd's data replaced (from `db`, or emptied) by the power controller.
    async fn replace(&self, db: Option<PathBuf>, work: Option<tempfile::TempDir>) -> Result<(), ProxyError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Restore { db, work, reply }).await?;
        answer.await.map_err(|_| stopping())?.map_err(|e| ProxyError::Failed(format!("{e:#}")))
    }

    async fn send(&self, op: Op) -> Result<(), ProxyError> {
        self.ops.send(op).await.map_err(|_| stopping())
    }
}

/// Which of `cluster`'s snapshots taken on request (`kept`, newest first) go: beyond the newest
/// few of each label (the upgrade's: beyond its newest), then beyond the newest in all (the
/// upgrade's not counted).
fn rotated(kept: Vec<Kept>, cluster: &str) -> Vec<Kept> {
    let mut per_label = std::collections::HashMap::new();
    let mut in_all = 0;
    kept.into_iter()
        .filter(|k| {
            let label = label_of(&k.name, cluster).map(str::to_string);
            let pinned = label.as_deref() == Some(UPGRADE_LABEL);
            let seen = per_label.entry(label).or_insert(0);
            *seen += 1;
            if pinned {
                return *seen > 1;
            }
            in_all += 1;
            *seen > TAKEN_KEEP_PER_LABEL || in_all > TAKEN_KEEP
        })
        .collect()
}

/// The label in a kept snapshot's name, `CLUSTER-LABEL-YYYYMMDDTHHMMSSZ[-N].snapshot`.
fn label_of<'a>(name: &'a str, cluster: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(cluster)?.strip_prefix('-')?.strip_suffix(".snapshot")?;
    let rest = match rest.rsplit_once('-') {
        Some((head, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => rest,
    };
    let (label, stamp) = rest.rsplit_once('-')?;
    (stamp.len() == 16 && stamp.ends_with('Z') && stamp.as_bytes()[8] == b'T').then_some(label)
}

/// Refuses when the snapshots' volume is fuller than `max_full_percent`: kept snapshots share it
/// with etcd's data (the chart's volume) or the host's disk.
fn check_space(dir: &Path, max_full_percent: u64) -> Result<(), ProxyError> {
    let fs = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| ProxyError::Failed(format!("reading the free space of {}: {e}", dir.display())))?;
    let block = fs.fragment_size();
    let (used, free) = ((fs.blocks() - fs.blocks_free().min(fs.blocks())) * block, fs.blocks_available() * block);
    // As `df` counts: of what this process could use (used + available to it), not of blocks
    // reserved for others (root's reserve, a quota) that it never could.
    let total = used + free;
    if total > 0 && used * 100 > total * max_full_percent {
        return Err(ProxyError::Unavailable(format!(
            "the control plane's volume would be more than {max_full_percent}% full with this snapshot kept ({} MiB free of {} MiB); snapshots of a label beyond its newest {TAKEN_KEEP_PER_LABEL} are removed: keep under a label used before, or ask the platform admin for space",
            free >> 20,
            total >> 20
        )));
    }
    Ok(())
}

/// Restores a new cluster's etcd data from a snapshot file before etcd first starts (a fork made
/// at creation: the components start once, with the snapshot's state).
pub async fn initial_state(
    etcd: &super::etcd::EtcdData,
    file: &Path,
    cluster: &str,
    state_dir: &Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(state_dir)?;
    let work = tempfile::tempdir_in(state_dir)?;
    let manifest = tokio::task::spawn_blocking({
        let (file, dir) = (file.to_path_buf(), work.path().to_path_buf());
        move || {
            let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            snapshot::read(std::io::BufReader::new(f), &dir)
        }
    })
    .await??;
    manifest.check_for(cluster, true)?;
    etcd.restore(&work.path().join(snapshot::ETCD_DB)).await?;
    tracing::info!(from = %manifest.cluster, taken = %manifest.created, "a new cluster starts from a snapshot");
    Ok(())
}

/// A file as the response body, streamed (with what it is, for a new snapshot).
/// `permit` is held until the body has been read (or dropped).
async fn stream_file(
    path: &Path,
    manifest: Option<&Manifest>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Response<ProxyBody>, ProxyError> {
    let file = tokio::fs::File::open(path).await.map_err(failed("opening the snapshot"))?;
    let len = file.metadata().await.map_err(failed("opening the snapshot"))?.len();
    let frames = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data).map_err(BoxError::from).map(move |f| {
        let _held = &permit;
        f
    });
    let mut resp = Response::builder()
        .header(http::header::CONTENT_TYPE, "application/gzip")
        .header(http::header::CONTENT_LENGTH, len);
    if let Some(m) = manifest {
        resp = resp.header("x-vkube-snapshot", serde_json::to_string(&summary(m)).unwrap_or_default());
    }
    resp.body(StreamBody::new(frames).boxed_unsync()).map_err(|e| ProxyError::Failed(e.to_string()))
}

/// What a snapshot is, for the CLI: the manifest without its checksums.
fn summary(m: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "cluster": m.cluster,
        "created": m.created,
        "kubernetesVersion": m.kubernetes_version,
        "etcdBytes": m.parts.iter().find(|p| p.name == snapshot::ETCD_DB).map(|p| p.size),
        "pki": m.has_pki(),
    })
}

fn json(v: serde_json::Value) -> Response<ProxyBody> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(vkube_apiproxy::full(Bytes::from(v.to_string())))
        .expect("static response")
}

fn stopping() -> ProxyError {
    ProxyError::Unavailable("the control plane is stopping; try again once it runs".into())
}

fn failed(what: &'static str) -> impl Fn(std::io::Error) -> ProxyError {
    move |e| ProxyError::Failed(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(label: &str, second: u32) -> Kept {
        let name = format!("c-{label}-20261204T1000{second:02}Z.snapshot");
        Kept { name, bytes: 1, created: format!("2026-12-04T10:00:{second:02}Z"), scheduled: false }
    }

    fn names(v: Vec<Kept>) -> Vec<String> {
        v.into_iter().map(|k| k.name).collect()
    }

    #[test]
    fn labels_are_plain_and_short() {
        for ok in ["manual", "before-upgrade", "a", "x1-2"] {
            assert_eq!(check_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-x", "A", "a/b", "../x", "a.b", "a b", &"x".repeat(21)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels_are_read_back_from_names() {
        assert_eq!(label_of("c-up-20261204T100000Z.snapshot", "c"), Some("up"));
        assert_eq!(label_of("c-before-upgrade-20261204T100000Z-3.snapshot", "c"), Some("before-upgrade"));
        assert_eq!(label_of("c-20261204T100000Z.snapshot", "c"), None, "a scheduled one has no label");
        assert_eq!(label_of("other-up-20261204T100000Z.snapshot", "c"), None);
    }

    #[test]
    fn rotation_keeps_the_newest_of_a_label_and_a_bound_in_all() {
        // Seven of label "up", newest first, and "up-x" beside: the two oldest "up" go, only them.
        let mut all: Vec<Kept> = (0..7).rev().map(|i| kept("up", i)).collect();
        all.push(kept("up-x", 0));
        assert_eq!(names(rotated(all, "c")), [kept("up", 1).name, kept("up", 0).name]);
        // Across labels, no more than TAKEN_KEEP in all: the oldest go first.
        let all: Vec<Kept> = (0..25).rev().map(|i| kept(&format!("l{i}"), i)).collect();
        assert_eq!(names(rotated(all, "c")), names((0..5).rev().map(|i| kept(&format!("l{i}"), i)).collect()));
        // The upgrade's: only its newest stays, and it does not count in all.
        let mut all: Vec<Kept> = vec![kept(UPGRADE_LABEL, 59), kept(UPGRADE_LABEL, 58)];
        all.extend((0..20).rev().map(|i| kept(&format!("l{i}"), i)));
        assert_eq!(names(rotated(all, "c")), [kept(UPGRADE_LABEL, 58).name]);
    }
}
