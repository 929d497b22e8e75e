//! The netlink boundary: the only module that talks rtnetlink.
//!
//! It speaks the project's types ([`Route`], [`Neighbour`], [`FdbEntry`], [`Op`]) and hides
//! rtnetlink's message building, so the rest of the agent never depends on that crate's
//! naming (which changes between releases: NTF_SELF is `NeighbourFlags::Own` in 0.24).
//!
//! Design choices:
//! - One socket per [`Netlink`], opened in the network namespace of the thread that calls
//!   [`Netlink::connect`] (the connection task runs on the current tokio runtime). Tests
//!   rely on this: each runs in a thread that unshared its own namespace.
//! - Ownership markers instead of bookkeeping files: every route we make carries
//!   [`ROUTE_PROTOCOL`], so [`Netlink::observe`] can list exactly our routes after a
//!   restart, and a route made by someone else is never touched. Neighbours and FDB
//!   entries are only read from the VTEP, a device we own.
//! - Idempotent writes: additions use NLM_F_REPLACE (rtnetlink's plain add is NLM_F_EXCL and
//!   fails with EEXIST), deletions of an entry that is already gone succeed, so a retried or
//!   repeated apply is harmless.
//! - Pipelining: [`Netlink::apply`] keeps up to [`super::PIPELINE_DEPTH`] requests in flight on
//!   the one socket instead of one blocking round trip per entry; programming a thousand
//!   peers is a few dozen round trips of latency, not three thousand.
//! - "Ensure" methods read before they write and write nothing when the kernel matches;
//!   [`Netlink::writes`] counts every write request so the agent can prove it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use overlay_core::datapath::{FdbEntry, KernelEntries, Neighbour, Op, Route};
use overlay_core::MacAddr;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, MulticastGroup, RouteMessageBuilder};

use super::{
    apply_in_phases, infer_route_kind, ApplyReport, Datapath, LinkChange, LinkInfo, VxlanInfo,
    VxlanSpec,
};

/// The route protocol (`ip route ... proto 79`) that marks a route as the agent's own.
/// Unassigned in iproute2's rt_protos; Calico uses 80, BIRD 12, Flannel none.
pub const ROUTE_PROTOCOL: u8 = 79;

/// Whether a neighbour state includes NUD_PERMANENT: ours are plain PERMANENT, while
/// `bridge fdb add ... permanent` makes PERMANENT|NOARP. The VTEP is ours, so every
/// permanent entry on it is ours to keep or remove.
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & 0x80 != 0
}

/// A failed datapath operation. Every variant names the operation and its entry or device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] Arc<std::io::Error>),
    #[error("netlink needs a tokio runtime on the calling thread to drive its socket")]
    NoRuntime,
    /// The kernel refused the request.
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    /// The request never got a kernel answer, or the answer could not be decoded.
    #[error("{op}: {detail}")]
    Protocol { op: String, detail: String },
    #[error("{op}: link {name} does not exist")]
    NoSuchLink { op: String, name: String },
    #[error("{op}: not attempted because \"{dependency}\" failed")]
    DependencyFailed { op: String, dependency: String },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Connect(source) => source.raw_os_error(),
            _ => None,
        }
    }

    fn from_rtnl(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        let op = op.into();
        match e {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => NetlinkError::Kernel {
                    op,
                    errno: -code.get(),
                },
                None => NetlinkError::Protocol {
                    op,
                    detail: "the kernel answered with an empty error".into(),
                },
            },
            other => NetlinkError::Protocol {
                op,
                detail: other.to_string(),
            },
        }
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// An rtnetlink connection in the network namespace it was opened in.
pub struct Netlink {
    handle: Handle,
    writes: AtomicU64,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace and spawns its connection
    /// task on the current tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        // Unsolicited messages are not wanted here (subscriptions use their own socket);
        // dropping the receiver lets the connection end when the last handle goes.
        let (connection, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(|e| NetlinkError::Connect(Arc::new(e)))?;
        runtime.spawn(connection);
        Ok(Netlink {
            handle,
            writes: AtomicU64::new(0),
        })
    }

    /// Kernel write requests issued so far (successful or not).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// The index of a link; a missing link is `Ok(None)`.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link_info(name).await?.map(|l| l.index))
    }

    /// A link's details; a missing link is `Ok(None)`.
    pub async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut answers = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match answers.try_next().await {
            Ok(Some(msg)) => Ok(Some(parse_link(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::from_rtnl(format!("look up link {name}"), e)),
        }
    }

    /// Every link of the namespace, by name.
    pub async fn links(&self) -> Result<HashMap<String, LinkInfo>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list links", e))?;
        Ok(msgs
            .iter()
            .map(parse_link)
            .map(|l| (l.name.clone(), l))
            .collect())
    }

    async fn require_index(&self, op: &str, name: &str) -> Result<u32, NetlinkError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink {
                op: op.to_string(),
                name: name.to_string(),
            })
    }

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
        let message = LinkVxlan::new(name, spec.vni)
            .dev(spec.underlay_ifindex)
            .port(spec.port)
            .local(spec.local)
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

    /// The IPv4 addresses of a link, with their prefix length.
    pub async fn addresses(&self, link: &str) -> Result<Vec<Ipv4Net>, NetlinkError> {
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
            .filter(|m| m.header.family == AddressFamily::Inet)
            .collect())
    }

    /// Makes `addrs` the only IPv4 addresses of `link`: adds the missing ones and removes
    /// the others (the agent owns the link). IPv6 addresses are left alone.
    pub async fn ensure_addresses(
        &self,
        link: &str,
        addrs: &[Ipv4Net],
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
        let present: Vec<Ipv4Net> = held.iter().filter_map(address_of).collect();
        for addr in addrs {
            if present.contains(addr) {
                continue;
            }
            self.count_write();
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
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

    /// Our routes in the main table, and the permanent neighbour and FDB entries on the
    /// VTEP. `underlay_iface` only serves to name the kind of the routes on it.
    pub async fn observe(
        &self,
        vtep: Option<&str>,
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError> {
        let links = self.links().await?;
        let names: HashMap<u32, &str> =
            links.values().map(|l| (l.index, l.name.as_str())).collect();
        let mut state = KernelEntries::default();

        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list routes", e))?;
        for msg in &routes {
            if let Some(route) = parse_route(msg, &names, vtep, underlay_iface) {
                state.insert_route(route);
            }
        }

        let Some((vtep_name, vtep_index)) = vtep.and_then(|v| links.get(v).map(|l| (v, l.index)))
        else {
            return Ok(state);
        };

        let neighbours: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl("list neighbours", e))?;
        for msg in &neighbours {
            if msg.header.ifindex != vtep_index || !is_permanent(msg.header.state) {
                continue;
            }
            let ip = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
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
            if h.ifindex != vtep_index
                || !h.flags.contains(NeighbourFlags::Own)
                || !is_permanent(h.state)
            {
                continue;
            }
            let dst = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
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
                    .add(index, IpAddr::V4(n.ip))
                    .link_layer_address(&n.mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Op::DelNeighbour(n) => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Inet;
                msg.header.ifindex = index;
                msg.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        n.ip,
                    )));
                self.handle.neighbours().del(msg).execute().await
            }
            Op::AddFdb(f) => {
                self.handle
                    .neighbours()
                    .add_bridge(index, &f.mac.0)
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .destination(IpAddr::V4(f.dst))
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
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        f.dst,
                    )));
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

fn parse_link(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => {
                info.mac = Some(MacAddr(a[..6].try_into().expect("6 bytes")))
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(kind_name(k)),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => info.vxlan = Some(parse_vxlan(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(s) => s.clone(),
        k => k.to_string(),
    }
}

fn parse_vxlan(attrs: &[InfoVxlan]) -> VxlanInfo {
    let mut v = VxlanInfo {
        vni: 0,
        port: 0,
        local: None,
        underlay_ifindex: None,
        learning: false,
    };
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = *id,
            InfoVxlan::Port(p) => v.port = *p,
            InfoVxlan::Local(l) => v.local = Some(*l),
            InfoVxlan::Link(i) if *i != 0 => v.underlay_ifindex = Some(*i),
            InfoVxlan::Learning(l) => v.learning = *l,
            _ => {}
        }
    }
    v
}

fn address_of(msg: &AddressMessage) -> Option<Ipv4Net> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    // point-to-point links, so prefer the former.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let addr = local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
    })?;
    Ipv4Net::new(addr, msg.header.prefix_len).ok()
}

fn lladdr_of(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            Some(MacAddr(b[..6].try_into().expect("6 bytes")))
        }
        _ => None,
    })
}

fn route_message(r: &Route, oif: u32) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .output_interface(oif)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if !r.via.is_unspecified() {
        builder = builder.gateway(r.via);
    } else {
        builder = builder.scope(RouteScope::Link);
    }
    if r.onlink {
        builder = builder.onlink();
    }
    builder.build()
}

/// A route of ours in the main table, in the project's terms; `None` for anyone else's.
fn parse_route(
    msg: &RouteMessage,
    names: &HashMap<u32, &str>,
    vtep: Option<&str>,
    underlay_iface: &str,
) -> Option<Route> {
    let h = &msg.header;
    if h.address_family != AddressFamily::Inet
        || h.protocol != RouteProtocol::from(ROUTE_PROTOCOL)
        || h.kind != RouteType::Unicast
    {
        return None;
    }
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(h.table as u32);
    if table != RouteHeader::RT_TABLE_MAIN as u32 {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut via = Ipv4Addr::UNSPECIFIED;
    let mut dev = String::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = *g,
            RouteAttribute::Oif(i) => {
                dev = names
                    .get(i)
                    .map_or_else(|| format!("if{i}"), |n| n.to_string())
            }
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst, h.destination_prefix_length).ok()?;
    Some(Route {
        dst,
        via,
        kind: infer_route_kind(&dev, vtep, underlay_iface),
        dev,
        onlink: h.flags.contains(RouteFlags::Onlink),
    })
}

#[async_trait]
impl Datapath for Netlink {
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Netlink::link_index(self, name).await
    }

    async fn link_names(&self) -> Result<Vec<String>, NetlinkError> {
        let mut names: Vec<String> = self.links().await?.into_keys().collect();
        names.sort();
        Ok(names)
    }

    async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        Netlink::link_info(self, name).await
    }

    async fn addresses(&self, link: &str) -> Result<Vec<Ipv4Net>, NetlinkError> {
        Netlink::addresses(self, link).await
    }

    async fn ensure_bridge(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<u32, NetlinkError> {
        Netlink::ensure_bridge(self, name, mac, mtu).await
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        Netlink::ensure_vxlan(self, spec).await
    }

    async fn ensure_addresses(&self, link: &str, addrs: &[Ipv4Net]) -> Result<(), NetlinkError> {
        Netlink::ensure_addresses(self, link, addrs).await
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        Netlink::delete_link(self, name).await
    }

    async fn observe(
        &self,
        vtep: Option<&str>,
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError> {
        Netlink::observe(self, vtep, underlay_iface).await
    }

    async fn apply(&self, ops: &[Op]) -> ApplyReport {
        Netlink::apply(self, ops).await
    }

    fn subscribe_link_changes(&self) -> Result<BoxStream<'static, LinkChange>, NetlinkError> {
        Netlink::subscribe_link_changes(self)
    }

    fn writes(&self) -> u64 {
        Netlink::writes(self)
    }
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
        let back = parse_route(&msg, &names, Some("ovl.1"), "eth0").unwrap();
        assert_eq!(back, r);
        assert_eq!(back.kind, overlay_core::datapath::RouteKind::Vxlan);
    }
}

// ---- CNI: veth and container-namespace operations ----
//
// Used by the CNI plugin (`crate::cni`). A container's namespace is reached through a
// netlink socket opened inside it ([`Netlink::connect_in_netns`]): a socket stays in the
// namespace it was created in, so the calling thread only visits the container namespace
// for the instant of the socket() call and every later request, from any thread, lands
// in the container. The veth's container end is created directly inside the container
// namespace (IFLA_NET_NS_FD on the peer), so its final name (often "eth0") never has to
// be free in the host namespace, and there is no window where it exists on the host.

/// Why a path cannot be used as a container's network namespace ([`open_netns`]).
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path cannot be opened (ENOENT: no such namespace).
    #[error("cannot open it: {0}")]
    Open(std::io::Error),
    /// Something else than a network namespace: a regular file, a FIFO, a device, a
    /// directory, another kind of namespace.
    #[error("it is not a network namespace ({0})")]
    NotNetns(String),
    /// The namespace this process runs in (the host's, for a plugin): plumbing a
    /// "container" there would rewrite the host's own interfaces and default route.
    #[error("it is this process's own network namespace, not a container's")]
    Own,
}

/// Opens a network namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) for
/// [`Netlink::connect_in_netns`] and [`Netlink::add_veth_into_netns`], after proving it
/// is one and is not the caller's own. The open never blocks (O_NONBLOCK: a FIFO or a
/// device under that name answers at once) and never leaks into children (O_CLOEXEC);
/// then the open file must live on nsfs (statfs NSFS_MAGIC), be a network namespace
/// (ioctl NS_GET_NSTYPE), and differ (st_dev, st_ino) from /proc/self/ns/net and
/// /proc/thread-self/ns/net.
pub fn open_netns(path: &std::path::Path) -> Result<std::fs::File, NetnsError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(NetnsError::Open)?;
    let fd = file.as_raw_fd();
    // SAFETY: fstatfs writes only into the zeroed struct we own; `file` keeps fd open.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return Err(NetnsError::Open(std::io::Error::last_os_error()));
    }
    // The types of f_type and NSFS_MAGIC differ between libcs and architectures.
    #[allow(clippy::unnecessary_cast)]
    let on_nsfs = fs.f_type as i64 == libc::NSFS_MAGIC as i64;
    if !on_nsfs {
        let kind = match file.metadata() {
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                let t = m.file_type();
                if t.is_fifo() {
                    "a FIFO"
                } else if t.is_dir() {
                    "a directory"
                } else if t.is_char_device() || t.is_block_device() {
                    "a device"
                } else if t.is_socket() {
                    "a socket"
                } else {
                    "a plain file"
                }
            }
            Err(_) => "not on nsfs",
        };
        return Err(NetnsError::NotNetns(kind.into()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor.
    let nstype = unsafe { libc::ioctl(fd, libc::NS_GET_NSTYPE) };
    if nstype < 0 {
        return Err(NetnsError::NotNetns(format!(
            "NS_GET_NSTYPE failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    if nstype != libc::CLONE_NEWNET {
        return Err(NetnsError::NotNetns(format!(
            "a namespace of another kind (type {nstype:#x})"
        )));
    }
    let this = file.metadata().map_err(NetnsError::Open)?;
    for own in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
        if let Ok(m) = std::fs::metadata(own) {
            if (m.dev(), m.ino()) == (this.dev(), this.ino()) {
                return Err(NetnsError::Own);
            }
        }
    }
    Ok(file)
}

/// Moves the calling thread into the network namespace of `ns` (setns(2)).
fn enter_netns(ns: &std::fs::File, what: &str) -> Result<(), NetlinkError> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns only reads the descriptor, which `ns` keeps open for the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(NetlinkError::Kernel {
            op: format!("enter network namespace {what}"),
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        })
    }
}

/// An IPv4 route of the main table, as [`Netlink::routes_of`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRoute {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

impl Netlink {
    /// Opens a socket inside the network namespace `ns` (see the section notes above): the
    /// calling thread enters `ns`, opens the socket and returns to its own namespace
    /// before this returns. A file that is not a network namespace fails with EINVAL.
    pub fn connect_in_netns(ns: &std::fs::File) -> Result<Netlink, NetlinkError> {
        let own =
            std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| NetlinkError::Kernel {
                op: "open this thread's network namespace".into(),
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            })?;
        enter_netns(ns, "of the container")?;
        let connected = Netlink::connect();
        // Staying in the container namespace would make every later socket and command
        // of this thread act on the container: better to stop than to go on.
        if let Err(e) = enter_netns(&own, "of the caller (going back)") {
            panic!("cannot return to the caller's network namespace: {e}");
        }
        connected
    }

    /// Creates a veth pair: `host_name` in this namespace, attached to the bridge with
    /// index `bridge_index` and up; its peer `peer_name` directly inside the namespace
    /// `netns` (down, no address). Both ends get `mtu`. Returns the host end's index.
    /// Fails with EEXIST when either name is taken.
    pub async fn add_veth_into_netns(
        &self,
        host_name: &str,
        peer_name: &str,
        netns: &std::fs::File,
        mtu: u32,
        bridge_index: u32,
    ) -> Result<u32, NetlinkError> {
        use rtnetlink::packet_route::link::InfoVeth;
        use std::os::fd::AsRawFd;
        let op = format!("create veth {host_name} with peer {peer_name} in the container");
        let peer = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let message = rtnetlink::LinkVeth::new(host_name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(mtu)
            .controller(bridge_index)
            .up()
            .build();
        self.count_write();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op.clone(), e))?;
        self.require_index(&op, host_name).await
    }

    /// Turns hairpin mode of bridge port `link` on or off: with it on, the bridge may
    /// send a frame back out of the port it came in on, which a container needs to reach
    /// its own published port through the host's address when br_netfilter DNATs the
    /// frame on the bridge.
    pub async fn set_bridge_port_hairpin(&self, link: &str, on: bool) -> Result<(), NetlinkError> {
        let op = format!(
            "set hairpin {} on bridge port {link}",
            if on { "on" } else { "off" }
        );
        let index = self.require_index(&op, link).await?;
        self.count_write();
        self.handle
            .link()
            .set_port(rtnetlink::LinkBridgePort::new(index).hairpin(on).build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op, e))
    }

    /// The index of the device (a bridge) that `link` is a port of; `Ok(None)` when it
    /// is no port. A missing link is [`NetlinkError::NoSuchLink`].
    pub async fn link_controller(&self, link: &str) -> Result<Option<u32>, NetlinkError> {
        let op = format!("look up the controller of {link}");
        let mut answers = self
            .handle
            .link()
            .get()
            .match_name(link.to_string())
            .execute();
        let msg = match answers.try_next().await {
            Ok(Some(msg)) => Some(msg),
            Ok(None) => None,
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => None,
            Err(e) => return Err(NetlinkError::from_rtnl(op, e)),
        };
        let msg = msg.ok_or_else(|| NetlinkError::NoSuchLink {
            op,
            name: link.to_string(),
        })?;
        Ok(msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(i) if *i != 0 => Some(*i),
            _ => None,
        }))
    }

    /// Adds `addr` to `link`, or leaves it as is when `link` has it already.
    pub async fn add_address(&self, link: &str, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let op = format!("add address {addr} to {link}");
        let index = self.require_index(&op, link).await?;
        self.count_write();
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op, e))
    }

    /// Sets `link` administratively up (and `mtu`, when given).
    pub async fn set_link_up(&self, link: &str, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let op = format!("set {link} up");
        let index = self.require_index(&op, link).await?;
        let mut message = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            message = message.mtu(mtu);
        }
        self.count_write();
        self.handle
            .link()
            .change(message.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op, e))
    }

    /// Makes the default route of the main table go through `gateway` on `link`
    /// (replacing any default route there was). `link` must be up and hold an address
    /// of `gateway`'s subnet, or the kernel answers ENETUNREACH / ENETDOWN.
    pub async fn replace_default_route(
        &self,
        link: &str,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let op = format!("add default route via {gateway} dev {link}");
        let index = self.require_index(&op, link).await?;
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .build();
        self.count_write();
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op, e))
    }

    /// The IPv4 unicast routes of the main table that leave through `link`.
    pub async fn routes_of(&self, link: &str) -> Result<Vec<LinkRoute>, NetlinkError> {
        let op = format!("list routes of {link}");
        let index = self.require_index(&op, link).await?;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnl(op, e))?;
        let mut routes = Vec::new();
        for msg in &msgs {
            let h = &msg.header;
            if h.address_family != AddressFamily::Inet || h.kind != RouteType::Unicast {
                continue;
            }
            let table = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(h.table as u32);
            if table != RouteHeader::RT_TABLE_MAIN as u32 {
                continue;
            }
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gateway = None;
            let mut oif = None;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif != Some(index) {
                continue;
            }
            if let Ok(dst) = Ipv4Net::new(dst, h.destination_prefix_length) {
                routes.push(LinkRoute { dst, gateway });
            }
        }
        Ok(routes)
    }
}
