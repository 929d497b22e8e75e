//! The deployment files: systemd units pass `systemd-analyze verify` (with ExecStart
//! pointing at the binaries just built, since verify checks that they exist), and the
//! env file examples name only variables the binaries read.

use std::path::Path;
use std::process::Command;

use overlay_tests::{bin_path, skip};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            "systemd_units_verify",
            "systemd-analyze is not installed (apt-get install systemd)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bins = bin_path("overlay-agent").parent().unwrap().to_path_buf();
    let mut units = Vec::new();
    for name in [
        "overlay-agent.service",
        "overlay-controller.service",
        "overlay-etcd.service",
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap();
        let mut text = text.replace("/usr/local/bin/", &format!("{}/", bins.display()));
        if !Path::new("/usr/bin/etcd").exists() {
            text = text.replace("/usr/bin/etcd", "/bin/true");
        }
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("overlay-")).collect();
    assert!(
        ours.is_empty(),
        "warnings about our units:\n{}",
        ours.join("\n")
    );
    for unit in ["overlay-agent.service", "overlay-controller.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        assert!(
            text.contains("Type=notify")
                && text.contains("WatchdogSec=")
                && text.contains("Restart=on-failure"),
            "{unit}"
        );
    }
}

/// Every OVERLAY_* key in the env examples is one the binary's --help lists.
#[test]
fn env_examples_use_real_variables() {
    for (file, bin) in [
        ("agent.env.example", "overlay-agent"),
        ("controller.env.example", "overlay-controller"),
    ] {
        let help = Command::new(bin_path(bin)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(file)).unwrap();
        for line in text.lines() {
            let line = line.trim_start_matches('#');
            if let Some((key, _)) = line.split_once('=') {
                if key.starts_with("OVERLAY_") {
                    assert!(
                        help.contains(&format!("env: {key}=")),
                        "{file}: {key} is not read by {bin}"
                    );
                }
            }
        }
    }
}

/// The Vagrant cluster definition is valid (no provider needed to check).
#[test]
fn vagrantfile_validates() {
    if Command::new("vagrant").arg("--version").output().is_err() {
        skip(
            "vagrantfile_validates",
            "vagrant is not installed (apt-get install vagrant)",
        );
        return;
    }
    let out = Command::new("vagrant")
        // Without --ignore-provider, validate fails where no provider (VirtualBox,
        // libvirt) is installed: "No usable default provider could be found".
        .args(["validate", "--ignore-provider"])
        .current_dir(repo().join("vagrant"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("validated successfully"),
        "vagrant validate:\n{text}"
    );
}
