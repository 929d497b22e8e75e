//! Hostile clients and bad data change nothing: the real controller on a real etcd, raw
//! gRPC clients that send what no agent would, values planted in etcd behind the
//! controller's back, and `overlayctl` printing what it gets.

use std::process::Output;
use std::time::Duration;

use overlay_proto::v1::{self, admin_client::AdminClient, agent_client::AgentClient};
use overlay_tests::cluster::{etcdctl, overlayctl, overlayctl_json, Configured, Controller};
use overlay_tests::Etcd;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

struct Setup {
    etcd: Etcd,
    controller: Controller,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

/// etcd, one controller and a config of `backend` on 10.244.0.0/16, and a gRPC channel.
fn setup(test: &str, backend: &str) -> Option<Setup> {
    let Configured {
        etcd,
        controller,
        dir,
    } = Configured::start(test, backend)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = {
        let _guard = rt.enter();
        Endpoint::from_shared(controller.url.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    };
    Some(Setup {
        etcd,
        controller,
        _dir: dir,
        rt,
        channel,
    })
}

fn leases(url: &str) -> Vec<Value> {
    overlayctl_json(url, &["leases"])
        .as_array()
        .cloned()
        .expect("an array")
}

/// `answer` is an InvalidArgument naming every one of `words`, without echoing an escape
/// character raw.
fn refused<T: std::fmt::Debug>(what: &str, answer: Result<T, tonic::Status>, words: &[&str]) {
    let status = match answer {
        Ok(r) => panic!("{what}: accepted: {r:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{what}: {status:?}"
    );
    for w in words {
        assert!(status.message().contains(w), "{what}: {}", status.message());
    }
    assert!(
        !status.message().contains('\u{1b}'),
        "{what}: the error echoes the escape raw: {:?}",
        status.message()
    );
}

fn has_raw_control(out: &Output) -> bool {
    out.stdout
        .iter()
        .chain(&out.stderr)
        .any(|&b| (b < 0x20 && b != b'\n') || b == 0x7f)
}

/// An interface name carrying a terminal escape sequence, and loopback or link-local
/// public IPs, were stored as any other lease (and shown by `overlayctl`).
#[test]
fn hostile_lease_fields_are_refused_by_the_controller() {
    let Some(s) = setup(
        "hostile_lease_fields_are_refused_by_the_controller",
        "alloc",
    ) else {
        return;
    };
    let acquire = |change: &dyn Fn(&mut v1::AcquireLeaseRequest)| {
        let mut req = v1::AcquireLeaseRequest {
            node: "hostile".into(),
            public_ip: "198.51.100.30".into(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        };
        change(&mut req);
        s.rt.block_on(AgentClient::new(s.channel.clone()).acquire_lease(req))
    };
    let reserve = |public_ip: &str| {
        s.rt.block_on(AdminClient::new(s.channel.clone()).reserve_subnet(
            v1::ReserveSubnetRequest {
                subnet: "10.244.250.0/24".into(),
                node: "hostile".into(),
                public_ip: public_ip.into(),
                ..Default::default()

            },
        ))
    };
    for iface in [
        "e\u{1b}]0;pwned\u{7}",
        "eth\u{9b}2J",
        "eth\u{202e}0",
        "eth\t0",
    ] {
        refused(
            &format!("iface {iface:?}"),
            acquire(&|r| r.iface = Some(iface.into())),
            &["interface name"],
        );
    }
    for ip in ["127.0.0.1", "127.5.5.5", "169.254.10.10"] {
        refused(
            &format!("acquire with public IP {ip}"),
            acquire(&|r| {
                r.public_ip = ip.into();
                r.underlay = None;
            }),
            &[ip, "routable unicast"],
        );
        refused(
            &format!("reserve with public IP {ip}"),
            reserve(ip),
            &[ip, "routable unicast"],
        );
    }
    refused(
        "public IP inside the overlay",
        acquire(&|r| r.public_ip = "10.244.3.3".into()),
        &["inside the overlay"],
    );
    assert!(
        leases(&s.controller.url).is_empty(),
        "a refused lease was stored"
    );

    // The same client with sane fields is served.
    let granted = acquire(&|r| {
        r.iface = Some("eth0".into());
        r.underlay = Some("198.51.100.0/24".into());
    })
    .expect("a sane acquire");
    let subnet = granted.into_inner().lease.unwrap().subnet;
    let listed = leases(&s.controller.url);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["subnet"], subnet.as_str());
}

/// A lease value written into etcd behind the controller's back (an older version, a
/// hand edit, a compromised etcd client) with an escape sequence in the interface name:
/// `overlayctl routes` printed it raw, so it could rewrite the operator's terminal.
#[test]
fn a_hostile_value_planted_in_etcd_never_reaches_the_terminal() {
    let Some(s) = setup(
        "a_hostile_value_planted_in_etcd_never_reaches_the_terminal",
        "host-gw",
    ) else {
        return;
    };
    let value = |node: &str, ip: &str, iface: &str| {
        serde_json::json!({
            "node": node,
            "public_ip": ip,
            "backend": "host-gw",
            "backend_data": {"iface": iface, "underlay": "192.0.2.0/24"},
            "reserved": true,
            "created_at": "2024-01-01T00:00:00.000Z",
            "renewed_at": "2024-01-01T00:00:00.000Z",
        })
        .to_string()
    };
    etcdctl(
        &s.etcd,
        &[
            "put",
            "/overlay/leases/10.244.250.0-24",
            &value("victim", "192.0.2.20", "e\u{1b}]0;pwned\u{7}\u{1b}[2J"),
        ],
    );
    etcdctl(
        &s.etcd,
        &[
            "put",
            "/overlay/leases/10.244.251.0-24",
            &value("peer", "192.0.2.21", "eth0"),
        ],
    );
    // A key that is no lease key at all, with an escape sequence in it: `status` lists it
    // among the ignored keys, escaped.
    etcdctl(
        &s.etcd,
        &[
            "put",
            "/overlay/leases/\u{1b}[2Jx-24",
            &value("stray", "192.0.2.22", "eth0"),
        ],
    );
    let url = s.controller.url.clone();
    overlay_tests::wait_until(Duration::from_secs(20), || {
        let out = overlayctl(&url, &["status"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("[2Jx-24")
            .then_some(())
    })
    .expect("status lists the stray key among the ignored ones");
    // The clean lease is served once the controller's watch has it.
    overlay_tests::wait_until(Duration::from_secs(20), || {
        leases(&url)
            .iter()
            .any(|l| l["node"] == "peer")
            .then_some(())
    })
    .expect("the clean lease is listed");

    for args in [
        &["leases"][..],
        &["routes", "--node", "victim"],
        &["routes", "--node", "peer"],
        &["routes", "--node", "victim", "-o", "json"],
        &["status"],
    ] {
        let out = overlayctl(&url, args);
        assert!(
            !has_raw_control(&out),
            "overlayctl {args:?} printed a raw control character:\nstdout: {:?}\nstderr: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = leases(&url);
    assert!(
        listed.iter().all(|l| l["node"] != "victim"),
        "the hostile value is served: {listed:?}"
    );
}
