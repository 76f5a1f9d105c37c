//! The agent's Kubernetes mode end to end on the fake API server (allot-kube-fake; no real API
//! server runs here): `run_kubernetes` (KubeStore, liveness Lease, pod watch) beside the operator
//! loop on its own KubeStore, a pod whose annotation chooses the pool, ADD and DEL over the socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_agent::AgentConfig;
use allot_core::{FamilySpec, Pool, PoolSpec};
use allot_k8s::{KubeStore, KubeStoreOptions};
use allot_kube_fake::FakeApiServer;
use allot_store::Store;
use allot_wire::{AddRequest, Allocation, Owner, OwnerRequest, PodRef};
use serde_json::json;

fn pool(name: &str, cidr: &str) -> Pool {
    Pool { name: name.into(), spec: PoolSpec { ipv4: Some(FamilySpec { cidrs: vec![cidr.parse().unwrap()], mask_size: 28 }), ipv6: None } }
}

fn opts() -> KubeStoreOptions {
    KubeStoreOptions { namespace: "allot-system".into(), timeout: Duration::from_secs(5), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_agent_on_kubernetes_serves_a_pod_from_its_annotated_pool() {
    let api = FakeApiServer::new();
    for ns in ["allot-system", "shop"] {
        api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    let admin = KubeStore::connect(api.client(), opts()).await.unwrap();
    admin.apply_pools(vec![pool("default", "10.1.0.0/16"), pool("blue", "10.2.0.0/16")]).await.unwrap();
    api.insert(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"ipam.cilium.io/ip-pool": "blue"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "pause"}]}}));

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(allot_operator::run(Arc::new(KubeStore::connect(api.client(), opts()).await.unwrap()), stop));

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new("n1");
    cfg.data_dir = dir.path().join("data");
    cfg.socket = dir.path().join("allot.sock");
    cfg.add_wait = Duration::from_secs(15);
    let socket = cfg.socket.clone();
    let (down_tx, down) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(allot_agent::kube_cluster::run_kubernetes(cfg, api.client(), opts(), async move {
        let _ = down.await;
    }));

    let owner = Owner { network: "k8s-pod-network".into(), container_id: "c-web".into(), ifname: "eth0".into() };
    let req = AddRequest {
        owner: owner.clone(),
        netns: "/var/run/netns/web".into(),
        pod: PodRef { namespace: Some("shop".into()), name: Some("web".into()) },
        pool: None,
        annotations: Default::default(),
        // The runtime passed none (no pod-annotations capability): the pod watch decides.
        annotations_passed: false,
    };
    let client = allot_client::Client::new(&socket, Duration::from_secs(30));
    let alloc: Allocation = tokio::task::spawn_blocking({
        let client = client.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match client.post::<_, Allocation>("/v1/cni/add", &req) {
                    Ok(a) => return a,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "ADD never answered: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    let ip = alloc.ips[0].address.addr();
    assert!("10.2.0.0/16".parse::<ipnet::IpNet>().unwrap().contains(&ip), "{ip} is not from pool blue");

    // What the agent and operator wrote are Kubernetes objects: the node, its block, its Lease.
    let blocks = api.objects("allot.dev/v1", "IPBlock");
    assert!(blocks.iter().any(|b| b["spec"]["node"] == "n1" && b["spec"]["pool"] == "blue"), "{blocks:?}");
    assert!(api.objects("allot.dev/v1", "AllotNode").iter().any(|n| n["metadata"]["name"] == "n1"));
    assert!(api.objects("coordination.k8s.io/v1", "Lease").iter().any(|l| l["metadata"]["name"] == "allot-node-n1"));
    assert!(admin.live_nodes().await.unwrap().unwrap().contains("n1"));

    let del = OwnerRequest { owner };
    tokio::task::spawn_blocking(move || client.post::<_, serde_json::Value>("/v1/cni/del", &del).unwrap()).await.unwrap();

    // A clean stop ends the node's liveness at once.
    let _ = down_tx.send(());
    agent.await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.live_nodes().await.unwrap().unwrap().contains("n1") {
        assert!(Instant::now() < deadline, "n1 still live after a clean stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    operator.await.unwrap();
}
