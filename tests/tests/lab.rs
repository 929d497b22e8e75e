//! End-to-end tests of `overlayctl lab`: the real binary, as a user runs it, building real
//! labs (namespaces, etcd, controller, agents, workloads attached by `overlay-cni`).
//!
//! Every lab gets a name unique to this run (`t<pid><n>`) and a guard that runs
//! `overlayctl lab down` on drop, so a failing test leaves nothing behind. The tests of
//! this file run one at a time (a lock): "`lab down` leaves the machine as it was" compares
//! machine-wide state before and after, which another lab of this file coming or going
//! in the middle would change.
//!
//! Needs root, etcd and Debian's CNI plugins (portmap); skipped with a message otherwise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use overlay_lab::netns;
use overlay_tests::{bin_path, is_root, skip, wait_until};
use serde_json::Value;

/// A bound for a broken datapath, not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock, or `None` (after reporting the skip) when the prerequisites are missing.
fn prerequisites(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !is_root() {
        skip(test, "needs root for network namespaces");
        return None;
    }
    if overlay_tests::etcd::etcd_binary().is_none() {
        skip(test, "etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    if !Path::new("/usr/lib/cni/portmap").exists() {
        skip(
            test,
            "needs /usr/lib/cni/portmap (apt-get install containernetworking-plugins)",
        );
        return None;
    }
    for bin in ["overlay-agent", "overlay-controller", "overlay-cni"] {
        bin_path(bin);
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `overlayctl ARGS`.
fn overlayctl(args: &[&str]) -> Output {
    Command::new(bin_path("overlayctl"))
        .args(args)
        .env_remove("OVERLAY_LAB")
        .env_remove("OVERLAY_CONTROLLER")
        .output()
        .expect("run overlayctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `overlayctl ARGS`, asserted a success; its stdout.
fn ok(args: &[&str]) -> String {
    let out = overlayctl(args);
    assert!(
        out.status.success(),
        "overlayctl {args:?} failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `overlayctl ARGS`, asserted a one-line failure with exit code 1; the line.
fn fails(args: &[&str]) -> String {
    let out = overlayctl(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "overlayctl {args:?} must fail: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("overlayctl: "), "{err}");
    err
}

/// A lab made by `overlayctl lab up`, removed by `overlayctl lab down` on drop.
struct LabGuard {
    name: String,
}

impl LabGuard {
    fn up(extra: &[&str]) -> (LabGuard, String) {
        let name = unique_name();
        let guard = LabGuard { name: name.clone() };
        let mut args = vec!["lab", "up", "--name", &name];
        args.extend_from_slice(extra);
        let summary = ok(&args);
        (guard, summary)
    }

    fn args<'a>(&'a self, sub: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["lab"];
        all.extend_from_slice(sub);
        all.extend(["--name", self.name.as_str()]);
        all.extend_from_slice(rest);
        all
    }

    fn status(&self) -> Value {
        let out = ok(&self.args(&["status"], &["-o", "json"]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON ({e}): {out}"))
    }

    /// `lab exec TARGET -- CMD...`: the whole output.
    fn exec(&self, target: &str, cmd: &[&str]) -> Output {
        let mut rest = vec![target, "--"];
        rest.extend_from_slice(cmd);
        overlayctl(&self.args(&["exec"], &rest))
    }

    fn ping_eventually(&self, from: &str, to: &str) -> bool {
        wait_until(PATIENCE, || {
            self.exec(from, &["ping", "-c", "1", "-W", "2", to])
                .status
                .success()
                .then_some(())
        })
        .is_some()
    }

    fn down(&self) -> String {
        ok(&self.args(&["down"], &[]))
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let out = overlayctl(&["lab", "down", "--name", &self.name]);
        if !out.status.success() {
            eprintln!("lab down --name {}: {}", self.name, text(&out.stderr));
        }
    }
}

fn workload_ip(status: &Value, target: &str) -> String {
    let (host, name) = target.split_once('/').unwrap();
    status["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["host"] == host && w["name"] == name)
        .unwrap_or_else(|| panic!("no workload {target} in {status}"))["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What a lab could leave behind on the machine, outside its own namespaces.
#[derive(Debug, PartialEq, Eq)]
struct MachineState {
    root_links: String,
    lab_namespaces: Vec<String>,
    iptables: String,
    rules: String,
    lab_root: bool,
}

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn machine_state() -> MachineState {
    // Counters and the "generated at" comments change by themselves.
    let iptables = command_output("iptables-save", &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    MachineState {
        root_links: command_output("ip", &["-o", "link"]),
        // Only the namespaces `overlayctl lab` names: other suites on this machine make
        // and remove their own at any time.
        lab_namespaces: command_output("ip", &["netns", "list"])
            .lines()
            .filter(|l| l.starts_with("ovl-"))
            .map(str::to_string)
            .collect(),
        iptables,
        rules: command_output("ip", &["rule"]),
        lab_root: Path::new(overlay_lab::LAB_ROOT).exists(),
    }
}

fn up_status_exec_down(test: &str, backend: &str) {
    let Some(_serial) = prerequisites(test) else {
        return;
    };
    let before = machine_state();
    let (lab, summary) = LabGuard::up(&["--hosts", "2", "--backend", backend]);
    let name = lab.name.clone();
    assert!(
        summary.contains("Try:") && summary.contains(&format!("lab down --name {name}")),
        "{summary}"
    );

    let status = lab.status();
    assert_eq!(status["name"], name.as_str());
    assert_eq!(status["backend"], backend);
    let hosts = status["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    let mut subnets = Vec::new();
    for h in hosts {
        assert_eq!(h["agent_ready"], true, "{h}");
        assert!(Path::new(h["log"].as_str().unwrap()).exists(), "{h}");
        subnets.push(h["subnet"].as_str().expect("a subnet").to_string());
    }
    assert_ne!(subnets[0], subnets[1]);
    for log in ["etcd_log", "controller_log"] {
        assert!(Path::new(status[log].as_str().unwrap()).exists(), "{log}");
    }
    let workloads = status["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2, "one workload per host by default");
    for w in workloads {
        // The address the CNI plugin assigned, from its host's subnet.
        let host = hosts.iter().find(|h| h["name"] == w["host"]).unwrap();
        let subnet: ipnet::Ipv4Net = host["subnet"].as_str().unwrap().parse().unwrap();
        let ip: std::net::Ipv4Addr = w["ip"].as_str().unwrap().parse().unwrap();
        assert!(subnet.contains(&ip), "{w} in {subnet}");
    }
    let table = ok(&lab.args(&["status"], &[]));
    assert!(
        table.contains("h1") && table.contains("ready") && table.contains("h2/w1"),
        "{table}"
    );

    // Across hosts, both ways.
    for (from, to) in [("h1/w1", "h2/w1"), ("h2/w1", "h1/w1")] {
        let ip = workload_ip(&status, to);
        assert!(
            lab.ping_eventually(from, &ip),
            "{from} cannot reach {to} ({ip})"
        );
    }
    // The controller, through `lab ctl`.
    let leases: Value =
        serde_json::from_str(&ok(&lab.args(&["ctl"], &["--", "-o", "json", "leases"]))).unwrap();
    let leases = leases.as_array().expect("a JSON array of leases");
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(leases.iter().all(|l| l["backend"] == backend), "{leases:?}");

    // Exit codes pass through.
    assert_eq!(
        lab.exec("h1", &["sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    assert_eq!(lab.exec("h1/w1", &["true"]).status.code(), Some(0));
    let hostname = lab.exec("h2", &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(text(&hostname.stdout).contains("192.0.2.12/24"));

    // One-line errors.
    let again = fails(&["lab", "up", "--name", &name]);
    assert!(again.contains("already exists"), "{again}");
    let unknown = fails(&lab.args(&["exec"], &["h9", "--", "true"]));
    assert!(unknown.contains("no host \"h9\""), "{unknown}");
    let unknown = fails(&lab.args(&["workload", "add"], &["h9", "x"]));
    assert!(unknown.contains("no host \"h9\""), "{unknown}");

    // Down, twice, and the machine is as it was.
    assert!(lab.down().contains("removed"));
    assert!(lab.down().contains("nothing to remove"));
    let missing = fails(&lab.args(&["status"], &[]));
    assert!(missing.contains("does not exist"), "{missing}");
    assert_eq!(machine_state(), before, "lab down left something behind");
}

#[test]
fn lab_up_status_exec_down_with_vxlan() {
    up_status_exec_down("lab_up_status_exec_down_with_vxlan", "vxlan");
}

#[test]
fn lab_up_status_exec_down_with_host_gw() {
    up_status_exec_down("lab_up_status_exec_down_with_host_gw", "host-gw");
}

#[test]
fn two_labs_coexist() {
    let Some(_serial) = prerequisites("two_labs_coexist") else {
        return;
    };
    let before = machine_state();
    let (a, _) = LabGuard::up(&["--hosts", "1"]);
    let (b, _) = LabGuard::up(&["--hosts", "2", "--backend", "host-gw"]);
    let (sa, sb) = (a.status(), b.status());
    // The same addresses in both: each lab is its own world.
    assert_eq!(sa["hosts"][0]["underlay_ip"], sb["hosts"][0]["underlay_ip"]);
    assert_eq!(sa["controller_url"], sb["controller_url"]);
    let to = workload_ip(&sb, "h2/w1");
    assert!(b.ping_eventually("h1/w1", &to));
    a.down();
    // B is untouched by A's removal.
    assert_eq!(b.status()["hosts"][1]["agent_ready"], true);
    assert!(b.ping_eventually("h1/w1", &to));
    assert!(fails(&a.args(&["status"], &[])).contains("does not exist"));
    b.down();
    assert_eq!(machine_state(), before);
}

/// Accepts one connection on port 80 inside `ns`; returns what the peer sent.
fn serve_once(ns: &str) -> std::thread::JoinHandle<String> {
    let listener = netns::run_in(ns, || TcpListener::bind("0.0.0.0:80").expect("bind :80"))
        .expect("enter the workload namespace");
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = String::new();
        conn.read_to_string(&mut got).expect("read");
        got
    })
}

#[test]
fn a_published_port_is_reachable_from_another_host_and_rm_removes_the_workload() {
    let test = "a_published_port_is_reachable_from_another_host_and_rm_removes_the_workload";
    let Some(_serial) = prerequisites(test) else {
        return;
    };
    let (lab, _) = LabGuard::up(&["--hosts", "2", "--workloads-per-host", "0"]);
    assert_eq!(lab.status()["workloads"], serde_json::json!([]));
    let added = ok(&lab.args(
        &["workload", "add"],
        &[
            "h1",
            "web",
            "--publish",
            "18080:80",
            "--publish",
            "5353:53/udp",
        ],
    ));
    assert!(added.contains("192.0.2.11:18080 -> "), "{added}");
    let status = lab.status();
    let web = &status["workloads"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(
        web["publish"],
        serde_json::json!(["18080:80/tcp", "5353:53/udp"])
    );
    let ns = web["namespace"].as_str().unwrap().to_string();
    let h2_ns = status["hosts"][1]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    let dup = fails(&lab.args(&["workload", "add"], &["h1", "web"]));
    assert!(dup.contains("exists already"), "{dup}");
    let taken = fails(&lab.args(
        &["workload", "add"],
        &["h1", "other", "--publish", "18080:81"],
    ));
    assert!(taken.contains("published by h1/web"), "{taken}");

    // From host h2, over the underlay, to h1's published port.
    let server = serve_once(&ns);
    netns::run_in(&h2_ns, || {
        let to: SocketAddr = "192.0.2.11:18080".parse().unwrap();
        let mut conn = TcpStream::connect_timeout(&to, PATIENCE)
            .unwrap_or_else(|e| panic!("connect to h1's published port from h2: {e}"));
        conn.write_all(b"hello from h2").expect("write");
    })
    .unwrap();
    assert_eq!(server.join().unwrap(), "hello from h2");

    ok(&lab.args(&["workload", "rm"], &["h1", "web"]));
    assert_eq!(lab.status()["workloads"], serde_json::json!([]));
    assert!(!netns::exists(&ns), "the workload's namespace is gone");
    let nat = text(&lab.exec("h1", &["iptables-save", "-t", "nat"]).stdout);
    assert!(!nat.contains("18080"), "the port mapping is left:\n{nat}");
    let links = text(&lab.exec("h1", &["ip", "-o", "link"]).stdout);
    assert!(
        !links.lines().any(|l| l.contains("master ovl0")),
        "a veth is left on the bridge:\n{links}"
    );
    assert!(fails(&lab.args(&["workload", "rm"], &["h1", "web"])).contains("no workload"));
    // The port is free again.
    ok(&lab.args(
        &["workload", "add"],
        &["h1", "other", "--publish", "18080:80"],
    ));
}

#[test]
fn down_removes_a_half_made_lab() {
    let Some(_serial) = prerequisites("down_removes_a_half_made_lab") else {
        return;
    };
    let before = machine_state();
    let name = unique_name();
    let _guard = LabGuard { name: name.clone() };
    // What a crash early in `lab up` leaves: namespaces (one with a process) and a
    // directory without lab.json.
    for role in ["ul", "h1"] {
        netns::create(&format!("ovl-{name}-{role}")).unwrap();
    }
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    netns::in_netns(&mut sleeper, &format!("ovl-{name}-h1")).unwrap();
    let mut sleeper = sleeper.spawn().unwrap();
    let dir = overlay_lab::dir_for(&name);
    std::fs::create_dir_all(dir.join("etcd")).unwrap();
    let half = fails(&["lab", "status", "--name", &name]);
    assert!(half.contains("half-made"), "{half}");
    let out = ok(&["lab", "down", "--name", &name]);
    assert!(out.contains("removed (2 namespaces"), "{out}");
    assert!(sleeper.wait().is_ok(), "the process in the lab was ended");
    assert!(!dir.exists());
    assert_eq!(machine_state(), before);
}

/// The caller's `OVERLAY_*` variables (here a plaintext session's) do not reach the lab's
/// components, which run mutual TLS with the lab's own flags.
#[test]
fn lab_up_ignores_the_callers_overlay_environment() {
    let Some(_serial) = prerequisites("lab_up_ignores_the_callers_overlay_environment") else {
        return;
    };
    let name = unique_name();
    let _guard = LabGuard { name: name.clone() };
    let out = Command::new(bin_path("overlayctl"))
        .args(["lab", "up", "--name", &name, "--hosts", "1"])
        .env("OVERLAY_INSECURE", "true")
        .env("OVERLAY_HEALTH_LISTEN", "off")
        .env("OVERLAY_RESYNC_INTERVAL", "banana")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab up with OVERLAY_* set: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let leases = Command::new(bin_path("overlayctl"))
        .args(["lab", "ctl", "--name", &name, "--", "-o", "json", "leases"])
        .env("OVERLAY_INSECURE", "true")
        .output()
        .unwrap();
    assert!(leases.status.success(), "{}", text(&leases.stderr));
    let leases: Value = serde_json::from_slice(&leases.stdout).unwrap();
    assert_eq!(leases.as_array().map(Vec::len), Some(1), "{leases}");
}

/// A component that cannot start fails `up` with its own last log lines and the path of
/// its whole log, which stays; everything else of the lab is removed. Here the
/// controller's health port is the one etcd already holds in the underlay namespace.
#[test]
fn a_failed_lab_up_shows_the_failing_components_log_and_keeps_it() {
    let test = "a_failed_lab_up_shows_the_failing_components_log_and_keeps_it";
    let Some(_serial) = prerequisites(test) else {
        return;
    };
    let before = machine_state();
    let name = unique_name();
    let _guard = LabGuard { name: name.clone() };
    let dir = overlay_lab::dir_for(&name);
    let mut spec = overlay_lab::LabSpec::new(
        &name,
        &overlay_lab::ns_prefix_for(&name),
        &dir,
        bin_path("overlayctl").parent().unwrap(),
    );
    spec.hosts = 1;
    spec.controller_args = vec!["--health-listen=127.0.0.1:2379".into()];
    let err = match overlay_lab::Lab::up(&spec, &mut |_| {}) {
        Ok(_) => panic!("a controller that cannot listen made a lab"),
        Err(e) => e,
    };
    let log = dir.join("controller.log");
    let shown = err.to_string();
    assert!(
        matches!(err, overlay_lab::LabError::Component { .. }),
        "{shown}"
    );
    assert!(shown.contains("the controller did not start"), "{shown}");
    assert!(
        shown.contains("cannot listen on 127.0.0.1:2379"),
        "the controller's own words: {shown}"
    );
    assert!(shown.contains(&log.display().to_string()), "{shown}");
    let kept = std::fs::read_to_string(&log).expect("the controller's log is kept");
    assert!(kept.contains("cannot listen on 127.0.0.1:2379"), "{kept}");
    assert!(
        netns::list_with_prefix(&format!("{}-", spec.ns_prefix)).is_empty(),
        "namespaces removed"
    );
    assert!(!dir.join(overlay_lab::STATE_FILE).exists());
    // `lab status` says where the logs are; `lab down` removes them.
    let status = fails(&["lab", "status", "--name", &name]);
    assert!(
        status.contains("failed to start") && status.contains("logs"),
        "{status}"
    );
    assert!(ok(&["lab", "down", "--name", &name]).contains("removed"));
    assert!(!dir.exists());
    assert_eq!(machine_state(), before);
}

#[test]
fn lab_commands_name_their_errors() {
    // Usage errors need no root.
    let bad = fails(&["lab", "up", "--name", "Bad-Name"]);
    assert!(bad.contains("root") || bad.contains("lower-case"), "{bad}");
    let out = overlayctl(&["lab", "up", "--hosts", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--hosts"));
    if !is_root() {
        return;
    }
    // As another user: one line naming root.
    let setpriv = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_path("overlayctl"))
        .args(["lab", "status"])
        .output();
    if let Ok(out) = setpriv {
        if out.status.code() == Some(1) && text(&out.stderr).starts_with("overlayctl: ") {
            assert!(
                text(&out.stderr).contains("need root"),
                "{}",
                text(&out.stderr)
            );
        }
    }
}
