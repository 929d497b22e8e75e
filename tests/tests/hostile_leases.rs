//! Hostile clients and bad data change nothing, end to end: the real controller, agent and
//! `overlayctl` on a real etcd, against a node that publishes another node's VTEP MAC,
//! and against keys in etcd that clash, stray or do not decode.

use std::collections::BTreeMap;
use std::time::Duration;

use overlay_core::lease::{now_millis, BackendData, LeaseRecord};
use overlay_core::BackendType;
use overlay_proto::v1::{self, agent_client::AgentClient, watch_leases_response::Kind};
use overlay_tests::cluster::{etcdctl, http_get, overlayctl, overlayctl_json, Agent};
use overlay_tests::wait_until;
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(30);
const MAC: &str = "02:00:00:00:aa:01";

use overlay_tests::cluster::Configured as Setup;

/// etcd, one controller and a config of `backend`, leasing at random up to
/// `overlay_tests::labs::RANDOM_SUBNET_MAX`; `None` when etcd is missing (skipped).
fn setup(test: &str, backend: &str) -> Option<Setup> {
    Setup::start(test, backend)
}

/// (subnet, node) of every lease `overlayctl leases` lists.
fn leases(controller: &str) -> BTreeMap<String, String> {
    overlayctl_json(controller, &["leases"])
        .as_array()
        .expect("leases is an array")
        .iter()
        .map(|l| {
            (
                l["subnet"].as_str().unwrap_or_default().to_string(),
                l["node"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// (subnet, node) of every lease in a fresh watch snapshot.
async fn watch_snapshot(url: &str) -> BTreeMap<String, String> {
    let mut agent = AgentClient::connect(url.to_string())
        .await
        .expect("connect");
    let mut stream = agent
        .watch_leases(v1::WatchLeasesRequest { after_revision: 0 })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a snapshot in time")
        .expect("watch message")
        .expect("watch open");
    let Some(Kind::Snapshot(snap)) = first.kind else {
        panic!("a snapshot comes first")
    };
    snap.leases
        .into_iter()
        .map(|l| (l.subnet, l.node))
        .collect()
}

fn acquire_request(node: &str, public_ip: &str, mac: &str) -> v1::AcquireLeaseRequest {
    v1::AcquireLeaseRequest {
        node: node.into(),
        public_ip: public_ip.into(),
        backend: v1::BackendType::Vxlan as i32,
        vtep_mac: Some(mac.into()),
        preferred_subnet: None,
        iface: None,
        underlay: None,
        ..Default::default()
    }
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Finding A: a node asking for a lease with another node's VTEP MAC is refused, naming
/// that node; the victim keeps its lease, and every peer keeps routing to the victim
/// through its MAC.
#[tokio::test]
async fn a_node_cannot_take_another_nodes_vtep_mac() {
    let Some(s) = setup("a_node_cannot_take_another_nodes_vtep_mac", "vxlan") else {
        return;
    };
    let mut agent = AgentClient::connect(s.controller.url.clone())
        .await
        .expect("connect");
    let victim = agent
        .acquire_lease(acquire_request("victim", "192.0.2.11", MAC))
        .await
        .expect("the victim's lease")
        .into_inner()
        .lease
        .expect("a lease");
    agent
        .acquire_lease(acquire_request(
            "observer",
            "192.0.2.12",
            "02:00:00:00:aa:02",
        ))
        .await
        .expect("the observer's lease");

    let refused = agent
        .acquire_lease(acquire_request("attacker", "192.0.2.13", MAC))
        .await
        .expect_err("the attacker is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("\"victim\"") && refused.message().contains(&victim.subnet),
        "{}",
        refused.message()
    );

    let held = leases(&s.controller.url);
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held.get(&victim.subnet).map(String::as_str), Some("victim"));
    assert_eq!(watch_snapshot(&s.controller.url).await, held);
    let routes = overlayctl_json(&s.controller.url, &["routes", "--node", "observer"]);
    let to_victim: Vec<&Value> = routes
        .as_array()
        .expect("routes is an array")
        .iter()
        .filter(|r| r["subnet"] == victim.subnet.as_str())
        .collect();
    assert_eq!(to_victim.len(), 1, "{routes}");
    assert_eq!(to_victim[0]["vtep_mac"], MAC);
    assert_eq!(to_victim[0]["fdb_dst"], "192.0.2.11");
}

/// A reservation (a key without an etcd lease) as an older release or an operator with
/// etcdctl would have written it.
fn reservation(node: &str, public_ip: &str, mac: Option<&str>) -> String {
    let record = LeaseRecord {
        node: node.into(),
        public_ip: Some(public_ip.parse().unwrap()),
        public_ipv6: None,
        ipv6_subnet: None,
        backend: BackendType::Vxlan,
        backend_data: BackendData {
            vtep_mac: mac.map(|m| m.parse().unwrap()),
            ..Default::default()
        },
        reserved: true,
        created_at: now_millis(),
        renewed_at: now_millis(),
    };
    String::from_utf8(record.encode()).unwrap()
}

/// Finding C and clashes in existing data: keys written straight into etcd that clash
/// (two leases of one node, two leases with one VTEP MAC), stray (a non-canonical key, a
/// /17 in a network of /24s) or do not decode are never served: the listing and the watch
/// agree on the leases, the older lease of a clash wins, and every ignored key is reported
/// by `overlayctl status` and the controller's metrics.
#[tokio::test]
async fn clashing_stray_and_unreadable_keys_are_ignored_and_reported() {
    let Some(s) = setup(
        "clashing_stray_and_unreadable_keys_are_ignored_and_reported",
        "vxlan",
    ) else {
        return;
    };
    // Written in this order: the first of each clash is the older (lower create revision).
    let writes = [
        (
            "10.244.201.0-24",
            reservation("victim", "192.0.2.21", Some(MAC)),
        ),
        (
            "10.244.202.0-24",
            reservation("attacker", "192.0.2.22", Some(MAC)),
        ),
        ("10.244.203.0-24", reservation("twin", "192.0.2.23", None)),
        ("10.244.204.0-24", reservation("twin", "192.0.2.24", None)),
        ("10.244.205.0-024", reservation("stray", "192.0.2.25", None)),
        ("10.244.128.0-17", reservation("wide", "192.0.2.26", None)),
        ("10.244.206.0-24", "{\"node\": \"broken".to_string()),
    ];
    for (key, value) in &writes {
        etcdctl(&s.etcd, &["put", &format!("/overlay/leases/{key}"), value]);
    }
    let expected: BTreeMap<String, String> =
        [("10.244.201.0/24", "victim"), ("10.244.203.0/24", "twin")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(leases(&s.controller.url), expected, "the listing");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let snapshot = watch_snapshot(&s.controller.url).await;
        if snapshot == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch serves {snapshot:?}, the listing {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let status = overlayctl(&s.controller.url, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    for (key, reason) in [
        ("10.244.202.0-24", "mac_clash"),
        ("10.244.204.0-24", "node_clash"),
        ("10.244.205.0-024", "bad_key"),
        ("10.244.128.0-17", "outside_config"),
        ("10.244.206.0-24", "unreadable"),
    ] {
        let line = format!("ignored /overlay/leases/{key} ({reason})");
        assert!(text.contains(&line), "status lacks {line:?}:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "VTEP MAC {MAC} is already published by node victim"
        )),
        "{text}"
    );
    let json = overlayctl_json(&s.controller.url, &["status"]);
    assert_eq!(json["ignored"].as_array().map(Vec::len), Some(5), "{json}");

    let port = s.controller.health_port;
    let counted = wait_until(PATIENCE, || {
        let (_, body) = http_get(port, "/metrics")?;
        let all = [
            ("mac_clash", 1.0),
            ("node_clash", 1.0),
            ("bad_key", 1.0),
            ("outside_config", 1.0),
            ("unreadable", 1.0),
            ("no_config", 0.0),
        ]
        .iter()
        .all(|(reason, n)| {
            metric(
                &body,
                &format!("overlay_controller_ignored_lease_keys{{reason=\"{reason}\"}}"),
            ) == Some(*n)
        });
        all.then_some(())
    });
    assert!(
        counted.is_some(),
        "metrics: {:?}",
        http_get(port, "/metrics").map(|(_, b)| b)
    );
    assert!(
        s.controller.log().contains("is not a lease"),
        "no log line for the ignored keys:\n{}",
        s.controller.log()
    );
}

/// Finding C (renew of a corrupt value): an agent whose lease value is overwritten with
/// garbage in etcd keeps its subnet: its lease disappears for watchers, its renewal fails,
/// and its acquire rewrites the value in place.
#[test]
fn an_agent_keeps_its_subnet_when_its_lease_value_is_corrupted() {
    let Some(s) = setup(
        "an_agent_keeps_its_subnet_when_its_lease_value_is_corrupted",
        "alloc",
    ) else {
        return;
    };
    let agent = Agent::start(&s.controller.url, "h1", "192.0.2.31", s.dir.path(), &[]);
    let subnet = agent.wait_subnet(PATIENCE);
    let key = format!("/overlay/leases/{}", subnet.replace('/', "-"));
    etcdctl(
        &s.etcd,
        &["put", "--ignore-lease", &key, "{\"node\": 1, garbage"],
    );
    let value = || etcdctl(&s.etcd, &["get", "--print-value-only", &key]);
    let rewritten = wait_until(PATIENCE, || {
        LeaseRecord::decode(value().trim_end().as_bytes())
            .ok()
            .filter(|r| r.node == "h1")
    });
    assert!(
        rewritten.is_some(),
        "the value was not rewritten: {:?}\nagent log:\n{}",
        value(),
        agent.log()
    );
    assert_eq!(
        leases(&s.controller.url).get(&subnet).map(String::as_str),
        Some("h1"),
        "the agent lost its subnet"
    );
    assert_eq!(agent.subnet().as_deref(), Some(subnet.as_str()));
    assert!(
        s.controller
            .log()
            .contains("whose stored value was unreadable"),
        "{}",
        s.controller.log()
    );
}
