//! CIDR arithmetic on `ipnet`, with addresses as `u128` offsets so that both families share
//! one code path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn of_addr(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn addr_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn u128_to_addr(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// True when the network has no host bits set (`10.0.0.0/24`, not `10.0.0.1/24`).
pub fn is_canonical(net: &IpNet) -> bool {
    net.trunc() == *net
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `::ffff:0:0/96`, where IPv6 writes IPv4 addresses (`::ffff:10.0.0.1`). A pool CIDR there
/// would name IPv4 addresses under the IPv6 family and slip past the overlap check.
pub const IPV4_MAPPED: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
    Ok(n) => n,
    Err(_) => panic!("a /96 is a valid prefix"),
};

/// True when `net` holds any IPv4-mapped IPv6 address.
pub fn overlaps_ipv4_mapped(net: &IpNet) -> bool {
    overlaps(net, &IpNet::V6(IPV4_MAPPED))
}

/// Number of addresses in a network of this prefix, saturating at `u128::MAX` for a /0 IPv6.
pub fn size_of(family: Family, prefix: u8) -> u128 {
    let host_bits = u32::from(family.max_prefix() - prefix);
    if host_bits >= 128 { u128::MAX } else { 1u128 << host_bits }
}

/// Build a network from a base value and prefix.
pub fn net_from(family: Family, base: u128, prefix: u8) -> IpNet {
    match family {
        Family::V4 => IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(base as u32), prefix).expect("prefix checked by caller"),
        ),
        Family::V6 => {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base), prefix).expect("prefix checked by caller"))
        }
    }
}

/// Whether the first and last address of a block are kept out of allocation: always, except in
/// point-to-point and host blocks (/31, /32, /127, /128) where every address is usable.
pub fn skips_edges(block: &IpNet) -> bool {
    block.max_prefix_len() - block.prefix_len() > 1
}

/// Addresses of a block that may be handed to pods, as (first offset, count).
pub fn usable_range(block: &IpNet) -> (u128, u128) {
    let size = size_of(Family::of(block), block.prefix_len());
    if skips_edges(block) { (1, size - 2) } else { (0, size) }
}

pub fn usable_count(block: &IpNet) -> u128 {
    usable_range(block).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn canonical_rejects_host_bits() {
        assert!(is_canonical(&n("10.0.0.0/24")));
        assert!(!is_canonical(&n("10.0.0.1/24")));
        assert!(is_canonical(&n("fd00::/104")));
        assert!(!is_canonical(&n("fd00::1/104")));
    }

    #[test]
    fn usable_counts_follow_edge_rule() {
        for (net, count) in [
            ("10.0.0.0/24", 254u128),
            ("10.0.0.0/30", 2),
            ("10.0.0.0/31", 2),
            ("10.0.0.0/32", 1),
            ("fd00::/120", 254),
            ("fd00::/127", 2),
            ("fd00::/128", 1),
        ] {
            assert_eq!(usable_count(&n(net)), count, "{net}");
        }
    }

    #[test]
    fn ipv4_mapped_space_is_recognised() {
        assert!(overlaps_ipv4_mapped(&n("::ffff:10.77.0.0/112")));
        assert!(overlaps_ipv4_mapped(&n("::/64")));
        assert!(!overlaps_ipv4_mapped(&n("fd00::/104")));
        assert!(!overlaps_ipv4_mapped(&n("10.77.0.0/16")));
    }

    #[test]
    fn overlap_is_symmetric_containment() {
        assert!(overlaps(&n("10.0.0.0/16"), &n("10.0.5.0/24")));
        assert!(overlaps(&n("10.0.5.0/24"), &n("10.0.0.0/16")));
        assert!(!overlaps(&n("10.0.0.0/24"), &n("10.0.1.0/24")));
        assert!(!overlaps(&n("10.0.0.0/24"), &n("fd00::/104")));
    }
}
