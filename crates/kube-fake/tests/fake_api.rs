//! The fake API server through a real kube::Client: every test here runs against the fake API
//! (no Kubernetes API server can run in this environment).

use std::collections::BTreeMap;
use std::time::Duration;

use allot_k8s::{AllotNode, IPBlock, IPBlockSpec};
use allot_kube_fake::FakeApiServer;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
    }))
    .unwrap()
}

fn bname(pool: &str, cidr: &str) -> String {
    allot_k8s::block_name(pool, &cidr.parse().unwrap())
}

fn block(pool: &str, cidr: &str, node: &str) -> IPBlock {
    IPBlock::new(&bname(pool, cidr), IPBlockSpec { pool: pool.into(), cidr: cidr.into(), node: node.into() })
}

fn api_code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next_event<S, K>(s: &mut S) -> watcher::Event<K>
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("a watcher event within 5 s")
        .expect("stream open")
        .expect("no watcher error")
}

#[tokio::test]
async fn create_twice_is_409_already_exists_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let created = pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.resource_version.as_deref(), Some(api.revision().to_string().as_str()));
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    let e = pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap_err();
    assert_eq!(api_code(e), (409, "AlreadyExists".into()));

    let blocks: Api<IPBlock> = Api::all(api.client());
    let b = block("default", "10.0.0.0/26", "n1");
    blocks.create(&PostParams::default(), &b).await.unwrap();
    let e = blocks.create(&PostParams::default(), &block("default", "10.0.0.0/26", "n2")).await.unwrap_err();
    assert_eq!(api_code(e), (409, "AlreadyExists".into()));
    // The first grant is what is stored.
    assert_eq!(blocks.get(&b.name_any()).await.unwrap().spec.node, "n1");
    assert_eq!(api.objects("allot.dev/v1", "IPBlock").len(), 1);
    let e = blocks.get("nope").await.unwrap_err();
    assert_eq!(api_code(e), (404, "NotFound".into()));
}

#[tokio::test]
async fn generate_name_and_bad_inputs_fake_api() {
    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "kube-system");
    let mut cm = ConfigMap::default();
    cm.metadata.generate_name = Some("cfg-".into());
    let a = cms.create(&PostParams::default(), &cm).await.unwrap();
    let b = cms.create(&PostParams::default(), &cm).await.unwrap();
    assert!(a.name_any().starts_with("cfg-") && a.name_any().len() == 9, "{}", a.name_any());
    assert_ne!(a.name_any(), b.name_any());
    // No name at all: 422 Invalid, nothing stored.
    let e = cms.create(&PostParams::default(), &ConfigMap::default()).await.unwrap_err();
    assert_eq!(api_code(e), (422, "Invalid".into()));
    // A namespace in the body that is not the path's: 400.
    let mut other = ConfigMap::default();
    other.metadata.name = Some("x".into());
    other.metadata.namespace = Some("elsewhere".into());
    let e = cms.create(&PostParams::default(), &other).await.unwrap_err();
    assert_eq!(api_code(e), (400, "BadRequest".into()));
    // A body of another type than the path's (Cilium's pool sent to allot's ippools): 400.
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("allot.dev", "v1", "IPPool"),
        "ippools",
    );
    let pools: Api<kube::api::DynamicObject> = Api::all_with(api.client(), &ar);
    let cilium: kube::api::DynamicObject = serde_json::from_value(
        json!({"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumPodIPPool", "metadata": {"name": "p"}, "spec": {}}),
    )
    .unwrap();
    assert_eq!(api_code(pools.create(&PostParams::default(), &cilium).await.unwrap_err()), (400, "BadRequest".into()));
    let wrong_kind: kube::api::DynamicObject = serde_json::from_value(
        json!({"apiVersion": "allot.dev/v1", "kind": "IPBlock", "metadata": {"name": "p"}, "spec": {}}),
    )
    .unwrap();
    assert_eq!(api_code(pools.create(&PostParams::default(), &wrong_kind).await.unwrap_err()).0, 400);
    assert!(
        api.objects("allot.dev/v1", "IPPool").is_empty()
            && api.objects("cilium.io/v2alpha1", "CiliumPodIPPool").is_empty()
    );
    // A cluster-scoped kind addressed in a namespace: 404.
    let ar = kube::discovery::ApiResource::erase::<Node>(&());
    let nodes_in_ns: Api<kube::api::DynamicObject> = Api::namespaced_with(api.client(), "default", &ar);
    assert_eq!(api_code(nodes_in_ns.get("n1").await.unwrap_err()).0, 404);
    assert_eq!(api.objects("v1", "ConfigMap").len(), 2);
}

#[tokio::test]
async fn stale_update_is_409_conflict_fake_api() {
    let api = FakeApiServer::new();
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-system");
    let mut l = Lease::default();
    l.metadata.name = Some("allot-operator".into());
    let v1 = leases.create(&PostParams::default(), &l).await.unwrap();
    let mut a = v1.clone();
    a.spec = Some(Default::default());
    a.spec.as_mut().unwrap().holder_identity = Some("a".into());
    let v2 = leases.replace("allot-operator", &PostParams::default(), &a).await.unwrap();
    assert_ne!(v2.metadata.resource_version, v1.metadata.resource_version);
    assert_eq!(v2.metadata.generation, Some(2), "a spec change bumps generation");
    // b still holds v1's resourceVersion: a stale write.
    let mut b = v1.clone();
    b.spec = a.spec.clone();
    b.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let e = leases.replace("allot-operator", &PostParams::default(), &b).await.unwrap_err();
    assert_eq!(api_code(e), (409, "Conflict".into()));
    assert_eq!(leases.get("allot-operator").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("a"));
    // A write that changes nothing keeps the resourceVersion (no event, no new revision).
    let rev = api.revision();
    let same = leases.replace("allot-operator", &PostParams::default(), &v2).await.unwrap();
    assert_eq!(same.metadata.resource_version, v2.metadata.resource_version);
    assert_eq!(api.revision(), rev);
    // Update of an absent object: 404.
    let mut ghost = v2.clone();
    ghost.metadata.name = Some("ghost".into());
    ghost.metadata.resource_version = None;
    assert_eq!(api_code(leases.replace("ghost", &PostParams::default(), &ghost).await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn patch_types_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1", &[("a", "1")])).await.unwrap();
    let pp = PatchParams::default();

    let p = pods.patch("p", &pp, &Patch::Merge(json!({"metadata": {"labels": {"b": "2", "a": null}}}))).await.unwrap();
    assert_eq!(p.labels().get("b").map(String::as_str), Some("2"));
    assert!(!p.labels().contains_key("a"), "null removes in a merge patch");

    let p = pods
        .patch(
            "p",
            &pp,
            &Patch::<()>::Json(
                serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels/c", "value": "3"}])).unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(p.labels().get("c").map(String::as_str), Some("3"));
    // A failing JSON-patch test op: 422, nothing changed.
    let rev = api.revision();
    let e = pods
        .patch(
            "p",
            &pp,
            &Patch::<()>::Json(
                serde_json::from_value(json!([{"op": "test", "path": "/metadata/labels/c", "value": "x"}])).unwrap(),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(e).0, 422);
    assert_eq!(api.revision(), rev);

    let p = pods.patch("p", &pp, &Patch::Strategic(json!({"metadata": {"annotations": {"s": "1"}}}))).await.unwrap();
    assert_eq!(p.annotations().get("s").map(String::as_str), Some("1"));

    // Custom resources take no strategic merge patch (415), as on a real apiserver.
    let blocks: Api<IPBlock> = Api::all(api.client());
    blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    let e = blocks
        .patch(&bname("p", "10.0.0.0/26"), &pp, &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})))
        .await
        .unwrap_err();
    assert_eq!(api_code(e), (415, "UnsupportedMediaType".into()));

    // Server-side apply (as a merge patch) creates what is absent.
    let ssa = PatchParams::apply("allot-test").force();
    let q = pods.patch("q", &ssa, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}, "spec": {"nodeName": "n2", "containers": []}}))).await.unwrap();
    assert_eq!(q.spec.unwrap().node_name.as_deref(), Some("n2"));
    let q = pods
        .patch(
            "q",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(q.labels().get("x").map(String::as_str), Some("y"));

    // An apply patch without apiVersion and kind: 400, as on a real apiserver.
    let e = pods.patch("q", &ssa, &Patch::Apply(json!({"metadata": {"labels": {"x": "z"}}}))).await.unwrap_err();
    assert_eq!(api_code(e).0, 400);

    // A merge patch carrying a stale resourceVersion is checked like an update.
    let e = pods
        .patch("p", &pp, &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"d": "4"}}})))
        .await
        .unwrap_err();
    assert_eq!(api_code(e), (409, "Conflict".into()));
    // Patch of an absent object (not apply): 404.
    assert_eq!(api_code(pods.patch("zz", &pp, &Patch::Merge(json!({}))).await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn status_subresource_fake_api() {
    let api = FakeApiServer::new();
    let anodes: Api<AllotNode> = Api::all(api.client());
    let n: AllotNode = serde_json::from_value(json!({
        "apiVersion": "allot.dev/v1", "kind": "AllotNode", "metadata": {"name": "n1"},
        "spec": {"ipam": {}}, "status": {"ipam": {"operator-status": {"error": "from create"}}},
    }))
    .unwrap();
    let created = anodes.create(&PostParams::default(), &n).await.unwrap();
    assert!(created.status.is_none(), "a custom resource with a status subresource drops status on create");

    let s = anodes.patch_status("n1", &PatchParams::default(), &Patch::Merge(json!({"status": {"ipam": {"operator-status": {"error": "e1"}}}, "spec": {"addresses": [{"type": "InternalIP", "ip": "10.0.0.1"}]}}))).await.unwrap();
    assert_eq!(s.status.as_ref().unwrap().ipam.operator_status.error.as_deref(), Some("e1"));
    assert!(s.spec.addresses.is_empty(), "a /status write changes only status");
    assert_eq!(s.metadata.generation, Some(1), "a status write leaves generation");

    let mut main = s.clone();
    main.spec.addresses = serde_json::from_value(json!([{"type": "InternalIP", "ip": "10.0.0.2"}])).unwrap();
    main.status.as_mut().unwrap().ipam.operator_status.error = Some("overwritten".into());
    let m = anodes.replace("n1", &PostParams::default(), &main).await.unwrap();
    assert_eq!(m.spec.addresses.len(), 1);
    assert_eq!(
        m.status.as_ref().unwrap().ipam.operator_status.error.as_deref(),
        Some("e1"),
        "a main write leaves status"
    );
    assert_eq!(m.metadata.generation, Some(2));

    // Built-in kinds too: Node status through replace_status.
    let nodes: Api<Node> = Api::all(api.client());
    let mut node = Node::default();
    node.metadata.name = Some("n1".into());
    let node = nodes.create(&PostParams::default(), &node).await.unwrap();
    let mut with_status = node.clone();
    with_status.status =
        Some(serde_json::from_value(json!({"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]})).unwrap());
    let got = nodes.replace_status("n1", &PostParams::default(), &with_status).await.unwrap();
    assert_eq!(got.status.unwrap().addresses.unwrap()[0].address, "192.0.2.1");
    // Stale resourceVersion on /status: 409 as well.
    let e = nodes.replace_status("n1", &PostParams::default(), &with_status).await.unwrap_err();
    assert_eq!(api_code(e), (409, "Conflict".into()));
    // A custom resource takes no unconditional update (no resourceVersion): 422.
    let mut blind = m.clone();
    blind.metadata.resource_version = None;
    let e = anodes.replace("n1", &PostParams::default(), &blind).await.unwrap_err();
    assert_eq!(api_code(e), (422, "Invalid".into()));
    // A kind without a status subresource has no /status.
    let blocks: Api<IPBlock> = Api::all(api.client());
    blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    let e = blocks
        .patch_status(&bname("p", "10.0.0.0/26"), &PatchParams::default(), &Patch::Merge(json!({"status": {}})))
        .await
        .unwrap_err();
    assert_eq!(api_code(e).0, 404);
}

#[tokio::test]
async fn delete_preconditions_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let p = pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions { uid: Some("not-it".into()), resource_version: None }),
        ..Default::default()
    };
    assert_eq!(api_code(pods.delete("p", &wrong_uid).await.unwrap_err()), (409, "Conflict".into()));
    let wrong_rv = DeleteParams {
        preconditions: Some(Preconditions { uid: None, resource_version: Some("1".into()) }),
        ..Default::default()
    };
    assert_eq!(api_code(pods.delete("p", &wrong_rv).await.unwrap_err()), (409, "Conflict".into()));
    assert_eq!(api.objects("v1", "Pod").len(), 1, "failed preconditions delete nothing");
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: p.metadata.uid.clone(),
            resource_version: p.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    let gone = pods.delete("p", &right).await.unwrap();
    assert_eq!(gone.left().unwrap().name_any(), "p");
    assert!(api.objects("v1", "Pod").is_empty());
    assert_eq!(api_code(pods.delete("p", &DeleteParams::default()).await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed_fake_api() {
    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("held".into());
    cm.metadata.finalizers = Some(vec!["allot.dev/cleanup".into()]);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let marked = cms.delete("held", &DeleteParams::default()).await.unwrap().left().unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(cms.get("held").await.is_ok(), "a finalizer keeps the object");
    cms.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert_eq!(api_code(cms.get("held").await.unwrap_err()).0, 404, "the last finalizer removed, it is gone");
}

#[tokio::test]
async fn owner_reference_cascade_fake_api() {
    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let owner_of = |o: &ConfigMap| json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": o.name_any(), "uid": o.uid().unwrap()}]);
    let mk = |name: &str| {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c
    };
    let root = cms.create(&PostParams::default(), &mk("root")).await.unwrap();
    let other = cms.create(&PostParams::default(), &mk("other")).await.unwrap();
    // child owned by root; grandchild owned by child; shared owned by root and other.
    let mut child = mk("child");
    child.metadata.owner_references = Some(serde_json::from_value(owner_of(&root)).unwrap());
    let child = cms.create(&PostParams::default(), &child).await.unwrap();
    let mut grandchild = pod("grandchild", "n1", &[]);
    grandchild.metadata.owner_references = Some(serde_json::from_value(owner_of(&child)).unwrap());
    pods.create(&PostParams::default(), &grandchild).await.unwrap();
    let mut shared = pod("shared", "n1", &[]);
    let mut refs = owner_of(&root);
    refs.as_array_mut().unwrap().extend(owner_of(&other).as_array().unwrap().clone());
    shared.metadata.owner_references = Some(serde_json::from_value(refs).unwrap());
    pods.create(&PostParams::default(), &shared).await.unwrap();

    cms.delete("root", &DeleteParams::default()).await.unwrap();
    let names = |v: Vec<serde_json::Value>| {
        v.iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(api.objects("v1", "ConfigMap")), ["other"]);
    assert_eq!(names(api.objects("v1", "Pod")), ["shared"], "grandchild collected, shared kept by its live owner");
    let shared_refs =
        pods.get("shared").await.unwrap().owner_references().iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    assert_eq!(shared_refs, ["other"], "the dangling reference to root is removed, as the GC does");

    // Orphan: the dependent stays and loses the reference.
    let mut dep = mk("dep");
    dep.metadata.owner_references = Some(serde_json::from_value(owner_of(&other)).unwrap());
    cms.create(&PostParams::default(), &dep).await.unwrap();
    cms.delete("other", &DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..Default::default() })
        .await
        .unwrap();
    let dep = cms.get("dep").await.unwrap();
    assert!(dep.owner_references().is_empty());
    assert!(pods.get("shared").await.unwrap().owner_references().iter().all(|r| r.uid != other.uid().unwrap()));
}

#[tokio::test]
async fn selectors_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("a", "n1", &[("app", "x"), ("tier", "web")])).await.unwrap();
    pods.create(&PostParams::default(), &pod("b", "n2", &[("app", "y")])).await.unwrap();
    pods.create(&PostParams::default(), &pod("c", "n1", &[])).await.unwrap();
    Api::<Pod>::namespaced(api.client(), "other")
        .create(&PostParams::default(), &pod("d", "n1", &[("app", "x")]))
        .await
        .unwrap();
    let names = |l: kube::core::ObjectList<Pod>| l.items.iter().map(|p| p.name_any()).collect::<Vec<_>>();
    let list = |sel: &str| ListParams::default().labels(sel);
    assert_eq!(names(pods.list(&list("app=x")).await.unwrap()), ["a"]);
    assert_eq!(names(pods.list(&list("app in (x,y)")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(pods.list(&list("!app")).await.unwrap()), ["c"]);
    assert_eq!(names(pods.list(&list("app,tier!=web")).await.unwrap()), ["b"]);
    assert_eq!(names(pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap()), ["a", "c"]);
    let all: Api<Pod> = Api::all(api.client());
    assert_eq!(
        names(all.list(&ListParams::default().fields("spec.nodeName=n1,metadata.namespace!=default")).await.unwrap()),
        ["d"]
    );
    let l = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(l.metadata.resource_version, Some(api.revision().to_string()));
    let e = pods.list(&list("app in x")).await.unwrap_err();
    assert_eq!(api_code(e).0, 400);
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted_in_order_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("before", "n1", &[])).await.unwrap();
    let mut w = watcher(pods.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Init));
    assert!(matches!(next_event(&mut w).await, watcher::Event::InitApply(p) if p.name_any() == "before"));
    assert!(matches!(next_event(&mut w).await, watcher::Event::InitDone));
    pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"k": "v"}}}))).await.unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert!(
        matches!(next_event(&mut w).await, watcher::Event::Apply(p) if p.name_any() == "p" && p.labels().is_empty())
    );
    assert!(matches!(next_event(&mut w).await, watcher::Event::Apply(p) if p.labels().get("k").is_some()));
    assert!(matches!(next_event(&mut w).await, watcher::Event::Delete(p) if p.name_any() == "p"));
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_misses_nothing_fake_api() {
    let api = FakeApiServer::new();
    let blocks: Api<IPBlock> = Api::all(api.client());
    blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    let mut w = watcher(blocks.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Init));
    assert!(matches!(next_event(&mut w).await, watcher::Event::InitApply(_)));
    assert!(matches!(next_event(&mut w).await, watcher::Event::InitDone));

    // An event proves the watch is open; then a plain break: the watcher re-watches from its
    // resourceVersion and sees what happened meanwhile.
    blocks.create(&PostParams::default(), &block("p", "10.0.0.64/26", "n1")).await.unwrap();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Apply(b) if b.spec.cidr == "10.0.0.64/26"));
    api.break_watches();
    blocks.create(&PostParams::default(), &block("p", "10.0.1.0/26", "n1")).await.unwrap();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Apply(b) if b.spec.cidr == "10.0.1.0/26"));

    // Changes while the watch is gone, then a compaction: 410 Expired, a re-list with both.
    api.break_watches();
    blocks.create(&PostParams::default(), &block("p", "10.0.0.128/26", "n2")).await.unwrap();
    blocks.delete(&bname("p", "10.0.0.0/26"), &DeleteParams::default()).await.unwrap();
    api.compact();
    let mut seen = Vec::new();
    let mut saw_init = false;
    let mut saw_410 = false;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open");
        match item {
            // kube's watcher passes the 410 on as an error, then re-lists.
            Err(watcher::Error::WatchError(s)) if s.code == 410 && !saw_init => saw_410 = true,
            Err(e) => panic!("unexpected watcher error {e:?}"),
            Ok(watcher::Event::Init) => saw_init = true,
            Ok(watcher::Event::InitApply(b)) => seen.push(b.spec.cidr),
            Ok(watcher::Event::InitDone) => break,
            Ok(other) => panic!("expected a re-list, got {other:?}"),
        }
    }
    assert!(saw_410 && saw_init);
    seen.sort();
    assert_eq!(seen, ["10.0.0.128/26", "10.0.0.64/26", "10.0.1.0/26"]);
    let watches = api.requests().into_iter().filter(|r| r.verb == "watch").count();
    assert!(watches >= 3, "watched {watches} times");
}

#[tokio::test]
async fn raw_watch_gets_410_expired_after_compaction_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let old = pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap().resource_version().unwrap();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}}))).await.unwrap();
    api.compact();
    let mut s = pods.watch(&WatchParams::default(), &old).await.unwrap().boxed();
    match s.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(s.try_next().await.unwrap().is_none(), "the stream ends after the error");
}

#[tokio::test]
async fn watch_with_selector_and_bookmarks_fake_api() {
    let api = FakeApiServer::new();
    api.set_bookmark_interval(Duration::from_millis(50));
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let rv = pods
        .create(&PostParams::default(), &pod("p", "n1", &[("app", "x")]))
        .await
        .unwrap()
        .resource_version()
        .unwrap();
    let wp = WatchParams::default().labels("app=x");
    let mut s = pods.watch(&wp, &rv).await.unwrap().boxed();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})))
        .await
        .unwrap();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "x"}}})))
        .await
        .unwrap();
    // Bookmarks may come at any time (every 50 ms) but never ahead of an event sent before them:
    // a bookmark's resourceVersion is at least that of every event already received.
    let mut types = Vec::new();
    let mut last_rv = rv.parse::<u64>().unwrap();
    let rv_of = |m: &kube::core::ObjectMeta| m.resource_version.as_ref().unwrap().parse::<u64>().unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.try_next()).await.unwrap().unwrap().unwrap() {
            WatchEvent::Added(p) => {
                last_rv = rv_of(&p.metadata);
                types.push("ADDED")
            }
            WatchEvent::Modified(_) => types.push("MODIFIED"),
            WatchEvent::Deleted(p) => {
                // As the watch cache: the previous content, at the change's resourceVersion.
                assert_eq!(p.labels()["app"], "x", "DELETED carries the object as it last matched");
                last_rv = rv_of(&p.metadata);
                assert_eq!(last_rv, rv.parse::<u64>().unwrap() + 1);
                types.push("DELETED")
            }
            WatchEvent::Bookmark(b) => {
                let at = b.metadata.resource_version.parse::<u64>().unwrap();
                assert!(at >= last_rv, "bookmark at {at} behind an event at {last_rv}");
                if types.len() == 2 {
                    assert_eq!(at, api.revision());
                    break;
                }
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(types, ["DELETED", "ADDED"]);
}

#[tokio::test]
async fn reflector_store_converges_fake_api() {
    let api = FakeApiServer::new();
    let nodes: Api<Node> = Api::all(api.client());
    let mk = |name: &str| {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n
    };
    for n in ["n1", "n2", "n3"] {
        nodes.create(&PostParams::default(), &mk(n)).await.unwrap();
    }
    let (reader, writer) = reflector::store();
    let stream =
        reflector(writer, watcher(nodes.clone(), watcher::Config::default())).default_backoff().applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    nodes.delete("n2", &DeleteParams::default()).await.unwrap();
    nodes.create(&PostParams::default(), &mk("n4")).await.unwrap();
    // A restart in between, with a compaction: the reflector re-lists and still converges.
    api.break_watches();
    api.compact();
    nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"z": "1"}}})))
        .await
        .unwrap();
    let want = ["n1", "n3", "n4"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut names: Vec<String> = reader.state().iter().map(|n| n.name_any()).collect();
        names.sort();
        let labelled = reader.get(&reflector::ObjectRef::new("n1")).is_some_and(|n| n.labels().contains_key("z"));
        if names == want && labelled {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "store did not converge: {names:?} labelled={labelled}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test]
async fn set_down_fails_calls_and_recovers_fake_api() {
    let api = FakeApiServer::new();
    let nss: Api<Namespace> = Api::all(api.client());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("allot-system".into());
    nss.create(&PostParams::default(), &ns).await.unwrap();
    let mut s = nss.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    assert!(matches!(s.try_next().await.unwrap(), Some(WatchEvent::Added(_))));
    api.set_down(true);
    match nss.get("allot-system").await.unwrap_err() {
        kube::Error::Service(_) | kube::Error::HyperError(_) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(s.try_next().await.is_err(), "an open watch ends with a transport error");
    assert_eq!(api.requests().last().unwrap().status, 0);
    api.set_down(false);
    assert_eq!(nss.get("allot-system").await.unwrap().name_any(), "allot-system");
}

#[tokio::test]
async fn requests_record_verbs_content_types_and_bodies_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    pods.get("p").await.unwrap();
    pods.list(&ListParams::default().labels("a=b")).await.unwrap();
    pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}}))).await.unwrap();
    pods.evict("p", &Default::default()).await.unwrap();
    let reqs = api.requests();
    let verbs: Vec<(&str, Option<&str>, u16)> =
        reqs.iter().map(|r| (r.verb.as_str(), r.subresource.as_deref(), r.status)).collect();
    assert_eq!(
        verbs,
        [
            ("create", None, 201),
            ("get", None, 200),
            ("list", None, 200),
            ("patch", None, 200),
            ("create", Some("eviction"), 201)
        ]
    );
    assert_eq!(reqs[0].body.as_ref().unwrap()["spec"]["nodeName"], "n1");
    assert_eq!(reqs[0].namespace.as_deref(), Some("default"));
    assert!(reqs[2].query.contains("labelSelector=a%3Db"), "{}", reqs[2].query);
    assert_eq!(reqs[3].content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(reqs[3].body.as_ref().unwrap()["metadata"]["labels"]["a"], "b");
    assert_eq!(reqs[4].body.as_ref().unwrap()["metadata"]["name"], "p");
    assert!(api.objects("v1", "Pod").is_empty(), "the eviction deleted the pod");
    let rbac: Vec<(String, String, String)> = api.rbac_used().into_iter().collect();
    let want = [
        ("", "pods", "create"),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "patch"),
        ("", "pods/eviction", "create"),
    ];
    assert_eq!(rbac, want.map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())));
    api.clear_requests();
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn fail_next_injects_the_status_count_times_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    api.fail_next("create", "pods/eviction", 429, 2);
    api.fail_next("get", "pods", 500, 1);
    for _ in 0..2 {
        assert_eq!(api_code(pods.evict("p", &Default::default()).await.unwrap_err()), (429, "TooManyRequests".into()));
        assert_eq!(api.objects("v1", "Pod").len(), 1, "a refused eviction deletes nothing");
    }
    assert_eq!(api_code(pods.get("p").await.unwrap_err()), (500, "InternalError".into()));
    assert!(pods.get("p").await.is_ok(), "one failure only");
    let status = pods.evict("p", &Default::default()).await.unwrap();
    assert_eq!(status.code, 201);
    assert!(api.objects("v1", "Pod").is_empty());
    let codes: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
    assert_eq!(codes, [201, 429, 429, 500, 200, 201]);
}

#[tokio::test]
async fn insert_seeds_objects_that_clients_and_watches_see_fake_api() {
    let api = FakeApiServer::new();
    api.insert(json!({"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumPodIPPool", "metadata": {"name": "default"}, "spec": {"ipv4": {"cidrs": ["10.0.0.0/16"], "maskSize": 24}}}));
    api.insert(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}, "spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Running"}}));
    let pools = api.objects("cilium.io/v2alpha1", "CiliumPodIPPool");
    assert_eq!(pools.len(), 1);
    assert!(pools[0]["metadata"]["uid"].is_string());
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    let p = pods.get("p").await.unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    let running = pods.list(&ListParams::default().fields("status.phase=Running")).await.unwrap();
    assert_eq!(running.items.len(), 1);
    // An open watch sees a seed as ADDED.
    let mut w = pods.watch(&WatchParams::default(), &api.revision().to_string()).await.unwrap().boxed();
    api.insert(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "namespace": "default"}, "spec": {"containers": []}}));
    match tokio::time::timeout(Duration::from_secs(5), w.try_next()).await.unwrap().unwrap() {
        Some(WatchEvent::Added(q)) => assert_eq!(q.name_any(), "q"),
        other => panic!("expected ADDED q, got {other:?}"),
    }
    // A dynamic API over the seeded custom resource works too.
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("cilium.io", "v2alpha1", "CiliumPodIPPool"),
        "ciliumpodippools",
    );
    let dynamic: Api<kube::api::DynamicObject> = Api::all_with(api.client(), &ar);
    let got = dynamic.get("default").await.unwrap();
    assert_eq!(got.data["spec"]["ipv4"]["maskSize"], 24);
}

#[tokio::test]
async fn deletecollection_and_foreground_order_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    for (n, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        pods.create(&PostParams::default(), &pod(n, "n1", &[("app", app)])).await.unwrap();
    }
    let gone = pods.delete_collection(&DeleteParams::default(), &ListParams::default().labels("app=x")).await.unwrap();
    let gone: Vec<String> = gone.left().unwrap().items.iter().map(|p| p.name_any()).collect();
    assert_eq!(gone, ["a", "b"]);
    assert_eq!(api.objects("v1", "Pod").len(), 1);

    // Foreground: the dependent's DELETED comes before the owner's.
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let mut owner = ConfigMap::default();
    owner.metadata.name = Some("owner".into());
    let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
    let mut dep = pod("dep", "n1", &[]);
    dep.metadata.owner_references = Some(
        serde_json::from_value(
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()}]),
        )
        .unwrap(),
    );
    pods.create(&PostParams::default(), &dep).await.unwrap();
    let rev = api.revision();
    cms.delete("owner", &DeleteParams::foreground()).await.unwrap();
    let all_pods: Api<Pod> = Api::all(api.client());
    let mut ps = all_pods.watch(&WatchParams::default(), &rev.to_string()).await.unwrap().boxed();
    let mut cs = cms.watch(&WatchParams::default(), &rev.to_string()).await.unwrap().boxed();
    let (Some(WatchEvent::Deleted(p)), Some(WatchEvent::Deleted(c))) =
        (ps.try_next().await.unwrap(), cs.try_next().await.unwrap())
    else {
        panic!("expected two DELETED events");
    };
    let rv = |o: &kube::core::ObjectMeta| o.resource_version.as_ref().unwrap().parse::<u64>().unwrap();
    assert!(rv(&p.metadata) < rv(&c.metadata), "dependent first: {} < {}", rv(&p.metadata), rv(&c.metadata));
}

#[tokio::test]
async fn watch_timeout_ends_the_stream_fake_api() {
    let api = FakeApiServer::new();
    api.set_bookmark_interval(Duration::from_millis(50));
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-system");
    let mut s = leases.watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0").await.unwrap().boxed();
    let end = tokio::time::timeout(Duration::from_secs(5), s.try_next()).await.expect("the stream ends within 5 s");
    assert!(end.unwrap().is_none());
}

#[tokio::test]
async fn streaming_list_watcher_fake_api() {
    let api = FakeApiServer::new();
    let blocks: Api<IPBlock> = Api::all(api.client());
    blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    let mut w = watcher(blocks.clone(), watcher::Config::default().streaming_lists()).boxed();
    // kube 4.2's streaming list starts with InitApply (no Init) and ends at the annotated bookmark.
    let mut initial = Vec::new();
    loop {
        match next_event(&mut w).await {
            watcher::Event::Init => {}
            watcher::Event::InitApply(b) => initial.push(b.spec.cidr),
            watcher::Event::InitDone => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(initial, ["10.0.0.0/26"]);
    blocks.create(&PostParams::default(), &block("p", "10.0.0.64/26", "n1")).await.unwrap();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Apply(b) if b.spec.cidr == "10.0.0.64/26"));
    assert!(api.requests().iter().all(|r| r.verb != "list"), "a streaming list is a watch only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_one_wins_fake_api() {
    let api = FakeApiServer::new();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let blocks: Api<IPBlock> = Api::all(api.client());
            tokio::spawn(async move {
                blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", &format!("n{i}"))).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(api_code(e), (409, "AlreadyExists".into())),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(api.objects("allot.dev/v1", "IPBlock").len(), 1);
}

#[tokio::test]
async fn controller_reconciles_against_the_fake_api() {
    use kube::runtime::controller::{Action, Controller};
    use std::sync::Arc;

    #[derive(Debug)]
    struct Never;
    impl std::fmt::Display for Never {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("never")
        }
    }
    impl std::error::Error for Never {}

    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    for n in ["a", "b"] {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(n.into());
        cms.create(&PostParams::default(), &c).await.unwrap();
    }
    let ctx = Arc::new(cms.clone());
    let run = Controller::new(cms.clone(), watcher::Config::default())
        .run(
            |cm: Arc<ConfigMap>, cms: Arc<Api<ConfigMap>>| async move {
                if cm.annotations().get("seen").is_none() {
                    cms.patch(
                        &cm.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {"seen": "yes"}}})),
                    )
                    .await
                    .unwrap();
                }
                Ok::<_, Never>(Action::await_change())
            },
            |_, _: &Never, _| Action::await_change(),
            ctx,
        )
        .for_each(|_| async {});
    let task = tokio::spawn(run);
    let mut c = ConfigMap::default();
    c.metadata.name = Some("late".into());
    cms.create(&PostParams::default(), &c).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen =
            api.objects("v1", "ConfigMap").iter().filter(|o| o["metadata"]["annotations"]["seen"] == "yes").count();
        if seen == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen} of 3 reconciled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test]
async fn register_declares_an_unknown_resource_fake_api() {
    let api = FakeApiServer::new();
    api.register(
        "example.com/v1",
        "widgets",
        allot_kube_fake::ResourceInfo { kind: "Widget".into(), namespaced: true, status: true },
    );
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<kube::api::DynamicObject> = Api::namespaced_with(api.client(), "ns1", &ar);
    let mut w = kube::api::DynamicObject::new("w", &ar);
    w.data = json!({"spec": {"size": 1}, "status": {"ready": true}});
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert!(created.data.get("status").is_none(), "a custom resource with a status subresource drops status on create");
    let s = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}, "spec": {"size": 9}})),
        )
        .await
        .unwrap();
    assert_eq!((s.data["status"]["ready"].clone(), s.data["spec"]["size"].clone()), (json!(true), json!(1)));
    let all: Api<kube::api::DynamicObject> = Api::all_with(api.client(), &ar);
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 1);
    // Registered as namespaced: a cluster-scoped get is refused.
    assert_eq!(api_code(all.get("w").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn eviction_preconditions_and_namespace_deletion_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "team");
    let p = pods.create(&PostParams::default(), &pod("p", "n1", &[])).await.unwrap();
    let wrong = kube::api::EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(Preconditions { uid: Some("other".into()), resource_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(api_code(pods.evict("p", &wrong).await.unwrap_err()), (409, "Conflict".into()));
    let right = kube::api::EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(Preconditions { uid: p.uid(), resource_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.evict("p", &right).await.unwrap();
    assert!(api.objects("v1", "Pod").is_empty());

    // Deleting a namespace deletes what is in it, not what is elsewhere or cluster-scoped.
    let nss: Api<Namespace> = Api::all(api.client());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("team".into());
    nss.create(&PostParams::default(), &ns).await.unwrap();
    pods.create(&PostParams::default(), &pod("a", "n1", &[])).await.unwrap();
    Api::<Lease>::namespaced(api.client(), "team")
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap())
        .await
        .unwrap();
    Api::<Pod>::namespaced(api.client(), "other").create(&PostParams::default(), &pod("b", "n1", &[])).await.unwrap();
    let mut node = Node::default();
    node.metadata.name = Some("n1".into());
    Api::<Node>::all(api.client()).create(&PostParams::default(), &node).await.unwrap();
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    let pods_left: Vec<_> =
        api.objects("v1", "Pod").iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(pods_left, ["b"]);
    assert!(api.objects("coordination.k8s.io/v1", "Lease").is_empty());
    assert_eq!(api.objects("v1", "Node").len(), 1);
    assert!(api.objects("v1", "Namespace").is_empty());
}

#[tokio::test]
async fn watcher_with_backoff_rides_out_injected_list_and_watch_failures_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("a", "n1", &[])).await.unwrap();
    api.fail_next("list", "pods", 503, 1);
    api.fail_next("watch", "pods", 500, 1);
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        reflector(writer, watcher(pods.clone(), watcher::Config::default())).default_backoff().for_each(|_| async {}),
    );
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready()).await.unwrap().unwrap();
    pods.create(&PostParams::default(), &pod("b", "n1", &[])).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reader.state().len() != 2 {
        assert!(tokio::time::Instant::now() < deadline, "store has {} pods", reader.state().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed: Vec<(String, u16)> =
        api.requests().iter().filter(|r| r.status >= 500).map(|r| (r.verb.clone(), r.status)).collect();
    assert_eq!(failed, [("list".to_string(), 503), ("watch".to_string(), 500)]);
    task.abort();
}

#[tokio::test]
async fn metadata_calls_get_partial_object_metadata_fake_api() {
    let api = FakeApiServer::new();
    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("a", "n1", &[("app", "x")])).await.unwrap();
    let m = pods.get_metadata("a").await.unwrap();
    assert_eq!(m.types.as_ref().map(|t| t.kind.as_str()), Some("PartialObjectMetadata"));
    assert_eq!(m.metadata.labels.unwrap()["app"], "x");
    let l = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(l.items.len(), 1);
    let meta_pods: Api<kube::core::PartialObjectMeta<Pod>> = Api::namespaced(api.client(), "default");
    let mut w = watcher(meta_pods, watcher::Config::default()).boxed();
    loop {
        if let watcher::Event::InitDone = next_event(&mut w).await {
            break;
        }
    }
    pods.create(&PostParams::default(), &pod("b", "n1", &[])).await.unwrap();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Apply(m) if m.metadata.name.as_deref() == Some("b")));
    let watched = api.requests().into_iter().find(|r| r.verb == "watch").unwrap();
    assert_eq!(watched.status, 200);
}

#[tokio::test]
async fn limit_and_continue_page_through_a_snapshot_fake_api() {
    let api = FakeApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    for i in 0..5 {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(format!("c{i}"));
        cms.create(&PostParams::default(), &c).await.unwrap();
    }
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().unwrap();
    // A change after the first page is not in the later pages: they come from its snapshot.
    cms.delete("c4", &DeleteParams::default()).await.unwrap();
    let second = cms.list(&ListParams::default().limit(2).continue_token(&token)).await.unwrap();
    let third = cms
        .list(&ListParams::default().limit(2).continue_token(second.metadata.continue_.as_deref().unwrap()))
        .await
        .unwrap();
    let names: Vec<String> =
        [first.items, second.items, third.items.clone()].concat().iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    assert!(third.metadata.continue_.is_none());
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    // A used token is refused; one from before a compaction is 410.
    assert_eq!(api_code(cms.list(&ListParams::default().continue_token(&token)).await.unwrap_err()).0, 400);
    let again = cms.list(&ListParams::default().limit(1)).await.unwrap();
    cms.delete("c3", &DeleteParams::default()).await.unwrap();
    api.compact();
    let e = cms
        .list(&ListParams::default().limit(1).continue_token(again.metadata.continue_.as_deref().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(api_code(e), (410, "Expired".into()));
    // kube's watcher pages its lists: a page size smaller than the list still gives everything.
    let mut w = watcher(cms.clone(), watcher::Config::default().page_size(1)).boxed();
    let mut seen = 0;
    loop {
        match next_event(&mut w).await {
            watcher::Event::InitApply(_) => seen += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, 3);
}

#[tokio::test]
async fn dry_run_writes_nothing_fake_api() {
    let api = FakeApiServer::new();
    let blocks: Api<IPBlock> = Api::all(api.client());
    let dry = PostParams { dry_run: true, ..Default::default() };
    let b = blocks.create(&dry, &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    assert_eq!(b.spec.node, "n1");
    assert!(api.objects("allot.dev/v1", "IPBlock").is_empty());
    let rev = api.revision();
    blocks.create(&PostParams::default(), &block("p", "10.0.0.0/26", "n1")).await.unwrap();
    // A dry-run create of an existing name still gets its 409.
    assert_eq!(api_code(blocks.create(&dry, &block("p", "10.0.0.0/26", "n2")).await.unwrap_err()).0, 409);
    let name = bname("p", "10.0.0.0/26");
    blocks.delete(&name, &DeleteParams { dry_run: true, ..Default::default() }).await.unwrap();
    assert_eq!(api.objects("allot.dev/v1", "IPBlock").len(), 1);
    assert_eq!(api.revision(), rev + 1, "only the real create wrote");
}

#[tokio::test]
async fn a_dependent_written_after_its_owner_went_is_collected_fake_api() {
    let api = FakeApiServer::new();
    let nodes: Api<Node> = Api::all(api.client());
    let blocks: Api<IPBlock> = Api::all(api.client());
    let mut node = Node::default();
    node.metadata.name = Some("n1".into());
    let node = nodes.create(&PostParams::default(), &node).await.unwrap();
    let owned = |cidr: &str| {
        let mut b = block("p", cidr, "n1");
        b.metadata.owner_references = Some(
            serde_json::from_value(
                json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node.uid().unwrap()}]),
            )
            .unwrap(),
        );
        b
    };
    blocks.create(&PostParams::default(), &owned("10.0.0.0/26")).await.unwrap();
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    assert!(api.objects("allot.dev/v1", "IPBlock").is_empty(), "the node's block went with it");
    // A grant racing the node's deletion: the create succeeds, the collector removes it.
    let rev = api.revision();
    let late = blocks.create(&PostParams::default(), &owned("10.0.0.64/26")).await.unwrap();
    assert_eq!(late.spec.cidr, "10.0.0.64/26");
    assert!(api.objects("allot.dev/v1", "IPBlock").is_empty());
    assert_eq!(api.revision(), rev + 2, "created, then deleted");
}

#[tokio::test]
async fn admission_check_denies_and_changes_nothing_fake_api() {
    use allot_k8s::IPPool;
    let api = FakeApiServer::new();
    // Stand-in webhook: a pool's CIDRs cannot change while it has blocks; no deleting pods.
    api.add_admission("ippool-in-use.allot.dev", |req| {
        if req.resource == "ippools" && req.operation == "UPDATE" {
            let (new, old) = (req.object.unwrap(), req.old_object.unwrap());
            let held = req.objects("allot.dev/v1", "IPBlock").iter().filter(|b| b["spec"]["pool"] == req.name).count();
            if held > 0 && new["spec"] != old["spec"] {
                return Err(format!("pool {} has {held} blocks: its CIDRs cannot change", req.name));
            }
        }
        if req.resource == "pods" && req.operation == "DELETE" {
            return Err("pods are protected in this test".into());
        }
        Ok(())
    });
    let pools: Api<IPPool> = Api::all(api.client());
    let pool: IPPool = serde_json::from_value(json!({"apiVersion": "allot.dev/v1", "kind": "IPPool", "metadata": {"name": "p"}, "spec": {"ipv4": {"cidrs": ["10.0.0.0/24"], "maskSize": 26}}})).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let change = Patch::Merge(json!({"spec": {"ipv4": {"cidrs": ["10.1.0.0/24"]}}}));
    // No blocks yet: allowed.
    pools.patch("p", &PatchParams::default(), &change).await.unwrap();
    let blocks: Api<IPBlock> = Api::all(api.client());
    blocks.create(&PostParams::default(), &block("p", "10.1.0.0/26", "n1")).await.unwrap();
    let rev = api.revision();
    let back = Patch::Merge(json!({"spec": {"ipv4": {"cidrs": ["10.0.0.0/24"]}}}));
    let e = pools.patch("p", &PatchParams::default(), &back).await.unwrap_err();
    match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 400);
            assert!(
                s.message.starts_with(
                    "admission webhook \"ippool-in-use.allot.dev\" denied the request: pool p has 1 blocks"
                ),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(api.revision(), rev, "a denied write stores nothing");
    assert_eq!(pools.get("p").await.unwrap().spec.ipv4.unwrap().cidrs, ["10.1.0.0/24"]);

    let pods: Api<Pod> = Api::namespaced(api.client(), "default");
    pods.create(&PostParams::default(), &pod("x", "n1", &[])).await.unwrap();
    assert_eq!(api_code(pods.delete("x", &DeleteParams::default()).await.unwrap_err()).0, 400);
    assert_eq!(
        api_code(pods.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap_err()).0,
        400
    );
    assert_eq!(api.objects("v1", "Pod").len(), 1);
}
