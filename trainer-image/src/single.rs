//! Training in one process.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{self};
use flywheel_ml::train::{Position, Trainer};
use serde_json::json;

use crate::cli::*;
use crate::dataset::read_encoded;
use crate::publish::*;
use crate::report::emit;
use crate::setup::*;
use crate::status::{Phase, ProgressReporter};
use crate::tuning::{Best, CardOf, SearchRecord, SearchSpace, TrialParams, compact, search};
use flywheel_ml::model::ModelConfig;
use flywheel_ml::train::{EncodedDataset, TrainConfig};

pub fn train_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepare(args)?;
    let eval = read_encoded(&args.eval, &schema, &columns)?;
    emit(json!({
        "event": "loaded", "trainRows": train.len(), "evalRows": eval.len(),
        "validationRows": validation.as_ref().map_or(0, |v| v.len()),
        "seconds": started.elapsed().as_secs_f64(),
    }));
    if args.tune_trials > 0 {
        let Some(validation) = validation else {
            anyhow::bail!(
                "tuning needs a validation slice of the training set (--validation-fraction above 0, \
                 and enough rows of both classes)"
            );
        };
        return train_tuned::<B>(
            args,
            progress,
            device,
            (schema, train, validation, eval),
            (model, config),
        );
    }
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join("checkpoint.fwc"));
    let (mut trainer, start, warm_start_digest) = initial_trainer(
        args,
        &schema.hash(),
        (&model, &config),
        train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let mut card = model_card(
        args,
        schema,
        model,
        config,
        (train.len(), eval.len()),
        warm_start_digest,
    )?;
    card.step = trainer.step;
    let training_started = Instant::now();
    let on_progress = |step: &flywheel_ml::train::Progress| {
        progress.record_step(
            step.epoch,
            step.step,
            step.total_steps,
            args.batch_size,
            step.loss,
        );
    };
    let save = checkpoint_path.as_ref().map(|path| {
        let card = &card;
        (
            args.checkpoint_every,
            move |trainer: &Trainer<B>, position: Position| {
                let bytes = trainer.checkpoint(card, position)?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "step": trainer.step, "path": path}));
                Ok(())
            },
        )
    });
    let convergence = trainer.fit_from(&train, validation.as_ref(), start, on_progress, save)?;
    let train_seconds = training_started.elapsed().as_secs_f64();
    progress.phase(Phase::Evaluating);
    let samples = train.len() * convergence.epochs_trained.saturating_sub(start.epoch);
    finish_training(&mut card, &mut trainer, validation.as_ref(), convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(args, &card, &trainer, samples, train_seconds, json!({}))
}

/// `--tune-trials`: the search picks the model (each trial trained from scratch; with a checkpoint directory a
/// restarted job goes on from its next trial), which is then calibrated, evaluated and published with the
/// trials table.
fn train_tuned<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
    (schema, train, validation, eval): (
        flywheel_ml::schema::FeatureSchema,
        EncodedDataset,
        EncodedDataset,
        EncodedDataset,
    ),
    (model, config): (ModelConfig, TrainConfig),
) -> anyhow::Result<()> {
    if args.warm_start.is_some() {
        anyhow::bail!("--tune-trials trains every trial from scratch; it cannot warm-start");
    }
    let space = SearchSpace::parse(args.tune_space.as_deref().unwrap_or("{}"))?;
    let base = TrialParams {
        learning_rate: args.learning_rate,
        sparse_learning_rate: f64::from(args.sparse_learning_rate),
        weight_decay: args.weight_decay,
        embedding_dim: args.embedding_dim,
        hidden_layers: model.hidden_layers.clone(),
    };
    let record = args.checkpoint_dir.as_deref().map(|dir| {
        SearchRecord::new(
            dir,
            &space,
            &base,
            config.seed,
            (train.len(), validation.len()),
        )
    });
    let card_of = |model: &ModelConfig, config: &TrainConfig| {
        model_card(
            args,
            schema.clone(),
            model.clone(),
            config.clone(),
            (train.len(), eval.len()),
            None,
        )
    };
    let training_started = Instant::now();
    let Best {
        mut trainer,
        model,
        config,
        convergence,
        trials,
        best,
    } = search::<B>(
        (&space, args.tune_trials, &args.sparse_optimizer),
        &base,
        (&model, &config),
        (&train, &validation),
        &device,
        record
            .as_ref()
            .map(|record| (record, &card_of as CardOf<'_>)),
    )?;
    let train_seconds = training_started.elapsed().as_secs_f64();
    progress.phase(Phase::Evaluating);
    let samples: usize = trials.iter().map(|t| t.epochs * train.len()).sum();
    let mut card = model_card(args, schema, model, config, (train.len(), eval.len()), None)?;
    finish_training(&mut card, &mut trainer, Some(&validation), convergence);
    card.metrics = trainer.evaluate(&eval);
    std::fs::create_dir_all(&args.output)?;
    let table = args.output.join("trials.json");
    std::fs::write(&table, serde_json::to_vec_pretty(&trials)?)
        .map_err(|err| anyhow::anyhow!("writing {}: {err}", table.display()))?;
    publish(
        args,
        &card,
        &trainer,
        samples,
        train_seconds,
        json!({"tuning": {"best": best, "trials": compact(&trials)}}),
    )
}
