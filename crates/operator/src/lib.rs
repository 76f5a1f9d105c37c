//! The operator: reads what each node requests and grants whole blocks of the pool, the first
//! CIDR with room first, until the node's usable addresses cover the request. It never takes a
//! block from a node; nodes give blocks back themselves. Where the store tracks liveness it
//! removes nodes whose agents have been gone for `node_gc_after`.
//!
//! It reads the store once (`snapshot`) and then follows its events: each change marks the
//! nodes it concerns (a request or a holding changed; every node when a pool changed), and a
//! pass reconciles only those, granting their blocks in batched transactions.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use allot_core::blocks::BlockMap;
use allot_core::{BlockGrant, Family, cidr};
use allot_store::{Change, ClusterView, Snapshot, Store, StoreError, StoreEvent};
use tokio::sync::{broadcast, watch};

pub mod metrics;

/// How often the operator reconciles every node from its view even when nothing changed.
const RESYNC: Duration = Duration::from_secs(30);
/// How often it reads the whole store again, in case its view drifted.
const FULL_READ: Duration = Duration::from_secs(300);
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
    Operator::new(store.snapshot().await?).reconcile(store).await
}

/// The operator's view of the cluster, the free blocks, and which nodes need a look.
pub struct Operator {
    pub view: ClusterView,
    blocks: BlockMap,
    dirty: BTreeSet<String>,
    all_dirty: bool,
}

/// One (node, pool, family) whose held addresses must cover `needed`.
struct Need {
    node: String,
    pool: String,
    family: Family,
    needed: u128,
    have: u128,
    lost: usize,
    done: bool,
}

impl Operator {
    pub fn new(snapshot: Snapshot) -> Self {
        let view = ClusterView::new(snapshot, None);
        let blocks = BlockMap::new(&view.pool_list(), &view.taken());
        Operator { view, blocks, dirty: BTreeSet::new(), all_dirty: true }
    }

    /// Takes in changes newer than the view and marks the nodes they concern.
    pub fn apply(&mut self, changes: &[(u64, Change)]) {
        let base = self.view.revision;
        let mut pools_changed = false;
        for (rev, change) in changes.iter().filter(|(rev, _)| *rev > base) {
            match change {
                Change::Node { name, record } => {
                    let old = self.view.nodes.get(name).map(|r| &r.requested);
                    if old != record.as_ref().map(|r| &r.requested) {
                        self.dirty.insert(name.clone());
                    }
                }
                Change::Block { pool, cidr, node } => {
                    if let Some(old) = self.view.blocks.get(&(pool.clone(), *cidr)) {
                        self.dirty.insert(old.clone());
                    }
                    self.dirty.extend(node.iter().cloned());
                }
                Change::Pool { .. } => pools_changed = true,
                _ => {}
            }
            self.view.apply_change(change);
            self.view.advance(*rev);
            // Keep the free blocks in step: a block is taken while held or reserved.
            match change {
                Change::Block { pool, cidr, .. } | Change::Released { pool, cidr, .. } => {
                    let key = (pool.clone(), *cidr);
                    if let Some(pb) = self.blocks.pool_mut(pool, Family::of(cidr)) {
                        if self.view.blocks.contains_key(&key) || self.view.released.contains_key(&key) {
                            pb.mark_taken(cidr);
                        } else {
                            pb.release(cidr);
                        }
                    }
                }
                _ => {}
            }
        }
        if pools_changed {
            self.blocks = BlockMap::new(&self.view.pool_list(), &self.view.taken());
            self.all_dirty = true;
        }
    }

    /// Reconciles every node at the next pass.
    pub fn mark_all(&mut self) {
        self.all_dirty = true;
    }

    /// Grants what the marked nodes miss, writes their operator errors.
    pub async fn reconcile<S: Store>(&mut self, store: &S) -> Result<Report, StoreError> {
        let r = self.reconcile_marked(store).await;
        if r.is_err() {
            // Some writes may not have happened: look at everything again next time.
            self.all_dirty = true;
        }
        r
    }

    async fn reconcile_marked<S: Store>(&mut self, store: &S) -> Result<Report, StoreError> {
        let names: Vec<String> = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            self.view.nodes.keys().cloned().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().filter(|n| self.view.nodes.contains_key(n)).collect()
        };
        let mut report = Report::default();
        if names.is_empty() {
            return Ok(report);
        }
        let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let mut held: HashMap<(&str, &str, Family), u128> = HashMap::new();
        for ((pool, block), node) in &self.view.blocks {
            if wanted.contains(node.as_str()) {
                *held.entry((node, pool, Family::of(block))).or_default() += cidr::usable_count(block);
            }
        }
        let mut problems: HashMap<&str, Vec<String>> = HashMap::new();
        let mut needs = Vec::new();
        for name in &names {
            let node = &self.view.nodes[name];
            let problems = problems.entry(name).or_default();
            for req in &node.requested {
                let Some(spec) = self.view.pools.get(&req.pool) else {
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
                    let have = held.get(&(name.as_str(), req.pool.as_str(), family)).copied().unwrap_or(0);
                    if have < needed {
                        needs.push(Need { node: name.clone(), pool: req.pool.clone(), family, needed, have, lost: 0, done: false });
                    }
                }
            }
        }
        // Rounds: take blocks for every need, grant them in batches; a lost race takes the
        // next free block in the next round.
        loop {
            let mut batch: Vec<(usize, BlockGrant)> = Vec::new();
            for (i, need) in needs.iter_mut().enumerate().filter(|(_, n)| !n.done) {
                let free = self.blocks.pool_mut(&need.pool, need.family).expect("every pool family is in the map");
                let mut planned = need.have;
                while planned < need.needed {
                    let Some(block) = free.take_next() else {
                        problems.get_mut(need.node.as_str()).expect("listed above").push(format!(
                            "pool {:?} has no free {} block left: node needs {} more addresses; add CIDRs to the pool",
                            need.pool,
                            need.family,
                            need.needed - planned
                        ));
                        need.done = true;
                        break;
                    };
                    planned += cidr::usable_count(&block);
                    batch.push((i, BlockGrant { pool: need.pool.clone(), cidr: block, node: need.node.clone() }));
                }
            }
            if batch.is_empty() {
                break;
            }
            let grants: Vec<BlockGrant> = batch.iter().map(|(_, g)| g.clone()).collect();
            let outcomes = store.grant_blocks(&grants).await?;
            for ((i, grant), ok) in batch.into_iter().zip(outcomes) {
                let need = &mut needs[i];
                if ok {
                    tracing::info!(node = %grant.node, pool = %grant.pool, block = %grant.cidr, "granted block");
                    need.have += cidr::usable_count(&grant.cidr);
                    need.lost = 0;
                    self.view.note_granted(&grant);
                    metrics::granted(&grant.pool);
                    report.granted.push(grant);
                } else {
                    // Another writer took it, or the pool changed under us: try the next one.
                    need.lost += 1;
                    if need.lost >= MAX_LOST_RACES && !need.done {
                        need.done = true;
                        problems
                            .get_mut(need.node.as_str())
                            .expect("listed above")
                            .push(format!("pool {:?}: lost {} block races in a row; retrying", need.pool, need.lost));
                    }
                }
            }
            for need in needs.iter_mut() {
                need.done |= need.have >= need.needed;
            }
        }
        for name in &names {
            let problems = problems.remove(name.as_str()).unwrap_or_default();
            let error = (!problems.is_empty()).then(|| problems.join("; "));
            let Some(record) = self.view.nodes.get_mut(name) else { continue };
            if error != record.operator_error {
                store.set_operator_error(name, error.clone()).await?;
                record.operator_error = error.clone();
            }
            if let Some(e) = error {
                report.errors.push((name.clone(), e));
            }
        }
        Ok(report)
    }
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
    /// Liveness and nodes come from `view`; only a removal touches the store.
    pub async fn collect<S: Store>(
        &mut self,
        store: &S,
        view: &ClusterView,
        after: Duration,
        now: Instant,
    ) -> Result<(Vec<String>, Option<Instant>), StoreError> {
        let Some(live) = &view.live else { return Ok((Vec::new(), None)) };
        let nodes = view.nodes.values();
        self.since.retain(|n, _| !live.contains(n) && view.nodes.contains_key(n));
        let mut deleted = Vec::new();
        let mut next: Option<Instant> = None;
        for node in nodes.filter(|n| !live.contains(&n.name)) {
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
    // Subscribed before the first read: nothing between the read and the events is missed.
    let mut events = store.events();
    let mut departures = Departures::default();
    metrics::running();
    let mut op: Option<(Operator, Instant)> = None;
    loop {
        if op.as_ref().is_none_or(|(_, read)| read.elapsed() >= FULL_READ) {
            match store.snapshot().await {
                Ok(s) => op = Some((Operator::new(s), Instant::now())),
                Err(e) => {
                    tracing::warn!(error = %e, "operator cannot read the cluster store; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
        let (o, _) = op.as_mut().expect("read above");
        let mut wake = tokio::time::Instant::now() + RESYNC;
        match departures.collect(&*store, &o.view, opts.node_gc_after, Instant::now()).await {
            Ok((gone, next)) => {
                metrics::removed_nodes(gone.len());
                if let Some(next) = next {
                    wake = wake.min(tokio::time::Instant::from_std(next));
                }
            }
            Err(e) => tracing::warn!(error = %e, "removing departed nodes failed; retrying"),
        }
        let started = Instant::now();
        let result = o.reconcile(&*store).await;
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
        let first = tokio::select! {
            e = events.recv() => Some(e),
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep_until(wake) => None,
        };
        if *shutdown.borrow() {
            return;
        }
        let Some(first) = first else {
            o.mark_all();
            continue;
        };
        // Take in the whole burst before the next pass.
        let mut next = Some(first);
        while let Some(e) = next {
            match e {
                Ok(StoreEvent::Changes(c)) => o.apply(&c),
                Ok(StoreEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    op = None;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            next = match events.try_recv() {
                Ok(e) => Some(Ok(e)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
                Err(broadcast::error::TryRecvError::Closed) => Some(Err(broadcast::error::RecvError::Closed)),
                Err(broadcast::error::TryRecvError::Empty) => None,
            };
        }
    }
}
