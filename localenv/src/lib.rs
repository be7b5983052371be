//! Real upstream Kubernetes components (built by `hack/build-upstream.sh`) started as local
//! processes: the dev host cluster with kwok-simulated nodes, and the processes of a local
//! virtual control plane. Used by the `vkube` CLI (`vkube dev up`, `vkube create --local`) and by
//! the end-to-end test harness, so both run exactly the same environment.

pub mod conformance;
pub mod host;
pub mod image;
pub mod ingress;
pub mod metrics_server;
pub mod node;
pub mod ports;
pub mod process;
pub mod upstream;

pub use vkube_kubeclient::{client, wait};

pub use host::{HostCluster, HostOptions};
pub use process::{Lifetime, Process, ProcessGroup, ProcessSpec};
pub use upstream::Upstream;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream binary {0} is missing: run `hack/build-upstream.sh` to build the pinned versions into the cache")]
    MissingBinary(PathBuf),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{component} did not become ready within {seconds} s: {detail} (its log: {log})")]
    NotReady { component: String, seconds: u64, detail: String, log: String },
    #[error("{component} exited early with {status}; last lines of its log ({log}):\n{tail}")]
    Exited { component: String, status: String, log: String, tail: String },
    #[error("certificates: {0}")]
    Pki(#[from] vkube_pki::Error),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Client(#[from] vkube_kubeclient::Error),
    #[error("real node: {0}")]
    Node(String),
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Reports the steps of a long operation (the CLI prints them; tests log them).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);
