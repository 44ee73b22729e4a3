//! `ModelVersion`: one immutable entry of the model registry — an artifact with its lineage, offline metrics
//! and validation gates. Aliases (`production`, …) and promotion history live in its status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, SpecViolations, TimeRange};
use crate::featureview::STORAGE_URI_PATTERN;

/// Regex of a lowercase hex SHA-256 digest.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";

/// Finalizer that keeps a ModelVersion a Rollout serves from being deleted.
pub const IN_USE_FINALIZER: &str = "flywheel.dev/in-use";

/// Desired state of a ModelVersion: the model artifact, where it came from, its offline metrics, and the gates
/// that decide whether it may be rolled out. A TrainingJob creates one when it succeeds.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flywheel.dev",
    version = "v1alpha1",
    kind = "ModelVersion",
    namespaced,
    status = "ModelVersionStatus",
    shortname = "mv",
    category = "flywheel",
    derive = "PartialEq",
    doc = "One immutable model-registry entry: artifact, lineage, offline metrics and validation gates.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelName"),
    printcolumn(name = "AUC", type_ = "number", json_path = ".spec.metrics.auc"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Aliases",
        type_ = "string",
        json_path = ".status.aliasesSummary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelVersionSpec {
    /// Registry name of the model this is a version of.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub model_name: String,
    /// The model artifact. Immutable once created: a registry entry names one artifact forever.
    pub artifact: Artifact,
    /// SHA-256 of the feature schema the model was trained on; serving refuses inputs of another schema.
    #[schemars(pattern(SHA256_PATTERN))]
    pub feature_schema_hash: String,
    /// Where the model came from: training job, feature view, data range, seed, code version and parent version.
    /// Set by the TrainingJob that creates the version.
    #[serde(default)]
    pub lineage: Lineage,
    /// Offline metrics on the evaluation set.
    #[serde(default)]
    pub metrics: OfflineMetrics,
    /// Gates on `metrics` that make the version `Validated` or `Rejected`; only a Validated version can be
    /// rolled out. Without gates the version is validated against nothing, and its `Validated` condition says so.
    #[serde(default)]
    pub validation: Validation,
}

/// Immutable once created: a registry entry names one artifact forever.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec.artifact is immutable; create a new ModelVersion instead"))]
pub struct Artifact {
    /// Location of the model artifact (`file://`, `s3://`, `gs://` or `hdfs://`).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// SHA-256 of the artifact; a server refuses an artifact that does not match.
    #[schemars(pattern(SHA256_PATTERN))]
    pub sha256: String,
    /// Artifact format; `flywheel-v1` (what `flywheel-trainer` writes) is the only one. Default `flywheel-v1`.
    #[serde(default = "default_artifact_format")]
    pub format: ArtifactFormat,
}

fn default_artifact_format() -> ArtifactFormat {
    ArtifactFormat::FlywheelV1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ArtifactFormat {
    #[serde(rename = "flywheel-v1")]
    FlywheelV1,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// The TrainingJob (same namespace) that produced the artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_job: Option<String>,
    /// The FeatureView the training data's features came from (`namespace/name` when the training set recorded
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_view: Option<String>,
    /// Schema hash of that FeatureView's features when the training set was built: compare it with the view's
    /// `status.schemaHash` to see whether the features have changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SHA256_PATTERN))]
    pub feature_view_schema_hash: Option<String>,
    /// The Rollout (same namespace) whose served traffic was the training data: its logged predictions, with
    /// the features as they were scored, labeled by the clicks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_traffic: Option<String>,
    /// Event-time range of the training rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_range: Option<TimeRange>,
    /// Random seed the model was trained with (the TrainingJob's `spec.seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Trainer version (e.g. a git describe) that produced the artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub code_version: Option<String>,
    /// The version this one was warm-started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Validation {
    /// Every gate must pass for the version to become `Validated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub gates: Vec<Gate>,
}

impl Validation {
    pub fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }

    /// The gate rules OpenAPI cannot express on a 1.20 server, each violation named under `path`
    /// (`spec.validation`).
    pub fn check(&self, path: &str, violations: &mut SpecViolations) {
        for (index, gate) in self.gates.iter().enumerate() {
            let field = format!("{path}.gates[{index}]");
            let relative = gate.max_decrease.is_some() || gate.max_increase.is_some();
            if gate.min.is_none() && !relative && gate.max.is_none() {
                violations.push(&field, "a gate needs min, max, maxDecrease or maxIncrease");
            }
            if relative && gate.baseline.is_none() {
                violations.push(
                    format!("{field}.baseline"),
                    "maxDecrease and maxIncrease compare against a baseline; set baseline",
                );
            }
            if let (Some(min), Some(max)) = (gate.min, gate.max)
                && min > max
            {
                violations.push(
                    format!("{field}.min"),
                    format!("min {min} exceeds max {max}"),
                );
            }
            for (name, value) in [("min", gate.min), ("max", gate.max)] {
                if value.is_some_and(|v| !v.is_finite()) {
                    violations.push(format!("{field}.{name}"), "must be a finite number");
                }
            }
        }
    }
}

/// One gate: an absolute bound (`min`/`max`), or a change versus a baseline (`maxDecrease`/`maxIncrease`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.min) || has(self.max) || has(self.maxDecrease) || has(self.maxIncrease)").message("a gate needs min, max, maxDecrease or maxIncrease"),
    validation = Rule::new("!(has(self.maxDecrease) || has(self.maxIncrease)) || has(self.baseline)").message("maxDecrease and maxIncrease compare against a baseline; set baseline"),
    validation = Rule::new("!(has(self.min) && has(self.max)) || self.min <= self.max").message("min must not exceed max")
)]
pub struct Gate {
    /// The offline metric the gate checks: `auc`, `gauc`, `logLoss` or `calibration`. A version without that
    /// metric leaves the gate `Unknown`.
    pub metric: GateMetric,
    /// The metric must be at least this (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The metric must be at most this (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Version to compare against: another ModelVersion or the holder of an alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// Largest allowed drop versus the baseline (e.g. `0.002` AUC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_decrease: Option<f64>,
    /// Largest allowed rise versus the baseline (e.g. LogLoss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_increase: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GateMetric {
    Auc,
    Gauc,
    LogLoss,
    Calibration,
}

/// Exactly one of `modelVersion` or `alias`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Baseline {
    /// A ModelVersion name in the same namespace.
    ModelVersion(#[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))] String),
    /// An alias of the same model (e.g. `production`).
    Alias(#[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))] String),
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelVersionPhase {
    Pending,
    Validated,
    Rejected,
}

/// Observed state of a ModelVersion, written by the operator: the gates' verdict, the aliases it holds, and
/// which Rollouts serve it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVersionStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready`; `InvalidSpec` (True when the spec breaks a rule, the
    /// message naming each field); `Validated` (the gates' verdict: True passed, False failed, Unknown
    /// pending); `InUse` (True while a Rollout serves the version, which then cannot be deleted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `Pending` (a gate cannot be evaluated yet, e.g. its baseline is missing), `Validated` (every gate
    /// passed) or `Rejected` (a gate failed). The verdict is final for a generation; only Validated versions
    /// roll out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelVersionPhase>,
    /// The outcome of each gate in `spec.validation.gates`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gate_results: Vec<GateResult>,
    /// Aliases this version holds, derived from the Rollouts of its namespace: `production` while a Rollout
    /// serves it as stable, `canary` while it is a Rollout's live canary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Aliases joined by `,` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases_summary: Option<String>,
    /// When the version gained or lost each alias, oldest first (the last 20 changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotion_history: Vec<PromotionRecord>,
    /// Rollouts serving this version, each with the role the version has in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_by: Vec<ServedBy>,
    /// The artifact accepted at first reconcile; a later spec with another artifact is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_artifact: Option<AcceptedArtifact>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedArtifact {
    /// The accepted `spec.artifact.uri`.
    pub uri: String,
    /// The accepted `spec.artifact.sha256`.
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateResult {
    /// The metric the gate checked.
    pub metric: GateMetric,
    /// The version's value of the metric; absent when `spec.metrics` lacks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The bound applied, e.g. `>= 0.75` or `>= 0.781 (baseline 0.783 - 0.002)`.
    pub threshold: String,
    /// `Pass`, `Fail`, or `Unknown` when a bound could not be checked (the metric or the baseline is missing).
    pub verdict: GateVerdict,
    /// Why the gate could not be fully checked, e.g. a missing baseline or metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GateVerdict {
    Pass,
    Fail,
    Unknown,
}

/// A Rollout serving the version, and as what.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedBy {
    /// Name of the Rollout, in the version's namespace.
    pub rollout: String,
    /// `Stable` (takes the traffic the canary does not) or `Canary`.
    pub role: ServingRole,
}

/// The part a version plays in a Rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServingRole {
    Stable,
    Canary,
}

impl std::fmt::Display for ServedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.role {
            ServingRole::Stable => "stable",
            ServingRole::Canary => "canary",
        };
        write!(f, "{} ({role})", self.rollout)
    }
}

/// Reads an entry as written today, or as operators before 0.1 wrote it (`"<rollout> (stable)"`), so a status
/// written by an older operator still loads.
impl<'de> Deserialize<'de> for ServedBy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Typed { rollout: String, role: ServingRole },
            Text(String),
        }
        match Wire::deserialize(deserializer)? {
            Wire::Typed { rollout, role } => Ok(ServedBy { rollout, role }),
            Wire::Text(text) => {
                let (rollout, role) = text
                    .strip_suffix(" (stable)")
                    .map(|rollout| (rollout, ServingRole::Stable))
                    .or_else(|| {
                        text.strip_suffix(" (canary)")
                            .map(|rollout| (rollout, ServingRole::Canary))
                    })
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "servedBy entry `{text}` is neither {{rollout, role}} nor `<rollout> (stable|canary)`"
                        ))
                    })?;
                Ok(ServedBy {
                    rollout: rollout.to_owned(),
                    role,
                })
            }
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionRecord {
    /// The alias gained or lost: `production` or `canary`.
    pub alias: String,
    /// `Promoted` or `Demoted`.
    pub action: String,
    /// The Rollout that promoted the version; absent on a demotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// When the alias was gained or lost.
    pub time: Time,
}

impl ModelVersionSpec {
    /// The rules OpenAPI cannot express on a 1.20 server (each mirrors a CEL rule). `accepted` is the artifact
    /// recorded in status when the version was first accepted, for the immutability rule.
    pub fn validate(&self, accepted: Option<&AcceptedArtifact>) -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        violations.check_storage_uri("spec.artifact.uri", &self.artifact.uri);
        if let Some(accepted) = accepted
            && (accepted.uri != self.artifact.uri || accepted.sha256 != self.artifact.sha256)
        {
            violations.push(
                "spec.artifact",
                format!(
                    "spec.artifact is immutable (accepted {} sha256 {}); create a new ModelVersion instead",
                    accepted.uri, accepted.sha256
                ),
            );
        }
        self.validation.check("spec.validation", &mut violations);
        if let Some(range) = &self.lineage.data_range
            && range.end.0 <= range.start.0
        {
            violations.push("spec.lineage.dataRange.end", "must be after start");
        }
        violations.into_result()
    }
}

/// Offline evaluation metrics of a model, on its evaluation set (a TrainingJob reports them too).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OfflineMetrics {
    /// ROC AUC on the evaluation set, 0 to 1 (0.5 is random ranking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub auc: Option<f64>,
    /// Group AUC on the evaluation set: the AUC of each user, weighted by their impressions (users with only
    /// clicks or only non-clicks are skipped), 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub gauc: Option<f64>,
    /// Mean binary cross-entropy on the evaluation set; lower is better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub log_loss: Option<f64>,
    /// Σ predicted / Σ positive; 1.0 is perfectly calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub calibration: Option<f64>,
    /// The same ratio before the model's calibrator (absent when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub uncalibrated_calibration: Option<f64>,
    /// Rows of the evaluation set the metrics were computed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_by_reads_typed_and_legacy_entries_and_writes_typed() {
        let entries: Vec<ServedBy> = serde_json::from_value(serde_json::json!([
            {"rollout": "ctr", "role": "Canary"},
            "ctr-eu (stable)",
        ]))
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            entries,
            [
                ServedBy {
                    rollout: "ctr".into(),
                    role: ServingRole::Canary
                },
                ServedBy {
                    rollout: "ctr-eu".into(),
                    role: ServingRole::Stable
                },
            ]
        );
        assert_eq!(entries[1].to_string(), "ctr-eu (stable)");
        assert_eq!(
            serde_json::to_value(&entries[1]).unwrap_or_default(),
            serde_json::json!({"rollout": "ctr-eu", "role": "Stable"})
        );
        assert!(serde_json::from_value::<ServedBy>(serde_json::json!("ctr")).is_err());
    }
}
