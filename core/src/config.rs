//! The cluster network config and its validation.
//!
//! Two shapes exist on purpose. [`NetworkConfigSpec`] is what a person writes (every field
//! but `network` optional, unknown fields rejected so a typo is never silently ignored).
//! [`NetworkConfig`] is the validated result with every default filled in; it is what the
//! controller stores in etcd, so every reader sees the same effective values even if the
//! defaults change in a later release.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::subnet::SubnetRange;

pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_PORT: u16 = 8472;
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_VNI: u32 = 16_777_215;
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_LEASE_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest config document accepted, from a file or the network. A real one is a few
/// hundred bytes; the bound is below the controller's 64 KiB gRPC request limit, so a
/// document that passes here is never refused later for its size alone.
pub const MAX_CONFIG_BYTES: usize = 32 * 1024;

/// A config that failed validation. The message always names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum BackendType {
    #[default]
    #[serde(rename = "vxlan")]
    Vxlan,
    #[serde(rename = "host-gw")]
    HostGw,
    #[serde(rename = "alloc")]
    Alloc,
}

impl BackendType {
    pub const ALL: [BackendType; 3] = [BackendType::Vxlan, BackendType::HostGw, BackendType::Alloc];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Alloc => "alloc",
        }
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendType {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendType::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| {
                ConfigError::new(
                    "backend.type",
                    format!("unknown backend {s:?} (expected vxlan, host-gw or alloc)"),
                )
            })
    }
}

/// The `backend` object as written by a person.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_routing: Option<bool>,
}

/// The network config as written by a person (`overlayctl config set --file`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfigSpec {
    /// The IPv4 network; absent in an IPv6-only cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_max: Option<String>,
    /// The IPv6 network: with `network` a dual-stack cluster, alone an IPv6-only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet_max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<TtlSpec>,
}

/// `lease_ttl` may be a duration string ("24h", "90s") or a number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TtlSpec {
    Seconds(u64),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(rename = "type")]
    pub kind: BackendType,
    pub vni: u32,
    pub port: u16,
    pub direct_routing: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendType::Vxlan,
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            direct_routing: false,
        }
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn of_addr(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One family's share of the cluster network: the network and the subnets hosts get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    pub network: IpNet,
    pub subnet_len: u8,
    pub subnet_min: IpNet,
    pub subnet_max: IpNet,
}

impl SubnetPool {
    pub fn family(&self) -> Family {
        Family::of(&self.network)
    }

    /// The range subnets are handed out from.
    pub fn range(&self) -> SubnetRange {
        SubnetRange::new(self.subnet_min, self.subnet_max)
            .expect("validated config has a valid range")
    }

    /// Whether `subnet` is in the range dynamic leases are picked from.
    pub fn fits(&self, subnet: impl Into<IpNet>) -> bool {
        self.range().contains(subnet)
    }

    /// Whether `subnet` is one of the network's subnets: inside the network, `subnet_len`
    /// long. A reservation may be any of them, in the dynamic range or outside it: an
    /// operator keeps fixed subnets out of the way of random allocation by reserving them
    /// outside `subnet_min..subnet_max`, as with static addresses outside a DHCP pool.
    pub fn is_network_subnet(&self, subnet: impl Into<IpNet>) -> bool {
        let subnet: IpNet = subnet.into();
        subnet.prefix_len() == self.subnet_len && self.network.contains(&subnet)
    }

    /// Whether an existing lease's subnet is still valid under this pool: a dynamic
    /// lease inside the range, a reservation anywhere in the network.
    pub fn keeps(&self, subnet: impl Into<IpNet>, reserved: bool) -> bool {
        if reserved {
            self.is_network_subnet(subnet)
        } else {
            self.fits(subnet)
        }
    }
}

/// A validated network config with all defaults applied.
///
/// A cluster has an IPv4 pool, an IPv6 pool, or both (dual stack). A lease is keyed by
/// its subnet of the [key family](Self::key_family) (IPv4 when the cluster has it); in a
/// dual-stack cluster the IPv6 subnet travels in the lease's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "NetworkConfigSpec", try_from = "NetworkConfigSpec")]
pub struct NetworkConfig {
    pub ipv4: Option<SubnetPool>,
    pub ipv6: Option<SubnetPool>,
    pub backend: BackendConfig,
    pub mtu: Option<u32>,
    pub lease_ttl: Duration,
}

impl NetworkConfig {
    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        check_config_size(text.len())?;
        let spec: NetworkConfigSpec = serde_json::from_str(text).map_err(|e| {
            // serde names unknown or mistyped fields in its message.
            ConfigError::new("config", format!("not a valid config document: {e}"))
        })?;
        spec.validate()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes")
    }

    /// The pool whose subnets key the leases: IPv4 when the cluster has it, else IPv6.
    pub fn key_pool(&self) -> &SubnetPool {
        self.ipv4
            .as_ref()
            .or(self.ipv6.as_ref())
            .expect("a validated config has a family")
    }

    pub fn key_family(&self) -> Family {
        self.key_pool().family()
    }

    /// The pool of a family, when the cluster has it.
    pub fn pool(&self, family: Family) -> Option<&SubnetPool> {
        match family {
            Family::V4 => self.ipv4.as_ref(),
            Family::V6 => self.ipv6.as_ref(),
        }
    }

    /// The pools the cluster has, IPv4 first.
    pub fn pools(&self) -> impl Iterator<Item = &SubnetPool> {
        self.ipv4.iter().chain(self.ipv6.iter())
    }

    /// The families the cluster has, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        self.pools().map(SubnetPool::family).collect()
    }

    pub fn is_dual_stack(&self) -> bool {
        self.ipv4.is_some() && self.ipv6.is_some()
    }

    /// The IPv4 network, when the cluster has one.
    pub fn ipv4_network(&self) -> Option<Ipv4Net> {
        match self.ipv4?.network {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }

    /// The IPv6 network, when the cluster has one.
    pub fn ipv6_network(&self) -> Option<Ipv6Net> {
        match self.ipv6?.network {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }

    /// The networks of the cluster, IPv4 first.
    pub fn networks(&self) -> Vec<IpNet> {
        self.pools().map(|p| p.network).collect()
    }

    /// Whether `ip` lies inside one of the cluster's networks.
    pub fn contains_addr(&self, ip: IpAddr) -> bool {
        self.pools().any(|p| p.network.contains(&ip))
    }

    /// Whether a lease key may stay under this config, judged by its key subnet alone (all
    /// that is known of a key whose value is unreadable): of the key family, kept by its
    /// pool ([`SubnetPool::keeps`]).
    pub fn keeps_key(&self, subnet: IpNet, reserved: bool) -> bool {
        Family::of(&subnet) == self.key_family() && self.key_pool().keeps(subnet, reserved)
    }

    /// Whether a lease may stay under this config: its key as [`Self::keeps_key`], and in
    /// a dual-stack cluster an IPv6 subnet that its pool keeps; a lease with an IPv6
    /// subnet in a cluster without IPv6 (or the other way round) no longer fits, so a
    /// change of families moves every lease, like a change of network.
    pub fn keeps_lease(&self, subnet: IpNet, ipv6_subnet: Option<Ipv6Net>, reserved: bool) -> bool {
        if !self.keeps_key(subnet, reserved) {
            return false;
        }
        match (self.is_dual_stack(), ipv6_subnet) {
            (true, Some(s6)) => self.ipv6.is_some_and(|p| p.keeps(s6, reserved)),
            (false, None) => true,
            _ => false,
        }
    }

    /// The networks as people write them: "10.244.0.0/16", "10.244.0.0/16,
    /// fd00:10:244::/56" or "fd00:10:244::/56".
    pub fn networks_text(&self) -> String {
        self.networks()
            .iter()
            .map(IpNet::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl TryFrom<NetworkConfigSpec> for NetworkConfig {
    type Error = ConfigError;
    fn try_from(spec: NetworkConfigSpec) -> Result<Self, ConfigError> {
        spec.validate()
    }
}

impl From<NetworkConfig> for NetworkConfigSpec {
    fn from(c: NetworkConfig) -> Self {
        let v4 = c.ipv4;
        let v6 = c.ipv6;
        NetworkConfigSpec {
            network: v4.map(|p| p.network.to_string()),
            subnet_len: v4.map(|p| p.subnet_len.into()),
            subnet_min: v4.map(|p| p.subnet_min.to_string()),
            subnet_max: v4.map(|p| p.subnet_max.to_string()),
            ipv6_network: v6.map(|p| p.network.to_string()),
            ipv6_subnet_len: v6.map(|p| p.subnet_len.into()),
            ipv6_subnet_min: v6.map(|p| p.subnet_min.to_string()),
            ipv6_subnet_max: v6.map(|p| p.subnet_max.to_string()),
            backend: Some(BackendSpec {
                kind: Some(c.backend.kind.as_str().to_string()),
                vni: Some(c.backend.vni.into()),
                port: Some(c.backend.port.into()),
                direct_routing: Some(c.backend.direct_routing),
            }),
            mtu: c.mtu.map(u64::from),
            lease_ttl: Some(TtlSpec::Text(format_duration(c.lease_ttl))),
        }
    }
}

/// Refuses a config document of `len` bytes when it is over [`MAX_CONFIG_BYTES`].
pub fn check_config_size(len: usize) -> Result<(), ConfigError> {
    if len > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "config",
            format!("the document is {len} bytes; the limit is {MAX_CONFIG_BYTES}"),
        ));
    }
    Ok(())
}

/// Formats a duration the way people write it: "24h", "90m", "45s".
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Parses "24h", "90s", "1h30m", or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. \"24h\" or \"90s\""))
}

/// A value parser for a duration flag (clap's `value_parser = parse_duration_in(..)`):
/// [`parse_duration`], then `min..=max`. Zero, or a value so large that it overflows a
/// timer or means "never", is refused when the flags are parsed, naming the bounds,
/// instead of panicking or silently stopping a task later.
pub fn parse_duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| {
        let d = parse_duration(text)?;
        if d < min || d > max {
            return Err(format!(
                "{} is outside {}..{}",
                format_duration(d),
                format_duration(min),
                format_duration(max)
            ));
        }
        Ok(d)
    }
}

/// The rule for `lease_ttl` (config documents and `overlayctl config set --lease-ttl`):
/// whole seconds, 1s..366 days.
pub fn check_lease_ttl(ttl: Duration) -> Result<Duration, String> {
    if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
        return Err(format!("{} is outside 1s..366 days", format_duration(ttl)));
    }
    if ttl.subsec_nanos() != 0 {
        return Err("must be a whole number of seconds".into());
    }
    Ok(ttl)
}

/// The field names and rules of one family's pool.
struct PoolRules {
    family: Family,
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    example_net: &'static str,
    example_subnet: &'static str,
    /// Longest network prefix: the network must hold at least two subnets with room for
    /// a gateway and a container each.
    max_prefix: u8,
    max_subnet_len: u8,
}

const IPV4_RULES: PoolRules = PoolRules {
    family: Family::V4,
    network: "network",
    subnet_len: "subnet_len",
    subnet_min: "subnet_min",
    subnet_max: "subnet_max",
    example_net: "10.244.0.0/16",
    example_subnet: "10.244.1.0/24",
    max_prefix: 28,
    max_subnet_len: 30,
};

const IPV6_RULES: PoolRules = PoolRules {
    family: Family::V6,
    network: "ipv6_network",
    subnet_len: "ipv6_subnet_len",
    subnet_min: "ipv6_subnet_min",
    subnet_max: "ipv6_subnet_max",
    example_net: "fd00:10:244::/56",
    example_subnet: "fd00:10:244:1::/64",
    max_prefix: 124,
    max_subnet_len: 126,
};

/// Whether an IPv6 network is one a cluster may use: global or unique-local unicast, not
/// link-local (fe80::/10, the same on every link), multicast (ff00::/8), loopback,
/// unspecified, or IPv4-mapped (::ffff:0:0/96) space.
fn ipv6_network_problem(net: Ipv6Net) -> Option<&'static str> {
    let overlaps = |special: &str| {
        let special: Ipv6Net = special.parse().expect("valid");
        special.contains(&net.network()) || net.contains(&special.network())
    };
    if overlaps("fe80::/10") {
        Some("overlaps the link-local range fe80::/10")
    } else if overlaps("ff00::/8") {
        Some("overlaps the multicast range ff00::/8")
    } else if overlaps("::ffff:0:0/96") {
        Some("overlaps the IPv4-mapped range ::ffff:0:0/96")
    } else if net.contains(&Ipv6Addr::LOCALHOST) || net.contains(&Ipv6Addr::UNSPECIFIED) {
        Some("contains the loopback or unspecified address")
    } else {
        None
    }
}

impl PoolRules {
    fn parse_net(&self, text: &str) -> Result<IpNet, ConfigError> {
        let net: IpNet = text.trim().parse().ok().filter(|n| Family::of(n) == self.family).ok_or_else(|| {
            ConfigError::new(
                self.network,
                format!(
                    "{text:?} is not an {} CIDR such as {}",
                    self.family, self.example_net
                ),
            )
        })?;
        if net.network() != net.addr() {
            return Err(ConfigError::new(
                self.network,
                format!(
                    "{text} has host bits set; the network address is {}",
                    net.trunc()
                ),
            ));
        }
        if let IpNet::V6(n) = net {
            if let Some(problem) = ipv6_network_problem(n) {
                return Err(ConfigError::new(
                    self.network,
                    format!("{net} {problem}; use a unique-local (fd00::/8) or global range"),
                ));
            }
        }
        Ok(net)
    }

    /// Parses a subnet bound: a CIDR whose length must equal `subnet_len`, or a bare
    /// address taken with `subnet_len`.
    fn parse_bound(&self, field: &'static str, text: &str, subnet_len: u8) -> Result<IpNet, ConfigError> {
        let net = if let Ok(addr) = text.trim().parse::<IpAddr>() {
            IpNet::new(addr, subnet_len).map_err(|_| {
                ConfigError::new(field, format!("{text:?} is not an {} subnet", self.family))
            })?
        } else {
            text.trim().parse::<IpNet>().map_err(|_| {
                ConfigError::new(
                    field,
                    format!(
                        "{text:?} is not an {} subnet such as {}",
                        self.family, self.example_subnet
                    ),
                )
            })?
        };
        if Family::of(&net) != self.family {
            return Err(ConfigError::new(
                field,
                format!("{net} is not an {} subnet", self.family),
            ));
        }
        if net.prefix_len() != subnet_len {
            return Err(ConfigError::new(
                field,
                format!(
                    "{net} has prefix length /{}, but {} is {subnet_len}",
                    net.prefix_len(),
                    self.subnet_len
                ),
            ));
        }
        if net.network() != net.addr() {
            return Err(ConfigError::new(
                field,
                format!(
                    "{net} is not aligned to /{subnet_len} (did you mean {}?)",
                    net.trunc()
                ),
            ));
        }
        Ok(net)
    }

    fn validate(
        &self,
        network: &str,
        subnet_len: Option<u64>,
        subnet_min: Option<&String>,
        subnet_max: Option<&String>,
    ) -> Result<SubnetPool, ConfigError> {
        let network = self.parse_net(network)?;
        let prefix = network.prefix_len();
        if prefix > self.max_prefix {
            return Err(ConfigError::new(
                self.network,
                format!("{network} is smaller than /{}", self.max_prefix),
            ));
        }
        let subnet_len = match (subnet_len, self.family) {
            (None, Family::V4) if prefix <= 22 => 24,
            (None, Family::V4) => prefix + 2,
            (None, Family::V6) if prefix <= 62 => 64,
            (None, Family::V6) => prefix + 2,
            (Some(n), _) => {
                if n > self.max_subnet_len as u64 {
                    return Err(ConfigError::new(
                        self.subnet_len,
                        format!("{n} is over {}", self.max_subnet_len),
                    ));
                }
                n as u8
            }
        };
        if subnet_len <= prefix {
            return Err(ConfigError::new(
                self.subnet_len,
                format!("{subnet_len} must be longer than the network prefix /{prefix}"),
            ));
        }
        let whole = SubnetRange::new(
            IpNet::new(network.network(), subnet_len).expect("valid"),
            IpNet::new(network.broadcast(), subnet_len).expect("valid").trunc(),
        )
        .expect("aligned");
        let subnet_min = match subnet_min {
            Some(t) => self.parse_bound(self.subnet_min, t, subnet_len)?,
            None => whole.nth(1).unwrap_or_else(|| whole.nth(0).expect("one subnet")),
        };
        let subnet_max = match subnet_max {
            Some(t) => self.parse_bound(self.subnet_max, t, subnet_len)?,
            None => whole.nth(whole.len() - 1).expect("last subnet"),
        };
        for (field, bound) in [(self.subnet_min, subnet_min), (self.subnet_max, subnet_max)] {
            if !network.contains(&bound) {
                return Err(ConfigError::new(
                    field,
                    format!("{bound} is outside the network {network}"),
                ));
            }
        }
        let Some(range) = SubnetRange::new(subnet_min, subnet_max) else {
            return Err(ConfigError::new(
                self.subnet_min,
                format!("{subnet_min} is after {} {subnet_max}", self.subnet_max),
            ));
        };
        if range.len() < 2 {
            return Err(ConfigError::new(
                self.subnet_len,
                format!(
                    "fewer than 2 possible subnets between {subnet_min} and {subnet_max}; use a larger network or a longer {}",
                    self.subnet_len
                ),
            ));
        }
        Ok(SubnetPool {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
        })
    }
}

impl NetworkConfigSpec {
    /// Validates the spec and fills in defaults.
    pub fn validate(&self) -> Result<NetworkConfig, ConfigError> {
        let given = |t: &Option<String>| t.as_ref().filter(|t| !t.trim().is_empty()).cloned();
        let (network, network6) = (given(&self.network), given(&self.ipv6_network));
        if network.is_none() && network6.is_none() {
            return Err(ConfigError::new(
                "network",
                "is required (e.g. \"10.244.0.0/16\"), unless ipv6_network is given for an IPv6-only cluster",
            ));
        }
        let orphan = |field: &'static str, set: bool, needs: &str| {
            if set {
                Err(ConfigError::new(field, format!("is set, but {needs} is not")))
            } else {
                Ok(())
            }
        };
        if network.is_none() {
            orphan("subnet_len", self.subnet_len.is_some(), "network")?;
            orphan("subnet_min", self.subnet_min.is_some(), "network")?;
            orphan("subnet_max", self.subnet_max.is_some(), "network")?;
        }
        if network6.is_none() {
            orphan("ipv6_subnet_len", self.ipv6_subnet_len.is_some(), "ipv6_network")?;
            orphan("ipv6_subnet_min", self.ipv6_subnet_min.is_some(), "ipv6_network")?;
            orphan("ipv6_subnet_max", self.ipv6_subnet_max.is_some(), "ipv6_network")?;
        }
        let ipv4 = network
            .map(|n| {
                IPV4_RULES.validate(
                    &n,
                    self.subnet_len,
                    self.subnet_min.as_ref(),
                    self.subnet_max.as_ref(),
                )
            })
            .transpose()?;
        let ipv6 = network6
            .map(|n| {
                IPV6_RULES.validate(
                    &n,
                    self.ipv6_subnet_len,
                    self.ipv6_subnet_min.as_ref(),
                    self.ipv6_subnet_max.as_ref(),
                )
            })
            .transpose()?;
        let b = self.backend.clone().unwrap_or_default();
        let kind = match b.kind.as_deref() {
            None => BackendType::Vxlan,
            Some(t) => t.parse()?,
        };
        let vni = match b.vni {
            None => DEFAULT_VNI,
            Some(v) if (1..=MAX_VNI as u64).contains(&v) => v as u32,
            Some(v) => {
                return Err(ConfigError::new(
                    "backend.vni",
                    format!("{v} is outside 1..{MAX_VNI}"),
                ))
            }
        };
        let port = match b.port {
            None => DEFAULT_PORT,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                return Err(ConfigError::new(
                    "backend.port",
                    format!("{p} is outside 1..65535"),
                ))
            }
        };
        let mtu = match self.mtu {
            None => None,
            Some(m) if (576..=65535).contains(&m) => Some(m as u32),
            Some(m) => {
                return Err(ConfigError::new(
                    "mtu",
                    format!("{m} is outside 576..65535"),
                ))
            }
        };
        let lease_ttl = match &self.lease_ttl {
            None => DEFAULT_LEASE_TTL,
            Some(TtlSpec::Seconds(s)) => Duration::from_secs(*s),
            Some(TtlSpec::Text(t)) => {
                parse_duration(t).map_err(|e| ConfigError::new("lease_ttl", e))?
            }
        };
        check_lease_ttl(lease_ttl).map_err(|e| ConfigError::new("lease_ttl", e))?;

        Ok(NetworkConfig {
            ipv4,
            ipv6,
            backend: BackendConfig {
                kind,
                vni,
                port,
                direct_routing: b.direct_routing.unwrap_or(false),
            },
            mtu,
            lease_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(network: &str) -> NetworkConfigSpec {
        NetworkConfigSpec {
            network: Some(network.into()),
            ..Default::default()
        }
    }

    fn err_field(s: NetworkConfigSpec) -> &'static str {
        s.validate().unwrap_err().field
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = spec("10.244.0.0/16").validate().unwrap().ipv4.unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0/24");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0/24");
        assert_eq!(c.range().len(), 255);
        let c = spec("10.244.0.0/16").validate().unwrap();
        assert_eq!(c.backend, BackendConfig::default());
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(c.mtu, None);
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn small_networks_default_to_prefix_plus_two() {
        let c = spec("10.0.0.0/24").validate().unwrap().ipv4.unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min.to_string(), "10.0.0.64/26");
        assert_eq!(c.subnet_max.to_string(), "10.0.0.192/26");
        let c = spec("10.0.0.0/22").validate().unwrap().ipv4.unwrap();
        assert_eq!(c.subnet_len, 24);
        let c = spec("10.0.0.0/23").validate().unwrap().ipv4.unwrap();
        assert_eq!(c.subnet_len, 25);
    }

    #[test]
    fn rejects_bad_networks() {
        assert_eq!(err_field(spec("10.0.0.0/29")), "network");
        assert_eq!(err_field(spec("not-a-cidr")), "network");
        assert_eq!(err_field(spec("10.244.1.0/16")), "network");
        assert_eq!(err_field(spec("")), "network");
        assert_eq!(err_field(spec("fd00::/64")), "network");
    }

    #[test]
    fn rejects_bad_subnet_len() {
        let mut s = spec("10.244.0.0/16");
        s.subnet_len = Some(16);
        assert_eq!(err_field(s.clone()), "subnet_len");
        s.subnet_len = Some(31);
        assert_eq!(err_field(s.clone()), "subnet_len");
        s.subnet_len = Some(12);
        assert_eq!(err_field(s.clone()), "subnet_len");
        // /17 out of /16 gives two subnets, but the default minimum skips the first.
        s.subnet_len = Some(17);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "subnet_len");
        assert!(e.reason.contains("fewer than 2"), "{e}");
    }

    #[test]
    fn min_max_must_be_aligned_and_inside() {
        let mut s = spec("10.244.0.0/16");
        s.subnet_min = Some("10.244.1.5/24".into());
        assert_eq!(err_field(s.clone()), "subnet_min");
        s.subnet_min = Some("10.245.1.0/24".into());
        assert_eq!(err_field(s.clone()), "subnet_min");
        s.subnet_min = Some("10.244.1.0/25".into());
        assert_eq!(err_field(s.clone()), "subnet_min");
        s.subnet_min = Some("10.244.10.0".into());
        s.subnet_max = Some("10.244.9.0/24".into());
        assert_eq!(err_field(s.clone()), "subnet_min");
        s.subnet_max = Some("10.244.10.0/24".into());
        assert_eq!(
            err_field(s.clone()),
            "subnet_len",
            "a single subnet is not enough"
        );
        s.subnet_max = Some("10.244.11.0/24".into());
        let c = s.validate().unwrap().ipv4.unwrap();
        assert_eq!(c.range().len(), 2);
    }

    #[test]
    fn rejects_bad_backend_fields() {
        let mut s = spec("10.244.0.0/16");
        s.backend = Some(BackendSpec {
            kind: Some("udp".into()),
            ..Default::default()
        });
        assert_eq!(err_field(s.clone()), "backend.type");
        s.backend = Some(BackendSpec {
            vni: Some(0),
            ..Default::default()
        });
        assert_eq!(err_field(s.clone()), "backend.vni");
        s.backend = Some(BackendSpec {
            vni: Some(16_777_216),
            ..Default::default()
        });
        assert_eq!(err_field(s.clone()), "backend.vni");
        s.backend = Some(BackendSpec {
            vni: Some(16_777_215),
            ..Default::default()
        });
        assert!(s.validate().is_ok());
        s.backend = Some(BackendSpec {
            port: Some(70000),
            ..Default::default()
        });
        assert_eq!(err_field(s.clone()), "backend.port");
    }

    #[test]
    fn rejects_bad_mtu_and_ttl() {
        let mut s = spec("10.244.0.0/16");
        s.mtu = Some(100);
        assert_eq!(err_field(s.clone()), "mtu");
        s.mtu = None;
        s.lease_ttl = Some(TtlSpec::Text("soon".into()));
        assert_eq!(err_field(s.clone()), "lease_ttl");
        s.lease_ttl = Some(TtlSpec::Seconds(0));
        assert_eq!(err_field(s.clone()), "lease_ttl");
        s.lease_ttl = Some(TtlSpec::Text("90s".into()));
        assert_eq!(s.validate().unwrap().lease_ttl, Duration::from_secs(90));
    }

    #[test]
    fn json_round_trip_is_stable() {
        let text = r#"{"network":"10.244.0.0/16","backend":{"type":"host-gw","direct_routing":true},"lease_ttl":"1h","mtu":1400}"#;
        let c = NetworkConfig::from_json(text).unwrap();
        assert_eq!(c.backend.kind, BackendType::HostGw);
        assert!(c.backend.direct_routing);
        assert_eq!(c.lease_ttl, Duration::from_secs(3600));
        let stored = c.to_json();
        assert!(stored.contains(r#""lease_ttl":"1h""#), "{stored}");
        let again = NetworkConfig::from_json(&stored).unwrap();
        assert_eq!(again, c);
        assert_eq!(serde_json::from_str::<NetworkConfig>(&stored).unwrap(), c);
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = NetworkConfig::from_json(r#"{"network":"10.244.0.0/16","subnet_length":24}"#)
            .unwrap_err();
        assert!(e.to_string().contains("subnet_length"), "{e}");
        let e = NetworkConfig::from_json(
            r#"{"network":"10.244.0.0/16","backend":{"type":"vxlan","vni":"x"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = NetworkConfig::from_json("not json").unwrap_err();
        assert!(e.to_string().contains("not a valid config"), "{e}");
        let e = NetworkConfig::from_json(r#"{"network":"10.244.0.0/16","backend":{"vni":0}}"#)
            .unwrap_err();
        assert_eq!(e.field, "backend.vni");
    }

    #[test]
    fn oversized_documents_are_refused_before_parsing() {
        let doc = r#"{"network":"10.244.0.0/16"}"#;
        let padded = format!("{doc}{}", " ".repeat(MAX_CONFIG_BYTES - doc.len()));
        assert!(NetworkConfig::from_json(&padded).is_ok());
        let e = NetworkConfig::from_json(&format!("{padded} ")).unwrap_err();
        assert_eq!(e.field, "config");
        assert!(e.reason.contains("the limit is 32768"), "{e}");
    }

    #[test]
    fn durations_format_and_parse() {
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert!(parse_duration("fast").is_err());
        let resync = parse_duration_in(Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(resync("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(resync("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(resync("0").unwrap_err(), "0s is outside 1s..1h");
        assert_eq!(resync("999ms").unwrap_err(), "999ms is outside 1s..1h");
        assert_eq!(resync("2h").unwrap_err(), "2h is outside 1s..1h");
        assert!(resync("fast").unwrap_err().contains("not a duration"));
        assert_eq!(
            check_lease_ttl(Duration::from_secs(90)),
            Ok(Duration::from_secs(90))
        );
        assert!(check_lease_ttl(Duration::ZERO).is_err());
        assert!(check_lease_ttl(Duration::from_millis(1500)).is_err());
    }

    #[test]
    fn fits_checks_range_and_length() {
        let c = spec("10.244.0.0/16").validate().unwrap().ipv4.unwrap();
        assert!(c.fits("10.244.7.0/24".parse::<Ipv4Net>().unwrap()));
        assert!(!c.fits("10.244.0.0/24".parse::<Ipv4Net>().unwrap()));
        assert!(!c.fits("10.245.7.0/24".parse::<Ipv4Net>().unwrap()));
        assert!(!c.fits("10.244.7.0/25".parse::<Ipv4Net>().unwrap()));
    }

    #[test]
    fn reservations_may_sit_outside_the_dynamic_range() {
        let mut s = spec("10.244.0.0/16");
        s.subnet_max = Some("10.244.199.0/24".into());
        let c = s.validate().unwrap().ipv4.unwrap();
        let outside: Ipv4Net = "10.244.200.0/24".parse().unwrap();
        assert!(!c.fits(outside));
        assert!(c.is_network_subnet(outside));
        assert!(c.keeps(outside, true));
        assert!(!c.keeps(outside, false));
        assert!(!c.is_network_subnet("10.245.1.0/24".parse::<Ipv4Net>().unwrap()));
        assert!(!c.is_network_subnet("10.244.1.0/25".parse::<Ipv4Net>().unwrap()));
    }

    fn spec6(network6: &str) -> NetworkConfigSpec {
        NetworkConfigSpec {
            ipv6_network: Some(network6.into()),
            ..Default::default()
        }
    }

    #[test]
    fn dual_stack_and_ipv6_only_configs() {
        let mut s = spec("10.244.0.0/16");
        s.ipv6_network = Some("fd00:10:244::/56".into());
        let c = s.validate().unwrap();
        assert!(c.is_dual_stack());
        assert_eq!(c.key_family(), Family::V4);
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min.to_string(), "fd00:10:244:1::/64");
        assert_eq!(v6.subnet_max.to_string(), "fd00:10:244:ff::/64");
        assert_eq!(v6.range().len(), 255);
        let stored = c.to_json();
        assert!(stored.contains(r#""ipv6_network":"fd00:10:244::/56""#), "{stored}");
        assert_eq!(NetworkConfig::from_json(&stored).unwrap(), c);

        let c = spec6("fd00:10:244::/56").validate().unwrap();
        assert_eq!(c.ipv4, None);
        assert_eq!(c.key_family(), Family::V6);
        assert_eq!(c.networks_text(), "fd00:10:244::/56");
        let stored = c.to_json();
        assert!(!stored.contains(r#""network""#), "{stored}");
        assert_eq!(NetworkConfig::from_json(&stored).unwrap(), c);
        let c = spec6("fd00:10:244::/120").validate().unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
    }

    #[test]
    fn rejects_bad_ipv6_networks() {
        for (net, field, words) in [
            ("fd00::/125", "ipv6_network", "smaller than /124"),
            ("fe80::/64", "ipv6_network", "link-local"),
            ("fe00::/7", "ipv6_network", "link-local"),
            ("ff02::/16", "ipv6_network", "multicast"),
            ("::/0", "ipv6_network", "link-local"),
            ("::ffff:10.0.0.0/104", "ipv6_network", "IPv4-mapped"),
            ("10.244.0.0/16", "ipv6_network", "not an IPv6 CIDR"),
            ("fd00:10:244::1/56", "ipv6_network", "host bits"),
        ] {
            let e = spec6(net).validate().unwrap_err();
            assert_eq!(e.field, field, "{net}: {e}");
            assert!(e.reason.contains(words), "{net}: {e}");
        }
        let e = spec("fd00::/56").validate().unwrap_err();
        assert!(e.reason.contains("not an IPv4 CIDR"), "{e}");
        let mut s = spec6("fd00:10:244::/56");
        s.ipv6_subnet_len = Some(48);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "ipv6_subnet_len");
        assert!(e.reason.contains("longer than the network prefix /56"), "{e}");
        s.ipv6_subnet_len = Some(127);
        assert_eq!(s.validate().unwrap_err().field, "ipv6_subnet_len");
        s.ipv6_subnet_len = None;
        s.ipv6_subnet_min = Some("10.244.1.0/24".into());
        assert_eq!(s.validate().unwrap_err().field, "ipv6_subnet_min");
        s.ipv6_subnet_min = Some("fd00:10:245::/64".into());
        assert_eq!(s.validate().unwrap_err().field, "ipv6_subnet_min");
        let mut s = spec6("fd00:10:244::/56");
        s.subnet_len = Some(24);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "subnet_len");
        assert!(e.reason.contains("network is not"), "{e}");
        let e = NetworkConfigSpec::default().validate().unwrap_err();
        assert_eq!(e.field, "network");
    }
}
