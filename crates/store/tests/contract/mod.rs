//! The Store contract, written once and run against every backend.

#![allow(dead_code)]

use std::sync::Arc;

use allot_core::{BlockGrant, FamilySpec, Pool, PoolError, PoolSpec};
use allot_store::{Store, StoreError};

pub fn pool(name: &str, v4: &[&str], mask: u8) -> Pool {
    Pool {
        name: name.into(),
        spec: PoolSpec {
            ipv4: Some(FamilySpec { cidrs: v4.iter().map(|c| c.parse().unwrap()).collect(), mask_size: mask }),
            ipv6: None,
        },
    }
}

pub fn grant(pool: &str, cidr: &str, node: &str) -> BlockGrant {
    BlockGrant { pool: pool.into(), cidr: cidr.parse().unwrap(), node: node.into() }
}

pub async fn refused_change_leaves_everything_as_it_was<S: Store>(s: &S) {
    s.apply_pools(vec![pool("a", &["10.0.0.0/16"], 24)]).await.unwrap();
    s.register_node("n1", None).await.unwrap();
    assert!(s.grant_block(&grant("a", "10.0.3.0/24", "n1")).await.unwrap());
    let before = (s.pools().await.unwrap(), s.grants().await.unwrap());

    // A batch whose second pool overlaps: nothing of it lands, not even the valid first pool.
    let err = s.apply_pools(vec![pool("b", &["10.1.0.0/16"], 24), pool("c", &["10.0.128.0/17"], 24)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(PoolError::Overlap { .. })), "{err}");
    let err = s.apply_pools(vec![pool("a", &["10.2.0.0/16"], 24)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(PoolError::CidrInUse { .. })), "{err}");
    let err = s.delete_pool("a").await.unwrap_err();
    assert_eq!(err.to_string(), "pool \"a\" is in use: node(s) n1 hold blocks of it; drain those nodes first");
    assert_eq!(before, (s.pools().await.unwrap(), s.grants().await.unwrap()));
}

/// 16 writers race for one block: exactly one holds it.
pub async fn a_block_has_one_holder_even_under_racing_grants<S: Store>(s: Arc<S>) {
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.grant_block(&grant("a", "10.0.0.16/28", &format!("n{i}"))).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
    assert_eq!(s.grants().await.unwrap().len(), 1);
}

/// Two writers race to add overlapping pools: one lands, the other is refused.
pub async fn racing_applies_cannot_break_validation<S: Store>(s: Arc<S>) {
    let tasks: Vec<_> = [("x", "10.9.0.0/16"), ("y", "10.9.128.0/17")]
        .into_iter()
        .map(|(name, cidr)| {
            let s = s.clone();
            tokio::spawn(async move { s.apply_pools(vec![pool(name, &[cidr], 24)]).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(matches!(e, StoreError::Refused(PoolError::Overlap { .. })), "{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.pools().await.unwrap().len(), 1);
}

pub async fn grants_outside_the_pool_are_refused<S: Store>(s: &S) {
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    for bad in [grant("a", "10.0.1.0/28", "n"), grant("a", "10.0.0.0/27", "n"), grant("missing", "10.0.0.0/28", "n")] {
        assert!(!s.grant_block(&bad).await.unwrap(), "{bad:?}");
    }
    assert!(s.grants().await.unwrap().is_empty());
}

pub async fn release_only_by_the_holder<S: Store>(s: &S) {
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    assert!(s.grant_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(!s.release_block(&grant("a", "10.0.0.0/28", "n2")).await.unwrap());
    assert!(s.release_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(s.grants().await.unwrap().is_empty());
}

/// Nodes, namespaces, deleting a node gives back its blocks, and every change wakes watchers.
pub async fn records_and_watch<S: Store>(s: &S) {
    let mut changes = s.watch();
    let start = *changes.borrow_and_update();
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    s.register_node("n1", Some("192.0.2.1".parse().unwrap())).await.unwrap();
    s.grant_block(&grant("a", "10.0.0.0/28", "n1")).await.unwrap();
    s.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.wait_for(|r| *r > start)).await.expect("watch saw the changes").unwrap();
    let nodes = s.nodes().await.unwrap();
    assert_eq!(nodes[0].ip, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(s.namespaces().await.unwrap()["ns"]["k"], "v");
    let released = s.delete_node("n1").await.unwrap();
    assert_eq!(released, vec![grant("a", "10.0.0.0/28", "n1")]);
    assert!(s.grants().await.unwrap().is_empty());
    assert!(matches!(s.delete_node("n1").await, Err(StoreError::NotFound(_))));
    s.delete_pool("a").await.unwrap();
}

/// Every write shows up on `events` as the typed change it made, in revision order, and a
/// view read before the writes and fed only those events ends equal to a fresh read.
pub async fn events_carry_each_change_and_a_view_follows_them<S: Store>(s: &S) {
    use allot_store::{Change, ClusterView, StoreEvent};
    let mut events = s.events();
    let mut view = ClusterView::new(s.snapshot().await.unwrap(), None);
    let req = vec![allot_wire::PoolRequest { pool: "a".into(), needed: allot_wire::Needed { ipv4_addrs: 20, ipv6_addrs: 0 } }];
    s.apply_pools(vec![pool("a", &["10.0.0.0/24"], 28)]).await.unwrap();
    s.register_node("n1", Some("192.0.2.1".parse().unwrap())).await.unwrap();
    s.register_node("n2", None).await.unwrap();
    s.set_requested("n1", req.clone()).await.unwrap();
    assert_eq!(s.grant_blocks(&[grant("a", "10.0.0.0/28", "n1"), grant("a", "10.0.0.16/28", "n2")]).await.unwrap(), vec![true, true]);
    s.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap();
    assert!(s.release_block(&grant("a", "10.0.0.16/28", "n2")).await.unwrap());
    s.delete_node("n2").await.unwrap();
    s.annotate_namespace("ns", Default::default(), vec!["k".into()]).await.unwrap();
    let end = s.snapshot().await.unwrap();

    let mut seen: Vec<(u64, Change)> = Vec::new();
    while view.revision < end.revision {
        match tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await.expect("events up to the last write") {
            Ok(StoreEvent::Changes(c)) => {
                view.apply_all(&c);
                seen.extend(c.iter().cloned());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "changes out of revision order: {seen:?}");
    let changes: Vec<Change> = seen.into_iter().map(|(_, c)| c).collect();
    let pos = |want: &Change| changes.iter().position(|c| c == want).unwrap_or_else(|| panic!("no {want:?} in {changes:?}"));
    let spec = pool("a", &["10.0.0.0/24"], 28).spec;
    let block = |cidr: &str, node: Option<&str>| Change::Block { pool: "a".into(), cidr: cidr.parse().unwrap(), node: node.map(String::from) };
    let n1 = allot_store::NodeRecord { name: "n1".into(), ip: Some("192.0.2.1".parse().unwrap()), requested: req, operator_error: None };
    let order = [
        pos(&Change::Pool { name: "a".into(), spec: Some(spec) }),
        pos(&Change::Node { name: "n1".into(), record: Some(n1) }),
        pos(&block("10.0.0.0/28", Some("n1"))),
        pos(&Change::Namespace { name: "ns".into(), annotations: Some([("k".to_string(), "v".to_string())].into()) }),
        pos(&block("10.0.0.16/28", None)),
        pos(&Change::Node { name: "n2".into(), record: None }),
        pos(&Change::Namespace { name: "ns".into(), annotations: None }),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "changes in the wrong order: {changes:?}");

    let fresh = ClusterView::new(end, None);
    assert_eq!(view.pools, fresh.pools);
    assert_eq!(view.blocks, fresh.blocks);
    assert_eq!(view.nodes, fresh.nodes);
    assert_eq!(view.namespaces, fresh.namespaces);
    assert_eq!(view.released, fresh.released);
    assert_eq!(view.counts(), fresh.counts());
    assert_eq!(view.blocks_of("n1").collect::<Vec<_>>(), vec![("a", "10.0.0.0/28".parse().unwrap())]);
}
