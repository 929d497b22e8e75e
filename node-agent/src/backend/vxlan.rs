//! `vxlan`: peers' subnets reached through a VXLAN tunnel endpoint (VTEP), over any L3
//! underlay.
//!
//! Like Flannel, learning is off and the agent programs everything the kernel needs per
//! peer: a permanent neighbour entry (peer subnet's network address -> peer VTEP MAC), an
//! FDB entry (peer VTEP MAC -> peer public IP) and an onlink route via that network
//! address. The VTEP holds its own subnet's network address as /32 so the kernel has a
//! source for traffic it originates into the tunnel.
//!
//! The VTEP MAC is what peers' entries point at, so it must not change when the agent or
//! the host restarts (Flannel's issues #1795 and #1828): it is derived from the node name
//! and VNI, and the value in use is also kept in the state dir. Changing it would make
//! every peer rewrite two entries for this host.
//!
//! With `direct_routing`, peers on the same L2 segment get a plain host-gw route instead,
//! skipping encapsulation where it is not needed.

use async_trait::async_trait;
use futures::stream::BoxStream;
use ipnet::Ipv4Net;
use overlay_core::datapath::vtep_name;
use overlay_core::lease::{BackendData, Lease};
use overlay_core::{BackendType, MacAddr};

use super::forwarding::Forwarding;
use super::{Backend, BackendContext, BackendError, ReconcileReport};
use crate::datapath::VxlanSpec;
use crate::files::AgentState;

/// VXLAN over IPv4 adds 50 bytes: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

pub struct VxlanBackend {
    fwd: Forwarding,
    name: String,
    mac: MacAddr,
}

impl VxlanBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let mtu = ctx
            .config
            .mtu
            .unwrap_or(ctx.host.mtu.saturating_sub(VXLAN_OVERHEAD));
        let mut fwd = Forwarding::new("vxlan", &ctx, mtu)?;
        let name = vtep_name(ctx.config.backend.vni);
        fwd.vtep = Some(name.clone());
        let mac = AgentState::load(&ctx.state_dir)
            .vtep_mac
            .unwrap_or_else(|| {
                MacAddr::derive(&format!(
                    "overlay-vtep/{}/{}",
                    ctx.node, ctx.config.backend.vni
                ))
            });
        Ok(VxlanBackend { fwd, name, mac })
    }

    async fn ensure_vtep(&self, own: Option<&Lease>) -> Result<(), BackendError> {
        let err = |what: &str, e: &dyn std::fmt::Display| BackendError {
            backend: "vxlan",
            message: format!("{what}: {e}"),
        };
        let dp = &self.fwd.datapath;
        let underlay = dp
            .link_index(&self.fwd.host.iface)
            .await
            .map_err(|e| err("underlay interface", &e))?
            .ok_or_else(|| {
                err(
                    "underlay interface",
                    &format!("{} does not exist", self.fwd.host.iface),
                )
            })?;
        let cfg = &self.fwd.config.backend;
        let spec = VxlanSpec {
            name: self.name.clone(),
            vni: cfg.vni,
            port: cfg.port,
            local: self.fwd.host.public_ip,
            underlay_ifindex: underlay,
            mac: self.mac,
            mtu: self.fwd.mtu,
        };
        dp.ensure_vxlan(&spec)
            .await
            .map_err(|e| err(&format!("VTEP {}", self.name), &e))?;
        if let Some(own) = own {
            let addr = Ipv4Net::new(own.subnet.network(), 32).expect("/32");
            dp.ensure_addresses(&self.name, &[addr])
                .await
                .map_err(|e| err(&format!("address of {}", self.name), &e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    fn kind(&self) -> BackendType {
        BackendType::Vxlan
    }

    fn mtu(&self) -> u32 {
        self.fwd.mtu
    }

    /// The VTEP exists before the lease is published, so peers never point at a MAC that
    /// is not there yet.
    async fn prepare(&mut self) -> Result<BackendData, BackendError> {
        self.ensure_vtep(None).await?;
        Ok(BackendData {
            vtep_mac: Some(self.mac),
            ..Default::default()
        })
    }

    async fn reconcile(
        &mut self,
        own: &Lease,
        peers: &[Lease],
    ) -> Result<ReconcileReport, BackendError> {
        let before = self.fwd.datapath.writes();
        self.ensure_vtep(Some(own)).await?;
        let mut report = self.fwd.reconcile(own, peers).await?;
        report.writes = self.fwd.datapath.writes() - before;
        Ok(report)
    }

    fn device_changes(&self) -> Option<BoxStream<'static, ()>> {
        self.fwd.device_changes()
    }
}
