//! Every KKP rule, allowed and denied, with and without its label, on create and update.

use allot_kkp::{Cluster, ParseError, UNSAFE_CNI_MIGRATION, UNSAFE_CNI_UPGRADE, Version, rule, summary, validate};
use serde_json::{Value, json};

/// A Cluster with `cni` (`None`: no `spec.cniPlugin`), `labels`, and `net` merged into
/// `spec.clusterNetwork`.
fn cluster(cni: Option<(&str, &str)>, labels: &[&str], net: Value) -> Cluster {
    let mut network = json!({
        "ipFamily": "IPv4",
        "pods": {"cidrBlocks": ["172.25.0.0/16"]},
        "services": {"cidrBlocks": ["10.240.16.0/20"]},
        "dnsDomain": "cluster.local",
        "proxyMode": "ipvs",
        "nodeLocalDNSCacheEnabled": true,
        "konnectivityEnabled": true,
    });
    for (k, v) in net.as_object().unwrap() {
        if v.is_null() {
            network.as_object_mut().unwrap().remove(k);
        } else {
            network[k] = v.clone();
        }
    }
    let mut spec = json!({"clusterNetwork": network, "version": "1.32.4", "humanReadableName": "test"});
    if let Some((t, v)) = cni {
        spec["cniPlugin"] = json!({"type": t, "version": v});
    }
    let labels: serde_json::Map<String, Value> = labels.iter().map(|l| (l.to_string(), json!("true"))).collect();
    Cluster::from_value(json!({
        "apiVersion": "kubermatic.k8c.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "xyz123", "labels": labels},
        "spec": spec,
    }))
    .unwrap()
}

fn canal(v: &str) -> Option<(&'static str, String)> {
    Some(("canal", v.to_string()))
}

fn rules(old: Option<&Cluster>, new: &Cluster) -> Vec<&'static str> {
    validate(old, new).iter().map(|d| d.rule).collect()
}

struct Case {
    name: &'static str,
    old: Option<Cluster>,
    new: Cluster,
    want: &'static [&'static str],
    /// Words every denial's message must contain (the label that allows it, the field).
    says: &'static [&'static str],
}

fn c(cni: Option<(&str, String)>, labels: &[&str], net: Value) -> Cluster {
    cluster(cni.as_ref().map(|(t, v)| (*t, v.as_str())), labels, net)
}

fn cases() -> Vec<Case> {
    let none = json!({});
    let cilium = |v: &str| Some(("cilium", v.to_string()));
    let mig = &[UNSAFE_CNI_MIGRATION][..];
    let upg = &[UNSAFE_CNI_UPGRADE][..];
    vec![
        // create
        Case { name: "create: canal with ipvs", old: None, new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        Case { name: "create: no CNI settings yet", old: None, new: c(None, &[], none.clone()), want: &[], says: &[] },
        Case { name: "create: proxyMode unset (KKP defaults it)", old: None, new: c(canal("v3.28"), &[], json!({"proxyMode": null})), want: &[], says: &[] },
        Case { name: "create: iptables", old: None, new: c(canal("3.28"), &[], json!({"proxyMode": "iptables"})), want: &[], says: &[] },
        Case { name: "create: nftables (KKP 2.27+)", old: None, new: c(cilium("1.16"), &[], json!({"proxyMode": "nftables"})), want: &[], says: &[] },
        Case {
            name: "create: unknown proxyMode",
            old: None,
            new: c(canal("v3.28"), &[], json!({"proxyMode": "userspace"})),
            want: &[rule::PROXY_MODE_INVALID],
            says: &["userspace", "ipvs, iptables, ebpf"],
        },
        Case { name: "create: ebpf with cilium and konnectivity", old: None, new: c(cilium("1.16.3"), &[], json!({"proxyMode": "ebpf"})), want: &[], says: &[] },
        Case {
            name: "create: ebpf with canal",
            old: None,
            new: c(canal("v3.28"), &[], json!({"proxyMode": "ebpf"})),
            want: &[rule::PROXY_MODE_EBPF_CNI],
            says: &["\"canal\"", "cilium"],
        },
        Case {
            name: "create: ebpf without a CNI",
            old: None,
            new: c(None, &[], json!({"proxyMode": "ebpf"})),
            want: &[rule::PROXY_MODE_EBPF_CNI],
            says: &["CNI unset"],
        },
        Case {
            name: "create: ebpf with konnectivity off",
            old: None,
            new: c(cilium("1.16"), &[], json!({"proxyMode": "ebpf", "konnectivityEnabled": false})),
            want: &[rule::PROXY_MODE_EBPF_KONNECTIVITY],
            says: &["konnectivityEnabled: true"],
        },
        Case {
            name: "create: ebpf with konnectivity unset and canal: both reasons",
            old: None,
            new: c(canal("3.28"), &[], json!({"proxyMode": "ebpf", "konnectivityEnabled": null})),
            want: &[rule::PROXY_MODE_EBPF_CNI, rule::PROXY_MODE_EBPF_KONNECTIVITY],
            says: &["ebpf"],
        },
        Case {
            name: "create: unparsable CNI version",
            old: None,
            new: c(cilium("latest"), &[], none.clone()),
            want: &[rule::CNI_VERSION_INVALID],
            says: &["latest", "v1.16.3"],
        },
        // CNI type
        Case {
            name: "update: canal -> cilium without the migration label",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(cilium("1.16"), &[], none.clone()),
            want: &[rule::CNI_TYPE_CHANGE],
            says: &[UNSAFE_CNI_MIGRATION, "\"canal\"", "\"cilium\"", "kubectl label cluster xyz123"],
        },
        Case {
            name: "update: canal -> cilium with the migration label, any version",
            old: Some(c(canal("v3.21"), &[], none.clone())),
            new: c(cilium("v1.11"), mig, none.clone()),
            want: &[],
            says: &[],
        },
        Case {
            name: "update: the upgrade label does not allow a type change",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(cilium("1.16"), upg, none.clone()),
            want: &[rule::CNI_TYPE_CHANGE],
            says: &[UNSAFE_CNI_MIGRATION],
        },
        Case {
            name: "update: type change with the label to an unparsable version",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(cilium("one-sixteen"), mig, none.clone()),
            want: &[rule::CNI_VERSION_INVALID],
            says: &["one-sixteen"],
        },
        Case {
            name: "update: CNI settings removed, even with both labels",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(None, &[UNSAFE_CNI_MIGRATION, UNSAFE_CNI_UPGRADE], none.clone()),
            want: &[rule::CNI_PLUGIN_REMOVED],
            says: &["cannot be removed", UNSAFE_CNI_MIGRATION],
        },
        Case { name: "update: CNI settings filled in on an old cluster", old: Some(c(None, &[], none.clone())), new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        // CNI version
        Case { name: "update: patch change", old: Some(c(cilium("1.16.3"), &[], none.clone())), new: c(cilium("1.16.9"), &[], none.clone()), want: &[], says: &[] },
        Case { name: "update: one minor up", old: Some(c(canal("v3.27"), &[], none.clone())), new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        Case { name: "update: one minor down (KKP allows it)", old: Some(c(canal("v3.28"), &[], none.clone())), new: c(canal("v3.27"), &[], none.clone()), want: &[], says: &[] },
        Case { name: "update: same version spelled differently", old: Some(c(cilium("v1.16.0"), &[], none.clone())), new: c(cilium("1.16"), &[], none.clone()), want: &[], says: &[] },
        Case {
            name: "update: two minors up without the upgrade label",
            old: Some(c(cilium("1.14.2"), &[], none.clone())),
            new: c(cilium("1.16.3"), &[], none.clone()),
            want: &[rule::CNI_VERSION_CHANGE],
            says: &[UNSAFE_CNI_UPGRADE, "upgrade", "1.14.2", "1.16.3"],
        },
        Case { name: "update: two minors up with the upgrade label", old: Some(c(cilium("1.14"), &[], none.clone())), new: c(cilium("1.16"), upg, none.clone()), want: &[], says: &[] },
        Case {
            name: "update: the migration label does not allow a version jump of the same CNI",
            old: Some(c(cilium("1.14"), &[], none.clone())),
            new: c(cilium("1.16"), mig, none.clone()),
            want: &[rule::CNI_VERSION_CHANGE],
            says: &[UNSAFE_CNI_UPGRADE],
        },
        Case {
            name: "update: two minors down without the label",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.26"), &[], none.clone()),
            want: &[rule::CNI_VERSION_CHANGE],
            says: &["downgrade", UNSAFE_CNI_UPGRADE],
        },
        Case {
            name: "update: major change without the label",
            old: Some(c(cilium("1.16"), &[], none.clone())),
            new: c(cilium("2.0"), &[], none.clone()),
            want: &[rule::CNI_VERSION_CHANGE],
            says: &[UNSAFE_CNI_UPGRADE],
        },
        Case { name: "update: major change with the label", old: Some(c(cilium("1.16"), &[], none.clone())), new: c(cilium("2.0"), upg, none.clone()), want: &[], says: &[] },
        Case {
            name: "update: unparsable new version",
            old: Some(c(cilium("1.16"), &[], none.clone())),
            new: c(cilium("1.x"), &[], none.clone()),
            want: &[rule::CNI_VERSION_INVALID],
            says: &["\"x\" is not a number", "(new)"],
        },
        Case {
            name: "update: unparsable old version",
            old: Some(c(cilium("stable"), &[], none.clone())),
            new: c(cilium("1.16"), &[], none.clone()),
            want: &[rule::CNI_VERSION_INVALID],
            says: &["(old)", "stable"],
        },
        // proxy mode
        Case {
            name: "update: ipvs -> iptables without the migration label",
            old: Some(c(cilium("1.16"), &[], none.clone())),
            new: c(cilium("1.16"), &[], json!({"proxyMode": "iptables"})),
            want: &[rule::PROXY_MODE_CHANGE],
            says: &[UNSAFE_CNI_MIGRATION, "\"ipvs\"", "\"iptables\""],
        },
        Case { name: "update: ipvs -> iptables with the migration label", old: Some(c(cilium("1.16"), &[], none.clone())), new: c(cilium("1.16"), mig, json!({"proxyMode": "iptables"})), want: &[], says: &[] },
        Case { name: "update: ipvs -> ebpf on cilium with the label", old: Some(c(cilium("1.16"), &[], none.clone())), new: c(cilium("1.16"), mig, json!({"proxyMode": "ebpf"})), want: &[], says: &[] },
        Case {
            name: "update: ipvs -> ebpf on canal with the label",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), mig, json!({"proxyMode": "ebpf"})),
            want: &[rule::PROXY_MODE_EBPF_CNI],
            says: &["canal"],
        },
        Case { name: "update: proxyMode set for the first time", old: Some(c(canal("v3.28"), &[], json!({"proxyMode": null}))), new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        Case {
            name: "update: proxyMode changed to an unknown mode without the label: both reasons",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"proxyMode": "userspace"})),
            want: &[rule::PROXY_MODE_INVALID, rule::PROXY_MODE_CHANGE],
            says: &["userspace"],
        },
        // immutable network fields
        Case {
            name: "update: ipFamily changed",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), mig, json!({"ipFamily": "IPv4+IPv6"})),
            want: &[rule::IP_FAMILY_IMMUTABLE],
            says: &["ipFamily", "immutable", "no label"],
        },
        Case { name: "update: ipFamily set for the first time", old: Some(c(canal("v3.28"), &[], json!({"ipFamily": null}))), new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        Case {
            name: "update: pods cidrBlocks changed",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"pods": {"cidrBlocks": ["172.26.0.0/16"]}})),
            want: &[rule::PODS_CIDR_IMMUTABLE],
            says: &["pods.cidrBlocks", "172.25.0.0/16", "172.26.0.0/16"],
        },
        Case { name: "update: pods cidrBlocks set for the first time", old: Some(c(canal("v3.28"), &[], json!({"pods": {"cidrBlocks": null}}))), new: c(canal("v3.28"), &[], none.clone()), want: &[], says: &[] },
        Case {
            name: "update: services cidrBlocks grown",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"services": {"cidrBlocks": ["10.240.16.0/20", "fd00::/120"]}})),
            want: &[rule::SERVICES_CIDR_IMMUTABLE],
            says: &["services.cidrBlocks"],
        },
        Case {
            name: "update: dnsDomain changed",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"dnsDomain": "example.local"})),
            want: &[rule::DNS_DOMAIN_IMMUTABLE],
            says: &["dnsDomain", "cluster.local", "example.local"],
        },
        Case {
            name: "update: nodeLocalDNSCacheEnabled true -> false",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"nodeLocalDNSCacheEnabled": false})),
            want: &[rule::NODE_LOCAL_DNS_CACHE_IMMUTABLE],
            says: &["nodeLocalDNSCacheEnabled", "was true, now false"],
        },
        Case {
            name: "update: nodeLocalDNSCacheEnabled true -> unset",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"nodeLocalDNSCacheEnabled": null})),
            want: &[rule::NODE_LOCAL_DNS_CACHE_IMMUTABLE],
            says: &["now unset"],
        },
        Case {
            name: "update: nodeLocalDNSCacheEnabled set for the first time",
            old: Some(c(canal("v3.28"), &[], json!({"nodeLocalDNSCacheEnabled": null}))),
            new: c(canal("v3.28"), &[], json!({"nodeLocalDNSCacheEnabled": false})),
            want: &[],
            says: &[],
        },
        // Konnectivity
        Case {
            name: "update: konnectivity turned off",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), mig, json!({"konnectivityEnabled": false})),
            want: &[rule::KONNECTIVITY_DISABLE],
            says: &["konnectivityEnabled", "no label"],
        },
        Case {
            name: "update: konnectivity dropped (unset)",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(canal("v3.28"), &[], json!({"konnectivityEnabled": null})),
            want: &[rule::KONNECTIVITY_DISABLE],
            says: &["now unset"],
        },
        Case {
            name: "update: konnectivity turned on",
            old: Some(c(canal("v3.28"), &[], json!({"konnectivityEnabled": false}))),
            new: c(canal("v3.28"), &[], none.clone()),
            want: &[],
            says: &[],
        },
        // several at once
        Case {
            name: "update: everything wrong at once, every reason reported",
            old: Some(c(canal("v3.28"), &[], none.clone())),
            new: c(
                cilium("1.16"),
                &[],
                json!({"proxyMode": "ebpf", "konnectivityEnabled": false, "dnsDomain": "x.local", "ipFamily": "IPv6"}),
            ),
            want: &[
                rule::PROXY_MODE_EBPF_KONNECTIVITY,
                rule::CNI_TYPE_CHANGE,
                rule::IP_FAMILY_IMMUTABLE,
                rule::PROXY_MODE_CHANGE,
                rule::DNS_DOMAIN_IMMUTABLE,
                rule::KONNECTIVITY_DISABLE,
            ],
            says: &[],
        },
    ]
}

#[test]
fn every_rule_allowed_and_denied() {
    let mut failures = Vec::new();
    for case in cases() {
        let denials = validate(case.old.as_ref(), &case.new);
        let got: Vec<&str> = denials.iter().map(|d| d.rule).collect();
        if got != case.want {
            failures.push(format!("{}: want {:?}, got {:?}", case.name, case.want, denials));
            continue;
        }
        for d in &denials {
            for word in case.says {
                if !d.message.contains(word) {
                    failures.push(format!("{}: message {:?} lacks {word:?}", case.name, d.message));
                }
            }
            // The display form names the rule, so a reader can look it up.
            assert!(d.to_string().starts_with(&format!("[{}] ", d.rule)));
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
}

/// Every denial that a label can lift names that label; those no label lifts say so.
#[test]
fn every_denial_names_its_way_out() {
    for case in cases() {
        for d in validate(case.old.as_ref(), &case.new) {
            let names_label = d.message.contains(UNSAFE_CNI_MIGRATION) || d.message.contains(UNSAFE_CNI_UPGRADE);
            let what_to_do = d.message.contains("no label allows") || d.message.contains(": use ") || d.message.contains(": set ") || d.message.contains(": write ");
            let label_rule = [rule::CNI_TYPE_CHANGE, rule::CNI_VERSION_CHANGE, rule::PROXY_MODE_CHANGE].contains(&d.rule);
            if label_rule {
                assert!(names_label, "{}: {d}", case.name);
            }
            assert!(names_label || what_to_do || d.message.contains("(write MAJOR"), "{}: no way out in {d}", case.name);
        }
    }
}

#[test]
fn create_ignores_transition_rules() {
    // A create has nothing to compare with: a "change" of type or version cannot be refused.
    let new = cluster(Some(("cilium", "1.16")), &[], json!({"konnectivityEnabled": false}));
    assert_eq!(rules(None, &new), Vec::<&str>::new());
    // The same object as an update from canal is refused.
    let old = cluster(Some(("canal", "3.28")), &[], json!({}));
    assert_eq!(rules(Some(&old), &new), vec![rule::CNI_TYPE_CHANGE, rule::KONNECTIVITY_DISABLE]);
}

#[test]
fn label_value_does_not_matter() {
    let old = cluster(Some(("canal", "3.28")), &[], json!({}));
    let mut new = cluster(Some(("cilium", "1.16")), &[], json!({}));
    for value in ["", "false", "yes"] {
        new.metadata.labels.insert(UNSAFE_CNI_MIGRATION.into(), value.into());
        assert!(validate(Some(&old), &new).is_empty(), "label value {value:?}");
    }
    // The label on the old object only does not count: KKP reads the new object's labels.
    let mut old_labelled = old.clone();
    old_labelled.metadata.labels.insert(UNSAFE_CNI_MIGRATION.into(), "true".into());
    let new = cluster(Some(("cilium", "1.16")), &[], json!({}));
    assert_eq!(rules(Some(&old_labelled), &new), vec![rule::CNI_TYPE_CHANGE]);
}

#[test]
fn versions_parse_leniently() {
    for (text, want) in [
        ("v1.16.3", (1, 16, 3)),
        ("1.16", (1, 16, 0)),
        ("3.28", (3, 28, 0)),
        ("V3", (3, 0, 0)),
        (" v1.11.0 ", (1, 11, 0)),
        ("1.16.0-rc.1", (1, 16, 0)),
        ("1.16.3+build5", (1, 16, 3)),
    ] {
        let v = Version::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!((v.major, v.minor, v.patch), want, "{text}");
    }
    for bad in ["", "v", "latest", "1.x", "1..2", "1.2.3.4", "-1.2", "1.2.", "99999999999999999999.1"] {
        let e = Version::parse(bad).expect_err(bad);
        assert!(e.contains("not a version") || e.contains("too large"), "{bad}: {e}");
    }
}

#[test]
fn parses_a_full_object_as_kubectl_prints_it() {
    let yaml = r#"
apiVersion: kubermatic.k8c.io/v1
kind: Cluster
metadata:
  name: xyz123
  labels:
    project-id: abc
    unsafe-cni-migration: "true"
  finalizers: [kubermatic.k8c.io/cleanup-credentials-secrets]
  annotations: null
spec:
  humanReadableName: prod
  version: 1.32.4
  cloud: {dc: hetzner-fsn1, hetzner: {network: kubermatic}}
  cniPlugin:
    type: canal
    version: v3.28
  clusterNetwork:
    ipFamily: IPv4
    pods: {cidrBlocks: ["172.25.0.0/16"]}
    services: {cidrBlocks: ["10.240.16.0/20"]}
    nodeCidrMaskSizeIPv4: 24
    dnsDomain: cluster.local
    proxyMode: ipvs
    ipvs: {strictArp: true}
    nodeLocalDNSCacheEnabled: true
    konnectivityEnabled: true
  exposeStrategy: Tunneling
status:
  phase: Running
"#;
    let c = Cluster::from_yaml(yaml).unwrap();
    assert!(c.has_label(UNSAFE_CNI_MIGRATION));
    let cni = c.spec.cni_plugin.as_ref().unwrap();
    assert_eq!((cni.kind.as_str(), cni.version.as_str()), ("canal", "v3.28"));
    let n = &c.spec.cluster_network;
    assert_eq!(n.pods.cidr_blocks, vec!["172.25.0.0/16"]);
    assert_eq!(n.services.cidr_blocks, vec!["10.240.16.0/20"]);
    assert_eq!(n.proxy_mode.as_deref(), Some("ipvs"));
    assert_eq!(n.dns_domain.as_deref(), Some("cluster.local"));
    assert_eq!(n.node_local_dns_cache_enabled, Some(true));
    assert_eq!(n.konnectivity_enabled, Some(true));
    // JSON reads the same.
    let json = serde_json::to_string(&serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(Cluster::from_yaml(&json).unwrap(), c);
}

#[test]
fn null_fields_read_as_unset() {
    let c = Cluster::from_yaml(
        "apiVersion: kubermatic.k8c.io/v1\nkind: Cluster\nmetadata: {labels: null}\nspec:\n  cniPlugin: null\n  clusterNetwork:\n    pods: {cidrBlocks: null}\n    proxyMode: null\n",
    )
    .unwrap();
    assert!(c.metadata.labels.is_empty());
    assert!(c.spec.cni_plugin.is_none());
    assert!(c.spec.cluster_network.pods.cidr_blocks.is_empty());
    assert!(validate(None, &c).is_empty());
}

#[test]
fn bad_input_is_a_clear_error() {
    let e = Cluster::from_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").unwrap_err();
    assert!(matches!(e, ParseError::WrongKind { .. }));
    let msg = e.to_string();
    assert!(msg.contains("kubermatic.k8c.io/v1") && msg.contains("\"Pod\"") && msg.contains("kubectl get cluster"), "{msg}");

    let e = Cluster::from_yaml("kind: Cluster\napiVersion: kubermatic.k8c.io/v1\nspec:\n  cniPlugin: [canal]\n").unwrap_err();
    assert!(matches!(e, ParseError::Syntax(_)), "{e}");

    let e = Cluster::from_yaml("spec: {clusterNetwork: {proxyMode: ipvs}").unwrap_err();
    assert!(e.to_string().starts_with("not a Kubermatic Cluster"), "{e}");
}

#[test]
fn summary_lists_every_reason() {
    let old = cluster(Some(("canal", "3.28")), &[], json!({}));
    let new = cluster(Some(("cilium", "1.16")), &[], json!({"dnsDomain": "x.local"}));
    let d = validate(Some(&old), &new);
    let s = summary(&d);
    assert!(s.starts_with("denied by allot's KKP rules (2 reasons):"), "{s}");
    assert!(s.contains("[cni-type-change]") && s.contains("[dns-domain-immutable]") && s.contains(UNSAFE_CNI_MIGRATION), "{s}");
}
