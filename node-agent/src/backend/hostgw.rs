//! `host-gw`: a plain route per peer, via the peer's public IP on the public interface.
//!
//! No encapsulation, so full underlay MTU and the best throughput, but every peer must be
//! on the same L2 segment (the next hop is the peer itself). A peer that is not is reported
//! (log and `/status`), not silently given a route that cannot work.

use async_trait::async_trait;
use futures::stream::BoxStream;
use overlay_core::lease::{BackendData, Lease};
use overlay_core::BackendType;

use super::forwarding::Forwarding;
use super::{Backend, BackendContext, BackendError, ReconcileReport};

pub struct HostGwBackend {
    fwd: Forwarding,
}

impl HostGwBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let mtu = ctx.config.mtu.unwrap_or(ctx.host.mtu);
        Ok(HostGwBackend {
            fwd: Forwarding::new("host-gw", &ctx, mtu)?,
        })
    }
}

#[async_trait]
impl Backend for HostGwBackend {
    fn kind(&self) -> BackendType {
        BackendType::HostGw
    }

    fn mtu(&self) -> u32 {
        self.fwd.mtu
    }

    async fn prepare(&mut self) -> Result<BackendData, BackendError> {
        Ok(BackendData::default())
    }

    async fn reconcile(
        &mut self,
        own: &Lease,
        peers: &[Lease],
    ) -> Result<ReconcileReport, BackendError> {
        let before = self.fwd.datapath.writes();
        self.fwd.reconcile(own, peers, before).await
    }

    fn device_changes(&self) -> Option<BoxStream<'static, ()>> {
        self.fwd.device_changes()
    }
}
