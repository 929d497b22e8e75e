//! vxlan: per peer a permanent neighbour (the peer subnet's network address -> the peer's
//! VTEP MAC), an FDB entry (that MAC -> the peer's public IP) and an onlink route via the
//! network address on the VTEP; with direct routing, a plain route for peers on this
//! host's underlay segment instead.
//!
//! A VTEP MAC may only map to one peer: two FDB entries for one MAC would send one peer's
//! traffic to the other. The first in subnet order wins, deterministically on every host.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::{direct_route, PeerPlanner};
use crate::config::BackendConfig;
use crate::datapath::{vtep_name, DesiredState, FdbEntry, HostNet, Neighbour, Route, RouteKind};
use crate::lease::Lease;
use crate::mac::MacAddr;

pub struct VxlanPlanner {
    vtep: String,
    direct_routing: bool,
}

impl VxlanPlanner {
    pub fn new(backend: &BackendConfig) -> Self {
        VxlanPlanner {
            vtep: vtep_name(backend.vni),
            direct_routing: backend.direct_routing,
        }
    }
}

impl PeerPlanner for VxlanPlanner {
    fn plan_peers(&self, peers: &[&Lease], host: &HostNet, state: &mut DesiredState) {
        let mut mac_owner: BTreeMap<MacAddr, Ipv4Net> = BTreeMap::new();
        for peer in peers {
            if self.direct_routing {
                if let Some(route) = direct_route(peer, host, RouteKind::Direct) {
                    state.add_route(route);
                    continue;
                }
            }
            let Some(mac) = peer.record.backend_data.vtep_mac else {
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
                dev: self.vtep.clone(),
                ip: gateway,
                mac,
            });
            state.fdb.insert(FdbEntry {
                dev: self.vtep.clone(),
                mac,
                dst: peer.record.public_ip,
            });
            state.add_route(Route {
                dst: peer.subnet,
                via: gateway,
                dev: self.vtep.clone(),
                onlink: true,
                kind: RouteKind::Vxlan,
            });
        }
    }
}
