//! A TrainingJob's hyperparameter search (`spec.tuning`) and its trials table (`status.tuning`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Random search over training settings. Trial 0 trains with the job's own settings; every trial trains from
/// scratch to convergence and is judged by its validation log loss (the held-out share of the training set, never
/// the evaluation set, so the reported metrics stay unbiased). The best trial's model becomes the ModelVersion.
/// Trials run one after another in the job's single training pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tuning {
    /// Trials, the job's own settings first.
    #[schemars(range(min = 1, max = 32))]
    pub trials: u32,
    /// What the trials vary; a setting left out keeps the job's value.
    #[serde(default)]
    pub space: TuningSpace,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TuningSpace {
    /// Dense (Adam) learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<TuningRange>,
    /// Embedding (sparse optimizer) learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_learning_rate: Option<TuningRange>,
    /// Decoupled weight decay of the dense weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<TuningRange>,
    /// Embedding sizes to choose from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 1, max = 1024)))]
    pub embedding_dim: Vec<u32>,
    /// Hidden layer widths to choose from, e.g. `[[64], [256, 128]]` (ignored by `logistic`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hidden_layers: Vec<Vec<u32>>,
}

/// A range to draw from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TuningRange {
    /// Lowest value (above 0 on a log scale).
    pub min: f64,
    /// Highest value.
    pub max: f64,
    /// `log` (the default: uniform in the logarithm, for rates spanning decades) or `linear`.
    #[serde(default)]
    pub scale: TuningScale,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TuningScale {
    #[default]
    Log,
    Linear,
}

impl TuningRange {
    /// Why the range cannot be drawn from, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if !(self.min.is_finite() && self.max.is_finite()) || self.min < 0.0 {
            Some("min and max must be non-negative numbers")
        } else if self.min > self.max {
            Some("min must not exceed max")
        } else if self.scale == TuningScale::Log && self.min <= 0.0 {
            Some("a log scale needs min above 0")
        } else {
            None
        }
    }
}

/// The search's outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TuningStatus {
    /// The trial whose model the job registered.
    #[schemars(range(min = 0, max = 32))]
    pub best_trial: u32,
    /// Every trial, in the order it ran (values to four significant digits; the full table is `trials.json`
    /// beside the model).
    #[schemars(length(max = 32))]
    pub trials: Vec<TrialStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrialStatus {
    /// The trial's number; 0 is the job's own settings.
    #[schemars(range(min = 0, max = 32))]
    pub trial: u32,
    /// Dense learning rate.
    pub learning_rate: f64,
    /// Embedding learning rate.
    pub sparse_learning_rate: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Embedding size.
    #[schemars(range(min = 1, max = 1024))]
    pub embedding_dim: u32,
    /// Hidden layer widths.
    #[schemars(length(max = 16))]
    pub hidden_layers: Vec<u32>,
    /// The trial's lowest validation log loss: what picks the best.
    pub validation_log_loss: f64,
    /// Epochs it trained before early stopping.
    #[schemars(range(min = 0, max = 1000))]
    pub epochs: u32,
}
