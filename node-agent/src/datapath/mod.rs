//! The datapath boundary: what the agent needs from the kernel, behind one trait.
//!
//! The agent reconciles through [`Datapath`] only (`Arc<dyn Datapath>`), so the same
//! reconcile loop runs against the kernel ([`Netlink`]) and against an in-memory kernel
//! ([`FakeDatapath`]) in tests that exercise failure handling and drift without root.
//! The kernel implementation is still tested for real, in private network namespaces
//! (`tests/netlink_kernel.rs`): the fake is for the agent's logic, not a substitute for
//! knowing what the kernel does.
//!
//! Writes are counted ([`Datapath::writes`]) because "a restart with an unchanged world
//! issues zero writes" is a promise the agent must be able to prove, not just intend.

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod netlink;

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, StreamExt};
use ipnet::IpNet;
use overlay_core::datapath::{KernelEntries, Op, Phase, RouteKind};
use overlay_core::MacAddr;

#[cfg(any(test, feature = "testing"))]
pub use fake::FakeDatapath;
pub use netlink::{Netlink, NetlinkError, ROUTE_PROTOCOL};

/// How many requests are in flight at once on the netlink socket during [`Datapath::apply`].
pub const PIPELINE_DEPTH: usize = 64;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// The link type ("bridge", "vxlan", "veth", ...); `None` for devices without one
    /// (loopback, physical NICs).
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Present for VXLAN devices.
    pub vxlan: Option<VxlanInfo>,
}

/// The identity-defining settings of a VXLAN device, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub port: u16,
    pub local: Option<IpAddr>,
    pub underlay_ifindex: Option<u32>,
    pub learning: bool,
}

/// The VTEP to create: learning is always off (the agent programs every FDB entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Source address of the encapsulated packets: the host's public IP of the VTEP's
    /// underlay family.
    pub local: IpAddr,
    /// The public interface the tunnel runs over.
    pub underlay_ifindex: u32,
    pub mac: MacAddr,
    pub mtu: u32,
}

impl VxlanSpec {
    /// Why an existing device cannot be reused for this spec (fixing it would need a
    /// delete and recreate), or `None` when it can. MTU and MAC are fixed in place.
    pub fn mismatch(&self, link: &LinkInfo) -> Option<String> {
        let Some(v) = &link.vxlan else {
            return Some(format!(
                "it is a {} device, not a vxlan device",
                link.kind.as_deref().unwrap_or("plain")
            ));
        };
        if v.vni != self.vni {
            return Some(format!("its VNI is {}, want {}", v.vni, self.vni));
        }
        if v.port != self.port {
            return Some(format!("its UDP port is {}, want {}", v.port, self.port));
        }
        if v.local != Some(self.local) {
            let have = v.local.map_or("unset".to_string(), |l| l.to_string());
            return Some(format!("its local address is {have}, want {}", self.local));
        }
        if v.underlay_ifindex != Some(self.underlay_ifindex) {
            let have = v
                .underlay_ifindex
                .map_or("unset".to_string(), |i| i.to_string());
            return Some(format!(
                "its underlay device index is {have}, want {}",
                self.underlay_ifindex
            ));
        }
        if v.learning {
            return Some("it has learning on".to_string());
        }
        None
    }
}

/// A link appeared, changed or disappeared (RTNLGRP_LINK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkChange {
    pub name: String,
    pub deleted: bool,
}

/// The outcome of [`Datapath::apply`]: one failure never stops the other operations.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Operations whose entry is now in the kernel (or gone, for deletions).
    pub applied: usize,
    pub failed: Vec<(Op, NetlinkError)>,
}

impl ApplyReport {
    pub fn is_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What the agent needs from the kernel. All additions are idempotent; "ensure" methods
/// write nothing when the kernel already matches.
#[async_trait]
pub trait Datapath: Send + Sync {
    /// The index of a link; a missing link is `Ok(None)`.
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError>;

    /// The names of every link of the namespace, sorted.
    async fn link_names(&self) -> Result<Vec<String>, NetlinkError>;
    /// A link's details; a missing link is `Ok(None)`.
    async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError>;

    /// The IPv4 addresses of a link, with their on-link prefix length.
    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>, NetlinkError>;

    /// Creates the bridge, or fixes its MAC, MTU and up state in place. Returns its index.
    async fn ensure_bridge(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<u32, NetlinkError>;

    /// Creates the VTEP; recreates it when its VNI, port, local address, underlay or
    /// learning differ; fixes MTU, MAC and up state in place. Returns its index.
    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError>;

    /// Makes `addrs` the only IPv4 addresses of `link` (the agent owns the link).
    async fn ensure_addresses(&self, link: &str, addrs: &[IpNet]) -> Result<(), NetlinkError>;

    /// Deletes a link; a missing link is fine.
    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError>;

    /// The routes with [`ROUTE_PROTOCOL`] in the main table (both families), and the
    /// permanent neighbour and FDB entries on the VTEPs `vteps` (those that exist).
    async fn observe(
        &self,
        vteps: &[&str],
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError>;

    /// Applies operations phase by phase ([`Phase`]), pipelined within a phase. A route
    /// whose neighbour or FDB entry failed in the same call is not attempted.
    async fn apply(&self, ops: &[Op]) -> ApplyReport;

    /// Link events of the datapath's network namespace, from now on.
    fn subscribe_link_changes(&self) -> Result<BoxStream<'static, LinkChange>, NetlinkError>;

    /// Kernel write requests issued so far (successful or not).
    fn writes(&self) -> u64;
}

/// The kind a route seen in the kernel was made for. The kernel does not record it, but
/// the device tells: routes on the VTEP are encapsulated; routes on the underlay are direct
/// routes when there is a VTEP (vxlan with direct routing) and host-gw routes otherwise.
pub fn infer_route_kind(dev: &str, vteps: &[&str], underlay_iface: &str) -> RouteKind {
    if vteps.contains(&dev) {
        RouteKind::Vxlan
    } else if !vteps.is_empty() && dev == underlay_iface {
        RouteKind::Direct
    } else {
        RouteKind::HostGw
    }
}

/// Runs `ops` in phase order, up to [`PIPELINE_DEPTH`] at a time within a phase, and skips
/// route additions whose neighbour (or that neighbour's FDB entry) failed in this call.
pub(crate) async fn apply_in_phases<'a, F, Fut>(ops: &'a [Op], exec: F) -> ApplyReport
where
    F: Fn(&'a Op) -> Fut,
    Fut: std::future::Future<Output = Result<(), NetlinkError>> + Send + 'a,
{
    let mut report = ApplyReport::default();
    // (dev, gateway IP) -> the failed operation a route through it depends on.
    let mut broken: HashMap<(&str, IpAddr), String> = HashMap::new();
    for phase in [Phase::Delete, Phase::Entries, Phase::Routes] {
        let mut runnable = Vec::new();
        for op in ops.iter().filter(|op| op.phase() == phase) {
            let dependency = match op {
                Op::AddRoute(r) | Op::ReplaceRoute(r) => broken.get(&(r.dev.as_str(), r.via)),
                _ => None,
            };
            match dependency {
                Some(dep) => report.failed.push((
                    op.clone(),
                    NetlinkError::DependencyFailed {
                        op: op.to_string(),
                        dependency: dep.clone(),
                    },
                )),
                None => runnable.push(op),
            }
        }
        // The futures are built before they are streamed: a closure inside the stream would
        // make the whole future's Send-ness depend on higher-ranked lifetimes rustc cannot
        // prove (async_trait needs the future to be Send).
        let pending: Vec<BoxFuture<'a, (&'a Op, Result<(), NetlinkError>)>> = runnable
            .into_iter()
            .map(|op| {
                let fut = exec(op);
                async move { (op, fut.await) }.boxed()
            })
            .collect();
        let results: Vec<(&Op, Result<(), NetlinkError>)> = futures::stream::iter(pending)
            .buffer_unordered(PIPELINE_DEPTH)
            .collect()
            .await;
        for (op, result) in results {
            match result {
                Ok(()) => report.applied += 1,
                Err(e) => {
                    match op {
                        Op::AddNeighbour(n) => {
                            broken.insert((n.dev.as_str(), n.ip), op.to_string());
                        }
                        Op::AddFdb(f) => {
                            // Routes reach the FDB entry through the neighbour with its MAC.
                            for other in ops {
                                if let Op::AddNeighbour(n) = other {
                                    if n.dev == f.dev && n.mac == f.mac {
                                        broken.insert((n.dev.as_str(), n.ip), op.to_string());
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                    report.failed.push((op.clone(), e));
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn both_implementations_fit_behind_one_shared_trait_object() {
        fn shared(dp: Arc<dyn Datapath>) -> Arc<dyn Datapath> {
            dp
        }
        let fake = shared(Arc::new(FakeDatapath::new()));
        assert_eq!(fake.writes(), 0);
        // Netlink needs a runtime (and a namespace) to connect; its type must still fit.
        fn fits(_: Option<Netlink>) -> Option<Arc<dyn Datapath>> {
            None
        }
        assert!(fits(None).is_none());
    }

    #[test]
    fn vxlan_mismatch_names_the_difference() {
        let spec = VxlanSpec {
            name: "ovl.1".into(),
            vni: 1,
            port: 8472,
            local: "192.0.2.11".parse().unwrap(),
            underlay_ifindex: 2,
            mac: MacAddr::local_unicast([0, 0, 0, 0, 0, 1]),
            mtu: 1450,
        };
        let mut link = LinkInfo {
            index: 5,
            name: "ovl.1".into(),
            kind: Some("vxlan".into()),
            mtu: 1400,
            mac: None,
            up: false,
            vxlan: Some(VxlanInfo {
                vni: 1,
                port: 8472,
                local: Some(spec.local),
                underlay_ifindex: Some(2),
                learning: false,
            }),
        };
        assert_eq!(
            spec.mismatch(&link),
            None,
            "MTU, MAC and up are fixed in place"
        );
        link.vxlan.as_mut().unwrap().vni = 7;
        assert_eq!(spec.mismatch(&link).unwrap(), "its VNI is 7, want 1");
        link.vxlan = None;
        link.kind = Some("veth".into());
        assert!(spec.mismatch(&link).unwrap().contains("veth"));
    }

    #[test]
    fn route_kinds_are_inferred_from_the_device() {
        assert_eq!(
            infer_route_kind("ovl.1", &["ovl.1"], "eth0"),
            RouteKind::Vxlan
        );
        assert_eq!(
            infer_route_kind("eth0", &["ovl.1"], "eth0"),
            RouteKind::Direct
        );
        assert_eq!(infer_route_kind("eth0", &[], "eth0"), RouteKind::HostGw);
        assert_eq!(
            infer_route_kind("ovl6.1", &["ovl.1", "ovl6.1"], "eth0"),
            RouteKind::Vxlan
        );
    }
}
