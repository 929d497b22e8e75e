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

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod cni;
pub mod faults;
pub mod netns;

pub use cni::PortMapping;
pub use faults::{Service, StoppedService};

pub const UNDERLAY_GATEWAY: &str = "192.0.2.1";
pub const CONTROLLER_PORT: u16 = 7400;
pub const AGENT_HEALTH_PORT: u16 = 7402;
pub const STATE_FILE: &str = "lab.json";
/// Where `overlayctl lab` keeps each lab (`<LAB_ROOT>/<name>`): under /run, like the
/// namespaces in /run/netns, so a reboot, which ends every lab process and namespace, also
/// ends the lab's state instead of leaving a `lab.json` that names nothing.
pub const LAB_ROOT: &str = "/run/overlay-lab";
/// The agent's conflist inside its `--cni-conf-dir`.
pub const CNI_CONFLIST: &str = "10-overlay.conflist";
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

/// A workload name: a short name usable in a namespace and a CNI container id.
pub fn validate_workload_name(name: &str) -> Result<(), LabError> {
    let mut chars = name.chars();
    let ok = name.len() <= 24
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "workload name {name:?}: use 1 to 24 letters, digits and '_', starting with a \
             letter or digit"
        )))
    }
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    /// Prefix of every namespace the lab makes.
    pub ns_prefix: String,
    /// Logs, state, etcd data.
    pub dir: PathBuf,
    /// Where the overlay binaries are.
    pub bin_dir: PathBuf,
    pub hosts: usize,
    pub backend: String,
    pub network: String,
    /// The last subnet handed out at random (`--subnet-max`); subnets after it are left
    /// for reservations.
    pub subnet_max: Option<String>,
    pub lease_ttl: Option<String>,
    pub direct_routing: bool,
    pub ip_masq: bool,
    pub workloads_per_host: usize,
    /// Processes outlive this process (`overlayctl lab up`) rather than being children.
    pub detach: bool,
    /// Extra agent flags.
    pub agent_args: Vec<String>,
    /// Extra controller flags (`--name=value`); one the lab also sets replaces the lab's.
    pub controller_args: Vec<String>,
    /// Plaintext gRPC (`--insecure` everywhere) instead of mutual TLS with certificates
    /// made for the lab.
    pub insecure: bool,
}

impl LabSpec {
    pub fn new(name: &str, ns_prefix: &str, dir: &Path, bin_dir: &Path) -> LabSpec {
        LabSpec {
            name: name.into(),
            ns_prefix: ns_prefix.into(),
            dir: dir.into(),
            bin_dir: bin_dir.into(),
            hosts: 3,
            backend: "vxlan".into(),
            network: "10.244.0.0/16".into(),
            subnet_max: None,
            lease_ttl: None,
            direct_routing: false,
            ip_masq: false,
            workloads_per_host: 1,
            detach: false,
            agent_args: Vec::new(),
            controller_args: Vec::new(),
            insecure: false,
        }
    }
}

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
    pub hosts: Vec<HostState>,
    pub workloads: Vec<WorkloadState>,
}

pub struct Lab {
    pub state: LabState,
    /// Child processes when not detached (killed on drop).
    children: Vec<(String, Child)>,
    detach: bool,
    /// Tear everything down on drop (tests).
    pub down_on_drop: bool,
}

/// GET `http://addr:port/path` (HTTP/1.0, 5 s timeout): status code and body.
pub fn http_get(addr: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((addr, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// [`http_get`] from inside namespace `ns`.
pub fn http_get_in(ns: &str, addr: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_string(), path.to_string());
    netns::run_in(ns, move || http_get(&addr, port, &path))
        .ok()
        .flatten()
}

fn wait_for<T>(
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
fn wait_component(
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
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if pid.is_some_and(process_gone) {
            return Err(failed("it exited".into()));
        }
        if Instant::now() > deadline {
            return Err(failed(format!("not ready after {}s", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which ends with ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
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

fn file_err(path: &Path, e: impl std::fmt::Display) -> LabError {
    LabError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads `KEY=VALUE` from a subnet.env-style file.
fn env_value(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

impl LabState {
    pub fn load(dir: &Path) -> Result<LabState, LabError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| file_err(&path, e))
    }

    fn save(&self) -> Result<(), LabError> {
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
    fn issue_cert(&self, identity: &str, ips: &[&str]) -> Result<(), LabError> {
        let Some(pki) = &self.pki else { return Ok(()) };
        let bin = self.bin_dir.join("overlayctl");
        let dir = pki.display().to_string();
        let mut args = vec!["certs", "issue", "--dir", dir.as_str(), "--name", identity];
        for ip in ips {
            args.extend(["--ip", ip]);
        }
        netns::run(Command::new(&bin).args(&args)).map(|_| ())
    }

    /// The host's leased subnet (from its subnet.env), e.g. "10.244.7.0/24".
    pub fn host_subnet(&self, host: &HostState) -> Option<String> {
        let gw = env_value(&host.dir.join("run/subnet.env"), "OVERLAY_SUBNET")?;
        let (ip, len) = gw.split_once('/')?;
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        Some(format!(
            "{}/{len}",
            std::net::Ipv4Addr::from(u32::from(ip) - 1)
        ))
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

impl Lab {
    /// Builds the whole lab and waits until every agent is ready. `progress` is told each
    /// step as it starts.
    pub fn up(spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<Lab, LabError> {
        if spec.hosts == 0 || spec.hosts > 200 {
            return Err(LabError::Invalid(format!(
                "--hosts {}: use 1 to 200",
                spec.hosts
            )));
        }
        if spec.dir.join(STATE_FILE).exists()
            || !netns::list_with_prefix(&format!("{}-", spec.ns_prefix)).is_empty()
        {
            return Err(LabError::Exists(spec.name.clone()));
        }
        // What a failed `up` left: its logs only (no state file, no namespace).
        if spec.dir.exists() {
            std::fs::remove_dir_all(&spec.dir).map_err(|e| file_err(&spec.dir, e))?;
        }
        std::fs::create_dir_all(&spec.dir).map_err(|e| file_err(&spec.dir, e))?;
        let ul = format!("{}-ul", spec.ns_prefix);
        let mut lab = Lab {
            state: LabState {
                name: spec.name.clone(),
                ns_prefix: spec.ns_prefix.clone(),
                dir: spec.dir.clone(),
                bin_dir: spec.bin_dir.clone(),
                backend: spec.backend.clone(),
                network: spec.network.clone(),
                underlay_ns: ul.clone(),
                controller_url: if spec.insecure {
                    format!("http://{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}")
                } else {
                    format!("https://{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}")
                },
                pki: (!spec.insecure).then(|| spec.dir.join("pki")),
                etcd_pid: None,
                controller_pid: None,
                etcd_log: spec.dir.join("etcd.log"),
                controller_log: spec.dir.join("controller.log"),
                agent_args: spec.agent_args.clone(),
                hosts: Vec::new(),
                workloads: Vec::new(),
            },
            children: Vec::new(),
            detach: spec.detach,
            down_on_drop: !spec.detach,
        };
        // From here on, a failure tears down what was made, except the logs: they say why
        // (`lab down` or the next `lab up` removes them).
        match lab.build(spec, progress) {
            Ok(()) => Ok(lab),
            Err(e) => {
                lab.down_on_drop = false;
                lab.stop_children();
                let _ = teardown_keeping_logs(&spec.ns_prefix, &spec.dir);
                Err(e)
            }
        }
    }

    fn build(&mut self, spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<(), LabError> {
        let ul = self.state.underlay_ns.clone();
        progress(&format!(
            "underlay: namespace {ul}, bridge br0 {UNDERLAY_GATEWAY}/24"
        ));
        netns::create(&ul)?;
        self.state.save()?;
        netns::ip_in(
            &ul,
            &[
                "link",
                "add",
                "br0",
                "address",
                "02:42:c0:00:02:01",
                "type",
                "bridge",
            ],
        )?;
        netns::ip_in(
            &ul,
            &[
                "addr",
                "add",
                &format!("{UNDERLAY_GATEWAY}/24"),
                "dev",
                "br0",
            ],
        )?;
        netns::ip_in(&ul, &["link", "set", "br0", "up"])?;

        if let Some(pki) = self.state.pki.clone() {
            progress(&format!(
                "certificates: a CA and one certificate per component in {}",
                pki.display()
            ));
            let bin = spec.bin_dir.join("overlayctl");
            netns::run(
                Command::new(&bin)
                    .args(["certs", "init", "--dir"])
                    .arg(&pki),
            )?;
            self.state.issue_cert("controller", &[UNDERLAY_GATEWAY])?;
            self.state.issue_cert("admin", &[])?;
        }
        progress("etcd: starting in the underlay namespace");
        let etcd_dir = spec.dir.join("etcd");
        let etcd_args: Vec<String> = vec![
            "--name=lab".into(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=lab=http://127.0.0.1:2380".into(),
            "--heartbeat-interval=10".into(),
            "--election-timeout=50".into(),
            "--log-level=error".into(),
        ];
        let etcd_log = self.state.etcd_log.clone();
        self.state.etcd_pid =
            Some(self.spawn("etcd", &ul, Path::new("etcd"), &etcd_args, &etcd_log)?);
        wait_component(
            "etcd",
            self.state.etcd_pid,
            &etcd_log,
            Duration::from_secs(20),
            || {
                http_get_in(&ul, "127.0.0.1", 2379, "/health")
                    .is_some_and(|(_, b)| b.contains("true"))
            },
        )?;

        progress(&format!(
            "controller: listening on {}",
            self.state.controller_url
        ));
        let mut ctl_args: Vec<String> = vec![
            "--etcd-endpoints=http://127.0.0.1:2379".into(),
            format!("--listen={UNDERLAY_GATEWAY}:{CONTROLLER_PORT}"),
            "--health-listen=127.0.0.1:7401".into(),
        ];
        ctl_args.extend(self.state.tls_args("controller"));
        for extra in &spec.controller_args {
            let name = extra.split('=').next().unwrap_or_default();
            ctl_args.retain(|a| a.split('=').next() != Some(name));
            ctl_args.push(extra.clone());
        }
        let ctl_bin = spec.bin_dir.join("overlay-controller");
        let ctl_log = self.state.controller_log.clone();
        self.state.controller_pid =
            Some(self.spawn("controller", &ul, &ctl_bin, &ctl_args, &ctl_log)?);
        wait_component(
            "the controller",
            self.state.controller_pid,
            &ctl_log,
            Duration::from_secs(20),
            || http_get_in(&ul, "127.0.0.1", 7401, "/readyz").is_some_and(|(c, _)| c == 200),
        )?;
        let mut config = vec![
            "config".to_string(),
            "set".into(),
            "--network".into(),
            spec.network.clone(),
            "--backend".into(),
            spec.backend.clone(),
        ];
        if let Some(ttl) = &spec.lease_ttl {
            config.extend(["--lease-ttl".into(), ttl.clone()]);
        }
        if let Some(max) = &spec.subnet_max {
            config.extend(["--subnet-max".into(), max.clone()]);
        }
        if spec.direct_routing {
            config.push("--direct-routing".into());
        }
        self.overlayctl(&config)?;
        self.state.save()?;

        for i in 1..=spec.hosts {
            let name = format!("h{i}");
            progress(&format!(
                "host {name}: namespace, underlay 192.0.2.{}, agent",
                10 + i
            ));
            self.add_host(&name, i)?;
        }
        progress(&format!(
            "agents: waiting until all {} are ready",
            spec.hosts
        ));
        for h in 0..spec.hosts {
            let host = self.state.hosts[h].clone();
            wait_component(
                &format!("the agent on {}", host.name),
                host.agent_pid,
                &host.agent_log,
                Duration::from_secs(60),
                || self.state.agent_ready(&host),
            )?;
        }
        for h in 0..spec.hosts {
            for j in 1..=spec.workloads_per_host {
                let host = self.state.hosts[h].name.clone();
                progress(&format!("workload {host}/w{j}: CNI ADD on {host}"));
                self.add_workload(&host, &format!("w{j}"))?;
            }
        }
        self.state.save()
    }

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

    fn spawn(
        &mut self,
        role: &str,
        ns: &str,
        bin: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<u32, LabError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| file_err(log, e))?;
        let err = out.try_clone().map_err(|e| file_err(log, e))?;
        let mut cmd = Command::new(bin);
        netns::lab_env(&mut cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        netns::in_netns(&mut cmd, ns)?;
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
            cmd: bin.display().to_string(),
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

    fn add_host(&mut self, name: &str, index: usize) -> Result<(), LabError> {
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
        let pid = self.spawn(&format!("agent-{host}"), &h.ns, &bin, &args, &h.agent_log)?;
        self.state
            .hosts
            .iter_mut()
            .find(|x| x.name == host)
            .expect("host")
            .agent_pid = Some(pid);
        self.state.save()
    }

    /// Stops the agent of `host` with `signal` and waits for it to exit.
    pub fn stop_agent(&mut self, host: &str, signal: i32) -> Result<(), LabError> {
        let h = self.state.host(host)?.clone();
        let Some(pid) = h.agent_pid else {
            return Ok(());
        };
        // SAFETY: kill(2) on the pid we started.
        unsafe { libc::kill(pid as i32, signal) };
        let role = format!("agent-{host}");
        if let Some(pos) = self.children.iter().position(|(r, _)| *r == role) {
            let (_, mut child) = self.children.remove(pos);
            let _ = child.wait();
        } else {
            wait_for(
                &format!("agent {host} to exit"),
                Duration::from_secs(10),
                || {
                    // SAFETY: signal 0 only checks whether the pid exists.
                    (unsafe { libc::kill(pid as i32, 0) } != 0).then_some(())
                },
            )?;
        }
        self.state
            .hosts
            .iter_mut()
            .find(|x| x.name == host)
            .expect("host")
            .agent_pid = None;
        self.state.save()
    }

    pub fn wait_agent_ready(&self, host: &str, timeout: Duration) -> Result<(), LabError> {
        let h = self.state.host(host)?.clone();
        wait_for(&format!("agent {host} ready"), timeout, || {
            self.state.agent_ready(&h).then_some(())
        })
    }

    /// Adds a workload: a namespace attached by the CNI plugin (see [`Lab::add_workload_publishing`]).
    pub fn add_workload(&mut self, host: &str, name: &str) -> Result<WorkloadState, LabError> {
        self.add_workload_publishing(host, name, &[])
    }

    /// Adds a workload the way a container runtime on `host` would: a new namespace, then
    /// CNI ADD of the conflist the host's agent installed (`overlay-cni`, then `portmap`
    /// with `publish` as its `portMappings`), run inside the host's namespace. The address
    /// is the one the plugin assigned.
    pub fn add_workload_publishing(
        &mut self,
        host: &str,
        name: &str,
        publish: &[PortMapping],
    ) -> Result<WorkloadState, LabError> {
        validate_workload_name(name)?;
        let h = self.state.host(host)?.clone();
        if self
            .state
            .workloads
            .iter()
            .any(|w| w.host == host && w.name == name)
        {
            return Err(LabError::Invalid(format!(
                "workload {host}/{name} exists already"
            )));
        }
        for p in publish {
            if let Some(w) = self.state.workloads.iter().find(|w| {
                w.host == host
                    && w.publish
                        .iter()
                        .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            }) {
                return Err(LabError::Invalid(format!(
                    "{host} port {}/{} is published by {}/{} already",
                    p.host_port, p.protocol, w.host, w.name
                )));
            }
        }
        let conflist = self.state.conflist(&h)?;
        let ns = format!("{}-{host}-{name}", self.state.ns_prefix);
        let container_id = ns.clone();
        netns::create(&ns)?;
        let netns_path = netns::netns_path(&ns);
        let plugin_dirs = self.state.plugin_dirs();
        let inv = cni::Invocation {
            host_ns: &h.ns,
            container_id: &container_id,
            netns_path: Some(&netns_path),
            ifname: WORKLOAD_IFNAME,
            plugin_dirs: &plugin_dirs,
            port_mappings: publish,
        };
        let result = match cni::add(&conflist, &inv) {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, then drop the namespace.
                let _ = cni::del(&conflist, &inv, None);
                let _ = netns::delete(&ns);
                return Err(e);
            }
        };
        let Some(ip) = cni::result_ipv4(&result) else {
            let _ = cni::del(&conflist, &inv, Some(&result));
            let _ = netns::delete(&ns);
            return Err(LabError::Cni {
                plugin: "overlay-cni".into(),
                command: "ADD".into(),
                message: format!("the result has no IPv4 address: {result}"),
            });
        };
        let w = WorkloadState {
            name: name.into(),
            host: host.into(),
            ns,
            ip,
            container_id,
            publish: publish.to_vec(),
            cni_result: Some(result),
        };
        self.state.workloads.push(w.clone());
        self.state.save()?;
        Ok(w)
    }

    /// Removes a workload as a runtime would: CNI DEL (in reverse, with the ADD's result),
    /// then the namespace. When DEL fails the workload stays, so the command can be
    /// repeated (and `lab down` removes everything regardless).
    pub fn remove_workload(&mut self, host: &str, name: &str) -> Result<(), LabError> {
        let pos = self
            .state
            .workloads
            .iter()
            .position(|w| w.host == host && w.name == name)
            .ok_or_else(|| {
                self.state
                    .host(host)
                    .err()
                    .unwrap_or_else(|| LabError::Invalid(format!("no workload {host}/{name}")))
            })?;
        let w = self.state.workloads[pos].clone();
        let h = self.state.host(host)?.clone();
        if !w.container_id.is_empty() {
            let conflist = self.state.conflist(&h)?;
            let plugin_dirs = self.state.plugin_dirs();
            let netns_path = netns::netns_path(&w.ns);
            let inv = cni::Invocation {
                host_ns: &h.ns,
                container_id: &w.container_id,
                netns_path: netns::exists(&w.ns).then_some(netns_path.as_path()),
                ifname: WORKLOAD_IFNAME,
                plugin_dirs: &plugin_dirs,
                port_mappings: &w.publish,
            };
            cni::del(&conflist, &inv, w.cni_result.as_ref())?;
        }
        netns::delete(&w.ns)?;
        self.state.workloads.remove(pos);
        self.state.save()
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

    /// Removes everything; reports every failure but keeps going.
    pub fn teardown(&mut self) -> Vec<LabError> {
        self.stop_children();
        teardown_prefix(&self.state.ns_prefix, &self.state.dir)
    }

    fn stop_children(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
        }
        for (_, mut child) in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down_on_drop {
            for e in self.teardown() {
                eprintln!("lab teardown: {e}");
            }
        }
    }
}

/// Deletes every namespace named `<prefix>-*` (killing what runs inside) and `dir`.
/// Safe to run twice and on a half-made lab.
pub fn teardown_prefix(prefix: &str, dir: &Path) -> Vec<LabError> {
    let mut errors = delete_namespaces(prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            errors.push(file_err(dir, e));
        }
    }
    errors
}

/// [`teardown_prefix`], but the `*.log` files under `dir` stay where they are.
pub fn teardown_keeping_logs(prefix: &str, dir: &Path) -> Vec<LabError> {
    let mut errors = delete_namespaces(prefix);
    remove_all_but_logs(dir, &mut errors);
    errors
}

fn remove_all_but_logs(dir: &Path, errors: &mut Vec<LabError>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => {
                remove_all_but_logs(&path, errors);
                // Fails, harmlessly, where a log stays inside.
                let _ = std::fs::remove_dir(&path);
                Ok(())
            }
            _ if path.extension().is_some_and(|e| e == "log") => Ok(()),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = result {
            errors.push(file_err(&path, e));
        }
    }
}

fn delete_namespaces(prefix: &str) -> Vec<LabError> {
    let mut errors = Vec::new();
    // Workloads first, then hosts, then the underlay (whose bridge ports vanish with them).
    let mut names = netns::list_with_prefix(&format!("{prefix}-"));
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in names {
        if let Err(e) = netns::delete(&ns) {
            errors.push(e);
        }
    }
    errors
}
