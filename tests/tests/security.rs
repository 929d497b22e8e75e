//! Mutual TLS end to end: certificates from `overlayctl certs`, a controller that requires
//! client certificates, agents whose node name comes from their certificate, and the
//! authorization rules (a node acts only for itself; admin calls need an admin identity).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use overlay_tests::cluster::{Agent, Controller};
use overlay_tests::{bin_path, wait_until, Etcd};

const PATIENCE: Duration = Duration::from_secs(30);

fn ctl(args: &[&str]) -> Output {
    Command::new(bin_path("overlayctl"))
        .args(args)
        .output()
        .unwrap()
}

fn certs(dir: &Path) {
    let d = dir.to_str().unwrap();
    let ip = overlay_tests::loopback().to_string();
    assert!(ctl(&["certs", "init", "--dir", d]).status.success());
    for (name, extra) in [
        ("controller", vec!["--ip", ip.as_str()]),
        ("admin", vec![]),
        ("node-a", vec![]),
        ("node-b", vec![]),
    ] {
        let mut args = vec!["certs", "issue", "--dir", d, "--name", name];
        args.extend(extra);
        let out = ctl(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    vec![
        format!("--tls-cert={}", dir.join(format!("{name}.pem")).display()),
        format!(
            "--tls-key={}",
            dir.join(format!("{name}-key.pem")).display()
        ),
        format!("--tls-ca={}", dir.join("ca.pem").display()),
    ]
}

/// overlayctl as `identity` against `url`.
fn ctl_as(dir: &Path, identity: &str, url: &str, args: &[&str]) -> Output {
    let mut all: Vec<String> = tls_flags(dir, identity);
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

#[test]
fn mutual_tls_with_node_identity() {
    let Some(etcd) = Etcd::start_or_skip("mutual_tls_with_node_identity") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki);
    let controller = Controller::start_with(
        &etcd,
        "/overlay",
        dir.path(),
        "controller",
        &tls_flags(&pki, "controller"),
    );
    let url = controller.url.replace("http://", "https://");

    // Admin calls need the admin identity.
    let cfg = [
        "config",
        "set",
        "--network",
        "10.244.0.0/16",
        "--backend",
        "alloc",
    ];
    let out = ctl_as(&pki, "node-a", &url, &cfg);
    assert!(
        !out.status.success() && stderr(&out).contains("admin"),
        "a node may not set the config: {}",
        stderr(&out)
    );
    let out = ctl_as(&pki, "admin", &url, &cfg);
    assert!(out.status.success(), "{}", stderr(&out));

    // Without a certificate, or in plaintext, nobody gets in.
    let out = ctl(&[
        "--insecure",
        &format!("--controller={}", controller.url),
        "leases",
    ]);
    assert!(
        !out.status.success(),
        "plaintext client accepted by a TLS controller"
    );
    let other = dir.path().join("other-pki");
    certs(&other);
    let out = ctl_as(&other, "admin", &url, &["leases"]);
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );

    // An agent's node name is the one its certificate carries.
    let a_flags = tls_flags(&pki, "node-a");
    let a_refs: Vec<&str> = a_flags.iter().map(String::as_str).collect();
    let a = start_agent_without_name(&url, dir.path(), "agent-a", "198.51.100.1", &a_refs);
    a.wait_subnet(PATIENCE);
    let leases = ctl_as(&pki, "admin", &url, &["leases", "-o", "json"]);
    let leases: serde_json::Value = serde_json::from_slice(&leases.stdout).unwrap();
    assert_eq!(leases[0]["node"], "node-a");

    // node-b's certificate cannot claim node-a's name (or its lease).
    let mut b_flags = tls_flags(&pki, "node-b");
    b_flags.push("--node-name=node-a".into());
    let b_refs: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let b = start_agent_without_name(&url, dir.path(), "agent-b", "198.51.100.2", &b_refs);
    wait_until(PATIENCE, || {
        b.log().contains("may not act for node").then_some(())
    })
    .unwrap_or_else(|| panic!("impersonation was not refused:\n{}", b.log()));
    assert!(b.subnet_env().is_none());
    let out = ctl_as(
        &pki,
        "node-b",
        &url,
        &["lease", "revoke", &a.subnet().unwrap()],
    );
    assert!(!out.status.success(), "a node revoked another's lease");
    let leases = ctl_as(&pki, "admin", &url, &["leases", "-o", "json"]);
    let leases: serde_json::Value = serde_json::from_slice(&leases.stdout).unwrap();
    assert_eq!(
        leases.as_array().unwrap().len(),
        1,
        "nothing changed: {leases}"
    );
}

/// An agent whose node name comes from its certificate unless `flags` has `--node-name`.
fn start_agent_without_name(url: &str, dir: &Path, label: &str, ip: &str, flags: &[&str]) -> Agent {
    Agent::start_no_name(url, label, ip, dir, flags)
}
