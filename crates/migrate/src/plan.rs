//! What a migration will do: per node, in batches, what happens to each pod, and what is at risk.
//! The JSON form is what `allot migrate plan -o json` prints.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The CNI the cluster runs now, e.g. `canal:3.27` (detected from its DaemonSets or the KKP
    /// `Cluster`).
    pub from: String,
    /// The target, as given with `--to TYPE[:VERSION]`.
    pub to: String,
    /// Rules the migration would break; a plan with refusals is not carried out.
    pub refusals: Vec<Refusal>,
    /// Nodes in the order they are migrated: batch 0 is one canary node, the node running the
    /// migration goes last.
    pub nodes: Vec<NodePlan>,
    pub at_risk: Vec<AtRisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub rule: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub batch: u32,
    pub pods: Vec<PodAction>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAction {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub reason: String,
}

/// What happens to one pod so that it comes back on the new CNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Owned by a controller: evicted through the Eviction API (PodDisruptionBudgets respected).
    Evict,
    /// DaemonSet-owned, not host-network: deleted; its controller recreates it on the node.
    Delete,
    /// A bare pod, only with `--force-bare`: re-created from its own spec.
    Recreate,
    /// A bare pod without `--force-bare`: stays on the old CNI, reported.
    Keep,
    /// Host-network, mirror/static or finished: not touched.
    Skip,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtRisk {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}
