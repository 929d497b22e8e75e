//! The gRPC API (`overlay.v1`) and conversions between its messages and the core types.
//!
//! Conversions live here, once, so handlers and clients only call `into()`/`try_from()`.

pub mod v1 {
    tonic::include_proto!("overlay.v1");
}

mod convert;
pub mod daemon;
pub mod durable;
pub mod tls;
pub use convert::*;
