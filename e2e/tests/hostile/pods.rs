//! Pods and what they carry to the host: security fields, volumes, scheduling inputs, marks.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ResourceQuota, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use vkube::controlplane::PolicyArgs;
use vkube_e2e::{TestEnv, VirtualCluster, eventually};

use crate::common::{tr, warned};

/// A pod manifest named `name` whose spec is `spec` merged over one plain container.
fn pod(name: &str, meta: serde_json::Value, spec: serde_json::Value) -> serde_json::Value {
    let mut p = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}});
    for (k, v) in meta.as_object().cloned().unwrap_or_default() {
        p["metadata"][k] = v;
    }
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        p["spec"][k] = v;
    }
    p
}

fn apply_all(vc: &VirtualCluster, ns: &str, pods: &[serde_json::Value]) {
    let items: Vec<serde_json::Value> = pods
        .iter()
        .cloned()
        .map(|mut p| {
            p["metadata"]["namespace"] = ns.into();
            p
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let out = vc.try_apply(&list.to_string());
    assert!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The host pod mirroring virtual pod `ns/name`, once it exists.
async fn host_pod(env: &TestEnv, vc: &VirtualCluster, ns: &str, name: &str) -> Pod {
    let api: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let host_name = tr(vc).host_name(ns, name);
    eventually(&format!("host pod {host_name}"), Duration::from_secs(30), || async {
        api.get_opt(&host_name).await.map_err(|e| e.to_string())
    })
    .await
}

/// Security, volume and probe cases the syncer must refuse, in a namespace whose labels turned
/// the virtual API server's own Pod Security admission off (the tenant may do that): the
/// syncer is the gate. Each: (pod name, spec or metadata, what the Warning event must name).
fn refused_cases() -> Vec<(serde_json::Value, &'static str)> {
    let none = serde_json::json!({});
    let c = |sc: serde_json::Value| serde_json::json!({"containers": [{"name": "c", "image": "nginx", "securityContext": sc}]});
    vec![
        (
            // What a refused pod refers to stays off the host too.
            pod(
                "privileged",
                none.clone(),
                serde_json::json!({
                "containers": [{"name": "c", "image": "nginx", "securityContext": {"privileged": true},
                    "envFrom": [{"configMapRef": {"name": "evil-config"}}]}],
                "volumes": [{"name": "s", "secret": {"secretName": "evil-secret"}}]}),
            ),
            "privileged=true",
        ),
        (pod("host-network", none.clone(), serde_json::json!({"hostNetwork": true})), "hostNetwork=true"),
        (pod("host-pid", none.clone(), serde_json::json!({"hostPID": true})), "hostPID=true"),
        (pod("host-ipc", none.clone(), serde_json::json!({"hostIPC": true})), "hostIPC=true"),
        (
            pod(
                "host-path",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
            ),
            "hostPath volume",
        ),
        (
            pod(
                "host-port",
                none.clone(),
                serde_json::json!({"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80, "hostPort": 80}]}]}),
            ),
            "hostPort 80",
        ),
        (pod("sys-admin", none.clone(), c(serde_json::json!({"capabilities": {"add": ["SYS_ADMIN"]}}))), "SYS_ADMIN"),
        (
            pod("selinux-container", none.clone(), c(serde_json::json!({"seLinuxOptions": {"type": "spc_t"}}))),
            "seLinuxOptions.type \"spc_t\"",
        ),
        (
            pod(
                "selinux-user",
                none.clone(),
                serde_json::json!({"securityContext": {"seLinuxOptions": {"user": "system_u"}}}),
            ),
            "seLinuxOptions.user",
        ),
        (
            pod(
                "apparmor",
                serde_json::json!({"annotations": {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}}),
                none.clone(),
            ),
            "container.apparmor.security.beta.kubernetes.io/c",
        ),
        (
            pod(
                "sysctl",
                none.clone(),
                serde_json::json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "65536"}]}}),
            ),
            "kernel.msgmax",
        ),
        (
            pod(
                "probe-host",
                none.clone(),
                serde_json::json!({"containers": [{"name": "c", "image": "nginx",
                "livenessProbe": {"httpGet": {"host": "169.254.169.254", "path": "/latest/meta-data", "port": 80}}}]}),
            ),
            "livenessProbe.host \"169.254.169.254\"",
        ),
        (
            pod(
                "nfs",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "share", "nfs": {"server": "10.0.0.2", "path": "/exports"}}]}),
            ),
            "volume type nfs",
        ),
        (
            pod(
                "rbd",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "disk", "rbd": {"monitors": ["10.0.0.3:6789"], "image": "db", "secretRef": {"name": "ceph"}}}]}),
            ),
            "volume type rbd",
        ),
        (
            pod(
                "inline-csi",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "disk", "csi": {"driver": "hostpath.csi.k8s.io"}}]}),
            ),
            "CSI driver \"hostpath.csi.k8s.io\"",
        ),
        (
            pod(
                "pod-certificate",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "ca", "projected": {"sources": [
                {"podCertificate": {"signerName": "example.com/host", "keyType": "RSA3072", "credentialBundlePath": "c.pem"}}]}}]}),
            ),
            "podCertificate.keyType: \"RSA3072\" is not supported yet",
        ),
        (
            pod(
                "ephemeral-volume-name",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "volumeName": "pv-of-the-host"}}}}]}),
            ),
            "volumeName",
        ),
        (
            pod(
                "ephemeral-static-class",
                none.clone(),
                serde_json::json!({"volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}, "storageClassName": ""}}}}]}),
            ),
            "ephemeral.volumeClaimTemplate.spec.storageClassName: \"\" (no class)",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_pods_are_refused_or_sanitised() {
    let env = TestEnv::start(2).await;
    let host = env.client().await;
    let nodes: Api<Node> = Api::all(host.clone());
    // The admin's pool, and a tainted control-plane node a tenant must not reach.
    for n in ["kwok-node-0", "kwok-node-1"] {
        let patch = serde_json::json!({"metadata": {"labels": {"pool": "tenants"}}});
        nodes.patch(n, &PatchParams::default(), &Patch::Merge(patch)).await.expect("label node");
    }
    let cp: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "host-control-plane",
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"kubernetes.io/hostname": "host-control-plane", "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/control-plane": ""}},
        "spec": {"taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}}))
    .unwrap();
    nodes.create(&PostParams::default(), &cp).await.expect("control-plane node");

    let policy = PolicyArgs {
        host_node_selector: vec!["pool=tenants".into()],
        host_tolerations: r#"[{"key":"dedicated","operator":"Equal","value":"tenants","effect":"NoSchedule"}]"#.into(),
        endpoint_cidrs: vec!["192.0.2.0/24".into()],
        ..PolicyArgs::default()
    };
    let vc = env.virtual_cluster_with_policy("hostile", policy, &[]).await;
    let hns: Namespace = Api::all(host.clone()).get(vc.host_namespace()).await.unwrap();
    assert_eq!(
        hns.labels()["pod-security.kubernetes.io/enforce"],
        "baseline",
        "the host's own admission is a second gate"
    );

    // Refused: nothing reaches the host, the tenant is told which field.
    vc.kubectl_ok(&["create", "namespace", "evil"]);
    vc.kubectl_ok(&["label", "namespace", "evil", "pod-security.kubernetes.io/enforce=privileged"]);
    vc.kubectl_ok(&["-n", "evil", "create", "configmap", "evil-config", "--from-literal=a=b"]);
    vc.kubectl_ok(&["-n", "evil", "create", "secret", "generic", "evil-secret", "--from-literal=a=b"]);
    let refused = refused_cases();
    let pods: Vec<serde_json::Value> = refused.iter().map(|(p, _)| p.clone()).collect();
    apply_all(&vc, "evil", &pods);

    // Sanitised: the pod runs, without the tenant's node choice, and the tenant is told.
    vc.apply("apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: unsafe-runtime}\nhandler: runc\n");
    let none = serde_json::json!({});
    let sanitised = vec![
        (
            pod("pinned", none.clone(), serde_json::json!({"nodeName": "host-control-plane"})),
            "spec.nodeName \"host-control-plane\"",
        ),
        (
            pod("tolerates-everything", none.clone(), serde_json::json!({"tolerations": [{"operator": "Exists"}]})),
            "(every taint)",
        ),
        (
            pod("runtime", none.clone(), serde_json::json!({"runtimeClassName": "unsafe-runtime"})),
            "runtimeClassName \"unsafe-runtime\"",
        ),
        (
            pod(
                "forged-ephemeral",
                serde_json::json!({"labels": {"vkube.dev/cluster": "other-tenant"}}),
                serde_json::json!({"volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                "metadata": {"labels": {"vkube.dev/cluster": "other-tenant", "vkube.dev/namespace": "default"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}],
                "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}),
            ),
            "key \"node-role.kubernetes.io/control-plane\"",
        ),
    ];
    let mut pods: Vec<serde_json::Value> = sanitised.iter().map(|(p, _)| p.clone()).collect();
    // A node label the host does not show is matched against the virtual cluster's nodes: none
    // carries the control-plane label, so the pods stay pending, as on a cluster of its own.
    let selects = serde_json::json!({"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}});
    pods.push(pod("selects-control-plane", none.clone(), selects));
    let affine = serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]}}}});
    pods.push(pod("affine-to-control-plane", none.clone(), affine));
    apply_all(&vc, "default", &pods);

    for (p, needle) in &refused {
        let name = p["metadata"]["name"].as_str().unwrap();
        let e = warned(&vc, "evil", name, needle).await;
        assert!(e.message.as_deref().unwrap_or_default().contains("isolation policy"), "{name}: {:?}", e.message);
    }
    let host_pods: Vec<String> = vc.host_list::<Pod>(&env).await.iter().map(|p| p.name_any()).collect();
    for (p, _) in &refused {
        let host_name = tr(&vc).host_name("evil", p["metadata"]["name"].as_str().unwrap());
        assert!(!host_pods.contains(&host_name), "{host_name} reached the host: {host_pods:?}");
    }

    let configs: Vec<String> = vc.host_list::<ConfigMap>(&env).await.iter().map(|c| c.name_any()).collect();
    let secrets: Vec<String> = vc.host_list::<Secret>(&env).await.iter().map(|c| c.name_any()).collect();
    assert!(!configs.contains(&tr(&vc).host_name("evil", "evil-config")), "{configs:?}");
    assert!(!secrets.contains(&tr(&vc).host_name("evil", "evil-secret")), "{secrets:?}");

    for name in ["selects-control-plane", "affine-to-control-plane"] {
        let e = warned(&vc, "default", name, "0 nodes are available").await;
        assert_eq!(e.reason.as_deref(), Some("FailedScheduling"), "{e:?}");
        let pending: Pod = Api::namespaced(vc.client().await, "default").get(name).await.unwrap();
        let scheduled = pending.status.and_then(|s| s.conditions).unwrap_or_default();
        let scheduled = scheduled.iter().find(|c| c.type_ == "PodScheduled").expect("a PodScheduled condition");
        assert_eq!((scheduled.status.as_str(), scheduled.reason.as_deref()), ("False", Some("Unschedulable")));
        let host_pods: Vec<String> = vc.host_list::<Pod>(&env).await.iter().map(|p| p.name_any()).collect();
        assert!(!host_pods.contains(&tr(&vc).host_name("default", name)), "{name}: {host_pods:?}");
    }

    let admin_toleration =
        serde_json::json!({"key": "dedicated", "operator": "Equal", "value": "tenants", "effect": "NoSchedule"});
    for (p, needle) in &sanitised {
        let name = p["metadata"]["name"].as_str().unwrap();
        warned(&vc, "default", name, needle).await;
        let hp = host_pod(&env, &vc, "default", name).await;
        let spec = serde_json::to_value(hp.spec.as_ref().unwrap()).unwrap();
        assert_eq!(spec["nodeSelector"], serde_json::json!({"pool": "tenants"}), "{name}: {spec}");
        assert_eq!(spec.get("runtimeClassName"), None, "{name}");
        assert_eq!(spec.get("affinity"), None, "{name}: no tenant node choice: {}", spec["affinity"]);
        let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
        assert!(tolerations.contains(&admin_toleration), "{name}: {tolerations:?}");
        for t in &tolerations {
            let key = t["key"].as_str().unwrap_or_default();
            assert!(
                ["dedicated", "node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"].contains(&key),
                "{name}: a toleration the admin did not allow: {t}"
            );
        }
    }
    // The host scheduler placed them, on the admin's pool only (the ephemeral volume's claim
    // has no provisioner on this host: that pod waits for it).
    let api: Api<Pod> = Api::namespaced(host.clone(), vc.host_namespace());
    for (p, _) in sanitised.iter().filter(|(p, _)| p["metadata"]["name"] != "forged-ephemeral") {
        let host_name = tr(&vc).host_name("default", p["metadata"]["name"].as_str().unwrap());
        let node = eventually(&format!("{host_name} scheduled"), Duration::from_secs(30), || async {
            let p = api.get(&host_name).await.map_err(|e| e.to_string())?;
            Ok(p.spec.and_then(|s| s.node_name))
        })
        .await;
        assert!(node.starts_with("kwok-node-"), "{host_name} on {node}");
    }
    // Ephemeral claim templates cannot pass for another cluster's objects.
    let hp = host_pod(&env, &vc, "default", "forged-ephemeral").await;
    assert_eq!(hp.labels()["vkube.dev/cluster"], "hostile");
    assert_eq!(hp.labels()["vkube.dev.t.vkube.dev/cluster"], "other-tenant");
    let template = hp.spec.unwrap().volumes.unwrap()[0].ephemeral.clone().unwrap().volume_claim_template.unwrap();
    let labels: BTreeMap<String, String> = template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels.get("vkube.dev/cluster"), None, "{labels:?}");
    assert_eq!(labels["vkube.dev.t.vkube.dev/cluster"], "other-tenant");
    assert_eq!(template.spec.volume_name, None);

    // Labels and annotations that host tools act on stay in the tenant domain: no other
    // namespace's NetworkPolicy matches `role: monitoring`, no mesh injects, no CNI attaches a
    // host network, no Prometheus scrapes, no external-dns publishes.
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: labelled
  labels: {role: monitoring, app.kubernetes.io/name: web}
  annotations: {sidecar.istio.io/inject: "true", k8s.v1.cni.cncf.io/networks: host-net, prometheus.io/scrape: "true"}
spec:
  containers: [{name: c, image: nginx}]
---
apiVersion: v1
kind: Service
metadata:
  name: published
  annotations: {external-dns.alpha.kubernetes.io/hostname: www.example.com}
spec:
  selector: {role: monitoring}
  ports: [{port: 80}]
"#,
    );
    let hp = host_pod(&env, &vc, "default", "labelled").await;
    let steering = [
        "role",
        "app.kubernetes.io/name",
        "sidecar.istio.io/inject",
        "k8s.v1.cni.cncf.io/networks",
        "prometheus.io/scrape",
    ];
    for key in steering {
        assert!(
            !hp.labels().contains_key(key) && !hp.annotations().contains_key(key),
            "{key} reached the host verbatim"
        );
    }
    assert_eq!(hp.labels()["t.vkube.dev/role"], "monitoring");
    assert_eq!(hp.annotations()["sidecar.istio.io.t.vkube.dev/inject"], "true");
    let svc_name = tr(&vc).host_name("default", "published");
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(host.clone(), vc.host_namespace());
    let svc = eventually("the host Service", Duration::from_secs(30), || async {
        services.get_opt(&svc_name).await.map_err(|e| e.to_string())
    })
    .await;
    assert!(!svc.annotations().contains_key("external-dns.alpha.kubernetes.io/hostname"), "{:?}", svc.annotations());
    let selector = svc.spec.unwrap().selector.unwrap();
    assert_eq!(selector.get("t.vkube.dev/role").map(String::as_str), Some("monitoring"), "{selector:?}");
    assert!(!selector.contains_key("role"));

    // Secrets named like the control plane's own host Secrets cannot touch them: their copies
    // have names of the tenant's form.
    let host_secrets: Api<Secret> = Api::namespaced(host.clone(), vc.host_namespace());
    let own = ["vkube-hostile-pki", "vkube-hostile-kubeconfig"];
    let mut before = vec![];
    for n in own {
        before.push(host_secrets.get(n).await.expect("the control plane's Secret").metadata.resource_version);
        vc.kubectl_ok(&["create", "secret", "generic", n, "--from-literal=ca.crt=forged"]);
    }
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: collider}\nspec:\n  containers: [{name: c, image: nginx}]\n  volumes: [{name: a, secret: {secretName: vkube-hostile-pki}}, {name: b, secret: {secretName: vkube-hostile-kubeconfig}}]\n");
    for (n, rv) in own.iter().zip(before) {
        let copy = tr(&vc).host_name("default", n);
        eventually(&format!("the tenant's {n} as {copy}"), Duration::from_secs(30), || async {
            host_secrets.get_opt(&copy).await.map_err(|e| e.to_string())
        })
        .await;
        assert_eq!(host_secrets.get(n).await.unwrap().metadata.resource_version, rv, "{n} untouched");
    }

    // A write loop the host's canonical form would start: two target refs behind one IP (the refs
    // do not cross, so the copy has the IP twice and the host stores it once). The copy is written
    // once, not for ever.
    vc.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: twice}
spec:
  ports: [{port: 5432, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: twice}
subsets:
- addresses:
  - {ip: 192.0.2.30, targetRef: {kind: Pod, name: a, namespace: default, uid: "11111111-1111-1111-1111-111111111111"}}
  - {ip: 192.0.2.30, targetRef: {kind: Pod, name: b, namespace: default, uid: "22222222-2222-2222-2222-222222222222"}}
  ports: [{port: 5432, protocol: TCP}]
"#,
    );
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> = Api::namespaced(host.clone(), vc.host_namespace());
    let ep_name = tr(&vc).host_name("default", "twice");
    let first = eventually("the host Endpoints", Duration::from_secs(30), || async {
        endpoints.get_opt(&ep_name).await.map_err(|e| e.to_string())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = endpoints.get(&ep_name).await.unwrap();
    assert_eq!(first.metadata.resource_version, later.metadata.resource_version, "written again and again");

    // The host's quota refuses a pod: the tenant is told, in the host's words, without host names.
    let used = vc.host_list::<Pod>(&env).await.len();
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tight"}, "spec": {"hard": {"pods": used.to_string()}}}))
    .unwrap();
    Api::<ResourceQuota>::namespaced(host.clone(), vc.host_namespace())
        .create(&PostParams::default(), &quota)
        .await
        .expect("host quota");
    // The quota controller must have counted the pods before it refuses more.
    eventually("the host quota counts the pods", Duration::from_secs(30), || async {
        let q = Api::<ResourceQuota>::namespaced(host.clone(), vc.host_namespace())
            .get("tight")
            .await
            .map_err(|e| e.to_string())?;
        Ok(q.status.and_then(|s| s.used).and_then(|u| u.get("pods").cloned()).filter(|q| q.0 == used.to_string()))
    })
    .await;
    vc.kubectl_ok(&["run", "one-too-many", "--image=nginx"]);
    let e = warned(&vc, "default", "one-too-many", "exceeded quota").await;
    let msg = e.message.unwrap_or_default();
    assert!(msg.contains("the host cluster refused it"), "{msg}");
    assert!(!msg.contains(vc.host_namespace()), "no host names: {msg}");
    let metrics = vc.kubectl_ok(&["get", "--raw", "/metrics"]);
    assert!(
        metrics.lines().any(|l| l.starts_with("vkube_syncer_host_refused_total{")
            && l.contains("kind=\"Pod\"")
            && l.contains("reason=\"quota\"")),
        "refusals are counted:\n{metrics}"
    );
}

/// A tenant creating objects in bulk slows its own sync, not the host: every host write of the
/// cluster (the syncer's included) draws on one token bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_host_writes_are_rate_limited() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster_with("slow", &["--host-qps=2", "--host-burst=2"]).await;
    // Let CoreDNS's writes drain the burst first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods: Vec<serde_json::Value> =
        (0..10).map(|i| pod(&format!("bulk-{i}"), serde_json::json!({}), serde_json::json!({}))).collect();
    let started = std::time::Instant::now();
    let since = k8s_openapi::jiff::Timestamp::now().as_second() - 1;
    apply_all(&vc, "default", &pods);
    let tr = vc.translator();
    let names: Vec<String> = (0..10).map(|i| tr.host_name("default", &format!("bulk-{i}"))).collect();
    let bulk = || async {
        let pods = vc.host_list::<Pod>(&env).await;
        pods.into_iter().filter(|p| names.contains(&p.name_any())).count()
    };
    eventually("all 10 host pods, in the end", Duration::from_secs(60), || async {
        Ok((bulk().await == 10).then_some(()))
    })
    .await;
    eprintln!("10 pods reached the host in {:.1} s at 2 writes a second", started.elapsed().as_secs_f64());
    // Each pod costs two host writes (its token Secret, then the pod): 20 writes at 2 a second,
    // the first two from the burst, so the last comes about 9 s after the first (unlimited,
    // within a second or two), however long the tenant's requests took.
    let created = |meta: &kube::api::ObjectMeta| meta.creation_timestamp.as_ref().map(|t| t.0.as_second());
    let mut made: Vec<i64> = vc.host_list::<Pod>(&env).await.iter().filter_map(|p| created(&p.metadata)).collect();
    made.extend(vc.host_list::<Secret>(&env).await.iter().filter_map(|s| created(&s.metadata)));
    made.retain(|t| *t >= since);
    assert!(made.len() >= 20, "the bulk's pods and token Secrets: {made:?}");
    let spread = made.iter().max().unwrap() - made.iter().min().unwrap();
    assert!(spread >= 7, "{} host writes made within {spread} s at 2 writes a second", made.len());
}
