//! Named network namespaces and running things inside them.
//!
//! Everything the lab creates is created *inside* a namespace it owns: veth pairs are made
//! with both ends placed directly into their namespaces (`ip link add ... netns A type veth
//! peer ... netns B`), so no link ever appears in the root namespace, even for a moment.
//! Processes are started with `setns(2)` in the child just before `exec`, so the binaries
//! run unmodified and nothing depends on `ip netns exec` remounting /sys.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::process::exited;
use crate::LabError;

pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Gives a command the lab's own environment: the caller's `OVERLAY_*` variables are
/// removed, since every binary reads its flags from them too (`OVERLAY_INSECURE=true` left
/// over from a plaintext session would make the lab's TLS controller serve plaintext).
/// The lab passes everything it means as flags.
pub fn lab_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OVERLAY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs a command with the lab's environment ([`lab_env`]), turning a failure into an error
/// that names it and its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, LabError> {
    lab_env(cmd);
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            cmd: shown.clone(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            cmd: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip ARGS...` in the root namespace (only ever with `-n NS` or `netns` arguments).
pub fn ip(args: &[&str]) -> Result<Output, LabError> {
    run(Command::new("ip").args(args))
}

/// `ip -n NS ARGS...`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<Output, LabError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

pub fn create(name: &str) -> Result<(), LabError> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills every process in the namespace, then deletes it. Missing is fine.
pub fn delete(name: &str) -> Result<(), LabError> {
    if !exists(name) {
        return Ok(());
    }
    let mut killed = Vec::new();
    if let Ok(out) = ip(&["netns", "pids", name]) {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) on pids the kernel says live in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    // SIGKILL is delivered asynchronously: wait (briefly) until they are gone, so that
    // whoever deletes their files next (etcd's data dir) does not race a dying writer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while killed.iter().any(|&p| !exited(p as u32)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Every namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A veth pair with `a_name` in `a_ns` and `b_name` in `b_ns`.
pub fn veth(
    a_ns: &str,
    a_name: &str,
    b_ns: &str,
    b_name: &str,
    mtu: Option<u32>,
) -> Result<(), LabError> {
    let mtu = mtu.map(|m| m.to_string());
    let mut args = vec!["link", "add", a_name, "netns", a_ns];
    if let Some(m) = &mtu {
        args.extend(["mtu", m.as_str()]);
    }
    args.extend(["type", "veth", "peer", "name", b_name, "netns", b_ns]);
    if let Some(m) = &mtu {
        args.extend(["mtu", m.as_str()]);
    }
    ip(&args)?;
    Ok(())
}

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/*` or
/// `/proc/<pid>/ns/net` file): setns(2), nothing else, so it is async-signal-safe and
/// serves both in a child between fork and exec ([`in_netns`]) and on a thread of its
/// own ([`run_in`]). The one place the lab calls setns.
pub fn setns_net(ns: BorrowedFd<'_>) -> std::io::Result<()> {
    overlay_common::netns::enter(ns)
}

/// Opens namespace `ns` for [`setns_net`].
fn open(ns: &str) -> Result<File, LabError> {
    File::open(netns_path(ns)).map_err(|e| LabError::Namespace {
        ns: ns.into(),
        message: e.to_string(),
    })
}

/// Makes `cmd` run inside namespace `ns` (setns in the child before exec).
pub fn in_netns(cmd: &mut Command, ns: &str) -> Result<(), LabError> {
    let file = open(ns)?;
    // SAFETY: only async-signal-safe calls (setns) between fork and exec; `file` is moved
    // into the closure so the fd stays open until the command is spawned.
    unsafe {
        cmd.pre_exec(move || setns_net(file.as_fd()));
    }
    Ok(())
}

/// Runs `program args...` inside `ns` and waits for it.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<Output, LabError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    in_netns(&mut cmd, ns)?;
    run(&mut cmd)
}

/// Runs `f` on a dedicated thread that has entered `ns` (sockets it opens belong to `ns`).
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LabError> {
    let file = open(ns)?;
    let ns_name = ns.to_string();
    // The thread ends after `f`, so no other work runs in `ns` by mistake.
    std::thread::spawn(move || {
        setns_net(file.as_fd()).map_err(|e| LabError::Namespace {
            ns: ns_name,
            message: e.to_string(),
        })?;
        Ok(f())
    })
    .join()
    .map_err(|_| LabError::Namespace {
        ns: ns.into(),
        message: "the thread panicked".into(),
    })?
}
