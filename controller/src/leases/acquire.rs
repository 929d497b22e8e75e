//! Acquire: from the watch-fed view when it can settle the request (one transaction as
//! the proof), from a fresh listing otherwise; bounded concurrency and claims (see the
//! module doc of [`super`]).

use super::*;

/// Acquires worked on at once by one controller ([`LeaseManager::with_acquire_limits`]).
pub const ACQUIRE_CONCURRENCY: usize = 64;
/// How long an acquire waits for its turn before it is answered "busy, retry".
pub const ACQUIRE_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How long a subnet seen taken by another controller's write stays out of this
/// controller's picks while its view has not shown it yet.
pub(super) const FOREIGN_CLAIM: Duration = Duration::from_secs(10);

/// A subnet this controller must not pick although its view shows it free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// An acquire of this controller is creating it.
    InFlight,
    /// Created at this revision, which the view has not reached yet.
    Created(i64),
    /// Another controller created it (a create lost on it), as of this instant.
    Foreign(Instant),
}

/// What the view says an acquire should do (see "Allocation" in the module notes).
pub(super) enum Plan {
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
        subnet: IpNet,
        /// Dual stack: the IPv6 subnet, claimed too.
        subnet6: Option<Ipv6Net>,
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
pub(super) enum Fast {
    Done(Box<Acquired>, LeaseId),
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

impl LeaseManager {
    /// The etcd lease of this acquire: granted on first use, reused by its later
    /// attempts (and revoked by the caller when it ends up unused).
    pub(super) async fn grant_once(
        &self,
        config: &NetworkConfig,
        granted: &mut Option<LeaseId>,
    ) -> Result<LeaseId, ControlError> {
        if let Some(id) = *granted {
            return Ok(id);
        }
        let id = self.store.grant(config.lease_ttl).await?;
        *granted = Some(id);
        Ok(id)
    }

    /// Gives `req.node` a lease: its existing one (refreshed), its reservation, its
    /// preferred subnet if free, or a random free subnet.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Acquired, ControlError> {
        validate_node_name(&req.node)?;
        if req.public_ip.is_none() && req.public_ipv6.is_none() {
            return Err(LeaseError::NoPublicIp.into());
        }
        if let Some(ip) = req.public_ip {
            validate_public_ip(ip)?;
        }
        if let Some(ip) = req.public_ipv6 {
            validate_public_ipv6(ip)?;
        }
        validate_backend_data(&req.data, req.public_ip, req.public_ipv6)?;
        let started = Instant::now();
        let _turn = self.turn().await?;
        let config = match self.view_config() {
            Some(config) => config,
            None => self.config().await?,
        };
        check_public_ips(&config, req.public_ip, req.public_ipv6)?;
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
    pub(super) fn own_lease<'a>(
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
    pub(super) fn check_mac(
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
    pub(super) async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ControlError> {
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
    pub(super) fn view_config(&self) -> Option<NetworkConfig> {
        let state = self.view.read().expect("view lock");
        let config = state.view.config().filter(|_| state.synced)?.clone();
        *self.last_config.write().expect("config lock") = Some(config.clone());
        Some(config)
    }

    /// Records when etcd lease `id` expires, as just learnt (`ttl` from now).
    pub(super) fn note_expiry(&self, id: LeaseId, ttl: Duration) {
        if id != 0 {
            let at = SystemTime::now() + ttl;
            self.expiry.lock().expect("expiry lock").insert(id, at);
        }
    }

    /// Decides from the view first, then (when the view cannot) from a listing.
    pub(super) async fn acquire_attempts(
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
                    subnet6,
                    node_index,
                    mac_index,
                    config_revision,
                } => {
                    let claim = ClaimGuard {
                        manager: self,
                        subnet,
                        subnet6,
                        done: false,
                    };
                    let plan = (claim, node_index, mac_index, config_revision);
                    match self.create_from_view(req, &config, plan, granted).await {
                        Ok(Fast::Done(acquired, id)) => {
                            self.stats.from_view.fetch_add(1, Ordering::Relaxed);
                            return Ok((*acquired, id));
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
    pub(super) fn plan(&self, req: &AcquireRequest, config: &NetworkConfig) -> Plan {
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
            let others = mine.iter().any(|d| d.key != keep.key && !is_reserved(d));
            // A second lease to release, a lease that no longer fits, a MAC to refuse:
            // decided from a listing.
            if others
                || !keeps_entry(config, keep)
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
        let range = config.key_pool().range();
        let mut claims = self.claims.lock().expect("claims lock");
        let now = Instant::now();
        claims.retain(|s, c| keep_claim(*c, *s, state.revision, view) && !foreign_expired(*c, now));
        let taken = |s: IpNet| view.is_taken(s) || claims.contains_key(&s);
        let preferred = req.preferred.filter(|p| range.contains(*p) && !taken(*p));
        let picked = preferred.or_else(|| range.pick_free_by(taken, &mut rand::rng()));
        // Dual stack: an IPv6 subnet too, free by its index key and this controller's claims.
        let picked6 = match config.ipv6.filter(|_| config.is_dual_stack()) {
            None => Some(None),
            Some(pool6) => {
                let range6 = pool6.range();
                let preferred6 = req
                    .preferred6
                    .map(IpNet::V6)
                    .filter(|p| range6.contains(*p) && !taken(*p));
                preferred6
                    .or_else(|| range6.pick_free_by(taken, &mut rand::rng()))
                    .map(|s| Some(as_v6(s)))
            }
        };
        let (Some(subnet), Some(subnet6)) = (picked, picked6) else {
            return if claims.values().any(|c| *c == Claim::InFlight) {
                Plan::Wait
            } else {
                Plan::Full
            };
        };
        claims.insert(subnet, Claim::InFlight);
        if let Some(s6) = subnet6 {
            claims.insert(IpNet::V6(s6), Claim::InFlight);
        }
        Plan::Create {
            subnet,
            subnet6,
            node_index,
            mac_index,
            config_revision: view.config_mod_revision(),
        }
    }

    /// Ends the claim of an acquire on `subnet`: created at a revision, or given up.
    pub(super) fn end_claim(&self, subnet: IpNet, subnet6: Option<Ipv6Net>, outcome: Option<Claim>) {
        {
            let mut claims = self.claims.lock().expect("claims lock");
            for s in std::iter::once(subnet).chain(subnet6.map(IpNet::V6)) {
                match outcome {
                    Some(c) => claims.insert(s, c),
                    None => claims.remove(&s),
                };
            }
        }
        self.claim_ended.notify_waiters();
    }
}

/// An in-flight claim, given up when dropped without an outcome (the acquire failed, or
/// its caller went away mid-way).
pub(super) struct ClaimGuard<'a> {
    manager: &'a LeaseManager,
    subnet: IpNet,
    subnet6: Option<Ipv6Net>,
    done: bool,
}

impl ClaimGuard<'_> {
    pub(super) fn end(mut self, outcome: Option<Claim>) {
        self.done = true;
        self.manager.end_claim(self.subnet, self.subnet6, outcome);
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.manager.end_claim(self.subnet, self.subnet6, None);
        }
    }
}

impl LeaseManager {
    /// Creates the subnet the view picked, in one transaction that proves the view right:
    /// the key is absent, the node's and the MAC's index keys and the config are as the
    /// view shows them.
    pub(super) async fn create_from_view(
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
        let (subnet, subnet6) = (claim.subnet, claim.subnet6);
        let lease_id = self.grant_once(config, granted).await?;
        let record = new_record(req, subnet6);
        let key = self.keys.lease(subnet);
        let node_index_key = self.keys.node_index(&req.node);
        let mut txn = Txn::default();
        txn.absent(&key);
        txn.put(&key, record.encode(), lease_id);
        let index6 = subnet6.map(|s6| self.keys.ipv6_index(s6));
        if let Some(k) = &index6 {
            txn.absent(k);
            txn.put(k, subnet_key(subnet).into_bytes(), lease_id);
        }
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
                    Box::new(Acquired {
                        lease: Lease { subnet, record },
                        config: config.clone(),
                        ttl: Some(config.lease_ttl),
                    }),
                    lease_id,
                ))
            }
            Ok(Written::Conflict) => {
                // Who moved? If the subnet's key exists, another controller took it: pick
                // another. Otherwise the node, the MAC or the config changed: a listing
                // decides.
                let index6_taken = match &index6 {
                    Some(k) => self.store.get(k).await?.is_some(),
                    None => false,
                };
                if index6_taken || self.store.get(&key).await?.is_some() {
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
    pub(super) async fn listing_attempts(
        &self,
        req: &AcquireRequest,
        config: &NetworkConfig,
        granted: &mut Option<LeaseId>,
    ) -> Result<(Acquired, LeaseId), ControlError> {
        let range = config.key_pool().range();
        let range6 = config.ipv6.filter(|_| config.is_dual_stack()).map(|p| p.range());
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
                if !keeps_entry(config, keep) {
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
            let picked6 = match range6 {
                None => Some(None),
                Some(range6) => {
                    let taken6 = self.taken_ipv6(&listing).await?;
                    let preferred6 = req
                        .preferred6
                        .map(IpNet::V6)
                        .filter(|p| range6.contains(*p) && !taken6.contains(p));
                    preferred6
                        .or_else(|| range6.pick_free(&taken6, &mut rand::rng()))
                        .map(|s| Some(as_v6(s)))
                }
            };
            let picked = preferred.or_else(|| range.pick_free(&taken, &mut rand::rng()));
            let (Some(subnet), Some(subnet6)) = (picked, picked6) else {
                let mut full_at = self.full_at.lock().expect("full lock");
                *full_at = Some(full_at.map_or(listed_at, |t| t.max(listed_at)));
                return Err(exhausted(config));
            };
            let lease_id = self.grant_once(config, granted).await?;
            let record = new_record(req, subnet6);
            let key = self.keys.lease(subnet);
            let mut txn = Txn::default();
            txn.absent(&key);
            txn.put(&key, record.encode(), lease_id);
            if let Some(s6) = subnet6 {
                let k = self.keys.ipv6_index(s6);
                txn.absent(&k);
                txn.put(&k, subnet_key(subnet).into_bytes(), lease_id);
            }
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
    pub(super) async fn refresh(
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
            public_ipv6: req.public_ipv6,
            ipv6_subnet: None,
            backend: req.backend,
            backend_data: req.data.clone(),
            reserved,
            created_at: now,
            renewed_at: now,
        });
        record.public_ip = req.public_ip;
        record.public_ipv6 = req.public_ipv6;
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
        // The IPv6 subnet's index key, written when missing (a lease from before it).
        if let Some(s6) = record.ipv6_subnet.filter(|_| subnet.addr().is_ipv4()) {
            let key = self.keys.ipv6_index(s6);
            let index = self.get_index(&key).await?;
            if !names(index.as_ref(), subnet, lease_id) {
                txn.unchanged(&key, index.as_ref());
                txn.put(&key, subnet_key(subnet).into_bytes(), lease_id);
            }
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
}

pub(super) fn exhausted(config: &NetworkConfig) -> ControlError {
    let pools: Vec<_> = config.pools().collect();
    ControlError::Exhausted {
        total: pools
            .iter()
            .map(|p| p.range().len().min(u64::MAX as u128) as u64)
            .min()
            .unwrap_or(0),
        range: pools
            .iter()
            .map(|p| format!("{}-{}", p.subnet_min, p.subnet_max))
            .collect::<Vec<_>>()
            .join(" and "),
    }
}

impl LeaseManager {
    /// The IPv6 subnets of a dual-stack cluster that are taken: named by a readable lease
    /// of the listing, or by an index key (which also covers unreadable values).
    pub(super) async fn taken_ipv6(&self, listing: &Listing) -> Result<HashSet<IpNet>, ControlError> {
        let mut taken: HashSet<IpNet> = listing
            .entries
            .iter()
            .filter_map(|e| e.lease()?.record.ipv6_subnet.map(IpNet::V6))
            .collect();
        let prefix = self.keys.ipv6_index_prefix();
        let (indexes, _) = self.store.list(&prefix).await?;
        taken.extend(indexes.iter().filter_map(|kv| {
            overlay_core::subnet::parse_subnet_key(kv.key.strip_prefix(&prefix)?)
        }));
        Ok(taken)
    }
}

/// The IPv6 half of a subnet picked from an IPv6 range.
pub(super) fn as_v6(s: IpNet) -> Ipv6Net {
    match s {
        IpNet::V6(n) => n,
        IpNet::V4(_) => unreachable!("picked from an IPv6 range"),
    }
}

/// Whether a stored key may stay under `config`: by its lease when readable (both
/// families), by its key subnet otherwise.
pub(super) fn keeps_entry(config: &NetworkConfig, e: &Entry) -> bool {
    match e.lease() {
        Some(l) => config.keeps_lease(l.subnet, l.record.ipv6_subnet, l.record.reserved),
        None => e
            .subnet
            .is_some_and(|s| config.keeps_key(s, is_reserved(e))),
    }
}

/// Refuses a public address inside one of the cluster's networks.
pub(super) fn check_public_ips(
    config: &NetworkConfig,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
) -> Result<(), ControlError> {
    for ip in [public_ip.map(IpAddr::V4), public_ipv6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
    {
        if let Some(network) = config.networks().into_iter().find(|n| n.contains(&ip)) {
            return Err(LeaseError::PublicIpInOverlay { ip, network }.into());
        }
    }
    Ok(())
}

/// Whether a claim still matters once the view is complete up to `revision`.
pub(super) fn keep_claim(c: Claim, subnet: IpNet, revision: i64, view: &LeaseView) -> bool {
    match c {
        Claim::InFlight => true,
        Claim::Created(at) => at > revision,
        Claim::Foreign(_) => !view.is_taken(subnet),
    }
}

pub(super) fn foreign_expired(c: Claim, now: Instant) -> bool {
    matches!(c, Claim::Foreign(at) if now.duration_since(at) > FOREIGN_CLAIM)
}

/// The value of a new dynamic lease for `req`.
pub(super) fn new_record(req: &AcquireRequest, ipv6_subnet: Option<Ipv6Net>) -> LeaseRecord {
    let now = now_millis();
    LeaseRecord {
        node: req.node.clone(),
        public_ip: req.public_ip,
        public_ipv6: req.public_ipv6,
        ipv6_subnet,
        backend: req.backend,
        backend_data: req.data.clone(),
        reserved: false,
        created_at: now,
        renewed_at: now,
    }
}
