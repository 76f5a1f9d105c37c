//! The cluster state behind one trait: pools, nodes, block grants and namespace annotations,
//! with a revision that grows on every change and a watch on it.
//!
//! Rules that span keys (pool validation against held blocks, a block granted only inside a
//! current CIDR of its pool) are checked inside the same write transaction as the write, so two
//! writers racing cannot break them. A block grant is a key of its own, created only if absent:
//! a block has one holder by construction.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use allot_core::{ApplyAction, BlockGrant, Pool, PoolError, PoolSpec};
use ipnet::IpNet;
use allot_wire::{
    NodeAddress, NodeIpamSpec, NodeIpamStatus, NodePools, NodeResource, NodeSpec, NodeStatus,
    ObjectMeta, OperatorStatus, PoolAllocation, PoolRequest,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

mod embedded;
mod liveness;
mod view;
pub use view::ClusterView;
pub use embedded::EmbeddedStore;
pub use liveness::{Liveness, keep_alive};
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, Leadership};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] PoolError),
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with the state of the cluster (a live node); nothing was written.
    #[error("{0}")]
    Conflict(String),
    #[error("cluster store: {0}")]
    Backend(String),
}

/// A node as the store keeps it; its blocks are the grants that name it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub requested: Vec<PoolRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_error: Option<String>,
}

pub type Annotations = BTreeMap<String, String>;

/// `old` with `remove` taken out, then `set` put in (what `annotate_namespace` writes); None
/// when that changes nothing.
pub fn annotated(old: &Annotations, set: &Annotations, remove: &[String]) -> Option<Annotations> {
    let mut new = old.clone();
    for k in remove {
        new.remove(k);
    }
    new.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    (new != *old).then_some(new)
}

/// One change as the store's event stream reports it: the new value, or None when deleted.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Pool { name: String, spec: Option<PoolSpec> },
    /// A block key: `node` is its holder, None when the block was given back.
    Block { pool: String, cidr: IpNet, node: Option<String> },
    Node { name: String, record: Option<NodeRecord> },
    Namespace { name: String, annotations: Option<Annotations> },
    /// A node's liveness key appeared or went away (lease ended).
    Alive { node: String, live: bool },
    /// A block reserved to the node it was taken from (release grace), or no longer reserved.
    Released { pool: String, cidr: IpNet, node: Option<String> },
}

/// What a subscriber to `Store::events` receives.
#[derive(Clone, Debug)]
pub enum StoreEvent {
    /// Changes in revision order, each with the revision that made it.
    Changes(Arc<Vec<(u64, Change)>>),
    /// Changes may have been missed (the watch was re-created past a compaction): read a
    /// fresh `snapshot`. A receiver that lagged (`RecvError::Lagged`) must do the same.
    Resync,
}

/// How many event batches a slow subscriber may fall behind before it must resync.
pub const EVENT_BUFFER: usize = 4096;

/// Everything the store holds, read at one revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub revision: u64,
    pub pools: Vec<Pool>,
    pub grants: Vec<BlockGrant>,
    pub nodes: Vec<NodeRecord>,
    pub namespaces: BTreeMap<String, Annotations>,
    /// None when the backend does not track liveness.
    pub live: Option<BTreeSet<String>>,
    pub released: Vec<BlockGrant>,
}

/// The cluster store. Reads see one consistent revision; each write is one transaction.
pub trait Store: Send + Sync + 'static {
    fn pools(&self) -> impl Future<Output = Result<Vec<Pool>, StoreError>> + Send;

    /// Creates or replaces pools by name, after validating the whole resulting state against
    /// the blocks nodes hold. A refusal writes nothing.
    fn apply_pools(&self, pools: Vec<Pool>) -> impl Future<Output = Result<Vec<ApplyAction>, StoreError>> + Send;

    /// Deletes a pool no node holds blocks of.
    fn delete_pool(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn grants(&self) -> impl Future<Output = Result<Vec<BlockGrant>, StoreError>> + Send;

    /// Creates the block's key if it is absent and the block is still a block of its pool.
    /// Ok(false) when another node holds it or the pool no longer covers it.
    fn grant_block(&self, grant: &BlockGrant) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the block's key if `grant.node` holds it. Ok(false) otherwise.
    fn release_block(&self, grant: &BlockGrant) -> impl Future<Output = Result<bool, StoreError>> + Send;

    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRecord>, StoreError>> + Send;

    /// Creates the node, or updates its IP.
    fn register_node(&self, name: &str, ip: Option<IpAddr>) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn set_requested(&self, name: &str, requested: Vec<PoolRequest>) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn set_operator_error(&self, name: &str, error: Option<String>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes a node and gives back every block it holds; returns those blocks. Where the
    /// backend tracks liveness, a live node is refused (`Conflict`), and the blocks stay
    /// reserved to the deleted node for a grace period (see `released_blocks`).
    fn delete_node(&self, name: &str) -> impl Future<Output = Result<Vec<BlockGrant>, StoreError>> + Send;

    fn namespaces(&self) -> impl Future<Output = Result<BTreeMap<String, Annotations>, StoreError>> + Send;

    fn annotate_namespace(
        &self,
        namespace: &str,
        set: Annotations,
        remove: Vec<String>,
    ) -> impl Future<Output = Result<Annotations, StoreError>> + Send;

    /// The nodes whose agents hold a liveness lease now; None when the backend does not track
    /// liveness (the embedded store: its one agent is live while the store is open).
    fn live_nodes(&self) -> impl Future<Output = Result<Option<BTreeSet<String>>, StoreError>> + Send {
        async { Ok(None) }
    }

    /// Blocks taken from deleted nodes and still reserved to them (the release grace): no other
    /// node may be granted them yet. `node` is the node they were taken from.
    fn released_blocks(&self) -> impl Future<Output = Result<Vec<BlockGrant>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Grants several blocks, as `grant_block` would each (created only if absent, still a
    /// block of its pool), in as few transactions as the backend allows; one outcome per grant.
    fn grant_blocks(&self, grants: &[BlockGrant]) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(grants.len());
            for g in grants {
                out.push(self.grant_block(g).await?);
            }
            Ok(out)
        }
    }

    /// Pools, grants, nodes, namespaces, liveness and released blocks, all at one revision.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// The revision of the last change, and a receiver that sees every later one.
    fn watch(&self) -> watch::Receiver<u64>;

    /// Every later change, typed. Subscribe first, then read a `snapshot`, and apply only
    /// changes newer than its revision (`ClusterView` does).
    fn events(&self) -> broadcast::Receiver<StoreEvent>;

    /// Unix seconds when this process last heard from the cluster store's watch (an event or a
    /// progress answer): what it knows is current as of then. None for a store in this process
    /// (embedded), which is always current.
    fn heard_unix(&self) -> Option<u64> {
        None
    }
}

/// Builds the `CiliumNode`-shaped view of a node from its record and the grants.
pub fn node_resource(record: &NodeRecord, grants: &[BlockGrant]) -> NodeResource {
    let mut allocated: BTreeMap<&str, Vec<ipnet::IpNet>> = BTreeMap::new();
    for g in grants.iter().filter(|g| g.node == record.name) {
        allocated.entry(&g.pool).or_default().push(g.cidr);
    }
    NodeResource {
        api_version: allot_wire::API_VERSION.into(),
        kind: allot_wire::NODE_KIND.into(),
        metadata: ObjectMeta { name: record.name.clone(), annotations: BTreeMap::new() },
        spec: NodeSpec {
            addresses: record
                .ip
                .map(|ip| vec![NodeAddress { kind: "InternalIP".into(), ip }])
                .unwrap_or_default(),
            ipam: NodeIpamSpec {
                pools: NodePools {
                    requested: record.requested.clone(),
                    allocated: allocated
                        .into_iter()
                        .map(|(pool, mut cidrs)| {
                            cidrs.sort();
                            PoolAllocation { pool: pool.to_string(), cidrs }
                        })
                        .collect(),
                },
            },
        },
        status: NodeStatus {
            ipam: NodeIpamStatus { operator_status: OperatorStatus { error: record.operator_error.clone() } },
        },
    }
}

/// A pool in allot's own resource form.
pub fn pool_resource(p: Pool) -> allot_wire::PoolResource {
    allot_wire::PoolResource {
        api_version: allot_wire::API_VERSION.into(),
        kind: allot_wire::POOL_KIND.into(),
        metadata: ObjectMeta { name: p.name, annotations: BTreeMap::new() },
        spec: p.spec,
    }
}

/// The pool a resource (either kind) describes.
pub fn pool_from_resource(r: allot_wire::PoolResource) -> Pool {
    Pool { name: r.metadata.name, spec: r.spec }
}

/// Whether `grant` is a block of `pool` as it is now: right family, mask, and inside a CIDR.
pub fn block_fits(pool: &Pool, grant: &BlockGrant) -> bool {
    let family = allot_core::Family::of(&grant.cidr);
    pool.spec.family(family).is_some_and(|spec| {
        grant.cidr.prefix_len() == spec.mask_size
            && allot_core::cidr::is_canonical(&grant.cidr)
            && spec.cidrs.iter().any(|c| c.contains(&grant.cidr))
    })
}
