//! HTTP/JSON routes on the agent's socket. Handlers parse, call the node or the store, and map
//! errors to a status code with an `ApiError` body.

use std::sync::Arc;

use allot_core::Pool;
use allot_store::{Store, node_resource, pool_from_resource, pool_resource};
use allot_wire::{
    AddRequest, AdoptHostLocalRequest, AdoptPodCidrRequest, AdoptResponse, Allocation, AnnotateRequest, ApplyRequest, ApplyResult, ErrorKind, GcRequest, GcResponse,
    NamespaceResource, NodeResource, ObjectMeta, OwnerRequest, PoolResource, Status, SweepRequest,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::{AgentError, Node};

type Shared<S> = State<Arc<Node<S>>>;
type ApiResult<T> = Result<Json<T>, AgentError>;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let body = self.to_api();
        let status = match body.kind {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TryAgain => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(body)).into_response()
    }
}

pub fn router<S: Store>(node: Arc<Node<S>>) -> Router {
    Router::new()
        .route("/v1/cni/add", post(cni_add::<S>))
        .route("/v1/cni/del", post(cni_del::<S>))
        .route("/v1/cni/check", post(cni_check::<S>))
        .route("/v1/cni/gc", post(cni_gc::<S>))
        .route("/v1/status", get(status::<S>))
        .route("/v1/allocations", get(allocations::<S>))
        .route("/v1/gc", post(sweep::<S>))
        .route("/v1/adopt/host-local", post(adopt_host_local::<S>))
        .route("/v1/adopt/pod-cidr", post(adopt_pod_cidr::<S>))
        .route("/v1/pools", get(pools::<S>).post(apply_pools::<S>))
        .route("/v1/pools/{name}", get(pool::<S>).delete(delete_pool::<S>))
        .route("/v1/nodes", get(nodes::<S>))
        .route("/v1/nodes/{name}", get(get_node::<S>).delete(delete_node::<S>))
        .route("/v1/namespaces", get(namespaces::<S>))
        .route("/v1/namespaces/{name}/annotations", post(annotate::<S>))
        .with_state(node)
}

async fn cni_add<S: Store>(State(n): Shared<S>, Json(req): Json<AddRequest>) -> ApiResult<Allocation> {
    let owner = req.owner.clone();
    let started = std::time::Instant::now();
    let result = n.add(req).await;
    crate::metrics::add(started, &result);
    match result {
        Ok(a) => {
            tracing::info!(%owner, ips = ?a.ips.iter().map(|i| i.address).collect::<Vec<_>>(), "add");
            Ok(Json(a))
        }
        Err(e) => {
            tracing::warn!(%owner, error = %e, "add failed");
            Err(e)
        }
    }
}

/// Logged as ADD is: info for a release, warn for a failure (debug when nothing was held).
async fn cni_del<S: Store>(State(n): Shared<S>, Json(req): Json<OwnerRequest>) -> ApiResult<Option<Allocation>> {
    let result = n.del(&req.owner).await;
    crate::metrics::cni("DEL", &result);
    match result {
        Ok(Some(a)) => {
            tracing::info!(owner = %req.owner, released = ?a.ips.iter().map(|i| i.address).collect::<Vec<_>>(), "del");
            Ok(Json(Some(a)))
        }
        Ok(None) => {
            tracing::debug!(owner = %req.owner, "del: nothing held");
            Ok(Json(None))
        }
        Err(e) => {
            tracing::warn!(owner = %req.owner, error = %e, "del failed");
            Err(e)
        }
    }
}

async fn cni_check<S: Store>(State(n): Shared<S>, Json(req): Json<OwnerRequest>) -> ApiResult<Allocation> {
    let result = n.check(&req.owner).map(Json).ok_or_else(|| AgentError::NotFound(format!("no allocation for {}", req.owner)));
    crate::metrics::cni("CHECK", &result);
    result
}

async fn cni_gc<S: Store>(State(n): Shared<S>, Json(req): Json<GcRequest>) -> ApiResult<GcResponse> {
    let result = n.gc(&req.network, &req.valid).await.map(Json);
    crate::metrics::cni("GC", &result);
    result
}

async fn status<S: Store>(State(n): Shared<S>) -> ApiResult<Status> {
    Ok(Json(n.status()))
}

async fn allocations<S: Store>(State(n): Shared<S>) -> ApiResult<Vec<Allocation>> {
    Ok(Json(n.allocations()))
}

async fn sweep<S: Store>(State(n): Shared<S>, Json(req): Json<SweepRequest>) -> ApiResult<GcResponse> {
    n.sweep(req.dry_run).await.map(Json)
}

async fn adopt_host_local<S: Store>(State(n): Shared<S>, Json(req): Json<AdoptHostLocalRequest>) -> ApiResult<AdoptResponse> {
    n.adopt_host_local(&req).await.map(Json).inspect_err(|e| tracing::warn!(dir = %req.dir, error = %e, "adoption refused"))
}

async fn adopt_pod_cidr<S: Store>(State(n): Shared<S>, Json(req): Json<AdoptPodCidrRequest>) -> ApiResult<AdoptResponse> {
    n.adopt_pod_cidr(&req).await.map(Json).inspect_err(|e| tracing::warn!(cidr = %req.cidr, error = %e, "pod CIDR adoption refused"))
}

async fn pools<S: Store>(State(n): Shared<S>) -> ApiResult<Vec<PoolResource>> {
    Ok(Json(n.store.pools().await?.into_iter().map(pool_resource).collect()))
}

async fn pool<S: Store>(State(n): Shared<S>, Path(name): Path<String>) -> ApiResult<PoolResource> {
    n.store
        .pools()
        .await?
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| Json(pool_resource(p)))
        .ok_or_else(|| AgentError::NotFound(format!("pool {name:?} not found")))
}

async fn apply_pools<S: Store>(State(n): Shared<S>, Json(req): Json<ApplyRequest>) -> ApiResult<Vec<ApplyResult>> {
    let pools: Vec<Pool> = req.pools.into_iter().map(pool_from_resource).collect();
    let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    let actions = n.store.apply_pools(pools).await?;
    Ok(Json(names.into_iter().zip(actions).map(|(name, action)| ApplyResult { name, action }).collect()))
}

async fn delete_pool<S: Store>(State(n): Shared<S>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    n.store.delete_pool(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn nodes<S: Store>(State(n): Shared<S>) -> ApiResult<Vec<NodeResource>> {
    let grants = n.store.grants().await?;
    Ok(Json(n.store.nodes().await?.iter().map(|r| node_resource(r, &grants)).collect()))
}

async fn get_node<S: Store>(State(n): Shared<S>, Path(name): Path<String>) -> ApiResult<NodeResource> {
    let grants = n.store.grants().await?;
    n.store
        .nodes()
        .await?
        .iter()
        .find(|r| r.name == name)
        .map(|r| Json(node_resource(r, &grants)))
        .ok_or_else(|| AgentError::NotFound(format!("node {name:?} not found")))
}

async fn delete_node<S: Store>(State(n): Shared<S>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    let released = n.store.delete_node(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name, "releasedBlocks": released.len() })))
}

async fn namespaces<S: Store>(State(n): Shared<S>) -> ApiResult<Vec<NamespaceResource>> {
    Ok(Json(
        n.store
            .namespaces()
            .await?
            .into_iter()
            .map(|(name, annotations)| NamespaceResource { metadata: ObjectMeta { name, annotations } })
            .collect(),
    ))
}

async fn annotate<S: Store>(
    State(n): Shared<S>,
    Path(name): Path<String>,
    Json(req): Json<AnnotateRequest>,
) -> ApiResult<NamespaceResource> {
    let annotations = n.store.annotate_namespace(&name, req.set, req.remove).await?;
    Ok(Json(NamespaceResource { metadata: ObjectMeta { name, annotations } }))
}
