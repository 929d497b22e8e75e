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
use crate::store::Store;

/// How often etcd is pinged for readiness.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Readiness {
    etcd_ok: AtomicBool,
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

pub fn router(readiness: Arc<Readiness>, fanout: Arc<Fanout>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let (readiness, fanout) = (readiness.clone(), fanout.clone());
                async move {
                    if !readiness.etcd_ok() {
                        (StatusCode::SERVICE_UNAVAILABLE, "etcd unreachable\n")
                    } else if !fanout.is_synced() {
                        (StatusCode::SERVICE_UNAVAILABLE, "lease cache not loaded\n")
                    } else {
                        (StatusCode::OK, "ready\n")
                    }
                }
            }),
        )
}
