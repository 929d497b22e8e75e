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
//!
//! This file is the suite's index: the tests, by the names `cargo test` lists, each
//! running one scenario from `faults/`. Cargo makes a test binary of every file in
//! `tests/` and of every `tests/*/main.rs`, so the scenarios live in `faults/` without a
//! `main.rs` and are declared here with `#[path]`: one binary, `--test faults` runs them
//! all, and they share one build of the helpers: `report` (the tables), `lab_probes`
//! (the lab scenarios' readings and `Pinger`), `control_plane` (gRPC and etcd views for
//! the etcd-only scenarios).

use std::time::Duration;

#[path = "faults/agent_kills.rs"]
mod agent_kills;
#[path = "faults/bad_input.rs"]
mod bad_input;
#[path = "faults/control_plane.rs"]
mod control_plane;
#[path = "faults/controller_kills.rs"]
mod controller_kills;
#[path = "faults/etcd_outage.rs"]
mod etcd_outage;
#[path = "faults/lab_probes.rs"]
mod lab_probes;
#[path = "faults/report.rs"]
mod report;
#[path = "faults/underlay_cut.rs"]
mod underlay_cut;
#[path = "faults/watchers.rs"]
mod watchers;

/// How long any wait in the suite polls before it gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// A counter from a Prometheus `/metrics` body: every line starting with `name` (a name,
/// or a name and labels), summed.
fn sum_metric(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// 1. etcd down for 30 s.
#[test]
fn etcd_down_for_30s_loses_no_packet_lease_or_kernel_entry() {
    etcd_outage::etcd_down_for_30s_loses_no_packet_lease_or_kernel_entry();
}

/// 2. Controllers killed with SIGKILL during join bursts.
#[test]
fn controllers_killed_during_join_bursts_leave_no_duplicate_or_orphan() {
    controller_kills::controllers_killed_during_join_bursts_leave_no_duplicate_or_orphan();
}

/// 3. An agent killed with SIGKILL.
#[test]
fn an_agent_killed_with_sigkill_keeps_its_subnet_and_loses_no_packet() {
    agent_kills::an_agent_killed_with_sigkill_keeps_its_subnet_and_loses_no_packet();
}

/// 4. A host's underlay cut for longer than its lease TTL.
#[test]
fn a_host_cut_off_past_its_lease_ttl_drops_out_everywhere_and_rejoins() {
    underlay_cut::a_host_cut_off_past_its_lease_ttl_drops_out_everywhere_and_rejoins();
}

/// 5. Watch clients that fall behind, and one that resumes after a compaction.
#[test]
fn watch_clients_that_fall_behind_or_resume_after_compaction_end_exact() {
    watchers::watch_clients_that_fall_behind_or_resume_after_compaction_end_exact();
}

/// 6. The bad input catalogue.
#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    bad_input::bad_input_is_refused_with_a_clear_error_and_changes_nothing();
}
