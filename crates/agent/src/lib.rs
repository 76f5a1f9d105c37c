//! The node agent. It owns the node's address allocator and durable records, serves the CNI
//! plugin and the CLI over HTTP/JSON on a unix socket, keeps the node's demand in the store, and
//! gives back blocks it no longer needs. Standalone, it also embeds the store and runs the
//! operator loop in-process.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use allot_core::Pool;
use allot_store::{EmbeddedStore, Liveness, Store, StoreError};
use allot_wire::{ApiError, ErrorKind};
use tokio::net::UnixListener;
use tokio::sync::watch;

mod api;
pub mod cluster_web;
pub mod config;
pub mod datadir;
pub mod hostlocal;
pub mod lazy_store;
pub mod metrics;
mod node;
pub mod page;
pub mod pods;
#[cfg(feature = "kubernetes")]
pub mod kube_pods;
#[cfg(feature = "kubernetes")]
pub mod kube_cluster;
pub mod records;
pub mod server;
pub mod web;
#[cfg(feature = "etcd")]
pub mod routes;

pub use config::AgentConfig;
pub use datadir::DataDir;
pub use lazy_store::LazyStore;
pub use node::{Node, RESCAN_EVERY};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TryAgain(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn to_api(&self) -> ApiError {
        ApiError { kind: self.kind(), message: self.to_string() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Invalid(_) => ErrorKind::Invalid,
            AgentError::NotFound(_) => ErrorKind::NotFound,
            AgentError::Conflict(_) => ErrorKind::Conflict,
            AgentError::TryAgain(_) => ErrorKind::TryAgain,
            AgentError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        use allot_core::PoolError as P;
        match e {
            StoreError::Refused(
                p @ (P::Overlap { .. } | P::MaskChange { .. } | P::CidrInUse { .. } | P::PoolInUse { .. }),
            ) => AgentError::Conflict(p.to_string()),
            StoreError::Refused(p) => AgentError::Invalid(p.to_string()),
            StoreError::NotFound(m) => AgentError::NotFound(m),
            StoreError::Conflict(m) => AgentError::Conflict(m),
            StoreError::Backend(m) => AgentError::Internal(m),
        }
    }
}

/// Creates the configured auto-create pools that do not exist yet; existing pools are left as
/// they are.
pub async fn auto_create_pools<S: Store>(store: &S, cfg: &AgentConfig) -> Result<(), AgentError> {
    let existing = store.pools().await?;
    let missing: Vec<Pool> = cfg
        .auto_create_pools
        .iter()
        .filter(|(name, _)| !existing.iter().any(|p| &p.name == *name))
        .map(|(name, spec)| Pool { name: name.clone(), spec: spec.clone() })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    store.apply_pools(missing.clone()).await.map_err(|e| {
        AgentError::Invalid(format!("auto-created pools: {}", AgentError::from(e)))
    })?;
    for p in missing {
        tracing::info!(pool = %p.name, "created pool");
    }
    Ok(())
}

/// Binds the agent's socket, mode 0600 from its first moment: it is bound inside a fresh 0700
/// directory beside `path`, made 0600 there, and renamed into place, so no other user can
/// ever reach it. A stale socket file (nobody listening) is replaced; a live one is refused.
pub fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |what: &str, e: std::io::Error| AgentError::Internal(format!("{what} {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail("creating the directory of", e))?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::Conflict(format!(
            "another agent is already serving on {}: stop it first, or pick another --socket",
            path.display()
        )));
    }
    let private = dir.join(format!(".allot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| fail("creating a private directory beside", e))?;
    let staged = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| fail("binding", e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(|e| fail("chmod 0600", e))?;
        // Replaces a stale socket file atomically.
        std::fs::rename(&staged, path).map_err(|e| fail("moving the bound socket into place at", e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Serves `node` on `listener` until `shutdown` completes, with the node's loops alongside.
pub async fn serve<S: Store>(
    node: Arc<Node<S>>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let web = match node.cfg.metrics_addr {
        Some(addr) => {
            let site = Arc::new(metrics::AgentSite { node: node.clone() });
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz and the status page");
            Some(tokio::spawn(web::serve(web::bind(addr).await?, site, stop.clone())))
        }
        None => None,
    };
    let loops = [
        tokio::spawn(node.clone().demand_loop(stop.clone())),
        tokio::spawn(node.clone().watch_loop(stop.clone())),
        tokio::spawn(node.clone().adopt_loop(stop.clone())),
    ];
    let app = api::router(node);
    let result = server::run(listener, app, server::Limits::default(), shutdown)
        .await
        .map_err(|e| AgentError::Internal(format!("serving: {e}")));
    for l in loops.into_iter().chain(web) {
        l.abort();
    }
    result
}

/// Standalone mode: embedded store under the data dir, operator loop in-process.
pub async fn run_standalone(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    // Before anything in the directory is opened: a second agent must change nothing.
    let data = DataDir::lock(&cfg.data_dir)?;
    let store_path = data.join("cluster.redb");
    let store = Arc::new(EmbeddedStore::open(&store_path)?);
    datadir::make_private(&store_path).map_err(|e| AgentError::Internal(format!("chmod 0600 {}: {e}", store_path.display())))?;
    let socket = cfg.socket.clone();
    let node = Node::start(cfg, store.clone()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let operator = tokio::spawn(allot_operator::run(store.clone(), stop_rx.clone()));
    allot_operator::metrics::set_leader(true);
    let listener = bind_socket(&socket)?;
    tracing::info!(socket = %socket.display(), node = %node.cfg.node, "agent serving (standalone)");
    let result = serve(node, listener, shutdown, stop_rx).await;
    let _ = stop_tx.send(true);
    let _ = operator.await;
    let _ = std::fs::remove_file(&socket);
    drop(data);
    tracing::info!("agent stopped");
    result
}

/// How cluster mode reaches its store: connects (and marks the node live), then keeps the
/// node live until stop. One per backend: etcd, and the Kubernetes API (`kube_cluster`).
pub trait Connector: Send + 'static {
    type Store: Store + Liveness + Send + Sync + 'static;
    /// How long the node stays live after its agent stops renewing (killed, cut off).
    const LIVENESS_TTL: std::time::Duration;
    /// Names the store in logs and in `allot status` ("etcd at ...").
    fn target(&self) -> String;
    /// One attempt: connect (a client kept across attempts may be reused) and mark `node` live
    /// for `LIVENESS_TTL`; `connect_loop` keeps it live from there.
    fn connect(&mut self, node: &str) -> impl Future<Output = Result<Connected<Self::Store>, StoreError>> + Send;
}

/// A connected store and the lease its node is live by.
pub type Connected<S> = (Arc<S>, <S as Liveness>::Lease);

/// etcd: liveness is a lease-bound key `alive/<node>`.
#[cfg(feature = "etcd")]
pub struct EtcdConnector {
    cfg: allot_store::EtcdConfig,
    // One client for every attempt: each connect starts a watch that lives as long as the client.
    client: Option<Arc<allot_store::EtcdStore>>,
}

#[cfg(feature = "etcd")]
impl EtcdConnector {
    pub fn new(cfg: allot_store::EtcdConfig) -> Self {
        EtcdConnector { cfg, client: None }
    }
}

#[cfg(feature = "etcd")]
impl Connector for EtcdConnector {
    type Store = allot_store::EtcdStore;
    /// A killed agent's node stops being live this long after.
    const LIVENESS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

    fn target(&self) -> String {
        format!("etcd at {}", self.cfg.endpoints.join(","))
    }

    async fn connect(&mut self, node: &str) -> Result<(Arc<Self::Store>, i64), StoreError> {
        let store = match &self.client {
            Some(store) => store.clone(),
            None => Arc::new(allot_store::EtcdStore::connect(&self.cfg).await?),
        };
        self.client = Some(store.clone());
        let lease = store.announce_alive(node, Self::LIVENESS_TTL).await?;
        tracing::info!(%node, lease = format!("{lease:x}"), "connected to etcd; node is live");
        Ok((store, lease))
    }
}

/// Cluster mode: etcd is the store; the operator runs elsewhere (`allot operator`). The socket
/// is bound before etcd answers: the node serves DEL from its journal and ADD from the blocks
/// of its saved view, and connects to etcd in the background with backoff.
#[cfg(feature = "etcd")]
pub async fn run_cluster(
    cfg: AgentConfig,
    etcd: allot_store::EtcdConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    run_cluster_with(cfg, EtcdConnector::new(etcd), |_| {}, shutdown).await
}

/// Cluster mode on any store: `connector` reaches it in the background (with backoff) while
/// the node serves from its journal and saved view; `prepare` sees the node before it serves
/// (the Kubernetes backend sets its pod annotation source there).
pub async fn run_cluster_with<C: Connector>(
    cfg: AgentConfig,
    connector: C,
    prepare: impl FnOnce(&Arc<Node<LazyStore<C::Store>>>),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let data = DataDir::lock(&cfg.data_dir)?;
    let target = connector.target();
    let store = Arc::new(LazyStore::<C::Store>::new(target.clone()));
    let socket = cfg.socket.clone();
    #[cfg(feature = "etcd")]
    let direct_routes = cfg.direct_routes;
    #[cfg(not(feature = "etcd"))]
    if cfg.direct_routes {
        return Err(AgentError::Invalid("--auto-direct-node-routes needs an allot built with the etcd feature (netlink routes)".into()));
    }
    let node = Node::open(cfg, store.clone())?;
    prepare(&node);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connecting = tokio::spawn(connect_loop(store.clone(), connector, node.cfg.node.clone(), stop_rx.clone()));
    #[cfg(feature = "etcd")]
    let routes = direct_routes
        .then(|| tokio::spawn(routes::run(store.clone(), node.clone(), stop_rx.clone())));
    let listener = bind_socket(&socket)?;
    tracing::info!(socket = %socket.display(), node = %node.cfg.node, store = %target, "agent serving (cluster)");
    let result = serve(node, listener, shutdown, stop_rx).await;
    let _ = stop_tx.send(true);
    // The connector keeps the node live until `stop`; then it ends the lease (a clean stop is
    // a departure).
    let _ = connecting.await;
    #[cfg(feature = "etcd")]
    if let Some(r) = routes {
        let _ = r.await;
    }
    let _ = std::fs::remove_file(&socket);
    drop(data);
    tracing::info!("agent stopped");
    result
}

/// Connects (retrying with backoff), marks the node live, hands the store over, and then keeps
/// the node live until `stop`. Live comes first, so that no operator sees the node registered
/// but not live.
async fn connect_loop<C: Connector>(
    lazy: Arc<LazyStore<C::Store>>,
    mut connector: C,
    node: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match connector.connect(&node).await {
            Ok((store, live)) => {
                lazy.set(store.clone());
                allot_store::keep_alive(&*store, &node, C::LIVENESS_TTL, Some(live), stop).await;
                return;
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, store = %connector.target(), "connecting to the cluster store failed; serving from this node's journal and saved view"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
