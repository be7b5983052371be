//! What every vkube program needs to reach an API server, production (`vkube run`, the CLI) and
//! development (`vkube-localenv`, the tests) alike: the one client builder (`client`), polling
//! until something is true (`wait`), and credential files written readable only by the owner.

pub mod client;
pub mod delete;
pub mod limit;
pub mod params;
pub mod patch;
pub mod wait;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes a file that holds credentials: mode 0600.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Io { what: format!("writing {}", path.display()), source };
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)
}
