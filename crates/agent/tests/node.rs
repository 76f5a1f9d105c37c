//! The agent's node logic in process, on the embedded store.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use allot_agent::{AgentConfig, Node};
use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_store::{EmbeddedStore, Store, StoreError};
use allot_wire::{AddRequest, Owner, PodRef};

fn req(id: &str) -> AddRequest {
    AddRequest {
        owner: Owner { network: "n".into(), container_id: id.into(), ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef::default(),
        pool: None,
        annotations: Default::default(),
        annotations_passed: false,
    }
}

fn pool(cidr: &str, mask: u8) -> Pool {
    Pool {
        name: "default".into(),
        spec: PoolSpec { ipv4: Some(FamilySpec { cidrs: vec![cidr.parse().unwrap()], mask_size: mask }), ipv6: None },
    }
}

fn config(dir: &std::path::Path) -> AgentConfig {
    let mut cfg = AgentConfig::new("n1");
    cfg.data_dir = dir.to_path_buf();
    cfg.add_wait = Duration::from_millis(200);
    cfg
}

/// After a restart, an allocation whose block the node no longer holds takes the block back,
/// so its address cannot be handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reclaims_a_lost_block_that_holds_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
    store.apply_pools(vec![pool("10.0.0.0/24", 28)]).await.unwrap();
    let block: ipnet::IpNet = "10.0.0.0/28".parse().unwrap();
    store.register_node("n1", None).await.unwrap();
    store.grant_block(&BlockGrant { pool: "default".into(), cidr: block, node: "n1".into() }).await.unwrap();
    let first = {
        let node = Node::start(config(dir.path()), store.clone()).await.unwrap();
        node.add(req("a")).await.unwrap()
    };
    // The block is lost while the agent is down (as after `allot node delete` of a live node).
    assert!(store.release_block(&BlockGrant { pool: "default".into(), cidr: block, node: "n1".into() }).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let node = Node::start(config(dir.path()), store.clone()).await.unwrap();
    assert_eq!(node.allocations(), vec![first.clone()]);
    let grants = store.grants().await.unwrap();
    assert_eq!(grants, vec![BlockGrant { pool: "default".into(), cidr: block, node: "n1".into() }]);
    let second = node.add(req("b")).await.unwrap();
    assert_ne!(second.ips[0].address, first.ips[0].address);
}

/// With a gateway reserved in every block, the node asks for one more address per block, so
/// the operator (which counts every usable address) grants enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_gateways_are_counted_in_requested() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
    store.apply_pools(vec![pool("10.0.0.0/24", 28)]).await.unwrap();
    let mut cfg = config(dir.path());
    cfg.reserve_gateway = true;
    cfg.pre_allocation.clear();
    cfg.add_wait = Duration::from_secs(5);
    let node = Node::start(cfg, store.clone()).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(node.clone().demand_loop(stop.clone()));
    tokio::spawn(node.clone().watch_loop(stop.clone()));
    tokio::spawn(allot_operator::run(store.clone(), stop));
    // A /28 has 14 usable addresses; one is the gateway, so 13 pods per block.
    let mut gateways = std::collections::HashSet::new();
    for i in 0..14 {
        let a = node.add(req(&format!("p{i}"))).await.unwrap();
        let ip = &a.ips[0];
        assert_ne!(Some(ip.address.addr()), ip.gateway, "a pod got the gateway");
        gateways.insert(ip.gateway.unwrap());
    }
    assert_eq!(gateways.len(), 2, "the 14th pod needed a second block");
    // 14 pods in two blocks, plus their two gateways.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let requested = store.nodes().await.unwrap()[0].requested.first().map(|r| r.needed.ipv4_addrs);
        if requested == Some(14 + 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "requested {requested:?}, want 16");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
}

/// The embedded store with grants that fail on demand, as a store outage fails them, and reads
/// of grants that lag behind other nodes' claims, as a watched copy (the Kubernetes store) does.
struct FlakyGrants {
    inner: EmbeddedStore,
    fail: std::sync::atomic::AtomicBool,
    /// This many more reads of `grants` leave out every grant of a node other than n1.
    stale_reads: std::sync::atomic::AtomicUsize,
}

impl FlakyGrants {
    /// Working normally, with the pool default (10.0.0.0/24 in /28 blocks).
    async fn open(dir: &std::path::Path) -> Arc<Self> {
        let store = Arc::new(FlakyGrants {
            inner: EmbeddedStore::open(&dir.join("cluster.redb")).unwrap(),
            fail: false.into(),
            stale_reads: 0.into(),
        });
        store.apply_pools(vec![pool("10.0.0.0/24", 28)]).await.unwrap();
        store
    }
}

impl Store for FlakyGrants {
    async fn pools(&self) -> Result<Vec<Pool>, StoreError> {
        self.inner.pools().await
    }
    async fn apply_pools(&self, pools: Vec<Pool>) -> Result<Vec<allot_core::ApplyAction>, StoreError> {
        self.inner.apply_pools(pools).await
    }
    async fn delete_pool(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_pool(name).await
    }
    async fn grants(&self) -> Result<Vec<BlockGrant>, StoreError> {
        let mut grants = self.inner.grants().await?;
        let stale = self.stale_reads.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
        if stale {
            grants.retain(|g| g.node == "n1");
        }
        Ok(grants)
    }
    async fn grant_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("injected: grant timed out".into()));
        }
        self.inner.grant_block(grant).await
    }
    async fn release_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        self.inner.release_block(grant).await
    }
    async fn nodes(&self) -> Result<Vec<allot_store::NodeRecord>, StoreError> {
        self.inner.nodes().await
    }
    async fn register_node(&self, name: &str, ip: Option<std::net::IpAddr>) -> Result<(), StoreError> {
        self.inner.register_node(name, ip).await
    }
    async fn set_requested(&self, name: &str, requested: Vec<allot_wire::PoolRequest>) -> Result<(), StoreError> {
        self.inner.set_requested(name, requested).await
    }
    async fn set_operator_error(&self, name: &str, error: Option<String>) -> Result<(), StoreError> {
        self.inner.set_operator_error(name, error).await
    }
    async fn delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.inner.delete_node(name).await
    }
    async fn namespaces(&self) -> Result<std::collections::BTreeMap<String, allot_store::Annotations>, StoreError> {
        self.inner.namespaces().await
    }
    async fn annotate_namespace(
        &self,
        namespace: &str,
        set: allot_store::Annotations,
        remove: Vec<String>,
    ) -> Result<allot_store::Annotations, StoreError> {
        self.inner.annotate_namespace(namespace, set, remove).await
    }
    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch()
    }
    async fn snapshot(&self) -> Result<allot_store::Snapshot, StoreError> {
        self.inner.snapshot().await
    }
    fn events(&self) -> tokio::sync::broadcast::Receiver<allot_store::StoreEvent> {
        self.inner.events()
    }
}

/// A block taken from the node while its pods use it is claimed back; a claim that fails (the
/// store times out) is tried again on the next refresh, not forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reclaim_of_a_lost_block_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyGrants::open(dir.path()).await;
    let block: ipnet::IpNet = "10.0.0.0/28".parse().unwrap();
    let grant = BlockGrant { pool: "default".into(), cidr: block, node: "n1".into() };
    store.register_node("n1", None).await.unwrap();
    store.grant_block(&grant).await.unwrap();
    let node = Node::start(config(dir.path()), store.clone()).await.unwrap();
    node.add(req("a")).await.unwrap();
    // Taken away behind the node's back, and the store fails the first claim.
    assert!(store.release_block(&grant).await.unwrap());
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(node.refresh().await.is_err(), "the failed claim is reported");
    assert!(store.grants().await.unwrap().is_empty());
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    node.refresh().await.unwrap();
    assert_eq!(store.grants().await.unwrap(), vec![grant], "claimed back on the next refresh");
}

/// Adoption whose claim loses a race to another node names that node, even when the store's
/// copy of the grants has not shown the winner yet at the first look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_that_loses_its_block_to_another_node_names_it_when_the_copy_lags() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyGrants::open(dir.path()).await;
    let node = Node::start(config(dir.path()), store.clone()).await.unwrap();
    node.refresh().await.unwrap();
    store.register_node("n2", None).await.unwrap();
    let theirs = BlockGrant { pool: "default".into(), cidr: "10.0.0.16/28".parse().unwrap(), node: "n2".into() };
    assert!(store.grant_block(&theirs).await.unwrap());
    // A lease of the old CNI's host-local in n2's block: one file per address, "ID\r\nIFNAME".
    let old = dir.path().join("oldnet");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("10.0.0.18"), "c1\r\neth0").unwrap();
    let mine_before = node.allocations();
    // The pre-check and the first look after the refused claim see only n1's grants.
    store.stale_reads.store(2, SeqCst);
    let req = allot_wire::AdoptHostLocalRequest { dir: old.display().to_string(), pool: None, dry_run: false };
    let err = node.adopt_host_local(&req).await.unwrap_err().to_string();
    assert!(err.contains("block 10.0.0.16/28 of pool \"default\" was just taken by node \"n2\""), "{err}");
    assert!(err.contains("nothing was adopted"), "{err}");
    assert_eq!(store.stale_reads.load(SeqCst), 0, "both stale reads were used");
    assert_eq!(node.allocations(), mine_before, "nothing adopted");
    let grants = store.grants().await.unwrap();
    assert!(grants.contains(&theirs) && grants.iter().all(|g| g.node == "n1" || g == &theirs), "{grants:?}");
}

/// A block given back leaves the saved view before the store hears of it, so an agent that
/// dies right after cannot start again with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_block_leaves_the_saved_view_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
    store.apply_pools(vec![pool("10.0.0.0/24", 28)]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    for cidr in ["10.0.0.0/28", "10.0.0.16/28"] {
        store.grant_block(&BlockGrant { pool: "default".into(), cidr: cidr.parse().unwrap(), node: "n1".into() }).await.unwrap();
    }
    let mut cfg = config(dir.path());
    cfg.pre_allocation.clear();
    let node = Node::start(cfg, store.clone()).await.unwrap();
    let view = || std::fs::read_to_string(dir.path().join("cluster-view.json")).unwrap();
    assert!(view().contains("10.0.0.16/28"), "{}", view());
    // Only the demand loop runs: no refresh rewrites the view after the release.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(node.clone().demand_loop(stop));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !store.grants().await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "unused blocks were not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!view().contains("10.0.0.0/28") && !view().contains("10.0.0.16/28"), "{}", view());
    let _ = stop_tx.send(true);
}
