//! A lease event as an agent or overlayctl receives it over gRPC (protobuf bytes, then
//! `event_from_proto`): neither step panics, and an accepted lease survives every form it
//! is turned into (the gRPC message again, the etcd value, the text overlayctl prints).
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_core::lease::{format_rfc3339, LeaseRecord};
use overlay_proto::{event_from_proto, event_to_proto, lease_from_proto, lease_to_proto, v1};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = v1::LeaseEvent::decode(data) else {
        return;
    };
    if let Some(lease) = &message.lease {
        if let Ok(lease) = lease_from_proto(lease) {
            let again = lease_from_proto(&lease_to_proto(&lease, None)).expect("re-sent lease");
            assert_eq!(again, lease);
            let decoded = LeaseRecord::decode(&lease.record.encode()).expect("etcd form");
            assert_eq!(decoded, lease.record);
            format_rfc3339(lease.record.created_at);
            format_rfc3339(lease.record.renewed_at);
        }
    }
    let Ok(event) = event_from_proto(&message) else {
        return;
    };
    let Some(v1::watch_leases_response::Kind::Event(sent)) = event_to_proto(&event).kind else {
        panic!("an event converts to an event message");
    };
    assert_eq!(event_from_proto(&sent).expect("re-sent event"), event);
});
