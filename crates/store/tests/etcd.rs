//! The etcd store against a real etcd process (Debian's etcd-server) on a loopback port.

#![cfg(feature = "etcd")]

mod contract;

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_store::{EtcdConfig, EtcdStore, EtcdTls, Store};
use allot_testkit::{Etcd, make_certs};

async fn connect(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()])).await.unwrap()
}

#[tokio::test]
async fn refused_change_leaves_everything_as_it_was() {
    let etcd = Etcd::start();
    contract::refused_change_leaves_everything_as_it_was(&connect(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_block_has_one_holder_even_under_racing_grants() {
    let etcd = Etcd::start();
    contract::a_block_has_one_holder_even_under_racing_grants(Arc::new(connect(&etcd).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_applies_cannot_break_validation() {
    let etcd = Etcd::start();
    contract::racing_applies_cannot_break_validation(Arc::new(connect(&etcd).await)).await;
}

#[tokio::test]
async fn grants_outside_the_pool_are_refused() {
    let etcd = Etcd::start();
    contract::grants_outside_the_pool_are_refused(&connect(&etcd).await).await;
}

#[tokio::test]
async fn release_only_by_the_holder() {
    let etcd = Etcd::start();
    contract::release_only_by_the_holder(&connect(&etcd).await).await;
}

#[tokio::test]
async fn records_and_watch() {
    let etcd = Etcd::start();
    contract::records_and_watch(&connect(&etcd).await).await;
}

/// Two stores race on the same keys from separate clients, as two CLIs or operators would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_racing_for_blocks_never_share_one() {
    let etcd = Etcd::start();
    let (a, b) = (Arc::new(connect(&etcd).await), Arc::new(connect(&etcd).await));
    a.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    let race = |s: Arc<EtcdStore>, node: &'static str| {
        tokio::spawn(async move {
            let mut won = 0;
            for i in 0..16 {
                let cidr = format!("10.0.0.{}/28", i * 16);
                won += usize::from(s.grant_block(&contract::grant("p", &cidr, node)).await.unwrap());
            }
            won
        })
    };
    let (wa, wb) = (race(a.clone(), "na"), race(b.clone(), "nb"));
    assert_eq!(wa.await.unwrap() + wb.await.unwrap(), 16);
    let grants = a.grants().await.unwrap();
    assert_eq!(grants.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_at_a_time_and_another_takes_over_within_the_ttl() {
    let etcd = Etcd::start();
    let (a, b) = (connect(&etcd).await, connect(&etcd).await);
    let ttl = Duration::from_secs(3);
    let first = a.lead("test", "a", ttl).await.unwrap();
    assert_eq!(a.leader("test").await.unwrap().as_deref(), Some("a"));
    let waiting = tokio::spawn(async move { b.lead("test", "b", ttl).await.map(|l| (l, Instant::now())) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "b leads while a holds the lease");
    // a dies without resigning: its keep-alive stops, the lease runs out.
    let died = Instant::now();
    drop(first);
    let client = connect(&etcd).await;
    let (_lead, at) = tokio::time::timeout(Duration::from_secs(15), waiting).await.expect("b leads").unwrap().unwrap();
    assert!(at.duration_since(died) <= ttl + Duration::from_secs(3), "took {:?}", at.duration_since(died));
    assert_eq!(client.leader("test").await.unwrap().as_deref(), Some("b"));
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let certs = make_certs();
    let etcd = Etcd::start_tls(&certs);
    let mut cfg = EtcdConfig::new(vec![etcd.endpoint.clone()]);
    cfg.tls = Some(EtcdTls { ca: certs.ca.clone(), cert: certs.client_cert.clone(), key: certs.client_key.clone() });
    let deadline = Instant::now() + Duration::from_secs(20);
    let store = loop {
        match EtcdStore::connect(&cfg).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "TLS connect failed: {e}\n{}", etcd.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    store.apply_pools(vec![contract::pool("tls", &["10.5.0.0/16"], 24)]).await.unwrap();
    assert_eq!(store.pools().await.unwrap().len(), 1);
    // Without a client certificate etcd refuses the connection.
    let mut plain = cfg.clone();
    plain.tls = None;
    plain.endpoints = vec![etcd.endpoint.replace("https://", "http://")];
    plain.timeout = Duration::from_secs(2);
    let refused = match EtcdStore::connect(&plain).await {
        Ok(s) => s.pools().await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without TLS was served");
}
