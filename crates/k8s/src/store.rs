//! `KubeStore`: the cluster store on the Kubernetes API, through kube-rs.
//!
//! Reads come from a local mirror fed by one watch per kind (see `mirror`); each write goes to
//! the API and then waits, bounded, until the mirror has seen it, so a read after a write sees
//! it. Kubernetes has no transaction across objects; how each cross-object rule holds:
//! - a block has one holder: one `IPBlock` per block, named from pool and CIDR; a grant is a
//!   create, and the apiserver refuses a second with 409 AlreadyExists;
//! - a block only inside a current CIDR of its pool: the grant checks the pool (fresh GET)
//!   after its create and deletes its own block (uid precondition) if the pool no longer
//!   covers it; a pool change re-lists the blocks after its write and reverts itself if a
//!   block older than the write lies outside (see `apply_pools`);
//! - pool rules among allot's own writers (overlap, in-use CIDRs): validated against fresh
//!   lists while holding the `allot-pool-writer` Lease, written with resourceVersion
//!   preconditions; `kubectl` writes are checked by the validating webhook (`admission`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use allot_core::{ApplyAction, BlockGrant, Pool, PoolSpec, pool as rules};
use allot_store::{Annotations, NodeRecord, Snapshot, Store, StoreError, StoreEvent, block_fits};
use allot_wire::PoolRequest;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::mirror::{self, DELETING, Kind, Mirror, RELEASED_UNTIL, Value, now_ms, now_secs};
use crate::{AllotNode, AllotNodeSpec, IPBlock, IPBlockSpec, IPPool, IPPoolSpec, NODE_LABEL, POOL_LABEL, block_name};

/// The label every liveness Lease carries (value `node`), so the mirror watches only those.
pub const LIVENESS_LABEL: &str = "allot.dev/liveness";
/// The Lease that serializes allot's own pool writes (`apply_pools`, `delete_pool`).
pub const POOL_LOCK: &str = "allot-pool-writer";
/// How long the pool lock holds before another writer may break it (a crashed holder).
const POOL_LOCK_SECS: i32 = 15;
/// Retries of a write that lost a race (409) before giving up.
const RETRIES: usize = 16;
/// Grants in flight at once in `grant_blocks`.
const GRANTS_IN_FLIGHT: usize = 16;
/// Annotation prefixes of Namespaces that are not allot's business (kubectl's bookkeeping).
const IGNORED_NAMESPACE_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/"];

/// How the Kubernetes store runs.
#[derive(Clone, Debug)]
pub struct KubeStoreOptions {
    /// Where liveness Leases and the pool lock live: allot's namespace.
    pub namespace: String,
    /// Also read `cilium.io/v2alpha1 CiliumPodIPPool` objects as pools (read-only; an
    /// `IPPool` of the same name wins).
    pub watch_cilium_pools: bool,
    /// How long blocks taken from a deleted node stay reserved to it.
    pub release_grace: Duration,
    /// Every API request gives up after this long; so does the first list of each kind.
    pub timeout: Duration,
    /// How long a write waits for the mirror to see it before returning anyway.
    pub settle: Duration,
    /// How often a quiet mirror asks the API server whether it still answers (`heard_unix`).
    pub probe_every: Duration,
}

impl Default for KubeStoreOptions {
    fn default() -> Self {
        KubeStoreOptions {
            namespace: default_namespace(),
            watch_cilium_pools: false,
            release_grace: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            settle: Duration::from_secs(5),
            probe_every: Duration::from_secs(5),
        }
    }
}

/// The pod's namespace (from its service account), else `allot-system`.
pub fn default_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "allot-system".into())
}

/// The `ApiResource` of Cilium's pools.
pub fn cilium_pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cilium.io", "v2alpha1", "CiliumPodIPPool"), "ciliumpodippools")
}

/// The liveness Lease of a node's agent, as `announce_alive` returned it.
#[derive(Clone, Debug)]
pub struct AliveLease {
    pub node: String,
    pub ttl: Duration,
    uid: String,
}

/// Aborts the watch tasks when the last clone of the store goes.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    opts: Arc<KubeStoreOptions>,
    release_grace: Duration,
    mirror: Arc<Mirror>,
    _tasks: Arc<Tasks>,
    /// This process's identity as holder of the pool lock.
    id: Arc<str>,
}

/// A failed request: the HTTP status when the apiserver answered, and the error to return.
struct Fail {
    code: Option<u16>,
    err: StoreError,
}

impl From<Fail> for StoreError {
    fn from(f: Fail) -> Self {
        f.err
    }
}

fn rv_of<K: Resource>(o: &K) -> u64 {
    o.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn preconditions(uid: Option<String>, rv: Option<String>) -> DeleteParams {
    DeleteParams { preconditions: Some(Preconditions { uid, resource_version: rv }), ..Default::default() }
}

/// The allot pool an `IPPool` object describes; None (with a warning) when it does not parse.
fn pool_of(p: &IPPool) -> Option<Pool> {
    match PoolSpec::try_from(&p.spec) {
        Ok(spec) => Some(Pool { name: p.name_any(), spec }),
        Err(e) => {
            tracing::warn!(pool = %p.name_any(), error = %e, "IPPool does not parse; ignored");
            None
        }
    }
}

fn block_of(b: &IPBlock) -> Option<(BlockGrant, Option<u64>)> {
    let cidr = match b.spec.cidr.parse() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(block = %b.name_any(), error = %e, "IPBlock has a bad cidr; ignored");
            return None;
        }
    };
    let released = b.annotations().get(RELEASED_UNTIL).map(|v| v.parse::<u64>().unwrap_or(0));
    Some((BlockGrant { pool: b.spec.pool.clone(), cidr, node: b.spec.node.clone() }, released))
}

fn node_record(n: &AllotNode) -> NodeRecord {
    let addrs = &n.spec.addresses;
    let ip = addrs.iter().find(|a| a.kind == "InternalIP").or(addrs.first()).and_then(|a| a.ip.parse().ok());
    NodeRecord {
        name: n.name_any(),
        ip,
        requested: n
            .spec
            .ipam
            .pools
            .requested
            .iter()
            .map(|r| PoolRequest {
                pool: r.pool.clone(),
                needed: allot_wire::Needed { ipv4_addrs: r.needed.ipv4_addrs, ipv6_addrs: r.needed.ipv6_addrs },
            })
            .collect(),
        operator_error: n.status.as_ref().and_then(|s| s.ipam.operator_status.error.clone()),
    }
}

fn namespace_annotations(ns: &Namespace) -> Annotations {
    ns.annotations()
        .iter()
        .filter(|(k, _)| !IGNORED_NAMESPACE_ANNOTATIONS.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn lease_expiry_ms(l: &Lease) -> Option<i64> {
    let spec = l.spec.as_ref()?;
    let renew = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    Some(renew.0.as_millisecond() + i64::from(spec.lease_duration_seconds?) * 1000)
}

fn cilium_spec(o: &DynamicObject) -> Option<PoolSpec> {
    let spec: IPPoolSpec = match serde_json::from_value(o.data.get("spec").cloned().unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(pool = %o.name_any(), error = %e, "CiliumPodIPPool does not parse; ignored");
            return None;
        }
    };
    PoolSpec::try_from(&spec).map_err(|e| tracing::warn!(pool = %o.name_any(), error = %e, "CiliumPodIPPool ignored")).ok()
}

impl KubeStore {
    /// Starts the watches and waits for the first list of every kind.
    pub async fn connect(client: Client, opts: KubeStoreOptions) -> Result<Self, StoreError> {
        let mirror = Mirror::new();
        let weak = Arc::downgrade(&mirror);
        let mut tasks = vec![
            tokio::spawn(mirror::follow(weak.clone(), Api::<IPPool>::all(client.clone()), watcher::Config::default(), Kind::Pool, |p| {
                pool_of(p).map(|pool| Value::Pool { spec: pool.spec, deleting: p.annotations().contains_key(DELETING) })
            })),
            tokio::spawn(mirror::follow(weak.clone(), Api::<IPBlock>::all(client.clone()), watcher::Config::default(), Kind::Block, |b| {
                block_of(b).map(|(g, released_until)| Value::Block { pool: g.pool, cidr: g.cidr, node: g.node, released_until })
            })),
            tokio::spawn(mirror::follow(weak.clone(), Api::<AllotNode>::all(client.clone()), watcher::Config::default(), Kind::Node, |n| {
                Some(Value::Node(node_record(n)))
            })),
            tokio::spawn(mirror::follow(weak.clone(), Api::<Namespace>::all(client.clone()), watcher::Config::default(), Kind::Namespace, |n| {
                Some(Value::Namespace(namespace_annotations(n)))
            })),
            tokio::spawn(mirror::follow(
                weak.clone(),
                Api::<Lease>::namespaced(client.clone(), &opts.namespace),
                watcher::Config::default().labels(&format!("{LIVENESS_LABEL}=node")),
                Kind::Lease,
                |l| {
                    let node = l.labels().get(NODE_LABEL).cloned()?;
                    Some(Value::Lease { node, expires_ms: lease_expiry_ms(l) })
                },
            )),
        ];
        let mut kinds = vec![Kind::Pool, Kind::Block, Kind::Node, Kind::Namespace, Kind::Lease];
        if opts.watch_cilium_pools {
            let api = Api::<DynamicObject>::all_with(client.clone(), &cilium_pool_resource());
            tasks.push(tokio::spawn(mirror::follow(weak.clone(), api, watcher::Config::default(), Kind::CiliumPool, |o| {
                cilium_spec(o).map(|spec| Value::Pool { spec, deleting: false })
            })));
            kinds.push(Kind::CiliumPool);
        }
        tasks.push(tokio::spawn(mirror::tick(weak.clone(), Api::all(client.clone()), kinds.clone(), opts.probe_every)));
        let store = KubeStore {
            client,
            release_grace: opts.release_grace,
            opts: Arc::new(opts),
            mirror,
            _tasks: Arc::new(Tasks(tasks)),
            id: format!("allot-{}-{}", std::process::id(), now_ms()).into(),
        };
        let limit = store.opts.timeout;
        if !store.wait_synced(&kinds, limit).await {
            return Err(StoreError::Backend(format!(
                "the Kubernetes API did not answer the first list of allot's objects within {limit:?}: \
                 check that the API server is reachable and that allot's CRDs are installed (allot crds | kubectl apply -f -)"
            )));
        }
        Ok(store)
    }

    async fn wait_synced(&self, kinds: &[Kind], limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.mirror.synced(kinds) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// This store with blocks of deleted nodes reserved for `grace` instead of the configured time.
    pub fn with_release_grace(&self, grace: Duration) -> Self {
        KubeStore { release_grace: grace, ..self.clone() }
    }

    pub fn namespace(&self) -> &str {
        &self.opts.namespace
    }

    /// One API request, bounded by the configured timeout.
    async fn req<T>(&self, what: &str, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Fail> {
        match tokio::time::timeout(self.opts.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let code = match &e {
                    kube::Error::Api(s) => Some(s.code),
                    _ => None,
                };
                Err(Fail { code, err: StoreError::Backend(format!("Kubernetes API, {what}: {e}")) })
            }
            Err(_) => Err(Fail {
                code: None,
                err: StoreError::Backend(format!("Kubernetes API, {what}: no answer within {:?}", self.opts.timeout)),
            }),
        }
    }

    /// Waits until the mirror has seen resourceVersion `rv` of `kind` (our own write).
    async fn settle(&self, kind: Kind, rv: u64) {
        if !self.mirror.wait_until(self.opts.settle, |st| st.seen_rv(kind) >= rv).await {
            tracing::warn!(?kind, rv, "the watch has not shown our own write yet; reads may lag");
        }
    }

    /// Waits until the mirror no longer has object `name` with `uid` (our own delete).
    async fn settle_gone(&self, kind: Kind, name: &str, uid: &str) {
        if !self.mirror.wait_until(self.opts.settle, |st| st.entry(kind, name).is_none_or(|e| e.uid != uid)).await {
            tracing::warn!(?kind, name, "the watch has not shown our own delete yet; reads may lag");
        }
    }

    fn pools_api(&self) -> Api<IPPool> {
        Api::all(self.client.clone())
    }
    fn blocks_api(&self) -> Api<IPBlock> {
        Api::all(self.client.clone())
    }
    fn nodes_api(&self) -> Api<AllotNode> {
        Api::all(self.client.clone())
    }
    fn leases_api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.opts.namespace)
    }

    /// The pool as it is now on the API server (a quorum read); None when absent or being
    /// deleted. Cilium's pool of the name counts when no `IPPool` has it.
    async fn fresh_pool(&self, name: &str) -> Result<Option<Pool>, StoreError> {
        if let Some(p) = self.req("reading an IPPool", self.pools_api().get_opt(name)).await? {
            return Ok(if p.annotations().contains_key(DELETING) { None } else { pool_of(&p) });
        }
        if self.opts.watch_cilium_pools {
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &cilium_pool_resource());
            if let Some(o) = self.req("reading a CiliumPodIPPool", api.get_opt(name)).await? {
                return Ok(cilium_spec(&o).map(|spec| Pool { name: name.into(), spec }));
            }
        }
        Ok(None)
    }

    /// Every `IPBlock` as it is now, with the resourceVersion of the list.
    async fn fresh_blocks(&self) -> Result<Vec<IPBlock>, StoreError> {
        Ok(self.req("listing IPBlocks", self.blocks_api().list(&ListParams::default())).await?.items)
    }

    fn held(blocks: &[IPBlock]) -> Vec<BlockGrant> {
        blocks.iter().filter_map(block_of).filter(|(_, released)| released.is_none()).map(|(g, _)| g).collect()
    }

    /// Takes the Lease that serializes allot's pool writers. A holder that crashed loses it
    /// after `POOL_LOCK_SECS`.
    async fn pool_lock(&self) -> Result<PoolLock, StoreError> {
        let api = self.leases_api();
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        loop {
            let lease = Lease {
                metadata: kube::api::ObjectMeta { name: Some(POOL_LOCK.into()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.id.to_string()),
                    lease_duration_seconds: Some(POOL_LOCK_SECS),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    ..Default::default()
                }),
            };
            match self.req("taking the pool lock", api.create(&PostParams::default(), &lease)).await {
                Ok(l) => return Ok(PoolLock { api, uid: l.uid() }),
                Err(Fail { code: Some(409), .. }) => {}
                Err(Fail { code: Some(404), .. }) => {
                    return Err(StoreError::Backend(format!(
                        "Kubernetes API: namespace {:?} does not exist: create it, or point allot at its namespace (--namespace)",
                        self.opts.namespace
                    )));
                }
                Err(f) => return Err(f.err),
            }
            if let Some(held) = self.req("reading the pool lock", api.get_opt(POOL_LOCK)).await? {
                if lease_expiry_ms(&held).is_some_and(|t| t < now_ms()) {
                    tracing::warn!(holder = ?held.spec.as_ref().and_then(|s| s.holder_identity.clone()), "breaking an expired pool lock");
                    let dp = preconditions(held.uid(), held.resource_version());
                    let _ = self.req("breaking the pool lock", api.delete(POOL_LOCK, &dp)).await;
                    continue;
                }
                if tokio::time::Instant::now() >= deadline {
                    let holder = held.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                    return Err(StoreError::Backend(format!(
                        "another writer ({holder}) holds the pool lock (Lease {}/{POOL_LOCK}); try again",
                        self.opts.namespace
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes one pool: create, or replace with the resourceVersion read (a precondition).
    async fn write_pool(&self, pool: &Pool, current: Option<&IPPool>) -> Result<IPPool, Fail> {
        let api = self.pools_api();
        match current {
            None => {
                let obj = IPPool::new(&pool.name, IPPoolSpec::from(&pool.spec));
                self.req("creating an IPPool", api.create(&PostParams::default(), &obj)).await
            }
            Some(cur) => {
                let mut obj = cur.clone();
                obj.spec = IPPoolSpec::from(&pool.spec);
                obj.annotations_mut().remove(DELETING);
                self.req("replacing an IPPool", api.replace(&pool.name, &PostParams::default(), &obj)).await
            }
        }
    }

    /// Undoes pool writes of a refused apply: old specs back, created pools deleted; each with
    /// the written object's resourceVersion as precondition (a later change is kept).
    async fn revert_pools(&self, written: &[(IPPool, Option<IPPool>)]) {
        for (new, old) in written {
            let name = new.name_any();
            let outcome = match old {
                Some(old) => {
                    let mut obj = new.clone();
                    obj.spec = old.spec.clone();
                    self.req("reverting an IPPool", self.pools_api().replace(&name, &PostParams::default(), &obj)).await.map(|_| ())
                }
                None => self.req("reverting an IPPool", self.pools_api().delete(&name, &preconditions(new.uid(), new.resource_version()))).await.map(|_| ()),
            };
            if let Err(f) = outcome {
                tracing::error!(pool = %name, error = %f.err, "reverting a refused pool change failed");
            }
        }
    }

    async fn apply_pools_locked(&self, incoming: &[Pool]) -> Result<Vec<ApplyAction>, StoreError> {
        for _ in 0..RETRIES {
            let listed = self.req("listing IPPools", self.pools_api().list(&ListParams::default())).await?.items;
            let blocks = self.fresh_blocks().await?;
            let objects: BTreeMap<String, IPPool> = listed.into_iter().map(|p| (p.name_any(), p)).collect();
            let mut existing: BTreeMap<String, Pool> = self.mirror.lock().pools().into_iter().map(|(name, spec)| (name.clone(), Pool { name, spec })).collect();
            // Cilium's pools from the mirror, allot's from the fresh list.
            existing.retain(|name, _| !objects.contains_key(name) && self.mirror.lock().entry(Kind::Pool, name).is_none());
            existing.extend(objects.values().filter_map(pool_of).map(|p| (p.name.clone(), p)));
            let existing: Vec<Pool> = existing.into_values().collect();
            let actions = rules::validate_apply(&existing, &Self::held(&blocks), incoming)?;

            let mut written: Vec<(IPPool, Option<IPPool>)> = Vec::new();
            let mut lost_race = false;
            for (pool, action) in incoming.iter().zip(&actions) {
                let current = objects.get(&pool.name);
                // A deletion mark seen under the lock was left by a writer that crashed
                // mid-delete: applying the pool again clears it.
                let stale_mark = current.is_some_and(|o| o.annotations().contains_key(DELETING));
                if *action == ApplyAction::Unchanged && !stale_mark {
                    continue;
                }
                match self.write_pool(pool, current).await {
                    Ok(obj) => written.push((obj, current.cloned())),
                    Err(Fail { code: Some(409), .. }) => {
                        lost_race = true;
                        break;
                    }
                    Err(f) => {
                        self.revert_pools(&written).await;
                        return Err(f.err);
                    }
                }
            }
            if lost_race {
                // A kubectl write got in between: undo ours, read again, validate again.
                self.revert_pools(&written).await;
                continue;
            }
            // A grant whose create came before our write may have checked the old pool: if
            // its block now lies outside, this change is refused and undone. A grant whose
            // create came after our write sees the new pool in its re-check and removes its
            // own block (resourceVersions order the two: they are etcd revisions).
            if written.iter().any(|(_, old)| old.is_some()) {
                let blocks = self.fresh_blocks().await?;
                let mut racing = Vec::new();
                for (obj, old) in &written {
                    let (Some(new_pool), Some(_)) = (pool_of(obj), old) else { continue };
                    for b in &blocks {
                        let Some((g, None)) = block_of(b) else { continue };
                        if g.pool == new_pool.name && !block_fits(&new_pool, &g) && rv_of(b) < rv_of(obj) {
                            racing.push(g);
                        }
                    }
                }
                if !racing.is_empty() {
                    self.revert_pools(&written).await;
                    rules::validate_apply(&existing, &racing, incoming)?;
                    return Err(StoreError::Backend("a block was granted while the pools changed; try again".into()));
                }
            }
            if let Some(rv) = written.iter().map(|(o, _)| rv_of(o)).max() {
                self.settle(Kind::Pool, rv).await;
            }
            return Ok(actions);
        }
        Err(StoreError::Backend("pools: too many concurrent writers; try again".into()))
    }

    async fn delete_pool_locked(&self, name: &str) -> Result<(), StoreError> {
        let api = self.pools_api();
        let Some(pool) = self.req("reading an IPPool", api.get_opt(name)).await? else {
            if self.mirror.lock().entry(Kind::CiliumPool, name).is_some() {
                return Err(StoreError::Conflict(format!(
                    "pool {name:?} is a CiliumPodIPPool, which allot only reads: delete it with kubectl delete ciliumpodippool {name}"
                )));
            }
            return Err(StoreError::NotFound(format!("pool {name:?} not found")));
        };
        rules::validate_delete(name, &Self::held(&self.fresh_blocks().await?))?;
        // Marked first: a grant that re-checks after the mark sees no pool and removes its
        // block; one whose create came before the mark is found by the list below.
        let mut marked = pool.clone();
        marked.annotations_mut().insert(DELETING.into(), "true".into());
        let marked = self.req("marking an IPPool deleted", api.replace(name, &PostParams::default(), &marked)).await?;
        let racing: Vec<BlockGrant> = self
            .fresh_blocks()
            .await?
            .iter()
            .filter(|b| rv_of(*b) < rv_of(&marked))
            .filter_map(block_of)
            .filter(|(g, released)| released.is_none() && g.pool == name)
            .map(|(g, _)| g)
            .collect();
        // A refused deletion takes the mark back: a marked pool reads as gone.
        let unmark = || async {
            let mut unmarked = marked.clone();
            unmarked.annotations_mut().remove(DELETING);
            if let Err(f) = self.req("unmarking an IPPool", api.replace(name, &PostParams::default(), &unmarked)).await {
                tracing::error!(pool = name, error = %f.err, "unmarking a pool whose deletion was refused failed");
            }
        };
        if let Err(e) = rules::validate_delete(name, &racing) {
            unmark().await;
            return Err(e.into());
        }
        // The DELETE itself can be refused (an admission webhook, a lost precondition).
        if let Err(e) = self.req("deleting an IPPool", api.delete(name, &preconditions(marked.uid(), marked.resource_version()))).await {
            unmark().await;
            return Err(e.into());
        }
        self.settle_gone(Kind::Pool, name, &marked.uid().unwrap_or_default()).await;
        Ok(())
    }

    /// Deletes a node even while its agent is live (`allot node delete --force`).
    pub async fn force_delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.delete_node_inner(name, true).await
    }

    /// Whether `node`'s liveness Lease is current on the API server now.
    async fn is_live(&self, node: &str) -> Result<bool, StoreError> {
        let lease = self.req("reading a liveness Lease", self.leases_api().get_opt(&format!("allot-node-{node}"))).await?;
        Ok(lease.as_ref().and_then(lease_expiry_ms).is_some_and(|t| t > now_ms()))
    }

    async fn delete_node_inner(&self, name: &str, force: bool) -> Result<Vec<BlockGrant>, StoreError> {
        if !force && self.is_live(name).await? {
            return Err(StoreError::Conflict(format!(
                "node {name:?} is live: its agent keeps its liveness Lease, and its pods use its blocks; \
                 stop the agent on {name} first (the Lease ends when it stops), or pass --force if the node is gone for good"
            )));
        }
        let node = self.req("reading an AllotNode", self.nodes_api().get_opt(name)).await?;
        let api = self.blocks_api();
        let mut released = Vec::new();
        let mut last_rv = 0;
        for _ in 0..RETRIES {
            let held: Vec<(IPBlock, BlockGrant)> = self
                .fresh_blocks()
                .await?
                .into_iter()
                .filter_map(|b| match block_of(&b) {
                    Some((g, None)) if g.node == name => Some((b, g)),
                    _ => None,
                })
                .collect();
            if held.is_empty() {
                break;
            }
            let mut lost = false;
            for (b, g) in held {
                let bname = b.name_any();
                // Explicit, not left to owner garbage collection: the grace needs the object,
                // and a slow collector must not leave blocks held by a deleted node.
                let outcome = if self.release_grace.is_zero() {
                    let (uid, rv) = (b.uid().unwrap_or_default(), b.resource_version());
                    let r = self.req("deleting an IPBlock", api.delete(&bname, &preconditions(Some(uid.clone()), rv))).await.map(|_| ());
                    if r.is_ok() {
                        self.settle_gone(Kind::Block, &bname, &uid).await;
                    }
                    r
                } else {
                    let mut obj = b.clone();
                    let until = now_secs() + self.release_grace.as_secs().max(1);
                    obj.annotations_mut().insert(RELEASED_UNTIL.into(), until.to_string());
                    obj.metadata.owner_references = None;
                    self.req("releasing an IPBlock", api.replace(&bname, &PostParams::default(), &obj)).await.map(|o| last_rv = last_rv.max(rv_of(&o)))
                };
                match outcome {
                    Ok(()) => released.push(g),
                    Err(Fail { code: Some(404 | 409), .. }) => lost = true,
                    Err(f) => return Err(f.err),
                }
            }
            if !lost {
                break;
            }
        }
        if node.is_none() && released.is_empty() {
            return Err(StoreError::NotFound(format!("node {name:?} not found")));
        }
        if let Some(node) = node {
            let uid = node.uid().unwrap_or_default();
            match self.req("deleting an AllotNode", self.nodes_api().delete(name, &preconditions(Some(uid.clone()), None))).await {
                Ok(_) | Err(Fail { code: Some(404 | 409), .. }) => self.settle_gone(Kind::Node, name, &uid).await,
                Err(f) => return Err(f.err),
            }
        }
        if last_rv > 0 {
            self.settle(Kind::Block, last_rv).await;
        }
        released.sort();
        Ok(released)
    }

    /// Deletes the `IPBlock`s whose release grace has ended (the operator calls this now and
    /// then; a grant of such a block also removes it). Returns how many it deleted.
    pub async fn expire_released(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        let expired: Vec<(String, String, u64)> = {
            let st = self.mirror.lock();
            st.expired_released(now)
        };
        let mut n = 0;
        for (name, uid, rv) in expired {
            match self.req("deleting an expired IPBlock", self.blocks_api().delete(&name, &preconditions(Some(uid.clone()), Some(rv.to_string())))).await {
                Ok(_) => {
                    n += 1;
                    self.settle_gone(Kind::Block, &name, &uid).await;
                }
                Err(Fail { code: Some(404 | 409), .. }) => {}
                Err(f) => return Err(f.err),
            }
        }
        Ok(n)
    }

    /// After a successful create: the pool as it is now must still cover the block, else the
    /// block is removed again (uid precondition) and the grant reports false.
    async fn recheck_grant(&self, created: &IPBlock, grant: &BlockGrant) -> Result<bool, StoreError> {
        let fits = self.fresh_pool(&grant.pool).await?.is_some_and(|p| block_fits(&p, grant));
        if fits {
            self.settle(Kind::Block, rv_of(created)).await;
            return Ok(true);
        }
        tracing::info!(pool = %grant.pool, cidr = %grant.cidr, "the pool changed under a grant; removing the block again");
        let name = created.name_any();
        match self.req("removing a block its pool lost", self.blocks_api().delete(&name, &preconditions(created.uid(), None))).await {
            Ok(_) | Err(Fail { code: Some(404 | 409), .. }) => {}
            Err(f) => return Err(f.err),
        }
        self.settle_gone(Kind::Block, &name, &created.uid().unwrap_or_default()).await;
        Ok(false)
    }

    fn block_object(&self, grant: &BlockGrant) -> IPBlock {
        let mut obj = IPBlock::new(
            &block_name(&grant.pool, &grant.cidr),
            IPBlockSpec { pool: grant.pool.clone(), cidr: grant.cidr.to_string(), node: grant.node.clone() },
        );
        obj.metadata.labels = Some([(POOL_LABEL.to_string(), grant.pool.clone()), (NODE_LABEL.to_string(), grant.node.clone())].into());
        obj.metadata.owner_references = self.owner_of(&grant.node);
        obj
    }

    /// The ownerReference to the node's `AllotNode`, when the mirror knows it.
    fn owner_of(&self, node: &str) -> Option<Vec<OwnerReference>> {
        let uid = self.mirror.lock().node_uid(node)?;
        Some(vec![OwnerReference {
            api_version: format!("{}/{}", crate::GROUP, crate::VERSION),
            kind: "AllotNode".into(),
            name: node.into(),
            uid,
            ..Default::default()
        }])
    }
}

/// The pool lock, held until `release`.
struct PoolLock {
    api: Api<Lease>,
    uid: Option<String>,
}

impl PoolLock {
    async fn release(self) {
        if let Err(e) = self.api.delete(POOL_LOCK, &preconditions(self.uid, None)).await {
            tracing::warn!(error = %e, "releasing the pool lock failed; it runs out by itself");
        }
    }
}

/// Liveness is a Lease `allot-node-<node>` in allot's namespace.
impl allot_store::Liveness for KubeStore {
    type Lease = AliveLease;

    /// Marks `node` live with a Lease of `ttl` (`allot-node-<node>` in allot's namespace);
    /// a Lease left by an earlier run of the agent is taken over.
    async fn announce_alive(&self, node: &str, ttl: Duration) -> Result<AliveLease, StoreError> {
        let api = self.leases_api();
        let name = format!("allot-node-{node}");
        let spec = LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(ttl.as_secs().clamp(1, i32::MAX as u64) as i32),
            acquire_time: Some(micro_now()),
            renew_time: Some(micro_now()),
            ..Default::default()
        };
        for _ in 0..RETRIES {
            let lease = match self.req("reading a liveness Lease", api.get_opt(&name)).await? {
                None => {
                    let lease = Lease {
                        metadata: kube::api::ObjectMeta {
                            name: Some(name.clone()),
                            labels: Some([(LIVENESS_LABEL.to_string(), "node".to_string()), (NODE_LABEL.to_string(), node.to_string())].into()),
                            ..Default::default()
                        },
                        spec: Some(spec.clone()),
                    };
                    self.req("creating a liveness Lease", api.create(&PostParams::default(), &lease)).await
                }
                Some(mut old) => {
                    old.spec = Some(spec.clone());
                    self.req("taking over a liveness Lease", api.replace(&name, &PostParams::default(), &old)).await
                }
            };
            match lease {
                Ok(l) => {
                    self.settle(Kind::Lease, rv_of(&l)).await;
                    return Ok(AliveLease { node: node.into(), ttl, uid: l.uid().unwrap_or_default() });
                }
                Err(Fail { code: Some(409), .. }) => continue,
                Err(f) => return Err(f.err),
            }
        }
        Err(StoreError::Backend(format!("liveness Lease of {node:?}: too many concurrent writers; try again")))
    }

    /// One renewal of a liveness Lease: Ok(false) when it already ran out or is gone.
    async fn renew_alive(&self, lease: &AliveLease) -> Result<bool, StoreError> {
        let api = self.leases_api();
        let name = format!("allot-node-{}", lease.node);
        let Some(mut cur) = self.req("reading a liveness Lease", api.get_opt(&name)).await? else { return Ok(false) };
        if cur.uid().as_deref() != Some(lease.uid.as_str()) || lease_expiry_ms(&cur).is_none_or(|t| t <= now_ms()) {
            return Ok(false);
        }
        if let Some(spec) = cur.spec.as_mut() {
            spec.renew_time = Some(micro_now());
        }
        match self.req("renewing a liveness Lease", api.replace(&name, &PostParams::default(), &cur)).await {
            Ok(_) => Ok(true),
            Err(Fail { code: Some(404 | 409), .. }) => Ok(false),
            Err(f) => Err(f.err),
        }
    }

    /// Ends a liveness Lease at once (a clean stop): the node is no longer live.
    async fn revoke_alive(&self, lease: AliveLease) -> Result<(), StoreError> {
        let name = format!("allot-node-{}", lease.node);
        match self.req("deleting a liveness Lease", self.leases_api().delete(&name, &preconditions(Some(lease.uid.clone()), None))).await {
            Ok(_) | Err(Fail { code: Some(404 | 409), .. }) => {
                self.settle_gone(Kind::Lease, &name, &lease.uid).await;
                Ok(())
            }
            Err(f) => Err(f.err),
        }
    }
}

impl Store for KubeStore {
    async fn pools(&self) -> Result<Vec<Pool>, StoreError> {
        Ok(self.mirror.lock().pools().into_iter().map(|(name, spec)| Pool { name, spec }).collect())
    }

    async fn apply_pools(&self, incoming: Vec<Pool>) -> Result<Vec<ApplyAction>, StoreError> {
        // Nothing is written before the whole batch validated; cheap refusals need no lock.
        rules::validate_apply(&[], &[], &incoming)?;
        let lock = self.pool_lock().await?;
        let out = self.apply_pools_locked(&incoming).await;
        lock.release().await;
        out
    }

    async fn delete_pool(&self, name: &str) -> Result<(), StoreError> {
        let lock = self.pool_lock().await?;
        let out = self.delete_pool_locked(name).await;
        lock.release().await;
        out
    }

    async fn grants(&self) -> Result<Vec<BlockGrant>, StoreError> {
        Ok(self.mirror.lock().grants())
    }

    async fn grant_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        // Up front: a block outside its pool is refused without a write. The mirror may lag a
        // pool another writer just made, so a "no" is confirmed with a fresh read.
        let known = self.mirror.lock().grantable_pool(&grant.pool);
        if !known.is_some_and(|p| block_fits(&p, grant)) && !self.fresh_pool(&grant.pool).await?.is_some_and(|p| block_fits(&p, grant)) {
            return Ok(false);
        }
        let name = block_name(&grant.pool, &grant.cidr);
        // Held, or reserved to another node within its grace: no write (the API decides
        // anyway; this saves the create and the read after its 409).
        let taken = match self.mirror.lock().entry(Kind::Block, &name).map(|e| &e.value) {
            Some(Value::Block { released_until: None, .. }) => true,
            Some(Value::Block { released_until: Some(until), node, .. }) => *node != grant.node && *until > now_secs(),
            _ => false,
        };
        if taken {
            return Ok(false);
        }
        let api = self.blocks_api();
        for _ in 0..RETRIES {
            match self.req("creating an IPBlock", api.create(&PostParams::default(), &self.block_object(grant))).await {
                Ok(created) => return self.recheck_grant(&created, grant).await,
                Err(Fail { code: Some(409), .. }) => {}
                Err(f) => return Err(f.err),
            }
            // Taken: by another node (false), or reserved after a node's deletion.
            let Some(existing) = self.req("reading an IPBlock", api.get_opt(&name)).await? else { continue };
            let Some((holder, Some(until))) = block_of(&existing) else { return Ok(false) };
            if holder.node == grant.node {
                // Its own node takes it back: the reservation ends, the object stays.
                let mut obj = existing.clone();
                obj.annotations_mut().remove(RELEASED_UNTIL);
                obj.metadata.owner_references = self.owner_of(&grant.node);
                match self.req("taking back an IPBlock", api.replace(&name, &PostParams::default(), &obj)).await {
                    Ok(taken) => return self.recheck_grant(&taken, grant).await,
                    Err(Fail { code: Some(404 | 409), .. }) => continue,
                    Err(f) => return Err(f.err),
                }
            }
            if until > now_secs() {
                return Ok(false);
            }
            // The grace is over: the old object goes, then the create is tried again.
            let dp = preconditions(existing.uid(), existing.resource_version());
            match self.req("deleting an expired IPBlock", api.delete(&name, &dp)).await {
                Ok(_) | Err(Fail { code: Some(404 | 409), .. }) => {}
                Err(f) => return Err(f.err),
            }
        }
        Err(StoreError::Backend(format!("block {name}: too many concurrent writers; try again")))
    }

    async fn release_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        let api = self.blocks_api();
        let name = block_name(&grant.pool, &grant.cidr);
        let Some(b) = self.req("reading an IPBlock", api.get_opt(&name)).await? else { return Ok(false) };
        match block_of(&b) {
            Some((g, None)) if g == *grant => {}
            _ => return Ok(false),
        }
        let uid = b.uid().unwrap_or_default();
        match self.req("deleting an IPBlock", api.delete(&name, &preconditions(Some(uid.clone()), b.resource_version()))).await {
            Ok(_) => {
                self.settle_gone(Kind::Block, &name, &uid).await;
                Ok(true)
            }
            Err(Fail { code: Some(404 | 409), .. }) => Ok(false),
            Err(f) => Err(f.err),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.mirror.lock().nodes())
    }

    async fn register_node(&self, name: &str, ip: Option<IpAddr>) -> Result<(), StoreError> {
        let api = self.nodes_api();
        let addresses = |ip: IpAddr| vec![crate::NodeAddress { kind: "InternalIP".into(), ip: ip.to_string() }];
        for _ in 0..RETRIES {
            let written = match self.req("reading an AllotNode", api.get_opt(name)).await? {
                None => {
                    let spec = AllotNodeSpec { addresses: ip.map(addresses).unwrap_or_default(), ..Default::default() };
                    match self.req("creating an AllotNode", api.create(&PostParams::default(), &AllotNode::new(name, spec))).await {
                        Err(Fail { code: Some(409), .. }) => continue,
                        other => other?,
                    }
                }
                Some(n) => {
                    let Some(ip) = ip.filter(|ip| node_record(&n).ip != Some(*ip)) else { return Ok(()) };
                    let patch = json!({ "spec": { "addresses": addresses(ip) } });
                    self.req("updating an AllotNode", api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await?
                }
            };
            self.settle(Kind::Node, rv_of(&written)).await;
            return Ok(());
        }
        Err(StoreError::Backend(format!("node {name:?}: too many concurrent writers; try again")))
    }

    async fn set_requested(&self, name: &str, requested: Vec<PoolRequest>) -> Result<(), StoreError> {
        let patch = json!({ "spec": { "ipam": { "pools": { "requested": requested } } } });
        match self.req("updating an AllotNode", self.nodes_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await {
            Ok(n) => {
                self.settle(Kind::Node, rv_of(&n)).await;
                Ok(())
            }
            Err(Fail { code: Some(404), .. }) => Err(StoreError::NotFound(format!("node {name:?} not found"))),
            Err(f) => Err(f.err),
        }
    }

    async fn set_operator_error(&self, name: &str, error: Option<String>) -> Result<(), StoreError> {
        let patch = json!({ "status": { "ipam": { "operator-status": { "error": error } } } });
        match self.req("updating an AllotNode's status", self.nodes_api().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))).await {
            Ok(n) => {
                self.settle(Kind::Node, rv_of(&n)).await;
                Ok(())
            }
            Err(Fail { code: Some(404), .. }) => Err(StoreError::NotFound(format!("node {name:?} not found"))),
            Err(f) => Err(f.err),
        }
    }

    async fn delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.delete_node_inner(name, false).await
    }

    async fn namespaces(&self) -> Result<BTreeMap<String, Annotations>, StoreError> {
        Ok(self.mirror.lock().namespaces())
    }

    async fn annotate_namespace(&self, ns: &str, set: Annotations, remove: Vec<String>) -> Result<Annotations, StoreError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let Some(cur) = self.req("reading a Namespace", api.get_opt(ns)).await? else {
            return Err(StoreError::NotFound(format!("namespace {ns:?} not found: allot annotates existing namespaces (kubectl create namespace {ns})")));
        };
        let old = namespace_annotations(&cur);
        if allot_store::annotated(&old, &set, &remove).is_none() {
            return Ok(old);
        }
        // A JSON merge patch: null removes a key, other annotations are left alone.
        let mut changes = serde_json::Map::new();
        for k in remove.iter().filter(|k| !set.contains_key(*k) && old.contains_key(*k)) {
            changes.insert(k.clone(), serde_json::Value::Null);
        }
        for (k, v) in &set {
            changes.insert(k.clone(), json!(v));
        }
        let patch = json!({ "metadata": { "annotations": changes } });
        let written = self.req("annotating a Namespace", api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        self.settle(Kind::Namespace, rv_of(&written)).await;
        Ok(namespace_annotations(&written))
    }

    async fn live_nodes(&self) -> Result<Option<BTreeSet<String>>, StoreError> {
        self.mirror.refresh();
        Ok(Some(self.mirror.lock().live()))
    }

    async fn released_blocks(&self) -> Result<Vec<BlockGrant>, StoreError> {
        self.mirror.refresh();
        Ok(self.mirror.lock().released())
    }

    async fn grant_blocks(&self, grants: &[BlockGrant]) -> Result<Vec<bool>, StoreError> {
        // Kubernetes has no multi-object transaction: concurrent creates, one outcome each.
        let results: Vec<Result<bool, StoreError>> =
            futures_util::stream::iter(0..grants.len()).map(|i| self.grant_block(&grants[i])).buffered(GRANTS_IN_FLIGHT).collect().await;
        results.into_iter().collect()
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.mirror.refresh();
        Ok(self.mirror.lock().snapshot())
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.mirror.watch()
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.mirror.events()
    }

    fn heard_unix(&self) -> Option<u64> {
        Some(self.mirror.heard_unix())
    }
}
