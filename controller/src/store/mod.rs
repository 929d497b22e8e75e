//! The key-value store behind the controller.
//!
//! Only the operations lease management needs, in etcd's terms (revisions, leases with a
//! TTL, compare-and-set), so that the etcd implementation is a thin mapping and the memory
//! implementation can be checked against the same conformance suite
//! ([`conformance`]). Everything above this trait is store-agnostic.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

pub mod etcd;
pub mod memory;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use etcd::{EtcdOptions, EtcdStore};
pub use memory::MemoryStore;

/// An etcd lease ID (0 means "no lease").
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    Put(KeyValue),
    /// A deleted key, with the revision of the delete.
    Delete {
        key: String,
        revision: i64,
    },
}

impl StoreEvent {
    pub fn revision(&self) -> i64 {
        match self {
            StoreEvent::Put(kv) => kv.mod_revision,
            StoreEvent::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            StoreEvent::Put(kv) => &kv.key,
            StoreEvent::Delete { key, .. } => key,
        }
    }
}

/// What the store knows about one lease (see [`Store::lease_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    /// The TTL the lease was granted with, which every keepalive refreshes it to.
    pub granted_ttl: Duration,
    /// Time left before it expires (whole seconds, rounded down, on etcd).
    pub remaining: Duration,
    /// The keys attached to it, sorted.
    pub keys: Vec<String>,
}

impl LeaseInfo {
    /// Time since the lease was granted or last kept alive. On etcd, where both TTLs are
    /// whole seconds, this overstates the true time by less than a second.
    pub fn idle(&self) -> Duration {
        self.granted_ttl.saturating_sub(self.remaining)
    }
}

/// One batch of events from a watch (all events of one or more revisions, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<StoreEvent>,
    /// The store's revision when the batch was sent (>= every event's revision).
    pub revision: i64,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested start revision has been compacted away: relist, then watch again.
    #[error("revision {requested} has been compacted (compact revision {compact_revision})")]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    /// The etcd lease no longer exists (expired or revoked).
    #[error("etcd lease {0:x} not found")]
    LeaseNotFound(LeaseId),
    /// etcd refused our credentials (wrong user or password, no credentials while etcd
    /// requires them, or a user without permission): retrying will not help.
    #[error("etcd denied access: {0}")]
    AccessDenied(String),
    /// The connection options are unusable (a missing or unreadable file, flags that go
    /// together given alone); the message names the flag.
    #[error("invalid etcd options: {0}")]
    InvalidOptions(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Other(String),
}

/// Outcome of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written at this revision.
    Yes(i64),
    /// The comparison failed; nothing was written.
    Conflict,
}

impl Written {
    pub fn ok(self) -> bool {
        matches!(self, Written::Yes(_))
    }
}

/// One condition of a [`Store::txn`] (etcd's `Compare`, restricted to what we use). A
/// missing key has create and mod revision 0, so `CreateRevision(key, 0)` means "absent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key's create revision equals this.
    CreateRevision(String, i64),
    /// The key's mod revision equals this.
    ModRevision(String, i64),
}

/// One write of a [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnWrite {
    /// Writes `key`, attached to `lease` (0: none, detaching it from any lease).
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    /// Deletes `key` if it exists (a missing key is not an error).
    Delete { key: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key under `prefix`, sorted by key, and the store revision of the listing.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError>;

    /// Unconditional put without a lease.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError>;

    /// Creates `key` only if it does not exist.
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Written, StoreError>;

    /// Writes `key` only if its mod revision is still `expected_mod_revision`
    /// (0: only if absent). `lease` 0 detaches the key from any lease.
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: i64,
        lease: LeaseId,
    ) -> Result<Written, StoreError>;

    /// Deletes `key`, if `expected_mod_revision` is given only when it still matches.
    /// `Conflict` also means "did not exist".
    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
    ) -> Result<Written, StoreError>;

    /// Applies every write of `writes` at one revision if every condition holds, nothing
    /// otherwise (`Conflict`). Watchers see all the events of the transaction at that
    /// revision. A transaction that changes nothing (only deletes of missing keys) does not
    /// create a revision and answers the current one. A key may appear in at most one write.
    /// A put attached to a lease that does not exist fails with `LeaseNotFound` and writes
    /// nothing.
    async fn txn(
        &self,
        conditions: Vec<Condition>,
        writes: Vec<TxnWrite>,
    ) -> Result<Written, StoreError>;

    /// Grants a lease of `ttl` (rounded up to whole seconds).
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Refreshes a lease to its full TTL once; returns the TTL granted.
    /// `LeaseNotFound` when it expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Remaining time of a lease, `None` when it no longer exists.
    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError>;

    /// Revokes a lease and deletes every key attached to it. Revoking a missing lease is ok.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Every lease that exists, in no particular order.
    async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError>;

    /// A lease with its TTLs and attached keys, `None` when it no longer exists.
    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, StoreError>;

    /// Watches every key under `prefix` from `start_revision` (inclusive; 0 = from now).
    /// A compacted start revision yields a `Compacted` error as the first item.
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, StoreError>;

    /// Cheap round trip used by readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Compacts history up to `revision` (for tests and maintenance).
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;
}
