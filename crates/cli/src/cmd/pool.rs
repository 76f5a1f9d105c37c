use allot_wire::{FamilySpec, PoolResource};

use crate::backend::Backend;
use clap::Subcommand;

use crate::manifest::parse_pools;
use crate::output::{Format, Table, print};

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create or update pools from a YAML file (`-` for stdin); CiliumPodIPPool or IPPool.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// List pools.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one pool.
    Get {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a pool no node holds blocks of.
    Delete { name: String },
}

fn family_cell(f: Option<&FamilySpec>) -> String {
    f.map_or("-".into(), |f| {
        format!("{} /{}", f.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","), f.mask_size)
    })
}

fn pool_table(pools: &[PoolResource]) -> Table {
    let mut t = Table::new(&["name", "ipv4 (cidrs /mask)", "ipv6 (cidrs /mask)"]);
    for p in pools {
        t.row(vec![p.metadata.name.clone(), family_cell(p.spec.ipv4.as_ref()), family_cell(p.spec.ipv6.as_ref())]);
    }
    t
}

pub fn exec(cmd: PoolCmd, backend: &Backend) -> anyhow::Result<()> {
    match cmd {
        PoolCmd::Apply { file, output } => {
            let (text, source) = if file == "-" {
                (std::io::read_to_string(std::io::stdin())?, "stdin".to_string())
            } else {
                let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {file}: {e}"))?;
                (text, file.clone())
            };
            let pools = parse_pools(&text, &source)?;
            let results = backend.apply(pools)?;
            print(output, &results, || {
                let mut t = Table::new(&["pool", "result"]);
                for r in &results {
                    t.row(vec![format!("pool/{}", r.name), r.action.to_string()]);
                }
                t
            })
        }
        PoolCmd::List { output } => {
            let pools = backend.pools()?;
            print(output, &pools, || pool_table(&pools))
        }
        PoolCmd::Get { name, output } => {
            let pool = backend.pool(&name)?;
            print(output, &pool, || pool_table(std::slice::from_ref(&pool)))
        }
        PoolCmd::Delete { name } => {
            backend.delete_pool(&name)?;
            println!("pool/{name} deleted");
            Ok(())
        }
    }
}
