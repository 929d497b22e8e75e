//! Multi-host labs (network namespaces, `overlay_lab`) as test fixtures, and what tests ask
//! of them: pings, workload addresses, the kernel state an agent owns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use overlay_lab::{Lab, LabSpec};

use crate::{bin_path, is_root, skip, wait_until};

/// The last subnet a lab host or test agent may lease at random in 10.244.0.0/16; tests
/// reserve only after it.
pub const RANDOM_SUBNET_MAX: &str = "10.244.199.0/24";

/// A lab built from the binaries next to the test, in namespaces `ovlt-<pid>-<n>-*`, torn
/// down on drop; `None` (skipped, or failed under OVERLAY_TEST_STRICT) without root or etcd.
/// Agents reconcile every 2 s, and hosts lease from 10.244.1.0/24 ... 10.244.199.0/24 (the
/// rest is for the tests' reservations, which no random allocation can then take); `tweak`
/// changes the rest.
pub fn lab_or_skip(
    test: &str,
    tweak: impl FnOnce(&mut LabSpec),
) -> Option<(Lab, tempfile::TempDir)> {
    if !is_root() {
        skip(test, "needs root for network namespaces");
        return None;
    }
    if crate::etcd::etcd_binary().is_none() {
        skip(test, "etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!(
        "ovlt-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_path_buf();
    let mut spec = LabSpec::new(test, &prefix, &dir.path().join("lab"), &bin_dir);
    spec.agent_args = vec!["--resync-interval=2s".into()];
    spec.subnet_max = Some(RANDOM_SUBNET_MAX.into());
    tweak(&mut spec);
    let lab = Lab::up(&spec, &mut |_| {}).unwrap_or_else(|e| panic!("lab up: {e}"));
    Some((lab, dir))
}

/// One ping from a host or workload (`h1`, `h1/w1`); whether it was answered.
pub fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    lab.exec(from, "ping", &["-n", "-c", "1", "-W", "2", to])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Pings until one is answered or `patience` passes.
pub fn ping_eventually(lab: &Lab, from: &str, to: &str, patience: Duration) -> bool {
    wait_until(patience, || ping(lab, from, to).then_some(())).is_some()
}

/// The address of workload `h1/w1`.
pub fn workload_ip(lab: &Lab, target: &str) -> String {
    let (h, w) = target.split_once('/').expect("HOST/WORKLOAD");
    lab.state
        .workloads
        .iter()
        .find(|x| x.host == h && x.name == w)
        .unwrap_or_else(|| panic!("no workload {target}"))
        .ip
        .clone()
}

/// The subnet a lab host leased, e.g. "10.244.7.0/24".
pub fn subnet_of(lab: &Lab, host: &str) -> String {
    lab.state
        .host_subnet(lab.state.host(host).unwrap())
        .expect("host has a subnet")
}

/// A command's stdout, run in a host or workload namespace.
pub fn run_in(lab: &Lab, target: &str, args: &[&str]) -> String {
    let out = lab.exec(target, args[0], &args[1..]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent-owned kernel state of a host, as `ip`/`bridge` print it.
pub fn dump(lab: &Lab, host: &str) -> String {
    let mut s = run_in(lab, host, &["ip", "route", "show", "proto", "79"]);
    s += &run_in(lab, host, &["ip", "neigh", "show", "nud", "permanent"]);
    s += &run_in(lab, host, &["bridge", "fdb", "show", "dev", "ovl.1"]);
    s += &run_in(lab, host, &["ip", "-d", "link", "show", "ovl.1"]);
    s += &run_in(lab, host, &["ip", "-4", "addr", "show", "ovl0"]);
    s
}
