//! Leader election on a Lease, against the in-process fake API server (no Kubernetes API server
//! runs here): the Lease's resourceVersion preconditions and 409 Conflicts are the fake's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_k8s::lease::{LeaderElector, Leadership};
use allot_kube_fake::FakeApiServer;
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(2);

fn elector(api: &FakeApiServer, id: &str) -> LeaderElector {
    LeaderElector::new(api.client(), "allot-system", "allot-operator", id, TTL)
}

/// Each replica's own view of whether it leads: its term's `lost` channel while it holds one.
#[derive(Clone, Default)]
struct Views(Arc<Mutex<Vec<Option<watch::Receiver<bool>>>>>);

impl Views {
    fn new(n: usize) -> Self {
        Views(Arc::new(Mutex::new(vec![None; n])))
    }
    fn set(&self, i: usize, term: Option<&Leadership>) {
        self.0.lock().unwrap()[i] = term.map(|t| t.lost.clone());
    }
    fn leaders(&self) -> Vec<usize> {
        let v = self.0.lock().unwrap();
        (0..v.len()).filter(|i| v[*i].as_ref().is_some_and(|l| !*l.borrow())).collect()
    }
    /// Samples every 5 ms until `finish` is called on the result; that fails the test if two
    /// replicas led at one sampled instant.
    fn check_exclusive(&self) -> Sampler {
        let views = self.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = 0u64;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let leaders = views.leaders();
                assert!(leaders.len() <= 1, "two replicas lead at once: {leaders:?}");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        });
        Sampler { stop, task }
    }
    async fn wait_leader(&self, i: usize, within: Duration) -> Duration {
        let started = Instant::now();
        while !self.leaders().contains(&i) {
            assert!(started.elapsed() < within, "replica {i} did not lead within {within:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    }
}

struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    async fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self.task.await.expect("at most one leader at every sampled instant");
        assert!(samples > 100, "only {samples} samples");
    }
}

fn lease(api: &FakeApiServer) -> serde_json::Value {
    let all = api.objects("coordination.k8s.io/v1", "Lease");
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].clone()
}

/// Runs replica `i`'s campaign in the background and publishes the term it wins.
fn campaign(views: &Views, i: usize, e: LeaderElector) -> tokio::task::JoinHandle<Leadership> {
    let views = views.clone();
    tokio::spawn(async move {
        let term = e.campaign().await;
        views.set(i, Some(&term));
        term
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_lease_one_leader_then_failover_when_the_leader_stops() {
    let api = FakeApiServer::new();
    let views = Views::new(2);
    let sampler = views.check_exclusive();
    let a = campaign(&views, 0, elector(&api, "a")).await.unwrap();
    let l = lease(&api);
    assert_eq!(l["spec"]["holderIdentity"], "a");
    assert_eq!(l["spec"]["leaseDurationSeconds"], 2);
    assert!(l["spec"]["acquireTime"].is_string() && l["spec"]["renewTime"].is_string(), "{l}");
    let b = campaign(&views, 1, elector(&api, "b"));
    // a renews (every TTL/3) and b stays a follower for several TTLs.
    let rv_before = lease(&api)["metadata"]["resourceVersion"].clone();
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(views.leaders(), vec![0]);
    assert_ne!(lease(&api)["metadata"]["resourceVersion"], rv_before, "the leader renews");
    assert_eq!(lease(&api)["spec"]["holderIdentity"], "a");
    // a crashes: its renewals stop, nothing is released. b takes over once it has seen no
    // change for a whole TTL (plus up to one poll, TTL/3).
    views.set(0, None);
    drop(a);
    let took = views.wait_leader(1, TTL + TTL / 3 + Duration::from_secs(1)).await;
    assert!(took >= TTL - TTL / 3, "b took over after {took:?}, before a's lease could have expired");
    let b = b.await.unwrap();
    let l = lease(&api);
    assert_eq!(l["spec"]["holderIdentity"], "b");
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert!(b.leading());
    sampler.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_lease_leader_steps_down_before_the_other_takes_over_when_the_api_is_unreachable() {
    let api = FakeApiServer::new();
    let views = Views::new(2);
    let sampler = views.check_exclusive();
    let a = campaign(&views, 0, elector(&api, "a")).await.unwrap();
    let b = campaign(&views, 1, elector(&api, "b"));
    tokio::time::sleep(TTL / 2).await;
    // The API goes away for two TTLs: a cannot renew and must step down on its own clock,
    // within TTL - TTL/4 of its last renewal.
    let down_at = Instant::now();
    api.set_down(true);
    let mut lost = a.lost.clone();
    tokio::time::timeout(TTL, lost.wait_for(|l| *l)).await.expect("the leader stepped down within a TTL").unwrap();
    let stepped = down_at.elapsed();
    assert!(stepped <= TTL - TTL / 4 + Duration::from_millis(500), "stepped down {stepped:?} after the outage began");
    tokio::time::sleep(TTL * 2 - stepped).await;
    assert!(views.leaders().is_empty(), "nobody leads while the API is unreachable");
    api.set_down(false);
    // b polls every TTL/3; the bound is wide for a loaded machine.
    views.wait_leader(1, TTL * 3).await;
    let _b = b.await.unwrap();
    assert_eq!(lease(&api)["spec"]["holderIdentity"], "b");
    drop(a);
    sampler.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_lease_a_conflict_on_renewal_ends_the_term_and_a_transient_error_does_not() {
    let api = FakeApiServer::new();
    let a = elector(&api, "a").campaign().await;
    // Two failed renewals (500) are retried within the term.
    api.fail_next("update", "leases", 500, 2);
    tokio::time::sleep(TTL * 2).await;
    assert!(a.leading(), "two transient renewal failures ended the term");
    assert!(api.requests().iter().filter(|r| r.verb == "update" && r.status == 500).count() == 2);
    // A 409 Conflict means another writer changed the Lease: the term ends at once.
    api.fail_next("update", "leases", 409, 1);
    let mut lost = a.lost.clone();
    tokio::time::timeout(TTL / 3 + Duration::from_millis(500), lost.wait_for(|l| *l))
        .await
        .expect("a 409 on renewal ends the term at the next renewal")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_lease_clean_resign_releases_and_the_other_takes_over_at_once() {
    let api = FakeApiServer::new();
    let views = Views::new(2);
    let sampler = views.check_exclusive();
    let a = campaign(&views, 0, elector(&api, "a")).await.unwrap();
    let b = campaign(&views, 1, elector(&api, "b"));
    tokio::time::sleep(TTL).await;
    views.set(0, None);
    let resigned = Instant::now();
    a.resign().await;
    // b may already have taken the Lease, so the release is not always the last update.
    let updates: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.verb == "update" && r.resource == "leases")
        .filter_map(|r| r.body)
        .collect();
    assert!(
        updates.iter().any(|u| u["spec"].get("holderIdentity").is_none_or(|h| h.is_null())),
        "no update released the Lease: {updates:?}"
    );
    // b polls every TTL/3: it takes the released Lease at its next look, far sooner than a TTL.
    views.wait_leader(1, TTL / 3 + Duration::from_millis(500)).await;
    assert!(resigned.elapsed() < TTL);
    let _b = b.await.unwrap();
    let l = lease(&api);
    assert_eq!(l["spec"]["holderIdentity"], "b");
    sampler.finish().await;
}
