//! A virtual pod as its host copy (pure). What changes and why:
//!
//! - names of everything it refers to (configmaps, secrets, claims, pull secrets) follow the
//!   naming contract; label selectors in affinity and topology spread are confined to the
//!   virtual cluster and namespace;
//! - no host service-account token ever: `automountServiceAccountToken: false`, and each
//!   projected service-account token becomes the virtual token bound to the pod, kept in a host
//!   Secret of its own or (the admin's choice) in an annotation of the host pod;
//! - in-cluster clients reach the virtual API server (`KUBERNETES_SERVICE_*`, host aliases for
//!   `kubernetes.default.svc`) and DNS is the virtual cluster's own (`dnsPolicy: None`);
//! - the downward API still reads virtual metadata (from our annotations; all the virtual
//!   annotations only on pods whose volumes read them all);
//! - fields that only the host admin may decide (scheduler, priority and preemption policy: the
//!   host's admission sets them from a priority class the admin lists) are dropped, and the node
//!   choice and priority class are the admin's ([`vkube_core::policy::scheduling`]): what of the
//!   tenant's is dropped is returned, for a Warning event;
//! - ephemeral volumes' claim templates are sanitised like claims (no host volume by name or
//!   selector, no forged marks).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EphemeralContainer, HostAlias, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodDNSConfig, PodDNSConfigOption, PodSpec,
    ServiceAccountTokenProjection, Volume, VolumeProjection,
};
use vkube_core::contract::{
    ANNOTATION_OBJECT_ANNOTATIONS, ANNOTATION_OBJECT_LABELS, ANNOTATION_POD_TOKEN, ANNOTATION_SERVICE_ACCOUNT,
};

use crate::context::TokenDelivery;
use crate::naming::{self, ANNOTATION_NAME, ANNOTATION_NAMESPACE, ANNOTATION_UID, NamespaceLabels, Translator};
use crate::policy::{Policy, Refusal};
pub use vkube_core::policy::scheduling::{Closed, Nodes};

/// No node to pin a pod to (a pod's node choice cannot change after creation: updates need none).
pub const NO_NODES: Nodes<'static> = Nodes {
    known: &|_| false,
    labelled: &|_| Vec::new(),
    closed: &|_| Closed { nodes: Vec::new(), every_known: false },
    needless: &|_| false,
    bindable: &|_| false,
};

/// Facts about the virtual cluster that every pod translation needs.
#[derive(Clone)]
pub struct PodEnv<'a> {
    pub translator: &'a Translator,
    pub policy: &'a Policy,
    /// ClusterIP of the host Service in front of the API proxy.
    pub api_ip: &'a str,
    /// ClusterIP of the virtual cluster's DNS Service.
    pub dns_ip: &'a str,
    pub cluster_domain: &'a str,
    /// The Service environment variables of the pod's virtual namespace ([`service_links`]):
    /// the host copy runs with `enableServiceLinks: false`, so the kubelet would give it the
    /// host namespace's instead.
    pub service_links: &'a [EnvVar],
    /// Every virtual namespace with its labels: affinity terms' namespace selectors mean some
    /// of them.
    pub namespaces: &'a [NamespaceLabels],
    /// The host nodes the cluster's pods run on (a tenant may pin pods to those), with their
    /// virtual nodes' labels.
    pub nodes: Nodes<'a>,
    /// Where the host pod reads its tokens from.
    pub token_delivery: TokenDelivery,
}

/// A host pod, the tenant's scheduling inputs the admin's policy dropped from it, and why no node
/// can take it, if none can.
#[derive(Clone, Debug)]
pub struct Translated {
    pub pod: Pod,
    pub dropped: Vec<String>,
    pub unschedulable: Option<String>,
    /// The nodes the tenant closed that the pod is kept off (see `Placement::kept_off`).
    pub kept_off: Option<Vec<String>>,
}

/// The host Secret holding the virtual service-account token bound to pod `pod` (for
/// `audience`, if the pod asks for a specific one).
pub fn token_secret_name(tr: &Translator, namespace: &str, pod: &str, audience: Option<&str>) -> String {
    with_audience(format!("{}-sa-token", tr.host_name(namespace, pod)), audience)
}

/// The host pod annotation holding the pod's virtual service-account token for `audience`, with
/// tokens delivered in annotations.
pub fn token_annotation(audience: Option<&str>) -> String {
    with_audience(ANNOTATION_POD_TOKEN.to_string(), audience)
}

fn with_audience(base: String, audience: Option<&str>) -> String {
    match audience.filter(|a| !a.is_empty()) {
        None => base,
        Some(a) => format!("{base}-{}", vkube_core::naming::short_hash(a)),
    }
}

pub fn host_pod(env: &PodEnv<'_>, v: &Pod) -> Result<Translated, Refusal> {
    let tr = env.translator;
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let name = v.metadata.name.as_deref().unwrap_or_default();
    let vspec = v.spec.as_ref().ok_or_else(|| refusal("InvalidPod", "the pod has no spec".into()))?;
    env.policy.check_pod(v.metadata.annotations.as_ref(), vspec)?;
    if vspec.resource_claims.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(refusal("Unsupported", "dynamic resource claims are not supported in virtual clusters".into()));
    }

    let sa = crate::refs::service_account(vspec);
    let mut metadata = tr.host_meta("Pod", &v.metadata);
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_OBJECT_LABELS.into(), format_labels(v.metadata.labels.as_ref()));
    annotations.insert(ANNOTATION_SERVICE_ACCOUNT.into(), sa.clone());
    if reads_all_annotations(vspec) {
        // Only then: the host pod's own annotations are the translated ones, with ours beside.
        annotations.insert(ANNOTATION_OBJECT_ANNOTATIONS.into(), format_labels(v.metadata.annotations.as_ref()));
    }

    let mut spec = vspec.clone();
    spec.service_account_name = None;
    #[allow(deprecated)]
    {
        spec.service_account = None;
    }
    spec.automount_service_account_token = Some(false);
    spec.enable_service_links = Some(false);
    spec.priority = None;
    spec.preemption_policy = None;
    spec.overhead = None;
    spec.scheduler_name = None;
    spec.resource_claims = None;
    let placement = env.policy.scheduling.apply(&mut spec, &env.nodes);
    if spec.hostname.is_none() && is_dns_label(name) {
        spec.hostname = Some(name.to_string());
    }
    dns(env, ns, &mut spec);
    let mut aliases = spec.host_aliases.take().unwrap_or_default();
    aliases.push(HostAlias {
        ip: env.api_ip.to_string(),
        hostnames: Some(
            ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
                .iter()
                .map(|s| s.to_string())
                .chain(std::iter::once(format!("kubernetes.default.svc.{}", env.cluster_domain)))
                .collect(),
        ),
    });
    spec.host_aliases = Some(aliases);

    let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group);
    for vol in spec.volumes.iter_mut().flatten() {
        volume(env, ns, name, vol, fs_group);
    }
    for c in spec.init_containers.iter_mut().flatten().chain(spec.containers.iter_mut()) {
        container(env, ns, c);
    }
    for c in spec.ephemeral_containers.iter_mut().flatten() {
        ephemeral_container(env, ns, c);
    }
    for s in spec.image_pull_secrets.iter_mut().flatten() {
        s.name = tr.host_name(ns, &s.name);
    }
    if let Some(aff) = spec.affinity.as_mut() {
        if let Some(pa) = aff.pod_affinity.as_mut() {
            for t in pa.required_during_scheduling_ignored_during_execution.iter_mut().flatten() {
                affinity_term(tr, ns, env.namespaces, t);
            }
            for w in pa.preferred_during_scheduling_ignored_during_execution.iter_mut().flatten() {
                affinity_term(tr, ns, env.namespaces, &mut w.pod_affinity_term);
            }
        }
        if let Some(pa) = aff.pod_anti_affinity.as_mut() {
            for t in pa.required_during_scheduling_ignored_during_execution.iter_mut().flatten() {
                affinity_term(tr, ns, env.namespaces, t);
            }
            for w in pa.preferred_during_scheduling_ignored_during_execution.iter_mut().flatten() {
                affinity_term(tr, ns, env.namespaces, &mut w.pod_affinity_term);
            }
        }
    }
    for tsc in spec.topology_spread_constraints.iter_mut().flatten() {
        if let Some(sel) = &tsc.label_selector {
            tsc.label_selector = Some(tr.host_label_selector(ns, sel));
        }
        // Keys the host scheduler looks up on the host pod's labels: translated like them.
        for k in tsc.match_label_keys.iter_mut().flatten() {
            *k = tr.host_key(k);
        }
    }

    Ok(Translated {
        pod: Pod { metadata, spec: Some(spec), status: None },
        dropped: placement.dropped,
        unschedulable: placement.unschedulable,
        kept_off: placement.kept_off,
    })
}

fn refusal(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether a downward-API volume (or projection) of the pod reads all its annotations.
fn reads_all_annotations(spec: &PodSpec) -> bool {
    let volumes = spec.volumes.iter().flatten();
    let projected = volumes.clone().flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()));
    let items = volumes
        .filter_map(|v| v.downward_api.as_ref().and_then(|d| d.items.as_ref()))
        .chain(projected.filter_map(|s| s.downward_api.as_ref().and_then(|d| d.items.as_ref())));
    items.flatten().any(|i| i.field_ref.as_ref().is_some_and(|f| f.field_path == "metadata.annotations"))
}

/// Labels (or annotations) in the downward API's `metadata.labels` file format.
fn format_labels(labels: Option<&BTreeMap<String, String>>) -> String {
    labels.into_iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

fn dns(env: &PodEnv<'_>, ns: &str, spec: &mut PodSpec) {
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    if !matches!(policy, "ClusterFirst" | "ClusterFirstWithHostNet") {
        return;
    }
    let d = env.cluster_domain;
    let mut config = spec.dns_config.take().unwrap_or_default();
    let mut nameservers = vec![env.dns_ip.to_string()];
    nameservers.extend(config.nameservers.take().unwrap_or_default());
    let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.to_string()];
    searches.extend(config.searches.take().unwrap_or_default());
    let mut options = config.options.take().unwrap_or_default();
    if !options.iter().any(|o| o.name.as_deref() == Some("ndots")) {
        options.push(PodDNSConfigOption { name: Some("ndots".into()), value: Some("5".into()) });
    }
    spec.dns_policy = Some("None".into());
    spec.dns_config =
        Some(PodDNSConfig { nameservers: Some(nameservers), searches: Some(searches), options: Some(options) });
}

fn volume(env: &PodEnv<'_>, ns: &str, pod: &str, vol: &mut Volume, fs_group: Option<i64>) {
    let tr = env.translator;
    if let Some(cm) = vol.config_map.as_mut() {
        cm.name = tr.host_name(ns, &cm.name);
    }
    if let Some(s) = vol.secret.as_mut()
        && let Some(n) = s.secret_name.as_mut()
    {
        *n = tr.host_name(ns, n);
    }
    if let Some(pvc) = vol.persistent_volume_claim.as_mut() {
        pvc.claim_name = tr.host_name(ns, &pvc.claim_name);
    }
    if env.policy.scheduling.virtual_scheduler && vol.ephemeral.is_some() {
        // The virtual scheduler placed the pod once the claim the virtual cluster made for this
        // volume was bound (on the host, where that claim is synced): the host pod uses that
        // claim, not one the host would make anew from the template.
        vol.ephemeral = None;
        let claim_name = tr.host_name(ns, &format!("{pod}-{}", vol.name));
        vol.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource { claim_name, read_only: None });
        return;
    }
    if let Some(t) = vol.ephemeral.as_mut().and_then(|e| e.volume_claim_template.as_mut()) {
        // The host makes the claim from the template: the same rules as a synced claim's, and
        // reserved keys rewritten so the claim cannot pass for another cluster's object.
        t.spec = crate::claims::host_claim_spec(tr, ns, std::mem::take(&mut t.spec));
        if let Some(m) = t.metadata.as_mut() {
            for map in [m.labels.as_mut(), m.annotations.as_mut()].into_iter().flatten() {
                *map = std::mem::take(map).into_iter().map(|(k, v)| (tr.host_key(&k), v)).collect();
            }
        }
    }
    if let Some(r) = vol.csi.as_mut().and_then(|c| c.node_publish_secret_ref.as_mut()) {
        r.name = tr.host_name(ns, &r.name);
    }
    if let Some(d) = vol.downward_api.as_mut() {
        for item in d.items.iter_mut().flatten() {
            if let Some(f) = item.field_ref.as_mut() {
                field_ref(tr, f);
            }
        }
    }
    if let Some(p) = vol.projected.as_mut() {
        // As the kubelet: credentials with an owner of their own are readable by it only.
        let private = fs_group.is_some() || p.default_user.is_some();
        for (index, src) in p.sources.iter_mut().flatten().enumerate() {
            projection(tr, env.token_delivery, (ns, pod), (&vol.name, index, private), src);
        }
    }
}

/// One projected source of the pod `(ns, pod)`, the `index`th of volume `volume`.
fn projection(
    tr: &Translator,
    delivery: TokenDelivery,
    (ns, pod): (&str, &str),
    (volume, index, private): (&str, usize, bool),
    src: &mut VolumeProjection,
) {
    if let Some(cm) = src.config_map.as_mut() {
        cm.name = tr.host_name(ns, &cm.name);
    }
    if let Some(s) = src.secret.as_mut() {
        s.name = tr.host_name(ns, &s.name);
    }
    if let Some(d) = src.downward_api.as_mut() {
        for item in d.items.iter_mut().flatten() {
            if let Some(f) = item.field_ref.as_mut() {
                field_ref(tr, f);
            }
        }
    }
    if let Some(bundle) = src.cluster_trust_bundle.take() {
        // The virtual cluster's bundles, never the host's: kept by the syncer in a host Secret.
        src.secret = Some(k8s_openapi::api::core::v1::SecretProjection {
            name: crate::trust_bundles::secret_name(tr, ns, pod),
            items: Some(vec![KeyToPath {
                key: crate::trust_bundles::key(&bundle),
                path: bundle.path,
                ..Default::default()
            }]),
            optional: Some(false),
        });
    }
    if let Some(cert) = src.pod_certificate.take() {
        // The virtual cluster's signer, never the host's: the syncer asks for the certificate in
        // the virtual cluster and keeps key and chain in a host Secret.
        use crate::pod_certificates as pc;
        let key = pc::key(volume, index);
        let files = [
            (cert.credential_bundle_path, pc::bundle_key(&key)),
            (cert.key_path, pc::private_key_key(&key)),
            (cert.certificate_chain_path, pc::chain_key(&key)),
        ];
        let mode = (private || cert.user.is_some()).then_some(0o600);
        let items = files
            .into_iter()
            .filter_map(|(path, key)| Some(KeyToPath { key, path: path?, user: cert.user, mode }))
            .collect();
        src.secret = Some(k8s_openapi::api::core::v1::SecretProjection {
            name: pc::secret_name(tr, ns, pod),
            items: Some(items),
            optional: Some(false),
        });
    }
    if let Some(token) = src.service_account_token.take() {
        // The virtual cluster's token, never one of the host: kept by the syncer in a host Secret
        // or in an annotation of the host pod.
        let audience = token.audience.as_deref();
        // 0600 where the kubelet writes the token for an owner: with an fsGroup it becomes 0640.
        // Not for a runAsUser alone: the kubelet then makes that user the file's owner, which a
        // file from a Secret cannot get, so 0600 would leave the token unreadable.
        let mode = private.then_some(0o600);
        match delivery {
            TokenDelivery::Secret | TokenDelivery::BoundSecret => {
                src.secret = Some(k8s_openapi::api::core::v1::SecretProjection {
                    name: token_secret_name(tr, ns, pod, audience),
                    items: Some(vec![KeyToPath { key: "token".into(), path: token.path, mode, ..Default::default() }]),
                    optional: Some(false),
                })
            }
            TokenDelivery::Annotation => {
                let field_path = format!("metadata.annotations['{}']", token_annotation(audience));
                src.downward_api = Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                    items: Some(vec![k8s_openapi::api::core::v1::DownwardAPIVolumeFile {
                        path: token.path,
                        field_ref: Some(ObjectFieldSelector { field_path, api_version: Some("v1".into()) }),
                        mode,
                        ..Default::default()
                    }]),
                })
            }
        }
    }
}

/// The variables a kubelet gives containers for the Services of their namespace (Kubernetes'
/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT>]` and the Docker-link `<NAME>_PORT...`),
/// from the virtual Services: same ClusterIPs as on the host. Headless and ExternalName Services
/// have none; `kubernetes` is covered by the API variables. Sorted by name (pure).
pub fn service_links(services: &[&k8s_openapi::api::core::v1::Service]) -> Vec<EnvVar> {
    let var = |n: String, v: String| EnvVar { name: n, value: Some(v), value_from: None };
    let env_name = |s: &str| s.to_uppercase().replace('-', "_");
    let mut svcs: Vec<_> = services.iter().filter(|s| s.metadata.name.as_deref() != Some("kubernetes")).collect();
    svcs.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = vec![];
    for s in svcs {
        let Some(spec) = s.spec.as_ref() else { continue };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ports = spec.ports.clone().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = env_name(s.metadata.name.as_deref().unwrap_or_default());
        out.push(var(format!("{name}_SERVICE_HOST"), ip.to_string()));
        out.push(var(format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in &ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push(var(format!("{name}_SERVICE_PORT_{}", env_name(pn)), p.port.to_string()));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        out.push(var(format!("{name}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)));
        for p in &ports {
            let (pr, port) = (proto(p), p.port);
            let prefix = format!("{name}_PORT_{port}_{}", pr.to_uppercase());
            out.push(var(prefix.clone(), format!("{}://{ip}:{port}", pr.to_lowercase())));
            out.push(var(format!("{prefix}_PROTO"), pr.to_lowercase()));
            out.push(var(format!("{prefix}_PORT"), port.to_string()));
            out.push(var(format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    out
}

/// Host env for every container: the API server is the virtual one, behind the proxy's Service.
fn api_env(env: &PodEnv<'_>) -> Vec<EnvVar> {
    let var = |n: &str, v: String| EnvVar { name: n.into(), value: Some(v), value_from: None };
    let ip = env.api_ip;
    vec![
        var("KUBERNETES_SERVICE_HOST", ip.into()),
        var("KUBERNETES_SERVICE_PORT", "443".into()),
        var("KUBERNETES_SERVICE_PORT_HTTPS", "443".into()),
        var("KUBERNETES_PORT", format!("tcp://{ip}:443")),
        var("KUBERNETES_PORT_443_TCP", format!("tcp://{ip}:443")),
        var("KUBERNETES_PORT_443_TCP_PROTO", "tcp".into()),
        var("KUBERNETES_PORT_443_TCP_PORT", "443".into()),
        var("KUBERNETES_PORT_443_TCP_ADDR", ip.into()),
    ]
}

fn env_vars(
    env: &PodEnv<'_>,
    ns: &str,
    vars: &mut Option<Vec<EnvVar>>,
    from: &mut Option<Vec<k8s_openapi::api::core::v1::EnvFromSource>>,
) {
    let tr = env.translator;
    let list = vars.get_or_insert_with(Vec::new);
    for e in list.iter_mut() {
        if let Some(vf) = e.value_from.as_mut() {
            if let Some(r) = vf.config_map_key_ref.as_mut() {
                r.name = tr.host_name(ns, &r.name);
            }
            if let Some(r) = vf.secret_key_ref.as_mut() {
                r.name = tr.host_name(ns, &r.name);
            }
            if let Some(f) = vf.field_ref.as_mut() {
                field_ref(tr, f);
            }
        }
    }
    // As the kubelet does: the container's own variables win, and come after the Service ones,
    // so `$(WEB_SERVICE_HOST)` in one of them expands (a variable sees only those before it).
    // One difference: an `envFrom` key named like a Service variable loses to it here.
    let own = std::mem::take(list);
    list.extend(
        api_env(env)
            .into_iter()
            .chain(env.service_links.iter().cloned())
            .filter(|a| !own.iter().any(|e| e.name == a.name)),
    );
    list.extend(own);
    for f in from.iter_mut().flatten() {
        if let Some(r) = f.config_map_ref.as_mut() {
            r.name = tr.host_name(ns, &r.name);
        }
        if let Some(r) = f.secret_ref.as_mut() {
            r.name = tr.host_name(ns, &r.name);
        }
    }
}

fn container(env: &PodEnv<'_>, ns: &str, c: &mut Container) {
    env_vars(env, ns, &mut c.env, &mut c.env_from);
}

fn ephemeral_container(env: &PodEnv<'_>, ns: &str, c: &mut EphemeralContainer) {
    env_vars(env, ns, &mut c.env, &mut c.env_from);
}

/// Downward-API field paths that must read the virtual pod, not its host copy.
fn field_ref(tr: &Translator, f: &mut ObjectFieldSelector) {
    let path = f.field_path.as_str();
    let new = match path {
        "metadata.name" => Some(format!("metadata.annotations['{ANNOTATION_NAME}']")),
        "metadata.namespace" => Some(format!("metadata.annotations['{ANNOTATION_NAMESPACE}']")),
        "metadata.uid" => Some(format!("metadata.annotations['{ANNOTATION_UID}']")),
        "metadata.labels" => Some(format!("metadata.annotations['{ANNOTATION_OBJECT_LABELS}']")),
        "metadata.annotations" => Some(format!("metadata.annotations['{ANNOTATION_OBJECT_ANNOTATIONS}']")),
        "spec.serviceAccountName" => Some(format!("metadata.annotations['{ANNOTATION_SERVICE_ACCOUNT}']")),
        _ => ["labels", "annotations"].into_iter().find_map(|field| {
            let key = path.strip_prefix(&format!("metadata.{field}['"))?.strip_suffix("']")?;
            Some(format!("metadata.{field}['{}']", tr.host_key(key)))
        }),
    };
    if let Some(n) = new {
        f.field_path = n;
    }
}

/// An affinity term's selector, confined to the virtual cluster and to the virtual namespaces
/// the term means: the pod's own, or those it lists plus those its namespace selector matches.
/// A term without a label selector matches nothing, on the host as in the virtual cluster.
fn affinity_term(tr: &Translator, ns: &str, namespaces: &[NamespaceLabels], t: &mut PodAffinityTerm) {
    let listed = t.namespaces.take().unwrap_or_default();
    let scope = match t.namespace_selector.take() {
        None if listed.is_empty() => Some(vec![ns.to_string()]),
        None => Some(listed),
        Some(sel) => naming::namespaces_matching(&sel, namespaces).map(|mut matched| {
            matched.extend(listed);
            matched.sort();
            matched.dedup();
            matched
        }),
    };
    t.label_selector = t.label_selector.take().map(|sel| tr.host_pods_selector(scope.as_deref(), &sel));
    for k in t.match_label_keys.iter_mut().chain(t.mismatch_label_keys.iter_mut()).flatten() {
        *k = tr.host_key(k);
    }
}

/// Drops from a host pod a PriorityClass the admin lists that the host does not have (the host
/// would refuse the pod; it runs at the host's default priority instead), saying so. (A missing
/// RuntimeClass stays: the host refuses the pod rather than run it without the sandbox it asked for.)
pub fn drop_absent_priority_class(spec: &mut PodSpec) -> String {
    let name = spec.priority_class_name.take().unwrap_or_default();
    format!("spec.priorityClassName {name:?} (listed by the platform admin, but the host has no such class)")
}

/// Takes out of a host pod's requests and limits (containers', init containers', the pod's own)
/// the resources the tenant gave its virtual node (`tenants`, `nodes::tenant_resources`), which
/// its virtual scheduler counted, unless `host` (the node it is bound to) has them too: the host
/// kubelet would refuse the pod for them (a kubelet admits what its node object shows, so on a
/// cluster of its own the pod would run). Any other stays, one the host node stopped offering
/// too (a device plugin down): the host kubelet refuses the pod for it, which the tenant sees,
/// rather than running it without. cpu, memory and ephemeral storage always stay.
pub fn drop_tenant_resources(
    pod: &mut Pod,
    host: &k8s_openapi::api::core::v1::Node,
    tenants: &std::collections::BTreeSet<String>,
) {
    let allocatable = host.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let keep = |name: &str| {
        matches!(name, "cpu" | "memory" | "ephemeral-storage")
            || !tenants.contains(name)
            || allocatable.is_some_and(|a| a.contains_key(name))
    };
    let Some(spec) = pod.spec.as_mut() else { return };
    let containers = spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten());
    for r in containers.filter_map(|c| c.resources.as_mut()).chain(spec.resources.as_mut()) {
        keep_resources(r, keep);
    }
}

/// Keeps the requests and limits of `r` whose resource name `keep` accepts.
pub fn keep_resources(r: &mut k8s_openapi::api::core::v1::ResourceRequirements, keep: impl Fn(&str) -> bool) {
    for list in [r.requests.as_mut(), r.limits.as_mut()].into_iter().flatten() {
        list.retain(|name, _| keep(name));
    }
}

/// The host Secrets a pod's projected service-account tokens point at, with their audiences:
/// the syncer must create them before the pod (tokens delivered in Secrets).
pub fn token_secrets(tr: &Translator, v: &Pod) -> Vec<(String, Option<String>)> {
    let ns = v.metadata.namespace.as_deref().unwrap_or("default");
    let pod = v.metadata.name.as_deref().unwrap_or_default();
    token_audiences(v).into_iter().map(|a| (token_secret_name(tr, ns, pod, a.as_deref()), a)).collect()
}

/// A pod's projected service-account tokens, each with its audience (`None`: the API server's).
fn token_projections(v: &Pod) -> impl Iterator<Item = (Option<&str>, &ServiceAccountTokenProjection)> {
    v.spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
        .flat_map(|vol| vol.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        .filter_map(|s| s.service_account_token.as_ref())
        .map(|t| (t.audience.as_deref().filter(|a| !a.is_empty()), t))
}

/// The `expirationSeconds` of `v`'s token projections for `audience` (None: the API server's).
pub fn token_expirations(v: &Pod, audience: Option<&str>) -> Vec<i64> {
    token_projections(v).filter(|(a, _)| *a == audience).filter_map(|(_, t)| t.expiration_seconds).collect()
}

/// The audiences of a pod's projected service-account tokens (`None`: the API server's own),
/// each once.
pub fn token_audiences(v: &Pod) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = token_projections(v).map(|(a, _)| a.map(str::to_string)).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::LABEL_NAMESPACE;

    fn env<'a>(tr: &'a Translator, policy: &'a Policy) -> PodEnv<'a> {
        PodEnv {
            translator: tr,
            policy,
            api_ip: "10.96.0.10",
            dns_ip: "10.96.0.53",
            cluster_domain: "cluster.local",
            service_links: &[],
            namespaces: &[],
            nodes: NO_NODES,
            token_delivery: Default::default(),
        }
    }

    #[test]
    fn service_links_match_what_a_kubelet_sets() {
        let svc =
            |json: serde_json::Value| -> k8s_openapi::api::core::v1::Service { serde_json::from_value(json).unwrap() };
        let redis = svc(serde_json::json!({"metadata": {"name": "redis-primary"},
            "spec": {"clusterIP": "10.96.1.2", "ports": [{"name": "redis", "port": 6379}, {"port": 53, "protocol": "UDP"}]}}));
        let headless =
            svc(serde_json::json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}));
        let api = svc(
            serde_json::json!({"metadata": {"name": "kubernetes"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}}),
        );
        let vars: BTreeMap<String, String> =
            service_links(&[&redis, &headless, &api]).into_iter().map(|e| (e.name, e.value.unwrap())).collect();
        assert_eq!(vars["REDIS_PRIMARY_SERVICE_HOST"], "10.96.1.2");
        assert_eq!(vars["REDIS_PRIMARY_SERVICE_PORT"], "6379");
        assert_eq!(vars["REDIS_PRIMARY_SERVICE_PORT_REDIS"], "6379");
        assert_eq!(vars["REDIS_PRIMARY_PORT"], "tcp://10.96.1.2:6379");
        assert_eq!(vars["REDIS_PRIMARY_PORT_53_UDP"], "udp://10.96.1.2:53");
        assert_eq!(vars["REDIS_PRIMARY_PORT_53_UDP_PROTO"], "udp");
        assert_eq!(vars["REDIS_PRIMARY_PORT_6379_TCP_ADDR"], "10.96.1.2");
        assert!(!vars.keys().any(|k| k.starts_with("H_") || k.starts_with("KUBERNETES_PORT")));

        // A container's own variable wins.
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let links = service_links(&[&redis]);
        let pod_env = PodEnv { service_links: &links, ..env(&tr, &policy) };
        let spec = serde_json::json!({"containers": [{"name": "c", "env": [{"name": "REDIS_PRIMARY_SERVICE_HOST", "value": "mine"}]}]});
        let h = host_pod(&pod_env, &vpod(spec)).unwrap().pod;
        let env: BTreeMap<String, String> = h.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        assert_eq!(env["REDIS_PRIMARY_SERVICE_HOST"], "mine");
        assert_eq!(env["REDIS_PRIMARY_SERVICE_PORT"], "6379");

        // The container's own variables come after the Service ones, so references expand.
        let spec = serde_json::json!({"containers": [{"name": "c", "env": [
            {"name": "URL", "value": "$(REDIS_PRIMARY_SERVICE_HOST):$(REDIS_PRIMARY_SERVICE_PORT)"},
            {"name": "LITERAL", "value": "$$(REDIS_PRIMARY_SERVICE_HOST)"}]}]});
        let h = host_pod(&pod_env, &vpod(spec)).unwrap().pod;
        let names: Vec<String> =
            h.spec.unwrap().containers[0].env.clone().unwrap().into_iter().map(|e| e.name).collect();
        let at = |n: &str| names.iter().position(|e| e == n).unwrap_or_else(|| panic!("{n} in {names:?}"));
        assert!(at("REDIS_PRIMARY_SERVICE_HOST") < at("URL") && at("REDIS_PRIMARY_SERVICE_PORT") < at("URL"));
        assert!(at("KUBERNETES_SERVICE_HOST") < at("URL") && at("URL") < at("LITERAL"), "{names:?}");
    }

    fn vpod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "vkube.dev/cluster": "forged"},
                "annotations": {"note": "kept", "kubectl.kubernetes.io/last-applied-configuration": "{}", "vkube.dev/object-uid": "forged"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn typical() -> serde_json::Value {
        serde_json::json!({
            "serviceAccountName": "robot",
            "priorityClassName": "system-node-critical",
            "priority": 2000001000,
            "schedulerName": "custom",
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{"name": "app", "image": "nginx",
                "env": [
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}],
                "envFrom": [{"configMapRef": {"name": "settings"}}]}],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "settings"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "kube-api-access", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}],
        })
    }

    #[test]
    fn names_labels_and_ownership() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let h = host_pod(&env(&tr, &policy), &vpod(typical())).unwrap().pod;
        assert_eq!(h.metadata.name.as_deref(), Some("web-1-x-shop-x-team-a"));
        assert_eq!(h.metadata.namespace.as_deref(), Some("vkube-team-a"));
        let labels = h.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["vkube.dev/cluster"], "team-a");
        assert_eq!(labels["vkube.dev.t.vkube.dev/cluster"], "forged");
        let owner = tr.owner(&h.metadata).unwrap();
        assert_eq!(
            (owner.kind.as_str(), owner.namespace.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Pod", "shop", "web-1", "u-1")
        );
        let ann = h.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["t.vkube.dev/note"], "kept", "in the tenant domain, like labels");
        assert_eq!(ann["vkube.dev/object-uid"], "u-1", "our mark, not the tenant's forgery");
        assert_eq!(ann["vkube.dev.t.vkube.dev/object-uid"], "forged");
        assert!(!ann.keys().any(|k| k.contains("last-applied-configuration")));
    }

    #[test]
    fn pod_certificates_come_from_the_pods_own_secret() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let mut spec = typical();
        let cert = serde_json::json!({"signerName": "example.com/s", "keyType": "ECDSAP256", "user": 1000,
            "credentialBundlePath": "bundle.pem", "certificateChainPath": "chain.pem"});
        let sources = spec["volumes"][2]["projected"]["sources"].as_array_mut().unwrap();
        sources.push(serde_json::json!({"podCertificate": cert}));
        let index = sources.len() - 1;
        let h = host_pod(&env(&tr, &policy), &vpod(spec)).unwrap().pod;
        let json = serde_json::to_string(&h).unwrap();
        assert!(!json.contains("podCertificate"), "the host's signers are never asked: {json}");
        let projected = h.spec.unwrap().volumes.unwrap().into_iter().find(|v| v.name == "kube-api-access").unwrap();
        let secret = projected.projected.unwrap().sources.unwrap()[index].secret.clone().unwrap();
        assert_eq!((secret.name.as_str(), secret.optional), ("web-1-x-shop-x-team-a-pcert", Some(false)));
        let key = crate::pod_certificates::key("kube-api-access", index);
        let items: Vec<(String, String, Option<i64>, Option<i32>)> =
            secret.items.unwrap().into_iter().map(|i| (i.key, i.path, i.user, i.mode)).collect();
        assert_eq!(
            items,
            [
                (crate::pod_certificates::bundle_key(&key), "bundle.pem".to_string(), Some(1000), Some(0o600)),
                (crate::pod_certificates::chain_key(&key), "chain.pem".to_string(), Some(1000), Some(0o600)),
            ],
            "a file per path the projection names, no key file; the user's alone, as the kubelet writes them"
        );
    }

    #[test]
    fn trust_bundles_come_from_the_pods_own_secret() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let mut spec = typical();
        let ctb = serde_json::json!({"path": "ca.pem", "signerName": "example.com/s", "labelSelector": {}});
        spec["volumes"][2]["projected"]["sources"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"clusterTrustBundle": ctb}));
        let h = host_pod(&env(&tr, &policy), &vpod(spec)).unwrap().pod;
        let json = serde_json::to_string(&h).unwrap();
        assert!(!json.contains("clusterTrustBundle"), "the host's bundles are never asked for: {json}");
        let projected = h.spec.unwrap().volumes.unwrap().into_iter().find(|v| v.name == "kube-api-access").unwrap();
        let sources = projected.projected.unwrap().sources.unwrap();
        let bundle = sources.last().unwrap().secret.as_ref().unwrap();
        assert_eq!(bundle.name, "web-1-x-shop-x-team-a-ctb");
        let item = &bundle.items.as_ref().unwrap()[0];
        assert_eq!((item.path.as_str(), bundle.optional), ("ca.pem", Some(false)));
        assert_eq!(item.key, crate::trust_bundles::key(&serde_json::from_value(ctb).unwrap()));
    }

    #[test]
    fn no_host_token_and_the_virtual_one_instead() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let h = host_pod(&env(&tr, &policy), &vpod(typical())).unwrap().pod;
        let spec = h.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.service_account_name, None);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("serviceAccountToken"), "no projected host token: {json}");
        let projected =
            spec.volumes.unwrap().into_iter().find(|v| v.name == "kube-api-access").unwrap().projected.unwrap();
        let sources = projected.sources.unwrap();
        let token = sources[0].secret.as_ref().unwrap();
        assert_eq!(token.name, "web-1-x-shop-x-team-a-sa-token", "the pod's own token");
        assert_eq!(token.items.as_ref().unwrap()[0].path, "token");
        assert_eq!(token.items.as_ref().unwrap()[0].mode, None, "the volume's default mode, as the kubelet's");
        assert_eq!(sources[1].config_map.as_ref().unwrap().name, "kube-root-ca.crt-x-shop-x-team-a");
        assert_eq!(
            sources[2].downward_api.as_ref().unwrap().items.as_ref().unwrap()[0].field_ref.as_ref().unwrap().field_path,
            "metadata.annotations['vkube.dev/object-namespace']"
        );
    }

    #[test]
    fn tokens_of_pods_with_an_fs_group_are_private_files_as_the_kubelet_writes_them() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let mut spec = typical();
        spec["securityContext"] = serde_json::json!({"fsGroup": 10000, "runAsUser": 1000});
        for delivery in [TokenDelivery::Secret, TokenDelivery::BoundSecret, TokenDelivery::Annotation] {
            let env = PodEnv { token_delivery: delivery, ..env(&tr, &policy) };
            let h = host_pod(&env, &vpod(spec.clone())).unwrap().pod.spec.unwrap();
            let projected = h.volumes.unwrap().into_iter().find(|v| v.name == "kube-api-access").unwrap();
            let token = &projected.projected.unwrap().sources.unwrap()[0];
            let mode = match delivery {
                TokenDelivery::Secret | TokenDelivery::BoundSecret => {
                    token.secret.as_ref().unwrap().items.as_ref().unwrap()[0].mode
                }
                TokenDelivery::Annotation => token.downward_api.as_ref().unwrap().items.as_ref().unwrap()[0].mode,
            };
            assert_eq!(mode, Some(0o600), "{delivery:?}: the kubelet's 0600, made 0640 by the fsGroup");
        }
    }

    #[test]
    fn tokens_delivered_in_annotations_are_read_through_the_downward_api() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let mut spec = typical();
        spec["volumes"][2]["projected"]["sources"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"serviceAccountToken": {"path": "vault", "audience": "vault"}}));
        let env = PodEnv { token_delivery: TokenDelivery::Annotation, ..env(&tr, &policy) };
        let spec = host_pod(&env, &vpod(spec)).unwrap().pod.spec.unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("serviceAccountToken") && !json.contains("sa-token\""), "no token Secret: {json}");
        let projected =
            spec.volumes.unwrap().into_iter().find(|v| v.name == "kube-api-access").unwrap().projected.unwrap();
        let sources = projected.sources.unwrap();
        let item = |i: usize| sources[i].downward_api.as_ref().unwrap().items.as_ref().unwrap()[0].clone();
        assert_eq!(item(0).path, "token");
        assert_eq!(item(0).field_ref.unwrap().field_path, "metadata.annotations['vkube.dev/sa-token']");
        assert_eq!(item(3).path, "vault");
        let vault = item(3).field_ref.unwrap().field_path;
        assert_eq!(
            vault,
            format!("metadata.annotations['vkube.dev/sa-token-{}']", vkube_core::naming::short_hash("vault"))
        );
        assert_eq!(token_annotation(Some("vault")), vault["metadata.annotations['".len()..vault.len() - 2]);
    }

    #[test]
    fn a_volume_reading_all_annotations_reads_the_virtual_ones() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let plain = host_pod(&env(&tr, &policy), &vpod(typical())).unwrap().pod;
        assert!(!plain.metadata.annotations.unwrap().contains_key(ANNOTATION_OBJECT_ANNOTATIONS), "only when read");
        let mut spec = typical();
        let all = serde_json::json!({"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}});
        spec["volumes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "info", "downwardAPI": {"items": [all]}}));
        let h = host_pod(&env(&tr, &policy), &vpod(spec)).unwrap().pod;
        let file = &h.metadata.annotations.unwrap()[ANNOTATION_OBJECT_ANNOTATIONS];
        assert!(file.contains("note=\"kept\"") && file.contains("vkube.dev/object-uid=\"forged\""), "{file}");
        let info = h.spec.unwrap().volumes.unwrap().into_iter().find(|v| v.name == "info").unwrap();
        let path = &info.downward_api.unwrap().items.unwrap()[0].field_ref.clone().unwrap().field_path;
        assert_eq!(path, "metadata.annotations['vkube.dev/object-annotations']");
    }

    #[test]
    fn a_listed_priority_class_the_host_lacks_is_dropped_and_told() {
        let mut spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "c"}], "priorityClassName": "gone", "runtimeClassName": "gvisor"
        }))
        .unwrap();
        let dropped = drop_absent_priority_class(&mut spec);
        assert_eq!((spec.priority_class_name, spec.runtime_class_name.as_deref()), (None, Some("gvisor")));
        assert_eq!(
            dropped,
            "spec.priorityClassName \"gone\" (listed by the platform admin, but the host has no such class)"
        );
    }

    #[test]
    fn a_listed_priority_class_crosses_and_the_host_computes_priority_and_preemption() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let mut policy = Policy::default();
        policy.scheduling.priority_classes = vec!["batch".into()];
        let mut spec = typical();
        spec["priorityClassName"] = "batch".into();
        spec["priority"] = 1000.into();
        spec["preemptionPolicy"] = "Never".into();
        let t = host_pod(&env(&tr, &policy), &vpod(spec)).unwrap();
        let host = t.pod.spec.unwrap();
        // The host's admission refuses a pod whose priority or policy differs from its class's.
        assert_eq!(
            (host.priority_class_name.as_deref(), host.priority, host.preemption_policy),
            (Some("batch"), None, None)
        );
        assert!(!t.dropped.iter().any(|d| d.contains("priorityClassName")), "{:?}", t.dropped);
    }

    #[test]
    fn references_api_and_dns_point_at_the_virtual_cluster() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let spec = host_pod(&env(&tr, &policy), &vpod(typical())).unwrap().pod.spec.unwrap();
        assert_eq!(spec.priority_class_name, None);
        assert_eq!(spec.priority, None);
        assert_eq!(spec.scheduler_name, None);
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.hostname.as_deref(), Some("web-1"));
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "pull-x-shop-x-team-a");
        let c = &spec.containers[0];
        let env: BTreeMap<&str, &EnvVar> = c.env.as_ref().unwrap().iter().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env["KUBERNETES_SERVICE_HOST"].value.as_deref(), Some("10.96.0.10"));
        assert_eq!(env["KUBERNETES_SERVICE_PORT"].value.as_deref(), Some("443"));
        let path = |n: &str| env[n].value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path.clone();
        assert_eq!(path("POD"), "metadata.annotations['vkube.dev/object-name']");
        assert_eq!(path("APP"), "metadata.labels['t.vkube.dev/app']");
        assert_eq!(path("IP"), "status.podIP");
        assert_eq!(
            env["PASS"].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name,
            "db-x-shop-x-team-a"
        );
        assert_eq!(c.env_from.as_ref().unwrap()[0].config_map_ref.as_ref().unwrap().name, "settings-x-shop-x-team-a");
        let vols = spec.volumes.unwrap();
        assert_eq!(vols[0].config_map.as_ref().unwrap().name, "settings-x-shop-x-team-a");
        assert_eq!(vols[1].persistent_volume_claim.as_ref().unwrap().claim_name, "data-x-shop-x-team-a");
        assert_eq!(spec.dns_policy.as_deref(), Some("None"));
        let dns = spec.dns_config.unwrap();
        assert_eq!(dns.nameservers.unwrap(), vec!["10.96.0.53"]);
        assert_eq!(dns.searches.unwrap(), vec!["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        let aliases = spec.host_aliases.unwrap();
        assert_eq!(aliases[0].ip, "10.96.0.10");
        assert!(aliases[0].hostnames.as_ref().unwrap().contains(&"kubernetes.default.svc.cluster.local".to_string()));
    }

    #[test]
    fn selectors_in_scheduling_terms_stay_inside() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let spec = serde_json::json!({
            "containers": [{"name": "c"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "web"}}},
                {"topologyKey": "zone", "namespaces": ["a", "b"], "labelSelector": {"matchLabels": {"app": "db"}}},
                {"topologyKey": "zone", "namespaces": ["a"], "namespaceSelector": {"matchLabels": {"tier": "data"}},
                    "labelSelector": {"matchLabels": {"app": "db"}}},
                {"topologyKey": "zone", "namespaceSelector": {}, "labelSelector": {"matchLabels": {"app": "db"}}},
                {"topologyKey": "zone"}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app": "web"}}, "matchLabelKeys": ["pod-template-hash"]}],
        });
        let labels = |tier: &str| [("tier".to_string(), tier.to_string())].into();
        let namespaces = [("c".to_string(), labels("data")), ("d".to_string(), labels("web"))];
        let env = PodEnv { namespaces: &namespaces, ..env(&tr, &policy) };
        let spec = host_pod(&env, &vpod(spec)).unwrap().pod.spec.unwrap();
        let terms = spec
            .affinity
            .unwrap()
            .pod_anti_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        let scope = |i: usize| {
            let sel = terms[i].label_selector.as_ref().unwrap();
            assert_eq!(sel.match_labels.as_ref().unwrap()["vkube.dev/cluster"], "team-a");
            assert!(!sel.match_labels.as_ref().unwrap().contains_key(LABEL_NAMESPACE));
            assert_eq!(terms[i].namespaces, None);
            assert_eq!(terms[i].namespace_selector, None);
            sel.match_expressions.iter().flatten().find(|e| e.key == LABEL_NAMESPACE).map(|e| e.values.clone().unwrap())
        };
        let names = |n: &[&str]| Some(n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(scope(0), names(&["shop"]), "the pod's own namespace");
        assert_eq!(scope(1), names(&["a", "b"]), "the listed ones");
        assert_eq!(scope(2), names(&["a", "c"]), "listed plus those the selector matches");
        assert_eq!(scope(3), None, "every namespace of this cluster (and only of it)");
        assert_eq!(terms[4].label_selector, None, "no selector matches nothing, as upstream");
        let tsc = &spec.topology_spread_constraints.unwrap()[0];
        assert_eq!(tsc.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap()[LABEL_NAMESPACE], "shop");
        assert_eq!(tsc.match_label_keys.as_deref(), Some(&["t.vkube.dev/pod-template-hash".to_string()][..]));
    }

    #[test]
    fn forbidden_pods_are_refused_before_anything_is_built() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let err = host_pod(
            &env(&tr, &policy),
            &vpod(serde_json::json!({"hostNetwork": true, "containers": [{"name": "c"}]})),
        )
        .unwrap_err();
        assert!(err.message.contains("hostNetwork"));
    }

    #[test]
    fn ephemeral_claims_and_node_choice_are_sanitised() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let policy = Policy::default();
        let spec = serde_json::json!({
            "containers": [{"name": "c"}],
            "nodeName": "control-plane",
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                "metadata": {"labels": {"vkube.dev/cluster": "team-b", "app": "db"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                    "dataSource": {"kind": "PersistentVolumeClaim", "name": "seed"}}}}}]});
        let t = host_pod(&env(&tr, &policy), &vpod(spec)).unwrap();
        assert_eq!(t.dropped.len(), 2, "{:?}", t.dropped);
        let spec = t.pod.spec.unwrap();
        assert_eq!((spec.node_name, spec.tolerations, spec.affinity), (None, None, None));
        let tmpl = spec.volumes.unwrap()[0].ephemeral.clone().unwrap().volume_claim_template.unwrap();
        let labels = tmpl.metadata.unwrap().labels.unwrap();
        assert_eq!(labels.get("vkube.dev/cluster"), None, "no forged mark");
        assert_eq!(labels["vkube.dev.t.vkube.dev/cluster"], "team-b");
        assert_eq!(tmpl.spec.data_source.unwrap().name, "seed-x-shop-x-team-a");
    }

    #[test]
    fn token_secrets_per_audience() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let mut spec = typical();
        spec["volumes"][2]["projected"]["sources"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"serviceAccountToken": {"path": "vault", "audience": "vault"}}));
        let secrets = token_secrets(&tr, &vpod(spec));
        assert_eq!(secrets.len(), 2);
        assert_eq!(secrets[0], ("web-1-x-shop-x-team-a-sa-token".to_string(), None));
        assert!(secrets[1].0.starts_with("web-1-x-shop-x-team-a-sa-token-"));
        assert_eq!(secrets[1].1.as_deref(), Some("vault"));
    }

    #[test]
    fn resources_the_tenant_gave_its_node_and_the_host_node_lacks_are_taken_out() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({"spec": {
            "containers": [{"name": "c", "resources": {
                "requests": {"cpu": "1", "scheduling.k8s.io/foo": "2", "example.com/gpu": "1"},
                "limits": {"scheduling.k8s.io/foo": "2", "memory": "1Gi"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"scheduling.k8s.io/foo": "1"}}}]}}))
        .unwrap();
        let host: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "status": {"allocatable": {"cpu": "4", "pods": "110", "example.com/gpu": "2"}}}))
        .unwrap();
        // The tenant gave its virtual node foo and gpu; nvidia.com/gpu was the host's.
        let tenants = ["scheduling.k8s.io/foo", "example.com/gpu", "cpu"].map(String::from).into();
        let mut with_host_device = pod.clone();
        drop_tenant_resources(&mut pod, &host, &tenants);
        let spec = pod.spec.unwrap();
        let r = spec.containers[0].resources.clone().unwrap();
        let keys = |m: Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            m.unwrap_or_default().into_keys().collect::<Vec<_>>()
        };
        assert_eq!(keys(r.requests), ["cpu", "example.com/gpu"], "the host node has a gpu too");
        assert_eq!(keys(r.limits), ["memory"]);
        assert!(keys(spec.init_containers.unwrap()[0].resources.clone().unwrap().requests).is_empty());
        // A resource the host node offered (not the tenant's) and no longer does: asked of it
        // still, for its kubelet to refuse, not dropped silently.
        let device = k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into());
        let c = &mut with_host_device.spec.as_mut().unwrap().containers[0];
        c.resources.as_mut().unwrap().limits.as_mut().unwrap().insert("nvidia.com/gpu".into(), device);
        drop_tenant_resources(&mut with_host_device, &host, &tenants);
        let r = with_host_device.spec.unwrap().containers[0].resources.clone().unwrap();
        assert_eq!(keys(r.limits), ["memory", "nvidia.com/gpu"]);
    }
}
