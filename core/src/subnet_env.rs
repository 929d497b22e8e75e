//! `subnet.env`: the agent's word on this host's lease, read by `dockerd --bip` (through
//! `overlayctl docker-opts`), the CNI plugin and operators. One parser for all of them.

use ipnet::{Ipv4Net, Ipv6Net};

use crate::subnet::{gateway, gateway6};

/// The largest `subnet.env` read (it has six short lines).
pub const MAX_SUBNET_ENV_BYTES: usize = 64 * 1024;

/// The contents of `subnet.env`, as read by `dockerd --bip`, the CNI plugin and operators.
///
/// The keys of a family the cluster does not have are absent: an IPv6-only host has no
/// `OVERLAY_NETWORK`/`OVERLAY_SUBNET`, an IPv4-only one no `OVERLAY_IPV6_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let (Some(network), Some(subnet)) = (self.network, self.subnet) {
            out += &format!(
                "OVERLAY_NETWORK={network}\nOVERLAY_SUBNET={}\n",
                gateway(subnet)
            );
        }
        if let (Some(network), Some(subnet)) = (self.ipv6_network, self.ipv6_subnet) {
            out += &format!(
                "OVERLAY_IPV6_NETWORK={network}\nOVERLAY_IPV6_SUBNET={}\n",
                gateway6(subnet)
            );
        }
        out += &format!("OVERLAY_MTU={}\nOVERLAY_IPMASQ={}\n", self.mtu, self.ip_masq);
        out
    }

    /// Parses a `subnet.env`; unknown keys are ignored. Each family needs both of its
    /// keys or neither, and at least one family must be there.
    pub fn parse(text: &str) -> Result<SubnetEnv, String> {
        if text.len() > MAX_SUBNET_ENV_BYTES {
            return Err(format!(
                "{} bytes is over the limit of {MAX_SUBNET_ENV_BYTES}",
                text.len()
            ));
        }
        let mut network = None;
        let mut subnet = None;
        let mut network6 = None;
        let mut subnet6 = None;
        let mut mtu = None;
        let mut ip_masq = None;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not KEY=VALUE"))?;
            let bad = |what: &str| format!("{k}={v}: not {what}");
            match k {
                "OVERLAY_NETWORK" => {
                    network = Some(v.parse::<Ipv4Net>().map_err(|_| bad("an IPv4 CIDR"))?)
                }
                "OVERLAY_SUBNET" => {
                    subnet = Some(v.parse::<Ipv4Net>().map_err(|_| bad("an IPv4 CIDR"))?.trunc())
                }
                "OVERLAY_IPV6_NETWORK" => {
                    network6 = Some(v.parse::<Ipv6Net>().map_err(|_| bad("an IPv6 CIDR"))?)
                }
                "OVERLAY_IPV6_SUBNET" => {
                    subnet6 = Some(v.parse::<Ipv6Net>().map_err(|_| bad("an IPv6 CIDR"))?.trunc())
                }
                "OVERLAY_MTU" => mtu = Some(v.parse::<u32>().map_err(|_| bad("a number"))?),
                "OVERLAY_IPMASQ" => {
                    ip_masq = Some(v.parse::<bool>().map_err(|_| bad("true or false"))?)
                }
                _ => {}
            }
        }
        let pair = |net: &'static str, sub: &'static str, n: bool, s: bool| match (n, s) {
            (true, false) => Err(format!("{net} is set, but {sub} is missing")),
            (false, true) => Err(format!("{sub} is set, but {net} is missing")),
            _ => Ok(()),
        };
        pair("OVERLAY_NETWORK", "OVERLAY_SUBNET", network.is_some(), subnet.is_some())?;
        pair(
            "OVERLAY_IPV6_NETWORK",
            "OVERLAY_IPV6_SUBNET",
            network6.is_some(),
            subnet6.is_some(),
        )?;
        if network.is_none() && network6.is_none() {
            return Err("OVERLAY_NETWORK is missing (and no OVERLAY_IPV6_NETWORK either)".into());
        }
        let env = SubnetEnv {
            network,
            subnet,
            ipv6_network: network6,
            ipv6_subnet: subnet6,
            mtu: mtu.ok_or("OVERLAY_MTU is missing")?,
            ip_masq: ip_masq.unwrap_or(false),
        };
        // What the agent can have written, and what ADD can use: a subnet with room for
        // the gateway and a container (a /31 or /32 has none, and its "gateway" is not
        // even inside it), inside the network, and an MTU a link can have.
        if let (Some(network), Some(subnet)) = (env.network, env.subnet) {
            if subnet.prefix_len() > 30 {
                return Err(format!(
                    "OVERLAY_SUBNET={subnet}: a host subnet is at most a /30"
                ));
            }
            if !network.contains(&subnet) {
                return Err(format!(
                    "OVERLAY_SUBNET={subnet} is outside OVERLAY_NETWORK={network}"
                ));
            }
        }
        if let (Some(network), Some(subnet)) = (env.ipv6_network, env.ipv6_subnet) {
            if subnet.prefix_len() > 126 {
                return Err(format!(
                    "OVERLAY_IPV6_SUBNET={subnet}: a host subnet is at most a /126"
                ));
            }
            if !network.contains(&subnet) {
                return Err(format!(
                    "OVERLAY_IPV6_SUBNET={subnet} is outside OVERLAY_IPV6_NETWORK={network}"
                ));
            }
        }
        // IPv6 needs 1280 on every link.
        let min_mtu = if env.ipv6_subnet.is_some() { 1280 } else { 68 };
        if !(min_mtu..=65535).contains(&env.mtu) {
            return Err(format!("OVERLAY_MTU={} is outside {min_mtu}..=65535", env.mtu));
        }
        Ok(env)
    }
}
