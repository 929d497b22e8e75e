//! Scenario 2: two controllers, one SIGKILLed during each burst of joins; joining nodes
//! fail over as agents do. No subnet may go to two nodes, no key or etcd lease may be
//! orphaned past one TTL, and every lease stays renewable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use overlay_proto::v1::{self, agent_client::AgentClient};
use overlay_tests::cluster::Controller;
use overlay_tests::{wait_until, Etcd};
use tonic::transport::Channel;

use crate::control_plane::{
    doc_ip, etcd_client, grpc_channel, is_retryable, runtime, set_config, EtcdView,
};
use crate::report::Summary;
use crate::PATIENCE;

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

pub fn controllers_killed_during_join_bursts_leave_no_duplicate_or_orphan() {
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
