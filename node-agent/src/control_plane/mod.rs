//! What the agent needs from the control plane, in domain types: the network config, its
//! own lease (acquire, renew) and a stream of the cluster's leases.
//!
//! The agent's loop ([`crate::agent`]) depends on this trait only, as Flannel's daemon
//! depends on its subnet `Manager` interface rather than on etcd: the gRPC client
//! ([`grpc::GrpcControlPlane`]) is one implementation, and an in-memory one
//! (`fake::FakeControlPlane`, with the `testing` feature) lets the loop's renewals,
//! re-acquisitions, config changes and watch resumes be tested without a controller, etcd
//! or root. Transport details (protobuf messages, status codes, failing over between
//! controllers) stay inside the implementation; the loop sees only what it must act on:
//! retry later ([`ControlPlaneError::Unavailable`]), or the lease is gone.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{BackendData, Lease};
use overlay_core::watch::LeaseEvent;
use overlay_core::BackendType;

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod grpc;

/// What this host asks for when it acquires its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub node: String,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendType,
    pub data: BackendData,
    /// The subnet to get back if it is still free (the one held before a restart).
    pub preferred: Option<IpNet>,
    /// Dual stack: the IPv6 subnet to get back if it is still free.
    pub preferred6: Option<Ipv6Net>,
    pub iface: Option<String>,
    pub underlay: Option<Ipv4Net>,
    pub underlay_v6: Option<Ipv6Net>,
}

/// A lease the control plane granted, with the TTL to renew within (zero: a reservation,
/// which never expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub lease: Lease,
    pub ttl: Duration,
}

/// One message of the lease stream: the whole state, or one change after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerUpdate {
    Snapshot { leases: Vec<Lease>, revision: i64 },
    Event(LeaseEvent),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlPlaneError {
    /// No controller answered, or it could not serve the call now: keep everything, retry.
    #[error("{0}")]
    Unavailable(String),
    /// The controller answered and said no (e.g. the subnet range is exhausted).
    #[error("{0}")]
    Refused(String),
    /// The controller is busy (too many requests at once, or this node's rate limit): try
    /// again after `retry_after`, which it said (gRPC retry pushback). Keep everything.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// Renewal only: the lease no longer exists or is someone else's; acquire again.
    #[error("{0}")]
    LeaseGone(String),
    /// The controller's answer could not be understood.
    #[error("bad answer from the controller: {0}")]
    BadAnswer(String),
}

impl ControlPlaneError {
    /// How long the controller asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ControlPlaneError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

pub type PeerStream = BoxStream<'static, Result<PeerUpdate, ControlPlaneError>>;

#[async_trait]
pub trait ControlPlane: Send + Sync {
    /// The cluster's network config.
    async fn config(&self) -> Result<NetworkConfig, ControlPlaneError>;

    /// This host's lease: its existing one, the preferred subnet, or a new one.
    async fn acquire(&self, request: &LeaseRequest) -> Result<Granted, ControlPlaneError>;

    /// Keeps `subnet` leased to `node`; the TTL it now has.
    async fn renew(&self, node: &str, subnet: IpNet) -> Result<Duration, ControlPlaneError>;

    /// Every lease of the cluster: a snapshot (or, when the controller can replay, only
    /// the events after `after_revision`), then changes as they happen. The stream ends
    /// or yields an error when it breaks; the caller resumes from the last revision seen.
    async fn watch(&self, after_revision: i64) -> Result<PeerStream, ControlPlaneError>;
}
