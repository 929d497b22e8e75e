//! The network config a runtime writes to overlay-cni's stdin: `NetConf::parse` never
//! panics, a config it accepts holds only values the commands can use, and a refusal is
//! always the spec's error JSON. VERSION, the one command that touches nothing on the
//! host, runs through `cni::run` on the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::cni::config::{
    valid_ifname, valid_network_name, CniEnv, NetConf, LATEST_VERSION, MAX_STDIN_BYTES,
};

fuzz_target!(|data: &[u8]| {
    let version = NetConf::peek_version(data);
    match NetConf::parse(data) {
        Ok(conf) => {
            assert!(
                data.len() <= MAX_STDIN_BYTES,
                "an oversized config was accepted"
            );
            assert!(valid_network_name(&conf.name), "{:?}", conf.name);
            assert!(valid_ifname(&conf.bridge), "{:?}", conf.bridge);
            assert!(conf.mtu.is_none_or(|m| (68..=65535).contains(&m)));
            assert_eq!(version.as_deref(), Some(conf.cni_version.as_str()));
            if let Some(prev) = &conf.prev_result {
                serde_json::to_string(prev).expect("prevResult serializes");
            }
        }
        Err(e) => {
            let label = version.unwrap_or_else(|| LATEST_VERSION.to_string());
            let json: serde_json::Value =
                serde_json::from_str(&e.to_json(&label)).expect("errors are JSON");
            assert_eq!(json["code"], e.code.code());
        }
    }

    let env = CniEnv {
        command: Some("VERSION".into()),
        ..CniEnv::default()
    };
    let out = futures::executor::block_on(overlay_agent::cni::run(&env, data));
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("VERSION is JSON");
    assert!(json["supportedVersions"].is_array());
});
