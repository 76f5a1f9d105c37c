//! allot-ipam, the CNI IPAM plugin: environment and stdin in, one JSON document out.
//!
//! It parses and checks the whole invocation before it talks to anyone, then makes one request
//! to the node agent over its unix socket. Synchronous, std and serde only.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use allot_client::{Client, ClientError};
use allot_wire::{
    AddRequest, Allocation, Attachment, GcRequest, GcResponse, Owner, OwnerRequest, PodRef, Status,
};
use serde::Deserialize;
use serde_json::{Value, json};

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";
pub const POD_ANNOTATIONS_KEY: &str = "io.kubernetes.cri.pod-annotations";
/// The pod annotations the agent reads; the rest (often large) stay out of the request.
const POOL_KEYS: [&str; 3] =
    [allot_core::select::POOL_ANNOTATION, allot_core::select::IPV4_POOL_ANNOTATION, allot_core::select::IPV6_POOL_ANNOTATION];
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// CNI error codes (spec 1.1, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// allot's own (100+): CHECK found addresses that differ from prevResult.
    pub const CHECK_MISMATCH: u32 = 110;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }

    pub fn to_json(&self, version: &str) -> String {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// The CNI_* environment, checked for the command at hand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// The parts of the network config allot reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub pool: Option<String>,
    pub socket: Option<String>,
    /// The pod annotations that choose a pool (the rest are not sent to the agent).
    pub annotations: BTreeMap<String, String>,
    /// Whether runtimeConfig carried the pod's annotations at all.
    pub annotations_passed: bool,
    /// The raw prevResult; CHECK reads it, and answers code 7 when it cannot.
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `ipam.routes` (host-local's `[{"dst": ..., "gw": ...}]`), passed through as given.
    pub routes: Vec<Value>,
    /// `ipam.defaultRoute` (default true): a default route per family via the block's gateway.
    pub default_route: bool,
    /// `ipam.dns` (host-local's shape), passed through.
    pub dns: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub env: CniEnv,
    pub conf: NetConf,
}

pub fn parse_command(value: Option<&str>) -> Result<Command, CniError> {
    match value {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("GC") => Ok(Command::Gc),
        Some("STATUS") => Ok(Command::Status),
        Some("VERSION") => Ok(Command::Version),
        Some(other) => Err(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"))
            .details("expected one of ADD, DEL, CHECK, GC, STATUS, VERSION")),
        None => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
    }
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are ignored; a pair without exactly one `=` is an error,
/// as in libcni (`types.LoadArgs` splits on every `=` and wants two parts).
pub fn parse_cni_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').filter(|(_, v)| !v.contains('=')).ok_or_else(|| {
            CniError::new(code::INVALID_ENV, format!("CNI_ARGS: {pair:?} is not KEY=VALUE"))
                .details("pairs are separated by ';' and hold exactly one '='")
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The most stdin allot-ipam reads: a network config is a few KiB.
pub const MAX_STDIN: usize = 1 << 20;

/// Reads the network config from `input`, refusing more than `MAX_STDIN` bytes (code 6).
pub fn read_stdin(input: &mut impl Read) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::with_capacity(16 * 1024);
    if let Err(e) = input.take(MAX_STDIN as u64 + 1).read_to_end(&mut buf) {
        return Err(CniError::new(code::DECODE, reword_gone(&format!("reading the network config on stdin: {e}"))));
    }
    if buf.len() > MAX_STDIN {
        return Err(CniError::new(code::DECODE, format!("the network config on stdin is larger than {MAX_STDIN} bytes"))
            .details("allot-ipam reads at most 1 MiB: check what the runtime passes on stdin"));
    }
    Ok(buf)
}

/// Phrases a runtime reads as "already gone": containerd's CNI library treats a DEL error that
/// contains "not found" (or, with no netns, "no such file or directory") as success, and the
/// address would leak. No DEL error and no "try again" error may contain them, in any case.
pub const GONE_PHRASES: [&str; 2] = ["not found", "no such file or directory"];

/// Rewrites the phrases of `GONE_PHRASES` (ASCII, any case) so that a runtime retries.
pub fn reword_gone(text: &str) -> String {
    let mut out = text.to_string();
    for (bad, good) in GONE_PHRASES.iter().zip(["missing", "missing file or directory (ENOENT)"]) {
        while let Some(i) = out.to_ascii_lowercase().find(bad) {
            out.replace_range(i..i + bad.len(), good);
        }
    }
    out
}

/// The error as the runtime gets it: DEL errors and "try again" errors never read as "gone".
pub fn answer_error(command: Option<&str>, mut e: CniError) -> CniError {
    if e.code == code::TRY_AGAIN || command == Some("DEL") {
        e.msg = reword_gone(&e.msg);
        e.details = reword_gone(&e.details);
    }
    e
}

fn valid_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn valid_network_name(name: &str) -> bool {
    valid_container_id(name)
}

/// Reads the CNI_* variables a command needs.
pub fn parse_env(command: Command, var: &dyn Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
    let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let needs_netns = matches!(command, Command::Add | Command::Check);
    let required = |name: &str, needed: bool| -> Result<String, CniError> {
        match var(name).filter(|v| !v.is_empty()) {
            Some(v) => Ok(v),
            None if needed => Err(CniError::new(code::INVALID_ENV, format!("{name} is not set"))
                .details(format!("CNI_COMMAND {command:?} needs {name}"))),
            None => Ok(String::new()),
        }
    };
    let container_id = required("CNI_CONTAINERID", needs_container)?;
    if !container_id.is_empty() && !valid_container_id(&container_id) {
        return Err(CniError::new(code::INVALID_ENV, format!("CNI_CONTAINERID {container_id:?} is not a valid container ID"))
            .details("it must start with a letter or digit, then letters, digits, '_', '.' or '-'"));
    }
    let netns = required("CNI_NETNS", needs_netns)?;
    let ifname = required("CNI_IFNAME", needs_container)?;
    if !ifname.is_empty() && !valid_ifname(&ifname) {
        return Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {ifname:?} is not a valid interface name"))
            .details("at most 15 characters, not '.' or '..', no '/', ':' or white space"));
    }
    let args = parse_cni_args(&var("CNI_ARGS").unwrap_or_default())?;
    Ok(CniEnv {
        container_id,
        netns,
        ifname,
        pod_namespace: args.get("K8S_POD_NAMESPACE").filter(|s| !s.is_empty()).cloned(),
        pod_name: args.get("K8S_POD_NAME").filter(|s| !s.is_empty()).cloned(),
    })
}

#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    ipam: Option<RawIpam>,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<RawRuntimeConfig>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<RawAttachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<RawAttachment>>,
}

#[derive(Deserialize)]
struct RawIpam {
    pool: Option<String>,
    socket: Option<String>,
    routes: Option<Vec<Value>>,
    #[serde(rename = "defaultRoute")]
    default_route: Option<bool>,
    dns: Option<Value>,
}

#[derive(Deserialize)]
struct RawRuntimeConfig {
    #[serde(rename = "io.kubernetes.cri.pod-annotations")]
    pod_annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The cniVersion of a config, if it has a readable one; used to label errors.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// Decodes and checks the network config from stdin.
pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, "cannot decode the network config on stdin").details(e.to_string()))?;
    if !value.is_object() {
        return Err(CniError::new(code::DECODE, "the network config on stdin is not a JSON object"));
    }
    let raw: RawConf = serde_json::from_value(value)
        .map_err(|e| CniError::new(code::INVALID_CONFIG, "invalid network config").details(e.to_string()))?;
    let cni_version = raw.cni_version.ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network config has no cniVersion"))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {cni_version:?}: allot-ipam supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let name = raw.name.ok_or_else(|| CniError::new(code::INVALID_CONFIG, "network config has no name"))?;
    if !valid_network_name(&name) {
        return Err(CniError::new(code::INVALID_CONFIG, format!("network name {name:?} is not valid"))
            .details("letters, digits, '_', '.' and '-', starting with a letter or digit"));
    }
    let ipam = raw.ipam.ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "network config has no ipam section")
            .details("allot-ipam runs as the ipam of a main plugin: \"ipam\": {\"type\": \"allot-ipam\"}")
    })?;
    if let Some(pool) = &ipam.pool
        && allot_core::pool::validate_name(pool).is_err()
    {
        return Err(CniError::new(code::INVALID_CONFIG, format!("ipam.pool {pool:?} is not a valid pool name")));
    }
    let routes = ipam.routes.unwrap_or_default();
    for r in &routes {
        check_route(r)?;
    }
    if let Some(dns) = &ipam.dns
        && !dns.is_object()
    {
        return Err(CniError::new(code::INVALID_CONFIG, "ipam.dns is not an object")
            .details("host-local's shape: {\"nameservers\": [...], \"domain\": ..., \"search\": [...], \"options\": [...]}"));
    }
    let valid_attachments = match (raw.valid_attachments, raw.attachments) {
        (None, None) => None,
        (a, b) => Some(
            a.into_iter()
                .chain(b)
                .flatten()
                .map(|r| Attachment { container_id: r.container_id, ifname: r.ifname })
                .collect(),
        ),
    };
    let pod_annotations = raw.runtime_config.and_then(|r| r.pod_annotations);
    Ok(NetConf {
        cni_version,
        name,
        pool: ipam.pool.filter(|p| !p.is_empty()),
        socket: ipam.socket.filter(|s| !s.is_empty()),
        annotations_passed: pod_annotations.is_some(),
        annotations: pod_annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| POOL_KEYS.contains(&k.as_str()))
            .collect(),
        prev_result: raw.prev_result,
        valid_attachments,
        routes,
        default_route: ipam.default_route.unwrap_or(true),
        dns: ipam.dns,
    })
}

/// One `ipam.routes` entry: `dst` a CIDR, `gw` (optional) an address of the same family.
fn check_route(r: &Value) -> Result<(), CniError> {
    let bad = |why: &str| {
        CniError::new(code::INVALID_CONFIG, format!("ipam.routes entry {r}: {why}"))
            .details("each route is {\"dst\": \"<cidr>\"} or {\"dst\": \"<cidr>\", \"gw\": \"<address>\"}, as for host-local")
    };
    let dst: ipnet::IpNet = r
        .get("dst")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"dst\""))?
        .parse()
        .map_err(|_| bad("\"dst\" is not a CIDR"))?;
    if let Some(gw) = r.get("gw").filter(|g| !g.is_null()) {
        let gw: std::net::IpAddr = gw.as_str().and_then(|g| g.parse().ok()).ok_or_else(|| bad("\"gw\" is not an address"))?;
        if gw.is_ipv4() != dst.addr().is_ipv4() {
            return Err(bad("\"gw\" and \"dst\" are of different families"));
        }
    }
    Ok(())
}

/// The addresses of a prevResult's `ips`; code 7 when it is not a result allot can read.
pub fn prev_addresses(prev: &Value) -> Result<Vec<ipnet::IpNet>, CniError> {
    let bad = |why: String| {
        CniError::new(code::INVALID_CONFIG, format!("CHECK: cannot read prevResult: {why}"))
            .details("prevResult must be a CNI result: {\"ips\": [{\"address\": \"<cidr>\"}, ...]}")
    };
    let Some(obj) = prev.as_object() else { return Err(bad("not a JSON object".into())) };
    let ips = match obj.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("\"ips\" is not a list".into())),
    };
    ips.iter()
        .map(|ip| {
            let a = ip.get("address").and_then(Value::as_str).ok_or_else(|| bad(format!("entry {ip} has no \"address\"")))?;
            a.parse::<ipnet::IpNet>().map_err(|_| bad(format!("address {a:?} is not a CIDR")))
        })
        .collect()
}

fn version_at_least(v: &str, min: &str) -> bool {
    let key = |s: &str| SUPPORTED_VERSIONS.iter().position(|x| *x == s);
    key(v) >= key(min)
}

/// Parses a whole invocation (everything but VERSION) without side effects.
pub fn parse(var: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Invocation, CniError> {
    let command = parse_command(var("CNI_COMMAND").as_deref())?;
    let conf = parse_config(stdin)?;
    let min = match command {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        _ => "0.3.0",
    };
    if !version_at_least(&conf.cni_version, min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{command:?} needs cniVersion {min} or later; the config says {}", conf.cni_version),
        ));
    }
    let env = parse_env(command, var)?;
    if command == Command::Gc && conf.valid_attachments.is_none() {
        return Err(CniError::new(code::INVALID_CONFIG, "GC config has no cni.dev/valid-attachments")
            .details("without the list of valid attachments allot-ipam cannot tell what to keep, so it releases nothing"));
    }
    Ok(Invocation { command, env, conf })
}

fn owner(inv: &Invocation) -> Owner {
    Owner { network: inv.conf.name.clone(), container_id: inv.env.container_id.clone(), ifname: inv.env.ifname.clone() }
}

pub fn agent_error(e: ClientError, what: &str) -> CniError {
    match &e {
        ClientError::Api(api) => CniError::new(api.kind.cni_code(), format!("{what}: {}", api.message)),
        _ => CniError::new(code::TRY_AGAIN, format!("{what}: {e}")),
    }
}

/// The result document for `version`, in that version's shape: the addresses with their
/// gateways, `conf`'s routes, a default route per family via its gateway unless
/// `defaultRoute` is false or `conf` has one, and `conf`'s dns.
pub fn render_result(version: &str, a: &Allocation, conf: &NetConf) -> String {
    let old = !version_at_least(version, "1.0.0");
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|ip| {
            let mut v = json!({ "address": ip.address.to_string() });
            if old {
                v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
            }
            if let Some(gw) = ip.gateway {
                v["gateway"] = json!(gw.to_string());
            }
            v
        })
        .collect();
    let mut routes = conf.routes.clone();
    if conf.default_route {
        for ip in &a.ips {
            let Some(gw) = ip.gateway else { continue };
            let dst = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            let has_default = routes.iter().any(|r| {
                r.get("dst").and_then(Value::as_str).and_then(|d| d.parse::<ipnet::IpNet>().ok()).is_some_and(|d| {
                    d.prefix_len() == 0 && d.addr().is_ipv4() == gw.is_ipv4()
                })
            });
            if !has_default {
                routes.push(json!({ "dst": dst, "gw": gw.to_string() }));
            }
        }
    }
    let mut out = json!({ "cniVersion": version, "ips": ips });
    if !routes.is_empty() {
        out["routes"] = Value::Array(routes);
    }
    out["dns"] = conf.dns.clone().unwrap_or_else(|| json!({}));
    out.to_string()
}

/// CHECK: every address allot holds for the owner is in prevResult (which holds the whole
/// chain's result, so other plugins may have added more).
pub fn check_against(a: &Allocation, got: &[ipnet::IpNet]) -> Result<(), CniError> {
    let missing: Vec<String> = a.ips.iter().filter(|ip| !got.contains(&ip.address)).map(|ip| ip.address.to_string()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let listed: Vec<String> = got.iter().map(ToString::to_string).collect();
    Err(CniError::new(
        code::CHECK_MISMATCH,
        format!("CHECK: {} holds {} but prevResult lists only [{}]", a.owner, missing.join(", "), listed.join(", ")),
    )
    .details("the interface lost an address allot assigned: delete and re-add the container's network"))
}

/// Runs an invocation against the agent. Ok(Some) is printed on stdout; Ok(None) prints nothing.
pub fn execute(inv: &Invocation) -> Result<Option<String>, CniError> {
    let client = Client::new(allot_client::socket_path(inv.conf.socket.as_deref()), AGENT_TIMEOUT);
    match inv.command {
        Command::Add => {
            let req = AddRequest {
                owner: owner(inv),
                netns: inv.env.netns.clone(),
                pod: PodRef { namespace: inv.env.pod_namespace.clone(), name: inv.env.pod_name.clone() },
                pool: inv.conf.pool.clone(),
                annotations: inv.conf.annotations.clone(),
                annotations_passed: inv.conf.annotations_passed,
            };
            let a: Allocation = client.post("/v1/cni/add", &req).map_err(|e| agent_error(e, "ADD"))?;
            Ok(Some(render_result(&inv.conf.cni_version, &a, &inv.conf)))
        }
        Command::Del => {
            let _: Option<Allocation> =
                client.post("/v1/cni/del", &OwnerRequest { owner: owner(inv) }).map_err(|e| agent_error(e, "DEL"))?;
            Ok(None)
        }
        Command::Check => {
            // Read prevResult first: a malformed one is a config error whatever the agent says.
            let got = inv.conf.prev_result.as_ref().map(prev_addresses).transpose()?;
            let a: Allocation =
                client.post("/v1/cni/check", &OwnerRequest { owner: owner(inv) }).map_err(|e| agent_error(e, "CHECK"))?;
            if let Some(got) = &got {
                check_against(&a, got)?;
            }
            Ok(None)
        }
        Command::Gc => {
            let req = GcRequest {
                network: inv.conf.name.clone(),
                valid: inv.conf.valid_attachments.clone().unwrap_or_default(),
            };
            let _: GcResponse = client.post("/v1/cni/gc", &req).map_err(|e| agent_error(e, "GC"))?;
            Ok(None)
        }
        Command::Status => {
            let s: Status = client
                .get("/v1/status")
                .map_err(|e| CniError::new(code::NOT_AVAILABLE, format!("STATUS: {e}")))?;
            // What this node can serve, as the agent judges it from its own state (it does not
            // ask the cluster store, so a store outage alone does not mark the node not ready).
            let readiness = s.cni.unwrap_or(allot_wire::Readiness { ready: s.ready, reason: Some("still restoring".into()) });
            if !readiness.ready {
                let why = readiness.reason.unwrap_or_else(|| "not ready".into());
                return Err(CniError::new(code::NOT_AVAILABLE, format!("STATUS: node {}: {why}", s.node)));
            }
            Ok(None)
        }
        Command::Version => Ok(Some(version_document(&inv.conf.cni_version))),
    }
}

pub fn version_document(requested: &str) -> String {
    let v = if SUPPORTED_VERSIONS.contains(&requested) { requested } else { LATEST };
    json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// The whole plugin: returns (stdout, exit code).
pub fn run(var: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> (String, i32) {
    let label = || peek_version(stdin).filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str())).unwrap_or_else(|| LATEST.to_string());
    if var("CNI_COMMAND").as_deref() == Some("VERSION") {
        // VERSION answers whatever stdin holds: it is how a runtime learns what to send.
        return (version_document(&label()), 0);
    }
    let outcome = parse(var, stdin).and_then(|inv| execute(&inv));
    match outcome {
        Ok(Some(out)) => (out, 0),
        Ok(None) => (String::new(), 0),
        Err(e) => (answer_error(var("CNI_COMMAND").as_deref(), e).to_json(&label()), 1),
    }
}

#[cfg(test)]
mod tests;
