//! The node's address allocator: addresses inside the blocks a node holds.
//!
//! Blocks of a pool are used in address order, the first with room first; inside a block the
//! search is next-fit from where the last allocation stopped, so an address just freed is not
//! handed straight back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::cidr::{self, Family};

/// Blocks up to this many usable addresses track use in a bitmap; larger ones in a set.
const BITMAP_LIMIT: u128 = 1 << 20;

#[derive(Debug, Clone)]
enum Used {
    Bitmap(Vec<u64>),
    Sparse(BTreeSet<u128>),
}

impl Used {
    fn new(count: u128) -> Used {
        if count <= BITMAP_LIMIT {
            Used::Bitmap(vec![0; count.div_ceil(64) as usize])
        } else {
            Used::Sparse(BTreeSet::new())
        }
    }

    fn get(&self, off: u128) -> bool {
        match self {
            Used::Bitmap(words) => words[(off / 64) as usize] & (1 << (off % 64)) != 0,
            Used::Sparse(set) => set.contains(&off),
        }
    }

    fn set(&mut self, off: u128, value: bool) {
        match self {
            Used::Bitmap(words) => {
                let w = &mut words[(off / 64) as usize];
                if value { *w |= 1 << (off % 64) } else { *w &= !(1 << (off % 64)) }
            }
            Used::Sparse(set) => {
                if value {
                    set.insert(off);
                } else {
                    set.remove(&off);
                }
            }
        }
    }

    /// First free offset in `[from, to)`.
    fn first_free(&self, from: u128, to: u128) -> Option<u128> {
        match self {
            Used::Bitmap(words) => {
                let mut off = from;
                while off < to {
                    let word = words[(off / 64) as usize] | ((1u64 << (off % 64)) - 1);
                    if word != u64::MAX {
                        let found = (off / 64) * 64 + u128::from(word.trailing_ones());
                        return (found < to).then_some(found);
                    }
                    off = (off / 64 + 1) * 64;
                }
                None
            }
            Used::Sparse(set) => {
                let mut off = from;
                for &u in set.range(from..to) {
                    if u != off {
                        break;
                    }
                    off += 1;
                }
                (off < to).then_some(off)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub net: IpNet,
    /// Address value of the first usable address.
    first: u128,
    /// Usable addresses.
    pub capacity: u128,
    pub in_use: u128,
    used: Used,
    cursor: u128,
    /// Set while the block is being given back: nothing new is allocated from it.
    pub draining: bool,
    /// Held for addresses this node does not know (an old CNI's pod CIDR): nothing new is
    /// allocated from it, and it counts in no capacity.
    pub reserved: bool,
    /// The node's own address in this block (its bridge gateway), counted in `in_use`.
    pub gateway: Option<IpAddr>,
}

impl Block {
    fn new(net: IpNet, reserve_gateway: bool) -> Block {
        let (skip, capacity) = cidr::usable_range(&net);
        let mut b = Block {
            net,
            first: cidr::addr_to_u128(net.network()) + skip,
            capacity,
            in_use: 0,
            used: Used::new(capacity),
            cursor: 0,
            draining: false,
            reserved: false,
            gateway: None,
        };
        // Point-to-point and host blocks have no address to spare for a gateway.
        if reserve_gateway && cidr::skips_edges(&net) {
            b.used.set(0, true);
            b.in_use = 1;
            b.cursor = 1;
            b.gateway = Some(cidr::u128_to_addr(Family::of(&net), b.first));
        }
        b
    }

    /// Addresses in use by pods (the gateway is the node's own).
    pub fn pods(&self) -> u128 {
        self.in_use - u128::from(self.gateway.is_some())
    }

    /// Addresses pods can have.
    pub fn pod_capacity(&self) -> u128 {
        self.capacity - u128::from(self.gateway.is_some())
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        let v = cidr::addr_to_u128(ip);
        (self.net.contains(&ip) && v >= self.first && v - self.first < self.capacity).then(|| v - self.first)
    }

    /// Whether new addresses come from this block: not being given back, not reserved.
    pub fn serves(&self) -> bool {
        !self.draining && !self.reserved
    }

    fn take(&mut self) -> Option<u128> {
        if !self.serves() || self.in_use >= self.capacity {
            return None;
        }
        let off = self
            .used
            .first_free(self.cursor, self.capacity)
            .or_else(|| self.used.first_free(0, self.cursor))?;
        self.used.set(off, true);
        self.in_use += 1;
        self.cursor = if off + 1 == self.capacity { 0 } else { off + 1 };
        Some(off)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    #[error("{ip} lies in no block of pool {pool:?} that this node holds")]
    NoBlock { pool: String, ip: IpAddr },
    #[error("{ip} is already allocated")]
    AlreadyUsed { ip: IpAddr },
}

/// Use of one family of one pool on this node, in pod addresses: a reserved gateway counts
/// neither in `capacity` nor in `in_use`, nor do reserved blocks. `reserved` is their usable
/// addresses, gateways included, as the operator counts a node's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub blocks: usize,
    pub capacity: u128,
    pub in_use: u128,
    pub reserved: u128,
}

#[derive(Debug, Default, Clone)]
pub struct NodeAllocator {
    /// Blocks per (pool, family), kept sorted by address.
    pools: BTreeMap<(String, Family), Vec<Block>>,
}

impl NodeAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    fn blocks_mut(&mut self, pool: &str, family: Family) -> Option<&mut Vec<Block>> {
        // Avoid allocating a key String on the hot path.
        self.pools.iter_mut().find(|((p, f), _)| p == pool && *f == family).map(|(_, v)| v)
    }

    fn blocks(&self, pool: &str, family: Family) -> Option<&Vec<Block>> {
        self.pools.iter().find(|((p, f), _)| p == pool && *f == family).map(|(_, v)| v)
    }

    /// Adds a block the node now holds. Adding a block twice is a no-op.
    pub fn add_block(&mut self, pool: &str, net: IpNet) {
        self.add_block_with(pool, net, false);
    }

    /// Adds a block, keeping its first usable address as the node's gateway when asked.
    pub fn add_block_with(&mut self, pool: &str, net: IpNet, reserve_gateway: bool) {
        let blocks = self.pools.entry((pool.to_string(), Family::of(&net))).or_default();
        if let Err(at) = blocks.binary_search_by_key(&net, |b| b.net) {
            blocks.insert(at, Block::new(net, reserve_gateway));
        }
    }

    /// Removes a block. Refused (false) while any address in it is in use.
    pub fn remove_block(&mut self, pool: &str, net: &IpNet) -> bool {
        let Some(blocks) = self.blocks_mut(pool, Family::of(net)) else { return true };
        match blocks.iter().position(|b| b.net == *net) {
            Some(i) if blocks[i].pods() > 0 => false,
            Some(i) => {
                blocks.remove(i);
                true
            }
            None => true,
        }
    }

    fn block_mut(&mut self, pool: &str, net: &IpNet) -> Option<&mut Block> {
        self.blocks_mut(pool, Family::of(net)).and_then(|v| v.iter_mut().find(|b| b.net == *net))
    }

    pub fn set_reserved(&mut self, pool: &str, net: &IpNet, reserved: bool) {
        if let Some(b) = self.block_mut(pool, net) {
            b.reserved = reserved;
        }
    }

    pub fn set_draining(&mut self, pool: &str, net: &IpNet, draining: bool) {
        if let Some(b) = self.block_mut(pool, net) {
            b.draining = draining;
        }
    }

    pub fn holds(&self, pool: &str, net: &IpNet) -> bool {
        self.blocks(pool, Family::of(net)).is_some_and(|v| v.iter().any(|b| b.net == *net))
    }

    pub fn block_list(&self) -> impl Iterator<Item = (&str, &Block)> {
        self.pools.iter().flat_map(|((p, _), v)| v.iter().map(move |b| (p.as_str(), b)))
    }

    /// Takes a free address of the pool, or None when the node's blocks are full.
    pub fn allocate(&mut self, pool: &str, family: Family) -> Option<IpAddr> {
        self.allocate_in_block(pool, family).map(|(ip, _, _)| ip)
    }

    /// Like `allocate`, also giving the block the address came from and its gateway.
    pub fn allocate_in_block(&mut self, pool: &str, family: Family) -> Option<(IpAddr, IpNet, Option<IpAddr>)> {
        let blocks = self.blocks_mut(pool, family)?;
        blocks
            .iter_mut()
            .find_map(|b| b.take().map(|off| (cidr::u128_to_addr(family, b.first + off), b.net, b.gateway)))
    }

    /// Marks a known address as used (restore after restart).
    pub fn mark_used(&mut self, pool: &str, ip: IpAddr) -> Result<(), MarkError> {
        let no_block = || MarkError::NoBlock { pool: pool.to_string(), ip };
        let blocks = self.blocks_mut(pool, Family::of_addr(&ip)).ok_or_else(no_block)?;
        let (b, off) = blocks.iter_mut().find_map(|b| b.offset(ip).map(|o| (b, o))).ok_or_else(no_block)?;
        if b.used.get(off) {
            return Err(MarkError::AlreadyUsed { ip });
        }
        b.used.set(off, true);
        b.in_use += 1;
        Ok(())
    }

    /// Continues next-fit after `ip` (the last address handed out before a restart), so an
    /// address freed just before the restart is not handed straight back after it.
    pub fn resume_after(&mut self, pool: &str, ip: IpAddr) {
        let Some(blocks) = self.blocks_mut(pool, Family::of_addr(&ip)) else { return };
        if let Some((b, off)) = blocks.iter_mut().find_map(|b| b.offset(ip).map(|o| (b, o))) {
            b.cursor = if off + 1 == b.capacity { 0 } else { off + 1 };
        }
    }

    /// The address a block's reserved gateway takes: its first usable one. None for
    /// point-to-point and host blocks, which have none to spare.
    pub fn gateway_of(net: &IpNet) -> Option<IpAddr> {
        cidr::skips_edges(net).then(|| {
            let (skip, _) = cidr::usable_range(net);
            cidr::u128_to_addr(Family::of(net), cidr::addr_to_u128(net.network()) + skip)
        })
    }

    /// Frees an address. False when it was not in use (or is the node's gateway).
    pub fn release(&mut self, pool: &str, ip: IpAddr) -> bool {
        let Some(blocks) = self.blocks_mut(pool, Family::of_addr(&ip)) else { return false };
        for b in blocks.iter_mut() {
            if let Some(off) = b.offset(ip) {
                if !b.used.get(off) || b.gateway == Some(ip) {
                    return false;
                }
                b.used.set(off, false);
                b.in_use -= 1;
                return true;
            }
        }
        false
    }

    pub fn usage(&self, pool: &str, family: Family) -> Usage {
        self.blocks(pool, family).map_or(Usage::default(), |v| Usage {
            blocks: v.len(),
            capacity: v.iter().filter(|b| b.serves()).map(Block::pod_capacity).sum(),
            in_use: v.iter().filter(|b| !b.reserved).map(Block::pods).sum(),
            reserved: v.iter().filter(|b| b.reserved).map(|b| b.capacity).sum(),
        })
    }

    pub fn pools(&self) -> impl Iterator<Item = (&str, Family)> {
        self.pools.iter().filter(|(_, v)| !v.is_empty()).map(|((p, f), _)| (p.as_str(), *f))
    }

    /// Empty blocks that can be given back while the rest still covers `needed` pod addresses:
    /// the last ones first, so the low blocks stay in use.
    pub fn releasable(&self, pool: &str, family: Family, needed: u128) -> Vec<IpNet> {
        let Some(blocks) = self.blocks(pool, family) else { return Vec::new() };
        let mut capacity: u128 = blocks.iter().filter(|b| b.serves()).map(Block::pod_capacity).sum();
        let mut out = Vec::new();
        for b in blocks.iter().rev().filter(|b| b.serves()) {
            if b.pods() == 0 && capacity - b.pod_capacity() >= needed {
                capacity -= b.pod_capacity();
                out.push(b.net);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn next_fit_resumes_after_the_last_address_handed_out() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/29".parse().unwrap());
        a.resume_after("p", ip("10.0.0.3"));
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.4")));
        a.resume_after("p", ip("10.0.0.6"));
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.1")), "wraps after the last usable address");
        a.resume_after("q", ip("10.0.0.6"));
        a.resume_after("p", ip("10.9.9.9"));
        assert_eq!(NodeAllocator::gateway_of(&"10.0.0.0/29".parse().unwrap()), Some(ip("10.0.0.1")));
        assert_eq!(NodeAllocator::gateway_of(&"10.0.0.0/31".parse().unwrap()), None);
    }

    #[test]
    fn skips_network_and_broadcast() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/30".parse().unwrap());
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.1")));
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.2")));
        assert_eq!(a.allocate("p", Family::V4), None);
    }

    #[test]
    fn point_to_point_blocks_use_every_address() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/31".parse().unwrap());
        a.add_block("p", "fd00::/127".parse().unwrap());
        a.add_block("p", "10.0.1.7/32".parse().unwrap());
        let v4: Vec<_> = std::iter::from_fn(|| a.allocate("p", Family::V4)).collect();
        assert_eq!(v4, [ip("10.0.0.0"), ip("10.0.0.1"), ip("10.0.1.7")]);
        let v6: Vec<_> = std::iter::from_fn(|| a.allocate("p", Family::V6)).collect();
        assert_eq!(v6, [ip("fd00::"), ip("fd00::1")]);
    }

    #[test]
    fn next_fit_does_not_hand_back_a_just_freed_address() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/29".parse().unwrap());
        let first = a.allocate("p", Family::V4).unwrap();
        assert!(a.release("p", first));
        assert_ne!(a.allocate("p", Family::V4), Some(first));
    }

    #[test]
    fn wraps_around_to_freed_addresses_when_the_end_is_reached() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/30".parse().unwrap());
        let x = a.allocate("p", Family::V4).unwrap();
        let _y = a.allocate("p", Family::V4).unwrap();
        a.release("p", x);
        assert_eq!(a.allocate("p", Family::V4), Some(x));
    }

    #[test]
    fn blocks_in_order_first_with_room() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.1.0/30".parse().unwrap());
        a.add_block("p", "10.0.0.0/30".parse().unwrap());
        let got: Vec<_> = std::iter::from_fn(|| a.allocate("p", Family::V4)).collect();
        assert_eq!(got, [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.1.1"), ip("10.0.1.2")]);
        a.release("p", ip("10.0.0.2"));
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.2")));
    }

    #[test]
    fn huge_blocks_use_a_sparse_set() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "fd00::/64".parse().unwrap());
        let x = a.allocate("p", Family::V6).unwrap();
        let y = a.allocate("p", Family::V6).unwrap();
        assert_eq!((x, y), (ip("fd00::1"), ip("fd00::2")));
        a.release("p", x);
        assert_eq!(a.allocate("p", Family::V6), Some(ip("fd00::3")));
        assert_eq!(a.usage("p", Family::V6).capacity, (1u128 << 64) - 2);
    }

    #[test]
    fn draining_blocks_are_skipped_and_releasable_keeps_demand() {
        let mut a = NodeAllocator::new();
        for n in ["10.0.0.0/29", "10.0.0.8/29", "10.0.0.16/29"] {
            a.add_block("p", n.parse().unwrap());
        }
        let used = a.allocate("p", Family::V4).unwrap();
        // 3 blocks × 6 usable; demand 7 keeps two blocks.
        assert_eq!(a.releasable("p", Family::V4, 7), vec!["10.0.0.16/29".parse::<IpNet>().unwrap()]);
        assert_eq!(a.releasable("p", Family::V4, 0).len(), 2);
        assert!(!a.remove_block("p", &"10.0.0.0/29".parse().unwrap()), "block in use");
        a.set_draining("p", &"10.0.0.0/29".parse().unwrap(), true);
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.9")));
        a.release("p", used);
        assert_eq!(a.usage("p", Family::V4).capacity, 12);
    }

    /// A reserved block (an old CNI's pod CIDR) gives no address, counts in no capacity and is
    /// never offered back; marked addresses in it still count as used; unreserved, it serves.
    #[test]
    fn reserved_blocks_give_no_address_until_unreserved() {
        let mut a = NodeAllocator::new();
        let old: IpNet = "10.0.0.0/29".parse().unwrap();
        a.add_block("p", old);
        a.add_block("p", "10.0.0.8/29".parse().unwrap());
        a.set_reserved("p", &old, true);
        a.mark_used("p", ip("10.0.0.3")).unwrap();
        assert_eq!(a.usage("p", Family::V4), Usage { blocks: 2, capacity: 6, in_use: 0, reserved: 6 });
        let got: Vec<_> = std::iter::from_fn(|| a.allocate("p", Family::V4)).collect();
        assert_eq!(got.len(), 6);
        assert!(got.iter().all(|i| !old.contains(i)), "{got:?}");
        assert!(a.releasable("p", Family::V4, 0).is_empty(), "the other block is full; the reserved one is never offered");
        a.set_reserved("p", &old, false);
        assert_eq!(a.allocate("p", Family::V4), Some(ip("10.0.0.1")));
        assert_eq!(a.usage("p", Family::V4), Usage { blocks: 2, capacity: 12, in_use: 8, reserved: 0 });
    }

    #[test]
    fn a_reserved_gateway_is_never_handed_out_nor_freed() {
        let mut a = NodeAllocator::new();
        a.add_block_with("p", "10.0.0.0/29".parse().unwrap(), true);
        a.add_block_with("p", "10.0.1.0/31".parse().unwrap(), true);
        let got: Vec<_> = std::iter::from_fn(|| a.allocate_in_block("p", Family::V4)).collect();
        assert_eq!(got.len(), 5 + 2, "/29: 6 usable less the gateway; /31: no gateway");
        assert!(got.iter().all(|(ip, _, _)| *ip != ip_("10.0.0.1")));
        assert_eq!(got[0].2, Some(ip_("10.0.0.1")));
        assert_eq!(got[6].2, None);
        assert!(!a.release("p", ip_("10.0.0.1")));
        for (ip, _, _) in &got {
            assert!(a.release("p", *ip));
        }
        // Only the gateway is left: the block counts as empty and may be given back.
        assert_eq!(a.usage("p", Family::V4), Usage { blocks: 2, capacity: 5 + 2, in_use: 0, reserved: 0 });
        assert_eq!(a.releasable("p", Family::V4, 0).len(), 2);
        assert!(a.remove_block("p", &"10.0.0.0/29".parse().unwrap()));
    }

    fn ip_(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mark_used_refuses_duplicates_and_foreign_addresses() {
        let mut a = NodeAllocator::new();
        a.add_block("p", "10.0.0.0/29".parse().unwrap());
        a.mark_used("p", ip("10.0.0.3")).unwrap();
        assert_eq!(a.mark_used("p", ip("10.0.0.3")), Err(MarkError::AlreadyUsed { ip: ip("10.0.0.3") }));
        assert!(matches!(a.mark_used("p", ip("10.0.0.0")), Err(MarkError::NoBlock { .. })));
        assert!(matches!(a.mark_used("q", ip("10.0.0.4")), Err(MarkError::NoBlock { .. })));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(bool),
        Release(usize),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<bool>().prop_map(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Release),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        /// Against a model set of live addresses: no address is handed out twice under random
        /// allocate / release / restart (rebuild from the live records), and every address lies
        /// in a usable part of a held block.
        #[test]
        fn no_address_twice(ops in proptest::collection::vec(op(), 1..600)) {
            let blocks: [IpNet; 3] = ["10.1.0.0/28".parse().unwrap(), "10.1.0.64/30".parse().unwrap(), "fd00::/124".parse().unwrap()];
            let build = |live: &[IpAddr]| {
                let mut a = NodeAllocator::new();
                for b in blocks { a.add_block("p", b); }
                for ip in live { a.mark_used("p", *ip).unwrap(); }
                a
            };
            let mut live: Vec<IpAddr> = Vec::new();
            let mut a = build(&live);
            for op in ops {
                match op {
                    Op::Alloc(v6) => {
                        let family = if v6 { Family::V6 } else { Family::V4 };
                        match a.allocate("p", family) {
                            Some(ip) => {
                                prop_assert!(!live.contains(&ip), "{ip} handed out twice");
                                let block = blocks.iter().find(|b| b.contains(&ip)).expect("inside a held block");
                                prop_assert!(ip != block.network() && ip != block.broadcast());
                                live.push(ip);
                            }
                            None => {
                                let cap = if v6 { 14 } else { 14 + 2 };
                                let n = live.iter().filter(|ip| ip.is_ipv6() == v6).count();
                                prop_assert_eq!(n, cap, "refused with room left");
                            }
                        }
                    }
                    Op::Release(i) if !live.is_empty() => {
                        let ip = live.swap_remove(i % live.len());
                        prop_assert!(a.release("p", ip));
                        prop_assert!(!a.release("p", ip), "double release accepted");
                    }
                    Op::Release(_) => {}
                    Op::Restart => a = build(&live),
                }
                let in_use: u128 = Family::ALL.iter().map(|f| a.usage("p", *f).in_use).sum();
                prop_assert_eq!(in_use as usize, live.len());
                prop_assert_eq!(live.iter().collect::<HashSet<_>>().len(), live.len());
            }
        }
    }
}
