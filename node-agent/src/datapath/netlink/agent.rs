//! The agent's datapath over netlink: the bridge and the VTEP, addresses, and the
//! entries of [`Op`]s (routes with [`ROUTE_PROTOCOL`], permanent neighbours and FDB
//! entries on the VTEP), read back whole ([`Netlink::observe`]) and written in pipelined
//! phases ([`Netlink::apply`]).

use super::*;

impl Netlink {
    /// Creates the bridge with an explicit MAC (so the kernel never changes it as ports
    /// come and go), or fixes MAC, MTU and up state in place. Returns its index.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        mac: MacAddr,
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        let op = format!("ensure bridge {name}");
        if let Some(link) = self.link_info(name).await? {
            if link.kind.as_deref() == Some("bridge") {
                self.fix_link(&link, mac, mtu).await?;
                return Ok(link.index);
            }
            tracing::info!(
                link = name,
                "replacing link {name}: it is a {} device, not a bridge",
                link.kind.as_deref().unwrap_or("plain")
            );
            self.delete_index(&op, name, link.index).await?;
        }
        // The MTU is set after creation, not in the create message: only an MTU set on a
        // live bridge marks it as chosen by the user, which stops the kernel from
        // lowering or raising it to its ports' minimum whenever a port is added.
        let link = self
            .create_link(
                &op,
                name,
                LinkBridge::new(name).address(mac.0.to_vec()).build(),
            )
            .await?;
        tracing::info!(link = name, index = link.index, "created bridge {name}");
        self.fix_link(&link, mac, mtu).await?;
        Ok(link.index)
    }

    /// Sends one link creation and reads the new link back.
    async fn create_link(
        &self,
        op: &str,
        name: &str,
        message: LinkMessage,
    ) -> Result<LinkInfo, NetlinkError> {
        self.count_write();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op.to_string(), e))?;
        self.link_info(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink {
                op: op.to_string(),
                name: name.to_string(),
            })
    }

    /// Creates the VTEP (learning off); recreates it when it differs in what cannot be
    /// changed in place; fixes MTU, MAC and up state in place. Returns its index.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        let name = spec.name.as_str();
        let op = format!("ensure vxlan device {name}");
        if let Some(link) = self.link_info(name).await? {
            match spec.mismatch(&link) {
                None => {
                    self.fix_link(&link, spec.mac, spec.mtu).await?;
                    return Ok(link.index);
                }
                Some(why) => {
                    tracing::info!(link = name, "recreating {name}: {why}");
                    self.delete_index(&op, name, link.index).await?;
                }
            }
        }
        let builder = LinkVxlan::new(name, spec.vni)
            .dev(spec.underlay_ifindex)
            .port(spec.port);
        let builder = match spec.local {
            IpAddr::V4(local) => builder.local(local),
            IpAddr::V6(local) => builder.local6(local),
        };
        let message = builder
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .up()
            .build();
        let link = self.create_link(&op, name, message).await?;
        tracing::info!(
            link = name,
            index = link.index,
            vni = spec.vni,
            "created {name}"
        );
        // The kernel clamps the MTU to what the underlay allows; fix_link reports that.
        self.fix_link(&link, spec.mac, spec.mtu).await?;
        Ok(link.index)
    }

    /// Sets MTU, MAC and up state where they differ, in one request; no write otherwise.
    async fn fix_link(&self, link: &LinkInfo, mac: MacAddr, mtu: u32) -> Result<(), NetlinkError> {
        let name = &link.name;
        let mut changes = Vec::new();
        let mut message = LinkUnspec::new_with_index(link.index);
        if link.mtu != mtu {
            changes.push(format!("MTU {} -> {mtu}", link.mtu));
            message = message.mtu(mtu);
        }
        let mac_differs = link.mac != Some(mac);
        if mac_differs {
            let have = link.mac.map_or("none".to_string(), |m| m.to_string());
            changes.push(format!("MAC {have} -> {mac}"));
            message = message.address(mac.0.to_vec());
        }
        if !link.up {
            changes.push("down -> up".to_string());
        }
        if changes.is_empty() {
            return Ok(());
        }
        let what = changes.join(", ");
        tracing::info!(link = %name, "fixing {name} in place: {what}");
        let op = format!("set {what} on {name}");
        self.count_write();
        let result = self
            .handle
            .link()
            .change(message.up().build())
            .execute()
            .await;
        match result {
            Ok(()) => Ok(()),
            // Some drivers refuse a MAC change while the device is up.
            Err(e) if mac_differs && errno_of(&e) == Some(libc::EBUSY) => {
                tracing::info!(link = %name, "{name} refuses a MAC change while up; cycling it");
                for message in [
                    LinkUnspec::new_with_index(link.index).down().build(),
                    LinkUnspec::new_with_index(link.index)
                        .address(mac.0.to_vec())
                        .mtu(mtu)
                        .up()
                        .build(),
                ] {
                    self.count_write();
                    self.handle
                        .link()
                        .change(message)
                        .execute()
                        .await
                        .map_err(|e| NetlinkError::from_rtnl(op.clone(), e))?;
                }
                Ok(())
            }
            Err(e) => Err(NetlinkError::from_rtnl(op, e)),
        }
    }

    /// The addresses of a link (IPv4 and IPv6, not IPv6 link-local), with their prefix
    /// length.
    pub async fn addresses(&self, link: &str) -> Result<Vec<IpNet>, NetlinkError> {
        let op = format!("list addresses of {link}");
        let index = self.require_index(&op, link).await?;
        Ok(self
            .address_messages(&op, index)
            .await?
            .iter()
            .filter_map(address_of)
            .collect())
    }

    async fn address_messages(
        &self,
        op: &str,
        index: u32,
    ) -> Result<Vec<AddressMessage>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op.to_string(), e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6))
            .collect())
    }

    /// Makes `addrs` the only addresses of `link`: adds the missing ones and removes the
    /// others (the agent owns the link). IPv6 link-local addresses are left alone.
    pub async fn ensure_addresses(
        &self,
        link: &str,
        addrs: &[IpNet],
    ) -> Result<(), NetlinkError> {
        let op = format!("ensure addresses of {link}");
        let index = self.require_index(&op, link).await?;
        let held = self.address_messages(&op, index).await?;
        for msg in &held {
            let Some(addr) = address_of(msg) else {
                continue;
            };
            if addrs.contains(&addr) {
                continue;
            }
            tracing::info!(link, "removing address {addr} from {link}: not wanted");
            self.count_write();
            match self.handle.address().del(msg.clone()).execute().await {
                Ok(()) => {}
                // Removing a primary address also removes its secondaries.
                Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(NetlinkError::from_rtnl(
                        format!("delete address {addr} from {link}"),
                        e,
                    ))
                }
            }
        }
        let present: Vec<IpNet> = held.iter().filter_map(address_of).collect();
        for addr in addrs {
            if present.contains(addr) {
                continue;
            }
            self.count_write();
            self.handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(|e| NetlinkError::from_rtnl(format!("add address {addr} to {link}"), e))?;
        }
        Ok(())
    }

    /// Deletes a link; a missing link is fine.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let op = format!("delete link {name}");
        match self.link_index(name).await? {
            None => Ok(()),
            Some(index) => self.delete_index(&op, name, index).await,
        }
    }

    async fn delete_index(&self, op: &str, name: &str, index: u32) -> Result<(), NetlinkError> {
        self.count_write();
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::info!(link = name, "deleted link {name}");
                Ok(())
            }
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(NetlinkError::from_rtnl(op.to_string(), e)),
        }
    }

    /// Our routes in the main table (both families), and the permanent neighbour and FDB
    /// entries on the VTEPs. `underlay_iface` only serves to name the kind of the routes
    /// on it.
    pub async fn observe(
        &self,
        vteps: &[&str],
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError> {
        let links = self.links().await?;
        let names: HashMap<u32, &str> =
            links.values().map(|l| (l.index, l.name.as_str())).collect();
        let mut state = KernelEntries::default();

        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetlinkError::from_rtnl("list routes", e))?;
            for msg in &routes {
                if let Some(route) = parse_route(msg, &names, vteps, underlay_iface) {
                    state.insert_route(route);
                }
            }
        }

        let vtep_indexes: HashMap<u32, &str> = vteps
            .iter()
            .filter_map(|v| links.get(*v).map(|l| (l.index, *v)))
            .collect();
        if vtep_indexes.is_empty() {
            return Ok(state);
        }

        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let neighbours: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetlinkError::from_rtnl("list neighbours", e))?;
            for msg in &neighbours {
                let Some(vtep_name) = vtep_indexes.get(&msg.header.ifindex) else {
                    continue;
                };
                if !is_permanent(msg.header.state) {
                    continue;
                }
                let ip = msg.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        Some(IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        Some(IpAddr::V6(*ip))
                    }
                    _ => None,
                });
                if let (Some(ip), Some(mac)) = (ip, lladdr_of(msg)) {
                    state.neighbours.insert(Neighbour {
                        dev: vtep_name.to_string(),
                        ip,
                        mac,
                    });
                }
            }
        }

        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list fdb entries", e))?;
        for msg in &fdb {
            let h = &msg.header;
            let Some(vtep_name) = vtep_indexes.get(&h.ifindex) else {
                continue;
            };
            if !h.flags.contains(NeighbourFlags::Own) || !is_permanent(h.state) {
                continue;
            }
            let dst = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    Some(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    Some(IpAddr::V6(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                    Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 16 => {
                    let octets: [u8; 16] = b[..16].try_into().expect("16 bytes");
                    Some(IpAddr::V6(Ipv6Addr::from(octets)))
                }
                _ => None,
            });
            if let (Some(dst), Some(mac)) = (dst, lladdr_of(msg)) {
                state.fdb.insert(FdbEntry {
                    dev: vtep_name.to_string(),
                    mac,
                    dst,
                });
            }
        }
        Ok(state)
    }

    /// Applies operations phase by phase, pipelined over the one socket (see the module
    /// docs), [`super::PIPELINE_DEPTH`] requests at a time. Deleting an entry that is
    /// already gone, or whose device is gone, succeeds.
    pub async fn apply(&self, ops: &[Op]) -> ApplyReport {
        if ops.is_empty() {
            return ApplyReport::default();
        }
        let indexes: Result<HashMap<String, u32>, NetlinkError> = self
            .links()
            .await
            .map(|links| links.into_iter().map(|(n, l)| (n, l.index)).collect());
        let indexes = match indexes {
            Ok(i) => i,
            Err(e) => {
                return ApplyReport {
                    applied: 0,
                    failed: ops.iter().map(|op| (op.clone(), e.clone())).collect(),
                }
            }
        };
        let indexes = &indexes;
        apply_in_phases(ops, |op| self.apply_one(op, indexes.get(op.dev()).copied())).await
    }

    async fn apply_one(&self, op: &Op, index: Option<u32>) -> Result<(), NetlinkError> {
        let Some(index) = index else {
            return if op.is_delete() {
                Ok(())
            } else {
                Err(NetlinkError::NoSuchLink {
                    op: op.to_string(),
                    name: op.dev().to_string(),
                })
            };
        };
        let fail = |e| NetlinkError::from_rtnl(op.to_string(), e);
        // Deleting what is already gone is success: the goal is its absence.
        let gone =
            |e: &rtnetlink::Error| matches!(errno_of(e), Some(libc::ESRCH) | Some(libc::ENOENT));
        self.count_write();
        let result = match op {
            Op::AddRoute(r) | Op::ReplaceRoute(r) => {
                self.handle
                    .route()
                    .add(route_message(r, index))
                    .replace()
                    .execute()
                    .await
            }
            Op::DelRoute(r) => {
                let mut msg = route_message(r, index);
                // Match our route whatever its scope; the protocol keeps others' routes safe.
                msg.header.scope = RouteScope::NoWhere;
                self.handle.route().del(msg).execute().await
            }
            Op::AddNeighbour(n) => {
                self.handle
                    .neighbours()
                    .add(index, n.ip)
                    .link_layer_address(&n.mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Op::DelNeighbour(n) => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = match n.ip {
                    IpAddr::V4(_) => AddressFamily::Inet,
                    IpAddr::V6(_) => AddressFamily::Inet6,
                };
                msg.header.ifindex = index;
                msg.attributes
                    .push(NeighbourAttribute::Destination(neighbour_address(n.ip)));
                self.handle.neighbours().del(msg).execute().await
            }
            Op::AddFdb(f) => {
                self.handle
                    .neighbours()
                    .add_bridge(index, &f.mac.0)
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .destination(f.dst)
                    .replace()
                    .execute()
                    .await
            }
            Op::DelFdb(f) => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                msg.header.ifindex = index;
                msg.header.flags = NeighbourFlags::Own;
                msg.header.state = NeighbourState::Permanent;
                msg.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
                msg.attributes
                    .push(NeighbourAttribute::Destination(neighbour_address(f.dst)));
                self.handle.neighbours().del(msg).execute().await
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if op.is_delete() && gone(&e) => Ok(()),
            Err(e) => Err(fail(e)),
        }
    }

    /// Link events (RTNLGRP_LINK) of this namespace, from the moment this returns. Uses a
    /// socket of its own, opened in the calling thread's network namespace.
    pub fn subscribe_link_changes(&self) -> Result<BoxStream<'static, LinkChange>, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        // The handle is dropped: the connection lives as long as the stream does.
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(|e| NetlinkError::Connect(Arc::new(e)))?;
        runtime.spawn(connection);
        Ok(messages
            .filter_map(
                |(msg, _): (NetlinkMessage<RouteNetlinkMessage>, _)| async move {
                    let (link, deleted) = match msg.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => (l, false),
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => (l, true),
                        _ => return None,
                    };
                    let name = link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some(LinkChange { name, deleted })
                },
            )
            .boxed())
    }
}

fn lladdr_of(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            Some(MacAddr(b[..6].try_into().expect("6 bytes")))
        }
        _ => None,
    })
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

fn route_message(r: &Route, oif: u32) -> RouteMessage {
    let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    match (r.dst, r.via) {
        (IpNet::V6(dst), via) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(oif)
                .protocol(protocol);
            match via {
                IpAddr::V6(g) if !g.is_unspecified() => b = b.gateway(g),
                _ => b = b.scope(RouteScope::Link),
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
        (IpNet::V4(dst), via) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(oif)
                .protocol(protocol);
            match via {
                IpAddr::V4(g) if !g.is_unspecified() => b = b.gateway(g),
                _ => b = b.scope(RouteScope::Link),
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
    }
}

/// A route of ours in the main table, in the project's terms; `None` for anyone else's.
fn parse_route(
    msg: &RouteMessage,
    names: &HashMap<u32, &str>,
    vteps: &[&str],
    underlay_iface: &str,
) -> Option<Route> {
    let h = &msg.header;
    let v6 = match h.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    if h.protocol != RouteProtocol::from(ROUTE_PROTOCOL)
        || h.kind != RouteType::Unicast
    {
        return None;
    }
    if !in_main_table(msg) {
        return None;
    }
    let unspecified = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let mut dst = unspecified;
    let mut via = unspecified;
    let mut dev = String::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = IpAddr::V4(*d),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = IpAddr::V6(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = IpAddr::V4(*g),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => via = IpAddr::V6(*g),
            RouteAttribute::Oif(i) => {
                dev = names
                    .get(i)
                    .map_or_else(|| format!("if{i}"), |n| n.to_string())
            }
            _ => {}
        }
    }
    let dst = IpNet::new(dst, h.destination_prefix_length).ok()?;
    Some(Route {
        dst,
        via,
        kind: infer_route_kind(&dev, vteps, underlay_iface),
        dev,
        onlink: h.flags.contains(RouteFlags::Onlink),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_name_the_operation_and_errno() {
        let e = NetlinkError::Kernel {
            op: "add route 10.244.2.0/24 via 10.244.2.0 dev ovl.1 onlink".into(),
            errno: libc::ENETUNREACH,
        };
        let text = e.to_string();
        assert!(text.starts_with("add route 10.244.2.0/24"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
        assert_eq!(e.errno(), Some(libc::ENETUNREACH));
    }

    #[test]
    fn route_messages_carry_our_protocol_and_onlink() {
        let r = Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "10.244.2.0".parse().unwrap(),
            dev: "ovl.1".into(),
            onlink: true,
            kind: overlay_core::datapath::RouteKind::Vxlan,
        };
        let msg = route_message(&r, 7);
        assert_eq!(msg.header.protocol, RouteProtocol::Other(ROUTE_PROTOCOL));
        assert!(msg.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(msg.header.table, RouteHeader::RT_TABLE_MAIN);
        let names = HashMap::from([(7u32, "ovl.1")]);
        let back = parse_route(&msg, &names, &["ovl.1"], "eth0").unwrap();
        assert_eq!(back, r);
        assert_eq!(back.kind, overlay_core::datapath::RouteKind::Vxlan);
    }
}
