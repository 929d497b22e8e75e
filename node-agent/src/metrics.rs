//! Prometheus metrics of the agent (text format on the health endpoint's `/metrics`).

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::ReconcileReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Implementation {
    pub implementation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub peers: Gauge,
    pub entries: Family<Kind, Gauge>,
    pub reconciles: Family<Outcome, Counter>,
    pub reconcile_seconds: Histogram,
    pub drift_repaired: Counter,
    pub netlink_ops: Family<Outcome, Counter>,
    pub renewals: Family<Outcome, Counter>,
    pub skipped_peers: Gauge,
    pub firewall_repairs: Counter,
    pub firewall: Family<Implementation, Gauge>,
    seconds_since_renewal: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_renewal: Mutex<Option<Instant>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("overlay_agent");
        let peers = Gauge::default();
        r.register(
            "peers",
            "Peers known from the controller's watch",
            peers.clone(),
        );
        let entries = Family::<Kind, Gauge>::default();
        r.register(
            "entries",
            "Datapath entries desired, by kind (vxlan/host-gw/direct routes, neighbour, fdb)",
            entries.clone(),
        );
        let reconciles = Family::<Outcome, Counter>::default();
        r.register("reconciles", "Reconcile runs by result", reconciles.clone());
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register(
            "reconcile_seconds",
            "Reconcile duration",
            reconcile_seconds.clone(),
        );
        let drift_repaired = Counter::default();
        r.register(
            "drift_repaired",
            "Kernel entries that differed from the desired state and were fixed (after the first reconcile)",
            drift_repaired.clone(),
        );
        let netlink_ops = Family::<Outcome, Counter>::default();
        r.register(
            "netlink_operations",
            "Datapath entry operations by result",
            netlink_ops.clone(),
        );
        let renewals = Family::<Outcome, Counter>::default();
        r.register(
            "lease_renewals",
            "Lease renewals by result",
            renewals.clone(),
        );
        let skipped_peers = Gauge::default();
        r.register(
            "skipped_peers",
            "Peers that could not be programmed (see /status for why)",
            skipped_peers.clone(),
        );
        let firewall_repairs = Counter::default();
        r.register(
            "firewall_repairs",
            "Times the firewall rules had drifted (changed or removed by someone else) and were put back, after the first reconcile",
            firewall_repairs.clone(),
        );
        let firewall = Family::<Implementation, Gauge>::default();
        r.register(
            "firewall_info",
            "The firewall implementation in use (1 for the one in use)",
            firewall.clone(),
        );
        let seconds_since_renewal = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "seconds_since_last_renewal",
            "Time since the lease was last renewed or acquired",
            seconds_since_renewal.clone(),
        );
        AgentMetrics {
            registry: r,
            peers,
            entries,
            reconciles,
            reconcile_seconds,
            drift_repaired,
            netlink_ops,
            renewals,
            skipped_peers,
            firewall_repairs,
            firewall,
            seconds_since_renewal,
            last_renewal: Mutex::new(None),
        }
    }

    pub fn renewed(&self, ok: bool) {
        self.renewals
            .get_or_create(&Outcome {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        if ok {
            *self.last_renewal.lock().expect("lock") = Some(Instant::now());
        }
    }

    /// Records one reconcile; `first` marks the agent's first one (its writes are setup,
    /// not drift).
    pub fn reconciled(
        &self,
        report: Result<&ReconcileReport, ()>,
        peers: usize,
        first: bool,
        started: Instant,
    ) {
        self.reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        self.peers.set(peers as i64);
        let Ok(report) = report else {
            self.reconciles
                .get_or_create(&Outcome {
                    result: "error".into(),
                })
                .inc();
            return;
        };
        let result = if report.errors.is_empty() {
            "ok"
        } else {
            "partial"
        };
        self.reconciles
            .get_or_create(&Outcome {
                result: result.into(),
            })
            .inc();
        let failed = report.errors.len() as u64;
        let ops = report.drift_count as u64;
        self.netlink_ops
            .get_or_create(&Outcome {
                result: "ok".into(),
            })
            .inc_by(ops.saturating_sub(failed));
        self.netlink_ops
            .get_or_create(&Outcome {
                result: "error".into(),
            })
            .inc_by(failed);
        if !first {
            self.drift_repaired.inc_by(ops.saturating_sub(failed));
            if report.firewall_changed {
                self.firewall_repairs.inc();
            }
        }
        for kind in ["vxlan", "host-gw", "direct"] {
            let n = report
                .routes
                .iter()
                .filter(|r| r.kind.as_str() == kind)
                .count();
            self.entries
                .get_or_create(&Kind {
                    kind: format!("{kind}_route"),
                })
                .set(n as i64);
        }
        self.entries
            .get_or_create(&Kind {
                kind: "neighbour".into(),
            })
            .set(report.neighbours as i64);
        self.entries
            .get_or_create(&Kind { kind: "fdb".into() })
            .set(report.fdb as i64);
        self.skipped_peers.set(report.skipped.len() as i64);
    }

    /// Records which firewall implementation the agent uses.
    pub fn set_firewall(&self, implementation: &str) {
        self.firewall
            .get_or_create(&Implementation {
                implementation: implementation.into(),
            })
            .set(1);
    }

    pub fn encode(&self) -> String {
        if let Some(t) = *self.last_renewal.lock().expect("lock") {
            self.seconds_since_renewal.set(t.elapsed().as_secs_f64());
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String");
        out
    }
}
