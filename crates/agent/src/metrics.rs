//! The agent's Prometheus metrics. Events (CNI calls, blocks, fdatasync, store errors) are
//! counted as they happen, process-wide; the state gauges (pool usage, pending attempts, store
//! reachability) are read from the node at scrape time, so a scrape costs the ADD path nothing
//! but one short hold of the node's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use allot_store::Store;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{AgentError, Node};

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// How many recent ADD latencies the status page shows.
pub const RECENT_ADDS: usize = 120;

struct Metrics {
    registry: Registry,
    cni: Family<Labels, Counter>,
    add_seconds: Histogram,
    received: Family<Labels, Counter>,
    released: Family<Labels, Counter>,
    block_wait: Histogram,
    fdatasync: Histogram,
    store_errors: Counter,
    /// (when, seconds) of the latest ADDs, newest last.
    recent: Mutex<VecDeque<(SystemTime, f64)>>,
    /// Since when each pool has had an ADD waiting for a block.
    waiting: Mutex<HashMap<String, Instant>>,
}

static M: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("allot");
    let cni = Family::<Labels, Counter>::default();
    registry.register(
        "cni_requests",
        "CNI calls served, by command (ADD, DEL, CHECK, GC), result (success, error) and the CNI error code the plugin returns (0 on success)",
        cni.clone(),
    );
    // Present from the start, so rate() and alerts see a zero rather than no series.
    for command in ["ADD", "DEL", "CHECK", "GC"] {
        let _ = cni.get_or_create(&vec![("command", command.to_string()), ("result", "success".to_string()), ("code", "0".to_string())]);
    }
    // 0.5 ms to about 16 s: an ADD may wait --add-wait (10 s) for a block.
    let add_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
    registry.register("cni_add_duration_seconds", "Time the agent took to answer an ADD, successful or not", add_seconds.clone());
    let received = Family::<Labels, Counter>::default();
    registry.register("blocks_received", "Blocks granted to this node, by pool", received.clone());
    let released = Family::<Labels, Counter>::default();
    registry.register("blocks_released", "Blocks this node gave back, by pool", released.clone());
    let block_wait = Histogram::new(exponential_buckets(0.005, 2.0, 14));
    registry.register(
        "block_grant_wait_seconds",
        "Time from an ADD finding its pool full on this node to the next block of that pool arriving",
        block_wait.clone(),
    );
    let fdatasync = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
    registry.register("journal_fdatasync_duration_seconds", "Time of each fdatasync of the allocation journal", fdatasync.clone());
    let store_errors = Counter::default();
    registry.register("store_errors", "Requests to the cluster store that failed (unreachable, timed out, backend error)", store_errors.clone());
    Metrics {
        registry,
        cni,
        add_seconds,
        received,
        released,
        block_wait,
        fdatasync,
        store_errors,
        recent: Mutex::new(VecDeque::new()),
        waiting: Mutex::new(HashMap::new()),
    }
});

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one CNI call, with the CNI code the plugin answers for its error.
pub fn cni<T>(command: &'static str, result: &Result<T, AgentError>) {
    let (outcome, code) = match result {
        Ok(_) => ("success", 0),
        Err(e) => ("error", e.kind().cni_code()),
    };
    M.cni
        .get_or_create(&vec![("command", command.to_string()), ("result", outcome.to_string()), ("code", code.to_string())])
        .inc();
}

/// Counts one ADD and records how long it took.
pub fn add<T>(started: Instant, result: &Result<T, AgentError>) {
    let secs = started.elapsed().as_secs_f64();
    M.add_seconds.observe(secs);
    cni("ADD", result);
    let mut recent = lock(&M.recent);
    if recent.len() == RECENT_ADDS {
        recent.pop_front();
    }
    recent.push_back((SystemTime::now(), secs));
}

/// The latest ADD latencies in seconds, oldest first.
pub fn recent_adds() -> Vec<(SystemTime, f64)> {
    lock(&M.recent).iter().copied().collect()
}

/// An ADD found `pool` full here: the wait for a block starts (if not already running).
pub fn pool_full(pool: &str) {
    lock(&M.waiting).entry(pool.to_string()).or_insert_with(Instant::now);
}

pub fn block_received(pool: &str) {
    M.received.get_or_create(&vec![("pool", pool.to_string())]).inc();
    if let Some(since) = lock(&M.waiting).remove(pool) {
        M.block_wait.observe(since.elapsed().as_secs_f64());
    }
}

pub fn block_released(pool: &str) {
    M.released.get_or_create(&vec![("pool", pool.to_string())]).inc();
}

pub fn fdatasync(took: Duration) {
    M.fdatasync.observe(took.as_secs_f64());
}

pub fn store_error() {
    M.store_errors.inc();
}

/// Allocations whose network namespace file is gone (what `allot gc` would release), or None
/// when no allocation's namespace is visible at all (the agent cannot see the host's
/// namespaces: counting them all as leaked would be wrong).
pub fn stale_allocations(netns: &[String]) -> Option<u64> {
    let with: Vec<_> = netns.iter().filter(|n| !n.is_empty()).collect();
    let stale = with.iter().filter(|n| !std::path::Path::new(n).exists()).count();
    (with.is_empty() || stale < with.len()).then_some(stale as u64)
}

/// Every agent metric (and the in-process operator's, standalone) in the OpenMetrics format,
/// without `# EOF`.
pub fn encode<S: Store>(node: &Node<S>, out: &mut String) {
    let status = node.status();
    let mut reg = Registry::with_prefix("allot");
    let pf = |p: &str, f: allot_core::Family| vec![("pool", p.to_string()), ("family", f.to_string())];
    let gauges = |reg: &mut Registry, name: &str, help: &str| {
        let g = Family::<Labels, FGauge>::default();
        reg.register(name, help, g.clone());
        g
    };
    let capacity = gauges(&mut reg, "pool_capacity_addresses", "Addresses in the pool's CIDRs, cluster-wide");
    let granted = gauges(&mut reg, "pool_blocks_granted", "Blocks of the pool granted to any node, as of this node's last read of the store");
    let blocks = gauges(&mut reg, "node_blocks", "Blocks this node holds");
    let usable = gauges(&mut reg, "node_addresses", "Usable addresses in the blocks this node holds");
    let allocated = gauges(&mut reg, "node_allocated_addresses", "Addresses allocated to pods on this node");
    let free = gauges(&mut reg, "node_free_addresses", "Free addresses in the blocks this node holds");
    let requested = gauges(&mut reg, "node_requested_addresses", "Addresses this node asks the operator to cover");
    let pending = gauges(&mut reg, "pending_attempts", "ADDs that found the pool full here and still count as demand");
    for p in &status.pools {
        let l = pf(&p.pool, p.family);
        capacity.get_or_create(&l).set(p.capacity.parse().unwrap_or(f64::NAN));
        granted.get_or_create(&l).set(p.blocks_cluster as f64);
        blocks.get_or_create(&l).set(p.blocks_node as f64);
        usable.get_or_create(&l).set(p.node_capacity.parse().unwrap_or(f64::NAN));
        allocated.get_or_create(&l).set(p.in_use as f64);
        free.get_or_create(&l).set(p.free.parse().unwrap_or(f64::NAN));
        requested.get_or_create(&l).set(p.requested as f64);
    }
    for (p, f, n) in node.pending_attempts() {
        pending.get_or_create(&pf(&p, f)).set(n as f64);
    }
    let single = |reg: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        reg.register(name, help, g);
    };
    let all = node.netns_paths();
    single(&mut reg, "allocations", "Pod allocations this node holds (one per container and interface)", all.len() as i64);
    if let Some(stale) = stale_allocations(&all) {
        single(&mut reg, "stale_allocations", "Allocations whose network namespace no longer exists: leaked unless a DEL or `allot gc` comes", stale as i64);
    }
    single(&mut reg, "store_reachable", "1 when the last request to the cluster store succeeded, else 0", i64::from(status.store.reachable));
    let ready = status.cni.as_ref().map_or(status.ready, |r| r.ready);
    single(&mut reg, "ready", "1 when the node can serve an ADD now (journal restored, pools known, room or a reachable store)", i64::from(ready));
    single(&mut reg, "route_failures", "Direct node routes that could not be installed", status.route_failures.len() as i64);
    let info = Family::<Labels, Gauge>::default();
    reg.register("build_info", "The agent's version and node name (always 1)", info.clone());
    info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string()), ("node", status.node.clone())]).set(1);

    encode_registry(out, &M.registry).expect("encoding to a String cannot fail");
    encode_registry(out, &reg).expect("encoding to a String cannot fail");
}

/// The agent's monitoring site: metrics, readiness and the status page of one node.
pub struct AgentSite<S> {
    pub node: Arc<Node<S>>,
}

impl<S: Store> crate::web::Site for AgentSite<S> {
    async fn metrics(&self) -> String {
        let mut out = String::with_capacity(8192);
        encode(&self.node, &mut out);
        // Standalone, the operator runs here: its metrics and the cluster's pools too.
        if allot_operator::metrics::active() {
            allot_operator::metrics::encode(&mut out);
            let view = crate::cluster_web::read_timed(&*self.node.store).await;
            crate::cluster_web::encode(&mut out, view.as_ref().ok());
        }
        encode_eof(&mut out).expect("encoding to a String cannot fail");
        out
    }

    async fn ready(&self) -> Result<(), String> {
        let s = self.node.status();
        match s.cni {
            Some(r) if !r.ready => Err(r.reason.unwrap_or_else(|| "not ready".into())),
            _ if !s.ready => Err("still restoring its allocations from the journal".into()),
            _ => Ok(()),
        }
    }

    async fn page(&self) -> String {
        let status = self.node.status();
        // Blocks per node come from the store; a slow or absent store leaves them out.
        let grants = if status.store.reachable {
            tokio::time::timeout(Duration::from_millis(500), self.node.store.grants()).await.ok().and_then(Result::ok)
        } else {
            None
        };
        crate::page::agent(&status, &self.node.pending_attempts(), grants.as_deref(), &recent_adds())
    }
}
