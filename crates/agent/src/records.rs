//! The node's durable allocation records: one redb file the agent alone owns.
//!
//! Writes go through one committer thread that gathers every request waiting at the moment into
//! one transaction and one fsync (group commit), then answers them all. A caller is answered
//! only after its write is on disk.

use std::path::Path;
use std::sync::mpsc;

use allot_wire::{Allocation, Owner};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");
/// Most requests one transaction takes; the rest wait for the next.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
#[error("local allocation records: {0}")]
pub struct RecordsError(String);

fn err(e: impl Into<redb::Error>) -> RecordsError {
    RecordsError(e.into().to_string())
}

pub enum Op {
    Put(Allocation),
    Delete(Owner),
}

struct Job {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), RecordsError>>,
}

/// Handle to the committer; dropping every handle stops the thread after it drains its queue.
#[derive(Clone)]
pub struct Records {
    queue: mpsc::Sender<Job>,
}

fn key(owner: &Owner) -> String {
    // A JSON array cannot be confused across fields, whatever characters an ifname holds.
    serde_json::to_string(&(&owner.network, &owner.container_id, &owner.ifname)).expect("strings encode")
}

impl Records {
    /// Opens (or creates) the file, returns the handle and every stored allocation.
    pub fn open(path: &Path) -> Result<(Records, Vec<Allocation>), RecordsError> {
        let db = Database::create(path)
            .map_err(|e| RecordsError(format!("opening {}: {}", path.display(), redb::Error::from(e))))?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(ALLOCATIONS).map_err(err)?;
        txn.commit().map_err(err)?;
        let mut loaded = Vec::new();
        {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(ALLOCATIONS).map_err(err)?;
            for entry in table.iter().map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                let a: Allocation = serde_json::from_slice(v.value())
                    .map_err(|e| RecordsError(format!("corrupt record {}: {e}", k.value())))?;
                loaded.push(a);
            }
        }
        let (queue, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("allot-records".into())
            .spawn(move || committer(db, rx))
            .map_err(|e| RecordsError(format!("starting committer: {e}")))?;
        Ok((Records { queue }, loaded))
    }

    /// Writes `ops` in one transaction (shared with whatever else is waiting) and returns once
    /// they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), RecordsError> {
        let (done, wait) = oneshot::channel();
        self.queue.send(Job { ops, done }).map_err(|_| RecordsError("committer has stopped".into()))?;
        wait.await.map_err(|_| RecordsError("committer has stopped".into()))?
    }
}

fn committer(db: Database, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = write_batch(&db, &batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, requests = batch.len(), "committing allocation records failed");
        }
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

fn write_batch(db: &Database, batch: &[Job]) -> Result<(), RecordsError> {
    let mut txn = db.begin_write().map_err(err)?;
    txn.set_durability(Durability::Immediate).map_err(err)?;
    {
        let mut table = txn.open_table(ALLOCATIONS).map_err(err)?;
        for op in batch.iter().flat_map(|j| &j.ops) {
            match op {
                Op::Put(a) => {
                    let v = serde_json::to_vec(a).expect("allocations encode");
                    table.insert(key(&a.owner).as_str(), v.as_slice()).map_err(err)?;
                }
                Op::Delete(o) => {
                    table.remove(key(o).as_str()).map_err(err)?;
                }
            }
        }
    }
    txn.commit().map_err(err)
}
