//! What serving metrics costs the ADD path: ADDs through the exec'd plugin with no scraper,
//! then with a scraper fetching `/metrics` every 100 ms, alternated in rounds so drift in the
//! machine's load falls on both sides alike.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::{Latency, latency};

pub const SCRAPE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
pub struct ScrapeFigures {
    pub live: usize,
    pub without: Latency,
    pub with: Latency,
    /// How long each /metrics answer took, while the ADDs ran.
    pub scrape: Latency,
    pub scrapes: usize,
    pub metrics_bytes: usize,
}

/// One GET of `path` on `addr`; returns the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
    Ok(buf.split_off(at))
}

pub fn run(ipam: &Path, socket: &Path, metrics: SocketAddr, live: usize, ops: usize) -> ScrapeFigures {
    let conf = json!({"cniVersion": "1.0.0", "name": "scrape", "type": "bridge",
        "ipam": {"type": "allot-ipam", "socket": socket}})
    .to_string();
    let mut n = 0;
    let mut adds = |count: usize| -> Vec<Duration> {
        (0..count)
            .map(|_| {
                n += 1;
                let (d, ok, out) = crate::exec(ipam, "ADD", &format!("s{n}"), conf.as_bytes());
                assert!(ok, "ADD failed: {}", String::from_utf8_lossy(&out));
                d
            })
            .collect()
    };
    let (mut without, mut with, mut scrape) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = 8;
    let mut bytes = 0;
    for _ in 0..rounds {
        without.extend(adds(ops / rounds));
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut took, mut size) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    size = get(metrics, "/metrics").expect("scraping /metrics").len();
                    took.push(t.elapsed());
                    std::thread::sleep(SCRAPE_EVERY.saturating_sub(t.elapsed()));
                }
                (took, size)
            })
        };
        with.extend(adds(ops / rounds));
        stop.store(true, Ordering::Relaxed);
        let (took, size) = scraper.join().unwrap();
        scrape.extend(took);
        bytes = size;
    }
    ScrapeFigures { live, without: latency(without), with: latency(with), scrapes: scrape.len(), scrape: latency(scrape), metrics_bytes: bytes }
}

pub fn print(f: &ScrapeFigures) {
    println!("\n## Metrics scrapes and the ADD path ({} live allocations, /metrics every {SCRAPE_EVERY:?})\n", f.live);
    println!("| ADD p50 / p99 without scrapes | ADD p50 / p99 with scrapes | p50 change | scrapes | scrape p50 / p99 | /metrics size |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:+.1}% | {} | {:.2} / {:.2} ms | {} bytes |",
        f.without.p50_ms,
        f.without.p99_ms,
        f.with.p50_ms,
        f.with.p99_ms,
        (f.with.p50_ms / f.without.p50_ms - 1.0) * 100.0,
        f.scrapes,
        f.scrape.p50_ms,
        f.scrape.p99_ms,
        f.metrics_bytes
    );
}
