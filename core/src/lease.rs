//! Subnet leases: what one host holds, as stored under `<prefix>/leases/<a.b.c.d>-<len>`.
//!
//! A lease is keyed by its subnet of the cluster's key family (IPv4 when the cluster has
//! it, else IPv6: `<prefix>/leases/fd00:10:244:7::-64`). In a dual-stack cluster the IPv6
//! subnet is part of the value ([`LeaseRecord::ipv6_subnet`]), so one host's two subnets
//! are granted, renewed, reserved and revoked as one key: they can never drift apart.
//!
//! The subnet is the key, not part of the value, so a value can never disagree with the
//! key it is stored under. Expiry is not in the value either: it lives in the etcd lease
//! the key is attached to, which is renewed by keepalive without rewriting the value (a
//! rewrite would wake every watcher on every renewal).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::BackendType;
use crate::mac::MacAddr;

pub const MAX_NODE_NAME: usize = 253;
/// Largest lease value accepted from etcd. A real one is under 400 bytes (the node name,
/// the longest field, is at most 253); the bound keeps a corrupt or hostile value from
/// costing more than a glance to reject.
pub const MAX_LEASE_VALUE_BYTES: usize = 4096;
/// The last millisecond of year 9999: timestamps past it cannot be written as RFC 3339,
/// so a value or message carrying one is refused instead of failing when re-encoded.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("invalid node name {0:?}: use 1-253 characters from a-z, A-Z, 0-9, '.', '-' and '_'")]
    NodeName(String),
    #[error("invalid public IP {0}: it must be a routable unicast IPv4 address (not unspecified, loopback, link-local, multicast or broadcast)")]
    PublicIp(Ipv4Addr),
    #[error("invalid public IPv6 {0}: it must be a routable unicast IPv6 address (not unspecified, loopback, link-local, multicast or IPv4-mapped)")]
    PublicIpv6(Ipv6Addr),
    #[error("no public IP: a lease needs a public IPv4 address, a public IPv6 address, or both")]
    NoPublicIp,
    #[error("invalid public IP {ip}: it lies inside the overlay network {network}")]
    PublicIpInOverlay { ip: IpAddr, network: IpNet },
    #[error("invalid lease: its key is the IPv6 subnet {key}, so the value must not name another IPv6 subnet ({value})")]
    SecondIpv6Subnet { key: Ipv6Net, value: Ipv6Net },
    #[error("invalid VTEP MAC {0}: it must be a unicast MAC address")]
    VtepMac(MacAddr),
    #[error("invalid interface name {0:?}: use 1-15 printable ASCII characters, not '.' or '..', no '/', ':', white space or control characters")]
    Iface(String),
    #[error("invalid underlay {underlay}: it must contain the public IP {ip}")]
    Underlay { underlay: IpNet, ip: IpAddr },
    #[error("invalid underlay {underlay}: the lease has no public {family} address for it")]
    UnderlayWithoutIp { underlay: IpNet, family: &'static str },
    #[error("invalid lease value: {0}")]
    Decode(String),
    #[error("invalid {field}: {millis} ms since 1970 is outside 0..={MAX_TIMESTAMP_MS}")]
    Timestamp { field: &'static str, millis: i64 },
}

/// Backend-specific data a host publishes with its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<MacAddr>,
    /// The host's public interface and its on-link prefix. Published so that anyone can
    /// compute the entries this host should have (`overlayctl routes --node`), including
    /// which peers it can reach directly (host-gw, direct routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<Ipv4Net>,
    /// The on-link IPv6 prefix of the public interface, beside `underlay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_v6: Option<Ipv6Net>,
}

/// The JSON value of a lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub node: String,
    /// The host's public IPv4 address; absent on a host without one (IPv6-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// The host's public IPv6 address, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// In a dual-stack cluster: the host's IPv6 subnet (the key is its IPv4 subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet: Option<Ipv6Net>,
    pub backend: BackendType,
    #[serde(default)]
    pub backend_data: BackendData,
    #[serde(default)]
    pub reserved: bool,
    #[serde(with = "rfc3339")]
    pub created_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub renewed_at: SystemTime,
}

/// A lease: a subnet (the key) and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The key subnet: IPv4 when the cluster has IPv4, else IPv6.
    pub subnet: IpNet,
    pub record: LeaseRecord,
}

impl Lease {
    pub fn node(&self) -> &str {
        &self.record.node
    }

    /// The host's IPv4 subnet, when it has one.
    pub fn ipv4(&self) -> Option<Ipv4Net> {
        match self.subnet {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }

    /// The host's IPv6 subnet, when it has one (the key, or the value's `ipv6_subnet`).
    pub fn ipv6(&self) -> Option<Ipv6Net> {
        match self.subnet {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => self.record.ipv6_subnet,
        }
    }

    /// The host's subnets, IPv4 first.
    pub fn subnets(&self) -> Vec<IpNet> {
        self.ipv4()
            .map(IpNet::V4)
            .into_iter()
            .chain(self.ipv6().map(IpNet::V6))
            .collect()
    }

    /// The subnets as people read them: "10.244.7.0/24, fd00:10:244:7::/64".
    pub fn subnets_text(&self) -> String {
        self.subnets()
            .iter()
            .map(IpNet::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The public addresses as people read them: "192.0.2.11, 2001:db8::11".
    pub fn public_text(&self) -> String {
        [self.public_addr(false), self.public_addr(true)]
            .into_iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The host's public address of a family.
    pub fn public_addr(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.record.public_ipv6.map(IpAddr::V6)
        } else {
            self.record.public_ip.map(IpAddr::V4)
        }
    }

    /// The record's own checks plus the one that needs the key: under an IPv6 key the
    /// value names no second IPv6 subnet.
    pub fn validate(&self) -> Result<(), LeaseError> {
        self.record.validate()?;
        if let (IpNet::V6(key), Some(value)) = (self.subnet, self.record.ipv6_subnet) {
            return Err(LeaseError::SecondIpv6Subnet { key, value });
        }
        Ok(())
    }
}

impl LeaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("lease serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LeaseError> {
        if bytes.len() > MAX_LEASE_VALUE_BYTES {
            return Err(LeaseError::Decode(format!(
                "{} bytes is over the limit of {MAX_LEASE_VALUE_BYTES}",
                bytes.len()
            )));
        }
        let rec: LeaseRecord =
            serde_json::from_slice(bytes).map_err(|e| LeaseError::Decode(e.to_string()))?;
        rec.validate()?;
        Ok(rec)
    }

    /// Checks every field a host or a message can get wrong; what [`Self::decode`]
    /// accepts, and what a lease received over gRPC must pass too.
    pub fn validate(&self) -> Result<(), LeaseError> {
        validate_node_name(&self.node)?;
        if self.public_ip.is_none() && self.public_ipv6.is_none() {
            return Err(LeaseError::NoPublicIp);
        }
        if let Some(ip) = self.public_ip {
            validate_public_ip(ip)?;
        }
        if let Some(ip) = self.public_ipv6 {
            validate_public_ipv6(ip)?;
        }
        validate_backend_data(&self.backend_data, self.public_ip, self.public_ipv6)?;
        for (field, t) in [
            ("created_at", self.created_at),
            ("renewed_at", self.renewed_at),
        ] {
            let millis = unix_millis(t);
            if checked_from_unix_millis(millis).is_none() {
                return Err(LeaseError::Timestamp { field, millis });
            }
        }
        Ok(())
    }
}

/// Checks what a host publishes besides its public IPs.
pub fn validate_backend_data(
    data: &BackendData,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
) -> Result<(), LeaseError> {
    if let Some(mac) = data.vtep_mac {
        validate_vtep_mac(mac)?;
    }
    if let Some(iface) = &data.iface {
        validate_iface(iface)?;
    }
    if let Some(underlay) = data.underlay {
        match public_ip {
            None => {
                return Err(LeaseError::UnderlayWithoutIp {
                    underlay: underlay.into(),
                    family: "IPv4",
                })
            }
            Some(ip) if !underlay.contains(&ip) => {
                return Err(LeaseError::Underlay {
                    underlay: underlay.into(),
                    ip: ip.into(),
                })
            }
            Some(_) => {}
        }
    }
    if let Some(underlay) = data.underlay_v6 {
        match public_ipv6 {
            None => {
                return Err(LeaseError::UnderlayWithoutIp {
                    underlay: underlay.into(),
                    family: "IPv6",
                })
            }
            Some(ip) if !underlay.contains(&ip) => {
                return Err(LeaseError::Underlay {
                    underlay: underlay.into(),
                    ip: ip.into(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// An interface name as Linux accepts one (1-15 bytes, not "." or "..", no '/', ':' or
/// white space), and printable: visible ASCII only, so a name shown by `overlayctl` or
/// written to a log can never carry a terminal escape sequence.
pub fn validate_iface(name: &str) -> Result<(), LeaseError> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        // Debug-formatted in the message, so the offending characters show as escapes.
        Err(LeaseError::Iface(name.chars().take(32).collect()))
    }
}

pub fn validate_node_name(name: &str) -> Result<(), LeaseError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(LeaseError::NodeName(name.chars().take(64).collect()))
    }
}

/// A public IP other hosts can send to: unicast, and neither loopback (every host would
/// reach itself) nor link-local (not routed, and the same on many hosts). Whether it lies
/// inside the overlay network is checked against the config
/// ([`LeaseError::PublicIpInOverlay`]).
pub fn validate_public_ip(ip: Ipv4Addr) -> Result<(), LeaseError> {
    if ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_loopback()
        || ip.is_link_local()
    {
        Err(LeaseError::PublicIp(ip))
    } else {
        Ok(())
    }
}

/// A public IPv6 address other hosts can send to: unicast, not loopback, unspecified,
/// link-local (fe80::/10: the same prefix on every link, useless without a zone) or
/// IPv4-mapped (that is an IPv4 address: give it as the public IPv4).
pub fn validate_public_ipv6(ip: Ipv6Addr) -> Result<(), LeaseError> {
    let seg0 = ip.segments()[0];
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg0 & 0xffc0) == 0xfe80
        || ip.to_ipv4_mapped().is_some()
    {
        Err(LeaseError::PublicIpv6(ip))
    } else {
        Ok(())
    }
}

pub fn validate_vtep_mac(mac: MacAddr) -> Result<(), LeaseError> {
    if mac.is_unicast() {
        Ok(())
    } else {
        Err(LeaseError::VtepMac(mac))
    }
}

/// Milliseconds since the Unix epoch (negative never happens for our timestamps).
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn from_unix_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}

/// The time `ms` milliseconds after the epoch when it lies in `0..=MAX_TIMESTAMP_MS`
/// (what a lease can hold), `None` otherwise.
pub fn checked_from_unix_millis(ms: i64) -> Option<SystemTime> {
    (0..=MAX_TIMESTAMP_MS)
        .contains(&ms)
        .then(|| from_unix_millis(ms))
}

/// Now, at the millisecond precision leases are stored with (so a lease handed out equals
/// the same lease read back).
pub fn now_millis() -> SystemTime {
    from_unix_millis(unix_millis(SystemTime::now()))
}

/// RFC 3339 with millisecond precision, as etcd users expect to read it.
/// A time past year 9999 (which RFC 3339 cannot write, and only a bad message could
/// carry) is shown as the last millisecond of 9999 rather than panicking.
pub fn format_rfc3339(t: SystemTime) -> String {
    let last = from_unix_millis(MAX_TIMESTAMP_MS);
    humantime::format_rfc3339_millis(t.min(last)).to_string()
}

mod rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    /// Kept at the millisecond precision values are written with, so that a decoded
    /// record encodes back to the same value (and equals it after another decode).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        // humantime refuses years past 9999 itself.
        let t = humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)?;
        Ok(from_unix_millis(unix_millis(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeaseRecord {
        LeaseRecord {
            node: "node-1".into(),
            public_ip: Some("192.0.2.11".parse().unwrap()),
            public_ipv6: None,
            ipv6_subnet: None,
            backend: BackendType::Vxlan,
            backend_data: BackendData {
                vtep_mac: Some("0a:58:0a:f4:07:00".parse().unwrap()),
                iface: Some("eth0".into()),
                underlay: Some("192.0.2.0/24".parse().unwrap()),
                underlay_v6: None,
            },
            reserved: false,
            created_at: from_unix_millis(1_700_000_000_123),
            renewed_at: from_unix_millis(1_700_000_000_456),
        }
    }

    #[test]
    fn encodes_and_decodes() {
        let r = record();
        let bytes = r.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains(r#""created_at":"2023-11-14T22:13:20.123Z""#),
            "{text}"
        );
        assert!(text.contains(r#""vtep_mac":"0a:58:0a:f4:07:00""#), "{text}");
        assert_eq!(LeaseRecord::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn decode_rejects_bad_values() {
        let good = String::from_utf8(record().encode()).unwrap();
        for (from, to) in [
            ("node-1", "node 1"),
            ("192.0.2.11", "0.0.0.0"),
            ("192.0.2.11", "224.0.0.1"),
            ("0a:58:0a:f4:07:00", "01:58:0a:f4:07:00"),
            ("0a:58:0a:f4:07:00", "nonsense"),
            ("vxlan", "udp"),
            ("eth0", "a/b"),
            ("192.0.2.0/24", "198.51.100.0/24"),
        ] {
            let bad = good.replace(from, to);
            assert!(LeaseRecord::decode(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(LeaseRecord::decode(b"{}").is_err());
        assert!(LeaseRecord::decode(b"\xff").is_err());
    }

    #[test]
    fn decode_refuses_oversized_values() {
        let good = String::from_utf8(record().encode()).unwrap();
        let padded = format!("{good}{}", " ".repeat(MAX_LEASE_VALUE_BYTES - good.len()));
        assert!(LeaseRecord::decode(padded.as_bytes()).is_ok());
        let e = LeaseRecord::decode(format!("{padded} ").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("over the limit of 4096"), "{e}");
    }

    /// Sub-millisecond digits used to give a record that differed from itself after a
    /// re-encode (the lease_value fuzz target's invariant); a time past 9999, which only
    /// a message can carry, used to panic when formatted.
    #[test]
    fn timestamps_are_bounded_and_kept_to_the_millisecond() {
        let good = String::from_utf8(record().encode()).unwrap();
        let leap = good.replace("2023-11-14T22:13:20.123Z", "9999-12-31T23:59:60Z");
        let r = LeaseRecord::decode(leap.as_bytes()).unwrap();
        assert_eq!(LeaseRecord::decode(&r.encode()).unwrap(), r);
        let past = good.replace("2023-11-14T22:13:20.123Z", "10000-01-01T00:00:00Z");
        assert!(LeaseRecord::decode(past.as_bytes()).is_err());
        let last = good.replace("2023-11-14T22:13:20.123Z", "9999-12-31T23:59:59.999Z");
        let r = LeaseRecord::decode(last.as_bytes()).unwrap();
        assert_eq!(unix_millis(r.created_at), MAX_TIMESTAMP_MS);
        assert_eq!(LeaseRecord::decode(&r.encode()).unwrap(), r);
        let fine = good.replace("2023-11-14T22:13:20.123Z", "2023-11-14T22:13:20.123456789Z");
        let r = LeaseRecord::decode(fine.as_bytes()).unwrap();
        assert_eq!(r.created_at, from_unix_millis(1_700_000_000_123));
        assert_eq!(LeaseRecord::decode(&r.encode()).unwrap(), r);
        assert_eq!(checked_from_unix_millis(-1), None);
        assert_eq!(checked_from_unix_millis(MAX_TIMESTAMP_MS + 1), None);
        assert_eq!(
            format_rfc3339(from_unix_millis(i64::MAX)),
            "9999-12-31T23:59:59.999Z"
        );
        let mut far = record();
        far.renewed_at = from_unix_millis(MAX_TIMESTAMP_MS + 1);
        assert!(matches!(
            far.validate(),
            Err(LeaseError::Timestamp {
                field: "renewed_at",
                ..
            })
        ));
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("worker-1.example_org").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name(&"a".repeat(254)).is_err());
        assert!(validate_node_name("a/b").is_err());
    }

    /// A hostile agent published an interface name with a terminal escape sequence, and
    /// loopback or link-local public IPs, and every one was stored and shown.
    #[test]
    fn lease_fields_refuse_control_characters_and_unroutable_public_ips() {
        let ip: Option<Ipv4Addr> = Some("192.0.2.11".parse().unwrap());
        let with_iface = |name: &str| BackendData {
            iface: Some(name.into()),
            ..Default::default()
        };
        for bad in [
            "e\x1b[2J",
            "\x1b]0;x\x07",
            "eth\u{9b}1",
            "eth\u{202e}0",
            "eth\t0",
            "eth 0",
            "eth/0",
            "eth:0",
            ".",
            "..",
            "",
            "sixteen-bytes-xx",
            "\u{e9}th0",
        ] {
            let e = validate_backend_data(&with_iface(bad), ip, None).unwrap_err();
            assert!(matches!(e, LeaseError::Iface(_)), "{bad:?}: {e}");
            assert!(
                !e.to_string().contains('\x1b'),
                "the error echoes it raw: {e}"
            );
        }
        for good in [
            "eth0",
            "ens3f0np0",
            "br-1.100",
            "wlp0s20f3",
            "a",
            "fifteen-bytes-x",
        ] {
            assert!(
                validate_backend_data(&with_iface(good), ip, None).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
        ] {
            let e = validate_public_ip(bad.parse().unwrap()).unwrap_err();
            assert!(e.to_string().contains("routable unicast"), "{bad}: {e}");
        }
        for good in ["192.0.2.1", "198.51.100.7", "10.0.0.1"] {
            assert!(validate_public_ip(good.parse().unwrap()).is_ok(), "{good}");
        }
        let good = String::from_utf8(record().encode()).unwrap();
        for (from, to) in [
            ("eth0", "e\\u001b[2J"),
            ("192.0.2.11", "127.0.0.1"),
            ("192.0.2.11", "169.254.0.9"),
        ] {
            let bad = good.replace(from, to);
            assert!(LeaseRecord::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn dual_stack_and_ipv6_only_records() {
        let mut r = record();
        r.public_ipv6 = Some("2001:db8::11".parse().unwrap());
        r.ipv6_subnet = Some("fd00:10:244:7::/64".parse().unwrap());
        r.backend_data.underlay_v6 = Some("2001:db8::/64".parse().unwrap());
        let back = LeaseRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        let lease = Lease {
            subnet: "10.244.7.0/24".parse().unwrap(),
            record: back,
        };
        assert_eq!(lease.subnets_text(), "10.244.7.0/24, fd00:10:244:7::/64");
        assert!(lease.validate().is_ok());
        let v6_keyed = Lease {
            subnet: "fd00:10:244:8::/64".parse().unwrap(),
            record: r.clone(),
        };
        assert!(matches!(
            v6_keyed.validate(),
            Err(LeaseError::SecondIpv6Subnet { .. })
        ));
        let mut only6 = r.clone();
        only6.public_ip = None;
        only6.backend_data.underlay = None;
        only6.ipv6_subnet = None;
        let text = String::from_utf8(only6.encode()).unwrap();
        assert!(!text.contains("public_ip\""), "{text}");
        assert_eq!(LeaseRecord::decode(text.as_bytes()).unwrap(), only6);
        let mut none = only6.clone();
        none.public_ipv6 = None;
        none.backend_data.underlay_v6 = None;
        assert_eq!(none.validate(), Err(LeaseError::NoPublicIp));
        for bad in ["fe80::1", "::1", "::", "ff02::1", "::ffff:192.0.2.1"] {
            let e = validate_public_ipv6(bad.parse().unwrap()).unwrap_err();
            assert!(e.to_string().contains("routable unicast IPv6"), "{bad}: {e}");
        }
        assert!(validate_public_ipv6("2001:db8::1".parse().unwrap()).is_ok());
        let mut outside = r.clone();
        outside.backend_data.underlay_v6 = Some("2001:db8:1::/64".parse().unwrap());
        assert!(matches!(outside.validate(), Err(LeaseError::Underlay { .. })));
    }
}
