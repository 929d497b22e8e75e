//! `overlayctl certs` as an operator runs it: the real binary on a real directory. What is
//! checked is what must never happen to a PKI directory: a file of the CA or of another
//! identity overwritten, a key readable by others, a key written through a planted file.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use overlay_common::tls::TlsFiles;

fn overlayctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(args)
        .output()
        .expect("overlayctl runs")
}

fn certs(dir: &Path, args: &[&str]) -> Output {
    let d = dir.to_str().unwrap();
    let mut all = vec!["certs", args[0], "--dir", d];
    all.extend_from_slice(&args[1..]);
    overlayctl(&all)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails with one error line on stderr containing every one of `words`.
fn refused(out: &Output, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    for w in words {
        assert!(err.contains(w), "stderr does not name {w:?}: {err}");
    }
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The certificate of `name` still verifies against the CA (mutual TLS would work).
fn verifies(dir: &Path, name: &str) {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join("ca.pem"),
    };
    assert_eq!(files.own_identity().unwrap(), name);
    files.server_config().unwrap();
    files.client_config().unwrap();
}

/// `certs issue --name ca` replaced the CA's own files with a leaf certificate (every later
/// certificate failed verification), and `--name node-a-key` overwrote node-a's key.
#[test]
fn certs_issue_never_takes_the_files_of_the_ca_or_another_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&certs(dir, &["init"]));
    ok(&certs(dir, &["issue", "--name", "node-a"]));
    let before: Vec<Vec<u8>> = ["ca.pem", "ca-key.pem", "node-a.pem", "node-a-key.pem"]
        .iter()
        .map(|f| read(dir, f))
        .collect();

    refused(
        &certs(dir, &["issue", "--name", "ca"]),
        &["--name", "\"ca\"", "reserved"],
    );
    refused(
        &certs(dir, &["issue", "--name", "node-a-key"]),
        &["--name", "node-a-key", "-key", "reserved"],
    );
    refused(
        &certs(dir, &["issue", "--name", "ca-key"]),
        &["--name", "reserved"],
    );
    // Even with --force: these names are never anyone's.
    refused(
        &certs(dir, &["issue", "--name", "ca", "--force"]),
        &["reserved"],
    );
    // An existing identity or CA is not replaced without --force.
    refused(
        &certs(dir, &["issue", "--name", "node-a"]),
        &["node-a", "exists", "--force"],
    );
    refused(&certs(dir, &["init"]), &["ca.pem", "exists", "--force"]);
    let after: Vec<Vec<u8>> = ["ca.pem", "ca-key.pem", "node-a.pem", "node-a-key.pem"]
        .iter()
        .map(|f| read(dir, f))
        .collect();
    assert!(before == after, "a refused command changed a file");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["ca-key.pem", "ca.pem", "node-a-key.pem", "node-a.pem"],
        "nothing new, no temp file left"
    );
    verifies(dir, "node-a");

    // With --force, node-a gets a new certificate and key, still signed by the CA.
    ok(&certs(dir, &["issue", "--name", "node-a", "--force"]));
    assert_ne!(read(dir, "node-a-key.pem"), before[3]);
    assert_eq!(read(dir, "ca.pem"), before[0]);
    verifies(dir, "node-a");
    ok(&certs(dir, &["issue", "--name", "node-b"]));
    verifies(dir, "node-b");
}

/// A `node-z-key.tmp` left in the directory (mode 0644) made `node-z-key.pem` 0644: the
/// temp file's mode was only set when it was new, and a symlink there was followed.
#[test]
fn a_planted_temp_file_or_symlink_never_weakens_or_leaks_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&certs(dir, &["init"]));

    let planted = dir.join("node-z-key.tmp");
    std::fs::write(&planted, "planted").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
    // And a symlink where the old code put the other temp file, to a file others read.
    let outside = tempfile::tempdir().unwrap();
    let public = outside.path().join("world-readable");
    std::fs::write(&public, "public").unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&public, dir.join("node-y-key.tmp")).unwrap();

    ok(&certs(dir, &["issue", "--name", "node-z"]));
    ok(&certs(dir, &["issue", "--name", "node-y"]));
    for name in ["node-z", "node-y"] {
        let key = dir.join(format!("{name}-key.pem"));
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        assert!(!std::fs::symlink_metadata(&key).unwrap().is_symlink());
        verifies(dir, name);
    }
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert_eq!(std::fs::read_to_string(&public).unwrap(), "public");
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), "planted");

    // A key name that already exists as a symlink is not written through either.
    let decoy = outside.path().join("decoy");
    std::os::unix::fs::symlink(&decoy, dir.join("node-x-key.pem")).unwrap();
    refused(
        &certs(dir, &["issue", "--name", "node-x"]),
        &["node-x-key.pem", "exists"],
    );
    assert!(!decoy.exists(), "the key was written through the symlink");
}

/// `--days 0` was refused only after the flags were parsed, and a huge value panicked
/// (the certificate's end date overflowed).
#[test]
fn certs_days_out_of_range_are_refused_at_parse_time() {
    let tmp = tempfile::tempdir().unwrap();
    for days in ["0", "36501", "4294967295"] {
        let out = certs(tmp.path(), &["init", "--days", days]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--days {days}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        refused(&out, &["--days", "1..36500"]);
    }
    assert!(!tmp.path().join("ca.pem").exists());
}
