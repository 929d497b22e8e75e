//! Datapath benchmarks, each beside its baseline in one run (`make bench-datapath`, as root):
//!
//! 1. **Programming N peers** (default 1000: N permanent neighbours, N FDB entries, N onlink
//!    routes) onto an empty VTEP: the agent's netlink module applying the diff from
//!    `overlay_core::datapath::{plan, diff}`, against `ip -batch` plus `bridge -batch`
//!    applying the very same entries.
//! 2. **Agent restart with N peers**: a real lab host (real etcd, controller and agent) with
//!    N peer leases injected into etcd. A cold start (VTEP and every entry gone) against a
//!    restart into an unchanged world: time from starting the agent to `/readyz` 200, and
//!    the datapath writes the started agent reports. Then the time from a lease change in
//!    etcd to the route appearing (and, for a deletion, disappearing) on the host.
//! 3. **iperf3 TCP** between workloads on two hosts: over Overlay's vxlan and host-gw
//!    backends, over the same entries made by hand (`bench/hand-built.sh`, Flannel's
//!    wiring), and host to host over the underlay.
//!
//! It prints markdown tables and never fails on a number: timings depend on the machine.
//! It does fail when the work measured was not done (a benchmark of entries that never
//! reached the kernel would be worse than none): after each programming run the kernel is
//! read back with the agent's own `observe` and must equal the plan.
//!
//! Settings (environment): `OVERLAY_BENCH_PEERS` (1000), `OVERLAY_BENCH_RUNS` (5, part 1),
//! `OVERLAY_BENCH_RESTARTS` (3), `OVERLAY_BENCH_CHANGES` (10), `OVERLAY_BENCH_IPERF_RUNS` (3),
//! `OVERLAY_BENCH_IPERF_SECONDS` (5), `OVERLAY_BENCH_PARTS` (`programming,restart,iperf`),
//! `OVERLAY_BENCH_KEEP_LOGS=1` keeps the labs' logs (the namespaces are always removed).
//!
//! Design notes:
//! - Part 1 gives every run a fresh namespace with an identical VTEP on a veth underlay, made
//!   with the same `ip` commands for both sides, so the only difference is how the entries
//!   are written; the two sides alternate run by run so drift of the machine hits both.
//!   The netlink side runs on a 2-worker multi-thread runtime, as the agent's
//!   `#[tokio::main]` does on this 2-core machine, built on a thread that entered the
//!   namespace (its worker threads and every socket they open belong to it). The `ip`
//!   side's time includes starting the two processes: that is what a script pays.
//! - Part 2's cold start deletes the VTEP while the agent is stopped (its neighbours, FDB
//!   entries and routes go with it), so the start programs everything, as after a reboot;
//!   the bridge and the lease stay. Injected peers need not exist: their entries are
//!   programmed and no packet is sent to them. Their public IPs come from the documentation
//!   ranges 198.51.100.0/24 and 203.0.113.0/24 (each used by a few peers: the ranges are
//!   smaller than 1000), their subnets from 10.240.0.0/12.
//! - Part 3 builds all four topologies first and then runs the paths round-robin, so every
//!   path sees the same machine; the injected peers are removed before, so the agents
//!   are idle as the hand-built hosts are.
//! - Cleanup: every namespace is named `ovlb-<pid>-...` and deleted (which also kills what
//!   runs inside) on return, on a panic, and on SIGINT/SIGTERM/SIGHUP (a handler wakes a
//!   thread that does it); a later run also removes what a run killed with SIGKILL left.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use overlay_agent::datapath::Netlink;
use overlay_core::datapath::{diff, plan, vtep_name, DesiredState, FdbEntry, HostNet};
use overlay_core::lease::{now_millis, BackendData};
use overlay_core::subnet::subnet_key;
use overlay_core::{BackendType, Lease, LeaseRecord, MacAddr, NetworkConfig};
use overlay_lab::{netns, teardown_prefix, Lab, LabSpec};
use overlay_tests::{bin_path, is_root, Child};

const NS_PREFIX: &str = "ovlb";
const BENCH_NETWORK: &str = "10.240.0.0/12";
const LEASE_PREFIX: &str = "/overlay/leases/";
/// Puts per etcd transaction when injecting leases (etcd allows 128 by default).
const TXN_OPS: usize = 100;
const PATIENCE: Duration = Duration::from_secs(120);
/// The synthetic host of part 1, as a lab host would be.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

struct Settings {
    peers: usize,
    runs: usize,
    restarts: usize,
    changes: usize,
    iperf_runs: usize,
    iperf_seconds: usize,
    parts: BTreeSet<String>,
    keep_logs: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let parts = std::env::var("OVERLAY_BENCH_PARTS")
            .unwrap_or_else(|_| "programming,restart,iperf".into());
        let parts: BTreeSet<String> = parts
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        for p in &parts {
            assert!(
                ["programming", "restart", "iperf"].contains(&p.as_str()),
                "OVERLAY_BENCH_PARTS: unknown part {p:?} (use programming, restart, iperf)"
            );
        }
        Settings {
            // A /12 holds 4096 /24s: room for the peers, the lab hosts and the changes.
            peers: env_number("OVERLAY_BENCH_PEERS", 1000).clamp(1, 4000),
            runs: env_number("OVERLAY_BENCH_RUNS", 5).max(1),
            restarts: env_number("OVERLAY_BENCH_RESTARTS", 3).max(1),
            changes: env_number("OVERLAY_BENCH_CHANGES", 10),
            iperf_runs: env_number("OVERLAY_BENCH_IPERF_RUNS", 3).max(1),
            iperf_seconds: env_number("OVERLAY_BENCH_IPERF_SECONDS", 5).max(1),
            parts,
            keep_logs: std::env::var_os("OVERLAY_BENCH_KEEP_LOGS").is_some_and(|v| v != "0"),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.contains(part)
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

fn progress(what: &str) {
    eprintln!("[bench datapath] {what}");
}

// ---------------------------------------------------------------------------------------
// Cleanup

/// Everything this run creates: namespaces `<prefix>-*` and the directory `dir`.
struct Scratch {
    prefix: String,
    dir: PathBuf,
    keep_logs: bool,
}

impl Scratch {
    fn new(keep_logs: bool) -> Scratch {
        let prefix = format!("{NS_PREFIX}-{}", std::process::id());
        let dir = scratch_dir(&prefix);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch {
            prefix,
            dir,
            keep_logs,
        }
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

fn scratch_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(prefix)
}

/// Deletes the namespaces `<prefix>-*` (killing what runs inside) and, unless the logs
/// are to be kept, `dir`.
fn clean(prefix: &str, dir: &Path, keep_logs: bool) {
    let errors = if keep_logs {
        let mut names = netns::list_with_prefix(&format!("{prefix}-"));
        // Workloads before hosts before underlays, as the lab tears down.
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        names
            .iter()
            .filter_map(|n| netns::delete(n).err())
            .collect()
    } else {
        teardown_prefix(prefix, dir)
    };
    for e in errors {
        eprintln!("cleanup: {e}");
    }
    if keep_logs {
        eprintln!("[bench datapath] logs kept in {}", dir.display());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        clean(&self.prefix, &self.dir, self.keep_logs);
    }
}

/// The write end of the pipe the signal handler reports signals on.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the fd stays open for the process's life.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

/// On SIGINT, SIGTERM or SIGHUP: removes everything and exits. The handler only writes the
/// signal's number to a pipe, and a thread reading it does the work. (Blocking the signals
/// and `sigwait`ing instead would leak the blocked mask into every child: std does not
/// reset it, and an agent that cannot see SIGTERM never stops.)
fn clean_up_on_signals(prefix: String, dir: PathBuf, keep_logs: bool) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors of a local array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls write(2); exec resets it in children.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    let read_fd = fds[0];
    std::thread::spawn(move || {
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into a local.
            let n = unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        eprintln!("[bench datapath] signal {byte}: removing the namespaces and exiting");
        clean(&prefix, &dir, keep_logs);
        std::process::exit(128 + i32::from(byte));
    });
}

/// Removes what earlier runs killed with SIGKILL left behind (`ovlb-<pid>-*` whose process
/// is gone).
fn remove_leftovers() {
    let mut dead = BTreeSet::new();
    for ns in netns::list_with_prefix(&format!("{NS_PREFIX}-")) {
        let pid = ns.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                dead.insert(pid);
            }
        }
    }
    for pid in dead {
        let prefix = format!("{NS_PREFIX}-{pid}");
        progress(&format!("removing {prefix}-* left by an earlier run"));
        clean(&prefix, &scratch_dir(&prefix), false);
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn list(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs `program args...` inside `ns` and returns its output whatever its exit status.
fn output_in(ns: &str, program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    netns::in_netns(&mut cmd, ns).unwrap_or_else(|e| panic!("{e}"));
    cmd.output()
        .unwrap_or_else(|e| panic!("{program} in {ns}: {e}"))
}

/// Runs `program args...` inside `ns`; panics with its stderr when it fails.
fn must_in(ns: &str, program: &str, args: &[&str]) -> String {
    let out = netns::exec(ns, program, args).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_in(ns: &str, args: &[&str]) {
    netns::ip_in(ns, args).unwrap_or_else(|e| panic!("{e}"));
}

/// How many routes with the agent's route protocol `ns` holds.
fn agent_route_count(ns: &str) -> usize {
    must_in(ns, "ip", &["-o", "route", "show", "proto", "79"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Peers

fn bench_config() -> NetworkConfig {
    NetworkConfig::from_json(&format!(
        r#"{{"network":"{BENCH_NETWORK}","backend":{{"type":"vxlan"}}}}"#
    ))
    .expect("bench config is valid")
}

/// The `i`th /24 of the bench network (`i` >= 1: the first /24 is never handed out).
fn bench_subnet(i: usize) -> Ipv4Net {
    let base = u32::from(Ipv4Addr::new(10, 240, 0, 0));
    Ipv4Net::new(Ipv4Addr::from(base + (i as u32) * 256), 24).expect("/24")
}

/// A peer's lease record: a documentation-range public IP and a unique VTEP MAC.
fn peer_record(i: usize) -> LeaseRecord {
    let host = 1 + (i / 2 % 254) as u8;
    let public_ip = [
        Ipv4Addr::new(198, 51, 100, host),
        Ipv4Addr::new(203, 0, 113, host),
    ][i % 2];
    let now = now_millis();
    LeaseRecord {
        node: format!("bench-peer-{i}"),
        public_ip: Some(public_ip),
        public_ipv6: None,
        ipv6_subnet: None,
        backend: BackendType::Vxlan,
        backend_data: BackendData {
            vtep_mac: Some(MacAddr::local_unicast([
                0x0e,
                0xb0,
                (i >> 24) as u8,
                (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ])),
            ..Default::default()
        },
        reserved: false,
        created_at: now,
        renewed_at: now,
    }
}

fn peer_lease(i: usize) -> Lease {
    Lease {
        subnet: ipnet::IpNet::V4(bench_subnet(i)),
        record: peer_record(i),
    }
}

// ---------------------------------------------------------------------------------------
// Part 1: programming N peers

struct Programming {
    entries: usize,
    netlink_apply: Vec<f64>,
    netlink_reconcile: Vec<f64>,
    netlink_writes: u64,
    ip_batch: Vec<f64>,
}

/// A namespace with a veth "underlay" holding the host address and an empty VTEP on it,
/// made with `ip` alone so both sides start from the same kernel state.
fn vtep_namespace(ns: &str, config: &NetworkConfig, vtep: &str) {
    netns::create(ns).unwrap_or_else(|e| panic!("{e}"));
    netns::veth(ns, "eth0", ns, "peer0", None).unwrap_or_else(|e| panic!("{e}"));
    ip_in(
        ns,
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", "eth0"],
    );
    ip_in(ns, &["link", "set", "eth0", "up"]);
    ip_in(ns, &["link", "set", "peer0", "up"]);
    let (vni, port) = (
        config.backend.vni.to_string(),
        config.backend.port.to_string(),
    );
    ip_in(
        ns,
        &[
            "link",
            "add",
            vtep,
            "address",
            "0e:b0:ff:00:00:01",
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "local",
            &HOST_IP.to_string(),
            "dev",
            "eth0",
            "nolearning",
        ],
    );
    ip_in(ns, &["link", "set", vtep, "up"]);
}

/// Runs `f` on a 2-worker runtime whose threads all live in `ns`.
fn in_runtime<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
) -> T {
    netns::run_in(ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        f(&rt)
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The agent's path: observe, plan, diff, apply. Returns (apply, whole reconcile, writes).
fn program_with_netlink(
    ns: &str,
    inputs: &(NetworkConfig, Lease, Vec<Lease>, HostNet),
    vtep: &str,
) -> (Duration, Duration, u64) {
    let inputs = inputs.clone();
    let vtep = vtep.to_string();
    in_runtime(ns, move |rt| {
        rt.block_on(async move {
            let (config, own, peers, host) = &inputs;
            let nl = Netlink::connect().expect("netlink socket");
            let start = Instant::now();
            let observed = nl.observe(&[vtep.as_str()], &host.iface).await.expect("observe");
            let desired = plan(config, own, peers, host);
            let ops = diff(&desired, &observed);
            let applying = Instant::now();
            let report = nl.apply(&ops).await;
            let done = Instant::now();
            if let Some((op, e)) = report.failed.first() {
                panic!(
                    "netlink apply: {} of {} operations failed, first: {op}: {e}",
                    report.failed.len(),
                    ops.len()
                );
            }
            (done - applying, done - start, nl.writes())
        })
    })
}

/// Reads the VTEP's entries back with the agent's own `observe` and checks them against
/// the plan. `bridge` makes FDB entries with state NOARP|PERMANENT where the agent (and
/// Flannel) make PERMANENT alone, and `observe` only lists the latter; so for the `bridge`
/// side the FDB is read with `bridge -j fdb show` instead.
fn verify_entries(ns: &str, vtep: &str, desired: &DesiredState, who: &str, fdb_by_bridge: bool) {
    let vtep_owned = vtep.to_string();
    let mut observed = in_runtime(ns, move |rt| {
        rt.block_on(async move {
            let nl = Netlink::connect().expect("netlink socket");
            nl.observe(&[vtep_owned.as_str()], "eth0")
                .await
                .expect("observe")
        })
    });
    if fdb_by_bridge {
        observed.fdb = bridge_fdb(ns, vtep);
    }
    let want = desired.kernel_entries();
    assert!(
        observed == want,
        "{who} did not program the planned entries: kernel has {} routes, {} neighbours, {} FDB \
         entries; planned {}, {}, {}",
        observed.routes.len(),
        observed.neighbours.len(),
        observed.fdb.len(),
        want.routes.len(),
        want.neighbours.len(),
        want.fdb.len()
    );
}

/// The permanent NTF_SELF entries of the VTEP, as `bridge -j fdb show` reports them.
fn bridge_fdb(ns: &str, vtep: &str) -> BTreeSet<FdbEntry> {
    let text = must_in(ns, "bridge", &["-j", "fdb", "show", "dev", vtep]);
    let entries: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bridge -j fdb show: {e}"));
    entries
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["state"] == "permanent"
                && e["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "self"))
        })
        .filter_map(|e| {
            Some(FdbEntry {
                dev: vtep.to_string(),
                mac: e["mac"].as_str()?.parse().ok()?,
                dst: e["dst"].as_str()?.parse().ok()?,
            })
        })
        .collect()
}

/// The same entries as `ip -batch` (neighbours, then routes) and `bridge -batch` (FDB)
/// input, with the same flags the agent sets: permanent, NTF_SELF, onlink, proto 79.
fn batch_files(desired: &DesiredState, dir: &Path) -> (PathBuf, PathBuf) {
    let mut ip_text = String::new();
    for n in &desired.neighbours {
        ip_text += &format!(
            "neigh replace {} lladdr {} dev {} nud permanent\n",
            n.ip, n.mac, n.dev
        );
    }
    for r in desired.routes.values() {
        ip_text += &format!(
            "route replace {} via {} dev {}{} proto {}\n",
            r.dst,
            r.via,
            r.dev,
            if r.onlink { " onlink" } else { "" },
            overlay_agent::datapath::ROUTE_PROTOCOL
        );
    }
    let mut fdb_text = String::new();
    for f in &desired.fdb {
        fdb_text += &format!(
            "fdb replace {} dev {} dst {} self permanent\n",
            f.mac, f.dev, f.dst
        );
    }
    let (ip_file, fdb_file) = (dir.join("entries.ip"), dir.join("entries.bridge"));
    std::fs::write(&ip_file, ip_text).expect("write the ip batch");
    std::fs::write(&fdb_file, fdb_text).expect("write the bridge batch");
    (ip_file, fdb_file)
}

fn programming(s: &Settings, scratch: &Scratch) -> Programming {
    let config = bench_config();
    let vtep = vtep_name(config.backend.vni);
    let own = peer_lease(1);
    let peers: Vec<Lease> = (2..s.peers + 2).map(peer_lease).collect();
    let host = HostNet {
        public_ip: Some(HOST_IP),
        public_ipv6: None,
        underlay_v6: None,
        iface: "eth0".into(),
        underlay: Some("192.0.2.0/24".parse().expect("CIDR")),
    };
    let desired = plan(&config, &own, &peers, &host);
    assert!(
        desired.skipped.is_empty(),
        "plan skipped peers: {:?}",
        &desired.skipped[..desired.skipped.len().min(3)]
    );
    let entries = desired.routes.len() + desired.neighbours.len() + desired.fdb.len();
    assert_eq!(entries, 3 * s.peers, "plan: 3 entries per vxlan peer");
    let (ip_file, fdb_file) = batch_files(&desired, &scratch.dir);
    let (ip_file, fdb_file) = (
        ip_file.to_string_lossy().into_owned(),
        fdb_file.to_string_lossy().into_owned(),
    );
    let inputs = (config.clone(), own, peers, host);

    let mut result = Programming {
        entries,
        netlink_apply: Vec::new(),
        netlink_reconcile: Vec::new(),
        netlink_writes: 0,
        ip_batch: Vec::new(),
    };
    for run in 1..=s.runs {
        progress(&format!(
            "programming {} peers, run {run}/{}",
            s.peers, s.runs
        ));
        let ns = scratch.ns(&format!("nl{run}"));
        vtep_namespace(&ns, &config, &vtep);
        let (apply, reconcile, writes) = program_with_netlink(&ns, &inputs, &vtep);
        verify_entries(&ns, &vtep, &desired, "the netlink module", false);
        netns::delete(&ns).unwrap_or_else(|e| panic!("{e}"));
        result.netlink_apply.push(ms(apply));
        result.netlink_reconcile.push(ms(reconcile));
        result.netlink_writes = writes;

        let ns = scratch.ns(&format!("ip{run}"));
        vtep_namespace(&ns, &config, &vtep);
        let start = Instant::now();
        must_in(&ns, "bridge", &["-batch", &fdb_file]);
        must_in(&ns, "ip", &["-batch", &ip_file]);
        let took = start.elapsed();
        verify_entries(&ns, &vtep, &desired, "ip -batch and bridge -batch", true);
        netns::delete(&ns).unwrap_or_else(|e| panic!("{e}"));
        result.ip_batch.push(ms(took));
    }
    result
}

// ---------------------------------------------------------------------------------------
// Part 2: agent restart with N peers, lease-change latency

struct Restart {
    peers: usize,
    inject_ms: f64,
    converge_ms: f64,
    cold_ready: Vec<f64>,
    cold_writes: Vec<u64>,
    warm_ready: Vec<f64>,
    warm_writes: Vec<u64>,
    route_added: Vec<f64>,
    route_removed: Vec<f64>,
}

fn lab_spec(scratch: &Scratch, short: &str, backend: &str, network: &str) -> LabSpec {
    let bin_dir = bin_path("overlay-agent")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    let mut spec = LabSpec::new(
        &format!("bench-{short}"),
        &scratch.ns(short),
        &scratch.dir.join(short),
        &bin_dir,
    );
    spec.hosts = 2;
    spec.backend = backend.into();
    spec.network = network.into();
    spec
}

fn lab_up(spec: &LabSpec, keep_logs: bool) -> Lab {
    progress(&format!(
        "lab {} ({} backend): starting etcd, the controller and {} agents",
        spec.name, spec.backend, spec.hosts
    ));
    let mut lab = Lab::up(spec, &mut |_| {}).unwrap_or_else(|e| panic!("lab {}: {e}", spec.name));
    // The lab's own teardown would delete its logs; the scratch cleanup removes the
    // namespaces (and what runs in them) either way.
    lab.down_on_drop = !keep_logs;
    lab
}

/// Runs `f` with an etcd client on a current-thread runtime inside the lab's underlay
/// namespace (where etcd listens on 127.0.0.1:2379).
fn with_etcd<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce(etcd_client::Client) -> futures::future::BoxFuture<'static, T> + Send + 'static,
) -> T {
    netns::run_in(&lab.state.underlay_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None)
                .await
                .expect("connect to the lab's etcd");
            f(client).await
        })
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn lease_key(subnet: ipnet::IpNet) -> String {
    format!("{LEASE_PREFIX}{}", subnet_key(subnet))
}

/// Writes the leases in transactions of [`TXN_OPS`].
fn put_leases(lab: &Lab, leases: Vec<Lease>) {
    with_etcd(lab, move |mut client| {
        Box::pin(async move {
            for chunk in leases.chunks(TXN_OPS) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|l| etcd_client::TxnOp::put(lease_key(l.subnet), l.record.encode(), None))
                    .collect();
                client
                    .txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .expect("put leases");
            }
        })
    })
}

fn delete_leases(lab: &Lab, subnets: Vec<ipnet::IpNet>) {
    with_etcd(lab, move |mut client| {
        Box::pin(async move {
            for chunk in subnets.chunks(TXN_OPS) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|s| etcd_client::TxnOp::delete(lease_key(*s), None))
                    .collect();
                client
                    .txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .expect("delete leases");
            }
        })
    })
}

/// `count` bench subnets that no lab host holds, starting at index `from`.
fn free_subnets(lab: &Lab, from: usize, count: usize) -> Vec<usize> {
    let taken: BTreeSet<Ipv4Net> = lab
        .state
        .hosts
        .iter()
        .filter_map(|h| lab.state.host_subnet(h)?.parse().ok())
        .collect();
    (from..)
        .filter(|i| !taken.contains(&bench_subnet(*i)))
        .take(count)
        .collect()
}

fn wait_routes(lab: &Lab, want: usize) {
    for h in &lab.state.hosts {
        wait_for(
            &format!(
                "{want} agent routes on {} (log: {})",
                h.name,
                h.agent_log.display()
            ),
            PATIENCE,
            || (agent_route_count(&h.ns) == want).then_some(()),
        );
    }
}

/// Starts the agent of `host` and returns (time to /readyz 200, datapath writes reported).
fn timed_start(lab: &mut Lab, host: &str) -> (Duration, u64) {
    let start = Instant::now();
    lab.start_agent(host).unwrap_or_else(|e| panic!("{e}"));
    let h = lab.state.host(host).expect("host").clone();
    let took = loop {
        if lab.state.agent_ready(&h) {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "agent {host} not ready (log: {})",
            h.agent_log.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let status = lab.state.agent_status(&h).expect("agent /status");
    let writes = status["datapath_writes"]
        .as_u64()
        .expect("datapath_writes in /status");
    (took, writes)
}

/// Reads `ip monitor route` of a namespace line by line, each with the time it arrived.
struct RouteMonitor {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl RouteMonitor {
    fn start(ns: &str) -> RouteMonitor {
        let mut cmd = Command::new("ip");
        cmd.args(["monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        netns::in_netns(&mut cmd, ns).unwrap_or_else(|e| panic!("{e}"));
        let mut child = Child::spawn("ip monitor route", &mut cmd).expect("ip monitor");
        let stdout = child.inner.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        // `ip monitor` subscribes right after it starts; give it that moment.
        std::thread::sleep(Duration::from_millis(300));
        RouteMonitor { child, lines }
    }

    /// The arrival time of the first line, from now on, that `matches`.
    fn wait(&self, what: &str, matches: impl Fn(&str) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if matches(&line) => return at,
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

/// Puts (or deletes) one lease and returns the instant just before the request was sent.
fn timed_lease_change(lab: &Lab, lease: Lease, delete: bool) -> Instant {
    with_etcd(lab, move |mut client| {
        Box::pin(async move {
            let key = lease_key(lease.subnet);
            let sent = Instant::now();
            if delete {
                client.delete(key, None).await.expect("delete lease");
            } else {
                client
                    .put(key, lease.record.encode(), None)
                    .await
                    .expect("put lease");
            }
            sent
        })
    })
}

fn restart(s: &Settings, scratch: &Scratch) -> (Restart, Lab) {
    let mut lab = lab_up(
        &lab_spec(scratch, "vx", "vxlan", BENCH_NETWORK),
        s.keep_logs,
    );
    let hosts = lab.state.hosts.len();
    let indexes = free_subnets(&lab, 1, s.peers + s.changes);
    let (peer_indexes, change_indexes) = indexes.split_at(s.peers);
    let leases: Vec<Lease> = peer_indexes.iter().map(|i| peer_lease(*i)).collect();
    let subnets: Vec<ipnet::IpNet> = leases.iter().map(|l| l.subnet).collect();

    progress(&format!("injecting {} peer leases into etcd", s.peers));
    let start = Instant::now();
    put_leases(&lab, leases);
    let inject = start.elapsed();
    let want = s.peers + hosts - 1;
    wait_routes(&lab, want);
    let converge = start.elapsed();

    let mut r = Restart {
        peers: s.peers,
        inject_ms: ms(inject),
        converge_ms: ms(converge),
        cold_ready: Vec::new(),
        cold_writes: Vec::new(),
        warm_ready: Vec::new(),
        warm_writes: Vec::new(),
        route_added: Vec::new(),
        route_removed: Vec::new(),
    };
    let h1 = lab.state.host("h1").expect("h1").clone();
    let vtep = vtep_name(bench_config().backend.vni);
    for run in 1..=s.restarts {
        progress(&format!(
            "agent restart with {} peers, run {run}/{}",
            s.peers, s.restarts
        ));
        // Cold: the VTEP, and with it every neighbour, FDB entry and route, is gone.
        lab.stop_agent("h1", libc::SIGTERM)
            .unwrap_or_else(|e| panic!("{e}"));
        ip_in(&h1.ns, &["link", "del", &vtep]);
        assert_eq!(
            agent_route_count(&h1.ns),
            0,
            "routes left after deleting the VTEP"
        );
        let (took, writes) = timed_start(&mut lab, "h1");
        r.cold_ready.push(ms(took));
        r.cold_writes.push(writes);
        wait_routes(&lab, want);

        // Warm: SIGTERM leaves everything in place; the world is unchanged.
        lab.stop_agent("h1", libc::SIGTERM)
            .unwrap_or_else(|e| panic!("{e}"));
        let (took, writes) = timed_start(&mut lab, "h1");
        r.warm_ready.push(ms(took));
        r.warm_writes.push(writes);
    }

    if s.changes > 0 {
        progress(&format!(
            "lease changes with {} peers: {} additions and deletions",
            s.peers, s.changes
        ));
        let monitor = RouteMonitor::start(&h1.ns);
        for i in change_indexes {
            let lease = peer_lease(*i);
            let dst = format!("{} ", lease.subnet);
            monitor.drain();
            let sent = timed_lease_change(&lab, lease.clone(), false);
            let seen = monitor.wait(&format!("the route to {} on h1", lease.subnet), |l| {
                l.starts_with(&dst)
            });
            r.route_added.push(ms(seen.saturating_duration_since(sent)));
            std::thread::sleep(Duration::from_millis(100));
            monitor.drain();
            let sent = timed_lease_change(&lab, lease.clone(), true);
            let deleted = format!("Deleted {dst}");
            let seen = monitor.wait(
                &format!("the route to {} to go from h1", lease.subnet),
                |l| l.starts_with(&deleted),
            );
            r.route_removed
                .push(ms(seen.saturating_duration_since(sent)));
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(monitor.child);
    }

    progress("removing the injected peers");
    delete_leases(&lab, subnets);
    wait_routes(&lab, hosts - 1);
    (r, lab)
}

// ---------------------------------------------------------------------------------------
// Part 3: iperf3

/// One path: client and server namespaces and the address the client connects to.
struct Path3 {
    name: &'static str,
    client_ns: String,
    server_ns: String,
    server_ip: String,
    gbits: Vec<f64>,
}

fn workload(lab: &Lab, host: &str) -> (String, String) {
    let w = lab
        .state
        .workloads
        .iter()
        .find(|w| w.host == host)
        .unwrap_or_else(|| panic!("no workload on {host}"));
    (w.ns.clone(), w.ip.clone())
}

fn overlay_path(name: &'static str, lab: &Lab) -> Path3 {
    let (client_ns, _) = workload(lab, "h1");
    let (server_ns, server_ip) = workload(lab, "h2");
    Path3 {
        name,
        client_ns,
        server_ns,
        server_ip,
        gbits: Vec::new(),
    }
}

fn hand_built(scratch: &Scratch, short: &str, mode: &str) -> String {
    let prefix = scratch.ns(short);
    progress(&format!("hand-built {mode} topology ({prefix}-*)"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/hand-built.sh");
    netns::run(Command::new("bash").arg(&script).args([&prefix, mode]))
        .unwrap_or_else(|e| panic!("{e}"));
    prefix
}

fn hand_path(name: &'static str, prefix: &str) -> Path3 {
    Path3 {
        name,
        client_ns: format!("{prefix}-h1-w1"),
        server_ns: format!("{prefix}-h2-w1"),
        server_ip: "10.244.2.10".into(),
        gbits: Vec::new(),
    }
}

fn reachable(ns: &str, ip: &str) -> bool {
    (0..30).any(|_| {
        output_in(ns, "ping", &["-c", "1", "-W", "1", ip])
            .status
            .success()
    })
}

/// One iperf3 TCP run; retries while the server is not yet listening.
fn iperf(path: &Path3, seconds: usize) -> f64 {
    let secs = seconds.to_string();
    for _ in 0..50 {
        let out = output_in(
            &path.client_ns,
            "iperf3",
            &["-c", &path.server_ip, "-t", &secs, "-J"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        let error = json["error"].as_str().unwrap_or("no JSON output");
        if !error.contains("refused") && !error.contains("busy") {
            panic!("iperf3 {} -> {}: {error}", path.name, path.server_ip);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("iperf3 server for {} never accepted", path.name);
}

fn throughput(s: &Settings, scratch: &Scratch, vxlan_lab: Option<Lab>) -> Vec<Path3> {
    let vx = vxlan_lab.unwrap_or_else(|| {
        lab_up(
            &lab_spec(scratch, "vx", "vxlan", BENCH_NETWORK),
            s.keep_logs,
        )
    });
    let hg = lab_up(
        &lab_spec(scratch, "hg", "host-gw", "10.244.0.0/16"),
        s.keep_logs,
    );
    let hand_vx = hand_built(scratch, "hv", "vxlan");
    let hand_hg = hand_built(scratch, "hh", "host-gw");
    let h1 = vx.state.host("h1").expect("h1");
    let h2 = vx.state.host("h2").expect("h2");
    let mut paths = vec![
        Path3 {
            name: "underlay, host to host",
            client_ns: h1.ns.clone(),
            server_ns: h2.ns.clone(),
            server_ip: h2.underlay_ip.clone(),
            gbits: Vec::new(),
        },
        overlay_path("Overlay vxlan", &vx),
        hand_path("hand-built vxlan (ip commands)", &hand_vx),
        overlay_path("Overlay host-gw", &hg),
        hand_path("hand-built host-gw (ip commands)", &hand_hg),
    ];
    let mut servers = Vec::new();
    for p in &paths {
        assert!(
            reachable(&p.client_ns, &p.server_ip),
            "{}: {} cannot reach {}",
            p.name,
            p.client_ns,
            p.server_ip
        );
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        netns::in_netns(&mut cmd, &p.server_ns).unwrap_or_else(|e| panic!("{e}"));
        servers.push(Child::spawn(format!("iperf3 -s ({})", p.name), &mut cmd).expect("iperf3"));
    }
    // Each round starts one path later, so no path always runs right after the same one.
    let n = paths.len();
    for round in 0..s.iperf_runs {
        for k in 0..n {
            let p = &mut paths[(round + k) % n];
            progress(&format!(
                "iperf3 {} s, {}, run {}/{}",
                s.iperf_seconds,
                p.name,
                round + 1,
                s.iperf_runs
            ));
            let g = iperf(p, s.iperf_seconds);
            p.gbits.push(g);
        }
    }
    drop(servers);
    drop(hg);
    drop(vx);
    paths
}

// ---------------------------------------------------------------------------------------
// Report

/// The 1-minute load average, read before the run: a busy machine skews every number.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn machine(load_before: &str) -> String {
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, kernel {kernel}, load average {load_before} before the run")
}

fn report_programming(p: &Programming, peers: usize) {
    let (nl, full, batch) = (
        median(&p.netlink_apply),
        median(&p.netlink_reconcile),
        median(&p.ip_batch),
    );
    println!(
        "### Programming {peers} vxlan peers ({} entries) from an empty kernel, {} runs each\n",
        p.entries,
        p.ip_batch.len()
    );
    println!("| method | median ms | runs (ms) |");
    println!("| --- | ---: | --- |");
    println!(
        "| Overlay netlink module: apply the diff ({} requests) | {nl:.1} | {} |",
        p.netlink_writes,
        list(&p.netlink_apply, 1)
    );
    println!(
        "| Overlay full reconcile: observe + plan + diff + apply | {full:.1} | {} |",
        list(&p.netlink_reconcile, 1)
    );
    println!(
        "| `bridge -batch` (FDB) + `ip -batch` (neighbours, routes) | {batch:.1} | {} |",
        list(&p.ip_batch, 1)
    );
    println!(
        "\nOverlay's apply takes {:.2}x the time of `ip -batch` ({:.2}x for the full reconcile).\n",
        nl / batch,
        full / batch
    );
}

fn report_restart(r: &Restart) {
    let writes = |w: &[u64]| w.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    println!(
        "### Agent start with {} peers on a lab host, {} runs each\n",
        r.peers,
        r.cold_ready.len()
    );
    println!("| start | median ms to /readyz 200 | runs (ms) | datapath writes per run |");
    println!("| --- | ---: | --- | --- |");
    println!(
        "| cold: VTEP and all entries gone | {:.0} | {} | {} |",
        median(&r.cold_ready),
        list(&r.cold_ready, 0),
        writes(&r.cold_writes)
    );
    println!(
        "| restart (SIGTERM, unchanged world) | {:.0} | {} | {} |",
        median(&r.warm_ready),
        list(&r.warm_ready, 0),
        writes(&r.warm_writes)
    );
    println!(
        "\nInjecting the {} leases into etcd took {:.0} ms; both hosts had every route {:.0} ms \
         after the injection started.\n",
        r.peers, r.inject_ms, r.converge_ms
    );
    if !r.route_added.is_empty() {
        let max = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
        println!(
            "| lease change in etcd, {} peers programmed | median ms | max ms | runs |",
            r.peers
        );
        println!("| --- | ---: | ---: | ---: |");
        println!(
            "| lease added -> route on the host | {:.1} | {:.1} | {} |",
            median(&r.route_added),
            max(&r.route_added),
            r.route_added.len()
        );
        println!(
            "| lease deleted -> route gone | {:.1} | {:.1} | {} |\n",
            median(&r.route_removed),
            max(&r.route_removed),
            r.route_removed.len()
        );
    }
}

fn report_throughput(paths: &[Path3], s: &Settings) {
    println!(
        "### iperf3 TCP, one stream, {} s, {} runs per path (round-robin, rotated)\n",
        s.iperf_seconds, s.iperf_runs
    );
    println!("| path | median Gbit/s | runs (Gbit/s) | vs underlay |");
    println!("| --- | ---: | --- | ---: |");
    let underlay = median(&paths[0].gbits);
    for p in paths {
        let m = median(&p.gbits);
        println!(
            "| {} | {m:.2} | {} | {:.2}x |",
            p.name,
            list(&p.gbits, 2),
            m / underlay
        );
    }
    println!();
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let s = Settings::from_env();
    if !is_root() {
        eprintln!("SKIPPED datapath bench: needs root for network namespaces");
        return;
    }
    let missing: Vec<&str> = ["ip", "bridge", "iperf3", "ping", "etcd"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED datapath bench: missing {} (make deps installs them)",
            missing.join(", ")
        );
        return;
    }
    let load_before = load_average();
    remove_leftovers();
    let scratch = Scratch::new(s.keep_logs);
    clean_up_on_signals(scratch.prefix.clone(), scratch.dir.clone(), s.keep_logs);
    let started = Instant::now();
    // Checks the binaries exist before anything is built (panics with how to build them).
    if s.wants("restart") || s.wants("iperf") {
        for b in ["overlay-agent", "overlay-controller", "overlayctl"] {
            bin_path(b);
        }
    }

    let programming = s.wants("programming").then(|| programming(&s, &scratch));
    let (restart, vx_lab) = if s.wants("restart") {
        let (r, lab) = restart(&s, &scratch);
        (Some(r), Some(lab))
    } else {
        (None, None)
    };
    let paths = if s.wants("iperf") {
        Some(throughput(&s, &scratch, vx_lab))
    } else {
        drop(vx_lab);
        None
    };

    println!("## Datapath results ({})\n", machine(&load_before));
    if let Some(p) = &programming {
        report_programming(p, s.peers);
    }
    if let Some(r) = &restart {
        report_restart(r);
    }
    if let Some(paths) = &paths {
        report_throughput(paths, &s);
    }
    println!(
        "Whole run: {:.0} s. Reproduce as root with `make bench-datapath` (settings: \
         `OVERLAY_BENCH_*`, see tests/benches/datapath.rs).",
        started.elapsed().as_secs_f64()
    );
}
