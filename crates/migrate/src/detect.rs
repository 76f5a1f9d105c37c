//! Which CNI a cluster runs: the KKP `Cluster`'s `spec.cniPlugin` when there is one (KKP deploys
//! what it says), else the CNI's DaemonSets, the version from their image tag.

use crate::snapshot::ClusterSnapshot;
use k8s_openapi::api::apps::v1::DaemonSet;

/// CNI types `--to` and `--from` accept.
pub const KNOWN_TYPES: &[&str] = &["canal", "calico", "cilium", "flannel", "weave", "allot"];

/// A CNI found in the cluster, and how it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cni {
    pub kind: String,
    /// Without a leading `v` (`3.27`), as `--to` takes it.
    pub version: Option<String>,
    /// What shows it, in words: "KKP Cluster prod: spec.cniPlugin canal v3.27".
    pub evidence: String,
}

impl Cni {
    /// `canal:3.27`, or `canal` without a version.
    pub fn spec(&self) -> String {
        match &self.version {
            Some(v) => format!("{}:{v}", self.kind),
            None => self.kind.clone(),
        }
    }
}

/// The CNI the cluster runs now; see [`detect_all`] when several are installed.
pub fn current_cni(snap: &ClusterSnapshot) -> Option<Cni> {
    detect_all(snap).into_iter().next()
}

/// Every CNI found, the KKP `Cluster` first (it is what KKP reconciles), then DaemonSets by
/// namespace and name. Mid-migration both the old and the new CNI show up.
pub fn detect_all(snap: &ClusterSnapshot) -> Vec<Cni> {
    let mut found = Vec::new();
    if let Some(c) = &snap.kkp_cluster
        && let Some(p) = c.spec.cni_plugin.as_ref().filter(|p| !p.kind.is_empty() && p.kind != "none")
    {
        found.push(Cni {
            kind: p.kind.clone(),
            version: Some(trim_v(&p.version).to_string()).filter(|v| !v.is_empty()),
            evidence: format!("KKP Cluster {}: spec.cniPlugin {} {}", c.metadata.name, p.kind, p.version),
        });
    }
    let mut dss: Vec<&DaemonSet> = snap.daemonsets.iter().collect();
    dss.sort_by_key(|d| (d.metadata.namespace.clone(), d.metadata.name.clone()));
    for ds in dss {
        let Some((kind, version, image)) = daemonset_cni(ds) else { continue };
        let evidence = format!(
            "DaemonSet {}/{} (image {image})",
            ds.metadata.namespace.as_deref().unwrap_or_default(),
            ds.metadata.name.as_deref().unwrap_or_default()
        );
        match found.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                c.evidence.push_str("; ");
                c.evidence.push_str(&evidence);
                if c.version.is_none() {
                    c.version = version;
                }
            }
            None => found.push(Cni { kind: kind.to_string(), version, evidence }),
        }
    }
    found
}

/// The CNI a DaemonSet belongs to, its version, and the image that tells.
fn daemonset_cni(ds: &DaemonSet) -> Option<(&'static str, Option<String>, String)> {
    let name = ds.metadata.name.as_deref()?;
    let containers = ds.spec.as_ref()?.template.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let image_of = |container: &str| {
        containers.iter().find(|c| c.name == container).and_then(|c| c.image.clone())
    };
    let has_flannel = containers.iter().any(|c| c.name.contains("flannel"));
    let (kind, container) = match name {
        "canal" => ("canal", "calico-node"),
        // Calico's manifest with flannel added is Canal by another name.
        "calico-node" if has_flannel => ("canal", "calico-node"),
        "calico-node" => ("calico", "calico-node"),
        "cilium" => ("cilium", "cilium-agent"),
        "kube-flannel-ds" | "kube-flannel" => ("flannel", "kube-flannel"),
        "weave-net" => ("weave", "weave"),
        "allot-agent" => ("allot", "allot-agent"),
        _ => return None,
    };
    let image = image_of(container).or_else(|| containers.first().and_then(|c| c.image.clone()))?;
    Some((kind, image_version(&image), image))
}

/// `quay.io/calico/node:v3.27.3@sha256:…` → `3.27.3`.
pub fn image_version(image: &str) -> Option<String> {
    let image = image.split('@').next()?;
    let last = image.rsplit('/').next()?;
    let (_, tag) = last.split_once(':')?;
    let tag = trim_v(tag);
    (!tag.is_empty() && tag != "latest").then(|| tag.to_string())
}

pub fn trim_v(v: &str) -> &str {
    v.strip_prefix('v').unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(name: &str, containers: &[(&str, &str)]) -> DaemonSet {
        let cs: Vec<_> = containers
            .iter()
            .map(|(n, i)| serde_json::json!({"name": n, "image": i}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "kube-system"},
            "spec": {"selector": {}, "template": {"spec": {"containers": cs}}}
        }))
        .unwrap()
    }

    #[test]
    fn daemonsets_name_the_cni_and_images_its_version() {
        let cases = [
            (ds("canal", &[("calico-node", "quay.io/calico/node:v3.27.3"), ("kube-flannel", "quay.io/coreos/flannel:v0.24.0")]), "canal:3.27.3"),
            (ds("calico-node", &[("calico-node", "docker.io/calico/node:v3.28.0"), ("kube-flannel", "flannel:v0.25")]), "canal:3.28.0"),
            (ds("calico-node", &[("calico-node", "docker.io/calico/node:v3.28.0")]), "calico:3.28.0"),
            (ds("cilium", &[("cilium-agent", "quay.io/cilium/cilium:v1.16.3@sha256:abc")]), "cilium:1.16.3"),
            (ds("kube-flannel-ds", &[("kube-flannel", "ghcr.io/flannel-io/flannel:v0.26.1")]), "flannel:0.26.1"),
            (ds("weave-net", &[("weave", "weaveworks/weave-kube:latest")]), "weave"),
            (ds("allot-agent", &[("allot-agent", "registry.local:5000/allot:0.1.0")]), "allot:0.1.0"),
        ];
        for (d, want) in cases {
            let snap = ClusterSnapshot { daemonsets: vec![d], ..Default::default() };
            assert_eq!(current_cni(&snap).map(|c| c.spec()).as_deref(), Some(want));
        }
        let snap = ClusterSnapshot { daemonsets: vec![ds("kube-proxy", &[("kube-proxy", "k8s/kube-proxy:v1.32.0")])], ..Default::default() };
        assert_eq!(current_cni(&snap), None);
    }

    #[test]
    fn kkp_cluster_comes_first_and_daemonsets_add_evidence() {
        let mut snap = ClusterSnapshot {
            daemonsets: vec![
                ds("cilium", &[("cilium-agent", "quay.io/cilium/cilium:v1.16.3")]),
                ds("canal", &[("calico-node", "quay.io/calico/node:v3.27.3")]),
            ],
            ..Default::default()
        };
        snap.kkp_cluster = Some(serde_json::from_value(serde_json::json!({
            "metadata": {"name": "prod"}, "spec": {"cniPlugin": {"type": "canal", "version": "v3.27"}}
        })).unwrap());
        let all = detect_all(&snap);
        assert_eq!(all.iter().map(Cni::spec).collect::<Vec<_>>(), ["canal:3.27", "cilium:1.16.3"]);
        assert_eq!(
            all[0].evidence,
            "KKP Cluster prod: spec.cniPlugin canal v3.27; DaemonSet kube-system/canal (image quay.io/calico/node:v3.27.3)"
        );
    }
}
