//! vkube's own operations behind the API proxy (`vkube_apiproxy::route::Operation`), served once
//! the proxy has authorized them: a snapshot file streamed out, a snapshot file taken in and
//! restored (or forked), a reset. Files are spooled in the state directory, never held in memory;
//! the power controller does what needs the components stopped (`power::Op`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
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

pub struct Operations {
    pub ops: mpsc::Sender<Op>,
    /// Where files are spooled (`STATE_DIR/snapshots`).
    pub dir: PathBuf,
    pub name: String,
    pub namespace: String,
    pub host: kube::Client,
}

impl Operations {
    pub fn handler(self) -> vkube_apiproxy::Operations {
        let this = Arc::new(self);
        Arc::new(move |op, req| {
            let this = this.clone();
            Box::pin(async move { this.serve(op, req).await })
        })
    }

    async fn serve(&self, op: Operation, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let flag = |name: &str| {
            form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
                .any(|(k, v)| k == name && (v.is_empty() || v == "true"))
        };
        std::fs::create_dir_all(&self.dir).map_err(failed("creating the snapshot directory"))?;
        match op {
            Operation::Snapshot => self.snapshot(flag("pki")).await,
            Operation::Restore => {
                let fork = flag("fork");
                self.restore(req.into_body(), fork).await
            }
            Operation::Reset => {
                let started = Instant::now();
                self.replace(None).await?;
                tracing::info!("the virtual cluster was reset");
                Ok(json(serde_json::json!({"cluster": self.name, "seconds": started.elapsed().as_secs_f64()})))
            }
        }
    }

    async fn snapshot(&self, pki: bool) -> Result<Response<ProxyBody>, ProxyError> {
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
        let file = tokio::fs::File::open(&archive).await.map_err(failed("opening the snapshot"))?;
        let len = file.metadata().await.map_err(failed("opening the snapshot"))?.len();
        // The open file stays readable once its directory is gone.
        drop(work);
        tracing::info!(etcd_bytes = saved.bytes, file_bytes = len, pki, "snapshot taken");
        let frames = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data).map_err(BoxError::from);
        Response::builder()
            .header(http::header::CONTENT_TYPE, "application/gzip")
            .header(http::header::CONTENT_LENGTH, len)
            .header("x-vkube-snapshot", serde_json::to_string(&summary(&written)).unwrap_or_default())
            .body(StreamBody::new(frames).boxed_unsync())
            .map_err(|e| ProxyError::Failed(e.to_string()))
    }

    async fn restore(&self, mut body: Incoming, fork: bool) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        let work = tempfile::tempdir_in(&self.dir).map_err(failed("creating a work directory"))?;
        let upload = work.path().join("upload.tar.gz");
        let mut file = tokio::fs::File::create(&upload).await.map_err(failed("spooling the snapshot"))?;
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ProxyError::BadRequest(format!("reading the snapshot sent: {e}")))?;
            if let Ok(data) = frame.into_data() {
                size += data.len() as u64;
                if size > MAX_UPLOAD {
                    return Err(ProxyError::TooLarge(format!("a snapshot file may be at most {MAX_UPLOAD} bytes")));
                }
                file.write_all(&data).await.map_err(failed("spooling the snapshot"))?;
            }
        }
        file.flush().await.map_err(failed("spooling the snapshot"))?;
        let parts = work.path().join("parts");
        let manifest = tokio::task::spawn_blocking({
            let parts = parts.clone();
            move || snapshot::read(std::io::BufReader::new(std::fs::File::open(&upload)?), &parts)
        })
        .await
        .map_err(|e| ProxyError::Failed(format!("reading the snapshot: {e}")))?
        .map_err(|e| ProxyError::BadRequest(format!("{e:#}")))?;
        manifest.check_for(&self.name, fork).map_err(|e| ProxyError::BadRequest(format!("{e:#}")))?;
        self.replace(Some(parts.join(snapshot::ETCD_DB))).await?;
        tracing::info!(from = %manifest.cluster, taken = %manifest.created, fork, "restored from a snapshot");
        let mut out = summary(&manifest);
        out["seconds"] = started.elapsed().as_secs_f64().into();
        Ok(json(out))
    }

    /// etcd's data replaced (from `db`, or emptied) by the power controller.
    async fn replace(&self, db: Option<PathBuf>) -> Result<(), ProxyError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Restore { db, reply }).await?;
        answer.await.map_err(|_| stopping())?.map_err(|e| ProxyError::Failed(format!("{e:#}")))
    }

    async fn send(&self, op: Op) -> Result<(), ProxyError> {
        self.ops.send(op).await.map_err(|_| stopping())
    }
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
