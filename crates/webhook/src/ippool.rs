//! `POST /validate/ippool`: allot's own pool rules for `IPPool` changes made with kubectl (no
//! CIDR a node holds blocks of may go, no overlap, maskSize fixed, no deleting a pool in use).
//!
//! The rules need every pool and every held block, so the webhook follows the cluster through
//! the Kubernetes store (its watch-fed mirror) into a `ClusterView`, and a review reads that
//! view: the apiserver waits on the answer, so it never waits on the API itself. The view may
//! trail the apiserver by a moment; a block granted in that window is caught by the grant's own
//! re-check (a grant its pool no longer covers is deleted again), as for the store's own writes.

use std::sync::{Arc, Mutex};

use allot_k8s::IPPool;
use allot_k8s::admission::{review_pool_change, review_pool_delete};
use allot_store::{ClusterView, Store, StoreEvent};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tokio::sync::broadcast::error::RecvError;

use crate::kkp::deny;

pub const PATH: &str = "/validate/ippool";

/// The pools and blocks reviews are checked against; None until the first read.
#[derive(Clone, Default)]
pub struct PoolView(Arc<Mutex<Option<ClusterView>>>);

impl PoolView {
    /// Follows `store` until `stop`: a snapshot, then its events (a fresh snapshot on `Resync`
    /// or when lagging, and after a failed read, once a second).
    pub async fn follow<S: Store>(&self, store: Arc<S>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let mut events = store.events();
            match store.snapshot().await {
                Ok(s) => *self.0.lock().unwrap() = Some(ClusterView::new(s, None)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading pools and blocks for IPPool reviews failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            }
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = stop.changed() => return,
                };
                match event {
                    Ok(StoreEvent::Changes(changes)) => {
                        if let Some(view) = self.0.lock().unwrap().as_mut() {
                            view.apply_all(&changes);
                        }
                    }
                    Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }

    /// For `Routes::ready_when`: not ready until the pools and blocks were read once.
    pub fn ready(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let view = self.clone();
        move || {
            if view.0.lock().unwrap().is_some() { Ok(()) } else { Err("not ready: the cluster's pools and blocks have not been read yet".into()) }
        }
    }

    /// The validator for `Routes::validate(PATH, ...)`.
    pub fn validator(&self) -> impl Fn(&AdmissionRequest<DynamicObject>) -> AdmissionResponse + Send + Sync + 'static {
        let view = self.clone();
        move |req| view.review(req)
    }

    pub fn review(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        if req.kind.group != allot_k8s::GROUP || req.kind.kind != "IPPool" {
            return deny(req, 400, "BadRequest", format!(
                "{PATH} validates {}/{} IPPool objects only, but got {}/{} {}: fix the rules of the ValidatingWebhookConfiguration",
                allot_k8s::GROUP, allot_k8s::VERSION, req.kind.group, req.kind.version, req.kind.kind
            ));
        }
        let guard = self.0.lock().unwrap();
        let Some(view) = guard.as_ref() else {
            return deny(req, 503, "ServiceUnavailable", "allot's webhook has not read the cluster's pools and blocks yet: retry in a few seconds".into());
        };
        // Held blocks only, as the store's own checks: a stricter webhook would refuse the
        // DELETE after the store had marked the pool deleting.
        let (pools, grants) = (view.pool_list(), view.held());
        drop(guard);
        let verdict = match req.operation {
            Operation::Create | Operation::Update => (|| {
                let new = ippool(req.object.as_ref(), "object")?;
                let old = match (&req.operation, req.old_object.as_ref()) {
                    (Operation::Update, Some(o)) => Some(ippool(Some(o), "oldObject")?),
                    (Operation::Update, None) => return Err("an UPDATE review without oldObject: nothing to compare with".to_string()),
                    _ => None,
                };
                review_pool_change(old.as_ref(), &new, &pools, &grants)
            })(),
            Operation::Delete => review_pool_delete(&req.name, &grants),
            Operation::Connect => Ok(()),
        };
        match verdict {
            Ok(()) => AdmissionResponse::from(req),
            Err(message) => {
                tracing::info!(uid = %req.uid, pool = %req.name, op = ?req.operation, %message, "IPPool change denied");
                deny(req, 403, "Forbidden", message)
            }
        }
    }
}

fn ippool(obj: Option<&DynamicObject>, which: &str) -> Result<IPPool, String> {
    let obj = obj.ok_or_else(|| format!("the review has no {which}"))?;
    let value = serde_json::to_value(obj).map_err(|e| format!("{which}: {e}"))?;
    serde_json::from_value(value).map_err(|e| format!("{which} is not a valid IPPool: {e}"))
}
