//! The virtual cluster's certificates: what they are (pure) and where they live (a host Secret,
//! so a restarted control plane, wherever it runs, reuses them).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use vkube_pki::{Bundle, BundleSpec, Changes, LeafSpec, Validity};

use crate::names;

/// Users the control plane's certificates name.
pub const ADMIN_USER: &str = "vkube-admin";
pub const CONTROLPLANE_USER: &str = "vkube:controlplane";
pub const FRONT_PROXY_USER: &str = "front-proxy-client";
pub use vkube_apiproxy::kubelet::{CA as KUBELET_CA, CLIENT_USER as KUBELET_CLIENT_USER};

/// The certificates a virtual cluster needs. `service_ip` is the ClusterIP of the host Service
/// in front of the proxy, which in-cluster clients use as `kubernetes.default`.
pub fn spec(name: &str, namespace: &str, service_ip: Option<IpAddr>) -> BundleSpec {
    let svc = names::service(name);
    let mut dns: Vec<String> = vkube_pki::api_server_names();
    dns.extend([
        svc.clone(),
        format!("{svc}.{namespace}"),
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
    ]);
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    ips.extend(service_ip);
    BundleSpec {
        cas: vec![
            ("ca".into(), format!("vkube-{name}-ca")),
            ("front-proxy-ca".into(), format!("vkube-{name}-front-proxy-ca")),
            // The virtual nodes' kubelet and the API server's client of it: a CA of their own,
            // which the controller manager never signs with (the tenant's CSRs get `ca`).
            (KUBELET_CA.into(), format!("vkube-{name}-{KUBELET_CA}")),
        ],
        leaves: vec![
            LeafSpec::server("apiserver", "ca", &dns, &ips),
            LeafSpec::client("admin", "ca", ADMIN_USER, Some("system:masters")),
            LeafSpec::client("controlplane", "ca", CONTROLPLANE_USER, Some("system:masters")),
            LeafSpec::client("controller-manager", "ca", "system:kube-controller-manager", None),
            LeafSpec::client("scheduler", "ca", "system:kube-scheduler", None),
            LeafSpec::client(FRONT_PROXY_USER, "front-proxy-ca", FRONT_PROXY_USER, None),
            LeafSpec::client("kubelet-client", KUBELET_CA, KUBELET_CLIENT_USER, None),
        ],
        key_pairs: vec!["sa".into()],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiStoreError {
    #[error("reading or writing Secret {namespace}/{name} on the host: {source}")]
    Kube { namespace: String, name: String, source: kube::Error },
    #[error(transparent)]
    Pki(#[from] vkube_pki::Error),
    #[error("Secret {namespace}/{name} changed concurrently too often; try again")]
    Contended { namespace: String, name: String },
}

/// The bundle as its host Secret holds it (None: the cluster has no certificates yet).
pub async fn load(host: &kube::Client, namespace: &str, cluster: &str) -> Result<Option<Bundle>, PkiStoreError> {
    let name = names::pki_secret(cluster);
    let api: Api<Secret> = Api::namespaced(host.clone(), namespace);
    let secret = api.get_opt(&name).await.map_err(|source| PkiStoreError::Kube {
        namespace: namespace.into(),
        name: name.clone(),
        source,
    })?;
    Ok(secret.as_ref().map(bundle_of))
}

/// Loads the bundle from its host Secret, creates or renews what `spec` needs, and saves it back
/// (optimistically: a concurrent writer makes us reload and retry, so two starters agree).
pub async fn ensure(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    spec: &BundleSpec,
) -> Result<(Bundle, Changes), PkiStoreError> {
    update(host, namespace, cluster, spec, |_| ()).await
}

/// What `vkube certs rotate` replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// Every leaf, issued again by the same CAs: every client keeps working.
    Leaves,
    /// The CAs and every leaf (the service-account key stays, so tokens stay valid).
    CertificateAuthorities,
}

/// Issues again what `rotation` names and saves it; a running control plane applies it at once.
pub async fn rotate(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    spec: &BundleSpec,
    rotation: Rotation,
) -> Result<(Bundle, Changes), PkiStoreError> {
    let mut names: Vec<&str> = spec.leaves.iter().map(|l| l.name.as_str()).collect();
    if rotation == Rotation::CertificateAuthorities {
        names.extend(spec.cas.iter().map(|(n, _)| n.as_str()));
    }
    update(host, namespace, cluster, spec, |bundle| {
        for n in &names {
            bundle.files.remove(&format!("{n}.crt"));
            bundle.files.remove(&format!("{n}.key"));
        }
    })
    .await
}

/// Puts back the files a snapshot kept (`vkube restore --include-pki`): the same CAs, keys and
/// certificates as then; what the spec needs and they lack, or what has expired since, is issued
/// from those CAs.
pub async fn replace(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    spec: &BundleSpec,
    files: std::collections::BTreeMap<String, String>,
) -> Result<(Bundle, Changes), PkiStoreError> {
    update(host, namespace, cluster, spec, |bundle| bundle.files = files.clone()).await
}

async fn update(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    spec: &BundleSpec,
    edit: impl Fn(&mut Bundle),
) -> Result<(Bundle, Changes), PkiStoreError> {
    let name = names::pki_secret(cluster);
    let api: Api<Secret> = Api::namespaced(host.clone(), namespace);
    let kube_err = |source| PkiStoreError::Kube { namespace: namespace.into(), name: name.clone(), source };
    for _ in 0..5 {
        let existing = api.get_opt(&name).await.map_err(kube_err)?;
        let mut bundle = existing.as_ref().map(bundle_of).unwrap_or_default();
        let before = bundle.files.clone();
        edit(&mut bundle);
        let changes = bundle.ensure(spec, Validity::default(), time::OffsetDateTime::now_utc())?;
        if changes.is_empty() && bundle.files == before {
            return Ok((bundle, changes));
        }
        let mut secret = existing.clone().unwrap_or_else(|| Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(names::labels(cluster)),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            ..Default::default()
        });
        secret.data = Some(bundle.files.iter().map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec()))).collect());
        let written = match existing {
            Some(_) => api.replace(&name, &PostParams::default(), &secret).await,
            None => api.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => return Ok((bundle, changes)),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(kube_err(e)),
        }
    }
    Err(PkiStoreError::Contended { namespace: namespace.into(), name })
}

fn bundle_of(secret: &Secret) -> Bundle {
    let files: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|v| (k.clone(), v)))
        .collect();
    Bundle { files }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_certificate_names_every_way_in() {
        let s = spec("team-a", "vkube-team-a", Some("10.96.0.7".parse().unwrap()));
        let serving = s.leaves.iter().find(|l| l.name == "apiserver").unwrap();
        for dns in
            ["localhost", "kubernetes.default.svc", "team-a.vkube-team-a.svc", "team-a.vkube-team-a.svc.cluster.local"]
        {
            assert!(serving.dns_names.iter().any(|d| d == dns), "{dns}");
        }
        assert!(serving.ips.contains(&"10.96.0.7".parse().unwrap()));
        assert!(serving.ips.contains(&"127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn only_admin_identities_are_masters() {
        let s = spec("a", "ns", None);
        for leaf in &s.leaves {
            let master = leaf.organizations.iter().any(|o| o == "system:masters");
            assert_eq!(master, leaf.name == "admin" || leaf.name == "controlplane", "{}", leaf.name);
        }
    }
}
