//! The project's real binaries as test fixtures: controllers, agents and `overlayctl`.
//!
//! Each fixture gets its own directory for logs and state, listens on this process's own
//! loopback address (controllers on ports from [`next_port`], agents on port 0, reported
//! through `--addr-file`), and is killed on drop. Logs stay readable through `log()` for assertion messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::etcd::Etcd;
use crate::proc::{
    bin_path, loopback, loopback_addr, next_port, read_addr_file, wait_until, Child,
};

/// GET `path` from this process's loopback address ([`loopback`]) at `port`; the status
/// code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    overlay_lab::http_get(&loopback().to_string(), port, path)
}

fn log_file(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&path).expect("log file");
    (path, file)
}

pub struct Controller {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub health_port: u16,
    pub log_path: PathBuf,
    args: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) the process starts with, when not inherited.
    nofile: Option<u64>,
}

impl Controller {
    /// Starts a controller on `etcd` under `prefix` and waits until it is ready.
    pub fn start(etcd: &Etcd, prefix: &str, dir: &Path, name: &str) -> Controller {
        Self::start_with(etcd, prefix, dir, name, &["--insecure".to_string()])
    }

    /// [`Controller::start`] with other flags than `--insecure` (e.g. TLS files).
    pub fn start_with(
        etcd: &Etcd,
        prefix: &str,
        dir: &Path,
        name: &str,
        extra: &[String],
    ) -> Controller {
        Self::launch(&etcd.endpoint, prefix, dir, name, extra, None)
    }

    /// [`Controller::start_with`] on `endpoints`, a comma list (e.g.
    /// [`crate::EtcdCluster::endpoints`]).
    pub fn start_on(
        endpoints: &str,
        prefix: &str,
        dir: &Path,
        name: &str,
        extra: &[String],
    ) -> Controller {
        Self::launch(endpoints, prefix, dir, name, extra, None)
    }

    /// [`Controller::start_with`] in a process whose open-file limit (RLIMIT_NOFILE, soft
    /// and hard) is `nofile`, e.g. 1024 as on a host without `LimitNOFILE=`.
    pub fn start_with_fd_limit(
        etcd: &Etcd,
        prefix: &str,
        dir: &Path,
        name: &str,
        extra: &[String],
        nofile: u64,
    ) -> Controller {
        Self::launch(&etcd.endpoint, prefix, dir, name, extra, Some(nofile))
    }

    fn launch(
        endpoints: &str,
        prefix: &str,
        dir: &Path,
        name: &str,
        extra: &[String],
        nofile: Option<u64>,
    ) -> Controller {
        // Fixed ports of this process's own (not port 0): a restart must come back on the
        // same address, since clients hold the URL.
        let port = next_port();
        let health_port = next_port();
        let mut args = vec![
            format!("--etcd-endpoints={endpoints}"),
            format!("--etcd-prefix={prefix}"),
            format!("--listen={}", loopback_addr(port)),
            format!("--health-listen={}", loopback_addr(health_port)),
        ];
        args.extend(extra.iter().cloned());
        let (log_path, _) = log_file(dir, name);
        let mut c = Controller {
            child: spawn_controller(name, &args, &log_path, nofile),
            url: format!("http://{}", loopback_addr(port)),
            port,
            health_port,
            log_path,
            args,
            nofile,
        };
        c.wait_ready();
        c
    }

    pub fn wait_ready(&mut self) {
        let port = self.health_port;
        wait_until(Duration::from_secs(20), || {
            matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
        })
        .unwrap_or_else(|| panic!("controller did not become ready; log:\n{}", self.log()));
    }

    /// Restarts the process with the same flags and ports.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = spawn_controller(
            &self.child.name.clone(),
            &self.args,
            &self.log_path,
            self.nofile,
        );
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

fn spawn_logged(name: &str, bin: &str, args: &[String], log_path: &Path) -> Child {
    spawn_logged_env(name, bin, args, log_path, &[])
}

fn spawn_controller(name: &str, args: &[String], log_path: &Path, nofile: Option<u64>) -> Child {
    let mut cmd = logged_command("overlay-controller", args, log_path);
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: n as libc::rlim_t,
            rlim_max: n as libc::rlim_t,
        };
        // SAFETY: setrlimit is async-signal-safe; `limit` is a plain value copied in.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    Child::spawn(name, &mut cmd).expect("spawn")
}

fn logged_command(bin: &str, args: &[String], log_path: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log file");
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    cmd
}

fn spawn_logged_env(
    name: &str,
    bin: &str,
    args: &[String],
    log_path: &Path,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = logged_command(bin, args, log_path);
    cmd.envs(env.iter().copied());
    Child::spawn(name, &mut cmd).expect("spawn")
}

/// An `overlay-agent` process with its own run and state dirs.
pub struct Agent {
    pub child: Child,
    pub name: String,
    pub dir: PathBuf,
    pub health_port: u16,
    args: Vec<String>,
    log_path: PathBuf,
}

impl Agent {
    /// Starts an agent (alloc backend needs no root) for `controllers` (comma list).
    pub fn start(
        controllers: &str,
        name: &str,
        public_ip: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Agent {
        Self::start_with_env(controllers, name, public_ip, dir, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(
        controllers: &str,
        name: &str,
        public_ip: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut all = vec![format!("--node-name={name}"), "--insecure".to_string()];
        all.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(controllers, name, public_ip, dir, &all, env)
    }

    /// An agent with exactly `flags` besides the controller, address, dirs and health
    /// port: no `--node-name` (a TLS agent takes it from its certificate) and no
    /// `--insecure`. `label` names its directory.
    pub fn start_no_name(
        controllers: &str,
        label: &str,
        public_ip: &str,
        dir: &Path,
        flags: &[&str],
    ) -> Agent {
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        Self::launch(controllers, label, public_ip, dir, &flags, &[])
    }

    fn launch(
        controllers: &str,
        label: &str,
        public_ip: &str,
        dir: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = dir.join(label);
        // The agent binds port 0 and writes the port it got to --addr-file.
        let addr_file = dir.join("addrs");
        let mut args = vec![
            format!("--controller={controllers}"),
            format!("--public-ip={public_ip}"),
            format!("--run-dir={}", dir.join("run").display()),
            format!("--state-dir={}", dir.join("state").display()),
            format!("--health-listen={}", loopback_addr(0)),
            format!("--addr-file={}", addr_file.display()),
        ];
        args.extend(extra.iter().cloned());
        let (log_path, _) = log_file(&dir, "agent");
        let mut agent = Agent {
            child: spawn_logged_env(label, "overlay-agent", &args, &log_path, env),
            name: label.to_string(),
            dir,
            health_port: 0,
            args,
            log_path,
        };
        agent.read_health_port();
        agent
    }

    /// Waits for the agent to report its health address (it binds before anything else);
    /// an agent that exits first keeps port 0, which never answers.
    fn read_health_port(&mut self) {
        let file = self.dir.join("addrs");
        let child = &mut self.child;
        self.health_port = wait_until(Duration::from_secs(20), || {
            if let Some(a) = read_addr_file(&file, "health") {
                return Some(a.port());
            }
            child.exited().map(|_| 0)
        })
        .unwrap_or(0);
    }

    pub fn subnet_env_path(&self) -> PathBuf {
        self.dir.join("run/subnet.env")
    }

    /// `OVERLAY_SUBNET` from subnet.env, once written.
    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.subnet_env_path()).ok()
    }

    /// The leased subnet (e.g. "10.244.7.0/24"), once the agent is ready.
    pub fn subnet(&self) -> Option<String> {
        let env = self.subnet_env()?;
        let line = env
            .lines()
            .find_map(|l| l.strip_prefix("OVERLAY_SUBNET="))?;
        let (ip, len) = line.split_once('/')?;
        let mut octets: Vec<u32> = ip.split('.').filter_map(|o| o.parse().ok()).collect();
        let len: u32 = len.parse().ok()?;
        let addr = octets.iter().fold(0u32, |a, o| a << 8 | o) - 1;
        octets = (0..4).rev().map(|i| (addr >> (8 * i)) & 0xff).collect();
        Some(format!(
            "{}.{}.{}.{}/{len}",
            octets[0], octets[1], octets[2], octets[3]
        ))
    }

    pub fn wait_subnet(&self, timeout: Duration) -> String {
        wait_until(timeout, || self.subnet())
            .unwrap_or_else(|| panic!("agent {} got no subnet; log:\n{}", self.name, self.log()))
    }

    pub fn ready(&self) -> bool {
        matches!(http_get(self.health_port, "/readyz"), Some((200, _)))
    }

    /// The agent's `/status` JSON.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.health_port, "/status")?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// Restarts with the same flags and dirs (the health port is a new one).
    pub fn restart(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_file(self.dir.join("addrs"));
        self.child = spawn_logged(
            &self.name.clone(),
            "overlay-agent",
            &self.args,
            &self.log_path,
        );
        self.read_health_port();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// Runs `overlayctl --controller URL ARGS...`.
pub fn overlayctl(controller: &str, args: &[&str]) -> Output {
    Command::new(bin_path("overlayctl"))
        .arg("--insecure")
        .arg(format!("--controller={controller}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run overlayctl")
}

/// Runs `overlayctl` and parses its stdout as JSON, panicking with stderr on failure.
pub fn overlayctl_json(controller: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = overlayctl(controller, &all);
    assert!(
        out.status.success(),
        "overlayctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "overlayctl {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `etcdctl` against `etcd`.
pub fn etcdctl(etcd: &Etcd, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint))
        .args(args)
        .output()
        .expect("run etcdctl (apt-get install etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The usual control-plane fixture: a real etcd, one controller on it under `/overlay`,
/// and the network config set (10.244.0.0/16 with `backend`, leasing at random only up to
/// [`crate::labs::RANDOM_SUBNET_MAX`], so a test may reserve above it).
pub struct Configured {
    pub etcd: Etcd,
    pub controller: Controller,
    pub dir: tempfile::TempDir,
}

impl Configured {
    /// `None` when etcd is missing (see [`crate::skip`]).
    pub fn start(test: &str, backend: &str) -> Option<Configured> {
        let etcd = Etcd::start_or_skip(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
        let out = overlayctl(
            &controller.url,
            &[
                "config",
                "set",
                "--network",
                "10.244.0.0/16",
                "--backend",
                backend,
                "--subnet-max",
                crate::labs::RANDOM_SUBNET_MAX,
            ],
        );
        assert!(
            out.status.success(),
            "config set: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Configured {
            etcd,
            controller,
            dir,
        })
    }
}
