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
