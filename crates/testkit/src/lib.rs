//! Real parts for tests: Debian's `etcd` started on a port of its own (on loopback, or inside a
//! network namespace the test made), and TLS certificates made with `openssl`. Everything is
//! removed when its handle drops.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn require_etcd() {
    assert!(
        Path::new("/usr/bin/etcd").exists(),
        "needs Debian's etcd-server (/usr/bin/etcd): run scripts/test.sh, which installs it"
    );
}

pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by the CA.
pub fn make_certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=allot-test-ca", "-keyout", "ca.key", "-out", "ca.pem"], d);
    for (name, ext) in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"), ("client", "extendedKeyUsage=clientAuth")] {
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN=allot-{name}"), "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr")], d);
        openssl(
            &["x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", &format!("{name}.ext"), "-out", &format!("{name}.pem")],
            d,
        );
    }
    Certs {
        ca: d.join("ca.pem"),
        server_cert: d.join("server.pem"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.pem"),
        client_key: d.join("client.key"),
        dir,
    }
}

/// One etcd member with its own data dir.
pub struct Etcd {
    pub dir: tempfile::TempDir,
    /// `http://IP:PORT` or `https://…`
    pub endpoint: String,
    args: Vec<String>,
    netns: Option<String>,
    child: Option<Child>,
}

impl Etcd {
    /// etcd on 127.0.0.1.
    pub fn start() -> Etcd {
        Self::launch(None, "127.0.0.1", None)
    }

    /// etcd listening on `ip` inside the network namespace `netns`.
    pub fn start_in(netns: &str, ip: &str) -> Etcd {
        Self::launch(Some(netns), ip, None)
    }

    /// etcd on 127.0.0.1 that speaks TLS only and wants client certificates signed by the CA.
    pub fn start_tls(certs: &Certs) -> Etcd {
        Self::launch(None, "127.0.0.1", Some((certs, true)))
    }

    /// etcd on 127.0.0.1 that speaks TLS only and asks clients for no certificate.
    pub fn start_server_tls(certs: &Certs) -> Etcd {
        Self::launch(None, "127.0.0.1", Some((certs, false)))
    }

    fn launch(netns: Option<&str>, ip: &str, tls: Option<(&Certs, bool)>) -> Etcd {
        require_etcd();
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let mut args: Vec<String> = [
            "--name", "t", "--data-dir", &dir.path().join("data").to_string_lossy(),
            "--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint,
            "--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url,
            "--initial-cluster", &format!("t={peer_url}"), "--log-level", "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some((c, client_certs)) = tls {
            for (flag, path) in [("--cert-file", &c.server_cert), ("--key-file", &c.server_key)] {
                args.push(flag.into());
                args.push(path.to_string_lossy().into());
            }
            // etcd demands client certificates whenever it has a trusted CA file.
            if client_certs {
                args.extend(["--trusted-ca-file".into(), c.ca.to_string_lossy().into(), "--client-cert-auth".into()]);
            }
        }
        let mut e = Etcd { dir, endpoint, args, netns: netns.map(String::from), child: None };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log")).unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd.args(&self.args).stdout(Stdio::null()).stderr(log).spawn().expect("starting etcd");
        self.child = Some(child);
        if self.netns.is_none() && self.endpoint.starts_with("http://") {
            self.wait_healthy();
        } else {
            // Reachable only from inside the namespace (or only with TLS): the test waits by
            // retrying its first request.
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait_healthy(&self) {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes());
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("\"health\":\"true\"") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd running").id()
    }

    /// Stops the process (SIGKILL); `restart` brings it back on the same data and port.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGSTOP / SIGCONT: etcd stops answering without closing its connections.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        // `ip netns exec` execs etcd in place, so the child's pid is etcd's in both cases.
        let _ = Command::new("kill").args([sig, &self.pid().to_string()]).status();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.freeze(false);
        }
        self.stop();
    }
}

/// A TCP proxy on loopback between a client and a server, run by std threads, that can be
/// switched to a silent partition: `black_hole(true)` freezes every open connection (nothing is
/// forwarded, nothing is closed) and holds new ones unanswered, as a lost route or a dropped
/// NAT entry would. Frozen connections stay frozen after `black_hole(false)`; new ones work.
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    shared: std::sync::Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    /// Bumped by every partition: a connection from an earlier epoch is frozen.
    epoch: std::sync::atomic::AtomicU64,
    black_hole: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
}

impl TcpProxy {
    pub fn start(upstream: std::net::SocketAddr) -> TcpProxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = std::sync::Arc::new(ProxyShared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !sh.stop.load(SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                if sh.black_hole.load(SeqCst) {
                    held.push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let epoch = sh.epoch.load(SeqCst);
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let sh = sh.clone();
                    std::thread::spawn(move || pump(from, to, epoch, &sh));
                }
            }
        });
        TcpProxy { addr, shared }
    }

    pub fn black_hole(&self, on: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if on {
            self.shared.epoch.fetch_add(1, SeqCst);
        }
        self.shared.black_hole.store(on, SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, epoch: u64, sh: &ProxyShared) {
    use std::sync::atomic::Ordering::SeqCst;
    from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 16384];
    while !sh.stop.load(SeqCst) {
        if sh.epoch.load(SeqCst) != epoch {
            // Frozen: keep both sockets open, forward nothing, until the proxy goes.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sh.epoch.load(SeqCst) != epoch {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
