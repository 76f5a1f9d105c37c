//! Cluster-wide pool metrics and the operator's monitoring site. Read from the store at scrape
//! time: served by `allot operator --metrics-addr`, and by a standalone agent (which runs the
//! operator in-process).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use allot_core::{BlockGrant, Family, cidr};
use allot_store::{Store, StoreError};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::family::Family as MFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::page::ClusterPool;

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A store read at scrape time gives up after this, so a scrape never hangs on etcd.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ClusterView {
    pub pools: Vec<ClusterPool>,
    pub grants: Vec<BlockGrant>,
    /// (node, pool, family) -> addresses requested.
    pub requested: BTreeMap<(String, String, Family), u64>,
}

pub async fn read<S: Store>(store: &S) -> Result<ClusterView, StoreError> {
    let pools = store.pools().await?;
    let grants = store.grants().await?;
    let nodes = store.nodes().await?;
    let mut out = ClusterView { pools: Vec::new(), grants, requested: BTreeMap::new() };
    for p in &pools {
        for (family, _) in p.spec.families() {
            let mine = || out.grants.iter().filter(|g| g.pool == p.name && Family::of(&g.cidr) == family);
            out.pools.push(ClusterPool {
                pool: p.name.clone(),
                family,
                capacity: p.spec.capacity(family),
                granted_addresses: mine().map(|g| cidr::size_of(family, g.cidr.prefix_len())).sum(),
                blocks: mine().count() as u64,
            });
        }
    }
    for n in &nodes {
        for r in &n.requested {
            for family in Family::ALL {
                let v = r.needed.get(family);
                if v > 0 {
                    out.requested.insert((n.name.clone(), r.pool.clone(), family), v);
                }
            }
        }
    }
    Ok(out)
}

/// The cluster gauges of `view` (or only `allot_cluster_store_reachable 0`), OpenMetrics, no EOF.
pub fn encode(out: &mut String, view: Option<&ClusterView>) {
    let mut reg = Registry::with_prefix("allot_cluster");
    let reachable = Gauge::<i64>::default();
    reachable.set(i64::from(view.is_some()));
    reg.register("store_reachable", "1 when this scrape could read the cluster store, else 0", reachable);
    if let Some(v) = view {
        let g = |reg: &mut Registry, name: &str, help: &str| {
            let f = MFamily::<Labels, FGauge>::default();
            reg.register(name, help, f.clone());
            f
        };
        let capacity = g(&mut reg, "pool_capacity_addresses", "Addresses in the pool's CIDRs");
        let granted = g(&mut reg, "pool_granted_addresses", "Addresses in the pool's blocks granted to nodes");
        let free = g(&mut reg, "pool_free_addresses", "Addresses of the pool in no node's block");
        let blocks = g(&mut reg, "pool_blocks_granted", "Blocks of the pool granted to nodes");
        let node_blocks = g(&mut reg, "node_blocks", "Blocks each node holds");
        let requested = g(&mut reg, "node_requested_addresses", "Addresses each node asks the operator to cover");
        for p in &v.pools {
            let l = vec![("pool", p.pool.clone()), ("family", p.family.to_string())];
            capacity.get_or_create(&l).set(p.capacity as f64);
            granted.get_or_create(&l).set(p.granted_addresses as f64);
            free.get_or_create(&l).set(p.capacity.saturating_sub(p.granted_addresses) as f64);
            blocks.get_or_create(&l).set(p.blocks as f64);
        }
        for gr in &v.grants {
            let l = vec![("node", gr.node.clone()), ("pool", gr.pool.clone()), ("family", Family::of(&gr.cidr).to_string())];
            node_blocks.get_or_create(&l).inc();
        }
        for ((node, pool, family), n) in &v.requested {
            requested.get_or_create(&vec![("node", node.clone()), ("pool", pool.clone()), ("family", family.to_string())]).set(*n as f64);
        }
    }
    encode_registry(out, &reg).expect("encoding to a String cannot fail");
}

/// Reads the view with a deadline; the error says why it is missing.
pub async fn read_timed<S: Store>(store: &S) -> Result<ClusterView, String> {
    match tokio::time::timeout(READ_TIMEOUT, read(store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("reading the cluster store failed: {e}")),
        Err(_) => Err(format!("the cluster store did not answer within {READ_TIMEOUT:?}")),
    }
}

/// `allot operator --metrics-addr`: its own metrics plus the cluster's pools.
pub struct OperatorSite<S> {
    pub store: Arc<S>,
}

impl<S: Store> crate::web::Site for OperatorSite<S> {
    async fn metrics(&self) -> String {
        let view = read_timed(&*self.store).await;
        let mut out = String::with_capacity(8192);
        allot_operator::metrics::encode(&mut out);
        encode(&mut out, view.as_ref().ok());
        encode_eof(&mut out).expect("encoding to a String cannot fail");
        out
    }

    /// Ready once connected to the store (which it is, to exist): a standby is ready too.
    async fn ready(&self) -> Result<(), String> {
        read_timed(&*self.store).await.map(|_| ())
    }

    async fn page(&self) -> String {
        let leader = allot_operator::metrics::is_leader();
        match read_timed(&*self.store).await {
            Ok(v) => crate::page::operator(leader, &v.pools, &v.grants, None),
            Err(e) => crate::page::operator(leader, &[], &[], Some(&e)),
        }
    }
}
