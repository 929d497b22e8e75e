//! The fault-injection suite: one fault per test, injected into real processes (etcd,
//! controllers, agents, the kernel's datapath in network namespaces), each asserting that
//! nothing is lost.
//!
//! Design notes:
//! - Loss is measured by the kernel, not sampled: `ping -i 0.05` runs in both directions
//!   through the whole fault, and every `icmp_seq` it sent must have come back (but those
//!   of the last second before ping is stopped, which no fault can be blamed for).
//! - "Unchanged" is compared exactly: the agent-owned kernel state as `ip`/`bridge` print
//!   it, the agent's count of datapath writes, the modification revision of every lease
//!   key and of the config in etcd.
//! - Faults that leave debris on purpose (a controller killed between granting an etcd
//!   lease and attaching it to a key) are counted as they happen; the test then waits for
//!   the system to clean up rather than asserting a moment's picture.
//! - No timing assertions: every wait polls up to a generous deadline. How long things
//!   took is reported, never asserted.
//! - Each scenario prints a table of its counts; with `OVERLAY_FAULTS_REPORT=FILE` the
//!   tables are also appended to FILE (`make faults` does that; docs/reliability.md holds
//!   a real run).
//!
//! The lab scenarios (etcd outage, agent kills, underlay cut) need root for namespaces and
//! go through the lab library, which starts everything with the lab's TLS setup; the
//! control-plane ones (controller kills, slow watchers, bad input) need only etcd and talk
//! plaintext (`--insecure`) to controllers of their own, some through raw gRPC clients
//! that do what no well-behaved client would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use overlay_core::watch::LeaseCache;
use overlay_lab::{netns, Lab, LabSpec, Service};
use overlay_proto::v1::{self, admin_client::AdminClient, agent_client::AgentClient};
use overlay_tests::cluster::{overlayctl, Controller};
use overlay_tests::labs::{self, dump, lab_or_skip, ping, run_in, subnet_of, workload_ip};
use overlay_tests::{bin_path, is_root, wait_until, Etcd};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Reporting

/// The counts of one scenario, printed as a table when it ends.
struct Summary {
    title: String,
    started: Instant,
    rows: Vec<(String, String)>,
}

impl Summary {
    fn new(title: &str) -> Summary {
        Summary {
            title: title.to_string(),
            started: Instant::now(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, what: &str, value: impl Display) {
        self.rows.push((what.to_string(), value.to_string()));
    }

    fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n| | |\n|---|---|\n", self.title);
        for (what, value) in &self.rows {
            s += &format!("| {what} | {value} |\n");
        }
        s += &format!(
            "| scenario wall time | {:.0} s |\n",
            self.started.elapsed().as_secs_f64()
        );
        s
    }

    /// Prints the table, and appends it to `$OVERLAY_FAULTS_REPORT` when set.
    fn finish(&self) {
        let table = self.markdown();
        println!("\n{table}");
        if let Some(path) = std::env::var_os("OVERLAY_FAULTS_REPORT") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("OVERLAY_FAULTS_REPORT is writable");
            writeln!(f, "{table}").expect("write the report");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Lab helpers (root)

fn lab(test: &str, tweak: impl FnOnce(&mut LabSpec)) -> Option<(Lab, tempfile::TempDir)> {
    lab_or_skip(test, tweak)
}

fn ping_eventually(lab: &Lab, from: &str, to: &str) -> bool {
    labs::ping_eventually(lab, from, to, PATIENCE)
}

/// Lines of the agent-owned state that mention `needle` (a subnet or an underlay IP).
fn entries_for(lab: &Lab, host: &str, needle: &str) -> Vec<String> {
    let mut s = run_in(lab, host, &["ip", "route", "show", "proto", "79"]);
    s += &run_in(lab, host, &["bridge", "fdb", "show", "dev", "ovl.1"]);
    s.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn agent_status(lab: &Lab, host: &str) -> serde_json::Value {
    lab.state
        .agent_status(lab.state.host(host).unwrap())
        .expect("agent status")
}

fn datapath_writes(lab: &Lab, host: &str) -> u64 {
    agent_status(lab, host)["datapath_writes"]
        .as_u64()
        .expect("datapath_writes")
}

/// The leases as `overlayctl leases` lists them: subnet -> node.
fn lab_leases(lab: &Lab) -> Option<BTreeMap<String, String>> {
    let text = lab
        .overlayctl(&["leases".into(), "-o".into(), "json".into()])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|l| {
                (
                    l["subnet"].as_str().unwrap_or_default().to_string(),
                    l["node"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// An agent's counter from `/metrics` (every line starting with `name`, summed).
fn agent_metric(lab: &Lab, host: &str, name: &str) -> u64 {
    let ns = &lab.state.host(host).unwrap().ns;
    let (_, body) =
        overlay_lab::http_get_in(ns, "127.0.0.1", overlay_lab::AGENT_HEALTH_PORT, "/metrics")
            .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

const RENEWALS_OK: &str = "overlay_agent_lease_renewals_total{result=\"ok\"}";
const RENEWALS_FAILED: &str = "overlay_agent_lease_renewals_total{result=\"error\"}";

fn renewals(lab: &Lab, name: &str) -> u64 {
    ["h1", "h2"]
        .iter()
        .map(|h| agent_metric(lab, h, name))
        .sum()
}

fn controller_ready(lab: &Lab) -> Option<u16> {
    overlay_lab::http_get_in(&lab.state.underlay_ns, "127.0.0.1", 7401, "/readyz").map(|(c, _)| c)
}

/// Packets sent in the last second before a [`Pinger`] is stopped.
const PING_UNJUDGED: u64 = 20;

/// `ping -i 0.05` from a namespace, stopped with SIGINT.
struct Pinger {
    child: std::process::Child,
    what: String,
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Copy, Default)]
struct PingCount {
    sent: u64,
    lost: u64,
}

impl Pinger {
    fn start(lab: &Lab, from: &str, to_workload: &str) -> Pinger {
        let ns = lab.state.target_ns(from).unwrap();
        let to = workload_ip(lab, to_workload);
        let mut cmd = Command::new("ping");
        cmd.args(["-n", "-i", "0.05", "-W", "1", &to])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        netns::in_netns(&mut cmd, &ns).unwrap();
        Pinger {
            child: cmd.spawn().expect("ping"),
            what: format!("{from} -> {to_workload}"),
        }
    }

    /// Sent (but the last second's), and lost: every sequence number among them without
    /// a reply. The last second's packets cannot be judged: on SIGINT ping stops at once,
    /// and on a busy machine some replies it had not read yet would count as lost. Every
    /// scenario stops its pingers seconds after its fault has ended.
    fn stop(self) -> PingCount {
        // SAFETY: kill(2) on our child; SIGINT makes ping print its summary.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("ping {}: {text}", self.what));
        let sent: u64 = summary
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ping summary: {summary}"));
        let replied: BTreeSet<u64> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("icmp_seq="))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        let judged = sent.saturating_sub(PING_UNJUDGED);
        let lost = (1..=judged).filter(|s| !replied.contains(s)).count() as u64;
        PingCount { sent: judged, lost }
    }
}

// ---------------------------------------------------------------------------------------
// Control-plane helpers (etcd only)

fn grpc_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("controller URL")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_lazy()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn etcd_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint.clone()], None)
        .await
        .expect("connect to etcd")
}

/// Lease keys, modification revisions and config: see [`EtcdView::written`].
type Written<'a> = (
    &'a BTreeMap<String, (String, i64)>,
    &'a BTreeMap<String, i64>,
    &'a str,
);

/// What etcd holds for the cluster (prefix `/overlay`), read with a real etcd client:
/// lease keys, the config, every etcd lease and which of them a key uses.
#[derive(Debug, Clone, PartialEq)]
struct EtcdView {
    /// Lease keys: key -> (node, etcd lease).
    keys: BTreeMap<String, (String, i64)>,
    /// The modification revision of every lease key and of the config: what a write to
    /// either would change (the store's revision also moves with unrelated writes, such
    /// as the controllers' leader election).
    mod_revisions: BTreeMap<String, i64>,
    /// Every etcd lease, and those some key (of any prefix) is attached to.
    leases: BTreeSet<i64>,
    attached: BTreeSet<i64>,
    revision: i64,
    config: String,
}

impl EtcdView {
    async fn read(etcd: &mut etcd_client::Client) -> EtcdView {
        let got = etcd
            .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
            .await
            .expect("etcd get");
        let revision = got.header().expect("header").revision();
        let mut view = EtcdView {
            keys: BTreeMap::new(),
            mod_revisions: BTreeMap::new(),
            leases: BTreeSet::new(),
            attached: BTreeSet::new(),
            revision,
            config: String::new(),
        };
        for kv in got.kvs() {
            let key = kv.key_str().unwrap_or_default().to_string();
            if kv.lease() != 0 {
                view.attached.insert(kv.lease());
            }
            if key.starts_with("/overlay/leases/") {
                let record: serde_json::Value =
                    serde_json::from_slice(kv.value()).unwrap_or_default();
                let node = record["node"].as_str().unwrap_or_default().to_string();
                view.keys.insert(key.clone(), (node, kv.lease()));
                view.mod_revisions.insert(key, kv.mod_revision());
            } else if key == "/overlay/config" {
                view.config = String::from_utf8_lossy(kv.value()).into_owned();
                view.mod_revisions.insert(key, kv.mod_revision());
            }
        }
        view.leases = etcd
            .leases()
            .await
            .expect("etcd lease list")
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        view
    }

    /// etcd leases that no key is attached to.
    fn orphaned_leases(&self) -> BTreeSet<i64> {
        self.leases.difference(&self.attached).copied().collect()
    }

    /// What no rejected request may change: the leases and the config, down to their
    /// modification revisions.
    fn written(&self) -> Written<'_> {
        (&self.keys, &self.mod_revisions, &self.config)
    }
}

fn set_config(url: &str, args: &[&str]) {
    let mut all = vec!["config", "set"];
    all.extend_from_slice(args);
    let out = overlayctl(url, &all);
    assert!(
        out.status.success(),
        "config set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A controller's counter from `/metrics`.
fn metric(c: &Controller, name: &str) -> u64 {
    let (_, body) = overlay_tests::cluster::http_get(c.health_port, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Whether a status is worth trying again on the other controller: no answer from this
/// one (it died mid-call), or a lost compare-and-set race (`Aborted`), as agents do.
fn is_retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

fn doc_ip(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("198.51.100.{}", 1 + (i / 2) % 254)
    } else {
        format!("203.0.113.{}", 1 + (i / 2) % 254)
    }
}

// ---------------------------------------------------------------------------------------
// 1. etcd down for 30 s

#[test]
fn etcd_down_for_30s_loses_no_packet_lease_or_kernel_entry() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let test = "etcd_down_for_30s_loses_no_packet_lease_or_kernel_entry";
    // A short lease TTL, so that agents renew (every 3 s) through the outage.
    let Some((mut lab, _dir)) = lab(test, |s| {
        s.hosts = 2;
        s.lease_ttl = Some("10s".into());
    }) else {
        return;
    };
    let mut summary = Summary::new(
        "1. etcd killed (SIGKILL) for 30 s, restarted on its data dir (lease TTL 10 s)",
    );
    let (w1, w2) = (workload_ip(&lab, "h1/w1"), workload_ip(&lab, "h2/w1"));
    assert!(ping_eventually(&lab, "h1/w1", &w2) && ping_eventually(&lab, "h2/w1", &w1));
    let leases_before = lab_leases(&lab).expect("leases");
    let dumps_before = [dump(&lab, "h1"), dump(&lab, "h2")];
    let writes_before = [datapath_writes(&lab, "h1"), datapath_writes(&lab, "h2")];

    let out = Pinger::start(&lab, "h1/w1", "h2/w1");
    let back = Pinger::start(&lab, "h2/w1", "h1/w1");
    std::thread::sleep(Duration::from_secs(1));
    let failed_before = renewals(&lab, RENEWALS_FAILED);
    let stopped = lab.stop_service(Service::Etcd, libc::SIGKILL).unwrap();
    let down_at = Instant::now();
    // Midway, the control plane is down and says so; the datapath is untouched.
    std::thread::sleep(OUTAGE / 2);
    let readyz_during = controller_ready(&lab);
    let dumps_during = [dump(&lab, "h1"), dump(&lab, "h2")];
    let ready_agents_during = ["h1", "h2"]
        .iter()
        .filter(|h| lab.state.agent_ready(lab.state.host(h).unwrap()))
        .count();
    std::thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
    let failed_during = renewals(&lab, RENEWALS_FAILED) - failed_before;
    let ok_at_restart = renewals(&lab, RENEWALS_OK);
    lab.start_service(stopped).unwrap();
    let outage = down_at.elapsed();
    let back_at = Instant::now();
    wait_until(PATIENCE, || {
        (controller_ready(&lab) == Some(200)).then_some(())
    })
    .expect("the controller is ready again after etcd returns");
    let controller_back_after = back_at.elapsed();
    // Leases are still held, and agents renew them again (the lease stays listed well
    // past a renewal interval).
    let leases_after = wait_until(PATIENCE, || lab_leases(&lab)).expect("leases after");
    let renewed_after = wait_until(PATIENCE, || {
        (renewals(&lab, RENEWALS_OK) >= ok_at_restart + 2).then_some(())
    })
    .is_some();
    std::thread::sleep(Duration::from_secs(2));
    let (out, back) = (out.stop(), back.stop());

    let dumps_after = [dump(&lab, "h1"), dump(&lab, "h2")];
    let writes_after = [datapath_writes(&lab, "h1"), datapath_writes(&lab, "h2")];
    let changed_entries = dumps_before
        .iter()
        .zip(dumps_during.iter().zip(&dumps_after))
        .map(|(b, (d, a))| {
            let lines = |s: &str| s.lines().map(str::to_string).collect::<BTreeSet<_>>();
            lines(b).symmetric_difference(&lines(d)).count()
                + lines(b).symmetric_difference(&lines(a)).count()
        })
        .sum::<usize>();

    // A new host joins, and new workloads on old and new hosts reach each other.
    let joined = lab.join_host().unwrap();
    lab.wait_agent_ready(&joined, PATIENCE).unwrap();
    lab.add_workload(&joined, "w1").unwrap();
    lab.add_workload("h1", "w2").unwrap();
    let new_w = workload_ip(&lab, &format!("{joined}/w1"));
    let new_h1 = workload_ip(&lab, "h1/w2");
    let new_join_ok = ping_eventually(&lab, "h2/w1", &new_w)
        && ping_eventually(&lab, &format!("{joined}/w1"), &new_h1);
    let leases_final = lab_leases(&lab).unwrap_or_default();

    summary.row(
        "faults injected",
        "1 (etcd SIGKILL, restart on the same data dir)",
    );
    summary.row("outage", format!("{:.1} s", outage.as_secs_f64()));
    summary.row(
        "controller /readyz during the outage",
        readyz_during.map_or("no answer".into(), |c| c.to_string()),
    );
    summary.row(
        "agents still ready during the outage",
        format!("{ready_agents_during} of 2"),
    );
    summary.row(
        "lease renewals failed during the outage (retried)",
        failed_during,
    );
    summary.row(
        "agents renewed again after etcd returned",
        if renewed_after { "yes" } else { "NO" },
    );
    summary.row(
        "controller ready again after etcd restart",
        format!("{:.1} s", controller_back_after.as_secs_f64()),
    );
    summary.row(
        "packets h1/w1 -> h2/w1 sent / lost",
        format!("{} / {}", out.sent, out.lost),
    );
    summary.row(
        "packets h2/w1 -> h1/w1 sent / lost",
        format!("{} / {}", back.sent, back.lost),
    );
    summary.row("kernel entries changed (during + after)", changed_entries);
    summary.row(
        "datapath writes during the outage",
        writes_after[0] - writes_before[0] + writes_after[1] - writes_before[1],
    );
    summary.row(
        "leases before / after / lost",
        format!(
            "{} / {} / {}",
            leases_before.len(),
            leases_after.len(),
            leases_before
                .iter()
                .filter(|(s, n)| leases_after.get(*s) != Some(n))
                .count()
        ),
    );
    summary.row(
        "new host + workloads joined after etcd returned",
        if new_join_ok { "yes" } else { "NO" },
    );
    summary.finish();

    assert!(
        out.sent > 400 && back.sent > 400,
        "ping ran through the outage"
    );
    assert_eq!(
        out.lost, 0,
        "h1/w1 -> h2/w1 lost packets while etcd was down"
    );
    assert_eq!(
        back.lost, 0,
        "h2/w1 -> h1/w1 lost packets while etcd was down"
    );
    assert_ne!(
        readyz_during,
        Some(200),
        "the controller reports etcd's absence"
    );
    assert_eq!(
        ready_agents_during, 2,
        "agents stay ready without the control plane"
    );
    assert_eq!(
        dumps_during, dumps_before,
        "kernel state changed during the outage"
    );
    assert_eq!(
        dumps_after, dumps_before,
        "kernel state changed by the outage"
    );
    assert_eq!(writes_after, writes_before, "agents wrote to the kernel");
    assert_eq!(
        leases_after, leases_before,
        "leases were lost across the etcd restart"
    );
    assert!(failed_during > 0, "agents tried to renew during the outage");
    assert!(renewed_after, "agents renew again once etcd is back");
    assert!(
        new_join_ok,
        "a new host and workloads joined after etcd returned"
    );
    assert_eq!(leases_final.len(), 3, "{leases_final:?}");
}

// ---------------------------------------------------------------------------------------
// 3. An agent killed with SIGKILL

#[test]
fn an_agent_killed_with_sigkill_keeps_its_subnet_and_loses_no_packet() {
    let test = "an_agent_killed_with_sigkill_keeps_its_subnet_and_loses_no_packet";
    let Some((mut lab, _dir)) = lab(test, |s| s.hosts = 2) else {
        return;
    };
    let mut summary = Summary::new("3. agent killed with SIGKILL and restarted");
    let (w1, w2) = (workload_ip(&lab, "h1/w1"), workload_ip(&lab, "h2/w1"));
    assert!(ping_eventually(&lab, "h1/w1", &w2) && ping_eventually(&lab, "h2/w1", &w1));
    let subnets = [subnet_of(&lab, "h1"), subnet_of(&lab, "h2")];
    let dumps = [dump(&lab, "h1"), dump(&lab, "h2")];
    let leases_before = lab_leases(&lab).unwrap();

    let out = Pinger::start(&lab, "h1/w1", "h2/w1");
    let back = Pinger::start(&lab, "h2/w1", "h1/w1");
    std::thread::sleep(Duration::from_millis(500));
    // Killed when settled, killed again right after starting (before it is ready), and
    // the other host's agent too.
    let plan: [(&str, Option<Duration>); 4] = [
        ("h1", None),
        ("h1", Some(Duration::from_millis(100))),
        ("h2", None),
        ("h1", None),
    ];
    let mut kills = 0;
    let mut writes_after_restart = 0;
    let mut same_subnet = 0;
    let mut restarts = 0;
    for (host, early) in plan {
        lab.stop_agent(host, libc::SIGKILL).unwrap();
        kills += 1;
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(host).unwrap();
        restarts += 1;
        if let Some(after) = early {
            std::thread::sleep(after);
            lab.stop_agent(host, libc::SIGKILL).unwrap();
            kills += 1;
            lab.start_agent(host).unwrap();
            restarts += 1;
        }
        lab.wait_agent_ready(host, PATIENCE).unwrap();
        let i = if host == "h1" { 0 } else { 1 };
        if subnet_of(&lab, host) == subnets[i] {
            same_subnet += 1;
        }
        // Two full reconciles (resync every 2 s) later it still has written nothing.
        let ok = "overlay_agent_reconciles_total{result=\"ok\"}";
        let done = agent_metric(&lab, host, ok);
        wait_until(PATIENCE, || {
            (agent_metric(&lab, host, ok) >= done + 2).then_some(())
        })
        .unwrap_or_else(|| panic!("the restarted agent on {host} did not reconcile twice"));
        let w = datapath_writes(&lab, host);
        writes_after_restart += w;
        assert_eq!(w, 0, "the restarted agent on {host} wrote to the kernel");
        assert_eq!(dump(&lab, host), dumps[i], "kernel state of {host} changed");
    }
    let (out, back) = (out.stop(), back.stop());
    let leases_after = lab_leases(&lab).unwrap();

    summary.row(
        "faults injected",
        format!("{kills} agent SIGKILLs (1 of them 100 ms after its start)"),
    );
    summary.row("restarts", restarts);
    summary.row(
        "same subnet after restart",
        format!("{same_subnet} of {}", plan.len()),
    );
    summary.row("datapath writes by restarted agents", writes_after_restart);
    summary.row(
        "packets h1/w1 -> h2/w1 sent / lost",
        format!("{} / {}", out.sent, out.lost),
    );
    summary.row(
        "packets h2/w1 -> h1/w1 sent / lost",
        format!("{} / {}", back.sent, back.lost),
    );
    summary.row(
        "leases before / after",
        format!("{} / {}", leases_before.len(), leases_after.len()),
    );
    summary.finish();

    assert_eq!(
        same_subnet,
        plan.len(),
        "an agent came back with another subnet"
    );
    assert_eq!(
        out.lost, 0,
        "h1/w1 -> h2/w1 lost packets across agent kills"
    );
    assert_eq!(
        back.lost, 0,
        "h2/w1 -> h1/w1 lost packets across agent kills"
    );
    assert_eq!(leases_after, leases_before, "leases changed");
}

// ---------------------------------------------------------------------------------------
// 4. A host's underlay cut for longer than its lease TTL

#[test]
fn a_host_cut_off_past_its_lease_ttl_drops_out_everywhere_and_rejoins() {
    let test = "a_host_cut_off_past_its_lease_ttl_drops_out_everywhere_and_rejoins";
    let Some((lab, _dir)) = lab(test, |s| {
        s.hosts = 3;
        s.lease_ttl = Some("3s".into());
    }) else {
        return;
    };
    let mut summary = Summary::new("4. underlay link of h3 cut past its lease TTL (3 s)");
    for (from, to) in [("h1/w1", "h3/w1"), ("h3/w1", "h1/w1"), ("h2/w1", "h3/w1")] {
        assert!(
            ping_eventually(&lab, from, &workload_ip(&lab, to)),
            "{from} -> {to}"
        );
    }
    let s3 = subnet_of(&lab, "h3");
    let h3_ip = lab.state.host("h3").unwrap().underlay_ip.clone();
    let during = Pinger::start(&lab, "h1/w1", "h3/w1");
    std::thread::sleep(Duration::from_millis(500));

    lab.set_underlay_link("h3", false).unwrap();
    let cut_at = Instant::now();
    let expired = wait_until(PATIENCE, || {
        let leases = lab_leases(&lab)?;
        (!leases.contains_key(&s3)).then_some(cut_at.elapsed())
    })
    .expect("h3's lease expired while it was cut off");
    let mut cleaned = Vec::new();
    for h in ["h1", "h2"] {
        wait_until(PATIENCE, || {
            (entries_for(&lab, h, &s3).is_empty() && entries_for(&lab, h, &h3_ip).is_empty())
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{h} kept entries for cut-off h3: {:?} {:?}",
                entries_for(&lab, h, &s3),
                entries_for(&lab, h, &h3_ip)
            )
        });
        cleaned.push(h);
    }
    let removed_everywhere = cut_at.elapsed();
    let unreachable_while_cut = !ping(&lab, "h2/w1", &workload_ip(&lab, "h3/w1"));
    // Cut for at least twice the TTL in any case.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(cut_at.elapsed()));
    lab.set_underlay_link("h3", true).unwrap();
    let cut = cut_at.elapsed();
    let restored_at = Instant::now();

    let back = wait_until(PATIENCE, || {
        let leases = lab_leases(&lab)?;
        leases
            .iter()
            .find(|(_, n)| n.as_str() == "h3")
            .map(|(s, _)| s.clone())
    })
    .expect("h3 acquired a lease again");
    for h in ["h1", "h2"] {
        wait_until(PATIENCE, || {
            (!entries_for(&lab, h, &back).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("{h} has no route to the returned h3 ({back})"));
    }
    let mut resumed = 0;
    for (from, to) in [("h1/w1", "h3/w1"), ("h3/w1", "h1/w1"), ("h2/w1", "h3/w1")] {
        if ping_eventually(&lab, from, &workload_ip(&lab, to)) {
            resumed += 1;
        }
    }
    let rejoined_after = restored_at.elapsed();
    let during = during.stop();
    // Once back, steady traffic again loses nothing.
    let steady = Pinger::start(&lab, "h1/w1", "h3/w1");
    let steady_back = Pinger::start(&lab, "h3/w1", "h2/w1");
    std::thread::sleep(Duration::from_secs(3));
    let (steady, steady_back) = (steady.stop(), steady_back.stop());

    summary.row(
        "faults injected",
        "1 (h3's bridge port in the underlay set down)",
    );
    summary.row("cut lasted", format!("{:.1} s", cut.as_secs_f64()));
    summary.row(
        "h3's lease gone after",
        format!("{:.1} s", expired.as_secs_f64()),
    );
    summary.row(
        "h3's routes/FDB entries gone from h1 and h2 after",
        format!("{:.1} s", removed_everywhere.as_secs_f64()),
    );
    summary.row("h3 unreachable while cut", unreachable_while_cut);
    summary.row(
        "h3 rejoined with",
        format!(
            "{back} ({})",
            if back == s3 {
                "same subnet"
            } else {
                "another subnet"
            }
        ),
    );
    summary.row(
        "traffic resumed after",
        format!("{:.1} s", rejoined_after.as_secs_f64()),
    );
    summary.row("paths working again", format!("{resumed} of 3"));
    summary.row(
        "packets h1/w1 -> h3/w1 across the cut sent / lost (loss expected)",
        format!("{} / {}", during.sent, during.lost),
    );
    summary.row(
        "packets after rejoin sent / lost",
        format!(
            "{} / {}",
            steady.sent + steady_back.sent,
            steady.lost + steady_back.lost
        ),
    );
    summary.finish();

    assert_eq!(cleaned, ["h1", "h2"]);
    assert!(unreachable_while_cut, "the cut did cut");
    assert_eq!(back, s3, "h3 got its subnet back (it was free)");
    assert_eq!(resumed, 3, "traffic to and from h3 resumed");
    assert_eq!(
        steady.lost + steady_back.lost,
        0,
        "packets lost after the rejoin"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Controllers killed with SIGKILL during join bursts

const JOIN_ROUNDS: usize = 10;
const JOINS_PER_ROUND: usize = 100;

#[derive(Default)]
struct JoinCounts {
    attempts: AtomicU64,
    failovers: AtomicU64,
    done: AtomicUsize,
}

/// One node joining as an agent does: AcquireLease, on a transport failure the other
/// controller, until a lease comes back.
async fn join(
    controllers: Arc<[Channel; 2]>,
    first: usize,
    node: String,
    public_ip: String,
    counts: Arc<JoinCounts>,
) -> Result<(String, String), String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut which = first;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        counts.attempts.fetch_add(1, Ordering::Relaxed);
        let request = v1::AcquireLeaseRequest {
            node: node.clone(),
            public_ip: public_ip.clone(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        };
        match AgentClient::new(controllers[which].clone())
            .acquire_lease(request)
            .await
        {
            Ok(r) => {
                counts.done.fetch_add(1, Ordering::Relaxed);
                let lease = r.into_inner().lease.ok_or("no lease in the answer")?;
                return Ok((node, lease.subnet));
            }
            Err(s) if is_retryable(&s) => {
                last = format!("{:?}: {}", s.code(), s.message());
                which = 1 - which;
                counts.failovers.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(format!("{node}: {:?}: {}", s.code(), s.message())),
        }
    }
    Err(format!("{node}: no lease within {PATIENCE:?}: {last}"))
}

/// Keeps every joined lease alive, as the agents would, through either controller.
async fn renew_all(
    controllers: Arc<[Channel; 2]>,
    held: Arc<Mutex<Vec<(String, String)>>>,
    every: Duration,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let leases = held.lock().unwrap().clone();
        futures::stream::iter(leases)
            .for_each_concurrent(16, |(node, subnet)| {
                let controllers = controllers.clone();
                let lost = lost.clone();
                async move {
                    for attempt in 0..20 {
                        let req = v1::RenewLeaseRequest {
                            node: node.clone(),
                            subnet: subnet.clone(),
                        };
                        match AgentClient::new(controllers[attempt % 2].clone())
                            .renew_lease(req)
                            .await
                        {
                            Ok(_) => return,
                            Err(s) if is_retryable(&s) => {
                                tokio::time::sleep(Duration::from_millis(100)).await
                            }
                            Err(s) => {
                                lost.lock().unwrap().push(format!(
                                    "{node} {subnet}: {:?}: {}",
                                    s.code(),
                                    s.message()
                                ));
                                return;
                            }
                        }
                    }
                }
            })
            .await;
        let next = tokio::time::Instant::now() + every;
        while tokio::time::Instant::now() < next && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[test]
fn controllers_killed_during_join_bursts_leave_no_duplicate_or_orphan() {
    let test = "controllers_killed_during_join_bursts_leave_no_duplicate_or_orphan";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    const TTL_SECS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut controllers = [
        Controller::start(&etcd, "/overlay", dir.path(), "controller-a"),
        Controller::start(&etcd, "/overlay", dir.path(), "controller-b"),
    ];
    set_config(
        &controllers[0].url,
        &[
            "--network",
            "10.96.0.0/12",
            "--backend",
            "alloc",
            "--lease-ttl",
            &format!("{TTL_SECS}s"),
        ],
    );
    let mut summary = Summary::new(&format!(
        "2. a controller SIGKILLed during each burst of {JOINS_PER_ROUND} joins, {JOIN_ROUNDS} rounds, 2 controllers"
    ));
    let rt = runtime();
    let channels = {
        let _g = rt.enter();
        Arc::new([
            grpc_channel(&controllers[0].url),
            grpc_channel(&controllers[1].url),
        ])
    };
    let mut etcd_kv = rt.block_on(etcd_client(&etcd));
    let held: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let lost: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = rt.spawn(renew_all(
        channels.clone(),
        held.clone(),
        Duration::from_secs(TTL_SECS / 3),
        stop.clone(),
        lost.clone(),
    ));

    let counts = Arc::new(JoinCounts::default());
    let mut failed_joins = Vec::new();
    let mut orphans_per_round = Vec::new();
    let mut orphans_seen = BTreeSet::new();
    let mut kills = 0;
    // Kill after this many joins of the round have succeeded: from "at once" to "almost
    // done", so the kill lands in every phase of a join.
    let kill_after: [usize; JOIN_ROUNDS] = [0, 10, 25, 40, 55, 70, 85, 5, 50, 95];
    for (round, &kill_at) in kill_after.iter().enumerate() {
        let victim = round % 2;
        let round_counts = Arc::new(JoinCounts::default());
        let tasks: Vec<_> = (0..JOINS_PER_ROUND)
            .map(|i| {
                let n = round * JOINS_PER_ROUND + i;
                rt.spawn(join(
                    channels.clone(),
                    i % 2,
                    format!("r{round:02}-n{i:03}"),
                    doc_ip(n),
                    round_counts.clone(),
                ))
            })
            .collect();
        wait_until(PATIENCE, || {
            (round_counts.done.load(Ordering::Relaxed) >= kill_at).then_some(())
        })
        .expect("joins progress");
        controllers[victim].child.signal(libc::SIGKILL);
        kills += 1;
        for t in tasks {
            match rt.block_on(t).expect("join task") {
                Ok(pair) => held.lock().unwrap().push(pair),
                Err(e) => failed_joins.push(e),
            }
        }
        counts.attempts.fetch_add(
            round_counts.attempts.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        counts.failovers.fetch_add(
            round_counts.failovers.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        // What the kill left behind, before anything had time to expire.
        let orphans = rt.block_on(EtcdView::read(&mut etcd_kv)).orphaned_leases();
        orphans_per_round.push(orphans.difference(&orphans_seen).count());
        orphans_seen.extend(orphans);
        controllers[victim].restart();
    }
    let joins = held.lock().unwrap().clone();

    // Duplicates: two nodes answered with one subnet, or a node with two keys.
    let view = rt.block_on(EtcdView::read(&mut etcd_kv));
    let mut by_subnet: HashMap<&str, Vec<&str>> = HashMap::new();
    for (node, subnet) in &joins {
        by_subnet.entry(subnet).or_default().push(node);
    }
    let duplicate_answers = by_subnet.values().filter(|n| n.len() > 1).count();
    let mut keys_per_node: HashMap<&str, usize> = HashMap::new();
    for (node, _) in view.keys.values() {
        *keys_per_node.entry(node).or_default() += 1;
    }
    let nodes_with_two_keys = keys_per_node.values().filter(|&&n| n > 1).count();
    // Orphaned keys: a key no joined node holds, or one without an etcd lease.
    let answered: BTreeMap<String, String> = joins
        .iter()
        .map(|(n, s)| {
            (
                format!("/overlay/leases/{}", s.replace('/', "-")),
                n.clone(),
            )
        })
        .collect();
    let orphaned_keys: Vec<&String> = view
        .keys
        .iter()
        .filter(|(k, (node, lease))| answered.get(*k) != Some(node) || *lease == 0)
        .map(|(k, _)| k)
        .collect();
    let answers_without_key = answered
        .keys()
        .filter(|k| !view.keys.contains_key(*k))
        .count();
    // Orphaned etcd leases (granted by a controller killed before it attached them)
    // expire within one TTL; none may outlive it.
    let orphans_at_end = view.orphaned_leases().len();
    let waited = Instant::now();
    let orphans_left = wait_until(Duration::from_secs(TTL_SECS * 2 + 30), || {
        let v = rt.block_on(EtcdView::read(&mut etcd_kv));
        v.orphaned_leases().is_empty().then_some(v)
    });
    stop.store(true, Ordering::Relaxed);
    let _ = rt.block_on(renewer);
    let final_view = rt.block_on(EtcdView::read(&mut etcd_kv));
    let lost = lost.lock().unwrap().clone();
    let lease_key_leases: BTreeSet<i64> = final_view
        .keys
        .values()
        .map(|(_, l)| *l)
        .filter(|l| final_view.leases.contains(l))
        .collect();

    summary.row(
        "faults injected",
        format!("{kills} controller SIGKILLs (alternating a/b)"),
    );
    summary.row(
        "joins requested / succeeded / failed",
        format!(
            "{} / {} / {}",
            JOIN_ROUNDS * JOINS_PER_ROUND,
            joins.len(),
            failed_joins.len()
        ),
    );
    summary.row(
        "acquire attempts / failovers to the other controller",
        format!(
            "{} / {}",
            counts.attempts.load(Ordering::Relaxed),
            counts.failovers.load(Ordering::Relaxed)
        ),
    );
    summary.row("duplicate subnets (answers)", duplicate_answers);
    summary.row("nodes with two keys", nodes_with_two_keys);
    summary.row("orphaned keys", orphaned_keys.len());
    summary.row("answers with no key in etcd", answers_without_key);
    summary.row(
        "etcd leases a kill left unattached (per round)",
        format!(
            "{:?} (total {})",
            orphans_per_round,
            orphans_per_round.iter().sum::<usize>()
        ),
    );
    summary.row(
        "orphaned etcd leases left after one TTL",
        format!(
            "{} (waited {:.0} s, TTL {TTL_SECS} s)",
            orphans_left
                .as_ref()
                .map_or(final_view.orphaned_leases().len(), |_| 0),
            waited.elapsed().as_secs_f64()
        ),
    );
    summary.row("leases lost by renewals", lost.len());
    summary.row(
        "lease keys / their etcd leases / other etcd leases (leader election) at the end",
        format!(
            "{} / {} / {}",
            final_view.keys.len(),
            lease_key_leases.len(),
            final_view.leases.len() - lease_key_leases.len()
        ),
    );
    summary.finish();

    assert!(failed_joins.is_empty(), "joins failed: {failed_joins:?}");
    assert_eq!(duplicate_answers, 0, "one subnet handed to two nodes");
    assert_eq!(nodes_with_two_keys, 0, "a node holds two keys");
    assert!(orphaned_keys.is_empty(), "orphaned keys: {orphaned_keys:?}");
    assert_eq!(
        answers_without_key, 0,
        "a join was answered with a lease not in etcd"
    );
    assert!(
        orphans_left.is_some(),
        "etcd leases outlived their TTL unattached: {:?} (at the end of the rounds: {orphans_at_end})",
        final_view.orphaned_leases()
    );
    assert!(lost.is_empty(), "renewals lost leases: {lost:?}");
    assert_eq!(final_view.keys.len(), JOIN_ROUNDS * JOINS_PER_ROUND);
    assert_eq!(
        lease_key_leases.len(),
        JOIN_ROUNDS * JOINS_PER_ROUND,
        "one etcd lease per key"
    );
    assert!(final_view.orphaned_leases().is_empty());
}

// ---------------------------------------------------------------------------------------
// 5. Watch clients that fall behind, and one that resumes after a compaction

/// A raw gRPC watch client's view: subnet -> node, kept by the same [`LeaseCache`] the
/// agent uses.
struct WatchView {
    cache: LeaseCache,
    snapshots: usize,
    events: usize,
}

impl WatchView {
    fn new() -> WatchView {
        WatchView {
            cache: LeaseCache::new(0),
            snapshots: 0,
            events: 0,
        }
    }

    fn apply(&mut self, msg: v1::WatchLeasesResponse) {
        use v1::watch_leases_response::Kind;
        match msg.kind.expect("a message kind") {
            Kind::Snapshot(s) => {
                self.snapshots += 1;
                let leases = s
                    .leases
                    .iter()
                    .map(|l| overlay_proto::lease_from_proto(l).expect("valid lease"))
                    .collect();
                self.cache.resync(leases, s.revision);
            }
            Kind::Event(e) => {
                self.events += 1;
                self.cache
                    .apply(&overlay_proto::event_from_proto(&e).expect("valid event"));
            }
        }
    }

    fn set(&self) -> BTreeMap<String, String> {
        self.cache
            .leases()
            .map(|l| (l.subnet.to_string(), l.record.node.clone()))
            .collect()
    }
}

async fn open_watch(channel: Channel, after: i64) -> tonic::Streaming<v1::WatchLeasesResponse> {
    AgentClient::new(channel)
        .watch_leases(v1::WatchLeasesRequest {
            after_revision: after,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads `stream` into `view` until it equals `truth` (or the deadline passes).
async fn read_until(
    stream: &mut tonic::Streaming<v1::WatchLeasesResponse>,
    view: &mut WatchView,
    truth: &BTreeMap<String, String>,
) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while view.set() != *truth {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(msg))) => view.apply(msg),
            _ => return false,
        }
    }
    true
}

async fn list_leases(channel: Channel) -> BTreeMap<String, String> {
    AgentClient::new(channel)
        .list_leases(v1::ListLeasesRequest {})
        .await
        .expect("list leases")
        .into_inner()
        .leases
        .into_iter()
        .map(|l| (l.subnet, l.node))
        .collect()
}

fn churn_subnet(k: usize) -> ipnet::Ipv4Net {
    let n = (k % 4000) + 64;
    format!("10.{}.{}.0/24", 96 + n / 256, n % 256)
        .parse()
        .unwrap()
}

/// A reservation-like lease value for churn node `k`.
fn churn_record(k: usize) -> Vec<u8> {
    overlay_core::lease::LeaseRecord {
        node: format!("churn-{k}"),
        public_ip: doc_ip(k).parse().unwrap(),
        backend: overlay_core::BackendType::Alloc,
        backend_data: Default::default(),
        reserved: true,
        created_at: overlay_core::lease::now_millis(),
        renewed_at: overlay_core::lease::now_millis(),
    }
    .encode()
}

/// How long the slow clients go unread: longer than the controller's HTTP/2 keepalive
/// (a ping every 20 s, 10 s to answer), as a pager left open would.
const UNREAD: Duration = Duration::from_secs(40);

#[test]
fn watch_clients_that_fall_behind_or_resume_after_compaction_end_exact() {
    let test = "watch_clients_that_fall_behind_or_resume_after_compaction_end_exact";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Controller::start(&etcd, "/overlay", dir.path(), "controller-a");
    let b = Controller::start(&etcd, "/overlay", dir.path(), "controller-b");
    set_config(&a.url, &["--network", "10.96.0.0/12", "--backend", "alloc"]);
    let mut summary =
        Summary::new("5. watch clients falling behind, and resuming after a compaction");
    let rt = runtime();
    let _g = rt.enter();
    let (ca, cb) = (grpc_channel(&a.url), grpc_channel(&b.url));
    let admin = AdminClient::new(ca.clone());
    // Leases that stay throughout.
    for i in 0..20 {
        rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: format!("10.96.{}.0/24", i + 1),
            node: format!("seed-{i}"),
            public_ip: doc_ip(i),
        }))
        .expect("seed reservation");
    }
    let seeds = rt.block_on(list_leases(ca.clone()));

    // A slow client with the smallest HTTP/2 window, so that few events fit in flight:
    // it reads its snapshot, then stops reading.
    let slow_channel = Endpoint::from_shared(a.url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .http2_adaptive_window(false)
        .connect_lazy();
    let mut slow = WatchView::new();
    let mut slow_stream = rt.block_on(open_watch(slow_channel, 0));
    assert!(rt.block_on(read_until(&mut slow_stream, &mut slow, &seeds)));
    // A fast client reading all along.
    let fast = Arc::new(Mutex::new(WatchView::new()));
    let fast_reader = {
        let fast = fast.clone();
        let ca = ca.clone();
        rt.spawn(async move {
            let mut stream = open_watch(ca, 0).await;
            while let Ok(Some(msg)) = stream.message().await {
                fast.lock().unwrap().apply(msg);
            }
        })
    };
    // `overlayctl watch -o json` on the other controller, its stdout not read meanwhile.
    let ctl_stderr = dir.path().join("watch.stderr");
    let mut ctl_watch = Command::new(bin_path("overlayctl"));
    ctl_watch
        .arg("--insecure")
        .arg(format!("--controller={}", b.url))
        .args(["watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&ctl_stderr).unwrap());
    let mut ctl_watch = overlay_tests::Child::spawn("watch", &mut ctl_watch).unwrap();
    // Two clients that read their snapshot and disconnect, to resume later.
    let mut resumers = Vec::new();
    for channel in [ca.clone(), cb.clone()] {
        let mut view = WatchView::new();
        let mut stream = rt.block_on(open_watch(channel, 0));
        assert!(rt.block_on(read_until(&mut stream, &mut view, &seeds)));
        resumers.push((view.cache.revision(), view));
    }

    // Churn, far more than the controller's broadcast buffer holds: transactions that
    // each create 50 leases and delete the 50 made two transactions earlier (as many
    // controllers writing at once would), then a last few through the controller's API.
    const TXNS: usize = 90;
    const PER_TXN: usize = 50;
    let unread_from = Instant::now();
    let mut etcd_kv = rt.block_on(etcd_client(&etcd));
    let key = |k: usize| {
        format!(
            "/overlay/leases/{}",
            overlay_core::subnet::subnet_key(churn_subnet(k))
        )
    };
    let mut changes = 0;
    for t in 0..TXNS {
        let mut ops: Vec<etcd_client::TxnOp> = (t * PER_TXN..(t + 1) * PER_TXN)
            .map(|k| etcd_client::TxnOp::put(key(k), churn_record(k), None))
            .collect();
        if t >= 2 {
            ops.extend(
                ((t - 2) * PER_TXN..(t - 1) * PER_TXN)
                    .map(|k| etcd_client::TxnOp::delete(key(k), None)),
            );
        }
        changes += ops.len();
        rt.block_on(etcd_kv.txn(etcd_client::Txn::new().and_then(ops)))
            .expect("churn transaction");
    }
    let live_from = (TXNS - 2) * PER_TXN;
    for k in live_from..live_from + 10 {
        rt.block_on(admin.clone().revoke_lease(v1::RevokeLeaseRequest {
            subnet: churn_subnet(k).to_string(),
        }))
        .expect("revoke");
        rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: churn_subnet(k + 10_000).to_string(),
            node: format!("late-{k}"),
            public_ip: doc_ip(k),
        }))
        .expect("reserve");
        changes += 2;
    }
    let churn_time = unread_from.elapsed();
    let truth = rt.block_on(list_leases(cb.clone()));
    assert_eq!(
        truth.len(),
        seeds.len() + 2 * PER_TXN,
        "the churn left what it meant to"
    );

    // Compaction of everything so far, and a controller started after it (its history
    // begins there): resuming from before the compaction can only be answered with a
    // snapshot. The other client resumes on a controller that ran throughout.
    let rev = rt.block_on(EtcdView::read(&mut etcd_kv)).revision;
    rt.block_on(etcd_kv.compact(rev, None)).expect("compact");
    let c = Controller::start(&etcd, "/overlay", dir.path(), "controller-c");
    let cc = grpc_channel(&c.url);
    let mut resumed = Vec::new();
    for ((after, mut view), (name, channel)) in resumers.into_iter().zip([
        ("controller c (started after the compaction)", cc.clone()),
        ("controller b (running throughout)", cb.clone()),
    ]) {
        let (snapshots, events) = (view.snapshots, view.events);
        let mut stream = rt.block_on(open_watch(channel, after));
        let exact = rt.block_on(read_until(&mut stream, &mut view, &truth));
        resumed.push((
            name,
            after,
            exact,
            view.snapshots - snapshots,
            view.events - events,
            view.set().len(),
        ));
    }

    // The slow clients read again.
    std::thread::sleep(UNREAD.saturating_sub(unread_from.elapsed()));
    let unread = unread_from.elapsed();
    let slow_exact = rt.block_on(read_until(&mut slow_stream, &mut slow, &truth));
    let lines = ctl_watch.inner.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(lines).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ctl_view: BTreeMap<String, String> = BTreeMap::new();
    let mut ctl_lines = 0;
    let deadline = Instant::now() + PATIENCE;
    while ctl_view != truth && Instant::now() < deadline {
        let line = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        ctl_lines += 1;
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let subnet = v["lease"]["subnet"].as_str().unwrap().to_string();
        match v["type"].as_str() {
            Some("added") => {
                ctl_view.insert(subnet, v["lease"]["node"].as_str().unwrap().to_string());
            }
            Some("removed") => {
                ctl_view.remove(&subnet);
            }
            other => panic!("unexpected watch line type {other:?}: {line}"),
        }
    }
    let ctl_exact = ctl_view == truth;
    // Still watching after the stall? One more change must reach it.
    let probe = churn_subnet(20_000).to_string();
    rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
        subnet: probe.clone(),
        node: "probe".into(),
        public_ip: doc_ip(0),
    }))
    .expect("reserve the probe");
    let deadline = Instant::now() + PATIENCE;
    let mut ctl_follows = false;
    while !ctl_follows && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => ctl_follows = line.contains(&probe),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    rt.block_on(admin.clone().revoke_lease(v1::RevokeLeaseRequest {
        subnet: probe.clone(),
    }))
    .expect("revoke the probe");
    let ctl_exit = ctl_watch.wait_timeout(Duration::from_millis(500));
    let ctl_error = std::fs::read_to_string(&ctl_stderr).unwrap_or_default();
    let fast_exact = wait_until(PATIENCE, || {
        (fast.lock().unwrap().set() == truth).then_some(())
    })
    .is_some();
    let (fast_snapshots, fast_events) = {
        let f = fast.lock().unwrap();
        (f.snapshots, f.events)
    };
    fast_reader.abort();
    let resyncs = [&a, &b, &c].map(|x| metric(x, "overlay_controller_watch_resyncs"));

    summary.row(
        "lease changes",
        format!(
            "{changes} in {:.1} s ({TXNS} etcd transactions of {} + 20 through the controller)",
            churn_time.as_secs_f64(),
            2 * PER_TXN
        ),
    );
    summary.row("leases at the end", truth.len());
    summary.row(
        "slow clients left unread for",
        format!("{:.0} s", unread.as_secs_f64()),
    );
    summary.row(
        "slow raw gRPC client (64 KiB window): snapshots / events read, exact at the end",
        format!("{} / {}, {}", slow.snapshots, slow.events, slow_exact),
    );
    summary.row(
        "slow `overlayctl watch -o json` (stdout unread): lines read, exact at the end, still watching",
        format!(
            "{ctl_lines}, {ctl_exact}, {ctl_follows}{}",
            match ctl_exit {
                Some(status) => format!(" (exited: {status}: {})", ctl_error.trim()),
                None => String::new(),
            }
        ),
    );
    summary.row(
        "fast raw gRPC client: snapshots / events, exact at the end",
        format!("{fast_snapshots} / {fast_events}, {fast_exact}"),
    );
    summary.row(
        "resync snapshots sent by controllers a / b / c",
        format!("{} / {} / {}", resyncs[0], resyncs[1], resyncs[2]),
    );
    summary.row("etcd compacted at revision", rev);
    for (name, after, exact, snaps, events, _) in &resumed {
        summary.row(
            &format!("resumed from revision {after} on {name}: snapshots / events, exact"),
            format!("{snaps} / {events}, {exact}"),
        );
    }
    let wrong = [slow_exact, ctl_exact, fast_exact]
        .into_iter()
        .chain(resumed.iter().map(|r| r.2))
        .filter(|ok| !ok)
        .count();
    summary.row("clients ending with a wrong set", wrong);
    summary.finish();

    assert!(
        slow.snapshots >= 2,
        "the slow client was never resynced: the churn did not outrun the broadcast buffer"
    );
    assert!(
        slow_exact,
        "the slow raw client ended with {} leases, not {}",
        slow.set().len(),
        truth.len()
    );
    assert_eq!(
        ctl_view.len(),
        truth.len(),
        "overlayctl watch ended with another set ({})",
        if ctl_error.is_empty() {
            "no error"
        } else {
            ctl_error.trim()
        }
    );
    assert_eq!(ctl_view, truth, "overlayctl watch ended with another set");
    assert!(
        ctl_follows,
        "overlayctl watch stopped following after its output stalled for {:.0} s: {}",
        unread.as_secs_f64(),
        if ctl_error.is_empty() {
            "no error"
        } else {
            ctl_error.trim()
        }
    );
    assert!(fast_exact, "the fast client ended with another set");
    for (name, _, exact, snaps, _, len) in &resumed {
        assert!(
            exact,
            "the client resumed on {name} ended with {len} leases, not {}",
            truth.len()
        );
        if name.contains("compaction") {
            assert_eq!(
                *snaps, 1,
                "resuming from before a compaction gives a snapshot"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. Bad input catalogue

/// How a bad input was answered.
#[derive(Debug)]
enum Answer {
    /// Accepted: the input was not refused.
    Accepted(String),
    /// Refused with this text: exit status and stderr (overlayctl), exit status and the
    /// error JSON (overlay-cni), code and message (gRPC).
    Refused(String),
}

/// One row of the catalogue: what was sent, and what its error must name (words the
/// answer must contain, case-insensitive: the exit status or code, the field, the value).
struct Case {
    area: &'static str,
    name: &'static str,
    names: &'static [&'static str],
    answer: Answer,
}

fn case(name: &'static str, names: &'static [&'static str], answer: Answer) -> Case {
    Case {
        area: "",
        name,
        names,
        answer,
    }
}

impl Case {
    /// Why the answer is not a clear refusal, if it is not.
    fn problem(&self) -> Option<String> {
        match &self.answer {
            Answer::Accepted(out) => Some(format!("accepted: {out}")),
            Answer::Refused(text) => {
                let lower = text.to_lowercase();
                let missing: Vec<&&str> = self
                    .names
                    .iter()
                    .filter(|w| !lower.contains(&w.to_lowercase()))
                    .collect();
                (!missing.is_empty()).then(|| format!("does not name {missing:?}: {text}"))
            }
        }
    }
}

/// What the catalogue runs against: a controller with a lease and a reservation, raw
/// gRPC clients, and files for overlay-cni (which runs in a namespace of its own when
/// we are root, so that nothing it could do reaches the machine's own network).
struct Bench<'a> {
    url: String,
    rt: &'a tokio::runtime::Runtime,
    agent: AgentClient<Channel>,
    admin: AdminClient<Channel>,
    /// The subnet leased to node "holder".
    held: String,
    cni_ns: Option<String>,
    dir: std::path::PathBuf,
}

impl Bench<'_> {
    fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Answer {
        let mut cmd = Command::new(bin_path("overlayctl"));
        cmd.arg("--insecure")
            .arg(format!("--controller={}", self.url))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("overlayctl");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            Answer::Accepted(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Answer::Refused(format!(
                "exit {}: {stderr}",
                out.status.code().unwrap_or(-1)
            ))
        }
    }

    /// `overlayctl config set ARGS`.
    fn set(&self, args: &[&str]) -> Answer {
        let mut all = vec!["config", "set"];
        all.extend_from_slice(args);
        self.cli(&all, None)
    }

    /// `overlayctl config set --file F` with F holding `text`.
    fn set_file(&self, name: &str, text: &str) -> Answer {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        self.set(&["--file", &path.display().to_string()])
    }

    /// `overlayctl --controller URL leases` (the URL is the bad input).
    fn cli_at(&self, url: &str) -> Answer {
        let b = Bench {
            url: url.into(),
            rt: self.rt,
            agent: self.agent.clone(),
            admin: self.admin.clone(),
            held: String::new(),
            cni_ns: None,
            dir: self.dir.clone(),
        };
        b.cli(&["leases"], None)
    }

    fn subnet_env(&self) -> std::path::PathBuf {
        self.dir.join("subnet.env")
    }

    fn ipam_dir(&self) -> std::path::PathBuf {
        self.dir.join("ipam")
    }

    /// A valid network config for overlay-cni with `changes` applied (null removes).
    fn netconf(&self, changes: serde_json::Value) -> Vec<u8> {
        let mut v = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "overlay",
            "type": "overlay-cni",
            "subnetFile": self.subnet_env(),
            "dataDir": self.ipam_dir(),
            "bridge": "ovl0",
        });
        for (k, x) in changes.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    /// overlay-cni ADD of a container whose namespace does not exist, with `env`
    /// overriding the CNI_* variables ("" removes one).
    fn cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> Answer {
        let mut vars: BTreeMap<&str, &str> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "faults-1"),
            ("CNI_NETNS", "/run/netns/ovlt-faults-missing"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .collect();
        for (k, v) in env {
            if v.is_empty() {
                vars.remove(k);
            } else {
                vars.insert(k, v);
            }
        }
        let mut cmd = Command::new(bin_path("overlay-cni"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = &self.cni_ns {
            netns::in_netns(&mut cmd, ns).unwrap();
        }
        let mut child = cmd.spawn().expect("overlay-cni");
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        // The plugin may answer before reading everything.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Answer::Accepted(stdout)
        } else {
            Answer::Refused(format!(
                "exit {}: {stdout}",
                out.status.code().unwrap_or(-1)
            ))
        }
    }

    /// What overlay-cni must leave alone: its IPAM directory and the links of the
    /// namespace it ran in.
    fn cni_state(&self) -> (Vec<String>, String) {
        let mut files = walk(&self.ipam_dir());
        files.sort();
        let links = match &self.cni_ns {
            Some(ns) => netns::ip_in(ns, &["-o", "link", "show"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default(),
            None => String::new(),
        };
        (files, links)
    }

    fn grpc<T: std::fmt::Debug>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Answer {
        match self.rt.block_on(call) {
            Ok(r) => Answer::Accepted(format!("{:?}", r.into_inner())),
            Err(s) => Answer::Refused(format!("{:?}: {}", s.code(), s.message())),
        }
    }

    /// AcquireLease of a valid newcomer with `change` applied.
    fn acquire(&self, change: impl FnOnce(&mut v1::AcquireLeaseRequest)) -> Answer {
        let mut req = v1::AcquireLeaseRequest {
            node: "newcomer".into(),
            public_ip: "198.51.100.30".into(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        };
        change(&mut req);
        self.grpc(self.agent.clone().acquire_lease(req))
    }

    fn renew(&self, node: &str, subnet: &str) -> Answer {
        self.grpc(self.agent.clone().renew_lease(v1::RenewLeaseRequest {
            node: node.into(),
            subnet: subnet.into(),
        }))
    }

    fn release(&self, node: &str, subnet: &str) -> Answer {
        self.grpc(self.agent.clone().release_lease(v1::ReleaseLeaseRequest {
            node: node.into(),
            subnet: subnet.into(),
        }))
    }

    fn watch(&self, after_revision: i64) -> Answer {
        self.grpc(
            self.agent
                .clone()
                .watch_leases(v1::WatchLeasesRequest { after_revision }),
        )
    }

    fn set_json(&self, json: &str) -> Answer {
        self.grpc(self.admin.clone().set_config(v1::SetConfigRequest {
            json: json.into(),
            force: false,
        }))
    }

    fn reserve(&self, subnet: &str, node: &str, public_ip: &str) -> Answer {
        self.grpc(self.admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: subnet.into(),
            node: node.into(),
            public_ip: public_ip.into(),
        }))
    }

    fn revoke(&self, subnet: &str) -> Answer {
        self.grpc(self.admin.clone().revoke_lease(v1::RevokeLeaseRequest {
            subnet: subnet.into(),
        }))
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

const NET: &str = "10.96.0.0/12";

#[rustfmt::skip]
fn config_cases(b: &Bench) -> Vec<Case> {
    let set = |extra: &[&str]| {
        let mut args = vec!["--network", NET, "--backend", "alloc"];
        args.extend_from_slice(extra);
        b.set(&args)
    };
    vec![
        case("network not a CIDR", &["exit 1", "--network", "banana"], b.set(&["--network", "banana", "--backend", "alloc"])),
        case("network prefix /33", &["exit 1", "--network", "10.96.0.0/33"], b.set(&["--network", "10.96.0.0/33", "--backend", "alloc"])),
        case("network with host bits", &["exit 1", "--network", "host bits"], b.set(&["--network", "10.96.1.0/12", "--backend", "alloc"])),
        case("network smaller than /28", &["exit 1", "--network", "/28"], b.set(&["--network", "10.96.0.0/29", "--backend", "alloc"])),
        case("vni 0", &["exit 1", "--vni", "0"], b.set(&["--network", NET, "--vni", "0"])),
        case("vni 2^24", &["exit 1", "--vni", "16777216"], b.set(&["--network", NET, "--vni", "16777216"])),
        case("port 0", &["exit 1", "--port", "0"], b.set(&["--network", NET, "--port", "0"])),
        case("port 70000", &["exit 1", "--port", "70000"], b.set(&["--network", NET, "--port", "70000"])),
        case("mtu 100", &["exit 1", "--mtu", "100"], set(&["--mtu", "100"])),
        case("lease TTL 0s", &["exit 1", "--lease-ttl", "0s"], set(&["--lease-ttl", "0s"])),
        case("lease TTL 1.5s", &["exit 1", "--lease-ttl", "whole number of seconds"], set(&["--lease-ttl", "1.5s"])),
        case("lease TTL not a duration", &["exit 1", "--lease-ttl", "soon"], set(&["--lease-ttl", "soon"])),
        case("subnet length 31", &["exit 1", "--subnet-len", "31"], set(&["--subnet-len", "31"])),
        case("subnet length shorter than the network", &["exit 1", "--subnet-len", "8"], set(&["--subnet-len", "8"])),
        case("subnet min outside the network", &["exit 1", "--subnet-min", "192.0.2.0/24"], set(&["--subnet-min", "192.0.2.0/24"])),
        case("subnet min after subnet max", &["exit 1", "--subnet-min", "after subnet_max"], set(&["--subnet-min", "10.96.9.0/24", "--subnet-max", "10.96.2.0/24"])),
        case("unknown backend", &["exit 2", "--backend", "udp"], b.set(&["--network", NET, "--backend", "udp"])),
        case("backend change with hosts up, no --force", &["exit 1", "backend", "--force"], b.set(&["--network", NET, "--backend", "vxlan"])),
        case("network change stranding leases, no --force", &["exit 1", "--force", "holder"], b.set(&["--network", "10.250.0.0/16", "--backend", "alloc"])),
        case("file: truncated JSON", &["exit 1", "truncated.json", "line 1 column"], b.set_file("truncated.json", r#"{"network": "10.96.0.0/12", "backend": {"#)),
        // serde names the position and the expected type, not the field.
        case("file: network is a number", &["exit 1", "wrong-type.json", "expected a string", "line 1 column 14"], b.set_file("wrong-type.json", r#"{"network": 12}"#)),
        case("file: misspelt field", &["exit 1", "misspelt.json", "netwrok"], b.set_file("misspelt.json", r#"{"network": "10.96.0.0/12", "netwrok": "10.0.0.0/8"}"#)),
        case("file: empty", &["exit 1", "empty.json", "not a valid config document"], b.set_file("empty.json", "")),
        case("file: negative vni", &["exit 1", "negative-vni.json", "-1"], b.set_file("negative-vni.json", r#"{"network": "10.96.0.0/12", "backend": {"type": "vxlan", "vni": -1}}"#)),
        case("file: valid JSON, invalid value", &["exit 1", "bad-network.json", "network", "10.96.0.0/40"], b.set_file("bad-network.json", r#"{"network": "10.96.0.0/40", "backend": {"type": "alloc"}}"#)),
        case("file: missing", &["exit 1", "--file", "/nonexistent/overlay.json"], b.set(&["--file", "/nonexistent/overlay.json"])),
        // "-" is how the operator named stdin.
        case("file from stdin: not JSON", &["exit 1", "-:", "not a valid config document"], b.cli(&["config", "set", "--file", "-"], Some(b"network=10.96.0.0/12"))),
    ]
}

#[rustfmt::skip]
fn cli_cases(b: &Bench) -> Vec<Case> {
    let reserve = |subnet: &str, node: &str, ip: &str| {
        b.cli(&["lease", "reserve", "--subnet", subnet, "--node", node, "--public-ip", ip], None)
    };
    vec![
        case("controller URL with another scheme", &["exit 2", "--controller", "ftp://"], b.cli_at("ftp://controller:7400")),
        case("controller URL without a host", &["exit 2", "--controller", "no host"], b.cli_at("http://:7400")),
        case("unknown output format", &["exit 2", "--output", "yaml"], b.cli(&["leases", "-o", "yaml"], None)),
        case("unknown command", &["exit 2", "frobnicate"], b.cli(&["frobnicate"], None)),
        case("reserve: subnet with host bits", &["exit 2", "--subnet", "host bits"], reserve("10.96.5.1/24", "n1", "198.51.100.1")),
        case("reserve: node name with a space", &["exit 2", "--node", "a b"], reserve("10.96.5.0/24", "a b", "198.51.100.1")),
        case("reserve: public IP 300.1.1.1", &["exit 2", "--public-ip", "300.1.1.1"], reserve("10.96.5.0/24", "n1", "300.1.1.1")),
        case("reserve: public IP inside the overlay", &["exit 1", "10.96.3.3", "inside the overlay"], reserve("10.96.5.0/24", "n1", "10.96.3.3")),
        case("reserve: subnet outside the network", &["exit 1", "10.250.5.0/24", "not one of the network's subnets"], reserve("10.250.5.0/24", "n1", "198.51.100.1")),
        case("reserve: a subnet leased to another node", &["exit 1", "leased to node holder"], reserve(&b.held, "thief", "198.51.100.99")),
        case("reserve: --node missing", &["exit 2", "--node"], b.cli(&["lease", "reserve", "--subnet", "10.96.5.0/24", "--public-ip", "198.51.100.1"], None)),
        case("revoke: not a CIDR", &["exit 2", "SUBNET", "not-a-subnet"], b.cli(&["lease", "revoke", "not-a-subnet"], None)),
        case("revoke: no such lease", &["exit 1", "10.96.77.0/24", "no lease"], b.cli(&["lease", "revoke", "10.96.77.0/24"], None)),
        case("watch: negative revision", &["exit 2", "--after-revision", "-5"], b.cli(&["watch", "--after-revision", "-5"], None)),
        case("routes: node name with a slash", &["exit 1", "--node", "a/b"], b.cli(&["routes", "--node", "a/b"], None)),
        case("--insecure with TLS files", &["--insecure", "--tls"], b.cli(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem", "--tls-ca", "/nonexistent/ca.pem", "leases"], None)),
    ]
}

#[rustfmt::skip]
fn cni_cases(b: &Bench) -> Vec<Case> {
    let good = b.netconf(serde_json::json!({}));
    let conf = |changes: serde_json::Value| b.netconf(changes);
    let garbage = b.dir.join("garbage.env");
    std::fs::write(&garbage, "this is not a subnet file\n").unwrap();
    vec![
        case("no CNI_COMMAND", &[r#""code":4"#, "CNI_COMMAND"], b.cni(&[("CNI_COMMAND", "")], &good)),
        case("unknown CNI_COMMAND", &[r#""code":4"#, "CNI_COMMAND", "PUT"], b.cni(&[("CNI_COMMAND", "PUT")], &good)),
        case("ADD without CNI_CONTAINERID", &[r#""code":4"#, "CNI_CONTAINERID"], b.cni(&[("CNI_CONTAINERID", "")], &good)),
        case("ADD with CNI_CONTAINERID ../x", &[r#""code":4"#, "CNI_CONTAINERID", "../x"], b.cni(&[("CNI_CONTAINERID", "../x")], &good)),
        case("ADD without CNI_IFNAME", &[r#""code":4"#, "CNI_IFNAME"], b.cni(&[("CNI_IFNAME", "")], &good)),
        case("ADD with a 16-byte CNI_IFNAME", &[r#""code":4"#, "CNI_IFNAME", "eth0123456789abc"], b.cni(&[("CNI_IFNAME", "eth0123456789abc")], &good)),
        case("ADD without CNI_NETNS", &[r#""code":4"#, "CNI_NETNS"], b.cni(&[("CNI_NETNS", "")], &good)),
        case("ADD with a CNI_NETNS that does not exist", &[r#""code":3"#, "ovlt-faults-missing"], b.cni(&[], &good)),
        case("ADD with empty stdin", &[r#""code":6"#, "not JSON"], b.cni(&[], b"")),
        case("ADD with stdin not JSON", &[r#""code":6"#, "not JSON"], b.cni(&[], b"{cniVersion: 1.0.0")),
        case("ADD with a JSON array", &[r#""code":7"#, "JSON object"], b.cni(&[], b"[]")),
        case("ADD without cniVersion", &[r#""code":1"#, "cniVersion"], b.cni(&[], &conf(serde_json::json!({"cniVersion": null})))),
        case("ADD with cniVersion 0.3.1", &[r#""code":1"#, "0.3.1"], b.cni(&[], &conf(serde_json::json!({"cniVersion": "0.3.1"})))),
        case("ADD with an ipam section", &[r#""code":2"#, "ipam"], b.cni(&[], &conf(serde_json::json!({"ipam": {"type": "host-local"}})))),
        case("ADD with network name ../../etc", &[r#""code":7"#, "network name", "../../etc"], b.cni(&[], &conf(serde_json::json!({"name": "../../etc"})))),
        case("ADD with bridge br/0", &[r#""code":7"#, "bridge", "br/0"], b.cni(&[], &conf(serde_json::json!({"bridge": "br/0"})))),
        case("ADD with mtu 10", &[r#""code":7"#, "mtu 10"], b.cni(&[], &conf(serde_json::json!({"mtu": 10})))),
        // serde_json::from_value names the value and the type, not the field.
        case("ADD with mtu as a string", &[r#""code":7"#, "invalid network config", "1500"], b.cni(&[], &conf(serde_json::json!({"mtu": "1500"})))),
        case("ADD with prevResult not a result", &[r#""code":6"#, "prevResult"], b.cni(&[], &conf(serde_json::json!({"prevResult": {"ips": "none"}})))),
        case("ADD with a subnetFile that does not exist", &[r#""code":11"#, "/nonexistent/subnet.env"], b.cni(&[], &conf(serde_json::json!({"subnetFile": "/nonexistent/subnet.env"})))),
        case("ADD with a subnetFile of garbage", &[r#""code":5"#, "garbage.env"], b.cni(&[], &conf(serde_json::json!({"subnetFile": garbage})))),
        // A network name is a directory name under dataDir: at most 255 bytes.
        case("ADD with a 256-byte network name", &[r#""code":7"#, "network name"], b.cni(&[], &conf(serde_json::json!({"name": "x".repeat(256)})))),
        case("ADD with 2 MiB on stdin", &[r#""code":6"#, "over the limit"], b.cni(&[], &conf(serde_json::json!({"padding": "x".repeat(2 << 20)})))),
    ]
}

#[rustfmt::skip]
fn grpc_cases(b: &Bench) -> Vec<Case> {
    vec![
        case("acquire: public_ip not an address", &["InvalidArgument", "public_ip", "not-an-ip"], b.acquire(|r| r.public_ip = "not-an-ip".into())),
        case("acquire: public_ip inside the overlay", &["InvalidArgument", "10.96.3.3", "inside the overlay"], b.acquire(|r| r.public_ip = "10.96.3.3".into())),
        case("acquire: public_ip multicast", &["InvalidArgument", "public IP 224.0.0.1", "unicast"], b.acquire(|r| r.public_ip = "224.0.0.1".into())),
        case("acquire: public_ip 0.0.0.0", &["InvalidArgument", "public IP 0.0.0.0"], b.acquire(|r| r.public_ip = "0.0.0.0".into())),
        case("acquire: empty node name", &["InvalidArgument", "node name \"\""], b.acquire(|r| r.node = String::new())),
        case("acquire: node name with a slash", &["InvalidArgument", "node name", "a/b"], b.acquire(|r| r.node = "a/b".into())),
        case("acquire: 300-character node name", &["InvalidArgument", "node name", "1-253 characters"], b.acquire(|r| r.node = "n".repeat(300))),
        case("acquire: vtep_mac not a MAC", &["InvalidArgument", "vtep_mac", "zz:zz"], b.acquire(|r| r.vtep_mac = Some("zz:zz".into()))),
        case("acquire: multicast vtep_mac", &["InvalidArgument", "VTEP MAC 01:00:5e:00:00:01", "unicast"], b.acquire(|r| r.vtep_mac = Some("01:00:5e:00:00:01".into()))),
        case("acquire: backend differs from the cluster's", &["InvalidArgument", "backend vxlan", "alloc"], b.acquire(|r| r.backend = v1::BackendType::Vxlan as i32)),
        case("acquire: unknown backend number", &["InvalidArgument", "backend", "99"], b.acquire(|r| r.backend = 99)),
        case("acquire: preferred_subnet with host bits", &["InvalidArgument", "preferred_subnet", "host bits"], b.acquire(|r| r.preferred_subnet = Some("10.96.9.1/24".into()))),
        case("acquire: preferred_subnet not a CIDR", &["InvalidArgument", "preferred_subnet", "ten"], b.acquire(|r| r.preferred_subnet = Some("ten".into()))),
        case("acquire: underlay without the public IP", &["InvalidArgument", "underlay 203.0.113.0/24", "198.51.100.30"], b.acquire(|r| r.underlay = Some("203.0.113.0/24".into()))),
        case("acquire: interface name with a slash", &["InvalidArgument", "interface name", "eth/0"], b.acquire(|r| r.iface = Some("eth/0".into()))),
        case("acquire: 100 KiB request", &["OutOfRange", "message length too large", "65536"], b.acquire(|r| r.node = "n".repeat(100 * 1024))),
        case("renew: subnet not a CIDR", &["InvalidArgument", "subnet", "garbage"], b.renew("holder", "garbage")),
        case("renew: another node's lease", &["PermissionDenied", "thief", "held by node \"holder\""], b.renew("thief", &b.held)),
        case("renew: a subnet nobody holds", &["NotFound", "10.96.77.0/24"], b.renew("holder", "10.96.77.0/24")),
        case("release: another node's lease", &["PermissionDenied", "thief", "held by node \"holder\""], b.release("thief", &b.held)),
        case("watch: negative after_revision", &["InvalidArgument", "after_revision", "negative"], b.watch(-1)),
        case("set config: empty JSON", &["InvalidArgument", "not a valid config document"], b.set_json("")),
        case("set config: truncated JSON", &["InvalidArgument", "not a valid config document", "line 1 column 11"], b.set_json("{\"network\":")),
        case("set config: lease_ttl 0s", &["InvalidArgument", "lease_ttl", "0s"], b.set_json(r#"{"network":"10.96.0.0/12","backend":{"type":"alloc"},"lease_ttl":"0s"}"#)),
        case("set config: misspelt field", &["InvalidArgument", "netwrok"], b.set_json(r#"{"netwrok":"10.96.0.0/12"}"#)),
        case("set config: stranding leases", &["FailedPrecondition", "holder", "--force"], b.set_json(r#"{"network":"10.250.0.0/16","backend":{"type":"alloc"}}"#)),
        case("set config: VNI change with hosts up", &["FailedPrecondition", "VNI 1 -> 9", "--force"], b.set_json(r#"{"network":"10.96.0.0/12","backend":{"type":"alloc","vni":9}}"#)),
        case("reserve: subnet with host bits", &["InvalidArgument", "subnet", "host bits"], b.reserve("10.96.5.1/24", "n1", "198.51.100.1")),
        case("reserve: subnet outside the network", &["InvalidArgument", "192.0.2.0/24", "not one of the network's subnets"], b.reserve("192.0.2.0/24", "n1", "198.51.100.1")),
        case("reserve: subnet of the wrong size", &["InvalidArgument", "10.96.5.0/25", "not one of the network's subnets"], b.reserve("10.96.5.0/25", "n1", "198.51.100.1")),
        case("reserve: bad node name", &["InvalidArgument", "node name", "bad node"], b.reserve("10.96.5.0/24", "bad node", "198.51.100.1")),
        case("reserve: public IP inside the overlay", &["InvalidArgument", "10.96.3.3", "inside the overlay"], b.reserve("10.96.5.0/24", "n1", "10.96.3.3")),
        case("reserve: a subnet leased to another node", &["FailedPrecondition", "leased to node holder"], b.reserve(&b.held, "thief", "198.51.100.99")),
        case("reserve: a second reservation for a node", &["FailedPrecondition", "pinned", "10.96.200.0/24"], b.reserve("10.96.201.0/24", "pinned", "198.51.100.20")),
        case("revoke: not a CIDR", &["InvalidArgument", "subnet", "nope"], b.revoke("nope")),
        case("revoke: a subnet nobody holds", &["NotFound", "10.96.77.0/24"], b.revoke("10.96.77.0/24")),
    ]
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    let test = "bad_input_is_refused_with_a_clear_error_and_changes_nothing";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
    // The holder's random lease stays below 10.96.200.0/24, which is reserved below.
    set_config(
        &controller.url,
        &[
            "--network",
            NET,
            "--backend",
            "alloc",
            "--subnet-max",
            "10.96.199.0/24",
        ],
    );
    let mut summary = Summary::new("6. bad input catalogue");
    let rt = runtime();
    let channel = {
        let _g = rt.enter();
        grpc_channel(&controller.url)
    };
    let agent = AgentClient::new(channel.clone());
    let admin = AdminClient::new(channel);
    // State to protect: a node's lease and a reservation.
    let held = rt
        .block_on(agent.clone().acquire_lease(v1::AcquireLeaseRequest {
            node: "holder".into(),
            public_ip: "198.51.100.10".into(),
            backend: v1::BackendType::Alloc as i32,
            ..Default::default()
        }))
        .expect("a lease")
        .into_inner()
        .lease
        .unwrap()
        .subnet;
    rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
        subnet: "10.96.200.0/24".into(),
        node: "pinned".into(),
        public_ip: "198.51.100.20".into(),
    }))
    .expect("a reservation");
    let cni_ns = is_root().then(|| format!("ovlt-{}-cni", std::process::id()));
    if let Some(ns) = &cni_ns {
        netns::create(ns).unwrap();
    }
    let files = tempfile::tempdir().unwrap();
    let bench = Bench {
        url: controller.url.clone(),
        rt: &rt,
        agent,
        admin,
        held,
        cni_ns: cni_ns.clone(),
        dir: files.path().to_path_buf(),
    };
    std::fs::write(
        bench.subnet_env(),
        "OVERLAY_NETWORK=10.96.0.0/12\nOVERLAY_SUBNET=10.96.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n",
    )
    .unwrap();
    std::fs::create_dir_all(bench.ipam_dir()).unwrap();
    let mut etcd_kv = rt.block_on(etcd_client(&etcd));
    let before = rt.block_on(EtcdView::read(&mut etcd_kv));
    let cni_before = bench.cni_state();

    let mut cases = Vec::new();
    for (area, rows) in [
        ("config", config_cases(&bench)),
        ("cli", cli_cases(&bench)),
        ("cni", cni_cases(&bench)),
        ("grpc", grpc_cases(&bench)),
    ] {
        cases.extend(rows.into_iter().map(|c| Case { area, ..c }));
    }

    let after = rt.block_on(EtcdView::read(&mut etcd_kv));
    let cni_after = bench.cni_state();
    if let Some(ns) = &cni_ns {
        let _ = netns::delete(ns);
    }
    let mut problems = Vec::new();
    let mut per_area: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    println!("\nbad input catalogue:");
    for c in &cases {
        let counts = per_area.entry(c.area).or_default();
        counts.0 += 1;
        match c.problem() {
            None => {
                counts.1 += 1;
                if let Answer::Refused(text) = &c.answer {
                    println!("  ok    [{}] {}: {text}", c.area, c.name);
                }
            }
            Some(p) => {
                println!("  FAIL  [{}] {}: {p}", c.area, c.name);
                problems.push(format!("[{}] {}: {p}", c.area, c.name));
            }
        }
    }
    for (area, (n, ok)) in &per_area {
        summary.row(
            &format!("{area}: refused with an error naming the problem"),
            format!("{ok} of {n}"),
        );
    }
    summary.row(
        "etcd revision before / after",
        format!("{} / {}", before.revision, after.revision),
    );
    summary.row(
        "leases and config unchanged (values and modification revisions)",
        after.written() == before.written(),
    );
    summary.row(
        "CNI IPAM files and namespace links unchanged",
        cni_after == cni_before,
    );
    summary.row("inputs accepted, or refused unclearly", problems.len());
    summary.finish();

    assert!(
        problems.is_empty(),
        "bad inputs not refused clearly:\n{}",
        problems.join("\n")
    );
    assert_eq!(
        after.written(),
        before.written(),
        "bad input changed the store"
    );
    assert_eq!(cni_after, cni_before, "bad CNI input changed the host");
}
