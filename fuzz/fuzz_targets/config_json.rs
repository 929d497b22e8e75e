//! The network config document (`overlayctl config set --file`, `SetConfig` over gRPC,
//! the value in etcd): parsing never panics, and a config that parses is stored as JSON
//! that parses back to the same config, through every path that carries it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_core::config::{NetworkConfig, MAX_CONFIG_BYTES};
use overlay_proto::{config_from_proto, config_to_proto};

fuzz_target!(|data: &[u8]| {
    // The JSON parser sees bytes as text; invalid UTF-8 is refused before it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = NetworkConfig::from_json(text) else {
        return;
    };
    assert!(
        text.len() <= MAX_CONFIG_BYTES,
        "an oversized document was accepted"
    );

    let stored = config.to_json();
    let again = NetworkConfig::from_json(&stored).expect("a config's own JSON is valid");
    assert_eq!(again, config, "round trip through {stored}");
    assert_eq!(again.to_json(), stored, "the stored form is stable");
    let pretty = NetworkConfig::from_json(&config.to_json_pretty()).expect("pretty JSON is valid");
    assert_eq!(pretty, config);
    let typed: NetworkConfig = serde_json::from_str(&stored).expect("serde path agrees");
    assert_eq!(typed, config);
    let carried = config_from_proto(&config_to_proto(&config)).expect("gRPC form is valid");
    assert_eq!(carried, config);

    // What the controller computes from a validated config never panics.
    let range = config.range();
    assert!(range.len() >= 2);
    assert!(config.fits(config.subnet_min) && config.fits(config.subnet_max));
});
