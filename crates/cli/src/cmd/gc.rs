use crate::backend::Backend;
use allot_wire::{GcResponse, SweepRequest};

#[derive(clap::Args)]
pub struct Args {
    /// Only list what would be released.
    #[arg(long)]
    dry_run: bool,
}

pub fn exec(args: Args, backend: &Backend) -> anyhow::Result<()> {
    let client = backend.agent("allot gc")?;
    let r: GcResponse = client.post("/v1/gc", &SweepRequest { dry_run: args.dry_run })?;
    let verb = if args.dry_run { "would release" } else { "released" };
    for o in &r.released {
        println!("{verb} {o}");
    }
    println!("{} allocation(s) {verb}", r.released.len());
    Ok(())
}
