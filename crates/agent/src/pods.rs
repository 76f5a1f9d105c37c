//! A source of pod and namespace annotations other than the CNI call: on Kubernetes, a watch of
//! the pods on this node and of the namespaces (`kube_pods`), for runtimes that pass no pod
//! annotations to CNI (podman, CRI-O, containerd without the `io.kubernetes.cri.pod-annotations`
//! capability). The ADD path reads only the source's cache, never the API.

use std::time::Duration;

use allot_store::Annotations;
use tokio::sync::watch;

/// A local cache of pod (and optionally namespace) annotations, kept current by a watch.
pub trait PodAnnotations: Send + Sync + 'static {
    /// The annotations of pod `namespace/name`, None when the cache has not seen that pod.
    fn pod(&self, namespace: &str, name: &str) -> Option<Annotations>;
    /// The annotations of a namespace, None when this source does not know it (or does not
    /// watch namespaces).
    fn namespace(&self, name: &str) -> Option<Annotations>;
    /// A counter that grows whenever the cache changed.
    fn changed(&self) -> watch::Receiver<u64>;
    /// Whether a namespace `namespace` does not know may still appear: namespaces are watched
    /// but not listed yet (just after start).
    fn namespaces_pending(&self) -> bool {
        false
    }
}

/// What an ADD learns from the source: the pod's annotations (None: not seen within the wait)
/// and its namespace's.
#[derive(Debug, Default, PartialEq)]
pub struct Found {
    pub pod: Option<Annotations>,
    pub namespace: Option<Annotations>,
}

/// Reads the pod (unless `need_pod` is false) and its namespace from `source`, waiting up to
/// `bound` for the watches to see them: an ADD may come before the pod's event reaches this
/// node, or just after the agent started, before the namespaces are listed.
pub async fn lookup(source: &dyn PodAnnotations, namespace: &str, name: &str, need_pod: bool, bound: Duration) -> Found {
    let deadline = tokio::time::Instant::now() + bound;
    let mut changed = source.changed();
    loop {
        // Marked seen before the read: a change after it wakes the wait below.
        changed.borrow_and_update();
        let found = Found {
            pod: if need_pod { source.pod(namespace, name) } else { None },
            namespace: source.namespace(namespace),
        };
        let complete = (!need_pod || found.pod.is_some()) && (found.namespace.is_some() || !source.namespaces_pending());
        if complete {
            return found;
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            // Timed out, or the watch ended for good: what there is.
            Ok(Err(_)) | Err(_) => return found,
        }
    }
}

/// Only the annotations that choose a pool (what allot-ipam sends when the runtime passes them).
pub fn pool_keys(annotations: &Annotations) -> Annotations {
    use allot_core::select::{IPV4_POOL_ANNOTATION, IPV6_POOL_ANNOTATION, POOL_ANNOTATION};
    annotations
        .iter()
        .filter(|(k, _)| [POOL_ANNOTATION, IPV4_POOL_ANNOTATION, IPV6_POOL_ANNOTATION].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    struct Fake {
        pods: Mutex<BTreeMap<(String, String), Annotations>>,
        tx: watch::Sender<u64>,
    }

    impl PodAnnotations for Fake {
        fn pod(&self, ns: &str, name: &str) -> Option<Annotations> {
            self.pods.lock().unwrap().get(&(ns.into(), name.into())).cloned()
        }
        fn namespace(&self, _: &str) -> Option<Annotations> {
            None
        }
        fn changed(&self) -> watch::Receiver<u64> {
            self.tx.subscribe()
        }
    }

    #[tokio::test]
    async fn waits_for_a_pod_that_appears_and_gives_up_after_the_bound() {
        let fake = std::sync::Arc::new(Fake { pods: Mutex::default(), tx: watch::channel(0).0 });
        let f = fake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.pods.lock().unwrap().insert(("ns".into(), "p".into()), [("a".into(), "b".into())].into());
            f.tx.send_modify(|g| *g += 1);
        });
        let started = std::time::Instant::now();
        let got = lookup(&*fake, "ns", "p", true, Duration::from_secs(5)).await;
        assert_eq!(got.pod, Some([("a".to_string(), "b".to_string())].into()));
        assert!(started.elapsed() < Duration::from_secs(2), "woken by the change, not the bound");
        let started = std::time::Instant::now();
        assert_eq!(lookup(&*fake, "ns", "other", true, Duration::from_millis(200)).await, Found::default());
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn only_pool_keys_are_kept() {
        let all: Annotations = [("ipam.cilium.io/ip-pool", "blue"), ("ipam.cilium.io/ipv6-pool", "v6"), ("other", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pool_keys(&all).len(), 2);
        assert!(!pool_keys(&all).contains_key("other"));
    }
}
