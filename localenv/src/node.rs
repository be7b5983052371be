//! A real node beside the kwok ones: containerd, the kubelet and kube-proxy as local processes,
//! runc and the CNI plugins from Debian (`hack/debian-deps.sh`), images built from local files
//! (`image.rs`). Pods on it really run: tokens are mounted, DNS answers, Services route.
//!
//! It changes the machine, and `teardown` undoes every change, from what `node.json` recorded at
//! start (so `vkube dev down` can do it from another process): the bridge `vkube0` (10.88.0.1/16,
//! the node's address: the kernel has no dummy devices), iptables chains (kube-proxy's `KUBE-*`,
//! the CNI plugins' `CNI-*`), cgroups under `kubepods`, mounts under the node's directory,
//! sysctls the kubelet, kube-proxy and the bridge plugin set, and machine paths they create.
//! One real node per machine: the bridge, its address and the kubelet's cgroups are the
//! machine's. A process that runs one holds the machine's lock (`MACHINE_LOCK`), so a second
//! process (another test run) waits for it rather than failing on the bridge or tearing down the
//! first's chains.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::ImageSpec;
use crate::process::{self, Lifetime, ProcessGroup, ProcessSpec};
use crate::upstream::{Upstream, cache_root, versions};
use crate::{Error, Progress, Result, io_err, ports};

pub const NAME: &str = "real-node-0";
pub const BRIDGE: &str = "vkube0";
/// The node's address: the CNI bridge's, where the kubelet, kube-proxy and anything pods must
/// reach on the machine listen.
pub const ADDRESS: &str = "10.88.0.1";
pub const POD_SUBNET: &str = "10.88.0.0/16";
const KUBELET_PORT: u16 = 10250;
/// Locked (flock) by the process whose real node runs, for the node's lifetime; the kernel
/// releases it when that process exits, so a killed run never leaves it taken.
const MACHINE_LOCK: &str = "/run/vkube-real-node.lock";
/// The label a real node carries (`vkube create --local` finds its address by it).
pub const NODE_LABEL: &str = "vkube.dev/real-node";

/// The sandbox image containerd pins (it is never pulled).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// busybox with kubectl: serves HTTP (`httpd`), resolves names (`nslookup`), fetches (`wget`)
/// and calls an API server with its pod's token (`kubectl`, in-cluster).
pub const TEST_IMAGE: &str = "docker.io/library/busybox:1.36";

/// Sysctls the kubelet, kube-proxy and the bridge plugin may set, restored by `teardown`.
const SYSCTLS: [&str; 9] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
];
/// Machine paths the components create whatever their configuration says; removed by
/// `teardown` only if they did not exist before.
const MACHINE_PATHS: [&str; 5] =
    ["/var/log/containers", "/var/log/pods", "/var/lib/cni", "/run/containerd", "/opt/containerd"];

/// What `teardown` needs to undo a node's changes, written before the first change.
#[derive(Debug, Default, Serialize, Deserialize)]
struct MachineRecord {
    sysctls: BTreeMap<String, String>,
    created: Vec<PathBuf>,
    nft_tables: Vec<String>,
}

pub struct RealNode {
    dir: PathBuf,
    processes: Option<ProcessGroup>,
    /// The machine's lock (`MACHINE_LOCK`), held while this process runs the node.
    _machine: std::fs::File,
}

/// What the node needs from its host cluster.
pub struct HostAccess<'a> {
    pub server: String,
    pub ca_pem: &'a str,
    pub node_cert: (&'a str, &'a str),
    pub proxy_cert: (&'a str, &'a str),
    pub serving_cert: (&'a str, &'a str),
}

impl RealNode {
    /// Prepares the machine and starts containerd, the kubelet and kube-proxy in `dir`, and
    /// imports the local images. The caller waits for the Node to be Ready. Waits first while
    /// another process runs a real node on this machine.
    pub fn start(
        dir: &Path,
        up: &Upstream,
        host: &HostAccess<'_>,
        lifetime: Lifetime,
        progress: Progress<'_>,
    ) -> Result<Self> {
        preflight()?;
        let machine = claim_machine(Path::new(MACHINE_LOCK), progress)?;
        for sub in ["logs", "containerd", "kubelet", "pod-logs", "cni/net.d", "cni/ipam", "pki"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let dir = std::fs::canonicalize(dir).map_err(io_err(format!("resolving {}", dir.display())))?;
        // Leftovers of a run that was killed go first (idempotent).
        teardown(&dir)?;
        // What is left then is another node's (one left by `vkube dev up`): refused before
        // anything is recorded, so that this node's teardown never touches it.
        bridge_free()?;
        record_machine(&dir)?;
        let mut node =
            RealNode { dir: dir.clone(), processes: Some(ProcessGroup::new(&dir, lifetime)), _machine: machine };
        node.write_files(host)?;
        create_bridge()?;
        let spec = node.containerd(up);
        node.group().spawn(spec)?;
        wait_for_socket(&node.socket(), node.group())?;
        node.import_images(up, &images(up)?)?;
        let spec = node.kubelet(up);
        node.group().spawn(spec)?;
        let spec = node.kube_proxy(up);
        node.group().spawn(spec)?;
        Ok(node)
    }

    fn group(&mut self) -> &mut ProcessGroup {
        self.processes.as_mut().expect("a running node has its processes")
    }

    pub fn check_running(&mut self) -> Result<()> {
        self.group().check_running()
    }

    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.processes.as_ref().map(ProcessGroup::logs).unwrap_or_default()
    }

    /// Leaves the node running; `teardown` on its directory undoes it later.
    pub fn detach(mut self) {
        if let Some(p) = self.processes.take() {
            p.detach();
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    fn path(&self, p: &str) -> String {
        self.dir.join(p).display().to_string()
    }

    fn write_files(&self, host: &HostAccess<'_>) -> Result<()> {
        let pki = self.dir.join("pki");
        let write = |name: &str, text: &str| crate::host::write_private(&pki.join(name), text);
        write("ca.crt", host.ca_pem)?;
        write("kubelet.crt", host.serving_cert.0)?;
        write("kubelet.key", host.serving_cert.1)?;
        for (file, (cert, key)) in [("kubelet.kubeconfig", host.node_cert), ("kube-proxy.kubeconfig", host.proxy_cert)]
        {
            let cfg = vkube_pki::kubeconfig::with_client_cert(
                "vkube-dev",
                &host.server,
                host.ca_pem,
                vkube_pki::kubeconfig::ClientCert { cert_pem: cert, key_pem: key },
            );
            crate::host::write_private(&self.dir.join(file), &vkube_pki::kubeconfig::to_yaml(&cfg))?;
        }
        let files = [
            ("containerd/config.toml", self.containerd_config()),
            ("cni/net.d/10-vkube.conflist", cni_config(&self.path("cni/ipam"))),
            ("kubelet.yaml", self.kubelet_config()),
            ("kube-proxy.yaml", self.kube_proxy_config()),
            // The machine's resolver as pods with `dnsPolicy: Default` see it.
            (
                "resolv.conf",
                std::fs::read_to_string("/etc/resolv.conf").unwrap_or_else(|_| "nameserver 127.0.0.1\n".into()),
            ),
        ];
        for (file, text) in files {
            std::fs::write(self.dir.join(file), text).map_err(io_err(format!("writing {file}")))?;
        }
        Ok(())
    }

    fn containerd_config(&self) -> String {
        let d = |p: &str| self.path(p);
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"
# Root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj would fail every sandbox.
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{opt}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
            root = d("containerd/root"),
            state = d("containerd/state"),
            sock = self.socket().display(),
            opt = d("containerd/opt"),
            pause = PAUSE_IMAGE,
            runc = which("runc").unwrap_or_else(|| "/usr/sbin/runc".into()).display(),
            runc_root = d("containerd/runc"),
            cni = d("cni/net.d"),
        )
    }

    fn kubelet_config(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This machine has cgroup v1 (hybrid) and swap; kubelet v1.35+ refuses both unless told.
            "failCgroupV1": false,
            "failSwapOn": false,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": format!("unix://{}", self.socket().display()),
            "address": ADDRESS,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": self.path("pki/ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": self.path("pki/kubelet.crt"),
            "tlsPrivateKeyFile": self.path("pki/kubelet.key"),
            "resolvConf": self.path("resolv.conf"),
            "podLogsDir": self.path("pod-logs"),
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%", "nodefs.inodesFree": "2%"},
            // Local images cannot be pulled again once collected.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "maxPods": 250,
        }))
        .expect("kubelet config serializes")
    }

    fn kube_proxy_config(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.path("kube-proxy.kubeconfig")},
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "bindAddress": ADDRESS,
            "hostnameOverride": NAME,
            "healthzBindAddress": format!("127.0.0.1:{}", ports::free_port()),
            "metricsBindAddress": format!("127.0.0.1:{}", ports::free_port()),
            // No conntrack sysctl writes.
            "conntrack": {"maxPerCore": 0},
            "nodePortAddresses": [POD_SUBNET],
        }))
        .expect("kube-proxy config serializes")
    }

    fn containerd(&self, up: &Upstream) -> ProcessSpec {
        ProcessSpec::new("containerd", up.containerd(), &self.dir.join("logs"))
            .arg(format!("--config={}", self.path("containerd/config.toml")))
            // containerd finds its shim on PATH, the shim finds runc there.
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    up.containerd_dir().display()
                ),
            )
    }

    fn kubelet(&self, up: &Upstream) -> ProcessSpec {
        ProcessSpec::new("kubelet", up.kubelet(), &self.dir.join("logs")).args([
            format!("--config={}", self.path("kubelet.yaml")),
            format!("--kubeconfig={}", self.path("kubelet.kubeconfig")),
            format!("--root-dir={}", self.path("kubelet")),
            format!("--cert-dir={}", self.path("pki")),
            format!("--hostname-override={NAME}"),
            format!("--node-ip={ADDRESS}"),
            format!("--node-labels={NODE_LABEL}=true"),
            "--v=1".into(),
        ])
    }

    fn kube_proxy(&self, up: &Upstream) -> ProcessSpec {
        ProcessSpec::new("kube-proxy", up.kube_proxy(), &self.dir.join("logs"))
            .args([format!("--config={}", self.path("kube-proxy.yaml")), "--v=1".into()])
    }

    /// Builds images (cached by content) and imports them into the node's containerd.
    pub fn import_images(&self, up: &Upstream, specs: &[ImageSpec]) -> Result<()> {
        let cache = cache_root().join("images");
        for spec in specs {
            let tar = spec.build(&cache)?;
            let out = Command::new(up.ctr())
                .args(["--address", &self.socket().display().to_string(), "--namespace", "k8s.io", "images", "import"])
                .args(["--no-unpack", "--local"])
                .arg(&tar)
                .output()
                .map_err(io_err("running ctr images import"))?;
            if !out.status.success() {
                return Err(Error::Node(format!(
                    "importing {} ({}) failed: {}",
                    spec.name,
                    tar.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if self.processes.as_ref().is_some_and(|p| p.lifetime() == Lifetime::Attached)
            && let Err(e) = teardown(&self.dir)
        {
            eprintln!("tearing down the real node in {}: {e}", self.dir.display());
        }
    }
}

/// The images every real node has: pause, CoreDNS as the virtual cluster's DNS names it, and the
/// test image.
pub fn images(up: &Upstream) -> Result<Vec<ImageSpec>> {
    let pause = pause_image(up, PAUSE_IMAGE);

    let mut coredns = ImageSpec::new(&format!("registry.k8s.io/coredns/coredns:{}", versions().coredns));
    coredns.files.push(("/coredns".into(), up.coredns()));
    coredns.entrypoint = vec!["/coredns".into()];

    let mut test = busybox_image(TEST_IMAGE)?;
    test.files.push(("/usr/local/bin/kubectl".into(), up.kubectl()));
    test.dirs.push("/www".into());
    Ok(vec![pause, coredns, test])
}

/// Upstream's pause, named `name`.
pub fn pause_image(up: &Upstream, name: &str) -> ImageSpec {
    let mut pause = ImageSpec::new(name);
    pause.files.push(("/pause".into(), up.pause()));
    pause.entrypoint = vec!["/pause".into()];
    pause
}

/// An image of Debian's static busybox with every applet on the PATH, root and nobody users, and
/// `/tmp` and `/root`; it starts `sh`.
pub fn busybox_image(name: &str) -> Result<ImageSpec> {
    let busybox = which("busybox").filter(|p| is_static(p)).ok_or_else(|| {
        Error::Node("a static busybox is missing: run hack/debian-deps.sh (Debian's busybox-static)".into())
    })?;
    let mut image = ImageSpec::new(name);
    image.files.push(("/bin/busybox".into(), busybox.clone()));
    let applets = Command::new(&busybox).arg("--list").output().map_err(io_err("running busybox --list"))?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        image.symlinks.push((format!("/bin/{applet}"), "busybox".into()));
    }
    image.texts.push((
        "/etc/passwd".into(),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".into(),
    ));
    image.texts.push(("/etc/group".into(), "root:x:0:\nnogroup:x:65534:\n".into()));
    image.dirs.extend(["/tmp".into(), "/root".into()]);
    image.cmd = vec!["sh".into()];
    Ok(image)
}

/// The vkube image as the chart names it by default (`images.vkube.repository` `vkube`, tag the
/// chart's appVersion, which is vkube's version).
pub fn vkube_image_name(version: &str) -> String {
    format!("docker.io/library/vkube:{version}")
}

/// The image of the chart's control-plane pod, as the Dockerfile makes it: vkube (`vkube` is
/// (image name, binary): the binary, stripped, with the shared libraries it links) and the
/// upstream components it runs, etcd (and etcdutl, for restores) and kube-control-plane
/// (kube-apiserver and kube-controller-manager in one process), on its PATH.
pub fn control_plane_image(up: &Upstream, vkube: (&str, &Path)) -> Result<ImageSpec> {
    let (name, binary) = vkube;
    let stripped = cache_root().join("images/vkube.stripped");
    std::fs::create_dir_all(cache_root().join("images")).map_err(io_err("creating the image cache"))?;
    run("strip", &["-o", &stripped.display().to_string(), &binary.display().to_string()])?;
    let mut image = ImageSpec::new(name);
    image.files.push(("/vkube".into(), stripped));
    image.files.extend(shared_libraries(binary)?.into_iter().map(|lib| (lib.display().to_string(), lib)));
    for (file, bin) in [("etcd", up.etcd()), ("etcdutl", up.etcdutl()), ("kube-control-plane", up.kube_control_plane())]
    {
        image.files.push((format!("/usr/local/bin/{file}"), bin));
    }
    image.dirs.push("/tmp".into());
    image.entrypoint = vec!["/vkube".into()];
    Ok(image)
}

/// The shared libraries a binary links, and its loader (from `ldd`).
pub(crate) fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().map_err(io_err("running ldd"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=> ").map_or(l, |(_, rest)| rest).split(" (").next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The StorageClass of the node's volumes, the host's default class.
pub const STORAGE_CLASS: &str = "local";
const VOLUMES: usize = 8;

/// A pool of PersistentVolumes on the node (directories under its `volumes/`, class `local`, the
/// default): there is no provisioner. Released ones (their claim deleted) are wiped and offered
/// again. World-writable: the chart's pod runs as 65532.
pub async fn ensure_volumes(client: &kube::Client, dir: &Path) -> Result<()> {
    use k8s_openapi::api::core::v1::PersistentVolume;
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::api::{Api, DeleteParams, PostParams};
    let classes: Api<StorageClass> = Api::all(client.clone());
    if classes.get_opt(STORAGE_CLASS).await?.is_none() {
        let class: StorageClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer",
        }))
        .expect("static StorageClass");
        classes.create(&PostParams::default(), &class).await?;
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..VOLUMES {
        let name = format!("{NAME}-vol-{i}");
        let path = dir.join("volumes").join(&name);
        match pvs.get_opt(&name).await? {
            Some(pv) if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Released") => continue,
            Some(_) => {
                pvs.delete(&name, &DeleteParams::default()).await?;
                let _ = std::fs::remove_dir_all(&path);
                crate::wait::until(Duration::from_secs(30), Duration::from_millis(100), || {
                    let pvs = pvs.clone();
                    let name = name.clone();
                    async move { pvs.get_opt(&name).await.map(|p| p.is_none().then_some(())).map_err(|e| e.to_string()) }
                })
                .await
                .map_err(|d| Error::Node(format!("PersistentVolume {name} was not deleted: {d}")))?;
            }
            None => {}
        }
        std::fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(io_err(format!("opening {} to the pods' users", path.display())))?;
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {NODE_LABEL: "true"}},
            "spec": {
                "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                "local": {"path": path.display().to_string()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [NAME]}]}]}},
            },
        }))
        .expect("static PersistentVolume");
        pvs.create(&PostParams::default(), &pv).await?;
    }
    Ok(())
}

fn is_static(path: &Path) -> bool {
    Command::new("ldd")
        .arg(path)
        .output()
        .is_ok_and(|o| !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic"))
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn cni_config(ipam_dir: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vkube",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true, "hairpinMode": true,
             "ipam": {"type": "host-local", "dataDir": ipam_dir,
                      "ranges": [[{"subnet": POD_SUBNET, "gateway": ADDRESS}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    }))
    .expect("CNI config serializes")
}

/// What a real node needs on this machine, each missing piece named with its fix.
fn preflight() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(Error::Node("a real node needs root (containers, mounts, iptables)".into()));
    }
    let missing: Vec<&str> = ["runc", "iptables", "ip", "iptables-save"]
        .into_iter()
        .filter(|p| which(p).is_none())
        .chain(
            ["/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback", "/usr/lib/cni/portmap"]
                .into_iter()
                .filter(|p| !Path::new(p).exists()),
        )
        .collect();
    if !missing.is_empty() {
        return Err(Error::Node(format!("{} missing: run hack/debian-deps.sh", missing.join(", "))));
    }
    Ok(())
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("node.json")
}

/// The current values of the sysctls a real node may change.
pub fn sysctls() -> BTreeMap<String, String> {
    SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok().map(|v| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Writes down the sysctls and machine paths before anything changes them.
fn record_machine(dir: &Path) -> Result<()> {
    let sysctls = sysctls();
    let created = MACHINE_PATHS.iter().map(PathBuf::from).filter(|p| !p.exists()).collect();
    crate::host::write_json(&record_path(dir), &MachineRecord { sysctls, created, nft_tables: nft_tables() })
}

/// Takes the machine's real-node lock (`lock`), waiting (with a word on progress) while another
/// process holds it. A node left running by a process that exited (`vkube dev up`) holds no
/// lock: `bridge_free` refuses to start beside it.
fn claim_machine(lock: &Path, progress: Progress<'_>) -> Result<std::fs::File> {
    let file = open_lock(lock)?;
    if try_claim(&file, lock)? {
        return Ok(file);
    }
    let shown = lock.display();
    progress(&format!(
        "another process runs a real node on this machine (one per machine): waiting for it to stop ({shown})"
    ));
    file.lock().map_err(io_err(format!("locking {shown}")))?;
    Ok(file)
}

fn open_lock(lock: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
        .map_err(io_err(format!("opening {}", lock.display())))
}

/// Whether the lock was free (and is now `file`'s).
fn try_claim(file: &std::fs::File, lock: &Path) -> Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(format!("locking {}", lock.display()))(e)),
    }
}

/// `teardown` of a node no process runs any more (`vkube dev down`, `vkube dev up` clearing
/// leftovers), refused while another process runs a real node on this machine: teardown's
/// machine-wide steps (chains, bridge, `kubepods` cgroups) would remove that node's.
pub fn teardown_detached(dir: &Path) -> Result<Vec<String>> {
    teardown_detached_with(Path::new(MACHINE_LOCK), dir)
}

fn teardown_detached_with(lock: &Path, dir: &Path) -> Result<Vec<String>> {
    if !record_path(dir).exists() {
        return Ok(vec![]);
    }
    let file = open_lock(lock)?;
    if !try_claim(&file, lock)? {
        return Err(Error::Node(format!(
            "another process runs a real node on this machine (a test run?), and undoing the one in {} would undo its too: run this again once it has stopped ({})",
            dir.display(),
            lock.display()
        )));
    }
    teardown(dir)
}

fn bridge_free() -> Result<()> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        return Err(Error::Node(format!(
            "network device {BRIDGE} exists: another real node runs on this machine (stop it with `vkube dev down`), or delete it with `ip link del {BRIDGE}`"
        )));
    }
    Ok(())
}

/// Called once `bridge_free` has said no other node's bridge is there.
fn create_bridge() -> Result<()> {
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run("ip", &["addr", "add", &format!("{ADDRESS}/16"), "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().map_err(io_err(format!("running {program}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Node(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn wait_for_socket(socket: &Path, group: &mut ProcessGroup) -> Result<()> {
    for _ in 0..300 {
        group.check_running()?;
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Node(format!("containerd did not open {} within 30 s", socket.display())))
}

/// Undoes everything a real node in `dir` changed on the machine, in an order that lets each
/// step succeed: kube-proxy and the kubelet stop, the containers are killed, containerd and its
/// shims stop, mounts under `dir` go (deepest first), the kubelet's, kube-proxy's and the CNI
/// plugins' iptables chains (and nftables tables made since the start), the bridge, the
/// `kubepods` cgroups, then the sysctls and machine paths as recorded.
/// Idempotent; returns what it stopped or removed.
pub fn teardown(dir: &Path) -> Result<Vec<String>> {
    let Ok(dir) = std::fs::canonicalize(dir) else { return Ok(vec![]) };
    let Some(recorded) =
        std::fs::read_to_string(record_path(&dir)).ok().and_then(|t| serde_json::from_str::<MachineRecord>(&t).ok())
    else {
        return Ok(vec![]);
    };
    let mut done = vec![];
    let processes = process::read_recorded(&dir)?;
    let stop = |name: &str, done: &mut Vec<String>| {
        for r in processes.iter().filter(|r| r.name == name) {
            if process::stop_recorded(r, Duration::from_secs(10)) {
                done.push(name.to_string());
            }
        }
    };
    stop("kube-proxy", &mut done);
    stop("kubelet", &mut done);
    let killed = kill_cgroup_processes();
    if killed > 0 {
        done.push(format!("{killed} container process(es)"));
    }
    stop("containerd", &mut done);
    // Shims (their command lines name the containerd socket under `dir`).
    let strays = process::stop_strays(&dir, Duration::from_secs(5));
    if strays > 0 {
        done.push(format!("{strays} shim(s)"));
    }
    process::write_recorded(&dir, &[])?;
    let unmounted = unmount_under(&dir);
    if unmounted > 0 {
        done.push(format!("{unmounted} mount(s)"));
    }
    if let Some(up) = Upstream::locate().ok().filter(|up| up.kube_proxy().exists()) {
        // Removes kube-proxy's chains and tables in every mode.
        let _ = Command::new(up.kube_proxy()).arg("--cleanup").output();
    }
    let chains = remove_chains();
    if chains > 0 {
        done.push(format!("{chains} iptables chain(s)"));
    }
    for table in nft_tables().iter().filter(|t| !recorded.nft_tables.contains(t)) {
        let mut args = vec!["delete", "table"];
        args.extend(table.split(' '));
        if Command::new("nft").args(&args).output().is_ok_and(|o| o.status.success()) {
            done.push(format!("nftables table {table}"));
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        run("ip", &["link", "del", BRIDGE])?;
        done.push(format!("bridge {BRIDGE}"));
    }
    let cgroups = remove_cgroups();
    if cgroups > 0 {
        done.push(format!("{cgroups} cgroup(s)"));
    }
    for (key, value) in &recorded.sysctls {
        let path = Path::new("/proc/sys").join(key);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value) {
            let _ = std::fs::write(&path, value);
        }
    }
    for path in &recorded.created {
        if path.exists() {
            let _ = std::fs::remove_dir_all(path);
            done.push(path.display().to_string());
        }
    }
    let _ = std::fs::remove_file(record_path(&dir));
    Ok(done)
}

/// Every cgroup directory under `kubepods` in each hierarchy, deepest first.
fn kubepods_cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = vec![];
    for h in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().filter_map(|e| e.ok()) {
        for top in [h.path().join("kubepods"), h.path().join("kubepods.slice")] {
            if top.is_dir() {
                walk(&top, &mut out);
            }
        }
    }
    out
}

fn kill_cgroup_processes() -> usize {
    let mut pids: Vec<i32> = kubepods_cgroups()
        .iter()
        .filter_map(|c| std::fs::read_to_string(c.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
        .collect();
    pids.sort();
    pids.dedup();
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    // They go once the kernel has reaped them; the cgroups can be removed after.
    for _ in 0..100 {
        if pids.iter().all(|p| process::is_zombie(p.unsigned_abs())) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pids.len()
}

fn remove_cgroups() -> usize {
    let mut removed = 0;
    for attempt in 0..50 {
        let left = kubepods_cgroups();
        if left.is_empty() {
            break;
        }
        for c in &left {
            if std::fs::remove_dir(c).is_ok() {
                removed += 1;
            }
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    removed
}

/// Mount points under `dir`, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // Spaces and other bytes are octal-escaped (\040).
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn unmount_under(dir: &Path) -> usize {
    let mut count = 0;
    // A mount can hide another at the same place: go until none is left.
    for _ in 0..10 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                count += 1;
            }
        }
    }
    count
}

/// Chain prefixes of the kubelet and kube-proxy (`KUBE-`) and of the CNI plugins (`CNI-`).
const CHAIN_PREFIXES: [&str; 2] = ["KUBE-", "CNI-"];
const SAVE_COMMANDS: [(&str, &str); 2] = [("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")];

/// Our chains, as (command, table, chain), in every table of IPv4 and IPv6.
pub fn node_chains() -> Vec<(String, String, String)> {
    let mut out = vec![];
    for (save, cmd) in SAVE_COMMANDS {
        let Ok(o) = Command::new(save).output() else { continue };
        let mut table = "";
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            } else if let Some(chain) = line.strip_prefix(':').and_then(|l| l.split(' ').next())
                && CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
            {
                out.push((cmd.to_string(), table.to_string(), chain.to_string()));
            }
        }
    }
    out
}

fn remove_chains() -> usize {
    let chains = node_chains();
    for (save, cmd) in SAVE_COMMANDS {
        let Ok(o) = Command::new(save).output() else { continue };
        let mut table = String::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
                continue;
            }
            let Some(rule) = line.strip_prefix("-A ") else { continue };
            // Rules in other chains that jump to ours.
            let chain = rule.split(' ').next().unwrap_or_default();
            let ours = |c: &str| CHAIN_PREFIXES.iter().any(|p| c.starts_with(p));
            if !ours(chain) && CHAIN_PREFIXES.iter().any(|p| rule.contains(&format!(" -j {p}"))) {
                let _ = Command::new(cmd).args(["-t", &table, "-D"]).args(shell_words(rule)).output();
            }
        }
    }
    for (cmd, table, chain) in &chains {
        let _ = Command::new(cmd).args(["-t", table, "-F", chain]).output();
    }
    for (cmd, table, chain) in &chains {
        let _ = Command::new(cmd).args(["-t", table, "-X", chain]).output();
    }
    chains.len()
}

/// nftables tables, as "family name" (iptables-nft makes its tables on first use).
fn nft_tables() -> Vec<String> {
    let Ok(o) = Command::new("nft").args(["list", "tables"]).output() else { return vec![] };
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.strip_prefix("table ")).map(str::to_string).collect()
}

/// Splits an iptables-save rule into arguments (comments are double-quoted).
fn shell_words(rule: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = rule.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'"') => cur.push(chars.next().unwrap_or('"')),
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Whether anything of a real node is left on the machine (for `vkube dev down` checks and
/// tests): running programs under `dir`, mounts, the bridge, CNI chains, kubepods cgroups.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut left = vec![];
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    left.extend(mounts_under(&dir).iter().map(|m| format!("mount {}", m.display())));
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        left.push(format!("network device {BRIDGE}"));
    }
    left.extend(node_chains().iter().map(|(cmd, t, c)| format!("{cmd} chain {t}/{c}")));
    left.extend(kubepods_cgroups().iter().map(|c| format!("cgroup {}", c.display())));
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_node_is_not_undone_while_another_process_runs_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let lock = dir.path().join("real-node.lock");
        let node = dir.path().join("node");
        std::fs::create_dir_all(&node).expect("the node's directory");
        let _running = claim_machine(&lock, &|_| {}).expect("another node's claim");
        // Nothing recorded there: nothing to undo, whoever runs a node.
        assert_eq!(teardown_detached_with(&lock, &node).expect("nothing to undo"), Vec::<String>::new());
        crate::host::write_json(&record_path(&node), &MachineRecord::default()).expect("a record");
        let refused = teardown_detached_with(&lock, &node).expect_err("refused while another node runs");
        assert!(refused.to_string().contains("another process runs a real node"), "{refused}");
        assert!(record_path(&node).exists(), "the record is kept for a later teardown");
    }

    #[test]
    fn a_second_real_node_waits_for_the_first_to_stop() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let lock = dir.path().join("real-node.lock");
        let first = claim_machine(&lock, &|_| panic!("the machine is free: no wait")).expect("the first claim");
        let (told, told_rx) = std::sync::mpsc::channel();
        let told = std::sync::Mutex::new(told);
        let second = std::thread::spawn({
            let lock = lock.clone();
            move || {
                let progress = move |m: &str| told.lock().expect("sender").send(m.to_string()).expect("send");
                claim_machine(&lock, &progress).map(drop)
            }
        });
        let message = told_rx.recv_timeout(Duration::from_secs(10)).expect("the second claim says it waits");
        assert!(message.contains("waiting for it to stop"), "{message}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!second.is_finished(), "the second claim waits while the first holds the machine");
        drop(first);
        second.join().expect("the second claim's thread").expect("the second claim, once the first let go");
    }

    #[test]
    fn iptables_rules_split_like_a_shell_would() {
        assert_eq!(
            shell_words(
                r#"POSTROUTING -s 10.88.0.5/32 -m comment --comment "name: \"vkube\" id: \"abc\"" -j CNI-1234"#
            ),
            vec![
                "POSTROUTING",
                "-s",
                "10.88.0.5/32",
                "-m",
                "comment",
                "--comment",
                r#"name: "vkube" id: "abc""#,
                "-j",
                "CNI-1234"
            ]
        );
    }
}
