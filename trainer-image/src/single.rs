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

pub(crate) fn train_command<B: AutodiffBackend>(
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
