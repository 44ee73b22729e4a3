//! The router's data path: an HTTP/1.1 and h2c (gRPC) reverse proxy that sends each request to the backend its
//! sticky bucket falls in, copies mirrored requests to the shadow backend and compares the answers there
//! (never returning them), and swaps its route plan atomically, so a weight change drops no request.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::routes::{BUCKETS, RoutePlan, bucket_of};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: String,
    protocol: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

pub struct RouterMetrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    overhead: Histogram,
    shadow: Family<OutcomeLabels, Counter>,
    shadow_delta: Histogram,
    reloads: Family<OutcomeLabels, Counter>,
    weights: Family<BackendLabels, Gauge>,
    upstream_failures: Family<BackendLabels, Counter>,
}

impl RouterMetrics {
    /// Every series carries `model="<model>"` when given (the Rollout's name, as the servers' series do), so
    /// a rollout's analysis selects its own router.
    fn new(model: Option<&str>) -> Self {
        let labels = model.map(|model| {
            (
                std::borrow::Cow::Borrowed("model"),
                std::borrow::Cow::Owned(model.to_owned()),
            )
        });
        let mut registry = Registry::with_prefix_and_labels("flywheel_router", labels.into_iter());
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests routed, by backend (model version), protocol and status code",
            requests.clone(),
        );
        let overhead = Histogram::new(exponential_buckets(0.000_005, 2.0, 16));
        registry.register(
            "overhead_seconds",
            "Time a request spends in the router itself (total minus the backend's time to answer)",
            overhead.clone(),
        );
        let shadow = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "shadow_comparisons",
            "Mirrored requests, by outcome (agree, differ, error)",
            shadow.clone(),
        );
        let shadow_delta = Histogram::new(exponential_buckets(1e-7, 10.0, 8));
        registry.register(
            "shadow_score_delta",
            "Largest absolute score difference between the primary and the mirror per request",
            shadow_delta.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Route configuration changes, by outcome (applied, rejected)",
            reloads.clone(),
        );
        let weights = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "weight_basis_points",
            "Current traffic weight of each backend in 0.01% steps",
            weights.clone(),
        );
        let upstream_failures = Family::<BackendLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Requests the router could not deliver to their backend or read its answer of (the backend never counted them), by backend",
            upstream_failures.clone(),
        );
        RouterMetrics {
            registry,
            requests,
            overhead,
            shadow,
            shadow_delta,
            reloads,
            weights,
            upstream_failures,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

pub struct Proxy {
    plan: ArcSwap<RoutePlan>,
    sticky_header: HeaderName,
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
    pub metrics: RouterMetrics,
    max_body_bytes: usize,
    unkeyed: AtomicU64,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1); `te: trailers` is end-to-end for gRPC.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Proxy {
    pub fn new(
        plan: RoutePlan,
        sticky_header: HeaderName,
        max_body_bytes: usize,
        model: Option<&str>,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let proxy = Proxy {
            plan: ArcSwap::from_pointee(plan),
            sticky_header,
            http1,
            http2,
            metrics: RouterMetrics::new(model),
            max_body_bytes,
            unkeyed: AtomicU64::new(0),
        };
        proxy.publish_weights(&proxy.plan.load());
        proxy
    }

    pub fn plan(&self) -> Arc<RoutePlan> {
        self.plan.load_full()
    }

    /// Switches to `plan`; requests already routed finish where they were sent.
    pub fn set_plan(&self, plan: RoutePlan) {
        let old = self.plan.swap(Arc::new(plan));
        for backend in &old.config.backends {
            self.metrics
                .weights
                .get_or_create(&BackendLabels {
                    backend: backend.name.clone(),
                })
                .set(0);
        }
        self.publish_weights(&self.plan.load());
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels { outcome: "applied" })
            .inc();
    }

    pub fn rejected_plan(&self) {
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "rejected",
            })
            .inc();
    }

    fn publish_weights(&self, plan: &RoutePlan) {
        for backend in &plan.config.backends {
            self.metrics
                .weights
                .get_or_create(&BackendLabels {
                    backend: backend.name.clone(),
                })
                .set((backend.weight * 100.0).round() as i64);
        }
    }

    /// The request's bucket: from its sticky key, or spread evenly when it has none.
    fn bucket(&self, headers: &HeaderMap) -> u32 {
        match headers.get(&self.sticky_header) {
            Some(key) => bucket_of(key.as_bytes()),
            None => {
                let n = self.unkeyed.fetch_add(1, Ordering::Relaxed);
                bucket_of(&n.to_le_bytes())
            }
        }
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let grpc = is_grpc(request.headers());
        let protocol = if grpc { "grpc" } else { "rest" };
        let plan = self.plan();
        let bucket = self.bucket(request.headers());
        let backend = plan.backend(bucket);
        let base = if grpc { &backend.grpc } else { &backend.http };
        let Some(base) = base.clone() else {
            return self.failure(
                grpc,
                &backend.name,
                protocol,
                format!("backend {} has no {protocol} URL", backend.name),
            );
        };
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        let mirror = plan.mirror(bucket).and_then(|mirror| {
            let base = if grpc { &mirror.grpc } else { &mirror.http };
            base.clone()
        });
        let (body, copy): (ProxyBody, Option<Bytes>) = match mirror {
            None => (body.map_err(BoxError::from).boxed(), None),
            Some(_) => match http_body_util::Limited::new(body, self.max_body_bytes)
                .collect()
                .await
            {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    (full(bytes.clone()), Some(bytes))
                }
                Err(err) => {
                    return self.failure(
                        grpc,
                        &backend.name,
                        protocol,
                        format!("reading the request body: {err}"),
                    );
                }
            },
        };
        let Ok(uri) = target(&base, &parts.uri) else {
            return self.failure(
                grpc,
                &backend.name,
                protocol,
                format!("bad backend URL {base}"),
            );
        };
        let mut upstream = Request::from_parts(parts.clone(), body);
        *upstream.uri_mut() = uri;
        let client = if grpc { &self.http2 } else { &self.http1 };
        let sent = Instant::now();
        let answer = client.request(upstream).await;
        let answered = Instant::now();
        let response = match answer {
            Ok(response) => response,
            Err(err) => {
                return self.failure(
                    grpc,
                    &backend.name,
                    protocol,
                    format!("backend {} unreachable: {err}", backend.name),
                );
            }
        };
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        let code = response_code(grpc, &head.headers, head.status);
        let body = match (copy, mirror) {
            (Some(copy), Some(mirror_base)) => {
                // The primary's answer is buffered to compare it with the mirror's.
                match body.collect().await {
                    Ok(collected) => {
                        let trailers = collected.trailers().cloned();
                        let bytes = collected.to_bytes();
                        self.clone()
                            .shadow(grpc, mirror_base, parts, copy, bytes.clone());
                        with_trailers(bytes, trailers)
                    }
                    Err(err) => {
                        return self.failure(
                            grpc,
                            &backend.name,
                            protocol,
                            format!("reading the answer of {}: {err}", backend.name),
                        );
                    }
                }
            }
            _ => body.map_err(BoxError::from).boxed(),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                backend: backend.name.clone(),
                protocol,
                code,
            })
            .inc();
        let overhead = started.elapsed().saturating_sub(answered - sent);
        self.metrics.overhead.observe(overhead.as_secs_f64());
        Response::from_parts(head, body)
    }

    fn failure(
        &self,
        grpc: bool,
        backend: &str,
        protocol: &'static str,
        message: String,
    ) -> Response<ProxyBody> {
        tracing::warn!(backend, %message, "request not routed");
        let code = if grpc { "14" } else { "502" };
        self.metrics
            .upstream_failures
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
            })
            .inc();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                backend: backend.to_owned(),
                protocol,
                code: code.to_owned(),
            })
            .inc();
        failure_response(grpc, &message)
    }

    /// Sends the copy to the mirror and compares its scores with the primary's; the result is only logged and
    /// counted.
    fn shadow(
        self: Arc<Self>,
        grpc: bool,
        base: String,
        parts: http::request::Parts,
        body: Bytes,
        primary: Bytes,
    ) {
        tokio::spawn(async move {
            let outcome = async {
                let uri = target(&base, &parts.uri).map_err(|err| err.to_string())?;
                let mut request = Request::from_parts(parts, full(body));
                *request.uri_mut() = uri;
                let client = if grpc { &self.http2 } else { &self.http1 };
                let response = client
                    .request(request)
                    .await
                    .map_err(|err| err.to_string())?;
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|err| err.to_string())?
                    .to_bytes();
                let ours = scores_of(grpc, &primary).ok_or("primary answer has no scores")?;
                let theirs = scores_of(grpc, &bytes).ok_or("mirror answer has no scores")?;
                if ours.len() != theirs.len() {
                    return Err(format!(
                        "{} scores from the primary, {} from the mirror",
                        ours.len(),
                        theirs.len()
                    ));
                }
                Ok(ours
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max))
            }
            .await;
            let label = match outcome {
                Ok(delta) => {
                    self.metrics.shadow_delta.observe(delta);
                    tracing::debug!(delta, "shadow answer compared");
                    if delta <= 1e-6 { "agree" } else { "differ" }
                }
                Err(error) => {
                    tracing::info!(%error, "shadow request failed");
                    "error"
                }
            };
            self.metrics
                .shadow
                .get_or_create(&OutcomeLabels { outcome: label })
                .inc();
        });
    }
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn with_trailers(bytes: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(bytes))];
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn target(base: &str, uri: &Uri) -> Result<Uri, http::uri::InvalidUri> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{}{path}", base.trim_end_matches('/')).parse()
}

/// The status label: the gRPC status of a trailers-only answer (else `0`, as it is only known at the end of
/// the stream), or the HTTP status.
fn response_code(grpc: bool, headers: &HeaderMap, status: StatusCode) -> String {
    if grpc {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned()
    } else {
        status.as_u16().to_string()
    }
}

fn failure_response(grpc: bool, message: &str) -> Response<ProxyBody> {
    let printable: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    let mut response = if grpc {
        let mut response = Response::new(full(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(value) = HeaderValue::from_str(&printable) {
            headers.insert("grpc-message", value);
        }
        response
    } else {
        let body = serde_json::json!({ "error": printable }).to_string();
        let mut response = Response::new(full(Bytes::from(body)));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    response.headers_mut().insert(
        "x-flywheel-router",
        HeaderValue::from_static("backend-error"),
    );
    response
}

/// Scores in an inference answer: the `score` output of a REST JSON body, or of a gRPC message.
fn scores_of(grpc: bool, body: &[u8]) -> Option<Vec<f64>> {
    if grpc {
        let message = body.get(5..)?;
        let response =
            <crate::grpc::inference::ModelInferResponse as prost::Message>::decode(message).ok()?;
        if let Some(raw) = response.raw_output_contents.first() {
            return Some(
                raw.chunks_exact(8)
                    .map(|c| {
                        let mut bytes = [0; 8];
                        bytes.copy_from_slice(c);
                        f64::from_le_bytes(bytes)
                    })
                    .collect(),
            );
        }
        Some(
            response
                .outputs
                .first()?
                .contents
                .as_ref()?
                .fp64_contents
                .clone(),
        )
    } else {
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        json.get("outputs")?
            .get(0)?
            .get("data")?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_f64)
            .collect()
    }
}

/// Accepts connections (HTTP/1.1 and h2c on one port) and routes every request until the process ends.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request).await) }
            });
            if let Err(error) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "client connection ended");
            }
        });
    }
}

/// Share of buckets a weight in percent covers, for messages.
pub fn describe(plan: &RoutePlan) -> String {
    plan.config
        .backends
        .iter()
        .map(|b| format!("{}={}%", b.name, b.weight))
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(" ({BUCKETS} buckets)")
}
