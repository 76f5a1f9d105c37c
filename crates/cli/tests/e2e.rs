//! End to end, as root: `allot agent` as a separate process, Debian's real bridge plugin with
//! `"ipam": {"type": "allot-ipam"}` into network namespaces, and the `allot` CLI.

mod harness;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::*;
use ipnet::IpNet;
use serde_json::{Value, json};

const BRIDGE: &str = "/usr/lib/cni/bridge";

fn ipam_plugin() -> std::path::PathBuf {
    bin_dir().join("allot-ipam")
}

fn bridge_conf(agent: &Agent, bridge: &Bridge, annotations: Value) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": bridge.name, "isGateway": false,
        "ipam": {"type": "allot-ipam", "socket": agent.socket},
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}
    })
}

fn ipam_conf(agent: &Agent, network: &str, version: &str, ipam_extra: Value) -> Value {
    let mut ipam = json!({"type": "allot-ipam", "socket": agent.socket});
    if let Value::Object(m) = ipam_extra {
        ipam.as_object_mut().unwrap().extend(m);
    }
    json!({"cniVersion": version, "name": network, "type": "ptp", "ipam": ipam})
}

fn within(addr: &str, nets: &[&str]) -> bool {
    let ip: IpNet = addr.parse().unwrap();
    nets.iter().any(|n| n.parse::<IpNet>().unwrap().contains(&ip.addr()))
}

fn allocations(agent: &Agent) -> HashSet<(String, String)> {
    agent
        .cli_json(&["allocations", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ip"].as_str().unwrap().to_string(), r["containerID"].as_str().unwrap().to_string()))
        .collect()
}

struct Pod {
    ns: Netns,
    id: String,
    k8s_args: String,
    result: Value,
}

#[test]
fn bridge_pods_land_in_their_pools_and_survive_sigkill() {
    require_root();
    let mut agent = Agent::start(
        "node-a",
        &[
            "--pool", "default=10.10.0.0/16@24,fd00:10::/104@120",
            "--pool", "blue=10.20.0.0/16@24",
            "--pool", "green=10.30.0.0/16@24,fd00:30::/104@120",
            "--pool", "red=10.40.0.0/16@24",
        ],
    );
    let (ok, _, err) = agent.cli(&["namespace", "annotate", "team-red", "ipam.cilium.io/ip-pool=red"]);
    assert!(ok, "{err}");
    let bridge = Bridge::new();

    let cases: [(&str, Value, &str, &[&str], usize); 4] = [
        ("blue", json!({"ipam.cilium.io/ip-pool": "blue"}), "default", &["10.20.0.0/16"], 1),
        ("green", json!({"ipam.cilium.io/ipv4-pool": "green", "ipam.cilium.io/ipv6-pool": "green", "ipam.cilium.io/ip-pool": "blue"}), "default", &["10.30.0.0/16", "fd00:30::/104"], 2),
        ("ns-red", json!({}), "team-red", &["10.40.0.0/16"], 1),
        ("plain", json!({"unrelated": "x"}), "default", &["10.10.0.0/16", "fd00:10::/104"], 2),
    ];
    let mut pods = Vec::new();
    for (what, annotations, namespace, nets, count) in cases {
        let ns = Netns::new();
        let id = format!("{what}-{}", unique("c"));
        let k8s_args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={what};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID=uid-{what}");
        let conf = bridge_conf(&agent, &bridge, annotations);
        let call = CniCall { plugin: Path::new(BRIDGE), command: "ADD", container_id: &id, netns: &ns.path(), ifname: "eth0", args: &k8s_args };
        let (code, result) = cni(&call, &conf);
        assert_eq!(code, 0, "{what}: bridge ADD failed: {result}\n{}", agent.log());
        let ips = ips_of(&result);
        assert_eq!(ips.len(), count, "{what}: {ips:?}");
        for ip in &ips {
            assert!(within(ip, nets), "{what}: {ip} not in {nets:?}");
        }
        let configured = ns.addresses("eth0");
        for ip in &ips {
            assert!(configured.contains(ip), "{what}: {ip} not configured in the namespace: {configured:?}");
        }
        // CHECK as a runtime sends it: the config with the ADD's result as prevResult.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = result.clone();
        let (code, out) = cni(&CniCall { command: "CHECK", ..call }, &check_conf);
        assert_eq!(code, 0, "{what}: CHECK failed: {out}");
        pods.push(Pod { ns, id, k8s_args, result });
    }
    let rows = agent.cli_json(&["allocations", "list"]);
    let green = rows.as_array().unwrap().iter().find(|r| r["pod"] == "green").unwrap();
    assert_eq!(green["namespace"], "default");
    assert_eq!(green["network"], "podnet");
    let before = allocations(&agent);
    assert_eq!(before.len(), 6);

    // SIGKILL, restart: every answered address is still held by its owner.
    agent.kill();
    agent.spawn();
    assert_eq!(allocations(&agent), before);
    for pod in &pods {
        // ADD again for the same owner answers the same addresses (what a runtime retry sees).
        let conf = ipam_conf(&agent, "podnet", "1.0.0", json!({}));
        let call = CniCall { plugin: &ipam_plugin(), command: "ADD", container_id: &pod.id, netns: &pod.ns.path(), ifname: "eth0", args: &pod.k8s_args };
        let (code, again) = cni(&call, &conf);
        assert_eq!(code, 0, "{again}");
        let mut a = ips_of(&again);
        let mut b = ips_of(&pod.result);
        a.sort();
        b.sort();
        assert_eq!(a, b, "same owner, same addresses after restart");
    }
    // A new pod after the restart gets an address nobody holds.
    let ns = Netns::new();
    let conf = bridge_conf(&agent, &bridge, json!({}));
    let call = CniCall { plugin: Path::new(BRIDGE), command: "ADD", container_id: "after-restart", netns: &ns.path(), ifname: "eth0", args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default" };
    let (code, result) = cni(&call, &conf);
    assert_eq!(code, 0, "{result}");
    let held: HashSet<String> = before.iter().map(|(ip, _)| ip.clone()).collect();
    for ip in ips_of(&result) {
        let addr = ip.split('/').next().unwrap().to_string();
        assert!(!held.contains(&addr), "{addr} handed out twice");
    }
    assert_eq!(cni(&CniCall { command: "DEL", ..call }, &conf).0, 0);

    // DEL frees; a second DEL of the same container succeeds too.
    for pod in &pods {
        let conf = bridge_conf(&agent, &bridge, json!({}));
        let call = CniCall { plugin: Path::new(BRIDGE), command: "DEL", container_id: &pod.id, netns: &pod.ns.path(), ifname: "eth0", args: &pod.k8s_args };
        assert_eq!(cni(&call, &conf).0, 0);
        assert_eq!(cni(&call, &conf).0, 0, "DEL of an unknown owner succeeds");
    }
    assert!(allocations(&agent).is_empty());
}

#[test]
fn concurrent_adds_get_distinct_addresses_while_blocks_are_granted() {
    require_root();
    // /28 blocks (14 usable): 64 ADDs need five blocks, granted while the storm runs.
    let mut agent = Agent::start("node-b", &["--pool", "default=10.60.0.0/24@28", "--add-wait", "20s"]);
    let plugin = ipam_plugin();
    let conf = ipam_conf(&agent, "storm", "1.1.0", json!({}));
    let results: Vec<(i32, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (plugin, conf) = (&plugin, &conf);
                s.spawn(move || {
                    let id = format!("storm{i}");
                    cni(&CniCall { plugin, command: "ADD", container_id: &id, netns: "/var/run/netns/none", ifname: "eth0", args: "" }, conf)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen = HashSet::new();
    for (code, r) in &results {
        assert_eq!(*code, 0, "{r}");
        for ip in ips_of(r) {
            assert!(within(&ip, &["10.60.0.0/24"]), "{ip}");
            assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    assert_eq!(seen.len(), 64);
    let node = agent.cli_json(&["node", "get", "node-b"]);
    let blocks = node["spec"]["ipam"]["pools"]["allocated"][0]["cidrs"].as_array().unwrap().len();
    assert!(blocks >= 5, "{node}");

    agent.kill();
    agent.spawn();
    let after: HashSet<String> = allocations(&agent).into_iter().map(|(ip, _)| ip).collect();
    let answered: HashSet<String> = seen.iter().map(|s| s.split('/').next().unwrap().to_string()).collect();
    assert_eq!(after, answered, "every answered address survives SIGKILL");
}

#[test]
fn gc_releases_only_invalid_attachments_of_its_own_network() {
    require_root();
    let mut agent = Agent::start("node-c", &["--pool", "default=10.61.0.0/24@26"]);
    let plugin = ipam_plugin();
    let add = |network: &str, id: &str| {
        let conf = ipam_conf(&agent, network, "1.1.0", json!({}));
        let (code, r) = cni(&CniCall { plugin: &plugin, command: "ADD", container_id: id, netns: "/x", ifname: "eth0", args: "" }, &conf);
        assert_eq!(code, 0, "{r}");
    };
    for id in ["a1", "a2", "a3"] {
        add("net-a", id);
    }
    add("net-b", "b1");
    // One container on two allot networks holds one address on each.
    add("net-b", "a1");

    let mut gc_conf = ipam_conf(&agent, "net-a", "1.1.0", json!({}));
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "a1", "ifname": "eth0"}]);
    gc_conf["cni.dev/attachments"] = json!([{"containerID": "a3", "ifname": "eth0"}]);
    let (code, out) = cni(&CniCall { plugin: &plugin, command: "GC", container_id: "", netns: "", ifname: "", args: "" }, &gc_conf);
    assert_eq!(code, 0, "{out}");
    let owners: HashSet<String> = allocations(&agent).into_iter().map(|(_, id)| id).collect();
    assert_eq!(owners, ["a1", "a3", "b1"].into_iter().map(String::from).collect());
    let rows = agent.cli_json(&["allocations", "list"]);
    let nets: Vec<&str> = rows.as_array().unwrap().iter().filter(|r| r["containerID"] == "a1").map(|r| r["network"].as_str().unwrap()).collect();
    assert_eq!(nets.len(), 2, "a1 on both networks: {nets:?}");

    // CHECK: an unknown owner is code 3; a prevResult that differs from what allot holds is 110.
    let check_conf = |prev: Value| {
        let mut c = ipam_conf(&agent, "net-a", "1.1.0", json!({}));
        c["prevResult"] = prev;
        c
    };
    let check = |id: &str, prev: Value| cni(&CniCall { plugin: &plugin, command: "CHECK", container_id: id, netns: "/x", ifname: "eth0", args: "" }, &check_conf(prev));
    let (_, err) = check("a2", json!({"cniVersion": "1.1.0", "ips": []}));
    assert_eq!(err["code"], 3, "{err}");
    let (_, err) = check("a1", json!({"cniVersion": "1.1.0", "ips": [{"address": "192.0.2.1/24"}]}));
    assert_eq!(err["code"], 110, "{err}");

    // STATUS: success while the agent serves, 50 once it is gone; ADD then answers 11.
    let status_conf = ipam_conf(&agent, "net-a", "1.1.0", json!({}));
    let status = CniCall { plugin: &plugin, command: "STATUS", container_id: "", netns: "", ifname: "", args: "" };
    assert_eq!(cni(&status, &status_conf), (0, Value::Null));
    agent.kill();
    let (code, err) = cni(&status, &status_conf);
    assert_eq!((code, err["code"].as_u64()), (1, Some(50)), "{err}");
    let (_, err) = cni(&CniCall { plugin: &plugin, command: "ADD", container_id: "z", netns: "/x", ifname: "eth0", args: "" }, &status_conf);
    assert_eq!(err["code"], 11);
    assert!(err["msg"].as_str().unwrap().contains(agent.socket.to_str().unwrap()), "{err}");
}

/// The pool of the Cilium multi-pool page, exactly as written there.
const SEED_POOL: &str = include_str!("fixtures/seed-pool.yaml");

#[test]
fn pool_cli_accepts_cilium_yaml_and_refuses_bad_changes_without_effect() {
    require_root();
    let agent = Agent::start("node-d", &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let seed = file("seed.yaml", &format!("{SEED_POOL}---\napiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: blue\nspec:\n  ipv4:\n    cidrs: [10.50.0.0/16]\n    maskSize: 26\n"));
    let (ok, out, err) = agent.cli(&["pool", "apply", "-f", &seed]);
    assert!(ok, "{err}");
    assert_eq!(out, "POOL              RESULT\npool/green-pool   created\npool/blue         created\n");
    let (_, out, _) = agent.cli(&["pool", "apply", "-f", &seed]);
    assert!(out.contains("pool/green-pool   unchanged"), "{out}");

    let list = agent.cli_json(&["pool", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (ok, yaml, _) = agent.cli(&["pool", "get", "green-pool", "-o", "yaml"]);
    assert!(ok && yaml.contains("maskSize: 120") && yaml.contains("fd00::/104"), "{yaml}");
    let (_, table, _) = agent.cli(&["pool", "list"]);
    assert!(table.starts_with("NAME") && table.contains("10.20.0.0/16,10.30.0.0/16 /24"), "{table}");

    // Hold a block of green-pool: a pod pinned to it by its CNI config.
    let conf = ipam_conf(&agent, "secondary", "1.0.0", json!({"pool": "green-pool"}));
    let (code, r) = cni(&CniCall { plugin: &ipam_plugin(), command: "ADD", container_id: "pinned", netns: "/x", ifname: "net1", args: "" }, &conf);
    assert_eq!(code, 0, "{r}");
    assert!(within(&ips_of(&r)[0], &["10.20.0.0/16"]), "{r}");

    let state = || (agent.cli_json(&["pool", "list"]), agent.cli_json(&["node", "list"]));
    let before = state();
    let refusals: [(&str, String, &str); 6] = [
        ("overlap", SEED_POOL.replace("green-pool", "other").replace("fd00::/104", "fd01::/104"), "overlaps"),
        ("v6 overlap", SEED_POOL.replace("green-pool", "other").replace("10.20.0.0/16", "10.21.0.0/16").replace("10.30.0.0/16", "10.31.0.0/16"), "overlaps"),
        ("mask change", SEED_POOL.replace("maskSize: 24", "maskSize: 25"), "maskSize cannot change"),
        ("host bits", SEED_POOL.replace("green-pool", "other").replace("10.20.0.0/16", "10.99.0.1/16").replace("    - 10.30.0.0/16\n", "").replace("fd00::/104", "fd02::/104"), "write it as 10.99.0.0/16"),
        ("cidr in use", SEED_POOL.replace("    - 10.20.0.0/16\n", ""), "node(s) node-d hold blocks"),
        ("mask too short", SEED_POOL.replace("green-pool", "other").replace("10.20.0.0/16", "10.98.0.0/16").replace("    - 10.30.0.0/16\n", "").replace("fd00::/104", "fd03::/104").replace("maskSize: 24", "maskSize: 8"), "shorter than the prefix"),
    ];
    for (what, text, needle) in refusals {
        let (ok, _, err) = agent.cli(&["pool", "apply", "-f", &file("bad.yaml", &text)]);
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(state(), before, "{what}: a refused change changed something");
    }
    let (ok, _, err) = agent.cli(&["pool", "delete", "green-pool"]);
    assert!(!ok && err.contains("pool \"green-pool\" is in use: node(s) node-d"), "{err}");
    let (ok, _, err) = agent.cli_stdin(&["pool", "apply", "-f", "-"], "apiVersion: cilium.io/v2alpha1\nkind: CiliumPodIPPool\nmetadata:\n  name: x\nspec:\n  ipv4:\n    cidrs: [10.0.0.0/16\n");
    assert!(!ok && err.contains("line"), "{err}");
    assert_eq!(state(), before);

    // Run-time changes that are allowed: a new CIDR, a new pool, deleting an unused pool.
    let (ok, out, err) = agent.cli(&["pool", "apply", "-f", &file("more.yaml", &SEED_POOL.replace("    - 10.30.0.0/16\n", "    - 10.30.0.0/16\n    - 10.31.0.0/16\n"))]);
    assert!(ok && out.contains("configured"), "{out}{err}");
    let (ok, _, err) = agent.cli(&["pool", "delete", "blue"]);
    assert!(ok, "{err}");
    let (ok, _, err) = agent.cli(&["pool", "get", "blue"]);
    assert!(!ok && err.contains("not found"), "{err}");

    // Without an agent, the CLI says so and how to start one.
    let (ok, _, err) = cli(Path::new("/nonexistent/allot.sock"), &["pool", "list"], None);
    assert!(!ok && err.contains("is `allot agent` running?"), "{err}");
}

#[test]
fn a_full_pool_waits_for_a_block_then_answers_try_again_and_recovers_when_cidrs_grow() {
    require_root();
    let agent = Agent::start("node-e", &["--pool", "tiny=10.70.0.0/30@30", "--add-wait", "1s", "--reserve-gateway=false"]);
    let plugin = ipam_plugin();
    let conf = ipam_conf(&agent, "tinynet", "1.0.0", json!({"pool": "tiny"}));
    let call = |id: &str| cni(&CniCall { plugin: &plugin, command: "ADD", container_id: id, netns: "/x", ifname: "eth0", args: "" }, &conf);
    assert_eq!(call("t1").0, 0);
    assert_eq!(call("t2").0, 0);
    let started = Instant::now();
    let (code, err) = call("t3");
    let waited = started.elapsed();
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("pool \"tiny\""), "{err}");
    assert!(waited >= Duration::from_millis(900), "answered after {waited:?}, before the wait bound");
    let node = agent.cli_json(&["node", "get"]);
    assert!(node["status"]["ipam"]["operator-status"]["error"].as_str().unwrap_or("").contains("no free ipv4 block"), "{node}");

    let more = "apiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: tiny\nspec:\n  ipv4:\n    cidrs: [10.70.0.0/30, 10.70.0.4/30]\n    maskSize: 30\n";
    let (ok, _, e) = agent.cli_stdin(&["pool", "apply", "-f", "-"], more);
    assert!(ok, "{e}");
    let (code, r) = call("t3");
    assert_eq!(code, 0, "{r}");
    assert!(within(&ips_of(&r)[0], &["10.70.0.4/30"]), "{r}");
}

fn requested(node: &Value, pool: &str) -> Option<(u64, u64)> {
    node["spec"]["ipam"]["pools"]["requested"].as_array()?.iter().find(|r| r["pool"] == pool).map(|r| {
        (r["needed"]["ipv4-addrs"].as_u64().unwrap_or(0), r["needed"]["ipv6-addrs"].as_u64().unwrap_or(0))
    })
}

fn allocated(node: &Value, pool: &str) -> Vec<String> {
    node["spec"]["ipam"]["pools"]["allocated"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["pool"] == pool))
        .map(|r| r["cidrs"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn requested_follows_the_formula_and_unused_blocks_are_released() {
    require_root();
    let agent = Agent::start("node-f", &["--pool", "default=10.80.0.0/16@24", "--pool", "blue=10.81.0.0/16@28,fd00:81::/112@124", "--reserve-gateway=false"]);
    let node = || agent.cli_json(&["node", "get", "node-f"]);
    // default has preAlloc 8: an idle node asks for 8; blue (preAlloc 0) asks for nothing.
    poll("default requested 8", Duration::from_secs(2), || (requested(&node(), "default") == Some((8, 0))).then_some(()));
    assert_eq!(requested(&node(), "blue"), None);

    let plugin = ipam_plugin();
    let blue = ipam_conf(&agent, "bluenet", "1.0.0", json!({"pool": "blue"}));
    let def = ipam_conf(&agent, "defnet", "1.0.0", json!({}));
    let call = |conf: &Value, cmd: &str, id: &str| cni(&CniCall { plugin: &plugin, command: cmd, container_id: id, netns: "/x", ifname: "eth0", args: "" }, conf);
    for id in ["b1", "b2", "b3"] {
        assert_eq!(call(&blue, "ADD", id).0, 0);
    }
    assert_eq!(call(&def, "ADD", "d1").0, 0);
    let t = Instant::now();
    poll("requested to follow in-use", Duration::from_secs(1), || {
        let n = node();
        (requested(&n, "blue") == Some((3, 3)) && requested(&n, "default") == Some((16, 0))).then_some(())
    });
    eprintln!("requested updated within {:?}", t.elapsed());
    assert_eq!(allocated(&node(), "blue").len(), 2, "one v4 and one v6 block");

    for id in ["b1", "b2", "b3"] {
        assert_eq!(call(&blue, "DEL", id).0, 0);
    }
    poll("blue blocks released", Duration::from_secs(3), || {
        let n = node();
        (requested(&n, "blue").is_none() && allocated(&n, "blue").is_empty()).then_some(())
    });
    // default keeps its block: its one address and the reserve still need it.
    assert_eq!(allocated(&node(), "default"), vec!["10.80.0.0/24".to_string()]);
    let status = agent.cli_json(&["status"]);
    let row = status["pools"].as_array().unwrap().iter().find(|p| p["pool"] == "default").unwrap();
    assert_eq!((row["inUse"].as_u64(), row["free"].as_str()), (Some(1), Some("253")), "{row}");
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("[") && table.contains("%") && table.contains("node node-f: ready"), "{table}");
}

#[test]
fn sigterm_shuts_down_cleanly_and_sweep_releases_dead_namespaces() {
    require_root();
    let mut agent = Agent::start("node-g", &["--pool", "default=10.90.0.0/24@26"]);
    let ns = Netns::new();
    let plugin = ipam_plugin();
    let conf = ipam_conf(&agent, "n", "1.0.0", json!({}));
    let add = |id: &str, netns: &str| cni(&CniCall { plugin: &plugin, command: "ADD", container_id: id, netns, ifname: "eth0", args: "" }, &conf);
    assert_eq!(add("alive", &ns.path()).0, 0);
    assert_eq!(add("gone", "/var/run/netns/does-not-exist").0, 0);
    // A dry run unless --force.
    for args in [&["gc"][..], &["gc", "--dry-run"]] {
        let (ok, out, _) = agent.cli(args);
        assert!(ok && out.contains("would release n/gone/eth0") && out.contains("1 allocation(s)"), "{out}");
        assert_eq!(allocations(&agent).len(), 2, "{args:?} released nothing");
    }
    let (ok, out, _) = agent.cli(&["gc", "--force"]);
    assert!(ok && out.contains("released n/gone/eth0"), "{out}");
    let owners: Vec<String> = allocations(&agent).into_iter().map(|(_, id)| id).collect();
    assert_eq!(owners, vec!["alive".to_string()]);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert!(agent.terminate(), "agent exits 0 on SIGTERM:\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket removed on shutdown");
    assert!(agent.log().contains("agent stopped"));
}

#[test]
fn a_del_wakes_an_add_waiting_on_a_full_pool() {
    require_root();
    let agent = Agent::start("node-h", &["--pool", "tiny=10.71.0.0/30@30", "--add-wait", "20s", "--reserve-gateway=false"]);
    let plugin = ipam_plugin();
    let conf = ipam_conf(&agent, "tinynet", "1.0.0", json!({"pool": "tiny"}));
    let call = |cmd: &str, id: &str| cni(&CniCall { plugin: &plugin, command: cmd, container_id: id, netns: "/x", ifname: "eth0", args: "" }, &conf);
    let (_, first) = call("ADD", "w1");
    assert_eq!(call("ADD", "w2").0, 0);
    let started = Instant::now();
    let (code, third) = std::thread::scope(|s| {
        let waiting = s.spawn(|| call("ADD", "w3"));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(call("DEL", "w1").0, 0);
        waiting.join().unwrap()
    });
    assert_eq!(code, 0, "{third}");
    assert!(started.elapsed() < Duration::from_secs(10), "the waiting ADD was not woken by the DEL");
    assert_eq!(ips_of(&third), ips_of(&first), "the only free address is the one just freed");
}
