//! What Overlay's three binaries share around the gRPC API of `overlay-proto`:
//!
//! - [`tls`]: certificate files, the rustls configurations, identities from certificates;
//! - [`flags`]: the TLS flags, declared once and flattened into each binary's arguments;
//! - [`connect`]: dialling the controllers: the endpoint settings, failover between
//!   controllers, and the one rule for "that was the connection, not the answer";
//! - [`daemon`]: the daemons' logging, stop signals and `--addr-file`;
//! - [`durable`]: crash-safe file writes (state, subnet.env, IPAM, keys);
//! - [`netns`]: entering a network namespace.
//!
//! The API itself (messages, services, conversions) stays in `overlay-proto`.

pub mod connect;
pub mod daemon;
pub mod durable;
pub mod flags;
pub mod netns;
pub mod tls;
