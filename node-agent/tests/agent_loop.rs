//! The agent's loop against in-memory fakes of the control plane and of the host (the
//! `testing` feature): no root, no etcd, no controller. Each test runs the real
//! [`Agent::run`] on a vxlan cluster and watches what it does to the fakes.
//!
//! Waits are conditions polled with a bound (`eventually`), never sleeps: the bound only
//! says how long a broken loop may take to be reported.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use overlay_agent::agent::{Agent, AgentError, AgentOptions, SharedStatus};
use overlay_agent::backend::HostEffects;
use overlay_agent::control_plane::fake::FakeControlPlane;
use overlay_agent::datapath::{Datapath, FakeDatapath};
use overlay_agent::firewall::{FakeFirewall, FirewallRules};
use overlay_agent::hostnet::HostInfo;
use overlay_agent::sysctl::FakeSysctl;
use overlay_core::config::NetworkConfig;
use overlay_core::lease::{BackendData, Lease, LeaseRecord};
use overlay_core::{BackendType, MacAddr};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PATIENCE: Duration = Duration::from_secs(20);
const NODE: &str = "h1";

fn config(vni: u32) -> NetworkConfig {
    NetworkConfig::from_json(&format!(
        r#"{{"network":"10.244.0.0/16","backend":{{"type":"vxlan","vni":{vni}}}}}"#
    ))
    .unwrap()
}

fn host() -> HostInfo {
    HostInfo {
        public_ip: Some("192.0.2.11".parse().unwrap()),
        public_ipv6: None,
        iface: Some("eth0".into()),
        underlay: Some("192.0.2.0/24".parse().unwrap()),
        underlay_v6: None,
        mtu: 1500,
        given: (true, false),
    }
}

/// Another host's lease, with a VTEP MAC of its own.
fn peer(subnet: &str, node: &str, ip: &str) -> Lease {
    Lease {
        subnet: subnet.parse().unwrap(),
        record: LeaseRecord {
            node: node.into(),
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            ipv6_subnet: None,
            backend: BackendType::Vxlan,
            backend_data: BackendData {
                vtep_mac: Some(MacAddr::derive(node)),
                ..Default::default()
            },
            reserved: false,
            created_at: overlay_core::lease::now_millis(),
            renewed_at: overlay_core::lease::now_millis(),
        },
    }
}

/// One host: its fakes and directories, which outlive any one agent run (a restart is a
/// second run over the same host).
struct Host {
    control: Arc<FakeControlPlane>,
    datapath: Arc<FakeDatapath>,
    firewall: Arc<FakeFirewall>,
    sysctl: Arc<FakeSysctl>,
    dir: tempfile::TempDir,
}

/// A running agent; `stop` ends it as SIGTERM would.
struct Running {
    status: SharedStatus,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Host {
    fn new(control: Arc<FakeControlPlane>) -> Host {
        Host {
            control,
            datapath: Arc::new(FakeDatapath::with_underlay(
                "eth0",
                "192.0.2.11/24".parse().unwrap(),
            )),
            firewall: Arc::new(FakeFirewall::default()),
            sysctl: Arc::new(FakeSysctl::default()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn start(&self, resync: Duration) -> Running {
        let opts = AgentOptions {
            node: NODE.into(),
            run_dir: self.dir.path().join("run"),
            state_dir: self.dir.path().join("state"),
            bridge: Some("ovl0".into()),
            ip_masq: true,
            resync_interval: resync,
            cni_conf_dir: Some(self.dir.path().join("cni")),
            cni_data_dir: None,
        };
        let effects = HostEffects {
            datapath: self.datapath.clone(),
            firewall: self.firewall.clone(),
            sysctl: self.sysctl.clone(),
        };
        let status = SharedStatus::default();
        let agent = Agent::new(opts, host(), self.control.clone(), effects, status.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        Running {
            status,
            stop: Some(stop),
            task,
        }
    }

    fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("run/subnet.env")).ok()
    }

    fn routes(&self) -> BTreeSet<IpNet> {
        self.datapath.kernel().routes.keys().copied().collect()
    }
}

impl Running {
    fn ready(&self) -> bool {
        self.status.read().unwrap().ready
    }

    fn reconciles(&self) -> u64 {
        self.status.read().unwrap().reconciles
    }

    async fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

/// Polls `f` until it holds; panics with `what` after [`PATIENCE`].
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[tokio::test]
async fn first_lease_programs_peers_then_publishes_subnet_env_and_conflist() {
    let control = FakeControlPlane::new(config(1));
    control.put(peer("10.244.2.0/24", "h2", "192.0.2.12"));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_secs(30));
    eventually("ready", || agent.ready()).await;

    let own = control.lease_of(NODE).expect("a lease for h1");
    let env = h.subnet_env().expect("subnet.env");
    let gateway = format!(
        "OVERLAY_SUBNET={}/24",
        overlay_core::subnet::gateway(own.ipv4().unwrap()).addr()
    );
    assert!(env.contains(&gateway), "{env}");
    assert!(env.contains("OVERLAY_MTU=1450"), "{env}");
    assert!(h.dir.path().join("cni/10-overlay.conflist").exists());
    // The peer's route came before readiness; its VTEP MAC was published with the lease.
    assert!(
        h.routes().contains(&net("10.244.2.0/24")),
        "{:?}",
        h.routes()
    );
    assert!(own.record.backend_data.vtep_mac.is_some());
    let calls = control.calls();
    assert_eq!(calls.acquire.len(), 1);
    assert_eq!(calls.watch, vec![0], "one watch, from a snapshot");
    // Host effects went through the injected fakes: forwarding on, the cluster's rules.
    assert_eq!(
        h.sysctl.values.lock().unwrap().get("net/ipv4/ip_forward"),
        Some(&"1".to_string())
    );
    assert_eq!(
        h.firewall.ensured.lock().unwrap().last(),
        Some(&FirewallRules {
            networks: vec![net("10.244.0.0/16")],
            masquerade: true
        })
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn the_lease_is_renewed_within_its_ttl() {
    let control = FakeControlPlane::new(config(1));
    control.set_ttl(Duration::from_millis(900));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_secs(30));
    eventually("ready", || agent.ready()).await;
    eventually("three renewals", || control.calls().renew >= 3).await;
    assert_eq!(control.calls().acquire.len(), 1, "renewed, not re-acquired");
    assert!(agent.status.read().unwrap().last_renewal.is_some());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_revoked_lease_is_acquired_again_preferring_the_same_subnet() {
    let control = FakeControlPlane::new(config(1));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_secs(30));
    eventually("ready", || agent.ready()).await;
    let first = control.lease_of(NODE).unwrap().subnet;

    control.remove(first);
    eventually("a second acquisition", || {
        control.calls().acquire.len() == 2
    })
    .await;
    let again = &control.calls().acquire[1];
    assert_eq!(again.preferred, Some(first), "asks for its old subnet back");
    eventually("the lease is back", || {
        control.lease_of(NODE).map(|l| l.subnet) == Some(first)
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_control_plane_changes_nothing_and_renewal_resumes() {
    let control = FakeControlPlane::new(config(1));
    control.set_ttl(Duration::from_millis(900));
    control.put(peer("10.244.2.0/24", "h2", "192.0.2.12"));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_millis(200));
    eventually("ready", || agent.ready()).await;
    let routes = h.routes();
    let writes = h.datapath.writes();

    control.set_unavailable(true);
    let reconciles = agent.reconciles();
    eventually("two resyncs without a controller", || {
        agent.reconciles() >= reconciles + 2
    })
    .await;
    assert_eq!(h.routes(), routes, "the datapath stays as it was");
    assert_eq!(h.datapath.writes(), writes);
    assert!(agent.status.read().unwrap().last_error.is_some());

    let renewals = control.calls().renew;
    control.set_unavailable(false);
    eventually("renewals resume", || control.calls().renew > renewals).await;
    assert_eq!(control.calls().acquire.len(), 1);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_network_config_change_ends_the_agent_for_a_restart() {
    let control = FakeControlPlane::new(config(1));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_millis(200));
    eventually("ready", || agent.ready()).await;

    control.set_config(config(9));
    let result = tokio::time::timeout(PATIENCE, agent.task)
        .await
        .expect("the agent ends within a resync")
        .unwrap();
    match result {
        Err(AgentError::ConfigChanged(what)) => assert!(what.contains("vni: 9"), "{what}"),
        other => panic!("expected a config change, got {other:?}"),
    }
}

#[tokio::test]
async fn a_broken_watch_resumes_after_the_last_revision_seen() {
    let control = FakeControlPlane::new(config(1));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_secs(30));
    eventually("ready", || agent.ready()).await;
    let seen = control.revision();
    eventually("the agent saw its own lease", || {
        agent.status.read().unwrap().watch_revision == seen
    })
    .await;

    control.break_watches();
    eventually("a second watch", || control.calls().watch.len() == 2).await;
    assert_eq!(
        control.calls().watch,
        vec![0, seen],
        "resumed, not restarted"
    );
    control.put(peer("10.244.3.0/24", "h3", "192.0.2.13"));
    eventually("the new peer's route", || {
        h.routes().contains(&net("10.244.3.0/24"))
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_peer_that_leaves_loses_its_entries() {
    let control = FakeControlPlane::new(config(1));
    control.put(peer("10.244.2.0/24", "h2", "192.0.2.12"));
    control.put(peer("10.244.3.0/24", "h3", "192.0.2.13"));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_secs(30));
    eventually("both peers routed", || h.routes().len() == 2).await;
    let mac = MacAddr::derive("h2");
    assert!(h.datapath.kernel().fdb.iter().any(|f| f.mac == mac));

    control.remove(net("10.244.2.0/24"));
    eventually("h2's route gone", || {
        h.routes() == BTreeSet::from([net("10.244.3.0/24")])
    })
    .await;
    let kernel = h.datapath.kernel();
    assert!(
        !kernel.fdb.iter().any(|f| f.mac == mac),
        "h2's FDB entry gone"
    );
    assert!(
        !kernel.neighbours.iter().any(|n| n.mac == mac),
        "h2's neighbour gone"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_into_an_unchanged_world_writes_nothing() {
    let control = FakeControlPlane::new(config(1));
    control.put(peer("10.244.2.0/24", "h2", "192.0.2.12"));
    control.put(peer("10.244.3.0/24", "h3", "192.0.2.13"));
    let h = Host::new(control.clone());
    let first = h.start(Duration::from_secs(30));
    eventually("ready", || first.ready()).await;
    let subnet = control.lease_of(NODE).unwrap().subnet;
    first.stop().await.unwrap();
    let kernel = h.datapath.kernel();
    let writes = h.datapath.writes();

    let second = h.start(Duration::from_secs(30));
    eventually("ready again", || second.ready()).await;
    assert_eq!(h.datapath.writes(), writes, "no datapath write on restart");
    assert_eq!(h.datapath.kernel(), kernel);
    assert_eq!(control.lease_of(NODE).unwrap().subnet, subnet);
    let status = second.status.read().unwrap().clone();
    assert_eq!(status.datapath_writes, 0);
    second.stop().await.unwrap();
}

/// Rules the firewall had to put back after the first reconcile are repairs: counted on
/// `/status` (with when) and in the metrics; the first install is not one.
#[tokio::test]
async fn firewall_repairs_are_reported() {
    let control = FakeControlPlane::new(config(1));
    let h = Host::new(control.clone());
    let agent = h.start(Duration::from_millis(100));
    eventually("ready", || agent.ready()).await;
    let firewall = || agent.status.read().unwrap().firewall.clone();
    assert_eq!(firewall().implementation.as_deref(), Some("fake"));
    assert_eq!(firewall().repairs, 0, "the first install is no repair");
    assert!(firewall().last_repair.is_none());

    h.firewall.drift();
    eventually("a repair", || firewall().repairs == 1).await;
    assert!(firewall().last_repair.is_some());
    agent.stop().await.unwrap();
}
