//! What the keys under the lease prefix mean. This module is the only place that decides
//! it. The lease listing ([`LeaseManager::list`](crate::leases::LeaseManager::list), and
//! every lease decision) and the watch fan-out ([`crate::fanout`]) both go through
//! [`read_key`] and [`interpret`], so what agents are streamed and what a listing shows
//! cannot disagree.
//!
//! A key becomes a lease in three steps, and is ignored at the first it fails:
//! 1. **On its own** ([`read_key`]). The key must be canonical, `<prefix>/leases/a.b.c.d-len`
//!    exactly as [`subnet_key`](overlay_core::subnet::subnet_key) prints the subnet
//!    (`10.244.7.0-024` is not a second key of 10.244.7.0/24). The value must decode and
//!    validate ([`LeaseRecord::decode`]). An unreadable value makes the key a removal: a
//!    lease whose value turns unreadable is "removed" for watchers, never kept as it was.
//! 2. **Against the config** (`NetworkConfig::keeps`). A dynamic lease must lie in
//!    `subnet_min..=subnet_max`, a reservation anywhere in the network, both with the
//!    config's subnet length (a `10.244.128.0-17` key is no lease of a /24 network).
//!    Without a config no key is a lease.
//! 3. **Against each other.** One lease per node and one VTEP MAC per cluster. Leasing
//!    enforces both when it writes (index keys in the same etcd transaction, see
//!    [`crate::leases`]), so a clash can only come from data written before that, or by hand.
//!    Then the lease that comes first wins: a reservation before a dynamic lease (as when a
//!    node takes its lease back), then the older lease (lower create revision), then the
//!    key. The others are ignored.
//!
//! Ignored keys are never served, so never routed, and are never the holder of anything.
//! They are reported: logged by the fan-out when they appear, counted in
//! `overlay_controller_ignored_lease_keys{reason}`, listed in `ListLeases` (`ignored`) and
//! shown by `overlayctl status`.
//!
//! Cost: the fan-out interprets the whole set again for every batch of watch events that
//! touches a lease key or the config, O(n log n) in the number of keys. For a thousand
//! leases that is well under a millisecond, and it keeps the rule in one function instead
//! of an incremental copy of it that could drift. Under a burst of writes the fan-out takes
//! every batch that has arrived at once, so the cost is paid per batch, not per write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::{IpNet, Ipv6Net};
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{Lease, LeaseRecord};
use overlay_core::MacAddr;
use serde::Serialize;

use crate::leases::Keys;
use crate::store::{KeyValue, LeaseId, StoreEvent};

/// Why a key under the lease prefix is not a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// Not `a.b.c.d-len` exactly as the subnet prints.
    BadKey,
    /// The value does not decode or validate.
    Unreadable,
    /// There is no network config to check the subnet against.
    NoConfig,
    /// The subnet does not fit the config.
    OutsideConfig,
    /// The node already holds a lease that comes first.
    NodeClash,
    /// The VTEP MAC is already published by a lease that comes first.
    MacClash,
    /// The IPv6 subnet is already held by a lease that comes first.
    Ipv6Clash,
}

impl IgnoreReason {
    pub const ALL: [IgnoreReason; 7] = [
        IgnoreReason::BadKey,
        IgnoreReason::Unreadable,
        IgnoreReason::NoConfig,
        IgnoreReason::OutsideConfig,
        IgnoreReason::NodeClash,
        IgnoreReason::MacClash,
        IgnoreReason::Ipv6Clash,
    ];

    /// The metric label and the name in messages.
    pub fn label(self) -> &'static str {
        match self {
            IgnoreReason::BadKey => "bad_key",
            IgnoreReason::Unreadable => "unreadable",
            IgnoreReason::NoConfig => "no_config",
            IgnoreReason::OutsideConfig => "outside_config",
            IgnoreReason::NodeClash => "node_clash",
            IgnoreReason::MacClash => "mac_clash",
            IgnoreReason::Ipv6Clash => "ipv6_clash",
        }
    }
}

/// A key that is not served as a lease, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub key: String,
    pub reason: IgnoreReason,
    pub detail: String,
}

/// One key under the lease prefix, read on its own (step 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The etcd lease the key is attached to (0: none).
    pub lease_id: LeaseId,
    /// The subnet, when the key is canonical (also when the value is unreadable: a key
    /// that exists takes its subnet out of allocation either way).
    pub subnet: Option<IpNet>,
    pub read: Result<Lease, Ignored>,
}

impl Entry {
    pub fn lease(&self) -> Option<&Lease> {
        self.read.as_ref().ok()
    }
}

/// Step 1: what a key and its value say on their own.
pub fn read_key(keys: &Keys, kv: &KeyValue) -> Entry {
    let subnet = keys.subnet_of(&kv.key);
    let ignored = |reason, detail: String| Ignored {
        key: kv.key.clone(),
        reason,
        detail,
    };
    let read = match subnet {
        None => Err(ignored(
            IgnoreReason::BadKey,
            "not a lease key: the name must be a.b.c.d-len exactly as the subnet prints".into(),
        )),
        Some(subnet) => match LeaseRecord::decode(&kv.value) {
            Ok(record) => Ok(Lease { subnet, record }),
            Err(e) => Err(ignored(IgnoreReason::Unreadable, e.to_string())),
        },
    };
    Entry {
        key: kv.key.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease_id: kv.lease,
        subnet,
        read,
    }
}

/// The leases that are served, and the keys that are not.
#[derive(Debug, Default)]
pub struct Interpretation<'a> {
    /// Served leases, by subnet.
    pub leases: BTreeMap<IpNet, &'a Entry>,
    /// Every other key, sorted by key.
    pub ignored: Vec<Ignored>,
}

/// The order in which leases win a clash: a reservation first, then the older lease.
fn precedence(e: &Entry) -> (bool, i64, &str) {
    let reserved = e.lease().is_some_and(|l| l.record.reserved);
    (!reserved, e.create_revision, &e.key)
}

/// Steps 2 and 3: which of `entries` are served under `config`.
pub fn interpret<'a>(
    config: Option<&NetworkConfig>,
    entries: impl IntoIterator<Item = &'a Entry>,
) -> Interpretation<'a> {
    let mut out = Interpretation::default();
    let entries = entries.into_iter();
    let mut candidates: Vec<(&'a Entry, &'a Lease)> = Vec::with_capacity(entries.size_hint().0);
    for e in entries {
        let lease = match &e.read {
            Err(ignored) => {
                out.ignored.push(ignored.clone());
                continue;
            }
            Ok(lease) => lease,
        };
        let why = match config {
            None => Some((
                IgnoreReason::NoConfig,
                "no network config is set".to_string(),
            )),
            Some(c) if !c.keeps_lease(lease.subnet, lease.record.ipv6_subnet, lease.record.reserved) => {
                Some((IgnoreReason::OutsideConfig, misfit(c, lease)))
            }
            Some(_) => None,
        };
        match why {
            Some((reason, detail)) => out.ignored.push(Ignored {
                key: e.key.clone(),
                reason,
                detail,
            }),
            None => candidates.push((e, lease)),
        }
    }
    candidates.sort_by(|a, b| precedence(a.0).cmp(&precedence(b.0)));
    let mut nodes: HashMap<&str, &Lease> = HashMap::with_capacity(candidates.len());
    let mut macs: HashMap<MacAddr, &Lease> = HashMap::new();
    let mut subnets6: HashMap<Ipv6Net, &Lease> = HashMap::new();
    for (e, lease) in candidates {
        let node = lease.record.node.as_str();
        let mac = lease.record.backend_data.vtep_mac;
        let subnet6 = lease.record.ipv6_subnet;
        let clash = if let Some(first) = subnet6.and_then(|s| subnets6.get(&s)) {
            Some((
                IgnoreReason::Ipv6Clash,
                format!(
                    "IPv6 subnet {} is already held by node {} with {} (one holder per subnet; the reservation, then the older lease, wins)",
                    subnet6.expect("a subnet"),
                    first.record.node,
                    first.subnet
                ),
            ))
        } else if let Some(first) = nodes.get(node) {
            Some((
                IgnoreReason::NodeClash,
                format!(
                    "node {node} already holds {} (one lease per node; the reservation, then the older lease, wins)",
                    first.subnet
                ),
            ))
        } else {
            mac.and_then(|m| macs.get(&m)).map(|first| {
                (
                    IgnoreReason::MacClash,
                    format!(
                        "VTEP MAC {} is already published by node {} for {} (one MAC per cluster; the reservation, then the older lease, wins)",
                        mac.expect("a MAC"),
                        first.record.node,
                        first.subnet
                    ),
                )
            })
        };
        match clash {
            Some((reason, detail)) => out.ignored.push(Ignored {
                key: e.key.clone(),
                reason,
                detail,
            }),
            None => {
                nodes.insert(node, lease);
                if let Some(m) = mac {
                    macs.insert(m, lease);
                }
                if let Some(s6) = subnet6 {
                    subnets6.insert(s6, lease);
                }
                out.leases.insert(lease.subnet, e);
            }
        }
    }
    out.ignored.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Why a readable lease does not fit `c`, for people.
fn misfit(c: &NetworkConfig, lease: &Lease) -> String {
    let key = c.key_pool();
    let pool_rule = |p: &overlay_core::config::SubnetPool, reserved: bool| {
        if reserved {
            format!("a /{} inside {}", p.subnet_len, p.network)
        } else {
            format!("a /{} in {}..={}", p.subnet_len, p.subnet_min, p.subnet_max)
        }
    };
    let what = if lease.record.reserved { "a reservation" } else { "a lease" };
    let reserved = lease.record.reserved;
    if !c.keeps_key(lease.subnet, reserved) {
        return format!("{what} must be {}", pool_rule(key, reserved));
    }
    match (c.ipv6.filter(|_| c.is_dual_stack()), lease.record.ipv6_subnet) {
        (Some(p6), Some(_)) => format!("its IPv6 subnet must be {}", pool_rule(&p6, reserved)),
        (Some(p6), None) => format!("the cluster is dual-stack, but it has no IPv6 subnet of {}", p6.network),
        (None, Some(s6)) => format!("it has the IPv6 subnet {s6}, but the cluster is not dual-stack"),
        (None, None) => format!("{what} does not fit the config"),
    }
}

/// The keys of a cluster prefix as the watch fan-out follows them: the config, every key
/// under the lease prefix (read once each, interpreted as a whole on demand) and the index
/// keys. It also keeps what allocation looks up per request, so that a lookup never walks
/// every lease: the subnets taken, and the keys of each node's readable leases.
#[derive(Debug)]
pub struct LeaseView {
    keys: Keys,
    config: Option<NetworkConfig>,
    /// Mod revision of the config key as last applied (0: none seen).
    config_mod_revision: i64,
    entries: BTreeMap<String, Entry>,
    /// The index keys (`<prefix>/index/...`) as stored.
    indexes: HashMap<String, KeyValue>,
    /// Subnets whose lease key exists, readable or not.
    taken: HashSet<IpNet>,
    /// The keys of the readable leases that name each node.
    by_node: HashMap<String, BTreeSet<String>>,
}

/// What applying a store event did to a [`LeaseView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Not a key the view follows (index keys, the leader key).
    Unrelated,
    /// A lease key or the config changed: interpret again.
    Changed,
    /// The config was written but is unreadable; the last readable one stays in force
    /// (a broken config must not make every lease vanish from every host).
    BadConfig(String),
}

impl LeaseView {
    pub fn new(keys: Keys) -> Self {
        LeaseView {
            keys,
            config: None,
            config_mod_revision: 0,
            entries: BTreeMap::new(),
            indexes: HashMap::new(),
            taken: HashSet::new(),
            by_node: HashMap::new(),
        }
    }

    pub fn config(&self) -> Option<&NetworkConfig> {
        self.config.as_ref()
    }

    /// The mod revision of the config key the view holds (0: none).
    pub fn config_mod_revision(&self) -> i64 {
        self.config_mod_revision
    }

    /// The key under the lease prefix, as read.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// An index key (`<prefix>/index/...`) as stored.
    pub fn index(&self, key: &str) -> Option<&KeyValue> {
        self.indexes.get(key)
    }

    /// Whether a lease key of `subnet` exists (readable or not).
    ///
    /// An IPv6 subnet of a dual-stack cluster (not a key subnet) is taken when its index
    /// key exists.
    pub fn is_taken(&self, subnet: IpNet) -> bool {
        self.taken.contains(&subnet)
            || match subnet {
                IpNet::V6(s6) => self.indexes.contains_key(&self.keys.ipv6_index(s6)),
                IpNet::V4(_) => false,
            }
    }

    /// Every key under the lease prefix.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The readable leases that name `node`.
    pub fn of_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.entries.get(k))
    }

    /// Every etcd lease a key under the prefix is attached to.
    pub fn lease_ids(&self) -> HashSet<LeaseId> {
        self.entries
            .values()
            .map(|e| e.lease_id)
            .chain(self.indexes.values().map(|kv| kv.lease))
            .filter(|id| *id != 0)
            .collect()
    }

    fn insert_entry(&mut self, entry: Entry) {
        self.remove_entry(&entry.key.clone());
        if let Some(s) = entry.subnet {
            self.taken.insert(s);
        }
        if let Some(l) = entry.lease() {
            self.by_node
                .entry(l.record.node.clone())
                .or_default()
                .insert(entry.key.clone());
        }
        self.entries.insert(entry.key.clone(), entry);
    }

    fn remove_entry(&mut self, key: &str) {
        let Some(old) = self.entries.remove(key) else {
            return;
        };
        if let Some(s) = old.subnet {
            self.taken.remove(&s);
        }
        if let Some(l) = old.lease() {
            if let Some(keys) = self.by_node.get_mut(&l.record.node) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_node.remove(&l.record.node);
                }
            }
        }
    }

    /// Replaces the contents with a listing of the whole cluster prefix
    /// ([`Keys::root`]); what could not be taken in (an unreadable config, which leaves the
    /// last readable one in force).
    pub fn load(&mut self, kvs: &[KeyValue]) -> Vec<String> {
        self.entries.clear();
        self.indexes.clear();
        self.taken.clear();
        self.by_node.clear();
        if !kvs.iter().any(|kv| kv.key == self.keys.config()) {
            self.config = None;
            self.config_mod_revision = 0;
        }
        let mut problems = Vec::new();
        for kv in kvs {
            if let Applied::BadConfig(e) = self.apply(&StoreEvent::Put(kv.clone())) {
                problems.push(e);
            }
        }
        problems
    }

    /// Applies one event of a watch on [`Keys::root`].
    pub fn apply(&mut self, event: &StoreEvent) -> Applied {
        let key = event.key();
        if key == self.keys.config() {
            return match event {
                StoreEvent::Put(kv) => {
                    self.config_mod_revision = kv.mod_revision;
                    match NetworkConfig::from_json(&String::from_utf8_lossy(&kv.value)) {
                        Ok(config) => {
                            self.config = Some(config);
                            Applied::Changed
                        }
                        Err(e) => Applied::BadConfig(e.to_string()),
                    }
                }
                StoreEvent::Delete { .. } => {
                    self.config = None;
                    self.config_mod_revision = 0;
                    Applied::Changed
                }
            };
        }
        if key.starts_with(&self.keys.index_prefix()) {
            match event {
                StoreEvent::Put(kv) => {
                    self.indexes.insert(kv.key.clone(), kv.clone());
                }
                StoreEvent::Delete { key, .. } => {
                    self.indexes.remove(key);
                }
            }
            return Applied::Unrelated;
        }
        if !key.starts_with(&self.keys.leases()) {
            return Applied::Unrelated;
        }
        match event {
            StoreEvent::Put(kv) => self.insert_entry(read_key(&self.keys, kv)),
            StoreEvent::Delete { key, .. } => self.remove_entry(key),
        }
        Applied::Changed
    }

    pub fn interpret(&self) -> Interpretation<'_> {
        interpret(self.config.as_ref(), self.entries.values())
    }
}

/// A served lease that publishes a VTEP MAC, as allocation needs it to refuse the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacHolder {
    pub key: String,
    pub node: String,
    pub subnet: IpNet,
}

/// The view the watch fan-out keeps current, shared with lease allocation
/// ([`crate::leases`]), which reads it instead of listing every lease from etcd per
/// request. Only the fan-out writes it, under the write lock, one coalesced watch batch at
/// a time; readers hold the read lock for a lookup, never across an `.await`.
#[derive(Debug)]
pub struct ViewState {
    pub view: LeaseView,
    /// Served leases by the VTEP MAC they publish, from the last interpretation.
    pub served_macs: HashMap<MacAddr, MacHolder>,
    /// The store revision the view is complete up to.
    pub revision: i64,
    /// Whether the view holds a listing and its watch is running. While it is not,
    /// allocation reads etcd instead.
    pub synced: bool,
}

impl ViewState {
    pub fn new(keys: Keys) -> Self {
        ViewState {
            view: LeaseView::new(keys),
            served_macs: HashMap::new(),
            revision: 0,
            synced: false,
        }
    }

    /// Records what `interpretation` (of this view) serves, for lookups by MAC.
    pub fn note_served(served: &Interpretation<'_>) -> HashMap<MacAddr, MacHolder> {
        served
            .leases
            .values()
            .filter_map(|e| {
                let l = e.lease()?;
                Some((
                    l.record.backend_data.vtep_mac?,
                    MacHolder {
                        key: e.key.clone(),
                        node: l.record.node.clone(),
                        subnet: l.subnet,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::lease::{from_unix_millis, BackendData};
    use overlay_core::BackendType;

    const CONFIG: &str =
        r#"{"network":"10.244.0.0/16","subnet_max":"10.244.199.0/24","backend":{"type":"vxlan"}}"#;

    fn kv(key: &str, node: &str, mac: Option<&str>, reserved: bool, rev: i64) -> KeyValue {
        let record = LeaseRecord {
            node: node.into(),
            public_ip: Some("192.0.2.1".parse().unwrap()),
            public_ipv6: None,
            ipv6_subnet: None,
            backend: BackendType::Vxlan,
            backend_data: BackendData {
                vtep_mac: mac.map(|m| m.parse().unwrap()),
                ..Default::default()
            },
            reserved,
            created_at: from_unix_millis(0),
            renewed_at: from_unix_millis(0),
        };
        KeyValue {
            key: format!("/v/leases/{key}"),
            value: record.encode(),
            create_revision: rev,
            mod_revision: rev,
            lease: if reserved { 0 } else { 7 },
        }
    }

    fn served(kvs: &[KeyValue]) -> (Vec<String>, Vec<(String, IgnoreReason)>) {
        let keys = Keys::new("/v");
        let config = NetworkConfig::from_json(CONFIG).unwrap();
        let entries: Vec<Entry> = kvs.iter().map(|kv| read_key(&keys, kv)).collect();
        let i = interpret(Some(&config), &entries);
        (
            i.leases.keys().map(|s| s.to_string()).collect(),
            i.ignored
                .iter()
                .map(|x| (x.key.trim_start_matches("/v/leases/").to_string(), x.reason))
                .collect(),
        )
    }

    #[test]
    fn only_canonical_keys_with_readable_values_that_fit_the_config_are_leases() {
        let mut unreadable = kv("10.244.9.0-24", "c", None, false, 4);
        unreadable.value = b"{not json".to_vec();
        let (leases, ignored) = served(&[
            kv("10.244.7.0-24", "a", None, false, 1),
            kv("10.244.7.0-024", "b", None, false, 2),
            kv("10.244.128.0-17", "b", None, true, 3),
            unreadable,
            kv("10.244.200.0-24", "d", None, false, 5),
            kv("10.244.201.0-24", "e", None, true, 6),
        ]);
        assert_eq!(leases, vec!["10.244.7.0/24", "10.244.201.0/24"]);
        assert_eq!(
            ignored,
            vec![
                ("10.244.128.0-17".into(), IgnoreReason::OutsideConfig),
                ("10.244.200.0-24".into(), IgnoreReason::OutsideConfig),
                ("10.244.7.0-024".into(), IgnoreReason::BadKey),
                ("10.244.9.0-24".into(), IgnoreReason::Unreadable),
            ]
        );
    }

    #[test]
    fn in_a_clash_the_reservation_then_the_older_lease_wins() {
        let mac = Some("02:00:00:00:00:01");
        let (leases, ignored) = served(&[
            // Newer, same MAC as the victim's: ignored.
            kv("10.244.3.0-24", "attacker", mac, false, 20),
            kv("10.244.5.0-24", "victim", mac, false, 10),
            // A second lease of one node: the older wins...
            kv("10.244.6.0-24", "twice", None, false, 11),
            kv("10.244.4.0-24", "twice", None, false, 12),
            // ...unless the other is a reservation.
            kv("10.244.8.0-24", "pinned", None, false, 1),
            kv("10.244.250.0-24", "pinned", None, true, 30),
            // The attacker's ignored lease does not hold its node either.
            kv(
                "10.244.9.0-24",
                "attacker",
                Some("02:00:00:00:00:02"),
                false,
                40,
            ),
        ]);
        assert_eq!(
            leases,
            vec![
                "10.244.5.0/24",
                "10.244.6.0/24",
                "10.244.9.0/24",
                "10.244.250.0/24"
            ]
        );
        assert_eq!(
            ignored,
            vec![
                ("10.244.3.0-24".into(), IgnoreReason::MacClash),
                ("10.244.4.0-24".into(), IgnoreReason::NodeClash),
                ("10.244.8.0-24".into(), IgnoreReason::NodeClash),
            ]
        );
    }

    #[test]
    fn a_view_follows_the_config_and_ignores_other_keys() {
        let keys = Keys::new("/v");
        let mut view = LeaseView::new(keys.clone());
        let config = KeyValue {
            key: keys.config(),
            value: CONFIG.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        };
        let problems = view.load(&[config.clone(), kv("10.244.7.0-24", "a", None, false, 2)]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(view.interpret().leases.len(), 1);
        let index = KeyValue {
            key: "/v/index/node/a".into(),
            ..config.clone()
        };
        assert_eq!(view.apply(&StoreEvent::Put(index)), Applied::Unrelated);
        let broken = KeyValue {
            value: b"nonsense".to_vec(),
            ..config.clone()
        };
        assert!(matches!(
            view.apply(&StoreEvent::Put(broken)),
            Applied::BadConfig(_)
        ));
        assert_eq!(view.interpret().leases.len(), 1, "the last config stays");
        let narrow = KeyValue {
            value: br#"{"network":"10.244.0.0/16","subnet_max":"10.244.5.0/24","backend":{"type":"vxlan"}}"#.to_vec(),
            ..config
        };
        assert_eq!(view.apply(&StoreEvent::Put(narrow)), Applied::Changed);
        let i = view.interpret();
        assert!(i.leases.is_empty());
        assert_eq!(i.ignored[0].reason, IgnoreReason::OutsideConfig);
    }
}
