//! Subnet ranges and free-subnet selection.
//!
//! Selection is random rather than first-free: after a mass restart, agents that lost their
//! state would otherwise all race for the same lowest subnet and retry one after another.
//! A few random probes find a free subnet quickly while the range is mostly free; only when
//! those miss do we pay for a full scan, so a /8 split into /30s never enumerates four
//! million candidates for the common case.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::{Rng, RngExt};

/// An inclusive range of equally sized, aligned subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    first: u32,
    last: u32,
    len: u8,
}

impl SubnetRange {
    /// `min` and `max` must have the same prefix length, be aligned, and `min <= max`.
    pub fn new(min: Ipv4Net, max: Ipv4Net) -> Option<Self> {
        if min.prefix_len() != max.prefix_len()
            || min.addr() != min.network()
            || max.addr() != max.network()
        {
            return None;
        }
        let (first, last) = (u32::from(min.network()), u32::from(max.network()));
        (first <= last).then_some(SubnetRange {
            first,
            last,
            len: min.prefix_len(),
        })
    }

    fn step(&self) -> u64 {
        1u64 << (32 - self.len)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Number of subnets in the range.
    pub fn len(&self) -> u64 {
        (self.last - self.first) as u64 / self.step() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th subnet of the range.
    pub fn nth(&self, i: u64) -> Option<Ipv4Net> {
        (i < self.len()).then(|| {
            Ipv4Net::new(
                Ipv4Addr::from(self.first + (i * self.step()) as u32),
                self.len,
            )
            .expect("valid prefix")
        })
    }

    pub fn contains(&self, subnet: Ipv4Net) -> bool {
        let a = u32::from(subnet.addr());
        subnet.prefix_len() == self.len
            && subnet.addr() == subnet.network()
            && a >= self.first
            && a <= self.last
    }

    pub fn iter(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        (0..self.len()).map(|i| self.nth(i).expect("in range"))
    }

    /// Picks a subnet of the range that is not in `taken`, at random; `None` when the
    /// range is exhausted.
    pub fn pick_free<R: Rng + ?Sized>(
        &self,
        taken: &HashSet<Ipv4Net>,
        rng: &mut R,
    ) -> Option<Ipv4Net> {
        self.pick_free_by(|s| taken.contains(&s), rng)
    }

    /// [`Self::pick_free`] with "taken" decided by `is_taken`: a few random probes, then,
    /// when the range is nearly full, a uniform pick among all the free subnets.
    pub fn pick_free_by<R: Rng + ?Sized>(
        &self,
        is_taken: impl Fn(Ipv4Net) -> bool,
        rng: &mut R,
    ) -> Option<Ipv4Net> {
        let n = self.len();
        for _ in 0..32 {
            let candidate = self.nth(rng.random_range(0..n)).expect("in range");
            if !is_taken(candidate) {
                return Some(candidate);
            }
        }
        let free: Vec<Ipv4Net> = self.iter().filter(|s| !is_taken(*s)).collect();
        if free.is_empty() {
            None
        } else {
            Some(free[rng.random_range(0..free.len())])
        }
    }
}

/// The etcd key suffix of a subnet: `10.244.7.0-24` (a `/` would nest the key).
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Parses a key suffix made by [`subnet_key`], and only those: the text must be exactly
/// what [`subnet_key`] prints for the subnet (`10.244.7.0-024`, `010.244.7.0-24` or
/// `10.244.7.1-24` are not keys of 10.244.7.0/24). Otherwise two keys could name one subnet,
/// and one of them would be a second holder of it.
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Net> {
    let (addr, len) = key.rsplit_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
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
        assert_eq!(gateway(net("10.244.7.0/24")).to_string(), "10.244.7.1/24");
    }
}
