//! Admin endpoints, on their own port (never the inference port): metrics, and the live configuration of the
//! server (which model version it serves) and of the router (weights), plus the file watch that applies a
//! mounted ConfigMap the same way. `/metrics` is open to scrapers; every `/admin` call needs the admin token
//! (the operator's, from the Rollout's Secret), and without a token configured the admin endpoints only read.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flywheel_auth::Token;
use serde_json::json;

use crate::model::ModelSource;
use crate::proxy::Proxy;
use crate::routes::{RouteConfig, RoutePlan};
use crate::server::Server;

const PROMETHEUS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn rejected(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({"error": message.to_string()}))).into_response()
}

/// Who may use the admin endpoints.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    /// The token every `/admin` call must carry; `None`: reads are open and changes are refused.
    pub token: Option<Token>,
    /// Whether `PUT /admin/model` may swap the served model (off by default: a Rollout serves one version per
    /// Deployment, and a swap would outlive promotion).
    pub model_swap: bool,
}

impl AdminAccess {
    /// `Err` with the response to send when the caller may not do this (`change`: a write).
    fn check(&self, headers: &HeaderMap, change: bool) -> Result<(), Box<Response>> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        match &self.token {
            Some(token) if token.authorizes(header) => Ok(()),
            Some(_) => Err(Box::new(rejected(
                StatusCode::UNAUTHORIZED,
                "admin calls need `Authorization: Bearer <admin token>`",
            ))),
            None if change => Err(Box::new(rejected(
                StatusCode::FORBIDDEN,
                "admin changes are disabled: the server was started without --admin-token-file",
            ))),
            None => Ok(()),
        }
    }
}

#[derive(Clone)]
struct ServerAdmin {
    server: Arc<Server>,
    access: AdminAccess,
}

pub fn server_router(server: Arc<Server>, access: AdminAccess) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(admin): State<ServerAdmin>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    admin.server.metrics.encode(),
                )
            }),
        )
        .route(
            "/admin/model",
            get(
                |State(admin): State<ServerAdmin>, headers: HeaderMap| async move {
                    match admin.access.check(&headers, false) {
                        Ok(()) => axum::Json(admin.server.slot.status()).into_response(),
                        Err(refused) => *refused,
                    }
                },
            )
            .put(load_model),
        )
        .with_state(ServerAdmin { server, access })
}

/// `PUT /admin/model` with a [`ModelSource`]: loads it beside the current model and switches; 422 (the
/// current model still serving) when it does not load or verify.
async fn load_model(
    State(ServerAdmin { server, access }): State<ServerAdmin>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = access.check(&headers, true) {
        return *refused;
    }
    if !access.model_swap {
        return rejected(
            StatusCode::FORBIDDEN,
            "model swaps are disabled: the server was started without --allow-model-swap",
        );
    }
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

#[derive(Clone)]
struct RouterAdmin {
    proxy: Arc<Proxy>,
    access: AdminAccess,
}

pub fn router_router(proxy: Arc<Proxy>, access: AdminAccess) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(admin): State<RouterAdmin>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    admin.proxy.metrics.encode(),
                )
            }),
        )
        .route(
            "/admin/routes",
            get(
                |State(admin): State<RouterAdmin>, headers: HeaderMap| async move {
                    match admin.access.check(&headers, false) {
                        Ok(()) => axum::Json(admin.proxy.plan().config.clone()).into_response(),
                        Err(refused) => *refused,
                    }
                },
            )
            .put(set_routes),
        )
        .with_state(RouterAdmin { proxy, access })
}

/// `PUT /admin/routes` with a [`RouteConfig`]: validated, then applied atomically; 400 naming the field.
async fn set_routes(
    State(RouterAdmin { proxy, access }): State<RouterAdmin>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = access.check(&headers, true) {
        return *refused;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_route_config_bytes_are_a_plan_or_a_reason(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_routes(&body);
        }

        #[test]
        fn any_weights_and_urls_are_a_plan_or_a_reason(
            backends in prop::collection::vec(
                ("[a-z0-9]{0,6}", prop::option::of("(http|https|ftp)://[a-z:0-9]{0,12}"), any::<f64>()),
                0..5,
            ),
            mirror_percent in prop::option::of(any::<f64>()),
        ) {
            let backends: Vec<serde_json::Value> = backends
                .into_iter()
                .map(|(name, http, weight)| json!({"name": name, "http": http, "weight": weight}))
                .collect();
            let mut config = json!({"backends": backends});
            if let Some(percent) = mirror_percent {
                config["mirror"] = json!({"name": "m", "http": "http://m:1", "percent": percent});
            }
            if let Ok(plan) = parse_routes(config.to_string().as_bytes()) {
                for bucket in [0, 1, 4_999, crate::routes::BUCKETS - 1] {
                    let _ = plan.backend(bucket);
                    let _ = plan.mirror(bucket);
                }
            }
        }
    }
}
