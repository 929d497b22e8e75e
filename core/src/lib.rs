//! Overlay's pure domain logic.
//!
//! Everything here is plain data and plain functions: no async runtime, no etcd, no
//! netlink. The controller, the agent and `overlayctl` share these types so that one
//! definition of "a valid config", "a free subnet" or "the state after these watch
//! events" exists, and each can be unit-tested without any I/O.

pub mod backoff;
pub mod config;
pub mod datapath;
pub mod host_files;
pub mod lease;
pub mod mac;
pub mod subnet;
pub mod subnet_env;
pub mod watch;

pub use backoff::Backoff;
pub use config::{BackendConfig, BackendType, ConfigError, NetworkConfig, NetworkConfigSpec};
pub use lease::{Lease, LeaseError, LeaseRecord};
pub use mac::MacAddr;
pub use subnet::SubnetRange;
