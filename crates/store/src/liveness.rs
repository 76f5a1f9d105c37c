//! A node's liveness in a cluster store (etcd's lease-bound key, a Kubernetes Lease): taken
//! when the agent starts, renewed while it runs, ended at a clean stop. `allot node delete`
//! refuses a live node, and the operator removes a node only after it has been dead a while.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::StoreError;

/// A store that records which nodes' agents are running.
pub trait Liveness: Send + Sync {
    /// What `announce_alive` hands back, to renew and end that record.
    type Lease: Send + Sync + 'static;

    /// Marks `node` live for `ttl`, replacing a record an earlier run of its agent left.
    fn announce_alive(&self, node: &str, ttl: Duration) -> impl Future<Output = Result<Self::Lease, StoreError>> + Send;

    /// One renewal: Ok(false) when the record already ran out or is gone.
    fn renew_alive(&self, lease: &Self::Lease) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Ends the record at once (a clean stop is a departure).
    fn revoke_alive(&self, lease: Self::Lease) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Keeps `node` live until `stop` turns true, then ends its record at once. With the store
/// unreachable it keeps trying; a record that ran out is replaced. `lease` is one already
/// announced (the agent goes live before it serves), else the first is taken here.
pub async fn keep_alive<L: Liveness>(store: &L, node: &str, ttl: Duration, mut lease: Option<L::Lease>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let wait = match &lease {
            None => match store.announce_alive(node, ttl).await {
                Ok(l) => {
                    tracing::info!(%node, "node is live");
                    lease = Some(l);
                    ttl / 3
                }
                Err(e) => {
                    tracing::warn!(error = %e, "marking the node live failed; retrying");
                    Duration::from_secs(1)
                }
            },
            Some(l) => match store.renew_alive(l).await {
                Ok(true) => ttl / 3,
                Ok(false) => {
                    tracing::warn!(%node, "the liveness lease ran out (store unreachable too long?) or was taken; taking a new one");
                    lease = None;
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the liveness lease failed; retrying");
                    Duration::from_millis(500)
                }
            },
        };
        // Woken early by a stop; a timeout is the next renewal. With the sender gone nobody can
        // stop this loop any more: that is a stop too.
        if let Ok(Err(_)) = tokio::time::timeout(wait, stop.changed()).await {
            break;
        }
    }
    if let Some(l) = lease
        && let Err(e) = store.revoke_alive(l).await
    {
        tracing::warn!(error = %e, "ending the liveness lease failed; it runs out by itself");
    }
}
