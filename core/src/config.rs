//! The cluster network config and its validation.
//!
//! Two shapes exist on purpose. [`NetworkConfigSpec`] is what a person writes (every field
//! but `network` optional, unknown fields rejected so a typo is never silently ignored).
//! [`NetworkConfig`] is the validated result with every default filled in; it is what the
//! controller stores in etcd, so every reader sees the same effective values even if the
//! defaults change in a later release.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
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
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_max: Option<String>,
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

/// A validated network config with all defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "NetworkConfigSpec", try_from = "NetworkConfigSpec")]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Net,
    pub subnet_max: Ipv4Net,
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

    /// The range subnets are handed out from.
    pub fn range(&self) -> SubnetRange {
        SubnetRange::new(self.subnet_min, self.subnet_max)
            .expect("validated config has a valid range")
    }

    /// Whether `subnet` is in the range dynamic leases are picked from.
    pub fn fits(&self, subnet: Ipv4Net) -> bool {
        self.range().contains(subnet)
    }

    /// Whether `subnet` is one of the network's subnets: inside the network, `subnet_len`
    /// long. A reservation may be any of them, in the dynamic range or outside it: an
    /// operator keeps fixed subnets out of the way of random allocation by reserving them
    /// outside `subnet_min..subnet_max`, as with static addresses outside a DHCP pool.
    pub fn is_network_subnet(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len && self.network.contains(&subnet)
    }

    /// Whether an existing lease is still valid under this config: a dynamic lease inside
    /// the range, a reservation anywhere in the network.
    pub fn keeps(&self, subnet: Ipv4Net, reserved: bool) -> bool {
        if reserved {
            self.is_network_subnet(subnet)
        } else {
            self.fits(subnet)
        }
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
        NetworkConfigSpec {
            network: c.network.to_string(),
            subnet_len: Some(c.subnet_len.into()),
            subnet_min: Some(c.subnet_min.to_string()),
            subnet_max: Some(c.subnet_max.to_string()),
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

fn parse_net(field: &'static str, text: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = text.trim().parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("{text:?} is not an IPv4 CIDR such as 10.244.0.0/16"),
        )
    })?;
    if net.network() != net.addr() {
        return Err(ConfigError::new(
            field,
            format!(
                "{text} has host bits set; the network address is {}",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

/// Parses a subnet bound: a CIDR whose length must equal `subnet_len`, or a bare address
/// taken with `subnet_len`.
fn parse_bound(field: &'static str, text: &str, subnet_len: u8) -> Result<Ipv4Net, ConfigError> {
    let net = if let Ok(addr) = text.trim().parse::<Ipv4Addr>() {
        Ipv4Net::new(addr, subnet_len).expect("subnet_len validated")
    } else {
        text.trim().parse::<Ipv4Net>().map_err(|_| {
            ConfigError::new(
                field,
                format!("{text:?} is not an IPv4 subnet such as 10.244.1.0/24"),
            )
        })?
    };
    if net.prefix_len() != subnet_len {
        return Err(ConfigError::new(
            field,
            format!(
                "{net} has prefix length /{}, but subnet_len is {subnet_len}",
                net.prefix_len()
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

impl NetworkConfigSpec {
    /// Validates the spec and fills in defaults.
    pub fn validate(&self) -> Result<NetworkConfig, ConfigError> {
        if self.network.trim().is_empty() {
            return Err(ConfigError::new(
                "network",
                "is required (e.g. \"10.244.0.0/16\")",
            ));
        }
        let network = parse_net("network", &self.network)?;
        let prefix = network.prefix_len();
        if prefix > 28 {
            return Err(ConfigError::new(
                "network",
                format!("{network} is smaller than /28"),
            ));
        }
        let subnet_len = match self.subnet_len {
            None if prefix <= 22 => 24,
            None => prefix + 2,
            Some(n) => {
                if n > 30 {
                    return Err(ConfigError::new("subnet_len", format!("{n} is over 30")));
                }
                n as u8
            }
        };
        if subnet_len <= prefix {
            return Err(ConfigError::new(
                "subnet_len",
                format!("{subnet_len} must be longer than the network prefix /{prefix}"),
            ));
        }
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last_subnet = first + ((1u64 << (32 - prefix)) as u32).wrapping_sub(size);
        let subnet_min = match &self.subnet_min {
            Some(t) => parse_bound("subnet_min", t, subnet_len)?,
            None => Ipv4Net::new(Ipv4Addr::from(first + size), subnet_len).expect("valid"),
        };
        let subnet_max = match &self.subnet_max {
            Some(t) => parse_bound("subnet_max", t, subnet_len)?,
            None => Ipv4Net::new(Ipv4Addr::from(last_subnet), subnet_len).expect("valid"),
        };
        for (field, bound) in [("subnet_min", subnet_min), ("subnet_max", subnet_max)] {
            if !network.contains(&bound) {
                return Err(ConfigError::new(
                    field,
                    format!("{bound} is outside the network {network}"),
                ));
            }
        }
        if u32::from(subnet_min.network()) > u32::from(subnet_max.network()) {
            return Err(ConfigError::new(
                "subnet_min",
                format!("{subnet_min} is after subnet_max {subnet_max}"),
            ));
        }
        let range = SubnetRange::new(subnet_min, subnet_max).expect("bounds checked");
        if range.len() < 2 {
            return Err(ConfigError::new(
                "subnet_len",
                format!(
                    "fewer than 2 possible subnets between {subnet_min} and {subnet_max}; use a larger network or a longer subnet_len"
                ),
            ));
        }

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
            network,
            subnet_len,
            subnet_min,
            subnet_max,
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
            network: network.into(),
            ..Default::default()
        }
    }

    fn err_field(s: NetworkConfigSpec) -> &'static str {
        s.validate().unwrap_err().field
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = spec("10.244.0.0/16").validate().unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0/24");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0/24");
        assert_eq!(c.backend, BackendConfig::default());
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(c.mtu, None);
        assert_eq!(c.range().len(), 255);
    }

    #[test]
    fn small_networks_default_to_prefix_plus_two() {
        let c = spec("10.0.0.0/24").validate().unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min.to_string(), "10.0.0.64/26");
        assert_eq!(c.subnet_max.to_string(), "10.0.0.192/26");
        let c = spec("10.0.0.0/22").validate().unwrap();
        assert_eq!(c.subnet_len, 24);
        let c = spec("10.0.0.0/23").validate().unwrap();
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
        let c = s.validate().unwrap();
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
        let c = spec("10.244.0.0/16").validate().unwrap();
        assert!(c.fits("10.244.7.0/24".parse().unwrap()));
        assert!(!c.fits("10.244.0.0/24".parse().unwrap()));
        assert!(!c.fits("10.245.7.0/24".parse().unwrap()));
        assert!(!c.fits("10.244.7.0/25".parse().unwrap()));
    }

    #[test]
    fn reservations_may_sit_outside_the_dynamic_range() {
        let mut s = spec("10.244.0.0/16");
        s.subnet_max = Some("10.244.199.0/24".into());
        let c = s.validate().unwrap();
        let outside: Ipv4Net = "10.244.200.0/24".parse().unwrap();
        assert!(!c.fits(outside));
        assert!(c.is_network_subnet(outside));
        assert!(c.keeps(outside, true));
        assert!(!c.keeps(outside, false));
        assert!(!c.is_network_subnet("10.245.1.0/24".parse().unwrap()));
        assert!(!c.is_network_subnet("10.244.1.0/25".parse().unwrap()));
    }
}
