//! Control-plane benchmark: N simulated agents joining one controller, then the latency of
//! a lease change written into etcd reaching N watchers through the controller, beside the
//! same changes reaching N watchers of etcd itself, in one run on one etcd.
//!
//! Run it with `make bench` (release binaries, then this `harness = false` bench). N and K
//! come from `OVERLAY_BENCH_AGENTS` (default 1000; a list such as `1000,5000` runs each N in
//! turn, each with a controller of its own on the same etcd, under a prefix of its own) and
//! `OVERLAY_BENCH_EVENTS` (default 50); `OVERLAY_BENCH_SPACING_MS` (default 50) spaces the
//! changes. It prints markdown tables and never fails on a number: timings depend on the
//! machine, so there is nothing to assert.
//!
//! Simulated agents retry as the agent does: an answer that means "later" (a busy
//! controller's RESOURCE_EXHAUSTED with a retry pushback, UNAVAILABLE, ABORTED) is waited
//! out with jittered backoff ([`Backoff`]) and counted as a retry by kind; anything else
//! ends that agent and is counted as an error by kind.
//!
//! Why in-process agents: 1000 `overlay-agent` processes on a 2-core machine would measure
//! process start-up and the scheduler, not the control plane. Each simulated agent still has
//! its own gRPC channel (its own TCP connection and HTTP/2 session) and speaks the real
//! `overlay.v1.Agent` API as the agent binary does: AcquireLease, then WatchLeases from
//! revision 0, keeping the set of leases it knows up to date from the snapshot and events.
//!
//! Why the changes are written straight into etcd: the question is how fast each watch path
//! delivers, not how fast the controller writes. The same kind of put feeds both paths, so
//! the etcd commit is inside both latencies. Latency is measured from just before the put is
//! sent, not from its response, which can come back after a fast watcher already has the
//! event (the put's own round trip is reported separately).
//!
//! Why the gRPC watchers are dropped before the direct ones connect: on 2 cores, 1000
//! connected streams on the controller would still receive the direct phase's changes and
//! take CPU from the path under test. Each phase measures one fan-out path alone, with fresh
//! keys, the same value size and the same spacing. The direct phase opens N separate etcd
//! clients (N TCP connections, one watch each), which is what N agents talking to etcd
//! would do.
//!
//! All clients share this process and its 2-thread runtime, which itself competes for the 2
//! cores with etcd and the controller; that cost is the same for both paths.
//!
//! What limits N on one machine: open files (this process holds N gRPC connections, then N
//! etcd connections; so do the controller and etcd: the bench raises RLIMIT_NOFILE before
//! it starts them, and passes `--max-connections` above N to the controller), ephemeral ports
//! (about 28000 in the default `ip_local_port_range`, per destination, and closed ones wait
//! in TIME_WAIT for a minute) and memory (a few hundred MiB per thousand clients here).

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::Ipv4Net;
use overlay_core::backoff::Backoff;
use overlay_core::lease::{now_millis, BackendData, LeaseRecord};
use overlay_core::subnet::subnet_key;
use overlay_core::BackendType;
use overlay_proto::v1::admin_client::AdminClient;
use overlay_proto::v1::agent_client::AgentClient;
use overlay_proto::v1::watch_leases_response::Kind;
use overlay_proto::v1::{self, EventType};
use overlay_tests::cluster::Controller;
use overlay_tests::{Etcd, EtcdCluster};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Node names of the leases the bench writes into etcd, per phase; the suffix is the
/// change's index. Distinct per phase, so the controller (still running in the direct
/// phase) never sees two leases of one node.
const EVENT_NODE: &str = "bench-event-";
const DIRECT_EVENT_NODE: &str = "bench-direct-";
/// How long a simulated agent keeps retrying "later" answers before it gives up.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// How long to wait for stragglers after the last change before counting what arrived.
const DELIVERY_GRACE: Duration = Duration::from_secs(15);
/// Concurrent connects while opening the direct etcd watchers (setup, not measured).
const DIRECT_CONNECT_CONCURRENCY: usize = 64;

#[derive(Clone)]
struct Settings {
    /// The largest N of the runs (what the open-files limit is sized for).
    agents: usize,
    /// N of each run, in order.
    runs: Vec<usize>,
    events: usize,
    spacing: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let runs = env_numbers("OVERLAY_BENCH_AGENTS", 1000);
        Settings {
            agents: runs.iter().copied().max().unwrap_or(1),
            runs,
            events: env_number("OVERLAY_BENCH_EVENTS", 50).max(1),
            spacing: Duration::from_millis(env_number("OVERLAY_BENCH_SPACING_MS", 50) as u64),
        }
    }

    /// The settings of the run with `agents` agents.
    fn run(&self, agents: usize) -> Settings {
        Settings {
            agents,
            runs: vec![agents],
            ..self.clone()
        }
    }

    /// A /12 holds 4096 /24s; a larger run needs the whole 10/8.
    fn network(&self) -> Ipv4Net {
        let needed = self.agents + 2 * self.events + 16;
        let net = if needed <= 4000 {
            "10.240.0.0/12"
        } else {
            "10.0.0.0/8"
        };
        net.parse().expect("network literal")
    }
}

/// A comma-separated list of positive numbers.
fn env_numbers(name: &str, default: usize) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|n| match n.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => panic!("{name}={v:?} is not a list of positive integers (e.g. 1000,5000)"),
            })
            .collect(),
        Err(_) => vec![default],
    }
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer")),
        Err(_) => default,
    }
}

/// Counters the main task polls to know when a phase is done.
#[derive(Default)]
struct Progress {
    leased: AtomicUsize,
    snapshots: AtomicUsize,
    converged: AtomicUsize,
    delivered: AtomicUsize,
    failed: AtomicUsize,
    connect_retries: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// Errors that ended an agent, by kind.
    error_kinds: Mutex<BTreeMap<String, usize>>,
    /// "Later" answers that were retried, by kind.
    retried: Mutex<BTreeMap<String, usize>>,
}

impl Progress {
    fn error(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.errors.lock().expect("errors lock").push(what);
    }

    /// An error that ended an agent: counted by kind, the first few kept whole.
    fn fail(&self, who: String, e: &BoxError) {
        *self
            .error_kinds
            .lock()
            .expect("kinds lock")
            .entry(error_kind(e.as_ref()))
            .or_default() += 1;
        self.error(format!("{who}: {e}"));
    }

    fn retried(&self, kind: String) {
        *self
            .retried
            .lock()
            .expect("retried lock")
            .entry(kind)
            .or_default() += 1;
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }
}

/// What kind of failure `e` is, in a few words: the gRPC code and what the controller
/// said up to its first detail, or the transport's I/O error.
fn error_kind(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return status_kind(s);
    }
    let mut source = e.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("transport: {:?}", io.kind());
        }
        source = cause.source();
    }
    let text = e.to_string();
    text.split(':').next().unwrap_or(&text).trim().to_string()
}

fn status_kind(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut source = s.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("{:?} (transport: {:?})", s.code(), io.kind());
        }
        source = cause.source();
    }
    let message = s.message();
    let head: String = message
        .split([':', ';', '('])
        .next()
        .unwrap_or(message)
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(60)
        .collect();
    format!("{:?}: {}", s.code(), head.trim())
}

/// The controller's retry pushback, if it sent one.
fn pushback(s: &tonic::Status) -> Option<Duration> {
    let ms: u64 = s
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// Whether the agent would retry this answer (it keeps everything and comes back later).
fn is_later(s: &tonic::Status) -> bool {
    pushback(s).is_some() || matches!(s.code(), Code::Unavailable | Code::Aborted)
}

/// What one simulated agent saw, as absolute instants.
struct AgentRun {
    leased: Option<Instant>,
    snapshot: Option<Instant>,
    converged: Option<Instant>,
    subnet: Option<String>,
    deliveries: Vec<Option<Instant>>,
}

/// Records the arrival of the bench's change number N (from the node name `bench-event-N`
/// or `bench-direct-N`).
fn record_delivery(
    deliveries: &mut [Option<Instant>],
    node: &str,
    at: Instant,
    progress: &Progress,
) {
    let Some(index) = node
        .strip_prefix(EVENT_NODE)
        .or_else(|| node.strip_prefix(DIRECT_EVENT_NODE))
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    if let Some(slot @ None) = deliveries.get_mut(index) {
        *slot = Some(at);
        progress.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Unique unicast addresses outside the overlay: the three documentation /24s, then
/// 100.64.0.0/10. They are only data in lease values; nothing is ever sent to them.
fn public_ip(i: usize) -> Ipv4Addr {
    const DOCUMENTATION: [[u8; 3]; 3] = [[198, 51, 100], [203, 0, 113], [192, 0, 2]];
    if i < 3 * 254 {
        let [a, b, c] = DOCUMENTATION[i / 254];
        Ipv4Addr::new(a, b, c, (i % 254 + 1) as u8)
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + (i - 3 * 254) as u32)
    }
}

async fn connect_channel(url: &str, progress: &Progress) -> Result<Channel, BoxError> {
    let endpoint = Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(10));
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if attempt >= 5 => return Err(format!("connecting to {url}: {e}").into()),
            Err(_) => {
                progress.connect_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

/// One agent: its own channel, AcquireLease, then WatchLeases from 0 until `stop`.
async fn simulated_agent(
    i: usize,
    url: Arc<str>,
    settings: (usize, usize),
    mut start: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> AgentRun {
    let (agents, events) = settings;
    let mut run = AgentRun {
        leased: None,
        snapshot: None,
        converged: None,
        subnet: None,
        deliveries: vec![None; events],
    };
    let _ = start.wait_for(|go| *go).await;
    let result: Result<(), BoxError> = async {
        let channel = connect_channel(&url, &progress).await?;
        let mut client = AgentClient::new(channel);
        // As the agent: "later" answers are retried with jittered backoff (the agent's
        // control-plane schedule), honouring the controller's pushback.
        let give_up = Instant::now() + RETRY_FOR;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let acquired = loop {
            let request = v1::AcquireLeaseRequest {
                node: format!("bench-node-{i:05}"),
                public_ip: public_ip(i).to_string(),
                backend: v1::BackendType::Alloc.into(),
                vtep_mac: None,
                preferred_subnet: None,
                iface: None,
                underlay: None,
                ..Default::default()

            };
            match client.acquire_lease(request).await {
                Ok(r) => break r.into_inner(),
                Err(s) if is_later(&s) && Instant::now() < give_up => {
                    progress.retried(format!("acquire {}", status_kind(&s)));
                    tokio::time::sleep(backoff.next_delay_after(pushback(&s))).await;
                }
                Err(s) => return Err(s.into()),
            }
        };
        run.leased = Some(Instant::now());
        run.subnet = acquired.lease.map(|l| l.subnet);
        progress.leased.fetch_add(1, Ordering::Relaxed);

        // As the agent: (re)open the watch after the last revision seen, with backoff.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut revision = 0;
        let mut stream =
            open_watch(&mut client, revision, &mut backoff, give_up, &progress).await?;
        let mut known: HashSet<String> = HashSet::new();
        loop {
            let message = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(()),
                m = stream.message() => m,
            };
            let now = Instant::now();
            let message = match message {
                Ok(Some(m)) => m,
                // A broken stream is resumed, as the agent does.
                broken if Instant::now() < give_up => {
                    let why = match broken {
                        Err(s) => status_kind(&s),
                        _ => "the controller ended it".to_string(),
                    };
                    progress.retried(format!("watch stream broke, resumed: {why}"));
                    tokio::time::sleep(backoff.next_delay()).await;
                    stream =
                        open_watch(&mut client, revision, &mut backoff, give_up, &progress).await?;
                    continue;
                }
                Err(s) => return Err(s.into()),
                Ok(None) => return Err("the controller ended the watch stream".into()),
            };
            match message.kind {
                Some(Kind::Snapshot(snapshot)) => {
                    revision = snapshot.revision;
                    if run.snapshot.is_none() {
                        run.snapshot = Some(now);
                        progress.snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                    // A later snapshot is a resync after falling behind: it may carry
                    // changes this agent never got as events.
                    for l in &snapshot.leases {
                        record_delivery(&mut run.deliveries, &l.node, now, &progress);
                    }
                    known = snapshot.leases.into_iter().map(|l| l.subnet).collect();
                }
                Some(Kind::Event(event)) => {
                    revision = revision.max(event.revision);
                    let Some(lease) = event.lease else { continue };
                    match EventType::try_from(event.r#type) {
                        Ok(EventType::Added) => {
                            record_delivery(&mut run.deliveries, &lease.node, now, &progress);
                            known.insert(lease.subnet);
                        }
                        Ok(EventType::Removed) => {
                            known.remove(&lease.subnet);
                        }
                        _ => {}
                    }
                }
                None => {}
            }
            if run.converged.is_none() && known.len() >= agents {
                run.converged = Some(now);
                progress.converged.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    .await;
    if let Err(e) = result {
        progress.fail(format!("agent {i}"), &e);
    }
    run
}

/// Opens `WatchLeases` after `revision`, retrying "later" answers until `give_up`.
async fn open_watch(
    client: &mut AgentClient<Channel>,
    revision: i64,
    backoff: &mut Backoff,
    give_up: Instant,
    progress: &Progress,
) -> Result<tonic::Streaming<v1::WatchLeasesResponse>, BoxError> {
    loop {
        match client
            .watch_leases(v1::WatchLeasesRequest {
                after_revision: revision,
            })
            .await
        {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if is_later(&s) && Instant::now() < give_up => {
                progress.retried(format!("watch {}", status_kind(&s)));
                tokio::time::sleep(backoff.next_delay_after(pushback(&s))).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// One direct etcd watcher: its own client (connection) and a prefix watch, until `stop`.
async fn direct_watcher(
    _client: etcd_client::Client,
    mut stream: etcd_client::WatchStream,
    events: usize,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> Vec<Option<Instant>> {
    let mut deliveries = vec![None; events];
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            m = stream.message() => m,
        };
        let now = Instant::now();
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => {
                progress.error("a direct watch stream ended".into());
                break;
            }
            Err(e) => {
                progress.error(format!("direct watch: {e}"));
                break;
            }
        };
        if response.canceled() {
            progress.error(format!(
                "direct watch canceled: {}",
                response.cancel_reason()
            ));
            break;
        }
        for event in response.events() {
            if event.event_type() != etcd_client::EventType::Put {
                continue;
            }
            // Decoded as an agent watching etcd would have to.
            if let Some(record) = event
                .kv()
                .and_then(|kv| LeaseRecord::decode(kv.value()).ok())
            {
                record_delivery(&mut deliveries, &record.node, now, &progress);
            }
        }
    }
    deliveries
}

async fn open_direct_watch(
    endpoint: &str,
    prefix: &str,
) -> Result<(etcd_client::Client, etcd_client::WatchStream), BoxError> {
    let mut client = etcd_client::Client::connect([endpoint], None).await?;
    let mut stream = client
        .watch(
            format!("{prefix}/leases/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    // The watch exists once etcd says so; only then can no change slip past it.
    match stream.message().await? {
        Some(r) if r.created() => Ok((client, stream)),
        other => Err(format!("etcd did not confirm the watch: {other:?}").into()),
    }
}

/// Writes one reservation-like lease per subnet, `spacing` apart; the instant just before
/// each put is sent, and each put's round trip.
async fn put_changes(
    etcd: &mut etcd_client::Client,
    (prefix, node): (&str, &str),
    subnets: &[Ipv4Net],
    spacing: Duration,
) -> Result<(Vec<Instant>, Vec<Duration>), BoxError> {
    let mut sent = Vec::with_capacity(subnets.len());
    let mut round_trips = Vec::with_capacity(subnets.len());
    for (i, subnet) in subnets.iter().enumerate() {
        let now = now_millis();
        let record = LeaseRecord {
            node: format!("{node}{i}"),
            public_ip: Some(Ipv4Addr::new(192, 0, 2, 254)),
            public_ipv6: None,
            ipv6_subnet: None,
            backend: BackendType::Alloc,
            backend_data: BackendData::default(),
            reserved: true,
            created_at: now,
            renewed_at: now,
        };
        let key = format!("{prefix}/leases/{}", subnet_key(*subnet));
        let value = record.encode();
        let before = Instant::now();
        etcd.put(key, value, None).await?;
        round_trips.push(before.elapsed());
        sent.push(before);
        tokio::time::sleep_until((before + spacing).into()).await;
    }
    Ok((sent, round_trips))
}

/// Polls until `done()` or `timeout`; whether it got done.
async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// CPU time (user + system) used so far by the controller, etcd and this process, in ms.
#[derive(Clone, Copy, Default)]
struct Cpu {
    controller: Option<u64>,
    etcd: Option<u64>,
    bench: Option<u64>,
}

impl Cpu {
    fn now(controller: u32, etcd: u32) -> Cpu {
        Cpu {
            controller: cpu_ms(&controller.to_string()),
            etcd: cpu_ms(&etcd.to_string()),
            bench: cpu_ms("self"),
        }
    }

    /// What was used since `before`.
    fn since(self, before: Cpu) -> Cpu {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        Cpu {
            controller: d(self.controller, before.controller),
            etcd: d(self.etcd, before.etcd),
            bench: d(self.bench, before.bench),
        }
    }

    fn show(self, per: usize) -> String {
        let f = |v: Option<u64>| {
            v.map_or("—".into(), |v| {
                format!("{:.1} ms", v as f64 / per.max(1) as f64)
            })
        };
        format!(
            "{} / {} / {}",
            f(self.controller),
            f(self.etcd),
            f(self.bench)
        )
    }
}

/// utime + stime of a process (`self` or a pid) in ms, from /proc.
fn cpu_ms(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1000 / ticks)
}

/// Resident memory of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Raises the open-files limit before etcd and the controller are spawned, so they inherit
/// it: each side holds one socket per client. Returns the soft limit in force.
fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let raised = libc::rlimit {
            rlim_cur: wanted.max(limit.rlim_cur),
            rlim_max: wanted.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Without privilege the soft limit can still go up to the hard one.
            let capped = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// One number taken from a phase's statistics, for a table row.
type Measure = fn(&FanoutStats) -> Option<Duration>;

/// Latencies of one fan-out phase.
struct FanoutStats {
    expected: usize,
    delivered: usize,
    /// Every (change, watcher) delivery, sorted.
    all: Vec<Duration>,
    /// Per change, the delivery to the last watcher that got it, sorted.
    last_watcher: Vec<Duration>,
    put_round_trip: Vec<Duration>,
    etcd_rss_kib: Option<u64>,
    /// CPU used from the first change to the last delivery.
    cpu: Cpu,
}

impl FanoutStats {
    fn new(
        sent: &[Instant],
        runs: &[Vec<Option<Instant>>],
        watchers: usize,
        mut put_round_trip: Vec<Duration>,
        etcd_rss_kib: Option<u64>,
    ) -> FanoutStats {
        let mut all = Vec::new();
        let mut last = vec![None::<Duration>; sent.len()];
        for deliveries in runs {
            for (e, arrival) in deliveries.iter().enumerate() {
                if let Some(at) = arrival {
                    let latency = at.saturating_duration_since(sent[e]);
                    all.push(latency);
                    last[e] = Some(last[e].map_or(latency, |l| l.max(latency)));
                }
            }
        }
        all.sort();
        let mut last_watcher: Vec<Duration> = last.into_iter().flatten().collect();
        last_watcher.sort();
        put_round_trip.sort();
        FanoutStats {
            expected: watchers * sent.len(),
            delivered: all.len(),
            all,
            last_watcher,
            put_round_trip,
            etcd_rss_kib,
            cpu: Cpu::default(),
        }
    }
}

struct JoinStats {
    agents: usize,
    leased: usize,
    distinct_subnets: usize,
    all_leased: Option<Duration>,
    median_leased: Option<Duration>,
    all_snapshots: Option<Duration>,
    all_converged: Option<Duration>,
    connect_retries: usize,
    errors: Vec<String>,
    error_kinds: BTreeMap<String, usize>,
    retried: BTreeMap<String, usize>,
    /// CPU used from the start until every agent knew every lease.
    cpu: Cpu,
}

struct Report {
    settings: Settings,
    fd_limit: u64,
    join: JoinStats,
    via_controller: FanoutStats,
    direct: FanoutStats,
    direct_setup: Duration,
    controller_rss_kib: Option<u64>,
    controller_rss_before_kib: Option<u64>,
    etcd_rss_before_direct_kib: Option<u64>,
    fanout_errors: Vec<String>,
    load_before: String,
    load_after: String,
}

/// `kind ×count` pairs, or "none".
fn kinds(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, n)| format!("{} ×{n}", k.replace('|', "/")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn mib(k: Option<u64>) -> String {
    k.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

impl Report {
    /// Controller memory per watch stream: RSS with the streams minus RSS before the
    /// agents joined, over the streams.
    fn kib_per_stream(&self) -> Option<f64> {
        let (with, before) = (self.controller_rss_kib?, self.controller_rss_before_kib?);
        let streams = self.via_controller.expected / self.settings.events.max(1);
        (streams > 0).then(|| with.saturating_sub(before) as f64 / streams as f64)
    }

    /// One line of the summary table over all runs.
    fn summary_row(&self) -> String {
        let (c, d) = (&self.via_controller, &self.direct);
        let p = |f: &FanoutStats, q| percentile(&f.all, q);
        let errors = self.join.errors.len() + self.fanout_errors.len();
        format!(
            "| {} | {} / {} | {} | {} | {} / {} ({}) | {} / {} ({}) | {} | {} | {} | {} → {} |",
            self.settings.agents,
            self.join.leased,
            self.join.distinct_subnets,
            errors,
            secs(self.join.all_leased),
            ms(p(c, 0.5)),
            ms(p(d, 0.5)),
            ratio(
                p(c, 0.5).map(|x| x.as_secs_f64()),
                p(d, 0.5).map(|x| x.as_secs_f64())
            ),
            ms(p(c, 0.99)),
            ms(p(d, 0.99)),
            ratio(
                p(c, 0.99).map(|x| x.as_secs_f64()),
                p(d, 0.99).map(|x| x.as_secs_f64())
            ),
            self.kib_per_stream()
                .map_or("—".into(), |k| format!("{k:.1} KiB")),
            mib(c.etcd_rss_kib),
            mib(d.etcd_rss_kib),
            self.load_before,
            self.load_after,
        )
    }

    fn markdown(&self) -> String {
        let s = &self.settings;
        let j = &self.join;
        let mut out = format!(
            "### Join: {} simulated agents, one controller (alloc backend)\n\n\
             | measure | value |\n|---|---|\n\
             | agents holding a lease / distinct subnets | {} / {} |\n\
             | all agents hold leases | {} |\n\
             | median agent holds its lease | {} |\n\
             | all agents have their watch snapshot | {} |\n\
             | all watchers know all {} leases | {} |\n\
             | errors / connect retries | {} / {} |\n\
             | errors by kind | {} |\n\
             | \"later\" answers retried, by kind | {} |\n\
             | CPU per agent joining: controller / etcd / this process | {} |\n\n",
            j.agents,
            j.leased,
            j.distinct_subnets,
            secs(j.all_leased),
            secs(j.median_leased),
            secs(j.all_snapshots),
            j.agents,
            secs(j.all_converged),
            j.errors.len(),
            j.connect_retries,
            kinds(&j.error_kinds),
            kinds(&j.retried),
            j.cpu.show(j.agents),
        );
        let (c, d) = (&self.via_controller, &self.direct);
        out += &format!(
            "### Fan-out: {} lease changes put into etcd {} ms apart, {} watchers\n\n\
             | latency, put sent → watcher has it | via controller (gRPC) | direct etcd watchers | controller ÷ direct |\n\
             |---|---|---|---|\n",
            s.events,
            s.spacing.as_millis(),
            s.agents
        );
        let rows: [(&str, Measure); 6] = [
            ("per delivery p50", |f| percentile(&f.all, 0.50)),
            ("per delivery p99", |f| percentile(&f.all, 0.99)),
            ("per delivery max", |f| f.all.last().copied()),
            ("last watcher per change p50", |f| {
                percentile(&f.last_watcher, 0.50)
            }),
            ("last watcher per change p99", |f| {
                percentile(&f.last_watcher, 0.99)
            }),
            ("etcd put round trip p50", |f| {
                percentile(&f.put_round_trip, 0.50)
            }),
        ];
        for (name, get) in rows {
            let (a, b) = (get(c), get(d));
            out += &format!(
                "| {name} | {} | {} | {} |\n",
                ms(a),
                ms(b),
                ratio(a.map(|x| x.as_secs_f64()), b.map(|x| x.as_secs_f64()))
            );
        }
        out += &format!(
            "| CPU per change: controller / etcd / this process | {} | {} | |\n",
            c.cpu.show(s.events),
            d.cpu.show(s.events)
        );
        out += &format!(
            "| deliveries received | {} / {} | {} / {} | |\n\
             | etcd RSS with the {} watchers connected | {} | {} (before they connected: {}) | {} |\n\
             | controller RSS with {} gRPC watchers | {} (before they joined: {}; {} per stream) | — | |\n\n",
            c.delivered,
            c.expected,
            d.delivered,
            d.expected,
            s.agents,
            mib(c.etcd_rss_kib),
            mib(d.etcd_rss_kib),
            mib(self.etcd_rss_before_direct_kib),
            ratio(
                c.etcd_rss_kib.map(|k| k as f64),
                d.etcd_rss_kib.map(|k| k as f64)
            ),
            s.agents,
            mib(self.controller_rss_kib),
            mib(self.controller_rss_before_kib),
            self.kib_per_stream()
                .map_or("—".into(), |k| format!("{k:.1} KiB")),
        );
        out += &format!(
            "Opening the {} direct etcd watchers took {} (setup, not measured above); \
             open-files limit {}; fan-out errors: {}; load average before {}, after {} \
             (a busy machine skews everything).\n",
            s.agents,
            secs(Some(self.direct_setup)),
            self.fd_limit,
            self.fanout_errors.len(),
            self.load_before,
            self.load_after,
        );
        out
    }
}

/// The `count` highest /24s of `network` that no agent holds.
fn free_subnets(network: Ipv4Net, taken: &HashSet<String>, count: usize) -> Vec<Ipv4Net> {
    let base = u32::from(network.network());
    let total = 1u32 << (24 - network.prefix_len());
    (1..total)
        .rev()
        .map(|i| Ipv4Net::new(Ipv4Addr::from(base + (i << 8)), 24).expect("a /24"))
        .filter(|s| !taken.contains(&s.to_string()))
        .take(count)
        .collect()
}

async fn run(
    settings: Settings,
    fd_limit: u64,
    etcd: &Etcd,
    controller: &Controller,
    prefix: &str,
) -> Report {
    let n = settings.agents;
    let k = settings.events;
    let network = settings.network();
    let load_before = load_average();
    let mut admin = AdminClient::connect(controller.url.clone())
        .await
        .expect("connect to the controller's Admin API");
    admin
        .set_config(v1::SetConfigRequest {
            json: format!(r#"{{"network":"{network}","backend":{{"type":"alloc"}}}}"#),
            force: false,
        })
        .await
        .expect("SetConfig");
    drop(admin);
    let controller_rss_before_kib = rss_kib(controller.child.pid());

    // Phase 1: N agents join at once.
    eprintln!("phase 1: {n} agents join");
    let progress = Arc::new(Progress::default());
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let url: Arc<str> = controller.url.clone().into();
    let agents: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(simulated_agent(
                i,
                url.clone(),
                (n, k),
                start_rx.clone(),
                stop_rx.clone(),
                progress.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let etcd_pid = etcd.pid().expect("etcd runs");
    let cpu_at = || Cpu::now(controller.child.pid(), etcd_pid);
    let cpu_start = cpu_at();
    let started = Instant::now();
    start_tx.send_replace(true);
    let failed = || progress.failed.load(Ordering::Relaxed);
    wait_for(RETRY_FOR + Duration::from_secs(30), || {
        progress.leased.load(Ordering::Relaxed) + failed() >= n
    })
    .await;
    wait_for(Duration::from_secs(30), || {
        progress.snapshots.load(Ordering::Relaxed) + failed() >= n
    })
    .await;
    wait_for(Duration::from_secs(30), || {
        progress.converged.load(Ordering::Relaxed) + failed() >= n
    })
    .await;
    let join_cpu = cpu_at().since(cpu_start);
    let join_errors = progress.errors();
    eprintln!(
        "phase 1 done in {:.1} s: {} leased, {} errors",
        started.elapsed().as_secs_f64(),
        progress.leased.load(Ordering::Relaxed),
        join_errors.len()
    );

    // Phase 2: K changes in etcd, fanned out by the controller to the N gRPC watchers.
    let taken: HashSet<String> = {
        // Ask the controller what is leased: the agents' own answers are still inside
        // their tasks.
        let mut client = AgentClient::connect(controller.url.clone())
            .await
            .expect("connect to the controller");
        let listed = client
            .list_leases(v1::ListLeasesRequest {})
            .await
            .expect("ListLeases")
            .into_inner();
        listed.leases.into_iter().map(|l| l.subnet).collect()
    };
    let subnets = free_subnets(network, &taken, 2 * k);
    let (via_controller_subnets, direct_subnets) = subnets.split_at(k);
    let mut writer = etcd_client::Client::connect([&etcd.endpoint], None)
        .await
        .expect("connect to etcd");
    let watching = progress.snapshots.load(Ordering::Relaxed);
    eprintln!("phase 2: {k} changes to {watching} watchers via the controller");
    let cpu_start = cpu_at();
    let (sent, round_trips) = put_changes(
        &mut writer,
        (prefix, EVENT_NODE),
        via_controller_subnets,
        settings.spacing,
    )
    .await
    .expect("put changes into etcd");
    wait_for(DELIVERY_GRACE, || {
        progress.delivered.load(Ordering::Relaxed) >= watching * k
    })
    .await;
    let controller_phase_cpu = cpu_at().since(cpu_start);
    let etcd_rss_controller = rss_kib(etcd_pid);
    let controller_rss_kib = rss_kib(controller.child.pid());
    stop_tx.send_replace(true);
    let mut runs = Vec::with_capacity(n);
    for agent in agents {
        runs.push(agent.await.expect("agent task"));
    }
    let leased: Vec<&AgentRun> = runs.iter().filter(|r| r.leased.is_some()).collect();
    let distinct: HashSet<&String> = runs.iter().filter_map(|r| r.subnet.as_ref()).collect();
    let all = |get: fn(&AgentRun) -> Option<Instant>| -> Option<Duration> {
        let times: Option<Vec<Instant>> = runs.iter().map(get).collect();
        times?.into_iter().max().map(|t| t - started)
    };
    let mut lease_times: Vec<Duration> = leased
        .iter()
        .filter_map(|r| r.leased.map(|t| t - started))
        .collect();
    lease_times.sort();
    let join = JoinStats {
        agents: n,
        leased: leased.len(),
        distinct_subnets: distinct.len(),
        all_leased: all(|r| r.leased),
        median_leased: percentile(&lease_times, 0.5),
        all_snapshots: all(|r| r.snapshot),
        all_converged: all(|r| r.converged),
        connect_retries: progress.connect_retries.load(Ordering::Relaxed),
        errors: join_errors.clone(),
        error_kinds: progress.error_kinds.lock().expect("kinds lock").clone(),
        retried: progress.retried.lock().expect("retried lock").clone(),
        cpu: join_cpu,
    };
    let deliveries: Vec<Vec<Option<Instant>>> = runs.into_iter().map(|r| r.deliveries).collect();
    let mut via_controller = FanoutStats::new(
        &sent,
        &deliveries,
        watching,
        round_trips,
        etcd_rss_controller,
    );
    via_controller.cpu = controller_phase_cpu;
    let mut fanout_errors: Vec<String> = progress.errors().split_off(join_errors.len());

    // Phase 3: the same with N watchers on etcd itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let etcd_rss_before_direct_kib = rss_kib(etcd_pid);
    eprintln!("phase 3: opening {n} direct etcd watchers");
    let direct_progress = Arc::new(Progress::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let setup_started = Instant::now();
    let endpoint = etcd.endpoint.clone();
    let opened: Vec<Result<_, BoxError>> = futures::stream::iter(0..n)
        .map(|_| open_direct_watch(&endpoint, prefix))
        .buffer_unordered(DIRECT_CONNECT_CONCURRENCY)
        .collect()
        .await;
    let direct_setup = setup_started.elapsed();
    let mut watchers = Vec::with_capacity(n);
    for o in opened {
        match o {
            Ok((client, stream)) => watchers.push(tokio::spawn(direct_watcher(
                client,
                stream,
                k,
                stop_rx.clone(),
                direct_progress.clone(),
            ))),
            Err(e) => direct_progress.fail("opening a direct watch".into(), &e),
        }
    }
    let watching = watchers.len();
    eprintln!("phase 3: {k} changes to {watching} direct etcd watchers");
    let cpu_start = cpu_at();
    let (sent, round_trips) = put_changes(
        &mut writer,
        (prefix, DIRECT_EVENT_NODE),
        direct_subnets,
        settings.spacing,
    )
    .await
    .expect("put changes into etcd");
    wait_for(DELIVERY_GRACE, || {
        direct_progress.delivered.load(Ordering::Relaxed) >= watching * k
    })
    .await;
    let direct_phase_cpu = cpu_at().since(cpu_start);
    let etcd_rss_direct = rss_kib(etcd_pid);
    stop_tx.send_replace(true);
    let mut deliveries = Vec::with_capacity(watching);
    for w in watchers {
        deliveries.push(w.await.expect("watcher task"));
    }
    let mut direct = FanoutStats::new(&sent, &deliveries, watching, round_trips, etcd_rss_direct);
    direct.cpu = direct_phase_cpu;
    fanout_errors.extend(direct_progress.errors());

    Report {
        settings,
        fd_limit,
        join,
        via_controller,
        direct,
        direct_setup,
        controller_rss_kib,
        controller_rss_before_kib,
        etcd_rss_before_direct_kib,
        fanout_errors,
        load_before,
        load_after: load_average(),
    }
}

fn main() {
    let settings = Settings::from_env();
    // Sockets per process: N clients here (twice, briefly), N on the controller, N on etcd.
    let fd_limit = raise_fd_limit((4 * settings.agents as u64 + 1024).max(65_536));
    // OVERLAY_BENCH_ETCD_MEMBERS=3: a 3-member etcd cluster, all three given to the
    // controller; the bench's own etcd clients (writer, direct watchers, RSS) use member 0.
    let members = std::env::var("OVERLAY_BENCH_ETCD_MEMBERS").unwrap_or_else(|_| "1".into());
    assert!(
        members == "1" || members == "3",
        "OVERLAY_BENCH_ETCD_MEMBERS is 1 or 3"
    );
    let (cluster, single) = match members.as_str() {
        "3" => (EtcdCluster::start_or_skip("control_plane bench"), None),
        _ => (None, Etcd::start_or_skip("control_plane bench")),
    };
    let Some(etcd) = cluster.as_ref().map(|c| &c.members[0]).or(single.as_ref()) else {
        return;
    };
    let endpoints = cluster
        .as_ref()
        .map_or(etcd.endpoint.clone(), |c| c.endpoints());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut reports = Vec::new();
    for &n in &settings.runs {
        // Each N under a prefix of its own, with a controller of its own, so no run sees
        // another's leases; etcd (and its memory) is shared.
        let prefix = format!("/overlay-{n}");
        let flags = [
            "--insecure".to_string(),
            // Above N: the default cap (4096) would close connections of the agents
            // beyond it.
            format!("--max-connections={}", n + 1024),
        ];
        let controller = Controller::start_on(
            &endpoints,
            &prefix,
            dir.path(),
            &format!("controller-{n}"),
            &flags,
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let report = runtime.block_on(run(settings.run(n), fd_limit, etcd, &controller, &prefix));
        // Clients first, so the servers see orderly closes rather than resets.
        runtime.shutdown_timeout(Duration::from_secs(5));
        for (phase, errors) in [
            ("join", &report.join.errors),
            ("fan-out", &report.fanout_errors),
        ] {
            for e in errors.iter().take(5) {
                eprintln!("{phase} error: {e}");
            }
        }
        if !report.join.errors.is_empty() {
            let log = controller.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "controller log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
        println!("{}", report.markdown());
        reports.push(report);
    }
    println!(
        "### Summary\n\n\
         | N | leased / distinct | errors | all leased | fan-out p50 controller / direct | \
         fan-out p99 controller / direct | controller per stream | etcd RSS controller / direct | \
         load average |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &reports {
        println!("{}", r.summary_row());
    }
}
