//! Pools by annotation from the Kubernetes API, through the real agent code and kube-rs's
//! watcher, against the in-process fake API server (no Kubernetes API server runs here). The
//! runtime passes no pod annotations (as podman, CRI-O, or containerd without the capability).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_agent::kube_pods::KubePods;
use allot_agent::{AgentConfig, Node};
use allot_core::{BlockGrant, FamilySpec, Pool, PoolSpec};
use allot_kube_fake::FakeApiServer;
use allot_store::{EmbeddedStore, Store};
use allot_wire::{AddRequest, Owner, PodRef};
use serde_json::json;
use tokio::sync::watch;
use tracing_subscriber::util::SubscriberInitExt;

fn pool(name: &str, cidr: &str) -> Pool {
    Pool {
        name: name.into(),
        spec: PoolSpec { ipv4: Some(FamilySpec { cidrs: vec![cidr.parse().unwrap()], mask_size: 28 }), ipv6: None },
    }
}

fn add_req(ns: &str, name: &str) -> AddRequest {
    AddRequest {
        owner: Owner { network: "n".into(), container_id: format!("c-{ns}-{name}"), ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef { namespace: Some(ns.into()), name: Some(name.into()) },
        pool: None,
        annotations: Default::default(),
        annotations_passed: false,
    }
}

fn pod(ns: &str, name: &str, node: &str, pool: Option<&str>) -> serde_json::Value {
    let annotations = match pool {
        Some(p) => json!({ "ipam.cilium.io/ip-pool": p, "other": "x" }),
        None => json!({}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "pause" }] },
    })
}

struct Setup {
    api: FakeApiServer,
    node: Arc<Node<EmbeddedStore>>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// An agent for node n1 on the embedded store, with a block of `default` (10.0.0.0/28) and one
/// of `blue` (10.1.0.0/28), and the pod and namespace watches on a fake API.
async fn setup(pod_wait: Duration) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
    store.apply_pools(vec![pool("default", "10.0.0.0/24"), pool("blue", "10.1.0.0/24")]).await.unwrap();
    store.register_node("n1", None).await.unwrap();
    for (p, c) in [("default", "10.0.0.0/28"), ("blue", "10.1.0.0/28")] {
        store.grant_block(&BlockGrant { pool: p.into(), cidr: c.parse().unwrap(), node: "n1".into() }).await.unwrap();
    }
    let mut cfg = AgentConfig::new("n1");
    cfg.data_dir = dir.path().to_path_buf();
    cfg.pod_wait = pod_wait;
    cfg.add_wait = Duration::from_millis(200);
    let node = Node::start(cfg, store).await.unwrap();
    let api = FakeApiServer::new();
    let (stop_tx, stop) = watch::channel(false);
    node.set_pod_annotations(KubePods::start(api.client(), "n1", true, stop));
    Setup { api, node, _stop: stop_tx, _dir: dir }
}

fn in_blue(a: &allot_wire::Allocation) -> bool {
    let blue: ipnet::IpNet = "10.1.0.0/28".parse().unwrap();
    a.ips.len() == 1 && a.ips[0].pool == "blue" && blue.contains(&a.ips[0].address.addr())
}

fn in_default(a: &allot_wire::Allocation) -> bool {
    a.ips.len() == 1 && a.ips[0].pool == "default"
}

/// The ADD path reads the watch's cache only: no get of a pod or namespace.
fn assert_no_gets(api: &FakeApiServer) {
    let gets: Vec<_> = api.requests().into_iter().filter(|r| r.verb == "get").collect();
    assert!(gets.is_empty(), "the ADD path called the API: {gets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_pod_annotation_from_the_watch_chooses_the_pool() {
    let s = setup(Duration::from_secs(5)).await;
    s.api.insert(pod("team", "p1", "n1", Some("blue")));
    let a = s.node.add(add_req("team", "p1")).await.unwrap();
    assert!(in_blue(&a), "{a:?}");
    // Annotations the runtime passed win over the watch's copy.
    s.api.insert(pod("team", "p2", "n1", Some("blue")));
    let mut req = add_req("team", "p2");
    req.annotations_passed = true;
    req.annotations = [("ipam.cilium.io/ip-pool".to_string(), "default".to_string())].into();
    assert!(in_default(&s.node.add(req).await.unwrap()));
    // Passed but empty (the capability is declared, the pod has none): no wait, default pool.
    let mut req = add_req("team", "p3-unseen");
    req.annotations_passed = true;
    let started = Instant::now();
    assert!(in_default(&s.node.add(req).await.unwrap()));
    assert!(started.elapsed() < Duration::from_secs(1), "waited for a pod whose runtime passed annotations");
    assert_no_gets(&s.api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_namespace_annotation_from_the_watch_chooses_the_pool() {
    let s = setup(Duration::from_secs(5)).await;
    s.api.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "blue-team", "annotations": { "ipam.cilium.io/ip-pool": "blue" } },
    }));
    s.api.insert(pod("blue-team", "p1", "n1", None));
    let a = s.node.add(add_req("blue-team", "p1")).await.unwrap();
    assert!(in_blue(&a), "{a:?}");
    // The pod's own annotation wins over its namespace's.
    s.api.insert(pod("blue-team", "p2", "n1", Some("default")));
    assert!(in_default(&s.node.add(add_req("blue-team", "p2")).await.unwrap()));
    assert_no_gets(&s.api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_add_waits_for_a_pod_the_watch_has_not_seen_yet() {
    let s = setup(Duration::from_secs(5)).await;
    let node = s.node.clone();
    let started = Instant::now();
    let add = tokio::spawn(async move { node.add(add_req("team", "late")).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!add.is_finished(), "the ADD did not wait for the pod");
    s.api.insert(pod("team", "late", "n1", Some("blue")));
    let a = add.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(in_blue(&a), "{a:?}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "took {took:?}");
}

/// Collects what the agent logs (one thread: the current-thread runtime below).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn fake_api_add_for_a_pod_never_seen_proceeds_after_the_bound_with_the_default_pool() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).set_default();
    let s = setup(Duration::from_millis(700)).await;
    // A pod of the same name on another node is not this one (the watch selects spec.nodeName).
    s.api.insert(pod("team", "ghost", "n2", Some("blue")));
    let started = Instant::now();
    let a = s.node.add(add_req("team", "ghost")).await.unwrap();
    let took = started.elapsed();
    assert!(in_default(&a), "{a:?}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "took {took:?}");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("pod not seen by the pod watch within the wait") && text.contains("team/ghost"),
        "log: {text}"
    );
    // A retried ADD of the same owner answers at once, from memory.
    let started = Instant::now();
    assert_eq!(s.node.add(add_req("team", "ghost")).await.unwrap(), a);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_pod_watch_resumes_after_break_and_relists_after_compaction() {
    let s = setup(Duration::from_secs(5)).await;
    s.api.insert(pod("team", "p1", "n1", Some("blue")));
    assert!(in_blue(&s.node.add(add_req("team", "p1")).await.unwrap()));
    let pod_lists = |api: &FakeApiServer| api.requests().iter().filter(|r| r.resource == "pods" && r.verb == "list").count();
    let lists = pod_lists(&s.api);
    assert!(lists >= 1);

    // An apiserver restart ends the watch: the watcher resumes from its last resourceVersion
    // (no new list) and sees a pod created afterwards.
    s.api.break_watches();
    s.api.insert(pod("team", "p2", "n1", Some("blue")));
    assert!(in_blue(&s.node.add(add_req("team", "p2")).await.unwrap()));
    assert_eq!(pod_lists(&s.api), lists, "resumed with a new list instead of a watch from the last resourceVersion");
    let rewatch = s.api.requests().into_iter().filter(|r| r.resource == "pods" && r.verb == "watch").count();
    assert!(rewatch >= 2, "no second watch");

    // History compacted, then the watch ends: the re-watch gets 410 Gone and the watcher lists
    // again, and the pod created meanwhile is seen.
    s.api.set_down(true);
    s.api.insert(pod("team", "p3", "n1", Some("blue")));
    s.api.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.api.set_down(false);
    assert!(in_blue(&s.node.add(add_req("team", "p3")).await.unwrap()));
    assert!(pod_lists(&s.api) > lists, "no re-list after 410 Gone: {:#?}", s.api.requests());
    assert_no_gets(&s.api);
}
