//! The [`Cluster`] trait on a live cluster through kube-rs: evictions as `policy/v1` `Eviction`
//! bodies to `pods/NAME/eviction`, cordons as merge patches of `spec.unschedulable`, the
//! `Migration` object with its status written through the status subresource, the target's
//! manifests applied server-side (field manager `allot`), and for KKP the `Cluster` object in the
//! seed cluster labelled `unsafe-cni-migration` and merge-patched.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use allot_k8s::migration::{MIGRATION_NAME, Migration, MigrationSpec, MigrationStatus, ObjectRef};
use k8s_openapi::api::apps::v1::{DaemonSet, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::policy::v1::{Eviction as PodEviction, PodDisruptionBudget};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use kube::core::Status;
use serde_json::{Value, json};

use crate::kkp;
use crate::orchestrate::{Cluster, ClusterError, Cni, Eviction, NodeInfo, PodInfo};

/// The KKP `Cluster` resource (in the seed cluster).
pub use allot_kkp::cluster::API_VERSION as KKP_API_VERSION;
pub use crate::kkp::{MIGRATION_LABEL, split_cni};
const FIELD_MANAGER: &str = "allot";

/// How the target is switched on.
pub enum Switcher {
    /// Objects applied server-side (the documents of `--install PATH`).
    Manifests(Vec<DynamicObject>),
    /// A KKP user cluster: its `Cluster` object in the seed cluster.
    Kkp { seed: kube::Client, cluster: String },
}

pub struct KubeCluster {
    client: kube::Client,
    switcher: Switcher,
    /// The old CNI's objects, deleted by `remove_old` and applied again on rollback when it was
    /// removed (from `--old-manifests`); empty: the well-known objects of the old CNI's type.
    old_objects: Vec<DynamicObject>,
    daemonsets: CniDaemonSets,
    /// KKP: how long to wait for kube-proxy's ConfigMap to show a new mode, and how often to look.
    proxy_wait: (Duration, Duration),
}

/// The DaemonSets (namespace, name) whose pods show each CNI Ready on a node.
#[derive(Clone, Debug)]
pub struct CniDaemonSets {
    pub old: (String, String),
    pub target: (String, String),
}

impl CniDaemonSets {
    /// The well-known DaemonSets of the two CNI types (`cilium:1.16` → kube-system/cilium).
    pub fn of(from: &str, to: &str) -> Result<Self, String> {
        let ds = |cni: &str| {
            cni_daemonset(split_cni(cni).0)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("no known DaemonSet for CNI {cni:?}: name it with --old-daemonset/--target-daemonset NAMESPACE/NAME"))
        };
        Ok(CniDaemonSets { old: ds(from)?, target: ds(to)? })
    }
}

/// The DaemonSet that runs a CNI's agent on every node, by CNI type.
pub fn cni_daemonset(cni_type: &str) -> Option<(&'static str, &'static str)> {
    Some(match cni_type {
        "cilium" => ("kube-system", "cilium"),
        "canal" => ("kube-system", "canal"),
        "calico" => ("kube-system", "calico-node"),
        "flannel" => ("kube-flannel", "kube-flannel-ds"),
        "weave" => ("kube-system", "weave-net"),
        "allot" => ("allot-system", "allot-agent"),
        _ => return None,
    })
}

/// The objects a CNI of this type is known to run (removed with it when no manifests are given).
fn cni_workloads(cni_type: &str) -> Vec<ObjectRef> {
    let obj = |kind: &str, ns: &str, name: &str| ObjectRef { api_version: "apps/v1".into(), kind: kind.into(), namespace: Some(ns.into()), name: name.into() };
    let mut v: Vec<ObjectRef> = cni_daemonset(cni_type).map(|(ns, name)| obj("DaemonSet", ns, name)).into_iter().collect();
    match cni_type {
        "cilium" => v.push(obj("Deployment", "kube-system", "cilium-operator")),
        "canal" | "calico" => v.push(obj("Deployment", "kube-system", "calico-kube-controllers")),
        "allot" => v.push(obj("Deployment", "allot-system", "allot-operator")),
        _ => {}
    }
    v
}

/// Kinds that live outside namespaces (the rest are namespaced).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "PersistentVolume",
    "CSIDriver",
    "IngressClass",
    "RuntimeClass",
    "IPPool",
    "IPBlock",
    "AllotNode",
    "Migration",
    "Cluster",
];

/// The resource of an object from its apiVersion and kind, without discovery: the plural is the
/// lowercase kind made plural the regular English way (as the apiserver names built-in kinds).
pub fn api_resource(api_version: &str, kind: &str) -> (ApiResource, bool) {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let lower = kind.to_ascii_lowercase();
    let plural = if lower == "endpoints" {
        lower
    } else if lower.ends_with('s') || lower.ends_with('x') || lower.ends_with("ch") {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y').filter(|s| !s.ends_with(['a', 'e', 'o', 'u'])) {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    (ApiResource::from_gvk_with_plural(&gvk, &plural), !CLUSTER_SCOPED.contains(&kind))
}

/// The documents of a multi-document YAML file (or a `List`), each with apiVersion, kind and
/// name.
pub fn parse_manifests(yaml: &str, source: &str) -> Result<Vec<DynamicObject>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| format!("{source}: not YAML: {e}"))?;
    let mut out = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let items = if doc.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List")) {
            doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
        } else {
            vec![doc]
        };
        for item in items {
            let obj: DynamicObject = serde_json::from_value(item).map_err(|e| format!("{source}: a document is not a Kubernetes object: {e}"))?;
            if obj.types.is_none() || obj.metadata.name.is_none() {
                return Err(format!("{source}: every document needs apiVersion, kind and metadata.name"));
            }
            out.push(obj);
        }
    }
    if out.is_empty() {
        return Err(format!("{source}: no objects in it"));
    }
    Ok(out)
}

fn object_ref(obj: &DynamicObject) -> ObjectRef {
    let t = obj.types.clone().unwrap_or_default();
    ObjectRef { api_version: t.api_version, kind: t.kind, namespace: obj.metadata.namespace.clone(), name: obj.metadata.name.clone().unwrap_or_default() }
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// 5xx, 429 on anything but an eviction, and transport errors are worth retrying; other API
/// answers fail the step.
fn err(what: &str, e: kube::Error) -> ClusterError {
    match &e {
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => ClusterError::Unavailable(format!("{what}: {} ({})", s.message, s.code)),
        kube::Error::Api(s) => ClusterError::Failed(format!("{what}: {} ({} {})", s.message, s.code, s.reason)),
        _ => ClusterError::Unavailable(format!("{what}: {e}")),
    }
}

impl KubeCluster {
    /// The names of the PDBs that select the pod (best effort: empty when they cannot be read).
    async fn pdbs_of(&self, namespace: &str, name: &str) -> Vec<String> {
        let Ok(pod) = pods_api(&self.client, namespace).get(name).await else { return vec![] };
        let Ok(list) = Api::<PodDisruptionBudget>::namespaced(self.client.clone(), namespace).list(&ListParams::default()).await else { return vec![] };
        let labels = pod.metadata.labels.unwrap_or_default();
        list.items
            .iter()
            .filter(|b| b.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| crate::plan::selector_matches(s, &labels)))
            .filter_map(|b| b.metadata.name.clone())
            .collect()
    }

    pub fn new(client: kube::Client, switcher: Switcher, old_objects: Vec<DynamicObject>, daemonsets: CniDaemonSets) -> Self {
        KubeCluster { client, switcher, old_objects, daemonsets, proxy_wait: (Duration::from_secs(300), Duration::from_secs(2)) }
    }

    /// How long `set_kube_proxy_mode` waits on KKP for the ConfigMap to show the mode (the
    /// run's pod timeout), polling every `poll`.
    pub fn with_proxy_wait(mut self, timeout: Duration, poll: Duration) -> Self {
        self.proxy_wait = (timeout, poll);
        self
    }

    /// The mode kube-system/kube-proxy's ConfigMap shows ("" when there is none).
    async fn config_map_proxy_mode(&self) -> Result<String, ClusterError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
        let cm = api.get_opt("kube-proxy").await.map_err(|e| err("reading ConfigMap kube-system/kube-proxy", e))?;
        let conf = cm.and_then(|c| c.data).and_then(|d| d.get("config.conf").cloned());
        Ok(conf.map(|c| proxy_mode_of(&c).unwrap_or("iptables").to_string()).unwrap_or_default())
    }

    fn dyn_api(client: &kube::Client, r: &ObjectRef) -> Api<DynamicObject> {
        let (ar, namespaced) = api_resource(&r.api_version, &r.kind);
        if namespaced {
            Api::namespaced_with(client.clone(), r.namespace.as_deref().unwrap_or("default"), &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        }
    }

    async fn apply_all(&self, objects: &[DynamicObject]) -> Result<Vec<ObjectRef>, ClusterError> {
        let mut applied = Vec::new();
        for obj in objects {
            let r = object_ref(obj);
            let api = Self::dyn_api(&self.client, &r);
            api.patch(&r.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
                .await
                .map_err(|e| err(&format!("applying {} {}", r.kind, r.name), e))?;
            applied.push(r);
        }
        Ok(applied)
    }

    async fn delete_all(&self, objects: &[ObjectRef]) -> Result<(), ClusterError> {
        for r in objects {
            match Self::dyn_api(&self.client, r).delete(&r.name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if code(&e) == Some(404) => {}
                Err(e) => return Err(err(&format!("deleting {} {}", r.kind, r.name), e)),
            }
        }
        Ok(())
    }

    fn kkp_api(seed: &kube::Client) -> Api<DynamicObject> {
        let (ar, _) = api_resource(KKP_API_VERSION, "Cluster");
        Api::all_with(seed.clone(), &ar)
    }

    /// Label the KKP `Cluster` for migration, then set its CNI (the label first, as KKP's
    /// validation wants it on the object the change is made to).
    async fn kkp_set_cni(seed: &kube::Client, cluster: &str, cni: &str) -> Result<(), ClusterError> {
        let api = Self::kkp_api(seed);
        let what = format!("patching KKP Cluster {cluster}");
        for patch in [kkp::label_patch(), kkp::cni_patch(cni)] {
            api.patch(cluster, &PatchParams::default(), &Patch::Merge(patch)).await.map_err(|e| err(&what, e))?;
        }
        Ok(())
    }

    /// The copy `keep_old_copy` made of the old CNI `from`'s objects (empty: none, or another
    /// migration's).
    async fn old_copy(&self, from: &str) -> Result<Vec<DynamicObject>, ClusterError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
        let what = format!("reading ConfigMap kube-system/{OLD_CNI_COPY}");
        let Some(cm) = api.get_opt(OLD_CNI_COPY).await.map_err(|e| err(&what, e))? else { return Ok(vec![]) };
        let data = cm.data.unwrap_or_default();
        if data.get("from").map(String::as_str) != Some(from) {
            return Ok(vec![]);
        }
        serde_json::from_str(data.get("objects").map_or("[]", String::as_str))
            .map_err(|e| ClusterError::Failed(format!("ConfigMap kube-system/{OLD_CNI_COPY} is unreadable ({e}): pass --old-manifests PATH for the rollback")))
    }

    /// Copies the old CNI's objects into a ConfigMap before they are deleted. A resumed run
    /// finds some already gone: the copy keeps what it held of them.
    async fn keep_old_copy(&self, spec: &MigrationSpec, refs: &[ObjectRef]) -> Result<(), ClusterError> {
        let mut copy = self.old_copy(&spec.from).await?;
        for r in refs {
            let read = Self::dyn_api(&self.client, r).get_opt(&r.name).await.map_err(|e| err(&format!("reading {} {}", r.kind, r.name), e))?;
            if let Some(mut obj) = read {
                // What the API answers carries no kind for a dynamic read: the ref's.
                obj.types = Some(kube::core::TypeMeta { api_version: r.api_version.clone(), kind: r.kind.clone() });
                copy.retain(|o| object_ref(o) != *r);
                copy.push(reapplicable(obj));
            }
        }
        let objects = serde_json::to_string(&copy).expect("objects encode");
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": OLD_CNI_COPY, "namespace": "kube-system", "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
            "data": {"from": spec.from, "objects": objects},
        });
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
        api.patch(OLD_CNI_COPY, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
            .await
            .map_err(|e| err(&format!("keeping a copy of the old CNI's objects in ConfigMap kube-system/{OLD_CNI_COPY}"), e))?;
        Ok(())
    }

    fn old_refs(&self, spec: &MigrationSpec) -> Vec<ObjectRef> {
        if self.old_objects.is_empty() { cni_workloads(split_cni(&spec.from).0) } else { self.old_objects.iter().map(object_ref).collect() }
    }

    fn target_refs(&self, spec: &MigrationSpec) -> Vec<ObjectRef> {
        match &self.switcher {
            Switcher::Manifests(objs) => objs.iter().map(object_ref).collect(),
            Switcher::Kkp { .. } => cni_workloads(split_cni(&spec.to).0),
        }
    }

    /// Restart kube-proxy's pods the way `kubectl rollout restart` does.
    async fn restart_kube_proxy(&self) -> Result<(), ClusterError> {
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), "kube-system");
        let now = humantime_utc();
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}});
        api.patch("kube-proxy", &PatchParams::default(), &Patch::Strategic(patch)).await.map_err(|e| err("restarting kube-proxy", e))?;
        Ok(())
    }
}

/// Where `remove_old` keeps the old CNI's objects it deletes when no `--old-manifests` named
/// them (ConfigMap in kube-system: `from` and `objects`, a JSON list), so a rollback after the
/// removal can install the old CNI again without them.
pub const OLD_CNI_COPY: &str = "allot-migration-old-cni";

/// An object as read, made fit to be applied again: no identity, version or status of the
/// deleted one.
fn reapplicable(mut obj: DynamicObject) -> DynamicObject {
    let m = &mut obj.metadata;
    (m.uid, m.resource_version, m.creation_timestamp, m.deletion_timestamp, m.generation) = (None, None, None, None, None);
    (m.managed_fields, m.owner_references, m.deletion_grace_period_seconds) = (None, None, None);
    if let Some(data) = obj.data.as_object_mut() {
        data.remove("status");
    }
    obj
}

/// RFC 3339 UTC time of now, to the second (as `kubectl rollout restart` writes it).
fn humantime_utc() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn pod_info(p: &Pod) -> PodInfo {
    let meta = &p.metadata;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let owner = meta.owner_references.as_ref().and_then(|o| o.iter().find(|r| r.controller == Some(true))).map(|r| (r.kind.clone(), r.name.clone()));
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let mut ips: Vec<std::net::IpAddr> = status.and_then(|s| s.pod_ips.as_ref()).map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect()).unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
    PodInfo {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        owner,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        mirror: meta.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")),
        finished: matches!(phase, "Succeeded" | "Failed"),
        ready,
        ips,
    }
}

/// A pod's manifest for re-creating it: its spec (node kept, so it comes back in place) and its
/// labels and annotations; nothing the apiserver sets.
pub fn recreate_manifest(p: &Pod) -> Value {
    let meta = &p.metadata;
    let mut m = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": meta.name, "namespace": meta.namespace},
        "spec": p.spec,
    });
    if let Some(l) = &meta.labels {
        m["metadata"]["labels"] = json!(l);
    }
    if let Some(a) = &meta.annotations {
        m["metadata"]["annotations"] = json!(a);
    }
    m
}

fn pods_api(client: &kube::Client, ns: &str) -> Api<Pod> {
    Api::namespaced(client.clone(), ns)
}

/// The status as a merge patch: fields that are unset now are written as null, so a merge patch
/// clears what an earlier write set.
pub fn status_patch(status: &MigrationStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        for key in ["failedIn", "message", "recreating", "kubeProxyWas", "rollbackStep", "applied"] {
            map.entry(key).or_insert(Value::Null);
        }
    }
    json!({ "status": v })
}

impl Cluster for KubeCluster {
    fn now(&self) -> Duration {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    async fn load(&self) -> Result<Option<(MigrationSpec, MigrationStatus)>, ClusterError> {
        let api: Api<Migration> = Api::all(self.client.clone());
        let m = api.get_opt(MIGRATION_NAME).await.map_err(|e| err("reading the Migration object", e))?;
        Ok(m.map(|m| (m.spec, m.status.unwrap_or_default())))
    }

    async fn create(&self, spec: &MigrationSpec, status: &MigrationStatus) -> Result<(), ClusterError> {
        let api: Api<Migration> = Api::all(self.client.clone());
        // A finished migration's object is replaced by the new one.
        match api.delete(MIGRATION_NAME, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if code(&e) == Some(404) => {}
            Err(e) => return Err(err("deleting the finished Migration object", e)),
        }
        let obj = Migration::new(MIGRATION_NAME, spec.clone());
        api.create(&PostParams::default(), &obj).await.map_err(|e| err("creating the Migration object", e))?;
        self.save(status).await
    }

    async fn save(&self, status: &MigrationStatus) -> Result<(), ClusterError> {
        let api: Api<Migration> = Api::all(self.client.clone());
        api.patch_status(MIGRATION_NAME, &PatchParams::default(), &Patch::Merge(status_patch(status)))
            .await
            .map_err(|e| err("writing the Migration status", e))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<String>, ClusterError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(|e| err("listing nodes", e))?;
        Ok(list.items.into_iter().filter_map(|n| n.metadata.name).collect())
    }

    async fn node(&self, name: &str) -> Result<NodeInfo, ClusterError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let n = api.get(name).await.map_err(|e| err(&format!("reading node {name}"), e))?;
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(NodeInfo { ready, unschedulable: n.spec.and_then(|s| s.unschedulable).unwrap_or(false) })
    }

    async fn set_unschedulable(&self, node: &str, unschedulable: bool) -> Result<(), ClusterError> {
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch(node, &PatchParams::default(), &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})))
            .await
            .map_err(|e| err(&format!("{} node {node}", if unschedulable { "cordoning" } else { "uncordoning" }), e))?;
        Ok(())
    }

    async fn pods_on(&self, node: &str) -> Result<Vec<PodInfo>, ClusterError> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default().fields(&format!("spec.nodeName={node}"))).await.map_err(|e| err(&format!("listing pods on {node}"), e))?;
        Ok(list.items.iter().map(pod_info).collect())
    }

    async fn evict(&self, namespace: &str, name: &str) -> Result<Eviction, ClusterError> {
        let body = PodEviction {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
            delete_options: None,
        };
        let mut body = serde_json::to_value(&body).unwrap_or_default();
        body["apiVersion"] = json!("policy/v1");
        body["kind"] = json!("Eviction");
        match pods_api(&self.client, namespace).create_subresource::<Value, Status>("eviction", name, &PostParams::default(), &body).await {
            Ok(_) => Ok(Eviction::Evicted),
            Err(e) if code(&e) == Some(429) => Ok(Eviction::Blocked),
            Err(e) if code(&e) == Some(404) => Ok(Eviction::Gone),
            // The apiserver answers 500 for a pod more than one PDB selects: it is no outage,
            // and retrying never helps.
            Err(kube::Error::Api(s)) if s.code == 500 && s.message.contains("PodDisruptionBudget") => {
                let pdbs = self.pdbs_of(namespace, name).await;
                let which = if pdbs.is_empty() { String::new() } else { format!(" ({})", pdbs.join(", ")) };
                Err(ClusterError::Failed(format!(
                    "evicting {namespace}/{name}: more than one PodDisruptionBudget selects it{which} and the Eviction API refuses such a pod \
                     (\"{}\"): leave one budget over it, then run the same command again",
                    s.message
                )))
            }
            Err(e) => Err(err(&format!("evicting {namespace}/{name}"), e)),
        }
    }

    async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        match pods_api(&self.client, namespace).delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if code(&e) == Some(404) => Ok(()),
            Err(e) => Err(err(&format!("deleting pod {namespace}/{name}"), e)),
        }
    }

    async fn pod_manifest(&self, namespace: &str, name: &str) -> Result<Option<(String, String)>, ClusterError> {
        let pod = pods_api(&self.client, namespace).get_opt(name).await.map_err(|e| err(&format!("reading pod {namespace}/{name}"), e))?;
        Ok(pod.map(|p| (recreate_manifest(&p).to_string(), p.metadata.uid.clone().unwrap_or_default())))
    }

    async fn create_pod(&self, manifest: &str) -> Result<bool, ClusterError> {
        let pod: Pod = serde_json::from_str(manifest).map_err(|e| ClusterError::Failed(format!("a recorded pod manifest does not parse: {e}")))?;
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        match pods_api(&self.client, &ns).create(&PostParams::default(), &pod).await {
            Ok(_) => Ok(true),
            Err(e) if code(&e) == Some(409) => Ok(false),
            Err(e) => Err(err(&format!("re-creating pod {ns}/{}", pod.metadata.name.unwrap_or_default()), e)),
        }
    }

    async fn unavailable(&self, owners: &[String]) -> Result<Vec<String>, ClusterError> {
        let mut out = Vec::new();
        for o in owners {
            let Some((kind, rest)) = o.split_once(' ') else { continue };
            let Some((ns, name)) = rest.split_once('/') else { continue };
            let (ready, want) = match kind {
                "ReplicaSet" => match Api::<ReplicaSet>::namespaced(self.client.clone(), ns).get_opt(name).await.map_err(|e| err(o, e))? {
                    Some(rs) => (rs.status.and_then(|s| s.ready_replicas).unwrap_or(0), rs.spec.and_then(|s| s.replicas).unwrap_or(1)),
                    None => continue,
                },
                "StatefulSet" => match Api::<StatefulSet>::namespaced(self.client.clone(), ns).get_opt(name).await.map_err(|e| err(o, e))? {
                    Some(s) => (s.status.and_then(|s| s.ready_replicas).unwrap_or(0), s.spec.and_then(|s| s.replicas).unwrap_or(1)),
                    None => continue,
                },
                "DaemonSet" => match Api::<DaemonSet>::namespaced(self.client.clone(), ns).get_opt(name).await.map_err(|e| err(o, e))? {
                    Some(d) => d.status.map(|s| (s.number_ready, s.desired_number_scheduled)).unwrap_or((0, 1)),
                    None => continue,
                },
                // Jobs and custom controllers: their own business.
                _ => continue,
            };
            if ready < want {
                out.push(format!("{o}: {ready}/{want} Ready"));
            }
        }
        Ok(out)
    }

    async fn cni_not_ready(&self, cni: Cni, nodes: &[String]) -> Result<Vec<String>, ClusterError> {
        let (ns, ds) = if cni == Cni::Target { &self.daemonsets.target } else { &self.daemonsets.old };
        let list = pods_api(&self.client, ns).list(&ListParams::default()).await.map_err(|e| err(&format!("listing pods in {ns}"), e))?;
        let ready: Vec<String> = list
            .items
            .iter()
            .map(pod_info)
            .filter(|p| p.ready && p.owner.as_ref().is_some_and(|(k, n)| k == "DaemonSet" && n == ds))
            .map(|p| p.node)
            .collect();
        Ok(nodes.iter().filter(|n| !ready.contains(n)).cloned().collect())
    }

    async fn switch_to_target(&self, spec: &MigrationSpec) -> Result<Vec<ObjectRef>, ClusterError> {
        match &self.switcher {
            Switcher::Manifests(objs) => self.apply_all(objs).await,
            Switcher::Kkp { seed, cluster } => {
                Self::kkp_set_cni(seed, cluster, &spec.to).await?;
                Ok(vec![])
            }
        }
    }

    async fn remove_old(&self, spec: &MigrationSpec) -> Result<(), ClusterError> {
        let refs = self.old_refs(spec);
        if self.old_objects.is_empty() {
            self.keep_old_copy(spec, &refs).await?;
        }
        self.delete_all(&refs).await
    }

    async fn switch_back(&self, spec: &MigrationSpec, applied: &[ObjectRef], old_removed: bool) -> Result<(), ClusterError> {
        if let Switcher::Kkp { seed, cluster } = &self.switcher {
            // KKP deploys the CNI its Cluster names: the old one comes back by itself.
            Self::kkp_set_cni(seed, cluster, &spec.from).await?;
        } else if old_removed {
            let objects = if self.old_objects.is_empty() { self.old_copy(&spec.from).await? } else { self.old_objects.clone() };
            if objects.is_empty() {
                return Err(ClusterError::Failed(format!(
                    "the old CNI's objects were removed and ConfigMap kube-system/{OLD_CNI_COPY} holds no copy of them: pass --old-manifests PATH ({}'s manifests) so rollback can install it again",
                    spec.from
                )));
            }
            self.apply_all(&objects).await?;
        }
        let mut target = self.target_refs(spec);
        target.extend(applied.iter().cloned());
        target.sort();
        target.dedup();
        // The target's objects that are also the old CNI's (shared RBAC, CRDs) stay.
        let old = self.old_refs(spec);
        target.retain(|r| !old.contains(r));
        self.delete_all(&target).await
    }

    async fn kube_proxy_mode(&self) -> Result<String, ClusterError> {
        if let Switcher::Kkp { seed, cluster } = &self.switcher {
            let c = Self::kkp_api(seed).get(cluster).await.map_err(|e| err(&format!("reading KKP Cluster {cluster}"), e))?;
            return Ok(c.data["spec"]["clusterNetwork"]["proxyMode"].as_str().unwrap_or("ipvs").to_string());
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
        let cm = api.get("kube-proxy").await.map_err(|e| err("reading ConfigMap kube-system/kube-proxy", e))?;
        let conf = cm.data.as_ref().and_then(|d| d.get("config.conf")).cloned().unwrap_or_default();
        Ok(proxy_mode_of(&conf).unwrap_or("iptables").to_string())
    }

    async fn set_kube_proxy_mode(&self, mode: &str) -> Result<(), ClusterError> {
        if let Switcher::Kkp { seed, cluster } = &self.switcher {
            // KKP writes kube-proxy's ConfigMap from the Cluster; the label allows the change.
            Self::kkp_api(seed)
                .patch(
                    cluster,
                    &PatchParams::default(),
                    &Patch::Merge(kkp::proxy_mode_patch(mode)),
                )
                .await
                .map_err(|e| err(&format!("patching KKP Cluster {cluster}"), e))?;
            if mode == "ebpf" {
                // No kube-proxy with ebpf: KKP removes it and redeploys Cilium itself.
                return Ok(());
            }
            // KKP writes the user cluster's ConfigMap when it reconciles (up to minutes): a
            // restart before that keeps the old mode, as the manual warns.
            let (timeout, poll) = self.proxy_wait;
            let start = std::time::Instant::now();
            loop {
                // A read the API fails is one more look within the same wait: retrying the whole
                // step would patch again and start the wait over.
                let now = match self.config_map_proxy_mode().await {
                    Ok(m) => m,
                    Err(ClusterError::Unavailable(e)) => format!("an unreadable ConfigMap ({e})"),
                    Err(e) => return Err(e),
                };
                if now == mode {
                    break;
                }
                if start.elapsed() >= timeout {
                    return Err(ClusterError::Failed(format!(
                        "KKP Cluster {cluster} asks for kube-proxy mode {mode}, but ConfigMap kube-system/kube-proxy still shows {:?} after {timeout:?}: \
                         KKP has not reconciled it (check the seed's controllers); kube-proxy was not restarted",
                        if now.is_empty() { "no ConfigMap" } else { now.as_str() }
                    )));
                }
                tokio::time::sleep(poll).await;
            }
        } else {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
            let cm = api.get("kube-proxy").await.map_err(|e| err("reading ConfigMap kube-system/kube-proxy", e))?;
            let conf = cm.data.as_ref().and_then(|d| d.get("config.conf")).cloned().unwrap_or_default();
            let conf = with_proxy_mode(&conf, mode);
            let data: BTreeMap<&str, String> = [("config.conf", conf)].into();
            api.patch("kube-proxy", &PatchParams::default(), &Patch::Merge(json!({ "data": data })))
                .await
                .map_err(|e| err("writing ConfigMap kube-system/kube-proxy", e))?;
        }
        self.restart_kube_proxy().await
    }
}

/// The `mode:` of a KubeProxyConfiguration (YAML text); "" (the default) reads as iptables.
pub fn proxy_mode_of(conf: &str) -> Option<&str> {
    conf.lines()
        .find_map(|l| l.strip_prefix("mode:"))
        .map(|m| m.trim().trim_matches('"').trim_matches('\''))
        .map(|m| if m.is_empty() { "iptables" } else { m })
}

/// The configuration with its top-level `mode:` set (added when absent).
pub fn with_proxy_mode(conf: &str, mode: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = conf
        .lines()
        .map(|l| {
            if l.starts_with("mode:") {
                found = true;
                format!("mode: \"{mode}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.push(format!("mode: \"{mode}\""));
    }
    out.join("\n") + "\n"
}
