//! What every topology does around its training loop: load the data and schema, derive the model and training
//! configuration from the flags, start from a checkpoint, a warm-start artifact or a fresh model, and fill in
//! the model card.

use std::path::Path;

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{self, FORMAT, Lineage, ModelCard};
use flywheel_ml::embedding::SparseOptimizer;
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::schema::FeatureSchema;
use flywheel_ml::train::{
    Convergence, EncodedDataset, MIN_VALIDATION_ROWS, Position, TrainConfig, Trainer,
};
use serde_json::json;

use crate::cli::*;
use crate::dataset::{self, Columns, read_encoded};
use crate::report::emit;

/// The job's data, schema and configuration, as every distributed worker loads them.
pub struct Prepared {
    pub schema: FeatureSchema,
    pub columns: Columns,
    pub train: EncodedDataset,
    /// Held out of `train` for early stopping and calibration.
    pub validation: Option<EncodedDataset>,
    pub model: ModelConfig,
    pub config: TrainConfig,
}

pub fn read_schema(path: &Path) -> anyhow::Result<FeatureSchema> {
    let schema_text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let schema: FeatureSchema = serde_json::from_str(&schema_text)
        .with_context(|| format!("{}: not a feature schema", path.display()))?;
    schema
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(schema)
}

pub fn prepare(args: &TrainArgs) -> anyhow::Result<Prepared> {
    let schema = read_schema(&args.schema)?;
    let columns = Columns {
        label: args.label.clone(),
        group: Some(args.group.clone()),
    };
    let mut train = read_encoded(&args.train, &schema, &columns)?;
    let validation = train.split_validation(args.validation_fraction);
    if validation.is_none() && args.validation_fraction > 0.0 {
        emit(json!({
            "event": "warning",
            "message": format!(
                "no validation set: {} of {} training rows would hold fewer than {MIN_VALIDATION_ROWS} rows or a single class, so there is no early stopping and no calibration",
                args.validation_fraction, train.len()
            ),
        }));
    }
    let model = model_config(args, &schema);
    let config = train_config(args)?;
    Ok(Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    })
}

pub fn model_config(args: &TrainArgs, schema: &FeatureSchema) -> ModelConfig {
    ModelConfig {
        architecture: args.architecture,
        embedding_dim: args.embedding_dim,
        hidden_layers: if args.architecture == Architecture::Logistic {
            Vec::new()
        } else {
            args.hidden.clone()
        },
        fields: schema.categorical().len(),
        numeric: schema.numeric().len(),
    }
}

pub fn train_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    if !(0.0..=0.5).contains(&args.validation_fraction) {
        bail!("--validation-fraction must be in [0, 0.5]");
    }
    if !(args.plateau_decay > 0.0 && args.plateau_decay <= 1.0) {
        bail!("--plateau-decay must be in (0, 1]");
    }
    Ok(TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        sparse_optimizer: sparse_optimizer(&args.sparse_optimizer, args.sparse_learning_rate)?,
        seed: args.seed,
        patience: (args.patience > 0).then_some(args.patience),
        warmup_steps: args.warmup_steps,
        plateau_decay: args.plateau_decay,
        weight_decay: args.weight_decay,
        calibration: args.calibration,
        ..TrainConfig::default()
    })
}

pub fn sparse_optimizer(kind: &str, learning_rate: f32) -> anyhow::Result<SparseOptimizer> {
    Ok(match kind {
        "adagrad" => SparseOptimizer::adagrad(learning_rate),
        "adam" => SparseOptimizer::adam(learning_rate),
        "sgd" => SparseOptimizer::Sgd { learning_rate },
        other => bail!("--sparse-optimizer `{other}`: use adagrad, adam or sgd"),
    })
}

/// The trainer a run starts from: its checkpoint when one exists (a restarted gang continues), else the
/// warm-start artifact's weights, else a fresh seeded model; with the warm-start artifact's digest.
/// A fresh model starts at the training set's click rate (`positive_rate`).
pub fn initial_trainer<B: AutodiffBackend>(
    args: &TrainArgs,
    schema_hash: &str,
    (model, config): (&ModelConfig, &TrainConfig),
    positive_rate: f64,
    checkpoint_path: Option<&Path>,
    device: B::Device,
) -> anyhow::Result<(Trainer<B>, Position, Option<String>)> {
    if let Some(path) = checkpoint_path.filter(|path| path.exists()) {
        let (trainer, position) = resume(path, schema_hash, Some(args.rank), device)?;
        return Ok((trainer, position, None));
    }
    let Some(path) = &args.warm_start else {
        let mut trainer = Trainer::<B>::new(model.clone(), config.clone(), device);
        trainer.start_at_base_rate(positive_rate);
        return Ok((trainer, Position::default(), None));
    };
    let bytes = artifact::read_file(path, args.warm_start_sha256.as_deref())?;
    let saved = artifact::decode::<B>(&bytes, &device)
        .with_context(|| format!("warm start from {}", path.display()))?;
    if saved.card.feature_schema_hash != schema_hash {
        bail!(
            "{}: the warm-start model was trained on another feature schema",
            path.display()
        );
    }
    let digest = artifact::sha256_hex(&bytes);
    let trainer = Trainer::warm_start(saved, model, config.clone(), device)?;
    Ok((trainer, Position::default(), Some(digest)))
}

/// Restores a trainer from the checkpoint at `path`, refusing one trained on another feature schema, and
/// reports the resumption.
pub fn resume<B: AutodiffBackend>(
    path: &Path,
    schema_hash: &str,
    rank: Option<u32>,
    device: B::Device,
) -> anyhow::Result<(Trainer<B>, Position)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (trainer, position, card) = Trainer::<B>::resume(&bytes, device)
        .with_context(|| format!("resuming from {}", path.display()))?;
    if card.feature_schema_hash != schema_hash {
        bail!(
            "{}: the checkpoint was trained on another feature schema",
            path.display()
        );
    }
    emit(json!({
        "event": "resumed", "rank": rank, "checkpoint": path, "step": trainer.step,
        "epoch": position.epoch,
    }));
    Ok((trainer, position))
}

/// The model card of this job before training; metrics and step are filled in as training goes.
pub fn model_card(
    args: &TrainArgs,
    schema: FeatureSchema,
    model: ModelConfig,
    config: TrainConfig,
    rows: (usize, usize),
    warm_start: Option<String>,
) -> anyhow::Result<ModelCard> {
    let feature_view = dataset::feature_view_source(&args.train, &args.eval)?;
    Ok(ModelCard {
        format: FORMAT.to_owned(),
        model,
        feature_schema_hash: schema.hash(),
        schema,
        training: config,
        metrics: Default::default(),
        lineage: Lineage {
            data: vec![
                args.train.display().to_string(),
                args.eval.display().to_string(),
            ],
            train_rows: rows.0,
            eval_rows: rows.1,
            warm_start,
            feature_view,
        },
        code_version: format!("flywheel-trainer/{}", env!("CARGO_PKG_VERSION")),
        step: 0,
        calibrator: None,
        convergence: None,
    })
}

/// After the last epoch: calibrates on the validation set and records how training ended in the card.
pub fn finish_training<B: AutodiffBackend>(
    card: &mut ModelCard,
    trainer: &mut Trainer<B>,
    validation: Option<&EncodedDataset>,
    convergence: Convergence,
) {
    if let Some(validation) = validation {
        trainer.calibrate(card.training.calibration, validation);
    }
    emit(
        json!({"event": "converged", "convergence": convergence, "calibrator": trainer.calibrator}),
    );
    card.calibrator = trainer.calibrator.clone();
    card.convergence = Some(convergence);
    card.step = trainer.step;
}
