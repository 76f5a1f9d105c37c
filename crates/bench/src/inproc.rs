//! In-process figures: the core allocators, the agent's restore, and the durable ADD path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_agent::{AgentConfig, Node};
use allot_core::blocks::BlockMap;
use allot_core::node_alloc::NodeAllocator;
use allot_core::{BlockGrant, Family, FamilySpec, Pool, PoolSpec};
use allot_store::{EmbeddedStore, Store};
use allot_wire::AddRequest;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grants {
    pub grants: usize,
    pub ms: f64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoreFigures {
    pub alloc_release_per_second: f64,
    pub block_grants: Grants,
    pub restore_allocations: usize,
    pub restore_ms: f64,
    pub durable_sequential_per_second: f64,
    pub durable_concurrent_per_second: f64,
    pub durable_concurrency: usize,
}

fn spec(v4: &str, m4: u8, v6: &str, m6: u8) -> PoolSpec {
    PoolSpec {
        ipv4: Some(FamilySpec { cidrs: vec![v4.parse().unwrap()], mask_size: m4 }),
        ipv6: Some(FamilySpec { cidrs: vec![v6.parse().unwrap()], mask_size: m6 }),
    }
}

/// Allocate + release pairs per second on a half-full /16 block.
fn alloc_release() -> f64 {
    let mut a = NodeAllocator::new();
    a.add_block("p", "10.0.0.0/16".parse().unwrap());
    let mut ring = std::collections::VecDeque::new();
    for _ in 0..30_000 {
        ring.push_back(a.allocate("p", Family::V4).unwrap());
    }
    let n = 5_000_000;
    let start = Instant::now();
    for _ in 0..n {
        let ip = a.allocate("p", Family::V4).unwrap();
        ring.push_back(ip);
        let old = ring.pop_front().unwrap();
        a.release("p", old);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Run in a child process so its peak RSS is its own: 5,000 nodes × 3 pools × 2 families.
pub fn grants_child() {
    let pools: Vec<Pool> = (0..3)
        .map(|i| Pool { name: format!("pool{i}"), spec: spec(&format!("10.{}.0.0/12", 64 * i), 28, &format!("fd0{i}::/96"), 124) })
        .collect();
    let start = Instant::now();
    let mut map = BlockMap::new(&pools, &[]);
    let mut grants = Vec::with_capacity(30_000);
    for node in 0..5_000 {
        let name = format!("node-{node}");
        for p in &pools {
            for f in Family::ALL {
                let cidr = map.pool_mut(&p.name, f).unwrap().take_next().expect("room");
                grants.push(BlockGrant { pool: p.name.clone(), cidr, node: name.clone() });
            }
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let g = Grants { grants: grants.len(), ms, peak_rss_mb: hwm_kb / 1024.0 };
    println!("{}", serde_json::to_string(&g).unwrap());
}

fn grants() -> Grants {
    let out = std::process::Command::new(std::env::current_exe().unwrap()).arg("--grants-child").output().unwrap();
    serde_json::from_slice(&out.stdout).expect("grants child output")
}

fn add_req(i: usize) -> AddRequest {
    crate::add_request(format!("c{i}"))
}

/// A node with 16 /16 blocks granted up front, so ADDs never wait for the operator.
async fn node(dir: &std::path::Path) -> (Arc<Node<EmbeddedStore>>, Duration) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("cluster.redb")).unwrap());
    if store.pools().await.unwrap().is_empty() {
        let pool = Pool {
            name: "default".into(),
            spec: PoolSpec { ipv4: Some(FamilySpec { cidrs: vec!["10.0.0.0/12".parse().unwrap()], mask_size: 16 }), ipv6: None },
        };
        store.apply_pools(vec![pool]).await.unwrap();
        for i in 0..16 {
            let cidr = format!("10.{i}.0.0/16").parse().unwrap();
            store.grant_block(&BlockGrant { pool: "default".into(), cidr, node: "bench".into() }).await.unwrap();
        }
    }
    let mut cfg = AgentConfig::new("bench");
    cfg.data_dir = dir.to_path_buf();
    let start = Instant::now();
    let n = Node::start(cfg, store).await.unwrap();
    (n, start.elapsed())
}

async fn durable(dir: &std::path::Path, concurrency: usize) -> (f64, f64) {
    let (n, _) = node(dir).await;
    let seq = 3_000;
    let start = Instant::now();
    for i in 0..seq {
        n.add(add_req(i)).await.unwrap();
    }
    let sequential = seq as f64 / start.elapsed().as_secs_f64();
    let per_task = 500;
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let n = n.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    n.add(add_req(1_000_000 + t * per_task + i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let concurrent = (concurrency * per_task) as f64 / start.elapsed().as_secs_f64();
    (sequential, concurrent)
}

async fn restore(dir: &std::path::Path, count: usize) -> Duration {
    {
        let (n, _) = node(dir).await;
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let n = n.clone();
                tokio::spawn(async move {
                    for i in (t..count).step_by(64) {
                        n.add(add_req(i)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Let the records thread close the file, then open again: the restore.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (n, took) = node(dir).await;
    assert_eq!(n.allocations().len(), count);
    took
}

pub fn run() -> CoreFigures {
    let alloc = alloc_release();
    let g = grants();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (restore_ms, (seq, conc)) = rt.block_on(async {
        let d1 = tempfile::tempdir().unwrap();
        let r = restore(d1.path(), 10_000).await;
        let d2 = tempfile::tempdir().unwrap();
        let d = durable(d2.path(), 64).await;
        (r.as_secs_f64() * 1000.0, d)
    });
    CoreFigures {
        alloc_release_per_second: alloc,
        block_grants: g,
        restore_allocations: 10_000,
        restore_ms,
        durable_sequential_per_second: seq,
        durable_concurrent_per_second: conc,
        durable_concurrency: 64,
    }
}

pub fn print_core(c: &CoreFigures) {
    println!("\n## In process\n");
    println!("| figure | value | target |\n|---|---:|---:|");
    println!("| address allocate+release per second | {:.0} | >= 5,000,000 |", c.alloc_release_per_second);
    println!(
        "| block grants, 5,000 nodes x 3 pools x 2 families ({}) | {:.1} ms, {:.1} MB peak RSS | <= 100 ms, <= 200 MB |",
        c.block_grants.grants, c.block_grants.ms, c.block_grants.peak_rss_mb
    );
    println!("| agent restore of {} allocations | {:.1} ms | <= 200 ms |", c.restore_allocations, c.restore_ms);
    println!("| durable ADDs per second, sequential (fsync each) | {:.0} | >= 2,000 |", c.durable_sequential_per_second);
    println!("| durable ADDs per second, {} concurrent (group commit) | {:.0} | >= 20,000 |", c.durable_concurrency, c.durable_concurrent_per_second);
}
