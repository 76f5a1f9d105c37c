//! What deploy/rbac/ (and the IPPool webhook's deploy/ippool-webhook/rbac.yaml) grants a
//! ServiceAccount, evaluated as the apiserver's RBAC authorizer would: for comparing the requests the code makes (e.g. `allot_kube_fake` `Request`s) with
//! the roles. Include with `#[path = "support/rbac.rs"] mod rbac;`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The namespace deploy/ installs into.
pub const NAMESPACE: &str = "allot-system";

/// One granted permission: API group, resource (`plural` or `plural/subresource`), verb, and
/// the namespace it is limited to (None: cluster-wide).
pub type Grant = (String, String, String, Option<String>);

pub struct Rbac {
    grants: BTreeSet<Grant>,
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn docs() -> Vec<Value> {
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(deploy().join("rbac")).unwrap().map(|e| e.unwrap().path()).collect();
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"));
    paths.sort();
    // The IPPool webhook's roles ship with it (a kustomization of its own), not in the base.
    paths.push(deploy().join("ippool-webhook/rbac.yaml"));
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in text.split("\n---\n") {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

impl Rbac {
    /// What the ServiceAccount `allot-system/<sa>` may do, through every (Cluster)RoleBinding in
    /// those files.
    pub fn for_service_account(sa: &str) -> Rbac {
        let docs = docs();
        let role = |kind: &str, name: &str, ns: Option<&str>| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name && d["metadata"]["namespace"].as_str() == ns)
                .unwrap_or_else(|| panic!("{kind} {name} not in deploy/rbac"))
                .clone()
        };
        let mut grants = BTreeSet::new();
        for b in docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") {
            let bound = b["subjects"].as_array().into_iter().flatten().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == NAMESPACE
            });
            if !bound {
                continue;
            }
            let binding_ns = b["metadata"]["namespace"].as_str().map(String::from);
            let role_kind = b["roleRef"]["kind"].as_str().unwrap();
            let role_name = b["roleRef"]["name"].as_str().unwrap();
            let r = if role_kind == "Role" { role("Role", role_name, binding_ns.as_deref()) } else { role("ClusterRole", role_name, None) };
            // A RoleBinding grants only in its namespace, whatever the role's kind.
            let scope = if b["kind"] == "RoleBinding" { binding_ns.clone() } else { None };
            for rule in r["rules"].as_array().into_iter().flatten() {
                assert!(rule.get("resourceNames").is_none(), "resourceNames are not evaluated here");
                for g in strs(&rule["apiGroups"]) {
                    for res in strs(&rule["resources"]) {
                        for v in strs(&rule["verbs"]) {
                            grants.insert((g.clone(), res.clone(), v, scope.clone()));
                        }
                    }
                }
            }
        }
        Rbac { grants }
    }

    pub fn grants(&self) -> &BTreeSet<Grant> {
        &self.grants
    }

    /// Whether a request is allowed. `api_version` as in a request (`v1`, `allot.dev/v1`);
    /// `namespace` None for cluster-scoped objects and all-namespace lists/watches.
    pub fn allows(&self, verb: &str, api_version: &str, resource: &str, subresource: Option<&str>, namespace: Option<&str>) -> bool {
        self.grant_for(verb, api_version, resource, subresource, namespace).is_some()
    }

    /// The grant that allows a request (for "which grants are used").
    pub fn grant_for(&self, verb: &str, api_version: &str, resource: &str, subresource: Option<&str>, namespace: Option<&str>) -> Option<&Grant> {
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let res = match subresource {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_string(),
        };
        self.grants.iter().find(|(g, r, v, scope)| {
            g == group && *r == res && v == verb && (scope.is_none() || scope.as_deref() == namespace)
        })
    }
}
