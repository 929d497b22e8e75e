//! [`plan`]: the entries this host should have for its peers' leases.
//!
//! What every backend shares is here: peers are taken in subnet order, once each, and a
//! peer the cluster cannot route to (another backend, outside the network, overlapping
//! this host's subnet, or claiming this host's public IP) is skipped with the reason.
//! What a backend makes of an accepted peer is the backend's own [`PeerPlanner`], in its
//! own file; [`planner`] is the registry. Adding a backend adds a planner and one line in
//! the registry, nothing else here.
//!
//! The planners stay in the pure core, not in the agent's backend modules, because
//! `overlayctl routes --node` runs the very same plan from the leases to print what a
//! host converges to; the agent's backends call [`plan`] and own the host effects.

mod host_gw;
mod vxlan;

use std::net::IpAddr;

use ipnet::IpNet;

use super::{DesiredState, HostNet, Route, RouteKind};
use crate::config::{BackendType, NetworkConfig};
use crate::lease::Lease;

pub use host_gw::HostGwPlanner;
pub use vxlan::VxlanPlanner;

/// How one backend turns accepted peers into kernel entries.
pub trait PeerPlanner {
    /// Adds the entries for `peers` to `state`, or records in `state.skipped` why a peer
    /// subnet gets none. Each peer comes with the subnets this host may route to (one per
    /// family the cluster has, sorted by key subnet).
    fn plan_peers(&self, peers: &[PeerSubnets<'_>], host: &HostNet, state: &mut DesiredState);
}

/// An accepted peer and its subnets that this host may route to, IPv4 first.
pub struct PeerSubnets<'a> {
    pub lease: &'a Lease,
    pub subnets: Vec<IpNet>,
}

/// The registry: the planner of a backend; `None` for a backend that programs nothing.
pub fn planner(config: &NetworkConfig) -> Option<Box<dyn PeerPlanner>> {
    match config.backend.kind {
        BackendType::Alloc => None,
        BackendType::HostGw => Some(Box::new(HostGwPlanner)),
        BackendType::Vxlan => Some(Box::new(VxlanPlanner::new(&config.backend))),
    }
}

/// Computes the entries this host should have for its peers.
///
/// `peers` may include the host's own lease (it is ignored). Peers, or single subnets of
/// a dual-stack peer, that get no entries are listed in [`DesiredState::skipped`] with the
/// reason; nothing is logged here.
pub fn plan(config: &NetworkConfig, own: &Lease, peers: &[Lease], host: &HostNet) -> DesiredState {
    let mut state = DesiredState::default();
    let Some(planner) = planner(config) else {
        return state;
    };
    let kind = config.backend.kind;
    let mut sorted: Vec<&Lease> = peers.iter().collect();
    sorted.sort_by_key(|l| l.subnet);
    sorted.dedup_by_key(|l| l.subnet);
    let own_subnets = own.subnets();
    let mut accepted = Vec::with_capacity(sorted.len());
    for peer in sorted {
        if peer.subnet == own.subnet {
            continue;
        }
        let rec = &peer.record;
        let own_ip = [rec.public_ip.map(IpAddr::V4), rec.public_ipv6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .find(|ip| host.is_own(*ip));
        let reason = if rec.backend != kind {
            Some(format!(
                "uses backend {}, but the cluster uses {kind}",
                rec.backend
            ))
        } else {
            own_ip.map(|ip| format!("has this host's public IP {ip}"))
        };
        if let Some(reason) = reason {
            state.skipped.push((peer.subnet, reason));
            continue;
        }
        let mut subnets = Vec::with_capacity(2);
        for pool in config.pools() {
            let v6 = matches!(pool.network, IpNet::V6(_));
            let subnet = if v6 {
                peer.ipv6().map(IpNet::V6)
            } else {
                peer.ipv4().map(IpNet::V4)
            };
            let Some(subnet) = subnet else {
                state.skipped.push((
                    peer.subnet,
                    format!("has no {} subnet", pool.family()),
                ));
                continue;
            };
            let reason = if !pool.network.contains(&subnet) {
                Some(format!("outside the cluster network {}", pool.network))
            } else {
                own_subnets
                    .iter()
                    .find(|o| overlaps(subnet, **o))
                    .map(|mine| format!("overlaps this host's subnet {mine}"))
            };
            match reason {
                Some(reason) => state.skipped.push((subnet, reason)),
                None => subnets.push(subnet),
            }
        }
        if !subnets.is_empty() {
            accepted.push(PeerSubnets {
                lease: peer,
                subnets,
            });
        }
    }
    planner.plan_peers(&accepted, host, &mut state);
    // Reported in subnet order, whichever step skipped them.
    state.skipped.sort();
    state
}

/// A plain route to the peer's `subnet` via the peer itself on the public interface
/// (host-gw, and vxlan's direct routing), when the peer has a public address of the
/// subnet's family on this host's underlay segment of that family.
fn direct_route(peer: &Lease, subnet: IpNet, host: &HostNet, kind: RouteKind) -> Option<Route> {
    let v6 = matches!(subnet, IpNet::V6(_));
    let via = peer.public_addr(v6)?;
    host.underlay_of(v6)?.contains(&via).then(|| Route {
        dst: subnet,
        via,
        dev: host.iface.clone(),
        onlink: false,
        kind,
    })
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}
