//! overlay-agent: holds this host's subnet lease and keeps the kernel's forwarding state
//! equal to what the leases of all hosts call for.

pub mod agent;
pub mod backend;
pub mod cni;
pub mod control_plane;
pub mod datapath;
pub mod files;
pub mod firewall;
pub mod health;
pub mod hostnet;
pub mod metrics;
pub mod readiness;
pub mod status;
pub mod sysctl;
