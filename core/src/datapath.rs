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
//! [`ObservedState`].
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
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{BackendType, NetworkConfig};
use crate::lease::Lease;
use crate::mac::MacAddr;

/// The name of the VXLAN device for a VNI.
pub fn vtep_name(vni: u32) -> String {
    format!("ovl.{vni}")
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
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: String,
    pub onlink: bool,
    pub kind: RouteKind,
}

impl Route {
    fn identity(&self) -> (Ipv4Net, Ipv4Addr, &str, bool) {
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

/// A permanent ARP entry: `ip` is reachable at `mac` on `dev`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Neighbour {
    pub dev: String,
    pub ip: Ipv4Addr,
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
    pub dst: Ipv4Addr,
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
    pub routes: BTreeMap<Ipv4Net, Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    /// Peers that get no entries, with the reason (for logs, metrics and `/status`).
    pub skipped: Vec<(Ipv4Net, String)>,
}

impl DesiredState {
    /// The kernel entries alone, comparable with what [`ObservedState`] reports.
    pub fn entries(&self) -> ObservedState {
        ObservedState {
            routes: self.routes.clone(),
            neighbours: self.neighbours.clone(),
            fdb: self.fdb.clone(),
        }
    }

    fn add_route(&mut self, route: Route) {
        self.routes.insert(route.dst, route);
    }
}

/// What the kernel holds on the devices the agent owns and in routes with its protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedState {
    /// Keyed by destination; serialized as a list.
    #[serde(with = "routes_as_list")]
    pub routes: BTreeMap<Ipv4Net, Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
}

impl ObservedState {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }

    /// Records a route; a second route to the same destination replaces the first.
    pub fn insert_route(&mut self, route: Route) {
        self.routes.insert(route.dst, route);
    }
}

impl From<&DesiredState> for ObservedState {
    fn from(d: &DesiredState) -> Self {
        d.entries()
    }
}

/// The host's own side of the underlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNet {
    /// The address peers reach this host at (VXLAN local address, host-gw next hop).
    pub public_ip: Ipv4Addr,
    /// The interface holding `public_ip`.
    pub iface: String,
    /// The on-link prefix of `iface`: peers inside it are directly reachable (host-gw and
    /// direct routing need that, since their next hop is the peer itself).
    pub underlay: Ipv4Net,
}

/// Computes the entries this host should have for its peers.
///
/// `peers` may include the host's own lease (it is ignored). Peers that get no entries are
/// listed in [`DesiredState::skipped`] with the reason; nothing is logged here.
pub fn plan(config: &NetworkConfig, own: &Lease, peers: &[Lease], host: &HostNet) -> DesiredState {
    let mut state = DesiredState::default();
    let kind = config.backend.kind;
    if kind == BackendType::Alloc {
        return state;
    }
    let vtep = vtep_name(config.backend.vni);
    let mut sorted: Vec<&Lease> = peers.iter().collect();
    sorted.sort_by_key(|l| l.subnet);
    sorted.dedup_by_key(|l| l.subnet);
    // A VTEP MAC may only map to one peer: two FDB entries for one MAC would send one
    // peer's traffic to the other. The first (lowest subnet) wins, deterministically.
    let mut mac_owner: BTreeMap<MacAddr, Ipv4Net> = BTreeMap::new();

    for peer in sorted {
        if peer.subnet == own.subnet {
            continue;
        }
        let rec = &peer.record;
        let reason = if rec.backend != kind {
            Some(format!(
                "uses backend {}, but the cluster uses {kind}",
                rec.backend
            ))
        } else if !config.network.contains(&peer.subnet) {
            Some(format!("outside the cluster network {}", config.network))
        } else if overlaps(peer.subnet, own.subnet) {
            Some(format!("overlaps this host's subnet {}", own.subnet))
        } else if rec.public_ip == host.public_ip {
            Some(format!("has this host's public IP {}", host.public_ip))
        } else {
            None
        };
        if let Some(reason) = reason {
            state.skipped.push((peer.subnet, reason));
            continue;
        }
        let on_underlay = host.underlay.contains(&rec.public_ip);
        let direct = |kind| Route {
            dst: peer.subnet,
            via: rec.public_ip,
            dev: host.iface.clone(),
            onlink: false,
            kind,
        };
        match kind {
            BackendType::HostGw if on_underlay => state.add_route(direct(RouteKind::HostGw)),
            BackendType::HostGw => state.skipped.push((
                peer.subnet,
                format!("not directly reachable (not on {})", host.underlay),
            )),
            BackendType::Vxlan if config.backend.direct_routing && on_underlay => {
                state.add_route(direct(RouteKind::Direct))
            }
            BackendType::Vxlan => {
                let Some(mac) = rec.backend_data.vtep_mac else {
                    state
                        .skipped
                        .push((peer.subnet, "has not published a VTEP MAC".to_string()));
                    continue;
                };
                if let Some(first) = mac_owner.get(&mac) {
                    state.skipped.push((
                        peer.subnet,
                        format!("its VTEP MAC {mac} is already used by the lease of {first}"),
                    ));
                    continue;
                }
                mac_owner.insert(mac, peer.subnet);
                let gateway = peer.subnet.network();
                state.neighbours.insert(Neighbour {
                    dev: vtep.clone(),
                    ip: gateway,
                    mac,
                });
                state.fdb.insert(FdbEntry {
                    dev: vtep.clone(),
                    mac,
                    dst: rec.public_ip,
                });
                state.add_route(Route {
                    dst: peer.subnet,
                    via: gateway,
                    dev: vtep.clone(),
                    onlink: true,
                    kind: RouteKind::Vxlan,
                });
            }
            BackendType::Alloc => unreachable!("handled above"),
        }
    }
    state
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The ordered phases of a diff; operations of one phase are independent of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Route, neighbour and FDB deletions.
    Delete,
    /// Neighbour and FDB additions (the entries routes rely on).
    Entries,
    /// Route additions and replacements.
    Routes,
}

/// One kernel write. Additions have replace semantics: applying one twice is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", content = "entry", rename_all = "snake_case")]
pub enum Op {
    DelRoute(Route),
    DelNeighbour(Neighbour),
    DelFdb(FdbEntry),
    /// Adds the neighbour, or replaces the MAC of an existing one for the same IP.
    AddNeighbour(Neighbour),
    /// Adds the FDB entry, or replaces the destination of an existing one for the same MAC.
    AddFdb(FdbEntry),
    AddRoute(Route),
    /// Replaces the route to the same destination (atomic in the kernel).
    ReplaceRoute(Route),
}

impl Op {
    pub fn phase(&self) -> Phase {
        match self {
            Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_) => Phase::Delete,
            Op::AddNeighbour(_) | Op::AddFdb(_) => Phase::Entries,
            Op::AddRoute(_) | Op::ReplaceRoute(_) => Phase::Routes,
        }
    }

    /// The device the entry lives on.
    pub fn dev(&self) -> &str {
        match self {
            Op::DelRoute(r) | Op::AddRoute(r) | Op::ReplaceRoute(r) => &r.dev,
            Op::DelNeighbour(n) | Op::AddNeighbour(n) => &n.dev,
            Op::DelFdb(f) | Op::AddFdb(f) => &f.dev,
        }
    }

    pub fn is_delete(&self) -> bool {
        self.phase() == Phase::Delete
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::DelRoute(r) => write!(f, "delete route {r}"),
            Op::DelNeighbour(n) => write!(f, "delete neighbour {n}"),
            Op::DelFdb(e) => write!(f, "delete fdb {e}"),
            Op::AddNeighbour(n) => write!(f, "add neighbour {n}"),
            Op::AddFdb(e) => write!(f, "add fdb {e}"),
            Op::AddRoute(r) => write!(f, "add route {r}"),
            Op::ReplaceRoute(r) => write!(f, "replace route {r}"),
        }
    }
}

/// The operations that turn `observed` into `desired`, in phase order (see the module
/// docs). Empty when the kernel already holds exactly the desired entries.
pub fn diff(desired: &DesiredState, observed: &ObservedState) -> Vec<Op> {
    let mut deletes = Vec::new();
    let mut entries = Vec::new();
    let mut routes = Vec::new();

    for (dst, route) in &observed.routes {
        if !desired.routes.contains_key(dst) {
            deletes.push(Op::DelRoute(route.clone()));
        }
    }

    // Neighbours: keyed by (dev, ip); a different MAC is replaced by the add.
    let wanted_neigh: BTreeMap<(&str, Ipv4Addr), &Neighbour> = desired
        .neighbours
        .iter()
        .map(|n| ((n.dev.as_str(), n.ip), n))
        .collect();
    for n in &observed.neighbours {
        if !wanted_neigh.contains_key(&(n.dev.as_str(), n.ip)) {
            deletes.push(Op::DelNeighbour(n.clone()));
        }
    }

    // FDB: keyed by (dev, mac); the kernel may hold several destinations for one MAC.
    let wanted_fdb: BTreeMap<(&str, MacAddr), Ipv4Addr> = desired
        .fdb
        .iter()
        .map(|e| ((e.dev.as_str(), e.mac), e.dst))
        .collect();
    let mut held_fdb: BTreeMap<(&str, MacAddr), Vec<&FdbEntry>> = BTreeMap::new();
    for e in &observed.fdb {
        held_fdb.entry((e.dev.as_str(), e.mac)).or_default().push(e);
    }
    for (key, held) in &held_fdb {
        let keep = match wanted_fdb.get(key) {
            // The wanted destination is there: drop only the others.
            Some(dst) if held.iter().any(|e| e.dst == *dst) => Some(*dst),
            // One wrong destination: the add replaces it in place, no gap.
            Some(_) if held.len() == 1 => Some(held[0].dst),
            // Several wrong destinations (or none wanted): clear them, then add.
            _ => None,
        };
        for e in held {
            if Some(e.dst) != keep {
                deletes.push(Op::DelFdb((*e).clone()));
            }
        }
    }

    for n in &desired.neighbours {
        if !observed.neighbours.contains(n) {
            entries.push(Op::AddNeighbour(n.clone()));
        }
    }
    for e in &desired.fdb {
        if !observed.fdb.contains(e) {
            entries.push(Op::AddFdb(e.clone()));
        }
    }

    for (dst, route) in &desired.routes {
        match observed.routes.get(dst) {
            None => routes.push(Op::AddRoute(route.clone())),
            Some(held) if held != route => routes.push(Op::ReplaceRoute(route.clone())),
            Some(_) => {}
        }
    }

    deletes.extend(entries);
    deletes.extend(routes);
    deletes
}

mod routes_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        routes: &BTreeMap<Ipv4Net, Route>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(routes.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Ipv4Net, Route>, D::Error> {
        let list = Vec::<Route>::deserialize(d)?;
        Ok(list.into_iter().map(|r| (r.dst, r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfigSpec;
    use crate::lease::{BackendData, LeaseRecord};
    use std::time::SystemTime;

    fn config(backend: &str, direct_routing: bool) -> NetworkConfig {
        NetworkConfigSpec {
            network: "10.244.0.0/16".into(),
            backend: Some(crate::config::BackendSpec {
                kind: Some(backend.into()),
                vni: Some(7),
                direct_routing: Some(direct_routing),
                ..Default::default()
            }),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    fn lease(subnet: &str, ip: &str, backend: BackendType, mac: Option<&str>) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            record: LeaseRecord {
                node: format!("node-{ip}"),
                public_ip: ip.parse().unwrap(),
                backend,
                backend_data: BackendData {
                    vtep_mac: mac.map(|m| m.parse().unwrap()),
                    ..Default::default()
                },
                reserved: false,
                created_at: SystemTime::UNIX_EPOCH,
                renewed_at: SystemTime::UNIX_EPOCH,
            },
        }
    }

    fn host() -> HostNet {
        HostNet {
            public_ip: "192.0.2.11".parse().unwrap(),
            iface: "eth0".into(),
            underlay: "192.0.2.0/24".parse().unwrap(),
        }
    }

    fn own(backend: BackendType) -> Lease {
        lease(
            "10.244.1.0/24",
            "192.0.2.11",
            backend,
            Some("02:00:00:00:00:01"),
        )
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    fn vx_route(dst: &str, via: &str) -> Route {
        Route {
            dst: net(dst),
            via: ip(via),
            dev: "ovl.7".into(),
            onlink: true,
            kind: RouteKind::Vxlan,
        }
    }

    #[test]
    fn vtep_names() {
        assert_eq!(vtep_name(1), "ovl.1");
        assert_eq!(vtep_name(4096), "ovl.4096");
    }

    #[test]
    fn route_kind_serde_names() {
        assert_eq!(
            serde_json::to_string(&RouteKind::HostGw).unwrap(),
            "\"host-gw\""
        );
        assert_eq!(
            serde_json::to_string(&RouteKind::Vxlan).unwrap(),
            "\"vxlan\""
        );
        assert_eq!(
            serde_json::to_string(&RouteKind::Direct).unwrap(),
            "\"direct\""
        );
        let k: RouteKind = serde_json::from_str("\"host-gw\"").unwrap();
        assert_eq!(k, RouteKind::HostGw);
    }

    #[test]
    fn plan_vxlan_makes_neighbour_fdb_and_onlink_route_per_peer() {
        let c = config("vxlan", false);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            me.clone(),
            lease(
                "10.244.2.0/24",
                "192.0.2.12",
                BackendType::Vxlan,
                Some("02:00:00:00:00:02"),
            ),
            lease(
                "10.244.3.0/24",
                "198.51.100.13",
                BackendType::Vxlan,
                Some("02:00:00:00:00:03"),
            ),
        ];
        let s = plan(&c, &me, &peers, &host());
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        assert_eq!(
            s.routes.values().cloned().collect::<Vec<_>>(),
            vec![
                vx_route("10.244.2.0/24", "10.244.2.0"),
                vx_route("10.244.3.0/24", "10.244.3.0")
            ]
        );
        assert!(s.routes.values().all(|r| r.kind == RouteKind::Vxlan));
        assert_eq!(
            s.neighbours.iter().cloned().collect::<Vec<_>>(),
            vec![
                Neighbour {
                    dev: "ovl.7".into(),
                    ip: ip("10.244.2.0"),
                    mac: mac("02:00:00:00:00:02")
                },
                Neighbour {
                    dev: "ovl.7".into(),
                    ip: ip("10.244.3.0"),
                    mac: mac("02:00:00:00:00:03")
                },
            ]
        );
        assert_eq!(
            s.fdb.iter().cloned().collect::<Vec<_>>(),
            vec![
                FdbEntry {
                    dev: "ovl.7".into(),
                    mac: mac("02:00:00:00:00:02"),
                    dst: ip("192.0.2.12")
                },
                FdbEntry {
                    dev: "ovl.7".into(),
                    mac: mac("02:00:00:00:00:03"),
                    dst: ip("198.51.100.13")
                },
            ]
        );
    }

    #[test]
    fn plan_vxlan_skips_peers_without_mac_or_with_another_backend() {
        let c = config("vxlan", false);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            lease("10.244.2.0/24", "192.0.2.12", BackendType::Vxlan, None),
            lease("10.244.3.0/24", "192.0.2.13", BackendType::HostGw, None),
            lease(
                "10.244.4.0/24",
                "192.0.2.14",
                BackendType::Vxlan,
                Some("02:00:00:00:00:04"),
            ),
        ];
        let s = plan(&c, &me, &peers, &host());
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.neighbours.len(), 1);
        assert_eq!(s.fdb.len(), 1);
        assert_eq!(s.skipped.len(), 2);
        assert_eq!(s.skipped[0].0, net("10.244.2.0/24"));
        assert!(s.skipped[0].1.contains("VTEP MAC"), "{:?}", s.skipped);
        assert_eq!(s.skipped[1].0, net("10.244.3.0/24"));
        assert!(s.skipped[1].1.contains("host-gw"), "{:?}", s.skipped);
    }

    #[test]
    fn plan_vxlan_direct_routing_uses_plain_routes_on_the_underlay() {
        let c = config("vxlan", true);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            // Same L2 subnet, even without a MAC: a direct route needs none.
            lease("10.244.2.0/24", "192.0.2.12", BackendType::Vxlan, None),
            // Elsewhere: encapsulated as usual.
            lease(
                "10.244.3.0/24",
                "198.51.100.13",
                BackendType::Vxlan,
                Some("02:00:00:00:00:03"),
            ),
        ];
        let s = plan(&c, &me, &peers, &host());
        assert!(s.skipped.is_empty());
        let direct = &s.routes[&net("10.244.2.0/24")];
        assert_eq!(direct.kind, RouteKind::Direct);
        assert_eq!(direct.via, ip("192.0.2.12"));
        assert_eq!(direct.dev, "eth0");
        assert!(!direct.onlink);
        let vx = &s.routes[&net("10.244.3.0/24")];
        assert_eq!(vx.kind, RouteKind::Vxlan);
        assert_eq!(s.neighbours.len(), 1);
        assert_eq!(s.fdb.len(), 1);
        assert!(s.neighbours.iter().all(|n| n.ip == ip("10.244.3.0")));
    }

    #[test]
    fn plan_host_gw_routes_via_public_ip_and_reports_unreachable_peers() {
        let c = config("host-gw", false);
        let me = own(BackendType::HostGw);
        let peers = vec![
            lease("10.244.2.0/24", "192.0.2.12", BackendType::HostGw, None),
            lease("10.244.3.0/24", "198.51.100.13", BackendType::HostGw, None),
            lease(
                "10.244.4.0/24",
                "192.0.2.14",
                BackendType::Vxlan,
                Some("02:00:00:00:00:04"),
            ),
        ];
        let s = plan(&c, &me, &peers, &host());
        assert_eq!(s.routes.len(), 1);
        let r = &s.routes[&net("10.244.2.0/24")];
        assert_eq!(
            (r.via, r.dev.as_str(), r.onlink, r.kind),
            (ip("192.0.2.12"), "eth0", false, RouteKind::HostGw)
        );
        assert!(s.neighbours.is_empty() && s.fdb.is_empty());
        assert_eq!(
            s.skipped,
            vec![
                (
                    net("10.244.3.0/24"),
                    "not directly reachable (not on 192.0.2.0/24)".to_string()
                ),
                (
                    net("10.244.4.0/24"),
                    "uses backend vxlan, but the cluster uses host-gw".to_string()
                ),
            ]
        );
    }

    #[test]
    fn plan_alloc_is_empty() {
        let c = config("alloc", false);
        let me = own(BackendType::Alloc);
        let peers = vec![lease(
            "10.244.2.0/24",
            "192.0.2.12",
            BackendType::Alloc,
            None,
        )];
        assert_eq!(plan(&c, &me, &peers, &host()), DesiredState::default());
    }

    #[test]
    fn plan_skips_self_and_guards_against_bad_leases() {
        let c = config("vxlan", false);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            me.clone(),
            // A stale lease still held under this host's public IP.
            lease(
                "10.244.9.0/24",
                "192.0.2.11",
                BackendType::Vxlan,
                Some("02:00:00:00:00:09"),
            ),
            // Outside the cluster network.
            lease(
                "10.99.0.0/24",
                "192.0.2.20",
                BackendType::Vxlan,
                Some("02:00:00:00:00:20"),
            ),
            // Two leases publishing one MAC: the first (lowest subnet) wins.
            lease(
                "10.244.5.0/24",
                "192.0.2.15",
                BackendType::Vxlan,
                Some("02:00:00:00:00:55"),
            ),
            lease(
                "10.244.6.0/24",
                "192.0.2.16",
                BackendType::Vxlan,
                Some("02:00:00:00:00:55"),
            ),
        ];
        let s = plan(&c, &me, &peers, &host());
        assert_eq!(
            s.routes.keys().copied().collect::<Vec<_>>(),
            vec![net("10.244.5.0/24")]
        );
        let skipped: Vec<Ipv4Net> = s.skipped.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            skipped,
            vec![
                net("10.99.0.0/24"),
                net("10.244.6.0/24"),
                net("10.244.9.0/24")
            ]
        );
        assert!(!s.routes.contains_key(&me.subnet));
    }

    fn sample_state() -> DesiredState {
        let c = config("vxlan", false);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            lease(
                "10.244.2.0/24",
                "192.0.2.12",
                BackendType::Vxlan,
                Some("02:00:00:00:00:02"),
            ),
            lease(
                "10.244.3.0/24",
                "192.0.2.13",
                BackendType::Vxlan,
                Some("02:00:00:00:00:03"),
            ),
        ];
        plan(&c, &me, &peers, &host())
    }

    #[test]
    fn diff_from_empty_adds_entries_before_routes() {
        let d = sample_state();
        let ops = diff(&d, &ObservedState::default());
        assert_eq!(ops.len(), 6);
        let phases: Vec<Phase> = ops.iter().map(Op::phase).collect();
        assert_eq!(
            phases,
            vec![
                Phase::Entries,
                Phase::Entries,
                Phase::Entries,
                Phase::Entries,
                Phase::Routes,
                Phase::Routes
            ]
        );
        assert!(matches!(ops[0], Op::AddNeighbour(_)));
        assert!(matches!(ops[2], Op::AddFdb(_)));
        assert!(matches!(ops[4], Op::AddRoute(_)));
    }

    #[test]
    fn diff_is_empty_when_equal() {
        let d = sample_state();
        assert!(diff(&d, &d.entries()).is_empty());
        // Route kinds are not part of the kernel identity.
        let mut observed = d.entries();
        for r in observed.routes.values_mut() {
            r.kind = RouteKind::HostGw;
        }
        assert!(diff(&d, &observed).is_empty());
        assert!(diff(&DesiredState::default(), &ObservedState::default()).is_empty());
    }

    #[test]
    fn diff_removes_what_is_no_longer_desired_routes_first() {
        let d = sample_state();
        let mut observed = d.entries();
        // A peer that vanished while the agent was down.
        observed.insert_route(vx_route("10.244.4.0/24", "10.244.4.0"));
        observed.neighbours.insert(Neighbour {
            dev: "ovl.7".into(),
            ip: ip("10.244.4.0"),
            mac: mac("02:00:00:00:00:04"),
        });
        observed.fdb.insert(FdbEntry {
            dev: "ovl.7".into(),
            mac: mac("02:00:00:00:00:04"),
            dst: ip("192.0.2.14"),
        });
        let ops = diff(&d, &observed);
        assert_eq!(
            ops,
            vec![
                Op::DelRoute(vx_route("10.244.4.0/24", "10.244.4.0")),
                Op::DelNeighbour(Neighbour {
                    dev: "ovl.7".into(),
                    ip: ip("10.244.4.0"),
                    mac: mac("02:00:00:00:00:04"),
                }),
                Op::DelFdb(FdbEntry {
                    dev: "ovl.7".into(),
                    mac: mac("02:00:00:00:00:04"),
                    dst: ip("192.0.2.14"),
                }),
            ]
        );
    }

    #[test]
    fn diff_replaces_changed_entries_in_place() {
        let d = sample_state();
        let mut observed = d.entries();
        // Wrong gateway for one route, missing onlink flag for the other.
        observed.insert_route(vx_route("10.244.2.0/24", "10.244.2.9"));
        let mut no_onlink = vx_route("10.244.3.0/24", "10.244.3.0");
        no_onlink.onlink = false;
        observed.insert_route(no_onlink);
        // A neighbour with a stale MAC, an FDB entry with a stale destination.
        observed.neighbours.retain(|n| n.ip != ip("10.244.2.0"));
        observed.neighbours.insert(Neighbour {
            dev: "ovl.7".into(),
            ip: ip("10.244.2.0"),
            mac: mac("02:00:00:00:00:99"),
        });
        observed.fdb.retain(|e| e.mac != mac("02:00:00:00:00:03"));
        observed.fdb.insert(FdbEntry {
            dev: "ovl.7".into(),
            mac: mac("02:00:00:00:00:03"),
            dst: ip("192.0.2.99"),
        });
        let ops = diff(&d, &observed);
        assert_eq!(
            ops,
            vec![
                Op::AddNeighbour(Neighbour {
                    dev: "ovl.7".into(),
                    ip: ip("10.244.2.0"),
                    mac: mac("02:00:00:00:00:02"),
                }),
                Op::AddFdb(FdbEntry {
                    dev: "ovl.7".into(),
                    mac: mac("02:00:00:00:00:03"),
                    dst: ip("192.0.2.13"),
                }),
                Op::ReplaceRoute(vx_route("10.244.2.0/24", "10.244.2.0")),
                Op::ReplaceRoute(vx_route("10.244.3.0/24", "10.244.3.0")),
            ],
            "no deletes: every change is a replacement"
        );
    }

    #[test]
    fn diff_cleans_extra_fdb_destinations() {
        let d = sample_state();
        let mut observed = d.entries();
        // An extra destination appended next to the right one.
        observed.fdb.insert(FdbEntry {
            dev: "ovl.7".into(),
            mac: mac("02:00:00:00:00:02"),
            dst: ip("192.0.2.77"),
        });
        assert_eq!(
            diff(&d, &observed),
            vec![Op::DelFdb(FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:02"),
                dst: ip("192.0.2.77"),
            })]
        );
        // Two wrong destinations: both go, then the right one is added.
        let mut observed = d.entries();
        observed.fdb.retain(|e| e.mac != mac("02:00:00:00:00:02"));
        for dst in ["192.0.2.77", "192.0.2.78"] {
            observed.fdb.insert(FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:02"),
                dst: ip(dst),
            });
        }
        let ops = diff(&d, &observed);
        assert_eq!(ops.len(), 3);
        assert!(matches!(&ops[0], Op::DelFdb(e) if e.dst == ip("192.0.2.77")));
        assert!(matches!(&ops[1], Op::DelFdb(e) if e.dst == ip("192.0.2.78")));
        assert!(matches!(&ops[2], Op::AddFdb(e) if e.dst == ip("192.0.2.12")));
    }

    #[test]
    fn diff_switching_to_direct_routing_replaces_route_and_drops_entries() {
        let before = sample_state();
        let c = config("vxlan", true);
        let me = own(BackendType::Vxlan);
        let peers = vec![
            lease(
                "10.244.2.0/24",
                "192.0.2.12",
                BackendType::Vxlan,
                Some("02:00:00:00:00:02"),
            ),
            lease(
                "10.244.3.0/24",
                "192.0.2.13",
                BackendType::Vxlan,
                Some("02:00:00:00:00:03"),
            ),
        ];
        let after = plan(&c, &me, &peers, &host());
        let ops = diff(&after, &before.entries());
        let kinds: Vec<&str> = ops
            .iter()
            .map(|o| match o {
                Op::DelNeighbour(_) => "del-neigh",
                Op::DelFdb(_) => "del-fdb",
                Op::ReplaceRoute(_) => "replace",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "del-neigh",
                "del-neigh",
                "del-fdb",
                "del-fdb",
                "replace",
                "replace"
            ]
        );
        let phases: Vec<Phase> = ops.iter().map(Op::phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        assert_eq!(phases, sorted, "ops come in phase order");
    }

    #[test]
    fn states_serialize_routes_as_lists() {
        let d = sample_state();
        let json = serde_json::to_value(&d).unwrap();
        let routes = json["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0]["dst"], "10.244.2.0/24");
        assert_eq!(routes[0]["kind"], "vxlan");
        assert_eq!(json["fdb"][0]["mac"], "02:00:00:00:00:02");
        let back: DesiredState = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
        let op =
            serde_json::to_value(Op::AddRoute(vx_route("10.244.2.0/24", "10.244.2.0"))).unwrap();
        assert_eq!(op["op"], "add_route");
        assert_eq!(op["entry"]["via"], "10.244.2.0");
    }

    #[test]
    fn ops_display_like_ip_commands() {
        let op = Op::AddRoute(vx_route("10.244.2.0/24", "10.244.2.0"));
        assert_eq!(
            op.to_string(),
            "add route 10.244.2.0/24 via 10.244.2.0 dev ovl.7 onlink"
        );
        assert_eq!(op.dev(), "ovl.7");
        assert!(!op.is_delete());
    }
}
