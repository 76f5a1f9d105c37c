use allot_wire::NodeResource;

use crate::backend::Backend;
use clap::Subcommand;

use crate::output::{Format, Table, print};

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show a node (this agent's node when NAME is left out), in CiliumNode shape.
    Get {
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a departed node and release every block it holds. A live node (its agent keeps
    /// its liveness lease) is refused unless --force.
    Delete {
        name: String,
        /// Delete even while the node's agent runs: its pods' addresses may then be handed out
        /// again once the grace ends.
        #[arg(long)]
        force: bool,
        /// Keep the released blocks from other nodes for this long (etcd; default 5m).
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
    },
    /// Make a new CNI conflist the one the runtime uses on this node (old configs kept aside
    /// for --rollback).
    Switch(super::node_switch::Args),
    /// Remove what an old CNI left on this node: config files, links, routes, iptables and
    /// nftables chains. Refused while pods still use it.
    Cleanup(super::node_cleanup::Args),
}

fn node_table(nodes: &[NodeResource]) -> Table {
    let mut t = Table::new(&["name", "pool", "requested v4/v6", "allocated", "error"]);
    for n in nodes {
        let pools = &n.spec.ipam.pools;
        let mut names: Vec<&str> = pools.requested.iter().map(|r| r.pool.as_str()).collect();
        names.extend(pools.allocated.iter().map(|a| a.pool.as_str()));
        names.sort();
        names.dedup();
        let err = n.status.ipam.operator_status.error.clone().unwrap_or_default();
        if names.is_empty() {
            t.row(vec![n.metadata.name.clone(), "-".into(), "-".into(), "-".into(), err.clone()]);
        }
        for pool in names {
            let req = pools.requested.iter().find(|r| r.pool == pool).map(|r| r.needed).unwrap_or_default();
            let cidrs = pools
                .allocated
                .iter()
                .find(|a| a.pool == pool)
                .map_or("-".into(), |a| a.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","));
            t.row(vec![
                n.metadata.name.clone(),
                pool.to_string(),
                format!("{}/{}", req.ipv4_addrs, req.ipv6_addrs),
                cidrs,
                err.clone(),
            ]);
        }
    }
    t
}

pub fn exec(cmd: NodeCmd, backend: &Backend) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::List { output } => {
            let nodes = backend.nodes()?;
            print(output, &nodes, || node_table(&nodes))
        }
        NodeCmd::Get { name, output } => {
            let node = backend.node(name)?;
            print(output, &node, || node_table(std::slice::from_ref(&node)))
        }
        NodeCmd::Delete { name, force, grace } => {
            let grace = grace.as_deref().map(crate::cmd::agent::parse_duration).transpose()?;
            let released = backend.delete_node(&name, force, grace)?;
            println!("node/{name} deleted ({released} blocks released)");
            Ok(())
        }
        NodeCmd::Switch(args) => super::node_switch::exec(args),
        NodeCmd::Cleanup(args) => super::node_cleanup::exec(args, backend),
    }
}
