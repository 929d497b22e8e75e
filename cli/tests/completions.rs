//! `overlayctl completions` and `overlayctl man` through the real binary: what a packager
//! runs at install time. The pages are also rendered with man(1) when it is installed.

use std::path::Path;
use std::process::{Command, Output};

fn overlayctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(args)
        .env_remove("OVERLAY_CONTROLLER")
        .output()
        .expect("overlayctl runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bash_completion_knows_the_subcommands_and_flags() {
    let out = overlayctl(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.contains("complete "), "not a bash completion script");
    for word in [
        "leases",
        "routes",
        "status",
        "reserve",
        "revoke",
        "--controller",
        "--node",
        "--force",
    ] {
        assert!(script.contains(word), "bash completion lacks {word:?}");
    }
}

#[test]
fn every_shell_gets_a_script() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef overlayctl"),
        ("fish", "complete -c overlayctl"),
        ("elvish", "edit:completion:arg-completer[overlayctl]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = overlayctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        assert!(script.contains("leases"), "{shell}: no leases");
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error_naming_the_shells() {
    let out = overlayctl(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "overlayctl: SHELL: \"tcsh\" is not one of bash, elvish, fish, powershell, zsh\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn man_prints_the_main_page_in_roff() {
    let out = overlayctl(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.starts_with(".TH overlayctl 1 "), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}");
    }
    assert!(
        page.contains("OVERLAY_CONTROLLER"),
        "the environment is documented"
    );
    assert!(
        page.contains("overlayctl\\-leases(1)"),
        "subcommand pages are referenced"
    );
}

#[test]
fn man_out_writes_a_page_per_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let out = overlayctl(&["man", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    for name in [
        "overlayctl.1",
        "overlayctl-leases.1",
        "overlayctl-routes.1",
        "overlayctl-status.1",
        "overlayctl-lease-reserve.1",
        "overlayctl-lease-revoke.1",
        "overlayctl-config-set.1",
        "overlayctl-agent-status.1",
        "overlayctl-completions.1",
        "overlayctl-man.1",
    ] {
        let path = dir.join(name);
        assert!(path.is_file(), "{name} missing");
        assert!(
            listed.contains(&path.display().to_string()),
            "{name} not listed"
        );
        let page = std::fs::read_to_string(&path).unwrap();
        assert!(page.starts_with(".TH "), "{name}: not roff");
    }
    assert!(
        !dir.join("overlayctl-help.1").exists(),
        "help has no page of its own"
    );
    let revoke = std::fs::read_to_string(dir.join("overlayctl-lease-revoke.1")).unwrap();
    assert!(revoke.contains("SUBNET"), "{revoke}");

    let json = overlayctl(&["man", "--out", dir.to_str().unwrap(), "-o", "json"]);
    let paths: Vec<String> = serde_json::from_slice(&json.stdout).expect("a JSON array");
    assert_eq!(paths, listed);
}

#[test]
fn man_out_into_an_unusable_place_is_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let target = file.join("man1");
    let out = overlayctl(&["man", "--out", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "overlayctl: --out: cannot create {}",
            target.display()
        )) && err.lines().count() == 1,
        "{err}"
    );
}

/// man(1) renders every page without a warning (groff's warnings are on with --warnings).
#[test]
fn man_renders_the_pages() {
    let Some(man) = ["/usr/bin/man", "/bin/man"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("man is not installed: rendering not checked");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = overlayctl(&["man", "--out", tmp.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "overlayctl.1",
        "overlayctl-lease-reserve.1",
        "overlayctl-watch.1",
    ] {
        let rendered = Command::new(man)
            .args(["--warnings", "-P", "cat", "-l"])
            .arg(tmp.path().join(page))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("man runs");
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(rendered.status.success(), "{page}: {}", stderr(&rendered));
        assert!(
            rendered.stderr.is_empty(),
            "{page}: warnings: {}",
            stderr(&rendered)
        );
        assert!(
            text.contains("NAME") && text.contains("overlayctl"),
            "{text}"
        );
        assert!(
            text.lines()
                .next()
                .unwrap_or_default()
                .contains("Overlay Manual"),
            "{page}: the header names the manual: {text}"
        );
    }
    let main = Command::new(man)
        .args(["-P", "cat", "-l"])
        .arg(tmp.path().join("overlayctl.1"))
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&main.stdout);
    assert!(text.contains("leases") && text.contains("routes"), "{text}");
}
