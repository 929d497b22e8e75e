//! The agent's health endpoint: `/healthz` (alive), `/readyz` (lease held, datapath in
//! place, `subnet.env` written), `/status` (JSON: lease, peers, last reconcile) and
//! `/metrics` (Prometheus text).

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use std::sync::Arc;

use crate::agent::SharedStatus;
use crate::metrics::AgentMetrics;

pub fn router(status: SharedStatus, metrics: Arc<AgentMetrics>) -> Router {
    let ready = status.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.read().expect("status").ready;
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let snapshot = status.read().expect("status").clone();
                async move { Json(snapshot) }
            }),
        )
}
