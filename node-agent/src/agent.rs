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

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{format_rfc3339, BackendData, Lease};
use overlay_core::watch::LeaseCache;
use overlay_proto::v1::{self, watch_leases_response::Kind};
use overlay_proto::{backend_to_proto, config_from_proto, event_from_proto, lease_from_proto};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn};

use crate::backend::{self, Backend, BackendContext, ReconcileReport};
use crate::client::{error_chain, is_transport_failure, Controllers};
use crate::datapath::Datapath;
use crate::files::{write_atomic, AgentState, SubnetEnv, SUBNET_ENV};
use crate::hostnet::{self, HostInfo};
use crate::metrics::AgentMetrics;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node: String,
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub iface: Option<String>,
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
    HostNet(#[from] hostnet::HostNetError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("the network config changed ({0}); exiting so the agent restarts with it")]
    ConfigChanged(String),
}

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
}

pub type SharedStatus = Arc<RwLock<AgentStatus>>;

/// The peers as last seen from the controller's watch.
struct PeerView {
    cache: Mutex<LeaseCache>,
    synced: std::sync::atomic::AtomicBool,
    changed: Notify,
}

struct Held {
    lease: Lease,
    ttl: Duration,
}

/// The conflist's file name: sorts early, so runtimes that take the first one pick it.
pub const CNI_CONFLIST: &str = "10-overlay.conflist";

const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
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
    controllers: Arc<Controllers>,
    status: SharedStatus,
    datapath: Option<Arc<dyn Datapath>>,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    pub fn new(opts: AgentOptions, controllers: Controllers, status: SharedStatus) -> Self {
        status.write().expect("status").node = opts.node.clone();
        Agent {
            opts,
            controllers: Arc::new(controllers),
            status,
            datapath: None,
            metrics: Arc::new(AgentMetrics::new()),
        }
    }

    /// Records metrics into `metrics` (served on `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Programs `datapath` instead of the kernel (tests use the in-memory fake).
    pub fn with_datapath(mut self, datapath: Arc<dyn Datapath>) -> Self {
        self.datapath = Some(datapath);
        self
    }

    fn set_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.write().expect("status"));
    }

    /// A STATUS= line for systemd (Type=notify); a no-op outside systemd.
    fn systemd_status(&self, text: &str) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]);
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
        let host = hostnet::detect(self.opts.public_ip, self.opts.iface.as_deref())?;
        info!(node = %self.opts.node, public_ip = %host.public_ip, iface = ?host.iface, mtu = host.mtu, "underlay found");
        self.set_status(|s| s.public_ip = Some(host.public_ip.to_string()));

        let mut state = AgentState::load(&self.opts.state_dir);
        if state.node.as_deref().is_some_and(|n| n != self.opts.node) {
            info!(old = ?state.node, "node name changed; not reusing the old subnet");
            state.subnet = None;
        }
        let previous = state.subnet.or_else(|| {
            crate::files::read_subnet_env(&self.opts.run_dir.join(SUBNET_ENV)).map(|e| e.subnet)
        });

        self.systemd_status("fetching the network config");
        let config = self.fetch_config().await;
        info!(network = %config.network, backend = %config.backend.kind, "network config received");
        let ctx = BackendContext {
            node: self.opts.node.clone(),
            datapath: self.datapath.clone(),
            config: config.clone(),
            host: host.clone(),
            state_dir: self.opts.state_dir.clone(),
            bridge: self.opts.bridge.clone(),
            ip_masq: self.opts.ip_masq,
        };
        let mut backend = backend::create(config.backend.kind, ctx)?;
        let data = backend.prepare().await?;
        self.set_status(|s| {
            s.backend = Some(config.backend.kind.to_string());
            s.mtu = Some(backend.mtu());
        });

        self.systemd_status("acquiring a lease");
        let mut held = self.acquire_lease(&host, &config, &data, previous).await;
        self.metrics.renewed(true);
        self.systemd_status(&format!(
            "lease {} held; programming the datapath",
            held.lease.subnet
        ));
        self.remember(&mut state, &held, &host, &data)?;

        let view = Arc::new(PeerView {
            cache: Mutex::new(LeaseCache::new(0)),
            synced: Default::default(),
            changed: Notify::new(),
        });
        let watcher = tokio::spawn(watch_peers(
            self.controllers.clone(),
            view.clone(),
            self.status.clone(),
        ));
        let _abort = AbortOnDrop(watcher);

        let mut next_renew = Instant::now() + renew_interval(held.ttl);
        let mut renew_backoff = Duration::from_millis(500);
        let mut dirty = true;
        let mut retry_at: Option<Instant> = None;
        let mut written_env: Option<SubnetEnv> = None;
        let mut device_changes = backend.device_changes();
        let mut first_reconcile = true;
        let watchdog_every = sd_notify::watchdog_enabled().map(|d| d / 2);
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
                    .reconcile(backend.as_mut(), &held.lease, &peers, first_reconcile)
                    .await
                {
                    Ok(failed) => {
                        first_reconcile = false;
                        // Entries the kernel refused are retried a second later; they do not
                        // hold back readiness (one odd peer must not keep a host down).
                        retry_at = (failed > 0).then(|| Instant::now() + Duration::from_secs(1));
                        let env = SubnetEnv {
                            network: config.network,
                            subnet: held.lease.subnet,
                            mtu: backend.mtu(),
                            ip_masq: self.opts.ip_masq,
                        };
                        if written_env.as_ref() != Some(&env) {
                            write_atomic(
                                &self.opts.run_dir.join(SUBNET_ENV),
                                env.render().as_bytes(),
                            )?;
                            info!(subnet = %held.lease.subnet, path = %self.opts.run_dir.join(SUBNET_ENV).display(), "subnet.env written; ready");
                            written_env = Some(env);
                            self.install_cni_conf()?;
                            self.set_status(|s| s.ready = true);
                            // READY=1 only now: subnet.env and the datapath are in place.
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                        }
                        let peers_now = self.status.read().expect("status").peers;
                        self.systemd_status(&format!(
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
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    // The main loop is alive: tell systemd's watchdog.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                Some(()) = next_change(&mut device_changes) => {
                    info!("a datapath device changed under us; reconciling");
                    dirty = true;
                }
                _ = retry => dirty = true,
                _ = tokio::time::sleep_until(next_renew) => {
                    match self.renew(&held).await {
                        Ok(ttl) => {
                            self.metrics.renewed(true);
                            renew_backoff = Duration::from_millis(500);
                            next_renew = Instant::now() + renew_interval(ttl);
                        }
                        Err(RenewFailure::Gone(why)) => {
                            warn!(subnet = %held.lease.subnet, reason = %why, "lease lost; acquiring again");
                            let prev = held.lease.subnet;
                            held = self.acquire_lease(&host, &config, &data, Some(prev)).await;
                            self.remember(&mut state, &held, &host, &data)?;
                            next_renew = Instant::now() + renew_interval(held.ttl);
                            dirty = true;
                        }
                        Err(RenewFailure::Retry(why)) => {
                            self.metrics.renewed(false);
                            debug!(reason = %why, retry_in = ?renew_backoff, "renewal failed; keeping everything and retrying");
                            self.note_error("renew", &why);
                            next_renew = Instant::now() + renew_backoff;
                            renew_backoff = next_backoff(renew_backoff);
                        }
                    }
                }
            }
        }
    }

    /// Writes `<cni-conf-dir>/10-overlay.conflist` (atomically, only when it differs), so
    /// container runtimes find the network only once it works.
    fn install_cni_conf(&self) -> Result<(), AgentError> {
        let (Some(dir), Some(bridge)) = (&self.opts.cni_conf_dir, &self.opts.bridge) else {
            return Ok(());
        };
        let path = dir.join(CNI_CONFLIST);
        let text = crate::cni::conflist(
            "overlay",
            &self.opts.run_dir.join(SUBNET_ENV),
            bridge,
            self.opts.cni_data_dir.as_deref(),
        );
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, text.as_bytes())?;
            info!(path = %path.display(), "CNI network config installed");
        }
        Ok(())
    }

    fn remember(
        &self,
        state: &mut AgentState,
        held: &Held,
        host: &HostInfo,
        data: &BackendData,
    ) -> Result<(), AgentError> {
        let fresh = AgentState {
            node: Some(self.opts.node.clone()),
            subnet: Some(held.lease.subnet),
            public_ip: Some(host.public_ip),
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
        own: &Lease,
        peers: &[Lease],
        first: bool,
    ) -> Result<usize, backend::BackendError> {
        let started = std::time::Instant::now();
        let report = match backend.reconcile(own, peers).await {
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
        self.set_status(|s| {
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
        let mut c = self.controllers.client().await.ok()?;
        let resp = c
            .get_config(v1::GetConfigRequest {})
            .await
            .ok()?
            .into_inner();
        let fresh = config_from_proto(&resp.config?).ok()?;
        let mut changes = Vec::new();
        if fresh.network != running.network || fresh.subnet_len != running.subnet_len {
            changes.push(format!(
                "network {}/{} -> {}/{}",
                running.network, running.subnet_len, fresh.network, fresh.subnet_len
            ));
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

    /// Waits (with backoff) until a controller hands out the network config.
    async fn fetch_config(&self) -> NetworkConfig {
        let mut backoff = Duration::from_millis(200);
        loop {
            let result = async {
                let mut c = self.controllers.client().await.map_err(|e| e.to_string())?;
                let resp = c.get_config(v1::GetConfigRequest {}).await.map_err(|s| {
                    if is_transport_failure(&s) {
                        self.controllers.failed();
                    }
                    s.message().to_string()
                })?;
                let cfg = resp
                    .into_inner()
                    .config
                    .ok_or("the controller sent no config")?;
                config_from_proto(&cfg).map_err(|e| e.to_string())
            }
            .await;
            match result {
                Ok(c) => return c,
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "cannot get the network config");
                    self.note_error("config", &e);
                }
            }
            sleep(backoff).await;
            backoff = next_backoff(backoff);
        }
    }

    /// Acquires a lease, retrying (with backoff) until one is granted.
    async fn acquire_lease(
        &self,
        host: &HostInfo,
        config: &NetworkConfig,
        data: &BackendData,
        preferred: Option<Ipv4Net>,
    ) -> Held {
        let request = v1::AcquireLeaseRequest {
            node: self.opts.node.clone(),
            public_ip: host.public_ip.to_string(),
            backend: backend_to_proto(config.backend.kind).into(),
            vtep_mac: data.vtep_mac.map(|m| m.to_string()),
            preferred_subnet: preferred.map(|p| p.to_string()),
            iface: host.iface.clone(),
            underlay: host.underlay.map(|u| u.to_string()),
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            let outcome: Result<(), String> = match self.controllers.client().await {
                Err(e) => Err(e.to_string()),
                Ok(mut c) => match c.acquire_lease(request.clone()).await {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        match r.lease.as_ref().map(lease_from_proto) {
                            Some(Ok(lease)) => {
                                info!(subnet = %lease.subnet, ttl_secs = r.ttl_secs, "lease acquired");
                                return Held {
                                    lease,
                                    ttl: Duration::from_secs(r.ttl_secs),
                                };
                            }
                            Some(Err(e)) => Err(format!("the controller sent a bad lease: {e}")),
                            None => Err("the controller sent no lease".into()),
                        }
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        // The message says "subnet range exhausted".
                        Err(s.message().to_string())
                    }
                    Err(s) => {
                        if is_transport_failure(&s) {
                            self.controllers.failed();
                        }
                        Err(s.message().to_string())
                    }
                },
            };
            if let Err(e) = outcome {
                warn!(error = %e, retry_in = ?backoff, "cannot acquire a lease");
                self.note_error("acquire", &e);
            }
            sleep(backoff).await;
            backoff = next_backoff(backoff);
        }
    }

    async fn renew(&self, held: &Held) -> Result<Duration, RenewFailure> {
        let mut c = self
            .controllers
            .client()
            .await
            .map_err(|e| RenewFailure::Retry(e.to_string()))?;
        let req = v1::RenewLeaseRequest {
            node: self.opts.node.clone(),
            subnet: held.lease.subnet.to_string(),
        };
        match c.renew_lease(req).await {
            Ok(r) => {
                let ttl = Duration::from_secs(r.into_inner().ttl_secs);
                let now = SystemTime::now();
                let expires = (!ttl.is_zero()).then(|| format_rfc3339(now + ttl));
                self.set_status(|s| {
                    s.last_renewal = Some(format_rfc3339(now));
                    s.lease_expires_at = expires;
                });
                Ok(ttl)
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::PermissionDenied
                ) =>
            {
                Err(RenewFailure::Gone(s.message().to_string()))
            }
            Err(s) => {
                if is_transport_failure(&s) {
                    self.controllers.failed();
                }
                Err(RenewFailure::Retry(s.message().to_string()))
            }
        }
    }
}

enum RenewFailure {
    /// The lease no longer exists (or is someone else's): acquire again.
    Gone(String),
    /// The controller could not answer: keep everything, retry.
    Retry(String),
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

/// Keeps `view` equal to the controller's leases: a snapshot, then events; on any break,
/// reconnect (failing over) and resume after the last revision seen.
async fn watch_peers(controllers: Arc<Controllers>, view: Arc<PeerView>, status: SharedStatus) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let after = view.cache.lock().expect("cache").revision();
        let stream = match controllers.client().await {
            Err(e) => Err(e.to_string()),
            Ok(mut c) => c
                .watch_leases(v1::WatchLeasesRequest {
                    after_revision: after,
                })
                .await
                .map_err(|s| {
                    if is_transport_failure(&s) {
                        controllers.failed();
                    }
                    s.message().to_string()
                }),
        };
        match stream {
            Err(e) => debug!(error = %e, "cannot watch leases; retrying"),
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            backoff = Duration::from_millis(100);
                            if let Err(e) = apply_watch_message(&view, msg) {
                                warn!(error = %e, "ignoring a bad watch message");
                                continue;
                            }
                            let rev = view.cache.lock().expect("cache").revision();
                            status.write().expect("status").watch_revision = rev;
                            view.synced
                                .store(true, std::sync::atomic::Ordering::Release);
                            view.changed.notify_one();
                        }
                        Ok(None) => {
                            debug!("watch stream ended");
                            break;
                        }
                        Err(s) => {
                            debug!(error = %error_chain(&s), "watch stream broke");
                            if is_transport_failure(&s) {
                                controllers.failed();
                            }
                            break;
                        }
                    }
                }
            }
        }
        sleep(backoff).await;
        backoff = next_backoff(backoff).min(Duration::from_secs(2));
    }
}

fn apply_watch_message(view: &PeerView, msg: v1::WatchLeasesResponse) -> Result<(), String> {
    let mut cache = view.cache.lock().expect("cache");
    match msg.kind {
        Some(Kind::Snapshot(s)) => {
            let leases = s
                .leases
                .iter()
                .map(lease_from_proto)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            cache.resync(leases, s.revision);
        }
        Some(Kind::Event(e)) => {
            let event = event_from_proto(&e).map_err(|e| e.to_string())?;
            cache.apply(&event);
        }
        None => return Err("empty message".into()),
    }
    Ok(())
}
