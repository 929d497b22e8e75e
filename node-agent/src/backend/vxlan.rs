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
//!
//! One VTEP per underlay family the host has a public address of: `ovl.<vni>` over IPv4,
//! `ovl6.<vni>` over IPv6 (why two, and which one a peer's subnet uses, is in the
//! planner's notes, `overlay_core::datapath::plan::vxlan`). Both carry the one VTEP MAC.
//! The MTU leaves room for the larger header of the VTEPs in use.

use std::net::IpAddr;

use async_trait::async_trait;
use futures::stream::BoxStream;
use ipnet::{IpNet, Ipv4Net};
use overlay_core::datapath::{vtep6_name, vtep_name};
use overlay_core::lease::{BackendData, Lease};
use overlay_core::{BackendType, MacAddr};

use super::forwarding::Forwarding;
use super::{Backend, BackendContext, BackendError, ReconcileReport};
use crate::datapath::VxlanSpec;
use crate::files::AgentState;

/// Whether `name` is one of our VTEP names (`ovl.<vni>` or `ovl6.<vni>`).
fn is_vtep_name(name: &str) -> bool {
    name.strip_prefix("ovl.")
        .or_else(|| name.strip_prefix("ovl6."))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// VXLAN over IPv4 adds 50 bytes: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// VXLAN over IPv6 adds 70 bytes: the outer IPv6 header is 40 bytes, not 20.
pub const VXLAN6_OVERHEAD: u32 = 70;

pub struct VxlanBackend {
    fwd: Forwarding,
    /// The VTEPs, each with its local (public) address.
    vteps: Vec<(String, IpAddr)>,
    mac: MacAddr,
}

impl VxlanBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let vni = ctx.config.backend.vni;
        let vteps: Vec<(String, IpAddr)> = [
            ctx.host.public_ip.map(|ip| (vtep_name(vni), IpAddr::V4(ip))),
            ctx.host.public_ipv6.map(|ip| (vtep6_name(vni), IpAddr::V6(ip))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let overhead = if ctx.host.public_ipv6.is_some() {
            VXLAN6_OVERHEAD
        } else {
            VXLAN_OVERHEAD
        };
        let mtu = ctx
            .config
            .mtu
            .unwrap_or(ctx.host.mtu.saturating_sub(overhead));
        let mut fwd = Forwarding::new("vxlan", &ctx, mtu)?;
        fwd.vteps = vteps.iter().map(|(n, _)| n.clone()).collect();
        let mac = AgentState::load(&ctx.state_dir)
            .vtep_mac
            .unwrap_or_else(|| {
                MacAddr::derive(&format!(
                    "overlay-vtep/{}/{}",
                    ctx.node, ctx.config.backend.vni
                ))
            });
        Ok(VxlanBackend { fwd, vteps, mac })
    }

    /// Deletes `ovl.<n>`/`ovl6.<n>` VXLAN devices other than ours (left by a VNI change,
    /// or by a public address the host no longer has); best effort.
    async fn remove_stale_vteps(&self) {
        let dp = &self.fwd.datapath;
        let Ok(names) = dp.link_names().await else {
            return;
        };
        for name in names
            .iter()
            .filter(|n| is_vtep_name(n) && !self.vteps.iter().any(|(v, _)| v == *n))
        {
            let is_vxlan = matches!(dp.link_info(name).await, Ok(Some(l)) if l.vxlan.is_some());
            if !is_vxlan {
                continue;
            }
            match dp.delete_link(name).await {
                Ok(()) => tracing::info!(vtep = %name, "removed a VTEP this host no longer uses"),
                Err(e) => tracing::warn!(vtep = %name, error = %e, "could not remove a stale VTEP"),
            }
        }
    }

    async fn ensure_vteps(&self, own: Option<&Lease>) -> Result<(), BackendError> {
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
        for (name, local) in &self.vteps {
            let spec = VxlanSpec {
                name: name.clone(),
                vni: cfg.vni,
                port: cfg.port,
                local: *local,
                underlay_ifindex: underlay,
                mac: self.mac,
                mtu: self.fwd.mtu,
            };
            dp.ensure_vxlan(&spec)
                .await
                .map_err(|e| err(&format!("VTEP {name}"), &e))?;
            // The IPv4 VTEP holds the subnet's network address, a source for traffic
            // the host itself sends into the tunnel; IPv6 picks the bridge's address.
            if let Some(own4) = own.and_then(Lease::ipv4).filter(|_| local.is_ipv4()) {
                let addr = Ipv4Net::new(own4.network(), 32).expect("/32");
                dp.ensure_addresses(name, &[IpNet::V4(addr)])
                    .await
                    .map_err(|e| err(&format!("address of {name}"), &e))?;
            } else if own.is_some() {
                dp.ensure_addresses(name, &[])
                    .await
                    .map_err(|e| err(&format!("address of {name}"), &e))?;
            }
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
        self.ensure_vteps(None).await?;
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
        self.ensure_vteps(Some(own)).await?;
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
        assert!(is_vtep_name("ovl.1") && is_vtep_name("ovl.16777215") && is_vtep_name("ovl6.1"));
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
                public_ip: Some("192.0.2.11".parse().unwrap()),
                public_ipv6: None,
                iface: Some("eth0".into()),
                underlay: Some("192.0.2.0/24".parse().unwrap()),
                underlay_v6: None,
                mtu: 1500,
                given: (true, false),
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
