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
        /// The CIDR (or --from-node).
        #[arg(required_unless_present = "from_node", conflicts_with = "from_node")]
        cidr: Option<ipnet::IpNet>,
        /// Read the CIDRs from this agent's Node object in the Kubernetes API (spec.podCIDRs),
        /// with --kubeconfig or the in-cluster config.
        #[arg(long)]
        from_node: bool,
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

/// A Node's pod CIDRs as Kubernetes IPAM assigned them (`spec.podCIDRs`, else `spec.podCIDR`).
pub async fn node_pod_cidrs(client: kube::Client, node: &str) -> anyhow::Result<Vec<ipnet::IpNet>> {
    use anyhow::Context;
    let n = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client)
        .get_opt(node)
        .await
        .with_context(|| format!("reading Node {node}"))?
        .with_context(|| format!("Node {node} (this agent's --node) does not exist in the cluster"))?;
    let spec = n.spec.unwrap_or_default();
    let cidrs = spec.pod_cidrs.filter(|c| !c.is_empty()).or(spec.pod_cidr.map(|c| vec![c])).unwrap_or_default();
    anyhow::ensure!(
        !cidrs.is_empty(),
        "Node {node} has no spec.podCIDR: the cluster does not give nodes pod CIDRs (the controller manager's --allocate-node-cidrs); give the old CNI's CIDR instead"
    );
    cidrs.iter().map(|c| c.parse().with_context(|| format!("Node {node}'s spec.podCIDRs holds {c:?}, not a CIDR"))).collect()
}

pub fn exec(cmd: AdoptCmd, backend: &Backend, kubeconfig: Option<&std::path::Path>) -> anyhow::Result<()> {
    let client = backend.agent("allot adopt")?;
    let (r, output): (AdoptResponse, Format) = match cmd {
        AdoptCmd::HostLocal { dir, pool, dry_run, output } => {
            // The agent reads the directory: give it a path it can resolve the same way.
            let dir = std::path::absolute(&dir)?;
            (client.post("/v1/adopt/host-local", &AdoptHostLocalRequest { dir: dir.display().to_string(), pool, dry_run })?, output)
        }
        AdoptCmd::PodCidr { cidr, from_node, pool, release, dry_run, output } => {
            let cidrs = match cidr {
                Some(c) => vec![c],
                None if from_node => {
                    let node = client.get::<allot_wire::Status>("/v1/status")?.node;
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(async {
                        let kube = allot_k8s::client(kubeconfig).await.map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API for --from-node: {e}"))?;
                        node_pod_cidrs(kube, &node).await
                    })?
                }
                None => anyhow::bail!("give the pod CIDR, or --from-node"),
            };
            let mut all = AdoptResponse { dry_run, ..Default::default() };
            for cidr in cidrs {
                let r: AdoptResponse = client.post("/v1/adopt/pod-cidr", &AdoptPodCidrRequest { cidr, pool: pool.clone(), dry_run, release })?;
                if release && output == Format::Table {
                    let verb = if dry_run { "would stop" } else { "stopped" };
                    println!("{verb} holding {cidr} for adoption; its empty blocks are given back as demand allows");
                    continue;
                }
                all.adopted.extend(r.adopted);
                all.unchanged.extend(r.unchanged);
                all.claimed.extend(r.claimed);
                all.held.extend(r.held);
                all.released.extend(r.released);
            }
            if release && output == Format::Table {
                return Ok(());
            }
            (all, output)
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

#[cfg(test)]
mod tests {
    /// spec.podCIDRs read from a Node on the in-process fake API server (no Kubernetes API
    /// server runs here): both families; a node without one and a missing node are clear errors.
    #[tokio::test]
    async fn fake_api_node_pod_cidrs_come_from_the_node_object() {
        let api = allot_kube_fake::FakeApiServer::new();
        api.insert(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w1"},
            "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24", "fd00:10:244:3::/64"]}}));
        api.insert(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w2"}, "spec": {}}));
        let got = super::node_pod_cidrs(api.client(), "w1").await.unwrap();
        assert_eq!(got, vec!["10.244.3.0/24".parse::<ipnet::IpNet>().unwrap(), "fd00:10:244:3::/64".parse().unwrap()]);
        let e = super::node_pod_cidrs(api.client(), "w2").await.unwrap_err().to_string();
        assert!(e.contains("no spec.podCIDR") && e.contains("give the old CNI's CIDR"), "{e}");
        let e = super::node_pod_cidrs(api.client(), "w9").await.unwrap_err().to_string();
        assert!(e.contains("Node w9") && e.contains("does not exist"), "{e}");
    }
}
