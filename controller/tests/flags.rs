//! overlay-controller's flags: a duration or count that can only break the controller
//! later is refused when the flags are parsed (clap's exit status 2, the flag named on
//! stderr), before the controller reaches etcd or campaigns for leadership.

use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs overlay-controller with `flags` against an etcd endpoint nothing listens on; its
/// exit status and stderr. A controller that does not exit within the bound was not
/// refused: it is killed and reported.
fn controller(flags: &[&str]) -> (Option<i32>, String) {
    let dead = format!(
        "http://{}",
        overlay_tests::loopback_addr(overlay_tests::next_port())
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overlay-controller"));
    cmd.arg(format!("--etcd-endpoints={dead}"))
        .arg(format!("--listen={}", overlay_tests::loopback_addr(0)))
        .args(["--health-listen=off", "--insecure"])
        .args(flags)
        .env_remove("OVERLAY_JANITOR_INTERVAL")
        .env_remove("OVERLAY_LEADER_TTL")
        .env_remove("OVERLAY_ORPHAN_GRACE")
        .env_remove("OVERLAY_KEEP_REVISIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = overlay_tests::Child::spawn("overlay-controller", &mut cmd).unwrap();
    let status = child.wait_timeout(Duration::from_secs(20));
    let mut stderr = String::new();
    if let (Some(mut pipe), Some(_)) = (child.inner.stderr.take(), status) {
        use std::io::Read;
        pipe.read_to_string(&mut stderr).unwrap();
    }
    let status = status.unwrap_or_else(|| {
        panic!("overlay-controller {flags:?} was not refused: still running after 20s")
    });
    (status.code(), stderr)
}

/// `--janitor-interval 0` killed the janitor task (a zero tokio interval panics) while the
/// controller went on holding the leadership, so no controller cleaned up at all.
#[test]
fn zero_or_absurd_janitor_and_leader_durations_are_refused_at_parse_time() {
    for (flag, value, bounds) in [
        ("--janitor-interval", "0", "100ms..1h"),
        ("--janitor-interval", "0s", "100ms..1h"),
        ("--janitor-interval", "48h", "100ms..1h"),
        ("--leader-ttl", "0", "2s..5m"),
        ("--leader-ttl", "1s", "2s..5m"),
        ("--leader-ttl", "100000000000h", "2s..5m"),
        ("--orphan-grace", "0", "1s..24h"),
        ("--orphan-grace", "400d", "1s..24h"),
        ("--keep-revisions", "-1", "0..=1000000000"),
        ("--keep-revisions", "99999999999", "0..=1000000000"),
    ] {
        let (code, stderr) = controller(&[&format!("{flag}={value}")]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(bounds),
            "{flag} {value}: {stderr}"
        );
    }
}
