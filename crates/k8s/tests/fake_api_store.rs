//! `KubeStore` against the in-process fake API server (`allot-kube-fake`): no Kubernetes API
//! server can run here, so every test talks to the fake through a real `kube::Client`. The
//! fake runs no admission webhooks and no CRD schema or CEL validation.

#[path = "../../store/tests/contract/mod.rs"]
mod contract;

use std::sync::Arc;
use std::time::Duration;

use allot_k8s::{KubeStore, KubeStoreOptions, RELEASED_UNTIL};
use allot_kube_fake::FakeApiServer;
use allot_store::{Change, Liveness, Store, StoreError, StoreEvent};
use serde_json::json;

const NS: &str = "allot-system";

fn opts() -> KubeStoreOptions {
    KubeStoreOptions { namespace: NS.into(), timeout: Duration::from_secs(5), ..Default::default() }
}

/// A fake with allot's namespace and the namespace the contract annotates ("ns").
fn fake() -> FakeApiServer {
    let api = FakeApiServer::new();
    for ns in [NS, "ns"] {
        api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    api
}

async fn connect(api: &FakeApiServer) -> KubeStore {
    KubeStore::connect(api.client(), opts()).await.unwrap()
}

async fn store() -> (FakeApiServer, KubeStore) {
    let api = fake();
    let s = connect(&api).await;
    (api, s)
}

/// Waits until `cond` holds, at most `secs` seconds.
async fn eventually(secs: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// The store contract, every function the embedded and etcd backends run.

#[tokio::test]
async fn fake_api_refused_change_leaves_everything_as_it_was() {
    contract::refused_change_leaves_everything_as_it_was(&store().await.1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_a_block_has_one_holder_even_under_racing_grants() {
    contract::a_block_has_one_holder_even_under_racing_grants(Arc::new(store().await.1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_racing_applies_cannot_break_validation() {
    contract::racing_applies_cannot_break_validation(Arc::new(store().await.1)).await;
}

#[tokio::test]
async fn fake_api_grants_outside_the_pool_are_refused() {
    contract::grants_outside_the_pool_are_refused(&store().await.1).await;
}

#[tokio::test]
async fn fake_api_release_only_by_the_holder() {
    contract::release_only_by_the_holder(&store().await.1).await;
}

#[tokio::test]
async fn fake_api_records_and_watch() {
    contract::records_and_watch(&store().await.1).await;
}

#[tokio::test]
async fn fake_api_events_carry_each_change_and_a_view_follows_them() {
    contract::events_carry_each_change_and_a_view_follows_them(&store().await.1).await;
}

// Kubernetes-specific behaviour.

/// Two agents' stores (two clients on one API server) grant each of 16 blocks at the same
/// moment: each block goes to exactly one, and every create that lost got the apiserver's 409
/// AlreadyExists (a loser whose mirror already showed the block does not even try).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_two_stores_racing_for_blocks_one_create_wins_the_other_gets_409() {
    let api = fake();
    let (a, b) = (Arc::new(connect(&api).await), Arc::new(connect(&api).await));
    a.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    eventually(5, "b sees the pool", async || b.pools().await.unwrap().len() == 1).await;
    api.clear_requests();
    let (mut won_a, mut won_b) = (0, 0);
    for i in 0..16 {
        let cidr = format!("10.0.0.{}/28", i * 16);
        let (ga, gb) = (contract::grant("p", &cidr, "na"), contract::grant("p", &cidr, "nb"));
        let (ra, rb) = tokio::join!(a.grant_block(&ga), b.grant_block(&gb));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra != rb, "block {cidr}: na {ra}, nb {rb}");
        (won_a, won_b) = (won_a + usize::from(ra), won_b + usize::from(rb));
    }
    let creates: Vec<u16> =
        api.requests().iter().filter(|r| r.verb == "create" && r.resource == "ipblocks").map(|r| r.status).collect();
    let lost = creates.iter().filter(|s| **s == 409).count();
    assert_eq!(creates.iter().filter(|s| **s == 201).count(), 16, "{creates:?}");
    assert_eq!(lost, creates.len() - 16, "every other create answered 409: {creates:?}");
    assert!(lost > 0, "no create raced another: {creates:?}");
    println!("{} creates: 16 won, {lost} lost with 409; na got {won_a}, nb got {won_b}", creates.len());
    eventually(5, "both mirrors see every grant", async || a.grants().await.unwrap().len() == 16 && b.grants().await.unwrap().len() == 16).await;
    assert_eq!(a.grants().await.unwrap(), b.grants().await.unwrap());
    assert_eq!(api.objects("allot.dev/v1", "IPBlock").len(), 16);
}

/// A store whose mirror has not seen another node's grant (its block watch is failing) tries
/// the create: the apiserver answers 409 and the grant returns false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_a_grant_of_a_held_block_gets_409_and_false() {
    let api = fake();
    let (a, b) = (connect(&api).await, connect(&api).await);
    a.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    eventually(5, "b sees the pool", async || b.pools().await.unwrap().len() == 1).await;
    api.fail_next("watch", "ipblocks", 500, 1000);
    api.fail_next("list", "ipblocks", 500, 1000);
    api.break_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.insert(json!({"apiVersion": "allot.dev/v1", "kind": "IPBlock", "metadata": {"name": "p.10-0-0-16-28"},
        "spec": {"pool": "p", "cidr": "10.0.0.16/28", "node": "na"}}));
    api.clear_requests();
    assert!(!b.grant_block(&contract::grant("p", "10.0.0.16/28", "nb")).await.unwrap());
    let creates: Vec<u16> = api.requests().iter().filter(|r| r.verb == "create" && r.resource == "ipblocks").map(|r| r.status).collect();
    assert_eq!(creates, vec![409]);
    let held = api.objects("allot.dev/v1", "IPBlock").into_iter().find(|o| o["metadata"]["name"] == "p.10-0-0-16-28").unwrap();
    assert_eq!(held["spec"]["node"], "na", "the holder is unchanged");
}

/// Every block object on the API server lies inside a current CIDR of its pool there.
fn no_block_outside_its_pool(api: &FakeApiServer) -> Result<(), String> {
    let pools = api.objects("allot.dev/v1", "IPPool");
    for b in api.objects("allot.dev/v1", "IPBlock") {
        let pool = b["spec"]["pool"].as_str().unwrap();
        let cidr: ipnet::IpNet = b["spec"]["cidr"].as_str().unwrap().parse().unwrap();
        let p = pools.iter().find(|p| p["metadata"]["name"] == pool).ok_or(format!("block {cidr} of missing pool {pool}"))?;
        let inside = p["spec"]["ipv4"]["cidrs"].as_array().unwrap().iter().any(|c| c.as_str().unwrap().parse::<ipnet::IpNet>().unwrap().contains(&cidr));
        if !inside {
            return Err(format!("block {cidr} outside pool {pool}: {}", p["spec"]));
        }
    }
    Ok(())
}

/// Yields `n` times: a delay finer than a timer tick, to spread racing writers.
async fn spin(n: u32) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// Grants of blocks in the CIDR another writer is removing from the pool, started at spread
/// moments around the pool change, round after round: whichever order the apiserver puts the
/// writes in, no block is left outside its pool, and what each grant returned is what the API
/// server holds (the grant's re-check removes a block created after the pool change; the pool
/// change reverts itself when a block created before it lies outside).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_a_grant_racing_a_pool_shrink_leaves_no_block_outside_its_pool() {
    let api = fake();
    let (granter, admin) = (Arc::new(connect(&api).await), Arc::new(connect(&api).await));
    let wide = || contract::pool("p", &["10.0.0.0/24", "10.0.1.0/24"], 28);
    let (mut shrunk, mut refused, mut reverted, mut kept, mut undone) = (0, 0, 0, 0, 0);
    let rounds = 60u32;
    for round in 0..rounds {
        admin.apply_pools(vec![wide()]).await.unwrap();
        eventually(5, "the granter sees the wide pool", async || granter.pools().await.unwrap()[0] == wide()).await;
        api.clear_requests();
        let tasks: Vec<_> = (0..2u32)
            .map(|i| {
                let g = granter.clone();
                tokio::spawn(async move {
                    // 0 to 5 ms after the pool change starts, and a spread within.
                    tokio::time::sleep(Duration::from_millis(u64::from(round % 6))).await;
                    spin(i * 20 + round % 40).await;
                    let grant = contract::grant("p", &format!("10.0.1.{}/28", ((round + i) % 16) * 16), "n1");
                    let ok = g.grant_block(&grant).await.unwrap();
                    (grant, ok)
                })
            })
            .collect();
        let applied = admin.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await;
        let mut granted = Vec::new();
        for t in tasks {
            granted.push(t.await.unwrap());
        }
        match &applied {
            Ok(_) => shrunk += 1,
            Err(e) => {
                assert!(matches!(e, StoreError::Refused(allot_core::PoolError::CidrInUse { .. })), "round {round}: {e}");
                refused += 1;
            }
        }
        no_block_outside_its_pool(&api).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let held = api.objects("allot.dev/v1", "IPBlock");
        for (g, ok) in &granted {
            let there = held.iter().any(|b| b["spec"]["cidr"] == g.cidr.to_string());
            assert_eq!(*ok, there, "round {round}: grant of {} said {ok}", g.cidr);
        }
        let reqs = api.requests();
        let pool_writes = reqs.iter().filter(|r| r.verb == "update" && r.resource == "ippools" && r.status == 200).count();
        reverted += usize::from(pool_writes == 2);
        kept += granted.iter().filter(|(_, ok)| *ok).count();
        undone += reqs.iter().filter(|r| r.verb == "delete" && r.resource == "ipblocks").count();
        for (g, ok) in granted {
            if ok {
                assert!(granter.release_block(&g).await.unwrap());
            }
        }
    }
    println!(
        "{rounds} rounds: shrink landed {shrunk}, refused {refused} (of which written and reverted {reverted}); \
         grants kept {kept}; blocks removed by a grant's re-check {undone}"
    );
    assert_eq!(shrunk + refused, rounds as usize);
}

/// The grant side of that race, made certain: the granter's mirror still shows the wide pool
/// (its pool watch is failing), so it creates the block; its re-check reads the pool afresh,
/// finds the CIDR gone, and deletes the block again (uid precondition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_a_grant_whose_pool_shrank_meanwhile_removes_its_block() {
    let api = fake();
    let (granter, admin) = (connect(&api).await, connect(&api).await);
    admin.apply_pools(vec![contract::pool("p", &["10.0.0.0/24", "10.0.1.0/24"], 28)]).await.unwrap();
    eventually(5, "the granter sees the pool", async || granter.pools().await.unwrap().len() == 1).await;
    // The granter's pool watch breaks and cannot come back for now.
    api.fail_next("watch", "ippools", 500, 1000);
    api.fail_next("list", "ippools", 500, 1000);
    api.break_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.insert(json!({"apiVersion": "allot.dev/v1", "kind": "IPPool", "metadata": {"name": "p"},
        "spec": {"ipv4": {"cidrs": ["10.0.0.0/24"], "maskSize": 28}}}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(granter.pools().await.unwrap()[0], contract::pool("p", &["10.0.0.0/24", "10.0.1.0/24"], 28), "the mirror is stale");
    api.clear_requests();
    assert!(!granter.grant_block(&contract::grant("p", "10.0.1.0/28", "n1")).await.unwrap());
    let verbs: Vec<(String, String, u16)> = api.requests().into_iter().filter(|r| r.resource != "ippools" || r.verb == "get").map(|r| (r.verb, r.resource, r.status)).collect();
    assert_eq!(
        verbs,
        [("create", "ipblocks", 201), ("get", "ippools", 200), ("delete", "ipblocks", 200)].map(|(v, r, s)| (v.to_string(), r.to_string(), s)).to_vec()
    );
    assert!(api.objects("allot.dev/v1", "IPBlock").is_empty());
    // A block the pool still covers is kept.
    assert!(granter.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
}

/// The mirror's watches end (an apiserver restart) while another store keeps writing: the
/// mirror resumes from its last resourceVersion and misses nothing, without a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_mirror_resumes_after_broken_watches_without_losing_changes() {
    let api = fake();
    let (watched, writer) = (connect(&api).await, connect(&api).await);
    let mut events = watched.events();
    writer.register_node("n0", None).await.unwrap();
    eventually(5, "n0 seen", async || watched.nodes().await.unwrap().len() == 1).await;
    for n in 1..6 {
        api.break_watches();
        writer.register_node(&format!("n{n}"), None).await.unwrap();
    }
    writer.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    eventually(5, "every node and the pool seen", async || {
        watched.nodes().await.unwrap().len() == 6 && watched.pools().await.unwrap().len() == 1
    })
    .await;
    let mut nodes_seen = 0;
    while let Ok(ev) = events.try_recv() {
        match ev {
            StoreEvent::Resync => panic!("a resumed watch needs no resync"),
            StoreEvent::Changes(c) => nodes_seen += c.iter().filter(|(_, c)| matches!(c, Change::Node { record: Some(_), .. })).count(),
        }
    }
    assert_eq!(nodes_seen, 6, "one event per node");
    let watches = api.requests().iter().filter(|r| r.verb == "watch" && r.resource == "allotnodes").count();
    assert!(watches >= 6, "the node watch was re-opened after each break ({watches} watches)");
}

/// History compacted while the watches are down: the mirror gets 410 Gone, lists afresh,
/// tells subscribers to resync, and converges on what the other store wrote meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_mirror_resyncs_after_compaction_and_converges() {
    let api = fake();
    // No bookmarks: the watches' last resourceVersions stay behind the compaction.
    api.set_bookmark_interval(Duration::from_secs(3600));
    let (watched, writer) = (connect(&api).await, connect(&api).await);
    writer.register_node("n0", None).await.unwrap();
    eventually(5, "n0 seen", async || watched.nodes().await.unwrap().len() == 1).await;
    let mut events = watched.events();
    writer.register_node("n1", None).await.unwrap();
    writer.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    writer.delete_node("n0").await.unwrap();
    api.insert(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump", "namespace": NS}}));
    api.compact();
    api.break_watches();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(StoreEvent::Resync) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("subscribers were told to resync");
    eventually(5, "the mirror converged", async || {
        let s = watched.snapshot().await.unwrap();
        s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>() == ["n1"] && s.pools.len() == 1
    })
    .await;
    // It follows later changes too.
    writer.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap();
    eventually(5, "a later change seen", async || watched.namespaces().await.unwrap().contains_key("ns")).await;
}

/// With the API server unreachable every write fails with a Backend error and changes
/// nothing; once it is back, writes go through and the mirror follows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_writes_while_the_api_is_down_fail_and_change_nothing() {
    let (api, s) = store().await;
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    s.register_node("n1", None).await.unwrap();
    assert!(s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    let objects = |api: &FakeApiServer| {
        ["IPPool", "IPBlock", "AllotNode"].map(|k| api.objects("allot.dev/v1", k)).to_vec()
    };
    let before = objects(&api);
    api.set_down(true);
    let backend = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Backend(m)) => assert!(m.contains("Kubernetes API"), "{what}: {m}"),
        other => panic!("{what}: {other:?}"),
    };
    backend(s.apply_pools(vec![contract::pool("q", &["10.1.0.0/24"], 28)]).await.map(|_| ()), "apply");
    backend(s.delete_pool("p").await, "delete_pool");
    backend(s.grant_block(&contract::grant("p", "10.0.0.16/28", "n1")).await.map(|_| ()), "grant");
    backend(s.release_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.map(|_| ()), "release");
    backend(s.register_node("n2", None).await, "register");
    backend(s.set_requested("n1", vec![]).await, "set_requested");
    backend(s.set_operator_error("n1", Some("x".into())).await, "set_operator_error");
    backend(s.delete_node("n1").await.map(|_| ()), "delete_node");
    backend(s.annotate_namespace("ns", [("k".to_string(), "v".to_string())].into(), vec![]).await.map(|_| ()), "annotate");
    // Reads answer from the mirror meanwhile.
    assert_eq!(s.grants().await.unwrap().len(), 1);
    api.set_down(false);
    assert_eq!(before, objects(&api), "a failed write changed something");
    s.register_node("n2", None).await.unwrap();
    assert_eq!(s.nodes().await.unwrap().len(), 2, "the write after the outage is read back");
}

/// A liveness Lease makes a node live until renewTime + leaseDurationSeconds; a live node is
/// not deleted; once the Lease runs out the node is not live (an event says so) and may go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_liveness_lease_expires_and_then_the_node_may_be_deleted() {
    let (api, s) = store().await;
    let mut events = s.events();
    s.register_node("n1", None).await.unwrap();
    let lease = s.announce_alive("n1", Duration::from_secs(2)).await.unwrap();
    assert_eq!(s.live_nodes().await.unwrap(), Some(["n1".to_string()].into()));
    let obj = api.objects("coordination.k8s.io/v1", "Lease");
    assert!(obj.iter().any(|l| l["metadata"]["name"] == "allot-node-n1" && l["metadata"]["namespace"] == NS && l["spec"]["leaseDurationSeconds"] == 2));
    let err = s.delete_node("n1").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)) && err.to_string().contains("--force"), "{err}");
    assert!(s.renew_alive(&lease).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.live_nodes().await.unwrap(), Some(Default::default()), "the Lease ran out");
    assert!(!s.renew_alive(&lease).await.unwrap(), "an expired Lease is not renewed");
    let mut saw = Vec::new();
    while let Ok(StoreEvent::Changes(c)) = events.try_recv() {
        saw.extend(c.iter().filter_map(|(_, c)| match c {
            Change::Alive { node, live } => Some((node.clone(), *live)),
            _ => None,
        }));
    }
    assert_eq!(saw, vec![("n1".to_string(), true), ("n1".to_string(), false)]);
    s.delete_node("n1").await.unwrap();

    // keep_alive holds it past its TTL and ends it at once on stop.
    s.register_node("n2", None).await.unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let keeper = {
        let s = s.clone();
        tokio::spawn(async move { allot_store::keep_alive(&s, "n2", Duration::from_secs(2), None, stop).await })
    };
    eventually(5, "n2 live", async || s.live_nodes().await.unwrap().unwrap().contains("n2")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.live_nodes().await.unwrap().unwrap().contains("n2"), "renewed past its TTL");
    stop_tx.send(true).unwrap();
    keeper.await.unwrap();
    assert_eq!(s.live_nodes().await.unwrap(), Some(Default::default()), "a clean stop ends liveness at once");
}

/// Deleting a node keeps its blocks reserved to it for the grace (an annotation on the
/// IPBlock, owner reference dropped so garbage collection keeps it): no other node may take
/// them, the node itself may; after the grace anyone may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_released_blocks_stay_reserved_for_the_grace() {
    let (api, store) = store().await;
    store.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    let block = &api.objects("allot.dev/v1", "IPBlock")[0];
    let node_uid = api.objects("allot.dev/v1", "AllotNode")[0]["metadata"]["uid"].clone();
    assert_eq!(block["metadata"]["ownerReferences"][0]["uid"], node_uid, "a block is owned by its node");
    assert_eq!(block["metadata"]["labels"]["allot.dev/node"], "n1");

    let released = store.with_release_grace(Duration::from_secs(3)).force_delete_node("n1").await.unwrap();
    assert_eq!(released, vec![contract::grant("p", "10.0.0.0/28", "n1")]);
    assert!(api.objects("allot.dev/v1", "AllotNode").is_empty());
    let block = &api.objects("allot.dev/v1", "IPBlock")[0];
    assert!(block["metadata"]["annotations"][RELEASED_UNTIL].is_string(), "{block}");
    assert!(block["metadata"]["ownerReferences"].is_null(), "{block}");
    assert_eq!(store.released_blocks().await.unwrap(), released);
    assert!(store.grants().await.unwrap().is_empty());
    assert!(!store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap(), "re-granted within the grace");
    assert_eq!(store.grant_blocks(&[contract::grant("p", "10.0.0.0/28", "n3"), contract::grant("p", "10.0.0.16/28", "n3")]).await.unwrap(), vec![false, true]);
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap(), "its own node may take it back");
    assert!(store.released_blocks().await.unwrap().is_empty());
    assert_eq!(store.grants().await.unwrap().len(), 2);

    // Deleted again (not live, no force needed); after the grace the block is anyone's.
    store.register_node("n1", None).await.unwrap();
    store.with_release_grace(Duration::from_secs(2)).delete_node("n1").await.unwrap();
    assert!(!store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap());
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(store.released_blocks().await.unwrap().is_empty(), "the grace ended");
    assert!(store.grant_block(&contract::grant("p", "10.0.0.0/28", "n2")).await.unwrap(), "still reserved after the grace");
    let b = api.objects("allot.dev/v1", "IPBlock").into_iter().find(|b| b["spec"]["cidr"] == "10.0.0.0/28").unwrap();
    assert_eq!(b["spec"]["node"], "n2");
    assert!(b["metadata"]["annotations"][RELEASED_UNTIL].is_null());

    // The operator's sweep removes expired reservations.
    store.register_node("n3", None).await.unwrap();
    store.with_release_grace(Duration::from_secs(1)).delete_node("n3").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(store.expire_released().await.unwrap(), 1);
    assert_eq!(api.objects("allot.dev/v1", "IPBlock").len(), 1);
}

/// Without a grace, deleting a node deletes its blocks itself (explicit deletes, not only owner
/// garbage collection), then the node.
#[tokio::test]
async fn fake_api_deleting_a_node_deletes_its_blocks_explicitly() {
    let (api, s) = store().await;
    let s = s.with_release_grace(Duration::ZERO);
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    s.register_node("n1", Some("192.0.2.1".parse().unwrap())).await.unwrap();
    let batch: Vec<_> = (0..5).map(|i| contract::grant("p", &format!("10.0.0.{}/28", i * 16), "n1")).collect();
    assert_eq!(s.grant_blocks(&batch).await.unwrap(), vec![true; 5]);
    api.clear_requests();
    assert_eq!(s.delete_node("n1").await.unwrap(), batch);
    let deletes: Vec<_> = api.requests().into_iter().filter(|r| r.verb == "delete").map(|r| r.resource).collect();
    assert_eq!(deletes.iter().filter(|r| *r == "ipblocks").count(), 5, "{deletes:?}");
    assert!(api.objects("allot.dev/v1", "IPBlock").is_empty());
    assert!(api.objects("allot.dev/v1", "AllotNode").is_empty());
    assert!(s.grants().await.unwrap().is_empty() && s.released_blocks().await.unwrap().is_empty());
}

/// Namespace annotations are read from real Namespace objects (kubectl's bookkeeping left
/// out) and written with a JSON merge patch that leaves other annotations alone; a missing
/// namespace is an error, not created.
#[tokio::test]
async fn fake_api_namespace_annotations_come_from_namespace_objects() {
    let api = fake();
    api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "annotations": {
        "ipam.cilium.io/ip-pool": "blue",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "owner": "team a",
    }}}));
    let s = connect(&api).await;
    let ns = s.namespaces().await.unwrap();
    assert_eq!(ns["team-a"], [("ipam.cilium.io/ip-pool".to_string(), "blue".to_string()), ("owner".to_string(), "team a".to_string())].into());
    assert!(!ns.contains_key("ns"), "a namespace without annotations is not listed");

    api.clear_requests();
    let out = s.annotate_namespace("team-a", [("ipam.cilium.io/ip-pool".to_string(), "green".to_string())].into(), vec!["owner".into()]).await.unwrap();
    assert_eq!(out, [("ipam.cilium.io/ip-pool".to_string(), "green".to_string())].into());
    let patch = api.requests().into_iter().find(|r| r.verb == "patch").unwrap();
    assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(patch.body.unwrap(), json!({"metadata": {"annotations": {"ipam.cilium.io/ip-pool": "green", "owner": null}}}));
    let obj = api.objects("v1", "Namespace").into_iter().find(|n| n["metadata"]["name"] == "team-a").unwrap();
    assert_eq!(obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"], "{}");
    assert_eq!(s.namespaces().await.unwrap()["team-a"]["ipam.cilium.io/ip-pool"], "green");

    let err = s.annotate_namespace("nope", [("k".to_string(), "v".to_string())].into(), vec![]).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)) && err.to_string().contains("kubectl create namespace nope"), "{err}");
    assert!(!api.objects("v1", "Namespace").iter().any(|n| n["metadata"]["name"] == "nope"));
}

/// With `watch_cilium_pools`, Cilium's `CiliumPodIPPool` objects are pools too (read-only);
/// allot's `IPPool` of the same name wins. Without it they are not read.
#[tokio::test]
async fn fake_api_cilium_pools_are_read_when_asked() {
    let api = fake();
    let cilium = |name: &str, cidr: &str| {
        json!({"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumPodIPPool", "metadata": {"name": name},
               "spec": {"ipv4": {"cidrs": [cidr], "maskSize": 28}}})
    };
    api.insert(cilium("blue", "10.50.0.0/24"));
    api.insert(cilium("a", "10.60.0.0/24"));
    let plain = connect(&api).await;
    plain.apply_pools(vec![contract::pool("a", &["10.70.0.0/24"], 28)]).await.unwrap();
    assert_eq!(plain.pools().await.unwrap().len(), 1, "Cilium's pools are not read by default");
    assert!(!plain.grant_block(&contract::grant("blue", "10.50.0.0/28", "n1")).await.unwrap());

    let s = KubeStore::connect(api.client(), KubeStoreOptions { watch_cilium_pools: true, ..opts() }).await.unwrap();
    let pools = s.pools().await.unwrap();
    assert_eq!(pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "blue"]);
    assert_eq!(pools[0], contract::pool("a", &["10.70.0.0/24"], 28), "allot's IPPool wins");
    assert_eq!(pools[1], contract::pool("blue", &["10.50.0.0/24"], 28));
    assert!(s.grant_block(&contract::grant("blue", "10.50.0.16/28", "n1")).await.unwrap());
    assert!(!s.grant_block(&contract::grant("a", "10.60.0.0/28", "n1")).await.unwrap(), "the shadowed Cilium CIDR is not a's");
    let err = s.delete_pool("blue").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)) && err.to_string().contains("CiliumPodIPPool"), "{err}");
    // An overlap with a Cilium pool is refused like any other.
    let err = s.apply_pools(vec![contract::pool("c", &["10.50.0.0/25"], 28)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(allot_core::PoolError::Overlap { .. })), "{err}");
}

/// A kubectl edit that removes a CIDR nodes hold cannot be stopped by the store (the webhook
/// does that); the store's pool writes are guarded by the pool lock and preconditions: a
/// stale lock left by a crashed writer is broken after it runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_a_pool_lock_left_by_a_crashed_writer_is_broken() {
    let (api, s) = store().await;
    let past = "2020-01-01T00:00:00.000000Z";
    api.insert(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": allot_k8s::POOL_LOCK, "namespace": NS},
        "spec": {"holderIdentity": "crashed", "leaseDurationSeconds": 15, "acquireTime": past, "renewTime": past}}));
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    assert!(api.objects("coordination.k8s.io/v1", "Lease").is_empty(), "the lock is released after the write");
    // A live lock held by someone else: the write waits, then says who holds it.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.insert(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": allot_k8s::POOL_LOCK, "namespace": NS},
        "spec": {"holderIdentity": "other-operator", "leaseDurationSeconds": 60, "acquireTime": now, "renewTime": now}}));
    let s2 = KubeStore::connect(api.client(), KubeStoreOptions { timeout: Duration::from_secs(1), ..opts() }).await.unwrap();
    let err = s2.apply_pools(vec![contract::pool("q", &["10.1.0.0/24"], 28)]).await.unwrap_err();
    assert!(err.to_string().contains("other-operator") && err.to_string().contains("try again"), "{err}");
    assert_eq!(api.objects("allot.dev/v1", "IPPool").len(), 1);
}

/// `heard_unix` stays current in a quiet cluster (the probe), stops while the API server is
/// unreachable, and moves again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_heard_unix_follows_the_api_servers_answers() {
    let api = fake();
    let s = KubeStore::connect(api.client(), KubeStoreOptions { probe_every: Duration::from_secs(1), ..opts() }).await.unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let heard = s.heard_unix().unwrap();
    assert!(now() - heard <= 2, "quiet but answering: heard {} s ago", now() - heard);
    api.set_down(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stale = now() - s.heard_unix().unwrap();
    assert!(stale >= 3, "heard {stale} s ago while the API server was down");
    api.set_down(false);
    eventually(15, "heard again after the outage", async || now() - s.heard_unix().unwrap() <= 2).await;
}

/// Without allot's CRDs (every list of IPPools answered 404), connecting fails within the
/// timeout and says what to install.
#[tokio::test]
async fn fake_api_connect_without_the_crds_says_to_install_them() {
    let api = fake();
    api.fail_next("list", "ippools", 404, 10_000);
    let err = KubeStore::connect(api.client(), KubeStoreOptions { timeout: Duration::from_secs(2), ..opts() }).await.err().expect("connected");
    assert!(matches!(err, StoreError::Backend(_)) && err.to_string().contains("allot crds | kubectl apply -f -"), "{err}");
}

/// A pool left marked for deletion by a writer that crashed mid-delete takes grants again
/// once it is applied again.
#[tokio::test]
async fn fake_api_applying_a_pool_clears_a_stale_deletion_mark() {
    let (api, s) = store().await;
    api.insert(json!({"apiVersion": "allot.dev/v1", "kind": "IPPool",
        "metadata": {"name": "p", "annotations": {allot_k8s::DELETING: "true"}},
        "spec": {"ipv4": {"cidrs": ["10.0.0.0/24"], "maskSize": 28}}}));
    eventually(5, "pool seen", async || s.pools().await.unwrap().len() == 1).await;
    assert!(!s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap(), "a pool being deleted grants nothing");
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    assert!(api.objects("allot.dev/v1", "IPPool")[0]["metadata"]["annotations"][allot_k8s::DELETING].is_null());
    assert!(s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
}

/// A `ClusterView` fed only by events stays equal to a fresh snapshot through the parts that
/// change with the clock: a node going live and its Lease running out, blocks released to a
/// deleted node, taken back, and a reservation ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_a_view_fed_by_events_follows_liveness_and_the_release_grace() {
    use allot_store::ClusterView;
    let (_api, s) = store().await;
    let mut events = s.events();
    let mut view = ClusterView::new(s.snapshot().await.unwrap(), None);
    let follow = async |view: &mut ClusterView, events: &mut tokio::sync::broadcast::Receiver<StoreEvent>| {
        while let Ok(ev) = events.try_recv() {
            match ev {
                StoreEvent::Changes(c) => {
                    let fresh: Vec<_> = c.iter().filter(|(rev, _)| *rev > view.revision).cloned().collect();
                    view.apply_all(&fresh);
                }
                StoreEvent::Resync => panic!("unexpected resync"),
            }
        }
        let fresh = ClusterView::new(s.snapshot().await.unwrap(), None);
        assert_eq!((&view.blocks, &view.released, &view.live, &view.nodes), (&fresh.blocks, &fresh.released, &fresh.live, &fresh.nodes));
    };
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    s.register_node("n1", None).await.unwrap();
    s.announce_alive("n1", Duration::from_secs(1)).await.unwrap();
    assert!(s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    assert!(s.grant_block(&contract::grant("p", "10.0.0.16/28", "n1")).await.unwrap());
    follow(&mut view, &mut events).await;
    assert!(view.live.as_ref().unwrap().contains("n1"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    follow(&mut view, &mut events).await;
    assert!(view.live.as_ref().unwrap().is_empty(), "the Lease ran out");
    s.with_release_grace(Duration::from_secs(2)).delete_node("n1").await.unwrap();
    follow(&mut view, &mut events).await;
    assert_eq!(view.released.len(), 2);
    assert!(s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap());
    follow(&mut view, &mut events).await;
    assert_eq!((view.blocks.len(), view.released.len()), (1, 1));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    follow(&mut view, &mut events).await;
    assert_eq!((view.blocks.len(), view.released.len()), (1, 0), "the reservation ended");
}

/// 512 grants in one `grant_blocks` call (16 creates in flight): all land, one outcome each,
/// and a second store's mirror ends with all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fake_api_grant_blocks_many_at_once() {
    let api = fake();
    let (s, other) = (connect(&api).await, connect(&api).await);
    s.apply_pools(vec![contract::pool("big", &["10.8.0.0/16"], 28)]).await.unwrap();
    let batch: Vec<_> = (0..512).map(|i| contract::grant("big", &format!("10.8.{}.{}/28", i / 16, (i % 16) * 16), &format!("n{}", i % 4))).collect();
    let t = std::time::Instant::now();
    assert_eq!(s.grant_blocks(&batch).await.unwrap(), vec![true; 512]);
    let took = t.elapsed();
    assert_eq!(s.grants().await.unwrap().len(), 512, "read after write");
    eventually(10, "the other mirror has every block", async || other.grants().await.unwrap().len() == 512).await;
    // Again: every one is held now.
    assert_eq!(s.grant_blocks(&batch).await.unwrap(), vec![false; 512]);
    println!("512 grants through the fake API in {took:?}");
}

/// A DELETE the API server refuses (an admission webhook, here a 403) after the pool was
/// marked deleting takes the mark back: the pool stays usable, and a later delete works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_a_refused_pool_delete_takes_its_mark_back() {
    let (api, s) = store().await;
    s.apply_pools(vec![contract::pool("p", &["10.0.0.0/24"], 28)]).await.unwrap();
    api.fail_next("delete", "ippools", 403, 1);
    let err = s.delete_pool("p").await.unwrap_err();
    assert!(err.to_string().contains("403") || err.to_string().to_lowercase().contains("forbidden"), "{err}");
    let stored = api.objects("allot.dev/v1", "IPPool");
    assert_eq!(stored.len(), 1, "the pool is still there");
    assert!(stored[0]["metadata"]["annotations"].get("allot.dev/deleting").is_none(), "unmarked: {}", stored[0]);
    eventually(5, "the pool reads as present again", async || s.pools().await.unwrap().len() == 1).await;
    assert!(s.grant_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap(), "the pool is usable");
    s.release_block(&contract::grant("p", "10.0.0.0/28", "n1")).await.unwrap();
    s.delete_pool("p").await.unwrap();
    assert!(api.objects("allot.dev/v1", "IPPool").is_empty());
}
