//! The requests `KubeStore` makes in an agent's role, an operator's role and the IPPool
//! webhook's, recorded by the fake API server (no Kubernetes API server runs here; the fake has
//! no RBAC of its own), are each allowed by that component's roles in deploy/rbac/ and
//! deploy/ippool-webhook/rbac.yaml (evaluated by tests/support/rbac.rs).
//! The operator's Lease election and its watch of core Nodes (node_gc) run here too; the
//! agent's pod watch is not exercised here.

#[path = "support/rbac.rs"]
mod rbac;

use std::collections::BTreeSet;
use std::time::Duration;

use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_k8s::{KubeStore, KubeStoreOptions};
use allot_kube_fake::{FakeApiServer, Request};
use allot_store::{Liveness, Store};
use allot_wire::{Needed, PoolRequest};
use rbac::{NAMESPACE, Rbac};
use serde_json::json;

async fn connect(api: &FakeApiServer) -> KubeStore {
    let opts = KubeStoreOptions {
        namespace: NAMESPACE.into(),
        timeout: Duration::from_secs(5),
        // No background probes: each phase's requests are its own calls and watches.
        probe_every: Duration::from_secs(3600),
        ..Default::default()
    };
    KubeStore::connect(api.client(), opts).await.unwrap()
}

/// The requests since `from`, once the log has been still for a moment (a dropped store's
/// watches have ended).
async fn settled(api: &FakeApiServer, from: usize) -> Vec<Request> {
    let mut len = api.requests().len();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = api.requests().len();
        if now == len {
            return api.requests()[from..].to_vec();
        }
        len = now;
    }
}

fn check(role: &str, reqs: &[Request], used: &mut BTreeSet<rbac::Grant>) -> Vec<String> {
    let rbac = Rbac::for_service_account(role);
    let mut denied = Vec::new();
    for r in reqs {
        let (verb, av, res, sub, ns) = (&r.verb, &r.api_version, &r.resource, r.subresource.as_deref(), r.namespace.as_deref());
        match rbac.grant_for(verb, av, res, sub, ns) {
            Some(g) => {
                used.insert(g.clone());
            }
            None => denied.push(format!("{role}: {verb} {av} {res}{} in {ns:?} ({:?})", sub.map(|s| format!("/{s}")).unwrap_or_default(), r.name)),
        }
    }
    denied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_kubestore_requests_are_allowed_by_deploy_rbac() {
    let api = FakeApiServer::new();
    api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "annotations": {"ipam.cilium.io/ip-pool": "default"}}}));
    {
        // Setup as a cluster admin would (`allot pool apply` with the admin's kubeconfig).
        let admin = connect(&api).await;
        let spec = PoolSpec { ipv4: Some(FamilySpec { cidrs: vec!["10.10.0.0/16".parse().unwrap()], mask_size: 24 }), ipv6: None };
        admin.apply_pools(vec![Pool { name: "default".into(), spec }]).await.unwrap();
    }
    let grant = BlockGrant { pool: "default".into(), cidr: "10.10.0.0/24".parse().unwrap(), node: "n1".into() };
    let (mut agent_used, mut operator_used) = (BTreeSet::new(), BTreeSet::new());
    let mut denied = Vec::new();
    let mut phases = 0;

    // Agent: registers, asks, keeps its liveness Lease, reads pools, blocks and namespaces.
    let from = settled(&api, 0).await.len();
    let lease = {
        let agent = connect(&api).await;
        agent.register_node("n1", Some("192.0.2.1".parse().unwrap())).await.unwrap();
        agent.set_requested("n1", vec![PoolRequest { pool: "default".into(), needed: Needed { ipv4_addrs: 16, ipv6_addrs: 0 } }]).await.unwrap();
        let lease = agent.announce_alive("n1", Duration::from_secs(30)).await.unwrap();
        assert!(agent.renew_alive(&lease).await.unwrap());
        assert_eq!(agent.namespaces().await.unwrap().len(), 1);
        agent.snapshot().await.unwrap();
        lease
    };
    let reqs = settled(&api, from).await;
    assert!(reqs.iter().any(|r| r.verb == "create" && r.resource == "leases"), "the agent phase made its calls: {reqs:?}");
    denied.extend(check("allot-agent", &reqs, &mut agent_used));
    phases += 1;

    // Operator: grants, reports an error, reads liveness and released blocks.
    let from = api.requests().len();
    {
        let op = connect(&api).await;
        assert_eq!(op.grant_blocks(std::slice::from_ref(&grant)).await.unwrap(), [true]);
        op.set_operator_error("n1", Some("pool default is full".into())).await.unwrap();
        assert!(op.live_nodes().await.unwrap().unwrap().contains("n1"));
        op.released_blocks().await.unwrap();
    }
    let reqs = settled(&api, from).await;
    assert!(reqs.iter().any(|r| r.verb == "create" && r.resource == "ipblocks"), "the operator granted: {reqs:?}");
    denied.extend(check("allot-operator", &reqs, &mut operator_used));
    phases += 1;

    // Agent: gives the block back and ends its Lease (a clean stop).
    let from = api.requests().len();
    {
        let agent = connect(&api).await;
        assert!(agent.release_block(&grant).await.unwrap());
        agent.revoke_alive(lease).await.unwrap();
    }
    let reqs = settled(&api, from).await;
    assert!(reqs.iter().any(|r| r.verb == "delete" && r.resource == "ipblocks"), "the agent released: {reqs:?}");
    denied.extend(check("allot-agent", &reqs, &mut agent_used));
    phases += 1;

    // Operator: the node is gone (no Lease): remove it, holding its blocks back, then expire.
    let from = api.requests().len();
    {
        let op = connect(&api).await;
        assert_eq!(op.grant_blocks(std::slice::from_ref(&grant)).await.unwrap(), [true]);
        assert_eq!(op.delete_node("n1").await.unwrap(), std::slice::from_ref(&grant));
        op.expire_released().await.unwrap();
    }
    let reqs = settled(&api, from).await;
    assert!(reqs.iter().any(|r| r.verb == "delete" && r.resource == "allotnodes"), "the operator removed the node: {reqs:?}");
    denied.extend(check("allot-operator", &reqs, &mut operator_used));
    phases += 1;

    // Operator: elected through its Lease, releases a node Kubernetes does not list, resigns.
    let from = api.requests().len();
    {
        let store = std::sync::Arc::new(connect(&api).await);
        store.register_node("gone", None).await.unwrap();
        let setup_done = api.requests().len();
        let elector = allot_k8s::lease::LeaderElector::new(api.client(), NAMESPACE, "allot-operator", "op-1", Duration::from_secs(3));
        let leadership = elector.campaign().await;
        assert!(!*leadership.lost.borrow());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let opts = allot_k8s::node_gc::NodeGcOptions { absent_for: Duration::from_millis(200), every: Duration::from_millis(100) };
        let gc = tokio::spawn(allot_k8s::node_gc::release_deleted_nodes(api.client(), store.clone(), opts, stop));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.nodes().await.unwrap().iter().any(|n| n.name == "gone") {
            assert!(tokio::time::Instant::now() < deadline, "node_gc never removed the node Kubernetes does not list");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        gc.await.unwrap();
        leadership.resign().await;
        // The node's registration above is the test's setup (an agent's call), not the operator's.
        let reqs = settled(&api, from).await;
        let (setup, term): (Vec<_>, Vec<_>) = reqs.into_iter().enumerate().partition(|(i, _)| from + i < setup_done);
        let setup: Vec<Request> = setup.into_iter().map(|(_, r)| r).filter(|r| r.resource == "allotnodes").collect();
        denied.extend(check("allot-agent", &setup, &mut agent_used));
        let term: Vec<Request> = term.into_iter().map(|(_, r)| r).collect();
        assert!(term.iter().any(|r| r.resource == "leases" && r.name.as_deref() == Some("allot-operator")), "the election made its calls: {term:?}");
        assert!(term.iter().any(|r| r.resource == "nodes" && r.verb == "watch"), "node_gc watched Nodes: {term:?}");
        denied.extend(check("allot-operator", &term, &mut operator_used));
    }
    phases += 1;

    // The IPPool webhook (`allot webhook --ippools`): a store with the CLI's options and its
    // probe, followed as `PoolView::follow` does (events, then a snapshot).
    let from = api.requests().len();
    let mut webhook_used = BTreeSet::new();
    {
        let opts = KubeStoreOptions { namespace: NAMESPACE.into(), probe_every: Duration::from_millis(200), ..Default::default() };
        let store = KubeStore::connect(api.client(), opts).await.unwrap();
        let _events = store.events();
        assert_eq!(store.snapshot().await.unwrap().pools.len(), 1);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let reqs = settled(&api, from).await;
    let pool_lists = reqs.iter().filter(|r| r.verb == "list" && r.resource == "ippools").count();
    assert!(pool_lists >= 2, "the watch's list and at least one probe: {reqs:?}");
    denied.extend(check("allot-ippool-webhook", &reqs, &mut webhook_used));
    phases += 1;

    assert_eq!(phases, 6);
    assert!(denied.is_empty(), "requests deploy/rbac does not allow:\n{}", denied.join("\n"));
    // The webhook's roles are exactly what it uses: nothing to spare.
    let unused: Vec<_> = Rbac::for_service_account("allot-ippool-webhook").grants().difference(&webhook_used).cloned().collect();
    assert!(unused.is_empty(), "allot-ippool-webhook grants no request used: {unused:?}");
    // Grants no request here used (other code's calls, or candidates for removal): printed.
    for (role, used) in [("allot-agent", &agent_used), ("allot-operator", &operator_used)] {
        let unused: Vec<_> = Rbac::for_service_account(role).grants().difference(used).cloned().collect();
        eprintln!("{role}: grants unused by KubeStore here: {unused:?}");
    }
}
