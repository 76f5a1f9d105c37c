//! Cluster mode on Kubernetes: the store is the API server (`allot_k8s::KubeStore`), the node
//! is live by a Lease (`allot-node-<node>` in allot's namespace), and pod annotations come from
//! a watch of this node's pods when the runtime passes none (`kube_pods`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use allot_k8s::{AliveLease, KubeStore, KubeStoreOptions};
use allot_store::{Liveness, StoreError};
use tokio::sync::watch;

use crate::{AgentConfig, AgentError, Connector};

pub struct KubeConnector {
    client: kube::Client,
    opts: KubeStoreOptions,
    // Kept across attempts: its watches keep running while the liveness Lease is retried.
    store: Option<Arc<KubeStore>>,
}

impl KubeConnector {
    pub fn new(client: kube::Client, opts: KubeStoreOptions) -> Self {
        KubeConnector { client, opts, store: None }
    }
}

impl Connector for KubeConnector {
    type Store = KubeStore;
    /// The liveness Lease's duration: a killed agent's node stops being live this long after.
    const LIVENESS_TTL: Duration = Duration::from_secs(10);

    fn target(&self) -> String {
        format!("the Kubernetes API (allot namespace {})", self.opts.namespace)
    }

    async fn connect(&mut self, node: &str) -> Result<(Arc<KubeStore>, AliveLease), StoreError> {
        let store = match &self.store {
            Some(s) => s.clone(),
            None => Arc::new(KubeStore::connect(self.client.clone(), self.opts.clone()).await?),
        };
        self.store = Some(store.clone());
        let lease = store.announce_alive(node, Self::LIVENESS_TTL).await?;
        tracing::info!(%node, "connected to the Kubernetes API; node is live");
        Ok((store, lease))
    }
}

/// Cluster mode on Kubernetes. The pod watch starts at once (it needs no store); namespace
/// annotations come from the store, which reads Namespaces itself.
pub async fn run_kubernetes(
    cfg: AgentConfig,
    client: kube::Client,
    opts: KubeStoreOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let (stop_tx, stop) = watch::channel(false);
    let pods = crate::kube_pods::KubePods::start(client.clone(), &cfg.node, false, stop);
    let result = crate::run_cluster_with(cfg, KubeConnector::new(client, opts), |node| node.set_pod_annotations(pods), shutdown).await;
    let _ = stop_tx.send(true);
    result
}
