//! Work that must happen once per cluster rather than once per controller, and the leader
//! election that decides which controller does it.
//!
//! Design notes:
//! - Leadership is one key, `<prefix>/leader`, created if absent and attached to a short
//!   etcd lease (a few seconds) that the leader keeps alive. It uses the same primitives as
//!   subnet leases (grant, create-if-absent, keepalive) rather than etcd's election API, so
//!   it goes through [`Store`] and runs against the memory store in unit tests.
//! - Leadership only makes the work happen once; nothing depends on it for safety. Every
//!   janitor action is harmless when done twice or concurrently: revoking a lease that has
//!   had no key and no keepalive for the whole grace period, compacting to a revision that
//!   may already be compacted. So a short overlap of two leaders (one cut off from etcd
//!   that has not noticed yet) costs nothing, and there is no fencing token. A leader that
//!   cannot confirm its lease steps down before the lease can have expired.
//! - Standbys watch the key and campaign as soon as it is deleted (revoked by a leader that
//!   shuts down cleanly, expired after a crash), so failover takes at most the leader TTL
//!   after a crash and one round trip after a clean stop. They also campaign again every
//!   TTL in case a watch goes quiet. A standby that finds the key taken never grants a
//!   lease, and one that loses the create race revokes its lease at once, so campaigns do
//!   not leave keyless leases behind.
//! - Orphaned leases come from a controller killed between `grant` and `create` (or cut off
//!   before it could revoke an unused lease): an etcd lease with no key that would live for
//!   its whole TTL, a day by default. The janitor revokes leases that have no key and have
//!   not been granted or kept alive for the grace period. It uses idle time (granted TTL
//!   minus remaining TTL) because etcd does not record a lease's age, and because a lease
//!   that someone keeps alive is in use by definition. The grace period covers a lease
//!   between its grant and its create, which takes milliseconds. On an etcd shared with
//!   other applications, their keyless leases would be revoked too: give Overlay its own
//!   etcd, or a grace period longer than their leases live without keys.
//! - Compaction keeps the last N revisions, and only runs once the target has moved by a
//!   tenth of N, so a quiet cluster is not compacted every interval. Watchers further
//!   behind than N revisions get `Compacted` and relist, which the fan-out handles.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::leases::Keys;
use crate::metrics::Metrics;
use crate::store::{LeaseId, LeaseInfo, Store, StoreError, StoreEvent, Written};

/// Default TTL of the leader's etcd lease: failover time after a crash.
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(6);

/// Lease lookups the janitor runs at once.
const LOOKUP_CONCURRENCY: usize = 8;

/// The leader key under a cluster prefix (normalized like [`Keys`]).
pub fn leader_key(prefix: &str) -> String {
    let config = Keys::new(prefix).config();
    let base = config.strip_suffix("/config").unwrap_or(&config);
    format!("{base}/leader")
}

/// What a controller writes into the leader key: enough for an operator to find it.
pub fn default_identity(listen: impl std::fmt::Display) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {} grpc {listen}", std::process::id())
}

/// One controller's part in the leader election; see the module notes.
pub struct Election {
    store: Arc<dyn Store>,
    key: String,
    identity: String,
    ttl: Duration,
    /// The etcd lease of our leader key while we lead.
    lease: watch::Sender<Option<LeaseId>>,
    stopping: AtomicBool,
    wake: Notify,
    metrics: Option<Arc<Metrics>>,
}

/// How [`Election::hold`] ended.
enum Held {
    /// The lease or the key is gone: leadership is over.
    Lost,
    /// We could not confirm the lease in time; it may still exist.
    Unsure(LeaseId),
    Resigned,
}

impl Election {
    /// An election for the cluster under `prefix`. `identity` is written into the key.
    /// `ttl` is the leader lease's TTL, raised to 2 s at least: the leader refreshes every third
    /// of it, and etcd rounds TTLs to whole seconds.
    pub fn new(store: Arc<dyn Store>, prefix: &str, identity: String, ttl: Duration) -> Self {
        Election {
            store,
            key: leader_key(prefix),
            identity,
            ttl: ttl.max(Duration::from_secs(2)),
            lease: watch::channel(None).0,
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
            metrics: None,
        }
    }

    /// Reports leadership in the `overlay_controller_leader` gauge.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        metrics.leader.set(0);
        self.metrics = Some(metrics);
        self
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this controller leads now (as far as it could confirm within the TTL).
    pub fn is_leader(&self) -> bool {
        self.lease.borrow().is_some()
    }

    /// The etcd lease of the leader key while we lead.
    pub fn leader_lease(&self) -> Option<LeaseId> {
        *self.lease.borrow()
    }

    /// Leadership changes: `Some(lease)` while leading.
    pub fn subscribe(&self) -> watch::Receiver<Option<LeaseId>> {
        self.lease.subscribe()
    }

    fn set_lease(&self, lease: Option<LeaseId>) {
        self.lease.send_replace(lease);
        if let Some(m) = &self.metrics {
            m.leader.set(i64::from(lease.is_some()));
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// How often the leader refreshes its lease, and standbys retry after errors.
    fn refresh_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Campaigns and leads until [`Election::resign`].
    pub async fn run(self: Arc<Self>) {
        let mut last_error = String::new();
        let mut unsure: Option<LeaseId> = None;
        while !self.stopping() {
            match self.campaign(unsure.take()).await {
                Ok(Some((lease, since))) => {
                    last_error.clear();
                    if self.stopping() {
                        let _ = self.store.revoke(lease).await;
                        break;
                    }
                    self.set_lease(Some(lease));
                    info!(key = %self.key, lease = format_args!("{lease:x}"), identity = %self.identity, "elected leader");
                    let held = self.hold(lease, since).await;
                    self.set_lease(None);
                    match held {
                        Held::Lost => {
                            warn!(key = %self.key, "lost leadership: the leader key or its lease is gone");
                            self.revoke_quietly(lease).await;
                        }
                        Held::Unsure(lease) => {
                            warn!(key = %self.key, "stepped down: could not confirm the leader lease in time");
                            unsure = Some(lease);
                        }
                        Held::Resigned => info!(key = %self.key, "resigned leadership"),
                    }
                }
                Ok(None) => {
                    last_error.clear();
                    self.wait_for_vacancy().await;
                }
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        warn!(key = %self.key, error = %e, "leader election: cannot campaign; retrying");
                        last_error = text;
                    }
                    self.pause(self.refresh_interval()).await;
                }
            }
        }
    }

    /// Sleeps, waking early on [`Election::resign`].
    async fn pause(&self, duration: Duration) {
        let _ = tokio::time::timeout(duration, self.wake.notified()).await;
    }

    /// One attempt to become leader: `Some` with our lease and the time just before it was
    /// granted (when its TTL started, at the latest), `None` when someone else leads.
    async fn campaign(
        &self,
        unsure: Option<LeaseId>,
    ) -> Result<Option<(LeaseId, Instant)>, StoreError> {
        let since = Instant::now();
        if let Some(kv) = self.store.get(&self.key).await? {
            // After stepping down unsure, the key may still be ours: take it back.
            if let Some(lease) = unsure.filter(|l| *l == kv.lease) {
                match self.store.keep_alive(lease).await {
                    Ok(_) => return Ok(Some((lease, since))),
                    Err(StoreError::LeaseNotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            debug!(key = %self.key, holder = %String::from_utf8_lossy(&kv.value), "another controller leads");
            return Ok(None);
        }
        let lease = self.store.grant(self.ttl).await?;
        let created = self
            .store
            .create(&self.key, self.identity.as_bytes().to_vec(), lease)
            .await;
        match created {
            Ok(Written::Yes(_)) => Ok(Some((lease, since))),
            Ok(Written::Conflict) => {
                self.revoke_quietly(lease).await;
                Ok(None)
            }
            Err(e) => {
                self.revoke_quietly(lease).await;
                Err(e)
            }
        }
    }

    async fn revoke_quietly(&self, lease: LeaseId) {
        if let Err(e) = self.store.revoke(lease).await {
            debug!(lease = format_args!("{lease:x}"), error = %e, "could not revoke an unused campaign lease; it expires with its short TTL");
        }
    }

    /// Keeps the lease alive and checks the key is still ours, until either fails.
    async fn hold(&self, lease: LeaseId, since: Instant) -> Held {
        let refresh = self.refresh_interval();
        let mut confirmed = since;
        loop {
            self.pause(refresh).await;
            if self.stopping() {
                return Held::Resigned;
            }
            let sent = Instant::now();
            match tokio::time::timeout(refresh, self.confirm(lease)).await {
                Ok(Ok(true)) => confirmed = sent,
                Ok(Ok(false)) | Ok(Err(StoreError::LeaseNotFound(_))) => return Held::Lost,
                Ok(Err(e)) => debug!(error = %e, "leader lease refresh failed"),
                Err(_) => debug!("leader lease refresh timed out"),
            }
            // Step down before the lease can have expired: the next refresh would end
            // after confirmed + ttl.
            if confirmed.elapsed() + refresh * 2 > self.ttl {
                return Held::Unsure(lease);
            }
        }
    }

    /// Refreshes the lease; whether the key still exists with it.
    async fn confirm(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.store.keep_alive(lease).await?;
        Ok(self
            .store
            .get(&self.key)
            .await?
            .is_some_and(|kv| kv.lease == lease))
    }

    /// Returns once the leader key was deleted, or after a TTL at most.
    async fn wait_for_vacancy(&self) {
        let wait = async {
            let (kvs, revision) = self.store.list(&self.key).await?;
            if !kvs.iter().any(|kv| kv.key == self.key) {
                return Ok(());
            }
            let mut events = self.store.watch(&self.key, revision + 1).await?;
            while let Some(batch) = events.next().await {
                let deleted = batch?
                    .events
                    .iter()
                    .any(|e| matches!(e, StoreEvent::Delete { key, .. } if *key == self.key));
                if deleted {
                    return Ok(());
                }
            }
            Err(StoreError::Unavailable("the leader watch ended".into()))
        };
        let woken = self.wake.notified();
        tokio::select! {
            result = tokio::time::timeout(self.ttl, wait) => {
                if let Ok(Err(e)) = result {
                    debug!(error = %e, "watching the leader key failed");
                    self.pause(self.refresh_interval()).await;
                }
            }
            _ = woken => {}
        }
    }

    /// Stops campaigning and gives leadership up at once (revoking the leader lease deletes
    /// the key, so a standby takes over without waiting for the TTL).
    pub async fn resign(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Take the lease before waking the loop, which clears it when it sees `stopping`.
        let lease = self.lease.send_replace(None);
        self.wake.notify_waiters();
        if let Some(m) = &self.metrics {
            m.leader.set(0);
        }
        if let Some(lease) = lease {
            match self.store.revoke(lease).await {
                Ok(()) => info!(key = %self.key, "leadership handed back"),
                Err(e) => {
                    warn!(key = %self.key, error = %e, "could not revoke the leader lease; a standby takes over when it expires")
                }
            }
        }
    }
}

/// What the janitor does and how often.
#[derive(Debug, Clone)]
pub struct JanitorConfig {
    /// Time between sweeps.
    pub interval: Duration,
    /// How long a lease must have had no keepalive before a keyless one is revoked.
    pub orphan_grace: Duration,
    /// Revisions of history kept by compaction; 0 disables compaction.
    pub keep_revisions: i64,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        JanitorConfig {
            interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(60),
            keep_revisions: 10_000,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Leases looked at (all of etcd's, the leader's own excluded).
    pub leases_checked: usize,
    pub orphans_revoked: Vec<LeaseId>,
    /// The revision history was compacted to, when it was.
    pub compacted_to: Option<i64>,
}

/// Periodic cleanup, run by the leader only; see the module notes.
pub struct Janitor {
    store: Arc<dyn Store>,
    election: Arc<Election>,
    config: JanitorConfig,
    last_compaction: AtomicI64,
    metrics: Option<Arc<Metrics>>,
}

impl Janitor {
    pub fn new(store: Arc<dyn Store>, election: Arc<Election>, config: JanitorConfig) -> Self {
        Janitor {
            store,
            election,
            config,
            last_compaction: AtomicI64::new(0),
            metrics: None,
        }
    }

    /// Counts revoked leases and compactions in the controller's metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sweeps every interval while this controller leads.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.election.is_leader() {
                continue;
            }
            match self.sweep().await {
                Ok(sweep) => debug!(?sweep, "janitor sweep done"),
                Err(e) => warn!(error = %e, "janitor sweep failed; retrying next interval"),
            }
        }
    }

    /// One pass: revoke orphaned leases, then compact.
    pub async fn sweep(&self) -> Result<Sweep, StoreError> {
        let (leases_checked, orphans_revoked) = self.revoke_orphans().await?;
        let compacted_to = self.compact().await?;
        Ok(Sweep {
            leases_checked,
            orphans_revoked,
            compacted_to,
        })
    }

    async fn revoke_orphans(&self) -> Result<(usize, Vec<LeaseId>), StoreError> {
        let own = self.election.leader_lease();
        let leases: Vec<LeaseId> = self
            .store
            .list_leases()
            .await?
            .into_iter()
            .filter(|l| Some(*l) != own)
            .collect();
        let checked = leases.len();
        let grace = self.config.orphan_grace;
        let infos: Vec<Result<Option<LeaseInfo>, StoreError>> = stream::iter(leases)
            .map(|lease| self.store.lease_info(lease))
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
        let mut revoked = Vec::new();
        for info in infos {
            let Some(info) = info?.filter(|i| i.keys.is_empty() && i.idle() >= grace) else {
                continue;
            };
            let lease = info.id;
            self.store.revoke(lease).await?;
            info!(
                lease = format_args!("{lease:x}"),
                idle = ?info.idle(),
                granted_ttl = ?info.granted_ttl,
                "revoked an orphaned etcd lease (no key attached, no keepalive within the grace period)"
            );
            if let Some(m) = &self.metrics {
                m.orphan_leases_revoked.inc();
            }
            revoked.push(lease);
        }
        revoked.sort_unstable();
        Ok((checked, revoked))
    }

    async fn compact(&self) -> Result<Option<i64>, StoreError> {
        let keep = self.config.keep_revisions;
        if keep <= 0 {
            return Ok(None);
        }
        let (_, revision) = self.store.list(self.election.key()).await?;
        let target = revision - keep;
        let last = self.last_compaction.load(Ordering::Relaxed);
        if target <= 0 || target < last + (keep / 10).max(1) {
            return Ok(None);
        }
        self.store.compact(target).await?;
        self.last_compaction.store(target, Ordering::Relaxed);
        info!(
            compacted_to = target,
            revision, keep, "compacted etcd history"
        );
        if let Some(m) = &self.metrics {
            m.compactions.inc();
        }
        Ok(Some(target))
    }
}

/// Starts the election and the janitor in the background; the election answers
/// `is_leader()` and must be [resigned](Election::resign) on shutdown.
pub fn spawn(
    store: Arc<dyn Store>,
    prefix: &str,
    identity: String,
    leader_ttl: Duration,
    config: JanitorConfig,
    metrics: Arc<Metrics>,
) -> Arc<Election> {
    let election = Arc::new(
        Election::new(store.clone(), prefix, identity, leader_ttl).with_metrics(metrics.clone()),
    );
    tokio::spawn(election.clone().run());
    let janitor = Janitor::new(store, election.clone(), config).with_metrics(metrics);
    tokio::spawn(janitor.run());
    election
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const TTL: Duration = Duration::from_secs(2);
    /// A hang guard, not a timing assertion.
    const PATIENCE: Duration = Duration::from_secs(30);

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn election(store: &Arc<MemoryStore>, name: &str) -> Arc<Election> {
        let store: Arc<dyn Store> = store.clone();
        Arc::new(Election::new(store, "/test", name.to_string(), TTL))
    }

    #[test]
    fn leader_key_follows_the_prefix_rules() {
        assert_eq!(leader_key("/overlay"), "/overlay/leader");
        assert_eq!(leader_key("overlay/"), "/overlay/leader");
    }

    #[tokio::test]
    async fn exactly_one_leads_and_another_takes_over_after_a_crash() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (election(&store, "a"), election(&store, "b"));
        let task_a = tokio::spawn(a.clone().run());
        let task_b = tokio::spawn(b.clone().run());
        eventually("someone leads", || a.is_leader() || b.is_leader()).await;
        // Never both (a short overlap is only possible when a leader is cut off from the
        // store, which does not happen here).
        for _ in 0..20 {
            assert!(!(a.is_leader() && b.is_leader()), "both lead");
            tokio::time::sleep(TTL / 10).await;
        }
        let holder = store.get(&leader_key("/test")).await.unwrap().unwrap();
        let (leader, other, task) = if holder.value == b"a" {
            (&a, &b, task_a)
        } else {
            (&b, &a, task_b)
        };
        assert_eq!(Some(holder.lease), leader.leader_lease());
        assert!(!other.is_leader());

        // A crash: the task stops, nothing is revoked, the lease expires.
        task.abort();
        eventually("the standby takes over", || other.is_leader()).await;
        let holder = store.get(&leader_key("/test")).await.unwrap().unwrap();
        assert_eq!(holder.value, other.identity().as_bytes());
    }

    #[tokio::test]
    async fn resigning_hands_over_and_stops_campaigning() {
        let store = Arc::new(MemoryStore::new());
        let a = election(&store, "a");
        tokio::spawn(a.clone().run());
        eventually("a leads", || a.is_leader()).await;
        let b = election(&store, "b");
        let task_b = tokio::spawn(b.clone().run());
        tokio::time::sleep(TTL).await;
        assert!(!b.is_leader());

        a.resign().await;
        assert!(!a.is_leader());
        // Handed back by revoking, not by letting the lease run out: the key is gone (or
        // already b's) as soon as resign returns.
        let holder = store.get(&leader_key("/test")).await.unwrap();
        assert!(
            holder.as_ref().is_none_or(|kv| kv.value == b"b"),
            "a's key outlived its resign: {holder:?}"
        );
        eventually("b takes over", || b.is_leader()).await;
        b.resign().await;
        tokio::time::timeout(PATIENCE, task_b)
            .await
            .expect("run() returns after resign")
            .unwrap();
        assert_eq!(store.get(&leader_key("/test")).await.unwrap(), None);
        tokio::time::sleep(TTL * 2).await;
        assert!(!a.is_leader(), "a resigned election campaigned again");
    }

    #[tokio::test]
    async fn a_deleted_leader_key_ends_leadership() {
        let store = Arc::new(MemoryStore::new());
        let a = election(&store, "a");
        tokio::spawn(a.clone().run());
        eventually("a leads", || a.is_leader()).await;
        let first = a.leader_lease().unwrap();
        store.delete(&leader_key("/test"), None).await.unwrap();
        // a notices, and (alone) campaigns again with a new lease.
        eventually("a leads again with a new lease", || {
            a.leader_lease().is_some_and(|l| l != first)
        })
        .await;
    }

    #[tokio::test]
    async fn the_janitor_revokes_only_idle_leases_without_keys() {
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn Store> = store.clone();
        let leader = election(&store, "leader");
        tokio::spawn(leader.clone().run());
        eventually("leader elected", || leader.is_leader()).await;
        let grace = Duration::from_secs(1);
        let janitor = Janitor::new(
            dyn_store,
            leader.clone(),
            JanitorConfig {
                interval: Duration::from_secs(1),
                orphan_grace: grace,
                keep_revisions: 0,
            },
        );

        let orphan = store.grant(Duration::from_secs(3600)).await.unwrap();
        let kept_alive = store.grant(Duration::from_secs(3600)).await.unwrap();
        let with_key = store.grant(Duration::from_secs(3600)).await.unwrap();
        store
            .create("/test/leases/x", b"v".to_vec(), with_key)
            .await
            .unwrap();
        tokio::time::sleep(grace + Duration::from_millis(200)).await;
        let young = store.grant(Duration::from_secs(3600)).await.unwrap();
        store.keep_alive(kept_alive).await.unwrap();

        let sweep = janitor.sweep().await.unwrap();
        assert_eq!(sweep.orphans_revoked, vec![orphan]);
        assert_eq!(sweep.compacted_to, None);
        assert_eq!(store.lease_info(orphan).await.unwrap(), None);
        for lease in [kept_alive, with_key, young, leader.leader_lease().unwrap()] {
            assert!(
                store.lease_info(lease).await.unwrap().is_some(),
                "lease {lease:x} was revoked"
            );
        }
        assert!(leader.is_leader());
        // Nothing left to do.
        assert!(janitor.sweep().await.unwrap().orphans_revoked.is_empty());
    }

    #[tokio::test]
    async fn the_janitor_compacts_all_but_the_last_revisions() {
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn Store> = store.clone();
        let leader = election(&store, "leader");
        let janitor = Janitor::new(
            dyn_store,
            leader,
            JanitorConfig {
                interval: Duration::from_secs(1),
                orphan_grace: Duration::from_secs(60),
                keep_revisions: 100,
            },
        );
        assert_eq!(
            janitor.sweep().await.unwrap().compacted_to,
            None,
            "young history"
        );
        let mut last = 0;
        for i in 0..150 {
            last = store.put("/test/k", vec![i]).await.unwrap();
        }
        let target = janitor.sweep().await.unwrap().compacted_to;
        assert_eq!(target, Some(last - 100));
        let mut old = store.watch("/test/", last - 101).await.unwrap();
        assert!(matches!(
            old.next().await,
            Some(Err(StoreError::Compacted { .. }))
        ));
        let mut kept = store.watch("/test/", last - 100).await.unwrap();
        assert!(matches!(kept.next().await, Some(Ok(_))));

        // One more write moves the target by less than a tenth of what is kept: no-op.
        store.put("/test/k", vec![0]).await.unwrap();
        assert_eq!(janitor.sweep().await.unwrap().compacted_to, None);
    }
}
