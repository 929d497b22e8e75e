//! A real, throwaway etcd on this test process's loopback address, in plaintext or (with [`EtcdTls`])
//! serving https and requiring client certificates; or [`EtcdCluster`], three members of
//! one etcd cluster, as operators run it.

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
    /// Set for a member of an [`EtcdCluster`]: its name and `--initial-cluster`.
    member: Option<(String, String)>,
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
            member: None,
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
        let mut child = self.spawn();
        let ready = wait_until(Duration::from_secs(20), || {
            if self.up() {
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

    /// Whether etcd answers its health check.
    fn up(&self) -> bool {
        match self.tls {
            None => healthy(self.client_port),
            Some(_) => self
                .etcdctl(&["endpoint", "health", "--command-timeout=1s"])
                .status
                .success(),
        }
    }

    /// Starts the process (its log appended to `etcd.log`), without waiting for it.
    fn spawn(&self) -> Child {
        let bin = etcd_binary().expect("etcd binary");
        let client = self.endpoint.clone();
        let peer = self.peer_url();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("etcd.log"))
            .expect("etcd log");
        let mut cmd = Command::new(bin);
        cmd.arg(format!(
            "--data-dir={}",
            self.data.path().join("data").display()
        ))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg("--log-level=error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        match &self.member {
            None => {
                cmd.arg("--name=test")
                    .arg(format!("--initial-cluster=test={peer}"))
                    .args(["--heartbeat-interval=10", "--election-timeout=50"]);
            }
            Some((name, initial_cluster)) => {
                // etcd 3.4 refuses an election timeout under 5 heartbeats. On a shared
                // 2-core machine 100 ms may lapse under load now and then: a spurious
                // election is just one more leader change the tests must survive.
                cmd.arg(format!("--name={name}"))
                    .arg(format!("--initial-cluster={initial_cluster}"))
                    .arg(format!(
                        "--initial-cluster-token=overlay-test-{}",
                        std::process::id()
                    ))
                    .arg("--initial-cluster-state=new")
                    .args(["--heartbeat-interval=10", "--election-timeout=100"]);
            }
        }
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        Child::spawn("etcd", &mut cmd).expect("start etcd")
    }

    fn peer_url(&self) -> String {
        format!("http://{}", loopback_addr(self.peer_port))
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

/// A 3-member etcd cluster on [`loopback`] (plaintext), with member-level faults: the
/// members are [`Etcd`]s, so anything that takes one etcd (a direct client, RSS) can be
/// pointed at a member, and the controller gets all three through [`EtcdCluster::endpoints`].
///
/// Heartbeat 10 ms, election timeout 100 ms: a dead leader is replaced within a fraction of
/// a second. Waits poll conditions (every member healthy, one leader agreed on).
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
    state: Vec<MemberState>,
}

/// What the fixture last did to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Running,
    /// SIGSTOP: its connections stay open and nothing answers.
    Stopped,
    /// SIGKILL: gone, its data dir kept for [`EtcdCluster::restart`].
    Killed,
}

/// How many members an [`EtcdCluster`] has.
pub const CLUSTER_MEMBERS: usize = 3;

impl EtcdCluster {
    /// Starts the cluster, or explains why not (see [`crate::skip`]).
    pub fn start_or_skip(test: &str) -> Option<EtcdCluster> {
        if etcd_binary().is_none() {
            crate::skip(test, "etcd is not installed (apt-get install etcd-server)");
            return None;
        }
        Some(EtcdCluster::start())
    }

    /// Starts three members at once (none is healthy before a quorum is up) and waits
    /// until every member is healthy and they agree on a leader.
    pub fn start() -> EtcdCluster {
        let mut members: Vec<Etcd> = (0..CLUSTER_MEMBERS)
            .map(|i| {
                let client_port = next_port();
                Etcd {
                    endpoint: format!("http://{}", loopback_addr(client_port)),
                    client_port,
                    child: None,
                    peer_port: next_port(),
                    data: tempfile::tempdir().expect("temp dir"),
                    tls: None,
                    member: Some((format!("m{i}"), String::new())),
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("m{i}={}", m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            if let Some((_, ic)) = &mut m.member {
                *ic = initial_cluster.clone();
            }
            m.child = Some(m.spawn());
        }
        let cluster = EtcdCluster {
            members,
            state: vec![MemberState::Running; CLUSTER_MEMBERS],
        };
        cluster.wait_healthy();
        cluster
    }

    /// The client URLs of all members, comma separated (`--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn state(&self, i: usize) -> MemberState {
        self.state[i]
    }

    /// SIGKILL to member `i`; its data dir stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].stop();
        self.state[i] = MemberState::Killed;
    }

    /// SIGSTOP to member `i`: it stops answering its peers and clients, connections open.
    pub fn stop(&mut self, i: usize) {
        self.members[i].pause();
        self.state[i] = MemberState::Stopped;
    }

    /// SIGCONT to a member stopped with [`EtcdCluster::stop`].
    pub fn cont(&mut self, i: usize) {
        self.members[i].resume();
        self.state[i] = MemberState::Running;
    }

    /// Kills member `i` if it runs, starts it again on its data dir and ports, and waits
    /// until every running member is healthy with one leader.
    pub fn restart(&mut self, i: usize) {
        self.members[i].stop();
        let child = self.members[i].spawn();
        self.members[i].child = Some(child);
        self.state[i] = MemberState::Running;
        self.wait_healthy();
    }

    /// Waits until every running member answers `/health` and all of them name the same
    /// leader (panics with the logs after 30 s).
    pub fn wait_healthy(&self) {
        let ok = wait_until(Duration::from_secs(30), || {
            let running = (0..CLUSTER_MEMBERS).filter(|&i| self.state[i] == MemberState::Running);
            running
                .clone()
                .all(|i| healthy(self.members[i].client_port))
                .then(|| self.leader())
                .flatten()
        });
        if ok.is_none() {
            let logs: Vec<String> = self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| format!("member {i} ({:?}):\n{}", self.state[i], m.log()))
                .collect();
            panic!(
                "the etcd cluster did not become healthy; logs:\n{}",
                logs.join("\n")
            );
        }
    }

    /// The index of the member that leads, when every running member names the same one
    /// (from `/v3/maintenance/status`); `None` during an election or if one does not answer.
    pub fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for (i, m) in self.members.iter().enumerate() {
            if self.state[i] != MemberState::Running {
                ids.push(None);
                continue;
            }
            let status = member_status(m.client_port)?;
            let said = status.leader?;
            if leader.is_some_and(|l| l != said) {
                return None;
            }
            leader = Some(said);
            ids.push(Some(status.member_id));
        }
        let leader = leader?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Waits until a leader other than `old` leads, and returns it.
    pub fn wait_new_leader(&self, old: usize) -> usize {
        wait_until(Duration::from_secs(30), || {
            self.leader().filter(|&l| l != old)
        })
        .unwrap_or_else(|| panic!("no new etcd leader after member {old}"))
    }

    /// The logs of all members (for assertion messages).
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("--- member {i}:\n{}", m.log()))
            .collect()
    }
}

/// What a member says of itself in `/v3/maintenance/status`.
struct MemberStatus {
    member_id: u64,
    /// 0 (absent) while it knows no leader.
    leader: Option<u64>,
}

fn member_status(port: u16) -> Option<MemberStatus> {
    let body = http_post(port, "/v3/maintenance/status", "{}")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    // The JSON gateway writes uint64 values as strings.
    let num = |v: &serde_json::Value| -> Option<u64> {
        v.as_str().and_then(|s| s.parse().ok()).or(v.as_u64())
    };
    let member_id = num(&v["header"]["member_id"])?;
    let leader = num(&v["leader"]).filter(|&l| l != 0);
    Some(MemberStatus { member_id, leader })
}

/// POST `body` to `path` on [`loopback`]`:port`; the response body (HTTP/1.0, so the
/// server closes the connection when done).
fn http_post(port: u16, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from((loopback(), port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200");
    ok.then(|| body.to_string())
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
