//! The pinned upstream versions this vkube runs and ships (`hack/versions.env`, the one place they
//! are set): what a snapshot records and checks, what `vkube version` and the chart show, and
//! where the dev environment finds its binaries.

const VERSIONS_ENV: &str = include_str!("../../hack/versions.env");

/// The pinned versions, read from `hack/versions.env` at compile time.
#[derive(Clone, Debug)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    pub kwok: String,
    pub helm: String,
    pub containerd: String,
    pub coredns: String,
    pub traefik: String,
    pub metrics_server: String,
}

pub fn versions() -> Versions {
    let get = |key: &str| {
        VERSIONS_ENV
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("hack/versions.env has no {key}"))
    };
    Versions {
        kubernetes: get("KUBERNETES_VERSION"),
        etcd: get("ETCD_VERSION"),
        kwok: get("KWOK_VERSION"),
        helm: get("HELM_VERSION"),
        containerd: get("CONTAINERD_VERSION"),
        coredns: get("COREDNS_VERSION"),
        traefik: get("TRAEFIK_VERSION"),
        metrics_server: get("METRICS_SERVER_VERSION"),
    }
}
