//! The gRPC API (`overlay.v1`) and conversions between its messages and the core types.
//!
//! Conversions live here, once, so handlers and clients only call `into()`/`try_from()`.

pub mod v1 {
    // A watch response is a snapshot or one event; boxing the event would change every
    // generated constructor for a few hundred bytes per message.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("overlay.v1");
}

mod convert;
pub use convert::*;
