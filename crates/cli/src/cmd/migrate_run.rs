//! `allot migrate apply`, `status` and `rollback`: carry a migration plan out on a live cluster
//! (state in the cluster-scoped `Migration` object, so a killed run resumes), show where it
//! stands, go back to the old CNI. The work is `allot_migrate::orchestrate` over
//! `allot_migrate::kube_cluster`; this file parses flags and draws progress.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};

use allot_k8s::migration::{MIGRATION_NAME, Migration, MigrationSpec, MigrationStatus, Switch};
use allot_migrate::kube_cluster::{CniDaemonSets, KubeCluster, Switcher, parse_manifests};
use allot_migrate::orchestrate::{Orchestrator, RunOptions};
use allot_migrate::plan::Plan;
use anyhow::Context;

use super::migrate::{PlanFlags, load_snapshot, make_plan};
use crate::output::{Format, Table, render};

/// How the target is switched on and the CNIs are recognised; shared by apply and rollback.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SwitchArgs {
    /// The target's manifests (multi-document YAML), applied server-side to switch it on
    /// (instead of --kkp-cluster).
    #[arg(long, value_name = "PATH")]
    pub install: Option<PathBuf>,
    /// The old CNI's manifests: deleted when it is removed (default: its well-known DaemonSet and
    /// Deployment), applied again by a rollback after that.
    #[arg(long, value_name = "PATH")]
    pub old_manifests: Option<PathBuf>,
    /// The DaemonSet whose pods show the target Ready on a node, when its type is not a known one.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub target_daemonset: Option<String>,
    /// The same for the old CNI.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub old_daemonset: Option<String>,
}

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The plan's flags: apply follows the plan `allot migrate plan` prints for them.
    #[command(flatten)]
    pub plan: PlanFlags,
    #[command(flatten)]
    pub switch: SwitchArgs,
    /// How long one eviction may be refused (PodDisruptionBudget, retried with backoff) and a
    /// node's pods may take to come back Ready (e.g. 5m, 90s).
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub pod_timeout: String,
    /// The new CNI's pod CIDR (or allot's pool CIDRs): a pod is on the new CNI when its address
    /// is in one. Repeat for several.
    #[arg(long = "new-pod-cidr", value_name = "CIDR", required = true)]
    pub new_pod_cidrs: Vec<String>,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The user cluster's kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(clap::Args)]
pub struct RollbackArgs {
    /// The user cluster's kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// KKP: the seed cluster's kubeconfig (the `Cluster` object is the one the migration
    /// recorded).
    #[arg(long, value_name = "FILE")]
    pub seed_kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub switch: SwitchArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// `allot migrate apply`: the plan first (with its refusals), then the run.
pub fn exec_apply(a: ApplyArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.plan.snapshot.is_empty(), "--snapshot plans offline; apply works on the live cluster: drop --snapshot");
    let pod_timeout = crate::cmd::agent::parse_duration(&a.pod_timeout)?;
    anyhow::ensure!(pod_timeout.as_secs() >= 1, "--pod-timeout must be at least 1s");
    anyhow::ensure!(a.plan.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(
        !(a.switch.install.is_some() && a.plan.kkp_cluster.is_some()),
        "--install and --kkp-cluster both switch the CNI: give one (KKP deploys the CNI its Cluster names)"
    );
    anyhow::ensure!(
        a.switch.install.is_some() || a.plan.kkp_cluster.is_some(),
        "say how the target is switched on: --install PATH (its manifests) or --kkp-cluster NAME --seed-kubeconfig FILE"
    );
    // Read before anything is planned: a bad file changes nothing.
    if let Some(p) = &a.switch.install {
        read_manifests(p)?;
    }
    let snap = load_snapshot(&a.plan)?;
    let (plan, _notes) = make_plan(&snap, &a.plan)?;
    runtime()?.block_on(apply(a, plan, pod_timeout))
}

pub fn exec_status(a: StatusArgs) -> anyhow::Result<()> {
    runtime()?.block_on(status(a))
}

pub fn exec_rollback(a: RollbackArgs) -> anyhow::Result<()> {
    runtime()?.block_on(rollback(a))
}

fn read_manifests(path: &Path) -> anyhow::Result<Vec<kube::api::DynamicObject>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_manifests(&text, &path.display().to_string()).map_err(anyhow::Error::msg)
}

fn daemonset_flag(flag: &str, v: &str) -> anyhow::Result<(String, String)> {
    let (ns, name) = v.split_once('/').filter(|(a, b)| !a.is_empty() && !b.is_empty()).with_context(|| format!("{flag} {v:?}: write it as NAMESPACE/NAME, e.g. kube-system/cilium"))?;
    Ok((ns.into(), name.into()))
}

/// The cluster behind the trait, from the flags (and, on rollback, what the spec recorded).
async fn kube_cluster(kubeconfig: Option<&Path>, seed_kubeconfig: Option<&Path>, args: &SwitchArgs, spec: &MigrationSpec) -> anyhow::Result<KubeCluster> {
    let client = allot_k8s::client(kubeconfig).await.context("connecting to the cluster")?;
    let switcher = match spec.switch.kkp_cluster.clone() {
        Some(cluster) => {
            let seed = seed_kubeconfig.with_context(|| format!("the migration switches KKP Cluster {cluster}: pass --seed-kubeconfig FILE"))?;
            Switcher::Kkp { seed: allot_k8s::client(Some(seed)).await.context("connecting to the seed cluster")?, cluster }
        }
        None => {
            let path = args.install.clone().or_else(|| spec.switch.install.as_ref().map(PathBuf::from));
            let path = path.context("say how the target is switched on: --install PATH (its manifests) or --kkp-cluster NAME --seed-kubeconfig FILE")?;
            Switcher::Manifests(read_manifests(&path)?)
        }
    };
    let old = match &args.old_manifests {
        Some(p) => read_manifests(p)?,
        None => vec![],
    };
    // Both named by flags: the CNI types need not be known ones.
    let mut ds = match CniDaemonSets::of(&spec.from, &spec.to) {
        Ok(ds) => ds,
        Err(_) if args.old_daemonset.is_some() && args.target_daemonset.is_some() => CniDaemonSets { old: Default::default(), target: Default::default() },
        Err(e) => anyhow::bail!(e),
    };
    if let Some(v) = &args.old_daemonset {
        ds.old = daemonset_flag("--old-daemonset", v)?;
    }
    if let Some(v) = &args.target_daemonset {
        ds.target = daemonset_flag("--target-daemonset", v)?;
    }
    // KKP: kube-proxy's ConfigMap may take minutes to show a new mode; wait up to the pod timeout.
    let wait = std::time::Duration::from_secs(spec.pod_timeout_seconds.max(1));
    Ok(KubeCluster::new(client, switcher, old, ds).with_proxy_wait(wait, std::time::Duration::from_secs(2)))
}

async fn apply(a: ApplyArgs, plan: Plan, pod_timeout: std::time::Duration) -> anyhow::Result<()> {
    let spec = MigrationSpec {
        from: plan.from.clone(),
        to: plan.to.clone(),
        switch: Switch { kkp_cluster: a.plan.kkp_cluster.clone(), install: a.switch.install.as_ref().map(|p| p.display().to_string()) },
        batch: a.plan.batch as u32,
        force_bare: a.plan.force_bare,
        pod_timeout_seconds: pod_timeout.as_secs(),
        new_pod_cidrs: a.new_pod_cidrs.clone(),
        kube_proxy_mode: a.plan.kube_proxy_mode.clone(),
    };
    let k = kube_cluster(a.plan.kubeconfig.as_deref(), a.plan.seed_kubeconfig.as_deref(), &a.switch, &spec).await?;
    let mut view = ProgressView::new(std::io::stdout().is_terminal());
    let mut o = Orchestrator::begin(&k, spec, &plan, RunOptions::default(), Box::new(|st, line| view.show(st, line))).await?;
    run_until_interrupted(o.apply()).await?;
    Ok(())
}

async fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let client = allot_k8s::client(a.kubeconfig.as_deref()).await.context("connecting to the cluster")?;
    let m = kube::Api::<Migration>::all(client).get_opt(MIGRATION_NAME).await.context("reading the Migration object")?;
    let m = m.context("no migration found: nothing to roll back")?;
    let k = kube_cluster(a.kubeconfig.as_deref(), a.seed_kubeconfig.as_deref(), &a.switch, &m.spec).await?;
    let mut view = ProgressView::new(std::io::stdout().is_terminal());
    let mut o = Orchestrator::resume(&k, RunOptions::default(), Box::new(|st, line| view.show(st, line))).await?;
    run_until_interrupted(o.rollback()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM (a Job's pod being stopped) stops the run between two API calls; the
/// `Migration` object says where, and the same command resumes.
async fn run_until_interrupted(run: impl Future<Output = Result<(), allot_migrate::orchestrate::Error>>) -> anyhow::Result<()> {
    tokio::select! {
        r = run => Ok(r?),
        _ = crate::cmd::agent::shutdown_signal() => anyhow::bail!("interrupted: nodes this run cordoned may still be cordoned; run the same command again to resume (`allot migrate status` shows where it stopped)"),
    }
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let client = allot_k8s::client(a.kubeconfig.as_deref()).await.context("connecting to the cluster")?;
    let text = status_text(client, a.output).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(out.flush()?)
}

/// `allot migrate status` as it prints: the `Migration` object's phase and its nodes.
pub async fn status_text(client: kube::Client, format: Format) -> anyhow::Result<String> {
    let m = kube::Api::<Migration>::all(client).get_opt(MIGRATION_NAME).await.context("reading the Migration object")?;
    let m = m.context("no migration found: start one with `allot migrate apply`")?;
    let st = m.status.clone().unwrap_or_default();
    let view = serde_json::json!({ "spec": m.spec, "status": st });
    let header = if format == Format::Table { status_header(&m.spec, &st) } else { String::new() };
    Ok(header + &render(format, &view, || status_table(&st))?)
}

pub fn status_header(spec: &MigrationSpec, st: &MigrationStatus) -> String {
    let mut s = format!("migration {} -> {}: {}", spec.from, spec.to, st.phase);
    if let Some(f) = st.failed_in {
        s.push_str(&format!(" (in {f})"));
    }
    if let Some(step) = st.rollback_step {
        s.push_str(&format!(" (step {step})"));
    }
    s.push('\n');
    if let Some(m) = &st.message {
        s.push_str(m);
        s.push('\n');
    }
    s.push('\n');
    s
}

pub fn status_table(st: &MigrationStatus) -> Table {
    let mut t = Table::new(&["NODE", "BATCH", "PHASE", "CORDONED", "RESTARTED", "KEPT", "MESSAGE"]);
    for n in &st.nodes {
        t.row(vec![
            n.name.clone(),
            n.batch.to_string(),
            n.phase.to_string(),
            if n.cordoned { "yes".into() } else { "".into() },
            n.restarted.to_string(),
            n.kept.to_string(),
            n.message.clone().unwrap_or_default(),
        ]);
    }
    t
}

/// One line per batch: its nodes, their phase(s), pods restarted and kept.
pub fn batch_lines(st: &MigrationStatus) -> Vec<String> {
    let mut batches: Vec<u32> = st.nodes.iter().map(|n| n.batch).collect();
    batches.dedup();
    batches
        .into_iter()
        .map(|b| {
            let nodes: Vec<_> = st.nodes.iter().filter(|n| n.batch == b).collect();
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            let mut phases: Vec<String> = nodes.iter().map(|n| n.phase.to_string()).collect();
            phases.dedup();
            let restarted: u32 = nodes.iter().map(|n| n.restarted).sum();
            let kept: u32 = nodes.iter().map(|n| n.kept).sum();
            let mut line = format!("batch {b:<3} {:<10} {:<24} {restarted} pods restarted", phases.join("/"), names.join(","));
            if kept > 0 {
                line.push_str(&format!(", {kept} bare kept"));
            }
            line
        })
        .collect()
}

/// Live progress: on a terminal the per-batch lines and the latest event are redrawn in place;
/// piped, each event is one plain line.
pub struct ProgressView {
    tty: bool,
    drawn: usize,
    out: Vec<u8>,
    /// Write to stdout (tests read `out` instead).
    stdout: bool,
}

impl ProgressView {
    pub fn new(tty: bool) -> Self {
        ProgressView { tty, drawn: 0, out: vec![], stdout: true }
    }

    #[cfg(test)]
    pub fn captured(tty: bool) -> Self {
        ProgressView { tty, drawn: 0, out: vec![], stdout: false }
    }

    #[cfg(test)]
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    pub fn show(&mut self, st: &MigrationStatus, line: &str) {
        let text = if self.tty {
            let mut lines = vec![format!("phase {}", st.phase)];
            lines.extend(batch_lines(st));
            lines.push(line.to_string());
            let s = redraw_lines(self.drawn, &lines);
            self.drawn = lines.len();
            s
        } else {
            format!("{line}\n")
        };
        if self.stdout {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        } else {
            self.out.extend_from_slice(text.as_bytes());
        }
    }
}

/// Move up over the `drawn` lines of the last frame, write each line cleared to its end, and
/// erase whatever the last frame left below.
pub fn redraw_lines(drawn: usize, lines: &[String]) -> String {
    let mut s = if drawn > 0 { format!("\x1b[{drawn}F") } else { String::new() };
    for l in lines {
        s.push_str(l);
        s.push_str("\x1b[K\n");
    }
    s.push_str("\x1b[J");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_k8s::migration::{NodePhase, NodeStatus, Phase};

    fn st() -> MigrationStatus {
        let n = |name: &str, batch, phase, restarted| NodeStatus { name: name.into(), batch, phase, restarted, ..Default::default() };
        MigrationStatus {
            phase: Phase::Nodes,
            nodes: vec![n("n0", 0, NodePhase::Done, 3), n("n1", 1, NodePhase::Draining, 1), n("n2", 1, NodePhase::Draining, 2), n("n3", 2, NodePhase::Pending, 0)],
            ..Default::default()
        }
    }

    #[test]
    fn one_line_per_batch() {
        let lines = batch_lines(&st());
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("batch 0   Done") && lines[0].contains("n0") && lines[0].ends_with("3 pods restarted"), "{lines:?}");
        assert!(lines[1].contains("Draining") && lines[1].contains("n1,n2") && lines[1].ends_with("3 pods restarted"), "{lines:?}");
    }

    #[test]
    fn terminal_progress_redraws_in_place_and_piped_is_plain_lines() {
        let mut v = ProgressView::captured(true);
        v.show(&st(), "batch 1: cordoned n1, n2");
        v.show(&st(), "batch 1: pods restarted");
        let out = v.output();
        // 5 lines (phase, 3 batches, event) drawn, then the cursor goes up 5 to redraw.
        assert!(!out.starts_with("\x1b["), "{out:?}");
        assert_eq!(out.matches("\x1b[5F").count(), 1, "{out:?}");
        assert!(out.ends_with("batch 1: pods restarted\x1b[K\n\x1b[J"), "{out:?}");
        let mut p = ProgressView::captured(false);
        p.show(&st(), "batch 1: cordoned n1, n2");
        p.show(&st(), "3/3 pods on the new CNI");
        assert_eq!(p.output(), "batch 1: cordoned n1, n2\n3/3 pods on the new CNI\n");
    }

    #[test]
    fn status_table_and_header() {
        let mut s = st();
        s.message = Some("stopped: x".into());
        s.failed_in = Some(Phase::Nodes);
        s.phase = Phase::Failed;
        let spec = MigrationSpec { from: "canal:v3.27".into(), to: "cilium:1.16".into(), ..Default::default() };
        assert_eq!(status_header(&spec, &s), "migration canal:v3.27 -> cilium:1.16: Failed (in Nodes)\nstopped: x\n\n");
        let t = status_table(&s).render();
        assert!(t.starts_with("NODE"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("Draining"), "{t}");
    }

    /// `allot migrate status` against the in-process fake API server (no Kubernetes API server
    /// runs here): the Migration object's phase, message and nodes, as a table and as JSON; no
    /// object is a clear error.
    #[tokio::test]
    async fn fake_api_status_reads_the_migration_object() {
        let api = allot_kube_fake::FakeApiServer::new();
        let err = status_text(api.client(), Format::Table).await.unwrap_err().to_string();
        assert!(err.contains("no migration found") && err.contains("allot migrate apply"), "{err}");
        let mut s = st();
        s.message = Some("stopped at worker-c: eviction of shop/checkout refused by its PDB".into());
        s.failed_in = Some(Phase::Nodes);
        s.phase = Phase::Failed;
        s.nodes[1].cordoned = true;
        let spec = MigrationSpec { from: "canal:v3.27".into(), to: "cilium:1.16".into(), ..Default::default() };
        let mut m = Migration::new(MIGRATION_NAME, spec);
        m.status = Some(s);
        api.insert(serde_json::to_value(&m).unwrap());
        let table = status_text(api.client(), Format::Table).await.unwrap();
        assert!(table.starts_with("migration canal:v3.27 -> cilium:1.16: Failed (in Nodes)\nstopped at worker-c"), "{table}");
        let rows: Vec<&str> = table.lines().skip_while(|l| !l.starts_with("NODE")).collect();
        assert_eq!(rows.len(), 5, "{table}");
        assert!(rows[2].starts_with("n1") && rows[2].contains("Draining") && rows[2].contains("yes"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&status_text(api.client(), Format::Json).await.unwrap()).unwrap();
        assert_eq!(json["status"]["phase"], "Failed");
        assert_eq!(json["status"]["nodes"][3]["name"], "n3");
        assert_eq!(json["spec"]["to"], "cilium:1.16");
    }

    #[test]
    fn daemonset_flags_need_namespace_and_name() {
        assert_eq!(daemonset_flag("--target-daemonset", "kube-system/cilium").unwrap(), ("kube-system".into(), "cilium".into()));
        let e = daemonset_flag("--target-daemonset", "cilium").unwrap_err().to_string();
        assert!(e.contains("NAMESPACE/NAME"), "{e}");
    }
}
