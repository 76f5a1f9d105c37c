//! `allot`: the CLI and the daemon entry point. Thin: parse, call a library, print.

use std::time::Duration;

use clap::{Parser, Subcommand};

mod backend;
mod cmd;
mod manifest;
mod output;

#[derive(Parser)]
#[command(name = "allot", version, about = "Multi-pool IP address management for Kubernetes and any CNI runtime")]
struct Cli {
    /// The agent's unix socket.
    #[arg(long, global = true, env = "ALLOT_SOCKET", value_name = "PATH")]
    socket: Option<String>,
    #[command(flatten)]
    cluster: backend::ClusterFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (standalone: embedded store and operator loop in-process; with
    /// --etcd-endpoints or --store kubernetes: one node of a cluster).
    Agent(cmd::agent::Args),
    /// Run the operator against etcd or Kubernetes (leader-elected; run several replicas).
    #[cfg(any(feature = "etcd", feature = "kubernetes"))]
    Operator(cmd::operator::Args),
    /// Manage IP pools.
    #[command(subcommand)]
    Pool(cmd::pool::PoolCmd),
    /// Show or remove nodes.
    #[command(subcommand)]
    Node(cmd::node::NodeCmd),
    /// Annotate namespaces (pool choice for pods without their own annotation).
    #[command(subcommand)]
    Namespace(cmd::namespace::NamespaceCmd),
    /// List this node's allocations.
    #[command(subcommand)]
    Allocations(cmd::allocations::AllocationsCmd),
    /// Pool use on this node and cluster-wide.
    Status(cmd::status::Args),
    /// Release allocations whose network namespace no longer exists.
    Gc(cmd::gc::Args),
    /// Kubermatic (KKP) Cluster rules offline: `allot kkp validate --old OLD --new NEW`.
    #[command(subcommand)]
    Kkp(cmd::kkp::KkpCmd),
    /// Serve the validating admission webhook (KKP Cluster rules) over HTTPS.
    #[cfg(feature = "webhook")]
    Webhook(cmd::webhook::Args),
    /// Print the Kubernetes CRDs (allot.dev/v1), generated from the types, as YAML.
    Crds(cmd::crds::Args),
    /// Install allot-ipam (and a conflist) into the host's CNI directories: the agent
    /// DaemonSet's init container.
    InstallCni(cmd::install_cni::Args),
    /// Move the cluster from one CNI to another (plan first).
    #[command(subcommand)]
    Migrate(cmd::migrate::MigrateCmd),
    /// Adopt addresses another IPAM handed out on this node (CNI migration).
    #[command(subcommand)]
    Adopt(cmd::adopt::AdoptCmd),
}

/// `println!` panics when stdout is a closed pipe (`allot ... | head -c1`); like other Unix
/// tools, allot then stops quietly.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() {
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(|| allot_client::DEFAULT_SOCKET.to_string());
    let client = allot_client::Client::new(&socket, Duration::from_secs(60));
    let result = match cli.command {
        Command::Agent(args) => cmd::agent::exec(args, cli.socket.as_deref(), &cli.cluster),
        #[cfg(any(feature = "etcd", feature = "kubernetes"))]
        Command::Operator(args) => cmd::operator::exec(args, &cli.cluster),
        Command::Kkp(c) => std::process::exit(cmd::kkp::exec(c)),
        #[cfg(feature = "webhook")]
        Command::Webhook(args) => cmd::webhook::exec(args, &cli.cluster),
        Command::Crds(args) => cmd::crds::exec(args),
        Command::InstallCni(args) => cmd::install_cni::exec(args),
        Command::Migrate(c) => cmd::migrate::exec(c),
        command => backend::Backend::new(client, &cli.cluster).and_then(|b| match command {
            Command::Pool(c) => cmd::pool::exec(c, &b),
            Command::Node(c) => cmd::node::exec(c, &b),
            Command::Namespace(c) => cmd::namespace::exec(c, &b),
            Command::Allocations(c) => cmd::allocations::exec(c, &b),
            Command::Status(a) => cmd::status::exec(a, &b),
            Command::Gc(a) => cmd::gc::exec(a, &b),
            Command::Adopt(c) => cmd::adopt::exec(c, &b, cli.cluster.kubeconfig.as_deref()),
            _ => unreachable!("handled above"),
        }),
    };
    if let Err(e) = result {
        if output::is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
