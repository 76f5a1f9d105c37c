//! A local copy of the cluster state, read once and then kept current by the store's events.

use std::collections::{BTreeMap, BTreeSet};

use allot_core::{BlockGrant, Family, Pool, PoolSpec};
use ipnet::IpNet;

use crate::{Annotations, Change, NodeRecord, Snapshot};

/// The cluster as of `revision`. A focused view (one node's agent) keeps only that node's
/// record; every view keeps every block (holders and per-pool counts are cheap, and a
/// release must know whether the key still exists).
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub revision: u64,
    focus: Option<String>,
    pub pools: BTreeMap<String, PoolSpec>,
    pub namespaces: BTreeMap<String, Annotations>,
    /// `(pool, block)` -> holding node.
    pub blocks: BTreeMap<(String, IpNet), String>,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// None when the backend does not track liveness.
    pub live: Option<BTreeSet<String>>,
    /// `(pool, block)` -> the node it is reserved to.
    pub released: BTreeMap<(String, IpNet), String>,
    counts: BTreeMap<(String, Family), u64>,
}

impl ClusterView {
    /// A view from a snapshot; with `focus`, only that node's record is kept.
    pub fn new(s: Snapshot, focus: Option<&str>) -> Self {
        let mut v = ClusterView {
            revision: s.revision,
            focus: focus.map(String::from),
            pools: s.pools.into_iter().map(|p| (p.name, p.spec)).collect(),
            namespaces: s.namespaces,
            live: s.live,
            released: s.released.into_iter().map(|g| ((g.pool, g.cidr), g.node)).collect(),
            ..Default::default()
        };
        v.nodes = s.nodes.into_iter().filter(|n| v.keeps(&n.name)).map(|n| (n.name.clone(), n)).collect();
        for g in s.grants {
            v.put_block(g.pool, g.cidr, g.node);
        }
        v
    }

    fn keeps(&self, node: &str) -> bool {
        self.focus.as_deref().is_none_or(|f| f == node)
    }

    fn put_block(&mut self, pool: String, cidr: IpNet, node: String) {
        let key = (pool, cidr);
        if self.blocks.insert(key.clone(), node).is_none() {
            *self.counts.entry((key.0, Family::of(&cidr))).or_default() += 1;
        }
    }

    /// Forgets a block this process itself just gave back, before its event arrives, so a
    /// change applied meanwhile cannot bring it back.
    pub fn forget_block(&mut self, pool: &str, cidr: &IpNet) {
        if self.blocks.remove(&(pool.to_string(), *cidr)).is_some()
            && let Some(c) = self.counts.get_mut(&(pool.to_string(), Family::of(cidr)))
        {
            *c = c.saturating_sub(1);
        }
    }

    /// Records a block this process itself just granted, before its event arrives.
    pub fn note_granted(&mut self, g: &BlockGrant) {
        self.put_block(g.pool.clone(), g.cidr, g.node.clone());
    }

    /// Applies one change. The caller skips changes at or before `revision` and calls
    /// `advance` after the batch (one transaction's changes share a revision).
    pub fn apply_change(&mut self, change: &Change) {
        match change.clone() {
            Change::Pool { name, spec: Some(spec) } => {
                self.pools.insert(name, spec);
            }
            Change::Pool { name, spec: None } => {
                self.pools.remove(&name);
            }
            Change::Block { pool, cidr, node: Some(node) } => self.put_block(pool, cidr, node),
            Change::Block { pool, cidr, node: None } => self.forget_block(&pool, &cidr),
            Change::Node { name, record } => {
                if self.keeps(&name) {
                    match record {
                        Some(r) => self.nodes.insert(name, r),
                        None => self.nodes.remove(&name),
                    };
                }
            }
            Change::Namespace { name, annotations: Some(a) } => {
                self.namespaces.insert(name, a);
            }
            Change::Namespace { name, annotations: None } => {
                self.namespaces.remove(&name);
            }
            Change::Alive { node, live } => {
                if let Some(set) = &mut self.live {
                    if live {
                        set.insert(node);
                    } else {
                        set.remove(&node);
                    }
                }
            }
            Change::Released { pool, cidr, node: Some(node) } => {
                self.released.insert((pool, cidr), node);
            }
            Change::Released { pool, cidr, node: None } => {
                self.released.remove(&(pool, cidr));
            }
        }
    }

    /// Applies a batch in order; returns the changes newer than the view (one transaction's
    /// changes share a revision, so the view moves on only after the batch).
    pub fn apply_all<'a>(&mut self, changes: &'a [(u64, Change)]) -> Vec<&'a Change> {
        let base = self.revision;
        let mut applied = Vec::new();
        for (rev, c) in changes.iter().filter(|(rev, _)| *rev > base) {
            self.apply_change(c);
            self.advance(*rev);
            applied.push(c);
        }
        applied
    }

    /// Marks every change up to `revision` as included.
    pub fn advance(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// Blocks granted cluster-wide per pool and family.
    pub fn counts(&self) -> &BTreeMap<(String, Family), u64> {
        &self.counts
    }

    /// The blocks `node` holds.
    pub fn blocks_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = (&'a str, IpNet)> + 'a {
        self.blocks.iter().filter(move |(_, n)| *n == node).map(|((p, c), _)| (p.as_str(), *c))
    }

    pub fn pool_list(&self) -> Vec<Pool> {
        self.pools.iter().map(|(name, spec)| Pool { name: name.clone(), spec: spec.clone() }).collect()
    }

    /// Every block that is taken: held, or reserved to a deleted node.
    /// Blocks nodes hold (not those released and still reserved): what the stores' own pool
    /// rules check against.
    pub fn held(&self) -> Vec<BlockGrant> {
        self.blocks.iter().map(|((pool, cidr), node)| BlockGrant { pool: pool.clone(), cidr: *cidr, node: node.clone() }).collect()
    }

    pub fn taken(&self) -> Vec<BlockGrant> {
        self.blocks
            .iter()
            .chain(&self.released)
            .map(|((pool, cidr), node)| BlockGrant { pool: pool.clone(), cidr: *cidr, node: node.clone() })
            .collect()
    }
}
