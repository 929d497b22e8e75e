//! Runs the store conformance suite against the memory store and against a real etcd, and
//! checks how the etcd store behaves when etcd goes away.

use std::sync::Arc;

use futures::StreamExt;
use overlay_controller::store::{conformance, EtcdStore, MemoryStore, Store, StoreError};

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn etcd_store_conforms() {
    let Some(etcd) = overlay_tests::Etcd::start_or_skip("etcd_store_conformance") else {
        return;
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to etcd");
    conformance::run_all(Arc::new(store)).await;
}

/// A dead etcd ends watches with `Unavailable` and fails requests with `Unavailable`
/// instead of hanging.
#[tokio::test]
async fn etcd_store_reports_a_dead_etcd_as_unavailable() {
    let Some(mut etcd) =
        overlay_tests::Etcd::start_or_skip("etcd_store_reports_a_dead_etcd_as_unavailable")
    else {
        return;
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to etcd");
    let mut watch = store.watch("/dead/", 0).await.expect("watch");
    store.put("/dead/key", b"v".to_vec()).await.expect("put");
    let first = watch
        .next()
        .await
        .expect("watch item")
        .expect("watch batch");
    assert_eq!(first.events.len(), 1);

    etcd.stop();
    let item = tokio::time::timeout(conformance::PATIENCE, watch.next())
        .await
        .expect("the watch hangs");
    assert!(
        matches!(item, Some(Err(StoreError::Unavailable(_)))),
        "watch after etcd died: {item:?}"
    );
    let item = tokio::time::timeout(conformance::PATIENCE, watch.next())
        .await
        .expect("the watch hangs");
    assert!(item.is_none(), "the watch goes on after failing: {item:?}");

    let get = store.get("/dead/key").await;
    assert!(
        matches!(get, Err(StoreError::Unavailable(_))),
        "get after etcd died: {get:?}"
    );
    let ping = store.ping().await;
    assert!(
        matches!(ping, Err(StoreError::Unavailable(_))),
        "ping after etcd died: {ping:?}"
    );
}

/// An etcd that is not running gives `Unavailable` right away; connecting does not need it.
#[tokio::test]
async fn etcd_store_without_etcd_is_unavailable() {
    let endpoint = format!("http://127.0.0.1:{}", overlay_tests::free_port());
    let store = EtcdStore::connect(&[endpoint])
        .await
        .expect("connecting does not need etcd");
    let ping = store.ping().await;
    assert!(
        matches!(ping, Err(StoreError::Unavailable(_))),
        "ping: {ping:?}"
    );
    let get = store.get("/key").await;
    assert!(
        matches!(get, Err(StoreError::Unavailable(_))),
        "get: {get:?}"
    );
    let watch = store.watch("/key", 0).await.map(|_| ());
    assert!(
        matches!(watch, Err(StoreError::Unavailable(_))),
        "watch: {watch:?}"
    );
    let grant = store.grant(std::time::Duration::from_secs(1)).await;
    assert!(
        matches!(grant, Err(StoreError::Unavailable(_))),
        "grant: {grant:?}"
    );
}
