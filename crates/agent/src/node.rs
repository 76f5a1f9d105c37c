//! The node's allocation logic: ADD, DEL, CHECK, GC against in-memory state mirrored by the
//! durable records, plus the loops that keep demand, blocks and caches in step with the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use allot_core::demand::{self, Pending};
use allot_core::node_alloc::NodeAllocator;
use allot_core::select::{self, Source};
use allot_core::{BlockGrant, Family, PoolSpec};
use allot_store::{Annotations, Change, ClusterView, Store, StoreError, StoreEvent};
use allot_wire::{
    AddRequest, AllocatedIp, Allocation, Attachment, GcResponse, Needed, Owner, PoolRequest, PoolStatus, Readiness,
    RouteFailure, Status, StoreHealth,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::AgentError;
use crate::config::AgentConfig;
use crate::records::{Op, Queued, Records};

mod adopt;
pub use adopt::RESCAN_EVERY;

/// The last cluster view the agent read, kept in its data dir so that it can serve from its
/// blocks when it starts while the store is unreachable.
const VIEW_FILE: &str = "cluster-view.json";
/// How often the saved view's confirmation time is rewritten when nothing else changed.
const VIEW_CONFIRM_EVERY: Duration = Duration::from_secs(60);
/// Connecting to the store is retried with backoff up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    /// Set once the node has read its view from the store (not only from the saved file).
    connected: bool,
    store: StoreHealth,
    /// Blocks granted cluster-wide per pool and family, as of the last read.
    cluster_blocks: BTreeMap<(String, Family), u64>,
    /// Blocks this node's allocations lie in but that it does not hold (yet): claimed back
    /// from the store when free.
    wanted: BTreeSet<(String, IpNet)>,
    /// The view last written to `VIEW_FILE`.
    saved: Option<SavedView>,
    /// Blocks this node needs back but another node holds (reported once each).
    conflicts: BTreeSet<(String, IpNet)>,
    /// Unix seconds of the last complete read of the node's view from the store.
    confirmed_at: u64,
    /// Blocks of adopted pod CIDRs: never given back while listed here.
    pinned: BTreeSet<(String, IpNet)>,
    /// Set while host-local directories given at start are not adopted yet: no new addresses.
    adoption_blocked: Option<String>,
}

/// What `VIEW_FILE` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct SavedView {
    pools: BTreeMap<String, PoolSpec>,
    namespaces: BTreeMap<String, Annotations>,
    blocks: Vec<(String, IpNet)>,
    /// Unix seconds when the store last confirmed this view (0: unknown).
    #[serde(default)]
    confirmed_at: u64,
}

/// What one ADD attempt found. The allocation's record is queued in the journal under the
/// state lock, so the journal sees ADDs and DELs of one owner in the order memory did.
enum Taken {
    Existing(Allocation, Queued),
    New(Allocation, Queued),
    Full(String),
    /// The chosen pool is unknown here: looked up in the store, or waited for, before refusing.
    UnknownPool(String),
    /// The store has not confirmed the node's blocks for too long (or not yet, just after
    /// start): waited for, then refused.
    Stale(String),
}

pub struct Node<S> {
    pub(crate) cfg: AgentConfig,
    pub(crate) store: Arc<S>,
    state: Mutex<State>,
    records: Records,
    /// Woken when a block arrives or an address is freed: waiting ADDs retry.
    room_changed: Notify,
    demand_changed: Notify,
    /// The cluster view kept current by the store's events (None until first read). Its lock
    /// serialises applying it with giving blocks back, so a view that still lists a released
    /// block cannot re-add it.
    blocks_sync: tokio::sync::Mutex<Option<ClusterView>>,
    /// Failed direct routes, written by the routes loop (cluster mode).
    pub(crate) route_failures: Mutex<Vec<RouteFailure>>,
    /// What was adopted from where (`adoptions.json`).
    adoptions: Mutex<adopt::Adoptions>,
    /// Held across a host-local rescan (scan and apply) and across allot's own frees of adopted
    /// owners: a scan older than a change must not undo it.
    host_local_sync: tokio::sync::Mutex<()>,
    /// Pod and namespace annotations from elsewhere than the CNI call (the Kubernetes API).
    pods: std::sync::OnceLock<Arc<dyn crate::pods::PodAnnotations>>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl<S: Store> Node<S> {
    /// Opens the records and the saved cluster view, restores every stored allocation, and
    /// connects to the store (registers the node, reads its view).
    pub async fn start(cfg: AgentConfig, store: Arc<S>) -> Result<Arc<Self>, AgentError> {
        let node = Self::open(cfg, store)?;
        node.connect().await?;
        Ok(node)
    }

    /// Opens the records and the saved cluster view and restores every stored allocation,
    /// without touching the store: the node can serve DEL, and ADD from the blocks it held.
    pub fn open(cfg: AgentConfig, store: Arc<S>) -> Result<Arc<Self>, AgentError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| AgentError::Internal(format!("creating data dir {}: {e}", cfg.data_dir.display())))?;
        let (records, replay) = Records::open_replay(&cfg.data_dir.join("allocations.journal"))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let saved = read_saved_view(&cfg.data_dir.join(VIEW_FILE));
        let adoptions = adopt::read_adoptions(&cfg.data_dir);
        let pinned: BTreeSet<(String, IpNet)> =
            adoptions.pod_cidrs.iter().flat_map(|p| p.blocks.iter().map(|b| (p.pool.clone(), *b))).collect();
        let adoption_blocked = (!cfg.adopt_host_local.is_empty())
            .then(|| "adopting the host-local directories given with --adopt-host-local: no new addresses before that".to_string());
        let node = Arc::new(Node {
            state: Mutex::new(State {
                alloc: NodeAllocator::new(),
                owners: HashMap::new(),
                pending: Pending::new(cfg.pending_ttl),
                pools: BTreeMap::new(),
                namespaces: BTreeMap::new(),
                operator_error: None,
                restored: false,
                connected: false,
                store: StoreHealth {
                    reachable: false,
                    unreachable_since: Some(now_unix()),
                    last_error: Some("not connected yet".into()),
                    from_saved_view: saved.is_some(),
                },
                cluster_blocks: BTreeMap::new(),
                wanted: BTreeSet::new(),
                conflicts: BTreeSet::new(),
                confirmed_at: saved.as_ref().map_or(0, |v| v.confirmed_at),
                saved: saved.clone(),
                pinned,
                adoption_blocked,
            }),
            cfg,
            store,
            records,
            room_changed: Notify::new(),
            demand_changed: Notify::new(),
            blocks_sync: tokio::sync::Mutex::new(None),
            route_failures: Mutex::new(Vec::new()),
            adoptions: Mutex::new(adoptions),
            host_local_sync: tokio::sync::Mutex::new(()),
            pods: std::sync::OnceLock::new(),
        });
        node.restore(replay, saved.unwrap_or_default());
        Ok(node)
    }

    /// Sets where ADD finds the annotations of a pod whose runtime passed none (once; later
    /// calls are ignored).
    pub fn set_pod_annotations(&self, source: Arc<dyn crate::pods::PodAnnotations>) {
        let _ = self.pods.set(source);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks every stored allocation, in the blocks of the saved view; allocations outside
    /// them make the node want their blocks back.
    fn restore(&self, replay: crate::records::Replay, saved: SavedView) {
        let started = Instant::now();
        let count = replay.allocations.len();
        let mut st = self.lock();
        st.pools = saved.pools;
        st.namespaces = saved.namespaces;
        for a in replay.allocations {
            st.owners.insert(a.owner.clone(), a);
        }
        for (pool, block) in saved.blocks {
            self.add_block(&mut st, &pool, block);
        }
        self.want_missing_blocks(&mut st);
        // Adopted pod CIDRs this node lost track of are claimed back like allocations' blocks.
        let pinned: Vec<(String, IpNet)> = st.pinned.iter().filter(|(p, b)| !st.alloc.holds(p, b)).cloned().collect();
        st.wanted.extend(pinned);
        for (pool, ip) in replay.resume_after {
            st.alloc.resume_after(&pool, ip);
        }
        st.restored = true;
        drop(st);
        tracing::info!(allocations = count, elapsed = ?started.elapsed(), "restored allocations");
        self.demand_changed.notify_one();
    }

    /// Adds a block the node now holds and marks the stored allocations inside it. The gateway
    /// is reserved as configured, and also when a pod was given it as gateway before the
    /// setting was turned off; never when a pod holds the address itself.
    fn add_block(&self, st: &mut State, pool: &str, block: IpNet) {
        let inside: Vec<(Owner, std::net::IpAddr, Option<std::net::IpAddr>)> = st
            .owners
            .values()
            .flat_map(|a| a.ips.iter().map(move |ip| (a, ip)))
            .filter(|(_, ip)| ip.pool == pool && block.contains(&ip.address.addr()))
            .map(|(a, ip)| (a.owner.clone(), ip.address.addr(), ip.gateway))
            .collect();
        let gateway = NodeAllocator::gateway_of(&block);
        let held_by_pod = inside.iter().find(|(_, ip, _)| Some(*ip) == gateway).map(|(o, _, _)| o);
        let given_as_gateway = gateway.is_some() && inside.iter().any(|(_, _, gw)| *gw == gateway);
        if let (Some(owner), true) = (held_by_pod, self.cfg.reserve_gateway || given_as_gateway) {
            tracing::warn!(%pool, %block, %owner, "the block's gateway address is a pod's; no gateway reserved in this block");
        }
        let reserve = held_by_pod.is_none() && (self.cfg.reserve_gateway || given_as_gateway);
        st.alloc.add_block_with(pool, block, reserve);
        if st.pinned.contains(&(pool.to_string(), block)) {
            st.alloc.set_reserved(pool, &block, true);
        }
        for (owner, ip, _) in &inside {
            if let Err(e) = st.alloc.mark_used(pool, *ip) {
                tracing::error!(%owner, error = %e, "two stored allocations hold one address");
            }
        }
        st.wanted.remove(&(pool.to_string(), block));
    }

    /// Records the blocks of stored allocations that lie outside every held block.
    fn want_missing_blocks(&self, st: &mut State) {
        let mut missing = Vec::new();
        for a in st.owners.values() {
            for ip in &a.ips {
                let held = st.alloc.block_list().any(|(p, b)| p == ip.pool && b.net.contains(&ip.address.addr()));
                if held {
                    continue;
                }
                // Pools unknown yet are retried once the view is read from the store.
                if let Some(spec) = st.pools.get(&ip.pool).and_then(|p| p.family(Family::of(&ip.address))) {
                    match IpNet::new(ip.address.addr(), spec.mask_size) {
                        Ok(block) => missing.push((ip.pool.clone(), block.trunc())),
                        Err(_) => tracing::error!(owner = %a.owner, ip = %ip.address, "stored address fits no block of its pool"),
                    }
                }
            }
        }
        st.wanted.extend(missing);
    }

    /// Connects the node to the store: creates the configured pools that are missing,
    /// registers the node, and reads its view (claiming back blocks its allocations lie in).
    pub async fn connect(&self) -> Result<(), AgentError> {
        let result = async {
            crate::auto_create_pools(&*self.store, &self.cfg).await?;
            self.store.register_node(&self.cfg.node, self.cfg.node_ip).await?;
            self.refresh().await?;
            Ok::<(), AgentError>(())
        }
        .await;
        match &result {
            Ok(()) => {}
            Err(AgentError::Internal(m)) => {
                self.note_store_error(m);
                return result;
            }
            Err(other) => {
                // Not an outage: the store refused what this agent asked (its auto-create pools).
                tracing::error!(error = %other, "the cluster store refused this agent's configuration (--pool / autoCreatePools): fix it and restart the agent");
                self.lock().store.last_error = Some(format!("the store refused this agent's configuration: {other}"));
                return result;
            }
        }
        let mut st = self.lock();
        if !st.connected {
            st.connected = true;
            tracing::info!(node = %self.cfg.node, "connected to the cluster store");
        }
        drop(st);
        self.demand_changed.notify_one();
        Ok(())
    }

    fn note_store_ok(&self) {
        let mut st = self.lock();
        if !st.store.reachable && st.connected {
            tracing::info!("cluster store reachable again");
        }
        st.store.reachable = true;
        st.store.unreachable_since = None;
        st.store.last_error = None;
    }

    fn note_store_error(&self, error: &str) {
        crate::metrics::store_error();
        let mut st = self.lock();
        if st.store.reachable {
            st.store.reachable = false;
            st.store.unreachable_since = Some(now_unix());
        }
        st.store.last_error = Some(error.to_string());
    }

    /// Notes how a store call went, for `allot status` and CNI STATUS.
    fn observe<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) | Err(StoreError::Refused(_) | StoreError::NotFound(_) | StoreError::Conflict(_)) => self.note_store_ok(),
            Err(StoreError::Backend(e)) => self.note_store_error(e),
        }
    }

    /// Re-reads pools, namespaces, this node's blocks and operator status from the store.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let r = self.refresh_inner().await;
        self.observe(&r);
        r
    }

    async fn refresh_inner(&self) -> Result<(), StoreError> {
        let mut view = self.blocks_sync.lock().await;
        let snapshot = self.store.snapshot().await?;
        // Other nodes' records matter only for direct routes.
        let focus = (!self.cfg.direct_routes).then_some(self.cfg.node.as_str());
        *view = Some(ClusterView::new(snapshot, focus));
        self.settle(view.as_mut().expect("set above")).await
    }

    /// Takes in changes from the store's events; the node's state follows when they concern
    /// it (pools, namespaces, its own record and blocks). Others' blocks only move counts.
    async fn apply_changes(&self, changes: &[(u64, Change)]) -> Result<(), StoreError> {
        let mut guard = self.blocks_sync.lock().await;
        let Some(view) = guard.as_mut() else { return Ok(()) };
        let me = self.cfg.node.as_str();
        let applied = view.apply_all(changes);
        let concerns = applied.iter().any(|c| match c {
            Change::Pool { .. } | Change::Namespace { .. } => true,
            Change::Node { name, .. } => name == me,
            Change::Block { pool, cidr, node } => node.as_deref() == Some(me) || self.lock().alloc.holds(pool, cidr),
            Change::Alive { .. } | Change::Released { .. } => false,
        });
        if concerns {
            self.settle(view).await
        } else {
            if applied.iter().any(|c| matches!(c, Change::Block { .. })) {
                self.lock().cluster_blocks = view.counts().clone();
            }
            Ok(())
        }
    }

    /// Brings the node's state in line with `view`: its blocks, pools, namespaces, operator
    /// status; claims back blocks its pods still use; registers again if its record is gone.
    async fn settle(&self, view: &mut ClusterView) -> Result<(), StoreError> {
        let record = view.nodes.get(&self.cfg.node).cloned();
        if record.is_none() {
            // The node was deleted while this agent runs: register it again, with its demand.
            tracing::warn!(node = %self.cfg.node, "node record missing; registering again");
            self.store.register_node(&self.cfg.node, self.cfg.node_ip).await?;
            let requested = self.requested(&self.lock());
            self.store.set_requested(&self.cfg.node, requested).await?;
        }
        let mine: HashSet<(&str, IpNet)> = view.blocks_of(&self.cfg.node).collect();
        let (changed, reclaim) =
            self.apply_view(view.pool_list(), view.namespaces.clone(), record, &mine, view.counts().clone());
        // Every block is tried, whatever happens to the others; the first error is returned.
        let mut failed = None;
        for (pool, block) in reclaim {
            let grant = BlockGrant { pool: pool.clone(), cidr: block, node: self.cfg.node.clone() };
            match self.store.grant_block(&grant).await {
                Ok(true) => {
                    tracing::warn!(%pool, %block, "re-claimed a block that holds this node's allocations");
                    view.note_granted(&grant);
                    let mut st = self.lock();
                    if st.alloc.holds(&pool, &block) {
                        st.alloc.set_draining(&pool, &block, false);
                    } else {
                        self.add_block(&mut st, &pool, block);
                    }
                    st.conflicts.remove(&(pool, block));
                }
                Ok(false) => {
                    let mut st = self.lock();
                    let first = st.conflicts.insert((pool.clone(), block));
                    let what = if st.wanted.contains(&(pool.clone(), block)) {
                        "stored allocations lie in a block this node cannot hold"
                    } else {
                        "a block this node still uses is held elsewhere; no new addresses from it"
                    };
                    if first {
                        tracing::error!(%pool, %block, "{what}");
                    }
                }
                Err(e) => {
                    tracing::warn!(%pool, %block, error = %e, "re-claiming a block failed; retried on the next refresh");
                    failed.get_or_insert(e);
                }
            }
        }
        self.save_view();
        if changed {
            self.room_changed.notify_waiters();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes the view to `VIEW_FILE` when it changed (written aside, synced, renamed); false
    /// when that failed.
    fn save_view(&self) -> bool {
        let (view, unchanged) = {
            let st = self.lock();
            let view = SavedView {
                pools: st.pools.clone(),
                namespaces: st.namespaces.clone(),
                blocks: st.alloc.block_list().filter(|(_, b)| !b.draining).map(|(p, b)| (p.to_string(), b.net)).collect(),
                confirmed_at: self.confirmed(&st),
            };
            // The confirmation time alone is rewritten only now and then: it matters in minutes.
            let unchanged = st.saved.as_ref().is_some_and(|old| {
                old.pools == view.pools
                    && old.namespaces == view.namespaces
                    && old.blocks == view.blocks
                    && view.confirmed_at.saturating_sub(old.confirmed_at) < VIEW_CONFIRM_EVERY.as_secs()
            });
            (view, unchanged)
        };
        if unchanged {
            return true;
        }
        let path = self.cfg.data_dir.join(VIEW_FILE);
        match write_atomically(&path, &serde_json::to_vec(&view).expect("views encode")) {
            Ok(()) => {
                self.lock().saved = Some(view);
                true
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "saving the cluster view failed");
                false
            }
        }
    }

    /// Puts a fresh read of the store into the node's state; returns whether the view changed
    /// (blocks arrived, pools or namespaces changed), and the blocks to claim back: lost while
    /// pods still use them, or holding restored allocations.
    fn apply_view(
        &self,
        pools: Vec<allot_core::Pool>,
        namespaces: BTreeMap<String, Annotations>,
        record: Option<allot_store::NodeRecord>,
        mine: &HashSet<(&str, IpNet)>,
        cluster_blocks: BTreeMap<(String, Family), u64>,
    ) -> (bool, Vec<(String, IpNet)>) {
        let mut st = self.lock();
        let pools: BTreeMap<String, PoolSpec> = pools.into_iter().map(|p| (p.name, p.spec)).collect();
        let pools_changed = st.pools != pools;
        let mut changed = pools_changed || st.namespaces != namespaces;
        st.pools = pools;
        st.namespaces = namespaces;
        st.operator_error = record.and_then(|r| r.operator_error);
        st.cluster_blocks = cluster_blocks;
        st.store.from_saved_view = false;
        // ADDs waiting for a confirmed view go on now.
        changed |= self.stale_view(&st).is_some();
        st.confirmed_at = now_unix();
        for (pool, block) in mine {
            // Refresh and release never interleave, so a draining block held here is one that
            // was lost earlier and is this node's again.
            st.alloc.set_draining(pool, block, false);
            if !st.alloc.holds(pool, block) {
                self.add_block(&mut st, pool, *block);
                crate::metrics::block_received(pool);
                tracing::info!(%pool, %block, "block added");
                changed = true;
            }
        }
        // Refresh and release never interleave (`blocks_sync`), so every block held here that
        // the store does not give this node is a lost one, draining or not: a re-claim that
        // failed before is tried again on every refresh.
        let gone: Vec<(String, IpNet, bool)> = st
            .alloc
            .block_list()
            .filter(|(p, b)| !mine.contains(&(*p, b.net)))
            .map(|(p, b)| (p.to_string(), b.net, b.draining))
            .collect();
        let mut reclaim = Vec::new();
        for (pool, block, was_draining) in gone {
            if st.alloc.remove_block(&pool, &block) {
                if !was_draining {
                    tracing::warn!(%pool, %block, "block no longer held by this node; dropped");
                }
                st.conflicts.remove(&(pool, block));
            } else {
                // Pods still hold addresses in it: hand out nothing more from it, and take it
                // back below if nobody else holds it now.
                st.alloc.set_draining(&pool, &block, true);
                reclaim.push((pool, block));
            }
        }
        // Allocations outside every block appear only at restore; their blocks can be named
        // once their pools are known.
        if pools_changed || !st.connected {
            self.want_missing_blocks(&mut st);
        }
        reclaim.extend(st.wanted.iter().cloned());
        (changed, reclaim)
    }

    /// Chooses the pool of each family for an ADD.
    /// `ns_api`: the namespace's annotations from the pod annotation source; the store's win
    /// key by key.
    fn choose(&self, st: &State, req: &AddRequest, ns_api: Option<&Annotations>) -> Result<Vec<(Family, String)>, AgentError> {
        let ns_store = req.pod.namespace.as_deref().and_then(|ns| st.namespaces.get(ns));
        let ns_key = |k: &str| ns_store.and_then(|m| m.get(k)).or_else(|| ns_api.and_then(|m| m.get(k))).map(String::as_str);
        let mut out = Vec::new();
        let mut missing_default = false;
        for family in Family::ALL {
            let (pool, source) = select::select_pool(
                family,
                req.pool.as_deref(),
                |k| req.annotations.get(k).map(String::as_str),
                ns_key,
                &self.cfg.default_pool,
            );
            let Some(spec) = st.pools.get(pool) else {
                if source == Source::Default {
                    missing_default = true;
                    continue;
                }
                return Err(AgentError::NotFound(format!(
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
                AgentError::NotFound(format!(
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
    pub async fn add(&self, mut req: AddRequest) -> Result<Allocation, AgentError> {
        let passed = req.annotations_passed || !req.annotations.is_empty();
        let mut ns_api = None;
        if let (Some(source), Some(ns), Some(name)) = (self.pods.get(), &req.pod.namespace, &req.pod.name) {
            // The runtime's annotations win; a retried ADD of a known owner does not wait.
            let need_pod = !passed;
            let known = self.lock().owners.contains_key(&req.owner);
            let wait = if known { Duration::ZERO } else { self.cfg.pod_wait };
            let found = crate::pods::lookup(&**source, ns, name, need_pod, wait).await;
            match found.pod {
                Some(pod) => {
                    req.annotations = crate::pods::pool_keys(&pod);
                    tracing::debug!(owner = %req.owner, pod = %format_args!("{ns}/{name}"), annotations = ?req.annotations, "pod annotations from the Kubernetes API");
                }
                None if need_pod && !known => tracing::warn!(
                    owner = %req.owner,
                    pod = %format_args!("{ns}/{name}"),
                    waited = ?self.cfg.pod_wait,
                    "pod not seen by the pod watch within the wait; choosing its pool from its namespace's annotations or the default pool"
                ),
                None => {}
            }
            ns_api = found.namespace;
        } else if let (Some(name), false) = (&req.pod.name, passed) {
            // Pod annotations not passed (or, from older plugins, none at all: the kubelet always
            // sets some): the conflist lacks the capability and annotations cannot pick the pool.
            tracing::warn!(
                owner = %req.owner,
                pod = %format_args!("{}/{name}", req.pod.namespace.as_deref().unwrap_or("")),
                "ADD for a pod without annotations: declare \"capabilities\": {{\"io.kubernetes.cri.pod-annotations\": true}} \
                 on the plugin in the CNI conflist, or the runtime does not pass them and pod annotations cannot choose a pool"
            );
        }
        let deadline = tokio::time::Instant::now() + self.cfg.add_wait;
        let mut looked_up = false;
        loop {
            let room_changed = self.room_changed.notified();
            tokio::pin!(room_changed);
            room_changed.as_mut().enable();
            match self.try_take(&req, ns_api.as_ref())? {
                Taken::Existing(a, queued) => {
                    // The first ADD may still be committing: writing the same record again
                    // returns only once it is on disk.
                    queued.durable().await.map_err(|e| AgentError::Internal(e.to_string()))?;
                    return Ok(a);
                }
                Taken::New(a, queued) => {
                    self.demand_changed.notify_one();
                    return self.commit_new(a, queued).await;
                }
                Taken::UnknownPool(why) => {
                    // A pool applied a moment ago may not have reached this node's view yet:
                    // read the store once, then wait for the watch.
                    if !looked_up {
                        looked_up = true;
                        if tokio::time::timeout_at(deadline, self.refresh()).await.is_ok_and(|r| r.is_ok()) {
                            continue;
                        }
                    }
                    if tokio::time::timeout_at(deadline, room_changed).await.is_err() {
                        return Err(AgentError::TryAgain(format!("{why} (waited {:?})", self.cfg.add_wait)));
                    }
                }
                Taken::Stale(why) => {
                    if tokio::time::timeout_at(deadline, room_changed).await.is_err() {
                        return Err(AgentError::TryAgain(why));
                    }
                }
                Taken::Full(pool) => {
                    crate::metrics::pool_full(&pool);
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
    fn try_take(&self, req: &AddRequest, ns_api: Option<&Annotations>) -> Result<Taken, AgentError> {
        let mut st = self.lock();
        if let Some(existing) = st.owners.get(&req.owner) {
            let queued = self.records.enqueue(vec![Op::Put(existing.clone())]);
            return Ok(Taken::Existing(existing.clone(), queued));
        }
        if let Some(why) = self.stale_view(&st).or_else(|| st.adoption_blocked.clone()) {
            return Ok(Taken::Stale(why));
        }
        let choice = match self.choose(&st, req, ns_api) {
            Ok(c) => c,
            Err(AgentError::NotFound(why)) => return Ok(Taken::UnknownPool(why)),
            Err(e) => return Err(e),
        };
        match take_addresses(&mut st, &choice) {
            Ok(ips) => {
                st.pending.clear(&req.owner);
                let a = Allocation {
                    owner: req.owner.clone(),
                    netns: req.netns.clone(),
                    pod: req.pod.clone(),
                    ips,
                    created: now_unix(),
                    source: Default::default(),
                };
                st.owners.insert(a.owner.clone(), a.clone());
                let queued = self.records.enqueue(vec![Op::Put(a.clone())]);
                Ok(Taken::New(a, queued))
            }
            Err(pool) => {
                let families = choice.iter().filter(|(_, p)| *p == pool).map(|(f, _)| *f).collect();
                st.pending.record(req.owner.clone(), &pool, families, Instant::now());
                Ok(Taken::Full(pool))
            }
        }
    }

    /// Writes a new allocation. When the write fails, the allocation stays reserved in memory
    /// (its addresses are not handed to anyone else): whether it reached the disk is unknown,
    /// and a retried ADD of the same owner writes it again and gets the same addresses, a DEL
    /// frees it. Freeing it here could let a retry be told "ok" for an address given away.
    async fn commit_new(&self, a: Allocation, queued: Queued) -> Result<Allocation, AgentError> {
        match queued.durable().await {
            Ok(()) => Ok(a),
            Err(e) => {
                tracing::error!(owner = %a.owner, error = %e, "recording an allocation failed; kept reserved until DEL");
                Err(AgentError::Internal(e.to_string()))
            }
        }
    }

    /// DEL: forgets the owner durably, then frees its addresses. Unknown owners succeed. An
    /// adopted owner, or an adopted one of the same attachment, is freed by `del_adopted`.
    pub async fn del(&self, owner: &Owner) -> Result<Option<Allocation>, AgentError> {
        if self.touches_adopted(owner) {
            return self.del_adopted(owner).await;
        }
        Ok(self.release_owners(std::slice::from_ref(owner)).await?.into_iter().next())
    }

    /// Removes owners in one durable write; their addresses are freed only after it.
    async fn release_owners(&self, owners: &[Owner]) -> Result<Vec<Allocation>, AgentError> {
        let (taken, queued) = {
            let mut st = self.lock();
            let taken: Vec<Allocation> = owners
                .iter()
                .filter_map(|o| {
                    st.pending.clear(o);
                    st.owners.remove(o)
                })
                .collect();
            if taken.is_empty() {
                return Ok(taken);
            }
            // Queued under the lock: an ADD of the same owner after this DEL lands after it.
            let queued = self.records.enqueue(taken.iter().map(|a| Op::Delete(a.owner.clone())).collect());
            (taken, queued)
        };
        if let Err(e) = queued.durable().await {
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

    /// GC: within `network`, releases every owner not in `valid`; adopted owners go by
    /// `gc_adopted` (only those of `network` itself).
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<GcResponse, AgentError> {
        let valid: HashSet<(&str, &str)> = valid.iter().map(|a| (a.container_id.as_str(), a.ifname.as_str())).collect();
        let stale: Vec<Owner> = self
            .lock()
            .owners
            .values()
            .filter(|a| !a.source.is_adopted())
            .map(|a| &a.owner)
            .filter(|o| o.network == network && !valid.contains(&(o.container_id.as_str(), o.ifname.as_str())))
            .cloned()
            .collect();
        let mut released = self.release_owners(&stale).await?;
        released.extend(self.gc_adopted(network, &valid).await?);
        for a in &released {
            tracing::info!(owner = %a.owner, "gc released");
        }
        Ok(GcResponse { released: released.into_iter().map(|a| a.owner).collect() })
    }

    /// `allot gc`: releases allocations whose network namespace no longer exists. Refused when
    /// no allocation's namespace is visible at all: then the agent most likely cannot see the
    /// host's namespaces (a container without `/var/run/netns`), not that every pod is gone.
    pub async fn sweep(&self, dry_run: bool) -> Result<GcResponse, AgentError> {
        let (with_netns, stale): (usize, Vec<Owner>) = {
            let st = self.lock();
            let with_netns: Vec<&Allocation> = st.owners.values().filter(|a| !a.netns.is_empty()).collect();
            let stale = with_netns
                .iter()
                .filter(|a| !std::path::Path::new(&a.netns).exists())
                .map(|a| a.owner.clone())
                .collect();
            (with_netns.len(), stale)
        };
        if with_netns > 0 && stale.len() == with_netns {
            return Err(AgentError::Conflict(format!(
                "none of the {with_netns} allocations' network namespaces is visible to the agent: if it runs in a container, mount the host's /var/run/netns (and /proc) into it; nothing was released"
            )));
        }
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
            // Pinned pod-CIDR blocks serve no new pod: the demand is on top of all their
            // addresses, which the operator counts as held.
            needed += st.alloc.usage(&pool, family).reserved.min(u128::from(u64::MAX)) as u64;
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

    /// The network namespace path of every allocation (empty when the runtime gave none).
    pub fn netns_paths(&self) -> Vec<String> {
        self.lock().owners.values().map(|a| a.netns.clone()).collect()
    }

    /// ADDs that found their pool full and still count as demand, per pool and family.
    pub fn pending_attempts(&self) -> Vec<(String, Family, u64)> {
        let st = self.lock();
        let keys = st.pools.iter().flat_map(|(n, spec)| spec.families().map(move |(f, _)| (n, f)));
        keys.map(|(n, f)| (n.clone(), f, st.pending.count(n, f))).collect()
    }

    /// The node's state, from memory alone: it answers while the store is away.
    pub fn status(&self) -> Status {
        let st = self.lock();
        let requested = self.requested(&st);
        let mut pools = Vec::new();
        for (name, spec) in &st.pools {
            for (family, _) in spec.families() {
                let u = st.alloc.usage(name, family);
                pools.push(PoolStatus {
                    pool: name.clone(),
                    family,
                    capacity: spec.capacity(family).to_string(),
                    blocks_cluster: st.cluster_blocks.get(&(name.clone(), family)).copied().unwrap_or(0),
                    blocks_node: u.blocks as u64,
                    node_capacity: u.capacity.to_string(),
                    in_use: u.in_use as u64,
                    free: u.capacity.saturating_sub(u.in_use).to_string(),
                    requested: requested.iter().find(|r| r.pool == *name).map_or(0, |r| r.needed.get(family)),
                });
            }
        }
        let route_failures = self.route_failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Status {
            node: self.cfg.node.clone(),
            ready: st.restored,
            cni: Some(self.readiness(&st)),
            store: st.store.clone(),
            route_failures,
            pools,
        }
    }

    /// Unix seconds as of which the node's view is known current: its last read from the store,
    /// or, while it follows the store's watch, the watch's last answer if that is older (a
    /// silent partition stops it). Before the first connection, the saved view's time.
    fn confirmed(&self, st: &State) -> u64 {
        match self.store.heard_unix() {
            Some(heard) if st.connected => st.confirmed_at.min(heard),
            _ => st.confirmed_at,
        }
    }

    /// Why the node's blocks may not be used for new addresses: the store has not confirmed
    /// them within `max_view_age` (the operator may have removed the node and given them away).
    fn stale_view(&self, st: &State) -> Option<String> {
        let confirmed = self.confirmed(st);
        let age = now_unix().saturating_sub(confirmed);
        (age > self.cfg.max_view_age.as_secs()).then(|| {
            let when = if confirmed == 0 { "has not confirmed this node's blocks yet".to_string() } else {
                format!("last confirmed this node's blocks {age}s ago, more than --max-view-age {:?}", self.cfg.max_view_age)
            };
            format!(
                "node {:?}: the cluster store {when}; another node may hold them by now, so no new addresses until the store answers \
                 (DEL and existing pods are unaffected; {})",
                self.cfg.node,
                describe_outage(&st.store)
            )
        })
    }

    /// Whether an ADD can be served now (CNI STATUS): restored, some pool known, and either a
    /// free address in the node's blocks or a store that can grant more.
    fn readiness(&self, st: &State) -> Readiness {
        let not = |reason: String| Readiness { ready: false, reason: Some(reason) };
        if !st.restored {
            return not("still restoring its allocations".into());
        }
        if st.pools.is_empty() {
            return not(if st.connected {
                "no IP pool exists: create one with `allot pool apply`".into()
            } else {
                format!("no IP pool known yet: {}", describe_outage(&st.store))
            });
        }
        if let Some(why) = self.stale_view(st).or_else(|| st.adoption_blocked.clone()) {
            return not(why);
        }
        if !st.store.reachable {
            let free: u128 = st
                .alloc
                .block_list()
                .filter(|(_, b)| b.serves())
                .map(|(_, b)| b.pod_capacity().saturating_sub(b.pods()))
                .sum();
            if free == 0 {
                return not(format!("no free address in this node's blocks and {}", describe_outage(&st.store)));
            }
        }
        Readiness { ready: true, reason: None }
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
            let (requested, connected) = {
                let mut st = self.lock();
                st.pending.expire(Instant::now());
                (self.requested(&st), st.connected)
            };
            // Until the node is registered, the watch loop is connecting: nothing to write to.
            if !connected {
                continue;
            }
            if written.as_ref() != Some(&requested) {
                let r = self.store.set_requested(&self.cfg.node, requested.clone()).await;
                self.observe(&r);
                match r {
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
        let mut view = self.blocks_sync.lock().await;
        let candidates: Vec<(String, IpNet)> = {
            let mut st = self.lock();
            // Before the first read from the store, the blocks are the saved view's.
            if !st.restored || !st.connected {
                return Ok(());
            }
            let demand = self.pod_demand(&st);
            let keys: Vec<(String, Family)> = st.alloc.pools().map(|(p, f)| (p.to_string(), f)).collect();
            let mut out = Vec::new();
            for (pool, family) in keys {
                let needed = demand.iter().find(|(p, f, _)| *p == pool && *f == family).map_or(0, |(_, _, n)| *n);
                for block in st.alloc.releasable(&pool, family, u128::from(needed)) {
                    if st.pinned.contains(&(pool.clone(), block)) {
                        continue;
                    }
                    st.alloc.set_draining(&pool, &block, true);
                    out.push((pool.clone(), block));
                }
            }
            out
        };
        if candidates.is_empty() {
            return Ok(());
        }
        // Out of the saved view before it is given back: an agent that dies right after the
        // release must not start again with a block another node may hold by then.
        if !self.save_view() {
            let mut st = self.lock();
            for (pool, block) in &candidates {
                st.alloc.set_draining(pool, block, false);
            }
            return Ok(());
        }
        for (pool, block) in candidates {
            let grant = BlockGrant { pool: pool.clone(), cidr: block, node: self.cfg.node.clone() };
            let result = self.store.release_block(&grant).await;
            let mut st = self.lock();
            match result {
                Ok(_) => {
                    st.alloc.remove_block(&pool, &block);
                    if let Some(v) = view.as_mut() {
                        v.forget_block(&pool, &block);
                    }
                    crate::metrics::block_released(&pool);
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

    /// Connects to the store (retrying with backoff while it is away), then follows its
    /// events: the view is read whole only at start, when events were missed (a lagging
    /// subscriber, a watch re-created past a compaction), after a failure, and every
    /// `FULL_READ`; in between, every 30 s the node settles from its view (retrying claims).
    pub async fn watch_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        const FULL_READ: Duration = Duration::from_secs(300);
        const SETTLE: Duration = Duration::from_secs(30);
        const TICK: Duration = Duration::from_secs(1);
        // Subscribed before the first read: nothing between the read and the events is missed.
        let mut events = self.store.events();
        let mut changes = self.store.watch();
        let mut backoff = Duration::from_millis(100);
        while !self.lock().connected {
            match self.connect().await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "connecting the node to the cluster store failed; retrying (serving from its journal and saved view meanwhile)"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = changes.changed() => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let mut last_read = Instant::now();
        let mut last_settle = Instant::now();
        let mut full = false;
        loop {
            let event = tokio::select! {
                e = events.recv() => Some(e),
                _ = tokio::time::sleep(TICK) => None,
                _ = shutdown.changed() => return,
            };
            // Away from the store, or with a view too old to hand out addresses from, read it
            // again at once: new addresses wait for that. Otherwise settle every `SETTLE`.
            let behind = {
                let st = self.lock();
                !st.store.reachable || self.stale_view(&st).is_some()
            };
            if event.is_none() && !full && !behind && last_settle.elapsed() < SETTLE {
                continue;
            }
            if event.is_none() {
                last_settle = Instant::now();
            }
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            // Ok(true): read the whole view again.
            let r = match event {
                // An event proves the store reachable again after a failed call.
                Some(Ok(StoreEvent::Changes(c))) if !full => self.apply_changes(&c).await.map(|()| self.note_store_ok()).map(|()| false),
                Some(Ok(StoreEvent::Changes(_))) => Ok(true),
                Some(Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_))) => Ok(true),
                Some(Err(RecvError::Closed)) => return,
                // While a call failed and no event came since, a read tells whether it is back.
                None if !full && !behind && last_read.elapsed() < FULL_READ => {
                    let mut guard = self.blocks_sync.lock().await;
                    match guard.as_mut() {
                        Some(view) => self.settle(view).await.map(|()| false),
                        None => Ok(true),
                    }
                }
                None => Ok(true),
            };
            match r {
                Ok(again) => full |= again,
                Err(e) => {
                    tracing::warn!(error = %e, "following the cluster store failed; reading it again");
                    self.observe::<()>(&Err(e));
                    full = true;
                }
            }
            if full {
                // What is queued now is older than the read below; what comes after is not.
                while !matches!(events.try_recv(), Err(TryRecvError::Empty | TryRecvError::Closed)) {}
                last_read = Instant::now();
                match self.refresh().await {
                    Ok(()) => full = false,
                    Err(e) => tracing::warn!(error = %e, "refreshing from the cluster store failed; retrying"),
                }
            }
        }
    }
}

fn describe_outage(h: &StoreHealth) -> String {
    let since = h.unreachable_since.map(|t| format!(" since {}s ago", now_unix().saturating_sub(t))).unwrap_or_default();
    let why = h.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
    format!("the cluster store is unreachable{since}{why}")
}

fn read_saved_view(path: &std::path::Path) -> Option<SavedView> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "reading the saved cluster view failed; starting without it");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(file = %path.display(), error = %e, "saved cluster view unreadable; starting without it"))
        .ok()
}

/// Replaces `path` with `bytes`, mode 0600: written aside, synced, renamed, directory synced.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::datadir::FILE_MODE)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
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
