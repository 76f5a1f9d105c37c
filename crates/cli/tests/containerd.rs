//! allot under a real container runtime, as root: a private containerd (Debian's 1.6) driven
//! through CRI as the kubelet drives it, its CRI plugin running Debian's bridge plugin with
//! `"ipam": {"type": "allot-ipam"}` against `allot agent` as a separate process.

mod harness;
#[path = "harness/containerd.rs"]
mod containerd;

use std::time::Instant;

use containerd::Containerd;
use harness::*;
use ipnet::IpNet;

/// (ip, pool, containerID) of every allocation the agent holds.
fn allocations(agent: &Agent) -> Vec<(String, String, String)> {
    agent
        .cli_json(&["allocations", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ip"].as_str().unwrap().to_string(), r["pool"].as_str().unwrap().to_string(), r["containerID"].as_str().unwrap().to_string()))
        .collect()
}

fn held_by(agent: &Agent, sandbox: &str) -> Vec<(String, String)> {
    allocations(agent).into_iter().filter(|(_, _, c)| c == sandbox).map(|(ip, pool, _)| (ip, pool)).collect()
}

fn within(ip: &str, net: &str) -> bool {
    let addr: std::net::IpAddr = ip.split('/').next().unwrap().parse().unwrap_or_else(|e| panic!("{ip:?} is not an address: {e}"));
    net.parse::<IpNet>().unwrap().contains(&addr)
}

/// Issue 8, point 12. containerd's CNI library reads any DEL error containing "not found" as
/// "already deleted": if allot-ipam's "agent unreachable" error reads that way, StopPodSandbox
/// succeeds while the agent restarts, the namespace goes, and the address stays allocated.
#[test]
fn stop_pod_sandbox_with_the_agent_stopped_does_not_leak() {
    require_root();
    let t0 = Instant::now();
    let mut agent = Agent::start("cri-leak", &["--pool", "default=10.231.0.0/16@24", "--reserve-gateway"]);
    let ctrd = Containerd::start(&agent.socket, true);
    eprintln!("{} up in {:?}", ctrd.version(), t0.elapsed());

    let id = ctrd.run_pod("default", "leak", &[]).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}\n{}", ctrd.log(), agent.log()));
    let ip = ctrd.pod_ip(&id);
    assert!(within(&ip, "10.231.0.0/16"), "PodSandboxStatus network.ip {ip:?} not in the default pool");
    assert_eq!(ctrd.netns_paths().len(), 1, "the pod's network namespace is not where the harness looks");
    let held = held_by(&agent, &id);
    assert_eq!(held.len(), 1, "the agent should hold one address for sandbox {id}: {held:?}");
    assert!(held[0].0.starts_with(&format!("{ip}/")) || held[0].0 == ip, "agent holds {held:?}, CRI reports {ip}");

    // A restart: SIGTERM removes the socket; until the agent is back, DEL cannot be served.
    assert!(agent.terminate(), "agent did not exit cleanly on SIGTERM:\n{}", agent.log());
    assert!(!agent.socket.exists(), "the stopped agent left its socket {}", agent.socket.display());
    match ctrd.stop_pod(&id) {
        Ok(()) => {
            agent.spawn();
            panic!(
                "StopPodSandbox succeeded while the agent was stopped: containerd took allot-ipam's DEL error \
                 for \"already deleted\" (it contains \"not found\"), its network namespace is gone ({} left), \
                 and the restarted agent still holds {:?} for a pod that no longer exists",
                ctrd.netns_paths().len(),
                held_by(&agent, &id)
            )
        }
        Err(e) => eprintln!("StopPodSandbox with the agent stopped failed, as it must: {}", e.message()),
    }
    assert!(!ctrd.netns_paths().is_empty(), "the pod's network namespace went although its DEL failed");

    agent.spawn();
    assert_eq!(held_by(&agent, &id).len(), 1, "the restarted agent lost the pod's address");
    ctrd.stop_pod(&id).unwrap_or_else(|e| panic!("StopPodSandbox after the agent is back: {e}\n{}", agent.log()));
    ctrd.remove_pod(&id).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    assert_eq!(held_by(&agent, &id), Vec::new(), "the pod is gone but the agent still holds its address");
    assert!(ctrd.netns_paths().is_empty(), "network namespaces left: {:?}", ctrd.netns_paths());
    eprintln!("leak test took {:?}", t0.elapsed());
}

/// The CRI plugin passes pod annotations to CNI only when the plugin declares the
/// `io.kubernetes.cri.pod-annotations` capability; allot-ipam picks the pool from them.
#[test]
fn annotated_pods_land_in_their_pools_through_cri() {
    require_root();
    let t0 = Instant::now();
    let agent = Agent::start("cri-pools", &["--pool", "default=10.233.0.0/16@24", "--pool", "blue=10.234.0.0/16@24"]);
    // Two pools' subnets on one bridge: the bridge plugin can be the gateway of only one.
    let ctrd = Containerd::start(&agent.socket, false);

    let blue = ctrd
        .run_pod("team-a", "blue-pod", &[("ipam.cilium.io/ip-pool", "blue")])
        .unwrap_or_else(|e| panic!("RunPodSandbox (blue): {e}\n{}\n{}", ctrd.log(), agent.log()));
    let plain = ctrd.run_pod("team-a", "plain-pod", &[]).unwrap_or_else(|e| panic!("RunPodSandbox (plain): {e}\n{}", agent.log()));

    let blue_ip = ctrd.pod_ip(&blue);
    let plain_ip = ctrd.pod_ip(&plain);
    assert!(within(&blue_ip, "10.234.0.0/16"), "annotated pod got {blue_ip}, not an address of pool blue");
    assert!(within(&plain_ip, "10.233.0.0/16"), "plain pod got {plain_ip}, not an address of pool default");
    assert_eq!(held_by(&agent, &blue).iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(), ["blue"]);
    assert_eq!(held_by(&agent, &plain).iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(), ["default"]);

    for id in [&blue, &plain] {
        ctrd.stop_pod(id).unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", agent.log()));
        ctrd.remove_pod(id).unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}"));
    }
    assert_eq!(allocations(&agent), Vec::new(), "stopped pods still hold addresses");
    eprintln!("pools test took {:?}", t0.elapsed());
}

fn pings(from: &std::path::Path, to: &str) -> bool {
    std::process::Command::new("nsenter")
        .arg(format!("--net={}", from.display()))
        .args(["ping", "-c", "1", "-W", "2", to])
        .output()
        .unwrap()
        .status
        .success()
}

/// Issue 9, points 2 and 7: containerd with the README's conflist (ptp, the capability, no
/// hand-written runtimeConfig): pods land by pod annotation and by namespace annotation, reach
/// each other across pools, an agent SIGKILLed and started again keeps every live pod's
/// address (CRI and `allot allocations list` agree), and Stop and Remove release.
#[test]
fn ptp_pods_land_by_annotation_ping_and_survive_an_agent_restart() {
    require_root();
    let t0 = Instant::now();
    let mut agent = Agent::start(
        "cri-ptp",
        &["--pool", "default=10.235.0.0/16@24", "--pool", "blue=10.236.0.0/16@24", "--pool", "green=10.237.0.0/16@24"],
    );
    let (ok, _, err) = agent.cli(&["namespace", "annotate", "team-green", "ipam.cilium.io/ip-pool=green"]);
    assert!(ok, "{err}");
    let node = Netns::new();
    netns_exec(&node.name, &["ip", "link", "set", "lo", "up"]);
    netns_exec(&node.name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let ctrd = Containerd::start_ptp(&agent.socket, &node.name);
    eprintln!("{} up in {:?}", ctrd.version(), t0.elapsed());

    // As the kubelet does, every pod carries some annotations.
    let seen = ("kubernetes.io/config.source", "api");
    let cases = [
        ("default", "plain", vec![seen], "default", "10.235.0.0/16"),
        ("default", "blue", vec![seen, ("ipam.cilium.io/ip-pool", "blue")], "blue", "10.236.0.0/16"),
        ("team-green", "green", vec![seen], "green", "10.237.0.0/16"),
    ];
    let mut pods = Vec::new();
    for (namespace, name, annotations, pool, net) in &cases {
        let id = ctrd
            .run_pod(namespace, name, annotations)
            .unwrap_or_else(|e| panic!("RunPodSandbox {namespace}/{name}: {e}\n{}\n{}", ctrd.log(), agent.log()));
        let ip = ctrd.pod_ip(&id);
        assert!(within(&ip, net), "{namespace}/{name} got {ip:?}, not an address of pool {pool}");
        assert_eq!(held_by(&agent, &id), vec![(ip.clone(), pool.to_string())], "{namespace}/{name}: agent and CRI disagree");
        pods.push((id.clone(), ip, ctrd.pod_netns(&id)));
    }
    assert!(!agent.log().contains("without annotations"), "the capability did not bring the annotations:\n{}", agent.log());
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        assert!(pings(&pods[from].2, &pods[to].1), "{} ({}) cannot ping {} ({})", cases[from].1, pods[from].1, cases[to].1, pods[to].1);
    }

    // SIGKILL the agent and start it again: every live pod keeps its address, and the next
    // pod gets a new one.
    agent.kill();
    agent.spawn();
    for (id, ip, _) in &pods {
        assert_eq!(ctrd.pod_ip(id), *ip, "CRI's address of {id} changed");
        assert_eq!(held_by(&agent, id).into_iter().map(|(a, _)| a).collect::<Vec<_>>(), vec![ip.clone()], "after the restart");
    }
    let late = ctrd.run_pod("default", "late", &[seen]).unwrap_or_else(|e| panic!("RunPodSandbox after restart: {e}\n{}", agent.log()));
    let late_ip = ctrd.pod_ip(&late);
    assert!(pods.iter().all(|(_, ip, _)| *ip != late_ip), "{late_ip} handed out twice");
    assert!(pings(&ctrd.pod_netns(&late), &pods[1].1), "the pod started after the restart cannot reach blue");
    pods.push((late, late_ip, std::path::PathBuf::new()));

    for (id, _, _) in &pods {
        ctrd.stop_pod(id).unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", agent.log()));
        assert_eq!(held_by(&agent, id), Vec::new(), "StopPodSandbox of {id} did not release");
        ctrd.remove_pod(id).unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}"));
    }
    assert_eq!(allocations(&agent), Vec::new(), "removed pods still hold addresses");
    assert!(ctrd.netns_paths().is_empty(), "network namespaces left: {:?}", ctrd.netns_paths());
    eprintln!("ptp test took {:?}", t0.elapsed());
}
