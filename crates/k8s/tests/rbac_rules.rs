//! deploy/rbac/ and the IPPool webhook's roles read as the apiserver's RBAC authorizer would
//! (tests/support/rbac.rs): each component may make the calls its code makes and is refused
//! others. The comparison with the requests the code actually makes on the fake API server
//! uses the same evaluator.

#[path = "support/rbac.rs"]
mod rbac;

use rbac::{NAMESPACE, Rbac};

#[test]
fn agent_role_allows_its_calls_and_nothing_else_tried_here() {
    let a = Rbac::for_service_account("allot-agent");
    for (verb, av, res, sub, ns) in [
        ("list", "v1", "pods", None, None),
        ("watch", "v1", "pods", None, None),
        ("watch", "v1", "namespaces", None, None),
        ("get", "allot.dev/v1", "ippools", None, None),
        ("delete", "allot.dev/v1", "ipblocks", None, None),
        ("create", "allot.dev/v1", "allotnodes", None, None),
        ("patch", "allot.dev/v1", "allotnodes", None, None),
        ("create", "coordination.k8s.io/v1", "leases", None, Some(NAMESPACE)),
        ("update", "coordination.k8s.io/v1", "leases", None, Some(NAMESPACE)),
    ] {
        assert!(a.allows(verb, av, res, sub, ns), "agent may not {verb} {av} {res} {sub:?} in {ns:?}");
    }
    for (verb, av, res, sub, ns) in [
        ("get", "v1", "secrets", None, Some(NAMESPACE)),
        ("create", "allot.dev/v1", "ipblocks", None, None),
        ("update", "allot.dev/v1", "ippools", None, None),
        ("patch", "allot.dev/v1", "allotnodes", Some("status"), None),
        ("update", "allot.dev/v1", "allotnodes", None, None),
        ("list", "v1", "nodes", None, None),
        ("create", "coordination.k8s.io/v1", "leases", None, Some("default")),
        ("list", "coordination.k8s.io/v1", "leases", None, None),
        ("delete", "v1", "pods", None, None),
    ] {
        assert!(!a.allows(verb, av, res, sub, ns), "agent may {verb} {av} {res} {sub:?} in {ns:?}");
    }
}

#[test]
fn operator_role_allows_its_calls_and_nothing_else_tried_here() {
    let o = Rbac::for_service_account("allot-operator");
    for (verb, av, res, sub, ns) in [
        ("create", "allot.dev/v1", "ipblocks", None, None),
        ("delete", "allot.dev/v1", "ipblocks", None, None),
        ("watch", "allot.dev/v1", "ippools", None, None),
        ("patch", "allot.dev/v1", "allotnodes", Some("status"), None),
        ("delete", "allot.dev/v1", "allotnodes", None, None),
        ("watch", "v1", "nodes", None, None),
        ("update", "coordination.k8s.io/v1", "leases", None, Some(NAMESPACE)),
        ("list", "coordination.k8s.io/v1", "leases", None, Some(NAMESPACE)),
    ] {
        assert!(o.allows(verb, av, res, sub, ns), "operator may not {verb} {av} {res} {sub:?} in {ns:?}");
    }
    for (verb, av, res, sub, ns) in [
        ("list", "v1", "secrets", None, None),
        ("list", "v1", "pods", None, None),
        ("delete", "allot.dev/v1", "ippools", None, None),
        ("create", "allot.dev/v1", "allotnodes", None, None),
        ("delete", "v1", "nodes", None, None),
        ("update", "coordination.k8s.io/v1", "leases", None, Some("kube-system")),
    ] {
        assert!(!o.allows(verb, av, res, sub, ns), "operator may {verb} {av} {res} {sub:?} in {ns:?}");
    }
}

#[test]
fn ippool_webhook_role_reads_what_the_store_follows_and_writes_nothing() {
    let w = Rbac::for_service_account("allot-ippool-webhook");
    for (verb, av, res, ns) in [
        ("list", "allot.dev/v1", "ippools", None),
        ("watch", "allot.dev/v1", "ipblocks", None),
        ("watch", "allot.dev/v1", "allotnodes", None),
        ("watch", "v1", "namespaces", None),
        ("watch", "coordination.k8s.io/v1", "leases", Some(NAMESPACE)),
    ] {
        assert!(w.allows(verb, av, res, None, ns), "webhook may not {verb} {av} {res} in {ns:?}");
    }
    for (verb, av, res, ns) in [
        ("create", "allot.dev/v1", "ippools", None),
        ("update", "allot.dev/v1", "ippools", None),
        ("delete", "allot.dev/v1", "ipblocks", None),
        ("get", "allot.dev/v1", "ippools", None),
        ("create", "coordination.k8s.io/v1", "leases", Some(NAMESPACE)),
        ("list", "coordination.k8s.io/v1", "leases", None),
        ("get", "v1", "secrets", Some(NAMESPACE)),
        ("list", "v1", "pods", None),
    ] {
        assert!(!w.allows(verb, av, res, None, ns), "webhook may {verb} {av} {res} in {ns:?}");
    }
}

/// The whole grant set, so that a change to the roles is a deliberate change here too.
#[test]
fn grants_are_exactly_the_documented_table() {
    let fmt = |sa: &str| -> Vec<String> {
        Rbac::for_service_account(sa)
            .grants()
            .iter()
            .map(|(g, r, v, ns)| format!("{g}/{r} {v}{}", ns.as_deref().map(|n| format!(" in {n}")).unwrap_or_default()))
            .collect()
    };
    // Rows of (group, resource, verbs, scope): one grant per verb, sorted.
    let table = |rows: &[(&str, &str, &str, &str)]| -> Vec<String> {
        let mut v: Vec<String> = rows.iter().flat_map(|(g, r, vs, ns)| vs.split(' ').map(move |v| format!("{g}/{r} {v}{ns}"))).collect();
        v.sort();
        v
    };
    let agent = table(&[
        ("", "namespaces", "list watch", ""),
        ("", "pods", "get list watch", ""),
        ("allot.dev", "allotnodes", "create get list patch watch", ""),
        ("allot.dev", "ipblocks", "delete get list watch", ""),
        ("allot.dev", "ippools", "get list watch", ""),
        ("coordination.k8s.io", "leases", "create delete get list update watch", " in allot-system"),
    ]);
    let operator = table(&[
        ("", "namespaces", "list watch", ""),
        ("", "nodes", "get list watch", ""),
        ("allot.dev", "allotnodes", "delete get list watch", ""),
        ("allot.dev", "allotnodes/status", "patch", ""),
        ("allot.dev", "ipblocks", "create delete get list update watch", ""),
        ("allot.dev", "ippools", "get list watch", ""),
        ("coordination.k8s.io", "leases", "create delete get list update watch", " in allot-system"),
    ]);
    let webhook = table(&[
        ("", "namespaces", "list watch", ""),
        ("allot.dev", "allotnodes", "list watch", ""),
        ("allot.dev", "ipblocks", "list watch", ""),
        ("allot.dev", "ippools", "list watch", ""),
        ("coordination.k8s.io", "leases", "list watch", " in allot-system"),
    ]);
    assert_eq!(fmt("allot-agent"), agent);
    assert_eq!(fmt("allot-operator"), operator);
    assert_eq!(fmt("allot-ippool-webhook"), webhook);
}
