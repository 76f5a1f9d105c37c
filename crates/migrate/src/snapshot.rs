//! The cluster as read: the objects a migration plan looks at, from a `kubectl get -o yaml` dump
//! or live through kube-rs. Planning works on this value only, so a plan from a dump and a plan
//! from the live cluster are computed by the same code.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::Value;

/// The kinds `kubectl get nodes,pods,daemonsets,replicasets,deployments,statefulsets,jobs,
/// poddisruptionbudgets -A -o yaml` prints, plus an optional KKP `Cluster` object.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub daemonsets: Vec<DaemonSet>,
    pub replicasets: Vec<ReplicaSet>,
    pub deployments: Vec<Deployment>,
    pub statefulsets: Vec<StatefulSet>,
    pub jobs: Vec<Job>,
    pub pdbs: Vec<PodDisruptionBudget>,
    /// The KKP user cluster's `Cluster` object (it lives in the seed cluster).
    pub kkp_cluster: Option<KkpCluster>,
    /// What the reader skipped and why (unknown kinds), for the plan's text output.
    pub notes: Vec<String>,
}

/// KKP's `kubermatic.k8c.io/v1` `Cluster`, as far as the plan and KKP's rules read it.
pub use allot_kkp::Cluster as KkpCluster;

pub use allot_kkp::cluster::API_VERSION as KKP_API_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{source_name}: document {document} (line {line}) is not valid YAML: {message}")]
    Yaml { source_name: String, document: usize, line: usize, message: String },
    #[error("{source_name}: document {document} (line {line}){item}: {message}")]
    Object { source_name: String, document: usize, line: usize, item: String, message: String },
    #[error("two KKP Cluster objects ({first} and {second}): a snapshot describes one user cluster; give only its own")]
    TwoKkpClusters { first: String, second: String },
    #[error("listing {kind} from the API server failed: {source}")]
    Api { kind: &'static str, source: Box<kube::Error> },
}

impl ClusterSnapshot {
    /// Reads a kubectl dump: several YAML documents (`---`), each one object or a `List` of
    /// objects (what `kubectl get ... -o yaml` prints). Kinds a plan does not use are skipped
    /// with a note.
    pub fn from_yaml(text: &str) -> Result<Self, SnapshotError> {
        let mut snap = ClusterSnapshot::default();
        snap.add_yaml(text, "snapshot")?;
        Ok(snap)
    }

    /// Adds the objects of one more dump (e.g. the KKP `Cluster` from the seed cluster, in a
    /// second file); `source_name` names it in errors.
    pub fn add_yaml(&mut self, text: &str, source_name: &str) -> Result<(), SnapshotError> {
        for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
            let document = index + 1;
            let value: Option<Value> = serde_saphyr::from_str(&doc).map_err(|e| SnapshotError::Yaml {
                source_name: source_name.to_string(),
                document,
                line,
                message: first_line(&e.to_string()),
            })?;
            let Some(value) = value else { continue };
            let err = |item: String, message: String| SnapshotError::Object {
                source_name: source_name.to_string(),
                document,
                line,
                item,
                message,
            };
            if !value.is_object() {
                return Err(err(String::new(), "expected a Kubernetes object (a mapping with apiVersion and kind)".into()));
            }
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
            if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
                let Some(items) = value.get("items").and_then(Value::as_array) else {
                    return Err(err(String::new(), format!("a {kind} needs an `items` sequence")));
                };
                // Typed lists (`PodList`) leave apiVersion/kind off their items.
                let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty()).map(str::to_string);
                for (i, item) in items.iter().enumerate() {
                    let mut item = item.clone();
                    if let (Some(k), Some(obj)) = (&item_kind, item.as_object_mut()) {
                        obj.entry("kind").or_insert_with(|| Value::String(k.clone()));
                    }
                    self.add_object(item).map_err(|m| err(format!(", item {}{}", i + 1, describe(&items[i])), m))?;
                }
            } else {
                self.add_object(value.clone()).map_err(|m| err(describe(&value), m))?;
            }
        }
        Ok(())
    }

    /// Adds one object by its kind; unknown kinds are noted, not errors.
    fn add_object(&mut self, value: Value) -> Result<(), String> {
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_string) else {
            return Err("no `kind`: every object needs apiVersion and kind, as kubectl prints them".into());
        };
        fn typed<T: serde::de::DeserializeOwned>(value: Value, kind: &str) -> Result<T, String> {
            serde_json::from_value(value).map_err(|e| format!("not a valid {kind}: {e}"))
        }
        // `apiVersion` is checked for the kinds whose name other groups reuse (KKP's `Cluster`).
        match kind.as_str() {
            "Node" => self.nodes.push(typed(value, &kind)?),
            "Pod" => self.pods.push(typed(value, &kind)?),
            "DaemonSet" => self.daemonsets.push(typed(value, &kind)?),
            "ReplicaSet" => self.replicasets.push(typed(value, &kind)?),
            "Deployment" => self.deployments.push(typed(value, &kind)?),
            "StatefulSet" => self.statefulsets.push(typed(value, &kind)?),
            "Job" => self.jobs.push(typed(value, &kind)?),
            "PodDisruptionBudget" => self.pdbs.push(typed(value, &kind)?),
            "Cluster" if api_version == KKP_API_VERSION => {
                let cluster: KkpCluster = typed(value, "KKP Cluster")?;
                if let Some(first) = &self.kkp_cluster {
                    return Err(SnapshotError::TwoKkpClusters {
                        first: first.metadata.name.clone(),
                        second: cluster.metadata.name,
                    }
                    .to_string());
                }
                self.kkp_cluster = Some(cluster);
            }
            _ => {
                let note = format!("skipped {kind} ({api_version}): a plan does not use it");
                if !self.notes.contains(&note) {
                    self.notes.push(note);
                }
            }
        }
        Ok(())
    }

    /// Lists the same kinds live through kube-rs, cluster-wide. The KKP `Cluster` lives in the
    /// seed cluster, not here: add it with [`ClusterSnapshot::kkp_cluster_from_api`].
    pub async fn from_api(client: kube::Client) -> Result<Self, SnapshotError> {
        use kube::api::{Api, ListParams};
        async fn all<K>(client: &kube::Client, kind: &'static str) -> Result<Vec<K>, SnapshotError>
        where
            K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
                + Clone
                + serde::de::DeserializeOwned
                + std::fmt::Debug,
            K::DynamicType: Default,
        {
            let api: Api<K> = Api::all(client.clone());
            Ok(api.list(&ListParams::default()).await.map_err(|source| SnapshotError::Api { kind, source: Box::new(source) })?.items)
        }
        let nodes: Api<Node> = Api::all(client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await
            .map_err(|source| SnapshotError::Api { kind: "nodes", source: Box::new(source) })?
            .items;
        Ok(ClusterSnapshot {
            nodes,
            pods: all(&client, "pods").await?,
            daemonsets: all(&client, "daemonsets").await?,
            replicasets: all(&client, "replicasets").await?,
            deployments: all(&client, "deployments").await?,
            statefulsets: all(&client, "statefulsets").await?,
            jobs: all(&client, "jobs").await?,
            pdbs: all(&client, "poddisruptionbudgets").await?,
            kkp_cluster: None,
            notes: Vec::new(),
        })
    }

    /// Reads KKP's `Cluster` `name` from the seed cluster (`seed` is a client for it).
    pub async fn kkp_cluster_from_api(seed: kube::Client, name: &str) -> Result<KkpCluster, SnapshotError> {
        use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("kubermatic.k8c.io", "v1", "Cluster"));
        let api: Api<DynamicObject> = Api::all_with(seed, &ar);
        let obj = api.get(name).await.map_err(|source| SnapshotError::Api { kind: "clusters.kubermatic.k8c.io", source: Box::new(source) })?;
        let value = serde_json::to_value(&obj).unwrap_or_default();
        serde_json::from_value(value).map_err(|e| SnapshotError::Object {
            source_name: "seed cluster".into(),
            document: 1,
            line: 1,
            item: format!(" (Cluster {name})"),
            message: format!("not a valid KKP Cluster: {e}"),
        })
    }
}

/// Splits on `---` lines; each document with the line it starts on (1-based).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            if !current.trim().is_empty() {
                docs.push((start, std::mem::take(&mut current)));
            }
            current.clear();
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        docs.push((start, current));
    }
    docs
}

/// ` (Pod shop/web-1)`, or empty when the object has no name.
fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("object");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str);
    match (ns, name) {
        (Some(ns), Some(name)) => format!(" ({kind} {ns}/{name})"),
        (None, Some(name)) => format!(" ({kind} {name})"),
        _ => String::new(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_and_documents_read_the_same_objects() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata:\n    name: n1\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p\n    namespace: default\n";
        let docs = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: default\n";
        let a = ClusterSnapshot::from_yaml(list).unwrap();
        let b = ClusterSnapshot::from_yaml(docs).unwrap();
        assert_eq!((a.nodes.len(), a.pods.len()), (1, 1));
        assert_eq!(a.nodes, b.nodes);
        assert_eq!(a.pods, b.pods);
    }

    #[test]
    fn typed_list_items_take_the_list_kind() {
        let text = "apiVersion: v1\nkind: PodList\nitems:\n- metadata:\n    name: p\n    namespace: default\n";
        let s = ClusterSnapshot::from_yaml(text).unwrap();
        assert_eq!(s.pods.len(), 1);
    }

    #[test]
    fn unknown_kinds_are_noted_not_errors() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n";
        let s = ClusterSnapshot::from_yaml(text).unwrap();
        assert_eq!(s.notes, vec!["skipped ConfigMap (v1): a plan does not use it".to_string()]);
    }

    #[test]
    fn errors_name_the_document_line_and_object() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  containers: 7\n";
        let e = ClusterSnapshot::from_yaml(text).unwrap_err().to_string();
        assert!(e.starts_with("snapshot: document 2 (line 6) (Pod shop/p): not a valid Pod"), "{e}");

        let e = ClusterSnapshot::from_yaml("kind: Node\n---\nfoo: [1, 2\n").unwrap_err().to_string();
        assert!(e.starts_with("snapshot: document 2 (line 3) is not valid YAML"), "{e}");

        let e = ClusterSnapshot::from_yaml("- 1\n- 2\n").unwrap_err().to_string();
        assert!(e.contains("document 1") && e.contains("expected a Kubernetes object"), "{e}");

        let e = ClusterSnapshot::from_yaml("apiVersion: v1\nmetadata:\n  name: x\n").unwrap_err().to_string();
        assert!(e.contains("no `kind`"), "{e}");

        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata:\n    name: 5\n    labels: nope\n";
        let e = ClusterSnapshot::from_yaml(list).unwrap_err().to_string();
        assert!(e.contains("document 1 (line 1), item 1") && e.contains("not a valid Node"), "{e}");
    }

    #[test]
    fn one_kkp_cluster_only() {
        let c = |n: &str| format!("apiVersion: kubermatic.k8c.io/v1\nkind: Cluster\nmetadata:\n  name: {n}\n");
        let e = ClusterSnapshot::from_yaml(&format!("{}---\n{}", c("a"), c("b"))).unwrap_err().to_string();
        assert!(e.contains("two KKP Cluster objects (a and b)"), "{e}");
        // Cluster API's `Cluster` is another kind with the same name: not KKP's.
        let capi = "apiVersion: cluster.x-k8s.io/v1beta1\nkind: Cluster\nmetadata:\n  name: x\n";
        assert!(ClusterSnapshot::from_yaml(capi).unwrap().kkp_cluster.is_none());
    }
}
