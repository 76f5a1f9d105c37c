//! deploy/ agrees with the code: the committed CRDs are `allot crds` output, the commands the
//! manifests run parse with this `allot`, and the host paths they mount are the ones the agent
//! and the plugin use. (The Kubernetes-side validation of deploy/ is scripts/check-manifests.sh.)

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn allot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_allot"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_crds_match_allot_crds() {
    let out = allot().arg("crds").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let path = repo().join("deploy/crds/allot.dev.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        printed == committed,
        "deploy/crds/allot.dev.yaml differs from `allot crds`: regenerate it with\n  cargo run -p allot -- crds > deploy/crds/allot.dev.yaml\n(first differing line: {:?})",
        printed.lines().zip(committed.lines()).find(|(a, b)| a != b)
    );
    for kind in ["IPPool", "IPBlock", "AllotNode"] {
        assert!(printed.contains(&format!("kind: {kind}\n")), "{kind} missing");
    }
}

/// Runs `allot ARGS --help`: clap reads the arguments in order and prints help only if every
/// one before `--help` is known and well-formed.
fn assert_args_parse(what: &str, args: &[String]) {
    // Kubernetes substitutes $(VAR) from env; stand in values of the right shape.
    let kept: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-1").replace("$(NODE_IP)", "10.0.0.11").replace("$(POD_NAME)", "allot-operator-x"))
        .collect();
    let out = allot().args(&kept).arg("--help").output().unwrap();
    assert!(out.status.success(), "{what}: `allot {}` does not parse: {}", kept.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn container<'a>(obj: &'a Value, list: &str, name: &str) -> &'a Value {
    obj["spec"]["template"]["spec"][list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn manifest_commands_parse_with_this_allot() {
    let ds = yaml("deploy/base/agent/daemonset.yaml");
    let dep = yaml("deploy/base/operator/deployment.yaml");
    let comp = yaml("deploy/components/conflist/kustomization.yaml");
    let comp_patch: Value = serde_saphyr::from_str(comp["patches"][0]["patch"].as_str().unwrap()).unwrap();
    let kkp_webhook = yaml("deploy/webhook/deployment.yaml");
    let ippool_webhook = yaml("deploy/ippool-webhook/deployment.yaml");
    for (what, obj, list, name) in [
        ("agent", &ds, "containers", "agent"),
        ("install-cni (chained)", &ds, "initContainers", "install-cni"),
        ("install-cni (conflist)", &comp_patch, "initContainers", "install-cni"),
        ("operator", &dep, "containers", "operator"),
        ("webhook (KKP)", &kkp_webhook, "containers", "webhook"),
        ("webhook (IPPool)", &ippool_webhook, "containers", "webhook"),
    ] {
        let c = container(obj, list, name);
        if c.get("command").is_some() {
            assert_eq!(strings(&c["command"]), ["/usr/local/bin/allot"], "{what}: the image's allot");
        }
        assert_args_parse(what, &strings(&c["args"]));
    }
    // A made-up flag is caught: the check can fail.
    let out = allot().args(["agent", "--no-such-flag", "--help"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn probes_hit_the_metrics_addr_and_mounts_are_the_agents_paths() {
    let ds = yaml("deploy/base/agent/daemonset.yaml");
    let dep = yaml("deploy/base/operator/deployment.yaml");
    for (obj, name) in [(&ds, "agent"), (&dep, "operator")] {
        let c = container(obj, "containers", name);
        let addr = strings(&c["args"]).iter().find_map(|a| a.strip_prefix("--metrics-addr=").map(String::from)).expect("--metrics-addr");
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name} {probe}");
            assert_eq!(get["port"].as_u64(), Some(addr.port() as u64), "{name} {probe} port");
            assert_eq!(get["host"].as_str(), Some(addr.ip().to_string().as_str()), "{name} {probe}: hostNetwork, probe the bound IP");
        }
    }
    // The agent's socket directory and data dir are host paths, so the plugin (on the host) finds
    // the socket and allocations survive the pod.
    let c = container(&ds, "containers", "agent");
    let mounts: Vec<&str> = c["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    let socket_dir = Path::new(allot_client::DEFAULT_SOCKET).parent().unwrap().to_str().unwrap();
    for want in [socket_dir, allot_agent::config::DEFAULT_DATA_DIR] {
        assert!(mounts.contains(&want), "agent mounts {mounts:?}, not {want}");
        let vol = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == want).unwrap()["name"].clone();
        let host = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == vol).unwrap();
        assert_eq!(host["hostPath"]["path"], want, "{want} is the same path on the host");
    }
}

/// Each webhook configuration calls a route its Deployment's `allot webhook` serves (the IPPool
/// route only with --ippools), on the port it listens on, and the probes ask it over HTTPS.
#[cfg(feature = "webhook")]
#[test]
fn webhook_configurations_call_routes_their_deployment_serves() {
    for dir in ["deploy/webhook", "deploy/ippool-webhook"] {
        let vwc = yaml(&format!("{dir}/validatingwebhookconfiguration.yaml"));
        let dep = yaml(&format!("{dir}/deployment.yaml"));
        let c = container(&dep, "containers", "webhook");
        let args = strings(&c["args"]);
        let listen: std::net::SocketAddr = args.iter().find_map(|a| a.strip_prefix("--listen=")).expect("--listen").parse().unwrap();
        let port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "https").expect("a port named https");
        assert_eq!(port["containerPort"].as_u64(), Some(listen.port() as u64), "{dir}: containerPort https is --listen's");
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &c[probe]["httpGet"];
            assert!(get["port"] == "https" && get["scheme"] == "HTTPS", "{dir} {probe}: {get}");
            assert!(["/readyz", "/healthz"].contains(&get["path"].as_str().unwrap()), "{dir} {probe}: a path the server answers");
        }
        let hooks = vwc["webhooks"].as_array().unwrap();
        assert!(!hooks.is_empty(), "{dir}: no webhooks");
        for hook in hooks {
            let path = hook["clientConfig"]["service"]["path"].as_str().unwrap();
            match path {
                allot_webhook::kkp::PATH => {}
                allot_webhook::ippool::PATH => assert!(args.iter().any(|a| a == "--ippools"), "{dir}: {path} is served only with --ippools"),
                other => panic!("{dir}: allot webhook serves no {other}"),
            }
        }
    }
}
