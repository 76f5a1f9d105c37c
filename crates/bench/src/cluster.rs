//! Cluster mode at scale: 30 node agents and 3,000 pods over one etcd, beside the same 3,000
//! pods on one standalone agent.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use allot_client::Client;
use allot_testkit::Etcd;
use allot_wire::{Allocation, Status};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFigures {
    pub nodes: usize,
    pub pods: usize,
    /// From the first ADD until every pod has its address.
    pub cluster_seconds: f64,
    /// gRPC requests etcd served during the run, per pod (all agents and the operator).
    pub etcd_requests_per_pod: f64,
    pub standalone_seconds: f64,
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn allot(bin: &Path) -> Command {
    let mut c = Command::new(bin.join("allot"));
    c.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
    c
}

pub(crate) fn wait_ready(socket: &Path) {
    let client = Client::new(socket, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get::<Status>("/v1/status").is_ok_and(|s| s.ready) {
        assert!(Instant::now() < deadline, "agent on {} did not start", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of etcd's `grpc_server_handled_total`: every gRPC request it has answered.
pub(crate) fn etcd_requests(endpoint: &str) -> f64 {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("etcd metrics");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// ADDs `pods` addresses spread over `sockets`, 64 at a time; returns the elapsed time.
fn storm(sockets: &[std::path::PathBuf], pods: usize) -> Duration {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..64 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= pods {
                        return;
                    }
                    let client = Client::new(&sockets[i % sockets.len()], Duration::from_secs(120));
                    let _: Allocation = client.post("/v1/cni/add", &crate::add_request(format!("pod{i}"))).expect("cluster ADD");
                }
            });
        }
    });
    start.elapsed()
}

pub fn run(bin: &Path, nodes: usize, pods: usize) -> ClusterFigures {
    let pool = "default=10.128.0.0/12@26";
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let pool_file = dir.path().join("pool.yaml");
    std::fs::write(&pool_file, "apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: default\nspec:\n  ipv4:\n    cidrs: [10.128.0.0/12]\n    maskSize: 26\n").unwrap();
    let ok = allot(bin).args(["--etcd-endpoints", &etcd.endpoint, "pool", "apply", "-f"]).arg(&pool_file).status().unwrap().success();
    assert!(ok, "applying the bench pool");
    let _operator = Proc(allot(bin).args(["--etcd-endpoints", &etcd.endpoint, "operator", "--id", "bench"]).spawn().unwrap());
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..nodes {
        let socket = dir.path().join(format!("agent{i}.sock"));
        let child = allot(bin)
            .args(["agent", "--node", &format!("bench-{i}"), "--add-wait", "60s", "--etcd-endpoints", &etcd.endpoint])
            .arg("--data-dir")
            .arg(dir.path().join(format!("agent{i}")))
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap();
        agents.push(Proc(child));
        sockets.push(socket);
    }
    for s in &sockets {
        wait_ready(s);
    }
    // Let the idle reserve (default=8) be granted first, as on a cluster that is up.
    std::thread::sleep(Duration::from_secs(2));
    let before = etcd_requests(&etcd.endpoint);
    let cluster = storm(&sockets, pods);
    let requests = etcd_requests(&etcd.endpoint) - before;
    drop(agents);

    let standalone_dir = tempfile::tempdir().unwrap();
    let socket = standalone_dir.path().join("allot.sock");
    let _standalone = Proc(
        allot(bin)
            .args(["agent", "--node", "bench", "--add-wait", "60s", "--pool", pool, "--data-dir"])
            .arg(standalone_dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap(),
    );
    wait_ready(&socket);
    std::thread::sleep(Duration::from_secs(1));
    let standalone = storm(std::slice::from_ref(&socket), pods);
    ClusterFigures {
        nodes,
        pods,
        cluster_seconds: cluster.as_secs_f64(),
        etcd_requests_per_pod: requests / pods as f64,
        standalone_seconds: standalone.as_secs_f64(),
    }
}

pub fn print(c: &ClusterFigures) {
    println!("\n## Cluster mode ({} node agents, {} pods, one etcd; ADDs through each agent's API, 64 at a time)\n", c.nodes, c.pods);
    println!("| setup | time until all allocated | etcd requests per pod |\n|---|---:|---:|");
    println!("| {} agents over etcd | {:.2} s | {:.2} |", c.nodes, c.cluster_seconds, c.etcd_requests_per_pod);
    println!("| one standalone agent (embedded store) | {:.2} s | - |", c.standalone_seconds);
}
