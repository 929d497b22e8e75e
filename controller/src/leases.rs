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
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use ipnet::Ipv4Net;
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{
    now_millis, validate_backend_data, validate_node_name, validate_public_ip, BackendData, Lease,
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

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let prefix = prefix.trim_end_matches('/');
        Keys {
            prefix: if prefix.starts_with('/') {
                prefix.to_string()
            } else {
                format!("/{prefix}")
            },
        }
    }

    /// Every key of the cluster is under this.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn leases(&self) -> String {
        format!("{}/leases/", self.prefix)
    }

    /// Every index key is under this.
    pub fn index_prefix(&self) -> String {
        format!("{}/index/", self.prefix)
    }

    pub fn lease(&self, subnet: Ipv4Net) -> String {
        format!("{}/leases/{}", self.prefix, subnet_key(subnet))
    }

    /// The index key naming the lease of `node`.
    pub fn node_index(&self, node: &str) -> String {
        format!("{}/index/node/{node}", self.prefix)
    }

    /// The index key naming the lease that publishes VTEP MAC `mac`.
    pub fn mac_index(&self, mac: MacAddr) -> String {
        format!("{}/index/mac/{mac}", self.prefix)
    }

    /// The subnet of a lease key, if it is one: canonical, `a.b.c.d-len` exactly as the
    /// subnet prints.
    pub fn subnet_of(&self, key: &str) -> Option<Ipv4Net> {
        key.strip_prefix(&self.leases()).and_then(parse_subnet_key)
    }

    /// The lease key an index key's value names.
    fn indexed_lease(&self, index: &KeyValue) -> String {
        format!("{}{}", self.leases(), String::from_utf8_lossy(&index.value))
    }
}

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub node: String,
    pub public_ip: Ipv4Addr,
    pub backend: BackendType,
    /// What the host publishes: VTEP MAC, public interface, underlay prefix.
    pub data: BackendData,
    pub preferred: Option<Ipv4Net>,
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

/// The lease keys as listed, each read once (see [`crate::view`]).
struct Listing {
    entries: Vec<Entry>,
}

impl Listing {
    fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.key.as_str().cmp(key))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Subnets whose key exists, readable or not: never handed out again while it does.
    fn taken(&self) -> HashSet<Ipv4Net> {
        self.entries.iter().filter_map(|e| e.subnet).collect()
    }

    /// The readable leases naming `node`.
    fn of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.lease().is_some_and(|l| l.record.node == node))
    }

    fn interpret(&self, config: &NetworkConfig) -> Interpretation<'_> {
        interpret(Some(config), &self.entries)
    }
}

/// Whether a lease that is a reservation (by its value, or for an unreadable value by
/// having no etcd lease).
fn is_reserved(e: &Entry) -> bool {
    e.lease().map_or(e.lease_id == 0, |l| l.record.reserved)
}

/// A transaction being put together: at most one condition and one write per key.
#[derive(Default)]
struct Txn {
    conditions: BTreeMap<String, Condition>,
    writes: BTreeMap<String, TxnWrite>,
}

impl Txn {
    /// The key must still be as read: its mod revision, or absent.
    fn unchanged(&mut self, key: &str, read: Option<&KeyValue>) {
        self.at_revision(key, read.map_or(0, |kv| kv.mod_revision));
    }

    fn at_revision(&mut self, key: &str, mod_revision: i64) {
        self.conditions
            .entry(key.to_string())
            .or_insert_with(|| Condition::ModRevision(key.to_string(), mod_revision));
    }

    fn absent(&mut self, key: &str) {
        self.conditions
            .entry(key.to_string())
            .or_insert_with(|| Condition::CreateRevision(key.to_string(), 0));
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: LeaseId) {
        self.writes.insert(
            key.to_string(),
            TxnWrite::Put {
                key: key.to_string(),
                value,
                lease,
            },
        );
    }

    fn delete(&mut self, key: &str) {
        self.writes.insert(
            key.to_string(),
            TxnWrite::Delete {
                key: key.to_string(),
            },
        );
    }

    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    async fn commit(self, store: &dyn Store) -> Result<Written, StoreError> {
        store
            .txn(
                self.conditions.into_values().collect(),
                self.writes.into_values().collect(),
            )
            .await
    }
}

/// Whether an index key names `subnet` and lives as long as the lease (`lease`).
fn names(index: Option<&KeyValue>, subnet: Ipv4Net, lease: LeaseId) -> bool {
    index.is_some_and(|kv| kv.value == subnet_key(subnet).as_bytes() && kv.lease == lease)
}

/// Acquires worked on at once by one controller ([`LeaseManager::with_acquire_limits`]).
pub const ACQUIRE_CONCURRENCY: usize = 64;
/// How long an acquire waits for its turn before it is answered "busy, retry".
pub const ACQUIRE_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How long a subnet seen taken by another controller's write stays out of this
/// controller's picks while its view has not shown it yet.
const FOREIGN_CLAIM: Duration = Duration::from_secs(10);

/// A subnet this controller must not pick although its view shows it free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// An acquire of this controller is creating it.
    InFlight,
    /// Created at this revision, which the view has not reached yet.
    Created(i64),
    /// Another controller created it (a create lost on it), as of this instant.
    Foreign(Instant),
}

/// What the view says an acquire should do (see "Allocation" in the module notes).
enum Plan {
    /// The view cannot decide (not synced, a case only a listing settles, or a refusal
    /// that must be confirmed): read etcd.
    Slow,
    /// Give the node its lease back, proven by a transaction on the key as seen.
    Refresh {
        keep: Box<Entry>,
        node_index: Option<KeyValue>,
        mac_index: Option<KeyValue>,
    },
    /// Create `subnet`, claimed for this acquire.
    Create {
        subnet: Ipv4Net,
        node_index: Option<KeyValue>,
        mac_index: Option<KeyValue>,
        config_revision: i64,
    },
    /// No free subnet, but acquires of this controller are still creating some (one that
    /// fails frees its subnet): wait for one to finish.
    Wait,
    /// No free subnet and nothing in flight.
    Full,
}

/// The outcome of one attempt from the view.
enum Fast {
    Done(Acquired, LeaseId),
    /// Lost the subnet to another controller: pick again.
    Again,
    /// Read etcd.
    Slow,
}

/// Counts of how acquires were decided, for tests and the bench.
#[derive(Debug, Default)]
pub struct AcquireStats {
    /// Decided from the view, proven by one transaction.
    pub from_view: AtomicU64,
    /// Decided from a listing of every lease read from etcd.
    pub from_listing: AtomicU64,
    /// Creates lost to another controller's write of the same subnet.
    pub lost_races: AtomicU64,
    /// Answered "busy, retry" because the queue was too long.
    pub busy: AtomicU64,
}

pub struct LeaseManager {
    store: Arc<dyn Store>,
    keys: Keys,
    /// The config as last read, for metrics (never for decisions: those re-read it).
    last_config: std::sync::RwLock<Option<NetworkConfig>>,
    /// The keys as the watch fan-out follows them; allocation reads it (module notes).
    view: Arc<RwLock<ViewState>>,
    claims: Mutex<HashMap<Ipv4Net, Claim>>,
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

    /// Gives `req.node` a lease: its existing one (refreshed), its reservation, its
    /// preferred subnet if free, or a random free subnet.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Acquired, ControlError> {
        validate_node_name(&req.node)?;
        validate_public_ip(req.public_ip)?;
        validate_backend_data(&req.data, req.public_ip)?;
        let started = Instant::now();
        let _turn = self.turn().await?;
        let config = match self.view_config() {
            Some(config) => config,
            None => self.config().await?,
        };
        if config.network.contains(&req.public_ip) {
            return Err(LeaseError::PublicIpInOverlay {
                ip: req.public_ip,
                network: config.network,
            }
            .into());
        }
        if req.backend != config.backend.kind {
            return Err(ControlError::InvalidArgument(format!(
                "backend {} does not match the cluster's backend {}",
                req.backend, config.backend.kind
            )));
        }
        let mut granted: Option<LeaseId> = None;
        let result = self
            .acquire_attempts(req, config, started, &mut granted)
            .await;
        let used = match &result {
            Ok((_, id)) => Some(*id),
            Err(_) => None,
        };
        if let Some(id) = granted.filter(|g| Some(*g) != used) {
            if let Err(e) = self.store.revoke(id).await {
                warn!(lease = id, error = %e, "could not revoke an unused etcd lease; it will expire");
            }
        }
        result.map(|(acquired, _)| acquired)
    }

    /// The node's lease to keep: of its readable leases the one that wins in
    /// [`crate::view`] (its reservation, else its oldest); without one, an unreadable key
    /// its index key proves to be its own (see the module notes).
    fn own_lease<'a>(
        &self,
        listing: &'a Listing,
        node: &'a str,
        index: Option<&KeyValue>,
    ) -> Option<&'a Entry> {
        let best = listing
            .of_node(node)
            .min_by_key(|e| (!is_reserved(e), e.create_revision));
        best.or_else(|| {
            let index = index?;
            let e = listing.entry(&self.keys.indexed_lease(index))?;
            (e.lease().is_none() && e.subnet.is_some() && e.lease_id == index.lease).then_some(e)
        })
    }

    /// Refuses a VTEP MAC that a served lease other than `mine` publishes.
    fn check_mac(
        &self,
        served: &Interpretation<'_>,
        mac: Option<MacAddr>,
        mine: Option<&str>,
    ) -> Result<(), ControlError> {
        let Some(mac) = mac else { return Ok(()) };
        let holder = served
            .leases
            .values()
            .find(|e| e.lease().and_then(|l| l.record.backend_data.vtep_mac) == Some(mac));
        match holder {
            Some(e) if Some(e.key.as_str()) != mine => {
                let lease = e.lease().expect("served leases are readable");
                Err(ControlError::FailedPrecondition(format!(
                    "VTEP MAC {mac} is already published by node {:?} for {}: every host needs its own VTEP MAC",
                    lease.record.node, lease.subnet
                )))
            }
            _ => Ok(()),
        }
    }

    /// Waits for a turn among [`ACQUIRE_CONCURRENCY`] acquires; "busy" after too long.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ControlError> {
        match tokio::time::timeout(self.queue_wait, self.gate.acquire()).await {
            Ok(permit) => Ok(permit.expect("the gate is never closed")),
            Err(_) => {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                Err(ControlError::Busy {
                    what: "acquires",
                    retry_after: self.queue_wait,
                })
            }
        }
    }

    /// The config as the synced view holds it.
    fn view_config(&self) -> Option<NetworkConfig> {
        let state = self.view.read().expect("view lock");
        let config = state.view.config().filter(|_| state.synced)?.clone();
        *self.last_config.write().expect("config lock") = Some(config.clone());
        Some(config)
    }

    /// Records when etcd lease `id` expires, as just learnt (`ttl` from now).
    fn note_expiry(&self, id: LeaseId, ttl: Duration) {
        if id != 0 {
            let at = SystemTime::now() + ttl;
            self.expiry.lock().expect("expiry lock").insert(id, at);
        }
    }

    /// Decides from the view first, then (when the view cannot) from a listing.
    async fn acquire_attempts(
        &self,
        req: &AcquireRequest,
        config: NetworkConfig,
        started: Instant,
        granted: &mut Option<LeaseId>,
    ) -> Result<(Acquired, LeaseId), ControlError> {
        let (mut lost, mut waits) = (0, 0);
        while lost < MAX_ATTEMPTS && waits < MAX_WAITS {
            // Registered before the view is read, so an ending claim is never missed.
            let ended = self.claim_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            match self.plan(req, &config) {
                Plan::Slow => break,
                Plan::Wait => {
                    // Bounded: a claim always ends, but never wait on a stuck store.
                    waits += 1;
                    let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
                }
                Plan::Full => {
                    // A listing that started after this request found the range full.
                    let full_at = *self.full_at.lock().expect("full lock");
                    if full_at.is_some_and(|t| t >= started) {
                        return Err(exhausted(&config));
                    }
                    break;
                }
                Plan::Refresh {
                    keep,
                    node_index,
                    mac_index,
                } => {
                    let indexes = (node_index.as_ref(), mac_index.as_ref());
                    match self.refresh(&keep, req, &config, indexes, true).await? {
                        Some(acquired) => {
                            self.stats.from_view.fetch_add(1, Ordering::Relaxed);
                            return Ok((acquired, keep.lease_id));
                        }
                        None => break,
                    }
                }
                Plan::Create {
                    subnet,
                    node_index,
                    mac_index,
                    config_revision,
                } => {
                    let claim = ClaimGuard {
                        manager: self,
                        subnet,
                        done: false,
                    };
                    let plan = (claim, node_index, mac_index, config_revision);
                    match self.create_from_view(req, &config, plan, granted).await {
                        Ok(Fast::Done(acquired, id)) => {
                            self.stats.from_view.fetch_add(1, Ordering::Relaxed);
                            return Ok((acquired, id));
                        }
                        Ok(Fast::Again) => lost += 1,
                        Ok(Fast::Slow) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.stats.from_listing.fetch_add(1, Ordering::Relaxed);
        // The view could not decide: read etcd, with a fresh config.
        let fresh = self.config().await?;
        if fresh.lease_ttl != config.lease_ttl {
            // Granted for the config the view had: not the TTL leases get now.
            if let Some(id) = granted.take() {
                if let Err(e) = self.store.revoke(id).await {
                    warn!(lease = id, error = %e, "could not revoke an unused etcd lease; it will expire");
                }
            }
        }
        self.listing_attempts(req, &fresh, granted).await
    }

    /// What the view says `req` should get (see [`Plan`]). Never waits: it holds the
    /// view's read lock.
    fn plan(&self, req: &AcquireRequest, config: &NetworkConfig) -> Plan {
        let state = self.view.read().expect("view lock");
        let view = &state.view;
        if !state.synced || view.config() != Some(config) {
            return Plan::Slow;
        }
        let node_index = view.index(&self.keys.node_index(&req.node)).cloned();
        let mac = req.data.vtep_mac;
        let mac_index = mac.and_then(|m| view.index(&self.keys.mac_index(m)).cloned());
        let mac_holder = mac.and_then(|m| state.served_macs.get(&m));
        let mine: Vec<&Entry> = view.of_node(&req.node).collect();
        let keep = mine
            .iter()
            .copied()
            .min_by_key(|e| (!is_reserved(e), e.create_revision))
            .or_else(|| {
                // An unreadable value that the node's index key proves to be its own.
                let index = node_index.as_ref()?;
                let e = view.entry(&self.keys.indexed_lease(index))?;
                (e.lease().is_none() && e.subnet.is_some() && e.lease_id == index.lease)
                    .then_some(e)
            });
        if let Some(keep) = keep {
            let subnet = keep.subnet.expect("lease keys have a subnet");
            let others = mine.iter().any(|d| d.key != keep.key && !is_reserved(d));
            // A second lease to release, a lease that no longer fits, a MAC to refuse:
            // decided from a listing.
            if others
                || !config.keeps(subnet, is_reserved(keep))
                || mac_holder.is_some_and(|h| h.key != keep.key)
            {
                return Plan::Slow;
            }
            return Plan::Refresh {
                keep: Box::new(keep.clone()),
                node_index,
                mac_index,
            };
        }
        if mac_holder.is_some() {
            return Plan::Slow;
        }
        let range = config.range();
        let mut claims = self.claims.lock().expect("claims lock");
        let now = Instant::now();
        claims.retain(|s, c| keep_claim(*c, *s, state.revision, view) && !foreign_expired(*c, now));
        let taken = |s: Ipv4Net| view.is_taken(s) || claims.contains_key(&s);
        let preferred = req.preferred.filter(|p| range.contains(*p) && !taken(*p));
        let Some(subnet) = preferred.or_else(|| range.pick_free_by(taken, &mut rand::rng())) else {
            return if claims.values().any(|c| *c == Claim::InFlight) {
                Plan::Wait
            } else {
                Plan::Full
            };
        };
        claims.insert(subnet, Claim::InFlight);
        Plan::Create {
            subnet,
            node_index,
            mac_index,
            config_revision: view.config_mod_revision(),
        }
    }

    /// Ends the claim of an acquire on `subnet`: created at a revision, or given up.
    fn end_claim(&self, subnet: Ipv4Net, outcome: Option<Claim>) {
        {
            let mut claims = self.claims.lock().expect("claims lock");
            match outcome {
                Some(c) => claims.insert(subnet, c),
                None => claims.remove(&subnet),
            };
        }
        self.claim_ended.notify_waiters();
    }
}

/// An in-flight claim, given up when dropped without an outcome (the acquire failed, or
/// its caller went away mid-way).
struct ClaimGuard<'a> {
    manager: &'a LeaseManager,
    subnet: Ipv4Net,
    done: bool,
}

impl ClaimGuard<'_> {
    fn end(mut self, outcome: Option<Claim>) {
        self.done = true;
        self.manager.end_claim(self.subnet, outcome);
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.manager.end_claim(self.subnet, None);
        }
    }
}

impl LeaseManager {
    /// Creates the subnet the view picked, in one transaction that proves the view right:
    /// the key is absent, the node's and the MAC's index keys and the config are as the
    /// view shows them.
    async fn create_from_view(
        &self,
        req: &AcquireRequest,
        config: &NetworkConfig,
        (claim, node_index, mac_index, config_revision): (
            ClaimGuard<'_>,
            Option<KeyValue>,
            Option<KeyValue>,
            i64,
        ),
        granted: &mut Option<LeaseId>,
    ) -> Result<Fast, ControlError> {
        let subnet = claim.subnet;
        let lease_id = match *granted {
            Some(id) => id,
            None => {
                let id = self.store.grant(config.lease_ttl).await?;
                *granted = Some(id);
                id
            }
        };
        let now = now_millis();
        let record = LeaseRecord {
            node: req.node.clone(),
            public_ip: req.public_ip,
            backend: req.backend,
            backend_data: req.data.clone(),
            reserved: false,
            created_at: now,
            renewed_at: now,
        };
        let key = self.keys.lease(subnet);
        let node_index_key = self.keys.node_index(&req.node);
        let mut txn = Txn::default();
        txn.absent(&key);
        txn.put(&key, record.encode(), lease_id);
        txn.unchanged(&node_index_key, node_index.as_ref());
        txn.put(&node_index_key, subnet_key(subnet).into_bytes(), lease_id);
        if let Some(m) = req.data.vtep_mac {
            let k = self.keys.mac_index(m);
            txn.unchanged(&k, mac_index.as_ref());
            txn.put(&k, subnet_key(subnet).into_bytes(), lease_id);
        }
        txn.at_revision(&self.keys.config(), config_revision);
        let written = txn.commit(self.store.as_ref()).await;
        match written {
            Ok(Written::Yes(revision)) => {
                claim.end(Some(Claim::Created(revision)));
                self.note_expiry(lease_id, config.lease_ttl);
                info!(node = %req.node, %subnet, "leased a new subnet");
                Ok(Fast::Done(
                    Acquired {
                        lease: Lease { subnet, record },
                        config: config.clone(),
                        ttl: Some(config.lease_ttl),
                    },
                    lease_id,
                ))
            }
            Ok(Written::Conflict) => {
                // Who moved? If the subnet's key exists, another controller took it: pick
                // another. Otherwise the node, the MAC or the config changed: a listing
                // decides.
                if self.store.get(&key).await?.is_some() {
                    self.stats.lost_races.fetch_add(1, Ordering::Relaxed);
                    claim.end(Some(Claim::Foreign(Instant::now())));
                    Ok(Fast::Again)
                } else {
                    Ok(Fast::Slow)
                }
            }
            Err(StoreError::LeaseNotFound(_)) => {
                // Our fresh etcd lease vanished (e.g. etcd restored); grant another.
                *granted = None;
                Ok(Fast::Again)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Decides from a listing of every lease read from etcd, as many times as the store
    /// changes under it (at most [`MAX_ATTEMPTS`]).
    async fn listing_attempts(
        &self,
        req: &AcquireRequest,
        config: &NetworkConfig,
        granted: &mut Option<LeaseId>,
    ) -> Result<(Acquired, LeaseId), ControlError> {
        let range = config.range();
        let mac = req.data.vtep_mac;
        let node_index_key = self.keys.node_index(&req.node);
        let mac_index_key = mac.map(|m| self.keys.mac_index(m));
        for attempt in 1..=MAX_ATTEMPTS {
            // Index keys first, then the listing (see the module notes).
            let node_index = self.get_index(&node_index_key).await?;
            let mac_index = match &mac_index_key {
                Some(k) => self.get_index(k).await?,
                None => None,
            };
            let listed_at = Instant::now();
            let listing = self.listing().await?;
            let served = listing.interpret(config);
            if let Some(keep) = self.own_lease(&listing, &req.node, node_index.as_ref()) {
                let subnet = keep.subnet.expect("lease keys have a subnet");
                if !config.keeps(subnet, is_reserved(keep)) {
                    info!(node = %req.node, %subnet, "lease no longer fits the config; replacing it");
                    self.delete_entry(keep).await?;
                    continue;
                }
                for dup in listing
                    .of_node(&req.node)
                    .filter(|d| d.key != keep.key && !is_reserved(d))
                {
                    warn!(node = %req.node, key = %dup.key, "node holds a second lease; releasing it");
                    self.delete_entry(dup).await?;
                }
                self.check_mac(&served, mac, Some(&keep.key))?;
                let indexes = (node_index.as_ref(), mac_index.as_ref());
                match self.refresh(keep, req, config, indexes, false).await? {
                    Some(acquired) => return Ok((acquired, keep.lease_id)),
                    None => continue,
                }
            }
            self.check_mac(&served, mac, None)?;
            let taken = listing.taken();
            let preferred = req
                .preferred
                .filter(|p| range.contains(*p) && !taken.contains(p));
            let Some(subnet) = preferred.or_else(|| range.pick_free(&taken, &mut rand::rng()))
            else {
                let mut full_at = self.full_at.lock().expect("full lock");
                *full_at = Some(full_at.map_or(listed_at, |t| t.max(listed_at)));
                return Err(exhausted(config));
            };
            let lease_id = match *granted {
                Some(id) => id,
                None => {
                    let id = self.store.grant(config.lease_ttl).await?;
                    *granted = Some(id);
                    id
                }
            };
            let now = now_millis();
            let record = LeaseRecord {
                node: req.node.clone(),
                public_ip: req.public_ip,
                backend: req.backend,
                backend_data: req.data.clone(),
                reserved: false,
                created_at: now,
                renewed_at: now,
            };
            let key = self.keys.lease(subnet);
            let mut txn = Txn::default();
            txn.absent(&key);
            txn.put(&key, record.encode(), lease_id);
            txn.unchanged(&node_index_key, node_index.as_ref());
            txn.put(&node_index_key, subnet_key(subnet).into_bytes(), lease_id);
            if let Some(k) = &mac_index_key {
                txn.unchanged(k, mac_index.as_ref());
                txn.put(k, subnet_key(subnet).into_bytes(), lease_id);
            }
            match txn.commit(self.store.as_ref()).await {
                Ok(Written::Yes(_)) => {
                    self.note_expiry(lease_id, config.lease_ttl);
                    info!(node = %req.node, %subnet, attempt, "leased a new subnet");
                    let lease = Lease { subnet, record };
                    return Ok((
                        Acquired {
                            lease,
                            config: config.clone(),
                            ttl: Some(config.lease_ttl),
                        },
                        lease_id,
                    ));
                }
                // The subnet was taken, or the node or the MAC got a lease meanwhile.
                Ok(Written::Conflict) => continue,
                Err(StoreError::LeaseNotFound(_)) => {
                    // Our fresh etcd lease vanished (e.g. etcd restored); grant another.
                    *granted = None;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contention(MAX_ATTEMPTS))
    }

    /// Hands a node its existing lease back, updating what peers need to know and writing
    /// the index keys it lacks (rewriting an unreadable value, see the module notes). `None`
    /// when the stored state changed meanwhile (the caller re-lists). With `verify` (the
    /// lease was found in the view, not in a listing) the key is compared with what was
    /// seen even when nothing is written.
    async fn refresh(
        &self,
        keep: &Entry,
        req: &AcquireRequest,
        config: &NetworkConfig,
        (node_index, mac_index): (Option<&KeyValue>, Option<&KeyValue>),
        verify: bool,
    ) -> Result<Option<Acquired>, ControlError> {
        let subnet = keep.subnet.expect("lease keys have a subnet");
        let reserved = is_reserved(keep);
        let now = now_millis();
        let old = keep.lease().map(|l| &l.record);
        let mut record = old.cloned().unwrap_or_else(|| LeaseRecord {
            node: req.node.clone(),
            public_ip: req.public_ip,
            backend: req.backend,
            backend_data: req.data.clone(),
            reserved,
            created_at: now,
            renewed_at: now,
        });
        record.public_ip = req.public_ip;
        record.backend = req.backend;
        record.backend_data = req.data.clone();
        let changed = Some(&record) != old;
        let ttl = if reserved {
            None
        } else {
            match self.store.keep_alive(keep.lease_id).await {
                Ok(ttl) => {
                    self.note_expiry(keep.lease_id, ttl);
                    Some(ttl)
                }
                // Expired this very moment: the key is going away; re-list.
                Err(StoreError::LeaseNotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        };
        let lease_id = if reserved { 0 } else { keep.lease_id };
        let mut txn = Txn::default();
        if changed {
            record.renewed_at = now;
            txn.put(&keep.key, record.encode(), lease_id);
        }
        let node_key = self.keys.node_index(&req.node);
        if !names(node_index, subnet, lease_id) {
            txn.unchanged(&node_key, node_index);
            txn.put(&node_key, subnet_key(subnet).into_bytes(), lease_id);
        }
        let mac = req.data.vtep_mac;
        if let Some(m) = mac {
            if !names(mac_index, subnet, lease_id) {
                let key = self.keys.mac_index(m);
                txn.unchanged(&key, mac_index);
                txn.put(&key, subnet_key(subnet).into_bytes(), lease_id);
            }
        }
        // The index of a MAC this lease no longer publishes goes.
        if let Some(old_mac) = old.and_then(|r| r.backend_data.vtep_mac) {
            if Some(old_mac) != mac {
                let key = self.keys.mac_index(old_mac);
                let index = self.get_index(&key).await?;
                if index
                    .as_ref()
                    .is_some_and(|kv| names(Some(kv), subnet, kv.lease))
                {
                    txn.unchanged(&key, index.as_ref());
                    txn.delete(&key);
                }
            }
        }
        if !txn.is_empty() || verify {
            txn.at_revision(&keep.key, keep.mod_revision);
            match txn.commit(self.store.as_ref()).await {
                Ok(Written::Yes(_)) => {}
                Ok(Written::Conflict) | Err(StoreError::LeaseNotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        if keep.lease().is_none() {
            warn!(node = %req.node, %subnet, "rewrote the node's lease, whose stored value was unreadable");
        } else if changed {
            info!(node = %req.node, %subnet, "updated the node's lease");
        } else {
            info!(node = %req.node, %subnet, "node took its lease back");
        }
        Ok(Some(Acquired {
            lease: Lease { subnet, record },
            config: config.clone(),
            ttl,
        }))
    }

    async fn get_entry(&self, subnet: Ipv4Net) -> Result<Option<Entry>, ControlError> {
        Ok(self
            .store
            .get(&self.keys.lease(subnet))
            .await?
            .map(|kv| read_key(&self.keys, &kv)))
    }

    /// Deletes a lease key, if it is still as read, with the index keys that name it, in
    /// one transaction; then revokes its etcd lease (so that none is left without keys).
    /// `false` when the key changed or went meanwhile: then nothing is deleted or revoked.
    async fn delete_entry(&self, e: &Entry) -> Result<bool, ControlError> {
        let mut txn = Txn::default();
        txn.at_revision(&e.key, e.mod_revision);
        txn.delete(&e.key);
        if let (Some(lease), Some(subnet)) = (e.lease(), e.subnet) {
            let mut index_keys = vec![self.keys.node_index(&lease.record.node)];
            index_keys.extend(
                lease
                    .record
                    .backend_data
                    .vtep_mac
                    .map(|m| self.keys.mac_index(m)),
            );
            for key in index_keys {
                let index = self.get_index(&key).await?;
                if index
                    .as_ref()
                    .is_some_and(|kv| names(Some(kv), subnet, kv.lease))
                {
                    txn.unchanged(&key, index.as_ref());
                    txn.delete(&key);
                }
            }
        }
        let deleted = txn.commit(self.store.as_ref()).await?.ok();
        if deleted && e.lease_id != 0 {
            if let Err(err) = self.store.revoke(e.lease_id).await {
                warn!(lease = e.lease_id, error = %err, "could not revoke the etcd lease of a deleted key; it will expire");
            }
        }
        Ok(deleted)
    }

    /// Whether `node`'s index key names the (unreadable) lease key `e`.
    async fn proven_owner(&self, e: &Entry, node: &str) -> Result<bool, ControlError> {
        let index = self.get_index(&self.keys.node_index(node)).await?;
        Ok(index.is_some_and(|kv| self.keys.indexed_lease(&kv) == e.key && kv.lease == e.lease_id))
    }

    /// The readable lease of `e`, or the error that says why a node cannot act on it.
    async fn readable<'a>(&self, e: &'a Entry, node: &str) -> Result<&'a Lease, ControlError> {
        match &e.read {
            Ok(lease) => Ok(lease),
            Err(why) => {
                let subnet = e.subnet.expect("lease keys have a subnet");
                Err(ControlError::NotFound(
                    if self.proven_owner(e, node).await? {
                        format!(
                            "the stored lease for {subnet} is unreadable ({}): acquire again; its index key shows it is node {node:?}'s, so acquire rewrites it in place",
                            why.detail
                        )
                    } else {
                        format!(
                            "the stored lease for {subnet} is unreadable ({}) and nothing shows whose it is: acquire a lease again",
                            why.detail
                        )
                    },
                ))
            }
        }
    }

    /// Keeps `node`'s lease of `subnet` alive. `NotFound` when it expired or was revoked,
    /// or when its stored value is unreadable (see the module notes): the agent then
    /// acquires again, preferring the same subnet.
    pub async fn renew(
        &self,
        node: &str,
        subnet: Ipv4Net,
    ) -> Result<Option<Duration>, ControlError> {
        let e = self.get_entry(subnet).await?.ok_or_else(|| {
            ControlError::NotFound(format!("no lease for {subnet}: it expired or was revoked"))
        })?;
        let lease = self.readable(&e, node).await?;
        check_holder(lease, node)?;
        if lease.record.reserved {
            return Ok(None);
        }
        match self.store.keep_alive(e.lease_id).await {
            Ok(ttl) => {
                self.note_expiry(e.lease_id, ttl);
                Ok(Some(ttl))
            }
            Err(StoreError::LeaseNotFound(_)) => Err(ControlError::NotFound(format!(
                "the lease for {subnet} has expired"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives a lease up. Releasing a lease that is already gone succeeds; a reservation
    /// stays (it belongs to the operator, not the agent). An unreadable lease can be
    /// released by the node its index key names.
    pub async fn release(&self, node: &str, subnet: Ipv4Net) -> Result<(), ControlError> {
        let Some(e) = self.get_entry(subnet).await? else {
            return Ok(());
        };
        let reserved = match &e.read {
            Ok(lease) => {
                check_holder(lease, node)?;
                lease.record.reserved
            }
            Err(_) if self.proven_owner(&e, node).await? => e.lease_id == 0,
            Err(why) => {
                return Err(ControlError::FailedPrecondition(format!(
                    "the stored lease for {subnet} is unreadable ({}) and nothing shows it is node {node:?}'s; an admin can revoke it",
                    why.detail
                )))
            }
        };
        if !reserved {
            self.delete_entry(&e).await?;
            info!(%node, %subnet, "lease released");
        }
        Ok(())
    }

    /// The leases served (as the watch serves them) with their expiry, and the keys ignored.
    pub async fn list_all(&self) -> Result<LeaseListing, ControlError> {
        let config = match self.config().await {
            Ok(c) => Some(c),
            Err(ControlError::NoConfig) => None,
            Err(e) => return Err(e),
        };
        let (kvs, revision) = self.store.list(&self.keys.leases()).await?;
        let entries: Vec<Entry> = kvs.iter().map(|kv| read_key(&self.keys, kv)).collect();
        let interpretation = interpret(config.as_ref(), &entries);
        let now = now_millis();
        let served: Vec<(Lease, LeaseId)> = interpretation
            .leases
            .values()
            .map(|e| {
                (
                    e.lease().expect("served leases are readable").clone(),
                    e.lease_id,
                )
            })
            .collect();
        // Expiries as learnt from grants, keepalives and earlier lookups; only a lease
        // this controller knows no future expiry of is looked up (see the module notes).
        let known: HashMap<LeaseId, SystemTime> = {
            let mut expiry = self.expiry.lock().expect("expiry lock");
            let live: HashSet<LeaseId> = served.iter().map(|(_, id)| *id).collect();
            expiry.retain(|id, _| live.contains(id));
            expiry.clone()
        };
        let store = self.store.clone();
        let lookups = served.into_iter().map(|(lease, id)| {
            let store = store.clone();
            let known = known.get(&id).copied().filter(|at| *at > now);
            async move {
                let expires_at = if id == 0 || lease.record.reserved {
                    None
                } else if let Some(at) = known {
                    Some(at)
                } else {
                    // A lease that vanished between the listing and now expires "now".
                    let ttl = store.time_to_live(id).await?;
                    return Ok::<_, StoreError>((
                        ListedLease {
                            lease,
                            expires_at: Some(ttl.map_or(now, |ttl| now + ttl)),
                        },
                        ttl.map(|t| (id, t)),
                    ));
                };
                Ok((ListedLease { lease, expires_at }, None))
            }
        });
        let looked_up: Vec<(ListedLease, Option<(LeaseId, Duration)>)> = stream::iter(lookups)
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut leases = Vec::with_capacity(looked_up.len());
        for (listed, learnt) in looked_up {
            if let Some((id, ttl)) = learnt {
                self.note_expiry(id, ttl);
            }
            leases.push(listed);
        }
        Ok(LeaseListing {
            leases,
            ignored: interpretation.ignored,
            revision,
        })
    }

    /// The leases served, as [`Self::list_all`], and the revision of the listing.
    pub async fn list(&self) -> Result<(Vec<ListedLease>, i64), ControlError> {
        let listing = self.list_all().await?;
        Ok((listing.leases, listing.revision))
    }

    /// Stores a new config. Leases that no longer fit are refused unless `force`, which
    /// revokes them (their agents then acquire a subnet that fits).
    pub async fn set_config(
        &self,
        json: &str,
        force: bool,
    ) -> Result<(NetworkConfig, Vec<Lease>), ControlError> {
        let config = NetworkConfig::from_json(json)?;
        let listing = self.listing().await?;
        let stored: Vec<(&Entry, &Lease)> = listing
            .entries
            .iter()
            .filter_map(|e| e.lease().map(|l| (e, l)))
            .collect();
        let misfits: Vec<(&Entry, &Lease)> = stored
            .iter()
            .filter(|(_, l)| !config.keeps(l.subnet, l.record.reserved))
            .copied()
            .collect();
        if !misfits.is_empty() && !force {
            let names: Vec<String> = misfits
                .iter()
                .take(5)
                .map(|(_, l)| format!("{} ({})", l.subnet, l.record.node))
                .collect();
            return Err(ControlError::FailedPrecondition(format!(
                "{} existing lease(s) would not fit the new config: {}{}; pass --force to revoke them",
                misfits.len(),
                names.join(", "),
                if misfits.len() > 5 { ", ..." } else { "" }
            )));
        }
        // A different backend, VNI or port makes every running host's datapath wrong until
        // its agent restarts (agents exit and are restarted by systemd when they see it).
        if !force && !stored.is_empty() {
            if let Ok(current) = self.config().await {
                let (a, b) = (current.backend, config.backend);
                let mut changes = Vec::new();
                if a.kind != b.kind {
                    changes.push(format!("backend {} -> {}", a.kind, b.kind));
                }
                if a.vni != b.vni {
                    changes.push(format!("VNI {} -> {}", a.vni, b.vni));
                }
                if a.port != b.port {
                    changes.push(format!("port {} -> {}", a.port, b.port));
                }
                if !changes.is_empty() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "changing {} while {} host(s) hold leases disrupts traffic until every agent restarts; pass --force",
                        changes.join(", "),
                        stored.len()
                    )));
                }
            }
        }
        self.store
            .put(&self.keys.config(), config.to_json().into_bytes())
            .await?;
        *self.last_config.write().expect("config lock") = Some(config.clone());
        info!(config = %config.to_json(), "network config stored");
        let mut revoked = Vec::new();
        for (e, lease) in misfits {
            if self.delete_entry(e).await? {
                revoked.push(lease.clone());
            }
        }
        Ok((config, revoked))
    }

    /// Reserves `subnet` for `node`: a lease without expiry. The node's dynamic lease
    /// elsewhere, if any, is deleted in the same transaction (one lease per node); its agent
    /// then finds its lease gone and acquires the reservation.
    pub async fn reserve(
        &self,
        subnet: Ipv4Net,
        node: &str,
        public_ip: Ipv4Addr,
    ) -> Result<Lease, ControlError> {
        validate_node_name(node)?;
        validate_public_ip(public_ip)?;
        let config = self.config().await?;
        if !config.is_network_subnet(subnet) {
            return Err(ControlError::InvalidArgument(format!(
                "subnet {subnet} is not one of the network's subnets (a /{} inside {})",
                config.subnet_len, config.network
            )));
        }
        if config.network.contains(&public_ip) {
            return Err(LeaseError::PublicIpInOverlay {
                ip: public_ip,
                network: config.network,
            }
            .into());
        }
        let key = self.keys.lease(subnet);
        let node_key = self.keys.node_index(node);
        'attempts: for _ in 0..MAX_ATTEMPTS {
            let node_index = self.get_index(&node_key).await?;
            let listing = self.listing().await?;
            if let Some(other) = listing
                .of_node(node)
                .find(|e| is_reserved(e) && e.key != key)
            {
                return Err(ControlError::FailedPrecondition(format!(
                    "node {node} already has a reservation for {}; revoke it first",
                    other.subnet.expect("lease keys have a subnet")
                )));
            }
            let existing = listing.entry(&key);
            let now = now_millis();
            let mut txn = Txn::default();
            let mut revoke = Vec::new();
            let record = match existing {
                Some(e) => match &e.read {
                    Err(why) => {
                        return Err(ControlError::FailedPrecondition(format!(
                            "{subnet} holds an unreadable lease ({}); revoke it first",
                            why.detail
                        )))
                    }
                    Ok(l) if l.record.node != node => {
                        return Err(ControlError::FailedPrecondition(format!(
                            "{subnet} is leased to node {}; revoke it first",
                            l.record.node
                        )));
                    }
                    Ok(l) => {
                        // The node holds this subnet already: pin it (detach the key and
                        // its index keys from its etcd lease).
                        txn.at_revision(&e.key, e.mod_revision);
                        if e.lease_id != 0 {
                            revoke.push(e.lease_id);
                        }
                        let mut record = l.record.clone();
                        record.reserved = true;
                        record.public_ip = public_ip;
                        record.renewed_at = now;
                        if let Some(m) = record.backend_data.vtep_mac {
                            let mac_key = self.keys.mac_index(m);
                            let index = self.get_index(&mac_key).await?;
                            txn.unchanged(&mac_key, index.as_ref());
                            txn.put(&mac_key, subnet_key(subnet).into_bytes(), 0);
                        }
                        record
                    }
                },
                None => {
                    txn.absent(&key);
                    LeaseRecord {
                        node: node.to_string(),
                        public_ip,
                        backend: config.backend.kind,
                        backend_data: BackendData::default(),
                        reserved: true,
                        created_at: now,
                        renewed_at: now,
                    }
                }
            };
            // The node's dynamic leases elsewhere go, with their index keys.
            for d in listing.of_node(node).filter(|d| d.key != key) {
                let (Some(lease), Some(d_subnet)) = (d.lease(), d.subnet) else {
                    continue;
                };
                txn.at_revision(&d.key, d.mod_revision);
                txn.delete(&d.key);
                if d.lease_id != 0 {
                    revoke.push(d.lease_id);
                }
                if let Some(m) = lease.record.backend_data.vtep_mac {
                    let mac_key = self.keys.mac_index(m);
                    let index = self.get_index(&mac_key).await?;
                    if names(index.as_ref(), d_subnet, d.lease_id)
                        && !txn.writes.contains_key(&mac_key)
                    {
                        txn.unchanged(&mac_key, index.as_ref());
                        txn.delete(&mac_key);
                    }
                }
            }
            txn.put(&key, record.encode(), 0);
            txn.unchanged(&node_key, node_index.as_ref());
            txn.put(&node_key, subnet_key(subnet).into_bytes(), 0);
            if !txn.commit(self.store.as_ref()).await?.ok() {
                continue 'attempts;
            }
            for id in revoke {
                if let Err(e) = self.store.revoke(id).await {
                    warn!(lease = id, error = %e, "could not revoke a replaced etcd lease; it will expire");
                }
            }
            info!(%subnet, %node, "subnet reserved");
            return Ok(Lease { subnet, record });
        }
        Err(ControlError::Contention(MAX_ATTEMPTS))
    }

    /// Deletes a lease or reservation at once, also one whose stored value is unreadable.
    /// Returns the lease as it was, `None` for an unreadable one.
    pub async fn revoke(&self, subnet: Ipv4Net) -> Result<Option<Lease>, ControlError> {
        for _ in 0..MAX_ATTEMPTS {
            let e = self
                .get_entry(subnet)
                .await?
                .ok_or_else(|| ControlError::NotFound(format!("no lease for {subnet}")))?;
            if self.delete_entry(&e).await? {
                let node = e.lease().map_or("(unreadable)", |l| l.record.node.as_str());
                info!(%subnet, %node, "lease revoked");
                return Ok(e.lease().cloned());
            }
        }
        Err(ControlError::Contention(MAX_ATTEMPTS))
    }
}

fn exhausted(config: &NetworkConfig) -> ControlError {
    ControlError::Exhausted {
        total: config.range().len(),
        range: format!("{}-{}", config.subnet_min, config.subnet_max),
    }
}

/// Whether a claim still matters once the view is complete up to `revision`.
fn keep_claim(c: Claim, subnet: Ipv4Net, revision: i64, view: &LeaseView) -> bool {
    match c {
        Claim::InFlight => true,
        Claim::Created(at) => at > revision,
        Claim::Foreign(_) => !view.is_taken(subnet),
    }
}

fn foreign_expired(c: Claim, now: Instant) -> bool {
    matches!(c, Claim::Foreign(at) if now.duration_since(at) > FOREIGN_CLAIM)
}

fn check_holder(lease: &Lease, node: &str) -> Result<(), ControlError> {
    if lease.record.node == node {
        Ok(())
    } else {
        Err(ControlError::NotHolder {
            node: node.to_string(),
            subnet: lease.subnet.to_string(),
            holder: lease.record.node.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::{Condition, TxnWrite};

    const CONFIG: &str =
        r#"{"network":"10.244.0.0/16","backend":{"type":"alloc"},"lease_ttl":"60s"}"#;

    async fn manager(config: &str) -> LeaseManager {
        let m = LeaseManager::new(Arc::new(MemoryStore::new()), Keys::new("/t"));
        m.set_config(config, false).await.unwrap();
        m
    }

    fn req(node: &str) -> AcquireRequest {
        AcquireRequest {
            node: node.into(),
            public_ip: "192.0.2.1".parse().unwrap(),
            backend: BackendType::Alloc,
            data: BackendData::default(),
            preferred: None,
        }
    }

    #[tokio::test]
    async fn keys_are_laid_out_under_the_prefix() {
        let k = Keys::new("overlay/");
        assert_eq!(k.config(), "/overlay/config");
        assert_eq!(
            k.lease("10.244.7.0/24".parse().unwrap()),
            "/overlay/leases/10.244.7.0-24"
        );
        assert_eq!(
            k.subnet_of("/overlay/leases/10.244.7.0-24"),
            Some("10.244.7.0/24".parse().unwrap())
        );
        assert_eq!(k.subnet_of("/overlay/config"), None);
    }

    #[tokio::test]
    async fn without_a_config_acquire_says_what_to_do() {
        let m = LeaseManager::new(Arc::new(MemoryStore::new()), Keys::new("/t"));
        let e = m.acquire(&req("a")).await.unwrap_err();
        assert!(matches!(e, ControlError::NoConfig), "{e}");
        assert!(e.to_string().contains("overlayctl config set"));
    }

    #[tokio::test]
    async fn the_same_node_gets_its_lease_back_and_others_get_different_ones() {
        let m = manager(CONFIG).await;
        let a = m.acquire(&req("a")).await.unwrap();
        let b = m.acquire(&req("b")).await.unwrap();
        assert_ne!(a.lease.subnet, b.lease.subnet);
        assert_eq!(a.ttl, Some(Duration::from_secs(60)));
        let again = m.acquire(&req("a")).await.unwrap();
        assert_eq!(
            again.lease, a.lease,
            "unchanged lease is handed back as it was"
        );
        let mut moved = req("a");
        moved.public_ip = "192.0.2.99".parse().unwrap();
        let updated = m.acquire(&moved).await.unwrap();
        assert_eq!(updated.lease.subnet, a.lease.subnet);
        assert_eq!(updated.lease.record.public_ip, moved.public_ip);
        assert_eq!(m.list().await.unwrap().0.len(), 2);
    }

    #[tokio::test]
    async fn a_free_preferred_subnet_is_honoured() {
        let m = manager(CONFIG).await;
        let mut r = req("a");
        r.preferred = Some("10.244.42.0/24".parse().unwrap());
        assert_eq!(
            m.acquire(&r).await.unwrap().lease.subnet,
            r.preferred.unwrap()
        );
        let mut r = req("b");
        r.preferred = Some("10.244.42.0/24".parse().unwrap());
        assert_ne!(
            m.acquire(&r).await.unwrap().lease.subnet,
            r.preferred.unwrap(),
            "taken: not honoured"
        );
        let mut r = req("c");
        r.preferred = Some("10.99.0.0/24".parse().unwrap());
        assert!(m
            .acquire(&r)
            .await
            .unwrap()
            .lease
            .subnet
            .to_string()
            .starts_with("10.244."));
    }

    #[tokio::test]
    async fn exhaustion_is_an_error_and_writes_nothing() {
        let m = manager(
            r#"{"network":"10.244.0.0/16","subnet_min":"10.244.1.0/24","subnet_max":"10.244.2.0/24","backend":{"type":"alloc"}}"#,
        )
        .await;
        m.acquire(&req("a")).await.unwrap();
        m.acquire(&req("b")).await.unwrap();
        let e = m.acquire(&req("c")).await.unwrap_err();
        assert!(matches!(e, ControlError::Exhausted { total: 2, .. }), "{e}");
        assert!(e.to_string().contains("subnet range exhausted"));
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(m.list().await.unwrap().0.len(), 2);
    }

    /// Fixed subnets kept out of random allocation: reserved after subnet_max, they are
    /// honoured, never handed to anyone else, and survive a config change of the range.
    #[tokio::test]
    async fn reservations_outside_the_dynamic_range_are_honoured() {
        let m = manager(
            r#"{"network":"10.244.0.0/16","subnet_min":"10.244.1.0/24","subnet_max":"10.244.2.0/24","backend":{"type":"alloc"}}"#,
        )
        .await;
        let fixed: Ipv4Net = "10.244.250.0/24".parse().unwrap();
        m.reserve(fixed, "pinned", "192.0.2.9".parse().unwrap())
            .await
            .unwrap();
        let a = m.acquire(&req("a")).await.unwrap();
        let b = m.acquire(&req("b")).await.unwrap();
        assert!(m.acquire(&req("c")).await.is_err(), "the range holds two");
        assert_ne!(a.lease.subnet, fixed);
        assert_ne!(b.lease.subnet, fixed);
        let mut pinned = req("pinned");
        pinned.public_ip = "192.0.2.9".parse().unwrap();
        assert_eq!(m.acquire(&pinned).await.unwrap().lease.subnet, fixed);
        // A new range that leaves the dynamic leases in place keeps the reservation too.
        let (_, revoked) = m
            .set_config(
                r#"{"network":"10.244.0.0/16","subnet_min":"10.244.1.0/24","subnet_max":"10.244.3.0/24","backend":{"type":"alloc"}}"#,
                false,
            )
            .await
            .unwrap();
        assert!(revoked.is_empty(), "{revoked:?}");
        assert_eq!(m.list().await.unwrap().0.len(), 3);
    }

    #[tokio::test]
    async fn concurrent_managers_never_hand_out_one_subnet_twice() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let small = r#"{"network":"10.244.0.0/24","subnet_len":28,"backend":{"type":"alloc"}}"#;
        let managers: Vec<Arc<LeaseManager>> = (0..4)
            .map(|_| Arc::new(LeaseManager::new(store.clone(), Keys::new("/t"))))
            .collect();
        managers[0].set_config(small, false).await.unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let m = managers[i % 4].clone();
                tokio::spawn(async move { m.acquire(&req(&format!("n{i}"))).await })
            })
            .collect();
        let mut got = Vec::new();
        let mut exhausted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => got.push(a.lease.subnet),
                Err(ControlError::Exhausted { .. }) => exhausted += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 15, "a /24 in /28s minus the first is 15 subnets");
        assert_eq!(exhausted, 5);
        assert_eq!(
            got.iter().collect::<HashSet<_>>().len(),
            got.len(),
            "duplicates: {got:?}"
        );
    }

    #[tokio::test]
    async fn renew_release_and_revoke() {
        let m = manager(CONFIG).await;
        let a = m.acquire(&req("a")).await.unwrap();
        let s = a.lease.subnet;
        assert_eq!(
            m.renew("a", s).await.unwrap(),
            Some(Duration::from_secs(60))
        );
        let e = m.renew("b", s).await.unwrap_err();
        assert!(matches!(e, ControlError::NotHolder { .. }), "{e}");
        m.revoke(s).await.unwrap();
        assert!(matches!(
            m.renew("a", s).await.unwrap_err(),
            ControlError::NotFound(_)
        ));
        assert!(matches!(
            m.revoke(s).await.unwrap_err(),
            ControlError::NotFound(_)
        ));
        let again = m
            .acquire(&AcquireRequest {
                preferred: Some(s),
                ..req("a")
            })
            .await
            .unwrap();
        assert_eq!(
            again.lease.subnet, s,
            "re-acquired the same subnet after a revoke"
        );
        m.release("a", s).await.unwrap();
        m.release("a", s).await.unwrap();
        assert!(m.list().await.unwrap().0.is_empty());
    }

    /// Finding D: a delete that loses its compare (the key changed since it was read)
    /// deletes nothing and revokes nothing: the etcd lease is the live lease of whoever
    /// changed the key (here the owner, updating its public IP on the same etcd lease).
    #[tokio::test]
    async fn a_delete_that_loses_its_compare_leaves_the_key_and_its_etcd_lease() {
        let m = manager(CONFIG).await;
        let a = m.acquire(&req("a")).await.unwrap().lease;
        let stale = m.get_entry(a.subnet).await.unwrap().expect("the lease");
        let moved = AcquireRequest {
            public_ip: "192.0.2.99".parse().unwrap(),
            ..req("a")
        };
        assert_eq!(m.acquire(&moved).await.unwrap().lease.subnet, a.subnet);
        assert!(!m.delete_entry(&stale).await.unwrap(), "the delete lost");
        let now = m.get_entry(a.subnet).await.unwrap().expect("the key stays");
        assert_eq!(now.lease_id, stale.lease_id);
        assert!(
            m.store()
                .time_to_live(stale.lease_id)
                .await
                .unwrap()
                .is_some(),
            "the owner's etcd lease was revoked"
        );
        assert_eq!(
            m.renew("a", a.subnet).await.unwrap(),
            Some(Duration::from_secs(60))
        );
    }

    /// A lease written before index keys existed is handed back without rewriting it (no
    /// event for watchers), and gets its index keys; a newer legacy lease of another node
    /// with the same VTEP MAC is refused when that node acquires with it.
    #[tokio::test]
    async fn a_lease_from_before_index_keys_gets_them_without_being_rewritten() {
        let m = manager(
            r#"{"network":"10.244.0.0/16","subnet_max":"10.244.199.0/24","backend":{"type":"vxlan"},"lease_ttl":"60s"}"#,
        )
        .await;
        let mac = "02:00:00:00:0f:01";
        let with_mac = |node: &str| AcquireRequest {
            backend: BackendType::Vxlan,
            data: BackendData {
                vtep_mac: Some(mac.parse().unwrap()),
                ..Default::default()
            },
            ..req(node)
        };
        let mut legacy = Vec::new();
        for node in ["old", "new"] {
            let r = with_mac(node);
            let record = LeaseRecord {
                node: node.into(),
                public_ip: r.public_ip,
                backend: r.backend,
                backend_data: r.data.clone(),
                reserved: false,
                created_at: now_millis(),
                renewed_at: now_millis(),
            };
            let id = m.store().grant(Duration::from_secs(60)).await.unwrap();
            let subnet = m
                .config()
                .await
                .unwrap()
                .range()
                .pick_free(&legacy.iter().copied().collect(), &mut rand::rng())
                .unwrap();
            let key = m.keys().lease(subnet);
            assert!(m
                .store()
                .create(&key, record.encode(), id)
                .await
                .unwrap()
                .ok());
            legacy.push(subnet);
        }
        let before = m
            .store()
            .get(&m.keys().lease(legacy[0]))
            .await
            .unwrap()
            .unwrap();
        let back = m.acquire(&with_mac("old")).await.unwrap();
        assert_eq!(back.lease.subnet, legacy[0]);
        let after = m.store().get(&before.key).await.unwrap().unwrap();
        assert_eq!(after.mod_revision, before.mod_revision, "rewritten");
        for index in [
            m.keys().node_index("old"),
            m.keys().mac_index(mac.parse().unwrap()),
        ] {
            let kv = m.store().get(&index).await.unwrap().expect("index key");
            assert_eq!(
                (kv.value.as_slice(), kv.lease),
                (subnet_key(legacy[0]).as_bytes(), before.lease)
            );
        }
        let e = m.acquire(&with_mac("new")).await.unwrap_err();
        assert!(e.to_string().contains("\"old\""), "{e}");
        let (listed, _) = m.list().await.unwrap();
        assert_eq!(listed.len(), 1, "the newer clashing lease is not served");
    }

    #[tokio::test]
    async fn reservations_are_honoured_and_survive_release() {
        let m = manager(CONFIG).await;
        let s: Ipv4Net = "10.244.200.0/24".parse().unwrap();
        let r = m
            .reserve(s, "pinned", "192.0.2.5".parse().unwrap())
            .await
            .unwrap();
        assert!(r.record.reserved);
        let a = m.acquire(&req("pinned")).await.unwrap();
        assert_eq!(a.lease.subnet, s);
        assert_eq!(a.ttl, None);
        assert_eq!(m.renew("pinned", s).await.unwrap(), None);
        m.release("pinned", s).await.unwrap();
        let listed = m.list().await.unwrap().0;
        assert_eq!(listed.len(), 1);
        assert!(listed[0].lease.record.reserved && listed[0].expires_at.is_none());
        // Taken by another node: refused, naming the holder.
        let other = m.acquire(&req("other")).await.unwrap();
        let e = m
            .reserve(other.lease.subnet, "x", "192.0.2.6".parse().unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("other"), "{e}");
        // Outside the network: refused.
        let e = m
            .reserve(
                "10.245.0.0/24".parse().unwrap(),
                "x",
                "192.0.2.6".parse().unwrap(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ControlError::InvalidArgument(_)), "{e}");
        // Reserving a node's current lease pins it in place.
        let pinned = m
            .reserve(other.lease.subnet, "other", "192.0.2.1".parse().unwrap())
            .await
            .unwrap();
        assert!(pinned.record.reserved);
        assert_eq!(
            m.acquire(&req("other")).await.unwrap().lease.subnet,
            other.lease.subnet
        );
    }

    #[tokio::test]
    async fn a_reservation_wins_over_an_older_lease_of_the_same_node() {
        let m = manager(CONFIG).await;
        let old = m.acquire(&req("n")).await.unwrap().lease.subnet;
        let s: Ipv4Net = "10.244.201.0/24".parse().unwrap();
        m.reserve(s, "n", "192.0.2.1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(m.acquire(&req("n")).await.unwrap().lease.subnet, s);
        let subnets: Vec<Ipv4Net> = m
            .list()
            .await
            .unwrap()
            .0
            .iter()
            .map(|l| l.lease.subnet)
            .collect();
        assert_eq!(subnets, vec![s], "the old lease {old} was released");
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_anything_is_written() {
        let m = manager(CONFIG).await;
        for (r, what) in [
            (
                AcquireRequest {
                    node: "bad name".into(),
                    ..req("x")
                },
                "node name",
            ),
            (
                AcquireRequest {
                    public_ip: "0.0.0.0".parse().unwrap(),
                    ..req("x")
                },
                "public IP",
            ),
            (
                AcquireRequest {
                    public_ip: "10.244.3.3".parse().unwrap(),
                    ..req("x")
                },
                "inside the overlay",
            ),
            (
                AcquireRequest {
                    backend: BackendType::Vxlan,
                    ..req("x")
                },
                "backend",
            ),
            (
                AcquireRequest {
                    data: BackendData {
                        vtep_mac: Some("01:00:00:00:00:01".parse().unwrap()),
                        ..Default::default()
                    },
                    ..req("x")
                },
                "MAC",
            ),
            (
                AcquireRequest {
                    data: BackendData {
                        underlay: Some("198.51.100.0/24".parse().unwrap()),
                        ..Default::default()
                    },
                    ..req("x")
                },
                "underlay",
            ),
        ] {
            let e = m.acquire(&r).await.unwrap_err();
            assert!(e.to_string().contains(what), "{e} should mention {what}");
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
        }
        assert!(m.list().await.unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn config_changes_that_strand_leases_need_force() {
        let m = manager(CONFIG).await;
        let a = m.acquire(&req("a")).await.unwrap();
        let moved = r#"{"network":"10.245.0.0/16","backend":{"type":"alloc"}}"#;
        let e = m.set_config(moved, false).await.unwrap_err();
        assert!(
            e.to_string().contains(&a.lease.subnet.to_string())
                && e.to_string().contains("--force"),
            "{e}"
        );
        assert_eq!(
            m.config().await.unwrap().network.to_string(),
            "10.244.0.0/16"
        );
        let e = m
            .set_config(
                r#"{"network":"10.245.0.0/16","backend":{"type":"nope"}}"#,
                true,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("backend.type"), "{e}");
        let (config, revoked) = m.set_config(moved, true).await.unwrap();
        assert_eq!(config.network.to_string(), "10.245.0.0/16");
        assert_eq!(revoked.len(), 1);
        let b = m.acquire(&req("a")).await.unwrap();
        assert!(b.lease.subnet.to_string().starts_with("10.245."));
        // A VNI or backend change with hosts up needs force too.
        let vni = r#"{"network":"10.245.0.0/16","backend":{"type":"alloc","vni":7}}"#;
        let e = m.set_config(vni, false).await.unwrap_err();
        assert!(
            e.to_string().contains("VNI 1 -> 7") && e.to_string().contains("--force"),
            "{e}"
        );
        // A change that keeps every lease valid needs no force.
        m.set_config(
            r#"{"network":"10.245.0.0/16","backend":{"type":"alloc"},"lease_ttl":"2h"}"#,
            false,
        )
        .await
        .unwrap();
    }

    /// A store that counts the calls allocation and listing must keep rare, and that can
    /// hold `grant` until released.
    struct Counting {
        inner: MemoryStore,
        lists: AtomicU64,
        lookups: AtomicU64,
        grants_held: Option<tokio::sync::Semaphore>,
    }

    impl Counting {
        fn new() -> Self {
            Counting {
                inner: MemoryStore::new(),
                lists: AtomicU64::new(0),
                lookups: AtomicU64::new(0),
                grants_held: None,
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
            self.lists.fetch_add(1, Ordering::Relaxed);
            self.inner.list(prefix).await
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
            self.inner.put(key, value).await
        }
        async fn create(
            &self,
            key: &str,
            value: Vec<u8>,
            lease: LeaseId,
        ) -> Result<Written, StoreError> {
            self.inner.create(key, value, lease).await
        }
        async fn update(
            &self,
            key: &str,
            value: Vec<u8>,
            expected: i64,
            lease: LeaseId,
        ) -> Result<Written, StoreError> {
            self.inner.update(key, value, expected, lease).await
        }
        async fn delete(&self, key: &str, expected: Option<i64>) -> Result<Written, StoreError> {
            self.inner.delete(key, expected).await
        }
        async fn txn(&self, c: Vec<Condition>, w: Vec<TxnWrite>) -> Result<Written, StoreError> {
            self.inner.txn(c, w).await
        }
        async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            if let Some(held) = &self.grants_held {
                held.acquire().await.expect("open").forget();
            }
            self.inner.grant(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            self.inner.time_to_live(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke(lease).await
        }
        async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
            self.inner.list_leases().await
        }
        async fn lease_info(
            &self,
            lease: LeaseId,
        ) -> Result<Option<crate::store::LeaseInfo>, StoreError> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            self.inner.lease_info(lease).await
        }
        async fn watch(
            &self,
            prefix: &str,
            start: i64,
        ) -> Result<crate::store::WatchStream, StoreError> {
            self.inner.watch(prefix, start).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn compact(&self, revision: i64) -> Result<(), StoreError> {
            self.inner.compact(revision).await
        }
    }

    /// A controller: a manager and the fan-out that keeps its view current, synced.
    async fn controller(store: Arc<dyn Store>) -> Arc<LeaseManager> {
        let m = Arc::new(LeaseManager::new(store.clone(), Keys::new("/t")));
        let f = Arc::new(crate::fanout::Fanout::new());
        tokio::spawn(f.run(m.clone()));
        let (_, now) = store.list("/t/").await.unwrap();
        m.view_reaches(now).await;
        m
    }

    /// Every controller's view is complete up to what the store holds now.
    async fn all_caught_up(store: &dyn Store, managers: &[Arc<LeaseManager>]) {
        let (_, now) = store.list("/t/").await.unwrap();
        for m in managers {
            m.view_reaches(now).await;
        }
    }

    /// Acquires for `nodes` all at once, spread over `managers`: the subnets granted and
    /// how many were told the range is exhausted (any other error fails the test).
    async fn all_at_once(
        managers: &[Arc<LeaseManager>],
        nodes: &[String],
    ) -> (Vec<Ipv4Net>, usize) {
        let tasks: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let m = managers[i % managers.len()].clone();
                let r = req(node);
                tokio::spawn(async move { m.acquire(&r).await })
            })
            .collect();
        let mut got = Vec::new();
        let mut exhausted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => got.push(a.lease.subnet),
                Err(ControlError::Exhausted { .. }) => exhausted += 1,
                Err(e) => panic!("only 'exhausted' may fail an acquire here: {e}"),
            }
        }
        (got, exhausted)
    }

    /// Allocation from the controllers' views, many at once on a nearly full range, on
    /// three controllers: as many acquires succeed as there are free subnets, no subnet
    /// twice, and "exhausted" is only ever said once none is free. After some leases are
    /// released, exactly that many of the next burst succeed.
    #[tokio::test]
    async fn concurrent_allocators_get_every_free_subnet_of_a_nearly_full_range() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let setup = LeaseManager::new(store.clone(), Keys::new("/t"));
        // A /24 in /28s: 15 subnets (the first is not in the range).
        setup
            .set_config(
                r#"{"network":"10.244.0.0/24","subnet_len":28,"backend":{"type":"alloc"}}"#,
                false,
            )
            .await
            .unwrap();
        let mut managers = Vec::new();
        for _ in 0..3 {
            managers.push(controller(store.clone()).await);
        }
        let early: Vec<String> = (0..10).map(|i| format!("early{i}")).collect();
        for node in &early {
            managers[0].acquire(&req(node)).await.unwrap();
        }
        all_caught_up(store.as_ref(), &managers).await;

        let burst: Vec<String> = (0..40).map(|i| format!("burst{i}")).collect();
        let (got, exhausted) = all_at_once(&managers, &burst).await;
        assert_eq!(
            got.len(),
            5,
            "every one of the 5 free subnets was handed out: {got:?}"
        );
        assert_eq!(exhausted, 35);
        let (listed, _) = setup.list().await.unwrap();
        let subnets: HashSet<Ipv4Net> = listed.iter().map(|l| l.lease.subnet).collect();
        assert_eq!((listed.len(), subnets.len()), (15, 15), "no subnet twice");

        // Three leases go; a second burst gets exactly those three.
        for l in listed
            .iter()
            .filter(|l| l.lease.record.node.starts_with("early"))
            .take(3)
        {
            setup
                .release(&l.lease.record.node, l.lease.subnet)
                .await
                .unwrap();
        }
        all_caught_up(store.as_ref(), &managers).await;
        let again: Vec<String> = (0..30).map(|i| format!("again{i}")).collect();
        let (got, exhausted) = all_at_once(&managers, &again).await;
        assert_eq!((got.len(), exhausted), (3, 27), "{got:?}");
        let (listed, _) = setup.list().await.unwrap();
        let subnets: HashSet<Ipv4Net> = listed.iter().map(|l| l.lease.subnet).collect();
        assert_eq!((listed.len(), subnets.len()), (15, 15));
        let from_view: u64 = managers
            .iter()
            .map(|m| m.stats().from_view.load(Ordering::Relaxed))
            .sum();
        assert!(
            from_view >= 18,
            "allocation went through the views: {from_view}"
        );
    }

    /// A burst on one controller with room to spare is decided from its view alone: no
    /// acquire lists the leases from the store.
    #[tokio::test]
    async fn a_burst_of_acquires_on_one_controller_lists_nothing() {
        let counting = Arc::new(Counting::new());
        let store: Arc<dyn Store> = counting.clone();
        LeaseManager::new(store.clone(), Keys::new("/t"))
            .set_config(CONFIG, false)
            .await
            .unwrap();
        let m = controller(store.clone()).await;
        let lists_before = counting.lists.load(Ordering::Relaxed);
        let nodes: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
        let (got, exhausted) = all_at_once(std::slice::from_ref(&m), &nodes).await;
        assert_eq!((got.len(), exhausted), (200, 0));
        assert_eq!(got.iter().collect::<HashSet<_>>().len(), 200);
        assert_eq!(
            counting.lists.load(Ordering::Relaxed),
            lists_before,
            "an acquire listed the leases"
        );
        assert_eq!(m.stats().from_listing.load(Ordering::Relaxed), 0);
        // Acquiring again hands each node its lease back, also from the view.
        for (node, subnet) in nodes.iter().zip(&got).take(20) {
            let _ = subnet;
            let again = m.acquire(&req(node)).await.unwrap();
            assert!(got.contains(&again.lease.subnet));
        }
        assert_eq!(m.stats().from_listing.load(Ordering::Relaxed), 0);
    }

    /// ListLeases looks up no etcd lease whose expiry the controller learnt when it granted
    /// or renewed it, and another controller looks each one up once, not per listing.
    #[tokio::test]
    async fn listing_looks_up_each_etcd_lease_at_most_once() {
        let counting = Arc::new(Counting::new());
        let store: Arc<dyn Store> = counting.clone();
        let m = LeaseManager::new(store.clone(), Keys::new("/t"));
        m.set_config(CONFIG, false).await.unwrap();
        for i in 0..20 {
            m.acquire(&req(&format!("n{i}"))).await.unwrap();
        }
        m.renew("n0", m.list().await.unwrap().0[0].lease.subnet)
            .await
            .ok();
        let lookups = || counting.lookups.load(Ordering::Relaxed);
        let before = lookups();
        let (listed, _) = m.list().await.unwrap();
        assert_eq!(listed.len(), 20);
        assert!(listed
            .iter()
            .all(|l| l.expires_at.is_some_and(|t| t > SystemTime::now())));
        assert_eq!(
            lookups(),
            before,
            "the granting controller looked leases up"
        );

        let other = LeaseManager::new(store.clone(), Keys::new("/t"));
        other.list().await.unwrap();
        assert_eq!(
            lookups(),
            before + 20,
            "one lookup per lease it did not know"
        );
        let (again, _) = other.list().await.unwrap();
        assert_eq!(lookups(), before + 20, "and none the second time");
        assert!(again.iter().all(|l| l.expires_at.is_some()));
    }

    /// When the acquires worked on at once fill the gate and one has waited its time, it
    /// is told to come back later (RESOURCE_EXHAUSTED with a retry pushback), and the
    /// others finish.
    #[tokio::test]
    async fn a_full_queue_answers_busy_with_a_retry_hint() {
        let counting = Arc::new(Counting {
            grants_held: Some(tokio::sync::Semaphore::new(0)),
            ..Counting::new()
        });
        let store: Arc<dyn Store> = counting.clone();
        let m = Arc::new(
            LeaseManager::new(store, Keys::new("/t"))
                .with_acquire_limits(1, Duration::from_millis(50)),
        );
        m.set_config(CONFIG, false).await.unwrap();
        let lists = counting.lists.load(Ordering::Relaxed);
        let first = {
            let m = m.clone();
            tokio::spawn(async move { m.acquire(&req("first")).await })
        };
        // The first holds the only turn once it has listed (its grant is held next).
        while counting.lists.load(Ordering::Relaxed) == lists {
            tokio::task::yield_now().await;
        }
        let e = m.acquire(&req("second")).await.unwrap_err();
        assert!(matches!(e, ControlError::Busy { .. }), "{e}");
        assert_eq!(m.stats().busy.load(Ordering::Relaxed), 1);
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.metadata().get(crate::error::RETRY_PUSHBACK).unwrap(),
            "50"
        );
        counting.grants_held.as_ref().unwrap().add_permits(10);
        first.await.unwrap().unwrap();
        m.acquire(&req("second")).await.unwrap();
    }
}
