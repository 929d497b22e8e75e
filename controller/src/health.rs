//! The controller's health endpoint: `/healthz` (the process is alive) and `/readyz`
//! (etcd answered recently and the lease cache is loaded, so agents can be served).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tracing::{info, warn};

use crate::fanout::Fanout;
use crate::leases::LeaseManager;
use crate::metrics::{IgnoredKeys, Metrics};
use crate::store::Store;
use crate::view::IgnoreReason;

/// How often etcd is pinged for readiness.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Readiness {
    etcd_ok: AtomicBool,
}

/// What the health endpoint reads.
#[derive(Clone)]
pub struct HealthState {
    pub readiness: Arc<Readiness>,
    pub fanout: Arc<Fanout>,
    pub leases: Arc<LeaseManager>,
    pub metrics: Arc<Metrics>,
}

impl HealthState {
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.readiness.etcd_ok() {
            Err("etcd unreachable")
        } else if !self.fanout.is_synced() {
            Err("lease cache not loaded")
        } else {
            Ok(())
        }
    }

    /// The metrics text, with state gauges computed now.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let range = self.leases.last_config().map(|c| c.key_pool().range());
        let (held, fitting) = self.fanout.count_leases(range.as_ref());
        m.leases_held.set(held as i64);
        if let Some(r) = range {
            m.subnets_free.set(r.len() as i64 - fitting as i64);
        }
        m.watch_clients.set(self.fanout.clients() as i64);
        let ignored = self.fanout.ignored();
        for reason in IgnoreReason::ALL {
            let n = ignored.iter().filter(|i| i.reason == reason).count();
            m.ignored_lease_keys
                .get_or_create(&IgnoredKeys {
                    reason: reason.label().to_string(),
                })
                .set(n as i64);
        }
        m.etcd_up.set(self.readiness.etcd_ok() as i64);
        m.encode()
    }
}

impl Readiness {
    pub fn etcd_ok(&self) -> bool {
        self.etcd_ok.load(Ordering::Relaxed)
    }

    /// Pings the store forever, logging only transitions.
    pub async fn watch_store(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            let ok = matches!(
                tokio::time::timeout(PING_INTERVAL * 2, store.ping()).await,
                Ok(Ok(()))
            );
            let was = self.etcd_ok.swap(ok, Ordering::Relaxed);
            if ok != was {
                if ok {
                    info!("etcd is reachable");
                } else {
                    warn!("etcd is unreachable; not ready");
                }
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
    }
}

pub fn router(state: HealthState) -> Router {
    let (ready, metrics) = (state.clone(), state);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.ready();
                async move {
                    match r {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.metrics_text();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        )
}
