use crate::backend::Backend;
use allot_wire::Allocation;
use clap::Subcommand;
use serde::Serialize;

use crate::output::{Format, Table, print};

#[derive(Subcommand)]
pub enum AllocationsCmd {
    /// List this node's allocations, one row per address.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

/// One address and who holds it: the shape `-o json|yaml` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    ip: String,
    pool: String,
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
    namespace: Option<String>,
    pod: Option<String>,
    network: String,
    /// `cni`, or `adopted:<ipam>` for an address adopted from the old CNI.
    source: String,
}

pub fn exec(cmd: AllocationsCmd, backend: &Backend) -> anyhow::Result<()> {
    let AllocationsCmd::List { output } = cmd;
    let client = backend.agent("allocations list")?;
    let list: Vec<Allocation> = client.get("/v1/allocations")?;
    let rows: Vec<Row> = list
        .iter()
        .flat_map(|a| {
            a.ips.iter().map(|ip| Row {
                ip: ip.address.addr().to_string(),
                pool: ip.pool.clone(),
                container_id: a.owner.container_id.clone(),
                ifname: a.owner.ifname.clone(),
                namespace: a.pod.namespace.clone(),
                pod: a.pod.name.clone(),
                network: a.owner.network.clone(),
                source: a.source.to_string(),
            })
        })
        .collect();
    print(output, &rows, || {
        let mut t = Table::new(&["ip", "pool", "container", "ifname", "namespace", "pod", "network", "source"]);
        for r in &rows {
            let short: String = r.container_id.chars().take(12).collect();
            let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
            t.row(vec![r.ip.clone(), r.pool.clone(), short, r.ifname.clone(), dash(&r.namespace), dash(&r.pod), r.network.clone(), r.source.clone()]);
        }
        t
    })
}
