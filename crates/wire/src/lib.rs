//! Wire types: the agent's HTTP/JSON API, and the resource shapes the CLI reads and prints
//! (pools in Cilium's `CiliumPodIPPool` form, nodes in `CiliumNode` form). Data only, no logic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use allot_core::{ApplyAction, Family, FamilySpec, PoolSpec};

pub const API_VERSION: &str = "allot.dev/v1";
pub const CILIUM_API_VERSION: &str = "cilium.io/v2alpha1";
pub const CILIUM_POOL_KIND: &str = "CiliumPodIPPool";
pub const POOL_KIND: &str = "IPPool";
pub const NODE_KIND: &str = "Node";

// ---- resources ----

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A pool as written in YAML: `CiliumPodIPPool` (cilium.io/v2alpha1) or `IPPool`
/// (allot.dev/v1); the spec is the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolResource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PoolSpec,
}

/// A node's demand for one pool: what the agent writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRequest {
    pub pool: String,
    pub needed: Needed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needed {
    #[serde(rename = "ipv4-addrs", default, skip_serializing_if = "is_zero")]
    pub ipv4_addrs: u64,
    #[serde(rename = "ipv6-addrs", default, skip_serializing_if = "is_zero")]
    pub ipv6_addrs: u64,
}

impl Needed {
    pub fn get(&self, family: Family) -> u64 {
        match family {
            Family::V4 => self.ipv4_addrs,
            Family::V6 => self.ipv6_addrs,
        }
    }

    pub fn set(&mut self, family: Family, n: u64) {
        match family {
            Family::V4 => self.ipv4_addrs = n,
            Family::V6 => self.ipv6_addrs = n,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The blocks of one pool a node holds: what the operator grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAllocation {
    pub pool: String,
    pub cidrs: Vec<IpNet>,
}

/// A node in `CiliumNode` shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NodeSpec,
    pub status: NodeStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    pub ipam: NodeIpamSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub ip: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIpamSpec {
    pub pools: NodePools,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePools {
    #[serde(default)]
    pub requested: Vec<PoolRequest>,
    #[serde(default)]
    pub allocated: Vec<PoolAllocation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub ipam: NodeIpamStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIpamStatus {
    #[serde(rename = "operator-status")]
    pub operator_status: OperatorStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceResource {
    pub metadata: ObjectMeta,
}

// ---- agent API ----

/// Who holds an allocation: one container may sit on several allot networks, each with its
/// own interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub owner: Owner,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod: PodRef,
    /// `"pool"` from the CNI config's ipam section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The pod's annotations, from runtimeConfig `io.kubernetes.cri.pod-annotations`
    /// (allot-ipam sends only the ones that choose a pool).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The runtime passed the pod's annotations (the conflist declares the capability), even
    /// if none of them is sent. Absent from older plugins.
    #[serde(default, skip_serializing_if = "is_false")]
    pub annotations_passed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One address handed to a container, with the prefix of the block it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatedIp {
    pub address: IpNet,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub owner: Owner,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod: PodRef,
    pub ips: Vec<AllocatedIp>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Where the allocation came from: a CNI ADD, or adopted from another IPAM. Absent from
    /// journals and agents older than adoption (then `cni`).
    #[serde(default)]
    pub source: AllocationSource,
}

/// `cni` (an ADD through allot) or `adopted:<from>` (an address another IPAM handed out,
/// e.g. `adopted:host-local`), as one string on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum AllocationSource {
    #[default]
    Cni,
    Adopted(String),
}

impl AllocationSource {
    pub fn is_adopted(&self) -> bool {
        matches!(self, AllocationSource::Adopted(_))
    }
}

impl std::fmt::Display for AllocationSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocationSource::Cni => f.write_str("cni"),
            AllocationSource::Adopted(from) => write!(f, "adopted:{from}"),
        }
    }
}

impl From<AllocationSource> for String {
    fn from(s: AllocationSource) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for AllocationSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "cni" => Ok(AllocationSource::Cni),
            Some(("adopted", from)) if !from.is_empty() => Ok(AllocationSource::Adopted(from.to_string())),
            _ => Err(format!("allocation source {s:?}: expected \"cni\" or \"adopted:<ipam>\"")),
        }
    }
}

/// `allot adopt host-local DIR`: import the reference host-local plugin's allocations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptHostLocalRequest {
    /// host-local's network directory, `/var/lib/cni/networks/<network>`.
    pub dir: String,
    /// The pool the addresses must lie in (default: whichever pool holds each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Only tell what would be adopted.
    #[serde(default)]
    pub dry_run: bool,
}

/// `allot adopt pod-cidr CIDR --pool NAME`: hold a node's old pod CIDR as blocks of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptPodCidrRequest {
    pub cidr: IpNet,
    pub pool: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Stop holding the CIDR's blocks for adoption (they are released once empty).
    #[serde(default)]
    pub release: bool,
}

/// What an adoption did (or, dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptResponse {
    /// Allocations created now.
    pub adopted: Vec<Allocation>,
    /// Owners already adopted with the same addresses: nothing changed for them.
    pub unchanged: Vec<Owner>,
    /// Blocks claimed for this node now (pool, CIDR).
    pub claimed: Vec<PoolAllocation>,
    /// Blocks this node already held.
    pub held: Vec<PoolAllocation>,
    /// Adopted allocations released because their host-local file is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<Owner>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRequest {
    pub owner: Owner,
}

/// GC: within `network`, release every owner not in `valid`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub network: String,
    pub valid: Vec<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResponse {
    pub released: Vec<Owner>,
}

/// Options of the CLI's `allot gc`: release allocations whose network namespace is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepRequest {
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub pools: Vec<PoolResource>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub name: String,
    pub action: ApplyAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnotateRequest {
    /// Keys to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `allot status`: how full each pool is, cluster-wide and on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    /// Every stored allocation is restored.
    pub ready: bool,
    /// Whether this node can serve ADDs now (CNI STATUS); absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<Readiness>,
    #[serde(default)]
    pub store: StoreHealth,
    /// Direct node routes that could not be installed (cluster mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_failures: Vec<RouteFailure>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The agent's view of the cluster store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreHealth {
    pub reachable: bool,
    /// Unix seconds since the store has been unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node's blocks and the pools come from the agent's saved view, not yet from the store.
    #[serde(default)]
    pub from_saved_view: bool,
}

/// A route to another node's block that the agent could not install.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFailure {
    pub node: String,
    pub cidr: IpNet,
    pub via: IpAddr,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub pool: String,
    pub family: Family,
    /// Addresses in the pool's CIDRs (as a string: IPv6 pools exceed JSON's numbers).
    pub capacity: String,
    /// Blocks held by any node / by this node.
    pub blocks_cluster: u64,
    pub blocks_node: u64,
    /// Usable addresses in this node's blocks.
    pub node_capacity: String,
    pub in_use: u64,
    pub free: String,
    pub requested: u64,
}

/// An error from the agent. `kind` maps to an HTTP status and to a CNI code in the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or names something impossible.
    Invalid,
    NotFound,
    /// Refused: the change would break a rule (pool in use, overlap ...).
    Conflict,
    /// No room yet, or not ready: retry later.
    TryAgain,
    Internal,
}

impl ErrorKind {
    /// The CNI error code the plugin answers for this kind (spec codes 3, 7 and 11).
    pub fn cni_code(self) -> u32 {
        match self {
            ErrorKind::Invalid => 7,
            ErrorKind::NotFound => 3,
            ErrorKind::Conflict | ErrorKind::TryAgain | ErrorKind::Internal => 11,
        }
    }
}
