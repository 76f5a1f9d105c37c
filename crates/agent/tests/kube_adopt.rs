//! Adoption (issue 12, point 1) on the Kubernetes store, on the fake API server
//! (allot-kube-fake): the agent runs `run_kubernetes` with `--adopt-host-local`, the leases come
//! from Debian's real `host-local` plugin. Adopted blocks are `IPBlock`s of this node; another
//! node's `IPBlock` refuses an adoption, by name, and then nothing is adopted or claimed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use allot_agent::AgentConfig;
use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_k8s::{KubeStore, KubeStoreOptions};
use allot_kube_fake::FakeApiServer;
use allot_store::Store;
use allot_wire::{AddRequest, AdoptHostLocalRequest, AdoptPodCidrRequest, AdoptResponse, Allocation, AllocationSource, Owner, Status};
use serde_json::json;

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

fn opts() -> KubeStoreOptions {
    KubeStoreOptions { namespace: "allot-system".into(), timeout: Duration::from_secs(5), ..Default::default() }
}

/// host-local run as the old CNI's IPAM (as `bridge` runs it); its leases land in
/// `data/<network>`. Returns the address it handed out.
fn host_local_add(data: &Path, network: &str, subnet: &str, id: &str) -> String {
    assert!(Path::new(HOST_LOCAL).exists(), "needs Debian's containernetworking-plugins ({HOST_LOCAL})");
    let conf = json!({"cniVersion": "1.0.0", "name": network, "type": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data}});
    let mut child = Command::new(HOST_LOCAL)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "host-local ADD: {v}");
    v["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// The blocks `node` holds as `IPBlock` objects in the API server.
fn ipblocks_of(api: &FakeApiServer, node: &str) -> Vec<String> {
    let mut v: Vec<String> = api
        .objects("allot.dev/v1", "IPBlock")
        .iter()
        .filter(|b| b["spec"]["node"] == node)
        .map(|b| format!("{}/{}", b["spec"]["pool"].as_str().unwrap(), b["spec"]["cidr"].as_str().unwrap()))
        .collect();
    v.sort();
    v
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_adoption_claims_ipblocks_for_the_node_and_is_refused_by_another_nodes_block() {
    let api = FakeApiServer::new();
    api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "allot-system"}}));
    let admin = KubeStore::connect(api.client(), opts()).await.unwrap();
    let spec = PoolSpec { ipv4: Some(FamilySpec { cidrs: vec!["10.85.0.0/24".parse().unwrap()], mask_size: 28 }), ipv6: None };
    admin.apply_pools(vec![Pool { name: "mig".into(), spec }]).await.unwrap();
    // n2 holds 10.85.0.16/28 (no agent runs for it).
    admin.register_node("n2", None).await.unwrap();
    let n2_block = BlockGrant { pool: "mig".into(), cidr: "10.85.0.16/28".parse().unwrap(), node: "n2".into() };
    assert!(admin.grant_block(&n2_block).await.unwrap());

    let old = tempfile::tempdir().unwrap();
    let leased: Vec<String> = (0..3).map(|i| host_local_add(old.path(), "oldnet", "10.85.0.0/28", &format!("old{i}"))).collect();
    assert_eq!(leased, ["10.85.0.2", "10.85.0.3", "10.85.0.4"]);

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new("n1");
    cfg.data_dir = dir.path().join("data");
    cfg.socket = dir.path().join("allot.sock");
    cfg.add_wait = Duration::from_secs(10);
    cfg.pre_allocation.clear();
    cfg.default_pool = "mig".into();
    cfg.adopt_host_local = vec![old.path().join("oldnet")];
    let socket = cfg.socket.clone();
    let (down_tx, down) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(allot_agent::kube_cluster::run_kubernetes(cfg, api.client(), opts(), async move {
        let _ = down.await;
    }));
    let client = allot_client::Client::new(&socket, Duration::from_secs(30));

    // Ready for ADDs only once the directory is adopted.
    blocking({
        let client = client.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if client.get::<Status>("/v1/status").ok().and_then(|s| s.cni).is_some_and(|r| r.ready) {
                    return;
                }
                assert!(Instant::now() < deadline, "agent not ready for ADDs in 20 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await;
    let allocations: Vec<Allocation> = blocking({
        let client = client.clone();
        move || client.get("/v1/allocations").unwrap()
    })
    .await;
    let mut adopted: Vec<String> = allocations
        .iter()
        .filter(|a| a.source == AllocationSource::Adopted("host-local".into()))
        .map(|a| a.ips[0].address.addr().to_string())
        .collect();
    adopted.sort();
    assert_eq!(adopted, leased, "{allocations:?}");
    // The block is an IPBlock of n1 in the API server, and another store's mirror sees it.
    assert_eq!(ipblocks_of(&api, "n1"), ["mig/10.85.0.0/28"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin.grants().await.unwrap().iter().any(|g| g.node == "n1" && g.cidr.to_string() == "10.85.0.0/28") {
        assert!(Instant::now() < deadline, "admin's store never saw n1's block");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let add = AddRequest {
        owner: Owner { network: "newnet".into(), container_id: "new0".into(), ifname: "eth0".into() },
        netns: "/var/run/netns/new0".into(),
        pod: Default::default(),
        pool: None,
        annotations: Default::default(),
        annotations_passed: true,
    };
    let a: Allocation = blocking({
        let client = client.clone();
        move || client.post("/v1/cni/add", &add).unwrap()
    })
    .await;
    assert_eq!(a.ips[0].address.addr().to_string(), "10.85.0.5", "the first address host-local did not hand out");

    // Leases in n2's block and in a free one: refused as a whole, naming n2.
    let old2 = tempfile::tempdir().unwrap();
    for id in ["a", "b"] {
        host_local_add(old2.path(), "other", "10.85.0.16/28", id);
    }
    let dir2 = old2.path().join("other");
    std::fs::rename(dir2.join("10.85.0.19"), dir2.join("10.85.0.40")).unwrap();
    let err = blocking({
        let client = client.clone();
        let req = AdoptHostLocalRequest { dir: dir2.display().to_string(), pool: None, dry_run: false };
        move || client.post::<_, AdoptResponse>("/v1/adopt/host-local", &req).unwrap_err().to_string()
    })
    .await;
    assert!(err.contains("block 10.85.0.16/28 of pool \"mig\" is held by node \"n2\"") && err.contains("nothing was adopted"), "{err}");
    let after: Vec<Allocation> = blocking({
        let client = client.clone();
        move || client.get("/v1/allocations").unwrap()
    })
    .await;
    assert_eq!(after.len(), 4, "nothing adopted: {after:?}");
    assert_eq!(ipblocks_of(&api, "n1"), ["mig/10.85.0.0/28"], "10.85.0.32/28 not claimed for a refused adoption");
    assert_eq!(ipblocks_of(&api, "n2"), ["mig/10.85.0.16/28"]);

    // An old pod CIDR: refused while n2's IPBlock lies in it, claimed when free.
    let pod_cidr = |cidr: &str| AdoptPodCidrRequest { cidr: cidr.parse().unwrap(), pool: "mig".into(), dry_run: false, release: false };
    let err = blocking({
        let client = client.clone();
        let req = pod_cidr("10.85.0.0/27");
        move || client.post::<_, AdoptResponse>("/v1/adopt/pod-cidr", &req).unwrap_err().to_string()
    })
    .await;
    assert!(err.contains("held by node \"n2\""), "{err}");
    let r: AdoptResponse = blocking({
        let client = client.clone();
        let req = pod_cidr("10.85.0.64/27");
        move || client.post("/v1/adopt/pod-cidr", &req).unwrap()
    })
    .await;
    assert_eq!(r.claimed.iter().map(|c| c.cidrs.len()).sum::<usize>(), 2, "{r:?}");
    assert_eq!(ipblocks_of(&api, "n1"), ["mig/10.85.0.0/28", "mig/10.85.0.64/28", "mig/10.85.0.80/28"]);
    // Pinned: empty, yet not given back by the demand loop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ipblocks_of(&api, "n1"), ["mig/10.85.0.0/28", "mig/10.85.0.64/28", "mig/10.85.0.80/28"]);

    let _ = down_tx.send(());
    agent.await.unwrap().unwrap();
}
