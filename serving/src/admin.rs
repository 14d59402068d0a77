//! The admin listener's routes: liveness, readiness and metrics, on plain HTTP apart from the
//! main listener so that probes and scrapers never need certificates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::CONTENT_TYPE;
use prometheus_client::registry::Registry;

use crate::observe::{method_not_allowed, not_found, plain, with_nosniff};

/// Liveness: 200 while the process can serve.
pub const LIVEZ: &str = "/livez";
/// Readiness: 200 when ready for traffic, 503 from the moment shutdown begins.
pub const READYZ: &str = "/readyz";
/// Metrics in the OpenMetrics text format, which Prometheus scrapes natively.
pub const METRICS: &str = "/metrics";

/// Whether the service should get traffic. Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Reads readiness.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    health: Health,
    registry: Arc<Registry>,
}

/// The admin router.
pub fn router(health: Health, registry: Arc<Registry>) -> axum::Router {
    axum::Router::new()
        .route(LIVEZ, get(livez))
        .route(READYZ, get(readyz))
        .route(METRICS, get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AdminState { health, registry })
        .layer(axum::middleware::map_response(with_nosniff))
}

async fn livez() -> Response {
    plain(StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.health.is_ready() {
        plain(StatusCode::OK, "ready\n")
    } else {
        plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::with_capacity(4096);
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "encoding metrics failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n")
        }
    }
}
