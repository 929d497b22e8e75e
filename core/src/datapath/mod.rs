//! Datapath: desired kernel state from leases (plan) and the operations that reach it (diff).
//!
//! The agent never programs the kernel incrementally from lease events. Instead every
//! reconcile computes the whole desired state from the current leases ([`plan`]), reads
//! what the kernel holds on the devices the agent owns, and applies only the difference
//! ([`diff`]). That one rule gives the properties Flannel lacks:
//!
//! - entries of peers that vanished while the agent was down are removed (they are in the
//!   observed state but not in the desired one), Flannel's open issue #2554;
//! - a restart with an unchanged world issues zero writes (the diff is empty), so running
//!   flows are never disturbed by a reprogramming pass;
//! - drift (someone deleting a route or the VTEP) is repaired by the next reconcile, whatever
//!   caused it.
//!
//! Both functions are pure so they can be tested exhaustively without a kernel; the netlink
//! module of the agent only translates [`Op`]s to messages and kernel dumps to
//! [`KernelEntries`].
//!
//! Layout: this module holds the entry types; [`plan`] (with one planner per backend,
//! `plan/vxlan.rs` and `plan/host_gw.rs`) makes the desired state, [`diff`] compares.
//!
//! Identity. A route is identified in the kernel by its destination (we only make routes in
//! the main table, metric 0, with our own route protocol), so a route to the same
//! destination with another gateway, device or onlink flag is *replaced*, never deleted and
//! re-added: the replacement is atomic and loses no packet. [`Route::kind`] is derived
//! information for people (`overlayctl routes`), not part of the kernel identity, and is
//! ignored by equality. Neighbours are identified by (device, IP) and also replaced in
//! place when the MAC changes. FDB entries are identified by (device, MAC); a VXLAN FDB
//! entry can hold several destinations, and a single wrong one is replaced in place.
//!
//! Ordering. [`diff`] returns route deletions first (a route must not outlive the entries
//! it relies on for long), then neighbour/FDB deletions and additions, then route additions
//! and replacements, so a route is only installed after the neighbour and FDB entries that
//! make it work exist. [`Op::phase`] names these phases so an executor can pipeline the
//! operations of one phase and still respect the order between phases.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// The name of the VXLAN device for a VNI over the IPv4 underlay.
pub fn vtep_name(vni: u32) -> String {
    format!("ovl.{vni}")
}

/// The name of the VXLAN device for a VNI over the IPv6 underlay.
pub fn vtep6_name(vni: u32) -> String {
    format!("ovl6.{vni}")
}

/// Why a route exists; shown to people, not part of the route's kernel identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RouteKind {
    /// Through the VTEP, encapsulated.
    #[serde(rename = "vxlan")]
    Vxlan,
    /// Via the peer's public IP on the public interface (host-gw backend).
    #[serde(rename = "host-gw")]
    HostGw,
    /// Via the peer's public IP on the public interface (vxlan backend with direct routing).
    #[serde(rename = "direct")]
    Direct,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Vxlan => "vxlan",
            RouteKind::HostGw => "host-gw",
            RouteKind::Direct => "direct",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route to a peer's subnet. Equality, ordering and hashing use the kernel identity
/// (`dst`, `via`, `dev`, `onlink`) and ignore `kind`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
    pub dev: String,
    pub onlink: bool,
    pub kind: RouteKind,
}

impl Route {
    fn identity(&self) -> (IpNet, IpAddr, &str, bool) {
        (self.dst, self.via, &self.dev, self.onlink)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for Route {}

impl Hash for Route {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

impl PartialOrd for Route {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Route {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.identity().cmp(&other.identity())
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {} dev {}", self.dst, self.via, self.dev)?;
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// A permanent ARP (IPv4) or NDP (IPv6) entry: `ip` is reachable at `mac` on `dev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Neighbour {
    pub dev: String,
    pub ip: IpAddr,
    pub mac: MacAddr,
}

impl fmt::Display for Neighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {} dev {}", self.ip, self.mac, self.dev)
    }
}

/// A permanent VXLAN forwarding entry (NTF_SELF): frames for `mac` go to `dst` over UDP.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FdbEntry {
    pub dev: String,
    pub mac: MacAddr,
    pub dst: IpAddr,
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dst {} dev {}", self.mac, self.dst, self.dev)
    }
}

/// What the kernel should hold for the current leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Keyed by destination; serialized as a list.
    #[serde(with = "routes_as_list")]
    pub routes: BTreeMap<IpNet, Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    /// Peer subnets that get no entries, with the reason (for logs, metrics and
    /// `/status`). A dual-stack peer may have one family skipped and the other routed.
    pub skipped: Vec<(IpNet, String)>,
}

impl DesiredState {
    /// The kernel entries alone (without the skipped peers), comparable with what the
    /// kernel reports.
    pub fn kernel_entries(&self) -> KernelEntries {
        KernelEntries {
            routes: self.routes.clone(),
            neighbours: self.neighbours.clone(),
            fdb: self.fdb.clone(),
        }
    }

    fn add_route(&mut self, route: Route) {
        self.routes.insert(route.dst, route);
    }
}

/// Kernel entries: what the kernel holds on the devices the agent owns and in routes with
/// its protocol (observed), or the entries of a [`DesiredState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntries {
    /// Keyed by destination; serialized as a list.
    #[serde(with = "routes_as_list")]
    pub routes: BTreeMap<IpNet, Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
}

impl KernelEntries {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }

    /// Records a route; a second route to the same destination replaces the first.
    pub fn insert_route(&mut self, route: Route) {
        self.routes.insert(route.dst, route);
    }
}

impl From<&DesiredState> for KernelEntries {
    fn from(d: &DesiredState) -> Self {
        d.kernel_entries()
    }
}

/// The host's own side of the underlay: an IPv4 side, an IPv6 side, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNet {
    /// The IPv4 address peers reach this host at (VXLAN local address, host-gw next hop).
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address peers reach this host at.
    #[serde(default)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// The interface holding the public addresses.
    pub iface: String,
    /// The on-link IPv4 prefix of `iface`: peers inside it are directly reachable
    /// (host-gw and direct routing need that, since their next hop is the peer itself).
    pub underlay: Option<Ipv4Net>,
    /// The on-link IPv6 prefix of `iface`.
    #[serde(default)]
    pub underlay_v6: Option<Ipv6Net>,
}

impl HostNet {
    /// The public address of a family.
    pub fn public_addr(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.public_ipv6.map(IpAddr::V6)
        } else {
            self.public_ip.map(IpAddr::V4)
        }
    }

    /// The on-link prefix of a family.
    pub fn underlay_of(&self, v6: bool) -> Option<IpNet> {
        if v6 {
            self.underlay_v6.map(IpNet::V6)
        } else {
            self.underlay.map(IpNet::V4)
        }
    }

    /// Whether `ip` is one of this host's public addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.public_addr(false) == Some(ip) || self.public_addr(true) == Some(ip)
    }
}

mod routes_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        routes: &BTreeMap<IpNet, Route>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(routes.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<IpNet, Route>, D::Error> {
        let list = Vec::<Route>::deserialize(d)?;
        Ok(list.into_iter().map(|r| (r.dst, r)).collect())
    }
}

mod diff;
mod plan;

pub use diff::{diff, Op, Phase};
pub use plan::{plan, planner, PeerPlanner};

#[cfg(test)]
mod tests;
