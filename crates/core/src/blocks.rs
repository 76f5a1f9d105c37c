//! The operator's block allocator: which blocks of a pool are free, first CIDR with room first.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;

use crate::cidr::{self, Family};
use crate::pool::{BlockGrant, FamilySpec, Pool};

/// The blocks of one family of one pool.
#[derive(Debug, Clone)]
pub struct PoolBlocks {
    family: Family,
    mask: u8,
    cidrs: Vec<Cidr>,
}

#[derive(Debug, Clone)]
struct Cidr {
    net: IpNet,
    blocks: u128,
    taken: BTreeSet<u128>,
    /// No block below this index is free.
    hint: u128,
}

impl PoolBlocks {
    pub fn new(family: Family, spec: &FamilySpec) -> Self {
        let cidrs = spec
            .cidrs
            .iter()
            .map(|net| {
                let bits = u32::from(spec.mask_size.saturating_sub(net.prefix_len()));
                let blocks = if bits >= 128 { u128::MAX } else { 1u128 << bits };
                Cidr { net: *net, blocks, taken: BTreeSet::new(), hint: 0 }
            })
            .collect();
        PoolBlocks { family, mask: spec.mask_size, cidrs }
    }

    fn locate(&self, block: &IpNet) -> Option<(usize, u128)> {
        if block.prefix_len() != self.mask || Family::of(block) != self.family {
            return None;
        }
        let size = cidr::size_of(self.family, self.mask);
        self.cidrs.iter().position(|c| c.net.contains(block)).map(|i| {
            let offset = cidr::addr_to_u128(block.network()) - cidr::addr_to_u128(self.cidrs[i].net.network());
            (i, offset / size)
        })
    }

    /// Records a block as held. False when the block is not a block of this pool.
    pub fn mark_taken(&mut self, block: &IpNet) -> bool {
        match self.locate(block) {
            Some((i, index)) => {
                self.cidrs[i].taken.insert(index);
                true
            }
            None => false,
        }
    }

    pub fn release(&mut self, block: &IpNet) {
        if let Some((i, index)) = self.locate(block) {
            let c = &mut self.cidrs[i];
            c.taken.remove(&index);
            c.hint = c.hint.min(index);
        }
    }

    /// Takes the lowest free block of the first CIDR that has one.
    pub fn take_next(&mut self) -> Option<IpNet> {
        let size = cidr::size_of(self.family, self.mask);
        for c in &mut self.cidrs {
            let mut index = c.hint;
            while index < c.blocks && c.taken.contains(&index) {
                index += 1;
            }
            c.hint = index;
            if index < c.blocks {
                c.taken.insert(index);
                c.hint = index + 1;
                let base = cidr::addr_to_u128(c.net.network()) + index * size;
                return Some(cidr::net_from(self.family, base, self.mask));
            }
        }
        None
    }

    pub fn taken(&self) -> usize {
        self.cidrs.iter().map(|c| c.taken.len()).sum()
    }
}

/// Free and held blocks of every pool, as the operator sees the cluster.
#[derive(Debug, Default, Clone)]
pub struct BlockMap {
    pools: HashMap<(String, Family), PoolBlocks>,
}

impl BlockMap {
    pub fn new<'a>(pools: impl IntoIterator<Item = &'a Pool>, grants: &[BlockGrant]) -> Self {
        let mut map = BlockMap::default();
        for pool in pools {
            for (family, spec) in pool.spec.families() {
                map.pools.insert((pool.name.clone(), family), PoolBlocks::new(family, spec));
            }
        }
        for g in grants {
            if let Some(pb) = map.pools.get_mut(&(g.pool.clone(), Family::of(&g.cidr))) {
                pb.mark_taken(&g.cidr);
            }
        }
        map
    }

    pub fn pool_mut(&mut self, pool: &str, family: Family) -> Option<&mut PoolBlocks> {
        self.pools.get_mut(&(pool.to_string(), family))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(cidrs: &[&str], mask: u8) -> FamilySpec {
        FamilySpec { cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(), mask_size: mask }
    }

    #[test]
    fn first_cidr_with_room_first() {
        let mut pb = PoolBlocks::new(Family::V4, &spec(&["10.0.0.0/25", "10.1.0.0/24"], 26));
        let got: Vec<String> = std::iter::from_fn(|| pb.take_next()).map(|n| n.to_string()).collect();
        assert_eq!(got, ["10.0.0.0/26", "10.0.0.64/26", "10.1.0.0/26", "10.1.0.64/26", "10.1.0.128/26", "10.1.0.192/26"]);
    }

    #[test]
    fn released_block_is_reused_lowest_first() {
        let mut pb = PoolBlocks::new(Family::V6, &spec(&["fd00::/118"], 120));
        let a = pb.take_next().unwrap();
        let b = pb.take_next().unwrap();
        pb.release(&a);
        assert_eq!(pb.take_next(), Some(a));
        assert_ne!(pb.take_next(), Some(b));
    }

    #[test]
    fn foreign_block_is_not_marked() {
        let mut pb = PoolBlocks::new(Family::V4, &spec(&["10.0.0.0/24"], 26));
        assert!(!pb.mark_taken(&"10.0.1.0/26".parse().unwrap()));
        assert!(!pb.mark_taken(&"10.0.0.0/27".parse().unwrap()));
        assert!(pb.mark_taken(&"10.0.0.64/26".parse().unwrap()));
        assert_eq!(pb.taken(), 1);
    }

    proptest! {
        /// Random take / release: a block is never handed out while held, and every block lies
        /// inside the pool with the pool's mask.
        #[test]
        fn never_two_holders(ops in proptest::collection::vec((any::<bool>(), 0usize..64), 1..400)) {
            let mut pb = PoolBlocks::new(Family::V4, &spec(&["10.0.0.0/26", "10.9.0.0/27"], 29));
            let mut held: Vec<IpNet> = Vec::new();
            for (take, pick) in ops {
                if take || held.is_empty() {
                    match pb.take_next() {
                        Some(b) => {
                            prop_assert!(!held.contains(&b), "{b} handed out twice");
                            prop_assert_eq!(b.prefix_len(), 29);
                            held.push(b);
                        }
                        None => prop_assert_eq!(held.len(), 8 + 4),
                    }
                } else {
                    let b = held.swap_remove(pick % held.len());
                    pb.release(&b);
                }
            }
        }
    }
}
