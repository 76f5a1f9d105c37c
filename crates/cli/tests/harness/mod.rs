//! Real parts for end-to-end tests: the `allot agent` as a separate process, network
//! namespaces, and CNI plugins executed the way a runtime executes them. Needs root.
//! Everything a test creates is removed when its handle drops.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use allot_client::Client;
use serde_json::Value;

pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("running id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "end-to-end tests create network namespaces and need root: run them with sudo (CI runs as root)"
    );
    assert!(Path::new("/usr/lib/cni/bridge").exists(), "needs Debian's containernetworking-plugins: run scripts/test.sh");
}

/// target/debug (or release), where cargo put this package's binaries and allot-ipam.
pub fn bin_dir() -> PathBuf {
    let allot = PathBuf::from(env!("CARGO_BIN_EXE_allot"));
    let dir = allot.parent().unwrap().to_path_buf();
    assert!(
        dir.join("allot-ipam").exists(),
        "{} missing: build every binary first (cargo build --workspace --bins)",
        dir.join("allot-ipam").display()
    );
    dir
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A short name unique to this process and call, for namespaces and bridges (<= 15 chars).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{:x}{n:x}", std::process::id() % 0xfffff)
}

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub node: String,
    pub args: Vec<String>,
    netns: Option<String>,
    child: Option<Child>,
}

impl Agent {
    /// Starts `allot agent` with its own data dir and socket, plus `args`; waits until ready.
    pub fn start(node: &str, args: &[&str]) -> Agent {
        Self::start_in(None, node, args)
    }

    /// Starts the agent inside a network namespace (`ip netns exec`), as a node of a lab.
    pub fn start_in(netns: Option<&str>, node: &str, args: &[&str]) -> Agent {
        let mut a = Self::unstarted(netns, node, args);
        a.spawn();
        a
    }

    /// An agent whose data dir (`data_dir()`) exists but which is not started yet: `spawn` it.
    pub fn unstarted(netns: Option<&str>, node: &str, args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let socket = dir.path().join("allot.sock");
        Agent {
            socket,
            node: node.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(String::from),
            child: None,
            dir,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let child = command_in(self.netns.as_deref(), &bin_dir().join("allot"))
            .arg("agent")
            .arg("--node")
            .arg(&self.node)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting allot agent");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = self.client().get::<allot_wire::Status>("/v1/status")
                && s.ready
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited early ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "agent not ready in 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket, Duration::from_secs(30))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let mut c = self.child.take().expect("agent running");
        Command::new("kill").arg("-TERM").arg(c.id().to_string()).status().unwrap();
        c.wait().unwrap().success()
    }

    /// Runs the `allot` CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli(&self.socket, args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        cli(&self.socket, args, Some(stdin))
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let (ok, out, err) = self.cli(&full);
        assert!(ok, "allot {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("allot {args:?}: not JSON ({e}): {out}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command, run inside `netns` when one is given (`ip netns exec` execs it in place).
pub fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs the `allot` CLI, optionally inside a namespace, with any flags.
pub fn allot(netns: Option<&str>, args: &[&str]) -> (bool, String, String) {
    allot_with(netns, args, None)
}

/// Runs the `allot` CLI against the agent on `socket`.
pub fn cli(socket: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut full = vec!["--socket", socket.to_str().unwrap()];
    full.extend_from_slice(args);
    allot_with(None, &full, stdin)
}

fn allot_with(netns: Option<&str>, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = command_in(netns, &bin_dir().join("allot"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("alt");
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name} failed");
        Netns { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Addresses configured on `ifname` inside the namespace.
    pub fn addresses(&self, ifname: &str) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "exec", &self.name, "ip", "-j", "addr", "show", "dev", ifname]).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v[0]["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["scope"] == "global")
                    .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A Linux bridge the bridge plugin creates on first ADD; deleted on drop.
pub struct Bridge {
    pub name: String,
}

impl Bridge {
    pub fn new() -> Bridge {
        Bridge { name: unique("albr") }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// One CNI call: the runtime's environment and stdin, the plugin's stdout and exit status.
pub struct CniCall<'a> {
    pub plugin: &'a Path,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
}

pub fn cni(call: &CniCall, config: &Value) -> (i32, Value) {
    cni_in(None, call, config)
}

/// One CNI call made inside `netns` (a lab node), as that node's runtime would make it.
pub fn cni_in(netns: Option<&str>, call: &CniCall, config: &Value) -> (i32, Value) {
    let cni_path = format!("{}:/usr/lib/cni", bin_dir().display());
    let mut child = command_in(netns, call.plugin)
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(config.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let v = if out.stdout.is_empty() { Value::Null } else { serde_json::from_slice(&out.stdout).unwrap_or(Value::Null) };
    (out.status.code().unwrap_or(-1), v)
}

pub fn ips_of(result: &Value) -> Vec<String> {
    result["ips"].as_array().map(|a| a.iter().map(|i| i["address"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `allot operator` as a separate process.
pub struct Operator {
    pub id: String,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Operator {
    pub fn start(netns: Option<&str>, endpoint: &str, id: &str) -> Operator {
        Self::start_with(netns, endpoint, id, &[])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command inside a namespace and asserts it worked.
pub fn netns_exec(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().unwrap();
    assert!(out.status.success(), "in {ns}: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into()
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Operator {
    /// `allot operator` with extra flags after the defaults of `start` (lease TTL 3 s).
    pub fn start_with(netns: Option<&str>, endpoint: &str, id: &str, extra: &[&str]) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
        let child = command_in(netns, &bin_dir().join("allot"))
            .args(["--etcd-endpoints", endpoint, "operator", "--id", id, "--lease-ttl", "3s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting allot operator");
        Operator { id: id.to_string(), dir, child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("operator running").id()
    }

    /// Sends a signal by name (`STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }
}

/// Sends `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// `allot agent` started by hand (own arguments, own environment), killed on drop.
pub struct RawAgent(pub Child);

impl RawAgent {
    /// Waits until the agent on `socket` answers status, or panics with its stderr.
    pub fn wait_ready(&mut self, socket: &Path, log: &Path) {
        poll("agent ready", Duration::from_secs(20), || {
            if let Some(st) = self.0.try_wait().unwrap() {
                panic!("agent exited early ({st}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
            Client::new(socket, Duration::from_secs(5)).get::<allot_wire::Status>("/v1/status").ok().filter(|s| s.ready)
        });
    }
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
