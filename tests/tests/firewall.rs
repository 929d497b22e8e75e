//! The firewall end to end, once per implementation: a two-host lab whose agents run with
//! `--ip-masq --firewall <impl>`, and what a workload's connections look like to whoever
//! receives them. Needs root and etcd (skipped with a message otherwise).
//!
//! Who sees which source address is read deterministically: the test opens a TCP listener
//! inside the receiving namespace (the lab's underlay, which holds the gateway 192.0.2.1,
//! or another host's workload), connects to it from inside the sending workload's
//! namespace (both through `netns::run_in`, sockets made on a thread that entered the
//! namespace), and takes the peer address `accept` returns.

use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Duration;

use overlay_lab::{http_get_in, netns, Lab, UNDERLAY_GATEWAY};
use overlay_tests::labs::{lab_or_skip, run_in, workload_ip};
use overlay_tests::wait_until;

const PATIENCE: Duration = Duration::from_secs(30);
/// The lab's agents resync every 2 s: a repair shows within one resync, plus the time the
/// reconcile itself takes on a busy machine.
const ONE_RESYNC: Duration = Duration::from_secs(5);

fn lab(test: &str, firewall: &str, env: Vec<(String, String)>) -> Option<(Lab, tempfile::TempDir)> {
    lab_or_skip(test, |s| {
        s.hosts = 2;
        s.ip_masq = true;
        s.agent_args.push(format!("--firewall={firewall}"));
        s.agent_env = env;
    })
}

/// Connects from workload `from` to a listener made in namespace `ns` on `ip`; the source
/// address the listener saw.
fn source_seen(lab: &Lab, from: &str, ns: &str, ip: &str) -> Option<IpAddr> {
    let ip: IpAddr = ip.parse().unwrap();
    let listener = netns::run_in(ns, move || TcpListener::bind((ip, 0)))
        .unwrap()
        .unwrap();
    let to = listener.local_addr().unwrap();
    let from_ns = lab.state.target_ns(from).unwrap();
    let _stream = netns::run_in(&from_ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .unwrap()
    .ok()?;
    // Connected: the connection waits in the listener's queue.
    let (_conn, peer) = listener.accept().unwrap();
    Some(peer.ip())
}

fn eventually_seen(lab: &Lab, from: &str, ns: &str, ip: &str) -> IpAddr {
    wait_until(PATIENCE, || source_seen(lab, from, ns, ip))
        .unwrap_or_else(|| panic!("{from} cannot connect to {ip}"))
}

/// Overlay's rules on `host` as the implementation's own tool prints them, counters
/// dropped.
fn rules_on(lab: &Lab, host: &str, firewall: &str) -> String {
    let text = if firewall == "nftables" {
        run_in(lab, host, &["nft", "list", "table", "inet", "overlay"])
    } else {
        run_in(lab, host, &[&format!("{firewall}-save")])
            .lines()
            .filter(|l| l.contains("OVERLAY-") && !l.starts_with(':'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let mut out = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets" || w == "bytes" {
                words.next();
            } else {
                out += w;
                out += " ";
            }
        }
        out += "\n";
    }
    out
}

/// Deletes the masquerade rule on `host` by hand.
fn delete_masquerade(lab: &Lab, host: &str, firewall: &str) {
    let out = if firewall == "nftables" {
        let listing = run_in(
            lab,
            host,
            &[
                "nft",
                "-a",
                "list",
                "chain",
                "inet",
                "overlay",
                "postrouting",
            ],
        );
        let handle = listing
            .lines()
            .find(|l| l.contains("masquerade"))
            .and_then(|l| l.rsplit("handle ").next())
            .unwrap_or_else(|| panic!("no masquerade rule:\n{listing}"))
            .trim()
            .to_string();
        lab.exec(
            host,
            "nft",
            &[
                "delete",
                "rule",
                "inet",
                "overlay",
                "postrouting",
                "handle",
                &handle,
            ],
        )
    } else {
        lab.exec(
            host,
            firewall,
            &[
                "-t",
                "nat",
                "-D",
                "OVERLAY-POSTROUTING",
                "-s",
                "10.244.0.0/16",
                "-j",
                "MASQUERADE",
                "--random-fully",
            ],
        )
    }
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn firewall_status(lab: &Lab, host: &str) -> serde_json::Value {
    lab.state
        .agent_status(lab.state.host(host).unwrap())
        .expect("agent status")["firewall"]
        .clone()
}

fn metrics(lab: &Lab, host: &str) -> String {
    let ns = &lab.state.host(host).unwrap().ns;
    http_get_in(ns, "127.0.0.1", overlay_lab::AGENT_HEALTH_PORT, "/metrics")
        .expect("metrics")
        .1
}

/// Masquerading leaves the cluster only, the other host sees the workload itself, and a
/// rule deleted by hand comes back within one resync, counted as a repair.
fn scenario(lab: &Lab, firewall: &str) {
    let h1 = lab.state.host("h1").unwrap().clone();
    let w1 = workload_ip(lab, "h1/w1");
    let outside = eventually_seen(lab, "h1/w1", &lab.state.underlay_ns, UNDERLAY_GATEWAY);
    assert_eq!(
        outside.to_string(),
        h1.underlay_ip,
        "leaving the cluster, the workload is masqueraded to its host's address"
    );
    let w2_ns = lab.state.target_ns("h2/w1").unwrap();
    let inside = eventually_seen(lab, "h1/w1", &w2_ns, &workload_ip(lab, "h2/w1"));
    assert_eq!(
        inside.to_string(),
        w1,
        "inside the cluster, no masquerading"
    );

    let fw = firewall_status(lab, "h1");
    assert_eq!(fw["implementation"], firewall, "{fw}");
    assert_eq!(fw["repairs"], 0, "{fw}");
    let before = rules_on(lab, "h1", firewall);
    assert!(before.to_lowercase().contains("masquerade"), "{before}");

    delete_masquerade(lab, "h1", firewall);
    wait_until(ONE_RESYNC, || {
        (firewall_status(lab, "h1")["repairs"] == 1 && rules_on(lab, "h1", firewall) == before)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the deleted rule is not back within one resync:\n{}\nstatus: {}",
            rules_on(lab, "h1", firewall),
            firewall_status(lab, "h1")
        )
    });
    assert!(firewall_status(lab, "h1")["last_repair"].is_string());
    let m = metrics(lab, "h1");
    assert!(m.contains("overlay_agent_firewall_repairs_total 1"), "{m}");
    assert!(
        m.contains(&format!(
            "overlay_agent_firewall_info{{implementation=\"{firewall}\"}} 1"
        )),
        "{m}"
    );
    let again = eventually_seen(lab, "h1/w1", &lab.state.underlay_ns, UNDERLAY_GATEWAY);
    assert_eq!(again.to_string(), h1.underlay_ip);
}

/// With iptables, the FORWARD policy DROP that dockerd sets does not stop the cluster's
/// traffic: the accepts sit in a chain jumped to from FORWARD itself.
fn survives_forward_drop(lab: &Lab, iptables: &str) {
    for h in ["h1", "h2"] {
        let out = lab.exec(h, iptables, &["-P", "FORWARD", "DROP"]).unwrap();
        assert!(out.status.success());
    }
    let w2_ns = lab.state.target_ns("h2/w1").unwrap();
    let seen = eventually_seen(lab, "h1/w1", &w2_ns, &workload_ip(lab, "h2/w1"));
    assert_eq!(seen.to_string(), workload_ip(lab, "h1/w1"));
    let policy = run_in(lab, "h1", &[iptables, "-S", "FORWARD"]);
    assert!(
        policy.contains("-P FORWARD DROP"),
        "the policy is not ours to change: {policy}"
    );
}

#[test]
fn nftables_masquerades_leaving_traffic_and_repairs_its_rules() {
    let Some((lab, _dir)) = lab("firewall_nftables", "nftables", Vec::new()) else {
        return;
    };
    scenario(&lab, "nftables");
}

#[test]
fn iptables_nft_masquerades_leaving_traffic_and_repairs_its_rules() {
    let Some((lab, _dir)) = lab("firewall_iptables_nft", "iptables-nft", Vec::new()) else {
        return;
    };
    scenario(&lab, "iptables-nft");
    survives_forward_drop(&lab, "iptables-nft");
}

#[test]
fn iptables_legacy_masquerades_leaving_traffic_and_repairs_its_rules() {
    let Some((lab, _dir)) = lab("firewall_iptables_legacy", "iptables-legacy", Vec::new()) else {
        return;
    };
    scenario(&lab, "iptables-legacy");
    survives_forward_drop(&lab, "iptables-legacy");
}

/// A host with nftables only: the agents' PATH holds a link to `nft` and nothing else.
#[test]
fn nftables_works_without_any_iptables_tool() {
    if !overlay_tests::is_root() {
        overlay_tests::skip("nftables_works_without_any_iptables_tool", "needs root");
        return;
    }
    let nft = which("nft").expect("nft is installed");
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&nft, bin.path().join("nft")).unwrap();
    let path = bin.path().to_string_lossy().into_owned();
    let Some((lab, _dir)) = lab("firewall_nft_only", "nftables", vec![("PATH".into(), path)])
    else {
        return;
    };
    scenario(&lab, "nftables");
    // Nothing went through iptables-nft either (it would have made ip filter/nat).
    let tables = run_in(&lab, "h1", &["nft", "list", "tables"]);
    assert_eq!(tables, "table inet overlay\n");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
