//! Backends: how this host's lease and its peers' leases become forwarding.
//!
//! Each backend is a [`Backend`] and one entry in [`create`], the name-to-constructor
//! registry (Flannel's backend.Register): the agent never matches on backend types
//! anywhere else, so adding one touches this file and its own module only.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use overlay_core::config::NetworkConfig;
use overlay_core::datapath::Route;
use overlay_core::lease::{BackendData, Lease};
use overlay_core::BackendType;
use serde::Serialize;

use crate::datapath::{Datapath, Netlink, NetlinkError};
use crate::firewall::Firewall;
use crate::hostnet::HostInfo;
use crate::sysctl::{ProcSysctl, Sysctl};

pub mod alloc;
mod forwarding;
pub mod hostgw;
pub mod vxlan;

/// What every backend may need from the agent.
#[derive(Debug, Clone)]
pub struct BackendContext {
    pub node: String,
    pub config: NetworkConfig,
    pub host: HostInfo,
    pub state_dir: PathBuf,
    /// `None` with `--bridge none`.
    pub bridge: Option<String>,
    pub ip_masq: bool,
    pub effects: HostEffects,
}

/// Everything a backend changes on the host, injected (as netavark injects its firewall
/// driver): the kernel's forwarding entries and devices, the packet filter, and sysctls.
/// The agent passes [`HostEffects::kernel`]; tests pass fakes, and the backends cannot tell
/// the difference.
#[derive(Clone)]
pub struct HostEffects {
    pub datapath: Arc<dyn Datapath>,
    pub firewall: Arc<dyn Firewall>,
    pub sysctl: Arc<dyn Sysctl>,
}

impl HostEffects {
    /// This host's kernel (netlink in the calling thread's network namespace), the
    /// `firewall` chosen for it (`crate::firewall::select`) and `/proc/sys`. Needs a tokio
    /// runtime.
    pub fn kernel(firewall: Arc<dyn Firewall>) -> Result<Self, NetlinkError> {
        Ok(HostEffects {
            datapath: Arc::new(Netlink::connect()?),
            firewall,
            sysctl: Arc::new(ProcSysctl),
        })
    }
}

impl std::fmt::Debug for HostEffects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostEffects")
    }
}

/// The outcome of one reconcile, reported on `/status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Entries desired / found in the kernel before the run.
    pub desired: usize,
    pub observed: usize,
    /// Writes issued to bring the kernel to the desired state (0 when nothing drifted).
    pub writes: u64,
    /// The operations that were needed (what had drifted), at most 50 listed.
    pub drift: Vec<String>,
    /// How many operations were needed.
    pub drift_count: usize,
    /// Desired neighbour and FDB entries.
    pub neighbours: usize,
    pub fdb: usize,
    /// The routes this host should have (what `overlayctl agent status` compares).
    pub routes: Vec<Route>,
    /// Peers that could not be programmed, with the reason.
    pub skipped: Vec<(String, String)>,
    pub errors: Vec<String>,
    /// Whether the firewall rules had to be (re)written.
    pub firewall_changed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{backend} backend: {message}")]
pub struct BackendError {
    pub backend: &'static str,
    pub message: String,
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendType;

    /// The MTU workloads should use.
    fn mtu(&self) -> u32;

    /// Runs before the lease is acquired: creates what must exist first and returns the
    /// data to publish with the lease (e.g. the VTEP MAC).
    async fn prepare(&mut self) -> Result<BackendData, BackendError>;

    /// Makes the kernel match the desired state for `own` and `peers`, removing what is
    /// not desired. Idempotent: an unchanged world means zero writes.
    async fn reconcile(
        &mut self,
        own: &Lease,
        peers: &[Lease],
    ) -> Result<ReconcileReport, BackendError>;

    /// Notifications that the backend's devices changed under it (someone deleted the
    /// VTEP): each one triggers a reconcile.
    fn device_changes(&self) -> Option<BoxStream<'static, ()>> {
        None
    }
}

/// The registry: a backend by type.
pub fn create(kind: BackendType, ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendType::Alloc => Ok(Box::new(alloc::AllocBackend::new(ctx))),
        BackendType::Vxlan => Ok(Box::new(vxlan::VxlanBackend::new(ctx)?)),
        BackendType::HostGw => Ok(Box::new(hostgw::HostGwBackend::new(ctx)?)),
    }
}
