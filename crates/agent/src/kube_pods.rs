//! The pod annotation source on Kubernetes: a reflector of the pods scheduled on this node
//! (field selector `spec.nodeName=<node>`) and, unless the store already gives namespace
//! annotations, one of all namespaces. kube-runtime's watcher resumes from the last
//! resourceVersion when a watch ends and re-lists after 410 Gone; errors back off and retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use allot_store::Annotations;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::pods::PodAnnotations;

pub struct KubePods {
    pods: Store<Pod>,
    namespaces: Option<Store<Namespace>>,
    /// Set once the namespaces were listed (a missing one is then really missing).
    namespaces_listed: Arc<AtomicBool>,
    changed: watch::Sender<u64>,
}

impl KubePods {
    /// Starts the watches (tasks that end when `stop` turns true) and returns the cache.
    pub fn start(client: kube::Client, node: &str, watch_namespaces: bool, stop: watch::Receiver<bool>) -> Arc<Self> {
        let (changed, _) = watch::channel(0u64);
        let (pods, pod_writer) = reflector::store();
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pod_stream = watcher(Api::<Pod>::all(client.clone()), pod_cfg)
            .default_backoff()
            // Only the metadata is read: spec and status would cost memory per pod.
            .modify(|p: &mut Pod| {
                p.spec = None;
                p.status = None;
                p.metadata.managed_fields = None;
            })
            .reflect(pod_writer);
        tokio::spawn(follow("pods", pod_stream, changed.clone(), None, stop.clone()));
        let namespaces_listed = Arc::new(AtomicBool::new(false));
        let namespaces = watch_namespaces.then(|| {
            let (store, writer) = reflector::store();
            let stream = watcher(Api::<Namespace>::all(client), watcher::Config::default())
                .default_backoff()
                .modify(|n: &mut Namespace| {
                    n.spec = None;
                    n.status = None;
                    n.metadata.managed_fields = None;
                })
                .reflect(writer);
            tokio::spawn(follow("namespaces", stream, changed.clone(), Some(namespaces_listed.clone()), stop));
            store
        });
        Arc::new(KubePods { pods, namespaces, namespaces_listed, changed })
    }
}

/// Drives one reflector; every event it applied bumps `changed` so waiting ADDs look again.
async fn follow<K>(
    what: &'static str,
    stream: impl futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    changed: watch::Sender<u64>,
    listed: Option<Arc<AtomicBool>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = stop.wait_for(|s| *s) => return,
        };
        match next {
            Some(Ok(event)) => {
                if failing {
                    tracing::info!(watch = what, "watch of the Kubernetes API working again");
                    failing = false;
                }
                if matches!(event, watcher::Event::InitDone) {
                    tracing::debug!(watch = what, "listed");
                    if let Some(l) = &listed {
                        l.store(true, Ordering::SeqCst);
                    }
                }
                changed.send_modify(|g| *g += 1);
            }
            Some(Err(e)) => {
                if !failing {
                    tracing::warn!(watch = what, error = %e, "watch of the Kubernetes API failed; retrying with backoff (pool annotations come from the last list)");
                    failing = true;
                }
            }
            None => return,
        }
    }
}

fn annotations(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Annotations {
    meta.annotations.clone().unwrap_or_default().into_iter().collect()
}

impl PodAnnotations for KubePods {
    fn pod(&self, namespace: &str, name: &str) -> Option<Annotations> {
        self.pods.get(&ObjectRef::new(name).within(namespace)).map(|p| annotations(&p.metadata))
    }

    fn namespace(&self, name: &str) -> Option<Annotations> {
        let store = self.namespaces.as_ref()?;
        store.get(&ObjectRef::new(name)).map(|n| annotations(&n.metadata))
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn namespaces_pending(&self) -> bool {
        self.namespaces.is_some() && !self.namespaces_listed.load(Ordering::SeqCst)
    }
}
