//! The Open Inference Protocol's REST form (`/v2/...`) and the feedback call, on the inference port. Errors are
//! `{"error": "..."}` with 400 for bad input, 404 for another model, 503 before a model is loaded.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::kafka::ClickEvent;
use crate::model::ServedModel;
use crate::request::{Column, Datatype, InferRequest, Input, RequestError, datatype_of};
use crate::server::{InferError, LabelError, LabelOutcome, Server};

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v1/feedback", post(feedback))
        .with_state(server)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

fn status_of(err: &InferError) -> StatusCode {
    match err {
        InferError::Invalid(_) => StatusCode::BAD_REQUEST,
        InferError::UnknownModel(_) => StatusCode::NOT_FOUND,
        InferError::NotReady(_) | InferError::OnlineStore(_) => StatusCode::SERVICE_UNAVAILABLE,
        InferError::Internal | InferError::RequestId(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

/// Ready while a model serves; the body says which, and why the last load failed if it did.
async fn ready(State(server): State<Arc<Server>>) -> Response {
    let status = server.slot.status();
    let code = if server.slot.current().is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(object) = body.as_object_mut() {
        object.insert("ready".into(), json!(code == StatusCode::OK));
    }
    (code, axum::Json(body)).into_response()
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "flywheel-serving",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
    .into_response()
}

/// Model metadata: the inputs a request must carry (every feature but crosses) and the `score` output.
pub fn metadata_of(server: &Server, model: &ServedModel) -> Json {
    let inputs: Vec<Json> = crate::request::input_features(&model.card.schema)
        .map(|(name, value_type)| json!({"name": name, "datatype": datatype_of(value_type), "shape": [-1]}))
        .collect();
    json!({
        "name": server.model_name,
        "versions": [model.version()],
        "platform": "flywheel",
        "inputs": inputs,
        "outputs": [{"name": "score", "datatype": "FP64", "shape": [-1]}],
    })
}

async fn model_metadata(State(server): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    match server.model_for(&name, None) {
        Ok(model) => axum::Json(metadata_of(&server, &model)).into_response(),
        Err(err) => error(status_of(&err), err),
    }
}

async fn model_ready(State(server): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    match server.model_for(&name, None) {
        Ok(_) => axum::Json(json!({"name": name, "ready": true})).into_response(),
        Err(err) => error(status_of(&err), err),
    }
}

async fn infer(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    infer_with(server, name, None, body).await
}

async fn infer_version(
    State(server): State<Arc<Server>>,
    Path((name, version)): Path<(String, String)>,
    body: Body,
) -> Response {
    infer_with(server, name, Some(version), body).await
}

async fn infer_with(
    server: Arc<Server>,
    name: String,
    version: Option<String>,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = async {
        let model = server.model_for(&name, version.as_deref())?;
        let bytes = read_body(body, server.limits.max_body_bytes).await?;
        let request = decode(&bytes)?;
        let scored = server.infer(model, request).await?;
        Ok::<_, InferError>(scored)
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(scored) => {
            server
                .metrics
                .request(&scored.version, "rest", "OK", seconds);
            axum::Json(json!({
                "model_name": server.model_name,
                "model_version": scored.version,
                "id": scored.id,
                "outputs": [{
                    "name": "score",
                    "datatype": "FP64",
                    "shape": [scored.scores.len()],
                    "data": scored.scores,
                }],
            }))
            .into_response()
        }
        Err(err) => {
            let version = server
                .slot
                .current()
                .map(|m| m.version().to_owned())
                .unwrap_or_default();
            server
                .metrics
                .request(&version, "rest", err.code(), seconds);
            error(status_of(&err), err)
        }
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, RequestError> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                RequestError::Body(format!("request body exceeds {limit} bytes"))
            } else {
                RequestError::Body(err.to_string())
            }
        })
}

#[derive(Deserialize)]
struct RestRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<RestInput>,
}

#[derive(Deserialize)]
struct RestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Json,
}

/// Decodes a KServe v2 JSON inference request (tensor data flat or nested row-major).
pub fn decode(body: &[u8]) -> Result<InferRequest, RequestError> {
    let request: RestRequest =
        serde_json::from_slice(body).map_err(|err| RequestError::Body(err.to_string()))?;
    let inputs = request
        .inputs
        .into_iter()
        .map(|input| {
            let column = column_of(&input)?;
            Ok(Input {
                name: input.name,
                shape: input.shape,
                column,
            })
        })
        .collect::<Result<_, RequestError>>()?;
    Ok(InferRequest {
        id: request.id.filter(|id| !id.is_empty()),
        inputs,
    })
}

fn column_of(input: &RestInput) -> Result<Column, RequestError> {
    let datatype = Datatype::parse(&input.datatype).ok_or_else(|| RequestError::Datatype {
        input: input.name.clone(),
        expected: "a known datatype",
        got: input.datatype.clone(),
    })?;
    let mut leaves = Vec::new();
    flatten(&input.data, &mut leaves);
    let bad = |index: usize, what: &str| RequestError::BadValue {
        input: input.name.clone(),
        message: format!("element {index} is not {what}"),
    };
    Ok(match datatype {
        Datatype::Bool => Column::Bool(
            leaves
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_bool().ok_or_else(|| bad(i, "a boolean")))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Int => Column::Int(
            leaves
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_i64().ok_or_else(|| bad(i, "a 64-bit integer")))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Float => Column::Float(
            leaves
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().ok_or_else(|| bad(i, "a number")))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Bytes => Column::Str(
            leaves
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(i, "a string"))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn flatten<'a>(value: &'a Json, out: &mut Vec<&'a Json>) {
    match value {
        Json::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelBody {
    request_id: String,
    #[serde(default = "clicked_by_default")]
    clicked: bool,
}

fn clicked_by_default() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FeedbackBody {
    Many { labels: Vec<LabelBody> },
    One(LabelBody),
}

/// `POST /v1/feedback` with `{"requestId": "...", "clicked": true}` or `{"labels": [...]}`.
/// When the server holds a feedback token, the call must carry it (`Authorization: Bearer <token>`).
async fn feedback(State(server): State<Arc<Server>>, headers: HeaderMap, body: Body) -> Response {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if !server.may_label(authorization) {
        server.metrics.feedback("http", "unauthenticated", 1);
        return error(
            StatusCode::UNAUTHORIZED,
            "feedback needs `Authorization: Bearer <feedback token>`",
        );
    }
    let bytes = match read_body(body, server.limits.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(err) => return error(StatusCode::BAD_REQUEST, err),
    };
    let labels = match serde_json::from_slice::<FeedbackBody>(&bytes) {
        Ok(FeedbackBody::Many { labels }) => labels,
        Ok(FeedbackBody::One(label)) => vec![label],
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "feedback must be {{\"requestId\", \"clicked\"}} or {{\"labels\": [...]}}: {err}"
                ),
            );
        }
    };
    let labels = labels
        .into_iter()
        .map(|label| ClickEvent {
            request_id: label.request_id,
            clicked: label.clicked,
        })
        .collect();
    match server.take_labels("http", labels).await {
        Ok(LabelOutcome::Joined { matched, unmatched }) => {
            axum::Json(json!({"matched": matched, "unmatched": unmatched})).into_response()
        }
        Ok(LabelOutcome::Forwarded(forwarded)) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"matched": 0, "unmatched": 0, "forwarded": forwarded})),
        )
            .into_response(),
        Err(err @ LabelError::RequestIdTooLong { .. }) => error(StatusCode::BAD_REQUEST, err),
        Err(err @ LabelError::Forward(_)) => error(StatusCode::SERVICE_UNAVAILABLE, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nested_and_flat_data_decode_alike() {
        let flat = decode(
            br#"{"id":"a","inputs":[{"name":"x","shape":[2,1],"datatype":"INT64","data":[1,2]}]}"#,
        );
        let nested = decode(
            br#"{"id":"a","inputs":[{"name":"x","shape":[2,1],"datatype":"INT32","data":[[1],[2]]}]}"#,
        );
        assert_eq!(flat, nested);
        assert!(matches!(flat, Ok(r) if r.inputs[0].column == Column::Int(vec![1, 2])));
    }

    #[test]
    fn wrong_values_name_the_input() {
        let message = |body: &[u8]| decode(body).map(|_| ()).unwrap_err().to_string();
        assert!(
            message(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#)
                .contains("input `x`: element 0 is not a 64-bit integer")
        );
        assert!(
            message(br#"{"inputs":[{"name":"x","shape":[1],"datatype":"COMPLEX","data":[1]}]}"#)
                .contains("input `x`: datatype COMPLEX")
        );
        assert!(message(br#"{"inputs":"#).contains("malformed request body"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&body);
        }

        #[test]
        fn arbitrary_json_requests_never_panic(
            name in "[a-z_]{0,8}",
            shape in proptest::collection::vec(any::<i64>(), 0..3),
            datatype in prop::sample::select(vec!["BOOL", "INT64", "FP32", "BYTES", "FP16", ""]),
            data in proptest::collection::vec(prop_oneof![
                any::<i64>().prop_map(|v| json!(v)),
                any::<f64>().prop_map(|v| json!(v)),
                any::<bool>().prop_map(|v| json!(v)),
                "[a-z]{0,4}".prop_map(|v| json!(v)),
                Just(json!(null)),
                Just(json!([[1], [2, 3]])),
            ], 0..6),
        ) {
            let body = json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]});
            let schema = flywheel_ml::synthetic::feature_schema(100);
            if let Ok(request) = decode(body.to_string().as_bytes()) {
                let _ = crate::request::encode(&schema, &request, 64);
            }
        }
    }
}
