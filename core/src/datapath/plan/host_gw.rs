//! host-gw: a route per peer subnet via the peer's public address of the same family. The
//! next hop must be on this host's underlay segment of that family; a peer subnet whose
//! next hop is not is skipped and reported, never given a route that cannot work. IPv6
//! routes go via the peer's public IPv6 address; a dual-stack peer on an IPv4-only
//! segment keeps its IPv4 route and has its IPv6 subnet skipped.

use ipnet::IpNet;

use super::{direct_route, PeerPlanner, PeerSubnets};
use crate::config::Family;
use crate::datapath::{DesiredState, HostNet, RouteKind};

pub struct HostGwPlanner;

impl PeerPlanner for HostGwPlanner {
    fn plan_peers(&self, peers: &[PeerSubnets<'_>], host: &HostNet, state: &mut DesiredState) {
        for peer in peers {
            for &subnet in &peer.subnets {
                match direct_route(peer.lease, subnet, host, RouteKind::HostGw) {
                    Some(route) => state.add_route(route),
                    None => state.skipped.push((subnet, unreachable(subnet, host))),
                }
            }
        }
    }
}

fn unreachable(subnet: IpNet, host: &HostNet) -> String {
    let v6 = matches!(subnet, IpNet::V6(_));
    let family = Family::of(&subnet);
    match host.underlay_of(v6) {
        Some(underlay) => format!("not directly reachable (not on {underlay})"),
        None => format!("not directly reachable (this host has no {family} underlay)"),
    }
}
