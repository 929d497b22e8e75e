//! End-to-end datapath tests: three hosts made of network namespaces on an underlay
//! bridge, a real etcd and controller, one real `overlay-agent` per host, and a workload
//! namespace per host. Needs root (skipped with a message otherwise).

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use overlay_lab::{netns, Lab, LabSpec};
use overlay_tests::labs::{self, dump, lab_or_skip, ping, subnet_of, workload_ip};
use overlay_tests::{bin_path, wait_until};

const PATIENCE: Duration = Duration::from_secs(30);

fn lab(
    test: &str,
    backend: &str,
    tweak: impl FnOnce(&mut LabSpec),
) -> Option<(Lab, tempfile::TempDir)> {
    lab_or_skip(test, |spec| {
        spec.backend = backend.into();
        tweak(spec);
    })
}

fn ping_eventually(lab: &Lab, from: &str, to: &str) -> bool {
    labs::ping_eventually(lab, from, to, PATIENCE)
}

fn routes(lab: &Lab, host: &str) -> String {
    let out = lab
        .exec(host, "ip", &["route", "show", "proto", "79"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(lab: &Lab, host: &str) -> serde_json::Value {
    lab.state
        .agent_status(lab.state.host(host).unwrap())
        .expect("agent status")
}

fn all_workloads_reach_each_other(lab: &Lab) {
    let targets: Vec<String> = lab
        .state
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.host, w.name))
        .collect();
    for from in &targets {
        for to in &targets {
            if from != to {
                let ip = workload_ip(lab, to);
                assert!(
                    ping_eventually(lab, from, &ip),
                    "{from} cannot reach {to} ({ip})"
                );
            }
        }
    }
}

/// Starts `ping -i 0.05` in a workload; returns (sent, received) when stopped.
struct Pinger(std::process::Child);

impl Pinger {
    fn start(lab: &Lab, from: &str, to: &str) -> Pinger {
        let ns = lab.state.target_ns(from).unwrap();
        let mut cmd = Command::new("ping");
        cmd.args(["-i", "0.05", "-W", "1", to])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        netns::in_netns(&mut cmd, &ns).unwrap();
        Pinger(cmd.spawn().expect("ping"))
    }

    fn stop(self) -> (u64, u64) {
        // SIGINT makes ping print its summary.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("ping: {text}"));
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        (nums[0], nums[1])
    }
}

fn datapath_scenario(test: &str, backend: &str) {
    let Some((mut lab, _dir)) = lab(test, backend, |_| {}) else {
        return;
    };
    all_workloads_reach_each_other(&lab);
    let s3 = subnet_of(&lab, "h3");
    let s2 = subnet_of(&lab, "h2");
    for h in ["h1", "h2"] {
        assert!(
            routes(&lab, h).contains(&s3),
            "{h} has a route to h3's subnet:\n{}",
            routes(&lab, h)
        );
    }

    // `overlayctl routes --node h1`, computed from the leases alone, is what h1 has.
    let planned: serde_json::Value = serde_json::from_str(
        &lab.overlayctl(&[
            "routes".into(),
            "--node".into(),
            "h1".into(),
            "-o".into(),
            "json".into(),
        ])
        .unwrap(),
    )
    .unwrap();
    let planned: HashSet<(String, String, String)> = planned
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["subnet"].as_str().unwrap().into(),
                r["via"].as_str().unwrap().into(),
                r["dev"].as_str().unwrap().into(),
            )
        })
        .collect();
    let kernel = lab
        .exec("h1", "ip", &["-j", "route", "show", "proto", "79"])
        .unwrap();
    let kernel: serde_json::Value = serde_json::from_slice(&kernel.stdout).unwrap();
    let kernel: HashSet<(String, String, String)> = kernel
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap().into(),
                r["gateway"].as_str().unwrap().into(),
                r["dev"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        planned, kernel,
        "overlayctl routes --node h1 differs from h1's kernel"
    );
    assert_eq!(planned.len(), 2);

    // A peer that cannot be programmed is reported, not silently broken.
    lab.overlayctl(&[
        "lease".into(),
        "reserve".into(),
        "--subnet".into(),
        "10.244.250.0/24".into(),
        "--node".into(),
        "far".into(),
        "--public-ip".into(),
        "198.51.100.50".into(),
    ])
    .unwrap();
    let reason = wait_until(PATIENCE, || {
        let st = status(&lab, "h1");
        st["last_reconcile"]["skipped"]
            .as_array()?
            .iter()
            .find(|p| p[0] == "10.244.250.0/24")
            .map(|p| p[1].as_str().unwrap_or_default().to_string())
    })
    .expect("h1 reports the peer it cannot program");
    let expected = if backend == "host-gw" {
        "not directly reachable"
    } else {
        "has not published a VTEP MAC"
    };
    assert!(reason.contains(expected), "{reason}");
    let ctl = bin_path("overlayctl");
    let shown = lab
        .exec("h1", ctl.to_str().unwrap(), &["agent", "status"])
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("10.244.250.0/24") && shown.contains(expected),
        "overlayctl agent status:\n{shown}"
    );
    let metrics = overlay_lab::http_get_in(
        &lab.state.host("h1").unwrap().ns,
        "127.0.0.1",
        7402,
        "/metrics",
    )
    .unwrap()
    .1;
    assert!(
        metrics.contains("overlay_agent_skipped_peers 1"),
        "{metrics}"
    );
    assert!(
        !routes(&lab, "h1").contains("10.244.250.0"),
        "no route to an unreachable peer"
    );
    lab.overlayctl(&["lease".into(), "revoke".into(), "10.244.250.0/24".into()])
        .unwrap();

    // An agent restart with an unchanged world: no entry changes, no write, no packet lost.
    let before = dump(&lab, "h1");
    let w1 = workload_ip(&lab, "h1/w1");
    let w2 = workload_ip(&lab, "h2/w1");
    let out = Pinger::start(&lab, "h2/w1", &w1);
    let back = Pinger::start(&lab, "h1/w1", &w2);
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent("h1", libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent("h1").unwrap();
    lab.wait_agent_ready("h1", PATIENCE).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (sent, received) = out.stop();
    let (sent_back, received_back) = back.stop();
    assert!(sent > 20, "ping ran: {sent}");
    assert_eq!(
        received, sent,
        "h2/w1 -> h1/w1 lost packets across the agent restart"
    );
    assert_eq!(
        received_back, sent_back,
        "h1/w1 -> h2/w1 lost packets across the agent restart"
    );
    assert_eq!(dump(&lab, "h1"), before, "the restart changed kernel state");
    assert_eq!(
        status(&lab, "h1")["datapath_writes"],
        0,
        "the restarted agent wrote to the kernel"
    );

    // A revoked peer's entries leave every host.
    lab.stop_agent("h3", libc::SIGTERM).unwrap();
    lab.overlayctl(&["lease".into(), "revoke".into(), s3.clone()])
        .unwrap();
    for h in ["h1", "h2"] {
        wait_until(PATIENCE, || (!routes(&lab, h).contains(&s3)).then_some(()))
            .unwrap_or_else(|| panic!("{h} kept the route to revoked {s3}:\n{}", routes(&lab, h)));
    }
    // A peer revoked while this host's agent was down is cleaned when it comes back.
    lab.stop_agent("h1", libc::SIGTERM).unwrap();
    lab.stop_agent("h2", libc::SIGTERM).unwrap();
    lab.overlayctl(&["lease".into(), "revoke".into(), s2.clone()])
        .unwrap();
    assert!(
        routes(&lab, "h1").contains(&s2),
        "nothing removes entries while the agent is down"
    );
    lab.start_agent("h1").unwrap();
    lab.wait_agent_ready("h1", PATIENCE).unwrap();
    wait_until(PATIENCE, || {
        (!routes(&lab, "h1").contains(&s2)).then_some(())
    })
    .unwrap_or_else(|| panic!("h1 kept the stale route to {s2}:\n{}", routes(&lab, "h1")));
    if backend == "vxlan" {
        let neigh = lab
            .exec("h1", "ip", &["neigh", "show", "dev", "ovl.1"])
            .unwrap();
        assert!(
            String::from_utf8_lossy(&neigh.stdout).trim().is_empty(),
            "stale neighbours on h1"
        );
        let fdb = lab
            .exec("h1", "bridge", &["fdb", "show", "dev", "ovl.1"])
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        assert!(
            !fdb.contains("192.0.2.12") && !fdb.contains("192.0.2.13"),
            "stale FDB entries on h1:\n{fdb}"
        );
    }
    // The revoked hosts come back (with their subnets, now free again) and traffic resumes.
    lab.start_agent("h2").unwrap();
    lab.start_agent("h3").unwrap();
    lab.wait_agent_ready("h2", PATIENCE).unwrap();
    lab.wait_agent_ready("h3", PATIENCE).unwrap();
    all_workloads_reach_each_other(&lab);
}

#[test]
fn vxlan_connects_hosts_and_keeps_the_kernel_equal_to_the_leases() {
    datapath_scenario(
        "vxlan_connects_hosts_and_keeps_the_kernel_equal_to_the_leases",
        "vxlan",
    );
}

#[test]
fn host_gw_connects_hosts_and_keeps_the_kernel_equal_to_the_leases() {
    datapath_scenario(
        "host_gw_connects_hosts_and_keeps_the_kernel_equal_to_the_leases",
        "host-gw",
    );
}

#[test]
fn a_deleted_vtep_comes_back() {
    let Some((lab, _dir)) = lab("a_deleted_vtep_comes_back", "vxlan", |s| s.hosts = 2) else {
        return;
    };
    let to = workload_ip(&lab, "h2/w1");
    assert!(ping_eventually(&lab, "h1/w1", &to));
    let mac_before = dump(&lab, "h1");
    lab.exec("h1", "ip", &["link", "del", "ovl.1"]).unwrap();
    wait_until(PATIENCE, || {
        lab.exec("h1", "ip", &["link", "show", "ovl.1"])
            .ok()
            .filter(|o| o.status.success())
    })
    .expect("the VTEP was recreated");
    assert!(
        ping_eventually(&lab, "h1/w1", &to),
        "traffic resumed after the VTEP came back"
    );
    assert_eq!(
        dump(&lab, "h1")
            .lines()
            .filter(|l| l.contains("link/ether"))
            .collect::<Vec<_>>(),
        mac_before
            .lines()
            .filter(|l| l.contains("link/ether"))
            .collect::<Vec<_>>(),
        "same VTEP MAC"
    );
}

#[test]
fn ip_masq_masquerades_only_traffic_leaving_the_cluster() {
    // Without masquerading the underlay has no route back to workloads.
    let Some((plain, _d1)) = lab("ip_masq_off", "vxlan", |s| s.hosts = 1) else {
        return;
    };
    assert!(
        !ping(&plain, "h1/w1", "192.0.2.1"),
        "without --ip-masq the underlay cannot answer a workload"
    );
    drop(plain);
    let Some((lab, _d2)) = lab("ip_masq_on", "vxlan", |s| {
        s.hosts = 2;
        s.agent_args.push("--ip-masq".into());
        // The listing below uses the `iptables` command: the agent uses the same.
        s.agent_args.push("--firewall=iptables".into());
    }) else {
        return;
    };
    assert!(
        ping_eventually(&lab, "h1/w1", "192.0.2.1"),
        "masqueraded traffic leaves the cluster"
    );
    all_workloads_reach_each_other(&lab);
    let rules = lab
        .exec(
            "h1",
            "iptables",
            &["-t", "nat", "-S", "OVERLAY-POSTROUTING"],
        )
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-d 10.244.0.0/16 -j RETURN") && rules.contains("MASQUERADE"),
        "{rules}"
    );
    let mut seen = HashSet::new();
    for w in &lab.state.workloads {
        seen.insert(w.ip.clone());
    }
    assert_eq!(seen.len(), 2);
}

/// `--bridge none`: another runtime (Docker with `--bip`) owns the gateway, so the agent
/// makes no bridge, and everything else (VTEP, per-peer entries, subnet.env) still works.
/// The test plays Docker: a bridge with the gateway from subnet.env and a workload on it.
#[test]
fn bridge_none_leaves_the_bridge_to_another_runtime() {
    let Some((lab, _dir)) = lab(
        "bridge_none_leaves_the_bridge_to_another_runtime",
        "vxlan",
        |s| {
            s.hosts = 2;
            s.workloads_per_host = 0;
            s.agent_args
                .extend(["--bridge".to_string(), "none".to_string()]);
        },
    ) else {
        return;
    };
    for h in ["h1", "h2"] {
        let links = labs::run_in(&lab, h, &["ip", "-o", "link"]);
        assert!(!links.contains("ovl0"), "{h} made a bridge:\n{links}");
        assert!(links.contains("ovl.1"), "{h} has no VTEP:\n{links}");
    }
    assert!(routes(&lab, "h1").contains(&subnet_of(&lab, "h2")));
    // "dockerd --bip=$OVERLAY_SUBNET": a bridge holding the gateway, on each host.
    let mut ips = Vec::new();
    for h in ["h1", "h2"] {
        let host = lab.state.host(h).unwrap().clone();
        let env = std::fs::read_to_string(host.dir.join("run/subnet.env")).unwrap();
        let bip = env
            .lines()
            .find_map(|l| l.strip_prefix("OVERLAY_SUBNET="))
            .unwrap()
            .to_string();
        let (gw, len) = bip.split_once('/').unwrap();
        let ip: std::net::Ipv4Addr = gw.parse().unwrap();
        let ip = std::net::Ipv4Addr::from(u32::from(ip) + 1).to_string();
        let w = format!("{}-{h}-d", lab.state.ns_prefix);
        overlay_lab::netns::create(&w).unwrap();
        let ip_in = |ns: &str, args: &[&str]| overlay_lab::netns::ip_in(ns, args).unwrap();
        ip_in(&host.ns, &["link", "add", "docker0", "type", "bridge"]);
        ip_in(&host.ns, &["addr", "add", &bip, "dev", "docker0"]);
        ip_in(&host.ns, &["link", "set", "docker0", "up"]);
        overlay_lab::netns::veth(&w, "eth0", &host.ns, "vd", Some(1450)).unwrap();
        ip_in(&host.ns, &["link", "set", "vd", "master", "docker0", "up"]);
        ip_in(&w, &["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"]);
        ip_in(&w, &["link", "set", "eth0", "up"]);
        ip_in(&w, &["route", "add", "default", "via", gw]);
        ips.push((w, ip));
    }
    let ok = wait_until(PATIENCE, || {
        overlay_lab::netns::exec(&ips[0].0, "ping", &["-c", "1", "-W", "2", &ips[1].1])
            .ok()
            .map(|_| ())
    });
    for (w, _) in &ips {
        let _ = overlay_lab::netns::delete(w);
    }
    assert!(
        ok.is_some(),
        "containers on Docker-style bridges reach each other across hosts"
    );
}
