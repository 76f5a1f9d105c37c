//! `allot migrate apply` and `rollback` as a state machine over the [`Cluster`] trait.
//!
//! Every step reads the persisted [`MigrationStatus`], does one piece of work and writes the
//! status back, so a run killed anywhere resumes from the object: each step is safe to repeat
//! (a cordon is recorded before it is done, pods already on the wanted CNI are skipped, a bare
//! pod's manifest is recorded before it is deleted). Time comes from the trait, so the simulated
//! cluster (`sim`) runs the same code deterministically.
//!
//! Order, as the KKP manual migration does it: switch the target on, wait for its pods on every
//! node, then restart pods batch by batch (canary first), verify each node, remove the old CNI,
//! optionally change kube-proxy's mode. Rollback: kube-proxy's mode back, old CNI back (target
//! removed), then restart pods on every node that has pods on the new CNI, in reverse order.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use allot_k8s::migration::{MigrationSpec, MigrationStatus, NodePhase, NodeStatus, ObjectRef, PendingRecreate, Phase};
use ipnet::IpNet;

use crate::plan::{Plan, Refusal};

/// A pod as the orchestrator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// The controlling owner (`kind`, `name`), if any.
    pub owner: Option<(String, String)>,
    pub host_network: bool,
    /// A static pod's mirror: the kubelet owns it, the API cannot restart it.
    pub mirror: bool,
    /// Succeeded or Failed: nothing runs.
    pub finished: bool,
    pub ready: bool,
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub ready: bool,
    pub unschedulable: bool,
}

/// The answer to an eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    Evicted,
    /// 429: a PodDisruptionBudget does not allow it now.
    Blocked,
    /// The pod is already gone.
    Gone,
}

/// Which CNI a readiness question is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    Old,
    Target,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API did not answer (connection refused, 5xx, timeout): retried for a while.
    #[error("the API is unavailable: {0}")]
    Unavailable(String),
    /// The API answered no: the step fails.
    #[error("{0}")]
    Failed(String),
    /// The process is stopping (signal, or a crash injected by a test): stop now and record
    /// nothing more.
    #[error("interrupted")]
    Interrupted,
}

/// What a migration needs of a cluster. Every mutating call is idempotent: repeating it after a
/// crash must be harmless.
#[allow(async_fn_in_trait)] // driven by one task with static dispatch: no Send bound needed
pub trait Cluster {
    /// Time since some fixed point; only differences are used.
    fn now(&self) -> Duration;
    async fn sleep(&self, d: Duration);
    /// The `Migration` object, if there is one.
    async fn load(&self) -> Result<Option<(MigrationSpec, MigrationStatus)>, ClusterError>;
    /// Create the `Migration` object (replacing a finished one).
    async fn create(&self, spec: &MigrationSpec, status: &MigrationStatus) -> Result<(), ClusterError>;
    /// Write the status.
    async fn save(&self, status: &MigrationStatus) -> Result<(), ClusterError>;
    async fn nodes(&self) -> Result<Vec<String>, ClusterError>;
    async fn node(&self, name: &str) -> Result<NodeInfo, ClusterError>;
    async fn set_unschedulable(&self, node: &str, unschedulable: bool) -> Result<(), ClusterError>;
    async fn pods_on(&self, node: &str) -> Result<Vec<PodInfo>, ClusterError>;
    async fn evict(&self, namespace: &str, name: &str) -> Result<Eviction, ClusterError>;
    /// Delete a pod; a pod already gone is not an error.
    async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError>;
    /// The pod's manifest and uid, or None when there is no such pod.
    async fn pod_manifest(&self, namespace: &str, name: &str) -> Result<Option<(String, String)>, ClusterError>;
    /// Create a pod from a manifest `pod_manifest` returned; false when a pod of that name
    /// still exists (the old one is still terminating).
    async fn create_pod(&self, manifest: &str) -> Result<bool, ClusterError>;
    /// Of the controllers given (`Kind namespace/name`), those with fewer Ready pods than they
    /// want, each with a short reason.
    async fn unavailable(&self, owners: &[String]) -> Result<Vec<String>, ClusterError>;
    /// Nodes (of those given) where the CNI's own pod is not Ready.
    async fn cni_not_ready(&self, cni: Cni, nodes: &[String]) -> Result<Vec<String>, ClusterError>;
    /// Switch the target on; returns the objects created (deleted again on rollback).
    async fn switch_to_target(&self, spec: &MigrationSpec) -> Result<Vec<ObjectRef>, ClusterError>;
    /// Remove the old CNI's objects.
    async fn remove_old(&self, spec: &MigrationSpec) -> Result<(), ClusterError>;
    /// Bring the old CNI back (re-installing it if `old_removed`) and remove the target.
    async fn switch_back(&self, spec: &MigrationSpec, applied: &[ObjectRef], old_removed: bool) -> Result<(), ClusterError>;
    async fn kube_proxy_mode(&self) -> Result<String, ClusterError>;
    /// Set kube-proxy's mode and restart its pods.
    async fn set_kube_proxy_mode(&self, mode: &str) -> Result<(), ClusterError>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the plan breaks rules, nothing was changed: {}", refusals(.0))]
    Refused(Vec<Refusal>),
    #[error("a migration to {to} is in phase {phase}: run `allot migrate status`, resume it with the same --to, or `allot migrate rollback`")]
    InProgress { to: String, phase: Phase },
    #[error("no migration found: start one with `allot migrate apply --to TYPE[:VERSION]`")]
    NoMigration,
    #[error("the migration was rolled back (phase {0}): finish it with `allot migrate rollback`, then start a new one with `allot migrate apply`")]
    RolledBack(Phase),
    #[error("{0}")]
    Invalid(String),
    #[error("stopped in phase {phase}: {message}; every node this run cordoned is schedulable again. Fix the cause and run `allot migrate apply` again to retry, or `allot migrate rollback`")]
    Failed { phase: Phase, message: String },
    #[error("rollback stopped: {0}; every node it cordoned is schedulable again. Fix the cause and run `allot migrate rollback` again")]
    RollbackFailed(String),
    /// The API stayed away longer than the run waits: the run stopped without finishing the
    /// step; nodes it had cordoned were uncordoned if the API came back in time.
    #[error("{}", stranded(.message, .cordoned, .command))]
    Unreachable { message: String, cordoned: Vec<String>, command: &'static str },
    #[error(transparent)]
    Cluster(ClusterError),
}

fn stranded(message: &str, cordoned: &[String], command: &str) -> String {
    if cordoned.is_empty() {
        format!("stopped: {message}; every node this run cordoned is schedulable again. Run `{command}` again once the API answers: it resumes where it stopped")
    } else {
        format!(
            "stopped: {message}; nodes {} may still be cordoned (the API did not answer the uncordon). Run `{command}` again once the API answers: it resumes and uncordons them; or `kubectl uncordon {}`",
            cordoned.join(", "),
            cordoned.join(" ")
        )
    }
}

fn refusals(r: &[Refusal]) -> String {
    r.iter().map(|r| format!("{}: {}", r.rule, r.message)).collect::<Vec<_>>().join("; ")
}

/// The pods' UIDs recorded in the status, by role (see [`NodeStatus`]).
#[derive(Default)]
struct Known {
    old: HashSet<String>,
    early: HashSet<String>,
    back: HashSet<String>,
}

/// Why a step stopped.
enum Stop {
    /// The step failed: recorded, nodes uncordoned, run ends.
    Fail(String),
    /// Nothing can be recorded (API gone for too long, interrupted).
    Abort(ClusterError),
}

impl From<ClusterError> for Stop {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Failed(m) => Stop::Fail(m),
            e => Stop::Abort(e),
        }
    }
}

/// Knobs of the run itself (not persisted).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How long an unavailable API is retried before the run gives up (and can be resumed).
    pub api_timeout: Duration,
    /// How often readiness is polled.
    pub poll: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { api_timeout: Duration::from_secs(120), poll: Duration::from_secs(2) }
    }
}

/// What the run reports as it goes: the status after the step, and a line saying what happened.
pub type Progress<'a> = Box<dyn FnMut(&MigrationStatus, &str) + 'a>;

/// Retry a call while the API is unavailable, up to `api_timeout`.
macro_rules! call {
    ($self:ident, $e:expr) => {{
        let deadline = $self.c.now() + $self.run.api_timeout;
        let mut wait = Duration::from_millis(500);
        loop {
            match $e.await {
                Err(ClusterError::Unavailable(_)) if $self.c.now() < deadline => {
                    $self.c.sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                r => break r,
            }
        }
    }};
}

pub struct Orchestrator<'a, C: Cluster> {
    c: &'a C,
    run: RunOptions,
    spec: MigrationSpec,
    st: MigrationStatus,
    cidrs: Vec<IpNet>,
    progress: Progress<'a>,
}

/// The status a new migration starts with: the plan's nodes and batches, all Pending.
pub fn initial_status(plan: &Plan) -> MigrationStatus {
    MigrationStatus {
        nodes: plan.nodes.iter().map(|n| NodeStatus { name: n.name.clone(), batch: n.batch, ..Default::default() }).collect(),
        ..Default::default()
    }
}

fn parse_cidrs(spec: &MigrationSpec) -> Result<Vec<IpNet>, Error> {
    if spec.new_pod_cidrs.is_empty() {
        return Err(Error::Invalid(
            "no pod CIDR of the new CNI given: pass --new-pod-cidr CIDR (the target's pod CIDR, or allot's pool CIDRs) so each node can be verified".into(),
        ));
    }
    spec.new_pod_cidrs
        .iter()
        .map(|c| c.parse::<IpNet>().map_err(|e| Error::Invalid(format!("--new-pod-cidr {c:?} is not a CIDR ({e}): write it like 10.244.0.0/16"))))
        .collect()
}

impl<'a, C: Cluster> Orchestrator<'a, C> {
    /// Start the migration `spec` following `plan`, or resume the one in the cluster if it is
    /// the same migration. Nothing is changed when the plan has refusals.
    pub async fn begin(c: &'a C, spec: MigrationSpec, plan: &Plan, run: RunOptions, progress: Progress<'a>) -> Result<Self, Error> {
        let cidrs = parse_cidrs(&spec)?;
        if spec.batch == 0 {
            return Err(Error::Invalid("--batch must be at least 1".into()));
        }
        let mut o = Orchestrator { c, run, spec, st: MigrationStatus::default(), cidrs, progress };
        match call!(o, o.c.load()).map_err(Error::Cluster)? {
            Some((spec, st)) if !matches!(st.phase, Phase::Done | Phase::RolledBack) => {
                if spec.to != o.spec.to {
                    return Err(Error::InProgress { to: spec.to, phase: st.phase });
                }
                // A resumed run goes on with what it was started with.
                o.cidrs = parse_cidrs(&spec)?;
                o.spec = spec;
                o.st = st;
                (o.progress)(&o.st, &format!("resuming the migration to {} in phase {}", o.spec.to, o.st.phase));
            }
            _ => {
                if !plan.refusals.is_empty() {
                    return Err(Error::Refused(plan.refusals.clone()));
                }
                if plan.nodes.is_empty() {
                    return Err(Error::Invalid("the plan has no nodes: is the cluster empty?".into()));
                }
                o.st = initial_status(plan);
                call!(o, o.c.create(&o.spec, &o.st)).map_err(Error::Cluster)?;
                (o.progress)(&o.st, &format!("migration {} -> {} started: {} nodes", o.spec.from, o.spec.to, o.st.nodes.len()));
            }
        }
        Ok(o)
    }

    /// The migration in the cluster, for `rollback`.
    pub async fn resume(c: &'a C, run: RunOptions, progress: Progress<'a>) -> Result<Self, Error> {
        let mut o = Orchestrator { c, run, spec: MigrationSpec::default(), st: MigrationStatus::default(), cidrs: vec![], progress };
        let (spec, st) = call!(o, o.c.load()).map_err(Error::Cluster)?.ok_or(Error::NoMigration)?;
        o.cidrs = parse_cidrs(&spec)?;
        o.spec = spec;
        o.st = st;
        Ok(o)
    }

    pub fn status(&self) -> &MigrationStatus {
        &self.st
    }

    pub fn spec(&self) -> &MigrationSpec {
        &self.spec
    }

    /// Carry the migration out to `Done` (or to `Failed`, nodes schedulable).
    pub async fn apply(&mut self) -> Result<(), Error> {
        match self.st.phase {
            Phase::RollingBack | Phase::RolledBack => return Err(Error::RolledBack(self.st.phase)),
            Phase::Failed => {
                self.st.phase = self.st.failed_in.take().unwrap_or(Phase::Preflight);
                self.st.message = None;
                self.reset_failed_nodes();
                self.save().await.map_err(|e| self.saving_failed(e))?;
                self.report(format!("retrying from phase {}", self.st.phase));
            }
            _ => {}
        }
        loop {
            match self.step_forward().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(Stop::Abort(e)) => return Err(self.abort(e).await),
                Err(Stop::Fail(m)) => return Err(self.fail(m).await),
            }
        }
    }

    /// Go back to the old CNI from whatever phase the migration is in.
    pub async fn rollback(&mut self) -> Result<(), Error> {
        if self.st.phase == Phase::RolledBack {
            self.report("already rolled back".into());
            return Ok(());
        }
        if self.st.phase != Phase::RollingBack {
            self.st.phase = Phase::RollingBack;
            self.st.failed_in = None;
            self.st.message = None;
            self.st.rollback_step = Some(Phase::KubeProxy);
            self.save().await.map_err(|e| self.saving_failed(e))?;
            self.report("rolling back to the old CNI".into());
        }
        self.reset_failed_nodes();
        loop {
            match self.step_back().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(Stop::Abort(e)) => return Err(self.abort(e).await),
                Err(Stop::Fail(m)) => return Err(self.fail(m).await),
            }
        }
    }

    fn reset_failed_nodes(&mut self) {
        for n in &mut self.st.nodes {
            if n.phase == NodePhase::Failed {
                n.phase = NodePhase::Pending;
                n.message = None;
            }
        }
    }

    fn report(&mut self, line: String) {
        (self.progress)(&self.st, &line);
    }

    async fn save(&mut self) -> Result<(), ClusterError> {
        call!(self, self.c.save(&self.st))
    }

    fn pod_timeout(&self) -> Duration {
        Duration::from_secs(self.spec.pod_timeout_seconds.max(1))
    }

    /// Record the failure, then make every node this migration cordoned schedulable again.
    async fn fail(&mut self, message: String) -> Error {
        let back = self.st.phase == Phase::RollingBack;
        if !back {
            self.st.failed_in = Some(self.st.phase);
            self.st.phase = Phase::Failed;
        }
        self.st.message = Some(message.clone());
        for n in &mut self.st.nodes {
            if matches!(n.phase, NodePhase::Cordoned | NodePhase::Draining | NodePhase::Verifying) {
                n.phase = NodePhase::Failed;
                n.message = Some(message.clone());
            }
        }
        if let Err(e) = self.save().await {
            return self.unreachable(e);
        }
        if let Err(e) = self.uncordon_all().await {
            return self.unreachable(e);
        }
        self.report(format!("stopped: {message}"));
        if back { Error::RollbackFailed(message) } else { Error::Failed { phase: self.st.failed_in.unwrap_or(Phase::Preflight), message } }
    }

    /// The API stayed away past `api_timeout`: make the nodes of the batch in progress Pending
    /// again (the resumed run cordons them anew), then uncordon, as far as the API lets us.
    /// An interruption stops at once: the same command resumes.
    async fn abort(&mut self, e: ClusterError) -> Error {
        if !matches!(e, ClusterError::Unavailable(_)) {
            return Error::Cluster(e);
        }
        for n in &mut self.st.nodes {
            if matches!(n.phase, NodePhase::Cordoned | NodePhase::Draining | NodePhase::Verifying) {
                n.phase = NodePhase::Pending;
            }
        }
        if let Err(e2) = self.save().await {
            return self.unreachable(e2);
        }
        if let Err(e2) = self.uncordon_all().await {
            return self.unreachable(e2);
        }
        let err = self.unreachable(e);
        self.report(err.to_string());
        err
    }

    /// A save before any step: an API gone away says how to go on, another answer is as it is.
    fn saving_failed(&self, e: ClusterError) -> Error {
        if matches!(e, ClusterError::Unavailable(_)) { self.unreachable(e) } else { Error::Cluster(e) }
    }

    /// The error for an API gone away, naming the nodes that may still be cordoned.
    fn unreachable(&self, e: ClusterError) -> Error {
        if matches!(e, ClusterError::Interrupted) {
            return Error::Cluster(e);
        }
        let back = self.st.phase == Phase::RollingBack;
        Error::Unreachable {
            message: e.to_string(),
            cordoned: self.st.nodes.iter().filter(|n| n.cordoned).map(|n| n.name.clone()).collect(),
            command: if back { "allot migrate rollback" } else { "allot migrate apply" },
        }
    }

    /// Uncordon every node this migration cordoned.
    async fn uncordon_all(&mut self) -> Result<(), ClusterError> {
        for i in 0..self.st.nodes.len() {
            if self.st.nodes[i].cordoned {
                let name = self.st.nodes[i].name.clone();
                call!(self, self.c.set_unschedulable(&name, false))?;
                self.st.nodes[i].cordoned = false;
                self.save().await?;
            }
        }
        Ok(())
    }

    fn node_names(&self) -> Vec<String> {
        self.st.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Wait until the CNI's pods are Ready on every node.
    async fn wait_cni(&mut self, cni: Cni) -> Result<(), Stop> {
        let nodes = self.node_names();
        let deadline = self.c.now() + self.pod_timeout();
        loop {
            let missing = call!(self, self.c.cni_not_ready(cni, &nodes))?;
            if missing.is_empty() {
                return Ok(());
            }
            if self.c.now() >= deadline {
                let which = if cni == Cni::Target { &self.spec.to } else { &self.spec.from };
                return Err(Stop::Fail(format!(
                    "{which} pods not Ready after {:?} on {}: check them with `kubectl get pods -A -o wide`",
                    self.pod_timeout(),
                    missing.join(", ")
                )));
            }
            self.c.sleep(self.run.poll).await;
        }
    }

    /// Record the UIDs of the pods running now on each node (the old CNI's), and whether their
    /// addresses already lie in the new pod CIDRs.
    async fn record_old(&mut self) -> Result<(), Stop> {
        let mut shared = false;
        for i in 0..self.st.nodes.len() {
            let name = self.st.nodes[i].name.clone();
            let pods: Vec<PodInfo> = call!(self, self.c.pods_on(&name))?.into_iter().filter(Self::counted).collect();
            shared |= pods.iter().any(|p| self.in_new_cidr(p));
            // A pod without an address yet may get it from either CNI: restarted like the
            // pods started while the target comes up, and judged by its address on rollback.
            let (old, early): (Vec<PodInfo>, Vec<PodInfo>) = pods.into_iter().partition(|p| !p.ips.is_empty());
            self.st.nodes[i].old_pods = old.into_iter().map(|p| p.uid).collect();
            self.st.nodes[i].early_pods = early.into_iter().map(|p| p.uid).collect();
        }
        self.st.shared_range = shared;
        Ok(())
    }

    /// The UIDs recorded so far, to judge pods by.
    fn known(&self) -> Known {
        let mut k = Known::default();
        for n in &self.st.nodes {
            k.old.extend(n.old_pods.iter().cloned());
            k.early.extend(n.early_pods.iter().cloned());
            k.back.extend(n.back_pods.iter().cloned());
        }
        k
    }

    fn in_new_cidr(&self, pod: &PodInfo) -> bool {
        pod.ips.iter().any(|ip| self.cidrs.iter().any(|c| c.contains(ip)))
    }

    /// The pod runs on the CNI the run moves to (`back`: the old one). Judged by identity: on
    /// the new CNI means started after the switch (and the target was up); back on the old
    /// one means never restarted since the switch, or started after the rollback switched
    /// back. The address is checked too unless the old CNI's pods were already in the range.
    fn on_wanted(&self, pod: &PodInfo, back: bool, k: &Known) -> bool {
        let new = self.st.shared_range || self.in_new_cidr(pod);
        if back {
            k.old.contains(&pod.uid) || (!k.back.contains(&pod.uid) && !pod.ips.is_empty() && (self.st.shared_range || !new))
        } else {
            !k.old.contains(&pod.uid) && !k.early.contains(&pod.uid) && new
        }
    }

    /// A pod recorded as one to move (old or early; rollback: started since the switch): it
    /// is restarted even before it has an address.
    fn to_move(pod: &PodInfo, back: bool, k: &Known) -> bool {
        if back { k.back.contains(&pod.uid) } else { k.old.contains(&pod.uid) || k.early.contains(&pod.uid) }
    }

    fn is_bare(pod: &PodInfo) -> bool {
        pod.owner.is_none()
    }

    /// Pods the migration restarts and verifies: running with the pod network, not mirrors.
    fn counted(pod: &PodInfo) -> bool {
        !pod.host_network && !pod.mirror && !pod.finished
    }

    async fn step_forward(&mut self) -> Result<bool, Stop> {
        match self.st.phase {
            Phase::Preflight => {
                // Every node Ready before anything changes: a NotReady node could not be
                // verified and would leave the run half done.
                let deadline = self.c.now() + self.pod_timeout();
                for name in self.node_names() {
                    loop {
                        let info = call!(self, self.c.node(&name))?;
                        if info.ready {
                            break;
                        }
                        if self.c.now() >= deadline {
                            return Err(Stop::Fail(format!("preflight: node {name} is NotReady: bring it back or remove it from the cluster first")));
                        }
                        self.c.sleep(self.run.poll).await;
                    }
                }
                self.st.phase = Phase::Switching;
                self.save().await?;
                self.report("preflight passed: every node Ready".into());
            }
            Phase::Switching => {
                if !self.st.switched {
                    // Recorded with the switch: the pods running now are on the old CNI, whatever
                    // their addresses say (KKP keeps the pods CIDR, so both CNIs share it).
                    self.record_old().await?;
                    self.st.switched = true;
                    self.save().await?;
                    if self.st.shared_range {
                        self.report(format!(
                            "pods on {} already have addresses in --new-pod-cidr: the range is shared, each pod is judged by whether it was started after the switch",
                            self.spec.from
                        ));
                    }
                }
                let applied = call!(self, self.c.switch_to_target(&self.spec))?;
                if !applied.is_empty() {
                    let mut all = std::mem::take(&mut self.st.applied);
                    all.extend(applied);
                    all.sort();
                    all.dedup();
                    self.st.applied = all;
                    self.save().await?;
                }
                self.report(format!("switched to {}: waiting for its pods on every node", self.spec.to));
                self.wait_cni(Cni::Target).await?;
                // Pods started while the target came up may have either CNI: restart them too.
                let old = self.known().old;
                for i in 0..self.st.nodes.len() {
                    let name = self.st.nodes[i].name.clone();
                    let pods = call!(self, self.c.pods_on(&name))?;
                    self.st.nodes[i].early_pods = pods.into_iter().filter(|p| Self::counted(p) && !old.contains(&p.uid)).map(|p| p.uid).collect();
                }
                self.st.phase = Phase::Nodes;
                self.save().await?;
                self.report(format!("{} Ready on every node", self.spec.to));
            }
            Phase::Nodes => {
                if self.step_nodes(false).await? {
                    self.st.phase = Phase::RemovingOld;
                    self.save().await?;
                }
            }
            Phase::RemovingOld => {
                // Recorded first: a rollback after a crash here re-installs the old CNI.
                if !self.st.old_removed {
                    self.st.old_removed = true;
                    self.save().await?;
                }
                call!(self, self.c.remove_old(&self.spec))?;
                self.st.phase = if self.spec.kube_proxy_mode.is_some() { Phase::KubeProxy } else { Phase::Done };
                if self.st.phase == Phase::Done {
                    self.count(false).await?;
                }
                self.save().await?;
                self.report(format!("removed {}", self.spec.from));
            }
            Phase::KubeProxy => {
                let mode = self.spec.kube_proxy_mode.clone().unwrap_or_default();
                if self.st.kube_proxy_was.is_none() {
                    self.st.kube_proxy_was = Some(call!(self, self.c.kube_proxy_mode())?);
                    self.save().await?;
                }
                call!(self, self.c.set_kube_proxy_mode(&mode))?;
                self.st.phase = Phase::Done;
                self.count(false).await?;
                self.save().await?;
                self.report(format!("kube-proxy mode {mode}, kube-proxy restarted"));
            }
            Phase::Done => {
                self.count(false).await?;
                let line = self.st.message.clone().unwrap_or_default();
                self.report(line);
                return Ok(true);
            }
            Phase::Failed | Phase::RollingBack | Phase::RolledBack => return Ok(true),
        }
        Ok(false)
    }

    async fn step_back(&mut self) -> Result<bool, Stop> {
        match self.st.rollback_step.unwrap_or(Phase::KubeProxy) {
            Phase::KubeProxy => {
                if let Some(mode) = self.st.kube_proxy_was.clone() {
                    call!(self, self.c.set_kube_proxy_mode(&mode))?;
                    self.report(format!("kube-proxy mode back to {mode}"));
                }
                self.st.rollback_step = Some(Phase::Switching);
                self.save().await?;
            }
            Phase::Switching => {
                if self.st.switched {
                    let applied = self.st.applied.clone();
                    call!(self, self.c.switch_back(&self.spec, &applied, self.st.old_removed))?;
                    self.report(format!("switched back to {}: waiting for its pods on every node", self.spec.from));
                    self.wait_cni(Cni::Old).await?;
                }
                // Every node with a pod started since the switch (it may be on the new CNI), or
                // touched by the run, is restarted; pods started from now on get the old CNI.
                let old = self.known().old;
                for i in 0..self.st.nodes.len() {
                    let name = self.st.nodes[i].name.clone();
                    let touched = self.st.nodes[i].phase != NodePhase::Pending;
                    let back_pods: Vec<String> = if self.st.switched {
                        let pods = call!(self, self.c.pods_on(&name))?;
                        pods.into_iter().filter(|p| Self::counted(p) && !old.contains(&p.uid)).map(|p| p.uid).collect()
                    } else {
                        vec![]
                    };
                    let n = &mut self.st.nodes[i];
                    n.revert = touched || !back_pods.is_empty();
                    n.back_pods = back_pods;
                    if n.revert {
                        n.phase = NodePhase::Pending;
                        n.restarted = 0;
                    }
                }
                self.st.rollback_step = Some(Phase::Nodes);
                self.save().await?;
            }
            _ => {
                if self.step_nodes(true).await? {
                    self.count(true).await?;
                    self.st.phase = Phase::RolledBack;
                    self.st.rollback_step = None;
                    self.save().await?;
                    let line = self.st.message.clone().unwrap_or_default();
                    self.report(line);
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Count pods on the wanted CNI across the cluster and put the result in the message.
    /// Waits (up to the pod timeout) for pods still starting, so the figure is the settled one.
    async fn count(&mut self, back: bool) -> Result<(), Stop> {
        let deadline = self.c.now() + self.pod_timeout();
        let k = self.known();
        let (on, total) = loop {
            let (mut on, mut total, mut starting) = (0, 0, false);
            for name in self.node_names() {
                for p in call!(self, self.c.pods_on(&name))? {
                    if Self::counted(&p) {
                        total += 1;
                        if self.on_wanted(&p, back, &k) {
                            on += 1;
                        }
                        starting |= !p.ready;
                    }
                }
            }
            if !starting || self.c.now() >= deadline {
                break (on, total);
            }
            self.c.sleep(self.run.poll).await;
        };
        self.st.pods_on_new = if back { total - on } else { on };
        self.st.pods_total = total;
        let kept: u32 = self.st.nodes.iter().map(|n| n.kept).sum();
        let which = if back { "old" } else { "new" };
        let mut msg = format!("{on}/{total} pods on the {which} CNI");
        if !back && kept > 0 && on < total {
            msg.push_str(&format!(" ({kept} bare pods kept on the old CNI: re-create them, or run again with --force-bare)"));
        }
        self.st.message = Some(msg);
        Ok(())
    }

    /// One step of the node rollout: the batch in progress walks Pending → Cordoned → Draining
    /// → Verifying → Done (rollback: → RolledBack, reverse order). Returns true when every
    /// node is through.
    async fn step_nodes(&mut self, back: bool) -> Result<bool, Stop> {
        let end = if back { NodePhase::RolledBack } else { NodePhase::Done };
        let mut order: Vec<usize> = (0..self.st.nodes.len()).filter(|&i| !back || self.st.nodes[i].revert).collect();
        if back {
            order.reverse();
        }
        let Some(&first) = order.iter().find(|&&i| self.st.nodes[i].phase != end) else {
            return Ok(true);
        };
        let batch = self.st.nodes[first].batch;
        let idx: Vec<usize> = order.into_iter().filter(|&i| self.st.nodes[i].batch == batch && self.st.nodes[i].phase != end).collect();
        let rank = |p: NodePhase| match p {
            NodePhase::Pending | NodePhase::Failed => 0,
            NodePhase::Cordoned => 1,
            NodePhase::Draining => 2,
            NodePhase::Verifying => 3,
            NodePhase::Done | NodePhase::RolledBack => 4,
        };
        let phase = idx.iter().map(|&i| self.st.nodes[i].phase).min_by_key(|&p| rank(p)).unwrap_or(NodePhase::Pending);
        let names: Vec<String> = idx.iter().map(|&i| self.st.nodes[i].name.clone()).collect();
        match rank(phase) {
            0 => {
                let deadline = self.c.now() + self.pod_timeout();
                for &i in &idx {
                    let name = self.st.nodes[i].name.clone();
                    let info = loop {
                        let info = call!(self, self.c.node(&name))?;
                        if info.ready {
                            break info;
                        }
                        if self.c.now() >= deadline {
                            return Err(Stop::Fail(format!("node {name} is NotReady: its pods cannot be restarted and verified")));
                        }
                        self.c.sleep(self.run.poll).await;
                    };
                    // Recorded before the cordon: whatever happens next, it is undone.
                    let n = &mut self.st.nodes[i];
                    n.cordoned = n.cordoned || !info.unschedulable;
                    n.phase = NodePhase::Cordoned;
                }
                self.save().await?;
                for &i in &idx {
                    if self.st.nodes[i].cordoned {
                        let name = self.st.nodes[i].name.clone();
                        call!(self, self.c.set_unschedulable(&name, true))?;
                    }
                }
                self.report(format!("batch {batch}: cordoned {}", names.join(", ")));
            }
            1 => {
                for &i in &idx {
                    if self.st.nodes[i].cordoned {
                        let name = self.st.nodes[i].name.clone();
                        call!(self, self.c.set_unschedulable(&name, true))?;
                    }
                    self.st.nodes[i].phase = NodePhase::Draining;
                }
                self.save().await?;
            }
            2 => {
                for &i in &idx {
                    self.restart_pods(i, back).await?;
                }
                for &i in &idx {
                    self.st.nodes[i].phase = NodePhase::Verifying;
                }
                self.save().await?;
                self.report(format!("batch {batch}: pods restarted on {}, verifying", names.join(", ")));
            }
            3 => {
                self.verify(&idx, back).await?;
                // Uncordon before recording the end: a crash in between repeats the (harmless)
                // verification and uncordon instead of leaving the node cordoned.
                for &i in &idx {
                    if self.st.nodes[i].cordoned {
                        let name = self.st.nodes[i].name.clone();
                        call!(self, self.c.set_unschedulable(&name, false))?;
                    }
                }
                for &i in &idx {
                    let n = &mut self.st.nodes[i];
                    n.cordoned = false;
                    n.phase = end;
                    n.owners.clear();
                }
                self.save().await?;
                let which = if back { "old" } else { "new" };
                self.report(format!("batch {batch}: {} on the {which} CNI, uncordoned", names.join(", ")));
            }
            _ => {}
        }
        Ok(false)
    }

    /// Restart the node's pods that are not on the wanted CNI yet, as the plan's rules say.
    async fn restart_pods(&mut self, i: usize, back: bool) -> Result<(), Stop> {
        self.finish_recreate().await?;
        let node = self.st.nodes[i].name.clone();
        let pods = call!(self, self.c.pods_on(&node))?;
        let k = self.known();
        let mut kept = 0;
        for pod in pods {
            // A pod without an address yet is left to start, unless it is one recorded to move.
            if !Self::counted(&pod) || (pod.ips.is_empty() && !Self::to_move(&pod, back, &k)) || self.on_wanted(&pod, back, &k) {
                continue;
            }
            let (ns, name) = (pod.namespace.as_str(), pod.name.as_str());
            if let Some((kind, owner)) = &pod.owner {
                let key = format!("{kind} {ns}/{owner}");
                if !self.st.nodes[i].owners.contains(&key) {
                    self.st.nodes[i].owners.push(key);
                }
            }
            match &pod.owner {
                Some((kind, _)) if kind == "DaemonSet" => {
                    call!(self, self.c.delete_pod(ns, name))?;
                }
                Some(_) => self.evict(ns, name).await?,
                None if self.spec.force_bare => {
                    let Some((manifest, uid)) = call!(self, self.c.pod_manifest(ns, name))? else { continue };
                    self.st.recreating = Some(PendingRecreate { namespace: ns.into(), name: name.into(), uid, manifest });
                    self.save().await?;
                    self.finish_recreate().await?;
                }
                None => {
                    kept += 1;
                    continue;
                }
            }
            self.st.nodes[i].restarted += 1;
            self.save().await?;
        }
        self.st.nodes[i].kept = kept;
        Ok(())
    }

    /// Evict, retrying 429 (PodDisruptionBudget) with backoff up to the pod timeout.
    async fn evict(&mut self, ns: &str, name: &str) -> Result<(), Stop> {
        let deadline = self.c.now() + self.pod_timeout();
        let mut wait = Duration::from_secs(1);
        loop {
            match call!(self, self.c.evict(ns, name))? {
                Eviction::Evicted | Eviction::Gone => return Ok(()),
                Eviction::Blocked if self.c.now() < deadline => {
                    self.c.sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Eviction::Blocked => {
                    return Err(Stop::Fail(format!(
                        "evicting {ns}/{name}: its PodDisruptionBudget allowed no disruption for {:?}: scale the workload up or relax the budget",
                        self.pod_timeout()
                    )));
                }
            }
        }
    }

    /// Carry a recorded re-creation through: delete the old pod, wait until it is gone, create it
    /// from the recorded manifest.
    async fn finish_recreate(&mut self) -> Result<(), Stop> {
        let Some(r) = self.st.recreating.clone() else { return Ok(()) };
        let deadline = self.c.now() + self.pod_timeout();
        loop {
            match call!(self, self.c.pod_manifest(&r.namespace, &r.name))? {
                Some((_, uid)) if uid != r.uid => break, // re-created already
                Some(_) => call!(self, self.c.delete_pod(&r.namespace, &r.name))?,
                None => {
                    if call!(self, self.c.create_pod(&r.manifest))? {
                        break;
                    }
                }
            }
            if self.c.now() >= deadline {
                return Err(Stop::Fail(format!(
                    "re-creating bare pod {}/{}: the old pod did not go away within {:?}; its manifest is kept in the Migration status",
                    r.namespace,
                    r.name,
                    self.pod_timeout()
                )));
            }
            self.c.sleep(self.run.poll).await;
        }
        self.st.recreating = None;
        self.save().await?;
        Ok(())
    }

    /// Wait until every restarted pod on the batch's nodes is Ready on the wanted CNI.
    async fn verify(&mut self, idx: &[usize], back: bool) -> Result<(), Stop> {
        let deadline = self.c.now() + self.pod_timeout();
        let k = self.known();
        loop {
            let mut bad = Vec::new();
            for &i in idx {
                let node = self.st.nodes[i].name.clone();
                for p in call!(self, self.c.pods_on(&node))? {
                    if !Self::counted(&p) || (Self::is_bare(&p) && !self.spec.force_bare) {
                        continue;
                    }
                    if !p.ready {
                        bad.push(format!("{}/{} on {node} (not Ready)", p.namespace, p.name));
                    } else if !self.on_wanted(&p, back, &k) {
                        let ips: Vec<String> = p.ips.iter().map(|ip| ip.to_string()).collect();
                        bad.push(format!("{}/{} on {node} ({}, {} CNI)", p.namespace, p.name, ips.join(" "), if back { "new" } else { "old" }));
                    }
                }
            }
            if bad.is_empty() {
                // Evicted pods come back elsewhere, deleted DaemonSet pods here: every
                // controller touched must be whole again.
                let owners: Vec<String> = idx.iter().flat_map(|&i| self.st.nodes[i].owners.clone()).collect();
                bad = call!(self, self.c.unavailable(&owners))?;
            }
            if bad.is_empty() {
                return Ok(());
            }
            if self.c.now() >= deadline {
                return Err(Stop::Fail(format!("pods not Ready on the {} CNI after {:?}: {}", if back { "old" } else { "new" }, self.pod_timeout(), bad.join(", "))));
            }
            self.c.sleep(self.run.poll).await;
        }
    }
}
