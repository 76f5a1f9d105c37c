use std::time::Duration;

use allot_store::EtcdStore;

use crate::backend::ClusterFlags;
use crate::cmd::agent::{init_logging, parse_duration, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// This replica's name in the leader election (default: hostname and pid).
    #[arg(long)]
    id: Option<String>,
    /// Lease TTL: how long a dead leader holds the lead before another replica takes it.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    lease_ttl: String,
    /// Remove a node whose agent has held no liveness lease for this long, and release its blocks.
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    node_gc_after: String,
    /// Blocks released from a removed node are granted to no other node for this long.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    release_grace: String,
    /// Serve /metrics (Prometheus), /healthz, /readyz and a status page on this TCP address,
    /// e.g. 127.0.0.1:9963 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

pub fn exec(args: Args, cluster: &ClusterFlags) -> anyhow::Result<()> {
    init_logging();
    anyhow::ensure!(!cluster.etcd_endpoints.is_empty(), "allot operator needs --etcd-endpoints");
    let ttl = parse_duration(&args.lease_ttl)?;
    anyhow::ensure!(ttl >= Duration::from_secs(2), "--lease-ttl must be at least 2s");
    let id = args.id.unwrap_or_else(|| format!("{}-{}", crate::cmd::agent::hostname(), std::process::id()));
    let opts = allot_operator::Options { node_gc_after: parse_duration(&args.node_gc_after)? };
    let mut cfg = cluster.config()?;
    cfg.release_grace = parse_duration(&args.release_grace)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let store = std::sync::Arc::new(EtcdStore::connect(&cfg).await?);
        let (_web_stop, web_stop_rx) = tokio::sync::watch::channel(false);
        if let Some(addr) = args.metrics_addr {
            let listener = allot_agent::web::bind(addr).await?;
            let site = std::sync::Arc::new(allot_agent::cluster_web::OperatorSite { store: store.clone() });
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz and the status page");
            tokio::spawn(allot_agent::web::serve(listener, site, web_stop_rx));
        }
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tracing::info!(%id, "campaigning for operator leadership");
            let lead = tokio::select! {
                l = store.lead("operator", &id, ttl) => l,
                _ = &mut shutdown => return Ok(()),
            };
            let leadership = match lead {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            tracing::info!(%id, "leading");
            allot_operator::metrics::set_leader(true);
            // Every write of this term carries the leader compare: a term that ended unnoticed
            // (this process frozen or partitioned) cannot write.
            let fenced = std::sync::Arc::new(store.fenced(&leadership));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let worker = tokio::spawn(allot_operator::run_with(fenced, opts, stop_rx));
            let mut lost = leadership.lost.clone();
            let quit = tokio::select! {
                _ = lost.wait_for(|l| *l) => false,
                _ = &mut shutdown => true,
            };
            let _ = stop_tx.send(true);
            let _ = worker.await;
            allot_operator::metrics::set_leader(false);
            leadership.resign().await;
            if quit {
                tracing::info!("operator stopped");
                return Ok::<(), anyhow::Error>(());
            }
            tracing::warn!("lost leadership");
        }
    })
}
