//! Pod certificates (`projected.sources[].podCertificate`) from the VIRTUAL cluster, obtained as a
//! kubelet obtains them from its own: once the pod is bound to a node, a fresh key of the
//! projection's type and a PodCertificateRequest in the virtual cluster naming the pod, its
//! service account and its node, which the tenant's signer answers. The key and the issued chain
//! go into one host Secret of the pod's own that the host pod's projected volume reads (the host
//! kubelet retries the mount until the Secret is there). From the chain's `beginRefreshAt` on, a
//! new key and request; the credentials in the Secret stay until the new ones are issued. The
//! host's API server and signers never see a tenant's request.
//!
//! As a kubelet's, the keys of requests not answered yet are held in memory only: after a restart
//! the syncer makes a new request. A request denied or failed is told on the pod and not made
//! again (the pod does not start, as on a kubelet).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestSpec};
use k8s_openapi::api::core::v1::{Pod, PodCertificateProjection, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::ANNOTATION_CERTIFICATES_REFRESH;

use crate::context::Context;
use crate::naming::Translator;
use crate::sync::{self, Result, SyncError};

/// The owner kind our marks give a pod's certificate Secret.
pub const KIND: &str = "PodCertificate";

/// The host Secret holding pod `pod`'s projected certificates.
pub fn secret_name(tr: &Translator, namespace: &str, pod: &str) -> String {
    format!("{}-pcert", tr.host_name(namespace, pod))
}

/// One podCertificate projection of a pod: its volume, its place among the volume's sources.
pub struct Projection<'a> {
    pub volume: &'a str,
    pub index: usize,
    pub source: &'a PodCertificateProjection,
}

impl Projection<'_> {
    /// The prefix of this projection's keys in the Secret (a kubelet, too, keys its credentials
    /// by volume and source index).
    pub fn key(&self) -> String {
        key(self.volume, self.index)
    }
}

pub fn key(volume: &str, index: usize) -> String {
    format!("pcert-{}", vkube_core::naming::short_hash(&format!("{volume}/{index}")))
}

/// The Secret's keys for one projection: the private key, the chain, and both in one file (the
/// credential bundle), as a kubelet writes them.
pub fn private_key_key(key: &str) -> String {
    format!("{key}.key")
}
pub fn chain_key(key: &str) -> String {
    format!("{key}.chain")
}
pub fn bundle_key(key: &str) -> String {
    format!("{key}.bundle")
}

/// The pod's podCertificate projections.
pub fn projections(v: &Pod) -> Vec<Projection<'_>> {
    let volumes = v.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    volumes
        .flat_map(|vol| {
            let sources = vol.projected.iter().flat_map(|p| p.sources.iter().flatten()).enumerate();
            sources.filter_map(|(index, s)| {
                Some(Projection { volume: vol.name.as_str(), index, source: s.pod_certificate.as_ref()? })
            })
        })
        .collect()
}

/// What the syncer remembers of pods' certificates between reconciles, by pod UID.
#[derive(Default)]
pub struct Requests(Mutex<HashMap<String, PodState>>);

#[derive(Default)]
struct PodState {
    /// Until when the Secret's credentials need nothing (its first `beginRefreshAt`).
    fresh_until: Option<Timestamp>,
    /// Requests made and not answered yet, by projection key.
    waiting: HashMap<String, Waiting>,
}

#[derive(Clone)]
struct Waiting {
    /// The PodCertificateRequest's name, and the private key it is for (PEM), or None once it
    /// was denied or failed (not asked again).
    request: Option<(String, String)>,
    since: Instant,
}

impl Requests {
    fn with<T>(&self, uid: &str, f: impl FnOnce(&mut PodState) -> T) -> T {
        f(self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(uid.to_string()).or_default())
    }

    /// Forgets a pod that is gone.
    pub fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

/// What became of one projection this round.
enum Step {
    /// Asked, not answered yet.
    Waiting(Duration),
    Issued {
        private_key: String,
        chain: String,
        refresh_at: Timestamp,
    },
    /// Denied or failed (told on the pod): nothing more to do.
    Refused,
}

/// Makes sure the pod's certificate Secret holds credentials for each of its podCertificate
/// projections once it is bound to a node. Returns when to look again (a request waits for its
/// signer, or a refresh is due before the next resync).
pub async fn ensure(ctx: &Context, v: &Pod) -> Result<Option<Duration>> {
    let projections = projections(v);
    let Some(node) = v.spec.as_ref().and_then(|s| s.node_name.clone()) else { return Ok(None) };
    if projections.is_empty() {
        return Ok(None);
    }
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let now = Timestamp::now();
    if let Some(until) = ctx.pod_certificates.with(&uid, |s| s.fresh_until).filter(|t| *t > now) {
        return Ok(Some(until.duration_since(now).unsigned_abs()).filter(|d| *d < crate::RESYNC));
    }
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let name = v.metadata.name.as_deref().unwrap_or_default();
    let secret_name = secret_name(&ctx.tr, ns, name);
    let api: Api<Secret> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    let existing = api.get_opt(&secret_name).await?;
    // One left by an earlier pod of the same name holds nothing of this one's.
    let ours = match existing.as_ref().map(|s| ctx.tr.owner(&s.metadata)) {
        None => None,
        Some(Some(o)) if o.is(KIND, ns, name) => existing.as_ref().filter(|_| o.uid == uid),
        Some(_) => return Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns()))),
    };
    let mut data = ours.and_then(|s| s.data.clone()).unwrap_or_default();
    let mut refresh = ours.map(refresh_times).unwrap_or_default();
    let mut changed = false;
    let mut look_again: Option<Duration> = None;
    for p in &projections {
        let key = p.key();
        let due = refresh.get(&key).is_none_or(|at| *at <= now) || !data.contains_key(&private_key_key(&key));
        if !due {
            continue;
        }
        match step(ctx, v, &node, p).await? {
            Step::Waiting(after) => look_again = Some(look_again.map_or(after, |d| d.min(after))),
            Step::Issued { private_key, chain, refresh_at } => {
                let bundle = format!("{private_key}{chain}");
                for (k, value) in
                    [(private_key_key(&key), private_key), (chain_key(&key), chain), (bundle_key(&key), bundle)]
                {
                    data.insert(k, ByteString(value.into_bytes()));
                }
                refresh.insert(key, refresh_at);
                changed = true;
            }
            Step::Refused => {}
        }
    }
    if changed {
        let mut meta = crate::tokens::pods_secret_meta(ctx, KIND, v, &secret_name);
        let times: BTreeMap<&String, String> = refresh.iter().map(|(k, t)| (k, t.to_string())).collect();
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_CERTIFICATES_REFRESH.into(), serde_json::to_string(&times).unwrap_or_default());
        let desired = Secret { metadata: meta, data: Some(data), type_: Some("Opaque".into()), ..Default::default() };
        match existing {
            None => match api.create(&sync::post_params(), &desired).await {
                Ok(_) => ctx.metrics.wrote(KIND, "create"),
                // Written meanwhile: this round's credentials are asked for again.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Err(SyncError::Raced(format!("certificates {secret_name}")));
                }
                Err(e) => return Err(e.into()),
            },
            Some(current) => sync::replace_host(ctx, KIND, &current, desired).await?,
        }
    }
    // Fresh until the first refresh, once nothing is waiting (a refused projection has none).
    let first = refresh.values().min().copied();
    if look_again.is_none() && projections.iter().all(|p| refresh.contains_key(&p.key())) {
        ctx.pod_certificates.with(&uid, |s| s.fresh_until = first);
        if let Some(at) = first {
            let left = at.duration_since(Timestamp::now()).unsigned_abs();
            return Ok(Some(left.max(Duration::from_secs(1))).filter(|d| *d < crate::RESYNC));
        }
    }
    Ok(look_again)
}

/// Whether the pod's certificate Secret may be written: absent, or ours (a host object of another
/// would be what the pod mounts). Looked up only for pods with podCertificate projections.
pub async fn name_free(ctx: &Context, v: &Pod) -> Result<()> {
    if projections(v).is_empty() {
        return Ok(());
    }
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let name = v.metadata.name.as_deref().unwrap_or_default();
    let secret_name = secret_name(&ctx.tr, ns, name);
    let api: Api<Secret> = Api::namespaced(ctx.host.clone(), ctx.host_ns());
    match api.get_metadata_opt(&secret_name).await? {
        Some(s) if !ctx.tr.owner(&s.metadata).is_some_and(|o| o.is(KIND, ns, name)) => {
            Err(SyncError::Collision(format!("{}/{secret_name}", ctx.host_ns())))
        }
        _ => Ok(()),
    }
}

/// The refresh times the Secret records, by projection key.
fn refresh_times(s: &Secret) -> BTreeMap<String, Timestamp> {
    let recorded = s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CERTIFICATES_REFRESH));
    let times: BTreeMap<String, String> = recorded.and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    times.into_iter().filter_map(|(k, t)| Some((k, t.parse().ok()?))).collect()
}

/// One projection's request: made if there is none, else looked at.
async fn step(ctx: &Context, v: &Pod, node: &str, p: &Projection<'_>) -> Result<Step> {
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let key = p.key();
    let waiting = ctx.pod_certificates.with(&uid, |s| s.waiting.get(&key).cloned());
    let requests: Api<PodCertificateRequest> = Api::namespaced(ctx.virt.clone(), ns);
    let Some(Waiting { request, since }) = waiting else {
        let request = match request(ctx, v, node, p).await? {
            Ok(made) => Some(made),
            Err(why) => {
                sync::warn(ctx, v, "PodCertificateNotRequested", &why).await;
                None
            }
        };
        let refused = request.is_none();
        ctx.pod_certificates.with(&uid, |s| s.waiting.insert(key, Waiting { request, since: Instant::now() }));
        return Ok(if refused { Step::Refused } else { Step::Waiting(Duration::from_millis(500)) });
    };
    let Some((pcr_name, private_key)) = request else { return Ok(Step::Refused) };
    let Some(pcr) = requests.get_opt(&pcr_name).await? else {
        // Deleted by someone: asked again.
        ctx.pod_certificates.with(&uid, |s| s.waiting.remove(&key));
        return Ok(Step::Waiting(Duration::from_millis(500)));
    };
    let status = pcr.status.unwrap_or_default();
    for c in status.conditions.iter().flatten().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Issued" => {
                let (Some(chain), Some(refresh_at)) =
                    (status.certificate_chain.as_deref(), status.begin_refresh_at.as_ref())
                else {
                    continue;
                };
                ctx.pod_certificates.with(&uid, |s| s.waiting.remove(&key));
                return Ok(Step::Issued { private_key, chain: clean_chain(chain), refresh_at: refresh_at.0 });
            }
            "Denied" | "Failed" => {
                let why = format!(
                    "PodCertificateRequest {ns}/{pcr_name} was {}: reason={:?}, message={:?}",
                    c.type_.to_lowercase(),
                    c.reason,
                    c.message
                );
                sync::warn(ctx, v, &c.type_, &why).await;
                ctx.pod_certificates.with(&uid, |s| s.waiting.insert(key, Waiting { request: None, since }));
                return Ok(Step::Refused);
            }
            _ => {}
        }
    }
    // Signers answer in moments or not for a while: looked at less often as the wait goes on.
    let waited = since.elapsed();
    let after = if waited < Duration::from_secs(5) {
        Duration::from_millis(500)
    } else if waited < Duration::from_secs(60) {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(15)
    };
    Ok(Step::Waiting(after))
}

/// Makes a PodCertificateRequest for one projection: (its name, the private key, PEM). The inner
/// error is what to tell the tenant (a request the virtual API server refuses, a key type not
/// made here).
async fn request(
    ctx: &Context,
    v: &Pod,
    node: &str,
    p: &Projection<'_>,
) -> Result<std::result::Result<(String, String), String>> {
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let pod = v.metadata.name.clone().unwrap_or_default();
    let pod_uid = v.metadata.uid.clone().unwrap_or_default();
    let sa = v.spec.as_ref().map(crate::refs::service_account).unwrap_or_else(|| "default".into());
    let sa_uid = Api::<ServiceAccount>::namespaced(ctx.virt.clone(), ns).get(&sa).await?.metadata.uid;
    let node_uid = ctx.stores.vnodes.get(&ObjectRef::new(node)).and_then(|n| n.metadata.uid.clone());
    let (private_key, stub) = match vkube_pki::pod_key(&p.source.key_type) {
        Ok(made) => made,
        Err(e) => return Ok(Err(format!("no key for the podCertificate projection of volume {:?}: {e}", p.volume))),
    };
    let pcr = PodCertificateRequest {
        metadata: ObjectMeta {
            generate_name: Some("req-".into()),
            namespace: Some(ns.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.clone(),
                uid: pod_uid.clone(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: p.source.signer_name.clone(),
            pod_name: pod,
            pod_uid,
            service_account_name: sa,
            service_account_uid: sa_uid.unwrap_or_default(),
            node_name: node.into(),
            node_uid: node_uid.unwrap_or_default(),
            max_expiration_seconds: p.source.max_expiration_seconds,
            stub_pkc_s10_request: ByteString(stub),
            unverified_user_annotations: p.source.user_annotations.clone(),
        },
        status: None,
    };
    let api: Api<PodCertificateRequest> = Api::namespaced(ctx.virt.clone(), ns);
    match api.create(&sync::post_params(), &pcr).await {
        Ok(made) => Ok(Ok((made.metadata.name.unwrap_or_default(), private_key))),
        Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
            Ok(Err(format!("the PodCertificateRequest for volume {:?} was refused: {}", p.volume, e.message)))
        }
        Err(e) => Err(e.into()),
    }
}

/// The chain as a kubelet writes it: its certificates only, each a plain PEM block.
fn clean_chain(chain: &str) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::parse_many(chain)
        .unwrap_or_default()
        .into_iter()
        .map(|p| pem::encode_config(&pem::Pem::new("CERTIFICATE", p.into_contents()), config))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_keyed_by_volume_and_place() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [], "volumes": [
                {"name": "a", "projected": {"sources": [
                    {"clusterTrustBundle": {"path": "t", "name": "x"}},
                    {"podCertificate": {"signerName": "example.com/s", "keyType": "ECDSAP256", "credentialBundlePath": "c"}},
                ]}},
                {"name": "b", "projected": {"sources": [
                    {"podCertificate": {"signerName": "example.com/s", "keyType": "ED25519", "keyPath": "k", "certificateChainPath": "c"}},
                ]}},
            ]},
        }))
        .unwrap();
        let found: Vec<(&str, usize)> = projections(&pod).iter().map(|p| (p.volume, p.index)).collect();
        assert_eq!(found, [("a", 1), ("b", 0)]);
        assert_ne!(key("a", 1), key("b", 0));
        assert_eq!(key("a", 1), projections(&pod)[0].key());
    }

    #[test]
    fn the_chain_keeps_its_certificates_only() {
        let cert = |cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(vec![cn.into()]).unwrap().self_signed(&key).unwrap().pem()
        };
        let (a, b) = (cert("a"), cert("b"));
        let messy = format!("leaf:\n{a}\r\nintermediate\n{}", b.replace('\n', "\r\n"));
        assert_eq!(clean_chain(&messy), format!("{a}{b}"));
    }

    #[test]
    fn every_key_type_the_policy_allows_is_made_here() {
        for key_type in vkube_core::policy::volumes::POD_CERTIFICATE_KEY_TYPES {
            assert!(vkube_pki::pod_key(key_type).is_ok(), "{key_type}");
        }
    }
}
