//! End-to-end tests of the control plane: a real etcd, the real `overlay-controller`,
//! `overlay-agent` (alloc backend: no root needed) and `overlayctl` binaries.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use overlay_tests::cluster::{etcdctl, overlayctl, overlayctl_json, Agent, Controller};
use overlay_tests::{bin_path, wait_until, Child, Etcd};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(30);

struct Setup {
    etcd: Etcd,
    controller: Controller,
    dir: tempfile::TempDir,
}

/// etcd + one controller + a config; `None` when etcd is missing (skipped).
fn setup(test: &str, config: &[&str]) -> Option<Setup> {
    let etcd = Etcd::start_or_skip(test)?;
    let dir = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(&etcd, "/overlay", dir.path(), "controller");
    let mut args = vec!["config", "set"];
    args.extend_from_slice(config);
    let out = overlayctl(&controller.url, &args);
    assert!(
        out.status.success(),
        "config set failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(Setup {
        etcd,
        controller,
        dir,
    })
}

/// Agents lease at random up to 10.244.199.0/24; the tests reserve only after it, so no
/// agent can hold a subnet a test is about to reserve.
const ALLOC_16: &[&str] = &[
    "--network",
    "10.244.0.0/16",
    "--backend",
    "alloc",
    "--subnet-max",
    overlay_tests::labs::RANDOM_SUBNET_MAX,
];

fn leases(controller: &str) -> Vec<Value> {
    overlayctl_json(controller, &["leases"])
        .as_array()
        .cloned()
        .expect("leases is an array")
}

fn lease_subnets(controller: &str) -> Vec<String> {
    leases(controller)
        .iter()
        .map(|l| l["subnet"].as_str().unwrap().to_string())
        .collect()
}

fn public_ip(i: usize) -> String {
    format!("198.51.100.{}", i + 1)
}

/// Lease keys in etcd, and the etcd leases attached to them; panics naming any etcd lease
/// attached to no key at all (an orphan).
fn etcd_counts(etcd: &Etcd) -> (usize, usize) {
    let keys = etcdctl(
        etcd,
        &["get", "--prefix", "--keys-only", "/overlay/leases/"],
    );
    let keys = keys.lines().filter(|l| !l.trim().is_empty()).count();
    let ids: Vec<String> = etcdctl(etcd, &["lease", "list"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("found"))
        .map(str::to_string)
        .collect();
    let mut attached = 0;
    for id in ids {
        let ttl: Value = serde_json::from_str(&etcdctl(
            etcd,
            &["lease", "timetolive", &id, "--keys", "-w", "json"],
        ))
        .unwrap();
        if ttl["ttl"].as_i64().unwrap_or(-1) <= 0 {
            continue; // expired between the listing and now
        }
        let names: Vec<String> = ttl["keys"]
            .as_array()
            .map(|k| {
                k.iter()
                    .filter_map(|k| k.as_str())
                    .map(base64_text)
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !names.is_empty(),
            "etcd lease {id} is attached to no key (an orphan)"
        );
        if names.iter().any(|n| n.starts_with("/overlay/leases/")) {
            attached += 1;
        }
    }
    (keys, attached)
}

/// Decodes etcdctl's base64 JSON strings.
fn base64_text(s: &str) -> String {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    } as u32;
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let acc = chunk
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &c)| a | val(c) << (18 - 6 * i));
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn fifty_agents_started_at_once_get_fifty_distinct_subnets() {
    let Some(s) = setup(
        "fifty_agents_started_at_once_get_fifty_distinct_subnets",
        ALLOC_16,
    ) else {
        return;
    };
    let agents: Vec<Agent> = (0..50)
        .map(|i| {
            Agent::start(
                &s.controller.url,
                &format!("node-{i:02}"),
                &public_ip(i),
                s.dir.path(),
                &[],
            )
        })
        .collect();
    let subnets: Vec<String> = agents.iter().map(|a| a.wait_subnet(PATIENCE)).collect();
    let distinct: HashSet<&String> = subnets.iter().collect();
    assert_eq!(
        distinct.len(),
        50,
        "duplicate subnets handed out: {subnets:?}"
    );
    let listed: HashSet<String> = lease_subnets(&s.controller.url).into_iter().collect();
    assert_eq!(
        listed,
        subnets.iter().cloned().collect::<HashSet<_>>(),
        "leases listed differ from subnet.env files"
    );
    for l in leases(&s.controller.url) {
        assert_eq!(l["backend"], "alloc");
        assert_eq!(l["reserved"], false);
        assert!(
            l["expires_at"].is_string(),
            "a TTL lease has an expiry: {l}"
        );
        assert!(l["vtep_mac"].is_null());
    }
    // Every agent became ready and sees the 49 others through its watch.
    for a in &agents {
        let peers = wait_until(PATIENCE, || a.status().filter(|st| st["peers"] == 49))
            .unwrap_or_else(|| panic!("{} never saw 49 peers: {:?}", a.name, a.status()));
        assert_eq!(peers["ready"], true);
    }
    let (keys, etcd_leases) = etcd_counts(&s.etcd);
    assert_eq!(keys, 50);
    assert_eq!(etcd_leases, 50, "one etcd lease per subnet, none orphaned");
}

#[test]
fn an_agent_killed_and_restarted_gets_the_same_subnet() {
    let Some(s) = setup(
        "an_agent_killed_and_restarted_gets_the_same_subnet",
        ALLOC_16,
    ) else {
        return;
    };
    let mut a = Agent::start(
        &s.controller.url,
        "survivor",
        "198.51.100.7",
        s.dir.path(),
        &[],
    );
    let first = a.wait_subnet(PATIENCE);
    let env_before = a.subnet_env().unwrap();
    // Some other agents come and go meanwhile.
    let _others: Vec<Agent> = (0..5)
        .map(|i| {
            Agent::start(
                &s.controller.url,
                &format!("other-{i}"),
                &public_ip(20 + i),
                s.dir.path(),
                &[],
            )
        })
        .collect();

    a.child.signal(libc::SIGKILL);
    a.child
        .wait_timeout(Duration::from_secs(5))
        .expect("agent died");
    a.restart();
    wait_until(PATIENCE, || a.ready().then_some(())).expect("restarted agent ready");
    assert_eq!(a.subnet().unwrap(), first);
    assert_eq!(a.subnet_env().unwrap(), env_before, "subnet.env unchanged");

    // Even with its state and run dirs wiped, the controller recognises the node by name.
    a.child.signal(libc::SIGKILL);
    a.child
        .wait_timeout(Duration::from_secs(5))
        .expect("agent died");
    std::fs::remove_dir_all(a.dir.join("state")).unwrap();
    std::fs::remove_dir_all(a.dir.join("run")).unwrap();
    a.restart();
    assert_eq!(a.wait_subnet(PATIENCE), first);
    assert_eq!(
        lease_subnets(&s.controller.url).len(),
        6,
        "no extra lease was created"
    );
}

#[test]
fn sigterm_stops_the_agent_and_keeps_its_lease() {
    let Some(s) = setup("sigterm_stops_the_agent_and_keeps_its_lease", ALLOC_16) else {
        return;
    };
    let mut a = Agent::start(
        &s.controller.url,
        "polite",
        "198.51.100.9",
        s.dir.path(),
        &[],
    );
    let subnet = a.wait_subnet(PATIENCE);
    a.child.signal(libc::SIGTERM);
    let status = a
        .child
        .wait_timeout(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    assert_eq!(lease_subnets(&s.controller.url), vec![subnet]);
    // The controller too exits cleanly on SIGTERM, even with watch streams open (they
    // end, and their clients fail over).
    let _watching = (0..2)
        .map(|i| {
            Agent::start(
                &s.controller.url,
                &format!("watcher-{i}"),
                &public_ip(30 + i),
                s.dir.path(),
                &[],
            )
        })
        .collect::<Vec<_>>();
    for w in &_watching {
        w.wait_subnet(PATIENCE);
    }
    let mut controller = s.controller;
    controller.child.signal(libc::SIGTERM);
    let status = controller
        .child
        .wait_timeout(Duration::from_secs(10))
        .expect("controller exits on SIGTERM");
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        controller.log()
    );
}

#[test]
fn a_reservation_is_honoured_and_never_expires() {
    let Some(s) = setup("a_reservation_is_honoured_and_never_expires", ALLOC_16) else {
        return;
    };
    let url = &s.controller.url;
    let out = overlayctl(
        url,
        &[
            "lease",
            "reserve",
            "--subnet",
            "10.244.200.0/24",
            "--node",
            "pinned",
            "--public-ip",
            "198.51.100.50",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other agents never get the reserved subnet.
    let _others: Vec<Agent> = (0..5)
        .map(|i| Agent::start(url, &format!("n{i}"), &public_ip(i), s.dir.path(), &[]))
        .collect();
    let a = Agent::start(url, "pinned", "198.51.100.50", s.dir.path(), &[]);
    assert_eq!(a.wait_subnet(PATIENCE), "10.244.200.0/24");
    wait_until(PATIENCE, || (leases(url).len() == 6).then_some(())).expect("6 leases");
    let all = leases(url);
    let pinned: Vec<&Value> = all.iter().filter(|l| l["node"] == "pinned").collect();
    assert_eq!(pinned.len(), 1, "{all:?}");
    assert_eq!(pinned[0]["subnet"], "10.244.200.0/24");
    assert_eq!(pinned[0]["reserved"], true);
    assert!(pinned[0]["expires_at"].is_null());
    assert_eq!(
        all.iter()
            .filter(|l| l["subnet"] == "10.244.200.0/24")
            .count(),
        1
    );
    // A reservation has no etcd lease at all.
    let raw = etcdctl(
        &s.etcd,
        &["get", "/overlay/leases/10.244.200.0-24", "-w", "json"],
    );
    let raw: Value = serde_json::from_str(&raw).unwrap();
    assert!(
        raw["kvs"][0].get("lease").is_none(),
        "reservation attached to a lease: {raw}"
    );

    // A taken subnet cannot be reserved for someone else.
    let taken = all.iter().find(|l| l["node"] == "n0").unwrap()["subnet"]
        .as_str()
        .unwrap()
        .to_string();
    let out = overlayctl(
        url,
        &[
            "lease",
            "reserve",
            "--subnet",
            &taken,
            "--node",
            "thief",
            "--public-ip",
            "198.51.100.99",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("n0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_exhausted_range_gives_a_clear_error_and_no_extra_lease() {
    let config = [
        "--network",
        "10.244.0.0/16",
        "--backend",
        "alloc",
        "--subnet-min",
        "10.244.1.0/24",
        "--subnet-max",
        "10.244.2.0/24",
    ];
    let Some(s) = setup(
        "an_exhausted_range_gives_a_clear_error_and_no_extra_lease",
        &config,
    ) else {
        return;
    };
    let url = &s.controller.url;
    let a = Agent::start(url, "a", "198.51.100.1", s.dir.path(), &[]);
    let b = Agent::start(url, "b", "198.51.100.2", s.dir.path(), &[]);
    a.wait_subnet(PATIENCE);
    b.wait_subnet(PATIENCE);
    let c = Agent::start(url, "c", "198.51.100.3", s.dir.path(), &[]);
    wait_until(PATIENCE, || {
        c.log().contains("subnet range exhausted").then_some(())
    })
    .unwrap_or_else(|| panic!("no exhaustion message; log:\n{}", c.log()));
    assert!(c.subnet_env().is_none(), "no subnet.env without a lease");
    assert!(!c.ready());
    assert_eq!(leases(url).len(), 2);
    let (keys, etcd_leases) = etcd_counts(&s.etcd);
    assert_eq!(
        (keys, etcd_leases),
        (2, 2),
        "the failed attempts left no key or etcd lease"
    );
    // Freeing a subnet lets the waiting agent in.
    let mut a = a;
    a.child.kill();
    let out = overlayctl(url, &["lease", "revoke", &a.subnet().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_subnet(PATIENCE);
}

/// `overlayctl watch -o json` as a child whose lines arrive on a channel.
struct Watcher {
    _child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Watcher {
    fn start(url: &str, extra: &[&str]) -> Watcher {
        let mut cmd = Command::new(bin_path("overlayctl"));
        cmd.arg(format!("--controller={url}"))
            .args(["--insecure", "watch", "-o", "json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = Child::spawn("watch", &mut cmd).expect("start watch");
        let stdout = child.inner.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Watcher {
            _child: child,
            lines,
        }
    }

    /// Waits for an event of `kind` for `subnet`.
    fn expect(&self, kind: &str, subnet: &str) -> Value {
        let deadline = std::time::Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) if v["type"] == kind && v["lease"]["subnet"] == subnet => return v,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        panic!("no {kind} event for {subnet}");
    }

    /// Waits until an event of `kind` was seen for each of `subnets`, in any order.
    fn expect_all(&self, kind: &str, subnets: &[String]) {
        let mut missing: HashSet<&str> = subnets.iter().map(String::as_str).collect();
        let deadline = std::time::Instant::now() + PATIENCE;
        while !missing.is_empty() {
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .unwrap_or_default();
            match self.lines.recv_timeout(left) {
                Ok(v) if v["type"] == kind => {
                    missing.remove(v["lease"]["subnet"].as_str().unwrap_or_default());
                }
                Ok(_) => {}
                Err(_) => panic!("no {kind} event for {missing:?}"),
            }
        }
    }

    fn saw(&self, kind: &str, subnet: &str) -> bool {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.expect(kind, subnet))).is_ok()
    }

    /// Every event until nothing arrives for a while.
    fn drain(&self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(v) = self.lines.recv_timeout(Duration::from_millis(700)) {
            out.push(v);
        }
        out
    }
}

#[test]
fn revoked_and_expired_leases_reach_every_watcher() {
    let config = [
        "--network",
        "10.244.0.0/16",
        "--backend",
        "alloc",
        "--lease-ttl",
        "2s",
    ];
    let Some(s) = setup("revoked_and_expired_leases_reach_every_watcher", &config) else {
        return;
    };
    let url = &s.controller.url;
    let agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(url, &format!("w{i}"), &public_ip(i), s.dir.path(), &[]))
        .collect();
    let subnets: Vec<String> = agents.iter().map(|a| a.wait_subnet(PATIENCE)).collect();
    let watchers: Vec<Watcher> = (0..3).map(|_| Watcher::start(url, &[])).collect();
    for w in &watchers {
        w.expect_all("added", &subnets);
    }
    // Leases with a 2 s TTL stay alive through renewals while their agents run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(leases(url).len(), 3, "renewals keep short leases alive");

    let out = overlayctl(url, &["lease", "revoke", &subnets[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in &watchers {
        let ev = w.expect("removed", &subnets[0]);
        assert_eq!(ev["lease"]["node"], "w0");
    }
    // The revoked agent notices and acquires again (preferring its subnet, now free).
    for w in &watchers {
        if !w.saw("added", &subnets[0]) {
            panic!("w0 did not come back; log:\n{}", agents[0].log());
        }
    }
    // An agent that dies stops renewing: etcd expires its lease and everyone hears of it.
    agents[2].child.signal(libc::SIGKILL);
    for w in &watchers {
        let ev = w.expect("removed", &subnets[2]);
        assert_eq!(ev["lease"]["node"], "w2");
    }
    let survivor = &agents[1];
    wait_until(PATIENCE, || survivor.status().filter(|st| st["peers"] == 1))
        .expect("agent w1 sees one peer left");
}

#[test]
fn a_watcher_resuming_after_a_compaction_gets_a_correct_snapshot() {
    let Some(mut s) = setup(
        "a_watcher_resuming_after_a_compaction_gets_a_correct_snapshot",
        ALLOC_16,
    ) else {
        return;
    };
    let url = s.controller.url.clone();
    let agents: Vec<Agent> = (0..4)
        .map(|i| Agent::start(&url, &format!("c{i}"), &public_ip(i), s.dir.path(), &[]))
        .collect();
    let subnets: Vec<String> = agents.iter().map(|a| a.wait_subnet(PATIENCE)).collect();
    // This one stays connected through everything below, controller restart included.
    let live = Watcher::start(&url, &[]);
    let w = Watcher::start(&url, &[]);
    let first = w.drain();
    let revision = first
        .iter()
        .filter_map(|e| e["revision"].as_i64())
        .max()
        .expect("a revision");

    // Changes the watcher misses: one revoked, one reserved.
    drop(w);
    let mut agents = agents;
    agents[0].child.kill();
    let out = overlayctl(&url, &["lease", "revoke", &subnets[0]]);
    assert!(out.status.success());
    let out = overlayctl(
        &url,
        &[
            "lease",
            "reserve",
            "--subnet",
            "10.244.250.0/24",
            "--node",
            "late",
            "--public-ip",
            "198.51.100.77",
        ],
    );
    assert!(out.status.success());
    // etcd compacts its history and the controller restarts, so neither can replay.
    let rev_now = etcdctl(&s.etcd, &["get", "/overlay/config", "-w", "json"]);
    let rev_now = serde_json::from_str::<Value>(&rev_now).unwrap()["header"]["revision"]
        .as_i64()
        .unwrap();
    etcdctl(&s.etcd, &["compact", &rev_now.to_string()]);
    s.controller.restart();

    let w = Watcher::start(&url, &["--after-revision", &revision.to_string()]);
    let events = w.drain();
    let added: HashSet<String> = events
        .iter()
        .filter(|e| e["type"] == "added")
        .map(|e| e["lease"]["subnet"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = subnets[1..]
        .iter()
        .cloned()
        .chain(["10.244.250.0/24".to_string()])
        .collect();
    assert_eq!(
        added, expected,
        "the snapshot after resuming is the current state: {events:?}"
    );
    // It keeps working after the resync.
    let out = overlayctl(&url, &["lease", "revoke", "10.244.250.0/24"]);
    assert!(out.status.success());
    w.expect("removed", "10.244.250.0/24");
    // The long-lived watcher reconnected by itself and followed every change.
    live.expect("removed", &subnets[0]);
    live.expect("added", "10.244.250.0/24");
    live.expect("removed", "10.244.250.0/24");
}

#[test]
fn two_controllers_on_one_etcd_never_double_allocate() {
    let Some(s) = setup(
        "two_controllers_on_one_etcd_never_double_allocate",
        ALLOC_16,
    ) else {
        return;
    };
    let other = Controller::start(&s.etcd, "/overlay", s.dir.path(), "controller-b");
    let urls = [s.controller.url.clone(), other.url.clone()];
    // Both controllers in every agent's list, in opposite orders, so they race on every subnet.
    let agents: Vec<Agent> = (0..40)
        .map(|i| {
            let list = if i % 2 == 0 {
                format!("{},{}", urls[0], urls[1])
            } else {
                format!("{},{}", urls[1], urls[0])
            };
            Agent::start(
                &list,
                &format!("dual-{i:02}"),
                &public_ip(i),
                s.dir.path(),
                &[],
            )
        })
        .collect();
    let subnets: Vec<String> = agents.iter().map(|a| a.wait_subnet(PATIENCE)).collect();
    assert_eq!(
        subnets.iter().collect::<HashSet<_>>().len(),
        40,
        "duplicates: {subnets:?}"
    );
    for url in &urls {
        assert_eq!(lease_subnets(url).len(), 40);
    }
    let (keys, etcd_leases) = etcd_counts(&s.etcd);
    assert_eq!(
        (keys, etcd_leases),
        (40, 40),
        "no orphaned key or etcd lease"
    );
}

#[test]
fn config_changes_that_strand_leases_need_force() {
    let Some(s) = setup("config_changes_that_strand_leases_need_force", ALLOC_16) else {
        return;
    };
    let url = &s.controller.url;
    let mut a = Agent::start(
        url,
        "mover",
        "198.51.100.5",
        s.dir.path(),
        &["--resync-interval=1s"],
    );
    let old = a.wait_subnet(PATIENCE);
    let out = overlayctl(
        url,
        &[
            "config",
            "set",
            "--network",
            "10.245.0.0/16",
            "--backend",
            "alloc",
        ],
    );
    assert!(
        !out.status.success(),
        "a network change that strands leases must be refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force") && err.contains(&old), "{err}");
    assert_eq!(
        overlayctl_json(url, &["config", "show"])["network"],
        "10.244.0.0/16",
        "config unchanged"
    );
    // Invalid input is refused locally and changes nothing either.
    let out = overlayctl(
        url,
        &[
            "config",
            "set",
            "--network",
            "10.244.0.0/16",
            "--backend",
            "alloc",
            "--vni",
            "0",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vni"));
    assert_eq!(lease_subnets(url), vec![old.clone()]);

    let out = overlayctl(
        url,
        &[
            "config",
            "set",
            "--network",
            "10.245.0.0/16",
            "--backend",
            "alloc",
            "--force",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent sees that its network changed under it and exits to be restarted.
    let status = a
        .child
        .wait_timeout(PATIENCE)
        .unwrap_or_else(|| panic!("the agent kept running:\n{}", a.log()));
    assert!(!status.success());
    assert!(a.log().contains("network config changed"), "{}", a.log());
    a.restart();
    // The old subnet.env stays until the restarted agent replaces (or removes) it: wait
    // for the new network rather than taking the first file seen.
    assert!(
        wait_until(PATIENCE, || a.subnet().filter(|s| s.starts_with("10.245."))).is_some(),
        "restarted into the new network:\n{}",
        a.log()
    );
}
