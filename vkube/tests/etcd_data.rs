//! `EtcdData` against a real etcd (the pinned binary from the cache): a snapshot taken through
//! etcd's gateway while it runs, restored with the real etcdutl into its data directory, holds
//! what was written before it and not what was written after; a reset empties it.

use std::process::{Child, Command, Stdio};

use std::time::Duration;

use base64::Engine as _;
use vkube::controlplane::components::{self, Layout};
use vkube::controlplane::etcd::EtcdData;
use vkube_localenv::ports::free_port;
use vkube_localenv::upstream::Upstream;

struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(up: &Upstream, data: &EtcdData, dir: &std::path::Path) -> Etcd {
    let layout = Layout {
        cert_dir: dir,
        data_dir: &data.data_dir,
        etcd_client_port: data.client_port,
        etcd_peer_port: data.peer_port,
        apiserver_port: 0,
        service_cidr: "",
        node_port_range: "",
        admission_config: dir,
        durable: false,
    };
    let child = Command::new(up.etcd())
        .args(components::etcd(&layout))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd starts");
    Etcd(child)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Writes or reads a key through etcd's JSON gateway.
async fn kv(data: &EtcdData, op: &str, body: serde_json::Value) -> serde_json::Value {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://127.0.0.1:{}/v3/kv/{op}", data.client_port))
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(resp.status().is_success(), "{op}: {}", resp.status());
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn get(data: &EtcdData, key: &str) -> Option<String> {
    let v = kv(data, "range", serde_json::json!({"key": b64(key)})).await;
    v["kvs"][0]["value"]
        .as_str()
        .map(|s| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap())
}

#[tokio::test]
async fn snapshot_restore_and_reset_against_a_real_etcd() {
    let up = Upstream::locate().expect("upstream binaries built (hack/build-upstream.sh)");
    let dir = tempfile::tempdir().unwrap();
    let data = EtcdData {
        data_dir: dir.path().join("etcd"),
        etcdutl: up.etcdutl(),
        client_port: free_port(),
        peer_port: free_port(),
    };
    let etcd = start(&up, &data, dir.path());
    data.wait_healthy(Duration::from_secs(30)).await.unwrap();
    kv(&data, "put", serde_json::json!({"key": b64("/registry/before"), "value": b64("kept")})).await;
    // Enough data that the snapshot spans many chunks of the gateway's stream.
    let big = "x".repeat(200_000);
    kv(&data, "put", serde_json::json!({"key": b64("/registry/big"), "value": b64(&big)})).await;
    let db = dir.path().join("snapshot.db");
    let saved = data.save(&db).await.unwrap();
    assert_eq!(saved.bytes, std::fs::metadata(&db).unwrap().len());
    assert!(saved.bytes > 200_000, "{saved:?}");
    kv(&data, "put", serde_json::json!({"key": b64("/registry/after"), "value": b64("gone")})).await;
    drop(etcd);

    // A restore that fails (not a snapshot) leaves the data as it was.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a snapshot").unwrap();
    assert!(data.restore(&junk).await.is_err());
    let etcd = start(&up, &data, dir.path());
    data.wait_healthy(Duration::from_secs(30)).await.unwrap();
    assert_eq!(get(&data, "/registry/after").await.as_deref(), Some("gone"), "untouched by the failed restore");
    drop(etcd);

    data.restore(&db).await.unwrap();
    let etcd = start(&up, &data, dir.path());
    data.wait_healthy(Duration::from_secs(30)).await.unwrap();
    assert_eq!(get(&data, "/registry/before").await.as_deref(), Some("kept"));
    assert_eq!(get(&data, "/registry/big").await.map(|v| v.len()), Some(200_000));
    assert_eq!(get(&data, "/registry/after").await, None, "written after the snapshot");
    // Revisions jumped ahead: a watcher of the old data relists instead of missing changes.
    let rev = kv(&data, "range", serde_json::json!({"key": b64("/registry/before")})).await["header"]["revision"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(rev > 1_000_000_000, "revision {rev}");
    drop(etcd);

    data.reset().unwrap();
    let _etcd = start(&up, &data, dir.path());
    data.wait_healthy(Duration::from_secs(30)).await.unwrap();
    assert_eq!(get(&data, "/registry/before").await, None, "a reset empties it");
}
