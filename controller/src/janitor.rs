//! Work that must happen once per cluster rather than once per controller: revoking
//! orphaned etcd leases and compacting history. Only the elected leader
//! ([`crate::election`]) runs it.
//!
//! Design notes:
//! - Orphaned leases come from a controller killed between `grant` and `create` (or cut off
//!   before it could revoke an unused lease): an etcd lease with no key that would live for
//!   its whole TTL, a day by default. The janitor revokes leases that have no key and have
//!   not been granted or kept alive for the grace period. It uses idle time (granted TTL
//!   minus remaining TTL) because etcd does not record a lease's age, and because a lease
//!   that someone keeps alive is in use by definition. The grace period covers a lease
//!   between its grant and its create, which takes milliseconds. On an etcd shared with
//!   other applications, their keyless leases would be revoked too: give Overlay its own
//!   etcd, or a grace period longer than their leases live without keys.
//! - With the fan-out's view of the keys ([`Janitor::with_view`]) a sweep looks up only the
//!   etcd leases that no key under the prefix is attached to: a lease the view shows a key
//!   of is not an orphan. So a sweep costs one lease listing and a lookup per candidate,
//!   not a lookup per node.
//! - Compaction keeps the last N revisions, and only runs once the target has moved by a
//!   tenth of N, so a quiet cluster is not compacted every interval. Watchers further
//!   behind than N revisions get `Compacted` and relist, which the fan-out handles.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use tracing::{debug, info, warn};

use crate::election::Election;
use crate::metrics::Metrics;
use crate::store::{LeaseId, LeaseInfo, Store, StoreError};
use crate::view::ViewState;

/// Lease lookups the janitor runs at once.
const LOOKUP_CONCURRENCY: usize = 8;

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
    /// Of those, the ones looked up in etcd (the others have keys the view shows).
    pub leases_looked_up: usize,
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
    view: Option<Arc<RwLock<ViewState>>>,
}

impl Janitor {
    pub fn new(store: Arc<dyn Store>, election: Arc<Election>, config: JanitorConfig) -> Self {
        Janitor {
            store,
            election,
            config,
            last_compaction: AtomicI64::new(0),
            metrics: None,
            view: None,
        }
    }

    /// Skips the lookup of leases that keys in `view` are attached to (module notes).
    pub fn with_view(mut self, view: Arc<RwLock<ViewState>>) -> Self {
        self.view = Some(view);
        self
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
        let (leases_checked, leases_looked_up, orphans_revoked) = self.revoke_orphans().await?;
        let compacted_to = self.compact().await?;
        Ok(Sweep {
            leases_checked,
            leases_looked_up,
            orphans_revoked,
            compacted_to,
        })
    }

    async fn revoke_orphans(&self) -> Result<(usize, usize, Vec<LeaseId>), StoreError> {
        let own = self.election.leader_lease();
        let leases: Vec<LeaseId> = self
            .store
            .list_leases()
            .await?
            .into_iter()
            .filter(|l| Some(*l) != own)
            .collect();
        let checked = leases.len();
        // Read after the listing: a lease the view shows a key of had one when listed.
        let with_keys = self.view.as_ref().and_then(|v| {
            let state = v.read().expect("view lock");
            state.synced.then(|| state.view.lease_ids())
        });
        let leases: Vec<LeaseId> = match &with_keys {
            Some(ids) => leases.into_iter().filter(|l| !ids.contains(l)).collect(),
            None => leases,
        };
        let looked_up = leases.len();
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
        Ok((checked, looked_up, revoked))
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
    view: Arc<RwLock<ViewState>>,
) -> Arc<Election> {
    let election = Arc::new(
        Election::new(store.clone(), prefix, identity, leader_ttl).with_metrics(metrics.clone()),
    );
    tokio::spawn(election.clone().run());
    let janitor = Janitor::new(store, election.clone(), config)
        .with_metrics(metrics)
        .with_view(view);
    tokio::spawn(janitor.run());
    election
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::tests::{election, eventually};
    use crate::store::MemoryStore;

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

    /// With the fan-out's view, a sweep looks up only leases no key is attached to.
    #[tokio::test]
    async fn with_the_view_only_keyless_leases_are_looked_up() {
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn Store> = store.clone();
        let leader = election(&store, "leader");
        tokio::spawn(leader.clone().run());
        eventually("leader elected", || leader.is_leader()).await;
        let m = Arc::new(crate::leases::LeaseManager::new(
            dyn_store.clone(),
            crate::leases::Keys::new("/test"),
        ));
        m.set_config(
            r#"{"network":"10.244.0.0/16","backend":{"type":"alloc"}}"#,
            false,
        )
        .await
        .unwrap();
        let f = Arc::new(crate::fanout::Fanout::new());
        tokio::spawn(f.run(m.clone()));
        for i in 0..10 {
            m.acquire(&crate::leases::AcquireRequest {
                node: format!("n{i}"),
                public_ip: Some("192.0.2.1".parse().unwrap()),
                backend: overlay_core::BackendType::Alloc,
                data: Default::default(),
                preferred: None,
                ..Default::default()

            })
            .await
            .unwrap();
        }
        let keyless = store.grant(Duration::from_secs(3600)).await.unwrap();
        let (_, now) = store.list("/test/").await.unwrap();
        m.view_reaches(now).await;
        let janitor = Janitor::new(
            dyn_store,
            leader,
            JanitorConfig {
                interval: Duration::from_secs(1),
                orphan_grace: Duration::from_secs(3600),
                keep_revisions: 0,
            },
        )
        .with_view(m.view().clone());
        let sweep = janitor.sweep().await.unwrap();
        assert_eq!(sweep.leases_checked, 11);
        assert_eq!(sweep.leases_looked_up, 1, "only the keyless lease");
        assert!(sweep.orphans_revoked.is_empty(), "young: {keyless:x}");
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
