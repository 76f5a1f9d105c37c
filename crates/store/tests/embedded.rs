//! The embedded store: the shared contract, plus what only a file-backed store has.

mod contract;

use std::sync::Arc;

use allot_store::{EmbeddedStore, Store};
use contract::{grant, pool};

fn open() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn refused_change_leaves_everything_as_it_was() {
    let (_d, s) = open();
    contract::refused_change_leaves_everything_as_it_was(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_block_has_one_holder_even_under_racing_grants() {
    let (_d, s) = open();
    contract::a_block_has_one_holder_even_under_racing_grants(Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_applies_cannot_break_validation() {
    let (_d, s) = open();
    contract::racing_applies_cannot_break_validation(Arc::new(s)).await;
}

#[tokio::test]
async fn grants_outside_the_pool_are_refused() {
    let (_d, s) = open();
    contract::grants_outside_the_pool_are_refused(&s).await;
}

#[tokio::test]
async fn release_only_by_the_holder() {
    let (_d, s) = open();
    contract::release_only_by_the_holder(&s).await;
}

#[tokio::test]
async fn events_carry_each_change_and_a_view_follows_them() {
    let (_d, s) = open();
    contract::events_carry_each_change_and_a_view_follows_them(&s).await;
}

#[tokio::test]
async fn records_and_watch() {
    let (_d, s) = open();
    contract::records_and_watch(&s).await;
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
