//! `allot migrate plan --snapshot` as a process: exit codes, the table, `-o json` and `-o yaml`,
//! and errors for bad input. Offline only (no API server; the live path is kube-rs).

use std::process::Command;

use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrate/tests/fixtures");

fn allot(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(args)
        .env_remove("NODE_NAME")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("allot runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

#[test]
fn kkp_cluster_without_the_label_exits_1_and_prints_the_refusal() {
    let (cluster, kkp) = (fixture("canal-cluster.yaml"), fixture("kkp-cluster.yaml"));
    let (code, out, err) =
        allot(&["migrate", "plan", "--to", "cilium:1.16", "--snapshot", &cluster, "--snapshot", &kkp, "--self-node", "worker-a"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("Migration plan: canal:3.27 -> cilium:1.16\n"), "{out}");
    // Nodes by batch, each pod with action and reason.
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with(char::is_numeric) && !l.contains("node(s)")).collect();
    assert_eq!(rows.len(), 29, "{out}");
    assert!(rows[0].starts_with("0       worker-b"), "{}", rows[0]);
    assert!(rows.last().unwrap().starts_with("3       worker-a"), "{out}");
    assert!(out.contains("4 node(s) in 4 batch(es); 29 pod(s): 9 evict, 3 delete, 0 recreate, 1 keep, 16 skip"), "{out}");
    assert!(out.contains("\nAt risk: 6 pod(s)\n"), "{out}");
    assert!(out.contains("kubectl label cluster xk7v2qpdm4 unsafe-cni-migration=true"), "{out}");
    assert!(err.contains("error: the migration is refused by 1 rule(s) (kkp-unsafe-cni-migration-label)"), "{err}");
}

#[test]
fn json_output_parses_and_a_plan_without_refusals_exits_0() {
    let cluster = fixture("canal-cluster.yaml");
    let (code, out, err) = allot(&["migrate", "plan", "--to", "allot", "--snapshot", &cluster, "-o", "json", "--batch", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("-o json prints JSON");
    assert_eq!(v["from"], "canal:3.27.3");
    assert_eq!(v["to"], "allot");
    assert_eq!(v["refusals"], serde_json::json!([]));
    let batches: Vec<(String, u64)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_string(), n["batch"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        batches,
        [("worker-a".into(), 0), ("worker-b".into(), 1), ("worker-c".into(), 1), ("cp-1".into(), 2)]
    );
    assert_eq!(v["atRisk"].as_array().unwrap().len(), 7);

    // $NODE_NAME names the node we run on, as the downward API sets it in a pod.
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["migrate", "plan", "--to", "allot", "--snapshot", &cluster, "-o", "json"])
        .env("NODE_NAME", "worker-b")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][3]["name"], "worker-b", "self node last");
}

#[test]
fn yaml_output_reads_back_as_the_same_plan() {
    let cluster = fixture("canal-cluster.yaml");
    let (_, json, _) = allot(&["migrate", "plan", "--to", "cilium", "--snapshot", &cluster, "-o", "json"]);
    let (code, yaml, err) = allot(&["migrate", "plan", "--to", "cilium", "--snapshot", &cluster, "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    let a: Value = serde_json::from_str(&json).unwrap();
    let b: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("allot-migrate-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  containers: 7\n").unwrap();
    let bad_s = bad.to_str().unwrap();

    let (code, out, err) = allot(&["migrate", "plan", "--to", "cilium", "--snapshot", bad_s]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert!(err.contains(&format!("error: {bad_s}: document 2 (line 6) (Pod shop/p): not a valid Pod")), "{err}");

    let (code, _, err) = allot(&["migrate", "plan", "--to", "cillium", "--snapshot", &fixture("canal-cluster.yaml")]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown CNI type \"cillium\"; expected one of canal, calico, cilium"), "{err}");

    let (code, _, err) = allot(&["migrate", "plan", "--to", "cilium", "--snapshot", "/nonexistent/dump.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read snapshot /nonexistent/dump.yaml"), "{err}");

    // clap: --to is required.
    let (code, _, err) = allot(&["migrate", "plan", "--snapshot", bad_s]);
    assert_eq!(code, 2);
    assert!(err.contains("--to"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// docs/migration.md shows real output: it must still be what the command prints.
#[test]
fn the_plans_in_docs_migration_md_are_what_the_command_prints() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/migration.md")).unwrap();
    let cluster = fixture("canal-cluster.yaml");
    let (_, out, _) = allot(&["migrate", "plan", "--to", "allot", "--snapshot", &cluster, "--self-node", "worker-a", "--batch", "2"]);
    assert!(docs.contains(&out), "docs/migration.md's plain-cluster plan is stale; paste:\n{out}");
    // The README shows its head, the canary's rows, the summary and "Refusals: none".
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let shown = |l: &&str| l.starts_with("Migration plan:") || l.starts_with("  * ") || l.starts_with("0 ") || l.contains(" node(s) in ")
        || l.starts_with("At risk:") || l.starts_with("Refusals:");
    let lines: Vec<&str> = out.lines().filter(shown).collect();
    assert!(lines.len() >= 12 && lines.contains(&"Refusals: none"), "{out}");
    for line in lines {
        assert!(readme.contains(line), "README's plain-cluster plan excerpt is stale: {line:?} missing");
    }
    let (_, out, _) = allot(&[
        "migrate", "plan", "--to", "cilium:1.16", "--snapshot", &cluster, "--snapshot", &fixture("kkp-cluster.yaml"),
        "--self-node", "worker-a",
    ]);
    assert!(docs.contains(&out), "docs/migration.md's KKP plan is stale; paste:\n{out}");
    // The README shows the KKP plan's summary and first refusal, cut short.
    for line in out.lines().filter(|l| l.ends_with(" skip") || l.starts_with("At risk:") || l.starts_with("Refusals:")) {
        assert!(readme.contains(line), "README's KKP plan excerpt is stale: {line:?} missing");
    }
    let refusal = out.lines().find(|l| l.trim_start().starts_with("kkp-")).expect("a KKP refusal");
    let cut = refusal.split_once(" label, ").expect("the refusal names the label").0;
    assert!(readme.contains(cut), "README's refusal is stale: {cut:?}");
}
