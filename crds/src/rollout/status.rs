//! A Rollout's observed state, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    Progressing,
    Paused,
    Healthy,
    Degraded,
}

/// Observed state of a Rollout, written by the operator: the stable and canary versions, the canary's step and
/// weight, and the analysis so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready` (True while the stable version's every replica is
    /// available, i.e. the endpoint serves); `InvalidSpec` (True when the spec breaks a rule, the message naming
    /// each field); `Healthy` (True when no canary is in progress and the stable version takes all traffic;
    /// False while progressing, paused or aborted, with the reason); `TrafficLogged` (with
    /// `spec.feedback.trafficLog`: True while its sink runs, else False with what its pod is doing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `Progressing` (a canary is moving through its steps), `Paused` (waiting for a human: an untimed pause
    /// step, analysis inconclusive too often, or analysis errors with `onError: pause`), `Healthy` (the stable
    /// version takes all traffic) or `Degraded` (the canary was aborted and rolled back; annotate
    /// `flywheel.dev/action: retry` or change `spec.modelVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// Index (from 0) of the canary step in progress; equal to the number of steps once the canary was promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<u32>,
    /// `current/total` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_summary: Option<String>,
    /// Percentage of traffic (0 to 100) the router sends to the canary; the rest goes to the stable version.
    #[serde(default)]
    pub canary_weight: u32,
    /// The ModelVersion that takes the traffic the canary does not: the first version served, or the last one
    /// promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,
    /// The ModelVersion being rolled out; absent when no canary is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_version: Option<String>,
    /// When the current step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// Failed analysis rounds in this progression; above `spec.analysis.failureLimit` the canary is aborted.
    #[serde(default)]
    pub failed_measurements: u32,
    /// Inconclusive analysis rounds in this progression (reset by a manual promote); above
    /// `spec.analysis.inconclusiveLimit` the rollout pauses.
    #[serde(default)]
    pub inconclusive_measurements: u32,
    /// Every analysis measurement of the current progression, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measurements: Vec<Measurement>,
    /// Why the canary was aborted and rolled back (failed analysis, analysis errors, a firing alert, a missed
    /// progress deadline or a manual abort); cleared when a new progression starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
    /// Analysis rounds passed in the current step.
    #[serde(default)]
    pub step_analysis_runs: u32,
    /// Queries that failed in a row.
    #[serde(default)]
    pub consecutive_errors: u32,
    /// When the last analysis round ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis_at: Option<Time>,
    /// The last manual action handled (the `flywheel.dev/action` annotation's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
    /// Why the rollout is paused, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// What the current step waits for before the canary's weight moves (its pods becoming available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Name of the analysis metric (`spec.analysis.metrics[].name`).
    pub metric: String,
    /// Index (from 0) of the canary step it was taken in.
    pub step: u32,
    /// When it was taken.
    pub time: Time,
    /// The measured value; absent when the measurement is inconclusive or an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `Successful` (within min/max), `Failed` (outside them), `Inconclusive` (too few labeled samples, no data
    /// or not a finite number) or `Error` (the query failed).
    pub verdict: MeasurementVerdict,
    /// What was compared, or why the measurement is inconclusive or an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MeasurementVerdict {
    Successful,
    Failed,
    Inconclusive,
    Error,
}
