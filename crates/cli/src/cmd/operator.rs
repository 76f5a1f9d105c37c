use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::{ClusterFlags, StoreKind};
use crate::cmd::agent::{init_logging, parse_duration, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// This replica's name in the leader election (default: hostname and pid). On Kubernetes
    /// the election is the Lease `allot-operator` in allot's namespace.
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
    let kind = cluster.store_kind()?;
    let ttl = parse_duration(&args.lease_ttl)?;
    anyhow::ensure!(ttl >= Duration::from_secs(2), "--lease-ttl must be at least 2s");
    let id = args.id.clone().unwrap_or_else(|| format!("{}-{}", crate::cmd::agent::hostname(), std::process::id()));
    let opts = allot_operator::Options { node_gc_after: parse_duration(&args.node_gc_after)? };
    let release_grace = parse_duration(&args.release_grace)?;
    match kind {
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => run_etcd(args, cluster, id, ttl, opts, release_grace),
        #[cfg(feature = "kubernetes")]
        StoreKind::Kubernetes => run_kubernetes(args, cluster, id, ttl, opts, release_grace),
        StoreKind::Embedded => anyhow::bail!(
            "allot operator needs a cluster store: --etcd-endpoints, or --store kubernetes (standalone, the agent runs the operator loop itself)"
        ),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("this allot was built without the {other:?} store (cargo feature)"),
    }
}

#[cfg(feature = "etcd")]
fn run_etcd(
    args: Args,
    cluster: &ClusterFlags,
    id: String,
    ttl: Duration,
    opts: allot_operator::Options,
    release_grace: Duration,
) -> anyhow::Result<()> {
    use allot_store::EtcdStore;
    let mut cfg = cluster.config()?;
    cfg.release_grace = release_grace;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let store = Arc::new(EtcdStore::connect(&cfg).await?);
        let _web_stop = serve_status(args.metrics_addr, &store).await?;
        let campaign = async || {
            tracing::info!(%id, "campaigning for operator leadership");
            Ok::<_, anyhow::Error>(store.lead("operator", &id, ttl).await?)
        };
        lead_terms(&id, shutdown_signal(), campaign, |leadership, stop| {
            // Every write of this term carries the leader compare: a term that ended unnoticed
            // (this process frozen or partitioned) cannot write.
            let fenced = Arc::new(store.fenced(leadership));
            vec![tokio::spawn(allot_operator::run_with(fenced, opts, stop))]
        })
        .await
    })
}

/// On Kubernetes: the store is the API server; replicas elect a leader through the Lease
/// `allot-operator` in allot's namespace. No write fence is needed for grants: a block is an
/// `IPBlock` created only if absent, so two leaders at once still cannot grant it twice.
#[cfg(feature = "kubernetes")]
fn run_kubernetes(
    args: Args,
    cluster: &ClusterFlags,
    id: String,
    ttl: Duration,
    opts: allot_operator::Options,
    release_grace: Duration,
) -> anyhow::Result<()> {
    use allot_k8s::lease::LeaderElector;
    use allot_k8s::node_gc::{NodeGcOptions, release_deleted_nodes};
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = cluster.kube_client().await?;
        let store_opts = allot_k8s::KubeStoreOptions { release_grace, ..cluster.kube_store_options() };
        let store = Arc::new(allot_k8s::KubeStore::connect(client.clone(), store_opts).await?);
        let _web_stop = serve_status(args.metrics_addr, &store).await?;
        let elector = LeaderElector::new(client.clone(), store.namespace(), "allot-operator", &id, ttl);
        let campaign = async || {
            tracing::info!(%id, namespace = %store.namespace(), "campaigning for operator leadership (Lease allot-operator)");
            Ok::<_, anyhow::Error>(elector.campaign().await)
        };
        lead_terms(&id, shutdown_signal(), campaign, |_, stop| {
            vec![
                tokio::spawn(allot_operator::run_with(store.clone(), opts, stop.clone())),
                tokio::spawn(release_deleted_nodes(client.clone(), store.clone(), NodeGcOptions::default(), stop)),
            ]
        })
        .await
    })
}

/// `--metrics-addr`: serves the operator's metrics and status page until the returned sender
/// is dropped.
#[cfg(any(feature = "etcd", feature = "kubernetes"))]
async fn serve_status<S: allot_store::Store + Send + Sync + 'static>(
    addr: Option<std::net::SocketAddr>,
    store: &Arc<S>,
) -> anyhow::Result<watch::Sender<bool>> {
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = addr {
        let listener = allot_agent::web::bind(addr).await?;
        let site = Arc::new(allot_agent::cluster_web::OperatorSite { store: store.clone() });
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz and the status page");
        tokio::spawn(allot_agent::web::serve(listener, site, stop_rx));
    }
    Ok(stop_tx)
}

/// A term of leadership: etcd's lease or the Kubernetes Lease.
#[cfg(any(feature = "etcd", feature = "kubernetes"))]
trait Term {
    /// Turns true when the term is lost.
    fn lost(&self) -> watch::Receiver<bool>;
    /// Ends the term so another replica may lead at once.
    async fn resign(self);
}

#[cfg(feature = "etcd")]
impl Term for allot_store::etcd::Leadership {
    fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }
    async fn resign(self) {
        allot_store::etcd::Leadership::resign(self).await
    }
}

#[cfg(feature = "kubernetes")]
impl Term for allot_k8s::lease::Leadership {
    fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }
    async fn resign(self) {
        allot_k8s::lease::Leadership::resign(self).await
    }
}

/// Campaigns until `shutdown`; a failed campaign is retried after a second. While a term holds,
/// the tasks `start` spawns do the work (told to stop through the receiver it is given); when
/// the term is lost or the process stops, they are stopped and awaited, then the term resigned.
#[cfg(any(feature = "etcd", feature = "kubernetes"))]
async fn lead_terms<T: Term>(
    id: &str,
    shutdown: impl Future<Output = ()>,
    mut campaign: impl AsyncFnMut() -> anyhow::Result<T>,
    mut start: impl FnMut(&T, watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let campaigned = tokio::select! {
            t = campaign() => t,
            _ = &mut shutdown => return Ok(()),
        };
        let term = match campaigned {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(%id, "leading");
        allot_operator::metrics::set_leader(true);
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers = start(&term, stop_rx);
        let mut lost = term.lost();
        let quit = tokio::select! {
            _ = lost.wait_for(|l| *l) => false,
            _ = &mut shutdown => true,
        };
        let _ = stop_tx.send(true);
        for w in workers {
            let _ = w.await;
        }
        allot_operator::metrics::set_leader(false);
        // Released only after the work stopped: the next leader starts on a quiet store.
        term.resign().await;
        if quit {
            tracing::info!("operator stopped");
            return Ok(());
        }
        tracing::warn!("lost leadership");
    }
}

#[cfg(all(test, any(feature = "etcd", feature = "kubernetes")))]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A term the test ends by sending on its `lost`; resigning is logged.
    struct FakeTerm {
        n: usize,
        lost: watch::Receiver<bool>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Term for FakeTerm {
        fn lost(&self) -> watch::Receiver<bool> {
            self.lost.clone()
        }
        async fn resign(self) {
            self.log.lock().unwrap().push(format!("resign {}", self.n));
        }
    }

    async fn until(log: &Mutex<Vec<String>>, entry: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().iter().any(|e| e == entry) {
            assert!(tokio::time::Instant::now() < deadline, "no {entry:?} in {:?}", log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_term_stops_its_work_before_it_resigns_and_a_lost_term_campaigns_again() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lose1, lost1) = watch::channel(false);
        let (_lose2, lost2) = watch::channel(false);
        let mut results: VecDeque<anyhow::Result<FakeTerm>> = VecDeque::from([
            Err(anyhow::anyhow!("store unreachable")),
            Ok(FakeTerm { n: 1, lost: lost1, log: log.clone() }),
            Ok(FakeTerm { n: 2, lost: lost2, log: log.clone() }),
        ]);
        let (quit_tx, quit_rx) = tokio::sync::oneshot::channel::<()>();
        let mut campaigns = 0;
        let campaign = async || {
            campaigns += 1;
            match results.pop_front() {
                Some(r) => r,
                None => std::future::pending().await,
            }
        };
        let start = |t: &FakeTerm, mut stop: watch::Receiver<bool>| {
            log.lock().unwrap().push(format!("start {}", t.n));
            let (log, n) = (log.clone(), t.n);
            // Slow to stop: a resign that did not wait for it would be logged first.
            vec![tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                log.lock().unwrap().push(format!("stopped {n}"));
            })]
        };
        let drive = async {
            until(&log, "start 1").await;
            lose1.send(true).unwrap();
            until(&log, "start 2").await;
            quit_tx.send(()).unwrap();
        };
        let (result, ()) = tokio::join!(lead_terms("op-1", async { let _ = quit_rx.await; }, campaign, start), drive);
        result.unwrap();
        assert_eq!(campaigns, 3, "the failed campaign was retried");
        assert_eq!(*log.lock().unwrap(), ["start 1", "stopped 1", "resign 1", "start 2", "stopped 2", "resign 2"]);
    }
}
