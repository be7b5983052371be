//! The virtual control plane and its TLS API proxy, end to end: the real pinned kubectl talks to
//! the proxy of a virtual cluster (local etcd, kube-apiserver, kube-controller-manager and
//! `vkube run`) on a real host cluster whose nodes kwok simulates.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use vkube_e2e::{TestEnv, VirtualCluster, eventually, kubectl};
use vkube_localenv::Upstream;
use vkube_syncer::naming::Translator;

const FIELD_MANAGER: &str = "vkube-e2e";

// ---------------------------------------------------------------------------------------------
// kubectl through the proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_through_the_proxy() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("kubectl").await;
    let files = scratch(&env, "kubectl");

    let server = vc.kubectl_ok(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]);
    assert_eq!(server, vc.cp.state.endpoint(), "the admin kubeconfig points at the proxy");

    // kube-apiserver and kube-controller-manager run in one process, with its Go defaults
    // (`components::go_defaults`) unless this process's environment sets them; etcd too.
    let environ = |name: &str| -> Vec<String> {
        let children = vkube_localenv::process::read_supervised(&vc.cp.dir);
        let child = children.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} supervised"));
        let raw = std::fs::read(format!("/proc/{}/environ", child.pid)).expect("its environment");
        raw.split(|b| *b == 0).filter(|v| !v.is_empty()).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
    };
    let gogc = format!("GOGC={}", std::env::var("GOGC").unwrap_or_else(|_| "50".into()));
    let control_plane = environ("kube-control-plane");
    assert!(control_plane.contains(&gogc), "want {gogc} in kube-control-plane's environment: {control_plane:?}");
    let etcd = environ("etcd");
    assert!(etcd.contains(&gogc), "want {gogc} in etcd's environment: {etcd:?}");

    let namespaces = vc.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(namespaces.lines().any(|l| l == format!("namespace/{ns}")), "{ns} missing: {namespaces}");
    }
    let created = vc.kubectl_ok(&["create", "namespace", "team"]);
    assert_eq!(created.trim(), "namespace/team created");
    let namespaces = vc.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    assert!(namespaces.lines().any(|l| l == "namespace/team"), "{namespaces}");

    // Client-side apply, then a change re-applied.
    let csa = files.join("csa.yaml");
    std::fs::write(&csa, configmap_yaml("csa", "team", "blue")).unwrap();
    assert_eq!(vc.kubectl_ok(&["apply", "-f", path_str(&csa)]).trim(), "configmap/csa created");
    assert_eq!(vc.kubectl_ok(&["get", "configmap", "csa", "-n", "team", "-o", "jsonpath={.data.color}"]), "blue");
    std::fs::write(&csa, configmap_yaml("csa", "team", "red")).unwrap();
    assert_eq!(vc.kubectl_ok(&["apply", "-f", path_str(&csa)]).trim(), "configmap/csa configured");
    assert_eq!(vc.kubectl_ok(&["get", "configmap", "csa", "-n", "team", "-o", "jsonpath={.data.color}"]), "red");
    let annotation = vc.kubectl_ok(&[
        "get",
        "configmap",
        "csa",
        "-n",
        "team",
        "-o",
        r#"jsonpath={.metadata.annotations.kubectl\.kubernetes\.io/last-applied-configuration}"#,
    ]);
    assert!(annotation.contains(r#""color":"red""#), "client-side apply records its configuration: {annotation}");

    // Server-side apply, then a change re-applied.
    let ssa = files.join("ssa.yaml");
    std::fs::write(&ssa, configmap_yaml("ssa", "team", "blue")).unwrap();
    assert_eq!(
        vc.kubectl_ok(&["apply", "--server-side", "-f", path_str(&ssa)]).trim(),
        "configmap/ssa serverside-applied"
    );
    std::fs::write(&ssa, configmap_yaml("ssa", "team", "green")).unwrap();
    assert_eq!(
        vc.kubectl_ok(&["apply", "--server-side", "-f", path_str(&ssa)]).trim(),
        "configmap/ssa serverside-applied"
    );
    let ssa_cm: Value = serde_json::from_str(&vc.kubectl_ok(&[
        "get",
        "configmap",
        "ssa",
        "-n",
        "team",
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .unwrap();
    assert_eq!(ssa_cm["data"]["color"], "green");
    let managers: Vec<&str> = ssa_cm["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["operation"] == "Apply")
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, vec!["kubectl"], "server-side apply owns the fields: {ssa_cm}");

    // A watch streams events created after it started.
    let mut watch =
        Streaming::spawn(&env.upstream, &vc.kubeconfig(), &["get", "configmaps", "-n", "team", "-w", "-o", "name"]);
    watch.wait_for("configmap/ssa", Duration::from_secs(15)); // the initial list is out: the watch runs
    vc.kubectl_ok(&["create", "configmap", "watched", "-n", "team", "--from-literal=k=v"]);
    watch.wait_for("configmap/watched", Duration::from_secs(10));
    drop(watch);

    let resources = vc.kubectl_ok(&["api-resources", "-o", "name"]);
    for r in ["deployments.apps", "pods", "configmaps", "customresourcedefinitions.apiextensions.k8s.io"] {
        assert!(resources.lines().any(|l| l == r), "{r} missing from api-resources: {resources}");
    }
    assert_eq!(vc.kubectl_ok(&["auth", "can-i", "*", "*"]).trim(), "yes");

    // A CRD with a schema becomes Established; a custom resource round-trips and is validated.
    let crd = files.join("crd.yaml");
    std::fs::write(&crd, WIDGET_CRD).unwrap();
    vc.kubectl_ok(&["apply", "-f", path_str(&crd)]);
    let waited =
        vc.kubectl_ok(&["wait", "--for=condition=Established", "crd/widgets.e2e.example.com", "--timeout=60s"]);
    assert!(waited.contains("condition met"), "{waited}");
    let widget = files.join("widget.yaml");
    std::fs::write(&widget, widget_yaml("w1", "team", "3")).unwrap();
    eventually("the Widget kind is served", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["apply", "-f", path_str(&widget)]);
        if out.status.success() { Ok(Some(())) } else { Err(text(&out)) }
    })
    .await;
    let got: Value =
        serde_json::from_str(&vc.kubectl_ok(&["get", "widget", "w1", "-n", "team", "-o", "json"])).unwrap();
    assert_eq!(got["kind"], "Widget");
    assert_eq!(got["spec"]["size"], 3, "{got}");
    assert_eq!(got["spec"]["color"], "green", "{got}");
    let listed = vc.kubectl_ok(&["get", "widgets", "-A", "-o", "name"]);
    assert_eq!(listed.trim(), "widget.e2e.example.com/w1");
    // The schema is enforced: a string where an integer belongs is rejected.
    let bad = files.join("bad-widget.yaml");
    std::fs::write(&bad, widget_yaml("w2", "team", "\"big\"")).unwrap();
    let out = vc.kubectl(&["apply", "-f", path_str(&bad)]);
    assert!(!out.status.success(), "an invalid Widget was accepted: {}", text(&out));
    assert!(stderr(&out).contains("spec.size"), "{}", text(&out));

    // Deletion of the custom resource and of the namespace.
    let deleted = vc.kubectl_ok(&["delete", "widget", "w1", "-n", "team"]);
    assert!(deleted.contains("widget.e2e.example.com \"w1\" deleted"), "{deleted}");
    let out = vc.kubectl(&["get", "widget", "w1", "-n", "team"]);
    assert!(!out.status.success() && stderr(&out).contains("NotFound"), "{}", text(&out));
    let deleted = vc.kubectl_ok(&["delete", "namespace", "team", "--timeout=90s"]);
    assert!(deleted.contains("namespace \"team\" deleted"), "{deleted}");
    let out = vc.kubectl(&["get", "namespace", "team"]);
    assert!(!out.status.success() && stderr(&out).contains("NotFound"), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Nothing but a client certificate of this cluster's CA or a token this cluster's API server
/// accepts gets in: no credentials, a made-up token, another cluster's (or the host's)
/// certificate and another cluster's token are all refused with 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_credentials_of_this_cluster_are_unauthorized() {
    let env = TestEnv::start(1).await;
    let a = env.virtual_cluster("alpha").await;
    let b = env.virtual_cluster("beta").await;
    let files = scratch(&env, "auth");
    let up = &env.upstream;

    // The admin kubeconfig works, so what follows is about credentials, not about reaching A.
    assert!(a.kubectl_ok(&["get", "--raw", "/api"]).contains("\"APIVersions\""));

    // (a) No credentials at all: same server and CA, no user. kubectl cannot send such a request
    // (it prompts for a username instead), so a plain HTTPS client sends them.
    let a_kc = kubeconfig_json(up, &a.kubeconfig());
    let anonymous = files.join("no-user.kubeconfig");
    write_json(&anonymous, &without_user(&a_kc));
    let bare = bare_client(&without_user(&a_kc)).await;
    // The proxy's health endpoints answer without credentials: server and CA are right.
    assert_eq!(raw_get(&bare, "/livez").await.expect("/livez without credentials"), "ok");
    let unauthorized_before = unauthorized_count(&bare).await;
    for path in ["/api", "/version", "/api/v1/namespaces", "/apis/apps/v1/namespaces/default/deployments"] {
        match raw_get(&bare, path).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized"), "GET {path} without credentials: {s:?}")
            }
            other => panic!("GET {path} without credentials: expected 401, got {other:?}"),
        }
    }
    let unauthorized_after = unauthorized_count(&bare).await;
    assert!(
        unauthorized_after >= unauthorized_before + 4.0,
        "the proxy counted its 401s: {unauthorized_before} -> {unauthorized_after}"
    );
    // Basic auth is no credential here either.
    let basic = files.join("basic-auth.kubeconfig");
    write_json(&basic, &with_credentials(&a_kc, json!({"username": "admin", "password": "admin"})));
    assert_eq!(kubectl_ok_at(up, &basic, &["get", "--raw", "/livez"]).trim(), "ok");
    assert_unauthorized(&kubectl(up, &basic, &["get", "namespaces"]), "basic auth");
    assert_unauthorized(&kubectl(up, &basic, &["get", "--raw", "/api"]), "basic auth, raw /api");

    // (b) A bearer token nobody issued.
    assert_unauthorized(&kubectl(up, &anonymous, &["--token=wrong", "get", "pods"]), "made-up token");
    assert_unauthorized(
        &kubectl(up, &anonymous, &["--token=eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "get", "--raw", "/api"]),
        "forged JWT",
    );

    // (c) A client certificate of another virtual cluster's CA, and one of the host's CA.
    let b_kc = kubeconfig_json(up, &b.kubeconfig());
    assert_ne!(
        a_kc["clusters"][0]["cluster"]["certificate-authority-data"],
        b_kc["clusters"][0]["cluster"]["certificate-authority-data"],
        "each virtual cluster has its own CA"
    );
    let b_cert_for_a = files.join("b-cert-for-a.kubeconfig");
    write_json(&b_cert_for_a, &with_user_of(&a_kc, &b_kc));
    // The same certificate is good at B (so it is a valid certificate, just not A's).
    assert!(b.kubectl_ok(&["get", "--raw", "/api"]).contains("\"APIVersions\""));
    assert_unauthorized(&kubectl(up, &b_cert_for_a, &["get", "namespaces"]), "B's client certificate at A");
    assert_unauthorized(&kubectl(up, &b_cert_for_a, &["get", "--raw", "/api"]), "B's client certificate at A, raw");
    let host_cert_for_a = files.join("host-cert-for-a.kubeconfig");
    write_json(&host_cert_for_a, &with_user_of(&a_kc, &kubeconfig_json(up, &env.host.kubeconfig)));
    assert_unauthorized(&kubectl(up, &host_cert_for_a, &["get", "pods"]), "the host's admin certificate at A");

    // Another cluster's ServiceAccount token is not A's; a valid token of A does not rescue a
    // presented certificate of the wrong CA.
    b.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let b_token = b.kubectl_ok(&["create", "token", "robot"]).trim().to_string();
    assert_eq!(
        kubectl_ok_at(
            up,
            &b_anonymous(&files, up, &b),
            &["--token", &b_token, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]
        ),
        "system:serviceaccount:default:robot",
        "the token is good at B"
    );
    assert_unauthorized(&kubectl(up, &anonymous, &["--token", &b_token, "get", "--raw", "/api"]), "B's token at A");
    a.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let a_token = a.kubectl_ok(&["create", "token", "robot"]).trim().to_string();
    assert_eq!(
        kubectl_ok_at(
            up,
            &anonymous,
            &["--token", &a_token, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]
        ),
        "system:serviceaccount:default:robot",
        "A's own token is accepted"
    );
    assert_unauthorized(
        &kubectl(up, &b_cert_for_a, &["--token", &a_token, "get", "--raw", "/api"]),
        "B's certificate with A's token",
    );
}

/// Authenticated users get exactly what the virtual cluster's RBAC grants them: impersonation
/// (`--as`) and ServiceAccount tokens are evaluated by the virtual API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_virtual_clusters_rbac_decides_for_impersonated_users_and_service_account_tokens() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("rbac").await;
    let files = scratch(&env, "rbac");
    let up = &env.upstream;

    // The admin is who its certificate says, and may do anything.
    let whoami: Value = serde_json::from_str(&vc.kubectl_ok(&["auth", "whoami", "-o", "json"])).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["username"], "vkube-admin", "{whoami}");
    let groups = whoami["status"]["userInfo"]["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g == "system:masters"), "{whoami}");
    vc.kubectl_ok(&["get", "pods"]);

    // (d) Impersonating a user without any RBAC: 403, while the admin itself still works.
    let out = vc.kubectl(&["--as=nobody", "get", "pods"]);
    assert_forbidden(&out, r#"User "nobody" cannot list resource "pods""#);
    let nobody = vc.kubectl_ok(&["--as=nobody", "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(nobody, "nobody");
    let can_i = vc.kubectl(&["--as=nobody", "auth", "can-i", "list", "pods"]);
    assert_eq!(String::from_utf8_lossy(&can_i.stdout).trim(), "no", "{}", text(&can_i));
    vc.kubectl_ok(&["get", "pods"]);

    // (e) A ServiceAccount token of this cluster: authenticated as the ServiceAccount, allowed
    // only what RBAC grants it.
    vc.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let token = vc.kubectl_ok(&["create", "token", "robot"]).trim().to_string();
    assert!(!token.is_empty());
    let anonymous = files.join("no-user.kubeconfig");
    write_json(&anonymous, &without_user(&kubeconfig_json(up, &vc.kubeconfig())));
    let robot = |args: &[&str]| {
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        kubectl(up, &anonymous, &all)
    };
    let whoami: Value = serde_json::from_slice(&robot(&["auth", "whoami", "-o", "json"]).stdout).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["username"], "system:serviceaccount:default:robot", "{whoami}");
    let groups = whoami["status"]["userInfo"]["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g == "system:serviceaccounts:default"), "{whoami}");
    assert_forbidden(
        &robot(&["get", "pods"]),
        r#"User "system:serviceaccount:default:robot" cannot list resource "pods""#,
    );

    vc.kubectl_ok(&["create", "rolebinding", "robot-view", "--clusterrole=view", "--serviceaccount=default:robot"]);
    eventually("the ServiceAccount may list pods once bound to view", Duration::from_secs(20), || async {
        let out = robot(&["get", "pods", "-o", "name"]);
        if out.status.success() { Ok(Some(())) } else { Err(text(&out)) }
    })
    .await;
    // view is read-only, and only in its namespace.
    assert_forbidden(
        &robot(&["create", "configmap", "x", "--from-literal=a=b"]),
        r#"cannot create resource "configmaps""#,
    );
    assert_forbidden(&robot(&["get", "pods", "-n", "kube-system"]), r#"in the namespace "kube-system""#);
}

// ---------------------------------------------------------------------------------------------
// Restart and isolation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_keeps_its_objects_and_the_same_kubeconfig_still_works() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster("restart").await;
    let up = &env.upstream;

    vc.kubectl_ok(&["create", "namespace", "keep"]);
    vc.kubectl_ok(&["create", "configmap", "settings", "-n", "keep", "--from-literal=answer=42"]);
    let uid_before = vc.kubectl_ok(&["get", "configmap", "settings", "-n", "keep", "-o", "jsonpath={.metadata.uid}"]);
    // A copy of the kubeconfig as handed out before the restart.
    let saved = scratch(&env, "restart").join("handed-out.kubeconfig");
    std::fs::copy(vc.kubeconfig(), &saved).unwrap();
    let proxy_port = vc.cp.state.ports.proxy;

    // kubectl only ever talks to the proxy: without the control-plane process it fails at once.
    vc.kill_controller();
    let out = kubectl(up, &saved, &["get", "namespaces", "--request-timeout=5s"]);
    assert!(!out.status.success(), "kubectl worked without the proxy: {}", text(&out));
    assert!(
        stderr(&out).contains(&format!("The connection to the server 127.0.0.1:{proxy_port} was refused")),
        "{}",
        text(&out)
    );
    vc.start_controller().await;
    assert!(kubectl_ok_at(up, &saved, &["get", "namespaces", "-o", "name"]).contains("namespace/keep"));

    vc.restart().await;
    assert_eq!(vc.cp.state.ports.proxy, proxy_port, "the proxy came back on the same port");
    let namespaces = kubectl_ok_at(up, &saved, &["get", "namespaces", "-o", "name"]);
    assert!(namespaces.lines().any(|l| l == "namespace/keep"), "{namespaces}");
    let cm: Value =
        serde_json::from_str(&kubectl_ok_at(up, &saved, &["get", "configmap", "settings", "-n", "keep", "-o", "json"]))
            .unwrap();
    assert_eq!(cm["data"]["answer"], "42", "{cm}");
    assert_eq!(cm["metadata"]["uid"], uid_before.as_str(), "the same object, not a new one");
    // And the restarted cluster takes writes.
    kubectl_ok_at(up, &saved, &["create", "configmap", "after-restart", "-n", "keep"]);
    let listed =
        kubectl_ok_at(up, &saved, &["get", "configmaps", "-n", "keep", "-o", "name", "--sort-by=.metadata.name"]);
    let ours: Vec<&str> = listed.lines().filter(|l| *l != "configmap/kube-root-ca.crt").collect();
    assert_eq!(ours, vec!["configmap/after-restart", "configmap/settings"], "{listed}");

    // kube-control-plane killed: the supervisor starts it again, its API server and then its
    // controller manager (which makes a new namespace's `default` service account).
    let killed = vc.cp.pid("kube-control-plane").expect("kube-control-plane runs");
    assert!(Command::new("kill").args(["-9", &killed.to_string()]).status().unwrap().success());
    eventually("kube-control-plane started again", Duration::from_secs(60), || async {
        Ok(vc.cp.pid("kube-control-plane").filter(|p| *p != killed).map(|_| ()))
    })
    .await;
    let answers = |args: &'static [&'static str]| {
        let saved = saved.clone();
        move || {
            let out = kubectl(up, &saved, args);
            async move { if out.status.success() { Ok(Some(())) } else { Err(text(&out)) } }
        }
    };
    eventually("the API server answering again", Duration::from_secs(120), answers(&["get", "namespaces"])).await;
    kubectl_ok_at(up, &saved, &["create", "namespace", "after-crash"]);
    let sa = answers(&["get", "serviceaccount", "default", "-n", "after-crash"]);
    eventually("the controller manager's default service account", Duration::from_secs(60), sa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_virtual_clusters_on_one_host_see_only_their_own_objects() {
    let env = TestEnv::start(1).await;
    let (a, b) = tokio::join!(env.virtual_cluster("left"), env.virtual_cluster("right"));
    assert_ne!(a.host_namespace(), b.host_namespace());
    assert_ne!(a.cp.state.ports.proxy, b.cp.state.ports.proxy);

    a.kubectl_ok(&["create", "namespace", "only-in-left"]);
    b.kubectl_ok(&["create", "namespace", "only-in-right"]);
    a.kubectl_ok(&["create", "configmap", "left-config", "-n", "default"]);
    b.kubectl_ok(&["create", "configmap", "right-config", "-n", "default"]);

    let in_a = a.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    let in_b = b.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    assert!(in_a.contains("namespace/only-in-left") && !in_a.contains("only-in-right"), "{in_a}");
    assert!(in_b.contains("namespace/only-in-right") && !in_b.contains("only-in-left"), "{in_b}");
    let cms_a = a.kubectl_ok(&["get", "configmaps", "-A", "-o", "name"]);
    let cms_b = b.kubectl_ok(&["get", "configmaps", "-A", "-o", "name"]);
    assert!(cms_a.contains("configmap/left-config") && !cms_a.contains("right-config"), "{cms_a}");
    assert!(cms_b.contains("configmap/right-config") && !cms_b.contains("left-config"), "{cms_b}");
    let out = a.kubectl(&["get", "configmap", "right-config", "-n", "default"]);
    assert!(!out.status.success() && stderr(&out).contains("NotFound"), "{}", text(&out));

    // Virtual namespaces are not host namespaces.
    let on_host = env.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    assert!(!on_host.contains("only-in-left") && !on_host.contains("only-in-right"), "{on_host}");
    assert!(on_host.contains(&format!("namespace/{}", a.host_namespace())), "{on_host}");
}

// ---------------------------------------------------------------------------------------------
// Pod logs, exec and port-forward: served by the host pod that mirrors the virtual one

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_exec_and_port_forward_reach_the_host_pod_that_mirrors_the_virtual_pod() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster_with("pods", &["--proxy-max-connections-per-address=12"]).await;
    let host = env.client().await;
    let tr = Translator::new(vc.name(), vc.host_namespace());
    let files = scratch(&env, "pods");
    let host_name = tr.host_name("default", "web");

    let uid = create_virtual_pod(&vc, &files, "default", "web", false);
    // kwok rules for exactly this host pod, each naming it, so the right pod is proven reached.
    let log_file = files.join("web.log");
    std::fs::write(&log_file, format!("2026-01-01T00:00:00.000000000Z stdout F hello from {host_name}\n")).unwrap();
    kwok_rule(&host, &tr, "Logs", &host_name, json!({"logs": [{"logsFile": path_str(&log_file), "follow": true}]}))
        .await;
    kwok_rule(
        &host,
        &tr,
        "Exec",
        &host_name,
        json!({"execs": [{"local": {"workDir": path_str(&files), "envs": [{"name": "VKUBE_E2E_POD", "value": host_name}]}}]}),
    )
    .await;
    kwok_rule(
        &host,
        &tr,
        "PortForward",
        &host_name,
        json!({"forwards": [{"command": ["sh", "-c", format!("echo greeting from {host_name}; exec cat")]}]}),
    )
    .await;
    mirror_pod(&host, &tr, "default", "web", Some(&tr.owner_annotations("Pod", "default", "web", &uid))).await;
    wait_host_pod(&host, &tr, &host_name, true).await;

    // Logs.
    let expected = format!("hello from {host_name}");
    eventually("kubectl logs shows the host pod's own log", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["logs", "web"]);
        if !out.status.success() {
            return Err(text(&out));
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.trim() == expected { Ok(Some(())) } else { Err(format!("logs were: {stdout}")) }
    })
    .await;
    let container = vc.kubectl_ok(&["logs", "web", "-c", "web", "--tail=1"]);
    assert_eq!(container.trim(), expected);

    // Logs, followed: the stream stays open and carries what is written later.
    let mut follow = Streaming::spawn(&env.upstream, &vc.kubeconfig(), &["logs", "-f", "web"]);
    follow.wait_for(&expected, Duration::from_secs(15));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log_file).unwrap();
    writeln!(f, "2026-01-01T00:00:01.000000000Z stdout F later line from {host_name}").unwrap();
    drop(f);
    follow.wait_for(&format!("later line from {host_name}"), Duration::from_secs(15));
    assert!(follow.is_running(), "kubectl logs -f is still following");
    drop(follow);

    // Exec.
    assert_eq!(vc.kubectl_ok(&["exec", "web", "--", "echo", "hi"]), "hi\n");
    eventually("exec runs for the host pod", Duration::from_secs(20), || async {
        let out = vc.kubectl(&["exec", "web", "--", "sh", "-c", "echo exec in $VKUBE_E2E_POD"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && stdout.trim() == format!("exec in {host_name}") {
            Ok(Some(()))
        } else {
            Err(text(&out))
        }
    })
    .await;
    // A failing command fails the same way as on the host itself (kwok reports the exit status
    // as an error message rather than as an exit code).
    let through_proxy = vc.kubectl(&["exec", "web", "--", "sh", "-c", "exit 3"]);
    let on_host = env.kubectl(&["exec", "-n", vc.host_namespace(), &host_name, "--", "sh", "-c", "exit 3"]);
    assert!(!through_proxy.status.success(), "{}", text(&through_proxy));
    assert_eq!(through_proxy.status.code(), on_host.status.code(), "{} vs {}", text(&through_proxy), text(&on_host));
    assert!(stderr(&through_proxy).contains("exit status 3"), "{}", text(&through_proxy));

    // Exec goes through the virtual API server, so the tenant's own admission decides, as on any
    // cluster: a ValidatingAdmissionPolicy on CONNECT pods/exec refuses one command, not others.
    vc.apply(NO_FORBIDDEN_EXEC);
    eventually("the tenant's exec policy refuses the command it names", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["exec", "web", "--", "echo", "forbidden"]);
        let refused = !out.status.success() && stderr(&out).contains("the tenant's policy refuses this command");
        if refused { Ok(Some(())) } else { Err(text(&out)) }
    })
    .await;
    let out = vc.kubectl(&["exec", "web", "--", "echo", "forbidden"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("forbidden"), "it never ran: {}", text(&out));
    assert_eq!(vc.kubectl_ok(&["exec", "web", "--", "echo", "allowed"]), "allowed\n");

    // Port-forward: kubectl refuses pods that are not Running, and without a syncer nothing sets
    // the virtual pod's status, so set it as the syncer would.
    vc.kubectl_ok(&[
        "patch",
        "pod",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    let mut pf = Streaming::spawn(&env.upstream, &vc.kubeconfig(), &["port-forward", "pod/web", ":8080"]);
    let first = pf.wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(20));
    let port: u16 =
        first.split("127.0.0.1:").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    let greeting = format!("greeting from {host_name}");
    eventually("a forwarded connection reaches the host pod and echoes", Duration::from_secs(30), || {
        let greeting = greeting.clone();
        async move {
            let received = tokio::task::spawn_blocking(move || forward_once(port, b"ping through the proxy\n"))
                .await
                .map_err(|e| e.to_string())??;
            if !received.ends_with("ping through the proxy\n") {
                return Err(format!("not echoed: {received:?}"));
            }
            if received.starts_with(&greeting) { Ok(Some(())) } else { Err(format!("wrong pod: {received:?}")) }
        }
    })
    .await;
    assert!(pf.is_running(), "kubectl port-forward survived its connections");

    // The port-forward's stream holds its connection's slot (of the 12 this address may hold)
    // while it is open, though hyper handed the stream over from the connection: kubectl holds
    // two (its keep-alive connection, which read the pod, and the stream), given back once it
    // ends (one, were the stream not counted).
    let proxy = vc.proxy_address();
    let while_forwarding = slots_left(&proxy).await;
    drop(pf);
    eventually("the upgraded stream's slot given back", Duration::from_secs(30), || async {
        let left = slots_left(&proxy).await;
        if left == while_forwarding + 2 {
            Ok(Some(()))
        } else {
            Err(format!("{left} slots left, {while_forwarding} while forwarding"))
        }
    })
    .await;
}

/// How many more connections this address may open to the proxy before one is closed at once
/// (those opened to find out are closed again).
async fn slots_left(proxy: &str) -> usize {
    use tokio::io::AsyncReadExt;
    let mut held = vec![];
    loop {
        let mut tcp = tokio::net::TcpStream::connect(proxy).await.expect("connecting to the proxy");
        let mut byte = [0u8; 1];
        // (A connection over the cap is closed at once, a held one waits for its TLS handshake
        // for 10 s: all probes of a count must fit in those, and a loaded machine may take some of
        // a second to close one.)
        match tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => return held.len(),
            _ => held.push(tcp),
        }
        assert!(held.len() < 64, "no cap within 64 connections");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_subresources_never_reach_host_pods_vkube_does_not_own_nor_serve_users_without_rbac() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("guard").await;
    let host = env.client().await;
    let tr = Translator::new(vc.name(), vc.host_namespace());
    let files = scratch(&env, "guard");

    // orphan and stale are privileged pods in a namespace whose Pod Security level lets the
    // virtual API server admit them, while vkube's default policy (baseline) keeps them off the
    // host: they have no host pod, with or without a syncer running.
    vc.kubectl_ok(&["create", "namespace", "held"]);
    vc.kubectl_ok(&["label", "namespace", "held", "pod-security.kubernetes.io/enforce=privileged"]);

    // impostor: a host pod with the translated name (even our cluster label) but no ownership
    // annotations, there before the virtual pod. stale: a host pod carrying the ownership marks
    // of an earlier virtual pod of the same name (another uid).
    let impostor_host = tr.host_name("default", "impostor");
    let stale_host = tr.host_name("held", "stale");
    let impostor_log = files.join("impostor.log");
    std::fs::write(&impostor_log, "2026-01-01T00:00:00.000000000Z stdout F IMPOSTOR LOG\n").unwrap();
    for name in [&impostor_host, &stale_host] {
        kwok_rule(&host, &tr, "Logs", name, json!({"logs": [{"logsFile": path_str(&impostor_log)}]})).await;
    }
    let stale_annotations = tr.owner_annotations("Pod", "held", "stale", "00000000-0000-0000-0000-000000000000");
    mirror_pod(&host, &tr, "default", "impostor", None).await;
    mirror_pod(&host, &tr, "held", "stale", Some(&stale_annotations)).await;

    let web_uid = create_virtual_pod(&vc, &files, "default", "web", false);
    create_virtual_pod(&vc, &files, "default", "impostor", false);
    create_virtual_pod(&vc, &files, "held", "orphan", true);
    create_virtual_pod(&vc, &files, "held", "stale", true);
    let web_annotations = tr.owner_annotations("Pod", "default", "web", &web_uid);
    mirror_pod(&host, &tr, "default", "web", Some(&web_annotations)).await;
    let web_host = tr.host_name("default", "web");
    tokio::join!(
        wait_host_pod(&host, &tr, &web_host, true),
        wait_host_pod(&host, &tr, &impostor_host, true),
        // A syncer may remove a stale copy it owns; then there is no host pod at all.
        wait_host_pod(&host, &tr, &stale_host, false),
    );
    // On the host itself the impostor's log is there to be read.
    eventually("the impostor host pod serves its log on the host", Duration::from_secs(30), || async {
        let out = env.kubectl(&["logs", "-n", vc.host_namespace(), &impostor_host]);
        if String::from_utf8_lossy(&out.stdout).contains("IMPOSTOR LOG") { Ok(Some(())) } else { Err(text(&out)) }
    })
    .await;

    // The mirrored pod is reachable: what follows is refused for the reasons tested, not by accident.
    assert!(vc.kubectl_ok(&["logs", "web"]).contains("simulated container log line 1"));

    for (ns, pod) in [("held", "orphan"), ("default", "impostor"), ("held", "stale")] {
        let out = vc.kubectl(&["logs", "-n", ns, pod]);
        assert!(!out.status.success(), "kubectl logs {pod} worked: {}", text(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("IMPOSTOR"), "{}", text(&out));
        assert!(
            stderr(&out).contains(&format!("pod \"{pod}\" is not running on the host yet")),
            "kubectl logs {pod}: {}",
            text(&out)
        );
        // None of them is bound to a node (no host pod of ours was scheduled), so the virtual API
        // server has no kubelet to send an exec to.
        let out = vc.kubectl(&["exec", "-n", ns, pod, "--", "echo", "reached"]);
        assert!(!out.status.success(), "kubectl exec {pod} worked: {}", text(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("reached"), "{}", text(&out));
        assert!(
            stderr(&out).contains(&format!("pod {pod} does not have a host assigned")),
            "kubectl exec {pod}: {}",
            text(&out)
        );
    }

    // RBAC: nobody may not even read the pod; a user who may read pods but not their logs or
    // exec into them is refused (logs by the proxy's own check, exec by the virtual API server).
    assert_forbidden(&vc.kubectl(&["--as=nobody", "logs", "web"]), r#"User "nobody" cannot"#);
    vc.kubectl_ok(&["create", "role", "pod-reader", "--verb=get,list", "--resource=pods"]);
    vc.kubectl_ok(&["create", "rolebinding", "reader", "--role=pod-reader", "--user=reader"]);
    eventually("reader may get pods", Duration::from_secs(20), || async {
        let out = vc.kubectl(&["--as=reader", "get", "pod", "web"]);
        if out.status.success() { Ok(Some(())) } else { Err(text(&out)) }
    })
    .await;
    assert_forbidden(
        &vc.kubectl(&["--as=reader", "logs", "web"]),
        r#"User "reader" cannot get resource "pods/log" in API group "" in the namespace "default""#,
    );
    assert_forbidden(
        &vc.kubectl(&["--as=reader", "exec", "web", "--", "echo", "hi"]),
        r#"User "reader" cannot create resource "pods/exec""#,
    );
    // Granting pods/log is enough for logs.
    vc.kubectl_ok(&["create", "role", "log-reader", "--verb=get", "--resource=pods/log"]);
    vc.kubectl_ok(&["create", "rolebinding", "reader-logs", "--role=log-reader", "--user=reader"]);
    eventually("reader may read logs once granted pods/log", Duration::from_secs(20), || async {
        let out = vc.kubectl(&["--as=reader", "logs", "web"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("simulated container log line 1") {
            Ok(Some(()))
        } else {
            Err(text(&out))
        }
    })
    .await;

    // The resource metrics API is the virtual cluster's own (served by vkube from the host's):
    // its RBAC decides, and a host without metrics-server (this kwok host) is said plainly.
    assert_forbidden(
        &vc.kubectl(&["--as=reader", "top", "pod", "web"]),
        r#"User "reader" cannot get resource "pods" in API group "metrics.k8s.io""#,
    );
    eventually("kubectl top says the host has no metrics API", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["top", "pod", "web"]);
        let said = stderr(&out);
        if !out.status.success() && said.contains("the host cluster serves no resource metrics API") {
            Ok(Some(()))
        } else {
            Err(text(&out))
        }
    })
    .await;

    // Its Service, made again by the tenant as a ClusterIP, still has nothing on the host: its
    // name is the egress proxy's, not a host Service's.
    vc.kubectl_ok(&["-n", "kube-system", "delete", "service", "vkube-metrics"]);
    vc.kubectl_ok(&["-n", "kube-system", "create", "service", "clusterip", "vkube-metrics", "--tcp=443"]);
    vc.kubectl_ok(&["-n", "kube-system", "create", "service", "clusterip", "after-metrics", "--tcp=443"]);
    let services: Api<Service> = Api::namespaced(host.clone(), vc.host_namespace());
    // The syncer has handled the next Service's events once it adopts the proxy's host copy.
    let after_uid =
        vc.kubectl_ok(&["-n", "kube-system", "get", "service", "after-metrics", "-o", "jsonpath={.metadata.uid}"]);
    eventually("the next Service's host copy adopted", Duration::from_secs(20), || async {
        let copy = services.get_opt(&tr.host_name("kube-system", "after-metrics")).await.map_err(|e| e.to_string())?;
        let uid = copy.and_then(|c| c.metadata.annotations?.get(vkube_syncer::naming::ANNOTATION_UID).cloned());
        Ok((uid.as_deref() == Some(after_uid.as_str())).then_some(()))
    })
    .await;
    let copy = services.get_opt(&tr.host_name("kube-system", "vkube-metrics")).await.unwrap();
    assert!(copy.is_none(), "the resource metrics API's Service has no host copy, whatever its type: {copy:?}");
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The tenant's admission policy on exec: refuses any command with the word `forbidden`.
const NO_FORBIDDEN_EXEC: &str = r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: no-forbidden-exec
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["CONNECT"]
      resources: ["pods/exec"]
  validations:
  - expression: "!object.command.exists(c, c == 'forbidden')"
    message: "the tenant's policy refuses this command"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: no-forbidden-exec
spec:
  policyName: no-forbidden-exec
  validationActions: [Deny]
"#;

const WIDGET_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.example.com
spec:
  group: e2e.example.com
  scope: Namespaced
  names:
    kind: Widget
    listKind: WidgetList
    plural: widgets
    singular: widget
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size:
                  type: integer
                  minimum: 1
                color:
                  type: string
"#;

fn widget_yaml(name: &str, namespace: &str, size: &str) -> String {
    format!(
        "apiVersion: e2e.example.com/v1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  size: {size}\n  color: green\n"
    )
}

fn configmap_yaml(name: &str, namespace: &str, color: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\ndata:\n  color: {color}\n"
    )
}

/// A directory for this test's files, inside the environment's (kept if the test fails).
fn scratch(env: &TestEnv, name: &str) -> PathBuf {
    let dir = env.dir().join("e2e").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status, stdout and stderr, for failure messages.
fn text(out: &Output) -> String {
    format!("({}) stdout: {} stderr: {}", out.status, String::from_utf8_lossy(&out.stdout), stderr(out))
}

fn kubectl_ok_at(up: &Upstream, kubeconfig: &Path, args: &[&str]) -> String {
    vkube_e2e::kubectl_ok(up, kubeconfig, args)
}

/// kubectl's report of a 401: "Unauthorized" for raw requests; for API discovery, client-go words
/// it "the server has asked for the client to provide credentials" (as for the real API server).
fn assert_unauthorized(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what}: kubectl succeeded: {}", text(out));
    let err = stderr(out);
    assert!(
        err.contains("error: You must be logged in to the server (Unauthorized)")
            || err.contains("error: You must be logged in to the server (the server has asked for the client to provide credentials)"),
        "{what}: expected 401 Unauthorized: {}",
        text(out)
    );
}

fn assert_forbidden(out: &Output, detail: &str) {
    assert!(!out.status.success(), "expected Forbidden, kubectl succeeded: {}", text(out));
    let err = stderr(out);
    assert!(err.contains("Forbidden") || err.contains("forbidden"), "expected Forbidden: {}", text(out));
    assert!(err.contains(detail), "expected {detail:?}: {}", text(out));
}

/// A kubeconfig as JSON (kubectl reads JSON kubeconfigs as well as YAML).
fn kubeconfig_json(up: &Upstream, kubeconfig: &Path) -> Value {
    serde_json::from_str(&kubectl_ok_at(up, kubeconfig, &["config", "view", "--raw", "-o", "json"])).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// The same server and CA, no credentials.
fn without_user(kc: &Value) -> Value {
    let mut kc = kc.clone();
    kc["users"] = json!([]);
    for ctx in kc["contexts"].as_array_mut().unwrap() {
        ctx["context"].as_object_mut().unwrap().remove("user");
    }
    kc
}

/// `kc`'s server and CA with the credentials of `other`'s first user.
fn with_user_of(kc: &Value, other: &Value) -> Value {
    let creds = other["users"][0]["user"].clone();
    assert!(creds["client-certificate-data"].is_string(), "the other kubeconfig has a client certificate");
    with_credentials(kc, creds)
}

fn b_anonymous(files: &Path, up: &Upstream, b: &VirtualCluster) -> PathBuf {
    let path = files.join("b-no-user.kubeconfig");
    write_json(&path, &without_user(&kubeconfig_json(up, &b.kubeconfig())));
    path
}

/// `kc`'s server and CA with the given user credentials.
fn with_credentials(kc: &Value, user: Value) -> Value {
    let mut kc = kc.clone();
    kc["users"][0]["user"] = user;
    kc
}

/// A client of the kubeconfig `kc` (JSON) that sends whatever credentials it has, and no others.
async fn bare_client(kc: &Value) -> kube::Client {
    let kc: kube::config::Kubeconfig = serde_json::from_value(kc.clone()).expect("kubeconfig");
    vkube_localenv::client::from_kubeconfig(kc, None).await.expect("client")
}

async fn raw_get(client: &kube::Client, path: &str) -> Result<String, kube::Error> {
    client.request_text(http::Request::get(path).body(vec![]).unwrap()).await
}

/// The proxy's count of 401 answers, from its (unauthenticated) metrics endpoint.
async fn unauthorized_count(client: &kube::Client) -> f64 {
    let metrics = raw_get(client, "/metrics").await.expect("/metrics");
    metrics
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(name, _)| *name == "vkube_proxy_unauthorized_total")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no vkube_proxy_unauthorized_total in /metrics:\n{metrics}"))
}

/// A pod `<namespace>/<name>` (container `<name>`, image nginx) in the virtual cluster; returns
/// its uid. Without a syncer it stays Pending there: nothing schedules it.
fn create_virtual_pod(vc: &VirtualCluster, files: &Path, namespace: &str, name: &str, privileged: bool) -> String {
    let manifest = files.join(format!("pod-{namespace}-{name}.json"));
    let mut container = json!({"name": name, "image": "nginx"});
    if privileged {
        container["securityContext"] = json!({"privileged": true});
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"restartPolicy": "Never", "containers": [container]},
    });
    write_json(&manifest, &pod);
    // The namespace's default ServiceAccount comes from the controller-manager, a moment after
    // the namespace (and after the cluster's start).
    let created = (|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = vc.kubectl(&["create", "-f", path_str(&manifest)]);
            if out.status.success() || !stderr(&out).contains("serviceaccount") || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })();
    assert!(created.status.success(), "creating pod {namespace}/{name}: {}", text(&created));
    let uid = vc.kubectl_ok(&["get", "pod", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}"]);
    assert!(!uid.is_empty());
    uid
}

/// What the syncer does for virtual pod `<namespace>/<name>`: a host pod under the translated
/// name with our labels and the given annotations (container `<name>`), scheduled onto a kwok
/// node. If a syncer got there first with a copy of the same virtual pod, that copy is used.
async fn mirror_pod(
    host: &kube::Client,
    tr: &Translator,
    namespace: &str,
    name: &str,
    annotations: Option<&BTreeMap<String, String>>,
) {
    let host_name = tr.host_name(namespace, name);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": host_name,
            "labels": tr.host_labels(namespace, None),
            "annotations": annotations.cloned().unwrap_or_default(),
        },
        "spec": {
            "automountServiceAccountToken": false,
            "restartPolicy": "Never",
            "containers": [{"name": name, "image": "nginx"}],
        },
    }))
    .unwrap();
    let api: Api<Pod> = Api::namespaced(host.clone(), tr.host_namespace());
    // The host namespace's default ServiceAccount may still be on its way.
    eventually(&format!("host pod {host_name} created"), Duration::from_secs(30), || async {
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => Ok(Some(())),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = api.get(&host_name).await.map_err(|e| e.to_string())?;
                let wanted = annotations.map(|a| a.get(vkube_syncer::naming::ANNOTATION_UID));
                let has = tr.owner(&existing.metadata).map(|o| o.uid);
                match wanted {
                    Some(Some(uid)) if has.as_ref() == Some(uid) => {
                        eprintln!("host pod {host_name}: using the copy the syncer made");
                        Ok(Some(()))
                    }
                    _ => panic!("host pod {host_name} exists already and is not the copy wanted: {existing:?}"),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}

/// Waits until host pod `host_name` runs (kwok makes pods on its nodes Running). With
/// `must_exist: false`, a pod that is gone also ends the wait.
async fn wait_host_pod(host: &kube::Client, tr: &Translator, host_name: &str, must_exist: bool) {
    let api: Api<Pod> = Api::namespaced(host.clone(), tr.host_namespace());
    eventually(&format!("host pod {host_name} Running"), Duration::from_secs(60), || async {
        let Some(p) = api.get_opt(host_name).await.map_err(|e| e.to_string())? else {
            return if must_exist { Err("gone".into()) } else { Ok(Some(())) };
        };
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Running" { Ok(Some(())) } else { Err(format!("phase {phase:?}")) }
    })
    .await;
}

/// A per-pod kwok rule (`Logs`, `Exec`, `PortForward`) for host pod `name`.
async fn kwok_rule(host: &kube::Client, tr: &Translator, kind: &str, name: &str, spec: Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(host.clone(), tr.host_namespace(), &vkube_localenv::host::kwok_resource(kind));
    let obj = json!({
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": tr.host_namespace()},
        "spec": spec,
    });
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("creating kwok {kind} {name}: {e}"));
}

/// One connection to a forwarded port: sends `payload`, returns everything received until the
/// payload came back (or the read timed out).
fn forward_once(port: u16, payload: &[u8]) -> Result<String, String> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    conn.write_all(payload).map_err(|e| e.to_string())?;
    let payload = String::from_utf8_lossy(payload).into_owned();
    let mut received = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&received).ends_with(&payload) {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&received))),
        }
    }
    Ok(String::from_utf8_lossy(&received).into_owned())
}

/// A long-running kubectl (watch, follow, port-forward) whose output is read line by line.
/// Killed when dropped.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    args: String,
}

impl Streaming {
    fn spawn(up: &Upstream, kubeconfig: &Path, args: &[&str]) -> Streaming {
        let mut child = Command::new(up.kubectl())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBECTL_KUBERC")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Streaming { child, lines, seen: vec![], stderr, args: args.join(" ") }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "kubectl {}: no line with {needle:?} within {} s ({e}); stdout so far: {:?}; stderr: {}; exited: {:?}",
                    self.args,
                    timeout.as_secs(),
                    self.seen,
                    self.stderr.lock().unwrap(),
                    self.child.try_wait()
                ),
            }
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
