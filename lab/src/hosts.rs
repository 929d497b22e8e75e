//! A lab's hosts: a namespace on the underlay bridge with its own agent, added while the
//! lab is built or later ([`Lab::join_host`]), and the agent stopped and started again
//! as the fault tests and `overlayctl lab` need. The agent's flags are made here only, so
//! a restarted agent runs exactly as the first one did.

use std::process::Command;
use std::time::Duration;

use crate::process::wait_for;
use crate::{file_err, netns, HostState, Lab, LabError, AGENT_HEALTH_PORT, UNDERLAY_GATEWAY};

impl Lab {
    /// Makes host `name` (underlay 192.0.2.<10+index>), issues its certificate and starts
    /// its agent, without waiting for it.
    pub(crate) fn add_host(&mut self, name: &str, index: usize) -> Result<(), LabError> {
        let ns = format!("{}-{name}", self.state.ns_prefix);
        let ip = format!("192.0.2.{}", 10 + index);
        let ul = self.state.underlay_ns.clone();
        netns::create(&ns)?;
        netns::veth(&ns, "eth0", &ul, name, None)?;
        netns::ip_in(&ul, &["link", "set", name, "master", "br0", "up"])?;
        netns::ip_in(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns::ip_in(&ns, &["link", "set", "eth0", "up"])?;
        netns::ip_in(&ns, &["route", "add", "default", "via", UNDERLAY_GATEWAY])?;
        let dir = self.state.dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
        let host = HostState {
            name: name.into(),
            ns,
            underlay_ip: ip,
            agent_log: dir.join("agent.log"),
            dir,
            agent_pid: None,
        };
        self.state.hosts.push(host);
        self.state.issue_cert(name, &[])?;
        self.start_agent(name)?;
        self.state.save()
    }

    /// The agent's flags: the lab's own, then the spec's extra ones.
    fn agent_args(&self, host: &HostState) -> Vec<String> {
        let mut args = vec![
            format!("--controller={}", self.state.controller_url),
            format!("--node-name={}", host.name),
            "--iface=eth0".into(),
            format!("--run-dir={}", host.dir.join("run").display()),
            format!("--state-dir={}", host.dir.join("state").display()),
            format!("--health-listen=127.0.0.1:{AGENT_HEALTH_PORT}"),
            format!("--cni-conf-dir={}", host.cni_conf_dir().display()),
            format!("--cni-data-dir={}", host.dir.join("cni-ipam").display()),
        ];
        args.extend(self.state.tls_args(&host.name));
        args.extend(self.state.agent_args.iter().cloned());
        args
    }

    /// Starts the agent of `host` (after `stop_agent`, or a crash).
    pub fn start_agent(&mut self, host: &str) -> Result<(), LabError> {
        let h = self.state.host(host)?.clone();
        let args = self.agent_args(&h);
        let bin = self.state.bin_dir.join("overlay-agent");
        let role = format!("agent-{host}");
        let mut cmd = Command::new(&bin);
        cmd.args(&args).envs(self.state.agent_env.iter().cloned());
        let pid = self.spawn(&role, &h.ns, &mut cmd, &h.agent_log)?;
        self.set_agent_pid(host, Some(pid))
    }

    /// Stops the agent of `host` with `signal` and waits for it to exit.
    pub fn stop_agent(&mut self, host: &str, signal: i32) -> Result<(), LabError> {
        let Some(pid) = self.state.host(host)?.agent_pid else {
            return Ok(());
        };
        let what = format!("agent {host} to exit");
        self.stop(&format!("agent-{host}"), pid, signal, &what)?;
        self.set_agent_pid(host, None)
    }

    /// Records (and saves) the pid of `host`'s agent.
    fn set_agent_pid(&mut self, host: &str, pid: Option<u32>) -> Result<(), LabError> {
        self.state
            .hosts
            .iter_mut()
            .find(|x| x.name == host)
            .expect("host")
            .agent_pid = pid;
        self.state.save()
    }

    /// Waits until the agent of `host` answers `/readyz`.
    pub fn wait_agent_ready(&self, host: &str, timeout: Duration) -> Result<(), LabError> {
        let h = self.state.host(host)?.clone();
        wait_for(&format!("agent {host} ready"), timeout, || {
            self.state.agent_ready(&h).then_some(())
        })
    }
}
