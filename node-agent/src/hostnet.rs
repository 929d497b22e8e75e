//! Finding this host's underlay: the public IP, its interface, that interface's on-link
//! prefix and MTU.
//!
//! Uses getifaddrs(3) and an ioctl rather than /sys: both answer for the network namespace
//! of the calling thread, while /sys shows the namespace it was mounted in, which is wrong
//! for an agent started with `nsenter --net`. No root is needed, so the `alloc` backend
//! runs unprivileged.

use std::ffi::CStr;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub public_ip: Ipv4Addr,
    /// The interface holding the public IP, when there is one.
    pub iface: Option<String>,
    /// The public IP's on-link prefix (e.g. 192.0.2.0/24).
    pub underlay: Option<Ipv4Net>,
    /// The interface's MTU (1500 when unknown).
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("--iface {0}: no such interface, or it has no IPv4 address")]
    NoAddress(String),
    #[error("no default route to pick an interface from: pass --iface or --public-ip")]
    NoDefaultRoute,
    #[error("listing interfaces: {0}")]
    Io(#[from] std::io::Error),
}

/// One IPv4 address of an interface.
#[derive(Debug, Clone)]
struct IfAddr {
    iface: String,
    net: Ipv4Net,
}

fn ipv4_addresses() -> std::io::Result<Vec<IfAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in.
        let (addr, mask) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let m = if ifa.ifa_netmask.is_null() {
                0xffff_ffff
            } else {
                u32::from_be(
                    (*(ifa.ifa_netmask as *const libc::sockaddr_in))
                        .sin_addr
                        .s_addr,
                )
            };
            (Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), m)
        };
        // SAFETY: ifa_name is a NUL-terminated C string.
        let iface = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let net = Ipv4Net::new(addr, mask.leading_ones() as u8).expect("valid prefix");
        out.push(IfAddr { iface, net });
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The MTU of an interface in the current network namespace.
pub fn iface_mtu(iface: &str) -> Option<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket + ioctl on a zeroed ifreq whose name we fill in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in iface.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        libc::close(fd);
        (rc == 0).then_some(req.ifr_ifru.ifru_mtu as u32)
    }
}

/// The interface of the IPv4 default route with the lowest metric, from /proc/net/route
/// (which, like getifaddrs, follows the caller's network namespace).
fn default_route_iface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/net/route").ok()?;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(0), f[0].to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// Works out the host's underlay from the flags: `--public-ip`, else `--iface`, else the
/// default route's interface.
pub fn detect(public_ip: Option<Ipv4Addr>, iface: Option<&str>) -> Result<HostInfo, HostNetError> {
    let addrs = ipv4_addresses()?;
    let found = match (public_ip, iface) {
        (Some(ip), Some(name)) => addrs
            .iter()
            .find(|a| a.iface == name && a.net.addr() == ip)
            .cloned(),
        (Some(ip), None) => addrs.iter().find(|a| a.net.addr() == ip).cloned(),
        (None, Some(name)) => Some(
            addrs
                .iter()
                .find(|a| a.iface == name)
                .cloned()
                .ok_or_else(|| HostNetError::NoAddress(name.into()))?,
        ),
        (None, None) => {
            let name = default_route_iface().ok_or(HostNetError::NoDefaultRoute)?;
            Some(
                addrs
                    .iter()
                    .find(|a| a.iface == name)
                    .cloned()
                    .ok_or(HostNetError::NoAddress(name))?,
            )
        }
    };
    let iface = found
        .as_ref()
        .map(|a| a.iface.clone())
        .or_else(|| iface.map(str::to_string));
    Ok(HostInfo {
        public_ip: public_ip
            .or(found.as_ref().map(|a| a.net.addr()))
            .expect("one of them is set"),
        underlay: found.as_ref().map(|a| a.net.trunc()),
        mtu: iface.as_deref().and_then(iface_mtu).unwrap_or(1500),
        iface,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_address_and_name() {
        let h = detect(Some(Ipv4Addr::LOCALHOST), None).unwrap();
        assert_eq!(h.iface.as_deref(), Some("lo"));
        assert_eq!(h.underlay, Some("127.0.0.0/8".parse().unwrap()));
        assert!(h.mtu >= 1500);
        let h = detect(None, Some("lo")).unwrap();
        assert_eq!(h.public_ip, Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn an_unassigned_public_ip_is_accepted_without_an_interface() {
        let h = detect(Some("192.0.2.77".parse().unwrap()), None).unwrap();
        assert_eq!((h.iface, h.underlay, h.mtu), (None, None, 1500));
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = detect(None, Some("nosuchif0")).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }
}
