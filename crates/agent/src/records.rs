//! The node's durable allocation records: an append-only journal the agent alone owns.
//!
//! Each entry is `[len: u32 LE][crc32: u32 LE][JSON of Entry]`. Writes go through one
//! committer thread that gathers every request waiting at that moment, appends them with one
//! write and makes them durable with one `fdatasync` (group commit), then answers them all: a
//! caller is answered only after its entry is on disk. On open, the journal is replayed; a torn
//! or corrupt tail (a crash mid-append) is cut off. When the journal holds several times more
//! entries than live allocations, it is rewritten as a snapshot (written aside, synced, renamed).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use allot_wire::{Allocation, Owner};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Most requests one append takes; the rest wait for the next.
const MAX_BATCH: usize = 4096;
/// Rewrite the journal once it has this many entries and more than twice the live count.
const COMPACT_MIN_ENTRIES: usize = 8192;
const HEADER: usize = 8;

#[derive(Debug, Clone, thiserror::Error)]
#[error("allocation journal {path}: {what}")]
pub struct RecordsError {
    path: String,
    what: String,
}

pub enum Op {
    Put(Allocation),
    Delete(Owner),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Entry {
    Put(Allocation),
    Del(Owner),
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

fn frame(entry: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    serde_json::to_writer(&mut *out, entry).expect("entries encode");
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads whole, valid entries; returns them and the length of the valid prefix.
fn replay(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        let Some(body) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(entry) = serde_json::from_slice(body) else { break };
        entries.push(entry);
        at += HEADER + len;
    }
    (entries, at)
}

struct Journal {
    path: PathBuf,
    file: File,
    /// Live allocations by owner, as encoded entries: what a snapshot writes.
    live: HashMap<Owner, Vec<u8>>,
    entries: usize,
}

impl Journal {
    fn fail(&self, what: impl std::fmt::Display) -> RecordsError {
        RecordsError { path: self.path.display().to_string(), what: what.to_string() }
    }

    fn append(&mut self, batch: &[Job]) -> Result<(), RecordsError> {
        let mut buf = Vec::with_capacity(512 * batch.len());
        let mut count = 0;
        for op in batch.iter().flat_map(|j| &j.ops) {
            let start = buf.len();
            match op {
                Op::Put(a) => {
                    frame(&Entry::Put(a.clone()), &mut buf);
                    self.live.insert(a.owner.clone(), buf[start..].to_vec());
                }
                Op::Delete(o) => {
                    frame(&Entry::Del(o.clone()), &mut buf);
                    self.live.remove(o);
                }
            }
            count += 1;
        }
        self.file.write_all(&buf).map_err(|e| self.fail(format!("append: {e}")))?;
        self.file.sync_data().map_err(|e| self.fail(format!("fdatasync: {e}")))?;
        self.entries += count;
        if self.entries >= COMPACT_MIN_ENTRIES && self.entries > 2 * self.live.len() {
            if let Err(e) = self.compact() {
                // The journal as it stands is still complete; compaction is retried later.
                tracing::warn!(error = %e, "compacting the allocation journal failed");
            }
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<(), RecordsError> {
        let tmp = self.path.with_extension("compact");
        let mut f = File::create(&tmp).map_err(|e| self.fail(format!("create {}: {e}", tmp.display())))?;
        let mut buf = Vec::new();
        for entry in self.live.values() {
            buf.extend_from_slice(entry);
        }
        f.write_all(&buf).and_then(|_| f.sync_all()).map_err(|e| self.fail(format!("write snapshot: {e}")))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.fail(format!("rename snapshot: {e}")))?;
        sync_dir(&self.path).map_err(|e| self.fail(format!("sync directory: {e}")))?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(|e| self.fail(format!("reopen: {e}")))?;
        self.entries = self.live.len();
        Ok(())
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

impl Records {
    /// Opens (or creates) the journal, returns the handle and every live allocation.
    pub fn open(path: &Path) -> Result<(Records, Vec<Allocation>), RecordsError> {
        let fail = |what: String| RecordsError { path: path.display().to_string(), what };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| fail(format!("open: {e}")))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| fail(format!("read: {e}")))?;
        let (entries, valid) = replay(&bytes);
        if valid < bytes.len() {
            tracing::warn!(journal = %path.display(), dropped_bytes = bytes.len() - valid, "cut a torn tail off the allocation journal");
            file.set_len(valid as u64).and_then(|_| file.sync_all()).map_err(|e| fail(format!("truncate: {e}")))?;
        }
        let count = entries.len();
        let mut live: HashMap<Owner, Allocation> = HashMap::new();
        for e in entries {
            match e {
                Entry::Put(a) => {
                    live.insert(a.owner.clone(), a);
                }
                Entry::Del(o) => {
                    live.remove(&o);
                }
            }
        }
        sync_dir(path).map_err(|e| fail(format!("sync directory: {e}")))?;
        let encoded = live
            .values()
            .map(|a| {
                let mut buf = Vec::new();
                frame(&Entry::Put(a.clone()), &mut buf);
                (a.owner.clone(), buf)
            })
            .collect();
        let journal = Journal { path: path.to_path_buf(), file, live: encoded, entries: count };
        let (queue, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("allot-records".into())
            .spawn(move || committer(journal, rx))
            .map_err(|e| fail(format!("starting committer: {e}")))?;
        Ok((Records { queue }, live.into_values().collect()))
    }

    /// Appends `ops` (sharing one write and one fdatasync with whatever else is waiting) and
    /// returns once they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), RecordsError> {
        let stopped = || RecordsError { path: String::new(), what: "committer has stopped".into() };
        let (done, wait) = oneshot::channel();
        self.queue.send(Job { ops, done }).map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

fn committer(mut journal: Journal, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = journal.append(&batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, requests = batch.len(), "appending allocation records failed");
        }
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_wire::{AllocatedIp, PodRef};

    fn alloc(i: usize) -> Allocation {
        Allocation {
            owner: Owner { network: "n".into(), container_id: format!("c{i}"), ifname: "eth0".into() },
            netns: "/x".into(),
            pod: PodRef::default(),
            ips: vec![AllocatedIp { address: format!("10.0.{}.{}/16", i / 250, i % 250 + 1).parse().unwrap(), pool: "p".into(), gateway: None }],
            created: 1,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn replays_puts_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (r, loaded) = Records::open(&path).unwrap();
            assert!(loaded.is_empty());
            rt().block_on(async {
                r.apply(vec![Op::Put(alloc(1)), Op::Put(alloc(2))]).await.unwrap();
                r.apply(vec![Op::Delete(alloc(1).owner)]).await.unwrap();
            });
        }
        let (_, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded, vec![alloc(2)]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (r, _) = Records::open(&path).unwrap();
            rt().block_on(r.apply(vec![Op::Put(alloc(1)), Op::Put(alloc(2))])).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of the next append: half an entry, then a flipped byte.
        let mut partial = Vec::new();
        frame(&Entry::Put(alloc(3)), &mut partial);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&partial[..partial.len() / 2]).unwrap();
        drop(f);
        let (r, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "torn tail cut off");
        rt().block_on(r.apply(vec![Op::Put(alloc(4))])).unwrap();
        drop(r);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded.len(), 2, "the corrupt last entry is dropped, not the ones before");
    }

    #[test]
    fn compaction_keeps_exactly_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (r, _) = Records::open(&path).unwrap();
            rt().block_on(async {
                for round in 0..3 {
                    let puts = (0..COMPACT_MIN_ENTRIES / 2).map(|i| Op::Put(alloc(i))).collect();
                    r.apply(puts).await.unwrap();
                    if round < 2 {
                        let dels = (10..COMPACT_MIN_ENTRIES / 2).map(|i| Op::Delete(alloc(i).owner)).collect();
                        r.apply(dels).await.unwrap();
                    }
                }
            });
        }
        let entries = replay(&std::fs::read(&path).unwrap()).0.len();
        assert!(entries < 3 * COMPACT_MIN_ENTRIES / 2, "journal was compacted ({entries} entries)");
        let (_, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded.len(), COMPACT_MIN_ENTRIES / 2);
    }
}
