//! host-gw: a route per peer via the peer's public IP. The next hop must be on this host's
//! underlay segment; a peer that is not is skipped and reported, never given a route that
//! cannot work.

use super::{direct_route, PeerPlanner};
use crate::datapath::{DesiredState, HostNet, RouteKind};
use crate::lease::Lease;

pub struct HostGwPlanner;

impl PeerPlanner for HostGwPlanner {
    fn plan_peers(&self, peers: &[&Lease], host: &HostNet, state: &mut DesiredState) {
        for peer in peers {
            match direct_route(peer, host, RouteKind::HostGw) {
                Some(route) => state.add_route(route),
                None => state.skipped.push((
                    peer.subnet,
                    format!("not directly reachable (not on {})", host.underlay),
                )),
            }
        }
    }
}
