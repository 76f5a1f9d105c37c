//! The etcd backend. Every change that reads before it writes is one transaction whose compares
//! check that nothing it read has changed; on a lost race it reads again and re-validates.
//!
//! Key layout (values JSON, under a prefix, `/allot/` by default):
//! - `pools/<name>` -> `PoolSpec`
//! - `blocks/<pool>/<cidr>` -> holding node name (one key per block, created only if absent)
//! - `nodes/<name>` -> `NodeRecord`
//! - `namespaces/<name>` -> annotations
//! - `leader/operator` -> the leading operator's id, bound to its lease
//! - `alive/<node>` -> the node's name, bound to its agent's liveness lease
//! - `released/<pool>/<cidr>` -> the node a deleted block was taken from, bound to a lease of
//!   the release grace: only that node may take the block until the lease runs out

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use allot_core::{ApplyAction, BlockGrant, Pool, PoolSpec, pool as rules};
use allot_wire::PoolRequest;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::{Annotations, Change, NodeRecord, Snapshot, Store, StoreError, StoreEvent, block_fits};

/// How many times a transaction that lost a race is retried before giving up.
const RETRIES: usize = 32;
/// Grants per batched transaction: one compare each plus two stay under etcd's default
/// `--max-txn-ops` (128).
const GRANT_BATCH: usize = 120;
/// Batched grant transactions in flight at once (etcd commits concurrent ones together).
const GRANTS_IN_FLIGHT: usize = 4;

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Every request gives up after this long, so a frozen etcd cannot hang the agent's loops.
    pub timeout: Duration,
    pub tls: Option<EtcdTls>,
    /// etcd user and password (`etcdctl auth enable`); the token is refreshed when it expires.
    pub user: Option<(String, String)>,
    /// HTTP/2 ping interval: a connection that answers no ping within `timeout` is dropped and
    /// dialled again. etcd answers pings more frequent than every 5 s with GOAWAY.
    pub keep_alive: Duration,
    /// The watch asks for progress every third of this; silent this long, it is re-created.
    pub watch_silence: Duration,
    /// How long blocks taken from a deleted node stay reserved to it (`released/` keys).
    pub release_grace: Duration,
}

/// TLS to etcd: the CA that signed etcd's certificate, and a client certificate and key when
/// etcd asks for one (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/allot/".into(),
            timeout: Duration::from_secs(3),
            tls: None,
            user: None,
            keep_alive: Duration::from_secs(5),
            watch_silence: Duration::from_secs(6),
            release_grace: Duration::from_secs(300),
        }
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    release_grace: Duration,
    revision: watch::Sender<u64>,
    events: broadcast::Sender<StoreEvent>,
    fence: Option<Fence>,
    /// Node records as this process last wrote or read them, so an update is one request.
    nodes_seen: Arc<std::sync::Mutex<BTreeMap<String, Kv>>>,
    /// Unix seconds of the watch's last answer (see `Store::heard_unix`).
    heard: Arc<std::sync::atomic::AtomicU64>,
}

/// What a fenced store compares in every write: the leader key is still bound to our lease.
#[derive(Clone)]
struct Fence {
    key: String,
    lease: i64,
    lost: watch::Sender<bool>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records always encode")
}

fn decode<T: DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend(format!("corrupt {what} record {key:?}: {e}")))
}

/// One key as read: its name below the kind's prefix, value, and last modification.
#[derive(Clone)]
struct Kv {
    name: String,
    value: Vec<u8>,
    mod_revision: i64,
}

impl EtcdStore {
    /// Connects and starts following the prefix; the first read proves etcd answers.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(cfg.keep_alive, cfg.timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &cfg.tls {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| StoreError::Backend(format!("reading {}: {e}", p.display())));
            let mut tls_opts = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                tls_opts = tls_opts.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls_opts);
        }
        if let Some((user, password)) = &cfg.user {
            opts = opts.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        let endpoints = cfg.endpoints.join(",");
        let client = tokio::time::timeout(cfg.timeout, Client::connect(cfg.endpoints.clone(), Some(opts)))
            .await
            .map_err(|_| StoreError::Backend(format!("etcd at {endpoints} did not answer within {:?}", cfg.timeout)))?
            .map_err(|e| StoreError::Backend(format!("connecting to etcd at {endpoints}: {e}")))?;
        let store = EtcdStore {
            client,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            release_grace: cfg.release_grace,
            revision: watch::Sender::new(0),
            events: broadcast::Sender::new(crate::EVENT_BUFFER),
            fence: None,
            nodes_seen: Arc::default(),
            heard: Arc::default(),
        };
        let rev = store.current_revision().await?;
        store.note_heard();
        store.revision.send_replace(rev);
        tokio::spawn(store.clone().follow(rev as i64 + 1, cfg.watch_silence));
        Ok(store)
    }

    /// This store with blocks of deleted nodes reserved for `grace` instead of the configured time.
    pub fn with_release_grace(&self, grace: Duration) -> Self {
        EtcdStore { release_grace: grace, ..self.clone() }
    }

    /// A view of this store whose every write also checks, in the same transaction, that the
    /// leader key is still bound to `lead`'s lease. A write that fails that check ends the
    /// leadership (its `lost` turns true) and returns an error: a replica that lost the lead
    /// without noticing (frozen, partitioned) cannot write anything.
    pub fn fenced(&self, lead: &Leadership) -> Self {
        EtcdStore {
            fence: Some(Fence { key: lead.key.clone(), lease: lead.lease, lost: lead.lost_tx.clone() }),
            ..self.clone()
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    async fn timed<T>(&self, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(backend),
            Err(_) => Err(StoreError::Backend(format!("etcd did not answer within {:?}", self.timeout))),
        }
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        let mut c = self.client.clone();
        let r = self.timed(c.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix().with_count_only()))).await?;
        Ok(r.header().map_or(0, |h| h.revision() as u64))
    }

    /// Reads every key of a kind, at `revision` if given; returns them and the read revision.
    async fn list(&self, kind: &str, revision: Option<i64>) -> Result<(Vec<Kv>, i64), StoreError> {
        let prefix = self.key(kind, "");
        let mut opts = GetOptions::new().with_prefix();
        if let Some(r) = revision {
            opts = opts.with_revision(r);
        }
        let mut c = self.client.clone();
        let resp = self.timed(c.get(prefix.as_str(), Some(opts))).await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| Kv {
                name: String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok((kvs, rev))
    }

    async fn get_one(&self, kind: &str, name: &str) -> Result<Option<Kv>, StoreError> {
        let key = self.key(kind, name);
        let mut c = self.client.clone();
        let resp = self.timed(c.get(key.as_str(), None)).await?;
        Ok(resp.kvs().first().map(|kv| Kv { name: name.to_string(), value: kv.value().to_vec(), mod_revision: kv.mod_revision() }))
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        Ok(self.txn_full(txn).await?.succeeded())
    }

    /// Runs a transaction; a fenced store nests it under the leader compare.
    async fn txn_full(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut c = self.client.clone();
        let Some(f) = &self.fence else { return self.timed(c.txn(txn)).await };
        let fenced = Txn::new()
            .when([Compare::lease(f.key.as_str(), CompareOp::Equal, f.lease)])
            .and_then([TxnOp::txn(txn)]);
        let resp = self.timed(c.txn(fenced)).await?;
        if !resp.succeeded() {
            f.lost.send_replace(true);
            return Err(StoreError::Backend(format!(
                "fenced: {} is no longer bound to this replica's lease {:x}, so another replica leads; nothing written, campaigning again",
                f.key, f.lease
            )));
        }
        match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => Ok(inner),
            _ => Err(StoreError::Backend("etcd answered a nested transaction without its result".into())),
        }
    }

    /// The compare that a key is exactly as read (or still absent).
    fn unchanged(&self, kind: &str, name: &str, read: Option<&Kv>) -> Compare {
        let key = self.key(kind, name);
        match read {
            Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        }
    }

    /// The compare that nothing under a kind changed after `revision`.
    fn prefix_unchanged(&self, kind: &str, revision: i64) -> Compare {
        Compare::mod_revision(self.key(kind, ""), CompareOp::Less, revision + 1).with_prefix()
    }

    fn grants_of(kvs: &[Kv]) -> Result<Vec<BlockGrant>, StoreError> {
        kvs.iter()
            .map(|kv| {
                let bad = || StoreError::Backend(format!("corrupt block key {:?}", kv.name));
                let (pool, cidr) = kv.name.split_once('/').ok_or_else(bad)?;
                Ok(BlockGrant {
                    pool: pool.to_string(),
                    cidr: cidr.parse().map_err(|_| bad())?,
                    node: String::from_utf8_lossy(&kv.value).into_owned(),
                })
            })
            .collect()
    }

    fn pools_of(kvs: &[Kv]) -> Result<Vec<Pool>, StoreError> {
        kvs.iter().map(|kv| Ok(Pool { name: kv.name.clone(), spec: decode::<PoolSpec>("pool", &kv.name, &kv.value)? })).collect()
    }

    fn publish(&self, rev: u64) {
        self.revision.send_if_modified(|r| {
            let changed = rev > *r;
            if changed {
                *r = rev;
            }
            changed
        });
    }

    fn note_heard(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.heard.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Publishes the revision of every change under the prefix, watching from `start`. The
    /// watch asks for progress every third of `silence`; one that stays silent that long (a
    /// partition that closes nothing) is dropped and re-created from the last revision seen.
    /// If that revision was compacted away, it re-reads: the fresh revision wakes every
    /// follower to re-read too.
    async fn follow(self, start: i64, silence: Duration) {
        let mut resume = Some(start);
        loop {
            let start = match resume {
                Some(r) => r,
                None => match self.current_revision().await {
                    Ok(rev) => {
                        // Changes were missed: every subscriber reads afresh.
                        let _ = self.events.send(StoreEvent::Resync);
                        self.publish(rev);
                        rev as i64 + 1
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd unreachable; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            resume = Some(start);
            let mut c = self.client.clone();
            let opts = WatchOptions::new().with_prefix().with_start_revision(start);
            let (mut requests, mut responses) = match self.timed(c.watch(self.prefix.as_str(), Some(opts))).await {
                Ok(stream) => stream.split(),
                Err(e) => {
                    tracing::warn!(error = %e, "opening etcd watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut ask = tokio::time::interval(silence / 3);
            let mut heard = Instant::now();
            loop {
                tokio::select! {
                    msg = responses.message() => match msg {
                        Ok(Some(msg)) => {
                            heard = Instant::now();
                            self.note_heard();
                            if msg.compact_revision() > 0 {
                                tracing::warn!(compacted = msg.compact_revision(), from = start, "etcd compacted past the watch; re-reading");
                                resume = None;
                                break;
                            }
                            if msg.canceled() {
                                tracing::warn!(reason = msg.cancel_reason(), "etcd canceled the watch; re-reading");
                                resume = None;
                                break;
                            }
                            if let Some(last) = msg.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).max() {
                                resume = Some(last + 1);
                            }
                            let changes: Vec<(u64, Change)> = msg.events().iter().filter_map(|e| self.change_of(e)).collect();
                            if !changes.is_empty() {
                                let _ = self.events.send(StoreEvent::Changes(Arc::new(changes)));
                            }
                            if let Some(h) = msg.header() {
                                self.publish(h.revision() as u64);
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("etcd closed the watch; re-opening");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "etcd watch broke; re-opening");
                            break;
                        }
                    },
                    _ = ask.tick() => {
                        if heard.elapsed() >= silence {
                            tracing::warn!(?silence, "etcd watch silent; re-creating it");
                            break;
                        }
                        // The answer (or any event) proves the stream alive.
                        let _ = tokio::time::timeout(self.timeout, requests.request_progress()).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The typed change an etcd watch event stands for; None for keys outside the layout.
    fn change_of(&self, e: &etcd_client::Event) -> Option<(u64, Change)> {
        let kv = e.kv()?;
        let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(self.prefix.as_str())?;
        let (kind, name) = key.split_once('/')?;
        let put = e.event_type() == EventType::Put;
        let value = kv.value();
        let block = || -> Option<(String, ipnet::IpNet)> {
            let (pool, cidr) = name.split_once('/')?;
            Some((pool.to_string(), cidr.parse().ok()?))
        };
        let node_name = || put.then(|| String::from_utf8_lossy(value).into_owned());
        let change = match kind {
            "pools" => Change::Pool { name: name.into(), spec: event_value(put, key, value)? },
            "nodes" => Change::Node { name: name.into(), record: event_value(put, key, value)? },
            "namespaces" => Change::Namespace { name: name.into(), annotations: event_value(put, key, value)? },
            "blocks" | "released" => {
                let Some((pool, cidr)) = block() else {
                    tracing::warn!(key, "corrupt block key in the etcd watch; ignored until the next full read");
                    return None;
                };
                if kind == "blocks" {
                    Change::Block { pool, cidr, node: node_name() }
                } else {
                    Change::Released { pool, cidr, node: node_name() }
                }
            }
            "alive" => Change::Alive { node: name.into(), live: put },
            _ => return None,
        };
        Some((kv.mod_revision() as u64, change))
    }

    /// Grants one batch in one transaction, all or nothing; Ok(false) when any compare failed.
    /// Besides each block key's absence it compares that no pool and no `released/` key
    /// changed since `rev`, the revision the pools and reservations were read at.
    async fn grant_batch(&self, batch: &[BlockGrant], rev: i64) -> Result<bool, StoreError> {
        let mut when = Vec::with_capacity(batch.len() + 2);
        when.push(self.prefix_unchanged("pools", rev));
        when.push(self.prefix_unchanged("released", rev));
        let mut ops = Vec::with_capacity(batch.len());
        for g in batch {
            let block = format!("{}/{}", g.pool, g.cidr);
            when.push(self.unchanged("blocks", &block, None));
            ops.push(TxnOp::put(self.key("blocks", &block), g.node.as_str(), None));
        }
        self.txn(Txn::new().when(when).and_then(ops)).await
    }

    /// Read-modify-write of a node record in one request when the record is as this process
    /// last wrote or read it: the write compares the cached mod revision, and a lost compare
    /// reads the key in the same transaction for the next try.
    async fn update_node(&self, name: &str, create: bool, change: impl Fn(&mut NodeRecord)) -> Result<(), StoreError> {
        let cached = self.nodes_seen.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        // `read` is a guess (cached, or "absent" for a registration) until etcd confirmed it.
        let (mut read, mut confirmed) = match cached {
            Some(kv) => (Some(kv), false),
            // Registering guesses a new node; a wrong guess reads the record in the same request.
            None if create => (None, false),
            None => (self.get_one("nodes", name).await?, true),
        };
        for _ in 0..RETRIES {
            let old: Option<NodeRecord> = read.as_ref().map(|kv| decode("node", name, &kv.value)).transpose()?;
            let mut new = old.clone().unwrap_or_else(|| NodeRecord { name: name.to_string(), ..Default::default() });
            change(&mut new);
            let unchanged = old.as_ref() == Some(&new);
            if (unchanged || (old.is_none() && !create)) && !confirmed {
                // Nothing to write, or nothing to write to, by the guess: check it first.
                read = self.get_one("nodes", name).await?;
                confirmed = true;
                continue;
            }
            if old.is_none() && !create {
                self.nodes_seen.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                return Err(StoreError::NotFound(format!("node {name:?} is not registered")));
            }
            if unchanged {
                return Ok(());
            }
            let key = self.key("nodes", name);
            let value = encode(&new);
            let txn = Txn::new()
                .when([self.unchanged("nodes", name, read.as_ref())])
                .and_then([TxnOp::put(key.as_str(), value.clone(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self.txn_full(txn).await?;
            let mut seen = self.nodes_seen.lock().unwrap_or_else(|p| p.into_inner());
            if resp.succeeded() {
                let mod_revision = resp.header().map_or(0, |h| h.revision());
                seen.insert(name.to_string(), Kv { name: name.to_string(), value, mod_revision });
                return Ok(());
            }
            read = match resp.op_responses().into_iter().next() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| Kv {
                    name: name.to_string(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                }),
                _ => return Err(StoreError::Backend("etcd answered a transaction without its read".into())),
            };
            match &read {
                Some(kv) => seen.insert(name.to_string(), kv.clone()),
                None => seen.remove(name),
            };
            confirmed = true;
        }
        Err(StoreError::Backend(format!("node {name:?}: too many concurrent writers; try again")))
    }

    /// Campaigns for `leader/<role>` with a lease of `ttl`, waiting until this process leads.
    /// The returned leadership ends (its `lost` turns true) strictly before the lease could
    /// have expired on the server, or when a fenced write finds the lead gone.
    pub async fn lead(&self, role: &str, id: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let key = self.key("leader", role);
        let mut c = self.client.clone();
        let asked = Instant::now();
        let granted = self.timed(c.lease_grant(ttl_secs, None)).await?;
        let lease = granted.id();
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_lease(
            self.clone(),
            lease,
            Duration::from_secs(ttl_secs as u64),
            asked + Duration::from_secs(granted.ttl().max(0) as u64),
            lost_tx.clone(),
        ));
        let unfenced = EtcdStore { fence: None, ..self.clone() };
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), id, Some(PutOptions::new().with_lease(lease)))]);
            match unfenced.txn(txn).await {
                Ok(true) => return Ok(Leadership { lost, lost_tx, keeper, store: unfenced, lease, key }),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "campaign failed; retrying"),
            }
            if *lost.borrow() {
                keeper.abort();
                return Err(StoreError::Backend("lost the lease while waiting to lead".into()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Who leads `role` now, if anyone.
    pub async fn leader(&self, role: &str) -> Result<Option<String>, StoreError> {
        Ok(self.get_one("leader", role).await?.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Deletes a node even while its agent is live (`allot node delete --force`).
    pub async fn force_delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.delete_node_inner(name, true).await
    }

    async fn delete_node_inner(&self, name: &str, force: bool) -> Result<Vec<BlockGrant>, StoreError> {
        let mut grace_lease = None;
        let mut given_back: Vec<Kv> = Vec::new();
        let mut lost = 0;
        while lost < RETRIES {
            let node = self.get_one("nodes", name).await?;
            let (block_kvs, _) = self.list("blocks", None).await?;
            let held: Vec<&Kv> = block_kvs.iter().filter(|kv| kv.value == name.as_bytes()).collect();
            if node.is_none() && held.is_empty() {
                if given_back.is_empty() {
                    return Err(StoreError::NotFound(format!("node {name:?} not found")));
                }
                return Self::grants_of(&given_back);
            }
            // A node with many blocks is given back in several transactions (etcd allows 128
            // operations in one): the record goes with the first, so no grant can follow it.
            let chunk = &held[..held.len().min(NODE_DELETE_CHUNK)];
            let mut when = vec![self.unchanged("nodes", name, node.as_ref())];
            if !force {
                when.push(Compare::create_revision(self.key("alive", name), CompareOp::Equal, 0));
            }
            let mut ops = Vec::new();
            if node.is_some() {
                ops.push(TxnOp::delete(self.key("nodes", name), None));
            }
            if !chunk.is_empty() && !self.release_grace.is_zero() && grace_lease.is_none() {
                let mut c = self.client.clone();
                let secs = self.release_grace.as_secs().max(1) as i64;
                grace_lease = Some(self.timed(c.lease_grant(secs, None)).await?.id());
            }
            for kv in chunk {
                when.push(self.unchanged("blocks", &kv.name, Some(kv)));
                ops.push(TxnOp::delete(self.key("blocks", &kv.name), None));
                if let Some(lease) = grace_lease {
                    ops.push(TxnOp::put(self.key("released", &kv.name), name, Some(PutOptions::new().with_lease(lease))));
                }
            }
            if self.txn(Txn::new().when(when).and_then(ops)).await? {
                given_back.extend(chunk.iter().map(|kv| (*kv).clone()));
                if chunk.len() == held.len() {
                    return Self::grants_of(&given_back);
                }
                continue;
            }
            lost += 1;
            if !force && self.get_one("alive", name).await?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "node {name:?} is live: its agent keeps its liveness lease, and its pods use its blocks; \
                     stop the agent on {name} first (the lease ends when it stops), or pass --force if the node is gone for good"
                )));
            }
        }
        Err(StoreError::Backend(format!("node {name:?}: too many concurrent writers; try again")))
    }
}

/// The value of a put (Some(Some)), a delete (Some(None)), or None when it does not decode.
fn event_value<T: DeserializeOwned>(put: bool, key: &str, bytes: &[u8]) -> Option<Option<T>> {
    if !put {
        return Some(None);
    }
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(Some(v)),
        Err(e) => {
            tracing::warn!(key, error = %e, "corrupt record in the etcd watch; ignored until the next full read");
            None
        }
    }
}

/// Whether `new` drops a CIDR or a family that `old` has.
fn shrinks(old: &PoolSpec, new: &PoolSpec) -> bool {
    allot_core::Family::ALL.into_iter().any(|f| match (old.family(f), new.family(f)) {
        (Some(o), Some(n)) => o.mask_size != n.mask_size || o.cidrs.iter().any(|c| !n.cidrs.contains(c)),
        (Some(_), None) => true,
        (None, _) => false,
    })
}

/// Blocks given back per transaction by `delete_node`: a compare and two operations each, under
/// etcd's default limit of 128 operations per transaction.
const NODE_DELETE_CHUNK: usize = 40;

/// Keeps the leader lease alive, renewing every third of `ttl`. The server expires the lease
/// `ttl` after it last saw a keep-alive, which it saw after we sent it: so the lease is surely
/// valid only until send time + ttl, and leadership ends a margin before that, whether or not
/// the keep-alive is still in flight.
async fn keep_lease(store: EtcdStore, lease: i64, ttl: Duration, mut valid_until: Instant, lost: watch::Sender<bool>) {
    let margin = (ttl / 4).max(Duration::from_millis(300));
    let period = ttl / 3;
    let mut c = store.client.clone();
    let mut stream = None;
    loop {
        let give_up = valid_until.checked_sub(margin).unwrap_or(valid_until);
        let sent = Instant::now();
        let attempt = async {
            if stream.is_none() {
                stream = Some(c.lease_keep_alive(lease).await?);
            }
            let (keeper, responses) = stream.as_mut().expect("opened above");
            keeper.keep_alive().await?;
            responses.message().await
        };
        let outcome = tokio::select! {
            r = attempt => Some(r),
            _ = tokio::time::sleep_until(give_up) => None,
        };
        let next = match outcome {
            Some(Ok(Some(r))) if r.ttl() > 0 => {
                valid_until = sent + Duration::from_secs(r.ttl() as u64);
                period
            }
            Some(Ok(Some(_))) => {
                tracing::warn!(lease = format!("{lease:x}"), "leader lease expired on the server; giving up leadership");
                lost.send_replace(true);
                return;
            }
            Some(other) => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "lease keep-alive failed; retrying");
                }
                stream = None;
                Duration::from_millis(200)
            }
            None => {
                tracing::warn!("lease keep-alive unanswered; giving up leadership before the lease can expire");
                lost.send_replace(true);
                return;
            }
        };
        let give_up = valid_until.checked_sub(margin).unwrap_or(valid_until);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = tokio::time::sleep_until(give_up) => {
                tracing::warn!("lease keep-alive unanswered; giving up leadership before the lease can expire");
                lost.send_replace(true);
                return;
            }
        }
    }
}

/// Held while this process leads.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    lost_tx: watch::Sender<bool>,
    keeper: tokio::task::JoinHandle<()>,
    store: EtcdStore,
    lease: i64,
    key: String,
}

impl Leadership {
    /// Steps down at once (revoking the lease) so another replica can lead.
    pub async fn resign(self) {
        self.keeper.abort();
        let mut c = self.store.client.clone();
        let _ = self.store.timed(c.lease_revoke(self.lease)).await;
    }
}

/// Dropping the handle stops keeping the lease, as a dead process would: the lead passes on
/// once the lease runs out.
impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
        self.lost_tx.send_replace(true);
    }
}

/// Liveness is a lease-bound key `alive/<node>`: it goes with the lease.
impl crate::Liveness for EtcdStore {
    type Lease = i64;

    /// A fresh lease of `ttl` bound to the key `alive/<node>`.
    async fn announce_alive(&self, node: &str, ttl: Duration) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let lease = self.timed(c.lease_grant(ttl.as_secs().max(2) as i64, None)).await?.id();
        let put = TxnOp::put(self.key("alive", node), node, Some(PutOptions::new().with_lease(lease)));
        self.txn(Txn::new().and_then([put])).await?;
        Ok(lease)
    }

    /// One keep-alive of the lease: Ok(false) when it has already expired.
    async fn renew_alive(&self, lease: &i64) -> Result<bool, StoreError> {
        let lease = *lease;
        let mut c = self.client.clone();
        let ttl = self
            .timed(async {
                let (mut keeper, mut responses) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(responses.message().await?.map_or(0, |r| r.ttl()))
            })
            .await?;
        Ok(ttl > 0)
    }

    async fn revoke_alive(&self, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.timed(c.lease_revoke(lease)).await.map(|_| ())
    }
}

impl Store for EtcdStore {
    async fn pools(&self) -> Result<Vec<Pool>, StoreError> {
        Self::pools_of(&self.list("pools", None).await?.0)
    }

    async fn apply_pools(&self, incoming: Vec<Pool>) -> Result<Vec<ApplyAction>, StoreError> {
        for _ in 0..RETRIES {
            let (pool_kvs, rev) = self.list("pools", None).await?;
            let (block_kvs, _) = self.list("blocks", Some(rev)).await?;
            let existing = Self::pools_of(&pool_kvs)?;
            let actions = rules::validate_apply(&existing, &Self::grants_of(&block_kvs)?, &incoming)?;
            let puts: Vec<TxnOp> = incoming
                .iter()
                .zip(&actions)
                .filter(|(_, a)| **a != ApplyAction::Unchanged)
                .map(|(p, _)| TxnOp::put(self.key("pools", &p.name), encode(&p.spec), None))
                .collect();
            if puts.is_empty() {
                return Ok(actions);
            }
            // Held blocks matter only to pools that lose CIDRs: compare just their blocks, so
            // grants and releases elsewhere cannot starve the apply.
            let mut when = vec![self.prefix_unchanged("pools", rev)];
            for p in &incoming {
                if existing.iter().any(|e| e.name == p.name && shrinks(&e.spec, &p.spec)) {
                    when.push(self.prefix_unchanged(&format!("blocks/{}/", p.name), rev));
                }
            }
            if self.txn(Txn::new().when(when).and_then(puts)).await? {
                return Ok(actions);
            }
        }
        Err(StoreError::Backend("pools: too many concurrent writers; try again".into()))
    }

    async fn delete_pool(&self, name: &str) -> Result<(), StoreError> {
        for _ in 0..RETRIES {
            let Some(pool) = self.get_one("pools", name).await? else {
                return Err(StoreError::NotFound(format!("pool {name:?} not found")));
            };
            let (block_kvs, rev) = self.list("blocks", None).await?;
            rules::validate_delete(name, &Self::grants_of(&block_kvs)?)?;
            let txn = Txn::new()
                .when([self.unchanged("pools", name, Some(&pool)), self.prefix_unchanged(&format!("blocks/{name}/"), rev)])
                .and_then([TxnOp::delete(self.key("pools", name), None)]);
            if self.txn(txn).await? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!("pool {name:?}: too many concurrent writers; try again")))
    }

    async fn grants(&self) -> Result<Vec<BlockGrant>, StoreError> {
        Self::grants_of(&self.list("blocks", None).await?.0)
    }

    async fn grant_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        let block = format!("{}/{}", grant.pool, grant.cidr);
        // Optimistic: no tombstone. On a lost race, find out why.
        let mut released: Option<Kv> = None;
        for _ in 0..RETRIES {
            let Some(pool_kv) = self.get_one("pools", &grant.pool).await? else { return Ok(false) };
            let pool = Pool { name: grant.pool.clone(), spec: decode("pool", &grant.pool, &pool_kv.value)? };
            if !block_fits(&pool, grant) {
                return Ok(false);
            }
            let mut ops = vec![TxnOp::put(self.key("blocks", &block), grant.node.as_str(), None)];
            if released.is_some() {
                // The block was taken from this very node: it may have it back.
                ops.push(TxnOp::delete(self.key("released", &block), None));
            }
            let txn = Txn::new()
                .when([
                    self.unchanged("blocks", &block, None),
                    self.unchanged("pools", &grant.pool, Some(&pool_kv)),
                    self.unchanged("released", &block, released.as_ref()),
                ])
                .and_then(ops);
            if self.txn(txn).await? {
                return Ok(true);
            }
            if self.get_one("blocks", &block).await?.is_some() {
                return Ok(false);
            }
            released = self.get_one("released", &block).await?;
            if released.as_ref().is_some_and(|kv| kv.value != grant.node.as_bytes()) {
                // Reserved for the node it was taken from, until the release grace ends.
                return Ok(false);
            }
        }
        Err(StoreError::Backend(format!("block {block}: too many concurrent writers; try again")))
    }

    async fn release_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        let key = self.key("blocks", &format!("{}/{}", grant.pool, grant.cidr));
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, grant.node.as_str())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.txn(txn).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.list("nodes", None).await?.0.iter().map(|kv| decode("node", &kv.name, &kv.value)).collect()
    }

    async fn register_node(&self, name: &str, ip: Option<IpAddr>) -> Result<(), StoreError> {
        self.update_node(name, true, |n| {
            if ip.is_some() {
                n.ip = ip;
            }
        })
        .await
    }

    async fn set_requested(&self, name: &str, requested: Vec<PoolRequest>) -> Result<(), StoreError> {
        self.update_node(name, false, |n| n.requested = requested.clone()).await
    }

    async fn set_operator_error(&self, name: &str, error: Option<String>) -> Result<(), StoreError> {
        self.update_node(name, false, |n| n.operator_error = error.clone()).await
    }

    async fn delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.delete_node_inner(name, false).await
    }

    async fn live_nodes(&self) -> Result<Option<BTreeSet<String>>, StoreError> {
        Ok(Some(self.list("alive", None).await?.0.into_iter().map(|kv| kv.name).collect()))
    }

    async fn released_blocks(&self) -> Result<Vec<BlockGrant>, StoreError> {
        Self::grants_of(&self.list("released", None).await?.0)
    }

    async fn namespaces(&self) -> Result<BTreeMap<String, Annotations>, StoreError> {
        self.list("namespaces", None)
            .await?
            .0
            .iter()
            .map(|kv| Ok((kv.name.clone(), decode("namespace", &kv.name, &kv.value)?)))
            .collect()
    }

    async fn annotate_namespace(&self, ns: &str, set: Annotations, remove: Vec<String>) -> Result<Annotations, StoreError> {
        for _ in 0..RETRIES {
            let read = self.get_one("namespaces", ns).await?;
            let old: Annotations = read.as_ref().map(|kv| decode("namespace", ns, &kv.value)).transpose()?.unwrap_or_default();
            let Some(new) = crate::annotated(&old, &set, &remove) else {
                return Ok(old);
            };
            let op = if new.is_empty() {
                TxnOp::delete(self.key("namespaces", ns), None)
            } else {
                TxnOp::put(self.key("namespaces", ns), encode(&new), None)
            };
            if self.txn(Txn::new().when([self.unchanged("namespaces", ns, read.as_ref())]).and_then([op])).await? {
                return Ok(new);
            }
        }
        Err(StoreError::Backend(format!("namespace {ns:?}: too many concurrent writers; try again")))
    }

    async fn grant_blocks(&self, grants: &[BlockGrant]) -> Result<Vec<bool>, StoreError> {
        let mut out = vec![false; grants.len()];
        if grants.is_empty() {
            return Ok(out);
        }
        // Pools and reservations read once at one revision; then one transaction per batch,
        // a few in flight. A batch that loses any race falls back to one grant at a time, so
        // one lost block does not lose the rest. Reserved blocks always go one at a time (the
        // node they were taken from may take them back).
        let (pool_kvs, rev) = self.list("pools", None).await?;
        let pools: BTreeMap<String, Pool> = Self::pools_of(&pool_kvs)?.into_iter().map(|p| (p.name.clone(), p)).collect();
        let (released_kvs, _) = self.list("released", Some(rev)).await?;
        let reserved: BTreeSet<(String, ipnet::IpNet)> =
            Self::grants_of(&released_kvs)?.into_iter().map(|g| (g.pool, g.cidr)).collect();
        let mut batched = Vec::new();
        let mut single = Vec::new();
        for (i, g) in grants.iter().enumerate() {
            if !pools.get(&g.pool).is_some_and(|p| block_fits(p, g)) {
                continue;
            }
            if reserved.contains(&(g.pool.clone(), g.cidr)) { single.push(i) } else { batched.push(i) }
        }
        let mut flights = tokio::task::JoinSet::new();
        let mut chunks = batched.chunks(GRANT_BATCH).map(<[usize]>::to_vec);
        loop {
            while flights.len() < GRANTS_IN_FLIGHT {
                let Some(chunk) = chunks.next() else { break };
                let (store, batch): (EtcdStore, Vec<BlockGrant>) = (self.clone(), chunk.iter().map(|&i| grants[i].clone()).collect());
                flights.spawn(async move { (store.grant_batch(&batch, rev).await, chunk) });
            }
            let Some(done) = flights.join_next().await else { break };
            let (result, chunk) = done.map_err(|e| StoreError::Backend(format!("a grant batch failed: {e}")))?;
            if result? {
                for i in chunk {
                    out[i] = true;
                }
            } else {
                single.extend(chunk);
            }
        }
        for i in single {
            out[i] = self.grant_block(&grants[i]).await?;
        }
        Ok(out)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One read per kind, all at the revision of the first.
        let (pool_kvs, rev) = self.list("pools", None).await?;
        let at = Some(rev);
        let (block_kvs, _) = self.list("blocks", at).await?;
        let (node_kvs, _) = self.list("nodes", at).await?;
        let (ns_kvs, _) = self.list("namespaces", at).await?;
        let (alive_kvs, _) = self.list("alive", at).await?;
        let (released_kvs, _) = self.list("released", at).await?;
        Ok(Snapshot {
            revision: rev as u64,
            pools: Self::pools_of(&pool_kvs)?,
            grants: Self::grants_of(&block_kvs)?,
            nodes: node_kvs.iter().map(|kv| decode("node", &kv.name, &kv.value)).collect::<Result<_, _>>()?,
            namespaces: ns_kvs.iter().map(|kv| Ok((kv.name.clone(), decode("namespace", &kv.name, &kv.value)?))).collect::<Result<_, StoreError>>()?,
            live: Some(alive_kvs.into_iter().map(|kv| kv.name).collect()),
            released: Self::grants_of(&released_kvs)?,
        })
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    fn heard_unix(&self) -> Option<u64> {
        Some(self.heard.load(std::sync::atomic::Ordering::Relaxed))
    }
}
