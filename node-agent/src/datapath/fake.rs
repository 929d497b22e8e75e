//! An in-memory kernel behind [`Datapath`], for testing the agent's reconcile logic
//! without root: drift (entries or devices vanishing), failures (an errno for chosen
//! operations) and write counting.
//!
//! It mirrors the kernel rules the agent depends on, as measured with the netlink kernel
//! tests: entries live on devices and vanish with them; a route needs its device, and a
//! gateway outside the device's connected prefixes needs the onlink flag (else
//! ENETUNREACH); FDB entries exist only on VXLAN devices; an FDB add for a known MAC with
//! another destination replaces it in place; deleting what is already gone succeeds.
//! Changes made through [`FakeDatapath::edit_kernel`] model someone else touching the
//! kernel: they are not counted as writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use ipnet::IpNet;
use overlay_core::datapath::{FdbEntry, KernelEntries, Neighbour, Op, Route};
use overlay_core::MacAddr;
use tokio::sync::broadcast;

use super::{
    apply_in_phases, infer_route_kind, ApplyReport, Datapath, LinkChange, LinkInfo, NetlinkError,
    VxlanInfo, VxlanSpec,
};

/// A device of the fake kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    pub index: u32,
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: MacAddr,
    pub up: bool,
    pub addrs: Vec<IpNet>,
    pub vxlan: Option<VxlanInfo>,
}

/// The fake kernel's whole state; tests may read and edit it freely.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeKernel {
    pub links: BTreeMap<String, FakeLink>,
    /// Routes with the agent's route protocol, by destination.
    pub routes: BTreeMap<IpNet, Route>,
    /// Permanent neighbours, on any device.
    pub neighbours: BTreeSet<Neighbour>,
    /// Permanent NTF_SELF FDB entries, on any device.
    pub fdb: BTreeSet<FdbEntry>,
    last_index: u32,
}

impl FakeKernel {
    /// Adds a device (up, MTU 1500, a MAC derived from its index) and returns its index.
    pub fn add_link(&mut self, name: &str, kind: Option<&str>, addrs: &[IpNet]) -> u32 {
        self.last_index += 1;
        let index = self.last_index;
        self.links.insert(
            name.to_string(),
            FakeLink {
                index,
                kind: kind.map(str::to_string),
                mtu: 1500,
                mac: MacAddr::local_unicast([0, 0, 0, 0, (index >> 8) as u8, index as u8]),
                up: true,
                addrs: addrs.to_vec(),
                vxlan: None,
            },
        );
        index
    }

    /// Removes a device and every entry on it, as the kernel does; false if it was absent.
    pub fn remove_link(&mut self, name: &str) -> bool {
        if self.links.remove(name).is_none() {
            return false;
        }
        self.routes.retain(|_, r| r.dev != name);
        self.neighbours.retain(|n| n.dev != name);
        self.fdb.retain(|e| e.dev != name);
        true
    }

    fn info(&self, name: &str) -> Option<LinkInfo> {
        self.links.get(name).map(|l| LinkInfo {
            index: l.index,
            name: name.to_string(),
            kind: l.kind.clone(),
            mtu: l.mtu,
            mac: Some(l.mac),
            up: l.up,
            vxlan: l.vxlan.clone(),
        })
    }
}

type OpMatcher = Box<dyn Fn(&Op) -> bool + Send + Sync>;

enum Target {
    Ops(OpMatcher),
    Link(String),
}

struct Failure {
    target: Target,
    errno: i32,
}

/// An in-memory [`Datapath`].
pub struct FakeDatapath {
    kernel: Mutex<FakeKernel>,
    failures: Mutex<Vec<Failure>>,
    writes: AtomicU64,
    events: broadcast::Sender<LinkChange>,
}

impl Default for FakeDatapath {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDatapath {
    /// An empty kernel: no devices at all.
    pub fn new() -> Self {
        FakeDatapath {
            kernel: Mutex::new(FakeKernel::default()),
            failures: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            events: broadcast::channel(1024).0,
        }
    }

    /// A kernel with one underlay interface holding `addr` (e.g. 192.0.2.11/24).
    pub fn with_underlay(iface: &str, addr: IpNet) -> Self {
        let fake = Self::new();
        fake.edit_kernel(|k| k.add_link(iface, None, &[addr]));
        fake
    }

    /// A copy of the kernel state.
    pub fn kernel(&self) -> FakeKernel {
        self.kernel.lock().unwrap().clone()
    }

    /// Changes the kernel behind the agent's back (drift): not counted, no events.
    pub fn edit_kernel<R>(&self, edit: impl FnOnce(&mut FakeKernel) -> R) -> R {
        edit(&mut self.kernel.lock().unwrap())
    }

    /// Deletes a device behind the agent's back, with the link event the kernel sends.
    pub fn remove_link_externally(&self, name: &str) {
        if self.edit_kernel(|k| k.remove_link(name)) {
            self.notify(name, true);
        }
    }

    /// From now on, operations matching `matcher` fail with `errno` (a write is still
    /// counted: the request reached the kernel).
    pub fn fail_ops(&self, matcher: impl Fn(&Op) -> bool + Send + Sync + 'static, errno: i32) {
        self.failures.lock().unwrap().push(Failure {
            target: Target::Ops(Box::new(matcher)),
            errno,
        });
    }

    /// From now on, writes to the device `name` by the ensure methods and `delete_link`
    /// fail with `errno`.
    pub fn fail_link(&self, name: &str, errno: i32) {
        self.failures.lock().unwrap().push(Failure {
            target: Target::Link(name.to_string()),
            errno,
        });
    }

    pub fn clear_failures(&self) {
        self.failures.lock().unwrap().clear();
    }

    fn op_failure(&self, op: &Op) -> Option<i32> {
        self.failures
            .lock()
            .unwrap()
            .iter()
            .find_map(|f| match &f.target {
                Target::Ops(m) if m(op) => Some(f.errno),
                _ => None,
            })
    }

    /// Counts a write to a device, failing it if a failure was injected for the device.
    fn link_write(&self, op: &str, name: &str) -> Result<(), NetlinkError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let errno = self
            .failures
            .lock()
            .unwrap()
            .iter()
            .find_map(|f| match &f.target {
                Target::Link(n) if n == name => Some(f.errno),
                _ => None,
            });
        match errno {
            Some(errno) => Err(NetlinkError::Kernel {
                op: op.to_string(),
                errno,
            }),
            None => Ok(()),
        }
    }

    fn notify(&self, name: &str, deleted: bool) {
        // No subscriber is fine.
        let _ = self.events.send(LinkChange {
            name: name.to_string(),
            deleted,
        });
    }

    fn info(&self, name: &str) -> Option<LinkInfo> {
        self.kernel.lock().unwrap().info(name)
    }

    /// Sets MTU, MAC and up state where they differ (one write), as the netlink code does.
    fn fix_link(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<(), NetlinkError> {
        let differs = {
            let k = self.kernel.lock().unwrap();
            let l = &k.links[name];
            l.mtu != mtu || l.mac != mac || !l.up
        };
        if differs {
            self.link_write(&format!("fix {name}"), name)?;
            let mut k = self.kernel.lock().unwrap();
            let l = k.links.get_mut(name).expect("checked above");
            l.mtu = mtu;
            l.mac = mac;
            l.up = true;
        }
        Ok(())
    }

    fn apply_one(&self, op: &Op) -> Result<(), NetlinkError> {
        let kernel_error = |errno| NetlinkError::Kernel {
            op: op.to_string(),
            errno,
        };
        let mut k = self.kernel.lock().unwrap();
        let Some(link) = k.links.get(op.dev()).cloned() else {
            return if op.is_delete() {
                Ok(())
            } else {
                Err(NetlinkError::NoSuchLink {
                    op: op.to_string(),
                    name: op.dev().to_string(),
                })
            };
        };
        self.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = self.op_failure(op) {
            return Err(kernel_error(errno));
        }
        match op {
            Op::AddRoute(r) | Op::ReplaceRoute(r) => {
                if !r.onlink && !link.addrs.iter().any(|a| a.contains(&r.via)) {
                    return Err(kernel_error(libc::ENETUNREACH));
                }
                k.routes.insert(r.dst, r.clone());
            }
            Op::DelRoute(r) => {
                if k.routes.get(&r.dst) == Some(r) {
                    k.routes.remove(&r.dst);
                }
            }
            Op::AddNeighbour(n) => {
                k.neighbours.retain(|o| !(o.dev == n.dev && o.ip == n.ip));
                k.neighbours.insert(n.clone());
            }
            Op::DelNeighbour(n) => k.neighbours.retain(|o| !(o.dev == n.dev && o.ip == n.ip)),
            Op::AddFdb(f) => {
                if link.vxlan.is_none() {
                    return Err(kernel_error(libc::EOPNOTSUPP));
                }
                let held: Vec<FdbEntry> = k
                    .fdb
                    .iter()
                    .filter(|e| e.dev == f.dev && e.mac == f.mac)
                    .cloned()
                    .collect();
                if !held.contains(f) {
                    // NLM_F_REPLACE replaces the first destination in place.
                    if let Some(first) = held.first() {
                        k.fdb.remove(first);
                    }
                    k.fdb.insert(f.clone());
                }
            }
            Op::DelFdb(f) => {
                k.fdb.remove(f);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Datapath for FakeDatapath {
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.info(name).map(|l| l.index))
    }

    async fn link_names(&self) -> Result<Vec<String>, NetlinkError> {
        Ok(self.kernel().links.keys().cloned().collect())
    }

    async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        Ok(self.info(name))
    }

    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>, NetlinkError> {
        let k = self.kernel.lock().unwrap();
        k.links
            .get(link)
            .map(|l| l.addrs.clone())
            .ok_or_else(|| NetlinkError::NoSuchLink {
                op: format!("list addresses of {link}"),
                name: link.to_string(),
            })
    }

    async fn ensure_bridge(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<u32, NetlinkError> {
        let op = format!("ensure bridge {name}");
        if let Some(link) = self.info(name) {
            if link.kind.as_deref() == Some("bridge") {
                self.fix_link(name, mac, mtu)?;
                return Ok(link.index);
            }
            self.link_write(&op, name)?;
            self.remove_link_externally(name);
        }
        self.link_write(&op, name)?;
        let index = self.edit_kernel(|k| {
            let index = k.add_link(name, Some("bridge"), &[]);
            let l = k.links.get_mut(name).expect("just added");
            l.mac = mac;
            l.mtu = mtu;
            index
        });
        self.notify(name, false);
        Ok(index)
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        let name = spec.name.as_str();
        let op = format!("ensure vxlan device {name}");
        if let Some(link) = self.info(name) {
            if spec.mismatch(&link).is_none() {
                self.fix_link(name, spec.mac, spec.mtu)?;
                return Ok(link.index);
            }
            self.link_write(&op, name)?;
            self.remove_link_externally(name);
        }
        self.link_write(&op, name)?;
        let index = self.edit_kernel(|k| {
            let index = k.add_link(name, Some("vxlan"), &[]);
            let l = k.links.get_mut(name).expect("just added");
            l.mac = spec.mac;
            l.mtu = spec.mtu;
            l.vxlan = Some(VxlanInfo {
                vni: spec.vni,
                port: spec.port,
                local: Some(spec.local),
                underlay_ifindex: Some(spec.underlay_ifindex),
                learning: false,
            });
            index
        });
        self.notify(name, false);
        Ok(index)
    }

    async fn ensure_addresses(&self, link: &str, addrs: &[IpNet]) -> Result<(), NetlinkError> {
        let op = format!("ensure addresses of {link}");
        let held = self
            .addresses(link)
            .await
            .map_err(|_| NetlinkError::NoSuchLink {
                op: op.clone(),
                name: link.to_string(),
            })?;
        for addr in held.iter().filter(|a| !addrs.contains(a)) {
            self.link_write(&op, link)?;
            self.edit_kernel(|k| {
                if let Some(l) = k.links.get_mut(link) {
                    l.addrs.retain(|a| a != addr);
                }
            });
        }
        for addr in addrs.iter().filter(|a| !held.contains(a)) {
            self.link_write(&op, link)?;
            self.edit_kernel(|k| {
                if let Some(l) = k.links.get_mut(link) {
                    l.addrs.push(*addr);
                }
            });
        }
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        if self.info(name).is_none() {
            return Ok(());
        }
        self.link_write(&format!("delete link {name}"), name)?;
        self.remove_link_externally(name);
        Ok(())
    }

    async fn observe(
        &self,
        vteps: &[&str],
        underlay_iface: &str,
    ) -> Result<KernelEntries, NetlinkError> {
        let k = self.kernel.lock().unwrap();
        let mut state = KernelEntries::default();
        for r in k.routes.values() {
            let mut r = r.clone();
            r.kind = infer_route_kind(&r.dev, vteps, underlay_iface);
            state.insert_route(r);
        }
        let ours = |dev: &str| vteps.contains(&dev) && k.links.contains_key(dev);
        state.neighbours = k
            .neighbours
            .iter()
            .filter(|n| ours(&n.dev))
            .cloned()
            .collect();
        state.fdb = k.fdb.iter().filter(|e| ours(&e.dev)).cloned().collect();
        Ok(state)
    }

    async fn apply(&self, ops: &[Op]) -> ApplyReport {
        apply_in_phases(ops, |op| std::future::ready(self.apply_one(op))).await
    }

    fn subscribe_link_changes(&self) -> Result<BoxStream<'static, LinkChange>, NetlinkError> {
        let events = tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe());
        Ok(events.filter_map(|e| std::future::ready(e.ok())).boxed())
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::config::{BackendType, NetworkConfigSpec};
    use overlay_core::datapath::{diff, plan, HostNet, RouteKind};
    use overlay_core::lease::{BackendData, LeaseRecord};
    use overlay_core::{Lease, NetworkConfig};
    use std::time::SystemTime;

    fn config() -> NetworkConfig {
        NetworkConfigSpec {
            network: Some("10.244.0.0/16".into()),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    fn lease(i: u8) -> Lease {
        Lease {
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            record: LeaseRecord {
                node: format!("node-{i}"),
                public_ip: Some(format!("192.0.2.{}", 10 + i).parse().unwrap()),
                public_ipv6: None,
                ipv6_subnet: None,
                backend: BackendType::Vxlan,
                backend_data: BackendData {
                    vtep_mac: Some(MacAddr::local_unicast([0, 0, 0, 0, 0, i])),
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
            underlay_v6: None,
            iface: "eth0".into(),
            underlay: Some("192.0.2.0/24".parse().unwrap()),
        }
    }

    async fn fake_with_vtep() -> FakeDatapath {
        let fake = FakeDatapath::with_underlay("eth0", "192.0.2.11/24".parse().unwrap());
        let underlay = fake.link_index("eth0").await.unwrap().unwrap();
        fake.ensure_vxlan(&VxlanSpec {
            name: "ovl.1".into(),
            vni: 1,
            port: 8472,
            local: "192.0.2.11".parse().unwrap(),
            underlay_ifindex: underlay,
            mac: MacAddr::local_unicast([0, 0, 0, 0, 0, 1]),
            mtu: 1450,
        })
        .await
        .unwrap();
        fake
    }

    #[tokio::test]
    async fn reconcile_converges_and_then_writes_nothing() {
        let fake = fake_with_vtep().await;
        let peers: Vec<Lease> = (1..=4).map(lease).collect();
        let desired = plan(&config(), &peers[0], &peers, &host());
        let observed = fake.observe(&["ovl.1"], "eth0").await.unwrap();
        let report = fake.apply(&diff(&desired, &observed)).await;
        assert!(report.is_ok(), "{:?}", report.failed);
        assert_eq!(report.applied, 9);
        let observed = fake.observe(&["ovl.1"], "eth0").await.unwrap();
        assert_eq!(observed, desired.kernel_entries());
        assert!(observed.routes.values().all(|r| r.kind == RouteKind::Vxlan));
        let before = fake.writes();
        assert!(diff(&desired, &observed).is_empty());
        fake.apply(&[]).await;
        assert_eq!(fake.writes(), before);
    }

    #[tokio::test]
    async fn drift_is_repaired_by_the_next_diff() {
        let fake = fake_with_vtep().await;
        let peers: Vec<Lease> = (1..=3).map(lease).collect();
        let desired = plan(&config(), &peers[0], &peers, &host());
        fake.apply(&diff(&desired, &KernelEntries::default())).await;
        fake.edit_kernel(|k| {
            k.routes.remove(&"10.244.2.0/24".parse().unwrap());
            k.fdb.clear();
        });
        let ops = diff(
            &desired,
            &fake.observe(&["ovl.1"], "eth0").await.unwrap(),
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(fake.apply(&ops).await.is_ok());
        assert_eq!(
            fake.observe(&["ovl.1"], "eth0").await.unwrap(),
            desired.kernel_entries()
        );
    }

    #[tokio::test]
    async fn a_failed_neighbour_holds_back_its_route_only() {
        let fake = fake_with_vtep().await;
        let peers: Vec<Lease> = (1..=3).map(lease).collect();
        let desired = plan(&config(), &peers[0], &peers, &host());
        fake.fail_ops(
            |op| matches!(op, Op::AddNeighbour(n) if n.ip.to_string().starts_with("10.244.2.")),
            libc::ENOBUFS,
        );
        let report = fake.apply(&diff(&desired, &KernelEntries::default())).await;
        let failed: Vec<String> = report.failed.iter().map(|(op, _)| op.to_string()).collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(
            failed[0].starts_with("add neighbour 10.244.2.0"),
            "{failed:?}"
        );
        assert!(
            failed[1].starts_with("add route 10.244.2.0/24"),
            "{failed:?}"
        );
        assert!(matches!(
            report.failed[1].1,
            NetlinkError::DependencyFailed { .. }
        ));
        assert_eq!(report.failed[0].1.errno(), Some(libc::ENOBUFS));
        assert_eq!(report.applied, 4);
        fake.clear_failures();
        let ops = diff(
            &desired,
            &fake.observe(&["ovl.1"], "eth0").await.unwrap(),
        );
        assert_eq!(ops.len(), 2);
        assert!(fake.apply(&ops).await.is_ok());
    }

    #[tokio::test]
    async fn routes_without_onlink_need_a_connected_gateway() {
        let fake = fake_with_vtep().await;
        let route = Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: "10.244.2.0".parse().unwrap(),
            dev: "ovl.1".into(),
            onlink: false,
            kind: RouteKind::Vxlan,
        };
        let report = fake.apply(&[Op::AddRoute(route.clone())]).await;
        assert_eq!(report.failed[0].1.errno(), Some(libc::ENETUNREACH));
        let report = fake
            .apply(&[Op::AddRoute(Route {
                onlink: true,
                ..route
            })])
            .await;
        assert!(report.is_ok());
    }

    #[tokio::test]
    async fn removing_the_vtep_drops_its_entries_and_tells_subscribers() {
        let fake = fake_with_vtep().await;
        let mut events = fake.subscribe_link_changes().unwrap();
        let peers: Vec<Lease> = (1..=3).map(lease).collect();
        let desired = plan(&config(), &peers[0], &peers, &host());
        fake.apply(&diff(&desired, &KernelEntries::default())).await;
        fake.remove_link_externally("ovl.1");
        assert_eq!(
            events.next().await,
            Some(LinkChange {
                name: "ovl.1".into(),
                deleted: true
            })
        );
        assert!(fake
            .observe(&["ovl.1"], "eth0")
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn ensure_methods_write_only_on_change() {
        let fake = fake_with_vtep().await;
        let mac = MacAddr::local_unicast([0, 0, 0, 0, 0, 9]);
        fake.ensure_bridge("ovl0", mac, 1450).await.unwrap();
        fake.ensure_addresses("ovl0", &["10.244.1.1/24".parse().unwrap()])
            .await
            .unwrap();
        let before = fake.writes();
        fake.ensure_bridge("ovl0", mac, 1450).await.unwrap();
        fake.ensure_addresses("ovl0", &["10.244.1.1/24".parse().unwrap()])
            .await
            .unwrap();
        assert_eq!(fake.writes(), before);
        fake.ensure_bridge("ovl0", mac, 1400).await.unwrap();
        assert_eq!(fake.writes(), before + 1);
        fake.fail_link("ovl0", libc::EPERM);
        let e = fake.ensure_bridge("ovl0", mac, 1450).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
    }
}
