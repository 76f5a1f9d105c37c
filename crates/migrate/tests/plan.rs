//! `allot migrate plan` on a hand-written dump of a KKP-like cluster on Canal (the shape
//! `kubectl get nodes,pods,daemonsets,replicasets,deployments,statefulsets,jobs,
//! poddisruptionbudgets -A -o yaml` prints) and its KKP `Cluster` object: the plan a careful
//! operator would write, and every rule that refuses one.

use std::collections::BTreeMap;

use allot_migrate::plan::{Action, Plan, PlanError, PlanOptions, plan, plan_with_notes};
use allot_migrate::snapshot::ClusterSnapshot;
use serde_json::Value;

const CLUSTER: &str = include_str!("fixtures/canal-cluster.yaml");
const KKP: &str = include_str!("fixtures/kkp-cluster.yaml");

fn snapshot(with_kkp: bool) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::from_yaml(CLUSTER).expect("fixture reads");
    if with_kkp {
        s.add_yaml(KKP, "kkp-cluster.yaml").expect("KKP Cluster reads");
    }
    s
}

fn opts(to: &str) -> PlanOptions {
    PlanOptions { to: to.into(), self_node: Some("worker-a".into()), ..Default::default() }
}

fn actions(p: &Plan) -> BTreeMap<String, Action> {
    p.nodes.iter().flat_map(|n| &n.pods).map(|x| (format!("{}/{}", x.namespace, x.name), x.action)).collect()
}

fn batches(p: &Plan) -> Vec<(String, u32)> {
    p.nodes.iter().map(|n| (n.name.clone(), n.batch)).collect()
}

fn reason<'a>(p: &'a Plan, pod: &str) -> &'a str {
    let x = p.nodes.iter().flat_map(|n| &n.pods).find(|x| x.name == pod).unwrap_or_else(|| panic!("{pod} in the plan"));
    &x.reason
}

fn risks(p: &Plan) -> Vec<(String, String)> {
    p.at_risk.iter().map(|r| (format!("{}/{}", r.namespace, r.name), r.reason.clone())).collect()
}

fn rules(p: &Plan) -> Vec<&str> {
    p.refusals.iter().map(|r| r.rule.as_str()).collect()
}

#[test]
fn canal_to_cilium_plan_is_what_a_careful_operator_writes() {
    let p = plan(&snapshot(true), &opts("cilium:1.16")).unwrap();
    assert_eq!(p.from, "canal:3.27", "KKP's spec.cniPlugin names the current CNI");
    assert_eq!(p.to, "cilium:1.16");

    // Canary: worker-b has 1 pod at risk (cache-0) against worker-c's 3; workers, then the
    // control plane, then the node the migration runs on.
    assert_eq!(
        batches(&p),
        [("worker-b".into(), 0), ("worker-c".into(), 1), ("cp-1".into(), 2), ("worker-a".into(), 3)]
    );

    use Action::*;
    let want: BTreeMap<String, Action> = [
        ("default/debug-shell", Keep),
        ("default/node-debugger-worker-b-7xk2q", Skip),
        ("kube-system/calico-kube-controllers-796995f576-ktrnv", Evict),
        ("kube-system/canal-45w75", Skip),
        ("kube-system/canal-c9mts", Skip),
        ("kube-system/canal-n6pzk", Skip),
        ("kube-system/canal-r2l8f", Skip),
        ("kube-system/coredns-84968b74bb-5wbwt", Evict),
        ("kube-system/coredns-84968b74bb-qpv5d", Evict),
        ("kube-system/etcd-cp-1", Skip),
        ("kube-system/kube-apiserver-cp-1", Skip),
        ("kube-system/kube-proxy-5wbvr", Skip),
        ("kube-system/kube-proxy-h4k9d", Skip),
        ("kube-system/kube-proxy-q7x2m", Skip),
        ("kube-system/kube-proxy-zc8tn", Skip),
        ("kube-system/node-local-dns-5wbvr", Skip),
        ("kube-system/node-local-dns-h4k9d", Skip),
        ("kube-system/node-local-dns-q7x2m", Skip),
        ("kube-system/node-local-dns-zc8tn", Skip),
        ("kube-system/user-ssh-keys-agent-5wbvr", Delete),
        ("kube-system/user-ssh-keys-agent-h4k9d", Delete),
        ("kube-system/user-ssh-keys-agent-zc8tn", Delete),
        ("shop/cache-0", Evict),
        ("shop/cache-1", Evict),
        ("shop/checkout-5b6c7d8f9-tq4wn", Evict),
        ("shop/reindex-29384120-q9m4t", Evict),
        ("shop/reindex-29384120-x7k2p", Skip),
        ("shop/web-7d9f8b6c5d-m8zrp", Evict),
        ("shop/web-7d9f8b6c5d-x2vqk", Evict),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(actions(&p), want);

    // Each pod sits under its own node.
    let on = |node: &str| -> Vec<&str> {
        p.nodes.iter().find(|n| n.name == node).unwrap().pods.iter().map(|x| x.name.as_str()).collect()
    };
    assert!(on("cp-1").contains(&"etcd-cp-1") && on("worker-c").contains(&"debug-shell"));

    assert_eq!(
        reason(&p, "web-7d9f8b6c5d-x2vqk"),
        "owned by Deployment shop/web via ReplicaSet web-7d9f8b6c5d: evicted, PDB web-pdb allows 1"
    );
    assert_eq!(reason(&p, "cache-0"), "owned by StatefulSet shop/cache: evicted, no PDB");
    assert_eq!(
        reason(&p, "reindex-29384120-q9m4t"),
        "owned by CronJob shop/reindex via Job reindex-29384120: evicted, no PDB"
    );
    assert_eq!(
        reason(&p, "user-ssh-keys-agent-zc8tn"),
        "owned by DaemonSet kube-system/user-ssh-keys-agent: deleted, the DaemonSet recreates it on this node"
    );
    assert_eq!(
        reason(&p, "canal-45w75"),
        "host network, DaemonSet kube-system/canal: uses the node's address, no CNI involved"
    );
    assert_eq!(reason(&p, "etcd-cp-1"), "static pod (mirror of a kubelet manifest) on the host network: no CNI involved");
    assert_eq!(reason(&p, "reindex-29384120-x7k2p"), "finished (Succeeded): no network to move");
    assert_eq!(reason(&p, "debug-shell"), "bare pod (no controller): kept on the old CNI; --force-bare re-creates it");
    assert_eq!(
        reason(&p, "checkout-5b6c7d8f9-tq4wn"),
        "owned by Deployment shop/checkout via ReplicaSet checkout-5b6c7d8f9: evicted, PDB checkout-pdb allows 0 now, eviction waits for it"
    );

    let r = risks(&p);
    let risk_pods: Vec<&str> = r.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        risk_pods,
        [
            "default/debug-shell",
            "kube-system/calico-kube-controllers-796995f576-ktrnv",
            "shop/cache-0",
            "shop/cache-1",
            "shop/checkout-5b6c7d8f9-tq4wn",
            "shop/checkout-5b6c7d8f9-tq4wn",
            "shop/reindex-29384120-q9m4t",
        ]
    );
    assert!(r[0].1.starts_with("bare pod (no controller): kept on the old CNI"), "{}", r[0].1);
    assert!(r[1].1.starts_with("only replica of Deployment kube-system/calico-kube-controllers"), "{}", r[1].1);
    assert_eq!(r[2].1, "emptyDir volume (data): its data is lost when the pod is evicted");
    assert!(r[4].1.starts_with("only replica of Deployment shop/checkout"), "{}", r[4].1);
    assert!(
        r[5].1.starts_with("PDB shop/checkout-pdb allows no disruption (1 of 1 pods healthy, 1 required) and, with a single replica, never will")
            && r[5].1.contains("scale Deployment shop/checkout to 2"),
        "{}",
        r[5].1
    );
    assert!(r[6].1.contains("backoffLimit 2"), "{}", r[6].1);
    // Two replicas, PDB allows 1: not at risk.
    assert!(!risk_pods.iter().any(|p| p.starts_with("shop/web")));

    // KKP's rule from the seed document: a CNI type change needs the label.
    assert_eq!(rules(&p), ["kkp-unsafe-cni-migration-label"]);
    assert!(p.refusals[0].message.contains("kubectl label cluster xk7v2qpdm4 unsafe-cni-migration=true"), "{}", p.refusals[0].message);
}

#[test]
fn with_the_kkp_label_the_plan_has_no_refusals_and_warns_about_ipvs() {
    let text = KKP.replace("    is-credential-preset: \"false\"\n", "    is-credential-preset: \"false\"\n    unsafe-cni-migration: \"true\"\n");
    let mut s = ClusterSnapshot::from_yaml(CLUSTER).unwrap();
    s.add_yaml(&text, "kkp").unwrap();
    assert!(s.kkp_cluster.as_ref().unwrap().metadata.labels.contains_key("unsafe-cni-migration"));
    let (p, notes) = plan_with_notes(&s, &opts("cilium:1.16")).unwrap();
    assert_eq!(p.refusals, []);
    assert!(notes.iter().any(|n| n.contains("kube-proxy mode ipvs, which is not recommended with Cilium")), "{notes:?}");
    assert!(notes.iter().any(|n| n.starts_with("current CNI canal:3.27: KKP Cluster xk7v2qpdm4")), "{notes:?}");
}

/// `apply`'s preflight runs KKP's own rules on the patches it will send (label, CNI, then the
/// kube-proxy mode): the plan refuses what KKP's webhook would deny mid-run.
#[test]
fn kkp_rules_check_the_patches_apply_will_send() {
    let labelled = KKP.replace("    is-credential-preset: \"false\"\n", "    is-credential-preset: \"false\"\n    unsafe-cni-migration: \"true\"\n");
    let with = |kkp: &str| {
        let mut s = ClusterSnapshot::from_yaml(CLUSTER).unwrap();
        s.add_yaml(kkp, "kkp").unwrap();
        s
    };
    let ebpf = |to: &str| PlanOptions { kube_proxy_mode: Some("ebpf".into()), ..opts(to) };

    // Konnectivity is on in the fixture: cilium with ebpf is what KKP allows.
    let (p, notes) = plan_with_notes(&with(&labelled), &ebpf("cilium:1.16")).unwrap();
    assert_eq!(p.refusals, []);
    assert!(!notes.iter().any(|n| n.contains("not recommended with Cilium")), "the mode is being changed: {notes:?}");

    // Without Konnectivity KKP denies the proxyMode patch: refused before anything is changed.
    let no_konnectivity = labelled.replace("konnectivityEnabled: true", "konnectivityEnabled: false");
    assert_ne!(no_konnectivity, labelled);
    let p = plan(&with(&no_konnectivity), &ebpf("cilium:1.16")).unwrap();
    assert_eq!(rules(&p), ["kkp-proxy-mode-ebpf-konnectivity"]);
    assert!(
        p.refusals[0].message.starts_with("KKP would deny the patch of Cluster xk7v2qpdm4 that sets spec.clusterNetwork.proxyMode ebpf:"),
        "{}",
        p.refusals[0].message
    );
    assert_eq!(rules(&plan(&with(&no_konnectivity), &opts("cilium:1.16")).unwrap()), Vec::<&str>::new(), "no mode change, no denial");

    // A Cluster KKP already refuses (a mode it does not know) fails at the first patch, the label.
    let bad_mode = labelled.replace("proxyMode: ipvs", "proxyMode: userspace");
    let p = plan(&with(&bad_mode), &opts("cilium:1.16")).unwrap();
    assert_eq!(rules(&p), ["kkp-proxy-mode-invalid"]);
    assert!(p.refusals[0].message.contains("sets the `unsafe-cni-migration` label"), "{}", p.refusals[0].message);

    // KKP needs a version for the new type: a bare `--to cilium` would be denied mid-run.
    let p = plan(&with(&labelled), &opts("cilium")).unwrap();
    assert_eq!(rules(&p), ["kkp-cni-version-invalid"]);
    assert!(p.refusals[0].message.ends_with("give it with --to cilium:VERSION)"), "{}", p.refusals[0].message);

    // KKP deploys only canal and cilium: another target is refused, not sent to KKP.
    let p = plan(&with(&labelled), &opts("allot")).unwrap();
    assert_eq!(rules(&p), ["kkp-cni-type-unsupported"]);
    assert!(p.refusals[0].message.contains("spec.cniPlugin.type to none"), "{}", p.refusals[0].message);

    // Outside KKP kube-proxy has no ebpf mode.
    let p = plan(&snapshot(false), &ebpf("cilium:1.16")).unwrap();
    assert_eq!(rules(&p), ["kube-proxy-mode-ebpf"]);
}

#[test]
fn json_has_exactly_the_issues_shape() {
    let p = plan(&snapshot(true), &opts("cilium:1.16")).unwrap();
    let v = serde_json::to_value(&p).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v), ["atRisk", "from", "nodes", "refusals", "to"]);
    assert_eq!(keys(&v["refusals"][0]), ["message", "rule"]);
    assert_eq!(keys(&v["nodes"][0]), ["batch", "name", "pods"]);
    assert_eq!(keys(&v["nodes"][0]["pods"][0]), ["action", "name", "namespace", "reason"]);
    assert_eq!(keys(&v["atRisk"][0]), ["name", "namespace", "reason"]);
    let all_actions: Vec<&str> =
        v["nodes"].as_array().unwrap().iter().flat_map(|n| n["pods"].as_array().unwrap()).map(|p| p["action"].as_str().unwrap()).collect();
    assert!(all_actions.iter().all(|a| ["evict", "delete", "recreate", "keep", "skip"].contains(a)));
    assert_eq!(v["nodes"][0]["batch"], 0);
    // And it reads back.
    let back: Plan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

#[test]
fn list_and_multi_document_dumps_give_the_same_plan() {
    // Re-emit the List's items as separate YAML documents.
    let list: Value = serde_saphyr::from_str(CLUSTER).unwrap();
    let docs: Vec<String> =
        list["items"].as_array().unwrap().iter().map(|i| serde_saphyr::to_string(i).unwrap()).collect();
    let multi = format!("---\n{}", docs.join("---\n"));
    let mut s = ClusterSnapshot::from_yaml(&multi).unwrap();
    s.add_yaml(KKP, "kkp").unwrap();
    assert_eq!(s.pods.len(), 29);
    let a = plan(&snapshot(true), &opts("cilium:1.16")).unwrap();
    let b = plan(&s, &opts("cilium:1.16")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn invalid_dumps_name_the_document_and_object() {
    // One pod's field of the wrong type, inside the List (document 1).
    let bad = CLUSTER.replacen("    hostNetwork: true\n", "    hostNetwork: maybe\n", 1);
    assert_ne!(bad, CLUSTER);
    let e = ClusterSnapshot::from_yaml(&bad).unwrap_err().to_string();
    assert!(e.starts_with("snapshot: document 1 (line 1), item "), "{e}");
    assert!(e.contains("not a valid"), "{e}");

    // Broken YAML in the third document.
    let e = ClusterSnapshot::from_yaml(&format!("{KKP}---\nkind: Node\n---\nmetadata: {{name: [\n")).unwrap_err().to_string();
    assert!(e.contains("document 3") && e.contains("is not valid YAML"), "{e}");

    // The KKP Cluster's spec of the wrong shape.
    let e = ClusterSnapshot::from_yaml(&KKP.replace("  cniPlugin:\n    type: canal\n", "  cniPlugin:\n    type: [canal]\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("document 1") && e.contains("(Cluster xk7v2qpdm4): not a valid KKP Cluster"), "{e}");
}

#[test]
fn batches_of_two_without_a_self_node() {
    let o = PlanOptions { to: "cilium".into(), batch: 2, ..Default::default() };
    let p = plan(&snapshot(true), &o).unwrap();
    // worker-a and worker-b both have one pod at risk; worker-a restarts fewer pods (3 vs 4).
    assert_eq!(
        batches(&p),
        [("worker-a".into(), 0), ("worker-b".into(), 1), ("worker-c".into(), 1), ("cp-1".into(), 2)]
    );
    assert_eq!(p.to, "cilium");
}

#[test]
fn force_bare_recreates_the_bare_pod_and_says_what_it_costs() {
    let o = PlanOptions { force_bare: true, ..opts("cilium:1.16") };
    let p = plan(&snapshot(true), &o).unwrap();
    assert_eq!(actions(&p)["default/debug-shell"], Action::Recreate);
    assert!(risks(&p).iter().any(|(pod, r)| pod == "default/debug-shell" && r.contains("re-created from its own spec")));
    // The host-network debugger pod is bare too, and still skipped.
    assert_eq!(actions(&p)["default/node-debugger-worker-b-7xk2q"], Action::Skip);
}

#[test]
fn a_not_ready_node_is_refused_unless_allowed() {
    let mut s = snapshot(true);
    let node = s.nodes.iter_mut().find(|n| n.metadata.name.as_deref() == Some("worker-b")).unwrap();
    let ready = node.status.as_mut().unwrap().conditions.as_mut().unwrap().iter_mut().find(|c| c.type_ == "Ready").unwrap();
    ready.status = "Unknown".into();
    ready.reason = Some("NodeStatusUnknown".into());

    let p = plan(&s, &opts("cilium:1.16")).unwrap();
    assert_eq!(rules(&p), ["kkp-unsafe-cni-migration-label", "node-not-ready"]);
    assert!(p.refusals[1].message.starts_with("node worker-b is NotReady (Ready=Unknown, NodeStatusUnknown)"), "{}", p.refusals[1].message);
    assert!(p.refusals[1].message.contains("--allow-not-ready"));

    let p = plan(&s, &PlanOptions { allow_not_ready: true, ..opts("cilium:1.16") }).unwrap();
    assert_eq!(rules(&p), ["kkp-unsafe-cni-migration-label"]);
    // Its pods are at risk, and it is no longer the canary.
    assert!(risks(&p).iter().any(|(pod, r)| pod == "shop/web-7d9f8b6c5d-m8zrp" && r.starts_with("node worker-b is NotReady")));
    assert!(!risks(&p).iter().any(|(pod, _)| pod == "kube-system/kube-proxy-zc8tn"), "skipped pods are not at risk");
    assert_eq!(p.nodes[0].name, "worker-c");
}

#[test]
fn target_equal_to_current_is_refused() {
    let p = plan(&snapshot(true), &opts("canal:3.27")).unwrap();
    assert_eq!(rules(&p), ["target-is-current"]);
    assert!(p.refusals[0].message.contains("already runs canal:3.27"), "{}", p.refusals[0].message);

    let p = plan(&snapshot(true), &opts("canal:v3.28")).unwrap();
    assert_eq!(p.to, "canal:3.28");
    assert_eq!(rules(&p), ["target-is-current"]);
    assert!(p.refusals[0].message.contains("version upgrade within canal"), "{}", p.refusals[0].message);
}

#[test]
fn without_kkp_the_daemonsets_tell_the_cni() {
    let p = plan(&snapshot(false), &opts("allot")).unwrap();
    assert_eq!(p.from, "canal:3.27.3");
    assert_eq!(p.to, "allot");
    assert_eq!(p.refusals, [], "no KKP Cluster: no label rule");
}

#[test]
fn an_unknown_cni_needs_from() {
    let mut s = snapshot(false);
    s.daemonsets.retain(|d| d.metadata.name.as_deref() != Some("canal"));
    let p = plan(&s, &opts("allot")).unwrap();
    assert_eq!(p.from, "unknown");
    assert_eq!(rules(&p), ["unknown-current-cni"]);
    assert!(p.refusals[0].message.contains("--from TYPE[:VERSION]"));

    let p = plan(&s, &PlanOptions { from: Some("flannel:0.24".into()), ..opts("allot") }).unwrap();
    assert_eq!(p.from, "flannel:0.24");
    assert_eq!(p.refusals, []);
}

#[test]
fn mid_migration_the_current_cni_is_the_one_that_is_not_the_target() {
    let cilium = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: cilium\n  namespace: kube-system\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n      - name: cilium-agent\n        image: quay.io/cilium/cilium:v1.16.3\n";
    let mut s = snapshot(false);
    s.add_yaml(cilium, "cilium").unwrap();
    let (p, notes) = plan_with_notes(&s, &opts("cilium:1.16")).unwrap();
    assert_eq!(p.from, "canal:3.27.3");
    assert!(notes.iter().any(|n| n.starts_with("also installed cilium:1.16.3: DaemonSet kube-system/cilium")), "{notes:?}");
}

#[test]
fn pdb_budgets_are_computed_when_the_dump_has_no_status() {
    let mut s = snapshot(true);
    for b in &mut s.pdbs {
        b.status = None;
    }
    let p = plan(&s, &opts("cilium:1.16")).unwrap();
    assert!(reason(&p, "web-7d9f8b6c5d-x2vqk").ends_with("PDB web-pdb allows 1"));
    assert!(reason(&p, "checkout-5b6c7d8f9-tq4wn").contains("PDB checkout-pdb allows 0 now"));
    assert!(risks(&p).iter().any(|(_, r)| r.contains("(1 of 1 pods ready, 1 required)")));

    // maxUnavailable 0 on web: no disruption allowed either.
    let web = s.pdbs.iter_mut().find(|b| b.metadata.name.as_deref() == Some("web-pdb")).unwrap();
    let spec = web.spec.as_mut().unwrap();
    spec.min_available = None;
    spec.max_unavailable = Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("0%".into()));
    let p = plan(&s, &opts("cilium:1.16")).unwrap();
    assert!(risks(&p).iter().any(|(pod, r)| pod == "shop/web-7d9f8b6c5d-x2vqk" && r.starts_with("PDB shop/web-pdb allows no disruption now (2 of 2 pods ready, 2 required)")), "{:?}", risks(&p));
}

#[test]
fn a_pod_two_pdbs_select_is_a_refusal() {
    let mut s = snapshot(true);
    let mut second = s.pdbs.iter().find(|b| b.metadata.name.as_deref() == Some("web-pdb")).unwrap().clone();
    second.metadata.name = Some("web-pdb-2".into());
    s.pdbs.push(second);
    let p = plan(&s, &opts("cilium:1.16")).unwrap();
    let r = p.refusals.iter().find(|r| r.rule == "pod-with-several-pdbs").unwrap_or_else(|| panic!("{:?}", rules(&p)));
    assert!(r.message.contains("shop/web-7d9f8b6c5d-x2vqk (web-pdb, web-pdb-2)"), "{}", r.message);
    assert!(risks(&p).iter().any(|(pod, r)| pod == "shop/web-7d9f8b6c5d-x2vqk" && r.starts_with("2 PDBs select this pod")), "{:?}", risks(&p));
    assert!(!rules(&plan(&snapshot(true), &opts("cilium:1.16")).unwrap()).contains(&"pod-with-several-pdbs"));
}

#[test]
fn bad_options_are_errors_that_say_what_to_give() {
    let e = plan(&snapshot(true), &opts("cillium:1.16")).unwrap_err();
    assert!(matches!(e, PlanError::UnknownType { .. }));
    assert_eq!(
        e.to_string(),
        "--to \"cillium:1.16\": unknown CNI type \"cillium\"; expected one of canal, calico, cilium, flannel, weave, allot, optionally with :VERSION (e.g. cilium:1.16)"
    );
    assert!(matches!(plan(&snapshot(true), &opts("cilium:")), Err(PlanError::BadSpec { .. })));
    assert_eq!(plan(&snapshot(true), &PlanOptions { batch: 0, ..opts("cilium") }), Err(PlanError::ZeroBatch));
    let p = plan(&snapshot(true), &PlanOptions { self_node: Some("nope".into()), ..opts("cilium") }).unwrap();
    assert!(rules(&p).contains(&"self-node-unknown"));
}
