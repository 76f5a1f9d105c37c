//! How fast the fake API answers through a real kube::Client: creates, gets, a list, and the
//! time from a write to a watcher seeing it. Prints a table; not a test.
//!
//! `cargo run -p allot-kube-fake --example throughput [-- N]`

use std::time::{Duration, Instant};

use allot_kube_fake::FakeApiServer;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::runtime::watcher;

fn cm(name: &str) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c
}

fn row(what: &str, n: usize, took: Duration) {
    println!(
        "{what:<28} {n:>7} {:>10.1} ms {:>10.0}/s {:>9.1} µs/op",
        took.as_secs_f64() * 1e3,
        n as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    println!("{:<28} {:>7} {:>13} {:>12} {:>15}", "operation", "count", "total", "rate", "per op");

    let t = Instant::now();
    for i in 0..n {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"))).await.unwrap();
    }
    row("create (sequential)", n, t.elapsed());

    let t = Instant::now();
    for i in 0..n {
        cms.get(&format!("c{i}")).await.unwrap();
    }
    row("get (sequential)", n, t.elapsed());

    let t = Instant::now();
    let lists = 20;
    for _ in 0..lists {
        assert_eq!(cms.list(&ListParams::default()).await.unwrap().items.len(), n);
    }
    row(&format!("list of {n}"), lists, t.elapsed());

    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let cms = cms.clone();
            tokio::spawn(async move { cms.create(&PostParams::default(), &cm(&format!("p{i}"))).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    row("create (all at once)", n, t.elapsed());

    // Write → watcher event, one at a time.
    let mut w = watcher(cms.clone(), watcher::Config::default()).boxed();
    while !matches!(w.next().await, Some(Ok(watcher::Event::InitDone))) {}
    let rounds = 200.min(n);
    let t = Instant::now();
    for i in 0..rounds {
        cms.create(&PostParams::default(), &cm(&format!("w{i}"))).await.unwrap();
        loop {
            if let Some(Ok(watcher::Event::Apply(c))) = w.next().await
                && c.metadata.name.as_deref() == Some(format!("w{i}").as_str())
            {
                break;
            }
        }
    }
    row("create → watcher event", rounds, t.elapsed());
    println!("objects stored: {}, revision: {}", api.objects("v1", "ConfigMap").len(), api.revision());
}
