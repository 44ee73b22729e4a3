//! `Rollout`: one online model endpoint, moving traffic from the stable ModelVersion to a canary step by step
//! (1% → 5% → 20% → 100% by default), gated by Prometheus analysis, rolling back by itself.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, Duration, SpecViolations};
use crate::store_access::KafkaSecurity;

mod status;

pub use status::{Measurement, MeasurementVerdict, RolloutPhase, RolloutStatus};

/// Canary steps used when `strategy.canary.steps` is empty.
pub const DEFAULT_CANARY_WEIGHTS: [u32; 4] = [1, 5, 20, 100];

/// Regex of an HTTP header name.
pub const HEADER_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// Desired state of a Rollout: the ModelVersion to serve, its serving pods, the canary steps and analysis that
/// move traffic to a new version, and how traffic is routed.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flywheel.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "ro",
    category = "flywheel",
    derive = "PartialEq",
    doc = "One online model endpoint with a Prometheus-gated canary progression and automatic rollback.",
    printcolumn(name = "Step", type_ = "string", json_path = ".status.stepSummary"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.canaryWeight"),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableVersion"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canaryVersion"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The ModelVersion that should be served; changing it starts a progression from the current stable.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub model_version: String,
    /// The model servers: one Deployment per served version (stable and canary), each with these settings.
    #[serde(default)]
    pub serving: ServingTemplate,
    /// How traffic moves from the stable version to a new one. Default: canary steps 1% → 5% → 20% → 100%.
    #[serde(default)]
    pub strategy: Strategy,
    /// Prometheus analysis that gates each canary step: rounds of measurements that must pass before the weight
    /// moves on. Without it, steps advance without checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// Prometheus alert names that abort the canary at once when they fire for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub alerts: Vec<String>,
    #[serde(default)]
    pub traffic: TrafficRouting,
    /// Labels and the prediction log through Kafka, passed to every serving replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<Feedback>,
    /// The FeatureView whose online store fills the features a request does not carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_features: Option<OnlineFeatures>,
}

/// Online features for serving: each pod reads, for the request's entity key, the view's features from its
/// online store (address, database, key prefix and password Secret as the view states them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnlineFeatures {
    /// A FeatureView in the Rollout's namespace, with an online store and one entity. Its schema hash must be
    /// the one the served ModelVersion was trained on.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub feature_view: String,
    /// The request input that holds the entity key; defaults to the view's join key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub entity: Option<String>,
}

/// Kafka topics every serving replica of the Rollout reads and writes. Each replica reads all of the clicks
/// topic (a consumer group of its own) and labels the predictions it served, so online AUC and calibration
/// see every label whatever the replica count.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clicksTopic) || has(self.predictionLogTopic)").message("spec.feedback: set clicksTopic, predictionLogTopic or both"))]
#[x_kube(validation = Rule::new("!has(self.trafficLog) || has(self.predictionLogTopic)").message("spec.feedback.trafficLog: needs predictionLogTopic (what it writes down)"))]
pub struct Feedback {
    /// Kafka bootstrap servers, `host:port`.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub brokers: Vec<String>,
    /// Topic of labels: JSON `{"requestId": "…", "clicked": true}`, the request id being the one the
    /// prediction was answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249))]
    pub clicks_topic: Option<String>,
    /// Topic every served prediction is logged to: request id, version, score and the features as served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249))]
    pub prediction_log_topic: Option<String>,
    /// Write the served traffic into the offline store: a Deployment the operator runs consumes the prediction
    /// log and the clicks and writes them as Parquet, which a TrainingJob's `spec.data.servedTraffic` trains on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_log: Option<TrafficLog>,
    /// TLS and SASL toward the brokers, for every client of this Rollout (serving replicas and the traffic
    /// log's sink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<KafkaSecurity>,
}

/// Where and how often the served traffic is written down.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficLog {
    /// A directory on the training storage (`file://`): predictions go to `predictions/`, clicks to `clicks/`,
    /// one Parquet part per flush, by day.
    #[schemars(pattern(TRAFFIC_LOG_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// A part is written at least this often while traffic arrives (default `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<Duration>,
}

/// The traffic log lives on the training storage, which every pod mounts as a filesystem.
pub const TRAFFIC_LOG_URI_PATTERN: &str = r"^file:///.+$";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingTemplate {
    /// Replicas of each of the stable and canary servers.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Server image; defaults to the operator's `flywheel-serving` image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Resources of each model-server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Largest batch the server micro-batches concurrent requests into.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_batch_size: u32,
}

impl Default for ServingTemplate {
    fn default() -> Self {
        ServingTemplate {
            replicas: default_replicas(),
            image: None,
            resources: None,
            max_batch_size: default_max_batch(),
        }
    }
}

fn default_replicas() -> i32 {
    2
}

fn default_max_batch() -> u32 {
    64
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Strategy {
    /// Canary progression: the steps and how long the canary's pods may take to become available.
    #[serde(default)]
    pub canary: CanaryStrategy,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.steps) || self.steps.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted()").message("spec.strategy.canary.steps: setWeight values must strictly increase"),
    validation = Rule::new("!has(self.steps) || self.steps.filter(s, has(s.setWeight)).all(s, self.steps.filter(t, has(t.setWeight) && t.setWeight == s.setWeight).size() == 1)").message("spec.strategy.canary.steps: setWeight values must strictly increase")
)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStrategy {
    /// Ordered steps; empty means 1 → 5 → 20 → 100 with an analysis pass between steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub steps: Vec<CanaryStep>,
    /// How long the canary's pods may take to become available (default `10m`, counted from the start of the
    /// step). The weight only moves while every canary replica is available; past the deadline the canary is
    /// aborted, the reason naming its pods and their state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<Duration>,
}

impl CanaryStrategy {
    pub const DEFAULT_PROGRESS_DEADLINE: &str = "10m";

    pub fn progress_deadline(&self) -> Duration {
        self.progress_deadline
            .clone()
            .unwrap_or_else(|| Duration::from(Self::DEFAULT_PROGRESS_DEADLINE))
    }
}

/// One step, written as one key: `setWeight: 5` or `pause: {duration: 10m}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CanaryStep {
    /// Send this percentage of traffic to the canary.
    SetWeight(#[schemars(range(min = 0, max = 100))] u32),
    /// Hold; without a duration, until promoted by hand.
    Pause(Pause),
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Pause {
    /// How long to hold, e.g. `10m`; omit to hold until promoted with the `flywheel.dev/action: promote`
    /// annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Prometheus HTTP API base URL, e.g. `http://prometheus.monitoring:9090` or
    /// `https://mimir.example.com/prometheus`.
    #[schemars(pattern(r"^https?://[^\s]+$"), length(max = 2048))]
    pub prometheus: String,
    /// A Secret in the Rollout's namespace for a secured Prometheus: `ca.crt` (PEM) to trust its https
    /// certificate (without it, the public web PKI), and `token` (bearer) or `username` and `password` (basic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub prometheus_secret: Option<String>,
    /// The tenant of a multi-tenant store (Mimir, Cortex, Thanos Receive), sent as `X-Scope-OrgID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[!-~]+$"), length(max = 256))]
    pub tenant: Option<String>,
    /// Time between analysis rounds, e.g. `1m`. Default `1m`.
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// How long after a step starts before its first analysis round, e.g. `2m`. Default: no delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Duration>,
    /// Measurements per step before moving on.
    #[serde(default = "default_count")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: u32,
    /// Labeled samples a measurement needs; fewer makes it inconclusive, never failed.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 0))]
    pub min_samples: u64,
    /// Failed analysis rounds (a round fails when any metric fails) tolerated during one progression; one more
    /// aborts the canary and rolls it back. Default 1.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub failure_limit: u32,
    /// Inconclusive measurements tolerated before the rollout pauses.
    #[serde(default = "default_inconclusive_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub inconclusive_limit: u32,
    /// Failed queries (Prometheus unreachable, a bad query) tolerated in a row; one more triggers `onError`.
    #[serde(default = "default_consecutive_error_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub consecutive_error_limit: u32,
    /// What analysis errors beyond `consecutiveErrorLimit` do: `abort` (default: without evidence the canary
    /// is not trusted with traffic) or `pause` (the canary keeps its weight until a human decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnError>,
    /// The checks of each analysis round (1 to 16, names unique): each a built-in metric or a PromQL query,
    /// with the range it must fall in.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub metrics: Vec<AnalysisMetric>,
}

/// What persistent analysis errors do to the canary.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnError {
    /// Roll the canary back to weight 0 (`Degraded`).
    #[default]
    Abort,
    /// Hold the canary's weight and wait for a human.
    Pause,
}

fn default_interval() -> Duration {
    Duration::from("1m")
}

fn default_count() -> u32 {
    3
}

fn default_min_samples() -> u64 {
    1000
}

fn default_failure_limit() -> u32 {
    1
}

fn default_consecutive_error_limit() -> u32 {
    4
}

fn default_inconclusive_limit() -> u32 {
    3
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.builtin) != has(self.query)").message("set exactly one of builtin or query"),
    validation = Rule::new("has(self.min) || has(self.max)").message("set min, max or both")
)]
pub struct AnalysisMetric {
    /// Name of the check, unique in the list; measurements in status are recorded under it.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub name: String,
    /// A metric Flywheel queries from the serving metrics: `aucDrop`, `calibrationDeviation`, `latencyP99` or
    /// `errorRate`. Set exactly one of `builtin` or `query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinMetric>,
    /// PromQL returning one number; `{{canary}}`, `{{stable}}` and `{{namespace}}` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: Option<String>,
    /// The measurement passes when it is at least `min` …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// … and at most `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Analyses Flywheel knows how to query from the serving metrics.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BuiltinMetric {
    /// Online AUC of stable minus canary (positive = canary worse).
    AucDrop,
    /// |Σ predicted / Σ clicked − 1| of the canary.
    CalibrationDeviation,
    /// p99 latency of the canary in seconds.
    LatencyP99,
    /// Share of canary requests that failed.
    ErrorRate,
}

/// Exactly one of `router` (the built-in weighted, sticky router) or `gatewayApi` (an HTTPRoute's weights; not
/// driven yet, so a Rollout that sets it gets `InvalidSpec` naming `spec.traffic.gatewayApi`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.router) && has(self.gatewayApi))").message("set router or gatewayApi, not both"))]
pub struct TrafficRouting {
    /// Flywheel's built-in router: a Deployment behind the Service named after the Rollout that splits requests
    /// by the canary weight, keeping each caller on one version. The default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterTraffic>,
    /// Drive the backend weights of a Gateway API HTTPRoute instead. Not supported yet: setting it makes the
    /// spec invalid (`InvalidSpec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_api: Option<GatewayApiTraffic>,
}

impl Default for TrafficRouting {
    fn default() -> Self {
        TrafficRouting {
            router: Some(RouterTraffic::default()),
            gateway_api: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterTraffic {
    /// Header whose value pins a caller to one version while weights only grow.
    #[serde(default = "default_sticky_header")]
    #[schemars(pattern(HEADER_PATTERN), length(max = 128))]
    pub sticky_header: String,
    /// Router pods, 1 to 100. Default 2.
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
}

impl Default for RouterTraffic {
    fn default() -> Self {
        RouterTraffic {
            sticky_header: default_sticky_header(),
            replicas: default_router_replicas(),
        }
    }
}

fn default_sticky_header() -> String {
    "x-user-id".to_owned()
}

fn default_router_replicas() -> i32 {
    2
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiTraffic {
    /// HTTPRoute (same namespace) whose backend weights the Rollout drives.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub http_route: String,
}

impl RolloutSpec {
    /// The steps in force: the spec's, or the default 1 → 5 → 20 → 100.
    pub fn effective_steps(&self) -> Vec<CanaryStep> {
        if self.strategy.canary.steps.is_empty() {
            DEFAULT_CANARY_WEIGHTS
                .iter()
                .map(|w| CanaryStep::SetWeight(*w))
                .collect()
        } else {
            self.strategy.canary.steps.clone()
        }
    }

    /// The rules OpenAPI cannot express on a 1.20 server (each mirrors a CEL rule or a cross-field check).
    pub fn validate(&self) -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        let mut previous_weight: Option<u32> = None;
        for (index, step) in self.strategy.canary.steps.iter().enumerate() {
            let field = format!("spec.strategy.canary.steps[{index}]");
            match step {
                CanaryStep::SetWeight(weight) => {
                    if *weight > 100 {
                        violations.push(
                            format!("{field}.setWeight"),
                            format!("{weight} is above 100"),
                        );
                    }
                    if let Some(previous) = previous_weight
                        && *weight <= previous
                    {
                        violations.push(
                            format!("{field}.setWeight"),
                            format!("weights must strictly increase; {weight} follows {previous}"),
                        );
                    }
                    previous_weight = Some(*weight);
                }
                CanaryStep::Pause(pause) => {
                    if let Some(duration) = &pause.duration {
                        violations.check_duration(&format!("{field}.pause.duration"), duration);
                    }
                }
            }
        }
        if let Some(feedback) = &self.feedback
            && feedback.clicks_topic.is_none()
            && feedback.prediction_log_topic.is_none()
        {
            violations.push(
                "spec.feedback",
                "set clicksTopic, predictionLogTopic or both",
            );
        }
        if let Some(feedback) = &self.feedback
            && let Some(log) = &feedback.traffic_log
        {
            if feedback.prediction_log_topic.is_none() {
                violations.push(
                    "spec.feedback.trafficLog",
                    "needs predictionLogTopic (what it writes down)",
                );
            }
            if let Some(interval) = &log.flush_interval {
                violations.check_duration("spec.feedback.trafficLog.flushInterval", interval);
            }
        }
        if let Some(deadline) = &self.strategy.canary.progress_deadline {
            violations.check_duration("spec.strategy.canary.progressDeadline", deadline);
        }
        if let Some(analysis) = &self.analysis {
            violations.check_duration("spec.analysis.interval", &analysis.interval);
            if let Some(delay) = &analysis.initial_delay {
                violations.check_duration("spec.analysis.initialDelay", delay);
            }
            let mut names = std::collections::BTreeSet::new();
            for (index, metric) in analysis.metrics.iter().enumerate() {
                let field = format!("spec.analysis.metrics[{index}]");
                if !names.insert(metric.name.as_str()) {
                    violations.push(
                        format!("{field}.name"),
                        format!("duplicate metric name `{}`", metric.name),
                    );
                }
                if metric.builtin.is_some() == metric.query.is_some() {
                    violations.push(&field, "set exactly one of builtin or query");
                }
                if metric.min.is_none() && metric.max.is_none() {
                    violations.push(&field, "set min, max or both");
                }
            }
        }
        if self.traffic.router.is_some() && self.traffic.gateway_api.is_some() {
            violations.push("spec.traffic", "set router or gatewayApi, not both");
        }
        if self.traffic.gateway_api.is_some() {
            // Accepting a field the operator does not act on would report a Rollout that serves nothing as fine.
            violations.push(
                "spec.traffic.gatewayApi",
                "not supported yet: Flywheel routes traffic with its built-in router only",
            );
        }
        violations.into_result()
    }
}
