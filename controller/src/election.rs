//! Leader election among controllers: which one runs the cluster-wide janitor.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::leases::Keys;
use crate::metrics::Metrics;
use crate::store::{LeaseId, Store, StoreError, StoreEvent, Written};

/// Default TTL of the leader's etcd lease: failover time after a crash.
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(6);

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::MemoryStore;

    pub(crate) const TTL: Duration = Duration::from_secs(2);
    /// A hang guard, not a timing assertion.
    const PATIENCE: Duration = Duration::from_secs(30);

    pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn election(store: &Arc<MemoryStore>, name: &str) -> Arc<Election> {
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
}
