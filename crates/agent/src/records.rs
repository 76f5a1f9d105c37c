//! The node's durable allocation records: an append-only journal the agent alone owns.
//!
//! Each entry is `[len: u32 LE][crc32: u32 LE][JSON of Entry]`; the first header with a zero
//! length, a bad checksum or an unreadable body ends the log. The file is grown in zero-filled
//! chunks ahead of the writes, so an append overwrites blocks that already exist and
//! `fdatasync` has no file size to flush. On open the log is replayed and everything after the
//! last valid entry is zeroed: an entry that was torn by a crash (and never acknowledged) can
//! never come back to life later.
//!
//! Group commit without a thread hop: a request queues its entries, and whoever takes the
//! journal lock writes everything queued with one write and one `fdatasync`, then answers every
//! request in the batch. A caller is answered only after its entries are on disk. When the
//! journal holds several times more entries than live allocations, it is rewritten as a
//! snapshot (written aside, synced, renamed).
//!
//! A failed write or `fdatasync` poisons the journal: after it, what the file holds past the
//! last acknowledged entry is unknown (Linux may drop the dirty pages of a failed fsync). Nothing
//! more is appended to that file. Every later request first tries to recover by writing a
//! snapshot of the acknowledged entries aside and renaming it over the file; until that works,
//! every request fails at once. So an entry that was never acknowledged cannot come back at a
//! restart, and nothing is acknowledged that is not on disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use allot_wire::{Allocation, Owner};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::datadir::FILE_MODE;

/// The file grows by this much at a time.
const CHUNK: u64 = 4 << 20;
/// Rewrite the journal once it has this many entries and more than twice the live count.
const COMPACT_MIN_ENTRIES: usize = 8192;
const HEADER: usize = 8;
/// Batches one caller writes before it hands the queue to a task (see `drain`).
const DRAIN_ROUNDS: usize = 3;

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
        if len == 0 {
            break;
        }
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

/// What a journal held when it was opened.
pub struct Replay {
    /// Live allocations, oldest first.
    pub allocations: Vec<Allocation>,
    /// Per pool and family, the last address handed out (even if freed since): next-fit goes
    /// on after it. After a snapshot, the newest live address stands in for a freed one.
    pub resume_after: Vec<(String, std::net::IpAddr)>,
}

/// What a queued request changes in the live set once written.
enum Update {
    Put(Owner, Vec<u8>),
    Del(Owner),
}

struct Job {
    bytes: Vec<u8>,
    updates: Vec<Update>,
    done: oneshot::Sender<Result<(), RecordsError>>,
}

struct Journal {
    path: PathBuf,
    file: File,
    /// End of the valid entries: where the next append goes.
    end: u64,
    /// Current file size (zero-filled past `end`).
    capacity: u64,
    /// Live allocations by owner, as encoded entries: what a snapshot writes.
    /// Live allocations by owner: the order of their Put and the encoded entry. A snapshot writes
    /// them in that order, so a replay still ends with the newest allocation.
    live: HashMap<Owner, (u64, Vec<u8>)>,
    next_seq: u64,
    entries: usize,
    /// Grow the file by this much at a time (`CHUNK`; smaller in tests).
    chunk: u64,
    /// Set by a failed write: the file is not appended to until a snapshot replaced it.
    poisoned: Option<String>,
}

fn zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let block = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(block.len());
        file.write_all_at(&block[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

impl Journal {
    fn fail(&self, what: impl std::fmt::Display) -> RecordsError {
        RecordsError { path: self.path.display().to_string(), what: what.to_string() }
    }

    fn append(&mut self, batch: &[Job]) -> Result<(), RecordsError> {
        if let Some(why) = &self.poisoned {
            let why = why.clone();
            match self.compact() {
                Ok(()) => {
                    tracing::warn!(journal = %self.path.display(), live = self.live.len(), "allocation journal recovered: rewritten from the acknowledged entries");
                    self.poisoned = None;
                }
                Err(e) => return Err(self.fail(format!("unusable since an earlier failure ({why}); recovery failed too: {} (free space or fix the disk; the agent retries on every request)", e.what))),
            }
        }
        let result = self.write_batch(batch);
        if let Err(e) = &result {
            self.poisoned = Some(e.what.clone());
        }
        result
    }

    fn write_batch(&mut self, batch: &[Job]) -> Result<(), RecordsError> {
        let len: u64 = batch.iter().map(|j| j.bytes.len() as u64).sum();
        if self.end + len > self.capacity {
            let capacity = (self.end + len).div_ceil(self.chunk) * self.chunk;
            zeros(&self.file, self.capacity, capacity)
                .and_then(|_| self.file.sync_all())
                .map_err(|e| self.fail(format!("growing to {capacity} bytes: {e}")))?;
            self.capacity = capacity;
        }
        let mut buf = Vec::with_capacity(len as usize);
        for job in batch {
            buf.extend_from_slice(&job.bytes);
        }
        self.file.write_all_at(&buf, self.end).map_err(|e| self.fail(format!("write: {e}")))?;
        let synced = std::time::Instant::now();
        self.file.sync_data().map_err(|e| self.fail(format!("fdatasync: {e}")))?;
        crate::metrics::fdatasync(synced.elapsed());
        self.end += len;
        for job in batch {
            for u in &job.updates {
                match u {
                    Update::Put(o, bytes) => {
                        self.live.insert(o.clone(), (self.next_seq, bytes.clone()));
                        self.next_seq += 1;
                    }
                    Update::Del(o) => {
                        self.live.remove(o);
                    }
                }
                self.entries += 1;
            }
        }
        if self.entries >= COMPACT_MIN_ENTRIES
            && self.entries > 2 * self.live.len()
            && let Err(e) = self.compact()
        {
            // The journal as it stands is still complete; compaction is retried later.
            tracing::warn!(error = %e, "compacting the allocation journal failed");
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<(), RecordsError> {
        let tmp = self.path.with_extension("compact");
        let mut buf = Vec::new();
        let mut ordered: Vec<&(u64, Vec<u8>)> = self.live.values().collect();
        ordered.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, entry) in ordered {
            buf.extend_from_slice(entry);
        }
        let end = buf.len() as u64;
        let capacity = (end + 1).div_ceil(self.chunk) * self.chunk;
        let write = || -> std::io::Result<File> {
            let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(FILE_MODE).open(&tmp)?;
            f.write_all_at(&buf, 0)?;
            zeros(&f, end, capacity)?;
            f.sync_all()?;
            Ok(f)
        };
        let file = write().map_err(|e| {
            // Give the space back: a full disk is the usual reason.
            let _ = std::fs::remove_file(&tmp);
            self.fail(format!("writing snapshot: {e}"))
        })?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.fail(format!("renaming snapshot: {e}"))
        })?;
        // From here on the path names the snapshot: appending to the old, unlinked file would
        // lose every later entry.
        self.file = file;
        if let Err(e) = sync_dir(&self.path) {
            self.poisoned = Some(format!("syncing the directory after a snapshot: {e}"));
        }
        self.end = end;
        self.capacity = capacity;
        self.entries = self.live.len();
        Ok(())
    }
}

struct Shared {
    queue: Mutex<Vec<Job>>,
    journal: Mutex<Journal>,
}

/// Handle to the journal; clones share it.
#[derive(Clone)]
pub struct Records {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Records {
    /// Opens (or creates) the journal, returns the handle and every live allocation.
    pub fn open(path: &Path) -> Result<(Records, Vec<Allocation>), RecordsError> {
        Self::open_with_chunk(path, CHUNK).map(|(r, replay)| (r, replay.allocations))
    }

    /// Like `open`, also telling where each pool's next-fit stood.
    pub fn open_replay(path: &Path) -> Result<(Records, Replay), RecordsError> {
        Self::open_with_chunk(path, CHUNK)
    }

    fn open_with_chunk(path: &Path, chunk: u64) -> Result<(Records, Replay), RecordsError> {
        let fail = |what: String| RecordsError { path: path.display().to_string(), what };
        let mut file = crate::datadir::open_private(path).map_err(|e| fail(format!("open: {e}")))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| fail(format!("read: {e}")))?;
        let (entries, valid) = replay(&bytes);
        let capacity = (bytes.len() as u64).max(chunk).div_ceil(chunk) * chunk;
        if bytes[valid..].iter().any(|b| *b != 0) {
            tracing::warn!(journal = %path.display(), at = valid, "zeroing a torn tail of the allocation journal");
        }
        zeros(&file, valid as u64, capacity)
            .and_then(|_| file.sync_all())
            .and_then(|_| sync_dir(path))
            .map_err(|e| fail(format!("preparing: {e}")))?;
        let count = entries.len();
        let mut live: HashMap<Owner, (u64, Allocation)> = HashMap::new();
        let mut last: HashMap<(String, bool), std::net::IpAddr> = HashMap::new();
        for (seq, e) in entries.into_iter().enumerate() {
            match e {
                Entry::Put(a) => {
                    for ip in &a.ips {
                        last.insert((ip.pool.clone(), ip.address.addr().is_ipv4()), ip.address.addr());
                    }
                    live.insert(a.owner.clone(), (seq as u64, a));
                }
                Entry::Del(o) => {
                    live.remove(&o);
                }
            }
        }
        let mut live: Vec<(u64, Allocation)> = live.into_values().collect();
        live.sort_unstable_by_key(|(seq, _)| *seq);
        let encoded = live
            .iter()
            .map(|(seq, a)| {
                let mut buf = Vec::new();
                frame(&Entry::Put(a.clone()), &mut buf);
                (a.owner.clone(), (*seq, buf))
            })
            .collect();
        let journal = Journal {
            path: path.to_path_buf(),
            file,
            end: valid as u64,
            capacity,
            live: encoded,
            next_seq: count as u64,
            entries: count,
            chunk,
            poisoned: None,
        };
        let shared = Arc::new(Shared { queue: Mutex::new(Vec::new()), journal: Mutex::new(journal) });
        let replay = Replay {
            allocations: live.into_iter().map(|(_, a)| a).collect(),
            resume_after: last.into_iter().map(|((pool, _), ip)| (pool, ip)).collect(),
        };
        Ok((Records { shared }, replay))
    }

    /// Writes `ops` (sharing one write and one fdatasync with whatever else is waiting) and
    /// returns once they are durable.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), RecordsError> {
        self.enqueue(ops).durable().await
    }

    /// Puts `ops` in the queue now, without waiting: entries reach the file in the order they
    /// were queued, so a caller that queues under its own lock keeps the journal in the order of
    /// its in-memory changes. A `Queued` that is dropped is still written.
    pub fn enqueue(&self, ops: Vec<Op>) -> Queued {
        let mut bytes = Vec::with_capacity(512 * ops.len());
        let mut updates = Vec::with_capacity(ops.len());
        for op in ops {
            let start = bytes.len();
            match op {
                Op::Put(a) => {
                    let owner = a.owner.clone();
                    frame(&Entry::Put(a), &mut bytes);
                    updates.push(Update::Put(owner, bytes[start..].to_vec()));
                }
                Op::Delete(o) => {
                    frame(&Entry::Del(o.clone()), &mut bytes);
                    updates.push(Update::Del(o));
                }
            }
        }
        let (done, wait) = oneshot::channel();
        lock(&self.shared.queue).push(Job { bytes, updates, done });
        Queued { records: self.clone(), wait }
    }

    /// Writes whatever is queued if nobody else is writing. Whoever holds the journal lock
    /// re-checks the queue after letting go, so a request queued meanwhile is never stranded.
    fn drain(&self) {
        // A caller writes a few batches at most, then hands what is still queued to a task of
        // its own: under steady load it would otherwise never get back to its own answer.
        for _ in 0..DRAIN_ROUNDS {
            let Ok(mut journal) = self.shared.journal.try_lock() else { return };
            let batch = std::mem::take(&mut *lock(&self.shared.queue));
            if batch.is_empty() {
                drop(journal);
                if lock(&self.shared.queue).is_empty() {
                    return;
                }
                continue;
            }
            let result = blocking(|| journal.append(&batch));
            if let Err(e) = &result {
                tracing::error!(error = %e, requests = batch.len(), "writing allocation records failed");
            }
            drop(journal);
            for job in batch {
                let _ = job.done.send(result.clone());
            }
        }
        if lock(&self.shared.queue).is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                let me = self.clone();
                h.spawn(async move { me.drain() });
            }
            Err(_) => self.drain(),
        }
    }
}

/// Entries in the journal's queue.
pub struct Queued {
    records: Records,
    wait: oneshot::Receiver<Result<(), RecordsError>>,
}

impl Queued {
    /// Returns once the entries are on disk (writing them, and whatever else is queued, if
    /// nobody else is).
    pub async fn durable(self) -> Result<(), RecordsError> {
        self.records.drain();
        self.wait.await.map_err(|_| RecordsError { path: String::new(), what: "write abandoned".into() })?
    }
}

/// Runs blocking file I/O on a tokio worker without stalling the tasks queued behind it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_wire::{AllocatedIp, PodRef};
    use std::os::unix::fs::PermissionsExt;

    fn alloc(i: usize) -> Allocation {
        Allocation {
            owner: Owner { network: "n".into(), container_id: format!("c{i}"), ifname: "eth0".into() },
            netns: "/x".into(),
            pod: PodRef::default(),
            ips: vec![AllocatedIp { address: format!("10.0.{}.{}/16", i / 250, i % 250 + 1).parse().unwrap(), pool: "p".into(), gateway: None }],
            created: 1,
            source: Default::default(),
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

    /// Appends raw bytes where the next entry would go, as a crash mid-write leaves them.
    fn scribble(path: &Path, bytes: &[u8]) {
        let data = std::fs::read(path).unwrap();
        let end = replay(&data).1 as u64;
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, end).unwrap();
    }

    #[test]
    fn a_torn_tail_is_dropped_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (r, _) = Records::open(&path).unwrap();
            rt().block_on(r.apply(vec![Op::Put(alloc(1)), Op::Put(alloc(2))])).unwrap();
        }
        let mut partial = Vec::new();
        frame(&Entry::Put(alloc(3)), &mut partial);
        scribble(&path, &partial[..partial.len() / 2]);
        let (r, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded.len(), 2);
        let data = std::fs::read(&path).unwrap();
        let end = replay(&data).1;
        assert!(data[end..].iter().all(|b| *b == 0), "tail zeroed");
        rt().block_on(r.apply(vec![Op::Put(alloc(4))])).unwrap();
        drop(r);
        let (_, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded.len(), 3);
    }

    /// A crash can leave a corrupt entry followed by a whole one that was never acknowledged.
    /// The whole one must not come back when a later entry of the same length fills the gap.
    #[test]
    fn an_unacknowledged_entry_behind_a_torn_one_never_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Records::open(&path).unwrap());
        let (mut torn, mut ghost) = (Vec::new(), Vec::new());
        frame(&Entry::Put(alloc(7)), &mut torn);
        let last = torn.len() - 2;
        torn[last] ^= 0xff;
        frame(&Entry::Put(alloc(8)), &mut ghost);
        scribble(&path, &[torn.clone(), ghost].concat());
        let (r, loaded) = Records::open(&path).unwrap();
        assert!(loaded.is_empty());
        // alloc(3) encodes to the same length as alloc(7).
        let mut same = Vec::new();
        frame(&Entry::Put(alloc(3)), &mut same);
        assert_eq!(same.len(), torn.len());
        rt().block_on(r.apply(vec![Op::Put(alloc(3))])).unwrap();
        drop(r);
        let (_, loaded) = Records::open(&path).unwrap();
        assert_eq!(loaded, vec![alloc(3)]);
    }

    /// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. Needs root.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(size: &str) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
            Tmpfs(dir)
        }

        /// Writes a file until the filesystem is full.
        fn fill(&self) -> PathBuf {
            let path = self.0.path().join("filler");
            let mut f = File::create(&path).unwrap();
            let block = vec![0xa5u8; 4096];
            while std::io::Write::write_all(&mut f, &block).is_ok() {}
            let _ = std::io::Write::write_all(&mut f, &[0xa5]);
            path
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.path()).status();
        }
    }

    /// A full disk fails the write that needs room; the journal refuses everything until it
    /// can be rewritten, then recovers; a restart finds exactly the acknowledged entries.
    #[test]
    fn a_full_disk_poisons_the_journal_until_it_recovers_and_loses_nothing_acknowledged() {
        let fs = Tmpfs::mount("256k");
        let path = fs.0.path().join("j");
        let chunk = 64 << 10;
        let (r, _) = Records::open_with_chunk(&path, chunk).unwrap();
        let filler = fs.fill();
        let mut acknowledged = Vec::new();
        let mut failed_at = None;
        rt().block_on(async {
            for i in 0..2000 {
                match r.apply(vec![Op::Put(alloc(i))]).await {
                    Ok(()) => acknowledged.push(alloc(i)),
                    Err(e) => {
                        assert!(e.to_string().contains("growing"), "{e}");
                        failed_at = Some(i);
                        break;
                    }
                }
            }
        });
        let failed_at = failed_at.expect("the disk filled up");
        assert!(acknowledged.len() > 100, "the preallocated chunk took writes while the disk was full");
        // Poisoned: fails at once, even for a small delete that would fit.
        let e = rt().block_on(r.apply(vec![Op::Delete(alloc(0).owner)])).unwrap_err();
        assert!(e.to_string().contains("unusable since an earlier failure"), "{e}");
        std::fs::remove_file(filler).unwrap();
        rt().block_on(r.apply(vec![Op::Put(alloc(failed_at + 1))])).expect("recovers once there is room");
        acknowledged.push(alloc(failed_at + 1));
        drop(r);
        let mut loaded = Records::open_with_chunk(&path, chunk).unwrap().1.allocations;
        let key = |a: &Allocation| a.owner.container_id.clone();
        loaded.sort_by_key(key);
        acknowledged.sort_by_key(key);
        assert_eq!(loaded, acknowledged, "exactly the acknowledged allocations, none that failed");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn replay_tells_where_next_fit_stood_even_for_a_freed_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (r, _) = Records::open(&path).unwrap();
            rt().block_on(async {
                r.apply(vec![Op::Put(alloc(1)), Op::Put(alloc(2)), Op::Put(alloc(3))]).await.unwrap();
                r.apply(vec![Op::Delete(alloc(3).owner)]).await.unwrap();
            });
        }
        let (_, replay) = Records::open_replay(&path).unwrap();
        assert_eq!(replay.allocations, vec![alloc(1), alloc(2)], "oldest first");
        assert_eq!(replay.resume_after, vec![("p".to_string(), alloc(3).ips[0].address.addr())]);
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
