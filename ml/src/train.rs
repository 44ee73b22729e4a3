//! Single-process training of a [`CtrModel`] with sparse embedding tables: batching, the forward/backward
//! step, sparse and dense updates, prediction and evaluation. The topologies (parameter server,
//! data-parallel) reuse these pieces.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::artifact::{ArtifactError, SavedModel};
use crate::calibration::{CalibrationMethod, Calibrator, sigmoid};
pub use crate::config::{Convergence, EvalMetrics, TrainConfig};
use crate::embedding::{EmbeddingTable, distinct_keys, sum_rows};
use crate::metrics;
use crate::model::{CtrModel, ModelConfig, bce_with_logits};
use crate::reduce::{self, GradientReducer, StepGradients};
pub use crate::tables::{RowStore, TableKind, Tables, row_key};

mod batch;
mod checkpoint;
mod early_stopping;
mod encoded;

pub use checkpoint::Position;
pub use encoded::EncodedDataset;

use batch::{batch_inputs, batch_keys, floats, scalar, spread_rows};
use early_stopping::{BestEpoch, Plateau};

pub use batch::epoch_order;

/// The smallest held-out set early stopping and calibration are fitted on.
pub const MIN_VALIDATION_ROWS: usize = 200;

impl TrainConfig {
    fn dense_optimizer<B: AutodiffBackend>(&self) -> OptimizerAdaptor<Adam, CtrModel<B>, B> {
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        AdamConfig::new().with_weight_decay(decay).init()
    }
}

/// Progress of training, reported after every step.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub epoch: usize,
    pub step: u64,
    pub total_steps: u64,
    pub samples_per_second: f64,
    pub loss: f64,
}

impl EvalMetrics {
    pub fn of(probabilities: &[f64], data: &EncodedDataset) -> Self {
        let labels: Vec<bool> = data.labels.iter().map(|&y| y > 0.5).collect();
        EvalMetrics {
            auc: metrics::auc(probabilities, &labels),
            gauc: metrics::gauc(probabilities, &labels, &data.groups),
            log_loss: metrics::log_loss(probabilities, &labels),
            calibration: metrics::calibration(probabilities, &labels),
            uncalibrated_calibration: None,
            samples: labels.len(),
        }
    }
}

pub struct Trainer<B: AutodiffBackend> {
    pub model: CtrModel<B>,
    pub tables: Tables,
    pub model_config: ModelConfig,
    pub config: TrainConfig,
    optimizer: OptimizerAdaptor<Adam, CtrModel<B>, B>,
    device: B::Device,
    pub step: u64,
    /// Fitted after training on the validation set; every prediction goes through it.
    pub calibrator: Option<Calibrator>,
    /// What early stopping remembers across epochs (checkpoints carry it).
    plateau: Plateau<B>,
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(model_config: ModelConfig, config: TrainConfig, device: B::Device) -> Self {
        let model = {
            // burn's backend RNG is process-global: seeding and drawing the initial weights under one lock keeps
            // a trainer's initialization independent of any other trainer in the process.
            // burn initializes parameters lazily, on first read: read them all here, under the lock.
            let _guard = INIT_LOCK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            B::seed(&device, config.seed);
            let model = model_config.init::<B>(&device);
            crate::model::dense_parameters(&model);
            model
        };
        let tables = Tables {
            first_order: EmbeddingTable::new(1, 0.0, config.seed, config.sparse_optimizer),
            factors: model_config.uses_factors().then(|| {
                EmbeddingTable::new(
                    model_config.embedding_dim,
                    config.init_std,
                    config.seed ^ 1,
                    config.sparse_optimizer,
                )
            }),
        };
        Trainer {
            model,
            tables,
            model_config,
            optimizer: config.dense_optimizer(),
            device,
            config,
            step: 0,
            calibrator: None,
            plateau: Plateau::default(),
        }
    }

    /// Starts the linear term at the log-odds of `positive_rate` (numeric weights 0), so a fresh model predicts
    /// the base rate: on rare clicks (1%) it starts calibrated instead of spending its first epochs getting there.
    pub fn start_at_base_rate(&mut self, positive_rate: f64) {
        let rate = positive_rate.clamp(1e-6, 1.0 - 1e-6);
        let log_odds = (rate / (1.0 - rate)).ln() as f32;
        self.model = self.model.clone().with_linear_start(log_odds);
    }

    /// A trainer that continues from an earlier model's weights (incremental training) with a fresh optimizer.
    /// The earlier model must be the model `requested` describes (architecture, widths, fields).
    pub fn warm_start(
        saved: SavedModel<B>,
        requested: &ModelConfig,
        config: TrainConfig,
        device: B::Device,
    ) -> Result<Self, WarmStartError> {
        if saved.card.model != *requested {
            return Err(WarmStartError::Incompatible(format!(
                "the artifact's model is {:?}, this job's is {requested:?}",
                saved.card.model
            )));
        }
        let tables = Tables {
            first_order: saved
                .tables
                .first_order
                .with_optimizer(config.sparse_optimizer),
            factors: saved
                .tables
                .factors
                .as_ref()
                .map(|t| t.with_optimizer(config.sparse_optimizer)),
        };
        Ok(Trainer {
            model: saved.model,
            tables,
            model_config: requested.clone(),
            optimizer: config.dense_optimizer(),
            device,
            config,
            step: 0,
            calibrator: None,
            plateau: Plateau::default(),
        })
    }

    /// Trains `epochs` passes over `data` in a seeded shuffled order, reporting progress after each step.
    pub fn fit(
        &mut self,
        data: &EncodedDataset,
        on_progress: impl FnMut(&Progress),
    ) -> Convergence {
        let no_checkpoints = None::<(u64, fn(&Self, Position) -> Result<(), ArtifactError>)>;
        // Without a checkpoint callback nothing can fail.
        self.fit_from(data, None, Position::default(), on_progress, no_checkpoints)
            .unwrap_or_default()
    }

    /// Like [`Trainer::fit`] from `start` (a checkpoint's position), calling `checkpoint.1` every `checkpoint.0`
    /// steps with the position to resume from; a failing checkpoint stops training. A shuffled epoch order
    /// depends only on `(seed, epoch)`, so a resumed run visits exactly the batches the uninterrupted run would.
    /// With `validation`, training stops early as `patience` says (see [`Trainer::fit_with`]).
    pub fn fit_from(
        &mut self,
        data: &EncodedDataset,
        validation: Option<&EncodedDataset>,
        start: Position,
        on_progress: impl FnMut(&Progress),
        checkpoint: Option<(
            u64,
            impl FnMut(&Self, Position) -> Result<(), ArtifactError>,
        )>,
    ) -> Result<Convergence, ArtifactError> {
        self.fit_with(
            data,
            validation,
            start,
            on_progress,
            checkpoint,
            |trainer, batch| Ok(trainer.train_step(data, batch)),
        )
    }

    /// The loop of [`Trainer::fit_from`] with the step given: `step(trainer, batch)` trains on one global
    /// batch (e.g. this worker's share of it, reduced with its peers) and returns the loss; an error stops
    /// training. After each epoch the model is scored on `validation` (when given and `patience` is set): an
    /// epoch with a lower log loss is remembered as the best, one without lowers the learning rates by
    /// `plateau_decay`, and `patience` of those in a row end training with the best epoch's weights. The
    /// decision depends only on the weights, so data-parallel replicas take it together.
    pub fn fit_with<E>(
        &mut self,
        data: &EncodedDataset,
        validation: Option<&EncodedDataset>,
        start: Position,
        mut on_progress: impl FnMut(&Progress),
        mut checkpoint: Option<(u64, impl FnMut(&Self, Position) -> Result<(), E>)>,
        mut step: impl FnMut(&mut Self, &[usize]) -> Result<f64, E>,
    ) -> Result<Convergence, E> {
        let batch_size = self.config.batch_size.max(1);
        let steps_per_epoch = data.len().div_ceil(batch_size) as u64;
        let total_steps = steps_per_epoch * self.config.epochs as u64;
        let validation = validation
            .filter(|_| self.config.patience.is_some())
            .map(|data| (data, labels_of(data)));
        let mut trained = start.epoch;
        let mut stopped_early = false;
        for epoch in start.epoch..self.config.epochs {
            let order = epoch_order(data.len(), self.config.seed, epoch);
            let skip = if epoch == start.epoch { start.batch } else { 0 };
            for (index, batch) in order.chunks(batch_size).enumerate().skip(skip) {
                let started = Instant::now();
                let loss = step(self, batch)?;
                let seconds = started.elapsed().as_secs_f64().max(1e-9);
                on_progress(&Progress {
                    epoch,
                    step: self.step,
                    total_steps,
                    samples_per_second: batch.len() as f64 / seconds,
                    loss,
                });
                if let Some((every, save)) = checkpoint.as_mut()
                    && self.step.is_multiple_of((*every).max(1))
                {
                    save(
                        self,
                        Position {
                            epoch,
                            batch: index + 1,
                        },
                    )?;
                }
            }
            trained = epoch + 1;
            // A checkpoint taken after an epoch's last batch resumes into that epoch: score it only once.
            if let Some((validation, labels)) = &validation
                && self.plateau.validation_log_loss.len() == epoch
                && self.after_epoch(validation, labels, epoch)
            {
                stopped_early = trained < self.config.epochs;
                break;
            }
        }
        let mut convergence = Convergence {
            epochs_trained: trained,
            validation_log_loss: self.plateau.validation_log_loss.clone(),
            best_epoch: None,
            stopped_early,
        };
        if let Some(best) = self.plateau.best.take() {
            convergence.best_epoch = Some(best.epoch);
            if best.epoch + 1 != trained {
                self.model = best.model;
                self.tables = best.tables;
            }
        }
        Ok(convergence)
    }

    /// The dense learning rate of the next step: warm-up, then the configured rate, scaled by plateaus.
    fn dense_learning_rate(&self) -> f64 {
        let warmup = if self.config.warmup_steps > 0 {
            ((self.step + 1) as f64 / self.config.warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        self.config.learning_rate * self.plateau.learning_rate_scale * warmup
    }

    /// Fits `method` on `validation` (examples the model did not train on) and uses it for every later
    /// prediction; returns whether a calibrator was fitted.
    pub fn calibrate(&mut self, method: CalibrationMethod, validation: &EncodedDataset) -> bool {
        let logits = self.predict_logits(validation);
        let labels: Vec<bool> = validation.labels.iter().map(|&y| y > 0.5).collect();
        self.calibrator = Calibrator::fit(method, &logits, &labels);
        self.calibrator.is_some()
    }

    /// One step over the examples `batch` of `data` with this process's tables; returns the batch loss.
    pub fn train_step(&mut self, data: &EncodedDataset, batch: &[usize]) -> f64 {
        let learning_rate = self.dense_learning_rate();
        let result = step_on(
            &mut self.model,
            &mut self.optimizer,
            &self.device,
            learning_rate,
            &self.model_config,
            &mut self.tables,
            data,
            batch,
        );
        self.step += 1;
        match result {
            Ok(loss) => loss,
            Err(never) => match never {},
        }
    }

    /// One step whose embedding rows live in `store` (e.g. parameter-server shards) instead of this process.
    pub fn train_step_with<S: RowStore>(
        &mut self,
        store: &mut S,
        data: &EncodedDataset,
        batch: &[usize],
    ) -> Result<f64, S::Error> {
        let learning_rate = self.dense_learning_rate();
        let loss = step_on(
            &mut self.model,
            &mut self.optimizer,
            &self.device,
            learning_rate,
            &self.model_config,
            store,
            data,
            batch,
        )?;
        self.step += 1;
        Ok(loss)
    }

    /// One synchronous data-parallel step: this worker's share `batch` of the global batch is differentiated
    /// here, `reducer` turns the gradients into the whole batch's, and the update is applied to this replica
    /// (every worker applies the same one). An empty share still takes part in the reduction.
    pub fn train_step_reduced<R: GradientReducer>(
        &mut self,
        reducer: &mut R,
        data: &EncodedDataset,
        batch: &[usize],
    ) -> Result<f64, R::Error> {
        let (loss, mut gradients) = if batch.is_empty() {
            let gradients = StepGradients {
                dense: vec![0.0; reduce::dense_len(&self.model)],
                ..StepGradients::default()
            };
            (0.0, gradients)
        } else {
            let backward = match forward_backward(
                &self.model,
                &self.device,
                &self.model_config,
                &mut self.tables,
                data,
                batch,
            ) {
                Ok(backward) => backward,
                Err(never) => match never {},
            };
            let gradients = StepGradients {
                examples: batch.len(),
                dense: reduce::flatten_dense(&self.model, &backward.dense),
                keys: backward.keys,
                first_order: backward.first_order,
                factors: backward.factors.unwrap_or_default(),
            };
            (backward.loss, gradients)
        };
        reducer.reduce(&mut gradients)?;
        let dense = reduce::unflatten_dense(&self.model, &gradients.dense, &self.device);
        self.model = self
            .optimizer
            .step(self.dense_learning_rate(), self.model.clone(), dense);
        self.tables
            .first_order
            .apply_gradients(&gradients.keys, &gradients.first_order);
        if let Some(table) = self.tables.factors.as_mut() {
            table.apply_gradients(&gradients.keys, &gradients.factors);
        }
        self.step += 1;
        Ok(loss)
    }

    /// Click probabilities for every example of `data` (calibrated once a calibrator is fitted), without
    /// touching the tables.
    pub fn predict(&self, data: &EncodedDataset) -> Vec<f64> {
        predict(
            &self.model.valid(),
            &self.tables,
            self.calibrator.as_ref(),
            data,
            &self.device,
        )
    }

    /// The model's raw logits for every example of `data`.
    pub fn predict_logits(&self, data: &EncodedDataset) -> Vec<f64> {
        predict_logits(&self.model.valid(), &self.tables, data, &self.device)
    }

    /// Metrics of the calibrated predictions, with the calibration of the uncalibrated ones beside them.
    pub fn evaluate(&self, data: &EncodedDataset) -> EvalMetrics {
        let logits = self.predict_logits(data);
        let raw: Vec<f64> = logits.iter().map(|&z| sigmoid(z)).collect();
        let Some(calibrator) = &self.calibrator else {
            return EvalMetrics::of(&raw, data);
        };
        let labels: Vec<bool> = data.labels.iter().map(|&y| y > 0.5).collect();
        let mut metrics = EvalMetrics::of(&probabilities(logits, Some(calibrator)), data);
        metrics.uncalibrated_calibration = metrics::calibration(&raw, &labels);
        metrics
    }
}

fn labels_of(data: &EncodedDataset) -> Vec<bool> {
    data.labels.iter().map(|&y| y > 0.5).collect()
}

/// Probabilities of `logits`: through `calibrator`, else the sigmoid.
pub fn probabilities(logits: Vec<f64>, calibrator: Option<&Calibrator>) -> Vec<f64> {
    match calibrator {
        Some(calibrator) => logits
            .into_iter()
            .map(|z| calibrator.probability(z))
            .collect(),
        None => logits.into_iter().map(sigmoid).collect(),
    }
}

/// Click probabilities of a model for every example of `data`, through its calibrator (the artifact's): the
/// one scoring function of evaluation, `score` and serving.
pub fn predict<B: Backend>(
    model: &CtrModel<B>,
    tables: &Tables,
    calibrator: Option<&Calibrator>,
    data: &EncodedDataset,
    device: &B::Device,
) -> Vec<f64> {
    probabilities(predict_logits(model, tables, data, device), calibrator)
}

/// Logits of a model for every example of `data` (inference only; untouched rows read as their initial
/// values).
pub fn predict_logits<B: Backend>(
    model: &CtrModel<B>,
    tables: &Tables,
    data: &EncodedDataset,
    device: &B::Device,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(data.len());
    let indices: Vec<usize> = (0..data.len()).collect();
    for batch in indices.chunks(4096) {
        let keys = batch_keys(data, batch);
        let mut first = Vec::with_capacity(keys.len());
        tables.first_order.read_into(&keys, &mut first);
        let first =
            Tensor::<B, 2>::from_data(TensorData::new(first, [batch.len(), data.fields]), device);
        let factors = tables.factors.as_ref().map(|table| {
            let mut rows = Vec::with_capacity(keys.len() * table.dim());
            table.read_into(&keys, &mut rows);
            Tensor::<B, 3>::from_data(
                TensorData::new(rows, [batch.len(), data.fields, table.dim()]),
                device,
            )
        });
        let (numeric, _) = batch_inputs::<B>(data, batch, device);
        let logits = floats(model.forward(first, factors, numeric).into_data());
        out.extend(logits.into_iter().map(f64::from));
    }
    out
}

/// A batch's loss and gradients, before any update.
struct Backward<B: AutodiffBackend> {
    loss: f64,
    /// The batch's distinct embedding rows; the gradients below are summed per row.
    keys: Vec<u64>,
    first_order: Vec<f32>,
    factors: Option<Vec<f32>>,
    dense: GradientsParams,
    _backend: std::marker::PhantomData<B>,
}

/// Forward and backward pass over `batch`, with embedding rows from `store`.
fn forward_backward<B: AutodiffBackend, S: RowStore>(
    model: &CtrModel<B>,
    device: &B::Device,
    model_config: &ModelConfig,
    store: &mut S,
    data: &EncodedDataset,
    batch: &[usize],
) -> Result<Backward<B>, S::Error> {
    let fields = data.fields;
    // Each distinct row is fetched, and later updated, once; positions copy it into the batch.
    let (keys, positions) = distinct_keys(&batch_keys(data, batch));
    let mut first = Vec::with_capacity(keys.len());
    store.gather(TableKind::FirstOrder, &keys, &mut first)?;
    let first = Tensor::<B, 2>::from_data(
        TensorData::new(spread_rows(&first, 1, &positions), [batch.len(), fields]),
        device,
    )
    .require_grad();
    let factors = if model_config.uses_factors() {
        let dim = model_config.embedding_dim;
        let mut rows = Vec::with_capacity(keys.len() * dim);
        store.gather(TableKind::Factors, &keys, &mut rows)?;
        Some(
            Tensor::<B, 3>::from_data(
                TensorData::new(
                    spread_rows(&rows, dim, &positions),
                    [batch.len(), fields, dim],
                ),
                device,
            )
            .require_grad(),
        )
    } else {
        None
    };
    let (numeric, labels) = batch_inputs::<B>(data, batch, device);
    let logits = model.forward(first.clone(), factors.clone(), numeric);
    let loss = bce_with_logits(logits, labels);
    let loss_value = scalar(loss.clone().inner().into_data());
    let mut grads = loss.backward();
    let first_order = first
        .grad(&grads)
        .map(|g| sum_rows(&floats(g.into_data()), 1, &positions, keys.len()))
        .unwrap_or_default();
    let factors = factors.as_ref().and_then(|f| f.grad(&grads)).map(|g| {
        let dim = model_config.embedding_dim;
        sum_rows(&floats(g.into_data()), dim, &positions, keys.len())
    });
    let dense = GradientsParams::from_module(&mut grads, model);
    Ok(Backward {
        loss: loss_value,
        keys,
        first_order,
        factors,
        dense,
        _backend: std::marker::PhantomData,
    })
}

/// The forward/backward step shared by local and parameter-server training.
#[allow(clippy::too_many_arguments)]
fn step_on<B: AutodiffBackend, S: RowStore>(
    model: &mut CtrModel<B>,
    optimizer: &mut OptimizerAdaptor<Adam, CtrModel<B>, B>,
    device: &B::Device,
    learning_rate: f64,
    model_config: &ModelConfig,
    store: &mut S,
    data: &EncodedDataset,
    batch: &[usize],
) -> Result<f64, S::Error> {
    let backward = forward_backward(model, device, model_config, store, data, batch)?;
    *model = optimizer.step(learning_rate, model.clone(), backward.dense);
    store.apply(TableKind::FirstOrder, &backward.keys, &backward.first_order)?;
    if let Some(grad) = backward.factors {
        store.apply(TableKind::Factors, &backward.keys, &grad)?;
    }
    Ok(backward.loss)
}

static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum WarmStartError {
    #[error("cannot warm-start: {0}")]
    Incompatible(String),
}
