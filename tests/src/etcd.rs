//! A real, throwaway etcd on this test process's loopback address, in plaintext or (with [`EtcdTls`])
//! serving https and requiring client certificates.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::proc::{loopback, loopback_addr, next_port, wait_until, Child};

pub struct Etcd {
    /// `http://127.A.B.C:PORT` on [`loopback`], or `https://...` in TLS mode.
    pub endpoint: String,
    pub client_port: u16,
    child: Option<Child>,
    peer_port: u16,
    data: tempfile::TempDir,
    tls: Option<EtcdTls>,
}

/// PEM files for an etcd in TLS mode: its server certificate (valid for [`loopback`]), the CA
/// that client certificates must chain to (etcd's `--client-cert-auth`), and a client
/// certificate the fixture itself uses for health checks and [`Etcd::etcdctl`].
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Where etcdctl is, if installed.
pub fn etcdctl_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcdctl"))
            .find(|p| p.is_file())
    })
}

/// Where the etcd binary is, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OVERLAY_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

impl Etcd {
    /// Starts etcd, or explains why not (see [`crate::skip`]).
    pub fn start_or_skip(test: &str) -> Option<Etcd> {
        if etcd_binary().is_none() {
            crate::skip(test, "etcd is not installed (apt-get install etcd-server)");
            return None;
        }
        Some(Etcd::start())
    }

    /// Starts etcd and waits until it serves requests (well under a second).
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Starts an etcd in TLS mode (needs etcdctl too, for health checks), or explains why
    /// not.
    pub fn start_tls_or_skip(test: &str, tls: EtcdTls) -> Option<Etcd> {
        if etcd_binary().is_none() {
            crate::skip(test, "etcd is not installed (apt-get install etcd-server)");
            return None;
        }
        if etcdctl_binary().is_none() {
            crate::skip(
                test,
                "etcdctl is not installed (apt-get install etcd-client)",
            );
            return None;
        }
        Some(Self::start_with(Some(tls)))
    }

    fn start_with(tls: Option<EtcdTls>) -> Etcd {
        let data = tempfile::tempdir().expect("temp dir");
        let mut etcd = Etcd {
            endpoint: String::new(),
            client_port: next_port(),
            child: None,
            peer_port: next_port(),
            data,
            tls,
        };
        etcd.endpoint = format!("{}://{}", etcd.scheme(), loopback_addr(etcd.client_port));
        etcd.launch();
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The TLS files, in TLS mode.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!(
                "etcd on port {} did not become healthy; log: {log}",
                self.client_port
            );
        }
    }

    /// Starts etcd and waits for it; the log when it does not come up.
    fn try_launch(&mut self) -> Result<(), String> {
        let bin = etcd_binary().expect("etcd binary");
        let client = self.endpoint.clone();
        let peer = format!("http://{}", loopback_addr(self.peer_port));
        let log = std::fs::File::create(self.data.path().join("etcd.log")).expect("etcd log");
        let mut cmd = Command::new(bin);
        cmd.arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.data.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .args([
                "--heartbeat-interval=10",
                "--election-timeout=50",
                "--log-level=error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        let mut child = Child::spawn("etcd", &mut cmd).expect("start etcd");
        let port = self.client_port;
        let up = || match self.tls {
            None => healthy(port),
            Some(_) => self
                .etcdctl(&["endpoint", "health", "--command-timeout=1s"])
                .status
                .success(),
        };
        let ready = wait_until(Duration::from_secs(20), || {
            if up() {
                return Some(true);
            }
            child.exited().is_some().then_some(false)
        });
        self.child = Some(child);
        match ready {
            Some(true) => Ok(()),
            _ => Err(self.log()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default()
    }

    /// Stops etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts a stopped etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// Freezes etcd (SIGSTOP): connections stay open, requests queue unanswered.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            c.signal(libc::SIGSTOP);
        }
    }

    /// Lets a paused etcd go on (SIGCONT).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            c.signal(libc::SIGCONT);
        }
    }

    /// etcdctl's flags to reach this etcd: the endpoint and, in TLS mode, the fixture's
    /// client certificate.
    pub fn etcdctl_flags(&self) -> Vec<String> {
        let mut flags = vec![format!("--endpoints={}", self.endpoint)];
        if let Some(tls) = &self.tls {
            flags.push(format!("--cacert={}", tls.ca.display()));
            flags.push(format!("--cert={}", tls.client_cert.display()));
            flags.push(format!("--key={}", tls.client_key.display()));
        }
        flags
    }

    /// Runs `etcdctl` (API v3) against this etcd and returns what it did, failed or not.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(etcdctl_binary().unwrap_or_else(|| PathBuf::from("etcdctl")))
            .env("ETCDCTL_API", "3")
            .args(self.etcdctl_flags())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl (apt-get install etcd-client)")
    }
}

/// Whether etcd answers `/health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((loopback(), port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
