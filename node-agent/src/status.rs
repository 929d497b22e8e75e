//! What the agent reports about itself on `/status` (and `overlayctl agent status` prints):
//! the lease, the peers, the last reconcile and what it changed, the firewall in use.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::backend::ReconcileReport;

/// What `/status` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    pub node: String,
    pub ready: bool,
    pub backend: Option<String>,
    pub public_ip: Option<String>,
    pub subnet: Option<String>,
    pub mtu: Option<u32>,
    pub lease_expires_at: Option<String>,
    pub last_renewal: Option<String>,
    pub peers: usize,
    pub watch_revision: i64,
    pub reconciles: u64,
    /// Datapath writes issued since the agent started (0 after a restart into an
    /// unchanged world).
    pub datapath_writes: u64,
    pub last_reconcile: Option<ReconcileReport>,
    pub last_error: Option<String>,
    pub firewall: FirewallStatus,
}

/// The firewall part of `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FirewallStatus {
    /// `nftables`, `iptables-nft`, `iptables-legacy` or `none`.
    pub implementation: Option<String>,
    /// Why it was chosen (`--firewall auto`'s finding, or the flag).
    pub reason: Option<String>,
    /// Repairs after the first reconcile: rules someone changed or removed, put back.
    pub repairs: u64,
    /// When the last repair happened (RFC 3339).
    pub last_repair: Option<String>,
}

pub type SharedStatus = Arc<RwLock<AgentStatus>>;
