//! KKP's Cluster rules through the binary: `allot webhook` as a process over real TLS
//! (certificates from `openssl`, requests from `curl --cacert`), with AdmissionReview v1 bodies
//! shaped as the apiserver sends them; and `allot kkp validate` on files.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use allot_testkit::{Certs, make_certs};
use serde_json::{Value, json};

fn allot() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_allot"))
}

/// `allot webhook` on 127.0.0.1 (a port of its own), stopped by pid on drop.
struct Webhook {
    child: Child,
    addr: String,
    certs: Certs,
}

impl Webhook {
    fn start(extra: &[&str]) -> Webhook {
        let certs = make_certs();
        let mut args: Vec<String> = vec!["webhook".into(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(["--tls-cert".into(), certs.server_cert.display().to_string()]);
        args.extend(["--tls-key".into(), certs.server_key.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Webhook::start_args(&args, certs)
    }

    fn start_args(args: &[String], certs: Certs) -> Webhook {
        let mut child = Command::new(allot())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The log line names the bound address; keep draining stderr so the child never blocks.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("webhook: {line}");
                if let Some(rest) = line.split("addr=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("allot webhook did not report its address");
        Webhook { child, addr, certs }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// One HTTPS request with curl trusting the test CA: (status, body).
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>, headers: &[&str]) -> (u16, String) {
        self.request_with_ca(&self.certs.ca, method, path, body, headers).expect("curl failed")
    }

    fn request_with_ca(&self, ca: &Path, method: &str, path: &str, body: Option<&[u8]>, headers: &[&str]) -> Result<(u16, String), String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert"]).arg(ca).args(["-X", method, "-o", "-", "-w", "\n%{http_code}"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        if body.is_some() {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", "@-"]);
        }
        cmd.arg(self.url(path)).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("curl is installed (scripts/lib.sh ensure_packages)");
        let mut stdin = child.stdin.take().unwrap();
        let data = body.map(|b| b.to_vec()).unwrap_or_default();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        Ok((code.parse().unwrap(), body.to_string()))
    }

    /// POSTs an AdmissionReview to the KKP path and returns its `response`.
    fn admit(&self, review: &Value) -> Value {
        let (status, body) = self.request("POST", "/validate/kkp-cluster", Some(review.to_string().as_bytes()), &[]);
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"], "the answer carries the request's uid");
        answer["response"].clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Cluster as the apiserver holds it; `net` is merged into `spec.clusterNetwork` (null removes).
fn cluster(cni: Option<(&str, &str)>, labels: &[&str], net: Value) -> Value {
    let mut network = json!({
        "ipFamily": "IPv4",
        "pods": {"cidrBlocks": ["172.25.0.0/16"]},
        "services": {"cidrBlocks": ["10.240.16.0/20"]},
        "nodeCidrMaskSizeIPv4": 24,
        "dnsDomain": "cluster.local",
        "proxyMode": "ipvs",
        "ipvs": {"strictArp": true},
        "nodeLocalDNSCacheEnabled": true,
        "konnectivityEnabled": true,
    });
    for (k, v) in net.as_object().unwrap() {
        if v.is_null() {
            network.as_object_mut().unwrap().remove(k);
        } else {
            network[k] = v.clone();
        }
    }
    let mut l = serde_json::Map::new();
    l.insert("project-id".into(), json!("p7x"));
    for label in labels {
        l.insert(label.to_string(), json!("true"));
    }
    let mut spec = json!({
        "humanReadableName": "prod",
        "version": "1.32.4",
        "cloud": {"dc": "hetzner-fsn1", "providerName": "hetzner", "hetzner": {"network": "kubermatic"}},
        "exposeStrategy": "Tunneling",
        "clusterNetwork": network,
    });
    if let Some((t, v)) = cni {
        spec["cniPlugin"] = json!({"type": t, "version": v});
    }
    json!({
        "apiVersion": "kubermatic.k8c.io/v1",
        "kind": "Cluster",
        "metadata": {
            "name": "xyz123",
            "uid": "3f1b2c4d-0000-4000-8000-000000000001",
            "resourceVersion": "81234",
            "generation": 7,
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": l,
            "finalizers": ["kubermatic.k8c.io/cleanup-credentials-secrets"],
        },
        "spec": spec,
        "status": {"phase": "Running", "namespaceName": "cluster-xyz123"},
    })
}

/// An AdmissionReview v1 as kube-apiserver sends it for a Cluster.
fn review(uid: &str, operation: &str, object: Option<Value>, old: Option<Value>) -> Value {
    let gvk = json!({"group": "kubermatic.k8c.io", "version": "v1", "kind": "Cluster"});
    let gvr = json!({"group": "kubermatic.k8c.io", "version": "v1", "resource": "clusters"});
    let options = match operation {
        "CREATE" => json!({"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}),
        "UPDATE" => json!({"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}),
        _ => json!({"apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions"}),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": "xyz123",
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters", "system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": false,
            "options": options,
        }
    })
}

const MIG: &str = "unsafe-cni-migration";
const UPG: &str = "unsafe-cni-upgrade";

struct Case {
    name: &'static str,
    old: Option<Value>,
    new: Value,
    /// None: allowed; Some((rule, words)): denied naming the rule and these words.
    denied: Option<(&'static str, &'static [&'static str])>,
}

fn cases() -> Vec<Case> {
    let n = || json!({});
    let canal = |v| Some(("canal", v));
    let cilium = |v| Some(("cilium", v));
    vec![
        // CNI type change
        Case { name: "type change without label", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(cilium("1.16"), &[], n()), denied: Some(("cni-type-change", &[MIG])) },
        Case { name: "type change with label", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(cilium("1.16"), &[MIG], n()), denied: None },
        // version
        Case { name: "two minors without label", old: Some(cluster(cilium("1.14"), &[], n())), new: cluster(cilium("1.16"), &[], n()), denied: Some(("cni-version-change", &[UPG])) },
        Case { name: "two minors with label", old: Some(cluster(cilium("1.14"), &[], n())), new: cluster(cilium("1.16"), &[UPG], n()), denied: None },
        Case { name: "major without label", old: Some(cluster(cilium("v1.16.3"), &[], n())), new: cluster(cilium("v2.0.0"), &[], n()), denied: Some(("cni-version-change", &[UPG])) },
        Case { name: "one minor", old: Some(cluster(cilium("1.15.2"), &[], n())), new: cluster(cilium("1.16.3"), &[], n()), denied: None },
        Case { name: "patch", old: Some(cluster(canal("v3.28.1"), &[], n())), new: cluster(canal("v3.28.2"), &[], n()), denied: None },
        Case { name: "unparsable version", old: Some(cluster(cilium("1.16"), &[], n())), new: cluster(cilium("1.sixteen"), &[], n()), denied: Some(("cni-version-invalid", &["1.sixteen"])) },
        // unset
        Case { name: "CNI unset", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(None, &[MIG, UPG], n()), denied: Some(("cni-plugin-removed", &["cannot be removed"])) },
        Case { name: "CNI set on an old cluster", old: Some(cluster(None, &[], n())), new: cluster(canal("v3.28"), &[], n()), denied: None },
        // proxyMode values
        Case { name: "create with iptables", old: None, new: cluster(canal("v3.28"), &[], json!({"proxyMode": "iptables"})), denied: None },
        Case { name: "create with an unknown proxyMode", old: None, new: cluster(canal("v3.28"), &[], json!({"proxyMode": "userspace"})), denied: Some(("proxy-mode-invalid", &["userspace"])) },
        Case { name: "update to an unknown proxyMode", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[MIG], json!({"proxyMode": "kernelspace"})), denied: Some(("proxy-mode-invalid", &["kernelspace"])) },
        // ebpf
        Case { name: "ebpf on canal", old: None, new: cluster(canal("v3.28"), &[], json!({"proxyMode": "ebpf"})), denied: Some(("proxy-mode-ebpf-cni", &["canal"])) },
        Case { name: "ebpf without CNI", old: None, new: cluster(None, &[], json!({"proxyMode": "ebpf"})), denied: Some(("proxy-mode-ebpf-cni", &["unset"])) },
        Case { name: "ebpf without konnectivity", old: None, new: cluster(cilium("1.16"), &[], json!({"proxyMode": "ebpf", "konnectivityEnabled": false})), denied: Some(("proxy-mode-ebpf-konnectivity", &["konnectivityEnabled: true"])) },
        Case { name: "ebpf on cilium with konnectivity", old: None, new: cluster(cilium("1.16"), &[], json!({"proxyMode": "ebpf"})), denied: None },
        // proxyMode change
        Case { name: "proxyMode change without label", old: Some(cluster(cilium("1.16"), &[], n())), new: cluster(cilium("1.16"), &[], json!({"proxyMode": "iptables"})), denied: Some(("proxy-mode-change", &[MIG])) },
        Case { name: "proxyMode change with label", old: Some(cluster(cilium("1.16"), &[], n())), new: cluster(cilium("1.16"), &[MIG], json!({"proxyMode": "ebpf"})), denied: None },
        // immutable fields
        Case { name: "ipFamily", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], json!({"ipFamily": "IPv4+IPv6"})), denied: Some(("ip-family-immutable", &["immutable"])) },
        Case { name: "pods cidrBlocks", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], json!({"pods": {"cidrBlocks": ["172.26.0.0/16"]}})), denied: Some(("pods-cidr-immutable", &["172.26.0.0/16"])) },
        Case { name: "services cidrBlocks", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], json!({"services": {"cidrBlocks": ["10.241.0.0/20"]}})), denied: Some(("services-cidr-immutable", &["10.241.0.0/20"])) },
        Case { name: "dnsDomain", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], json!({"dnsDomain": "corp.local"})), denied: Some(("dns-domain-immutable", &["corp.local"])) },
        Case { name: "nodeLocalDNSCacheEnabled", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], json!({"nodeLocalDNSCacheEnabled": false})), denied: Some(("node-local-dns-cache-immutable", &["nodeLocalDNSCacheEnabled"])) },
        Case { name: "unchanged network fields", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[], n()), denied: None },
        Case { name: "network fields set for the first time", old: Some(cluster(canal("v3.28"), &[], json!({"ipFamily": null, "dnsDomain": null, "nodeLocalDNSCacheEnabled": null, "pods": {"cidrBlocks": null}}))), new: cluster(canal("v3.28"), &[], n()), denied: None },
        // Konnectivity
        Case { name: "konnectivity off", old: Some(cluster(canal("v3.28"), &[], n())), new: cluster(canal("v3.28"), &[MIG], json!({"konnectivityEnabled": false})), denied: Some(("konnectivity-disable", &["konnectivityEnabled"])) },
        Case { name: "konnectivity on", old: Some(cluster(canal("v3.28"), &[], json!({"konnectivityEnabled": false}))), new: cluster(canal("v3.28"), &[], n()), denied: None },
    ]
}

#[test]
fn webhook_over_tls_every_rule() {
    let hook = Webhook::start(&[]);
    let mut failures = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let uid = format!("7d3f0b1e-1111-4222-8333-{i:012}");
        let op = if case.old.is_some() { "UPDATE" } else { "CREATE" };
        let resp = hook.admit(&review(&uid, op, Some(case.new), case.old));
        match (case.denied, resp["allowed"].as_bool()) {
            (None, Some(true)) => {}
            (Some((rule, words)), Some(false)) => {
                let msg = resp["status"]["message"].as_str().unwrap_or_default();
                if resp["status"]["code"] != 403 {
                    failures.push(format!("{}: code {}", case.name, resp["status"]["code"]));
                }
                for w in std::iter::once(&rule).chain(words) {
                    if !msg.contains(w) {
                        failures.push(format!("{}: message lacks {w:?}: {msg}", case.name));
                    }
                }
            }
            (want, _) => failures.push(format!("{}: want denied={:?}, got {resp}", case.name, want.map(|w| w.0))),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn webhook_lists_every_reason_in_one_denial() {
    let hook = Webhook::start(&[]);
    let old = cluster(Some(("canal", "v3.28")), &[], json!({}));
    let new = cluster(Some(("cilium", "1.16")), &[], json!({"proxyMode": "ebpf", "dnsDomain": "corp.local"}));
    let resp = hook.admit(&review("aa-1", "UPDATE", Some(new), Some(old)));
    assert_eq!(resp["allowed"], false);
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(msg.contains("(3 reasons)"), "{msg}");
    for rule in ["[cni-type-change]", "[proxy-mode-change]", "[dns-domain-immutable]"] {
        assert!(msg.contains(rule), "{rule} missing: {msg}");
    }
}

#[test]
fn webhook_other_operations_and_kinds() {
    let hook = Webhook::start(&[]);
    // DELETE carries only oldObject: nothing to check.
    let resp = hook.admit(&review("del-1", "DELETE", None, Some(cluster(Some(("canal", "v3.28")), &[], json!({})))));
    assert_eq!(resp["allowed"], true, "{resp}");

    // A Pod sent to the Cluster path is refused with a message about the configuration.
    let mut r = review("pod-1", "CREATE", Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})), None);
    r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
    r["request"]["resource"] = json!({"group": "", "version": "v1", "resource": "pods"});
    let resp = hook.admit(&r);
    assert_eq!(resp["allowed"], false);
    assert_eq!(resp["status"]["code"], 400);
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(msg.contains("Cluster objects only") && msg.contains("/v1 Pod") && msg.contains("ValidatingWebhookConfiguration"), "{msg}");

    // An UPDATE without oldObject cannot be judged.
    let resp = hook.admit(&review("upd-1", "UPDATE", Some(cluster(None, &[], json!({}))), None));
    assert_eq!(resp["allowed"], false);
    assert!(resp["status"]["message"].as_str().unwrap().contains("without oldObject"), "{resp}");

    // A Cluster object that is not a Cluster's shape.
    let mut bad = cluster(None, &[], json!({}));
    bad["spec"]["cniPlugin"] = json!("canal");
    let resp = hook.admit(&review("bad-1", "CREATE", Some(bad), None));
    assert_eq!(resp["allowed"], false);
    assert!(resp["status"]["message"].as_str().unwrap().starts_with("object: not a Kubermatic Cluster"), "{resp}");
}

#[test]
fn webhook_http_errors() {
    let hook = Webhook::start(&[]);
    let ok = review("u1", "CREATE", Some(cluster(None, &[], json!({}))), None);

    let (s, b) = hook.request("GET", "/healthz", None, &[]);
    assert_eq!((s, b.trim()), (200, "ok"));

    for (body, words) in [
        (b"{not json".to_vec(), "not JSON"),
        (b"[]".to_vec(), "expected an AdmissionReview"),
        (json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": ok["request"]}).to_string().into_bytes(), "admissionReviewVersions: [v1]"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": ok["request"]}).to_string().into_bytes(), "got apiVersion \"admission.k8s.io/v1\" kind \"Pod\""),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string().into_bytes(), "has no request"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": null}).to_string().into_bytes(), "has no request"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"operation": "CREATE"}}).to_string().into_bytes(), "request is malformed"),
        (Vec::new(), "not JSON"),
    ] {
        let (s, b) = hook.request("POST", "/validate/kkp-cluster", Some(&body), &[]);
        assert_eq!(s, 400, "{}: {b}", String::from_utf8_lossy(&body));
        assert!(b.contains(words), "{} -> {b}", String::from_utf8_lossy(&body));
    }

    for method in ["GET", "PUT", "DELETE"] {
        let (s, b) = hook.request(method, "/validate/kkp-cluster", None, &[]);
        assert_eq!(s, 405, "{method}: {b}");
        assert!(b.contains("answers POST"), "{b}");
    }
    let (s, _) = hook.request("POST", "/healthz", Some(b"{}"), &[]);
    assert_eq!(s, 405);

    let (s, b) = hook.request("POST", "/validate/pods", Some(ok.to_string().as_bytes()), &[]);
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("/validate/kkp-cluster"), "404 names the paths served: {b}");
    let (s, _) = hook.request("GET", "/", None, &[]);
    assert_eq!(s, 404);

    // After all that, a good review still gets its answer on the same server.
    assert_eq!(hook.admit(&ok)["allowed"], true);
}

/// The apiserver's own limit is 3 MiB: a review of exactly that size is read, one byte more is
/// refused with 413, whether its length is declared or it comes chunked.
#[test]
fn webhook_body_limit() {
    let hook = Webhook::start(&[]);
    const LIMIT: usize = 3 * 1024 * 1024;
    let sized = |n: usize| {
        let mut c = cluster(Some(("canal", "v3.28")), &[], json!({}));
        c["metadata"]["annotations"] = json!({"pad": ""});
        let base = review("big-1", "CREATE", Some(c.clone()), None).to_string().len();
        c["metadata"]["annotations"]["pad"] = json!("x".repeat(n - base));
        let body = review("big-1", "CREATE", Some(c), None).to_string();
        assert_eq!(body.len(), n);
        body
    };
    let (s, b) = hook.request("POST", "/validate/kkp-cluster", Some(sized(LIMIT).as_bytes()), &[]);
    assert_eq!(s, 200, "{}", &b[..b.len().min(300)]);
    assert_eq!(serde_json::from_str::<Value>(&b).unwrap()["response"]["allowed"], true);

    let (s, b) = hook.request("POST", "/validate/kkp-cluster", Some(sized(LIMIT + 1).as_bytes()), &[]);
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("larger than 3145728 bytes"), "{b}");

    let (s, b) = hook.request("POST", "/validate/kkp-cluster", Some(sized(LIMIT + 1).as_bytes()), &["Transfer-Encoding: chunked"]);
    assert_eq!(s, 413, "chunked: {b}");

    // A smaller limit from the flag.
    let small = Webhook::start(&["--max-body", "4096"]);
    let (s, _) = small.request("POST", "/validate/kkp-cluster", Some(sized(4097).as_bytes()), &[]);
    assert_eq!(s, 413);
    let (s, _) = small.request("POST", "/validate/kkp-cluster", Some(sized(4096).as_bytes()), &[]);
    assert_eq!(s, 200);
}

/// An `openssl s_client` that sends `data` and keeps its side open; returns what the server
/// sent and how long until the server closed.
fn slow_client(hook: &Webhook, data: &[u8], wait: Duration) -> (String, Duration) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &hook.addr, "-CAfile"])
        .arg(&hook.certs.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(data).unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(wait);
    let took = start.elapsed();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let out = out.unwrap_or_else(|_| panic!("the server kept a slow client for more than {wait:?}"));
    (String::from_utf8_lossy(&out).into_owned(), took)
}

#[test]
fn webhook_timeouts_for_slow_clients() {
    let hook = Webhook::start(&["--read-timeout", "1s"]);
    // No TLS handshake at all: the server hangs up.
    let mut tcp = TcpStream::connect(&hook.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let start = Instant::now();
    let n = tcp.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "the server sent bytes to a client that never said hello");
    assert!(start.elapsed() < Duration::from_secs(6), "handshake timeout took {:?}", start.elapsed());

    // A request head that never ends: the connection is closed.
    let (_, took) = slow_client(&hook, b"POST /validate/kkp-cluster HTTP/1.1\r\nHost: x\r\n", Duration::from_secs(8));
    assert!(took < Duration::from_secs(6), "head timeout took {took:?}");

    // A body that never arrives: 408.
    let (out, took) = slow_client(
        &hook,
        b"POST /validate/kkp-cluster HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"apiVer",
        Duration::from_secs(8),
    );
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("did not arrive within 1s"), "{out}");
    assert!(took < Duration::from_secs(6), "body timeout took {took:?}");

    // The server still serves.
    let (s, _) = hook.request("GET", "/healthz", None, &[]);
    assert_eq!(s, 200);
}

/// cert-manager renews the Secret in place: the next handshake uses the new certificate.
#[test]
fn webhook_reloads_a_renewed_certificate() {
    let hook = Webhook::start(&[]);
    let (s, _) = hook.request("GET", "/healthz", None, &[]);
    assert_eq!(s, 200);
    let renewed = make_certs();
    // mtime has a granularity; make sure it moves.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(&renewed.server_key, &hook.certs.server_key).unwrap();
    std::fs::copy(&renewed.server_cert, &hook.certs.server_cert).unwrap();
    let start = Instant::now();
    loop {
        match hook.request_with_ca(&renewed.ca, "GET", "/healthz", None, &[]) {
            Ok((200, _)) => break,
            r => assert!(start.elapsed() < Duration::from_secs(10), "the renewed certificate is not served: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old CA no longer verifies the server.
    assert!(hook.request_with_ca(&hook.certs.ca, "GET", "/healthz", None, &[]).is_err());
}

#[test]
fn webhook_refuses_to_start_with_bad_certificates() {
    let certs = make_certs();
    let run = |cert: &Path, key: &Path| {
        Command::new(allot()).args(["webhook", "--listen", "127.0.0.1:0", "--tls-cert"]).arg(cert).arg("--tls-key").arg(key).output().unwrap()
    };
    let out = run(&certs.dir.path().join("missing.pem"), &certs.server_key);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.pem") && err.contains("loading the TLS certificate"), "{err}");

    // A key that is not the certificate's.
    let out = run(&certs.server_cert, &certs.client_key);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.key") && err.contains("is it the key of"), "{err}");
}

// ---- allot kkp validate ----

fn validate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(allot())
        .args(["kkp", "validate"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        i.write_all(s.as_bytes()).unwrap();
    }
    drop(i);
    child.wait_with_output().unwrap()
}

fn write_yaml(dir: &Path, name: &str, v: &Value) -> String {
    // The YAML kubectl prints; JSON is read as well (tested below).
    let p = dir.join(name);
    let text: String = serde_saphyr::to_string(v).unwrap();
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn kkp_validate_exit_codes_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let canal = write_yaml(d, "canal.yaml", &cluster(Some(("canal", "v3.28")), &[], json!({})));
    let cilium = write_yaml(d, "cilium.yaml", &cluster(Some(("cilium", "1.16")), &[], json!({"proxyMode": "ebpf"})));
    let cilium_labelled = write_yaml(d, "cilium-mig.yaml", &cluster(Some(("cilium", "1.16")), &[MIG], json!({"proxyMode": "ebpf"})));

    // Create: allowed.
    let out = validate(&["--new", &canal], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "allowed\n");

    // Update canal -> cilium with ebpf, no label: two reasons, each with its rule and label.
    let out = validate(&["--old", &canal, "--new", &cilium], None);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("denied (2 reasons):\n"), "{text}");
    assert!(text.contains("  cni-type-change: ") && text.contains("  proxy-mode-change: "), "{text}");
    assert_eq!(text.matches(MIG).count(), 4, "each reason names the label (and how to add it): {text}");

    // With the label: allowed.
    let out = validate(&["--old", &canal, "--new", &cilium_labelled], None);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));

    // -o json.
    let out = validate(&["--old", &canal, "--new", &cilium, "-o", "json"], None);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    let rules: Vec<&str> = v["denials"].as_array().unwrap().iter().map(|d| d["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, ["cni-type-change", "proxy-mode-change"]);
    assert!(v["denials"][0]["message"].as_str().unwrap().contains(MIG));
    let out = validate(&["--new", &canal, "-o", "json"], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"allowed": true, "denials": []}));

    // JSON input and standard input.
    let json_new = d.join("new.json");
    std::fs::write(&json_new, cluster(Some(("canal", "v3.30")), &[], json!({})).to_string()).unwrap();
    let out = validate(&["--old", &canal, "--new", json_new.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1), "3.28 -> 3.30 needs the upgrade label");
    assert!(String::from_utf8_lossy(&out.stdout).contains(UPG));
    let out = validate(&["--old", &canal, "--new", "-"], Some(&std::fs::read_to_string(&cilium_labelled).unwrap()));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn kkp_validate_bad_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write_yaml(d, "good.yaml", &cluster(Some(("canal", "v3.28")), &[], json!({})));
    let pod = d.join("pod.yaml");
    std::fs::write(&pod, "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap();
    let broken = d.join("broken.yaml");
    std::fs::write(&broken, "apiVersion: kubermatic.k8c.io/v1\nkind: Cluster\nspec: {cniPlugin: [\n").unwrap();
    let missing = d.join("missing.yaml");

    for (args, words) in [
        (vec!["--new", missing.to_str().unwrap()], vec!["missing.yaml", "No such file"]),
        (vec!["--old", missing.to_str().unwrap(), "--new", &good], vec!["missing.yaml"]),
        (vec!["--new", pod.to_str().unwrap()], vec!["pod.yaml", "expected apiVersion kubermatic.k8c.io/v1", "\"Pod\""]),
        (vec!["--old", &good, "--new", broken.to_str().unwrap()], vec!["broken.yaml", "not a Kubermatic Cluster"]),
    ] {
        let out = validate(&args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "nothing on stdout for bad input");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
    }
    // A missing --new is a usage error (clap's exit 2).
    let out = validate(&[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--new"));
}

// ---- deploy/webhook ----

fn manifest(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/webhook").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The manifests agree with the server: the path it serves, the port it listens on, the files
/// it reads, the probe it answers; and the binary starts with the Deployment's own arguments.
#[test]
fn webhook_manifests_match_the_server() {
    let kust = manifest("kustomization.yaml");
    let ns = kust["namespace"].as_str().unwrap();
    let vwc = manifest("validatingwebhookconfiguration.yaml");
    let svc = manifest("service.yaml");
    let deploy = manifest("deployment.yaml");
    let sa = manifest("serviceaccount.yaml");
    let resources: Vec<&str> = kust["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for f in ["serviceaccount.yaml", "deployment.yaml", "service.yaml", "validatingwebhookconfiguration.yaml"] {
        assert!(resources.contains(&f), "{f} not in the kustomization");
    }

    let hook = &vwc["webhooks"][0];
    assert_eq!(vwc["webhooks"].as_array().unwrap().len(), 1);
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 30, "the apiserver allows at most 30 s");
    let rule = &hook["rules"][0];
    assert_eq!(rule["apiGroups"], json!(["kubermatic.k8c.io"]));
    assert_eq!(rule["apiVersions"], json!(["v1"]));
    assert_eq!(rule["resources"], json!(["clusters"]));
    assert_eq!(rule["operations"], json!(["CREATE", "UPDATE"]));
    let client = &hook["clientConfig"]["service"];
    assert_eq!(client["path"], "/validate/kkp-cluster");
    assert_eq!(client["name"], svc["metadata"]["name"]);
    assert_eq!(client["namespace"], ns);
    assert_eq!(client["port"], svc["spec"]["ports"][0]["port"]);
    let inject = vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str().unwrap();
    assert_eq!(inject, format!("{ns}/allot-webhook"));

    assert_eq!(sa["automountServiceAccountToken"], false, "the webhook needs no API token");
    let spec = &deploy["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    let c = &pod["containers"][0];
    let port = &c["ports"][0];
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], port["name"]);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz");
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS");
    }
    let args: Vec<String> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let flag = |name: &str| args.iter().find_map(|a| a.strip_prefix(&format!("--{name}="))).unwrap_or_else(|| panic!("no --{name} in {args:?}")).to_string();
    assert!(flag("listen").ends_with(&format!(":{}", port["containerPort"])), "listens where the container port is");
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(flag("tls-cert").starts_with(mount) && flag("tls-key").starts_with(mount));
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "allot-webhook-tls");

    // The Deployment's arguments, with the test's certificate files and a free loopback port.
    let certs = make_certs();
    let mut test_args = args.clone();
    for a in test_args.iter_mut() {
        if a.starts_with("--listen=") {
            *a = "--listen=127.0.0.1:0".into();
        } else if a.starts_with("--tls-cert=") {
            *a = format!("--tls-cert={}", certs.server_cert.display());
        } else if a.starts_with("--tls-key=") {
            *a = format!("--tls-key={}", certs.server_key.display());
        }
    }
    let hook = Webhook::start_args(&test_args, certs);
    let (s, _) = hook.request("GET", c["readinessProbe"]["httpGet"]["path"].as_str().unwrap(), None, &[]);
    assert_eq!(s, 200);
    let r = review("m-1", "CREATE", Some(cluster(Some(("canal", "v3.28")), &[], json!({"proxyMode": "ebpf"}))), None);
    let (s, b) = hook.request("POST", client["path"].as_str().unwrap(), Some(r.to_string().as_bytes()), &[]);
    assert_eq!(s, 200);
    assert!(b.contains("proxy-mode-ebpf-cni"), "{b}");
}
