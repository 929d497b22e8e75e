//! Operations: systemd readiness notification and Prometheus metrics, end to end with the
//! real binaries and a real etcd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use overlay_tests::cluster::{http_get, overlayctl, Agent, Controller};
use overlay_tests::{wait_until, Etcd};

const PATIENCE: Duration = Duration::from_secs(30);

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[test]
fn ready_is_sent_to_systemd_only_after_subnet_env_exists() {
    let Some(etcd) = Etcd::start_or_skip("ready_is_sent_to_systemd_only_after_subnet_env_exists")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // No config yet: the agent cannot become ready, and must not say it is.
    let agent = Agent::start_with_env(
        &controller.url,
        "notified",
        "198.51.100.4",
        dir.path(),
        &[],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        !messages.iter().any(|m| m.contains("READY=1")),
        "READY before any lease: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("STATUS=")),
        "STATUS lines as it goes: {messages:?}"
    );
    assert!(agent.subnet_env().is_none());

    let out = overlayctl(
        &controller.url,
        &[
            "config",
            "set",
            "--network",
            "10.244.0.0/16",
            "--backend",
            "alloc",
        ],
    );
    assert!(out.status.success());
    let ready_seen = wait_until(PATIENCE, || {
        let n = socket.recv(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        // The moment READY=1 arrives, subnet.env must already be there.
        m.contains("READY=1").then(|| agent.subnet_env().is_some())
    });
    assert_eq!(
        ready_seen,
        Some(true),
        "READY=1 came, and subnet.env existed when it did"
    );
}

#[test]
fn metrics_are_served_and_move() {
    let Some(etcd) = Etcd::start_or_skip("metrics_are_served_and_move") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
    let out = overlayctl(
        &controller.url,
        &[
            "config",
            "set",
            "--network",
            "10.244.0.0/16",
            "--backend",
            "alloc",
        ],
    );
    assert!(out.status.success());
    let scrape = |port| {
        http_get(port, "/metrics")
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
            .expect("metrics")
    };
    let before = scrape(controller.health_port);
    let acquired = r#"overlay_controller_lease_operations_total{op="acquire",result="ok"}"#;
    assert_eq!(
        metric(&before, acquired),
        None,
        "no acquisition yet:\n{before}"
    );
    assert_eq!(
        metric(&before, "overlay_controller_subnets_free"),
        Some(255.0)
    );

    let cni_dir = dir.path().join("cni");
    let cni_flag = format!("--cni-conf-dir={}", cni_dir.display());
    let agent = Agent::start(
        &controller.url,
        "m1",
        "198.51.100.1",
        dir.path(),
        &[&cni_flag],
    );
    agent.wait_subnet(PATIENCE);
    // The CNI conflist is installed once the agent is ready.
    let conflist = wait_until(PATIENCE, || {
        std::fs::read_to_string(cni_dir.join("10-overlay.conflist")).ok()
    })
    .expect("conflist installed");
    let conflist: serde_json::Value = serde_json::from_str(&conflist).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "overlay-cni");
    assert_eq!(conflist["plugins"][1]["type"], "portmap");
    assert_eq!(
        conflist["plugins"][0]["subnetFile"].as_str().unwrap(),
        agent.subnet_env_path().to_str().unwrap()
    );
    let after = scrape(controller.health_port);
    assert_eq!(metric(&after, acquired), Some(1.0), "{after}");
    wait_until(PATIENCE, || {
        let t = scrape(controller.health_port);
        (metric(&t, "overlay_controller_leases") == Some(1.0)
            && metric(&t, "overlay_controller_subnets_free") == Some(254.0))
        .then_some(())
    })
    .expect("lease gauges follow");
    assert!(
        metric(&after, "overlay_controller_watch_clients").unwrap_or(0.0) >= 1.0,
        "{after}"
    );
    assert!(
        after.contains("overlay_controller_etcd_request_seconds_bucket"),
        "{after}"
    );
    assert_eq!(metric(&after, "overlay_controller_etcd_up"), Some(1.0));

    let agent_metrics = scrape(agent.health_port);
    assert!(
        agent_metrics.contains("overlay_agent_reconciles_total{result=\"ok\"}"),
        "{agent_metrics}"
    );
    assert!(
        metric(&agent_metrics, "overlay_agent_seconds_since_last_renewal").is_some(),
        "{agent_metrics}"
    );
    // A revoke moves the counters and the agent's peer gauge.
    let out = overlayctl(
        &controller.url,
        &["lease", "revoke", &agent.subnet().unwrap()],
    );
    assert!(out.status.success());
    wait_until(PATIENCE, || {
        let t = scrape(controller.health_port);
        metric(
            &t,
            r#"overlay_controller_lease_operations_total{op="revoke",result="ok"}"#,
        )
        .filter(|v| *v == 1.0)
    })
    .expect("revoke counted");
}
