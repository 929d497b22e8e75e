//! `overlayctl lease reserve` and `overlayctl lease revoke`.
//!
//! Arguments are parsed by clap value parsers, so a bad subnet, node name or address is a
//! usage error naming its flag, reported before any connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::anyhow;
use clap::Subcommand;
use ipnet::{IpNet, Ipv6Net};
use overlay_core::lease::{validate_node_name, validate_public_ip, validate_public_ipv6};
use overlay_proto::v1;

use crate::client::{self, ControllerUrls};
use crate::output::{self, lease_json, Format};

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Reserve a subnet for a node: the node gets it whenever it asks, and it never expires
    #[command(group(clap::ArgGroup::new("address").required(true).multiple(true).args(["public_ip", "public_ipv6"])))]
    Reserve {
        /// The subnet to reserve, e.g. 10.244.7.0/24 (in an IPv6-only cluster an IPv6
        /// subnet, e.g. fd00:10:244:7::/64)
        #[arg(long, value_name = "CIDR", value_parser = parse_subnet)]
        subnet: IpNet,
        /// Dual stack: the IPv6 subnet reserved with it, e.g. fd00:10:244:7::/64
        #[arg(long, value_name = "CIDR", value_parser = parse_ipv6_subnet)]
        ipv6_subnet: Option<Ipv6Net>,
        /// The node the subnet is for
        #[arg(long, value_name = "NAME", value_parser = parse_node)]
        node: String,
        /// The node's public (underlay) IPv4 address
        #[arg(long, value_name = "IP", value_parser = parse_public_ip)]
        public_ip: Option<Ipv4Addr>,
        /// The node's public (underlay) IPv6 address
        #[arg(long, value_name = "IP", value_parser = parse_public_ipv6)]
        public_ipv6: Option<Ipv6Addr>,
    },
    /// Delete a lease or reservation at once
    Revoke {
        /// The key subnet of the lease, e.g. 10.244.7.0/24
        #[arg(value_name = "SUBNET", value_parser = parse_subnet)]
        subnet: IpNet,
    },
}

pub async fn run(
    command: LeaseCommand,
    controllers: &ControllerUrls,
    format: Format,
) -> anyhow::Result<()> {
    let ctl = client::connect(controllers).await?;
    match command {
        LeaseCommand::Reserve {
            subnet,
            ipv6_subnet,
            node,
            public_ip,
            public_ipv6,
        } => {
            let response = ctl
                .call(ctl.admin().reserve_subnet(v1::ReserveSubnetRequest {
                    subnet: subnet.to_string(),
                    node,
                    public_ip: public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    ipv6_subnet: ipv6_subnet.map(|s| s.to_string()),
                    public_ipv6: public_ipv6.map(|ip| ip.to_string()),

                }))
                .await?;
            let lease = response
                .lease
                .ok_or_else(|| anyhow!("the controller answered without the lease"))?;
            let lease = overlay_proto::lease_from_proto(&lease)
                .map_err(|e| anyhow!("the controller sent an invalid lease: {e}"))?;
            match format {
                Format::Table => output::print(&format!(
                    "reserved {} for node {} ({})\n",
                    lease.subnets_text(),
                    output::escape(&lease.record.node),
                    lease.public_text()
                ))?,
                Format::Json => output::print(&output::json_pretty(&lease_json(&lease, None)))?,
            }
        }
        LeaseCommand::Revoke { subnet } => {
            ctl.call(ctl.admin().revoke_lease(v1::RevokeLeaseRequest {
                subnet: subnet.to_string(),
            }))
            .await?;
            match format {
                Format::Table => output::print(&format!("revoked {subnet}\n"))?,
                Format::Json => output::print(&output::json_pretty(
                    &serde_json::json!({ "revoked": subnet.to_string() }),
                ))?,
            }
        }
    }
    Ok(())
}

pub fn parse_subnet(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR"))?;
    if net.addr() != net.network() {
        return Err(format!(
            "{text:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

pub fn parse_ipv6_subnet(text: &str) -> Result<Ipv6Net, String> {
    match parse_subnet(text)? {
        IpNet::V6(n) => Ok(n),
        IpNet::V4(n) => Err(format!(
            "{n} is an IPv4 subnet; --ipv6-subnet takes an IPv6 subnet such as fd00:10:244:7::/64"
        )),
    }
}

pub fn parse_public_ipv6(text: &str) -> Result<Ipv6Addr, String> {
    let ip: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv6 address"))?;
    let IpAddr::V6(ip) = ip else {
        return Err(format!(
            "{ip} is an IPv4 address; give it as --public-ip, and an IPv6 address here"
        ));
    };
    validate_public_ipv6(ip).map_err(|e| e.to_string())?;
    Ok(ip)
}

pub fn parse_node(text: &str) -> Result<String, String> {
    validate_node_name(text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

pub fn parse_public_ip(text: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address"))?;
    validate_public_ip(ip).map_err(|e| e.to_string())?;
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("10.244.7.0/24").unwrap().to_string(),
            "10.244.7.0/24"
        );
        assert_eq!(
            parse_subnet("10.1.2.300/24").unwrap_err(),
            r#""10.1.2.300/24" is not a CIDR"#
        );
        assert_eq!(
            parse_subnet("10.244.7.0").unwrap_err(),
            r#""10.244.7.0" is not a CIDR"#
        );
        assert_eq!(parse_subnet("fd00::/64").unwrap().to_string(), "fd00::/64");
        assert!(parse_ipv6_subnet("10.244.7.0/24")
            .unwrap_err()
            .contains("is an IPv4 subnet"));
        assert!(parse_public_ipv6("192.0.2.1")
            .unwrap_err()
            .contains("give it as --public-ip"));
        assert!(parse_public_ipv6("fe80::1").is_err());
        assert!(parse_public_ipv6("2001:db8::1").is_ok());
        assert!(parse_subnet("10.244.7.1/24")
            .unwrap_err()
            .contains("did you mean 10.244.7.0/24?"));
    }

    #[test]
    fn nodes_and_addresses() {
        assert_eq!(parse_node("worker-1").unwrap(), "worker-1");
        assert!(parse_node("").is_err());
        assert_eq!(
            parse_public_ip("192.0.2.1").unwrap(),
            Ipv4Addr::new(192, 0, 2, 1)
        );
        assert_eq!(
            parse_public_ip("192.0.2").unwrap_err(),
            r#""192.0.2" is not an IPv4 address"#
        );
        assert!(parse_public_ip("0.0.0.0").is_err());
    }
}
