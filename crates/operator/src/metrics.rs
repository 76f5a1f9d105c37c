//! The operator's own metrics (grants, reconcile passes, leadership), process-wide. The
//! cluster's pool gauges are read from the store at scrape time by whoever serves them.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

struct Metrics {
    registry: Registry,
    leader: Gauge,
    granted: Family<Labels, Counter>,
    reconcile: Histogram,
    reconcile_errors: Counter,
    unmet: Gauge,
    removed_nodes: Counter,
}

static RUNNING: AtomicBool = AtomicBool::new(false);

static M: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("allot_operator");
    let leader = Gauge::default();
    registry.register("leader", "1 while this operator process leads (and so grants blocks), else 0", leader.clone());
    let granted = Family::<Labels, Counter>::default();
    registry.register("blocks_granted", "Blocks granted to nodes, by pool", granted.clone());
    let reconcile = Histogram::new(exponential_buckets(0.001, 2.0, 14));
    registry.register("reconcile_duration_seconds", "Time of one reconcile pass over every node", reconcile.clone());
    let reconcile_errors = Counter::default();
    registry.register("reconcile_errors", "Reconcile passes that failed on a store error", reconcile_errors.clone());
    let unmet = Gauge::default();
    registry.register("unmet_nodes", "Nodes whose request the last pass could not meet (pool exhausted or unknown)", unmet.clone());
    let removed_nodes = Counter::default();
    registry.register("departed_nodes_removed", "Nodes removed after their agent held no liveness lease for --node-gc-after", removed_nodes.clone());
    Metrics { registry, leader, granted, reconcile, reconcile_errors, unmet, removed_nodes }
});

/// Marks that the operator loop runs in this process (its metrics are worth serving).
pub(crate) fn running() {
    RUNNING.store(true, Ordering::Relaxed);
}

/// Whether the operator loop ever ran in this process.
pub fn active() -> bool {
    RUNNING.load(Ordering::Relaxed)
}

pub fn set_leader(leading: bool) {
    M.leader.set(i64::from(leading));
}

pub fn is_leader() -> bool {
    M.leader.get() == 1
}

pub(crate) fn granted(pool: &str) {
    M.granted.get_or_create(&vec![("pool", pool.to_string())]).inc();
}

pub(crate) fn reconciled(took: Duration, ok: bool, unmet: usize) {
    M.reconcile.observe(took.as_secs_f64());
    if ok {
        M.unmet.set(unmet as i64);
    } else {
        M.reconcile_errors.inc();
    }
}

pub(crate) fn removed_nodes(n: usize) {
    M.removed_nodes.inc_by(n as u64);
}

/// The operator's metrics in the OpenMetrics text format, without `# EOF`.
pub fn encode(out: &mut String) {
    encode_registry(out, &M.registry).expect("encoding to a String cannot fail");
}
