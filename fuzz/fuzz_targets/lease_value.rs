//! A lease value read from etcd: decoding never panics, and a value that decodes encodes
//! to bytes that decode to the same record (and encode to the same bytes), including
//! through the gRPC message the controller sends to agents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_core::lease::{format_rfc3339, Lease, LeaseRecord, MAX_LEASE_VALUE_BYTES};
use overlay_proto::{lease_from_proto, lease_to_proto};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = LeaseRecord::decode(data) else {
        return;
    };
    assert!(
        data.len() <= MAX_LEASE_VALUE_BYTES,
        "an oversized value was accepted"
    );

    let bytes = record.encode();
    assert!(
        bytes.len() <= MAX_LEASE_VALUE_BYTES,
        "encodes to more than decode takes"
    );
    let again = LeaseRecord::decode(&bytes).expect("a record's own encoding decodes");
    assert_eq!(
        again,
        record,
        "round trip through {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(again.encode(), bytes, "the encoding is stable");

    // Shown by overlayctl and the agent's status.
    format_rfc3339(record.created_at);
    format_rfc3339(record.renewed_at);

    let lease = Lease {
        subnet: "10.244.7.0/24".parse().unwrap(),
        record,
    };
    let carried = lease_from_proto(&lease_to_proto(&lease, None)).expect("gRPC form is valid");
    assert_eq!(carried, lease);
});
