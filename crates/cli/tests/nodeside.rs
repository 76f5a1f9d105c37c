//! The node side of a CNI migration (issue 12), as root with real parts: Debian's `host-local`
//! plugin writes the old CNI's leases, `allot agent` adopts them, `allot-ipam` makes ADDs and
//! DELs as a runtime would; `allot node switch` on a config directory; `allot node cleanup`
//! inside a network namespace the test builds with flannel-, calico- and cilium-like leftovers.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use allot_store::Store;
use harness::*;
use serde_json::{Value, json};

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

/// host-local run directly as the old CNI's IPAM (as `bridge` would run it): its network
/// directory ends up in `data/<network>`.
fn host_local(cmd: &str, data: &Path, network: &str, subnet: &str, id: &str) -> (i32, Value) {
    let conf = json!({"cniVersion": "1.0.0", "name": network, "type": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data}});
    let call = CniCall { plugin: Path::new(HOST_LOCAL), command: cmd, container_id: id, netns: "/proc/self/ns/net", ifname: "eth0", args: "" };
    cni(&call, &conf)
}

/// allot-ipam run as the new CNI's IPAM.
fn allot_ipam(agent: &Agent, cmd: &str, network: &str, id: &str) -> (i32, Value) {
    let conf = json!({"cniVersion": "1.0.0", "name": network, "type": "bridge", "ipam": {"type": "allot-ipam", "socket": agent.socket}});
    let plugin = bin_dir().join("allot-ipam");
    let call = CniCall { plugin: &plugin, command: cmd, container_id: id, netns: "/proc/self/ns/net", ifname: "eth0", args: "" };
    cni(&call, &conf)
}

/// ip -> (containerID, source) from `allot allocations list -o json`.
fn listed(agent: &Agent) -> BTreeMap<String, (String, String)> {
    agent
        .cli_json(&["allocations", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ip"].as_str().unwrap().to_string(), (r["containerID"].as_str().unwrap().to_string(), r["source"].as_str().unwrap().to_string())))
        .collect()
}

fn ip_of(result: &Value) -> String {
    ips_of(result)[0].split('/').next().unwrap().to_string()
}

/// Issue 12, point 1, through the real host-local and allot-ipam: a /28 filled by host-local
/// (10 of 13 pod addresses), adopted; allot hands out exactly the 3 others, then code 11;
/// adopting again changes nothing; a restart keeps the adopted marks; host-local's DEL frees
/// its address (the rescan sees the file gone) and allot hands it out again; an allot DEL of
/// an adopted owner frees it too and the rescan does not adopt it back; cleanup is refused
/// while adopted allocations of the old network live.
#[test]
fn adopted_host_local_addresses_are_never_handed_out_and_freed_after_the_old_del() {
    require_root();
    let old = tempfile::tempdir().unwrap();
    let mut agent = Agent::start("n1", &["--pool", "mig=10.77.0.0/28@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "300ms"]);
    let mut adopted = Vec::new();
    for i in 0..10 {
        let (code, r) = host_local("ADD", old.path(), "oldnet", "10.77.0.0/28", &format!("old{i}"));
        assert_eq!(code, 0, "host-local ADD: {r}");
        adopted.push(ip_of(&r));
    }
    let dir = old.path().join("oldnet");
    assert!(dir.join("lock").exists() && dir.join("last_reserved_ip.0").exists(), "host-local's own files are there");
    let dir_s = dir.to_str().unwrap();

    let (ok, out, err) = agent.cli(&["adopt", "host-local", dir_s, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("would adopt oldnet/old0/eth0 10.77.0.2") && out.contains("dry run"), "{out}");
    assert!(listed(&agent).is_empty(), "a dry run adopts nothing");

    let (ok, out, err) = agent.cli(&["adopt", "host-local", dir_s]);
    assert!(ok, "{err}");
    assert!(out.contains("10 adopted, 0 already adopted") && out.contains("claim block 10.77.0.0/28 of pool mig"), "{out}");
    let list = listed(&agent);
    for ip in &adopted {
        assert_eq!(list[ip].1, "adopted:host-local", "{ip}: {list:?}");
    }
    let (ok, table, _) = agent.cli(&["allocations", "list"]);
    assert!(ok && table.contains("SOURCE") && table.contains("adopted:host-local"), "{table}");

    let (ok, out, err) = agent.cli(&["adopt", "host-local", dir_s]);
    assert!(ok, "{err}");
    assert!(out.contains("0 adopted, 10 already adopted (unchanged), 0 block(s) claimed, 1 already held"), "adopting twice is a no-op: {out}");

    let mut new = Vec::new();
    for i in 0..3 {
        let (code, r) = allot_ipam(&agent, "ADD", "newnet", &format!("new{i}"));
        assert_eq!(code, 0, "allot ADD {i}: {r}");
        new.push(ip_of(&r));
    }
    assert_eq!(new, vec!["10.77.0.12", "10.77.0.13", "10.77.0.14"], "only the addresses host-local did not hand out");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new3");
    assert!(code != 0 && r["code"] == 11, "the block is full: every other address is adopted: {r}");

    // A restart keeps the marks (the journal records the source).
    assert!(agent.terminate());
    agent.spawn();
    let list = listed(&agent);
    assert_eq!(list.values().filter(|(_, s)| s == "adopted:host-local").count(), 10, "{list:?}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new3");
    assert!(code != 0 && r["code"] == 11, "still full after the restart: {r}");

    // Cleanup refuses while the old network's pods live (their adopted allocations).
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("10-flannel.conflist"), r#"{"cniVersion":"1.0.0","name":"oldnet","plugins":[{"type":"flannel"}]}"#).unwrap();
    let ns = Netns::new();
    let sock = agent.socket.to_str().unwrap().to_string();
    let (ok, _, err) = allot(Some(&ns.name), &["--socket", &sock, "node", "cleanup", "--from", "flannel", "--cni-conf-dir", conf.path().to_str().unwrap()]);
    assert!(!ok && err.contains("pods still run on the old CNI") && err.contains("adopted allocation oldnet/old0/eth0"), "{err}");
    assert!(conf.path().join("10-flannel.conflist").exists(), "refused cleanup removes nothing");

    // The old plugin's DEL removes the file: the rescan frees the address, allot hands it out.
    let (code, r) = host_local("DEL", old.path(), "oldnet", "10.77.0.0/28", "old0");
    assert_eq!(code, 0, "{r}");
    assert!(!dir.join("10.77.0.2").exists());
    poll("the rescan frees 10.77.0.2", Duration::from_secs(10), || (!listed(&agent).contains_key("10.77.0.2")).then_some(()));
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new3");
    assert_eq!(code, 0, "{r}");
    assert_eq!(ip_of(&r), "10.77.0.2", "the freed address is handed out again");

    // An allot DEL of an adopted owner frees it; its file stays, and is not adopted back.
    let (code, r) = allot_ipam(&agent, "DEL", "oldnet", "old1");
    assert_eq!(code, 0, "{r}");
    assert!(dir.join("10.77.0.3").exists());
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    assert!(!listed(&agent).contains_key("10.77.0.3"), "not adopted again after allot's DEL");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new4");
    assert_eq!(code, 0, "{r}");
    assert_eq!(ip_of(&r), "10.77.0.3");
    assert!(agent.log().contains("adopted allocation freed"), "{}", agent.log());
}

/// allot's GC of `network` as a runtime sends it: the valid attachments, by container ID.
fn allot_gc(agent: &Agent, network: &str, valid: &[&str]) -> (i32, Value) {
    let mut conf = json!({"cniVersion": "1.1.0", "name": network, "type": "bridge", "ipam": {"type": "allot-ipam", "socket": agent.socket}});
    conf["cni.dev/valid-attachments"] = valid.iter().map(|id| json!({"containerID": id, "ifname": "eth0"})).collect();
    let plugin = bin_dir().join("allot-ipam");
    cni(&CniCall { plugin: &plugin, command: "GC", container_id: "", netns: "", ifname: "", args: "" }, &conf)
}

/// After `allot node switch`, the runtime tears an old pod down with allot's conflist: the DEL
/// names allot's network, not the adopted one. It frees the adopted allocation of the same
/// container and ifname and removes its host-local file (under host-local's lock; its
/// `last_reserved_ip.*` stays), so neither a rescan nor a restart adopts it again; another
/// container's DEL frees nothing. GC under allot's network frees no adopted owner of the old
/// one; GC under the old network's name frees the adopted owners it does not list.
#[test]
fn old_pods_del_and_gc_under_the_new_network_free_their_adopted_address_and_lease_file() {
    require_root();
    let old = tempfile::tempdir().unwrap();
    for i in 0..4 {
        let (code, r) = host_local("ADD", old.path(), "oldnet", "10.85.0.0/28", &format!("old{i}"));
        assert_eq!((code, ip_of(&r)), (0, format!("10.85.0.{}", 2 + i)), "host-local ADD: {r}");
    }
    let dir = old.path().join("oldnet");
    let mut agent = Agent::start("n1", &["--pool", "mig=10.85.0.0/28@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "300ms"]);
    let (ok, out, err) = agent.cli(&["adopt", "host-local", dir.to_str().unwrap()]);
    assert!(ok && out.contains("4 adopted"), "{out}{err}");
    let reserved = std::fs::read(dir.join("last_reserved_ip.0")).unwrap();

    // Another container's DEL under allot's network frees nothing.
    let (code, r) = allot_ipam(&agent, "DEL", "newnet", "stranger");
    assert_eq!(code, 0, "{r}");
    assert_eq!(adopted_count(&agent), 4, "{:?}", listed(&agent));

    // old0's DEL comes under allot's network name.
    let (code, r) = allot_ipam(&agent, "DEL", "newnet", "old0");
    assert_eq!(code, 0, "{r}");
    let list = listed(&agent);
    assert!(!list.contains_key("10.85.0.2"), "old0's adopted address is freed: {list:?}");
    assert_eq!(adopted_count(&agent), 3, "{list:?}");
    assert!(!dir.join("10.85.0.2").exists(), "its lease file is gone (the old plugin never runs)");
    assert!(dir.join("10.85.0.3").exists() && dir.join("lock").exists());
    assert_eq!(std::fs::read(dir.join("last_reserved_ip.0")).unwrap(), reserved, "last_reserved_ip is host-local's, left alone");
    assert!(agent.log().contains("removed its host-local lease"), "{}", agent.log());

    // GC under allot's network frees no adopted owner of the old one, listed or not: whether a
    // runtime lists old pods under allot's network is its choice, and a wrong guess would hand
    // out a live address.
    let adopted = || -> Vec<String> { listed(&agent).into_iter().filter(|(_, (_, s))| s == "adopted:host-local").map(|(ip, _)| ip).collect() };
    let (code, r) = allot_gc(&agent, "newnet", &["old1", "old2", "new0"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(adopted(), ["10.85.0.3", "10.85.0.4", "10.85.0.5"], "a GC of allot's network keeps the old network's owners");
    // GC under the old network's name (a runtime that still has its config) names old3 stale.
    let (code, r) = allot_gc(&agent, "oldnet", &["old1", "old2"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(adopted(), ["10.85.0.3", "10.85.0.4"], "GC keeps the valid adopted owners only");

    // Neither a rescan nor a restart brings them back; their addresses go to new pods.
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    assert!(agent.terminate());
    agent.spawn();
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    let list = listed(&agent);
    assert_eq!(adopted_count(&agent), 2, "{list:?}");
    // The block has 13 pod addresses: 11 ADDs fill it, the freed ones among them.
    let mut given = Vec::new();
    for i in 0..11 {
        let (code, r) = allot_ipam(&agent, "ADD", "newnet", &format!("new{i}"));
        assert_eq!(code, 0, "ADD {i}: {r}");
        given.push(ip_of(&r));
    }
    assert!(given.contains(&"10.85.0.2".to_string()) && given.contains(&"10.85.0.5".to_string()), "{given:?}");
    assert!(!given.contains(&"10.85.0.3".to_string()) && !given.contains(&"10.85.0.4".to_string()), "{given:?}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "full");
    assert!(code != 0 && r["code"] == 11, "{r}");
    // host-local itself still works on its directory and does not hand out a live lease.
    let (code, r) = host_local("ADD", old.path(), "oldnet", "10.85.0.0/28", "old9");
    assert_eq!(code, 0, "{r}");
    assert!(!["10.85.0.3", "10.85.0.4"].contains(&ip_of(&r).as_str()), "{r}");
}

/// Two adopted host-local directories with the same name (two dataDirs, one network name):
/// neither's rescan takes the other's leases for gone. Only a file removed from its own
/// directory frees an owner.
#[test]
fn two_adopted_directories_with_one_network_name_keep_each_others_leases() {
    require_root();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for i in 0..2 {
        let (code, r) = host_local("ADD", a.path(), "oldnet", "10.86.0.0/28", &format!("a{i}"));
        assert_eq!(code, 0, "{r}");
        let (code, r) = host_local("ADD", b.path(), "oldnet", "10.86.0.16/28", &format!("b{i}"));
        assert_eq!(code, 0, "{r}");
    }
    let agent = Agent::start("n1", &["--pool", "mig=10.86.0.0/24@28", "--default-pool", "mig", "--pre-allocation", "mig=0"]);
    for dir in [a.path().join("oldnet"), b.path().join("oldnet")] {
        let (ok, out, err) = agent.cli(&["adopt", "host-local", dir.to_str().unwrap()]);
        assert!(ok && out.contains("2 adopted"), "{out}{err}");
    }
    let ids = |agent: &Agent| -> Vec<String> {
        let mut v: Vec<String> = listed(agent).into_values().filter(|(_, s)| s == "adopted:host-local").map(|(id, _)| id).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&agent), ["a0", "a1", "b0", "b1"], "adopting the second directory frees nothing of the first");
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    assert_eq!(ids(&agent), ["a0", "a1", "b0", "b1"]);
    assert!(!agent.log().contains("adopted allocation freed"), "no rescan frees the other's leases:\n{}", agent.log());

    let (code, r) = host_local("DEL", b.path(), "oldnet", "10.86.0.16/28", "b0");
    assert_eq!(code, 0, "{r}");
    poll("the rescan frees b0", Duration::from_secs(10), || (ids(&agent) == ["a0", "a1", "b1"]).then_some(()));
}

/// A block held by another node: adoption names the node and changes nothing (embedded store
/// seeded before the agent opens it); an address in no pool is refused with the pools.
#[test]
fn adoption_is_refused_when_another_node_holds_the_block_or_no_pool_has_the_address() {
    require_root();
    let mut agent = Agent::unstarted(None, "n1", &["--pool", "mig=10.78.0.0/24@28", "--default-pool", "mig", "--pre-allocation", "mig=0"]);
    let store_path = agent.data_dir().join("cluster.redb");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    {
        let store = allot_store::EmbeddedStore::open(&store_path).unwrap();
        let (_, spec) = parse_pool("10.78.0.0/24", 28);
        rt.block_on(store.apply_pools(vec![allot_core::Pool { name: "mig".into(), spec }])).unwrap();
        rt.block_on(store.register_node("n2", None)).unwrap();
        let g = allot_core::BlockGrant { pool: "mig".into(), cidr: "10.78.0.16/28".parse().unwrap(), node: "n2".into() };
        assert!(rt.block_on(store.grant_block(&g)).unwrap());
    }
    agent.spawn();
    let old = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let (code, r) = host_local("ADD", old.path(), "oldnet", "10.78.0.0/27", &format!("old{i}"));
        assert_eq!(code, 0, "{r}");
    }
    // The third lease is moved into n2's block, as if the old CNI had used that range.
    let dir = old.path().join("oldnet");
    std::fs::rename(dir.join("10.78.0.4"), dir.join("10.78.0.20")).unwrap();
    let (ok, _, err) = agent.cli(&["adopt", "host-local", dir.to_str().unwrap()]);
    assert!(!ok, "refused");
    assert!(err.contains("block 10.78.0.16/28 of pool \"mig\" is held by node \"n2\"") && err.contains("nothing was adopted"), "{err}");
    assert!(agent.cli_json(&["allocations", "list"]).as_array().unwrap().is_empty(), "nothing adopted");
    let n1 = agent.cli_json(&["node", "get", "n1"]);
    assert!(n1["spec"]["ipam"]["pools"]["allocated"].as_array().is_none_or(|a| a.is_empty()), "no block claimed: {n1}");
    let n2 = agent.cli_json(&["node", "get", "n2"]);
    assert_eq!(n2["spec"]["ipam"]["pools"]["allocated"][0]["cidrs"], json!(["10.78.0.16/28"]), "n2 keeps its block");

    // An address outside every pool.
    std::fs::rename(dir.join("10.78.0.20"), dir.join("10.99.0.7")).unwrap();
    let (ok, _, err) = agent.cli(&["adopt", "host-local", dir.to_str().unwrap()]);
    assert!(!ok && err.contains("10.99.0.7") && err.contains("mig (10.78.0.0/24)"), "{err}");
    assert!(agent.cli_json(&["allocations", "list"]).as_array().unwrap().is_empty());

    // The node's old pod CIDR: its blocks are claimed; one held by n2 is refused by name.
    let (ok, _, err) = agent.cli(&["adopt", "pod-cidr", "10.78.0.0/27", "--pool", "mig"]);
    assert!(!ok && err.contains("held by node \"n2\""), "{err}");
    let (ok, out, err) = agent.cli(&["adopt", "pod-cidr", "10.78.0.64/27", "--pool", "mig"]);
    assert!(ok, "{err}");
    assert!(out.contains("claim block 10.78.0.64/28") && out.contains("claim block 10.78.0.80/28"), "{out}");
    // Pinned: the empty blocks are not given back (the demand loop runs every second).
    std::thread::sleep(Duration::from_secs(3));
    let n1 = agent.cli_json(&["node", "get", "n1"]);
    assert_eq!(n1["spec"]["ipam"]["pools"]["allocated"][0]["cidrs"], json!(["10.78.0.64/28", "10.78.0.80/28"]), "{n1}");
    // Which addresses of a pinned pod CIDR the old pods hold is not known: no ADD gets one.
    // The node asks for more than the pinned blocks, and new pods land in another block.
    let pinned: ipnet::IpNet = "10.78.0.64/27".parse().unwrap();
    for i in 0..3 {
        let (code, r) = allot_ipam(&agent, "ADD", "newnet", &format!("new{i}"));
        assert_eq!(code, 0, "{r}\n{}", agent.log());
        let ip: std::net::IpAddr = ip_of(&r).parse().unwrap();
        assert!(!pinned.contains(&ip), "{ip} lies in the pinned old pod CIDR {pinned}");
    }
    let (ok, _, err) = agent.cli(&["adopt", "pod-cidr", "10.78.0.64/27", "--pool", "mig", "--release"]);
    assert!(ok, "{err}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new3");
    assert_eq!(code, 0, "released: ADDs are served as before: {r}");
}

fn parse_pool(cidr: &str, mask: u8) -> (String, allot_core::PoolSpec) {
    let spec = allot_core::PoolSpec {
        ipv4: Some(allot_core::FamilySpec { cidrs: vec![cidr.parse().unwrap()], mask_size: mask }),
        ..Default::default()
    };
    ("mig".into(), spec)
}

fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_file() {
            out.insert(e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// Issue 12, point 2: the switch puts allot's conflist first in libcni's order, moves the old
/// configs aside, and the rollback restores them byte for byte; a bad conflist and a dry run
/// change nothing.
#[test]
fn switch_installs_first_and_rollback_restores_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("net.d");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("10-flannel.conflist"), "{\"name\":\"cbr0\",\"cniVersion\":\"0.3.1\",\"plugins\":[{\"type\":\"flannel\"}]}\n").unwrap();
    std::fs::write(conf.join("00-aaa.conf"), "{\"name\":\"x\",\"type\":\"bridge\"}").unwrap();
    std::fs::write(conf.join("99-loopback.json"), "{}").unwrap();
    std::fs::write(conf.join("README"), "not a config").unwrap();
    let before = dir_bytes(&conf);
    let new = d.path().join("allot.conflist");
    let conf_s = conf.to_str().unwrap();

    std::fs::write(&new, r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge"}]"#).unwrap();
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(!ok && err.contains("not valid JSON"), "{err}");
    std::fs::write(&new, r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#).unwrap();
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(!ok && err.contains("\"name\""), "{err}");
    assert_eq!(dir_bytes(&conf), before, "a refused switch changes nothing");

    let body = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","ipam":{"type":"allot-ipam"}}]}"#;
    std::fs::write(&new, body).unwrap();
    let (ok, out, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("would move aside") && out.contains("00-aaa.conf") && out.contains("dry run"), "{out}");
    assert_eq!(dir_bytes(&conf), before, "dry run changes nothing");

    let (ok, out, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    // The runtime's choice so far (00-aaa.conf) moves aside; configs that sort after allot's
    // (another tool's network, a loopback) stay: the runtime no longer picks them.
    let files: Vec<String> = dir_bytes(&conf).into_keys().collect();
    assert_eq!(files, vec!["00-allot.conflist", "10-flannel.conflist", "99-loopback.json", "README"], "{out}");
    assert_eq!(std::fs::read(conf.join("00-allot.conflist")).unwrap(), body.as_bytes());
    assert!(conf.join(".allot-rollback/00-aaa.conf").exists() && conf.join(".allot-rollback/state.json").exists());

    // The old CNI's installer writes its config again, under a name that sorts first: a second
    // switch moves it aside too (beside the first copy, which rollback restores).
    std::fs::write(conf.join("00-aaa.conf"), "rewritten").unwrap();
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert!(!conf.join("00-aaa.conf").exists());

    let (ok, out, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert_eq!(dir_bytes(&conf), before, "the original files, byte for byte, and nothing of allot's: {out}");
    assert!(!conf.join(".allot-rollback").exists());
    let (ok, _, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", conf_s]);
    assert!(!ok && err.contains("no switch to roll back"), "{err}");

    // A switch killed after recording its moves and before making one: the file is still in
    // place, and the rollback keeps it there.
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    std::fs::rename(conf.join(".allot-rollback/00-aaa.conf"), conf.join("00-aaa.conf")).unwrap();
    let (ok, out, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", conf_s]);
    assert!(ok && out.contains("never moved"), "{out}{err}");
    assert_eq!(dir_bytes(&conf), before, "{out}");

    // A file under allot's name that allot did not write is kept aside and comes back.
    std::fs::write(conf.join("00-allot.conflist"), "someone else's").unwrap();
    let before = dir_bytes(&conf);
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(conf.join("00-allot.conflist")).unwrap(), body.as_bytes());
    let (ok, out, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert_eq!(dir_bytes(&conf), before, "{out}");

    // The same switch killed after recording that and before keeping the file aside: the run
    // again keeps it before installing, and rollback brings it back.
    let kept = conf.join(".allot-rollback");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("state.json"), r#"{"installed":"00-allot.conflist","moved":[{"name":"00-aaa.conf","kept_as":"00-aaa.conf"},{"name":"00-allot.conflist","kept_as":"00-allot.conflist"}],"switchedAt":1}"#).unwrap();
    let (ok, out, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert!(out.contains("keep aside"), "{out}");
    assert_eq!(std::fs::read(kept.join("00-allot.conflist")).unwrap(), b"someone else's");
    assert_eq!(std::fs::read(conf.join("00-allot.conflist")).unwrap(), body.as_bytes());
    let (ok, out, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", conf_s]);
    assert!(ok, "{err}");
    assert_eq!(dir_bytes(&conf), before, "{out}");

    // The runtime's choice sorted after allot's: moved all the same, and when the old CNI's
    // installer writes it again, a second switch moves that copy too, so rollback can restore.
    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(d2.path().join("10-calico.conflist"), "calico's").unwrap();
    let d2_s = d2.path().to_str().unwrap();
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", d2_s]);
    assert!(ok && !d2.path().join("10-calico.conflist").exists(), "{err}");
    std::fs::write(d2.path().join("10-calico.conflist"), "calico's, again").unwrap();
    let (ok, _, err) = allot(None, &["node", "switch", "--conflist", new.to_str().unwrap(), "--cni-conf-dir", d2_s]);
    assert!(ok && !d2.path().join("10-calico.conflist").exists(), "{err}");
    let (ok, out, err) = allot(None, &["node", "switch", "--rollback", "--cni-conf-dir", d2_s]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(d2.path().join("10-calico.conflist")).unwrap(), b"calico's", "{out}");
}

fn sh(ns: &str, cmd: &str) {
    netns_exec(ns, &["sh", "-ec", cmd]);
}

fn out(ns: &str, cmd: &str) -> String {
    let o = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Issue 12, point 3, inside a fresh network namespace: flannel's leftovers (cni0, flannel.1,
/// a route over it, FLANNEL-* chains with jumps, an nft table) go; cilium's, an unrelated
/// chain and an unrelated nft table stay; --dry-run changes nothing; a pod's veth on cni0
/// stops the cleanup.
#[test]
fn cleanup_removes_exactly_the_old_cnis_leftovers() {
    require_root();
    let ns = Netns::new();
    let n = ns.name.as_str();
    // No IPv6 link-local addresses appearing later and changing the snapshots.
    sh(n, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
    sh(n, "ip link add cni0 type bridge && ip addr add 10.244.0.1/24 dev cni0 && ip link set cni0 up");
    sh(n, "ip link add flannel.1 type vxlan id 1 dstport 8472 nolearning && ip addr add 10.244.0.0/32 dev flannel.1 && ip link set flannel.1 up");
    sh(n, "ip route add 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink");
    sh(n, "ip link add cilium_host type veth peer name cilium_net && ip link set cilium_net up && ip link set cilium_host up && ip route add 10.0.5.0/24 dev cilium_host");
    sh(n, "iptables -N FLANNEL-FWD && iptables -A FLANNEL-FWD -s 10.244.0.0/16 -j ACCEPT && iptables -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD");
    sh(n, "iptables -t nat -N FLANNEL-POSTRTG && iptables -t nat -A FLANNEL-POSTRTG -j RETURN && iptables -t nat -A POSTROUTING -j FLANNEL-POSTRTG");
    sh(n, "iptables -N CILIUM_FORWARD && iptables -A FORWARD -j CILIUM_FORWARD");
    sh(n, "iptables -N MYAPP && iptables -A INPUT -j MYAPP");
    sh(n, "nft add table ip flannel-ipv4 && nft add chain ip flannel-ipv4 postrtg '{ type nat hook postrouting priority srcnat; }' && nft add table inet myapp");
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("10-flannel.conflist"), r#"{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel"}]}"#).unwrap();
    std::fs::write(conf.path().join("05-cilium.conf"), r#"{"cniVersion":"0.3.1","name":"cilium","type":"cilium-cni"}"#).unwrap();
    std::fs::write(conf.path().join("00-allot.conflist"), r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"allot0","ipam":{"type":"allot-ipam"}}]}"#).unwrap();
    let conf_s = conf.path().to_str().unwrap();
    let snapshot = || {
        (out(n, "ip -o link show | awk '{print $2}' | sort"), out(n, "iptables-save | grep -v '^#'"), out(n, "iptables-save -t nat | grep -v '^#'"), out(n, "nft list tables"), out(n, "ip -4 route show table all | sed 's/ linkdown//'"))
    };
    let cleanup = |extra: &[&str]| {
        let mut args = vec!["node", "cleanup", "--from", "flannel", "--no-agent", "--cni-conf-dir", conf_s];
        args.extend_from_slice(extra);
        allot(Some(n), &args)
    };

    // A pod still on cni0 stops everything.
    sh(n, "ip link add vethpod0 type veth peer name podeth0 && ip link set vethpod0 master cni0");
    let before = snapshot();
    let (ok, _, err) = cleanup(&[]);
    assert!(!ok && err.contains("pod interface vethpod0 (veth, on cni0)") && err.contains("nothing was removed"), "{err}");
    assert_eq!(snapshot(), before, "a refused cleanup removes nothing");
    sh(n, "ip link del vethpod0");

    let before = snapshot();
    let (ok, listing, err) = cleanup(&["--dry-run"]);
    assert!(ok, "{err}");
    for want in [
        "would remove link cni0 (bridge)",
        "would remove link flannel.1 (vxlan)",
        "would remove route 10.244.1.0/24 dev flannel.1",
        "would remove iptables chain filter/FLANNEL-FWD",
        "would remove iptables chain nat/FLANNEL-POSTRTG",
        "would remove iptables rule filter: -A FORWARD",
        "would remove iptables rule nat: -A POSTROUTING -j FLANNEL-POSTRTG",
        "would remove nftables table ip flannel-ipv4",
        "10-flannel.conflist",
    ] {
        assert!(listing.contains(want), "{want:?} missing from:\n{listing}");
    }
    for never in ["cilium", "CILIUM", "MYAPP", "myapp", "00-allot"] {
        assert!(!listing.contains(never), "{never} listed:\n{listing}");
    }
    assert_eq!(snapshot(), before, "dry run changes nothing");

    let (ok, done, err) = cleanup(&[]);
    assert!(ok, "{err}\n{done}");
    let (links, filter, nat, tables, routes) = snapshot();
    assert!(!links.contains("cni0") && !links.contains("flannel.1"), "{links}");
    assert!(links.contains("cilium_host"), "another CNI's link stays: {links}");
    assert!(!filter.contains("FLANNEL") && !nat.contains("FLANNEL"), "{filter}{nat}");
    assert!(filter.contains(":CILIUM_FORWARD") && filter.contains("-A FORWARD -j CILIUM_FORWARD"), "{filter}");
    assert!(filter.contains(":MYAPP") && filter.contains("-A INPUT -j MYAPP"), "{filter}");
    assert!(!tables.contains("flannel-ipv4") && tables.contains("inet myapp"), "{tables}");
    assert!(!routes.contains("10.244.1.0/24") && routes.contains("10.0.5.0/24 dev cilium_host"), "{routes}");
    assert!(!conf.path().join("10-flannel.conflist").exists());
    assert!(conf.path().join("05-cilium.conf").exists() && conf.path().join("00-allot.conflist").exists());
    let (ok, again, _) = cleanup(&["--dry-run"]);
    assert!(ok && again.contains("nothing of Flannel left"), "every listed leftover is gone: {again}");

    // `--from bridge`: only a bridge config `node switch` moved aside is the old CNI's; another
    // tool's bridge network in the directory (podman's) and its bridge stay.
    sh(n, "ip link add cni-podman0 type bridge && ip link add oldbr0 type bridge");
    std::fs::write(conf.path().join("87-podman-bridge.conflist"), r#"{"cniVersion":"0.4.0","name":"podman","plugins":[{"type":"bridge","bridge":"cni-podman0"}]}"#).unwrap();
    std::fs::create_dir(conf.path().join(".allot-rollback")).unwrap();
    std::fs::write(conf.path().join(".allot-rollback/10-old.conflist"), r#"{"cniVersion":"1.0.0","name":"oldnet","plugins":[{"type":"bridge","bridge":"oldbr0"}]}"#).unwrap();
    let (ok, listing, err) = allot(Some(n), &["node", "cleanup", "--from", "bridge", "--no-agent", "--cni-conf-dir", conf_s, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(listing.contains("oldbr0") && listing.contains("10-old.conflist"), "{listing}");
    assert!(!listing.contains("podman"), "another tool's bridge network listed:\n{listing}");
}

/// `--from calico` and `--from cilium` in one namespace holding both CNIs' leftovers and another
/// tool's: each waits while a pod of its own still has its interface (cali*, lxc*), then takes
/// its links, BIRD routes, chains, nft tables and config files, and nothing of the other or of
/// the other tool.
#[test]
fn cleanup_of_calico_and_of_cilium_takes_only_theirs_and_waits_for_their_pods() {
    require_root();
    let ns = Netns::new();
    let n = ns.name.as_str();
    sh(n, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
    sh(n, "ip link add uplink type veth peer name uplink-peer && ip addr add 192.168.50.1/24 dev uplink && ip link set uplink-peer up && ip link set uplink up");
    sh(n, "ip link add vxlan.calico type vxlan id 4096 dstport 4789 && ip link set vxlan.calico up");
    sh(n, "ip route add 10.9.1.0/26 via 192.168.50.2 dev uplink proto bird");
    sh(n, "iptables -N cali-FORWARD && iptables -A FORWARD -j cali-FORWARD && iptables -t nat -N cali-nat-outgoing && iptables -t nat -A POSTROUTING -j cali-nat-outgoing");
    sh(n, "nft add table ip calico-filter");
    sh(n, "ip link add cali1234abcd type veth peer name podeth1");
    sh(n, "ip link add cilium_host type veth peer name cilium_net && ip link set cilium_host up && ip link set cilium_net up && ip route add 10.0.5.0/24 dev cilium_host");
    sh(n, "iptables -N CILIUM_FORWARD && iptables -A FORWARD -j CILIUM_FORWARD && nft add table inet cilium-test");
    sh(n, "ip link add lxc99 type veth peer name podeth2");
    sh(n, "iptables -N MYAPP && iptables -A INPUT -j MYAPP && ip route add 10.77.0.0/24 via 192.168.50.3 dev uplink proto static && nft add table inet myapp");
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("10-calico.conflist"), r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#).unwrap();
    std::fs::write(conf.path().join("05-cilium.conf"), r#"{"cniVersion":"0.3.1","name":"cilium","type":"cilium-cni"}"#).unwrap();
    let conf_s = conf.path().to_str().unwrap();
    let cleanup = |from: &str, extra: &[&str]| {
        let mut args = vec!["node", "cleanup", "--from", from, "--no-agent", "--cni-conf-dir", conf_s];
        args.extend_from_slice(extra);
        allot(Some(n), &args)
    };
    let state = || (out(n, "ip -o link show | awk '{print $2}' | sort"), out(n, "iptables-save | grep -v '^#'"), out(n, "nft list tables"), out(n, "ip -4 route show table all"));

    for (from, pod) in [("calico", "cali1234abcd"), ("cilium", "lxc99")] {
        let before = state();
        let (ok, _, err) = cleanup(from, &[]);
        assert!(!ok && err.contains(pod) && err.contains("nothing was removed"), "{from}: {err}");
        assert_eq!(state(), before, "{from}: a refused cleanup removes nothing");
        sh(n, &format!("ip link del {pod}"));
    }

    let (ok, listing, err) = cleanup("calico", &["--dry-run"]);
    assert!(ok, "{err}");
    for want in ["link vxlan.calico", "10.9.1.0/26", "chain filter/cali-FORWARD", "chain nat/cali-nat-outgoing", "-A FORWARD -j cali-FORWARD", "table ip calico-filter", "10-calico.conflist"] {
        assert!(listing.contains(want), "{want:?} missing from:\n{listing}");
    }
    for never in ["cilium", "CILIUM", "MYAPP", "myapp", "10.77.0.0", "link uplink"] {
        assert!(!listing.contains(never), "{never} listed:\n{listing}");
    }
    let (ok, done, err) = cleanup("calico", &[]);
    assert!(ok, "{err}\n{done}");
    let (links, rules, tables, routes) = state();
    assert!(!links.contains("vxlan.calico") && !rules.contains("cali-") && !tables.contains("calico") && !routes.contains("10.9.1.0/26"), "{links}{rules}{tables}{routes}");
    assert!(links.contains("cilium_host") && rules.contains("CILIUM_FORWARD") && tables.contains("cilium-test"), "cilium's stay: {links}{rules}{tables}");
    assert!(!conf.path().join("10-calico.conflist").exists() && conf.path().join("05-cilium.conf").exists());

    let (ok, done, err) = cleanup("cilium", &[]);
    assert!(ok, "{err}\n{done}");
    let (links, rules, tables, routes) = state();
    assert!(!links.contains("cilium_") && !rules.contains("CILIUM") && !tables.contains("cilium") && !routes.contains("10.0.5.0/24"), "{links}{rules}{tables}{routes}");
    assert!(!conf.path().join("05-cilium.conf").exists());
    assert!(links.contains("uplink") && rules.contains("-A INPUT -j MYAPP") && tables.contains("inet myapp") && routes.contains("10.77.0.0/24"), "another tool's stay: {links}{rules}{tables}{routes}");
}

/// The agent's CNI readiness (`cni` in `/v1/status`): whether it serves ADDs now, and why not.
fn cni_readiness(agent: &Agent) -> allot_wire::Readiness {
    agent.client().get::<allot_wire::Status>("/v1/status").unwrap().cni.expect("agent reports CNI readiness")
}

fn adopted_count(agent: &Agent) -> usize {
    listed(agent).values().filter(|(_, s)| s == "adopted:host-local").count()
}

/// Issue 12, point 1, at agent start: `--adopt-host-local DIR` adopts host-local's leases with
/// no `allot adopt` call, before any ADD is served (the first ADD, sent right after start, gets
/// a free address); allot hands out only the others; host-local's DEL frees one at the rescan;
/// a restart with the same flag adopts nothing twice and brings back neither the address whose
/// file is gone nor the one allot's DEL freed while its file stays.
#[test]
fn adopt_host_local_flag_adopts_at_start_before_any_add_and_restarts_cleanly() {
    require_root();
    let old = tempfile::tempdir().unwrap();
    let mut leased = Vec::new();
    for i in 0..5 {
        let (code, r) = host_local("ADD", old.path(), "oldnet", "10.81.0.0/28", &format!("old{i}"));
        assert_eq!(code, 0, "host-local ADD: {r}");
        leased.push(ip_of(&r));
    }
    assert_eq!(leased, ["10.81.0.2", "10.81.0.3", "10.81.0.4", "10.81.0.5", "10.81.0.6"]);
    let dir = old.path().join("oldnet");
    let dir_s = dir.to_str().unwrap();
    let mut agent = Agent::start(
        "n1",
        &["--pool", "mig=10.81.0.0/28@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "3s", "--adopt-host-local", dir_s],
    );
    // At once: the ADD waits for the adoption, so it cannot get a leased address.
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new0");
    assert_eq!(code, 0, "{r}\n{}", agent.log());
    assert_eq!(ip_of(&r), "10.81.0.7", "the first address host-local did not hand out");
    let list = listed(&agent);
    for (i, ip) in leased.iter().enumerate() {
        assert_eq!(list.get(ip), Some(&(format!("old{i}"), "adopted:host-local".to_string())), "{ip}: {list:?}");
    }
    assert_eq!(list["10.81.0.7"], ("new0".to_string(), "cni".to_string()));
    assert!(cni_readiness(&agent).ready);
    assert!(agent.log().contains("adopted host-local directory (--adopt-host-local)"), "{}", agent.log());

    for i in 1..8 {
        let (code, r) = allot_ipam(&agent, "ADD", "newnet", &format!("new{i}"));
        assert_eq!(code, 0, "{r}");
        assert_eq!(ip_of(&r), format!("10.81.0.{}", 7 + i));
    }
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "full");
    assert!(code != 0 && r["code"] == 11, "every other address is adopted or handed out: {r}");

    // host-local's DEL removes old0's file: the rescan frees 10.81.0.2. allot's DEL of old1
    // frees 10.81.0.3 while its file stays.
    let (code, r) = host_local("DEL", old.path(), "oldnet", "10.81.0.0/28", "old0");
    assert_eq!(code, 0, "{r}");
    poll("the rescan frees 10.81.0.2", Duration::from_secs(10), || (!listed(&agent).contains_key("10.81.0.2")).then_some(()));
    let (code, r) = allot_ipam(&agent, "DEL", "oldnet", "old1");
    assert_eq!(code, 0, "{r}");
    assert!(dir.join("10.81.0.3").exists(), "allot never touches host-local's files");
    assert_eq!(adopted_count(&agent), 3);

    // Restart with the same flag.
    assert!(agent.terminate());
    let log_before = agent.log().len();
    agent.spawn();
    poll("ready after the restart", Duration::from_secs(10), || cni_readiness(&agent).ready.then_some(()));
    let list = listed(&agent);
    let adopted: Vec<&String> = list.iter().filter(|(_, (_, s))| s == "adopted:host-local").map(|(ip, _)| ip).collect();
    assert_eq!(adopted, ["10.81.0.4", "10.81.0.5", "10.81.0.6"], "neither freed lease comes back: {list:?}");
    let log = agent.log();
    let restart_log = &log[log_before..];
    assert!(
        restart_log.contains("adopted host-local directory (--adopt-host-local)") && restart_log.contains("adopted=0 unchanged=3"),
        "the restart adopts nothing twice:\n{restart_log}"
    );
    // The freed addresses go to new pods; a rescan after that does not take 10.81.0.3 back.
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new8");
    assert_eq!((code, ip_of(&r)), (0, "10.81.0.2".to_string()), "{r}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new9");
    assert_eq!((code, ip_of(&r)), (0, "10.81.0.3".to_string()), "{r}");
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    let list = listed(&agent);
    assert_eq!(list["10.81.0.3"], ("new9".to_string(), "cni".to_string()), "{list:?}");
    assert_eq!(adopted_count(&agent), 3, "{list:?}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "full");
    assert!(code != 0 && r["code"] == 11, "{r}");
}

/// `--adopt-host-local` naming a missing directory: no ADD (code 11, not ready, the reason)
/// until host-local creates it, then adopted first; with `--adopt-host-local-missing-ok` the
/// agent serves at once, warns once, and adopts the directory when it appears. One with a lease
/// in no pool: the agent runs (status, DEL) but serves no ADD until a pool covers it.
#[test]
fn adopt_host_local_flag_missing_dir_and_stray_address_block_adds_until_fixed_unless_missing_is_ok() {
    require_root();
    let old = tempfile::tempdir().unwrap();
    let dir = old.path().join("oldnet");
    let dir_s = dir.to_str().unwrap();
    let base = ["--pool", "mig=10.82.0.0/28@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "500ms"];
    let agent = Agent::start("n1", &[&base[..], &["--adopt-host-local", dir_s]].concat());
    let reason = poll("the missing directory in the readiness", Duration::from_secs(10), || {
        cni_readiness(&agent).reason.filter(|r| r.contains("does not exist"))
    });
    assert!(reason.contains(dir_s) && reason.contains("--adopt-host-local"), "{reason}");
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new0");
    assert!(code != 0 && r["code"] == 11 && r.to_string().contains("does not exist"), "no ADD while the directory is missing: {r}");
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    assert!(!cni_readiness(&agent).ready, "still waiting");
    let (code, r) = host_local("ADD", old.path(), "oldnet", "10.82.0.0/28", "old0");
    assert_eq!(code, 0, "{r}");
    poll("ready once the directory exists", Duration::from_secs(10), || cni_readiness(&agent).ready.then_some(()));
    assert_eq!(listed(&agent)["10.82.0.2"], ("old0".to_string(), "adopted:host-local".to_string()));
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new0");
    assert_eq!((code, ip_of(&r)), (0, "10.82.0.3".to_string()), "{r}");
    assert_eq!(agent.log().matches("retrying every").count(), 1, "logged once, not at every retry: {}", agent.log());
    drop(agent);

    // Missing is fine when said so: a node that never ran the old CNI serves at once.
    let old_ok = tempfile::tempdir().unwrap();
    let dir_ok = old_ok.path().join("oldnet");
    let agent = Agent::start("n1", &[&base[..], &["--adopt-host-local", dir_ok.to_str().unwrap(), "--adopt-host-local-missing-ok"]].concat());
    poll("ready without the directory", Duration::from_secs(10), || cni_readiness(&agent).ready.then_some(()));
    assert!(agent.log().contains("the directory does not exist"), "{}", agent.log());
    let (code, r) = host_local("ADD", old_ok.path(), "oldnet", "10.82.0.0/28", "old0");
    assert_eq!(code, 0, "{r}");
    poll("the lease adopted once the directory exists", Duration::from_secs(10), || listed(&agent).get("10.82.0.2").cloned());
    assert_eq!(listed(&agent)["10.82.0.2"], ("old0".to_string(), "adopted:host-local".to_string()));
    let (code, r) = allot_ipam(&agent, "ADD", "newnet", "new0");
    assert_eq!((code, ip_of(&r)), (0, "10.82.0.3".to_string()), "{r}");
    std::thread::sleep(allot_agent::RESCAN_EVERY * 2);
    assert_eq!(agent.log().matches("the directory does not exist").count(), 1, "{}", agent.log());
    let (ok, _, err) = allot(None, &["agent", "--node", "x", "--adopt-host-local-missing-ok"]);
    assert!(!ok && err.contains("--adopt-host-local"), "the flag needs a directory: {err}");

    // A lease outside every pool.
    let old2 = tempfile::tempdir().unwrap();
    let (code, r) = host_local("ADD", old2.path(), "other", "10.99.0.0/28", "stray");
    assert_eq!(code, 0, "{r}");
    let dir2 = old2.path().join("other");
    let agent2 = Agent::start(
        "n2",
        &["--pool", "mig=10.82.0.0/28@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "3s", "--adopt-host-local", dir2.to_str().unwrap()],
    );
    let reason = poll("the stray address in the readiness", Duration::from_secs(10), || {
        cni_readiness(&agent2).reason.filter(|r| r.contains("10.99.0.2"))
    });
    assert!(reason.contains("lies in no pool") && reason.contains("mig (10.82.0.0/28)"), "{reason}");
    let (code, r) = allot_ipam(&agent2, "ADD", "newnet", "new0");
    assert!(code != 0 && r["code"] == 11 && r.to_string().contains("10.99.0.2"), "{r}");
    assert!(listed(&agent2).is_empty(), "nothing adopted");
    // The operator adds a pool holding it: the next retry adopts, and ADDs are served.
    let pool = "apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: old\nspec:\n  ipv4:\n    cidrs: [10.99.0.0/24]\n    maskSize: 28\n";
    let (ok, out, err) = agent2.cli_stdin(&["pool", "apply", "-f", "-"], pool);
    assert!(ok, "{out}{err}");
    poll("ready once a pool holds the address", Duration::from_secs(10), || cni_readiness(&agent2).ready.then_some(()));
    assert_eq!(listed(&agent2)["10.99.0.2"], ("stray".to_string(), "adopted:host-local".to_string()));
    let n2 = agent2.cli_json(&["node", "get", "n2"]);
    let allocated = &n2["spec"]["ipam"]["pools"]["allocated"];
    assert!(allocated[0]["pool"] == "old" && allocated[0]["cidrs"] == json!(["10.99.0.0/28"]), "the block is claimed: {n2}");
    let (code, r) = allot_ipam(&agent2, "ADD", "newnet", "new0");
    assert_eq!((code, ip_of(&r)), (0, "10.82.0.2".to_string()), "{r}");
}

/// Issue 12, point 1, on etcd (`--etcd-endpoints`, two agents, no operator): n2 adopts at start
/// (`--adopt-host-local`) and its block is claimed in etcd for n2, as any other client reads it
/// (the store, `allot node get` through etcd); n1 is refused, naming the holder, for a lease in
/// n2's block and for one in a block granted straight through the etcd store to n9, and then
/// nothing is adopted and no block claimed (not even the free block of another lease); a lease
/// in a free block and an old pod CIDR are claimed for n1.
#[cfg(feature = "etcd")]
#[test]
fn adoption_on_etcd_claims_blocks_for_the_node_and_is_refused_naming_the_holder() {
    use allot_store::{EtcdConfig, EtcdStore};
    require_root();
    let etcd = allot_testkit::Etcd::start();
    let ep = etcd.endpoint.as_str();
    let pool = "apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: mig\nspec:\n  ipv4:\n    cidrs: [10.84.0.0/24]\n    maskSize: 28\n";
    let pool_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pool_file.path(), pool).unwrap();
    let (ok, out, err) = allot(None, &["--etcd-endpoints", ep, "pool", "apply", "-f", pool_file.path().to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()]))).unwrap();
    let held = |node: &str| -> Vec<String> {
        let mut v: Vec<String> = rt.block_on(store.grants()).unwrap().into_iter().filter(|g| g.node == node).map(|g| g.cidr.to_string()).collect();
        v.sort();
        v
    };
    let flags = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["--etcd-endpoints", ep, "--default-pool", "mig", "--pre-allocation", "mig=0", "--add-wait", "3s"].map(String::from).to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let start = |node: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start(node, &args);
        poll(&format!("{node} ready"), Duration::from_secs(15), || cni_readiness(&agent).ready.then_some(()));
        agent
    };

    // n2: host-local leased 10.84.0.2-4; the agent adopts them at start.
    let old2 = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let (code, r) = host_local("ADD", old2.path(), "oldnet", "10.84.0.0/28", &format!("n2-old{i}"));
        assert_eq!(code, 0, "{r}");
    }
    let dir2 = old2.path().join("oldnet");
    let mut n2_flags = flags(&[]);
    n2_flags.extend(["--adopt-host-local".to_string(), dir2.to_str().unwrap().to_string()]);
    let n2 = start("n2", n2_flags);
    assert_eq!(adopted_count(&n2), 3, "{:?}", listed(&n2));
    assert_eq!(held("n2"), ["10.84.0.0/28"], "claimed in etcd for n2");
    let (ok, out, err) = allot(None, &["--etcd-endpoints", ep, "node", "get", "n2", "-o", "json"]);
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["spec"]["ipam"]["pools"]["allocated"][0]["cidrs"], json!(["10.84.0.0/28"]), "{got}");
    let (code, r) = allot_ipam(&n2, "ADD", "newnet", "n2-new0");
    assert_eq!((code, ip_of(&r)), (0, "10.84.0.5".to_string()), "{r}");

    // n9 has no agent: its block is written straight through the etcd store.
    rt.block_on(store.register_node("n9", None)).unwrap();
    let g = allot_core::BlockGrant { pool: "mig".into(), cidr: "10.84.0.32/28".parse().unwrap(), node: "n9".into() };
    assert!(rt.block_on(store.grant_block(&g)).unwrap());

    let n1 = start("n1", flags(&[]));
    let adopt = |dir: &Path| n1.cli(&["adopt", "host-local", dir.to_str().unwrap()]);
    // A lease in n2's block.
    let old1 = tempfile::tempdir().unwrap();
    let (code, r) = host_local("ADD", old1.path(), "oldnet", "10.84.0.0/28", "n1-old0");
    assert_eq!(code, 0, "{r}");
    let (ok, _, err) = adopt(&old1.path().join("oldnet"));
    assert!(!ok && err.contains("block 10.84.0.0/28 of pool \"mig\" is held by node \"n2\"") && err.contains("nothing was adopted"), "{err}");
    // Leases in n9's block and in a free one: refused as a whole.
    let old3 = tempfile::tempdir().unwrap();
    for id in ["n1-a", "n1-b"] {
        let (code, r) = host_local("ADD", old3.path(), "other", "10.84.0.32/27", id);
        assert_eq!(code, 0, "{r}");
    }
    let dir3 = old3.path().join("other");
    std::fs::rename(dir3.join("10.84.0.35"), dir3.join("10.84.0.50")).unwrap();
    let (ok, _, err) = adopt(&dir3);
    assert!(!ok && err.contains("held by node \"n9\"") && !err.contains("n2"), "{err}");
    assert!(listed(&n1).is_empty(), "nothing adopted");
    assert!(held("n1").is_empty(), "no block claimed for a refused adoption");
    assert_eq!(held("n2"), ["10.84.0.0/28"]);
    assert_eq!(held("n9"), ["10.84.0.32/28"]);

    // Only the lease in the free block: claimed for n1, seen through etcd.
    std::fs::remove_file(dir3.join("10.84.0.34")).unwrap();
    let (ok, out, err) = adopt(&dir3);
    assert!(ok, "{err}");
    assert!(out.contains("1 adopted") && out.contains("claim block 10.84.0.48/28 of pool mig"), "{out}");
    assert_eq!(held("n1"), ["10.84.0.48/28"]);
    assert_eq!(listed(&n1)["10.84.0.50"], ("n1-b".to_string(), "adopted:host-local".to_string()));

    // An old pod CIDR: refused while n2 holds part of it, claimed when free.
    let (ok, _, err) = n1.cli(&["adopt", "pod-cidr", "10.84.0.0/27", "--pool", "mig"]);
    assert!(!ok && err.contains("held by node \"n2\""), "{err}");
    assert_eq!(held("n1"), ["10.84.0.48/28"], "10.84.0.16/28 is free but not claimed for a refused adoption");
    let (ok, _, err) = n1.cli(&["adopt", "pod-cidr", "10.84.0.64/27", "--pool", "mig"]);
    assert!(ok, "{err}");
    assert_eq!(held("n1"), ["10.84.0.48/28", "10.84.0.64/28", "10.84.0.80/28"]);
    // Pinned: still held after a few demand-loop passes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(held("n1"), ["10.84.0.48/28", "10.84.0.64/28", "10.84.0.80/28"]);
    drop(n2);
}

/// A pool given with `allot adopt host-local DIR --pool NAME` survives a restart with
/// `--adopt-host-local DIR` (the flag names no pool): a later lease outside that pool is refused
/// at the rescan, not adopted into another pool.
#[test]
fn adopt_host_local_flag_keeps_the_pool_given_earlier_across_a_restart() {
    require_root();
    let old = tempfile::tempdir().unwrap();
    let (code, r) = host_local("ADD", old.path(), "oldnet", "10.87.0.0/28", "side0");
    assert_eq!(code, 0, "{r}");
    let dir = old.path().join("oldnet");
    let dir_s = dir.to_str().unwrap();
    let mut agent = Agent::start(
        "n1",
        &["--pool", "mig=10.86.0.0/24@28", "--pool", "side=10.87.0.0/24@28", "--default-pool", "mig", "--pre-allocation", "mig=0", "--adopt-host-local", dir_s],
    );
    poll("ready", Duration::from_secs(10), || cni_readiness(&agent).ready.then_some(()));
    let (ok, out, err) = agent.cli(&["adopt", "host-local", dir_s, "--pool", "side"]);
    assert!(ok && out.contains("1 already adopted"), "{out}{err}");
    assert!(agent.terminate());
    agent.spawn();
    poll("ready after the restart", Duration::from_secs(10), || cni_readiness(&agent).ready.then_some(()));
    // A lease in mig's CIDR appears: outside pool side, so the rescan refuses it.
    let (code, r) = host_local("ADD", old.path(), "oldnet", "10.86.0.0/28", "mig0");
    assert_eq!(code, 0, "{r}");
    poll("the rescan refuses 10.86.0.2", Duration::from_secs(10), || agent.log().contains("lies in no CIDR of pool \"side\"").then_some(()));
    let list = listed(&agent);
    assert!(!list.contains_key("10.86.0.2"), "adopted outside the pool given: {list:?}");
    assert_eq!(list["10.87.0.2"], ("side0".to_string(), "adopted:host-local".to_string()));
}
