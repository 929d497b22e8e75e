//! Watch fan-out: one etcd watch, any number of agent streams.
//!
//! N agents each watching etcd would mean N watchers and N copies of every event inside
//! etcd; Calico built Typha to avoid exactly that. Here the controller holds a single
//! watch, keeps the current leases in a [`LeaseCache`], and broadcasts each event once,
//! already encoded as the gRPC message, to every client stream.
//!
//! The broadcast channel never blocks the sender: a client that falls more than
//! [`BROADCAST_CAPACITY`] events behind is told it lagged, and its stream is resent a fresh
//! snapshot instead of the missed events. So a slow agent costs only itself, and every
//! client ends up with exactly the right state.
//!
//! Snapshot-then-subscribe happens under the cache's read lock and apply-then-broadcast
//! under its write lock, so no event falls between a snapshot and the live stream.
//!
//! What is streamed is what the lease listing shows: the watch follows the whole cluster
//! prefix (the config and the lease keys, at one revision), keeps every key in a
//! [`LeaseView`], and after each revision that touches one of them interprets the set with
//! the same function as the listing ([`crate::view`]) and sends the difference. So a stray
//! key never becomes a lease, deleting it is no event, a value that turns unreadable is a
//! "removed", and a clash is resolved the same way everywhere. Ignored keys are logged when
//! they appear and kept for the `ignored_lease_keys` metric.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipnet::Ipv4Net;
use overlay_core::backoff::Backoff;
use overlay_core::watch::{LeaseCache, LeaseEvent, Replay};
use overlay_proto::v1::WatchLeasesResponse;
use overlay_proto::{event_to_proto, snapshot_to_proto};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::leases::LeaseManager;
use crate::metrics::Metrics;
use crate::store::{StoreError, StoreEvent, WatchBatch};
use crate::view::{Applied, IgnoreReason, Ignored, Interpretation, LeaseView};

/// Events kept for clients that fall behind before they are resynced with a snapshot.
pub const BROADCAST_CAPACITY: usize = 4096;
/// Events kept for clients resuming by revision.
pub const HISTORY_CAPACITY: usize = 8192;

struct Fanned {
    message: WatchLeasesResponse,
    /// When the event reached the controller, for the fan-out lag metric.
    at: std::time::Instant,
}

pub struct Fanout {
    cache: RwLock<LeaseCache>,
    ignored: RwLock<Vec<Ignored>>,
    tx: broadcast::Sender<Arc<Fanned>>,
    synced: AtomicBool,
    clients: AtomicUsize,
    events: AtomicU64,
    resyncs: AtomicU64,
    metrics: Arc<Metrics>,
    /// Set on shutdown: every client stream ends, so the server can stop (a graceful
    /// shutdown otherwise waits for streams that never end) and agents fail over.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Fanout {
    fn default() -> Self {
        Self::new()
    }
}

impl Fanout {
    pub fn new() -> Self {
        Self::with_metrics(Arc::new(Metrics::new()))
    }

    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Fanout {
            closing: tokio::sync::watch::channel(false).0,
            metrics,
            cache: RwLock::new(LeaseCache::new(HISTORY_CAPACITY)),
            ignored: RwLock::new(Vec::new()),
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            synced: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
        }
    }

    /// Ends every client stream, now and for streams opened later.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether the cache holds a listing (clients can be served).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Events broadcast since start.
    pub fn events_fanned_out(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Snapshots sent to clients that fell behind or could not be replayed.
    pub fn snapshots_sent(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Leases in the cache, and how many of them fit `range`.
    pub fn count_leases(&self, range: Option<&overlay_core::SubnetRange>) -> (usize, usize) {
        let cache = self.cache.read().expect("cache lock");
        let fitting = range.map_or(0, |r| {
            cache.leases().filter(|l| r.contains(l.subnet)).count()
        });
        (cache.len(), fitting)
    }

    pub fn revision(&self) -> i64 {
        self.cache.read().expect("cache lock").revision()
    }

    fn broadcast(&self, events: &[Arc<LeaseEvent>]) {
        for e in events {
            self.events.fetch_add(1, Ordering::Relaxed);
            self.metrics.events_fanned_out.inc();
            // No receivers is fine.
            let _ = self.tx.send(Arc::new(Fanned {
                message: event_to_proto(e),
                at: std::time::Instant::now(),
            }));
        }
    }

    /// Feeds the cache from the store until the process ends: list, watch from the next
    /// revision, resume a broken watch after the last revision applied, and on compaction
    /// list again (sending clients only the difference).
    pub async fn run(self: Arc<Self>, manager: Arc<LeaseManager>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Kept across relists, so that a config that turned unreadable meanwhile does not
        // make every lease vanish (see `LeaseView::load`).
        let mut view = LeaseView::new(manager.keys().clone());
        loop {
            match self.sync_once(&manager, &mut view).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "lease watch interrupted");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Keys under the lease prefix that are not served (see [`crate::view`]), as of the
    /// last change.
    pub fn ignored(&self) -> Vec<Ignored> {
        self.ignored.read().expect("ignored lock").clone()
    }

    /// Records what the view ignores now, and logs every key newly ignored.
    fn report(&self, ignored: Vec<Ignored>) {
        let mut current = self.ignored.write().expect("ignored lock");
        {
            let known: HashSet<(&str, IgnoreReason)> =
                current.iter().map(|i| (i.key.as_str(), i.reason)).collect();
            for i in &ignored {
                if !known.contains(&(i.key.as_str(), i.reason)) {
                    warn!(key = %i.key, reason = i.reason.label(), detail = %i.detail, "a key under the lease prefix is not a lease; it is not served");
                }
            }
        }
        *current = ignored;
    }

    /// One list-then-watch cycle; returns when the watch ends.
    async fn sync_once(
        &self,
        manager: &LeaseManager,
        view: &mut LeaseView,
    ) -> Result<(), StoreError> {
        let store = manager.store();
        // The whole cluster prefix: the config decides what the lease keys mean, so it is
        // read at the same revision and followed by the same watch.
        let root = manager.keys().root();
        let (kvs, revision) = store.list(&root).await?;
        for problem in view.load(&kvs) {
            warn!(error = %problem, "the stored network config is unreadable; the last readable one stays in force");
        }
        let events = {
            let interpretation = view.interpret();
            let leases = interpretation
                .leases
                .values()
                .filter_map(|e| e.lease().cloned())
                .collect();
            let mut cache = self.cache.write().expect("cache lock");
            let events = cache.resync(leases, revision);
            self.broadcast(&events);
            self.report(interpretation.ignored);
            events
        };
        self.synced.store(true, Ordering::Relaxed);
        info!(revision, changes = events.len(), "lease cache synced");

        // A watch that breaks (etcd unreachable, the member it was on gone) resumes after
        // the last revision applied, so every change still reaches clients as its own
        // event at its own revision; only a compaction makes a relist (a difference) needed.
        let mut resume_at = revision + 1;
        let mut backoff = Duration::from_millis(100);
        loop {
            let broke = match store.watch(&root, resume_at).await {
                Err(e) => e,
                Ok(mut watch) => loop {
                    let batch = match watch.next().await {
                        Some(Ok(b)) => b,
                        Some(Err(StoreError::Compacted {
                            compact_revision, ..
                        })) => {
                            info!(compact_revision, "lease watch compacted; relisting");
                            return Ok(());
                        }
                        Some(Err(e)) => break e,
                        None => break StoreError::Unavailable("the lease watch ended".into()),
                    };
                    // etcd sends a watch's events in revision order, and a batch without
                    // events (progress) only once every earlier one was sent.
                    resume_at = batch
                        .events
                        .iter()
                        .map(StoreEvent::revision)
                        .max()
                        .unwrap_or(batch.revision)
                        .max(resume_at - 1)
                        + 1;
                    backoff = Duration::from_millis(100);
                    self.apply_batch(view, batch);
                },
            };
            warn!(error = %broke, resume_at, retry_in = ?backoff, "lease watch interrupted; resuming");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            // An etcd restored from a snapshot meanwhile is behind what was applied: a
            // watch from `resume_at` would wait for revisions it has yet to reach, so list.
            match store.list(&manager.keys().config()).await {
                Ok((_, now)) if now < resume_at - 1 => {
                    info!(
                        revision = now,
                        resume_at, "etcd is behind the lease watch (restored?); relisting"
                    );
                    return Ok(());
                }
                // Unreachable still: the watch fails the same way, and this runs again.
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Applies one watch batch to the view and the cache, and broadcasts what changed.
    fn apply_batch(&self, view: &mut LeaseView, batch: WatchBatch) {
        let mut cache = self.cache.write().expect("cache lock");
        let mut events = Vec::new();
        // Interpreted again once per revision that touches a lease key or the config,
        // so every event carries the revision that caused it.
        for group in batch.events.chunk_by(|a, b| a.revision() == b.revision()) {
            let mut changed = false;
            for ev in group {
                match view.apply(ev) {
                    Applied::Unrelated => {}
                    Applied::Changed => changed = true,
                    Applied::BadConfig(e) => {
                        warn!(error = %e, "the stored network config is unreadable; the last readable one stays in force")
                    }
                }
            }
            if changed {
                let interpretation = view.interpret();
                events.extend(follow(&mut cache, &interpretation, group[0].revision()));
                self.report(interpretation.ignored);
            }
        }
        cache.advance(batch.revision);
        self.broadcast(&events);
        debug!(
            revision = batch.revision,
            events = events.len(),
            "lease events fanned out"
        );
    }

    /// A client's stream: a snapshot (or a replay when resuming after `after_revision`),
    /// then live events; a fresh snapshot whenever the client falls behind.
    pub fn subscribe(
        self: &Arc<Self>,
        after_revision: i64,
    ) -> impl Stream<Item = WatchLeasesResponse> + Send + 'static {
        let (initial, rx) = {
            let cache = self.cache.read().expect("cache lock");
            let rx = self.tx.subscribe();
            let initial = match (after_revision, cache.replay_after(after_revision)) {
                (r, Replay::Events(events)) if r > 0 => {
                    events.iter().map(|e| event_to_proto(e)).collect()
                }
                _ => {
                    let (rev, leases) = cache.snapshot();
                    vec![snapshot_to_proto(rev, &leases)]
                }
            };
            (initial, rx)
        };
        let guard = ClientGuard(self.clone());
        self.clients.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let mut closing = self.closing.subscribe();
        let closed = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        async_stream(initial, rx, me, guard).take_until(closed)
    }
}

/// Brings `cache` to what `interpretation` serves, at `revision`; the events that took.
fn follow(
    cache: &mut LeaseCache,
    interpretation: &Interpretation<'_>,
    revision: i64,
) -> Vec<Arc<LeaseEvent>> {
    let gone: Vec<Ipv4Net> = cache
        .leases()
        .map(|l| l.subnet)
        .filter(|s| !interpretation.leases.contains_key(s))
        .collect();
    let mut events: Vec<Arc<LeaseEvent>> = gone
        .iter()
        .filter_map(|s| cache.remove(s, revision))
        .collect();
    for (subnet, entry) in &interpretation.leases {
        let Some(lease) = entry.lease() else { continue };
        if cache.get(subnet) != Some(lease) {
            events.extend(cache.put(lease.clone(), revision));
        }
    }
    events
}

struct ClientGuard(Arc<Fanout>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn async_stream(
    initial: Vec<WatchLeasesResponse>,
    rx: broadcast::Receiver<Arc<Fanned>>,
    fanout: Arc<Fanout>,
    guard: ClientGuard,
) -> impl Stream<Item = WatchLeasesResponse> + Send + 'static {
    struct State {
        rx: broadcast::Receiver<Arc<Fanned>>,
        fanout: Arc<Fanout>,
        _guard: ClientGuard,
    }
    let live = futures::stream::unfold(
        State {
            rx,
            fanout,
            _guard: guard,
        },
        |mut st| async move {
            match st.rx.recv().await {
                Ok(f) => {
                    st.fanout
                        .metrics
                        .fanout_lag
                        .observe(f.at.elapsed().as_secs_f64());
                    Some((f.message.clone(), st))
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let snapshot = {
                        let cache = st.fanout.cache.read().expect("cache lock");
                        st.rx = st.fanout.tx.subscribe();
                        let (rev, leases) = cache.snapshot();
                        snapshot_to_proto(rev, &leases)
                    };
                    st.fanout.resyncs.fetch_add(1, Ordering::Relaxed);
                    st.fanout.metrics.snapshots_resent.inc();
                    debug!(missed, "watch client fell behind; sending a snapshot");
                    Some((snapshot, st))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        },
    );
    futures::stream::iter(initial).chain(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::{AcquireRequest, Keys};
    use crate::store::{MemoryStore, Store};
    use overlay_proto::v1::watch_leases_response::Kind;
    use overlay_proto::v1::EventType;

    async fn setup() -> (Arc<Fanout>, Arc<LeaseManager>) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let m = Arc::new(LeaseManager::new(store, Keys::new("/f")));
        m.set_config(
            r#"{"network":"10.244.0.0/16","backend":{"type":"alloc"}}"#,
            false,
        )
        .await
        .unwrap();
        let f = Arc::new(Fanout::new());
        tokio::spawn(f.clone().run(m.clone()));
        while !f.is_synced() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (f, m)
    }

    fn req(node: &str) -> AcquireRequest {
        AcquireRequest {
            node: node.into(),
            public_ip: "192.0.2.1".parse().unwrap(),
            backend: overlay_core::BackendType::Alloc,
            data: Default::default(),
            preferred: None,
        }
    }

    async fn next(s: &mut (impl Stream<Item = WatchLeasesResponse> + Unpin)) -> Kind {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("message")
            .expect("open")
            .kind
            .unwrap()
    }

    #[tokio::test]
    async fn clients_get_a_snapshot_then_events() {
        let (f, m) = setup().await;
        let a = m.acquire(&req("a")).await.unwrap().lease;
        while f.revision() == 0 || f.cache.read().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut s = Box::pin(f.subscribe(0));
        let Kind::Snapshot(snap) = next(&mut s).await else {
            panic!("snapshot first")
        };
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(f.clients(), 1);
        m.revoke(a.subnet).await.unwrap();
        let Kind::Event(e) = next(&mut s).await else {
            panic!("event")
        };
        assert_eq!(e.r#type, EventType::Removed as i32);
        assert_eq!(e.lease.unwrap().node, "a");
        drop(s);
        assert_eq!(f.clients(), 0);
    }

    #[tokio::test]
    async fn resuming_clients_are_replayed_what_they_missed() {
        let (f, m) = setup().await;
        let rev = f.revision();
        m.acquire(&req("a")).await.unwrap();
        m.acquire(&req("b")).await.unwrap();
        while f.cache.read().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut s = Box::pin(f.subscribe(rev));
        for node in ["a", "b"] {
            let Kind::Event(e) = next(&mut s).await else {
                panic!("replayed event")
            };
            assert_eq!(e.lease.unwrap().node, node);
        }
        // From before the cache's first listing: a snapshot.
        let mut s = Box::pin(f.subscribe(1));
        assert!(matches!(next(&mut s).await, Kind::Snapshot(_)));
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_gets_a_fresh_snapshot_and_blocks_nobody() {
        let (f, m) = setup().await;
        let mut slow = Box::pin(f.subscribe(0));
        let mut fast = Box::pin(f.subscribe(0));
        assert!(matches!(next(&mut slow).await, Kind::Snapshot(_)));
        assert!(matches!(next(&mut fast).await, Kind::Snapshot(_)));
        // Flood events directly through the cache, more than the broadcast holds.
        let template = m.acquire(&req("seed")).await.unwrap().lease;
        let mut fast_seen = 0;
        for i in 0..(BROADCAST_CAPACITY + 10) {
            let mut l = template.clone();
            l.record.node = format!("n{i}");
            let events: Vec<_> = {
                let mut c = f.cache.write().unwrap();
                let rev = c.revision() + 1;
                c.put(l, rev).into_iter().collect()
            };
            f.broadcast(&events);
            // The fast client keeps up (unconstrained: tokio's co-op budget would otherwise
            // make a busy loop like this one yield every 128 messages).
            while let Some(Some(_)) =
                futures::FutureExt::now_or_never(tokio::task::unconstrained(fast.next()))
            {
                fast_seen += 1;
            }
        }
        assert!(
            fast_seen >= BROADCAST_CAPACITY,
            "fast client kept up: {fast_seen}"
        );
        let Kind::Snapshot(snap) = next(&mut slow).await else {
            panic!("the slow client is resynced")
        };
        assert_eq!(snap.revision, f.revision());
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(f.snapshots_sent(), 1);
    }
}
