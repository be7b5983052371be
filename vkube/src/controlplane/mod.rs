//! The control-plane process (`vkube run`): certificates kept valid, the API proxy, the syncer,
//! `/metrics`. It runs the virtual cluster's etcd, and kube-apiserver with kube-controller-manager
//! in one process (`kube-control-plane`), as its children (`supervisor`), in the Helm chart's pod
//! or as local processes (`vkube create --local`).

pub mod allocator;
pub mod code_pages;
pub mod components;
pub mod etcd;
pub mod ingress_activity;
pub mod ingress_wake;
pub mod operations;
pub mod power;
pub mod schedule;
pub mod supervisor;
pub mod usage;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use power::SyncerRunner as _;
use prometheus_client::registry::Registry;
use vkube_apiproxy::sleep::Power;
use vkube_apiproxy::tls::ServingCert;
use vkube_apiproxy::{Proxy, ProxyConfig};
use vkube_core::naming::Translator;
use vkube_pki::Bundle;

use crate::{FIELD_MANAGER, names, pki_store};

#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Run by the chart's pod and by `vkube create --local`, not by hand. Example:\n  vkube run --name team-a --namespace vkube-team-a --virtual-server https://127.0.0.1:6443 --cert-dir /pki"
)]
pub struct RunArgs {
    /// The virtual cluster's name.
    #[arg(long, env = "VKUBE_NAME")]
    pub name: String,
    /// The host namespace the virtual cluster lives in.
    #[arg(long, env = "VKUBE_NAMESPACE")]
    pub namespace: String,
    /// The virtual API server, reached on loopback.
    #[arg(long, env = "VKUBE_VIRTUAL_SERVER", default_value = "https://127.0.0.1:6443")]
    pub virtual_server: String,
    /// Where the proxy listens.
    #[arg(long, env = "VKUBE_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Where the certificates are written for the upstream components (they reload renewed ones).
    #[arg(long, env = "VKUBE_CERT_DIR", default_value = "/var/lib/vkube/pki")]
    pub cert_dir: PathBuf,
    /// The server URL written into the admin kubeconfig Secret.
    #[arg(long, env = "VKUBE_ENDPOINT")]
    pub endpoint: String,
    /// Host kubeconfig; in-cluster credentials when unset.
    #[arg(long, env = "VKUBE_HOST_KUBECONFIG")]
    pub host_kubeconfig: Option<PathBuf>,
    #[arg(long, env = "VKUBE_HOST_CONTEXT")]
    pub host_context: Option<String>,
    /// The host's service ranges (comma-separated): where a tenant's hand-picked ClusterIPs may
    /// be. Unset, no hand-picked address is taken on the host.
    #[arg(long, env = "VKUBE_SERVICE_CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<ipnet::IpNet>,
    /// How often certificates are checked for renewal.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub renew_every: Duration,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub sync: SyncArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    #[command(flatten)]
    pub supervise: supervisor::SuperviseArgs,
    #[command(flatten)]
    pub sleep: power::SleepArgs,
    #[command(flatten)]
    pub snapshots: operations::ScheduleArgs,
    #[command(flatten)]
    pub usage: usage::UsageArgs,
}

/// What bounds the API proxy's load (docs/architecture.md, "API proxy").
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Client connections the API proxy serves at once; more wait until one closes.
    #[arg(long, env = "VKUBE_PROXY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub proxy_max_connections: usize,
    /// Of those, connections one client address (an IPv6 /64) may hold at once; more are closed
    /// at once, so one client's idle connections cannot keep everyone else waiting.
    #[arg(long, env = "VKUBE_PROXY_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256)]
    pub proxy_max_connections_per_address: usize,
    /// TokenReviews per second for bearer tokens not seen valid lately (burst: twice this); over
    /// it such tokens get 429 unreviewed (clients ask again), so random tokens cannot cost one
    /// review each.
    #[arg(long, env = "VKUBE_PROXY_UNKNOWN_TOKEN_REVIEWS", default_value_t = 20)]
    pub proxy_unknown_token_reviews: u32,
    /// The same for the requests of one client address (an IPv6 /64): a flood from one place
    /// leaves the rest to everyone else's new tokens.
    #[arg(long, env = "VKUBE_PROXY_UNKNOWN_TOKEN_REVIEWS_PER_ADDRESS", default_value_t = 5)]
    pub proxy_unknown_token_reviews_per_address: u32,
}

impl ProxyArgs {
    pub fn limits(&self) -> vkube_apiproxy::ProxyLimits {
        vkube_apiproxy::ProxyLimits {
            max_connections: self.proxy_max_connections,
            max_connections_per_address: self.proxy_max_connections_per_address,
            token_reviews: vkube_apiproxy::auth::ReviewLimit {
                per_second: self.proxy_unknown_token_reviews,
                burst: self.proxy_unknown_token_reviews.saturating_mul(2),
                per_address_per_second: self.proxy_unknown_token_reviews_per_address,
            },
            ..Default::default()
        }
    }
}

/// File names `prepare_files` writes next to the certificates.
pub const ADMISSION_FILE: &str = "admission.yaml";
/// The virtual API server's egress configuration and the socket of the proxy it names.
pub const EGRESS_FILE: &str = "egress.yaml";
pub const EGRESS_SOCKET: &str = "egress.sock";
pub const CONTROLLER_MANAGER_KUBECONFIG: &str = "controller-manager.kubeconfig";
/// The virtual scheduler's (`PolicyArgs::virtual_scheduler`).
pub const SCHEDULER_KUBECONFIG: &str = "scheduler.kubeconfig";

/// Writes certificates (from the host Secret, created if missing), the admission
/// configuration and the kubeconfigs of the controller manager and the scheduler into `cert_dir`.
pub async fn prepare_files(
    host: &kube::Client,
    name: &str,
    namespace: &str,
    cert_dir: &Path,
    virtual_server: &str,
    policy: &PolicyArgs,
) -> anyhow::Result<Bundle> {
    let (bundle, _) = sync_pki(host, namespace, name, cert_dir).await?;
    std::fs::write(cert_dir.join(ADMISSION_FILE), components::admission_config(policy.pod_security))
        .context("writing the admission configuration")?;
    std::fs::write(cert_dir.join(EGRESS_FILE), vkube_apiproxy::egress::config(&cert_dir.join(EGRESS_SOCKET)))
        .context("writing the egress configuration")?;
    vkube_kubeclient::write_private(
        &cert_dir.join(CONTROLLER_MANAGER_KUBECONFIG),
        &components::component_kubeconfig(virtual_server, &bundle, "controller-manager"),
    )?;
    vkube_kubeclient::write_private(
        &cert_dir.join(SCHEDULER_KUBECONFIG),
        &components::component_kubeconfig(virtual_server, &bundle, "scheduler"),
    )?;
    Ok(bundle)
}

/// The isolation policy: the platform admin's, never the tenant's.
#[derive(clap::Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PolicyArgs {
    /// Pod Security level pods must meet to reach the host: privileged, baseline or restricted.
    #[arg(long, env = "VKUBE_POD_SECURITY", default_value = "baseline")]
    pub pod_security: vkube_core::policy::PodSecurityLevel,
    /// Let tenants create NodePort services on the host.
    #[arg(long, env = "VKUBE_ALLOW_NODE_PORTS")]
    pub allow_node_ports: bool,
    /// Let tenants create LoadBalancer services on the host.
    #[arg(long, env = "VKUBE_ALLOW_LOAD_BALANCERS")]
    pub allow_load_balancers: bool,
    /// Load balancer classes tenants' LoadBalancer Services may name (comma-separated; none: the
    /// host's default load balancer only).
    #[arg(long, env = "VKUBE_LOAD_BALANCER_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub load_balancer_classes: Vec<String>,
    /// Let tenants choose their node ports by hand (else the host chooses every one).
    #[arg(long, env = "VKUBE_ALLOW_NODE_PORT_CHOICE")]
    #[serde(default)]
    pub allow_node_port_choice: bool,
    /// Inline CSI volume drivers tenants' pods may use (comma-separated; none by default).
    #[arg(long, env = "VKUBE_CSI_DRIVERS", value_delimiter = ',')]
    #[serde(default)]
    pub csi_drivers: Vec<String>,
    /// StorageClasses tenants' claims may name (comma-separated; none: a claim names no class
    /// and gets the host's default).
    #[arg(long, env = "VKUBE_STORAGE_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub storage_classes: Vec<String>,
    /// VolumeAttributesClasses tenants' claims may name (comma-separated; none by default).
    #[arg(long, env = "VKUBE_VOLUME_ATTRIBUTES_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub volume_attributes_classes: Vec<String>,
    /// Node labels every host pod must match (`key=value`, comma-separated).
    #[arg(long, env = "VKUBE_HOST_NODE_SELECTOR", value_delimiter = ',')]
    #[serde(default)]
    pub host_node_selector: Vec<String>,
    /// Tolerations every host pod gets, as a JSON list of Kubernetes tolerations.
    #[arg(long, env = "VKUBE_HOST_TOLERATIONS", default_value = "[]")]
    #[serde(default = "no_tolerations")]
    pub host_tolerations: String,
    /// Taint keys tenants' tolerations may name (comma-separated); the others are dropped.
    #[arg(long, env = "VKUBE_TOLERABLE_TAINTS", value_delimiter = ',',
        default_values_t = DEFAULT_TOLERABLE_TAINTS.map(String::from))]
    #[serde(default = "default_tolerable_taints")]
    pub tolerable_taints: Vec<String>,
    /// Node label keys tenants' node selectors and node affinity may use (comma-separated).
    #[arg(long, env = "VKUBE_TENANT_NODE_LABELS", value_delimiter = ',',
        default_values_t = DEFAULT_TENANT_NODE_LABELS.map(String::from))]
    #[serde(default = "default_tenant_node_labels")]
    pub tenant_node_labels: Vec<String>,
    /// Runtime classes tenants may ask for (comma-separated; none: the host's default).
    #[arg(long, env = "VKUBE_RUNTIME_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub runtime_classes: Vec<String>,
    /// Host PriorityClasses tenants' pods may name (comma-separated; the virtual cluster shows
    /// them, the host gives their pods that priority); none: the host's default priority. Not the
    /// built-in `system-` classes (the host admits those in its kube-system only).
    #[arg(long, env = "VKUBE_PRIORITY_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub priority_classes: Vec<String>,
    /// Let a pod the tenant binds by nodeName go to that node directly, as on a cluster of its
    /// own (the host kubelet admits or rejects it), where the cluster's pods run and the host has
    /// not cordoned it or tainted it against the admin's tolerations; else the host scheduler
    /// places it there (node affinity).
    #[arg(long, env = "VKUBE_BIND_NODE_NAME")]
    #[serde(default)]
    pub bind_node_name: bool,
    /// Schedule the tenant's pods in the virtual cluster (its own kube-scheduler, on virtual nodes
    /// showing every host node the host node selector allows), not by the host scheduler: pods
    /// reach the host bound to their node (as with --bind-node-name), and the tenant's priority
    /// classes, preemption and scheduler settings apply among its own pods. Needs `list` on host
    /// nodes.
    #[arg(long, env = "VKUBE_VIRTUAL_SCHEDULER")]
    #[serde(default)]
    pub virtual_scheduler: bool,
    /// Label and annotation keys copied to host objects as they are (comma-separated, exact or
    /// `prefix/*`); every other tenant key goes under the tenant domain `t.vkube.dev`.
    #[arg(long, env = "VKUBE_VERBATIM_KEYS", value_delimiter = ',')]
    #[serde(default)]
    pub verbatim_keys: Vec<String>,
    /// Address ranges (CIDRs, comma-separated) that the endpoints tenants write for selector-less
    /// Services may name besides the cluster's own pods, e.g. a database outside the cluster;
    /// none by default.
    #[arg(long, env = "VKUBE_ENDPOINT_CIDRS", value_delimiter = ',')]
    #[serde(default)]
    pub endpoint_cidrs: Vec<String>,
    /// Address ranges (CIDRs, comma-separated) tenants' NetworkPolicies may open their pods'
    /// egress to besides the cluster's pods and control plane (with --sync-network-policies); none
    /// by default.
    #[arg(long, env = "VKUBE_EGRESS_CIDRS", value_delimiter = ',')]
    #[serde(default)]
    pub egress_cidrs: Vec<String>,
    /// Ingress classes tenants' Ingresses may use (comma-separated; the first is given to one
    /// naming none); none: Ingresses are not synced.
    #[arg(long, env = "VKUBE_INGRESS_CLASSES", value_delimiter = ',')]
    #[serde(default)]
    pub ingress_classes: Vec<String>,
    /// Host names tenants' Ingresses may claim (comma-separated; exact, or `*.suffix` for any
    /// name under it; `CLASS=` in front allows it under that ingress class only).
    #[arg(long, env = "VKUBE_INGRESS_HOSTS", value_delimiter = ',')]
    #[serde(default)]
    pub ingress_hosts: Vec<String>,
}

use vkube_core::policy::scheduling::{DEFAULT_TENANT_NODE_LABELS, DEFAULT_TOLERABLE_TAINTS};

fn no_tolerations() -> String {
    "[]".into()
}
fn default_tolerable_taints() -> Vec<String> {
    DEFAULT_TOLERABLE_TAINTS.map(String::from).to_vec()
}
fn default_tenant_node_labels() -> Vec<String> {
    DEFAULT_TENANT_NODE_LABELS.map(String::from).to_vec()
}

impl Default for PolicyArgs {
    /// The flags' defaults (one place for them: clap's).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            policy: PolicyArgs,
        }
        <Flags as clap::Parser>::parse_from(["vkube"]).policy
    }
}

impl PolicyArgs {
    pub fn policy(&self) -> anyhow::Result<vkube_core::policy::Policy> {
        let list = |v: &[String]| v.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>();
        let node_selector = list(&self.host_node_selector)
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => anyhow::bail!("--host-node-selector: {kv:?} is not key=value"),
            })
            .collect::<anyhow::Result<_>>()?;
        let ingress_hosts = list(&self.ingress_hosts);
        if let Some(bad) = ingress_hosts.iter().find(|h| !vkube_core::policy::ingresses::is_host_pattern(h)) {
            anyhow::bail!(
                "--ingress-hosts: {bad:?} is neither a host name nor *.suffix, with CLASS= in front or not \
                 (e.g. *.team-a.example.com, internal=*.corp.example.com)"
            );
        }
        let cidrs = |flag: &str, v: &[String]| {
            list(v)
                .iter()
                .map(|c| c.parse().map_err(|_| anyhow::anyhow!("--{flag}: {c:?} is not a CIDR (e.g. 192.0.2.0/24)")))
                .collect::<anyhow::Result<Vec<ipnet::IpNet>>>()
        };
        let priority_classes = list(&self.priority_classes);
        if let Some(system) =
            priority_classes.iter().find(|c| c.starts_with(vkube_core::policy::scheduling::SYSTEM_PRIORITY_PREFIX))
        {
            anyhow::bail!(
                "--priority-classes: {system:?} is a built-in class the host admits in its kube-system namespace only; \
                 list classes of your own (kubectl create priorityclass NAME --value=N)"
            );
        }
        let endpoint_ranges = cidrs("endpoint-cidrs", &self.endpoint_cidrs)?;
        let egress_ranges = cidrs("egress-cidrs", &self.egress_cidrs)?;
        let tolerations = serde_json::from_str(&self.host_tolerations).with_context(|| {
            format!("--host-tolerations: {:?} is not a JSON list of tolerations", self.host_tolerations)
        })?;
        Ok(vkube_core::policy::Policy {
            pod_security: self.pod_security,
            allow_node_ports: self.allow_node_ports,
            allow_load_balancers: self.allow_load_balancers,
            load_balancer_classes: list(&self.load_balancer_classes),
            allow_node_port_choice: self.allow_node_port_choice,
            csi_drivers: list(&self.csi_drivers),
            storage: vkube_core::policy::Storage {
                classes: list(&self.storage_classes),
                attributes_classes: list(&self.volume_attributes_classes),
            },
            scheduling: vkube_core::policy::Scheduling {
                node_selector,
                tolerations,
                tolerable_taints: list(&self.tolerable_taints),
                tenant_node_labels: list(&self.tenant_node_labels),
                runtime_classes: list(&self.runtime_classes),
                priority_classes,
                bind_node_name: self.bind_node_name,
                virtual_scheduler: self.virtual_scheduler,
            },
            // `vkube run --service-cidr`: a fact about the host, not a choice of policy.
            service_ranges: vec![],
            endpoint_ranges,
            egress_ranges,
            ingresses: vkube_core::policy::ingresses::Ingresses {
                classes: list(&self.ingress_classes),
                hosts: ingress_hosts,
            },
        })
    }

    /// The same settings as `vkube run` flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![format!("--pod-security={}", self.pod_security.as_str())];
        if self.allow_node_ports {
            args.push("--allow-node-ports".into());
        }
        if self.allow_node_port_choice {
            args.push("--allow-node-port-choice".into());
        }
        if self.allow_load_balancers {
            args.push("--allow-load-balancers".into());
        }
        if self.bind_node_name {
            args.push("--bind-node-name".into());
        }
        if self.virtual_scheduler {
            args.push("--virtual-scheduler".into());
        }
        args.push(format!("--load-balancer-classes={}", self.load_balancer_classes.join(",")));
        args.push(format!("--csi-drivers={}", self.csi_drivers.join(",")));
        args.push(format!("--storage-classes={}", self.storage_classes.join(",")));
        args.push(format!("--volume-attributes-classes={}", self.volume_attributes_classes.join(",")));
        args.push(format!("--host-node-selector={}", self.host_node_selector.join(",")));
        args.push(format!("--host-tolerations={}", self.host_tolerations));
        args.push(format!("--tolerable-taints={}", self.tolerable_taints.join(",")));
        args.push(format!("--tenant-node-labels={}", self.tenant_node_labels.join(",")));
        args.push(format!("--runtime-classes={}", self.runtime_classes.join(",")));
        args.push(format!("--priority-classes={}", self.priority_classes.join(",")));
        args.push(format!("--verbatim-keys={}", self.verbatim_keys.join(",")));
        args.push(format!("--endpoint-cidrs={}", self.endpoint_cidrs.join(",")));
        args.push(format!("--egress-cidrs={}", self.egress_cidrs.join(",")));
        args.push(format!("--ingress-classes={}", self.ingress_classes.join(",")));
        args.push(format!("--ingress-hosts={}", self.ingress_hosts.join(",")));
        args
    }

    /// The same settings as the chart's values.
    pub fn to_helm_sets(&self) -> Vec<String> {
        // JSON for lists: `--set key={}` would be a list of one empty string.
        let list = |v: &[String]| {
            serde_json::to_string(&v.iter().filter(|s| !s.is_empty()).collect::<Vec<_>>()).unwrap_or_default()
        };
        vec![
            format!("--set=policy.podSecurity={}", self.pod_security.as_str()),
            format!("--set=policy.allowNodePorts={}", self.allow_node_ports),
            format!("--set=policy.allowLoadBalancers={}", self.allow_load_balancers),
            format!("--set=policy.allowNodePortChoice={}", self.allow_node_port_choice),
            format!("--set-json=policy.loadBalancerClasses={}", list(&self.load_balancer_classes)),
            format!("--set-json=policy.csiDrivers={}", list(&self.csi_drivers)),
            format!("--set-json=policy.storageClasses={}", list(&self.storage_classes)),
            format!("--set-json=policy.volumeAttributesClasses={}", list(&self.volume_attributes_classes)),
            format!("--set-json=policy.scheduling.tolerations={}", self.host_tolerations),
            format!("--set-json=policy.scheduling.tolerableTaints={}", list(&self.tolerable_taints)),
            format!("--set-json=policy.scheduling.tenantNodeLabels={}", list(&self.tenant_node_labels)),
            format!("--set-json=policy.scheduling.runtimeClasses={}", list(&self.runtime_classes)),
            format!("--set-json=policy.scheduling.priorityClasses={}", list(&self.priority_classes)),
            format!("--set=policy.scheduling.bindNodeName={}", self.bind_node_name),
            format!("--set=policy.scheduling.virtualScheduler={}", self.virtual_scheduler),
            format!("--set-json=policy.verbatimKeys={}", list(&self.verbatim_keys)),
            format!("--set-json=policy.endpointCIDRs={}", list(&self.endpoint_cidrs)),
            format!("--set-json=policy.egressCIDRs={}", list(&self.egress_cidrs)),
            format!("--set-json=policy.ingress.classes={}", list(&self.ingress_classes)),
            format!("--set-json=policy.ingress.hosts={}", list(&self.ingress_hosts)),
        ]
        .into_iter()
        .chain(
            self.host_node_selector
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| format!("--set-string=policy.scheduling.nodeSelector.{}={v}", k.replace('.', "\\."))),
        )
        .collect()
    }
}

/// What the syncer copies and how hard it works.
#[derive(clap::Args, Debug, Clone)]
pub struct SyncArgs {
    /// Copy every configmap to the host, not only those pods use.
    #[arg(long, env = "VKUBE_SYNC_ALL_CONFIGMAPS")]
    pub sync_all_configmaps: bool,
    /// Copy every secret to the host, not only those pods use.
    #[arg(long, env = "VKUBE_SYNC_ALL_SECRETS")]
    pub sync_all_secrets: bool,
    /// Provision every claim on the host, not only those pods use (a claim a pod has used is
    /// kept until it is deleted either way).
    #[arg(long, env = "VKUBE_SYNC_ALL_CLAIMS")]
    pub sync_all_claims: bool,
    /// Copy NetworkPolicies to the host, confined to this cluster's pods. They only add
    /// allowances: a tenant can then open its own pods as far as its policies say.
    #[arg(long, env = "VKUBE_SYNC_NETWORK_POLICIES")]
    pub sync_network_policies: bool,
    /// Copy PodDisruptionBudgets to the host, over this cluster's pods: the host's evictions
    /// (node drains, upgrades, autoscaler scale-downs) then respect them, and a budget allowing
    /// no disruption holds a drain up as long as it stands.
    #[arg(long, env = "VKUBE_SYNC_POD_DISRUPTION_BUDGETS")]
    pub sync_pod_disruption_budgets: bool,
    /// Show every host node the admin's node selector allows as a virtual node from the start
    /// (names, placement labels, capacity, conditions), not only those running this cluster's
    /// pods; DaemonSets then get a pod on each. Needs `list` on host nodes.
    #[arg(long, env = "VKUBE_SYNC_ALL_NODES")]
    pub sync_all_nodes: bool,
    #[arg(long, env = "VKUBE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Reconciles running at once, per kind.
    #[arg(long, env = "VKUBE_SYNC_CONCURRENCY", default_value_t = 16)]
    pub sync_concurrency: usize,
    /// Host writes per second this cluster may make (a token bucket: a tenant creating
    /// thousands of objects slows itself, not the host API server).
    #[arg(long, env = "VKUBE_HOST_QPS", default_value_t = NonZeroU32::new(100).expect("non-zero"))]
    pub host_qps: NonZeroU32,
    /// Host writes that may go at once after a quiet spell.
    #[arg(long, env = "VKUBE_HOST_BURST", default_value_t = NonZeroU32::new(200).expect("non-zero"))]
    pub host_burst: NonZeroU32,
    #[arg(long, env = "VKUBE_COREDNS_IMAGE", default_value = vkube_syncer::dns::DEFAULT_IMAGE)]
    pub coredns_image: String,
    /// Lifetime of the virtual service-account tokens pods get (at least 10m, the API server's
    /// minimum). Long by default, as a kubelet's are: deleting the pod is what voids its token.
    #[arg(long, env = "VKUBE_TOKEN_LIFETIME", default_value = "365d", value_parser = parse_positive_duration)]
    pub token_lifetime: Duration,
    /// A pod's token is renewed when less than this is left of its lifetime.
    #[arg(long, env = "VKUBE_TOKEN_RENEW_BEFORE", default_value = "30d", value_parser = parse_positive_duration)]
    pub token_renew_before: Duration,
    /// Where host pods read their tokens from: `secret` (a host Secret per pod, readable by
    /// whoever reads Secrets in the host namespace) or `annotation` (annotations of the host pod,
    /// read through the downward API: half the host writes per pod, but readable by whoever can
    /// read pods in the host namespace) or `bound-secret` (a host Secret per pod written once the
    /// pod is bound: its tokens name its node, as a kubelet's do; the pod starts typically 0.5 s later).
    #[arg(long, env = "VKUBE_TOKEN_DELIVERY", default_value = "secret")]
    pub token_delivery: vkube_syncer::context::TokenDelivery,
}

impl SyncArgs {
    /// The token settings, checked against each other and the API server's minimum.
    pub fn token_lifetime(&self) -> anyhow::Result<vkube_syncer::context::TokenLifetime> {
        let (lifetime, renew_before) = (self.token_lifetime, self.token_renew_before);
        anyhow::ensure!(
            lifetime >= Duration::from_secs(600),
            "--token-lifetime must be at least 10m (the API server refuses shorter tokens)"
        );
        anyhow::ensure!(
            renew_before + Duration::from_secs(60) <= lifetime,
            "--token-renew-before must be at least a minute shorter than --token-lifetime, or tokens would be renewed as soon as they are issued"
        );
        Ok(vkube_syncer::context::TokenLifetime { lifetime, renew_before })
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h, 7d"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        "d" => Ok(Duration::from_secs(n * 86_400)),
        _ => Err(format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h, 7d")),
    }
}

/// [`parse_duration`], more than zero (how often something runs).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} is no interval: give more than 0, e.g. 30s"));
    }
    Ok(d)
}

/// Certificates for the host Service's ClusterIP are only known once that Service exists.
pub async fn service_ip(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
) -> anyhow::Result<Option<std::net::IpAddr>> {
    let svc = Api::<Service>::namespaced(host.clone(), namespace).get_opt(&names::service(cluster)).await?;
    Ok(svc.and_then(|s| s.spec).and_then(|s| s.cluster_ip).and_then(|ip| ip.parse().ok()))
}

/// Deletes every host pod of the cluster (`vkube pause`, going to sleep), with `grace` seconds
/// if given; the next syncer recreates them from the virtual pods. Only its own copies (label and
/// ownership annotations), each the very pod listed: a pod the host's admin labelled alike stays.
/// A delete that fails (the host busy) is tried again, twice, after the others; the first error
/// is returned once every pod had its tries. Returns how many it deleted.
pub async fn remove_host_pods(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    grace: Option<u32>,
) -> kube::Result<usize> {
    use futures::StreamExt as _;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(host.clone(), namespace);
    let tr = Translator::new(cluster, namespace);
    let listed = pods.list_metadata(&kube::api::ListParams::default().labels(&tr.cluster_selector())).await?;
    let mut left = own_pods(&tr, listed.items.into_iter().map(|p| p.metadata));
    let (mut deleted, mut error) = (0, None);
    for round in 0..3 {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let exactly = vkube_kubeclient::delete::Exactly::Object;
        let results: Vec<_> = futures::stream::iter(left)
            .map(|meta| {
                let pods = pods.clone();
                async move {
                    let result = vkube_kubeclient::delete::delete_exactly(&pods, &meta, grace, exactly).await;
                    (meta, result)
                }
            })
            // The host write budget paces them; more at once would only queue there.
            .buffer_unordered(16)
            .collect()
            .await;
        left = vec![];
        for (meta, result) in results {
            match result {
                Ok(gone) => deleted += usize::from(gone),
                Err(e) => {
                    error = Some(e);
                    left.push(meta);
                }
            }
        }
        if left.is_empty() {
            return Ok(deleted);
        }
    }
    Err(error.expect("a failed delete left a pod"))
}

/// The cluster's own host pods among `listed` (its label and ownership annotations, of a Pod).
fn own_pods(tr: &Translator, listed: impl Iterator<Item = ObjectMeta>) -> Vec<ObjectMeta> {
    listed.filter(|meta| tr.owner(meta).is_some_and(|o| o.kind == "Pod")).collect()
}

/// A host Event on a cluster's control-plane Service, from `reporter` (a Warning when the
/// reason ends in `Failed`); a failure to record it is only logged.
pub async fn service_event(
    host: &kube::Client,
    reporter: &str,
    namespace: &str,
    cluster: &str,
    action: &str,
    reason: &str,
    note: &str,
) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(host.clone(), Reporter { controller: reporter.into(), instance: None });
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: Some(names::service(cluster)),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let event = Event {
        type_: if reason.ends_with("Failed") { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, reason, cluster, "could not record a host event");
    }
}

/// Whether the cluster is being resumed after `vkube pause` (and clears the mark, so a later
/// restart is an ordinary one).
async fn take_paused_mark(host: &kube::Client, namespace: &str, cluster: &str) -> anyhow::Result<bool> {
    let api = Api::<Service>::namespaced(host.clone(), namespace);
    let svc = api.get_opt(&names::service(cluster)).await?;
    let paused = svc.and_then(|s| s.metadata.annotations).is_some_and(|a| a.contains_key(names::ANNOTATION_PAUSED));
    if paused {
        let patch = vkube_kubeclient::patch::MetadataPatch::annotations([(names::ANNOTATION_PAUSED, None::<String>)]);
        api.patch(&names::service(cluster), &vkube_kubeclient::params::patch_params(), &Patch::Merge(&patch)).await?;
    }
    Ok(paused)
}

/// Loads (creating or renewing) the PKI and writes it to `cert_dir`. Returns the bundle and
/// whether any file changed.
pub async fn sync_pki(
    host: &kube::Client,
    namespace: &str,
    cluster: &str,
    cert_dir: &Path,
) -> anyhow::Result<(Bundle, bool)> {
    let spec = pki_store::spec(cluster, namespace, service_ip(host, namespace, cluster).await?);
    let (bundle, changes) = pki_store::ensure(host, namespace, cluster, &spec).await?;
    if !changes.is_empty() {
        tracing::info!(created = ?changes.created, renewed = ?changes.renewed, "certificates updated");
    }
    let written = write_cert_dir(cert_dir, &bundle)?;
    Ok((bundle, written))
}

/// Writes the bundle's files that differ, atomically (rename), owner-only. True if any changed.
pub fn write_cert_dir(dir: &Path, bundle: &Bundle) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut changed = false;
    for (name, text) in &bundle.files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|old| &old == text) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        vkube_kubeclient::write_private(&tmp, text)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// The admin kubeconfig, kept in a host Secret for CLIs and CI.
async fn publish_kubeconfig(host: &kube::Client, args: &RunArgs, bundle: &Bundle) -> anyhow::Result<()> {
    let yaml = admin_kubeconfig(&args.name, &args.endpoint, bundle);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names::kubeconfig_secret(&args.name)),
            labels: Some(names::labels(&args.name)),
            ..Default::default()
        },
        data: Some([(names::KUBECONFIG_KEY.to_string(), ByteString(yaml.into_bytes()))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(host.clone(), &args.namespace)
        .patch(
            &names::kubeconfig_secret(&args.name),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .context("publishing the admin kubeconfig Secret")?;
    Ok(())
}

pub fn admin_kubeconfig(cluster: &str, server: &str, bundle: &Bundle) -> String {
    let kc = vkube_pki::kubeconfig::with_client_cert(
        cluster,
        server,
        bundle.get("ca.crt").unwrap_or_default(),
        vkube_pki::kubeconfig::ClientCert {
            cert_pem: bundle.get("admin.crt").unwrap_or_default(),
            key_pem: bundle.get("admin.key").unwrap_or_default(),
        },
    );
    vkube_pki::kubeconfig::to_yaml(&kc)
}

/// A privileged client of the virtual API server (the control plane's own identity).
pub async fn virtual_admin(server: &str, bundle: &Bundle) -> anyhow::Result<kube::Client> {
    Ok(vkube_kubeclient::client::from_pem(
        server,
        bundle.get("ca.crt").unwrap_or_default(),
        bundle.get("controlplane.crt").unwrap_or_default(),
        bundle.get("controlplane.key").unwrap_or_default(),
    )
    .await?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    tracing::info!(cluster = %args.name, namespace = %args.namespace, "starting: files and certificates from the host");
    let tokens = args.sync.token_lifetime()?;
    let sleep_mode = args.sleep.sleep_after.is_some() || args.sleep.sleep_schedule.is_some();
    if sleep_mode && !args.supervise.supervise {
        anyhow::bail!(
            "--sleep-after and --sleep-schedule need --supervise: only a control plane that runs its upstream components can stop them"
        );
    }
    if args.supervise.supervise && args.service_cidr.is_empty() {
        anyhow::bail!(
            "--supervise needs --service-cidr (the host's service range, which the virtual API server allocates from)"
        );
    }
    // One bucket for every host write of this cluster: the syncer's and the proxy's.
    let rate = vkube_kubeclient::limit::WriteRate { qps: args.sync.host_qps, burst: args.sync.host_burst };
    let limit = vkube_kubeclient::limit::WriteLimit::new(rate);
    let host =
        vkube_kubeclient::client::host_limited(args.host_kubeconfig.as_deref(), args.host_context.as_deref(), &limit)
            .await
            .context("connecting to the host cluster")?;
    let bundle = if args.supervise.supervise {
        // Everything the children read, written here: nobody else prepares for them.
        prepare_files(&host, &args.name, &args.namespace, &args.cert_dir, &args.virtual_server, &args.policy).await?
    } else {
        sync_pki(&host, &args.namespace, &args.name, &args.cert_dir).await?.0
    };
    publish_kubeconfig(&host, &args, &bundle).await?;

    let admin = virtual_admin(&args.virtual_server, &bundle).await?;
    let api_ip = service_ip(&host, &args.namespace, &args.name).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "the host Service {}/{} in front of the proxy does not exist or has no ClusterIP; create the cluster with `vkube create`",
            args.namespace,
            names::service(&args.name)
        )
    })?;
    let resuming = take_paused_mark(&host, &args.namespace, &args.name).await?;
    if resuming {
        tracing::info!("resuming a paused cluster: host pods are recreated for every virtual pod");
    }
    let translator = Translator::new(&args.name, &args.namespace).with_verbatim_keys(args.policy.verbatim_keys.clone());
    let policy = vkube_core::policy::Policy { service_ranges: args.service_cidr.clone(), ..args.policy.policy()? };
    if policy.service_ranges.is_empty() {
        tracing::warn!("no --service-cidr: Services with a ClusterIP chosen by hand get one the host chooses instead");
    }

    let mut registry = Registry::default();
    limit.register(&mut registry);
    registry.register_collector(Box::new(allocator::AllocatorStats));
    let serving = ServingCert::new(
        bundle.get("apiserver.crt").unwrap_or_default(),
        bundle.get("apiserver.key").unwrap_or_default(),
    )?;
    let health = vkube_syncer::health::Health::default();
    // Supervised, requests are held until the components it starts answer.
    let initial = if args.supervise.supervise { Power::Waking } else { Power::Running };
    let (sleep, sleep_control) =
        vkube_apiproxy::sleep::Sleep::new(initial, args.sleep.sleep_counted_users.clone(), args.sleep.wake_timeout);
    let sleeping_hosts = match args.sleep.wake_listen {
        // Nothing to wake for where no Ingress reaches the host.
        Some(_) if !policy.ingresses.enabled() => None,
        Some(addr) if args.supervise.supervise => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} (--wake-listen)"))?;
            let hosts = ingress_wake::SleepingHosts::default();
            tokio::spawn(ingress_wake::serve(listener, sleep.clone(), hosts.clone()));
            Some(hosts)
        }
        Some(_) => anyhow::bail!("--wake-listen needs --supervise: only a control plane that can sleep can wake"),
        None => None,
    };
    match &args.sleep.ingress_metrics {
        Some(_) if !policy.ingresses.enabled() => {
            tracing::warn!("--ingress-metrics is ignored: no ingress class is allowed (--ingress-classes)")
        }
        Some(url) if args.supervise.supervise => {
            let every = ingress_activity::every(args.sleep.sleep_after);
            let (namespace, name) = (args.namespace.clone(), args.name.clone());
            let reads = ingress_activity::Reads::register(&mut registry);
            let counting =
                ingress_activity::count(url.clone(), every, host.clone(), namespace, name, sleep.clone(), reads);
            tokio::spawn(counting);
        }
        Some(_) => anyhow::bail!(
            "--ingress-metrics needs --supervise: activity matters only to a control plane that can sleep"
        ),
        None => {}
    }
    // `vkube snapshot`, `restore` and `reset` through the proxy, done by the power controller.
    let (ops_tx, ops_rx) = tokio::sync::mpsc::channel(4);
    let operations = args.supervise.supervise.then(|| {
        Arc::new(operations::Operations {
            ops: ops_tx,
            dir: args.supervise.state_dir.join("snapshots"),
            name: args.name.clone(),
            namespace: args.namespace.clone(),
            host: host.clone(),
            uploads: tokio::sync::Semaphore::new(1),
            downloads: Arc::new(tokio::sync::Semaphore::new(2)),
            max_full_percent: args.snapshots.snapshot_max_full_percent,
        })
    });
    if let (Some(ops), Some(every)) = (&operations, args.snapshots.snapshot_schedule) {
        tokio::spawn(ops.clone().schedule(every, args.snapshots.snapshot_keep, sleep_control.power.subscribe()));
    } else if args.snapshots.snapshot_schedule.is_some() {
        anyhow::bail!("--snapshot-schedule needs --supervise: only a control plane that runs etcd can snapshot it");
    }
    let proxy = Proxy::new(
        ProxyConfig {
            translator: translator.clone(),
            policy: policy.clone(),
            virtual_server: args.virtual_server.parse().context("--virtual-server")?,
            virtual_ca_pem: bundle.get("ca.crt").unwrap_or_default().into(),
            front_proxy_cert_pem: bundle.get("front-proxy-client.crt").unwrap_or_default().into(),
            front_proxy_key_pem: bundle.get("front-proxy-client.key").unwrap_or_default().into(),
            admin: admin.clone(),
            host: host.clone(),
            serving: serving.clone(),
            ready: {
                let health = health.clone();
                Arc::new(move || health.check())
            },
            live: {
                let health = health.clone();
                Arc::new(move || health.alive())
            },
            limits: args.proxy.limits(),
            sleep,
            operations: operations.as_ref().map(operations::Operations::handler),
        },
        &mut registry,
    )?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        cluster = %args.name,
        namespace = %args.namespace,
        after_seconds = started.elapsed().as_secs_f64(),
        "control plane serving"
    );

    let renew = tokio::spawn(renew_loop(host.clone(), args.clone(), serving));
    let host_services: vkube_syncer::SharedStore<Service> = Default::default();
    let kubelet_ca = |file: &str| {
        bundle.get(file).ok_or_else(|| {
            anyhow::anyhow!("the certificates have no {file} (made at start: restart the control plane)")
        })
    };
    let ca = crate::pki_store::KUBELET_CA;
    let kubelet = vkube_apiproxy::kubelet::Kubelet::new(
        proxy.clone(),
        kubelet_ca(&format!("{ca}.crt"))?,
        kubelet_ca(&format!("{ca}.key"))?,
    )?;
    let shown_nodes: vkube_syncer::SharedNodes = Default::default();
    let metrics_api = vkube_apiproxy::resource_metrics::ResourceMetrics::new(
        proxy.clone(),
        kubelet_ca(&format!("{ca}.crt"))?,
        kubelet_ca(&format!("{ca}.key"))?,
        kubelet_ca("front-proxy-ca.crt")?,
        {
            let shown = shown_nodes.clone();
            Arc::new(move || {
                shown.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.names()).unwrap_or_default()
            })
        },
    )?;
    let in_process = vkube_apiproxy::egress::InProcess { kubelet, metrics: metrics_api };
    let egress = tokio::spawn(serve_egress(args.clone(), host_services.clone(), in_process));
    let options = vkube_syncer::context::Options {
        cluster_domain: args.sync.cluster_domain.clone(),
        sync_all_configmaps: args.sync.sync_all_configmaps,
        sync_all_secrets: args.sync.sync_all_secrets,
        sync_all_claims: args.sync.sync_all_claims,
        sync_network_policies: args.sync.sync_network_policies,
        sync_pod_disruption_budgets: args.sync.sync_pod_disruption_budgets,
        // The virtual scheduler places pods on the nodes it is shown.
        sync_all_nodes: args.sync.sync_all_nodes || args.policy.virtual_scheduler,
        concurrency: args.sync.sync_concurrency.max(1),
        api_ip: api_ip.to_string(),
        recreate_lost_pods: resuming,
        proxy_service: Some(names::service(&args.name)),
        tokens,
        token_delivery: args.sync.token_delivery,
    };
    let metrics = vkube_syncer::Metrics::register(&mut registry);
    let coredns_image = args.sync.coredns_image.clone();
    let resource_metrics_ca = kubelet_ca(&format!("{ca}.crt"))?.to_string();
    let syncer_health = health.clone();
    let power_health = health.clone();
    let config: ConfigFactory = Arc::new(move |host, virt, recreate_lost_pods| vkube_syncer::Config {
        translator: translator.clone(),
        policy: policy.clone(),
        options: vkube_syncer::context::Options { recreate_lost_pods, ..options.clone() },
        virt,
        host,
        coredns_image: coredns_image.clone(),
        resource_metrics_ca: resource_metrics_ca.clone(),
        metrics: metrics.clone(),
        health: syncer_health.clone(),
        host_services: host_services.clone(),
        shown_nodes: shown_nodes.clone(),
    });
    let mut syncer = SpawnedSyncer { args: args.clone(), bundle: bundle.clone(), limit, health, config, running: None };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let accounting = tokio::spawn(
        usage::Tracker {
            host: host.clone(),
            name: args.name.clone(),
            namespace: args.namespace.clone(),
            power: sleep_control.power.subscribe(),
            activity: sleep_control.activity.clone(),
            metrics: usage::UsageMetrics::register(&mut registry),
            args: args.usage.clone(),
        }
        .run(shutdown_tx.subscribe()),
    );
    let controlled = if args.supervise.supervise {
        let supervisor = supervisor::Supervisor::new(
            &args.supervise.state_dir,
            supervisor::SupervisorMetrics::register(&mut registry),
        )?;
        let cidr = args.service_cidr.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let apiserver_port = args.virtual_server.parse::<http::Uri>().ok().and_then(|u| u.port_u16()).unwrap_or(6443);
        let etcd = etcd::EtcdData {
            data_dir: supervisor::etcd_data_dir(&args.supervise),
            etcdutl: args.supervise.etcdutl_binary.clone(),
            client_port: args.supervise.etcd_client_port,
            peer_port: args.supervise.etcd_peer_port,
        };
        etcd.recover()?;
        operations::remove_leftovers(&args.supervise.state_dir.join("snapshots"));
        // Once only: a later reset leaves the data directory empty again, and must stay a reset.
        let consumed = args.supervise.state_dir.join("initial-snapshot.done");
        let forked = match &args.supervise.initial_snapshot {
            Some(file) if !consumed.exists() && !etcd.data_dir.join("member").exists() => {
                operations::initial_state(&etcd, file, &args.name, &args.supervise.state_dir).await?;
                std::fs::write(&consumed, file.display().to_string()).context("recording the initial snapshot")?;
                true
            }
            _ => false,
        };
        let controller = power::PowerController {
            host: host.clone(),
            admin: admin.clone(),
            name: args.name.clone(),
            namespace: args.namespace.clone(),
            ctl: sleep_control,
            supervisor,
            children: supervisor::children(
                &args.supervise,
                &args.cert_dir,
                apiserver_port,
                &cidr,
                args.policy.virtual_scheduler,
            ),
            syncer,
            args: args.sleep.clone(),
            metrics: power::PowerMetrics::register(&mut registry),
            syncer_health: power_health,
            ports: vec![
                (args.supervise.etcd_client_port, "etcd clients"),
                (args.supervise.etcd_peer_port, "etcd peers"),
                (apiserver_port, "kube-apiserver"),
            ],
            pods_removed: false,
            etcd,
            ops: ops_rx,
            sleeping_hosts,
            redirect_retry: None,
        };
        let mut controller = controller;
        if forked {
            // Its virtual pods have no host pods yet: made, as after a sleep, until a syncer has
            // seen them all (a crash before that must not take them for lost).
            controller.mark_pods_removed().await;
        }
        let initial = controller.persisted().await?;
        tokio::spawn(controller.run(initial, resuming, shutdown_rx))
    } else {
        drop(sleep_control);
        wait_virtual_ready(&admin, Duration::from_millis(200)).await?;
        syncer.start(resuming)?;
        tokio::spawn(async move {
            let mut shutdown = shutdown_rx;
            let _ = shutdown.wait_for(|s| *s).await;
            syncer.stop().await;
            Ok(())
        })
    };
    let registry = Arc::new(registry);
    // SIGTERM reaches the components at once: open watches and exec sessions, which the proxy's
    // drain waits for, must not keep them from stopping.
    let signalled = shutdown_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signalled.send(true);
    });
    let mut draining = shutdown_tx.subscribe();
    let serving = tokio::spawn(proxy.serve(listener, registry, async move {
        let _ = draining.wait_for(|s| *s).await;
    }));
    let ended = controlled.await;
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), serving).await.is_err() {
        tracing::info!("connections still open 5 s after shutdown; closing them");
    }
    if tokio::time::timeout(Duration::from_secs(5), accounting).await.is_err() {
        tracing::warn!("the usage ledger could not be written within 5 s of shutdown");
    }
    renew.abort();
    egress.abort();
    match ended {
        Ok(Ok(())) => {
            tracing::info!("control plane stopped");
            Ok(())
        }
        Ok(Err(e)) => Err(e.context("the control plane's components failed")),
        Err(e) => Err(anyhow::anyhow!("the control plane's supervisor task failed: {e}")),
    }
}

/// The virtual API server's way out (`vkube_apiproxy::egress`): only to this cluster's own host
/// Services (their ClusterIPs and ports), as the syncer's store of them says (none until the
/// syncer has made it), and to the virtual nodes' kubelet and the resource metrics API, which
/// vkube serves itself.
async fn serve_egress(
    args: RunArgs,
    services: vkube_syncer::SharedStore<Service>,
    in_process: vkube_apiproxy::egress::InProcess,
) {
    let allowed: vkube_apiproxy::egress::Allowed = Arc::new(move |addr: SocketAddr| {
        let services = services.read().unwrap_or_else(|e| e.into_inner());
        let Some(store) = services.as_ref() else { return false };
        let ip = addr.ip().to_string();
        store.state().iter().any(|s| {
            let Some(spec) = s.spec.as_ref() else { return false };
            spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()).any(|c| *c == ip)
                && spec.ports.iter().flatten().any(|p| p.port == i32::from(addr.port()))
        })
    });
    let socket = args.cert_dir.join(EGRESS_SOCKET);
    if let Err(e) = vkube_apiproxy::egress::serve(&socket, allowed, in_process).await {
        tracing::error!(error = %e, socket = %socket.display(), "the virtual API server's egress proxy stopped: webhooks, aggregated APIs, exec and port-forward fail until a restart");
    }
}

/// The syncer's configuration for a run (its clients, and whether it recreates lost host pods).
type ConfigFactory = Arc<dyn Fn(kube::Client, kube::Client, bool) -> vkube_syncer::Config + Send + Sync>;

/// The syncer on its own runtime and threads, with its own clients: a burst of sync work never
/// delays the proxy's requests (the OS shares the cores between the two fairly). Stopped and
/// started again around a sleep.
struct SpawnedSyncer {
    args: RunArgs,
    bundle: Bundle,
    limit: vkube_kubeclient::limit::WriteLimit,
    health: vkube_syncer::health::Health,
    config: ConfigFactory,
    running: Option<(tokio::sync::watch::Sender<bool>, std::thread::JoinHandle<()>)>,
}

impl power::SyncerRunner for SpawnedSyncer {
    fn start(&mut self, recreate_lost_pods: bool) -> anyhow::Result<()> {
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("syncer").enable_all().build()?;
        let (args, bundle, limit, health, config) =
            (self.args.clone(), self.bundle.clone(), self.limit.clone(), self.health.clone(), self.config.clone());
        health.restart();
        let thread = std::thread::Builder::new().name("syncer".into()).spawn(move || {
            // However the thread ends unasked (a panic included), `/readyz` says so from then on.
            struct OnExit(vkube_syncer::health::Health, tokio::sync::watch::Receiver<bool>);
            impl Drop for OnExit {
                fn drop(&mut self) {
                    if !*self.1.borrow() {
                        self.0.stopped("its thread ended");
                    }
                }
            }
            let _on_exit = OnExit(health.clone(), stop.clone());
            rt.block_on(async move {
                let clients = async {
                    let host = vkube_kubeclient::client::host_limited(
                        args.host_kubeconfig.as_deref(),
                        args.host_context.as_deref(),
                        &limit,
                    )
                    .await?;
                    let virt = virtual_admin(&args.virtual_server, &bundle).await?;
                    anyhow::Ok((host, virt))
                };
                let (host, virt) = match clients.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "the syncer could not build its clients");
                        health.stopped(format!("could not build its clients: {e}"));
                        return;
                    }
                };
                // A stopped syncer has logged why and told `health`.
                let _ = vkube_syncer::run(config(host, virt, recreate_lost_pods), async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            })
        })?;
        self.running = Some((stop_tx, thread));
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(true);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Waits (polling `every`) until the virtual API server answers its `/readyz`.
async fn wait_virtual_ready(admin: &kube::Client, every: Duration) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(120);
    vkube_kubeclient::wait::until(timeout, every, || async {
        let req = http::Request::get("/readyz").body(vec![]).map_err(|e| e.to_string())?;
        admin.request_text(req).await.map(|_| Some(())).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| anyhow::anyhow!("the virtual API server did not become ready within {} s: {e}", timeout.as_secs()))
}

/// Renews certificates well before they expire, and applies at once what `vkube certs rotate`
/// writes to the PKI Secret (watched by name): the API server reloads its files, the proxy swaps
/// its serving certificate, the kubeconfig Secret is republished.
async fn renew_loop(host: kube::Client, args: RunArgs, serving: Arc<ServingCert>) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let mut tick = tokio::time::interval(args.renew_every);
    tick.tick().await;
    let secrets: Api<Secret> = Api::namespaced(host.clone(), &args.namespace);
    let by_name =
        kube::runtime::watcher::Config::default().fields(&format!("metadata.name={}", names::pki_secret(&args.name)));
    // Every change of the Secret (and the watch's first list, which the start already applied).
    let mut changed = kube::runtime::watcher(secrets, by_name)
        .default_backoff()
        .filter(|e| std::future::ready(matches!(e, Ok(kube::runtime::watcher::Event::Apply(_)))))
        .boxed();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(_) = changed.next() => {}
        }
        match sync_pki(&host, &args.namespace, &args.name, &args.cert_dir).await {
            Ok((bundle, true)) => {
                if let Err(e) = serving.replace(
                    bundle.get("apiserver.crt").unwrap_or_default(),
                    bundle.get("apiserver.key").unwrap_or_default(),
                ) {
                    tracing::error!(error = %e, "renewed serving certificate unusable");
                }
                if let Err(e) = publish_kubeconfig(&host, &args, &bundle).await {
                    tracing::error!(error = %e, "republishing the kubeconfig failed");
                }
            }
            Ok((_, false)) => {}
            Err(e) => tracing::error!(error = %e, "certificate renewal failed; retrying at the next interval"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn only_the_clusters_own_pods_are_removed() {
        let tr = Translator::new("a", "vkube-a");
        let copy = |name: &str| ObjectMeta {
            name: Some(name.into()),
            ..tr.host_meta(
                "Pod",
                &ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("default".into()),
                    uid: Some("u".into()),
                    ..Default::default()
                },
            )
        };
        let labelled_only = ObjectMeta { name: Some("admins".into()), labels: copy("x").labels, ..Default::default() };
        let other_kind = ObjectMeta { annotations: tr.host_meta("ConfigMap", &copy("y")).annotations, ..copy("y") };
        let other_cluster = Translator::new("b", "vkube-a").host_meta(
            "Pod",
            &ObjectMeta {
                name: Some("z".into()),
                namespace: Some("default".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
        );
        let own = own_pods(&tr, [copy("web"), labelled_only, other_kind, other_cluster].into_iter());
        assert_eq!(own.iter().map(|m| m.name.as_deref().unwrap_or_default()).collect::<Vec<_>>(), ["web"]);
    }

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    #[test]
    fn policy_flags_round_trip_and_default_safe() {
        let default = PolicyArgs::default().policy().unwrap();
        assert_eq!(default.scheduling, vkube_core::policy::Scheduling::default());
        assert!(default.csi_drivers.is_empty());
        let args = PolicyArgs {
            csi_drivers: vec!["secrets-store.csi.k8s.io".into()],
            host_node_selector: vec!["pool=tenants".into()],
            host_tolerations: r#"[{"key":"dedicated","operator":"Exists"}]"#.into(),
            tolerable_taints: vec![],
            runtime_classes: vec!["gvisor".into()],
            priority_classes: vec!["batch".into()],
            bind_node_name: true,
            virtual_scheduler: true,
            ingress_classes: vec!["web".into()],
            ingress_hosts: vec!["*.team-a.example.com".into(), "internal=shop.example.com".into()],
            endpoint_cidrs: vec!["192.0.2.0/24".into()],
            egress_cidrs: vec!["203.0.113.0/24".into()],
            load_balancer_classes: vec!["example.com/internal".into()],
            storage_classes: vec!["fast".into()],
            volume_attributes_classes: vec!["gold".into()],
            ..PolicyArgs::default()
        };
        let flags: Vec<String> = std::iter::once("vkube".to_string()).chain(args.to_args()).collect();
        let again = <Flags as clap::Parser>::parse_from(flags).policy.policy().unwrap();
        assert_eq!(again.csi_drivers, ["secrets-store.csi.k8s.io"]);
        assert_eq!(again.scheduling.node_selector["pool"], "tenants");
        assert_eq!(again.scheduling.tolerations[0].key.as_deref(), Some("dedicated"));
        assert!(again.scheduling.bind_node_name && again.scheduling.virtual_scheduler);
        assert!(again.scheduling.tolerable_taints.is_empty(), "an empty list stays empty, not the default");
        assert_eq!(again.scheduling.runtime_classes, ["gvisor"]);
        assert_eq!(again.scheduling.priority_classes, ["batch"]);
        let system = PolicyArgs { priority_classes: vec!["system-node-critical".into()], ..PolicyArgs::default() };
        assert!(system.policy().unwrap_err().to_string().contains("--priority-classes: \"system-node-critical\""));
        assert_eq!(again.ingresses.classes, ["web"]);
        assert_eq!(again.ingresses.hosts, ["*.team-a.example.com", "internal=shop.example.com"]);
        assert!(!default.ingresses.enabled(), "no ingress reaches the host unless the admin says so");
        assert_eq!(
            again.storage,
            vkube_core::policy::Storage { classes: vec!["fast".into()], attributes_classes: vec!["gold".into()] }
        );
        assert_eq!(default.storage, vkube_core::policy::Storage::default(), "the host's default class only");
        assert_eq!(again.endpoint_ranges, ["192.0.2.0/24".parse::<ipnet::IpNet>().unwrap()]);
        assert!(default.endpoint_ranges.is_empty(), "no address by hand reaches the host unless the admin says so");
        let cidr = PolicyArgs { endpoint_cidrs: vec!["192.0.2.0".into()], ..PolicyArgs::default() };
        assert!(cidr.policy().unwrap_err().to_string().contains("--endpoint-cidrs"));
        assert_eq!(again.load_balancer_classes, ["example.com/internal"]);
        assert_eq!(again.egress_ranges, ["203.0.113.0/24".parse::<ipnet::IpNet>().unwrap()]);
        let cidr = PolicyArgs { egress_cidrs: vec!["0.0.0.0".into()], ..PolicyArgs::default() };
        assert!(cidr.policy().unwrap_err().to_string().contains("--egress-cidrs"));
        let bad = PolicyArgs { host_node_selector: vec!["pool".into()], ..PolicyArgs::default() };
        assert!(bad.policy().unwrap_err().to_string().contains("key=value"));
        let everything = PolicyArgs { ingress_hosts: vec!["*".into()], ..PolicyArgs::default() };
        assert!(everything.policy().unwrap_err().to_string().contains("--ingress-hosts: \"*\""));
    }
}
