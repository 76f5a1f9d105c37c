use allot_wire::Status;

use crate::backend::Backend;
use crate::output::{Format, Table, print, usage_bar};

#[derive(clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

pub fn exec(args: Args, backend: &Backend) -> anyhow::Result<()> {
    match backend {
        Backend::Agent(client) => node_status(args.output, &client.get::<Status>("/v1/status")?),
        #[cfg(feature = "etcd")]
        Backend::Etcd { store, rt } => cluster::print_status(args.output, &rt.block_on(cluster::status(store))?),
    }
}

fn node_status(output: Format, status: &Status) -> anyhow::Result<()> {
    print(output, status, || {
        let mut t = Table::new(&["pool", "family", "capacity", "blocks node/cluster", "in use", "free", "requested", "node usage"]);
        for p in &status.pools {
            let cap: u128 = p.node_capacity.parse().unwrap_or(0);
            t.row(vec![
                p.pool.clone(),
                p.family.to_string(),
                p.capacity.clone(),
                format!("{}/{}", p.blocks_node, p.blocks_cluster),
                p.in_use.to_string(),
                p.free.clone(),
                p.requested.to_string(),
                usage_bar(u128::from(p.in_use), cap, 20),
            ]);
        }
        t
    })?;
    if output == Format::Table {
        let state = match &status.cni {
            Some(r) if !r.ready => format!("not ready: {}", r.reason.as_deref().unwrap_or("unknown")),
            _ if !status.ready => "restoring".into(),
            _ => "ready".into(),
        };
        println!("node {}: {state}", status.node);
        let store = &status.store;
        if !store.reachable {
            let since = store
                .unreachable_since
                .map(|t| format!(" since {} ({}s ago)", utc(t), now_unix().saturating_sub(t)))
                .unwrap_or_default();
            let why = store.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!("cluster store: unreachable{since}{why}");
        }
        if store.from_saved_view {
            println!("cluster store: pools and blocks are from the node's saved view until the store answers");
        }
        for f in &status.route_failures {
            println!("route to {} (node {}) via {} not installed: {}", f.cidr, f.node, f.via, f.error);
        }
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard Hinnant's algorithm).
fn utc(t: u64) -> String {
    let (days, secs) = ((t / 86_400) as i64, t % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_795_478_400 + 3_723), "2026-11-24T01:02:03Z");
    }
}

#[cfg(feature = "etcd")]
mod cluster {
    use allot_core::{Family, cidr};
    use allot_store::{EtcdStore, Store};
    use serde::Serialize;

    use crate::output::{Format, Table, print, usage_bar};

    /// Cluster-wide view from etcd: how much of each pool is granted, and to whom.
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ClusterStatus {
        pub pools: Vec<PoolRow>,
        pub nodes: Vec<NodeRow>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PoolRow {
        pool: String,
        family: Family,
        capacity: String,
        blocks: u64,
        granted_addresses: String,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NodeRow {
        node: String,
        pool: String,
        family: Family,
        blocks: u64,
        usable: String,
        requested: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }

    pub async fn status(store: &EtcdStore) -> anyhow::Result<ClusterStatus> {
        let pools = store.pools().await?;
        let grants = store.grants().await?;
        let nodes = store.nodes().await?;
        let mut out = ClusterStatus { pools: Vec::new(), nodes: Vec::new() };
        for p in &pools {
            for (family, _) in p.spec.families() {
                let mine = || grants.iter().filter(|g| g.pool == p.name && Family::of(&g.cidr) == family);
                out.pools.push(PoolRow {
                    pool: p.name.clone(),
                    family,
                    capacity: p.spec.capacity(family).to_string(),
                    blocks: mine().count() as u64,
                    granted_addresses: mine().map(|g| cidr::size_of(family, g.cidr.prefix_len())).sum::<u128>().to_string(),
                });
                for n in &nodes {
                    let held: Vec<_> = mine().filter(|g| g.node == n.name).collect();
                    let requested = n.requested.iter().find(|r| r.pool == p.name).map_or(0, |r| r.needed.get(family));
                    if held.is_empty() && requested == 0 {
                        continue;
                    }
                    out.nodes.push(NodeRow {
                        node: n.name.clone(),
                        pool: p.name.clone(),
                        family,
                        blocks: held.len() as u64,
                        usable: held.iter().map(|g| cidr::usable_count(&g.cidr)).sum::<u128>().to_string(),
                        requested,
                        error: n.operator_error.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn print_status(output: Format, s: &ClusterStatus) -> anyhow::Result<()> {
        print(output, s, || {
            let mut t = Table::new(&["pool", "family", "capacity", "blocks", "granted", "pool usage"]);
            for p in &s.pools {
                let cap: u128 = p.capacity.parse().unwrap_or(0);
                let granted: u128 = p.granted_addresses.parse().unwrap_or(0);
                t.row(vec![p.pool.clone(), p.family.to_string(), p.capacity.clone(), p.blocks.to_string(), p.granted_addresses.clone(), usage_bar(granted, cap, 20)]);
            }
            t
        })?;
        if output == Format::Table {
            println!();
            let mut t = Table::new(&["node", "pool", "family", "blocks", "usable", "requested", "error"]);
            for n in &s.nodes {
                t.row(vec![n.node.clone(), n.pool.clone(), n.family.to_string(), n.blocks.to_string(), n.usable.clone(), n.requested.to_string(), n.error.clone().unwrap_or_default()]);
            }
            print!("{}", t.render());
        }
        Ok(())
    }
}
