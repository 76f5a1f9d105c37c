//! The IPPool route's rules against pools and blocks followed through the Kubernetes store on
//! the fake API server (allot-kube-fake: no real apiserver runs here).

use std::sync::Arc;
use std::time::Duration;

use allot_core::{BlockGrant, Pool};
use allot_k8s::{KubeStore, KubeStoreOptions};
use allot_kube_fake::FakeApiServer;
use allot_store::Store;
use allot_webhook::ippool::PoolView;
use allot_webhook::{Validator, review};
use serde_json::{Value, json};

fn ippool(name: &str, cidrs: &[&str], mask: u8) -> Value {
    json!({"apiVersion": "allot.dev/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": {"ipv4": {"cidrs": cidrs, "maskSize": mask}}})
}

fn body(op: &str, name: &str, object: Option<Value>, old: Option<Value>) -> Vec<u8> {
    let mut request = json!({
        "uid": format!("uid-{op}-{name}"),
        "kind": {"group": "allot.dev", "version": "v1", "kind": "IPPool"},
        "resource": {"group": "allot.dev", "version": "v1", "resource": "ippools"},
        "name": name,
        "operation": op,
        "userInfo": {"username": "admin"},
    });
    if let Some(o) = object {
        request["object"] = o;
    }
    if let Some(o) = old {
        request["oldObject"] = o;
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).to_string().into_bytes()
}

/// (allowed, status code, message) of the answer.
fn answer(v: &Validator, b: Vec<u8>) -> (bool, u64, String) {
    let a = serde_json::to_value(review(&b, v).unwrap()).unwrap();
    let r = &a["response"];
    (r["allowed"].as_bool().unwrap(), r["status"]["code"].as_u64().unwrap_or(0), r["status"]["message"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_ippool_reviews_follow_the_pools_and_blocks_nodes_hold() {
    let api = FakeApiServer::new();
    api.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "allot-system"}}));
    let opts = KubeStoreOptions { namespace: "allot-system".into(), timeout: Duration::from_secs(5), ..Default::default() };
    let store = Arc::new(KubeStore::connect(api.client(), opts).await.unwrap());
    let view = PoolView::default();
    let v: Validator = Arc::new(view.validator());

    // Before the first read every review is refused: failurePolicy Fail, never a blind allow;
    // and /readyz says not ready, so the Service sends reviews to a replica that has read.
    let (allowed, code, msg) = answer(&v, body("CREATE", "a", Some(ippool("a", &["10.0.0.0/24"], 28)), None));
    assert!(!allowed && code == 503 && msg.contains("retry"), "{code} {msg}");
    let ready = view.ready();
    assert!(ready().is_err_and(|e| e.contains("not been read")));

    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn({
        let view = view.clone();
        let store = store.clone();
        async move { view.follow(store, stop).await }
    });
    let a = Pool { name: "a".into(), spec: serde_json::from_value(json!({"ipv4": {"cidrs": ["10.0.0.0/24", "10.1.0.0/24"], "maskSize": 28}})).unwrap() };
    store.apply_pools(vec![a]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready().is_err() {
        assert!(tokio::time::Instant::now() < deadline, "ready once the store was read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.register_node("n1", None).await.unwrap();
    assert!(store.grant_block(&BlockGrant { pool: "a".into(), cidr: "10.0.0.16/28".parse().unwrap(), node: "n1".into() }).await.unwrap());

    let old = ippool("a", &["10.0.0.0/24", "10.1.0.0/24"], 28);
    let shrink = body("UPDATE", "a", Some(ippool("a", &["10.1.0.0/24"], 28)), Some(old.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The view catches up with the grant: then removing the held CIDR is refused, naming the node.
    let (allowed, code, msg) = loop {
        let got = answer(&v, shrink.clone());
        if !got.0 || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!allowed && code == 403 && msg.contains("10.0.0.0/24") && msg.contains("n1"), "{allowed} {code} {msg}");

    // Growing the pool is fine; a new pool overlapping it is not; nor a maskSize change.
    let grow = ippool("a", &["10.0.0.0/24", "10.1.0.0/24", "10.2.0.0/24"], 28);
    assert!(answer(&v, body("UPDATE", "a", Some(grow), Some(old.clone()))).0);
    let (allowed, _, msg) = answer(&v, body("CREATE", "b", Some(ippool("b", &["10.1.0.0/25"], 28)), None));
    assert!(!allowed && msg.contains("overlap"), "{msg}");
    let (allowed, _, msg) = answer(&v, body("UPDATE", "a", Some(ippool("a", &["10.0.0.0/24", "10.1.0.0/24"], 27)), Some(old.clone())));
    assert!(!allowed && msg.contains("mask"), "{msg}");
    // Deleting a pool a node holds blocks of is refused; once the block is back, allowed.
    let (allowed, _, msg) = answer(&v, body("DELETE", "a", None, Some(old.clone())));
    assert!(!allowed && msg.contains("n1"), "{msg}");
    assert!(store.release_block(&BlockGrant { pool: "a".into(), cidr: "10.0.0.16/28".parse().unwrap(), node: "n1".into() }).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !answer(&v, body("DELETE", "a", None, Some(old.clone()))).0 {
        assert!(tokio::time::Instant::now() < deadline, "the release never reached the webhook's view");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answer(&v, shrink).0, "with no block held the shrink is allowed");

    // Another kind sent here is a configuration mistake, refused with a message.
    let mut other: Value = serde_json::from_slice(&body("CREATE", "x", Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})), None)).unwrap();
    other["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
    let (allowed, code, msg) = answer(&v, other.to_string().into_bytes());
    assert!(!allowed && code == 400 && msg.contains("ValidatingWebhookConfiguration"), "{msg}");
}
