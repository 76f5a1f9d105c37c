//! The node's allocation logic: ADD, DEL, CHECK, GC against in-memory state mirrored by the
//! durable records, plus the loops that keep demand, blocks and caches in step with the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use allot_core::demand::{self, Pending};
use allot_core::node_alloc::{MarkError, NodeAllocator};
use allot_core::select::{self, Source};
use allot_core::{BlockGrant, Family, PoolSpec};
use allot_store::{Annotations, Store, StoreError};
use allot_wire::{
    AddRequest, AllocatedIp, Allocation, Attachment, GcResponse, Needed, Owner, PoolRequest, PoolStatus, Status,
};
use ipnet::IpNet;
use tokio::sync::{Notify, watch};

use crate::AgentError;
use crate::config::AgentConfig;
use crate::records::{Op, Records};

/// How soon after a change the node's demand is written to the store.
const DEMAND_DEBOUNCE: Duration = Duration::from_millis(50);

struct State {
    alloc: NodeAllocator,
    owners: HashMap<Owner, Allocation>,
    /// At most one failed attempt per owner: the pool that was full.
    pending: Pending<Owner>,
    pools: BTreeMap<String, PoolSpec>,
    namespaces: BTreeMap<String, Annotations>,
    operator_error: Option<String>,
    /// Blocks may be given back only once every stored allocation has been marked.
    restored: bool,
}

enum Taken {
    Existing(Allocation),
    New(Allocation),
    Full(String),
}

pub struct Node<S> {
    pub(crate) cfg: AgentConfig,
    pub(crate) store: Arc<S>,
    state: Mutex<State>,
    records: Records,
    /// Woken when a block arrives or an address is freed: waiting ADDs retry.
    room_changed: Notify,
    demand_changed: Notify,
    /// Serialises reading the node's blocks from the store with giving blocks back, so a
    /// refresh that read the grants before a release cannot re-add the released block.
    blocks_sync: tokio::sync::Mutex<()>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl<S: Store> Node<S> {
    /// Opens the records, registers the node, loads the cluster view, and restores every stored
    /// allocation into the allocator.
    pub async fn start(cfg: AgentConfig, store: Arc<S>) -> Result<Arc<Self>, AgentError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| AgentError::Internal(format!("creating data dir {}: {e}", cfg.data_dir.display())))?;
        let (records, stored) = Records::open(&cfg.data_dir.join("allocations.journal")).map_err(|e| AgentError::Internal(e.to_string()))?;
        store.register_node(&cfg.node, cfg.node_ip).await?;
        let node = Arc::new(Node {
            state: Mutex::new(State {
                alloc: NodeAllocator::new(),
                owners: HashMap::new(),
                pending: Pending::new(cfg.pending_ttl),
                pools: BTreeMap::new(),
                namespaces: BTreeMap::new(),
                operator_error: None,
                restored: false,
            }),
            cfg,
            store,
            records,
            room_changed: Notify::new(),
            demand_changed: Notify::new(),
            blocks_sync: tokio::sync::Mutex::new(()),
        });
        node.refresh().await?;
        node.restore(stored).await?;
        Ok(node)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn restore(&self, stored: Vec<Allocation>) -> Result<(), AgentError> {
        let started = Instant::now();
        let count = stored.len();
        // Addresses whose block this node does not hold (yet): retried after re-claiming.
        let mut unplaced: Vec<(String, std::net::IpAddr, Owner)> = Vec::new();
        let mut missing: Vec<(String, IpNet)> = Vec::new();
        {
            let mut st = self.lock();
            for a in &stored {
                for ip in &a.ips {
                    match st.alloc.mark_used(&ip.pool, ip.address.addr()) {
                        Ok(()) => {}
                        Err(MarkError::NoBlock { .. }) => {
                            unplaced.push((ip.pool.clone(), ip.address.addr(), a.owner.clone()));
                            if let Some(spec) = st.pools.get(&ip.pool).and_then(|p| p.family(Family::of(&ip.address)))
                                && let Ok(block) = IpNet::new(ip.address.addr(), spec.mask_size)
                            {
                                missing.push((ip.pool.clone(), block.trunc()));
                            }
                        }
                        Err(e @ MarkError::AlreadyUsed { .. }) => {
                            tracing::error!(owner = %a.owner, error = %e, "two stored allocations hold one address");
                        }
                    }
                }
            }
        }
        // An address whose block the node no longer holds: take the block back if it is free, so
        // the address cannot be handed to another node.
        missing.sort();
        missing.dedup();
        for (pool, block) in missing {
            let grant = BlockGrant { pool: pool.clone(), cidr: block, node: self.cfg.node.clone() };
            if self.store.grant_block(&grant).await? {
                tracing::warn!(%pool, %block, "re-claimed a block that holds restored allocations");
                self.lock().alloc.add_block_with(&pool, block, self.cfg.reserve_gateway);
            } else {
                tracing::error!(%pool, %block, "restored allocations lie in a block this node cannot hold");
            }
        }
        let mut st = self.lock();
        for (pool, ip, owner) in unplaced {
            if let Err(e) = st.alloc.mark_used(&pool, ip) {
                tracing::error!(%owner, error = %e, "restored allocation is outside this node's blocks");
            }
        }
        for a in stored {
            st.owners.insert(a.owner.clone(), a);
        }
        st.restored = true;
        drop(st);
        tracing::info!(allocations = count, elapsed = ?started.elapsed(), "restored allocations");
        self.demand_changed.notify_one();
        Ok(())
    }

    /// Re-reads pools, namespaces, this node's blocks and operator status from the store.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let _sync = self.blocks_sync.lock().await;
        let pools = self.store.pools().await?;
        let namespaces = self.store.namespaces().await?;
        let grants = self.store.grants().await?;
        let record = self.store.nodes().await?.into_iter().find(|n| n.name == self.cfg.node);
        if record.is_none() {
            // The node was deleted while this agent runs: register it again, with its demand.
            tracing::warn!(node = %self.cfg.node, "node record missing; registering again");
            self.store.register_node(&self.cfg.node, self.cfg.node_ip).await?;
            let requested = self.requested(&self.lock());
            self.store.set_requested(&self.cfg.node, requested).await?;
        }
        let mine: HashSet<(&str, IpNet)> =
            grants.iter().filter(|g| g.node == self.cfg.node).map(|g| (g.pool.as_str(), g.cidr)).collect();
        let (added, in_use_lost) = self.apply_view(pools, namespaces, record, &mine);
        for (pool, block) in in_use_lost {
            let grant = BlockGrant { pool: pool.clone(), cidr: block, node: self.cfg.node.clone() };
            if self.store.grant_block(&grant).await? {
                tracing::warn!(%pool, %block, "re-claimed a block that was taken from this node while in use");
                self.lock().alloc.set_draining(&pool, &block, false);
            } else {
                tracing::error!(%pool, %block, "a block this node still uses is held elsewhere; no new addresses from it");
            }
        }
        if added {
            self.room_changed.notify_waiters();
        }
        Ok(())
    }

    /// Puts a fresh read of the store into the node's state; returns whether blocks arrived,
    /// and the blocks lost while pods still use them.
    fn apply_view(
        &self,
        pools: Vec<allot_core::Pool>,
        namespaces: BTreeMap<String, Annotations>,
        record: Option<allot_store::NodeRecord>,
        mine: &HashSet<(&str, IpNet)>,
    ) -> (bool, Vec<(String, IpNet)>) {
        let mut st = self.lock();
        st.pools = pools.into_iter().map(|p| (p.name, p.spec)).collect();
        st.namespaces = namespaces;
        st.operator_error = record.and_then(|r| r.operator_error);
        let mut added = false;
        for (pool, block) in mine {
            // Refresh and release never interleave, so a draining block held here is one that
            // was lost earlier and is this node's again.
            st.alloc.set_draining(pool, block, false);
            if !st.alloc.holds(pool, block) {
                st.alloc.add_block_with(pool, *block, self.cfg.reserve_gateway);
                tracing::info!(%pool, %block, "block added");
                added = true;
            }
        }
        let gone: Vec<(String, IpNet)> = st
            .alloc
            .block_list()
            .filter(|(p, b)| !b.draining && !mine.contains(&(*p, b.net)))
            .map(|(p, b)| (p.to_string(), b.net))
            .collect();
        let mut in_use_lost = Vec::new();
        for (pool, block) in gone {
            if st.alloc.remove_block(&pool, &block) {
                tracing::warn!(%pool, %block, "block no longer held by this node; dropped");
            } else {
                // Pods still hold addresses in it: hand out nothing more from it, and take it
                // back below if nobody else holds it now.
                st.alloc.set_draining(&pool, &block, true);
                in_use_lost.push((pool, block));
            }
        }
        (added, in_use_lost)
    }

    /// Chooses the pool of each family for an ADD.
    fn choose(&self, st: &State, req: &AddRequest) -> Result<Vec<(Family, String)>, AgentError> {
        let ns = req.pod.namespace.as_deref().and_then(|ns| st.namespaces.get(ns));
        let mut out = Vec::new();
        let mut missing_default = false;
        for family in Family::ALL {
            let (pool, source) = select::select_pool(
                family,
                req.pool.as_deref(),
                |k| req.annotations.get(k).map(String::as_str),
                |k| ns.and_then(|m| m.get(k)).map(String::as_str),
                &self.cfg.default_pool,
            );
            let Some(spec) = st.pools.get(pool) else {
                if source == Source::Default {
                    missing_default = true;
                    continue;
                }
                return Err(AgentError::TryAgain(format!(
                    "pool {pool:?} (from {source}) does not exist: create it with `allot pool apply`"
                )));
            };
            if spec.family(family).is_some() {
                out.push((family, pool.to_string()));
            } else if matches!(source, Source::PodAnnotation(k) | Source::NamespaceAnnotation(k) if k == select::family_annotation(family)) {
                return Err(AgentError::Invalid(format!("pool {pool:?} (from {source}) has no {family} CIDRs")));
            }
        }
        if out.is_empty() {
            return Err(if missing_default {
                AgentError::TryAgain(format!(
                    "default pool {:?} does not exist and no annotation names another pool: create it with `allot pool apply`",
                    self.cfg.default_pool
                ))
            } else {
                AgentError::Invalid("the chosen pools have no CIDRs".into())
            });
        }
        Ok(out)
    }

    /// ADD: the owner's addresses, allocating them if it has none. Answers only once the
    /// allocation is durable; waits up to `add_wait` for a block when the node's blocks are full.
    pub async fn add(&self, req: AddRequest) -> Result<Allocation, AgentError> {
        let deadline = tokio::time::Instant::now() + self.cfg.add_wait;
        loop {
            let room_changed = self.room_changed.notified();
            tokio::pin!(room_changed);
            room_changed.as_mut().enable();
            match self.try_take(&req)? {
                Taken::Existing(a) => {
                    // The first ADD may still be committing: writing the same record again
                    // returns only once it is on disk.
                    self.records.apply(vec![Op::Put(a.clone())]).await.map_err(|e| AgentError::Internal(e.to_string()))?;
                    return Ok(a);
                }
                Taken::New(a) => {
                    self.demand_changed.notify_one();
                    return self.commit_new(a).await;
                }
                Taken::Full(pool) => {
                    self.demand_changed.notify_one();
                    if tokio::time::timeout_at(deadline, room_changed).await.is_err() {
                        let op_err = self.lock().operator_error.clone();
                        let why = op_err.map(|e| format!(" (operator: {e})")).unwrap_or_default();
                        return Err(AgentError::TryAgain(format!(
                            "pool {pool:?} has no free address on node {:?} and no new block arrived within {:?}{why}; try again later",
                            self.cfg.node, self.cfg.add_wait
                        )));
                    }
                }
            }
        }
    }

    /// One attempt under the lock: the owner's existing allocation, a new one, or the pool
    /// that is full (recorded as pending demand).
    fn try_take(&self, req: &AddRequest) -> Result<Taken, AgentError> {
        let mut st = self.lock();
        if let Some(existing) = st.owners.get(&req.owner) {
            return Ok(Taken::Existing(existing.clone()));
        }
        let choice = self.choose(&st, req)?;
        match take_addresses(&mut st, &choice) {
            Ok(ips) => {
                st.pending.clear(&req.owner);
                let a = Allocation {
                    owner: req.owner.clone(),
                    netns: req.netns.clone(),
                    pod: req.pod.clone(),
                    ips,
                    created: now_unix(),
                };
                st.owners.insert(a.owner.clone(), a.clone());
                Ok(Taken::New(a))
            }
            Err(pool) => {
                let families = choice.iter().filter(|(_, p)| *p == pool).map(|(f, _)| *f).collect();
                st.pending.record(req.owner.clone(), &pool, families, Instant::now());
                Ok(Taken::Full(pool))
            }
        }
    }

    async fn commit_new(&self, a: Allocation) -> Result<Allocation, AgentError> {
        match self.records.apply(vec![Op::Put(a.clone())]).await {
            Ok(()) => Ok(a),
            Err(e) => {
                let mut st = self.lock();
                if st.owners.get(&a.owner) == Some(&a) {
                    st.owners.remove(&a.owner);
                    for ip in &a.ips {
                        st.alloc.release(&ip.pool, ip.address.addr());
                    }
                }
                Err(AgentError::Internal(e.to_string()))
            }
        }
    }

    /// DEL: forgets the owner durably, then frees its addresses. Unknown owners succeed.
    pub async fn del(&self, owner: &Owner) -> Result<Option<Allocation>, AgentError> {
        Ok(self.release_owners(std::slice::from_ref(owner)).await?.into_iter().next())
    }

    /// Removes owners in one durable write; their addresses are freed only after it.
    async fn release_owners(&self, owners: &[Owner]) -> Result<Vec<Allocation>, AgentError> {
        let taken: Vec<Allocation> = {
            let mut st = self.lock();
            owners
                .iter()
                .filter_map(|o| {
                    st.pending.clear(o);
                    st.owners.remove(o)
                })
                .collect()
        };
        if taken.is_empty() {
            return Ok(taken);
        }
        let ops = taken.iter().map(|a| Op::Delete(a.owner.clone())).collect();
        if let Err(e) = self.records.apply(ops).await {
            let mut st = self.lock();
            for a in taken {
                st.owners.entry(a.owner.clone()).or_insert(a);
            }
            return Err(AgentError::Internal(e.to_string()));
        }
        {
            let mut st = self.lock();
            for a in &taken {
                for ip in &a.ips {
                    st.alloc.release(&ip.pool, ip.address.addr());
                }
            }
        }
        self.room_changed.notify_waiters();
        self.demand_changed.notify_one();
        Ok(taken)
    }

    pub fn check(&self, owner: &Owner) -> Option<Allocation> {
        self.lock().owners.get(owner).cloned()
    }

    /// GC: within `network`, releases every owner not in `valid`.
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<GcResponse, AgentError> {
        let valid: HashSet<(&str, &str)> = valid.iter().map(|a| (a.container_id.as_str(), a.ifname.as_str())).collect();
        let stale: Vec<Owner> = self
            .lock()
            .owners
            .keys()
            .filter(|o| o.network == network && !valid.contains(&(o.container_id.as_str(), o.ifname.as_str())))
            .cloned()
            .collect();
        let released = self.release_owners(&stale).await?;
        for a in &released {
            tracing::info!(owner = %a.owner, "gc released");
        }
        Ok(GcResponse { released: released.into_iter().map(|a| a.owner).collect() })
    }

    /// `allot gc`: releases allocations whose network namespace no longer exists.
    pub async fn sweep(&self, dry_run: bool) -> Result<GcResponse, AgentError> {
        let stale: Vec<Owner> = self
            .lock()
            .owners
            .values()
            .filter(|a| !a.netns.is_empty() && !std::path::Path::new(&a.netns).exists())
            .map(|a| a.owner.clone())
            .collect();
        if dry_run {
            return Ok(GcResponse { released: stale });
        }
        let released = self.release_owners(&stale).await?;
        Ok(GcResponse { released: released.into_iter().map(|a| a.owner).collect() })
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        let mut v: Vec<Allocation> = self.lock().owners.values().cloned().collect();
        v.sort_by(|a, b| a.owner.cmp(&b.owner));
        v
    }

    /// Pod addresses the node needs per pool and family, by the seed's formula.
    fn pod_demand(&self, st: &State) -> Vec<(String, Family, u64)> {
        let mut out = Vec::new();
        for (name, spec) in &st.pools {
            for (family, _) in spec.families() {
                let in_use = st.alloc.usage(name, family).in_use as u64;
                let pending = st.pending.count(name, family);
                out.push((name.clone(), family, demand::needed(in_use, pending, self.cfg.pre_alloc(name))));
            }
        }
        out
    }

    /// What the node asks the operator for. The operator counts every usable address of a
    /// block; with a gateway reserved in each block, the pod demand grows by one address for
    /// every block it takes to hold it.
    fn requested(&self, st: &State) -> Vec<PoolRequest> {
        let mut out: Vec<PoolRequest> = Vec::new();
        for (pool, family, pods) in self.pod_demand(st) {
            let mut needed = pods;
            if self.cfg.reserve_gateway
                && let Some(spec) = st.pools.get(&pool).and_then(|p| p.family(family))
            {
                let block = allot_core::cidr::net_from(family, 0, spec.mask_size);
                let per_block = allot_core::cidr::usable_count(&block);
                if allot_core::cidr::skips_edges(&block) && per_block > 1 {
                    needed += pods.div_ceil((per_block - 1).min(u128::from(u64::MAX)) as u64);
                }
            }
            if needed == 0 {
                continue;
            }
            match out.iter_mut().find(|r| r.pool == pool) {
                Some(r) => r.needed.set(family, needed),
                None => {
                    let mut n = Needed::default();
                    n.set(family, needed);
                    out.push(PoolRequest { pool, needed: n });
                }
            }
        }
        out
    }

    pub async fn status(&self) -> Result<Status, AgentError> {
        let grants = self.store.grants().await?;
        let st = self.lock();
        let requested = self.requested(&st);
        let mut pools = Vec::new();
        for (name, spec) in &st.pools {
            for (family, _) in spec.families() {
                let u = st.alloc.usage(name, family);
                let cluster = grants.iter().filter(|g| g.pool == *name && Family::of(&g.cidr) == family).count();
                pools.push(PoolStatus {
                    pool: name.clone(),
                    family,
                    capacity: spec.capacity(family).to_string(),
                    blocks_cluster: cluster as u64,
                    blocks_node: u.blocks as u64,
                    node_capacity: u.capacity.to_string(),
                    in_use: u.in_use as u64,
                    free: u.capacity.saturating_sub(u.in_use).to_string(),
                    requested: requested.iter().find(|r| r.pool == *name).map_or(0, |r| r.needed.get(family)),
                });
            }
        }
        Ok(Status { node: self.cfg.node.clone(), ready: st.restored, pools })
    }

    /// Keeps the node's `requested` in the store current, gives back blocks the demand no longer
    /// needs, and expires pending attempts.
    pub async fn demand_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut written: Option<Vec<PoolRequest>> = None;
        loop {
            tokio::select! {
                _ = self.demand_changed.notified() => tokio::time::sleep(DEMAND_DEBOUNCE).await,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            let requested = {
                let mut st = self.lock();
                st.pending.expire(Instant::now());
                self.requested(&st)
            };
            if written.as_ref() != Some(&requested) {
                match self.store.set_requested(&self.cfg.node, requested.clone()).await {
                    Ok(()) => written = Some(requested),
                    Err(e) => tracing::warn!(error = %e, "writing the node's requested addresses failed; retrying"),
                }
            }
            if let Err(e) = self.release_unused_blocks().await {
                tracing::warn!(error = %e, "releasing unused blocks failed; retrying");
            }
        }
    }

    /// Gives back empty blocks while what stays still covers the demand.
    async fn release_unused_blocks(&self) -> Result<(), StoreError> {
        let _sync = self.blocks_sync.lock().await;
        let candidates: Vec<(String, IpNet)> = {
            let mut st = self.lock();
            if !st.restored {
                return Ok(());
            }
            let demand = self.pod_demand(&st);
            let keys: Vec<(String, Family)> = st.alloc.pools().map(|(p, f)| (p.to_string(), f)).collect();
            let mut out = Vec::new();
            for (pool, family) in keys {
                let needed = demand.iter().find(|(p, f, _)| *p == pool && *f == family).map_or(0, |(_, _, n)| *n);
                for block in st.alloc.releasable(&pool, family, u128::from(needed)) {
                    st.alloc.set_draining(&pool, &block, true);
                    out.push((pool.clone(), block));
                }
            }
            out
        };
        for (pool, block) in candidates {
            let grant = BlockGrant { pool: pool.clone(), cidr: block, node: self.cfg.node.clone() };
            let result = self.store.release_block(&grant).await;
            let mut st = self.lock();
            match result {
                Ok(_) => {
                    st.alloc.remove_block(&pool, &block);
                    tracing::info!(%pool, %block, "released unused block");
                }
                Err(e) => {
                    st.alloc.set_draining(&pool, &block, false);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Follows the store: every change refreshes pools, namespaces and this node's blocks.
    pub async fn watch_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.watch();
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                _ = shutdown.changed() => return,
            }
            changes.borrow_and_update();
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "refreshing from the cluster store failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes one address per chosen family; on the first family with no room, gives back what it
/// took and names the pool.
fn take_addresses(st: &mut State, choice: &[(Family, String)]) -> Result<Vec<AllocatedIp>, String> {
    let mut ips: Vec<AllocatedIp> = Vec::with_capacity(choice.len());
    for (family, pool) in choice {
        let Some((ip, block, gateway)) = st.alloc.allocate_in_block(pool, *family) else {
            for taken in &ips {
                st.alloc.release(&taken.pool, taken.address.addr());
            }
            return Err(pool.clone());
        };
        ips.push(AllocatedIp {
            address: IpNet::new(ip, block.prefix_len()).expect("prefix from a block"),
            pool: pool.clone(),
            gateway,
        });
    }
    Ok(ips)
}
