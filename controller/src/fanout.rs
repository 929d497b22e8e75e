//! Watch fan-out: one etcd watch, any number of agent streams.
//!
//! N agents each watching etcd would mean N watchers and N copies of every event inside
//! etcd; Calico built Typha to avoid exactly that. Here the controller holds a single
//! watch, keeps the current leases in a [`LeaseCache`], and broadcasts each event once,
//! already encoded as a gRPC frame ([`crate::frames`]), to every client stream: all streams
//! share the same bytes, and no stream keeps an encoding buffer of its own.
//!
//! The broadcast channel never blocks the sender: a client that falls more than
//! [`BROADCAST_CAPACITY`] events behind is told it lagged, and its stream is resent a fresh
//! snapshot instead of the missed events. So a slow agent costs only itself, and every
//! client ends up with exactly the right state.
//!
//! Snapshot-then-subscribe happens under the cache's read lock and apply-then-broadcast
//! under its write lock, so no event falls between a snapshot and the live stream. A
//! snapshot is assembled from per-lease pieces encoded when the lease changed, and streams
//! that start at the same revision share one.
//!
//! What is streamed is what the lease listing shows: the watch follows the whole cluster
//! prefix (the config and the lease keys, at one revision), keeps every key in the
//! [`crate::view::LeaseView`] it shares with lease allocation ([`LeaseManager::view`]), and after each
//! batch of revisions that touches one of them interprets the set with the same function
//! as the listing ([`crate::view`]) and sends the difference. So a stray key never becomes a
//! lease, deleting it is no event, a value that turns unreadable is a "removed", and a
//! clash is resolved the same way everywhere. Ignored keys are logged when they appear and
//! kept for the `ignored_lease_keys` metric.
//!
//! **Batches.** Every watch response that has arrived when the fan-out gets to it is
//! applied at once and interpreted once, so a burst of writes (thousands of agents joining)
//! costs one interpretation per batch rather than one per write. A batch is split where a
//! key it already changed changes again, so every value a key had is streamed (a value that
//! turns unreadable and is then rewritten is a "removed", then an "added"). Each event
//! carries the revision of the write to its key; a lease that changes only through another
//! key (a clash resolved, a config change) carries the last such revision of its part of
//! the batch. Events are sent in revision order, so a client resuming after any revision it
//! saw misses nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use ipnet::IpNet;
use overlay_core::backoff::Backoff;
use overlay_core::watch::{ChangeKind, LeaseCache, LeaseEvent, Replay};
use overlay_proto::v1::WatchLeasesResponse;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::frames;
use crate::leases::{Keys, LeaseManager};
use crate::metrics::Metrics;
use crate::store::{StoreError, StoreEvent, WatchBatch};
use crate::view::{Applied, IgnoreReason, Ignored, Interpretation, ViewState};

/// Events kept for clients that fall behind before they are resynced with a snapshot.
pub const BROADCAST_CAPACITY: usize = 4096;
/// Events kept for clients resuming by revision.
pub const HISTORY_CAPACITY: usize = 8192;
/// Watch responses applied together at most (see "Batches" in the module notes).
const MAX_COALESCED: usize = 4096;

/// What one broadcast carries: the events of one batch, as consecutive gRPC frames.
struct Fanned {
    /// The events as gRPC frames, one after the other, shared by every stream.
    frames: Bytes,
    /// When the events reached the controller, for the fan-out lag metric.
    at: std::time::Instant,
    /// The controller is shutting down: the stream ends here.
    close: bool,
}

/// A stream sends what has queued up for it in writes of at most this many bytes (one
/// wake-up and one write per batch, not per event, when a client is behind).
const MAX_WRITE: usize = 64 * 1024;

/// Encoded pieces of the current leases, and the last snapshot assembled from them.
#[derive(Default)]
struct Encoded {
    /// Each lease of the cache as an element of a snapshot ([`frames::lease_part`]).
    parts: BTreeMap<IpNet, Bytes>,
    /// Bumped with every change of `parts`.
    version: u64,
    /// The last snapshot: (revision, version, frame).
    snapshot: Option<(i64, u64, Bytes)>,
}

pub struct Fanout {
    cache: RwLock<LeaseCache>,
    encoded: Mutex<Encoded>,
    ignored: RwLock<Vec<Ignored>>,
    tx: broadcast::Sender<Arc<Fanned>>,
    synced: AtomicBool,
    clients: AtomicUsize,
    events: AtomicU64,
    resyncs: AtomicU64,
    metrics: Arc<Metrics>,
    /// Set on shutdown: every client stream ends, so the server can stop (a graceful
    /// shutdown otherwise waits for streams that never end) and agents fail over. Streams
    /// learn it from a last broadcast message, so that no stream polls anything but its
    /// receiver per event.
    closing: AtomicBool,
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
            closing: AtomicBool::new(false),
            metrics,
            cache: RwLock::new(LeaseCache::new(HISTORY_CAPACITY)),
            encoded: Mutex::default(),
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
        // The flag first: a stream subscribed after this message checks it.
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Arc::new(Fanned {
            frames: Bytes::new(),
            at: std::time::Instant::now(),
            close: true,
        }));
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

    /// Sends `events` to every stream, each encoded once, and keeps the snapshot pieces
    /// in step with them. Called with every change of the cache, in order.
    fn broadcast(&self, events: &[Arc<LeaseEvent>]) {
        if events.is_empty() {
            return;
        }
        {
            let mut encoded = self.encoded.lock().expect("encoded lock");
            for e in events {
                match e.kind {
                    ChangeKind::Added => {
                        encoded
                            .parts
                            .insert(e.lease.subnet, frames::lease_part(&e.lease));
                    }
                    ChangeKind::Removed => {
                        encoded.parts.remove(&e.lease.subnet);
                    }
                }
            }
            encoded.version += 1;
        }
        let encoded: Vec<Bytes> = events.iter().map(|e| frames::event_frame(e)).collect();
        let frames = if encoded.len() == 1 {
            encoded.into_iter().next().expect("one frame")
        } else {
            encoded.concat().into()
        };
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.metrics.events_fanned_out.inc_by(events.len() as u64);
        // No receivers is fine.
        let _ = self.tx.send(Arc::new(Fanned {
            frames,
            at: std::time::Instant::now(),
            close: false,
        }));
    }

    /// A snapshot of `cache` as a frame: the last one when nothing changed since.
    fn snapshot_frame(&self, cache: &LeaseCache) -> Bytes {
        let revision = cache.revision();
        let mut encoded = self.encoded.lock().expect("encoded lock");
        if let Some((rev, version, frame)) = &encoded.snapshot {
            if *rev == revision && *version == encoded.version {
                return frame.clone();
            }
        }
        // The pieces follow the broadcast events, which follow the cache; encode any lease
        // they lack (never the case while the fan-out runs) rather than send a wrong one.
        let missing: HashMap<IpNet, Bytes> = cache
            .leases()
            .filter(|l| !encoded.parts.contains_key(&l.subnet))
            .map(|l| (l.subnet, frames::lease_part(l)))
            .collect();
        let parts = &encoded.parts;
        let pieces: Vec<&[u8]> = cache
            .leases()
            .map(|l| {
                parts
                    .get(&l.subnet)
                    .or_else(|| missing.get(&l.subnet))
                    .expect("every lease has a piece")
                    .as_ref()
            })
            .collect();
        let frame = frames::snapshot_frame(revision, &pieces);
        encoded.snapshot = Some((revision, encoded.version, frame.clone()));
        frame
    }

    /// Feeds the cache and the manager's view from the store until the process ends:
    /// list, watch from the next revision, resume a broken watch after the last revision
    /// applied, and on compaction list again (sending clients only the difference).
    pub async fn run(self: Arc<Self>, manager: Arc<LeaseManager>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.sync_once(&manager).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "lease watch interrupted");
                    tokio::time::sleep(wait).await;
                }
            }
            // Until the next listing the view falls behind: allocation reads etcd.
            manager.view().write().expect("view lock").synced = false;
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
    async fn sync_once(&self, manager: &LeaseManager) -> Result<(), StoreError> {
        let store = manager.store();
        // The whole cluster prefix: the config decides what the lease keys mean, so it is
        // read at the same revision and followed by the same watch.
        let root = manager.keys().root();
        let (kvs, revision) = store.list(&root).await?;
        let shared = manager.view();
        let events = {
            let mut guard = shared.write().expect("view lock");
            let state: &mut ViewState = &mut guard;
            for problem in state.view.load(&kvs) {
                warn!(error = %problem, "the stored network config is unreadable; the last readable one stays in force");
            }
            // A stored config this controller cannot read, and none read before: every
            // lease would look unconfigured, and an empty snapshot would make agents drop
            // every peer. Stay unsynced (watch clients get UNAVAILABLE and keep their
            // datapath) until the config can be read.
            let config_key = manager.keys().config();
            if state.view.config().is_none() && kvs.iter().any(|kv| kv.key == config_key) {
                return Err(StoreError::Other(
                    "the stored network config is unreadable and none was read before; not serving leases".into(),
                ));
            }
            let interpretation = state.view.interpret();
            let served_macs = ViewState::note_served(&interpretation);
            let leases = interpretation
                .leases
                .values()
                .filter_map(|e| e.lease().cloned())
                .collect();
            let mut cache = self.cache.write().expect("cache lock");
            let events = cache.resync(leases, revision);
            self.broadcast(&events);
            self.report(interpretation.ignored);
            state.served_macs = served_macs;
            state.revision = revision;
            state.synced = true;
            events
        };
        manager.view_advanced(revision);
        self.synced.store(true, Ordering::Relaxed);
        info!(revision, changes = events.len(), "lease cache synced");

        // A watch that breaks (etcd unreachable, the member it was on gone) resumes after
        // the last revision applied, so every change still reaches clients as its own
        // event at its own revision; only a compaction makes a relist (a difference) needed.
        let mut resume_at = revision + 1;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let broke = match store.watch(&root, resume_at).await {
                Err(e) => e,
                Ok(mut watch) => loop {
                    let Some(first) = watch.next().await else {
                        break StoreError::Unavailable("the lease watch ended".into());
                    };
                    // Everything that has arrived meanwhile goes in the same batch.
                    let mut batches = Vec::new();
                    let mut end = None;
                    let mut next = Some(first);
                    while let Some(item) = next.take() {
                        match item {
                            Ok(b) => batches.push(b),
                            Err(e) => {
                                end = Some(e);
                                break;
                            }
                        }
                        if batches.len() < MAX_COALESCED {
                            next = watch.next().now_or_never().flatten();
                        }
                    }
                    if !batches.is_empty() {
                        // etcd sends a watch's events in revision order, and a batch
                        // without events (progress) only once every earlier one was sent.
                        let last = batches
                            .iter()
                            .map(|b| {
                                b.events
                                    .iter()
                                    .map(StoreEvent::revision)
                                    .max()
                                    .unwrap_or(b.revision)
                            })
                            .max()
                            .unwrap_or(resume_at - 1);
                        resume_at = last.max(resume_at - 1) + 1;
                        let revision = self.apply(manager, &batches);
                        manager.view_advanced(revision);
                        backoff.reset();
                    }
                    match end {
                        None => {}
                        Some(StoreError::Compacted {
                            compact_revision, ..
                        }) => {
                            info!(compact_revision, "lease watch compacted; relisting");
                            return Ok(());
                        }
                        Some(e) => break e,
                    }
                },
            };
            let wait = backoff.next_delay();
            warn!(error = %broke, resume_at, retry_in = ?wait, "lease watch interrupted; resuming");
            tokio::time::sleep(wait).await;
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

    /// Applies watch batches to the view and the cache, and broadcasts what changed; the
    /// revision the view is complete up to.
    fn apply(&self, manager: &LeaseManager, batches: &[WatchBatch]) -> i64 {
        let shared = manager.view();
        let mut guard = shared.write().expect("view lock");
        let state: &mut ViewState = &mut guard;
        let mut cache = self.cache.write().expect("cache lock");
        // Of the part not interpreted yet: the revision of the last write to each lease key
        // (and the config), and of the last change at all.
        let mut touched: HashMap<String, i64> = HashMap::new();
        let mut last_change = None;
        let mut revision = state.revision;
        let mut events = Vec::new();
        for batch in batches {
            for group in batch.events.chunk_by(|a, b| a.revision() == b.revision()) {
                // A key changes again: interpret what came before first, so that every
                // value a key had is streamed, never folded into a later one.
                if group.iter().any(|ev| touched.contains_key(ev.key())) {
                    if let Some(last) = last_change.take() {
                        events.extend(self.interpret(manager, state, &mut cache, &touched, last));
                        touched.clear();
                    }
                }
                for ev in group {
                    match state.view.apply(ev) {
                        Applied::Unrelated => {}
                        Applied::Changed => {
                            touched.insert(ev.key().to_string(), ev.revision());
                            last_change = Some(ev.revision());
                        }
                        Applied::BadConfig(e) => {
                            warn!(error = %e, "the stored network config is unreadable; the last readable one stays in force")
                        }
                    }
                }
            }
            revision = revision.max(batch.revision);
        }
        if let Some(last) = last_change {
            events.extend(self.interpret(manager, state, &mut cache, &touched, last));
        }
        state.revision = revision;
        cache.advance(revision);
        self.broadcast(&events);
        debug!(
            revision,
            batches = batches.len(),
            events = events.len(),
            "lease events fanned out"
        );
        revision
    }

    /// Interprets the view and brings the cache to it (see [`follow`]); the events.
    fn interpret(
        &self,
        manager: &LeaseManager,
        state: &mut ViewState,
        cache: &mut LeaseCache,
        touched: &HashMap<String, i64>,
        last_change: i64,
    ) -> Vec<Arc<LeaseEvent>> {
        let interpretation = state.view.interpret();
        let events = follow(manager.keys(), cache, &interpretation, touched, last_change);
        let served_macs = ViewState::note_served(&interpretation);
        self.report(interpretation.ignored);
        state.served_macs = served_macs;
        events
    }

    /// A client's stream of gRPC frames: a snapshot (or a replay when resuming after
    /// `after_revision`), then live events; a fresh snapshot whenever the client falls
    /// behind. It ends when the controller shuts down. An item may hold several frames
    /// (events that queued up while the client was being written to).
    pub fn subscribe_frames(
        self: &Arc<Self>,
        after_revision: i64,
    ) -> impl Stream<Item = Bytes> + Send + 'static {
        let (initial, rx) = {
            let cache = self.cache.read().expect("cache lock");
            let rx = self.tx.subscribe();
            let initial = match (after_revision, cache.replay_after(after_revision)) {
                (r, Replay::Events(events)) if r > 0 => {
                    events.iter().map(|e| frames::event_frame(e)).collect()
                }
                _ => vec![self.snapshot_frame(&cache)],
            };
            (initial, rx)
        };
        let guard = ClientGuard(self.clone());
        self.clients.fetch_add(1, Ordering::Relaxed);
        // Checked after subscribing: a close after this check reaches `rx`.
        let closed = self.closing.load(Ordering::SeqCst);
        frame_stream(initial, rx, self.clone(), guard, closed)
    }

    /// [`Self::subscribe_frames`], decoded: for in-process readers (tests and tools).
    pub fn subscribe(
        self: &Arc<Self>,
        after_revision: i64,
    ) -> impl Stream<Item = WatchLeasesResponse> + Send + 'static {
        self.subscribe_frames(after_revision).flat_map(|chunk| {
            futures::stream::iter(
                frames::decode_all(&chunk).expect("the fan-out's own frames decode"),
            )
        })
    }
}

/// Brings `cache` to what `interpretation` serves; the events that took, in revision
/// order. An event's revision is that of the last write to its key (`touched`), else
/// `last_change` (the lease changed through another key: a clash, the config).
fn follow(
    keys: &Keys,
    cache: &mut LeaseCache,
    interpretation: &Interpretation<'_>,
    touched: &HashMap<String, i64>,
    last_change: i64,
) -> Vec<Arc<LeaseEvent>> {
    enum Change {
        Remove(IpNet),
        Put(overlay_core::lease::Lease),
    }
    let revision_of = |key: Option<&str>| {
        key.and_then(|k| touched.get(k).copied())
            .unwrap_or(last_change)
    };
    let mut changes: Vec<(i64, Change)> = Vec::new();
    for l in cache.leases() {
        if !interpretation.leases.contains_key(&l.subnet) {
            // A served lease's key is the canonical key of its subnet.
            let key = keys.lease(l.subnet);
            changes.push((revision_of(Some(&key)), Change::Remove(l.subnet)));
        }
    }
    for (subnet, entry) in &interpretation.leases {
        let Some(lease) = entry.lease() else { continue };
        if cache.get(subnet) != Some(lease) {
            changes.push((
                revision_of(Some(entry.key.as_str())),
                Change::Put(lease.clone()),
            ));
        }
    }
    // Stable: within one revision, removals first, as before.
    changes.sort_by_key(|(rev, _)| *rev);
    changes
        .into_iter()
        .filter_map(|(rev, change)| match change {
            Change::Remove(subnet) => cache.remove(&subnet, rev),
            Change::Put(lease) => cache.put(lease, rev),
        })
        .collect()
}

struct ClientGuard(Arc<Fanout>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn frame_stream(
    initial: Vec<Bytes>,
    rx: broadcast::Receiver<Arc<Fanned>>,
    fanout: Arc<Fanout>,
    guard: ClientGuard,
    closed: bool,
) -> impl Stream<Item = Bytes> + Send + 'static {
    struct State {
        rx: broadcast::Receiver<Arc<Fanned>>,
        fanout: Arc<Fanout>,
        _guard: ClientGuard,
        /// The close message was seen: end after what is being sent.
        ending: bool,
    }
    let initial = if closed { Vec::new() } else { initial };
    let live = futures::stream::unfold(
        State {
            rx,
            fanout,
            _guard: guard,
            ending: closed,
        },
        |mut st| async move {
            if st.ending {
                return None;
            }
            match st.rx.recv().await {
                Ok(f) if f.close => None,
                Ok(f) => {
                    st.fanout
                        .metrics
                        .fanout_lag
                        .observe(f.at.elapsed().as_secs_f64());
                    // Whatever else has queued up goes in the same write (a lag found
                    // here is reported by the next recv).
                    let mut more = Vec::new();
                    let mut len = f.frames.len();
                    while len < MAX_WRITE {
                        match st.rx.try_recv() {
                            Ok(next) if next.close => {
                                st.ending = true;
                                break;
                            }
                            Ok(next) => {
                                len += next.frames.len();
                                more.push(next);
                            }
                            Err(_) => break,
                        }
                    }
                    if more.is_empty() {
                        return Some((f.frames.clone(), st));
                    }
                    let mut chunk = bytes::BytesMut::with_capacity(len);
                    chunk.extend_from_slice(&f.frames);
                    for m in &more {
                        chunk.extend_from_slice(&m.frames);
                    }
                    Some((chunk.freeze(), st))
                }
                Err(broadcast::error::RecvError::Lagged(_))
                    if st.fanout.closing.load(Ordering::SeqCst) =>
                {
                    None
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let snapshot = {
                        let cache = st.fanout.cache.read().expect("cache lock");
                        st.rx = st.fanout.tx.subscribe();
                        st.fanout.snapshot_frame(&cache)
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
            public_ip: Some("192.0.2.1".parse().unwrap()),
            backend: overlay_core::BackendType::Alloc,
            data: Default::default(),
            preferred: None,
            ..Default::default()

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

    /// A controller that starts while the stored config is unreadable serves no snapshot
    /// (an empty one would make every agent drop its peers) until the config is readable.
    #[tokio::test]
    async fn an_unreadable_config_at_start_serves_nothing_until_it_is_fixed() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let m = Arc::new(LeaseManager::new(store.clone(), Keys::new("/f")));
        m.set_config(
            r#"{"network":"10.244.0.0/16","backend":{"type":"alloc"}}"#,
            false,
        )
        .await
        .unwrap();
        m.acquire(&req("a")).await.unwrap();
        let config_key = m.keys().config();
        store.put(&config_key, b"{not json".to_vec()).await.unwrap();
        let f = Arc::new(Fanout::new());
        // One listing: refused, nothing synced, nothing cached.
        assert!(f.sync_once(&m).await.is_err());
        assert!(!f.is_synced());
        assert!(f.cache.read().unwrap().is_empty());
        // Fixed: the lease is served.
        store
            .put(
                &config_key,
                br#"{"network":"10.244.0.0/16","backend":{"type":"alloc"}}"#.to_vec(),
            )
            .await
            .unwrap();
        tokio::spawn(f.clone().run(m.clone()));
        while f.cache.read().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(f.is_synced());
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

    /// Streams that start at the same revision share one encoded snapshot (the same
    /// bytes, not a copy each); a change makes the next stream get a new one.
    #[tokio::test]
    async fn streams_at_one_revision_share_one_encoded_snapshot() {
        let (f, m) = setup().await;
        m.acquire(&req("a")).await.unwrap();
        let (_, now) = m.store().list("/f/").await.unwrap();
        m.view_reaches(now).await;
        let mut a = Box::pin(f.subscribe_frames(0));
        let mut b = Box::pin(f.subscribe_frames(0));
        let (fa, fb) = (a.next().await.unwrap(), b.next().await.unwrap());
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "one snapshot for both");
        let Some(Kind::Snapshot(snap)) = frames::decode(&fa).unwrap().kind else {
            panic!("a snapshot first")
        };
        assert_eq!(snap.leases.len(), 1);
        m.acquire(&req("b")).await.unwrap();
        let (_, now) = m.store().list("/f/").await.unwrap();
        m.view_reaches(now).await;
        let mut c = Box::pin(f.subscribe_frames(0));
        let fc = c.next().await.unwrap();
        assert_ne!(fa.as_ptr(), fc.as_ptr());
        let Some(Kind::Snapshot(snap)) = frames::decode(&fc).unwrap().kind else {
            panic!("a snapshot first")
        };
        assert_eq!(snap.leases.len(), 2);
        // The event both earlier streams get is one frame too.
        let (ea, eb) = (a.next().await.unwrap(), b.next().await.unwrap());
        assert_eq!(ea.as_ptr(), eb.as_ptr());
    }

    /// Watch responses that arrive together are applied as one batch (split where a key
    /// changes again); each event still carries the revision of the write to its key, in
    /// order, so a client resuming after any of those revisions is replayed exactly what
    /// followed it.
    #[tokio::test]
    async fn a_coalesced_batch_keeps_each_change_at_its_own_revision() {
        let (f, m) = setup().await;
        let template = m.acquire(&req("seed")).await.unwrap().lease;
        let (_, now) = m.store().list("/f/").await.unwrap();
        m.view_reaches(now).await;
        let base = f.revision();
        let put = |subnet: &str, node: &str, rev: i64| {
            let mut l = template.clone();
            l.subnet = subnet.parse().unwrap();
            l.record.node = node.into();
            crate::store::StoreEvent::Put(crate::store::KeyValue {
                key: m.keys().lease(l.subnet),
                value: l.record.encode(),
                create_revision: rev,
                mod_revision: rev,
                lease: 0,
            })
        };
        let batches = vec![
            WatchBatch {
                events: vec![
                    put("10.244.50.0/24", "x", base + 1),
                    put("10.244.53.0/24", "gone", base + 1),
                ],
                revision: base + 1,
            },
            WatchBatch {
                events: vec![
                    put("10.244.51.0/24", "y", base + 2),
                    put("10.244.52.0/24", "z", base + 2),
                ],
                revision: base + 2,
            },
            WatchBatch {
                events: vec![
                    crate::store::StoreEvent::Delete {
                        key: m.keys().lease(template.subnet),
                        revision: base + 3,
                    },
                    // Put earlier in the batch: the batch is split here, so this lease
                    // is streamed as added, then removed.
                    crate::store::StoreEvent::Delete {
                        key: m.keys().lease("10.244.53.0/24".parse().unwrap()),
                        revision: base + 3,
                    },
                ],
                revision: base + 4,
            },
        ];
        let mut s = Box::pin(f.subscribe(f.revision()));
        assert_eq!(f.apply(&m, &batches), base + 4);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let Kind::Event(e) = next(&mut s).await else {
                panic!("events")
            };
            seen.push((e.revision - base, e.r#type, e.lease.unwrap().node));
        }
        let revisions: Vec<i64> = seen.iter().map(|e| e.0).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] <= w[1]),
            "in order: {seen:?}"
        );
        let (added, removed) = (EventType::Added as i32, EventType::Removed as i32);
        let mut sorted = seen.clone();
        sorted.sort();
        let mut expected = vec![
            (1, added, "gone".to_string()),
            (1, added, "x".to_string()),
            (2, added, "y".to_string()),
            (2, added, "z".to_string()),
            (3, removed, "gone".to_string()),
            (3, removed, "seed".to_string()),
        ];
        expected.sort();
        assert_eq!(sorted, expected);
        assert_eq!(f.cache.read().unwrap().len(), 3, "x, y and z");
        assert_eq!(f.revision(), base + 4);
        // Resuming after revision 2 replays only the removal.
        let mut r = Box::pin(f.subscribe(base + 2));
        let Kind::Event(e) = next(&mut r).await else {
            panic!("a replayed event")
        };
        assert_eq!((e.revision - base, e.r#type), (3, removed));
    }

    /// Shutting down ends every stream, open or opened later.
    #[tokio::test]
    async fn close_ends_every_stream() {
        let (f, _m) = setup().await;
        let mut open = Box::pin(f.subscribe(0));
        assert!(matches!(next(&mut open).await, Kind::Snapshot(_)));
        f.close();
        let end = tokio::time::timeout(Duration::from_secs(5), open.next()).await;
        assert!(matches!(end, Ok(None)), "the open stream ended");
        let mut later = Box::pin(f.subscribe(0));
        let end = tokio::time::timeout(Duration::from_secs(5), later.next()).await;
        assert!(
            matches!(end, Ok(None)),
            "a stream opened after close ends at once"
        );
        assert_eq!(f.clients(), 0);
    }
}
