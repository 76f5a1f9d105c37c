//! A small hand-drawn SVG: p50 latency against live allocations (log scale), allot beside
//! host-local, with the spawn floor for reference.

use crate::ExecPoint;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

pub fn latency_chart(points: &[ExecPoint]) -> String {
    type Pick = fn(&ExecPoint) -> f64;
    let series: [(&str, &str, bool, Pick); 6] = [
        ("allot ADD", "#1f77b4", false, |p| p.allot_add.p50_ms),
        ("allot DEL", "#1f77b4", true, |p| p.allot_del.p50_ms),
        ("host-local ADD", "#d62728", false, |p| p.host_local_add.p50_ms),
        ("host-local DEL", "#d62728", true, |p| p.host_local_del.p50_ms),
        ("spawn floor (/bin/true)", "#7f7f7f", true, |p| p.spawn_floor.p50_ms),
        ("round-trip floor", "#2ca02c", true, |p| p.round_trip_floor.p50_ms),
    ];
    let values = || points.iter().flat_map(|p| series.iter().map(move |s| (s.3)(p)));
    let (lo, hi) = (values().fold(f64::MAX, f64::min).max(0.01) / 1.5, values().fold(0.1f64, f64::max) * 1.5);
    let (llo, lhi) = (lo.log10(), hi.log10());
    let lx = |live: usize| (live.max(1) as f64).log10();
    let (x0, x1) = (
        points.iter().map(|p| lx(p.live)).fold(f64::MAX, f64::min),
        points.iter().map(|p| lx(p.live)).fold(f64::MIN, f64::max),
    );
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let px = |live: usize| LEFT + (lx(live) - x0) / span * (W - LEFT - RIGHT);
    let py = |ms: f64| H - BOTTOM - (ms.max(lo).log10() - llo) / (lhi - llo) * (H - TOP - BOTTOM);

    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15">CNI call latency (p50) against live allocations</text>
<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">live allocations (log scale)</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">ms (log scale)</text>
"#,
        H - BOTTOM, W - RIGHT, H - BOTTOM, H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0, H - 18.0,
        (TOP + H - BOTTOM) / 2.0, (TOP + H - BOTTOM) / 2.0,
    );
    let ticks = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
    for ms in ticks.into_iter().filter(|t| *t >= lo && *t <= hi) {
        s += &format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{ms}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py(ms) + 4.0,
            y = py(ms)
        );
    }
    for p in points {
        s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(p.live), H - BOTTOM + 18.0, p.live);
    }
    for (i, (name, color, dashed, pick)) in series.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", px(p.live), py(pick(p)))).collect();
        let dash = if *dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n", path.join(" "));
        for p in points {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n", px(p.live), py(pick(p)));
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        s += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            W - RIGHT + 15.0,
            W - RIGHT + 45.0,
            W - RIGHT + 52.0,
            ly + 4.0
        );
    }
    s + "</svg>\n"
}
