//! The dev host cluster itself: real upstream processes, nodes simulated by kwok, kubectl logs,
//! exec and port-forward served for simulated pods.

use std::process::Command;
use std::time::{Duration, Instant};

use vkube_e2e::{TestEnv, eventually, kubectl_ok, port_forward_echoes, vkube_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_are_ready_and_a_deployment_runs_with_logs_exec_and_port_forward() {
    let env = TestEnv::start(3).await;

    let nodes: serde_json::Value = serde_json::from_str(&env.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "three simulated nodes");
    for n in items {
        let ready =
            n["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "node {} is Ready", n["metadata"]["name"]);
    }

    env.kubectl_ok(&["create", "deployment", "web", "--image=nginx", "--replicas=3"]);
    let started = Instant::now();
    let pods: Vec<String> = eventually("3 pods Running with IPs", Duration::from_secs(30), || async {
        let out = env.kubectl(&["get", "pods", "-l", "app=web", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let running: Vec<String> = items
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["status"]["podIP"].as_str().is_some_and(|ip| !ip.is_empty())
            })
            .map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string())
            .collect();
        if running.len() == 3 {
            return Ok(Some(running));
        }
        // What a timeout reports: each pod's phase and node.
        let seen: Vec<String> = items
            .iter()
            .map(|p| format!("{} {} on {}", p["metadata"]["name"], p["status"]["phase"], p["spec"]["nodeName"]))
            .collect();
        Err(format!("{} pods: {seen:?}", items.len()))
    })
    .await;
    eprintln!("3 pods Running with IPs after {:.1} s", started.elapsed().as_secs_f64());

    let logs = env.kubectl_ok(&["logs", &pods[0]]);
    assert!(logs.contains("simulated container log line 1"), "logs: {logs}");

    let exec = env.kubectl_ok(&["exec", &pods[0], "--", "echo", "hello-from-exec"]);
    assert_eq!(exec.trim(), "hello-from-exec");

    // Port-forward: kwok echoes the stream back, so what we send must come back.
    port_forward_echoes(
        &env.upstream,
        &env.host.kubeconfig,
        &format!("pod/{}", pods[0]),
        8080,
        b"ping through port-forward\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_environments_in_one_run_do_not_collide() {
    let (a, b) = tokio::join!(TestEnv::start(1), TestEnv::start(1));
    assert_ne!(a.host.ports.apiserver, b.host.ports.apiserver);
    a.kubectl_ok(&["create", "namespace", "only-in-a"]);
    b.kubectl_ok(&["create", "namespace", "only-in-b"]);
    let in_a = a.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    let in_b = b.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    assert!(in_a.contains("only-in-a") && !in_a.contains("only-in-b"), "{in_a}");
    assert!(in_b.contains("only-in-b") && !in_b.contains("only-in-a"), "{in_b}");
}

/// `vkube dev up` twice is harmless; `vkube dev down` leaves no process behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_is_idempotent_and_dev_down_leaves_nothing() {
    let state = tempfile::tempdir().unwrap();
    let vkube = |args: &[&str]| {
        let out = Command::new(vkube_bin()).args(args).env("VKUBE_STATE", state.path()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "vkube {} failed: {text}", args.join(" "));
        text
    };
    vkube(&["dev", "up", "--nodes", "1"]);
    let host_dir = state.path().join("dev/host");
    let pids = recorded_pids(&host_dir);
    assert_eq!(pids.len(), 5, "etcd, apiserver, controller-manager, scheduler, kwok: {pids:?}");

    let again = Instant::now();
    let second = vkube(&["dev", "up", "--nodes", "1"]);
    assert!(second.contains("already running"), "{second}");
    assert!(again.elapsed() < Duration::from_secs(10));
    assert_eq!(recorded_pids(&host_dir), pids, "the second up started nothing new");

    let env_out = vkube(&["dev", "env"]);
    assert!(env_out.contains("export KUBECONFIG="), "{env_out}");
    let up = vkube_localenv::Upstream::locate().unwrap();
    let nodes = kubectl_ok(&up, &host_dir.join("kubeconfig"), &["get", "nodes", "-o", "name"]);
    assert_eq!(nodes.trim(), "node/kwok-node-0");

    vkube(&["dev", "down"]);
    for pid in &pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid), "pid {pid} still runs");
    }
    // Nothing else started from this state directory either.
    let needle = state.path().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&needle),
            "left behind: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
}

fn recorded_pids(dir: &std::path::Path) -> Vec<u32> {
    vkube_localenv::process::read_recorded(dir).unwrap().iter().map(|r| r.pid).collect()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true)
}
