//! Scenario 1: etcd killed for 30 s and restarted on its data dir, under a short lease
//! TTL so that agents keep renewing through the outage. Nothing may be lost: no packet,
//! lease or kernel entry, and the cluster takes a new host afterwards.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use overlay_lab::Service;
use overlay_tests::labs::{dump, workload_ip};
use overlay_tests::wait_until;

use crate::lab_probes::{
    controller_ready, datapath_writes, lab, lab_leases, ping_eventually, renewals, Pinger,
    RENEWALS_FAILED, RENEWALS_OK,
};
use crate::report::Summary;
use crate::PATIENCE;

pub fn etcd_down_for_30s_loses_no_packet_lease_or_kernel_entry() {
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
    summary.row("packets h1/w1 -> h2/w1 sent / lost", out);
    summary.row("packets h2/w1 -> h1/w1 sent / lost", back);
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
