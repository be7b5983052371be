//! The `vkube` CLI as an admin or CI uses it, against the dev host cluster (real processes).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vkube_e2e::{Cli, TestEnv, eventually, http_get, kubectl, kubectl_ok, vkube_bin};

fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_connect_pause_resume_delete_locally() {
    let env = TestEnv::start(2).await;
    let cli = Cli::new(&env);
    cli.ok(&["create", "team-a", "--local"]);
    let listed = cli.list();
    let team_a = listed.as_array().unwrap().iter().find(|c| c["name"] == "team-a").expect("team-a listed");
    assert_eq!(team_a["namespace"], "vkube-team-a");
    assert_eq!(team_a["mode"], "local");
    assert_eq!(team_a["ready"], true, "{team_a}");

    // A second create is harmless.
    cli.ok(&["create", "team-a", "--local"]);

    let kubeconfig = cli.state.path().join("team-a.kubeconfig");
    std::fs::write(&kubeconfig, cli.ok(&["connect", "team-a", "--print"])).unwrap();
    let up = vkube_localenv::Upstream::locate().unwrap();
    kubectl_ok(&up, &kubeconfig, &["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    kubectl_ok(&up, &kubeconfig, &["run", "solo", "--image=nginx"]);
    let host_pods = || {
        let out =
            env.kubectl_ok(&["-n", "vkube-team-a", "get", "pods", "-l", "vkube.dev/cluster=team-a", "-o", "name"]);
        out.lines().filter(|l| !l.contains("coredns")).map(str::to_string).collect::<Vec<_>>()
    };
    eventually("3 workload pods on the host", Duration::from_secs(30), || async {
        Ok((host_pods().len() == 3).then_some(()))
    })
    .await;

    // The context form, into a kubeconfig file of our choosing.
    let merged = cli.state.path().join("merged.kubeconfig");
    cli.ok(&["connect", "team-a", "--kubeconfig-file", merged.to_str().unwrap()]);
    let ns = kubectl_ok(&up, &merged, &["--context", "vkube-team-a", "get", "namespaces", "-o", "name"]);
    assert!(ns.contains("namespace/kube-system"), "{ns}");

    cli.ok(&["pause", "team-a"]);
    assert!(host_pods().is_empty(), "pause removes the host pods: {:?}", host_pods());
    let paused = cli.list();
    assert_eq!(paused[0]["status"], "Paused");
    assert!(!kubectl(&up, &kubeconfig, &["get", "pods"]).status.success(), "the control plane is stopped");

    cli.ok(&["resume", "team-a"]);
    eventually("the workloads come back, the bare pod too", Duration::from_secs(60), || async {
        let pods = host_pods();
        Ok((pods.len() == 3 && pods.iter().any(|p| p.contains("solo-x-default"))).then_some(()))
    })
    .await;
    // (Ready follows the pods' return closely: the syncer's first pass of the host's classes.)
    eventually("ready again after the resume", Duration::from_secs(30), || async {
        Ok((cli.list()[0]["ready"] == true).then_some(()))
    })
    .await;

    // Sleep mode by hand: the host pods go, the proxy stays; `wake` brings everything back.
    cli.ok(&["sleep", "team-a"]);
    // Deleted with their grace periods: gone moments later.
    eventually("sleep removes the host pods", Duration::from_secs(30), || async {
        let left = host_pods();
        Ok(left.is_empty().then_some(()).ok_or(format!("{left:?}")).ok())
    })
    .await;
    let asleep = cli.list();
    assert_eq!(asleep[0]["status"], "Sleeping", "{asleep}");
    assert!(asleep[0]["power_since"].is_string(), "{asleep}");
    assert!(cli.run(&["sleep", "team-a"]).status.success(), "a second sleep is harmless");
    cli.ok(&["wake", "team-a"]);
    eventually("the workloads come back after a sleep, the bare pod too", Duration::from_secs(60), || async {
        let pods = host_pods();
        Ok((pods.len() == 3 && pods.iter().any(|p| p.contains("solo-x-default"))).then_some(()))
    })
    .await;
    let awake = eventually("ready again after the wake", Duration::from_secs(30), || async {
        let awake = cli.list();
        Ok((awake[0]["status"] == "Ready").then_some(awake))
    })
    .await;
    assert_eq!(awake[0]["status"], "Ready", "{awake}");
    let table = cli.ok(&["list"]);
    assert!(table.contains("LAST ACTIVITY"), "{table}");

    cli.ok(&["delete", "team-a", "--wait"]);
    let left = env.labelled_host_objects("team-a");
    assert!(left.is_empty(), "left on the host: {left:?}");
    let procs = processes_mentioning(cli.state.path());
    assert!(procs.is_empty(), "left running: {procs:?}");
    assert_eq!(cli.list(), serde_json::json!([]));
}

/// A create right after a delete of the same name finds the host namespace still terminating:
/// it waits for it to go instead of failing on "namespace is being terminated".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_waits_for_a_terminating_namespace() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    env.kubectl_ok(&["create", "namespace", "vkube-again"]);
    env.kubectl_ok(&["-n", "vkube-again", "create", "configmap", "held"]);
    let finalizers = |patch: &str| {
        env.kubectl_ok(&["-n", "vkube-again", "patch", "configmap", "held", "--type=merge", "-p", patch]);
    };
    finalizers(r#"{"metadata":{"finalizers":["example.com/hold"]}}"#);
    env.kubectl_ok(&["delete", "namespace", "vkube-again", "--wait=false"]);

    let mut create = cli.command(&["create", "again", "--local"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(create.try_wait().unwrap().is_none(), "create must wait while the namespace terminates");
    finalizers(r#"{"metadata":{"finalizers":null}}"#);
    let out = tokio::task::spawn_blocking(move || create.wait_with_output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("is being deleted; waiting"), "progress says why it waits: {stderr}");
    assert_eq!(cli.list()[0]["ready"], true);
    cli.ok(&["delete", "again", "--wait"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do_and_exit_non_zero() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    for args in [vec!["connect", "nosuch", "--print"], vec!["delete", "nosuch"], vec!["pause", "nosuch"]] {
        let out = cli.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("not found") && stderr.contains("vkube list"), "{args:?}: {stderr}");
    }
    let out = cli.run(&["create", "bad", "--local", "--pod-security", "lax"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("privileged, baseline or restricted"));
}

/// `connect --port-forward` reaches the proxy through a port-forward to the control-plane pod.
/// On the dev host pods do not really run, so the "control-plane pod" is a kwok pod whose
/// port-forward target is a local control plane's proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_port_forward() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    cli.ok(&["create", "far", "--local"]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cli.state.path().join("local/vkube-far/far/state.json")).unwrap(),
    )
    .unwrap();
    let proxy_port = state["ports"]["proxy"].as_u64().unwrap();
    env.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: far-0, namespace: vkube-far, labels: {{vkube.dev/control-plane: far}}}}\nspec:\n  containers: [{{name: vkube, image: vkube}}]\n---\napiVersion: kwok.x-k8s.io/v1alpha1\nkind: PortForward\nmetadata: {{name: far-0, namespace: vkube-far}}\nspec:\n  forwards: [{{ports: [8443], target: {{port: {proxy_port}, address: 127.0.0.1}}}}]\n"
    ));
    env.kubectl_ok(&["-n", "vkube-far", "wait", "--for=condition=Ready", "pod/far-0", "--timeout=60s"]);
    let merged = cli.state.path().join("pf.kubeconfig");
    let mut child = Command::new(vkube_bin())
        .args(["connect", "far", "--port-forward", "--kubeconfig-file", merged.to_str().unwrap()])
        .env("VKUBE_STATE", cli.state.path())
        .env("KUBECONFIG", &cli.host_kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let up = vkube_localenv::Upstream::locate().unwrap();
    let result = vkube_e2e::until(Duration::from_secs(30), Duration::from_millis(300), || async {
        if !merged.exists() {
            return Ok(None);
        }
        let out = kubectl(&up, &merged, &["--context", "vkube-far", "get", "namespaces", "-o", "name"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("namespace/default") {
            Ok(Some(text))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    })
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let server = std::fs::read_to_string(&merged).unwrap_or_default();
    assert!(
        result.is_ok(),
        "kubectl through the port-forward: {result:?}\nconnect said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        server.contains("https://127.0.0.1:") && !server.contains(&format!(":{proxy_port}")),
        "the kubeconfig goes through the forward"
    );

    // With a command: the forward serves it and stops with it.
    let kubectl_bin = up.kubectl().display().to_string();
    let out = cli.run(&["connect", "far", "--port-forward", "--", &kubectl_bin, "get", "ns", "default", "-o", "name"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "namespace/default");
    cli.ok(&["delete", "far"]);
}

/// The chart path of `vkube create`: the built-in chart installed with Helm on a real API
/// server. On the dev host the control-plane pod is simulated (kwok "runs" it, nothing executes),
/// so the cluster never publishes its kubeconfig: create must say so when its timeout ends, and
/// list, pause, resume and delete must handle the chart's objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_path_installs_lists_pauses_and_deletes() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    let values = cli.state.path().join("values.yaml");
    std::fs::write(&values, "quota:\n  enabled: false\nsync:\n  concurrency: 8\n").unwrap();
    let out = cli.run(&[
        "create",
        "team-c",
        "-f",
        values.to_str().unwrap(),
        "--set",
        "persistence.size=2Gi",
        "--timeout",
        "20s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nothing runs the control plane here, so create cannot succeed: {stderr}");
    assert!(stderr.contains("did not become ready within 20 s") && stderr.contains("vkube delete team-c"), "{stderr}");
    assert!(stderr.contains("installing the chart"), "progress is shown: {stderr}");

    let sts = env.kubectl_ok(&[
        "-n",
        "vkube-team-c",
        "get",
        "statefulset",
        "team-c",
        "-o",
        "jsonpath={.spec.volumeClaimTemplates[0].spec.resources.requests.storage}",
    ]);
    assert_eq!(sts, "2Gi", "--set reached the chart");
    let quota = env.kubectl_ok(&["-n", "vkube-team-c", "get", "resourcequota", "-o", "name"]);
    assert!(quota.trim().is_empty(), "-f values reached the chart (the quota is on by default): {quota}");
    let listed = cli.list();
    let c = listed.as_array().unwrap().iter().find(|c| c["name"] == "team-c").expect("listed");
    assert_eq!(c["mode"], "chart");
    assert_eq!(c["endpoint"], "https://team-c.vkube-team-c.svc:443");
    let k8s = vkube_localenv::upstream::versions().kubernetes;
    assert_eq!(c["kubernetes_version"], k8s.as_str(), "the API server image's tag");

    // describe reads the chart's pod: its containers, their images' tags, the policy from env.
    let d: serde_json::Value = serde_json::from_str(&cli.ok(&["describe", "team-c", "-o", "json"])).unwrap();
    let components: Vec<(String, String)> = d["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["version"].as_str().unwrap_or("-").to_string()))
        .collect();
    let names: Vec<&str> = components.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-control-plane", "vkube"], "{d}");
    assert!(components.contains(&("kube-control-plane".into(), k8s.clone())), "{components:?}");
    assert_eq!(d["policy"]["sync-concurrency"], "8", "-f values reached the pod: {}", d["policy"]);
    assert_eq!(d["certificates"], serde_json::json!([]), "no control plane ran to write them");

    cli.ok(&["pause", "team-c"]);
    let replicas =
        env.kubectl_ok(&["-n", "vkube-team-c", "get", "statefulset", "team-c", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "0");
    assert_eq!(cli.list()[0]["status"], "Paused");

    cli.ok(&["delete", "team-c", "--wait"]);
    let left = env.labelled_host_objects("team-c");
    assert!(left.is_empty(), "left on the host: {left:?}");

    // CI that only installs: --wait=false returns once the chart is in.
    cli.ok(&["create", "team-d", "--wait=false"]);
    env.kubectl_ok(&["-n", "vkube-team-d", "get", "statefulset", "team-d"]);
    cli.ok(&["delete", "team-d"]);
}

/// A cluster in a host namespace vkube did not create (so not deleted with it): `vkube delete`
/// removes every kind the syncer wrote there, EndpointSlices and NetworkPolicies included, and
/// leaves the namespace and what else it holds alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_in_a_shared_namespace_leaves_nothing_of_the_cluster() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    env.kubectl_ok(&["create", "namespace", "shared"]);
    env.kubectl_ok(&["-n", "shared", "create", "configmap", "not-ours"]);
    cli.ok(&[
        "create",
        "team-e",
        "--local",
        "--namespace",
        "shared",
        "--run-arg=--sync-network-policies",
        "--ingress-classes=web",
        "--ingress-hosts=*.team-e.example.com",
        "--endpoint-cidrs=192.0.2.0/24",
    ]);
    let kubeconfig = cli.state.path().join("team-e.kubeconfig");
    std::fs::write(&kubeconfig, cli.ok(&["connect", "team-e", "--namespace", "shared", "--print"])).unwrap();
    let up = vkube_localenv::Upstream::locate().unwrap();
    vkube_e2e::kubectl_apply(&up, &kubeconfig, vkube_e2e::SELECTORLESS_SERVICE_WITH_SLICE);
    vkube_e2e::kubectl_apply(
        &up,
        &kubeconfig,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: quiet}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: solo}
spec:
  rules:
  - host: solo.team-e.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: solo, port: {number: 80}}}}]}
"#,
    );
    kubectl_ok(&up, &kubeconfig, &["run", "solo", "--image=nginx", "--expose", "--port=80"]);
    eventually("every kind's host copy", Duration::from_secs(60), || async {
        let got =
            |kind: &str| env.kubectl_ok(&["-n", "shared", "get", kind, "-l", "vkube.dev/cluster=team-e", "-o", "name"]);
        let have =
            ["pods", "services", "endpointslices", "networkpolicies", "ingresses"].map(|k| !got(k).trim().is_empty());
        Ok(have.iter().all(|h| *h).then_some(()))
    })
    .await;

    cli.ok(&["delete", "team-e", "--namespace", "shared"]);
    let left = env.labelled_host_objects("team-e");
    assert!(left.is_empty(), "left on the host: {left:?}");
    env.kubectl_ok(&["-n", "shared", "get", "configmap", "not-ours"]);
}

/// The day-to-day commands on one local cluster: list by label with version and age, describe,
/// version, logs, connect with a command, `--context`, certificate check and rotation (leaves
/// keep every client working; new CAs need the kubeconfig fetched again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_logs_version_connect_and_certs_locally() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    let up = vkube_localenv::Upstream::locate().unwrap();
    let k8s = vkube_localenv::upstream::versions().kubernetes;
    cli.ok(&["create", "ops", "--local", "--label", "team=a", "--label", "tier=gold"]);

    // list: by label, with version, age and labels.
    let listed: serde_json::Value = serde_json::from_str(&cli.ok(&["list", "-l", "team=a", "-o", "json"])).unwrap();
    let ops = &listed[0];
    assert_eq!(ops["name"], "ops", "{listed}");
    assert_eq!(ops["kubernetes_version"], k8s.as_str());
    assert_eq!(ops["labels"], serde_json::json!({"team": "a", "tier": "gold"}));
    assert!(ops["age_seconds"].as_u64().is_some(), "{ops}");
    assert_eq!(cli.ok(&["list", "-l", "team=b", "-o", "json"]).trim(), "[]");
    let table = cli.ok(&["list"]);
    assert!(table.contains("VERSION") && table.contains(&k8s) && table.contains("team=a,tier=gold"), "{table}");
    let out = cli.run(&["create", "x", "--local", "--label", "vkube.dev/cluster=evil"]);
    assert_eq!(out.status.code(), Some(2), "a reserved label is a usage error");

    // Workloads with requests, for describe's host resources.
    let kubeconfig = cli.state.path().join("ops.kubeconfig");
    std::fs::write(&kubeconfig, cli.ok(&["connect", "ops", "--print"])).unwrap();
    // What CoreDNS holds already.
    let base: serde_json::Value = serde_json::from_str(&cli.ok(&["describe", "ops", "-o", "json"])).unwrap();
    let base = |key: &str| base["host"][key].as_u64().unwrap();
    let (pods0, cpu0, mem0) = (base("pods"), base("cpu_requests_millicores"), base("memory_requests_bytes"));
    kubectl_ok(&up, &kubeconfig, &["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    kubectl_ok(&up, &kubeconfig, &["set", "resources", "deployment/web", "--requests=cpu=100m,memory=64Mi"]);
    let described = eventually("two host pods with requests", Duration::from_secs(60), || async {
        let d: serde_json::Value = serde_json::from_str(&cli.ok(&["describe", "ops", "-o", "json"])).unwrap();
        let h = &d["host"];
        if h["pods"] == pods0 + 2 && h["running_pods"] == pods0 + 2 && h["cpu_requests_millicores"] == cpu0 + 200 {
            return Ok(Some(d));
        }
        Err(format!("host: {h}"))
    })
    .await;
    assert_eq!(described["host"]["memory_requests_bytes"], mem0 + 2 * 64 * 1024 * 1024, "{described}");
    let components = described["components"].as_array().unwrap();
    let names: Vec<&str> = components.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in ["etcd", "kube-control-plane", "vkube"] {
        let c = components.iter().find(|c| c["name"] == want).unwrap_or_else(|| panic!("{want} in {names:?}"));
        assert_eq!(c["healthy"], true, "{c}");
    }
    let version_of = |name: &str| components.iter().find(|c| c["name"] == name).unwrap()["version"].clone();
    assert_eq!(version_of("kube-control-plane"), k8s.as_str());
    assert_eq!(version_of("etcd"), vkube_localenv::upstream::versions().etcd.as_str());
    assert_eq!(version_of("vkube"), format!("v{}", env!("CARGO_PKG_VERSION")).as_str());
    assert_eq!(described["policy"]["pod-security"], "baseline", "{}", described["policy"]);
    let certs = described["certificates"].as_array().unwrap();
    for want in ["ca", "apiserver", "admin"] {
        let c = certs.iter().find(|c| c["name"] == want).unwrap_or_else(|| panic!("{want} in {certs:?}"));
        assert!(c["days_left"].as_i64().unwrap() > 300, "{c}");
    }
    let yaml = cli.ok(&["describe", "ops", "-o", "yaml"]);
    assert!(yaml.lines().any(|l| l == "name: ops"), "{yaml}");
    let text = cli.ok(&["describe", "ops"]);
    assert!(text.contains("kube-control-plane") && text.contains(&format!("cpu {}m", cpu0 + 200)), "{text}");

    // version, client and server.
    let v: serde_json::Value = serde_json::from_str(&cli.ok(&["version", "ops", "-o", "json"])).unwrap();
    assert_eq!(v["client"]["kubernetes"], k8s.as_str());
    assert!(
        v["server"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "kube-control-plane" && c["version"] == k8s.as_str())
    );

    // logs: tail, a component, follow, a wrong component.
    let tail = cli.ok(&["logs", "ops", "--tail", "3"]);
    assert_eq!(tail.lines().count(), 3, "{tail}");
    let apiserver = cli.ok(&["logs", "ops", "kube-control-plane"]);
    assert!(apiserver.lines().count() > 10, "{apiserver}");
    let out = cli.run(&["logs", "ops", "kube-scheduler"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kube-control-plane"), "lists the components");
    let mut follow =
        cli.command(&["logs", "ops", "-f", "--tail", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(follow.try_wait().unwrap().is_none(), "-f keeps following");
    let _ = follow.kill();
    let _ = follow.wait();

    // connect -- CMD: the cluster's kubeconfig for one command, its exit code passed on.
    let kubectl_bin = up.kubectl().display().to_string();
    let ns = cli.ok(&["connect", "ops", "--", &kubectl_bin, "get", "namespaces", "-o", "name"]);
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    let out = cli.run(&["connect", "ops", "--", "sh", "-c", "test -f \"$KUBECONFIG\" && exit 7"]);
    assert_eq!(out.status.code(), Some(7), "the command's exit code");

    // --context: a host kubeconfig with several contexts, the current one broken.
    let several = cli.state.path().join("several.kubeconfig");
    let mut kc = kube::config::Kubeconfig::read_from(&cli.host_kubeconfig).unwrap();
    let mut broken = kc.clone();
    let good = kc.current_context.clone().unwrap();
    for c in broken.clusters.iter_mut() {
        c.name = "broken".into();
        c.cluster.as_mut().unwrap().server = Some("https://127.0.0.1:1".into());
    }
    for c in broken.contexts.iter_mut() {
        c.name = "broken".into();
        c.context.as_mut().unwrap().cluster = "broken".into();
    }
    kc.clusters.extend(broken.clusters);
    kc.contexts.extend(broken.contexts);
    kc.current_context = Some("broken".into());
    std::fs::write(&several, serde_json::to_string(&kc).unwrap()).unwrap();
    let with = |args: &[&str]| {
        let mut c = cli.command(args);
        c.env("KUBECONFIG", &several);
        c.output().unwrap()
    };
    assert!(!with(&["list"]).status.success(), "the current context is broken");
    let out = with(&["--context", &good, "connect", "ops", "--", &kubectl_bin, "get", "ns", "default", "-o", "name"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = with(&["--context", "nope", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no context nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // certs check: exit 0, or 3 with advice when something expires within the window.
    let checked: serde_json::Value = serde_json::from_str(&cli.ok(&["certs", "check", "ops", "-o", "json"])).unwrap();
    assert!(checked.as_array().unwrap().iter().any(|c| c["name"] == "front-proxy-ca"), "{checked}");
    let out = cli.run(&["certs", "check", "ops", "--warn-within", "3650d"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vkube certs rotate ops"));

    // certs rotate: new leaves, applied by the running control plane at once; old and new
    // kubeconfigs both work.
    let serving = || serving_serial(&state_port(&cli, "ops"));
    let before = serving();
    cli.ok(&["certs", "rotate", "ops"]);
    eventually("the proxy serves the new certificate", Duration::from_secs(30), || async {
        Ok((serving() != before).then_some(()))
    })
    .await;
    kubectl_ok(&up, &kubeconfig, &["get", "namespaces"]);
    let fresh = cli.state.path().join("fresh.kubeconfig");
    std::fs::write(&fresh, cli.ok(&["connect", "ops", "--print"])).unwrap();
    assert_ne!(std::fs::read_to_string(&fresh).unwrap(), std::fs::read_to_string(&kubeconfig).unwrap());
    kubectl_ok(&up, &fresh, &["get", "namespaces"]);

    // certs rotate --ca: the old kubeconfig is refused, a fetched one works, workloads stay.
    let out = cli.run(&["certs", "rotate", "ops", "--ca"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("vkube connect ops"), "says which kubeconfig to fetch again: {stderr}");
    assert!(!kubectl(&up, &fresh, &["get", "namespaces"]).status.success(), "the old CA is no longer trusted");
    std::fs::write(&fresh, cli.ok(&["connect", "ops", "--print"])).unwrap();
    let pods = kubectl_ok(&up, &fresh, &["get", "pods", "-o", "name"]);
    assert_eq!(pods.lines().count(), 2, "{pods}");

    cli.ok(&["delete", "ops", "--wait"]);
}

/// The proxy's port from the local cluster's state.
fn state_port(cli: &Cli, name: &str) -> String {
    let path = cli.state.path().join(format!("local/vkube-{name}/{name}/state.json"));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    state["ports"]["proxy"].to_string()
}

/// The serial number of the certificate served on a loopback port (openssl, as an admin would).
fn serving_serial(port: &str) -> String {
    let script =
        format!("openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -serial");
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Help that teaches: the newcomer's commands with no arguments, examples on every command, and
/// completion scripts that load.
#[test]
fn help_examples_and_completion() {
    let out = Command::new(vkube_bin()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Start here") && text.contains("vkube create team-a --local"), "{text}");
    for sub in [
        vec!["create"],
        vec!["connect"],
        vec!["list"],
        vec!["describe"],
        vec!["logs"],
        vec!["certs", "check"],
        vec!["certs", "rotate"],
        vec!["version"],
        vec!["completion"],
        vec!["delete"],
        vec!["pause"],
        vec!["resume"],
        vec!["dev", "up"],
        vec!["dev", "down"],
        vec!["dev", "env"],
        vec!["run"],
        vec!["sleep"],
        vec!["wake"],
    ] {
        let out = Command::new(vkube_bin()).args(&sub).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && help.contains("Example"), "vkube {sub:?} --help has no example:\n{help}");
    }
    let script = Command::new(vkube_bin()).args(["completion", "bash"]).output().unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &script.stdout).unwrap();
    let check = format!(
        "source {} && complete -p vkube >/dev/null && COMP_WORDS=(vkube de) && COMP_CWORD=1 && _vkube vkube de vkube && echo \"${{COMPREPLY[@]}}\"",
        file.path().display()
    );
    let out = Command::new("bash").args(["-c", &check]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the bash completion loads: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("describe") && said.contains("delete"), "completes subcommands: {said}");
    for shell in ["zsh", "fish"] {
        let out = Command::new(vkube_bin()).args(["completion", shell]).output().unwrap();
        assert!(out.status.success() && out.stdout.len() > 500, "{shell}");
    }
}

/// TTL and inactivity: `vkube list` shows the time left, and `vkube platform` deletes the
/// cluster whose TTL ended and the one nobody used for its allowed time, not before, with
/// everything they had on the host, while a cluster in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_deletes_expired_clusters_and_keeps_those_in_use() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    cli.ok(&["create", "busy", "--local", "--delete-after-inactivity", "30s"]);
    // Someone works on `busy`: a request every 3 s.
    let kubeconfig = cli.state.path().join("busy.kubeconfig");
    std::fs::write(&kubeconfig, cli.ok(&["connect", "busy", "--print"])).unwrap();
    let working = StopOnDrop(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)));
    {
        let (working, kubeconfig) = (working.0.clone(), kubeconfig.clone());
        std::thread::spawn(move || {
            let up = vkube_localenv::Upstream::locate().unwrap();
            while working.load(std::sync::atomic::Ordering::Relaxed) {
                kubectl(&up, &kubeconfig, &["get", "pods"]);
                std::thread::sleep(Duration::from_secs(3));
            }
        });
    }
    let idle_created = std::time::Instant::now();
    cli.ok(&["create", "idle", "--local", "--delete-after-inactivity", "30s"]);
    // Made last, and its time left read at once: creates take longer on a loaded machine.
    let brief_created = std::time::Instant::now();
    cli.ok(&["create", "brief", "--local", "--ttl", "40s"]);

    let listed = cli.list();
    let find = |name: &str| listed.as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap();
    let brief = find("brief");
    assert_eq!(brief["expiry_reason"], "ttl", "{brief}");
    let left = brief["expires_in_seconds"].as_i64().unwrap();
    assert!(left > 0 && left <= 40, "{brief}");
    assert_eq!(find("idle")["expiry_reason"], "inactivity");
    assert!(cli.ok(&["list"]).contains("EXPIRES"));

    let out = cli.state.path().join("platform.out");
    let platform = KillOnDrop(
        cli.command(&["platform", "--interval", "2s", "-o", "json"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(cli.state.path().join("platform.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let listed_names = || -> Vec<String> {
        cli.list().as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    let mut gone = std::collections::BTreeMap::new();
    eventually("brief and idle deleted", Duration::from_secs(120), || {
        let names = listed_names();
        for (name, created) in [("brief", brief_created), ("idle", idle_created)] {
            if !names.iter().any(|n| n == name) {
                gone.entry(name).or_insert(created.elapsed());
            }
        }
        let done = gone.len() == 2;
        async move { Ok(done.then_some(()).ok_or(format!("listed: {names:?}")).ok()) }
    })
    .await;
    eprintln!("deleted after: {gone:?}");
    assert!(gone["brief"] >= Duration::from_secs(40), "brief went before its TTL: {gone:?}");
    assert!(gone["idle"] >= Duration::from_secs(30), "idle went before its inactivity time: {gone:?}");
    assert_eq!(listed_names(), ["busy"], "the cluster in use stays");
    for name in ["brief", "idle"] {
        // Its namespace (vkube's) terminates in the background.
        eventually(&format!("nothing of {name} on the host"), Duration::from_secs(60), || async {
            let left = env.labelled_host_objects(name);
            Ok(left.is_empty().then_some(()).ok_or(format!("{left:?}")).ok())
        })
        .await;
        assert!(!cli.state.path().join("local").join(format!("vkube-{name}")).join(name).exists());
    }
    drop(platform);
    let text = std::fs::read_to_string(&out).unwrap();
    let reported: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&text).into_iter().collect::<Result<_, _>>().unwrap();
    let outcome =
        |name: &str| reported.iter().find(|r| r["name"] == name).map(|r| (r["reason"].clone(), r["outcome"].clone()));
    assert_eq!(outcome("brief"), Some(("ttl".into(), "deleted".into())), "{reported:?}");
    assert_eq!(outcome("idle"), Some(("inactivity".into(), "deleted".into())), "{reported:?}");
    drop(working);
    cli.ok(&["delete", "busy"]);
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loop's flag, lowered when the test ends, pass or fail.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Headless Chromium (Debian's `chromium-headless-shell`, installed by hack/debian-deps.sh).
fn chromium() -> std::path::PathBuf {
    let path: Vec<std::path::PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    ["chromium-headless-shell", "chromium"]
        .iter()
        .flat_map(|b| path.iter().map(move |d| d.join(b)))
        .chain(["/usr/lib/chromium/chromium-headless-shell".into(), "/usr/lib/chromium/chromium".into()])
        .find(|p| p.is_file())
        .expect("headless Chromium (hack/debian-deps.sh installs chromium-headless-shell)")
}

/// Chromium loads `url` with a profile of its own (its cookies) and prints the DOM, or with
/// `screenshot` saves a PNG.
fn browse(profile: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let mut c = Command::new(chromium());
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,800"])
        .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(file) => c.arg(format!("--screenshot={}", file.display())),
        None => c.arg("--dump-dom"),
    };
    let out = c.arg(url).output().unwrap();
    assert!(out.status.success(), "chromium {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard shows every cluster with its state, labels and charts to its admin only:
/// `vkube dashboard` behind its run's key (loaded in headless Chromium, its structure checked),
/// `vkube platform --dashboard-listen` behind the viewer's own host token and RBAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_cluster_to_the_admin_only() {
    let env = TestEnv::start(1).await;
    let cli = Cli::new(&env);
    cli.ok(&["create", "shown", "--local", "--label", "team=a", "--ttl", "30m", "--run-arg=--usage-persist-every=1s"]);
    cli.ok(&["create", "napping", "--local"]);
    cli.ok(&["sleep", "napping"]);

    let mut dashboard = KillOnDrop(
        cli.command(&["dashboard", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut url = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(dashboard.0.stdout.take().unwrap()), &mut url).unwrap();
    let url = url.trim().to_string();
    let base = url.split("/?key=").next().unwrap().to_string();

    // Its usage ledger written (every second here), so the page has figures to draw.
    eventually("shown's usage ledger", Duration::from_secs(30), || async {
        let got = env.kubectl(&["get", "configmap", "-n", "vkube-shown", "vkube-shown-usage"]);
        Ok(got.status.success().then_some(()))
    })
    .await;
    // Its admin, with the URL it printed: the key becomes a cookie, the page lists both.
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(profile.path(), &url, None);
    assert!(dom.contains(r#"data-cluster="vkube-shown/shown" data-state="Running" data-expiring="true""#), "{dom}");
    assert!(dom.contains(r#"data-cluster="vkube-napping/napping" data-state="Sleeping""#), "{dom}");
    assert!(dom.contains("team=a") && dom.contains("2 clusters: 1 running, 1 sleeping"), "{dom}");
    // Its structure, not its pixels: one row per cluster, 8 cells, two charts of 14 days each.
    for row in dom.split("<tr data-cluster=").skip(1).map(|r| r.split("</tr>").next().unwrap()) {
        assert_eq!(row.matches("<td").count(), 8, "{row}");
        assert_eq!(row.matches("<svg class=\"chart\"").count(), 2, "{row}");
        assert_eq!(row.matches("<rect class=\"cpu\"").count(), 14, "{row}");
    }
    assert!(!dom.contains("<script"), "no script on the page");
    // Drawn from the ledger: today's bar of time awake is the chart's tallest.
    let shown = dom.split(r#"<tr data-cluster="vkube-shown/shown""#).nth(1).unwrap().split("</tr>").next().unwrap();
    let today = vkube::usage::day_of(k8s_openapi::jiff::Timestamp::now());
    assert!(shown.contains(&format!(r#"height="58.0"><title>{today}: "#)), "{shown}");
    // The same profile keeps the cookie: the cluster's own page, without the key.
    let one = browse(profile.path(), &format!("{base}/clusters/vkube-shown/shown"), None);
    assert!(one.contains(r#"<h1 data-cluster="vkube-shown/shown""#) && one.contains("id=\"days\""), "{one}");
    let png = cli.state.path().join("dashboard.png");
    browse(profile.path(), &format!("{base}/"), Some(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let size = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((size(16), size(20)), (1280, 800), "rendered at the window's size");

    // Anyone else: refused, with what to do.
    let stranger = tempfile::tempdir().unwrap();
    let refused = browse(stranger.path(), &format!("{base}/"), None);
    assert!(refused.contains("id=\"refused\"") && !refused.contains("data-cluster"), "{refused}");
    let wrong = browse(stranger.path(), &format!("{base}/?key=0123"), None);
    assert!(!wrong.contains("data-cluster"), "{wrong}");
    let addr = base.trim_start_matches("http://").to_string();
    assert_eq!(http_get(&addr, "/", None).0, 401);
    drop(dashboard);

    // Host-wide: the viewer's own host token, reviewed by the host, and its RBAC.
    env.kubectl_ok(&["create", "serviceaccount", "viewer", "-n", "default"]);
    env.kubectl_ok(&["create", "serviceaccount", "nobody", "-n", "default"]);
    env.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "viewer",
        "--clusterrole=view",
        "--serviceaccount=default:viewer",
    ]);
    let viewer = env.kubectl_ok(&["create", "token", "viewer", "-n", "default"]).trim().to_string();
    let nobody = env.kubectl_ok(&["create", "token", "nobody", "-n", "default"]).trim().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let _platform = KillOnDrop(
        cli.command(&["platform", "--interval", "60s", "--dashboard-listen", &addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the platform's dashboard listening", Duration::from_secs(30), || async {
        Ok(std::net::TcpStream::connect(&addr).is_ok().then_some(()))
    })
    .await;
    let (status, page) = http_get(&addr, "/", Some(&viewer));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(r#"data-cluster="vkube-shown/shown""#), "{page}");
    assert_eq!(http_get(&addr, "/", Some(&nobody)).0, 403, "a host user that may not list Services");
    assert_eq!(http_get(&addr, "/", Some("not-a-token")).0, 401);
    let (status, login) = http_get(&addr, "/", None);
    assert_eq!(status, 401);
    assert!(login.contains("<form method=\"post\" action=\"/login\">"), "{login}");
}
