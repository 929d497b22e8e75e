//! gRPC handlers. Each one converts the request, delegates to [`LeaseManager`] or
//! [`Fanout`], and converts the answer; errors become `tonic::Status` in one place
//! (`impl From<ControlError> for Status`).

use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ipnet::Ipv4Net;
use overlay_core::lease::unix_millis;
use overlay_core::MacAddr;
use overlay_proto::v1::{self, admin_server::Admin, agent_server::Agent};
use overlay_proto::{backend_from_proto, config_to_proto, lease_to_proto};
use tonic::{Request, Response, Status};

use crate::error::ControlError;
use crate::fanout::Fanout;
use crate::leases::{AcquireRequest, LeaseManager};

/// Largest request accepted from a client; every field we take is small.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct Api {
    pub leases: Arc<LeaseManager>,
    pub fanout: Arc<Fanout>,
}

fn parse_subnet(field: &str, text: &str) -> Result<Ipv4Net, ControlError> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        ControlError::InvalidArgument(format!("{field}: {text:?} is not an IPv4 CIDR"))
    })?;
    if net.addr() != net.network() {
        return Err(ControlError::InvalidArgument(format!(
            "{field}: {text} has host bits set"
        )));
    }
    Ok(net)
}

fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, ControlError> {
    text.parse().map_err(|_| {
        ControlError::InvalidArgument(format!("{field}: {text:?} is not an IPv4 address"))
    })
}

fn parse_mac(field: &str, text: &str) -> Result<MacAddr, ControlError> {
    text.parse()
        .map_err(|e| ControlError::InvalidArgument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl Agent for Api {
    async fn get_config(
        &self,
        _: Request<v1::GetConfigRequest>,
    ) -> Result<Response<v1::GetConfigResponse>, Status> {
        let config = self.leases.config().await?;
        Ok(Response::new(v1::GetConfigResponse {
            config: Some(config_to_proto(&config)),
        }))
    }

    async fn acquire_lease(
        &self,
        req: Request<v1::AcquireLeaseRequest>,
    ) -> Result<Response<v1::AcquireLeaseResponse>, Status> {
        let r = req.into_inner();
        let request = AcquireRequest {
            node: r.node,
            public_ip: parse_ip("public_ip", &r.public_ip)?,
            backend: backend_from_proto(r.backend)
                .map_err(|e| ControlError::InvalidArgument(e.0))?,
            vtep_mac: r
                .vtep_mac
                .as_deref()
                .map(|m| parse_mac("vtep_mac", m))
                .transpose()?,
            preferred: r
                .preferred_subnet
                .as_deref()
                .map(|s| parse_subnet("preferred_subnet", s))
                .transpose()?,
        };
        let acquired = self.leases.acquire(&request).await?;
        let expires = acquired
            .ttl
            .map(|t| unix_millis(std::time::SystemTime::now() + t));
        Ok(Response::new(v1::AcquireLeaseResponse {
            lease: Some(lease_to_proto(&acquired.lease, expires)),
            config: Some(config_to_proto(&acquired.config)),
            ttl_secs: acquired.ttl.map(|t| t.as_secs()).unwrap_or(0),
        }))
    }

    async fn renew_lease(
        &self,
        req: Request<v1::RenewLeaseRequest>,
    ) -> Result<Response<v1::RenewLeaseResponse>, Status> {
        let r = req.into_inner();
        let ttl = self
            .leases
            .renew(&r.node, parse_subnet("subnet", &r.subnet)?)
            .await?;
        Ok(Response::new(v1::RenewLeaseResponse {
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
        }))
    }

    async fn release_lease(
        &self,
        req: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        let r = req.into_inner();
        self.leases
            .release(&r.node, parse_subnet("subnet", &r.subnet)?)
            .await?;
        Ok(Response::new(v1::ReleaseLeaseResponse {}))
    }

    async fn list_leases(
        &self,
        _: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        let (leases, revision) = self.leases.list().await?;
        Ok(Response::new(v1::ListLeasesResponse {
            leases: leases
                .iter()
                .map(|l| lease_to_proto(&l.lease, l.expires_at.map(unix_millis)))
                .collect(),
            revision,
        }))
    }

    type WatchLeasesStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchLeasesResponse, Status>> + Send>>;

    async fn watch_leases(
        &self,
        req: Request<v1::WatchLeasesRequest>,
    ) -> Result<Response<Self::WatchLeasesStream>, Status> {
        if !self.fanout.is_synced() {
            return Err(Status::unavailable(
                "the controller has not loaded the leases from etcd yet",
            ));
        }
        let after = req.into_inner().after_revision;
        if after < 0 {
            return Err(ControlError::InvalidArgument(format!(
                "after_revision: {after} is negative"
            ))
            .into());
        }
        Ok(Response::new(Box::pin(
            self.fanout.subscribe(after).map(Ok),
        )))
    }
}

#[tonic::async_trait]
impl Admin for Api {
    async fn set_config(
        &self,
        req: Request<v1::SetConfigRequest>,
    ) -> Result<Response<v1::SetConfigResponse>, Status> {
        let r = req.into_inner();
        let (config, revoked) = self.leases.set_config(&r.json, r.force).await?;
        Ok(Response::new(v1::SetConfigResponse {
            config: Some(config_to_proto(&config)),
            revoked: revoked.iter().map(|l| l.subnet.to_string()).collect(),
        }))
    }

    async fn reserve_subnet(
        &self,
        req: Request<v1::ReserveSubnetRequest>,
    ) -> Result<Response<v1::ReserveSubnetResponse>, Status> {
        let r = req.into_inner();
        let subnet = parse_subnet("subnet", &r.subnet)?;
        let ip = parse_ip("public_ip", &r.public_ip)?;
        let lease = self.leases.reserve(subnet, &r.node, ip).await?;
        Ok(Response::new(v1::ReserveSubnetResponse {
            lease: Some(lease_to_proto(&lease, None)),
        }))
    }

    async fn revoke_lease(
        &self,
        req: Request<v1::RevokeLeaseRequest>,
    ) -> Result<Response<v1::RevokeLeaseResponse>, Status> {
        let subnet = parse_subnet("subnet", &req.into_inner().subnet)?;
        self.leases.revoke(subnet).await?;
        Ok(Response::new(v1::RevokeLeaseResponse {}))
    }
}
