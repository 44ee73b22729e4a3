//! `training-set`: the step a TrainingJob on a FeatureView runs before its gang is admitted. Joins the view's
//! features, as of each labeled event (or each impression, labeled by sample joining its clicks and
//! conversions), onto the events of the train and eval ranges (`train.parquet`,
//! `eval.parquet`, lineage in their metadata) and writes the model's feature schema (`schema.json`): the
//! view's join keys and categorical features hashed into embedding buckets, its numbers standardized with the
//! training set's mean and deviation.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use arrow_array::{Array, Float64Array, Int64Array, RecordBatch};
use arrow_schema::DataType;
use flywheel_crds::featureview::{EntityValueType, FeatureValueType};
use flywheel_features::table::{parquet_files, read_batches};
use flywheel_features::{FeatureKind, View};
use flywheel_ml::schema::{FeatureSchema, FeatureSpec, ValueType};
use flywheel_ml::transform::Transform;
use serde_json::json;

use crate::featurestore::{BuildDatasetArgs, SampleJoin, ViewArgs, build_dataset, load_view};

/// The labels sample joining writes.
const SAMPLE_JOIN_LABELS: [&str; 2] = ["label_click", "label_convert"];

#[derive(clap::Args)]
pub struct TrainingSetArgs {
    #[command(flatten)]
    view: ViewArgs,
    /// Labeled events (a Parquet file or a directory of them): the view's join keys, the event time and the
    /// label; `file://` URIs or paths.
    #[arg(long)]
    events: String,
    /// The label column of the events (with `--clicks`: `label_click` or `label_convert`, which sample joining
    /// writes).
    #[arg(long)]
    label: String,
    /// Sample joining: the events are impressions, labeled by these clicks (`--request-id`, `--click-id`, the
    /// event time) within `--click-window`.
    #[arg(long)]
    clicks: Option<String>,
    /// Conversions (`--click-id`, the event time) within `--conversion-window` of a click: `label_convert`.
    #[arg(long, requires = "clicks")]
    conversions: Option<String>,
    #[arg(long, default_value = "30m")]
    click_window: String,
    #[arg(long, default_value = "7d")]
    conversion_window: String,
    #[arg(long, default_value = "request_id")]
    request_id: String,
    #[arg(long, default_value = "click_id")]
    click_id: String,
    #[arg(long, default_value = "event_timestamp")]
    event_time: String,
    /// The training range `START,END` (RFC 3339, END excluded).
    #[arg(long, value_parser = parse_range)]
    train_range: (String, String),
    /// The evaluation range `START,END`.
    #[arg(long, value_parser = parse_range)]
    eval_range: (String, String),
    /// Embedding rows of each hashed feature (join keys, strings, booleans, crosses).
    #[arg(long, default_value_t = 100_000)]
    buckets: u64,
    /// Where `train.parquet`, `eval.parquet` and `schema.json` are written.
    #[arg(long)]
    out_dir: PathBuf,
    /// Where the summary goes for the operator to read (the pod's termination message).
    #[arg(
        long,
        env = "FLYWHEEL_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    termination_log: PathBuf,
}

pub fn parse_range(text: &str) -> Result<(String, String), String> {
    match text.split_once(',') {
        Some((start, end)) if !start.is_empty() && !end.is_empty() => {
            Ok((start.to_owned(), end.to_owned()))
        }
        _ => Err(format!("`{text}`: give START,END")),
    }
}

pub fn build(args: &TrainingSetArgs) -> anyhow::Result<()> {
    report_step(&args.termination_log, build_sets(args))
}

/// A training-set step's outcome: its summary (or the error) as the termination message the operator reads,
/// and on stdout.
pub fn report_step(
    termination_log: &Path,
    result: anyhow::Result<serde_json::Value>,
) -> anyhow::Result<()> {
    let summary = match &result {
        Ok(summary) => summary.clone(),
        Err(err) => json!({"event": "failed", "error": format!("{err:#}")}),
    };
    if let Err(err) = std::fs::write(termination_log, summary.to_string()) {
        eprintln!(
            "flywheel-trainer: not writing the termination message to {}: {err}",
            termination_log.display()
        );
    }
    println!("{summary}");
    result.map(|_| ())
}

fn build_sets(args: &TrainingSetArgs) -> anyhow::Result<serde_json::Value> {
    let events = local_path(&args.events);
    let sample_join = match &args.clicks {
        Some(clicks) => {
            if !SAMPLE_JOIN_LABELS.contains(&args.label.as_str())
                || (args.label == "label_convert" && args.conversions.is_none())
            {
                bail!(
                    "sample joining labels `label_click`, or `label_convert` with conversions; not `{}` \
                     (spec.data.featureView.label)",
                    args.label
                );
            }
            Some(SampleJoin {
                clicks: local_path(clicks),
                conversions: args.conversions.as_deref().map(local_path),
                click_window: args.click_window.clone(),
                conversion_window: args.conversion_window.clone(),
                request_id: args.request_id.clone(),
                click_id: args.click_id.clone(),
            })
        }
        None => {
            check_label(&events, &args.label)?;
            None
        }
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let (train, eval) = (
        args.out_dir.join("train.parquet"),
        args.out_dir.join("eval.parquet"),
    );
    for (range, out) in [(&args.train_range, &train), (&args.eval_range, &eval)] {
        build_dataset(&BuildDatasetArgs::for_range(
            args.view.clone(),
            events.clone(),
            sample_join.clone(),
            &args.event_time,
            (&range.0, &range.1),
            out.clone(),
        ))?;
    }
    let manifest = load_view(&args.view)?;
    let view = View::of_manifest(&manifest, &args.event_time)?;
    let training_rows = read_all(&train)?;
    let schema = model_schema(&view, &training_rows, args.buckets)?;
    schema.validate().context("the derived feature schema")?;
    let schema_path = args.out_dir.join("schema.json");
    std::fs::write(&schema_path, serde_json::to_string_pretty(&schema)?)
        .with_context(|| format!("writing {}", schema_path.display()))?;
    let eval_rows: usize = read_batches(&eval)?.iter().map(RecordBatch::num_rows).sum();
    Ok(json!({
        "event": "trainingSet",
        "trainRows": training_rows.num_rows(),
        "evalRows": eval_rows,
        "features": schema.features.len(),
        "featureViewSchemaHash": manifest.spec.schema_hash(),
        "out": args.out_dir,
    }))
}

/// A `file://` URI (or a plain path) as a path on the training storage.
pub fn local_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

/// The events must carry the label: without it the sets would train on nothing.
fn check_label(events: &Path, label: &str) -> anyhow::Result<()> {
    let files = parquet_files(events)?;
    let Some(first) = files.first() else {
        bail!("{}: holds no Parquet files", events.display());
    };
    let batches = read_batches(first)?;
    let Some(batch) = batches.first() else {
        bail!("{}: holds no rows", first.display());
    };
    let schema = batch.schema();
    if schema.field_with_name(label).is_err() {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        bail!(
            "{}: no label column `{label}` (spec.data.featureView.label); it has {}",
            events.display(),
            columns.join(", ")
        );
    }
    Ok(())
}

fn read_all(path: &Path) -> anyhow::Result<RecordBatch> {
    let batches = read_batches(path)?;
    let Some(first) = batches.first() else {
        bail!("{}: holds no rows", path.display());
    };
    arrow_select::concat::concat_batches(&first.schema(), &batches)
        .with_context(|| format!("reading {}", path.display()))
}

/// The model reads every join key and every scalar feature of the view: identifiers, strings, booleans and
/// crosses as hashed categories, numbers standardized with the training set's statistics. List features are
/// not model inputs.
fn model_schema(view: &View, train: &RecordBatch, buckets: u64) -> anyhow::Result<FeatureSchema> {
    let hashed = |name: &str, value_type: ValueType| FeatureSpec {
        name: name.to_owned(),
        value_type,
        transform: Some(Transform::HashBucket { buckets }),
    };
    let mut features: Vec<FeatureSpec> = view
        .entities
        .iter()
        .map(|(key, value_type)| {
            hashed(
                key,
                match value_type {
                    EntityValueType::Int64 => ValueType::Int64,
                    EntityValueType::String => ValueType::String,
                },
            )
        })
        .collect();
    for feature in &view.features {
        let crossed = matches!(feature.kind, FeatureKind::Cross { .. });
        let spec = match feature.value_type {
            FeatureValueType::Int64 if crossed => hashed(&feature.name, ValueType::Int64),
            FeatureValueType::String => hashed(&feature.name, ValueType::String),
            FeatureValueType::Bool => hashed(&feature.name, ValueType::Bool),
            FeatureValueType::Int64 | FeatureValueType::Float64 => {
                let (mean, std) = moments(train, &feature.name)?;
                FeatureSpec {
                    name: feature.name.clone(),
                    value_type: if feature.value_type == FeatureValueType::Int64 {
                        ValueType::Int64
                    } else {
                        ValueType::Float64
                    },
                    transform: Some(Transform::Standardize { mean, std }),
                }
            }
            FeatureValueType::Int64List
            | FeatureValueType::Float64List
            | FeatureValueType::StringList => continue,
        };
        features.push(spec);
    }
    Ok(FeatureSchema { features })
}

/// Mean and standard deviation of a numeric column over its non-null values; a constant or empty column
/// gets deviation 1 so that standardizing stays finite.
fn moments(batch: &RecordBatch, name: &str) -> anyhow::Result<(f64, f64)> {
    let column = batch
        .column_by_name(name)
        .with_context(|| format!("the training set has no column `{name}`"))?;
    let values: Vec<f64> = match column.data_type() {
        DataType::Float64 => column
            .as_any()
            .downcast_ref::<Float64Array>()
            .map(|a| a.iter().flatten().collect())
            .unwrap_or_default(),
        DataType::Int64 => column
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.iter().flatten().map(|v| v as f64).collect())
            .unwrap_or_default(),
        other => bail!("feature `{name}` is {other}, not a number"),
    };
    let finite: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Ok((0.0, 1.0));
    }
    let count = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / count;
    let variance = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / count;
    let std = variance.sqrt();
    Ok((mean, if std > 0.0 { std } else { 1.0 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn moments_skip_nulls_and_keep_a_constant_column_finite() -> anyhow::Result<()> {
        let batch = RecordBatch::try_from_iter([
            (
                "price",
                Arc::new(Float64Array::from(vec![Some(1.0), None, Some(3.0)])) as _,
            ),
            (
                "count",
                Arc::new(Int64Array::from(vec![Some(4), Some(4), None])) as _,
            ),
        ])?;
        assert_eq!(moments(&batch, "price")?, (2.0, 1.0));
        assert_eq!(moments(&batch, "count")?, (4.0, 1.0));
        assert!(moments(&batch, "missing").is_err());
        Ok(())
    }

    #[test]
    fn ranges_need_a_start_and_an_end() {
        assert_eq!(
            parse_range("2026-11-01T00:00:00Z,2026-11-15T00:00:00Z"),
            Ok((
                "2026-11-01T00:00:00Z".to_owned(),
                "2026-11-15T00:00:00Z".to_owned()
            ))
        );
        assert!(parse_range("2026-11-01T00:00:00Z").is_err());
        assert!(parse_range(",2026-11-01T00:00:00Z").is_err());
    }
}
