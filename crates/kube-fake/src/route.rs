//! From an API path to (group/version, plural, namespace, name, subresource), and what the fake
//! knows about each resource: its kind, whether it is namespaced, whether it has a status
//! subresource.

/// What the fake knows about one resource (a plural of a group/version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    pub kind: String,
    pub namespaced: bool,
    /// Writes on the main resource leave `.status` alone; `/status` changes only `.status`.
    pub status: bool,
}

// (group, plural, kind, namespaced, status subresource)
const BUILTIN: &[(&str, &str, &str, bool, bool)] = &[
    ("", "pods", "Pod", true, true),
    ("", "namespaces", "Namespace", false, true),
    ("", "nodes", "Node", false, true),
    ("", "services", "Service", true, true),
    ("", "endpoints", "Endpoints", true, false),
    ("", "configmaps", "ConfigMap", true, false),
    ("", "secrets", "Secret", true, false),
    ("", "serviceaccounts", "ServiceAccount", true, false),
    ("", "events", "Event", true, false),
    ("", "persistentvolumes", "PersistentVolume", false, true),
    ("", "persistentvolumeclaims", "PersistentVolumeClaim", true, true),
    ("", "resourcequotas", "ResourceQuota", true, true),
    ("", "replicationcontrollers", "ReplicationController", true, true),
    ("apps", "deployments", "Deployment", true, true),
    ("apps", "daemonsets", "DaemonSet", true, true),
    ("apps", "statefulsets", "StatefulSet", true, true),
    ("apps", "replicasets", "ReplicaSet", true, true),
    ("apps", "controllerrevisions", "ControllerRevision", true, false),
    ("batch", "jobs", "Job", true, true),
    ("batch", "cronjobs", "CronJob", true, true),
    ("policy", "poddisruptionbudgets", "PodDisruptionBudget", true, true),
    ("coordination.k8s.io", "leases", "Lease", true, false),
    ("discovery.k8s.io", "endpointslices", "EndpointSlice", true, false),
    ("events.k8s.io", "events", "Event", true, false),
    ("networking.k8s.io", "networkpolicies", "NetworkPolicy", true, false),
    ("networking.k8s.io", "ingresses", "Ingress", true, true),
    ("rbac.authorization.k8s.io", "roles", "Role", true, false),
    ("rbac.authorization.k8s.io", "rolebindings", "RoleBinding", true, false),
    ("rbac.authorization.k8s.io", "clusterroles", "ClusterRole", false, false),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "ClusterRoleBinding", false, false),
    ("scheduling.k8s.io", "priorityclasses", "PriorityClass", false, false),
    ("storage.k8s.io", "storageclasses", "StorageClass", false, false),
    ("apiextensions.k8s.io", "customresourcedefinitions", "CustomResourceDefinition", false, true),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration", false, false),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", false, false),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies", "ValidatingAdmissionPolicy", false, true),
    (
        "admissionregistration.k8s.io",
        "validatingadmissionpolicybindings",
        "ValidatingAdmissionPolicyBinding",
        false,
        false,
    ),
    // allot's own (crates/k8s) and the migration's.
    ("allot.dev", "ippools", "IPPool", false, false),
    ("allot.dev", "ipblocks", "IPBlock", false, false),
    ("allot.dev", "allotnodes", "AllotNode", false, true),
    ("allot.dev", "migrations", "Migration", false, true),
    // What allot migrates from.
    ("cilium.io", "ciliumpodippools", "CiliumPodIPPool", false, false),
    ("cilium.io", "ciliumnodes", "CiliumNode", false, true),
    ("cilium.io", "ciliumendpoints", "CiliumEndpoint", true, true),
    ("kubermatic.k8c.io", "clusters", "Cluster", false, true),
];

pub fn builtin(group: &str, plural: &str) -> Option<ResourceInfo> {
    BUILTIN.iter().find(|(g, p, ..)| *g == group && *p == plural).map(|(_, _, kind, namespaced, status)| ResourceInfo {
        kind: kind.to_string(),
        namespaced: *namespaced,
        status: *status,
    })
}

/// The plural of a kind: the table's when known, else the apiserver's default (lowercase + "s",
/// "y" → "ies", "s"/"x"/"ch"/"sh" → "es").
pub fn plural_of(group: &str, kind: &str) -> String {
    if let Some((_, p, ..)) = BUILTIN.iter().find(|(g, _, k, ..)| *g == group && *k == kind) {
        return p.to_string();
    }
    let k = kind.to_ascii_lowercase();
    if let Some(stem) = k.strip_suffix('y').filter(|s| !s.ends_with(['a', 'e', 'i', 'o', 'u'])) {
        format!("{stem}ies")
    } else if k.ends_with('s') || k.ends_with('x') || k.ends_with("ch") || k.ends_with("sh") {
        format!("{k}es")
    } else {
        format!("{k}s")
    }
}

pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// A parsed resource path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub group: String,
    pub api_version: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

pub fn parse_path(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), format!("{g}/{v}"), rest),
        _ => return None,
    };
    // `namespaces/{ns}/{plural}/...` is namespaced; `namespaces/{name}[/status|finalize]` is the
    // Namespace object itself.
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(tail);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    if plural.is_empty() || name.as_deref() == Some("") {
        return None;
    }
    Some(Route { group, api_version, plural: plural.to_string(), namespace, name, subresource })
}

/// RFC 3339 UTC, seconds precision, as metadata.creationTimestamp is written.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(g: &str, av: &str, p: &str, ns: Option<&str>, n: Option<&str>, s: Option<&str>) -> Option<Route> {
        Some(Route {
            group: g.into(),
            api_version: av.into(),
            plural: p.into(),
            namespace: ns.map(Into::into),
            name: n.map(Into::into),
            subresource: s.map(Into::into),
        })
    }

    #[test]
    fn paths_route_like_the_apiserver() {
        assert_eq!(parse_path("/api/v1/pods"), r("", "v1", "pods", None, None, None));
        assert_eq!(parse_path("/api/v1/namespaces/d/pods"), r("", "v1", "pods", Some("d"), None, None));
        assert_eq!(
            parse_path("/api/v1/namespaces/d/pods/p/eviction"),
            r("", "v1", "pods", Some("d"), Some("p"), Some("eviction"))
        );
        assert_eq!(parse_path("/api/v1/namespaces"), r("", "v1", "namespaces", None, None, None));
        assert_eq!(parse_path("/api/v1/namespaces/d"), r("", "v1", "namespaces", None, Some("d"), None));
        assert_eq!(
            parse_path("/api/v1/namespaces/d/status"),
            r("", "v1", "namespaces", None, Some("d"), Some("status"))
        );
        assert_eq!(parse_path("/api/v1/nodes/n1/status"), r("", "v1", "nodes", None, Some("n1"), Some("status")));
        assert_eq!(
            parse_path("/apis/allot.dev/v1/ipblocks/b"),
            r("allot.dev", "allot.dev/v1", "ipblocks", None, Some("b"), None)
        );
        assert_eq!(
            parse_path("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"),
            r("coordination.k8s.io", "coordination.k8s.io/v1", "leases", Some("kube-system"), Some("l"), None)
        );
        assert_eq!(parse_path("/version"), None);
        assert_eq!(parse_path("/api/v1/pods/a/b/c"), None);
    }

    #[test]
    fn plurals_and_time() {
        assert_eq!(plural_of("", "Pod"), "pods");
        assert_eq!(plural_of("allot.dev", "IPBlock"), "ipblocks");
        assert_eq!(plural_of("x.io", "Policy"), "policies");
        assert_eq!(plural_of("x.io", "Gateway"), "gateways");
        assert_eq!(plural_of("x.io", "Ingress"), "ingresses");
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
