//! Scenario 4: a host's underlay link cut for longer than its lease TTL: its lease
//! expires, every other host removes its routes and FDB entries, and once the link is
//! back it rejoins with its subnet and traffic resumes without loss.

use std::time::{Duration, Instant};

use overlay_tests::labs::{ping, subnet_of, workload_ip};
use overlay_tests::wait_until;

use crate::lab_probes::{entries_for, lab, lab_leases, ping_eventually, Pinger};
use crate::report::Summary;
use crate::PATIENCE;

pub fn a_host_cut_off_past_its_lease_ttl_drops_out_everywhere_and_rejoins() {
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
        during,
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
