//! Reconcilers exercised in process against scripted API servers (kube-rs's own pattern: a
//! `tower-test` mock service under a real `kube::Client`): every request a reconcile makes is
//! checked, so a wrong write is caught without starting clusters. The end-to-end tests stay.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use tower_test::mock::{self, Handle};

use crate::compact::Compact;
use crate::context::{Context, Options, Queues, Stores};
use crate::informer::Change;
use crate::kind::{KindQueues, KindStores, SyncedKind};
use crate::naming::{LABEL_CLUSTER, Translator};
use crate::queue::{Action, queue};

type ApiServer = Handle<Request<Body>, Response<Body>>;

/// A context with scripted virtual and host API servers, and stores the test fills.
struct Harness {
    ctx: Context,
    virt: ApiServer,
    host: ApiServer,
    vconfigmaps: Writer<ConfigMap>,
    hconfigmaps: Writer<ConfigMap>,
    vservices: Writer<Service>,
    vpods: Writer<Compact<Pod>>,
    hpods: Writer<Compact<Pod>>,
    vnodes: Writer<Node>,
}

fn harness() -> Harness {
    let (virt_svc, virt) = mock::pair::<Request<Body>, Response<Body>>();
    let (host_svc, host) = mock::pair::<Request<Body>, Response<Body>>();
    let virt_client = Client::new(virt_svc, "default");
    let host_client = Client::new(host_svc, "default");
    let (vconfigmaps, hconfigmaps) = (Writer::default(), Writer::default());
    let vservices = Writer::default();
    let (vpods, hpods) = (Writer::default(), Writer::default());
    let vnodes = Writer::default();
    let mut kinds = KindStores::default();
    kinds.insert::<Pod>(vpods.as_reader(), hpods.as_reader());
    kinds.insert::<ConfigMap>(vconfigmaps.as_reader(), hconfigmaps.as_reader());
    kinds.insert::<Service>(vservices.as_reader(), Writer::default().as_reader());
    let metrics = crate::Metrics::default();
    let mut queues = KindQueues::default();
    queues.insert::<ConfigMap>(queue(<ConfigMap as SyncedKind>::KIND, metrics.clone()).0, None);
    queues.insert::<Service>(queue(<Service as SyncedKind>::KIND, metrics.clone()).0, None);
    queues.insert::<Pod>(queue("Pod", metrics.clone()).0, Some(queue("PodStatus", metrics.clone()).0));
    let ctx = Context {
        tr: Translator::new("vc", "host-ns"),
        policy: crate::policy::Policy { service_ranges: vec!["10.96.0.0/16".parse().unwrap()], ..Default::default() },
        opts: Options {
            cluster_domain: "cluster.local".into(),
            sync_all_configmaps: true,
            sync_all_secrets: false,
            sync_all_claims: false,
            sync_network_policies: false,
            sync_pod_disruption_budgets: false,
            sync_all_nodes: false,
            concurrency: 1,
            api_ip: "10.96.0.1".into(),
            recreate_lost_pods: false,
            proxy_service: None,
            tokens: Default::default(),
            token_delivery: Default::default(),
        },
        virt: virt_client.clone(),
        host: host_client,
        stores: Stores {
            kinds,
            vnodes: vnodes.as_reader(),
            vnamespaces: Writer::default().as_reader(),
            hevents: Writer::default().as_reader(),
        },
        refs: Default::default(),
        carried: Default::default(),
        unschedulable: Default::default(),
        bound_tokens: Default::default(),
        bindings_unseen: Default::default(),
        copies_unseen: Default::default(),
        pod_nodes: Default::default(),
        nodes_used: Default::default(),
        pod_certificates: Default::default(),
        pod_ips: Default::default(),
        queues: Queues {
            kinds: queues,
            tokens: queue("ServiceAccountToken", metrics.clone()).0,
            nodes: queue("Node", metrics.clone()).0,
            events: queue("Event", metrics.clone()).0,
        },
        recorder: Recorder::new(virt_client, Reporter { controller: "vkube-syncer".into(), instance: None }),
        dns_ip: Default::default(),
        host_nodes: Default::default(),
        node_refreshed: Default::default(),
        node_failures: Default::default(),
        bound_node_reads: Default::default(),
        events_mark: Default::default(),
        absent_classes: Default::default(),
        runtime_class_scheduling: Default::default(),
        classes_shown: Default::default(),
        metrics,
        health: Default::default(),
        budget: crate::budget::WriteBudget::new(crate::budget::WRITES_PER_MINUTE),
        started: std::time::Instant::now(),
    };
    Harness { ctx, virt, host, vconfigmaps, hconfigmaps, vservices, vpods, hpods, vnodes }
}

fn configmap(ns: &str, name: &str, uid: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

/// The next request the reconcile makes, answered with `status` and `body`.
async fn expect(server: &mut ApiServer, status: u16, body: serde_json::Value) -> (Method, String, serde_json::Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is still there");
    let (method, uri) = (req.method().clone(), req.uri().to_string());
    let bytes = req.into_body().collect_bytes().await.expect("request body");
    let sent =
        if bytes.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
    let answer = Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap();
    send.send_response(answer);
    (method, uri, sent)
}

/// No further request arrives.
async fn silent(server: &mut ApiServer) {
    let next = tokio::time::timeout(Duration::from_millis(200), server.next_request()).await;
    assert!(next.is_err(), "an unexpected request: {:?}", next.ok().flatten().map(|(r, _)| r.uri().to_string()));
}

#[tokio::test]
async fn a_missing_host_copy_is_created_translated_and_marked() {
    let Harness { ctx, mut virt, mut host, mut vconfigmaps, .. } = harness();
    vconfigmaps.apply_watcher_event(&Event::Apply(configmap("default", "settings", "u1", &[("mode", "fast")])));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { ConfigMap::reconcile(&c, ("default".into(), "settings".into())).await });

    let (method, uri, sent) = expect(&mut host, 201, serde_json::json!({"metadata": {"name": "x"}})).await;
    assert_eq!(method, Method::POST);
    assert!(uri.starts_with("/api/v1/namespaces/host-ns/configmaps?"), "{uri}");
    let manager = uri.split(['?', '&']).find_map(|p| p.strip_prefix("fieldManager="));
    assert_eq!(manager, Some(crate::FIELD_MANAGER), "one field manager: {uri}");
    assert_eq!(sent["metadata"]["name"], "settings-x-default-x-vc");
    assert_eq!(sent["metadata"]["labels"][LABEL_CLUSTER], "vc");
    assert_eq!(sent["metadata"]["annotations"][vkube_core::contract::ANNOTATION_UID], "u1");
    assert_eq!(sent["data"], serde_json::json!({"mode": "fast"}));
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
}

#[tokio::test]
async fn a_copy_left_by_an_earlier_object_of_that_name_is_deleted_by_uid() {
    let Harness { ctx, mut virt, mut host, mut vconfigmaps, mut hconfigmaps, .. } = harness();
    let v = configmap("default", "settings", "new-uid", &[]);
    vconfigmaps.apply_watcher_event(&Event::Apply(v.clone()));
    let mut old = ConfigMap {
        metadata: ctx.tr.host_meta("ConfigMap", &ObjectMeta { uid: Some("old-uid".into()), ..v.metadata }),
        ..Default::default()
    };
    old.metadata.uid = Some("host-uid".into());
    hconfigmaps.apply_watcher_event(&Event::Apply(old));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { ConfigMap::reconcile(&c, ("default".into(), "settings".into())).await });

    let (method, uri, sent) = expect(&mut host, 200, serde_json::json!({"kind": "Status", "status": "Success"})).await;
    assert_eq!(
        (method, uri.split('?').next().unwrap()),
        (Method::DELETE, "/api/v1/namespaces/host-ns/configmaps/settings-x-default-x-vc")
    );
    assert_eq!(sent["preconditions"]["uid"], "host-uid", "only that very object is deleted");
    assert!(matches!(run.await.unwrap(), Ok(Action::RequeueAfter(_))), "then created anew");
    silent(&mut host).await;
    silent(&mut virt).await;
}

#[tokio::test]
async fn a_host_object_that_is_not_ours_is_left_alone_and_the_tenant_told() {
    let Harness { ctx, mut virt, mut host, mut vconfigmaps, mut hconfigmaps, .. } = harness();
    vconfigmaps.apply_watcher_event(&Event::Apply(configmap("default", "settings", "u1", &[])));
    hconfigmaps.apply_watcher_event(&Event::Apply(configmap("host-ns", "settings-x-default-x-vc", "foreign", &[])));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { ConfigMap::reconcile(&c, ("default".into(), "settings".into())).await });

    let (method, uri, sent) = expect(&mut virt, 201, serde_json::json!({})).await;
    assert_eq!(method, Method::POST);
    assert!(uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"), "{uri}");
    assert_eq!(sent["reason"], "HostNameConflict");
    assert!(matches!(run.await.unwrap(), Ok(Action::RequeueAfter(_))));
    silent(&mut host).await;
}

#[tokio::test]
async fn a_service_whose_virtual_ip_is_taken_on_the_host_is_created_with_the_hosts() {
    let Harness { ctx, mut virt, mut host, mut vservices, .. } = harness();
    vservices.apply_watcher_event(&Event::Apply(Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some("web".into()),
            uid: Some("u1".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.1.50".into()),
            cluster_ips: Some(vec!["10.96.1.50".into()]),
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    }));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { Service::reconcile(&c, ("default".into(), "web".into())).await });

    let taken = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
        "code": 422, "message": "spec.clusterIPs: Invalid value: [\"10.96.1.50\"]: provided IP is already allocated"});
    let (method, uri, first) = expect(&mut host, 422, taken).await;
    assert_eq!(method, Method::POST);
    assert!(uri.starts_with("/api/v1/namespaces/host-ns/services?"), "{uri}");
    assert_eq!(first["spec"]["clusterIP"], "10.96.1.50", "the virtual IP is asked for first");
    assert_eq!(first["spec"]["selector"][LABEL_CLUSTER], "vc", "the selector is confined to the cluster");
    assert_eq!(first["metadata"]["name"], "web-x-default-x-vc");

    let (_, _, second) = expect(&mut host, 201, serde_json::json!({"metadata": {"name": "web-x-default-x-vc"}})).await;
    assert!(second["spec"].get("clusterIP").is_none(), "then the host chooses: {}", second["spec"]);
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
}

/// A virtual Service with an address in the host's static band (made by a PUT, or given it by a
/// tenant's webhook: the proxy checks only creates it sees) never asks the host for it.
#[tokio::test]
async fn a_virtual_ip_in_the_hosts_static_band_is_not_asked_for() {
    let Harness { ctx, mut virt, mut host, mut vservices, .. } = harness();
    vservices.apply_watcher_event(&Event::Apply(Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some("squat".into()),
            uid: Some("u1".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            cluster_ips: Some(vec!["10.96.0.10".into()]),
            ports: Some(vec![ServicePort { port: 53, ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    }));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { Service::reconcile(&c, ("default".into(), "squat".into())).await });

    let (method, uri, sent) = expect(&mut virt, 201, serde_json::json!({})).await;
    assert_eq!(method, Method::POST);
    assert!(uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"), "{uri}");
    assert_eq!(sent["reason"], "ClusterIPNotAllowed");
    let note = sent["note"].as_str().unwrap_or_default();
    assert!(note.contains("spec.clusterIP") && note.contains("reserved for the host's own"), "{note}");
    let (method, _, created) =
        expect(&mut host, 201, serde_json::json!({"metadata": {"name": "squat-x-default-x-vc"}})).await;
    assert_eq!(method, Method::POST);
    assert!(created["spec"].get("clusterIP").is_none(), "the host chooses: {}", created["spec"]);
    assert!(created["spec"].get("clusterIPs").is_none(), "{}", created["spec"]);
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
}

/// A virtual pod at `generation` running `image`, and its host copy as the downward path made it
/// (translated, marked), scheduled on `node-1` and running.
fn pod_pair(ctx: &Context, generation: i64, image: &str) -> (Pod, Pod) {
    let v: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "default", "name": "web", "uid": "p1", "generation": generation,
            "resourceVersion": "10", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": image}]},
    }))
    .unwrap();
    let env = crate::pods::translate::PodEnv {
        translator: &ctx.tr,
        policy: &ctx.policy,
        api_ip: "10.96.0.1",
        dns_ip: "10.96.0.10",
        cluster_domain: "cluster.local",
        service_links: &[],
        namespaces: &[],
        nodes: crate::pods::translate::NO_NODES,
        token_delivery: Default::default(),
    };
    let mut h = crate::pods::translate::host_pod(&env, &v).unwrap().pod;
    h.metadata.generation = Some(1);
    h.metadata.resource_version = Some("20".into());
    h.spec.as_mut().unwrap().node_name = Some("node-1".into());
    h.status = serde_json::from_value(serde_json::json!({
        "phase": "Running", "podIP": "10.244.0.7", "hostIP": "192.168.0.2", "observedGeneration": 1,
        "containerStatuses": [{"name": "c", "image": image, "imageID": "", "ready": true, "restartCount": 0}],
    }))
    .unwrap();
    crate::pods::slim_host_pod(&mut h);
    (v, h)
}

#[tokio::test]
async fn a_host_status_change_goes_up_without_a_host_request_and_claims_only_a_carried_generation() {
    let Harness { ctx, mut virt, mut host, mut vpods, mut hpods, .. } = harness();
    let (v, h) = pod_pair(&ctx, 2, "nginx:1");
    vpods.apply_watcher_event(&Event::Apply(Compact::new(v.clone())));
    hpods.apply_watcher_event(&Event::Apply(Compact::new(h.clone())));
    let ctx = Arc::new(ctx);
    let key: crate::context::Key = ("default".into(), "web".into());
    let reflect = |ctx: &Arc<Context>| {
        let (c, k) = (ctx.clone(), key.clone());
        tokio::spawn(async move { Pod::reflect(&c, k).await })
    };

    // Nothing says the copy carries generation 2: its status is shown, its generation is not.
    let run = reflect(&ctx);
    let (method, uri, sent) = expect(&mut virt, 200, serde_json::to_value(&v).unwrap()).await;
    assert_eq!((method, uri.split('?').next().unwrap()), (Method::PATCH, "/api/v1/namespaces/default/pods/web/status"));
    assert_eq!(sent["status"]["phase"], "Running");
    assert_eq!(sent["status"]["podIP"], "10.244.0.7");
    assert!(sent["status"].get("observedGeneration").is_none(), "{sent}");
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;

    // The downward path saw the copy carry generation 2 from host generation 1: observed.
    let carried = crate::pods::Carried {
        fingerprint: crate::pods::fingerprint(&v),
        generation: Some(2),
        host_generation: Some(1),
    };
    ctx.carried.record(&key, carried);
    let run = reflect(&ctx);
    let (_, _, sent) = expect(&mut virt, 200, serde_json::to_value(&v).unwrap()).await;
    assert_eq!(sent["status"]["observedGeneration"], 2, "{sent}");
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));

    // Carried from a later host generation than the host has observed: not yet.
    ctx.carried.record(&key, crate::pods::Carried { host_generation: Some(2), ..carried });
    let run = reflect(&ctx);
    let (_, _, sent) = expect(&mut virt, 200, serde_json::to_value(&v).unwrap()).await;
    assert!(sent["status"].get("observedGeneration").is_none(), "{sent}");
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
}

#[tokio::test]
async fn a_new_image_goes_down_as_one_patch_and_its_echo_does_not() {
    let Harness { ctx, mut virt, mut host, mut vpods, mut hpods, .. } = harness();
    *ctx.dns_ip.write().unwrap() = Some("10.96.0.10".into());
    let (_, h) = pod_pair(&ctx, 1, "nginx:1");
    let (v, _) = pod_pair(&ctx, 2, "nginx:2");
    vpods.apply_watcher_event(&Event::Apply(Compact::new(v.clone())));
    hpods.apply_watcher_event(&Event::Apply(Compact::new(h.clone())));
    let ctx = Arc::new(ctx);
    let key: crate::context::Key = ("default".into(), "web".into());
    let c = ctx.clone();
    let run = tokio::spawn(async move { Pod::reconcile(&c, ("default".into(), "web".into())).await });

    let mut patched = h.clone();
    patched.metadata.generation = Some(2);
    let (method, uri, sent) = expect(&mut host, 200, serde_json::to_value(&patched).unwrap()).await;
    assert_eq!(method, Method::PATCH);
    assert!(uri.starts_with("/api/v1/namespaces/host-ns/pods/web-x-default-x-vc?"), "{uri}");
    assert_eq!(sent, serde_json::json!({"spec": {"containers": [{"name": "c", "image": "nginx:2"}]}}));
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
    let carried = ctx.carried.get(&key).expect("recorded");
    assert_eq!((carried.generation, carried.host_generation), (Some(2), Some(2)));
    assert!(!ctx.queues.upward::<Pod>().is_idle(), "the status is looked at again");

    // The echo of a status write (same generation, labels, annotations) is not sent down again;
    // a label change is.
    let mut echo = v.clone();
    echo.status = Some(Default::default());
    echo.metadata.resource_version = Some("11".into());
    <Pod as SyncedKind>::on_virtual_change(&ctx, &echo, Change::Applied);
    assert!(ctx.queues.of::<Pod>().is_idle(), "an echo went down");
    let mut relabelled = echo.clone();
    relabelled.metadata.labels = Some([("app".to_string(), "api".to_string())].into());
    <Pod as SyncedKind>::on_virtual_change(&ctx, &relabelled, Change::Applied);
    assert!(!ctx.queues.of::<Pod>().is_idle(), "a label change did not go down");
}

/// A Status body, as an API server answers an error.
fn status_body(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": reason})
}

#[tokio::test]
async fn a_used_node_follows_its_host_node_gone_or_not_readable() {
    use vkube_core::contract::{ANNOTATION_HOST_RESOURCES, ANNOTATION_HOST_TAINTS, LABEL_FAKE_NODE};
    let Harness { ctx, mut virt, mut host, mut vnodes, .. } = harness();
    // Last refreshed with a host device; the tenant gave it slots of its own since.
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "n1", "resourceVersion": "7", "labels": {LABEL_FAKE_NODE: "true"},
            "annotations": {ANNOTATION_HOST_RESOURCES: "cpu,example.com/dev,pods", ANNOTATION_HOST_TAINTS: ""}},
        "status": {"capacity": {"cpu": "4", "pods": "110", "example.com/dev": "1", "example.com/slots": "1"},
            "allocatable": {"cpu": "4", "pods": "110", "example.com/dev": "1", "example.com/slots": "1"}}}))
    .unwrap();
    vnodes.apply_watcher_event(&Event::Apply(node.clone()));
    ctx.nodes_used.lock().unwrap().insert("n1".into());
    ctx.refs.update("default", "p", [(crate::refs::RefKind::Node, "n1".to_string())].into());
    let ctx = Arc::new(ctx);
    let reconcile = || {
        let c = ctx.clone();
        tokio::spawn(async move { crate::nodes::reconcile(&c, "n1".into()).await })
    };
    let requeue = |a: Action| match a {
        Action::RequeueAfter(d) => d,
        other => panic!("not a requeue: {other:?}"),
    };

    // The host API server fails: read again within the retry period, nothing written.
    let run = reconcile();
    let (method, uri, _) = expect(&mut host, 500, status_body(500, "InternalError")).await;
    assert_eq!((method, uri.as_str()), (Method::GET, "/api/v1/nodes/n1"));
    assert_eq!(requeue(run.await.unwrap().unwrap()), crate::nodes::REFRESH_RETRY);
    silent(&mut virt).await;
    // Again, once due: twice as long (a failing host is not read harder).
    ctx.node_refreshed.lock().unwrap().clear();
    let run = reconcile();
    expect(&mut host, 503, status_body(503, "ServiceUnavailable")).await;
    assert_eq!(requeue(run.await.unwrap().unwrap()), 2 * crate::nodes::REFRESH_RETRY);
    silent(&mut virt).await;

    // Forbidden (no ClusterRole): not before the next refresh.
    ctx.node_refreshed.lock().unwrap().clear();
    let run = reconcile();
    expect(&mut host, 403, status_body(403, "Forbidden")).await;
    assert_eq!(requeue(run.await.unwrap().unwrap()), crate::nodes::REFRESH);
    silent(&mut virt).await;

    // The host dropped its device: removed (null) from the status, the tenant's slots left
    // alone, then the record narrowed at the version the status write left.
    ctx.node_refreshed.lock().unwrap().clear();
    let run = reconcile();
    let host_node = serde_json::json!({"metadata": {"name": "n1"},
        "status": {"capacity": {"cpu": "4", "pods": "110"}, "allocatable": {"cpu": "4", "pods": "110"}}});
    expect(&mut host, 200, host_node).await;
    let mut answer = serde_json::to_value(&node).unwrap();
    answer["metadata"]["resourceVersion"] = "8".into();
    let (_, uri, sent) = expect(&mut virt, 200, answer.clone()).await;
    assert!(uri.starts_with("/api/v1/nodes/n1/status?"), "{uri}");
    assert_eq!(sent["status"]["capacity"]["example.com/dev"], serde_json::Value::Null);
    assert!(sent["status"]["capacity"].as_object().unwrap().contains_key("example.com/dev"), "removed: null");
    assert!(!sent["status"]["allocatable"].as_object().unwrap().contains_key("example.com/slots"), "the tenant's");
    let (_, _, sent) = expect(&mut virt, 200, answer.clone()).await;
    let narrowed = serde_json::json!({"metadata": {"resourceVersion": "8", "annotations": {ANNOTATION_HOST_RESOURCES: "cpu,pods"}}});
    assert_eq!(sent, narrowed);
    assert_eq!(requeue(run.await.unwrap().unwrap()), crate::nodes::REFRESH);
    assert!(ctx.node_failures.lock().unwrap().is_empty(), "refreshed: the next failure waits 30 s again");

    // A refresh whose write conflicts (the tenant's edit): tried again in 30 s, not at the next
    // period (the queue's quick retry finds it not due yet and says when it is).
    ctx.node_refreshed.lock().unwrap().clear();
    let run = reconcile();
    let wider = serde_json::json!({"metadata": {"name": "n1"},
        "status": {"capacity": {"cpu": "8", "pods": "110"}, "allocatable": {"cpu": "8", "pods": "110"}}});
    expect(&mut host, 200, wider).await;
    expect(&mut virt, 409, status_body(409, "Conflict")).await;
    assert!(run.await.unwrap().is_err());
    let run = reconcile();
    silent(&mut host).await;
    let wait = requeue(run.await.unwrap().unwrap());
    assert!(wait <= crate::nodes::REFRESH_RETRY && wait > crate::nodes::REFRESH_RETRY / 2, "{wait:?}");
    silent(&mut virt).await;

    // Gone, with a pod still bound: closed (NoExecute too: the virtual taint eviction moves
    // the pods bound there), not Ready, what it showed kept.
    ctx.node_refreshed.lock().unwrap().clear();
    let run = reconcile();
    expect(&mut host, 404, status_body(404, "NotFound")).await;
    let (method, _, sent) = expect(&mut virt, 200, answer.clone()).await;
    assert_eq!(method, Method::PATCH);
    let unreachable = |effect: &str| serde_json::json!({"key": "node.kubernetes.io/unreachable", "effect": effect});
    assert_eq!(sent["spec"]["taints"], serde_json::json!([unreachable("NoSchedule"), unreachable("NoExecute")]));
    assert_eq!(sent["metadata"]["resourceVersion"], "7");
    let (_, uri, sent) = expect(&mut virt, 200, answer).await;
    assert!(uri.starts_with("/api/v1/nodes/n1/status?"), "{uri}");
    assert_eq!(sent["status"]["conditions"][0]["status"], "Unknown");
    assert_eq!(sent["status"]["conditions"][0]["reason"], "HostNodeGone");
    assert_eq!(sent["status"]["capacity"]["example.com/dev"], "1", "as it showed");
    assert_eq!(requeue(run.await.unwrap().unwrap()), crate::nodes::REFRESH);
    silent(&mut virt).await;
    silent(&mut host).await;
}

#[tokio::test]
async fn host_node_listings_after_the_first_come_from_the_watch_cache() {
    let Harness { ctx, mut host, .. } = harness();
    let ctx = Arc::new(ctx);
    let list = |version: &str, nodes: &[(&str, &str)]| {
        let items: Vec<_> = nodes
            .iter()
            .map(|(n, v)| {
                serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": n, "resourceVersion": v}})
            })
            .collect();
        serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": version}, "items": items})
    };
    let listing = |after: Option<&'static str>| {
        let c = ctx.clone();
        tokio::spawn(async move { crate::nodes::list_host_nodes_once(&c, after).await })
    };
    let refreshed = |names: &[&str]| {
        let now = std::time::Instant::now();
        *ctx.node_refreshed.lock().unwrap() = names.iter().map(|n| (n.to_string(), now)).collect();
    };

    // The first: the most recent state (no resourceVersion).
    refreshed(&["n1", "n2"]);
    let run = listing(None);
    let (_, uri, _) = expect(&mut host, 200, list("100", &[("n1", "5"), ("n2", "6")])).await;
    assert!(uri.starts_with("/api/v1/nodes?") && !uri.contains("resourceVersion"), "{uri}");
    assert_eq!(run.await.unwrap().as_deref(), Some("100"));
    assert!(ctx.node_refreshed.lock().unwrap().is_empty(), "both came: refreshed at once");

    // The next: from the cache, not older than the first; only the node that changed is due.
    refreshed(&["n1", "n2"]);
    let run = listing(Some("100"));
    let (_, uri, _) = expect(&mut host, 200, list("120", &[("n1", "5"), ("n2", "9")])).await;
    assert!(uri.contains("resourceVersion=100") && uri.contains("resourceVersionMatch=NotOlderThan"), "{uri}");
    assert_eq!(run.await.unwrap().as_deref(), Some("120"));
    let due: Vec<String> = ["n1", "n2"]
        .into_iter()
        .filter(|n| !ctx.node_refreshed.lock().unwrap().contains_key(*n))
        .map(String::from)
        .collect();
    assert_eq!(due, ["n2"]);
    assert_eq!(ctx.host_nodes.read().unwrap()["n2"], "9");

    // A listing without a version says none to list after.
    let run = listing(Some("120"));
    expect(&mut host, 200, list("", &[("n1", "5"), ("n2", "9")])).await;
    assert_eq!(run.await.unwrap(), None);

    // A failed listing keeps what was listed, and says no version to list after.
    let run = listing(Some("120"));
    expect(&mut host, 500, status_body(500, "InternalError")).await;
    assert_eq!(run.await.unwrap(), None);
    assert_eq!(ctx.host_nodes.read().unwrap().len(), 2);
}

#[tokio::test]
async fn a_pod_is_bound_once_while_its_watch_has_not_shown_the_binding() {
    let Harness { ctx, mut virt, mut host, mut vpods, mut hpods, mut vnodes, .. } = harness();
    let (mut v, h) = pod_pair(&ctx, 1, "nginx:1");
    v.spec.as_mut().unwrap().node_name = None;
    vpods.apply_watcher_event(&Event::Apply(Compact::new(v.clone())));
    hpods.apply_watcher_event(&Event::Apply(Compact::new(h.clone())));
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "node-1"}})).unwrap();
    vnodes.apply_watcher_event(&Event::Apply(node));
    ctx.nodes_used.lock().unwrap().insert("node-1".into());
    let ctx = Arc::new(ctx);
    let reflect = |ctx: &Arc<Context>| {
        let c = ctx.clone();
        tokio::spawn(async move { Pod::reflect(&c, ("default".into(), "web".into())).await })
    };
    let created = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201});

    let run = reflect(&ctx);
    let (method, uri, sent) = expect(&mut virt, 201, created.clone()).await;
    assert_eq!((method, uri.split('?').next().unwrap()), (Method::POST, "/api/v1/namespaces/default/pods/web/binding"));
    assert_eq!(sent["target"]["name"], "node-1");
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));

    // The host copy changes again before the virtual pod's watch shows the binding: not sent again.
    let run = reflect(&ctx);
    silent(&mut virt).await;
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));

    // A new pod of the same name (another uid) and its copy: bound.
    v.metadata.uid = Some("p2".into());
    vpods.apply_watcher_event(&Event::Apply(Compact::new(v.clone())));
    let mut h2 = h.clone();
    h2.metadata.annotations.as_mut().unwrap().insert(vkube_core::contract::ANNOTATION_UID.into(), "p2".into());
    hpods.apply_watcher_event(&Event::Apply(Compact::new(h2)));
    let run = reflect(&ctx);
    let (method, _, _) = expect(&mut virt, 201, created).await;
    assert_eq!(method, Method::POST);
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut virt).await;
    silent(&mut host).await;
}

#[tokio::test]
async fn a_host_copy_is_made_once_while_the_host_watch_has_not_shown_it() {
    let Harness { ctx, mut virt, mut host, mut vpods, .. } = harness();
    *ctx.dns_ip.write().unwrap() = Some("10.96.0.10".into());
    let (mut v, _) = pod_pair(&ctx, 1, "nginx:1");
    let spec = v.spec.as_mut().unwrap();
    spec.node_name = None;
    spec.automount_service_account_token = Some(false);
    vpods.apply_watcher_event(&Event::Apply(Compact::new(v.clone())));
    let ctx = Arc::new(ctx);
    let reconcile = |ctx: &Arc<Context>| {
        let c = ctx.clone();
        tokio::spawn(async move { Pod::reconcile(&c, ("default".into(), "web".into())).await })
    };

    let run = reconcile(&ctx);
    let (method, uri, sent) = expect(&mut host, 201, serde_json::json!({})).await;
    assert_eq!((method, uri.split('?').next().unwrap()), (Method::POST, "/api/v1/namespaces/host-ns/pods"));
    let copy: Pod = serde_json::from_value(sent).unwrap();
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));

    // Queued again before the host watch brings the copy (the upward path found none): nothing
    // is sent, looked at again in a moment.
    let run = reconcile(&ctx);
    silent(&mut host).await;
    assert!(matches!(run.await.unwrap(), Ok(Action::RequeueAfter(_))));
    assert!(ctx.carried.get(&("default".into(), "web".into())).is_some(), "what the copy carries stays known");

    // Once the watch showed it and it went (evicted, deleted on the host): made again.
    ctx.copies_unseen.seen(v.metadata.uid.as_deref().unwrap());
    let run = reconcile(&ctx);
    let (method, _, _) = expect(&mut host, 201, serde_json::to_value(&copy).unwrap()).await;
    assert_eq!(method, Method::POST);
    assert!(matches!(run.await.unwrap(), Ok(Action::Done)));
    silent(&mut host).await;
    silent(&mut virt).await;
}

#[tokio::test]
async fn an_update_keeps_what_the_host_holds_its_copy_by_and_a_refused_one_is_told() {
    let Harness { ctx, mut virt, mut host, mut vconfigmaps, mut hconfigmaps, .. } = harness();
    let v = configmap("default", "settings", "u1", &[("mode", "slow")]);
    vconfigmaps.apply_watcher_event(&Event::Apply(v.clone()));
    let mut current = ConfigMap { metadata: ctx.tr.host_meta("ConfigMap", &v.metadata), ..Default::default() };
    current.metadata.uid = Some("host-uid".into());
    current.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    hconfigmaps.apply_watcher_event(&Event::Apply(current));
    let ctx = Arc::new(ctx);
    let c = ctx.clone();
    let run = tokio::spawn(async move { ConfigMap::reconcile(&c, ("default".into(), "settings".into())).await });

    let refused = serde_json::json!({"kind": "Status", "status": "Failure", "code": 422, "reason": "Invalid",
        "message": "ConfigMap \"settings-x-default-x-vc\" is invalid: data: Too long"});
    let (method, _, sent) = expect(&mut host, 422, refused).await;
    assert_eq!(method, Method::PUT);
    assert_eq!(sent["metadata"]["finalizers"], serde_json::json!(["example.com/hold"]), "the host's finalizer stays");
    assert_eq!(sent["data"], serde_json::json!({"mode": "slow"}));
    let (method, uri, event) = expect(&mut virt, 201, serde_json::json!({})).await;
    assert_eq!(method, Method::POST, "{uri}");
    assert_eq!((&event["reason"], &event["type"]), (&"HostRefused".into(), &"Warning".into()));
    assert!(
        event["note"].as_str().unwrap().contains("ConfigMap \"settings\" is invalid"),
        "in the tenant's names: {event}"
    );
    assert!(
        matches!(run.await.unwrap(), Ok(Action::RequeueAfter(d)) if d.as_secs() == 300),
        "tried again in 5 minutes, not at the backoff's pace"
    );
    silent(&mut host).await;
}
