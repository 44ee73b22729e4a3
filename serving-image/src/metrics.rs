//! The inference server's Prometheus metrics (prometheus-client), served on the admin port at /metrics. The
//! names and labels are a contract: Rollout analysis and the chart's PrometheusRules query them (the
//! README's "Serving metrics" lists them).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use crate::feedback::Quality;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub version: String,
    pub protocol: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub model: String,
    pub version: String,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedbackLabels {
    pub source: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct ServingMetrics {
    pub registry: Registry,
    model: String,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    predictions: Family<VersionLabels, Counter>,
    scores: Family<VersionLabels, Histogram>,
    labeled: Family<VersionLabels, Counter>,
    clicks: Family<VersionLabels, Counter>,
    labeled_score_sum: Family<VersionLabels, FloatCounter>,
    online_auc: Family<VersionLabels, FloatGauge>,
    online_calibration: Family<VersionLabels, FloatGauge>,
    window_samples: Family<VersionLabels, Gauge>,
    feedback: Family<FeedbackLabels, Counter>,
    pending: Gauge,
    prediction_log: Family<OutcomeLabels, Counter>,
    model_loads: Family<OutcomeLabels, Counter>,
    online_store: Family<OutcomeLabels, Counter>,
}

impl ServingMetrics {
    pub fn new(model: &str) -> Self {
        let mut registry = Registry::with_prefix("flywheel_serving");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Inference requests, by model version, protocol and outcome code",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Inference request latency inside the server (decode, transform, score, encode)",
            latency.clone(),
        );
        let predictions = Family::<VersionLabels, Counter>::default();
        registry.register(
            "predictions",
            "Rows scored, by model version",
            predictions.clone(),
        );
        let scores = Family::<VersionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(linear_buckets(0.05, 0.05, 19))
        });
        registry.register(
            "prediction_score",
            "Predicted click probabilities, by model version",
            scores.clone(),
        );
        let labeled = Family::<VersionLabels, Counter>::default();
        registry.register(
            "labeled",
            "Predictions joined to a label (click, explicit label, or window expiry)",
            labeled.clone(),
        );
        let clicks = Family::<VersionLabels, Counter>::default();
        registry.register(
            "labeled_clicks",
            "Labeled predictions that were clicked",
            clicks.clone(),
        );
        let labeled_score_sum = Family::<VersionLabels, FloatCounter>::default();
        registry.register(
            "labeled_score_sum",
            "Sum of the predicted probabilities of labeled predictions",
            labeled_score_sum.clone(),
        );
        let online_auc = Family::<VersionLabels, FloatGauge>::default();
        registry.register(
            "online_auc",
            "AUC of the labeled predictions in the quality window",
            online_auc.clone(),
        );
        let online_calibration = Family::<VersionLabels, FloatGauge>::default();
        registry.register(
            "online_calibration",
            "Sum predicted / sum clicked over the quality window (1 is calibrated)",
            online_calibration.clone(),
        );
        let window_samples = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "online_window_samples",
            "Labeled predictions in the quality window",
            window_samples.clone(),
        );
        let feedback = Family::<FeedbackLabels, Counter>::default();
        registry.register(
            "feedback",
            "Labels received, by source (http, grpc, kafka) and outcome (matched, unmatched, malformed)",
            feedback.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "pending_predictions",
            "Predictions waiting for a label inside the attribution window",
            pending.clone(),
        );
        let prediction_log = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "prediction_log",
            "Prediction log records, by outcome (queued, dropped: queue full, failed: delivery error)",
            prediction_log.clone(),
        );
        let model_loads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "model_loads",
            "Model artifact loads, by outcome (ok, failed)",
            model_loads.clone(),
        );
        let online_store = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "online_store_lookups",
            "Online store entity lookups, by outcome (hit, miss: no such entity, error: request failed)",
            online_store.clone(),
        );
        ServingMetrics {
            registry,
            model: model.to_owned(),
            requests,
            latency,
            predictions,
            scores,
            labeled,
            clicks,
            labeled_score_sum,
            online_auc,
            online_calibration,
            window_samples,
            feedback,
            pending,
            prediction_log,
            model_loads,
            online_store,
        }
    }

    fn version(&self, version: &str) -> VersionLabels {
        VersionLabels {
            model: self.model.clone(),
            version: version.to_owned(),
        }
    }

    pub fn request(&self, version: &str, protocol: &'static str, code: &'static str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                model: self.model.clone(),
                version: version.to_owned(),
                protocol,
                code,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                model: self.model.clone(),
                version: version.to_owned(),
                protocol,
            })
            .observe(seconds);
    }

    pub fn scored(&self, version: &str, scores: &[f64]) {
        let labels = self.version(version);
        self.predictions
            .get_or_create(&labels)
            .inc_by(scores.len() as u64);
        let histogram = self.scores.get_or_create(&labels);
        for &score in scores {
            histogram.observe(score);
        }
    }

    pub fn labeled(&self, version: &str, score: f64, clicked: bool) {
        let labels = self.version(version);
        self.labeled.get_or_create(&labels).inc();
        if clicked {
            self.clicks.get_or_create(&labels).inc();
        }
        self.labeled_score_sum.get_or_create(&labels).inc_by(score);
    }

    pub fn quality(&self, version: &str, quality: &Quality) {
        let labels = self.version(version);
        self.window_samples
            .get_or_create(&labels)
            .set(i64::try_from(quality.samples).unwrap_or(i64::MAX));
        // NaN (no value yet) tells a PromQL gate "no data" instead of a misleading 0.
        self.online_auc
            .get_or_create(&labels)
            .set(quality.auc.unwrap_or(f64::NAN));
        self.online_calibration
            .get_or_create(&labels)
            .set(quality.calibration.unwrap_or(f64::NAN));
    }

    pub fn feedback(&self, source: &'static str, outcome: &'static str, count: u64) {
        self.feedback
            .get_or_create(&FeedbackLabels { source, outcome })
            .inc_by(count);
    }

    pub fn pending(&self, count: usize) {
        self.pending.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn prediction_log(&self, outcome: &'static str) {
        self.prediction_log
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn model_load(&self, outcome: &'static str) {
        self.model_loads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn online_store(&self, outcome: &'static str, count: u64) {
        self.online_store
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(count);
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
