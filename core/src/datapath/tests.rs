use super::*;
use crate::config::NetworkConfigSpec;
use crate::config::{BackendType, NetworkConfig};
use crate::lease::Lease;
use crate::lease::{BackendData, LeaseRecord};
use std::time::SystemTime;

fn config(backend: &str, direct_routing: bool) -> NetworkConfig {
    NetworkConfigSpec {
        network: Some("10.244.0.0/16".into()),
        backend: Some(crate::config::BackendSpec {
            kind: Some(backend.into()),
            vni: Some(7),
            direct_routing: Some(direct_routing),
            ..Default::default()
        }),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn lease(subnet: &str, ip: &str, backend: BackendType, mac: Option<&str>) -> Lease {
    Lease {
        subnet: subnet.parse().unwrap(),
        record: LeaseRecord {
            node: format!("node-{ip}"),
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            ipv6_subnet: None,
            backend,
            backend_data: BackendData {
                vtep_mac: mac.map(|m| m.parse().unwrap()),
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
        public_ip: Some("192.0.2.11".parse().unwrap()),
        public_ipv6: None,
        iface: "eth0".into(),
        underlay: Some("192.0.2.0/24".parse().unwrap()),
        underlay_v6: None,
    }
}

fn own(backend: BackendType) -> Lease {
    lease(
        "10.244.1.0/24",
        "192.0.2.11",
        backend,
        Some("02:00:00:00:00:01"),
    )
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn vx_route(dst: &str, via: &str) -> Route {
    Route {
        dst: net(dst),
        via: ip(via),
        dev: "ovl.7".into(),
        onlink: true,
        kind: RouteKind::Vxlan,
    }
}

#[test]
fn vtep_names() {
    assert_eq!(vtep_name(1), "ovl.1");
    assert_eq!(vtep_name(4096), "ovl.4096");
}

#[test]
fn route_kind_serde_names() {
    assert_eq!(
        serde_json::to_string(&RouteKind::HostGw).unwrap(),
        "\"host-gw\""
    );
    assert_eq!(
        serde_json::to_string(&RouteKind::Vxlan).unwrap(),
        "\"vxlan\""
    );
    assert_eq!(
        serde_json::to_string(&RouteKind::Direct).unwrap(),
        "\"direct\""
    );
    let k: RouteKind = serde_json::from_str("\"host-gw\"").unwrap();
    assert_eq!(k, RouteKind::HostGw);
}

#[test]
fn plan_vxlan_makes_neighbour_fdb_and_onlink_route_per_peer() {
    let c = config("vxlan", false);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        me.clone(),
        lease(
            "10.244.2.0/24",
            "192.0.2.12",
            BackendType::Vxlan,
            Some("02:00:00:00:00:02"),
        ),
        lease(
            "10.244.3.0/24",
            "198.51.100.13",
            BackendType::Vxlan,
            Some("02:00:00:00:00:03"),
        ),
    ];
    let s = plan(&c, &me, &peers, &host());
    assert!(s.skipped.is_empty(), "{:?}", s.skipped);
    assert_eq!(
        s.routes.values().cloned().collect::<Vec<_>>(),
        vec![
            vx_route("10.244.2.0/24", "10.244.2.0"),
            vx_route("10.244.3.0/24", "10.244.3.0")
        ]
    );
    assert!(s.routes.values().all(|r| r.kind == RouteKind::Vxlan));
    assert_eq!(
        s.neighbours.iter().cloned().collect::<Vec<_>>(),
        vec![
            Neighbour {
                dev: "ovl.7".into(),
                ip: ip("10.244.2.0"),
                mac: mac("02:00:00:00:00:02")
            },
            Neighbour {
                dev: "ovl.7".into(),
                ip: ip("10.244.3.0"),
                mac: mac("02:00:00:00:00:03")
            },
        ]
    );
    assert_eq!(
        s.fdb.iter().cloned().collect::<Vec<_>>(),
        vec![
            FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:02"),
                dst: ip("192.0.2.12")
            },
            FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:03"),
                dst: ip("198.51.100.13")
            },
        ]
    );
}

#[test]
fn plan_vxlan_skips_peers_without_mac_or_with_another_backend() {
    let c = config("vxlan", false);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        lease("10.244.2.0/24", "192.0.2.12", BackendType::Vxlan, None),
        lease("10.244.3.0/24", "192.0.2.13", BackendType::HostGw, None),
        lease(
            "10.244.4.0/24",
            "192.0.2.14",
            BackendType::Vxlan,
            Some("02:00:00:00:00:04"),
        ),
    ];
    let s = plan(&c, &me, &peers, &host());
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.neighbours.len(), 1);
    assert_eq!(s.fdb.len(), 1);
    assert_eq!(s.skipped.len(), 2);
    assert_eq!(s.skipped[0].0, net("10.244.2.0/24"));
    assert!(s.skipped[0].1.contains("VTEP MAC"), "{:?}", s.skipped);
    assert_eq!(s.skipped[1].0, net("10.244.3.0/24"));
    assert!(s.skipped[1].1.contains("host-gw"), "{:?}", s.skipped);
}

#[test]
fn plan_vxlan_direct_routing_uses_plain_routes_on_the_underlay() {
    let c = config("vxlan", true);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        // Same L2 subnet, even without a MAC: a direct route needs none.
        lease("10.244.2.0/24", "192.0.2.12", BackendType::Vxlan, None),
        // Elsewhere: encapsulated as usual.
        lease(
            "10.244.3.0/24",
            "198.51.100.13",
            BackendType::Vxlan,
            Some("02:00:00:00:00:03"),
        ),
    ];
    let s = plan(&c, &me, &peers, &host());
    assert!(s.skipped.is_empty());
    let direct = &s.routes[&net("10.244.2.0/24")];
    assert_eq!(direct.kind, RouteKind::Direct);
    assert_eq!(direct.via, ip("192.0.2.12"));
    assert_eq!(direct.dev, "eth0");
    assert!(!direct.onlink);
    let vx = &s.routes[&net("10.244.3.0/24")];
    assert_eq!(vx.kind, RouteKind::Vxlan);
    assert_eq!(s.neighbours.len(), 1);
    assert_eq!(s.fdb.len(), 1);
    assert!(s.neighbours.iter().all(|n| n.ip == ip("10.244.3.0")));
}

#[test]
fn plan_host_gw_routes_via_public_ip_and_reports_unreachable_peers() {
    let c = config("host-gw", false);
    let me = own(BackendType::HostGw);
    let peers = vec![
        lease("10.244.2.0/24", "192.0.2.12", BackendType::HostGw, None),
        lease("10.244.3.0/24", "198.51.100.13", BackendType::HostGw, None),
        lease(
            "10.244.4.0/24",
            "192.0.2.14",
            BackendType::Vxlan,
            Some("02:00:00:00:00:04"),
        ),
    ];
    let s = plan(&c, &me, &peers, &host());
    assert_eq!(s.routes.len(), 1);
    let r = &s.routes[&net("10.244.2.0/24")];
    assert_eq!(
        (r.via, r.dev.as_str(), r.onlink, r.kind),
        (ip("192.0.2.12"), "eth0", false, RouteKind::HostGw)
    );
    assert!(s.neighbours.is_empty() && s.fdb.is_empty());
    assert_eq!(
        s.skipped,
        vec![
            (
                net("10.244.3.0/24"),
                "not directly reachable (not on 192.0.2.0/24)".to_string()
            ),
            (
                net("10.244.4.0/24"),
                "uses backend vxlan, but the cluster uses host-gw".to_string()
            ),
        ]
    );
}

#[test]
fn plan_alloc_is_empty() {
    let c = config("alloc", false);
    let me = own(BackendType::Alloc);
    let peers = vec![lease(
        "10.244.2.0/24",
        "192.0.2.12",
        BackendType::Alloc,
        None,
    )];
    assert_eq!(plan(&c, &me, &peers, &host()), DesiredState::default());
}

#[test]
fn plan_skips_self_and_guards_against_bad_leases() {
    let c = config("vxlan", false);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        me.clone(),
        // A stale lease still held under this host's public IP.
        lease(
            "10.244.9.0/24",
            "192.0.2.11",
            BackendType::Vxlan,
            Some("02:00:00:00:00:09"),
        ),
        // Outside the cluster network.
        lease(
            "10.99.0.0/24",
            "192.0.2.20",
            BackendType::Vxlan,
            Some("02:00:00:00:00:20"),
        ),
        // Two leases publishing one MAC: the first (lowest subnet) wins.
        lease(
            "10.244.5.0/24",
            "192.0.2.15",
            BackendType::Vxlan,
            Some("02:00:00:00:00:55"),
        ),
        lease(
            "10.244.6.0/24",
            "192.0.2.16",
            BackendType::Vxlan,
            Some("02:00:00:00:00:55"),
        ),
    ];
    let s = plan(&c, &me, &peers, &host());
    assert_eq!(
        s.routes.keys().copied().collect::<Vec<_>>(),
        vec![net("10.244.5.0/24")]
    );
    let skipped: Vec<IpNet> = s.skipped.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        skipped,
        vec![
            net("10.99.0.0/24"),
            net("10.244.6.0/24"),
            net("10.244.9.0/24")
        ]
    );
    assert!(!s.routes.contains_key(&me.subnet));
}

fn sample_state() -> DesiredState {
    let c = config("vxlan", false);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        lease(
            "10.244.2.0/24",
            "192.0.2.12",
            BackendType::Vxlan,
            Some("02:00:00:00:00:02"),
        ),
        lease(
            "10.244.3.0/24",
            "192.0.2.13",
            BackendType::Vxlan,
            Some("02:00:00:00:00:03"),
        ),
    ];
    plan(&c, &me, &peers, &host())
}

#[test]
fn diff_from_empty_adds_entries_before_routes() {
    let d = sample_state();
    let ops = diff(&d, &KernelEntries::default());
    assert_eq!(ops.len(), 6);
    let phases: Vec<Phase> = ops.iter().map(Op::phase).collect();
    assert_eq!(
        phases,
        vec![
            Phase::Entries,
            Phase::Entries,
            Phase::Entries,
            Phase::Entries,
            Phase::Routes,
            Phase::Routes
        ]
    );
    assert!(matches!(ops[0], Op::AddNeighbour(_)));
    assert!(matches!(ops[2], Op::AddFdb(_)));
    assert!(matches!(ops[4], Op::AddRoute(_)));
}

#[test]
fn diff_is_empty_when_equal() {
    let d = sample_state();
    assert!(diff(&d, &d.kernel_entries()).is_empty());
    // Route kinds are not part of the kernel identity.
    let mut observed = d.kernel_entries();
    for r in observed.routes.values_mut() {
        r.kind = RouteKind::HostGw;
    }
    assert!(diff(&d, &observed).is_empty());
    assert!(diff(&DesiredState::default(), &KernelEntries::default()).is_empty());
}

#[test]
fn diff_removes_what_is_no_longer_desired_routes_first() {
    let d = sample_state();
    let mut observed = d.kernel_entries();
    // A peer that vanished while the agent was down.
    observed.insert_route(vx_route("10.244.4.0/24", "10.244.4.0"));
    observed.neighbours.insert(Neighbour {
        dev: "ovl.7".into(),
        ip: ip("10.244.4.0"),
        mac: mac("02:00:00:00:00:04"),
    });
    observed.fdb.insert(FdbEntry {
        dev: "ovl.7".into(),
        mac: mac("02:00:00:00:00:04"),
        dst: ip("192.0.2.14"),
    });
    let ops = diff(&d, &observed);
    assert_eq!(
        ops,
        vec![
            Op::DelRoute(vx_route("10.244.4.0/24", "10.244.4.0")),
            Op::DelNeighbour(Neighbour {
                dev: "ovl.7".into(),
                ip: ip("10.244.4.0"),
                mac: mac("02:00:00:00:00:04"),
            }),
            Op::DelFdb(FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:04"),
                dst: ip("192.0.2.14"),
            }),
        ]
    );
}

#[test]
fn diff_replaces_changed_entries_in_place() {
    let d = sample_state();
    let mut observed = d.kernel_entries();
    // Wrong gateway for one route, missing onlink flag for the other.
    observed.insert_route(vx_route("10.244.2.0/24", "10.244.2.9"));
    let mut no_onlink = vx_route("10.244.3.0/24", "10.244.3.0");
    no_onlink.onlink = false;
    observed.insert_route(no_onlink);
    // A neighbour with a stale MAC, an FDB entry with a stale destination.
    observed.neighbours.retain(|n| n.ip != ip("10.244.2.0"));
    observed.neighbours.insert(Neighbour {
        dev: "ovl.7".into(),
        ip: ip("10.244.2.0"),
        mac: mac("02:00:00:00:00:99"),
    });
    observed.fdb.retain(|e| e.mac != mac("02:00:00:00:00:03"));
    observed.fdb.insert(FdbEntry {
        dev: "ovl.7".into(),
        mac: mac("02:00:00:00:00:03"),
        dst: ip("192.0.2.99"),
    });
    let ops = diff(&d, &observed);
    assert_eq!(
        ops,
        vec![
            Op::AddNeighbour(Neighbour {
                dev: "ovl.7".into(),
                ip: ip("10.244.2.0"),
                mac: mac("02:00:00:00:00:02"),
            }),
            Op::AddFdb(FdbEntry {
                dev: "ovl.7".into(),
                mac: mac("02:00:00:00:00:03"),
                dst: ip("192.0.2.13"),
            }),
            Op::ReplaceRoute(vx_route("10.244.2.0/24", "10.244.2.0")),
            Op::ReplaceRoute(vx_route("10.244.3.0/24", "10.244.3.0")),
        ],
        "no deletes: every change is a replacement"
    );
}

#[test]
fn diff_cleans_extra_fdb_destinations() {
    let d = sample_state();
    let mut observed = d.kernel_entries();
    // An extra destination appended next to the right one.
    observed.fdb.insert(FdbEntry {
        dev: "ovl.7".into(),
        mac: mac("02:00:00:00:00:02"),
        dst: ip("192.0.2.77"),
    });
    assert_eq!(
        diff(&d, &observed),
        vec![Op::DelFdb(FdbEntry {
            dev: "ovl.7".into(),
            mac: mac("02:00:00:00:00:02"),
            dst: ip("192.0.2.77"),
        })]
    );
    // Two wrong destinations: both go, then the right one is added.
    let mut observed = d.kernel_entries();
    observed.fdb.retain(|e| e.mac != mac("02:00:00:00:00:02"));
    for dst in ["192.0.2.77", "192.0.2.78"] {
        observed.fdb.insert(FdbEntry {
            dev: "ovl.7".into(),
            mac: mac("02:00:00:00:00:02"),
            dst: ip(dst),
        });
    }
    let ops = diff(&d, &observed);
    assert_eq!(ops.len(), 3);
    assert!(matches!(&ops[0], Op::DelFdb(e) if e.dst == ip("192.0.2.77")));
    assert!(matches!(&ops[1], Op::DelFdb(e) if e.dst == ip("192.0.2.78")));
    assert!(matches!(&ops[2], Op::AddFdb(e) if e.dst == ip("192.0.2.12")));
}

#[test]
fn diff_switching_to_direct_routing_replaces_route_and_drops_entries() {
    let before = sample_state();
    let c = config("vxlan", true);
    let me = own(BackendType::Vxlan);
    let peers = vec![
        lease(
            "10.244.2.0/24",
            "192.0.2.12",
            BackendType::Vxlan,
            Some("02:00:00:00:00:02"),
        ),
        lease(
            "10.244.3.0/24",
            "192.0.2.13",
            BackendType::Vxlan,
            Some("02:00:00:00:00:03"),
        ),
    ];
    let after = plan(&c, &me, &peers, &host());
    let ops = diff(&after, &before.kernel_entries());
    let kinds: Vec<&str> = ops
        .iter()
        .map(|o| match o {
            Op::DelNeighbour(_) => "del-neigh",
            Op::DelFdb(_) => "del-fdb",
            Op::ReplaceRoute(_) => "replace",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "del-neigh",
            "del-neigh",
            "del-fdb",
            "del-fdb",
            "replace",
            "replace"
        ]
    );
    let phases: Vec<Phase> = ops.iter().map(Op::phase).collect();
    let mut sorted = phases.clone();
    sorted.sort();
    assert_eq!(phases, sorted, "ops come in phase order");
}

#[test]
fn states_serialize_routes_as_lists() {
    let d = sample_state();
    let json = serde_json::to_value(&d).unwrap();
    let routes = json["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0]["dst"], "10.244.2.0/24");
    assert_eq!(routes[0]["kind"], "vxlan");
    assert_eq!(json["fdb"][0]["mac"], "02:00:00:00:00:02");
    let back: DesiredState = serde_json::from_value(json).unwrap();
    assert_eq!(back, d);
    let op = serde_json::to_value(Op::AddRoute(vx_route("10.244.2.0/24", "10.244.2.0"))).unwrap();
    assert_eq!(op["op"], "add_route");
    assert_eq!(op["entry"]["via"], "10.244.2.0");
}

#[test]
fn ops_display_like_ip_commands() {
    let op = Op::AddRoute(vx_route("10.244.2.0/24", "10.244.2.0"));
    assert_eq!(
        op.to_string(),
        "add route 10.244.2.0/24 via 10.244.2.0 dev ovl.7 onlink"
    );
    assert_eq!(op.dev(), "ovl.7");
    assert!(!op.is_delete());
}
