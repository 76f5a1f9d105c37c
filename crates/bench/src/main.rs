//! `allot-bench`: measures allot beside Debian's host-local plugin and the cost of spawning a
//! trivial process, in one run on one machine. Prints a table, writes the figures as JSON and
//! draws a chart of latency against live allocations.
//!
//! Run it as root with `scripts/bench.sh` (release build, packages installed).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use allot_client::Client;
use allot_wire::{AddRequest, Allocation, Owner, PodRef, Status};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod chart;
mod cluster;
mod scale;
mod inproc;
mod scrape;

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";
const TRUE: &str = "/bin/true";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub n: usize,
}

pub fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pick = |q: f64| ms(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    Latency {
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        mean_ms: samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64,
        n: samples.len(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPoint {
    pub live: usize,
    pub allot_add: Latency,
    pub allot_del: Latency,
    pub host_local_add: Latency,
    pub host_local_del: Latency,
    pub spawn_floor: Latency,
    /// allot-ipam CHECK against a server that answers at once: what any plugin that asks a
    /// daemon pays for two processes taking turns, before the daemon does any work.
    pub round_trip_floor: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Concurrency {
    pub streams: usize,
    pub adds: usize,
    pub per_second: f64,
    pub p99_ms: f64,
    pub distinct: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    exec: Vec<ExecPoint>,
    concurrency: Option<Concurrency>,
    core: Option<inproc::CoreFigures>,
    cluster: Option<cluster::ClusterFigures>,
    etcd_scale: Option<scale::ScaleFigures>,
    /// etcd requests per change with `--per-change-agents` idle agents following the store.
    etcd_requests_per_change: Option<PerChange>,
    scrape: Option<scrape::ScrapeFigures>,
}

#[derive(Debug, Serialize)]
struct PerChange {
    agents: usize,
    allot: PathBuf,
    requests_per_change: f64,
}

struct Args {
    ops: usize,
    levels: Vec<usize>,
    out: PathBuf,
    /// Parts to run: exec, core, cluster, etcd-scale, per-change, scrape (all by default).
    only: Vec<String>,
    etcd_nodes: usize,
    churn_seconds: u64,
    per_change_agents: usize,
    /// Where the `allot` binary the cluster parts start lives (default: beside this one).
    allot_bin: PathBuf,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        ops: 200,
        levels: vec![10, 1_000, 10_000],
        out: PathBuf::from("bench-out"),
        only: Vec::new(),
        etcd_nodes: 5_000,
        churn_seconds: 5,
        per_change_agents: 20,
        allot_bin: bin_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--ops" => a.ops = val().parse().expect("--ops N"),
            "--levels" => a.levels = val().split(',').map(|s| s.parse().expect("--levels N,N,...")).collect(),
            "--out" => a.out = PathBuf::from(val()),
            "--only" => a.only = val().split(',').map(String::from).collect(),
            "--etcd-nodes" => a.etcd_nodes = val().parse().expect("--etcd-nodes N"),
            "--churn-seconds" => a.churn_seconds = val().parse().expect("--churn-seconds N"),
            "--per-change-agents" => a.per_change_agents = val().parse().expect("--per-change-agents N"),
            "--allot-bin" => a.allot_bin = PathBuf::from(val()),
            "--chart-from" => {
                // Redraw the chart from a results.json of an earlier run.
                let path = PathBuf::from(val());
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("reading results")).expect("results JSON");
                let points: Vec<ExecPoint> = serde_json::from_value(v["exec"].clone()).expect("exec points");
                let out = path.with_file_name("latency.svg");
                std::fs::write(&out, chart::latency_chart(&points)).unwrap();
                println!("wrote {}", out.display());
                std::process::exit(0);
            }
            "--grants-child" => {
                inproc::grants_child();
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!(
                    "allot-bench [--ops N] [--levels 10,1000,10000] [--out DIR] [--only exec,core,cluster,etcd-scale,per-change,scrape]\n            [--etcd-nodes 5000] [--churn-seconds 5] [--per-change-agents 20] [--allot-bin DIR]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// An ADD for a container on the "bench" network, with nothing else set.
pub fn add_request(container_id: String) -> AddRequest {
    AddRequest {
        owner: Owner { network: "bench".into(), container_id, ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef::default(),
        pool: None,
        annotations: Default::default(),
        annotations_passed: false,
    }
}

fn bin_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// One exec of a CNI plugin (or /bin/true) as a runtime makes it; returns its wall time.
fn exec(plugin: &Path, command: &str, id: &str, conf: &[u8]) -> (Duration, bool, Vec<u8>) {
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", plugin.display()));
    // /bin/true exits without reading stdin: a broken pipe is expected there.
    let _ = child.stdin.take().unwrap().write_all(conf);
    let out = child.wait_with_output().unwrap();
    (start.elapsed(), out.status.success(), out.stdout)
}

/// Answers every request with a canned 404 from a plain thread: no work, no fsync.
struct TrivialServer {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TrivialServer {
    fn start() -> TrivialServer {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("trivial.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let body = br#"{"kind":"not_found","message":"trivial"}"#;
            let mut resp = format!("HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
            resp.extend_from_slice(body);
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(&resp);
            }
        });
        TrivialServer { socket, _dir: dir }
    }
}

struct AgentProc {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    fn start(pool: &str) -> AgentProc {
        Self::start_with(pool, &[])
    }

    fn start_with(pool: &str, extra: &[&str]) -> AgentProc {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("allot.sock");
        let child = Command::new(bin_dir().join("allot"))
            .args(["agent", "--node", "bench", "--add-wait", "30s", "--pool", pool, "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("starting allot agent (build with cargo build --release --workspace --bins)");
        let client = Client::new(&socket, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client.get::<Status>("/v1/status").is_ok_and(|s| s.ready) {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        AgentProc { child, socket, _dir: dir }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket, Duration::from_secs(60))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds allocations through the agent's API until `target` are live, 32 at a time.
fn populate_allot(agent: &AgentProc, from: usize, target: usize) {
    let next = std::sync::atomic::AtomicUsize::new(from);
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                let c = agent.client();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= target {
                        return;
                    }
                    let _: Allocation = c.post("/v1/cni/add", &add_request(format!("live{i}"))).expect("populating");
                }
            });
        }
    });
}

/// Writes host-local's on-disk records directly: one file per address holding "id\r\nifname".
fn populate_host_local(dir: &Path, from: usize, target: usize) {
    let net = dir.join("hlbench");
    std::fs::create_dir_all(&net).unwrap();
    for i in from..target {
        // 10.128.0.0/16 from .0.2 upwards; the measured ADDs land above these.
        let n = i + 2;
        let ip = format!("10.128.{}.{}", n / 256, n % 256);
        std::fs::write(net.join(ip), format!("live{i}\r\neth0")).unwrap();
    }
}

fn measure_point(live: usize, ops: usize, agent: &AgentProc, hl_dir: &Path, round: usize) -> ExecPoint {
    let allot_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
        "ipam": {"type": "allot-ipam", "socket": agent.socket}})
    .to_string();
    let hl_conf = json!({"cniVersion": "1.0.0", "name": "hlbench", "type": "bridge",
        "ipam": {"type": "host-local", "dataDir": hl_dir, "ranges": [[{"subnet": "10.128.0.0/16"}]]}})
    .to_string();
    // Wrapped the way a main plugin hands its config to the ipam plugin: the ipam plugin reads it whole.
    let ipam = bin_dir().join("allot-ipam");
    let once = |plugin: &Path, conf: &str, cmd: &str, id: &str| -> Duration {
        let (d, ok, out) = exec(plugin, cmd, id, conf.as_bytes());
        assert!(ok, "{} {cmd} failed: {}", plugin.display(), String::from_utf8_lossy(&out));
        d
    };
    let trivial = TrivialServer::start();
    let trivial_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
        "ipam": {"type": "allot-ipam", "socket": trivial.socket}})
    .to_string();
    // Interleaved, one call of each kind in turn: a slow moment of a shared machine (another
    // VM's disk flush) lands on every column alike, so the ratios between them hold.
    let mut allot_add = Vec::with_capacity(ops);
    let mut hl_add = Vec::with_capacity(ops);
    let mut floor = Vec::with_capacity(ops);
    let mut round_trip = Vec::with_capacity(ops);
    for i in 0..ops {
        let id = format!("m{round}x{i}");
        allot_add.push(once(&ipam, &allot_conf, "ADD", &id));
        hl_add.push(once(Path::new(HOST_LOCAL), &hl_conf, "ADD", &id));
        floor.push(once(Path::new(TRUE), &allot_conf, "ADD", &id));
        round_trip.push(exec(&ipam, "CHECK", &format!("t{round}x{i}"), trivial_conf.as_bytes()).0);
    }
    let mut allot_del = Vec::with_capacity(ops);
    let mut hl_del = Vec::with_capacity(ops);
    for i in 0..ops {
        let id = format!("m{round}x{i}");
        allot_del.push(once(&ipam, &allot_conf, "DEL", &id));
        hl_del.push(once(Path::new(HOST_LOCAL), &hl_conf, "DEL", &id));
    }
    ExecPoint {
        live,
        allot_add: latency(allot_add),
        allot_del: latency(allot_del),
        host_local_add: latency(hl_add),
        host_local_del: latency(hl_del),
        spawn_floor: latency(floor),
        round_trip_floor: latency(round_trip),
    }
}

fn concurrency(agent: &AgentProc, streams: usize, per_stream: usize) -> Concurrency {
    let conf = json!({"cniVersion": "1.0.0", "name": "conc", "type": "bridge",
        "ipam": {"type": "allot-ipam", "socket": agent.socket}})
    .to_string();
    let ipam = bin_dir().join("allot-ipam");
    let start = Instant::now();
    let results: Vec<(Duration, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|t| {
                let (ipam, conf) = (&ipam, &conf);
                s.spawn(move || {
                    (0..per_stream)
                        .map(|i| {
                            let (d, ok, out) = exec(ipam, "ADD", &format!("c{t}x{i}"), conf.as_bytes());
                            assert!(ok, "{}", String::from_utf8_lossy(&out));
                            (d, out)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed();
    let mut seen = HashSet::new();
    let mut distinct = true;
    for (_, out) in &results {
        let v: serde_json::Value = serde_json::from_slice(out).unwrap();
        for ip in v["ips"].as_array().unwrap() {
            distinct &= seen.insert(ip["address"].as_str().unwrap().to_string());
        }
    }
    let lat = latency(results.iter().map(|(d, _)| *d).collect());
    Concurrency {
        streams,
        adds: results.len(),
        per_second: results.len() as f64 / elapsed.as_secs_f64(),
        p99_ms: lat.p99_ms,
        distinct,
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

fn print_tables(r: &Report) {
    println!("\n## Exec'd CNI path (ms per call, sequential; ratio = allot / host-local)\n");
    println!("| live | allot ADD p50/p99 | host-local ADD p50/p99 | ADD ratio | allot DEL p50/p99 | host-local DEL p50/p99 | DEL ratio | spawn floor p50 | round-trip floor p50 | ADD / spawn floor |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &r.exec {
        println!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {:.2} | {:.2} | {} |",
            p.live,
            p.allot_add.p50_ms, p.allot_add.p99_ms,
            p.host_local_add.p50_ms, p.host_local_add.p99_ms,
            ratio(p.allot_add.p50_ms, p.host_local_add.p50_ms),
            p.allot_del.p50_ms, p.allot_del.p99_ms,
            p.host_local_del.p50_ms, p.host_local_del.p99_ms,
            ratio(p.allot_del.p50_ms, p.host_local_del.p50_ms),
            p.spawn_floor.p50_ms,
            p.round_trip_floor.p50_ms,
            ratio(p.allot_add.p50_ms, p.spawn_floor.p50_ms),
        );
    }
    if let (Some(first), Some(last)) = (r.exec.first(), r.exec.last()) {
        println!(
            "\nallot flatness {} -> {} live: ADD {} DEL {}",
            first.live,
            last.live,
            ratio(last.allot_add.p50_ms, first.allot_add.p50_ms),
            ratio(last.allot_del.p50_ms, first.allot_del.p50_ms)
        );
    }
    if let Some(c) = &r.concurrency {
        println!("\n## Concurrency ({} parallel ADD streams through allot-ipam)\n", c.streams);
        println!("| ADDs | per second | p99 ms | all distinct |\n|---:|---:|---:|---|");
        println!("| {} | {:.0} | {:.2} | {} |", c.adds, c.per_second, c.p99_ms, c.distinct);
    }
    if let Some(core) = &r.core {
        inproc::print_core(core);
    }
    if let Some(c) = &r.cluster {
        cluster::print(c);
    }
    if let Some(f) = &r.etcd_scale {
        scale::print(f);
    }
    if let Some(p) = &r.etcd_requests_per_change {
        println!("\n## etcd requests per change ({} idle agents, `{}`): {:.2}", p.agents, p.allot.display(), p.requests_per_change);
    }
    if let Some(s) = &r.scrape {
        scrape::print(s);
    }
}

fn main() {
    let args = parse_args();
    if args.runs("exec") {
        assert!(Path::new(HOST_LOCAL).exists(), "needs Debian's containernetworking-plugins (scripts/bench.sh installs it)");
    }
    std::fs::create_dir_all(&args.out).unwrap();

    let core = args.runs("core").then(|| {
        eprintln!("core, in process ...");
        inproc::run()
    });

    let mut exec_points = Vec::new();
    let mut conc = None;
    if args.runs("exec") {
        let agent = AgentProc::start("default=10.200.0.0/16@24");
        let hl = tempfile::tempdir().unwrap();
        let mut live = 0;
        for (round, &level) in args.levels.iter().enumerate() {
            eprintln!("exec'd path at {level} live allocations ...");
            populate_allot(&agent, live, level);
            populate_host_local(hl.path(), live, level);
            live = level;
            exec_points.push(measure_point(level, args.ops, &agent, hl.path(), round));
        }
        drop(agent);
        eprintln!("64 concurrent streams ...");
        let agent = AgentProc::start("default=10.201.0.0/16@24");
        conc = Some(concurrency(&agent, 64, 16));
    }

    let cluster = args.runs("cluster").then(|| {
        eprintln!("cluster: 30 agents, 3,000 pods over one etcd ...");
        cluster::run(&args.allot_bin, 30, 3_000)
    });

    let etcd_scale = args.runs("etcd-scale").then(|| {
        eprintln!("etcd at scale: {} simulated nodes ...", args.etcd_nodes);
        scale::run(&args.allot_bin, args.etcd_nodes, Duration::from_secs(args.churn_seconds))
    });
    let per_change = args.runs("per-change").then(|| {
        eprintln!("etcd requests per change with {} idle agents ...", args.per_change_agents);
        PerChange {
            agents: args.per_change_agents,
            allot: args.allot_bin.clone(),
            requests_per_change: scale::per_change(&args.allot_bin, args.per_change_agents, 20),
        }
    });

    let scrape = args.runs("scrape").then(|| {
        eprintln!("ADD with and without /metrics scrapes every 100 ms ...");
        let port = allot_testkit::free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let agent = AgentProc::start_with("default=10.202.0.0/16@24", &["--metrics-addr", &addr.to_string()]);
        let live = 1_000;
        populate_allot(&agent, 0, live);
        // Ten times --ops: enough seconds of ADDs for dozens of scrapes on each side.
        scrape::run(&bin_dir().join("allot-ipam"), &agent.socket, addr, live, args.ops * 10)
    });

    let report = Report { exec: exec_points, concurrency: conc, core, cluster, etcd_scale, etcd_requests_per_change: per_change, scrape };
    print_tables(&report);
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwrote {}", json_path.display());
    if !report.exec.is_empty() {
        let svg_path = args.out.join("latency.svg");
        std::fs::write(&svg_path, chart::latency_chart(&report.exec)).unwrap();
        println!("wrote {}", svg_path.display());
    }
}
