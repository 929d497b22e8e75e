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
    v1::NetworkConfig {
        network: c.network.to_string(),
        subnet_len: c.subnet_len.into(),
        subnet_min: c.subnet_min.to_string(),
        subnet_max: c.subnet_max.to_string(),
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
        public_ip: r.public_ip.to_string(),
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

pub fn lease_from_proto(l: &v1::Lease) -> Result<Lease, InvalidMessage> {
    let subnet = l
        .subnet
        .parse()
        .map_err(|_| InvalidMessage(format!("subnet: {:?} is not an IPv4 CIDR", l.subnet)))?;
    let public_ip = l.public_ip.parse().map_err(|_| {
        InvalidMessage(format!(
            "public_ip: {:?} is not an IPv4 address",
            l.public_ip
        ))
    })?;
    let vtep_mac = match &l.vtep_mac {
        Some(m) => Some(
            m.parse()
                .map_err(|e| InvalidMessage(format!("vtep_mac: {e}")))?,
        ),
        None => None,
    };
    let underlay = match &l.underlay {
        Some(u) => Some(
            u.parse()
                .map_err(|_| InvalidMessage(format!("underlay: {u:?} is not an IPv4 CIDR")))?,
        ),
        None => None,
    };
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
        backend: backend_from_proto(l.backend)?,
        backend_data: BackendData {
            vtep_mac,
            iface: l.iface.clone(),
            underlay,
        },
        reserved: l.reserved,
        created_at: time("created_at_ms", l.created_at_ms)?,
        renewed_at: time("renewed_at_ms", l.renewed_at_ms)?,
    };
    // The same checks as a value read from etcd: a peer's message is no more trusted.
    record
        .validate()
        .map_err(|e| InvalidMessage(format!("lease {subnet}: {e}")))?;
    let lease = Lease { subnet, record };
    if lease.subnet.network() != lease.subnet.addr() {
        return Err(InvalidMessage(format!(
            "subnet: {} has host bits set (did you mean {}?)",
            lease.subnet,
            lease.subnet.trunc()
        )));
    }
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
                public_ip: "192.0.2.11".parse().unwrap(),
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
        let cases: [Case; 8] = [
            ("not an IPv4 CIDR", |l| l.subnet = "10.244.7.0".into()),
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
