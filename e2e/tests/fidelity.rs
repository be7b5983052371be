//! Fidelity: a tenant's cluster behaves like a cluster of its own, also when the host has
//! opinions (a host LimitRange, taints, conditions the tenant's controllers own).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use vkube_e2e::{TestEnv, eventually};

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn condition<'a>(p: &'a Pod, type_: &str) -> Option<&'a str> {
    p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

/// (port, nodePort) of each port, and the health-check node port.
fn node_ports(s: &Service) -> (Vec<(i32, i32)>, i32) {
    let spec = s.spec.clone().unwrap_or_default();
    let ports = spec.ports.iter().flatten().map(|p| (p.port, p.node_port.unwrap_or_default())).collect();
    (ports, spec.health_check_node_port.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_sees_its_own_qos_gates_variables_nodes_and_node_ports() {
    let env = TestEnv::start(2).await;
    let policy = vkube::controlplane::PolicyArgs {
        allow_node_ports: true,
        allow_load_balancers: true,
        allow_node_port_choice: true,
        bind_node_name: true,
        ..Default::default()
    };
    let mut vc = env.virtual_cluster_with_policy("fidelity", policy, &["--sync-all-nodes"]).await;
    let tr = vc.translator();
    let host = env.client().await;

    // With --sync-all-nodes the host nodes show from the start, before any pod lands.
    let host_nodes: Vec<String> = Api::<Node>::all(host.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    let vnodes: Api<Node> = Api::all(vc.client().await);
    eventually("every host node as a virtual node, before any pod", Duration::from_secs(30), || async {
        let names = vkube_e2e::sorted_names(&vnodes).await?;
        let mut want = host_nodes.clone();
        want.sort();
        Ok((names == want).then_some(()))
    })
    .await;
    let host_pods: Api<Pod> = Api::namespaced(host.clone(), vc.host_namespace());
    let vpods: Api<Pod> = Api::namespaced(vc.client().await, "default");

    // A host admin's LimitRange with defaults: a BestEffort virtual pod's host copy is Burstable.
    env.apply(&format!(
        "apiVersion: v1\nkind: LimitRange\nmetadata: {{name: defaults, namespace: {}}}\nspec:\n  limits:\n  - type: Container\n    default: {{cpu: 200m, memory: 128Mi}}\n    defaultRequest: {{cpu: 100m, memory: 64Mi}}\n    max: {{memory: 1Gi}}\n",
        vc.host_namespace()
    ));
    vc.kubectl_ok(&["create", "service", "clusterip", "my-svc", "--tcp=8080"]);
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: plain}
spec:
  readinessGates: [{conditionType: example.com/load-balancer}]
  containers:
  - name: app
    image: nginx
    env:
    - {name: URL, value: "$(MY_SVC_SERVICE_HOST):$(MY_SVC_SERVICE_PORT)"}
    - {name: LITERAL, value: "$$(MY_SVC_SERVICE_HOST)"}
"#,
    );
    let host_name = tr.host_name("default", "plain");
    let running = eventually("the virtual BestEffort pod Running", Duration::from_secs(30), || async {
        let p = vpods.get("plain").await.map_err(|e| e.to_string())?;
        Ok((phase(&p) == Some("Running")).then_some(p))
    })
    .await;
    assert_eq!(running.status.as_ref().and_then(|s| s.qos_class.as_deref()), Some("BestEffort"));
    let h = host_pods.get(&host_name).await.unwrap();
    assert_eq!(
        h.status.as_ref().and_then(|s| s.qos_class.as_deref()),
        Some("Burstable"),
        "the host's LimitRange applied to the host copy"
    );

    // Service variables come before the container's own, so the kubelet expands references.
    let names: Vec<String> =
        h.spec.as_ref().unwrap().containers[0].env.iter().flatten().map(|e| e.name.clone()).collect();
    let at = |n: &str| names.iter().position(|e| e == n).unwrap_or_else(|| panic!("{n} not in {names:?}"));
    assert!(at("MY_SVC_SERVICE_HOST") < at("URL") && at("MY_SVC_SERVICE_PORT") < at("URL"), "{names:?}");
    assert!(at("URL") < at("LITERAL"), "{names:?}");

    // A readiness gate's condition, set by the tenant's controller, reaches the host copy and
    // stays on the virtual pod.
    vpods
        .patch_status(
            "plain",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "example.com/load-balancer", "status": "True", "reason": "Programmed"}]}})),
        )
        .await
        .unwrap();
    eventually("the gate condition on the host copy", Duration::from_secs(30), || async {
        let h = host_pods.get(&host_name).await.map_err(|e| e.to_string())?;
        Ok((condition(&h, "example.com/load-balancer") == Some("True")).then_some(()))
    })
    .await;
    // Status keeps flowing back (a host-side change) without losing the tenant's condition.
    host_pods
        .patch_status(
            &host_name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [{"type": "example.com/host-side", "status": "True"}]}})),
        )
        .await
        .unwrap();
    let back = eventually("the host's condition back on the virtual pod", Duration::from_secs(30), || async {
        let p = vpods.get("plain").await.map_err(|e| e.to_string())?;
        Ok((condition(&p, "example.com/host-side") == Some("True")).then_some(p))
    })
    .await;
    assert_eq!(condition(&back, "example.com/load-balancer"), Some("True"), "the tenant's condition stays");

    // Labels and annotations the host's machinery adds (a host-side patch standing in for a
    // mutating webhook) stay on the host copies when the tenant changes its own.
    let added =
        json!({"metadata": {"labels": {"webhook.corp/added": "yes"}, "annotations": {"webhook.corp/note": "kept"}}});
    let svc_host_name = tr.host_name("default", "my-svc");
    let host_svcs: Api<Service> = Api::namespaced(host.clone(), vc.host_namespace());
    host_pods.patch(&host_name, &PatchParams::default(), &Patch::Merge(&added)).await.unwrap();
    host_svcs.patch(&svc_host_name, &PatchParams::default(), &Patch::Merge(&added)).await.unwrap();
    vc.kubectl_ok(&["label", "pod", "plain", "extra=1"]);
    vc.kubectl_ok(&["label", "service", "my-svc", "extra=1"]);
    let kept = |meta: &kube::api::ObjectMeta| {
        let (l, a) = (meta.labels.clone().unwrap_or_default(), meta.annotations.clone().unwrap_or_default());
        l.get("webhook.corp/added").map(String::as_str) == Some("yes")
            && a.get("webhook.corp/note").map(String::as_str) == Some("kept")
    };
    let tenant =
        |meta: &kube::api::ObjectMeta| meta.labels.as_ref().is_some_and(|l| l.contains_key("t.vkube.dev/extra"));
    eventually("the tenant's new label on the host pod, the host's kept", Duration::from_secs(30), || async {
        let h = host_pods.get(&host_name).await.map_err(|e| e.to_string())?;
        if tenant(&h.metadata) && !kept(&h.metadata) {
            return Err(format!("the host's keys were removed: {:?}", h.metadata.labels));
        }
        Ok(tenant(&h.metadata).then_some(()))
    })
    .await;
    eventually("the tenant's new label on the host Service, the host's kept", Duration::from_secs(30), || async {
        let h = host_svcs.get(&svc_host_name).await.map_err(|e| e.to_string())?;
        if tenant(&h.metadata) && !kept(&h.metadata) {
            return Err(format!("the host's keys were removed: {:?}", h.metadata.labels));
        }
        Ok(tenant(&h.metadata).then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(kept(&host_pods.get(&host_name).await.unwrap().metadata), "the host pod's added keys");
    assert!(kept(&host_svcs.get(&svc_host_name).await.unwrap().metadata), "the host Service's added keys");

    // The virtual node: the host node's conditions, and no stale not-ready taint.
    let node_name = running.spec.as_ref().and_then(|s| s.node_name.clone()).expect("bound");
    let nodes: Api<Node> = Api::all(vc.client().await);
    let node = eventually("the virtual node without a not-ready taint", Duration::from_secs(30), || async {
        let n = nodes.get(&node_name).await.map_err(|e| e.to_string())?;
        let taints = n.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        Ok(taints.is_empty().then_some(n))
    })
    .await;
    let ready =
        node.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    assert_eq!(ready.map(|c| c.status.as_str()), Some("True"));
    let out = vc.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.unschedulable}{.items[*].spec.taints}"]);
    assert_eq!(out.trim(), "", "schedulable, untainted virtual nodes");

    // A node label of the tenant's own: a pod selecting it waits until a node carries it, then runs
    // on that node (the host never sees the label: the pod is pinned there), as on a cluster of
    // its own.
    vc.kubectl_ok(&["run", "on-ssd", "--image=nginx", "--overrides={\"spec\":{\"nodeSelector\":{\"disk\":\"ssd\"}}}"]);
    let waiting = vc.warned("default", "on-ssd", "0 nodes are available").await;
    assert_eq!(waiting.reason.as_deref(), Some("FailedScheduling"));
    assert!(
        host_pods.get_opt(&tr.host_name("default", "on-ssd")).await.unwrap().is_none(),
        "pending: nothing on the host"
    );
    vc.kubectl_ok(&["label", "node", &node_name, "disk=ssd"]);
    // Brought back by the node's change (the fallback look is minutes away).
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/on-ssd", "--timeout=60s"]);
    let on_ssd = host_pods.get(&tr.host_name("default", "on-ssd")).await.unwrap();
    let spec = serde_json::to_value(on_ssd.spec.unwrap()).unwrap();
    assert_eq!(spec["nodeName"], node_name.as_str());
    assert_eq!(spec["nodeSelector"].get("disk"), None, "{spec}");
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        serde_json::json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}])
    );
    // Node affinity on the tenant's label, likewise.
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: affine-ssd}
spec:
  containers: [{name: app, image: nginx}]
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms: [{matchExpressions: [{key: disk, operator: In, values: [ssd, nvme]}]}]
"#,
    );
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/affine-ssd", "--timeout=60s"]);
    let affine = host_pods.get(&tr.host_name("default", "affine-ssd")).await.unwrap();
    let spec = serde_json::to_value(affine.spec.unwrap()).unwrap();
    assert_eq!(spec["nodeName"], node_name.as_str());
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        serde_json::json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}]),
        "the tenant's key never reaches the host"
    );

    // A ConfigMap whose host name a host object not ours holds: the pod reading it never starts.
    let foreign = tr.host_name("default", "settings");
    env.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {foreign}, namespace: {}}}\ndata: {{owner: host-admin}}\n",
        vc.host_namespace()
    ));
    vc.kubectl_ok(&["create", "configmap", "settings", "--from-literal=owner=tenant"]);
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  containers: [{name: app, image: nginx, envFrom: [{configMapRef: {name: settings}}]}]
"#,
    );
    let warned = vc.warned("default", "reader", "not started").await;
    assert_eq!(warned.reason.as_deref(), Some("HostNameConflict"));
    let warned = warned.message.unwrap_or_default();
    assert!(warned.contains("settings") && warned.contains("not started"), "{warned}");
    assert!(
        host_pods.get_opt(&tr.host_name("default", "reader")).await.unwrap().is_none(),
        "the pod started on the host"
    );
    assert_eq!(phase(&vpods.get("reader").await.unwrap()), Some("Pending"));
    let kept = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(host.clone(), vc.host_namespace())
        .get(&foreign)
        .await
        .unwrap();
    assert_eq!(kept.data.unwrap()["owner"], "host-admin", "the foreign object is left alone");

    // A pod the host refuses (over its LimitRange's max): the tenant is told the host's reason,
    // and the refusal is counted.
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: big}
spec:
  containers: [{name: app, image: nginx, resources: {limits: {memory: 2Gi}}}]
"#,
    );
    let refused = vc.warned("default", "big", "maximum memory usage").await;
    assert_eq!(refused.reason.as_deref(), Some("HostRefused"));
    let refused = refused.message.unwrap_or_default();
    assert!(refused.contains("maximum memory usage per Container is 1Gi"), "the host's reason: {refused}");
    assert!(!refused.contains(vc.host_namespace()), "no host names: {refused}");
    let metrics = vc.client().await.request_text(http::Request::get("/metrics").body(vec![]).unwrap()).await.unwrap();
    assert!(metrics.contains(r#"host_refused_total{kind="Pod",reason="forbidden"}"#), "{metrics}");
    assert!(host_pods.get_opt(&tr.host_name("default", "big")).await.unwrap().is_none());

    // A pod no host node has room for: the host scheduler's reason, without how many host nodes
    // there are (its condition and its mirrored event alike).
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: widgets}
spec:
  containers: [{name: app, image: nginx, resources: {requests: {example.com/widgets: "1"}, limits: {example.com/widgets: "1"}}}]
"#,
    );
    let told = "0 nodes are available: Insufficient example.com/widgets.";
    let waiting = eventually("the host scheduler's reason on the virtual pod", Duration::from_secs(30), || async {
        let p = vpods.get("widgets").await.map_err(|e| e.to_string())?;
        let scheduled =
            p.status.and_then(|s| s.conditions).unwrap_or_default().into_iter().find(|c| c.type_ == "PodScheduled");
        Ok(scheduled.filter(|c| c.status == "False"))
    })
    .await;
    assert_eq!(waiting.message.as_deref(), Some(told));
    let event = vc.warned("default", "widgets", "Insufficient example.com/widgets").await;
    assert_eq!((event.reason.as_deref(), event.message.as_deref()), (Some("FailedScheduling"), Some(told)));

    // Node ports (allowed here): the same on both sides, as asked for when asked for, and a port
    // the host has given away refused with the host's reason.
    let host_services: Api<Service> = Api::namespaced(host.clone(), vc.host_namespace());
    let vservices: Api<Service> = Api::namespaced(vc.client().await, "default");
    vc.kubectl_ok(&["create", "service", "nodeport", "np", "--tcp=80:8080"]);
    vc.kubectl_ok(&["create", "service", "nodeport", "np-chosen", "--tcp=80", "--node-port=30555"]);
    vc.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
"#,
    );
    // A load balancer class the admin did not list (a public one, say) is refused by field.
    let public = vc.try_apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: lb-public}\nspec:\n  type: LoadBalancer\n  \
         loadBalancerClass: example.com/public\n  selector: {app: web}\n  ports: [{port: 80}]\n",
    );
    let told = String::from_utf8_lossy(&public.stderr);
    assert!(!public.status.success() && told.contains("spec.loadBalancerClass: \"example.com/public\""), "{told}");
    assert!(host_services.get_opt(&tr.host_name("default", "lb-public")).await.unwrap().is_none());
    for name in ["np", "np-chosen", "lb"] {
        let v = vservices.get(name).await.unwrap();
        let h = host_services.get(&tr.host_name("default", name)).await.unwrap();
        let (vports, vcheck) = node_ports(&v);
        assert!(vports.iter().all(|(_, np)| (30000..=32767).contains(np)), "{name}: {vports:?}");
        assert_eq!((vports.clone(), vcheck), node_ports(&h), "{name}: virtual and host node ports");
        if name == "np-chosen" {
            assert_eq!(vports, vec![(80, 30555)], "the node port asked for");
        }
        if name == "lb" {
            assert_ne!(vcheck, 0, "a health-check node port for externalTrafficPolicy Local");
        }
    }
    // A load balancer's address, given by the host's controller, shows on the virtual Service.
    let lb_host = tr.host_name("default", "lb");
    host_services
        .patch_status(
            &lb_host,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}})),
        )
        .await
        .unwrap();
    eventually("the load balancer's address on the virtual Service", Duration::from_secs(30), || async {
        let out = vc.kubectl_ok(&["get", "svc", "lb", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"]);
        Ok((out.trim() == "203.0.113.7").then_some(()))
    })
    .await;
    env.kubectl_ok(&["create", "namespace", "host-apps"]);
    env.kubectl_ok(&["create", "service", "nodeport", "taken", "-n", "host-apps", "--tcp=80", "--node-port=30556"]);
    let out = vc.kubectl(&["create", "service", "nodeport", "np-taken", "--tcp=80", "--node-port=30556"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("30556") && stderr.contains("allocated"), "{stderr}");
    assert!(vc.kubectl(&["get", "svc", "np-taken"]).status.code() != Some(0), "the refused Service exists");

    // A DaemonSet gets a pod on every node it sees, each on that host node.
    vc.apply(
        r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {containers: [{name: agent, image: nginx}]}
"#,
    );
    let placed = eventually("a DaemonSet pod on each host node", Duration::from_secs(60), || async {
        let list = host_pods
            .list(&ListParams::default().labels("t.vkube.dev/app=agent"))
            .await
            .map_err(|e| e.to_string())?
            .items;
        let mut nodes: Vec<String> = list.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
        nodes.sort();
        let mut want = host_nodes.clone();
        want.sort();
        Ok((nodes == want).then_some(nodes))
    })
    .await;
    assert_eq!(placed.len(), host_nodes.len());

    // A NoExecute taint of the tenant's own on a virtual node evicts the pods that do not
    // tolerate it, as on a cluster of its own (the virtual controller manager's taint eviction),
    // and the DaemonSet keeps off that node; the taint survives the syncer's refresh of the node.
    let agents_on = || async {
        let list = host_pods.list(&ListParams::default().labels("t.vkube.dev/app=agent")).await;
        let mut nodes: Vec<String> =
            list.map_err(|e| e.to_string())?.items.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
        nodes.sort();
        Ok::<_, String>(nodes)
    };
    let (drained, others) = (placed[0].clone(), placed[1..].to_vec());
    for (pod, tolerations) in
        [("plain-on-drained", "[]"), ("tolerant", r#"[{"key": "e2e.vkube.dev/drain", "operator": "Exists"}]"#)]
    {
        let spec = format!(
            r#"{{"spec": {{"nodeSelector": {{"kubernetes.io/hostname": "{drained}"}}, "tolerations": {tolerations}}}}}"#
        );
        vc.kubectl_ok(&["run", pod, "--image=nginx", &format!("--overrides={spec}")]);
        vc.kubectl_ok(&["wait", "--for=condition=Ready", &format!("pod/{pod}"), "--timeout=60s"]);
    }
    vc.kubectl_ok(&["taint", "node", &drained, "e2e.vkube.dev/drain=now:NoExecute"]);
    eventually("the DaemonSet's pod evicted from the tainted node", Duration::from_secs(60), || async {
        let nodes = agents_on().await?;
        Ok((nodes == others).then_some(()))
    })
    .await;
    eventually("the pod without a toleration evicted, from the host too", Duration::from_secs(60), || async {
        let gone = vpods.get_opt("plain-on-drained").await.map_err(|e| e.to_string())?.is_none();
        let host_gone =
            host_pods.get_opt(&tr.host_name("default", "plain-on-drained")).await.map_err(|e| e.to_string())?.is_none();
        Ok((gone && host_gone).then_some(()))
    })
    .await;
    for (what, pod) in [
        ("virtual", vpods.get_opt("tolerant").await.unwrap()),
        ("host", host_pods.get_opt(&tr.host_name("default", "tolerant")).await.unwrap()),
    ] {
        let pod = pod.unwrap_or_else(|| panic!("the tolerating pod's {what} copy is gone"));
        assert!(pod.metadata.deletion_timestamp.is_none(), "the tolerating pod's {what} copy is being deleted");
    }
    // New pods keep off the tainted node, and off a cordoned one; with every node closed a pod
    // waits (nothing on the host) until one opens.
    vc.kubectl_ok(&["run", "elsewhere", "--image=nginx"]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/elsewhere", "--timeout=60s"]);
    let elsewhere = host_pods.get(&tr.host_name("default", "elsewhere")).await.unwrap();
    let spec = serde_json::to_value(elsewhere.spec.unwrap()).unwrap();
    assert_ne!(spec["nodeName"], drained.as_str());
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": [drained]}]}])
    );
    // A toleration of the tenant's own taint is honoured here and has no host taint to be for:
    // the host pod goes without it and the tenant is not told it was dropped (it was, with a
    // Warning, for the pod made before the taint existed, when it was for no taint at all).
    vc.kubectl_ok(&[
        "run",
        "tolerant-later",
        "--image=nginx",
        r#"--overrides={"spec": {"tolerations": [{"key": "e2e.vkube.dev/drain", "operator": "Exists"}]}}"#,
    ]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/tolerant-later", "--timeout=60s"]);
    let dropped_warning = |pod: &str| {
        let selector = format!("--field-selector=involvedObject.name={pod},reason=SchedulingDropped");
        !vc.kubectl_ok(&["get", "events", &selector, "-o", "name"]).trim().is_empty()
    };
    assert!(dropped_warning("tolerant"), "the toleration made before the taint: dropped, with a word");
    assert!(!dropped_warning("tolerant-later"), "a toleration of the tenant's taint: no warning");
    for other in &others {
        vc.kubectl_ok(&["cordon", other]);
    }
    // (The syncer's copy of the nodes is a watch away: under a second, given five on a loaded
    // machine.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    vc.kubectl_ok(&["run", "nowhere", "--image=nginx"]);
    let waiting = vc.warned("default", "nowhere", "every node of this cluster is cordoned").await;
    assert_eq!(waiting.reason.as_deref(), Some("FailedScheduling"));
    assert!(
        host_pods.get_opt(&tr.host_name("default", "nowhere")).await.unwrap().is_none(),
        "pending: nothing on the host"
    );
    vc.kubectl_ok(&["uncordon", &others[0]]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/nowhere", "--timeout=60s"]);
    let nowhere = host_pods.get(&tr.host_name("default", "nowhere")).await.unwrap();
    assert_eq!(nowhere.spec.and_then(|s| s.node_name).as_ref(), Some(&others[0]));
    // The refresh after a restart rewrites the node's record of the host's taints: made stale
    // here, so that its rewrite shows the refresh has run.
    vc.kubectl_ok(&["annotate", "--overwrite", "node", &drained, "vkube.dev/host-taints=stale:NoSchedule"]);
    vc.kill_controller();
    vc.start_controller().await;
    let refreshed = eventually("the node refreshed after the restart", Duration::from_secs(60), || async {
        let n = vnodes.get(&drained).await.map_err(|e| e.to_string())?;
        let record = n.annotations().get("vkube.dev/host-taints").cloned();
        Ok((record.as_deref() != Some("stale:NoSchedule")).then_some(n))
    })
    .await;
    let taints: Vec<String> =
        refreshed.spec.and_then(|s| s.taints).unwrap_or_default().into_iter().map(|t| t.key).collect();
    assert_eq!(taints, ["e2e.vkube.dev/drain"], "the tenant's taint stays through the refresh");
    assert_eq!(agents_on().await.unwrap(), others, "no DaemonSet pod back on the tainted node");
    // A pod the host cannot place yet (the host admin cordoned the other node) while kept off the
    // tainted one: once the tenant lifts its taint, the copy, which never ran, is made again and
    // placed there, as a scheduler would look again.
    for other in &others {
        env.kubectl_ok(&["cordon", other]);
    }
    vc.kubectl_ok(&["run", "stuck", "--image=nginx"]);
    let stuck = tr.host_name("default", "stuck");
    eventually("the copy waiting on the host, kept off the tainted node", Duration::from_secs(30), || async {
        let h = host_pods.get_opt(&stuck).await.map_err(|e| e.to_string())?;
        let spec = h.and_then(|h| h.spec).map(|s| serde_json::to_value(s).unwrap()).unwrap_or_default();
        let kept_off = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchFields"][0];
        Ok((kept_off["operator"] == "NotIn" && spec["nodeName"].is_null()).then_some(()))
    })
    .await;
    vc.kubectl_ok(&["taint", "node", &drained, "e2e.vkube.dev/drain=now:NoExecute-"]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/stuck", "--timeout=60s"]);
    let placed_now = host_pods.get(&stuck).await.unwrap().spec.and_then(|s| s.node_name);
    assert_eq!(placed_now.as_ref(), Some(&drained), "placed on the reopened node");
    for other in &others {
        env.kubectl_ok(&["uncordon", other]);
    }
    eventually("the DaemonSet's pod back once the taint is gone", Duration::from_secs(60), || async {
        Ok((agents_on().await? == placed).then_some(()))
    })
    .await;
    // A DaemonSet's pod the host cannot place yet (the host admin cordoned its node), made while
    // the tenant had closed another node to it (a taint it does not tolerate; it tolerates a
    // cordon): reopening that one cannot change where it may go, so its copy stays as it is (it
    // used to be made again at every change of the closed nodes).
    let own = others[0].clone();
    env.kubectl_ok(&["cordon", &own]);
    vc.kubectl_ok(&["taint", "node", &drained, "e2e.vkube.dev/keep=out:NoSchedule"]);
    // The syncer has the taint once a new pod's copy is kept off that node.
    vc.kubectl_ok(&["run", "probe", "--image=nginx"]);
    eventually("a new copy kept off the tainted node", Duration::from_secs(30), || async {
        let h = host_pods.get_opt(&tr.host_name("default", "probe")).await.map_err(|e| e.to_string())?;
        let kept_off = h.and_then(|h| h.annotations().get("vkube.dev/kept-off").cloned()).unwrap_or_default();
        Ok(kept_off.split(',').any(|n| n == drained).then_some(()))
    })
    .await;
    vc.kubectl_ok(&["delete", "pod", "probe", "--wait=false"]);
    let agent = vpods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(own.as_str()));
    vc.kubectl_ok(&["delete", "pod", &agent.expect("the agent on its node").name_any()]);
    let waiting = eventually("the agent's new copy waiting on the host", Duration::from_secs(30), || async {
        let list = host_pods.list(&ListParams::default().labels("t.vkube.dev/app=agent")).await;
        let waiting = list.map_err(|e| e.to_string())?.items.into_iter().find(|p| {
            p.spec.as_ref().is_some_and(|s| s.node_name.is_none()) && p.metadata.deletion_timestamp.is_none()
        });
        Ok(waiting)
    })
    .await;
    let required = serde_json::to_value(waiting.spec.as_ref().unwrap()).unwrap()["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .clone();
    assert_eq!(required, json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [own]}]}]));
    assert_eq!(waiting.annotations().get("vkube.dev/kept-off").map(String::as_str), Some(""), "recorded, empty");
    vc.kubectl_ok(&["taint", "node", &drained, "e2e.vkube.dev/keep=out:NoSchedule-"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = host_pods.get_opt(&waiting.name_any()).await.unwrap().expect("the waiting copy stays");
    assert_eq!(after.metadata.uid, waiting.metadata.uid, "not made again for another node's cordon");
    assert!(after.metadata.deletion_timestamp.is_none(), "not being deleted");
    env.kubectl_ok(&["uncordon", &own]);
    eventually("the agent placed once its node opens", Duration::from_secs(60), || async {
        Ok((agents_on().await? == placed).then_some(()))
    })
    .await;

    // The admin lets bound pods stay bound (bind_node_name): a pod the tenant binds by nodeName
    // goes to that node directly, its kubelet to admit it or not; to a node the host admin has
    // cordoned, the host scheduler's way (node affinity), where it waits.
    let target = &placed[0];
    let bind = |pod: &str| {
        let spec = format!(r#"--overrides={{"spec": {{"nodeName": "{target}"}}}}"#);
        vc.kubectl_ok(&["run", pod, "--image=nginx", &spec]);
    };
    bind("bound");
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/bound", "--timeout=60s"]);
    let spec = serde_json::to_value(host_pods.get(&tr.host_name("default", "bound")).await.unwrap().spec).unwrap();
    assert_eq!((&spec["nodeName"], &spec["affinity"]), (&json!(target), &json!(null)), "bound directly");
    env.kubectl_ok(&["cordon", target]);
    // (A host node read for pods bound to it is kept 2 s.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    bind("bound-to-cordoned");
    let waiting =
        eventually("the copy for a cordoned node, left to the host scheduler", Duration::from_secs(30), || async {
            let h =
                host_pods.get_opt(&tr.host_name("default", "bound-to-cordoned")).await.map_err(|e| e.to_string())?;
            Ok(h.and_then(|h| h.spec).map(|s| serde_json::to_value(s).unwrap()))
        })
        .await;
    assert_eq!(waiting["nodeName"], json!(null), "not placed on the cordoned node");
    assert_eq!(
        waiting["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [target]}]}])
    );
    env.kubectl_ok(&["uncordon", target]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/bound-to-cordoned", "--timeout=60s"]);
}

/// With the admin's virtual scheduler the tenant's own kube-scheduler places its pods on the
/// virtual nodes (every host node the admin allows), with the tenant's priorities, preemption and
/// the extended resources it gave its nodes; a pod reaches the host only once bound, and keeps
/// its node there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_scheduler_places_and_preempts_the_tenants_pods() {
    let env = TestEnv::start(3).await;
    // A sandbox pool of one host node (its label, its taint) and the RuntimeClass whose handler
    // only that node runs.
    let sandbox = vkube_e2e::sorted_names(&Api::<Node>::all(env.client().await)).await.unwrap()[2].clone();
    env.kubectl_ok(&["label", "node", &sandbox, "sandbox.example.com/runsc=true"]);
    env.kubectl_ok(&["taint", "node", &sandbox, "sandbox.example.com/runsc=true:NoSchedule"]);
    env.apply(
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: sandboxed}\nhandler: runsc\nscheduling:\n  \
         nodeSelector: {sandbox.example.com/runsc: \"true\"}\n  \
         tolerations: [{key: sandbox.example.com/runsc, operator: Exists, effect: NoSchedule}]\n",
    );
    let policy = vkube::controlplane::PolicyArgs {
        virtual_scheduler: true,
        storage_classes: vec!["local".into(), "later".into()],
        runtime_classes: vec!["sandboxed".into()],
        // Classes the host lacks, each read at every pass of the host's classes before the
        // RuntimeClasses: the first pass takes a while (used below, after a restart).
        priority_classes: (0..300).map(|i| format!("absent-{i}")).collect(),
        ..Default::default()
    };
    // A class whose volumes are made for their first consumer (used below).
    env.apply("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: later}\nprovisioner: example.com/disks\nvolumeBindingMode: WaitForFirstConsumer\n");
    let mut vc = env.virtual_cluster_with_policy("vsched", policy, &[]).await;
    let tr = vc.translator();
    let host_pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let vnodes: Api<Node> = Api::all(vc.client().await);
    let (node, other) = eventually("the host nodes shown before any pod", Duration::from_secs(30), || async {
        let names = vkube_e2e::sorted_names(&vnodes).await?;
        Ok((names.len() == 3).then(|| (names[0].clone(), names[1].clone())))
    })
    .await;

    // A claim the host binds to a volume of one node: bound in the virtual cluster to its view,
    // which carries the volume's node affinity, so the virtual scheduler places its pod there
    // (a claim not bound in the virtual cluster kept its pod unscheduled for ever).
    env.apply(&format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: local}}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: Immediate\n---\n\
         apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: local-1}}\nspec:\n  storageClassName: local\n  capacity: {{storage: 1Gi}}\n  \
         accessModes: [ReadWriteOnce]\n  local: {{path: /mnt/disk}}\n  nodeAffinity: {{required: {{nodeSelectorTerms: [{{matchExpressions: \
         [{{key: kubernetes.io/hostname, operator: In, values: [{other}]}}]}}]}}}}\n"
    ));
    vc.apply(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: disk}\nspec:\n  storageClassName: local\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: uses-disk}\nspec:\n  containers: [{name: c, image: nginx}]\n  volumes: [{name: d, persistentVolumeClaim: {claimName: disk}}]\n",
    );
    let vpods: Api<Pod> = Api::namespaced(vc.client().await, "default");
    let placed = eventually("the claim's pod placed and running", Duration::from_secs(60), || async {
        let p = vpods.get("uses-disk").await.map_err(|e| e.to_string())?;
        Ok((phase(&p) == Some("Running")).then(|| p.spec.and_then(|s| s.node_name)))
    })
    .await;
    assert_eq!(placed.as_deref(), Some(other.as_str()), "on the volume's node");
    vc.kubectl_ok(&["delete", "pod", "uses-disk", "--wait=false"]);

    // A class whose volumes are made for their first consumer: the virtual scheduler chooses the
    // node, the host claim is told it, the host's provisioner (the test, here) makes the volume
    // there, and the pod is placed once its claim is bound in the virtual cluster.
    let provisioner = tokio::spawn(provision_on_selected_nodes(env.client().await, vc.host_namespace().to_string()));
    eventually("the class shown", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["get", "storageclass", "later", "-o", "jsonpath={.volumeBindingMode}"]);
        Ok((String::from_utf8_lossy(&out.stdout) == "WaitForFirstConsumer").then_some(()))
    })
    .await;
    vc.apply(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: later}\nspec:\n  storageClassName: later\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: uses-later}\nspec:\n  containers: [{name: c, image: nginx}]\n  volumes: [{name: d, persistentVolumeClaim: {claimName: later}}]\n",
    );
    let placed = eventually("the first consumer placed and running", Duration::from_secs(60), || async {
        let p = vpods.get("uses-later").await.map_err(|e| e.to_string())?;
        Ok((phase(&p) == Some("Running")).then(|| p.spec.and_then(|s| s.node_name)))
    })
    .await;
    let selected = vc.kubectl_ok(&[
        "get",
        "pvc",
        "later",
        "-o",
        "jsonpath={.metadata.annotations.volume\\.kubernetes\\.io/selected-node} {.spec.volumeName}",
    ]);
    assert_eq!(selected, format!("{} later-{}", placed.unwrap_or_default(), tr.host_name("default", "later")));
    // A generic ephemeral volume: the claim the virtual cluster makes for it is the one synced,
    // bound, and used by the host pod.
    vc.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: scratch}\nspec:\n  containers: [{name: c, image: nginx}]\n  volumes:\n  \
         - name: tmp\n    ephemeral: {volumeClaimTemplate: {spec: {storageClassName: later, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}}}\n",
    );
    eventually("the pod with an ephemeral volume running", Duration::from_secs(60), || async {
        let p = vpods.get("scratch").await.map_err(|e| e.to_string())?;
        Ok((phase(&p) == Some("Running")).then_some(()))
    })
    .await;
    let bound = vc.kubectl_ok(&["get", "pvc", "scratch-tmp", "-o", "jsonpath={.status.phase} {.spec.volumeName}"]);
    assert_eq!(bound, format!("Bound later-{}", tr.host_name("default", "scratch-tmp")));
    let host_scratch = host_pods.get(&tr.host_name("default", "scratch")).await.unwrap();
    let volume = serde_json::to_value(&host_scratch.spec.unwrap().volumes.unwrap()[0]).unwrap();
    assert_eq!(volume["persistentVolumeClaim"]["claimName"], json!(tr.host_name("default", "scratch-tmp")), "{volume}");
    provisioner.abort();
    vc.kubectl_ok(&["delete", "pod", "uses-later", "scratch", "--wait=false"]);
    // A device the host node offers (as a device plugin would show it) reaches the virtual node
    // within a listing of the host nodes.
    let device = r#"{"status": {"capacity": {"example.com/dev": "2"}, "allocatable": {"example.com/dev": "2"}}}"#;
    env.kubectl_ok(&["patch", "node", &node, "--subresource=status", "--type=merge", "-p", device]);
    let shown = |n: &Node, resource: &str| {
        let allocatable = n.status.as_ref().and_then(|s| s.allocatable.clone()).unwrap_or_default();
        allocatable.get(resource).map(|q| q.0.clone())
    };
    eventually("the host's device shown", Duration::from_secs(150), || async {
        let n = vnodes.get(&node).await.map_err(|e| e.to_string())?;
        Ok(shown(&n, "example.com/dev").map(drop))
    })
    .await;
    // One slot of a resource only the tenant knows, on one node, as the preemption conformance
    // specs give their nodes.
    let slots = json!({"status": {"capacity": {"example.com/slots": "1"}, "allocatable": {"example.com/slots": "1"}}});
    vnodes.patch_status(&node, &PatchParams::default(), &Patch::Merge(&slots)).await.unwrap();
    vc.apply("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: low}\nvalue: 1\n---\napiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: high}\nvalue: 1000\n");
    let pod = |name: &str, class: &str, slots: u32| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  priorityClassName: {class}\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: c, image: nginx, resources: {{requests: {{example.com/slots: \"{slots}\"}}, limits: {{example.com/slots: \"{slots}\"}}}}}}]\n"
        )
    };
    let running_on = |name: &'static str| {
        let (vpods, host_pods, tr) = (&vpods, &host_pods, &tr);
        async move {
            eventually(&format!("{name} running"), Duration::from_secs(60), || async {
                let p = vpods.get(name).await.map_err(|e| e.to_string())?;
                let h = host_pods.get_opt(&tr.host_name("default", name)).await.map_err(|e| e.to_string())?;
                Ok((phase(&p) == Some("Running")).then(|| (p, h.expect("its host copy"))))
            })
            .await
        }
    };

    vc.apply(&pod("low", "low", 1));
    let (low, host_low) = running_on("low").await;
    let bound = low.spec.as_ref().and_then(|s| s.node_name.clone());
    assert_eq!(bound.as_deref(), Some(node.as_str()), "the only node with a slot");
    let spec = serde_json::to_value(host_low.spec).unwrap();
    assert_eq!((&spec["nodeName"], &spec["affinity"]), (&json!(node), &json!(null)), "bound on the host too");
    assert_eq!(spec["containers"][0]["resources"], json!({}), "the tenant's own resource not asked of the host");

    // No slot left: a pod as low waits, unscheduled, with nothing on the host.
    vc.apply(&pod("waits", "low", 1));
    eventually("a pod without a slot unschedulable", Duration::from_secs(30), || async {
        let p = vpods.get("waits").await.map_err(|e| e.to_string())?;
        Ok((condition(&p, "PodScheduled") == Some("False")).then_some(()))
    })
    .await;
    assert!(host_pods.get_opt(&tr.host_name("default", "waits")).await.unwrap().is_none(), "not on the host");

    // A higher priority takes the slot: the low pod is preempted, in the virtual cluster and on
    // the host.
    vc.apply(&pod("high", "high", 1));
    let (high, _) = running_on("high").await;
    assert_eq!(high.spec.and_then(|s| s.node_name).as_deref(), Some(node.as_str()));
    eventually("the preempted pod gone, here and on the host", Duration::from_secs(30), || async {
        let here = vpods.get_opt("low").await.map_err(|e| e.to_string())?;
        let there = host_pods.get_opt(&tr.host_name("default", "low")).await.map_err(|e| e.to_string())?;
        Ok((here.is_none() && there.is_none()).then_some(()))
    })
    .await;
    let waits = vpods.get("waits").await.unwrap();
    assert_eq!(waits.spec.and_then(|s| s.node_name), None, "still waiting");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(vc.client().await, "default");
    let refused = events.list(&ListParams::default().fields("reason=ResizeRefused")).await.unwrap().items;
    assert!(refused.is_empty(), "the trimmed resources are no resize: {refused:?}");

    let taint_keys = |n: &Node| -> Vec<String> {
        n.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default().into_iter().map(|t| t.key).collect()
    };

    // Bound to a node the host admin has cordoned since: the pod waits, told why, with nothing on
    // the host, and runs there once the node is open again.
    env.kubectl_ok(&["cordon", &node]);
    // (A host node read for pods bound to it is kept 2 s.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bound = format!(r#"--overrides={{"spec": {{"nodeName": "{node}"}}}}"#);
    vc.kubectl_ok(&["run", "late", "--image=nginx", &bound]);
    vc.warned("default", "late", "does not take pods now").await;
    assert!(host_pods.get_opt(&tr.host_name("default", "late")).await.unwrap().is_none(), "not on the host");
    env.kubectl_ok(&["uncordon", &node]);
    let (_, host_late) = running_on("late").await;
    assert_eq!(host_late.spec.and_then(|s| s.node_name).as_deref(), Some(node.as_str()));

    // A pod of the sandbox's RuntimeClass: the virtual scheduler places it on the sandbox node
    // (the class's view selects on the syncer's mark of the nodes that meet its selector, and
    // tolerates the node's taint), and the host copy is bound there, the class's toleration
    // added by the host's admission, with nothing said to be dropped.
    let key = "sandbox.example.com/runsc";
    let mark = "runtimeclass.vkube.dev/sandboxed";
    eventually("the class's view selects on the mark", Duration::from_secs(90), || async {
        let out = vc.kubectl(&["get", "runtimeclass", "sandboxed", "-o", "jsonpath={.scheduling.nodeSelector}"]);
        let view = String::from_utf8_lossy(&out.stdout).to_string();
        if view == format!(r#"{{"{mark}":"true"}}"#) { Ok(Some(())) } else { Err(view) }
    })
    .await;
    eventually("the sandbox node marked, its taint shown", Duration::from_secs(90), || async {
        let n = vnodes.get(&sandbox).await.map_err(|e| e.to_string())?;
        let labels = n.metadata.labels.clone().unwrap_or_default();
        if labels.contains_key(key) {
            return Err(format!("the host's own label shown: {labels:?}"));
        }
        let marked = labels.get(mark).is_some_and(|v| v == "true");
        Ok((marked && taint_keys(&n).iter().any(|k| k == key)).then_some(()))
    })
    .await;
    let others = [&node, &other].map(|n| vc.kubectl_ok(&["get", "node", n, "-o", "jsonpath={.metadata.labels}"]));
    assert!(others.iter().all(|labels| !labels.contains(mark)), "{others:?}");
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: sandboxed, namespace: default}\nspec:\n  runtimeClassName: sandboxed\n  containers: [{name: c, image: nginx}]\n");
    let (sandboxed, host_sandboxed) = running_on("sandboxed").await;
    assert_eq!(sandboxed.spec.and_then(|s| s.node_name).as_deref(), Some(sandbox.as_str()));
    let spec = host_sandboxed.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(sandbox.as_str()));
    let tolerated: Vec<String> = spec.tolerations.unwrap_or_default().into_iter().filter_map(|t| t.key).collect();
    assert!(tolerated.iter().any(|k| k == key), "{tolerated:?}");
    let dropped = ListParams::default().fields("involvedObject.name=sandboxed,reason=SchedulingDropped");
    assert_eq!(events.list(&dropped).await.unwrap().items, vec![], "nothing dropped");
    // Restarted, the syncer reads the host's classes before it translates a pod: one of the class
    // placed while it was down is copied as the first was, with nothing said dropped or refused
    // (translated before the pass, the class's tolerations were unknown, and the node not its
    // to take).
    vc.kill_controller();
    let class = r#"--overrides={"spec": {"runtimeClassName": "sandboxed"}}"#;
    vc.kubectl_direct_ok(&["run", "sandboxed-later", "--image=nginx", class]);
    vc.start_controller().await;
    let (later, host_later) = running_on("sandboxed-later").await;
    assert_eq!(later.spec.and_then(|s| s.node_name).as_deref(), Some(sandbox.as_str()));
    let tolerated: Vec<String> =
        host_later.spec.unwrap().tolerations.unwrap_or_default().into_iter().filter_map(|t| t.key).collect();
    assert!(tolerated.iter().any(|k| k == key), "{tolerated:?}");
    let warned = ListParams::default().fields("involvedObject.name=sandboxed-later,type=Warning");
    assert_eq!(events.list(&warned).await.unwrap().items, vec![], "nothing dropped or refused after the restart");
    // The tenant's own mark on another node does not make it run the class: a pod of the class
    // bound there waits, with nothing on the host.
    vc.kubectl_ok(&["label", "node", &node, &format!("{mark}=true")]);
    let forged = format!(r#"--overrides={{"spec": {{"runtimeClassName": "sandboxed", "nodeName": "{node}"}}}}"#);
    vc.kubectl_ok(&["run", "forged", "--image=nginx", &forged]);
    vc.warned("default", "forged", "not running the pod's RuntimeClass").await;
    assert!(host_pods.get_opt(&tr.host_name("default", "forged")).await.unwrap().is_none(), "not on the host");
    vc.kubectl_ok(&["delete", "pod", "forged", "--wait=false"]);
    vc.kubectl_ok(&["label", "node", &node, &format!("{mark}-")]);

    // The host admin cordons one node (and its device goes) and removes the other, where a pod of
    // the tenant is bound: within a listing both virtual nodes are closed to the virtual
    // scheduler (the host's cordon taint; the taint of a node out of touch, not Ready), and a new
    // pod waits, with nothing on the host. The device is gone from the virtual node, the
    // tenant's own resource stays.
    let other = vkube_e2e::sorted_names(&vnodes).await.unwrap().into_iter().find(|n| *n != node).unwrap();
    // (Held by a finalizer of its own: the host's pod GC removes the copy of a pod on a node that
    // is gone, the virtual pod goes with it, and then its virtual node.)
    let pinned = format!(
        r#"--overrides={{"metadata": {{"finalizers": ["example.com/hold"]}}, "spec": {{"nodeName": "{other}"}}}}"#
    );
    vc.kubectl_ok(&["run", "pinned", "--image=nginx", &pinned]);
    running_on("pinned").await;
    env.kubectl_ok(&["cordon", &node]);
    let no_device = r#"[{"op": "remove", "path": "/status/capacity/example.com~1dev"}, {"op": "remove", "path": "/status/allocatable/example.com~1dev"}]"#;
    env.kubectl_ok(&["patch", "node", &node, "--subresource=status", "--type=json", "-p", no_device]);
    env.kubectl_ok(&["delete", "node", &other, "--wait=false"]);
    eventually(
        "both virtual nodes closed (the sandbox's is, to pods of no class)",
        Duration::from_secs(150),
        || async {
            let cordoned = vnodes.get(&node).await.map_err(|e| e.to_string())?;
            let gone = vnodes.get(&other).await.map_err(|e| e.to_string())?;
            let ready = gone.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
            let ready = ready.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone());
            let device = shown(&cordoned, "example.com/dev");
            let closed = taint_keys(&cordoned).contains(&"node.kubernetes.io/unschedulable".to_string())
                && taint_keys(&gone).contains(&"node.kubernetes.io/unreachable".to_string())
                && ready.as_deref() == Some("Unknown")
                && device.is_none();
            let seen = format!(
                "taints {:?} and {:?}, ready {ready:?}, device {device:?}",
                taint_keys(&cordoned),
                taint_keys(&gone)
            );
            if closed { Ok(Some(())) } else { Err(seen) }
        },
    )
    .await;
    let cordoned = vnodes.get(&node).await.unwrap();
    assert_eq!(shown(&cordoned, "example.com/slots").as_deref(), Some("1"), "the tenant's, kept");
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: after, namespace: default}\nspec:\n  containers: [{name: c, image: nginx}]\n");
    eventually("a new pod unschedulable", Duration::from_secs(30), || async {
        let p = vpods.get("after").await.map_err(|e| e.to_string())?;
        Ok((condition(&p, "PodScheduled") == Some("False")).then_some(()))
    })
    .await;
    assert!(host_pods.get_opt(&tr.host_name("default", "after")).await.unwrap().is_none(), "not on the host");
    vc.kubectl_ok(&[
        "patch",
        "pod",
        "pinned",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/metadata/finalizers"}]"#,
    ]);
}

/// A host provisioner for class `later`, as an external one works: a claim told its node
/// (`volume.kubernetes.io/selected-node`) gets a volume on that node, bound to it.
async fn provision_on_selected_nodes(host: kube::Client, ns: String) {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(host.clone(), &ns);
    let volumes: Api<PersistentVolume> = Api::all(host);
    loop {
        for c in claims.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let spec = c.spec.clone().unwrap_or_default();
            let node = c.annotations().get("volume.kubernetes.io/selected-node").cloned();
            let (Some(node), None, Some("later")) = (node, spec.volume_name, spec.storage_class_name.as_deref()) else {
                continue;
            };
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": {"name": format!("later-{}", c.name_any())},
                "spec": {
                    "storageClassName": "later", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                    "local": {"path": "/mnt/later"},
                    "claimRef": {"namespace": ns, "name": c.name_any(), "uid": c.uid()},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions":
                        [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
                },
            }))
            .unwrap();
            let _ = volumes.create(&Default::default(), &pv).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
