//! A deterministic simulated cluster behind the [`Cluster`] trait: nodes, pods with owners,
//! controllers that re-create removed pods after a delay (with an address of whichever CNI runs
//! on the node then), PodDisruptionBudgets answering 429, DaemonSet pods re-created in place, an
//! API that goes away for a while, nodes that go NotReady, and a crash injected before any call.
//! Time is virtual: `sleep` advances the clock. It also watches what the orchestrator does and
//! records every broken rule (a PDB broken by a delete, a bare pod deleted without the flag).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use allot_k8s::migration::{MigrationSpec, MigrationStatus, ObjectRef};
use serde::{Deserialize, Serialize};

use crate::orchestrate::{Cluster, ClusterError, Cni, Eviction, NodeInfo, PodInfo};
use crate::plan::{NodePlan, Plan};

/// Run a future of the simulation to its end: the simulated cluster never waits for real, so
/// every future is ready on its first poll.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a simulated call waited: the simulation never blocks"),
    }
}

/// A small PRNG (splitmix64): the fault schedule and the scheduler's choices come from one
/// seed, so a seed reproduces a run exactly.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A workload controller.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// `ReplicaSet` (scheduled anywhere) or `DaemonSet` (one pod per node, re-created in place).
    pub kind: String,
    pub replicas: u32,
    /// A PodDisruptionBudget's minAvailable over this workload's pods.
    pub min_available: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// The owning workload's name (None: a bare pod).
    pub owner: Option<String>,
    pub host_network: bool,
    pub mirror: bool,
    pub finished: bool,
    /// When its containers are up (Ready once it also has an address and its node is Ready).
    pub start_at_ms: u64,
    pub ip: Option<IpAddr>,
    /// The address came from the target's CNI (the truth the tests check; the orchestrator
    /// only sees the address).
    #[serde(default)]
    pub on_target: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SimNode {
    pub unschedulable: bool,
    /// When the old CNI's agent started on the node (None: not installed).
    pub old_since: Option<Duration>,
    /// When the target's agent started on the node.
    pub target_since: Option<Duration>,
}

/// Delays of the simulated world.
#[derive(Clone, Debug)]
pub struct Delays {
    /// From a pod's removal to its replacement's creation.
    pub recreate: Duration,
    /// From creation to Ready.
    pub start: Duration,
    /// From a CNI's install to its agent being Ready on a node.
    pub cni_start: Duration,
}

impl Default for Delays {
    fn default() -> Self {
        Delays { recreate: Duration::from_secs(2), start: Duration::from_secs(3), cni_start: Duration::from_secs(20) }
    }
}

#[derive(Debug)]
pub struct World {
    pub now: Duration,
    pub rng: Rng,
    pub delays: Delays,
    pub nodes: BTreeMap<String, SimNode>,
    pub workloads: Vec<Workload>,
    pub pods: BTreeMap<(String, String), SimPod>,
    /// Replacements due: (time, workload index, node for DaemonSets).
    pub due: Vec<(Duration, usize, Option<String>)>,
    /// New pods get the target's addresses (on nodes where its agent is Ready).
    pub target_active: bool,
    /// The target hands out addresses from the old CNI's range (KKP keeps the pods CIDR):
    /// 10.1.128.0/17 instead of 10.2.0.0/16.
    pub shared_range: bool,
    pub kube_proxy: String,
    pub migration: Option<(MigrationSpec, MigrationStatus)>,
    /// Every status written, in order.
    pub saves: u64,
    /// Windows when every API call fails as unavailable.
    pub api_down: Vec<(Duration, Duration)>,
    /// Windows when a node is NotReady.
    pub node_down: Vec<(String, Duration, Duration)>,
    /// Calls so far (`now` and `sleep` not counted) and the call that crashes the process.
    pub calls: u64,
    pub crash_at: Option<u64>,
    /// Broken rules the orchestrator caused.
    pub violations: Vec<String>,
    /// Bare pods removed without re-creation so far (checked at the end).
    pub bare_deleted: Vec<(String, String)>,
    next_uid: u64,
    next_old: u32,
    next_new: u32,
}

pub const OLD_CIDR: &str = "10.1.0.0/16";
pub const NEW_CIDR: &str = "10.2.0.0/16";

impl World {
    fn node_ready_at(&self, node: &str, t: Duration) -> bool {
        self.nodes.contains_key(node) && !self.node_down.iter().any(|(n, a, b)| n == node && *a <= t && t < *b)
    }

    pub fn node_ready(&self, node: &str) -> bool {
        self.node_ready_at(node, self.now)
    }

    fn cni_ready(&self, node: &str, cni: Cni) -> bool {
        let n = &self.nodes[node];
        let since = if cni == Cni::Target { n.target_since } else { n.old_since };
        self.node_ready(node) && since.is_some_and(|s| s + self.delays.cni_start <= self.now)
    }

    pub fn pod_ready(&self, p: &SimPod) -> bool {
        !p.finished && p.ip.is_some() && p.start_at_ms <= self.now.as_millis() as u64 && self.node_ready(&p.node)
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("uid-{}", self.next_uid)
    }

    /// Create a pod of workload `w` (on `node`, or wherever the scheduler puts it).
    fn spawn(&mut self, w: usize, node: Option<String>) -> bool {
        let wl = self.workloads[w].clone();
        let node = match node {
            Some(n) => n,
            None => {
                let fit: Vec<String> = self.nodes.iter().filter(|(n, s)| !s.unschedulable && self.node_ready(n)).map(|(n, _)| n.clone()).collect();
                if fit.is_empty() {
                    return false;
                }
                fit[self.rng.below(fit.len() as u64) as usize].clone()
            }
        };
        let uid = self.uid();
        let name = if wl.kind == "DaemonSet" { format!("{}-{}", wl.name, &node) } else { format!("{}-{}", wl.name, &uid[4..]) };
        let pod = SimPod {
            namespace: wl.namespace.clone(),
            name: name.clone(),
            uid,
            node,
            owner: Some(wl.name.clone()),
            host_network: false,
            mirror: false,
            finished: false,
            start_at_ms: (self.now + self.delays.start).as_millis() as u64,
            ip: None,
            on_target: false,
        };
        self.pods.insert((wl.namespace, name), pod);
        true
    }

    /// Let time reach `now`: controllers create due pods, started pods get an address from the
    /// CNI running on their node.
    fn settle(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        due.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut later = Vec::new();
        for (t, w, node) in due {
            if t > self.now {
                later.push((t, w, node));
            } else if !self.spawn(w, node.clone()) {
                later.push((self.now + Duration::from_secs(1), w, node));
            }
        }
        self.due = later;
        let keys: Vec<_> = self.pods.keys().cloned().collect();
        for k in keys {
            let p = &self.pods[&k];
            if p.ip.is_some() || p.host_network || p.finished || p.start_at_ms > self.now.as_millis() as u64 || !self.node_ready(&p.node) {
                continue;
            }
            let node = p.node.clone();
            let (ip, on_target) = if self.target_active && self.cni_ready(&node, Cni::Target) {
                self.next_new += 1;
                (Some(if self.shared_range { ip_in(10, 1, 0x8000 + self.next_new) } else { ip_in(10, 2, self.next_new) }), true)
            } else if self.cni_ready(&node, Cni::Old) {
                self.next_old += 1;
                (Some(ip_in(10, 1, self.next_old)), false)
            } else {
                (None, false)
            };
            let p = self.pods.get_mut(&k).unwrap();
            p.ip = ip;
            p.on_target = on_target;
        }
    }

    fn workload_of(&self, p: &SimPod) -> Option<usize> {
        let owner = p.owner.as_ref()?;
        self.workloads.iter().position(|w| &w.name == owner && w.namespace == p.namespace)
    }

    /// Ready pods of a workload.
    fn healthy(&self, w: usize) -> u32 {
        let wl = &self.workloads[w];
        self.pods.values().filter(|p| p.owner.as_deref() == Some(wl.name.as_str()) && p.namespace == wl.namespace && self.pod_ready(p)).count() as u32
    }

    /// Remove a pod; its controller re-creates it later.
    fn remove(&mut self, ns: &str, name: &str) {
        let Some(p) = self.pods.remove(&(ns.to_string(), name.to_string())) else { return };
        match self.workload_of(&p) {
            Some(w) => {
                let node = (self.workloads[w].kind == "DaemonSet").then(|| p.node.clone());
                self.due.push((self.now + self.delays.recreate, w, node));
            }
            None => self.bare_deleted.push((p.namespace, p.name)),
        }
    }

    fn info(&self, p: &SimPod) -> PodInfo {
        PodInfo {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
            node: p.node.clone(),
            owner: self.workload_of(p).map(|w| (self.workloads[w].kind.clone(), self.workloads[w].name.clone())),
            host_network: p.host_network,
            mirror: p.mirror,
            finished: p.finished,
            ready: self.pod_ready(p),
            ips: if p.host_network { vec![] } else { p.ip.into_iter().collect() },
        }
    }

    /// Every counted pod (pod network, running, not a mirror) and whether it is on the new CNI
    /// (by which CNI gave its address, not by the address).
    pub fn pods_by_cni(&self) -> (u32, u32) {
        let counted = self.pods.values().filter(|p| !p.host_network && !p.mirror && !p.finished);
        let (mut on_new, mut on_old) = (0, 0);
        for p in counted {
            if p.ip.is_some() && p.on_target {
                on_new += 1;
            } else {
                on_old += 1;
            }
        }
        (on_new, on_old)
    }
}

fn ip_in(a: u8, b: u8, n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, (n >> 8) as u8, n as u8))
}

/// The simulated cluster.
pub struct Sim {
    pub world: RefCell<World>,
}

impl Sim {
    /// A cluster of `nodes` nodes (n0, n1, ...) running the old CNI, with no workloads.
    pub fn new(seed: u64, nodes: usize) -> Self {
        let mut map = BTreeMap::new();
        for i in 0..nodes {
            map.insert(format!("n{i}"), SimNode { unschedulable: false, old_since: Some(Duration::ZERO), target_since: None });
        }
        Sim {
            world: RefCell::new(World {
                now: Duration::from_secs(1000),
                rng: Rng::new(seed),
                delays: Delays::default(),
                nodes: map,
                workloads: vec![],
                pods: BTreeMap::new(),
                due: vec![],
                target_active: false,
                shared_range: false,
                kube_proxy: "ipvs".into(),
                migration: None,
                saves: 0,
                api_down: vec![],
                node_down: vec![],
                calls: 0,
                crash_at: None,
                violations: vec![],
                bare_deleted: vec![],
                next_uid: 0,
                next_old: 0,
                next_new: 0,
            }),
        }
    }

    /// Add a workload and start its pods (spread by the scheduler; DaemonSets on every node).
    pub fn workload(&self, namespace: &str, name: &str, kind: &str, replicas: u32, min_available: Option<u32>) {
        let mut w = self.world.borrow_mut();
        w.workloads.push(Workload { namespace: namespace.into(), name: name.into(), kind: kind.into(), replicas, min_available });
        let i = w.workloads.len() - 1;
        if kind == "DaemonSet" {
            let nodes: Vec<String> = w.nodes.keys().cloned().collect();
            for n in nodes {
                w.spawn(i, Some(n));
            }
        } else {
            for _ in 0..replicas {
                w.spawn(i, None);
            }
        }
    }

    /// Add a pod no controller owns (or a host-network / mirror / finished one).
    pub fn bare_pod(&self, namespace: &str, name: &str, node: &str, host_network: bool, mirror: bool, finished: bool) {
        let mut w = self.world.borrow_mut();
        let uid = w.uid();
        let pod = SimPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            node: node.into(),
            owner: None,
            host_network,
            mirror,
            finished,
            start_at_ms: w.now.as_millis() as u64,
            ip: None,
            on_target: false,
        };
        w.pods.insert((namespace.into(), name.into()), pod);
    }

    /// Let the world run for `d` (pods start, controllers catch up).
    pub fn run_for(&self, d: Duration) {
        let mut w = self.world.borrow_mut();
        let end = w.now + d;
        while w.now < end {
            w.now += Duration::from_secs(1);
            w.settle();
        }
    }

    /// A plan over the nodes in name order: batch 0 is n0 alone, then batches of `batch`.
    pub fn plan(&self, from: &str, to: &str, batch: u32) -> Plan {
        let w = self.world.borrow();
        let nodes = w
            .nodes
            .keys()
            .enumerate()
            .map(|(i, n)| NodePlan { name: n.clone(), batch: if i == 0 { 0 } else { 1 + (i as u32 - 1) / batch }, pods: vec![] })
            .collect();
        Plan { from: from.into(), to: to.into(), refusals: vec![], nodes, at_risk: vec![] }
    }

    /// Count a call; fail it when the process "crashes" here or the API is down.
    fn enter(&self) -> Result<std::cell::RefMut<'_, World>, ClusterError> {
        let mut w = self.world.borrow_mut();
        w.calls += 1;
        if w.crash_at.is_some_and(|k| w.calls >= k) {
            return Err(ClusterError::Interrupted);
        }
        w.settle();
        let now = w.now;
        if w.api_down.iter().any(|(a, b)| *a <= now && now < *b) {
            return Err(ClusterError::Unavailable("connection refused (simulated outage)".into()));
        }
        Ok(w)
    }

    /// Check that a removal did not break a PDB that held before it.
    fn removal_checked(&self, w: &mut World, ns: &str, name: &str, how: &str) {
        let Some(p) = w.pods.get(&(ns.to_string(), name.to_string())).cloned() else { return };
        let before: Vec<u32> = (0..w.workloads.len()).map(|i| w.healthy(i)).collect();
        if p.owner.is_none() && !w.migration.as_ref().is_some_and(|(s, _)| s.force_bare) {
            w.violations.push(format!("{how} of bare pod {ns}/{name} without --force-bare"));
        }
        w.remove(ns, name);
        for (i, b) in before.into_iter().enumerate() {
            if let Some(min) = w.workloads[i].min_available {
                let after = w.healthy(i);
                if after < min && b >= min {
                    let wl = &w.workloads[i].name;
                    w.violations.push(format!("{how} of {ns}/{name} broke the PDB of {wl}: {after} < {min} at {:?}", w.now));
                }
            }
        }
    }
}

impl Cluster for Sim {
    fn now(&self) -> Duration {
        self.world.borrow().now
    }

    async fn sleep(&self, d: Duration) {
        let mut w = self.world.borrow_mut();
        let end = w.now + d;
        // Step through the interval so controllers act at their time.
        while w.now < end {
            w.now = (w.now + Duration::from_secs(1)).min(end);
            w.settle();
        }
    }

    async fn load(&self) -> Result<Option<(MigrationSpec, MigrationStatus)>, ClusterError> {
        Ok(self.enter()?.migration.clone())
    }

    async fn create(&self, spec: &MigrationSpec, status: &MigrationStatus) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        w.migration = Some((spec.clone(), status.clone()));
        w.saves += 1;
        Ok(())
    }

    async fn save(&self, status: &MigrationStatus) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        let Some(m) = w.migration.as_mut() else { return Err(ClusterError::Failed("migrations.allot.dev \"cni\" not found".into())) };
        m.1 = status.clone();
        w.saves += 1;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<String>, ClusterError> {
        Ok(self.enter()?.nodes.keys().cloned().collect())
    }

    async fn node(&self, name: &str) -> Result<NodeInfo, ClusterError> {
        let w = self.enter()?;
        let n = w.nodes.get(name).ok_or_else(|| ClusterError::Failed(format!("nodes \"{name}\" not found")))?;
        Ok(NodeInfo { ready: w.node_ready(name), unschedulable: n.unschedulable })
    }

    async fn set_unschedulable(&self, node: &str, unschedulable: bool) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        let n = w.nodes.get_mut(node).ok_or_else(|| ClusterError::Failed(format!("nodes \"{node}\" not found")))?;
        n.unschedulable = unschedulable;
        Ok(())
    }

    async fn pods_on(&self, node: &str) -> Result<Vec<PodInfo>, ClusterError> {
        let w = self.enter()?;
        Ok(w.pods.values().filter(|p| p.node == node).map(|p| w.info(p)).collect())
    }

    async fn evict(&self, namespace: &str, name: &str) -> Result<Eviction, ClusterError> {
        let w = self.enter()?;
        let Some(p) = w.pods.get(&(namespace.to_string(), name.to_string())).cloned() else { return Ok(Eviction::Gone) };
        if let Some(i) = w.workload_of(&p)
            && let Some(min) = w.workloads[i].min_available
        {
            let after = w.healthy(i) - u32::from(w.pod_ready(&p));
            if after < min {
                return Ok(Eviction::Blocked);
            }
        }
        drop(w);
        let mut w = self.world.borrow_mut();
        self.removal_checked(&mut w, namespace, name, "eviction");
        Ok(Eviction::Evicted)
    }

    async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        self.removal_checked(&mut w, namespace, name, "delete");
        Ok(())
    }

    async fn pod_manifest(&self, namespace: &str, name: &str) -> Result<Option<(String, String)>, ClusterError> {
        let w = self.enter()?;
        Ok(w.pods.get(&(namespace.to_string(), name.to_string())).map(|p| (serde_json::to_string(p).unwrap(), p.uid.clone())))
    }

    async fn create_pod(&self, manifest: &str) -> Result<bool, ClusterError> {
        let mut w = self.enter()?;
        let mut p: SimPod = serde_json::from_str(manifest).map_err(|e| ClusterError::Failed(format!("bad manifest: {e}")))?;
        let key = (p.namespace.clone(), p.name.clone());
        if w.pods.contains_key(&key) {
            return Ok(false);
        }
        p.uid = w.uid();
        p.ip = None;
        p.on_target = false;
        p.start_at_ms = (w.now + w.delays.start).as_millis() as u64;
        w.bare_deleted.retain(|k| *k != key);
        w.pods.insert(key, p);
        Ok(true)
    }

    async fn unavailable(&self, owners: &[String]) -> Result<Vec<String>, ClusterError> {
        let w = self.enter()?;
        let mut out = Vec::new();
        for (i, wl) in w.workloads.iter().enumerate() {
            let key = format!("{} {}/{}", wl.kind, wl.namespace, wl.name);
            if !owners.contains(&key) {
                continue;
            }
            let want = if wl.kind == "DaemonSet" { w.nodes.keys().filter(|n| w.node_ready(n)).count() as u32 } else { wl.replicas };
            let ready = w.healthy(i);
            if ready < want {
                out.push(format!("{key}: {ready}/{want} Ready"));
            }
        }
        Ok(out)
    }

    async fn cni_not_ready(&self, cni: Cni, nodes: &[String]) -> Result<Vec<String>, ClusterError> {
        let w = self.enter()?;
        Ok(nodes.iter().filter(|n| !w.cni_ready(n, cni)).cloned().collect())
    }

    async fn switch_to_target(&self, spec: &MigrationSpec) -> Result<Vec<ObjectRef>, ClusterError> {
        let mut w = self.enter()?;
        let now = w.now;
        for n in w.nodes.values_mut() {
            n.target_since.get_or_insert(now);
        }
        w.target_active = true;
        let name = spec.to.split(':').next().unwrap_or_default().to_string();
        Ok(vec![ObjectRef { api_version: "apps/v1".into(), kind: "DaemonSet".into(), namespace: Some("kube-system".into()), name }])
    }

    async fn remove_old(&self, _spec: &MigrationSpec) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        for n in w.nodes.values_mut() {
            n.old_since = None;
        }
        Ok(())
    }

    async fn switch_back(&self, _spec: &MigrationSpec, _applied: &[ObjectRef], old_removed: bool) -> Result<(), ClusterError> {
        let mut w = self.enter()?;
        let now = w.now;
        for n in w.nodes.values_mut() {
            n.target_since = None;
            if old_removed {
                n.old_since.get_or_insert(now);
            }
        }
        w.target_active = false;
        Ok(())
    }

    async fn kube_proxy_mode(&self) -> Result<String, ClusterError> {
        Ok(self.enter()?.kube_proxy.clone())
    }

    async fn set_kube_proxy_mode(&self, mode: &str) -> Result<(), ClusterError> {
        self.enter()?.kube_proxy = mode.to_string();
        Ok(())
    }
}
