//! Admin endpoints, on their own port (never the inference port): metrics, and the live configuration of the
//! server (which model version it serves) and of the router (weights), plus the file watch that applies a
//! mounted ConfigMap the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::model::ModelSource;
use crate::proxy::Proxy;
use crate::routes::{RouteConfig, RoutePlan};
use crate::server::Server;

const PROMETHEUS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn rejected(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"error": message.to_string()}))).into_response()
}

pub fn server_router(server: Arc<Server>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(server): State<Arc<Server>>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    server.metrics.encode(),
                )
            }),
        )
        .route(
            "/admin/model",
            get(|State(server): State<Arc<Server>>| async move {
                axum::Json(server.slot.status()).into_response()
            })
            .put(load_model),
        )
        .with_state(server)
}

/// `PUT /admin/model` with a [`ModelSource`]: loads it beside the current model and switches; 422 (the
/// current model still serving) when it does not load or verify.
async fn load_model(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    let source: ModelSource = match serde_json::from_slice(&body) {
        Ok(source) => source,
        Err(err) => return rejected(StatusCode::BAD_REQUEST, format!("model source: {err}")),
    };
    match tokio::task::spawn_blocking(move || server.load(&source).map(|_| server.slot.status()))
        .await
    {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(message)) => rejected(StatusCode::UNPROCESSABLE_ENTITY, message),
        Err(err) => rejected(StatusCode::INTERNAL_SERVER_ERROR, err),
    }
}

pub fn router_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(proxy): State<Arc<Proxy>>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    proxy.metrics.encode(),
                )
            }),
        )
        .route(
            "/admin/routes",
            get(|State(proxy): State<Arc<Proxy>>| async move {
                axum::Json(proxy.plan().config.clone()).into_response()
            })
            .put(set_routes),
        )
        .with_state(proxy)
}

/// `PUT /admin/routes` with a [`RouteConfig`]: validated, then applied atomically; 400 naming the field.
async fn set_routes(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Response {
    match parse_routes(&body) {
        Ok(plan) => {
            tracing::info!(routes = %crate::proxy::describe(&plan), "routes updated");
            proxy.set_plan(plan);
            axum::Json(proxy.plan().config.clone()).into_response()
        }
        Err(message) => {
            proxy.rejected_plan();
            rejected(StatusCode::BAD_REQUEST, message)
        }
    }
}

pub fn parse_routes(bytes: &[u8]) -> Result<RoutePlan, String> {
    let config: RouteConfig =
        serde_json::from_slice(bytes).map_err(|err| format!("route config: {err}"))?;
    RoutePlan::new(config).map_err(|err| err.to_string())
}

/// Calls `apply` with the file's contents whenever they change (a ConfigMap update swaps a symlink, so the
/// contents are compared, not the modification time).
pub async fn watch_file(path: PathBuf, mut last: Option<Vec<u8>>, apply: impl Fn(&[u8])) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match std::fs::read(&path) {
            Ok(contents) if last.as_ref() != Some(&contents) => {
                apply(&contents);
                last = Some(contents);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(path = %path.display(), %error, "config file unreadable"),
        }
    }
}

/// The ingestion pipeline's admin port: metrics, and liveness.
pub fn ingest_router(metrics: Arc<crate::ingest::IngestMetrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State(metrics): State<Arc<crate::ingest::IngestMetrics>>| async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                        metrics.encode(),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}
