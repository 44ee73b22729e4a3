//! The chief's result as its termination message carries it (the trainer's `publish`).

use serde::Deserialize;

/// What the chief writes to its termination message when it finishes (trainer's `publish`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChiefResult {
    pub artifact: String,
    pub sha256: String,
    pub feature_schema_hash: String,
    #[serde(default)]
    pub metrics: ChiefMetrics,
    /// How training ended (absent from trainers before early stopping).
    #[serde(default)]
    pub convergence: Option<ChiefConvergence>,
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub samples_per_second: Option<f64>,
    /// The FeatureView the training set was built from, when `build-dataset` recorded it in the set.
    #[serde(default)]
    pub feature_view: Option<ChiefFeatureView>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChiefFeatureView {
    /// `namespace/name`.
    pub name: String,
    pub schema_hash: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChiefConvergence {
    pub epochs_trained: u32,
    #[serde(default)]
    pub best_epoch: Option<u32>,
    #[serde(default)]
    pub stopped_early: bool,
    #[serde(default)]
    pub validation_log_loss: Vec<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChiefMetrics {
    pub auc: Option<f64>,
    pub gauc: Option<f64>,
    pub log_loss: Option<f64>,
    pub calibration: Option<f64>,
    #[serde(default)]
    pub uncalibrated_calibration: Option<f64>,
    #[serde(default)]
    pub samples: u64,
}

/// Parses the chief's termination message: the last line that is a JSON object with the result.
pub fn chief_result(message: &str) -> Result<ChiefResult, String> {
    message
        .lines()
        .rev()
        .filter(|line| line.trim_start().starts_with('{'))
        .find_map(|line| serde_json::from_str::<ChiefResult>(line).ok())
        .ok_or_else(|| {
            let last = message.lines().last().unwrap_or("(empty)");
            format!("the chief finished without a result: {last}")
        })
}
