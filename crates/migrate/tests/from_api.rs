//! `ClusterSnapshot::from_api` against the in-process fake API server (allot-kube-fake; no real
//! API server runs here): the live read lists the same objects as the kubectl dump, so the plan
//! is the same, and it sends only cluster-wide lists (it changes nothing).

use allot_kube_fake::FakeApiServer;
use allot_migrate::plan::{PlanOptions, plan};
use allot_migrate::snapshot::ClusterSnapshot;
use serde_json::Value;

const CLUSTER: &str = include_str!("fixtures/canal-cluster.yaml");
const KKP: &str = include_str!("fixtures/kkp-cluster.yaml");

fn seeded() -> FakeApiServer {
    let api = FakeApiServer::new();
    let list: Value = serde_saphyr::from_str(CLUSTER).unwrap();
    for item in list["items"].as_array().unwrap() {
        api.insert(item.clone());
    }
    api
}

#[tokio::test]
async fn fake_api_live_read_gives_the_same_plan_as_the_dump() {
    let api = seeded();
    let live = ClusterSnapshot::from_api(api.client()).await.unwrap();
    let dump = ClusterSnapshot::from_yaml(CLUSTER).unwrap();
    assert_eq!(
        (live.nodes.len(), live.pods.len(), live.daemonsets.len(), live.replicasets.len()),
        (4, 29, 4, 4)
    );
    assert_eq!((live.deployments.len(), live.statefulsets.len(), live.jobs.len(), live.pdbs.len()), (4, 1, 1, 2));

    let o = PlanOptions { to: "allot".into(), self_node: Some("worker-a".into()), ..Default::default() };
    let (a, b) = (plan(&live, &o).unwrap(), plan(&dump, &o).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.from, "canal:3.27.3");

    // Reading is only listing, cluster-wide.
    let reqs = api.requests();
    assert!(reqs.iter().all(|r| r.verb == "list" && r.namespace.is_none() && r.status == 200), "{reqs:#?}");
    let mut resources: Vec<&str> = reqs.iter().map(|r| r.resource.as_str()).collect();
    resources.sort();
    assert_eq!(
        resources,
        ["daemonsets", "deployments", "jobs", "nodes", "poddisruptionbudgets", "pods", "replicasets", "statefulsets"]
    );
}

#[tokio::test]
async fn fake_api_kkp_cluster_is_read_from_the_seed() {
    let seed = FakeApiServer::new();
    let cluster: Value = serde_saphyr::from_str(KKP).unwrap();
    seed.insert(cluster);
    let c = ClusterSnapshot::kkp_cluster_from_api(seed.client(), "xk7v2qpdm4").await.unwrap();
    assert_eq!(c.spec.cni_plugin.as_ref().map(|p| (p.kind.as_str(), p.version.as_str())), Some(("canal", "v3.27")));
    assert_eq!(c.spec.cluster_network.proxy_mode.as_deref(), Some("ipvs"));
    assert!(!c.metadata.labels.contains_key("unsafe-cni-migration"));

    let e = ClusterSnapshot::kkp_cluster_from_api(seed.client(), "nope").await.unwrap_err().to_string();
    assert!(e.contains("clusters.kubermatic.k8c.io"), "{e}");
}

#[tokio::test]
async fn fake_api_unreachable_is_an_error_that_names_what_failed() {
    let api = seeded();
    api.set_down(true);
    let e = ClusterSnapshot::from_api(api.client()).await.unwrap_err().to_string();
    assert!(e.starts_with("listing nodes from the API server failed"), "{e}");
}
