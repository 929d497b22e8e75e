//! What the vxlan and host-gw backends share: the workloads' bridge, IP forwarding, the
//! firewall chains, and the plan → observe → diff → apply cycle for per-peer entries.
//!
//! A reconcile always reads the kernel back ([`Datapath::observe`]) instead of trusting
//! what it wrote last time: entries removed by someone else, or left by peers that vanished
//! while the agent was down, are found and fixed the same way. Only entries the agent marks
//! as its own (route protocol, devices it owns) are ever considered, so it never touches
//! routes it did not make. Every "ensure" writes nothing when the kernel already matches,
//! which is what makes a restart with an unchanged world free of writes.

use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use ipnet::IpNet;
use overlay_core::config::NetworkConfig;
use overlay_core::datapath::{diff, plan, HostNet, KernelEntries};
use overlay_core::lease::Lease;
use overlay_core::subnet::{gateway, gateway6};
use overlay_core::MacAddr;
use tracing::{info, warn};

use super::{BackendContext, BackendError, ReconcileReport};
use crate::datapath::Datapath;
use crate::firewall::{Firewall, FirewallRules};
use crate::sysctl::Sysctl;

pub struct Forwarding {
    pub backend: &'static str,
    pub config: NetworkConfig,
    pub host: HostNet,
    pub bridge: Option<String>,
    pub bridge_mac: MacAddr,
    pub ip_masq: bool,
    pub mtu: u32,
    pub datapath: Arc<dyn Datapath>,
    pub firewall: Arc<dyn Firewall>,
    pub sysctl: Arc<dyn Sysctl>,
    /// The VTEP name, for backends that have one (its entries are observed too).
    pub vteps: Vec<String>,
    last_skipped: Vec<(IpNet, String)>,
}

impl Forwarding {
    /// Checks that the host has what a forwarding backend needs: an interface holding the
    /// public IP.
    pub fn new(
        backend: &'static str,
        ctx: &BackendContext,
        mtu: u32,
    ) -> Result<Self, BackendError> {
        let err = |message: String| BackendError { backend, message };
        let Some(iface) = ctx
            .host
            .iface
            .clone()
            .filter(|_| ctx.host.underlay.is_some() || ctx.host.underlay_v6.is_some())
        else {
            return Err(err(format!(
                "the public IP {} is not on any interface of this host; pass --iface or a --public-ip/--public-ipv6 the host has",
                ctx.host.public_text()
            )));
        };
        Ok(Forwarding {
            backend,
            config: ctx.config.clone(),
            host: HostNet {
                public_ip: ctx.host.public_ip,
                public_ipv6: ctx.host.public_ipv6,
                iface,
                underlay: ctx.host.underlay,
                underlay_v6: ctx.host.underlay_v6,
            },
            bridge: ctx.bridge.clone(),
            bridge_mac: MacAddr::derive(&format!("overlay-bridge/{}", ctx.node)),
            ip_masq: ctx.ip_masq,
            mtu,
            datapath: ctx.effects.datapath.clone(),
            firewall: ctx.effects.firewall.clone(),
            sysctl: ctx.effects.sysctl.clone(),
            vteps: Vec::new(),
            last_skipped: Vec::new(),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> BackendError {
        BackendError {
            backend: self.backend,
            message: format!("{what}: {e}"),
        }
    }

    /// Host-level state: forwarding on, the bridge with the gateway address, firewall;
    /// whether the firewall rules had to be written.
    async fn ensure_host(&self, own: &Lease) -> Result<bool, BackendError> {
        if let Some(bridge) = &self.bridge {
            self.datapath
                .ensure_bridge(bridge, self.bridge_mac, self.mtu)
                .await
                .map_err(|e| self.err(&format!("bridge {bridge}"), e))?;
            let gateways: Vec<IpNet> = own
                .ipv4()
                .map(|s| IpNet::V4(gateway(s)))
                .into_iter()
                .chain(own.ipv6().map(|s| IpNet::V6(gateway6(s))))
                .collect();
            self.datapath
                .ensure_addresses(bridge, &gateways)
                .await
                .map_err(|e| self.err(&format!("address of bridge {bridge}"), e))?;
        }
        self.sysctl
            .set("net/ipv4/ip_forward", "1")
            .map_err(|e| self.err("enabling IP forwarding", e))?;
        let rules = FirewallRules {
            networks: self.config.networks(),
            masquerade: self.ip_masq,
        };
        let firewall = self.firewall.clone();
        let masquerade = rules.masquerade;
        let wrote = tokio::task::spawn_blocking(move || firewall.ensure(&rules))
            .await
            .map_err(|e| self.err("firewall task", e))?
            .map_err(|e| self.err("firewall rules", e))?;
        if wrote {
            info!(firewall = self.firewall.name(), networks = %self.config.networks_text(), ip_masq = masquerade, "firewall rules written");
        }
        Ok(wrote)
    }

    /// Brings per-peer entries to the plan for `own` and `peers`. `report.writes` counts
    /// every datapath write since `before` (the caller's own writes, like the VTEP's, too).
    pub async fn reconcile(
        &mut self,
        own: &Lease,
        peers: &[Lease],
        before: u64,
    ) -> Result<ReconcileReport, BackendError> {
        let firewall_changed = self.ensure_host(own).await?;
        let desired = plan(&self.config, own, peers, &self.host);
        let observed: KernelEntries = self
            .datapath
            .observe(
                &self.vteps.iter().map(String::as_str).collect::<Vec<_>>(),
                &self.host.iface,
            )
            .await
            .map_err(|e| self.err("reading the kernel's entries", e))?;
        let ops = diff(&desired, &observed);
        let applied = self.datapath.apply(&ops).await;
        if desired.skipped != self.last_skipped {
            for (subnet, why) in &desired.skipped {
                warn!(%subnet, reason = %why, "peer not programmed");
            }
            self.last_skipped = desired.skipped.clone();
        }
        let entries = desired.kernel_entries();
        Ok(ReconcileReport {
            desired: entries.routes.len() + entries.neighbours.len() + entries.fdb.len(),
            observed: observed.routes.len() + observed.neighbours.len() + observed.fdb.len(),
            writes: self.datapath.writes() - before,
            drift: ops.iter().take(50).map(|o| o.to_string()).collect(),
            drift_count: ops.len(),
            neighbours: entries.neighbours.len(),
            fdb: entries.fdb.len(),
            skipped: desired
                .skipped
                .iter()
                .map(|(s, why)| (s.to_string(), why.clone()))
                .collect(),
            errors: applied
                .failed
                .iter()
                .map(|(op, e)| format!("{op}: {e}"))
                .collect(),
            routes: entries.routes.into_values().collect(),
            firewall_changed,
        })
    }

    /// Notifications that one of our devices changed or vanished.
    pub fn device_changes(&self) -> Option<BoxStream<'static, ()>> {
        let mine: Vec<String> = self
            .bridge
            .iter()
            .chain(self.vteps.iter())
            .cloned()
            .collect();
        match self.datapath.subscribe_link_changes() {
            Ok(s) => Some(
                s.filter(move |c| futures::future::ready(mine.contains(&c.name)))
                    .map(|_| ())
                    .boxed(),
            ),
            Err(e) => {
                warn!(error = %e, "cannot watch link changes; relying on periodic reconciles");
                None
            }
        }
    }
}
