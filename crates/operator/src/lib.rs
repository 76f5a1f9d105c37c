//! The operator: reads what each node requests and grants whole blocks of the pool, the first
//! CIDR with room first, until the node's usable addresses cover the request. It never takes a
//! block from a node; nodes give blocks back themselves. Where the store tracks liveness it
//! removes nodes whose agents have been gone for `node_gc_after`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use allot_core::blocks::BlockMap;
use allot_core::{BlockGrant, Family, cidr};
use allot_store::{Store, StoreError};
use tokio::sync::watch;

pub mod metrics;

/// How often the operator reconciles even when nothing changed.
const RESYNC: Duration = Duration::from_secs(30);
/// Give up on a pool for this round after this many blocks in a row were taken by others.
const MAX_LOST_RACES: usize = 64;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub granted: Vec<BlockGrant>,
    /// Nodes whose requests could not be met, with the reason written to their status.
    pub errors: Vec<(String, String)>,
}

/// One pass over every node: grant what is missing, write each node's operator error.
pub async fn reconcile<S: Store>(store: &S) -> Result<Report, StoreError> {
    let pools = store.pools().await?;
    let grants = store.grants().await?;
    let nodes = store.nodes().await?;
    // Blocks still reserved to a deleted node count as taken.
    let reserved = store.released_blocks().await?;
    let taken: Vec<BlockGrant> = grants.iter().chain(&reserved).cloned().collect();
    let mut blocks = BlockMap::new(&pools, &taken);
    let pools: HashMap<&str, _> = pools.iter().map(|p| (p.name.as_str(), &p.spec)).collect();
    let mut held: HashMap<(&str, &str, Family), u128> = HashMap::new();
    for g in &grants {
        *held.entry((&g.node, &g.pool, Family::of(&g.cidr))).or_default() += cidr::usable_count(&g.cidr);
    }

    let mut report = Report::default();
    for node in &nodes {
        let mut problems = Vec::new();
        for req in &node.requested {
            let Some(spec) = pools.get(req.pool.as_str()) else {
                problems.push(format!("pool {:?} does not exist", req.pool));
                continue;
            };
            for family in Family::ALL {
                let needed = u128::from(req.needed.get(family));
                if needed == 0 {
                    continue;
                }
                if spec.family(family).is_none() {
                    problems.push(format!("pool {:?} has no {family} CIDRs", req.pool));
                    continue;
                }
                let mut have = held.get(&(node.name.as_str(), req.pool.as_str(), family)).copied().unwrap_or(0);
                let free = blocks.pool_mut(&req.pool, family).expect("every pool family is in the map");
                let mut lost = 0;
                while have < needed {
                    let Some(block) = free.take_next() else {
                        problems.push(format!(
                            "pool {:?} has no free {family} block left: node needs {} more addresses; add CIDRs to the pool",
                            req.pool,
                            needed - have
                        ));
                        break;
                    };
                    let grant = BlockGrant { pool: req.pool.clone(), cidr: block, node: node.name.clone() };
                    if store.grant_block(&grant).await? {
                        tracing::info!(node = %node.name, pool = %req.pool, block = %block, "granted block");
                        metrics::granted(&req.pool);
                        have += cidr::usable_count(&block);
                        report.granted.push(grant);
                        lost = 0;
                    } else {
                        // Another writer took it, or the pool changed under us: try the next one.
                        lost += 1;
                        if lost >= MAX_LOST_RACES {
                            problems.push(format!("pool {:?}: lost {lost} block races in a row; retrying", req.pool));
                            break;
                        }
                    }
                }
            }
        }
        let error = (!problems.is_empty()).then(|| problems.join("; "));
        if error != node.operator_error {
            store.set_operator_error(&node.name, error.clone()).await?;
        }
        if let Some(e) = error {
            report.errors.push((node.name.clone(), e));
        }
    }
    Ok(report)
}

/// How the operator treats departed nodes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A node whose agent has held no liveness lease for this long is deleted (its blocks
    /// released, reserved to it for the store's release grace).
    pub node_gc_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { node_gc_after: Duration::from_secs(600) }
    }
}

/// Since when each node has been seen without a liveness lease. Kept in memory: a new leader
/// starts counting afresh, which only delays a removal.
#[derive(Debug, Default)]
pub struct Departures {
    since: HashMap<String, Instant>,
}

impl Departures {
    /// Deletes nodes gone for `after`; returns the deleted nodes and when to look again.
    pub async fn collect<S: Store>(
        &mut self,
        store: &S,
        after: Duration,
        now: Instant,
    ) -> Result<(Vec<String>, Option<Instant>), StoreError> {
        let Some(live) = store.live_nodes().await? else { return Ok((Vec::new(), None)) };
        let nodes = store.nodes().await?;
        self.since.retain(|n, _| !live.contains(n) && nodes.iter().any(|r| &r.name == n));
        let mut deleted = Vec::new();
        let mut next: Option<Instant> = None;
        for node in nodes.iter().filter(|n| !live.contains(&n.name)) {
            let since = *self.since.entry(node.name.clone()).or_insert(now);
            let due = since + after;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            match store.delete_node(&node.name).await {
                Ok(released) => {
                    tracing::info!(node = %node.name, blocks = released.len(), gone_for = ?now - since, "removed departed node");
                    self.since.remove(&node.name);
                    deleted.push(node.name.clone());
                }
                // Its agent came back between the read and the delete.
                Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => {
                    self.since.remove(&node.name);
                }
                Err(e) => return Err(e),
            }
        }
        Ok((deleted, next))
    }
}

/// Reconciles on every change of the store (and every 30 s) until `shutdown` turns true.
pub async fn run<S: Store>(store: std::sync::Arc<S>, shutdown: watch::Receiver<bool>) {
    run_with(store, Options::default(), shutdown).await
}

/// `run` with options.
pub async fn run_with<S: Store>(store: std::sync::Arc<S>, opts: Options, mut shutdown: watch::Receiver<bool>) {
    let mut changes = store.watch();
    let mut departures = Departures::default();
    metrics::running();
    loop {
        changes.borrow_and_update();
        let mut wake = tokio::time::Instant::now() + RESYNC;
        match departures.collect(&*store, opts.node_gc_after, Instant::now()).await {
            Ok((gone, next)) => {
                metrics::removed_nodes(gone.len());
                if let Some(next) = next {
                    wake = wake.min(tokio::time::Instant::from_std(next));
                }
            }
            Err(e) => tracing::warn!(error = %e, "removing departed nodes failed; retrying"),
        }
        let started = Instant::now();
        let result = reconcile(&*store).await;
        metrics::reconciled(started.elapsed(), result.is_ok(), result.as_ref().map_or(0, |r| r.errors.len()));
        match result {
            Ok(r) => {
                for (node, e) in &r.errors {
                    tracing::warn!(node = %node, error = %e, "cannot meet node's request");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "operator reconcile failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
