//! allot-ipam under the main reference plugins, as root: Debian's `ptp` and `bridge` executed
//! the way a runtime executes them, inside a "node" network namespace, with pods in their own
//! namespaces and `allot agent` as a separate process.

mod harness;

use std::path::Path;

use harness::*;
use ipnet::IpNet;
use serde_json::{Value, json};

const PTP: &str = "/usr/lib/cni/ptp";
const BRIDGE: &str = "/usr/lib/cni/bridge";

/// The conflist the README documents, read from the README itself.
fn readme_conflist() -> Value {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let start = readme.find("A CNI conflist").expect("README documents a CNI conflist");
    let block = &readme[start..];
    let json_start = block.find("```json\n").expect("the conflist is a json block") + "```json\n".len();
    let json_end = json_start + block[json_start..].find("```").unwrap();
    serde_json::from_str(&block[json_start..json_end]).expect("the README's conflist is valid JSON")
}

/// What libcni hands one plugin of a conflist: the plugin's object with the list's name and
/// version, and runtimeConfig for the capabilities it declares (here pod annotations only).
fn plugin_conf(list: &Value, agent: &Agent, annotations: Value) -> Value {
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    conf["ipam"]["socket"] = json!(agent.socket);
    if conf["capabilities"]["io.kubernetes.cri.pod-annotations"] == json!(true) {
        conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
    }
    conf
}

fn gateway_of(result: &Value) -> String {
    result["ips"][0]["gateway"].as_str().unwrap_or_else(|| panic!("no gateway in {result}")).to_string()
}

fn addr(cidr: &str) -> String {
    cidr.split('/').next().unwrap().to_string()
}

fn pings(from: &Netns, to: &str) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-c", "1", "-W", "2", to])
        .output()
        .unwrap()
        .status
        .success()
}

fn default_route(ns: &Netns) -> Value {
    let out = netns_exec(&ns.name, &["ip", "-j", "route", "show", "default"]);
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

struct Pod {
    ns: Netns,
    id: String,
    result: Value,
}

fn add_pod(node: &Netns, plugin: &str, conf: &Value, what: &str, agent: &Agent) -> Pod {
    let ns = Netns::new();
    let id = format!("{what}-{}", unique("c"));
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={what}");
    let call = CniCall { plugin: Path::new(plugin), command: "ADD", container_id: &id, netns: &ns.path(), ifname: "eth0", args: &args };
    let (code, result) = cni_in(Some(&node.name), &call, conf);
    assert_eq!(code, 0, "{what}: {plugin} ADD failed: {result}\n{}", agent.log());
    Pod { ns, id, result }
}

fn del_pod(node: &Netns, plugin: &str, conf: &Value, pod: &Pod) {
    let call = CniCall { plugin: Path::new(plugin), command: "DEL", container_id: &pod.id, netns: &pod.ns.path(), ifname: "eth0", args: "" };
    let (code, out) = cni_in(Some(&node.name), &call, conf);
    assert_eq!(code, 0, "{plugin} DEL of {} failed: {out}", pod.id);
}

/// Issue 9, point 1: with the README's conflist (`ptp`), pods of two pools on one node get a
/// gateway and a default route, and reach each other through the node.
#[test]
fn ptp_pods_of_two_pools_on_one_node_ping_each_other() {
    require_root();
    let agent = Agent::start("ptp-node", &["--pool", "default=10.101.0.0/16@24", "--pool", "blue=10.102.0.0/16@24"]);
    let node = Netns::new();
    netns_exec(&node.name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let list = readme_conflist();
    assert_eq!(list["plugins"][0]["type"], "ptp", "the README's conflist should use ptp for several pools");

    let plain = add_pod(&node, PTP, &plugin_conf(&list, &agent, json!({"kubernetes.io/config.source": "api"})), "plain", &agent);
    let blue_conf = plugin_conf(&list, &agent, json!({"ipam.cilium.io/ip-pool": "blue"}));
    let blue = add_pod(&node, PTP, &blue_conf, "blue", &agent);
    let blue2 = add_pod(&node, PTP, &blue_conf, "blue2", &agent);
    let ip = |p: &Pod| addr(p.result["ips"][0]["address"].as_str().unwrap());
    assert!("10.101.0.0/16".parse::<IpNet>().unwrap().contains(&ip(&plain).parse::<std::net::IpAddr>().unwrap()), "plain pod got {}", ip(&plain));
    assert!("10.102.0.0/16".parse::<IpNet>().unwrap().contains(&ip(&blue).parse::<std::net::IpAddr>().unwrap()), "blue pod got {}", ip(&blue));
    assert_eq!(gateway_of(&plain.result), "10.101.0.1");
    assert_eq!(gateway_of(&blue.result), "10.102.0.1");
    assert_ne!(ip(&blue), "10.102.0.1", "a pod got its block's gateway");
    assert_eq!(plain.result["routes"], json!([{"dst": "0.0.0.0/0", "gw": "10.101.0.1"}]));
    assert_eq!(default_route(&plain.ns)["gateway"], "10.101.0.1", "the pod's default route");

    for (from, to) in [(&plain, &blue), (&blue, &plain), (&blue, &blue2)] {
        assert!(pings(&from.ns, &ip(to)), "{} ({}) cannot ping {} ({})", from.id, ip(from), to.id, ip(to));
    }
    for p in [&plain, &blue, &blue2] {
        del_pod(&node, PTP, &blue_conf, p);
    }
    assert_eq!(agent.cli_json(&["allocations", "list"]), json!([]), "DEL through ptp left allocations");
}

/// Issue 9, point 1: `bridge` with `isGateway` gives itself the block's gateway; no pod ever
/// gets it, and each pod's default route goes via it. (Debian's bridge refuses a second
/// address of a family on the bridge, so one block per family per node: the README says so.)
#[test]
fn bridge_is_gateway_pods_never_get_the_gateway() {
    require_root();
    let agent = Agent::start("gw-node", &["--pool", "default=10.103.0.0/16@28", "--pre-allocation", "default=0"]);
    let node = Netns::new();
    let bridge = Bridge::new();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "gwnet", "type": "bridge", "bridge": bridge.name, "isGateway": true, "ipMasq": false,
        "ipam": {"type": "allot-ipam", "socket": agent.socket},
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"kubernetes.io/config.source": "api"}}
    });
    // A /28 holds 14 usable addresses, 13 for pods once the gateway is kept.
    let pods: Vec<Pod> = (0..13).map(|i| add_pod(&node, BRIDGE, &conf, &format!("p{i}"), &agent)).collect();
    let mut blocks = std::collections::BTreeSet::new();
    for p in &pods {
        let a: IpNet = p.result["ips"][0]["address"].as_str().unwrap().parse().unwrap();
        let block = IpNet::new(a.addr(), 28).unwrap().trunc();
        let gw = block.hosts().next().unwrap().to_string();
        blocks.insert(block);
        assert_ne!(a.addr().to_string(), gw, "{} got its block's gateway {gw}", p.id);
        assert_eq!(gateway_of(&p.result), gw, "{}: result gateway", p.id);
        assert_eq!(default_route(&p.ns)["gateway"], json!(gw), "{}: default route", p.id);
        assert!(pings(&p.ns, &gw), "{} cannot reach its gateway {gw} on the bridge", p.id);
    }
    assert_eq!(blocks.len(), 1, "13 pods fill one /28 block: {blocks:?}");
    for p in &pods {
        del_pod(&node, BRIDGE, &conf, p);
    }
}

/// Issue 9, point 3: libcni passes the whole chain's result as prevResult; CHECK passes when a
/// later plugin added an address, fails (110) when allot's is missing, and an unreadable
/// prevResult is code 7.
#[test]
fn check_in_a_chain_that_adds_an_address() {
    require_root();
    let agent = Agent::start("chk-node", &["--pool", "default=10.104.0.0/16@24"]);
    let node = Netns::new();
    let bridge = Bridge::new();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "chknet", "type": "bridge", "bridge": bridge.name, "isGateway": true,
        "ipam": {"type": "allot-ipam", "socket": agent.socket}
    });
    let pod = add_pod(&node, BRIDGE, &conf, "chk", &agent);
    // A later plugin in the chain adds an address to the interface and to the result.
    // (A /24, so that its prefix route exists: bridge's CHECK looks the route up.)
    netns_exec(&pod.ns.name, &["ip", "addr", "add", "192.168.77.7/24", "dev", "eth0"]);
    let mut chain = pod.result.clone();
    chain["ips"].as_array_mut().unwrap().push(json!({"address": "192.168.77.7/24", "interface": 0}));
    let check = |prev: &Value, plugin: &str| {
        let mut c = conf.clone();
        c["prevResult"] = prev.clone();
        let call = CniCall { plugin: Path::new(plugin), command: "CHECK", container_id: &pod.id, netns: &pod.ns.path(), ifname: "eth0", args: "" };
        cni_in(Some(&node.name), &call, &c)
    };
    let (code, out) = check(&chain, BRIDGE);
    assert_eq!(code, 0, "bridge CHECK with an extra chained address failed: {out}");

    let ipam = bin_dir().join("allot-ipam");
    let ipam = ipam.to_str().unwrap();
    let mut missing = chain.clone();
    missing["ips"].as_array_mut().unwrap().remove(0);
    let (code, out) = check(&missing, ipam);
    assert_eq!((code, out["code"].as_u64()), (1, Some(110)), "allot's address missing from prevResult: {out}");
    let mut garbled = chain.clone();
    garbled["ips"][0]["address"] = json!("10.104.0.x/24");
    let (code, out) = check(&garbled, ipam);
    assert_eq!((code, out["code"].as_u64()), (1, Some(7)), "unreadable prevResult: {out}");
    del_pod(&node, BRIDGE, &conf, &pod);
}

/// Issue 9, point 2: an ADD that names a pod but carries no annotations (the conflist lacks
/// the capability) is logged as a warning that says what to declare; one with them is not.
#[test]
fn an_add_for_a_pod_without_annotations_warns_about_the_capability() {
    require_root();
    let agent = Agent::start("warn-node", &["--pool", "default=10.105.0.0/16@24"]);
    let conf = |annotations: Option<Value>| {
        let mut c = json!({"cniVersion": "1.0.0", "name": "warnnet", "type": "ptp", "ipam": {"type": "allot-ipam", "socket": agent.socket}});
        if let Some(a) = annotations {
            c["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": a });
        }
        c
    };
    let plugin = bin_dir().join("allot-ipam");
    let add = |id: &str, pod: &str, c: &Value| {
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
        let (code, out) = cni(&CniCall { plugin: &plugin, command: "ADD", container_id: id, netns: "/x", ifname: "eth0", args: &args }, c);
        assert_eq!(code, 0, "{out}");
    };
    add("with", "annotated", &conf(Some(json!({"kubernetes.io/config.source": "api"}))));
    let warned = |pod: &str| agent.log().lines().any(|l| l.contains("WARN") && l.contains(&format!("default/{pod}")) && l.contains("io.kubernetes.cri.pod-annotations"));
    add("without", "bare", &conf(None));
    poll("the warning in the agent's log", std::time::Duration::from_secs(2), || warned("bare").then_some(()));
    assert!(!warned("annotated"), "a pod with annotations was warned about:\n{}", agent.log());
}
