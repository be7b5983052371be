//! Sleep mode end to end: an idle virtual cluster goes to sleep (host pods and upstream processes
//! gone, the proxy still serving), background requests do not keep it awake, the first real
//! kubectl request wakes it and is answered, and restarts while asleep or waking converge.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use vkube_e2e::{TestEnv, VirtualCluster, eventually};

const COMPONENTS: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

fn deployment(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: c, image: nginx}}]\n"
    )
}

/// The host pods of `vc`'s pods in virtual namespace `default`.
async fn workload_pods(env: &TestEnv, vc: &VirtualCluster) -> Vec<Pod> {
    let pods: Vec<Pod> = vc.host_list(env).await;
    pods.into_iter()
        .filter(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get("vkube.dev/namespace")).is_some_and(|n| n == "default")
        })
        .collect()
}

/// The host pods of `vc`'s workloads that run, of all there are.
async fn running_host_pods(env: &TestEnv, vc: &VirtualCluster) -> (usize, usize) {
    let pods = workload_pods(env, vc).await;
    let running = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    (running, pods.len())
}

async fn wait_running(env: &TestEnv, vc: &VirtualCluster, n: usize, timeout: Duration) {
    eventually(&format!("{n} host pods Running"), timeout, || async {
        let (running, all) = running_host_pods(env, vc).await;
        Ok((running == n && all == n).then_some(()).ok_or(format!("{running} running of {all}")).ok())
    })
    .await;
}

/// The power annotation of the cluster's host Service.
async fn power(env: &TestEnv, vc: &VirtualCluster) -> Option<String> {
    let svc = Api::<Service>::namespaced(env.client().await, vc.host_namespace()).get(vc.name()).await.unwrap();
    svc.metadata.annotations.unwrap_or_default().get("vkube.dev/power").cloned()
}

async fn wait_asleep(env: &TestEnv, vc: &VirtualCluster, timeout: Duration) {
    eventually("the cluster asleep: Sleeping, no host pods, no upstream process", timeout, || async {
        let p = power(env, vc).await;
        let pods = vc.host_list::<Pod>(env).await.len();
        let up: Vec<&str> = COMPONENTS.into_iter().filter(|c| vc.cp.pid(c).is_some()).collect();
        let asleep = p.as_deref() == Some("Sleeping") && pods == 0 && up.is_empty();
        Ok(asleep.then_some(()).ok_or(format!("power {p:?}, {pods} host pods, running {up:?}")).ok())
    })
    .await;
}

async fn metrics(vc: &VirtualCluster) -> String {
    let req = http::Request::get("/metrics").body(vec![]).unwrap();
    vc.client().await.request_text(req).await.unwrap()
}

async fn request_power(env: &TestEnv, vc: &VirtualCluster, request: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {"vkube.dev/power-request": request}}});
    Api::<Service>::namespaced(env.client().await, vc.host_namespace())
        .patch(vc.name(), &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_sleeps_and_the_first_kubectl_request_wakes_it() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster_with("sleepy", &["--sleep-after=20s"]).await;
    vc.apply(&deployment("web", 3));
    wait_running(&env, &vc, 3, Duration::from_secs(60)).await;

    // Background that must not keep it awake: a watch left open, and an in-cluster
    // controller's service account polling every 2 s.
    vc.kubectl_ok(&["create", "serviceaccount", "poller"]);
    vc.kubectl_ok(&["create", "clusterrolebinding", "poller", "--clusterrole=view", "--serviceaccount=default:poller"]);
    let token = vc.kubectl_ok(&["create", "token", "poller"]);
    let sa = vc.client_with_token(token.trim()).await;
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = polls.clone();
    let poller = tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(sa, "default");
        loop {
            if pods.list(&ListParams::default()).await.is_ok() {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let mut watch = Command::new(vkube_localenv::Upstream::locate().unwrap().kubectl())
        .args(["get", "pods", "-w"])
        .env("KUBECONFIG", vc.kubeconfig())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let idle_from = Instant::now();
    wait_asleep(&env, &vc, Duration::from_secs(90)).await;
    let slept_after = idle_from.elapsed();
    assert!(slept_after >= Duration::from_secs(15), "slept after {slept_after:?}, before its 20 s were up");
    assert!(polls.load(std::sync::atomic::Ordering::Relaxed) >= 5, "the service account really polled");
    // Asleep, the poller and the watch (which reconnects) do not wake it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Sleeping"), "background requests woke it");
    let m = metrics(&vc).await;
    assert!(m.contains("vkube_asleep 1"), "{m}");
    assert!(m.contains("vkube_sleeps_total 1"), "{m}");
    // A sleeping cluster answers a background request with 503 and Retry-After.
    let ignored = vc.kubectl(&["get", "--raw", "/api/v1/namespaces?watch=true&timeoutSeconds=1"]);
    assert!(!ignored.status.success());
    assert!(
        String::from_utf8_lossy(&ignored.stderr).contains("asleep"),
        "{}",
        String::from_utf8_lossy(&ignored.stderr)
    );

    // The first real request is held, not refused, and answered.
    let started = Instant::now();
    let pods = vc.kubectl_ok(&["get", "pods", "-o", "name"]);
    let wake = started.elapsed();
    eprintln!("wake: kubectl get pods answered in {:.2} s", wake.as_secs_f64());
    assert_eq!(pods.lines().filter(|l| l.starts_with("pod/web-")).count(), 3, "{pods}");
    let back = Instant::now();
    wait_running(&env, &vc, 3, Duration::from_secs(30)).await;
    eprintln!("wake: 3 host pods Running again {:.2} s after the answer", back.elapsed().as_secs_f64());
    // No duplicates on either side, and the same virtual pods (nothing recreated by a controller).
    assert_eq!(vc.kubectl_ok(&["get", "pods", "-o", "name"]).lines().count(), 3);
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Running"));
    let m = metrics(&vc).await;
    assert!(m.contains("vkube_asleep 0"), "{m}");
    assert!(m.contains("vkube_wake_seconds_count 1"), "{m}");
    assert!(m.contains("vkube_activity_total{user=\"vkube-admin\""), "the admin's requests counted: {m}");
    assert!(!m.contains("system:serviceaccount:default:poller"), "the service account did not count: {m}");

    // An open exec session carrying data keeps it awake past its 20 idle seconds.
    let pod = pods.lines().next().unwrap().trim_start_matches("pod/").to_string();
    let session = Instant::now();
    let out = vc.kubectl_ok(&["exec", &pod, "--", "sh", "-c", "for i in $(seq 16); do echo tick; sleep 2; done"]);
    assert_eq!(out.lines().count(), 16, "{out}");
    assert!(session.elapsed() >= Duration::from_secs(30));
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Running"), "it slept during an exec session carrying data");
    assert!(metrics(&vc).await.contains("vkube_sleeps_total 1"), "no second sleep during the session");

    // The host saw it happen.
    let events: Api<Event> = Api::namespaced(env.client().await, vc.host_namespace());
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={}", vc.name())))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Sleeping") && reasons.iter().any(|r| r == "Woken"), "{reasons:?}");
    let last = Api::<Service>::namespaced(env.client().await, vc.host_namespace()).get(vc.name()).await.unwrap();
    let by = last.metadata.annotations.unwrap_or_default().get("vkube.dev/last-activity-by").cloned();
    assert_eq!(by.as_deref(), Some("vkube-admin"), "the last activity is persisted with its user");
    poller.abort();
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_while_asleep_or_waking_converge_without_duplicates() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster("napper").await;
    vc.apply(&deployment("app", 2));
    wait_running(&env, &vc, 2, Duration::from_secs(60)).await;
    let virtual_pods = vc.kubectl_ok(&["get", "pods", "-o", "name"]);

    // `vkube sleep` asks with this annotation.
    request_power(&env, &vc, "sleep").await;
    wait_asleep(&env, &vc, Duration::from_secs(60)).await;

    // Killed while asleep: it comes back asleep, and starts nothing.
    vc.kill_controller();
    vc.start_controller().await;
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Sleeping"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(COMPONENTS.iter().all(|c| vc.cp.pid(c).is_none()), "a restart while asleep started components");
    assert_eq!(workload_pods(&env, &vc).await.len(), 0);

    // Killed while waking (its API server started, not yet answered for): it comes back asleep,
    // the half-started components gone, and a request wakes it as usual.
    request_power(&env, &vc, "wake").await;
    eventually("the API server started by the wake", Duration::from_secs(30), || async {
        Ok(vc.cp.pid("kube-apiserver").map(|_| ()))
    })
    .await;
    let half_started = vc.cp.pid("kube-apiserver").unwrap();
    vc.kill_controller();
    // Usually killed mid-wake (still persisted asleep); on a slow machine the wake may have
    // finished first (persisted awake): either way the next process must agree with the record.
    let woke_first = power(&env, &vc).await.as_deref() == Some("Running");
    vc.start_controller().await;
    // Gone (or a zombie its new parent has not reaped yet), unless adopted by an awake cluster.
    let state = std::fs::read_to_string(format!("/proc/{half_started}/stat")).unwrap_or_default();
    let gone = state.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z'));
    if woke_first {
        assert!(!gone, "an awake cluster's API server is adopted by the next process, not restarted");
    } else {
        assert!(gone, "the API server of the killed process was stopped by the next: {state}");
        assert_eq!(power(&env, &vc).await.as_deref(), Some("Sleeping"));
    }
    let pods = vc.kubectl_ok(&["get", "pods", "-o", "name"]);
    assert_eq!(pods, virtual_pods, "the same virtual pods, none lost or duplicated");
    wait_running(&env, &vc, 2, Duration::from_secs(60)).await;
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Running"));
    // Settled: still exactly one host pod per virtual pod.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(workload_pods(&env, &vc).await.len(), 2);
}
