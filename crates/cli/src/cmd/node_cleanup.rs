//! `allot node cleanup --from CNI`: removes what an old CNI left on this node once no pod uses
//! it: its config files, links, routes, iptables chains (and the jumps to them) and nftables
//! tables. It finds everything by the names that CNI uses and touches nothing else; a pod still
//! on the old CNI (a veth of it, or a live adopted allocation of its network) stops it.
//!
//! Reads with `ip -j`, `iptables-save`/`ip6tables-save` and `nft -j`; removes with `ip`,
//! `iptables-restore --noflush` (one atomic batch per table) and `nft delete table`. It works on
//! the network namespace it runs in.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use allot_wire::Allocation;
use anyhow::{Context, bail};
use serde_json::Value;

use super::node_switch::{self, ROLLBACK_DIR};
use crate::backend::Backend;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cni {
    Canal,
    Calico,
    Flannel,
    Cilium,
    Bridge,
}

#[derive(clap::Args)]
pub struct Args {
    /// The CNI the node ran before.
    #[arg(long, value_enum)]
    from: Cni,
    /// Only list what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// The runtime's CNI config directory.
    #[arg(long, default_value = node_switch::DEFAULT_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// Do not ask the local agent for live adopted allocations (when no agent runs here).
    #[arg(long)]
    no_agent: bool,
}

/// What marks a CNI's leftovers.
struct Marks {
    /// Config file names containing one of these, or a plugin of one of these types.
    names: &'static [&'static str],
    /// Links the CNI creates for itself.
    links: &'static [&'static str],
    /// Pods' host-side links start with one of these (not in `links`).
    pod_prefixes: &'static [&'static str],
    /// Pods' veths enslaved to one of these bridges are pods too.
    bridges: Vec<String>,
    /// iptables chains starting with one of these.
    chains: &'static [&'static str],
    /// nftables tables starting with one of these.
    nft_tables: &'static [&'static str],
    /// Routes of these protocols (calico's BIRD blackholes and routes).
    route_protos: &'static [&'static str],
    /// Links whose addresses (not the link) are removed: tunl0 is the kernel's ipip device.
    strip_addresses: &'static [&'static str],
}

fn marks(cni: Cni) -> Marks {
    const FLANNEL_LINKS: &[&str] = &["flannel.1", "flannel-v6.1", "flannel-wg", "flannel-wg-v6", "cni0"];
    const CALICO_LINKS: &[&str] = &["vxlan.calico", "vxlan-v6.calico", "wireguard.cali", "wg-v6.cali"];
    match cni {
        Cni::Flannel => Marks {
            names: &["flannel"],
            links: FLANNEL_LINKS,
            pod_prefixes: &[],
            bridges: vec!["cni0".into()],
            chains: &["FLANNEL-"],
            nft_tables: &["flannel"],
            route_protos: &[],
            strip_addresses: &[],
        },
        Cni::Calico => Marks {
            names: &["calico"],
            links: CALICO_LINKS,
            pod_prefixes: &["cali"],
            bridges: vec![],
            chains: &["cali-"],
            nft_tables: &["calico"],
            route_protos: &["bird"],
            strip_addresses: &["tunl0"],
        },
        Cni::Canal => Marks {
            names: &["canal", "calico", "flannel"],
            links: &["flannel.1", "flannel-v6.1", "vxlan.calico", "vxlan-v6.calico", "wireguard.cali", "cni0"],
            pod_prefixes: &["cali"],
            bridges: vec!["cni0".into()],
            chains: &["cali-", "FLANNEL-"],
            nft_tables: &["calico", "flannel"],
            route_protos: &["bird"],
            strip_addresses: &["tunl0"],
        },
        Cni::Cilium => Marks {
            names: &["cilium"],
            links: &["cilium_host", "cilium_net", "cilium_vxlan", "cilium_geneve", "cilium_wg0", "lxc_health"],
            pod_prefixes: &["lxc"],
            bridges: vec![],
            chains: &["CILIUM_", "OLD_CILIUM_"],
            nft_tables: &["cilium"],
            route_protos: &[],
            strip_addresses: &[],
        },
        // The reference bridge plugin: its bridges are read from its config files.
        Cni::Bridge => Marks {
            names: &["bridge"],
            links: &[],
            pod_prefixes: &[],
            bridges: vec![],
            chains: &[],
            nft_tables: &[],
            route_protos: &[],
            strip_addresses: &[],
        },
    }
}

/// One leftover and how it goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// An iptables chain (IPv6 when `v6`); a jump is a rule of another chain as iptables-save prints it.
    Chain { v6: bool, table: String, chain: String },
    Jump { v6: bool, table: String, rule: String },
    NftTable { family: String, name: String },
    Route { v6: bool, spec: Vec<String>, shown: String },
    Address { link: String, cidr: String },
    Link { name: String, kind: String },
    File { path: PathBuf },
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fam = |v6: &bool| if *v6 { "ip6tables" } else { "iptables" };
        match self {
            Item::Chain { v6, table, chain } => write!(f, "{} chain {table}/{chain}", fam(v6)),
            Item::Jump { v6, table, rule } => write!(f, "{} rule {table}: {rule}", fam(v6)),
            Item::NftTable { family, name } => write!(f, "nftables table {family} {name}"),
            Item::Route { shown, .. } => write!(f, "route {shown}"),
            Item::Address { link, cidr } => write!(f, "address {cidr} on {link}"),
            Item::Link { name, kind } => write!(f, "link {name} ({kind})"),
            Item::File { path } => write!(f, "config file {}", path.display()),
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}: is it installed?"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(cmd: &str, args: &[&str]) -> anyhow::Result<Value> {
    let text = run(cmd, args)?;
    if text.trim().is_empty() {
        return Ok(Value::Array(vec![]));
    }
    serde_json::from_str(&text).with_context(|| format!("reading the JSON of {cmd} {}", args.join(" ")))
}

/// The CNI's config files (in the directory and kept aside by `node switch`) and the network
/// names and bridges they declare. allot's own files are never the old CNI's.
type Found = (Vec<PathBuf>, BTreeSet<String>, BTreeSet<String>, BTreeSet<String>);

/// Returns the files, their network names, their bridges, and the bridges of allot's own
/// configs (never removed: the new CNI may reuse a name such as cni0).
fn config_files(dir: &Path, m: &Marks, cni: Cni) -> anyhow::Result<Found> {
    let mut allot_bridges = BTreeSet::new();
    let mut files = Vec::new();
    let mut networks = BTreeSet::new();
    let mut bridges = BTreeSet::new();
    for (d, kept_aside) in [(dir.to_path_buf(), false), (dir.join(ROLLBACK_DIR), true)] {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == node_switch::STATE_FILE || e.path().is_dir() {
                continue;
            }
            let v: Value = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
            let plugins: Vec<&Value> = match v.get("plugins").and_then(|p| p.as_array()) {
                Some(p) => p.iter().collect(),
                None if v.get("type").is_some() => vec![&v],
                None => vec![],
            };
            let types: Vec<&str> = plugins.iter().filter_map(|p| p.get("type").and_then(|t| t.as_str())).collect();
            let ipam_allot = plugins.iter().any(|p| p.pointer("/ipam/type").and_then(|t| t.as_str()) == Some("allot-ipam"));
            if ipam_allot || name == node_switch::INSTALLED_NAME {
                for p in plugins.iter().filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("bridge")) {
                    allot_bridges.insert(p.get("bridge").and_then(|b| b.as_str()).unwrap_or("cni0").to_string());
                }
                continue;
            }
            // Any tool may run a bridge network (podman's, a VM's): only the configs `node
            // switch` took from the runtime are the old bridge CNI's.
            if cni == Cni::Bridge && !kept_aside {
                continue;
            }
            let by_name = cni != Cni::Bridge && m.names.iter().any(|n| name.contains(n));
            let by_type = types.iter().any(|t| m.names.contains(t));
            if !(by_name || by_type) {
                continue;
            }
            if let Some(n) = v.get("name").and_then(|n| n.as_str()) {
                networks.insert(n.to_string());
            }
            for p in &plugins {
                if p.get("type").and_then(|t| t.as_str()) == Some("bridge") {
                    bridges.insert(p.get("bridge").and_then(|b| b.as_str()).unwrap_or("cni0").to_string());
                }
            }
            files.push(e.path());
        }
    }
    files.sort();
    Ok((files, networks, bridges, allot_bridges))
}

fn chain_items(m: &Marks) -> anyhow::Result<Vec<Item>> {
    let mut out = Vec::new();
    if m.chains.is_empty() {
        return Ok(out);
    }
    for (v6, save) in [(false, "iptables-save"), (true, "ip6tables-save")] {
        let text = run(save, &[])?;
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                if m.chains.iter().any(|p| chain.starts_with(p)) {
                    out.push(Item::Chain { v6, table: table.clone(), chain: chain.to_string() });
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let mut words = rule.split_whitespace();
                let owner = words.next().unwrap_or_default();
                let words: Vec<&str> = rule.split_whitespace().collect();
                let target = words.windows(2).find(|w| w[0] == "-j" || w[0] == "-g").map(|w| w[1]).unwrap_or_default();
                let ours = |c: &str| m.chains.iter().any(|p| c.starts_with(p));
                // Rules inside the CNI's own chains go with the chain; jumps from others are removed.
                if ours(target) && !ours(owner) {
                    out.push(Item::Jump { v6, table: table.clone(), rule: line.to_string() });
                }
            }
        }
    }
    Ok(out)
}

fn nft_items(m: &Marks) -> anyhow::Result<Vec<Item>> {
    if m.nft_tables.is_empty() {
        return Ok(vec![]);
    }
    let v = json("nft", &["-j", "list", "tables"])?;
    let mut out = Vec::new();
    for t in v.get("nftables").and_then(|n| n.as_array()).into_iter().flatten() {
        let Some(t) = t.get("table") else { continue };
        let (Some(family), Some(name)) = (t.get("family").and_then(|f| f.as_str()), t.get("name").and_then(|n| n.as_str())) else { continue };
        if m.nft_tables.iter().any(|p| name.starts_with(p)) {
            out.push(Item::NftTable { family: family.into(), name: name.into() });
        }
    }
    Ok(out)
}

struct Links {
    items: Vec<Item>,
    /// Pods' links still there: they stop the cleanup.
    pods: Vec<String>,
    names: BTreeSet<String>,
}

fn link_items(m: &Marks, bridges: &BTreeSet<String>, keep: &BTreeSet<String>) -> anyhow::Result<Links> {
    let v = json("ip", &["-j", "-d", "link", "show"])?;
    let mut out = Links { items: vec![], pods: vec![], names: BTreeSet::new() };
    for l in v.as_array().into_iter().flatten() {
        let name = l.get("ifname").and_then(|n| n.as_str()).unwrap_or_default();
        let kind = l.pointer("/linkinfo/info_kind").and_then(|k| k.as_str()).unwrap_or("device");
        let master = l.get("master").and_then(|n| n.as_str());
        if keep.contains(name) || master.is_some_and(|b| keep.contains(b)) {
            continue;
        }
        let is_pod = (m.pod_prefixes.iter().any(|p| name.starts_with(p)) && !m.links.contains(&name))
            || (kind == "veth" && master.is_some_and(|b| bridges.contains(b)));
        if is_pod {
            out.pods.push(format!("{name} ({kind}{})", master.map(|b| format!(", on {b}")).unwrap_or_default()));
        } else if m.links.contains(&name) || bridges.contains(name) {
            out.items.push(Item::Link { name: name.into(), kind: kind.into() });
            out.names.insert(name.to_string());
        }
    }
    for link in m.strip_addresses {
        let Ok(v) = json("ip", &["-j", "addr", "show", "dev", link]) else { continue };
        for a in v.as_array().into_iter().flatten().flat_map(|l| l.get("addr_info").and_then(|a| a.as_array()).into_iter().flatten()) {
            if let (Some(ip), Some(len)) = (a.get("local").and_then(|x| x.as_str()), a.get("prefixlen").and_then(|x| x.as_u64())) {
                out.items.push(Item::Address { link: link.to_string(), cidr: format!("{ip}/{len}") });
                out.names.insert(link.to_string());
            }
        }
    }
    Ok(out)
}

fn route_items(m: &Marks, links: &BTreeSet<String>) -> anyhow::Result<Vec<Item>> {
    let mut out = Vec::new();
    for (v6, fam) in [(false, "-4"), (true, "-6")] {
        let v = json("ip", &[fam, "-j", "route", "show", "table", "all"])?;
        for r in v.as_array().into_iter().flatten() {
            let dst = r.get("dst").and_then(|d| d.as_str()).unwrap_or("default");
            let dev = r.get("dev").and_then(|d| d.as_str());
            let proto = r.get("protocol").and_then(|p| p.as_str()).unwrap_or("");
            let table = r.get("table").and_then(|t| t.as_str()).unwrap_or("main");
            let kind = r.get("type").and_then(|t| t.as_str()).unwrap_or("unicast");
            // Local and broadcast routes go with their addresses.
            if table == "local" || matches!(kind, "local" | "broadcast" | "multicast") || dst.starts_with("fe80") {
                continue;
            }
            let by_dev = dev.is_some_and(|d| links.contains(d));
            let by_proto = m.route_protos.contains(&proto);
            if !(by_dev || by_proto) {
                continue;
            }
            let mut spec = vec![kind.to_string(), dst.to_string(), "table".into(), table.to_string()];
            if let Some(d) = dev {
                spec.extend(["dev".to_string(), d.to_string()]);
            }
            if !proto.is_empty() {
                spec.extend(["proto".to_string(), proto.to_string()]);
            }
            let shown = format!("{}{dst}{}{} table {table}", if kind == "unicast" { String::new() } else { format!("{kind} ") }, dev.map(|d| format!(" dev {d}")).unwrap_or_default(), if proto.is_empty() { String::new() } else { format!(" proto {proto}") });
            out.push(Item::Route { v6, spec, shown });
        }
    }
    Ok(out)
}

/// Removes the items, in an order that leaves nothing dangling (jumps before chains, routes
/// before links); collects every error and goes on.
fn remove(items: &[Item]) -> Vec<String> {
    let mut errors = Vec::new();
    // iptables: one atomic batch per (family, table).
    let mut tables: BTreeSet<(bool, String)> = BTreeSet::new();
    for i in items {
        if let Item::Chain { v6, table, .. } | Item::Jump { v6, table, .. } = i {
            tables.insert((*v6, table.clone()));
        }
    }
    for (v6, table) in tables {
        let mut script = format!("*{table}\n");
        for i in items {
            if let Item::Jump { v6: f, table: t, rule } = i
                && *f == v6
                && *t == table
            {
                script += &format!("-D {}\n", rule.trim_start_matches("-A "));
            }
        }
        let chains: Vec<&String> = items
            .iter()
            .filter_map(|i| match i {
                Item::Chain { v6: f, table: t, chain } if *f == v6 && *t == table => Some(chain),
                _ => None,
            })
            .collect();
        for c in &chains {
            script += &format!("-F {c}\n");
        }
        for c in &chains {
            script += &format!("-X {c}\n");
        }
        script += "COMMIT\n";
        let restore = if v6 { "ip6tables-restore" } else { "iptables-restore" };
        let r = (|| -> anyhow::Result<()> {
            use std::io::Write;
            let mut child = Command::new(restore).arg("--noflush").stdin(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
            child.stdin.take().expect("piped").write_all(script.as_bytes())?;
            let out = child.wait_with_output()?;
            anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
            Ok(())
        })();
        if let Err(e) = r {
            errors.push(format!("{restore} (table {table}): {e:#}"));
        }
    }
    for i in items {
        let r = match i {
            Item::NftTable { family, name } => run("nft", &["delete", "table", family, name]).map(drop),
            Item::Route { v6, spec, .. } => {
                let mut args = vec![if *v6 { "-6" } else { "-4" }, "route", "del"];
                args.extend(spec.iter().map(String::as_str));
                run("ip", &args).map(drop)
            }
            Item::Address { link, cidr } => run("ip", &["addr", "del", cidr, "dev", link]).map(drop),
            _ => continue,
        };
        if let Err(e) = r {
            errors.push(format!("{i}: {e:#}"));
        }
    }
    for i in items {
        let r = match i {
            Item::Link { name, .. } => match run("ip", &["link", "del", name]) {
                // A veth goes with its peer: the other half of a pair (cilium_host and
                // cilium_net) is gone already.
                Err(_) if run("ip", &["link", "show", name]).is_err() => Ok(()),
                r => r.map(drop),
            },
            Item::File { path } => std::fs::remove_file(path).map_err(anyhow::Error::from),
            _ => continue,
        };
        if let Err(e) = r {
            errors.push(format!("{i}: {e:#}"));
        }
    }
    errors
}

pub fn exec(args: Args, backend: &Backend) -> anyhow::Result<()> {
    let mut m = marks(args.from);
    let (files, networks, mut bridges, allot_bridges) = config_files(&args.cni_conf_dir, &m, args.from)?;
    bridges.extend(m.bridges.drain(..));
    if args.from != Cni::Bridge {
        // Only the bridges the CNI names by default: a bridge of another tool is not ours.
        bridges.retain(|b| b == "cni0");
    }
    let kept: Vec<String> = bridges.intersection(&allot_bridges).cloned().collect();
    for b in &kept {
        println!("keeping bridge {b}: allot's own CNI config uses it");
    }
    bridges.retain(|b| !allot_bridges.contains(b));
    let links = link_items(&m, &bridges, &allot_bridges)?;
    // Live adopted allocations of the old CNI's networks: its pods still run.
    let mut live = Vec::new();
    if !args.no_agent {
        let client = backend.agent("allot node cleanup")?;
        let list: Vec<Allocation> = client.get("/v1/allocations").map_err(|e| {
            anyhow::anyhow!("asking the local agent for live adopted allocations failed: {e}; start the agent, or pass --no-agent to skip this check")
        })?;
        for a in list.iter().filter(|a| a.source.is_adopted() && networks.contains(&a.owner.network)) {
            let ips: Vec<String> = a.ips.iter().map(|i| i.address.addr().to_string()).collect();
            live.push(format!("{} ({}, {})", a.owner, ips.join(", "), a.source));
        }
    }
    if !links.pods.is_empty() || !live.is_empty() {
        let mut msg = format!("pods still run on the old CNI ({:?}); cleanup would cut them off, nothing was removed:", args.from);
        for p in &links.pods {
            msg += &format!("\n  pod interface {p}");
        }
        for a in &live {
            msg += &format!("\n  adopted allocation {a}");
        }
        msg += "\nrestart those pods through the new CNI (DEL on the old, ADD on the new) first, then run cleanup again";
        bail!(msg);
    }
    let mut items: Vec<Item> = Vec::new();
    items.extend(chain_items(&m)?);
    items.extend(nft_items(&m)?);
    items.extend(route_items(&m, &links.names)?);
    items.extend(links.items);
    items.extend(files.into_iter().map(|path| Item::File { path }));
    let verb = if args.dry_run { "would remove" } else { "remove" };
    for i in &items {
        println!("{verb} {i}");
    }
    if items.is_empty() {
        println!("nothing of {:?} left on this node", args.from);
        return Ok(());
    }
    if args.dry_run {
        println!("dry run: nothing changed ({} item(s))", items.len());
        return Ok(());
    }
    let errors = remove(&items);
    if !errors.is_empty() {
        bail!("{} of {} removals failed:\n  {}", errors.len(), items.len(), errors.join("\n  "));
    }
    println!("removed {} item(s)", items.len());
    Ok(())
}
