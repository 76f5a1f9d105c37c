//! The agent's settings: defaults, an optional YAML file, then flags (the CLI merges them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use allot_core::PoolSpec;
use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/allot";
pub const DEFAULT_POOL: &str = "default";
/// Half the operator's default `--node-gc-after` (10 minutes).
pub const DEFAULT_MAX_VIEW_AGE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// `pool=count` addresses kept in reserve per family (`ipam-multi-pool-pre-allocation`).
    pub pre_allocation: BTreeMap<String, u64>,
    pub default_pool: String,
    /// Pools created at start when absent (`autoCreateCiliumPodIPPools`).
    pub auto_create_pools: BTreeMap<String, PoolSpec>,
    /// How long an ADD waits for a new block before answering "try again later".
    pub add_wait: Duration,
    /// How long a failed attempt counts as pending demand.
    pub pending_ttl: Duration,
    /// New addresses come from the node's blocks only while the store confirmed them within
    /// this long: past it, the operator may have removed the node and given its blocks away.
    /// Keep it below the operator's `--node-gc-after`.
    pub max_view_age: Duration,
    /// This node's address on the node network (cluster mode).
    pub node_ip: Option<std::net::IpAddr>,
    /// Route every other node's blocks via that node's IP.
    pub direct_routes: bool,
    /// Keep each block's first usable address for the node's gateway (default on: `bridge`
    /// with isGateway and `ptp` give it to the host side).
    pub reserve_gateway: bool,
    /// Where to serve /metrics, /healthz, /readyz and the status page (off when None).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// host-local network directories to adopt at start (`--adopt-host-local`).
    pub adopt_host_local: Vec<PathBuf>,
    /// A missing `adopt_host_local` directory holds nothing yet (`--adopt-host-local-missing-ok`);
    /// otherwise it stops ADDs like any other adoption failure.
    pub adopt_missing_ok: bool,
    /// On Kubernetes, how long an ADD without pod annotations waits for the pod watch to see
    /// the pod before choosing by namespace annotation or the default pool.
    pub pod_wait: Duration,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>) -> Self {
        AgentConfig {
            node: node.into(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            socket: PathBuf::from(allot_client::DEFAULT_SOCKET),
            pre_allocation: [(DEFAULT_POOL.to_string(), 8)].into(),
            default_pool: DEFAULT_POOL.into(),
            auto_create_pools: BTreeMap::new(),
            add_wait: Duration::from_secs(10),
            pending_ttl: allot_core::demand::PENDING_TTL,
            max_view_age: DEFAULT_MAX_VIEW_AGE,
            node_ip: None,
            direct_routes: false,
            reserve_gateway: true,
            metrics_addr: None,
            adopt_host_local: Vec::new(),
            adopt_missing_ok: false,
            pod_wait: Duration::from_secs(5),
        }
    }

    pub fn pre_alloc(&self, pool: &str) -> u64 {
        self.pre_allocation.get(pool).copied().unwrap_or(0)
    }
}

/// The agent's config file (YAML). Every field is optional; flags override it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub node: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub pre_allocation: Option<BTreeMap<String, u64>>,
    pub default_pool: Option<String>,
    pub auto_create_pools: Option<BTreeMap<String, PoolSpec>>,
    /// Seconds.
    pub add_wait_seconds: Option<f64>,
    /// Seconds.
    pub max_view_age_seconds: Option<f64>,
    pub node_ip: Option<std::net::IpAddr>,
    pub auto_direct_node_routes: Option<bool>,
    pub reserve_gateway: Option<bool>,
    /// Seconds.
    pub pod_wait_seconds: Option<f64>,
}

/// Parses `pool=count,pool=count` (Cilium's `ipam-multi-pool-pre-allocation` form).
pub fn parse_pre_allocation(s: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (pool, n) = part
            .split_once('=')
            .ok_or_else(|| format!("pre-allocation entry {part:?} is not pool=count"))?;
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("pre-allocation count {n:?} for pool {pool:?} is not a whole number"))?;
        out.insert(pool.trim().to_string(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_allocation_map() {
        let m = parse_pre_allocation("default=8, blue=0,green=16").unwrap();
        assert_eq!(m, [("default".into(), 8), ("blue".into(), 0), ("green".into(), 16)].into());
        assert!(parse_pre_allocation("default").unwrap_err().contains("pool=count"));
        assert!(parse_pre_allocation("default=x").unwrap_err().contains("whole number"));
        assert!(parse_pre_allocation("").unwrap().is_empty());
    }
}
