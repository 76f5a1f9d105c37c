//! `KubeCluster` (the Cluster trait through kube-rs) against the in-process fake API server
//! (`allot-kube-fake`; no Kubernetes API server can run here): the requests it sends (paths,
//! bodies, patch content types), and a whole `apply` and `rollback` over it. The fake runs no
//! controllers, admission webhooks or PDB logic: pods evicted stay gone, 429s are injected.

use std::time::Duration;

use allot_k8s::migration::{MigrationSpec, MigrationStatus, NodePhase, Phase, Switch};
use allot_kube_fake::FakeApiServer;
use allot_migrate::kube_cluster::{CniDaemonSets, KubeCluster, OLD_CNI_COPY, Switcher, parse_manifests};
use allot_migrate::orchestrate::{Cluster, ClusterError, Eviction, Orchestrator, RunOptions};
use allot_migrate::plan::{NodePlan, Plan};
use serde_json::{Value, json};

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
}

fn pod(ns: &str, name: &str, node: &str, owner: Option<(&str, &str)>, ip: &str, host_network: bool) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("old-{name}"), "resourceVersion": "1", "labels": {"app": name}},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [{"name": "c", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
    });
    if let Some((kind, oname)) = owner {
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": oname, "uid": format!("uid-{oname}"), "controller": true}]);
    }
    p
}

fn daemonset(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}},
           "status": {"numberReady": 2, "desiredNumberScheduled": 2}})
}

fn spec(kube_proxy_mode: Option<&str>) -> MigrationSpec {
    MigrationSpec {
        from: "canal:v3.27".into(),
        to: "cilium:1.16".into(),
        switch: Switch::default(),
        batch: 1,
        force_bare: false,
        pod_timeout_seconds: 30,
        new_pod_cidrs: vec!["10.2.0.0/16".into()],
        kube_proxy_mode: kube_proxy_mode.map(String::from),
    }
}

const INSTALL: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: cilium
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: cilium
rules: []
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: cilium
  namespace: kube-system
spec:
  selector:
    matchLabels: {k8s-app: cilium}
  template:
    metadata:
      labels: {k8s-app: cilium}
    spec:
      hostNetwork: true
      containers: [{name: cilium-agent, image: quay.io/cilium/cilium:v1.16.0}]
"#;

/// Two Ready nodes on canal with cilium's agents already Ready (the fake runs no DaemonSet
/// controller, so the target's pods are seeded), one ReplicaSet pod, one DaemonSet pod with the
/// pod network, one bare pod, kube-proxy.
fn cluster() -> FakeApiServer {
    let api = FakeApiServer::new();
    for n in ["n1", "n2"] {
        api.insert(node(n));
        api.insert(pod("kube-system", &format!("cilium-{n}"), n, Some(("DaemonSet", "cilium")), "192.168.0.1", true));
        api.insert(pod("kube-system", &format!("canal-{n}"), n, Some(("DaemonSet", "canal")), "192.168.0.1", true));
    }
    api.insert(pod("default", "web-abc", "n1", Some(("ReplicaSet", "web")), "10.1.0.5", false));
    api.insert(pod("monitoring", "exporter-n2", "n2", Some(("DaemonSet", "exporter")), "10.1.0.6", false));
    api.insert(pod("default", "debug", "n2", None, "10.1.0.7", false));
    api.insert(daemonset("kube-system", "canal"));
    api.insert(daemonset("kube-system", "kube-proxy"));
    api.insert(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "calico-kube-controllers", "namespace": "kube-system"}}));
    api.insert(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                      "data": {"config.conf": "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: \"ipvs\"\n"}}));
    api
}

fn plan() -> Plan {
    Plan {
        from: "canal:v3.27".into(),
        to: "cilium:1.16".into(),
        refusals: vec![],
        nodes: vec![NodePlan { name: "n1".into(), batch: 0, pods: vec![] }, NodePlan { name: "n2".into(), batch: 1, pods: vec![] }],
        at_risk: vec![],
    }
}

fn kube(api: &FakeApiServer) -> KubeCluster {
    KubeCluster::new(
        api.client(),
        Switcher::Manifests(parse_manifests(INSTALL, "cilium.yaml").unwrap()),
        vec![],
        CniDaemonSets::of("canal:v3.27", "cilium:1.16").unwrap(),
    )
}

fn fast() -> RunOptions {
    RunOptions { api_timeout: Duration::from_secs(5), poll: Duration::from_millis(20) }
}

/// kube-system's ConfigMap `name`.
fn config_map(api: &FakeApiServer, name: &str) -> Option<Value> {
    api.objects("v1", "ConfigMap").into_iter().find(|c| c["metadata"]["name"] == name)
}

fn reqs(api: &FakeApiServer, verb: &str, resource: &str, sub: Option<&str>) -> Vec<allot_kube_fake::Request> {
    api.requests().into_iter().filter(|r| r.verb == verb && r.resource == resource && r.subresource.as_deref() == sub).collect()
}

#[tokio::test]
async fn fake_api_eviction_is_a_policy_v1_eviction_and_429_means_blocked() {
    let api = cluster();
    let k = kube(&api);
    api.fail_next("create", "pods/eviction", 429, 1);
    assert_eq!(k.evict("default", "web-abc").await.unwrap(), Eviction::Blocked);
    assert_eq!(k.evict("default", "web-abc").await.unwrap(), Eviction::Evicted);
    assert_eq!(k.evict("default", "web-abc").await.unwrap(), Eviction::Gone);
    let ev = reqs(&api, "create", "pods", Some("eviction"));
    assert_eq!(ev.len(), 3);
    let r = &ev[1];
    assert_eq!((r.namespace.as_deref(), r.name.as_deref(), r.status), (Some("default"), Some("web-abc"), 201));
    let body = r.body.as_ref().unwrap();
    assert_eq!(body["apiVersion"], "policy/v1");
    assert_eq!(body["kind"], "Eviction");
    assert_eq!(body["metadata"]["name"], "web-abc");
    assert_eq!(body["metadata"]["namespace"], "default");
    assert_eq!(ev[0].status, 429);
    assert!(api.objects("v1", "Pod").iter().all(|p| p["metadata"]["name"] != "web-abc"));
}

/// A whole apply over the fake API: the Migration object and its status, cordons as merge
/// patches, the install applied server-side, 429 on an eviction retried, the DaemonSet pod
/// deleted, the bare pod left alone, canal removed, kube-proxy switched and restarted; then a
/// rollback deletes what was applied.
#[tokio::test]
async fn fake_api_apply_then_rollback_sends_what_an_apiserver_expects() {
    let api = cluster();
    let k = kube(&api);
    api.fail_next("create", "pods/eviction", 429, 2);
    let mut lines = Vec::new();
    {
        let mut o = Orchestrator::begin(&k, spec(Some("iptables")), &plan(), fast(), Box::new(|_, l: &str| lines.push(l.to_string()))).await.unwrap();
        o.apply().await.unwrap();
    }
    // The end: the bare pod is kept, so 0 of 1 counted pods is on the new CNI (the fake runs no
    // controllers: the evicted and deleted pods do not come back).
    assert_eq!(lines.last().unwrap(), "0/1 pods on the new CNI (1 bare pods kept on the old CNI: re-create them, or run again with --force-bare)");

    // Migration object: created, then every status write through the status subresource.
    let m = &api.objects("allot.dev/v1", "Migration")[0];
    assert_eq!(m["metadata"]["name"], "cni");
    assert_eq!(m["spec"]["to"], "cilium:1.16");
    assert_eq!(m["status"]["phase"], "Done");
    assert_eq!(m["status"]["nodes"][0]["phase"], "Done");
    assert_eq!(m["status"]["kubeProxyWas"], "ipvs");
    let saves = reqs(&api, "patch", "migrations", Some("status"));
    assert!(saves.len() > 10, "{}", saves.len());
    assert!(saves.iter().all(|r| r.content_type.as_deref() == Some("application/merge-patch+json") && r.status == 200));

    // Cordon and uncordon of each node as merge patches of spec.unschedulable.
    let cordons: Vec<(String, Value)> = reqs(&api, "patch", "nodes", None)
        .into_iter()
        .map(|r| {
            assert_eq!(r.content_type.as_deref(), Some("application/merge-patch+json"));
            (r.name.unwrap(), r.body.unwrap()["spec"]["unschedulable"].clone())
        })
        .collect();
    assert!(cordons.iter().any(|(n, v)| n == "n1" && *v == json!(true)), "{cordons:?}");
    assert_eq!(cordons.last().unwrap().1, json!(false));
    for n in api.objects("v1", "Node") {
        assert_ne!(n["spec"]["unschedulable"], json!(true), "{n}");
    }

    // The install, applied server-side by field manager allot; later the copy of canal's
    // objects, before they go.
    let applies: Vec<_> = api.requests().into_iter().filter(|r| r.content_type.as_deref() == Some("application/apply-patch+yaml")).collect();
    assert_eq!(applies.iter().map(|r| r.resource.as_str()).collect::<Vec<_>>(), ["serviceaccounts", "clusterroles", "daemonsets", "configmaps"]);
    assert!(applies.iter().all(|r| r.query.contains("fieldManager=allot") && r.query.contains("force=true")), "{applies:?}");

    // Evictions: 2 × 429 then 201; the DaemonSet pod deleted; the bare pod untouched.
    let ev = reqs(&api, "create", "pods", Some("eviction"));
    assert_eq!(ev.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 429, 201]);
    let deletes: Vec<String> = reqs(&api, "delete", "pods", None).into_iter().map(|r| r.name.unwrap()).collect();
    assert_eq!(deletes, ["exporter-n2"]);
    assert!(api.objects("v1", "Pod").iter().any(|p| p["metadata"]["name"] == "debug" && p["metadata"]["uid"] == "old-debug"));

    // canal removed; kube-proxy's mode changed and its pods restarted.
    assert!(api.objects("apps/v1", "DaemonSet").iter().all(|d| d["metadata"]["name"] != "canal"));
    assert!(api.objects("apps/v1", "Deployment").is_empty());
    let cm = &config_map(&api, "kube-proxy").unwrap();
    assert!(cm["data"]["config.conf"].as_str().unwrap().contains("mode: \"iptables\""), "{cm}");
    let kp = api.objects("apps/v1", "DaemonSet").into_iter().find(|d| d["metadata"]["name"] == "kube-proxy").unwrap();
    assert!(kp["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string(), "{kp}");

    // Before canal went, its objects were copied (for a rollback without --old-manifests).
    let copy = config_map(&api, OLD_CNI_COPY).expect("the old CNI's objects are kept");
    assert_eq!(copy["data"]["from"], "canal:v3.27");
    let kept: Vec<Value> = serde_json::from_str(copy["data"]["objects"].as_str().unwrap()).unwrap();
    let kinds: Vec<String> = kept.iter().map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap())).collect();
    assert_eq!(kinds, ["DaemonSet/canal", "Deployment/calico-kube-controllers"]);
    assert!(kept[0]["metadata"].get("uid").is_none() && kept[0]["metadata"].get("resourceVersion").is_none() && kept[0].get("status").is_none(), "{}", kept[0]);
    assert_eq!(kept[0]["spec"]["selector"]["matchLabels"]["app"], "canal");

    // Rollback: canal was removed, no --old-manifests was given and the copy is gone: refused
    // with what to do, nothing deleted, nodes schedulable.
    kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(api.client(), "kube-system").delete(OLD_CNI_COPY, &Default::default()).await.unwrap();
    let before = api.objects("apps/v1", "DaemonSet").len();
    let mut o = Orchestrator::resume(&k, fast(), Box::new(|_, _| {})).await.unwrap();
    let e = o.rollback().await.unwrap_err().to_string();
    assert!(e.contains("holds no copy") && e.contains("pass --old-manifests PATH"), "{e}");
    assert_eq!(api.objects("apps/v1", "DaemonSet").len(), before);
    assert!(config_map(&api, "kube-proxy").unwrap()["data"]["config.conf"].as_str().unwrap().contains("ipvs"), "kube-proxy back first");

    // With canal's manifests it goes through: canal applied again, cilium's objects deleted.
    let canal = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: canal\n  namespace: kube-system\nspec: {}\n";
    let k2 = KubeCluster::new(
        api.client(),
        Switcher::Manifests(parse_manifests(INSTALL, "cilium.yaml").unwrap()),
        parse_manifests(canal, "canal.yaml").unwrap(),
        CniDaemonSets::of("canal:v3.27", "cilium:1.16").unwrap(),
    );
    let mut o = Orchestrator::resume(&k2, fast(), Box::new(|_, _| {})).await.unwrap();
    o.rollback().await.unwrap();
    let m = &api.objects("allot.dev/v1", "Migration")[0];
    assert_eq!(m["status"]["phase"], "RolledBack");
    let ds: Vec<String> = api.objects("apps/v1", "DaemonSet").iter().map(|d| d["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert!(ds.contains(&"canal".to_string()) && !ds.contains(&"cilium".to_string()), "{ds:?}");
    assert!(api.objects("rbac.authorization.k8s.io/v1", "ClusterRole").is_empty());
}

/// A rollback after the old CNI was removed, without --old-manifests: the copy kept before the
/// removal installs it again (as it was, without its old identity), and the target goes.
#[tokio::test]
async fn fake_api_rollback_after_the_old_cni_was_removed_installs_it_from_the_kept_copy() {
    let api = cluster();
    let k = kube(&api);
    {
        let mut o = Orchestrator::begin(&k, spec(None), &plan(), fast(), Box::new(|_, _| {})).await.unwrap();
        o.apply().await.unwrap();
    }
    assert!(api.objects("apps/v1", "DaemonSet").iter().all(|d| d["metadata"]["name"] != "canal"), "canal removed");
    let mut o = Orchestrator::resume(&k, fast(), Box::new(|_, _| {})).await.unwrap();
    o.rollback().await.unwrap();
    assert_eq!(api.objects("allot.dev/v1", "Migration")[0]["status"]["phase"], "RolledBack");
    let canal = api.objects("apps/v1", "DaemonSet").into_iter().find(|d| d["metadata"]["name"] == "canal").expect("canal is back");
    assert_eq!(canal["spec"]["template"]["spec"]["containers"][0]["image"], "i", "{canal}");
    assert!(api.objects("apps/v1", "Deployment").iter().any(|d| d["metadata"]["name"] == "calico-kube-controllers"));
    assert!(api.objects("apps/v1", "DaemonSet").iter().all(|d| d["metadata"]["name"] != "cilium"), "the target went");
}

fn pdb(name: &str, app: &str) -> Value {
    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "namespace": "default"},
           "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}}})
}

/// The apiserver answers the eviction of a pod two PDBs select with a 500 that says so: that
/// is no outage to wait out but a failed step, named with the pod and both budgets, and the
/// node is uncordoned.
#[tokio::test]
async fn fake_api_eviction_of_a_pod_two_pdbs_select_fails_the_step_and_uncordons() {
    let api = cluster();
    api.insert(pdb("web-a", "web-abc"));
    api.insert(pdb("web-b", "web-abc"));
    api.insert(pdb("other", "db"));
    let k = kube(&api);
    // The real answer, as often as asked: retrying would never help.
    api.fail_next_with("create", "pods/eviction", 500, 1000, "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.");
    let mut o = Orchestrator::begin(&k, spec(None), &plan(), fast(), Box::new(|_, _| {})).await.unwrap();
    let err = o.apply().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, allot_migrate::orchestrate::Error::Failed { phase: Phase::Nodes, .. }), "{msg}");
    assert!(msg.contains("evicting default/web-abc") && msg.contains("(web-a, web-b)") && msg.contains("more than one PodDisruptionBudget"), "{msg}");
    assert_eq!(reqs(&api, "create", "pods", Some("eviction")).len(), 1, "not retried");
    for n in api.objects("v1", "Node") {
        assert_ne!(n["spec"]["unschedulable"], json!(true), "{n}");
    }
    let m = &api.objects("allot.dev/v1", "Migration")[0];
    assert_eq!(m["status"]["phase"], "Failed");
    assert_eq!(m["status"]["nodes"][0]["phase"], "Failed");
    assert_eq!(m["status"]["nodes"][0]["cordoned"], false);
}

#[test]
fn known_cni_daemonsets_and_plurals_without_discovery() {
    let ds = CniDaemonSets::of("canal:v3.27", "allot").unwrap();
    assert_eq!(ds.old, ("kube-system".into(), "canal".into()));
    assert_eq!(ds.target, ("allot-system".into(), "allot-agent".into()));
    let e = CniDaemonSets::of("mystery:1", "cilium").unwrap_err();
    assert!(e.contains("--old-daemonset/--target-daemonset NAMESPACE/NAME"), "{e}");
    use allot_migrate::kube_cluster::api_resource;
    for (av, kind, plural, namespaced) in [
        ("v1", "ServiceAccount", "serviceaccounts", true),
        ("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", false),
        ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", true),
        ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", true),
        ("v1", "Endpoints", "endpoints", true),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", false),
    ] {
        let (ar, ns) = api_resource(av, kind);
        assert_eq!((ar.plural.as_str(), ns), (plural, namespaced), "{kind}");
        assert_eq!(ar.api_version, av);
    }
}

#[tokio::test]
async fn fake_api_status_writes_clear_fields_that_are_unset_now() {
    let api = cluster();
    let k = kube(&api);
    let st = MigrationStatus { phase: Phase::Failed, failed_in: Some(Phase::Nodes), message: Some("stopped".into()), ..Default::default() };
    k.create(&spec(None), &st).await.unwrap();
    let m = &api.objects("allot.dev/v1", "Migration")[0];
    assert_eq!((m["status"]["phase"].as_str(), m["status"]["message"].as_str()), (Some("Failed"), Some("stopped")));
    k.save(&MigrationStatus { phase: Phase::Nodes, ..Default::default() }).await.unwrap();
    let m = &api.objects("allot.dev/v1", "Migration")[0];
    assert_eq!(m["status"]["phase"], "Nodes");
    assert!(m["status"].get("message").is_none_or(Value::is_null), "{m}");
    assert!(m["status"].get("failedIn").is_none_or(Value::is_null), "{m}");
    let (spec_back, st_back) = k.load().await.unwrap().unwrap();
    assert_eq!(spec_back.to, "cilium:1.16");
    assert_eq!((st_back.phase, st_back.message), (Phase::Nodes, None));
}

#[tokio::test]
async fn fake_api_kkp_switch_labels_then_patches_the_seed_cluster() {
    let user = cluster();
    let seed = FakeApiServer::new();
    seed.insert(json!({"apiVersion": "kubermatic.k8c.io/v1", "kind": "Cluster", "metadata": {"name": "xyz"},
                       "spec": {"cniPlugin": {"type": "canal", "version": "v3.27"}, "clusterNetwork": {"proxyMode": "ipvs", "konnectivityEnabled": true}}}));
    let k = KubeCluster::new(
        user.client(),
        Switcher::Kkp { seed: seed.client(), cluster: "xyz".into() },
        vec![],
        CniDaemonSets::of("canal:v3.27", "cilium:1.16").unwrap(),
    )
    .with_proxy_wait(Duration::from_secs(5), Duration::from_millis(20));
    assert!(k.switch_to_target(&spec(None)).await.unwrap().is_empty());
    let patches = reqs(&seed, "patch", "clusters", None);
    assert_eq!(patches.len(), 2);
    assert!(patches.iter().all(|r| r.content_type.as_deref() == Some("application/merge-patch+json") && r.name.as_deref() == Some("xyz")));
    assert_eq!(patches[0].body.as_ref().unwrap()["metadata"]["labels"]["unsafe-cni-migration"], "true");
    assert_eq!(patches[1].body.as_ref().unwrap()["spec"]["cniPlugin"], json!({"type": "cilium", "version": "1.16"}));
    let c = &seed.objects("kubermatic.k8c.io/v1", "Cluster")[0];
    assert_eq!(c["spec"]["cniPlugin"]["type"], "cilium");
    assert_eq!(c["spec"]["clusterNetwork"]["konnectivityEnabled"], true, "a merge patch keeps the rest");

    assert_eq!(k.kube_proxy_mode().await.unwrap(), "ipvs");
    // KKP writes the user cluster's ConfigMap some time after the Cluster changes: kube-proxy
    // is restarted only once it shows the new mode (the manual's step 3).
    // Two reads of the ConfigMap fail on the way: looks within the same wait, not a new patch.
    user.fail_next("get", "configmaps", 503, 2);
    let set = k.set_kube_proxy_mode("iptables");
    let kkp = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seed.objects("kubermatic.k8c.io/v1", "Cluster")[0]["spec"]["clusterNetwork"]["proxyMode"], "iptables");
        assert!(reqs(&user, "patch", "daemonsets", None).is_empty(), "kube-proxy restarted before its ConfigMap shows the mode");
        assert!(reqs(&user, "get", "configmaps", None).len() > 3, "the ConfigMap is polled");
        user.insert(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                           "data": {"config.conf": "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: \"iptables\"\n"}}));
    };
    let (r, ()) = tokio::join!(set, kkp);
    r.unwrap();
    assert_eq!(reqs(&user, "patch", "daemonsets", None).len(), 1, "kube-proxy restarted in the user cluster");
    assert_eq!(reqs(&user, "get", "configmaps", None).iter().filter(|r| r.status == 503).count(), 2);
    assert_eq!(reqs(&seed, "patch", "clusters", None).len(), 3, "the proxyMode patch sent once");

    // KKP never reconciles: a clear failure, and no restart.
    let slow = KubeCluster::new(user.client(), Switcher::Kkp { seed: seed.client(), cluster: "xyz".into() }, vec![], CniDaemonSets::of("canal:v3.27", "cilium:1.16").unwrap())
        .with_proxy_wait(Duration::from_millis(200), Duration::from_millis(20));
    let e = slow.set_kube_proxy_mode("ipvs").await.unwrap_err().to_string();
    assert!(e.contains("ConfigMap kube-system/kube-proxy still shows \"iptables\"") && e.contains("kube-proxy was not restarted"), "{e}");
    assert_eq!(reqs(&user, "patch", "daemonsets", None).len(), 1);

    // ebpf: KKP replaces kube-proxy (Cilium takes over): nothing to wait for or restart.
    k.set_kube_proxy_mode("ebpf").await.unwrap();
    assert_eq!(seed.objects("kubermatic.k8c.io/v1", "Cluster")[0]["spec"]["clusterNetwork"]["proxyMode"], "ebpf");
    assert_eq!(reqs(&user, "patch", "daemonsets", None).len(), 1);

    // Rollback: the Cluster names canal again; cilium's well-known objects go.
    user.insert(daemonset("kube-system", "cilium"));
    k.switch_back(&spec(None), &[], true).await.unwrap();
    assert_eq!(seed.objects("kubermatic.k8c.io/v1", "Cluster")[0]["spec"]["cniPlugin"], json!({"type": "canal", "version": "v3.27"}));
    assert!(user.objects("apps/v1", "DaemonSet").iter().all(|d| d["metadata"]["name"] != "cilium"));
}

#[tokio::test]
async fn fake_api_bare_pod_recreate_keeps_spec_and_node() {
    let api = cluster();
    let k = kube(&api);
    let (manifest, uid) = k.pod_manifest("default", "debug").await.unwrap().unwrap();
    assert_eq!(uid, "old-debug");
    let m: Value = serde_json::from_str(&manifest).unwrap();
    assert!(m["metadata"].get("uid").is_none() && m["metadata"].get("resourceVersion").is_none() && m.get("status").is_none(), "{m}");
    assert!(!k.create_pod(&manifest).await.unwrap(), "409 while the old pod exists");
    k.delete_pod("default", "debug").await.unwrap();
    k.delete_pod("default", "debug").await.unwrap(); // gone already: fine
    assert!(k.create_pod(&manifest).await.unwrap());
    let p = api.objects("v1", "Pod").into_iter().find(|p| p["metadata"]["name"] == "debug").unwrap();
    assert_eq!(p["spec"]["nodeName"], "n2");
    assert_eq!(p["metadata"]["labels"]["app"], "debug");
    assert_ne!(p["metadata"]["uid"], "old-debug");
}

#[tokio::test]
async fn fake_api_pods_on_reads_owner_readiness_and_addresses() {
    let api = cluster();
    let k = kube(&api);
    let pods = k.pods_on("n1").await.unwrap();
    let web = pods.iter().find(|p| p.name == "web-abc").unwrap();
    assert_eq!(web.owner, Some(("ReplicaSet".into(), "web".into())));
    assert!(web.ready && !web.host_network && !web.finished);
    assert_eq!(web.ips, vec!["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]);
    assert!(pods.iter().all(|p| p.node == "n1"));
    let list = reqs(&api, "list", "pods", None);
    assert!(list[0].query.contains("fieldSelector=spec.nodeName%3Dn1"), "{:?}", list[0].query);
    assert!(k.cni_not_ready(allot_migrate::orchestrate::Cni::Target, &["n1".into(), "n2".into(), "n3".into()]).await.unwrap() == ["n3"]);
}

#[tokio::test]
async fn fake_api_unreachable_is_unavailable_and_a_resumed_run_goes_on() {
    let api = cluster();
    let k = kube(&api);
    api.set_down(true);
    assert!(matches!(k.node("n1").await, Err(ClusterError::Unavailable(_))));
    // The run gives up after api_timeout without having changed anything...
    let r = Orchestrator::begin(&k, spec(None), &plan(), RunOptions { api_timeout: Duration::from_millis(300), poll: Duration::from_millis(20) }, Box::new(|_, _| {})).await;
    assert!(matches!(r, Err(allot_migrate::orchestrate::Error::Cluster(ClusterError::Unavailable(_)))));
    assert!(api.objects("allot.dev/v1", "Migration").is_empty());
    // ...and when the API is back, the same command runs through.
    api.set_down(false);
    let mut o = Orchestrator::begin(&k, spec(None), &plan(), fast(), Box::new(|_, _| {})).await.unwrap();
    o.apply().await.unwrap();
    assert_eq!(o.status().nodes.iter().map(|n| n.phase).collect::<Vec<_>>(), [NodePhase::Done, NodePhase::Done]);
}
