//! The parameter-server topology: a shard's server, and a worker training against the shards.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::backend::Flex;
use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{self};
use flywheel_ml::model::Architecture;
use flywheel_ml::train::{Convergence, Position, TrainConfig};
use serde_json::json;

use crate::cli::*;
use crate::publish::*;
use crate::report::emit;
use crate::setup::*;
use crate::status::{Phase, ProgressReporter};
use crate::{gang_auth, ps, worker};

pub fn ps_command(args: &PsArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let config = ps::ShardConfig {
        shard: args.shard,
        workers: args.workers,
        embedding_dim: args.embedding_dim,
        factors: args.architecture != Architecture::Logistic,
        optimizer: sparse_optimizer(&args.sparse_optimizer, args.sparse_learning_rate)?,
        init_std: TrainConfig::default().init_std,
        seed: args.seed,
        worker_timeout: args.worker_timeout,
        checkpoint_dir: args.checkpoint_dir.clone(),
        token: gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?,
    };
    let warm_start = args
        .warm_start
        .as_ref()
        .map(|path| shard_warm_start(args, &config, path))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let shard = args.shard;
    runtime.block_on(ps::serve(config, warm_start, args.listen, |addr| {
        emit(json!({"event": "listening", "shard": shard, "addr": addr.to_string()}));
    }))?;
    emit(json!({"event": "done", "shard": shard}));
    Ok(())
}

/// This shard's share of the warm-start artifact at `path`: the rows that hash to it, with fresh optimizer state.
pub fn shard_warm_start(
    args: &PsArgs,
    config: &ps::ShardConfig,
    path: &Path,
) -> anyhow::Result<flywheel_ml::train::Tables> {
    let shards = match args.shards {
        Some(shards) if args.shard < shards => shards as usize,
        _ => bail!(
            "--warm-start needs --shards (FLYWHEEL_SHARDS) above --shard {}: the job's shard count decides which rows are this shard's",
            args.shard
        ),
    };
    let bytes = artifact::read_file(path, args.warm_start_sha256.as_deref())?;
    let saved = artifact::decode::<Flex>(&bytes, &Default::default())
        .with_context(|| format!("warm start from {}", path.display()))?;
    let factors_dim = saved.tables.factors.as_ref().map(|t| t.dim());
    let expected = config.factors.then_some(config.embedding_dim);
    if factors_dim != expected {
        bail!(
            "{}: cannot warm-start this shard: the artifact's factor tables are {factors_dim:?}-dimensional, the job's {expected:?}",
            path.display()
        );
    }
    let mine = |id: u64| flywheel_ml::embedding::shard_of(id, shards) == args.shard as usize;
    let tables = flywheel_ml::train::Tables {
        first_order: saved
            .tables
            .first_order
            .rows_with_optimizer(config.optimizer, mine),
        factors: saved
            .tables
            .factors
            .as_ref()
            .map(|t| t.rows_with_optimizer(config.optimizer, mine)),
    };
    emit(json!({
        "event": "warmStart", "shard": args.shard, "artifact": path,
        "rows": tables.first_order.len(),
    }));
    Ok(tables)
}

/// Trains this worker's share of the data against the parameter-server shards; the chief (rank 0) then waits
/// for the other workers, assembles the model from the shards, evaluates it and writes the artifact.
pub fn ps_worker_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    if args.workers == 0 || args.rank >= args.workers {
        bail!(
            "--rank {} is outside 0..{} workers",
            args.rank,
            args.workers
        );
    }
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepare(args)?;
    let token = gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?;
    let mut store = worker::RemoteStore::connect(
        &args.ps,
        args.rank,
        args.embedding_dim,
        args.connect_timeout,
        token.as_ref(),
    )?;
    let schema_hash = schema.hash();
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join(format!("ps-worker-{}.fwc", args.rank)));
    // A warm start's dense weights start every worker; its rows are the shards'.
    let (mut trainer, start, warm_start_digest) = initial_trainer::<B>(
        args,
        &schema_hash,
        (&model, &config),
        train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let checkpoint_card = model_card(
        args,
        schema.clone(),
        model.clone(),
        config.clone(),
        (train.len(), 0),
        warm_start_digest.clone(),
    )?;
    let (rank, workers) = (args.rank as usize, args.workers as usize);
    // This worker's steps: every epoch it trains the rows `i mod W == R` (R, R + W, ...) in batches.
    let rows_per_epoch = train.len().saturating_sub(rank).div_ceil(workers);
    let total_steps =
        rows_per_epoch.div_ceil(config.batch_size.max(1)) as u64 * config.epochs as u64;
    let started = Instant::now();
    let mut samples = 0usize;
    for epoch in start.epoch..config.epochs {
        let mine: Vec<usize> = flywheel_ml::train::epoch_order(train.len(), config.seed, epoch)
            .into_iter()
            .filter(|i| i % workers == rank)
            .collect();
        let skip = if epoch == start.epoch { start.batch } else { 0 };
        for (index, batch) in mine.chunks(config.batch_size.max(1)).enumerate().skip(skip) {
            let loss = trainer.train_step_with(&mut store, &train, batch)?;
            samples += batch.len();
            if let Some(path) = &checkpoint_path
                && trainer.step.is_multiple_of(args.checkpoint_every.max(1))
            {
                // The chief has the shards save their rows with its own state.
                if rank == 0 {
                    store.checkpoint(trainer.step)?;
                }
                let bytes = trainer.checkpoint(
                    &checkpoint_card,
                    Position {
                        epoch,
                        batch: index + 1,
                    },
                )?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "rank": rank, "step": trainer.step}));
            }
            if trainer.step.is_multiple_of(args.sync_every.max(1)) {
                let global =
                    store.sync_dense(flywheel_ml::model::dense_parameters(&trainer.model))?;
                trainer.model = flywheel_ml::model::with_dense_parameters(trainer.model, &global)?;
            }
            progress.record_step(epoch, trainer.step, total_steps, batch.len(), loss);
        }
    }
    store.sync_dense(flywheel_ml::model::dense_parameters(&trainer.model))?;
    let train_seconds = started.elapsed().as_secs_f64();
    if rank != 0 {
        store.done()?;
        emit(
            json!({"event": "done", "rank": rank, "steps": trainer.step, "trainSeconds": train_seconds}),
        );
        return Ok(());
    }
    store.wait_for_workers(args.workers - 1)?;
    progress.phase(Phase::Evaluating);
    let global = store.sync_dense(Vec::new())?;
    trainer.model = flywheel_ml::model::with_dense_parameters(trainer.model, &global)?;
    let epochs_trained = config.epochs;
    let prepared = Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    };
    let convergence = Convergence {
        epochs_trained,
        ..Convergence::default()
    };
    finish_as_chief(
        args,
        prepared,
        &mut store,
        trainer,
        (samples, train_seconds),
        (warm_start_digest, convergence),
    )
}
