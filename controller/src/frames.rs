//! The watch stream's messages as gRPC frames, encoded once and shared by every stream.
//!
//! A `WatchLeasesResponse` goes on the wire as a gRPC frame: a flag byte (0: not
//! compressed), its length (4 bytes, big endian), then the protobuf message. The fan-out
//! encodes each event into such a frame once and hands the same [`Bytes`] (reference
//! counted, never copied) to every client stream, instead of each stream cloning the
//! message and encoding it into a buffer of its own: with thousands of streams that was
//! most of the controller's memory (each stream kept a buffer as large as the largest
//! message it ever sent, its snapshot) and most of its work per event.
//!
//! A snapshot holds every lease. It is assembled from per-lease pieces that are encoded
//! when the lease changes ([`lease_part`]): a snapshot is then one allocation and a copy of
//! those pieces, and streams that start at the same revision share one.

use bytes::{BufMut, Bytes, BytesMut};
use overlay_core::lease::Lease;
use overlay_core::watch::LeaseEvent;
use overlay_proto::v1::WatchLeasesResponse;
use overlay_proto::{event_to_proto, lease_to_proto};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

/// The gRPC frame header: compression flag and length.
pub const HEADER_LEN: usize = 5;

/// `WatchLeasesResponse.snapshot` (a `LeaseSnapshot`).
const RESPONSE_SNAPSHOT: u32 = 1;
/// `LeaseSnapshot.revision`.
const SNAPSHOT_REVISION: u32 = 1;
/// `LeaseSnapshot.leases` (repeated `Lease`).
const SNAPSHOT_LEASES: u32 = 2;

fn key_len(tag: u32) -> usize {
    prost::encoding::key_len(tag)
}

fn header(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("a watch message under 4 GiB"));
}

/// The gRPC frame of one message.
pub fn frame(message: &WatchLeasesResponse) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    header(&mut buf, len);
    message
        .encode(&mut buf)
        .expect("the buffer has room for the message");
    buf.freeze()
}

/// The frame of one event.
pub fn event_frame(event: &LeaseEvent) -> Bytes {
    frame(&event_to_proto(event))
}

/// One lease as an element of `LeaseSnapshot.leases`: field key, length, message.
pub fn lease_part(lease: &Lease) -> Bytes {
    let message = lease_to_proto(lease, None);
    let len = message.encoded_len();
    let mut buf =
        BytesMut::with_capacity(key_len(SNAPSHOT_LEASES) + encoded_len_varint(len as u64) + len);
    encode_key(SNAPSHOT_LEASES, WireType::LengthDelimited, &mut buf);
    encode_varint(len as u64, &mut buf);
    message
        .encode(&mut buf)
        .expect("the buffer has room for the lease");
    buf.freeze()
}

/// The frame of a snapshot at `revision` made of `parts` ([`lease_part`]s, in the order
/// the leases are listed). Byte for byte what encoding the message would give.
pub fn snapshot_frame(revision: i64, parts: &[&[u8]]) -> Bytes {
    let leases_len: usize = parts.iter().map(|p| p.len()).sum();
    // proto3 leaves a zero revision out.
    let revision_len = if revision != 0 {
        key_len(SNAPSHOT_REVISION) + encoded_len_varint(revision as u64)
    } else {
        0
    };
    let snapshot_len = revision_len + leases_len;
    let message_len =
        key_len(RESPONSE_SNAPSHOT) + encoded_len_varint(snapshot_len as u64) + snapshot_len;
    let mut buf = BytesMut::with_capacity(HEADER_LEN + message_len);
    header(&mut buf, message_len);
    encode_key(RESPONSE_SNAPSHOT, WireType::LengthDelimited, &mut buf);
    encode_varint(snapshot_len as u64, &mut buf);
    if revision != 0 {
        encode_key(SNAPSHOT_REVISION, WireType::Varint, &mut buf);
        encode_varint(revision as u64, &mut buf);
    }
    for p in parts {
        buf.put_slice(p);
    }
    debug_assert_eq!(buf.len(), HEADER_LEN + message_len);
    buf.freeze()
}

/// The message of a frame made here (for in-process readers: tests, `Fanout::subscribe`).
pub fn decode(frame: &[u8]) -> Result<WatchLeasesResponse, String> {
    if frame.len() < HEADER_LEN || frame[0] != 0 {
        return Err("not an uncompressed gRPC frame".into());
    }
    WatchLeasesResponse::decode(&frame[HEADER_LEN..]).map_err(|e| e.to_string())
}

/// Every message of a chunk of consecutive frames.
pub fn decode_all(mut chunk: &[u8]) -> Result<Vec<WatchLeasesResponse>, String> {
    let mut out = Vec::new();
    while !chunk.is_empty() {
        if chunk.len() < HEADER_LEN {
            return Err("a truncated gRPC frame".into());
        }
        let len = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
        let end = HEADER_LEN + len;
        if chunk.len() < end {
            return Err("a truncated gRPC frame".into());
        }
        out.push(decode(&chunk[..end])?);
        chunk = &chunk[end..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::lease::{from_unix_millis, BackendData, LeaseRecord};
    use overlay_core::watch::ChangeKind;
    use overlay_core::BackendType;
    use overlay_proto::snapshot_to_proto;

    fn lease(i: u8, mac: bool) -> Lease {
        Lease {
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            record: LeaseRecord {
                node: format!("node-{i}"),
                public_ip: Some(format!("192.0.2.{i}").parse().unwrap()),
                public_ipv6: None,
                ipv6_subnet: None,
                backend: BackendType::Vxlan,
                backend_data: BackendData {
                    vtep_mac: mac.then(|| format!("02:00:00:00:00:{i:02x}").parse().unwrap()),
                    iface: mac.then(|| "eth1".to_string()),
                    underlay: None,
                    underlay_v6: None,
                },
                reserved: i.is_multiple_of(2),
                created_at: from_unix_millis(1_700_000_000_000 + i as i64),
                renewed_at: from_unix_millis(1_700_000_000_500 + i as i64),
            },
        }
    }

    fn prost_frame(m: &WatchLeasesResponse) -> Vec<u8> {
        let body = m.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The assembled snapshot is exactly what prost encodes, for any number of leases and
    /// revisions whose varints have different lengths (0 is left out, as proto3 does).
    #[test]
    fn an_assembled_snapshot_is_the_encoded_message() {
        for (n, revision) in [(0usize, 0i64), (1, 1), (3, 127), (40, 128), (200, 1 << 40)] {
            let leases: Vec<Lease> = (0..n).map(|i| lease(i as u8, i % 3 != 0)).collect();
            let parts: Vec<Bytes> = leases.iter().map(lease_part).collect();
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
            let assembled = snapshot_frame(revision, &refs);
            let expected = snapshot_to_proto(revision, &leases);
            assert_eq!(
                assembled.as_ref(),
                prost_frame(&expected),
                "n={n} rev={revision}"
            );
            assert_eq!(decode(&assembled).unwrap(), expected);
        }
    }

    #[test]
    fn an_event_frame_is_the_encoded_message() {
        let e = LeaseEvent {
            revision: 42,
            kind: ChangeKind::Removed,
            lease: lease(7, true),
        };
        let f = event_frame(&e);
        assert_eq!(f.as_ref(), prost_frame(&event_to_proto(&e)));
        assert_eq!(decode(&f).unwrap(), event_to_proto(&e));
        assert!(decode(&f[1..]).is_err());
        let two = [f.as_ref(), f.as_ref()].concat();
        assert_eq!(decode_all(&two).unwrap().len(), 2);
        assert!(decode_all(&two[..two.len() - 1]).is_err());
    }
}
