//! The agent's health endpoint: `/healthz` (alive), `/readyz` (lease held, datapath in
//! place, `subnet.env` written) and `/status` (JSON: lease, peers, last reconcile).

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::agent::SharedStatus;

pub fn router(status: SharedStatus) -> Router {
    let ready = status.clone();
    Router::new()
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
