//! The inference server's shared state and the protocol-independent request path: take the current model,
//! validate and encode, score in a micro-batch, remember the predictions for feedback, log them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flywheel_auth::Token;

use crate::batcher::Batcher;
use crate::feedback::{Attribution, Labeled, QualityWindow};
use crate::kafka::{ClickEvent, LabelForwarder, PredictionLog, PredictionRecord};
use crate::metrics::ServingMetrics;
use crate::model::{ModelSlot, ModelSource, ServedModel};
use crate::online::{OnlineError, OnlineStore};
use crate::request::{self, InferRequest, MAX_REQUEST_ID_BYTES, RequestError};

pub struct Limits {
    pub max_rows: usize,
    pub max_body_bytes: usize,
}

pub struct Server {
    pub model_name: String,
    pub slot: ModelSlot,
    pub metrics: Arc<ServingMetrics>,
    pub limits: Limits,
    batcher: Batcher,
    attribution: Mutex<Attribution>,
    quality: Mutex<QualityWindow>,
    prediction_log: Option<PredictionLog>,
    online_store: Option<OnlineStore>,
    forwarder: Option<LabelForwarder>,
    /// The token a label must carry (the Rollout's feedback token); `None`: labels are taken from anyone.
    feedback_token: Option<Token>,
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{0}")]
    Invalid(#[from] RequestError),
    #[error("model `{0}` is not served here")]
    UnknownModel(String),
    #[error("no model is loaded: {0}")]
    NotReady(String),
    #[error("{0}")]
    OnlineStore(String),
    #[error("scoring failed: the scorer threads stopped")]
    Internal,
    #[error("no request id could be issued: {0}")]
    RequestId(String),
}

impl From<OnlineError> for InferError {
    fn from(err: OnlineError) -> Self {
        match err {
            OnlineError::Request(invalid) => InferError::Invalid(invalid),
            other => InferError::OnlineStore(other.to_string()),
        }
    }
}

impl InferError {
    /// The outcome label of the requests metric (gRPC status names).
    pub fn code(&self) -> &'static str {
        match self {
            InferError::Invalid(_) => "INVALID_ARGUMENT",
            InferError::UnknownModel(_) => "NOT_FOUND",
            InferError::NotReady(_) | InferError::OnlineStore(_) => "UNAVAILABLE",
            InferError::Internal | InferError::RequestId(_) => "INTERNAL",
        }
    }
}

/// Scores of one request.
pub struct Scored {
    pub id: String,
    pub version: String,
    pub scores: Vec<f64>,
}

pub struct FeedbackSettings {
    pub window: Duration,
    pub capacity: usize,
    pub quality_window: Duration,
    pub quality_samples: usize,
    pub token: Option<Token>,
    /// With a clicks topic: labels from clients go there, and every replica joins them from it.
    pub forwarder: Option<LabelForwarder>,
}

/// What became of labels a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOutcome {
    /// Joined by this replica: `matched` to its predictions, the others unknown, labeled or expired.
    Joined { matched: usize, unmatched: usize },
    /// Written to the clicks topic, where every replica (the one that served them among them) joins them.
    Forwarded(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("label request id is {len} bytes; at most {MAX_REQUEST_ID_BYTES} are accepted")]
    RequestIdTooLong { len: usize },
    #[error("the clicks topic did not take the labels ({0}); send them again")]
    Forward(#[from] rdkafka::error::KafkaError),
}

impl Server {
    pub fn new(
        model_name: String,
        limits: Limits,
        batcher: Batcher,
        feedback: &FeedbackSettings,
        metrics: Arc<ServingMetrics>,
        prediction_log: Option<PredictionLog>,
        online_store: Option<OnlineStore>,
    ) -> Server {
        Server {
            model_name,
            slot: ModelSlot::default(),
            metrics,
            limits,
            batcher,
            attribution: Mutex::new(Attribution::new(feedback.window, feedback.capacity)),
            quality: Mutex::new(QualityWindow::new(
                feedback.quality_window,
                feedback.quality_samples,
            )),
            prediction_log,
            online_store,
            feedback_token: feedback.token.clone(),
            forwarder: feedback.forwarder.clone(),
        }
    }

    /// Takes labels a client sent (`source`: `http` or `grpc`): forwarded to the clicks topic when there is
    /// one, else joined here. Nothing is taken when a request id is over the limit.
    pub async fn take_labels(
        &self,
        source: &'static str,
        labels: Vec<ClickEvent>,
    ) -> Result<LabelOutcome, LabelError> {
        if let Some(label) = labels
            .iter()
            .find(|label| label.request_id.len() > MAX_REQUEST_ID_BYTES)
        {
            return Err(LabelError::RequestIdTooLong {
                len: label.request_id.len(),
            });
        }
        let Some(forwarder) = &self.forwarder else {
            let matched = labels
                .iter()
                .filter(|label| self.feedback(source, &label.request_id, label.clicked))
                .count();
            return Ok(LabelOutcome::Joined {
                matched,
                unmatched: labels.len() - matched,
            });
        };
        match forwarder.forward(&labels).await {
            Ok(()) => {
                self.metrics
                    .feedback(source, "forwarded", labels.len() as u64);
                Ok(LabelOutcome::Forwarded(labels.len()))
            }
            Err(error) => {
                self.metrics
                    .feedback(source, "forward_failed", labels.len() as u64);
                Err(error.into())
            }
        }
    }

    /// Loads a model version beside the current one and switches to it (the current one keeps serving when
    /// the new one fails to load or verify).
    pub fn load(&self, source: &ModelSource) -> Result<Arc<ServedModel>, String> {
        let result = self.slot.load(source);
        match &result {
            Ok(model) => {
                self.metrics.model_load("ok");
                tracing::info!(version = model.version(), sha256 = %model.sha256, "serving model");
            }
            Err(error) => {
                self.metrics.model_load("failed");
                tracing::error!(%error, "model not loaded; the previous one keeps serving");
            }
        }
        result
    }

    /// The model a request names (its name, and its version when given).
    pub fn model_for(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ServedModel>, InferError> {
        if name != self.model_name {
            return Err(InferError::UnknownModel(name.to_owned()));
        }
        let model = self.slot.current().ok_or_else(|| {
            InferError::NotReady(
                self.slot
                    .status()
                    .last_error
                    .unwrap_or_else(|| "still loading".to_owned()),
            )
        })?;
        match version {
            Some(version) if !version.is_empty() && version != model.version() => Err(
                InferError::UnknownModel(format!("{name} version {version}")),
            ),
            _ => Ok(model),
        }
    }

    pub async fn infer(
        &self,
        model: Arc<ServedModel>,
        mut request: InferRequest,
    ) -> Result<Scored, InferError> {
        if let Some(store) = &self.online_store {
            store.fill(&model.card.schema, &mut request).await?;
        }
        let data = request::encode(&model.card.schema, &request, self.limits.max_rows)?;
        let rows = data.labels.len();
        let logged = self
            .prediction_log
            .as_ref()
            .map(|_| request::served_rows(&model.card.schema, &request, rows));
        let scores = self
            .batcher
            .score(model.clone(), data)
            .await
            .map_err(|_| InferError::Internal)?;
        let id = match request.id {
            Some(id) => id,
            None => new_request_id()?,
        };
        let version = model.version().to_owned();
        self.metrics.scored(&version, &scores);
        self.remember(&id, &version, &scores);
        if let (Some(log), Some(served)) = (&self.prediction_log, logged) {
            let timestamp_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            for (row, (&score, features)) in scores.iter().zip(served).enumerate() {
                log.log(&PredictionRecord {
                    request_id: row_id(&id, row, scores.len()),
                    model: self.model_name.clone(),
                    version: version.clone(),
                    score,
                    features,
                    timestamp_ms,
                });
            }
        }
        Ok(Scored {
            id,
            version,
            scores,
        })
    }

    fn remember(&self, id: &str, version: &str, scores: &[f64]) {
        let now = Instant::now();
        let mut attribution = self.lock_attribution();
        for (row, &score) in scores.iter().enumerate() {
            attribution.record(row_id(id, row, scores.len()), version, score, now);
        }
    }

    /// Whether a label carrying this `Authorization` header may be taken.
    pub fn may_label(&self, authorization: Option<&str>) -> bool {
        self.feedback_token
            .as_ref()
            .is_none_or(|token| token.authorizes(authorization))
    }

    /// Joins a label to its prediction; `false` when the id is unknown, already labeled or expired.
    pub fn feedback(&self, source: &'static str, request_id: &str, clicked: bool) -> bool {
        let labeled = self
            .lock_attribution()
            .label(request_id, clicked, Instant::now());
        match labeled {
            Some(labeled) => {
                // Labeled first: a scrape that sees a label matched also sees it in the labeled series.
                self.account(&[labeled]);
                self.metrics.feedback(source, "matched", 1);
                true
            }
            None => {
                self.metrics.feedback(source, "unmatched", 1);
                false
            }
        }
    }

    fn account(&self, labeled: &[Labeled]) {
        let now = Instant::now();
        let mut quality = self.lock_quality();
        for label in labeled {
            self.metrics
                .labeled(&label.version, label.score, label.clicked);
            quality.add(label, now);
        }
    }

    /// Ends expired attribution windows (negatives) and refreshes the online quality gauges.
    pub fn refresh_quality(&self) {
        let now = Instant::now();
        let (negatives, pending) = {
            let mut attribution = self.lock_attribution();
            (attribution.expire(now), attribution.pending())
        };
        self.account(&negatives);
        self.metrics.pending(pending);
        let measured = self.lock_quality().measure(now);
        for (version, quality) in &measured {
            self.metrics.quality(version, quality);
        }
    }

    fn lock_attribution(&self) -> std::sync::MutexGuard<'_, Attribution> {
        self.attribution
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_quality(&self) -> std::sync::MutexGuard<'_, QualityWindow> {
        self.quality
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An id for a request that brought none: 128 random bits, so nobody can label predictions they were not
/// given the id of.
fn new_request_id() -> Result<String, InferError> {
    flywheel_auth::random_hex(16).map_err(|err| InferError::RequestId(err.to_string()))
}

/// The id feedback uses for one row: the request id, or `<id>/<row>` in a batch of several rows.
pub fn row_id(id: &str, row: usize, rows: usize) -> String {
    if rows == 1 {
        id.to_owned()
    } else {
        format!("{id}/{row}")
    }
}
