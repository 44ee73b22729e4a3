//! `traffic-training-set`: the training-set step of a TrainingJob on served traffic. Every prediction a Rollout
//! served (the parts `log-traffic` wrote) is one row, with the features exactly as they were scored and the
//! label `clicked`: whether a click on its request id arrived within the click window. A prediction whose window
//! has not closed by the end of the log is left out rather than counted as a negative. The model's feature
//! schema is the served model's own, so the next version reads what this one read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, new_null_array,
};
use arrow_schema::DataType;
use flywheel_crds::common::parse_duration;
use flywheel_features::table::{self, parquet_files, read_batches};
use flywheel_ml::artifact;
use flywheel_ml::schema::{FeatureSchema, ValueType};
use serde_json::json;

use crate::traffic_log::{
    CLICKED, CLICKS_DIR, EVENT_TIME, PREDICTIONS_DIR, REQUEST_ID, SERVED_SCORE, SERVED_VERSION,
};
use crate::training_set::{local_path, parse_range, report_step};

/// Parquet metadata key naming the traffic log a set was built from (lineage).
pub const TRAFFIC_KEY: &str = "flywheel.traffic";

#[derive(clap::Args)]
pub struct TrafficSetArgs {
    /// The traffic log: the directory `log-traffic` writes (`file://` URI or path).
    #[arg(long)]
    traffic: String,
    /// The served model's artifact: its feature schema becomes the new model's.
    #[arg(long)]
    model: String,
    /// Expected SHA-256 of the artifact.
    #[arg(long)]
    model_sha256: Option<String>,
    /// The training range `START,END` (RFC 3339, END excluded) of prediction times.
    #[arg(long, value_parser = parse_range)]
    train_range: (String, String),
    /// The evaluation range `START,END`.
    #[arg(long, value_parser = parse_range)]
    eval_range: (String, String),
    /// A click counts when it arrives within this long of its prediction.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    click_window: Duration,
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

pub fn build(args: &TrafficSetArgs) -> anyhow::Result<()> {
    report_step(&args.termination_log, build_sets(args))
}

fn micros(text: &str) -> anyhow::Result<i64> {
    let time: jiff::Timestamp = text
        .parse()
        .with_context(|| format!("`{text}`: not an RFC 3339 time"))?;
    Ok(time.as_microsecond())
}

fn build_sets(args: &TrafficSetArgs) -> anyhow::Result<serde_json::Value> {
    let traffic = local_path(&args.traffic);
    let model_path = local_path(&args.model);
    let bytes = artifact::read_file(&model_path, args.model_sha256.as_deref())?;
    let schema = artifact::card(&bytes)
        .with_context(|| format!("{}: the served model", model_path.display()))?
        .schema;
    let predictions = Predictions::read(&traffic.join(PREDICTIONS_DIR), &schema)?;
    let clicks = read_clicks(&traffic.join(CLICKS_DIR))?;
    let log_end = predictions
        .times
        .iter()
        .chain(clicks.values().flatten())
        .copied()
        .max()
        .unwrap_or(i64::MIN);
    let window = i64::try_from(args.click_window.as_micros()).unwrap_or(i64::MAX);
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut counts = Vec::new();
    for (range, name) in [(&args.train_range, "train"), (&args.eval_range, "eval")] {
        let range = (micros(&range.0)?, micros(&range.1)?);
        let rows = predictions.select(range, window, log_end);
        let labels: Vec<bool> = rows
            .chosen
            .iter()
            .map(|&row| {
                clicks.get(&predictions.ids[row]).is_some_and(|times| {
                    times
                        .iter()
                        .any(|&click| click <= predictions.times[row].saturating_add(window))
                })
            })
            .collect();
        if rows.chosen.is_empty() {
            bail!(
                "{}: no prediction in the {name} range {} – {} whose click window closed",
                traffic.display(),
                range_text(range.0),
                range_text(range.1)
            );
        }
        let out = args.out_dir.join(format!("{name}.parquet"));
        let metadata = HashMap::from([(TRAFFIC_KEY.to_owned(), args.traffic.clone())]);
        table::write_parquet_with_metadata(
            &out,
            predictions.columns(&rows.chosen, labels.clone()),
            metadata,
        )?;
        counts.push(json!({
            "rows": rows.chosen.len(),
            "clicked": labels.iter().filter(|&&l| l).count(),
            "duplicates": rows.duplicates,
            "pending": rows.pending,
        }));
    }
    let schema_path = args.out_dir.join("schema.json");
    std::fs::write(&schema_path, serde_json::to_string_pretty(&schema)?)
        .with_context(|| format!("writing {}", schema_path.display()))?;
    Ok(json!({
        "event": "trainingSet",
        "trainRows": counts[0]["rows"],
        "evalRows": counts[1]["rows"],
        "features": schema.features.len(),
        "train": counts[0],
        "eval": counts[1],
        "out": args.out_dir,
    }))
}

fn range_text(time: i64) -> String {
    jiff::Timestamp::from_microsecond(time).map_or_else(|_| time.to_string(), |t| t.to_string())
}

/// Click times (of `clicked: true` events) by request id.
fn read_clicks(dir: &Path) -> anyhow::Result<HashMap<String, Vec<i64>>> {
    let mut clicks: HashMap<String, Vec<i64>> = HashMap::new();
    if !dir.exists() {
        return Ok(clicks);
    }
    for file in parquet_files(dir)? {
        for batch in read_batches(&file)? {
            let ids = request_ids(&batch, &file)?;
            let times = table::timestamps(&batch, &file, EVENT_TIME)?;
            let clicked = batch
                .column_by_name(CLICKED)
                .and_then(|c| c.as_boolean_opt())
                .with_context(|| format!("{}: no boolean column `{CLICKED}`", file.display()))?;
            for (row, id) in ids.into_iter().enumerate() {
                if clicked.is_valid(row) && clicked.value(row) {
                    clicks.entry(id).or_default().push(times[row]);
                }
            }
        }
    }
    Ok(clicks)
}

fn request_ids(batch: &RecordBatch, file: &Path) -> anyhow::Result<Vec<String>> {
    let ids = batch
        .column_by_name(REQUEST_ID)
        .and_then(|c| c.as_string_opt::<i32>())
        .with_context(|| format!("{}: no text column `{REQUEST_ID}`", file.display()))?;
    Ok(ids
        .iter()
        .map(|id| id.unwrap_or_default().to_owned())
        .collect())
}

/// Every logged prediction, its features typed by the schema.
struct Predictions {
    ids: Vec<String>,
    times: Vec<i64>,
    versions: Vec<Option<String>>,
    scores: Vec<Option<f64>>,
    /// One column per input feature of the schema, in schema order.
    features: Vec<(String, ArrayRef)>,
}

/// The rows a range keeps.
struct Selected {
    chosen: Vec<usize>,
    duplicates: usize,
    pending: usize,
}

impl Predictions {
    fn read(dir: &Path, schema: &FeatureSchema) -> anyhow::Result<Predictions> {
        let files = parquet_files(dir)
            .with_context(|| format!("{}: the traffic log's predictions", dir.display()))?;
        if files.is_empty() {
            bail!("{}: no prediction was logged yet", dir.display());
        }
        let inputs: Vec<(&str, ValueType)> = schema.inputs().collect();
        let mut predictions = Predictions {
            ids: Vec::new(),
            times: Vec::new(),
            versions: Vec::new(),
            scores: Vec::new(),
            features: Vec::new(),
        };
        let mut parts: Vec<Vec<ArrayRef>> = vec![Vec::new(); inputs.len()];
        for file in files {
            for batch in read_batches(&file)? {
                predictions.ids.extend(request_ids(&batch, &file)?);
                predictions
                    .times
                    .extend(table::timestamps(&batch, &file, EVENT_TIME)?);
                let versions = batch
                    .column_by_name(SERVED_VERSION)
                    .and_then(|c| c.as_string_opt::<i32>());
                predictions
                    .versions
                    .extend((0..batch.num_rows()).map(|row| {
                        versions
                            .filter(|v| v.is_valid(row))
                            .map(|v| v.value(row).to_owned())
                    }));
                let scores = batch
                    .column_by_name(SERVED_SCORE)
                    .and_then(|c| c.as_primitive_opt::<Float64Type>());
                predictions.scores.extend(
                    (0..batch.num_rows())
                        .map(|row| scores.filter(|s| s.is_valid(row)).map(|s| s.value(row))),
                );
                for (part, (name, value_type)) in parts.iter_mut().zip(&inputs) {
                    part.push(typed_column(&batch, &file, name, *value_type)?);
                }
            }
        }
        for (part, (name, _)) in parts.into_iter().zip(&inputs) {
            let arrays: Vec<&dyn Array> = part.iter().map(AsRef::as_ref).collect();
            let column = arrow_select::concat::concat(&arrays)
                .with_context(|| format!("{}: column `{name}`", dir.display()))?;
            predictions.features.push(((*name).to_owned(), column));
        }
        Ok(predictions)
    }

    /// The rows in `[start, end)` whose click window closed by `log_end`, one per request id (the first).
    fn select(&self, (start, end): (i64, i64), window: i64, log_end: i64) -> Selected {
        let mut in_range: Vec<usize> = (0..self.times.len())
            .filter(|&row| (start..end).contains(&self.times[row]))
            .collect();
        in_range.sort_by_key(|&row| self.times[row]);
        let mut seen = std::collections::HashSet::new();
        let mut selected = Selected {
            chosen: Vec::new(),
            duplicates: 0,
            pending: 0,
        };
        for row in in_range {
            if !seen.insert(self.ids[row].as_str()) {
                selected.duplicates += 1;
            } else if self.times[row].saturating_add(window) > log_end {
                selected.pending += 1;
            } else {
                selected.chosen.push(row);
            }
        }
        selected
    }

    fn columns(&self, rows: &[usize], labels: Vec<bool>) -> Vec<(String, ArrayRef)> {
        let indices = arrow_array::UInt64Array::from_iter_values(rows.iter().map(|&r| r as u64));
        let mut columns: Vec<(String, ArrayRef)> = vec![
            (
                REQUEST_ID.into(),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|&r| self.ids[r].as_str()),
                )),
            ),
            (
                EVENT_TIME.into(),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        rows.iter().map(|&r| self.times[r]),
                    )
                    .with_timezone("UTC"),
                ),
            ),
            (
                SERVED_VERSION.into(),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|&r| self.versions[r].as_deref()),
                )),
            ),
            (
                SERVED_SCORE.into(),
                Arc::new(Float64Array::from_iter(
                    rows.iter().map(|&r| self.scores[r]),
                )),
            ),
            (
                CLICKED.into(),
                Arc::new(BooleanArray::from_iter(labels.into_iter().map(Some))),
            ),
        ];
        for (name, column) in &self.features {
            let taken = arrow_select::take::take(column.as_ref(), &indices, None)
                .unwrap_or_else(|_| new_null_array(column.data_type(), rows.len()));
            columns.push((name.clone(), taken));
        }
        columns
    }
}

fn arrow_type(value_type: ValueType) -> DataType {
    match value_type {
        ValueType::Int64 => DataType::Int64,
        ValueType::Float64 => DataType::Float64,
        ValueType::String => DataType::Utf8,
        ValueType::Bool => DataType::Boolean,
    }
}

/// The part's column for one input feature, as the schema types it: nulls where the part has none (no row of
/// the part carried it), integers widened for a float feature; any other type is refused, naming the file.
fn typed_column(
    batch: &RecordBatch,
    file: &Path,
    name: &str,
    value_type: ValueType,
) -> anyhow::Result<ArrayRef> {
    let expected = arrow_type(value_type);
    let Some(column) = batch.column_by_name(name) else {
        return Ok(new_null_array(&expected, batch.num_rows()));
    };
    if column.data_type() == &expected {
        return Ok(column.clone());
    }
    if expected == DataType::Float64 && column.data_type() == &DataType::Int64 {
        let integers = column.as_primitive::<Int64Type>();
        return Ok(Arc::new(Float64Array::from_iter(
            integers.iter().map(|v| v.map(|v| v as f64)),
        )));
    }
    if expected == DataType::Int64 && column.null_count() == column.len() {
        return Ok(Arc::new(Int64Array::new_null(column.len())));
    }
    bail!(
        "{}: column `{name}` has type {}, the served model's schema reads it as {value_type:?}",
        file.display(),
        column.data_type()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predictions(times: &[i64], ids: &[&str]) -> Predictions {
        Predictions {
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            times: times.to_vec(),
            versions: vec![Some("v1".into()); times.len()],
            scores: vec![Some(0.5); times.len()],
            features: vec![(
                "price".into(),
                Arc::new(Float64Array::from_iter_values(
                    times.iter().map(|&t| t as f64),
                )) as ArrayRef,
            )],
        }
    }

    #[test]
    fn a_range_keeps_one_row_per_request_and_leaves_open_windows_out() {
        let log = predictions(&[10, 20, 15, 30, 95, 200], &["a", "b", "a", "c", "d", "e"]);
        let selected = log.select((0, 100), 10, 100);
        assert_eq!(
            (selected.chosen, selected.duplicates, selected.pending),
            (vec![0, 1, 3], 1, 1),
            "the second `a` is a redelivery; `d`'s window ends after the log; `e` is out of range"
        );
    }

    #[test]
    fn a_feature_column_is_typed_by_the_schema() -> anyhow::Result<()> {
        let batch = RecordBatch::try_from_iter([
            ("count", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "device",
                Arc::new(StringArray::from(vec!["ios", "web"])) as ArrayRef,
            ),
        ])?;
        let file = Path::new("/t/part.parquet");
        let widened = typed_column(&batch, file, "count", ValueType::Float64)?;
        assert_eq!(widened.data_type(), &DataType::Float64);
        let absent = typed_column(&batch, file, "clicked_before", ValueType::Bool)?;
        assert_eq!(
            (absent.data_type(), absent.null_count()),
            (&DataType::Boolean, 2)
        );
        let refused = typed_column(&batch, file, "device", ValueType::Int64)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("/t/part.parquet: column `device` has type Utf8"),
            "{refused}"
        );
        Ok(())
    }
}
