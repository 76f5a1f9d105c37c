//! KKP's rules for a Cluster's CNI and network settings (the ones of kubermatic's
//! `pkg/validation/cluster.go` that guard a CNI migration), as one pure function.

use std::fmt;

use serde::Serialize;

use crate::cluster::{Cluster, CniPlugin};

/// Allows a change of `spec.cniPlugin.type` (then to any version) and of `proxyMode`.
pub const UNSAFE_CNI_MIGRATION: &str = "unsafe-cni-migration";
/// Allows a CNI version change of the major, or of more than one minor.
pub const UNSAFE_CNI_UPGRADE: &str = "unsafe-cni-upgrade";

/// The kube-proxy modes KKP accepts. `nftables` came with KKP 2.27; refusing it would block
/// every later update of a cluster that uses it.
pub const PROXY_MODES: [&str; 4] = ["ipvs", "iptables", "ebpf", "nftables"];

/// Why a Cluster (or a change to it) is refused. `rule` is a stable name, `message` says what
/// is wrong and, where a label allows it, which one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denial {
    pub rule: &'static str,
    pub message: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.rule, self.message)
    }
}

/// The rule names, one per check.
pub mod rule {
    pub const CNI_TYPE_CHANGE: &str = "cni-type-change";
    pub const CNI_VERSION_CHANGE: &str = "cni-version-change";
    pub const CNI_VERSION_INVALID: &str = "cni-version-invalid";
    pub const CNI_PLUGIN_REMOVED: &str = "cni-plugin-removed";
    pub const PROXY_MODE_INVALID: &str = "proxy-mode-invalid";
    pub const PROXY_MODE_EBPF_CNI: &str = "proxy-mode-ebpf-cni";
    pub const PROXY_MODE_EBPF_KONNECTIVITY: &str = "proxy-mode-ebpf-konnectivity";
    pub const PROXY_MODE_CHANGE: &str = "proxy-mode-change";
    pub const IP_FAMILY_IMMUTABLE: &str = "ip-family-immutable";
    pub const PODS_CIDR_IMMUTABLE: &str = "pods-cidr-immutable";
    pub const SERVICES_CIDR_IMMUTABLE: &str = "services-cidr-immutable";
    pub const DNS_DOMAIN_IMMUTABLE: &str = "dns-domain-immutable";
    pub const NODE_LOCAL_DNS_CACHE_IMMUTABLE: &str = "node-local-dns-cache-immutable";
    pub const KONNECTIVITY_DISABLE: &str = "konnectivity-disable";
}

/// A CNI version, read as leniently as KKP does (Masterminds semver): an optional `v`, one to
/// three numbers, an optional `-pre`/`+build` suffix (ignored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(text: &str) -> Result<Version, String> {
        let t = text.trim();
        let t = t.strip_prefix(['v', 'V']).unwrap_or(t);
        let core = t.split(['-', '+']).next().unwrap_or_default();
        let parts: Vec<&str> = core.split('.').collect();
        if core.is_empty() || parts.len() > 3 {
            return Err(format!("{text:?} is not a version: write MAJOR[.MINOR[.PATCH]], e.g. v1.16.3, 1.16 or 3.28"));
        }
        let mut n = [0u64; 3];
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{text:?} is not a version: {p:?} is not a number (write MAJOR[.MINOR[.PATCH]], e.g. v1.16.3, 1.16 or 3.28)"));
            }
            n[i] = p.parse().map_err(|_| format!("{text:?} is not a version: {p:?} is too large"))?;
        }
        Ok(Version { major: n[0], minor: n[1], patch: n[2] })
    }
}

fn set(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

fn shown(s: Option<&str>) -> String {
    s.map_or_else(|| "unset".to_string(), |s| format!("{s:?}"))
}

/// Checks a create (`old` = None) or an update of a Cluster. Returns every denial, empty when
/// the change is allowed. Labels are read from `new`, as KKP does: the label must be on the
/// object as it will be stored.
pub fn validate(old: Option<&Cluster>, new: &Cluster) -> Vec<Denial> {
    let mut out = Vec::new();
    network_config(new, &mut out);
    match old {
        None => {
            if let Some(cni) = &new.spec.cni_plugin
                && !cni.version.is_empty()
                && let Err(e) = Version::parse(&cni.version)
            {
                out.push(Denial { rule: rule::CNI_VERSION_INVALID, message: format!("spec.cniPlugin.version: {e}") });
            }
        }
        Some(old) => {
            cni_update(old.spec.cni_plugin.as_ref(), new.spec.cni_plugin.as_ref(), new, &mut out);
            network_update(old, new, &mut out);
        }
    }
    out
}

/// The rules on the new object alone (create and update).
fn network_config(c: &Cluster, out: &mut Vec<Denial>) {
    let n = &c.spec.cluster_network;
    let Some(mode) = set(&n.proxy_mode) else {
        // Unset: KKP's defaulting webhook fills it (ipvs) before its validation runs.
        return;
    };
    if !PROXY_MODES.contains(&mode) {
        out.push(Denial {
            rule: rule::PROXY_MODE_INVALID,
            message: format!("spec.clusterNetwork.proxyMode {mode:?} is not supported: use one of {}", PROXY_MODES.join(", ")),
        });
    }
    if mode == "ebpf" {
        let cni = c.spec.cni_plugin.as_ref().map(|p| p.kind.as_str()).filter(|t| !t.is_empty());
        if cni.is_none_or(|t| t == "canal") {
            out.push(Denial {
                rule: rule::PROXY_MODE_EBPF_CNI,
                message: format!(
                    "spec.clusterNetwork.proxyMode ebpf is not valid with CNI {}: ebpf needs a CNI that replaces kube-proxy (cilium); \
                     use ipvs or iptables, or change spec.cniPlugin.type (label {UNSAFE_CNI_MIGRATION})",
                    shown(cni)
                ),
            });
        }
        if n.konnectivity_enabled != Some(true) {
            out.push(Denial {
                rule: rule::PROXY_MODE_EBPF_KONNECTIVITY,
                message: "spec.clusterNetwork.proxyMode ebpf can be used only when Konnectivity is enabled: \
                          set spec.clusterNetwork.konnectivityEnabled: true"
                    .to_string(),
            });
        }
    }
}

fn cni_update(old: Option<&CniPlugin>, new: Option<&CniPlugin>, c: &Cluster, out: &mut Vec<Denial>) {
    let (old, new) = match (old, new) {
        // Older clusters have no CNI settings; setting them later is how KKP fills them in.
        (None, _) => {
            if let Some(v) = new.map(|p| p.version.as_str()).filter(|v| !v.is_empty())
                && let Err(e) = Version::parse(v)
            {
                out.push(Denial { rule: rule::CNI_VERSION_INVALID, message: format!("spec.cniPlugin.version: {e}") });
            }
            return;
        }
        (Some(old), None) => {
            out.push(Denial {
                rule: rule::CNI_PLUGIN_REMOVED,
                message: format!(
                    "spec.cniPlugin cannot be removed once set (it is {} {}); no label allows this: \
                     to change the CNI, set another type with the label {UNSAFE_CNI_MIGRATION}",
                    old.kind, old.version
                ),
            });
            return;
        }
        (Some(o), Some(n)) => (o, n),
    };
    if old.kind != new.kind {
        if c.has_label(UNSAFE_CNI_MIGRATION) {
            // A migration may go to any version of the new type; it must still be a version.
            if new.version != old.version
                && let Err(e) = Version::parse(&new.version)
            {
                out.push(Denial { rule: rule::CNI_VERSION_INVALID, message: format!("spec.cniPlugin.version: {e}") });
            }
        } else {
            out.push(Denial {
                rule: rule::CNI_TYPE_CHANGE,
                message: format!(
                    "spec.cniPlugin.type cannot change from {:?} to {:?} unless the Cluster has the label {UNSAFE_CNI_MIGRATION} \
                     (any value): `kubectl label cluster {} {UNSAFE_CNI_MIGRATION}=true`",
                    old.kind,
                    new.kind,
                    name(c)
                ),
            });
        }
        return;
    }
    if old.version == new.version {
        return;
    }
    let (ov, nv) = match (Version::parse(&old.version), Version::parse(&new.version)) {
        (Ok(o), Ok(n)) => (o, n),
        (o, n) => {
            for (which, r) in [("old", o), ("new", n)] {
                if let Err(e) = r {
                    out.push(Denial {
                        rule: rule::CNI_VERSION_INVALID,
                        message: format!("spec.cniPlugin.version ({which}): {e}"),
                    });
                }
            }
            return;
        }
    };
    // KKP: patch changes are free, one minor up or down is free; a major change or a jump of
    // more minors (either way) needs the upgrade label.
    let big = ov.major != nv.major || ov.minor.abs_diff(nv.minor) > 1;
    if big && !c.has_label(UNSAFE_CNI_UPGRADE) {
        let dir = if nv < ov { "downgrade" } else { "upgrade" };
        out.push(Denial {
            rule: rule::CNI_VERSION_CHANGE,
            message: format!(
                "spec.cniPlugin.version: cannot {dir} {} from {} to {}: only one minor version step at a time is allowed \
                 unless the Cluster has the label {UNSAFE_CNI_UPGRADE} (any value): `kubectl label cluster {} {UNSAFE_CNI_UPGRADE}=true`",
                new.kind,
                old.version,
                new.version,
                name(c)
            ),
        });
    }
}

fn name(c: &Cluster) -> &str {
    if c.metadata.name.is_empty() { "NAME" } else { &c.metadata.name }
}

fn immutable(out: &mut Vec<Denial>, rule: &'static str, field: &str, old: String, new: String) {
    out.push(Denial {
        rule,
        message: format!("{field} is immutable once set (was {old}, now {new}); no label allows this: create a new cluster instead"),
    });
}

fn network_update(old: &Cluster, new: &Cluster, out: &mut Vec<Denial>) {
    let (o, n) = (&old.spec.cluster_network, &new.spec.cluster_network);
    if let Some(of) = set(&o.ip_family)
        && set(&n.ip_family) != Some(of)
    {
        immutable(out, rule::IP_FAMILY_IMMUTABLE, "spec.clusterNetwork.ipFamily", shown(Some(of)), shown(set(&n.ip_family)));
    }
    for (r, field, ob, nb) in [
        (rule::PODS_CIDR_IMMUTABLE, "spec.clusterNetwork.pods.cidrBlocks", &o.pods.cidr_blocks, &n.pods.cidr_blocks),
        (rule::SERVICES_CIDR_IMMUTABLE, "spec.clusterNetwork.services.cidrBlocks", &o.services.cidr_blocks, &n.services.cidr_blocks),
    ] {
        if !ob.is_empty() && ob != nb {
            immutable(out, r, field, format!("{ob:?}"), format!("{nb:?}"));
        }
    }
    if let Some(om) = set(&o.proxy_mode)
        && set(&n.proxy_mode) != Some(om)
        && !new.has_label(UNSAFE_CNI_MIGRATION)
    {
        out.push(Denial {
            rule: rule::PROXY_MODE_CHANGE,
            message: format!(
                "spec.clusterNetwork.proxyMode cannot change from {} to {} unless the Cluster has the label {UNSAFE_CNI_MIGRATION} \
                 (any value): `kubectl label cluster {} {UNSAFE_CNI_MIGRATION}=true`",
                shown(Some(om)),
                shown(set(&n.proxy_mode)),
                name(new)
            ),
        });
    }
    if let Some(od) = set(&o.dns_domain)
        && set(&n.dns_domain) != Some(od)
    {
        immutable(out, rule::DNS_DOMAIN_IMMUTABLE, "spec.clusterNetwork.dnsDomain", shown(Some(od)), shown(set(&n.dns_domain)));
    }
    if let Some(ol) = o.node_local_dns_cache_enabled
        && n.node_local_dns_cache_enabled != Some(ol)
    {
        let show = |b: Option<bool>| b.map_or("unset".to_string(), |b| b.to_string());
        immutable(
            out,
            rule::NODE_LOCAL_DNS_CACHE_IMMUTABLE,
            "spec.clusterNetwork.nodeLocalDNSCacheEnabled",
            show(Some(ol)),
            show(n.node_local_dns_cache_enabled),
        );
    }
    if o.konnectivity_enabled == Some(true) && n.konnectivity_enabled != Some(true) {
        out.push(Denial {
            rule: rule::KONNECTIVITY_DISABLE,
            message: format!(
                "spec.clusterNetwork.konnectivityEnabled cannot be turned off once enabled (now {}); no label allows this: keep it true",
                n.konnectivity_enabled.map_or("unset".to_string(), |b| b.to_string())
            ),
        });
    }
}
