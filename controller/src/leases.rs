//! Lease management on top of a [`Store`]: acquire, renew, release, reserve, revoke, and
//! config changes.
//!
//! Correctness never depends on this process's memory: every decision is re-read from the
//! store and committed with a compare-and-set, so any number of controllers can serve one
//! etcd at once. Two nodes can never hold one subnet because a lease key is only ever
//! *created* with "create if absent"; a lost race simply re-lists and picks again.
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
//!   orphaned etcd lease is left behind.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt};
use ipnet::Ipv4Net;
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{
    now_millis, validate_backend_data, validate_node_name, validate_public_ip, BackendData, Lease,
    LeaseError, LeaseRecord,
};
use overlay_core::subnet::{parse_subnet_key, subnet_key};
use overlay_core::BackendType;
use tracing::{info, warn};

use crate::error::ControlError;
use crate::store::{KeyValue, LeaseId, Store, StoreError, Written};

/// How often an allocation re-lists and retries after losing a race.
const MAX_ATTEMPTS: u32 = 16;

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

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn leases(&self) -> String {
        format!("{}/leases/", self.prefix)
    }

    pub fn lease(&self, subnet: Ipv4Net) -> String {
        format!("{}/leases/{}", self.prefix, subnet_key(subnet))
    }

    /// The subnet of a lease key, if it is one.
    pub fn subnet_of(&self, key: &str) -> Option<Ipv4Net> {
        key.strip_prefix(&self.leases()).and_then(parse_subnet_key)
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

/// A stored lease with the store metadata needed for compare-and-set.
#[derive(Debug, Clone)]
struct Stored {
    lease: Lease,
    kv: KeyValue,
}

pub struct LeaseManager {
    store: Arc<dyn Store>,
    keys: Keys,
    /// The config as last read, for metrics (never for decisions: those re-read it).
    last_config: std::sync::RwLock<Option<NetworkConfig>>,
}

impl LeaseManager {
    pub fn new(store: Arc<dyn Store>, keys: Keys) -> Self {
        LeaseManager {
            store,
            keys,
            last_config: Default::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
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

    /// Decodes a lease key-value; `None` (with a warning) for keys that are not leases.
    pub fn decode(&self, kv: &KeyValue) -> Option<Lease> {
        let subnet = self.keys.subnet_of(&kv.key)?;
        match LeaseRecord::decode(&kv.value) {
            Ok(record) => Some(Lease { subnet, record }),
            Err(e) => {
                warn!(key = %kv.key, error = %e, "ignoring unreadable lease value");
                None
            }
        }
    }

    /// Every lease key, decoded, and the set of subnets taken (unreadable keys included:
    /// a subnet whose key exists is never handed out again, even if we cannot read it).
    async fn list_stored(&self) -> Result<(Vec<Stored>, HashSet<Ipv4Net>), ControlError> {
        let (kvs, _rev) = self.store.list(&self.keys.leases()).await?;
        let mut taken = HashSet::new();
        let mut stored = Vec::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(subnet) = self.keys.subnet_of(&kv.key) {
                taken.insert(subnet);
            }
            if let Some(lease) = self.decode(&kv) {
                stored.push(Stored { lease, kv });
            }
        }
        Ok((stored, taken))
    }

    /// Gives `req.node` a lease: its existing one (refreshed), its reservation, its
    /// preferred subnet if free, or a random free subnet.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Acquired, ControlError> {
        validate_node_name(&req.node)?;
        validate_public_ip(req.public_ip)?;
        validate_backend_data(&req.data, req.public_ip)?;
        let config = self.config().await?;
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
        let result = self.acquire_attempts(req, &config, &mut granted).await;
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

    async fn acquire_attempts(
        &self,
        req: &AcquireRequest,
        config: &NetworkConfig,
        granted: &mut Option<LeaseId>,
    ) -> Result<(Acquired, LeaseId), ControlError> {
        let range = config.range();
        for attempt in 1..=MAX_ATTEMPTS {
            let (stored, taken) = self.list_stored().await?;
            let mut own: Vec<&Stored> = stored
                .iter()
                .filter(|s| s.lease.record.node == req.node)
                .collect();
            // Reservations first, then the oldest lease.
            own.sort_by_key(|s| (!s.lease.record.reserved, s.kv.create_revision));
            if let Some((keep, extra)) = own.split_first() {
                if !config.keeps(keep.lease.subnet, keep.lease.record.reserved) {
                    info!(node = %req.node, subnet = %keep.lease.subnet, "lease no longer fits the config; replacing it");
                    self.delete_stored(keep).await?;
                    continue;
                }
                for dup in extra.iter().filter(|d| !d.lease.record.reserved) {
                    warn!(node = %req.node, subnet = %dup.lease.subnet, "node holds a second lease; releasing it");
                    self.delete_stored(dup).await?;
                }
                match self.refresh(keep, req, config).await? {
                    Some(acquired) => return Ok((acquired, keep.kv.lease)),
                    None => continue,
                }
            }
            let preferred = req
                .preferred
                .filter(|p| range.contains(*p) && !taken.contains(p));
            let Some(subnet) = preferred.or_else(|| range.pick_free(&taken, &mut rand::rng()))
            else {
                return Err(ControlError::Exhausted {
                    total: range.len(),
                    range: format!("{}-{}", config.subnet_min, config.subnet_max),
                });
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
            match self
                .store
                .create(&self.keys.lease(subnet), record.encode(), lease_id)
                .await
            {
                Ok(Written::Yes(_)) => {
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

    /// Hands a node its existing lease back, updating what peers need to know. `None`
    /// when the stored state changed meanwhile (the caller re-lists).
    async fn refresh(
        &self,
        s: &Stored,
        req: &AcquireRequest,
        config: &NetworkConfig,
    ) -> Result<Option<Acquired>, ControlError> {
        let mut record = s.lease.record.clone();
        record.public_ip = req.public_ip;
        record.backend = req.backend;
        record.backend_data = req.data.clone();
        let changed = record != s.lease.record;
        let ttl = if record.reserved {
            None
        } else {
            match self.store.keep_alive(s.kv.lease).await {
                Ok(ttl) => Some(ttl),
                // Expired this very moment: the key is going away; re-list.
                Err(StoreError::LeaseNotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        };
        if changed {
            record.renewed_at = now_millis();
            let lease_id = if record.reserved { 0 } else { s.kv.lease };
            match self
                .store
                .update(&s.kv.key, record.encode(), s.kv.mod_revision, lease_id)
                .await
            {
                Ok(Written::Yes(_)) => {}
                Ok(Written::Conflict) | Err(StoreError::LeaseNotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            info!(node = %req.node, subnet = %s.lease.subnet, "updated the node's lease");
        } else {
            info!(node = %req.node, subnet = %s.lease.subnet, "node took its lease back");
        }
        Ok(Some(Acquired {
            lease: Lease {
                subnet: s.lease.subnet,
                record,
            },
            config: config.clone(),
            ttl,
        }))
    }

    async fn get_stored(&self, subnet: Ipv4Net) -> Result<Option<Stored>, ControlError> {
        let Some(kv) = self.store.get(&self.keys.lease(subnet)).await? else {
            return Ok(None);
        };
        Ok(self.decode(&kv).map(|lease| Stored { lease, kv }))
    }

    async fn delete_stored(&self, s: &Stored) -> Result<bool, ControlError> {
        let deleted = self
            .store
            .delete(&s.kv.key, Some(s.kv.mod_revision))
            .await?
            .ok();
        if s.kv.lease != 0 {
            if let Err(e) = self.store.revoke(s.kv.lease).await {
                warn!(lease = s.kv.lease, error = %e, "could not revoke the etcd lease of a deleted key");
            }
        }
        Ok(deleted)
    }

    /// Keeps `node`'s lease of `subnet` alive. `NotFound` when it expired or was revoked:
    /// the agent then acquires again, preferring the same subnet.
    pub async fn renew(
        &self,
        node: &str,
        subnet: Ipv4Net,
    ) -> Result<Option<Duration>, ControlError> {
        let s = self.get_stored(subnet).await?.ok_or_else(|| {
            ControlError::NotFound(format!("no lease for {subnet}: it expired or was revoked"))
        })?;
        check_holder(&s, node)?;
        if s.lease.record.reserved {
            return Ok(None);
        }
        match self.store.keep_alive(s.kv.lease).await {
            Ok(ttl) => Ok(Some(ttl)),
            Err(StoreError::LeaseNotFound(_)) => Err(ControlError::NotFound(format!(
                "the lease for {subnet} has expired"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives a lease up. Releasing a lease that is already gone succeeds; a reservation
    /// stays (it belongs to the operator, not the agent).
    pub async fn release(&self, node: &str, subnet: Ipv4Net) -> Result<(), ControlError> {
        let Some(s) = self.get_stored(subnet).await? else {
            return Ok(());
        };
        check_holder(&s, node)?;
        if !s.lease.record.reserved {
            self.delete_stored(&s).await?;
            info!(%node, %subnet, "lease released");
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<(Vec<ListedLease>, i64), ControlError> {
        let (kvs, revision) = self.store.list(&self.keys.leases()).await?;
        let now = now_millis();
        let decoded: Vec<(Lease, LeaseId)> = kvs
            .iter()
            .filter_map(|kv| self.decode(kv).map(|lease| (lease, kv.lease)))
            .collect();
        let store = self.store.clone();
        let lookups = decoded.into_iter().map(|(lease, id)| {
            let store = store.clone();
            async move {
                let expires_at = if id == 0 || lease.record.reserved {
                    None
                } else {
                    // A lease that vanished between the listing and now expires "now".
                    Some(store.time_to_live(id).await?.map_or(now, |ttl| now + ttl))
                };
                Ok::<_, StoreError>(ListedLease { lease, expires_at })
            }
        });
        let listed: Vec<ListedLease> = stream::iter(lookups)
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok((listed, revision))
    }

    /// Stores a new config. Leases that no longer fit are refused unless `force`, which
    /// revokes them (their agents then acquire a subnet that fits).
    pub async fn set_config(
        &self,
        json: &str,
        force: bool,
    ) -> Result<(NetworkConfig, Vec<Lease>), ControlError> {
        let config = NetworkConfig::from_json(json)?;
        let (stored, _) = self.list_stored().await?;
        let misfits: Vec<&Stored> = stored
            .iter()
            .filter(|s| !config.keeps(s.lease.subnet, s.lease.record.reserved))
            .collect();
        if !misfits.is_empty() && !force {
            let names: Vec<String> = misfits
                .iter()
                .take(5)
                .map(|s| format!("{} ({})", s.lease.subnet, s.lease.record.node))
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
        for s in misfits {
            if self.delete_stored(s).await? {
                revoked.push(s.lease.clone());
            }
        }
        Ok((config, revoked))
    }

    /// Reserves `subnet` for `node`: a lease without expiry.
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
        for _ in 0..MAX_ATTEMPTS {
            let (stored, _) = self.list_stored().await?;
            if let Some(other) = stored.iter().find(|s| {
                s.lease.record.node == node && s.lease.record.reserved && s.lease.subnet != subnet
            }) {
                return Err(ControlError::FailedPrecondition(format!(
                    "node {node} already has a reservation for {}; revoke it first",
                    other.lease.subnet
                )));
            }
            let existing = stored.iter().find(|s| s.lease.subnet == subnet);
            let now = now_millis();
            let written = match existing {
                Some(s) if s.lease.record.node != node => {
                    return Err(ControlError::FailedPrecondition(format!(
                        "{subnet} is leased to node {}; revoke it first",
                        s.lease.record.node
                    )));
                }
                Some(s) => {
                    // The node holds this subnet already: pin it (detach from its etcd lease).
                    let mut record = s.lease.record.clone();
                    record.reserved = true;
                    record.public_ip = public_ip;
                    record.renewed_at = now;
                    let w = self
                        .store
                        .update(&s.kv.key, record.encode(), s.kv.mod_revision, 0)
                        .await?;
                    if w.ok() && s.kv.lease != 0 {
                        let _ = self.store.revoke(s.kv.lease).await;
                    }
                    w.ok().then_some(record)
                }
                None => {
                    let record = LeaseRecord {
                        node: node.to_string(),
                        public_ip,
                        backend: config.backend.kind,
                        backend_data: BackendData::default(),
                        reserved: true,
                        created_at: now,
                        renewed_at: now,
                    };
                    self.store
                        .create(&self.keys.lease(subnet), record.encode(), 0)
                        .await?
                        .ok()
                        .then_some(record)
                }
            };
            if let Some(record) = written {
                info!(%subnet, %node, "subnet reserved");
                return Ok(Lease { subnet, record });
            }
        }
        Err(ControlError::Contention(MAX_ATTEMPTS))
    }

    /// Deletes a lease or reservation at once.
    pub async fn revoke(&self, subnet: Ipv4Net) -> Result<Lease, ControlError> {
        for _ in 0..MAX_ATTEMPTS {
            let s = self
                .get_stored(subnet)
                .await?
                .ok_or_else(|| ControlError::NotFound(format!("no lease for {subnet}")))?;
            if self.delete_stored(&s).await? {
                info!(%subnet, node = %s.lease.record.node, "lease revoked");
                return Ok(s.lease);
            }
        }
        Err(ControlError::Contention(MAX_ATTEMPTS))
    }
}

fn check_holder(s: &Stored, node: &str) -> Result<(), ControlError> {
    if s.lease.record.node == node {
        Ok(())
    } else {
        Err(ControlError::NotHolder {
            node: node.to_string(),
            subnet: s.lease.subnet.to_string(),
            holder: s.lease.record.node.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

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
}
