//! The etcd backend. Every change that reads before it writes is one transaction whose compares
//! check that nothing it read has changed; on a lost race it reads again and re-validates.
//!
//! Key layout (values JSON, under a prefix, `/allot/` by default):
//! - `pools/<name>` -> `PoolSpec`
//! - `blocks/<pool>/<cidr>` -> holding node name (one key per block, created only if absent)
//! - `nodes/<name>` -> `NodeRecord`
//! - `namespaces/<name>` -> annotations
//! - `leader/operator` -> the leading operator's id, bound to its lease

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use allot_core::{ApplyAction, BlockGrant, Pool, PoolSpec, pool as rules};
use allot_wire::PoolRequest;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::{Annotations, NodeRecord, Store, StoreError, block_fits};

/// How many times a transaction that lost a race is retried before giving up.
const RETRIES: usize = 32;

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Every request gives up after this long, so a frozen etcd cannot hang the agent's loops.
    pub timeout: Duration,
    pub tls: Option<EtcdTls>,
}

#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig { endpoints, prefix: "/allot/".into(), timeout: Duration::from_secs(3), tls: None }
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    revision: watch::Sender<u64>,
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
        let mut opts = ConnectOptions::new().with_timeout(cfg.timeout).with_connect_timeout(cfg.timeout);
        if let Some(tls) = &cfg.tls {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| StoreError::Backend(format!("reading {}: {e}", p.display())));
            let tls_opts = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                .identity(etcd_client::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
            opts = opts.with_tls(tls_opts);
        }
        let endpoints = cfg.endpoints.join(",");
        let client = tokio::time::timeout(cfg.timeout, Client::connect(cfg.endpoints.clone(), Some(opts)))
            .await
            .map_err(|_| StoreError::Backend(format!("etcd at {endpoints} did not answer within {:?}", cfg.timeout)))?
            .map_err(|e| StoreError::Backend(format!("connecting to etcd at {endpoints}: {e}")))?;
        let store = EtcdStore { client, prefix: cfg.prefix.clone(), timeout: cfg.timeout, revision: watch::Sender::new(0) };
        let rev = store.current_revision().await?;
        store.revision.send_replace(rev);
        tokio::spawn(store.clone().follow());
        Ok(store)
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
        let mut c = self.client.clone();
        Ok(self.timed(c.txn(txn)).await?.succeeded())
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

    /// Publishes the revision of every change under the prefix. A broken watch is re-opened
    /// after a fresh read, whose revision wakes every follower to re-read too.
    async fn follow(self) {
        loop {
            let rev = match self.current_revision().await {
                Ok(rev) => rev,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd unreachable; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.revision.send_if_modified(|r| {
                let changed = *r != rev;
                *r = rev;
                changed
            });
            let mut c = self.client.clone();
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev as i64 + 1);
            let stream = match self.timed(c.watch(self.prefix.as_str(), Some(opts))).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "opening etcd watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut stream = stream;
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if msg.canceled() {
                            break;
                        }
                        if let Some(h) = msg.header() {
                            let rev = h.revision() as u64;
                            self.revision.send_if_modified(|r| {
                                let changed = rev > *r;
                                if changed {
                                    *r = rev;
                                }
                                changed
                            });
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch broke; resyncing");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn update_node(&self, name: &str, create: bool, change: impl Fn(&mut NodeRecord)) -> Result<(), StoreError> {
        for _ in 0..RETRIES {
            let read = self.get_one("nodes", name).await?;
            let old: Option<NodeRecord> = read.as_ref().map(|kv| decode("node", name, &kv.value)).transpose()?;
            if old.is_none() && !create {
                return Err(StoreError::NotFound(format!("node {name:?} is not registered")));
            }
            let mut new = old.clone().unwrap_or_else(|| NodeRecord { name: name.to_string(), ..Default::default() });
            change(&mut new);
            if old.as_ref() == Some(&new) {
                return Ok(());
            }
            let txn = Txn::new()
                .when([self.unchanged("nodes", name, read.as_ref())])
                .and_then([TxnOp::put(self.key("nodes", name), encode(&new), None)]);
            if self.txn(txn).await? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!("node {name:?}: too many concurrent writers; try again")))
    }

    /// Campaigns for `leader/<role>` with a lease of `ttl`, waiting until this process leads.
    /// The returned leadership ends (its `lost` turns true) when the lease cannot be kept.
    pub async fn lead(&self, role: &str, id: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let key = self.key("leader", role);
        let mut c = self.client.clone();
        let lease = self.timed(c.lease_grant(ttl_secs, None)).await?.id();
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_lease(self.clone(), lease, ttl_secs, lost_tx));
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), id, Some(PutOptions::new().with_lease(lease)))]);
            match self.txn(txn).await {
                Ok(true) => return Ok(Leadership { lost, keeper, store: self.clone(), lease }),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "campaign failed; retrying"),
            }
            if *lost.borrow() {
                return Err(StoreError::Backend("lost the lease while waiting to lead".into()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Who leads `role` now, if anyone.
    pub async fn leader(&self, role: &str) -> Result<Option<String>, StoreError> {
        Ok(self.get_one("leader", role).await?.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

async fn keep_lease(store: EtcdStore, lease: i64, ttl_secs: i64, lost: watch::Sender<bool>) {
    let mut c = store.client.clone();
    let period = Duration::from_millis((ttl_secs as u64 * 1000) / 3);
    let Ok(Ok((mut keeper, mut responses))) = tokio::time::timeout(store.timeout, c.lease_keep_alive(lease)).await else {
        lost.send_replace(true);
        return;
    };
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        let ok = tokio::time::timeout(period, async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match ok {
            Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = tokio::time::Instant::now(),
            _ => {
                // The lease may still be alive on the server; stop leading before it could
                // have expired there.
                if last_ok.elapsed() + period >= Duration::from_secs(ttl_secs as u64) {
                    tracing::warn!("lease keep-alive failed; giving up leadership");
                    lost.send_replace(true);
                    return;
                }
            }
        }
    }
}

/// Held while this process leads.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
    store: EtcdStore,
    lease: i64,
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
            let txn = Txn::new().when([self.prefix_unchanged("pools", rev), self.prefix_unchanged("blocks", rev)]).and_then(puts);
            if self.txn(txn).await? {
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
                .when([self.unchanged("pools", name, Some(&pool)), self.prefix_unchanged(&format!("blocks/{name}"), rev)])
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
        for _ in 0..RETRIES {
            let Some(pool_kv) = self.get_one("pools", &grant.pool).await? else { return Ok(false) };
            let pool = Pool { name: grant.pool.clone(), spec: decode("pool", &grant.pool, &pool_kv.value)? };
            if !block_fits(&pool, grant) {
                return Ok(false);
            }
            let txn = Txn::new()
                .when([self.unchanged("blocks", &block, None), self.unchanged("pools", &grant.pool, Some(&pool_kv))])
                .and_then([TxnOp::put(self.key("blocks", &block), grant.node.as_str(), None)]);
            if self.txn(txn).await? {
                return Ok(true);
            }
            if self.get_one("blocks", &block).await?.is_some() {
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
        for _ in 0..RETRIES {
            let node = self.get_one("nodes", name).await?;
            let (block_kvs, _) = self.list("blocks", None).await?;
            let held: Vec<&Kv> = block_kvs.iter().filter(|kv| kv.value == name.as_bytes()).collect();
            if node.is_none() && held.is_empty() {
                return Err(StoreError::NotFound(format!("node {name:?} not found")));
            }
            let mut when = vec![self.unchanged("nodes", name, node.as_ref())];
            let mut ops = vec![TxnOp::delete(self.key("nodes", name), None)];
            for kv in &held {
                when.push(self.unchanged("blocks", &kv.name, Some(kv)));
                ops.push(TxnOp::delete(self.key("blocks", &kv.name), None));
            }
            if self.txn(Txn::new().when(when).and_then(ops)).await? {
                let held: Vec<Kv> = held.into_iter().cloned().collect();
                return Self::grants_of(&held);
            }
        }
        Err(StoreError::Backend(format!("node {name:?}: too many concurrent writers; try again")))
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
            let mut new = old.clone();
            for k in &remove {
                new.remove(k);
            }
            new.extend(set.clone());
            if new == old {
                return Ok(new);
            }
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

    fn watch(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}
