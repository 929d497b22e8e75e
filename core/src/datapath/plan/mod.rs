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

use ipnet::Ipv4Net;

use super::{DesiredState, HostNet, Route, RouteKind};
use crate::config::{BackendType, NetworkConfig};
use crate::lease::Lease;

pub use host_gw::HostGwPlanner;
pub use vxlan::VxlanPlanner;

/// How one backend turns accepted peers into kernel entries.
pub trait PeerPlanner {
    /// Adds the entries for `peers` (sorted by subnet, each one a peer this host may
    /// route to) to `state`, or records in `state.skipped` why a peer gets none.
    fn plan_peers(&self, peers: &[&Lease], host: &HostNet, state: &mut DesiredState);
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
/// `peers` may include the host's own lease (it is ignored). Peers that get no entries are
/// listed in [`DesiredState::skipped`] with the reason; nothing is logged here.
pub fn plan(config: &NetworkConfig, own: &Lease, peers: &[Lease], host: &HostNet) -> DesiredState {
    let mut state = DesiredState::default();
    let Some(planner) = planner(config) else {
        return state;
    };
    let kind = config.backend.kind;
    let mut sorted: Vec<&Lease> = peers.iter().collect();
    sorted.sort_by_key(|l| l.subnet);
    sorted.dedup_by_key(|l| l.subnet);
    let mut accepted = Vec::with_capacity(sorted.len());
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
        match reason {
            Some(reason) => state.skipped.push((peer.subnet, reason)),
            None => accepted.push(peer),
        }
    }
    planner.plan_peers(&accepted, host, &mut state);
    // Reported in subnet order, whichever step skipped them.
    state.skipped.sort_by_key(|(subnet, _)| *subnet);
    state
}

/// A plain route to the peer's subnet via the peer itself on the public interface (host-gw,
/// and vxlan's direct routing), when the peer is on this host's underlay segment.
fn direct_route(peer: &Lease, host: &HostNet, kind: RouteKind) -> Option<Route> {
    host.underlay
        .contains(&peer.record.public_ip)
        .then(|| Route {
            dst: peer.subnet,
            via: peer.record.public_ip,
            dev: host.iface.clone(),
            onlink: false,
            kind,
        })
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}
