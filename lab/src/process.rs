//! Starting, stopping and waiting for the lab's daemons (etcd, the controller, agents).
//!
//! Every daemon is started by [`Lab::spawn`] and nothing else: in its namespace, with the
//! lab's environment ([`netns::lab_env`]), stdin closed and its output appended to its
//! log. A test's lab keeps the child and kills it on drop; `overlayctl lab up` detaches
//! it (`setsid` in the child, the handle forgotten) so that it outlives the command, and
//! later commands find it by the pid saved in `lab.json`. Restarting a stopped service or
//! agent goes through the same function, so a restarted process can never differ from
//! the first in how it was started, only in its command line.
//!
//! Whether a process has exited is read from `/proc/<pid>/stat` ([`exited`]), not from
//! `kill(pid, 0)`: a detached daemon that exits stays a zombie of this process until it
//! is reaped, and a zombie has exited as far as the lab is concerned.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{file_err, netns, Lab, LabError};

impl Lab {
    /// Starts `cmd` inside namespace `ns` as the lab's daemon `role` (its name among the
    /// children: "etcd", "controller", "agent-h1"), with stdout and stderr appended to
    /// `log`; detached when the lab is. Returns its pid.
    pub(crate) fn spawn(
        &mut self,
        role: &str,
        ns: &str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<u32, LabError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| file_err(log, e))?;
        let err = out.try_clone().map_err(|e| file_err(log, e))?;
        netns::lab_env(cmd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        netns::in_netns(cmd, ns)?;
        if self.detach {
            // SAFETY: setsid is async-signal-safe; the daemon leaves our session.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| LabError::Command {
            cmd: cmd.get_program().to_string_lossy().into_owned(),
            message: e.to_string(),
        })?;
        let pid = child.id();
        if self.detach {
            std::mem::forget(child);
        } else {
            self.children.push((role.to_string(), child));
        }
        Ok(pid)
    }

    /// Sends `signal` to the daemon `role` started as `pid` and waits until it has exited:
    /// reaped when it is a child of this lab, otherwise watched until [`exited`].
    /// `what` names the wait in a timeout error.
    pub(crate) fn stop(
        &mut self,
        role: &str,
        pid: u32,
        signal: i32,
        what: &str,
    ) -> Result<(), LabError> {
        // SAFETY: kill(2) on a pid this lab started.
        unsafe { libc::kill(pid as i32, signal) };
        if let Some(pos) = self.children.iter().position(|(r, _)| r == role) {
            let (_, mut child) = self.children.remove(pos);
            let _ = child.wait();
            Ok(())
        } else {
            wait_for(what, Duration::from_secs(10), || exited(pid).then_some(()))
        }
    }

    /// Kills and reaps every child (a detached lab has none).
    pub(crate) fn stop_children(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
        }
        for (_, mut child) in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 50 ms until it gives a value, or fails with a timeout naming `what`.
pub(crate) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `ready` holds for a component the lab started as `pid`; when the process
/// exits first or time runs out, the error carries its last log lines and the log's path.
pub(crate) fn wait_component(
    what: &str,
    pid: Option<u32>,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let failed = |why: String| LabError::Component {
        what: format!("{what} did not start"),
        why,
        log: log.to_path_buf(),
        tail: last_lines(log, 20),
    };
    let outcome = wait_for(what, timeout, || {
        if ready() {
            Some(true)
        } else {
            pid.is_some_and(exited).then_some(false)
        }
    });
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(failed("it exited".into())),
        Err(_) => Err(failed(format!("not ready after {}s", timeout.as_secs()))),
    }
}

/// Whether `pid` has exited: gone, or a zombie nobody reaped yet.
pub(crate) fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// The last `n` lines of a text file, each indented for an error message.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        return "  (empty)".into();
    }
    tail.iter()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}
