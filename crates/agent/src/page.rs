//! The status page at `/` of the monitoring address: plain HTML with inline CSS and SVG, no
//! script, refreshed by the browser every few seconds (`<meta http-equiv="refresh">`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::SystemTime;

use allot_core::{BlockGrant, Family};
use allot_wire::Status;

/// How often the page reloads itself, in seconds.
pub const REFRESH_SECS: u32 = 5;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}\
.muted{color:#667}.ok{color:#17803d}.bad{color:#b42318}.warn{color:#b54708}\
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}\
td,th{padding:6px 10px;border-bottom:1px solid #e4e7ec;text-align:left;vertical-align:middle}\
th{background:#eef1f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;background:#e4e7ec}";

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal usage bar: green below 75%, amber to 90%, red above.
pub fn bar(used: f64, total: f64, width: u32) -> String {
    let frac = if total > 0.0 { (used / total).clamp(0.0, 1.0) } else { 0.0 };
    let color = match frac {
        f if f >= 0.9 => "#d92d20",
        f if f >= 0.75 => "#f79009",
        _ => "#12b76a",
    };
    let filled = (frac * f64::from(width)).round();
    format!(
        "<svg class=\"bar\" width=\"{width}\" height=\"14\" role=\"img\" aria-label=\"{pct:.1}% used\"><rect width=\"{width}\" height=\"14\" rx=\"3\" fill=\"#e4e7ec\"/><rect width=\"{filled}\" height=\"14\" rx=\"3\" fill=\"{color}\"/></svg> <span class=\"muted\">{pct:.1}%</span>",
        pct = frac * 100.0
    )
}

/// Recent latencies as vertical bars on a log scale (0.1 ms .. 10 s), newest right.
fn latency_chart(recent: &[(SystemTime, f64)]) -> String {
    let (w, h) = (480.0_f64, 80.0_f64);
    let mut svg = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"recent ADD latency\"><rect width=\"{w}\" height=\"{h}\" fill=\"#fff\" stroke=\"#e4e7ec\"/>");
    let scale = |s: f64| ((s.max(1e-4).log10() + 4.0) / 5.0).clamp(0.02, 1.0) * (h - 4.0);
    // Grid lines per decade, labelled at the right.
    for (secs, label) in [(1e-3, "1 ms"), (1e-2, "10 ms"), (1e-1, "100 ms"), (1.0, "1 s")] {
        let y = h - scale(secs);
        let _ = write!(svg, "<line x1=\"0\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e4e7ec\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"10\" fill=\"#667\">{label}</text>", w - 44.0, w - 40.0, y + 3.0);
    }
    let step = (w - 48.0) / crate::metrics::RECENT_ADDS as f64;
    for (i, (_, secs)) in recent.iter().enumerate() {
        let bh = scale(*secs);
        let color = if *secs >= 1.0 { "#d92d20" } else if *secs >= 0.1 { "#f79009" } else { "#2e90fa" };
        let _ = write!(svg, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\"/>", i as f64 * step, h - bh, (step - 1.0).max(1.0));
    }
    svg.push_str("</svg>");
    svg
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(secs: f64) -> String {
    format!("{:.2} ms", secs * 1000.0)
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(title)
    )
}

/// Blocks per node and pool family, as a table with a bar per row (relative to the most).
fn blocks_table(out: &mut String, grants: &[BlockGrant]) {
    let mut per: BTreeMap<(String, String, Family), u64> = BTreeMap::new();
    for g in grants {
        *per.entry((g.node.clone(), g.pool.clone(), Family::of(&g.cidr))).or_default() += 1;
    }
    if per.is_empty() {
        out.push_str("<p class=\"muted\">No node holds a block.</p>");
        return;
    }
    let most = per.values().copied().max().unwrap_or(1) as f64;
    out.push_str("<table id=\"blocks\"><tr><th>node</th><th>pool</th><th>family</th><th>blocks</th><th></th></tr>");
    for ((node, pool, family), n) in &per {
        let w = ((*n as f64 / most) * 160.0).max(2.0);
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{family}</td><td class=\"n\">{n}</td><td><svg width=\"160\" height=\"10\"><rect width=\"{w:.0}\" height=\"10\" rx=\"2\" fill=\"#7a5af8\"/></svg></td></tr>",
            escape(node),
            escape(pool)
        );
    }
    out.push_str("</table>");
}

/// The agent's page: this node's pools, blocks per node (when the store answers), recent ADD
/// latency, pending attempts and the store's state.
pub fn agent(status: &Status, pending: &[(String, Family, u64)], grants: Option<&[BlockGrant]>, recent: &[(SystemTime, f64)]) -> String {
    let mut out = head(&format!("allot: node {}", status.node));
    let state = match &status.cni {
        Some(r) if !r.ready => format!("<span class=\"badge bad\">not ready</span> {}", escape(r.reason.as_deref().unwrap_or(""))),
        _ if !status.ready => "<span class=\"badge warn\">restoring</span>".into(),
        _ => "<span class=\"badge ok\">ready</span>".into(),
    };
    let _ = write!(out, "<h1>allot node <span id=\"node\">{}</span></h1><p id=\"state\">{state}</p>", escape(&status.node));
    let store = &status.store;
    let store_line = if store.reachable {
        "<span class=\"ok\">reachable</span>".to_string()
    } else {
        let since = store.unreachable_since.map(|t| format!(" for {}s", now_unix().saturating_sub(t))).unwrap_or_default();
        let why = store.last_error.as_deref().map(|e| format!(": {}", escape(e))).unwrap_or_default();
        format!("<span class=\"bad\">unreachable{since}</span>{why}")
    };
    let saved = if store.from_saved_view { " <span class=\"warn\">(pools and blocks from the saved view)</span>" } else { "" };
    let _ = write!(out, "<p id=\"store\">Cluster store: {store_line}{saved}</p>");

    out.push_str("<h2>Pools on this node</h2>");
    if status.pools.is_empty() {
        out.push_str("<p class=\"muted\">No pool known yet.</p>");
    } else {
        out.push_str("<table id=\"pools\"><tr><th>pool</th><th>family</th><th>in use / usable here</th><th>node usage</th><th>blocks here / cluster</th><th>pool capacity</th><th>pending</th></tr>");
        for p in &status.pools {
            let usable: f64 = p.node_capacity.parse().unwrap_or(0.0);
            let pend = pending.iter().find(|(n, f, _)| *n == p.pool && *f == p.family).map_or(0, |x| x.2);
            let _ = write!(
                out,
                "<tr class=\"pool\" data-pool=\"{pool}\" data-family=\"{family}\"><td>{pool}</td><td>{family}</td><td class=\"n\">{} / {}</td><td>{}</td><td class=\"n\">{} / {}</td><td class=\"n\">{}</td><td class=\"n\">{pend}</td></tr>",
                p.in_use,
                escape(&p.node_capacity),
                bar(p.in_use as f64, usable, 220),
                p.blocks_node,
                p.blocks_cluster,
                escape(&p.capacity),
                pool = escape(&p.pool),
                family = p.family,
            );
        }
        out.push_str("</table>");
    }

    out.push_str("<h2>Blocks per node</h2>");
    match grants {
        Some(g) => blocks_table(&mut out, g),
        None => out.push_str("<p class=\"muted\">Unknown while the cluster store does not answer.</p>"),
    }

    let total_pending: u64 = pending.iter().map(|x| x.2).sum();
    let _ = write!(out, "<h2>Recent ADD latency</h2><p id=\"pending\">Pending attempts (waiting for a block): <b>{total_pending}</b></p>");
    if recent.is_empty() {
        out.push_str("<p class=\"muted\" id=\"latency\">No ADD since the agent started.</p>");
    } else {
        let mut sorted: Vec<f64> = recent.iter().map(|r| r.1).collect();
        sorted.sort_by(f64::total_cmp);
        let _ = write!(
            out,
            "<p id=\"latency\">Last {} ADDs: p50 {}, p99 {}, max {}</p>{}",
            sorted.len(),
            ms(quantile(&sorted, 0.5)),
            ms(quantile(&sorted, 0.99)),
            ms(sorted[sorted.len() - 1]),
            latency_chart(recent)
        );
    }
    let _ = write!(out, "<p class=\"muted\">Refreshes every {REFRESH_SECS} s. Metrics at <a href=\"/metrics\">/metrics</a>.</p></body></html>");
    out
}

/// One pool family cluster-wide, for the operator's page.
pub struct ClusterPool {
    pub pool: String,
    pub family: Family,
    pub capacity: u128,
    pub granted_addresses: u128,
    pub blocks: u64,
}

/// The operator's page: pools' cluster-wide usage and blocks per node.
pub fn operator(leader: bool, pools: &[ClusterPool], grants: &[BlockGrant], error: Option<&str>) -> String {
    let mut out = head("allot operator");
    let role = if leader { "<span class=\"badge ok\">leader</span>" } else { "<span class=\"badge\">standby</span>" };
    let _ = write!(out, "<h1>allot operator</h1><p id=\"state\">{role}</p>");
    if let Some(e) = error {
        let _ = write!(out, "<p id=\"store\" class=\"bad\">Cluster store: {}</p>", escape(e));
    }
    out.push_str("<h2>Pools</h2><table id=\"pools\"><tr><th>pool</th><th>family</th><th>granted / capacity</th><th>granted</th><th>blocks</th></tr>");
    for p in pools {
        let _ = write!(
            out,
            "<tr class=\"pool\" data-pool=\"{pool}\" data-family=\"{}\"><td>{pool}</td><td>{}</td><td class=\"n\">{} / {}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            p.family,
            p.family,
            p.granted_addresses,
            p.capacity,
            bar(p.granted_addresses as f64, p.capacity as f64, 220),
            p.blocks,
            pool = escape(&p.pool),
        );
    }
    out.push_str("</table><h2>Blocks per node</h2>");
    blocks_table(&mut out, grants);
    let _ = write!(out, "<p class=\"muted\">Refreshes every {REFRESH_SECS} s. Metrics at <a href=\"/metrics\">/metrics</a>.</p></body></html>");
    out
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
