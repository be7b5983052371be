//! The virtual cluster's etcd data: a snapshot taken while etcd runs, and the data directory
//! replaced from a snapshot (restore) or emptied (reset) while it is stopped.
//!
//! The snapshot comes from etcd's maintenance API through etcd's own JSON gateway on its client
//! port (`POST /v3/maintenance/snapshot`): the etcd-client crate would need `protoc` for every
//! build, the image's included, for this one call. The data directory is replaced as etcd's
//! documentation says, with `etcdutl snapshot restore`, into a staging directory swapped in by
//! renames: a crash at any point leaves the old data or the new, never a mix (`recover`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Revisions a restore jumps ahead, so clients watching from a revision of the old data see a
/// compaction and list again instead of missing changes (etcd's advice for restores).
const BUMP_REVISION: &str = "1000000000";

#[derive(Clone, Debug)]
pub struct EtcdData {
    pub data_dir: PathBuf,
    pub etcdutl: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
}

/// A snapshot written to disk.
#[derive(Debug)]
pub struct Saved {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(serde::Deserialize)]
struct GatewayMessage {
    result: Option<SnapshotChunk>,
    error: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct SnapshotChunk {
    #[serde(default)]
    blob: Option<String>,
}

/// The snapshot bytes one message of the gateway's stream carries (none for a blank line).
fn chunk_of(line: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let msg: GatewayMessage = serde_json::from_slice(line).context("etcd's snapshot stream is unreadable")?;
    if let Some(e) = msg.error {
        bail!("etcd failed the snapshot: {e}");
    }
    let blob = msg.result.and_then(|r| r.blob).unwrap_or_default();
    Ok(Some(base64::engine::general_purpose::STANDARD.decode(blob).context("etcd's snapshot chunk")?))
}

impl EtcdData {
    fn client(
        &self,
    ) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.client_port)
    }

    /// Waits until etcd answers its health check (it was just started).
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = self.client();
        let url = self.url("/health");
        vkube_kubeclient::wait::until(timeout, Duration::from_millis(100), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let req = http::Request::get(url).body(Full::default()).map_err(|e| e.to_string())?;
                match client.request(req).await {
                    Ok(resp) if resp.status().is_success() => Ok(Some(())),
                    Ok(resp) => Err(format!("etcd's /health answered {}", resp.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("etcd did not become healthy within {} s: {e}", timeout.as_secs()))
    }

    /// Streams a consistent snapshot of the running etcd into `to`.
    pub async fn save(&self, to: &Path) -> anyhow::Result<Saved> {
        let req = http::Request::post(self.url("/v3/maintenance/snapshot"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))?;
        let resp = self.client().request(req).await.context("asking etcd for a snapshot")?;
        if !resp.status().is_success() {
            bail!("etcd refused a snapshot: {}", resp.status());
        }
        let mut file = tokio::fs::File::create(to).await.with_context(|| format!("creating {}", to.display()))?;
        let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        // Newline-delimited JSON messages, each with a base64 chunk of the snapshot.
        loop {
            let frame = body.frame().await;
            let ended = frame.is_none();
            if let Some(frame) = frame
                && let Ok(data) = frame.context("reading etcd's snapshot")?.into_data()
            {
                pending.extend_from_slice(&data);
            }
            let mut lines = Vec::new();
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                lines.push(pending.drain(..=end).collect::<Vec<u8>>());
            }
            if ended {
                lines.push(std::mem::take(&mut pending));
            }
            for chunk in lines.iter().filter_map(|l| chunk_of(l).transpose()) {
                let chunk = chunk?;
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            if ended {
                break;
            }
        }
        file.sync_all().await?;
        if bytes == 0 {
            bail!("etcd sent an empty snapshot");
        }
        Ok(Saved { bytes, sha256: hasher.finalize().iter().map(|b| format!("{b:02x}")).collect() })
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{suffix}"));
        self.data_dir.with_file_name(name)
    }

    /// Makes the data directory from `db` (etcd must be stopped). On failure the old data stays.
    pub async fn restore(&self, db: &Path) -> anyhow::Result<()> {
        // Written under another name and renamed once complete: `recover` may promote a staged
        // directory, so a half-written one must never carry that name.
        let (writing, staged) = (self.sibling("restore.tmp"), self.sibling("restore"));
        let _ = std::fs::remove_dir_all(&writing);
        let _ = std::fs::remove_dir_all(&staged);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        // The member's name and peer URL are etcd's own flags' (components::etcd).
        let out = tokio::process::Command::new(&self.etcdutl)
            .arg("snapshot")
            .arg("restore")
            .arg(db)
            .arg(format!("--data-dir={}", writing.display()))
            .args(["--name=vkube", &format!("--initial-cluster=vkube={peer}")])
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .args([&format!("--bump-revision={BUMP_REVISION}"), "--mark-compacted"])
            .output()
            .await
            .with_context(|| format!("running {} (is etcdutl installed?)", self.etcdutl.display()))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&writing);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
            bail!("etcdutl could not restore the snapshot ({}): {last}", out.status);
        }
        std::fs::rename(&writing, &staged).context("staging etcd's new data")?;
        self.swap_in(&staged)
    }

    /// Empties the data directory (etcd must be stopped): it starts as a new cluster's.
    pub fn reset(&self) -> anyhow::Result<()> {
        let staged = self.sibling("restore");
        let _ = std::fs::remove_dir_all(&staged);
        std::fs::create_dir_all(&staged)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o700))?;
        self.swap_in(&staged)
    }

    fn swap_in(&self, staged: &Path) -> anyhow::Result<()> {
        let old = self.sibling("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.data_dir.exists() {
            std::fs::rename(&self.data_dir, &old).context("moving etcd's old data aside")?;
        }
        std::fs::rename(staged, &self.data_dir).context("putting etcd's new data in place")?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Finishes a swap a crash cut short (a staged directory is complete: etcdutl writes under
    /// another name), or removes what a restore cut short left.
    pub fn recover(&self) -> anyhow::Result<()> {
        let (staged, old) = (self.sibling("restore"), self.sibling("old"));
        let _ = std::fs::remove_dir_all(self.sibling("restore.tmp"));
        if !self.data_dir.exists() {
            if staged.exists() {
                tracing::warn!("finishing a restore of etcd's data that a restart cut short");
                std::fs::rename(&staged, &self.data_dir)?;
            } else if old.exists() {
                std::fs::rename(&old, &self.data_dir)?;
            }
        }
        let _ = std::fs::remove_dir_all(&staged);
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(dir: &Path) -> EtcdData {
        EtcdData { data_dir: dir.join("etcd"), etcdutl: "etcdutl".into(), client_port: 0, peer_port: 0 }
    }

    #[test]
    fn a_swap_cut_short_is_finished_or_undone() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(dir.path());
        let mark = |p: &Path, what: &str| {
            std::fs::create_dir_all(p).unwrap();
            std::fs::write(p.join("mark"), what).unwrap();
        };
        let mark_of = || std::fs::read_to_string(d.data_dir.join("mark")).unwrap();
        // Cut after the old data moved aside: the staged data is complete, so it goes in.
        mark(&d.sibling("old"), "old");
        mark(&d.sibling("restore"), "new");
        d.recover().unwrap();
        assert_eq!(mark_of(), "new");
        assert!(!d.sibling("old").exists() && !d.sibling("restore").exists());
        // Cut while etcdutl wrote: the old data stays, the half-written directory goes.
        mark(&d.sibling("restore.tmp"), "half");
        d.recover().unwrap();
        assert_eq!(mark_of(), "new");
        assert!(!d.sibling("restore.tmp").exists());
        // Cut after staging, before the swap began: the old data stays too.
        mark(&d.sibling("restore"), "staged");
        d.recover().unwrap();
        assert_eq!(mark_of(), "new");
        assert!(!d.sibling("restore").exists());
        // A reset: an empty directory in place of the data.
        d.reset().unwrap();
        assert!(d.data_dir.is_dir() && std::fs::read_dir(&d.data_dir).unwrap().next().is_none());
    }
}
