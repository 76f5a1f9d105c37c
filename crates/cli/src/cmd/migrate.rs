//! `allot migrate`: move a cluster from one CNI to another. `plan` reads the cluster (live or
//! from a kubectl dump) and prints what would happen to every pod, node by node.

use std::path::PathBuf;

use allot_migrate::plan::{Action, Plan, PlanOptions};
use allot_migrate::snapshot::ClusterSnapshot;
use anyhow::Context;

use crate::output::{self, Format, Table};

#[derive(clap::Subcommand)]
pub enum MigrateCmd {
    /// Print what a migration would do to every pod, node by node, and what is at risk (changes
    /// nothing; exit code 1 when a rule refuses the migration).
    Plan(PlanArgs),
    /// Carry the plan out: switch the target on, restart pods node by node (canary first),
    /// verify each node, remove the old CNI. Resumes a killed run.
    Apply(super::migrate_run::ApplyArgs),
    /// Where the migration stands: phase per node.
    Status(super::migrate_run::StatusArgs),
    /// Go back to the old CNI from any phase: old CNI first, then pods restarted on it.
    Rollback(super::migrate_run::RollbackArgs),
}

/// Where the cluster is read from and how the plan is made; `apply` takes the same flags.
#[derive(clap::Args, Clone, Debug)]
pub struct PlanFlags {
    /// The target CNI, TYPE[:VERSION]: canal, calico, cilium, flannel, weave or allot (e.g.
    /// cilium:1.16).
    #[arg(long, value_name = "TYPE[:VERSION]")]
    pub to: String,
    /// Plan from a dump instead of the live cluster: the YAML of `kubectl get nodes,pods,
    /// daemonsets,replicasets,deployments,statefulsets,jobs,poddisruptionbudgets -A -o yaml`.
    /// Repeat it to add files, e.g. the KKP `Cluster` object from the seed cluster.
    #[arg(long, value_name = "FILE")]
    pub snapshot: Vec<PathBuf>,
    /// The user cluster's kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// KKP: the name of this user cluster's `Cluster` object, read from the seed cluster.
    #[arg(long, value_name = "NAME", requires = "seed_kubeconfig")]
    pub kkp_cluster: Option<String>,
    /// KKP: the seed cluster's kubeconfig, where the `Cluster` object lives.
    #[arg(long, value_name = "FILE")]
    pub seed_kubeconfig: Option<PathBuf>,
    /// The CNI the cluster runs now, TYPE[:VERSION], when detection cannot tell.
    #[arg(long, value_name = "TYPE[:VERSION]")]
    pub from: Option<String>,
    /// Nodes migrated together after the canary node.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch: usize,
    /// Re-create bare pods (no controller) from their own spec; without it they stay on the old
    /// CNI and are reported.
    #[arg(long)]
    pub force_bare: bool,
    /// The node this migration runs on, migrated last (default: $NODE_NAME, set in a pod from
    /// the downward API).
    #[arg(long, env = "NODE_NAME", value_name = "NODE")]
    pub self_node: Option<String>,
    /// Plan although nodes are NotReady; their pods are listed at risk.
    #[arg(long)]
    pub allow_not_ready: bool,
    /// Change kube-proxy's mode once every pod is on the new CNI, and restart kube-proxy (on
    /// KKP: the Cluster's spec.clusterNetwork.proxyMode, checked with KKP's rules).
    #[arg(long, value_name = "MODE", value_parser = ["ipvs", "iptables", "nftables", "ebpf"])]
    pub kube_proxy_mode: Option<String>,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub flags: PlanFlags,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

pub fn exec(cmd: MigrateCmd) -> anyhow::Result<()> {
    match cmd {
        MigrateCmd::Plan(args) => exec_plan(args),
        MigrateCmd::Apply(args) => super::migrate_run::exec_apply(args),
        MigrateCmd::Status(args) => super::migrate_run::exec_status(args),
        MigrateCmd::Rollback(args) => super::migrate_run::exec_rollback(args),
    }
}

fn exec_plan(args: PlanArgs) -> anyhow::Result<()> {
    let snap = load_snapshot(&args.flags)?;
    let (plan, notes) = make_plan(&snap, &args.flags)?;
    match args.output {
        Format::Table => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(render_plan(&plan, &notes).as_bytes())?;
            out.flush()?;
        }
        format => output::print(format, &plan, || Table::new(&[]))?,
    }
    if !plan.refusals.is_empty() {
        anyhow::bail!(
            "the migration is refused by {} rule(s) ({}): fix what they say and plan again",
            plan.refusals.len(),
            plan.refusals.iter().map(|r| r.rule.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// The cluster as `flags` say: the dump files, or the live cluster through kube-rs.
pub fn load_snapshot(flags: &PlanFlags) -> anyhow::Result<ClusterSnapshot> {
    if !flags.snapshot.is_empty() {
        if flags.kkp_cluster.is_some() {
            anyhow::bail!("--kkp-cluster reads the live seed cluster; with --snapshot, add the Cluster object's YAML as another --snapshot file");
        }
        let mut snap = ClusterSnapshot::default();
        for path in &flags.snapshot {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read snapshot {}: give a file that `kubectl get ... -o yaml` wrote", path.display()))?;
            snap.add_yaml(&text, &path.display().to_string())?;
        }
        return Ok(snap);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = allot_k8s::client(flags.kubeconfig.as_deref())
            .await
            .context("no Kubernetes API to read the cluster from: give --kubeconfig, or plan offline with --snapshot FILE")?;
        let mut snap = ClusterSnapshot::from_api(client)
            .await
            .context("reading the cluster through the Kubernetes API (or plan offline with --snapshot FILE)")?;
        if let (Some(name), Some(seed)) = (&flags.kkp_cluster, &flags.seed_kubeconfig) {
            let seed = allot_k8s::client(Some(seed)).await.context("cannot use --seed-kubeconfig")?;
            snap.kkp_cluster = Some(ClusterSnapshot::kkp_cluster_from_api(seed, name).await?);
        }
        Ok(snap)
    })
}

pub fn plan_options(flags: &PlanFlags) -> PlanOptions {
    PlanOptions {
        to: flags.to.clone(),
        from: flags.from.clone(),
        batch: flags.batch,
        force_bare: flags.force_bare,
        self_node: flags.self_node.clone().filter(|s| !s.is_empty()),
        allow_not_ready: flags.allow_not_ready,
        kube_proxy_mode: flags.kube_proxy_mode.clone(),
    }
}

/// The plan and the notes for its text form.
pub fn make_plan(snap: &ClusterSnapshot, flags: &PlanFlags) -> anyhow::Result<(Plan, Vec<String>)> {
    Ok(allot_migrate::plan::plan_with_notes(snap, &plan_options(flags))?)
}

/// The text form: header and notes, the nodes by batch with each pod, then at-risk pods, then
/// refusals.
pub fn render_plan(plan: &Plan, notes: &[String]) -> String {
    let mut out = format!("Migration plan: {} -> {}\n", plan.from, plan.to);
    for n in notes {
        out.push_str(&format!("  * {n}\n"));
    }
    let mut table = Table::new(&["batch", "node", "namespace", "pod", "action", "reason"]);
    for node in &plan.nodes {
        if node.pods.is_empty() {
            table.row(vec![node.batch.to_string(), node.name.clone(), "-".into(), "-".into(), "-".into(), "no pods".into()]);
        }
        for p in &node.pods {
            table.row(vec![
                node.batch.to_string(),
                node.name.clone(),
                p.namespace.clone(),
                p.name.clone(),
                format!("{:?}", p.action).to_lowercase(),
                p.reason.clone(),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table.render());

    let count = |a: Action| plan.nodes.iter().flat_map(|n| &n.pods).filter(|p| p.action == a).count();
    let batches = plan.nodes.iter().map(|n| n.batch).max().map_or(0, |b| b + 1);
    out.push_str(&format!(
        "\n{} node(s) in {batches} batch(es); {} pod(s): {} evict, {} delete, {} recreate, {} keep, {} skip\n",
        plan.nodes.len(),
        plan.nodes.iter().map(|n| n.pods.len()).sum::<usize>(),
        count(Action::Evict),
        count(Action::Delete),
        count(Action::Recreate),
        count(Action::Keep),
        count(Action::Skip),
    ));

    let pods_at_risk: std::collections::BTreeSet<_> = plan.at_risk.iter().map(|r| (&r.namespace, &r.name)).collect();
    out.push_str(&format!("\nAt risk: {} pod(s)\n", pods_at_risk.len()));
    if !plan.at_risk.is_empty() {
        let mut t = Table::new(&["namespace", "pod", "reason"]);
        for r in &plan.at_risk {
            t.row(vec![r.namespace.clone(), r.name.clone(), r.reason.clone()]);
        }
        out.push_str(&t.render());
    }
    if plan.refusals.is_empty() {
        out.push_str("\nRefusals: none\n");
    } else {
        out.push_str(&format!("\nRefusals: {} (nothing is carried out until they are fixed)\n", plan.refusals.len()));
        for r in &plan.refusals {
            out.push_str(&format!("  {}: {}\n", r.rule, r.message));
        }
    }
    out
}
