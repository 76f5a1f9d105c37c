//! Which pool a pod's address of each family comes from.

use crate::cidr::Family;

pub const POOL_ANNOTATION: &str = "ipam.cilium.io/ip-pool";
pub const IPV4_POOL_ANNOTATION: &str = "ipam.cilium.io/ipv4-pool";
pub const IPV6_POOL_ANNOTATION: &str = "ipam.cilium.io/ipv6-pool";

pub fn family_annotation(family: Family) -> &'static str {
    match family {
        Family::V4 => IPV4_POOL_ANNOTATION,
        Family::V6 => IPV6_POOL_ANNOTATION,
    }
}

/// Where a pool choice came from, for logs and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `"pool"` in the CNI config's ipam section.
    Pinned,
    PodAnnotation(&'static str),
    NamespaceAnnotation(&'static str),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Pinned => f.write_str("the CNI config's ipam.pool"),
            Source::PodAnnotation(k) => write!(f, "pod annotation {k}"),
            Source::NamespaceAnnotation(k) => write!(f, "namespace annotation {k}"),
            Source::Default => f.write_str("the default pool"),
        }
    }
}

/// Chooses the pool for one family: a pinned pool, then the pod's family key, then its
/// `ip-pool`, then the same two keys on the namespace, then the default pool.
pub fn select_pool<'a>(
    family: Family,
    pinned: Option<&'a str>,
    pod: impl Fn(&str) -> Option<&'a str>,
    namespace: impl Fn(&str) -> Option<&'a str>,
    default: &'a str,
) -> (&'a str, Source) {
    if let Some(p) = pinned.filter(|p| !p.is_empty()) {
        return (p, Source::Pinned);
    }
    let keys = [family_annotation(family), POOL_ANNOTATION];
    for key in keys {
        if let Some(p) = pod(key).filter(|p| !p.is_empty()) {
            return (p, Source::PodAnnotation(key));
        }
    }
    for key in keys {
        if let Some(p) = namespace(key).filter(|p| !p.is_empty()) {
            return (p, Source::NamespaceAnnotation(key));
        }
    }
    (default, Source::Default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn map(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    fn pick(
        family: Family,
        pinned: Option<&'static str>,
        pod: &[(&'static str, &'static str)],
        ns: &[(&'static str, &'static str)],
    ) -> (&'static str, Source) {
        let (pod, ns) = (map(pod), map(ns));
        select_pool(family, pinned, |k| pod.get(k).copied(), |k| ns.get(k).copied(), "default")
    }

    #[test]
    fn precedence_table() {
        use Family::*;
        type Annotations = &'static [(&'static str, &'static str)];
        let rows: &[(Family, Option<&'static str>, Annotations, Annotations, &str)] = &[
            (V4, None, &[], &[], "default"),
            (V4, None, &[(POOL_ANNOTATION, "a")], &[], "a"),
            (V4, None, &[(POOL_ANNOTATION, "a"), (IPV4_POOL_ANNOTATION, "a4")], &[], "a4"),
            (V6, None, &[(POOL_ANNOTATION, "a"), (IPV4_POOL_ANNOTATION, "a4")], &[], "a"),
            (V6, None, &[(IPV6_POOL_ANNOTATION, "a6")], &[(POOL_ANNOTATION, "n")], "a6"),
            (V4, None, &[(IPV6_POOL_ANNOTATION, "a6")], &[(POOL_ANNOTATION, "n")], "n"),
            (V4, None, &[], &[(POOL_ANNOTATION, "n"), (IPV4_POOL_ANNOTATION, "n4")], "n4"),
            (V4, None, &[(POOL_ANNOTATION, "")], &[], "default"),
            (V4, Some("pinned"), &[(POOL_ANNOTATION, "a")], &[(POOL_ANNOTATION, "n")], "pinned"),
        ];
        for (i, (family, pinned, pod, ns, want)) in rows.iter().enumerate() {
            assert_eq!(pick(*family, *pinned, pod, ns).0, *want, "row {i}");
        }
    }

    #[test]
    fn source_is_reported() {
        assert_eq!(pick(Family::V4, None, &[], &[(POOL_ANNOTATION, "n")]).1, Source::NamespaceAnnotation(POOL_ANNOTATION));
        assert_eq!(pick(Family::V4, None, &[], &[]).1, Source::Default);
    }
}
