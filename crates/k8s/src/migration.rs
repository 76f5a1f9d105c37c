//! `Migration` (cluster-scoped): the durable state of `allot migrate apply`. The spec is what was
//! asked (from, to, options); the status is where the run stands, with a phase per node, written
//! after every step so a killed run resumes where it stopped.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The one `Migration` object's name: a cluster has at most one migration at a time.
pub const MIGRATION_NAME: &str = "cni";

#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "allot.dev",
    version = "v1",
    kind = "Migration",
    plural = "migrations",
    shortname = "migration",
    status = "MigrationStatus",
    doc = "A CNI migration carried out by `allot migrate apply`: what was asked, and a phase per node.",
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.from"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.to"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// The CNI the cluster ran when the migration started, e.g. `canal:3.27`.
    pub from: String,
    /// The target, e.g. `cilium:1.16`.
    pub to: String,
    /// How the target is switched on: manifests applied server-side, or a KKP `Cluster` patched.
    #[serde(default)]
    pub switch: Switch,
    /// Nodes restarted together after the canary (batch 0 is always one node).
    #[serde(default = "one")]
    pub batch: u32,
    /// Re-create bare pods from their own spec (they are kept on the old CNI otherwise).
    #[serde(default)]
    pub force_bare: bool,
    /// How long one pod may take to be evicted (429 retried) or to come back Ready.
    #[serde(default = "default_pod_timeout")]
    pub pod_timeout_seconds: u64,
    /// Where the new CNI's pod addresses come from. A pod is on the new CNI when it was started
    /// after the switch and, unless the old CNI's pods already had addresses in these (a shared
    /// range, as on KKP), an address of its lies in one of these.
    pub new_pod_cidrs: Vec<String>,
    /// Change kube-proxy's mode once every pod is on the new CNI (`ipvs`, `iptables`, `ebpf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_proxy_mode: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_pod_timeout() -> u64 {
    300
}

/// How the new CNI is switched on, and how the old one comes back on rollback.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Switch {
    /// KKP: the `Cluster` object (in the seed cluster) whose `spec.cniPlugin` is patched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kkp_cluster: Option<String>,
    /// The target's manifests (multi-document YAML), applied server-side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<String>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The phase a failed run stopped in: `apply` retries from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// The target was switched on (rollback switches back only then).
    #[serde(default)]
    pub switched: bool,
    /// Objects applied from `--install`, deleted again on rollback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<ObjectRef>,
    /// During `RollingBack`: the step it is in (`KubeProxy`, `Switching`, then `Nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_step: Option<Phase>,
    /// A bare pod being re-created: its manifest is kept here before it is deleted, so a run
    /// killed between the delete and the create still re-creates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreating: Option<PendingRecreate>,
    /// kube-proxy's mode before this migration changed it (restored on rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_proxy_was: Option<String>,
    /// Whether the old CNI's objects were removed (rollback must then bring them back).
    #[serde(default)]
    pub old_removed: bool,
    /// Pods on the old CNI at the switch already had addresses in `newPodCidrs` (old and new CNI
    /// share the range): only a pod's identity tells which CNI it is on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_range: bool,
    /// Pods counted at the end: on the new CNI, and all non-host-network running pods.
    #[serde(default)]
    pub pods_on_new: u32,
    #[serde(default)]
    pub pods_total: u32,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRecreate {
    pub namespace: String,
    pub name: String,
    /// The deleted pod's uid: a pod of that name with another uid is the re-created one.
    pub uid: String,
    /// The pod's manifest (JSON), as read before the delete.
    pub manifest: String,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub batch: u32,
    #[serde(default)]
    pub phase: NodePhase,
    /// This migration cordoned the node (it was schedulable before): it uncordons it.
    #[serde(default)]
    pub cordoned: bool,
    /// Rollback restarts this node's pods on the old CNI.
    #[serde(default)]
    pub revert: bool,
    /// Pods restarted on this node so far.
    #[serde(default)]
    pub restarted: u32,
    /// Bare pods left on the old CNI (no `--force-bare`).
    #[serde(default)]
    pub kept: u32,
    /// UIDs of the node's pods when the target was switched on: these run on the old CNI. The
    /// address alone cannot tell when both CNIs hand out the same range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_pods: Vec<String>,
    /// UIDs of pods started while the target was coming up (either CNI): restarted too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub early_pods: Vec<String>,
    /// Rollback: UIDs of pods not in `oldPods` when the old CNI was back (maybe on the new CNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_pods: Vec<String>,
    /// Controllers whose pods were restarted here (`Kind namespace/name`): the node is
    /// verified only once each is fully available again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where the whole migration stands.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    Preflight,
    /// The target is switched on; waiting for its pods to be Ready on every node.
    Switching,
    /// Restarting pods node by node.
    Nodes,
    RemovingOld,
    KubeProxy,
    Done,
    RollingBack,
    RolledBack,
    Failed,
}

/// Where one node stands. During a rollback the same phases are walked again towards the old
/// CNI, ending in `RolledBack`.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodePhase {
    #[default]
    Pending,
    Cordoned,
    Draining,
    Verifying,
    Done,
    Failed,
    RolledBack,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::fmt::Display for NodePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn migration_crd_is_cluster_scoped_with_status_and_phase_enums() {
        let crd = Migration::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.kind, "Migration");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        let yaml = serde_saphyr::to_string(&crd).unwrap();
        for needle in ["RollingBack", "Verifying", "newPodCidrs", "podTimeoutSeconds"] {
            assert!(yaml.contains(needle), "{needle} missing from:\n{yaml}");
        }
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = MigrationStatus {
            phase: Phase::Nodes,
            nodes: vec![NodeStatus { name: "n1".into(), batch: 0, phase: NodePhase::Draining, cordoned: true, ..Default::default() }],
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["phase"], "Nodes");
        assert_eq!(json["nodes"][0]["phase"], "Draining");
        assert_eq!(json["podsOnNew"], 0);
        assert_eq!(serde_json::from_value::<MigrationStatus>(json).unwrap(), status);
    }
}
