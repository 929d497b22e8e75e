//! Container plumbing for the CNI plugin: opening and checking a container's network
//! namespace, a netlink socket inside it, the veth pair, and the container's address and
//! default route.

use super::*;

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
/// is one and is not the caller's own. It is first opened O_PATH (no side effect, whatever
/// the file is, and never blocking) and must live on nsfs before it is opened for real,
/// through that descriptor; never leaking into children (O_CLOEXEC). The file must live on nsfs (statfs NSFS_MAGIC), be a network namespace
/// (ioctl NS_GET_NSTYPE), and differ (st_dev, st_ino) from /proc/self/ns/net and
/// /proc/thread-self/ns/net.
pub fn open_netns(path: &std::path::Path) -> Result<std::fs::File, NetnsError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // O_PATH first: opening a path for reading can have side effects (a device such as
    // /dev/watchdog starts on open), an O_PATH descriptor has none and is enough to ask
    // which filesystem the file is on.
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(NetnsError::Open)?;
    let fd = probe.as_raw_fd();
    // SAFETY: fstatfs writes only into the zeroed struct we own; `file` keeps fd open.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return Err(NetnsError::Open(std::io::Error::last_os_error()));
    }
    // The types of f_type and NSFS_MAGIC differ between libcs and architectures.
    #[allow(clippy::unnecessary_cast)]
    let on_nsfs = fs.f_type as i64 == libc::NSFS_MAGIC as i64;
    if !on_nsfs {
        let kind = match probe.metadata() {
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
    // Only now, on nsfs, a real descriptor (for the ioctl and setns), of the very file
    // checked: reopened through the O_PATH descriptor, not the path.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(NetnsError::Open)?;
    drop(probe);
    let fd = file.as_raw_fd();
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
    use std::os::fd::AsFd;
    overlay_common::netns::enter(ns.as_fd()).map_err(|e| NetlinkError::Kernel {
        op: format!("enter network namespace {what}"),
        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
    })
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
            if !in_main_table(msg) {
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
