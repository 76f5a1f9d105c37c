//! Cluster mode end to end, as root: a real etcd, `allot operator` replicas and `allot agent`s
//! as separate processes; the last test builds a lab of node namespaces on a bridge and pings
//! between pods on different nodes over the agents' direct routes.

#![cfg(feature = "etcd")]

mod harness;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_store::{EtcdConfig, EtcdStore, Store};
use allot_testkit::Etcd;
use harness::*;
use ipnet::IpNet;
use serde_json::{Value, json};

fn ipam_plugin() -> std::path::PathBuf {
    bin_dir().join("allot-ipam")
}

fn conf(agent: &Agent, network: &str, ipam_extra: Value) -> Value {
    let mut ipam = json!({"type": "allot-ipam", "socket": agent.socket});
    if let Value::Object(m) = ipam_extra {
        ipam.as_object_mut().unwrap().extend(m);
    }
    json!({"cniVersion": "1.0.0", "name": network, "type": "bridge", "ipam": ipam})
}

fn add(agent: &Agent, id: &str) -> (i32, Value) {
    cni(&CniCall { plugin: &ipam_plugin(), command: "ADD", container_id: id, netns: "/x", ifname: "eth0", args: "" }, &conf(agent, "podnet", json!({})))
}

fn store_for(etcd: &Etcd) -> (tokio::runtime::Runtime, EtcdStore) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = rt.block_on(EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()]))).unwrap();
    (rt, store)
}

fn cluster_agent(etcd: &Etcd, node: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--etcd-endpoints", etcd.endpoint.as_str()];
    args.extend_from_slice(extra);
    Agent::start(node, &args)
}

fn apply(etcd: &Etcd, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pools.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, out, err) = allot(None, &["--etcd-endpoints", &etcd.endpoint, "pool", "apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "pool apply: {out}{err}");
}

fn pool_yaml(name: &str, cidr: &str, mask: u8) -> String {
    format!("apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  ipv4:\n    cidrs: [{cidr}]\n    maskSize: {mask}\n")
}

/// Every answered address is distinct, lies in a block its node holds, and no block has two
/// holders.
fn check_no_duplicates(rt: &tokio::runtime::Runtime, store: &EtcdStore, answered: &[(String, String)]) {
    let grants = rt.block_on(store.grants()).unwrap();
    let blocks: HashSet<IpNet> = grants.iter().map(|g| g.cidr).collect();
    assert_eq!(blocks.len(), grants.len(), "a block with two holders");
    let mut seen = HashSet::new();
    for (node, ip) in answered {
        assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        let addr: IpNet = ip.parse().unwrap();
        let holder = grants.iter().find(|g| g.cidr.contains(&addr.addr())).map(|g| g.node.as_str());
        assert_eq!(holder, Some(node.as_str()), "{ip} answered by {node} but its block is held by {holder:?}");
    }
}

#[test]
fn three_nodes_under_an_add_storm_with_small_blocks() {
    require_root();
    let etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-1");
    apply(&etcd, &pool_yaml("default", "10.240.0.0/20", 28));
    let mut agents: Vec<Agent> = (0..3).map(|i| cluster_agent(&etcd, &format!("node-{i}"), &["--add-wait", "30s"])).collect();
    let answered = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (n, agent) in agents.iter().enumerate() {
            for t in 0..8 {
                let answered = &answered;
                s.spawn(move || {
                    for i in 0..6 {
                        let (code, r) = add(agent, &format!("n{n}t{t}i{i}"));
                        assert_eq!(code, 0, "{r}\n{}", agent.log());
                        for ip in ips_of(&r) {
                            answered.lock().unwrap().push((agent.node.clone(), ip));
                        }
                    }
                });
            }
        }
    });
    let answered = answered.into_inner().unwrap();
    assert_eq!(answered.len(), 3 * 8 * 6);
    let (rt, store) = store_for(&etcd);
    check_no_duplicates(&rt, &store, &answered);
    let blocks = rt.block_on(store.grants()).unwrap().len();
    assert!(blocks >= 12, "48 addresses per node need at least 4 /28 blocks each; got {blocks}");

    // The CLI against the cluster: status per pool and per node, and removing a departed node.
    let (ok, out, err) = allot(None, &["--etcd-endpoints", &etcd.endpoint, "status"]);
    assert!(ok && out.contains("default") && out.contains("node-2"), "{out}{err}");
    // node-2 departs; deleting it gives its blocks back.
    agents[2].kill();
    let (ok, out, err) = allot(None, &["--etcd-endpoints", &etcd.endpoint, "node", "delete", "node-2", "--force"]);
    assert!(ok && out.contains("blocks released"), "{out}{err}");
    assert!(rt.block_on(store.grants()).unwrap().iter().all(|g| g.node != "node-2"));

    // Deleting a node whose agent still runs: the agent registers again and takes back the
    // blocks its pods use, so their addresses cannot go to another node.
    let node1: Vec<(String, String)> = answered.iter().filter(|(n, _)| n == "node-1").cloned().collect();
    let (ok, _, err) = allot(None, &["--etcd-endpoints", &etcd.endpoint, "node", "delete", "node-1", "--force"]);
    assert!(ok, "{err}");
    poll("node-1 back with its blocks", Duration::from_secs(15), || {
        let nodes = rt.block_on(store.nodes()).ok()?;
        nodes.iter().any(|n| n.name == "node-1").then_some(())?;
        let grants = rt.block_on(store.grants()).ok()?;
        node1
            .iter()
            .all(|(_, ip)| {
                let addr: IpNet = ip.parse().unwrap();
                grants.iter().any(|g| g.node == "node-1" && g.cidr.contains(&addr.addr()))
            })
            .then_some(())
    });
}

#[test]
fn the_leading_operator_killed_the_other_grants_the_next_blocks() {
    require_root();
    let etcd = Etcd::start();
    let (rt, store) = store_for(&etcd);
    let mut ops = [Operator::start(None, &etcd.endpoint, "op-a"), Operator::start(None, &etcd.endpoint, "op-b")];
    apply(&etcd, &pool_yaml("default", "10.241.0.0/24", 28));
    let agent = cluster_agent(&etcd, "node-l", &["--add-wait", "30s", "--pre-allocation", "default=0"]);
    assert_eq!(add(&agent, "first").0, 0);
    let leader = poll("a leader", Duration::from_secs(10), || rt.block_on(store.leader("operator")).unwrap());
    let (dead, alive) = if leader == "op-a" { (0, "op-b") } else { (1, "op-a") };
    ops[dead].kill();
    let killed = Instant::now();
    // 14 addresses per block: these ADDs need a second block, which only the survivor can grant.
    for i in 0..20 {
        let (code, r) = add(&agent, &format!("after{i}"));
        assert_eq!(code, 0, "{r}\n{}", ops[1 - dead].log());
    }
    assert!(killed.elapsed() < Duration::from_secs(20), "took {:?}", killed.elapsed());
    assert_eq!(rt.block_on(store.leader("operator")).unwrap().as_deref(), Some(alive));
    assert!(rt.block_on(store.grants()).unwrap().len() >= 2);
}

#[test]
fn an_agent_killed_mid_storm_keeps_every_allocation_it_answered() {
    require_root();
    let etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-1");
    apply(&etcd, &pool_yaml("default", "10.242.0.0/20", 28));
    let mut agent = cluster_agent(&etcd, "node-k", &["--add-wait", "30s"]);
    let answered: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (answered, stop) = (answered.clone(), stop.clone());
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                let conf = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "ipam": {"type": "allot-ipam", "socket": socket}});
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let id = format!("t{t}i{i}");
                    let (code, r) = cni(&CniCall { plugin: &ipam_plugin(), command: "ADD", container_id: &id, netns: "/x", ifname: "eth0", args: "" }, &conf);
                    if code == 0 {
                        answered.lock().unwrap().insert(id, ips_of(&r)[0].clone());
                    }
                    i += 1;
                }
            })
        })
        .collect();
    poll("a few answers", Duration::from_secs(20), || (answered.lock().unwrap().len() >= 40).then_some(()));
    agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    agent.spawn();
    let held: HashMap<String, String> = agent
        .cli_json(&["allocations", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["containerID"].as_str().unwrap().to_string(), r["ip"].as_str().unwrap().to_string()))
        .collect();
    for (id, ip) in &answered {
        let addr = ip.split('/').next().unwrap();
        assert_eq!(held.get(id).map(String::as_str), Some(addr), "{id} was answered {ip} but is not held after the restart");
    }
    let (rt, store) = store_for(&etcd);
    let pairs: Vec<(String, String)> = answered.values().map(|ip| ("node-k".to_string(), ip.clone())).collect();
    check_no_duplicates(&rt, &store, &pairs);
}

#[test]
fn with_etcd_away_nodes_with_room_keep_serving_and_then_converge() {
    require_root();
    let mut etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-1");
    apply(&etcd, &pool_yaml("default", "10.243.0.0/20", 26));
    let agents: Vec<Agent> = (0..2).map(|i| cluster_agent(&etcd, &format!("node-{i}"), &["--add-wait", "30s", "--reserve-gateway=false"])).collect();
    for a in &agents {
        assert_eq!(add(a, &format!("{}-warm", a.node)).0, 0);
    }
    // Frozen etcd (SIGSTOP): requests hang rather than fail. The ADD path must not care.
    etcd.freeze(true);
    for a in &agents {
        for i in 0..5 {
            let t = Instant::now();
            let (code, r) = add(a, &format!("{}-frozen{i}", a.node));
            assert_eq!(code, 0, "{r}");
            assert!(t.elapsed() < Duration::from_secs(1), "ADD waited on frozen etcd: {:?}", t.elapsed());
        }
    }
    etcd.freeze(false);
    // Stopped etcd for several seconds: still serving; DEL too.
    etcd.stop();
    let down = Instant::now();
    for a in &agents {
        for i in 0..5 {
            assert_eq!(add(a, &format!("{}-down{i}", a.node)).0, 0);
        }
        let del = CniCall { plugin: &ipam_plugin(), command: "DEL", container_id: &format!("{}-down0", a.node), netns: "/x", ifname: "eth0", args: "" };
        assert_eq!(cni(&del, &conf(a, "podnet", json!({}))).0, 0);
    }
    // A node whose blocks are full waits for etcd to come back, and gets its block then.
    let full = &agents[0];
    let waiting = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut last = (0, Value::Null);
            for i in 0..62 {
                last = add(full, &format!("fill{i}"));
                if last.0 != 0 {
                    break;
                }
            }
            last
        });
        std::thread::sleep(Duration::from_secs(4).saturating_sub(down.elapsed()));
        etcd.restart();
        h.join().unwrap()
    });
    assert_eq!(waiting.0, 0, "{}", waiting.1);
    // Converged: each node's requested in etcd matches what it holds, within a few seconds.
    let (rt, store) = store_for(&etcd);
    for a in &agents {
        let in_use = a.cli_json(&["allocations", "list"]).as_array().unwrap().len() as u64;
        let want = allot_core::demand::needed(in_use, 0, 8);
        poll(&format!("{} requested {want}", a.node), Duration::from_secs(10), || {
            let nodes = rt.block_on(store.nodes()).ok()?;
            let n = nodes.iter().find(|n| n.name == a.node)?;
            (n.requested.iter().find(|r| r.pool == "default")?.needed.ipv4_addrs == want).then_some(())
        });
    }
}

/// The lab: a fabric namespace with a bridge and etcd; nodes as namespaces on it, each with an
/// agent (direct routes, gateway reserved); pods as namespaces wired by the bridge plugin inside
/// their node.
struct Lab {
    fabric: Netns,
    nodes: Vec<(Netns, String)>,
    etcd: Option<Etcd>,
}

impl Lab {
    fn new(nodes: usize) -> Lab {
        let fabric = Netns::new();
        netns_exec(&fabric.name, &["ip", "link", "set", "lo", "up"]);
        netns_exec(&fabric.name, &["ip", "link", "add", "fab0", "type", "bridge"]);
        netns_exec(&fabric.name, &["ip", "addr", "add", "10.250.0.1/24", "dev", "fab0"]);
        netns_exec(&fabric.name, &["ip", "link", "set", "fab0", "up"]);
        let mut out = Vec::new();
        for i in 0..nodes {
            let ns = Netns::new();
            let ip = format!("10.250.0.{}", 10 + i);
            let port = format!("port{i}");
            run(&["ip", "link", "add", &port, "netns", &fabric.name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
            netns_exec(&fabric.name, &["ip", "link", "set", &port, "master", "fab0", "up"]);
            netns_exec(&ns.name, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            netns_exec(&ns.name, &["ip", "link", "set", "eth0", "up"]);
            netns_exec(&ns.name, &["ip", "link", "set", "lo", "up"]);
            netns_exec(&ns.name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            out.push((ns, ip));
        }
        let etcd = Etcd::start_in(&fabric.name, "10.250.0.1");
        Lab { fabric, nodes: out, etcd: Some(etcd) }
    }

    fn endpoint(&self) -> String {
        self.etcd.as_ref().unwrap().endpoint.clone()
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let endpoint = self.endpoint();
        let mut full = vec!["--etcd-endpoints", endpoint.as_str()];
        full.extend_from_slice(args);
        allot(Some(&self.fabric.name), &full)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // etcd lives in the fabric namespace: stop it before the namespace goes.
        self.etcd.take();
    }
}

struct LabPod {
    ns: Netns,
    ip: String,
}

fn lab_pod(node: &(Netns, String), agent: &Agent, id: &str, pool: &str) -> LabPod {
    let ns = Netns::new();
    // The bridge plugin allows one IPv4 gateway per bridge: one bridge per pool on each node.
    let conf = json!({
        "cniVersion": "1.0.0", "name": "labnet", "type": "bridge", "bridge": format!("br-{pool}"),
        "isGateway": true, "isDefaultGateway": true,
        "ipam": {"type": "allot-ipam", "socket": agent.socket},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"ipam.cilium.io/ip-pool": pool}}
    });
    let call = CniCall {
        plugin: Path::new("/usr/lib/cni/bridge"),
        command: "ADD",
        container_id: id,
        netns: &ns.path(),
        ifname: "eth0",
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default",
    };
    let (code, result) = cni_in(Some(&node.0.name), &call, &conf);
    assert_eq!(code, 0, "bridge ADD {id} on {}: {result}\n{}", node.0.name, agent.log());
    let ip = ips_of(&result)[0].split('/').next().unwrap().to_string();
    LabPod { ns, ip }
}

fn ping(from: &LabPod, to: &LabPod) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", &from.ns.name, "ping", "-c", "2", "-W", "2", &to.ip])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn pods_in_two_pools_ping_across_nodes_over_direct_routes() {
    require_root();
    let lab = Lab::new(2);
    let endpoint = lab.endpoint();
    let deadline = Instant::now() + Duration::from_secs(20);
    let yaml = format!("{}---\n{}", pool_yaml("blue", "10.210.0.0/16", 24), pool_yaml("green", "10.220.0.0/16", 24));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pools.yaml");
    std::fs::write(&f, yaml).unwrap();
    loop {
        let (ok, _, err) = lab.cli(&["pool", "apply", "-f", f.to_str().unwrap()]);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "etcd in the lab did not answer: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _op = Operator::start(Some(&lab.fabric.name), &endpoint, "lab-op");
    let agents: Vec<Agent> = lab
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (ns, ip))| {
            Agent::start_in(
                Some(&ns.name),
                &format!("lab-node-{i}"),
                &["--etcd-endpoints", &endpoint, "--node-ip", ip, "--auto-direct-node-routes", "--reserve-gateway", "--pre-allocation", "blue=0,green=0", "--add-wait", "20s"],
            )
        })
        .collect();
    let a_blue = lab_pod(&lab.nodes[0], &agents[0], "a-blue", "blue");
    let a_green = lab_pod(&lab.nodes[0], &agents[0], "a-green", "green");
    let b_blue = lab_pod(&lab.nodes[1], &agents[1], "b-blue", "blue");
    let b_green = lab_pod(&lab.nodes[1], &agents[1], "b-green", "green");
    assert!(a_blue.ip.starts_with("10.210.") && b_blue.ip.starts_with("10.210."), "{} {}", a_blue.ip, b_blue.ip);
    assert!(a_green.ip.starts_with("10.220.") && b_green.ip.starts_with("10.220."), "{} {}", a_green.ip, b_green.ip);

    // Each node routes the other's blocks via the other's IP.
    let routes_on = |i: usize| netns_exec(&lab.nodes[i].0.name, &["ip", "route", "show", "proto", "0xa1"]);
    poll("direct routes to both of node 1's blocks", Duration::from_secs(10), || {
        (routes_on(0).matches("via 10.250.0.11").count() >= 2).then_some(())
    });
    let r0 = routes_on(0);
    assert!(r0.contains("via 10.250.0.11"), "{r0}");
    for pod in [&b_blue, &b_green] {
        let block = format!("{}.0/24", pod.ip.rsplit_once('.').unwrap().0);
        assert!(r0.contains(&block), "node 0 has no route to {block}: {r0}");
    }

    for (from, to, what) in [(&a_blue, &b_blue, "blue to blue"), (&a_green, &b_green, "green to green"), (&b_green, &a_blue, "green to blue")] {
        assert!(ping(from, to), "{what}: {} cannot reach {}\nroutes:\n{}", from.ip, to.ip, routes_on(0));
    }

    // A block that goes away takes its route with it: green on node 1 empties and is released.
    let conf = json!({"cniVersion": "1.0.0", "name": "labnet", "type": "bridge", "bridge": "br-green", "isGateway": true,
        "ipam": {"type": "allot-ipam", "socket": agents[1].socket}});
    let del = CniCall { plugin: Path::new("/usr/lib/cni/bridge"), command: "DEL", container_id: "b-green", netns: &b_green.ns.path(), ifname: "eth0", args: "" };
    assert_eq!(cni_in(Some(&lab.nodes[1].0.name), &del, &conf).0, 0);
    let green_block = format!("{}.0/24", b_green.ip.rsplit_once('.').unwrap().0);
    poll("the released block's route to go", Duration::from_secs(10), || (!routes_on(0).contains(&green_block)).then_some(()));
}

#[test]
fn the_cli_against_etcd_and_two_clis_racing() {
    require_root();
    let etcd = Etcd::start();
    let e = etcd.endpoint.as_str();
    let cli = |args: &[&str]| {
        let mut full = vec!["--etcd-endpoints", e];
        full.extend_from_slice(args);
        allot(None, &full)
    };
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // Two CLIs apply overlapping pools at the same moment: the store transaction lets one in.
    let (a, b) = (file("a.yaml", &pool_yaml("race-a", "10.60.0.0/16", 24)), file("b.yaml", &pool_yaml("race-b", "10.60.128.0/17", 24)));
    let results: Vec<(bool, String, String)> = std::thread::scope(|s| {
        let ha = s.spawn(|| cli(&["pool", "apply", "-f", &a]));
        let hb = s.spawn(|| cli(&["pool", "apply", "-f", &b]));
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    assert_eq!(results.iter().filter(|r| r.0).count(), 1, "{results:?}");
    assert!(results.iter().any(|r| !r.0 && r.2.contains("overlaps")), "{results:?}");

    let (ok, out, err) = cli(&["pool", "list", "-o", "json"]);
    assert!(ok, "{err}");
    let pools: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pools.as_array().unwrap().len(), 1);
    let name = pools[0]["metadata"]["name"].as_str().unwrap().to_string();
    let (ok, yaml, _) = cli(&["pool", "get", &name, "-o", "yaml"]);
    assert!(ok && yaml.contains("maskSize: 24"), "{yaml}");
    let (ok, _, err) = cli(&["namespace", "annotate", "team-a", "ipam.cilium.io/ip-pool=x"]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&["namespace", "list"]);
    assert!(ok && out.contains("team-a") && out.contains("ipam.cilium.io/ip-pool=x"), "{out}");
    let (ok, out, _) = cli(&["node", "list"]);
    assert!(ok && out.contains("No resources found."), "{out}");
    let (ok, _, err) = cli(&["node", "get"]);
    assert!(!ok && err.contains("name the node"), "{err}");
    let (ok, _, err) = cli(&["allocations", "list"]);
    assert!(!ok && err.contains("lives on each node"), "{err}");
    let (ok, _, err) = cli(&["pool", "delete", &name]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&["pool", "list"]);
    assert!(ok && out.contains("No resources found."), "{out}");
    let (ok, _, err) = allot(None, &["--etcd-endpoints", "http://127.0.0.1:1", "pool", "list"]);
    assert!(!ok && err.contains("127.0.0.1:1"), "{err}");
}
