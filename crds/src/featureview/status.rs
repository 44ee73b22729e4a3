//! A FeatureView's observed state, written by the operator, and the report a materialization run leaves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a FeatureView, written by the operator: conditions, the schema hash, the last
/// materialization run, and the baseline statistics and drift.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureViewStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready`; `InvalidSpec` (True when the spec breaks a rule, the
    /// message naming each field); `Materialized` (whether the newest finished materialization Job succeeded);
    /// `Drifted` (True when a feature of the last run drifted from the baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Join keys joined by `,` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities_summary: Option<String>,
    /// Number of features in `spec.features` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_count: Option<i64>,
    /// SHA-256 of the feature schema (names, types, transforms); models record it to refuse skewed inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_hash: Option<String>,
    /// The newest successful materialization run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_materialization: Option<MaterializationRun>,
    /// Per-feature statistics of the baseline window, the reference for drift.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statistics: Vec<FeatureStatistics>,
    /// Drift of the latest data versus the baseline, per feature.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<FeatureDrift>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaterializationRun {
    /// When the run finished.
    pub time: Time,
    /// Source events in the run's window.
    pub rows: i64,
    /// Entities written to the online store.
    #[serde(default)]
    pub entities_written: i64,
    /// How long the run took, in seconds.
    pub duration_seconds: f64,
    /// Newest event time materialized (RFC 3339, µs): the next run reads events after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// The Job that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// What a materialization run reports in its container's termination message: the contract between
/// `flywheel-trainer materialize` and the FeatureView controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaterializationReport {
    pub rows: i64,
    pub entities_written: i64,
    /// Entities not written because their newest value is already older than the TTL.
    pub expired: i64,
    /// Offline partitions (re)written.
    pub partitions: Vec<String>,
    /// Newest event time materialized (RFC 3339, µs); absent when the source had nothing new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    pub duration_seconds: f64,
    pub schema_hash: String,
    /// Statistics of the drift baseline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statistics: Vec<FeatureStatistics>,
    /// Drift of this run's rows against the baseline (empty on the run that made the baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<FeatureDrift>,
    /// Whether this run's rows became the baseline.
    pub baseline_created: bool,
    /// Whether statistics or drift were cut to fit the termination message (4 KiB).
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureStatistics {
    /// Feature name.
    pub name: String,
    /// Rows in which the feature has a value (not null).
    pub count: i64,
    /// Share of rows, 0 to 1, in which the feature is null.
    pub missing_rate: f64,
    /// Mean of a numeric feature's values (booleans count as 0 and 1); absent for strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Population standard deviation of a numeric feature's values; absent for strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    /// Deciles p0, p10, …, p100 of numeric features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantiles: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureDrift {
    /// Feature name.
    pub name: String,
    /// Population Stability Index of the run's values against the baseline (over deciles for numbers, over
    /// category shares for strings); 0 means the same distribution.
    pub psi: f64,
    /// Two-sample Kolmogorov–Smirnov statistic against the baseline, 0 to 1; numeric features only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    /// True when `psi` is above `spec.drift.psiThreshold` (default 0.25) or `ks` above
    /// `spec.drift.ksThreshold` (default 0.2).
    pub drifted: bool,
}
