//! What fault injection needs from a lab: stopping and restarting etcd or the controller,
//! cutting a host off the underlay, and growing the lab by a host.
//!
//! A stopped service is restarted from its own command line and environment, read from
//! /proc just before it is signalled, rather than from a second copy of the flags
//! [`Lab::up`] gave it: whatever `up` starts it with (ports, data dir, certificates) the
//! restarted process gets too, so the two can never drift apart. etcd comes back on the
//! same data dir, which is what an operator's restart does. It is started by the same
//! `Lab::spawn` as the first time (namespace, the lab's environment, log, detached or
//! a child), given only the old command line and environment instead of the lab's.
//!
//! A host is cut at the underlay end of its veth (the bridge port in the underlay
//! namespace), not at its own `eth0`: the host keeps its addresses and routes, exactly
//! as when a switch port or cable fails, and restoring the port restores the host as it
//! was.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::Command;
use std::time::Duration;

use crate::process::wait_for;
use crate::{file_err, http_get_in, netns, Lab, LabError};

/// A process [`Lab::up`] starts in the underlay namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Etcd,
    Controller,
}

impl Service {
    fn role(self) -> &'static str {
        match self {
            Service::Etcd => "etcd",
            Service::Controller => "controller",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.role())
    }
}

/// A service stopped by [`Lab::stop_service`]: what it takes to start it again as it was.
#[derive(Debug, Clone)]
pub struct StoppedService {
    pub service: Service,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

/// NUL-separated strings from a /proc file.
fn proc_strings(pid: u32, file: &str) -> Result<Vec<OsString>, LabError> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/{file}"));
    let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
    Ok(bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect())
}

impl Lab {
    /// The pid of a running service.
    pub fn service_pid(&self, service: Service) -> Option<u32> {
        match service {
            Service::Etcd => self.state.etcd_pid,
            Service::Controller => self.state.controller_pid,
        }
    }

    /// Records (and saves) the pid of a service.
    fn set_service_pid(&mut self, service: Service, pid: Option<u32>) -> Result<(), LabError> {
        match service {
            Service::Etcd => self.state.etcd_pid = pid,
            Service::Controller => self.state.controller_pid = pid,
        }
        self.state.save()
    }

    /// Sends `signal` (one that ends the process: SIGKILL, SIGTERM) to a service and waits
    /// for it to exit. For a pause instead, send SIGSTOP/SIGCONT to [`Lab::service_pid`].
    pub fn stop_service(
        &mut self,
        service: Service,
        signal: i32,
    ) -> Result<StoppedService, LabError> {
        let pid = self
            .service_pid(service)
            .ok_or_else(|| LabError::Invalid(format!("the lab's {service} is not running")))?;
        let argv = proc_strings(pid, "cmdline")?;
        let env = proc_strings(pid, "environ")?
            .into_iter()
            .filter_map(|kv| {
                let bytes = kv.into_vec();
                let eq = bytes.iter().position(|b| *b == b'=')?;
                Some((
                    OsString::from_vec(bytes[..eq].to_vec()),
                    OsString::from_vec(bytes[eq + 1..].to_vec()),
                ))
            })
            .collect();
        if argv.is_empty() {
            return Err(LabError::Invalid(format!(
                "the lab's {service} (pid {pid}) has no command line: it has exited"
            )));
        }
        let what = format!("the lab's {service} (pid {pid}) to exit");
        self.stop(service.role(), pid, signal, &what)?;
        self.set_service_pid(service, None)?;
        Ok(StoppedService { service, argv, env })
    }

    /// Starts a stopped service again, exactly as it ran before, and waits until it
    /// serves: etcd accepts connections, the controller answers `/readyz` (which needs
    /// etcd).
    pub fn start_service(&mut self, stopped: StoppedService) -> Result<u32, LabError> {
        let service = stopped.service;
        let ul = self.state.underlay_ns.clone();
        let log = match service {
            Service::Etcd => self.state.etcd_log.clone(),
            Service::Controller => self.state.controller_log.clone(),
        };
        let mut cmd = Command::new(&stopped.argv[0]);
        cmd.args(&stopped.argv[1..])
            .env_clear()
            .envs(stopped.env.iter().map(|(k, v)| (k, v)));
        let pid = self.spawn(service.role(), &ul, &mut cmd, &log)?;
        self.set_service_pid(service, Some(pid))?;
        let what = format!("the restarted {service} to serve (log: {})", log.display());
        match service {
            Service::Etcd => wait_for(&what, Duration::from_secs(20), || {
                netns::run_in(&ul, || {
                    std::net::TcpStream::connect_timeout(
                        &([127, 0, 0, 1], 2379).into(),
                        Duration::from_millis(500),
                    )
                    .is_ok()
                })
                .unwrap_or(false)
                .then_some(())
            })?,
            Service::Controller => wait_for(&what, Duration::from_secs(30), || {
                http_get_in(&ul, "127.0.0.1", 7401, "/readyz")
                    .filter(|(c, _)| *c == 200)
                    .map(|_| ())
            })?,
        }
        Ok(pid)
    }

    /// Cuts (`up == false`) or restores the underlay link of `host`: its bridge port in the
    /// underlay namespace goes down or up.
    pub fn set_underlay_link(&self, host: &str, up: bool) -> Result<(), LabError> {
        let h = self.state.host(host)?;
        netns::ip_in(
            &self.state.underlay_ns,
            &["link", "set", &h.name, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    /// Adds one more host (`h<N+1>`, underlay 192.0.2.<11+N>) and starts its agent; wait
    /// for it with [`Lab::wait_agent_ready`]. Returns the host's name.
    pub fn join_host(&mut self) -> Result<String, LabError> {
        let index = self.state.hosts.len() + 1;
        if index > 200 {
            return Err(LabError::Invalid(format!(
                "lab {} has 200 hosts already",
                self.state.name
            )));
        }
        let name = format!("h{index}");
        self.add_host(&name, index)?;
        Ok(name)
    }
}
