//! `overlayctl config show` and `overlayctl config set`.
//!
//! `config set` sends a whole document: flags that are not given take their defaults, not
//! the values currently stored, exactly as a `--file` document without those fields would.
//! That keeps the two forms equivalent and the result independent of what was there
//! before. The spec is validated here with the same code the controller runs, so a bad
//! value is reported (naming the field and the flag) without a connection.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Args, Subcommand};
use overlay_core::config::{
    check_config_size, check_lease_ttl, format_duration, parse_duration, BackendSpec, ConfigError,
    NetworkConfigSpec, TtlSpec, MAX_CONFIG_BYTES, MAX_VNI,
};
use overlay_proto::v1;

use crate::client::{self, ControllerUrls};
use crate::output::{self, Format, Table};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show the network config
    Show,
    /// Set the network config; flags not given take their defaults
    Set(Box<SetArgs>),
}

#[derive(Debug, Clone, Default, Args)]
#[command(group(ArgGroup::new("source").required(true).multiple(true).args(["network", "ipv6_network", "file"])))]
pub struct SetArgs {
    /// The overlay's IPv4 network (e.g. 10.244.0.0/16); with --ipv6-network a dual-stack
    /// cluster
    #[arg(long, value_name = "CIDR")]
    pub network: Option<String>,
    /// The overlay's IPv6 network (e.g. fd00:10:244::/56); alone, an IPv6-only cluster
    #[arg(long, value_name = "CIDR")]
    pub ipv6_network: Option<String>,
    /// Prefix length of each host's IPv6 subnet (default 64, or the network's prefix + 2)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=126))]
    pub ipv6_subnet_len: Option<u64>,
    /// First IPv6 subnet handed out (default: the second subnet of the IPv6 network)
    #[arg(long, value_name = "CIDR")]
    pub ipv6_subnet_min: Option<String>,
    /// Last IPv6 subnet handed out (default: the last subnet of the IPv6 network)
    #[arg(long, value_name = "CIDR")]
    pub ipv6_subnet_max: Option<String>,
    /// Prefix length of each host's subnet (default 24, or the network's prefix + 2)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=30))]
    pub subnet_len: Option<u64>,
    /// First subnet handed out (default: the second subnet of the network)
    #[arg(long, value_name = "CIDR")]
    pub subnet_min: Option<String>,
    /// Last subnet handed out (default: the last subnet of the network)
    #[arg(long, value_name = "CIDR")]
    pub subnet_max: Option<String>,
    /// Backend type
    #[arg(long, value_parser = ["vxlan", "host-gw", "alloc"])]
    pub backend: Option<String>,
    /// VXLAN network identifier, 1..16777215 (default 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_VNI as u64))]
    pub vni: Option<u64>,
    /// VXLAN UDP port (default 8472)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65535))]
    pub port: Option<u64>,
    /// With vxlan, route directly (no encapsulation) to hosts on the same L2 network
    #[arg(long)]
    pub direct_routing: bool,
    /// MTU of the overlay, 576..65535 (default: derived from the underlay)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(576..=65535))]
    pub mtu: Option<u64>,
    /// Lease lifetime, e.g. 24h or 90s: whole seconds, 1s..366 days (default 24h)
    #[arg(long, value_name = "DURATION", value_parser = parse_lease_ttl)]
    pub lease_ttl: Option<String>,
    /// Read the config from a JSON document ("-" for stdin)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "network", "subnet_len", "subnet_min", "subnet_max", "ipv6_network",
            "ipv6_subnet_len", "ipv6_subnet_min", "ipv6_subnet_max", "backend", "vni", "port",
            "direct_routing", "mtu", "lease_ttl"
        ]
    )]
    pub file: Option<PathBuf>,
    /// Write even if existing leases no longer fit; those leases are revoked
    #[arg(long)]
    pub force: bool,
}

pub async fn run(
    command: ConfigCommand,
    controllers: &ControllerUrls,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Show => {
            let ctl = client::connect(controllers).await?;
            let response = ctl
                .call(ctl.agent().get_config(v1::GetConfigRequest {}))
                .await?;
            let config = response
                .config
                .ok_or_else(|| anyhow!("the controller answered without a config"))?;
            output::print(&render_config(&config, format)?)?;
        }
        ConfigCommand::Set(args) => {
            let json = request_json(&args)?;
            let ctl = client::connect(controllers).await?;
            let response = ctl
                .call(ctl.admin().set_config(v1::SetConfigRequest {
                    json,
                    force: args.force,
                }))
                .await?;
            let config = response
                .config
                .ok_or_else(|| anyhow!("the controller answered without a config"))?;
            output::print(&render_config(&config, format)?)?;
            if !response.revoked.is_empty() {
                let note = revoked_note(&response.revoked);
                match format {
                    Format::Table => output::print(&note)?,
                    // Keep stdout the config document alone.
                    Format::Json => eprint!("{note}"),
                }
            }
        }
    }
    Ok(())
}

/// `--lease-ttl`: refused at parse time by the rule the controller applies (the text is
/// sent as written).
fn parse_lease_ttl(text: &str) -> Result<String, String> {
    parse_duration(text).and_then(check_lease_ttl)?;
    Ok(text.to_string())
}

/// The validated document to send, from the flags or the file.
pub fn request_json(args: &SetArgs) -> anyhow::Result<String> {
    let spec = match &args.file {
        Some(path) => {
            let name = path.display().to_string();
            let spec = spec_from_file(path)?;
            spec.validate().map_err(|e| anyhow!("{name}: {e}"))?;
            spec
        }
        None => {
            let spec = spec_from_flags(args);
            spec.validate().map_err(|e| anyhow!(flag_error(&e)))?;
            spec
        }
    };
    Ok(serde_json::to_string(&spec).expect("a spec serializes"))
}

/// The spec the flags describe (not yet validated).
pub fn spec_from_flags(args: &SetArgs) -> NetworkConfigSpec {
    let backend = BackendSpec {
        kind: args.backend.clone(),
        vni: args.vni,
        port: args.port,
        direct_routing: args.direct_routing.then_some(true),
    };
    NetworkConfigSpec {
        network: args.network.clone(),
        subnet_len: args.subnet_len,
        subnet_min: args.subnet_min.clone(),
        subnet_max: args.subnet_max.clone(),
        ipv6_network: args.ipv6_network.clone(),
        ipv6_subnet_len: args.ipv6_subnet_len,
        ipv6_subnet_min: args.ipv6_subnet_min.clone(),
        ipv6_subnet_max: args.ipv6_subnet_max.clone(),
        backend: (backend != BackendSpec::default()).then_some(backend),
        mtu: args.mtu,
        lease_ttl: args.lease_ttl.clone().map(TtlSpec::Text),
    }
}

fn spec_from_file(path: &std::path::Path) -> anyhow::Result<NetworkConfigSpec> {
    let name = path.display().to_string();
    let text = if name == "-" {
        read_config(std::io::stdin().lock()).context("--file -: cannot read stdin")?
    } else {
        std::fs::File::open(path)
            .and_then(read_config)
            .with_context(|| format!("--file: cannot read {name}"))?
    };
    spec_from_bytes(&name, &text)
}

/// Reads a config document: at most one byte more than [`MAX_CONFIG_BYTES`], enough for
/// [`spec_from_bytes`] to refuse an oversized one without holding all of it.
pub fn read_config(input: impl Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    input
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The spec in `bytes` (read from `name`); one over the size limit is refused unparsed.
pub fn spec_from_bytes(name: &str, bytes: &[u8]) -> anyhow::Result<NetworkConfigSpec> {
    check_config_size(bytes.len()).map_err(|e| anyhow!("{name}: {e}"))?;
    serde_json::from_slice(bytes).map_err(|e| anyhow!("{name}: not a valid config document: {e}"))
}

/// A validation error for a spec built from flags, naming the field and its flag.
pub fn flag_error(e: &ConfigError) -> String {
    let flag = match e.field {
        "network" => "--network",
        "subnet_len" => "--subnet-len",
        "subnet_min" => "--subnet-min",
        "subnet_max" => "--subnet-max",
        "ipv6_network" => "--ipv6-network",
        "ipv6_subnet_len" => "--ipv6-subnet-len",
        "ipv6_subnet_min" => "--ipv6-subnet-min",
        "ipv6_subnet_max" => "--ipv6-subnet-max",
        "backend.type" => "--backend",
        "backend.vni" => "--vni",
        "backend.port" => "--port",
        "mtu" => "--mtu",
        "lease_ttl" => "--lease-ttl",
        _ => return e.to_string(),
    };
    format!("invalid config: {} ({flag}): {}", e.field, e.reason)
}

/// `config show` output: a key/value listing, or the canonical JSON document.
pub fn render_config(c: &v1::NetworkConfig, format: Format) -> anyhow::Result<String> {
    match format {
        Format::Table => {
            let backend = match overlay_proto::backend_from_proto(c.backend) {
                Ok(b) => b.as_str().to_string(),
                Err(_) => format!("unknown ({})", c.backend),
            };
            let mut t = Table::plain();
            if !c.network.is_empty() {
                t.row(["network", &c.network]);
                t.row(["subnet_len".to_string(), c.subnet_len.to_string()]);
                t.row(["subnet_min", &c.subnet_min]);
                t.row(["subnet_max", &c.subnet_max]);
            }
            if let Some(n6) = &c.ipv6_network {
                t.row(["ipv6_network", n6]);
                t.row([
                    "ipv6_subnet_len".to_string(),
                    c.ipv6_subnet_len.unwrap_or_default().to_string(),
                ]);
                t.row(["ipv6_subnet_min", c.ipv6_subnet_min.as_deref().unwrap_or("")]);
                t.row(["ipv6_subnet_max", c.ipv6_subnet_max.as_deref().unwrap_or("")]);
            }
            t.row(["backend", &backend]);
            t.row(["vni".to_string(), c.vni.to_string()]);
            t.row(["port".to_string(), c.port.to_string()]);
            t.row(["direct_routing".to_string(), c.direct_routing.to_string()]);
            t.row([
                "mtu".to_string(),
                c.mtu.map_or("auto".to_string(), |m| m.to_string()),
            ]);
            t.row([
                "lease_ttl".to_string(),
                format_duration(Duration::from_secs(c.lease_ttl_secs)),
            ]);
            Ok(t.render())
        }
        Format::Json => {
            // Re-serialized through the core type for its field order; a document this
            // version cannot validate (a newer controller) is still shown as it is.
            let text = match overlay_proto::config_from_proto(c) {
                Ok(config) => config.to_json_pretty(),
                Err(_) => {
                    let value: serde_json::Value = serde_json::from_str(&c.json)
                        .context("the controller sent a config that is not JSON")?;
                    serde_json::to_string_pretty(&value)?
                }
            };
            Ok(output::json_safe(text) + "\n")
        }
    }
}

pub fn revoked_note(revoked: &[String]) -> String {
    let noun = if revoked.len() == 1 {
        "lease"
    } else {
        "leases"
    };
    format!(
        "revoked {} {noun} that no longer fit: {}\n",
        revoked.len(),
        revoked.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;

    fn set_args(args: &[&str]) -> SetArgs {
        let cli = crate::tests::parse(&[&["config", "set"], args].concat()).unwrap();
        match cli.command {
            Command::Config(ConfigCommand::Set(a)) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn spec_from_minimal_flags() {
        let spec = spec_from_flags(&set_args(&["--network", "10.244.0.0/16"]));
        assert_eq!(
            spec,
            NetworkConfigSpec {
                network: Some("10.244.0.0/16".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn spec_from_every_flag() {
        let args = set_args(&[
            "--network",
            "10.244.0.0/16",
            "--subnet-len",
            "25",
            "--subnet-min",
            "10.244.1.0/25",
            "--subnet-max",
            "10.244.9.0",
            "--backend",
            "host-gw",
            "--vni",
            "7",
            "--port",
            "4789",
            "--direct-routing",
            "--mtu",
            "1400",
            "--lease-ttl",
            "1h30m",
            "--force",
        ]);
        assert!(args.force);
        let spec = spec_from_flags(&args);
        assert_eq!(
            spec,
            NetworkConfigSpec {
                network: Some("10.244.0.0/16".into()),
                subnet_len: Some(25),
                subnet_min: Some("10.244.1.0/25".into()),
                subnet_max: Some("10.244.9.0".into()),
                backend: Some(BackendSpec {
                    kind: Some("host-gw".into()),
                    vni: Some(7),
                    port: Some(4789),
                    direct_routing: Some(true),
                }),
                mtu: Some(1400),
                lease_ttl: Some(TtlSpec::Text("1h30m".into())),
                ..Default::default()
            }
        );
        let config = spec.validate().unwrap();
        assert_eq!(config.ipv4.unwrap().subnet_max.to_string(), "10.244.9.0/25");
        assert_eq!(config.lease_ttl, Duration::from_secs(5400));
        // What is sent is the spec as JSON, which the controller parses the same way.
        let json = request_json(&args).unwrap();
        assert_eq!(
            overlay_core::NetworkConfig::from_json(&json).unwrap(),
            config
        );
    }

    #[test]
    fn invalid_flags_name_the_field_and_the_flag() {
        let err = |args: &[&str]| request_json(&set_args(args)).unwrap_err().to_string();
        assert!(err(&["--network", "10.1.2.300/24"]).starts_with(
            "invalid config: network (--network): \"10.1.2.300/24\" is not an IPv4 CIDR"
        ));
        assert!(err(&["--network", "10.244.0.0/16", "--subnet-len", "16"])
            .starts_with("invalid config: subnet_len (--subnet-len): "));
        // Values wrong whatever the other flags say are refused when the flags are parsed.
        let usage = |args: &[&str]| {
            let e = crate::tests::parse(
                &[&["config", "set", "--network", "10.244.0.0/16"], args].concat(),
            )
            .expect_err("refused at parse time");
            crate::usage_message(&e)
        };
        assert_eq!(usage(&["--vni", "0"]), "--vni: 0 is not in 1..=16777215");
        assert_eq!(usage(&["--port", "0"]), "--port: 0 is not in 1..=65535");
        assert_eq!(usage(&["--mtu", "100"]), "--mtu: 100 is not in 576..=65535");
        assert_eq!(
            usage(&["--subnet-len", "0"]),
            "--subnet-len: 0 is not in 1..=30"
        );
        assert_eq!(
            usage(&["--lease-ttl", "0s"]),
            "--lease-ttl: 0s is outside 1s..366 days"
        );
        assert!(
            usage(&["--lease-ttl", "soon"]).starts_with("--lease-ttl: \"soon\" is not a duration")
        );
        assert!(usage(&["--lease-ttl", "1500ms"]).contains("whole number of seconds"));
    }

    #[test]
    fn file_documents_are_validated_too() {
        let dir = std::env::temp_dir().join(format!("overlayctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"network":"10.5.0.0/16","backend":{"type":"alloc"}}"#,
        )
        .unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"network":"10.5.0.0/16","backend":{"vni":0}}"#).unwrap();
        let typo = dir.join("typo.json");
        std::fs::write(&typo, r#"{"network":"10.5.0.0/16","lease_tll":"1h"}"#).unwrap();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

        let json = request_json(&set_args(&["--file", &path(&good)])).unwrap();
        assert!(json.contains(r#""type":"alloc""#), "{json}");
        let e = request_json(&set_args(&["--file", &path(&bad)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend.vni") && e.contains("bad.json"), "{e}");
        let e = request_json(&set_args(&["--file", &path(&typo)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease_tll"), "{e}");
        let e = request_json(&set_args(&["--file", &path(&dir.join("missing.json"))])).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn proto_config() -> v1::NetworkConfig {
        let config = NetworkConfigSpec {
            network: Some("10.244.0.0/16".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        overlay_proto::config_to_proto(&config)
    }

    #[test]
    fn config_table() {
        assert_eq!(
            render_config(&proto_config(), Format::Table).unwrap(),
            "network         10.244.0.0/16\n\
             subnet_len      24\n\
             subnet_min      10.244.1.0/24\n\
             subnet_max      10.244.255.0/24\n\
             backend         vxlan\n\
             vni             1\n\
             port            8472\n\
             direct_routing  false\n\
             mtu             auto\n\
             lease_ttl       24h\n"
        );
        let mut c = proto_config();
        c.mtu = Some(1400);
        assert!(render_config(&c, Format::Table)
            .unwrap()
            .contains("\nmtu             1400\n"));
    }

    #[test]
    fn config_json_is_the_canonical_document() {
        let text = render_config(&proto_config(), Format::Json).unwrap();
        assert!(
            text.starts_with("{\n  \"network\": \"10.244.0.0/16\",\n"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["backend"]["type"], "vxlan");
        assert_eq!(v["lease_ttl"], "24h");
    }

    #[test]
    fn config_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.json");
        let doc = r#"{"network":"10.244.0.0/16"}"#;
        let at_limit = format!("{doc}{}", " ".repeat(MAX_CONFIG_BYTES - doc.len()));
        std::fs::write(&path, &at_limit).unwrap();
        let file = path.to_str().unwrap();
        let json = request_json(&set_args(&["--file", file])).unwrap();
        assert_eq!(json, doc);
        // One byte over, and a multi-byte character cut by the bounded read: both are
        // refused for their size, not for what the cut left.
        for tail in [" ", "é"] {
            std::fs::write(&path, format!("{at_limit}{tail}")).unwrap();
            let e = request_json(&set_args(&["--file", file]))
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!("{file}: invalid config: config: the document is 32769 bytes; the limit is 32768")
            );
        }
        assert_eq!(
            read_config(std::io::repeat(b'x')).unwrap().len(),
            MAX_CONFIG_BYTES + 1
        );
    }

    #[test]
    fn revoked_notes() {
        assert_eq!(
            revoked_note(&["10.244.1.0/24".into()]),
            "revoked 1 lease that no longer fit: 10.244.1.0/24\n"
        );
        assert_eq!(
            revoked_note(&["10.244.1.0/24".into(), "10.244.2.0/24".into()]),
            "revoked 2 leases that no longer fit: 10.244.1.0/24, 10.244.2.0/24\n"
        );
    }
}
