//! An in-memory control plane for tests of the agent's loop (feature `testing`): leases in
//! a [`LeaseCache`] with revisions, a watch that snapshots or replays like the controller's,
//! and switches for the failures the loop must survive (controller unreachable, a watch
//! that breaks, a lease revoked behind the agent's back).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use ipnet::{IpNet, Ipv6Net};
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{now_millis, Lease, LeaseRecord};
use overlay_core::watch::{LeaseCache, LeaseEvent, Replay};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;

use super::{ControlPlane, ControlPlaneError, Granted, LeaseRequest, PeerStream, PeerUpdate};

/// What the agent asked of the fake, for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calls {
    pub config: usize,
    pub acquire: Vec<LeaseRequest>,
    pub renew: usize,
    /// The `after_revision` of every watch call, in order.
    pub watch: Vec<i64>,
}

struct Inner {
    config: NetworkConfig,
    cache: LeaseCache,
    ttl: Duration,
    unavailable: bool,
    calls: Calls,
}

pub struct FakeControlPlane {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<LeaseEvent>>,
    /// Bumped by [`FakeControlPlane::break_watches`]: every open stream ends.
    generation: watch::Sender<u64>,
}

impl FakeControlPlane {
    /// A control plane serving `config`, granting leases with a 30 s TTL.
    pub fn new(config: NetworkConfig) -> Arc<Self> {
        Arc::new(FakeControlPlane {
            inner: Mutex::new(Inner {
                config,
                cache: LeaseCache::new(1000),
                ttl: Duration::from_secs(30),
                unavailable: false,
                calls: Calls::default(),
            }),
            events: broadcast::channel(1024).0,
            generation: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake control plane")
    }

    /// The TTL of leases granted or renewed from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        self.lock().ttl = ttl;
    }

    pub fn set_config(&self, config: NetworkConfig) {
        self.lock().config = config;
    }

    /// While set, every call fails as if no controller answered.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    pub fn calls(&self) -> Calls {
        self.lock().calls.clone()
    }

    pub fn revision(&self) -> i64 {
        self.lock().cache.revision()
    }

    pub fn leases(&self) -> BTreeMap<IpNet, Lease> {
        self.lock()
            .cache
            .leases()
            .map(|l| (l.subnet, l.clone()))
            .collect()
    }

    /// The lease `node` holds, if any.
    pub fn lease_of(&self, node: &str) -> Option<Lease> {
        self.lock()
            .cache
            .leases()
            .find(|l| l.node() == node)
            .cloned()
    }

    /// Adds or replaces a lease (another host joining), as one event.
    pub fn put(&self, lease: Lease) {
        let mut inner = self.lock();
        let rev = inner.cache.revision() + 1;
        if let Some(e) = inner.cache.put(lease, rev) {
            let _ = self.events.send(e);
        }
    }

    /// Removes a lease (revoked or expired), as one event.
    pub fn remove(&self, subnet: IpNet) {
        let mut inner = self.lock();
        let rev = inner.cache.revision() + 1;
        if let Some(e) = inner.cache.remove(&subnet, rev) {
            let _ = self.events.send(e);
        }
    }

    /// Ends every open watch stream (a controller restart, a network blip).
    pub fn break_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, Inner>, ControlPlaneError> {
        let inner = self.lock();
        if inner.unavailable {
            return Err(ControlPlaneError::Unavailable(
                "cannot reach any controller (fake)".into(),
            ));
        }
        Ok(inner)
    }
}

#[async_trait]
impl ControlPlane for FakeControlPlane {
    async fn config(&self) -> Result<NetworkConfig, ControlPlaneError> {
        let mut inner = self.check()?;
        inner.calls.config += 1;
        Ok(inner.config.clone())
    }

    async fn acquire(&self, r: &LeaseRequest) -> Result<Granted, ControlPlaneError> {
        let mut inner = self.check()?;
        inner.calls.acquire.push(r.clone());
        let ttl = inner.ttl;
        let existing = inner
            .cache
            .leases()
            .find(|l| l.node() == r.node)
            .map(|l| l.subnet);
        let taken: Vec<IpNet> = inner.cache.leases().map(|l| l.subnet).collect();
        let range = inner.config.key_pool().range();
        let subnet = match existing {
            Some(s) => s,
            None => match r.preferred.filter(|p| !taken.contains(p)) {
                Some(p) => p,
                None => range
                    .iter()
                    .find(|s| !taken.contains(s))
                    .ok_or_else(|| ControlPlaneError::Refused("subnet range exhausted".into()))?,
            },
        };
        // Dual stack: the node's IPv6 subnet, or the first free one.
        let ipv6_subnet = match inner.config.ipv6.filter(|_| inner.config.is_dual_stack()) {
            None => None,
            Some(pool) => {
                let mine = inner
                    .cache
                    .leases()
                    .find(|l| l.node() == r.node)
                    .and_then(|l| l.record.ipv6_subnet);
                let taken6: Vec<Ipv6Net> =
                    inner.cache.leases().filter_map(|l| l.record.ipv6_subnet).collect();
                let free = pool.range().iter().find_map(|s| match s {
                    IpNet::V6(s6) if !taken6.contains(&s6) => Some(s6),
                    _ => None,
                });
                Some(mine.or(free).ok_or_else(|| {
                    ControlPlaneError::Refused("IPv6 subnet range exhausted".into())
                })?)
            }
        };
        let lease = Lease {
            subnet,
            record: LeaseRecord {
                node: r.node.clone(),
                public_ip: r.public_ip,
                public_ipv6: r.public_ipv6,
                ipv6_subnet,
                backend: r.backend,
                backend_data: r.data.clone(),
                reserved: false,
                created_at: now_millis(),
                renewed_at: now_millis(),
            },
        };
        let rev = inner.cache.revision() + 1;
        if let Some(e) = inner.cache.put(lease.clone(), rev) {
            let _ = self.events.send(e);
        }
        Ok(Granted { lease, ttl })
    }

    async fn renew(&self, node: &str, subnet: IpNet) -> Result<Duration, ControlPlaneError> {
        let mut inner = self.check()?;
        inner.calls.renew += 1;
        match inner.cache.get(&subnet) {
            Some(l) if l.node() == node => Ok(inner.ttl),
            _ => Err(ControlPlaneError::LeaseGone(format!(
                "no lease of {node} for {subnet}"
            ))),
        }
    }

    async fn watch(&self, after_revision: i64) -> Result<PeerStream, ControlPlaneError> {
        let (first, rx, from) = {
            let mut inner = self.check()?;
            inner.calls.watch.push(after_revision);
            // Subscribed under the lock: no event falls between the first part and the rest.
            let rx = self.events.subscribe();
            let snapshot = || {
                let (revision, leases) = inner.cache.snapshot();
                vec![PeerUpdate::Snapshot { leases, revision }]
            };
            let first = match after_revision {
                0 => snapshot(),
                after => match inner.cache.replay_after(after) {
                    Replay::Events(events) => events
                        .iter()
                        .map(|e| PeerUpdate::Event((**e).clone()))
                        .collect(),
                    Replay::Snapshot => snapshot(),
                },
            };
            (first, rx, inner.cache.revision())
        };
        let mut generation = self.generation.subscribe();
        generation.mark_unchanged();
        let ended = async move {
            let _ = generation.changed().await;
        };
        let live = BroadcastStream::new(rx).filter_map(move |e| {
            futures::future::ready(match e {
                Ok(e) if e.revision > from => Some(Ok(PeerUpdate::Event((*e).clone()))),
                Ok(_) => None,
                Err(lag) => Some(Err(ControlPlaneError::Unavailable(lag.to_string()))),
            })
        });
        Ok(stream::iter(first.into_iter().map(Ok))
            .chain(live)
            .take_until(ended)
            .boxed())
    }
}
