use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use allot_agent::config::{AgentConfig, ConfigFile, parse_pre_allocation};
use allot_core::{FamilySpec, PoolSpec};
use anyhow::Context;

use crate::backend::{ClusterFlags, StoreKind};

#[derive(clap::Args)]
pub struct Args {
    /// This node's name (default: $NODE_NAME, set from the downward API in allot's
    /// DaemonSet, else the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Where the agent keeps its files (default /var/lib/allot).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Addresses kept in reserve per pool and family, as pool=count,... (default: default=8).
    #[arg(long, value_name = "POOL=N,...")]
    pre_allocation: Option<String>,
    /// The pool for pods no annotation places (default: default).
    #[arg(long)]
    default_pool: Option<String>,
    /// Create this pool at start if it is absent: NAME=CIDR@MASK[,CIDR@MASK...]. Repeatable.
    #[arg(long = "pool", value_name = "NAME=CIDR@MASK,...")]
    pools: Vec<String>,
    /// How long an ADD waits for a new block before answering "try again later" (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION")]
    add_wait: Option<String>,
    /// New addresses come from this node's blocks only while the cluster store confirmed them
    /// within this long (default 5m; keep it below the operator's --node-gc-after).
    #[arg(long, value_name = "DURATION")]
    max_view_age: Option<String>,
    /// This node's IP on the node network (cluster mode; other nodes route to it).
    #[arg(long)]
    node_ip: Option<std::net::IpAddr>,
    /// Install a kernel route for every block another node holds, via that node's IP
    /// (cluster mode, nodes on one L2 network).
    #[arg(long)]
    auto_direct_node_routes: bool,
    /// Keep the first usable address of every block for the node (the gateway that `bridge`
    /// with isGateway and `ptp` give the host side), and return it as the gateway in CNI
    /// results. On by default; `--reserve-gateway=false` hands it to pods.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    reserve_gateway: Option<bool>,
    /// Serve /metrics (Prometheus), /healthz, /readyz and a status page on this TCP address,
    /// e.g. 127.0.0.1:9962 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Adopt this host-local network directory (/var/lib/cni/networks/<network>) at start and
    /// keep rescanning it; no new addresses until it is adopted. Repeatable.
    #[arg(long, value_name = "DIR")]
    adopt_host_local: Vec<PathBuf>,
    /// A --adopt-host-local directory that does not exist holds no address (host-local makes it
    /// at its first lease): serve, and adopt it when it appears. For a DaemonSet whose nodes may
    /// never have run the old CNI. Without it a missing directory stops ADDs (a wrong path or a
    /// missing mount must not pass for "nothing to adopt").
    #[arg(long, requires = "adopt_host_local")]
    adopt_host_local_missing_ok: bool,
    /// On Kubernetes, how long an ADD whose runtime passed no pod annotations waits for the
    /// pod watch to see the pod (default 5s), before choosing by namespace or the default pool.
    #[arg(long, value_name = "DURATION")]
    pod_wait: Option<String>,
}

/// `10s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().with_context(|| format!("duration {s:?}: expected a number with ms, s or m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => anyhow::bail!("duration {s:?}: unit must be ms, s or m"),
    };
    duration_from_secs(secs).with_context(|| format!("duration {s:?}"))
}

/// The longest duration any flag takes: longer ones are typos (`1e29`), not intentions.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Seconds as a Duration, refusing negative, non-finite and absurd values (instead of the
/// panic of `Duration::from_secs_f64`).
pub fn duration_from_secs(secs: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(secs.is_finite() && secs >= 0.0, "must be a non-negative number of seconds, not {secs}");
    anyhow::ensure!(
        secs <= MAX_DURATION.as_secs_f64(),
        "{secs} seconds is more than the limit of {}h: give a shorter duration",
        MAX_DURATION.as_secs() / 3600
    );
    Ok(Duration::from_secs_f64(secs))
}

/// `NAME=CIDR@MASK[,CIDR@MASK...]`, CIDRs of either family.
pub fn parse_pool_flag(s: &str) -> anyhow::Result<(String, PoolSpec)> {
    let (name, rest) = s.split_once('=').with_context(|| format!("--pool {s:?}: expected NAME=CIDR@MASK,..."))?;
    let mut spec = PoolSpec::default();
    for part in rest.split(',').filter(|p| !p.is_empty()) {
        let (cidr, mask) = part.split_once('@').with_context(|| format!("--pool {s:?}: {part:?} needs @MASK (block size)"))?;
        let cidr: ipnet::IpNet = cidr.parse().with_context(|| format!("--pool {s:?}: {cidr:?} is not a CIDR"))?;
        let mask: u8 = mask.parse().with_context(|| format!("--pool {s:?}: mask {mask:?} is not a number"))?;
        let slot = if cidr.addr().is_ipv4() { &mut spec.ipv4 } else { &mut spec.ipv6 };
        let fam = slot.get_or_insert_with(|| FamilySpec { cidrs: Vec::new(), mask_size: mask });
        anyhow::ensure!(fam.mask_size == mask, "--pool {s:?}: one family has one mask size");
        fam.cidrs.push(cidr);
    }
    Ok((name.to_string(), spec))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub fn build_config(args: &Args, socket: Option<&str>) -> anyhow::Result<AgentConfig> {
    let file: ConfigFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => ConfigFile::default(),
    };
    let node = args
        .node
        .clone()
        .or(file.node)
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.trim().is_empty()))
        .unwrap_or_else(hostname);
    let mut cfg = AgentConfig::new(node);
    if let Some(d) = args.data_dir.clone().or(file.data_dir) {
        cfg.data_dir = d;
    }
    if let Some(s) = socket.map(PathBuf::from).or(file.socket) {
        cfg.socket = s;
    }
    if let Some(m) = file.pre_allocation {
        cfg.pre_allocation = m;
    }
    if let Some(s) = &args.pre_allocation {
        cfg.pre_allocation = parse_pre_allocation(s).map_err(|e| anyhow::anyhow!("--pre-allocation: {e}"))?;
    }
    if let Some(p) = args.default_pool.clone().or(file.default_pool) {
        cfg.default_pool = p;
    }
    let mut pools: BTreeMap<String, PoolSpec> = file.auto_create_pools.unwrap_or_default();
    for p in &args.pools {
        let (name, spec) = parse_pool_flag(p)?;
        pools.insert(name, spec);
    }
    cfg.auto_create_pools = pools;
    if let Some(secs) = file.add_wait_seconds {
        cfg.add_wait = duration_from_secs(secs).context("addWaitSeconds")?;
    }
    if let Some(w) = &args.add_wait {
        cfg.add_wait = parse_duration(w).context("--add-wait")?;
    }
    if let Some(secs) = file.max_view_age_seconds {
        cfg.max_view_age = duration_from_secs(secs).context("maxViewAgeSeconds")?;
    }
    if let Some(w) = &args.max_view_age {
        cfg.max_view_age = parse_duration(w).context("--max-view-age")?;
    }
    cfg.node_ip = args.node_ip.or(file.node_ip);
    cfg.direct_routes = args.auto_direct_node_routes || file.auto_direct_node_routes.unwrap_or(false);
    cfg.reserve_gateway = args.reserve_gateway.or(file.reserve_gateway).unwrap_or(true);
    cfg.metrics_addr = args.metrics_addr;
    cfg.adopt_host_local = args.adopt_host_local.iter().map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())).collect();
    cfg.adopt_missing_ok = args.adopt_host_local_missing_ok;
    if let Some(secs) = file.pod_wait_seconds {
        cfg.pod_wait = duration_from_secs(secs).context("podWaitSeconds")?;
    }
    if let Some(w) = &args.pod_wait {
        cfg.pod_wait = parse_duration(w).context("--pod-wait")?;
    }
    Ok(cfg)
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
}

pub fn exec(args: Args, socket: Option<&str>, cluster: &ClusterFlags) -> anyhow::Result<()> {
    init_logging();
    let cfg = build_config(&args, socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cluster.store_kind()? {
        StoreKind::Embedded => {
            anyhow::ensure!(!cfg.direct_routes, "--auto-direct-node-routes needs cluster mode (--etcd-endpoints or --store kubernetes)");
            rt.block_on(allot_agent::run_standalone(cfg, shutdown_signal()))?;
            Ok(())
        }
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => {
            let etcd = cluster.config()?;
            rt.block_on(allot_agent::run_cluster(cfg, etcd, shutdown_signal()))?;
            Ok(())
        }
        #[cfg(feature = "kubernetes")]
        StoreKind::Kubernetes => rt.block_on(async {
            let client = cluster.kube_client().await?;
            allot_agent::kube_cluster::run_kubernetes(cfg, client, cluster.kube_store_options(), shutdown_signal()).await?;
            Ok(())
        }),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("this allot was built without the {other:?} store (cargo feature)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }

    /// `Duration::from_secs_f64` panics past u64 seconds; absurd values are refused instead.
    #[test]
    fn absurd_durations_are_refused_not_panicked_on() {
        for s in ["100000000000000000000000000000", "1e29", "99999999999999999999999999999ms", "inf", "NaN", "-1s", "1441m", "86401"] {
            let e = parse_duration(s).expect_err(s);
            assert!(format!("{e:#}").contains(s.trim()), "{s}: {e:#}");
        }
        assert_eq!(parse_duration("1440m").unwrap(), MAX_DURATION);
        assert!(duration_from_secs(1e29).is_err());
    }

    #[test]
    fn pool_flag() {
        let (name, spec) = parse_pool_flag("default=10.10.0.0/16@24,fd00:10::/104@120").unwrap();
        assert_eq!(name, "default");
        assert_eq!(spec.ipv4.unwrap().mask_size, 24);
        assert_eq!(spec.ipv6.unwrap().cidrs[0].to_string(), "fd00:10::/104");
        assert!(parse_pool_flag("x=10.0.0.0/16").is_err());
        assert!(parse_pool_flag("x=10.0.0.0/16@24,10.1.0.0/16@25").is_err());
    }

    #[test]
    fn config_file_with_the_seeds_auto_create_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "node: n1\npreAllocation: {default: 16, other: 2}\naddWaitSeconds: 1.5\nmaxViewAgeSeconds: 120\nautoCreatePools:\n  default:\n    ipv4:\n      cidrs:\n        - 10.10.0.0/16\n      maskSize: 24\n  other:\n    ipv4:\n      cidrs:\n        - 10.20.0.0/16\n      maskSize: 24\n",
        )
        .unwrap();
        let args = Args {
            node: None,
            data_dir: None,
            config: Some(path),
            pre_allocation: None,
            default_pool: Some("other".into()),
            pools: vec![],
            add_wait: None,
            max_view_age: None,
            node_ip: None,
            auto_direct_node_routes: false,
            reserve_gateway: None,
            metrics_addr: None,
            adopt_host_local: vec![],
            adopt_host_local_missing_ok: false,
            pod_wait: Some("2s".into()),
        };
        let cfg = build_config(&args, Some("/tmp/x.sock")).unwrap();
        assert_eq!(cfg.node, "n1");
        assert_eq!(cfg.max_view_age, Duration::from_secs(120));
        assert_eq!(cfg.pre_alloc("default"), 16);
        assert_eq!(cfg.default_pool, "other");
        assert_eq!(cfg.auto_create_pools.len(), 2);
        assert_eq!(cfg.add_wait, Duration::from_millis(1500));
        assert_eq!(cfg.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(cfg.pod_wait, Duration::from_secs(2));
    }

    /// Issue 9, point 1: the gateway is reserved unless a flag or the file turns it off.
    #[test]
    fn gateway_reserved_by_default_flag_and_file_opt_out() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let dir = tempfile::tempdir().unwrap();
        let off = dir.path().join("off.yaml");
        std::fs::write(&off, "reserveGateway: false\n").unwrap();
        let off = off.display().to_string();
        for (argv, want) in [
            (vec![], true),
            (vec!["--reserve-gateway"], true),
            (vec!["--reserve-gateway=false"], false),
            (vec!["--config", &off], false),
            (vec!["--config", &off, "--reserve-gateway"], true),
            (vec!["--config", &off, "--reserve-gateway=true"], true),
        ] {
            let cli = <Cli as clap::Parser>::try_parse_from(std::iter::once("agent").chain(argv.iter().copied())).unwrap();
            assert_eq!(build_config(&cli.args, None).unwrap().reserve_gateway, want, "{argv:?}");
        }
    }
}
