//! The `KubeStore`'s local mirror of the cluster: one kube-rs watcher per kind feeds one state
//! under one lock. Every change the mirror applies gets the next local revision and goes out
//! as a typed `Change`, so `snapshot()` and the event stream agree on one order.
//!
//! Time-based state (a liveness Lease that ran out, a released block whose grace ended) has no
//! API event: `refresh` re-evaluates it against the clock and emits the change itself, on a
//! one-second tick and before every read of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_core::{BlockGrant, Pool, PoolSpec};
use allot_store::{Annotations, Change, NodeRecord, Snapshot, StoreEvent};
use futures_util::StreamExt;
use ipnet::IpNet;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

/// The annotation that marks an `IPBlock` taken from a deleted node: unix seconds until which
/// only that node (`spec.node`) may take it back.
pub const RELEASED_UNTIL: &str = "allot.dev/released-until";
/// The annotation `delete_pool` sets before deleting a pool: grants treat the pool as gone.
pub const DELETING: &str = "allot.dev/deleting";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Pool = 0,
    CiliumPool = 1,
    Block = 2,
    Node = 3,
    Namespace = 4,
    Lease = 5,
}
const KINDS: usize = 6;

/// One object as the mirror keeps it: identity, resourceVersion, and what allot reads of it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub uid: String,
    pub rv: u64,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Pool { spec: PoolSpec, deleting: bool },
    Block { pool: String, cidr: IpNet, node: String, released_until: Option<u64> },
    Node(NodeRecord),
    Namespace(Annotations),
    /// A liveness Lease: the node it stands for and when it runs out (unix ms).
    Lease { node: String, expires_ms: Option<i64> },
}

/// `(pool, block)` -> node.
type Holders = BTreeMap<(String, IpNet), String>;

#[derive(Default)]
pub(crate) struct State {
    pub revision: u64,
    objs: [BTreeMap<String, Entry>; KINDS],
    /// The highest resourceVersion seen per kind. Apiserver resourceVersions are etcd
    /// revisions: one global counter, so they compare as integers (an assumption the
    /// Kubernetes API documents as opaque, but every apiserver backed by etcd keeps).
    seen_rv: [u64; KINDS],
    synced: [bool; KINDS],
    /// When each kind's watch last reported an error, until its next event.
    broken: [Option<std::time::Instant>; KINDS],
    /// What the event stream has announced, for the parts that depend on the clock.
    blocks: BTreeMap<(String, IpNet), String>,
    released: BTreeMap<(String, IpNet), String>,
    live: BTreeSet<String>,
    /// Objects of a re-list in progress, per kind.
    relist: [Option<BTreeMap<String, Entry>>; KINDS],
}

pub(crate) fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

pub(crate) fn now_secs() -> u64 {
    (now_ms() / 1000).max(0) as u64
}

impl State {
    pub fn entry(&self, kind: Kind, name: &str) -> Option<&Entry> {
        self.objs[kind as usize].get(name)
    }

    pub fn seen_rv(&self, kind: Kind) -> u64 {
        self.seen_rv[kind as usize]
    }

    /// Pools as allot uses them: allot's `IPPool`s, and Cilium's pools where no `IPPool` of
    /// the same name exists.
    pub fn pools(&self) -> BTreeMap<String, PoolSpec> {
        let mut out: BTreeMap<String, PoolSpec> = BTreeMap::new();
        for kind in [Kind::CiliumPool, Kind::Pool] {
            for (name, e) in &self.objs[kind as usize] {
                if let Value::Pool { spec, .. } = &e.value {
                    out.insert(name.clone(), spec.clone());
                }
            }
        }
        out
    }

    fn pool_of(&self, name: &str) -> Option<PoolSpec> {
        [Kind::Pool, Kind::CiliumPool].into_iter().find_map(|k| match self.entry(k, name).map(|e| &e.value) {
            Some(Value::Pool { spec, .. }) => Some(spec.clone()),
            _ => None,
        })
    }

    /// A pool as grants see it: absent while it is being deleted.
    pub fn grantable_pool(&self, name: &str) -> Option<Pool> {
        if let Some(Entry { value: Value::Pool { deleting: true, .. }, .. }) = self.entry(Kind::Pool, name) {
            return None;
        }
        self.pool_of(name).map(|spec| Pool { name: name.into(), spec })
    }

    pub fn node_uid(&self, name: &str) -> Option<String> {
        self.entry(Kind::Node, name).map(|e| e.uid.clone())
    }

    pub fn grants(&self) -> Vec<BlockGrant> {
        self.blocks.iter().map(|((pool, cidr), node)| BlockGrant { pool: pool.clone(), cidr: *cidr, node: node.clone() }).collect()
    }

    pub fn released(&self) -> Vec<BlockGrant> {
        self.released.iter().map(|((pool, cidr), node)| BlockGrant { pool: pool.clone(), cidr: *cidr, node: node.clone() }).collect()
    }

    /// Released blocks whose grace has ended at `now` (unix s): name, uid, resourceVersion.
    pub fn expired_released(&self, now: u64) -> Vec<(String, String, u64)> {
        self.objs[Kind::Block as usize]
            .iter()
            .filter(|(_, e)| matches!(e.value, Value::Block { released_until: Some(t), .. } if t <= now))
            .map(|(name, e)| (name.clone(), e.uid.clone(), e.rv))
            .collect()
    }

    pub fn live(&self) -> BTreeSet<String> {
        self.live.clone()
    }

    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.objs[Kind::Node as usize]
            .values()
            .filter_map(|e| match &e.value {
                Value::Node(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn namespaces(&self) -> BTreeMap<String, Annotations> {
        self.objs[Kind::Namespace as usize]
            .iter()
            .filter_map(|(name, e)| match &e.value {
                Value::Namespace(a) if !a.is_empty() => Some((name.clone(), a.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            pools: self.pools().into_iter().map(|(name, spec)| Pool { name, spec }).collect(),
            grants: self.grants(),
            nodes: self.nodes(),
            namespaces: self.namespaces(),
            live: Some(self.live()),
            released: self.released(),
        }
    }

    /// The clock-dependent projection of the blocks and leases now.
    fn timed_view(&self, now_ms: i64) -> (Holders, Holders, BTreeSet<String>) {
        let now_s = (now_ms / 1000).max(0) as u64;
        let (mut blocks, mut released) = (BTreeMap::new(), BTreeMap::new());
        for e in self.objs[Kind::Block as usize].values() {
            if let Value::Block { pool, cidr, node, released_until } = &e.value {
                match released_until {
                    None => {
                        blocks.insert((pool.clone(), *cidr), node.clone());
                    }
                    Some(until) if *until > now_s => {
                        released.insert((pool.clone(), *cidr), node.clone());
                    }
                    // Grace over: the block is free, though its object still exists.
                    Some(_) => {}
                }
            }
        }
        let live = self.objs[Kind::Lease as usize]
            .values()
            .filter_map(|e| match &e.value {
                Value::Lease { node, expires_ms: Some(t) } if *t > now_ms => Some(node.clone()),
                _ => None,
            })
            .collect();
        (blocks, released, live)
    }

    /// Like `timed_changes`, for the one key (block or node) that `value` stands for.
    fn key_changes(&mut self, value: &Value, now_ms: i64) -> Vec<Change> {
        let mut out = Vec::new();
        match value {
            Value::Block { pool, cidr, .. } => {
                let key = (pool.clone(), *cidr);
                let now_s = (now_ms / 1000).max(0) as u64;
                // The object of this block now: its name derives from pool and CIDR.
                let current = match self.objs[Kind::Block as usize].get(&crate::block_name(pool, cidr)).map(|e| &e.value) {
                    Some(Value::Block { pool: p, cidr: c, node, released_until }) if p == pool && c == cidr => Some((node.clone(), *released_until)),
                    _ => None,
                };
                let (held, reserved) = match current {
                    Some((node, None)) => (Some(node), None),
                    Some((node, Some(until))) if until > now_s => (None, Some(node)),
                    _ => (None, None),
                };
                let block = |node| Change::Block { pool: key.0.clone(), cidr: key.1, node };
                let released = |node| Change::Released { pool: key.0.clone(), cidr: key.1, node };
                // Removals first, as `diff_maps` orders them.
                if held.is_none() && self.blocks.remove(&key).is_some() {
                    out.push(block(None));
                }
                if reserved.is_none() && self.released.remove(&key).is_some() {
                    out.push(released(None));
                }
                if let Some(node) = held
                    && self.blocks.get(&key) != Some(&node)
                {
                    self.blocks.insert(key.clone(), node.clone());
                    out.push(block(Some(node)));
                }
                if let Some(node) = reserved
                    && self.released.get(&key) != Some(&node)
                {
                    self.released.insert(key.clone(), node.clone());
                    out.push(released(Some(node)));
                }
            }
            Value::Lease { node, .. } => {
                let live = self.objs[Kind::Lease as usize].values().any(|e| {
                    matches!(&e.value, Value::Lease { node: n, expires_ms: Some(t) } if n == node && *t > now_ms)
                });
                if live != self.live.contains(node) {
                    if live {
                        self.live.insert(node.clone());
                    } else {
                        self.live.remove(node);
                    }
                    out.push(Change::Alive { node: node.clone(), live });
                }
            }
            _ => {}
        }
        out
    }

    /// Changes of the clock-dependent parts since they were last announced.
    fn timed_changes(&mut self, now_ms: i64) -> Vec<Change> {
        let (blocks, released, live) = self.timed_view(now_ms);
        let mut out = Vec::new();
        diff_maps(&self.blocks, &blocks, &mut out, |(pool, cidr), node| Change::Block { pool, cidr, node });
        diff_maps(&self.released, &released, &mut out, |(pool, cidr), node| Change::Released { pool, cidr, node });
        for gone in self.live.difference(&live) {
            out.push(Change::Alive { node: gone.clone(), live: false });
        }
        for new in live.difference(&self.live) {
            out.push(Change::Alive { node: new.clone(), live: true });
        }
        (self.blocks, self.released, self.live) = (blocks, released, live);
        out
    }
}

/// Changes turning map `old` into map `new`: puts (Some) and removals (None).
fn diff_maps<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut Vec<Change>,
    make: impl Fn(K, Option<V>) -> Change,
) {
    // Removals first: a block moving from held to released reads as given back, then reserved.
    for (k, _) in old.iter().filter(|(k, _)| !new.contains_key(*k)) {
        out.push(make(k.clone(), None));
    }
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(make(k.clone(), Some(v.clone())));
        }
    }
}

/// The shared mirror: the state, the revision watch, the event broadcast.
pub(crate) struct Mirror {
    pub state: Mutex<State>,
    revision: watch::Sender<u64>,
    /// Bumped on every watcher item applied, changed or not: what writers wait on.
    applied: watch::Sender<u64>,
    events: broadcast::Sender<StoreEvent>,
    heard: AtomicU64,
}

impl Mirror {
    pub fn new() -> Arc<Self> {
        Arc::new(Mirror {
            state: Mutex::new(State::default()),
            revision: watch::Sender::new(0),
            applied: watch::Sender::new(0),
            events: broadcast::Sender::new(allot_store::EVENT_BUFFER),
            heard: AtomicU64::new(0),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    pub fn heard_unix(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    pub fn note_heard(&self) {
        self.heard.store(now_secs(), Ordering::Relaxed);
    }

    fn emit(&self, st: &mut State, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let numbered: Vec<(u64, Change)> = changes
            .into_iter()
            .map(|c| {
                st.revision += 1;
                (st.revision, c)
            })
            .collect();
        let _ = self.events.send(StoreEvent::Changes(Arc::new(numbered)));
        self.revision.send_replace(st.revision);
    }

    /// Re-evaluates leases and release grace against the clock, announcing what changed.
    pub fn refresh(&self) {
        let mut st = self.lock();
        let changes = st.timed_changes(now_ms());
        self.emit(&mut st, changes);
    }

    /// Whether every watch is open and past its first list (nothing is failing).
    pub fn healthy(&self, kinds: &[Kind]) -> bool {
        let st = self.lock();
        // A failing watch is retried within `MAX_BACKOFF`; one that has reported no error
        // for longer has been re-opened (a retry that failed again would have said so).
        let quiet = MAX_BACKOFF + Duration::from_secs(1);
        kinds.iter().all(|k| st.synced[*k as usize] && st.broken[*k as usize].is_none_or(|t| t.elapsed() > quiet))
    }

    fn set_broken(&self, kind: Kind, broken: bool) {
        self.lock().broken[kind as usize] = broken.then(std::time::Instant::now);
    }

    /// Whether every kind finished its first list.
    pub fn synced(&self, kinds: &[Kind]) -> bool {
        let st = self.lock();
        kinds.iter().all(|k| st.synced[*k as usize])
    }

    /// Waits until `pred` holds of the state, at most `limit`; false when it did not.
    pub async fn wait_until(&self, limit: Duration, pred: impl Fn(&State) -> bool) -> bool {
        let mut rx = self.applied.subscribe();
        let wait = async {
            loop {
                if pred(&self.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Applies one watcher event of `kind`.
    fn apply(&self, kind: Kind, event: watcher::Event<(String, Option<Entry>)>) {
        let mut st = self.lock();
        let k = kind as usize;
        let note_rv = |st: &mut State, e: &Option<Entry>| {
            if let Some(e) = e {
                st.seen_rv[k] = st.seen_rv[k].max(e.rv);
            }
        };
        let mut resync = false;
        let before_pools = st.pools();
        let mut touched: Vec<String> = Vec::new();
        let mut old_entries: BTreeMap<String, Option<Entry>> = BTreeMap::new();
        match event {
            watcher::Event::Init => {
                st.relist[k] = Some(BTreeMap::new());
            }
            watcher::Event::InitApply((name, entry)) => {
                note_rv(&mut st, &entry);
                if let (Some(buf), Some(e)) = (st.relist[k].as_mut(), entry) {
                    buf.insert(name, e);
                }
            }
            watcher::Event::InitDone => {
                let fresh = st.relist[k].take().unwrap_or_default();
                resync = st.synced[k];
                st.synced[k] = true;
                let names: BTreeSet<String> = st.objs[k].keys().chain(fresh.keys()).cloned().collect();
                for name in names {
                    old_entries.insert(name.clone(), st.objs[k].get(&name).cloned());
                    touched.push(name);
                }
                st.objs[k] = fresh;
            }
            watcher::Event::Apply((name, entry)) => {
                note_rv(&mut st, &entry);
                old_entries.insert(name.clone(), st.objs[k].get(&name).cloned());
                match entry {
                    Some(e) => st.objs[k].insert(name.clone(), e),
                    // Unreadable now (a bad edit): treated as absent, with a warning logged.
                    None => st.objs[k].remove(&name),
                };
                touched.push(name);
            }
            watcher::Event::Delete((name, entry)) => {
                note_rv(&mut st, &entry);
                old_entries.insert(name.clone(), st.objs[k].remove(&name));
                touched.push(name);
            }
        }
        let mut changes = Vec::new();
        match kind {
            Kind::Pool | Kind::CiliumPool => {
                let after = st.pools();
                diff_maps(&before_pools, &after, &mut changes, |name, spec| Change::Pool { name, spec });
            }
            Kind::Node => {
                for name in &touched {
                    let old = old_entries.get(name).cloned().flatten().map(|e| e.value);
                    let new = st.objs[k].get(name).map(|e| e.value.clone());
                    if old != new {
                        let record = match new {
                            Some(Value::Node(r)) => Some(r),
                            _ => None,
                        };
                        changes.push(Change::Node { name: name.clone(), record });
                    }
                }
            }
            Kind::Namespace => {
                let ann = |v: Option<Value>| match v {
                    Some(Value::Namespace(a)) if !a.is_empty() => Some(a),
                    _ => None,
                };
                for name in &touched {
                    let old = ann(old_entries.get(name).cloned().flatten().map(|e| e.value));
                    let new = ann(st.objs[k].get(name).map(|e| e.value.clone()));
                    if old != new {
                        changes.push(Change::Namespace { name: name.clone(), annotations: new });
                    }
                }
            }
            Kind::Block | Kind::Lease => {
                // Only the touched objects' keys: a full pass over every block per event
                // would be quadratic in a grant storm (the tick does the full pass).
                let now = now_ms();
                for name in &touched {
                    let old = old_entries.get(name).cloned().flatten();
                    let new = st.objs[k].get(name).cloned();
                    for e in [old, new].into_iter().flatten() {
                        changes.extend(st.key_changes(&e.value, now));
                    }
                }
            }
        }
        self.emit(&mut st, changes);
        if resync {
            let _ = self.events.send(StoreEvent::Resync);
        }
        self.applied.send_modify(|n| *n += 1);
    }
}

/// Follows one kind until the mirror is dropped: kube-rs's watcher resumes from the last
/// resourceVersion after a broken stream and lists afresh after 410 Gone (then subscribers get
/// `Resync`); errors back off and retry.
pub(crate) async fn follow<K>(
    mirror: std::sync::Weak<Mirror>,
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: fn(&K) -> Option<Value>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let entry = move |o: &K| -> (String, Option<Entry>) {
        let name = o.name_any();
        let rv = o.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0);
        let uid = o.uid().unwrap_or_default();
        (name, convert(o).map(|value| Entry { uid, rv, value }))
    };
    let mut stream = watcher(api, config).backoff(Backoff::default()).boxed();
    while let Some(item) = stream.next().await {
        let Some(mirror) = mirror.upgrade() else { return };
        match item {
            Ok(ev) => {
                mirror.note_heard();
                mirror.set_broken(kind, false);
                let ev = match ev {
                    watcher::Event::Apply(o) => watcher::Event::Apply(entry(&o)),
                    watcher::Event::Delete(o) => watcher::Event::Delete(entry(&o)),
                    watcher::Event::InitApply(o) => watcher::Event::InitApply(entry(&o)),
                    watcher::Event::Init => watcher::Event::Init,
                    watcher::Event::InitDone => watcher::Event::InitDone,
                };
                mirror.apply(kind, ev);
            }
            Err(e) => {
                mirror.set_broken(kind, true);
                tracing::warn!(?kind, error = %e, "Kubernetes watch failed; resuming");
            }
        }
    }
}

/// The longest wait before a failed watch is retried.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Retries of a failed watch: 200 ms, doubling up to `MAX_BACKOFF` (kube-rs's default goes to
/// 30 s; an agent's view should come back sooner after an apiserver restart).
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(200))
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Ticks `refresh` once a second until the mirror is dropped. Every `probe_every` it also
/// asks the API server for one object: kube-rs's watcher does not surface bookmarks, so in a
/// quiet cluster this answer, while every watch is open and not failing, is what keeps
/// `heard_unix` current (a watch that broke stops it until the watch is back).
pub(crate) async fn tick(mirror: std::sync::Weak<Mirror>, probe: Api<crate::IPPool>, kinds: Vec<Kind>, probe_every: Duration) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut last_probe = tokio::time::Instant::now();
    loop {
        every.tick().await;
        let Some(m) = mirror.upgrade() else { return };
        m.refresh();
        if last_probe.elapsed() >= probe_every && m.healthy(&kinds) {
            last_probe = tokio::time::Instant::now();
            drop(m);
            let answered = tokio::time::timeout(probe_every, probe.list_metadata(&kube::api::ListParams::default().limit(1))).await;
            let Some(m) = mirror.upgrade() else { return };
            if matches!(answered, Ok(Ok(_))) && m.healthy(&kinds) {
                m.note_heard();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(pool: &str, cidr: &str, node: &str, released_until: Option<u64>) -> Value {
        Value::Block { pool: pool.into(), cidr: cidr.parse().unwrap(), node: node.into(), released_until }
    }

    fn apply(m: &Mirror, kind: Kind, name: &str, rv: u64, v: Value) {
        m.apply(kind, watcher::Event::Apply((name.into(), Some(Entry { uid: format!("u-{name}"), rv, value: v }))));
    }

    #[test]
    fn a_block_moving_to_released_and_expiring_is_announced_in_order() {
        let m = Mirror::new();
        let mut rx = m.events();
        let name = crate::block_name("p", &"10.0.0.0/28".parse().unwrap());
        apply(&m, Kind::Block, &name, 5, block("p", "10.0.0.0/28", "n1", None));
        let until = now_secs() + 1;
        apply(&m, Kind::Block, &name, 6, block("p", "10.0.0.0/28", "n1", Some(until)));
        let mut all = Vec::new();
        while let Ok(StoreEvent::Changes(c)) = rx.try_recv() {
            all.extend(c.iter().cloned());
        }
        let cidr: IpNet = "10.0.0.0/28".parse().unwrap();
        assert_eq!(
            all.into_iter().map(|(_, c)| c).collect::<Vec<_>>(),
            vec![
                Change::Block { pool: "p".into(), cidr, node: Some("n1".into()) },
                Change::Block { pool: "p".into(), cidr, node: None },
                Change::Released { pool: "p".into(), cidr, node: Some("n1".into()) },
            ]
        );
        assert_eq!(m.lock().seen_rv(Kind::Block), 6);
        // Past the grace the clock alone ends the reservation.
        let changes = m.lock().timed_changes((until as i64 + 1) * 1000);
        assert_eq!(changes, vec![Change::Released { pool: "p".into(), cidr, node: None }]);
        assert!(m.lock().released().is_empty());
    }

    #[test]
    fn allot_pools_win_over_cilium_pools_of_the_same_name() {
        let m = Mirror::new();
        let spec = |c: &str| PoolSpec { ipv4: Some(allot_core::FamilySpec { cidrs: vec![c.parse().unwrap()], mask_size: 24 }), ipv6: None };
        apply(&m, Kind::CiliumPool, "a", 1, Value::Pool { spec: spec("10.1.0.0/16"), deleting: false });
        apply(&m, Kind::Pool, "a", 2, Value::Pool { spec: spec("10.2.0.0/16"), deleting: false });
        assert_eq!(m.lock().pools()["a"], spec("10.2.0.0/16"));
        m.apply(Kind::Pool, watcher::Event::Delete(("a".into(), None)));
        assert_eq!(m.lock().pools()["a"], spec("10.1.0.0/16"));
    }

    #[test]
    fn a_relist_replaces_a_kind_and_asks_for_resync() {
        let m = Mirror::new();
        for ev in [watcher::Event::Init, watcher::Event::InitDone] {
            m.apply(Kind::Node, ev);
        }
        let mut rx = m.events();
        let rec = |n: &str| Value::Node(NodeRecord { name: n.into(), ..Default::default() });
        apply(&m, Kind::Node, "n1", 3, rec("n1"));
        m.apply(Kind::Node, watcher::Event::Init);
        m.apply(Kind::Node, watcher::Event::InitApply(("n2".into(), Some(Entry { uid: "x".into(), rv: 9, value: rec("n2") }))));
        m.apply(Kind::Node, watcher::Event::InitDone);
        assert_eq!(m.lock().nodes().iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["n2"]);
        let mut got_resync = false;
        while let Ok(ev) = rx.try_recv() {
            got_resync |= matches!(ev, StoreEvent::Resync);
        }
        assert!(got_resync);
    }
}
