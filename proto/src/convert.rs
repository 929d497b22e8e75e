use std::time::Duration;

use overlay_core::config::NetworkConfig;
use overlay_core::lease::{
    checked_from_unix_millis, unix_millis, BackendData, Lease, LeaseRecord, MAX_TIMESTAMP_MS,
};
use overlay_core::watch::{ChangeKind, LeaseEvent};
use overlay_core::BackendType;

use crate::v1;

/// A message from the other side that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage(pub String);

impl std::fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidMessage {}

pub fn backend_to_proto(b: BackendType) -> v1::BackendType {
    match b {
        BackendType::Vxlan => v1::BackendType::Vxlan,
        BackendType::HostGw => v1::BackendType::HostGw,
        BackendType::Alloc => v1::BackendType::Alloc,
    }
}

pub fn backend_from_proto(raw: i32) -> Result<BackendType, InvalidMessage> {
    match v1::BackendType::try_from(raw) {
        Ok(v1::BackendType::Vxlan) => Ok(BackendType::Vxlan),
        Ok(v1::BackendType::HostGw) => Ok(BackendType::HostGw),
        Ok(v1::BackendType::Alloc) => Ok(BackendType::Alloc),
        _ => Err(InvalidMessage(format!(
            "backend: unknown backend type {raw}"
        ))),
    }
}

pub fn config_to_proto(c: &NetworkConfig) -> v1::NetworkConfig {
    let (v4, v6) = (c.ipv4, c.ipv6);
    v1::NetworkConfig {
        network: v4.map(|p| p.network.to_string()).unwrap_or_default(),
        subnet_len: v4.map(|p| p.subnet_len.into()).unwrap_or_default(),
        subnet_min: v4.map(|p| p.subnet_min.to_string()).unwrap_or_default(),
        subnet_max: v4.map(|p| p.subnet_max.to_string()).unwrap_or_default(),
        ipv6_network: v6.map(|p| p.network.to_string()),
        ipv6_subnet_len: v6.map(|p| p.subnet_len.into()),
        ipv6_subnet_min: v6.map(|p| p.subnet_min.to_string()),
        ipv6_subnet_max: v6.map(|p| p.subnet_max.to_string()),
        backend: backend_to_proto(c.backend.kind).into(),
        vni: c.backend.vni,
        port: c.backend.port.into(),
        direct_routing: c.backend.direct_routing,
        mtu: c.mtu,
        lease_ttl_secs: c.lease_ttl.as_secs(),
        json: c.to_json(),
    }
}

/// The config is carried as its canonical JSON; the typed fields are a convenience.
pub fn config_from_proto(c: &v1::NetworkConfig) -> Result<NetworkConfig, InvalidMessage> {
    NetworkConfig::from_json(&c.json).map_err(|e| InvalidMessage(e.to_string()))
}

pub fn lease_to_proto(l: &Lease, expires_at_ms: Option<i64>) -> v1::Lease {
    let r = &l.record;
    v1::Lease {
        subnet: l.subnet.to_string(),
        node: r.node.clone(),
        public_ip: r.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        public_ipv6: r.public_ipv6.map(|ip| ip.to_string()),
        ipv6_subnet: r.ipv6_subnet.map(|s| s.to_string()),
        underlay_v6: r.backend_data.underlay_v6.map(|u| u.to_string()),
        backend: backend_to_proto(r.backend).into(),
        vtep_mac: r.backend_data.vtep_mac.map(|m| m.to_string()),
        iface: r.backend_data.iface.clone(),
        underlay: r.backend_data.underlay.map(|u| u.to_string()),
        reserved: r.reserved,
        created_at_ms: unix_millis(r.created_at),
        renewed_at_ms: unix_millis(r.renewed_at),
        expires_at_ms,
    }
}

/// Parses an optional message field with `parse`, naming the field and what it should be.
fn optional<T: std::str::FromStr>(
    field: &str,
    what: &str,
    text: Option<&str>,
) -> Result<Option<T>, InvalidMessage> {
    text.map(|t| {
        t.parse()
            .map_err(|_| InvalidMessage(format!("{field}: {t:?} is not {what}")))
    })
    .transpose()
}

/// A CIDR without host bits, or an error naming the field.
fn aligned<N: Copy + std::fmt::Display + PartialEq>(
    field: &str,
    net: N,
    addr: impl Fn(N) -> std::net::IpAddr,
    network: impl Fn(N) -> std::net::IpAddr,
    trunc: impl Fn(N) -> N,
) -> Result<N, InvalidMessage> {
    if addr(net) != network(net) {
        return Err(InvalidMessage(format!(
            "{field}: {net} has host bits set (did you mean {}?)",
            trunc(net)
        )));
    }
    Ok(net)
}

pub fn lease_from_proto(l: &v1::Lease) -> Result<Lease, InvalidMessage> {
    let subnet: ipnet::IpNet = l
        .subnet
        .parse()
        .map_err(|_| InvalidMessage(format!("subnet: {:?} is not a CIDR", l.subnet)))?;
    let subnet = aligned("subnet", subnet, |n| n.addr(), |n| n.network(), |n| n.trunc())?;
    let public_ip = optional(
        "public_ip",
        "an IPv4 address",
        Some(l.public_ip.as_str()).filter(|t| !t.is_empty()),
    )?;
    let public_ipv6 = optional("public_ipv6", "an IPv6 address", l.public_ipv6.as_deref())?;
    let ipv6_subnet: Option<ipnet::Ipv6Net> =
        optional("ipv6_subnet", "an IPv6 CIDR", l.ipv6_subnet.as_deref())?;
    if let Some(s6) = ipv6_subnet {
        aligned(
            "ipv6_subnet",
            s6,
            |n| n.addr().into(),
            |n| n.network().into(),
            |n| n.trunc(),
        )?;
    }
    let vtep_mac = match &l.vtep_mac {
        Some(m) => Some(
            m.parse()
                .map_err(|e| InvalidMessage(format!("vtep_mac: {e}")))?,
        ),
        None => None,
    };
    let underlay = optional("underlay", "an IPv4 CIDR", l.underlay.as_deref())?;
    let underlay_v6 = optional("underlay_v6", "an IPv6 CIDR", l.underlay_v6.as_deref())?;
    let time = |field: &str, ms: i64| {
        checked_from_unix_millis(ms).ok_or_else(|| {
            InvalidMessage(format!(
                "{field}: {ms} ms since 1970 is outside 0..={MAX_TIMESTAMP_MS}"
            ))
        })
    };
    let record = LeaseRecord {
        node: l.node.clone(),
        public_ip,
        public_ipv6,
        ipv6_subnet,
        backend: backend_from_proto(l.backend)?,
        backend_data: BackendData {
            vtep_mac,
            iface: l.iface.clone(),
            underlay,
            underlay_v6,
        },
        reserved: l.reserved,
        created_at: time("created_at_ms", l.created_at_ms)?,
        renewed_at: time("renewed_at_ms", l.renewed_at_ms)?,
    };
    // The same checks as a value read from etcd: a peer's message is no more trusted.
    let lease = Lease { subnet, record };
    lease
        .validate()
        .map_err(|e| InvalidMessage(format!("lease {subnet}: {e}")))?;
    Ok(lease)
}

pub fn event_to_proto(e: &LeaseEvent) -> v1::WatchLeasesResponse {
    let kind = match e.kind {
        ChangeKind::Added => v1::EventType::Added,
        ChangeKind::Removed => v1::EventType::Removed,
    };
    v1::WatchLeasesResponse {
        kind: Some(v1::watch_leases_response::Kind::Event(v1::LeaseEvent {
            revision: e.revision,
            r#type: kind.into(),
            lease: Some(lease_to_proto(&e.lease, None)),
        })),
    }
}

pub fn event_from_proto(e: &v1::LeaseEvent) -> Result<LeaseEvent, InvalidMessage> {
    let kind = match v1::EventType::try_from(e.r#type) {
        Ok(v1::EventType::Added) => ChangeKind::Added,
        Ok(v1::EventType::Removed) => ChangeKind::Removed,
        _ => {
            return Err(InvalidMessage(format!(
                "event type {} is unknown",
                e.r#type
            )))
        }
    };
    let lease = e
        .lease
        .as_ref()
        .ok_or_else(|| InvalidMessage("event without a lease".into()))?;
    Ok(LeaseEvent {
        revision: e.revision,
        kind,
        lease: lease_from_proto(lease)?,
    })
}

pub fn snapshot_to_proto(revision: i64, leases: &[Lease]) -> v1::WatchLeasesResponse {
    v1::WatchLeasesResponse {
        kind: Some(v1::watch_leases_response::Kind::Snapshot(
            v1::LeaseSnapshot {
                revision,
                leases: leases.iter().map(|l| lease_to_proto(l, None)).collect(),
            },
        )),
    }
}

pub fn ttl_from_proto(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::lease::from_unix_millis;

    #[test]
    fn lease_round_trips() {
        let lease = Lease {
            subnet: "10.244.7.0/24".parse().unwrap(),
            record: LeaseRecord {
                node: "n1".into(),
                public_ip: Some("192.0.2.11".parse().unwrap()),
                public_ipv6: Some("2001:db8::11".parse().unwrap()),
                ipv6_subnet: Some("fd00:10:244:7::/64".parse().unwrap()),
                backend: BackendType::Vxlan,
                backend_data: BackendData {
                    vtep_mac: Some("0a:00:00:00:00:01".parse().unwrap()),
                    ..Default::default()
                },
                reserved: true,
                created_at: from_unix_millis(1000),
                renewed_at: from_unix_millis(2000),
            },
        };
        let p = lease_to_proto(&lease, Some(5));
        assert_eq!(p.expires_at_ms, Some(5));
        assert_eq!(lease_from_proto(&p).unwrap(), lease);
        let mut bad = p.clone();
        bad.vtep_mac = Some("zz".into());
        assert!(lease_from_proto(&bad).unwrap_err().0.contains("vtep_mac"));

        // Each field is held to what a value in etcd must be.
        type Case = (&'static str, fn(&mut v1::Lease));
        let cases: [Case; 13] = [
            ("not a CIDR", |l| l.subnet = "10.244.7.0".into()),
            ("host bits", |l| l.ipv6_subnet = Some("fd00:10:244:7::1/64".into())),
            ("not an IPv6 CIDR", |l| l.ipv6_subnet = Some("10.244.7.0/24".into())),
            ("public_ipv6", |l| l.public_ipv6 = Some("192.0.2.1".into())),
            ("public IPv6", |l| l.public_ipv6 = Some("fe80::1".into())),
            ("no public IP", |l| {
                l.public_ip.clear();
                l.public_ipv6 = None;
            }),
            ("host bits", |l| l.subnet = "10.244.7.5/24".into()),
            ("node name", |l| l.node = "a/b".into()),
            ("node name", |l| l.node = "n".repeat(254)),
            ("public IP", |l| l.public_ip = "224.0.0.1".into()),
            ("interface name", |l| l.iface = Some("x".repeat(16))),
            ("created_at_ms", |l| l.created_at_ms = -1),
            ("renewed_at_ms", |l| l.renewed_at_ms = i64::MAX),
        ];
        for (expected, spoil) in cases {
            let mut bad = p.clone();
            spoil(&mut bad);
            let e = lease_from_proto(&bad).unwrap_err().0;
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
    }
}
