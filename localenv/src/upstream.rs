//! Where the pinned upstream binaries live: `$VKUBE_CACHE/upstream/<component>-<version>/`, as
//! laid out by `hack/build-upstream.sh`. The versions are `vkube_core::versions`, read from
//! `hack/versions.env`, the one place they are set.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use vkube_core::versions::{Versions, versions};

/// The cache root: `$VKUBE_CACHE`, else `~/.cache/vkube`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("VKUBE_CACHE") {
        return PathBuf::from(dir);
    }
    home().join(".cache/vkube")
}

/// Where state of long-lived local environments goes: `$VKUBE_STATE`, else `~/.local/state/vkube`.
pub fn state_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("VKUBE_STATE") {
        return PathBuf::from(dir);
    }
    home().join(".local/state/vkube")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// The located upstream binaries.
#[derive(Clone, Debug)]
pub struct Upstream {
    kubernetes: PathBuf,
    etcd: PathBuf,
    kwok: PathBuf,
    helm: PathBuf,
    node: PathBuf,
    containerd: PathBuf,
    coredns: PathBuf,
    traefik: PathBuf,
    metrics_server: PathBuf,
}

impl Upstream {
    /// Finds the binaries in the cache, or says how to build them.
    pub fn locate() -> Result<Self> {
        let v = versions();
        let root = cache_root().join("upstream");
        let up = Upstream {
            kubernetes: root.join(format!("kubernetes-{}", v.kubernetes)),
            etcd: root.join(format!("etcd-{}", v.etcd)),
            kwok: root.join(format!("kwok-{}", v.kwok)),
            helm: root.join(format!("helm-{}", v.helm)),
            node: root.join(format!("node-{}", v.kubernetes)),
            containerd: root.join(format!("containerd-{}", v.containerd)),
            coredns: root.join(format!("coredns-{}", v.coredns)),
            traefik: root.join(format!("traefik-{}", v.traefik)),
            metrics_server: root.join(format!("metrics-server-{}", v.metrics_server)),
        };
        for bin in [
            up.kube_apiserver(),
            up.kube_controller_manager(),
            up.kube_control_plane(),
            up.kube_scheduler(),
            up.kubectl(),
            up.etcd(),
            up.etcdutl(),
            up.kwok(),
            up.helm(),
        ] {
            if !bin.is_file() {
                return Err(Error::MissingBinary(bin));
            }
        }
        Ok(up)
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.kubernetes.join("kube-apiserver")
    }
    pub fn kube_controller_manager(&self) -> PathBuf {
        self.kubernetes.join("kube-controller-manager")
    }
    /// A virtual cluster's kube-apiserver and kube-controller-manager in one process
    /// (hack/kube-control-plane).
    pub fn kube_control_plane(&self) -> PathBuf {
        self.kubernetes.join("kube-control-plane")
    }
    pub fn kube_scheduler(&self) -> PathBuf {
        self.kubernetes.join("kube-scheduler")
    }
    pub fn kubectl(&self) -> PathBuf {
        self.kubernetes.join("kubectl")
    }
    pub fn etcd(&self) -> PathBuf {
        self.etcd.join("etcd")
    }
    pub fn etcdutl(&self) -> PathBuf {
        self.etcd.join("etcdutl")
    }
    pub fn kwok(&self) -> PathBuf {
        self.kwok.join("kwok")
    }
    pub fn helm(&self) -> PathBuf {
        self.helm.join("helm")
    }
    /// Whether the real node's binaries are built (a kwok-only host does not need them).
    pub fn check_node(&self) -> Result<()> {
        let bins = [
            self.kubelet(),
            self.kube_proxy(),
            self.pause(),
            self.containerd(),
            self.ctr(),
            self.coredns(),
            self.traefik(),
            self.metrics_server(),
        ];
        match bins.into_iter().find(|b| !b.is_file()) {
            Some(missing) => Err(Error::MissingBinary(missing)),
            None => Ok(()),
        }
    }
    pub fn kubelet(&self) -> PathBuf {
        self.node.join("kubelet")
    }
    pub fn kube_proxy(&self) -> PathBuf {
        self.node.join("kube-proxy")
    }
    pub fn pause(&self) -> PathBuf {
        self.node.join("pause")
    }
    /// Where containerd and its shim are (containerd finds the shim on PATH).
    pub fn containerd_dir(&self) -> &Path {
        &self.containerd
    }
    pub fn containerd(&self) -> PathBuf {
        self.containerd.join("containerd")
    }
    pub fn ctr(&self) -> PathBuf {
        self.containerd.join("ctr")
    }
    pub fn coredns(&self) -> PathBuf {
        self.coredns.join("coredns")
    }
    /// The real node's ingress controller.
    pub fn traefik(&self) -> PathBuf {
        self.traefik.join("traefik")
    }
    /// The real node's resource metrics (metrics.k8s.io, what `kubectl top` reads).
    pub fn metrics_server(&self) -> PathBuf {
        self.metrics_server.join("metrics-server")
    }
    /// kwok's stage configurations (node and pod lifecycles).
    pub fn kwok_stages(&self) -> PathBuf {
        self.kwok.join("stages")
    }
    /// kwok's debugging CRDs (Logs, Exec, PortForward, Attach and their cluster-wide forms).
    pub fn kwok_crds(&self) -> PathBuf {
        self.kwok.join("crds")
    }
    /// Directories to put first on PATH so `kubectl` and `helm` are the pinned ones.
    pub fn path_dirs(&self) -> Vec<&Path> {
        vec![&self.kubernetes, &self.helm]
    }
}
