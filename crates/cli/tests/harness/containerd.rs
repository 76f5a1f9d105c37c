//! A private containerd (Debian's 1.6) driven through CRI the way the kubelet drives it: its own
//! root, state dir, socket and config in a tempdir, CNI from one conflist (Debian's bridge plugin
//! with `"ipam": {"type": "allot-ipam"}`), and a pause image built here from a static binary,
//! since no image can be pulled. Needs root. Everything it creates goes in Drop: pods, shims,
//! containers, network namespaces, mounts, the bridge, the directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::harness::{Bridge, bin_dir, unique};

const PAUSE_IMAGE: &str = "localhost/allot-pause:1";
/// How long one CRI call may take; a RunPodSandbox is well under a second here.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The bridge the conflist names, if any; the bridge plugin creates it on the first pod.
    _bridge: Option<Bridge>,
    /// The pods' cgroup parent (cgroupfs), ours alone, removed in Drop.
    cgroup_parent: String,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    cri: Option<RuntimeServiceClient<Channel>>,
}

impl Containerd {
    /// Starts containerd with the CRI plugin wired to the agent on `agent_socket`, imports the
    /// pause image, and waits until CRI reports the network ready. Fails with containerd's log.
    /// `is_gateway` is the bridge plugin's: it gives the bridge the gateway address of one IPv4
    /// subnet only, so pods of two pools on one bridge need it off.
    pub fn start(agent_socket: &Path, is_gateway: bool) -> Containerd {
        let bridge = Bridge::new();
        let plugin = json!({
            "type": "bridge", "bridge": bridge.name, "isGateway": is_gateway, "ipMasq": false,
            "ipam": {"type": "allot-ipam", "socket": agent_socket},
            "capabilities": {"io.kubernetes.cri.pod-annotations": true}
        });
        Self::start_with(plugin, Some(bridge), None)
    }

    /// Like `start`, with the README's conflist (`ptp`, the pod-annotations capability), and
    /// containerd in the network namespace `node` (entered with `nsenter --net` only, so that
    /// mounts and cgroups stay shared): ptp puts the pods' host sides and routes there.
    pub fn start_ptp(agent_socket: &Path, node: &str) -> Containerd {
        let plugin = json!({
            "type": "ptp",
            "ipam": {"type": "allot-ipam", "socket": agent_socket},
            "capabilities": {"io.kubernetes.cri.pod-annotations": true}
        });
        Self::start_with(plugin, None, Some(node))
    }

    fn start_with(plugin: serde_json::Value, bridge: Option<Bridge>, node: Option<&str>) -> Containerd {
        let dir = tempfile::Builder::new().prefix("allot-ctrd").tempdir().unwrap();
        let d = dir.path();
        for sub in ["root", "state", "cni-bin", "net.d", "runc"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        for entry in std::fs::read_dir("/usr/lib/cni").expect("reading /usr/lib/cni: install containernetworking-plugins") {
            let entry = entry.unwrap();
            std::os::unix::fs::symlink(entry.path(), d.join("cni-bin").join(entry.file_name())).unwrap();
        }
        std::os::unix::fs::symlink(bin_dir().join("allot-ipam"), d.join("cni-bin/allot-ipam")).unwrap();

        let conflist = json!({ "cniVersion": "1.0.0", "name": "allot-cri", "plugins": [plugin] });
        std::fs::write(d.join("net.d/10-allot.conflist"), conflist.to_string()).unwrap();

        let socket = d.join("containerd.sock");
        let s = |p: &str| d.join(p).display().to_string();
        // netns_mounts_under_state_dir keeps the pods' namespaces inside our state dir;
        // restrict_oom_score_adj because these machines lack CAP_SYS_RESOURCE; native
        // snapshotter because it needs nothing from the filesystem; runc's root is ours so a
        // leftover container can be found and killed.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{confdir}"
    max_conf_num = 1
"#,
            root = s("root"),
            state = s("state"),
            socket = socket.display(),
            runc = s("runc"),
            bin = s("cni-bin"),
            confdir = s("net.d"),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();

        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let mut cmd = match node {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        let child = cmd
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd: install Debian's containerd (scripts/test.sh does)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cgroup_parent = format!("/{}", unique("allot-cri"));
        let mut c = Containerd { dir, socket, _bridge: bridge, cgroup_parent, child: Some(child), rt, cri: None };
        c.connect();
        c.import_pause_image();
        c.wait_network_ready();
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn connect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() {
                let path = self.socket.clone();
                let channel = self.rt.block_on(async {
                    Endpoint::try_from("http://[::]:0").unwrap().timeout(CALL_TIMEOUT).connect_with_connector(
                        tower::service_fn(move |_: Uri| {
                            let path = path.clone();
                            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                        }),
                    )
                    .await
                });
                if let Ok(channel) = channel {
                    let mut cri = RuntimeServiceClient::new(channel);
                    if self.rt.block_on(cri.version(VersionRequest { version: "v1".into() })).is_ok() {
                        self.cri = Some(cri);
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "containerd's CRI not answering in 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cri(&self) -> RuntimeServiceClient<Channel> {
        self.cri.clone().expect("connected")
    }

    /// Builds the pause image (one layer holding a static `/pause`) as a docker archive and
    /// imports it with `ctr`, into CRI's namespace.
    fn import_pause_image(&self) {
        let d = self.dir.path().join("image");
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        std::fs::copy(pause_binary(), d.join("rootfs/pause")).unwrap();
        run_ok(Command::new("tar").args(["--numeric-owner", "--owner=0", "--group=0", "-cf"]).arg(d.join("layer.tar")).arg("-C").arg(d.join("rootfs")).arg("pause"));
        let digest = sha256(&d.join("layer.tar"));
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]}
        });
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        let manifest = json!([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]);
        std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
        run_ok(Command::new("tar").arg("-cf").arg(d.join("pause.tar")).arg("-C").arg(&d).args(["manifest.json", "config.json", "layer.tar"]));
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import", "--snapshotter", "native"])
            .arg(d.join("pause.tar"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr images import failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
    }

    /// CRI loads the CNI config at start; a pod run before that fails with "cni config not initialized".
    fn wait_network_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.rt.block_on(self.cri().status(StatusRequest { verbose: false })).unwrap().into_inner();
            let ready = status.status.iter().flat_map(|s| &s.conditions).any(|c| c.r#type == "NetworkReady" && c.status);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "CRI network not ready in 20 s: {status:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's name and version as CRI reports them.
    pub fn version(&self) -> String {
        let v = self.rt.block_on(self.cri().version(VersionRequest { version: "v1".into() })).unwrap().into_inner();
        format!("{} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version)
    }

    /// RunPodSandbox for pod `namespace/name` with `annotations`; returns the sandbox id.
    pub fn run_pod(&self, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Result<String, tonic::Status> {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{namespace}-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
            linux: Some(LinuxPodSandboxConfig { cgroup_parent: self.cgroup_parent.clone(), ..Default::default() }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        self.rt.block_on(self.cri().run_pod_sandbox(req)).map(|r| r.into_inner().pod_sandbox_id)
    }

    /// The pod's network namespace, from PodSandboxStatus's verbose info (the runtime spec).
    pub fn pod_netns(&self, id: &str) -> PathBuf {
        let req = PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
        let status = self.rt.block_on(self.cri().pod_sandbox_status(req)).unwrap().into_inner();
        let info: serde_json::Value = serde_json::from_str(status.info.get("info").map(String::as_str).unwrap_or("null")).unwrap();
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array().cloned().unwrap_or_default();
        let path = namespaces.iter().find(|n| n["type"] == "network").and_then(|n| n["path"].as_str());
        PathBuf::from(path.unwrap_or_else(|| panic!("no network namespace in the status of {id}: {info}")))
    }

    /// The pod's address as PodSandboxStatus reports it (`network.ip`).
    pub fn pod_ip(&self, id: &str) -> String {
        let req = PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        let status = self.rt.block_on(self.cri().pod_sandbox_status(req)).unwrap().into_inner();
        status.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default()
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.block_on(self.cri().stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.into() })).map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        self.rt.block_on(self.cri().remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.into() })).map(|_| ())
    }

    /// Every sandbox CRI knows.
    pub fn pods(&self) -> Vec<String> {
        let req = k8s_cri::v1::ListPodSandboxRequest { filter: None::<PodSandboxFilter> };
        match self.rt.block_on(self.cri().list_pod_sandbox(req)) {
            Ok(r) => r.into_inner().items.into_iter().map(|p| p.id).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Network namespaces this containerd mounted (under its state dir).
    pub fn netns_paths(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.dir.path().join("state/io.containerd.grpc.v1.cri/netns")) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // The clean way first: CRI stops and removes what it ran (DEL may fail if no agent).
        if self.cri.is_some() {
            for id in self.pods() {
                let _ = self.stop_pod(&id);
                let _ = self.remove_pod(&id);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let d = self.dir.path().to_path_buf();
        // Whatever is left: containers in our runc root, their shims, mounts under our dirs.
        if let Ok(out) = Command::new("runc").arg("--root").arg(d.join("runc/k8s.io")).args(["list", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("runc").arg("--root").arg(d.join("runc/k8s.io")).args(["delete", "--force", id]).stderr(Stdio::null()).status();
            }
        }
        for pid in processes_mentioning(&self.socket) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let prefix = format!("{}/", d.display());
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).stderr(Stdio::null()).status();
        }
        // runc removes each pod's cgroup; the parent is ours to remove, in every hierarchy.
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.filter_map(|e| e.ok()) {
                let parent = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for c in children.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(c.path());
                    }
                    let _ = std::fs::remove_dir(&parent);
                }
            }
        }
    }
}

/// PIDs whose command line names `needle` (containerd's shims carry `-address <socket>`).
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.display().to_string();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|arg| arg == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// The static pause binary, compiled once per target dir from `tests/assets/pause.rs`.
fn pause_binary() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("allot-pause");
    if out.exists() {
        return out;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets/pause.rs");
    // Concurrent tests each build their own copy and rename it into place.
    let tmp = out.with_extension(format!("tmp{}", unique("")));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = Command::new(rustc)
        .args(["--edition", "2024", "-C", "opt-level=1", "-C", "strip=symbols", "-C", "target-feature=+crt-static", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("running rustc to build the pause program");
    assert!(built.status.success(), "building {} failed: {}", src.display(), String::from_utf8_lossy(&built.stderr));
    std::fs::rename(&tmp, &out).unwrap();
    out
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}
