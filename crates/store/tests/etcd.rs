//! The etcd store against a real etcd process (Debian's etcd-server) on a loopback port.

#![cfg(feature = "etcd")]

mod contract;

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_store::{EtcdConfig, EtcdStore, EtcdTls, Liveness, Store, StoreError};
use allot_testkit::{Etcd, TcpProxy, make_certs};

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
async fn events_carry_each_change_and_a_view_follows_them() {
    let etcd = Etcd::start();
    contract::events_carry_each_change_and_a_view_follows_them(&connect(&etcd).await).await;
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
    cfg.tls = Some(EtcdTls { ca: certs.ca.clone(), identity: Some((certs.client_cert.clone(), certs.client_key.clone())) });
    let store = connect_retrying(&cfg, &etcd).await;
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

/// Connects, retrying while etcd starts (TLS endpoints are not probed before the test).
async fn connect_retrying(cfg: &EtcdConfig, etcd: &Etcd) -> EtcdStore {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match EtcdStore::connect(cfg).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect failed: {e}\n{}", etcd.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A raw client, for what the store does not do itself (compaction, auth setup).
async fn raw(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint.as_str()], None).await.unwrap()
}

#[tokio::test]
async fn server_only_tls_needs_no_client_certificate() {
    let certs = make_certs();
    let etcd = Etcd::start_server_tls(&certs);
    let mut cfg = EtcdConfig::new(vec![etcd.endpoint.clone()]);
    cfg.tls = Some(EtcdTls { ca: certs.ca.clone(), identity: None });
    let store = connect_retrying(&cfg, &etcd).await;
    store.apply_pools(vec![contract::pool("tls", &["10.5.0.0/16"], 24)]).await.unwrap();
    assert_eq!(store.pools().await.unwrap().len(), 1);
}

#[tokio::test]
async fn user_and_password_when_etcd_has_auth_enabled() {
    let etcd = Etcd::start();
    let mut admin = raw(&etcd).await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let mut cfg = EtcdConfig::new(vec![etcd.endpoint.clone()]);
    cfg.user = Some(("root".into(), "rootpw".into()));
    let store = EtcdStore::connect(&cfg).await.unwrap();
    store.apply_pools(vec![contract::pool("auth", &["10.6.0.0/16"], 24)]).await.unwrap();
    assert_eq!(store.pools().await.unwrap().len(), 1);
    // The watch works under auth too.
    let mut changes = store.watch();
    let before = *changes.borrow_and_update();
    store.register_node("n1", None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|r| *r > before)).await.expect("watch under auth").unwrap();

    // Without credentials, or with a wrong password, etcd refuses.
    let anonymous = EtcdStore::connect(&EtcdConfig::new(vec![etcd.endpoint.clone()])).await;
    assert!(anonymous.is_err(), "an anonymous client was served");
    cfg.user = Some(("root".into(), "wrong".into()));
    let err = EtcdStore::connect(&cfg).await.err().expect("a wrong password was accepted");
    assert!(err.to_string().contains("authentication failed"), "{err}");
}

/// A fenced store writes only while its lease holds the leader key: once the lease is gone
/// (revoked here; expired when the process froze), every write fails and marks the lead lost.
#[tokio::test]
async fn a_fenced_store_whose_lease_is_gone_cannot_grant() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    store.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    let lead = store.lead("operator", "a", Duration::from_secs(5)).await.unwrap();
    let fenced = store.fenced(&lead);
    assert!(fenced.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(!*lead.lost.borrow());

    let mut admin = raw(&etcd).await;
    let leader = admin.get("/allot/leader/operator", None).await.unwrap();
    admin.lease_revoke(leader.kvs()[0].lease()).await.unwrap();
    // Another replica takes the lead at once.
    let other = connect(&etcd).await.lead("operator", "b", Duration::from_secs(5)).await.unwrap();

    let err = fenced.grant_block(&contract::grant("p", "10.0.0.16/28", "n1")).await.unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(*lead.lost.borrow(), "a failed fence must end the leadership");
    let err = fenced.grant_blocks(&[contract::grant("p", "10.0.0.32/28", "n1")]).await.unwrap_err();
    assert!(err.to_string().contains("fenced"), "a batch is fenced too: {err}");
    let err = fenced.set_operator_error("n1", Some("x".into())).await.unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert_eq!(store.grants().await.unwrap(), vec![contract::grant("p", "10.0.0.0/28", "n1")]);
    assert_eq!(store.nodes().await.unwrap()[0].operator_error, None);
    // The new leader's fenced store writes.
    assert!(store.fenced(&other).grant_block(&contract::grant("p", "10.0.0.16/28", "n1")).await.unwrap());
}

/// With etcd frozen (no keep-alive answered), leadership ends before the TTL has passed since
/// the freeze: the last keep-alive was sent before it, so the lease may expire that early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_ends_before_the_lease_could_expire() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let ttl = Duration::from_secs(3);
    let lead = store.lead("operator", "a", ttl).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    etcd.freeze(true);
    let frozen = Instant::now();
    let mut lost = lead.lost.clone();
    tokio::time::timeout(ttl * 2, lost.wait_for(|l| *l)).await.expect("leadership never ended").unwrap();
    let after = frozen.elapsed();
    etcd.freeze(false);
    println!("leadership ended {after:?} after etcd froze (ttl {ttl:?})");
    assert!(after < ttl, "leadership ended {after:?} after the freeze; the lease may have expired after {ttl:?}");
}

/// Grants and releases of one pool in a tight loop do not starve applies of another pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_apply_is_not_starved_by_block_churn_elsewhere() {
    let etcd = Etcd::start();
    let store = Arc::new(connect(&etcd).await);
    store.apply_pools(vec![contract::pool("churn", &["10.0.0.0/16"], 28), contract::pool("calm", &["10.1.0.0/24"], 28)]).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churners: Vec<_> = (0..4)
        .map(|i| {
            let (s, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let g = contract::grant("churn", &format!("10.0.{}.{}/28", i, (n % 16) * 16), &format!("n{i}"));
                    assert!(s.grant_block(&g).await.unwrap());
                    assert!(s.release_block(&g).await.unwrap());
                    n += 1;
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for k in 1..=20u8 {
        // Growing "calm" each time: a real change, validated and written.
        let cidrs: Vec<String> = (0..=k).map(|j| format!("10.{}.0.0/24", j + 1)).collect();
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        store.apply_pools(vec![contract::pool("calm", &cidrs, 28)]).await.unwrap_or_else(|e| panic!("apply {k} starved: {e}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut churned = 0;
    for c in churners {
        churned += c.await.unwrap();
    }
    println!("{churned} grant+release rounds ran during 20 applies");
    assert!(churned > 20, "the churn did not run");
}

/// The watch behind a proxy that goes silent (connections stay open, nothing passes): after
/// the partition heals, the watch sees what changed within seconds, and it also recovers when
/// the revision it would resume from was compacted away meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_recovers_from_a_silent_partition_and_compaction() {
    let etcd = Etcd::start();
    let upstream: std::net::SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = TcpProxy::start(upstream);
    let watched = EtcdStore::connect(&EtcdConfig::new(vec![format!("http://{}", proxy.addr)])).await.unwrap();
    let direct = connect(&etcd).await;
    let mut changes = watched.watch();
    let mut events = watched.events();
    direct.register_node("n0", None).await.unwrap();
    let rev = current(&etcd).await;
    tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|r| *r >= rev)).await.expect("watch before the partition").unwrap();

    proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 1..4 {
        direct.register_node(&format!("n{n}"), None).await.unwrap();
    }
    let rev = current(&etcd).await;
    // The watch must resume from a revision etcd no longer has.
    raw(&etcd).await.compact(rev as i64, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    // Long enough for the HTTP/2 keep-alive to give up on the frozen connection.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(*changes.borrow() < rev, "the change passed the partition");
    proxy.black_hole(false);
    let healed = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|r| *r >= rev))
        .await
        .expect("watch did not recover within 10 s of the heal")
        .unwrap();
    println!("watch caught up {:?} after the partition healed", healed.elapsed());
    // Subscribers are told to read afresh: the changes made during the partition are gone
    // from etcd's history.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(events.recv().await, Ok(allot_store::StoreEvent::Resync)) {}
    })
    .await
    .expect("no Resync event after the watch was re-created past a compaction");
    // And it follows later changes.
    direct.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap();
    let rev = current(&etcd).await;
    tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|r| *r >= rev)).await.expect("watch after recovery").unwrap();
}

/// etcd's current revision, read on a client of its own.
async fn current(etcd: &Etcd) -> u64 {
    let r = raw(etcd).await.get("/", Some(etcd_client::GetOptions::new().with_count_only())).await.unwrap();
    r.header().unwrap().revision() as u64
}

/// A node holding more blocks than one etcd transaction may touch (128 operations) is deleted
/// whole: every block given back and reserved, none left behind.
#[tokio::test]
async fn deleting_a_node_with_many_blocks_gives_every_block_back() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await.with_release_grace(Duration::from_secs(60));
    store.apply_pools(vec![contract::pool("p", &["10.0.0.0/16"], 28)]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    let grants: Vec<_> = (0..150).map(|i| contract::grant("p", &format!("10.0.{}.{}/28", i / 16, (i % 16) * 16), "n1")).collect();
    assert!(store.grant_blocks(&grants).await.unwrap().into_iter().all(|ok| ok));
    let mut released = store.delete_node("n1").await.unwrap();
    released.sort();
    let mut expected = grants.clone();
    expected.sort();
    assert_eq!(released, expected);
    assert!(store.grants().await.unwrap().is_empty());
    assert!(store.nodes().await.unwrap().is_empty());
    assert_eq!(store.released_blocks().await.unwrap().len(), 150);
}

/// Deleting a live node is refused; forced, its blocks stay reserved to it for the grace: no
/// other node can be granted them, the node itself can take them back.
#[tokio::test]
async fn live_nodes_and_released_blocks() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    store.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    let lease = store.announce_alive("n1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.live_nodes().await.unwrap(), Some(["n1".to_string()].into()));

    let err = store.delete_node("n1").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)) && err.to_string().contains("--force") && err.to_string().contains("n1"), "{err}");
    assert_eq!(store.grants().await.unwrap().len(), 1);
    assert_eq!(store.nodes().await.unwrap().len(), 1);

    let released = store.with_release_grace(Duration::from_secs(3)).force_delete_node("n1").await.unwrap();
    assert_eq!(released, vec![contract::grant("p", "10.0.0.0/28", "n1")]);
    assert_eq!(store.released_blocks().await.unwrap(), released);
    assert!(!store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap(), "re-granted within the grace");
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap(), "its own node may take it back");
    assert!(store.released_blocks().await.unwrap().is_empty());

    // A clean stop ends liveness at once; then deletion needs no force, and after the grace
    // the block is anyone's.
    store.revoke_alive(lease).await.unwrap();
    assert_eq!(store.live_nodes().await.unwrap(), Some(Default::default()));
    store.register_node("n1", None).await.unwrap();
    store.with_release_grace(Duration::from_secs(2)).delete_node("n1").await.unwrap();
    assert!(!store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap(), "still reserved after the grace");
}

/// etcd's count of answered Txn requests, from its /metrics.
fn txn_count(etcd: &Etcd) -> f64 {
    handled(etcd, "grpc_method=\"Txn\"")
}

/// etcd's count of answered requests whose metric line contains `filter`.
fn handled(etcd: &Etcd, filter: &str) -> f64 {
    use std::io::{Read, Write};
    let addr = etcd.endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Many grants go in one transaction; a batch with one block someone else holds falls back to
/// one grant at a time, so only that block is lost; a block reserved to a deleted node stays
/// its own.
#[tokio::test]
async fn grant_blocks_batches_and_a_lost_race_loses_only_its_block() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    store.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28), contract::pool("big", &["10.1.0.0/16"], 28)]).await.unwrap();
    let batch: Vec<_> = (0..8).map(|i| contract::grant("p", &format!("10.0.0.{}/28", i * 16), "n1")).collect();
    let before = txn_count(&etcd);
    assert_eq!(store.grant_blocks(&batch).await.unwrap(), vec![true; 8]);
    assert_eq!(txn_count(&etcd) - before, 1.0, "eight grants, one transaction");
    // 250 grants: three transactions (at most 120 blocks each, under etcd's 128 compares),
    // also through a fenced store (the batch nested under the leader compare).
    let lead = store.lead("operator", "t", Duration::from_secs(5)).await.unwrap();
    let batch: Vec<_> = (0..250).map(|i| contract::grant("big", &format!("10.1.{}.{}/28", i / 16, (i % 16) * 16), "n9")).collect();
    let before = txn_count(&etcd);
    assert_eq!(store.fenced(&lead).grant_blocks(&batch).await.unwrap(), vec![true; 250]);
    assert_eq!(txn_count(&etcd) - before, 3.0, "250 grants, three transactions");

    // 10.0.0.160/28 is taken by another writer first; the others still go through.
    assert!(store.grant_block(&contract::grant("p", "10.0.0.160/28", "other")).await.unwrap());
    let batch: Vec<_> = (8..12).map(|i| contract::grant("p", &format!("10.0.0.{}/28", i * 16), "n2")).collect();
    assert_eq!(store.grant_blocks(&batch).await.unwrap(), vec![true, true, false, true]);
    // Outside the pool: refused without a write.
    assert_eq!(store.grant_blocks(&[contract::grant("p", "10.9.0.0/28", "n2")]).await.unwrap(), vec![false]);
    let grants: Vec<_> = store.grants().await.unwrap().into_iter().filter(|g| g.pool == "p").collect();
    assert_eq!(grants.len(), 12);
    assert_eq!(grants.iter().filter(|g| g.node == "other").count(), 1);

    // A deleted node's blocks stay reserved to it: a batch cannot hand them to another node.
    store.register_node("n1", None).await.unwrap();
    store.force_delete_node("n1").await.unwrap();
    let out = store.grant_blocks(&[contract::grant("p", "10.0.0.0/28", "n3"), contract::grant("p", "10.0.0.192/28", "n3")]).await.unwrap();
    assert_eq!(out, vec![false, true]);
    assert!(store.grant_blocks(&[contract::grant("p", "10.0.0.0/28", "n1")]).await.unwrap()[0], "its own node takes it back");
}

/// A node's own updates cost one request each (the record as last written is compared, not
/// read again); a record another writer changed meanwhile is read in the same transaction,
/// and its change is kept.
#[tokio::test]
async fn a_node_update_is_one_request_and_loses_no_concurrent_change() {
    let etcd = Etcd::start();
    let (agent, operator) = (connect(&etcd).await, connect(&etcd).await);
    let req = |n: u64| vec![allot_wire::PoolRequest { pool: "p".into(), needed: allot_wire::Needed { ipv4_addrs: n, ipv6_addrs: 0 } }];
    let all = |etcd: &Etcd| handled(etcd, "grpc_type=\"unary\"");
    let before = all(&etcd);
    agent.register_node("n1", None).await.unwrap();
    agent.set_requested("n1", req(8)).await.unwrap();
    agent.set_requested("n1", req(9)).await.unwrap();
    assert_eq!(all(&etcd) - before, 3.0, "register and two updates: one request each");

    operator.set_operator_error("n1", Some("no room".into())).await.unwrap();
    let before = all(&etcd);
    agent.set_requested("n1", req(10)).await.unwrap();
    assert_eq!(all(&etcd) - before, 2.0, "a lost compare reads in the same request, then writes");
    let n = &agent.nodes().await.unwrap()[0];
    assert_eq!((n.requested.clone(), n.operator_error.as_deref()), (req(10), Some("no room")));

    // Deleted meanwhile: an update says so instead of writing a record back.
    operator.delete_node("n1").await.unwrap();
    assert!(matches!(agent.set_requested("n1", req(11)).await, Err(StoreError::NotFound(_))));
    assert!(agent.nodes().await.unwrap().is_empty());
    // Registering again writes the record, though it equals what this process wrote last.
    agent.register_node("n1", None).await.unwrap();
    operator.delete_node("n1").await.unwrap();
    agent.register_node("n1", None).await.unwrap();
    assert_eq!(agent.nodes().await.unwrap().len(), 1, "a registration trusted a stale copy");
}
