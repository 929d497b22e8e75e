//! A CNI result (what ADD prints, and the `prevResult` a runtime hands back to CHECK and
//! DEL, possibly extended by later plugins of a chain): parsing never panics, and a result
//! that parses prints as JSON that parses back to the same result (ADD re-prints a
//! `prevResult` it was given). The same bytes as the `prevResult` of a config never make
//! `NetConf::parse` panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::cni::{CniResult, NetConf};

fuzz_target!(|data: &[u8]| {
    let mut conf =
        br#"{"cniVersion":"1.1.0","name":"n","type":"overlay-cni","prevResult":"#.to_vec();
    conf.extend_from_slice(data);
    conf.push(b'}');
    let _ = NetConf::parse(&conf);

    let Ok(result) = serde_json::from_slice::<CniResult>(data) else {
        return;
    };
    let text = serde_json::to_string(&result).expect("a result serializes");
    let again: CniResult = serde_json::from_str(&text).expect("a printed result parses");
    assert_eq!(again, result, "round trip through {text}");

    // The lookups CHECK makes.
    for (index, interface) in result.interfaces.iter().enumerate() {
        let _ = result.sandbox_interface(&interface.name);
        let _ = result.ips_of(index).count();
    }
});
