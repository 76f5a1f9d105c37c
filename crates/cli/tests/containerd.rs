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
