//! allot on Kubernetes: the `allot.dev/v1` custom resources, the CRDs generated from them, and
//! the kube-rs client setup. Every API call in allot goes through kube-rs.
//!
//! Objects:
//! - `IPPool` (cluster-scoped): the spec of Cilium's `CiliumPodIPPool`, unchanged.
//! - `IPBlock` (cluster-scoped): one per granted block, named from pool and CIDR (`block_name`),
//!   so a grant is a create that fails with 409 when another node holds the block.
//! - `AllotNode` (cluster-scoped): a node in `CiliumNode` shape (`spec.ipam.pools.requested` and
//!   `allocated`, `status.ipam.operator-status`).

pub mod migration;

use std::path::Path;

pub mod admission;
mod mirror;
mod store;
pub use mirror::{DELETING, RELEASED_UNTIL};
pub use store::{AliveLease, KubeStore, KubeStoreOptions, LIVENESS_LABEL, POOL_LOCK, cilium_pool_resource, default_namespace};

use ipnet::IpNet;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "allot.dev";
pub const VERSION: &str = "v1";
/// The label on an `IPBlock` naming its pool, and the one naming its node (for list selectors).
pub const POOL_LABEL: &str = "allot.dev/pool";
pub const NODE_LABEL: &str = "allot.dev/node";

/// IPv4 CIDR text, checked by schema validators that do not run CEL (kubectl's client-side
/// validation, kubernetes-validate); the apiserver's CEL rules check it exactly.
const IPV4_CIDR_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])$";
const IPV6_CIDR_PATTERN: &str = r"^[0-9a-fA-F:]*:[0-9a-fA-F:.]*/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$";

/// A pool: exactly the spec of Cilium's `CiliumPodIPPool` (cilium.io/v2alpha1), so the same YAML
/// applies with only `apiVersion` and `kind` changed.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "allot.dev",
    version = "v1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ippool",
    doc = "A pool of pod addresses, in the shape of Cilium's CiliumPodIPPool.",
    printcolumn = r#"{"name":"IPv4","type":"string","jsonPath":".spec.ipv4.cidrs"}"#,
    printcolumn = r#"{"name":"IPv6","type":"string","jsonPath":".spec.ipv6.cidrs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.ipv4) || has(self.ipv6)").message("a pool needs ipv4, ipv6 or both"))]
pub struct IPPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<IPv4PoolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IPv6PoolSpec>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPv4PoolSpec {
    /// The CIDRs blocks are cut from.
    // Bounded lengths keep the apiserver's estimated CEL cost of the rule below its limit.
    #[schemars(length(min = 1, max = 128), inner(length(max = 18), regex(pattern = IPV4_CIDR_PATTERN)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c).ip().family() == 4 && cidr(c) == cidr(c).masked())").message("each cidr must be an IPv4 CIDR with no host bits set"))]
    pub cidrs: Vec<String>,
    /// The prefix length of the blocks nodes are given; it cannot change once set.
    #[schemars(range(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("maskSize is immutable: create a new pool instead"))]
    pub mask_size: u8,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPv6PoolSpec {
    /// The CIDRs blocks are cut from.
    #[schemars(length(min = 1, max = 128), inner(length(max = 49), regex(pattern = IPV6_CIDR_PATTERN)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) && cidr(c).ip().family() == 6 && cidr(c) == cidr(c).masked())").message("each cidr must be an IPv6 CIDR with no host bits set"))]
    pub cidrs: Vec<String>,
    /// The prefix length of the blocks nodes are given; it cannot change once set.
    #[schemars(range(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("maskSize is immutable: create a new pool instead"))]
    pub mask_size: u8,
}

/// One block of a pool held by one node. The name is `block_name(pool, cidr)`: a second grant of
/// the same block is a create of an existing name, refused with 409 by the apiserver.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "allot.dev",
    version = "v1",
    kind = "IPBlock",
    plural = "ipblocks",
    shortname = "ipblock",
    doc = "A block of a pool, granted to one node. Created only by the operator; deleted when the node gives it back or goes away.",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a block's pool, cidr and node never change: delete it and grant a new one"))]
pub struct IPBlockSpec {
    // Object-name and CIDR lengths: bounded so the CEL rule's estimated cost stays small.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    #[schemars(length(min = 1, max = 49))]
    pub cidr: String,
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
}

/// A node's IPAM state in the shape of Cilium's `CiliumNode`: what it requests per pool (written
/// by its agent) and the blocks it holds (a copy of its `IPBlock`s, kept by the operator).
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "allot.dev",
    version = "v1",
    kind = "AllotNode",
    plural = "allotnodes",
    shortname = "anode",
    status = "AllotNodeStatus",
    doc = "A node's pool requests and held blocks, in the shape of Cilium's CiliumNode.",
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.ipam.operator-status.error"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct AllotNodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub ipam: NodeIpam,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub ip: String,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeIpam {
    #[serde(default)]
    pub pools: NodePools,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodePools {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requested: Vec<PoolRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocated: Vec<PoolAllocation>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolRequest {
    pub pool: String,
    pub needed: Needed,
}

#[derive(KubeSchema, Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Needed {
    #[serde(rename = "ipv4-addrs", default, skip_serializing_if = "is_zero")]
    pub ipv4_addrs: u64,
    #[serde(rename = "ipv6-addrs", default, skip_serializing_if = "is_zero")]
    pub ipv6_addrs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolAllocation {
    pub pool: String,
    pub cidrs: Vec<String>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllotNodeStatus {
    #[serde(default)]
    pub ipam: NodeIpamStatus,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeIpamStatus {
    #[serde(rename = "operator-status", default)]
    pub operator_status: OperatorStatus,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OperatorStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every CRD allot installs, in the order `allot crds` prints them, with schemars' Rust integer
/// formats (`uint8`, `uint64`) replaced by the ones Kubernetes knows (`int32`, `int64`).
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    [IPPool::crd(), IPBlock::crd(), AllotNode::crd(), migration::Migration::crd()]
        .into_iter()
        .map(|crd| {
            let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
            tidy_schema(&mut v);
            serde_json::from_value(v).expect("a tidied CRD deserializes")
        })
        .collect()
}

/// The CRDs as multi-document YAML: what `allot crds` prints and `deploy/crds/` holds. Bounds are
/// written as integers (`maximum: 32`, not the `32.0` of the f64 fields).
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
        tidy_schema(&mut v);
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&v).expect("a CRD serializes"));
    }
    out
}

/// Rewrites, anywhere in a CRD as JSON: integer formats Kubernetes does not know, and whole
/// `minimum`/`maximum` floats as integers.
fn tidy_schema(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(f)) = map.get("format") {
                let known = match f.as_str() {
                    "int8" | "int16" | "uint8" | "uint16" => Some("int32"),
                    "uint32" | "uint64" => Some("int64"),
                    _ => None,
                };
                if let Some(k) = known {
                    map.insert("format".into(), k.into());
                }
            }
            for key in ["minimum", "maximum"] {
                if let Some(n) = map.get(key).and_then(|n| n.as_f64()).filter(|n| n.fract() == 0.0 && n.abs() < 1e15) {
                    map.insert(key.into(), (n as i64).into());
                }
            }
            map.values_mut().for_each(tidy_schema);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(tidy_schema),
        _ => {}
    }
}

/// The `IPBlock` name of a block: the pool's name, a dot, and the CIDR with `.`, `:` and `/`
/// written as `-`. Distinct blocks get distinct names: the CIDR part has no dot, so the last
/// dot splits pool from CIDR, and canonical address text maps one to one.
pub fn block_name(pool: &str, cidr: &IpNet) -> String {
    let cidr: String = cidr.to_string().chars().map(|c| if matches!(c, '.' | ':' | '/') { '-' } else { c }).collect();
    format!("{pool}.{cidr}")
}

impl From<&allot_core::PoolSpec> for IPPoolSpec {
    fn from(spec: &allot_core::PoolSpec) -> Self {
        let cidrs = |f: &allot_core::FamilySpec| f.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        IPPoolSpec {
            ipv4: spec.ipv4.as_ref().map(|f| IPv4PoolSpec { cidrs: cidrs(f), mask_size: f.mask_size }),
            ipv6: spec.ipv6.as_ref().map(|f| IPv6PoolSpec { cidrs: cidrs(f), mask_size: f.mask_size }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidObject(pub String);

impl TryFrom<&IPPoolSpec> for allot_core::PoolSpec {
    type Error = InvalidObject;

    fn try_from(spec: &IPPoolSpec) -> Result<Self, InvalidObject> {
        fn family(cidrs: &[String], mask_size: u8) -> Result<allot_core::FamilySpec, InvalidObject> {
            let cidrs = cidrs
                .iter()
                .map(|c| c.parse::<IpNet>().map_err(|e| InvalidObject(format!("cidr {c:?}: {e}"))))
                .collect::<Result<_, _>>()?;
            Ok(allot_core::FamilySpec { cidrs, mask_size })
        }
        Ok(allot_core::PoolSpec {
            ipv4: spec.ipv4.as_ref().map(|f| family(&f.cidrs, f.mask_size)).transpose()?,
            ipv6: spec.ipv6.as_ref().map(|f| family(&f.cidrs, f.mask_size)).transpose()?,
        })
    }
}

/// A client for the cluster allot runs in: the given kubeconfig, else in-cluster config (a pod's
/// service account) when running in a pod, else `$KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, kube::Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(kube::Error::InferKubeconfig)?
        }
        None => kube::Config::infer().await.map_err(kube::Error::InferConfig)?,
    };
    kube::Client::try_from(config)
}

/// Whether this process runs in a Kubernetes pod (the kubelet sets this for every container).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

// Operator side on Kubernetes: Lease election, releasing the blocks of deleted Nodes.
pub mod lease;
pub mod node_gc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_are_distinct_and_valid_object_names() {
        let names: Vec<String> = ["10.0.0.0/24", "10.0.0.0/25", "fd00::/104", "fd00:0:0:1::/64", "1.2.3.0/24"]
            .iter()
            .map(|c| block_name("default", &c.parse().unwrap()))
            .collect();
        assert_eq!(names[0], "default.10-0-0-0-24");
        assert_eq!(names[2], "default.fd00---104");
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        for n in &names {
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'), "{n}");
        }
    }

    #[test]
    fn the_seed_pool_spec_round_trips_through_the_crd_type() {
        let core: allot_core::PoolSpec = serde_json::from_str(
            r#"{"ipv4":{"cidrs":["10.20.0.0/16"],"maskSize":27},"ipv6":{"cidrs":["fd00:100::/80"],"maskSize":96}}"#,
        )
        .unwrap();
        let k8s = IPPoolSpec::from(&core);
        assert_eq!(serde_json::to_value(&k8s).unwrap(), serde_json::to_value(&core).unwrap());
        assert_eq!(allot_core::PoolSpec::try_from(&k8s).unwrap(), core);
    }

    #[test]
    fn crds_are_structural_with_bounds_and_cel_rules() {
        let yaml = crds_yaml();
        for needle in ["kind: IPPool", "kind: IPBlock", "kind: AllotNode", "maximum: 128\n", "maximum: 32\n", "minimum: 1\n", "self == oldSelf", "isCIDR", "format: int32", "format: int64"] {
            assert!(yaml.contains(needle), "{needle} missing from:\n{yaml}");
        }
        for absent in [".0\n", "format: uint"] {
            assert!(!yaml.contains(absent), "{absent:?} in:\n{yaml}");
        }
        for crd in crds() {
            let versions = &crd.spec.versions;
            assert_eq!(versions.iter().filter(|v| v.storage).count(), 1, "one storage version");
        }
    }
}
