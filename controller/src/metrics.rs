//! Prometheus metrics of the controller (text format on the health endpoint's `/metrics`).
//!
//! Gauges that describe state (leases held, free subnets, watch clients) are computed when
//! scraped, from the fan-out cache, so they can never drift from what is served. Counters
//! and histograms are updated where things happen. etcd latency is measured by wrapping the
//! store ([`MeteredStore`]), so no call site can forget to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ControlError;
use crate::store::{
    Condition, KeyValue, LeaseId, LeaseInfo, Store, StoreError, TxnWrite, WatchStream, Written,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    pub op: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoredKeys {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOp {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseReason {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub lease_ops: Family<OpResult, Counter>,
    pub leases_held: Gauge,
    pub subnets_free: Gauge,
    pub watch_clients: Gauge,
    pub events_fanned_out: Counter,
    pub snapshots_resent: Counter,
    pub fanout_lag: Histogram,
    pub etcd_latency: Family<StoreOp, Histogram>,
    pub etcd_up: Gauge,
    pub leader: Gauge,
    pub orphan_leases_revoked: Counter,
    pub compactions: Counter,
    pub grpc_connections: Gauge,
    pub tls_handshakes_pending: Gauge,
    pub connections_closed: Family<CloseReason, Counter>,
    pub accept_errors: Counter,
    pub ignored_lease_keys: Family<IgnoredKeys, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("overlay_controller");
        let lease_ops = Family::<OpResult, Counter>::default();
        registry.register(
            "lease_operations",
            "Lease operations (acquire, renew, release, reserve, revoke, set_config) by result",
            lease_ops.clone(),
        );
        let leases_held = Gauge::default();
        registry.register(
            "leases",
            "Leases held, reservations included",
            leases_held.clone(),
        );
        let subnets_free = Gauge::default();
        registry.register(
            "subnets_free",
            "Subnets of the range not leased",
            subnets_free.clone(),
        );
        let watch_clients = Gauge::default();
        registry.register(
            "watch_clients",
            "Connected lease watch streams",
            watch_clients.clone(),
        );
        let events_fanned_out = Counter::default();
        registry.register(
            "watch_events",
            "Lease events broadcast to watch streams",
            events_fanned_out.clone(),
        );
        let snapshots_resent = Counter::default();
        registry.register(
            "watch_resyncs",
            "Snapshots sent to watch clients that fell behind or could not be replayed",
            snapshots_resent.clone(),
        );
        let fanout_lag = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "fanout_lag_seconds",
            "Time from an etcd event reaching the controller to its delivery to a watch stream",
            fanout_lag.clone(),
        );
        let etcd_latency = Family::<StoreOp, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "etcd_request_seconds",
            "etcd request latency by operation",
            etcd_latency.clone(),
        );
        let etcd_up = Gauge::default();
        registry.register(
            "etcd_up",
            "1 while etcd answers the readiness ping",
            etcd_up.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this controller is the elected leader that runs the janitor",
            leader.clone(),
        );
        let orphan_leases_revoked = Counter::default();
        registry.register(
            "orphan_leases_revoked",
            "etcd leases without keys revoked by the janitor",
            orphan_leases_revoked.clone(),
        );
        let compactions = Counter::default();
        registry.register(
            "etcd_compactions",
            "etcd history compactions done by the janitor",
            compactions.clone(),
        );
        let grpc_connections = Gauge::default();
        registry.register(
            "grpc_connections",
            "gRPC connections open, handshaking or established (at most --max-connections)",
            grpc_connections.clone(),
        );
        let tls_handshakes_pending = Gauge::default();
        registry.register(
            "tls_handshakes_pending",
            "gRPC connections whose TLS handshake has not finished yet",
            tls_handshakes_pending.clone(),
        );
        let connections_closed = Family::<CloseReason, Counter>::default();
        registry.register(
            "grpc_connections_closed",
            "gRPC connections closed by the listener before serving them, by reason \
             (handshake_timeout, handshake_failed, evicted, over_limit)",
            connections_closed.clone(),
        );
        let accept_errors = Counter::default();
        registry.register(
            "grpc_accept_errors",
            "Failed accepts on the gRPC listener (e.g. out of file descriptors); each backs off",
            accept_errors.clone(),
        );
        let ignored_lease_keys = Family::<IgnoredKeys, Gauge>::default();
        registry.register(
            "ignored_lease_keys",
            "Keys under the lease prefix that are not served as leases, by reason (bad_key, unreadable, no_config, outside_config, node_clash, mac_clash)",
            ignored_lease_keys.clone(),
        );
        Metrics {
            ignored_lease_keys,
            registry,
            lease_ops,
            leases_held,
            subnets_free,
            watch_clients,
            events_fanned_out,
            snapshots_resent,
            fanout_lag,
            etcd_latency,
            etcd_up,
            leader,
            orphan_leases_revoked,
            compactions,
            grpc_connections,
            tls_handshakes_pending,
            connections_closed,
            accept_errors,
        }
    }

    /// Counts a connection the listener closed before serving it.
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed
            .get_or_create(&CloseReason {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts one operation under its outcome (`ok` or the gRPC code it maps to).
    pub fn record<T>(&self, op: &str, result: &Result<T, ControlError>) {
        let result = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => status_label(e),
        };
        self.lease_ops
            .get_or_create(&OpResult {
                op: op.to_string(),
                result,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String");
        out
    }
}

/// The metrics label of an error: its gRPC code in snake case (`resource_exhausted`).
fn status_label(e: &ControlError) -> String {
    use tonic::Code;
    match e.code() {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
    .to_string()
}

/// A [`Store`] that times every request.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    fn observe(&self, op: &str, started: Instant) {
        let elapsed: Duration = started.elapsed();
        self.metrics
            .etcd_latency
            .get_or_create(&StoreOp { op: op.to_string() })
            .observe(elapsed.as_secs_f64());
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.observe($op, started);
        result
    }};
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        timed!(self, "get", self.inner.get(key))
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        timed!(self, "list", self.inner.list(prefix))
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        timed!(self, "put", self.inner.put(key, value))
    }
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        timed!(self, "create", self.inner.create(key, value, lease))
    }
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: i64,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        timed!(
            self,
            "update",
            self.inner.update(key, value, expected, lease)
        )
    }
    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<Written, StoreError> {
        timed!(self, "delete", self.inner.delete(key, expected))
    }
    async fn txn(
        &self,
        conditions: Vec<Condition>,
        writes: Vec<TxnWrite>,
    ) -> Result<Written, StoreError> {
        timed!(self, "txn", self.inner.txn(conditions, writes))
    }
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        timed!(self, "grant", self.inner.grant(ttl))
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        timed!(self, "keep_alive", self.inner.keep_alive(lease))
    }
    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        timed!(self, "time_to_live", self.inner.time_to_live(lease))
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        timed!(self, "revoke", self.inner.revoke(lease))
    }
    async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        timed!(self, "list_leases", self.inner.list_leases())
    }
    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, StoreError> {
        timed!(self, "lease_info", self.inner.lease_info(lease))
    }
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, StoreError> {
        timed!(self, "watch", self.inner.watch(prefix, start_revision))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, "ping", self.inner.ping())
    }
    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        timed!(self, "compact", self.inner.compact(revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_counted_by_result() {
        let m = Metrics::new();
        m.record::<()>("acquire", &Ok(()));
        m.record::<()>(
            "acquire",
            &Err(ControlError::Exhausted {
                total: 2,
                range: "x".into(),
            }),
        );
        let text = m.encode();
        assert!(
            text.contains(
                r#"overlay_controller_lease_operations_total{op="acquire",result="ok"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"result="resource_exhausted"} 1"#), "{text}");
    }
}
