//! The API proxy: paths, headers, bodies and credentials a hostile client sends.
//!
//! Two clusters: one for what a request can reach (paths, subresources, identity headers, bodies,
//! Service creation), one for load (random bearer tokens, silent connections).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde_json::json;
use vkube_e2e::{TestEnv, VirtualCluster, eventually};

use super::common::{tr, warned};

/// One request through the proxy with `client`'s credentials: the status and the body as text.
/// A GET is sent again once if its connection fails: the client's pool may hand out a connection
/// the server closed after refusing an earlier upload before reading it (hyper's IncompleteMessage).
async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String) {
    match try_raw(client, method, path, headers, body.clone()).await {
        Err(e) if method == "GET" && format!("{e:?}").contains("IncompleteMessage") => {
            eprintln!("GET {path}: {e}; sending it again on a new connection");
            try_raw(client, method, path, headers, body).await.expect("a request to the proxy")
        }
        result => result.expect("a request to the proxy"),
    }
}

/// [`raw`], where the connection may be closed before the whole body is sent (refused early).
async fn try_raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, String), kube::Error> {
    let mut req = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.send(req.body(kube::client::Body::from(body)).unwrap()).await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect_bytes().await.map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok((code, body.unwrap_or_else(|e| format!("<body: {e}>"))))
}

/// A client of the proxy without credentials whose connections come from `local` (another
/// loopback address: another client machine, as the proxy sees it); the status of a GET of
/// `path` with `token`.
struct ClientFrom {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Empty<bytes::Bytes>,
    >,
    server: String,
}

impl ClientFrom {
    fn new(vc: &VirtualCluster, local: std::net::IpAddr) -> Self {
        let kc = kube::config::Kubeconfig::read_from(vc.kubeconfig()).expect("admin kubeconfig");
        let ca = kc.clusters[0].cluster.as_ref().and_then(|c| c.certificate_authority_data.clone()).expect("CA data");
        let pem = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca).expect("base64 CA");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots.add(cert.expect("a CA certificate")).expect("a usable CA");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_local_address(Some(local));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        ClientFrom { client, server: vc.proxy_address() }
    }

    async fn get(&self, path: &str, token: &str) -> u16 {
        let req = http::Request::get(format!("https://{}{path}", self.server))
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let res = self.client.request(req).await.expect("a request to the proxy");
        res.status().as_u16()
    }
}

/// A ServiceAccount `name` in `default` bound to `view` (no secrets), and a token for it.
fn low_privilege_token(vc: &VirtualCluster, name: &str) -> String {
    vc.kubectl_ok(&["create", "serviceaccount", name]);
    vc.kubectl_ok(&[
        "create",
        "rolebinding",
        &format!("{name}-view"),
        "--clusterrole=view",
        &format!("--serviceaccount=default:{name}"),
    ]);
    vc.kubectl_ok(&["create", "token", name]).trim().to_string()
}

/// Counts TCP connections to a local port: where the tenant points its node, service and pod
/// addresses. Nothing may ever connect.
async fn tenant_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (port, dials)
}

fn assert_status(case: &str, (code, body): &(u16, String), want: u16, needle: &str) {
    assert_eq!(*code, want, "{case}: {body}");
    assert!(body.contains(needle), "{case}: {needle:?} not in {body}");
}

/// The host's service range as (first address, size).
async fn host_range(env: &TestEnv) -> (Ipv4Addr, u32) {
    let cidr = vkube::local::host_service_cidr(&env.client().await).await.expect("host service CIDR");
    let (base, bits) = cidr.split_once('/').expect("a CIDR");
    (base.parse().expect("an IPv4 range"), 1 << (32 - bits.parse::<u32>().expect("prefix")))
}

fn nth(base: Ipv4Addr, n: u32) -> String {
    Ipv4Addr::from(u32::from(base) + n).to_string()
}

fn service_json(name: &str, cluster_ip: Option<&str>) -> Vec<u8> {
    let mut spec = json!({"ports": [{"port": 80, "protocol": "TCP"}]});
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip);
    }
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}))
        .unwrap()
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
const SERVICES: &str = "/api/v1/namespaces/default/services";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_request_reaches_through_the_proxy() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("hostile-proxy").await;
    let tr = tr(&vc);
    let host = env.client().await;
    let host_services: Api<Service> = Api::namespaced(host.clone(), vc.host_namespace());
    let admin = vc.client().await;
    let (port, dials) = tenant_listener().await;

    // The tenant's own node, pod and service, all pointing at an address it chose.
    vc.apply(&format!(
        r#"
apiVersion: v1
kind: Node
metadata: {{name: evil}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  nodeName: evil
  containers: [{{name: app, image: busybox}}]
---
apiVersion: v1
kind: Service
metadata: {{name: cache}}
spec:
  ports: [{{port: {port}, protocol: TCP}}]
"#
    ));
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    vc.kubectl_ok(&["patch", "node", "evil", "--subresource=status", "--type=merge", "-p", &status.to_string()]);

    // --- Paths: what the proxy routes on is what the API server reads.
    // As kubectl sends them (WebSocket upgrades), so that the virtual API server, reached, would
    // dial the node's kubelet at once.
    let websocket: &[(&str, &str)] = &[
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-protocol", "v5.channel.k8s.io"),
    ];
    for (case, path) in [
        (
            "encoded exec is the virtual API server's exec",
            "/api/v1/namespaces/default/pods/web/%65xec?command=id&container=app&stdout=true",
        ),
        ("encoded attach", "/api/v1/namespaces/default/pods/web/%61ttach?container=app&stdout=true"),
        ("encoded portforward", "/api/v1/namespaces/default/pods/web/port%66orward?ports=80"),
        ("encoded log is the proxy's own log", "/api/v1/namespaces/default/pods/web/%6cog?container=app"),
    ] {
        let headers = if case.contains("log") { &[][..] } else { websocket };
        // Exec, attach and port-forward go to the virtual API server, which dials the node's
        // kubelet through the egress proxy: only its own kubelet port is served (by vkube), any
        // other address the tenant gave is refused there (exec and attach over WebSocket are
        // upgraded first, their dial failing inside the stream). Logs are the proxy's own.
        let (code, body) = try_raw(&admin, "GET", path, headers, vec![]).await.expect(case);
        let refused = format!("while dialing 127.0.0.1:{port}, code 403");
        match case {
            c if c.contains("log") => {
                assert!(code == 200 && body.contains("simulated container log"), "{case}: {code} {body}")
            }
            c if c.contains("portforward") => assert!(body.contains(&refused), "{case}: {code} {body}"),
            _ => assert!(code == 101 || body.contains(&refused), "{case}: {code} {body}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(dials.load(Ordering::SeqCst), 0, "{case}: an API server dialed the node address the tenant chose");
    }
    for (case, path) in [
        ("encoded slash", "/api/v1/namespaces/default/pods/web%2Fexec?command=id"),
        ("dot segments", "/api/v1/namespaces/default/pods/web/exec/../../../../nodes/evil/proxy/configz"),
        ("encoded dot segments", "/api/v1/namespaces/default/pods/%2e%2e/%2e%2e/nodes/evil/proxy"),
        ("double slash", "/api/v1/namespaces/default/pods//web/exec"),
    ] {
        assert_status(case, &raw(&admin, "GET", path, &[], vec![]).await, 400, "request path");
    }
    for (case, path) in
        [("node proxy", "/api/v1/nodes/evil/proxy/configz"), ("node proxy, encoded", "/api/v1/nodes/evil/pr%6Fxy/pods")]
    {
        assert_status(case, &raw(&admin, "GET", path, &[], vec![]).await, 403, "proxy subresource is not served");
    }
    // A selector-less Service's endpoints are addresses the tenant wrote: never proxied.
    let service_proxy = format!("/api/v1/namespaces/default/services/cache:{port}/proxy/");
    assert_status("service proxy", &raw(&admin, "GET", &service_proxy, &[], vec![]).await, 403, "with a selector");
    // A pod is proxied by the host API server to its host copy's address (the host's choice),
    // never to the node address or pod status the tenant wrote.
    for (case, path) in [
        ("pod proxy", "/api/v1/namespaces/default/pods/web/proxy/"),
        ("pod proxy with a port", &format!("/api/v1/namespaces/default/pods/web:{port}/proxy/metrics")),
    ] {
        // Simulated nodes run no container: the host API server may wait a long time for the
        // host pod's address to answer; what matters is who it dials.
        let asked = tokio::time::timeout(Duration::from_secs(10), try_raw(&admin, "GET", path, &[], vec![])).await;
        if let Ok(Ok((code, body))) = asked {
            assert!(!(200..300).contains(&code), "{case}: {code} {body}");
        }
    }
    let kubectl_proxy = vc.kubectl(&["get", "--raw", "/api/v1/nodes/evil/proxy/healthz"]);
    assert!(!kubectl_proxy.status.success(), "kubectl get --raw node proxy");
    // An exec or log for a container the pod does not have never reaches the host.
    assert_status(
        "exec into a container not in the pod's spec",
        &raw(&admin, "POST", "/api/v1/namespaces/default/pods/web/exec?command=id&container=sidecar", &[], vec![])
            .await,
        400,
        "container sidecar is not valid for pod web",
    );
    assert_status(
        "two containers in one request",
        &raw(&admin, "GET", "/api/v1/namespaces/default/pods/web/log?container=app&container=x", &[], vec![]).await,
        400,
        "more than once",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dials.load(Ordering::SeqCst), 0, "an API server dialed the address the tenant chose");

    // --- Identity: headers a client sends never make it someone else.
    let token = low_privilege_token(&vc, "low");
    let low = vc.client_with_token(&token).await;
    let forged: &[(&str, &str)] =
        &[("x-remote-user", "system:admin"), ("x-remote-group", "system:masters"), ("x-remote-extra-scopes", "all")];
    let who = "system:serviceaccount:default:low";
    assert_status(
        "forged front-proxy headers, listing secrets",
        &raw(&low, "GET", "/api/v1/namespaces/default/secrets", forged, vec![]).await,
        403,
        who,
    );
    assert_status(
        "forged front-proxy headers, pod exec",
        &raw(&low, "POST", "/api/v1/namespaces/default/pods/web/exec?command=id&container=app", forged, vec![]).await,
        403,
        who,
    );
    assert_status(
        "Impersonate-User without the right",
        &raw(&low, "GET", "/api/v1/namespaces/default/secrets", &[("impersonate-user", "vkube-admin")], vec![]).await,
        403,
        "impersonate",
    );
    assert_status(
        "Impersonate-Group system:masters without the right, pod log",
        &raw(
            &low,
            "GET",
            "/api/v1/namespaces/default/pods/web/log",
            &[("impersonate-user", "vkube-admin"), ("impersonate-group", "system:masters")],
            vec![],
        )
        .await,
        403,
        "cannot impersonate",
    );
    let (code, body) = raw(&low, "GET", "/api/v1/namespaces/default/pods", forged, vec![]).await;
    assert_eq!(code, 200, "the token keeps what RBAC gives it: {body}");

    // --- Service creation: a dry run writes nothing to the host, not even briefly.
    let before = host_services.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let out = vc.kubectl(&["create", "svc", "clusterip", "dry", "--tcp=80", "--dry-run=server"]);
    assert!(out.status.success(), "kubectl create --dry-run=server: {}", String::from_utf8_lossy(&out.stderr));
    let (code, body) =
        raw(&admin, "POST", &format!("{SERVICES}?dryRun=All"), JSON, service_json("dry-raw", None)).await;
    assert_eq!(code, 201, "a raw dry run: {body}");
    let (code, body) =
        raw(&admin, "POST", &format!("{SERVICES}?fieldManager=x&dry%52un=All"), JSON, service_json("dry-enc", None))
            .await;
    assert_eq!(code, 201, "an encoded dryRun: {body}");
    let dry_names: Vec<String> = ["dry", "dry-raw", "dry-enc"].iter().map(|n| tr.host_name("default", n)).collect();
    let mut events = host_services.watch(&WatchParams::default().timeout(3), &before).await.unwrap().boxed();
    while let Some(ev) = events.next().await {
        if let Ok(WatchEvent::Added(s) | WatchEvent::Modified(s) | WatchEvent::Deleted(s)) = ev {
            let name = s.metadata.name.unwrap_or_default();
            assert!(!dry_names.contains(&name), "a dry run wrote host Service {name}");
        }
    }
    for name in ["dry", "dry-raw", "dry-enc"] {
        assert!(vc.kubectl(&["get", "svc", name]).status.code() != Some(0), "dry run {name} was created");
    }

    // Bodies the proxy cannot read are refused, not forwarded unchecked.
    for (case, content_type, body, needle) in [
        ("not JSON", "application/json", &b"{\"kind\": \"Service\", "[..], "not a Service in JSON"),
        ("protobuf", "application/vnd.kubernetes.protobuf", &b"k8s\0\n\x02v1"[..], "not a Service in protobuf"),
        ("CBOR", "application/cbor", &b"\xa0"[..], "must be JSON, YAML or protobuf"),
    ] {
        let answer = raw(&admin, "POST", SERVICES, &[("content-type", content_type)], body.to_vec()).await;
        assert_status(case, &answer, 400, needle);
    }
    // Refused once 1 MiB is read: the client may see its write cut off rather than the 413.
    match try_raw(&admin, "POST", SERVICES, JSON, vec![b' '; 10 << 20]).await {
        Ok(answer) => assert_status("a 10 MiB Service", &answer, 413, "over 1 MiB"),
        Err(e) => eprintln!("a 10 MiB Service: the connection closed while sending ({e})"),
    }
    let (_, metrics) = raw(&admin, "GET", "/metrics", &[], vec![]).await;
    assert!(metrics.contains(r#"vkube_proxy_requests_total{route="create_service",code="413"} 1"#), "{metrics}");

    // ClusterIPs: none of the host's well-known addresses, nothing outside the range, nothing taken.
    let (base, size) = host_range(&env).await;
    let host_kubernetes = Api::<Service>::namespaced(host.clone(), "default").get("kubernetes").await.unwrap();
    let host_kubernetes_ip = host_kubernetes.spec.unwrap().cluster_ip.unwrap();
    let other_ip = nth(base, size * 3 / 4);
    env.kubectl_ok(&["create", "namespace", "other-tenant"]);
    env.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: taken, namespace: other-tenant}}\nspec: {{clusterIP: {other_ip}, ports: [{{port: 80}}]}}\n"
    ));
    for (case, name, ip, needle) in [
        ("the DNS-style address", "squat-dns", nth(base, 10), "spec.clusterIP"),
        ("the host kubernetes Service's", "squat-api", host_kubernetes_ip.clone(), "spec.clusterIP"),
        ("outside the range", "squat-out", "192.0.2.10".to_string(), "spec.clusterIP"),
        ("another tenant's", "squat-other", other_ip.clone(), "already allocated"),
    ] {
        let (code, body) = raw(&admin, "POST", SERVICES, JSON, service_json(name, Some(&ip))).await;
        assert_eq!(code, 422, "{case} ({ip}): {body}");
        assert!(body.contains(needle) && body.contains(&ip), "{case}: {body}");
        assert!(host_services.get_opt(&tr.host_name("default", name)).await.unwrap().is_none(), "{case}: host Service");
        assert!(vc.kubectl(&["get", "svc", name]).status.code() != Some(0), "{case}: virtual Service");
    }
    // kubectl sends protobuf: read and checked all the same.
    let out = vc.kubectl(&[
        "create",
        "svc",
        "clusterip",
        "squat-kubectl",
        "--tcp=80",
        &format!("--clusterip={}", nth(base, 10)),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("spec.clusterIP"), "kubectl --clusterip: {stderr}");
    assert!(host_services.get_opt(&tr.host_name("default", "squat-kubectl")).await.unwrap().is_none());
    // A server-side apply can create a Service without a POST: checked the same way.
    let apply = |name: &str, ip: Option<String>| {
        let ip = ip.map(|ip| format!("clusterIP: {ip}, ")).unwrap_or_default();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{{ip}ports: [{{port: 80, protocol: TCP}}]}}\n"
        );
        vkube_e2e::kubectl_stdin(&env.upstream, &vc.kubeconfig(), &["apply", "--server-side", "-f", "-"], &yaml)
    };
    let out = apply("squat-apply", Some(nth(base, 10)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("spec.clusterIP"), "kubectl apply --server-side: {stderr}");
    assert!(vc.kubectl(&["get", "svc", "squat-apply"]).status.code() != Some(0), "the applied squat exists");
    let out = apply("applied", None);
    assert!(out.status.success(), "a plain server-side apply: {}", String::from_utf8_lossy(&out.stderr));
    // A PUT creates a Service the proxy does not read (as a tenant's mutating webhook could set
    // its address): the syncer checks it, lets the host choose, and the virtual Service follows.
    let squat_ip = nth(base, 10);
    let (code, body) =
        raw(&admin, "PUT", &format!("{SERVICES}/squat-put"), JSON, service_json("squat-put", Some(&squat_ip))).await;
    assert_eq!(code, 201, "a create by PUT: {body}");
    warned(&vc, "default", "squat-put", "reserved for the host's own").await;
    let host_ip = eventually("the PUT Service's host copy", Duration::from_secs(30), || async {
        let h = host_services.get_opt(&tr.host_name("default", "squat-put")).await.map_err(|e| e.to_string())?;
        Ok(h.and_then(|h| h.spec?.cluster_ip))
    })
    .await;
    assert_ne!(host_ip, squat_ip, "the host copy took the reserved address");
    let virtual_ip =
        eventually("the virtual Service following the host's address", Duration::from_secs(30), || async {
            // Absent for a moment while it is recreated with the host's address.
            let out = vc.kubectl(&["get", "svc", "squat-put", "-o", "jsonpath={.spec.clusterIP}"]);
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((v == host_ip).then_some(v))
        })
        .await;
    assert_eq!(virtual_ip, host_ip);
    let taken = Api::<Service>::namespaced(host.clone(), "other-tenant").get("taken").await.unwrap();
    assert_eq!(taken.spec.unwrap().cluster_ip.as_deref(), Some(other_ip.as_str()), "the other tenant's Service");
    // A free address above the static band is the tenant's to choose, on both sides.
    let free_ip = nth(base, size * 5 / 8);
    let (code, body) = raw(&admin, "POST", SERVICES, JSON, service_json("chosen", Some(&free_ip))).await;
    assert_eq!(code, 201, "a free address: {body}");
    let chosen = host_services.get(&tr.host_name("default", "chosen")).await.unwrap();
    assert_eq!(chosen.spec.unwrap().cluster_ip.as_deref(), Some(free_ip.as_str()));

    // --- Sizes: oversized bodies refused cleanly; long names and a 1 MiB object fine.
    let big = serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
        "data": {"x": "y".repeat(10 << 20)}}))
    .unwrap();
    // The virtual API server answers 413 before reading it all, so the client may see its write
    // cut off instead of the answer; the proxy's own count shows the answer it relayed.
    match try_raw(&admin, "POST", "/api/v1/namespaces/default/configmaps", JSON, big).await {
        Ok((code, body)) => assert_eq!(code, 413, "a 10 MiB ConfigMap: {body}"),
        Err(e) => eprintln!("a 10 MiB ConfigMap: the connection closed while sending ({e})"),
    }
    let (_, metrics) = raw(&admin, "GET", "/metrics", &[], vec![]).await;
    assert!(metrics.contains(r#"vkube_proxy_requests_total{route="forward",code="413"} 1"#), "{metrics}");
    assert!(vc.kubectl(&["get", "configmap", "big"]).status.code() != Some(0), "the 10 MiB ConfigMap exists");
    let mib = serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mib"},
        "data": {"x": "y".repeat(1 << 20)}}))
    .unwrap();
    let (code, body) = raw(&admin, "POST", "/api/v1/namespaces/default/configmaps", JSON, mib).await;
    assert_eq!(code, 201, "a 1 MiB ConfigMap: {}", &body[..body.len().min(300)]);
    let long = "a".repeat(253);
    vc.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {long}}}\nspec: {{containers: [{{name: app, image: busybox}}]}}\n"
    ));
    assert_eq!(vc.kubectl_ok(&["get", "pod", &long, "-o", "name"]).trim(), format!("pod/{long}"));
    let host_pods: Api<Pod> = Api::namespaced(host.clone(), vc.host_namespace());
    let long_host = tr.host_name("default", &long);
    assert!(long_host.len() <= 63, "host name {long_host}");
    eventually("the 253-character pod's host copy", Duration::from_secs(30), || async {
        host_pods.get_opt(&long_host).await.map_err(|e| e.to_string())
    })
    .await;
    let out = vc.kubectl(&["create", "configmap", &"a".repeat(254)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be no more than 253 characters"), "254 characters");

    // A webhook whose URL is an address the tenant chose: the virtual API server's egress only
    // reaches this cluster's own Services, so it never connects (the failure is ignored as the
    // webhook asks, and the create goes on).
    vc.apply(&format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: phone-home}}
webhooks:
- name: phone-home.example.com
  clientConfig: {{url: "https://127.0.0.1:{port}/validate"}}
  rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}}]
  failurePolicy: Ignore
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 3
"#
    ));
    // Webhook configurations take effect within a second or so; several creates make sure one ran.
    for i in 0..5 {
        vc.kubectl_ok(&["create", "configmap", &format!("after-webhook-{i}")]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    vc.kubectl_ok(&["delete", "validatingwebhookconfiguration", "phone-home"]);

    // The control plane is unharmed.
    assert_eq!(vc.kubectl_ok(&["get", "--raw", "/readyz"]), "ok");
    vc.kubectl_ok(&["get", "ns"]);
    assert_eq!(dials.load(Ordering::SeqCst), 0, "an API server dialed the address the tenant chose");
}

/// `vkube_proxy_<name>` samples summed over their labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    let prefix = format!("vkube_proxy_{name}");
    text.lines()
        .filter(|l| l.strip_prefix(&prefix).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_and_silent_clients_cost_the_api_servers_little() {
    let env = TestEnv::start(1).await;
    let vc = env.virtual_cluster("hostile-load").await;
    let admin = vc.client().await;
    let token = low_privilege_token(&vc, "robot");
    let robot = vc.client_with_token(&token).await;
    let (code, _) = raw(&robot, "GET", "/api/v1/namespaces/default/pods", &[], vec![]).await;
    assert_eq!(code, 200, "the robot's token works before the flood");

    // Legitimate users in parallel: kubectl with the admin certificate, and the robot's token.
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let legit_runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let legit = {
        let (flooding, kubeconfig, kubectl) = (flooding.clone(), vc.kubeconfig(), env.upstream.kubectl());
        let legit_runs = legit_runs.clone();
        tokio::spawn(async move {
            while flooding.load(Ordering::SeqCst) {
                let out = tokio::process::Command::new(&kubectl)
                    .args(["get", "ns"])
                    .env("KUBECONFIG", &kubeconfig)
                    .output()
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "kubectl get ns during the flood: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let (code, body) = raw(&robot, "GET", "/api/v1/namespaces/default/pods", &[], vec![]).await;
                assert_eq!(code, 200, "the robot's token during the flood: {body}");
                legit_runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The flood comes from another address (127.0.0.2); tokens issued just now, never used, are
    // sent from the usual one during it, each once.
    let mut newcomers = vec![low_privilege_token(&vc, "newcomer")];
    newcomers.extend((0..4).map(|_| vc.kubectl_ok(&["create", "token", "newcomer"]).trim().to_string()));
    let flooder = Arc::new(ClientFrom::new(&vc, "127.0.0.2".parse().unwrap()));
    let started = Instant::now();
    let seed = std::collections::hash_map::RandomState::new();
    // At least 10,000 random tokens, and on until the newcomers are through and the legitimate
    // clients ran three times (however fast the machine answers; at most 100,000, and not once
    // the legitimate clients failed).
    let newcomers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_on = {
        let (done, runs, legit) = (newcomers_done.clone(), legit_runs.clone(), legit.abort_handle());
        move |i: &u32| {
            let more = (!done.load(Ordering::SeqCst) || runs.load(Ordering::SeqCst) < 3) && !legit.is_finished();
            std::future::ready(*i < 10_000 || (more && *i < 100_000))
        }
    };
    let flood = futures::stream::iter(0..u32::MAX)
        .take_while(flood_on)
        .map(|i| {
            let token = format!("{:016x}{:016x}", std::hash::BuildHasher::hash_one(&seed, i), i);
            let flooder = flooder.clone();
            async move { flooder.get("/api/v1/namespaces", &token).await }
        })
        .buffer_unordered(50)
        .collect::<Vec<u16>>();
    let newcomers_during_flood = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ours = ClientFrom::new(&vc, "127.0.0.1".parse().unwrap());
        let mut codes = vec![];
        for token in &newcomers {
            codes.push(ours.get("/api/v1/namespaces/default/pods", token).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        newcomers_done.store(true, Ordering::SeqCst);
        codes
    };
    let (codes, newcomer_codes) = tokio::join!(flood, newcomers_during_flood);
    let flood_took = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    legit.await.expect("the legitimate clients");
    let runs = legit_runs.load(Ordering::SeqCst);
    assert!(runs >= 3, "legitimate requests ran during the flood: {runs}");
    assert_eq!(
        newcomer_codes, [200; 5],
        "new tokens from elsewhere, each at its first try, during a flood from one address"
    );
    // Reviewed and refused (401), or not reviewed (429: clients ask again).
    let other: Vec<&u16> = codes.iter().filter(|c| **c != 401 && **c != 429).collect();
    assert!(
        other.is_empty(),
        "{} random tokens got neither 401 nor 429: {:?}",
        other.len(),
        &other[..other.len().min(10)]
    );
    assert!(codes.iter().filter(|c| **c == 429).count() > 9_000, "the flood was throttled");

    let (_, metrics) = raw(&admin, "GET", "/metrics", &[], vec![]).await;
    let reviews = metric_sum(&metrics, "token_reviews_total");
    let limited = metric_sum(&metrics, "token_reviews_limited_total");
    eprintln!(
        "{} random tokens in {flood_took:?}: {reviews} TokenReviews sent, {limited} refused unreviewed",
        codes.len()
    );
    // 20 a second and a burst of 40 (the defaults), plus the robot's few.
    let bound = 60.0 + 20.0 * flood_took.as_secs_f64() * 1.5;
    let tokens = codes.len();
    assert!(
        reviews <= bound && reviews < tokens as f64 / 5.0,
        "{reviews} TokenReviews for {tokens} random tokens (bound {bound})"
    );
    assert!(reviews + limited >= codes.len() as f64, "every random token was counted: {reviews} + {limited}");

    // Silent clients: connected, never a byte (slowloris): dropped after the handshake timeout,
    // while kubectl keeps working.
    let server = vc.proxy_address();
    let silent: Vec<tokio::net::TcpStream> =
        futures::future::join_all((0..100).map(|_| tokio::net::TcpStream::connect(server.as_str())))
            .await
            .into_iter()
            .map(|c| c.expect("connecting to the proxy"))
            .collect();
    vc.kubectl_ok(&["get", "ns"]);
    let started = Instant::now();
    for mut conn in silent {
        let mut buf = [0u8; 16];
        let read =
            tokio::time::timeout(Duration::from_secs(20), tokio::io::AsyncReadExt::read(&mut conn, &mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent connection is dropped: {read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let (_, metrics) = raw(&admin, "GET", "/metrics", &[], vec![]).await;
    assert!(metric_sum(&metrics, "dropped_connections_total") >= 100.0, "{metrics}");
    assert_eq!(vc.kubectl_ok(&["get", "--raw", "/readyz"]), "ok");
}
