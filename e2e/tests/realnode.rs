//! Real containers: a dev host with a real node (containerd, kubelet, kube-proxy on this machine),
//! virtual clusters on it, and tenant pods that really run. One real node per machine, so the
//! tests here take turns.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vkube_e2e::{Cli, TestEnv, VirtualCluster, kubectl_stdin, port_forward, vkube_bin};
use vkube_localenv::{HostOptions, node};

static ONE_REAL_NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn real_node_host() -> TestEnv {
    TestEnv::start_with(HostOptions { nodes: 0, real_nodes: 1, ..Default::default() }).await
}

fn wait_ready(vc: &VirtualCluster, ns: &str, what: &[&str]) {
    let mut args = vec!["wait", "-n", ns, "--for=condition=Ready", "--timeout=120s"];
    args.extend(what);
    vc.kubectl_ok(&args);
}

/// `kubectl exec` in the virtual cluster: (success, stdout + stderr).
fn exec(vc: &VirtualCluster, pod: &str, cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["exec", pod, "--"];
    args.extend(cmd);
    let out = vc.kubectl(&args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn exec_ok(vc: &VirtualCluster, pod: &str, cmd: &[&str]) -> String {
    let (ok, out) = exec(vc, pod, cmd);
    assert!(ok, "exec {cmd:?} in {pod} failed: {out}");
    out
}

/// The first `n` lines a long-running kubectl command (`logs -f`, `attach`) prints.
fn first_lines(vc: &VirtualCluster, args: &[&str], n: usize) -> Vec<String> {
    let mut child = Command::new(vkube_localenv::Upstream::locate().expect("upstream").kubectl())
        .args(args)
        .env("KUBECONFIG", vc.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl");
    let lines: Vec<String> =
        BufReader::new(child.stdout.take().expect("stdout")).lines().take(n).map(|l| l.expect("a line")).collect();
    let _ = child.kill();
    let _ = child.wait();
    lines
}

const TENANT_A: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: other}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: docker.io/library/busybox:1.36
        command: [sh, -c, "echo served-by-web > /www/index.html; exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: other}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// A pod `client` of service account `reader`, who may view the cluster; it prints a tick a second.
const READER_CLIENT: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader-views}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: ServiceAccount, name: reader, namespace: default}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}, annotations: {team: a}}
spec:
  serviceAccountName: reader
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: docker.io/library/busybox:1.36
    stdin: true
    command: [sh, -c, "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]
    volumeMounts: [{name: info, mountPath: /info}]
  volumes:
  - name: info
    downwardAPI:
      items:
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
      - {path: annotations, fieldRef: {fieldPath: metadata.annotations}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_pods_really_run_and_reach_their_own_cluster() {
    let _turn = ONE_REAL_NODE.lock().await;
    let sysctls_before = node::sysctls();
    let env = real_node_host().await;
    let node_dir = env.dir().join("node");
    let a = env.virtual_cluster("rn-a").await;
    let b = env.virtual_cluster("rn-b").await;
    b.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: hidden}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: secret, namespace: hidden}\nspec:\n  ports: [{port: 80}]\n");
    a.apply(TENANT_A);
    a.apply(READER_CLIENT);
    wait_ready(&a, "default", &["pod/client"]);
    wait_ready(&a, "other", &["pod", "-l", "app=web"]);
    wait_ready(&a, "kube-system", &["pod", "-l", "k8s-app=kube-dns"]);

    // Its token is the virtual cluster's: in-cluster kubectl reaches the virtual API server
    // through `kubernetes.default` and sees the virtual namespaces and names, not the host's.
    assert_eq!(exec_ok(&a, "client", &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"]), "default");
    let whoami = exec_ok(&a, "client", &["kubectl", "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(whoami, "system:serviceaccount:default:reader");
    let pods = exec_ok(&a, "client", &["kubectl", "get", "pods", "-n", "other", "-o", "name"]);
    assert!(pods.starts_with("pod/web-") && !pods.contains("-x-"), "virtual names: {pods}");
    let namespaces = exec_ok(&a, "client", &["kubectl", "get", "namespaces", "-o", "name"]);
    assert!(namespaces.contains("namespace/other"), "{namespaces}");
    assert!(!namespaces.contains("hidden") && !namespaces.contains("vkube-"), "{namespaces}");

    // `kubernetes.default` has Endpoints, and the EndpointSlice mirrored from them, where the
    // proxy is served, as a cluster's API servers publish themselves.
    let host_slices = env.kubectl_ok(&[
        "get",
        "endpointslices",
        "-n",
        a.host_namespace(),
        "-l",
        "kubernetes.io/service-name=rn-a",
        "-o",
        "jsonpath={.items[*].endpoints[*].addresses[*]}",
    ]);
    assert!(!host_slices.trim().is_empty(), "the proxy's host endpoints");
    vkube_e2e::eventually("kubernetes.default's Endpoints and EndpointSlice", Duration::from_secs(30), || async {
        let ep = a.kubectl_ok(&["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[*].addresses[*].ip}"]);
        let sl = a.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=kubernetes",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ]);
        let (ep, sl) = (ep.trim().to_string(), sl.trim().to_string());
        if ep == host_slices.trim() && sl == ep {
            Ok(Some(()))
        } else {
            Err(format!("endpoints {ep:?}, slices {sl:?}"))
        }
    })
    .await;

    // The virtual CoreDNS answers with the virtual Service's ClusterIP, which routes on the host.
    let ip = a.kubectl_ok(&["get", "svc", "web", "-n", "other", "-o", "jsonpath={.spec.clusterIP}"]);
    let answer = exec_ok(&a, "client", &["nslookup", "web.other.svc.cluster.local"]);
    assert!(answer.contains(&format!("Address: {ip}")), "{answer}");
    assert_eq!(exec_ok(&a, "client", &["wget", "-qO-", "http://web.other.svc.cluster.local/"]), "served-by-web\n");
    // The other tenant's names do not resolve here.
    let (resolved, answer) = exec(&a, "client", &["nslookup", "secret.hidden.svc.cluster.local"]);
    assert!(!resolved || answer.contains("NXDOMAIN"), "another tenant's Service resolved: {answer}");

    // logs -f, exec -i and -it (a terminal: script(1) gives kubectl a pty), cp, attach and
    // port-forward reach the real container through the proxy.
    let interactive =
        format!("{} exec -it client -- sh", vkube_localenv::Upstream::locate().expect("upstream").kubectl().display());
    let mut tty = Command::new("script")
        .args(["-qec", &interactive, "/dev/null"])
        .env("KUBECONFIG", a.kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    tty.stdin.take().expect("stdin").write_all(b"tty; echo sum=$((6*7)); exit\n").expect("typing");
    let session = tty.wait_with_output().expect("the terminal session");
    let shown = String::from_utf8_lossy(&session.stdout);
    assert!(shown.contains("sum=42") && shown.contains("/dev/pts/"), "a terminal in the container: {shown}");
    let lines = first_lines(&a, &["logs", "-f", "client"], 2);
    assert!(lines.iter().all(|l| l.starts_with("tick ")), "{lines:?}");
    let out = kubectl_stdin(
        &env.upstream,
        &a.kubeconfig(),
        &["exec", "-i", "client", "--", "sh", "-c", "read x; echo got:$x"],
        "hello\n",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\n", "{}", String::from_utf8_lossy(&out.stderr));
    let local = env.dir().join("copied.txt");
    std::fs::write(&local, "copied through the proxy\n").expect("writing a file");
    a.kubectl_ok(&["cp", &local.display().to_string(), "client:/tmp/copied.txt"]);
    assert_eq!(exec_ok(&a, "client", &["cat", "/tmp/copied.txt"]), "copied through the proxy\n");
    let attached = first_lines(&a, &["attach", "client"], 1);
    assert!(attached.first().is_some_and(|l| l.starts_with("tick ")), "{attached:?}");
    let (mut pf, port) = port_forward(&env.upstream, &a.kubeconfig(), &["-n", "other", "deploy/web"], 8080);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the forward");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("request");
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    assert!(response.contains("served-by-web"), "{response}");
    let _ = pf.kill();
    let _ = pf.wait();

    // pods/proxy and services/proxy reach the real container through the host API server, for
    // who may use them; a selector-less Service's (addresses the tenant wrote) are refused.
    let web = a.kubectl_ok(&["get", "pod", "-n", "other", "-l", "app=web", "-o", "jsonpath={.items[0].metadata.name}"]);
    for path in [
        format!("/api/v1/namespaces/other/pods/{web}:8080/proxy/"),
        "/api/v1/namespaces/other/services/web:80/proxy/index.html".to_string(),
        "/api/v1/namespaces/other/services/http:web:/proxy/".to_string(),
    ] {
        assert_eq!(a.kubectl_ok(&["get", "--raw", &path]), "served-by-web\n", "{path}");
    }
    let as_reader = a.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/other/services/web:80/proxy/",
        "--as=system:serviceaccount:default:reader",
    ]);
    assert!(String::from_utf8_lossy(&as_reader.stderr).contains("forbidden"), "{as_reader:?}");
    a.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: manual, namespace: other}\nspec:\n  ports: [{port: 80}]\n",
    );
    let manual = a.kubectl(&["get", "--raw", "/api/v1/namespaces/other/services/manual:80/proxy/"]);
    assert!(String::from_utf8_lossy(&manual.stderr).contains("only Services with a selector"), "{manual:?}");

    // Everything the node changed on the machine is undone when the environment goes.
    drop(a);
    drop(b);
    drop(env);
    assert_eq!(node::leftovers(&node_dir), Vec::<String>::new());
    assert_eq!(node::sysctls(), sysctls_before);
}

/// An Ingress in namespace `other` sending `host` to Service `web`.
fn ingress(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: other}}\nspec:\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}]}}\n"
    )
}

/// A tenant's Ingress served by a real ingress controller (the dev host's traefik): requests for
/// its host name reach its pod, a name the admin did not allow reaches nothing; requests through
/// the controller keep the cluster awake (its metrics), and once they stop it goes to sleep;
/// asleep, a request through the controller wakes the cluster and its pod answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_traffic_reaches_the_tenants_pod_keeps_it_awake_and_wakes_its_sleeping_cluster() {
    let _turn = ONE_REAL_NODE.lock().await;
    let env = real_node_host().await;
    let sleep_after = Duration::from_secs(20);
    let vc = env
        .virtual_cluster_with(
            "rn-ing",
            &[
                &format!("--ingress-classes={}", vkube_localenv::ingress::CLASS),
                "--ingress-hosts=*.team-a.example.com",
                &format!("--sleep-after={}s", sleep_after.as_secs()),
                &format!("--ingress-metrics=http://127.0.0.1:{}/metrics", env.host.ports.ingress_metrics),
            ],
        )
        .await;
    vc.apply(TENANT_A);
    vc.apply(&ingress("shop", "shop.team-a.example.com"));
    vc.apply(&ingress("steal", "login.team-b.example.com"));
    // Until the web traffic starts, requests that count keep it awake (`kubectl wait` is a
    // watch, which does not count, and the pod may take longer than the idle time to start).
    let touch = || vc.kubectl_ok(&["get", "namespace", "other", "-o", "name"]);
    let controller = format!("127.0.0.1:{}", env.host.ports.ingress);
    let get = |host: &str| vkube_e2e::http_get_host(&controller, host, "/", None);
    let served = |(status, text): &(u16, String)| *status == 200 && text.ends_with("served-by-web\n");
    vkube_e2e::eventually("the tenant's pod through the ingress controller", Duration::from_secs(120), || async {
        touch();
        let answer = get("shop.team-a.example.com");
        served(&answer).then_some(Some(())).ok_or(answer.1)
    })
    .await;
    vc.warned("other", "steal", "spec.rules[0].host: \"login.team-b.example.com\" is not among").await;
    let (status, text) = get("login.team-b.example.com");
    assert_eq!(status, 404, "a host name the admin did not allow is not routed: {text}");
    // The controller's address reaches the tenant's Ingress.
    vkube_e2e::eventually("the controller's address in the tenant's Ingress", Duration::from_secs(30), || async {
        let ip = vc.kubectl_ok(&[
            "get",
            "ingress",
            "shop",
            "-n",
            "other",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        (ip == "127.0.0.1").then_some(Some(())).ok_or(format!("status address {ip:?}"))
    })
    .await;

    // An annotation of the cluster's host Service (where sleep mode keeps its state).
    let annotation = |key: &str| {
        let path = format!("jsonpath={{.metadata.annotations.{}}}", key.replace('.', "\\."));
        env.kubectl_ok(&["get", "service", "rn-ing", "-n", vc.host_namespace(), "-o", &path])
    };
    let power = || annotation("vkube.dev/power");

    // Nothing through the virtual cluster from here on (kubectl would count): only web traffic,
    // for more than twice the idle time, keeps it awake.
    let visited = Instant::now();
    let mut last_visit = visited;
    while visited.elapsed() < sleep_after * 2 + Duration::from_secs(5) {
        let answer = get("shop.team-a.example.com");
        last_visit = Instant::now();
        assert!(served(&answer), "{answer:?}");
        // Never slept yet: no state written, or Running.
        let p = power();
        assert!(p.is_empty() || p == "Running", "{p} under its visitors after {:?}", visited.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    vkube_e2e::eventually("the traffic's activity recorded", Duration::from_secs(30), || async {
        let b = annotation("vkube.dev/last-activity-by");
        (b == "ingress:shop.team-a.example.com").then_some(Some(())).ok_or(b)
    })
    .await;
    // Without visitors it sleeps after its idle time; its pod goes, and a request through the
    // controller reaches the wake port.
    vkube_e2e::eventually("the cluster asleep", sleep_after * 3, || async {
        let p = power();
        (p == "Sleeping").then_some(Some(())).ok_or(p)
    })
    .await;
    assert!(last_visit.elapsed() >= sleep_after, "asleep {:?} after the last visit", last_visit.elapsed());
    let asked = Instant::now();
    vkube_e2e::eventually("the waking page, through the controller", Duration::from_secs(30), || async {
        let (status, text) = get("shop.team-a.example.com");
        (status == 503 && text.contains("waking up")).then_some(Some(())).ok_or(format!("{status}: {text}"))
    })
    .await;
    // Until its pod is ready the waking page answers (the Ingress leads to the wake port until
    // its Services have ready endpoints), not the controller's error for a backend without pods.
    let others = std::sync::Mutex::new(vec![]);
    vkube_e2e::eventually("the tenant's pod through the controller again", Duration::from_secs(90), || async {
        let answer = get("shop.team-a.example.com");
        let waking = answer.0 == 503 && answer.1.contains("waking up");
        if !(served(&answer) || waking) {
            others.lock().unwrap().push(answer.clone());
        }
        served(&answer).then_some(Some(())).ok_or(answer.1)
    })
    .await;
    eprintln!("served again {:.1} s after the first request to the sleeping cluster", asked.elapsed().as_secs_f64());
    assert_eq!(others.into_inner().unwrap(), vec![], "answers neither the waking page nor the pod's");
    assert_eq!(power(), "Running");
    // The request through the controller is what woke it (persisted within 10 s).
    vkube_e2e::eventually("the wake's activity recorded", Duration::from_secs(30), || async {
        let b = annotation("vkube.dev/last-activity-by");
        (b == "ingress:shop.team-a.example.com").then_some(Some(())).ok_or(b)
    })
    .await;
    // The readings of the controller's metrics, and what they counted, show in vkube's own.
    let metrics = vc.client().await.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap();
    for want in [
        "vkube_ingress_metrics_reads_total{result=\"ok\"}",
        "vkube_activity_total{user=\"ingress:shop.team-a.example.com\",verb=\"traffic\"}",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(want)), "{want} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_failures_show_the_hosts_truth() {
    let _turn = ONE_REAL_NODE.lock().await;
    let env = real_node_host().await;
    let a = env.virtual_cluster("rn-fail").await;
    a.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: hog
    image: docker.io/library/busybox:1.36
    # tail keeps a newline-free stream in memory until the limit kills it.
    command: [sh, -c, "head -c 200000000 /dev/zero | tail"]
    resources: {limits: {memory: 32Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: unready}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: docker.io/library/busybox:1.36
    command: [sleep, "3600"]
    readinessProbe: {exec: {command: ["false"]}, periodSeconds: 1}
"#,
    );
    let client = a.client().await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "default");
    let hog = vkube_e2e::eventually(
        "the hog OOMKilled and restarted in the virtual pod",
        Duration::from_secs(120),
        || async {
            let p = pods.get("hog").await.map_err(|e| e.to_string())?;
            let cs = p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first().cloned());
            Ok(cs.filter(|c| {
                c.restart_count >= 1
                    && c.last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
            }))
        },
    )
    .await;
    assert_eq!(hog.last_state.and_then(|s| s.terminated).map(|t| t.exit_code), Some(137));
    let unready = vkube_e2e::eventually("the unready pod Running but not Ready", Duration::from_secs(60), || async {
        let p = pods.get("unready").await.map_err(|e| e.to_string())?;
        let status = p.status.unwrap_or_default();
        let running = status.phase.as_deref() == Some("Running");
        let ready = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Ready");
        Ok(ready.filter(|r| running && r.status == "False" && r.reason.as_deref() == Some("ContainersNotReady")))
    })
    .await;
    assert_eq!(unready.status, "False");
}

/// The resource metrics API from the host's metrics-server: `kubectl top` in the virtual
/// cluster shows the tenant's pods under their virtual names (and their node), and a
/// HorizontalPodAutoscaler on CPU scales a Deployment whose pods are busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_and_an_autoscaler_see_the_hosts_resource_metrics() {
    let _turn = ONE_REAL_NODE.lock().await;
    let env = real_node_host().await;
    let a = env.virtual_cluster("rn-top").await;
    a.apply(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: busy}
spec:
  replicas: 1
  selector: {matchLabels: {app: busy}}
  template:
    metadata: {labels: {app: busy}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: spin
        image: docker.io/library/busybox:1.36
        command: [sh, -c, "while :; do :; done"]
        # Capped at a tenth of a core: twice its request, however fast the machine.
        resources: {requests: {cpu: 50m}, limits: {cpu: 100m}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: busy}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: busy}
  minReplicas: 1
  maxReplicas: 2
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
"#,
    );
    wait_ready(&a, "default", &["pod", "-l", "app=busy"]);
    let top = vkube_e2e::eventually("kubectl top pod shows the busy pod's CPU", Duration::from_secs(150), || async {
        let out = a.kubectl(&["top", "pod", "-l", "app=busy", "--no-headers"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // `busy-…   97m   1Mi`: a pod of the virtual name using CPU.
        let busy = text.lines().find(|l| l.starts_with("busy-")).map(str::to_string);
        Ok(busy.filter(|l| l.split_whitespace().nth(1).is_some_and(|cpu| cpu != "0m")))
    })
    .await;
    assert!(!top.contains("-x-"), "a virtual name: {top}");
    let raw = a.kubectl_ok(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods"]);
    let list: serde_json::Value = serde_json::from_str(&raw).expect("a PodMetricsList");
    let items = list["items"].as_array().expect("items");
    assert!(!items.is_empty() && items.iter().all(|i| i["metadata"]["namespace"] == "default"), "{raw}");
    assert!(items.iter().all(|i| i["metadata"]["labels"]["app"] == "busy"), "the virtual pod's labels: {raw}");
    assert!(items.iter().all(|i| i["containers"][0]["name"] == "spin"), "{raw}");
    let nodes = a.kubectl_ok(&["top", "node", "--no-headers"]);
    assert!(!nodes.trim().is_empty(), "kubectl top node: {nodes}");
    // A cluster with no pods there (its DNS scaled to none, the virtual node it had gone with
    // it) gets nothing of the node, even with a Node of its name.
    let b = env.virtual_cluster("rn-top-b").await;
    b.kubectl_ok(&["scale", "deployment", "coredns", "-n", "kube-system", "--replicas=0"]);
    vkube_e2e::eventually("rn-top-b's virtual node gone with its last pod", Duration::from_secs(120), || async {
        let out = b.kubectl(&["get", "node", node::NAME]);
        if String::from_utf8_lossy(&out.stderr).contains("NotFound") { Ok(Some(())) } else { Err(String::new()) }
    })
    .await;
    b.apply(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n", node::NAME));
    let path = "/apis/metrics.k8s.io/v1beta1/nodes";
    let listed: serde_json::Value = serde_json::from_str(&b.kubectl_ok(&["get", "--raw", path])).expect("a list");
    assert_eq!(listed["items"], serde_json::json!([]), "{listed}");
    let one = b.kubectl(&["get", "--raw", &format!("{path}/{}", node::NAME)]);
    assert!(String::from_utf8_lossy(&one.stderr).contains("NotFound"), "{}", String::from_utf8_lossy(&one.stderr));
    // Reading it is part of `view`, as with metrics-server's own roles.
    a.kubectl_ok(&["create", "clusterrolebinding", "viewer", "--clusterrole=view", "--user=viewer"]);
    vkube_e2e::eventually("a viewer may run kubectl top", Duration::from_secs(30), || async {
        let out = a.kubectl(&["--as=viewer", "top", "pod", "-l", "app=busy", "--no-headers"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.starts_with("busy-") { Ok(Some(())) } else { Err(text) }
    })
    .await;

    // The autoscaler of the virtual cluster's controller manager reads the same API: the pod uses
    // twice its request against a target of half of it, so it adds a replica.
    let client = a.client().await;
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> = kube::Api::namespaced(client, "default");
    vkube_e2e::eventually("the autoscaler scales busy to 2", Duration::from_secs(120), || async {
        let d = deployments.get("busy").await.map_err(|e| e.to_string())?;
        Ok(d.spec.replicas.filter(|r| *r == 2))
    })
    .await;
    let hpa = a.kubectl_ok(&[
        "get",
        "hpa",
        "busy",
        "-o",
        "jsonpath={.status.currentMetrics[0].resource.current.averageUtilization}",
    ]);
    assert!(hpa.parse::<u32>().is_ok_and(|u| u > 50), "the utilization it saw: {hpa}");
}

/// The claims of a JWT: (issued at, expires at).
fn token_times(token: &str) -> (i64, i64) {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url claims");
    let claims: serde_json::Value = serde_json::from_slice(&claims).expect("JSON claims");
    (claims["iat"].as_i64().expect("iat"), claims["exp"].as_i64().expect("exp"))
}

/// A pod's own credentials come from its virtual cluster. Its token is renewed before it expires:
/// with the shortest lifetime the API server allows (10 minutes) and renewal when less than
/// 540 s is left, the container reads a new token within a few minutes (the kubelet refreshes
/// the projected file), which the virtual API server accepts; so does a pod of a cluster whose
/// tokens are delivered in host pod annotations (the kubelet refreshes the downward API file). Its projected trust bundles are the
/// virtual cluster's ClusterTrustBundles, selected by signer and labels; a required projection
/// that matches nothing keeps the pod from starting, as a kubelet would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_token_is_renewed_and_its_trust_bundles_are_its_clusters() {
    let _turn = ONE_REAL_NODE.lock().await;
    let env = real_node_host().await;
    let short = ["--token-lifetime=10m", "--token-renew-before=540s"];
    let a = env.virtual_cluster_with("rn-tok", &short).await;
    let b = env.virtual_cluster_with("rn-tok-ann", &[&short[..], &["--token-delivery=annotation"]].concat()).await;
    b.apply(READER_CLIENT);
    // Certificates to put in bundles: the CAs of the virtual cluster and of the host.
    let ca_of = |kubectl: &dyn Fn(&[&str]) -> String| -> String {
        use base64::Engine;
        let data =
            kubectl(&["config", "view", "--raw", "-o", "jsonpath={.clusters[0].cluster.certificate-authority-data}"]);
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data.trim()).expect("base64 CA"))
            .expect("PEM")
    };
    let (ca, host_ca) = (ca_of(&|args| a.kubectl_ok(args)), ca_of(&|args| env.kubectl_ok(args)));
    let bundle = |name: &str, team: &str, pem: &str| {
        let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: certificates.k8s.io/v1\nkind: ClusterTrustBundle\n\
             metadata: {{name: \"example.com:signer:{name}\", labels: {{team: {team}}}}}\n\
             spec:\n  signerName: example.com/signer\n  trustBundle: |\n{indented}"
        )
    };
    a.apply(&format!("{}---\n{}", bundle("one", "a", &ca), bundle("other", "b", &host_ca)));
    // A pod `name` whose volume projects `sources` (items of a YAML flow sequence).
    let bundle_pod = |name: &str, sources: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: c, image: docker.io/library/busybox:1.36, command: [sleep, "3600"], volumeMounts: [{{name: b, mountPath: /bundles}}]}}
  volumes: [{{name: b, projected: {{sources: [{sources}]}}}}]
"#
        )
    };
    a.apply(&bundle_pod(
        "bundles",
        "{clusterTrustBundle: {signerName: example.com/signer, labelSelector: {matchLabels: {team: a}}, path: team-a.pem}}, \
         {clusterTrustBundle: {name: nothing-here, optional: true, path: none.pem}}",
    ));
    a.apply(&bundle_pod("unmounted", "{clusterTrustBundle: {name: nothing-here, path: none.pem}}"));
    a.apply(READER_CLIENT);
    wait_ready(&a, "default", &["pod/client", "pod/bundles"]);
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(squeeze(&exec_ok(&a, "bundles", &["cat", "/bundles/team-a.pem"])), squeeze(&ca), "the virtual bundle");
    assert_eq!(exec_ok(&a, "bundles", &["cat", "/bundles/none.pem"]), "", "optional and missing: empty");
    let client = a.client().await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "default");
    vkube_e2e::eventually("the pod of a missing required bundle told why", Duration::from_secs(60), || async {
        let p = pods.get("unmounted").await.map_err(|e| e.to_string())?;
        let ready = p.status.and_then(|s| s.conditions).unwrap_or_default().into_iter().find(|c| c.type_ == "Ready");
        Ok(ready.filter(|r| r.status == "False" && r.reason.as_deref() == Some("ContainersNotReady")))
    })
    .await;
    let phase = pods.get("unmounted").await.expect("the pod").status.and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Pending"), "a required bundle that is missing: not started");

    wait_ready(&b, "default", &["pod/client"]);
    let path = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let first = [&a, &b].map(|vc| exec_ok(vc, "client", &["cat", path]));
    for token in &first {
        let (iat, exp) = token_times(token);
        assert_eq!(exp - iat, 600, "the token lives as --token-lifetime says");
    }
    let renewed = vkube_e2e::eventually("renewed tokens in the containers", Duration::from_secs(240), || async {
        // A look every few seconds: each is a kubectl exec through the proxy.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = [&a, &b].map(|vc| exec_ok(vc, "client", &["cat", path]));
        Ok((now[0] != first[0] && now[1] != first[1]).then_some(now))
    })
    .await;
    for ((vc, first), renewed) in [&a, &b].into_iter().zip(&first).zip(&renewed) {
        let ((iat, exp), (iat2, exp2)) = (token_times(first), token_times(renewed));
        assert!(iat2 > iat && exp2 > exp, "the new token is a later one: {iat}/{exp} then {iat2}/{exp2}");
        // A fresh in-cluster kubectl reads the renewed file, and the virtual API server takes it.
        let whoami =
            exec_ok(vc, "client", &["kubectl", "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
        assert_eq!(whoami, "system:serviceaccount:default:reader");
    }
    // The downward API reads the virtual pod's labels and annotations, not the host pod's (and
    // so not its tokens).
    assert_eq!(exec_ok(&b, "client", &["cat", "/info/labels"]), "app=\"client\"");
    let annotations = exec_ok(&b, "client", &["cat", "/info/annotations"]);
    assert!(annotations.contains("team=\"a\"") && !annotations.contains("vkube.dev"), "{annotations}");
    // What the container reads is its host pod's annotation (renewed every minute here: looked
    // at until the kubelet's copy and the annotation are the same token).
    let host_pod = b.translator().host_name("default", "client");
    let jsonpath = "jsonpath={.metadata.annotations.vkube\\.dev/sa-token}";
    vkube_e2e::eventually("the file is the host pod's annotation", Duration::from_secs(120), || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let annotation = env.kubectl_ok(&["get", "pod", "-n", b.host_namespace(), &host_pod, "-o", jsonpath]);
        let file = exec_ok(&b, "client", &["cat", path]);
        Ok((!annotation.is_empty() && annotation.trim() == file.trim()).then_some(()))
    })
    .await;
}

/// The chart path for real: `vkube create NAME` installs the chart, its StatefulSet pod (one
/// container: `vkube run --supervise` with etcd and kube-control-plane as its children) becomes
/// Ready, and the cluster is reached through `vkube connect --port-forward`
/// and, from a host pod, through the proxy's Service; its workloads run on the node; it sleeps
/// and a request wakes it; a snapshot of it asleep restored awake; pause, resume (the data kept on
/// its volume), an upgrade with a changed value and its rollback, and delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_for_real() {
    let _turn = ONE_REAL_NODE.lock().await;
    let env = real_node_host().await;
    let up = vkube_localenv::Upstream::locate().expect("upstream");
    let vkube_image = node::vkube_image_name(env!("CARGO_PKG_VERSION"));
    env.host
        .import_images(&[node::control_plane_image(&up, (&vkube_image, &vkube_bin())).expect("image spec")])
        .expect("importing the control plane's images");
    let cli = Cli::new(&env);
    cli.ok(&["create", "team-r", "--timeout", "180s"]);
    let ns = "vkube-team-r";
    let pod = env.kubectl_ok(&["get", "pod", "-n", ns, "team-r-0", "-o", "jsonpath={.status.phase} {.spec.nodeName}"]);
    assert_eq!(pod, format!("Running {}", node::NAME));

    let kubectl_bin = up.kubectl().display().to_string();
    let through_forward = |args: &[&str]| {
        let mut all = vec!["connect", "team-r", "--port-forward", "--", &kubectl_bin];
        all.extend(args);
        cli.ok(&all)
    };
    assert_eq!(through_forward(&["get", "ns", "default", "-o", "name"]).trim(), "namespace/default");
    through_forward(&["create", "deployment", "web", "--image=docker.io/library/busybox:1.36", "--", "sleep", "3600"]);
    through_forward(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    let host_pods = env.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{\"\\n\"}{end}",
    ]);
    assert!(
        host_pods.lines().any(|l| l.starts_with("web-") && l.ends_with("-x-default-x-team-r Running")),
        "{host_pods}"
    );

    // From a host pod, with the admin kubeconfig the chart publishes, through the Service.
    let service_ip = env.kubectl_ok(&["get", "svc", "-n", ns, "team-r", "-o", "jsonpath={.spec.clusterIP}"]);
    env.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: admin-shell, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  automountServiceAccountToken: false
  containers:
  - name: c
    image: docker.io/library/busybox:1.36
    command: [sleep, "3600"]
    volumeMounts: [{{name: kc, mountPath: /kc, readOnly: true}}]
  volumes: [{{name: kc, secret: {{secretName: vkube-team-r-kubeconfig}}}}]
"#
    ));
    env.kubectl_ok(&["wait", "-n", ns, "--for=condition=Ready", "pod/admin-shell", "--timeout=60s"]);
    let server = format!("--server=https://{service_ip}:443");
    let seen = env.kubectl_ok(&[
        "exec",
        "-n",
        ns,
        "admin-shell",
        "--",
        "kubectl",
        "--kubeconfig=/kc/config",
        &server,
        "get",
        "deployments",
        "-o",
        "name",
    ]);
    assert_eq!(seen.trim(), "deployment.apps/web");
    env.kubectl_ok(&["delete", "pod", "-n", ns, "admin-shell", "--wait=false"]);

    // The resource metrics API with the chart's own host rights (its Role).
    vkube_e2e::eventually("kubectl top pod through the chart's pod", Duration::from_secs(120), || async {
        let mut all = vec!["connect", "team-r", "--port-forward", "--", kubectl_bin.as_str()];
        all.extend(["top", "pod", "-l", "app=web", "--no-headers"]);
        let out = cli.run(&all);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() && text.starts_with("web-") { Ok(Some(())) } else { Err(text) }
    })
    .await;

    // Sleep mode in the chart's one container: its workloads and upstream components stop, the
    // pod stays (its proxy waits for a request); the first kubectl request wakes it.
    cli.ok(&["sleep", "team-r"]);
    let others = || {
        let out = env.kubectl_ok(&["get", "pods", "-n", ns, "-o", "name"]);
        out.lines().filter(|l| *l != "pod/team-r-0").map(str::to_string).collect::<Vec<_>>()
    };
    vkube_e2e::eventually("the workloads gone while asleep", Duration::from_secs(60), || async {
        Ok(others().is_empty().then_some(()))
    })
    .await;
    let phase = env.kubectl_ok(&["get", "pod", "-n", ns, "team-r-0", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Running", "the control-plane pod stays while asleep");
    let logged = cli.ok(&["logs", "team-r", "kube-control-plane", "--tail", "3"]);
    assert_eq!(logged.lines().count(), 3, "the API server's log, read in the pod: {logged}");
    // A snapshot through a port-forward, of the sleeping cluster (its etcd alone runs for it).
    let snapshot = cli.state.path().join("team-r.snapshot");
    cli.ok(&["snapshot", "team-r", "-o", snapshot.to_str().unwrap()]);
    assert!(others().is_empty(), "the snapshot woke the workloads");
    assert_eq!(through_forward(&["get", "deployments", "-o", "name"]).trim(), "deployment.apps/web", "woken");
    through_forward(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    // Restored in the pod (etcdutl from the image): what came after the snapshot is gone.
    through_forward(&["create", "configmap", "later"]);
    cli.ok(&["restore", "team-r", "--from", snapshot.to_str().unwrap()]);
    let later = cli.run(&["connect", "team-r", "--port-forward", "--", &kubectl_bin, "get", "configmap", "later"]);
    assert!(!later.status.success(), "the ConfigMap made after the snapshot survived the restore");
    through_forward(&["rollout", "status", "deployment/web", "--timeout=120s"]);

    // Pause stops the pod and the workloads; resume brings both back with the data on the volume.
    cli.ok(&["pause", "team-r"]);
    vkube_e2e::eventually("no pods left in the host namespace", Duration::from_secs(120), || async {
        let out = env.kubectl_ok(&["get", "pods", "-n", ns, "-o", "name"]);
        Ok(out.trim().is_empty().then_some(()))
    })
    .await;
    cli.ok(&["resume", "team-r"]);
    assert_eq!(through_forward(&["get", "deployments", "-o", "name"]).trim(), "deployment.apps/web");
    through_forward(&["rollout", "status", "deployment/web", "--timeout=120s"]);

    // An upgrade with a changed value (helm upgrade, values kept): a snapshot kept first; the
    // rollback puts back the previous revision and the state of before.
    let qps = || {
        let env_json = env.kubectl_ok(&[
            "get",
            "statefulset",
            "-n",
            ns,
            "team-r",
            "-o",
            "jsonpath={.spec.template.spec.containers[?(@.name==\"vkube\")].env}",
        ]);
        let vars: Vec<serde_json::Value> = serde_json::from_str(&env_json).unwrap();
        vars.iter().find(|v| v["name"] == "VKUBE_HOST_QPS").map(|v| v["value"].as_str().unwrap().to_string())
    };
    let before = qps();
    let record: serde_json::Value =
        serde_json::from_str(&cli.ok(&["upgrade", "team-r", "--set", "sync.hostQPS=40", "-o", "json"])).unwrap();
    assert_eq!(record["finished"], true, "{record}");
    assert!(record["helmRevision"].as_u64().is_some(), "{record}");
    assert_eq!(qps().as_deref(), Some("40"));
    let kept = cli.ok(&["snapshots", "team-r"]);
    assert!(kept.contains(record["snapshot"].as_str().unwrap()), "{kept}");
    through_forward(&["create", "configmap", "after-upgrade"]);
    cli.ok(&["upgrade", "team-r", "--rollback"]);
    assert_eq!(qps(), before, "the rollback put back the previous values");
    let after =
        cli.run(&["connect", "team-r", "--port-forward", "--", &kubectl_bin, "get", "configmap", "after-upgrade"]);
    let said = String::from_utf8_lossy(&after.stderr);
    assert!(said.contains("NotFound"), "the ConfigMap made after the upgrade survived the rollback: {said}");
    through_forward(&["rollout", "status", "deployment/web", "--timeout=120s"]);

    // The platform as a Deployment of its own chart, in the same image (no Helm in it): its
    // dashboard shows team-r to a host user that may list Services, and once team-r's TTL has
    // passed it deletes it with everything it had on the host.
    env.kubectl_ok(&["create", "namespace", "vkube-system"]);
    let (repository, tag) = vkube_image.rsplit_once(':').unwrap();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/vkube-platform");
    let installed = Command::new(up.helm())
        .args(["install", "platform", chart, "-n", "vkube-system", "--wait", "--timeout=120s"])
        .args(["--set", &format!("image.repository={repository}"), "--set", &format!("image.tag={tag}")])
        .args(["--set", "interval=2s"])
        .env("KUBECONFIG", &env.host.kubeconfig)
        .output()
        .unwrap();
    assert!(installed.status.success(), "helm install: {}", String::from_utf8_lossy(&installed.stderr));
    env.kubectl_ok(&["create", "serviceaccount", "viewer", "-n", "default"]);
    env.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "viewer",
        "--clusterrole=view",
        "--serviceaccount=default:viewer",
    ]);
    let token = env.kubectl_ok(&["create", "token", "viewer", "-n", "default"]).trim().to_string();
    let (mut forward, port) = port_forward(&up, &env.host.kubeconfig, &["-n", "vkube-system", "svc/platform"], 8080);
    let (status, page) = vkube_e2e::http_get(&format!("127.0.0.1:{port}"), "/", Some(&token));
    let _ = forward.kill();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(r#"data-cluster="vkube-team-r/team-r" data-state="Running""#), "{page}");
    let past = "2026-01-01T00:00:00Z";
    env.kubectl_ok(&["annotate", "service", "-n", ns, "team-r", &format!("vkube.dev/expires-at={past}")]);
    vkube_e2e::eventually("team-r deleted by the platform", Duration::from_secs(180), || async {
        let left = env.kubectl(&["get", "namespace", ns, "-o", "name"]);
        let gone = !left.status.success() || String::from_utf8_lossy(&left.stdout).trim().is_empty();
        Ok(gone.then_some(()))
    })
    .await;
    let leftovers = env.labelled_host_objects("team-r");
    assert!(leftovers.is_empty(), "left on the host: {leftovers:?}");
    let logged = env.kubectl_ok(&["logs", "-n", "vkube-system", "deploy/platform"]);
    assert!(logged.contains("deleting an expired virtual cluster") && logged.contains("team-r"), "{logged}");
    let releases = env.kubectl_ok(&["get", "secrets", "-A", "-l", "owner=helm,name=team-r", "-o", "name"]);
    assert!(releases.trim().is_empty(), "the Helm release's records are gone: {releases}");
}
