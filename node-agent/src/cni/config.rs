//! What a CNI invocation hands the plugin: the CNI_* environment and the network config
//! on stdin.
//!
//! Parsing is two-staged so each failure gets the code a runtime expects: bytes that are
//! not JSON are a decoding failure (6); the `cniVersion` is judged next (1), before any
//! other field, because a config of another spec version may legitimately have another
//! shape; only then are the plugin's own fields checked (7, or 2 for `ipam`, which this
//! plugin deliberately does not delegate).

use std::io::Read;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, ErrorCode};
use super::result::CniResult;

/// The spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];
/// The newest supported version: the label of errors raised before the config's own
/// version is known.
pub const LATEST_VERSION: &str = "1.1.0";

pub const DEFAULT_SUBNET_FILE: &str = "/run/overlay/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/overlay";
pub const DEFAULT_BRIDGE: &str = "ovl0";
/// Largest network config accepted on stdin. A real one (with a `prevResult` from a long
/// chain) is a few KiB; the bound caps what a runtime, or anything that can write to the
/// plugin's stdin, can make it hold in memory.
pub const MAX_STDIN_BYTES: usize = 1 << 20;
/// Longest network name: the name is a directory under `dataDir` (NAME_MAX).
pub const MAX_NETWORK_NAME: usize = 255;

/// Reads the network config from `input`: at most [`MAX_STDIN_BYTES`] + 1 bytes, so that
/// [`NetConf::parse`] can tell an oversized config from one at the limit without the
/// plugin ever holding more.
pub fn read_stdin(input: impl Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    input
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The error for a config over [`MAX_STDIN_BYTES`].
pub fn oversized_stdin(len: usize) -> CniError {
    CniError::new(
        ErrorCode::Decoding,
        format!("the network config on stdin is over the limit of {MAX_STDIN_BYTES} bytes"),
    )
    .with_details(format!("read {len} bytes"))
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// Spec 1.1.
    Gc,
    /// Spec 1.1.
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// The CNI_* environment of one invocation. Values are kept as given; the `require_*`
/// methods check what a command needs and say which variable is wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

fn invalid_env(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg)
}

impl CniEnv {
    /// Reads the CNI_* variables through `var` (e.g. `|k| std::env::var(k).ok()`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> CniEnv {
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    pub fn command(&self) -> Result<Command, CniError> {
        let raw = self
            .command
            .as_deref()
            .ok_or_else(|| invalid_env("CNI_COMMAND is not set".into()))?;
        Command::parse(raw).ok_or_else(|| {
            invalid_env(format!(
                "CNI_COMMAND={raw:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
            ))
        })
    }

    /// CNI_CONTAINERID: alphanumeric first, then alphanumerics, `_`, `.` or `-`.
    pub fn require_container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid_env("CNI_CONTAINERID is not set".into()))?;
        if !valid_container_id(id) {
            return Err(invalid_env(format!(
                "CNI_CONTAINERID={id:?} must start with a letter or digit and hold only \
                 letters, digits, '_', '.' and '-'"
            )));
        }
        Ok(id)
    }

    /// CNI_IFNAME: a Linux interface name (1-15 bytes, no '/', ':' or whitespace).
    pub fn require_ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid_env("CNI_IFNAME is not set".into()))?;
        if !valid_ifname(name) {
            return Err(invalid_env(format!(
                "CNI_IFNAME={name:?} is not a valid interface name (1-15 bytes, not '.' or \
                 '..', no '/', ':' or whitespace)"
            )));
        }
        Ok(name)
    }

    /// CNI_NETNS, which ADD and CHECK need; DEL may get it empty (containerd).
    pub fn require_netns(&self) -> Result<&str, CniError> {
        self.netns
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid_env("CNI_NETNS is not set".into()))
    }

    /// CNI_NETNS when set and non-empty.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref().filter(|s| !s.is_empty())
    }
}

pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// A network name: also a directory name under `dataDir`, so nothing that could climb
/// out of it.
pub fn valid_network_name(name: &str) -> bool {
    name.len() <= MAX_NETWORK_NAME && valid_container_id(name)
}

/// One entry of `cni.dev/valid-attachments` (GC), and the key of an IPAM reservation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network config, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The agent's `subnet.env`.
    pub subnet_file: PathBuf,
    /// IPAM state lives in `<dataDir>/<name>/`.
    pub data_dir: PathBuf,
    /// The agent's bridge that host veth ends join.
    pub bridge: String,
    /// Overrides `OVERLAY_MTU` from `subnet.env`.
    pub mtu: Option<u32>,
    /// Hairpin mode on the host veth's bridge port (as the reference `bridge` plugin's
    /// `hairpinMode`); default on, so a container reaches its own published ports.
    pub hairpin_mode: bool,
    pub prev_result: Option<CniResult>,
    /// GC only: `cni.dev/valid-attachments` (libcni also sends `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    subnet_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    bridge: Option<String>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    pub fn version_supported(version: &str) -> bool {
        SUPPORTED_VERSIONS.contains(&version)
    }

    /// Whether the config's version is at least 1.1.0 (GC, STATUS, interface MTU).
    pub fn is_1_1(&self) -> bool {
        self.cni_version != "1.0.0"
    }

    /// The `cniVersion` of `stdin` when it is one this plugin speaks: the label for an
    /// error about the rest of the config.
    pub fn peek_version(stdin: &[u8]) -> Option<String> {
        if stdin.len() > MAX_STDIN_BYTES {
            return None;
        }
        let v: Value = serde_json::from_slice(stdin).ok()?;
        let version = v.get("cniVersion")?.as_str()?;
        Self::version_supported(version).then(|| version.to_string())
    }

    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        if stdin.len() > MAX_STDIN_BYTES {
            return Err(oversized_stdin(stdin.len()));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decoding,
                "the network config on stdin is not JSON",
            )
            .with_details(e)
        })?;
        let Value::Object(map) = &value else {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "the network config must be a JSON object",
            ));
        };
        let version = match map.get("cniVersion") {
            None => {
                return Err(CniError::new(
                    ErrorCode::IncompatibleVersion,
                    format!(
                        "the network config has no cniVersion (0.1.0 implied); this plugin \
                         supports {}",
                        SUPPORTED_VERSIONS.join(", ")
                    ),
                ))
            }
            Some(Value::String(v)) => v.clone(),
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("cniVersion must be a string, not {other}"),
                ))
            }
        };
        if !Self::version_supported(&version) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "cniVersion {version:?} is not supported; this plugin supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if map.contains_key("ipam") {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                "\"ipam\" is not supported: overlay-cni assigns addresses from the host's \
                 overlay subnet itself; remove the ipam section",
            ));
        }
        let raw: RawNetConf = serde_json::from_value(value.clone()).map_err(|e| {
            CniError::new(ErrorCode::InvalidConfig, "invalid network config").with_details(e)
        })?;
        if !valid_network_name(&raw.name) {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "network name {:?} must be at most {MAX_NETWORK_NAME} bytes, start with a \
                     letter or digit and hold only letters, digits, '_', '.' and '-'",
                    raw.name.chars().take(64).collect::<String>()
                ),
            ));
        }
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        if !valid_ifname(&bridge) {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("bridge {bridge:?} is not a valid interface name"),
            ));
        }
        if let Some(mtu) = raw.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("mtu {mtu} is outside 68..=65535"),
                ));
            }
        }
        let prev_result = match map.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(prev) => Some(
                serde_json::from_value::<CniResult>(prev.clone()).map_err(|e| {
                    CniError::new(ErrorCode::Decoding, "prevResult is not a CNI result")
                        .with_details(e)
                })?,
            ),
        };
        Ok(NetConf {
            cni_version: version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            subnet_file: raw
                .subnet_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE)),
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            bridge,
            mtu: raw.mtu,
            hairpin_mode: raw.hairpin_mode.unwrap_or(true),
            prev_result,
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(stdin: &str) -> u32 {
        NetConf::parse(stdin.as_bytes()).unwrap_err().code.code()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"overlay","type":"overlay-cni"}"#)
            .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.bridge, "ovl0");
        assert_eq!(c.mtu, None);
        assert!(c.hairpin_mode);
        assert!(!c.is_1_1());
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"overlay-cni","subnetFile":"/s",
                "dataDir":"/d","bridge":"br1","mtu":1400,"unknownKey":1,"hairpinMode":false,
                "cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/s"));
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!((c.bridge.as_str(), c.mtu), ("br1", Some(1400)));
        assert!(!c.hairpin_mode);
        assert!(c.is_1_1());
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "c1");
    }

    #[test]
    fn each_kind_of_bad_config_gets_its_spec_code() {
        assert_eq!(code("{not json"), 6);
        assert_eq!(code("[1]"), 7);
        assert_eq!(code(r#"{"name":"n","type":"t"}"#), 1);
        assert_eq!(code(r#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#), 1);
        assert_eq!(code(r#"{"cniVersion":1,"name":"n","type":"t"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","type":"t"}"#), 7);
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"../x","type":"t"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":"big"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":20}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","bridge":"a/b"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"type":"host-local"}}"#),
            2
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":3}}"#),
            6
        );
    }

    #[test]
    fn stdin_and_network_names_are_bounded() {
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#;
        let mut at_limit = conf.to_vec();
        at_limit.resize(MAX_STDIN_BYTES, b' ');
        assert!(NetConf::parse(&at_limit).is_ok());
        assert_eq!(NetConf::peek_version(&at_limit).as_deref(), Some("1.0.0"));
        let mut over = at_limit.clone();
        over.push(b' ');
        let e = NetConf::parse(&over).unwrap_err();
        assert_eq!(e.code.code(), 6);
        assert!(e.msg.contains("over the limit of 1048576 bytes"), "{e}");
        assert_eq!(NetConf::peek_version(&over), None);
        // The reader stops one byte past the limit, whatever is behind it.
        let endless = std::io::repeat(b' ');
        assert_eq!(read_stdin(endless).unwrap().len(), MAX_STDIN_BYTES + 1);
        assert_eq!(read_stdin(&conf[..]).unwrap(), conf);

        let named = |name: &str| {
            serde_json::json!({"cniVersion": "1.0.0", "name": name, "type": "t"}).to_string()
        };
        assert!(NetConf::parse(named(&"n".repeat(255)).as_bytes()).is_ok());
        assert_eq!(code(&named(&"n".repeat(256))), 7);
    }

    #[test]
    fn environment_values_are_checked() {
        let env = CniEnv::from_vars(|k| {
            match k {
                "CNI_COMMAND" => Some("ADD"),
                "CNI_CONTAINERID" => Some("-bad"),
                "CNI_IFNAME" => Some("eth0:1"),
                "CNI_NETNS" => Some(""),
                _ => None,
            }
            .map(String::from)
        });
        assert_eq!(env.command().unwrap(), Command::Add);
        assert_eq!(env.require_container_id().unwrap_err().code.code(), 4);
        assert_eq!(env.require_ifname().unwrap_err().code.code(), 4);
        assert_eq!(env.require_netns().unwrap_err().code.code(), 4);
        assert_eq!(env.netns(), None);
        assert!(valid_container_id("a1_b.c-d"));
        assert!(valid_ifname("eth0"));
        assert!(!valid_ifname("sixteen-chars-xx"));
        assert_eq!(CniEnv::default().command().unwrap_err().code.code(), 4);
    }
}
