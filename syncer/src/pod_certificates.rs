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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, PodCertificateProjection, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use vkube_core::contract::ANNOTATION_CERTIFICATES_REFRESH;

use crate::context::{Context, Key};
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
    pub fn key(&self) -> String {
        key(self.volume, self.index)
    }
}

/// The prefix of a projection's keys in the Secret, from its volume and its place among the
/// volume's sources (as a kubelet keys its credentials).
pub fn key(volume: &str, index: usize) -> String {
    format!("pcert-{}", vkube_core::naming::short_hash(&format!("{volume}/{index}")))
}

/// The Secret's key holding a projection's private key (PKCS#8 PEM).
pub fn private_key_key(key: &str) -> String {
    format!("{key}.key")
}

/// The Secret's key holding a projection's certificate chain (PEM, leaf first).
pub fn chain_key(key: &str) -> String {
    format!("{key}.chain")
}

/// The Secret's key holding a projection's credential bundle: the private key, then the chain.
pub fn bundle_key(key: &str) -> String {
    format!("{key}.bundle")
}

/// The pod's podCertificate projections.
pub fn projections(v: &Pod) -> Vec<Projection<'_>> {
    crate::pods::projected_sources(v)
        .filter_map(|(volume, index, s)| Some(Projection { volume, index, source: s.pod_certificate.as_ref()? }))
        .collect()
}

/// What the syncer remembers of pods' certificates between reconciles, by pod UID.
#[derive(Default)]
pub struct Requests(Mutex<HashMap<String, PodState>>);

struct PodState {
    pod: Key,
    /// When each projection the Secret holds is due for refresh; None until the Secret is read.
    held: Option<BTreeMap<String, Timestamp>>,
    /// Requests made and not answered (or refused), by projection key.
    waiting: HashMap<String, Waiting>,
}

#[derive(Clone)]
struct Waiting {
    /// The PodCertificateRequest's name and the private key it is for (PEM); None once it was
    /// denied or failed, or could not be made (not asked again).
    request: Option<(String, String)>,
    since: Instant,
}

impl Requests {
    fn with<T>(&self, uid: &str, pod: &Key, f: impl FnOnce(&mut PodState) -> T) -> T {
        let mut pods = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let state = pods.entry(uid.to_string()).or_insert_with(|| PodState {
            pod: pod.clone(),
            held: None,
            waiting: HashMap::new(),
        });
        f(state)
    }

    /// Forgets a pod that is gone.
    pub fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// After a sweep of the pods' Secrets: forgets the pods that are gone, and what it held of the
    /// Secrets the sweep did not find (deleted on the host: written again). Returns the pods to
    /// look at again.
    pub fn prune(&self, alive: impl Fn(&Key, &str) -> bool, seen: &HashSet<String>) -> Vec<Key> {
        let mut pods = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pods.retain(|uid, s| alive(&s.pod, uid));
        let lost =
            pods.iter_mut().filter(|(uid, s)| !seen.contains(*uid) && s.held.as_ref().is_some_and(|h| !h.is_empty()));
        lost.map(|(_, s)| {
            s.held = None;
            s.pod.clone()
        })
        .collect()
    }
}

/// A projection's credentials, issued.
struct Issued {
    key: String,
    private_key: String,
    chain: String,
    refresh_at: Timestamp,
}

/// What became of one projection this round.
enum Step {
    /// Asked, not answered yet: look again after this long.
    Waiting(Duration),
    Issued(Issued),
    /// Denied, failed or not askable (told on the pod): nothing more to do.
    Refused,
}

/// Makes sure the pod's certificate Secret holds credentials for each of its podCertificate
/// projections once it is bound to a node. Returns when to look again (a request waits for its
/// signer, or a refresh is due before the next resync). The host Secret is read once per pod
/// (then what it holds is remembered) and written when credentials were issued.
pub async fn ensure(ctx: &Context, v: &Pod) -> Result<Option<Duration>> {
    let projections = projections(v);
    let Some(node) = v.spec.as_ref().and_then(|s| s.node_name.clone()) else { return Ok(None) };
    if projections.is_empty() {
        return Ok(None);
    }
    let (uid, pod) = (v.metadata.uid.clone().unwrap_or_default(), crate::informer::key_of(v));
    let held = match ctx.pod_certificates.with(&uid, &pod, |s| s.held.clone()) {
        Some(held) => held,
        None => {
            let existing = crate::tokens::api(ctx).get_opt(&secret_of(ctx, v)).await?;
            let held = ours(ctx, v, existing.as_ref())?.map(refresh_times).unwrap_or_default();
            ctx.pod_certificates.with(&uid, &pod, |s| s.held = Some(held.clone()));
            held
        }
    };
    let now = Timestamp::now();
    let mut issued = vec![];
    let mut look_again = next_refresh(&held, now);
    for p in projections.iter().filter(|p| held.get(&p.key()).is_none_or(|at| *at <= now)) {
        match step(ctx, v, &node, p).await? {
            Step::Waiting(after) => look_again = Some(look_again.map_or(after, |d| d.min(after))),
            Step::Issued(credentials) => issued.push(credentials),
            Step::Refused => {}
        }
    }
    if !issued.is_empty() {
        write(ctx, v, &issued).await?;
        // Only now are the requests answered: a failed write asks the signer for nothing new.
        let held = ctx.pod_certificates.with(&uid, &pod, |s| {
            let held = s.held.get_or_insert_with(BTreeMap::new);
            for i in &issued {
                s.waiting.remove(&i.key);
                held.insert(i.key.clone(), i.refresh_at);
            }
            held.clone()
        });
        let refresh = next_refresh(&held, Timestamp::now());
        look_again = look_again.into_iter().chain(refresh).min();
    }
    Ok(look_again)
}

/// How long until the next refresh falls due, if before the next resync (which looks at every pod).
fn next_refresh(held: &BTreeMap<String, Timestamp>, now: Timestamp) -> Option<Duration> {
    // Those already due are waiting for their signer (polled) or were refused (not asked again).
    let first = held.values().filter(|at| **at > now).min()?;
    let left = Duration::try_from(first.duration_since(now)).unwrap_or_default().max(Duration::from_secs(1));
    (left < crate::RESYNC).then_some(left)
}

/// Whether a host Secret under the pod's certificate Secret name is this pod's (`false`: an
/// earlier pod's of the same name, which holds nothing of this one's); a collision if another
/// owner's (a host object of another would be what the pod mounts).
fn is_this_pods(ctx: &Context, v: &Pod, meta: &ObjectMeta) -> Result<bool> {
    let (ns, name) = crate::informer::key_of(v);
    match ctx.tr.owner(meta) {
        Some(o) if o.is(KIND, &ns, &name) => Ok(Some(&o.uid) == v.metadata.uid.as_ref()),
        _ => Err(SyncError::Collision(format!("{}/{}", ctx.host_ns(), secret_name(&ctx.tr, &ns, &name)))),
    }
}

fn secret_of(ctx: &Context, v: &Pod) -> String {
    let (ns, name) = crate::informer::key_of(v);
    secret_name(&ctx.tr, &ns, &name)
}

/// The pod's certificate Secret as the host has it (`existing`), if it is this pod's.
fn ours<'a>(ctx: &Context, v: &Pod, existing: Option<&'a Secret>) -> Result<Option<&'a Secret>> {
    match existing {
        Some(s) => Ok(is_this_pods(ctx, v, &s.metadata)?.then_some(s)),
        None => Ok(None),
    }
}

/// Writes the issued credentials into the pod's Secret, beside those it holds.
async fn write(ctx: &Context, v: &Pod, issued: &[Issued]) -> Result<()> {
    let secret_name = secret_of(ctx, v);
    let existing = crate::tokens::api(ctx).get_opt(&secret_name).await?;
    let ours = ours(ctx, v, existing.as_ref())?;
    let mut data = ours.and_then(|s| s.data.clone()).unwrap_or_default();
    let mut refresh = ours.map(refresh_times).unwrap_or_default();
    for i in issued {
        let bundle = format!("{}{}", i.private_key, i.chain);
        let files =
            [(private_key_key(&i.key), &i.private_key), (chain_key(&i.key), &i.chain), (bundle_key(&i.key), &bundle)];
        for (k, value) in files {
            data.insert(k, ByteString(value.clone().into_bytes()));
        }
        refresh.insert(i.key.clone(), i.refresh_at);
    }
    let mut meta = crate::tokens::pods_secret_meta(ctx, KIND, v, &secret_name);
    let times: BTreeMap<&String, String> = refresh.iter().map(|(k, t)| (k, t.to_string())).collect();
    let times = serde_json::to_string(&times).unwrap_or_default();
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(ANNOTATION_CERTIFICATES_REFRESH.into(), times);
    let desired = Secret { metadata: meta, data: Some(data), type_: Some("Opaque".into()), ..Default::default() };
    crate::tokens::write_pods_secret(ctx, KIND, existing, desired).await
}

/// Whether the pod's certificate Secret may be written: absent, or ours. Looked up (metadata only)
/// before the pod is created, and only for pods with podCertificate projections.
pub async fn name_free(ctx: &Context, v: &Pod) -> Result<()> {
    if projections(v).is_empty() {
        return Ok(());
    }
    if let Some(s) = crate::tokens::api(ctx).get_metadata_opt(&secret_of(ctx, v)).await? {
        is_this_pods(ctx, v, &s.metadata)?;
    }
    Ok(())
}

/// The refresh times the Secret records, by projection key.
fn refresh_times(s: &Secret) -> BTreeMap<String, Timestamp> {
    let recorded = s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CERTIFICATES_REFRESH));
    let times: BTreeMap<String, String> = recorded.and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    times.into_iter().filter_map(|(k, t)| Some((k, t.parse().ok()?))).collect()
}

/// One projection's request: made if there is none, else looked at.
async fn step(ctx: &Context, v: &Pod, node: &str, p: &Projection<'_>) -> Result<Step> {
    let (uid, pod) = (v.metadata.uid.clone().unwrap_or_default(), crate::informer::key_of(v));
    let key = p.key();
    let waiting = ctx.pod_certificates.with(&uid, &pod, |s| s.waiting.get(&key).cloned());
    let Some(Waiting { request, since }) = waiting else {
        let made = request(ctx, v, node, p).await?;
        if let Err(why) = &made {
            sync::warn(ctx, v, "PodCertificateNotRequested", why).await;
        }
        let request = made.ok();
        let asked = request.is_some();
        ctx.pod_certificates.with(&uid, &pod, |s| s.waiting.insert(key, Waiting { request, since: Instant::now() }));
        return Ok(if asked { Step::Waiting(poll_after(Duration::ZERO)) } else { Step::Refused });
    };
    let Some((pcr_name, private_key)) = request else { return Ok(Step::Refused) };
    let requests: Api<PodCertificateRequest> = Api::namespaced(ctx.virt.clone(), &pod.0);
    let Some(pcr) = requests.get_opt(&pcr_name).await? else {
        // Deleted by someone: asked again.
        ctx.pod_certificates.with(&uid, &pod, |s| s.waiting.remove(&key));
        return Ok(Step::Waiting(poll_after(Duration::ZERO)));
    };
    let status = pcr.status.unwrap_or_default();
    for c in status.conditions.iter().flatten().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Issued" => {
                let (Some(chain), Some(begin_refresh)) = (&status.certificate_chain, &status.begin_refresh_at) else {
                    continue;
                };
                let refresh_at = begin_refresh.0 + jitter(&uid, &key);
                return Ok(Step::Issued(Issued { key, private_key, chain: clean_chain(chain), refresh_at }));
            }
            "Denied" | "Failed" => {
                let verb = if c.type_ == "Denied" { "was denied" } else { "failed" };
                let why = format!(
                    "PodCertificateRequest {}/{pcr_name} {verb}, reason={:?}, message={:?}",
                    pod.0, c.reason, c.message
                );
                sync::warn(ctx, v, &c.type_, &why).await;
                ctx.pod_certificates.with(&uid, &pod, |s| s.waiting.insert(key, Waiting { request: None, since }));
                return Ok(Step::Refused);
            }
            _ => {}
        }
    }
    Ok(Step::Waiting(poll_after(since.elapsed())))
}

/// How soon to look at a request again after waiting `waited` for its signer: signers answer in
/// moments, or not for a while.
fn poll_after(waited: Duration) -> Duration {
    match waited.as_secs() {
        0..5 => Duration::from_millis(500),
        5..60 => Duration::from_secs(2),
        _ => Duration::from_secs(15),
    }
}

/// Up to 5 minutes past `beginRefreshAt`, as a kubelet waits (so a Deployment's pods do not all
/// refresh at once); fixed per pod and projection, so a restart keeps it.
fn jitter(uid: &str, key: &str) -> k8s_openapi::jiff::SignedDuration {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (uid, key).hash(&mut h);
    k8s_openapi::jiff::SignedDuration::from_secs((h.finish() % 300) as i64)
}

/// Makes a PodCertificateRequest for one projection: (its name, the private key, PEM). The inner
/// error is what to tell the tenant: the virtual API server refused the request, or its key type
/// is not made here.
async fn request(
    ctx: &Context,
    v: &Pod,
    node: &str,
    p: &Projection<'_>,
) -> Result<std::result::Result<(String, String), String>> {
    let (ns, pod) = crate::informer::key_of(v);
    let pod_uid = v.metadata.uid.clone().unwrap_or_default();
    let sa = v.spec.as_ref().map(crate::refs::service_account).unwrap_or_else(|| "default".into());
    let sa_uid = Api::<ServiceAccount>::namespaced(ctx.virt.clone(), &ns).get(&sa).await?.metadata.uid;
    // The node was made just before the binding: the watch may not have brought it yet.
    let node_uid = match ctx.stores.vnodes.get(&ObjectRef::new(node)) {
        Some(n) => n.metadata.uid.clone(),
        None => Api::<Node>::all(ctx.virt.clone()).get(node).await?.metadata.uid,
    };
    let (private_key, stub) = match vkube_pki::pod_key(&p.source.key_type) {
        Ok(made) => made,
        Err(e) => return Ok(Err(format!("no key for the podCertificate projection of volume {:?}: {e}", p.volume))),
    };
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.clone(),
        uid: pod_uid.clone(),
        ..Default::default()
    };
    let pcr = PodCertificateRequest {
        metadata: ObjectMeta {
            generate_name: Some("req-".into()),
            namespace: Some(ns.clone()),
            owner_references: Some(vec![owner]),
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
    let api: Api<PodCertificateRequest> = Api::namespaced(ctx.virt.clone(), &ns);
    match api.create(&sync::post_params(), &pcr).await {
        Ok(made) => Ok(Ok((made.metadata.name.unwrap_or_default(), private_key))),
        // A request the API server will never take (its admission or validation).
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
