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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use ipnet::{IpNet, Ipv4Net};
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

mod agent;
mod container;

pub use container::{open_netns, LinkRoute, NetnsError};

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
}

/// Whether a route message is of the main table (the table attribute, for tables above
/// 255, wins over the header's byte).
fn in_main_table(msg: &RouteMessage) -> bool {
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(msg.header.table as u32);
    table == RouteHeader::RT_TABLE_MAIN as u32
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
            InfoVxlan::Local(l) => v.local = Some(IpAddr::V4(*l)),
            InfoVxlan::Local6(l) => v.local = Some(IpAddr::V6(*l)),
            InfoVxlan::Link(i) if *i != 0 => v.underlay_ifindex = Some(*i),
            InfoVxlan::Learning(l) => v.learning = *l,
            _ => {}
        }
    }
    v
}

/// The address of a message, IPv4 or IPv6; `None` for an IPv6 link-local address (the
/// kernel makes those per link by itself: never ours to manage).
fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    // point-to-point links, so prefer the former.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let addr = local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    if let IpAddr::V6(v6) = addr {
        if (v6.segments()[0] & 0xffc0) == 0xfe80 {
            return None;
        }
    }
    IpNet::new(addr, msg.header.prefix_len).ok()
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

    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>, NetlinkError> {
        Netlink::addresses(self, link).await
    }

    async fn ensure_bridge(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<u32, NetlinkError> {
        Netlink::ensure_bridge(self, name, mac, mtu).await
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        Netlink::ensure_vxlan(self, spec).await
    }

    async fn ensure_addresses(&self, link: &str, addrs: &[IpNet]) -> Result<(), NetlinkError> {
        Netlink::ensure_addresses(self, link, addrs).await
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        Netlink::delete_link(self, name).await
    }

    async fn observe(
        &self,
        vteps: &[&str],
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError> {
        Netlink::observe(self, vteps, underlay_iface).await
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
