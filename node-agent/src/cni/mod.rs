//! `overlay-cni`: the CNI plugin (spec 1.0.0 and 1.1.0) that attaches containers of a
//! real runtime (podman, containerd, ...) to the overlay, through the agent's bridge.
//!
//! Division of labour with the agent: the agent owns the host's subnet lease, writes it
//! to `subnet.env` and owns the bridge (its address is the subnet's gateway). The plugin
//! owns nothing long-lived but its IPAM directory; it reads `subnet.env` at every ADD, so
//! it never caches a subnet the agent has since changed, and it never creates the bridge:
//! a missing bridge means the agent is not ready, which the runtime hears as "try again
//! later" (code 11) instead of containers landing on a bridge nobody routes.
//!
//! Addresses are assigned by the plugin itself ([`ipam`]), not by a delegated IPAM plugin:
//! the range is by construction the agent's subnet minus the gateway, so there is nothing
//! to configure and nothing to get out of step.
//!
//! The plugin is meant to run first in a conflist, followed by the standard `portmap`
//! plugin for published ports ([`conflist`]).

pub mod commands;
pub mod config;
pub mod error;
pub mod ipam;
pub mod result;

use std::path::Path;

pub use commands::{host_veth_name, run, Output};
pub use config::{Attachment, CniEnv, Command, NetConf, SUPPORTED_VERSIONS};
pub use error::{CniError, ErrorCode};
pub use result::CniResult;

/// The plugin's binary name, and its `type` in a network config.
pub const PLUGIN_TYPE: &str = "overlay-cni";

/// A conflist (cniVersion 1.0.0) for network `name`: overlay-cni reading `subnet_file`
/// and attaching to `bridge`, then `portmap` for `-p HOSTPORT:PORT` publishing.
pub fn conflist(name: &str, subnet_file: &Path, bridge: &str, data_dir: Option<&Path>) -> String {
    let mut plugin = serde_json::json!({
        "type": PLUGIN_TYPE,
        "subnetFile": subnet_file,
        "bridge": bridge,
    });
    if let Some(dir) = data_dir {
        plugin["dataDir"] = serde_json::json!(dir);
    }
    let list = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            plugin,
            {
                "type": "portmap",
                "capabilities": {"portMappings": true},
            },
        ],
    });
    let mut text = serde_json::to_string_pretty(&list).expect("conflist serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_chains_overlay_cni_and_portmap() {
        let text = conflist(
            "overlay",
            Path::new("/run/overlay/subnet.env"),
            "ovl0",
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "overlay");
        assert_eq!(v["plugins"][0]["type"], "overlay-cni");
        assert_eq!(v["plugins"][0]["subnetFile"], "/run/overlay/subnet.env");
        assert_eq!(v["plugins"][0]["bridge"], "ovl0");
        assert_eq!(
            v["plugins"][1],
            serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}})
        );
        // What a runtime hands the plugin (the list's version and name, one plugin's
        // fields) is a valid config.
        let mut one = v["plugins"][0].clone();
        one["cniVersion"] = v["cniVersion"].clone();
        one["name"] = v["name"].clone();
        let conf = NetConf::parse(one.to_string().as_bytes()).unwrap();
        assert_eq!(conf.bridge, "ovl0");
    }
}
