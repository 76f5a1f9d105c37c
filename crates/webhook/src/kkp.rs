//! `POST /validate/kkp-cluster`: KKP's rules (allot-kkp) on `kubermatic.k8c.io/v1` `Cluster`.

use allot_kkp::{Cluster, summary, validate};
use kube::core::DynamicObject;
use kube::core::response::StatusSummary;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

pub const PATH: &str = "/validate/kkp-cluster";

fn deny(req: &AdmissionRequest<DynamicObject>, code: u16, reason: &str, message: String) -> AdmissionResponse {
    let mut resp = AdmissionResponse::from(req).deny(message);
    resp.result.status = Some(StatusSummary::Failure);
    resp.result.code = code;
    resp.result.reason = reason.to_string();
    resp
}

fn cluster(obj: &DynamicObject, which: &str) -> Result<Cluster, String> {
    let value = serde_json::to_value(obj).map_err(|e| format!("{which}: {e}"))?;
    Cluster::from_value(value).map_err(|e| format!("{which}: {e}"))
}

/// Validates a Cluster create or update. A request for any other kind is refused: it means the
/// ValidatingWebhookConfiguration sends this path objects it was not written for, and letting
/// them through would look like validation that never ran.
pub fn validate_cluster(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    if req.kind.group != "kubermatic.k8c.io" || req.kind.kind != "Cluster" {
        return deny(
            req,
            400,
            "BadRequest",
            format!(
                "{PATH} validates kubermatic.k8c.io/v1 Cluster objects only, but got {}/{} {}: \
                 fix the rules of the ValidatingWebhookConfiguration that sends it here",
                req.kind.group, req.kind.version, req.kind.kind
            ),
        );
    }
    let old = match req.operation {
        Operation::Create => None,
        Operation::Update => match &req.old_object {
            Some(o) => match cluster(o, "oldObject") {
                Ok(c) => Some(c),
                Err(e) => return deny(req, 400, "BadRequest", e),
            },
            None => return deny(req, 400, "BadRequest", "an UPDATE review without oldObject: nothing to compare with".into()),
        },
        // Nothing to check on delete or connect.
        Operation::Delete | Operation::Connect => return AdmissionResponse::from(req),
    };
    let new = match &req.object {
        Some(o) => match cluster(o, "object") {
            Ok(c) => c,
            Err(e) => return deny(req, 400, "BadRequest", e),
        },
        None => return deny(req, 400, "BadRequest", format!("a {:?} review without object", req.operation)),
    };
    let denials = validate(old.as_ref(), &new);
    let name = &new.metadata.name;
    if denials.is_empty() {
        tracing::info!(uid = %req.uid, cluster = %name, op = ?req.operation, "allowed");
        return AdmissionResponse::from(req);
    }
    let rules: Vec<&str> = denials.iter().map(|d| d.rule).collect();
    tracing::info!(uid = %req.uid, cluster = %name, op = ?req.operation, ?rules, "denied");
    deny(req, 403, "Forbidden", summary(&denials))
}
