//! Kernel tests of the netlink module, as root, each in its own anonymous network
//! namespace.
//!
//! Every test runs its body on a dedicated OS thread that first calls
//! `unshare(CLONE_NEWNET)`, then builds a current-thread tokio runtime on that thread, so
//! the netlink sockets, the connection task and every `ip` command the test runs (children
//! inherit the thread's namespace) live in the private namespace. The root namespace is
//! never touched. The underlay is a veth pair with 192.0.2.0/24 addresses (this kernel has
//! no dummy links); the overlay is 10.244.0.0/16.
//!
//! `ip`/`bridge` are used to set up the underlay, to inject drift behind the module's back,
//! and as an independent reading of what the module programmed.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use ipnet::IpNet;
use overlay_agent::datapath::{LinkChange, Netlink, NetlinkError, VxlanSpec, ROUTE_PROTOCOL};
use overlay_core::config::{BackendSpec, BackendType, NetworkConfig, NetworkConfigSpec};
use overlay_core::datapath::{diff, plan, vtep_name, HostNet, Op, RouteKind};
use overlay_core::lease::{BackendData, LeaseRecord};
use overlay_core::{Lease, MacAddr};

const UNDERLAY: &str = "under0";
const HOST_IP: &str = "192.0.2.11";

/// Runs `body` in a fresh network namespace on its own thread; skips when not root.
fn in_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !overlay_tests::is_root() {
        overlay_tests::skip(test, "needs root to create network namespaces");
        return;
    }
    let thread = std::thread::Builder::new()
        .name(test.to_string())
        .spawn(move || {
            let before = std::fs::read_link("/proc/thread-self/ns/net").expect("read netns");
            // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET only moves
            // this thread into a new network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            let after = std::fs::read_link("/proc/thread-self/ns/net").expect("read netns");
            assert_ne!(
                before, after,
                "the thread must be in a new network namespace"
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(body());
        })
        .expect("spawn test thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs a command (in the calling thread's namespace) and returns its stdout.
fn run(program: &str, args: &str) -> String {
    let out = Command::new(program)
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn ip(args: &str) -> String {
    run("ip", args)
}

/// A veth pair as the underlay, HOST_IP/24 on our end; returns our end's index.
async fn underlay(nl: &Netlink) -> u32 {
    ip(&format!("link add {UNDERLAY} type veth peer name under1"));
    ip(&format!("addr add {HOST_IP}/24 dev {UNDERLAY}"));
    ip(&format!("link set {UNDERLAY} up"));
    ip("link set under1 up");
    nl.link_index(UNDERLAY)
        .await
        .unwrap()
        .expect("underlay exists")
}

fn mac(last: u16) -> MacAddr {
    MacAddr::local_unicast([0x0a, 0x58, 0, 0, (last >> 8) as u8, last as u8])
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vtep_spec(vni: u32, underlay_ifindex: u32) -> VxlanSpec {
    VxlanSpec {
        name: vtep_name(vni),
        vni,
        port: 8472,
        local: addr(HOST_IP),
        underlay_ifindex,
        mac: mac(1),
        mtu: 1450,
    }
}

fn config(backend: &str, subnet_len: u64) -> NetworkConfig {
    NetworkConfigSpec {
        network: Some("10.244.0.0/16".into()),
        subnet_len: Some(subnet_len),
        backend: Some(BackendSpec {
            kind: Some(backend.into()),
            vni: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn lease(subnet: IpNet, public_ip: IpAddr, backend: BackendType, vtep: MacAddr) -> Lease {
    Lease {
        subnet,
        record: LeaseRecord {
            node: format!("node-{}", subnet.addr()),
            public_ip: match public_ip {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            },
            public_ipv6: match public_ip {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            },
            ipv6_subnet: None,
            backend,
            backend_data: BackendData {
                vtep_mac: Some(vtep),
                ..Default::default()
            },
            reserved: false,
            created_at: SystemTime::UNIX_EPOCH,
            renewed_at: SystemTime::UNIX_EPOCH,
        },
    }
}

fn host() -> HostNet {
    HostNet {
        public_ip: HOST_IP.parse().ok(),
        public_ipv6: None,
        iface: UNDERLAY.into(),
        underlay: "192.0.2.0/24".parse().ok(),
        underlay_v6: None,
    }
}

/// This host (10.244.1.0/24) and peers 10.244.2.0/24.. at 192.0.2.12..
fn cluster(backend: BackendType, peers: u8) -> (Lease, Vec<Lease>) {
    let own = lease(net("10.244.1.0/24"), addr(HOST_IP), backend, mac(1));
    let mut all = vec![own.clone()];
    for i in 2..2 + peers {
        all.push(lease(
            net(&format!("10.244.{i}.0/24")),
            addr(&format!("192.0.2.{}", 10 + i)),
            backend,
            mac(i as u16),
        ));
    }
    (own, all)
}

#[test]
fn creates_bridge_and_vtep_and_ensuring_again_writes_nothing() {
    in_netns("creates_bridge_and_vtep", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;

        let bridge = nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap();
        nl.ensure_addresses("ovl0", &[net("10.244.1.1/24")])
            .await
            .unwrap();
        let info = nl.link_info("ovl0").await.unwrap().unwrap();
        assert_eq!(info.index, bridge);
        assert_eq!(info.kind.as_deref(), Some("bridge"));
        assert_eq!((info.mac, info.mtu, info.up), (Some(mac(100)), 1450, true));
        assert_eq!(
            nl.addresses("ovl0").await.unwrap(),
            vec![net("10.244.1.1/24")]
        );

        let spec = vtep_spec(1, under);
        let vtep = nl.ensure_vxlan(&spec).await.unwrap();
        nl.ensure_addresses("ovl.1", &[net("10.244.1.0/32")])
            .await
            .unwrap();
        let info = nl.link_info("ovl.1").await.unwrap().unwrap();
        assert_eq!(info.index, vtep);
        assert_eq!(info.kind.as_deref(), Some("vxlan"));
        assert_eq!((info.mac, info.mtu, info.up), (Some(mac(1)), 1450, true));
        let vx = info.vxlan.unwrap();
        assert_eq!(
            (vx.vni, vx.port, vx.local, vx.underlay_ifindex, vx.learning),
            (1, 8472, Some(addr(HOST_IP)), Some(under), false)
        );
        // An independent reading.
        let details = ip("-d link show ovl.1");
        for want in [
            "vxlan id 1",
            "local 192.0.2.11",
            "dev under0",
            "dstport 8472",
            "nolearning",
        ] {
            assert!(details.contains(want), "{want:?} missing from {details}");
        }

        // Ensuring the same again issues no write at all.
        let writes = nl.writes();
        assert_eq!(
            nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap(),
            bridge
        );
        assert_eq!(nl.ensure_vxlan(&spec).await.unwrap(), vtep);
        nl.ensure_addresses("ovl0", &[net("10.244.1.1/24")])
            .await
            .unwrap();
        nl.ensure_addresses("ovl.1", &[net("10.244.1.0/32")])
            .await
            .unwrap();
        assert_eq!(nl.writes(), writes);

        // The bridge keeps its MTU when a port with a larger one joins (it was set by us).
        ip("link add port0 mtu 1500 type veth peer name port1");
        ip("link set port0 master ovl0");
        assert_eq!(nl.link_info("ovl0").await.unwrap().unwrap().mtu, 1450);
        assert_eq!(
            nl.link_info("ovl0").await.unwrap().unwrap().mac,
            Some(mac(100))
        );
    });
}

#[test]
fn ensure_fixes_in_place_what_it_can_and_recreates_what_it_cannot() {
    in_netns("ensure_fixes_or_recreates", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;
        let spec = vtep_spec(1, under);
        let bridge = nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap();
        let vtep = nl.ensure_vxlan(&spec).await.unwrap();

        // Wrong MTU, wrong MAC, down: fixed in place, same devices.
        ip("link set ovl.1 mtu 1400");
        ip("link set ovl.1 address 0a:58:00:00:99:99");
        ip("link set ovl0 mtu 1300");
        ip("link set ovl0 down");
        assert_eq!(nl.ensure_vxlan(&spec).await.unwrap(), vtep);
        assert_eq!(
            nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap(),
            bridge
        );
        let v = nl.link_info("ovl.1").await.unwrap().unwrap();
        assert_eq!((v.mtu, v.mac), (1450, Some(mac(1))));
        let b = nl.link_info("ovl0").await.unwrap().unwrap();
        assert_eq!((b.mtu, b.up), (1450, true));

        // A VNI change cannot be made in place: the device is recreated.
        let mut vni2 = spec.clone();
        vni2.vni = 2;
        let recreated = nl.ensure_vxlan(&vni2).await.unwrap();
        assert_ne!(recreated, vtep);
        let v = nl.link_info("ovl.1").await.unwrap().unwrap();
        assert_eq!(v.vxlan.unwrap().vni, 2);
        assert_eq!((v.mtu, v.mac, v.up), (1450, Some(mac(1)), true));

        // Same for learning switched on by someone, and for another local address.
        ip("link del ovl.1");
        ip(&format!(
            "link add ovl.1 type vxlan id 1 dev {UNDERLAY} local {HOST_IP} dstport 8472 learning"
        ));
        nl.ensure_vxlan(&spec).await.unwrap();
        assert!(
            !nl.link_info("ovl.1")
                .await
                .unwrap()
                .unwrap()
                .vxlan
                .unwrap()
                .learning
        );
        let mut moved = spec.clone();
        moved.local = addr("192.0.2.99");
        nl.ensure_vxlan(&moved).await.unwrap();
        assert_eq!(
            nl.link_info("ovl.1")
                .await
                .unwrap()
                .unwrap()
                .vxlan
                .unwrap()
                .local,
            Some(addr("192.0.2.99"))
        );

        // A device of another type under the bridge's name is replaced by a bridge.
        nl.delete_link("ovl0").await.unwrap();
        ip("link add ovl0 type veth peer name ovl0p");
        nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap();
        assert_eq!(
            nl.link_info("ovl0").await.unwrap().unwrap().kind.as_deref(),
            Some("bridge")
        );

        // Addresses we did not ask for are removed, the wanted ones added.
        nl.ensure_addresses("ovl0", &[net("10.244.1.1/24")])
            .await
            .unwrap();
        ip("addr add 10.9.9.9/24 dev ovl0");
        nl.ensure_addresses("ovl0", &[net("10.244.1.1/24"), net("10.244.1.2/24")])
            .await
            .unwrap();
        let mut held = nl.addresses("ovl0").await.unwrap();
        held.sort();
        assert_eq!(held, vec![net("10.244.1.1/24"), net("10.244.1.2/24")]);
    });
}

#[test]
fn vxlan_plan_is_applied_observed_back_and_reapplied_with_zero_writes() {
    in_netns("vxlan_plan_round_trip", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;
        nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
        // Someone else's route: never observed, never touched.
        ip(&format!(
            "route add 10.99.0.0/24 via 192.0.2.1 dev {UNDERLAY}"
        ));

        let (own, leases) = cluster(BackendType::Vxlan, 3);
        let desired = plan(&config("vxlan", 24), &own, &leases, &host());
        assert!(desired.skipped.is_empty(), "{:?}", desired.skipped);
        let observed = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
        assert!(observed.is_empty(), "{observed:?}");
        let ops = diff(&desired, &observed);
        assert_eq!(ops.len(), 9);
        let report = nl.apply(&ops).await;
        assert!(report.is_ok(), "{:?}", report.failed);
        assert_eq!(report.applied, 9);

        let observed = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
        assert_eq!(observed, desired.kernel_entries());
        assert!(observed.routes.values().all(|r| r.kind == RouteKind::Vxlan));
        assert!(diff(&desired, &observed).is_empty());

        // What `ip` sees: Flannel's entries, marked with our protocol.
        let routes = ip(&format!("route show proto {ROUTE_PROTOCOL}"));
        assert!(
            routes.contains("10.244.2.0/24 via 10.244.2.0 dev ovl.1 onlink"),
            "{routes}"
        );
        assert_eq!(routes.lines().count(), 3, "{routes}");
        let neigh = ip("neigh show dev ovl.1 nud permanent");
        assert!(
            neigh.contains(&format!("10.244.3.0 lladdr {} PERMANENT", mac(3))),
            "{neigh}"
        );
        let fdb = run("bridge", "fdb show dev ovl.1");
        assert!(
            fdb.contains(&format!("{} dst 192.0.2.14 self permanent", mac(4))),
            "{fdb}"
        );
        assert!(ip("route show 10.99.0.0/24").contains("via 192.0.2.1"));

        // A second reconcile with an unchanged world writes nothing; applying the same
        // operations again is harmless (replace semantics).
        let writes = nl.writes();
        let again = diff(
            &desired,
            &nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
        );
        assert!(nl.apply(&again).await.is_ok());
        assert_eq!(nl.writes(), writes);
        let report = nl.apply(&ops).await;
        assert!(report.is_ok(), "{:?}", report.failed);
        assert_eq!(
            nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
            desired.kernel_entries()
        );

        // A peer goes away: its route, neighbour and FDB entry go, nothing else changes.
        let gone = leases
            .iter()
            .position(|l| l.subnet == net("10.244.3.0/24"))
            .unwrap();
        let mut fewer = leases.clone();
        fewer.remove(gone);
        let desired = plan(&config("vxlan", 24), &own, &fewer, &host());
        let ops = diff(
            &desired,
            &nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(ops.iter().all(Op::is_delete));
        assert!(nl.apply(&ops).await.is_ok());
        let observed = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
        assert_eq!(observed, desired.kernel_entries());
        assert!(!ip("route show proto 79").contains("10.244.3.0"));
        assert!(!ip("neigh show dev ovl.1").contains("10.244.3.0"));
        assert!(!run("bridge", "fdb show dev ovl.1").contains(&mac(3).to_string()));

        // A peer moves to another public IP: its FDB entry is replaced in place.
        let mut moved = fewer.clone();
        let peer = moved
            .iter_mut()
            .find(|l| l.subnet == net("10.244.2.0/24"))
            .unwrap();
        peer.record.public_ip = "192.0.2.42".parse().ok();
        let desired = plan(&config("vxlan", 24), &own, &moved, &host());
        let ops = diff(
            &desired,
            &nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
        );
        assert!(matches!(ops.as_slice(), [Op::AddFdb(e)] if e.dst == addr("192.0.2.42")));
        assert!(nl.apply(&ops).await.is_ok());
        assert_eq!(
            nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
            desired.kernel_entries()
        );
    });
}

#[test]
fn host_gw_and_direct_routes_go_via_the_peers_public_ip() {
    in_netns("host_gw_routes", || async {
        let nl = Netlink::connect().unwrap();
        underlay(&nl).await;
        let (own, mut leases) = cluster(BackendType::HostGw, 3);
        leases.push(lease(
            net("10.244.9.0/24"),
            addr("198.51.100.9"),
            BackendType::HostGw,
            mac(9),
        ));
        let desired = plan(&config("host-gw", 24), &own, &leases, &host());
        assert_eq!(desired.skipped.len(), 1);
        let report = nl
            .apply(&diff(&desired, &nl.observe(&[], UNDERLAY).await.unwrap()))
            .await;
        assert!(report.is_ok(), "{:?}", report.failed);
        let observed = nl.observe(&[], UNDERLAY).await.unwrap();
        assert_eq!(observed, desired.kernel_entries());
        assert!(observed
            .routes
            .values()
            .all(|r| r.kind == RouteKind::HostGw));
        let routes = ip("route show proto 79");
        assert!(
            routes.contains("10.244.2.0/24 via 192.0.2.12 dev under0"),
            "{routes}"
        );

        // Switching to vxlan with direct routing: the same routes, now named direct.
        let mut cfg = config("vxlan", 24);
        cfg.backend.direct_routing = true;
        let (own, leases) = cluster(BackendType::Vxlan, 3);
        let direct = plan(&cfg, &own, &leases, &host());
        let observed = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
        assert!(observed
            .routes
            .values()
            .all(|r| r.kind == RouteKind::Direct));
        assert!(diff(&direct, &observed).is_empty());
    });
}

#[test]
fn errors_name_the_operation_and_carry_the_errno() {
    in_netns("errors_carry_errno", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;
        nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
        let route = |dev: &str, onlink| overlay_core::datapath::Route {
            dst: net("10.244.2.0/24"),
            via: addr("10.244.2.0"),
            dev: dev.into(),
            onlink,
            kind: RouteKind::Vxlan,
        };
        // Without onlink the gateway is not reachable on the VTEP.
        let report = nl.apply(&[Op::AddRoute(route("ovl.1", false))]).await;
        let (op, err) = &report.failed[0];
        assert_eq!(op, &Op::AddRoute(route("ovl.1", false)));
        assert_eq!(err.errno(), Some(libc::ENETUNREACH), "{err}");
        assert!(
            err.to_string().starts_with("add route 10.244.2.0/24"),
            "{err}"
        );

        // A missing device: a clear error for an addition, nothing to do for a deletion.
        let report = nl
            .apply(&[
                Op::AddRoute(route("missing0", true)),
                Op::DelRoute(route("missing0", true)),
            ])
            .await;
        assert_eq!(report.applied, 1);
        assert!(matches!(
            &report.failed[0].1,
            NetlinkError::NoSuchLink { name, .. } if name == "missing0"
        ));
        // Deleting an entry that is already gone succeeds.
        assert!(nl
            .apply(&[Op::DelRoute(route("ovl.1", true))])
            .await
            .is_ok());

        // ensure_addresses on a missing link names it.
        let err = nl
            .ensure_addresses("nope0", &[net("10.244.1.1/24")])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope0"), "{err}");
    });
}

#[test]
fn delete_link_and_missing_links_are_not_errors() {
    in_netns("delete_link", || async {
        let nl = Netlink::connect().unwrap();
        assert_eq!(nl.link_index("nope0").await.unwrap(), None);
        assert!(nl.link_info("nope0").await.unwrap().is_none());
        nl.ensure_bridge("ovl0", mac(100), 1450).await.unwrap();
        assert!(nl.link_index("ovl0").await.unwrap().is_some());
        nl.delete_link("ovl0").await.unwrap();
        assert_eq!(nl.link_index("ovl0").await.unwrap(), None);
        let writes = nl.writes();
        nl.delete_link("ovl0").await.unwrap();
        assert_eq!(
            nl.writes(),
            writes,
            "deleting a missing link writes nothing"
        );
    });
}

#[test]
fn a_link_event_arrives_when_someone_deletes_the_vtep() {
    in_netns("link_event_on_vtep_delete", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;
        nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
        let mut events = nl.subscribe_link_changes().unwrap();
        ip("link del ovl.1");
        let want = LinkChange {
            name: "ovl.1".into(),
            deleted: true,
        };
        // A hang guard, not a timing assertion: the event is expected at once.
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(change) = events.next().await {
                if change == want {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no deletion event for ovl.1");
        // And the VTEP comes back with the next ensure.
        nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
        assert!(nl.link_index("ovl.1").await.unwrap().is_some());
    });
}

#[test]
fn a_thousand_peers_are_applied_in_one_pipelined_call() {
    in_netns("thousand_peers", || async {
        let nl = Netlink::connect().unwrap();
        let under = underlay(&nl).await;
        nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
        // /26 subnets give 1024 of them in 10.244.0.0/16; the peers' public IPs only need
        // to be distinct FDB destinations, not reachable.
        let cfg = config("vxlan", 26);
        let subnets: Vec<IpNet> = cfg.key_pool().range().iter().take(1001).collect();
        let own = lease(subnets[0], addr(HOST_IP), BackendType::Vxlan, mac(1));
        let mut leases = vec![own.clone()];
        for (i, subnet) in subnets.iter().enumerate().skip(1) {
            let public = Ipv4Addr::new(172, 16, (i / 200) as u8, (i % 200 + 1) as u8);
            leases.push(lease(
                *subnet,
                IpAddr::V4(public),
                BackendType::Vxlan,
                mac(1000 + i as u16),
            ));
        }
        let desired = plan(&cfg, &own, &leases, &host());
        assert_eq!(desired.routes.len(), 1000);
        let ops = diff(
            &desired,
            &nl.observe(&["ovl.1"], UNDERLAY).await.unwrap(),
        );
        assert_eq!(ops.len(), 3000);
        let writes = nl.writes();
        let report = nl.apply(&ops).await;
        assert!(report.is_ok(), "{:?}", report.failed.first());
        assert_eq!(report.applied, 3000);
        assert_eq!(nl.writes() - writes, 3000);
        let observed = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
        assert_eq!(observed.routes.len(), 1000);
        assert_eq!(observed.neighbours.len(), 1000);
        assert_eq!(observed.fdb.len(), 1000);
        assert_eq!(observed, desired.kernel_entries());
        assert!(diff(&desired, &observed).is_empty());
    });
}

#[test]
fn sysctls_are_written_only_when_they_differ() {
    in_netns("sysctl_ip_forward", || async {
        use overlay_agent::sysctl::set_sysctl;
        let key = "net/ipv4/ip_forward";
        set_sysctl(key, "0").unwrap();
        assert!(set_sysctl(key, "1").unwrap());
        assert!(!set_sysctl(key, "1").unwrap());
        let now = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap();
        assert_eq!(now.trim(), "1");
        let err = set_sysctl("net/ipv4/no_such_knob", "1").unwrap_err();
        assert!(err.to_string().contains("no_such_knob"), "{err}");
    });
}

/// Entries someone else put on our VTEP (`bridge fdb add ... permanent` makes
/// PERMANENT|NOARP) are seen, so a reconcile removes them.
#[test]
fn foreign_permanent_entries_on_the_vtep_are_observed() {
    in_netns(
        "foreign_permanent_entries_on_the_vtep_are_observed",
        || async {
            let nl = Netlink::connect().expect("netlink");
            let under = underlay(&nl).await;
            nl.ensure_vxlan(&vtep_spec(1, under)).await.unwrap();
            run(
                "bridge",
                "fdb add 0a:58:00:00:09:09 dev ovl.1 dst 192.0.2.99 self permanent",
            );
            ip("neigh add 10.244.99.0 lladdr 0a:58:00:00:09:09 dev ovl.1 nud permanent");
            let seen = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
            assert!(
                seen.fdb.iter().any(|e| e.dst == addr("192.0.2.99")),
                "{seen:?}"
            );
            assert_eq!(seen.neighbours.len(), 1, "{seen:?}");
            // Nothing desires them: the diff removes both, and they are gone.
            let ops = diff(&Default::default(), &seen);
            assert_eq!(ops.len(), 2, "{ops:?}");
            assert!(nl.apply(&ops).await.is_ok());
            let after = nl.observe(&["ovl.1"], UNDERLAY).await.unwrap();
            assert!(
                after.fdb.is_empty() && after.neighbours.is_empty(),
                "{after:?}"
            );
        },
    );
}
