//! A complete Overlay cluster on one Linux machine, made of network namespaces.
//!
//! ```text
//!            underlay namespace <prefix>-ul: bridge br0 192.0.2.1/24, etcd, controller
//!             |                |                |
//!   <prefix>-h1 eth0   <prefix>-h2 eth0   <prefix>-h3 eth0      192.0.2.11, .12, .13
//!   overlay-agent      overlay-agent      overlay-agent         bridge ovl0, VTEP ovl.1
//!     |                  |                  |
//!   <prefix>-h1-w1     <prefix>-h2-w1     <prefix>-h3-w1        workloads, eth0 on ovl0
//! ```
//!
//! The same code serves `overlayctl lab` (processes detached, state in `lab.json` so later
//! commands find them) and the end-to-end tests (processes are children that die with the
//! test). Nothing is created in the root namespace: every link is made inside a namespace
//! the lab owns, and etcd and the controller listen inside the underlay namespace, so two
//! labs never collide on ports. Tearing down deletes the namespaces, which also kills
//! every process still inside them and drops every rule and route they held; it works from
//! the namespace prefix alone, so a lab half-made by a crash is cleaned up too.
//!
//! The crate is split by job: `state` is `lab.json` and what can be read from it without
//! starting anything, `up` builds a lab, `hosts` and `workloads` add and restart its
//! parts, `process` starts and stops the lab's daemons, `http` is the tiny client the
//! readiness checks use, [`faults`] breaks things on purpose and `teardown` removes it
//! all; [`netns`] and [`cni`] are the namespace and CNI plumbing underneath. This file
//! holds what they share: names, paths, the error type and the [`Lab`] handle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub mod cni;
pub mod faults;
mod hosts;
mod http;
pub mod netns;
mod process;
mod state;
mod teardown;
mod up;
mod workloads;

pub use cni::PortMapping;
pub use faults::{Service, StoppedService};
pub use http::{http_get, http_get_in};
pub use state::{HostState, LabState, WorkloadState};
pub use teardown::{teardown_keeping_logs, teardown_prefix};
pub use up::LabSpec;
pub use workloads::validate_workload_name;

pub const UNDERLAY_GATEWAY: &str = "192.0.2.1";
pub const CONTROLLER_PORT: u16 = 7400;
pub const AGENT_HEALTH_PORT: u16 = 7402;
pub const STATE_FILE: &str = "lab.json";
/// Where `overlayctl lab` keeps each lab (`<LAB_ROOT>/<name>`): under /run, like the
/// namespaces in /run/netns, so a reboot, which ends every lab process and namespace, also
/// ends the lab's state instead of leaving a `lab.json` that names nothing.
pub const LAB_ROOT: &str = "/run/overlay-lab";
/// The agent's conflist inside its `--cni-conf-dir`.
pub use overlay_core::host_files::CNI_CONFLIST;
/// The interface name a workload gets (CNI_IFNAME).
pub const WORKLOAD_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{cmd}: {message}")]
    Command { cmd: String, message: String },
    #[error("namespace {ns}: {message}")]
    Namespace { ns: String, message: String },
    #[error("lab {0:?} already exists: run `overlayctl lab down --name {0}` first")]
    Exists(String),
    #[error("lab {0:?} does not exist (start one with `overlayctl lab up`)")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// A component of the lab did not come up: its own last log lines, and where the whole
    /// log is (kept after the rest of the lab is removed).
    #[error("{what} ({why}); the last lines of its log:\n{tail}\nwhole log: {}", log.display())]
    Component {
        what: String,
        why: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("CNI {command} by {plugin}: {message}")]
    Cni {
        plugin: String,
        command: String,
        message: String,
    },
}

/// Whether this process runs as root (labs need it: namespaces, setns).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The namespace prefix of the lab `name` made by `overlayctl lab` (`ovl-<name>`).
pub fn ns_prefix_for(name: &str) -> String {
    format!("ovl-{name}")
}

/// The directory of the lab `name` made by `overlayctl lab`.
pub fn dir_for(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// A lab name: lower-case letters and digits only, so that no lab's namespace prefix
/// (`ovl-<name>-`) is a prefix of another lab's namespaces (`lab` vs `lab-2` would be),
/// since teardown finds a lab's namespaces by prefix alone.
pub fn validate_lab_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "lab name {name:?}: use 1 to 24 lower-case letters and digits"
        )))
    }
}

/// A lab being built or run: its state, and the processes it started as children.
pub struct Lab {
    pub state: LabState,
    /// Child processes when not detached (killed on drop).
    children: Vec<(String, Child)>,
    detach: bool,
    /// Tear everything down on drop (tests).
    pub down_on_drop: bool,
}

impl Lab {
    /// A handle on a lab made earlier by a detached `up` (from its `lab.json`): it starts
    /// and stops nothing by itself and leaves the lab running when dropped.
    pub fn attach(state: LabState) -> Lab {
        Lab {
            state,
            children: Vec::new(),
            detach: true,
            down_on_drop: false,
        }
    }

    /// Runs `overlayctl --controller URL ARGS` inside the underlay namespace.
    pub fn overlayctl(&self, args: &[String]) -> Result<String, LabError> {
        let bin = self.state.bin_dir.join("overlayctl");
        let mut all = self.state.admin_client_args();
        all.extend(args.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = netns::exec(&self.state.underlay_ns, &bin.to_string_lossy(), &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command in a host or workload namespace.
    pub fn exec(
        &self,
        target: &str,
        program: &str,
        args: &[&str],
    ) -> Result<std::process::Output, LabError> {
        let ns = self.state.target_ns(target)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        netns::in_netns(&mut cmd, &ns)?;
        cmd.output().map_err(|e| LabError::Command {
            cmd: program.into(),
            message: e.to_string(),
        })
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> LabError {
    LabError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
