//! `allot migrate apply`, `status`, `rollback` as processes: bad input is refused with what to do
//! before anything is read or changed. No API server runs here, so the live runs are tested in
//! crates/migrate (simulated cluster, and the fake API for the kube-rs requests).

use std::process::Command;

fn allot(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(args)
        .env_remove("NODE_NAME")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("allot runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn apply_refuses_bad_input_before_touching_the_cluster() {
    let base = ["migrate", "apply", "--to", "cilium:1.16", "--new-pod-cidr", "10.2.0.0/16"];
    let dir = std::env::temp_dir().join(format!("allot-migrate-apply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_k8s = dir.join("not-k8s.yaml");
    std::fs::write(&not_k8s, "hello: world\n").unwrap();
    let not_k8s = not_k8s.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[], "say how the target is switched on: --install PATH"),
        (&["--install", "/nonexistent/cilium.yaml"], "reading /nonexistent/cilium.yaml"),
        (&["--install", not_k8s], "every document needs apiVersion, kind and metadata.name"),
        (&["--install", not_k8s, "--pod-timeout", "5x"], "duration \"5x\": unit must be ms, s or m"),
        (&["--install", not_k8s, "--kkp-cluster", "c", "--seed-kubeconfig", "s"], "--install and --kkp-cluster both switch the CNI"),
        (&["--install", not_k8s, "--snapshot", "dump.yaml"], "apply works on the live cluster: drop --snapshot"),
        (&["--install", not_k8s, "--kube-proxy-mode", "userspace"], "possible values: ipvs, iptables, nftables, ebpf"),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (code, out) = allot(&args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: want {want:?} in {out}");
    }
    let (code, out) = allot(&["migrate", "apply", "--to", "cilium:1.16"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--new-pod-cidr <CIDR>"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn status_and_rollback_without_a_cluster_say_so() {
    for cmd in ["status", "rollback"] {
        let (code, out) = allot(&["migrate", cmd]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("error: connecting to the cluster"), "{cmd}: {out}");
    }
}
