//! The Helm chart (charts/vkube) with the pinned helm and kubectl: it lints, its schema refuses
//! bad values, what it renders (default and non-default values) is accepted by a real host API
//! server, its one container runs `vkube run --supervise` with env vars it understands, its image
//! carries the pinned upstream versions, and its pod, run as a local process with the chart's
//! own ServiceAccount, is a working virtual cluster (so the Role holds enough). The pod run by a
//! real kubelet is tested in realnode.rs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::Value;
use vkube::names;
use vkube_e2e::{TestEnv, eventually, kubectl, kubectl_ok, kubectl_stdin, vkube_bin};
use vkube_localenv::host::dump_logs;
use vkube_localenv::{Lifetime, ProcessGroup, ProcessSpec, Upstream, ports};
use vkube_syncer::naming::Translator;

const NAME: &str = "team-a";
const NS: &str = "vkube-team-a";
const CIDR: &str = "10.96.0.0/16";

/// The chart's layout inside the pod (charts/vkube/templates/statefulset.yaml).
const CERT_DIR: &str = "/pki";
const STATE_DIR: &str = "/data";
const APISERVER: u16 = 6443;
const PROXY: u16 = 8443;
/// The chart's ports must be the ones the code names (`ingress_wake`).
const WAKE: u16 = vkube::controlplane::ingress_wake::POD_PORT as u16;

/// Every setting changed from its default.
const NON_DEFAULT_VALUES: &str = r#"
serviceCIDR: 10.96.0.0/16
policy:
  podSecurity: restricted
  allowNodePorts: true
  allowLoadBalancers: true
  endpointCIDRs: [192.0.2.0/24, "2001:db8::/64"]
  storageClasses: [fast-ssd]
  volumeAttributesClasses: [gold]
  loadBalancerClasses: [example.com/internal]
  egressCIDRs: [203.0.113.0/24]
  scheduling:
    priorityClasses: [batch]
    runtimeClasses: [gvisor]
  ingress:
    classes: [web, internal]
    hosts: ["*.team-a.example.com", internal=shop.example.com]
sync:
  allConfigMaps: true
  allSecrets: true
  networkPolicies: true
  concurrency: 4
  coreDNSImage: registry.example.com/mirror/coredns:v1.12.4
quota:
  enabled: true
  hard:
    pods: 20
    requests.cpu: "4"
    limits.memory: 24Gi
    services.nodeports: "2"
limitRange:
  enabled: true
  limits:
    - type: Container
      default: {cpu: 250m, memory: 256Mi}
      defaultRequest: {cpu: 50m, memory: 64Mi}
      max: {memory: 8Gi}
    - type: PersistentVolumeClaim
      max: {storage: 50Gi}
rbac:
  readHostNodes: false
service:
  type: LoadBalancer
  annotations:
    example.com/load-balancer: internal
persistence:
  size: 20Gi
  storageClassName: fast-ssd
images:
  vkube:
    repository: registry.example.com/vkube
    tag: dev
  pullPolicy: Always
imagePullSecrets:
  - name: regcred
resources:
  requests: {cpu: 1, memory: 1Gi}
  limits: {cpu: 2, memory: 3Gi}
goRuntime: {GOGC: "100", GOMAXPROCS: "2"}
sleep:
  after: 30m
  schedule: Mon-Fri 19:00-08:00 Europe/Berlin
  ingressMetrics: http://traefik-metrics.traefik:9100/metrics
snapshots:
  schedule: 6h
  keep: 3
serviceNodePortRange: 31000-31999
logFilter: debug
logFormat: json
podAnnotations:
  example.com/team: a
nodeSelector:
  kubernetes.io/os: linux
tolerations:
  - key: dedicated
    operator: Equal
    value: vkube
    effect: NoSchedule
affinity:
  nodeAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 1
        preference:
          matchExpressions:
            - {key: node-role.example.com/control-planes, operator: Exists}
"#;

// ---------------------------------------------------------------------------------------------
// helm lint and the schema

#[test]
fn helm_lint_passes_with_the_defaults_and_template_asks_for_the_service_cidr() {
    let up = upstream();
    let values = values_file(NON_DEFAULT_VALUES);
    for extra in [vec!["--set", "serviceCIDR=10.96.0.0/16"], vec!["-f", path_str(values.path())]] {
        let started = Instant::now();
        let out = helm(&up, &[&["lint", "--strict", &chart_str()], &extra[..]].concat());
        assert!(out.status.success(), "helm lint {extra:?} failed:\n{}", text(&out));
        assert!(text(&out).contains("1 chart(s) linted, 0 chart(s) failed"), "{}", text(&out));
        eprintln!("helm lint {extra:?}: {:.2} s", started.elapsed().as_secs_f64());
    }

    // The defaults lint: the service range is looked up at install time.
    let out = helm(&up, &["lint", "--strict", &chart_str()]);
    assert!(out.status.success(), "helm lint with the defaults failed:\n{}", text(&out));
    // `helm template` cannot look it up: a clear error that says how to give it.
    let out = template_out(&up, NAME, &[]);
    assert!(!out.status.success(), "helm template without serviceCIDR must fail:\n{}", text(&out));
    assert!(text(&out).contains("--set serviceCIDR="), "the error says what to do: {}", text(&out));
}

#[test]
fn the_schema_refuses_invalid_values() {
    let up = upstream();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "policy.podSecurity=none"],
            "at '/policy/podSecurity': value must be one of 'privileged', 'baseline', 'restricted'",
        ),
        (&["--set", "policy.allowNodePorts=maybe"], "at '/policy/allowNodePorts': got string, want boolean"),
        (&["--set", "serviceCIDR=10.96.0.0"], "at '/serviceCIDR': '10.96.0.0' does not match pattern"),
        (&["--set", "serviceCIDR=10.300.0.0/16"], "at '/serviceCIDR': '10.300.0.0/16' does not match pattern"),
        (&["--set", "serviceCIDR=10.96.0.0/33"], "at '/serviceCIDR': '10.96.0.0/33' does not match pattern"),
        (&["--set", "serviceCIDR=fd00::/108"], "at '/serviceCIDR'"),
        (
            &["--set", "service.type=ExternalName"],
            "at '/service/type': value must be one of 'ClusterIP', 'NodePort', 'LoadBalancer'",
        ),
        (&["--set", "sync.concurrency=0"], "at '/sync/concurrency': minimum: got 0, want 1"),
        (&["--set", "sync.concurrency=many"], "at '/sync/concurrency': got string, want integer"),
        (&["--set", "quota.hard.pods=lots"], "at '/quota/hard/pods'"),
        (&["--set", "persistence.size=big"], "at '/persistence/size'"),
        (&["--set", "resources.limits.memory=1GB"], "at '/resources/limits/memory'"),
        (&["--set", "sleep.after=half an hour"], "at '/sleep/after'"),
        (&["--set", "sleep.ingressMetrics=https://traefik:9100/metrics"], "at '/sleep/ingressMetrics'"),
        (&["--set", "limitRange.limits[0].type=Namespace"], "at '/limitRange/limits/0/type'"),
        (&["--set", "images.pullPolicy=Sometimes"], "at '/images/pullPolicy'"),
        (&["--set", "logFormat=xml"], "at '/logFormat'"),
        // Only Go runtime settings reach the components through goRuntime.
        (&["--set", "goRuntime.VKUBE_NAME=other"], "'VKUBE_NAME' does not match pattern '^GO[A-Z]+$'"),
        // A number would be rendered as a float ("1e+09"), which the Go runtime misreads.
        (&["--set", "goRuntime.GOMEMLIMIT=1073741824"], "at '/goRuntime/GOMEMLIMIT': got number, want string"),
        // A misspelt key is not silently ignored.
        (&["--set", "policy.podsecurity=restricted"], "at '/policy': additional properties 'podsecurity' not allowed"),
        (&["--set-json", "policy.ingress.hosts=[\"*\"]"], "at '/policy/ingress/hosts/0'"),
        (&["--set-json", "policy.endpointCIDRs=[\"192.0.2.10\"]"], "at '/policy/endpointCIDRs/0'"),
        (&["--set-json", "policy.egressCIDRs=[\"0.0.0.0\"]"], "at '/policy/egressCIDRs/0'"),
        // The host admits the built-in classes in its kube-system only.
        (
            &["--set-json", "policy.scheduling.priorityClasses=[\"system-node-critical\"]"],
            "at '/policy/scheduling/priorityClasses/0'",
        ),
        (&["--set-json", "policy.ingress.hosts=[\"web=*\"]"], "at '/policy/ingress/hosts/0'"),
        (&["--set", "polcy.podSecurity=restricted"], "additional properties 'polcy' not allowed"),
    ];
    for (args, want) in cases {
        let out = template_out(&up, NAME, &[&["--set", "serviceCIDR=10.96.0.0/16"], *args].concat());
        assert!(!out.status.success(), "{args:?} must be refused, rendered:\n{}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: want {want:?} in:\n{}", text(&out));
    }

    // The release name is the virtual cluster's name: a DNS label of at most 52 characters
    // (helm itself allows dots and 53).
    let long = "a".repeat(53);
    for (name, want) in [("team.a", "must be a DNS label"), (long.as_str(), "must be at most 52 characters")] {
        let out = template_out(&up, name, &["--set", "serviceCIDR=10.96.0.0/16"]);
        assert!(!out.status.success(), "release name {name:?} must be refused");
        assert!(text(&out).contains(want), "{name:?}: want {want:?} in:\n{}", text(&out));
    }
    let ok = "a".repeat(52);
    let out = template_out(&up, &ok, &["--set", "serviceCIDR=10.96.0.0/16"]);
    assert!(out.status.success(), "a 52-character name is fine:\n{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// The real host API server accepts what the chart renders

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_manifests_are_accepted_by_the_host_api_server() {
    let env = TestEnv::start(1).await;
    let up = &env.upstream;
    env.kubectl_ok(&["create", "namespace", NS]);
    let values = values_file(NON_DEFAULT_VALUES);

    let common = ["serviceaccount", "role.rbac.authorization.k8s.io", "rolebinding.rbac.authorization.k8s.io"];
    let cluster_wide = ["clusterrole", "clusterrolebinding"]
        .map(|k| format!("{k}.rbac.authorization.k8s.io/vkube:{NS}:{NAME}"))
        .to_vec();
    let (quota, limits) = (format!("resourcequota/vkube-{NAME}"), format!("limitrange/vkube-{NAME}"));
    let mut defaults = cluster_wide.clone();
    defaults.push(quota.clone());
    let cases = [
        DryRun {
            what: "default values",
            args: vec!["--set", "serviceCIDR=10.96.0.0/16"],
            // The quota is on by default; limit-range defaults are the admin's choice.
            present: defaults,
            absent: vec![limits.clone()],
        },
        DryRun {
            what: "non-default values",
            args: vec!["-f", path_str(values.path())],
            // No node reads, but `get` on the listed StorageClass.
            present: [vec![quota, limits], cluster_wide].concat(),
            absent: vec![],
        },
    ];
    for DryRun { what, args, present, absent } in cases {
        let yaml = template(up, &args);
        let started = Instant::now();
        let out = kubectl_stdin(
            up,
            &env.host.kubeconfig,
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
            &yaml,
        );
        assert!(
            out.status.success(),
            "{what}: kubectl apply --dry-run=server failed:\n{}\n--- manifest ---\n{yaml}",
            text(&out)
        );
        eprintln!("{what}: server dry run in {:.2} s", started.elapsed().as_secs_f64());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.trim().is_empty(), "{what}: the host warns about the manifests:\n{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let mut want: Vec<String> = common.iter().map(|k| format!("{k}/vkube-{NAME}")).collect();
        want.extend([format!("service/{NAME}"), format!("statefulset.apps/{NAME}")]);
        want.extend(present);
        for w in &want {
            assert!(stdout.contains(&format!("{w} created (server dry run)")), "{what}: {w} missing in:\n{stdout}");
        }
        for a in &absent {
            assert!(!stdout.contains(a.as_str()), "{what}: {a} must not be rendered:\n{stdout}");
        }
    }

    let objects = to_json(up, &template(up, &["-f", path_str(values.path())]));
    let rules = &find(&objects, "ClusterRole", &format!("vkube:{NS}:{NAME}"))["rules"];
    assert_eq!(
        rules,
        &serde_json::json!([
            {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "resourceNames": ["fast-ssd"], "verbs": ["get"]},
            {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"], "resourceNames": ["batch"], "verbs": ["get"]},
            {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "resourceNames": ["gvisor"], "verbs": ["get"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["ingressclasses"], "resourceNames": ["web", "internal"], "verbs": ["get"]},
        ]),
        "readHostNodes off: only the listed classes"
    );
    let objects = to_json(
        up,
        &template(up, &["--set", "serviceCIDR=10.96.0.0/16", "--set", "policy.scheduling.virtualScheduler=true"]),
    );
    let rules = &find(&objects, "ClusterRole", &format!("vkube:{NS}:{NAME}"))["rules"];
    assert_eq!(
        rules,
        &serde_json::json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]},
            {"apiGroups": ["metrics.k8s.io"], "resources": ["nodes"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get"]},
        ]),
        "a virtual scheduler lists nodes and reads the node affinity of volumes"
    );

    // A plain `helm install` with no values: the service range is the host's, looked up.
    let cidr = vkube::local::host_service_cidr(&env.client().await).await.expect("host service range");
    let (release, ns) = ("team-a", "vkube-team-a");
    let kubeconfig = path_str(&env.host.kubeconfig);
    let install = ["install", release, &chart_str(), "-n", ns, "--create-namespace", "--kubeconfig", kubeconfig];
    let out = helm(up, &install);
    assert!(out.status.success(), "plain helm install failed:\n{}", text(&out));
    let range = env.kubectl_ok(&[
        "get",
        "statefulset",
        release,
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[?(@.name=='VKUBE_SERVICE_CIDR')].value}",
    ]);
    assert_eq!(range, cidr, "the host's range looked up at install");
    let out = helm(up, &["uninstall", release, "-n", ns, "--kubeconfig", kubeconfig]);
    assert!(out.status.success(), "helm uninstall failed:\n{}", text(&out));
}

/// A rendering and the objects it must and must not contain.
struct DryRun<'a> {
    what: &'static str,
    args: Vec<&'a str>,
    present: Vec<String>,
    absent: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The chart is in step with the Rust code

#[test]
fn the_chart_runs_the_command_lines_and_settings_of_the_rust_code() {
    let up = upstream();
    let values = values_file(NON_DEFAULT_VALUES);
    let run_help = help(&["run", "--help"]);
    for (what, args) in [
        ("default values", vec!["--set", "serviceCIDR=10.96.0.0/16"]),
        ("non-default values", vec!["-f", path_str(values.path())]),
    ] {
        let objects = to_json(&up, &template(&up, &args));
        let sts = find(&objects, "StatefulSet", NAME);
        let pod = &sts["spec"]["template"]["spec"];

        // One container: `vkube run --supervise` runs the upstream components with
        // components.rs' flags, so the chart names none of them.
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "{what}: one container");
        assert!(pod["initContainers"].is_null(), "{what}: no init containers");
        let vkube = container_of(pod, "vkube");
        assert_eq!(strings(&vkube["command"]), vec!["/vkube".to_string()]);
        assert_eq!(strings(&vkube["args"]), vec!["run".to_string()]);
        for dir in [CERT_DIR, STATE_DIR] {
            assert!(mounts(vkube).contains(&dir.to_string()), "{what}: vkube mounts {dir}");
        }
        let data_mount = vkube["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == STATE_DIR);
        assert_eq!(data_mount.map(|m| &m["name"]), Some(&Value::from("etcd-data")), "{what}: state on the volume");

        // vkube run: env vars it declares, values it accepts, the layout.
        let run = env_of(vkube);
        // VKUBE_LOG_FORMAT is read by the binary's logging set-up, not an argument.
        for k in run.keys().filter(|k| k.starts_with("VKUBE_") && *k != "VKUBE_LOG_FORMAT") {
            assert!(run_help.contains(&format!("[env: {k}=")), "{what}: `vkube run` has no env var {k}");
        }
        assert_eq!(run["VKUBE_NAME"], NAME);
        assert_eq!(run["VKUBE_NAMESPACE"], NS);
        assert_eq!(run["VKUBE_CERT_DIR"], CERT_DIR);
        assert_eq!(run["VKUBE_VIRTUAL_SERVER"], format!("https://127.0.0.1:{APISERVER}"));
        assert_eq!(run["VKUBE_SUPERVISE"], "true");
        assert_eq!(run["VKUBE_STATE_DIR"], STATE_DIR);
        assert_eq!(run["VKUBE_ETCD_DURABLE"], "true", "{what}: the datastore syncs its writes");
        assert_eq!(run["VKUBE_SERVICE_CIDR"], CIDR);
        assert_parses("run", &run);
        assert_eq!(run["VKUBE_LISTEN"], format!("0.0.0.0:{PROXY}"));
        assert_eq!(run["VKUBE_ENDPOINT"], format!("https://{}.{NS}.svc:443", names::service(NAME)));
        // Ingress traffic wakes a sleeping cluster only where Ingresses reach the host.
        let ingresses = what == "non-default values";
        assert_eq!(run.get("VKUBE_WAKE_LISTEN").cloned(), ingresses.then(|| format!("0.0.0.0:{WAKE}")), "{what}");
        let pod_ports: Vec<(Option<&str>, Option<u64>)> = vkube["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str(), p["containerPort"].as_u64()))
            .collect();
        let mut want = vec![(Some("https"), Some(PROXY as u64))];
        want.extend(ingresses.then_some((Some("wake"), Some(WAKE as u64))));
        assert_eq!(pod_ports, want, "{what}");

        // The Service kubectl and in-cluster clients reach, and sleeping Ingresses lead to.
        use vkube::controlplane::ingress_wake as wake;
        let svc = find(&objects, "Service", &names::service(NAME));
        let service_ports: Vec<(Option<&str>, Option<u64>, Option<&str>)> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str(), p["port"].as_u64(), p["targetPort"].as_str()))
            .collect();
        let mut want = vec![(Some("https"), Some(443), Some("https"))];
        want.extend(ingresses.then_some((Some(wake::PORT_NAME), Some(wake::SERVICE_PORT as u64), Some("wake"))));
        assert_eq!(service_ports, want, "{what}");
        let selector = svc["spec"]["selector"].as_object().expect("selector");
        let pod_labels = sts["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels");
        for (k, v) in selector {
            assert_eq!(pod_labels.get(k), Some(v), "{what}: the Service selects the pod ({k})");
        }
        assert_eq!(selector.get(names::LABEL_CONTROL_PLANE).and_then(Value::as_str), Some(NAME), "{what}");

        // vkube's marks on every object (how `vkube list/delete` find them).
        for o in &objects {
            let labels = o["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            for (k, v) in names::labels(NAME) {
                assert_eq!(labels.get(&k).and_then(Value::as_str), Some(v.as_str()), "{what}: {} {}", o["kind"], k);
            }
        }

        if what == "default values" {
            assert_eq!(run["VKUBE_COREDNS_IMAGE"], vkube_syncer::dns::DEFAULT_IMAGE, "the chart's default CoreDNS");
            assert_eq!(run["VKUBE_POD_SECURITY"], "baseline");
            assert_eq!(run["VKUBE_ALLOW_NODE_PORTS"], "false");
            assert!(
                ["VKUBE_SLEEP_AFTER", "VKUBE_SLEEP_SCHEDULE", "VKUBE_INGRESS_METRICS"]
                    .iter()
                    .all(|k| !run.contains_key(*k)),
                "sleep is off"
            );
            assert!(!run.contains_key("VKUBE_SNAPSHOT_SCHEDULE"), "scheduled snapshots are off");
            assert!(!run.keys().any(|k| k.starts_with("GO")), "the components' own Go defaults");
        } else {
            let want = [
                ("GOGC", "100"),
                ("GOMAXPROCS", "2"),
                ("VKUBE_POD_SECURITY", "restricted"),
                ("VKUBE_ALLOW_NODE_PORTS", "true"),
                ("VKUBE_ALLOW_LOAD_BALANCERS", "true"),
                ("VKUBE_SYNC_ALL_CONFIGMAPS", "true"),
                ("VKUBE_SYNC_ALL_SECRETS", "true"),
                ("VKUBE_SYNC_NETWORK_POLICIES", "true"),
                ("VKUBE_INGRESS_CLASSES", "web,internal"),
                ("VKUBE_INGRESS_HOSTS", "*.team-a.example.com,internal=shop.example.com"),
                ("VKUBE_ENDPOINT_CIDRS", "192.0.2.0/24,2001:db8::/64"),
                ("VKUBE_STORAGE_CLASSES", "fast-ssd"),
                ("VKUBE_VOLUME_ATTRIBUTES_CLASSES", "gold"),
                ("VKUBE_LOAD_BALANCER_CLASSES", "example.com/internal"),
                ("VKUBE_EGRESS_CIDRS", "203.0.113.0/24"),
                ("VKUBE_SYNC_CONCURRENCY", "4"),
                ("VKUBE_COREDNS_IMAGE", "registry.example.com/mirror/coredns:v1.12.4"),
                ("VKUBE_LOG_FORMAT", "json"),
                ("RUST_LOG", "debug"),
                ("VKUBE_SLEEP_AFTER", "30m"),
                ("VKUBE_SLEEP_SCHEDULE", "Mon-Fri 19:00-08:00 Europe/Berlin"),
                ("VKUBE_INGRESS_METRICS", "http://traefik-metrics.traefik:9100/metrics"),
                ("VKUBE_SNAPSHOT_SCHEDULE", "6h"),
                ("VKUBE_SNAPSHOT_KEEP", "3"),
                ("VKUBE_SERVICE_NODE_PORT_RANGE", "31000-31999"),
            ];
            for (k, v) in want {
                assert_eq!(run.get(k).map(String::as_str), Some(v), "{what}: {k}");
            }
            let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
            assert_eq!(claim["storageClassName"], "fast-ssd");
            assert_eq!(claim["resources"]["requests"]["storage"], "20Gi");
            assert_eq!(container_of(pod, "vkube")["resources"]["limits"]["memory"], "3Gi");
            assert_eq!(container_of(pod, "vkube")["image"], "registry.example.com/vkube:dev");
            assert_eq!(svc["spec"]["type"], "LoadBalancer");
            assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
        }
    }
}

/// The image the chart runs carries the upstream components at the versions pinned in
/// hack/versions.env (the Dockerfile's ARGs).
#[test]
fn the_image_carries_the_pinned_upstream_versions() {
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile")).unwrap();
    let arg = |k: &str| {
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {k}=")))
            .unwrap_or_else(|| panic!("the Dockerfile has no ARG {k}"))
            .to_string()
    };
    let v = vkube_localenv::upstream::versions();
    assert_eq!(arg("KUBERNETES_VERSION"), v.kubernetes);
    assert_eq!(arg("ETCD_TAG"), format!("{}-0", v.etcd.trim_start_matches('v')));
    for bin in ["etcd", "etcdutl", "kube-control-plane"] {
        assert!(dockerfile.contains(&format!("/usr/local/bin/{bin} /usr/local/bin/{bin}")), "the image has {bin}");
    }
    // The chart says what its image runs (`vkube list` shows it).
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    assert!(chart.contains(&format!("vkube.dev/kubernetes-version: {}", v.kubernetes)), "{chart}");
    assert!(chart.contains(&format!("vkube.dev/etcd-version: {}", v.etcd)), "{chart}");
}

// ---------------------------------------------------------------------------------------------
// The chart's pod, minus the container runtime

/// The pod's one container as a local process with the rendered command line and env (paths and
/// ports moved to this machine), `vkube run --supervise` with the token of the chart's
/// ServiceAccount: a pod created through the proxy runs on the host, its logs and exec work, a
/// Service is created with its host copy, and the virtual node shows its host node's capacity.
/// Fails if the Role or ClusterRole lacks anything the control plane needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_works_with_the_charts_service_account_and_no_more() {
    let env = TestEnv::start(1).await;
    let up = env.upstream.clone();
    let host = env.client().await;
    let cidr = vkube::local::host_service_cidr(&host).await.expect("host service range");
    env.kubectl_ok(&["create", "namespace", NS]);
    // One host StorageClass and PriorityClass tenants may name, and one of each they may not.
    for class in ["standard", "unlisted"] {
        env.apply(&format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {class}}}\nprovisioner: example.com/disk\n"
        ));
    }
    for class in ["batch", "unlisted"] {
        env.kubectl_ok(&["create", "priorityclass", class, "--value=1000"]);
    }
    let yaml = template(
        &up,
        &[
            "--set",
            &format!("serviceCIDR={cidr}"),
            "--set-json",
            r#"policy.storageClasses=["standard"]"#,
            "--set-json",
            r#"policy.scheduling.priorityClasses=["batch"]"#,
        ],
    );
    env.apply(&yaml);
    let objects = to_json(&up, &yaml);
    let sts = find(&objects, "StatefulSet", NAME);
    let pod = sts["spec"]["template"]["spec"].clone();
    let sa = pod["serviceAccountName"].as_str().expect("service account").to_string();

    // Least privilege, as the host's authorizer sees it.
    let who = format!("--as=system:serviceaccount:{NS}:{sa}");
    for (verb, resource, ns, allowed) in [
        ("create", "pods", NS, true),
        ("create", "pods/exec", NS, true),
        ("delete", "pods/proxy", NS, true),
        ("get", "services/proxy", NS, true),
        ("get", "services/proxy", "default", false),
        ("get", "nodes/proxy", "", false),
        ("patch", "secrets", NS, true),
        ("deletecollection", "pods", NS, false),
        ("create", "events.events.k8s.io", NS, true),
        ("deletecollection", "secrets", NS, false),
        ("list", "secrets", "default", false),
        ("create", "pods", "default", false),
        ("get", "nodes", "", true),
        ("list", "nodes", "", false),
        ("list", "servicecidrs.networking.k8s.io", "", false),
        ("create", "roles.rbac.authorization.k8s.io", NS, false),
        ("delete", "namespaces", "", false),
        ("create", "statefulsets.apps", NS, false),
    ] {
        // `pods/exec` is the subresource (kubectl would read `pods/NAME`).
        let (resource, sub) = resource.split_once('/').map_or((resource, None), |(r, s)| (r, Some(s)));
        let subresource = sub.map(|s| format!("--subresource={s}"));
        let mut args = vec!["auth", "can-i", verb, resource, who.as_str()];
        args.extend(subresource.as_deref());
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let answer = String::from_utf8_lossy(&env.kubectl(&args).stdout).trim().to_string();
        assert_eq!(answer, if allowed { "yes" } else { "no" }, "{sa} can {verb} {resource} {sub:?} in {ns:?}");
    }
    // The host's resource metrics: its own namespace's pods', and nodes' by name (asked of the
    // authorizer directly: kubectl cannot name a group this host does not serve).
    let client = env.client().await;
    let reviews: kube::Api<k8s_openapi::api::authorization::v1::SubjectAccessReview> = kube::Api::all(client);
    for (verb, resource, ns, allowed) in [
        ("list", "pods", NS, true),
        ("list", "pods", "default", false),
        ("get", "nodes", "", true),
        ("list", "nodes", "", false),
    ] {
        let review = serde_json::from_value(serde_json::json!({
            "spec": {"user": format!("system:serviceaccount:{NS}:{sa}"),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NS}"), "system:authenticated"],
                "resourceAttributes": {"group": "metrics.k8s.io", "resource": resource, "verb": verb, "namespace": ns}}
        }))
        .unwrap();
        let answer = reviews.create(&Default::default(), &review).await.expect("a SubjectAccessReview");
        let got = answer.status.map(|s| s.allowed);
        assert_eq!(got, Some(allowed), "{sa} can {verb} {resource}.metrics.k8s.io in {ns:?}");
    }
    // The listed StorageClass and PriorityClass and no other.
    for (class, allowed) in [
        ("storageclasses.storage.k8s.io/standard", "yes"),
        ("storageclasses.storage.k8s.io/unlisted", "no"),
        ("storageclasses.storage.k8s.io", "no"),
        ("priorityclasses.scheduling.k8s.io/batch", "yes"),
        ("priorityclasses.scheduling.k8s.io/system-node-critical", "no"),
        ("priorityclasses.scheduling.k8s.io", "no"),
    ] {
        let answer = String::from_utf8_lossy(&env.kubectl(&["auth", "can-i", "get", class, who.as_str()]).stdout)
            .trim()
            .to_string();
        assert_eq!(answer, allowed, "{sa} can get {class}");
    }

    let dir = env.dir().join("chart-pod");
    let (pki, logs) = (dir.join("pki"), dir.join("logs"));
    std::fs::create_dir_all(&pki).unwrap();
    let sa_kubeconfig = service_account_kubeconfig(&env, &sa, &dir);
    let remap = Remap {
        pki: pki.clone(),
        data: dir.join("data"),
        ports: [APISERVER, PROXY, WAKE].map(|p| (p, ports::free_port())).to_vec(),
    };
    let mut group = PodProcesses { group: ProcessGroup::new(&dir, Lifetime::Attached) };
    let started = Instant::now();

    // The one container, as the ServiceAccount: `vkube run` with the chart's env, its upstream
    // components found where the image has them (here: the cache), etcd on free ports (the pod's
    // loopback is its own; this machine's is shared).
    let vkube = container_of(&pod, "vkube");
    assert!(pod["initContainers"].is_null(), "one container, no init containers");
    let mut spec = ProcessSpec::new("vkube", vkube_bin(), &logs).args(strings(&vkube["args"]));
    for (k, v) in env_of(vkube) {
        spec = spec.env(&k, remap.apply(&v));
    }
    let spec = spec
        .env("VKUBE_HOST_KUBECONFIG", path_str(&sa_kubeconfig))
        .env("VKUBE_ETCD_BINARY", path_str(&up.etcd()))
        .env("VKUBE_ETCDUTL_BINARY", path_str(&up.etcdutl()))
        .env("VKUBE_CONTROL_PLANE_BINARY", path_str(&up.kube_control_plane()))
        .env("VKUBE_ETCD_CLIENT_PORT", ports::free_port().to_string())
        .env("VKUBE_ETCD_PEER_PORT", ports::free_port().to_string());
    group.spawn(spec);

    // The admin kubeconfig it publishes, pointed at the proxy on this machine.
    let proxy = dir.join("proxy.kubeconfig");
    let secrets: Api<Secret> = Api::namespaced(host.clone(), NS);
    let published = eventually("the admin kubeconfig Secret", Duration::from_secs(60), || {
        let secrets = secrets.clone();
        let failed = group.check();
        async move {
            failed?;
            let secret = secrets.get_opt(&names::kubeconfig_secret(NAME)).await.map_err(|e| e.to_string())?;
            Ok(secret.and_then(|s| s.data).and_then(|mut d| d.remove(names::KUBECONFIG_KEY)))
        }
    })
    .await;
    std::fs::write(&proxy, &published.0).unwrap();
    let cluster = kubectl_ok(&up, &proxy, &["config", "view", "-o", "jsonpath={.clusters[0].name}"]);
    kubectl_ok(
        &up,
        &proxy,
        &["config", "set-cluster", &cluster, &format!("--server=https://127.0.0.1:{}", remap.port(PROXY))],
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = vkube[probe]["httpGet"]["path"].as_str().expect("probe path").to_string();
        assert_eq!(vkube[probe]["httpGet"]["scheme"], "HTTPS");
        // As long as the harness gives a control plane's first start (etcd, the API server, the
        // initial sync): minutes on a loaded 2-core machine.
        eventually(&format!("vkube {probe} {path}"), Duration::from_secs(180), || {
            let ok = kubectl(&up, &proxy, &["get", "--raw", &path]).status.success();
            let failed = group.check();
            async move { failed.map(|_| ok.then_some(())) }
        })
        .await;
    }
    eprintln!("the chart's pod as processes: ready in {:.1} s", started.elapsed().as_secs_f64());

    // A workload through the proxy: the syncer (as the ServiceAccount) runs it on the host.
    let vk = |args: &[&str]| kubectl(&up, &proxy, args);
    eventually("a pod is created (once the default service account exists)", Duration::from_secs(60), || {
        let out = vk(&["run", "web", "--image=nginx", "--restart=Never"]);
        let failed = group.check();
        async move {
            failed?;
            let t = text(&out);
            Ok((out.status.success() || t.contains("AlreadyExists")).then_some(()))
        }
    })
    .await;
    eventually("the virtual pod Running", Duration::from_secs(60), || {
        let out = vk(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]);
        let failed = group.check();
        async move { failed.map(|_| (String::from_utf8_lossy(&out.stdout) == "Running").then_some(())) }
    })
    .await;
    let tr = Translator::new(NAME, NS);
    let phase =
        env.kubectl_ok(&["get", "pod", &tr.host_name("default", "web"), "-n", NS, "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Running", "the host copy of pod web");

    // The proxy's host pod subresources, as the ServiceAccount.
    let logs_out = kubectl_ok(&up, &proxy, &["logs", "web"]);
    assert!(logs_out.contains("simulated container log line 1"), "logs: {logs_out}");
    let exec = kubectl_ok(&up, &proxy, &["exec", "web", "--", "echo", "hello-from-the-chart"]);
    assert_eq!(exec.trim(), "hello-from-the-chart");

    // A Service: its host copy is created by the proxy first.
    kubectl_ok(&up, &proxy, &["create", "service", "clusterip", "web", "--tcp=80:80"]);
    let ip = kubectl_ok(&up, &proxy, &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let host_ip = env.kubectl_ok(&[
        "get",
        "service",
        &tr.host_name("default", "web"),
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(ip, host_ip, "the Service and its host copy share the ClusterIP");

    // The ClusterRole: the virtual node carries its host node's capacity.
    let node = kubectl_ok(&up, &proxy, &["get", "pod", "web", "-o", "jsonpath={.spec.nodeName}"]);
    let capacity = |out: String| serde_json::from_str::<Value>(&out).unwrap_or(Value::Null);
    let host_capacity = capacity(env.kubectl_ok(&["get", "node", &node, "-o", "jsonpath={.status.capacity}"]));
    let virtual_capacity =
        capacity(kubectl_ok(&up, &proxy, &["get", "node", &node, "-o", "jsonpath={.status.capacity}"]));
    assert!(host_capacity.is_object(), "host node capacity: {host_capacity}");
    assert_eq!(virtual_capacity, host_capacity, "the virtual node {node} shows its host node's capacity");
    // And the virtual cluster shows the StorageClass and PriorityClass tenants may name.
    eventually("the listed StorageClass is shown", Duration::from_secs(30), || {
        let out = vk(&["get", "storageclass", "-o", "jsonpath={.items[*].metadata.name}"]);
        async move { Ok((String::from_utf8_lossy(&out.stdout) == "standard").then_some(())) }
    })
    .await;
    let selector = format!("--selector={}=true", vkube_core::contract::LABEL_FROM_HOST);
    eventually("the listed PriorityClass is shown", Duration::from_secs(30), || {
        let out = vk(&["get", "priorityclass", &selector, "-o", "jsonpath={.items[*].metadata.name}"]);
        async move { Ok((String::from_utf8_lossy(&out.stdout) == "batch").then_some(())) }
    })
    .await;

    group.check().expect("every process still runs");
    eprintln!("workload checks done in {:.1} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// helpers

fn upstream() -> Upstream {
    Upstream::locate().expect("upstream binaries (hack/build-upstream.sh)")
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/vkube")
}

fn chart_str() -> String {
    chart_dir().display().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The pinned helm, kept away from the user's helm configuration.
fn helm(up: &Upstream, args: &[&str]) -> Output {
    let home = std::env::temp_dir().join("vkube-e2e-helm");
    Command::new(up.helm())
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("running helm")
}

/// `helm template` as release `name` in `NS`. The Kubernetes version is the pinned one (the
/// chart needs 1.33 or later; an unconfigured helm assumes an old default).
fn template_out(up: &Upstream, name: &str, args: &[&str]) -> Output {
    let v = vkube_localenv::upstream::versions();
    let chart = chart_str();
    let base = ["template", name, &chart, "-n", NS, "--kube-version", &v.kubernetes];
    helm(up, &[&base[..], args].concat())
}

fn template(up: &Upstream, args: &[&str]) -> String {
    let out = template_out(up, NAME, args);
    assert!(out.status.success(), "helm template {args:?} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn values_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(yaml.as_bytes()).unwrap();
    f
}

/// YAML to JSON objects, with kubectl and no server (removing a label nobody has is a no-op).
fn to_json(up: &Upstream, yaml: &str) -> Vec<Value> {
    let out = kubectl_stdin(
        up,
        Path::new("/nonexistent"),
        &["label", "--local", "-f", "-", "vkube-e2e-absent-", "-o", "json"],
        yaml,
    );
    assert!(out.status.success(), "kubectl label --local failed:\n{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::Deserializer::from_str(&stdout).into_iter::<Value>().map(|v| v.expect("JSON from kubectl")).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// A container or init container of the pod spec.
fn container_of<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|s| s.as_str().expect("a string").to_string()).collect()
}

fn env_of(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = e["value"].as_str().unwrap_or_else(|| panic!("{} has no literal value", e["name"]));
            (e["name"].as_str().unwrap().to_string(), value.to_string())
        })
        .collect()
}

fn mounts(c: &Value) -> Vec<String> {
    c["volumeMounts"].as_array().into_iter().flatten().map(|m| m["mountPath"].as_str().unwrap().to_string()).collect()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(vkube_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "vkube {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `vkube <sub>` with exactly the container's env gets past argument parsing (clap exits 2 on a
/// value it refuses) to connecting to the host, which fails here on purpose.
fn assert_parses(sub: &str, env: &BTreeMap<String, String>) {
    let out = Command::new(vkube_bin())
        .arg(sub)
        .env_clear()
        .envs(env)
        .env("VKUBE_HOST_KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "vkube {sub} with the chart's env:\n{}", text(&out));
    assert!(text(&out).contains("connecting to the host cluster"), "vkube {sub}:\n{}", text(&out));
}

/// Paths and ports of the pod moved to this machine.
struct Remap {
    pki: PathBuf,
    data: PathBuf,
    ports: Vec<(u16, u16)>,
}

impl Remap {
    fn port(&self, pod_port: u16) -> u16 {
        self.ports.iter().find(|(p, _)| *p == pod_port).map(|(_, l)| *l).expect("mapped port")
    }

    fn apply(&self, s: &str) -> String {
        if s == CERT_DIR {
            return self.pki.display().to_string();
        }
        if s == STATE_DIR {
            return self.data.display().to_string();
        }
        let mut s = s
            .replace(&format!("={CERT_DIR}/"), &format!("={}/", self.pki.display()))
            .replace(STATE_DIR, &self.data.display().to_string())
            .replace("0.0.0.0:", "127.0.0.1:");
        for (pod, local) in &self.ports {
            s = s.replace(&format!(":{pod}"), &format!(":{local}")).replace(&format!("={pod}"), &format!("={local}"));
        }
        s
    }
}

/// The pod's processes; their logs are printed if the test fails.
struct PodProcesses {
    group: ProcessGroup,
}

impl PodProcesses {
    fn spawn(&mut self, spec: ProcessSpec) {
        let name = spec.name.clone();
        if let Err(e) = self.group.spawn(spec) {
            panic!("starting {name}: {e}");
        }
    }

    /// Err when a process has exited (for `eventually`).
    fn check(&mut self) -> Result<(), String> {
        self.group.check_running().map_err(|e| e.to_string())
    }
}

impl Drop for PodProcesses {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(&self.group.logs(), 60);
        }
    }
}

/// A kubeconfig for the host with the ServiceAccount's token instead of the admin's identity.
fn service_account_kubeconfig(env: &TestEnv, sa: &str, dir: &Path) -> PathBuf {
    let token = env.kubectl_ok(&["create", "token", sa, "-n", NS, "--duration=1h"]);
    let path = dir.join("service-account.kubeconfig");
    std::fs::copy(&env.host.kubeconfig, &path).unwrap();
    let up = &env.upstream;
    kubectl_ok(up, &path, &["config", "set-credentials", sa, &format!("--token={}", token.trim())]);
    kubectl_ok(up, &path, &["config", "set-context", "--current", &format!("--user={sa}")]);
    let who = kubectl_ok(up, &path, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(who, format!("system:serviceaccount:{NS}:{sa}"));
    path
}
