//! Observability with real processes: the agent's and the operator's `--metrics-addr` under a
//! scripted workload through the real plugin, checked by value and by `promtool`; the alert
//! rules checked and unit-tested by `promtool`; the dashboard's queries against what is
//! exported; the status page rendered by headless Chromium; `allot status --watch` on a pty.
//!
//! Set `ALLOT_UPDATE_SCREENSHOT=1` to copy the page's screenshot to `docs/status-page.png`.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use allot_testkit::{Etcd, free_port};
use harness::*;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} missing: install Debian's {package} (scripts/test.sh installs it)"
    );
}

/// One HTTP/1.1 request; returns (status, headers lowercased, body).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

fn metrics_text(addr: SocketAddr) -> String {
    let (status, head, body) = http(addr, "GET", "/metrics", &[]);
    assert_eq!(status, 200, "{head}{body}");
    body
}

/// Every sample of a classic text exposition: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("value of {l}")))
        })
        .collect()
}

fn value(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}; have:\n{}", s.keys().cloned().collect::<Vec<_>>().join("\n")))
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\non:\n{text}");
}

fn plugin_call(agent: &Agent, command: &str, id: &str, netns: &str, pool: Option<&str>) -> (i32, Value) {
    let mut ipam = json!({"type": "allot-ipam", "socket": agent.socket});
    if let Some(p) = pool {
        ipam["pool"] = json!(p);
    }
    let conf = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "ptp", "ipam": ipam});
    let plugin = bin_dir().join("allot-ipam");
    let call = CniCall { plugin: &plugin, command, container_id: id, netns, ifname: "eth0", args: "" };
    let (exit, r) = cni(&call, &conf);
    // On failure the exit status is 1 and the CNI code is in the JSON answer.
    (if exit == 0 { 0 } else { r["code"].as_i64().unwrap_or(-1) as i32 }, r)
}

fn metrics_agent(extra: &[&str]) -> (Agent, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let a = addr.to_string();
    let mut args = vec!["--metrics-addr", a.as_str(), "--add-wait", "300ms"];
    args.extend_from_slice(extra);
    (Agent::start("obs-node", &args), addr)
}

/// N ADDs through the real plugin, a failed ADD, DELs, a CHECK: the counters, the histogram
/// and the pool gauges read back as they should; promtool accepts the plain GET; OpenMetrics
/// on request; the endpoints answer GET only.
#[test]
fn metrics_follow_a_scripted_workload() {
    require_root();
    require_tool("/usr/bin/promtool", "prometheus");
    let (agent, addr) = metrics_agent(&["--pool", "default=10.60.0.0/24@28,fd00:60::/120@124", "--pre-allocation", "default=0"]);
    let netns_dir = tempfile::tempdir().unwrap();
    let before = samples(&metrics_text(addr));
    assert_eq!(value(&before, r#"allot_cni_requests_total{command="ADD",result="success",code="0"}"#), 0.0);

    // 20 ADDs: with /28 blocks (14 usable) the node needs two blocks per family.
    const N: usize = 20;
    for i in 0..N {
        let ns = netns_dir.path().join(format!("ns{i}"));
        std::fs::write(&ns, "").unwrap();
        let (code, r) = plugin_call(&agent, "ADD", &format!("c{i}"), ns.to_str().unwrap(), None);
        assert_eq!(code, 0, "ADD c{i}: {r}");
    }
    // A pool that does not exist: "try again" (CNI code 11) after --add-wait.
    let (code, r) = plugin_call(&agent, "ADD", "bad", "/x", Some("nope"));
    assert_eq!(code, 11, "{r}");
    assert_eq!(r["code"], 11);
    // 5 DELs, and the namespaces of 3 more pods vanish without a DEL (leaked).
    for i in 0..5 {
        assert_eq!(plugin_call(&agent, "DEL", &format!("c{i}"), "/x", None).0, 0);
    }
    for i in 5..8 {
        std::fs::remove_file(netns_dir.path().join(format!("ns{i}"))).unwrap();
    }
    let (code, r) = plugin_call(&agent, "CHECK", "never-added", "/x", None);
    assert_ne!(code, 0, "{r}");
    // A GC of another network (the runtime's CNI GC, through the agent API) releases nothing here.
    let gc: allot_wire::GcResponse =
        agent.client().post("/v1/cni/gc", &allot_wire::GcRequest { network: "othernet".into(), valid: vec![] }).unwrap();
    assert!(gc.released.is_empty());

    let text = metrics_text(addr);
    promtool_check_metrics(&text);
    let s = samples(&text);
    assert_eq!(value(&s, r#"allot_cni_requests_total{command="ADD",result="success",code="0"}"#), N as f64);
    assert_eq!(value(&s, r#"allot_cni_requests_total{command="ADD",result="error",code="11"}"#), 1.0);
    assert_eq!(value(&s, r#"allot_cni_requests_total{command="DEL",result="success",code="0"}"#), 5.0);
    assert_eq!(value(&s, r#"allot_cni_requests_total{command="CHECK",result="error",code="3"}"#), 1.0);
    assert_eq!(value(&s, r#"allot_cni_requests_total{command="GC",result="success",code="0"}"#), 1.0);
    assert_eq!(value(&s, "allot_cni_add_duration_seconds_count"), (N + 1) as f64);
    assert!(value(&s, "allot_cni_add_duration_seconds_sum") >= 0.3, "the failed ADD waited --add-wait (300ms)");
    assert_eq!(value(&s, r#"allot_cni_add_duration_seconds_bucket{le="+Inf"}"#), (N + 1) as f64);
    // Every new allocation and every release is one journal write at least.
    assert!(value(&s, "allot_journal_fdatasync_duration_seconds_count") >= (N + 1) as f64 / 2.0);
    let status: allot_wire::Status = agent.client().get("/v1/status").unwrap();
    for family in ["ipv4", "ipv6"] {
        let l = |name: &str| format!(r#"{name}{{pool="default",family="{family}"}}"#);
        let p = status.pools.iter().find(|p| p.family.to_string() == family).unwrap();
        assert_eq!(value(&s, &l("allot_node_allocated_addresses")), (N - 5) as f64, "{family}");
        assert_eq!(value(&s, &l("allot_node_blocks")), p.blocks_node as f64, "{family}");
        assert!(p.blocks_node >= 2, "{family}: {p:?}");
        assert_eq!(value(&s, &l("allot_node_addresses")), p.node_capacity.parse::<f64>().unwrap());
        assert_eq!(value(&s, &l("allot_node_free_addresses")), p.free.parse::<f64>().unwrap());
        assert_eq!(value(&s, &l("allot_pool_capacity_addresses")), 256.0, "a /24 and a /120");
        assert_eq!(value(&s, &l("allot_pending_attempts")), 0.0);
        // Standalone: the in-process operator's cluster view too.
        assert_eq!(value(&s, &l("allot_cluster_pool_blocks_granted")), p.blocks_cluster as f64);
    }
    assert!(value(&s, r#"allot_blocks_received_total{pool="default"}"#) >= 4.0);
    // With no pre-allocation the 15th ADD found the first blocks full and waited for more.
    assert!(value(&s, "allot_block_grant_wait_seconds_count") >= 1.0);
    assert!(value(&s, r#"allot_operator_blocks_granted_total{pool="default"}"#) >= 4.0);
    assert_eq!(value(&s, "allot_allocations"), (N - 5) as f64);
    assert_eq!(value(&s, "allot_stale_allocations"), 3.0);
    assert_eq!(value(&s, "allot_store_reachable"), 1.0);
    assert_eq!(value(&s, "allot_ready"), 1.0);
    assert_eq!(value(&s, "allot_operator_leader"), 1.0);

    // OpenMetrics when asked; the classic format otherwise.
    let (st, head, body) = http(addr, "GET", "/metrics", &[("Accept", "application/openmetrics-text;version=1.0.0")]);
    assert_eq!(st, 200);
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n") && body.contains("# TYPE allot_cni_requests counter"), "{body}");
    let (_, head, body) = http(addr, "GET", "/metrics", &[]);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(!body.contains("# EOF") && body.contains("# TYPE allot_cni_requests_total counter"));

    // Health, and GET only.
    assert_eq!(http(addr, "GET", "/healthz", &[]).0, 200);
    let (st, _, body) = http(addr, "GET", "/readyz", &[]);
    assert_eq!((st, body.as_str()), (200, "ready\n"));
    for path in ["/metrics", "/healthz", "/readyz", "/"] {
        for method in ["POST", "PUT", "DELETE"] {
            let (st, head, body) = http(addr, method, path, &[]);
            assert_eq!(st, 405, "{method} {path}: {body}");
            assert!(head.contains("allow: get, head") && body.contains("use GET"), "{head}{body}");
        }
    }
    assert_eq!(http(addr, "GET", "/nope", &[]).0, 404);
    drop(agent);
}

/// `/readyz` is 503 with the reason until the node can serve an ADD, here: no pool exists.
#[test]
fn readyz_says_why_the_node_is_not_ready() {
    require_root();
    let (agent, addr) = metrics_agent(&[]);
    let (st, _, body) = http(addr, "GET", "/readyz", &[]);
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no IP pool exists"), "{body}");
    assert_eq!(http(addr, "GET", "/healthz", &[]).0, 200);
    assert_eq!(value(&samples(&metrics_text(addr)), "allot_ready"), 0.0);
    drop(agent);
}

/// Cluster mode: the operator's leadership, grants and the cluster's pools; the agent's store
/// reachability and store errors when etcd stops.
#[test]
fn operator_and_store_metrics_in_cluster_mode() {
    require_root();
    require_tool("/usr/bin/promtool", "prometheus");
    let mut etcd = Etcd::start();
    let op_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let operator = Operator::start_with(None, &etcd.endpoint, "op-obs", &["--metrics-addr", &op_addr.to_string()]);
    let (agent, addr) =
        metrics_agent(&["--etcd-endpoints", &etcd.endpoint, "--pool", "default=10.61.0.0/24@28", "--pre-allocation", "default=0"]);
    let (code, r) = plugin_call(&agent, "ADD", "c0", "/x", None);
    assert_eq!(code, 0, "{r}");
    let s = poll("the operator leading and granting", Duration::from_secs(20), || {
        let (st, _, body) = http(op_addr, "GET", "/metrics", &[]);
        let s = samples(&body);
        (st == 200 && s.get("allot_operator_leader") == Some(&1.0)
            && s.get(r#"allot_operator_blocks_granted_total{pool="default"}"#).is_some_and(|v| *v >= 1.0))
            .then_some((body, s))
    });
    promtool_check_metrics(&s.0);
    let s = s.1;
    assert_eq!(value(&s, r#"allot_cluster_pool_capacity_addresses{pool="default",family="ipv4"}"#), 256.0);
    let blocks = value(&s, r#"allot_cluster_pool_blocks_granted{pool="default",family="ipv4"}"#);
    assert!(blocks >= 1.0);
    assert_eq!(value(&s, r#"allot_cluster_pool_granted_addresses{pool="default",family="ipv4"}"#), blocks * 16.0);
    assert_eq!(value(&s, r#"allot_cluster_node_blocks{node="obs-node",pool="default",family="ipv4"}"#), blocks);
    assert_eq!(value(&s, "allot_cluster_store_reachable"), 1.0);
    assert_eq!(http(op_addr, "GET", "/readyz", &[]).0, 200);
    // The operator's page: its role, the pool's cluster-wide usage, blocks per node.
    let (st, _, page) = http(op_addr, "GET", "/", &[]);
    assert_eq!(st, 200);
    assert!(page.contains(r#"<span class="badge ok">leader</span>"#), "{page}");
    assert!(page.contains(r#"data-pool="default" data-family="ipv4""#) && page.contains("% used"), "{page}");
    assert!(page.contains("<td>obs-node</td><td>default</td>"), "{page}");
    let s = samples(&metrics_text(addr));
    assert_eq!(value(&s, "allot_store_reachable"), 1.0);
    let errors_before = value(&s, "allot_store_errors_total");
    // A cluster agent exports no operator series: the operator runs elsewhere.
    assert!(!s.keys().any(|k| k.starts_with("allot_operator_")), "{s:?}");

    etcd.stop();
    // Fill the node's block (14 usable, one the node's gateway): the next ADD finds it full,
    // the node's demand grows, and writing it to etcd fails.
    for i in 1..13 {
        assert_eq!(plugin_call(&agent, "ADD", &format!("c{i}"), "/x", None).0, 0);
    }
    assert_eq!(plugin_call(&agent, "ADD", "full", "/x", None).0, 11, "full and no store");
    let s = poll("the agent to see the store unreachable", Duration::from_secs(30), || {
        let s = samples(&metrics_text(addr));
        (s.get("allot_store_reachable") == Some(&0.0)).then_some(s)
    });
    assert!(value(&s, "allot_store_errors_total") > errors_before);
    assert_eq!(value(&s, r#"allot_pending_attempts{pool="default",family="ipv4"}"#), 1.0, "the full ADD waits for a block");
    let (_, _, body) = http(op_addr, "GET", "/metrics", &[]);
    assert_eq!(value(&samples(&body), "allot_cluster_store_reachable"), 0.0);
    let (st, _, body) = http(op_addr, "GET", "/readyz", &[]);
    assert_eq!(st, 503, "{body}");
    drop(operator);
    drop(agent);
}

/// The alert rules load and fire on the series they are written for; the example Prometheus
/// config (which loads them) is valid.
#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    require_tool("/usr/bin/promtool", "prometheus");
    let dir = repo().join("deploy/monitoring");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts_test.yaml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Metric names in a PromQL expression (identifiers that look like ours).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cur = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
        } else {
            if cur.starts_with("allot_") {
                out.insert(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    out
}

/// Every metric the dashboard and the alerts query is one the agent or operator exports.
#[test]
fn dashboard_and_alerts_query_exported_metrics() {
    require_root();
    let (agent, addr) = metrics_agent(&["--pool", "default=10.62.0.0/24@28", "--pre-allocation", "default=0"]);
    // A block received and given back (the counters of both exist), and one pod whose
    // namespace is visible (the stale count is exported).
    assert_eq!(plugin_call(&agent, "ADD", "c0", "/x", None).0, 0);
    assert_eq!(plugin_call(&agent, "DEL", "c0", "/x", None).0, 0);
    let text = poll("a block given back", Duration::from_secs(10), || {
        let t = metrics_text(addr);
        t.contains("allot_blocks_released_total{").then_some(t)
    });
    let ns = tempfile::NamedTempFile::new().unwrap();
    assert_eq!(plugin_call(&agent, "ADD", "c1", ns.path().to_str().unwrap(), None).0, 0);
    let text = text + &metrics_text(addr);
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = line.split(' ').skip(2);
        let (name, kind) = (it.next().unwrap(), it.next().unwrap());
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let dir = repo().join("deploy/monitoring");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    let alerts = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    for line in alerts.lines().filter(|l| !l.trim_start().starts_with('#')) {
        queried.extend(metric_names(line));
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nexported: {exported:?}");
    drop(agent);
}

/// The status page in headless Chromium: a screenshot is written, and the rendered DOM shows
/// both families' usage bars, blocks per node, ADD latency and the store's state.
#[test]
fn status_page_renders_in_chromium() {
    require_root();
    require_tool("/usr/bin/chromium", "chromium");
    let (agent, addr) = metrics_agent(&["--pool", "default=10.63.0.0/24@28,fd00:63::/120@124", "--pool", "batch=10.64.0.0/24@26"]);
    for i in 0..30 {
        let pool = if i % 3 == 0 { Some("batch") } else { None };
        let (code, r) = plugin_call(&agent, "ADD", &format!("c{i}"), "/x", pool);
        assert_eq!(code, 0, "{r}");
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let chromium = |args: &[&str]| {
        let out = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", dir.path().join("profile").display()))
            .args(args)
            .arg(&url)
            .output()
            .expect("running chromium");
        assert!(out.status.success(), "chromium {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = chromium(&["--dump-dom"]);
    assert!(dom.contains(r#"<span id="node">obs-node</span>"#), "{dom}");
    assert!(dom.contains("badge ok\">ready"), "{dom}");
    assert!(dom.contains(r#"http-equiv="refresh""#));
    assert!(!dom.contains("<script"), "the page needs no script");
    for (pool, family, used) in [("default", "ipv4", 20), ("default", "ipv6", 20), ("batch", "ipv4", 10)] {
        let row = format!(r#"data-pool="{pool}" data-family="{family}""#);
        let at = dom.find(&row).unwrap_or_else(|| panic!("no row for {pool} {family}:\n{dom}"));
        let tr = &dom[at..at + dom[at..].find("</tr>").unwrap()];
        assert!(tr.contains(&format!(">{used} / ")), "{pool} {family}: {tr}");
        assert!(tr.contains("<svg class=\"bar\"") && tr.contains("% used"), "{tr}");
    }
    let blocks = &dom[dom.find(r#"<table id="blocks">"#).expect("blocks per node table")..];
    assert!(blocks.contains("<td>obs-node</td><td>batch</td>"), "{blocks}");
    assert!(dom.contains("Last 30 ADDs: p50"), "{dom}");
    assert!(dom.contains("Pending attempts (waiting for a block): <b>0</b>"));
    assert!(dom.contains(r#"<p id="store">Cluster store: <span class="ok">reachable</span>"#), "{dom}");

    let shot = dir.path().join("status-page.png");
    chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1100,900"]);
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot of {} bytes", png.len());
    if std::env::var_os("ALLOT_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo().join("docs/status-page.png")).unwrap();
    }
    drop(agent);
}

/// `allot status --watch` on a pseudo-terminal (util-linux `script`): the screen is cleared
/// once, then each frame returns the cursor home and erases what the last one left; an ADD in
/// between shows in a later frame.
#[test]
fn status_watch_redraws_in_place_on_a_terminal() {
    require_root();
    let agent = Agent::start("obs-watch", &["--pool", "default=10.65.0.0/24@28", "--pre-allocation", "default=0"]);
    let cmd = format!(
        "{} --socket {} status --watch --interval 200ms",
        bin_dir().join("allot").display(),
        agent.socket.display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script (util-linux)");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(plugin_call(&agent, "ADD", "w0", "/x", None).0, 0);
    std::thread::sleep(Duration::from_millis(700));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(screen.matches("\x1b[2J").count(), 1, "cleared once: {screen:?}");
    let frames: Vec<&str> = screen.split("\x1b[H").skip(1).collect();
    assert!(frames.len() >= 4, "{} frames: {screen:?}", frames.len());
    for f in &frames[..frames.len() - 1] {
        assert!(f.contains("every 200ms: allot status") && f.contains("\x1b[J"), "{f:?}");
    }
    // The pool row's "in use" goes from 0 to 1 between frames.
    let in_use = |f: &str| f.lines().find(|l| l.starts_with("default")).map(|l| l.split_whitespace().nth(4).unwrap_or("").to_string());
    assert_eq!(in_use(frames[0]).as_deref(), Some("0"), "{:?}", frames[0]);
    assert_eq!(frames.iter().filter_map(|f| in_use(f)).next_back().as_deref(), Some("1"), "{screen:?}");
    // Piped (no terminal), frames follow one another without escapes.
    let out = Command::new(bin_dir().join("allot"))
        .args(["--socket", agent.socket.to_str().unwrap(), "status", "--watch", "-o", "json"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--watch redraws the table"));
    drop(agent);
}
