//! Blocks of a deleted Kubernetes Node are released: core Nodes on the in-process fake API
//! server (no Kubernetes API server runs here), allot's state in the embedded store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_k8s::node_gc::{NodeGcOptions, release_deleted_nodes};
use allot_kube_fake::FakeApiServer;
use allot_store::{EmbeddedStore, Store};
use serde_json::json;

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("allot-node-gc-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn k8s_node(name: &str) -> serde_json::Value {
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name }, "spec": {} })
}

async fn blocks_of(store: &EmbeddedStore, node: &str) -> Vec<BlockGrant> {
    store.grants().await.unwrap().into_iter().filter(|g| g.node == node).collect()
}

async fn wait_until<F: std::future::Future<Output = bool>>(within: Duration, mut f: impl FnMut() -> F) -> Duration {
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < within, "not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_deleted_node_blocks_are_released() {
    let dir = temp_dir();
    let store = Arc::new(EmbeddedStore::open(&dir.0.join("cluster.redb")).unwrap());
    let pool = Pool {
        name: "default".into(),
        spec: PoolSpec { ipv4: Some(FamilySpec { cidrs: vec!["10.0.0.0/24".parse().unwrap()], mask_size: 28 }), ipv6: None },
    };
    store.apply_pools(vec![pool]).await.unwrap();
    for (i, n) in ["n1", "n2", "orphan"].iter().enumerate() {
        store.register_node(n, None).await.unwrap();
        let cidr = format!("10.0.0.{}/28", i * 16).parse().unwrap();
        assert!(store.grant_block(&BlockGrant { pool: "default".into(), cidr, node: n.to_string() }).await.unwrap());
    }
    let api = FakeApiServer::new();
    api.insert(k8s_node("n1"));
    api.insert(k8s_node("n2"));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let opts = NodeGcOptions { absent_for: Duration::from_millis(1500), every: Duration::from_millis(200) };
    let gc = tokio::spawn(release_deleted_nodes(api.client(), store.clone(), opts, stop));

    // Nodes that Kubernetes has keep their blocks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(blocks_of(&store, "n1").await.len(), 1);
    assert_eq!(blocks_of(&store, "n2").await.len(), 1);
    // "orphan" was never a Kubernetes Node: removed only once missing for absent_for.
    assert_eq!(blocks_of(&store, "orphan").await.len(), 1, "an allot node without a Node was removed before absent_for");

    // Deleting a Node releases its blocks at once (through the watch's DELETED event).
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(api.client());
    nodes.delete("n2", &Default::default()).await.unwrap();
    let took = wait_until(Duration::from_secs(3), || async { blocks_of(&store, "n2").await.is_empty() }).await;
    assert!(took < Duration::from_secs(1), "released after {took:?}");
    assert!(store.nodes().await.unwrap().iter().all(|n| n.name != "n2"));
    assert_eq!(blocks_of(&store, "n1").await.len(), 1, "another node lost its block");

    wait_until(Duration::from_secs(3), || async { blocks_of(&store, "orphan").await.is_empty() }).await;
    assert_eq!(blocks_of(&store, "n1").await.len(), 1);
    let names: Vec<String> = store.nodes().await.unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, vec!["n1".to_string()]);
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(2), gc).await.expect("stops when its term ends").unwrap();
}
