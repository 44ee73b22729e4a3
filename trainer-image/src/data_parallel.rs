//! One rank of a synchronous data-parallel gang.

use std::time::Instant;

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{self};
use flywheel_ml::train::{Position, Trainer};
use serde_json::json;

use crate::cli::*;
use crate::dataset::read_encoded;
use crate::publish::*;
use crate::report::{emit, write_termination_message};
use crate::setup::*;
use crate::status::{Phase, ProgressReporter};
use crate::{collective, gang_auth};

/// One rank of a synchronous data-parallel gang: rank `r` of `W` trains on the `r`-th of `W` equal shares of
/// every global batch, and the gang reduces gradients each step through rank 0's collective, so the result
/// matches one process training with the same global batch. Rank 0 also checkpoints (every rank resumes
/// from its `checkpoint.fwc`), evaluates and writes the artifact.
pub fn data_parallel_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    let chief = args.data_parallel.as_deref().unwrap_or_default();
    if args.workers == 0 || args.rank >= args.workers {
        bail!(
            "--rank {} is outside 0..{} workers",
            args.rank,
            args.workers
        );
    }
    let started = Instant::now();
    let token = gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?;
    let prepared = prepare(args)?;
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join("checkpoint.fwc"));
    let (mut trainer, start, warm_start_digest) = initial_trainer(
        args,
        &prepared.schema.hash(),
        (&prepared.model, &prepared.config),
        prepared.train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let (rank, workers) = (args.rank as usize, args.workers as usize);
    let factor_dim = if prepared.model.uses_factors() {
        prepared.model.embedding_dim
    } else {
        0
    };
    let mut chief_side = None;
    let mut reducer = if rank == 0 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(args.listen))
            .with_context(|| format!("listening on {}", args.listen))?;
        emit(
            json!({"event": "listening", "rank": 0, "addr": listener.local_addr().map(|a| a.to_string()).unwrap_or_default()}),
        );
        let collective = std::sync::Arc::new(collective::Collective::new(
            args.workers,
            trainer.step,
            flywheel_ml::reduce::dense_len(&trainer.model),
            factor_dim,
            args.worker_timeout,
        ));
        let server = collective::spawn_server(&runtime, collective.clone(), listener, token);
        let reducer = collective::Reducer::Chief {
            handle: runtime.handle().clone(),
            collective: collective.clone(),
            step: trainer.step,
        };
        chief_side = Some((runtime, collective, server));
        reducer
    } else {
        collective::Reducer::Peer(Box::new(collective::Peer::connect(
            chief,
            args.rank,
            trainer.step,
            args.connect_timeout,
            args.worker_timeout * 2,
            token.as_ref(),
        )?))
    };
    let mut card = model_card(
        args,
        prepared.schema.clone(),
        prepared.model.clone(),
        prepared.config.clone(),
        (prepared.train.len(), 0),
        warm_start_digest,
    )?;
    emit(json!({
        "event": "loaded", "rank": rank, "trainRows": prepared.train.len(),
        "seconds": started.elapsed().as_secs_f64(),
    }));
    let training_started = Instant::now();
    // Every rank counts the whole global batch, so each reports the gang's throughput.
    let on_progress = |step: &flywheel_ml::train::Progress| {
        progress.record_step(
            step.epoch,
            step.step,
            step.total_steps,
            args.batch_size,
            step.loss,
        );
    };
    let save = checkpoint_path.as_ref().filter(|_| rank == 0).map(|path| {
        let card = &card;
        (
            args.checkpoint_every,
            move |trainer: &Trainer<B>, position: Position| -> anyhow::Result<()> {
                let bytes = trainer.checkpoint(card, position)?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "step": trainer.step, "path": path}));
                Ok(())
            },
        )
    });
    let train = &prepared.train;
    let validation = prepared.validation.as_ref();
    let convergence = trainer.fit_with(
        train,
        validation,
        start,
        on_progress,
        save,
        |trainer, batch| {
            let share = &batch[batch.len() * rank / workers..batch.len() * (rank + 1) / workers];
            Ok(trainer.train_step_reduced(&mut reducer, train, share)?)
        },
    )?;
    let train_seconds = training_started.elapsed().as_secs_f64();
    let samples = train.len() * convergence.epochs_trained.saturating_sub(start.epoch);
    let Some((runtime, collective, server)) = chief_side else {
        if let collective::Reducer::Peer(peer) = &mut reducer {
            peer.finish()?;
        }
        let result = json!({"event": "done", "rank": rank, "steps": trainer.step, "trainSeconds": train_seconds});
        emit(result.clone());
        write_termination_message(&args.termination_log, &result);
        return Ok(());
    };
    let missing = runtime.block_on(collective.wait_for_peers(args.worker_timeout));
    if !missing.is_empty() {
        emit(
            json!({"event": "warning", "message": format!("rank(s) {missing:?} did not report their end")}),
        );
    }
    server.abort();
    progress.phase(Phase::Evaluating);
    let eval = read_encoded(&args.eval, &prepared.schema, &prepared.columns)?;
    card.lineage.eval_rows = eval.len();
    finish_training(&mut card, &mut trainer, validation, convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(
        args,
        &card,
        &trainer,
        samples,
        train_seconds,
        json!({"workers": workers}),
    )
}
