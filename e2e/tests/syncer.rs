//! The syncer end to end: workloads created with kubectl in a virtual cluster run on the host
//! (real API servers, real scheduler, kwok nodes), correctly and safely.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret, Service};
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use vkube_e2e::{TestEnv, VirtualCluster, eventually};
use vkube_syncer::naming::{LABEL_CLUSTER, Translator};

fn tr(vc: &VirtualCluster) -> Translator {
    vc.translator()
}

async fn host_names<K>(env: &TestEnv, vc: &VirtualCluster) -> BTreeSet<String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    vc.host_list::<K>(env).await.into_iter().map(|o| o.name_any()).collect()
}

fn running_with_ip(p: &Pod) -> bool {
    let s = p.status.as_ref();
    s.and_then(|s| s.phase.as_deref()) == Some("Running")
        && s.and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| !ip.is_empty())
}

async fn warnings(vc: &VirtualCluster, ns: &str, object: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(vc.client().await, ns);
    api.list(&ListParams::default().fields(&format!("involvedObject.name={object},type=Warning")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_and_its_service_run_on_the_host_with_the_same_addresses() {
    let env = TestEnv::start(3).await;
    let vc = env.virtual_cluster("team-a").await;
    vc.kubectl_ok(&["create", "deployment", "web", "--image=nginx", "--replicas=3"]);
    vc.kubectl_ok(&["expose", "deployment", "web", "--port=80"]);
    let tr = tr(&vc);
    let client = vc.client().await;
    let vpods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let started = std::time::Instant::now();
    let virtual_pods = eventually("3 virtual pods Running, bound, with host IPs", Duration::from_secs(30), || async {
        let list = vpods.list(&ListParams::default().labels("app=web")).await.map_err(|e| e.to_string())?.items;
        let ready: Vec<Pod> = list
            .into_iter()
            .filter(|p| running_with_ip(p) && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .collect();
        Ok((ready.len() == 3).then_some(ready))
    })
    .await;
    eprintln!("3 pods synced, Running and bound after {:.1} s", started.elapsed().as_secs_f64());

    let host_pods: BTreeMap<String, Pod> =
        vc.host_list::<Pod>(&env).await.into_iter().map(|p| (p.name_any(), p)).collect();
    let nodes: Api<Node> = Api::all(client.clone());
    for vp in &virtual_pods {
        let host_name = tr.host_name("default", &vp.name_any());
        let hp =
            host_pods.get(&host_name).unwrap_or_else(|| panic!("host pod {host_name} missing: {:?}", host_pods.keys()));
        assert!(running_with_ip(hp), "host pod {host_name} Running");
        assert_eq!(vp.status.as_ref().unwrap().pod_ip, hp.status.as_ref().unwrap().pod_ip, "same pod IP both sides");
        let node = vp.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert_eq!(Some(&node), hp.spec.as_ref().unwrap().node_name.as_ref(), "bound to the host pod's node");
        assert!(nodes.get_opt(&node).await.unwrap().is_some(), "virtual node {node} exists");
        // No host credentials inside, and the pod talks to the virtual API server.
        let spec = hp.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(!serde_json::to_string(spec).unwrap().contains("serviceAccountToken"));
    }

    let vsvc: Service = Api::namespaced(client.clone(), "default").get("web").await.unwrap();
    let hsvc: Service =
        Api::namespaced(env.client().await, vc.host_namespace()).get(&tr.host_name("default", "web")).await.unwrap();
    let vip = vsvc.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    assert_eq!(Some(vip.clone()), hsvc.spec.as_ref().unwrap().cluster_ip, "same ClusterIP in both clusters");
    let selector = hsvc.spec.as_ref().unwrap().selector.clone().unwrap();
    assert_eq!(selector.get(LABEL_CLUSTER).map(String::as_str), Some("team-a"), "the host selector is confined");

    let want: BTreeSet<String> =
        virtual_pods.iter().map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap()).collect();
    eventually("virtual endpoints list the 3 pod IPs", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["get", "endpoints", "web", "-o", "jsonpath={.subsets[*].addresses[*].ip}"]);
        let got: BTreeSet<String> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        if got == want { Ok(Some(())) } else { Err(format!("endpoints {got:?}, want {want:?}")) }
    })
    .await;

    // In-cluster API access and DNS point at the virtual cluster.
    let kubernetes: Service = Api::namespaced(client.clone(), "default").get("kubernetes").await.unwrap();
    let proxy_svc: Service = Api::namespaced(env.client().await, vc.host_namespace()).get("team-a").await.unwrap();
    assert_eq!(
        kubernetes.spec.unwrap().cluster_ip,
        proxy_svc.spec.clone().unwrap().cluster_ip,
        "kubernetes.default is the proxy"
    );
    let hp = host_pods.values().find(|p| p.name_any().starts_with("web-")).unwrap();
    let env_host = hp.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "KUBERNETES_SERVICE_HOST")
        .cloned();
    assert_eq!(env_host.and_then(|e| e.value), proxy_svc.spec.unwrap().cluster_ip);
    let dns: Service = Api::namespaced(client.clone(), "kube-system").get("kube-dns").await.unwrap();
    let nameservers = hp.spec.as_ref().unwrap().dns_config.clone().unwrap().nameservers.unwrap();
    assert_eq!(nameservers, vec![dns.spec.unwrap().cluster_ip.unwrap()]);

    // A pod started after the Service sees it in its environment, as from a kubelet.
    vc.kubectl_ok(&["run", "client", "--image=nginx"]);
    let client_host = tr.host_name("default", "client");
    let web_host = eventually("the client pod's Service variables", Duration::from_secs(30), || async {
        let out = env.kubectl(&[
            "-n",
            vc.host_namespace(),
            "get",
            "pod",
            &client_host,
            "-o",
            "jsonpath={.spec.containers[0].env[?(@.name==\"WEB_SERVICE_HOST\")].value}",
        ]);
        let v = String::from_utf8_lossy(&out.stdout).to_string();
        Ok((!v.is_empty()).then_some(v))
    })
    .await;
    assert_eq!(web_host, vip, "WEB_SERVICE_HOST is the Service's ClusterIP");

    // An ExternalName is the virtual DNS's alone: no host copy to publish the tenant's name in
    // the host's DNS. Made a ClusterIP Service, it gets one with its address; made an
    // ExternalName again, the copy goes.
    vc.kubectl_ok(&["create", "service", "externalname", "db", "--external-name=db.example.com"]);
    vc.kubectl_ok(&["create", "service", "clusterip", "after", "--tcp=80"]);
    let host_services: Api<Service> = Api::namespaced(env.client().await, vc.host_namespace());
    let (db, after) = (tr.host_name("default", "db"), tr.host_name("default", "after"));
    eventually("the Service made after the ExternalName on the host", Duration::from_secs(30), || async {
        Ok(host_services.get_opt(&after).await.map_err(|e| e.to_string())?.map(drop))
    })
    .await;
    assert!(host_services.get_opt(&db).await.unwrap().is_none(), "no host copy of an ExternalName");
    let to_cluster_ip = r#"{"spec":{"type":"ClusterIP","externalName":null,"ports":[{"port":5432}]}}"#;
    vc.kubectl_ok(&["patch", "service", "db", "-p", to_cluster_ip]);
    let vip = vc.kubectl_ok(&["get", "service", "db", "-o", "jsonpath={.spec.clusterIP}"]);
    let host_ip = eventually("a host copy once it is a ClusterIP Service", Duration::from_secs(30), || async {
        let h = host_services.get_opt(&db).await.map_err(|e| e.to_string())?;
        Ok(h.and_then(|h| h.spec).and_then(|s| s.cluster_ip))
    })
    .await;
    // (Where the host had given that address away, the virtual Service is made again with the host's.)
    let vip_now = vc.kubectl_ok(&["get", "service", "db", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(host_ip == vip || host_ip == vip_now, "the same address: host {host_ip}, virtual {vip} / {vip_now}");
    let to_external = r#"{"spec":{"type":"ExternalName","externalName":"db.example.com","clusterIP":null,"clusterIPs":null,"ports":null}}"#;
    vc.kubectl_ok(&["patch", "service", "db", "-p", to_external]);
    eventually("the host copy gone once it is an ExternalName again", Duration::from_secs(30), || async {
        Ok(host_services.get_opt(&db).await.map_err(|e| e.to_string())?.is_none().then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmaps_and_secrets_follow_the_pods_that_use_them() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("cfg").await;
    vc.kubectl_ok(&["create", "configmap", "settings", "--from-literal=mode=fast"]);
    vc.kubectl_ok(&["create", "secret", "generic", "db", "--from-literal=password=s3cret"]);
    vc.kubectl_ok(&["create", "configmap", "unused", "--from-literal=x=1"]);
    vc.kubectl_ok(&["create", "secret", "generic", "unused-secret", "--from-literal=x=1"]);
    vc.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  containers:
  - name: app
    image: nginx
    env:
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: db, key: password}}
    envFrom:
    - configMapRef: {name: settings}
    volumeMounts: [{name: cfg, mountPath: /cfg}]
  volumes:
  - name: cfg
    configMap: {name: settings}
"#,
    );
    let tr = tr(&vc);
    let (settings, db) = (tr.host_name("default", "settings"), tr.host_name("default", "db"));
    eventually("the pod runs on the host with its configmap and secret", Duration::from_secs(30), || async {
        let pods = host_names::<Pod>(&env, &vc).await;
        let cms = host_names::<ConfigMap>(&env, &vc).await;
        let secrets = host_names::<Secret>(&env, &vc).await;
        Ok((pods.contains(&tr.host_name("default", "app")) && cms.contains(&settings) && secrets.contains(&db))
            .then_some(()))
    })
    .await;
    let host_secret: Secret = Api::namespaced(env.client().await, vc.host_namespace()).get(&db).await.unwrap();
    assert_eq!(host_secret.data.unwrap()["password"].0, b"s3cret");
    assert!(
        !host_names::<ConfigMap>(&env, &vc).await.contains(&tr.host_name("default", "unused")),
        "unused configmap stays off the host"
    );
    assert!(
        !host_names::<Secret>(&env, &vc).await.contains(&tr.host_name("default", "unused-secret")),
        "unused secret stays off the host"
    );

    // Content updates reach the host copy.
    vc.kubectl_ok(&["patch", "configmap", "settings", "-p", r#"{"data":{"mode":"slow"}}"#]);
    eventually("the host copy follows the update", Duration::from_secs(20), || async {
        let cm: ConfigMap =
            Api::namespaced(env.client().await, vc.host_namespace()).get(&settings).await.map_err(|e| e.to_string())?;
        Ok((cm.data.unwrap_or_default().get("mode").map(String::as_str) == Some("slow")).then_some(()))
    })
    .await;

    vc.kubectl_ok(&["delete", "pod", "app", "--wait=true", "--timeout=60s"]);
    eventually("the pod, its configmap and its secret leave the host", Duration::from_secs(30), || async {
        let left: Vec<String> = host_names::<Pod>(&env, &vc)
            .await
            .into_iter()
            .chain(host_names::<ConfigMap>(&env, &vc).await)
            .chain(host_names::<Secret>(&env, &vc).await)
            .filter(|n| n.contains("-x-default-x-"))
            .collect();
        if left.is_empty() { Ok(Some(())) } else { Err(format!("still on the host: {left:?}")) }
    })
    .await;
}

/// A pod's service-account token is the virtual cluster's, bound to that pod: it works while the
/// pod exists, is refused once the pod is deleted, and its host Secret goes with the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_token_is_bound_to_it_and_goes_with_it() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster("tok").await;
    vc.kubectl_ok(&["run", "holder", "--image=nginx"]);
    vc.kubectl_ok(&["run", "forgotten", "--image=nginx"]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/holder", "--timeout=60s"]);
    let secret_name = format!("{}-sa-token", tr(&vc).host_name("default", "holder"));
    let secrets: Api<Secret> = Api::namespaced(env.client().await, vc.host_namespace());
    let secret = secrets.get(&secret_name).await.expect("the pod's own token Secret on the host");
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let holder = claims(&token);
    assert_eq!(holder["kubernetes.io"]["pod"]["name"], "holder", "{holder}");
    assert_eq!(holder["kubernetes.io"]["serviceaccount"]["name"], "default", "{holder}");

    let life = |c: &serde_json::Value| c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert_eq!(life(&holder), 365 * 86_400, "the default projection's token: --token-lifetime, {holder}");

    // A projection asking for a short token gets one that short, renewed at 80 % of its life.
    vc.apply(SHORT_TOKEN_POD);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/short", "--timeout=60s"]);
    let short_name = vkube_syncer::pods::translate::token_secret_name(&tr(&vc), "default", "short", Some("vault"));
    let short = secrets.get(&short_name).await.expect("the vault audience's token Secret");
    let short_claims = claims(&String::from_utf8(short.data.clone().unwrap()["token"].0.clone()).unwrap());
    assert_eq!(short_claims["aud"], serde_json::json!(["vault"]), "{short_claims}");
    assert_eq!(life(&short_claims), 600, "as the projection asked: {short_claims}");
    let at = |key: &str| short.annotations()[key].parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    let before_end = at("vkube.dev/token-expires").duration_since(at("vkube.dev/token-renew-at")).as_secs();
    assert_eq!(before_end, 120, "renewed with a fifth of its life left");

    let with_token = vc.client_with_token(&token).await;
    with_token.apiserver_version().await.expect("the token works while its pod exists");
    vc.kubectl_ok(&["delete", "pod", "holder", "--wait"]);
    refused_once_its_pod_is_gone(&with_token).await;
    let gone = |name: String| {
        let secrets = secrets.clone();
        async move {
            let left = secrets.get_opt(&name).await.map_err(|e| e.to_string())?;
            Ok(left.is_none().then_some(()))
        }
    };
    eventually("its host Secret goes with it", Duration::from_secs(30), || gone(secret_name.clone())).await;

    // A pod force-deleted while the control plane is down: the sweep at restart finds its token.
    let forgotten = format!("{}-sa-token", tr(&vc).host_name("default", "forgotten"));
    assert!(secrets.get_opt(&forgotten).await.unwrap().is_some(), "the second pod's token Secret");
    // The short token as a vkube before renewal times wrote it: a year long, no renewal time. The
    // sweep at restart renews it once to what its projection asks.
    let year_ahead = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(24 * 300);
    let as_before = serde_json::json!({"metadata": {"annotations": {
        "vkube.dev/token-renew-at": null, "vkube.dev/token-expires": year_ahead.to_string()}}});
    let pp = kube::api::PatchParams::default();
    vc.kill_controller();
    secrets.patch(&short_name, &pp, &kube::api::Patch::Merge(&as_before)).await.expect("the short token's Secret");
    vc.kubectl_direct_ok(&["delete", "pod", "forgotten", "--grace-period=0", "--force"]);
    vc.start_controller().await;
    eventually("the orphaned token Secret is swept", Duration::from_secs(30), || gone(forgotten.clone())).await;
    let renewed = || {
        let secrets = secrets.clone();
        let name = short_name.clone();
        async move {
            let s = secrets.get(&name).await.map_err(|e| e.to_string())?;
            Ok(s.annotations().contains_key("vkube.dev/token-renew-at").then_some(s))
        }
    };
    let again = eventually("the year-long short token is renewed", Duration::from_secs(30), renewed).await;
    let again_claims = claims(&String::from_utf8(again.data.unwrap()["token"].0.clone()).unwrap());
    assert_eq!(life(&again_claims), 600, "as the projection asks: {again_claims}");
}

/// A pod whose projection asks for a 10-minute token for the audience `vault`.
const SHORT_TOKEN_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: short
spec:
  containers: [{name: app, image: nginx, volumeMounts: [{name: vault, mountPath: /var/run/vault}]}]
  volumes:
  - name: vault
    projected:
      sources:
      - serviceAccountToken: {path: token, audience: vault, expirationSeconds: 600}
"#;

/// A signer of the tenant's: issues (or denies) the virtual cluster's PodCertificateRequests of
/// its signer name that are not answered yet, as a signer controller would: certificates of an
/// hour, due for refresh after half of it. Returns those it answered.
async fn sign_requests(
    api: &Api<PodCertificateRequest>,
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
    signer: &str,
) -> Vec<PodCertificateRequest> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    let mut answered = vec![];
    for mut pcr in api.list(&ListParams::default()).await.expect("the requests").items {
        if pcr.spec.signer_name != signer || pcr.status.as_ref().is_some_and(|s| s.conditions.is_some()) {
            continue;
        }
        // Whole seconds, as the certificate encodes them.
        let not_before = vkube_pki::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let at = |offset: i64| {
            Time(k8s_openapi::jiff::Timestamp::from_second(not_before.unix_timestamp() + offset).unwrap())
        };
        let condition = |type_: &str| Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: "ByTheTest".into(),
            message: format!("{type_} by the test's signer"),
            last_transition_time: at(0),
            observed_generation: None,
        };
        let status = if signer.ends_with("/deny") {
            PodCertificateRequestStatus { conditions: Some(vec![condition("Denied")]), ..Default::default() }
        } else {
            let mut csr =
                rcgen::CertificateSigningRequestParams::from_der(&pcr.spec.stub_pkc_s10_request.0.clone().into())
                    .expect("a valid stub request");
            csr.params.not_before = not_before;
            csr.params.not_after = not_before + vkube_pki::Duration::hours(1);
            PodCertificateRequestStatus {
                conditions: Some(vec![condition("Issued")]),
                certificate_chain: Some(csr.signed_by(ca).expect("signed").pem()),
                not_before: Some(at(0)),
                begin_refresh_at: Some(at(1800)),
                not_after: Some(at(3600)),
            }
        };
        pcr.status = Some(status);
        let name = pcr.metadata.name.clone().unwrap_or_default();
        let done = api.replace_status(&name, &Default::default(), &pcr).await.expect("the request answered");
        answered.push(done);
    }
    answered
}

/// The projection key the certificate Secret records a refresh time for (it has one projection).
async fn projection_key(secrets: &Api<Secret>, name: &str) -> String {
    let s = secrets.get(name).await.unwrap();
    let recorded = &s.metadata.annotations.unwrap()["vkube.dev/certificates-refresh"];
    let times: BTreeMap<String, String> = serde_json::from_str(recorded).unwrap();
    times.into_keys().next().expect("one projection")
}

/// A pod's podCertificate projection is answered by the VIRTUAL cluster's signer, as a kubelet
/// asks its own: once the pod is bound, a request naming the pod, its service account and its
/// node, with a key of its own whose private half and issued chain reach the host pod in a Secret
/// of the pod's own (key, chain, and both as the credential bundle); renewed with a new key from
/// `beginRefreshAt` on (the old credentials kept until then), also from what the Secret records
/// after a restart; a denied request is told on the pod; the host pod carries no podCertificate
/// (the host's signers are never asked); the Secret goes with the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_certificates_come_from_the_virtual_clusters_signer() {
    let env = TestEnv::start(1).await;
    let mut vc = env.virtual_cluster("pcert").await;
    let pod = |name: &str, signer: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  containers: [{{name: c, image: nginx, volumeMounts: [{{name: tls, mountPath: /tls}}]}}]
  volumes:
  - name: tls
    projected:
      sources:
      - podCertificate: {{signerName: {signer}, keyType: ECDSAP256, maxExpirationSeconds: 3600,
          credentialBundlePath: bundle.pem, keyPath: key.pem, certificateChainPath: chain.pem,
          userAnnotations: {{example.com/path: /custom}}}}
"#
        )
    };
    vc.apply(&pod("certs", "example.com/pods"));
    vc.apply(&pod("denied", "example.com/deny"));
    let client = vc.client().await;
    let requests: Api<PodCertificateRequest> = Api::namespaced(client.clone(), "default");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let sign = |signer: &'static str| {
        let (requests, ca) = (&requests, &ca);
        move || async move { Ok(sign_requests(requests, ca, signer).await.into_iter().next()) }
    };
    let first = eventually("a request for the bound pod", Duration::from_secs(60), sign("example.com/pods")).await;
    let v = Api::<Pod>::namespaced(client.clone(), "default").get("certs").await.unwrap();
    let node = v.spec.as_ref().and_then(|s| s.node_name.clone()).expect("bound before its request");
    let node_uid = Api::<Node>::all(client.clone()).get(&node).await.unwrap().metadata.uid;
    let sa_uid = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), "default")
        .get("default")
        .await
        .unwrap()
        .metadata
        .uid;
    let spec = &first.spec;
    assert_eq!((spec.pod_name.as_str(), Some(&spec.pod_uid)), ("certs", v.metadata.uid.as_ref()));
    assert_eq!((spec.node_name.as_str(), Some(&spec.node_uid)), (node.as_str(), node_uid.as_ref()));
    assert_eq!((spec.service_account_name.as_str(), Some(&spec.service_account_uid)), ("default", sa_uid.as_ref()));
    assert_eq!(spec.max_expiration_seconds, Some(3600));
    assert_eq!(spec.unverified_user_annotations.as_ref().unwrap()["example.com/path"], "/custom");
    let owner = &first.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), &owner.uid), ("Pod", v.metadata.uid.as_ref().unwrap()));

    // The host Secret: the key whose public half the request carries, the chain issued.
    let secrets: Api<Secret> = Api::namespaced(env.client().await, vc.host_namespace());
    let secret_name = format!("{}-pcert", tr(&vc).host_name("default", "certs"));
    let files = |pcr: PodCertificateRequest| {
        let (secrets, secret_name) = (secrets.clone(), secret_name.clone());
        move || {
            let (secrets, secret_name, pcr) = (secrets.clone(), secret_name.clone(), pcr.clone());
            async move {
                let Some(s) = secrets.get_opt(&secret_name).await.map_err(|e| e.to_string())? else { return Ok(None) };
                let data = s.data.unwrap_or_default();
                let text = |suffix: &str| {
                    data.iter().find(|(k, _)| k.ends_with(suffix)).map(|(_, v)| String::from_utf8(v.0.clone()).unwrap())
                };
                let (Some(key), Some(chain), Some(bundle)) = (text(".key"), text(".chain"), text(".bundle")) else {
                    return Ok(None);
                };
                if Some(&chain) != pcr.status.as_ref().and_then(|s| s.certificate_chain.as_ref()) {
                    return Ok(None);
                }
                Ok(Some((key, chain, bundle)))
            }
        }
    };
    let (key, chain, bundle) =
        eventually("the issued credentials on the host", Duration::from_secs(30), files(first.clone())).await;
    assert_eq!(bundle, format!("{key}{chain}"), "the credential bundle: key, then chain");
    let requested =
        rcgen::CertificateSigningRequestParams::from_der(&first.spec.stub_pkc_s10_request.0.clone().into()).unwrap();
    use rcgen::PublicKeyData;
    assert_eq!(rcgen::KeyPair::from_pem(&key).unwrap().der_bytes(), requested.public_key.der_bytes());
    let host_pod =
        vc.host_list::<Pod>(&env).await.into_iter().find(|p| p.name_any() == tr(&vc).host_name("default", "certs"));
    let host_json = serde_json::to_string(&host_pod.expect("the host pod")).unwrap();
    assert!(!host_json.contains("podCertificate") && host_json.contains(&secret_name), "{host_json}");

    // Refreshed with a new key once due (the API server wants 10 minutes at least before a
    // refresh: the time the Secret records is moved instead), and from what the Secret records
    // after a restart; the old credentials stay until the new ones are issued.
    vc.kill_controller();
    let refresh = serde_json::json!({"metadata": {"annotations": {"vkube.dev/certificates-refresh":
        serde_json::json!({projection_key(&secrets, &secret_name).await: "2020-01-01T00:00:00Z"}).to_string()}}});
    secrets.patch(&secret_name, &Default::default(), &kube::api::Patch::Merge(&refresh)).await.unwrap();
    vc.start_controller().await;
    eventually("a refresh request", Duration::from_secs(60), || async {
        let all = requests.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        Ok((all.iter().filter(|r| r.spec.pod_name == "certs").count() == 2).then_some(()))
    })
    .await;
    let (still, _, _) = files(first.clone())().await.unwrap().expect("the first credentials, still there");
    assert_eq!(still, key, "the old credentials stay until the new ones are issued");
    let second = eventually("the refresh request answered", Duration::from_secs(10), sign("example.com/pods")).await;
    assert_ne!(second.metadata.name, first.metadata.name);
    assert_ne!(second.spec.stub_pkc_s10_request, first.spec.stub_pkc_s10_request, "a new key");
    let (key2, _, _) =
        eventually("the refreshed credentials on the host", Duration::from_secs(30), files(second)).await;
    assert_ne!(key2, key);

    // Denied: told on the pod.
    eventually("the other request", Duration::from_secs(30), sign("example.com/deny")).await;
    vc.warned("default", "denied", "was denied").await;

    // The Secret goes with its pod.
    vc.kubectl_ok(&["delete", "pod", "certs", "--wait"]);
    eventually("the Secret goes with its pod", Duration::from_secs(30), || async {
        Ok(secrets.get_opt(&secret_name).await.map_err(|e| e.to_string())?.is_none().then_some(()))
    })
    .await;
}

/// Waits until the virtual API server refuses a client's token (401).
async fn refused_once_its_pod_is_gone(client: &kube::Client) {
    eventually("the token is refused once its pod is gone", Duration::from_secs(40), || async {
        match client.apiserver_version().await {
            Err(kube::Error::Api(s)) if s.code == 401 => Ok(Some(())),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The claims of a JWT.
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// With the admin's `--token-delivery=annotation` a pod's token is an annotation of its host pod,
/// which its projected volume reads through the downward API, and there is no host Secret for it:
/// bound to the pod, kept through the pod's other updates, renewed in place before it expires
/// (10 minutes, renewed with less than 540 s left: a minute after it was issued), never one the
/// tenant wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_annotation_delivery_a_pods_token_is_its_host_pods_annotation() {
    const TOKEN: &str = "vkube.dev/sa-token";
    let env = TestEnv::start(1).await;
    let args = ["--token-delivery=annotation", "--token-lifetime=10m", "--token-renew-before=540s"];
    let vc = env.virtual_cluster_with("tokann", &args).await;
    vc.kubectl_ok(&["run", "holder", "--image=nginx", &format!("--annotations={TOKEN}=forged")]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/holder", "--timeout=60s"]);
    let host_name = tr(&vc).host_name("default", "holder");
    let pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let token_of = |p: &Pod| p.annotations().get(TOKEN).cloned().unwrap_or_default();
    let h = pods.get(&host_name).await.expect("the host pod");
    let token = token_of(&h);
    assert_eq!(claims(&token)["kubernetes.io"]["pod"]["name"], "holder", "the virtual token, bound to the pod");
    assert_eq!(h.annotations()["vkube.dev.t.vkube.dev/sa-token"], "forged", "the tenant's own key stays its own");
    let volume = h.spec.unwrap().volumes.unwrap().into_iter().find(|v| v.name.starts_with("kube-api-access"));
    let sources = volume.and_then(|v| v.projected).and_then(|p| p.sources).expect("the projected volume");
    let read = sources[0].downward_api.as_ref().and_then(|d| d.items.clone()).expect("a downward API item");
    assert_eq!(read[0].field_ref.as_ref().unwrap().field_path, format!("metadata.annotations['{TOKEN}']"));
    let secrets: Api<Secret> = Api::namespaced(env.client().await, vc.host_namespace());
    assert!(secrets.get_opt(&format!("{host_name}-sa-token")).await.unwrap().is_none(), "no token Secret");
    vc.client_with_token(&token).await.apiserver_version().await.expect("the token works while its pod exists");

    // An update of the pod's annotations (a patch of them all) leaves the token as it is.
    vc.kubectl_ok(&["annotate", "pod", "holder", "team=a"]);
    let annotated = eventually("the annotation on the host pod", Duration::from_secs(30), || async {
        let p = pods.get(&host_name).await.map_err(|e| e.to_string())?;
        Ok(p.annotations().contains_key("t.vkube.dev/team").then_some(p))
    })
    .await;
    assert_eq!(token_of(&annotated), token, "the update kept the token");

    let renewed = eventually("the token renewed in place", Duration::from_secs(150), || async {
        let now = token_of(&pods.get(&host_name).await.map_err(|e| e.to_string())?);
        Ok((now != token).then_some(now))
    })
    .await;
    let (first, second) = (claims(&token), claims(&renewed));
    assert!(second["exp"].as_i64() > first["exp"].as_i64(), "a later token: {first} then {second}");
    assert_eq!(second["exp"].as_i64().unwrap() - second["iat"].as_i64().unwrap(), 600);
    let renewed_client = vc.client_with_token(&renewed).await;
    renewed_client.apiserver_version().await.expect("the renewed token works");
    vc.kubectl_ok(&["delete", "pod", "holder", "--wait"]);
    refused_once_its_pod_is_gone(&renewed_client).await;
}

/// With the admin's `--token-delivery=bound-secret` a pod's token Secret is written once the pod
/// is bound, so its token names the node, as a kubelet's does (the conformance spec on mounted
/// tokens checks it through a TokenReview); a token Secret's name another host object holds
/// keeps the pod off the host, as with `secret` delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bound_secret_delivery_a_pods_token_names_its_node() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster_with("tokbound", &["--token-delivery=bound-secret"]).await;
    vc.kubectl_ok(&["run", "holder", "--image=nginx"]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/holder", "--timeout=60s"]);
    let node = vc.kubectl_ok(&["get", "pod", "holder", "-o", "jsonpath={.spec.nodeName}"]);
    let host_name = tr(&vc).host_name("default", "holder");
    let secrets: Api<Secret> = Api::namespaced(env.client().await, vc.host_namespace());
    let secret = secrets.get(&format!("{host_name}-sa-token")).await.expect("the token Secret");
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    assert_eq!(claims(&token)["kubernetes.io"]["node"]["name"], node.as_str(), "{}", claims(&token));
    let review = TokenReview { spec: TokenReviewSpec { token, ..Default::default() }, ..Default::default() };
    let reviewed = Api::<TokenReview>::all(vc.client().await).create(&Default::default(), &review).await.unwrap();
    let user = reviewed.status.and_then(|s| s.user).expect("authenticated");
    let extra = user.extra.unwrap_or_default();
    assert_eq!(extra.get("authentication.kubernetes.io/node-name"), Some(&vec![node.clone()]), "{extra:?}");
    assert_eq!(extra.get("authentication.kubernetes.io/pod-name"), Some(&vec!["holder".to_string()]));

    let foreign = format!("{}-sa-token", tr(&vc).host_name("default", "taken"));
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {foreign}, namespace: {}}}\nstringData: {{token: host-admins}}\n",
        vc.host_namespace()
    ));
    vc.kubectl_ok(&["run", "taken", "--image=nginx"]);
    let warned = vc.warned("default", "taken", "is not managed by this virtual cluster").await;
    assert_eq!(warned.reason.as_deref(), Some("HostNameConflict"));
    let pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    assert!(pods.get_opt(&tr(&vc).host_name("default", "taken")).await.unwrap().is_none(), "the pod on the host");
    let kept = secrets.get(&foreign).await.unwrap();
    assert_eq!(kept.data.unwrap()["token"].0, b"host-admins", "the foreign Secret is left alone");
}

/// NetworkPolicies: with the admin's `--sync-network-policies` the host copy selects the same
/// pods and peers, confined to this cluster, and follows namespace labels; without it the tenant
/// is told they are not enforced, and nothing reaches the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policies_are_confined_copies_or_reported_as_not_enforced() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let env = TestEnv::start(1).await;
    let admin = vkube::controlplane::PolicyArgs { egress_cidrs: vec!["203.0.113.0/24".into()], ..Default::default() };
    let on = env.virtual_cluster_with_policy("netpol", admin, &["--sync-network-policies"]).await;
    let off = env.virtual_cluster("nonetpol").await;
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: ops}}\n      podSelector: {matchLabels: {role: probe}}\n";
    for vc in [&on, &off] {
        vc.kubectl_ok(&["create", "namespace", "ops"]);
        vc.apply(policy);
    }
    let host_name = tr(&on).host_name("default", "web");
    let api: Api<NetworkPolicy> = Api::namespaced(env.client().await, on.host_namespace());
    let peer = |p: &NetworkPolicy| serde_json::to_value(p).unwrap()["spec"]["ingress"][0]["from"][0].clone();
    let copy_with_namespaces = |want: serde_json::Value| {
        let (api, host_name) = (api.clone(), host_name.clone());
        async move {
            let p = api.get_opt(&host_name).await.map_err(|e| e.to_string())?;
            let got = p.as_ref().map(|p| peer(p)["podSelector"]["matchExpressions"][0]["values"].clone());
            if got.as_ref() == Some(&want) { Ok(Some(p.unwrap())) } else { Err(format!("{got:?}")) }
        }
    };
    // `ops` has no team label yet: the peer matches no namespace.
    eventually("the host copy, its peer matching nothing yet", Duration::from_secs(30), || {
        copy_with_namespaces(serde_json::json!([""]))
    })
    .await;
    on.kubectl_ok(&["label", "namespace", "ops", "team=ops"]);
    let copy = eventually("the copy follows the namespace's new label", Duration::from_secs(30), || {
        copy_with_namespaces(serde_json::json!(["ops"]))
    })
    .await;
    let spec = serde_json::to_value(&copy).unwrap()["spec"].clone();
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        serde_json::json!({"t.vkube.dev/app": "web", LABEL_CLUSTER: "netpol"})
    );
    let peer = peer(&copy);
    assert_eq!(
        peer["podSelector"]["matchLabels"],
        serde_json::json!({"t.vkube.dev/role": "probe", LABEL_CLUSTER: "netpol"})
    );
    assert!(peer.get("namespaceSelector").is_none(), "never another host namespace: {peer}");

    // Egress: a range outside the admin's is narrowed to the admin's ranges inside it, the tenant
    // told by field (it would override the admin's own egress policies for these pods); a rule to
    // every destination means the cluster's pods, its control plane and the admin's ranges.
    on.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: anywhere, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - {}
  - to: [{ipBlock: {cidr: 203.0.113.0/28}}]
"#,
    );
    on.warned("default", "anywhere", "spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"0.0.0.0/0\"").await;
    let anywhere = api.get(&tr(&on).host_name("default", "anywhere")).await.unwrap();
    assert_eq!(
        serde_json::to_value(&anywhere).unwrap()["spec"]["egress"][0]["to"],
        serde_json::json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}]),
        "narrowed to the admin's range"
    );
    let out = eventually("the egress policy's host copy", Duration::from_secs(30), || async {
        api.get_opt(&tr(&on).host_name("default", "out")).await.map_err(|e| e.to_string())
    })
    .await;
    let egress = serde_json::to_value(&out).unwrap()["spec"]["egress"].clone();
    assert_eq!(
        egress[0]["to"],
        serde_json::json!([
            {"podSelector": {"matchLabels": {LABEL_CLUSTER: "netpol"}}},
            {"podSelector": {"matchLabels": {"vkube.dev/control-plane": "netpol"}}},
            {"ipBlock": {"cidr": "203.0.113.0/24"}},
        ]),
        "every destination: what the cluster may reach"
    );
    assert_eq!(egress[1]["to"], serde_json::json!([{"ipBlock": {"cidr": "203.0.113.0/28"}}]));
    on.kubectl_ok(&["delete", "networkpolicy", "anywhere", "out"]);

    eventually("the tenant without the sync is told", Duration::from_secs(30), || async {
        let w = warnings(&off, "default", "web").await;
        Ok(w.iter().any(|e| e.reason.as_deref() == Some("NotEnforced")).then_some(()))
    })
    .await;
    assert!(host_names::<NetworkPolicy>(&env, &off).await.is_empty(), "nothing on the host without the sync");

    on.kubectl_ok(&["delete", "networkpolicy", "web"]);
    eventually("the host copy goes with it", Duration::from_secs(30), || async {
        Ok(host_names::<NetworkPolicy>(&env, &on).await.is_empty().then_some(()))
    })
    .await;
}

/// The host copy of a cluster's one `db` pod (label `app=db`), once it runs.
async fn db_host_pod(vc: &VirtualCluster, host: &kube::Client) -> String {
    eventually("the db pod's host copy running", Duration::from_secs(60), || async {
        let vpods: Api<Pod> = Api::namespaced(vc.client().await, "default");
        let list = vpods.list(&ListParams::default().labels("app=db")).await.map_err(|e| e.to_string())?;
        let Some(name) = list.items.first().map(|p| p.name_any()) else { return Ok(None) };
        let hpods: Api<Pod> = Api::namespaced(host.clone(), vc.host_namespace());
        let h = hpods.get_opt(&tr(vc).host_name("default", &name)).await.map_err(|e| e.to_string())?;
        Ok(h.filter(running_with_ip).map(|h| h.name_any()))
    })
    .await
}

/// PodDisruptionBudgets: with the admin's `--sync-pod-disruption-budgets` the host copy guards
/// the host copies of the tenant's pods, so a host eviction (a drain) that would break the budget
/// is refused; without it the tenant is told, nothing reaches the host and the eviction goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruption_budgets_guard_host_evictions_or_are_reported_as_not_enforced() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let env = TestEnv::start(1).await;
    let on = env.virtual_cluster_with("pdb", &["--sync-pod-disruption-budgets"]).await;
    let off = env.virtual_cluster("nopdb").await;
    let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: db}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: db, image: postgres}]}\n---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: db}\nspec:\n  minAvailable: 1\n  selector: {matchLabels: {app: db}}\n";
    for vc in [&on, &off] {
        vc.apply(yaml);
    }
    let host = env.client().await;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(host.clone(), on.host_namespace());
    let host_name = tr(&on).host_name("default", "db");
    let copy = eventually("the host budget counts the pod", Duration::from_secs(60), || async {
        let b = budgets.get_opt(&host_name).await.map_err(|e| e.to_string())?;
        Ok(b.filter(|b| {
            b.status.as_ref().is_some_and(|s| s.current_healthy == Some(1) && s.disruptions_allowed == Some(0))
        }))
    })
    .await;
    let selector = serde_json::to_value(&copy.spec.unwrap().selector).unwrap();
    assert_eq!(selector["matchLabels"], serde_json::json!({"t.vkube.dev/app": "db", LABEL_CLUSTER: "pdb"}));

    // A drain's eviction: refused on the host while the tenant's budget would break.
    let on_pod = db_host_pod(&on, &host).await;
    // (kubectl: the kube-rs client asks again after every 429, for minutes.)
    let evict = |ns: &str, pod: &str| {
        let eviction = serde_json::json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}});
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}/eviction");
        let out = vkube_e2e::kubectl_stdin(
            &env.upstream,
            &env.host.kubeconfig,
            &["create", "--raw", &path, "-f", "-"],
            &eviction.to_string(),
        );
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (evicted, said) = evict(on.host_namespace(), &on_pod);
    assert!(!evicted && said.contains("disruption budget"), "the eviction of {on_pod}: {said}");

    eventually("the tenant without the sync is told", Duration::from_secs(30), || async {
        let w = warnings(&off, "default", "db").await;
        Ok(w.iter().any(|e| e.reason.as_deref() == Some("NotEnforced")).then_some(()))
    })
    .await;
    assert!(host_names::<PodDisruptionBudget>(&env, &off).await.is_empty(), "nothing on the host without the sync");
    let off_pod = db_host_pod(&off, &host).await;
    let (evicted, said) = evict(off.host_namespace(), &off_pod);
    assert!(evicted, "no budget on the host, the eviction goes on: {said}");

    on.kubectl_ok(&["delete", "pdb", "db"]);
    eventually("the host copy goes with it", Duration::from_secs(30), || async {
        Ok(host_names::<PodDisruptionBudget>(&env, &on).await.is_empty().then_some(()))
    })
    .await;
}

/// Ingresses: with the admin's classes and host names, the host copy routes to the host copies
/// of the tenant's Service under an allowed class, carries its TLS Secret and only the
/// annotations the admin made verbatim, and the controller's address flows back; a host name,
/// class or catch-all outside the policy is refused by field, and without classes the tenant is
/// told nothing serves its Ingress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_reach_the_host_only_within_the_admins_classes_and_host_names() {
    use k8s_openapi::api::networking::v1::Ingress;
    let env = TestEnv::start(1).await;
    // The host's classes: two the admin lists (the host's default not first) and one it does not.
    env.apply(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: internal, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\n\
         spec: {controller: example.com/internal, parameters: {apiGroup: example.com, kind: Settings, name: host-only}}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: web}\nspec: {controller: example.com/web}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: public}\nspec: {controller: example.com/public}\n",
    );
    let on = env
        .virtual_cluster_with(
            "ingress",
            &[
                "--ingress-classes=web,internal",
                "--ingress-hosts=*.team-a.example.com,internal=*.corp.example.com",
                // The class annotation made verbatim by mistake: the class is still the spec's.
                "--verbatim-keys=nginx.ingress.kubernetes.io/rewrite-target,kubernetes.io/ingress.class",
            ],
        )
        .await;
    let off = env.virtual_cluster("noingress").await;
    let tr = tr(&on);
    let ingress = |name: &str, spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    nginx.ingress.kubernetes.io/rewrite-target: /\n    nginx.ingress.kubernetes.io/configuration-snippet: 'return 200 owned;'\n    kubernetes.io/ingress.class: public\nspec:\n{spec}"
        )
    };
    // The port by name: the host copy names it by number.
    let web = "  tls: [{hosts: [api.team-a.example.com], secretName: api-tls}]\n  rules:\n  - host: api.team-a.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {name: http}}}}]}\n";
    on.apply("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n");
    on.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: api-tls, namespace: default}\ntype: kubernetes.io/tls\nstringData: {tls.crt: cert, tls.key: key}\n");
    on.apply(&ingress("web", web));
    off.apply(&ingress("web", web));

    let host = env.client().await;
    let api: Api<Ingress> = Api::namespaced(host.clone(), on.host_namespace());
    let copy = eventually("the host copy of the Ingress", Duration::from_secs(30), || async {
        api.get_opt(&tr.host_name("default", "web")).await.map_err(|e| e.to_string())
    })
    .await;
    let spec = serde_json::to_value(&copy).unwrap()["spec"].clone();
    assert_eq!(spec["ingressClassName"], "web", "the admin's first class, none being named");
    // The listed classes the host has are shown, without parameters, the admin's first as the
    // default: the virtual API server gives it to an Ingress naming none, as its host copy gets.
    eventually("the listed host IngressClasses shown", Duration::from_secs(30), || async {
        let out = on.kubectl(&[
            "get",
            "ingressclass",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.controller} {.spec.parameters} {.metadata.annotations.ingressclass\\.kubernetes\\.io/is-default-class};{end}",
        ]);
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == "internal example.com/internal  ;web example.com/web  true;" { Ok(Some(())) } else { Err(got) }
    })
    .await;
    assert_eq!(off.kubectl_ok(&["get", "ingressclass", "-o", "name"]), "", "none listed, none shown");
    // (Without the legacy class annotation, which the virtual API server would take as a class.)
    on.apply(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: plain, namespace: default}\nspec:\n  rules:\n  - host: plain.example.org\n    \
         http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {number: 80}}}}]}\n",
    );
    let class = on.kubectl_ok(&["get", "ingress", "plain", "-o", "jsonpath={.spec.ingressClassName}"]);
    assert_eq!(class, "web", "the virtual default is the class the host copy would get");
    on.warned("default", "plain", "spec.rules[0].host: \"plain.example.org\" is not among").await;
    let backend = &spec["rules"][0]["http"]["paths"][0]["backend"]["service"];
    assert_eq!(backend["name"], tr.host_name("default", "api"), "the host copy of the Service");
    assert_eq!(backend["port"], serde_json::json!({"number": 80}), "by number, never a tenant's port name");
    assert_eq!(spec["tls"][0]["secretName"], tr.host_name("default", "api-tls"));
    let annotations = copy.annotations();
    assert_eq!(annotations["nginx.ingress.kubernetes.io/rewrite-target"], "/", "a verbatim key");
    assert!(
        !annotations.contains_key("nginx.ingress.kubernetes.io/configuration-snippet"),
        "no other key reaches the controller: {annotations:?}"
    );
    let inert = tr.host_key("nginx.ingress.kubernetes.io/configuration-snippet");
    assert!(
        inert.contains("t.vkube.dev/") && annotations.contains_key(&inert),
        "under the tenant domain: {annotations:?}"
    );
    assert!(!annotations.contains_key("kubernetes.io/ingress.class"), "never a class but the spec's: {annotations:?}");
    let secrets: Api<Secret> = Api::namespaced(host.clone(), on.host_namespace());
    eventually("the TLS Secret on the host, the Ingress using it", Duration::from_secs(30), || async {
        secrets.get_opt(&tr.host_name("default", "api-tls")).await.map_err(|e| e.to_string())
    })
    .await;

    // The host's ingress controller gives the copy an address: the tenant sees it.
    let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    let pp = kube::api::PatchParams::default();
    api.patch_status(&copy.name_any(), &pp, &kube::api::Patch::Merge(&status)).await.unwrap();
    let vingresses: Api<Ingress> = Api::namespaced(on.client().await, "default");
    eventually("the address in the virtual Ingress's status", Duration::from_secs(30), || async {
        let v = vingresses.get("web").await.map_err(|e| e.to_string())?;
        let lb = v.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).unwrap_or_default();
        Ok(lb.first().and_then(|i| i.ip.clone()).filter(|ip| ip == "192.0.2.10"))
    })
    .await;

    // The controller's address goes: so does the tenant's.
    let gone = serde_json::json!({"status": {"loadBalancer": {"ingress": null}}});
    api.patch_status(&copy.name_any(), &pp, &kube::api::Patch::Merge(&gone)).await.unwrap();
    eventually("the address cleared from the virtual Ingress", Duration::from_secs(30), || async {
        let v = vingresses.get("web").await.map_err(|e| e.to_string())?;
        let lb = v.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).unwrap_or_default();
        Ok(lb.is_empty().then_some(()))
    })
    .await;

    // Outside the policy: refused by field, nothing on the host.
    on.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: elsewhere, namespace: default}\nspec: {ports: [{port: 80}]}\n",
    );
    let sneak = "  tls: [{secretName: api-tls}]\n  rules:\n  - host: b.team-a.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: elsewhere, port: {number: 80}}}}]}\n";
    on.apply(&ingress("sneak", sneak));
    let steal = "  rules:\n  - host: login.team-b.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {number: 80}}}}]}\n";
    on.apply(&ingress("steal", steal));
    let catch_all = "  ingressClassName: public\n  defaultBackend: {service: {name: api, port: {number: 80}}}\n";
    on.apply(&ingress("catch-all", catch_all));
    // A name the admin holds for the internal class, asked for on the default (public) one.
    let publish = "  rules:\n  - host: wiki.corp.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {number: 80}}}}]}\n";
    on.apply(&ingress("publish", publish));
    let warned = on.warned("default", "steal", "spec.rules[0].host: \"login.team-b.example.com\"").await;
    assert_eq!(warned.reason.as_deref(), Some("IngressNotAllowed"));
    let warned = on.warned("default", "catch-all", "spec.defaultBackend").await;
    assert!(warned.message.unwrap_or_default().contains("spec.ingressClassName: \"public\""));
    on.warned("default", "sneak", "spec.tls[0].hosts: required here").await;
    on.warned("default", "publish", "spec.rules[0].host: \"wiki.corp.example.com\" is not among").await;
    let unknown_port = "  rules:\n  - host: c.team-a.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {name: nope}}}}]}\n";
    on.apply(&ingress("unknown-port", unknown_port));
    on.warned("default", "unknown-port", "backend.service.port.name: Service default/api has no port named \"nope\"")
        .await;
    // Within the policy but for its backend: a Service whose addresses the tenant writes. Its TLS
    // Secret is not copied for nothing.
    on.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: sneak-tls, namespace: default}\ntype: kubernetes.io/tls\nstringData: {tls.crt: cert, tls.key: key}\n");
    let sneak_tls = "  tls: [{hosts: [b.team-a.example.com], secretName: sneak-tls}]\n";
    on.apply(&ingress("sneak", &sneak.replace("  tls: [{secretName: api-tls}]\n", sneak_tls)));
    let warned = on.warned("default", "sneak", "Service default/elsewhere has no selector").await;
    assert_eq!(warned.reason.as_deref(), Some("BackendNotAllowed"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sneak_secret = tr.host_name("default", "sneak-tls");
    assert!(secrets.get_opt(&sneak_secret).await.unwrap().is_none(), "no TLS Secret for a refused Ingress");
    eventually("the tenant without ingress classes is told", Duration::from_secs(30), || async {
        let w = warnings(&off, "default", "web").await;
        Ok(w.iter().any(|e| e.reason.as_deref() == Some("NotServed")).then_some(()))
    })
    .await;
    assert!(host_names::<Ingress>(&env, &off).await.is_empty(), "nothing on the host without classes");
    let names = host_names::<Ingress>(&env, &on).await;
    assert_eq!(names, [tr.host_name("default", "web")].into(), "only the allowed Ingress");
    // Its backend becomes a Service that selects pods: the Ingress and its Secret reach the host.
    on.kubectl_ok(&["patch", "service", "elsewhere", "-p", r#"{"spec":{"selector":{"app":"b"}}}"#]);
    eventually("the Ingress whose backend became allowed, with its TLS Secret", Duration::from_secs(30), || async {
        let there = host_names::<Ingress>(&env, &on).await.contains(&tr.host_name("default", "sneak"))
            && secrets.get_opt(&sneak_secret).await.map_err(|e| e.to_string())?.is_some();
        Ok(there.then_some(()))
    })
    .await;

    on.kubectl_ok(&["delete", "ingress", "web"]);
    eventually("the copy and its TLS Secret go with it", Duration::from_secs(30), || async {
        let gone = !host_names::<Ingress>(&env, &on).await.contains(&tr.host_name("default", "web"))
            && secrets.get_opt(&tr.host_name("default", "api-tls")).await.map_err(|e| e.to_string())?.is_none();
        Ok(gone.then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_to_zero_and_deleting_leave_nothing_behind() {
    let env = TestEnv::start(2).await;
    let vc = env.virtual_cluster("gone").await;
    vc.kubectl_ok(&["create", "namespace", "shop"]);
    vc.kubectl_ok(&["-n", "shop", "create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    vc.kubectl_ok(&["-n", "shop", "expose", "deployment", "web", "--port=80"]);
    vc.kubectl_ok(&["-n", "shop", "create", "configmap", "c", "--from-literal=a=b"]);
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: user, namespace: shop}\nspec:\n  containers: [{name: c, image: nginx, envFrom: [{configMapRef: {name: c}}]}]\n");
    let in_shop = |names: BTreeSet<String>| names.into_iter().filter(|n| n.contains("-x-shop-x-")).collect::<Vec<_>>();
    eventually("everything of shop is on the host", Duration::from_secs(30), || async {
        let pods = in_shop(host_names::<Pod>(&env, &vc).await);
        let svcs = in_shop(host_names::<Service>(&env, &vc).await);
        let cms = in_shop(host_names::<ConfigMap>(&env, &vc).await);
        Ok((pods.len() == 3 && svcs.len() == 1 && cms.len() >= 2).then_some(()))
    })
    .await;

    vc.kubectl_ok(&["-n", "shop", "scale", "deployment", "web", "--replicas=0"]);
    eventually("scaled to zero on the host", Duration::from_secs(30), || async {
        let pods = in_shop(host_names::<Pod>(&env, &vc).await);
        if pods.len() == 1 { Ok(Some(())) } else { Err(format!("{pods:?}")) }
    })
    .await;

    // A Job's pod evicted here, whose pod failure policy ignores disruptions, is replaced: once
    // its host copy is gone the syncer gives it a terminal phase, as a kubelet gives a pod it
    // stopped, which the Job controller waits for before it lets the pod go.
    vc.apply("apiVersion: batch/v1\nkind: Job\nmetadata: {name: batch, namespace: shop}\nspec:\n  backoffLimit: 0\n  podFailurePolicy:\n    rules: [{action: Ignore, onPodConditions: [{type: DisruptionTarget}]}]\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: c, image: busybox}]\n");
    let vpods: Api<Pod> = Api::namespaced(vc.client().await, "shop");
    let job_pods = || async {
        let list = vpods.list(&ListParams::default().labels("job-name=batch")).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(list.items)
    };
    let first = eventually("the Job's pod running", Duration::from_secs(30), || async {
        let pods = job_pods().await?;
        Ok(pods.into_iter().find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await
    .name_any();
    vpods.evict(&first, &Default::default()).await.unwrap();
    let replaced = |gone: String| {
        let job_pods = &job_pods;
        async move {
            eventually("the evicted pod gone and replaced", Duration::from_secs(60), || async {
                let pods = job_pods().await?;
                let running =
                    pods.iter().find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
                match running {
                    Some(p) if p.name_any() != gone && !pods.iter().any(|p| p.name_any() == gone) => {
                        Ok(Some(p.name_any()))
                    }
                    _ => Err(format!("{:?}", pods.iter().map(|p| p.name_any()).collect::<Vec<_>>())),
                }
            })
            .await
        }
    };
    let second = replaced(first).await;
    // Evicted on the host (a drain there): a disruption too, not a failure the Job counts (its
    // backoff limit is 0: one counted failure fails it and nothing replaces the pod).
    let host_pods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    host_pods.evict(&vc.translator().host_name("shop", &second), &Default::default()).await.unwrap();
    replaced(second).await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(vc.client().await, "shop");
    let failed = jobs.get_status("batch").await.unwrap().status.and_then(|s| s.failed).unwrap_or(0);
    assert_eq!(failed, 0, "no eviction counted as a failure");

    vc.kubectl_ok(&["delete", "namespace", "shop", "--timeout=90s"]);
    eventually("nothing of shop is left on the host", Duration::from_secs(60), || async {
        let mut left = in_shop(host_names::<Pod>(&env, &vc).await);
        left.extend(in_shop(host_names::<Service>(&env, &vc).await));
        left.extend(in_shop(host_names::<ConfigMap>(&env, &vc).await));
        left.extend(in_shop(host_names::<Secret>(&env, &vc).await));
        if left.is_empty() { Ok(Some(())) } else { Err(format!("left: {left:?}")) }
    })
    .await;
    eventually("the virtual node that hosted nothing any more is gone", Duration::from_secs(30), || async {
        let nodes: Api<Node> = Api::all(vc.client().await);
        let n = nodes.list(&Default::default()).await.map_err(|e| e.to_string())?.items.len();
        // Only CoreDNS's node remains.
        if n <= 1 { Ok(Some(())) } else { Err(format!("{n} virtual nodes")) }
    })
    .await;
}

/// A virtual node the tenant labelled (or tainted, or cordoned) stays once its pods are gone, as a
/// node of its own would, so a Deployment scaled to zero and back still finds it; the others go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_tenant_labelled_stays_without_pods() {
    let env = TestEnv::start(2).await;
    let vc = env.virtual_cluster("keep").await;
    vc.kubectl_ok(&["-n", "kube-system", "scale", "deployment", "coredns", "--replicas=0"]);
    vc.kubectl_ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    vc.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let node = vc.kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].spec.nodeName}"]);
    vc.kubectl_ok(&["label", "node", &node, "disk=ssd"]);
    vc.kubectl_ok(&["scale", "deployment", "web", "--replicas=0"]);
    let nodes: Api<Node> = Api::all(vc.client().await);
    eventually("the nodes without pods or marks gone, the labelled one kept", Duration::from_secs(90), || async {
        let names = vkube_e2e::sorted_names(&nodes).await?;
        if names == [node.clone()] { Ok(Some(())) } else { Err(format!("{names:?}")) }
    })
    .await;
    // Past the grace a new node gets (30 s from its creation, looked at again when it ends): a
    // node without marks is gone by now.
    let created = nodes.get(&node).await.unwrap().metadata.creation_timestamp.unwrap().0;
    let age = Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(created)).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(35).saturating_sub(age) + Duration::from_secs(3)).await;
    let kept = nodes.get_opt(&node).await.unwrap().expect("the labelled node stays");
    assert_eq!(kept.labels().get("disk").map(String::as_str), Some("ssd"));
    vc.kubectl_ok(&["run", "on-ssd", "--image=nginx", "--overrides={\"spec\":{\"nodeSelector\":{\"disk\":\"ssd\"}}}"]);
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/on-ssd", "--timeout=60s"]);
    let on = vc.kubectl_ok(&["get", "pod", "on-ssd", "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(on, node, "the selecting pod runs on the labelled node");
    // Unmarked and unused again: it goes.
    vc.kubectl_ok(&["delete", "pod", "on-ssd", "--wait"]);
    vc.kubectl_ok(&["label", "node", &node, "disk-"]);
    eventually("the node goes once unmarked and unused", Duration::from_secs(60), || async {
        Ok(nodes.get_opt(&node).await.map_err(|e| e.to_string())?.is_none().then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_object_that_is_not_ours_is_never_touched() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("clash").await;
    let tr = tr(&vc);
    let host_name = tr.host_name("default", "victim");
    // Someone else's pod and configmap in the host namespace, under the names we would use.
    env.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {host_name}, namespace: {ns}, labels: {{owner: someone-else}}}}\nspec:\n  containers: [{{name: c, image: busybox}}]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {cm}, namespace: {ns}}}\ndata: {{owner: someone-else}}\n",
        ns = vc.host_namespace(),
        cm = tr.host_name("default", "victim-config"),
    ));
    // Once the host has scheduled and started it, only a write of ours would change it.
    let hpods: Api<Pod> = Api::namespaced(env.client().await, vc.host_namespace());
    let before: Pod = eventually("the foreign pod runs", Duration::from_secs(30), || async {
        let p = hpods.get(&host_name).await.map_err(|e| e.to_string())?;
        Ok(running_with_ip(&p).then_some(p))
    })
    .await;
    vc.kubectl_ok(&["create", "configmap", "victim-config", "--from-literal=owner=tenant"]);
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: victim}\nspec:\n  containers: [{name: c, image: nginx, envFrom: [{configMapRef: {name: victim-config}}]}]\n");
    eventually("the tenant is told about the collision", Duration::from_secs(30), || async {
        let w = warnings(&vc, "default", "victim").await;
        Ok(w.iter().any(|e| e.reason.as_deref() == Some("HostNameConflict")).then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Pod = Api::namespaced(env.client().await, vc.host_namespace()).get(&host_name).await.unwrap();
    assert_eq!(before.metadata.uid, after.metadata.uid, "not replaced");
    assert_eq!(before.metadata.resource_version, after.metadata.resource_version, "not modified");
    let cm: ConfigMap = Api::namespaced(env.client().await, vc.host_namespace())
        .get(&tr.host_name("default", "victim-config"))
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["owner"], "someone-else", "the foreign configmap keeps its content");

    // Deleting the virtual pod does not delete the foreign host pod either.
    vc.kubectl_ok(&["delete", "pod", "victim", "--timeout=60s"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still: Pod = Api::namespaced(env.client().await, vc.host_namespace()).get(&host_name).await.unwrap();
    assert_eq!(still.metadata.uid, before.metadata.uid);
    assert!(still.metadata.deletion_timestamp.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_workloads_are_refused_with_a_clear_message_and_never_reach_the_host() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("strict").await;
    let pods = [
        ("privileged", "containers: [{name: c, image: nginx, securityContext: {privileged: true}}]", "privileged"),
        (
            "hostpath",
            "containers: [{name: c, image: nginx}]\n  volumes: [{name: root, hostPath: {path: /}}]",
            "hostPath",
        ),
        ("hostnetwork", "hostNetwork: true\n  containers: [{name: c, image: nginx}]", "hostNetwork"),
        ("hostpid", "hostPID: true\n  containers: [{name: c, image: nginx}]", "hostPID"),
        ("hostipc", "hostIPC: true\n  containers: [{name: c, image: nginx}]", "hostIPC"),
        (
            "sysadmin",
            "containers: [{name: c, image: nginx, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]",
            "SYS_ADMIN",
        ),
    ];
    // Through the proxy: refused at once, with the API server's Pod Security message.
    for (name, spec, _) in pods {
        let out = vc.try_apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(stderr.contains("violates PodSecurity"), "{name}: {stderr}");
    }
    let np = vc.kubectl(&["create", "service", "nodeport", "np", "--tcp=80"]);
    let stderr = String::from_utf8_lossy(&np.stderr);
    assert!(!np.status.success() && stderr.contains("NodePort services are not allowed"), "{stderr}");

    // A tenant is cluster-admin and may lift Pod Security in its own namespace: the syncer
    // still refuses at the host boundary and says why.
    vc.kubectl_ok(&["create", "namespace", "open"]);
    vc.kubectl_ok(&["label", "namespace", "open", "pod-security.kubernetes.io/enforce=privileged"]);
    for (name, spec, _) in pods {
        vc.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: open}}\nspec:\n  {spec}\n"));
    }
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: fine, namespace: open}\nspec:\n  containers: [{name: c, image: nginx}]\n");
    for (name, _, needle) in pods {
        let w = eventually(&format!("a Warning event on {name}"), Duration::from_secs(30), || async {
            let w = warnings(&vc, "open", name).await;
            Ok(w.into_iter().find(|e| e.reason.as_deref() == Some("PodSecurity")))
        })
        .await;
        assert!(w.message.as_deref().unwrap_or_default().contains(needle), "{name}: {:?}", w.message);
    }
    // The ordinary pod in the same namespace did sync, so the refusals were not a stalled syncer.
    let tr = tr(&vc);
    eventually("the ordinary pod runs on the host", Duration::from_secs(30), || async {
        Ok(host_names::<Pod>(&env, &vc).await.contains(&tr.host_name("open", "fine")).then_some(()))
    })
    .await;
    // A privileged debug container added later is refused too, and the host copy keeps none.
    vc.kubectl_ok(&[
        "-n",
        "open",
        "debug",
        "fine",
        "--image=busybox",
        "--container=dbg",
        "--profile=sysadmin",
        "--",
        "sleep",
        "1",
    ]);
    eventually("a Warning event about the ephemeral container", Duration::from_secs(30), || async {
        let w = warnings(&vc, "open", "fine").await;
        Ok(w.into_iter().find(|e| e.message.as_deref().unwrap_or_default().contains("ephemeralContainer \"dbg\"")))
    })
    .await;
    let host_fine: Pod =
        Api::namespaced(env.client().await, vc.host_namespace()).get(&tr.host_name("open", "fine")).await.unwrap();
    assert!(
        host_fine.spec.unwrap().ephemeral_containers.is_none(),
        "the privileged debug container stayed off the host"
    );
    let on_host = host_names::<Pod>(&env, &vc).await;
    for (name, _, _) in pods {
        assert!(!on_host.contains(&tr.host_name("open", name)), "{name} reached the host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_virtual_clusters_with_the_same_names_stay_apart() {
    let env = TestEnv::start(2).await;
    let (a, b) = (env.virtual_cluster("alpha").await, env.virtual_cluster("beta").await);
    for vc in [&a, &b] {
        vc.kubectl_ok(&["create", "secret", "generic", "db", &format!("--from-literal=owner={}", vc.name())]);
        vc.apply(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: c, image: nginx, env: [{name: OWNER, valueFrom: {secretKeyRef: {name: db, key: owner}}}]}]\n",
        );
        vc.kubectl_ok(&["expose", "deployment", "web", "--port=80"]);
    }
    let ips = |vc: &VirtualCluster| {
        let out = vc.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect::<BTreeSet<_>>()
    };
    let (ips_a, ips_b) = eventually("both deployments run", Duration::from_secs(45), || async {
        let (x, y) = (ips(&a), ips(&b));
        Ok((x.len() == 2 && y.len() == 2).then_some((x, y)))
    })
    .await;
    assert!(ips_a.is_disjoint(&ips_b));

    // Each Service selects only its own cluster's pods, on the host too.
    for (vc, own, other) in [(&a, &ips_a, &ips_b), (&b, &ips_b, &ips_a)] {
        let host_svc = tr(vc).host_name("default", "web");
        let got = eventually("host endpoints of web", Duration::from_secs(30), || async {
            let out = env.kubectl(&[
                "-n",
                vc.host_namespace(),
                "get",
                "endpoints",
                &host_svc,
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ]);
            let got: BTreeSet<String> =
                String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
            Ok((got.len() == 2).then_some(got))
        })
        .await;
        assert_eq!(&got, own, "{} selects its own pods", vc.name());
        assert!(got.is_disjoint(other));
        // Each mounts its own secret.
        let secret: Secret = Api::namespaced(env.client().await, vc.host_namespace())
            .get(&tr(vc).host_name("default", "db"))
            .await
            .unwrap();
        assert_eq!(secret.data.unwrap()["owner"].0, vc.name().as_bytes());
        // Each proxy reaches only its own pods: a name of the other cluster's host pod is not a
        // pod of this virtual cluster.
        let other_vc = if vc.name() == "alpha" { &b } else { &a };
        let other_host_pod = other_vc.host_list::<Pod>(&env).await.into_iter().next().unwrap().name_any();
        let out = vc.kubectl(&["logs", &other_host_pod]);
        assert!(!out.status.success(), "{} reached {other_host_pod}", vc.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_exec_and_port_forward_reach_the_pods_host_copy() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("dbg").await;
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: app, labels: {run: app}}\nspec:\n  containers: [{name: app, image: nginx, resources: {requests: {cpu: 100m}, limits: {cpu: 200m}}}]\n");
    let host_pod = tr(&vc).host_name("default", "app");
    // This pod's own log content, served by kwok only for its host copy.
    let log = env.dir().join("app.log");
    std::fs::write(&log, format!("2026-01-01T00:00:00.000000000Z stdout F hello from {host_pod}\n")).unwrap();
    env.apply(&format!(
        "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Logs\nmetadata: {{name: {host_pod}, namespace: {ns}}}\nspec:\n  logs: [{{logsFile: {file}, follow: true}}]\n",
        ns = vc.host_namespace(),
        file = log.display()
    ));
    vc.kubectl_ok(&["wait", "--for=condition=Ready", "pod/app", "--timeout=60s"]);
    let logs = eventually("kubectl logs shows the host copy's log", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["logs", "app"]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(s.contains(&host_pod).then_some(s))
    })
    .await;
    assert!(logs.contains(&format!("hello from {host_pod}")));
    assert_eq!(vc.kubectl_ok(&["exec", "app", "--", "echo", "exec-ok"]).trim(), "exec-ok");

    // `kubectl debug`: the ephemeral container reaches the host copy, translated like the others.
    vc.kubectl_ok(&["debug", "app", "--image=busybox", "--container=dbg", "--profile=baseline", "--", "sleep", "1000"]);
    let host_pod_fields = |jsonpath: &str| {
        let out =
            env.kubectl(&["-n", vc.host_namespace(), "get", "pod", &host_pod, "-o", &format!("jsonpath={jsonpath}")]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    eventually("the ephemeral container reaches the host pod", Duration::from_secs(30), || async {
        let got = host_pod_fields(
            "{.spec.ephemeralContainers[0].name} {.spec.ephemeralContainers[0].env[?(@.name==\"KUBERNETES_SERVICE_HOST\")].value}",
        );
        if got.starts_with("dbg 10.") { Ok(Some(())) } else { Err(got) }
    })
    .await;

    // Changes Kubernetes allows after creation reach the host copy.
    vc.kubectl_ok(&["set", "image", "pod/app", "app=nginx:1.27"]);
    vc.kubectl_ok(&["label", "pod", "app", "tier=web"]);
    vc.kubectl_ok(&[
        "patch",
        "pod",
        "app",
        "--subresource=resize",
        "-p",
        r#"{"spec":{"containers":[{"name":"app","resources":{"requests":{"cpu":"150m"},"limits":{"cpu":"300m"}}}]}}"#,
    ]);
    eventually("the new image, label and resources reach the host pod", Duration::from_secs(30), || async {
        let got = host_pod_fields(
            "{.spec.containers[0].image} {.metadata.labels.t\\.vkube\\.dev/tier} {.spec.containers[0].resources}",
        );
        if got == r#"nginx:1.27 web {"limits":{"cpu":"300m"},"requests":{"cpu":"150m"}}"# {
            Ok(Some(()))
        } else {
            Err(got)
        }
    })
    .await;

    vkube_e2e::port_forward_echoes(&env.upstream, &vc.kubeconfig(), "pod/app", 80, b"through the proxy\n");
}

/// The control-plane process is killed in the middle of a burst of pod creations and
/// deletions; once restarted the host converges to exactly the virtual state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_burst_converges_with_no_orphans_and_no_duplicates() {
    let env = TestEnv::start(3).await;
    let mut vc = env.virtual_cluster("crash").await;
    vc.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: burst}\nspec:\n  replicas: 200\n  selector: {matchLabels: {app: burst}}\n  template:\n    metadata: {labels: {app: burst}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers: [{name: c, image: nginx}]\n",
    );
    // Let the burst get going (host copies made, some virtual pods bound to their nodes: the host
    // write bucket may hold the rest back), then kill the syncer mid-flight.
    let vpods: Api<Pod> = Api::namespaced(vc.client().await, "default");
    eventually("the burst reaches the host and binds back", Duration::from_secs(60), || async {
        let n = vc.host_list::<Pod>(&env).await.len();
        let list = vpods.list(&ListParams::default().labels("app=burst")).await.map_err(|e| e.to_string())?.items;
        let bound = list.iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()).count();
        Ok((n >= 40 && bound >= 10).then_some(()))
    })
    .await;
    vc.kill_controller();
    // While it is down: scale down (graceful deletions pile up) and force-delete a few pods
    // (their host copies become orphans).
    // (The proxy is down with it, so straight to the virtual API server.)
    vc.kubectl_direct_ok(&["scale", "deployment", "burst", "--replicas=120"]);
    // Bound pods that the scale-down is not deleting (it removes unbound pods at once).
    let names = vc.kubectl_direct_ok(&[
        "get",
        "pods",
        "-l",
        "app=burst",
        "-o",
        "jsonpath={range .items[?(@.spec.nodeName)]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    let victims: Vec<&str> = names
        .lines()
        .filter(|l| l.split_whitespace().count() == 1)
        .filter_map(|l| l.split_whitespace().next())
        .take(5)
        .collect();
    assert!(!victims.is_empty(), "no bound pod to force-delete: {names}");
    let mut args = vec!["delete", "pod", "--grace-period=0", "--force", "--ignore-not-found"];
    args.extend(victims.iter().copied());
    vc.kubectl_direct_ok(&args);
    vc.start_controller().await;

    let tr = tr(&vc);
    let vpods: Api<Pod> = Api::namespaced(vc.client().await, "default");
    eventually("host pods are exactly the virtual ones, all Running", Duration::from_secs(180), || async {
        let virtual_pods =
            vpods.list(&ListParams::default().labels("app=burst")).await.map_err(|e| e.to_string())?.items;
        let want: BTreeSet<String> = virtual_pods.iter().map(|p| tr.host_name("default", &p.name_any())).collect();
        let host = vc.host_list::<Pod>(&env).await;
        let got: BTreeSet<String> =
            host.iter().filter(|p| p.name_any().contains("burst")).map(|p| p.name_any()).collect();
        let running = virtual_pods.iter().filter(|p| running_with_ip(p)).count();
        if virtual_pods.len() == 120 && want == got && running == 120 {
            Ok(Some(()))
        } else {
            Err(format!(
                "virtual {} ({running} running), host {}, only on host {}, missing on host {}",
                virtual_pods.len(),
                got.len(),
                got.difference(&want).count(),
                want.difference(&got).count()
            ))
        }
    })
    .await;
    // Every host pod mirrors the current incarnation of its virtual pod: no duplicates.
    let virtual_uids: BTreeMap<String, String> = vpods
        .list(&ListParams::default().labels("app=burst"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.metadata.uid.unwrap()))
        .collect();
    for hp in vc.host_list::<Pod>(&env).await.into_iter().filter(|p| p.name_any().contains("burst")) {
        let owner = tr.owner(&hp.metadata).unwrap();
        assert_eq!(
            virtual_uids.get(&owner.name),
            Some(&owner.uid),
            "host pod {} mirrors the live virtual pod",
            hp.name_any()
        );
    }
}

/// Claims, endpoints of selector-less Services (addresses in the admin's range or of the
/// cluster's own pods cross, others are refused), the host classes the admin lists (storage,
/// priority), host events and the syncer's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_selectorless_endpoints_classes_events_and_metrics() {
    let env = TestEnv::start(1).await;
    // A priority the admin offers tenants, and a higher one it does not.
    env.apply(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: batch, labels: {team: platform}}\nvalue: 1000\npreemptionPolicy: Never\ndescription: batch jobs\n---\n\
         apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: unlisted}\nvalue: 900000\n---\n\
         apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: gvisor}\nhandler: runsc\noverhead: {podFixed: {memory: 64Mi}}\n\
         scheduling: {nodeSelector: {sandbox.example.com/runsc: \"true\"}}\n",
    );
    // A host class of volumes that can grow, one volume of it, and a listed class the host lacks.
    env.apply(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: grow}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
allowVolumeExpansion: true
parameters: {secret-name: host-only}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: grow-1}
spec:
  storageClassName: grow
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce]
  hostPath: {path: /tmp/grow-1}
"#,
    );
    let policy = vkube::controlplane::PolicyArgs {
        endpoint_cidrs: vec!["192.0.2.0/24".into()],
        // (Two hundred more the host lacks, read before the PriorityClasses at each pass of the
        // host's classes: the first pass takes a while.)
        storage_classes: ["grow".to_string(), "absent".into()]
            .into_iter()
            .chain((0..200).map(|i| format!("absent-{i}")))
            .collect(),
        priority_classes: vec!["batch".into(), "absent".into()],
        runtime_classes: vec!["gvisor".into()],
        ..Default::default()
    };
    let mut vc = env.virtual_cluster_with_policy("kinds", policy, &[]).await;
    // Ready means the listed classes are shown: the listed PriorityClass is there at once, and
    // after a restart during which the tenant deleted it, a pod naming it is admitted by the
    // virtual API server as soon as the control plane is ready again (a dry run: its admission,
    // nothing made).
    vc.kubectl_ok(&["get", "priorityclass", "batch", "-o", "name"]);
    vc.kill_controller();
    vc.kubectl_direct_ok(&["delete", "priorityclass", "batch"]);
    vc.start_controller().await;
    let early = r#"--overrides={"spec": {"priorityClassName": "batch"}}"#;
    vc.kubectl_ok(&["run", "early", "--image=nginx", "--dry-run=server", early]);
    let tr = tr(&vc);
    vc.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Service
metadata: {name: external-db}
spec:
  ports: [{port: 5432, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: external-db}
subsets:
- addresses: [{ip: 192.0.2.10}, {ip: 192.0.2.11}]
  ports: [{port: 5432, protocol: TCP}]
"#,
    );
    vc.kubectl_ok(&["run", "web", "--image=nginx"]);
    let hclient = env.client().await;
    let hns = vc.host_namespace().to_string();

    let ep = tr.host_name("default", "external-db");
    eventually("selector-less endpoints are on the host", Duration::from_secs(30), || async {
        let out = env.kubectl(&["-n", &hns, "get", "endpoints", &ep, "-o", "jsonpath={.subsets[*].addresses[*].ip}"]);
        Ok((String::from_utf8_lossy(&out.stdout) == "192.0.2.10 192.0.2.11").then_some(()))
    })
    .await;

    // A claim no pod uses costs the host nothing; once a pod uses it, it is provisioned and kept.
    let pvc = tr.host_name("default", "data");
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = Api::namespaced(hclient.clone(), &hns);
    assert!(claims.get_opt(&pvc).await.unwrap().is_none(), "an unused claim reached the host");
    vc.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: uses-data}\nspec:\n  containers: [{name: c, image: nginx}]\n  volumes: [{name: d, persistentVolumeClaim: {claimName: data}}]\n");
    eventually("the claim is on the host once a pod uses it", Duration::from_secs(30), || async {
        let out = env.kubectl(&["-n", &hns, "get", "pvc", &pvc, "-o", "jsonpath={.spec.resources.requests.storage}"]);
        Ok((String::from_utf8_lossy(&out.stdout) == "1Gi").then_some(()))
    })
    .await;
    vc.kubectl_ok(&["delete", "pod", "uses-data", "--wait=false"]);
    let hpods: Api<Pod> = Api::namespaced(hclient.clone(), &hns);
    let user = tr.host_name("default", "uses-data");
    eventually("the claim's pod is gone from the host", Duration::from_secs(30), || async {
        Ok(hpods.get_opt(&user).await.map_err(|e| e.to_string())?.is_none().then_some(()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(claims.get_opt(&pvc).await.unwrap().is_some(), "a used claim is kept (its data with it)");
    let svc: Service = Api::namespaced(hclient.clone(), &hns).get(&ep).await.unwrap();
    assert_eq!(svc.spec.unwrap().selector, None, "the host copy selects nothing either");

    // A claim binds any free volume of its class: one naming no class (volumes made by hand) or a
    // class the admin did not list is refused by field, and its pod's claim is not made.
    vc.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: by-hand}
spec:
  storageClassName: ""
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: premium}
spec:
  storageClassName: premium-ssd
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: uses-others}
spec:
  containers: [{name: c, image: nginx}]
  volumes:
  - {name: a, persistentVolumeClaim: {claimName: by-hand}}
  - {name: b, persistentVolumeClaim: {claimName: premium}}
"#,
    );
    vc.warned("default", "by-hand", "spec.storageClassName: \"\" (no class)").await;
    vc.warned("default", "premium", "spec.storageClassName: \"premium-ssd\" is not one the platform admin allows")
        .await;
    for name in ["by-hand", "premium"] {
        assert!(claims.get_opt(&tr.host_name("default", name)).await.unwrap().is_none(), "{name} reached the host");
    }

    // The listed classes the host has are shown in the virtual cluster, without their parameters.
    eventually("the host's class is shown", Duration::from_secs(30), || async {
        let out = vc.kubectl(&[
            "get",
            "storageclass",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.provisioner} {.allowVolumeExpansion} {.parameters};{end}",
        ]);
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == "grow kubernetes.io/no-provisioner true ;" { Ok(Some(())) } else { Err(got) }
    })
    .await;
    // The listed PriorityClass the host has is shown, never as the default. A pod naming it gets
    // the host's priority there; a pod naming a class of the tenant's own that has the name of
    // an unlisted host class runs at the host's default, and the tenant is told.
    eventually("the listed host PriorityClass is shown", Duration::from_secs(30), || async {
        let out = vc.kubectl(&[
            "get",
            "priorityclass",
            &format!("--selector={}=true", vkube_core::contract::LABEL_FROM_HOST),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.value} {.preemptionPolicy} {.globalDefault} {.description};{end}",
        ]);
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == "batch 1000 Never  batch jobs;" { Ok(Some(())) } else { Err(got) }
    })
    .await;
    // The listed RuntimeClass is shown without its node scheduling (the host adds that to the host
    // copy), so a pod asking for it is admitted here.
    eventually("the listed host RuntimeClass is shown", Duration::from_secs(30), || async {
        let out = vc.kubectl(&[
            "get",
            "runtimeclass",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.handler} {.overhead.podFixed.memory} {.scheduling};{end}",
        ]);
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == "gvisor runsc 64Mi ;" { Ok(Some(())) } else { Err(got) }
    })
    .await;
    vc.apply(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: unlisted}\nvalue: 1000000000\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: batch-job}\nspec:\n  priorityClassName: batch\n  runtimeClassName: gvisor\n  containers: [{name: c, image: nginx}]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: sneaky}\nspec:\n  priorityClassName: unlisted\n  containers: [{name: c, image: nginx}]\n---\n\
         apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: absent}\nvalue: 5\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: listed-but-absent}\nspec:\n  priorityClassName: absent\n  containers: [{name: c, image: nginx}]\n",
    );
    let priority = |pod: &'static str| {
        let name = tr.host_name("default", pod);
        let hpods = &hpods;
        async move {
            eventually(&format!("{pod} on the host"), Duration::from_secs(30), || async {
                let p = hpods.get_opt(&name).await.map_err(|e| e.to_string())?;
                Ok(p.and_then(|p| p.spec).map(|s| (s.priority_class_name, s.priority, s.preemption_policy)))
            })
            .await
        }
    };
    assert_eq!(priority("batch-job").await, (Some("batch".into()), Some(1000), Some("Never".into())));
    // It runs under the listed RuntimeClass there, with the host class's node scheduling.
    let host_job = env.kubectl_ok(&[
        "-n",
        &hns,
        "get",
        "pod",
        &tr.host_name("default", "batch-job"),
        "-o",
        "jsonpath={.spec.runtimeClassName} {.spec.overhead.memory} {.spec.nodeSelector}",
    ]);
    assert_eq!(host_job, r#"gvisor 64Mi {"sandbox.example.com/runsc":"true"}"#);
    assert_eq!(priority("sneaky").await, (None, Some(0), Some("PreemptLowerPriority".into())));
    // Listed, but the host has no such class (it would refuse the pod): dropped, and told.
    assert_eq!(priority("listed-but-absent").await, (None, Some(0), Some("PreemptLowerPriority".into())));
    vc.warned(
        "default",
        "listed-but-absent",
        "spec.priorityClassName \"absent\" (listed by the platform admin, but the host has no such class)",
    )
    .await;
    vc.warned("default", "sneaky", "spec.priorityClassName \"unlisted\" (the host runs the pod at its default priority; classes the platform admin offers: batch, absent)").await;
    // The tenant's copy is not changed by the syncer (only what it made is), and the copy the
    // tenant deletes comes back with the volume view below.
    vc.kubectl_ok(&["delete", "priorityclass", "batch"]);

    // A claim bound on the host (which filled in its volume) follows the tenant's label, and
    // grows: the virtual API server allows it since its copy of the class does.
    vc.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: grows}
spec:
  storageClassName: grow
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: uses-grows}
spec:
  containers: [{name: c, image: nginx}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: grows}}]
"#,
    );
    let grows = tr.host_name("default", "grows");
    let host_claim = |path: &str| {
        let out =
            env.kubectl(&["-n", &hns, "get", "pvc", &grows, "--ignore-not-found", "-o", &format!("jsonpath={path}")]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    eventually("the claim is bound on the host and in the virtual cluster", Duration::from_secs(60), || async {
        let virtual_phase = vc.kubectl(&["get", "pvc", "grows", "-o", "jsonpath={.status.phase}"]);
        let got = (
            host_claim("{.spec.volumeName} {.status.phase}"),
            String::from_utf8_lossy(&virtual_phase.stdout).to_string(),
        );
        if got == ("grow-1 Bound".into(), "Bound".into()) { Ok(Some(())) } else { Err(format!("{got:?}")) }
    })
    .await;
    // Bound in the virtual cluster too, to a view of the host volume (no source of it shown).
    eventually("the virtual claim is bound to the host volume's view", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["get", "pvc", "grows", "-o", "jsonpath={.spec.volumeName}"]);
        Ok((String::from_utf8_lossy(&out.stdout) == "grow-1").then_some(()))
    })
    .await;
    let view = vc.kubectl_ok(&[
        "get",
        "pv",
        "grow-1",
        "-o",
        "jsonpath={.status.phase} {.spec.capacity.storage} {.spec.claimRef.namespace}/{.spec.claimRef.name} {.spec.csi.driver} {.spec.hostPath}",
    ]);
    assert_eq!(view, "Bound 5Gi default/grows host.vkube.dev ", "the view of the host volume");
    // A view the tenant deletes comes back at the from_host loop's next pass (every minute).
    vc.kubectl_ok(&["delete", "pv", "grow-1", "--wait=false"]);
    // (Held by pv-protection while Bound; gone at once if not.)
    vc.kubectl(&["patch", "pv", "grow-1", "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
    eventually("the deleted view made again", Duration::from_secs(130), || async {
        let out = vc.kubectl(&["get", "pv", "grow-1", "-o", "jsonpath={.status.phase} {.metadata.deletionTimestamp}"]);
        Ok((String::from_utf8_lossy(&out.stdout) == "Bound ").then_some(()))
    })
    .await;
    let classes = vc.kubectl_ok(&[
        "get",
        "priorityclass",
        "batch",
        "unlisted",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.value};{end}",
    ]);
    assert_eq!(classes, "batch 1000;unlisted 1000000000;", "the deleted copy made again, the tenant's own untouched");
    vc.kubectl_ok(&["label", "pvc", "grows", "tier=gold"]);
    // Only a virtual scheduler's choice of node reaches the host (this cluster has none).
    vc.kubectl_ok(&["annotate", "pvc", "grows", "volume.kubernetes.io/selected-node=elsewhere"]);
    vc.kubectl_ok(&["patch", "pvc", "grows", "-p", r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#]);
    eventually("the bound host claim is labelled and grown", Duration::from_secs(30), || async {
        let got = host_claim("{.metadata.labels} {.spec.resources.requests.storage}");
        if got.contains("gold") && got.ends_with(" 2Gi") { Ok(Some(())) } else { Err(got) }
    })
    .await;
    // An update the host refuses (its quota on storage) is told to the tenant.
    env.apply(&format!(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: storage, namespace: {hns}}}\nspec:\n  hard: {{requests.storage: 3Gi}}\n"
    ));
    eventually("the host quota counts the claims", Duration::from_secs(30), || async {
        let out = env.kubectl(&[
            "-n",
            &hns,
            "get",
            "resourcequota",
            "storage",
            "-o",
            "jsonpath={.status.used.requests\\.storage}",
        ]);
        Ok((String::from_utf8_lossy(&out.stdout) == "3Gi").then_some(()))
    })
    .await;
    vc.kubectl_ok(&["patch", "pvc", "grows", "-p", r#"{"spec":{"resources":{"requests":{"storage":"4Gi"}}}}"#]);
    vc.warned("default", "grows", "exceeded quota").await;
    assert_eq!(host_claim("{.spec.resources.requests.storage}"), "2Gi");
    let annotations = host_claim("{.metadata.annotations}");
    assert!(!annotations.contains("t.vkube.dev/bind-completed"), "the virtual binding marks stay there: {annotations}");
    assert!(!annotations.contains("elsewhere"), "a node named by the tenant stays there: {annotations}");
    // The view goes with its claim.
    vc.kubectl_ok(&["delete", "pod", "uses-grows", "--wait=false"]);
    vc.kubectl_ok(&["delete", "pvc", "grows", "--wait=false"]);
    eventually("the view is gone with its claim", Duration::from_secs(30), || async {
        let out = vc.kubectl(&["get", "pv", "-o", "name"]);
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got.is_empty() { Ok(Some(())) } else { Err(got) }
    })
    .await;

    // The modern form: an EndpointSlice the tenant manages for a selector-less Service.
    vc.apply(vkube_e2e::SELECTORLESS_SERVICE_WITH_SLICE);
    let slice = tr.host_name("default", "cache-1");
    let cache = tr.host_name("default", "cache");
    eventually(
        "the tenant's EndpointSlice is on the host, pointing at the host Service",
        Duration::from_secs(30),
        || async {
            let out = env.kubectl(&[
                "-n",
                &hns,
                "get",
                "endpointslice",
                &slice,
                "-o",
                "jsonpath={.metadata.labels.kubernetes\\.io/service-name} {.endpoints[*].addresses[*]}",
            ]);
            let got = String::from_utf8_lossy(&out.stdout).to_string();
            if got == format!("{cache} 192.0.2.20") { Ok(Some(())) } else { Err(got) }
        },
    )
    .await;

    // The host scheduler's event about the host copy shows on the virtual pod, names translated.
    let scheduled = eventually("the Scheduled event is mirrored", Duration::from_secs(30), || async {
        let api: Api<Event> = Api::namespaced(vc.client().await, "default");
        let list =
            api.list(&ListParams::default().fields("involvedObject.name=web")).await.map_err(|e| e.to_string())?;
        Ok(list.items.into_iter().find(|e| e.reason.as_deref() == Some("Scheduled")))
    })
    .await;
    let message = scheduled.message.unwrap_or_default();
    assert!(message.contains("default/web") && !message.contains("-x-"), "{message}");

    // Addresses outside the admin's range that are no pod of the cluster (another tenant's pods,
    // the host's nodes) are refused, whole, with the field named; a slice of FQDNs too.
    vc.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: elsewhere}
spec:
  ports: [{port: 443, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: elsewhere}
subsets:
- addresses: [{ip: 192.0.2.12}]
  notReadyAddresses: [{ip: 198.51.100.7}]
  ports: [{port: 443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: elsewhere-1
  labels: {kubernetes.io/service-name: elsewhere, endpointslice.kubernetes.io/managed-by: tenant}
addressType: IPv4
endpoints: [{addresses: [192.0.2.13]}, {addresses: [198.51.100.8]}]
ports: [{port: 443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: elsewhere-2
  labels: {kubernetes.io/service-name: elsewhere, endpointslice.kubernetes.io/managed-by: tenant}
addressType: FQDN
endpoints: [{addresses: [kubernetes.default.svc.cluster.local]}]
ports: [{port: 443, protocol: TCP}]
"#,
    );
    vc.warned("default", "elsewhere", "subsets[0].notReadyAddresses[0].ip: Invalid value: \"198.51.100.7\"").await;
    vc.warned("default", "elsewhere-1", "endpoints[1].addresses[0]: Invalid value: \"198.51.100.8\"").await;
    vc.warned("default", "elsewhere-2", "addressType: Unsupported value: \"FQDN\"").await;
    for (kind, name) in [("endpoints", "elsewhere"), ("endpointslice", "elsewhere-1"), ("endpointslice", "elsewhere-2")]
    {
        let host_name = tr.host_name("default", name);
        let out = env.kubectl(&["-n", &hns, "get", kind, &host_name, "--ignore-not-found", "-o", "name"]);
        assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{kind} {name} reached the host");
    }

    // One of the cluster's own pods, as the host reports it, crosses (named from another
    // namespace too); once that pod is gone, the address is nobody's of this cluster and the
    // host copy goes.
    let web_ip = eventually("the pod's address", Duration::from_secs(30), || async {
        let p: Pod = Api::namespaced(vc.client().await, "default").get("web").await.map_err(|e| e.to_string())?;
        Ok(p.status.and_then(|s| s.pod_ip))
    })
    .await;
    vc.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: other}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: to-web, namespace: other}}\nspec:\n  ports: [{{port: 80, protocol: TCP}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: to-web, namespace: other}}\nsubsets:\n- addresses: [{{ip: {web_ip}}}]\n  \
         ports: [{{port: 80, protocol: TCP}}]\n"
    ));
    let to_web = tr.host_name("other", "to-web");
    let endpoints_ip = || {
        env.kubectl(&[
            "-n",
            &hns,
            "get",
            "endpoints",
            &to_web,
            "--ignore-not-found",
            "-o",
            "jsonpath={.subsets[*].addresses[*].ip}",
        ])
    };
    eventually("an own pod's address crosses", Duration::from_secs(30), || async {
        Ok((String::from_utf8_lossy(&endpoints_ip().stdout) == web_ip).then_some(()))
    })
    .await;
    vc.kubectl_ok(&["delete", "pod", "web", "--wait=false"]);
    eventually("the endpoints of a pod gone leave the host", Duration::from_secs(30), || async {
        Ok(endpoints_ip().stdout.is_empty().then_some(()))
    })
    .await;
    vc.warned("other", "to-web", &format!("Invalid value: \"{web_ip}\"")).await;

    let metrics = vc.kubectl_ok(&["get", "--raw", "/metrics"]);
    let created = metrics
        .lines()
        .find(|l| {
            l.starts_with("vkube_syncer_synced_total{")
                && l.contains("kind=\"Pod\"")
                && l.contains("operation=\"create\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(created >= 1.0, "pod creations are counted:\n{metrics}");
    for family in [
        "vkube_syncer_sync_latency_seconds",
        "vkube_syncer_queue_depth",
        "vkube_syncer_initial_sync_seconds",
        "vkube_proxy_requests_total",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
}
