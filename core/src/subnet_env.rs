//! `subnet.env`: the agent's word on this host's lease, read by `dockerd --bip` (through
//! `overlayctl docker-opts`), the CNI plugin and operators. One parser for all of them.

use ipnet::Ipv4Net;

use crate::subnet::gateway;

/// The largest `subnet.env` read (it has four short lines).
pub const MAX_SUBNET_ENV_BYTES: usize = 64 * 1024;

/// The contents of `subnet.env`, as read by `dockerd --bip`, the CNI plugin and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        format!(
            "OVERLAY_NETWORK={}\nOVERLAY_SUBNET={}\nOVERLAY_MTU={}\nOVERLAY_IPMASQ={}\n",
            self.network,
            gateway(self.subnet),
            self.mtu,
            self.ip_masq
        )
    }

    /// Parses a `subnet.env`; unknown keys are ignored, missing ones are an error.
    pub fn parse(text: &str) -> Result<SubnetEnv, String> {
        if text.len() > MAX_SUBNET_ENV_BYTES {
            return Err(format!(
                "{} bytes is over the limit of {MAX_SUBNET_ENV_BYTES}",
                text.len()
            ));
        }
        let mut network = None;
        let mut subnet = None;
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
                    network = Some(v.parse::<Ipv4Net>().map_err(|_| bad("a CIDR"))?)
                }
                "OVERLAY_SUBNET" => {
                    subnet = Some(v.parse::<Ipv4Net>().map_err(|_| bad("a CIDR"))?.trunc())
                }
                "OVERLAY_MTU" => mtu = Some(v.parse::<u32>().map_err(|_| bad("a number"))?),
                "OVERLAY_IPMASQ" => {
                    ip_masq = Some(v.parse::<bool>().map_err(|_| bad("true or false"))?)
                }
                _ => {}
            }
        }
        let env = SubnetEnv {
            network: network.ok_or("OVERLAY_NETWORK is missing")?,
            subnet: subnet.ok_or("OVERLAY_SUBNET is missing")?,
            mtu: mtu.ok_or("OVERLAY_MTU is missing")?,
            ip_masq: ip_masq.unwrap_or(false),
        };
        // What the agent can have written, and what ADD can use: a subnet with room for
        // the gateway and a container (a /31 or /32 has none, and its "gateway" is not
        // even inside it), inside the network, and an MTU a link can have.
        if env.subnet.prefix_len() > 30 {
            return Err(format!(
                "OVERLAY_SUBNET={}: a host subnet is at most a /30",
                env.subnet
            ));
        }
        if !env.network.contains(&env.subnet) {
            return Err(format!(
                "OVERLAY_SUBNET={} is outside OVERLAY_NETWORK={}",
                env.subnet, env.network
            ));
        }
        if !(68..=65535).contains(&env.mtu) {
            return Err(format!("OVERLAY_MTU={} is outside 68..=65535", env.mtu));
        }
        Ok(env)
    }
}
