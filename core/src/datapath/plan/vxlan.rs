//! vxlan: per peer subnet a permanent neighbour (the subnet's network address -> the
//! peer's VTEP MAC) and an onlink route via that address on a VTEP, and per peer an FDB
//! entry (the MAC -> the peer's public address) on each VTEP used; with direct routing,
//! a plain route for peer subnets whose next hop is on this host's underlay segment.
//!
//! Two VTEPs, one per underlay family: `ovl.<vni>` sends over IPv4 and `ovl6.<vni>` over
//! IPv6. A VXLAN device has one local address and so one underlay family, while the frames
//! it carries can hold either inner family (VXLAN is layer 2). So the underlay family is
//! chosen per peer subnet: the inner family's own underlay when both ends have a public
//! address of it (IPv6 pods over the IPv6 underlay, as Flannel's second VTEP does), else
//! the other family's (a dual-stack overlay over an IPv4-only underlay still works, which
//! Flannel's design cannot do). An IPv6-only cluster over an IPv6 underlay uses
//! `ovl6.<vni>` alone. Both VTEPs carry the one VTEP MAC a host publishes: they are
//! separate devices, and a peer's frames to that MAC reach whichever one their underlay
//! family lands on.
//!
//! A VTEP MAC may only map to one peer: two FDB entries for one MAC would send one peer's
//! traffic to the other. The first in subnet order wins, deterministically on every host.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{direct_route, PeerPlanner, PeerSubnets};
use crate::config::BackendConfig;
use crate::datapath::{
    vtep6_name, vtep_name, DesiredState, FdbEntry, HostNet, Neighbour, Route, RouteKind,
};
use crate::mac::MacAddr;

pub struct VxlanPlanner {
    vtep: String,
    vtep6: String,
    direct_routing: bool,
}

impl VxlanPlanner {
    pub fn new(backend: &BackendConfig) -> Self {
        VxlanPlanner {
            vtep: vtep_name(backend.vni),
            vtep6: vtep6_name(backend.vni),
            direct_routing: backend.direct_routing,
        }
    }
}

impl PeerPlanner for VxlanPlanner {
    fn plan_peers(&self, peers: &[PeerSubnets<'_>], host: &HostNet, state: &mut DesiredState) {
        let mut mac_owner: BTreeMap<MacAddr, IpNet> = BTreeMap::new();
        for peer in peers {
            let lease = peer.lease;
            let mut encapsulated = Vec::new();
            for &subnet in &peer.subnets {
                if self.direct_routing {
                    if let Some(route) = direct_route(lease, subnet, host, RouteKind::Direct) {
                        state.add_route(route);
                        continue;
                    }
                }
                encapsulated.push(subnet);
            }
            if encapsulated.is_empty() {
                continue;
            }
            let Some(mac) = lease.record.backend_data.vtep_mac else {
                for subnet in encapsulated {
                    state
                        .skipped
                        .push((subnet, "has not published a VTEP MAC".to_string()));
                }
                continue;
            };
            if let Some(first) = mac_owner.get(&mac) {
                for subnet in encapsulated {
                    state.skipped.push((
                        subnet,
                        format!("its VTEP MAC {mac} is already used by the lease of {first}"),
                    ));
                }
                continue;
            }
            mac_owner.insert(mac, lease.subnet);
            for subnet in encapsulated {
                let inner_v6 = matches!(subnet, IpNet::V6(_));
                // The inner family's own underlay first, then the other one.
                let underlay = [inner_v6, !inner_v6].into_iter().find_map(|v6| {
                    host.public_addr(v6)?;
                    Some((v6, lease.public_addr(v6)?))
                });
                let Some((underlay_v6, peer_addr)) = underlay else {
                    state.skipped.push((
                        subnet,
                        "shares no underlay family with this host".to_string(),
                    ));
                    continue;
                };
                let vtep = if underlay_v6 { &self.vtep6 } else { &self.vtep };
                let gateway = subnet.network();
                state.neighbours.insert(Neighbour {
                    dev: vtep.clone(),
                    ip: gateway,
                    mac,
                });
                state.fdb.insert(FdbEntry {
                    dev: vtep.clone(),
                    mac,
                    dst: peer_addr,
                });
                state.add_route(Route {
                    dst: subnet,
                    via: gateway,
                    dev: vtep.clone(),
                    onlink: true,
                    kind: RouteKind::Vxlan,
                });
            }
        }
    }
}
