//! A real, throwaway etcd on free loopback ports.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::proc::{free_port, wait_until, Child};

pub struct Etcd {
    pub endpoint: String,
    pub client_port: u16,
    child: Option<Child>,
    peer_port: u16,
    data: tempfile::TempDir,
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
        let data = tempfile::tempdir().expect("temp dir");
        let mut etcd = Etcd {
            endpoint: String::new(),
            client_port: free_port(),
            child: None,
            peer_port: free_port(),
            data,
        };
        etcd.endpoint = format!("http://127.0.0.1:{}", etcd.client_port);
        etcd.launch();
        etcd
    }

    fn launch(&mut self) {
        let bin = etcd_binary().expect("etcd binary");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
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
        self.child = Some(Child::spawn("etcd", &mut cmd).expect("start etcd"));
        let port = self.client_port;
        wait_until(Duration::from_secs(20), || healthy(port).then_some(())).unwrap_or_else(|| {
            panic!(
                "etcd on port {port} did not become healthy; log: {}",
                self.log()
            )
        });
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
}

/// Whether etcd answers `/health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
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
