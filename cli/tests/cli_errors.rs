//! The real binary's error behaviour: one line on stderr, the right exit code, and no
//! connection attempt for input that can be rejected locally.

use std::process::{Command, Output};

fn overlayctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(args)
        .env_remove("OVERLAY_CONTROLLER")
        .env("OVERLAY_INSECURE", "true")
        .output()
        .expect("overlayctl runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_one_error_line(out: &Output) {
    let err = stderr(out);
    assert!(
        err.starts_with("overlayctl: ") && err.ends_with('\n') && err.lines().count() == 1,
        "expected one error line, got {err:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A URL on which nothing listens: a port of this process's own that nothing binds.
fn dead_controller() -> String {
    format!(
        "http://{}",
        overlay_tests::loopback_addr(overlay_tests::next_port())
    )
}

#[test]
fn unreachable_controller_names_the_url() {
    let url = dead_controller();
    for args in [
        vec!["leases"],
        vec!["config", "show"],
        vec!["watch", "-o", "json"],
        vec!["lease", "revoke", "10.244.7.0/24"],
    ] {
        let out = overlayctl(&[&["--controller", &url], &args[..]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_one_error_line(&out);
        assert_eq!(
            stderr(&out),
            format!("overlayctl: cannot reach the controller at {url}: connection refused\n"),
            "{args:?}"
        );
    }
}

#[test]
fn every_url_of_a_list_is_tried_and_named() {
    let (a, b) = (dead_controller(), dead_controller());
    let out = Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .arg("leases")
        .env("OVERLAY_CONTROLLER", format!("{a},{b}"))
        .env("OVERLAY_INSECURE", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_one_error_line(&out);
    let err = stderr(&out);
    assert!(err.contains(&a) && err.contains(&b), "{err}");
}

#[test]
fn invalid_cidr_names_the_argument() {
    let out = overlayctl(&[
        "--controller",
        &dead_controller(),
        "lease",
        "reserve",
        "--subnet",
        "10.1.2.300/24",
        "--node",
        "n1",
        "--public-ip",
        "192.0.2.1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_one_error_line(&out);
    assert_eq!(
        stderr(&out),
        "overlayctl: --subnet: \"10.1.2.300/24\" is not a CIDR\n"
    );
}

#[test]
fn invalid_config_flag_is_rejected_before_connecting() {
    // The controller URL is dead: reaching the network would give "cannot reach".
    let out = overlayctl(&[
        "--controller",
        &dead_controller(),
        "config",
        "set",
        "--network",
        "10.244.0.0/16",
        "--subnet-len",
        "16",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_one_error_line(&out);
    let err = stderr(&out);
    assert!(
        err.contains("subnet_len") && err.contains("--subnet-len"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
}

/// A zero or absurd count or duration is wrong whatever the other flags say: it is a
/// usage error of the flag (exit 2, one line naming it), found when the flags are parsed.
#[test]
fn zero_or_absurd_counts_and_durations_are_refused_at_parse_time() {
    let dead = dead_controller();
    for (flag, value) in [
        ("--vni", "0"),
        ("--vni", "16777216"),
        ("--port", "0"),
        ("--port", "65536"),
        ("--mtu", "0"),
        ("--subnet-len", "0"),
        ("--subnet-len", "31"),
        ("--lease-ttl", "0"),
        ("--lease-ttl", "0s"),
        ("--lease-ttl", "1000y"),
    ] {
        let out = overlayctl(&[
            "--controller",
            &dead,
            "config",
            "set",
            "--network",
            "10.244.0.0/16",
            flag,
            value,
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert_one_error_line(&out);
        assert!(
            stderr(&out).starts_with(&format!("overlayctl: {flag}: ")),
            "{}",
            stderr(&out)
        );
    }
    for args in [
        &["certs", "init", "--dir", "/nonexistent", "--days", "0"][..],
        &[
            "certs",
            "issue",
            "--dir",
            "/nonexistent",
            "--name",
            "n1",
            "--days",
            "0",
        ],
        &[
            "certs",
            "init",
            "--dir",
            "/nonexistent",
            "--days",
            "4294967295",
        ],
    ] {
        let out = overlayctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_one_error_line(&out);
        assert!(
            stderr(&out).starts_with("overlayctl: --days: "),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn usage_errors_exit_2_in_one_line() {
    let out = overlayctl(&["lease", "reserve", "--subnet", "10.244.7.0/24"]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_error_line(&out);
    assert!(stderr(&out).contains("--node"), "{}", stderr(&out));

    let out = overlayctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("watch"));
}

#[test]
fn a_server_that_hangs_up_is_named() {
    // Accepts connections and closes them at once: not a controller.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let out = overlayctl(&["--controller", &url, "leases"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_one_error_line(&out);
    assert!(stderr(&out).contains(&url), "{}", stderr(&out));
}

/// Plaintext is never the silent default: without TLS files or `--insecure`, commands
/// that connect refuse, saying what to pass.
#[test]
fn plaintext_needs_insecure() {
    let out = Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(["--controller", "http://127.0.0.1:9", "leases"])
        .env_remove("OVERLAY_INSECURE")
        .env_remove("OVERLAY_TLS_CERT")
        .env_remove("OVERLAY_TLS_KEY")
        .env_remove("OVERLAY_TLS_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--insecure") && err.contains("--tls-cert"),
        "{err}"
    );
}
