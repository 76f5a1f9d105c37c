//! `allot adopt`: hand the local agent addresses another IPAM gave out on this node, so it
//! never gives them out again while the old CNI's pods live.

use allot_wire::{AdoptHostLocalRequest, AdoptPodCidrRequest, AdoptResponse};
use clap::Subcommand;

use crate::backend::Backend;
use crate::output::{Format, print};

#[derive(Subcommand)]
pub enum AdoptCmd {
    /// Adopt the reference host-local plugin's allocations: DIR is its network directory,
    /// /var/lib/cni/networks/<network>. The agent keeps rescanning it (every 2 s): new leases
    /// are adopted, an address whose file is gone (the old plugin's DEL) is freed.
    HostLocal {
        dir: std::path::PathBuf,
        /// The pool the addresses must lie in (default: the pool whose CIDR holds each).
        #[arg(long)]
        pool: Option<String>,
        /// Only tell what would be adopted and claimed.
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Hold a node's old pod CIDR (spec.podCIDR of Kubernetes IPAM) as blocks of a pool for
    /// this node, so none of its addresses goes to another node or is given back.
    PodCidr {
        cidr: ipnet::IpNet,
        #[arg(long)]
        pool: String,
        /// Stop holding the CIDR's blocks (once the old pods are gone); empty ones are released.
        #[arg(long)]
        release: bool,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

fn report(r: &AdoptResponse) -> String {
    let would = if r.dry_run { "would " } else { "" };
    let mut out = String::new();
    for a in &r.adopted {
        let ips: Vec<String> = a.ips.iter().map(|i| format!("{} (pool {})", i.address.addr(), i.pool)).collect();
        out += &format!("{would}adopt {} {}\n", a.owner, ips.join(", "));
    }
    for b in &r.claimed {
        for c in &b.cidrs {
            out += &format!("{would}claim block {c} of pool {} for this node\n", b.pool);
        }
    }
    for o in &r.released {
        out += &format!("{would}free {o} (its host-local file is gone)\n");
    }
    let held: usize = r.held.iter().map(|h| h.cidrs.len()).sum();
    out += &format!(
        "{} adopted, {} already adopted (unchanged), {} block(s) {}claimed, {held} already held{}\n",
        r.adopted.len(),
        r.unchanged.len(),
        r.claimed.iter().map(|c| c.cidrs.len()).sum::<usize>(),
        would,
        if r.dry_run { " (dry run: nothing changed)" } else { "" }
    );
    out
}

pub fn exec(cmd: AdoptCmd, backend: &Backend) -> anyhow::Result<()> {
    let client = backend.agent("allot adopt")?;
    let (r, output): (AdoptResponse, Format) = match cmd {
        AdoptCmd::HostLocal { dir, pool, dry_run, output } => {
            // The agent reads the directory: give it a path it can resolve the same way.
            let dir = std::path::absolute(&dir)?;
            (client.post("/v1/adopt/host-local", &AdoptHostLocalRequest { dir: dir.display().to_string(), pool, dry_run })?, output)
        }
        AdoptCmd::PodCidr { cidr, pool, release, dry_run, output } => {
            let r: AdoptResponse = client.post("/v1/adopt/pod-cidr", &AdoptPodCidrRequest { cidr, pool, dry_run, release })?;
            if release && output == Format::Table {
                let verb = if dry_run { "would stop" } else { "stopped" };
                println!("{verb} holding {cidr} for adoption; its empty blocks are given back as demand allows");
                return Ok(());
            }
            (r, output)
        }
    };
    match output {
        Format::Table => {
            print!("{}", report(&r));
            Ok(())
        }
        f => print(f, &r, || unreachable!()),
    }
}
