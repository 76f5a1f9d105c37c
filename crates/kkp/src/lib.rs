//! allot-kkp: Kubermatic's rules for changing a user cluster's CNI, kube-proxy mode and network
//! settings (`kubermatic.k8c.io/v1` `Cluster`), as one pure function. The admission webhook
//! (`allot webhook`) and the offline check (`allot kkp validate`) both call [`validate`].
//!
//! No I/O, no async: objects come in parsed, denials go out as data.

pub mod cluster;
pub mod rules;

pub use cluster::{Cluster, ClusterNetwork, ClusterSpec, CniPlugin, Metadata, NetworkRanges, ParseError};
pub use rules::{Denial, PROXY_MODES, UNSAFE_CNI_MIGRATION, UNSAFE_CNI_UPGRADE, Version, rule, validate};

/// One message listing every denial, for an admission response's `status.message`.
pub fn summary(denials: &[Denial]) -> String {
    let mut s = format!("denied by allot's KKP rules ({} reason{}):", denials.len(), if denials.len() == 1 { "" } else { "s" });
    for d in denials {
        s.push_str(&format!(" {d};"));
    }
    s.pop();
    s
}
