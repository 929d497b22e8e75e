//! Lease management on top of a [`Store`]: acquire, renew, release, reserve, revoke, and
//! config changes.
//!
//! Correctness never depends on this process's memory: every decision is committed with a
//! compare-and-set that proves what it was based on, so any number of controllers can
//! serve one etcd at once. Two nodes can never hold one subnet because a lease key is only
//! ever *created* with "create if absent"; a lost race simply picks again.
//!
//! **Allocation** reads the controller's view of the keys ([`crate::view::ViewState`],
//! kept current by the watch fan-out) instead of listing every lease from etcd, which made
//! a burst of N acquires cost O(N²) etcd reads. The transaction proves the view right: the
//! new key is absent, the node's and the MAC's index keys and the config are at the
//! revisions the view showed (a lease handed back is compared with the key as seen). So an
//! acquire is a grant and one transaction. Acquires of this controller claim the subnet
//! they picked until the view shows it, so they never pick the same one. A transaction
//! that fails on a subnet another controller took picks again; any other failure, and
//! every case the view cannot settle (no synced view, a second lease to release, a lease
//! that no longer fits, a MAC to refuse, "exhausted"), is decided from a listing read from
//! etcd, as before. "Exhausted" is said only after such a listing, started after the
//! request came in, found no free subnet while no claim of this controller could still
//! fail. At most [`ACQUIRE_CONCURRENCY`] acquires run at once; one that waited
//! [`ACQUIRE_QUEUE_WAIT`] for its turn is answered [`ControlError::Busy`] (retry later).
//!
//! **Listing** shows each lease's expiry as this controller last learnt it (grant,
//! keepalive, or one lookup), so it costs two etcd requests, not one lookup per lease.
//!
//! **One lease per node, one VTEP MAC per cluster.** Next to each lease key
//! `<prefix>/leases/<subnet>` there are index keys `<prefix>/index/node/<node>` and
//! `<prefix>/index/mac/<mac>` whose value is the lease's subnet key (`10.244.7.0-24`). They
//! are written in the same etcd transaction as the lease key, attached to the same etcd lease
//! (none for a reservation), and deleted in the same transaction as the lease key, so they
//! expire with it. Every transaction that writes a lease compares the index keys it writes
//! with what it read (absent, or the revision it saw), so of any number of concurrent
//! acquires for one node exactly one creates a lease; the others lose the compare, re-list,
//! and are handed that same lease. A MAC that the served lease of another node publishes is
//! refused (`FAILED_PRECONDITION`, naming that node). The index keys are read *before* the
//! listing: an index key that names a lease key absent from the (later) listing is then
//! certainly stale, and overwriting it is guarded by its revision.
//!
//! What a key under the lease prefix means (canonical key, readable value, fits the config,
//! no clash with an older lease) is decided in [`crate::view`] only, for every decision
//! here and for the watch fan-out alike. Data written before the index keys existed may still
//! hold a clash; there the older lease wins, the other is ignored and reported, and a node's
//! first acquire writes its index keys.
//!
//! **A lease whose stored value is unreadable** is a removal for watchers and a holder of
//! nothing, but its key still takes its subnet out of allocation. Renewing it fails with
//! `NOT_FOUND`, saying why, and does not rewrite it: a renewal carries only the node and
//! the subnet, not what peers need (public IP, backend data), so it could only write a value
//! with made-up data that peers would route by. The agent answers `NOT_FOUND` by acquiring
//! at once with all its data, preferring the same subnet. Acquire finds the key through the
//! node's index key (same etcd lease as the key, so it was written with it) and rewrites
//! the value in place: the owner keeps its subnet and its containers their addresses.
//! Without an index key (a value written before index keys, or by hand) nothing proves whose
//! the key is, so nobody gets it back: the owner is given another subnet, and the unreadable
//! key expires with its etcd lease, which nobody renews any more.
//!
//! Differences from Flannel, on purpose:
//! - Renewal is an etcd keepalive of the lease the key already has; Flannel grants a new
//!   etcd lease and rewrites the key on every renewal, which wakes every watcher.
//! - The value is only rewritten when what peers need changed (public IP, backend data), so
//!   an agent restart with an unchanged world is silent for everyone else. `renewed_at`
//!   therefore records the last write of the value; liveness is the etcd lease's TTL.
//! - Reservations are keys without an etcd lease; they survive forever and are honoured for
//!   the node they name (Flannel's are broken on etcd v3, its issue #1329).
//! - A granted etcd lease that ends up unused (lost race, exhausted range) is revoked, so no
//!   orphaned etcd lease is left behind. An etcd lease is revoked only after the
//!   compare-and-delete of its key succeeded: when the delete loses (the key changed), the
//!   etcd lease may be the live lease of whoever changed it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use ipnet::{IpNet, Ipv6Net};
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{
    now_millis, validate_backend_data, validate_node_name, validate_public_ip, validate_public_ipv6, BackendData, Lease,
    LeaseError, LeaseRecord,
};
use overlay_core::subnet::{parse_subnet_key, subnet_key};
use overlay_core::{BackendType, MacAddr};
use tracing::{info, warn};

use crate::error::ControlError;
use crate::store::{Condition, KeyValue, LeaseId, Store, StoreError, TxnWrite, Written};
use crate::view::{interpret, read_key, Entry, Ignored, Interpretation, LeaseView, ViewState};
use tokio::sync::{Notify, Semaphore};

/// How often an allocation re-lists and retries after losing a race.
const MAX_ATTEMPTS: u32 = 16;
/// How often an allocation waits for the acquires that hold the last free subnets.
const MAX_WAITS: u32 = 64;

mod acquire;
mod keys;
mod lifecycle;
#[cfg(test)]
mod tests;
mod txn;

use acquire::*;
pub use acquire::{AcquireStats, ACQUIRE_CONCURRENCY, ACQUIRE_QUEUE_WAIT};
pub use keys::Keys;

use txn::*;

/// What an agent asks for.
#[derive(Debug, Clone, Default)]
pub struct AcquireRequest {
    pub node: String,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendType,
    /// What the host publishes: VTEP MAC, public interface, underlay prefixes.
    pub data: BackendData,
    pub preferred: Option<IpNet>,
    /// Dual stack: the IPv6 subnet the node held before.
    pub preferred6: Option<Ipv6Net>,
}

/// What an operator reserves (`overlayctl lease reserve`).
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The key subnet: IPv4, or IPv6 in an IPv6-only cluster.
    pub subnet: IpNet,
    /// Dual stack: the IPv6 subnet reserved with it (required there, refused elsewhere).
    pub subnet6: Option<Ipv6Net>,
    pub node: String,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

impl Reservation {
    /// A reservation of an IPv4 (or IPv6-only) key subnet for a host with a public IPv4
    /// address, the whole reservation of a single-stack IPv4 cluster.
    pub fn v4(subnet: impl Into<IpNet>, node: &str, public_ip: Ipv4Addr) -> Reservation {
        Reservation {
            subnet: subnet.into(),
            subnet6: None,
            node: node.to_string(),
            public_ip: Some(public_ip),
            public_ipv6: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Acquired {
    pub lease: Lease,
    pub config: NetworkConfig,
    /// `None` for a reservation (never expires).
    pub ttl: Option<Duration>,
}

/// A lease as listed, with its expiry when it has one.
#[derive(Debug, Clone)]
pub struct ListedLease {
    pub lease: Lease,
    pub expires_at: Option<SystemTime>,
}

/// Every key under the lease prefix: the leases served, and the keys ignored.
#[derive(Debug, Clone)]
pub struct LeaseListing {
    pub leases: Vec<ListedLease>,
    pub ignored: Vec<Ignored>,
    pub revision: i64,
}

pub struct LeaseManager {
    store: Arc<dyn Store>,
    keys: Keys,
    /// The config as last read, for metrics (never for decisions: those re-read it).
    last_config: std::sync::RwLock<Option<NetworkConfig>>,
    /// The keys as the watch fan-out follows them; allocation reads it (module notes).
    view: Arc<RwLock<ViewState>>,
    claims: Mutex<HashMap<IpNet, Claim>>,
    /// Woken whenever an in-flight claim ends.
    claim_ended: Notify,
    /// Turns for acquires, and how long one waits for its turn.
    gate: Semaphore,
    queue_wait: Duration,
    /// When a listing read from etcd (started at that instant) last found the range full.
    full_at: Mutex<Option<Instant>>,
    /// The expiry of each etcd lease as this controller last learnt it (grant, keepalive,
    /// lookup), so that a listing needs no lookup per lease.
    expiry: Mutex<HashMap<LeaseId, SystemTime>>,
    stats: AcquireStats,
    /// The revision the view is complete up to, for [`Self::view_reaches`].
    view_revision: tokio::sync::watch::Sender<i64>,
}

impl LeaseManager {
    pub fn new(store: Arc<dyn Store>, keys: Keys) -> Self {
        LeaseManager {
            view: Arc::new(RwLock::new(ViewState::new(keys.clone()))),
            store,
            keys,
            last_config: Default::default(),
            claims: Mutex::default(),
            claim_ended: Notify::new(),
            gate: Semaphore::new(ACQUIRE_CONCURRENCY),
            queue_wait: ACQUIRE_QUEUE_WAIT,
            full_at: Mutex::default(),
            expiry: Mutex::default(),
            stats: AcquireStats::default(),
            view_revision: tokio::sync::watch::channel(0).0,
        }
    }

    /// At most `concurrency` acquires are worked on at once; one that has waited
    /// `queue_wait` for its turn is answered [`ControlError::Busy`].
    pub fn with_acquire_limits(mut self, concurrency: usize, queue_wait: Duration) -> Self {
        self.gate = Semaphore::new(concurrency.max(1));
        self.queue_wait = queue_wait;
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The view of the keys that the watch fan-out ([`crate::fanout::Fanout::run`]) keeps
    /// current. Until one runs it is not synced, and every decision reads etcd.
    pub fn view(&self) -> &Arc<RwLock<ViewState>> {
        &self.view
    }

    /// The fan-out has applied everything up to `revision`: claims the view now shows
    /// are dropped.
    pub fn view_advanced(&self, revision: i64) {
        {
            let view = self.view.read().expect("view lock");
            let mut claims = self.claims.lock().expect("claims lock");
            if !claims.is_empty() {
                claims.retain(|s, c| keep_claim(*c, *s, revision, &view.view));
            }
        }
        self.view_revision.send_replace(revision);
    }

    /// Waits until the view is complete up to `revision` (a fan-out must be running).
    pub async fn view_reaches(&self, revision: i64) {
        let mut rx = self.view_revision.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    pub fn stats(&self) -> &AcquireStats {
        &self.stats
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub async fn config(&self) -> Result<NetworkConfig, ControlError> {
        let kv = self
            .store
            .get(&self.keys.config())
            .await?
            .ok_or(ControlError::NoConfig)?;
        let text = String::from_utf8_lossy(&kv.value);
        let config = NetworkConfig::from_json(&text).map_err(ControlError::BadStoredConfig)?;
        *self.last_config.write().expect("config lock") = Some(config.clone());
        Ok(config)
    }

    /// The config as last read (or written) by this controller.
    pub fn last_config(&self) -> Option<NetworkConfig> {
        self.last_config.read().expect("config lock").clone()
    }

    /// Every key under the lease prefix, read (not yet interpreted).
    async fn listing(&self) -> Result<Listing, ControlError> {
        let (kvs, _rev) = self.store.list(&self.keys.leases()).await?;
        let entries = kvs.iter().map(|kv| read_key(&self.keys, kv)).collect();
        // The store lists sorted by key, which `Listing::entry` relies on.
        Ok(Listing { entries })
    }

    async fn get_index(&self, key: &str) -> Result<Option<KeyValue>, ControlError> {
        Ok(self.store.get(key).await?)
    }
}
