//! The operator against a real embedded store.

use allot_core::{FamilySpec, Pool, PoolSpec};
use allot_store::{EmbeddedStore, Store};
use allot_wire::{Needed, PoolRequest};

fn dual(name: &str, v4: &str, m4: u8, v6: &str, m6: u8) -> Pool {
    Pool {
        name: name.into(),
        spec: PoolSpec {
            ipv4: Some(FamilySpec { cidrs: vec![v4.parse().unwrap()], mask_size: m4 }),
            ipv6: Some(FamilySpec { cidrs: vec![v6.parse().unwrap()], mask_size: m6 }),
        },
    }
}

fn req(pool: &str, v4: u64, v6: u64) -> PoolRequest {
    PoolRequest { pool: pool.into(), needed: Needed { ipv4_addrs: v4, ipv6_addrs: v6 } }
}

#[tokio::test]
async fn grants_until_usable_covers_needed_and_reports_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("c.redb")).unwrap();
    // /28 blocks: 14 usable each. The v4 CIDR has 4 blocks.
    s.apply_pools(vec![dual("p", "10.0.0.0/26", 28, "fd00::/120", 124)]).await.unwrap();
    s.register_node("n1", None).await.unwrap();
    s.register_node("n2", None).await.unwrap();
    s.set_requested("n1", vec![req("p", 20, 14)]).await.unwrap();
    let r = allot_operator::reconcile(&s).await.unwrap();
    assert_eq!(r.granted.len(), 3, "two v4 blocks (28 >= 20) and one v6 block (14 >= 14)");
    assert!(r.errors.is_empty());

    // A second pass grants nothing more.
    assert!(allot_operator::reconcile(&s).await.unwrap().granted.is_empty());

    // n2 wants more than the remaining two blocks hold: it gets them and an error that says why.
    s.set_requested("n2", vec![req("p", 40, 0), req("missing", 1, 0)]).await.unwrap();
    let r = allot_operator::reconcile(&s).await.unwrap();
    assert_eq!(r.granted.len(), 2);
    let nodes = s.nodes().await.unwrap();
    let n2 = nodes.iter().find(|n| n.name == "n2").unwrap();
    let err = n2.operator_error.as_deref().unwrap();
    assert!(err.contains("pool \"p\" has no free ipv4 block left") && err.contains("pool \"missing\" does not exist"), "{err}");
    let grants = s.grants().await.unwrap();
    let mut cidrs: Vec<_> = grants.iter().map(|g| g.cidr).collect();
    cidrs.sort();
    cidrs.dedup();
    assert_eq!(cidrs.len(), grants.len(), "no block twice");

    // Once the request drops, the error clears.
    s.set_requested("n2", vec![]).await.unwrap();
    allot_operator::reconcile(&s).await.unwrap();
    assert_eq!(s.nodes().await.unwrap().iter().find(|n| n.name == "n2").unwrap().operator_error, None);
}

/// Polls the store until `done` holds for its grants and nodes.
async fn until<S: Store>(s: &S, what: &str, done: impl Fn(&[allot_core::BlockGrant], &[allot_store::NodeRecord]) -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done(&s.grants().await.unwrap(), &s.nodes().await.unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn v4_blocks(grants: &[allot_core::BlockGrant], node: &str) -> usize {
    grants.iter().filter(|g| g.node == node && g.cidr.addr().is_ipv4()).count()
}

/// `run` follows the store's events: new requests are met, a block given back is replaced
/// for the node that still needs it, a pool that grows serves a request it could not, and a
/// node whose request did not change gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follows_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("c.redb")).unwrap());
    // /28 blocks, 14 usable; four v4 blocks.
    s.apply_pools(vec![dual("p", "10.0.0.0/26", 28, "fd00::/120", 124)]).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let op = tokio::spawn(allot_operator::run(s.clone(), stop));
    for n in ["n1", "n2"] {
        s.register_node(n, None).await.unwrap();
        s.set_requested(n, vec![req("p", 20, 0)]).await.unwrap();
    }
    until(&*s, "two blocks each", |g, _| v4_blocks(g, "n1") == 2 && v4_blocks(g, "n2") == 2).await;

    // n1 gives one block back while it still asks for 20: it gets one again.
    let g = s.grants().await.unwrap().into_iter().find(|g| g.node == "n1").unwrap();
    assert!(s.release_block(&g).await.unwrap());
    until(&*s, "n1 granted a block again", |g, _| v4_blocks(g, "n1") == 2).await;

    // n2 asks for more than the pool has left: an error, until the pool grows.
    s.set_requested("n2", vec![req("p", 60, 0)]).await.unwrap();
    until(&*s, "n2's error", |_, nodes| {
        nodes.iter().any(|n| n.name == "n2" && n.operator_error.as_deref().is_some_and(|e| e.contains("no free ipv4 block")))
    })
    .await;
    assert_eq!(v4_blocks(&s.grants().await.unwrap(), "n1"), 2, "n1's request did not change: it got nothing more");
    let mut grown = dual("p", "10.0.0.0/26", 28, "fd00::/120", 124);
    grown.spec.ipv4.as_mut().unwrap().cidrs.push("10.0.1.0/26".parse().unwrap());
    s.apply_pools(vec![grown]).await.unwrap();
    until(&*s, "n2 served from the new CIDR, its error cleared", |g, nodes| {
        v4_blocks(g, "n2") == 5 && nodes.iter().all(|n| n.operator_error.is_none())
    })
    .await;
    stop_tx.send(true).unwrap();
    op.await.unwrap();
}
