//! The migration state machine against the simulated cluster: whole runs, a crash before every
//! single API call followed by a resume, rollback from every point, faults from seeded
//! schedules. Every run checks the rules: no bare pod deleted without the flag, no PDB broken by
//! the orchestrator, every node schedulable at the end.

use std::time::Duration;

use allot_k8s::migration::{MigrationSpec, NodePhase, Phase};
use allot_migrate::orchestrate::{Error, Orchestrator, RunOptions};
use allot_migrate::plan::Refusal;
use allot_migrate::sim::{NEW_CIDR, OLD_CIDR, Rng, Sim, block_on};

const NODES: usize = 5;

fn cluster(seed: u64) -> Sim {
    let sim = Sim::new(seed, NODES);
    sim.workload("default", "web", "ReplicaSet", 6, Some(4));
    sim.workload("default", "db", "ReplicaSet", 2, Some(1));
    sim.workload("default", "worker", "ReplicaSet", 3, None);
    sim.workload("monitoring", "exporter", "DaemonSet", 0, None);
    sim.bare_pod("default", "debug", "n2", false, false, false);
    sim.bare_pod("kube-system", "kube-proxy-n0", "n0", true, false, false);
    sim.bare_pod("kube-system", "static-web-n1", "n1", false, true, false);
    sim.bare_pod("batch", "job-done", "n3", false, false, true);
    sim.run_for(Duration::from_secs(30));
    sim
}

fn spec(force_bare: bool) -> MigrationSpec {
    MigrationSpec {
        from: "canal:3.27".into(),
        to: "cilium:1.16".into(),
        batch: 2,
        force_bare,
        pod_timeout_seconds: 300,
        new_pod_cidrs: vec![NEW_CIDR.into()],
        kube_proxy_mode: Some("iptables".into()),
        ..Default::default()
    }
}

fn quiet<'a>() -> allot_migrate::orchestrate::Progress<'a> {
    Box::new(|_, _| {})
}

fn apply(sim: &Sim, force_bare: bool) -> Result<(), Error> {
    apply_spec(sim, spec(force_bare))
}

fn apply_spec(sim: &Sim, spec: MigrationSpec) -> Result<(), Error> {
    let plan = sim.plan("canal:3.27", "cilium:1.16", 2);
    block_on(async {
        let mut o = Orchestrator::begin(sim, spec, &plan, RunOptions::default(), quiet()).await?;
        o.apply().await
    })
}

/// A whole apply that must succeed; the lines it reported.
fn apply_reporting(sim: &Sim, spec: MigrationSpec) -> Vec<String> {
    let mut lines = Vec::new();
    let plan = sim.plan("canal:3.27", "cilium:1.16", 2);
    block_on(async {
        let mut o = Orchestrator::begin(sim, spec, &plan, RunOptions::default(), Box::new(|_, l: &str| lines.push(l.to_string()))).await.unwrap();
        o.apply().await.unwrap();
    });
    lines
}

/// KKP's case: the pods CIDR cannot change, so the target hands out addresses from the old
/// CNI's range and --new-pod-cidr is that range: every old pod's address is already in it.
fn shared_cluster(seed: u64) -> Sim {
    let sim = cluster(seed);
    sim.world.borrow_mut().shared_range = true;
    sim
}

fn shared_spec(force_bare: bool) -> MigrationSpec {
    MigrationSpec { new_pod_cidrs: vec![OLD_CIDR.into()], ..spec(force_bare) }
}

/// UIDs of the counted pods a controller owns.
fn owned_uids(sim: &Sim) -> Vec<String> {
    let w = sim.world.borrow();
    w.pods.values().filter(|p| p.owner.is_some() && !p.host_network && !p.mirror && !p.finished).map(|p| p.uid.clone()).collect()
}

fn rollback(sim: &Sim) -> Result<(), Error> {
    block_on(async {
        let mut o = Orchestrator::resume(sim, RunOptions::default(), quiet()).await?;
        o.rollback().await
    })
}

fn interrupted(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::Cluster(allot_migrate::orchestrate::ClusterError::Interrupted)))
}

/// The rules every run keeps, whatever happened.
fn check_rules(sim: &Sim, force_bare: bool, when: &str) {
    let w = sim.world.borrow();
    assert!(w.violations.is_empty(), "{when}: {:?}", w.violations);
    for (name, n) in &w.nodes {
        assert!(!n.unschedulable, "{when}: node {name} left cordoned");
    }
    assert!(w.bare_deleted.is_empty(), "{when}: bare pods gone: {:?}", w.bare_deleted);
    let debug = w.pods.get(&("default".to_string(), "debug".to_string())).expect("bare pod debug exists");
    if !force_bare {
        assert_eq!(debug.uid, "uid-17", "{when}: the bare pod was never touched");
    }
}

/// What a finished run leaves, after the controllers have caught up.
#[derive(Debug, PartialEq)]
struct End {
    phase: Phase,
    nodes: Vec<NodePhase>,
    on_new: u32,
    on_old: u32,
    per_workload: Vec<usize>,
    target_active: bool,
    old_installed: bool,
    kube_proxy: String,
    recreating: bool,
}

fn end(sim: &Sim) -> End {
    sim.run_for(Duration::from_secs(60));
    let w = sim.world.borrow();
    let (_, st) = w.migration.clone().expect("migration object");
    let (on_new, on_old) = w.pods_by_cni();
    End {
        phase: st.phase,
        nodes: st.nodes.iter().map(|n| n.phase).collect(),
        on_new,
        on_old,
        per_workload: w.workloads.iter().map(|wl| w.pods.values().filter(|p| p.owner.as_deref() == Some(wl.name.as_str())).count()).collect(),
        target_active: w.target_active,
        old_installed: w.nodes.values().all(|n| n.old_since.is_some()),
        kube_proxy: w.kube_proxy.clone(),
        recreating: st.recreating.is_some(),
    }
}

#[test]
fn a_whole_run_moves_every_pod_keeps_bare_pods_and_says_how_many() {
    let sim = cluster(1);
    let (total_before, _) = {
        let w = sim.world.borrow();
        let (n, o) = w.pods_by_cni();
        (n + o, ())
    };
    let lines = apply_reporting(&sim, spec(false));
    check_rules(&sim, false, "uncrashed");
    let e = end(&sim);
    assert_eq!(e.phase, Phase::Done);
    assert!(e.nodes.iter().all(|p| *p == NodePhase::Done), "{e:?}");
    // Everything but the kept bare pod is on the new CNI.
    assert_eq!((e.on_new, e.on_old), (total_before - 1, 1), "{e:?}");
    assert!(!e.old_installed && e.target_active && e.kube_proxy == "iptables", "{e:?}");
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("{}/{} pods on the new CNI", total_before - 1, total_before)), "{last}");
    assert!(last.contains("1 bare pods kept"), "{last}");
    // Batches: canary n0 alone, then two nodes at a time.
    assert!(lines.iter().any(|l| l == "batch 0: cordoned n0"), "{lines:#?}");
    assert!(lines.iter().any(|l| l == "batch 1: cordoned n1, n2"), "{lines:#?}");
}

#[test]
fn force_bare_recreates_the_bare_pod_on_the_new_cni() {
    let sim = cluster(2);
    apply(&sim, true).unwrap();
    check_rules(&sim, true, "force");
    let e = end(&sim);
    assert_eq!(e.on_old, 0, "{e:?}");
    let w = sim.world.borrow();
    let debug = &w.pods[&("default".to_string(), "debug".to_string())];
    assert_eq!(debug.node, "n2", "re-created in place");
    assert!(debug.ip.unwrap().to_string().starts_with("10.2."), "{debug:?}");
    let (on_new, _) = w.pods_by_cni();
    let msg = w.migration.as_ref().unwrap().1.message.clone().unwrap();
    assert_eq!(msg, format!("{on_new}/{on_new} pods on the new CNI"));
    assert_eq!(on_new, 17);
}

/// Crash before call k, for every k, then resume with a new orchestrator: same end, rules kept.
#[test]
fn a_crash_before_any_call_resumes_to_the_same_end() {
    for force in [false, true] {
        let sim = cluster(3);
        apply(&sim, force).unwrap();
        let calls = sim.world.borrow().calls;
        let want = end(&sim);
        assert_eq!(want.phase, Phase::Done);
        eprintln!("force_bare {force}: {calls} calls in a run, each one crashed and resumed");
        for k in 1..=calls {
            let sim = cluster(3);
            sim.world.borrow_mut().crash_at = Some(k);
            let r = apply(&sim, force);
            assert!(interrupted(&r), "k={k}: {r:?}");
            sim.world.borrow_mut().crash_at = None;
            apply(&sim, force).unwrap_or_else(|e| panic!("resume after crash at call {k}: {e}"));
            check_rules(&sim, force, &format!("crash at call {k}, force {force}"));
            assert_eq!(end(&sim), want, "crash at call {k}, force {force}");
        }
    }
}

/// Two crashes in one run, at seeded points, still end the same.
#[test]
fn repeated_crashes_at_seeded_points_resume_to_the_same_end() {
    let sim = cluster(4);
    apply(&sim, false).unwrap();
    let want = end(&sim);
    let mut rng = Rng::new(99);
    for round in 0..60 {
        let sim = cluster(4);
        let mut crashes = 0;
        loop {
            let at = sim.world.borrow().calls + 1 + rng.below(120);
            sim.world.borrow_mut().crash_at = Some(at);
            let r = apply(&sim, false);
            sim.world.borrow_mut().crash_at = None;
            if !interrupted(&r) {
                r.unwrap();
                break;
            }
            crashes += 1;
        }
        assert!(crashes > 0 || round > 0);
        check_rules(&sim, false, &format!("round {round}"));
        assert_eq!(end(&sim), want, "round {round}");
    }
}

fn check_rolled_back(sim: &Sim, when: &str) {
    check_rules(sim, false, when);
    let e = end(sim);
    assert_eq!(e.phase, Phase::RolledBack, "{when}");
    assert_eq!(e.on_new, 0, "{when}: pods left on the new CNI: {e:?}");
    assert!(!e.target_active && e.old_installed, "{when}: {e:?}");
    assert_eq!(e.kube_proxy, "ipvs", "{when}");
    assert!(!e.recreating, "{when}");
}

/// Stop the forward run before call k (every k, so every phase and step), then roll back.
#[test]
fn rollback_from_every_point_restores_the_old_cni() {
    let sim = cluster(5);
    apply(&sim, false).unwrap();
    let calls = sim.world.borrow().calls;
    let mut phases = std::collections::BTreeSet::new();
    for k in 1..=calls + 1 {
        let sim = cluster(5);
        sim.world.borrow_mut().crash_at = Some(k);
        let _ = apply(&sim, false);
        sim.world.borrow_mut().crash_at = None;
        if let Some((_, st)) = sim.world.borrow().migration.clone() {
            phases.insert(format!("{:?}", st.phase));
        }
        match rollback(&sim) {
            Ok(()) => check_rolled_back(&sim, &format!("rollback after crash at {k}")),
            Err(Error::NoMigration) => assert!(k <= 2, "k={k}: the object is created by the first calls"),
            Err(e) => panic!("k={k}: {e}"),
        }
    }
    eprintln!("rolled back after a crash at each of {} calls", calls + 1);
    for p in ["Preflight", "Switching", "Nodes", "RemovingOld", "KubeProxy", "Done"] {
        assert!(phases.contains(p), "rollback never started from {p}: {phases:?}");
    }
}

/// A rollback itself crashed before every call resumes to the old CNI.
#[test]
fn a_crashed_rollback_resumes() {
    let base = || {
        let sim = cluster(6);
        apply(&sim, true).unwrap();
        sim
    };
    let sim = base();
    let before = sim.world.borrow().calls;
    rollback(&sim).unwrap();
    let calls = sim.world.borrow().calls - before;
    eprintln!("{calls} calls in a rollback, each one crashed and resumed");
    for k in 1..=calls {
        let sim = base();
        let at = sim.world.borrow().calls + k;
        sim.world.borrow_mut().crash_at = Some(at);
        assert!(interrupted(&rollback(&sim)), "k={k}");
        sim.world.borrow_mut().crash_at = None;
        rollback(&sim).unwrap_or_else(|e| panic!("k={k}: {e}"));
        check_rules(&sim, true, &format!("rollback crash {k}"));
        let e = end(&sim);
        assert_eq!((e.phase, e.on_new, e.target_active), (Phase::RolledBack, 0, false), "k={k}: {e:?}");
    }
}

/// API outages and nodes going NotReady from seeded schedules (plus a crash): every run ends
/// Done, or Failed with every node schedulable, and the rules hold at every point.
#[test]
fn seeded_faults_are_ridden_out_or_stop_cleanly() {
    let (mut done, mut failed) = (0, 0);
    for seed in 0..40u64 {
        let sim = cluster(seed);
        let mut rng = Rng::new(seed ^ 0xfeed);
        {
            let mut w = sim.world.borrow_mut();
            let t0 = w.now;
            for _ in 0..3 {
                let a = t0 + Duration::from_secs(rng.below(600));
                w.api_down.push((a, a + Duration::from_secs(5 + rng.below(60))));
                let node = format!("n{}", rng.below(NODES as u64));
                let a = t0 + Duration::from_secs(rng.below(600));
                // Now and then longer than --pod-timeout (300 s): that run must stop cleanly.
                let long = rng.below(3) == 0;
                let a = if long { t0 + Duration::from_secs(rng.below(100)) } else { a };
                w.node_down.push((node, a, a + Duration::from_secs(if long { 330 + rng.below(100) } else { 5 + rng.below(90) })));
            }
            w.crash_at = Some(1 + rng.below(300));
        }
        let r = apply(&sim, false);
        sim.world.borrow_mut().crash_at = None;
        let r = if interrupted(&r) { apply(&sim, false) } else { r };
        match r {
            Ok(()) => {
                done += 1;
                check_rules(&sim, false, &format!("seed {seed}"));
                let e = end(&sim);
                assert_eq!((e.phase, e.on_old), (Phase::Done, 1), "seed {seed}: {e:?}");
            }
            Err(Error::Failed { .. }) => {
                failed += 1;
                check_rules(&sim, false, &format!("seed {seed} failed"));
                rollback(&sim).unwrap();
                check_rolled_back(&sim, &format!("seed {seed} rolled back"));
            }
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    eprintln!("{done}/40 seeded fault runs ended Done, {failed} Failed cleanly and rolled back");
    assert_eq!(done + failed, 40);
    assert!(done >= 20 && failed >= 1, "{done} done, {failed} failed: the schedule should give both");
}

#[test]
fn a_pdb_that_allows_nothing_stops_the_run_with_nodes_schedulable_and_retry_finishes() {
    let sim = cluster(7);
    sim.workload("default", "strict", "ReplicaSet", 2, Some(2));
    sim.run_for(Duration::from_secs(10));
    let err = apply(&sim, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Failed { phase: Phase::Nodes, .. }), "{msg}");
    assert!(msg.contains("PodDisruptionBudget") && msg.contains("default/strict-"), "{msg}");
    check_rules(&sim, false, "failed");
    {
        let w = sim.world.borrow();
        let st = &w.migration.as_ref().unwrap().1;
        assert_eq!(st.phase, Phase::Failed);
        assert!(st.nodes.iter().any(|n| n.phase == NodePhase::Failed), "{st:?}");
        // The budget was never broken: both pods still run.
        assert_eq!(w.pods.values().filter(|p| p.owner.as_deref() == Some("strict")).count(), 2);
    }
    // The operator relaxes the budget and runs apply again: it goes on from where it stopped.
    sim.world.borrow_mut().workloads.last_mut().unwrap().min_available = Some(1);
    apply(&sim, false).unwrap();
    check_rules(&sim, false, "retried");
    assert_eq!(end(&sim).phase, Phase::Done);
}

#[test]
fn a_plan_with_refusals_changes_nothing() {
    let sim = cluster(8);
    let mut plan = sim.plan("canal:3.27", "cilium:1.16", 2);
    plan.refusals.push(Refusal { rule: "bare-pods".into(), message: "3 bare pods would be lost".into() });
    let err = block_on(Orchestrator::begin(&sim, spec(false), &plan, RunOptions::default(), quiet())).err().unwrap();
    assert!(err.to_string().contains("bare-pods: 3 bare pods would be lost"), "{err}");
    let w = sim.world.borrow();
    assert!(w.migration.is_none() && !w.target_active);
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    let sim = cluster(9);
    let plan = sim.plan("canal:3.27", "cilium:1.16", 2);
    for (mut s, needle) in [
        (spec(false), "--new-pod-cidr \"10.2.0.0\" is not a CIDR"),
        (spec(false), "no pod CIDR of the new CNI given"),
        (spec(false), "--batch must be at least 1"),
    ] {
        match needle {
            n if n.starts_with("--new") => s.new_pod_cidrs = vec!["10.2.0.0".into()],
            n if n.starts_with("no pod") => s.new_pod_cidrs.clear(),
            _ => s.batch = 0,
        }
        let err = block_on(Orchestrator::begin(&sim, s, &plan, RunOptions::default(), quiet())).err().unwrap();
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert_eq!(sim.world.borrow().calls, 0, "nothing was even read");
}

#[test]
fn another_target_while_one_is_in_progress_is_refused() {
    let sim = cluster(10);
    sim.world.borrow_mut().crash_at = Some(40);
    let _ = apply(&sim, false);
    sim.world.borrow_mut().crash_at = None;
    let mut other = spec(false);
    other.to = "calico:3.28".into();
    let plan = sim.plan("canal:3.27", "calico:3.28", 2);
    let err = block_on(Orchestrator::begin(&sim, other, &plan, RunOptions::default(), quiet())).err().unwrap();
    assert!(err.to_string().contains("a migration to cilium:1.16 is in phase"), "{err}");
    // Resuming the same migration works.
    apply(&sim, false).unwrap();
    check_rules(&sim, false, "resumed");
}

#[test]
fn apply_after_rollback_says_to_finish_the_rollback() {
    let sim = cluster(11);
    sim.world.borrow_mut().crash_at = Some(60);
    let _ = apply(&sim, false);
    let at = sim.world.borrow().calls + 5;
    sim.world.borrow_mut().crash_at = Some(at);
    let _ = rollback(&sim);
    sim.world.borrow_mut().crash_at = None;
    let err = apply(&sim, false).unwrap_err();
    assert!(err.to_string().contains("finish it with `allot migrate rollback`"), "{err}");
    rollback(&sim).unwrap();
    check_rolled_back(&sim, "finished");
    // A finished rollback lets a new migration start.
    apply(&sim, false).unwrap();
    assert_eq!(end(&sim).phase, Phase::Done);
}


#[test]
fn a_shared_range_restarts_every_pod_and_counts_them_right() {
    let sim = shared_cluster(12);
    let before = owned_uids(&sim);
    let total = {
        let (n, o) = sim.world.borrow().pods_by_cni();
        assert_eq!(n, 0);
        n + o
    };
    let lines = apply_reporting(&sim, shared_spec(false));
    check_rules(&sim, false, "shared range");
    let after = owned_uids(&sim);
    let stayed: Vec<&String> = before.iter().filter(|u| after.contains(u)).collect();
    assert!(stayed.is_empty(), "pods never restarted: {stayed:?}");
    let e = end(&sim);
    assert_eq!(e.phase, Phase::Done);
    assert_eq!((e.on_new, e.on_old), (total - 1, 1), "only the kept bare pod stays: {e:?}");
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("{}/{total} pods on the new CNI", total - 1)), "{last}");
    assert!(lines.iter().any(|l| l.contains("already have addresses in --new-pod-cidr")), "{lines:#?}");
    let w = sim.world.borrow();
    let st = &w.migration.as_ref().unwrap().1;
    assert!(st.shared_range && st.pods_on_new == total - 1 && st.pods_total == total, "{st:?}");
}

#[test]
fn a_shared_range_crash_before_any_call_resumes_to_the_same_end() {
    let sim = shared_cluster(13);
    apply_spec(&sim, shared_spec(false)).unwrap();
    let calls = sim.world.borrow().calls;
    let want = end(&sim);
    assert_eq!((want.phase, want.on_old), (Phase::Done, 1), "{want:?}");
    for k in 1..=calls {
        let sim = shared_cluster(13);
        sim.world.borrow_mut().crash_at = Some(k);
        let r = apply_spec(&sim, shared_spec(false));
        assert!(interrupted(&r), "k={k}: {r:?}");
        sim.world.borrow_mut().crash_at = None;
        apply_spec(&sim, shared_spec(false)).unwrap_or_else(|e| panic!("resume after crash at call {k}: {e}"));
        check_rules(&sim, false, &format!("shared, crash at call {k}"));
        assert_eq!(end(&sim), want, "shared, crash at call {k}");
    }
}

#[test]
fn a_shared_range_rollback_from_every_point_restores_the_old_cni() {
    let sim = shared_cluster(14);
    apply_spec(&sim, shared_spec(false)).unwrap();
    let calls = sim.world.borrow().calls;
    for k in 1..=calls + 1 {
        let sim = shared_cluster(14);
        sim.world.borrow_mut().crash_at = Some(k);
        let _ = apply_spec(&sim, shared_spec(false));
        sim.world.borrow_mut().crash_at = None;
        match rollback(&sim) {
            Ok(()) => check_rolled_back(&sim, &format!("shared, rollback after crash at {k}")),
            Err(Error::NoMigration) => assert!(k <= 2, "k={k}"),
            Err(e) => panic!("k={k}: {e}"),
        }
        if k == calls + 1 {
            let w = sim.world.borrow();
            let msg = w.migration.as_ref().unwrap().1.message.clone().unwrap();
            let (_, on_old) = w.pods_by_cni();
            assert_eq!(msg, format!("{on_old}/{on_old} pods on the old CNI"), "after a whole run");
        }
    }
}

/// A pod created just before the switch whose sandbox comes up only after the target's config
/// landed (pods start slowly here): recorded at the switch without an address, it gets the
/// target's. A rollback from every point still leaves no pod on the target.
#[test]
fn a_pod_without_an_address_at_the_switch_is_judged_by_its_address_on_rollback() {
    let late = || {
        let sim = cluster(16);
        sim.world.borrow_mut().delays.start = Duration::from_secs(60);
        sim.workload("default", "late", "ReplicaSet", 1, None);
        sim
    };
    let sim = late();
    apply(&sim, false).unwrap();
    let calls = sim.world.borrow().calls;
    let mut rolled_back = 0;
    for k in 1..=calls + 1 {
        let sim = late();
        sim.world.borrow_mut().crash_at = Some(k);
        let _ = apply(&sim, false);
        sim.world.borrow_mut().crash_at = None;
        match rollback(&sim) {
            Ok(()) => {
                check_rolled_back(&sim, &format!("late pod, rollback after crash at {k}"));
                rolled_back += 1;
            }
            Err(Error::NoMigration) => assert!(k <= 2, "k={k}"),
            Err(e) => panic!("k={k}: {e}"),
        }
    }
    assert!(rolled_back >= calls - 1, "{rolled_back} of {calls}");
}

/// Apply on `sim`; when the line `at` is reported, the API goes away for `outage`.
fn apply_with_outage(sim: &Sim, at: &str, outage: Duration) -> Result<(), Error> {
    let plan = sim.plan("canal:3.27", "cilium:1.16", 2);
    block_on(async {
        let progress = Box::new(|_: &allot_k8s::migration::MigrationStatus, l: &str| {
            if l == at {
                let mut w = sim.world.borrow_mut();
                let now = w.now;
                w.api_down.push((now, now + outage));
            }
        });
        let mut o = Orchestrator::begin(sim, spec(false), &plan, RunOptions::default(), progress).await?;
        o.apply().await
    })
}

/// The API goes away longer than the run waits (120 s) while n1 and n2 are cordoned: the run
/// stops, and since the API is back before the uncordon gives up, both are schedulable again.
#[test]
fn an_outage_longer_than_the_api_timeout_leaves_every_node_schedulable() {
    let sim = cluster(15);
    let err = apply_with_outage(&sim, "batch 1: cordoned n1, n2", Duration::from_secs(200)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unreachable { ref cordoned, .. } if cordoned.is_empty()), "{msg}");
    assert!(msg.contains("every node this run cordoned is schedulable again") && msg.contains("allot migrate apply"), "{msg}");
    check_rules(&sim, false, "after the outage");
    {
        let w = sim.world.borrow();
        let st = &w.migration.as_ref().unwrap().1;
        assert_eq!(st.phase, Phase::Nodes);
        assert!(st.nodes.iter().all(|n| !n.cordoned && n.phase != NodePhase::Cordoned && n.phase != NodePhase::Draining), "{st:?}");
    }
    // The same apply resumes: the batch is cordoned again and the run ends as usual.
    apply(&sim, false).unwrap();
    check_rules(&sim, false, "resumed");
    let e = end(&sim);
    assert_eq!((e.phase, e.on_old), (Phase::Done, 1), "{e:?}");
}

/// The API stays away through the uncordon too: the error names the nodes left cordoned and
/// how to fix it; the resumed run uncordons them.
#[test]
fn an_outage_through_the_uncordon_names_the_cordoned_nodes() {
    let sim = cluster(16);
    let err = apply_with_outage(&sim, "batch 1: cordoned n1, n2", Duration::from_secs(1000)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unreachable { ref cordoned, .. } if *cordoned == ["n1", "n2"]), "{msg}");
    assert!(msg.contains("nodes n1, n2 may still be cordoned") && msg.contains("kubectl uncordon n1 n2"), "{msg}");
    sim.run_for(Duration::from_secs(1000));
    apply(&sim, false).unwrap();
    check_rules(&sim, false, "resumed after the outage");
    assert_eq!(end(&sim).phase, Phase::Done);
}
