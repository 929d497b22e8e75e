//! A small CNI runtime: runs a conflist's plugins the way libcni does, so lab workloads
//! are attached by exactly the code path a container runtime uses.
//!
//! Why not call the plugin library directly: the point of attaching lab workloads through
//! CNI is that `overlayctl lab` exercises what podman or containerd exercise — the
//! `overlay-cni` binary, driven by CNI_* variables and a network config on stdin, chained
//! with the standard `portmap` plugin through `prevResult` and `runtimeConfig`. Anything
//! less would let the lab pass while a runtime fails.
//!
//! What this runtime does like libcni: ADD runs the plugins in list order, each getting the
//! list's `cniVersion` and `name`, the previous plugin's result as `prevResult`, and a
//! `runtimeConfig` holding only the capabilities the plugin declares; DEL runs them in
//! reverse with the cached final result as `prevResult`. Plugins run inside the host
//! namespace (where a runtime on that host would run them) with CNI_PATH set.
//!
//! The conflist is used exactly as the agent installed it: each lab agent writes its
//! host's own `dataDir` (`--cni-data-dir`, under the lab directory, since every lab host
//! shares one filesystem) into it, so lab workloads and a real runtime on that host share
//! one reservation store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{netns, LabError};

/// Where the reference plugins (portmap, bridge, host-local, ...) live on Debian.
pub const SYSTEM_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// One `--publish HOSTPORT:PORT[/tcp|udp]`, as the `portMappings` capability carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    pub protocol: String,
}

impl FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<PortMapping, String> {
        let (ports, protocol) = match s.split_once('/') {
            Some((p, proto)) => (p, proto.to_ascii_lowercase()),
            None => (s, "tcp".to_string()),
        };
        if protocol != "tcp" && protocol != "udp" {
            return Err(format!(
                "{s:?}: the protocol must be tcp or udp, not {protocol:?}"
            ));
        }
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not HOSTPORT:PORT[/tcp|udp]"))?;
        let port = |p: &str, what: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{s:?}: {what} {p:?} is not a port (1-65535)")),
            }
        };
        Ok(PortMapping {
            host_port: port(host, "host port")?,
            container_port: port(container, "container port")?,
            protocol,
        })
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// One attachment: what CNI_* says and where the plugins are.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The namespace the plugins run in (the lab host's).
    pub host_ns: &'a str,
    pub container_id: &'a str,
    /// CNI_NETNS: a path (`/run/netns/NAME`); DEL may run without one.
    pub netns_path: Option<&'a Path>,
    pub ifname: &'a str,
    /// Searched in order for each plugin `type`; also CNI_PATH.
    pub plugin_dirs: &'a [PathBuf],
    pub port_mappings: &'a [PortMapping],
}

/// A parsed conflist: its version, name and plugin configs.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<serde_json::Map<String, Value>>,
}

impl ConfList {
    pub fn load(path: &Path) -> Result<ConfList, LabError> {
        let text = std::fs::read(path).map_err(|e| LabError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
        ConfList::parse(&text).map_err(|message| LabError::File {
            path: path.into(),
            message,
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<ConfList, String> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not a CNI conflist: {e}"))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("the conflist has no string {k:?}"))
        };
        let plugins = v
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or("the conflist has no plugins")?
            .iter()
            .map(|p| {
                p.as_object()
                    .filter(|o| o.get("type").and_then(Value::as_str).is_some())
                    .cloned()
                    .ok_or_else(|| format!("a plugin without a type: {p}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ConfList {
            cni_version: field("cniVersion")?,
            name: field("name")?,
            plugins,
        })
    }

    /// The stdin of plugin `index` for one invocation, as libcni builds it.
    fn plugin_conf(
        &self,
        index: usize,
        inv: &Invocation,
        prev_result: Option<&Value>,
    ) -> serde_json::Map<String, Value> {
        let mut conf = self.plugins[index].clone();
        conf.insert("cniVersion".into(), json!(self.cni_version));
        conf.insert("name".into(), json!(self.name));
        // runtimeConfig carries only what the plugin declared it can take, and nothing
        // when there is nothing to carry (libcni's behaviour: portmap then does nothing).
        let wants_ports = conf
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if wants_ports && !inv.port_mappings.is_empty() {
            conf.insert(
                "runtimeConfig".into(),
                json!({ "portMappings": inv.port_mappings }),
            );
        }
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        conf
    }
}

fn plugin_type(conf: &serde_json::Map<String, Value>) -> &str {
    conf.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// The path of plugin `plugin_type` in the first directory that has it.
pub fn find_plugin(plugin_type: &str, dirs: &[PathBuf]) -> Result<PathBuf, LabError> {
    dirs.iter()
        .map(|d| d.join(plugin_type))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            let hint = if plugin_type == "portmap" {
                " (apt-get install containernetworking-plugins)"
            } else {
                ""
            };
            LabError::Invalid(format!(
                "CNI plugin {plugin_type:?} not found in {}{hint}",
                searched.join(", ")
            ))
        })
}

/// Runs every plugin of `list` for ADD; returns the final result.
pub fn add(list: &ConfList, inv: &Invocation) -> Result<Value, LabError> {
    let mut prev: Option<Value> = None;
    for i in 0..list.plugins.len() {
        let conf = list.plugin_conf(i, inv, prev.as_ref());
        let out = invoke("ADD", &conf, inv)?;
        let result: Value = serde_json::from_str(&out).map_err(|e| LabError::Cni {
            plugin: plugin_type(&conf).into(),
            command: "ADD".into(),
            message: format!("the result is not JSON ({e}): {out}"),
        })?;
        prev = Some(result);
    }
    Ok(prev.expect("a conflist has plugins"))
}

/// Runs every plugin of `list` for DEL, in reverse, with `result` (the ADD's) as
/// `prevResult`. Keeps going past failures so one broken plugin does not strand what the
/// others hold; returns the first failure.
pub fn del(list: &ConfList, inv: &Invocation, result: Option<&Value>) -> Result<(), LabError> {
    let mut first_error = None;
    for i in (0..list.plugins.len()).rev() {
        let conf = list.plugin_conf(i, inv, result);
        if let Err(e) = invoke("DEL", &conf, inv) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The first IPv4 address of a CNI result, without its prefix length.
pub fn result_ipv4(result: &Value) -> Option<String> {
    result
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .find_map(|a| {
            let addr = a.split('/').next()?;
            addr.parse::<std::net::Ipv4Addr>()
                .ok()
                .map(|_| addr.to_string())
        })
}

/// Runs one plugin; its stdout on success, its error JSON's message otherwise.
fn invoke(
    command: &str,
    conf: &serde_json::Map<String, Value>,
    inv: &Invocation,
) -> Result<String, LabError> {
    let ty = plugin_type(conf).to_string();
    let path = find_plugin(&ty, inv.plugin_dirs)?;
    let cni_path = std::env::join_paths(inv.plugin_dirs).unwrap_or_default();
    let mut cmd = Command::new(&path);
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_PATH", cni_path)
        // The reference plugins run iptables by name.
        .env(
            "PATH",
            format!(
                "/usr/sbin:/usr/bin:/sbin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    cmd.env("CNI_NETNS", inv.netns_path.unwrap_or(Path::new("")));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    netns::in_netns(&mut cmd, inv.host_ns)?;
    let failed = |message: String| LabError::Cni {
        plugin: ty.clone(),
        command: command.into(),
        message,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", path.display())))?;
    let stdin = serde_json::to_vec(conf).expect("config serializes");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&stdin)
        .map_err(|e| failed(format!("writing its config: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    // A spec error: {"code": N, "msg": "...", "details": "..."}.
    let message = match serde_json::from_str::<Value>(&stdout) {
        Ok(v) if v.get("msg").is_some() => {
            let mut m = format!(
                "{} (code {})",
                v["msg"].as_str().unwrap_or_default(),
                v["code"]
            );
            if let Some(d) = v.get("details").and_then(Value::as_str) {
                if !d.is_empty() {
                    m.push_str(&format!(": {d}"));
                }
            }
            m
        }
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            format!(
                "{} {}",
                out.status,
                format!("{} {}", stdout.trim(), stderr.trim()).trim()
            )
        }
    };
    Err(failed(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse_and_print() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            m,
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into()
            }
        );
        assert_eq!(m.to_string(), "8080:80/tcp");
        assert_eq!(
            "53:5353/UDP".parse::<PortMapping>().unwrap().protocol,
            "udp"
        );
        for bad in ["8080", "8080:80/sctp", "0:80", "8080:70000", "a:b", ":80"] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
        );
    }

    fn list() -> ConfList {
        ConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"overlay","plugins":[
                {"type":"overlay-cni","subnetFile":"/x/subnet.env","bridge":"ovl0"},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn plugin_configs_are_built_as_libcni_builds_them() {
        let list = list();
        let dirs = vec![PathBuf::from("/nowhere")];
        let ports = vec!["8080:80".parse().unwrap()];
        let inv = Invocation {
            host_ns: "ns",
            container_id: "c1",
            netns_path: None,
            ifname: "eth0",
            plugin_dirs: &dirs,
            port_mappings: &ports,
        };
        let first = list.plugin_conf(0, &inv, None);
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["name"], "overlay");
        assert!(
            !first.contains_key("runtimeConfig"),
            "not a capability of it"
        );
        assert!(!first.contains_key("prevResult"));
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}]});
        let second = list.plugin_conf(1, &inv, Some(&prev));
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        let no_ports = Invocation {
            port_mappings: &[],
            ..inv
        };
        assert!(!list
            .plugin_conf(1, &no_ports, Some(&prev))
            .contains_key("runtimeConfig"));
        assert_eq!(result_ipv4(&prev).as_deref(), Some("10.244.1.2"));
    }

    #[test]
    fn bad_conflists_and_missing_plugins_are_named() {
        assert!(ConfList::parse(b"{").is_err());
        assert!(ConfList::parse(br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).is_err());
        assert!(ConfList::parse(br#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#).is_err());
        let e = find_plugin("portmap", &[PathBuf::from("/nowhere")]).unwrap_err();
        assert!(e.to_string().contains("containernetworking-plugins"), "{e}");
    }
}
