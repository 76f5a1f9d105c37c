//! The HTTP layer of the agent's socket, fuzzed: raw requests (garbage, bad request lines, huge
//! heads, wrong methods and paths, bad bodies for every route) sent over a real unix socket to
//! an agent served in process. Every answer must be a well-formed HTTP response with a 4xx/5xx
//! `ApiError` JSON body (or a 2xx for a valid request), or a clean close; nothing panics; the
//! allocations change only as the 2xx answers say; a normal ADD still works afterwards.
//! `ALLOT_FUZZ_CASES` scales the case count (a tenth of it here: each case is a connection).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_agent::{AgentConfig, Node};
use allot_core::{FamilySpec, Pool, PoolSpec};
use allot_store::{EmbeddedStore, Store};
use allot_wire::{Allocation, ApiError, GcResponse, Owner, SweepRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

const ROUTES: [&str; 13] = [
    "/v1/cni/add",
    "/v1/cni/del",
    "/v1/cni/check",
    "/v1/cni/gc",
    "/v1/status",
    "/v1/allocations",
    "/v1/gc",
    "/v1/pools",
    "/v1/pools/default",
    "/v1/nodes",
    "/v1/nodes/other",
    "/v1/namespaces",
    "/v1/namespaces/team-a/annotations",
];

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9]{1,8}", "[ -~]{0,16}", any::<String>()]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        piece().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(piece(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Owners from a small set, so valid ADDs, DELs and GCs meet each other.
fn owner() -> impl Strategy<Value = Value> {
    let network = prop_oneof![3 => Just("fz".to_string()), 1 => piece()];
    let id = prop_oneof![3 => "[a-c][0-9]", 1 => piece()];
    let ifname = prop_oneof![3 => "eth[0-2]", 1 => piece()];
    (network, id, ifname).prop_map(|(n, c, i)| json!({"network": n, "container_id": c, "ifname": i}))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let structured = prop_oneof![
        (owner(), piece(), json_value()).prop_map(|(o, ns, extra)| json!({"owner": o, "netns": ns, "pod": extra})),
        owner().prop_map(|o| json!({"owner": o})),
        (prop_oneof![Just("fz".to_string()), piece()], proptest::collection::vec(("[a-c][0-9]", "eth[0-2]"), 0..4))
            .prop_map(|(n, v)| json!({"network": n, "valid": v.into_iter().map(|(c, i)| json!({"container_id": c, "ifname": i})).collect::<Vec<_>>()})),
        any::<bool>().prop_map(|d| json!({"dry_run": d})),
        json_value().prop_map(|v| json!({"pools": [{"metadata": {"name": "fz"}, "spec": v}]})),
        json_value().prop_map(|v| json!({"set": v, "remove": []})),
        json_value(),
    ]
    .prop_map(|v| serde_json::to_vec(&v).unwrap());
    prop_oneof![
        4 => structured,
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => Just(Vec::new()),
        1 => (1usize..3).prop_map(|mib| vec![b'{'; mib << 20]),
    ]
}

#[derive(Debug, Clone)]
enum Framing {
    Sized,
    WrongLength(u32),
    NoLength,
    Chunked,
    BadChunked,
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        3 => Just("POST".to_string()),
        2 => Just("GET".to_string()),
        1 => Just("DELETE".to_string()),
        1 => Just("PUT".to_string()),
        1 => "[A-Z]{1,8}",
        1 => "[ -~]{0,10}",
    ];
    let path = prop_oneof![
        6 => proptest::sample::select(&ROUTES[..]).prop_map(String::from),
        1 => "/v1/[a-z/]{0,20}",
        1 => "/v1/pools/[a-z0-9%]{0,12}",
        1 => "[ -~]{0,40}",
        1 => (1000usize..70_000).prop_map(|n| format!("/v1/{}", "a".repeat(n))),
    ];
    let version = prop_oneof![8 => Just("HTTP/1.1".to_string()), 1 => Just("HTTP/1.0".to_string()), 1 => "[ -~]{0,10}"];
    let header = prop_oneof![
        ("[A-Za-z-]{1,12}", "[ -~]{0,40}"),
        Just(("Content-Type".to_string(), "application/json".to_string())),
        Just(("Content-Type".to_string(), "text/plain".to_string())),
        Just(("Connection".to_string(), "keep-alive".to_string())),
        ("[ -~]{0,12}", "[ -~]{0,12}"),
    ];
    let huge = prop_oneof![
        8 => Just(Vec::new()),
        1 => Just(vec![("X-Big".to_string(), "b".repeat(100_000))]),
        1 => Just((0..200).map(|i| (format!("X-H{i}"), "v".to_string())).collect::<Vec<_>>()),
    ];
    let framing = prop_oneof![
        6 => Just(Framing::Sized),
        1 => any::<u32>().prop_map(Framing::WrongLength),
        1 => Just(Framing::NoLength),
        1 => Just(Framing::Chunked),
        1 => Just(Framing::BadChunked),
    ];
    let structured = (method, path, version, proptest::collection::vec(header, 0..5), huge, framing, body()).prop_map(
        |(method, path, version, headers, huge, framing, body)| {
            let mut r = format!("{method} {path} {version}\r\nHost: allot\r\n").into_bytes();
            for (k, v) in headers.iter().chain(&huge) {
                r.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            match framing {
                Framing::Sized => r.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes()),
                Framing::WrongLength(n) => r.extend_from_slice(format!("Content-Length: {n}\r\n\r\n").as_bytes()),
                Framing::NoLength => r.extend_from_slice(b"\r\n"),
                Framing::Chunked | Framing::BadChunked => r.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
            }
            match framing {
                Framing::Chunked => {
                    for c in body.chunks(4096) {
                        r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                        r.extend_from_slice(c);
                        r.extend_from_slice(b"\r\n");
                    }
                    r.extend_from_slice(b"0\r\n\r\n");
                }
                Framing::BadChunked => {
                    r.extend_from_slice(b"zz\r\n");
                    r.extend_from_slice(&body);
                }
                _ => r.extend_from_slice(&body),
            }
            r
        },
    );
    prop_oneof![
        8 => structured,
        1 => proptest::collection::vec(any::<u8>(), 0..400),
        1 => "[ -~\r\n]{0,200}".prop_map(String::into_bytes),
    ]
}

/// Sends `raw`, half-closes, and reads everything the agent answers.
fn exchange(socket: &Path, raw: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("connecting to the agent");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let raw = raw.to_vec();
        // The agent may answer and close before it reads everything (413, 431).
        std::thread::spawn(move || {
            let _ = w.write_all(&raw);
            let _ = w.shutdown(std::net::Shutdown::Write);
        })
    };
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    writer.join().unwrap();
    out
}

fn owners(node: &Node<EmbeddedStore>) -> BTreeSet<Owner> {
    node.allocations().into_iter().map(|a| a.owner).collect()
}

/// An agent served in process on the embedded store, with the operator loop; stopped on drop.
struct InProcess {
    node: Arc<Node<EmbeddedStore>>,
    socket: std::path::PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn start(cidr: &str, mask: u8, add_wait: Duration) -> InProcess {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("allot.sock");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let node = rt.block_on(async {
            let store = Arc::new(EmbeddedStore::open(&dir.path().join("cluster.redb")).unwrap());
            let spec = PoolSpec { ipv4: Some(FamilySpec { cidrs: vec![cidr.parse().unwrap()], mask_size: mask }), ipv6: None };
            store.apply_pools(vec![Pool { name: "default".into(), spec }]).await.unwrap();
            let mut cfg = AgentConfig::new("n1");
            cfg.data_dir = dir.path().join("data");
            cfg.add_wait = add_wait;
            cfg.reserve_gateway = false;
            let node = Node::start(cfg, store.clone()).await.unwrap();
            tokio::spawn(allot_operator::run(store.clone(), stop.clone()));
            let listener = allot_agent::bind_socket(&socket).unwrap();
            let mut shutdown = stop.clone();
            tokio::spawn(allot_agent::serve(node.clone(), listener, async move { let _ = shutdown.changed().await; }, stop.clone()));
            node
        });
        InProcess { node, socket, stop: stop_tx, _rt: rt, _dir: dir }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn add_request(id: &str) -> Vec<u8> {
    let body = json!({"owner": {"network": "cap", "container_id": id, "ifname": "eth0"}, "netns": "/x"}).to_string();
    format!("POST /v1/cni/add HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// True when the agent closed `s` (EOF) within `wait`.
fn closed_within(mut s: &UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0)) || matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

fn read_answer(mut s: &UnixStream) -> (u16, ApiError) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let (status, body) = allot_client::parse_response(&raw).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw)));
    (status, serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body))))
}

/// 256 connections at most: a new one closes the oldest idle connection; when all 256 run a
/// handler (ADDs waiting on a full pool), a new one is answered 503 "try again" at once, and
/// the waiting ADDs are still answered by their handlers.
#[test]
fn the_connection_cap_closes_idle_connections_first_and_never_a_running_request() {
    const CAP: usize = 256;
    let agent = InProcess::start("10.9.0.0/30", 30, Duration::from_secs(2));
    let idle: Vec<UnixStream> = (0..CAP).map(|_| UnixStream::connect(&agent.socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let newest = UnixStream::connect(&agent.socket).unwrap();
    assert!(closed_within(&idle[0], Duration::from_secs(2)), "the oldest idle connection was kept past the cap");
    assert!(!closed_within(&idle[1], Duration::from_millis(200)), "more than one connection closed for one new one");
    drop((idle, newest));

    // Fill the pool (a /30 block: two addresses), then make every slot wait in a handler.
    let client = allot_client::Client::new(&agent.socket, Duration::from_secs(10));
    for id in ["f1", "f2"] {
        let _: Allocation = client.post("/v1/cni/add", &json!({"owner": {"network": "cap", "container_id": id, "ifname": "eth0"}, "netns": "/x"})).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let waiting: Vec<UnixStream> = (0..CAP)
        .map(|i| {
            let mut s = UnixStream::connect(&agent.socket).unwrap();
            s.write_all(&add_request(&format!("w{i}"))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = UnixStream::connect(&agent.socket).unwrap();
    // The agent refuses at accept, maybe before the request is written: then the write gets
    // EPIPE (CI saw it once), and the 503 it sent first is still there to read.
    let _ = refused.write_all(&add_request("late"));
    let started = std::time::Instant::now();
    let (status, err) = read_answer(&refused);
    assert_eq!(status, 503, "{err:?}");
    assert_eq!(err.kind, allot_wire::ErrorKind::TryAgain);
    assert!(started.elapsed() < Duration::from_secs(1), "the refusal took {:?}", started.elapsed());
    for s in &waiting {
        let (status, err) = read_answer(s);
        assert_eq!((status, err.kind), (503, allot_wire::ErrorKind::TryAgain), "a waiting ADD: {}", err.message);
        assert!(!err.message.contains("limit"), "a waiting ADD was refused by the cap: {}", err.message);
    }
}

#[test]
fn fuzz_the_http_layer() {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let agent = InProcess::start("10.0.0.0/16", 24, Duration::from_millis(500));
    let (node, socket) = (agent.node.clone(), agent.socket.clone());

    let cases = std::env::var("ALLOT_FUZZ_CASES").ok().and_then(|s| s.parse::<u32>().ok()).map_or(1500, |n| (n / 10).max(1));
    let model = Mutex::new(owners(&node));
    let seen = Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&request(), |raw| {
        let answer = exchange(&socket, &raw);
        let mut model = model.lock().unwrap();
        if answer.is_empty() {
            *seen.lock().unwrap().entry(0).or_default() += 1;
        } else {
            let (status, body) = allot_client::parse_response(&answer)
                .map_err(|e| TestCaseError::fail(format!("malformed answer ({e}): {:?}", String::from_utf8_lossy(&answer))))?;
            *seen.lock().unwrap().entry(status).or_default() += 1;
            let line = String::from_utf8_lossy(&raw[..raw.len().min(120)]).to_string();
            if status >= 400 {
                if body.is_empty() {
                    // hyper's own answer to a head it cannot parse: a status, no body.
                    prop_assert!([400, 414, 431].contains(&status), "bare {status} for {line:?}");
                } else {
                    let e: ApiError = serde_json::from_slice(&body)
                        .map_err(|e| TestCaseError::fail(format!("{status} body is not an ApiError ({e}): {}", String::from_utf8_lossy(&body))))?;
                    prop_assert!(!e.message.is_empty());
                }
            } else {
                prop_assert_eq!(status, 200, "{}", line);
                let path = String::from_utf8_lossy(&raw).split(' ').nth(1).unwrap_or_default().to_string();
                match path.as_str() {
                    "/v1/cni/add" => {
                        let a: Allocation = serde_json::from_slice(&body).unwrap();
                        model.insert(a.owner);
                    }
                    "/v1/cni/del" => {
                        if let Some(a) = serde_json::from_slice::<Option<Allocation>>(&body).unwrap() {
                            model.remove(&a.owner);
                        }
                    }
                    "/v1/cni/gc" | "/v1/gc" => {
                        let body_start = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
                        let dry = serde_json::from_slice::<SweepRequest>(&raw[body_start..]).is_ok_and(|r| r.dry_run);
                        if path == "/v1/cni/gc" || !dry {
                            for o in serde_json::from_slice::<GcResponse>(&body).unwrap().released {
                                model.remove(&o);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        prop_assert_eq!(&*model, &owners(&node), "allocations changed beyond what the answers say");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked while serving");
    // Answers by status (0: closed without an answer), shown with --nocapture.
    eprintln!("{cases} cases; answers by status: {:?}; allocations held: {}", seen.into_inner().unwrap(), model.lock().unwrap().len());

    // The agent still serves a normal ADD. The fuzz may have deleted the (unused) default
    // pool through its route: create it again first.
    let client = allot_client::Client::new(&socket, Duration::from_secs(10));
    if client.get::<serde_json::Value>("/v1/pools/default").is_err() {
        let pool = json!({"pools": [{"apiVersion": allot_wire::API_VERSION, "kind": allot_wire::POOL_KIND, "metadata": {"name": "default"},
            "spec": {"ipv4": {"cidrs": ["10.0.0.0/16"], "maskSize": 24}}}]});
        let _: serde_json::Value = client.post("/v1/pools", &pool).expect("re-creating the default pool");
    }
    let req = json!({"owner": {"network": "after", "container_id": "x1", "ifname": "eth0"}, "netns": "/x"});
    let a: Allocation = client.post("/v1/cni/add", &req).expect("a normal ADD after the fuzz");
    assert!(a.ips[0].address.to_string().starts_with("10.0."), "{a:?}");
    let mut want = model.into_inner().unwrap();
    want.insert(a.owner);
    assert_eq!(owners(&node), want);
}
