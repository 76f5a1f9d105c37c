//! The node's liveness in cluster mode: a lease-bound key `alive/<node>` in etcd, kept alive
//! while the agent runs. `allot node delete` refuses a live node, and the operator removes a
//! node only after its key has been gone for `--node-gc-after`.

use std::sync::Arc;
use std::time::Duration;

use allot_store::EtcdStore;
use tokio::sync::watch;

/// The liveness lease's TTL: a killed agent's node stops being live this long after.
pub const TTL: Duration = Duration::from_secs(5);

/// Keeps `node` live until `stop` turns true, then ends the lease at once (a clean stop is a
/// departure). With etcd unreachable it keeps trying; an expired lease is replaced. `lease` is
/// one already announced (the agent goes live before it registers the node).
pub async fn run(store: Arc<EtcdStore>, node: String, lease: Option<i64>, mut stop: watch::Receiver<bool>) {
    let mut lease = lease;
    while !*stop.borrow() {
        let wait = match lease {
            None => match store.announce_alive(&node, TTL).await {
                Ok(l) => {
                    tracing::info!(%node, lease = format!("{l:x}"), "node is live");
                    lease = Some(l);
                    TTL / 3
                }
                Err(e) => {
                    tracing::warn!(error = %e, "marking the node live failed; retrying");
                    Duration::from_secs(1)
                }
            },
            Some(l) => match store.renew_alive(l).await {
                Ok(true) => TTL / 3,
                Ok(false) => {
                    tracing::warn!(%node, "liveness lease expired (etcd unreachable too long?); taking a new one");
                    lease = None;
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the liveness lease failed; retrying");
                    Duration::from_millis(500)
                }
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    if let Some(l) = lease
        && let Err(e) = store.revoke_alive(l).await
    {
        tracing::warn!(error = %e, "ending the liveness lease failed; it runs out by itself");
    }
}
