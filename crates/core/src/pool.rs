//! Pool specifications and the rules a change to the set of pools must keep.
//!
//! Every check runs against the whole proposed state, so a refused change can be refused before
//! anything is written.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cidr::{self, Family};

/// One family's part of a pool: the CIDRs blocks are cut from, and the block size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilySpec {
    pub cidrs: Vec<IpNet>,
    #[serde(rename = "maskSize")]
    pub mask_size: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<FamilySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilySpec>,
}

impl PoolSpec {
    pub fn family(&self, family: Family) -> Option<&FamilySpec> {
        match family {
            Family::V4 => self.ipv4.as_ref(),
            Family::V6 => self.ipv6.as_ref(),
        }
    }

    pub fn families(&self) -> impl Iterator<Item = (Family, &FamilySpec)> {
        Family::ALL.into_iter().filter_map(|f| self.family(f).map(|s| (f, s)))
    }

    /// Total addresses across the pool's CIDRs for one family (saturating).
    pub fn capacity(&self, family: Family) -> u128 {
        self.family(family).map_or(0, |s| {
            s.cidrs.iter().fold(0u128, |acc, c| {
                acc.saturating_add(cidr::size_of(family, c.prefix_len()))
            })
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub spec: PoolSpec,
}

/// A block of a pool held by a node. The cluster store keeps one key per block, so a block has
/// at most one holder by construction.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockGrant {
    pub pool: String,
    pub cidr: IpNet,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "invalid pool name {0:?}: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (at most 253 characters)"
    )]
    InvalidName(String),
    #[error("pool {0:?} has neither ipv4 nor ipv6: give it at least one family")]
    NoFamilies(String),
    #[error("pool {pool:?}: {family} has no cidrs: list at least one")]
    NoCidrs { pool: String, family: Family },
    #[error("pool {pool:?}: {cidr} is not an {family} CIDR: move it to the {family_of_cidr} section")]
    WrongFamily { pool: String, family: Family, cidr: IpNet, family_of_cidr: Family },
    #[error("pool {pool:?}: {cidr} has host bits set: write it as {canonical}")]
    NonCanonical { pool: String, cidr: IpNet, canonical: IpNet },
    #[error(
        "pool {pool:?}: {cidr} overlaps the IPv4-mapped range ::ffff:0:0/96: write IPv4 addresses as an ipv4 CIDR (::ffff:10.0.0.0/112 is 10.0.0.0/16)"
    )]
    Ipv4Mapped { pool: String, cidr: IpNet },
    #[error(
        "pool {pool:?}: {family} maskSize {mask_size} is shorter than the prefix of {cidr}: blocks must fit inside each CIDR"
    )]
    MaskTooShort { pool: String, family: Family, mask_size: u8, cidr: IpNet },
    #[error("pool {pool:?}: {family} maskSize {mask_size} is longer than {max}")]
    MaskTooLong { pool: String, family: Family, mask_size: u8, max: u8 },
    #[error("{cidr_a} (pool {pool_a:?}) overlaps {cidr_b} (pool {pool_b:?}): pool CIDRs must be disjoint")]
    Overlap { pool_a: String, cidr_a: IpNet, pool_b: String, cidr_b: IpNet },
    #[error(
        "pool {pool:?}: {family} maskSize cannot change from {old} to {new}: nodes hold blocks of the old size; create a new pool instead"
    )]
    MaskChange { pool: String, family: Family, old: u8, new: u8 },
    #[error(
        "pool {pool:?}: cannot remove {cidr}: node(s) {} hold blocks of it; drain those nodes first",
        .nodes.join(", ")
    )]
    CidrInUse { pool: String, cidr: IpNet, nodes: Vec<String> },
    #[error(
        "pool {pool:?} is in use: node(s) {} hold blocks of it; drain those nodes first",
        .nodes.join(", ")
    )]
    PoolInUse { pool: String, nodes: Vec<String> },
    #[error("pool {0:?} appears twice in one apply: give each pool once")]
    Duplicate(String),
}

/// What applying a pool did, in kubectl's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        })
    }
}

pub fn validate_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(PoolError::InvalidName(name.to_string())) }
}

/// Checks one pool on its own: name, families, canonical CIDRs, mask sizes, no overlap inside.
pub fn validate_pool(pool: &Pool) -> Result<(), PoolError> {
    validate_name(&pool.name)?;
    if pool.spec.ipv4.is_none() && pool.spec.ipv6.is_none() {
        return Err(PoolError::NoFamilies(pool.name.clone()));
    }
    for (family, spec) in pool.spec.families() {
        if spec.cidrs.is_empty() {
            return Err(PoolError::NoCidrs { pool: pool.name.clone(), family });
        }
        if let Some(cidr) = spec.cidrs.iter().find(|c| Family::of(c) != family) {
            return Err(PoolError::WrongFamily {
                pool: pool.name.clone(),
                family,
                cidr: *cidr,
                family_of_cidr: Family::of(cidr),
            });
        }
        if spec.mask_size > family.max_prefix() {
            return Err(PoolError::MaskTooLong {
                pool: pool.name.clone(),
                family,
                mask_size: spec.mask_size,
                max: family.max_prefix(),
            });
        }
        for cidr in &spec.cidrs {
            if !cidr::is_canonical(cidr) {
                return Err(PoolError::NonCanonical {
                    pool: pool.name.clone(),
                    cidr: *cidr,
                    canonical: cidr.trunc(),
                });
            }
            if cidr::overlaps_ipv4_mapped(cidr) {
                return Err(PoolError::Ipv4Mapped { pool: pool.name.clone(), cidr: *cidr });
            }
            if spec.mask_size < cidr.prefix_len() {
                return Err(PoolError::MaskTooShort {
                    pool: pool.name.clone(),
                    family,
                    mask_size: spec.mask_size,
                    cidr: *cidr,
                });
            }
        }
    }
    check_disjoint(std::slice::from_ref(pool))
}

/// Refuses any two overlapping CIDRs among all the given pools (both families).
fn check_disjoint(pools: &[Pool]) -> Result<(), PoolError> {
    let mut all: Vec<(Family, u128, u128, &str, IpNet)> = Vec::new();
    for pool in pools {
        for (family, spec) in pool.spec.families() {
            for cidr in &spec.cidrs {
                let start = cidr::addr_to_u128(cidr.network());
                let end = cidr::addr_to_u128(cidr.broadcast());
                all.push((family, start, end, &pool.name, *cidr));
            }
        }
    }
    all.sort_by_key(|&(family, start, end, _, _)| (family, start, std::cmp::Reverse(end)));
    // After sorting by start, a CIDR overlaps an earlier one iff it starts before the furthest
    // end seen so far in its family.
    let mut furthest: Option<(Family, u128, &str, IpNet)> = None;
    for &(family, start, end, pool, cidr) in &all {
        if let Some((f, fend, fpool, fcidr)) = furthest
            && f == family
            && start <= fend
        {
            return Err(PoolError::Overlap {
                pool_a: fpool.to_string(),
                cidr_a: fcidr,
                pool_b: pool.to_string(),
                cidr_b: cidr,
            });
        }
        match furthest {
            Some((f, fend, _, _)) if f == family && fend >= end => {}
            _ => furthest = Some((family, end, pool, cidr)),
        }
    }
    Ok(())
}

fn holders<'a>(held: impl Iterator<Item = &'a BlockGrant>) -> Vec<String> {
    held.map(|b| b.node.clone()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Validates applying `incoming` (create or replace by name) on top of `existing`, given the
/// blocks nodes hold. Returns what would happen to each incoming pool, in order.
pub fn validate_apply(
    existing: &[Pool],
    held: &[BlockGrant],
    incoming: &[Pool],
) -> Result<Vec<ApplyAction>, PoolError> {
    let mut seen = BTreeSet::new();
    for pool in incoming {
        if !seen.insert(pool.name.as_str()) {
            return Err(PoolError::Duplicate(pool.name.clone()));
        }
        validate_pool(pool)?;
    }
    let mut merged: BTreeMap<&str, &Pool> = existing.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut actions = Vec::with_capacity(incoming.len());
    for new in incoming {
        let action = match merged.get(new.name.as_str()) {
            None => ApplyAction::Created,
            Some(old) if old.spec == new.spec => ApplyAction::Unchanged,
            Some(old) => {
                check_replace(old, new, held)?;
                ApplyAction::Configured
            }
        };
        merged.insert(&new.name, new);
        actions.push(action);
    }
    let merged: Vec<Pool> = merged.into_values().cloned().collect();
    check_disjoint(&merged)?;
    Ok(actions)
}

fn check_replace(old: &Pool, new: &Pool, held: &[BlockGrant]) -> Result<(), PoolError> {
    for family in Family::ALL {
        let Some(old_spec) = old.spec.family(family) else { continue };
        let new_spec = new.spec.family(family);
        if let Some(new_spec) = new_spec
            && new_spec.mask_size != old_spec.mask_size
        {
            return Err(PoolError::MaskChange {
                pool: old.name.clone(),
                family,
                old: old_spec.mask_size,
                new: new_spec.mask_size,
            });
        }
        let kept = |block: &IpNet| {
            new_spec.is_some_and(|s| s.cidrs.iter().any(|c| c.contains(block)))
        };
        for cidr in &old_spec.cidrs {
            if new_spec.is_some_and(|s| s.cidrs.contains(cidr)) {
                continue;
            }
            let orphaned = held
                .iter()
                .filter(|b| b.pool == old.name && cidr.contains(&b.cidr) && !kept(&b.cidr));
            let nodes = holders(orphaned);
            if !nodes.is_empty() {
                return Err(PoolError::CidrInUse { pool: old.name.clone(), cidr: *cidr, nodes });
            }
        }
    }
    Ok(())
}

/// A pool may be deleted only when no node holds a block of it.
pub fn validate_delete(pool: &str, held: &[BlockGrant]) -> Result<(), PoolError> {
    let nodes = holders(held.iter().filter(|b| b.pool == pool));
    if nodes.is_empty() { Ok(()) } else { Err(PoolError::PoolInUse { pool: pool.to_string(), nodes }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pool(name: &str, v4: Option<(&[&str], u8)>, v6: Option<(&[&str], u8)>) -> Pool {
        let fam = |x: Option<(&[&str], u8)>| {
            x.map(|(cidrs, mask)| FamilySpec {
                cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                mask_size: mask,
            })
        };
        Pool { name: name.into(), spec: PoolSpec { ipv4: fam(v4), ipv6: fam(v6) } }
    }

    fn grant(pool: &str, cidr: &str, node: &str) -> BlockGrant {
        BlockGrant { pool: pool.into(), cidr: cidr.parse().unwrap(), node: node.into() }
    }

    fn green() -> Pool {
        pool("green-pool", Some((&["10.20.0.0/16", "10.30.0.0/16"], 24)), Some((&["fd00::/104"], 120)))
    }

    /// The validation matrix: each row is a proposed apply and whether it is refused, and how.
    #[test]
    fn validation_matrix() {
        let existing = vec![green()];
        let held = vec![grant("green-pool", "10.20.0.0/24", "node-a"), grant("green-pool", "fd00::/120", "node-b")];
        type Row = (&'static str, Pool, Option<fn(&PoolError) -> bool>);
        let rows: Vec<Row> = vec![
            ("same spec again", green(), None),
            ("add a pool", pool("blue", Some((&["10.40.0.0/16"], 24)), None), None),
            ("add a cidr", pool("green-pool", Some((&["10.20.0.0/16", "10.30.0.0/16", "10.50.0.0/16"], 24)), Some((&["fd00::/104"], 120))), None),
            ("remove an unused cidr", pool("green-pool", Some((&["10.20.0.0/16"], 24)), Some((&["fd00::/104"], 120))), None),
            ("v4 overlap across pools", pool("blue", Some((&["10.20.5.0/24"], 26)), None), Some(|e| matches!(e, PoolError::Overlap { .. }))),
            ("v6 overlap across pools", pool("blue", None, Some((&["fd00::/96"], 120))), Some(|e| matches!(e, PoolError::Overlap { .. }))),
            ("overlap inside a pool", pool("blue", Some((&["10.40.0.0/16", "10.40.8.0/21"], 24)), None), Some(|e| matches!(e, PoolError::Overlap { .. }))),
            ("v6 overlap inside a pool", pool("blue", None, Some((&["fd01::/64", "fd01::/48"], 120))), Some(|e| matches!(e, PoolError::Overlap { .. }))),
            ("mask change", pool("green-pool", Some((&["10.20.0.0/16", "10.30.0.0/16"], 25)), Some((&["fd00::/104"], 120))), Some(|e| matches!(e, PoolError::MaskChange { old: 24, new: 25, .. }))),
            ("mask shorter than prefix", pool("blue", Some((&["10.40.0.0/16"], 12)), None), Some(|e| matches!(e, PoolError::MaskTooShort { .. }))),
            ("mask longer than v4 allows", pool("blue", Some((&["10.40.0.0/16"], 33)), None), Some(|e| matches!(e, PoolError::MaskTooLong { max: 32, .. }))),
            ("mask longer than v6 allows", pool("blue", None, Some((&["fd01::/64"], 129))), Some(|e| matches!(e, PoolError::MaskTooLong { max: 128, .. }))),
            ("host bits set", pool("blue", Some((&["10.40.0.1/24"], 26)), None), Some(|e| matches!(e, PoolError::NonCanonical { .. }))),
            ("v6 host bits set", pool("blue", None, Some((&["fd01::1/64"], 120))), Some(|e| matches!(e, PoolError::NonCanonical { .. }))),
            ("remove a cidr in use", pool("green-pool", Some((&["10.30.0.0/16"], 24)), Some((&["fd00::/104"], 120))), Some(|e| matches!(e, PoolError::CidrInUse { nodes, .. } if nodes == &["node-a"]))),
            ("drop a family in use", pool("green-pool", Some((&["10.20.0.0/16", "10.30.0.0/16"], 24)), None), Some(|e| matches!(e, PoolError::CidrInUse { nodes, .. } if nodes == &["node-b"]))),
            ("wrong family", pool("blue", Some((&["fd01::/64"], 120)), None), Some(|e| matches!(e, PoolError::WrongFamily { .. }))),
            ("no family", pool("blue", None, None), Some(|e| matches!(e, PoolError::NoFamilies(_)))),
            ("no cidrs", pool("blue", Some((&[], 24)), None), Some(|e| matches!(e, PoolError::NoCidrs { .. }))),
            ("bad name", pool("Blue_Pool", Some((&["10.40.0.0/16"], 24)), None), Some(|e| matches!(e, PoolError::InvalidName(_)))),
            // green-pool holds 10.20.0.0/16: its IPv4-mapped twin must not pass as a disjoint v6 CIDR.
            ("ipv4-mapped v6 cidr", pool("blue", None, Some((&["::ffff:10.20.0.0/112"], 120))), Some(|e| matches!(e, PoolError::Ipv4Mapped { .. }))),
            ("v6 cidr containing the mapped range", pool("blue", None, Some((&["::/64"], 120))), Some(|e| matches!(e, PoolError::Ipv4Mapped { .. }))),
        ];
        for (what, incoming, refused) in rows {
            let got = validate_apply(&existing, &held, std::slice::from_ref(&incoming));
            match (refused, got) {
                (None, Ok(_)) => {}
                (Some(check), Err(e)) => assert!(check(&e), "{what}: wrong refusal: {e}"),
                (None, Err(e)) => panic!("{what}: refused but should pass: {e}"),
                (Some(_), Ok(a)) => panic!("{what}: accepted ({a:?}) but should be refused"),
            }
        }
    }

    #[test]
    fn widening_a_cidr_that_holds_blocks_is_allowed() {
        let old = pool("p", Some((&["10.0.0.0/24"], 26)), None);
        let new = pool("p", Some((&["10.0.0.0/16"], 26)), None);
        let held = vec![grant("p", "10.0.0.0/26", "n1")];
        assert_eq!(validate_apply(&[old], &held, &[new]).unwrap(), vec![ApplyAction::Configured]);
    }

    #[test]
    fn apply_reports_actions_in_order() {
        let blue = pool("blue", Some((&["10.40.0.0/16"], 24)), None);
        let got = validate_apply(&[green()], &[], &[green(), blue]).unwrap();
        assert_eq!(got, vec![ApplyAction::Unchanged, ApplyAction::Created]);
    }

    #[test]
    fn duplicate_names_in_one_apply_are_refused() {
        let err = validate_apply(&[], &[], &[green(), green()]).unwrap_err();
        assert_eq!(err, PoolError::Duplicate("green-pool".into()));
    }

    #[test]
    fn delete_in_use_names_nodes() {
        let held = vec![grant("green-pool", "10.20.0.0/24", "b"), grant("green-pool", "10.20.1.0/24", "a"), grant("green-pool", "10.20.2.0/24", "a")];
        let err = validate_delete("green-pool", &held).unwrap_err();
        assert_eq!(err.to_string(), "pool \"green-pool\" is in use: node(s) a, b hold blocks of it; drain those nodes first");
        assert!(validate_delete("other", &held).is_ok());
    }
}
