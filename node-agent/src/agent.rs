//! The agent's lifecycle: config, lease, watch, reconcile, renew.
//!
//! Events never drive the kernel directly. A watch event, a periodic tick or a failed
//! attempt only marks the state dirty; the loop then reconciles the whole desired state
//! (own lease + every peer) against the kernel. So a missed, duplicated or reordered event
//! can never leave a stale entry behind, and a restart is just another reconcile.
//!
//! The lease is kept with keepalives at a third of its TTL. If it is gone (expired while
//! the controller was unreachable, or revoked), the agent acquires again, preferring the
//! same subnet, so its workloads keep their addresses whenever the subnet is still free.
//! When the controller is unreachable the agent keeps everything it has and retries with
//! backoff: the datapath does not depend on the control plane being up.
//!
//! The loop talks to the cluster through [`ControlPlane`] and to the host through the
//! backend's [`crate::backend::HostEffects`], both injected: `tests/agent_loop.rs` runs it
//! against in-memory fakes of both, without root, etcd or a controller. Readiness outputs
//! (subnet.env, the conflist, systemd) are [`Readiness`]'s job.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use overlay_core::backoff::Backoff;
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{format_rfc3339, BackendData};
use overlay_core::subnet_env::SubnetEnv;
use overlay_core::watch::LeaseCache;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn};

use crate::backend::{self, Backend, BackendContext, HostEffects};
use crate::control_plane::{ControlPlane, ControlPlaneError, Granted, LeaseRequest, PeerUpdate};
use crate::files::{AgentState, SUBNET_ENV};
use crate::hostnet::HostInfo;
use crate::metrics::AgentMetrics;
use crate::readiness::{self, Readiness};
pub use crate::status::{AgentStatus, FirewallStatus, SharedStatus};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node: String,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    /// `None` for `--bridge none`.
    pub bridge: Option<String>,
    pub ip_masq: bool,
    pub resync_interval: Duration,
    /// Where to install the CNI conflist once ready (`--cni-conf-dir`).
    pub cni_conf_dir: Option<PathBuf>,
    /// The `dataDir` (address reservations) written into the conflist; the plugin's
    /// default when `None`.
    pub cni_data_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("the network config changed ({0}); exiting so the agent restarts with it")]
    ConfigChanged(String),
}

/// The peers as last seen from the control plane's watch.
struct PeerView {
    cache: Mutex<LeaseCache>,
    synced: std::sync::atomic::AtomicBool,
    changed: Notify,
}

impl PeerView {
    fn new() -> Self {
        PeerView {
            cache: Mutex::new(LeaseCache::new(0)),
            synced: Default::default(),
            changed: Notify::new(),
        }
    }
}

/// Retry schedules: the control plane (config, acquire, renew) and the watch stream.
fn control_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
}

fn watch_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
}

/// How long to wait before renewing a lease of `ttl` (0 = a reservation, no expiry).
pub fn renew_interval(ttl: Duration) -> Duration {
    if ttl.is_zero() {
        Duration::from_secs(600)
    } else {
        (ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(3600))
    }
}

pub struct Agent {
    opts: AgentOptions,
    host: HostInfo,
    control: Arc<dyn ControlPlane>,
    effects: HostEffects,
    status: SharedStatus,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// An agent for this `host` (its underlay, found by [`crate::hostnet::detect`]) that
    /// leases through `control` and programs the host through `effects`.
    pub fn new(
        opts: AgentOptions,
        host: HostInfo,
        control: Arc<dyn ControlPlane>,
        effects: HostEffects,
        status: SharedStatus,
    ) -> Self {
        {
            let mut s = status.write().expect("status");
            s.node = opts.node.clone();
            s.public_ip = Some(host.public_text());
            s.firewall.implementation = Some(effects.firewall.name().to_string());
        }
        let metrics = Arc::new(AgentMetrics::new());
        metrics.set_firewall(effects.firewall.name());
        Agent {
            opts,
            host,
            control,
            effects,
            status,
            metrics,
        }
    }

    /// Records metrics into `metrics` (served on `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        metrics.set_firewall(self.effects.firewall.name());
        self.metrics = metrics;
        self
    }

    fn set_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.write().expect("status"));
    }

    fn note_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let msg = format!("{what}: {e}");
        self.set_status(|s| s.last_error = Some(msg));
    }

    /// Runs until `shutdown` resolves. Leaves the lease and the datapath in place, so a
    /// restarted agent finds everything as it was.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        tokio::select! {
            r = self.run_inner() => r,
            _ = &mut shutdown => Ok(()),
        }
    }

    async fn run_inner(&self) -> Result<(), AgentError> {
        info!(node = %self.opts.node, public_ip = %self.host.public_text(), iface = ?self.host.iface, mtu = self.host.mtu, "underlay found");
        let mut state = AgentState::load(&self.opts.state_dir);
        if state.node.as_deref().is_some_and(|n| n != self.opts.node) {
            info!(old = ?state.node, "node name changed; not reusing the old subnet");
            state.subnet = None;
        }
        let previous = state.subnet.or_else(|| {
            let env = crate::files::read_subnet_env(&self.opts.run_dir.join(SUBNET_ENV))?;
            env.subnet
                .map(IpNet::V4)
                .or(env.ipv6_subnet.map(IpNet::V6))
        });

        readiness::status("fetching the network config");
        let config = self.fetch_config().await;
        info!(network = %config.networks_text(), backend = %config.backend.kind, "network config received");
        let host = &self
            .host
            .clone()
            .for_families(config.ipv4.is_some(), config.ipv6.is_some());
        self.set_status(|s| s.public_ip = Some(host.public_text()));
        // A subnet.env of another network (the config changed while the agent was down) is
        // wrong for every reader: gone until this agent is ready again.
        let env_path = self.opts.run_dir.join(SUBNET_ENV);
        if crate::files::read_subnet_env(&env_path).is_some_and(|e| {
            e.network != config.ipv4_network() || e.ipv6_network != config.ipv6_network()
        }) {
            info!(path = %env_path.display(), "removing the subnet.env of the old network");
            overlay_common::durable::remove(&env_path)?;
        }
        let ctx = BackendContext {
            node: self.opts.node.clone(),
            config: config.clone(),
            host: host.clone(),
            state_dir: self.opts.state_dir.clone(),
            bridge: self.opts.bridge.clone(),
            ip_masq: self.opts.ip_masq,
            effects: self.effects.clone(),
        };
        let mut backend = backend::create(config.backend.kind, ctx)?;
        let data = backend.prepare().await?;
        self.set_status(|s| {
            s.backend = Some(config.backend.kind.to_string());
            s.mtu = Some(backend.mtu());
        });

        readiness::status("acquiring a lease");
        let request = LeaseRequest {
            node: self.opts.node.clone(),
            public_ip: host.public_ip,
            public_ipv6: host.public_ipv6,
            backend: config.backend.kind,
            data: data.clone(),
            preferred: previous,
            preferred6: state.ipv6_subnet.or_else(|| {
                crate::files::read_subnet_env(&self.opts.run_dir.join(SUBNET_ENV))
                    .and_then(|e| e.ipv6_subnet)
            }),
            iface: host.iface.clone(),
            underlay: host.underlay,
            underlay_v6: host.underlay_v6,
        };
        let mut held = self.acquire_lease(&request).await;
        readiness::status(&format!(
            "lease {} held; programming the datapath",
            held.lease.subnet
        ));
        self.remember(&mut state, &held, &data)?;

        let view = Arc::new(PeerView::new());
        let watcher = tokio::spawn(watch_peers(
            self.control.clone(),
            view.clone(),
            self.status.clone(),
        ));
        let _abort = AbortOnDrop(watcher);

        let mut readiness = Readiness::new(
            self.opts.run_dir.clone(),
            self.opts.cni_conf_dir.clone(),
            self.opts.cni_data_dir.clone(),
            self.opts.bridge.clone(),
        );
        let mut next_renew = Instant::now() + renew_interval(held.ttl);
        let mut renew_backoff = control_backoff();
        let mut dirty = true;
        let mut retry_at: Option<Instant> = None;
        let mut device_changes = backend.device_changes();
        let mut first_reconcile = true;
        let watchdog_every = readiness::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        let mut resync = tokio::time::interval(self.opts.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if dirty && view.synced.load(std::sync::atomic::Ordering::Acquire) {
                dirty = false;
                let (peers, own_present) = {
                    let cache = view.cache.lock().expect("cache");
                    let own = cache
                        .get(&held.lease.subnet)
                        .is_some_and(|l| l.node() == self.opts.node);
                    (
                        cache
                            .leases()
                            .filter(|l| l.subnet != held.lease.subnet)
                            .cloned()
                            .collect::<Vec<_>>(),
                        own,
                    )
                };
                if !own_present {
                    // Revoked, expired, or our watch is a little behind our acquisition:
                    // a renewal tells which.
                    next_renew = Instant::now();
                }
                match self
                    .reconcile(backend.as_mut(), &held, &peers, first_reconcile)
                    .await
                {
                    Ok(failed) => {
                        first_reconcile = false;
                        // Entries the kernel refused are retried a second later; they do not
                        // hold back readiness (one odd peer must not keep a host down).
                        retry_at = (failed > 0).then(|| Instant::now() + Duration::from_secs(1));
                        let env = SubnetEnv {
                            network: config.ipv4_network(),
                            subnet: held.lease.ipv4(),
                            ipv6_network: config.ipv6_network(),
                            ipv6_subnet: held.lease.ipv6(),
                            mtu: backend.mtu(),
                            ip_masq: self.opts.ip_masq,
                        };
                        if readiness.publish(&env)? {
                            self.set_status(|s| s.ready = true);
                        }
                        let peers_now = self.status.read().expect("status").peers;
                        readiness::status(&format!(
                            "ready: subnet {}, {peers_now} peers",
                            held.lease.subnet
                        ));
                    }
                    Err(e) => {
                        warn!(error = %e, "reconcile failed; retrying");
                        self.note_error("reconcile", &e);
                        retry_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = view.changed.notified() => dirty = true,
                _ = resync.tick() => {
                    dirty = true;
                    if let Some(changed) = self.config_changed(&config).await {
                        // The backend, network or MTU is baked into the datapath and into
                        // every workload: start over cleanly (systemd restarts us).
                        return Err(AgentError::ConfigChanged(changed));
                    }
                }
                _ = watchdog.tick(), if watchdog_every.is_some() => readiness::watchdog(),
                Some(()) = next_change(&mut device_changes) => {
                    info!("a datapath device changed under us; reconciling");
                    dirty = true;
                }
                _ = retry => dirty = true,
                _ = tokio::time::sleep_until(next_renew) => {
                    match self.renew(&held).await {
                        Ok(ttl) => {
                            self.metrics.renewed(true);
                            renew_backoff.reset();
                            next_renew = Instant::now() + renew_interval(ttl);
                        }
                        Err(ControlPlaneError::LeaseGone(why)) => {
                            warn!(subnet = %held.lease.subnet, reason = %why, "lease lost; acquiring again");
                            let request = LeaseRequest {
                                preferred: Some(held.lease.subnet),
                                preferred6: held.lease.record.ipv6_subnet,
                                ..request.clone()
                            };
                            held = self.acquire_lease(&request).await;
                            self.remember(&mut state, &held, &data)?;
                            next_renew = Instant::now() + renew_interval(held.ttl);
                            dirty = true;
                        }
                        Err(why) => {
                            self.metrics.renewed(false);
                            let wait = renew_backoff.next_delay_after(why.retry_after());
                            debug!(reason = %why, retry_in = ?wait, "renewal failed; keeping everything and retrying");
                            self.note_error("renew", &why);
                            next_renew = Instant::now() + wait;
                        }
                    }
                }
            }
        }
    }

    fn remember(
        &self,
        state: &mut AgentState,
        held: &Granted,
        data: &BackendData,
    ) -> Result<(), AgentError> {
        let fresh = AgentState {
            node: Some(self.opts.node.clone()),
            subnet: Some(held.lease.subnet),
            ipv6_subnet: held.lease.record.ipv6_subnet,
            public_ip: held.lease.record.public_ip,
            vtep_mac: data.vtep_mac.or(state.vtep_mac),
        };
        if &fresh != state {
            fresh.save(&self.opts.state_dir)?;
            *state = fresh;
        }
        let expires = (!held.ttl.is_zero()).then(|| format_rfc3339(SystemTime::now() + held.ttl));
        self.set_status(|s| {
            s.subnet = Some(held.lease.subnet.to_string());
            s.lease_expires_at = expires;
        });
        Ok(())
    }

    async fn reconcile(
        &self,
        backend: &mut dyn Backend,
        held: &Granted,
        peers: &[overlay_core::lease::Lease],
        first: bool,
    ) -> Result<usize, backend::BackendError> {
        let started = std::time::Instant::now();
        let report = match backend.reconcile(&held.lease, peers).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .reconciled(Err(()), peers.len(), first, started);
                return Err(e);
            }
        };
        self.metrics
            .reconciled(Ok(&report), peers.len(), first, started);
        if report.writes > 0 {
            info!(
                writes = report.writes,
                desired = report.desired,
                "datapath reconciled"
            );
        }
        for (subnet, why) in &report.skipped {
            debug!(%subnet, reason = %why, "peer not programmed");
        }
        let failed = report.errors.len();
        let repaired = report.firewall_changed && !first;
        if repaired {
            info!(
                firewall = self.effects.firewall.name(),
                "firewall rules had drifted and were put back"
            );
        }
        self.set_status(|s| {
            if repaired {
                s.firewall.repairs += 1;
                s.firewall.last_repair = Some(format_rfc3339(SystemTime::now()));
            }
            s.peers = peers.len();
            s.reconciles += 1;
            s.datapath_writes += report.writes;
            s.last_reconcile = Some(report);
        });
        Ok(failed)
    }

    /// What changed in the cluster config that this agent cannot apply while running, if
    /// anything (an unreachable controller is not a change).
    async fn config_changed(&self, running: &NetworkConfig) -> Option<String> {
        let fresh = self.control.config().await.ok()?;
        let mut changes = Vec::new();
        let shape = |c: &NetworkConfig| {
            c.pools()
                .map(|p| format!("{}/{}", p.network, p.subnet_len))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if shape(&fresh) != shape(running) {
            changes.push(format!("network {} -> {}", shape(running), shape(&fresh)));
        }
        if fresh.backend != running.backend {
            changes.push(format!(
                "backend {:?} -> {:?}",
                running.backend, fresh.backend
            ));
        }
        if fresh.mtu != running.mtu {
            changes.push(format!("mtu {:?} -> {:?}", running.mtu, fresh.mtu));
        }
        (!changes.is_empty()).then(|| changes.join(", "))
    }

    /// Waits (with backoff) until the control plane hands out the network config.
    async fn fetch_config(&self) -> NetworkConfig {
        let mut backoff = control_backoff();
        loop {
            match self.control.config().await {
                Ok(c) => return c,
                Err(e) => {
                    let wait = backoff.next_delay_after(e.retry_after());
                    warn!(error = %e, retry_in = ?wait, "cannot get the network config");
                    self.note_error("config", &e);
                    sleep(wait).await;
                }
            }
        }
    }

    /// Acquires a lease, retrying (with backoff) until one is granted.
    async fn acquire_lease(&self, request: &LeaseRequest) -> Granted {
        let mut backoff = control_backoff();
        loop {
            match self.control.acquire(request).await {
                Ok(granted) => {
                    info!(subnet = %granted.lease.subnet, ttl = ?granted.ttl, "lease acquired");
                    self.metrics.renewed(true);
                    return granted;
                }
                Err(e) => {
                    // A busy controller says when to come back; otherwise back off, with
                    // jitter either way, so thousands of agents do not return together.
                    let wait = backoff.next_delay_after(e.retry_after());
                    warn!(error = %e, retry_in = ?wait, "cannot acquire a lease");
                    self.note_error("acquire", &e);
                    sleep(wait).await;
                }
            }
        }
    }

    async fn renew(&self, held: &Granted) -> Result<Duration, ControlPlaneError> {
        let ttl = self
            .control
            .renew(&self.opts.node, held.lease.subnet)
            .await?;
        let now = SystemTime::now();
        let expires = (!ttl.is_zero()).then(|| format_rfc3339(now + ttl));
        self.set_status(|s| {
            s.last_renewal = Some(format_rfc3339(now));
            s.lease_expires_at = expires;
        });
        Ok(ttl)
    }
}

async fn next_change(changes: &mut Option<futures::stream::BoxStream<'static, ()>>) -> Option<()> {
    use futures::StreamExt;
    match changes {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps `view` equal to the cluster's leases: a snapshot, then events; on any break,
/// reconnect and resume after the last revision seen.
async fn watch_peers(control: Arc<dyn ControlPlane>, view: Arc<PeerView>, status: SharedStatus) {
    use futures::StreamExt;
    let mut backoff = watch_backoff();
    loop {
        let after = view.cache.lock().expect("cache").revision();
        let mut hint = None;
        match control.watch(after).await {
            Err(e) => {
                debug!(error = %e, "cannot watch leases; retrying");
                hint = e.retry_after();
            }
            Ok(mut stream) => {
                while let Some(update) = stream.next().await {
                    let update = match update {
                        Ok(u) => u,
                        Err(ControlPlaneError::BadAnswer(e)) => {
                            warn!(error = %e, "ignoring a bad watch message");
                            continue;
                        }
                        Err(e) => {
                            debug!(error = %e, "watch stream broke");
                            break;
                        }
                    };
                    backoff.reset();
                    let rev = {
                        let mut cache = view.cache.lock().expect("cache");
                        match update {
                            PeerUpdate::Snapshot { leases, revision } => {
                                cache.resync(leases, revision);
                            }
                            PeerUpdate::Event(event) => {
                                cache.apply(&event);
                            }
                        }
                        cache.revision()
                    };
                    status.write().expect("status").watch_revision = rev;
                    view.synced
                        .store(true, std::sync::atomic::Ordering::Release);
                    view.changed.notify_one();
                }
                debug!("watch stream ended");
            }
        }
        sleep(backoff.next_delay_after(hint)).await;
    }
}
