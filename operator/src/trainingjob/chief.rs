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
    /// The search's trials, when the job tuned.
    #[serde(default)]
    pub tuning: Option<ChiefTuning>,
}

/// The trials as the trainer's termination message carries them (compact: a message holds 4 KiB).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChiefTuning {
    pub best: u32,
    pub trials: Vec<CompactTrial>,
}

/// `[trial, learningRate, sparseLearningRate, weightDecay, embeddingDim, hiddenLayers, validationLogLoss, epochs]`.
pub type CompactTrial = (u32, f64, f64, f64, u32, Vec<u32>, f64, u32);

impl ChiefTuning {
    pub fn status(&self) -> flywheel_crds::tuning::TuningStatus {
        flywheel_crds::tuning::TuningStatus {
            best_trial: self.best,
            trials: self
                .trials
                .iter()
                .map(
                    |(trial, learning_rate, sparse, decay, dim, hidden, loss, epochs)| {
                        flywheel_crds::tuning::TrialStatus {
                            trial: *trial,
                            learning_rate: *learning_rate,
                            sparse_learning_rate: *sparse,
                            weight_decay: *decay,
                            embedding_dim: *dim,
                            hidden_layers: hidden.clone(),
                            validation_log_loss: *loss,
                            epochs: *epochs,
                        }
                    },
                )
                .collect(),
        }
    }
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
