//! An in-process [`Store`] with etcd's semantics, for unit tests of the logic above the
//! store (allocation, renewal, watch fan-out) without an etcd.
//!
//! Design notes:
//! - One mutex around the whole state and no await while holding it: every operation is a
//!   short critical section, which makes each write atomic and totally ordered exactly like
//!   etcd's revisions (one global counter starting at 1, +1 per write).
//! - Every event is kept in a history until [`Store::compact`] drops it, so watches can start
//!   in the past. As in etcd, a watch may start at the compact revision itself but not
//!   before it, and compacting an already compacted revision is a no-op.
//! - Watchers get unbounded channels: a slow reader never loses events and never blocks a
//!   writer (the price is memory, which is fine in tests). A watcher whose stream was dropped
//!   is removed at the next write or expiry tick, so nothing leaks.
//! - Leases expire lazily at the start of every call and from a ticker task
//!   ([`EXPIRY_TICK`]) so that watchers see the `Delete` of an expired lease's keys even when
//!   nobody calls the store. The ticker starts with the first `grant` (a tokio runtime is
//!   running then, and stores without leases need no task) and stops with the store.
//! - Revoking or expiring a lease deletes all its keys in one revision, like etcd's lessor;
//!   a lease without keys expires without a revision.
//! - `time_to_live` reports the exact remaining time, not etcd's whole seconds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Condition, KeyValue, LeaseId, LeaseInfo, Store, StoreError, StoreEvent, TxnWrite, WatchBatch,
    WatchStream, Written,
};

/// How often the background task expires leases.
pub const EXPIRY_TICK: Duration = Duration::from_millis(50);

/// An in-memory [`Store`]; see the module notes. Use as `Arc<dyn Store>` or directly.
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    expirer: Mutex<Option<JoinHandle<()>>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

type WatchSender = mpsc::UnboundedSender<Result<WatchBatch, StoreError>>;

struct Watcher {
    prefix: String,
    /// Events before this revision were replayed already (or predate the watch).
    from_revision: i64,
    tx: WatchSender,
}

struct State {
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    last_lease: LeaseId,
    /// Every event at or after `compact_revision`, in revision order.
    history: VecDeque<StoreEvent>,
    watchers: Vec<Watcher>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            state: Arc::new(Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                kvs: BTreeMap::new(),
                leases: HashMap::new(),
                last_lease: 0,
                history: VecDeque::new(),
                watchers: Vec::new(),
            })),
            expirer: Mutex::new(None),
        }
    }

    /// The state, with expired leases already revoked.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.state);
        state.expire_leases(Instant::now());
        state
    }

    /// Starts the expiry ticker once; it holds only a weak reference and ends with the store.
    fn start_expirer(&self) {
        let mut expirer = lock(&self.expirer);
        if expirer.is_some() {
            return;
        }
        let weak: Weak<Mutex<State>> = Arc::downgrade(&self.state);
        *expirer = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let mut state = lock(&state);
                state.expire_leases(Instant::now());
                state.watchers.retain(|w| !w.tx.is_closed());
            }
        }));
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.expirer).take() {
            task.abort();
        }
    }
}

/// Locks ignoring poison: a panicking test thread must not cascade into every other user.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    fn next_revision(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }

    /// Records the events of one revision and hands them to the matching watchers.
    fn commit(&mut self, events: Vec<StoreEvent>) {
        let revision = self.revision;
        self.watchers.retain(|w| {
            let mine: Vec<StoreEvent> = events
                .iter()
                .filter(|e| e.revision() >= w.from_revision && e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            mine.is_empty()
                || w.tx
                    .send(Ok(WatchBatch {
                        events: mine,
                        revision,
                    }))
                    .is_ok()
        });
        self.history.extend(events);
    }

    fn check_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(())
    }

    fn write(&mut self, key: &str, value: Vec<u8>, lease: LeaseId) -> i64 {
        let revision = self.next_revision();
        let create_revision = self.kvs.get(key).map_or(revision, |kv| kv.create_revision);
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        self.commit(vec![StoreEvent::Put(kv)]);
        revision
    }

    /// Deletes `keys` (all present) in one revision; `None` when there is nothing to delete.
    fn remove(&mut self, keys: Vec<String>) -> Option<i64> {
        if keys.is_empty() {
            return None;
        }
        let revision = self.next_revision();
        let events = keys
            .into_iter()
            .filter_map(|key| {
                self.kvs
                    .remove(&key)
                    .map(|_| StoreEvent::Delete { key, revision })
            })
            .collect();
        self.commit(events);
        Some(revision)
    }

    fn holds(&self, condition: &Condition) -> bool {
        match condition {
            Condition::CreateRevision(key, expected) => {
                self.kvs.get(key).map_or(0, |kv| kv.create_revision) == *expected
            }
            Condition::ModRevision(key, expected) => {
                self.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *expected
            }
        }
    }

    /// Applies `writes` at one revision (none when nothing changes); the revision after.
    fn apply(&mut self, writes: Vec<TxnWrite>) -> i64 {
        let changes = writes.iter().any(|w| match w {
            TxnWrite::Put { .. } => true,
            TxnWrite::Delete { key } => self.kvs.contains_key(key),
        });
        if !changes {
            return self.revision;
        }
        let revision = self.next_revision();
        let mut events = Vec::with_capacity(writes.len());
        for w in writes {
            match w {
                TxnWrite::Put { key, value, lease } => {
                    let create_revision =
                        self.kvs.get(&key).map_or(revision, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease,
                    };
                    self.kvs.insert(key, kv.clone());
                    events.push(StoreEvent::Put(kv));
                }
                TxnWrite::Delete { key } => {
                    if self.kvs.remove(&key).is_some() {
                        events.push(StoreEvent::Delete { key, revision });
                    }
                }
            }
        }
        self.commit(events);
        revision
    }

    fn drop_lease(&mut self, lease: LeaseId) {
        if self.leases.remove(&lease).is_none() {
            return;
        }
        let keys = self
            .kvs
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.clone())
            .collect();
        self.remove(keys);
    }

    fn expire_leases(&mut self, now: Instant) {
        let mut expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable();
        for lease in expired {
            self.drop_lease(lease);
        }
    }
}

/// Whole seconds, rounded up, at least 1 (etcd's lease TTL unit).
fn whole_seconds(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let state = self.state();
        let kvs = state
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, state.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        Ok(self.state().write(key, value, 0))
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        let mut state = self.state();
        if state.kvs.contains_key(key) {
            return Ok(Written::Conflict);
        }
        state.check_lease(lease)?;
        Ok(Written::Yes(state.write(key, value, lease)))
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: i64,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        let mut state = self.state();
        let current = state.kvs.get(key).map_or(0, |kv| kv.mod_revision);
        if current != expected_mod_revision {
            return Ok(Written::Conflict);
        }
        state.check_lease(lease)?;
        Ok(Written::Yes(state.write(key, value, lease)))
    }

    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
    ) -> Result<Written, StoreError> {
        let mut state = self.state();
        let Some(kv) = state.kvs.get(key) else {
            return Ok(Written::Conflict);
        };
        if expected_mod_revision.is_some_and(|expected| expected != kv.mod_revision) {
            return Ok(Written::Conflict);
        }
        let revision = state.remove(vec![key.to_owned()]).expect("the key exists");
        Ok(Written::Yes(revision))
    }

    async fn txn(
        &self,
        conditions: Vec<Condition>,
        writes: Vec<TxnWrite>,
    ) -> Result<Written, StoreError> {
        let mut state = self.state();
        let mut keys = std::collections::HashSet::new();
        for w in &writes {
            let key = match w {
                TxnWrite::Put { key, .. } | TxnWrite::Delete { key } => key,
            };
            if !keys.insert(key) {
                return Err(StoreError::Other(format!(
                    "duplicate key {key} given in one transaction"
                )));
            }
        }
        if !conditions.iter().all(|c| state.holds(c)) {
            return Ok(Written::Conflict);
        }
        for w in &writes {
            if let TxnWrite::Put { lease, .. } = w {
                state.check_lease(*lease)?;
            }
        }
        Ok(Written::Yes(state.apply(writes)))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.start_expirer();
        let mut state = self.state();
        state.last_lease += 1;
        let id = state.last_lease;
        let ttl = whole_seconds(ttl);
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut state = self.state();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        let now = Instant::now();
        Ok(self
            .state()
            .leases
            .get(&lease)
            .map(|l| l.deadline.saturating_duration_since(now)))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.state().drop_lease(lease);
        Ok(())
    }

    async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        Ok(self.state().leases.keys().copied().collect())
    }

    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, StoreError> {
        let now = Instant::now();
        let state = self.state();
        let Some(l) = state.leases.get(&lease) else {
            return Ok(None);
        };
        // `kvs` is a BTreeMap, so the keys come out sorted.
        let keys = state
            .kvs
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.clone())
            .collect();
        Ok(Some(LeaseInfo {
            id: lease,
            granted_ttl: l.ttl,
            remaining: l.deadline.saturating_duration_since(now),
            keys,
        }))
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, StoreError> {
        let mut state = self.state();
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = UnboundedReceiverStream::new(rx).boxed();
        if start_revision > 0 && start_revision < state.compact_revision {
            let compacted = StoreError::Compacted {
                requested: start_revision,
                compact_revision: state.compact_revision,
            };
            // The receiver is alive (`stream`), so this cannot fail; dropping `tx` ends the stream.
            let _ = tx.send(Err(compacted));
            return Ok(stream);
        }
        if start_revision > 0 {
            let replay: Vec<StoreEvent> = state
                .history
                .iter()
                .filter(|e| e.revision() >= start_revision && e.key().starts_with(prefix))
                .cloned()
                .collect();
            if !replay.is_empty() {
                let _ = tx.send(Ok(WatchBatch {
                    events: replay,
                    revision: state.revision,
                }));
            }
        }
        let from_revision = start_revision.max(state.revision + 1);
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            from_revision,
            tx,
        });
        Ok(stream)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut state = self.state();
        if revision > state.revision {
            return Err(StoreError::Other(format!(
                "cannot compact revision {revision}: it is in the future (current revision {})",
                state.revision
            )));
        }
        if revision <= state.compact_revision {
            return Ok(());
        }
        state.compact_revision = revision;
        while state
            .history
            .front()
            .is_some_and(|e| e.revision() < revision)
        {
            state.history.pop_front();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(
            whole_seconds(Duration::from_millis(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole_seconds(Duration::from_millis(1500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            whole_seconds(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }

    #[tokio::test]
    async fn dropped_watch_streams_are_forgotten() {
        let store = MemoryStore::new();
        let stream = store.watch("/a/", 0).await.unwrap();
        drop(stream);
        store.put("/a/x", b"1".to_vec()).await.unwrap();
        assert!(lock(&store.state).watchers.is_empty());
    }

    #[tokio::test]
    async fn the_expiry_task_ends_with_the_store() {
        let store = MemoryStore::new();
        store.grant(Duration::from_secs(1)).await.unwrap();
        let weak = Arc::downgrade(&store.state);
        drop(store);
        assert!(
            weak.upgrade().is_none(),
            "the expiry task keeps the state alive"
        );
    }
}
