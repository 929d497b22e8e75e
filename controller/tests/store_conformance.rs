//! Runs the store conformance suite against the memory store and against a real etcd, and
//! checks how the etcd store behaves when etcd goes away.

use std::sync::Arc;

use futures::StreamExt;
use overlay_controller::store::{
    conformance, EtcdOptions, EtcdStore, MemoryStore, Store, StoreError,
};

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

fn user(name: &str, password: &str) -> EtcdOptions {
    EtcdOptions {
        user: Some(name.into()),
        password: Some(password.into()),
        ..EtcdOptions::default()
    }
}

fn etcdctl(etcd: &overlay_tests::Etcd, args: &[&str]) {
    let out = etcd.etcdctl(args);
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With etcd authentication on, every operation works for a user with the right password
/// (tokens included: watches, keepalive streams, lease listing, compaction), and wrong or
/// missing credentials are `AccessDenied`, not `Unavailable`.
#[tokio::test]
async fn etcd_store_with_authentication() {
    let Some(etcd) = overlay_tests::Etcd::start_or_skip("etcd_store_with_authentication") else {
        return;
    };
    let endpoints = std::slice::from_ref(&etcd.endpoint);
    // A user on an etcd without authentication is ignored, as etcd's Go client does.
    let store = EtcdStore::connect_with(endpoints, &user("root", "pw"))
        .await
        .expect("a user on an etcd without authentication");
    store.put("/auth/before", b"v".to_vec()).await.expect("put");

    etcdctl(&etcd, &["user", "add", "root:pw"]);
    etcdctl(&etcd, &["auth", "enable"]);

    let wrong = EtcdStore::connect_with(endpoints, &user("root", "nope")).await;
    match wrong {
        Err(StoreError::AccessDenied(m)) => {
            assert!(m.contains("root") && m.contains("--etcd-user"), "{m}")
        }
        Err(e) => panic!("a wrong password gave {e:?}"),
        Ok(_) => panic!("a wrong password connected"),
    }
    let anonymous = EtcdStore::connect(endpoints)
        .await
        .expect("connect is lazy");
    let get = anonymous.get("/auth/before").await;
    assert!(
        matches!(get, Err(StoreError::AccessDenied(_))),
        "get without credentials: {get:?}"
    );

    let store = EtcdStore::connect_with(endpoints, &user("root", "pw"))
        .await
        .expect("connect as root");
    assert!(store.get("/auth/before").await.expect("get").is_some());
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn etcd_options_that_cannot_work_name_their_flag() {
    let http = vec!["http://127.0.0.1:2379".to_string()];
    let https = vec!["https://127.0.0.1:2379".to_string()];
    let missing = std::path::PathBuf::from("/nonexistent/ca.pem");
    let cases = [
        (https.clone(), EtcdOptions::default(), "--etcd-cacert"),
        (
            http.clone(),
            EtcdOptions {
                ca_cert: Some(missing.clone()),
                ..EtcdOptions::default()
            },
            "https://",
        ),
        (
            https.clone(),
            EtcdOptions {
                ca_cert: Some(missing.clone()),
                ..EtcdOptions::default()
            },
            "--etcd-cacert /nonexistent/ca.pem",
        ),
        (
            https.clone(),
            EtcdOptions {
                ca_cert: Some(missing.clone()),
                client_cert: Some(missing.clone()),
                ..EtcdOptions::default()
            },
            "--etcd-key",
        ),
        (
            http.clone(),
            EtcdOptions {
                user: Some("root".into()),
                ..EtcdOptions::default()
            },
            "--etcd-password",
        ),
    ];
    for (endpoints, options, expected) in cases {
        match EtcdStore::connect_with(&endpoints, &options).await {
            Err(StoreError::InvalidOptions(m)) => {
                assert!(
                    m.contains(expected),
                    "{options:?}: {m:?} lacks {expected:?}"
                )
            }
            Err(e) => panic!("{options:?}: {e:?}"),
            Ok(_) => panic!("{options:?} connected"),
        }
    }
    let secret = format!("{:?}", user("root", "hunter2"));
    assert!(
        !secret.contains("hunter2"),
        "Debug shows the password: {secret}"
    );
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
    let endpoint = format!(
        "http://{}",
        overlay_tests::loopback_addr(overlay_tests::next_port())
    );
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
