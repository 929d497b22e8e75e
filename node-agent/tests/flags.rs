//! overlay-agent's flags, as systemd or an operator passes them: a value that can only
//! break the agent later is refused when the flags are parsed (clap's exit status 2, the
//! flag named on stderr), before the agent reaches any controller or takes a lease.

use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs overlay-agent with `flags` (and `env`) against a controller URL nothing listens
/// on; its exit status and stderr. An agent that does not exit within the bound was not
/// refused: it is killed and reported.
fn agent(flags: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!(
        "http://{}",
        overlay_tests::loopback_addr(overlay_tests::next_port())
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overlay-agent"));
    cmd.args([
        "--controller",
        &dead,
        "--insecure",
        "--node-name=flags-test",
        "--public-ip=192.0.2.50",
        "--bridge=none",
        "--health-listen=off",
    ])
    .arg(format!("--run-dir={}", dir.path().join("run").display()))
    .arg(format!(
        "--state-dir={}",
        dir.path().join("state").display()
    ))
    .args(flags)
    .env_remove("OVERLAY_RESYNC_INTERVAL")
    .envs(env.iter().copied())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = overlay_tests::Child::spawn("overlay-agent", &mut cmd).unwrap();
    let status = child.wait_timeout(Duration::from_secs(20));
    let mut stderr = String::new();
    if let Some(mut pipe) = child.inner.stderr.take() {
        if status.is_some() {
            use std::io::Read;
            pipe.read_to_string(&mut stderr).unwrap();
        }
    }
    let status = status.unwrap_or_else(|| {
        panic!("overlay-agent {flags:?} {env:?} was not refused: still running after 20s")
    });
    (status.code(), stderr)
}

/// `--resync-interval 0` was accepted, and the agent panicked on its first tick, after
/// it had acquired its lease (which stayed held).
#[test]
fn zero_or_absurd_resync_intervals_are_refused_at_parse_time() {
    for value in ["0", "0s", "500ms", "2h", "100000000000h", "soon"] {
        let (code, stderr) = agent(&["--resync-interval", value], &[]);
        assert_eq!(code, Some(2), "--resync-interval {value}: {stderr}");
        assert!(stderr.contains("--resync-interval"), "{value}: {stderr}");
    }
    let (code, stderr) = agent(&[], &[("OVERLAY_RESYNC_INTERVAL", "0")]);
    assert_eq!(code, Some(2), "OVERLAY_RESYNC_INTERVAL=0: {stderr}");
    assert!(stderr.contains("--resync-interval"), "{stderr}");
    assert!(stderr.contains("1s..1h"), "the bounds are named: {stderr}");
}
