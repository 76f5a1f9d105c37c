use crate::backend::Backend;
use allot_wire::{GcResponse, SweepRequest};

#[derive(clap::Args)]
pub struct Args {
    /// Release what the sweep finds. Without it, `allot gc` only lists what it would release.
    #[arg(long)]
    force: bool,
    /// Only list what would be released (the default; kept for scripts).
    #[arg(long, conflicts_with = "force")]
    dry_run: bool,
}

pub fn exec(args: Args, backend: &Backend) -> anyhow::Result<()> {
    let client = backend.agent("allot gc")?;
    let dry_run = !args.force;
    let r: GcResponse = client.post("/v1/gc", &SweepRequest { dry_run })?;
    let verb = if dry_run { "would release" } else { "released" };
    for o in &r.released {
        println!("{verb} {o}");
    }
    println!("{} allocation(s) {verb}", r.released.len());
    if dry_run && !r.released.is_empty() {
        println!("run `allot gc --force` to release them");
    }
    Ok(())
}
