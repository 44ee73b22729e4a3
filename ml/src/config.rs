//! What a training run is asked for (`TrainConfig`) and what it reports (`Convergence`, `EvalMetrics`): the
//! types an artifact records, apart from the training loop that produces them.

use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationMethod;
use crate::embedding::SparseOptimizer;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainConfig {
    /// Passes over the training set; with `patience`, the most it trains.
    pub epochs: usize,
    pub batch_size: usize,
    /// Learning rate of the dense parameters (Adam).
    pub learning_rate: f64,
    /// Optimizer of the embedding rows.
    pub sparse_optimizer: SparseOptimizer,
    pub seed: u64,
    /// Standard deviation of the initial embedding rows.
    pub init_std: f32,
    /// Early stopping: epochs without a lower validation log loss before training stops and the best epoch's
    /// weights are kept. `None` trains every epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<usize>,
    /// The dense learning rate rises linearly from 0 over these first steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Both learning rates are multiplied by this after an epoch without a lower validation log loss.
    #[serde(default = "no_decay")]
    pub plateau_decay: f64,
    /// L2 penalty on the dense weights (Adam's weight decay).
    #[serde(default)]
    pub weight_decay: f64,
    /// How probabilities are calibrated on the validation set after training.
    #[serde(default)]
    pub calibration: CalibrationMethod,
}

fn no_decay() -> f64 {
    1.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 1024,
            learning_rate: 0.001,
            sparse_optimizer: SparseOptimizer::adagrad(0.05),
            seed: 0,
            init_std: 0.01,
            patience: None,
            warmup_steps: 0,
            plateau_decay: 1.0,
            weight_decay: 0.0,
            calibration: CalibrationMethod::None,
        }
    }
}

/// How training ended: the validation log loss after every epoch, the epoch whose weights were kept, and
/// whether early stopping ended it before `epochs`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Convergence {
    pub epochs_trained: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_log_loss: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_epoch: Option<usize>,
    pub stopped_early: bool,
}

/// Offline evaluation of a model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvalMetrics {
    pub auc: Option<f64>,
    pub gauc: Option<f64>,
    pub log_loss: Option<f64>,
    pub calibration: Option<f64>,
    /// Calibration of the model's own sigmoid, before its calibrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncalibrated_calibration: Option<f64>,
    pub samples: usize,
}
