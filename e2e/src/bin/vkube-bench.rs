//! `hack/bench`: how fast, how light, and how close to the host itself a virtual cluster is,
//! each figure beside its baseline measured in the same run on the same local host cluster.
//! Prints a table as it goes, writes `target/bench/results.json` and `docs/benchmarks.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use vkube::controlplane::supervisor::COMPONENTS as CHILDREN;
/// Every process of a virtual cluster: its supervised children and vkube.
const PROCESSES: [&str; 3] = [CHILDREN[0], CHILDREN[1], "vkube"];
use vkube::local::{LocalControlPlane, LocalOptions};
use vkube_core::contract::{ANNOTATION_NAME, LABEL_CLUSTER};
use vkube_e2e::{TestEnv, vkube_bin};
use vkube_localenv::{HostOptions, Lifetime};

struct Args {
    pods: usize,
    big: usize,
    /// The greedy tenant's pods in scenario 7 (0 skips it).
    fairness: usize,
    ready_runs: usize,
    /// Clusters put to sleep side by side in scenario 8 (0 skips it).
    sleepers: usize,
    /// Only scenarios 1 (ready) and 8 (sleep mode), printed and written to
    /// target/bench/sleep.json; the docs are left alone.
    sleep_only: bool,
    /// Only scenarios 1 (ready) and 9 (forks), printed and written to target/bench/forks.json.
    forks_only: bool,
    /// Only scenarios 1 (ready) and 10 (idle footprint of `idle` clusters side by side), written
    /// to target/bench/idle.json; run it with GOGC/GOMEMLIMIT set to measure those settings.
    idle_only: bool,
    /// Empty clusters started side by side in scenario 10 (0 skips it).
    idle: usize,
    /// Only scenario 11 (sync throughput on a host whose node is real, `real_pods` pods),
    /// written to target/bench/realnode.json.
    real_node_only: bool,
    real_pods: usize,
    /// Only rewrite docs/benchmarks.md from target/bench/results.json (after editing the notes).
    docs_only: bool,
    /// Extra `vkube run` arguments of scenario 2's cluster, to measure a setting against the
    /// same direct run (e.g. `--run-arg=--token-delivery=annotation`).
    run_args: Vec<String>,
    /// Seconds of a CPU profile of the host API server from the start of each of scenario 2's
    /// runs (0: none), written to target/bench/host-apiserver-{virtual,direct}.pprof, to see where
    /// the virtual run's extra host CPU goes (`go tool pprof -top -diff_base DIRECT VIRTUAL`).
    profile_host: u64,
}

fn args() -> Args {
    let mut a = Args {
        pods: 1000,
        big: 10_000,
        fairness: 5000,
        ready_runs: 3,
        sleepers: 20,
        sleep_only: false,
        forks_only: false,
        idle_only: false,
        idle: 20,
        real_node_only: false,
        real_pods: 100,
        docs_only: false,
        run_args: vec![],
        profile_host: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--pods" => a.pods = num(),
            "--big" => a.big = num(),
            "--fairness" => a.fairness = num(),
            "--ready-runs" => a.ready_runs = num(),
            "--sleepers" => a.sleepers = num(),
            "--sleep-only" => a.sleep_only = true,
            "--forks-only" => a.forks_only = true,
            "--idle-only" => a.idle_only = true,
            "--idle" => a.idle = num(),
            "--real-node-only" => a.real_node_only = true,
            "--real-pods" => a.real_pods = num(),
            "--docs-only" => a.docs_only = true,
            "--profile-host" => a.profile_host = num() as u64,
            f if f.starts_with("--run-arg=") => a.run_args.push(f["--run-arg=".len()..].to_string()),
            "--quick" => {
                a.pods = 200;
                a.big = 1000;
                a.fairness = 1000;
                a.ready_runs = 1;
                a.sleepers = 5;
                a.idle = 5;
            }
            other => {
                panic!(
                    "unknown flag {other}; flags: --pods N, --big N (0 skips), --fairness N (0 skips), --ready-runs N, --sleepers N (0 skips), --sleep-only, --forks-only, --idle-only, --idle N (0 skips), --real-node-only, --real-pods N, --quick, --docs-only, --run-arg=ARG, --profile-host SECONDS"
                )
            }
        }
    }
    a
}

/// Results, in the order measured: (key, value, unit, baseline or note).
#[derive(Default)]
struct Results {
    rows: Vec<(String, f64, &'static str, String)>,
    extra: BTreeMap<String, serde_json::Value>,
}

impl Results {
    fn add(&mut self, key: &str, value: f64, unit: &'static str, note: impl Into<String>) {
        let note = note.into();
        println!("  {key:<28} {value:>10.3} {unit:<6} {note}");
        self.rows.push((key.to_string(), value, unit, note));
    }
}

fn step(msg: &str) {
    println!("\n== {msg}");
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory field of /proc/PID/status (kB there) in MiB; NaN if the process is gone.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of /proc/pid/stat; `after` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

fn deployment(name: &str, replicas: usize) -> Deployment {
    deployment_of(name, replicas, "nginx")
}

fn deployment_of(name: &str, replicas: usize, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "c", "image": image}]}}}
    }))
    .expect("deployment")
}

async fn count_running(api: &Api<Pod>, selector: &str) -> (usize, usize) {
    let Ok(list) = api.list(&ListParams::default().labels(selector)).await else { return (0, 0) };
    let running =
        list.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count();
    (list.items.len(), running)
}

/// Waits until `api` has `n` pods matching `selector`, all Running; returns the seconds taken.
async fn wait_running(api: &Api<Pod>, selector: &str, n: usize, started: Instant, what: &str) -> f64 {
    let mut last = Instant::now();
    loop {
        let (total, running) = count_running(api, selector).await;
        if total == n && running == n {
            return started.elapsed().as_secs_f64();
        }
        if last.elapsed() > Duration::from_secs(5) {
            println!(
                "     {what}: {running}/{n} Running ({total} exist) after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(900) {
            panic!("{what}: not all {n} pods Running after 900 s ({running} Running)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the Deployment `name` has `n` replicas updated and Ready; returns the seconds
/// taken. It reads the Deployment only, so the wait costs the API server next to nothing.
async fn wait_deployment_ready(api: &Api<Deployment>, name: &str, n: usize, started: Instant, what: &str) -> f64 {
    let mut last = Instant::now();
    loop {
        let status = api.get_status(name).await.ok().and_then(|d| d.status).unwrap_or_default();
        let count = |v: Option<i32>| v.unwrap_or(0) as usize;
        let (ready, updated) = (count(status.ready_replicas), count(status.updated_replicas));
        if ready == n && updated == n {
            return started.elapsed().as_secs_f64();
        }
        if last.elapsed() > Duration::from_secs(5) {
            println!("     {what}: {ready}/{n} Ready after {:.0} s", started.elapsed().as_secs_f64());
            last = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(900) {
            panic!("{what}: not all {n} pods Ready after 900 s ({ready} Ready)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn start_cluster(
    env: &TestEnv,
    name: &str,
    timings: Option<&Mutex<Vec<(String, Instant)>>>,
) -> LocalControlPlane {
    start_cluster_with(env, name, timings, vec![]).await
}

async fn start_cluster_with(
    env: &TestEnv,
    name: &str,
    timings: Option<&Mutex<Vec<(String, Instant)>>>,
    run_args: Vec<String>,
) -> LocalControlPlane {
    let opts = LocalOptions {
        name: name.into(),
        namespace: vkube::names::default_namespace(name),
        dir: env.dir().join("virtual").join(name),
        lifetime: Lifetime::Attached,
        vkube_binary: vkube_bin(),
        host_kubeconfig: env.host.kubeconfig.clone(),
        host_context: None,
        policy: Default::default(),
        run_args,
    };
    let progress = |s: &str| {
        if let Some(t) = timings {
            t.lock().unwrap().push((s.to_string(), Instant::now()));
        }
    };
    LocalControlPlane::start(&opts, &progress).await.expect("virtual cluster")
}

async fn client(path: &Path) -> Client {
    vkube_localenv::client::from_kubeconfig_file(path, None).await.expect("client")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args();
    if a.docs_only {
        write_docs(&std::fs::read_to_string(results_dir().join("results.json")).expect("target/bench/results.json"));
        return;
    }
    let mut r = Results::default();
    let started = Instant::now();
    if a.real_node_only {
        step("host cluster with one real node (containerd, runc, CNI, kubelet, kube-proxy on this machine)");
        let env = TestEnv::start_with(HostOptions { nodes: 0, real_nodes: 1, ..Default::default() }).await;
        let host = env.client().await;
        step(&format!("11. sync throughput on a real node: {} pods, virtual vs directly on the host", a.real_pods));
        real_node_sync(&mut r, &env, &host, a.real_pods).await;
        write_only(&r, "realnode.json", started);
        return;
    }
    step("host cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok with 3 nodes)");
    let env = TestEnv::start(3).await;
    let host = env.client().await;
    step(&format!("1. ready: `vkube create --local` to the first request through the proxy ({} runs)", a.ready_runs));
    let mut readies = vec![];
    let mut splits: Vec<Vec<(String, f64)>> = vec![];
    for i in 0..a.ready_runs {
        let timings = Mutex::new(vec![]);
        let t0 = Instant::now();
        let cp = start_cluster(&env, &format!("ready-{i}"), Some(&timings)).await;
        cp.client().await.unwrap().apiserver_version().await.expect("first request");
        let total = t0.elapsed().as_secs_f64();
        readies.push(total);
        let marks = timings.into_inner().unwrap();
        let mut split = vec![];
        for w in marks.windows(2) {
            split.push((w[0].0.clone(), w[1].1.duration_since(w[0].1).as_secs_f64()));
        }
        if let Some(last) = marks.last() {
            split.push((last.0.clone(), t0.elapsed().as_secs_f64() - last.1.duration_since(t0).as_secs_f64()));
        }
        // From the start: the time before the first step (host client, service range) too.
        let lead = marks.first().map_or(0.0, |m| m.1.duration_since(t0).as_secs_f64());
        let steps: Vec<String> =
            std::iter::once(lead).chain(split.iter().map(|x| x.1)).map(|s| format!("{s:.2}")).collect();
        println!("     run {i}: {total:.2} s (before the steps, then each: {})", steps.join(" + "));
        splits.push(split);
        drop(cp);
    }
    let readies = sorted(readies);
    r.add("ready_seconds", percentile(&readies, 0.5), "s", format!("median of {}", readies.len()));
    if let Some(split) = splits.last() {
        for (stepname, secs) in split {
            println!("     {secs:>6.2} s  {stepname}");
        }
        r.extra.insert(
            "ready_split_seconds".into(),
            json!(split.iter().map(|(s, t)| json!({"step": s, "seconds": t})).collect::<Vec<_>>()),
        );
    }

    if a.sleep_only || a.forks_only || a.idle_only {
        let file = if a.sleep_only {
            step(&format!("8. sleep mode: sleeping footprint, wake, and {} clusters asleep side by side", a.sleepers));
            sleep_mode(&mut r, &env, &host, a.sleepers).await;
            "sleep.json"
        } else if a.idle_only {
            step(&format!("10. idle footprint: {} empty clusters side by side, per component", a.idle));
            idle(&mut r, &env, a.idle, &a.run_args).await;
            "idle.json"
        } else {
            step(FORKS_STEP);
            forks(&mut r, &env, &host).await;
            "forks.json"
        };
        write_only(&r, file, started);
        return;
    }

    step("the benchmark virtual cluster");
    let mut cp = start_cluster_with(&env, "bench", None, a.run_args.clone()).await;
    let direct = client(&cp.direct_kubeconfig()).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let vk_pid = cp.controller_pid().expect("vkube pid");
    r.add("rss_mib_idle", rss_mib(vk_pid), "MiB", "vkube process, empty cluster, after 10 s");
    let mut idle_total = rss_mib(vk_pid);
    for c in CHILDREN {
        if let Some(pid) = cp.pid(c) {
            idle_total += rss_mib(pid);
            r.add(&format!("rss_mib_idle_{}", c.replace('-', "_")), rss_mib(pid), "MiB", "upstream, for context");
        }
    }
    r.add(
        "footprint_mib_idle_total",
        idle_total,
        "MiB",
        "the three processes above summed (RSS: each counts the code it shares with other clusters; scenario 10 splits it)",
    );

    step(&format!("2. sync throughput: a Deployment of {} pods, virtual vs directly on the host", a.pods));
    let vdeploy: Api<Deployment> = Api::namespaced(direct.clone(), "default");
    let vpods: Api<Pod> = Api::namespaced(direct.clone(), "default");
    let host_ns = cp.state.namespace.clone();
    let hpods: Api<Pod> = Api::namespaced(host.clone(), &host_ns);
    let cpu0 = cpu_seconds(vk_pid);
    let procs = processes(&env, &cp);
    let before = cpu_of(&procs);
    let requests_before = host_requests(&host).await;
    let virtual_requests_before = host_requests(&direct).await;
    let profile = profile_host(&host, "virtual", a.profile_host);
    let t0 = Instant::now();
    vdeploy.create(&PostParams::default(), &deployment("burst", a.pods)).await.unwrap();
    let host_selector = &format!("{LABEL_CLUSTER}=bench,{}/app=burst", vkube_syncer::naming::TENANT_DOMAIN);
    // Waited for by the Deployment's status (one small GET a poll, on the virtual API server):
    // listing a thousand host pods four times a second cost the host API server more than a
    // second of CPU, charged to whichever run took longer. Its pods are Ready only once their
    // host copies run (their status comes from there).
    let virtual_total = wait_deployment_ready(&vdeploy, "burst", a.pods, t0, "the virtual deployment").await;
    r.add(
        "sync_1000_virtual_seconds",
        virtual_total,
        "s",
        format!("{} pods: the virtual Deployment's pods Ready (their host copies Running)", a.pods),
    );

    // The baseline starts only once the virtual run's work (statuses, events) is done, so
    // neither run slows the other.
    settle(&procs).await;
    // CPU and requests counted to the same point in both runs: once what the Deployment caused
    // (statuses, events) is done.
    let cpu_used = cpu_seconds(vk_pid) - cpu0;
    let virtual_cpu = diff(&before, &cpu_of(&procs));
    let virtual_requests = per_pod(&requests_before, &host_requests(&host).await, a.pods);
    // The virtual API server does the work the host's does in the direct run, and more.
    let virtual_api_requests = per_pod(&virtual_requests_before, &host_requests(&direct).await, a.pods);
    // The direct run starts once the profile is done, so that it is not in it.
    profile.await;
    let direct_ns: Api<Namespace> = Api::all(host.clone());
    direct_ns
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "bench-direct"}})).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hdeploy: Api<Deployment> = Api::namespaced(host.clone(), "bench-direct");
    let before = cpu_of(&procs);
    let requests_before = host_requests(&host).await;
    let profile = profile_host(&host, "direct", a.profile_host);
    let t0 = Instant::now();
    hdeploy.create(&PostParams::default(), &deployment("burst", a.pods)).await.unwrap();
    let direct_total =
        wait_deployment_ready(&hdeploy, "burst", a.pods, t0, "the Deployment directly on the host").await;
    settle(&procs).await;
    let direct_cpu = diff(&before, &cpu_of(&procs));
    let direct_requests = per_pod(&requests_before, &host_requests(&host).await, a.pods);
    profile.await;
    println!("     CPU seconds per process (virtual run / direct run):");
    let mut split = serde_json::Map::new();
    for ((name, v), (_, d)) in virtual_cpu.iter().zip(&direct_cpu) {
        println!("       {name:<34} {v:>7.2} / {d:>7.2}");
        split.insert(name.clone(), json!({"virtual_run": v, "direct_run": d}));
    }
    let (vt, dt): (f64, f64) = (virtual_cpu.iter().map(|x| x.1).sum(), direct_cpu.iter().map(|x| x.1).sum());
    println!("       {:<34} {vt:>7.2} / {dt:>7.2}", "all");
    r.extra.insert("sync_cpu_seconds_by_process".into(), serde_json::Value::Object(split));
    r.add("sync_1000_direct_seconds", direct_total, "s", "same Deployment directly in a host namespace");
    r.add("sync_1000_ratio", virtual_total / direct_total, "x", "virtual / direct");
    r.add("cpu_seconds_sync_1000", cpu_used, "s", "CPU the vkube process used for scenario 2");
    let cpu = |run: &[(String, f64)], name: &str| run.iter().find(|(n, _)| n == name).map_or(f64::NAN, |x| x.1);
    for (key, process) in [("host_apiserver_cpu_ratio", "host kube-apiserver"), ("host_etcd_cpu_ratio", "host etcd")] {
        let (v, d) = (cpu(&virtual_cpu, process), cpu(&direct_cpu, process));
        r.add(key, v / d, "x", format!("{process} CPU: {v:.2} s for the virtual run / {d:.2} s for the direct run"));
    }
    for (key, caption, virtual_side) in [
        ("host_requests_per_pod", "host API server requests per pod (virtual run / direct run)", &virtual_requests),
        (
            "virtual_requests_per_pod",
            "virtual API server requests per pod in the virtual run / host API server's in the direct run",
            &virtual_api_requests,
        ),
    ] {
        println!("     {caption}:");
        r.extra.insert(key.into(), side_by_side(virtual_side, &direct_requests));
    }
    let (v, d): (f64, f64) = (virtual_requests.values().sum(), direct_requests.values().sum());
    r.add(
        "host_requests_per_pod",
        v,
        "1/pod",
        format!("every request the host API server served during the virtual run, per pod; direct run {d:.2}, and a real node's kubelet would add 1 (the pod's token) that kwok does not make"),
    );
    hdeploy.delete("burst", &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let allocator = allocator_note(&cp.client().await.unwrap()).await;
    r.add("rss_mib_1000", rss_mib(vk_pid), "MiB", format!("vkube process with {} synced pods; {allocator}", a.pods));
    for c in CHILDREN {
        if let Some(pid) = cp.pid(c) {
            r.add(&format!("rss_mib_1000_{}", c.replace('-', "_")), rss_mib(pid), "MiB", "upstream, for context");
        }
    }

    let after = restart(&mut cp, &hpods, host_selector).await;
    if let Some(rss) = after.rss {
        r.add(
            "rss_mib_after_restart_1000",
            rss,
            "MiB",
            format!(
                "vkube process after a kill -9 and resync of {} pods: {} (goal: within 10 % of rss_mib_1000)",
                a.pods, after.rss_note
            ),
        );
    }
    // A new process: new pids, and the old client's pooled connections are gone.
    let procs = processes(&env, &cp);
    let proxied = cp.client().await.unwrap();

    settle(&procs).await;
    step("5. proxy overhead: the same requests through the proxy and straight to the virtual API server");
    proxy_overhead(&mut r, &proxied, &direct).await;
    exec_overhead(&mut r, &env, &cp, &proxied, &host_ns).await;

    step("3. sync latency: 100 pods created one at a time, 10 per second");
    sync_latency(&mut r, &direct, &host, &host_ns).await;

    if a.fairness > 0 {
        step(&format!("7. fairness: a regular tenant alone, then beside one creating {} pods at once", a.fairness));
        vdeploy.patch("burst", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}}))).await.unwrap();
        wait_running(&hpods, host_selector, 0, Instant::now(), "host pods of the scaled-down deployment").await;
        settle(&procs).await;
        fairness(&mut r, &env, &host, a.fairness).await;
        settle(&procs).await;
    }

    if a.big > 0 {
        step(&format!("4/6. footprint at {} pods, and the resync after a restart", a.big));
        vdeploy
            .patch("burst", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": a.big}})))
            .await
            .unwrap();
        let t0 = Instant::now();
        wait_running(&hpods, host_selector, a.big, t0, "host pods").await;
        wait_running(&vpods, "app=burst", a.big, t0, "virtual pods").await;
        // The restart below measures resyncing a settled state, not a backlog (host events are
        // mirrored at low concurrency and trail a burst of this size).
        wait_queues_drained(&proxied).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        r.add(
            &format!("rss_mib_{}", a.big),
            rss_mib(cp.controller_pid().expect("vkube pid")),
            "MiB",
            format!("vkube process with {} synced pods", a.big),
        );
        let after = restart(&mut cp, &hpods, host_selector).await;
        r.add(
            &format!("resync_{}_seconds", a.big),
            after.resync,
            "s",
            format!(
                "syncer start to every queue drained; {:.1} s from process start; host pods it wrote to: {}",
                after.wall, after.touched
            ),
        );
        r.extra.insert("resync_host_pods_modified".into(), json!(after.touched));
        if let Some(rss) = after.rss {
            r.add(
                &format!("rss_mib_after_restart_{}", a.big),
                rss,
                "MiB",
                format!(
                    "vkube process after a kill -9 and resync of {} pods: {} (goal: within 10 % of rss_mib_{})",
                    a.big, after.rss_note, a.big
                ),
            );
        }
    }

    drop(cp);
    if a.sleepers > 0 {
        step(&format!("8. sleep mode: sleeping footprint, wake, and {} clusters asleep side by side", a.sleepers));
        sleep_mode(&mut r, &env, &host, a.sleepers).await;
    }
    if a.idle > 0 {
        step(&format!("10. idle footprint: {} empty clusters side by side, per component", a.idle));
        idle(&mut r, &env, a.idle, &a.run_args).await;
    }
    step(FORKS_STEP);
    forks(&mut r, &env, &host).await;
    write_results(&r, &a, started.elapsed());
}

const FORKS_STEP: &str = "9. forks: a CI cluster from a golden snapshot, against setting it up from scratch";
/// The golden cluster's seed, the goal size: CRDs with custom resources spread over them,
/// ConfigMaps, and a Deployment of this many pods.
const SEED_CRDS: usize = 50;
const SEED_CUSTOM_RESOURCES: usize = 1_000;
const SEED_CONFIGMAPS: usize = 500;
const SEED_PODS: usize = 1_000;

/// Applies the seed as CI would (`kubectl apply` of manifests: the CRDs, once they are
/// established the rest) and waits until its pods run on the host.
async fn seed(cp: &LocalControlPlane, host: &Client, t0: Instant, dir: &std::path::Path) -> f64 {
    let crd = |i: usize| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: widget{i}s.seed.example.com}}\nspec:\n  group: seed.example.com\n  scope: Namespaced\n  names: {{plural: widget{i}s, singular: widget{i}, kind: Widget{i}}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n"
        )
    };
    let crds: Vec<String> = (0..SEED_CRDS).map(crd).collect();
    let mut rest: Vec<String> = (0..SEED_CUSTOM_RESOURCES)
        .map(|i| {
            format!(
                "apiVersion: seed.example.com/v1\nkind: Widget{}\nmetadata: {{name: w{i}, namespace: default}}\nspec: {{size: {i}}}\n",
                i % SEED_CRDS
            )
        })
        .collect();
    rest.extend((0..SEED_CONFIGMAPS).map(|i| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: seed-{i}, namespace: default}}\ndata: {{v: {}}}\n",
            "x".repeat(512)
        )
    }));
    rest.push(serde_json::to_string(&deployment("golden", SEED_PODS)).unwrap());
    let up = vkube_localenv::Upstream::locate().unwrap();
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new(up.kubectl())
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for (name, docs) in [("crds", &crds), ("objects", &rest)] {
        let file = dir.join(format!("seed-{name}.yaml"));
        std::fs::write(&file, docs.join("---\n")).unwrap();
        kubectl(&["apply", "-f", file.to_str().unwrap()]);
        if name == "crds" {
            kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=120s"]);
        }
    }
    wait_forked(cp, host, t0).await
}

/// Waits until the seed's pods run on the host; seconds since `t0`.
async fn wait_forked(cp: &LocalControlPlane, host: &Client, t0: Instant) -> f64 {
    let hpods: Api<Pod> = Api::namespaced(host.clone(), &cp.state.namespace);
    let selector = format!("{LABEL_CLUSTER}={},{}/app=golden", cp.state.name, vkube_syncer::naming::TENANT_DOMAIN);
    wait_running(&hpods, &selector, SEED_PODS, t0, "the seed's host pods").await
}

/// Scenario 9: a golden cluster set up from scratch (created, seeded object by object, its pods
/// running) against a fork of its snapshot (created, restored, its pods running): the CI path.
async fn forks(r: &mut Results, env: &TestEnv, host: &Client) {
    let t0 = Instant::now();
    let golden = start_cluster(env, "golden", None).await;
    let scratch = seed(&golden, host, t0, env.dir()).await;
    let admin = golden.client().await.unwrap();
    let t1 = Instant::now();
    let resp =
        admin.send(http::Request::get("/vkube/v1/snapshot").body(kube::client::Body::empty()).unwrap()).await.unwrap();
    assert!(resp.status().is_success(), "snapshot: {}", resp.status());
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let snapshot_seconds = t1.elapsed().as_secs_f64();
    drop(golden);
    let file = env.dir().join("golden.snapshot");
    std::fs::write(&file, &bytes).unwrap();
    let mut forks = vec![];
    let mut last = None;
    for i in 0..3 {
        // What `vkube create --local --from-snapshot` does: restored before the components start.
        let t2 = Instant::now();
        let fork =
            start_cluster_with(env, &format!("fork-{i}"), None, vec![format!("--initial-snapshot={}", file.display())])
                .await;
        let created = t2.elapsed().as_secs_f64();
        let running = wait_forked(&fork, host, t2).await;
        println!("     fork {i}: answering {created:.2} s, its {SEED_PODS} pods Running {running:.2} s");
        forks.push(running);
        last = Some(fork);
    }
    // A restore into a running cluster: components stopped, data replaced, started again.
    let fork = last.expect("a fork");
    let t3 = Instant::now();
    let req =
        http::Request::post("/vkube/v1/restore?fork=true").body(kube::client::Body::from(bytes.to_vec())).unwrap();
    let resp = fork.client().await.unwrap().send(req).await.unwrap();
    assert!(resp.status().is_success(), "restore: {}", resp.status());
    let restore_seconds = t3.elapsed().as_secs_f64();
    let fork_seconds = percentile(&sorted(forks), 0.5);
    r.add(
        "fork_seconds",
        fork_seconds,
        "s",
        format!(
            "`create --local --from-snapshot` of a golden cluster ({SEED_CRDS} CRDs, {SEED_CUSTOM_RESOURCES} custom resources, {SEED_CONFIGMAPS} ConfigMaps, a {SEED_PODS}-pod Deployment) until its pods run, median of 3; from scratch (create, kubectl apply, pods running) {scratch:.1} s ({:.1}x)", scratch / fork_seconds
        ),
    );
    r.add("restore_seconds", restore_seconds, "s", "that snapshot restored into a running cluster, to the answer");
    r.add("snapshot_seconds", snapshot_seconds, "s", format!("that golden cluster's snapshot, {} bytes", bytes.len()));
}

/// Asks a cluster's control plane to sleep or wake (what `vkube sleep`/`wake` do) and waits until
/// its host Service says it did; returns the seconds taken.
async fn power(host: &Client, cp: &LocalControlPlane, request: &str, want: &str) -> f64 {
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(host.clone(), &cp.state.namespace);
    let name = cp.state.name.clone();
    let since = |s: &k8s_openapi::api::core::v1::Service| {
        let a = s.metadata.annotations.clone().unwrap_or_default();
        (a.get("vkube.dev/power").cloned(), a.get("vkube.dev/power-since").cloned())
    };
    let before = since(&svcs.get(&name).await.unwrap()).1;
    let t0 = Instant::now();
    let patch = json!({"metadata": {"annotations": {"vkube.dev/power-request": request}}});
    svcs.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    loop {
        let (p, s) = since(&svcs.get(&name).await.unwrap());
        if p.as_deref() == Some(want) && s != before {
            return t0.elapsed().as_secs_f64();
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{name}: not {want} after 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a cluster sleeps before its memory is read: its periodic work (power and usage
/// ticks, state persisted every 10 s, the connections' 30 s keep-alives) has run at least once,
/// so the code it runs asleep is resident again after the pages given back at sleep.
const ASLEEP_SETTLE: Duration = Duration::from_secs(35);

/// Scenario 8: what a sleeping cluster still holds, how fast the first request wakes it (and
/// how fast its 20-pod Deployment is back), and how many sleeping clusters fit beside each other.
async fn sleep_mode(r: &mut Results, env: &TestEnv, host: &Client, sleepers: usize) {
    let cp = start_cluster(env, "sleeper", None).await;
    let proxied = cp.client().await.unwrap();
    let vdeploy: Api<Deployment> = Api::namespaced(proxied.clone(), "default");
    vdeploy.create(&PostParams::default(), &deployment("web", 20)).await.unwrap();
    let hpods: Api<Pod> = Api::namespaced(host.clone(), &cp.state.namespace);
    let selector = format!("{LABEL_CLUSTER}=sleeper,{}/app=web", vkube_syncer::naming::TENANT_DOMAIN);
    wait_running(&hpods, &selector, 20, Instant::now(), "host pods before sleeping").await;
    let awake_total: f64 = PROCESSES.iter().filter_map(|c| cp.pid(c)).map(rss_mib).sum();
    let vkube = cp.controller_pid().expect("vkube pid");
    let (mut wakes, mut backs, mut server, mut asleep_rss, mut to_sleep) = (vec![], vec![], vec![], vec![], vec![]);
    let wake_sum = || async {
        let text = proxied.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("vkube_wake_seconds_sum"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for i in 0..3 {
        to_sleep.push(power(host, &cp, "sleep", "Sleeping").await);
        tokio::time::sleep(ASLEEP_SETTLE).await;
        let children: Vec<u32> = CHILDREN.iter().filter_map(|c| cp.pid(c)).collect();
        assert!(children.is_empty(), "a sleeping cluster still runs {children:?}");
        asleep_rss.push(rss_mib(vkube));
        let before = wake_sum().await;
        let t0 = Instant::now();
        Api::<Pod>::namespaced(proxied.clone(), "default").list(&ListParams::default()).await.unwrap();
        let wake = t0.elapsed().as_secs_f64();
        let back = wait_running(&hpods, &selector, 20, t0, "host pods after waking").await;
        server.push(wake_sum().await - before);
        println!(
            "     cycle {i}: asleep {:.1} MiB, first request answered in {wake:.2} s, 20 pods Running in {back:.2} s",
            asleep_rss[i]
        );
        wakes.push(wake);
        backs.push(back);
    }
    let med = |v: Vec<f64>| percentile(&sorted(v), 0.5);
    let asleep = med(asleep_rss);
    r.add(
        "sleep_seconds",
        med(to_sleep),
        "s",
        "`vkube sleep` asked to Sleeping written (20 host pods removed, components stopped), median of 3",
    );
    r.add("footprint_mib_asleep", asleep, "MiB", format!("everything a sleeping cluster runs (the vkube process); awake {awake_total:.0} MiB (etcd, API server, controller manager, vkube)"));
    r.add("wake_seconds", med(wakes), "s", format!("first kubectl-style request on a sleeping cluster to its answer, median of 3; of which components started and API server ready {:.2} s", med(server)));
    r.add(
        "wake_pods_running_seconds",
        med(backs),
        "s",
        "same request to the 20-pod Deployment's host pods Running again, median of 3",
    );
    drop(cp);

    if sleepers == 0 {
        return;
    }
    // Clusters started one at a time and put to sleep at once: what they hold side by side.
    let mut asleep_cps = vec![];
    let t0 = Instant::now();
    for i in 0..sleepers {
        let cp = start_cluster(env, &format!("nap-{i}"), None).await;
        power(host, &cp, "sleep", "Sleeping").await;
        asleep_cps.push(cp);
    }
    tokio::time::sleep(ASLEEP_SETTLE).await;
    let sums = asleep_cps
        .iter()
        .filter_map(|cp| cp.controller_pid())
        .map(memory_mib)
        .fold([0.0; 3], |acc, m| [acc[0] + m[0], acc[1] + m[1], acc[2] + m[2]]);
    let [rss, pss, anon] = sums.map(|total| total / sleepers as f64);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN);
    r.add(
        "sleeping_clusters_rss_mib_each",
        rss,
        "MiB",
        format!(
            "{sleepers} clusters asleep side by side ({:.0} MiB in all; started and slept in {:.0} s)",
            sums[0],
            t0.elapsed().as_secs_f64()
        ),
    );
    r.add(
        "sleeping_clusters_pss_mib_each",
        pss,
        "MiB",
        format!("the same, each process's share of pages shared with the others (the binary's code); {anon:.1} MiB anonymous (its own heap and stacks)"),
    );
    r.add("density_sleeping_per_24gib", 24.0 * 1024.0 / pss, "clusters", format!("24 GiB / the PSS figure above (this machine: {mem_mib:.0} MiB); awake clusters hold about {awake_total:.0} MiB each"));
}

/// Waits until the vkube process's pod and event queues are empty (its /metrics; other queues
/// may hold retries scheduled minutes ahead), at most 10 minutes.
async fn wait_queues_drained(client: &kube::Client) {
    let started = Instant::now();
    loop {
        let text = client.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap_or_default();
        let queued: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("vkube_syncer_queue_depth{kind=\"Pod\"}")
                    || l.starts_with("vkube_syncer_queue_depth{kind=\"Event\"}")
            })
            .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        if queued == 0.0 || started.elapsed() > Duration::from_secs(600) {
            println!("     sync queues drained after {:.0} s ({queued} left)", started.elapsed().as_secs_f64());
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// (Rss, Pss, Anonymous) of a process in MiB, from /proc/PID/smaps_rollup: what it holds, its
/// share of pages shared with others (the same binaries' code), and what is its alone.
fn memory_mib(pid: u32) -> [f64; 3] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    ["Rss:", "Pss:", "Anonymous:"].map(|key| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    })
}

/// Scenario 10: `n` empty clusters started side by side and left idle: memory per cluster and per
/// component (resident, proportional, anonymous), idle CPU, and how many fit in 24 GiB. The Go
/// runtime settings in the environment (GOGC, GOMEMLIMIT) reach the upstream components, and so
/// do `--run-arg`s (a setting's cost: `--run-arg=--virtual-scheduler`).
async fn idle(r: &mut Results, env: &TestEnv, n: usize, run_args: &[String]) {
    let mut clusters = vec![];
    for i in 0..n {
        clusters.push(start_cluster_with(env, &format!("idle-{i}"), None, run_args.to_vec()).await);
        println!("     {} of {n} running", i + 1);
    }
    let procs: Vec<(String, u32)> = clusters
        .iter()
        .flat_map(|cp| PROCESSES.iter().filter_map(move |c| cp.pid(c).map(|pid| (c.to_string(), pid))))
        .collect();
    assert_eq!(procs.len(), n * PROCESSES.len(), "every component of every cluster runs");
    // Started, settled, then a minute more: what a cluster holds once nobody uses it.
    settle(&procs).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let window = Duration::from_secs(30);
    let before = cpu_of(&procs);
    tokio::time::sleep(window).await;
    let used: f64 = diff(&before, &cpu_of(&procs)).iter().map(|x| x.1).sum();
    let millicores = used / window.as_secs_f64() * 1000.0 / n as f64;
    let mem: Vec<(String, [f64; 3])> = procs.iter().map(|(c, pid)| (c.clone(), memory_mib(*pid))).collect();
    let per_cluster = |i: usize| mem.iter().map(|(_, m)| m[i]).sum::<f64>() / n as f64;
    let settings: Vec<String> =
        ["GOGC", "GOMEMLIMIT"].iter().filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}"))).collect();
    // Unset, each component runs with its own default (`vkube run`'s: GOGC=50 for etcd and the
    // control plane).
    let settings = if settings.is_empty() { "the components' Go defaults".to_string() } else { settings.join(" ") };
    let (rss, pss, anon) = (per_cluster(0), per_cluster(1), per_cluster(2));
    r.add("idle_rss_mib_per_cluster", rss, "MiB", format!("mean of {n} empty clusters side by side, {settings}"));
    r.add("idle_pss_mib_per_cluster", pss, "MiB", "proportional: pages shared between clusters (code) counted once");
    r.add("idle_anon_mib_per_cluster", anon, "MiB", "anonymous memory: heap and stacks, the cluster's alone");
    for c in PROCESSES {
        let of = |i: usize| {
            let v: Vec<f64> = mem.iter().filter(|(n, _)| n == c).map(|(_, m)| m[i]).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        r.add(
            &format!("idle_rss_mib_{}", c.replace('-', "_")),
            of(0),
            "MiB",
            format!("mean; PSS {:.1} MiB, anonymous {:.1} MiB", of(1), of(2)),
        );
    }
    r.add(
        "idle_millicores_per_cluster",
        millicores,
        "m",
        format!("CPU of all three processes over {} s", window.as_secs()),
    );
    r.add("density_idle_per_24gib", 24.0 * 1024.0 / pss, "clusters", "24 GiB / PSS per cluster (memory only)");
}

/// What a restart of the control-plane process costs once it has resynced.
struct Restart {
    /// The syncer's own figure: its start to every queue drained.
    resync: f64,
    /// Process start to the same.
    wall: f64,
    /// Host pods the restarted syncer wrote to (a settled state needs none).
    touched: usize,
    /// The new process's resident memory once it settled after the resync (none if it is gone).
    rss: Option<f64>,
    /// How it got there: 10 s after the resync, when it settled, and its peak (VmHWM).
    rss_note: String,
}

/// Kills the vkube process (kill -9), starts it again and waits for its initial sync.
async fn restart(cp: &mut LocalControlPlane, hpods: &Api<Pod>, host_selector: &str) -> Restart {
    cp.kill_controller();
    let restarted_at = k8s_openapi::jiff::Timestamp::now();
    let t0 = Instant::now();
    cp.start_controller().await.unwrap();
    let proxied = cp.client().await.unwrap();
    let resync = loop {
        let text = proxied.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap_or_default();
        let v = text
            .lines()
            .find(|l| l.starts_with("vkube_syncer_initial_sync_seconds"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if v > 0.0 {
            break v;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            panic!("no initial sync after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = t0.elapsed().as_secs_f64();
    // Host pods the restarted syncer wrote to (its managed-fields entries say when).
    let touched = hpods
        .list(&ListParams::default().labels(host_selector))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| {
            p.metadata.managed_fields.iter().flatten().any(|m| {
                m.manager.as_deref() == Some(vkube_core::contract::FIELD_MANAGER)
                    && m.time.as_ref().is_some_and(|t| t.0 >= restarted_at)
            })
        })
        .count();
    // Memory a restart leaves is what the process keeps, not the burst of its initial lists
    // while they are being freed: read 10 s after the resync, then every 5 s until the last 30 s
    // of readings lie within 1 % (at most 3 minutes more). The peak is reported beside it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let Some(pid) = cp.controller_pid() else {
        return Restart { resync, wall, touched, rss: None, rss_note: "the process is gone".into() };
    };
    let first = rss_mib(pid);
    let (mut window, settle_start) = (vec![first], Instant::now());
    let settled = loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        window.push(rss_mib(pid));
        let recent = &window[window.len().saturating_sub(7)..];
        let (lo, hi) = recent.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        if recent.len() == 7 && hi - lo < 0.01 * hi {
            break true;
        }
        if settle_start.elapsed() > Duration::from_secs(180) {
            break false;
        }
    };
    let last = *window.last().unwrap_or(&first);
    let rss_note = format!(
        "{first:.1} MiB 10 s after the resync, {last:.1} MiB {:.0} s later ({}); peak {:.1} MiB; {}",
        settle_start.elapsed().as_secs_f64(),
        if settled { "steady over its last 30 s" } else { "still moving" },
        status_mib(pid, "VmHWM:"),
        allocator_note(&proxied).await
    );
    Restart { resync, wall, touched, rss: Some(last), rss_note }
}

/// The vkube process's allocator figures (`/metrics`): live objects, their pages, all it holds.
async fn allocator_note(proxied: &Client) -> String {
    let mut figures = vec![];
    for name in ["allocated", "active", "resident"] {
        let bytes = scrape(proxied, &format!("vkube_allocator_{name}_bytes"), "").await;
        figures.push(format!("{:.1} MiB {name}", bytes / (1024.0 * 1024.0)));
    }
    format!("allocator: {}", figures.join(", "))
}

/// The results of a partial run (`--sleep-only` and the like) in target/bench/`file`; the docs are
/// left alone.
fn write_only(r: &Results, file: &str, started: Instant) {
    let rows: serde_json::Map<String, serde_json::Value> =
        r.rows.iter().map(|(k, v, u, n)| (k.clone(), json!({"value": v, "unit": u, "note": n}))).collect();
    std::fs::create_dir_all(results_dir()).unwrap();
    std::fs::write(results_dir().join(file), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    println!("\nwrote target/bench/{file} ({:.0} s)", started.elapsed().as_secs_f64());
}

/// Scenario 11: scenario 2's comparison on a host whose node is real, so the kubelet's own pace
/// (sandboxes, CNI, containers) is in both runs: a Deployment of `n` pause containers in a virtual
/// cluster, then directly in a host namespace (the first one's pods gone by then, so the node runs
/// one at a time), each timed to all its pods Ready.
async fn real_node_sync(r: &mut Results, env: &TestEnv, host: &Client, n: usize) {
    let cp = start_cluster(env, "bench-rn", None).await;
    let direct = client(&cp.direct_kubeconfig()).await;
    let procs = processes(env, &cp);
    // Settled with the node too: its pods' API objects go before the kubelet has torn down
    // their sandboxes and networks, work the next run would otherwise be charged with.
    let with_node: Vec<(String, u32)> = procs.iter().cloned().chain(node_processes()).collect();
    let image = vkube_localenv::node::PAUSE_IMAGE;
    settle(&procs).await;

    // One run: the Deployment made, timed to Ready, and the CPU its processes used until settled.
    let run = |api: Api<Deployment>, what: &'static str| {
        let procs = procs.clone();
        async move {
            let before = cpu_of(&procs);
            let t0 = Instant::now();
            api.create(&PostParams::default(), &deployment_of("burst", n, image)).await.unwrap();
            let total = wait_deployment_ready(&api, "burst", n, t0, what).await;
            settle(&procs).await;
            let cpu = diff(&before, &cpu_of(&procs));
            api.delete("burst", &Default::default()).await.unwrap();
            (total, cpu)
        }
    };
    let (virtual_total, virtual_cpu) = run(Api::namespaced(direct.clone(), "default"), "the virtual deployment").await;
    let hpods: Api<Pod> = Api::namespaced(host.clone(), &cp.state.namespace);
    let selector = format!("{LABEL_CLUSTER}=bench-rn,{}/app=burst", vkube_syncer::naming::TENANT_DOMAIN);
    let gone = Instant::now();
    // (A failed list is not an empty one.)
    while hpods.list_metadata(&ListParams::default().labels(&selector)).await.map_or(true, |l| !l.items.is_empty()) {
        assert!(gone.elapsed() < Duration::from_secs(600), "the virtual run's host pods still there after 600 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And their sandboxes, one containerd shim each: until their number holds for 5 s (the node's
    // own pods, CoreDNS, keep theirs).
    let (mut shims, mut since) = (count_processes("containerd-shim"), Instant::now());
    while since.elapsed() < Duration::from_secs(5) {
        assert!(gone.elapsed() < Duration::from_secs(600), "the virtual run's sandboxes still going after 600 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = count_processes("containerd-shim");
        if now != shims {
            (shims, since) = (now, Instant::now());
        }
    }
    println!("     the virtual run's host pods and sandboxes gone after {:.0} s", gone.elapsed().as_secs_f64());
    settle(&with_node).await;

    let namespaces: Api<Namespace> = Api::all(host.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": "bench-direct-rn"}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (direct_total, direct_cpu) =
        run(Api::namespaced(host.clone(), "bench-direct-rn"), "the Deployment directly on the host").await;
    let what = format!("{n} pause containers on one real node");
    r.add("sync_real_node_virtual_seconds", virtual_total, "s", format!("{what}: the virtual Deployment Ready"));
    r.add(
        "sync_real_node_direct_seconds",
        direct_total,
        "s",
        format!("{what}: the same Deployment directly on the host"),
    );
    r.add("sync_real_node_ratio", virtual_total / direct_total, "x", "virtual / direct (goal of sync_1000_ratio: 1.6)");
    let cpu = |run: &[(String, f64)], name: &str| run.iter().find(|(p, _)| p == name).map_or(f64::NAN, |x| x.1);
    let (v, d) = (cpu(&virtual_cpu, "host kube-apiserver"), cpu(&direct_cpu, "host kube-apiserver"));
    r.add(
        "host_apiserver_cpu_ratio_real_node",
        v / d,
        "x",
        format!(
            "host kube-apiserver CPU: {v:.2} s for the virtual run / {d:.2} s for the direct run (kubelet included)"
        ),
    );
}

/// Every process of this machine: (pid, its command name).
fn all_processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((pid, std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string()))
    })
    .collect()
}

/// The real node's kubelet, containerd and kube-proxy (one real node per machine).
fn node_processes() -> Vec<(String, u32)> {
    let node = |c: &str| matches!(c, "kubelet" | "containerd" | "kube-proxy");
    all_processes().into_iter().filter(|(_, c)| node(c)).map(|(pid, c)| (format!("node {c}"), pid)).collect()
}

/// How many processes' command names start with `prefix` (names are cut to 15 bytes).
fn count_processes(prefix: &str) -> usize {
    all_processes().iter().filter(|(_, c)| c.starts_with(prefix)).count()
}

/// Waits until the processes are nearly idle (on average under 2.5% of a core each over 2 s), at
/// most 2 minutes.
async fn settle(procs: &[(String, u32)]) {
    let started = Instant::now();
    loop {
        let before: f64 = cpu_of(procs).iter().map(|x| x.1).sum();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used: f64 = cpu_of(procs).iter().map(|x| x.1).sum::<f64>() - before;
        if used < 0.1 * procs.len() as f64 / 2.0 || started.elapsed() > Duration::from_secs(120) {
            println!("     settled after {:.0} s", started.elapsed().as_secs_f64());
            return;
        }
    }
}

/// Every process of the run, by name: the host's and the virtual cluster's.
fn processes(env: &TestEnv, cp: &LocalControlPlane) -> Vec<(String, u32)> {
    let mut out = vec![];
    for c in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"] {
        if let Some(pid) = env.host.pid(c) {
            out.push((format!("host {c}"), pid));
        }
    }
    for c in PROCESSES {
        if let Some(pid) = cp.pid(c) {
            out.push((format!("virtual {c}"), pid));
        }
    }
    out
}

fn cpu_of(procs: &[(String, u32)]) -> Vec<(String, f64)> {
    procs.iter().map(|(n, pid)| (n.clone(), cpu_seconds(*pid))).collect()
}

fn diff(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    before.iter().zip(after).map(|((n, b), (_, a))| (n.clone(), a - b)).collect()
}

async fn proxy_overhead(r: &mut Results, proxied: &Client, direct: &Client) {
    let cms: Api<ConfigMap> = Api::namespaced(direct.clone(), "default");
    let _ = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "probe"}, "data": {"a": "b"}})).unwrap(),
        )
        .await;
    let get = |c: Client| async move {
        let t = Instant::now();
        Api::<ConfigMap>::namespaced(c, "default").get("probe").await.expect("get");
        t.elapsed().as_secs_f64()
    };
    let list = |c: Client| async move {
        let t = Instant::now();
        let n = Api::<Pod>::namespaced(c, "default").list(&ListParams::default()).await.expect("list").items.len();
        assert!(n > 0);
        t.elapsed().as_secs_f64()
    };
    for (name, n1, n16) in [("get", 1000usize, 4000usize), ("list", 20, 64)] {
        let mut p50 = [0.0f64; 2];
        let mut tput = [0.0f64; 2];
        for (i, c) in [proxied.clone(), direct.clone()].into_iter().enumerate() {
            // Warm both paths.
            for _ in 0..5 {
                if name == "get" {
                    get(c.clone()).await
                } else {
                    list(c.clone()).await
                };
            }
            let mut lat = vec![];
            for _ in 0..n1 {
                lat.push(if name == "get" { get(c.clone()).await } else { list(c.clone()).await });
            }
            p50[i] = percentile(&sorted(lat), 0.5) * 1000.0;
            let t = Instant::now();
            let results: Vec<f64> = futures::stream::iter(0..n16)
                .map(|_| {
                    let c = c.clone();
                    async move { if name == "get" { get(c).await } else { list(c).await } }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            tput[i] = results.len() as f64 / t.elapsed().as_secs_f64();
        }
        let what = if name == "get" { "GET one object".to_string() } else { "LIST of all pods".to_string() };
        r.add(&format!("proxy_{name}_p50_ms"), p50[0], "ms", format!("{what}, concurrency 1; direct {:.3} ms", p50[1]));
        r.add(&format!("proxy_{name}_p50_overhead_ms"), p50[0] - p50[1], "ms", "through proxy - direct");
        r.add(
            &format!("proxy_{name}_throughput_ratio"),
            tput[0] / tput[1],
            "x",
            format!("concurrency 16: {:.0}/s through the proxy, {:.0}/s direct", tput[0], tput[1]),
        );
        if name == "get" {
            r.add("proxy_p50_overhead_ms", p50[0] - p50[1], "ms", "GET, concurrency 1");
            r.add("proxy_throughput_ratio", tput[0] / tput[1], "x", "GET, concurrency 16");
        }
    }
    // Watch-event delivery: both watches open, 200 updates, time from update to event.
    let seen: Arc<Mutex<[HashMap<String, Instant>; 2]>> = Arc::default();
    let mut tasks = vec![];
    for (i, c) in [proxied.clone(), direct.clone()].into_iter().enumerate() {
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::namespaced(c, "default");
            let stream = watcher::watcher(api, watcher::Config::default().fields("metadata.name=probe"));
            futures::pin_mut!(stream);
            while let Ok(Some(ev)) = stream.try_next().await {
                if let Event::Apply(cm) = ev {
                    let v = cm.data.unwrap_or_default().get("n").cloned().unwrap_or_default();
                    seen.lock().unwrap()[i].entry(v).or_insert_with(Instant::now);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sent = HashMap::new();
    for n in 0..200 {
        let t = Instant::now();
        cms.patch("probe", &PatchParams::default(), &Patch::Merge(json!({"data": {"n": n.to_string()}})))
            .await
            .unwrap();
        sent.insert(n.to_string(), t);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tasks.iter().for_each(|t| t.abort());
    let seen = seen.lock().unwrap();
    let mut p50 = [0.0; 2];
    for (i, s) in seen.iter().enumerate() {
        let lat: Vec<f64> =
            sent.iter().filter_map(|(k, t)| s.get(k).map(|at| at.duration_since(*t).as_secs_f64() * 1000.0)).collect();
        p50[i] = percentile(&sorted(lat), 0.5);
    }
    r.add(
        "proxy_watch_p50_ms",
        p50[0],
        "ms",
        format!("update to watch event, through the proxy; direct {:.3} ms", p50[1]),
    );
    r.add("proxy_watch_p50_overhead_ms", p50[0] - p50[1], "ms", "through proxy - direct");
}

/// `kubectl exec` of one virtual pod through the proxy (the virtual API server, vkube's kubelet,
/// the host API server), beside the same command on its host copy straight at the host API
/// server (where the proxy sent exec before it went through the virtual API server): medians of
/// 20, alternating, each kubectl process's own start included on both sides.
async fn exec_overhead(r: &mut Results, env: &TestEnv, cp: &LocalControlPlane, proxied: &Client, host_ns: &str) {
    let pods = Api::<Pod>::namespaced(proxied.clone(), "default").list(&ListParams::default()).await.expect("pods");
    let Some(pod) = pods.items.iter().find(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some())) else {
        eprintln!("no bound virtual pod: exec not measured");
        return;
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let host_name = vkube_syncer::naming::Translator::new(&cp.state.name, host_ns).host_name("default", &name);
    let up = vkube_localenv::Upstream::locate().unwrap();
    let exec = |kubeconfig: &Path, namespace: &str, pod: &str| {
        let t = Instant::now();
        let out = std::process::Command::new(up.kubectl())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["exec", "-n", namespace, pod, "--", "echo", "exec-probe"])
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "exec-probe",
            "kubectl exec {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64() * 1000.0
    };
    let (virt, host) = (cp.kubeconfig(), env.host.kubeconfig.clone());
    let (mut through, mut straight) = (vec![], vec![]);
    for i in 0..23 {
        let (v, h) = (exec(&virt, "default", &name), exec(&host, host_ns, &host_name));
        if i >= 3 {
            through.push(v);
            straight.push(h);
        }
    }
    let (v, h) = (percentile(&sorted(through), 0.5), percentile(&sorted(straight), 0.5));
    r.add(
        "exec_p50_ms",
        v,
        "ms",
        format!("kubectl exec (echo) through the proxy, the virtual API server and vkube's kubelet; on the host copy straight at the host API server {h:.1} ms"),
    );
    r.add("exec_p50_overhead_ms", v - h, "ms", "through the virtual cluster - on the host copy directly");
}

/// Create → host pod, and host Running → virtual Running, of pods a tenant creates one at a
/// time, in milliseconds.
struct Paced {
    to_host: Vec<f64>,
    back: Vec<f64>,
}

/// Creates `count` bare pods labelled `app=<app>` in the virtual cluster behind `direct`, one
/// every `every` (or until `until` says stop, if sooner), and times each one's way to the host
/// (its host copy in `host_ns`) and back (virtual Running). Sorted; the pods are deleted after.
async fn paced_pods(
    direct: &Client,
    host: &Client,
    host_ns: &str,
    app: &str,
    count: usize,
    every: Duration,
    until: impl Fn() -> bool,
) -> Paced {
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let host_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let host_running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let virtual_running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let hs = (host_seen.clone(), host_running.clone());
    let hapi: Api<Pod> = Api::namespaced(host.clone(), host_ns);
    let selector = format!("{}/app={app}", vkube_syncer::naming::TENANT_DOMAIN);
    let htask = tokio::spawn(async move {
        let stream = watcher::watcher(hapi, watcher::Config::default().labels(&selector));
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            if let Event::Apply(p) | Event::InitApply(p) = ev {
                let name = p.annotations().get(ANNOTATION_NAME).cloned().unwrap_or_default();
                hs.0.lock().unwrap().entry(name.clone()).or_insert_with(Instant::now);
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    hs.1.lock().unwrap().entry(name).or_insert_with(Instant::now);
                }
            }
        }
    });
    let vr = virtual_running.clone();
    let vapi: Api<Pod> = Api::namespaced(direct.clone(), "default");
    let vselector = format!("app={app}");
    let vtask = tokio::spawn(async move {
        let stream = watcher::watcher(vapi, watcher::Config::default().labels(&vselector));
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            if let Event::Apply(p) | Event::InitApply(p) = ev
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            {
                vr.lock().unwrap().entry(p.name_any()).or_insert_with(Instant::now);
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: Api<Pod> = Api::namespaced(direct.clone(), "default");
    let mut made = 0;
    while made < count && !until() {
        let name = format!("{app}-{made}");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": app}},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "c", "image": "nginx"}]}}))
        .unwrap();
        let t = Instant::now();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        created.lock().unwrap().insert(name, t);
        made += 1;
        tokio::time::sleep(every.saturating_sub(t.elapsed())).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while virtual_running.lock().unwrap().len() < made && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    htask.abort();
    vtask.abort();
    let created = created.lock().unwrap().clone();
    let to_host: Vec<f64> = {
        let hs = host_seen.lock().unwrap();
        created
            .iter()
            .map(|(n, t)| {
                // A pod never seen on the host counts as the longest wait there was.
                hs.get(n).map_or(deadline.duration_since(*t), |h| h.saturating_duration_since(*t)).as_secs_f64()
                    * 1000.0
            })
            .collect()
    };
    let back: Vec<f64> = {
        let (hr, vr) = (host_running.lock().unwrap(), virtual_running.lock().unwrap());
        hr.iter()
            .filter_map(|(n, h)| vr.get(n).map(|v| v.saturating_duration_since(*h).as_secs_f64() * 1000.0))
            .collect()
    };
    let _ = pods.delete_collection(&Default::default(), &ListParams::default().labels(&format!("app={app}"))).await;
    Paced { to_host: sorted(to_host), back: sorted(back) }
}

async fn sync_latency(r: &mut Results, direct: &Client, host: &Client, host_ns: &str) {
    let p = paced_pods(direct, host, host_ns, "lat", 100, Duration::from_millis(100), || false).await;
    r.add(
        "sync_p50_ms",
        percentile(&p.to_host, 0.5),
        "ms",
        format!("virtual create to host pod, {} pods", p.to_host.len()),
    );
    r.add("sync_p99_ms", percentile(&p.to_host, 0.99), "ms", "");
    r.add("status_p50_ms", percentile(&p.back, 0.5), "ms", "host pod Running to virtual pod Running");
    r.add("status_p99_ms", percentile(&p.back, 0.99), "ms", "");
}

/// The host API server's `apiserver_request_total` by verb and resource (`VERB resource/sub`).
async fn host_requests(host: &Client) -> BTreeMap<String, f64> {
    let text = host.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((labels, value)) = line.strip_prefix("apiserver_request_total{").and_then(|l| l.rsplit_once("} "))
        else {
            continue;
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"')).unwrap_or("")
        };
        let sub = label("subresource");
        let key = format!("{} {}{}{sub}", label("verb"), label("resource"), if sub.is_empty() { "" } else { "/" });
        *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Requests per pod of two runs as a table (printed too): those of either at 0.005 or more.
fn side_by_side(virtual_run: &BTreeMap<String, f64>, direct_run: &BTreeMap<String, f64>) -> serde_json::Value {
    let mut table = serde_json::Map::new();
    for key in virtual_run.keys().chain(direct_run.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (v, d) = (virtual_run.get(key).copied().unwrap_or(0.0), direct_run.get(key).copied().unwrap_or(0.0));
        if v >= 0.005 || d >= 0.005 {
            println!("       {key:<40} {v:>6.2} / {d:>6.2}");
            table.insert(key.clone(), json!({"virtual_run": v, "direct_run": d}));
        }
    }
    serde_json::Value::Object(table)
}

/// What each key grew by from `before` to `after`, per pod.
fn per_pod(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, pods: usize) -> BTreeMap<String, f64> {
    after.iter().map(|(k, a)| (k.clone(), (a - before.get(k).copied().unwrap_or(0.0)) / pods as f64)).collect()
}

/// One number from a Prometheus text page: the sum of the samples of `metric` whose label set
/// contains `labels` (empty: all of them).
async fn scrape(client: &Client, metric: &str, labels: &str) -> f64 {
    let text = client.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.split_whitespace().next().is_some_and(|series| series.contains(labels))
        })
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Scenario 7: a regular tenant (one pod every 200 ms) alone, then beside a greedy one creating
/// `greedy` pods at once, on the same host: the regular tenant's create → host pod latency both
/// times, and the host requests each tenant made while the greedy one ran.
async fn fairness(r: &mut Results, env: &TestEnv, host: &Client, greedy: usize) {
    let regular = start_cluster(env, "regular", None).await;
    let noisy = start_cluster(env, "greedy", None).await;
    let (reg_direct, reg_proxied) = (client(&regular.direct_kubeconfig()).await, regular.client().await.unwrap());
    let (noisy_direct, noisy_proxied) = (client(&noisy.direct_kubeconfig()).await, noisy.client().await.unwrap());
    let (reg_ns, noisy_ns) = (regular.state.namespace.clone(), noisy.state.namespace.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let every = Duration::from_millis(200);

    println!("     the regular tenant alone: 150 pods, one every 200 ms");
    let alone = paced_pods(&reg_direct, host, &reg_ns, "alone", 150, every, || false).await;
    println!(
        "       create → host pod p50 {:.0} ms, p99 {:.0} ms",
        percentile(&alone.to_host, 0.5),
        percentile(&alone.to_host, 0.99)
    );

    println!("     beside a greedy tenant creating {greedy} pods at once");
    // Host reads and writes of each tenant, the greedy one's wait for its bucket, and all
    // requests the host API server served.
    let counters = || async {
        let mut v = vec![];
        for c in [&reg_proxied, &noisy_proxied] {
            for kind in ["read", "write"] {
                v.push(scrape(c, "vkube_host_requests_total", &format!("kind=\"{kind}\"")).await);
            }
        }
        v.push(scrape(&noisy_proxied, "vkube_host_write_wait_seconds_total", "").await);
        v.push(scrape(host, "apiserver_request_total", "").await);
        v
    };
    let before = counters().await;
    let t0 = Instant::now();
    Api::<Deployment>::namespaced(noisy_direct.clone(), "default")
        .create(&PostParams::default(), &deployment("greedy", greedy))
        .await
        .unwrap();
    // The regular tenant goes on while the greedy one's host pods are still being made.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch_done = {
        let (done, hpods) = (done.clone(), Api::<Pod>::namespaced(host.clone(), &noisy_ns));
        let selector = format!("{}/app=greedy", vkube_syncer::naming::TENANT_DOMAIN);
        tokio::spawn(async move {
            let took = wait_running(&hpods, &selector, greedy, Instant::now(), "the greedy tenant's host pods").await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            took
        })
    };
    let beside = {
        let done = done.clone();
        paced_pods(&reg_direct, host, &reg_ns, "beside", 1500, every, move || {
            done.load(std::sync::atomic::Ordering::Relaxed)
        })
        .await
    };
    let greedy_took = watch_done.await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let after = counters().await;
    let rate = |i: usize| (after[i] - before[i]) / secs;
    let noisy_wait = after[4] - before[4];

    r.add(
        "fair_alone_p50_ms",
        percentile(&alone.to_host, 0.5),
        "ms",
        format!("regular tenant alone: create to host pod, {} pods at 5/s", alone.to_host.len()),
    );
    r.add("fair_alone_p99_ms", percentile(&alone.to_host, 0.99), "ms", "");
    r.add(
        "fair_beside_p50_ms",
        percentile(&beside.to_host, 0.5),
        "ms",
        format!("the same beside a tenant creating {greedy} pods at once ({} pods at 5/s)", beside.to_host.len()),
    );
    r.add("fair_beside_p99_ms", percentile(&beside.to_host, 0.99), "ms", "goal: under 1,000 ms");
    r.add("fair_greedy_seconds", greedy_took, "s", format!("the greedy tenant's {greedy} host pods Running"));
    r.add(
        "fair_greedy_host_writes_per_s",
        rate(3),
        "1/s",
        format!("its host reads {:.1}/s; it waited {noisy_wait:.0} s in all for its write bucket", rate(2)),
    );
    r.add("fair_regular_host_writes_per_s", rate(1), "1/s", format!("its host reads {:.1}/s", rate(0)));
    r.add("fair_host_requests_per_s", rate(5), "1/s", "all requests the host API server served meanwhile");
    let _ = Api::<Deployment>::namespaced(noisy_direct, "default").delete("greedy", &Default::default()).await;
    drop(noisy);
    drop(regular);
    // The greedy tenant's host pods go with its namespace, before the next scenario starts.
    let namespaces: Api<Namespace> = Api::all(host.clone());
    for ns in [&noisy_ns, &reg_ns] {
        let _ = namespaces.delete(ns, &Default::default()).await;
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(600) {
        let left = futures::future::join_all([&noisy_ns, &reg_ns].map(|ns| namespaces.get_opt(ns))).await;
        if left.iter().all(|n| matches!(n, Ok(None))) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores ({cpu}), {mem:.0} GiB")
}

/// A CPU profile of the host API server over the next `seconds` (none if 0), written to
/// target/bench/host-apiserver-`run`.pprof when it is done. The bench waits for it after the
/// run's figures are read and before the next run starts: give it at least the run's length.
fn profile_host(host: &Client, run: &str, seconds: u64) -> impl Future<Output = ()> + use<> {
    let (host, path) = (host.clone(), results_dir().join(format!("host-apiserver-{run}.pprof")));
    let task = tokio::spawn(async move {
        if seconds == 0 {
            return;
        }
        let uri = format!("/debug/pprof/profile?seconds={seconds}");
        let request = http::Request::get(uri).body(kube::client::Body::empty()).unwrap();
        let got = async {
            let response = host.send(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.into_body().collect_bytes().await.map_err(|e| e.to_string())?;
            if status.is_success() { Ok(body) } else { Err(format!("{status}: {}", String::from_utf8_lossy(&body))) }
        };
        match got.await {
            Ok(bytes) => {
                std::fs::create_dir_all(results_dir()).unwrap();
                std::fs::write(&path, bytes).unwrap();
                println!("     wrote {}", path.display());
            }
            Err(e) => println!("     no host API server profile: {e}"),
        }
    });
    async move { task.await.unwrap() }
}

fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

fn write_results(r: &Results, a: &Args, took: Duration) {
    let rows: Vec<serde_json::Value> =
        r.rows.iter().map(|(k, v, u, n)| json!({"key": k, "value": v, "unit": u, "note": n})).collect();
    let mut json = serde_json::Map::new();
    for (k, v, u, n) in &r.rows {
        json.insert(k.clone(), json!({"value": v, "unit": u, "note": n}));
    }
    for (k, v) in &r.extra {
        json.insert(k.clone(), v.clone());
    }
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json.insert("rows".into(), json!(rows));
    json.insert("machine".into(), json!(machine()));
    json.insert("date".into(), json!(date));
    json.insert("pods".into(), json!(a.pods));
    json.insert("big".into(), json!(a.big));
    json.insert("fairness".into(), json!(a.fairness));
    json.insert("seconds".into(), json!(took.as_secs_f64()));
    let text = serde_json::to_string_pretty(&json).unwrap();
    std::fs::create_dir_all(results_dir()).unwrap();
    std::fs::write(results_dir().join("results.json"), &text).unwrap();
    write_docs(&text);
}

/// docs/benchmarks.md: the run's table, then the analysis kept in docs/benchmarks-notes.md.
fn write_docs(results: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let j: serde_json::Value = serde_json::from_str(results).expect("results.json");
    let s = |k: &str| j[k].as_str().map(str::to_string).unwrap_or_else(|| j[k].to_string());
    let mut md = String::new();
    md.push_str("# Benchmarks\n\nWritten by `hack/bench` (do not edit by hand; the analysis below the table is kept in\n`docs/benchmarks-notes.md`, and `hack/bench --docs-only` rewrites this file from the last run). Every\nfigure is measured in one run on the local dev host cluster (real etcd, kube-apiserver,\ncontroller-manager and scheduler, nodes simulated by kwok), beside its baseline from the same run.\n\n");
    md.push_str(&format!(
        "- machine: {}\n- date: {}\n- pods: {} (scenario 2), {} (scenarios 4 and 6), {} for the greedy tenant (scenario 7); the run took {:.0} s\n\n",
        s("machine"),
        s("date"),
        s("pods"),
        s("big"),
        s("fairness"),
        j["seconds"].as_f64().unwrap_or(0.0)
    ));
    md.push_str("| figure | value | unit | baseline / note |\n|---|---:|---|---|\n");
    for row in j["rows"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| `{}` | {:.3} | {} | {} |\n",
            row["key"].as_str().unwrap_or_default(),
            row["value"].as_f64().unwrap_or(f64::NAN),
            row["unit"].as_str().unwrap_or_default(),
            row["note"].as_str().unwrap_or_default()
        ));
    }
    // Scenario 2's side-by-side tables: (key in results.json, caption, first column).
    for (key, caption, first) in [
        (
            "sync_cpu_seconds_by_process",
            "CPU seconds per process during scenario 2 (virtual run / direct run)",
            "process",
        ),
        (
            "host_requests_per_pod",
            "Host API server requests per pod, by verb and resource, during scenario 2 (virtual run / direct run)",
            "request",
        ),
        (
            "virtual_requests_per_pod",
            "Virtual API server requests per pod during scenario 2's virtual run, beside the host API server's in the direct run (the same Deployment served by one API server)",
            "request",
        ),
    ] {
        let Some(rows) = j[key].as_object() else { continue };
        md.push_str(&format!("\n{caption}:\n\n| {first} | virtual run | direct run |\n|---|---:|---:|\n"));
        for (name, v) in rows {
            let side = |k: &str| v[k].as_f64().unwrap_or(0.0);
            md.push_str(&format!("| {name} | {:.2} | {:.2} |\n", side("virtual_run"), side("direct_run")));
        }
    }
    if let Ok(notes) = std::fs::read_to_string(root.join("docs/benchmarks-notes.md")) {
        md.push('\n');
        md.push_str(&notes);
    }
    std::fs::write(root.join("docs/benchmarks.md"), md).unwrap();
    println!("\nwrote target/bench/results.json and docs/benchmarks.md");
}
