//! The embedded backend: one redb file, one process. Every write transaction commits with
//! `Durability::Immediate` (fsync) and bumps the revision.
//!
//! Tables (all values JSON):
//! - `pools`: pool name -> `PoolSpec`
//! - `blocks`: `"<pool>|<cidr>"` -> holding node name (one key per block)
//! - `nodes`: node name -> `NodeRecord`
//! - `namespaces`: namespace -> annotations
//! - `meta`: `"revision"` -> u64

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use allot_core::{ApplyAction, BlockGrant, Pool, PoolSpec, pool as rules};
use allot_wire::PoolRequest;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use crate::{Annotations, Change, NodeRecord, Snapshot, Store, StoreError, StoreEvent, block_fits};

const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const BLOCKS: TableDefinition<&str, &str> = TableDefinition::new("blocks");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn backend(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records always encode")
}

fn decode<T: DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend(format!("corrupt {what} record {key:?}: {e}")))
}

fn block_key(pool: &str, cidr: &ipnet::IpNet) -> String {
    format!("{pool}|{cidr}")
}

fn parse_block_key(key: &str, node: &str) -> Result<BlockGrant, StoreError> {
    let bad = || StoreError::Backend(format!("corrupt block key {key:?}"));
    let (pool, cidr) = key.rsplit_once('|').ok_or_else(bad)?;
    Ok(BlockGrant { pool: pool.into(), cidr: cidr.parse().map_err(|_| bad())?, node: node.into() })
}

pub struct EmbeddedStore {
    db: Database,
    revision: watch::Sender<u64>,
    events: broadcast::Sender<StoreEvent>,
}

/// Whether a write changed anything; an unchanged write is aborted and wakes no watcher.
enum Outcome<T> {
    Changed(T),
    Unchanged(T),
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| {
            StoreError::Backend(format!("opening cluster store {}: {}", path.display(), redb::Error::from(e)))
        })?;
        let txn = db.begin_write().map_err(backend)?;
        let revision = {
            txn.open_table(POOLS).map_err(backend)?;
            txn.open_table(BLOCKS).map_err(backend)?;
            txn.open_table(NODES).map_err(backend)?;
            txn.open_table(NAMESPACES).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            meta.get("revision").map_err(backend)?.map_or(0, |v| v.value())
        };
        txn.commit().map_err(backend)?;
        Ok(EmbeddedStore { db, revision: watch::Sender::new(revision), events: broadcast::Sender::new(crate::EVENT_BUFFER) })
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        f(&txn)
    }

    /// Runs `f` in one write transaction; the changes it lists are published with the new
    /// revision once committed.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction, &mut Vec<Change>) -> Result<Outcome<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate).map_err(backend)?;
        let mut changes = Vec::new();
        match f(&txn, &mut changes) {
            Ok(Outcome::Changed(v)) => {
                let rev = {
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    let rev = meta.get("revision").map_err(backend)?.map_or(0, |v| v.value()) + 1;
                    meta.insert("revision", rev).map_err(backend)?;
                    rev
                };
                txn.commit().map_err(backend)?;
                // No subscriber is not an error.
                let _ = self.events.send(StoreEvent::Changes(Arc::new(changes.into_iter().map(|c| (rev, c)).collect())));
                self.revision.send_replace(rev);
                Ok(v)
            }
            Ok(Outcome::Unchanged(v)) => {
                txn.abort().map_err(backend)?;
                Ok(v)
            }
            Err(e) => {
                txn.abort().map_err(backend)?;
                Err(e)
            }
        }
    }
}

fn all<T: DeserializeOwned>(
    what: &str,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        out.push((k.value().to_string(), decode(what, k.value(), v.value())?));
    }
    Ok(out)
}

fn read_pools(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<Pool>, StoreError> {
    Ok(all::<PoolSpec>("pool", table)?.into_iter().map(|(name, spec)| Pool { name, spec }).collect())
}

fn read_grants(table: &impl ReadableTable<&'static str, &'static str>) -> Result<Vec<BlockGrant>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        out.push(parse_block_key(k.value(), v.value())?);
    }
    Ok(out)
}

fn get_node(table: &Table<&str, &[u8]>, name: &str) -> Result<Option<NodeRecord>, StoreError> {
    table.get(name).map_err(backend)?.map(|v| decode("node", name, v.value())).transpose()
}

/// Reads a node, applies `change`, writes it back when it differs.
fn update_node(
    txn: &WriteTransaction,
    changes: &mut Vec<Change>,
    name: &str,
    create: bool,
    change: impl FnOnce(&mut NodeRecord),
) -> Result<Outcome<()>, StoreError> {
    let mut nodes = txn.open_table(NODES).map_err(backend)?;
    let old = get_node(&nodes, name)?;
    if old.is_none() && !create {
        return Err(StoreError::NotFound(format!("node {name:?} is not registered")));
    }
    let mut new = old.clone().unwrap_or_else(|| NodeRecord { name: name.to_string(), ..Default::default() });
    change(&mut new);
    if old.as_ref() == Some(&new) {
        return Ok(Outcome::Unchanged(()));
    }
    nodes.insert(name, encode(&new).as_slice()).map_err(backend)?;
    changes.push(Change::Node { name: name.to_string(), record: Some(new) });
    Ok(Outcome::Changed(()))
}

impl EmbeddedStore {
    fn apply_pools_sync(&self, incoming: Vec<Pool>) -> Result<Vec<ApplyAction>, StoreError> {
        self.write(|txn, changes| {
            let mut pools = txn.open_table(POOLS).map_err(backend)?;
            let existing = read_pools(&pools)?;
            let grants = read_grants(&txn.open_table(BLOCKS).map_err(backend)?)?;
            let actions = rules::validate_apply(&existing, &grants, &incoming)?;
            let mut changed = false;
            for (pool, action) in incoming.iter().zip(&actions) {
                if *action != ApplyAction::Unchanged {
                    pools.insert(pool.name.as_str(), encode(&pool.spec).as_slice()).map_err(backend)?;
                    changes.push(Change::Pool { name: pool.name.clone(), spec: Some(pool.spec.clone()) });
                    changed = true;
                }
            }
            Ok(if changed { Outcome::Changed(actions) } else { Outcome::Unchanged(actions) })
        })
    }

    fn delete_pool_sync(&self, name: &str) -> Result<(), StoreError> {
        self.write(|txn, changes| {
            let mut pools = txn.open_table(POOLS).map_err(backend)?;
            if pools.get(name).map_err(backend)?.is_none() {
                return Err(StoreError::NotFound(format!("pool {name:?} not found")));
            }
            let grants = read_grants(&txn.open_table(BLOCKS).map_err(backend)?)?;
            rules::validate_delete(name, &grants)?;
            pools.remove(name).map_err(backend)?;
            changes.push(Change::Pool { name: name.to_string(), spec: None });
            Ok(Outcome::Changed(()))
        })
    }

    fn grant_block_sync(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        self.write(|txn, changes| {
            let pools = txn.open_table(POOLS).map_err(backend)?;
            let Some(spec) = pools.get(grant.pool.as_str()).map_err(backend)? else {
                return Ok(Outcome::Unchanged(false));
            };
            let pool = Pool { name: grant.pool.clone(), spec: decode("pool", &grant.pool, spec.value())? };
            if !block_fits(&pool, grant) {
                return Ok(Outcome::Unchanged(false));
            }
            let mut blocks = txn.open_table(BLOCKS).map_err(backend)?;
            let key = block_key(&grant.pool, &grant.cidr);
            if blocks.get(key.as_str()).map_err(backend)?.is_some() {
                return Ok(Outcome::Unchanged(false));
            }
            blocks.insert(key.as_str(), grant.node.as_str()).map_err(backend)?;
            changes.push(Change::Block { pool: grant.pool.clone(), cidr: grant.cidr, node: Some(grant.node.clone()) });
            Ok(Outcome::Changed(true))
        })
    }

    fn release_block_sync(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        self.write(|txn, changes| {
            let mut blocks = txn.open_table(BLOCKS).map_err(backend)?;
            let key = block_key(&grant.pool, &grant.cidr);
            let held_by_node = blocks.get(key.as_str()).map_err(backend)?.is_some_and(|v| v.value() == grant.node);
            if !held_by_node {
                return Ok(Outcome::Unchanged(false));
            }
            blocks.remove(key.as_str()).map_err(backend)?;
            changes.push(Change::Block { pool: grant.pool.clone(), cidr: grant.cidr, node: None });
            Ok(Outcome::Changed(true))
        })
    }

    fn delete_node_sync(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.write(|txn, changes| {
            let mut nodes = txn.open_table(NODES).map_err(backend)?;
            let existed = nodes.remove(name).map_err(backend)?.is_some();
            if existed {
                changes.push(Change::Node { name: name.to_string(), record: None });
            }
            let mut blocks = txn.open_table(BLOCKS).map_err(backend)?;
            let released: Vec<BlockGrant> =
                read_grants(&blocks)?.into_iter().filter(|g| g.node == name).collect();
            for g in &released {
                blocks.remove(block_key(&g.pool, &g.cidr).as_str()).map_err(backend)?;
                changes.push(Change::Block { pool: g.pool.clone(), cidr: g.cidr, node: None });
            }
            if !existed && released.is_empty() {
                return Err(StoreError::NotFound(format!("node {name:?} not found")));
            }
            Ok(Outcome::Changed(released))
        })
    }

    fn annotate_sync(&self, ns: &str, set: Annotations, remove: Vec<String>) -> Result<Annotations, StoreError> {
        self.write(|txn, changes| {
            let mut table = txn.open_table(NAMESPACES).map_err(backend)?;
            let old: Annotations =
                table.get(ns).map_err(backend)?.map(|v| decode("namespace", ns, v.value())).transpose()?.unwrap_or_default();
            let Some(new) = crate::annotated(&old, &set, &remove) else {
                return Ok(Outcome::Unchanged(old));
            };
            if new.is_empty() {
                table.remove(ns).map_err(backend)?;
            } else {
                table.insert(ns, encode(&new).as_slice()).map_err(backend)?;
            }
            changes.push(Change::Namespace { name: ns.to_string(), annotations: (!new.is_empty()).then(|| new.clone()) });
            Ok(Outcome::Changed(new))
        })
    }
}

// The embedded store's work is short and local; it runs inline in the caller's task.
impl Store for EmbeddedStore {
    fn pools(&self) -> impl Future<Output = Result<Vec<Pool>, StoreError>> + Send {
        std::future::ready(self.read(|t| read_pools(&t.open_table(POOLS).map_err(backend)?)))
    }

    fn apply_pools(&self, pools: Vec<Pool>) -> impl Future<Output = Result<Vec<ApplyAction>, StoreError>> + Send {
        std::future::ready(self.apply_pools_sync(pools))
    }

    fn delete_pool(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(self.delete_pool_sync(name))
    }

    fn grants(&self) -> impl Future<Output = Result<Vec<BlockGrant>, StoreError>> + Send {
        std::future::ready(self.read(|t| read_grants(&t.open_table(BLOCKS).map_err(backend)?)))
    }

    fn grant_block(&self, grant: &BlockGrant) -> impl Future<Output = Result<bool, StoreError>> + Send {
        std::future::ready(self.grant_block_sync(grant))
    }

    fn release_block(&self, grant: &BlockGrant) -> impl Future<Output = Result<bool, StoreError>> + Send {
        std::future::ready(self.release_block_sync(grant))
    }

    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRecord>, StoreError>> + Send {
        std::future::ready(self.read(|t| {
            Ok(all::<NodeRecord>("node", &t.open_table(NODES).map_err(backend)?)?.into_iter().map(|(_, n)| n).collect())
        }))
    }

    fn register_node(&self, name: &str, ip: Option<IpAddr>) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(self.write(|txn, changes| {
            update_node(txn, changes, name, true, |n| {
                if ip.is_some() {
                    n.ip = ip;
                }
            })
        }))
    }

    fn set_requested(&self, name: &str, requested: Vec<PoolRequest>) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(self.write(|txn, changes| update_node(txn, changes, name, false, |n| n.requested = requested)))
    }

    fn set_operator_error(&self, name: &str, error: Option<String>) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(self.write(|txn, changes| update_node(txn, changes, name, false, |n| n.operator_error = error)))
    }

    fn delete_node(&self, name: &str) -> impl Future<Output = Result<Vec<BlockGrant>, StoreError>> + Send {
        std::future::ready(self.delete_node_sync(name))
    }

    fn namespaces(&self) -> impl Future<Output = Result<BTreeMap<String, Annotations>, StoreError>> + Send {
        std::future::ready(self.read(|t| {
            Ok(all::<Annotations>("namespace", &t.open_table(NAMESPACES).map_err(backend)?)?.into_iter().collect())
        }))
    }

    fn annotate_namespace(
        &self,
        namespace: &str,
        set: Annotations,
        remove: Vec<String>,
    ) -> impl Future<Output = Result<Annotations, StoreError>> + Send {
        std::future::ready(self.annotate_sync(namespace, set, remove))
    }

    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send {
        std::future::ready(self.read(|t| {
            Ok(Snapshot {
                revision: t.open_table(META).map_err(backend)?.get("revision").map_err(backend)?.map_or(0, |v| v.value()),
                pools: read_pools(&t.open_table(POOLS).map_err(backend)?)?,
                grants: read_grants(&t.open_table(BLOCKS).map_err(backend)?)?,
                nodes: all::<NodeRecord>("node", &t.open_table(NODES).map_err(backend)?)?.into_iter().map(|(_, n)| n).collect(),
                namespaces: all::<Annotations>("namespace", &t.open_table(NAMESPACES).map_err(backend)?)?.into_iter().collect(),
                live: None,
                released: Vec::new(),
            })
        }))
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
