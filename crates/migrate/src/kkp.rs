//! The patches a migration makes to a KKP user cluster's `Cluster` object (in the seed cluster),
//! and KKP's own rules (`allot_kkp`) checked on each of them before any is sent: the plan
//! refuses what KKP's webhook would deny, so `apply` never stops half-way on a denied patch.

use allot_kkp::Denial;
use serde_json::{Value, json};

use crate::snapshot::KkpCluster;

/// KKP refuses a CNI type change (and a `proxyMode` change) without this label (any value).
pub use allot_kkp::UNSAFE_CNI_MIGRATION as MIGRATION_LABEL;

/// `TYPE[:VERSION]` into its parts; no version is `""`.
pub fn split_cni(s: &str) -> (&str, &str) {
    s.split_once(':').unwrap_or((s, ""))
}

/// First patch of a switch: the label, alone, so that it is on the object the CNI change is
/// validated against.
pub fn label_patch() -> Value {
    json!({"metadata": {"labels": {MIGRATION_LABEL: "true"}}})
}

/// Second patch of a switch: the CNI, `TYPE[:VERSION]`, the version spelled as KKP lists it.
pub fn cni_patch(cni: &str) -> Value {
    let (ty, version) = split_cni(cni);
    json!({"spec": {"cniPlugin": {"type": ty, "version": kkp_version(ty, version)}}})
}

/// KKP accepts only the exact strings of its version list: canal's carry a `v` (`v3.28`),
/// cilium's do not (`1.16.9`). allot's CNI specs drop the `v`, so it is put back here.
pub fn kkp_version(ty: &str, version: &str) -> String {
    let bare = version.strip_prefix(['v', 'V']).unwrap_or(version);
    match ty {
        "canal" if !bare.is_empty() => format!("v{bare}"),
        _ => bare.to_string(),
    }
}

/// kube-proxy's mode (KKP writes kube-proxy's configuration from the Cluster); the label goes
/// with it because KKP allows the change only with it.
pub fn proxy_mode_patch(mode: &str) -> Value {
    json!({"metadata": {"labels": {MIGRATION_LABEL: "true"}}, "spec": {"clusterNetwork": {"proxyMode": mode}}})
}

/// A JSON merge patch (RFC 7386), as the API server applies `Patch::Merge`.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// One patch the forward run sends, named for messages.
pub struct Step {
    pub what: String,
    pub patch: Value,
}

/// The patches `allot migrate apply` sends to the Cluster, in order: the label, the CNI, and
/// (with `--kube-proxy-mode`) the mode once every pod is on the new CNI.
pub fn forward_steps(to: &str, kube_proxy_mode: Option<&str>) -> Vec<Step> {
    let mut steps = vec![
        Step { what: format!("the `{MIGRATION_LABEL}` label"), patch: label_patch() },
        Step { what: format!("spec.cniPlugin {to}"), patch: cni_patch(to) },
    ];
    if let Some(mode) = kube_proxy_mode {
        steps.push(Step { what: format!("spec.clusterNetwork.proxyMode {mode}"), patch: proxy_mode_patch(mode) });
    }
    steps
}

/// Applies `steps` to `cluster` one by one and checks each update with KKP's rules, as KKP's
/// validating webhook will when the patch is sent. Returns each denial with the step it stops.
pub fn check_steps(cluster: &KkpCluster, steps: &[Step]) -> Vec<(String, Denial)> {
    let mut out = Vec::new();
    let mut old = cluster.clone();
    for step in steps {
        let mut value = serde_json::to_value(&old).expect("a Cluster serializes");
        merge(&mut value, &step.patch);
        let new: KkpCluster = match serde_json::from_value(value) {
            Ok(c) => c,
            Err(e) => {
                out.push((step.what.clone(), Denial { rule: "patch-invalid", message: format!("the patched Cluster does not read back: {e}") }));
                break;
            }
        };
        let denials = allot_kkp::validate(Some(&old), &new);
        let denied = !denials.is_empty();
        out.extend(denials.into_iter().map(|d| (step.what.clone(), d)));
        if denied {
            // KKP stores nothing of a denied patch; later steps would never be sent.
            break;
        }
        old = new;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(v: Value) -> KkpCluster {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn versions_are_spelled_as_kkp_lists_them() {
        assert_eq!(cni_patch("canal:3.27")["spec"]["cniPlugin"], json!({"type": "canal", "version": "v3.27"}));
        assert_eq!(cni_patch("canal:v3.28")["spec"]["cniPlugin"]["version"], "v3.28");
        assert_eq!(cni_patch("cilium:v1.16.9")["spec"]["cniPlugin"]["version"], "1.16.9");
        assert_eq!(cni_patch("cilium:1.16.9")["spec"]["cniPlugin"]["version"], "1.16.9");
        assert_eq!(cni_patch("cilium")["spec"]["cniPlugin"]["version"], "");
    }

    #[test]
    fn merge_follows_rfc_7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1, 2], "e": "x"});
        merge(&mut t, &json!({"a": {"b": null, "z": 3}, "d": [3], "e": {"f": 1}}));
        assert_eq!(t, json!({"a": {"c": 2, "z": 3}, "d": [3], "e": {"f": 1}}));
    }

    #[test]
    fn a_labelled_canal_to_cilium_switch_passes_every_step() {
        let c = cluster(json!({"apiVersion": "kubermatic.k8c.io/v1", "kind": "Cluster",
            "metadata": {"name": "prod", "labels": {"unsafe-cni-migration": "yes"}},
            "spec": {"cniPlugin": {"type": "canal", "version": "v3.27"}, "clusterNetwork": {"proxyMode": "ipvs", "konnectivityEnabled": true}}}));
        assert!(check_steps(&c, &forward_steps("cilium:1.16", Some("ebpf"))).is_empty());
        // KKP needs a version for the new type: a bare `--to cilium` would be denied.
        let d = check_steps(&c, &forward_steps("cilium", None));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].0.as_str(), d[0].1.rule), ("spec.cniPlugin cilium", allot_kkp::rule::CNI_VERSION_INVALID));
    }

    #[test]
    fn ebpf_without_konnectivity_is_denied_at_the_proxy_mode_step() {
        let c = cluster(json!({"apiVersion": "kubermatic.k8c.io/v1", "kind": "Cluster",
            "metadata": {"name": "prod", "labels": {"unsafe-cni-migration": "yes"}},
            "spec": {"cniPlugin": {"type": "canal", "version": "v3.27"}, "clusterNetwork": {"proxyMode": "ipvs"}}}));
        let d = check_steps(&c, &forward_steps("cilium:1.16", Some("ebpf")));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, "spec.clusterNetwork.proxyMode ebpf");
        assert_eq!(d[0].1.rule, allot_kkp::rule::PROXY_MODE_EBPF_KONNECTIVITY);
    }

    #[test]
    fn an_object_kkp_already_refuses_stops_at_the_label() {
        // An invalid proxyMode in the stored object: KKP denies every update, even the label.
        let c = cluster(json!({"apiVersion": "kubermatic.k8c.io/v1", "kind": "Cluster",
            "metadata": {"name": "prod"},
            "spec": {"cniPlugin": {"type": "canal", "version": "v3.27"}, "clusterNetwork": {"proxyMode": "userspace"}}}));
        let d = check_steps(&c, &forward_steps("cilium:1.16", None));
        assert_eq!(d.len(), 1, "stops at the first denied step: {d:?}");
        assert_eq!((d[0].0.as_str(), d[0].1.rule), ("the `unsafe-cni-migration` label", allot_kkp::rule::PROXY_MODE_INVALID));
    }
}
