//! The data commands: synthetic data, encoded model inputs, and batch scoring.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::backend::Flex;
use flywheel_ml::artifact::{self};
use flywheel_ml::synthetic::{SyntheticConfig, feature_schema, generate};
use serde_json::json;

use crate::dataset::{self, Columns, read_encoded, write_impressions};
use crate::report::emit;
use crate::setup::read_schema;

pub fn generate_command(
    rows: usize,
    seed: u64,
    users: u32,
    items: u32,
    buckets: u64,
    eval_fraction: f64,
    out: &Path,
) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&eval_fraction) || rows < 2 {
        bail!("--eval-fraction must be in [0, 1) and --rows at least 2");
    }
    let data = generate(&SyntheticConfig {
        seed,
        users,
        items,
        rows,
        ..SyntheticConfig::default()
    });
    let split = ((rows as f64) * (1.0 - eval_fraction)) as usize;
    write_impressions(&out.join("train.parquet"), &data.impressions[..split])?;
    write_impressions(&out.join("eval.parquet"), &data.impressions[split..])?;
    let schema_path = out.join("schema.json");
    std::fs::write(
        &schema_path,
        serde_json::to_vec_pretty(&feature_schema(buckets))?,
    )
    .with_context(|| format!("writing {}", schema_path.display()))?;
    let eval_probabilities: Vec<f64> = data.impressions[split..]
        .iter()
        .map(|i| i.true_probability)
        .collect();
    let eval_labels: Vec<bool> = data.impressions[split..]
        .iter()
        .map(|i| i.clicked)
        .collect();
    println!(
        "{}",
        json!({
            "event": "generated",
            "trainRows": split,
            "evalRows": rows - split,
            "clickRate": data.click_rate,
            "bayesAuc": data.bayes_auc,
            "evalBayesAuc": flywheel_ml::metrics::auc(&eval_probabilities, &eval_labels),
            "out": out,
        })
    );
    Ok(())
}

pub fn encode_command(
    data: &Path,
    schema_path: &Path,
    label: String,
    group: String,
    out: &Path,
) -> anyhow::Result<()> {
    let schema = read_schema(schema_path)?;
    let columns = Columns {
        label,
        group: Some(group),
    };
    let encoded = read_encoded(data, &schema, &columns)?;
    dataset::write_encoded(out, &encoded)?;
    emit(
        json!({"event": "encoded", "rows": encoded.len(), "fields": encoded.fields, "numeric": encoded.numeric_width, "out": out}),
    );
    Ok(())
}

pub fn score_command(model: &Path, data: &Path, label: String, out: &Path) -> anyhow::Result<()> {
    let digest_path = PathBuf::from(format!("{}.sha256", model.display()));
    let digest = std::fs::read_to_string(&digest_path)
        .with_context(|| format!("reading {}", digest_path.display()))?;
    let bytes = artifact::read_file(model, digest.split_whitespace().next())?;
    let saved = artifact::decode::<Flex>(&bytes, &Default::default())?;
    let columns = Columns { label, group: None };
    let encoded = read_encoded(data, &saved.card.schema, &columns)?;
    let scores = flywheel_ml::train::predict(
        &saved.model,
        &saved.tables,
        saved.card.calibrator.as_ref(),
        &encoded,
        &Default::default(),
    );
    std::fs::write(out, serde_json::to_vec(&scores)?)
        .with_context(|| format!("writing {}", out.display()))?;
    emit(json!({"event": "scored", "rows": scores.len(), "out": out}));
    Ok(())
}
