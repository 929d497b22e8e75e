//! What the control-plane scenarios (controller kills, slow watchers, bad input; etcd
//! only) share: plaintext gRPC channels to their own controllers, a runtime, and
//! [`EtcdView`], etcd's own picture of the cluster read with a real etcd client, so that
//! "nothing changed" and "nothing was orphaned" are judged on the store itself rather
//! than on what a controller says.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use overlay_tests::cluster::{overlayctl, Controller};
use overlay_tests::Etcd;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::sum_metric;

pub fn grpc_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("controller URL")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_lazy()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub async fn etcd_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint.clone()], None)
        .await
        .expect("connect to etcd")
}

/// Lease keys, modification revisions and config: see [`EtcdView::written`].
pub type Written<'a> = (
    &'a BTreeMap<String, (String, i64)>,
    &'a BTreeMap<String, i64>,
    &'a str,
);

/// What etcd holds for the cluster (prefix `/overlay`), read with a real etcd client:
/// lease keys, the config, every etcd lease and which of them a key uses.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdView {
    /// Lease keys: key -> (node, etcd lease).
    pub keys: BTreeMap<String, (String, i64)>,
    /// The modification revision of every lease key and of the config: what a write to
    /// either would change (the store's revision also moves with unrelated writes, such
    /// as the controllers' leader election).
    pub mod_revisions: BTreeMap<String, i64>,
    /// Every etcd lease, and those some key (of any prefix) is attached to.
    pub leases: BTreeSet<i64>,
    pub attached: BTreeSet<i64>,
    pub revision: i64,
    pub config: String,
}

impl EtcdView {
    pub async fn read(etcd: &mut etcd_client::Client) -> EtcdView {
        let got = etcd
            .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
            .await
            .expect("etcd get");
        let revision = got.header().expect("header").revision();
        let mut view = EtcdView {
            keys: BTreeMap::new(),
            mod_revisions: BTreeMap::new(),
            leases: BTreeSet::new(),
            attached: BTreeSet::new(),
            revision,
            config: String::new(),
        };
        for kv in got.kvs() {
            let key = kv.key_str().unwrap_or_default().to_string();
            if kv.lease() != 0 {
                view.attached.insert(kv.lease());
            }
            if key.starts_with("/overlay/leases/") {
                let record: serde_json::Value =
                    serde_json::from_slice(kv.value()).unwrap_or_default();
                let node = record["node"].as_str().unwrap_or_default().to_string();
                view.keys.insert(key.clone(), (node, kv.lease()));
                view.mod_revisions.insert(key, kv.mod_revision());
            } else if key == "/overlay/config" {
                view.config = String::from_utf8_lossy(kv.value()).into_owned();
                view.mod_revisions.insert(key, kv.mod_revision());
            }
        }
        view.leases = etcd
            .leases()
            .await
            .expect("etcd lease list")
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        view
    }

    /// etcd leases that no key is attached to.
    pub fn orphaned_leases(&self) -> BTreeSet<i64> {
        self.leases.difference(&self.attached).copied().collect()
    }

    /// What no rejected request may change: the leases and the config, down to their
    /// modification revisions.
    pub fn written(&self) -> Written<'_> {
        (&self.keys, &self.mod_revisions, &self.config)
    }
}

pub fn set_config(url: &str, args: &[&str]) {
    let mut all = vec!["config", "set"];
    all.extend_from_slice(args);
    let out = overlayctl(url, &all);
    assert!(
        out.status.success(),
        "config set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A controller's counter from `/metrics`.
pub fn metric(c: &Controller, name: &str) -> u64 {
    let (_, body) = overlay_tests::cluster::http_get(c.health_port, "/metrics").unwrap_or_default();
    sum_metric(&body, name)
}

/// Whether a status is worth trying again on the other controller: no answer from this
/// one (it died mid-call), or a lost compare-and-set race (`Aborted`), as agents do.
pub fn is_retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

pub fn doc_ip(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("198.51.100.{}", 1 + (i / 2) % 254)
    } else {
        format!("203.0.113.{}", 1 + (i / 2) % 254)
    }
}
