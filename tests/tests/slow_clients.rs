//! Clients that cannot lock others out: a flood of half-open TLS handshakes against a
//! controller with the common 1024 open-file limit, and a node that calls ListLeases in a
//! tight loop.
//!
//! The flood reproduces the finding that every client, admin included, timed out and
//! `/readyz` hung while 1100 connections each sent the first 5 bytes of a TLS record and
//! then nothing: the controller ran out of file descriptors and spun on `accept`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use overlay_common::tls::TlsFiles;
use overlay_proto::v1::agent_client::AgentClient;
use overlay_proto::v1::ListLeasesRequest;
use overlay_tests::cluster::{http_get, Controller};
use overlay_tests::{bin_path, loopback, skip, wait_until, Etcd};

/// Half-open handshakes held at once: more than the controller's 1024 descriptors.
const FLOOD: usize = 1100;
/// The controller's open-file limit, soft and hard, as on a host without LimitNOFILE=.
const CONTROLLER_NOFILE: u64 = 1024;
/// The handshake timeout the flood test sets (the default is 10 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);

fn ctl(args: &[&str]) -> Output {
    Command::new(bin_path("overlayctl"))
        .args(args)
        .output()
        .unwrap()
}

fn certs(dir: &Path, names: &[&str]) {
    let d = dir.to_str().unwrap();
    let ip = loopback().to_string();
    assert!(ctl(&["certs", "init", "--dir", d]).status.success());
    let mut all = vec![("controller", vec!["--ip", ip.as_str()])];
    all.extend(names.iter().map(|n| (*n, vec![])));
    for (name, extra) in all {
        let mut args = vec!["certs", "issue", "--dir", d, "--name", name];
        args.extend(extra);
        let out = ctl(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

fn tls_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    let f = tls_files(dir, name);
    vec![
        format!("--tls-cert={}", f.cert.display()),
        format!("--tls-key={}", f.key.display()),
        format!("--tls-ca={}", f.ca.display()),
    ]
}

/// overlayctl as `identity` against `url`.
fn ctl_as(dir: &Path, identity: &str, url: &str, args: &[&str]) -> Output {
    let mut all = tls_flags(dir, identity);
    all.push(format!("--controller={url}"));
    all.extend(args.iter().map(|s| s.to_string()));
    Command::new(bin_path("overlayctl"))
        .args(&all)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Raises this process's RLIMIT_NOFILE to its hard limit, so the test can hold the flood's
/// sockets; the limit now in force.
fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Whether the server has closed `s` (non-blocking): EOF or a reset.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn slow_handshakes_do_not_lock_out_admins_or_readiness() {
    let test = "slow_handshakes_do_not_lock_out_admins_or_readiness";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let have = raise_own_nofile();
    if have < FLOOD as u64 + 512 {
        skip(
            test,
            &format!(
                "the hard RLIMIT_NOFILE is {have}; the flood needs {}",
                FLOOD + 512
            ),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["admin"]);
    let mut flags = tls_flags(&pki, "controller");
    flags.push(format!(
        "--tls-handshake-timeout={}s",
        HANDSHAKE_TIMEOUT.as_secs()
    ));
    let controller = Controller::start_with_fd_limit(
        &etcd,
        "/overlay",
        dir.path(),
        "controller",
        &flags,
        CONTROLLER_NOFILE,
    );
    let url = controller.url.replace("http://", "https://");
    let out = ctl_as(&pki, "admin", &url, &["leases"]);
    assert!(out.status.success(), "before the flood: {}", stderr(&out));

    // The flood: each connection sends the header of a TLS handshake record announcing
    // 512 bytes, then nothing.
    let addr = SocketAddr::from((loopback(), controller.port));
    let flood_start = Instant::now();
    let mut slow: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i} of the flood: {e}"));
            // The server may already have closed it (over its connection cap).
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
            s
        })
        .collect();
    let opened_in = flood_start.elapsed();

    // While they are held: the admin gets an answer, and so does /readyz.
    let t = Instant::now();
    let out = ctl_as(&pki, "admin", &url, &["leases"]);
    let admin_took = t.elapsed();
    assert!(
        out.status.success(),
        "the admin was locked out by {FLOOD} half-open handshakes (after {admin_took:?}): {}\ncontroller log:\n{}",
        stderr(&out),
        controller.log()
    );
    let t = Instant::now();
    let ready = http_get(controller.health_port, "/readyz");
    let ready_took = t.elapsed();
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Some(200),
        "/readyz under the flood: {ready:?} after {ready_took:?}"
    );
    let metrics = http_get(controller.health_port, "/metrics")
        .expect("/metrics under the flood")
        .1;
    let pending = metric(&metrics, "overlay_controller_tls_handshakes_pending").unwrap_or(0.0);
    let fds = open_fds(controller.child.pid());
    let checked_at = flood_start.elapsed();
    eprintln!(
        "{FLOOD} half-open connections opened in {opened_in:?}; admin `leases` took \
         {admin_took:?}, /readyz {ready_took:?}; the controller held {pending} pending \
         handshakes and {fds} descriptors (limit {CONTROLLER_NOFILE}) at {checked_at:?}"
    );
    // The newest half-open connections (opened within the last handshake timeout) are
    // still held by the server: the admin got in during the flood, not after it.
    assert!(
        pending >= 200.0,
        "the flood was not being held when the admin got in: {pending} pending handshakes"
    );
    assert!(
        fds < CONTROLLER_NOFILE as usize - 100,
        "the controller used {fds} of its {CONTROLLER_NOFILE} descriptors"
    );

    // Then the server closes every half-open connection, after the handshake timeout.
    for s in &slow {
        s.set_nonblocking(true).unwrap();
    }
    let closed = wait_until(HANDSHAKE_TIMEOUT + Duration::from_secs(10), || {
        slow.retain_mut(|s| !closed_by_peer(s));
        slow.is_empty().then(|| flood_start.elapsed())
    });
    let Some(all_closed_at) = closed else {
        panic!(
            "{} of {FLOOD} half-open connections still open {:?} after the flood began",
            slow.len(),
            flood_start.elapsed()
        );
    };
    eprintln!(
        "all half-open connections closed by the server {all_closed_at:?} after the flood began"
    );
    assert!(
        all_closed_at >= HANDSHAKE_TIMEOUT,
        "closed before the handshake timeout: {all_closed_at:?}"
    );
    let metrics = http_get(controller.health_port, "/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "overlay_controller_grpc_connections_closed_total{reason=\"handshake_timeout\"}"
        ),
        "{metrics}"
    );
    let out = ctl_as(&pki, "admin", &url, &["leases"]);
    assert!(out.status.success(), "after the flood: {}", stderr(&out));
}

#[test]
fn listing_is_rate_limited_per_identity() {
    let test = "listing_is_rate_limited_per_identity";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["admin", "node-a"]);
    let mut flags = tls_flags(&pki, "controller");
    flags.extend(["--list-rate=2".to_string(), "--list-burst=5".to_string()]);
    let controller = Controller::start_with(&etcd, "/overlay", dir.path(), "controller", &flags);
    let url = controller.url.replace("http://", "https://");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = tls_files(&pki, "node-a");
    let mut client = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(node.client_config().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        AgentClient::new(channel)
    });
    let mut list = || rt.block_on(client.list_leases(ListLeasesRequest {}));

    // A tight loop: the burst passes, then ResourceExhausted with a clear message.
    let mut granted = 0;
    let refused = loop {
        match list() {
            Ok(_) => granted += 1,
            Err(status) => break status,
        }
        assert!(granted < 100, "100 listings in a tight loop, none refused");
    };
    eprintln!("node-a: {granted} listings granted, then: {refused:?}");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("node-a") && refused.message().contains("--list-rate"),
        "unclear message: {}",
        refused.message()
    );
    assert!(
        (5..=8).contains(&granted),
        "burst of 5 at 2/s, granted {granted}"
    );

    // The admin is not starved by node-a's loop.
    let t = Instant::now();
    for _ in 0..10 {
        let out = ctl_as(&pki, "admin", &url, &["leases"]);
        assert!(out.status.success(), "admin starved: {}", stderr(&out));
    }
    eprintln!("10 admin listings right after: {:?}", t.elapsed());

    // node-a gets its turn again once its bucket refills.
    assert!(
        wait_until(Duration::from_secs(5), || list().ok()).is_some(),
        "node-a never allowed to list again"
    );
    let metrics = http_get(controller.health_port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("op=\"list\",result=\"resource_exhausted\""),
        "{metrics}"
    );
}
