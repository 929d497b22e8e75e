//! The contract every [`Store`] must meet, as executable cases.
//!
//! The suite runs against both [`MemoryStore`](super::MemoryStore) and
//! [`EtcdStore`](super::EtcdStore) (controller/tests/store_conformance.rs), so the memory
//! store used by unit tests cannot drift from what etcd really does. Cases only assert what
//! both must agree on: ordering and values of revisions, not their exact numbers; events,
//! not how they are split into batches (etcd may merge or split them, and may send empty
//! progress batches).
//!
//! Each case works under its own key prefix. [`watch_from_compacted_revision`] compacts the
//! whole store, so run the suite on a store nobody else uses, one case at a time.
//! Waits are polls bounded by [`PATIENCE`], a hang guard rather than a timing assertion.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{
    Condition, KeyValue, LeaseInfo, Store, StoreError, StoreEvent, TxnWrite, WatchStream, Written,
};

/// The longest any case waits for something that must happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Runs every case in turn, printing each name (visible with `--nocapture`).
pub async fn run_all(store: Arc<dyn Store>) {
    let store = store.as_ref();
    macro_rules! case {
        ($name:ident) => {
            eprintln!("store conformance: {}", stringify!($name));
            $name(store).await;
        };
    }
    case!(ping);
    case!(create_if_absent);
    case!(update_compare_and_set);
    case!(delete_with_and_without_expected_revision);
    case!(txn_writes_all_or_nothing_at_one_revision);
    case!(list_is_sorted_with_a_covering_revision);
    case!(lease_lifecycle);
    case!(lease_expiry_deletes_keys_and_notifies_watchers);
    case!(leases_are_listed_with_their_keys);
    case!(watch_replays_from_a_past_revision);
    case!(watch_from_zero_sees_only_new_events);
    case!(slow_reader_loses_nothing);
    case!(watch_from_compacted_revision);
}

/// A key prefix no other case (or earlier run on the same store) uses.
pub fn unique_prefix(case: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "/conformance/{case}/{}-{nanos}-{}/",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn written(w: Written) -> i64 {
    match w {
        Written::Yes(revision) => revision,
        Written::Conflict => panic!("write conflicted unexpectedly"),
    }
}

async fn must_get(store: &dyn Store, key: &str) -> KeyValue {
    store
        .get(key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} is missing"))
}

/// Reads events (skipping empty batches) until `n` arrived; fails on errors, stream end,
/// or when nothing arrives within [`PATIENCE`].
pub async fn next_events(stream: &mut WatchStream, n: usize) -> Vec<StoreEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        let item = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no watch event within {PATIENCE:?}; got {} of {n}: {events:?}",
                    events.len()
                )
            });
        match item {
            Some(Ok(batch)) => {
                assert!(
                    batch.events.iter().all(|e| e.revision() <= batch.revision),
                    "batch revision {} below one of its events: {batch:?}",
                    batch.revision
                );
                events.extend(batch.events);
            }
            Some(Err(e)) => panic!("watch failed after {} events: {e}", events.len()),
            None => panic!(
                "watch ended after {} of {n} events: {events:?}",
                events.len()
            ),
        }
    }
    events
}

/// Polls `check` every 20 ms until it returns `Some`, failing after [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still not true after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn ping(store: &dyn Store) {
    store.ping().await.expect("ping");
}

pub async fn create_if_absent(store: &dyn Store) {
    let key = format!("{}key", unique_prefix("create"));
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "a fresh key is absent"
    );

    let rev = written(store.create(&key, b"first".to_vec(), 0).await.unwrap());
    let kv = must_get(store, &key).await;
    assert_eq!(
        kv,
        KeyValue {
            key: key.clone(),
            value: b"first".to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: 0
        }
    );

    assert_eq!(
        store.create(&key, b"second".to_vec(), 0).await.unwrap(),
        Written::Conflict
    );
    assert_eq!(
        must_get(store, &key).await,
        kv,
        "a conflicting create changed the key"
    );
}

pub async fn update_compare_and_set(store: &dyn Store) {
    let prefix = unique_prefix("update");
    let key = format!("{prefix}key");
    let created = written(store.create(&key, b"v1".to_vec(), 0).await.unwrap());

    let updated = written(
        store
            .update(&key, b"v2".to_vec(), created, 0)
            .await
            .unwrap(),
    );
    assert!(
        updated > created,
        "update revision {updated} not after create {created}"
    );
    let kv = must_get(store, &key).await;
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"v2"[..], created, updated)
    );

    // A stale expected revision, and "expected absent" on a present key, both conflict.
    assert_eq!(
        store
            .update(&key, b"v3".to_vec(), created, 0)
            .await
            .unwrap(),
        Written::Conflict
    );
    assert_eq!(
        store.update(&key, b"v3".to_vec(), 0, 0).await.unwrap(),
        Written::Conflict
    );
    assert_eq!(
        must_get(store, &key).await,
        kv,
        "a conflicting update changed the key"
    );

    // Expected 0 on an absent key creates it; any other expectation conflicts.
    let absent = format!("{prefix}absent");
    assert_eq!(
        store
            .update(&absent, b"x".to_vec(), updated, 0)
            .await
            .unwrap(),
        Written::Conflict
    );
    assert_eq!(store.get(&absent).await.unwrap(), None);
    let rev = written(store.update(&absent, b"x".to_vec(), 0, 0).await.unwrap());
    let kv = must_get(store, &absent).await;
    assert_eq!((kv.create_revision, kv.mod_revision), (rev, rev));
}

pub async fn delete_with_and_without_expected_revision(store: &dyn Store) {
    let prefix = unique_prefix("delete");
    let key = format!("{prefix}cas");
    let rev = store.put(&key, b"v".to_vec()).await.unwrap();

    assert_eq!(
        store.delete(&key, Some(rev + 1000)).await.unwrap(),
        Written::Conflict
    );
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "a conflicting delete removed the key"
    );
    let deleted = written(store.delete(&key, Some(rev)).await.unwrap());
    assert!(deleted > rev);
    assert_eq!(store.get(&key).await.unwrap(), None);

    // Deleting what does not exist is a conflict, however asked.
    assert_eq!(store.delete(&key, None).await.unwrap(), Written::Conflict);
    assert_eq!(
        store.delete(&key, Some(0)).await.unwrap(),
        Written::Conflict
    );
    assert_eq!(
        store.delete(&key, Some(rev)).await.unwrap(),
        Written::Conflict
    );

    let plain = format!("{prefix}plain");
    let rev = store.put(&plain, b"v".to_vec()).await.unwrap();
    let deleted = written(store.delete(&plain, None).await.unwrap());
    assert!(deleted > rev);
    assert_eq!(store.get(&plain).await.unwrap(), None);
}

fn put(key: &str, value: &[u8], lease: i64) -> TxnWrite {
    TxnWrite::Put {
        key: key.to_string(),
        value: value.to_vec(),
        lease,
    }
}

/// A transaction checks every condition first and then writes everything at one revision
/// or nothing: how a lease key and its index keys are created, moved and deleted together.
pub async fn txn_writes_all_or_nothing_at_one_revision(store: &dyn Store) {
    let prefix = unique_prefix("txn");
    let (a, b, c) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
    );
    let lease = store.grant(Duration::from_secs(600)).await.unwrap();
    let mut watch = store.watch(&prefix, 0).await.unwrap();

    // Create-if-absent of two keys, one attached to a lease.
    let absent = |k: &str| Condition::CreateRevision(k.to_string(), 0);
    let rev = written(
        store
            .txn(
                vec![absent(&a), absent(&b)],
                vec![put(&a, b"1", lease), put(&b, b"2", 0)],
            )
            .await
            .unwrap(),
    );
    let events = next_events(&mut watch, 2).await;
    assert!(
        events.iter().all(|e| e.revision() == rev),
        "one revision: {events:?}"
    );
    let ka = must_get(store, &a).await;
    assert_eq!((ka.create_revision, ka.lease), (rev, lease));
    assert_eq!(must_get(store, &b).await.lease, 0);

    // One failing condition: nothing is written, whatever the others say.
    assert_eq!(
        store
            .txn(
                vec![absent(&c), absent(&b)],
                vec![put(&c, b"3", 0), TxnWrite::Delete { key: a.clone() }],
            )
            .await
            .unwrap(),
        Written::Conflict
    );
    assert_eq!(store.get(&c).await.unwrap(), None);
    assert!(store.get(&a).await.unwrap().is_some());

    // Mod revision conditions; a put and deletes (one of a missing key) at one revision.
    let rev2 = written(
        store
            .txn(
                vec![
                    Condition::ModRevision(a.clone(), rev),
                    Condition::CreateRevision(b.clone(), rev),
                    absent(&c),
                ],
                vec![
                    put(&a, b"1b", lease),
                    TxnWrite::Delete { key: b.clone() },
                    TxnWrite::Delete { key: c.clone() },
                ],
            )
            .await
            .unwrap(),
    );
    assert!(rev2 > rev);
    match next_events(&mut watch, 2).await.as_slice() {
        [StoreEvent::Put(kv), StoreEvent::Delete { key, revision }] => {
            assert_eq!((kv.key.as_str(), kv.mod_revision), (a.as_str(), rev2));
            assert_eq!(
                kv.create_revision, rev,
                "an update keeps the create revision"
            );
            assert_eq!((key.as_str(), *revision), (b.as_str(), rev2));
        }
        other => panic!("expected a put of {a} and the delete of {b}: {other:?}"),
    }
    assert_eq!(store.get(&b).await.unwrap(), None);

    // Only deletes of missing keys: no new revision.
    let (_, before) = store.list(&prefix).await.unwrap();
    let same = written(
        store
            .txn(vec![], vec![TxnWrite::Delete { key: c.clone() }])
            .await
            .unwrap(),
    );
    assert_eq!(
        same, before,
        "a transaction that changes nothing made a revision"
    );

    // A put on a revoked lease fails as such and writes nothing, not even the other puts.
    let gone = store.grant(Duration::from_secs(600)).await.unwrap();
    store.revoke(gone).await.unwrap();
    let err = store
        .txn(vec![], vec![put(&c, b"x", 0), put(&b, b"y", gone)])
        .await;
    assert!(
        matches!(err, Err(StoreError::LeaseNotFound(id)) if id == gone),
        "txn with a revoked lease: {err:?}"
    );
    assert_eq!(store.get(&c).await.unwrap(), None);
    assert_eq!(store.get(&b).await.unwrap(), None);

    // Revoking the lease deletes what the transaction attached to it.
    store.revoke(lease).await.unwrap();
    assert_eq!(store.get(&a).await.unwrap(), None);
}

pub async fn list_is_sorted_with_a_covering_revision(store: &dyn Store) {
    let prefix = unique_prefix("list");
    let (empty, _) = store.list(&prefix).await.unwrap();
    assert!(empty.is_empty(), "fresh prefix lists {empty:?}");

    let mut last = 0;
    for name in ["c", "a", "b"] {
        last = store
            .put(&format!("{prefix}{name}"), name.as_bytes().to_vec())
            .await
            .unwrap();
    }
    // Outside the prefix: a sibling sharing all but the trailing '/'.
    store
        .put(
            &format!("{}x", prefix.trim_end_matches('/')),
            b"no".to_vec(),
        )
        .await
        .unwrap();

    let (kvs, revision) = store.list(&prefix).await.unwrap();
    let keys: Vec<&str> = kvs
        .iter()
        .map(|kv| kv.key.strip_prefix(&prefix).unwrap_or(&kv.key))
        .collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert!(kvs
        .iter()
        .all(|kv| kv.value == kv.key.strip_prefix(&prefix).unwrap().as_bytes()));
    assert!(
        revision >= last,
        "list revision {revision} before the last put {last}"
    );
    assert!(
        kvs.iter().all(|kv| kv.mod_revision <= revision),
        "list revision {revision} below {kvs:?}"
    );
}

pub async fn lease_lifecycle(store: &dyn Store) {
    let prefix = unique_prefix("lease");
    // 4.5 s rounds up to 5 s.
    let lease = store.grant(Duration::from_millis(4500)).await.unwrap();
    assert_ne!(lease, 0);
    assert_eq!(
        store.keep_alive(lease).await.unwrap(),
        Duration::from_secs(5)
    );

    let held = format!("{prefix}held");
    let released = format!("{prefix}released");
    written(store.create(&held, b"h".to_vec(), lease).await.unwrap());
    assert_eq!(must_get(store, &held).await.lease, lease);
    let rev = written(store.create(&released, b"r".to_vec(), lease).await.unwrap());
    // Lease 0 on update detaches the key from its lease.
    written(
        store
            .update(&released, b"r".to_vec(), rev, 0)
            .await
            .unwrap(),
    );
    assert_eq!(must_get(store, &released).await.lease, 0);

    let first = store
        .time_to_live(lease)
        .await
        .unwrap()
        .expect("the lease exists");
    assert!(
        first <= Duration::from_secs(5) && first > Duration::ZERO,
        "time to live {first:?}"
    );
    eventually("time to live decreases", || async {
        let now = store
            .time_to_live(lease)
            .await
            .unwrap()
            .expect("the lease exists");
        (now < first).then_some(())
    })
    .await;

    let mut watch = store.watch(&prefix, 0).await.unwrap();
    store.revoke(lease).await.unwrap();
    match next_events(&mut watch, 1).await.as_slice() {
        [StoreEvent::Delete { key, .. }] => assert_eq!(key, &held),
        other => panic!("expected the delete of {held}, got {other:?}"),
    }
    assert_eq!(
        store.get(&held).await.unwrap(),
        None,
        "revoke left the lease's key"
    );
    assert!(
        store.get(&released).await.unwrap().is_some(),
        "revoke deleted a detached key"
    );

    assert!(
        matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    assert_eq!(store.time_to_live(lease).await.unwrap(), None);
    store
        .revoke(lease)
        .await
        .expect("revoking a revoked lease is fine");
    let err = store
        .create(&format!("{prefix}late"), b"x".to_vec(), lease)
        .await;
    assert!(
        matches!(err, Err(StoreError::LeaseNotFound(id)) if id == lease),
        "create with a revoked lease: {err:?}"
    );
}

pub async fn lease_expiry_deletes_keys_and_notifies_watchers(store: &dyn Store) {
    let prefix = unique_prefix("expiry");
    let key = format!("{prefix}key");
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    let mut watch = store.watch(&prefix, 0).await.unwrap();
    let rev = written(store.create(&key, b"v".to_vec(), lease).await.unwrap());

    let events = next_events(&mut watch, 2).await;
    assert!(
        matches!(&events[0], StoreEvent::Put(kv) if kv.key == key && kv.lease == lease),
        "{events:?}"
    );
    match &events[1] {
        StoreEvent::Delete {
            key: deleted,
            revision,
        } => {
            assert_eq!(deleted, &key);
            assert!(*revision > rev);
        }
        other => panic!("expected the expiry's delete, got {other:?}"),
    }
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert!(
        matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    assert_eq!(store.time_to_live(lease).await.unwrap(), None);
}

async fn must_lease_info(store: &dyn Store, lease: i64) -> LeaseInfo {
    store
        .lease_info(lease)
        .await
        .expect("lease_info")
        .unwrap_or_else(|| panic!("lease {lease:x} is missing"))
}

pub async fn leases_are_listed_with_their_keys(store: &dyn Store) {
    let prefix = unique_prefix("lease-keys");
    // Long TTLs: nothing may expire during the case. 1.5 s rounds up to 2 s.
    let holder = store.grant(Duration::from_secs(600)).await.unwrap();
    let bare = store.grant(Duration::from_millis(1500)).await.unwrap();
    let listed = store.list_leases().await.unwrap();
    assert!(
        listed.contains(&holder) && listed.contains(&bare),
        "{holder:x} and {bare:x} not both in {listed:x?}"
    );

    // Created out of order: keys come back sorted.
    let (b, a, detached, gone) = (
        format!("{prefix}b"),
        format!("{prefix}a"),
        format!("{prefix}detached"),
        format!("{prefix}gone"),
    );
    for key in [&b, &a, &detached, &gone] {
        written(store.create(key, b"v".to_vec(), holder).await.unwrap());
    }
    let rev = must_get(store, &detached).await.mod_revision;
    written(
        store
            .update(&detached, b"v".to_vec(), rev, 0)
            .await
            .unwrap(),
    );
    written(store.delete(&gone, None).await.unwrap());

    let info = must_lease_info(store, holder).await;
    assert_eq!(info.id, holder);
    assert_eq!(info.keys, vec![a.clone(), b.clone()], "keys of {holder:x}");
    assert_eq!(info.granted_ttl, Duration::from_secs(600));
    assert!(
        info.remaining <= info.granted_ttl && info.idle() < Duration::from_secs(600),
        "{info:?}"
    );

    let info = must_lease_info(store, bare).await;
    assert!(info.keys.is_empty(), "a lease without keys lists {info:?}");
    assert_eq!(info.granted_ttl, Duration::from_secs(2));
    // Idle time grows while nobody keeps the lease alive...
    let before = info.idle();
    eventually("idle time grows", || async {
        let now = must_lease_info(store, bare).await.idle();
        (now > before).then_some(())
    })
    .await;
    // ...and expiry ends the lease (and its listing).
    eventually("the bare lease expires", || async {
        store
            .lease_info(bare)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!store.list_leases().await.unwrap().contains(&bare));

    store.revoke(holder).await.unwrap();
    assert_eq!(store.lease_info(holder).await.unwrap(), None);
    assert!(
        !store.list_leases().await.unwrap().contains(&holder),
        "a revoked lease is still listed"
    );
    assert_eq!(store.get(&a).await.unwrap(), None, "revoke left {a}");
    assert!(store.get(&detached).await.unwrap().is_some());
}

pub async fn watch_replays_from_a_past_revision(store: &dyn Store) {
    let prefix = unique_prefix("replay");
    let (a, b, c) = (
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
    );
    let r1 = store.put(&a, b"a1".to_vec()).await.unwrap();
    let r2 = store.put(&b, b"b1".to_vec()).await.unwrap();
    let r3 = written(store.delete(&a, None).await.unwrap());
    let r4 = store.put(&b, b"b2".to_vec()).await.unwrap();
    store
        .put(
            &format!("{}-other", prefix.trim_end_matches('/')),
            b"no".to_vec(),
        )
        .await
        .unwrap();

    let mut watch = store.watch(&prefix, r1).await.unwrap();
    let replayed = next_events(&mut watch, 4).await;
    let kv = |key: &str, value: &[u8], create_revision, mod_revision| {
        StoreEvent::Put(KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision,
            mod_revision,
            lease: 0,
        })
    };
    assert_eq!(
        replayed,
        vec![
            kv(&a, b"a1", r1, r1),
            kv(&b, b"b1", r2, r2),
            StoreEvent::Delete {
                key: a.clone(),
                revision: r3
            },
            kv(&b, b"b2", r2, r4),
        ]
    );

    // The replay continues seamlessly into live events.
    let r5 = store.put(&c, b"c1".to_vec()).await.unwrap();
    assert_eq!(
        next_events(&mut watch, 1).await,
        vec![kv(&c, b"c1", r5, r5)]
    );

    // A watch from a later revision replays only from there.
    let mut later = store.watch(&prefix, r4).await.unwrap();
    assert_eq!(
        next_events(&mut later, 2).await,
        vec![kv(&b, b"b2", r2, r4), kv(&c, b"c1", r5, r5)]
    );
}

pub async fn watch_from_zero_sees_only_new_events(store: &dyn Store) {
    let prefix = unique_prefix("now");
    store
        .put(&format!("{prefix}old"), b"old".to_vec())
        .await
        .unwrap();
    let mut watch = store.watch(&prefix, 0).await.unwrap();
    let new = format!("{prefix}new");
    let rev = store.put(&new, b"new".to_vec()).await.unwrap();
    match next_events(&mut watch, 1).await.as_slice() {
        [StoreEvent::Put(kv)] => {
            assert_eq!((kv.key.as_str(), kv.mod_revision), (new.as_str(), rev))
        }
        other => panic!("expected only the put of {new}, got {other:?}"),
    }
}

pub async fn slow_reader_loses_nothing(store: &dyn Store) {
    // More events than etcd buffers per watcher (128) before it parks a slow one.
    const WRITES: usize = 300;
    let prefix = unique_prefix("slow");
    let mut watch = store.watch(&prefix, 0).await.unwrap();
    // Concurrent writes keep this quick on etcd; their order is whatever revisions say.
    let writes = (0..WRITES).map(|i| {
        let key = format!("{prefix}{i:04}");
        async move { (store.put(&key, vec![b'x'; 512]).await.expect("put"), key) }
    });
    let mut expected: Vec<(i64, String)> = futures::future::join_all(writes).await;
    expected.sort();

    let events = next_events(&mut watch, WRITES).await;
    let seen: Vec<(i64, String)> = events
        .iter()
        .map(|e| (e.revision(), e.key().to_owned()))
        .collect();
    assert_eq!(seen, expected, "events missing, duplicated or out of order");
}

pub async fn watch_from_compacted_revision(store: &dyn Store) {
    let prefix = unique_prefix("compacted");
    let key = format!("{prefix}key");
    let r1 = store.put(&key, b"1".to_vec()).await.unwrap();
    let r2 = store.put(&key, b"2".to_vec()).await.unwrap();
    let r3 = store.put(&key, b"3".to_vec()).await.unwrap();
    store.compact(r2).await.unwrap();
    store
        .compact(r2)
        .await
        .expect("compacting a compacted revision again is a no-op");

    let mut watch = store.watch(&prefix, r1).await.unwrap();
    let first = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("no answer from a compacted watch");
    match first {
        Some(Err(StoreError::Compacted {
            requested,
            compact_revision,
        })) => {
            assert_eq!((requested, compact_revision), (r1, r2));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let after = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a compacted watch did not end");
    assert!(after.is_none(), "a compacted watch went on: {after:?}");

    // The newest history is still there.
    let mut watch = store.watch(&prefix, r3).await.unwrap();
    match next_events(&mut watch, 1).await.as_slice() {
        [StoreEvent::Put(kv)] => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"3"[..], r3))
        }
        other => panic!("expected the put at {r3}, got {other:?}"),
    }
}
