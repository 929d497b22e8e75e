//! Hostile clients and bad data change nothing: the lease manager and the watch fan-out
//! against a node that publishes another node's VTEP MAC, many concurrent acquires for one
//! node, and stray, misfit or corrupt keys under the lease prefix. Each case runs on the
//! memory store and on a real etcd; the races need a real etcd (and pause it to line
//! the requests up).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use overlay_controller::error::ControlError;
use overlay_controller::fanout::Fanout;
use overlay_controller::leases::{AcquireRequest, Keys, LeaseManager, Reservation};
use overlay_controller::store::{
    Condition, EtcdStore, KeyValue, LeaseId, LeaseInfo, MemoryStore, Store, StoreError, StoreEvent,
    TxnWrite, WatchStream, Written,
};
use overlay_controller::view::IgnoreReason;
use overlay_core::lease::{now_millis, BackendData, LeaseRecord};
use overlay_core::BackendType;
use overlay_proto::v1::watch_leases_response::Kind;
use overlay_proto::v1::{EventType, WatchLeasesResponse};

const PREFIX: &str = "/overlay";
/// Random leases up to 10.244.199.0/24, as in every test config.
const CONFIG: &str = r#"{"network":"10.244.0.0/16","subnet_max":"10.244.199.0/24","backend":{"type":"vxlan"},"lease_ttl":"60s"}"#;
const MAC: &str = "02:00:00:00:0a:01";
const PATIENCE: Duration = Duration::from_secs(20);

fn req(node: &str, mac: &str) -> AcquireRequest {
    AcquireRequest {
        node: node.into(),
        public_ip: Some("192.0.2.10".parse().unwrap()),
        backend: BackendType::Vxlan,
        data: BackendData {
            vtep_mac: Some(mac.parse().unwrap()),
            ..Default::default()
        },
        preferred: None,
        ..Default::default()
    }
}

/// Runs `case` on a memory store, then on a fresh etcd (unless skipped).
async fn on_both_stores<F, Fut>(test: &str, case: F)
where
    F: Fn(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    eprintln!("{test}: memory store");
    case(Arc::new(MemoryStore::new())).await;
    let Some(etcd) = overlay_tests::Etcd::start_or_skip(test) else {
        return;
    };
    eprintln!("{test}: etcd");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to etcd");
    case(Arc::new(store)).await;
}

/// Polls `check` until it holds, failing after [`PATIENCE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still not true after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A lease manager with the config set, and a fan-out fed from the same store.
async fn setup(store: Arc<dyn Store>) -> (Arc<LeaseManager>, Arc<Fanout>) {
    let m = Arc::new(LeaseManager::new(store, Keys::new(PREFIX)));
    m.set_config(CONFIG, false).await.expect("config");
    let f = Arc::new(Fanout::new());
    tokio::spawn(f.clone().run(m.clone()));
    eventually("the fan-out has listed", || f.is_synced()).await;
    (m, f)
}

type Watch = std::pin::Pin<Box<dyn Stream<Item = WatchLeasesResponse> + Send>>;

/// A watch client, once the fan-out has seen every write so far, past its snapshot:
/// (subnet, node) of every lease in it.
async fn subscribe(f: &Arc<Fanout>, store: &dyn Store) -> (Watch, Vec<(String, String)>) {
    let (_, now) = store.list(PREFIX).await.unwrap();
    eventually("the fan-out is up to date", || f.revision() >= now).await;
    let mut s: Watch = Box::pin(f.subscribe(0));
    let Kind::Snapshot(snap) = next(&mut s).await else {
        panic!("a snapshot comes first")
    };
    let leases = snap
        .leases
        .into_iter()
        .map(|l| (l.subnet, l.node))
        .collect();
    (s, leases)
}

async fn next(s: &mut Watch) -> Kind {
    tokio::time::timeout(PATIENCE, s.next())
        .await
        .expect("a watch message in time")
        .expect("the watch is open")
        .kind
        .expect("a kind")
}

/// Events up to and including the first one for `node`: ("added"/"removed", subnet, node).
async fn events_until(s: &mut Watch, node: &str) -> Vec<(&'static str, String, String)> {
    let mut seen = Vec::new();
    loop {
        let Kind::Event(e) = next(s).await else {
            panic!("an event, not a snapshot (nobody fell behind): {seen:?}")
        };
        let kind = if e.r#type == EventType::Removed as i32 {
            "removed"
        } else {
            "added"
        };
        let lease = e.lease.expect("an event carries its lease");
        let done = lease.node == node;
        seen.push((kind, lease.subnet, lease.node));
        if done {
            return seen;
        }
    }
}

fn record(node: &str, reserved: bool) -> LeaseRecord {
    LeaseRecord {
        node: node.into(),
        public_ip: Some("192.0.2.20".parse().unwrap()),
        public_ipv6: None,
        ipv6_subnet: None,
        backend: BackendType::Vxlan,
        backend_data: BackendData::default(),
        reserved,
        created_at: now_millis(),
        renewed_at: now_millis(),
    }
}

/// Overwrites the value of the lease of `subnet` with garbage, keeping its etcd lease
/// (as `etcdctl put --ignore-lease` does).
async fn corrupt(store: &dyn Store, subnet: IpNet) -> KeyValue {
    let key = Keys::new(PREFIX).lease(subnet);
    let kv = store.get(&key).await.unwrap().expect("the lease key");
    let w = store
        .update(
            &key,
            b"{\"node\": 17, garbage".to_vec(),
            kv.mod_revision,
            kv.lease,
        )
        .await
        .unwrap();
    assert!(w.ok(), "corrupting {key}");
    kv
}

/// Finding A: a node publishing another node's VTEP MAC is refused, naming that node, and
/// nothing it asked for is served; with a MAC of its own it gets a lease, and it cannot switch
/// to the taken MAC later.
#[tokio::test]
async fn a_node_cannot_lease_with_another_nodes_vtep_mac() {
    on_both_stores(
        "a_node_cannot_lease_with_another_nodes_vtep_mac",
        |store| async move {
            let (m, f) = setup(store.clone()).await;
            let (mut watch, _) = subscribe(&f, store.as_ref()).await;
            let victim = m.acquire(&req("victim", MAC)).await.unwrap().lease;

            let e = m.acquire(&req("attacker", MAC)).await.unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("victim")
                    && text.contains(MAC)
                    && text.contains(&victim.subnet.to_string()),
                "{text}"
            );
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::FailedPrecondition
            );
            let listed: Vec<String> = m
                .list()
                .await
                .unwrap()
                .0
                .iter()
                .map(|l| l.lease.node().to_string())
                .collect();
            assert_eq!(listed, vec!["victim"]);

            let own = m
                .acquire(&req("attacker", "02:00:00:00:0a:02"))
                .await
                .unwrap()
                .lease;
            let e = m.acquire(&req("attacker", MAC)).await.unwrap_err();
            assert!(matches!(e, ControlError::FailedPrecondition(_)), "{e}");
            assert!(e.to_string().contains("victim"), "{e}");

            // Watchers saw the victim, then the attacker with its own MAC, nothing else.
            assert_eq!(
                events_until(&mut watch, "attacker").await,
                vec![
                    ("added", victim.subnet.to_string(), "victim".to_string()),
                    ("added", own.subnet.to_string(), "attacker".to_string()),
                ]
            );
            let listed = m.list().await.unwrap().0;
            assert_eq!(listed.len(), 2);
            assert!(listed.iter().any(|l| l.lease.node() == "attacker"
                && l.lease.record.backend_data.vtep_mac
                    == Some("02:00:00:00:0a:02".parse().unwrap())));
        },
    )
    .await;
}

/// Finding C (stray keys): keys under the lease prefix that are not canonical lease keys of
/// the config's subnets are never leases: not listed, not streamed, not holders of a subnet,
/// and deleting them is no event for the subnet they seem to name.
#[tokio::test]
async fn stray_keys_under_the_lease_prefix_are_never_leases_nor_holders() {
    on_both_stores(
        "stray_keys_under_the_lease_prefix_are_never_leases_nor_holders",
        |store| async move {
            let (m, f) = setup(store.clone()).await;
            let a = m.acquire(&req("a", MAC)).await.unwrap().lease;
            let (mut watch, snapshot) = subscribe(&f, store.as_ref()).await;
            assert_eq!(snapshot, vec![(a.subnet.to_string(), "a".to_string())]);

            let leases = Keys::new(PREFIX).leases();
            let padded = format!("{leases}{}-0{}", a.subnet.network(), a.subnet.prefix_len());
            let wide = format!("{leases}10.244.128.0-17");
            let junk = format!("{leases}not-a-subnet");
            store
                .put(&padded, record("b", false).encode())
                .await
                .unwrap();
            store
                .put(&wide, record("wide", true).encode())
                .await
                .unwrap();
            store
                .put(&junk, record("junk", true).encode())
                .await
                .unwrap();

            let listing = m.list_all().await.unwrap();
            let held: Vec<(String, String)> = listing
                .leases
                .iter()
                .map(|l| (l.lease.subnet.to_string(), l.lease.node().to_string()))
                .collect();
            assert_eq!(
                held,
                vec![(a.subnet.to_string(), "a".to_string())],
                "one holder of {}",
                a.subnet
            );
            let ignored: Vec<(String, IgnoreReason)> = listing
                .ignored
                .iter()
                .map(|i| (i.key.clone(), i.reason))
                .collect();
            let mut expected = vec![
                (padded.clone(), IgnoreReason::BadKey),
                (wide.clone(), IgnoreReason::OutsideConfig),
                (junk.clone(), IgnoreReason::BadKey),
            ];
            expected.sort();
            assert_eq!(ignored, expected, "ignored keys, sorted by key");
            // The fan-out reports them too (for the metric), once it has seen them.
            eventually("the fan-out ignores the three keys", || {
                f.ignored().len() == 3
            })
            .await;

            // "b" has no lease: it gets a subnet of its own, not a's.
            let b = m
                .acquire(&req("b", "02:00:00:00:0b:01"))
                .await
                .unwrap()
                .lease;
            assert_ne!(b.subnet, a.subnet);
            m.renew("a", a.subnet)
                .await
                .expect("a still holds its lease");

            for key in [&padded, &wide, &junk] {
                store.delete(key, None).await.unwrap();
            }
            m.acquire(&req("marker", "02:00:00:00:0c:01"))
                .await
                .unwrap();
            let events = events_until(&mut watch, "marker").await;
            assert_eq!(events.len(), 2, "only b and the marker: {events:?}");
            assert_eq!(events[0].2, "b", "{events:?}");
            assert_eq!(m.list().await.unwrap().0.len(), 3);
        },
    )
    .await;
}

/// Finding C (corrupt value): a lease whose value turns unreadable is a removal, for the
/// listing and for the watch alike, and is reported.
#[tokio::test]
async fn a_lease_value_that_turns_unreadable_is_removed_for_listing_and_watch_alike() {
    on_both_stores(
        "a_lease_value_that_turns_unreadable_is_removed_for_listing_and_watch_alike",
        |store| async move {
            let (m, f) = setup(store.clone()).await;
            let a = m.acquire(&req("a", MAC)).await.unwrap().lease;
            let (mut watch, _) = subscribe(&f, store.as_ref()).await;
            corrupt(store.as_ref(), a.subnet).await;
            m.acquire(&req("marker", "02:00:00:00:0c:01"))
                .await
                .unwrap();
            let events = events_until(&mut watch, "marker").await;
            assert_eq!(
                events[0],
                ("removed", a.subnet.to_string(), "a".to_string()),
                "{events:?}"
            );
            let listing = m.list_all().await.unwrap();
            assert!(listing.leases.iter().all(|l| l.lease.subnet != a.subnet));
            assert_eq!(listing.ignored.len(), 1);
            assert_eq!(listing.ignored[0].reason, IgnoreReason::Unreadable);
            assert_eq!(f.ignored(), listing.ignored);
            // Its subnet stays out of allocation while the key exists.
            let c = m
                .acquire(&AcquireRequest {
                    preferred: Some(a.subnet),
                    ..req("c", "02:00:00:00:0d:01")
                })
                .await
                .unwrap();
            assert_ne!(c.lease.subnet, a.subnet);
        },
    )
    .await;
}

/// Finding C (renew of a corrupt value): the owner is not moved. Renew fails saying why;
/// the agent's acquire (preferring its subnet) is proven the owner by its index key and gets
/// the same subnet back, with the value rewritten on the same etcd lease.
#[tokio::test]
async fn an_owner_keeps_its_subnet_when_its_lease_value_turns_unreadable() {
    on_both_stores(
        "an_owner_keeps_its_subnet_when_its_lease_value_turns_unreadable",
        |store| async move {
            let (m, f) = setup(store.clone()).await;
            let a = m.acquire(&req("a", MAC)).await.unwrap().lease;
            let (mut watch, _) = subscribe(&f, store.as_ref()).await;
            let before = corrupt(store.as_ref(), a.subnet).await;

            let e = m.renew("a", a.subnet).await.unwrap_err();
            assert!(matches!(e, ControlError::NotFound(_)), "{e}");
            assert!(e.to_string().contains("unreadable"), "{e}");
            // Nobody else gets it by renewing, releasing or preferring it.
            assert!(m.renew("x", a.subnet).await.is_err());
            assert!(m.release("x", a.subnet).await.is_err());

            let again = m
                .acquire(&AcquireRequest {
                    preferred: Some(a.subnet),
                    ..req("a", MAC)
                })
                .await
                .unwrap();
            assert_eq!(again.lease.subnet, a.subnet, "the owner was moved");
            let kv = store.get(&before.key).await.unwrap().expect("the key");
            assert_eq!(kv.lease, before.lease, "still on its etcd lease");
            assert_eq!(LeaseRecord::decode(&kv.value).unwrap().node, "a");
            assert!(m.renew("a", a.subnet).await.unwrap().is_some());
            assert_eq!(
                events_until(&mut watch, "a").await,
                vec![("removed", a.subnet.to_string(), "a".to_string())]
            );
            assert_eq!(
                events_until(&mut watch, "a").await,
                vec![("added", a.subnet.to_string(), "a".to_string())]
            );
            assert!(m.list_all().await.unwrap().ignored.is_empty());
        },
    )
    .await;
}

/// The index keys come and go with their lease: release, revoke, expiry, and a reservation
/// that replaces a node's dynamic lease.
#[tokio::test]
async fn index_keys_live_and_die_with_their_lease() {
    on_both_stores("index_keys_live_and_die_with_their_lease", |store| async move {
        let (m, _f) = setup(store.clone()).await;
        let index = format!("{PREFIX}/index/");
        let count = || {
            let store = store.clone();
            let index = index.clone();
            async move { store.list(&index).await.unwrap().0.len() }
        };
        let a = m.acquire(&req("a", MAC)).await.unwrap().lease;
        assert_eq!(count().await, 2, "node and MAC");
        m.release("a", a.subnet).await.unwrap();
        assert_eq!(count().await, 0);
        let a = m.acquire(&req("a", MAC)).await.unwrap().lease;
        m.revoke(a.subnet).await.unwrap();
        assert_eq!(count().await, 0);
        // A reservation replaces the node's dynamic lease at once, MAC index included.
        m.acquire(&req("a", MAC)).await.unwrap();
        let fixed: IpNet = "10.244.210.0/24".parse().unwrap();
        m.reserve(&Reservation::v4(fixed, "a", "192.0.2.10".parse().unwrap())).await.unwrap();
        let (kvs, _) = store.list(&index).await.unwrap();
        assert_eq!(kvs.len(), 1, "{kvs:?}");
        assert_eq!((kvs[0].key.as_str(), kvs[0].lease), (format!("{PREFIX}/index/node/a").as_str(), 0));
        let back = m.acquire(&req("a", MAC)).await.unwrap();
        assert_eq!(back.lease.subnet, fixed);
        assert_eq!(count().await, 2, "the reservation's MAC index");
        // Expiry: a short TTL, nobody renews.
        m.set_config(
            r#"{"network":"10.244.0.0/16","subnet_max":"10.244.199.0/24","backend":{"type":"vxlan"},"lease_ttl":"1s"}"#,
            false,
        )
        .await
        .unwrap();
        m.acquire(&req("short", "02:00:00:00:0e:01")).await.unwrap();
        assert_eq!(count().await, 4);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while count().await != 2 {
            assert!(tokio::time::Instant::now() < deadline, "the expired lease's index keys stay");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A store that counts the requests it was asked to start, to tell when many tasks all
/// wait on a paused etcd.
struct Counting {
    inner: EtcdStore,
    started: AtomicUsize,
}

impl Counting {
    fn start(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Store for Counting {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.start();
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        self.start();
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
    async fn txn(
        &self,
        conditions: Vec<Condition>,
        writes: Vec<TxnWrite>,
    ) -> Result<Written, StoreError> {
        self.inner.txn(conditions, writes).await
    }
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        self.inner.time_to_live(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }
    async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        self.inner.list_leases().await
    }
    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, StoreError> {
        self.inner.lease_info(lease).await
    }
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start_revision).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

/// Every lease key event under the prefix from `from` up to now: (puts, deletes).
async fn lease_key_writes(store: &dyn Store, from: i64) -> (usize, usize) {
    let leases = Keys::new(PREFIX).leases();
    let (_, now) = store.list(&leases).await.unwrap();
    let mut watch = store.watch(&leases, from).await.unwrap();
    let (mut puts, mut deletes) = (0, 0);
    let mut seen = from - 1;
    while seen < now {
        let batch = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("watch replay in time")
            .expect("watch open")
            .expect("watch batch");
        for e in &batch.events {
            match e {
                StoreEvent::Put(_) => puts += 1,
                StoreEvent::Delete { .. } => deletes += 1,
            }
        }
        seen = seen.max(batch.revision);
    }
    (puts, deletes)
}

/// `n` acquires started together against a paused etcd, which then resumes, so that they
/// all read the same state before any writes.
async fn acquire_together(
    etcd: &overlay_tests::Etcd,
    store: &Arc<Counting>,
    m: &Arc<LeaseManager>,
    reqs: Vec<AcquireRequest>,
) -> Vec<Result<IpNet, ControlError>> {
    let n = reqs.len();
    etcd.pause();
    let before = store.started.load(Ordering::SeqCst);
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let m = m.clone();
            tokio::spawn(async move { m.acquire(&r).await.map(|a| a.lease.subnet) })
        })
        .collect();
    let started = || store.started.load(Ordering::SeqCst) >= before + n;
    let waited = tokio::time::timeout(PATIENCE, async {
        while !started() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    etcd.resume();
    waited.expect("every acquire waits on the paused etcd");
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("acquire task"));
    }
    out
}

async fn etcd_manager(
    test: &str,
) -> Option<(overlay_tests::Etcd, Arc<Counting>, Arc<LeaseManager>)> {
    let etcd = overlay_tests::Etcd::start_or_skip(test)?;
    let inner = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to etcd");
    let store = Arc::new(Counting {
        inner,
        started: AtomicUsize::new(0),
    });
    let m = Arc::new(LeaseManager::new(store.clone(), Keys::new(PREFIX)));
    m.set_config(CONFIG, false).await.expect("config");
    Some((etcd, store, m))
}

/// Finding B: 40 acquires for one node at once create exactly one lease, and every caller
/// is handed that lease: no lease key is ever created and then deleted as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquires_for_one_node_create_one_lease_that_all_get() {
    let Some((etcd, store, m)) =
        etcd_manager("concurrent_acquires_for_one_node_create_one_lease_that_all_get").await
    else {
        return;
    };
    let (_, start) = store.list(PREFIX).await.unwrap();
    let results = acquire_together(&etcd, &store, &m, vec![req("n", MAC); 40]).await;
    let subnets: HashSet<IpNet> = results
        .into_iter()
        .map(|r| r.expect("every acquire succeeds"))
        .collect();
    assert_eq!(subnets.len(), 1, "handed out {subnets:?}");
    let listed = m.list().await.unwrap().0;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(subnets.contains(&listed[0].lease.subnet));
    assert_eq!(
        lease_key_writes(store.as_ref(), start + 1).await,
        (1, 0),
        "(puts, deletes) of lease keys: one lease created, none deleted"
    );
}

/// Finding A, raced: ten nodes acquiring with one VTEP MAC at once; exactly one gets a
/// lease, the others are refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquires_with_one_vtep_mac_lease_it_once() {
    let Some((etcd, store, m)) =
        etcd_manager("concurrent_acquires_with_one_vtep_mac_lease_it_once").await
    else {
        return;
    };
    let reqs = (0..10).map(|i| req(&format!("n{i}"), MAC)).collect();
    let results = acquire_together(&etcd, &store, &m, reqs).await;
    let granted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(granted, 1, "{results:?}");
    let listed = m.list().await.unwrap().0;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let holder = listed[0].lease.node().to_string();
    for e in results.into_iter().filter_map(Result::err) {
        assert!(matches!(e, ControlError::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains(&holder), "{e}");
    }
}
