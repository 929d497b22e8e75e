//! Watch bookkeeping: the current set of leases at a revision, and a bounded history of
//! the events that led there.
//!
//! The controller keeps one [`LeaseCache`] fed by its single etcd watch and serves every
//! agent from it, so N agents cost one etcd watcher (the reason Calico built Typha). A
//! client that resumes after revision `r` is replayed the events after `r` when the history
//! still holds all of them; otherwise it gets a snapshot. A snapshot is always correct:
//! clients reconcile their whole state from it, so "too far behind" is never an error,
//! only a larger message.
//!
//! Agents use the same type to hold their view of the peers: [`LeaseCache::resync`] turns
//! a snapshot into the events that differ from what they had.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use ipnet::IpNet;

use crate::lease::Lease;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A lease appeared or changed (same subnet, new value).
    Added,
    /// A lease disappeared: revoked, released or expired.
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub revision: i64,
    pub kind: ChangeKind,
    /// For `Removed`, the lease as it was last seen.
    pub lease: Lease,
}

/// What a resuming client must be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every event after the client's revision, in order (possibly none).
    Events(Vec<Arc<LeaseEvent>>),
    /// The history no longer covers the client's revision: send a snapshot.
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct LeaseCache {
    leases: BTreeMap<IpNet, Lease>,
    revision: i64,
    history: VecDeque<Arc<LeaseEvent>>,
    capacity: usize,
    /// Every event with a revision above this one is in `history`.
    horizon: i64,
}

impl LeaseCache {
    /// An empty cache at revision 0 that remembers up to `capacity` events.
    pub fn new(capacity: usize) -> Self {
        LeaseCache {
            leases: BTreeMap::new(),
            revision: 0,
            history: VecDeque::new(),
            capacity,
            horizon: 0,
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn get(&self, subnet: &IpNet) -> Option<&Lease> {
        self.leases.get(subnet)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn snapshot(&self) -> (i64, Vec<Lease>) {
        (self.revision, self.leases.values().cloned().collect())
    }

    /// Notes that the store has reached `revision` without a change to our keys.
    pub fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    /// Records a put. Returns the event, or `None` when the value did not change.
    pub fn put(&mut self, lease: Lease, revision: i64) -> Option<Arc<LeaseEvent>> {
        self.advance(revision);
        if self.leases.get(&lease.subnet) == Some(&lease) {
            return None;
        }
        self.leases.insert(lease.subnet, lease.clone());
        Some(self.record(LeaseEvent {
            revision,
            kind: ChangeKind::Added,
            lease,
        }))
    }

    /// Records a delete. Returns the event, or `None` when the subnet was not known.
    pub fn remove(&mut self, subnet: &IpNet, revision: i64) -> Option<Arc<LeaseEvent>> {
        self.advance(revision);
        let lease = self.leases.remove(subnet)?;
        Some(self.record(LeaseEvent {
            revision,
            kind: ChangeKind::Removed,
            lease,
        }))
    }

    /// Applies an event received from elsewhere (an agent applying the controller's stream).
    pub fn apply(&mut self, event: &LeaseEvent) -> Option<Arc<LeaseEvent>> {
        match event.kind {
            ChangeKind::Added => self.put(event.lease.clone(), event.revision),
            ChangeKind::Removed => self.remove(&event.lease.subnet, event.revision),
        }
    }

    /// Replaces the whole state with a fresh listing at `revision` (after a compaction,
    /// a reconnect, or a snapshot from the controller) and returns what changed, for
    /// clients that were in step with the old state.
    ///
    /// The history is cleared: a client that was between the old revision and this one
    /// cannot be brought up to date by this diff, so it must get a snapshot.
    pub fn resync(&mut self, leases: Vec<Lease>, revision: i64) -> Vec<Arc<LeaseEvent>> {
        let mut fresh: BTreeMap<IpNet, Lease> =
            leases.into_iter().map(|l| (l.subnet, l)).collect();
        let mut events = Vec::new();
        for (subnet, old) in &self.leases {
            if !fresh.contains_key(subnet) {
                events.push(Arc::new(LeaseEvent {
                    revision,
                    kind: ChangeKind::Removed,
                    lease: old.clone(),
                }));
            }
        }
        for (subnet, new) in &fresh {
            if self.leases.get(subnet) != Some(new) {
                events.push(Arc::new(LeaseEvent {
                    revision,
                    kind: ChangeKind::Added,
                    lease: new.clone(),
                }));
            }
        }
        std::mem::swap(&mut self.leases, &mut fresh);
        self.revision = revision;
        self.history.clear();
        self.horizon = revision;
        events
    }

    /// What a client that has seen everything up to `after` must be sent.
    pub fn replay_after(&self, after: i64) -> Replay {
        if after < self.horizon || after > self.revision {
            return Replay::Snapshot;
        }
        let start = self.history.partition_point(|e| e.revision <= after);
        Replay::Events(self.history.iter().skip(start).cloned().collect())
    }

    fn record(&mut self, event: LeaseEvent) -> Arc<LeaseEvent> {
        let event = Arc::new(event);
        if self.capacity == 0 {
            self.horizon = event.revision;
            return event;
        }
        if self.history.len() == self.capacity {
            if let Some(old) = self.history.pop_front() {
                self.horizon = self.horizon.max(old.revision);
            }
        }
        self.history.push_back(event.clone());
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendType;
    use crate::lease::{from_unix_millis, BackendData, LeaseRecord};

    fn lease(subnet: &str, node: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            record: LeaseRecord {
                node: node.into(),
                public_ip: Some("192.0.2.1".parse().unwrap()),
                public_ipv6: None,
                ipv6_subnet: None,
                backend: BackendType::Alloc,
                backend_data: BackendData::default(),
                reserved: false,
                created_at: from_unix_millis(0),
                renewed_at: from_unix_millis(0),
            },
        }
    }

    fn revisions(r: &Replay) -> Vec<i64> {
        match r {
            Replay::Events(e) => e.iter().map(|e| e.revision).collect(),
            Replay::Snapshot => panic!("expected events"),
        }
    }

    #[test]
    fn put_and_remove_produce_events_once() {
        let mut c = LeaseCache::new(10);
        let e = c.put(lease("10.244.1.0/24", "a"), 5).unwrap();
        assert_eq!(e.kind, ChangeKind::Added);
        assert!(
            c.put(lease("10.244.1.0/24", "a"), 6).is_none(),
            "unchanged value is no event"
        );
        assert_eq!(c.revision(), 6);
        let e = c.put(lease("10.244.1.0/24", "b"), 7).unwrap();
        assert_eq!(e.lease.node(), "b");
        let e = c.remove(&"10.244.1.0/24".parse().unwrap(), 8).unwrap();
        assert_eq!((e.kind, e.lease.node()), (ChangeKind::Removed, "b"));
        assert!(c.remove(&"10.244.1.0/24".parse().unwrap(), 9).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn replay_returns_events_after_a_revision() {
        let mut c = LeaseCache::new(10);
        c.resync(vec![], 10);
        c.put(lease("10.244.1.0/24", "a"), 11);
        c.put(lease("10.244.2.0/24", "b"), 12);
        c.remove(&"10.244.1.0/24".parse().unwrap(), 13);
        assert_eq!(revisions(&c.replay_after(10)), vec![11, 12, 13]);
        assert_eq!(revisions(&c.replay_after(12)), vec![13]);
        assert_eq!(revisions(&c.replay_after(13)), Vec::<i64>::new());
        assert_eq!(
            c.replay_after(9),
            Replay::Snapshot,
            "before the first listing"
        );
        assert_eq!(c.replay_after(14), Replay::Snapshot, "from the future");
    }

    #[test]
    fn history_overflow_moves_the_horizon() {
        let mut c = LeaseCache::new(2);
        c.resync(vec![], 1);
        for (i, s) in ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
            .iter()
            .enumerate()
        {
            c.put(lease(s, "n"), 2 + i as i64);
        }
        assert_eq!(c.replay_after(1), Replay::Snapshot, "event 2 was dropped");
        assert_eq!(revisions(&c.replay_after(2)), vec![3, 4]);
    }

    #[test]
    fn several_events_in_one_revision_are_replayed_together() {
        let mut c = LeaseCache::new(2);
        c.resync(
            vec![lease("10.244.1.0/24", "a"), lease("10.244.2.0/24", "b")],
            1,
        );
        c.remove(&"10.244.1.0/24".parse().unwrap(), 2);
        c.remove(&"10.244.2.0/24".parse().unwrap(), 2);
        c.put(lease("10.244.3.0/24", "c"), 3);
        // The first rev-2 event fell out, so a client at rev 1 cannot be replayed.
        assert_eq!(c.replay_after(1), Replay::Snapshot);
        assert_eq!(revisions(&c.replay_after(2)), vec![3]);
    }

    #[test]
    fn resync_diffs_and_forces_snapshots_for_older_clients() {
        let mut c = LeaseCache::new(10);
        c.resync(
            vec![lease("10.244.1.0/24", "a"), lease("10.244.2.0/24", "b")],
            5,
        );
        c.put(lease("10.244.3.0/24", "c"), 6);
        let events = c.resync(
            vec![lease("10.244.2.0/24", "b2"), lease("10.244.3.0/24", "c")],
            20,
        );
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.lease.node().to_string()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (ChangeKind::Removed, "a".to_string()),
                (ChangeKind::Added, "b2".to_string())
            ]
        );
        assert_eq!(c.revision(), 20);
        assert_eq!(c.replay_after(6), Replay::Snapshot);
        assert_eq!(revisions(&c.replay_after(20)), Vec::<i64>::new());
        let (rev, leases) = c.snapshot();
        assert_eq!(rev, 20);
        assert_eq!(leases.len(), 2);
    }

    #[test]
    fn apply_mirrors_a_remote_stream() {
        let mut server = LeaseCache::new(10);
        let mut client = LeaseCache::new(0);
        server.resync(vec![lease("10.244.1.0/24", "a")], 3);
        let (rev, snap) = server.snapshot();
        client.resync(snap, rev);
        let e1 = server.put(lease("10.244.2.0/24", "b"), 4).unwrap();
        let e2 = server.remove(&"10.244.1.0/24".parse().unwrap(), 5).unwrap();
        client.apply(&e1);
        client.apply(&e2);
        assert_eq!(client.snapshot(), server.snapshot());
    }
}
