//! How many addresses a node asks for, per pool and family.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::cidr::Family;

/// How long a failed attempt keeps counting as pending.
pub const PENDING_TTL: Duration = Duration::from_secs(5 * 60);

fn round_up(x: u64, multiple: u64) -> u64 {
    x.div_ceil(multiple) * multiple
}

/// `neededIPs = roundUp(inUse + pending + preAlloc, preAlloc)`; with no pre-allocation, just
/// what is in use or waiting.
pub fn needed(in_use: u64, pending: u64, pre_alloc: u64) -> u64 {
    if pre_alloc == 0 {
        in_use + pending
    } else {
        round_up(in_use + pending + pre_alloc, pre_alloc)
    }
}

/// Failed allocation attempts, one per owner, each counting towards demand until it succeeds,
/// is withdrawn, or expires.
#[derive(Debug)]
pub struct Pending<K> {
    ttl: Duration,
    entries: HashMap<K, (String, Vec<Family>, Instant)>,
}

impl<K: Eq + Hash> Pending<K> {
    pub fn new(ttl: Duration) -> Self {
        Pending { ttl, entries: HashMap::new() }
    }

    /// Records (or refreshes) a failed attempt of `owner` for `pool` in `families`.
    pub fn record(&mut self, owner: K, pool: &str, families: Vec<Family>, now: Instant) {
        self.entries.insert(owner, (pool.to_string(), families, now));
    }

    pub fn clear(&mut self, owner: &K) -> bool {
        self.entries.remove(owner).is_some()
    }

    /// Drops attempts older than the TTL; true when any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.entries.len();
        let ttl = self.ttl;
        self.entries.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < ttl);
        before != self.entries.len()
    }

    pub fn count(&self, pool: &str, family: Family) -> u64 {
        self.entries.values().filter(|(p, fams, _)| p == pool && fams.contains(&family)).count() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_formula_examples() {
        // default=8: an idle node keeps 8 in reserve.
        assert_eq!(needed(0, 0, 8), 8);
        assert_eq!(needed(1, 0, 8), 16);
        assert_eq!(needed(8, 0, 8), 16);
        assert_eq!(needed(9, 0, 8), 24);
        assert_eq!(needed(5, 3, 8), 16);
        assert_eq!(needed(3, 2, 4), 12);
        // Pools absent from the map have preAlloc 0: exactly what is used or waiting.
        assert_eq!(needed(0, 0, 0), 0);
        assert_eq!(needed(7, 2, 0), 9);
    }

    proptest! {
        #[test]
        fn formula_properties(in_use in 0u64..1_000_000, pending in 0u64..1000, pre in 0u64..512) {
            let n = needed(in_use, pending, pre);
            // Always covers what is used and waiting plus the buffer, and by less than one
            // extra buffer.
            prop_assert!(n >= in_use + pending + pre);
            if pre > 0 {
                prop_assert_eq!(n % pre, 0);
                prop_assert!(n < in_use + pending + 2 * pre);
            } else {
                prop_assert_eq!(n, in_use + pending);
            }
        }
    }

    #[test]
    fn pending_expires_after_five_minutes() {
        let t0 = Instant::now();
        let mut p = Pending::new(PENDING_TTL);
        p.record("a", "blue", vec![Family::V4, Family::V6], t0);
        p.record("b", "blue", vec![Family::V4], t0 + Duration::from_secs(60));
        assert_eq!(p.count("blue", Family::V4), 2);
        assert_eq!(p.count("blue", Family::V6), 1);
        assert!(!p.expire(t0 + Duration::from_secs(299)));
        assert!(p.expire(t0 + Duration::from_secs(300)));
        assert_eq!(p.count("blue", Family::V4), 1);
        assert!(p.expire(t0 + Duration::from_secs(360)));
        assert!(p.is_empty());
    }

    #[test]
    fn one_pending_per_owner() {
        let t0 = Instant::now();
        let mut p = Pending::new(PENDING_TTL);
        p.record("a", "blue", vec![Family::V4], t0);
        p.record("a", "blue", vec![Family::V4], t0 + Duration::from_secs(1));
        assert_eq!(p.count("blue", Family::V4), 1);
        assert!(p.clear(&"a"));
        assert_eq!(p.count("blue", Family::V4), 0);
    }
}
