//! Scenario 3: agents killed with SIGKILL (when settled, and again right after a
//! restart) come back with the same subnet, write nothing to the kernel, and no packet
//! between workloads is lost meanwhile.

use std::time::Duration;

use overlay_tests::labs::{dump, subnet_of, workload_ip};
use overlay_tests::wait_until;

use crate::lab_probes::{agent_metric, datapath_writes, lab, lab_leases, ping_eventually, Pinger};
use crate::report::Summary;
use crate::PATIENCE;

pub fn an_agent_killed_with_sigkill_keeps_its_subnet_and_loses_no_packet() {
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
    summary.row("packets h1/w1 -> h2/w1 sent / lost", out);
    summary.row("packets h2/w1 -> h1/w1 sent / lost", back);
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
