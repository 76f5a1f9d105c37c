//! The pure checks behind allot's validating admission webhook for `IPPool`: the same rules
//! the store applies to its own writes (allot_core's validation against the blocks nodes
//! hold), for changes made with kubectl. The webhook server (TLS, AdmissionReview) lives
//! elsewhere; it reads the pools and `IPBlock`s and calls these.

use allot_core::{BlockGrant, Pool, PoolSpec, pool as rules};
use kube::ResourceExt;

use crate::IPPool;

/// Whether `new` (a create when `old` is None, else an update of `old`) may be admitted, given
/// every pool in the cluster and the blocks nodes hold. The error says what is wrong.
pub fn review_pool_change(old: Option<&IPPool>, new: &IPPool, all_pools: &[Pool], grants: &[BlockGrant]) -> Result<(), String> {
    let name = new.name_any();
    let spec = PoolSpec::try_from(&new.spec).map_err(|e| format!("IPPool {name:?}: {e}"))?;
    let mut existing: Vec<Pool> = all_pools.iter().filter(|p| p.name != name).cloned().collect();
    if let Some(old) = old {
        let old_spec = PoolSpec::try_from(&old.spec).map_err(|e| format!("IPPool {name:?} as stored: {e}"))?;
        existing.push(Pool { name: name.clone(), spec: old_spec });
    } else if let Some(stored) = all_pools.iter().find(|p| p.name == name) {
        existing.push(stored.clone());
    }
    rules::validate_apply(&existing, grants, &[Pool { name, spec }]).map(|_| ()).map_err(|e| e.to_string())
}

/// Whether pool `name` may be deleted: no node holds a block of it.
pub fn review_pool_delete(name: &str, grants: &[BlockGrant]) -> Result<(), String> {
    rules::validate_delete(name, grants).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPoolSpec, IPv4PoolSpec};

    fn ippool(name: &str, cidrs: &[&str], mask: u8) -> IPPool {
        IPPool::new(name, IPPoolSpec { ipv4: Some(IPv4PoolSpec { cidrs: cidrs.iter().map(|c| c.to_string()).collect(), mask_size: mask }), ipv6: None })
    }

    fn pool(p: &IPPool) -> Pool {
        Pool { name: p.name_any(), spec: PoolSpec::try_from(&p.spec).unwrap() }
    }

    fn grant(pool: &str, cidr: &str, node: &str) -> BlockGrant {
        BlockGrant { pool: pool.into(), cidr: cidr.parse().unwrap(), node: node.into() }
    }

    #[test]
    fn removing_a_cidr_a_node_holds_is_refused_naming_the_node() {
        let old = ippool("a", &["10.0.0.0/24", "10.1.0.0/24"], 28);
        let new = ippool("a", &["10.1.0.0/24"], 28);
        let held = [grant("a", "10.0.0.16/28", "n1")];
        let err = review_pool_change(Some(&old), &new, &[pool(&old)], &held).unwrap_err();
        assert!(err.contains("10.0.0.0/24") && err.contains("n1"), "{err}");
        // Without the block the same change is fine, and so is growing the pool.
        review_pool_change(Some(&old), &new, &[pool(&old)], &[]).unwrap();
        review_pool_change(Some(&old), &ippool("a", &["10.0.0.0/24", "10.1.0.0/24", "10.2.0.0/24"], 28), &[pool(&old)], &held).unwrap();
    }

    #[test]
    fn overlaps_mask_changes_and_bad_cidrs_are_refused() {
        let a = ippool("a", &["10.0.0.0/16"], 24);
        let err = review_pool_change(None, &ippool("b", &["10.0.128.0/17"], 24), &[pool(&a)], &[]).unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        let err = review_pool_change(Some(&a), &ippool("a", &["10.0.0.0/16"], 26), &[pool(&a)], &[]).unwrap_err();
        assert!(err.contains("mask"), "{err}");
        let err = review_pool_change(None, &ippool("c", &["10.9.0.0/33"], 24), &[pool(&a)], &[]).unwrap_err();
        assert!(err.contains("10.9.0.0/33"), "{err}");
        review_pool_change(None, &ippool("c", &["10.9.0.0/16"], 24), &[pool(&a)], &[]).unwrap();
    }

    #[test]
    fn a_pool_in_use_cannot_be_deleted() {
        let err = review_pool_delete("a", &[grant("a", "10.0.0.0/28", "n1")]).unwrap_err();
        assert!(err.contains("n1"), "{err}");
        review_pool_delete("a", &[grant("b", "10.0.0.0/28", "n1")]).unwrap();
    }
}
