//! `lab.json`, the lab's whole state, and what can be learnt from it and from the files
//! its agents write without starting anything: a host's namespace, subnet, readiness and
//! TLS flags. Every later `overlayctl lab` command starts from [`LabState::load`], so
//! the state is saved after each step that changes it (atomically: write, then rename),
//! and a lab half-made by a crash still names what it made.

use std::path::{Path, PathBuf};
use std::process::Command;

use overlay_core::subnet_env::SubnetEnv;
use serde::{Deserialize, Serialize};

use crate::{
    cni, file_err, http_get_in, netns, LabError, PortMapping, AGENT_HEALTH_PORT, CNI_CONFLIST,
    STATE_FILE,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostState {
    pub name: String,
    pub ns: String,
    pub underlay_ip: String,
    pub dir: PathBuf,
    pub agent_pid: Option<u32>,
    pub agent_log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadState {
    pub name: String,
    pub host: String,
    pub ns: String,
    /// The address the CNI plugin assigned (no prefix length).
    pub ip: String,
    /// CNI_CONTAINERID of the attachment.
    #[serde(default)]
    pub container_id: String,
    /// Published ports (portmap's `portMappings`); DEL needs them again.
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// The ADD's final result, the `prevResult` of DEL (a runtime's result cache).
    #[serde(default)]
    pub cni_result: Option<serde_json::Value>,
}

impl HostState {
    /// The agent's `--cni-conf-dir`.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
}

/// What `lab.json` holds: enough for any later command to find everything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabState {
    pub name: String,
    pub ns_prefix: String,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub backend: String,
    pub network: String,
    pub underlay_ns: String,
    pub controller_url: String,
    /// The lab's CA and certificates (`overlayctl certs`); `None` for a plaintext lab.
    #[serde(default)]
    pub pki: Option<PathBuf>,
    pub etcd_pid: Option<u32>,
    pub controller_pid: Option<u32>,
    pub etcd_log: PathBuf,
    pub controller_log: PathBuf,
    pub agent_args: Vec<String>,
    /// Extra environment of the agents.
    #[serde(default)]
    pub agent_env: Vec<(String, String)>,
    pub hosts: Vec<HostState>,
    pub workloads: Vec<WorkloadState>,
}

impl LabState {
    pub fn load(dir: &Path) -> Result<LabState, LabError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| file_err(&path, e))
    }

    pub(crate) fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(".lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializes"))
            .map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e))
    }

    pub fn host(&self, name: &str) -> Result<&HostState, LabError> {
        self.hosts.iter().find(|h| h.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
            LabError::Invalid(format!(
                "no host {name:?} in lab {} (hosts: {})",
                self.name,
                names.join(", ")
            ))
        })
    }

    /// The namespace of `h1` or `h1/w1`.
    pub fn target_ns(&self, target: &str) -> Result<String, LabError> {
        match target.split_once('/') {
            None => Ok(self.host(target)?.ns.clone()),
            Some((h, w)) => self
                .workloads
                .iter()
                .find(|x| x.host == h && x.name == w)
                .map(|x| x.ns.clone())
                .ok_or_else(|| {
                    LabError::Invalid(format!("no workload {target:?} in lab {}", self.name))
                }),
        }
    }

    /// Where workload CNI plugins are looked up: the lab's own binaries first (overlay-cni),
    /// then the system's reference plugins (portmap).
    pub fn plugin_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.bin_dir.clone())
            .chain(cni::SYSTEM_PLUGIN_DIRS.iter().map(PathBuf::from))
            .collect()
    }

    /// The conflist the host's agent installed (it writes it once ready).
    pub fn conflist(&self, host: &HostState) -> Result<cni::ConfList, LabError> {
        let path = host.cni_conf_dir().join(CNI_CONFLIST);
        if !path.exists() {
            return Err(LabError::Invalid(format!(
                "{} has not installed its CNI config {} yet (is its agent ready? log: {})",
                host.name,
                path.display(),
                host.agent_log.display()
            )));
        }
        cni::ConfList::load(&path)
    }

    /// The TLS flags of `identity` (a host name, "controller" or "admin"), or
    /// `--insecure` in a plaintext lab.
    pub fn tls_args(&self, identity: &str) -> Vec<String> {
        match &self.pki {
            Some(pki) => vec![
                format!(
                    "--tls-cert={}",
                    pki.join(format!("{identity}.pem")).display()
                ),
                format!(
                    "--tls-key={}",
                    pki.join(format!("{identity}-key.pem")).display()
                ),
                format!("--tls-ca={}", pki.join("ca.pem").display()),
            ],
            None => vec!["--insecure".into()],
        }
    }

    /// What `overlayctl` needs to talk to the lab's controller as its admin.
    pub fn admin_client_args(&self) -> Vec<String> {
        let mut args = vec![format!("--controller={}", self.controller_url)];
        args.extend(self.tls_args("admin"));
        args
    }

    /// Issues a certificate for `identity` from the lab's CA (no-op in a plaintext lab).
    pub(crate) fn issue_cert(&self, identity: &str, ips: &[&str]) -> Result<(), LabError> {
        let Some(pki) = &self.pki else { return Ok(()) };
        let bin = self.bin_dir.join("overlayctl");
        let dir = pki.display().to_string();
        let mut args = vec!["certs", "issue", "--dir", dir.as_str(), "--name", identity];
        for ip in ips {
            args.extend(["--ip", ip]);
        }
        netns::run(Command::new(&bin).args(&args)).map(|_| ())
    }

    /// The host's leased subnet, e.g. "10.244.7.0/24": from its subnet.env, read by the
    /// same parser as every other reader of that file (`overlay_core::subnet_env`).
    pub fn host_subnet(&self, host: &HostState) -> Option<String> {
        let text = std::fs::read_to_string(host.dir.join("run/subnet.env")).ok()?;
        let env = SubnetEnv::parse(&text).ok()?;
        Some(
            env.subnet
                .map(|s| s.to_string())
                .into_iter()
                .chain(env.ipv6_subnet.map(|s| s.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    pub fn agent_ready(&self, host: &HostState) -> bool {
        matches!(
            http_get_in(&host.ns, "127.0.0.1", AGENT_HEALTH_PORT, "/readyz"),
            Some((200, _))
        )
    }

    /// The agent's `/status` JSON.
    pub fn agent_status(&self, host: &HostState) -> Option<serde_json::Value> {
        let (code, body) = http_get_in(&host.ns, "127.0.0.1", AGENT_HEALTH_PORT, "/status")?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }
}
