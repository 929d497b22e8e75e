//! The controller against a secured etcd (TLS with client certificates, user/password
//! authentication), and the etcd-elected leader that runs the janitor: real etcd, real
//! `overlay-controller`, `overlay-agent` (alloc backend, no root) and `overlayctl`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use overlay_tests::cluster::{http_get, overlayctl, Agent, Controller};
use overlay_tests::etcd::EtcdTls;
use overlay_tests::{bin_path, loopback, loopback_addr, next_port, wait_until, Child, Etcd};

const PATIENCE: Duration = Duration::from_secs(30);
const ALLOC: &[&str] = &[
    "config",
    "set",
    "--network",
    "10.244.0.0/16",
    "--backend",
    "alloc",
];

fn run_overlayctl(args: &[&str]) {
    let out = Command::new(bin_path("overlayctl"))
        .args(args)
        .output()
        .expect("run overlayctl");
    assert!(
        out.status.success(),
        "overlayctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` and certificates `names` (NAME.pem, NAME-key.pem) valid for this process's loopback address.
fn certs(dir: &Path, names: &[&str]) {
    let d = dir.to_str().unwrap();
    let ip = loopback().to_string();
    run_overlayctl(&["certs", "init", "--dir", d]);
    for name in names {
        run_overlayctl(&["certs", "issue", "--dir", d, "--name", name, "--ip", &ip]);
    }
}

fn pem(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

fn flag(name: &str, path: &Path) -> String {
    format!("--{name}={}", path.display())
}

/// A controller that is expected to give up: its exit status and its log.
fn controller_exit(etcd: &Etcd, dir: &Path, name: &str, extra: &[String]) -> (bool, String) {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = Command::new(bin_path("overlay-controller"));
    cmd.arg(format!("--etcd-endpoints={}", etcd.endpoint))
        .arg("--etcd-prefix=/overlay")
        .arg(format!("--listen={}", loopback_addr(next_port())))
        .arg("--health-listen=off")
        .arg("--insecure")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let mut child = Child::spawn(name, &mut cmd).expect("spawn the controller");
    let status = child.wait_timeout(PATIENCE);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("{name} did not give up; log:\n{log}"));
    (status.success(), log)
}

/// A controller's `name` metric, once it reports it.
fn metric(controller: &Controller, name: &str) -> Option<f64> {
    let (_, body) = http_get(controller.health_port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn is_leader(controller: &Controller) -> bool {
    metric(controller, "overlay_controller_leader") == Some(1.0)
}

/// Config set through the controller and an agent's lease: the controller reads, writes,
/// grants and keeps etcd leases alive, and watches.
fn check_controller_works(controller: &Controller, dir: &Path) {
    let out = overlayctl(&controller.url, ALLOC);
    assert!(
        out.status.success(),
        "config set: {}; controller log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        controller.log()
    );
    let agent = Agent::start(&controller.url, "node-a", "198.51.100.1", dir, &[]);
    let subnet = agent.wait_subnet(PATIENCE);
    assert!(subnet.starts_with("10.244."), "{subnet}");
}

fn stdout(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn controller_talks_to_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs_dir = dir.path().join("certs");
    certs(&certs_dir, &["etcd", "etcd-client", "controller"]);
    let (server_cert, server_key) = pem(&certs_dir, "etcd");
    let (client_cert, client_key) = pem(&certs_dir, "etcd-client");
    let ca = certs_dir.join("ca.pem");
    let tls = EtcdTls {
        ca: ca.clone(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    };
    let Some(etcd) = Etcd::start_tls_or_skip("controller_talks_to_etcd_over_tls", tls) else {
        return;
    };
    assert!(etcd.endpoint.starts_with("https://"));
    let (cert, key) = pem(&certs_dir, "controller");
    let tls_flags = vec![
        flag("etcd-cacert", &ca),
        flag("etcd-cert", &cert),
        flag("etcd-key", &key),
    ];
    let mut extra = tls_flags.clone();
    extra.push("--insecure".into());
    let controller = Controller::start_with(&etcd, "/overlay", dir.path(), "controller", &extra);
    check_controller_works(&controller, dir.path());
    let config = stdout(etcd.etcdctl(&["get", "--print-value-only", "/overlay/config"]));
    assert!(config.contains("10.244.0.0/16"), "{config}");

    // Without a client certificate etcd refuses the TLS handshake.
    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "no-client-cert",
        &[flag("etcd-cacert", &ca)],
    );
    assert!(!ok, "{log}");
    assert!(
        log.to_lowercase().contains("certificate"),
        "unclear error:\n{log}"
    );

    // A client certificate from another CA is refused too, and our CA does not trust a
    // server certificate from another CA either.
    let other = dir.path().join("other-ca");
    certs(&other, &["intruder"]);
    let (cert, key) = pem(&other, "intruder");
    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "foreign-client-cert",
        &[
            flag("etcd-cacert", &ca),
            flag("etcd-cert", &cert),
            flag("etcd-key", &key),
        ],
    );
    assert!(!ok, "{log}");
    assert!(
        log.to_lowercase().contains("certificate"),
        "unclear error:\n{log}"
    );
    let (cert, key) = pem(&certs_dir, "controller");
    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "foreign-ca",
        &[
            flag("etcd-cacert", &other.join("ca.pem")),
            flag("etcd-cert", &cert),
            flag("etcd-key", &key),
        ],
    );
    assert!(!ok, "{log}");
    assert!(
        log.to_lowercase().contains("certificate"),
        "unclear error:\n{log}"
    );

    // Unusable flags fail at once, naming the flag and the file.
    let missing = dir.path().join("missing.pem");
    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "missing-file",
        &[flag("etcd-cacert", &missing)],
    );
    assert!(!ok);
    assert!(
        log.contains("--etcd-cacert") && log.contains(&missing.display().to_string()),
        "unclear error:\n{log}"
    );
    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "cert-without-key",
        &[flag("etcd-cacert", &ca), flag("etcd-cert", &cert)],
    );
    assert!(!ok);
    assert!(log.contains("--etcd-key"), "unclear error:\n{log}");
    let (ok, log) = controller_exit(&etcd, dir.path(), "https-without-ca", &[]);
    assert!(!ok);
    assert!(log.contains("--etcd-cacert"), "unclear error:\n{log}");
}

#[test]
fn controller_authenticates_to_etcd_with_a_user_and_password() {
    let Some(etcd) = Etcd::start_or_skip("controller_authenticates_to_etcd") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    stdout(etcd.etcdctl(&["user", "add", "root:s3cret"]));
    stdout(etcd.etcdctl(&["auth", "enable"]));
    let root = ["--user=root:s3cret"];
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "s3cret\n").unwrap();

    let extra = vec![
        "--insecure".to_string(),
        "--etcd-user=root".into(),
        flag("etcd-password-file", &password_file),
    ];
    let controller = Controller::start_with(&etcd, "/overlay", dir.path(), "controller", &extra);
    check_controller_works(&controller, dir.path());
    let config = stdout(
        etcd.etcdctl(&[&root[..], &["get", "--print-value-only", "/overlay/config"]].concat()),
    );
    assert!(config.contains("10.244.0.0/16"), "{config}");

    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "wrong-password",
        &["--etcd-user=root".into(), "--etcd-password=wrong".into()],
    );
    assert!(!ok, "{log}");
    assert!(
        log.contains("authentication failed") && log.contains("--etcd-user"),
        "unclear error:\n{log}"
    );
    assert!(
        !log.contains("s3cret") && !log.contains("wrong\""),
        "the log shows a password:\n{log}"
    );

    let (ok, log) = controller_exit(&etcd, dir.path(), "no-credentials", &[]);
    assert!(!ok, "{log}");
    assert!(
        log.contains("etcd denied access") && log.contains("--etcd-user"),
        "unclear error:\n{log}"
    );

    let (ok, log) = controller_exit(
        &etcd,
        dir.path(),
        "user-without-password",
        &["--etcd-user=root".into()],
    );
    assert!(!ok);
    assert!(log.contains("--etcd-password"), "unclear error:\n{log}");
}

#[test]
fn one_controller_leads_and_a_standby_takes_over_when_it_dies() {
    let Some(etcd) = Etcd::start_or_skip("one_controller_leads") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = vec!["--insecure".to_string(), "--leader-ttl=3s".into()];
    let mut a = Controller::start_with(&etcd, "/overlay", dir.path(), "a", &flags);
    let mut b = Controller::start_with(&etcd, "/overlay", dir.path(), "b", &flags);
    let leader_of = |a: &Controller, b: &Controller| match (is_leader(a), is_leader(b)) {
        (true, false) => Some('a'),
        (false, true) => Some('b'),
        _ => None,
    };
    let first = wait_until(PATIENCE, || leader_of(&a, &b))
        .unwrap_or_else(|| panic!("no single leader; logs:\n{}\n{}", a.log(), b.log()));
    let key = stdout(etcd.etcdctl(&["get", "--print-value-only", "/overlay/leader"]));
    let (leader, standby) = if first == 'a' {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    assert!(
        key.contains(&format!("pid {}", leader.child.pid())),
        "leader key {key:?} does not name the leader"
    );
    assert!(!is_leader(standby));

    // SIGKILL: the leader key stays until its lease expires, then the standby leads.
    leader.child.kill();
    wait_until(PATIENCE, || is_leader(standby).then_some(()))
        .unwrap_or_else(|| panic!("the standby did not take over; log:\n{}", standby.log()));
    let key = stdout(etcd.etcdctl(&["get", "--print-value-only", "/overlay/leader"]));
    assert!(
        key.contains(&format!("pid {}", standby.child.pid())),
        "{key:?}"
    );

    // The dead one comes back as a standby; a clean stop (SIGTERM) of the leader hands
    // over at once, by revoking its lease.
    leader.restart();
    assert!(!is_leader(leader));
    standby.child.signal(libc::SIGTERM);
    wait_until(PATIENCE, || is_leader(leader).then_some(()))
        .unwrap_or_else(|| panic!("no takeover after SIGTERM; log:\n{}", leader.log()));
    assert!(
        standby.log().contains("leadership handed back"),
        "{}",
        standby.log()
    );
}

#[test]
fn the_leaders_janitor_revokes_orphaned_leases_and_compacts() {
    let Some(etcd) = Etcd::start_or_skip("the_leaders_janitor") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = vec![
        "--insecure".to_string(),
        "--leader-ttl=3s".into(),
        "--janitor-interval=500ms".into(),
        "--orphan-grace=2s".into(),
        "--keep-revisions=20".into(),
    ];
    let controller = Controller::start_with(&etcd, "/overlay", dir.path(), "controller", &flags);
    check_controller_works(&controller, dir.path());
    wait_until(PATIENCE, || is_leader(&controller).then_some(()))
        .unwrap_or_else(|| panic!("no leader; log:\n{}", controller.log()));

    // What a controller killed between grant and create leaves: a lease with no key.
    let lease_id = |out: String| {
        out.split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("lease grant said {out:?}"))
            .to_string()
    };
    let orphan = lease_id(stdout(etcd.etcdctl(&["lease", "grant", "3600"])));
    let used = lease_id(stdout(etcd.etcdctl(&["lease", "grant", "3600"])));
    stdout(etcd.etcdctl(&["put", "--lease", &used, "/other/held", "v"]));
    let alive = |id: &str| {
        let out = stdout(etcd.etcdctl(&["lease", "timetolive", id]));
        !out.contains("already expired")
    };
    wait_until(PATIENCE, || (!alive(&orphan)).then_some(())).unwrap_or_else(|| {
        panic!(
            "orphaned lease {orphan} is still there; log:\n{}",
            controller.log()
        )
    });
    assert!(alive(&used), "a lease with a key was revoked");
    let leases = stdout(etcd.etcdctl(&["lease", "list"]));
    assert!(leases.contains(&used), "{leases}");
    assert!(
        controller.log().contains("revoked an orphaned etcd lease"),
        "{}",
        controller.log()
    );
    assert!(
        metric(
            &controller,
            "overlay_controller_orphan_leases_revoked_total"
        ) >= Some(1.0)
    );
    // The agent's lease is kept alive and the leader's has a key: both survive.
    let keys = stdout(etcd.etcdctl(&["get", "--prefix", "--keys-only", "/overlay/"]));
    assert!(
        keys.contains("/overlay/leases/") && keys.contains("/overlay/leader"),
        "{keys}"
    );

    // History beyond the last 20 revisions goes.
    let mut first = None;
    for i in 0..40 {
        let out = stdout(etcd.etcdctl(&["put", "/other/counter", &i.to_string(), "-w", "json"]));
        first.get_or_insert(out);
    }
    let first_revision: String = first
        .unwrap()
        .split("\"revision\":")
        .nth(1)
        .expect("revision in put's JSON")
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    wait_until(PATIENCE, || {
        let out = etcd.etcdctl(&["get", "/other/counter", &format!("--rev={first_revision}")]);
        String::from_utf8_lossy(&out.stderr)
            .contains("compacted")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "revision {first_revision} was not compacted; log:\n{}",
            controller.log()
        )
    });
    assert!(metric(&controller, "overlay_controller_etcd_compactions_total") >= Some(1.0));
    let latest = stdout(etcd.etcdctl(&["get", "--print-value-only", "/other/counter"]));
    assert_eq!(latest.trim(), "39");
}
