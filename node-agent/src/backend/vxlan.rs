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

/// Whether `name` is one of our VTEP names (`ovl.<vni>`).
fn is_vtep_name(name: &str) -> bool {
    name.strip_prefix("ovl.")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

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

    /// Deletes `ovl.<n>` VXLAN devices other than ours (left by a VNI change); best effort.
    async fn remove_stale_vteps(&self) {
        let dp = &self.fwd.datapath;
        let Ok(names) = dp.link_names().await else {
            return;
        };
        for name in names.iter().filter(|n| is_vtep_name(n) && **n != self.name) {
            let is_vxlan = matches!(dp.link_info(name).await, Ok(Some(l)) if l.vxlan.is_some());
            if !is_vxlan {
                continue;
            }
            match dp.delete_link(name).await {
                Ok(()) => tracing::info!(vtep = %name, "removed the VTEP of a previous VNI"),
                Err(e) => tracing::warn!(vtep = %name, error = %e, "could not remove a stale VTEP"),
            }
        }
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
    /// is not there yet. VTEPs of other VNIs are ours from before a VNI change: removed.
    async fn prepare(&mut self) -> Result<BackendData, BackendError> {
        self.remove_stale_vteps().await;
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
        self.fwd.reconcile(own, peers, before).await
    }

    fn device_changes(&self) -> Option<BoxStream<'static, ()>> {
        self.fwd.device_changes()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::HostEffects;
    use crate::datapath::{Datapath, FakeDatapath, VxlanInfo};
    use crate::firewall::FakeFirewall;
    use crate::hostnet::HostInfo;
    use crate::sysctl::FakeSysctl;

    #[test]
    fn vtep_names() {
        assert!(is_vtep_name("ovl.1") && is_vtep_name("ovl.16777215"));
        assert!(
            !is_vtep_name("ovl.")
                && !is_vtep_name("ovl0")
                && !is_vtep_name("ovl.1a")
                && !is_vtep_name("flannel.1")
        );
    }

    /// After a VNI change the agent restarts with the new VNI: the old VTEP goes, ours
    /// comes, and nothing else is touched.
    #[tokio::test]
    async fn prepare_replaces_the_vtep_of_a_previous_vni() {
        let fake = Arc::new(FakeDatapath::with_underlay(
            "eth0",
            "192.0.2.11/24".parse().unwrap(),
        ));
        fake.edit_kernel(|k| {
            k.add_link("ovl.5", Some("vxlan"), &[]);
            k.links.get_mut("ovl.5").unwrap().vxlan = Some(VxlanInfo {
                vni: 5,
                port: 8472,
                local: None,
                underlay_ifindex: None,
                learning: false,
            });
            k.add_link("ovl.7", Some("bridge"), &[]);
        });
        let config =
            overlay_core::NetworkConfig::from_json(r#"{"network":"10.244.0.0/16"}"#).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ctx = BackendContext {
            node: "h1".into(),
            config,
            host: HostInfo {
                public_ip: "192.0.2.11".parse().unwrap(),
                iface: Some("eth0".into()),
                underlay: Some("192.0.2.0/24".parse().unwrap()),
                mtu: 1500,
            },
            state_dir: dir.path().into(),
            bridge: None,
            ip_masq: false,
            effects: HostEffects {
                datapath: fake.clone(),
                firewall: Arc::new(FakeFirewall::default()),
                sysctl: Arc::new(FakeSysctl::default()),
            },
        };
        let mut backend = VxlanBackend::new(ctx).unwrap();
        let data = backend.prepare().await.unwrap();
        assert!(data.vtep_mac.is_some());
        let names = fake.link_names().await.unwrap();
        assert!(names.contains(&"ovl.1".to_string()), "{names:?}");
        assert!(
            !names.contains(&"ovl.5".to_string()),
            "the old VTEP stayed: {names:?}"
        );
        assert!(
            names.contains(&"ovl.7".to_string()),
            "a non-VXLAN device was touched: {names:?}"
        );
    }
}
