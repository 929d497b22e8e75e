//! Scenario 5: watch clients that fall behind (a raw gRPC client with the smallest
//! window, `overlayctl watch` with its stdout unread) while etcd churns far past the
//! controller's broadcast buffer, and clients that resume after a compaction: every one
//! must end with exactly the leases etcd holds.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overlay_core::watch::LeaseCache;
use overlay_proto::v1::{self, admin_client::AdminClient, agent_client::AgentClient};
use overlay_tests::cluster::Controller;
use overlay_tests::{bin_path, wait_until, Etcd};
use tonic::transport::{Channel, Endpoint};

use crate::control_plane::{
    doc_ip, etcd_client, grpc_channel, metric, runtime, set_config, EtcdView,
};
use crate::report::Summary;
use crate::PATIENCE;

/// A raw gRPC watch client's view: subnet -> node, kept by the same [`LeaseCache`] the
/// agent uses.
struct WatchView {
    cache: LeaseCache,
    snapshots: usize,
    events: usize,
}

impl WatchView {
    fn new() -> WatchView {
        WatchView {
            cache: LeaseCache::new(0),
            snapshots: 0,
            events: 0,
        }
    }

    fn apply(&mut self, msg: v1::WatchLeasesResponse) {
        use v1::watch_leases_response::Kind;
        match msg.kind.expect("a message kind") {
            Kind::Snapshot(s) => {
                self.snapshots += 1;
                let leases = s
                    .leases
                    .iter()
                    .map(|l| overlay_proto::lease_from_proto(l).expect("valid lease"))
                    .collect();
                self.cache.resync(leases, s.revision);
            }
            Kind::Event(e) => {
                self.events += 1;
                self.cache
                    .apply(&overlay_proto::event_from_proto(&e).expect("valid event"));
            }
        }
    }

    fn set(&self) -> BTreeMap<String, String> {
        self.cache
            .leases()
            .map(|l| (l.subnet.to_string(), l.record.node.clone()))
            .collect()
    }
}

async fn open_watch(channel: Channel, after: i64) -> tonic::Streaming<v1::WatchLeasesResponse> {
    AgentClient::new(channel)
        .watch_leases(v1::WatchLeasesRequest {
            after_revision: after,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads `stream` into `view` until it equals `truth` (or the deadline passes).
async fn read_until(
    stream: &mut tonic::Streaming<v1::WatchLeasesResponse>,
    view: &mut WatchView,
    truth: &BTreeMap<String, String>,
) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while view.set() != *truth {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(msg))) => view.apply(msg),
            _ => return false,
        }
    }
    true
}

async fn list_leases(channel: Channel) -> BTreeMap<String, String> {
    AgentClient::new(channel)
        .list_leases(v1::ListLeasesRequest {})
        .await
        .expect("list leases")
        .into_inner()
        .leases
        .into_iter()
        .map(|l| (l.subnet, l.node))
        .collect()
}

fn churn_subnet(k: usize) -> ipnet::Ipv4Net {
    let n = (k % 4000) + 64;
    format!("10.{}.{}.0/24", 96 + n / 256, n % 256)
        .parse()
        .unwrap()
}

/// A reservation-like lease value for churn node `k`.
fn churn_record(k: usize) -> Vec<u8> {
    overlay_core::lease::LeaseRecord {
        node: format!("churn-{k}"),
        public_ip: Some(doc_ip(k).parse().unwrap()),
        public_ipv6: None,
        ipv6_subnet: None,
        backend: overlay_core::BackendType::Alloc,
        backend_data: Default::default(),
        reserved: true,
        created_at: overlay_core::lease::now_millis(),
        renewed_at: overlay_core::lease::now_millis(),
    }
    .encode()
}

/// How long the slow clients go unread: longer than the controller's HTTP/2 keepalive
/// (a ping every 20 s, 10 s to answer), as a pager left open would.
const UNREAD: Duration = Duration::from_secs(40);

pub fn watch_clients_that_fall_behind_or_resume_after_compaction_end_exact() {
    let test = "watch_clients_that_fall_behind_or_resume_after_compaction_end_exact";
    let Some(etcd) = Etcd::start_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Controller::start(&etcd, "/overlay", dir.path(), "controller-a");
    let b = Controller::start(&etcd, "/overlay", dir.path(), "controller-b");
    set_config(&a.url, &["--network", "10.96.0.0/12", "--backend", "alloc"]);
    let mut summary =
        Summary::new("5. watch clients falling behind, and resuming after a compaction");
    let rt = runtime();
    let _g = rt.enter();
    let (ca, cb) = (grpc_channel(&a.url), grpc_channel(&b.url));
    let admin = AdminClient::new(ca.clone());
    // Leases that stay throughout.
    for i in 0..20 {
        rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: format!("10.96.{}.0/24", i + 1),
            node: format!("seed-{i}"),
            public_ip: doc_ip(i),
            ..Default::default()

        }))
        .expect("seed reservation");
    }
    let seeds = rt.block_on(list_leases(ca.clone()));

    // A slow client with the smallest HTTP/2 window, so that few events fit in flight:
    // it reads its snapshot, then stops reading.
    let slow_channel = Endpoint::from_shared(a.url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .http2_adaptive_window(false)
        .connect_lazy();
    let mut slow = WatchView::new();
    let mut slow_stream = rt.block_on(open_watch(slow_channel, 0));
    assert!(rt.block_on(read_until(&mut slow_stream, &mut slow, &seeds)));
    // A fast client reading all along.
    let fast = Arc::new(Mutex::new(WatchView::new()));
    let fast_reader = {
        let fast = fast.clone();
        let ca = ca.clone();
        rt.spawn(async move {
            let mut stream = open_watch(ca, 0).await;
            while let Ok(Some(msg)) = stream.message().await {
                fast.lock().unwrap().apply(msg);
            }
        })
    };
    // `overlayctl watch -o json` on the other controller, its stdout not read meanwhile.
    let ctl_stderr = dir.path().join("watch.stderr");
    let mut ctl_watch = Command::new(bin_path("overlayctl"));
    ctl_watch
        .arg("--insecure")
        .arg(format!("--controller={}", b.url))
        .args(["watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&ctl_stderr).unwrap());
    let mut ctl_watch = overlay_tests::Child::spawn("watch", &mut ctl_watch).unwrap();
    // Two clients that read their snapshot and disconnect, to resume later.
    let mut resumers = Vec::new();
    for channel in [ca.clone(), cb.clone()] {
        let mut view = WatchView::new();
        let mut stream = rt.block_on(open_watch(channel, 0));
        assert!(rt.block_on(read_until(&mut stream, &mut view, &seeds)));
        resumers.push((view.cache.revision(), view));
    }

    // Churn, far more than the controller's broadcast buffer holds: transactions that
    // each create 50 leases and delete the 50 made two transactions earlier (as many
    // controllers writing at once would), then a last few through the controller's API.
    const TXNS: usize = 90;
    const PER_TXN: usize = 50;
    let unread_from = Instant::now();
    let mut etcd_kv = rt.block_on(etcd_client(&etcd));
    let key = |k: usize| {
        format!(
            "/overlay/leases/{}",
            overlay_core::subnet::subnet_key(churn_subnet(k))
        )
    };
    let mut changes = 0;
    for t in 0..TXNS {
        let mut ops: Vec<etcd_client::TxnOp> = (t * PER_TXN..(t + 1) * PER_TXN)
            .map(|k| etcd_client::TxnOp::put(key(k), churn_record(k), None))
            .collect();
        if t >= 2 {
            ops.extend(
                ((t - 2) * PER_TXN..(t - 1) * PER_TXN)
                    .map(|k| etcd_client::TxnOp::delete(key(k), None)),
            );
        }
        changes += ops.len();
        rt.block_on(etcd_kv.txn(etcd_client::Txn::new().and_then(ops)))
            .expect("churn transaction");
    }
    let live_from = (TXNS - 2) * PER_TXN;
    for k in live_from..live_from + 10 {
        rt.block_on(admin.clone().revoke_lease(v1::RevokeLeaseRequest {
            subnet: churn_subnet(k).to_string(),
        }))
        .expect("revoke");
        rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
            subnet: churn_subnet(k + 10_000).to_string(),
            node: format!("late-{k}"),
            public_ip: doc_ip(k),
            ..Default::default()

        }))
        .expect("reserve");
        changes += 2;
    }
    let churn_time = unread_from.elapsed();
    let truth = rt.block_on(list_leases(cb.clone()));
    assert_eq!(
        truth.len(),
        seeds.len() + 2 * PER_TXN,
        "the churn left what it meant to"
    );

    // Compaction of everything so far, and a controller started after it (its history
    // begins there): resuming from before the compaction can only be answered with a
    // snapshot. The other client resumes on a controller that ran throughout.
    let rev = rt.block_on(EtcdView::read(&mut etcd_kv)).revision;
    rt.block_on(etcd_kv.compact(rev, None)).expect("compact");
    let c = Controller::start(&etcd, "/overlay", dir.path(), "controller-c");
    let cc = grpc_channel(&c.url);
    let mut resumed = Vec::new();
    for ((after, mut view), (name, channel)) in resumers.into_iter().zip([
        ("controller c (started after the compaction)", cc.clone()),
        ("controller b (running throughout)", cb.clone()),
    ]) {
        let (snapshots, events) = (view.snapshots, view.events);
        let mut stream = rt.block_on(open_watch(channel, after));
        let exact = rt.block_on(read_until(&mut stream, &mut view, &truth));
        resumed.push((
            name,
            after,
            exact,
            view.snapshots - snapshots,
            view.events - events,
            view.set().len(),
        ));
    }

    // The slow clients read again.
    std::thread::sleep(UNREAD.saturating_sub(unread_from.elapsed()));
    let unread = unread_from.elapsed();
    let slow_exact = rt.block_on(read_until(&mut slow_stream, &mut slow, &truth));
    let lines = ctl_watch.inner.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(lines).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ctl_view: BTreeMap<String, String> = BTreeMap::new();
    let mut ctl_lines = 0;
    let deadline = Instant::now() + PATIENCE;
    while ctl_view != truth && Instant::now() < deadline {
        let line = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        ctl_lines += 1;
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let subnet = v["lease"]["subnet"].as_str().unwrap().to_string();
        match v["type"].as_str() {
            Some("added") => {
                ctl_view.insert(subnet, v["lease"]["node"].as_str().unwrap().to_string());
            }
            Some("removed") => {
                ctl_view.remove(&subnet);
            }
            other => panic!("unexpected watch line type {other:?}: {line}"),
        }
    }
    let ctl_exact = ctl_view == truth;
    // Still watching after the stall? One more change must reach it.
    let probe = churn_subnet(20_000).to_string();
    rt.block_on(admin.clone().reserve_subnet(v1::ReserveSubnetRequest {
        subnet: probe.clone(),
        node: "probe".into(),
        public_ip: doc_ip(0),
        ..Default::default()

    }))
    .expect("reserve the probe");
    let deadline = Instant::now() + PATIENCE;
    let mut ctl_follows = false;
    while !ctl_follows && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => ctl_follows = line.contains(&probe),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    rt.block_on(admin.clone().revoke_lease(v1::RevokeLeaseRequest {
        subnet: probe.clone(),
    }))
    .expect("revoke the probe");
    let ctl_exit = ctl_watch.wait_timeout(Duration::from_millis(500));
    let ctl_error = std::fs::read_to_string(&ctl_stderr).unwrap_or_default();
    let fast_exact = wait_until(PATIENCE, || {
        (fast.lock().unwrap().set() == truth).then_some(())
    })
    .is_some();
    let (fast_snapshots, fast_events) = {
        let f = fast.lock().unwrap();
        (f.snapshots, f.events)
    };
    fast_reader.abort();
    let resyncs = [&a, &b, &c].map(|x| metric(x, "overlay_controller_watch_resyncs"));

    summary.row(
        "lease changes",
        format!(
            "{changes} in {:.1} s ({TXNS} etcd transactions of {} + 20 through the controller)",
            churn_time.as_secs_f64(),
            2 * PER_TXN
        ),
    );
    summary.row("leases at the end", truth.len());
    summary.row(
        "slow clients left unread for",
        format!("{:.0} s", unread.as_secs_f64()),
    );
    summary.row(
        "slow raw gRPC client (64 KiB window): snapshots / events read, exact at the end",
        format!("{} / {}, {}", slow.snapshots, slow.events, slow_exact),
    );
    summary.row(
        "slow `overlayctl watch -o json` (stdout unread): lines read, exact at the end, still watching",
        format!(
            "{ctl_lines}, {ctl_exact}, {ctl_follows}{}",
            match ctl_exit {
                Some(status) => format!(" (exited: {status}: {})", ctl_error.trim()),
                None => String::new(),
            }
        ),
    );
    summary.row(
        "fast raw gRPC client: snapshots / events, exact at the end",
        format!("{fast_snapshots} / {fast_events}, {fast_exact}"),
    );
    summary.row(
        "resync snapshots sent by controllers a / b / c",
        format!("{} / {} / {}", resyncs[0], resyncs[1], resyncs[2]),
    );
    summary.row("etcd compacted at revision", rev);
    for (name, after, exact, snaps, events, _) in &resumed {
        summary.row(
            &format!("resumed from revision {after} on {name}: snapshots / events, exact"),
            format!("{snaps} / {events}, {exact}"),
        );
    }
    let wrong = [slow_exact, ctl_exact, fast_exact]
        .into_iter()
        .chain(resumed.iter().map(|r| r.2))
        .filter(|ok| !ok)
        .count();
    summary.row("clients ending with a wrong set", wrong);
    summary.finish();

    // Whether the slow client also needed a fresh snapshot depends on how the fan-out
    // batched the churn (one broadcast per etcd watch response, coalesced when several are
    // waiting), so it is reported above, not required: the resync path itself is proven
    // by `controller/src/fanout.rs`
    // `a_client_that_falls_behind_gets_a_fresh_snapshot_and_blocks_nobody`. What must hold
    // either way is that the client ends with the exact set.
    assert!(
        slow_exact,
        "the slow raw client ended with {} leases, not {}",
        slow.set().len(),
        truth.len()
    );
    assert_eq!(
        ctl_view.len(),
        truth.len(),
        "overlayctl watch ended with another set ({})",
        if ctl_error.is_empty() {
            "no error"
        } else {
            ctl_error.trim()
        }
    );
    assert_eq!(ctl_view, truth, "overlayctl watch ended with another set");
    assert!(
        ctl_follows,
        "overlayctl watch stopped following after its output stalled for {:.0} s: {}",
        unread.as_secs_f64(),
        if ctl_error.is_empty() {
            "no error"
        } else {
            ctl_error.trim()
        }
    );
    assert!(fast_exact, "the fast client ended with another set");
    for (name, _, exact, snaps, _, len) in &resumed {
        assert!(
            exact,
            "the client resumed on {name} ended with {len} leases, not {}",
            truth.len()
        );
        if name.contains("compaction") {
            assert_eq!(
                *snaps, 1,
                "resuming from before a compaction gives a snapshot"
            );
        }
    }
}
