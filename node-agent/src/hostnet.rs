//! Finding this host's underlay: the public IPv4 and IPv6 addresses, their interface,
//! that interface's on-link prefixes and MTU.
//!
//! Uses getifaddrs(3) and an ioctl rather than /sys: both answer for the network namespace
//! of the calling thread, while /sys shows the namespace it was mounted in, which is wrong
//! for an agent started with `nsenter --net`. No root is needed, so the `alloc` backend
//! runs unprivileged.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// The public IPv4 address, when the host has one.
    pub public_ip: Option<Ipv4Addr>,
    /// The public IPv6 address, when the host has one.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The interface holding the public addresses, when there is one.
    pub iface: Option<String>,
    /// The public IPv4 address's on-link prefix (e.g. 192.0.2.0/24).
    pub underlay: Option<Ipv4Net>,
    /// The public IPv6 address's on-link prefix (e.g. 2001:db8::/64).
    pub underlay_v6: Option<Ipv6Net>,
    /// The interface's MTU (1500 when unknown).
    pub mtu: u32,
    /// Which public addresses were given by flag (IPv4, IPv6) rather than detected.
    pub given: (bool, bool),
}

impl HostInfo {
    /// The public addresses as people read them ("192.0.2.11, 2001:db8::11").
    pub fn public_text(&self) -> String {
        [self.public_ip.map(IpAddr::V4), self.public_ipv6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Keeps only the public addresses the cluster's families use: a detected (not
    /// configured) address of a family the cluster lacks is dropped, so that an IPv4
    /// cluster on a dual-stack host publishes and programs exactly what it did before.
    /// An address given by flag is always kept, and so is the last one left.
    pub fn for_families(mut self, has_v4: bool, has_v6: bool) -> Self {
        let given = self.given;
        if !has_v6 && !given.1 && self.public_ip.is_some() {
            self.public_ipv6 = None;
            self.underlay_v6 = None;
        }
        if !has_v4 && !given.0 && self.public_ipv6.is_some() {
            self.public_ip = None;
            self.underlay = None;
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("--iface {0}: no such interface, or it has no IPv4 or global IPv6 address")]
    NoAddress(String),
    #[error("no default route to pick an interface from: pass --iface, --public-ip or --public-ipv6")]
    NoDefaultRoute,
    #[error("listing interfaces: {0}")]
    Io(#[from] std::io::Error),
}

/// One address of an interface.
#[derive(Debug, Clone)]
struct IfAddr {
    iface: String,
    net: IpNet,
}

/// Whether an IPv6 address can be a public address: not link-local, loopback or
/// unspecified.
fn is_global_v6(ip: &Ipv6Addr) -> bool {
    !(ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80)
}

fn addresses() -> std::io::Result<Vec<IfAddr>> {
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
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let net = match family {
            libc::AF_INET => {
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
                IpNet::V4(Ipv4Net::new(addr, mask.leading_ones() as u8).expect("valid prefix"))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let (addr, mask) = unsafe {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = if ifa.ifa_netmask.is_null() {
                        u128::MAX
                    } else {
                        u128::from_be_bytes(
                            (*(ifa.ifa_netmask as *const libc::sockaddr_in6))
                                .sin6_addr
                                .s6_addr,
                        )
                    };
                    (Ipv6Addr::from(a.sin6_addr.s6_addr), m)
                };
                if !is_global_v6(&addr) {
                    continue;
                }
                IpNet::V6(Ipv6Net::new(addr, mask.leading_ones() as u8).expect("valid prefix"))
            }
            _ => continue,
        };
        // SAFETY: ifa_name is a NUL-terminated C string.
        let iface = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
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

/// The interface of the default route with the lowest metric, IPv4 first, from
/// /proc/net/route and /proc/net/ipv6_route (which, like getifaddrs, follow the caller's
/// network namespace).
fn default_route_iface() -> Option<String> {
    let v4 = std::fs::read_to_string("/proc/self/net/route")
        .ok()
        .and_then(|text| {
            text.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
                        .then(|| (f[6].parse::<u32>().unwrap_or(0), f[0].to_string()))
                })
                .min()
                .map(|(_, iface)| iface)
        });
    v4.or_else(|| {
        let text = std::fs::read_to_string("/proc/self/net/ipv6_route").ok()?;
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 10 && f[0] == "0".repeat(32) && f[1] == "00" && f[9] != "lo")
                    .then(|| (u32::from_str_radix(f[5], 16).unwrap_or(0), f[9].to_string()))
            })
            .min()
            .map(|(_, iface)| iface)
    })
}

/// Works out the host's underlay from the flags: `--public-ip` and `--public-ipv6`, else
/// `--iface`, else the default route's interface. The interface is the one holding a given
/// address (or named); the other family's address is the interface's first one of it.
pub fn detect(
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    iface: Option<&str>,
) -> Result<HostInfo, HostNetError> {
    let addrs = addresses()?;
    let holding = |ip: IpAddr| {
        addrs
            .iter()
            .find(|a| a.net.addr() == ip && iface.is_none_or(|n| a.iface == n))
            .map(|a| a.iface.clone())
    };
    let name = match (public_ip, public_ipv6, iface) {
        (Some(ip), _, _) if holding(IpAddr::V4(ip)).is_some() => holding(IpAddr::V4(ip)),
        (_, Some(ip), _) if holding(IpAddr::V6(ip)).is_some() => holding(IpAddr::V6(ip)),
        (_, _, Some(name)) => {
            if !addrs.iter().any(|a| a.iface == name) && public_ip.is_none() && public_ipv6.is_none() {
                return Err(HostNetError::NoAddress(name.into()));
            }
            Some(name.to_string())
        }
        (None, None, None) => {
            let name = default_route_iface().ok_or(HostNetError::NoDefaultRoute)?;
            if !addrs.iter().any(|a| a.iface == name) {
                return Err(HostNetError::NoAddress(name));
            }
            Some(name)
        }
        // An address no interface holds (e.g. a NAT's): accepted, without an interface.
        _ => None,
    };
    let on_iface = |v6: bool| {
        name.as_ref().and_then(|n| {
            addrs
                .iter()
                .find(|a| &a.iface == n && a.net.addr().is_ipv6() == v6)
        })
    };
    let find = |ip: IpAddr| {
        addrs
            .iter()
            .find(|a| a.net.addr() == ip && name.as_ref().is_none_or(|n| &a.iface == n))
    };
    let (ip4, net4) = match public_ip {
        Some(ip) => (Some(ip), find(IpAddr::V4(ip)).map(|a| a.net.trunc())),
        None => match on_iface(false) {
            Some(a) => (
                match a.net.addr() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                },
                Some(a.net.trunc()),
            ),
            None => (None, None),
        },
    };
    let (ip6, net6) = match public_ipv6 {
        Some(ip) => (Some(ip), find(IpAddr::V6(ip)).map(|a| a.net.trunc())),
        None => match on_iface(true) {
            Some(a) => (
                match a.net.addr() {
                    IpAddr::V6(ip) => Some(ip),
                    IpAddr::V4(_) => None,
                },
                Some(a.net.trunc()),
            ),
            None => (None, None),
        },
    };
    if ip4.is_none() && ip6.is_none() {
        return Err(HostNetError::NoAddress(name.unwrap_or_default()));
    }
    Ok(HostInfo {
        public_ip: ip4,
        public_ipv6: ip6,
        underlay: net4.and_then(|n| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }),
        underlay_v6: net6.and_then(|n| match n {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }),
        mtu: name.as_deref().and_then(iface_mtu).unwrap_or(1500),
        iface: name,
        given: (public_ip.is_some(), public_ipv6.is_some()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_address_and_name() {
        let h = detect(Some(Ipv4Addr::LOCALHOST), None, None).unwrap();
        assert_eq!(h.iface.as_deref(), Some("lo"));
        assert_eq!(h.underlay, Some("127.0.0.0/8".parse().unwrap()));
        assert!(h.mtu >= 1500);
        let h = detect(None, None, Some("lo")).unwrap();
        assert_eq!(h.public_ip, Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn an_unassigned_public_ip_is_accepted_without_an_interface() {
        let h = detect(Some("192.0.2.77".parse().unwrap()), None, None).unwrap();
        assert_eq!((h.iface, h.underlay, h.mtu), (None, None, 1500));
        let h = detect(None, Some("2001:db8::77".parse().unwrap()), None).unwrap();
        assert_eq!(h.public_ipv6, Some("2001:db8::77".parse().unwrap()));
        assert_eq!((h.public_ip, h.underlay_v6), (None, None));
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = detect(None, None, Some("nosuchif0")).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }
}
