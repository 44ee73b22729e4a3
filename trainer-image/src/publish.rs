//! The chief's last act: assemble the model, evaluate it, write the artifact and report the result.

use burn::tensor::backend::AutodiffBackend;
use flywheel_ml::artifact::{self, ModelCard};
use flywheel_ml::train::{Convergence, Trainer};
use serde_json::json;

use crate::cli::*;
use crate::dataset::read_encoded;
use crate::report::*;
use crate::setup::*;
use crate::worker;

/// The chief's last act once every other worker is done: assemble the embedding rows from the shards, evaluate,
/// write the artifact and the termination message, and release the shards.
pub fn finish_as_chief<B: AutodiffBackend>(
    args: &TrainArgs,
    prepared: Prepared,
    store: &mut worker::RemoteStore,
    mut trainer: Trainer<B>,
    (samples, train_seconds): (usize, f64),
    (warm_start_digest, convergence): (Option<String>, Convergence),
) -> anyhow::Result<()> {
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepared;
    store.export(
        flywheel_ml::train::TableKind::FirstOrder,
        &mut trainer.tables.first_order,
    )?;
    if let Some(factors) = trainer.tables.factors.as_mut() {
        store.export(flywheel_ml::train::TableKind::Factors, factors)?;
    }
    let eval = read_encoded(&args.eval, &schema, &columns)?;
    let mut card = model_card(
        args,
        schema,
        model,
        config,
        (train.len(), eval.len()),
        warm_start_digest,
    )?;
    finish_training(&mut card, &mut trainer, validation.as_ref(), convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(args, &card, &trainer, samples, train_seconds, json!({}))?;
    store.done()?;
    Ok(())
}

/// Writes the chief's artifact and reports the result: a JSON line on stdout and the termination message the
/// operator reads. `extra` fields (e.g. the gang size) join the standard ones.
pub fn publish<B: AutodiffBackend>(
    args: &TrainArgs,
    card: &ModelCard,
    trainer: &Trainer<B>,
    samples: usize,
    train_seconds: f64,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let bytes = artifact::encode(card, &trainer.model, &trainer.tables, false)?;
    let artifact_path = args.output.join("model.fwm");
    let sha256 = artifact::write_file(&artifact_path, &bytes)?;
    let mut result = json!({
        "event": "done",
        "rank": 0,
        "artifact": artifact_path,
        "sha256": sha256,
        "featureSchemaHash": card.feature_schema_hash,
        "metrics": card.metrics,
        "convergence": card.convergence,
        "steps": trainer.step,
        "trainSeconds": train_seconds,
        "samplesPerSecond": samples as f64 / train_seconds.max(1e-9),
    });
    if let (Some(result), serde_json::Value::Object(extra)) = (result.as_object_mut(), extra) {
        result.extend(extra);
    }
    if let (Some(result), Some(view)) = (result.as_object_mut(), &card.lineage.feature_view) {
        result.insert("featureView".into(), json!(view));
    }
    emit(result.clone());
    write_termination_message(&args.termination_log, &result);
    Ok(())
}
