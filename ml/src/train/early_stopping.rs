//! Early stopping: each epoch is scored on the validation set; the best epoch's weights are kept, a plateau
//! decays the learning rates, and `patience` plateaus in a row end training.

use burn::tensor::backend::AutodiffBackend;

use super::{EncodedDataset, Trainer};
use crate::calibration::sigmoid;
use crate::metrics;
use crate::model::CtrModel;
use crate::tables::Tables;

/// Early stopping's memory across epochs: every epoch's validation loss, the best epoch with its weights,
/// how many epochs in a row failed to beat it, and the learning-rate factor those epochs left.
pub(super) struct Plateau<B: AutodiffBackend> {
    pub(super) validation_log_loss: Vec<f64>,
    pub(super) best: Option<BestEpoch<B>>,
    pub(super) stale: usize,
    pub(super) learning_rate_scale: f64,
}

impl<B: AutodiffBackend> Default for Plateau<B> {
    fn default() -> Self {
        Plateau {
            validation_log_loss: Vec::new(),
            best: None,
            stale: 0,
            learning_rate_scale: 1.0,
        }
    }
}

pub(super) struct BestEpoch<B: AutodiffBackend> {
    pub(super) epoch: usize,
    pub(super) loss: f64,
    pub(super) model: CtrModel<B>,
    pub(super) tables: Tables,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Scores the epoch just trained on the validation set: a lower log loss (by more than a relative 1e-4,
    /// below which a gain is noise) becomes the best epoch; otherwise the learning rates decay, and after
    /// `patience` such epochs in a row training stops (true).
    pub(super) fn after_epoch(
        &mut self,
        validation: &EncodedDataset,
        labels: &[bool],
        epoch: usize,
    ) -> bool {
        let raw: Vec<f64> = self
            .predict_logits(validation)
            .into_iter()
            .map(sigmoid)
            .collect();
        let loss = metrics::log_loss(&raw, labels).unwrap_or(f64::INFINITY);
        self.plateau.validation_log_loss.push(loss);
        let improved = self
            .plateau
            .best
            .as_ref()
            .is_none_or(|best| loss < best.loss * (1.0 - 1e-4));
        if improved {
            self.plateau.best = Some(BestEpoch {
                epoch,
                loss,
                model: self.model.clone(),
                tables: self.tables.clone(),
            });
            self.plateau.stale = 0;
            return false;
        }
        self.plateau.stale += 1;
        self.decay_learning_rates();
        self.plateau.stale >= self.config.patience.unwrap_or(1).max(1)
    }

    fn decay_learning_rates(&mut self) {
        let factor = self.config.plateau_decay;
        self.plateau.learning_rate_scale *= factor;
        self.tables.first_order.scale_learning_rate(factor as f32);
        if let Some(table) = self.tables.factors.as_mut() {
            table.scale_learning_rate(factor as f32);
        }
    }
}
