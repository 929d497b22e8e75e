//! The controllers on a real 3-member etcd cluster (`EtcdCluster`: three members on this
//! process's loopback address, heartbeat 10 ms, election timeout 100 ms), with member-level
//! faults while leases change: the leader SIGKILLed during a burst of joins and during a
//! burst of releases (fan-out), a member SIGSTOPped for seconds (far longer than the
//! election timeout) and let go, and every member restarted in turn.
//!
//! Each scenario runs two controllers (`--etcd-endpoints` lists all three members), a few
//! real agents (alloc backend: no root, no datapath of their own; see below), two
//! `overlayctl watch -o json` watchers and one raw gRPC watcher (which shows repeats the
//! printer would hide), and keeps every joined lease renewed through either controller as
//! agents do. Joins are raw `AcquireLease` calls from a tokio runtime, moving to the other
//! controller on a failed call as agents do.
//!
//! What counts as lost, judged on etcd itself:
//! - **Subnets**: no subnet answered to two nodes, no node with two keys, every answer a key.
//! - **Leases**: every renewal through the faults succeeds (a refusal is a lost lease), and
//!   the keys at the end are exactly the answered leases not released.
//! - **Watch events**: two markers (reservations beyond `RANDOM_SUBNET_MAX`) bracket the
//!   scenario; etcd's own history of the lease keys between them is what must be delivered:
//!   every put as `added` and every delete as `removed`, with etcd's revision, each exactly
//!   once, in revision order, at every watcher.
//! - **Agents**: the datapath is not run here (the lab starts its own single etcd inside
//!   its namespace, see lab/src/up.rs); instead the alloc-backend agents' `subnet.env` must
//!   not change byte for byte, their lease keys must keep their modification revision (no
//!   re-acquire), their logs must not say "lease lost", and their watch must reach the end
//!   marker.
//!
//! Each scenario prints a table (`faults/report.rs`); docs/reliability.md holds a real run.
//! Counts and durations are reported, never asserted; waits poll conditions.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use overlay_proto::v1::watch_leases_response::Kind;
use overlay_proto::v1::{self, admin_client::AdminClient, agent_client::AgentClient};
use overlay_tests::cluster::{Agent, Controller};
use overlay_tests::etcd::MemberState;
use overlay_tests::{bin_path, wait_until, Child, EtcdCluster};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

#[path = "faults/control_plane.rs"]
#[allow(dead_code)]
mod control_plane;
#[path = "faults/report.rs"]
mod report;

use control_plane::{grpc_channel, is_retryable, runtime, set_config, EtcdView};
use report::Summary;

/// How long any wait polls before it gives up.
const PATIENCE: Duration = Duration::from_secs(60);
/// Lease TTL: agents and the test's renewer renew every 3 s, so renewals cross every fault.
const TTL_SECS: u64 = 9;
/// Real agents per scenario.
const AGENTS: usize = 4;
/// Reservations that bracket a scenario's changes (after RANDOM_SUBNET_MAX, so no random
/// allocation can take them).
const BEGIN_MARKER: &str = "10.244.250.0/24";
const END_MARKER: &str = "10.244.251.0/24";

/// For `control_plane::metric`: a counter from a `/metrics` body.
fn sum_metric(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Public IPs: joins from 192.0.2.0/24, agents from 198.51.100.0/24.
fn join_ip(i: usize) -> String {
    format!("192.0.2.{}", 1 + i % 250)
}

fn agent_ip(i: usize) -> String {
    format!("198.51.100.{}", 1 + i)
}

/// One watch event: `added`/`removed`, subnet, revision.
type Change = (String, String, i64);

/// `overlayctl watch -o json`; every line it printed, kept.
struct Watcher {
    name: String,
    _child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Watcher {
    fn start(name: &str, controllers: &str) -> Watcher {
        let mut cmd = Command::new(bin_path("overlayctl"));
        cmd.arg(format!("--controller={controllers}"))
            .args(["--insecure", "watch", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = Child::spawn(name, &mut cmd).expect("start overlayctl watch");
        let stdout = child.inner.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Watcher {
            name: name.to_string(),
            _child: child,
            lines,
        }
    }

    fn changes(&self) -> Vec<Change> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["type"].as_str().unwrap_or_default().to_string(),
                    v["lease"]["subnet"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    v["revision"].as_i64().unwrap_or(-1),
                )
            })
            .collect()
    }

    /// The revision of the `kind` event for `subnet`, once printed.
    fn revision_of(&self, kind: &str, subnet: &str) -> Option<i64> {
        self.changes()
            .into_iter()
            .find(|(k, s, _)| k == kind && s == subnet)
            .map(|(_, _, r)| r)
    }
}

/// What the raw gRPC watcher received: snapshots, events, reconnections.
#[derive(Default)]
struct RawLog {
    snapshots: usize,
    /// Events, and after a first snapshot, any later snapshot's difference (a resync).
    changes: Vec<Change>,
    reconnects: usize,
    revision: i64,
    leases: BTreeMap<String, ()>,
}

/// A watch client speaking gRPC directly: resumes from its last revision on the other
/// controller when its stream breaks, as agents do. Runs until aborted.
async fn raw_watch(channels: [Channel; 2], log: Arc<Mutex<RawLog>>) {
    let mut which = 0;
    loop {
        let after = log.lock().unwrap().revision;
        let opened = AgentClient::new(channels[which].clone())
            .watch_leases(v1::WatchLeasesRequest {
                after_revision: after,
            })
            .await;
        if let Ok(stream) = opened {
            let mut stream = stream.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                let mut log = log.lock().unwrap();
                match message.kind {
                    Some(Kind::Snapshot(s)) => {
                        let now: BTreeMap<String, ()> =
                            s.leases.into_iter().map(|l| (l.subnet, ())).collect();
                        if log.snapshots > 0 {
                            // A resync: what it changes counts as delivered at its revision.
                            let gone: Vec<String> = log
                                .leases
                                .keys()
                                .filter(|k| !now.contains_key(*k))
                                .cloned()
                                .collect();
                            let new: Vec<String> = now
                                .keys()
                                .filter(|k| !log.leases.contains_key(*k))
                                .cloned()
                                .collect();
                            for g in gone {
                                log.changes.push(("removed".into(), g, s.revision));
                            }
                            for n in new {
                                log.changes.push(("added".into(), n, s.revision));
                            }
                        }
                        log.snapshots += 1;
                        log.leases = now;
                        log.revision = s.revision;
                    }
                    Some(Kind::Event(e)) => {
                        let subnet = e.lease.map(|l| l.subnet).unwrap_or_default();
                        let kind = if e.r#type == v1::EventType::Removed as i32 {
                            log.leases.remove(&subnet);
                            "removed"
                        } else {
                            log.leases.insert(subnet.clone(), ());
                            "added"
                        };
                        log.changes.push((kind.into(), subnet, e.revision));
                        log.revision = e.revision;
                    }
                    None => {}
                }
            }
        }
        log.lock().unwrap().reconnects += 1;
        which = 1 - which;
        // Backoff between attempts, as agents have.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A channel for a long-lived stream: no per-request timeout.
fn stream_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("controller URL")
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy()
}

#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    retries: AtomicU64,
    done: AtomicUsize,
}

/// One node joining as an agent does: AcquireLease, on a failure that is worth retrying
/// the other controller, until a lease comes back.
async fn join(
    channels: Arc<[Channel; 2]>,
    first: usize,
    node: String,
    public_ip: String,
    tally: Arc<Tally>,
) -> Result<(String, String), String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut which = first;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        let request = v1::AcquireLeaseRequest {
            node: node.clone(),
            public_ip: public_ip.clone(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        };
        match AgentClient::new(channels[which].clone())
            .acquire_lease(request)
            .await
        {
            Ok(r) => {
                tally.done.fetch_add(1, Ordering::Relaxed);
                let lease = r.into_inner().lease.ok_or("no lease in the answer")?;
                return Ok((node, lease.subnet));
            }
            Err(s) if is_retryable(&s) => {
                last = format!("{:?}: {}", s.code(), s.message());
                which = 1 - which;
                tally.retries.fetch_add(1, Ordering::Relaxed);
                // Backoff before the retry, as agents have.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(format!("{node}: {:?}: {}", s.code(), s.message())),
        }
    }
    Err(format!("{node}: no lease within {PATIENCE:?}: {last}"))
}

/// Releases a lease as a departing agent does, retrying on the other controller. A retry
/// answered NotFound means an earlier attempt did release it (its answer was lost).
async fn release(
    channels: Arc<[Channel; 2]>,
    first: usize,
    node: String,
    subnet: String,
    tally: Arc<Tally>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut which = first;
    let mut tried = false;
    while tokio::time::Instant::now() < deadline {
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        let request = v1::ReleaseLeaseRequest {
            node: node.clone(),
            subnet: subnet.clone(),
        };
        match AgentClient::new(channels[which].clone())
            .release_lease(request)
            .await
        {
            Ok(_) => break,
            Err(s) if tried && s.code() == Code::NotFound => break,
            Err(s) if is_retryable(&s) => {
                tried = true;
                which = 1 - which;
                tally.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(format!("{node} {subnet}: {:?}: {}", s.code(), s.message())),
        }
    }
    tally.done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// What keeps joined leases alive, as their agents would.
#[derive(Clone, Default)]
struct Keepers {
    /// Joined and not released: node -> subnet.
    held: Arc<Mutex<BTreeMap<String, String>>>,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Vec<String>>>,
    renewals: Arc<AtomicU64>,
}

impl Keepers {
    fn holds(&self, node: &str, subnet: &str) -> bool {
        self.held.lock().unwrap().get(node).map(String::as_str) == Some(subnet)
    }

    /// Keeps one lease alive as its agent does: a renewal every TTL/3 through either
    /// controller, retried every 200 ms on the other one while it fails in a way worth
    /// retrying. A refusal, or no renewal for a whole TTL, is a lost lease. Ends when the
    /// lease is released or at `stop`.
    async fn keep(self, channels: Arc<[Channel; 2]>, node: String, subnet: String) {
        let ttl = Duration::from_secs(TTL_SECS);
        let mut renewed = tokio::time::Instant::now();
        let mut which = 0;
        loop {
            let next = renewed + ttl / 3;
            while tokio::time::Instant::now() < next {
                if self.stop.load(Ordering::Relaxed) || !self.holds(&node, &subnet) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            loop {
                if self.stop.load(Ordering::Relaxed) || !self.holds(&node, &subnet) {
                    return;
                }
                let request = v1::RenewLeaseRequest {
                    node: node.clone(),
                    subnet: subnet.clone(),
                };
                match AgentClient::new(channels[which].clone())
                    .renew_lease(request)
                    .await
                {
                    Ok(_) => {
                        self.renewals.fetch_add(1, Ordering::Relaxed);
                        renewed = tokio::time::Instant::now();
                        break;
                    }
                    Err(s) if is_retryable(&s) && renewed.elapsed() < ttl => {
                        which = 1 - which;
                        // The agent's backoff between renewal attempts.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    // Released meanwhile by the scenario: not a loss.
                    Err(_) if !self.holds(&node, &subnet) => return,
                    Err(s) => {
                        self.lost.lock().unwrap().push(format!(
                            "{node} {subnet}: {:?}: {} ({:.1} s after the last renewal)",
                            s.code(),
                            s.message(),
                            renewed.elapsed().as_secs_f64()
                        ));
                        return;
                    }
                }
            }
        }
    }
}

/// What an agent showed before the faults, to compare after.
struct AgentPicture {
    subnet_env: String,
    subnet: String,
    key_mod_revision: i64,
}

/// Delivery at one watcher, against etcd's history.
#[derive(Debug, Default)]
struct Delivery {
    /// What differs: expected and not delivered, delivered and not expected.
    diff: (Vec<Change>, Vec<Change>),
    expected: usize,
    delivered: usize,
    missed: usize,
    repeated: usize,
    unexpected: usize,
    out_of_order: usize,
    exact: bool,
}

fn compare(expected: &[Change], got: &[Change]) -> Delivery {
    let mut seen: HashMap<&Change, usize> = HashMap::new();
    for c in got {
        *seen.entry(c).or_default() += 1;
    }
    let want: HashMap<&Change, ()> = expected.iter().map(|c| (c, ())).collect();
    Delivery {
        diff: (
            expected
                .iter()
                .filter(|c| !seen.contains_key(c))
                .cloned()
                .collect(),
            got.iter()
                .filter(|c| !want.contains_key(c))
                .cloned()
                .collect(),
        ),
        expected: expected.len(),
        delivered: got.len(),
        missed: expected.iter().filter(|c| !seen.contains_key(c)).count(),
        repeated: seen.values().map(|n| n - 1).sum(),
        unexpected: got.iter().filter(|c| !want.contains_key(c)).count(),
        out_of_order: got.windows(2).filter(|w| w[1].2 < w[0].2).count(),
        exact: got == expected,
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {} / {} / {} / {} / {}",
            self.expected,
            self.delivered,
            self.missed,
            self.repeated,
            self.unexpected,
            self.out_of_order
        )
    }
}

/// etcd's own history of the lease keys in (`after`, `through`]: a put is `added`, a
/// delete `removed`, at the revision etcd gave it.
async fn etcd_history(etcd: &mut etcd_client::Client, after: i64, through: i64) -> Vec<Change> {
    let mut stream = etcd
        .watch(
            "/overlay/leases/",
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(after + 1),
            ),
        )
        .await
        .expect("etcd watch");
    let mut out = Vec::new();
    while out.last().is_none_or(|c: &Change| c.2 < through) {
        let resp = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("etcd history in time")
            .expect("etcd history stream")
            .expect("etcd history");
        for e in resp.events() {
            let kv = e.kv().expect("kv");
            let key = kv.key_str().unwrap_or_default();
            let subnet = key.trim_start_matches("/overlay/leases/").replace('-', "/");
            let kind = match e.event_type() {
                etcd_client::EventType::Put => "added",
                etcd_client::EventType::Delete => "removed",
            };
            if kv.mod_revision() <= through {
                out.push((kind.to_string(), subnet, kv.mod_revision()));
            }
        }
    }
    out
}

/// A controller's error answers to lease operations (`lease_operations_total` with a
/// result other than ok).
fn controller_errors(c: &Controller) -> u64 {
    let (_, body) = overlay_tests::cluster::http_get(c.health_port, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("overlay_controller_lease_operations_total"))
        .filter(|l| !l.contains("result=\"ok\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A cluster, two controllers, agents, watchers and the renewer: what every scenario
/// needs, and its final accounting.
struct Bed {
    test: &'static str,
    cluster: EtcdCluster,
    controllers: Vec<Controller>,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    channels: Arc<[Channel; 2]>,
    agents: Vec<Agent>,
    pictures: Vec<AgentPicture>,
    watchers: Vec<Watcher>,
    raw: Arc<Mutex<RawLog>>,
    raw_task: tokio::task::JoinHandle<()>,
    keepers: Keepers,
    /// Every answer to a join, released or not.
    answers: Vec<(String, String)>,
    failed: Vec<String>,
    joins: Arc<Tally>,
    releases: Arc<Tally>,
    begin_revision: i64,
    started: Instant,
}

impl Bed {
    fn start(test: &'static str) -> Option<Bed> {
        let cluster = EtcdCluster::start_or_skip(test)?;
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("temp dir");
        let endpoints = cluster.endpoints();
        let insecure = ["--insecure".to_string()];
        let controllers = vec![
            Controller::start_on(
                &endpoints,
                "/overlay",
                dir.path(),
                "controller-a",
                &insecure,
            ),
            Controller::start_on(
                &endpoints,
                "/overlay",
                dir.path(),
                "controller-b",
                &insecure,
            ),
        ];
        set_config(
            &controllers[0].url,
            &[
                "--network",
                "10.244.0.0/16",
                "--backend",
                "alloc",
                "--subnet-max",
                overlay_tests::labs::RANDOM_SUBNET_MAX,
                "--lease-ttl",
                &format!("{TTL_SECS}s"),
            ],
        );
        let (a, b) = (&controllers[0].url, &controllers[1].url);
        let agents: Vec<Agent> = (0..AGENTS)
            .map(|i| {
                let list = if i % 2 == 0 {
                    format!("{a},{b}")
                } else {
                    format!("{b},{a}")
                };
                Agent::start(&list, &format!("agent{i}"), &agent_ip(i), dir.path(), &[])
            })
            .collect();
        let agent_subnets: Vec<String> = agents.iter().map(|a| a.wait_subnet(PATIENCE)).collect();
        let watchers = vec![
            Watcher::start("watch-a", &format!("{a},{b}")),
            Watcher::start("watch-b", &format!("{b},{a}")),
        ];
        let rt = runtime();
        let (channels, raw, raw_task) = {
            let _g = rt.enter();
            let raw: Arc<Mutex<RawLog>> = Arc::default();
            let task = rt.spawn(raw_watch(
                [stream_channel(a), stream_channel(b)],
                raw.clone(),
            ));
            (Arc::new([grpc_channel(a), grpc_channel(b)]), raw, task)
        };
        // Connected once each has its snapshot: the agents' leases printed.
        for w in &watchers {
            wait_until(PATIENCE, || {
                agent_subnets
                    .iter()
                    .all(|s| w.revision_of("added", s).is_some())
                    .then_some(())
            })
            .unwrap_or_else(|| panic!("{} got no snapshot", w.name));
        }
        wait_until(PATIENCE, || {
            (raw.lock().unwrap().snapshots > 0).then_some(())
        })
        .expect("the raw watcher got its snapshot");
        let mut bed = Bed {
            test,
            cluster,
            controllers,
            dir,
            rt,
            channels,
            agents,
            pictures: Vec::new(),
            watchers,
            raw,
            raw_task,
            keepers: Keepers::default(),
            answers: Vec::new(),
            failed: Vec::new(),
            joins: Arc::default(),
            releases: Arc::default(),
            begin_revision: 0,
            started,
        };
        bed.begin_revision = bed.marker(BEGIN_MARKER, "begin-marker");
        let view = bed.rt.block_on(EtcdView::read(&mut bed.etcd_client()));
        bed.pictures = bed
            .agents
            .iter()
            .map(|a| {
                let subnet = a.subnet().expect("agent subnet");
                AgentPicture {
                    subnet_env: a.subnet_env().expect("subnet.env"),
                    key_mod_revision: view.mod_revisions
                        [&format!("/overlay/leases/{}", subnet.replace('/', "-"))],
                    subnet,
                }
            })
            .collect();
        Some(bed)
    }

    fn etcd_client(&self) -> etcd_client::Client {
        let endpoints: Vec<String> = self
            .cluster
            .members
            .iter()
            .map(|m| m.endpoint.clone())
            .collect();
        self.rt
            .block_on(etcd_client::Client::connect(endpoints, None))
            .expect("connect to etcd")
    }

    /// Reserves `subnet` and waits until every watcher printed it; its revision.
    fn marker(&self, subnet: &str, node: &str) -> i64 {
        let request = v1::ReserveSubnetRequest {
            subnet: subnet.to_string(),
            node: node.to_string(),
            public_ip: "192.0.2.254".to_string(),
            ..Default::default()

        };
        let channels = self.channels.clone();
        self.rt
            .block_on(async move {
                let mut last = None;
                for attempt in 0..20 {
                    let answer = AdminClient::new(channels[attempt % 2].clone())
                        .reserve_subnet(request.clone())
                        .await;
                    match answer {
                        Ok(_) => return Ok(()),
                        // A retry that finds it reserved: an earlier answer was lost.
                        Err(s) if attempt > 0 && s.code() == Code::AlreadyExists => return Ok(()),
                        Err(s) if is_retryable(&s) => last = Some(s),
                        Err(s) => return Err(s),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(last.expect("an error"))
            })
            .unwrap_or_else(|s| panic!("reserve {subnet}: {s:?}"));
        let revisions: Vec<i64> = self
            .watchers
            .iter()
            .map(|w| {
                wait_until(PATIENCE, || w.revision_of("added", subnet))
                    .unwrap_or_else(|| panic!("{} never printed {subnet}", w.name))
            })
            .collect();
        let raw = wait_until(PATIENCE, || {
            let log = self.raw.lock().unwrap();
            log.changes
                .iter()
                .find(|(k, s, _)| k == "added" && s == subnet)
                .map(|c| c.2)
        })
        .unwrap_or_else(|| panic!("the raw watcher never got {subnet}"));
        assert!(
            revisions.iter().all(|&r| r == raw),
            "watchers disagree on the revision of {subnet}: {revisions:?} vs raw {raw}"
        );
        raw
    }

    /// `n` joins at once (node names `{prefix}NNN`, half starting on each controller);
    /// `fault` runs once `fault_after` of them succeeded. Returns how many had succeeded
    /// when the fault was over.
    fn joins_with_fault(
        &mut self,
        prefix: &str,
        n: usize,
        fault_after: usize,
        fault: impl FnOnce(&mut EtcdCluster),
    ) -> usize {
        let first_ip = self.answers.len() + self.failed.len();
        let round = Arc::new(Tally::default());
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let joined = join(
                    self.channels.clone(),
                    i % 2,
                    format!("{prefix}{i:03}"),
                    join_ip(first_ip + i),
                    round.clone(),
                );
                let (keepers, channels) = (self.keepers.clone(), self.channels.clone());
                self.rt.spawn(async move {
                    let answer = joined.await;
                    if let Ok((node, subnet)) = &answer {
                        keepers
                            .held
                            .lock()
                            .unwrap()
                            .insert(node.clone(), subnet.clone());
                        tokio::spawn(keepers.keep(channels, node.clone(), subnet.clone()));
                    }
                    answer
                })
            })
            .collect();
        wait_until(PATIENCE, || {
            (round.done.load(Ordering::Relaxed) >= fault_after).then_some(())
        })
        .expect("joins progress");
        fault(&mut self.cluster);
        let done_by_then = round.done.load(Ordering::Relaxed);
        for t in tasks {
            match self.rt.block_on(t).expect("join task") {
                Ok(pair) => self.answers.push(pair),
                Err(e) => self.failed.push(e),
            }
        }
        self.add(&self.joins, &round);
        done_by_then
    }

    /// Releases `n` held leases at once; `fault` runs once `fault_after` are done.
    fn releases_with_fault(
        &mut self,
        n: usize,
        fault_after: usize,
        fault: impl FnOnce(&mut EtcdCluster),
    ) -> usize {
        let victims: Vec<(String, String)> = self
            .keepers
            .held
            .lock()
            .unwrap()
            .iter()
            .step_by(2)
            .take(n)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        // Out of the kept set first: a lease being released is no longer kept alive.
        for (node, _) in &victims {
            self.keepers.held.lock().unwrap().remove(node);
        }
        let round = Arc::new(Tally::default());
        let tasks: Vec<_> = victims
            .into_iter()
            .enumerate()
            .map(|(i, (node, subnet))| {
                self.rt.spawn(release(
                    self.channels.clone(),
                    i % 2,
                    node,
                    subnet,
                    round.clone(),
                ))
            })
            .collect();
        wait_until(PATIENCE, || {
            (round.done.load(Ordering::Relaxed) >= fault_after).then_some(())
        })
        .expect("releases progress");
        fault(&mut self.cluster);
        let done_by_then = round.done.load(Ordering::Relaxed);
        for t in tasks {
            if let Err(e) = self.rt.block_on(t).expect("release task") {
                self.failed.push(e);
            }
        }
        self.add(&self.releases, &round);
        done_by_then
    }

    /// Error answers to lease operations, both controllers together (from `/metrics`).
    fn controller_errors(&self) -> u64 {
        self.controllers.iter().map(controller_errors).sum()
    }

    fn add(&self, total: &Tally, round: &Tally) {
        for (t, r) in [
            (&total.attempts, &round.attempts),
            (&total.retries, &round.retries),
        ] {
            t.fetch_add(r.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        total
            .done
            .fetch_add(round.done.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The end marker, the checks and the table; panics on any loss.
    fn finish(self, mut summary: Summary) {
        self.cluster.wait_healthy();
        let end = self.marker(END_MARKER, "end-marker");
        // A renewal round after the faults: every held lease must still renew.
        let renewals = &self.keepers.renewals;
        let want =
            renewals.load(Ordering::Relaxed) as usize + self.keepers.held.lock().unwrap().len();
        wait_until(PATIENCE, || {
            (renewals.load(Ordering::Relaxed) as usize >= want).then_some(())
        })
        .expect("a renewal round after the faults");
        self.keepers.stop.store(true, Ordering::Relaxed);
        let mut etcd = self.etcd_client();
        let expected = self
            .rt
            .block_on(etcd_history(&mut etcd, self.begin_revision, end));
        let view = self.rt.block_on(EtcdView::read(&mut etcd));

        let in_window = |c: &Change| c.2 > self.begin_revision && c.2 <= end;
        let mut deliveries: Vec<(String, Delivery)> = self
            .watchers
            .iter()
            .map(|w| {
                let got: Vec<Change> = w.changes().into_iter().filter(in_window).collect();
                (
                    format!("`overlayctl watch` on {}", &w.name[6..]),
                    compare(&expected, &got),
                )
            })
            .collect();
        let (raw_snapshots, raw_reconnects) = {
            let log = self.raw.lock().unwrap();
            let got: Vec<Change> = log
                .changes
                .iter()
                .filter(|c| in_window(c))
                .cloned()
                .collect();
            deliveries.push(("raw gRPC watcher".into(), compare(&expected, &got)));
            (log.snapshots, log.reconnects)
        };
        self.raw_task.abort();

        // Subnets: answers, keys.
        let mut by_subnet: HashMap<&str, usize> = HashMap::new();
        for (_, s) in &self.answers {
            *by_subnet.entry(s).or_default() += 1;
        }
        let duplicate_answers = by_subnet.values().filter(|&&n| n > 1).count();
        let mut keys_per_node: HashMap<&str, usize> = HashMap::new();
        for (node, _) in view.keys.values() {
            *keys_per_node.entry(node).or_default() += 1;
        }
        let nodes_with_two_keys = keys_per_node.values().filter(|&&n| n > 1).count();
        let key = |s: &str| format!("/overlay/leases/{}", s.replace('/', "-"));
        let held = self.keepers.held.lock().unwrap().clone();
        let missing_keys: Vec<String> = held
            .iter()
            .filter(|(n, s)| view.keys.get(&key(s)).map(|(node, _)| node) != Some(n))
            .map(|(n, s)| format!("{n} {s}"))
            .collect();
        let expected_keys = held.len() + self.agents.len() + 2;
        let lost = self.keepers.lost.lock().unwrap().clone();

        // Agents: nothing they hold or wrote may have changed.
        let mut agents_changed = Vec::new();
        for (a, p) in self.agents.iter().zip(&self.pictures) {
            let now = view.mod_revisions.get(&key(&p.subnet)).copied();
            let status = a.status().unwrap_or_default();
            if a.subnet_env().as_deref() != Some(p.subnet_env.as_str())
                || now != Some(p.key_mod_revision)
                || a.log().contains("lease lost")
                || status["subnet"] != p.subnet.as_str()
            {
                agents_changed.push(a.name.clone());
            }
        }
        let agents_followed = self
            .agents
            .iter()
            .filter(|a| {
                wait_until(PATIENCE, || {
                    a.status()
                        .filter(|s| s["watch_revision"].as_i64().unwrap_or(0) >= end)
                })
                .is_some()
            })
            .count();
        let controller_errors: Vec<String> = self
            .controllers
            .iter()
            .map(|c| controller_errors(c).to_string())
            .collect();
        let joins = self.joins.done.load(Ordering::Relaxed);
        summary.row(
            "joins requested / succeeded / failed",
            format!(
                "{} / {joins} / {}",
                joins + self.failed.len(),
                self.failed.len()
            ),
        );
        summary.row(
            "acquire attempts / retried on the other controller",
            format!(
                "{} / {}",
                self.joins.attempts.load(Ordering::Relaxed),
                self.joins.retries.load(Ordering::Relaxed)
            ),
        );
        if self.releases.attempts.load(Ordering::Relaxed) > 0 {
            summary.row(
                "releases done / attempts / retried",
                format!(
                    "{} / {} / {}",
                    self.releases.done.load(Ordering::Relaxed),
                    self.releases.attempts.load(Ordering::Relaxed),
                    self.releases.retries.load(Ordering::Relaxed)
                ),
            );
        }
        summary.row(
            "error answers from controllers a / b (retried by the clients)",
            controller_errors.join(" / "),
        );
        summary.row("duplicate subnets (answers)", duplicate_answers);
        summary.row("nodes with two keys", nodes_with_two_keys);
        summary.row(
            "lease keys at the end / expected (held joins + agents + 2 markers)",
            format!("{} / {expected_keys}", view.keys.len()),
        );
        summary.row(
            "leases lost (renewals refused, held leases without their key)",
            lost.len() + missing_keys.len(),
        );
        summary.row(
            "renewals through the faults",
            self.keepers.renewals.load(Ordering::Relaxed),
        );
        summary.row(
            "agents whose subnet.env, lease key or subnet changed, or that lost their lease",
            format!("{} of {}", agents_changed.len(), self.agents.len()),
        );
        summary.row(
            "agents whose watch reached the end marker",
            format!("{agents_followed} of {}", self.agents.len()),
        );
        summary.row(
            "lease changes in etcd between the markers (revisions)",
            format!("{} ({}..={end})", expected.len(), self.begin_revision + 1),
        );
        for (name, d) in &deliveries {
            summary.row(
                &format!("{name}: events expected / delivered / missed / repeated / unexpected / out of order"),
                d,
            );
        }
        summary.row(
            "raw gRPC watcher: snapshots / reconnections",
            format!("{raw_snapshots} / {raw_reconnects}"),
        );
        summary.row(
            "etcd leader at the end",
            format!(
                "m{}",
                self.cluster.leader().map_or("?".into(), |l| l.to_string())
            ),
        );
        summary.finish();
        eprintln!(
            "{}: {:.1} s after the cluster was up",
            self.test,
            self.started.elapsed().as_secs_f64()
        );

        let logs = || {
            self.controllers
                .iter()
                .map(|c| c.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        };
        assert!(
            self.failed.is_empty(),
            "failed: {:?}\n{}",
            self.failed,
            logs()
        );
        assert_eq!(duplicate_answers, 0, "one subnet answered to two nodes");
        assert_eq!(nodes_with_two_keys, 0, "a node holds two keys");
        assert!(lost.is_empty(), "renewals lost leases: {lost:?}");
        assert!(
            missing_keys.is_empty(),
            "held leases without key: {missing_keys:?}"
        );
        assert_eq!(view.keys.len(), expected_keys, "lease keys at the end");
        assert!(
            agents_changed.is_empty(),
            "agents changed: {agents_changed:?}"
        );
        assert_eq!(
            agents_followed,
            self.agents.len(),
            "agents' watches fell behind"
        );
        for (name, d) in &deliveries {
            assert!(
                d.exact,
                "{name}: missed / unexpected: {:?}\n{}",
                d.diff,
                logs()
            );
        }
        drop(self.dir);
    }
}

/// (1) The etcd leader SIGKILLed during a burst of 100 joins, and again during a burst of
/// 50 releases that fan out to the watchers; the killed member is restarted after each.
#[test]
fn etcd_leader_killed_during_joins_and_fan_out_loses_nothing() {
    let test = "etcd_leader_killed_during_joins_and_fan_out_loses_nothing";
    let Some(mut bed) = Bed::start(test) else {
        return;
    };
    let mut summary = Summary::new(
        "A. etcd leader SIGKILLed during 100 joins, then during 50 releases (fan-out); 3 members, 2 controllers",
    );
    let mut kills = Vec::new();
    let mut elections = Vec::new();
    for round in 0..2 {
        let mut killed = None;
        let fault = |c: &mut EtcdCluster| {
            let leader = c.leader().expect("a leader");
            let t = Instant::now();
            c.kill(leader);
            let new = c.wait_new_leader(leader);
            killed = Some((leader, new, t.elapsed()));
        };
        let done = if round == 0 {
            bed.joins_with_fault("join", 100, 30, fault)
        } else {
            bed.releases_with_fault(50, 15, fault)
        };
        let (old, new, took) = killed.expect("killed");
        kills.push(format!(
            "m{old} ({} done when the new leader m{new} was in)",
            done
        ));
        elections.push(format!("{:.0} ms", took.as_secs_f64() * 1000.0));
        bed.cluster.restart(old);
    }
    summary.row(
        "faults injected",
        format!("2 leader SIGKILLs: {}", kills.join(", ")),
    );
    summary.row("kill to new leader (each)", elections.join(", "));
    summary.row("killed members restarted on their data", 2);
    bed.finish(summary);
}

/// (2) A member SIGSTOPped for 6 s (60 election timeouts, and longer than the
/// controller's 5 s etcd request timeout), then SIGCONT: first the leader during 50 joins,
/// then a follower during 25 releases.
#[test]
fn etcd_member_stopped_past_the_election_timeout_loses_nothing() {
    let test = "etcd_member_stopped_past_the_election_timeout_loses_nothing";
    let Some(mut bed) = Bed::start(test) else {
        return;
    };
    const STOP_FOR: Duration = Duration::from_secs(6);
    let mut summary = Summary::new(&format!(
        "B. etcd member SIGSTOPped for {} s: the leader during 50 joins, then a follower during 25 releases",
        STOP_FOR.as_secs()
    ));
    let mut stops = Vec::new();
    for round in 0..2 {
        let mut stopped = None;
        let fault = |c: &mut EtcdCluster| {
            let leader = c.leader().expect("a leader");
            let victim = if round == 0 {
                leader
            } else {
                (leader + 1) % c.members.len()
            };
            let t = Instant::now();
            c.stop(victim);
            let new = if victim == leader {
                Some(c.wait_new_leader(leader))
            } else {
                None
            };
            let election = t.elapsed();
            // The fault lasts STOP_FOR: a sleep for its duration, not a synchronization.
            std::thread::sleep(STOP_FOR.saturating_sub(t.elapsed()));
            c.cont(victim);
            assert_eq!(c.state(victim), MemberState::Running);
            stopped = Some((victim, new, election, t.elapsed()));
        };
        let done = if round == 0 {
            bed.joins_with_fault("join", 50, 10, fault)
        } else {
            bed.releases_with_fault(25, 5, fault)
        };
        let (victim, new, election, lasted) = stopped.expect("stopped");
        bed.cluster.wait_healthy();
        stops.push(match new {
            Some(n) => format!(
                "leader m{victim} for {:.1} s (new leader m{n} after {:.0} ms; {done} joins done during the stop)",
                lasted.as_secs_f64(),
                election.as_secs_f64() * 1000.0
            ),
            None => format!(
                "follower m{victim} for {:.1} s ({done} releases done during the stop)",
                lasted.as_secs_f64()
            ),
        });
    }
    summary.row(
        "faults injected",
        format!("2 SIGSTOP/SIGCONT: {}", stops.join("; ")),
    );
    bed.finish(summary);
}

/// (3) Every member in turn SIGKILLed after 10 of a burst of 50 joins, the rest made
/// while it is down, then restarted on its data dir and ports: a rolling restart, as for
/// an etcd upgrade, with the controllers failing over to the live members meanwhile.
#[test]
fn etcd_members_restarted_in_turn_lose_nothing() {
    let test = "etcd_members_restarted_in_turn_lose_nothing";
    let Some(mut bed) = Bed::start(test) else {
        return;
    };
    let mut summary = Summary::new(
        "C. every etcd member in turn SIGKILLed during 50 joins and restarted on its data (rolling restart)",
    );
    let mut restarts = Vec::new();
    for member in 0..3 {
        let mut was_leader = false;
        let errors_before = bed.controller_errors();
        let done = bed.joins_with_fault(&format!("r{member}-"), 50, 10, |c| {
            was_leader = c.leader() == Some(member);
            c.kill(member);
        });
        let errors = bed.controller_errors() - errors_before;
        let t = Instant::now();
        bed.cluster.restart(member);
        restarts.push(format!(
            "m{member} ({}; killed after {done} joins, {errors} error answers while down, healthy {:.1} s after restart)",
            if was_leader { "leader" } else { "follower" },
            t.elapsed().as_secs_f64()
        ));
    }
    summary.row(
        "faults injected",
        format!("3 kills + restarts: {}", restarts.join(", ")),
    );
    bed.finish(summary);
}
