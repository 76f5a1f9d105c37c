//! The typed boundary: a body becomes an AdmissionRequest (or an HTTP 400) before a validator
//! runs, and the answer carries the request's uid. Over TLS: crates/cli/tests/kkp.rs.

use std::sync::Arc;

use allot_webhook::{Routes, Validator, review};
use kube::core::admission::AdmissionResponse;
use serde_json::{Value, json};

fn body(request: Value) -> Vec<u8> {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).to_string().into_bytes()
}

fn pod_request() -> Value {
    json!({
        "uid": "u-42",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "userInfo": {"username": "me"},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}},
    })
}

#[test]
fn a_validator_gets_a_typed_request_and_its_uid_goes_back() {
    let v: Validator = Arc::new(|req| {
        assert_eq!(req.kind.kind, "Pod");
        assert_eq!(req.object.as_ref().unwrap().metadata.name.as_deref(), Some("p"));
        AdmissionResponse::from(req).deny("no pods today")
    });
    let answer = serde_json::to_value(review(&body(pod_request()), &v).unwrap()).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "u-42");
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["message"], "no pods today");
}

#[test]
fn malformed_reviews_are_400_and_reach_no_validator() {
    let v: Validator = Arc::new(|_| panic!("a validator saw a malformed review"));
    let mut missing_uid = pod_request();
    missing_uid.as_object_mut().unwrap().remove("uid");
    for (b, words) in [
        (b"".to_vec(), "not JSON"),
        (b"{\"apiVersion\":".to_vec(), "not JSON"),
        (json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": pod_request()}).to_string().into_bytes(), "v1beta1"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string().into_bytes(), "no request"),
        (body(missing_uid), "uid"),
        (body(json!("a string")), "malformed"),
    ] {
        let (status, msg) = review(&b, &v).expect_err(&String::from_utf8_lossy(&b));
        assert_eq!(status.as_u16(), 400);
        assert!(msg.contains(words), "{msg}");
    }
}

#[test]
fn routes_take_more_validators() {
    let routes = Routes::standard().validate("/validate/ippool", |req| AdmissionResponse::from(req));
    assert_eq!(routes.paths().collect::<Vec<_>>(), ["/validate/kkp-cluster", "/validate/ippool"]);
    // The same path again replaces, never duplicates.
    let routes = routes.validate("/validate/ippool", |req| AdmissionResponse::from(req).deny("x"));
    assert_eq!(routes.paths().count(), 2);
}

#[test]
fn the_kkp_validator_on_a_typed_request() {
    let cluster = |cni: &str| {
        json!({"apiVersion": "kubermatic.k8c.io/v1", "kind": "Cluster", "metadata": {"name": "c1"},
               "spec": {"cniPlugin": {"type": cni, "version": "v3.28"}, "clusterNetwork": {"proxyMode": "ipvs"}}})
    };
    let req = json!({
        "uid": "k-1",
        "kind": {"group": "kubermatic.k8c.io", "version": "v1", "kind": "Cluster"},
        "resource": {"group": "kubermatic.k8c.io", "version": "v1", "resource": "clusters"},
        "operation": "UPDATE",
        "userInfo": {"username": "me"},
        "object": cluster("cilium"),
        "oldObject": cluster("canal"),
    });
    let v: Validator = Arc::new(allot_webhook::kkp::validate_cluster);
    let answer = serde_json::to_value(review(&body(req), &v).unwrap()).unwrap();
    let r = &answer["response"];
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    assert_eq!(r["status"]["reason"], "Forbidden");
    assert_eq!(r["status"]["status"], "Failure");
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(msg.contains("[cni-type-change]") && msg.contains("unsafe-cni-migration"), "{msg}");
}

#[test]
fn readiness_is_the_first_failing_check() {
    assert_eq!(Routes::standard().not_ready(), None, "no checks: ready");
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let routes = Routes::standard().ready_when(|| Ok(())).ready_when(move || {
        if f.load(std::sync::atomic::Ordering::SeqCst) { Ok(()) } else { Err("not read yet".into()) }
    });
    assert_eq!(routes.not_ready().as_deref(), Some("not read yet"));
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(routes.not_ready(), None);
}
