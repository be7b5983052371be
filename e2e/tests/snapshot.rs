//! Snapshots end to end, with the real CLI, kubectl, etcd and etcdutl: `vkube snapshot` of a
//! running and of a sleeping cluster, `vkube restore` (the virtual state and the host both go
//! back: nothing orphaned, nothing duplicated), refusals that change nothing, `vkube create
//! --from-snapshot` (a fork with its own host objects beside the original), scheduled snapshots
//! (kept, listed, restored by name), a restore that puts the cluster's keys back, and `vkube
//! reset`.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use vkube_e2e::{Cli, TestEnv, eventually, kubectl, kubectl_ok};

use vkube_localenv::Upstream;

const SEED: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: seed, namespace: app}
data: {v: "1"}
---
apiVersion: v1
kind: Secret
metadata: {name: seed, namespace: app}
stringData: {password: s3cret}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: app}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: nginx}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"#;

const WIDGET: &str =
    "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, namespace: app}\nspec: {size: 3}\n";

/// The host pods of cluster `name` (in host namespace vkube-NAME) for virtual namespace `app`:
/// (running ones, all not being deleted).
async fn host_pods(host: &kube::Client, name: &str) -> (usize, usize) {
    let pods: Api<Pod> = Api::namespaced(host.clone(), &format!("vkube-{name}"));
    let list = pods.list(&Default::default()).await.unwrap().items;
    let app: Vec<&Pod> = list
        .iter()
        .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get("vkube.dev/namespace")).is_some_and(|n| n == "app"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let running = app.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count();
    (running, app.len())
}

async fn wait_host_pods(host: &kube::Client, name: &str, want: usize) {
    eventually(
        &format!("{want} host pods of {name}'s namespace app, all Running"),
        Duration::from_secs(90),
        || async {
            let (running, all) = host_pods(host, name).await;
            Ok((running == want && all == want).then_some(()).ok_or(format!("{running} running of {all}")).ok())
        },
    )
    .await;
}

/// `kubectl get ARGS -o OUTPUT`, one line per object, sorted.
fn listed(up: &Upstream, kc: &Path, args: &[&str], output: &str) -> Vec<String> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", output]);
    let mut v: Vec<String> = kubectl_ok(up, kc, &all).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn names(up: &Upstream, kc: &Path, args: &[&str]) -> Vec<String> {
    listed(up, kc, args, "name")
}

/// `Kind/name=uid` of each object `args` selects, sorted.
fn uids(up: &Upstream, kc: &Path, args: &[&str]) -> Vec<String> {
    listed(up, kc, args, "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.uid}{\"\\n\"}{end}")
}

/// `file`'s contents in a snapshot that says it has a format newer than this vkube reads.
fn newer_format(file: &Path, to: &Path) -> std::path::PathBuf {
    let parts = tempfile::tempdir().unwrap();
    let manifest = vkube::snapshot::read(std::fs::File::open(file).unwrap(), parts.path()).unwrap();
    let newer = vkube::snapshot::Manifest { format: vkube::snapshot::FORMAT + 1, ..manifest };
    let db = vkube::snapshot::Source::File(parts.path().join(vkube::snapshot::ETCD_DB));
    vkube::snapshot::write(std::fs::File::create(to).unwrap(), newer, vec![(vkube::snapshot::ETCD_DB.into(), db)])
        .unwrap();
    to.to_path_buf()
}

fn fails_saying(out: std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(needle), "expected a failure saying {needle:?}, got {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_fork_and_reset() {
    let env = TestEnv::start(1).await;
    let up = Upstream::locate().unwrap();
    let host = env.client().await;
    let cli = Cli::new(&env);
    let dir = cli.state.path().to_path_buf();
    cli.ok(&["create", "golden", "--local"]);
    let kc = dir.join("golden.kubeconfig");
    std::fs::write(&kc, cli.ok(&["connect", "golden", "--print"])).unwrap();
    vkube_e2e::kubectl_apply(&up, &kc, SEED);
    kubectl_ok(&up, &kc, &["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=60s"]);
    vkube_e2e::kubectl_apply(&up, &kc, WIDGET);
    wait_host_pods(&host, "golden", 2).await;

    // Taken while it runs; the file says what it is, without keys unless asked.
    let file = dir.join("golden.snapshot");
    cli.ok(&["snapshot", "golden", "-o", file.to_str().unwrap()]);
    let manifest = vkube::snapshot::read_manifest(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(manifest.cluster, "golden");
    assert!(!manifest.has_pki(), "{manifest:?}");
    let with_keys = cli.command(&["snapshot", "golden", "-o", "-", "--include-pki"]).output().unwrap();
    assert!(with_keys.status.success(), "{}", String::from_utf8_lossy(&with_keys.stderr));
    let keyed = vkube::snapshot::read_manifest(with_keys.stdout.as_slice()).unwrap();
    assert!(keyed.parts.iter().any(|p| p.name == "pki/ca.key"), "{keyed:?}");
    let keys_file = dir.join("keys.snapshot");
    std::fs::write(&keys_file, &with_keys.stdout).unwrap();
    fails_saying(
        cli.run(&["restore", "golden", "--from", file.to_str().unwrap(), "--include-pki"]),
        "taken without --include-pki",
    );

    // Only the cluster's admins may: a service account with the view role is refused.
    kubectl_ok(&up, &kc, &["create", "serviceaccount", "viewer"]);
    kubectl_ok(
        &up,
        &kc,
        &["create", "clusterrolebinding", "viewer", "--clusterrole=view", "--serviceaccount=default:viewer"],
    );
    let token = kubectl_ok(&up, &kc, &["create", "token", "viewer"]);
    let viewer = token_kubeconfig(&up, &kc, token.trim(), &dir.join("viewer.kubeconfig"));
    kubectl_ok(&up, &viewer, &["get", "configmaps", "-n", "app"]);
    fails_saying(
        kubectl(&up, &viewer, &["get", "--raw", "/vkube/v1/snapshot"]),
        "cannot get path \"/vkube/v1/snapshot\"",
    );

    // After the snapshot everything goes: the namespace (its Deployment, Service, ConfigMap,
    // Secret, widgets and pods) and the CRD; something new is added.
    const OBJECTS: &str = "configmaps,secrets,deployments,services,widgets";
    let before = names(&up, &kc, &[OBJECTS, "-n", "app"]);
    let uids_before = uids(&up, &kc, &[OBJECTS, "-n", "app"]);
    assert!(before.iter().any(|n| n == "secret/seed"), "{before:?}");
    kubectl_ok(&up, &kc, &["delete", "namespace", "app", "--timeout=120s"]);
    kubectl_ok(&up, &kc, &["delete", "crd", "widgets.example.com"]);
    kubectl_ok(&up, &kc, &["create", "configmap", "later"]);
    wait_host_pods(&host, "golden", 0).await;

    // Refused, and nothing changes: a damaged file, and one of a newer format.
    let damaged = dir.join("damaged.snapshot");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = cli.run(&["restore", "golden", "--from", damaged.to_str().unwrap()]);
    assert!(!out.status.success(), "a cut-off snapshot restored");
    let newer = newer_format(&file, &dir.join("newer.snapshot"));
    fails_saying(cli.run(&["restore", "golden", "--from", newer.to_str().unwrap()]), "use a newer vkube");
    kubectl_ok(&up, &kc, &["get", "configmap", "later"]);

    let restore_started = Instant::now();
    let result: serde_json::Value =
        serde_json::from_str(&cli.ok(&["restore", "golden", "--from", file.to_str().unwrap(), "-o", "json"])).unwrap();
    let restore_took = restore_started.elapsed();
    assert_eq!(result["cluster"], "golden", "{result}");
    // Everything is back, the same objects (uids), once the restored CRD is served again.
    eventually("the snapshot's objects, with their uids", Duration::from_secs(60), || async {
        let out = kubectl(&up, &kc, &["get", OBJECTS, "-n", "app", "-o", "name"]);
        Ok(out.status.success().then_some(()))
    })
    .await;
    assert_eq!(names(&up, &kc, &[OBJECTS, "-n", "app"]), before);
    assert_eq!(uids(&up, &kc, &[OBJECTS, "-n", "app"]), uids_before);
    assert!(!kubectl(&up, &kc, &["get", "configmap", "later"]).status.success(), "what came after stayed");
    assert_eq!(kubectl_ok(&up, &kc, &["get", "configmap", "seed", "-n", "app", "-o", "jsonpath={.data.v}"]), "1");
    assert_eq!(kubectl_ok(&up, &kc, &["get", "widget", "w1", "-n", "app", "-o", "jsonpath={.spec.size}"]), "3");
    // The host follows: the snapshot's pods run again there, and nothing more.
    wait_host_pods(&host, "golden", 2).await;
    eventually("exactly the snapshot's pods, virtual and host", Duration::from_secs(60), || async {
        let virt = names(&up, &kc, &["pods", "-n", "app"]);
        let (_, on_host) = host_pods(&host, "golden").await;
        let ok = virt.len() == 2 && on_host == 2;
        Ok(ok.then_some(()).ok_or(format!("virtual {virt:?}, {on_host} on the host")).ok())
    })
    .await;

    // A fork: a new cluster with the snapshot's state and its own host objects and identity.
    let fork_started = Instant::now();
    let file_arg = file.to_str().unwrap();
    cli.ok(&["create", "fork1", "--local", "--from-snapshot", file_arg, "--snapshot-schedule=3s", "--snapshot-keep=2"]);
    let fork_took = fork_started.elapsed();
    let fkc = dir.join("fork1.kubeconfig");
    std::fs::write(&fkc, cli.ok(&["connect", "fork1", "--print"])).unwrap();
    assert_eq!(names(&up, &fkc, &[OBJECTS, "-n", "app"]), before);
    wait_host_pods(&host, "fork1", 2).await;
    wait_host_pods(&host, "golden", 2).await;
    // Its Service got an address of its own on the host, and the virtual Service follows it.
    eventually("the fork's Service web with its host copy's ClusterIP", Duration::from_secs(60), || async {
        let virt = kubectl_ok(&up, &fkc, &["get", "service", "web", "-n", "app", "-o", "jsonpath={.spec.clusterIP}"]);
        let hosts: Api<Service> = Api::namespaced(host.clone(), "vkube-fork1");
        let on_host = hosts.list(&Default::default()).await.map_err(|e| e.to_string())?.items;
        let same = on_host.iter().any(|s| {
            s.metadata.annotations.as_ref().and_then(|a| a.get("vkube.dev/object-name")).is_some_and(|n| n == "web")
                && s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some(virt.as_str())
        });
        Ok(same.then_some(()))
    })
    .await;
    // Fresh tokens: the ones the syncer gave the fork's host pods are signed with the fork's keys.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(host.clone(), "vkube-fork1");
    let tokens = secrets.list(&kube::api::ListParams::default().labels("vkube.dev/token=true")).await.unwrap().items;
    let token = tokens
        .iter()
        .find_map(|s| s.data.as_ref()?.get("token").map(|t| String::from_utf8_lossy(&t.0).into_owned()))
        .expect("a token Secret for the fork's pods");
    let as_pod = token_kubeconfig(&up, &fkc, &token, &dir.join("fork-pod.kubeconfig"));
    let who = kubectl_ok(&up, &as_pod, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert!(who.starts_with("system:serviceaccount:"), "{who}");
    let at_golden = token_kubeconfig(&up, &kc, &token, &dir.join("golden-pod.kubeconfig"));
    assert!(!kubectl(&up, &at_golden, &["auth", "whoami"]).status.success(), "a fork's token works in golden");
    let golden_ip = kubectl_ok(&up, &kc, &["get", "service", "web", "-n", "app", "-o", "jsonpath={.spec.clusterIP}"]);
    let fork_ip = kubectl_ok(&up, &fkc, &["get", "service", "web", "-n", "app", "-o", "jsonpath={.spec.clusterIP}"]);
    assert_ne!(golden_ip, fork_ip, "two clusters' Services on one host cannot share an address");
    // Its own identity: the golden cluster's admin credentials are not the fork's.
    assert!(!kubectl(&up, &kc, &["--server", &server_of(&up, &fkc), "get", "ns"]).status.success());
    // A second fork of the same file runs beside the first, with host objects and credentials of
    // its own: each refuses the other's and the original's admin credentials.
    cli.ok(&["create", "fork2", "--local", "--from-snapshot", file_arg]);
    let f2kc = dir.join("fork2.kubeconfig");
    std::fs::write(&f2kc, cli.ok(&["connect", "fork2", "--print"])).unwrap();
    assert_eq!(names(&up, &f2kc, &[OBJECTS, "-n", "app"]), before);
    wait_host_pods(&host, "fork2", 2).await;
    wait_host_pods(&host, "fork1", 2).await;
    for (creds, at) in [(&kc, &f2kc), (&fkc, &f2kc), (&f2kc, &fkc), (&f2kc, &kc)] {
        refused_at(&up, creds, at, &dir.join("mixed.kubeconfig"));
    }
    eventually("fork2's Service web with an address of its own", Duration::from_secs(60), || async {
        let ip = kubectl_ok(&up, &f2kc, &["get", "service", "web", "-n", "app", "-o", "jsonpath={.spec.clusterIP}"]);
        let fork1 = kubectl_ok(&up, &fkc, &["get", "service", "web", "-n", "app", "-o", "jsonpath={.spec.clusterIP}"]);
        Ok((ip != fork1 && ip != golden_ip).then_some(()))
    })
    .await;
    cli.ok(&["delete", "fork2"]);
    wait_host_pods(&host, "fork1", 2).await;

    // The snapshot is golden's: restoring it into the fork (not a fork) is refused.
    fails_saying(cli.run(&["restore", "fork1", "--from", file.to_str().unwrap()]), "not \"fork1\"");

    // Scheduled snapshots: taken every 3 s while it runs, the newest 2 kept, listed, downloaded
    // and restored by name.
    let kept = eventually("two scheduled snapshots of fork1, and a third taken since", Duration::from_secs(60), || {
        let cli = &cli;
        async move {
            let list: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "fork1", "-o", "json"])).unwrap();
            let names: Vec<String> =
                list.as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap().into()).collect();
            assert!(names.len() <= 2, "more kept than --snapshot-keep: {names:?}");
            Ok((names.len() == 2).then_some(names))
        }
    })
    .await;
    assert!(kept.iter().all(|n| n.starts_with("fork1-") && n.ends_with(".snapshot")), "{kept:?}");
    eventually("the oldest kept snapshot replaced by a newer one", Duration::from_secs(60), || async {
        let list: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "fork1", "-o", "json"])).unwrap();
        let now: Vec<&str> = list.as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
        Ok((!now.contains(&kept[1].as_str())).then_some(()))
    })
    .await;
    let list: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "fork1", "-o", "json"])).unwrap();
    let newest = list[0]["name"].as_str().unwrap().to_string();
    let downloaded = dir.join("kept.snapshot");
    cli.ok(&["snapshot", "fork1", "--kept", &newest, "-o", downloaded.to_str().unwrap()]);
    assert_eq!(vkube::snapshot::read_manifest(std::fs::File::open(&downloaded).unwrap()).unwrap().cluster, "fork1");
    kubectl_ok(&up, &fkc, &["create", "configmap", "after-kept", "-n", "app"]);
    cli.ok(&["restore", "fork1", "--kept", &newest]);
    assert!(!kubectl(&up, &fkc, &["get", "configmap", "after-kept", "-n", "app"]).status.success());
    fails_saying(cli.run(&["restore", "fork1", "--kept", "nosuch.snapshot"]), "no kept snapshot");

    // A reset: the fork is empty again, its workloads leave the host; golden is untouched.
    cli.ok(&["reset", "fork1"]);
    assert!(!kubectl(&up, &fkc, &["get", "namespace", "app"]).status.success(), "namespace app is gone");
    kubectl_ok(&up, &fkc, &["get", "namespace", "default"]);
    wait_host_pods(&host, "fork1", 0).await;
    wait_host_pods(&host, "golden", 2).await;

    // From a sleeping cluster: the snapshot is taken without waking it.
    kubectl_ok(&up, &kc, &["create", "configmap", "pre-sleep", "-n", "app"]);
    cli.ok(&["sleep", "golden"]);
    let asleep = dir.join("asleep.snapshot");
    cli.ok(&["snapshot", "golden", "-o", asleep.to_str().unwrap()]);
    let svc = Api::<Service>::namespaced(host.clone(), "vkube-golden").get("golden").await.unwrap();
    let power = svc.metadata.annotations.unwrap_or_default().get("vkube.dev/power").cloned();
    assert_eq!(power.as_deref(), Some("Sleeping"), "the snapshot woke it");
    assert_eq!(host_pods(&host, "golden").await.1, 0, "its workloads stayed asleep");
    // Restored while asleep (the first snapshot, without pre-sleep): it wakes with that state.
    cli.ok(&["restore", "golden", "--from", file.to_str().unwrap()]);
    cli.ok(&["wake", "golden"]);
    assert_eq!(names(&up, &kc, &[OBJECTS, "-n", "app"]), before);
    wait_host_pods(&host, "golden", 2).await;
    // And the snapshot taken asleep holds what was there when it slept.
    cli.ok(&["restore", "golden", "--from", asleep.to_str().unwrap()]);
    kubectl_ok(&up, &kc, &["get", "configmap", "pre-sleep", "-n", "app"]);
    // Its identity back: after new CAs the old kubeconfig is refused; the keys of the snapshot
    // make it work again (and the cluster's state is the snapshot's).
    cli.ok(&["certs", "rotate", "golden", "--ca"]);
    assert!(!kubectl(&up, &kc, &["get", "ns", "default"]).status.success(), "the old CA still works");
    cli.ok(&["restore", "golden", "--from", keys_file.to_str().unwrap(), "--include-pki"]);
    eventually("the snapshot-time kubeconfig accepted again", Duration::from_secs(60), || async {
        Ok(kubectl(&up, &kc, &["get", "configmap", "seed", "-n", "app"]).status.success().then_some(()))
    })
    .await;
    wait_host_pods(&host, "golden", 2).await;
    eprintln!(
        "restore took {:.1} s, a fork (create --from-snapshot) {:.1} s",
        restore_took.as_secs_f64(),
        fork_took.as_secs_f64()
    );
}

/// A kubeconfig for the cluster `kc` reaches (its server and CA) that authenticates with `token`.
fn token_kubeconfig(up: &Upstream, kc: &Path, token: &str, path: &Path) -> std::path::PathBuf {
    let ca = kubectl_ok(
        up,
        kc,
        &["config", "view", "--raw", "--minify", "-o", "jsonpath={.clusters[0].cluster.certificate-authority-data}"],
    );
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority-data: {ca}}}}}]\nusers: [{{name: u, user: {{token: {token}}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n",
            server_of(up, kc),
        ),
    )
    .unwrap();
    path.to_path_buf()
}

/// The admin client certificate of `creds`, presented to the cluster `at` (trusting its CA):
/// authenticated as nobody (401), not merely a TLS failure.
fn refused_at(up: &Upstream, creds: &Path, at: &Path, path: &Path) {
    let view = |kc: &Path, field: &str| {
        kubectl_ok(up, kc, &["config", "view", "--raw", "--minify", "-o", &format!("jsonpath={{{field}}}")])
    };
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority-data: {}}}}}]\nusers: [{{name: u, user: {{client-certificate-data: {}, client-key-data: {}}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n",
            server_of(up, at),
            view(at, ".clusters[0].cluster.certificate-authority-data"),
            view(creds, ".users[0].user.client-certificate-data"),
            view(creds, ".users[0].user.client-key-data"),
        ),
    )
    .unwrap();
    fails_saying(kubectl(up, path, &["get", "ns"]), "Unauthorized");
}

fn server_of(up: &Upstream, kc: &Path) -> String {
    kubectl_ok(up, kc, &["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"])
}

/// The control-plane process killed at three points of a restore: the cluster comes back at the
/// old state or at the snapshot's, never a mix, and the host converges (its pods exactly the
/// virtual ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cut_short_by_a_crash_ends_old_or_new_and_converges() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster("crashy").await;
    vc.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: c, image: nginx}]\n",
    );
    vc.kubectl_ok(&["create", "configmap", "in-snapshot"]);
    let admin = vc.client().await;
    let resp = admin.send(http::Request::get("/vkube/v1/snapshot").body(kube::client::Body::empty()).unwrap()).await;
    let resp = resp.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes().to_vec();
    for (i, cut_after) in [300, 1500, 3000].map(Duration::from_millis).into_iter().enumerate() {
        let marker = format!("after-snapshot-{i}");
        vc.kubectl_ok(&["create", "configmap", &marker]);
        let client = vc.client().await;
        let body = bytes.clone();
        let restore = tokio::spawn(async move {
            let req = http::Request::post("/vkube/v1/restore").body(kube::client::Body::from(body)).unwrap();
            client.send(req).await
        });
        tokio::time::sleep(cut_after).await;
        vc.kill_controller();
        let _ = restore.await;
        vc.start_controller().await;
        let has = |name: &str| vc.kubectl(&["get", "configmap", name]).status.success();
        assert!(has("in-snapshot"), "cut after {cut_after:?}: the snapshot's ConfigMap is gone");
        let restored = !has(&marker);
        eprintln!(
            "cut after {cut_after:?}: the cluster is at the {} state",
            if restored { "snapshot's" } else { "old" }
        );
        eventually("host pods exactly the virtual ones", Duration::from_secs(90), || async {
            let virt: Vec<Pod> = Api::<Pod>::namespaced(vc.client().await, "default")
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let hosts: Vec<Pod> = vc.host_list(&env).await;
            let running = hosts
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("vkube.dev/namespace"))
                        .is_some_and(|n| n == "default")
                })
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            let live = virt.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
            Ok((live == 2 && running == 2).then_some(()).ok_or(format!("{live} virtual, {running} host Running")).ok())
        })
        .await;
    }
}

/// The pid and program of the `vkube run` a local cluster records.
fn running_vkube(cli: &Cli, name: &str) -> std::path::PathBuf {
    let dir = cli.state.path().join("local").join(format!("vkube-{name}")).join(name);
    let recorded = vkube_localenv::process::read_recorded(&dir).unwrap();
    let vkube = recorded.iter().find(|r| r.name == "vkube").expect("a recorded vkube process");
    assert!(vkube_localenv::process::is_alive(vkube), "{vkube:?} is not running");
    std::fs::read_link(format!("/proc/{}/exe", vkube.pid)).unwrap()
}

/// `vkube upgrade` of a local cluster from another binary (standing for an older version): a
/// snapshot kept first, the control plane restarted with this binary; an upgrade cut short goes
/// on with its first record; `--rollback` runs the old binary again with the state of before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_a_snapshot_and_rollback_puts_back_the_version_and_the_state() {
    let env = TestEnv::start(1).await;
    let up = Upstream::locate().unwrap();
    let cli = Cli::new(&env);
    let dir = cli.state.path().to_path_buf();
    let old = dir.join("old").join("vkube");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::copy(vkube_e2e::vkube_bin(), &old).unwrap();
    let created = cli.command_of(&old, &["create", "up", "--local"]).output().unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert_eq!(running_vkube(&cli, "up"), old);
    let kc = dir.join("up.kubeconfig");
    std::fs::write(&kc, cli.ok(&["connect", "up", "--print"])).unwrap();
    kubectl_ok(&up, &kc, &["create", "configmap", "before"]);

    // Nothing to roll back yet; a label that is not plain is refused, by the CLI and the endpoint.
    fails_saying(cli.run(&["upgrade", "up", "--rollback"]), "no upgrade of up is recorded");
    fails_saying(cli.run(&["snapshot", "up", "--keep", "--label", "../x"]), "snapshot label");
    fails_saying(
        kubectl(&up, &kc, &["create", "--raw", "/vkube/v1/keep?label=..%2Fx", "-f", "/dev/null"]),
        "snapshot label",
    );

    let record: serde_json::Value = serde_json::from_str(&cli.ok(&["upgrade", "up", "-o", "json"])).unwrap();
    assert_eq!(record["finished"], true, "{record}");
    let snapshot = record["snapshot"].as_str().unwrap().to_string();
    assert!(snapshot.starts_with("up-before-upgrade-"), "{record}");
    assert_eq!(running_vkube(&cli, "up"), vkube_e2e::vkube_bin(), "the control plane runs the new binary");
    let kept: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "up", "-o", "json"])).unwrap();
    assert!(
        kept.as_array().unwrap().iter().any(|k| k["name"] == snapshot.as_str() && k["scheduled"] == false),
        "{kept}"
    );
    kubectl_ok(&up, &kc, &["get", "configmap", "before"]);
    kubectl_ok(&up, &kc, &["create", "configmap", "after"]);

    // Cut short after the control plane stopped (the record says unfinished, nothing runs): run
    // again, it goes on with the same snapshot and starts it.
    let local = dir.join("local/vkube-up/up");
    let mut unfinished: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(local.join("upgrade.json")).unwrap()).unwrap();
    unfinished["finished"] = false.into();
    std::fs::write(local.join("upgrade.json"), unfinished.to_string()).unwrap();
    vkube_localenv::process::stop_all_recorded(&local).unwrap();
    assert!(!kubectl(&up, &kc, &["get", "ns", "default"]).status.success(), "it still answers");
    let again: serde_json::Value = serde_json::from_str(&cli.ok(&["upgrade", "up", "-o", "json"])).unwrap();
    assert_eq!(again["snapshot"], snapshot.as_str(), "{again}");
    assert_eq!(again["finished"], true, "{again}");
    let kept: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "up", "-o", "json"])).unwrap();
    assert_eq!(kept.as_array().unwrap().len(), 1, "a second snapshot was taken: {kept}");

    // A snapshot kept on request is listed beside it and left alone by the rollback.
    let manual = cli.ok(&["snapshot", "up", "--keep"]).trim().to_string();
    assert!(manual.starts_with("up-manual-"), "{manual}");

    let back: serde_json::Value =
        serde_json::from_str(&cli.ok(&["upgrade", "up", "--rollback", "-o", "json"])).unwrap();
    assert_eq!(back["rolledBack"], true, "{back}");
    let kept_binary = local.join("upgrades").join(snapshot.trim_end_matches(".snapshot")).join("vkube");
    assert_eq!(running_vkube(&cli, "up"), kept_binary, "the old binary runs again");
    kubectl_ok(&up, &kc, &["get", "configmap", "before"]);
    assert!(!kubectl(&up, &kc, &["get", "configmap", "after"]).status.success(), "a change since the upgrade stayed");
    assert!(!local.join("upgrade.json").exists(), "the record outlived its rollback");
    fails_saying(cli.run(&["upgrade", "up", "--rollback"]), "no upgrade of up is recorded");
    let kept: serde_json::Value = serde_json::from_str(&cli.ok(&["snapshots", "up", "-o", "json"])).unwrap();
    assert!(kept.as_array().unwrap().iter().any(|k| k["name"] == manual.as_str()), "{kept}");
    cli.ok(&["delete", "up"]);
}
