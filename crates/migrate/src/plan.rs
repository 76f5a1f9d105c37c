//! What a migration will do: per node, in batches, what happens to each pod, and what is at risk.
//! The JSON form is what `allot migrate plan -o json` prints.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The CNI the cluster runs now, e.g. `canal:3.27` (detected from its DaemonSets or the KKP
    /// `Cluster`).
    pub from: String,
    /// The target, as given with `--to TYPE[:VERSION]`.
    pub to: String,
    /// Rules the migration would break; a plan with refusals is not carried out.
    pub refusals: Vec<Refusal>,
    /// Nodes in the order they are migrated: batch 0 is one canary node, the node running the
    /// migration goes last.
    pub nodes: Vec<NodePlan>,
    pub at_risk: Vec<AtRisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub rule: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub batch: u32,
    pub pods: Vec<PodAction>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAction {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub reason: String,
}

/// What happens to one pod so that it comes back on the new CNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Owned by a controller: evicted through the Eviction API (PodDisruptionBudgets respected).
    Evict,
    /// DaemonSet-owned, not host-network: deleted; its controller recreates it on the node.
    Delete,
    /// A bare pod, only with `--force-bare`: re-created from its own spec.
    Recreate,
    /// A bare pod without `--force-bare`: stays on the old CNI, reported.
    Keep,
    /// Host-network, mirror/static or finished: not touched.
    Skip,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtRisk {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

// ---- Planning ----------------------------------------------------------------------------------

use crate::detect::{self, Cni};
use crate::snapshot::ClusterSnapshot;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet};

pub use crate::kkp::MIGRATION_LABEL as KKP_MIGRATION_LABEL;
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What `allot migrate plan` was asked.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// The target, `TYPE[:VERSION]`.
    pub to: String,
    /// The current CNI when detection cannot tell (or is wrong), `TYPE[:VERSION]`.
    pub from: Option<String>,
    /// Nodes per batch after the canary (at least 1).
    pub batch: usize,
    /// Re-create bare pods from their own spec instead of keeping them on the old CNI.
    pub force_bare: bool,
    /// The node the migration runs on: migrated last.
    pub self_node: Option<String>,
    /// Plan although nodes are NotReady (their pods are listed at risk).
    pub allow_not_ready: bool,
    /// kube-proxy's mode after the migration (`apply --kube-proxy-mode`); on KKP it is a
    /// Cluster patch, checked with KKP's rules like the CNI switch.
    pub kube_proxy_mode: Option<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            to: String::new(),
            from: None,
            batch: 1,
            force_bare: false,
            self_node: None,
            allow_not_ready: false,
            kube_proxy_mode: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{flag} {value:?}: unknown CNI type {kind:?}; expected one of {known}, optionally with :VERSION (e.g. cilium:1.16)")]
    UnknownType { flag: &'static str, value: String, kind: String, known: String },
    #[error("{flag} {value:?}: expected TYPE[:VERSION], e.g. cilium:1.16 or allot")]
    BadSpec { flag: &'static str, value: String },
    #[error("--batch 0: a batch needs at least one node")]
    ZeroBatch,
}

/// Parses `TYPE[:VERSION]` (`cilium:1.16`, `canal:v3.28`, `allot`); the version loses its `v`.
pub fn parse_cni(flag: &'static str, value: &str) -> Result<(String, Option<String>), PlanError> {
    let (kind, version) = match value.split_once(':') {
        Some((k, v)) => (k, Some(detect::trim_v(v.trim()).to_string())),
        None => (value, None),
    };
    let kind = kind.trim().to_ascii_lowercase();
    if kind.is_empty() || version.as_deref() == Some("") {
        return Err(PlanError::BadSpec { flag, value: value.to_string() });
    }
    if !detect::KNOWN_TYPES.contains(&kind.as_str()) {
        return Err(PlanError::UnknownType { flag, value: value.to_string(), kind, known: detect::KNOWN_TYPES.join(", ") });
    }
    Ok((kind, version))
}

fn spec_string(kind: &str, version: &Option<String>) -> String {
    match version {
        Some(v) => format!("{kind}:{v}"),
        None => kind.to_string(),
    }
}

/// The plan, see [`plan_with_notes`].
pub fn plan(snap: &ClusterSnapshot, opts: &PlanOptions) -> Result<Plan, PlanError> {
    plan_with_notes(snap, opts).map(|(p, _)| p)
}

/// The plan, and notes for the operator that are not part of its JSON: how the current CNI was
/// detected, why the nodes are in this order, what the snapshot reader skipped.
pub fn plan_with_notes(snap: &ClusterSnapshot, opts: &PlanOptions) -> Result<(Plan, Vec<String>), PlanError> {
    if opts.batch == 0 {
        return Err(PlanError::ZeroBatch);
    }
    let (to_kind, to_version) = parse_cni("--to", &opts.to)?;
    let mut notes = Vec::new();
    let mut refusals = Vec::new();

    // The current CNI. Mid-migration both CNIs are installed: the current one is the other.
    let from: Option<Cni> = match &opts.from {
        Some(f) => {
            let (kind, version) = parse_cni("--from", f)?;
            notes.push(format!("current CNI {} (given with --from)", spec_string(&kind, &version)));
            Some(Cni { kind, version, evidence: "--from".into() })
        }
        None => {
            let all = detect::detect_all(snap);
            let chosen = all.iter().find(|c| c.kind != to_kind).or(all.first()).cloned();
            for c in &all {
                let mark = if Some(c) == chosen.as_ref() { "current CNI" } else { "also installed" };
                notes.push(format!("{mark} {}: {}", c.spec(), c.evidence));
            }
            chosen
        }
    };
    let from_spec = from.as_ref().map(Cni::spec).unwrap_or_else(|| "unknown".into());
    let to_spec = spec_string(&to_kind, &to_version);
    match &from {
        None => refusals.push(Refusal {
            rule: "unknown-current-cni".into(),
            message: "cannot tell which CNI the cluster runs: no KKP Cluster object and no DaemonSet of a known CNI \
                 (canal, calico-node, cilium, kube-flannel-ds, weave-net, allot-agent); name it with --from TYPE[:VERSION]"
                .into(),
        }),
        Some(f) if f.kind == to_kind => {
            let message = match (&f.version, &to_version) {
                (Some(a), Some(b)) if a != b => format!(
                    "{from_spec} to {to_spec} is a version upgrade within {to_kind}, not a CNI migration: use {to_kind}'s own upgrade \
                     procedure (on KKP, change spec.cniPlugin.version; more than one minor version needs the unsafe-cni-upgrade label)"
                ),
                _ => format!("the cluster already runs {from_spec} ({}): nothing to migrate", f.evidence),
            };
            refusals.push(Refusal { rule: "target-is-current".into(), message });
        }
        Some(_) => {}
    }
    if let (Some(c), Some(f)) = (&snap.kkp_cluster, &from)
        && f.kind != to_kind
    {
        if !c.metadata.labels.contains_key(KKP_MIGRATION_LABEL) {
            refusals.push(Refusal {
                rule: "kkp-unsafe-cni-migration-label".into(),
                message: format!(
                    "KKP Cluster {name} has no `{KKP_MIGRATION_LABEL}` label, and KKP refuses a CNI type change ({} to {to_kind}) without it. \
                     Label it in the seed cluster to acknowledge that KKP does not support this change: \
                     kubectl label cluster {name} {KKP_MIGRATION_LABEL}=true",
                    f.kind,
                    name = c.metadata.name
                ),
            });
        }
        if !["canal", "cilium"].contains(&to_kind.as_str()) {
            refusals.push(Refusal {
                rule: "kkp-cni-type-unsupported".into(),
                message: format!(
                    "KKP deploys only canal and cilium, so Cluster {} cannot be switched to {to_kind} through KKP: set its \
                     spec.cniPlugin.type to none in the seed (KKP stops managing the CNI), then plan without the Cluster object and \
                     apply with --install ({to_kind}'s manifests)",
                    c.metadata.name
                ),
            });
        } else {
            // KKP's own webhook checks every patch apply sends: refuse now what it would deny then.
            let steps = crate::kkp::forward_steps(&to_spec, opts.kube_proxy_mode.as_deref());
            for (step, d) in crate::kkp::check_steps(c, &steps) {
                let hint = if to_version.is_none() && d.rule == allot_kkp::rule::CNI_VERSION_INVALID {
                    format!(" (KKP needs the new CNI's version: give it with --to {to_kind}:VERSION)")
                } else {
                    String::new()
                };
                refusals.push(Refusal {
                    rule: format!("kkp-{}", d.rule),
                    message: format!("KKP would deny the patch of Cluster {} that sets {step}: {}{hint}", c.metadata.name, d.message),
                });
            }
        }
        let mode_after = opts.kube_proxy_mode.as_deref().or(c.spec.cluster_network.proxy_mode.as_deref());
        if to_kind == "cilium" && mode_after == Some("ipvs") {
            notes.push(format!(
                "KKP Cluster {} uses kube-proxy mode ipvs, which is not recommended with Cilium: change spec.clusterNetwork.proxyMode \
                 to iptables (or ebpf, with Konnectivity) after the migration and restart kube-proxy",
                c.metadata.name
            ));
        }
    }

    if snap.kkp_cluster.is_none() && opts.kube_proxy_mode.as_deref() == Some("ebpf") {
        refusals.push(Refusal {
            rule: "kube-proxy-mode-ebpf".into(),
            message: "kube-proxy has no ebpf mode: ebpf is KKP's setting for a cluster whose CNI replaces kube-proxy. \
                      Outside KKP, leave --kube-proxy-mode out and follow the CNI's own kube-proxy replacement procedure"
                .into(),
        });
    }

    // Nodes: readiness and roles.
    let mut nodes: Vec<&Node> = snap.nodes.iter().collect();
    nodes.sort_by_key(|n| name_of(&n.metadata).to_string());
    let node_names: BTreeSet<&str> = nodes.iter().map(|n| name_of(&n.metadata)).collect();
    let not_ready: BTreeMap<&str, String> =
        nodes.iter().filter_map(|n| node_not_ready(n).map(|why| (name_of(&n.metadata), why))).collect();
    for (node, why) in &not_ready {
        if !opts.allow_not_ready {
            refusals.push(Refusal {
                rule: "node-not-ready".into(),
                message: format!(
                    "node {node} is NotReady ({why}): its pods can be neither restarted nor verified on the new CNI. \
                     Bring it back, or drain and delete it, or plan with --allow-not-ready to accept its pods at risk"
                ),
            });
        }
    }
    if let Some(s) = &opts.self_node
        && !node_names.contains(s.as_str())
    {
        refusals.push(Refusal {
            rule: "self-node-unknown".into(),
            message: format!(
                "--self-node {s} (or $NODE_NAME) is not a node of this cluster: name the node this migration runs on, \
                 which is migrated last so the migration does not restart itself"
            ),
        });
    }

    // Pods, node by node.
    let ctx = Ctx::new(snap);
    let mut per_node: BTreeMap<&str, Vec<PodAction>> = node_names.iter().map(|n| (*n, Vec::new())).collect();
    let mut at_risk: Vec<AtRisk> = Vec::new();
    let mut pods: Vec<&Pod> = snap.pods.iter().collect();
    pods.sort_by_key(|p| (ns_of(&p.metadata).to_string(), name_of(&p.metadata).to_string()));
    let mut unscheduled = Vec::new();
    let mut multi_pdb = Vec::new();
    for pod in pods {
        let (ns, name) = (ns_of(&pod.metadata), name_of(&pod.metadata));
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let (action, reason, mut risks) = ctx.classify(pod, opts.force_bare);
        let Some(node) = node.filter(|n| node_names.contains(n)) else {
            if action != Action::Skip {
                match node {
                    None => unscheduled.push(format!("{ns}/{name}")),
                    Some(n) => notes.push(format!("pod {ns}/{name} is bound to node {n}, which is not in the snapshot: left out")),
                }
            }
            continue;
        };
        if action != Action::Skip
            && let Some(why) = not_ready.get(node)
        {
            risks.push(format!("node {node} is NotReady ({why}): the pod cannot be restarted or verified until the node is back"));
        }
        if action == Action::Evict {
            let pdbs = ctx.pdbs(pod);
            if pdbs.len() > 1 {
                let names: Vec<&str> = pdbs.iter().map(|(b, _, _)| name_of(&b.metadata)).collect();
                multi_pdb.push(format!("{ns}/{name} ({})", names.join(", ")));
            }
        }
        for reason in risks {
            at_risk.push(AtRisk { namespace: ns.to_string(), name: name.to_string(), reason });
        }
        per_node.get_mut(node).expect("node listed").push(PodAction {
            namespace: ns.to_string(),
            name: name.to_string(),
            action,
            reason,
        });
    }
    if !multi_pdb.is_empty() {
        // The apiserver answers such an eviction with 500 every time: apply would stop there.
        refusals.push(Refusal {
            rule: "pod-with-several-pdbs".into(),
            message: format!(
                "the Eviction API refuses to evict a pod that more than one PodDisruptionBudget selects, so apply would stop at it: {}; \
                 leave one budget over each pod (delete or narrow the others), then plan again",
                multi_pdb.join(", ")
            ),
        });
    }
    if !unscheduled.is_empty() {
        notes.push(format!(
            "{} pod(s) not scheduled yet ({}): they start on whichever CNI the node runs when they are scheduled",
            unscheduled.len(),
            unscheduled.join(", ")
        ));
    }

    // Order: a canary, then workers, then control-plane nodes, then the node we run on.
    let risky: BTreeSet<(&str, &str)> = at_risk.iter().map(|r| (r.namespace.as_str(), r.name.as_str())).collect();
    let weight = |node: &str| {
        let pods = &per_node[node];
        let at_risk = pods.iter().filter(|p| risky.contains(&(p.namespace.as_str(), p.name.as_str()))).count();
        let touched = pods.iter().filter(|p| matches!(p.action, Action::Evict | Action::Delete | Action::Recreate)).count();
        (not_ready.contains_key(node), at_risk, touched)
    };
    let is_self = |n: &str| opts.self_node.as_deref() == Some(n);
    let workers: Vec<&str> =
        nodes.iter().filter(|n| !is_control_plane(n) && !is_self(name_of(&n.metadata))).map(|n| name_of(&n.metadata)).collect();
    let control: Vec<&str> =
        nodes.iter().filter(|n| is_control_plane(n) && !is_self(name_of(&n.metadata))).map(|n| name_of(&n.metadata)).collect();
    let selfs: Vec<&str> = nodes.iter().map(|n| name_of(&n.metadata)).filter(|n| is_self(n)).collect();
    let pool = if !workers.is_empty() { &workers } else if !control.is_empty() { &control } else { &selfs };
    let canary = pool.iter().copied().min_by_key(|n| (weight(n), n.to_string()));
    let mut order: Vec<(&str, u32)> = Vec::new();
    if let Some(c) = canary {
        order.push((c, 0));
        let (nr, risk, touched) = weight(c);
        notes.push(format!(
            "canary (batch 0): {c}, the {}node with the fewest pods at risk ({risk}), then the fewest pods to restart ({touched}){}",
            if is_control_plane_name(snap, c) { "control-plane " } else { "" },
            if nr { "; every candidate is NotReady" } else { "" }
        ));
    }
    let mut batch = 1u32;
    for group in [&workers, &control] {
        let rest: Vec<&str> = group.iter().copied().filter(|n| Some(*n) != canary).collect();
        for chunk in rest.chunks(opts.batch) {
            order.extend(chunk.iter().map(|n| (*n, batch)));
            batch += 1;
        }
    }
    if !control.is_empty() && !workers.is_empty() {
        notes.push(format!(
            "control-plane node(s) {} after the workers: cluster DNS and controllers tolerated there move only once the \
             canary and the workers run on the new CNI",
            control.join(", ")
        ));
    }
    for s in &selfs {
        if Some(*s) != canary {
            order.push((s, batch));
            batch += 1;
        }
        notes.push(format!("{s} last: the migration runs there (--self-node or $NODE_NAME), so it is not restarted mid-way"));
    }

    at_risk.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let nodes = order
        .into_iter()
        .map(|(n, batch)| NodePlan { name: n.to_string(), batch, pods: per_node.remove(n).unwrap_or_default() })
        .collect();
    notes.extend(snap.notes.iter().cloned());
    Ok((Plan { from: from_spec, to: to_spec, refusals, nodes, at_risk }, notes))
}

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

fn ns_of(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

fn controller_of(m: &ObjectMeta) -> Option<&OwnerReference> {
    m.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true))
}

fn is_control_plane(n: &Node) -> bool {
    n.metadata.labels.as_ref().is_some_and(|l| {
        l.contains_key("node-role.kubernetes.io/control-plane") || l.contains_key("node-role.kubernetes.io/master")
    })
}

fn is_control_plane_name(snap: &ClusterSnapshot, name: &str) -> bool {
    snap.nodes.iter().any(|n| name_of(&n.metadata) == name && is_control_plane(n))
}

/// Why a node is not Ready, or None when it is.
fn node_not_ready(n: &Node) -> Option<String> {
    let ready = n.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => Some(format!("Ready={}{}", c.status, c.reason.as_deref().map(|r| format!(", {r}")).unwrap_or_default())),
        None => Some("no Ready condition".into()),
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_finished(p: &Pod) -> Option<&str> {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).filter(|ph| *ph == "Succeeded" || *ph == "Failed")
}

/// Kubernetes label selector semantics (matchLabels and matchExpressions, all must hold).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Lookups over the snapshot.
struct Ctx<'a> {
    snap: &'a ClusterSnapshot,
}

/// A pod's controller, as the operator would name it, and what it tells about availability.
struct Owner {
    /// `Deployment shop/web via ReplicaSet web-7d9f`
    words: String,
    kind: String,
    /// Desired replicas of the top controller, when known.
    replicas: Option<i32>,
    /// The Job's backoffLimit, for Job pods.
    job_backoff: Option<i32>,
}

impl<'a> Ctx<'a> {
    fn new(snap: &'a ClusterSnapshot) -> Self {
        Ctx { snap }
    }

    fn owner(&self, ns: &str, r: &OwnerReference) -> Owner {
        let meta_eq = |m: &ObjectMeta| ns_of(m) == ns && name_of(m) == r.name;
        match r.kind.as_str() {
            "ReplicaSet" => {
                let rs = self.snap.replicasets.iter().find(|x| meta_eq(&x.metadata));
                let dep = rs.and_then(|rs| controller_of(&rs.metadata)).filter(|o| o.kind == "Deployment");
                match dep {
                    Some(d) => {
                        let replicas = self
                            .snap
                            .deployments
                            .iter()
                            .find(|x| ns_of(&x.metadata) == ns && name_of(&x.metadata) == d.name)
                            .map(|x| x.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1));
                        Owner {
                            words: format!("Deployment {ns}/{} via ReplicaSet {}", d.name, r.name),
                            kind: "Deployment".into(),
                            replicas,
                            job_backoff: None,
                        }
                    }
                    None => Owner {
                        words: format!("ReplicaSet {ns}/{}{}", r.name, if rs.is_none() { " (not in the snapshot)" } else { "" }),
                        kind: "ReplicaSet".into(),
                        replicas: rs.map(|x| x.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)),
                        job_backoff: None,
                    },
                }
            }
            "StatefulSet" => Owner {
                words: format!("StatefulSet {ns}/{}", r.name),
                kind: "StatefulSet".into(),
                replicas: self
                    .snap
                    .statefulsets
                    .iter()
                    .find(|x| meta_eq(&x.metadata))
                    .map(|x| x.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)),
                job_backoff: None,
            },
            "Job" => {
                let job = self.snap.jobs.iter().find(|x| meta_eq(&x.metadata));
                let cron = job.and_then(|j| controller_of(&j.metadata)).filter(|o| o.kind == "CronJob");
                Owner {
                    words: match cron {
                        Some(c) => format!("CronJob {ns}/{} via Job {}", c.name, r.name),
                        None => format!("Job {ns}/{}", r.name),
                    },
                    kind: "Job".into(),
                    replicas: None,
                    job_backoff: Some(job.and_then(|j| j.spec.as_ref()).and_then(|s| s.backoff_limit).unwrap_or(6)),
                }
            }
            other => Owner { words: format!("{other} {ns}/{}", r.name), kind: other.to_string(), replicas: None, job_backoff: None },
        }
    }

    /// PDBs selecting `pod`, with how many disruptions each allows now.
    fn pdbs(&self, pod: &Pod) -> Vec<(&'a PodDisruptionBudget, i32, String)> {
        let ns = ns_of(&pod.metadata);
        let empty = BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        self.snap
            .pdbs
            .iter()
            .filter(|b| ns_of(&b.metadata) == ns)
            .filter(|b| b.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| selector_matches(s, labels)))
            .map(|b| {
                let (allowed, how) = self.disruptions_allowed(b);
                (b, allowed, how)
            })
            .collect()
    }

    /// From the PDB's status when the dump has it, else computed as the disruption controller
    /// does: healthy pods minus the pods the budget keeps.
    fn disruptions_allowed(&self, b: &PodDisruptionBudget) -> (i32, String) {
        if let Some(s) = &b.status {
            return (
                s.disruptions_allowed,
                format!("{} of {} pods healthy, {} required", s.current_healthy, s.expected_pods, s.desired_healthy),
            );
        }
        let ns = ns_of(&b.metadata);
        let Some(sel) = b.spec.as_ref().and_then(|s| s.selector.as_ref()) else { return (0, "no selector".into()) };
        let empty = BTreeMap::new();
        let matched: Vec<&Pod> = self
            .snap
            .pods
            .iter()
            .filter(|p| ns_of(&p.metadata) == ns && pod_finished(p).is_none())
            .filter(|p| selector_matches(sel, p.metadata.labels.as_ref().unwrap_or(&empty)))
            .collect();
        let expected = matched.len() as i32;
        let healthy = matched.iter().filter(|p| pod_ready(p)).count() as i32;
        let scaled = |v: &IntOrString| match v {
            IntOrString::Int(i) => *i,
            IntOrString::String(s) => {
                let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(100);
                ((expected as i64 * pct + 99) / 100) as i32
            }
        };
        let spec = b.spec.as_ref();
        let desired = if let Some(mu) = spec.and_then(|s| s.max_unavailable.as_ref()) {
            (expected - scaled(mu)).max(0)
        } else if let Some(ma) = spec.and_then(|s| s.min_available.as_ref()) {
            scaled(ma)
        } else {
            0
        };
        ((healthy - desired).max(0), format!("{healthy} of {expected} pods ready, {desired} required"))
    }

    /// What happens to `pod`, why, and what is at risk.
    fn classify(&self, pod: &Pod, force_bare: bool) -> (Action, String, Vec<String>) {
        let ns = ns_of(&pod.metadata);
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mirror = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
        let owner = controller_of(&pod.metadata);
        let mut risks = Vec::new();
        if let Some(phase) = pod_finished(pod) {
            return (Action::Skip, format!("finished ({phase}): no network to move"), risks);
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return (Action::Skip, "terminating: already being deleted".into(), risks);
        }
        if mirror {
            if host_network {
                return (Action::Skip, "static pod (mirror of a kubelet manifest) on the host network: no CNI involved".into(), risks);
            }
            risks.push(
                "static pod not on the host network: the API cannot restart it, so it stays on the old CNI until its \
                 manifest is touched on the node or the node reboots"
                    .into(),
            );
            return (Action::Skip, "static pod (mirror of a kubelet manifest): only the kubelet can restart it".into(), risks);
        }
        if host_network {
            let by = owner.map(|o| format!(", {} {ns}/{}", o.kind, o.name)).unwrap_or_default();
            return (Action::Skip, format!("host network{by}: uses the node's address, no CNI involved"), risks);
        }
        let empty_dirs: Vec<&str> = spec
            .and_then(|s| s.volumes.as_ref())
            .map(|v| v.iter().filter(|v| v.empty_dir.is_some()).map(|v| v.name.as_str()).collect())
            .unwrap_or_default();
        let lose_empty_dir = |verb: &str, risks: &mut Vec<String>| {
            if !empty_dirs.is_empty() {
                risks.push(format!("emptyDir {} ({}): its data is lost when the pod is {verb}", plural(empty_dirs.len(), "volume", "volumes"), empty_dirs.join(", ")));
            }
        };
        let Some(r) = owner else {
            return if force_bare {
                lose_empty_dir("re-created", &mut risks);
                risks.push(
                    "bare pod (no controller): deleted and re-created from its own spec (--force-bare): it restarts with a new \
                     address and keeps nothing it held in memory"
                        .into(),
                );
                (Action::Recreate, "bare pod (no controller), --force-bare: re-created from its own spec".into(), risks)
            } else {
                risks.push(
                    "bare pod (no controller): kept on the old CNI and cut off when the old CNI is removed; re-create it \
                     yourself, or plan with --force-bare"
                        .into(),
                );
                (Action::Keep, "bare pod (no controller): kept on the old CNI; --force-bare re-creates it".into(), risks)
            };
        };
        if r.kind == "DaemonSet" {
            lose_empty_dir("deleted", &mut risks);
            return (
                Action::Delete,
                format!("owned by DaemonSet {ns}/{}: deleted, the DaemonSet recreates it on this node", r.name),
                risks,
            );
        }
        let o = self.owner(ns, r);
        lose_empty_dir("evicted", &mut risks);
        if o.replicas == Some(1) {
            risks.push(format!("only replica of {}: unavailable until its replacement is Ready (brief outage)", o.words));
        }
        if let Some(limit) = o.job_backoff {
            risks.push(format!(
                "running pod of {}: eviction restarts its work from the start and counts against backoffLimit {limit} \
                 unless the Job's podFailurePolicy ignores DisruptionTarget",
                o.words
            ));
        }
        let pdbs = self.pdbs(pod);
        let budget = match pdbs.as_slice() {
            [] => "no PDB".to_string(),
            [(b, allowed, how)] => {
                let name = name_of(&b.metadata);
                if *allowed > 0 {
                    format!("PDB {name} allows {allowed}")
                } else {
                    // One replica under minAvailable 1 can never be evicted: a Deployment does
                    // not surge for an eviction.
                    risks.push(if o.replicas == Some(1) {
                        format!(
                            "PDB {ns}/{name} allows no disruption ({how}) and, with a single replica, never will: \
                             eviction is retried until --pod-timeout and the migration stops at this node; \
                             scale {} to 2 or relax the PDB before applying",
                            o.words.split(" via ").next().unwrap_or_default()
                        )
                    } else {
                        format!(
                            "PDB {ns}/{name} allows no disruption now ({how}): eviction is retried until it allows one, \
                             and the node's batch waits"
                        )
                    });
                    format!("PDB {name} allows 0 now, eviction waits for it")
                }
            }
            many => {
                let names: Vec<&str> = many.iter().map(|(b, _, _)| name_of(&b.metadata)).collect();
                risks.push(format!(
                    "{} PDBs select this pod ({}): the Eviction API refuses to evict it until only one does",
                    many.len(),
                    names.join(", ")
                ));
                format!("PDBs {} (more than one)", names.join(", "))
            }
        };
        let unknown = if ["Deployment", "ReplicaSet", "StatefulSet", "Job"].contains(&o.kind.as_str()) {
            ""
        } else {
            " (a controller allot does not know; it is expected to recreate the pod)"
        };
        (Action::Evict, format!("owned by {}{unknown}: evicted, {budget}", o.words), risks)
    }
}

fn plural<'s>(n: usize, one: &'s str, many: &'s str) -> &'s str {
    if n == 1 { one } else { many }
}
