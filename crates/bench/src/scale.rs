//! Cluster state at scale: N simulated nodes against one real etcd and a real `allot operator`
//! process, beside one real agent process. Each simulated node does what an agent does to the
//! store, through the real store code: registers, sets `requested` for 3 pools × 2 families,
//! and follows its blocks through the store's events. Then a steady churn: nodes raise their
//! request (the operator grants a block) and lower it again (the node gives the block back),
//! while ADDs go to the real agent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_client::Client;
use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_store::{Change, EtcdConfig, EtcdStore, Store, StoreEvent};
use allot_testkit::Etcd;
use allot_wire::{Allocation, Needed, Owner, OwnerRequest, PoolRequest};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::{Proc, allot, etcd_requests, wait_ready};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleFigures {
    pub nodes: usize,
    /// Blocks granted until every node's request was covered.
    pub grants: usize,
    /// From the first `requested` write until every node saw its blocks through its watch.
    pub seconds: f64,
    /// Registering every node (not part of `seconds`).
    pub register_seconds: f64,
    /// Part of `seconds`: until every node's `requested` write was acknowledged.
    pub requested_written_seconds: f64,
    /// Peak resident memory of the `allot operator` process (VmHWM).
    pub operator_peak_rss_mb: f64,
    /// Churn phase: store changes (revisions) and every gRPC request etcd served meanwhile,
    /// from all parts (simulated nodes, operator, the real agent), per change.
    pub churn_changes: u64,
    pub etcd_requests_per_change: f64,
    /// ADDs through the real agent's API during the churn, and their p99.
    pub churn_adds: usize,
    pub add_p99_ms: f64,
}

const POOLS: [&str; 3] = ["default", "blue", "green"];
/// Per pool and family: 40 addresses (one /26 or /122 block: 62 usable); churn raises v4 to
/// 100 (two blocks).
const LOW: u64 = 40;
const HIGH: u64 = 100;
/// Store connections the simulated nodes share (each one client and one watch).
const CONNECTIONS: usize = 16;

fn pools() -> Vec<Pool> {
    POOLS
        .iter()
        .enumerate()
        .map(|(i, name)| Pool {
            name: name.to_string(),
            spec: PoolSpec {
                ipv4: Some(FamilySpec { cidrs: vec![format!("10.{}.0.0/12", 64 + 16 * i).parse().unwrap()], mask_size: 26 }),
                ipv6: Some(FamilySpec { cidrs: vec![format!("fd00:{i}::/96").parse().unwrap()], mask_size: 122 }),
            },
        })
        .collect()
}

fn requested(high_default: bool) -> Vec<PoolRequest> {
    POOLS
        .iter()
        .map(|p| {
            let v4 = if high_default && *p == "default" { HIGH } else { LOW };
            PoolRequest { pool: p.to_string(), needed: Needed { ipv4_addrs: v4, ipv6_addrs: LOW } }
        })
        .collect()
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// Blocks each simulated node holds, as seen through the watch of its connection.
type Held = Arc<Mutex<HashMap<String, Vec<(String, IpNet)>>>>;

/// Follows the blocks of the nodes that use connection `conn` (index % CONNECTIONS).
fn follow(store: &EtcdStore, conn: usize, held: Held) {
    let mut events = store.events();
    let mine = move |node: &str| node.strip_prefix("sim-").and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i % CONNECTIONS == conn);
    tokio::spawn(async move {
        let mut holder: HashMap<(String, IpNet), String> = HashMap::new();
        loop {
            match events.recv().await {
                Ok(StoreEvent::Changes(changes)) => {
                    let mut h = held.lock().unwrap();
                    for (_, c) in changes.iter() {
                        let Change::Block { pool, cidr, node } = c else { continue };
                        let key = (pool.clone(), *cidr);
                        match node {
                            Some(n) if mine(n) => {
                                holder.insert(key.clone(), n.clone());
                                h.get_mut(n).expect("every simulated node is listed").push(key);
                            }
                            Some(_) => {}
                            None => {
                                if let Some(n) = holder.remove(&key) {
                                    h.get_mut(&n).expect("listed").retain(|b| *b != key);
                                }
                            }
                        }
                    }
                }
                Ok(StoreEvent::Resync) | Err(_) => panic!("the bench's watch fell behind; raise EVENT_BUFFER"),
            }
        }
    });
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs `f` for every index, `parallel` at a time.
async fn for_each<F, Fut>(n: usize, parallel: usize, f: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (next, f) = (next.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                f(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub fn run(bin: &Path, nodes: usize, churn: Duration) -> ScaleFigures {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let etcd = Etcd::start();
    let cfg = EtcdConfig::new(vec![etcd.endpoint.clone()]);
    let stores: Vec<EtcdStore> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..CONNECTIONS {
            v.push(EtcdStore::connect(&cfg).await.expect("connecting to the bench etcd"));
        }
        v
    });
    rt.block_on(stores[0].apply_pools(pools())).expect("applying the bench pools");

    let dir = tempfile::tempdir().unwrap();
    let operator = Proc(allot(bin).args(["--etcd-endpoints", &etcd.endpoint, "operator", "--id", "bench"]).spawn().unwrap());
    let socket = dir.path().join("agent.sock");
    let _agent = Proc(
        allot(bin)
            .args(["agent", "--node", "real-0", "--add-wait", "30s", "--etcd-endpoints", &etcd.endpoint])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap(),
    );
    wait_ready(&socket);

    let held: Held = Arc::new(Mutex::new((0..nodes).map(|i| (node_name(i), Vec::new())).collect()));
    let _guard = rt.enter();
    for (conn, s) in stores.iter().enumerate() {
        follow(s, conn, held.clone());
    }
    let stores = Arc::new(stores);

    let started = Instant::now();
    let s = stores.clone();
    rt.block_on(for_each(nodes, 256, move |i| {
        let s = s.clone();
        async move { s[i % CONNECTIONS].register_node(&node_name(i), None).await.expect("registering a node") }
    }));
    let register_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let s = stores.clone();
    rt.block_on(for_each(nodes, 256, move |i| {
        let s = s.clone();
        async move { s[i % CONNECTIONS].set_requested(&node_name(i), requested(false)).await.expect("writing requested") }
    }));
    let requested_written_seconds = started.elapsed().as_secs_f64();
    let want = POOLS.len() * 2;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = held.lock().unwrap().values().all(|b| b.len() >= want);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the simulated nodes did not converge within 10 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let grants: usize = held.lock().unwrap().values().map(Vec::len).sum();

    // Churn: each step raises one node's default v4 request, waits for the block, lowers it
    // again and gives the block back; ADDs and DELs go to the real agent meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let add_latencies = {
        let (stop, socket) = (stop.clone(), socket.clone());
        std::thread::spawn(move || {
            let client = Client::new(&socket, Duration::from_secs(30));
            let mut lat = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("churn{i}");
                let t = Instant::now();
                let _: Allocation = client.post("/v1/cni/add", &crate::add_request(id.clone())).expect("ADD during churn");
                lat.push(t.elapsed());
                let owner = Owner { network: "bench".into(), container_id: id, ifname: "eth0".into() };
                let _: Option<Allocation> = client.post("/v1/cni/del", &OwnerRequest { owner }).expect("DEL during churn");
                i += 1;
            }
            lat
        })
    };
    let rev_before = *stores[0].watch().borrow();
    let req_before = etcd_requests(&etcd.endpoint);
    let churn_end = Instant::now() + churn;
    let s = stores.clone();
    let h = held.clone();
    rt.block_on(for_each(nodes, 32, move |i| {
        let (s, h) = (s.clone(), h.clone());
        async move {
            if Instant::now() >= churn_end {
                return;
            }
            let name = node_name(i);
            let store = &s[i % CONNECTIONS];
            store.set_requested(&name, requested(true)).await.expect("raising a request");
            let count = || h.lock().unwrap()[&name].iter().filter(|(p, b)| p == "default" && b.addr().is_ipv4()).count();
            let wait = Instant::now() + Duration::from_secs(60);
            while count() < 2 {
                assert!(Instant::now() < wait, "{name}: no second block within 60 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            store.set_requested(&name, requested(false)).await.expect("lowering a request");
            let extra = h.lock().unwrap()[&name].iter().filter(|(p, b)| p == "default" && b.addr().is_ipv4()).map(|(_, b)| *b).max();
            if let Some(cidr) = extra {
                store.release_block(&BlockGrant { pool: "default".into(), cidr, node: name.clone() }).await.expect("giving a block back");
            }
        }
    }));
    // The last changes' reactions (grants) settle before counting.
    std::thread::sleep(Duration::from_millis(500));
    let rev_after = *stores[0].watch().borrow();
    let req_after = etcd_requests(&etcd.endpoint);
    stop.store(true, Ordering::SeqCst);
    let mut lat = add_latencies.join().unwrap();
    lat.sort();
    let add_p99_ms = lat.get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1))).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let churn_changes = rev_after.saturating_sub(rev_before);
    ScaleFigures {
        nodes,
        grants,
        seconds,
        register_seconds,
        requested_written_seconds,
        operator_peak_rss_mb: peak_rss_mb(operator.0.id()),
        churn_changes,
        etcd_requests_per_change: (req_after - req_before) / churn_changes.max(1) as f64,
        churn_adds: lat.len(),
        add_p99_ms,
    }
}

pub fn print(f: &ScaleFigures) {
    println!("\n## etcd at scale ({} simulated nodes × 3 pools × 2 families, one etcd, `allot operator`, one real agent)\n", f.nodes);
    println!("| figure | value |\n|---|---:|");
    println!("| nodes registered | {:.2} s |", f.register_seconds);
    println!("| {} blocks granted, every node's watch saw its own | {:.2} s |", f.grants, f.seconds);
    println!("| of which writing every node's `requested` | {:.2} s |", f.requested_written_seconds);
    println!("| operator peak RSS | {:.1} MB |", f.operator_peak_rss_mb);
    println!("| churn: etcd requests per change ({} changes) | {:.2} |", f.churn_changes, f.etcd_requests_per_change);
    println!("| churn: ADD p99 on the real agent ({} ADDs) | {:.2} ms |", f.churn_adds, f.add_p99_ms);
}

/// etcd requests per change with `agents` idle agent processes following the store: each
/// change is one namespace annotation written from here (its own get and txn included).
pub fn per_change(bin: &Path, agents: usize, changes: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let etcd = Etcd::start();
    let store = rt.block_on(EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()]))).expect("connecting to the bench etcd");
    rt.block_on(store.apply_pools(pools())).expect("applying the bench pools");
    let dir = tempfile::tempdir().unwrap();
    let _operator = Proc(allot(bin).args(["--etcd-endpoints", &etcd.endpoint, "operator", "--id", "bench"]).spawn().unwrap());
    let mut procs = Vec::new();
    for i in 0..agents {
        let socket = dir.path().join(format!("agent{i}.sock"));
        let child = allot(bin)
            .args(["agent", "--node", &format!("idle-{i}"), "--etcd-endpoints", &etcd.endpoint])
            .arg("--data-dir")
            .arg(dir.path().join(format!("agent{i}")))
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap();
        procs.push((Proc(child), socket));
    }
    for (_, s) in &procs {
        wait_ready(s);
    }
    // Let the idle reserve be granted and every agent settle.
    std::thread::sleep(Duration::from_secs(3));
    let before = etcd_requests(&etcd.endpoint);
    for i in 0..changes {
        rt.block_on(store.annotate_namespace(&format!("ns-{i}"), [("team".to_string(), "a".to_string())].into(), vec![])).unwrap();
        // One change at a time, as a person or a controller makes them.
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    (etcd_requests(&etcd.endpoint) - before) / changes as f64
}
