use allot_client::Client;
use allot_wire::Status;

use crate::output::{Format, Table, print, usage_bar};

#[derive(clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
}

pub fn exec(args: Args, client: &Client) -> anyhow::Result<()> {
    let status: Status = client.get("/v1/status")?;
    print(args.output, &status, || {
        let mut t = Table::new(&["pool", "family", "capacity", "blocks node/cluster", "in use", "free", "requested", "node usage"]);
        for p in &status.pools {
            let cap: u128 = p.node_capacity.parse().unwrap_or(0);
            t.row(vec![
                p.pool.clone(),
                p.family.to_string(),
                p.capacity.clone(),
                format!("{}/{}", p.blocks_node, p.blocks_cluster),
                p.in_use.to_string(),
                p.free.clone(),
                p.requested.to_string(),
                usage_bar(u128::from(p.in_use), cap, 20),
            ]);
        }
        t
    })?;
    if args.output == Format::Table {
        println!("node {}: {}", status.node, if status.ready { "ready" } else { "restoring" });
    }
    Ok(())
}
