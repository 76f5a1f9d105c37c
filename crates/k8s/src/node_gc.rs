//! Blocks of a deleted Kubernetes Node are released: the leading operator watches core `Node`
//! objects and calls the store's `delete_node` for a node allot knows that Kubernetes does not
//! (deleted: at once; never seen: once it has been missing for `absent_for`, so an agent that
//! registered just before this watch saw its Node is not removed). The store keeps its rules:
//! a node whose agent is still live is refused (retried later), and released blocks stay
//! reserved to it for the store's release grace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use allot_store::{Store, StoreError};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct NodeGcOptions {
    /// A node allot knows but Kubernetes never listed is removed after this long.
    pub absent_for: Duration,
    /// How often every node is checked, besides on each deletion.
    pub every: Duration,
}

impl Default for NodeGcOptions {
    fn default() -> Self {
        NodeGcOptions { absent_for: Duration::from_secs(60), every: Duration::from_secs(30) }
    }
}

/// Runs until `stop` turns true (the end of this replica's term).
pub async fn release_deleted_nodes<S: Store>(client: kube::Client, store: Arc<S>, opts: NodeGcOptions, mut stop: watch::Receiver<bool>) {
    let (cache, writer) = reflector::store::<Node>();
    let stream = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(|n: &mut Node| {
            n.spec = None;
            n.status = None;
            n.metadata.managed_fields = None;
        })
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut missing_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(opts.every);
    loop {
        let sweep = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => listed,
            event = stream.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => {
                    listed = true;
                    true
                }
                Some(Ok(watcher::Event::Delete(n))) => {
                    if let Some(name) = n.metadata.name {
                        tracing::info!(node = %name, "Kubernetes Node deleted");
                        deleted.insert(name);
                    }
                    listed
                }
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching Kubernetes Nodes failed; retrying with backoff");
                    false
                }
                None => return,
            },
        };
        if sweep {
            sweep_once(&*store, &cache, &opts, &mut deleted, &mut missing_since).await;
        }
    }
}

async fn sweep_once<S: Store>(
    store: &S,
    cache: &Cache<Node>,
    opts: &NodeGcOptions,
    deleted: &mut BTreeSet<String>,
    missing_since: &mut BTreeMap<String, Instant>,
) {
    let present: BTreeSet<String> = cache.state().iter().filter_map(|n| n.metadata.name.clone()).collect();
    let known = match store.nodes().await {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::warn!(error = %e, "reading allot's nodes failed; checking again later");
            return;
        }
    };
    let now = Instant::now();
    let known_names: BTreeSet<&str> = known.iter().map(|n| n.name.as_str()).collect();
    missing_since.retain(|name, _| known_names.contains(name.as_str()) && !present.contains(name));
    deleted.retain(|name| known_names.contains(name.as_str()) && !present.contains(name));
    for name in known_names.iter().filter(|n| !present.contains(**n)) {
        let since = *missing_since.entry(name.to_string()).or_insert(now);
        if !deleted.contains(*name) && now.duration_since(since) < opts.absent_for {
            continue;
        }
        match store.delete_node(name).await {
            Ok(released) => {
                tracing::info!(node = %name, blocks = released.len(), "node is gone from Kubernetes: removed it and released its blocks");
                missing_since.remove(*name);
                deleted.remove(*name);
            }
            Err(StoreError::NotFound(_)) => {
                missing_since.remove(*name);
                deleted.remove(*name);
            }
            // Its agent is still live (its liveness Lease is current): later.
            Err(StoreError::Conflict(m)) => tracing::info!(node = %name, reason = %m, "Node gone but its agent is live; retrying later"),
            Err(e) => tracing::warn!(node = %name, error = %e, "removing a node that is gone from Kubernetes failed; retrying later"),
        }
    }
}
