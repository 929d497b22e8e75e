//! Subnet ranges and free-subnet selection.
//!
//! Selection is random rather than first-free: after a mass restart, agents that lost their
//! state would otherwise all race for the same lowest subnet and retry one after another.
//! A few random probes find a free subnet quickly while the range is mostly free; only when
//! those miss do we pay for a full scan, so a /8 split into /30s never enumerates four
//! million candidates for the common case.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, RngExt};

/// Ranges up to this many subnets are scanned in full when random probes keep missing
/// (a nearly full range). An IPv6 range is usually far larger (a /48 split into /64s has
/// 65536 subnets, a /32 four billion): there, a miss of every probe means the range is
/// full for any cluster that can exist, and the scan is skipped.
const MAX_SCAN: u128 = 1 << 22;

/// An inclusive range of equally sized, aligned subnets of one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    first: u128,
    last: u128,
    len: u8,
    v6: bool,
}

fn bits(net: &IpNet) -> u128 {
    match net.network() {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl SubnetRange {
    /// `min` and `max` must be of one family, have the same prefix length (not 0), be
    /// aligned, and `min <= max`.
    pub fn new(min: impl Into<IpNet>, max: impl Into<IpNet>) -> Option<Self> {
        let (min, max): (IpNet, IpNet) = (min.into(), max.into());
        let v6 = matches!(min, IpNet::V6(_));
        if v6 != matches!(max, IpNet::V6(_))
            || min.prefix_len() != max.prefix_len()
            || min.prefix_len() == 0
            || min.addr() != min.network()
            || max.addr() != max.network()
        {
            return None;
        }
        let (first, last) = (bits(&min), bits(&max));
        (first <= last).then_some(SubnetRange {
            first,
            last,
            len: min.prefix_len(),
            v6,
        })
    }

    fn width(&self) -> u8 {
        if self.v6 {
            128
        } else {
            32
        }
    }

    fn step(&self) -> u128 {
        1u128 << (self.width() - self.len)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv6(&self) -> bool {
        self.v6
    }

    /// Number of subnets in the range.
    pub fn len(&self) -> u128 {
        (self.last - self.first) / self.step() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th subnet of the range.
    pub fn nth(&self, i: u128) -> Option<IpNet> {
        (i < self.len()).then(|| {
            let a = self.first + i * self.step();
            if self.v6 {
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), self.len).expect("valid prefix"))
            } else {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a as u32), self.len).expect("valid prefix"))
            }
        })
    }

    pub fn contains(&self, subnet: impl Into<IpNet>) -> bool {
        let subnet: IpNet = subnet.into();
        let a = bits(&subnet);
        matches!(subnet, IpNet::V6(_)) == self.v6
            && subnet.prefix_len() == self.len
            && subnet.addr() == subnet.network()
            && a >= self.first
            && a <= self.last
    }

    pub fn iter(&self) -> impl Iterator<Item = IpNet> + '_ {
        (0..self.len()).map(|i| self.nth(i).expect("in range"))
    }

    /// Picks a subnet of the range that is not in `taken`, at random; `None` when the
    /// range is exhausted.
    pub fn pick_free<R: Rng + ?Sized>(&self, taken: &HashSet<IpNet>, rng: &mut R) -> Option<IpNet> {
        self.pick_free_by(|s| taken.contains(&s), rng)
    }

    /// [`Self::pick_free`] with "taken" decided by `is_taken`: a few random probes, then,
    /// when the range is nearly full, a uniform pick among all the free subnets.
    pub fn pick_free_by<R: Rng + ?Sized>(
        &self,
        is_taken: impl Fn(IpNet) -> bool,
        rng: &mut R,
    ) -> Option<IpNet> {
        let n = self.len();
        let probes = if n <= MAX_SCAN { 32 } else { 1024 };
        for _ in 0..probes {
            let candidate = self.nth(rng.random_range(0..n)).expect("in range");
            if !is_taken(candidate) {
                return Some(candidate);
            }
        }
        if n > MAX_SCAN {
            return None;
        }
        let free: Vec<IpNet> = self.iter().filter(|s| !is_taken(*s)).collect();
        if free.is_empty() {
            None
        } else {
            Some(free[rng.random_range(0..free.len())])
        }
    }
}

/// The etcd key suffix of a subnet: `10.244.7.0-24`, `fd00:10:244:7::-64` (a `/` would
/// nest the key).
pub fn subnet_key(subnet: impl Into<IpNet>) -> String {
    let subnet: IpNet = subnet.into();
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Parses a key suffix made by [`subnet_key`], and only those: the text must be exactly
/// what [`subnet_key`] prints for the subnet (`10.244.7.0-024`, `010.244.7.0-24`,
/// `10.244.7.1-24` or `fd00:10:244:7:0::-64` are not keys of their subnets). Otherwise two
/// keys could name one subnet, and one of them would be a second holder of it.
pub fn parse_subnet_key(key: &str) -> Option<IpNet> {
    let (addr, len) = key.rsplit_once('-')?;
    let net = IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    (net.addr() == net.network() && subnet_key(net) == key).then_some(net)
}

/// The first host address of a subnet with its prefix: the gateway (`10.244.7.1/24`).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::from(u32::from(subnet.network()) + 1),
        subnet.prefix_len(),
    )
    .expect("valid")
}

/// The IPv6 gateway of a subnet: its first address after the subnet-router anycast
/// address (`fd00:10:244:7::1/64`).
pub fn gateway6(subnet: Ipv6Net) -> Ipv6Net {
    Ipv6Net::new(
        Ipv6Addr::from(u128::from(subnet.network()) + 1),
        subnet.prefix_len(),
    )
    .expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn range_counts_and_indexes() {
        let r = SubnetRange::new(net("10.244.1.0/24"), net("10.244.255.0/24")).unwrap();
        assert_eq!(r.len(), 255);
        assert_eq!(r.nth(0), Some(net("10.244.1.0/24")));
        assert_eq!(r.nth(254), Some(net("10.244.255.0/24")));
        assert_eq!(r.nth(255), None);
        assert!(r.contains(net("10.244.9.0/24")));
        assert!(!r.contains(net("10.244.0.0/24")));
        assert!(!r.contains(net("10.244.9.0/25")));
        assert!(SubnetRange::new(net("10.244.9.0/24"), net("10.244.1.0/24")).is_none());
        assert!(SubnetRange::new(net("10.244.9.0/24"), net("10.244.10.0/25")).is_none());
    }

    #[test]
    fn the_whole_ipv4_space_does_not_overflow() {
        let r = SubnetRange::new(net("0.0.0.0/30"), net("255.255.255.252/30")).unwrap();
        assert_eq!(r.len(), 1 << 30);
        assert_eq!(r.nth((1 << 30) - 1), Some(net("255.255.255.252/30")));
    }

    #[test]
    fn pick_free_never_returns_a_taken_subnet_and_fills_the_range() {
        let r = SubnetRange::new(net("10.0.0.64/26"), net("10.0.0.192/26")).unwrap();
        let mut rng = rand::rng();
        let mut taken = HashSet::new();
        for _ in 0..3 {
            let s = r.pick_free(&taken, &mut rng).unwrap();
            assert!(r.contains(s));
            assert!(taken.insert(s), "picked a taken subnet {s}");
        }
        assert_eq!(r.pick_free(&taken, &mut rng), None);
    }

    #[test]
    fn pick_free_finds_the_last_free_subnet_of_a_big_range() {
        let r = SubnetRange::new(net("10.0.1.0/24"), net("10.0.255.0/24")).unwrap();
        let mut taken: HashSet<_> = r.iter().collect();
        taken.remove(&net("10.0.77.0/24"));
        assert_eq!(
            r.pick_free(&taken, &mut rand::rng()),
            Some(net("10.0.77.0/24"))
        );
    }

    #[test]
    fn ipv6_ranges_and_keys() {
        let r = SubnetRange::new(net("fd00:10:244:1::/64"), net("fd00:10:244:ff::/64")).unwrap();
        assert_eq!(r.len(), 255);
        assert!(r.is_ipv6());
        assert!(r.contains(net("fd00:10:244:7::/64")));
        assert!(!r.contains(net("10.244.7.0/24")));
        assert!(SubnetRange::new(net("10.244.1.0/24"), net("fd00::/24")).is_none());
        let mut taken: HashSet<_> = r.iter().collect();
        taken.remove(&net("fd00:10:244:77::/64"));
        assert_eq!(r.pick_free(&taken, &mut rand::rng()), Some(net("fd00:10:244:77::/64")));
        let huge = SubnetRange::new(net("fd00::/64"), net("fdff:ffff:ffff:ffff::/64")).unwrap();
        assert_eq!(huge.len(), 1 << 56);
        assert!(huge.pick_free(&HashSet::new(), &mut rand::rng()).is_some());
        assert_eq!(subnet_key(net("fd00:10:244:7::/64")), "fd00:10:244:7::-64");
        assert_eq!(parse_subnet_key("fd00:10:244:7::-64"), Some(net("fd00:10:244:7::/64")));
        for other in ["fd00:10:244:7:0::-64", "FD00:10:244:7::-64", "fd00:10:244:7::1-64"] {
            assert_eq!(parse_subnet_key(other), None, "{other:?}");
        }
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(subnet_key(net("10.244.7.0/24")), "10.244.7.0-24");
        assert_eq!(
            parse_subnet_key("10.244.7.0-24"),
            Some(net("10.244.7.0/24"))
        );
        assert_eq!(parse_subnet_key("10.244.7.1-24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
    }

    #[test]
    fn only_the_canonical_text_of_a_subnet_is_its_key() {
        for other in [
            "10.244.7.0-024",
            "10.244.7.0-+24",
            "010.244.7.0-24",
            "10.244.007.0-24",
            "10.244.7.0-24 ",
            " 10.244.7.0-24",
            "10.244.7.0--24",
        ] {
            assert_eq!(parse_subnet_key(other), None, "{other:?}");
        }
        assert_eq!(
            parse_subnet_key("10.244.128.0-17"),
            Some(net("10.244.128.0/17")),
            "canonical, if not the config's length (checked elsewhere)"
        );
        assert_eq!(
            gateway("10.244.7.0/24".parse().unwrap()).to_string(),
            "10.244.7.1/24"
        );
        assert_eq!(
            gateway6("fd00:10:244:7::/64".parse().unwrap()).to_string(),
            "fd00:10:244:7::1/64"
        );
    }
}
