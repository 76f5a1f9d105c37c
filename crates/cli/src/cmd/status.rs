use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use allot_wire::Status;

use crate::backend::Backend;
use crate::output::{Format, Table, print, usage_bar};

#[derive(clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
    /// Redraw the table in place every --interval until interrupted (Ctrl-C).
    #[arg(short = 'w', long)]
    watch: bool,
    /// How often --watch redraws (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    interval: String,
}

pub fn exec(args: Args, backend: &Backend) -> anyhow::Result<()> {
    if args.watch {
        anyhow::ensure!(args.output == Format::Table, "--watch redraws the table: drop -o {:?}", args.output);
        let every = crate::cmd::agent::parse_duration(&args.interval)?;
        anyhow::ensure!(every >= Duration::from_millis(100), "--interval must be at least 100ms");
        return watch(backend, every);
    }
    match backend {
        Backend::Agent(client) => node_status(args.output, &client.get::<Status>("/v1/status")?),
        #[cfg(feature = "etcd")]
        Backend::Etcd { store, rt } => cluster::print_status(args.output, &rt.block_on(cluster::status(store))?),
        #[cfg(feature = "kubernetes")]
        Backend::Kube { store, rt } => cluster::print_status(args.output, &rt.block_on(cluster::status(store))?),
    }
}

/// The table text of one look at the node or the cluster.
fn frame(backend: &Backend) -> anyhow::Result<String> {
    Ok(match backend {
        Backend::Agent(client) => render_node(&client.get::<Status>("/v1/status")?),
        #[cfg(feature = "etcd")]
        Backend::Etcd { store, rt } => cluster::render(&rt.block_on(cluster::status(store))?),
        #[cfg(feature = "kubernetes")]
        Backend::Kube { store, rt } => cluster::render(&rt.block_on(cluster::status(store))?),
    })
}

/// `--watch`: on a terminal each frame replaces the last one in place; piped, frames follow
/// one another. A failed look is shown in the frame, and the next one tries again.
fn watch(backend: &Backend, every: Duration) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        let body = frame(backend).unwrap_or_else(|e| format!("error: {e:#}\n"));
        let header = format!("every {every:?}: allot status    {}", utc(now_unix()));
        let mut out = std::io::stdout().lock();
        out.write_all(redraw(&header, &body, first, tty).as_bytes())?;
        out.flush()?;
        drop(out);
        first = false;
        std::thread::sleep(every);
    }
}

/// One frame of `--watch`. On a terminal: cursor home (the screen cleared before the first
/// frame), every line cleared to its end, and whatever the last frame left below erased, so
/// the table redraws without flicker or leftovers.
pub fn redraw(header: &str, body: &str, first: bool, tty: bool) -> String {
    if !tty {
        return format!("{}{header}\n\n{body}", if first { "" } else { "\n" });
    }
    let mut s = String::from(if first { "\x1b[2J\x1b[H" } else { "\x1b[H" });
    for line in std::iter::once(header).chain(std::iter::once("")).chain(body.lines()) {
        s.push_str(line);
        s.push_str("\x1b[K\n");
    }
    s.push_str("\x1b[J");
    s
}

fn node_status(output: Format, status: &Status) -> anyhow::Result<()> {
    if output == Format::Table {
        print!("{}", render_node(status));
        return Ok(());
    }
    print(output, status, || Table::new(&[]))
}

fn node_table(status: &Status) -> Table {
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
}

/// The node's table and state lines, as `allot status` prints them.
pub fn render_node(status: &Status) -> String {
    let mut out = node_table(status).render();
    let state = match &status.cni {
        Some(r) if !r.ready => format!("not ready: {}", r.reason.as_deref().unwrap_or("unknown")),
        _ if !status.ready => "restoring".into(),
        _ => "ready".into(),
    };
    let _ = writeln!(out, "node {}: {state}", status.node);
    let store = &status.store;
    if !store.reachable {
        let since = store
            .unreachable_since
            .map(|t| format!(" since {} ({}s ago)", utc(t), now_unix().saturating_sub(t)))
            .unwrap_or_default();
        let why = store.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        let _ = writeln!(out, "cluster store: unreachable{since}{why}");
    }
    if store.from_saved_view {
        let _ = writeln!(out, "cluster store: pools and blocks are from the node's saved view until the store answers");
    }
    for f in &status.route_failures {
        let _ = writeln!(out, "route to {} (node {}) via {} not installed: {}", f.cidr, f.node, f.via, f.error);
    }
    out
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

    /// On a terminal, a frame after the first goes home and erases what the last one left;
    /// piped, frames are plain text one after another.
    #[test]
    fn watch_redraws_in_place() {
        let first = super::redraw("h", "a\nb\n", true, true);
        assert!(first.starts_with("\x1b[2J\x1b[H"), "{first:?}");
        let next = super::redraw("h", "a\n", false, true);
        assert_eq!(next, "\x1b[Hh\x1b[K\n\x1b[K\na\x1b[K\n\x1b[J");
        assert_eq!(super::redraw("h", "a\n", false, false), "\nh\n\na\n");
        assert!(!super::redraw("h", "a\n", true, false).contains('\x1b'));
    }
}

#[cfg(any(feature = "etcd", feature = "kubernetes"))]
mod cluster {
    use allot_core::{Family, cidr};
    use allot_store::Store;
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

    pub async fn status<S: Store>(store: &S) -> anyhow::Result<ClusterStatus> {
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
        if output == Format::Table {
            print!("{}", render(s));
            return Ok(());
        }
        print(output, s, || Table::new(&[]))
    }

    /// Both tables, as `allot status` prints them against etcd.
    pub fn render(s: &ClusterStatus) -> String {
        let mut t = Table::new(&["pool", "family", "capacity", "blocks", "granted", "pool usage"]);
        for p in &s.pools {
            let cap: u128 = p.capacity.parse().unwrap_or(0);
            let granted: u128 = p.granted_addresses.parse().unwrap_or(0);
            t.row(vec![p.pool.clone(), p.family.to_string(), p.capacity.clone(), p.blocks.to_string(), p.granted_addresses.clone(), usage_bar(granted, cap, 20)]);
        }
        let mut out = t.render();
        out.push('\n');
        let mut t = Table::new(&["node", "pool", "family", "blocks", "usable", "requested", "error"]);
        for n in &s.nodes {
            t.row(vec![n.node.clone(), n.pool.clone(), n.family.to_string(), n.blocks.to_string(), n.usable.clone(), n.requested.to_string(), n.error.clone().unwrap_or_default()]);
        }
        out.push_str(&t.render());
        out
    }
}
