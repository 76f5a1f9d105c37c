//! Cluster state at scale, as root: agents and the operator follow the store's events instead
//! of re-reading it, so a change costs etcd a constant number of requests however many agents
//! follow; and a small run of the 5,000-node benchmark's code.

#![cfg(feature = "etcd")]

mod harness;

use std::time::Duration;

use allot_client::Client;
use allot_store::{EtcdConfig, EtcdStore, Store};
use allot_testkit::Etcd;
use allot_wire::{AddRequest, Allocation, Needed, Owner, PodRef, PoolRequest};
use harness::*;

/// Every gRPC request etcd has answered (`grpc_server_handled_total`).
fn etcd_requests(etcd: &Etcd) -> f64 {
    use std::io::{Read, Write};
    let addr = etcd.endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pool_yaml(name: &str, cidr: &str) -> String {
    format!("apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  ipv4:\n    cidrs: [{cidr}]\n    maskSize: 26\n")
}

/// With 8 agents and the operator following, a namespace annotation costs etcd only the
/// writer's own requests (before: every agent and the operator listed pools, namespaces,
/// blocks and nodes: about 4 requests each per change), and the agents still act on it: a
/// pod of the annotated namespace lands in the pool it names. A change to one node's request
/// costs a few requests (the write, the operator's batched grant), not a re-read by everyone.
#[test]
fn followers_cost_etcd_no_reads_per_change() {
    require_root();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pools.yaml");
    std::fs::write(&f, format!("{}---\n{}", pool_yaml("default", "10.60.0.0/16"), pool_yaml("blue", "10.61.0.0/16"))).unwrap();
    let (ok, out, err) = allot(None, &["--etcd-endpoints", &etcd.endpoint, "pool", "apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "pool apply: {out}{err}");
    let _op = Operator::start(None, &etcd.endpoint, "op-scale");
    let agents: Vec<Agent> = (0..8).map(|i| Agent::start(&format!("sc-{i}"), &["--etcd-endpoints", etcd.endpoint.as_str()])).collect();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = rt.block_on(EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()]))).unwrap();
    // Settled: every agent holds its idle reserve.
    poll("every agent holds a block", Duration::from_secs(20), || {
        let grants = rt.block_on(store.grants()).ok()?;
        (0..8).all(|i| grants.iter().any(|g| g.node == format!("sc-{i}"))).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));

    let changes = 10;
    let before = etcd_requests(&etcd);
    for i in 0..changes {
        let set = [("ipam.cilium.io/ip-pool".to_string(), "blue".to_string())].into();
        rt.block_on(store.annotate_namespace(&format!("team-{i}"), set, vec![])).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let per_change = (etcd_requests(&etcd) - before) / f64::from(changes);
    println!("{per_change:.2} etcd requests per namespace annotation with 8 agents and the operator following");
    // The writer's own get and txn, plus keep-alives and progress requests in the window.
    assert!(per_change <= 4.0, "{per_change:.2} etcd requests per change: followers re-read the store");

    // The agents saw the annotation through their events.
    let client = Client::new(&agents[3].socket, Duration::from_secs(10));
    let add = AddRequest {
        owner: Owner { network: "net".into(), container_id: "c1".into(), ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef { namespace: Some(format!("team-{}", changes - 1)), name: Some("p".into()) },
        pool: None,
        annotations: Default::default(),
        annotations_passed: false,
    };
    let a: Allocation = client.post("/v1/cni/add", &add).unwrap();
    assert_eq!(a.ips[0].pool, "blue", "{a:?}");

    // One node's request: its write, the operator's grant in one batch; nobody re-reads.
    rt.block_on(store.register_node("sc-virtual", None)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = etcd_requests(&etcd);
    let want = vec![PoolRequest { pool: "default".into(), needed: Needed { ipv4_addrs: 200, ipv6_addrs: 0 } }];
    rt.block_on(store.set_requested("sc-virtual", want)).unwrap();
    let held = poll("the operator grants sc-virtual's blocks", Duration::from_secs(10), || {
        let n = rt.block_on(store.grants()).ok()?.iter().filter(|g| g.node == "sc-virtual").count();
        (n >= 4).then_some(n)
    });
    assert_eq!(held, 4, "200 addresses need four /26 blocks (62 usable each)");
    std::thread::sleep(Duration::from_millis(300));
    // set_requested (get, txn), the operator's pool read and one txn for all four blocks,
    // and the test's own polling reads.
    let spent = etcd_requests(&etcd) - before;
    println!("{spent} etcd requests for one node's request of four blocks");
    assert!(spent <= 16.0, "{spent} etcd requests for one request change");
}

/// The benchmark's etcd-scale part at 40 nodes: every node converges, the churn runs, and the
/// figures land in results.json.
#[test]
fn etcd_scale_bench_smoke() {
    require_root();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(bin_dir().join("allot-bench"))
        .args(["--only", "etcd-scale", "--etcd-nodes", "40", "--churn-seconds", "1", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let s = &v["etcd_scale"];
    assert_eq!(s["nodes"], 40);
    assert_eq!(s["grants"], 240, "40 nodes × 3 pools × 2 families, one block each: {s}");
    assert!(s["churn_changes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["operator_peak_rss_mb"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["churn_adds"].as_u64().unwrap() > 0, "{s}");
    assert!(s["etcd_requests_per_change"].as_f64().unwrap() < 10.0, "{s}");
}
