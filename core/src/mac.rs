//! A 48-bit Ethernet MAC address.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex pairs such as 0a:58:0a:f4:07:00)")]
pub struct MacParseError(pub String);

impl MacAddr {
    /// A unicast MAC address (multicast bit clear) that is not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    /// A locally administered unicast MAC derived from `seed` (FNV-1a, stable across
    /// releases and machines): the same node gets the same MAC after a reboot even if its
    /// state dir is lost, so peers' FDB and neighbour entries stay valid.
    pub fn derive(seed: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddr::local_unicast([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Marks a MAC as locally administered unicast.
    pub fn local_unicast(mut bytes: [u8; 6]) -> Self {
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        MacAddr(bytes)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            // from_str_radix alone would take "+a" as a hex pair.
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "0A:58:0a:f4:07:00".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:f4:07:00");
        assert!(m.is_unicast());
        for bad in [
            "",
            "0a:58:0a:f4:07",
            "0a:58:0a:f4:07:00:11",
            "zz:58:0a:f4:07:00",
            "0a5:8:0a:f4:07:00",
            "+a:58:0a:f4:07:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        assert!(MacAddr::local_unicast([0xff; 6]).is_unicast());
        let a = MacAddr::derive("vtep/node-1/1");
        assert_eq!(a, MacAddr::derive("vtep/node-1/1"));
        assert_ne!(a, MacAddr::derive("vtep/node-2/1"));
        assert!(a.is_unicast() && a.0[0] & 2 == 2);
        // Pinned: a change here would change every VTEP MAC in every cluster on upgrade.
        assert_eq!(MacAddr::derive("").to_string(), "ca:f2:9c:e4:84:22");
    }
}
