//! The agent's socket under abuse, and the plugin's and CLI's edges, with real processes:
//! idle connections and a slowloris while ADDs go through the real plugin, the socket's mode
//! from its first moment, body limits, long-poll ADDs, DEL with no agent, stdin limits, closed
//! stdout pipes, absurd durations.

mod harness;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{Value, json};

/// The agent's header-read timeout (`allot_agent::server::Limits::default()`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the agent keeps open at most.
const MAX_CONNECTIONS: usize = 256;
/// Phrases containerd reads as "already deleted" in a DEL error.
const GONE: [&str; 2] = ["not found", "no such file or directory"];

fn plugin() -> PathBuf {
    bin_dir().join("allot-ipam")
}

fn conf(socket: &Path, extra: Value) -> Value {
    let mut ipam = json!({"type": "allot-ipam", "socket": socket});
    ipam.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    json!({"cniVersion": "1.0.0", "name": "sock", "type": "ptp", "ipam": ipam})
}

fn call(socket: &Path, command: &str, id: &str, extra: Value) -> (i32, Value) {
    let plugin = plugin();
    cni(&CniCall { plugin: &plugin, command, container_id: id, netns: "/x", ifname: "eth0", args: "" }, &conf(socket, extra))
}

fn agent_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Enough file descriptors for a thousand connections and the test's own.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < 4096 {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(4096), hard).unwrap();
    }
}

/// Reads until EOF or `deadline`; true when the agent closed the connection.
fn closed_by(mut s: &UnixStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(e) => panic!("reading an idle connection: {e}"),
        }
    }
}

#[test]
fn idle_connections_and_a_slowloris_do_not_stop_adds() {
    require_root();
    raise_fd_limit();
    let agent = Agent::start("sock-a", &["--pool", "default=10.73.0.0/16@24"]);
    let opened = Instant::now();
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&agent.socket).expect("connecting an idle client")).collect();

    // A slowloris: a request head, one byte per second.
    let slow_done = Arc::new(AtomicBool::new(false));
    let slowloris = {
        let (socket, done) = (agent.socket.clone(), slow_done.clone());
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).unwrap();
            let started = Instant::now();
            for b in b"POST /v1/cni/add HTTP/1.1\r\nHost: allot\r\nX-Slow: 1234567890123456789\r\n".iter() {
                if s.write_all(&[*b]).is_err() {
                    done.store(true, Ordering::SeqCst);
                    return Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            None
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let held = agent_fds(agent.pid());
    assert!(held <= MAX_CONNECTIONS + 8, "the agent holds {held} sockets with 1,000 idle clients (cap {MAX_CONNECTIONS})");

    // 50 ADDs through the real plugin, five at a time, while all that is held open.
    let slowest = std::thread::scope(|s| {
        let workers: Vec<_> = (0..5)
            .map(|w| {
                let socket = &agent.socket;
                s.spawn(move || {
                    let mut slowest = Duration::ZERO;
                    for i in 0..10 {
                        let t = Instant::now();
                        let (code, out) = call(socket, "ADD", &format!("idle{w}x{i}"), json!({}));
                        assert_eq!(code, 0, "ADD {w}/{i} with idle connections held: {out}");
                        assert_eq!(ips_of(&out).len(), 1, "{out}");
                        slowest = slowest.max(t.elapsed());
                    }
                    slowest
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).max().unwrap()
    });
    eprintln!("slowest of 50 ADDs with 1,000 idle connections and a slowloris: {slowest:?}");
    assert!(slowest < Duration::from_secs(3), "an ADD took {slowest:?}: it waited for idle connections to time out");

    // Every idle connection is closed by the agent: at the cap, or after the header timeout.
    let deadline = opened + HEADER_TIMEOUT + Duration::from_secs(3);
    let still_open = idle.iter().filter(|s| !closed_by(s, deadline)).count();
    assert_eq!(still_open, 0, "{still_open} idle connections still open {:?} after they were opened", opened.elapsed());
    let cut = slowloris.join().unwrap().expect("the slowloris sent its whole head at 1 byte/s: never cut");
    assert!(cut < HEADER_TIMEOUT + Duration::from_secs(3), "slowloris cut only after {cut:?}");
    assert!(agent_fds(agent.pid()) < 16, "the agent still holds {} sockets", agent_fds(agent.pid()));
}

/// The socket never exists at its path with any mode but 0600: it is bound elsewhere and
/// renamed into place (inotify sees a move, never a create), and a thread stat()ing the path
/// in a tight loop through two starts (the second over a stale socket) sees nothing else.
#[test]
fn socket_is_0600_from_its_first_moment() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("allot.sock");
    let log = dir.path().join("agent.log");
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    inotify.add_watch(dir.path(), AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (socket, stop) = (socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut modes, mut seen) = (std::collections::BTreeSet::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::symlink_metadata(&socket)
                    && m.file_type().is_socket()
                {
                    modes.insert(m.permissions().mode() & 0o7777);
                    seen += 1;
                }
            }
            (modes, seen)
        })
    };
    for round in 0..2 {
        // umask 000: a socket created in place would be 0777 until chmod.
        let child = Command::new("sh")
            .args(["-c", "umask 000 && exec \"$0\" \"$@\""])
            .arg(bin_dir().join("allot"))
            .args(["agent", "--node", "sock-m", "--pool", "default=10.74.0.0/16@24"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = RawAgent(child);
        agent.wait_ready(&socket, &log);
        // SIGKILL leaves the socket file behind: the next start replaces a stale socket.
        drop(agent);
        assert!(socket.exists(), "round {round}: a killed agent leaves its socket");
    }
    stop.store(true, Ordering::Relaxed);
    let (modes, seen) = watcher.join().unwrap();
    assert!(seen > 0, "the watcher never saw the socket");
    assert_eq!(modes.into_iter().collect::<Vec<_>>(), vec![0o600], "modes seen at {}", socket.display());
    let events = inotify.read_events().unwrap_or_default();
    let of_socket: Vec<_> = events.iter().filter(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("allot.sock"))).collect();
    assert!(
        of_socket.iter().all(|e| !e.mask.contains(AddWatchFlags::IN_CREATE)),
        "the socket was created in place (bound at its final path): {of_socket:?}"
    );
    assert_eq!(of_socket.iter().filter(|e| e.mask.contains(AddWatchFlags::IN_MOVED_TO)).count(), 2, "{of_socket:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| ["allot.sock", "data", "agent.log"].contains(&n.to_str().unwrap())), "leftovers: {left:?}");
}

/// Sends a request head and `body` (from a thread: the agent may answer before reading it)
/// and returns the status and the body of the answer.
fn raw_request(socket: &Path, head: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = head.to_string();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    writer.join().unwrap();
    allot_client::parse_response(&raw).unwrap_or_else(|e| panic!("malformed answer ({e}): {}", String::from_utf8_lossy(&raw)))
}

#[test]
fn request_body_over_the_limit_is_answered_413() {
    require_root();
    let agent = Agent::start("sock-b", &["--pool", "default=10.75.0.0/16@24"]);
    let two_mib = vec![b' '; 2 << 20];
    let sized = format!("POST /v1/cni/add HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", two_mib.len());
    let mut chunked = Vec::new();
    for c in two_mib.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        chunked.extend_from_slice(c);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = "POST /v1/cni/add HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (what, head, body) in [("Content-Length", sized.as_str(), two_mib.clone()), ("chunked", streamed, chunked)] {
        let (status, body) = raw_request(&agent.socket, head, body);
        assert_eq!(status, 413, "{what}: {}", String::from_utf8_lossy(&body));
        let err: allot_wire::ApiError = serde_json::from_slice(&body).unwrap();
        assert!(err.message.contains("limit"), "{what}: {}", err.message);
    }
    // Just under the limit is read whole and served.
    let mut add = serde_json::to_vec(&json!({"owner": {"network": "n", "container_id": "big", "ifname": "eth0"}, "netns": "/x"})).unwrap();
    add.resize((1 << 20) - 1, b' ');
    let head = format!("POST /v1/cni/add HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", add.len());
    let (status, body) = raw_request(&agent.socket, &head, add);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// The header timeout bounds reading a request, not serving it: an ADD that waits longer than
/// it for a free address still gets one.
#[test]
fn an_add_waiting_longer_than_the_header_timeout_is_answered() {
    require_root();
    let agent = Agent::start("sock-c", &["--pool", "tiny=10.76.0.0/30@30", "--add-wait", "20s", "--reserve-gateway=false"]);
    let pin = json!({"pool": "tiny"});
    let (_, first) = call(&agent.socket, "ADD", "l1", pin.clone());
    assert_eq!(call(&agent.socket, "ADD", "l2", pin.clone()).0, 0);
    let started = Instant::now();
    let (code, third) = std::thread::scope(|s| {
        let waiting = s.spawn(|| call(&agent.socket, "ADD", "l3", pin.clone()));
        std::thread::sleep(HEADER_TIMEOUT + Duration::from_millis(1500));
        assert_eq!(call(&agent.socket, "DEL", "l1", pin.clone()).0, 0);
        waiting.join().unwrap()
    });
    assert_eq!(code, 0, "an ADD that waited {:?}: {third}", started.elapsed());
    assert!(started.elapsed() > HEADER_TIMEOUT, "the ADD did not wait");
    assert_eq!(ips_of(&third), ips_of(&first));
    // ADD and DEL are logged alike at info: the owner and its addresses.
    let log = agent.log();
    let ip = &ips_of(&first)[0];
    for (verb, owner) in [("add", "sock/l1/eth0"), ("del", "sock/l1/eth0"), ("add", "sock/l3/eth0")] {
        assert!(
            log.lines().any(|l| l.contains("INFO") && l.contains(&format!(" {verb} ")) && l.contains(owner) && l.contains(ip.as_str())),
            "no info line for {verb} of {owner} with {ip}:\n{log}"
        );
    }
}

fn reads_as_gone(v: &Value) -> Option<&'static str> {
    let text = v.to_string().to_lowercase();
    GONE.into_iter().find(|p| text.contains(p))
}

/// containerd takes a DEL error containing "not found" for "already deleted" and leaks the
/// address: with the agent stopped (no socket) or killed (stale socket), DEL is code 11,
/// says what to do, and never says "not found".
#[test]
fn del_without_an_agent_is_try_again_and_never_reads_as_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone/allot.sock");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let plugin = plugin();
    for socket in [&missing, &stale] {
        for netns in ["/var/run/netns/x", ""] {
            let call = CniCall { plugin: &plugin, command: "DEL", container_id: "c0ffee", netns, ifname: "eth0", args: "" };
            let (exit, out) = cni(&call, &conf(socket, json!({})));
            assert_eq!((exit, out["code"].as_u64()), (1, Some(11)), "{out}");
            let msg = out["msg"].as_str().unwrap();
            assert!(msg.contains(socket.to_str().unwrap()) && msg.contains("allot agent"), "{msg}");
            assert_eq!(reads_as_gone(&out), None, "DEL with netns {netns:?}: {out}");
        }
    }
}

#[test]
fn plugin_refuses_a_config_over_one_mib_with_code_6() {
    let mut child = Command::new(plugin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "big")
        .env("CNI_NETNS", "/x")
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The plugin stops reading at the cap; what is left may meet a closed pipe.
    let writer = std::thread::spawn(move || {
        let mut doc = br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"allot-ipam"},"pad":""#.to_vec();
        doc.resize(2 << 20, b'a');
        doc.extend_from_slice(b"\"}");
        let _ = stdin.write_all(&doc);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((out.status.code(), v["code"].as_u64()), (Some(1), Some(6)), "{v}");
    assert!(v["msg"].as_str().unwrap().contains("larger than"), "{v}");
}

/// `allot ... | head -c1`: the reader is gone before allot writes; allot stops quietly.
#[test]
fn closed_stdout_pipe_exits_quietly() {
    require_root();
    let agent = Agent::start("sock-d", &["--pool", "default=10.77.0.0/16@24"]);
    assert_eq!(call(&agent.socket, "ADD", "p1", json!({})).0, 0);
    for args in [&["allocations", "list", "-o", "json"][..], &["pool", "list", "-o", "yaml"], &["status"], &["node", "get", "sock-d"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin_dir().join("allot"))
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "allot {args:?} into a closed pipe: {stderr}");
        assert!(out.status.success(), "allot {args:?}: {} {stderr}", out.status);
    }
}

/// `Duration::from_secs_f64` panics past u64 seconds: the flag and the file refuse instead.
#[test]
fn absurd_add_wait_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, "addWaitSeconds: 1e29\n").unwrap();
    let huge = "100000000000000000000000000000";
    for (args, names) in [
        (vec!["--add-wait", huge], ["--add-wait", huge]),
        (vec!["--config", file.to_str().unwrap()], ["addWaitSeconds", "limit of 24h"]),
    ] {
        let out = Command::new(bin_dir().join("allot"))
            .arg("agent")
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(dir.path().join("allot.sock"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !stderr.contains("panicked"), "{args:?}: {}: {stderr}", out.status);
        assert!(names.iter().all(|n| stderr.contains(n)), "{args:?}: {stderr}");
    }
}
