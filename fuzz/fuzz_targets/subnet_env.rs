//! `subnet.env`, written by the agent and read by overlay-cni at every ADD (and by
//! dockerd wrappers, and operators): parsing never panics, and what parses renders to a
//! file that parses to the same values, the way the plugin will use them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::cni::ipam::assignable_range;
use overlay_agent::files::{SubnetEnv, MAX_SUBNET_ENV_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(env) = SubnetEnv::parse(text) else {
        return;
    };
    assert!(
        text.len() <= MAX_SUBNET_ENV_BYTES,
        "an oversized file was accepted"
    );
    let rendered = env.render();
    let again = SubnetEnv::parse(&rendered).expect("a rendered subnet.env parses");
    assert_eq!(again, env, "round trip through {rendered:?}");
    // What ADD computes from it.
    let _ = overlay_core::subnet::gateway(env.subnet);
    let _ = assignable_range(env.subnet);
});
