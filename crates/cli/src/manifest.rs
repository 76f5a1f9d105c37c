//! Reading pool manifests: multi-document YAML (or JSON) of `CiliumPodIPPool` or allot's
//! `IPPool`.

use allot_wire::{API_VERSION, CILIUM_API_VERSION, CILIUM_POOL_KIND, POOL_KIND, PoolResource};

/// Parses every document; a syntax or type error names line and column.
pub fn parse_pools(text: &str, source: &str) -> anyhow::Result<Vec<PoolResource>> {
    let docs: Vec<PoolResource> =
        serde_saphyr::from_multiple(text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    if docs.is_empty() {
        anyhow::bail!("{source}: no pool documents found");
    }
    for (i, d) in docs.iter().enumerate() {
        let known = (d.api_version == CILIUM_API_VERSION && d.kind == CILIUM_POOL_KIND)
            || (d.api_version == API_VERSION && d.kind == POOL_KIND);
        if !known {
            anyhow::bail!(
                "{source}: document {} is apiVersion {:?} kind {:?}: expected {CILIUM_API_VERSION} {CILIUM_POOL_KIND} or {API_VERSION} {POOL_KIND}",
                i + 1,
                d.api_version,
                d.kind
            );
        }
        if d.metadata.name.is_empty() {
            anyhow::bail!("{source}: document {} has no metadata.name", i + 1);
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool of the Cilium multi-pool page, exactly as written there.
    const SEED_POOL: &str = include_str!("../tests/fixtures/seed-pool.yaml");

    #[test]
    fn seed_yaml_unchanged_and_multi_document() {
        let text = format!(
            "{SEED_POOL}---\napiVersion: allot.dev/v1\nkind: IPPool\nmetadata:\n  name: blue\n  labels: {{team: a}}\nspec:\n  ipv6:\n    cidrs: [\"fd01::/104\"]\n    maskSize: 120\n"
        );
        let pools = parse_pools(&text, "pools.yaml").unwrap();
        assert_eq!(pools.len(), 2);
        let green = &pools[0];
        assert_eq!(green.metadata.name, "green-pool");
        let v4 = green.spec.ipv4.as_ref().unwrap();
        assert_eq!(v4.mask_size, 24);
        assert_eq!(v4.cidrs.len(), 2);
        assert_eq!(green.spec.ipv6.as_ref().unwrap().mask_size, 120);
        assert!(pools[1].spec.ipv4.is_none());
    }

    #[test]
    fn malformed_yaml_names_line_and_column() {
        let bad = "apiVersion: cilium.io/v2alpha1\nkind: CiliumPodIPPool\nmetadata:\n  name: x\nspec:\n  ipv4:\n    cidrs: [10.0.0.0/16\n    maskSize: 24\n";
        let msg = parse_pools(bad, "bad.yaml").unwrap_err().to_string();
        assert!(msg.contains("bad.yaml") && msg.contains("line"), "{msg}");
        let bad_cidr = "apiVersion: cilium.io/v2alpha1\nkind: CiliumPodIPPool\nmetadata:\n  name: x\nspec:\n  ipv4:\n    cidrs:\n    - 10.0.0.0/33\n    maskSize: 24\n";
        let msg = parse_pools(bad_cidr, "bad.yaml").unwrap_err().to_string();
        assert!(msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn unknown_kind_is_refused() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\nspec: {}\n";
        let msg = parse_pools(text, "f").unwrap_err().to_string();
        assert!(msg.contains("document 1") && msg.contains("ConfigMap"), "{msg}");
    }
}
