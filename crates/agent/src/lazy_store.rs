//! A store that is connected in the background. In cluster mode the agent binds its socket and
//! serves from its journal and saved view before etcd answers; until then every store call fails
//! at once with "not connected", as an outage would, and the loops retry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use allot_core::{ApplyAction, BlockGrant, Pool};
use allot_store::{Annotations, NodeRecord, Snapshot, Store, StoreError, StoreEvent};
use allot_wire::PoolRequest;
use tokio::sync::{broadcast, watch};

pub struct LazyStore<S> {
    inner: OnceLock<Arc<S>>,
    revision: watch::Sender<u64>,
    events: broadcast::Sender<StoreEvent>,
    what: String,
}

impl<S: Store> LazyStore<S> {
    /// `what` names the store in errors (for example the etcd endpoints).
    pub fn new(what: impl Into<String>) -> Self {
        LazyStore { inner: OnceLock::new(), revision: watch::Sender::new(0), events: broadcast::Sender::new(allot_store::EVENT_BUFFER), what: what.into() }
    }

    /// Hands over the connected store and forwards its changes to this store's watchers.
    pub fn set(&self, store: Arc<S>) {
        let mut changes = store.watch();
        let mut inner_events = store.events();
        if self.inner.set(store).is_err() {
            return;
        }
        // Typed events pass through; subscribers read a snapshot first (the store can be read
        // now), and again when this forwarder fell behind.
        let events = self.events.clone();
        let _ = events.send(StoreEvent::Resync);
        tokio::spawn(async move {
            loop {
                match inner_events.recv().await {
                    Ok(e) => drop(events.send(e)),
                    Err(broadcast::error::RecvError::Lagged(_)) => drop(events.send(StoreEvent::Resync)),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        // This store counts changes of its own: wake every follower now (the view can be read)
        // and on every change of the inner store.
        let revision = self.revision.clone();
        revision.send_modify(|r| *r += 1);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                changes.borrow_and_update();
                revision.send_modify(|r| *r += 1);
            }
        });
    }

    pub fn get(&self) -> Option<&Arc<S>> {
        self.inner.get()
    }

    fn inner(&self) -> Result<&Arc<S>, StoreError> {
        self.inner.get().ok_or_else(|| StoreError::Backend(format!("not connected to {} yet", self.what)))
    }
}

impl<S: Store> Store for LazyStore<S> {
    async fn pools(&self) -> Result<Vec<Pool>, StoreError> {
        self.inner()?.pools().await
    }

    async fn apply_pools(&self, pools: Vec<Pool>) -> Result<Vec<ApplyAction>, StoreError> {
        self.inner()?.apply_pools(pools).await
    }

    async fn delete_pool(&self, name: &str) -> Result<(), StoreError> {
        self.inner()?.delete_pool(name).await
    }

    async fn grants(&self) -> Result<Vec<BlockGrant>, StoreError> {
        self.inner()?.grants().await
    }

    async fn grant_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        self.inner()?.grant_block(grant).await
    }

    async fn release_block(&self, grant: &BlockGrant) -> Result<bool, StoreError> {
        self.inner()?.release_block(grant).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner()?.nodes().await
    }

    async fn register_node(&self, name: &str, ip: Option<IpAddr>) -> Result<(), StoreError> {
        self.inner()?.register_node(name, ip).await
    }

    async fn set_requested(&self, name: &str, requested: Vec<PoolRequest>) -> Result<(), StoreError> {
        self.inner()?.set_requested(name, requested).await
    }

    async fn set_operator_error(&self, name: &str, error: Option<String>) -> Result<(), StoreError> {
        self.inner()?.set_operator_error(name, error).await
    }

    async fn delete_node(&self, name: &str) -> Result<Vec<BlockGrant>, StoreError> {
        self.inner()?.delete_node(name).await
    }

    async fn namespaces(&self) -> Result<BTreeMap<String, Annotations>, StoreError> {
        self.inner()?.namespaces().await
    }

    async fn annotate_namespace(&self, namespace: &str, set: Annotations, remove: Vec<String>) -> Result<Annotations, StoreError> {
        self.inner()?.annotate_namespace(namespace, set, remove).await
    }

    async fn live_nodes(&self) -> Result<Option<BTreeSet<String>>, StoreError> {
        self.inner()?.live_nodes().await
    }

    async fn released_blocks(&self) -> Result<Vec<BlockGrant>, StoreError> {
        self.inner()?.released_blocks().await
    }

    async fn grant_blocks(&self, grants: &[BlockGrant]) -> Result<Vec<bool>, StoreError> {
        self.inner()?.grant_blocks(grants).await
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.inner()?.snapshot().await
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    fn heard_unix(&self) -> Option<u64> {
        // Not connected yet: never heard.
        self.inner.get().map_or(Some(0), |s| s.heard_unix())
    }
}
