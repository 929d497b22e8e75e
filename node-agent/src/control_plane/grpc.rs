//! [`ControlPlane`] over the controller's gRPC API (`overlay.v1.Agent`), failing over
//! between controllers: a transport failure drops the connection and the next call tries
//! the next controller.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::StreamExt;
use ipnet::IpNet;
use overlay_core::config::NetworkConfig;
use overlay_proto::v1::{self, watch_leases_response::Kind};
use overlay_proto::{backend_to_proto, config_from_proto, event_from_proto, lease_from_proto};
use tonic::Code;

use super::{ControlPlane, ControlPlaneError, Granted, LeaseRequest, PeerStream, PeerUpdate};
use overlay_common::connect::{error_chain, is_transport_failure, Controllers};

pub struct GrpcControlPlane {
    controllers: Arc<Controllers>,
}

impl GrpcControlPlane {
    pub fn new(controllers: Controllers) -> Self {
        GrpcControlPlane {
            controllers: Arc::new(controllers),
        }
    }

    async fn client(
        &self,
    ) -> Result<v1::agent_client::AgentClient<tonic::transport::Channel>, ControlPlaneError> {
        let channel = self
            .controllers
            .channel()
            .await
            .map_err(|e| ControlPlaneError::Unavailable(e.to_string()))?;
        Ok(v1::agent_client::AgentClient::new(channel))
    }

    /// A failed call as the agent sees it; a transport failure also fails over.
    fn failure(&self, s: tonic::Status) -> ControlPlaneError {
        if let Some(retry_after) = retry_pushback(&s) {
            return ControlPlaneError::Busy {
                message: s.message().to_string(),
                retry_after,
            };
        }
        if is_transport_failure(&s) {
            self.controllers.failed();
            return ControlPlaneError::Unavailable(error_chain(&s));
        }
        match s.code() {
            Code::NotFound | Code::PermissionDenied => {
                ControlPlaneError::LeaseGone(s.message().to_string())
            }
            Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::AlreadyExists => ControlPlaneError::Refused(s.message().to_string()),
            _ => ControlPlaneError::Unavailable(s.message().to_string()),
        }
    }
}

/// The controller's "retry after" (gRPC retry pushback, gRFC A6), when it sent one: its
/// answers that mean "not now" (busy, rate limited) carry it.
pub fn retry_pushback(s: &tonic::Status) -> Option<Duration> {
    let ms: u64 = s
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A pushback longer than a minute is not believed; backoff rules then.
    Some(Duration::from_millis(ms.min(60_000)))
}

fn bad(e: impl std::fmt::Display) -> ControlPlaneError {
    ControlPlaneError::BadAnswer(e.to_string())
}

/// The longest TTL taken from a controller: etcd's own maximum lease TTL is 9e9 s, and a
/// larger answer would overflow the agent's time arithmetic.
const MAX_TTL_SECS: u64 = 9_000_000_000;

fn ttl(secs: u64) -> Result<Duration, ControlPlaneError> {
    if secs > MAX_TTL_SECS {
        return Err(bad(format!("a TTL of {secs} s")));
    }
    Ok(Duration::from_secs(secs))
}

#[async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn config(&self) -> Result<NetworkConfig, ControlPlaneError> {
        let resp = self
            .client()
            .await?
            .get_config(v1::GetConfigRequest {})
            .await
            .map_err(|s| self.failure(s))?;
        let config = resp.into_inner().config.ok_or_else(|| bad("no config"))?;
        config_from_proto(&config).map_err(bad)
    }

    async fn acquire(&self, r: &LeaseRequest) -> Result<Granted, ControlPlaneError> {
        let request = v1::AcquireLeaseRequest {
            node: r.node.clone(),
            public_ip: r.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            public_ipv6: r.public_ipv6.map(|ip| ip.to_string()),
            underlay_v6: r.underlay_v6.map(|u| u.to_string()),
            preferred_ipv6_subnet: r.preferred6.map(|p| p.to_string()),
            backend: backend_to_proto(r.backend).into(),
            vtep_mac: r.data.vtep_mac.map(|m| m.to_string()),
            preferred_subnet: r.preferred.map(|p| p.to_string()),
            iface: r.iface.clone(),
            underlay: r.underlay.map(|u| u.to_string()),

        };
        let resp = self
            .client()
            .await?
            .acquire_lease(request)
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        let lease = resp.lease.as_ref().ok_or_else(|| bad("no lease"))?;
        Ok(Granted {
            lease: lease_from_proto(lease).map_err(bad)?,
            ttl: ttl(resp.ttl_secs)?,
        })
    }

    async fn renew(&self, node: &str, subnet: IpNet) -> Result<Duration, ControlPlaneError> {
        let resp = self
            .client()
            .await?
            .renew_lease(v1::RenewLeaseRequest {
                node: node.to_string(),
                subnet: subnet.to_string(),
            })
            .await
            .map_err(|s| self.failure(s))?;
        ttl(resp.into_inner().ttl_secs)
    }

    async fn watch(&self, after_revision: i64) -> Result<PeerStream, ControlPlaneError> {
        let stream = self
            .client()
            .await?
            .watch_leases(v1::WatchLeasesRequest { after_revision })
            .await
            .map_err(|s| self.failure(s))?
            .into_inner();
        let controllers = self.controllers.clone();
        Ok(stream
            .map(move |msg| match msg {
                Ok(msg) => peer_update(msg),
                Err(s) => {
                    if is_transport_failure(&s) {
                        controllers.failed();
                    }
                    Err(ControlPlaneError::Unavailable(error_chain(&s)))
                }
            })
            .boxed())
    }
}

fn peer_update(msg: v1::WatchLeasesResponse) -> Result<PeerUpdate, ControlPlaneError> {
    match msg.kind {
        Some(Kind::Snapshot(s)) => Ok(PeerUpdate::Snapshot {
            leases: s
                .leases
                .iter()
                .map(lease_from_proto)
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            revision: s.revision,
        }),
        Some(Kind::Event(e)) => Ok(PeerUpdate::Event(event_from_proto(&e).map_err(bad)?)),
        None => Err(bad("an empty watch message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_pushback_is_read_from_the_status() {
        let mut s = tonic::Status::resource_exhausted("busy");
        assert_eq!(retry_pushback(&s), None);
        s.metadata_mut()
            .insert("grpc-retry-pushback-ms", "1500".parse().unwrap());
        assert_eq!(retry_pushback(&s), Some(Duration::from_millis(1500)));
        s.metadata_mut()
            .insert("grpc-retry-pushback-ms", "99999999".parse().unwrap());
        assert_eq!(retry_pushback(&s), Some(Duration::from_secs(60)));
    }
}
