//! The agent under faults, as root, with real processes: a second agent on one data dir, a
//! full disk, a restart with etcd stopped, STATUS during outages, pools used the moment they are
//! applied, GC that cannot see namespaces, next-fit and gateways across restarts, and a direct
//! route that cannot be installed.

mod harness;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use allot_testkit::Etcd;
use allot_wire::{AddRequest, Allocation, Owner, OwnerRequest, PodRef, Status};
use harness::*;
use serde_json::{Value, json};

fn ipam_plugin() -> std::path::PathBuf {
    bin_dir().join("allot-ipam")
}

fn conf(agent: &Agent, version: &str) -> Value {
    json!({"cniVersion": version, "name": "podnet", "type": "ptp", "ipam": {"type": "allot-ipam", "socket": agent.socket}})
}

/// Runs allot-ipam; returns 0 on success, else the CNI error code of its JSON answer.
fn plugin(agent: &Agent, command: &str, id: &str) -> (i64, Value) {
    let version = if command == "STATUS" { "1.1.0" } else { "1.0.0" };
    let call = CniCall { plugin: &ipam_plugin(), command, container_id: id, netns: "/x", ifname: "eth0", args: "" };
    let (exit, r) = cni(&call, &conf(agent, version));
    if exit == 0 { (0, r) } else { (r["code"].as_i64().unwrap_or(-1), r) }
}

fn request(id: &str, netns: &str) -> AddRequest {
    AddRequest {
        owner: Owner { network: "podnet".into(), container_id: id.into(), ifname: "eth0".into() },
        netns: netns.into(),
        pod: PodRef::default(),
        pool: None,
        annotations: BTreeMap::new(),
        annotations_passed: false,
    }
}

fn api_add(agent: &Agent, id: &str) -> Allocation {
    agent.client().post("/v1/cni/add", &request(id, "")).unwrap_or_else(|e| panic!("ADD {id}: {e}"))
}

fn api_del(agent: &Agent, id: &str) {
    let _: Option<Allocation> = agent.client().post("/v1/cni/del", &OwnerRequest { owner: request(id, "").owner }).unwrap();
}

fn held(agent: &Agent) -> BTreeMap<String, String> {
    let list: Vec<Allocation> = agent.client().get("/v1/allocations").unwrap();
    list.into_iter().map(|a| (a.owner.container_id, a.ips[0].address.addr().to_string())).collect()
}

fn status(agent: &Agent) -> Status {
    agent.client().get("/v1/status").unwrap()
}

fn cluster_agent(etcd: &Etcd, node: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--etcd-endpoints", etcd.endpoint.as_str()];
    args.extend_from_slice(extra);
    Agent::start(node, &args)
}

fn apply_pools(endpoint: &str, netns: Option<&str>, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pools.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, out, err) = allot(netns, &["--etcd-endpoints", endpoint, "pool", "apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "pool apply: {out}{err}");
}

fn pool_yaml(name: &str, cidr: &str, mask: u8) -> String {
    format!("apiVersion: cilium.io/v2alpha1\nkind: CiliumPodIPPool\nmetadata:\n  name: {name}\nspec:\n  ipv4:\n    cidrs: [{cidr}]\n    maskSize: {mask}\n")
}

#[test]
fn a_second_agent_on_one_data_dir_is_refused_and_changes_nothing() {
    require_root();
    let mut agent = Agent::start("node-lock", &["--pool", "default=10.80.0.0/20@24"]);
    let mut answered: BTreeMap<String, String> =
        (0..200).map(|i| format!("c{i}")).map(|id| (id.clone(), api_add(&agent, &id).ips[0].address.addr().to_string())).collect();
    // Second starts while the live agent keeps answering ADDs, as in a botched rollout.
    let busy = std::thread::scope(|s| {
        let adds = s.spawn(|| (0..400).map(|i| format!("busy{i}")).map(|id| (id.clone(), api_add(&agent, &id).ips[0].address.addr().to_string())).collect::<Vec<_>>());
        for _ in 0..3 {
            let other = agent.dir.path().join("other.sock");
            let t = Instant::now();
            let mut child = Command::new(bin_dir().join("allot"))
                .args(["agent", "--node", "node-lock", "--data-dir"])
                .arg(agent.data_dir())
                .arg("--socket")
                .arg(&other)
                .args(["--pool", "default=10.80.0.0/20@24"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let exited = poll("the second agent exits", Duration::from_secs(5), || child.try_wait().unwrap());
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(!exited.success(), "a second agent on one data dir must not start");
            assert!(err.contains("in use by another allot agent") && err.contains(&format!("pid {}", agent.pid())), "{err}");
            assert!(t.elapsed() < Duration::from_secs(5), "refused at once, not after a timeout");
            assert!(!other.exists(), "the second agent bound no socket");
        }
        adds.join().unwrap()
    });
    answered.extend(busy);
    assert_eq!(held(&agent), answered, "the live agent still serves every allocation");
    agent.kill();
    agent.spawn();
    assert_eq!(held(&agent), answered, "every acknowledged allocation survives the restart");
    let next = api_add(&agent, "after").ips[0].address.addr().to_string();
    assert!(!answered.values().any(|ip| *ip == next), "{next} handed out twice");

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agent.data_dir()), 0o700, "data dir");
    for f in ["allocations.journal", "cluster.redb", "agent.lock", "cluster-view.json"] {
        assert_eq!(mode(&agent.data_dir().join(f)), 0o600, "{f}");
    }
}

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        run(&["mount", "-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs", dir.to_str().unwrap()]);
        Tmpfs(dir.to_path_buf())
    }

    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0x5au8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0x5a]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_during_adds_loses_nothing_acknowledged() {
    require_root();
    let mut agent = Agent::unstarted(None, "node-full", &["--pool", "default=10.81.0.0/16@20", "--add-wait", "1s"]);
    let disk = Tmpfs::mount(&agent.data_dir(), "24m");
    agent.spawn();
    api_add(&agent, "warm");
    let filler = disk.fill();
    // Big records fill the journal's preallocated room quickly.
    let netns = format!("/var/run/netns/{}", "x".repeat(48 << 10));
    let mut acknowledged = BTreeMap::new();
    let mut failures = 0;
    for i in 0..400 {
        let id = format!("p{i}");
        match agent.client().post::<_, Allocation>("/v1/cni/add", &request(&id, &netns)) {
            Ok(a) => {
                acknowledged.insert(id, a.ips[0].address.addr().to_string());
            }
            Err(e) => {
                failures += 1;
                assert!(e.to_string().contains("allocation journal"), "{e}");
                if failures == 20 {
                    break;
                }
            }
        }
    }
    assert_eq!(failures, 20, "the disk filled up (acknowledged {})", acknowledged.len());
    // DEL cannot be recorded either, and must not pretend it was.
    let first = acknowledged.keys().next().unwrap().clone();
    let e = agent.client().post::<_, Option<Allocation>>("/v1/cni/del", &OwnerRequest { owner: request(&first, "").owner }).unwrap_err();
    assert!(e.to_string().contains("allocation journal"), "{e}");
    std::fs::remove_file(filler).unwrap();
    let (code, r) = plugin(&agent, "ADD", "after-room");
    assert_eq!(code, 0, "recovers once there is room: {r}");
    acknowledged.insert("after-room".into(), r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string());
    agent.kill();
    agent.spawn();
    let mut after = held(&agent);
    after.remove("warm");
    assert_eq!(after, acknowledged, "exactly the acknowledged allocations after the restart");
    let distinct: HashSet<&String> = after.values().collect();
    assert_eq!(distinct.len(), after.len(), "no address twice");
    assert!(agent.log().contains("allocation journal recovered"), "{}", agent.log());
    agent.kill();
}

#[test]
fn gc_refuses_when_no_network_namespace_is_visible() {
    require_root();
    let agent = Agent::start("node-gc", &["--pool", "default=10.82.0.0/24@26"]);
    for id in ["a", "b"] {
        let _: Allocation = agent.client().post("/v1/cni/add", &request(id, &format!("/var/run/netns/invisible-{id}"))).unwrap();
    }
    for args in [&["gc"][..], &["gc", "--force"]] {
        let (ok, out, err) = agent.cli(args);
        assert!(!ok, "{args:?} must refuse: {out}");
        assert!(err.contains("none of the 2 allocations' network namespaces is visible") && err.contains("/var/run/netns"), "{err}");
    }
    assert_eq!(held(&agent).len(), 2, "nothing released");
}

#[test]
fn next_fit_continues_across_a_restart() {
    require_root();
    let mut agent = Agent::start("node-nf", &["--pool", "default=10.83.0.0/24@24"]);
    let a = api_add(&agent, "a").ips[0].address.addr();
    api_add(&agent, "b");
    let c = api_add(&agent, "c").ips[0].address.addr();
    api_del(&agent, "c");
    agent.kill();
    agent.spawn();
    let d = api_add(&agent, "d").ips[0].address.addr();
    assert_ne!(d, c, "the address freed just before the restart came straight back");
    assert_ne!(d, a);
    agent.terminate();
    agent.spawn();
    let e = api_add(&agent, "e").ips[0].address.addr();
    assert!(e > d, "next-fit goes on after {d}, got {e}");
}

#[test]
fn toggling_the_gateway_reservation_never_hands_out_a_gateway() {
    require_root();
    // On, then off: the address pods were given as their gateway stays the node's.
    let mut agent = Agent::start("node-gw", &["--pool", "default=10.84.0.0/24@24", "--reserve-gateway"]);
    let a = api_add(&agent, "a");
    let gateway = a.ips[0].gateway.expect("a gateway while reserved");
    agent.terminate();
    agent.args.retain(|s| s != "--reserve-gateway");
    agent.args.push("--reserve-gateway=false".into());
    agent.spawn();
    for i in 0..5 {
        let p = api_add(&agent, &format!("off{i}"));
        assert_ne!(p.ips[0].address.addr(), gateway, "a pod got the gateway pods already use");
    }
    // Off, then on: a block whose first address a pod holds reserves no gateway.
    let mut agent = Agent::start("node-gw2", &["--pool", "default=10.85.0.0/24@24", "--reserve-gateway=false"]);
    let first = api_add(&agent, "first");
    assert_eq!(first.ips[0].address.addr().to_string(), "10.85.0.1");
    agent.terminate();
    agent.args.retain(|s| s != "--reserve-gateway=false");
    agent.args.push("--reserve-gateway".into());
    agent.spawn();
    let p = api_add(&agent, "later");
    assert_ne!(p.ips[0].gateway, Some(first.ips[0].address.addr()), "the gateway given out is a pod's address");
    assert!(agent.log().contains("the block's gateway address is a pod's"), "{}", agent.log());
}

#[test]
fn an_agent_restarted_with_etcd_stopped_serves_add_and_del() {
    require_root();
    let mut etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-outage");
    apply_pools(&etcd.endpoint, None, &pool_yaml("default", "10.86.0.0/20", 24));
    let mut agent = cluster_agent(&etcd, "node-out", &["--add-wait", "2s"]);
    let before = api_add(&agent, "before");
    agent.kill();
    etcd.stop();
    let t = Instant::now();
    agent.spawn();
    assert!(t.elapsed() < Duration::from_secs(5), "the agent started without etcd in {:?}", t.elapsed());
    let s = status(&agent);
    assert!(!s.store.reachable && s.store.unreachable_since.is_some(), "{:?}", s.store);
    assert!(s.store.from_saved_view, "{:?}", s.store);
    let (ok, out, _) = agent.cli(&["status"]);
    assert!(ok && out.contains("cluster store: unreachable since"), "{out}");
    // Served from the saved view: a new ADD gets an address of the block, DEL works.
    let (code, r) = plugin(&agent, "ADD", "during");
    assert_eq!(code, 0, "{r}");
    let during: std::net::IpAddr = r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
    assert_ne!(during, before.ips[0].address.addr());
    assert!("10.86.0.0/20".parse::<ipnet::IpNet>().unwrap().contains(&during));
    assert_eq!(plugin(&agent, "DEL", "before").0, 0);
    assert_eq!(plugin(&agent, "STATUS", "").0, 0, "free addresses: ready despite the outage");
    assert_eq!(held(&agent).keys().cloned().collect::<Vec<_>>(), vec!["during".to_string()]);
    etcd.restart();
    poll("the agent reconnects", Duration::from_secs(15), || status(&agent).store.reachable.then_some(()));
    assert!(!status(&agent).store.from_saved_view);
    let (code, r) = plugin(&agent, "ADD", "after");
    assert_eq!(code, 0, "{r}");
}

/// Past `--max-view-age` without the store, the blocks may have gone to another node (the
/// operator removes departed nodes): no new addresses, STATUS not ready, DEL still served.
#[test]
fn a_view_the_store_has_not_confirmed_for_too_long_hands_out_nothing_new() {
    require_root();
    let mut etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-stale");
    apply_pools(&etcd.endpoint, None, &pool_yaml("default", "10.79.0.0/20", 24));
    let agent = cluster_agent(&etcd, "node-stale", &["--max-view-age", "2s", "--add-wait", "1s"]);
    assert_eq!(plugin(&agent, "ADD", "a").0, 0);
    assert_eq!(plugin(&agent, "ADD", "b").0, 0);
    etcd.stop();
    assert_eq!(plugin(&agent, "ADD", "fresh").0, 0, "within the age: served from the node's blocks");
    std::thread::sleep(Duration::from_secs(3));
    let (code, r) = plugin(&agent, "ADD", "stale");
    assert_eq!(code, 11, "{r}");
    assert!(r["msg"].as_str().unwrap().contains("last confirmed this node's blocks"), "{r}");
    assert_eq!(plugin(&agent, "ADD", "a").0, 0, "an existing pod's ADD is answered");
    assert_eq!(plugin(&agent, "DEL", "b").0, 0);
    let (code, r) = plugin(&agent, "STATUS", "");
    assert_eq!(code, 50, "{r}");
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while plugin(&agent, "ADD", "stale").0 != 0 {
        assert!(Instant::now() < deadline, "no new addresses 15 s after the store came back:\n{}", agent.log());
    }
    assert_eq!(plugin(&agent, "STATUS", "").0, 0);
}

#[test]
fn status_answers_from_the_node_during_outages() {
    require_root();
    // No pool at all: not ready, and says what to do.
    let bare = Agent::start("node-nopool", &[]);
    let (code, r) = plugin(&bare, "STATUS", "");
    assert_eq!(code, 50, "{r}");
    assert!(r["msg"].as_str().unwrap().contains("no IP pool exists"), "{r}");

    let mut etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-status");
    apply_pools(&etcd.endpoint, None, &pool_yaml("default", "10.87.0.0/24", 30));
    let agent = cluster_agent(&etcd, "node-st", &["--pre-allocation", "default=0", "--add-wait", "1s"]);
    assert_eq!(plugin(&agent, "ADD", "a").0, 0);
    // Frozen etcd: STATUS answers at once from the node's own state.
    etcd.freeze(true);
    let t = Instant::now();
    let (code, r) = plugin(&agent, "STATUS", "");
    assert_eq!(code, 0, "{r}");
    assert!(t.elapsed() < Duration::from_secs(1), "STATUS waited on etcd: {:?}", t.elapsed());
    etcd.freeze(false);
    // The node's /30 holds two pods; with etcd stopped no block can come: not ready.
    assert_eq!(plugin(&agent, "ADD", "b").0, 0);
    etcd.stop();
    assert_eq!(plugin(&agent, "ADD", "c").0, 11, "full and no store");
    poll("the agent notices the outage", Duration::from_secs(10), || (!status(&agent).store.reachable).then_some(()));
    let (code, r) = plugin(&agent, "STATUS", "");
    assert_eq!(code, 50, "{r}");
    assert!(r["msg"].as_str().unwrap().contains("no free address"), "{r}");
    assert_eq!(plugin(&agent, "DEL", "b").0, 0);
    assert_eq!(plugin(&agent, "STATUS", "").0, 0, "room again");
}

/// Each pool is used the moment its apply returns, before any watch could have told the agent.
#[test]
fn fifty_pools_applied_and_used_at_once_without_a_refusal() {
    require_root();
    let etcd = Etcd::start();
    let _op = Operator::start(None, &etcd.endpoint, "op-fifty");
    apply_pools(&etcd.endpoint, None, &pool_yaml("default", "10.88.0.0/24", 26));
    let agent = cluster_agent(&etcd, "node-fifty", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let store = rt.block_on(allot_store::EtcdStore::connect(&allot_store::EtcdConfig::new(vec![etcd.endpoint.clone()]))).unwrap();
    let results: Vec<(usize, Result<Allocation, String>)> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..50 {
            let spec = allot_core::PoolSpec {
                ipv4: Some(allot_core::FamilySpec { cidrs: vec![format!("10.89.{i}.0/24").parse().unwrap()], mask_size: 26 }),
                ipv6: None,
            };
            rt.block_on(allot_store::Store::apply_pools(&store, vec![allot_core::Pool { name: format!("p{i}"), spec }])).unwrap();
            let agent = &agent;
            handles.push(s.spawn(move || {
                let mut req = request(&format!("c{i}"), "");
                req.pool = Some(format!("p{i}"));
                (i, agent.client().post::<_, Allocation>("/v1/cni/add", &req).map_err(|e| e.to_string()))
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results {
        let a = r.unwrap_or_else(|e| panic!("pool p{i} used right after its apply: {e}"));
        let ip = a.ips[0].address.addr().to_string();
        assert!(ip.starts_with(&format!("10.89.{i}.")), "p{i} got {ip}");
    }
}

/// A node namespace on a fabric bridge with etcd, as in the cluster lab.
struct Fabric {
    ns: Netns,
    nodes: Vec<Netns>,
    etcd: Option<Etcd>,
}

impl Fabric {
    fn new(nodes: usize) -> Fabric {
        let ns = Netns::new();
        netns_exec(&ns.name, &["ip", "link", "set", "lo", "up"]);
        netns_exec(&ns.name, &["ip", "link", "add", "fab0", "type", "bridge"]);
        netns_exec(&ns.name, &["ip", "addr", "add", "10.251.0.1/24", "dev", "fab0"]);
        netns_exec(&ns.name, &["ip", "link", "set", "fab0", "up"]);
        let mut out = Vec::new();
        for i in 0..nodes {
            let node = Netns::new();
            let port = unique("fp");
            run(&["ip", "link", "add", &port, "netns", &ns.name, "type", "veth", "peer", "name", "eth0", "netns", &node.name]);
            netns_exec(&ns.name, &["ip", "link", "set", &port, "master", "fab0", "up"]);
            netns_exec(&node.name, &["ip", "addr", "add", &format!("10.251.0.{}/24", 10 + i), "dev", "eth0"]);
            netns_exec(&node.name, &["ip", "link", "set", "eth0", "up"]);
            netns_exec(&node.name, &["ip", "link", "set", "lo", "up"]);
            out.push(node);
        }
        let etcd = Etcd::start_in(&ns.name, "10.251.0.1");
        Fabric { ns, nodes: out, etcd: Some(etcd) }
    }

    fn endpoint(&self) -> String {
        self.etcd.as_ref().unwrap().endpoint.clone()
    }

    fn agent(&self, i: usize, extra: &[&str]) -> Agent {
        let endpoint = self.endpoint();
        let ip = format!("10.251.0.{}", 10 + i);
        let mut args = vec!["--etcd-endpoints", endpoint.as_str(), "--node-ip", ip.as_str()];
        args.extend_from_slice(extra);
        Agent::start_in(Some(&self.nodes[i].name), &format!("fab-{i}"), &args)
    }

    fn blocks_of(&self, node: &str) -> Vec<String> {
        let endpoint = self.endpoint();
        let (ok, out, err) = allot(Some(&self.ns.name), &["--etcd-endpoints", &endpoint, "node", "get", node, "-o", "json"]);
        // A started agent is ready before it has registered (it serves from its journal first).
        if !ok && err.contains("not found") {
            return Vec::new();
        }
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["spec"]["ipam"]["pools"]["allocated"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["cidrs"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()))
            .collect()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.etcd.take();
    }
}

#[test]
fn a_route_in_the_way_is_left_alone_reported_and_does_not_stop_the_others() {
    require_root();
    let fabric = Fabric::new(3);
    let endpoint = fabric.endpoint();
    let _op = Operator::start(Some(&fabric.ns.name), &endpoint, "op-routes");
    apply_pools(&endpoint, Some(&fabric.ns.name), &pool_yaml("default", "10.252.0.0/16", 24));
    let _a1 = fabric.agent(1, &[]);
    let b1 = poll("fab-1 gets a block", Duration::from_secs(10), || fabric.blocks_of("fab-1").first().cloned());
    let _a2 = fabric.agent(2, &[]);
    let b2 = poll("fab-2 gets a block", Duration::from_secs(10), || fabric.blocks_of("fab-2").first().cloned());
    // An administrator's own route to fab-1's block, on fab-0.
    let n0 = &fabric.nodes[0].name;
    netns_exec(n0, &["ip", "route", "add", &b1, "via", "10.251.0.11", "proto", "static"]);
    let a0 = fabric.agent(0, &["--auto-direct-node-routes"]);
    poll("fab-0 routes fab-2's block", Duration::from_secs(10), || {
        netns_exec(n0, &["ip", "route", "show", &b2]).contains("via 10.251.0.12").then_some(())
    });
    let failures = poll("fab-0 reports the route in the way", Duration::from_secs(10), || {
        let f = status(&a0).route_failures;
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!((failures[0].node.as_str(), failures[0].cidr.to_string()), ("fab-1", b1.clone()));
    assert!(failures[0].error.contains("does not own"), "{}", failures[0].error);
    let route = netns_exec(n0, &["ip", "route", "show", &b1]);
    assert!(route.contains("proto static"), "the administrator's route was overwritten: {route}");
    let (ok, out, _) = a0.cli(&["status"]);
    assert!(ok && out.contains(&format!("route to {b1} (node fab-1)")), "{out}");
}
