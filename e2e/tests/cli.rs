//! The `vkube` CLI as an admin or CI uses it, against the dev host cluster (real processes).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vkube_e2e::{TestEnv, eventually, kubectl, kubectl_ok, vkube_bin};

/// The CLI with its own state directory and the host's kubeconfig; whatever it leaves running
/// is stopped when the test ends, pass or fail.
struct Cli {
    state: tempfile::TempDir,
    host_kubeconfig: PathBuf,
}

impl Cli {
    fn new(env: &TestEnv) -> Self {
        Cli { state: tempfile::tempdir().unwrap(), host_kubeconfig: env.host.kubeconfig.clone() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(vkube_bin());
        c.args(args).env("VKUBE_STATE", self.state.path()).env("KUBECONFIG", &self.host_kubeconfig);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vkube {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["list", "-o", "json"])).unwrap()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        vkube_localenv::process::stop_strays(self.state.path(), Duration::from_secs(5));
    }
}

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
    assert_eq!(cli.list()[0]["ready"], true);

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
    cli.ok(&["create", "team-e", "--local", "--namespace", "shared", "--run-arg=--sync-network-policies"]);
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
"#,
    );
    kubectl_ok(&up, &kubeconfig, &["run", "solo", "--image=nginx"]);
    eventually("every kind's host copy", Duration::from_secs(60), || async {
        let got =
            |kind: &str| env.kubectl_ok(&["-n", "shared", "get", kind, "-l", "vkube.dev/cluster=team-e", "-o", "name"]);
        let have = ["pods", "services", "endpointslices", "networkpolicies"].map(|k| !got(k).trim().is_empty());
        Ok(have.iter().all(|h| *h).then_some(()))
    })
    .await;

    cli.ok(&["delete", "team-e", "--namespace", "shared"]);
    let left = env.labelled_host_objects("team-e");
    assert!(left.is_empty(), "left on the host: {left:?}");
    env.kubectl_ok(&["-n", "shared", "get", "configmap", "not-ours"]);
}
