//! Sleep mode end to end: an idle virtual cluster goes to sleep (host pods and upstream processes
//! gone, the proxy still serving), background requests do not keep it awake, the first real
//! kubectl request wakes it and is answered, and restarts while asleep or waking converge.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams};
use vkube_e2e::{TestEnv, VirtualCluster, eventually};

const COMPONENTS: [&str; 2] = ["etcd", "kube-control-plane"];

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
    wait_running_touching(env, vc, n, timeout, false).await
}

/// [`wait_running`], and with `touch` a request that counts as activity at each poll: a cluster
/// that sleeps after a short idle time does not fall asleep meanwhile (the host pods' start may
/// take longer than that on a loaded machine).
async fn wait_running_touching(env: &TestEnv, vc: &VirtualCluster, n: usize, timeout: Duration, touch: bool) {
    eventually(&format!("{n} host pods Running"), timeout, || async {
        if touch {
            vc.kubectl_ok(&["get", "namespace", "default", "-o", "name"]);
        }
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
        // Its own copies (a pod the host's admin labelled alike is not its to remove).
        let owned = |pod: &Pod| pod.annotations().contains_key("vkube.dev/object-uid");
        let pods = vc.host_list::<Pod>(env).await.iter().filter(|p| owned(p)).count();
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
    wait_running_touching(&env, &vc, 3, Duration::from_secs(60), true).await;
    // A host pod with the cluster's label that is not its copy (no ownership annotations): the
    // host admin's, which going to sleep must leave alone.
    env.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: admins-own, namespace: {}, labels: {{vkube.dev/cluster: sleepy}}}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n",
        vc.host_namespace()
    ));

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
    let host_pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let kept = host_pods.get_opt("admins-own").await.unwrap();
    assert!(kept.is_some_and(|p| p.metadata.deletion_timestamp.is_none()), "the admin's pod was deleted");
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
    wait_running_touching(&env, &vc, 3, Duration::from_secs(30), true).await;
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
        Ok(vc.cp.pid("kube-control-plane").map(|_| ()))
    })
    .await;
    let half_started = vc.cp.pid("kube-control-plane").unwrap();
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

/// The usage ledger the cluster's control plane last wrote on the host (its ConfigMap).
async fn ledger(env: &TestEnv, vc: &VirtualCluster) -> vkube::usage::Ledger {
    let configmaps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client().await, vc.host_namespace());
    let cm = configmaps.get_opt(&vkube::names::usage_configmap(vc.name())).await.unwrap();
    vkube::usage::Ledger::from_data(cm.as_ref().and_then(|c| c.data.as_ref()))
}

/// What the test sees the cluster hold on the host at one moment: its host pods' container
/// requests (no init containers in these pods) and whether it is asleep.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    at: f64,
    cpu: f64,
    memory_gib: f64,
    cpu_limit: f64,
    pods: f64,
    asleep: bool,
}

/// What `pods` hold (not finished) and whether the Service's power annotation says asleep.
fn seen_of(at: f64, pods: &[Pod], svc: &Service) -> Seen {
    let annotations = svc.metadata.annotations.as_ref();
    let asleep = annotations.and_then(|a| a.get("vkube.dev/power")).is_some_and(|p| p == "Sleeping");
    let mut s = Seen { at, asleep, ..Default::default() };
    // Holding resources: bound to a node and not finished.
    let finished = |p: &Pod| {
        p.spec.as_ref().is_none_or(|s| s.node_name.is_none())
            || matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
    };
    for c in pods.iter().filter(|p| !finished(p)).flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter())) {
        let r = c.resources.as_ref();
        let get = |limits: bool, key: &str| {
            let m = r.and_then(|r| if limits { r.limits.as_ref() } else { r.requests.as_ref() });
            m.and_then(|m| m.get(key)).and_then(|v| vkube::usage::quantity(&v.0)).unwrap_or(0.0)
        };
        s.cpu += get(false, "cpu");
        s.memory_gib += get(false, "memory") / 1024f64.powi(3);
        s.cpu_limit += get(true, "cpu");
    }
    s.pods = pods.iter().filter(|p| !finished(p)).count() as f64;
    s
}

/// [`seen_of`] now, read from the host.
async fn seen(pods: &Api<Pod>, services: &Api<Service>, cluster: &str) -> Seen {
    let at = unix_seconds(k8s_openapi::jiff::Timestamp::now());
    let listed = pods.list(&ListParams::default().labels(&format!("vkube.dev/cluster={cluster}"))).await.unwrap();
    seen_of(at, &listed.items, &services.get(cluster).await.unwrap())
}

fn unix_seconds(t: k8s_openapi::jiff::Timestamp) -> f64 {
    t.as_nanosecond() as f64 / 1e9
}

/// The integral of what was seen from `from` to `to` (unix seconds), between samples the mean
/// of the two ends: (core-seconds, GiB-seconds, limit core-seconds, pod-seconds).
fn integral(samples: &[Seen], from: f64, to: f64) -> (f64, f64, f64, f64) {
    let mut sum = (0.0, 0.0, 0.0, 0.0);
    for w in samples.windows(2) {
        let (a, b) = (w[0], w[1]);
        let dt = b.at.min(to) - a.at.max(from);
        if dt > 0.0 {
            sum.0 += (a.cpu + b.cpu) / 2.0 * dt;
            sum.1 += (a.memory_gib + b.memory_gib) / 2.0 * dt;
            sum.2 += (a.cpu_limit + b.cpu_limit) / 2.0 * dt;
            sum.3 += (a.pods + b.pods) / 2.0 * dt;
        }
    }
    sum
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance * want.abs(),
        "{what}: accounted {got:.3}, measured {want:.3} ({:+.1} %)",
        (got - want) / want * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_accounted_to_the_second_through_sleep_and_read_by_vkube_usage() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster_with("metered", &["--usage-persist-every=2s"]).await;
    vc.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 3\n  \
         selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      \
         containers: [{name: c, image: nginx, resources: {requests: {cpu: 250m, memory: 128Mi}, limits: {cpu: 500m}}}]\n",
    );
    wait_running(&env, &vc, 3, Duration::from_secs(60)).await;

    // The test's own measure: what the host holds, sampled every 100 ms by a task of its own.
    let pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let services: Api<Service> = Api::namespaced(env.client().await, vc.host_namespace());
    // It stops at its first sample after this moment (unix seconds, as f64 bits).
    let stop_after = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(f64::INFINITY.to_bits()));
    let sampler = {
        let (pods, services, stop_after) = (pods.clone(), services.clone(), stop_after.clone());
        tokio::spawn(async move {
            let mut out: Vec<Seen> = vec![];
            while out
                .last()
                .is_none_or(|s| s.at <= f64::from_bits(stop_after.load(std::sync::atomic::Ordering::Relaxed)))
            {
                out.push(seen(&pods, &services, "metered").await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = ledger(&env, &vc).await;
    let held_awake = seen(&pods, &services, "metered").await;
    assert!(held_awake.cpu >= 0.75, "3 pods of 250m and the cluster's own: {held_awake:?}");

    // Awake with its pods, a few requests that count, then asleep for a while, then woken.
    tokio::time::sleep(Duration::from_secs(15)).await;
    for _ in 0..3 {
        vc.kubectl_ok(&["get", "pods"]);
    }
    request_power(&env, &vc, "sleep").await;
    let fell_asleep = eventually("asleep", Duration::from_secs(60), || async {
        let s = seen(&pods, &services, "metered").await;
        Ok(s.asleep.then_some(s.at).ok_or("awake").ok())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Woken by a request of this process (held until the cluster is back), timed to the request.
    let virtual_pods: Api<Pod> = Api::namespaced(vc.client().await, "default");
    let woken_at = unix_seconds(k8s_openapi::jiff::Timestamp::now());
    virtual_pods.list(&ListParams::default()).await.unwrap();
    wait_running(&env, &vc, 3, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    // The ledger written after this moment covers it all.
    let asked = unix_seconds(k8s_openapi::jiff::Timestamp::now());
    let after = eventually("the ledger written again", Duration::from_secs(20), || async {
        let l = ledger(&env, &vc).await;
        let until = l.accounted_until.as_deref().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
        Ok(until.is_some_and(|t| unix_seconds(t) > asked).then_some(l).ok_or("not yet").ok())
    })
    .await;
    let until = |l: &vkube::usage::Ledger| unix_seconds(l.accounted_until.as_deref().unwrap().parse().unwrap());
    let (from, to) = (until(&before), until(&after));
    // Samples on both sides of the period.
    stop_after.store(to.to_bits(), std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    assert!(samples.first().unwrap().at < from && samples.last().unwrap().at > to, "sampled the whole period");
    let (b, a) = (before.total(), after.total());
    let (cpu, memory, cpu_limit, pod_seconds) = integral(&samples, from, to);
    eprintln!(
        "usage over {:.1} s: accounted {:.2} core-s, measured {cpu:.2}",
        to - from,
        a.cpu_core_seconds - b.cpu_core_seconds
    );
    within("CPU requested", a.cpu_core_seconds - b.cpu_core_seconds, cpu, 0.05);
    within("memory requested", a.memory_gib_seconds - b.memory_gib_seconds, memory, 0.05);
    within("CPU limits", a.cpu_limit_core_seconds - b.cpu_limit_core_seconds, cpu_limit, 0.05);
    within("pod-seconds", a.pod_seconds - b.pod_seconds, pod_seconds, 0.05);
    // Asleep from the power annotation seen (up to a poll late) to the waking request: 2 s either way.
    let asleep = woken_at - fell_asleep;
    let near = |what: &str, got: f64, want: f64, by: f64| {
        assert!((got - want).abs() <= by, "{what}: accounted {got:.2}, measured {want:.2} (±{by})");
    };
    near("seconds asleep", a.asleep_seconds - b.asleep_seconds, asleep, 2.0);
    near("seconds awake", a.awake_seconds - b.awake_seconds, to - from - asleep, 2.0);
    let saved = a.saved_cpu_core_seconds - b.saved_cpu_core_seconds;
    near("CPU saved by sleeping", saved, held_awake.cpu * asleep, held_awake.cpu * 2.0);
    assert!(a.requests >= b.requests + 4, "the kubectl requests counted: {} then {}", b.requests, a.requests);
    assert!(a.requests_by_user.keys().any(|u| u != "other"), "{:?}", a.requests_by_user);

    // `vkube usage`, from the host alone: the same ledger, per day and priced.
    let cli = vkube_e2e::Cli::new(&env);
    let ns = vc.host_namespace().to_string();
    let persisted_before = ledger(&env, &vc).await.total();
    let rows: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "usage",
        "metered",
        "-n",
        &ns,
        "--since",
        "1d",
        "--cpu-price",
        "2",
        "-o",
        "json",
    ]))
    .unwrap();
    let rows = rows.as_array().unwrap();
    let sum = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>();
    // What it printed lies between the ledger before and after the command (written every 2 s).
    let persisted_after = ledger(&env, &vc).await.total();
    let printed = sum("coreHours") * 3600.0;
    assert!(
        printed >= persisted_before.cpu_core_seconds - 0.01 && printed <= persisted_after.cpu_core_seconds + 0.01,
        "printed {printed:.3} core-s, ledger {:.3} then {:.3}",
        persisted_before.cpu_core_seconds,
        persisted_after.cpu_core_seconds
    );
    within("cost printed", sum("cost"), 2.0 * printed / 3600.0, 0.001);
    assert!(rows.iter().all(|r| r["day"].is_string() && r["name"] == "metered"), "{rows:?}");
    let all = cli.ok(&["usage", "-o", "csv"]);
    assert!(all.lines().any(|l| l.starts_with(&format!("metered,{ns},,"))), "{all}");

    // A crash: the pods that ran while no control plane counted are counted by the next one,
    // back to the last account, and its counters start from the ledger.
    let last = ledger(&env, &vc).await;
    let steady = seen(&pods, &services, "metered").await;
    vc.kill_controller();
    tokio::time::sleep(Duration::from_secs(6)).await;
    vc.start_controller().await;
    let restarted = unix_seconds(k8s_openapi::jiff::Timestamp::now());
    let next = eventually("the ledger written by the new process", Duration::from_secs(20), || async {
        let l = ledger(&env, &vc).await;
        Ok((l.accounted_until.is_some() && until(&l) > restarted).then_some(l).ok_or("not yet").ok())
    })
    .await;
    let (l, n) = (last.total(), next.total());
    within(
        "pod-seconds across a crash",
        n.pod_seconds - l.pod_seconds,
        steady.pods * (until(&next) - until(&last)),
        0.05,
    );
    within(
        "CPU across a crash",
        n.cpu_core_seconds - l.cpu_core_seconds,
        steady.cpu * (until(&next) - until(&last)),
        0.05,
    );
    let m = metrics(&vc).await;
    let counter = m
        .lines()
        .find(|l| l.starts_with("vkube_usage_pod_seconds_total{cluster=\"metered\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no pod-seconds counter: {m}"));
    assert!(counter >= l.pod_seconds, "the counter starts from the ledger: {counter} < {}", l.pod_seconds);
}

fn get_with_host(port: u16, host: &str) -> (u16, String) {
    vkube_e2e::http_get_host(&format!("127.0.0.1:{port}"), host, "/", None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_a_sleeping_clusters_ingress_wakes_it() {
    use k8s_openapi::api::networking::v1::Ingress;
    let env = TestEnv::start(1).await;
    let vc =
        env.virtual_cluster_with("inwake", &["--ingress-classes=web", "--ingress-hosts=*.team-a.example.com"]).await;
    let tr = vc.translator();
    vc.apply(&deployment("web", 1));
    vc.kubectl_ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"]);
    vc.apply("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop, namespace: default}\nspec:\n  tls: [{hosts: [shop.team-a.example.com], secretName: shop-tls}]\n  rules:\n  - host: shop.team-a.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}, {path: /api, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}\n");
    wait_running(&env, &vc, 1, Duration::from_secs(60)).await;
    let ingresses: Api<Ingress> = Api::namespaced(env.client().await, vc.host_namespace());
    let host_name = tr.host_name("default", "shop");
    // (service, port name, port number) of every path's backend.
    let backends = |ing: &Ingress| -> Vec<(String, Option<String>, Option<i32>)> {
        let rules = ing.spec.as_ref().and_then(|s| s.rules.clone()).unwrap_or_default();
        rules
            .iter()
            .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter()))
            .filter_map(|p| p.backend.service.as_ref())
            .map(|s| {
                (s.name.clone(), s.port.as_ref().and_then(|p| p.name.clone()), s.port.as_ref().and_then(|p| p.number))
            })
            .collect()
    };
    let awake_backends = vec![(tr.host_name("default", "web"), None, Some(80)); 2];
    let host_backends = || async {
        let ing = ingresses.get_opt(&host_name).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(ing.map(|i| (backends(&i), i)))
    };
    eventually("the host Ingress leading to the tenant's Service", Duration::from_secs(30), || async {
        let seen = host_backends().await?;
        Ok(seen.filter(|(b, _)| *b == awake_backends).map(|_| ()))
    })
    .await;

    request_power(&env, &vc, "sleep").await;
    wait_asleep(&env, &vc, Duration::from_secs(60)).await;
    // Asleep, every path leads to the control plane's wake port; the rest is the tenant's.
    let (asleep_backends, asleep) = host_backends().await.unwrap().expect("the host Ingress stays while asleep");
    assert_eq!(asleep_backends, vec![(vc.name().to_string(), Some("wake".to_string()), None); 2]);
    let spec = asleep.spec.as_ref().unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("web"));
    assert_eq!(spec.tls.as_ref().unwrap()[0].secret_name, Some(tr.host_name("default", "shop-tls")));

    // The Service port the Ingresses name exists.
    let svc = Api::<Service>::namespaced(env.client().await, vc.host_namespace()).get(vc.name()).await.unwrap();
    let svc_ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(svc_ports.iter().any(|p| p.name.as_deref() == Some("wake") && p.port == 80), "{svc_ports:?}");

    // A restart while asleep (a crash, an upgrade) listens again for the same host names.
    let mut vc = vc;
    vc.kill_controller();
    vc.start_controller().await;
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Sleeping"), "the restart woke it");

    let port = vc.cp.state.ports.wake.expect("local mode listens for ingress traffic");
    // A host name no Ingress of the cluster has: refused, and it sleeps on.
    let (status, text) = get_with_host(port, "other.example.com");
    assert_eq!(status, 404, "{text}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(power(&env, &vc).await.as_deref(), Some("Sleeping"), "an unknown host name woke it");

    // The Ingress's host name (as a controller sends it, with a port): a page that retries, and
    // the cluster wakes.
    let (status, text) = get_with_host(port, "shop.team-a.example.com:80");
    assert_eq!(status, 503, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 5"), "{text}");
    assert!(text.contains("waking up"), "{text}");
    eventually("the cluster awake", Duration::from_secs(60), || async {
        let p = power(&env, &vc).await;
        Ok((p.as_deref() == Some("Running")).then_some(()).ok_or(format!("power {p:?}")).ok())
    })
    .await;
    // The syncer puts the tenant's backends back and recreates the pod.
    eventually("the host Ingress leading to the tenant's Service again", Duration::from_secs(60), || async {
        let seen = host_backends().await?;
        match seen {
            Some((b, _)) if b == awake_backends => Ok(Some(())),
            other => Err(format!("backends {:?}", other.map(|(b, _)| b))),
        }
    })
    .await;
    wait_running(&env, &vc, 1, Duration::from_secs(60)).await;
    let m = metrics(&vc).await;
    assert!(m.contains("user=\"ingress:shop.team-a.example.com\""), "counted as activity: {m}");
}
