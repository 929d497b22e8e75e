use super::*;
use crate::store::MemoryStore;
use crate::store::{Condition, TxnWrite};

const CONFIG: &str = r#"{"network":"10.244.0.0/16","backend":{"type":"alloc"},"lease_ttl":"60s"}"#;

async fn manager(config: &str) -> LeaseManager {
    let m = LeaseManager::new(Arc::new(MemoryStore::new()), Keys::new("/t"));
    m.set_config(config, false).await.unwrap();
    m
}

fn req(node: &str) -> AcquireRequest {
    AcquireRequest {
        node: node.into(),
        public_ip: Some("192.0.2.1".parse().unwrap()),
        backend: BackendType::Alloc,
        data: BackendData::default(),
        preferred: None,
        ..Default::default()

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
    moved.public_ip = Some("192.0.2.99".parse().unwrap());
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
    let fixed: IpNet = "10.244.250.0/24".parse().unwrap();
    m.reserve(&Reservation::v4(fixed, "pinned", "192.0.2.9".parse().unwrap()))
        .await
        .unwrap();
    let a = m.acquire(&req("a")).await.unwrap();
    let b = m.acquire(&req("b")).await.unwrap();
    assert!(m.acquire(&req("c")).await.is_err(), "the range holds two");
    assert_ne!(a.lease.subnet, fixed);
    assert_ne!(b.lease.subnet, fixed);
    let mut pinned = req("pinned");
    pinned.public_ip = Some("192.0.2.9".parse().unwrap());
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
        public_ip: Some("192.0.2.99".parse().unwrap()),
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
            public_ipv6: None,
            ipv6_subnet: None,
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
            .key_pool().range()
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
    let s: IpNet = "10.244.200.0/24".parse().unwrap();
    let r = m
        .reserve(&Reservation::v4(s, "pinned", "192.0.2.5".parse().unwrap()))
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
        .reserve(&Reservation::v4(other.lease.subnet, "x", "192.0.2.6".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("other"), "{e}");
    // Outside the network: refused.
    let e = m
        .reserve(&Reservation::v4("10.245.0.0/24".parse::<IpNet>().unwrap(), "x", "192.0.2.6".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::InvalidArgument(_)), "{e}");
    // Reserving a node's current lease pins it in place.
    let pinned = m
        .reserve(&Reservation::v4(other.lease.subnet, "other", "192.0.2.1".parse().unwrap()))
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
    let s: IpNet = "10.244.201.0/24".parse().unwrap();
    m.reserve(&Reservation::v4(s, "n", "192.0.2.1".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(m.acquire(&req("n")).await.unwrap().lease.subnet, s);
    let subnets: Vec<IpNet> = m
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
                public_ip: Some("0.0.0.0".parse().unwrap()),
                ..req("x")
            },
            "public IP",
        ),
        (
            AcquireRequest {
                public_ip: Some("10.244.3.3".parse().unwrap()),
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
        e.to_string().contains(&a.lease.subnet.to_string()) && e.to_string().contains("--force"),
        "{e}"
    );
    assert_eq!(
        m.config().await.unwrap().networks_text(),
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
    assert_eq!(config.networks_text(), "10.245.0.0/16");
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
async fn all_at_once(managers: &[Arc<LeaseManager>], nodes: &[String]) -> (Vec<IpNet>, usize) {
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
    let subnets: HashSet<IpNet> = listed.iter().map(|l| l.lease.subnet).collect();
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
    let subnets: HashSet<IpNet> = listed.iter().map(|l| l.lease.subnet).collect();
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
        LeaseManager::new(store, Keys::new("/t")).with_acquire_limits(1, Duration::from_millis(50)),
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
