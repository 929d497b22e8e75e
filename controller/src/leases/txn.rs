//! A listing read once, and the etcd transaction every lease write is: the keys it was
//! based on compared, the writes applied at one revision or not at all.

use super::*;

/// The lease keys as listed, each read once (see [`crate::view`]).
pub(super) struct Listing {
    pub(super) entries: Vec<Entry>,
}

impl Listing {
    pub(super) fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.key.as_str().cmp(key))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Subnets whose key exists, readable or not: never handed out again while it does.
    pub(super) fn taken(&self) -> HashSet<IpNet> {
        self.entries.iter().filter_map(|e| e.subnet).collect()
    }

    /// The readable leases naming `node`.
    pub(super) fn of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.lease().is_some_and(|l| l.record.node == node))
    }

    pub(super) fn interpret(&self, config: &NetworkConfig) -> Interpretation<'_> {
        interpret(Some(config), &self.entries)
    }
}

/// Whether a lease that is a reservation (by its value, or for an unreadable value by
/// having no etcd lease).
pub(super) fn is_reserved(e: &Entry) -> bool {
    e.lease().map_or(e.lease_id == 0, |l| l.record.reserved)
}

/// A transaction being put together: at most one condition and one write per key.
#[derive(Default)]
pub(super) struct Txn {
    pub(super) conditions: BTreeMap<String, Condition>,
    pub(super) writes: BTreeMap<String, TxnWrite>,
}

impl Txn {
    /// The key must still be as read: its mod revision, or absent.
    pub(super) fn unchanged(&mut self, key: &str, read: Option<&KeyValue>) {
        self.at_revision(key, read.map_or(0, |kv| kv.mod_revision));
    }

    pub(super) fn at_revision(&mut self, key: &str, mod_revision: i64) {
        self.conditions
            .entry(key.to_string())
            .or_insert_with(|| Condition::ModRevision(key.to_string(), mod_revision));
    }

    pub(super) fn absent(&mut self, key: &str) {
        self.conditions
            .entry(key.to_string())
            .or_insert_with(|| Condition::CreateRevision(key.to_string(), 0));
    }

    pub(super) fn put(&mut self, key: &str, value: Vec<u8>, lease: LeaseId) {
        self.writes.insert(
            key.to_string(),
            TxnWrite::Put {
                key: key.to_string(),
                value,
                lease,
            },
        );
    }

    pub(super) fn delete(&mut self, key: &str) {
        self.writes.insert(
            key.to_string(),
            TxnWrite::Delete {
                key: key.to_string(),
            },
        );
    }

    pub(super) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub(super) async fn commit(self, store: &dyn Store) -> Result<Written, StoreError> {
        store
            .txn(
                self.conditions.into_values().collect(),
                self.writes.into_values().collect(),
            )
            .await
    }
}

/// Whether an index key names `subnet` and lives as long as the lease (`lease`).
pub(super) fn names(index: Option<&KeyValue>, subnet: IpNet, lease: LeaseId) -> bool {
    index.is_some_and(|kv| kv.value == subnet_key(subnet).as_bytes() && kv.lease == lease)
}
