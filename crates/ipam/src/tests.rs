use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use allot_wire::ErrorKind;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn run_with(vars: &HashMap<String, String>, stdin: &str) -> (Value, i32) {
    let (out, code) = run(&|k| vars.get(k).cloned(), stdin.as_bytes());
    (serde_json::from_str(&out).unwrap_or(Value::Null), code)
}

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"net1","type":"bridge","ipam":{"type":"allot-ipam","socket":"/nonexistent/allot.sock"}}"#;

fn add_env() -> HashMap<String, String> {
    env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc123"), ("CNI_NETNS", "/var/run/netns/x"), ("CNI_IFNAME", "eth0")])
}

#[test]
fn version_answers_whatever_stdin_holds() {
    let vars = env(&[("CNI_COMMAND", "VERSION")]);
    for stdin in ["", "garbage", r#"{"cniVersion":"0.4.0"}"#, r#"{"cniVersion":"9.9.9"}"#] {
        let (v, code) = run_with(&vars, stdin);
        assert_eq!(code, 0);
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }
    assert_eq!(run_with(&vars, r#"{"cniVersion":"0.4.0"}"#).0["cniVersion"], "0.4.0");
}

#[test]
fn error_codes_for_bad_input() {
    let cases: Vec<(HashMap<String, String>, &str, u32)> = vec![
        (env(&[]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "FROB")]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "-bad"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "a/b")]), CONF, code::INVALID_ENV),
        (env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "sixteen-chars-xx")]), CONF, code::INVALID_ENV),
        ({ let mut e = add_env(); e.insert("CNI_ARGS".into(), "IgnoreUnknown=1;broken".into()); e }, CONF, code::INVALID_ENV),
        ({ let mut e = add_env(); e.insert("CNI_ARGS".into(), "IgnoreUnknown=1;K8S_POD_NAME=a=b".into()); e }, CONF, code::INVALID_ENV),
        (add_env(), "", code::DECODE),
        (add_env(), "{not json", code::DECODE),
        (add_env(), "[1,2]", code::DECODE),
        (add_env(), r#"{"cniVersion":"0.2.0","name":"n","ipam":{}}"#, code::INCOMPATIBLE_VERSION),
        (add_env(), r#"{"name":"n","ipam":{}}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","ipam":{}}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","name":"bad name","ipam":{}}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","name":"n"}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","name":"n","ipam":{"pool":"Bad_Pool"}}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","name":"n","ipam":{"pool":7}}"#, code::INVALID_CONFIG),
        (add_env(), r#"{"cniVersion":"1.0.0","name":"n","ipam":{},"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":1}}}"#, code::INVALID_CONFIG),
        (env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]), r#"{"cniVersion":"0.3.1","name":"n","ipam":{}}"#, code::INCOMPATIBLE_VERSION),
        (env(&[("CNI_COMMAND", "GC")]), r#"{"cniVersion":"1.0.0","name":"n","ipam":{}}"#, code::INCOMPATIBLE_VERSION),
        (env(&[("CNI_COMMAND", "GC")]), r#"{"cniVersion":"1.1.0","name":"n","ipam":{}}"#, code::INVALID_CONFIG),
        // The agent is not running: try again later, naming the socket.
        (add_env(), CONF, code::TRY_AGAIN),
        (env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]), CONF, code::TRY_AGAIN),
        (env(&[("CNI_COMMAND", "STATUS")]), r#"{"cniVersion":"1.1.0","name":"n","ipam":{"socket":"/nonexistent/allot.sock"}}"#, code::NOT_AVAILABLE),
    ];
    for (i, (vars, stdin, want)) in cases.into_iter().enumerate() {
        let (v, exit) = run_with(&vars, stdin);
        assert_eq!(exit, 1, "case {i}: exit code");
        assert_eq!(v["code"], json!(want), "case {i}: {v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "case {i}: no message");
        assert!(v["cniVersion"].is_string(), "case {i}: no cniVersion");
    }
}

#[test]
fn unreachable_agent_names_the_socket() {
    let (v, _) = run_with(&add_env(), CONF);
    assert!(v["msg"].as_str().unwrap().contains("/nonexistent/allot.sock"), "{v}");
}

#[test]
fn cni_args_as_runtimes_send_them() {
    let vars = env(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/p"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234-5678"),
    ]);
    let inv = parse(&|k| vars.get(k).cloned(), CONF.as_bytes()).unwrap();
    assert_eq!(inv.env.pod_namespace.as_deref(), Some("team-a"));
    assert_eq!(inv.env.pod_name.as_deref(), Some("web-0"));
}

#[test]
fn whole_main_plugin_config_with_runtime_config_is_read() {
    let conf = r#"{
        "cniVersion": "1.1.0", "name": "podnet", "type": "bridge", "bridge": "cni0", "isGateway": true,
        "ipam": {"type": "allot-ipam", "pool": "blue"},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"ipam.cilium.io/ip-pool": "green"}, "portMappings": []},
        "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
        "cni.dev/attachments": [{"containerID": "b", "ifname": "net1"}]
    }"#;
    let c = parse_config(conf.as_bytes()).unwrap();
    assert_eq!(c.pool.as_deref(), Some("blue"));
    assert_eq!(c.annotations["ipam.cilium.io/ip-pool"], "green");
    assert_eq!(c.valid_attachments.unwrap().len(), 2);
}

#[test]
fn results_in_each_versions_shape() {
    let a = Allocation {
        owner: Owner { network: "n".into(), container_id: "c".into(), ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef::default(),
        ips: vec![
            allot_wire::AllocatedIp { address: "10.0.0.5/24".parse().unwrap(), pool: "p".into(), gateway: None },
            allot_wire::AllocatedIp { address: "fd00::5/120".parse().unwrap(), pool: "p".into(), gateway: Some("fd00::1".parse().unwrap()) },
        ],
        created: 0,
        source: Default::default(),
    };
    let conf = parse_config(CONF.as_bytes()).unwrap();
    for v in SUPPORTED_VERSIONS {
        let r: Value = serde_json::from_str(&render_result(v, &a, &conf)).unwrap();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(r["ips"][0]["address"], "10.0.0.5/24");
        assert_eq!(r["ips"][1]["gateway"], "fd00::1");
        let old = v.starts_with("0.");
        assert_eq!(r["ips"][0].get("version").is_some(), old, "{v}");
        if old {
            assert_eq!(r["ips"][1]["version"], "6");
        }
    }
}

/// libcni's `types.LoadArgs` splits a pair on every `=` and refuses anything but two parts.
#[test]
fn cni_args_pair_with_two_equals_is_refused_as_libcni_does() {
    for bad in ["K=V=W", "IgnoreUnknown=1;K8S_POD_NAMESPACE=a=b", "==", "K8S_POD_NAME=web=0;K8S_POD_NAMESPACE=x"] {
        let e = parse_cni_args(bad).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV, "{bad}");
        assert!(e.msg.contains("KEY=VALUE"), "{bad}: {}", e.msg);
    }
    assert_eq!(parse_cni_args("A=1;B=;=C").unwrap().len(), 3);
}

#[test]
fn stdin_is_read_up_to_one_mib_and_refused_past_it() {
    let exact = vec![b' '; MAX_STDIN];
    assert_eq!(read_stdin(&mut exact.as_slice()).unwrap().len(), MAX_STDIN);
    let over = vec![b' '; MAX_STDIN + 1];
    let e = read_stdin(&mut over.as_slice()).unwrap_err();
    assert_eq!(e.code, code::DECODE);
    assert!(e.msg.contains("larger than"), "{}", e.msg);
}

fn reads_as_gone(text: &str) -> Option<&'static str> {
    let lower = text.to_lowercase();
    GONE_PHRASES.into_iter().find(|p| lower.contains(p))
}

/// Every error that can reach a DEL answer or a code-11 answer, as the runtime reads it
/// (`msg` and `details`): none may contain a phrase containerd takes for "already deleted".
#[test]
fn no_del_or_try_again_error_reads_as_not_found() {
    let socket = std::path::PathBuf::from("/run/allot/allot.sock");
    let mut client_errors = vec![
        ClientError::NotFound(socket.clone()),
        ClientError::Refused(socket.clone()),
        ClientError::Denied(socket.clone()),
        ClientError::Timeout { socket: socket.clone(), timeout: Duration::from_secs(120) },
        ClientError::Protocol { socket: socket.clone(), what: "incomplete HTTP response (0 bytes)".into() },
    ];
    // The client's own words, before any rewording.
    for e in &client_errors {
        assert_eq!(reads_as_gone(&e.to_string()), None, "client message: {e}");
    }
    // An answer that is not an ApiError is echoed, and may say anything.
    client_errors.push(ClientError::Protocol { socket: socket.clone(), what: "HTTP 404 for POST /v1/cni/del: Not Found".into() });
    // Every OS error's text (ENOENT is "No such file or directory") and every io kind.
    for errno in 1..134 {
        client_errors.push(ClientError::Io { socket: socket.clone(), source: std::io::Error::from_raw_os_error(errno) });
    }
    for kind in [std::io::ErrorKind::NotFound, std::io::ErrorKind::BrokenPipe, std::io::ErrorKind::ConnectionReset] {
        client_errors.push(ClientError::Io { socket: socket.clone(), source: kind.into() });
    }
    // The agent's answers on the DEL route: a journal error carries an io error's text.
    for kind in [ErrorKind::Invalid, ErrorKind::NotFound, ErrorKind::Conflict, ErrorKind::TryAgain, ErrorKind::Internal] {
        for message in [
            "allocation journal /var/lib/allot/allocations.journal: No such file or directory (os error 2)",
            "pool \"x\" NOT FOUND",
            "Failed to deserialize the JSON body into the target type: missing field `owner`",
        ] {
            client_errors.push(ClientError::Api(allot_wire::ApiError { kind, message: message.into() }));
        }
    }
    for e in client_errors {
        let shown = e.to_string();
        for command in ["DEL", "ADD", "CHECK", "GC"] {
            let answer = answer_error(Some(command), agent_error(ClientError::Protocol { socket: socket.clone(), what: shown.clone() }, command));
            assert_eq!(answer.code, code::TRY_AGAIN);
            let doc: Value = serde_json::from_str(&answer.to_json(LATEST)).unwrap();
            assert_eq!(reads_as_gone(&doc.to_string()), None, "{command}: {doc}");
        }
        let del = answer_error(Some("DEL"), agent_error(e, "DEL"));
        assert_eq!(reads_as_gone(&format!("{} {}", del.msg, del.details)), None, "DEL code {}: {}", del.code, del.msg);
    }
    // A DEL refused before it reaches the agent, with the phrase in what the runtime passed.
    let vars = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "not found"), ("CNI_IFNAME", "eth0")]);
    let (v, code) = run_with(&vars, CONF);
    assert_eq!((code, v["code"].as_u64()), (1, Some(u64::from(code::INVALID_ENV))));
    assert_eq!(reads_as_gone(&v.to_string()), None, "{v}");
    // The agent is down: code 11, the socket named, how to start it.
    let vars = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]);
    let (v, _) = run_with(&vars, CONF);
    assert_eq!(v["code"], json!(code::TRY_AGAIN));
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains("/nonexistent/allot.sock") && msg.contains("allot agent"), "{msg}");
    assert_eq!(reads_as_gone(msg), None, "{msg}");
}

#[test]
fn rewording_keeps_the_rest_of_the_message() {
    assert_eq!(reword_gone("pool x Not Found, no such file or directory"), "pool x missing, missing file or directory (ENOENT)");
    assert_eq!(reword_gone("all good"), "all good");
}

// ---- fuzzing the parsers ----

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,12}",
        "[ -~]{0,20}",
        any::<String>(),
        Just("eth0".to_string()),
        Just("..".to_string()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        piece().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(piece(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn config() -> impl Strategy<Value = Vec<u8>> {
    let version = prop_oneof![
        Just(json!("1.1.0")),
        Just(json!("0.3.1")),
        Just(json!("0.4.0")),
        piece().prop_map(Value::String),
        json_value()
    ];
    let structured = (version, piece(), json_value(), json_value(), json_value(), any::<u8>()).prop_map(
        |(v, name, ipam, rc, extra, mask)| {
            let mut o = serde_json::Map::new();
            if mask & 1 != 0 { o.insert("cniVersion".into(), v); }
            if mask & 2 != 0 { o.insert("name".into(), json!(name)); }
            if mask & 4 != 0 { o.insert("ipam".into(), ipam); }
            if mask & 8 != 0 { o.insert("runtimeConfig".into(), json!({"io.kubernetes.cri.pod-annotations": rc})); }
            if mask & 16 != 0 { o.insert("prevResult".into(), extra.clone()); }
            if mask & 32 != 0 { o.insert("cni.dev/valid-attachments".into(), extra); }
            serde_json::to_vec(&Value::Object(o)).unwrap()
        },
    );
    prop_oneof![
        3 => structured,
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

fn environment() -> impl Strategy<Value = HashMap<String, String>> {
    let command = prop_oneof![
        Just("ADD".to_string()), Just("DEL".to_string()), Just("CHECK".to_string()),
        Just("GC".to_string()), Just("STATUS".to_string()), piece()
    ];
    let args = proptest::collection::vec((piece(), piece(), any::<bool>()), 0..5).prop_map(|v| {
        v.into_iter()
            .map(|(k, val, eq)| if eq { format!("{k}={val}") } else { k })
            .collect::<Vec<_>>()
            .join(";")
    });
    (command, piece(), piece(), piece(), args, any::<u8>()).prop_map(|(cmd, id, netns, ifname, args, mask)| {
        let mut m = HashMap::new();
        if mask & 1 != 0 { m.insert("CNI_COMMAND".into(), cmd); }
        if mask & 2 != 0 { m.insert("CNI_CONTAINERID".into(), id); }
        if mask & 4 != 0 { m.insert("CNI_NETNS".into(), netns); }
        if mask & 8 != 0 { m.insert("CNI_IFNAME".into(), ifname); }
        if mask & 16 != 0 { m.insert("CNI_ARGS".into(), args); }
        m
    })
}

fn fuzz_cases() -> u32 {
    std::env::var("ALLOT_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// No input makes the parser panic; every refusal carries a spec code and a message, and
    /// every acceptance holds only checked values.
    #[test]
    fn fuzz_config_and_environment(vars in environment(), stdin in config()) {
        match parse(&|k| vars.get(k).cloned(), &stdin) {
            Ok(inv) => {
                prop_assert!(SUPPORTED_VERSIONS.contains(&inv.conf.cni_version.as_str()));
                prop_assert!(valid_network_name(&inv.conf.name));
                if matches!(inv.command, Command::Add | Command::Del | Command::Check) {
                    prop_assert!(valid_container_id(&inv.env.container_id));
                    prop_assert!(valid_ifname(&inv.env.ifname));
                }
            }
            Err(e) => {
                prop_assert!([1, 4, 6, 7].contains(&e.code), "unexpected code {}", e.code);
                prop_assert!(!e.msg.is_empty());
                let doc: Value = serde_json::from_str(&e.to_json(LATEST)).unwrap();
                prop_assert_eq!(doc["code"].as_u64(), Some(u64::from(e.code)));
            }
        }
    }
}

fn alloc(ips: &[(&str, Option<&str>)]) -> Allocation {
    Allocation {
        owner: Owner { network: "n".into(), container_id: "c".into(), ifname: "eth0".into() },
        netns: String::new(),
        pod: PodRef::default(),
        ips: ips
            .iter()
            .map(|(a, gw)| allot_wire::AllocatedIp { address: a.parse().unwrap(), pool: "p".into(), gateway: gw.map(|g| g.parse().unwrap()) })
            .collect(),
        created: 0,
        source: Default::default(),
    }
}

fn conf_with_ipam(ipam: Value) -> NetConf {
    let mut c: Value = serde_json::from_str(CONF).unwrap();
    for (k, v) in ipam.as_object().unwrap() {
        c["ipam"][k] = v.clone();
    }
    parse_config(c.to_string().as_bytes()).unwrap()
}

/// Issue 9, point 1: the gateway, a default route per family via it, the config's routes as
/// host-local takes them, and its dns, in every version's result.
#[test]
fn results_carry_gateways_default_routes_config_routes_and_dns() {
    let a = alloc(&[("10.0.0.5/24", Some("10.0.0.1")), ("fd00::5/120", Some("fd00::1"))]);
    let conf = conf_with_ipam(json!({
        "routes": [{"dst": "192.168.0.0/16"}, {"dst": "172.16.0.0/12", "gw": "10.0.0.254"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]}
    }));
    for v in SUPPORTED_VERSIONS {
        let r: Value = serde_json::from_str(&render_result(v, &a, &conf)).unwrap();
        assert_eq!(r["ips"][0]["gateway"], "10.0.0.1", "{v}");
        assert_eq!(
            r["routes"],
            json!([
                {"dst": "192.168.0.0/16"},
                {"dst": "172.16.0.0/12", "gw": "10.0.0.254"},
                {"dst": "0.0.0.0/0", "gw": "10.0.0.1"},
                {"dst": "::/0", "gw": "fd00::1"}
            ]),
            "{v}"
        );
        assert_eq!(r["dns"]["nameservers"], json!(["10.96.0.10"]), "{v}");
        assert_eq!(r["dns"]["options"], json!(["ndots:5"]), "{v}");
    }
    // No second default route when the config has one for that family; none at all when off.
    let own_default = conf_with_ipam(json!({"routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.254"}]}));
    let r: Value = serde_json::from_str(&render_result("1.1.0", &a, &own_default)).unwrap();
    assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0", "gw": "10.0.0.254"}, {"dst": "::/0", "gw": "fd00::1"}]));
    let off = conf_with_ipam(json!({"defaultRoute": false}));
    let r: Value = serde_json::from_str(&render_result("1.1.0", &a, &off)).unwrap();
    assert!(r.get("routes").is_none(), "defaultRoute false still routed: {r}");
    assert_eq!(r["dns"], json!({}));
    // A block without a gateway (reservation off, /31, /32) has no default route.
    let r: Value = serde_json::from_str(&render_result("0.4.0", &alloc(&[("10.0.0.5/24", None)]), &conf_with_ipam(json!({})))).unwrap();
    assert!(r.get("routes").is_none() && r["ips"][0].get("gateway").is_none(), "{r}");
}

#[test]
fn malformed_routes_and_dns_are_config_errors() {
    for ipam in [
        json!({"routes": [{"gw": "10.0.0.1"}]}),
        json!({"routes": [{"dst": "10.0.0.0"}]}),
        json!({"routes": [{"dst": "10.0.0.0/8", "gw": "fd00::1"}]}),
        json!({"routes": [{"dst": "10.0.0.0/8", "gw": "nope"}]}),
        json!({"routes": {"dst": "10.0.0.0/8"}}),
        json!({"dns": ["10.0.0.10"]}),
        json!({"defaultRoute": "no"}),
    ] {
        let mut c: Value = serde_json::from_str(CONF).unwrap();
        for (k, v) in ipam.as_object().unwrap() {
            c["ipam"][k] = v.clone();
        }
        let (v, code) = run_with(&add_env(), &c.to_string());
        assert_eq!((code, v["code"].as_u64()), (1, Some(u64::from(code::INVALID_CONFIG))), "{ipam}: {v}");
    }
}

/// Issue 9, point 3: prevResult holds the whole chain's result; allot's addresses must be in it.
#[test]
fn check_wants_a_subset_of_prev_result() {
    let a = alloc(&[("10.0.0.5/24", Some("10.0.0.1")), ("fd00::5/120", None)]);
    let prev = |ips: &[&str]| -> Vec<ipnet::IpNet> {
        prev_addresses(&json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": ips.iter().map(|i| json!({"address": i, "interface": 0})).collect::<Vec<_>>()})).unwrap()
    };
    assert_eq!(check_against(&a, &prev(&["10.0.0.5/24", "fd00::5/120"])), Ok(()));
    assert_eq!(check_against(&a, &prev(&["192.168.9.9/32", "fd00::5/120", "10.0.0.5/24"])), Ok(()), "another plugin's address");
    let e = check_against(&a, &prev(&["10.0.0.5/24"])).unwrap_err();
    assert_eq!(e.code, code::CHECK_MISMATCH);
    assert!(e.msg.contains("fd00::5/120"), "{}", e.msg);
    assert_eq!(check_against(&a, &prev(&[])).unwrap_err().code, code::CHECK_MISMATCH);
}

#[test]
fn check_with_an_unreadable_prev_result_is_code_7() {
    let vars = env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]);
    for prev in [json!({"ips": [{"address": "garbage"}]}), json!({"ips": [{"gateway": "10.0.0.1"}]}), json!({"ips": "10.0.0.5/24"}), json!("x")] {
        let mut c: Value = serde_json::from_str(CONF).unwrap();
        c["prevResult"] = prev.clone();
        let (v, code) = run_with(&vars, &c.to_string());
        assert_eq!((code, v["code"].as_u64()), (1, Some(u64::from(code::INVALID_CONFIG))), "{prev}: {v}");
        assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");
    }
}

/// Issue 9, point 4: the request carries only the annotations that choose a pool, and whether
/// the runtime passed annotations at all.
#[test]
fn only_pool_annotations_are_sent() {
    let big = "x".repeat(100_000);
    let c = conf_with_ipam(json!({}));
    assert!(!c.annotations_passed && c.annotations.is_empty());
    let mut v: Value = serde_json::from_str(CONF).unwrap();
    v["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": big, "ipam.cilium.io/ipv6-pool": "v6", "ipam.cilium.io/ip-pool": "blue"
    }});
    let c = parse_config(v.to_string().as_bytes()).unwrap();
    assert!(c.annotations_passed);
    assert_eq!(c.annotations, [("ipam.cilium.io/ip-pool".to_string(), "blue".to_string()), ("ipam.cilium.io/ipv6-pool".into(), "v6".into())].into());
    v["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"kubernetes.io/config.source": "api"}});
    let c = parse_config(v.to_string().as_bytes()).unwrap();
    assert!(c.annotations_passed && c.annotations.is_empty());
}

#[test]
fn agent_error_kinds_map_to_the_spec_codes() {
    assert_eq!(ErrorKind::Invalid.cni_code(), code::INVALID_CONFIG);
    assert_eq!(ErrorKind::NotFound.cni_code(), code::UNKNOWN_CONTAINER);
    for kind in [ErrorKind::Conflict, ErrorKind::TryAgain, ErrorKind::Internal] {
        assert_eq!(kind.cni_code(), code::TRY_AGAIN, "{kind:?}");
    }
}
