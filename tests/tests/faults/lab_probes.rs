//! What the lab scenarios (etcd outage, agent kills, underlay cut; root) read from a lab:
//! leases as `overlayctl` lists them, an agent's status and counters, the agent-owned
//! kernel entries for a subnet or address, and [`Pinger`], which counts every lost
//! `icmp_seq` of a ping that runs through a whole fault.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use overlay_lab::{netns, Lab, LabSpec};
use overlay_tests::labs::{self, lab_or_skip, run_in, workload_ip};

use crate::{sum_metric, PATIENCE};

pub fn lab(test: &str, tweak: impl FnOnce(&mut LabSpec)) -> Option<(Lab, tempfile::TempDir)> {
    lab_or_skip(test, tweak)
}

pub fn ping_eventually(lab: &Lab, from: &str, to: &str) -> bool {
    labs::ping_eventually(lab, from, to, PATIENCE)
}

/// Lines of the agent-owned state that mention `needle` (a subnet or an underlay IP).
pub fn entries_for(lab: &Lab, host: &str, needle: &str) -> Vec<String> {
    let mut s = run_in(lab, host, &["ip", "route", "show", "proto", "79"]);
    s += &run_in(lab, host, &["bridge", "fdb", "show", "dev", "ovl.1"]);
    s.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

pub fn agent_status(lab: &Lab, host: &str) -> serde_json::Value {
    lab.state
        .agent_status(lab.state.host(host).unwrap())
        .expect("agent status")
}

pub fn datapath_writes(lab: &Lab, host: &str) -> u64 {
    agent_status(lab, host)["datapath_writes"]
        .as_u64()
        .expect("datapath_writes")
}

/// The leases as `overlayctl leases` lists them: subnet -> node.
pub fn lab_leases(lab: &Lab) -> Option<BTreeMap<String, String>> {
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
pub fn agent_metric(lab: &Lab, host: &str, name: &str) -> u64 {
    let ns = &lab.state.host(host).unwrap().ns;
    let (_, body) =
        overlay_lab::http_get_in(ns, "127.0.0.1", overlay_lab::AGENT_HEALTH_PORT, "/metrics")
            .unwrap_or_default();
    sum_metric(&body, name)
}

pub const RENEWALS_OK: &str = "overlay_agent_lease_renewals_total{result=\"ok\"}";
pub const RENEWALS_FAILED: &str = "overlay_agent_lease_renewals_total{result=\"error\"}";

pub fn renewals(lab: &Lab, name: &str) -> u64 {
    ["h1", "h2"]
        .iter()
        .map(|h| agent_metric(lab, h, name))
        .sum()
}

pub fn controller_ready(lab: &Lab) -> Option<u16> {
    overlay_lab::http_get_in(&lab.state.underlay_ns, "127.0.0.1", 7401, "/readyz").map(|(c, _)| c)
}

/// Packets sent in the last second before a [`Pinger`] is stopped.
pub const PING_UNJUDGED: u64 = 20;

/// `ping -i 0.05` from a namespace, stopped with SIGINT.
pub struct Pinger {
    child: std::process::Child,
    what: String,
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct PingCount {
    pub sent: u64,
    pub lost: u64,
}

/// As the tables show it: "sent / lost".
impl std::fmt::Display for PingCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}", self.sent, self.lost)
    }
}

impl Pinger {
    pub fn start(lab: &Lab, from: &str, to_workload: &str) -> Pinger {
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
    pub fn stop(self) -> PingCount {
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
