//! Cluster faults with real processes: a real etcd, `allot operator` replicas frozen with
//! SIGSTOP past their lease, agents killed with SIGKILL, and `allot node delete` on live and
//! departed nodes. Needs root (the agents' harness) and Debian's etcd-server.

#![cfg(feature = "etcd")]

mod harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use allot_core::BlockGrant;
use allot_store::{EtcdConfig, EtcdStore, Store};
use allot_testkit::Etcd;
use harness::*;

struct Cluster {
    etcd: Etcd,
    rt: tokio::runtime::Runtime,
    store: EtcdStore,
}

impl Cluster {
    /// etcd with one pool `default` of sixteen /28 blocks.
    fn start() -> Cluster {
        require_root();
        let etcd = Etcd::start();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let store = rt.block_on(EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()]))).unwrap();
        let c = Cluster { etcd, rt, store };
        let pool = "apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: default\nspec:\n  ipv4:\n    cidrs: [10.61.0.0/24]\n    maskSize: 28\n";
        let (ok, out, err) = c.allot_stdin(&["pool", "apply", "-f", "-"], pool);
        assert!(ok, "pool apply: {out}{err}");
        c
    }

    fn allot(&self, args: &[&str]) -> (bool, String, String) {
        self.allot_stdin(args, "")
    }

    fn allot_stdin(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut full = vec!["--etcd-endpoints", self.etcd.endpoint.as_str()];
        full.extend_from_slice(args);
        let mut child = std::process::Command::new(bin_dir().join("allot"))
            .args(&full)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    fn agent(&self, node: &str) -> Agent {
        Agent::start(node, &["--etcd-endpoints", &self.etcd.endpoint])
    }

    fn grants(&self) -> Vec<BlockGrant> {
        self.rt.block_on(self.store.grants()).unwrap()
    }

    fn blocks_of(&self, node: &str) -> Vec<String> {
        self.grants().into_iter().filter(|g| g.node == node).map(|g| g.cidr.to_string()).collect()
    }

    fn node_names(&self) -> Vec<String> {
        self.rt.block_on(self.store.nodes()).unwrap().into_iter().map(|n| n.name).collect()
    }

    fn leader(&self) -> Option<String> {
        self.rt.block_on(self.store.leader("operator")).unwrap()
    }
}

/// The leading operator is frozen past its lease while the other takes over; then the other
/// is frozen too, an agent asks for blocks, and the first one wakes up. The writes of its old
/// term must all fail the fence: in its log, no block is granted between waking and noticing
/// that it lost the lead. (It may lead again afterwards, legitimately.)
#[test]
fn a_frozen_leader_woken_after_its_lease_grants_nothing() {
    let c = Cluster::start();
    let a = Operator::start(None, &c.etcd.endpoint, "op-a");
    poll("op-a to lead", Duration::from_secs(10), || (c.leader().as_deref() == Some("op-a")).then_some(()));
    let b = Operator::start(None, &c.etcd.endpoint, "op-b");
    std::thread::sleep(Duration::from_millis(500));

    a.signal("STOP");
    poll("op-b to take over", Duration::from_secs(10), || (c.leader().as_deref() == Some("op-b")).then_some(()));
    b.signal("STOP");
    poll("op-b's lease to run out", Duration::from_secs(10), || c.leader().is_none().then_some(()));

    let agent = c.agent("n1");
    poll("n1 to ask for addresses", Duration::from_secs(10), || {
        c.rt.block_on(c.store.nodes()).unwrap().iter().any(|n| n.name == "n1" && !n.requested.is_empty()).then_some(())
    });
    assert!(c.grants().is_empty(), "a frozen operator granted");

    let before = a.log().len();
    a.signal("CONT");
    poll("n1 to get a block", Duration::from_secs(15), || (!c.blocks_of("n1").is_empty()).then_some(()));
    let woke = a.log()[before..].to_string();
    println!("op-a after waking:\n{woke}");
    let lost = woke.find("lost leadership").unwrap_or_else(|| panic!("op-a never noticed it lost the lead:\n{woke}"));
    assert!(!woke[..lost].contains("granted block"), "op-a granted in a term it had lost:\n{woke}");
    // It leads again (op-b is still frozen) and grants in the new term.
    assert!(woke[lost..].contains("leading"), "op-a did not lead again:\n{woke}");
    let mut holders: HashMap<String, String> = HashMap::new();
    for g in c.grants() {
        assert!(holders.insert(g.cidr.to_string(), g.node.clone()).is_none(), "block {} held twice", g.cidr);
    }
    b.signal("CONT");
    drop(agent);
}

/// `allot node delete` refuses a live node and changes nothing; `--force` deletes it, and its
/// block stays reserved to it: another node asking for blocks gets others within the grace.
#[test]
fn deleting_a_live_node_is_refused_and_forced_blocks_stay_reserved() {
    let c = Cluster::start();
    let _op = Operator::start(None, &c.etcd.endpoint, "op-1");
    let n1 = c.agent("n1");
    let first = poll("n1 to get a block", Duration::from_secs(10), || c.blocks_of("n1").first().cloned());
    assert_eq!(first, "10.61.0.0/28", "the lowest block goes first");
    let before = (c.grants(), c.node_names());

    let (ok, out, err) = c.allot(&["node", "delete", "n1"]);
    assert!(!ok, "deleting a live node succeeded: {out}");
    assert!(err.contains("\"n1\" is live") && err.contains("--force") && err.contains("stop the agent"), "{err}");
    assert_eq!(before, (c.grants(), c.node_names()), "a refused delete changed the store");

    let (ok, out, err) = c.allot(&["node", "delete", "n1", "--force", "--grace", "60s"]);
    assert!(ok, "forced delete failed: {err}");
    assert!(out.contains("1 blocks released"), "{out}");

    // Another node asks for blocks: without the reservation it would get 10.61.0.0/28.
    let _n2 = c.agent("n2");
    poll("n2 to get a block", Duration::from_secs(10), || (!c.blocks_of("n2").is_empty()).then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    for g in c.grants() {
        assert!(!(g.cidr.to_string() == first && g.node != "n1"), "{first} went to {} within the grace", g.node);
    }
    drop(n1);
}

/// An agent killed with SIGKILL leaves its liveness lease to run out; the operator then
/// removes its node after `--node-gc-after` and frees its blocks. A live node stays.
#[test]
fn the_operator_removes_a_departed_node() {
    let c = Cluster::start();
    let op = Operator::start_with(None, &c.etcd.endpoint, "op-1", &["--node-gc-after", "1s", "--release-grace", "1s"]);
    let mut gone = c.agent("gone");
    let _stays = c.agent("stays");
    poll("both nodes to get blocks", Duration::from_secs(10), || {
        (!c.blocks_of("gone").is_empty() && !c.blocks_of("stays").is_empty()).then_some(())
    });
    gone.kill();
    let killed = Instant::now();
    poll("the departed node to be removed", Duration::from_secs(20), || {
        (!c.node_names().contains(&"gone".to_string()) && c.blocks_of("gone").is_empty()).then_some(())
    });
    let took = killed.elapsed();
    println!("departed node removed {took:?} after SIGKILL");
    // The liveness lease (5 s) held it until it ran out.
    assert!(took >= Duration::from_secs(4), "removed after {took:?}, while its lease could still be alive");
    assert!(op.log().contains("removed departed node"), "{}", op.log());
    assert!(c.node_names().contains(&"stays".to_string()));
    assert!(!c.blocks_of("stays").is_empty());
}

/// Standalone (embedded store), the agent answering is live: deleting its own node is refused
/// without --force; another node name in its store has no agent and may go.
#[test]
fn standalone_refuses_to_delete_its_own_node_without_force() {
    require_root();
    let agent = Agent::start("solo", &["--pool", "default=10.62.0.0/24@28"]);
    let (ok, _, err) = agent.cli(&["node", "delete", "solo"]);
    assert!(!ok && err.contains("\"solo\" is live") && err.contains("--force"), "{err}");
    assert!(agent.cli_json(&["node", "list"]).as_array().unwrap().iter().any(|n| n["metadata"]["name"] == "solo"));
    let (ok, out, err) = agent.cli(&["node", "delete", "solo", "--force"]);
    assert!(ok && out.contains("node/solo deleted"), "{out}{err}");
}
