//! The embedded store's contract: validated, atomic writes; one holder per block; revisions.

use std::sync::Arc;

use allot_core::{BlockGrant, FamilySpec, Pool, PoolError, PoolSpec};
use allot_store::{EmbeddedStore, Store, StoreError};

fn pool(name: &str, v4: &[&str], mask: u8) -> Pool {
    Pool {
        name: name.into(),
        spec: PoolSpec {
            ipv4: Some(FamilySpec { cidrs: v4.iter().map(|c| c.parse().unwrap()).collect(), mask_size: mask }),
            ipv6: None,
        },
    }
}

fn grant(pool: &str, cidr: &str, node: &str) -> BlockGrant {
    BlockGrant { pool: pool.into(), cidr: cidr.parse().unwrap(), node: node.into() }
}

fn open() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn refused_change_leaves_everything_as_it_was() {
    let (_d, s) = open();
    s.apply_pools(vec![pool("a", &["10.0.0.0/16"], 24)]).await.unwrap();
    s.register_node("n1", None).await.unwrap();
    assert!(s.grant_block(&grant("a", "10.0.3.0/24", "n1")).await.unwrap());
    let before = (s.pools().await.unwrap(), s.grants().await.unwrap(), *s.watch().borrow());

    // A batch whose second pool overlaps: nothing of it lands, not even the valid first pool.
    let err = s.apply_pools(vec![pool("b", &["10.1.0.0/16"], 24), pool("c", &["10.0.128.0/17"], 24)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(PoolError::Overlap { .. })), "{err}");
    let err = s.apply_pools(vec![pool("a", &["10.2.0.0/16"], 24)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(PoolError::CidrInUse { .. })), "{err}");
    let err = s.delete_pool("a").await.unwrap_err();
    assert_eq!(err.to_string(), "pool \"a\" is in use: node(s) n1 hold blocks of it; drain those nodes first");

    assert_eq!(before, (s.pools().await.unwrap(), s.grants().await.unwrap(), *s.watch().borrow()));
}

#[tokio::test]
async fn a_block_has_one_holder_even_under_racing_grants() {
    let (_d, s) = open();
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(s.grant_block(&grant("a", "10.0.0.16/28", &format!("n{i}")))).unwrap()
        }));
    }
    let wins = tasks.into_iter().map(|t| t.join().unwrap()).filter(|w| *w).count();
    assert_eq!(wins, 1);
    assert_eq!(s.grants().await.unwrap().len(), 1);
}

#[tokio::test]
async fn grants_outside_the_pool_are_refused() {
    let (_d, s) = open();
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    for bad in [grant("a", "10.0.1.0/28", "n"), grant("a", "10.0.0.0/27", "n"), grant("missing", "10.0.0.0/28", "n")] {
        assert!(!s.grant_block(&bad).await.unwrap(), "{bad:?}");
    }
    assert!(s.grants().await.unwrap().is_empty());
}

#[tokio::test]
async fn release_only_by_the_holder() {
    let (_d, s) = open();
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    assert!(s.grant_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(!s.release_block(&grant("a", "10.0.0.0/28", "n2")).await.unwrap());
    assert!(s.release_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(s.grants().await.unwrap().is_empty());
}

#[tokio::test]
async fn state_and_revision_survive_reopen_and_unchanged_writes_wake_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.redb");
    let rev = {
        let s = EmbeddedStore::open(&path).unwrap();
        s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
        s.register_node("n1", Some("192.0.2.1".parse().unwrap())).await.unwrap();
        s.grant_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap();
        s.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap();
        let rev = *s.watch().borrow();
        // Same pool, same node: no new revision.
        s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
        s.register_node("n1", None).await.unwrap();
        assert_eq!(*s.watch().borrow(), rev);
        rev
    };
    let s = EmbeddedStore::open(&path).unwrap();
    assert_eq!(*s.watch().borrow(), rev);
    assert_eq!(s.pools().await.unwrap().len(), 1);
    assert_eq!(s.grants().await.unwrap(), vec![grant("a", "10.0.0.0/28", "n1")]);
    assert_eq!(s.namespaces().await.unwrap()["ns"]["k"], "v");
    let released = s.delete_node("n1").await.unwrap();
    assert_eq!(released.len(), 1);
    assert!(s.grants().await.unwrap().is_empty());
    s.delete_pool("a").await.unwrap();
}
