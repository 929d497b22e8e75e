//! The rest of a lease's life: renew, release, list, config changes, reserve and revoke.

use super::*;

impl LeaseManager {
    pub(super) async fn get_entry(&self, subnet: IpNet) -> Result<Option<Entry>, ControlError> {
        Ok(self
            .store
            .get(&self.keys.lease(subnet))
            .await?
            .map(|kv| read_key(&self.keys, &kv)))
    }

    /// Deletes a lease key, if it is still as read, with the index keys that name it, in
    /// one transaction; then revokes its etcd lease (so that none is left without keys).
    /// `false` when the key changed or went meanwhile: then nothing is deleted or revoked.
    pub(super) async fn delete_entry(&self, e: &Entry) -> Result<bool, ControlError> {
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
            index_keys.extend(lease.record.ipv6_subnet.map(|s6| self.keys.ipv6_index(s6)));
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
    pub(super) async fn proven_owner(&self, e: &Entry, node: &str) -> Result<bool, ControlError> {
        let index = self.get_index(&self.keys.node_index(node)).await?;
        Ok(index.is_some_and(|kv| self.keys.indexed_lease(&kv) == e.key && kv.lease == e.lease_id))
    }

    /// The readable lease of `e`, or the error that says why a node cannot act on it.
    pub(super) async fn readable<'a>(
        &self,
        e: &'a Entry,
        node: &str,
    ) -> Result<&'a Lease, ControlError> {
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
        subnet: IpNet,
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
    pub async fn release(&self, node: &str, subnet: IpNet) -> Result<(), ControlError> {
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
            .filter(|(_, l)| !config.keeps_lease(l.subnet, l.record.ipv6_subnet, l.record.reserved))
            .copied()
            .collect();
        if !misfits.is_empty() && !force {
            let names: Vec<String> = misfits
                .iter()
                .take(5)
                .map(|(_, l)| format!("{} ({})", l.subnets_text(), l.record.node))
                .collect();
            let families = if stored.first().is_some_and(|(_, l)| {
                config.keeps_key(l.subnet, l.record.reserved)
                    && l.record.ipv6_subnet.is_some() != config.is_dual_stack()
            }) {
                " (the new config changes the address families)"
            } else {
                ""
            };
            return Err(ControlError::FailedPrecondition(format!(
                "{} existing lease(s) would not fit the new config{families}: {}{}; pass --force to revoke them",
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

    /// Reserves `subnet` (and in a dual-stack cluster `subnet6`) for `node`: a lease
    /// without expiry. The node's dynamic lease elsewhere, if any, is deleted in the same
    /// transaction (one lease per node); its agent then finds its lease gone and acquires
    /// the reservation.
    pub async fn reserve(&self, req: &Reservation) -> Result<Lease, ControlError> {
        let Reservation {
            subnet,
            subnet6,
            ref node,
            public_ip,
            public_ipv6,
        } = *req;
        let node = node.as_str();
        validate_node_name(node)?;
        if public_ip.is_none() && public_ipv6.is_none() {
            return Err(LeaseError::NoPublicIp.into());
        }
        if let Some(ip) = public_ip {
            validate_public_ip(ip)?;
        }
        if let Some(ip) = public_ipv6 {
            validate_public_ipv6(ip)?;
        }
        let config = self.config().await?;
        let pool = config.key_pool();
        if overlay_core::config::Family::of(&subnet) != pool.family() {
            return Err(ControlError::InvalidArgument(format!(
                "subnet {subnet} is an {} subnet, but the cluster's leases are keyed by {} subnets ({}); give an {} subnet",
                overlay_core::config::Family::of(&subnet),
                pool.family(),
                pool.network,
                pool.family()
            )));
        }
        if !pool.is_network_subnet(subnet) {
            return Err(ControlError::InvalidArgument(format!(
                "subnet {subnet} is not one of the network's subnets (a /{} inside {})",
                pool.subnet_len, pool.network
            )));
        }
        match (config.is_dual_stack(), subnet6) {
            (true, None) => {
                return Err(ControlError::InvalidArgument(format!(
                    "the cluster is dual-stack: reserve an IPv6 subnet of {} with the IPv4 subnet (--ipv6-subnet)",
                    config.ipv6_network().expect("dual stack")
                )))
            }
            (false, Some(s6)) => {
                return Err(ControlError::InvalidArgument(format!(
                    "the cluster is not dual-stack ({}): an IPv6 subnet ({s6}) cannot be reserved beside the key subnet",
                    config.networks_text()
                )))
            }
            (true, Some(s6)) => {
                let pool6 = config.ipv6.expect("dual stack");
                if !pool6.is_network_subnet(s6) {
                    return Err(ControlError::InvalidArgument(format!(
                        "IPv6 subnet {s6} is not one of the network's subnets (a /{} inside {})",
                        pool6.subnet_len, pool6.network
                    )));
                }
            }
            (false, None) => {}
        }
        check_public_ips(&config, public_ip, public_ipv6)?;
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
                        record.public_ipv6 = public_ipv6;
                        record.ipv6_subnet = subnet6;
                        record.renewed_at = now;
                        if let Some(old6) = l.record.ipv6_subnet.filter(|o| Some(*o) != subnet6) {
                            let k = self.keys.ipv6_index(old6);
                            let index = self.get_index(&k).await?;
                            if names(index.as_ref(), subnet, e.lease_id) {
                                txn.unchanged(&k, index.as_ref());
                                txn.delete(&k);
                            }
                        }
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
                        public_ipv6,
                        ipv6_subnet: subnet6,
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
                let index_keys = [
                    lease.record.backend_data.vtep_mac.map(|m| self.keys.mac_index(m)),
                    lease.record.ipv6_subnet.map(|s6| self.keys.ipv6_index(s6)),
                ];
                for k in index_keys.into_iter().flatten() {
                    let index = self.get_index(&k).await?;
                    if names(index.as_ref(), d_subnet, d.lease_id) && !txn.writes.contains_key(&k) {
                        txn.unchanged(&k, index.as_ref());
                        txn.delete(&k);
                    }
                }
            }
            // The reserved IPv6 subnet: free, or this node's already (its index key is
            // then moved to the reservation).
            if let Some(s6) = subnet6 {
                let k = self.keys.ipv6_index(s6);
                let index = self.get_index(&k).await?;
                let holder = listing.entries.iter().find(|o| {
                    o.lease().is_some_and(|l| l.record.ipv6_subnet == Some(s6))
                });
                match holder.and_then(|o| o.lease()) {
                    Some(l) if l.record.node != node => {
                        return Err(ControlError::FailedPrecondition(format!(
                            "IPv6 subnet {s6} is leased to node {} (with {}); revoke it first",
                            l.record.node, l.subnet
                        )));
                    }
                    Some(_) => {}
                    None if index.is_some() => {
                        return Err(ControlError::FailedPrecondition(format!(
                            "IPv6 subnet {s6} is held by {} (an unreadable lease); revoke it first",
                            String::from_utf8_lossy(&index.as_ref().expect("some").value)
                        )));
                    }
                    None => {}
                }
                txn.unchanged(&k, index.as_ref());
                txn.put(&k, subnet_key(subnet).into_bytes(), 0);
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
    pub async fn revoke(&self, subnet: IpNet) -> Result<Option<Lease>, ControlError> {
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

pub(super) fn check_holder(lease: &Lease, node: &str) -> Result<(), ControlError> {
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
