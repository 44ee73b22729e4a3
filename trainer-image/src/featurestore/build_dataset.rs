//! `build-dataset`: point-in-time correct training sets from labeled events, or from impressions labeled by
//! sample joining with clicks and conversions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, StringArray, TimestampMicrosecondArray};
use flywheel_features::pit::PointInTimeIndex;
use flywheel_features::samples::{Click, Windows, label_impressions};
use flywheel_features::table::{self, feature_array, read_batches, read_feature_rows};
use flywheel_features::view::Micros;
use flywheel_features::{FeatureValue, View};
use serde::Deserialize;
use serde_json::json;

use super::{ViewArgs, format_time, load_view, local_path, micros_of, parse_time};

#[derive(clap::Args)]
pub struct BuildDatasetArgs {
    #[command(flatten)]
    view: ViewArgs,
    /// The offline feature table (default: the view's `offline.uri`).
    #[arg(long)]
    features: Option<String>,
    /// Labeled events: the view's join keys, `--event-time`, and any other columns (kept as they are).
    #[arg(long, conflicts_with = "impressions")]
    events: Option<PathBuf>,
    /// Impressions for sample joining: join keys, `--event-time`, `--request-id` and other columns.
    #[arg(long, requires = "clicks")]
    impressions: Option<PathBuf>,
    /// Clicks: `--request-id`, `--click-id` and `--event-time`.
    #[arg(long)]
    clicks: Option<PathBuf>,
    /// Conversions: `--click-id` and `--event-time`.
    #[arg(long)]
    conversions: Option<PathBuf>,
    /// Prediction log (JSON lines as `flywheel-serving` logs them): adds the served version and score.
    #[arg(long)]
    prediction_log: Option<PathBuf>,
    #[arg(long, default_value = "event_timestamp")]
    event_time: String,
    #[arg(long, default_value = "request_id")]
    request_id: String,
    #[arg(long, default_value = "click_id")]
    click_id: String,
    #[arg(long, default_value = "30m")]
    click_window: String,
    #[arg(long, default_value = "7d")]
    conversion_window: String,
    /// Keep only the base rows (events or impressions) at or after this time (RFC 3339).
    #[arg(long)]
    start: Option<String>,
    /// Keep only the base rows before this time (RFC 3339).
    #[arg(long)]
    end: Option<String>,
    #[arg(long)]
    out: PathBuf,
}

/// Sample joining's inputs besides the impressions: clicks, optional conversions, windows and id columns.
#[derive(Clone, Debug)]
pub struct SampleJoin {
    pub clicks: PathBuf,
    pub conversions: Option<PathBuf>,
    pub click_window: String,
    pub conversion_window: String,
    pub request_id: String,
    pub click_id: String,
}

impl BuildDatasetArgs {
    /// Point-in-time features for the `events` whose `event_time` is in `[start, end)`: labeled events as they
    /// are, or impressions labeled by sample joining.
    pub fn for_range(
        view: ViewArgs,
        events: PathBuf,
        sample_join: Option<SampleJoin>,
        event_time: &str,
        (start, end): (&str, &str),
        out: PathBuf,
    ) -> BuildDatasetArgs {
        let mut args = BuildDatasetArgs {
            view,
            features: None,
            events: None,
            impressions: None,
            clicks: None,
            conversions: None,
            prediction_log: None,
            event_time: event_time.to_owned(),
            request_id: "request_id".to_owned(),
            click_id: "click_id".to_owned(),
            click_window: "30m".to_owned(),
            conversion_window: "7d".to_owned(),
            start: Some(start.to_owned()),
            end: Some(end.to_owned()),
            out,
        };
        match sample_join {
            None => args.events = Some(events),
            Some(join) => {
                args.impressions = Some(events);
                args.clicks = Some(join.clicks);
                args.conversions = join.conversions;
                args.click_window = join.click_window;
                args.conversion_window = join.conversion_window;
                args.request_id = join.request_id;
                args.click_id = join.click_id;
            }
        }
        args
    }
}

/// A prediction as `flywheel-serving` logs it; only what a training set keeps.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedPrediction {
    request_id: String,
    version: String,
    score: f64,
}

fn strings(
    batch: &arrow_array::RecordBatch,
    path: &Path,
    column: &str,
) -> anyhow::Result<Vec<String>> {
    table::values(batch, path, column)?
        .into_iter()
        .enumerate()
        .map(|(row, value)| match value {
            FeatureValue::Str(s) => Ok(s),
            FeatureValue::Int(i) => Ok(i.to_string()),
            _ => bail!(
                "{}: column `{column}` row {row}: expected an id (string or integer)",
                path.display()
            ),
        })
        .collect()
}

/// All rows of a Parquet file or directory as one batch.
fn read_table(path: &Path) -> anyhow::Result<arrow_array::RecordBatch> {
    let mut batches = Vec::new();
    for file in table::parquet_files(path)? {
        batches.extend(read_batches(&file)?);
    }
    let Some(first) = batches.first() else {
        bail!("{}: holds no Parquet rows", path.display());
    };
    let batch = arrow_select::concat::concat_batches(&first.schema(), &batches)
        .with_context(|| format!("{}: files with different columns", path.display()))?;
    if batch.num_rows() == 0 {
        bail!("{}: holds no Parquet rows", path.display());
    }
    Ok(batch)
}

pub fn build_dataset(args: &BuildDatasetArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let manifest = load_view(&args.view)?;
    let view = View::of_manifest(&manifest, &args.event_time)?;
    let features_dir = local_path(
        args.features
            .as_deref()
            .unwrap_or(&manifest.spec.offline.uri),
    )?;
    let (base_path, sample_join) = match (&args.events, &args.impressions) {
        (Some(events), None) => (events.clone(), false),
        (None, Some(impressions)) => (impressions.clone(), true),
        _ => {
            bail!("give --events (labeled events) or --impressions with --clicks (sample joining)")
        }
    };
    let base = within_range(read_table(&base_path)?, &base_path, args)?;
    let keys = table::keys(&base, &base_path, &view.entities)?;
    let times = table::timestamps(&base, &base_path, &args.event_time)?;
    let mut columns: Vec<(String, ArrayRef)> = base
        .schema()
        .fields()
        .iter()
        .zip(base.columns())
        .map(|(field, array)| (field.name().clone(), array.clone()))
        .collect();

    if sample_join {
        let request_ids = strings(&base, &base_path, &args.request_id)?;
        let clicks_path = args.clicks.as_deref().context("--clicks")?;
        let clicks = read_table(clicks_path)?;
        let click_keys = strings(&clicks, clicks_path, &args.request_id)?;
        let click_ids = strings(&clicks, clicks_path, &args.click_id)?;
        let click_times = table::timestamps(&clicks, clicks_path, &args.event_time)?;
        let click_rows: Vec<Click<'_>> = (0..clicks.num_rows())
            .map(|i| Click {
                impression_key: &click_keys[i],
                click_id: &click_ids[i],
                time: click_times[i],
            })
            .collect();
        let conversions = args.conversions.as_deref().map(read_table).transpose()?;
        let (conversion_ids, conversion_times) = match (&conversions, args.conversions.as_deref()) {
            (Some(batch), Some(path)) => (
                strings(batch, path, &args.click_id)?,
                table::timestamps(batch, path, &args.event_time)?,
            ),
            _ => (Vec::new(), Vec::new()),
        };
        let conversion_rows: Vec<(&str, Micros)> = conversion_ids
            .iter()
            .map(String::as_str)
            .zip(conversion_times)
            .collect();
        let impressions: Vec<(&str, Micros)> = request_ids
            .iter()
            .map(String::as_str)
            .zip(times.iter().copied())
            .collect();
        let windows = Windows {
            click: micros_of(&args.click_window, "--click-window")?,
            conversion: micros_of(&args.conversion_window, "--conversion-window")?,
        };
        let labels = label_impressions(&impressions, &click_rows, &conversion_rows, windows);
        columns.push((
            "label_click".into(),
            Arc::new(BooleanArray::from_iter(
                labels.iter().map(|l| Some(l.click)),
            )),
        ));
        columns.push((
            "label_convert".into(),
            Arc::new(BooleanArray::from_iter(
                labels.iter().map(|l| Some(l.convert)),
            )),
        ));
        if let Some(log_path) = &args.prediction_log {
            let text = std::fs::read_to_string(log_path)
                .with_context(|| log_path.display().to_string())?;
            let mut served = std::collections::HashMap::new();
            for (line_number, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let record: LoggedPrediction = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", log_path.display(), line_number + 1))?;
                served.insert(record.request_id.clone(), record);
            }
            let joined: Vec<Option<&LoggedPrediction>> =
                request_ids.iter().map(|id| served.get(id)).collect();
            columns.push((
                "served_version".into(),
                Arc::new(StringArray::from_iter(
                    joined.iter().map(|r| r.map(|r| r.version.as_str())),
                )),
            ));
            columns.push((
                "served_score".into(),
                Arc::new(Float64Array::from_iter(
                    joined.iter().map(|r| r.map(|r| r.score)),
                )),
            ));
        }
    }

    // Point-in-time join: each row gets its entity's feature row as of the row's time, within the TTL.
    let table = read_feature_rows(&features_dir, &view)?;
    let index = PointInTimeIndex::new(&table.keys, &table.timestamps);
    let matches: Vec<Option<usize>> = keys
        .iter()
        .zip(&times)
        .map(|(key, &time)| index.lookup(key, time, view.ttl))
        .collect();
    for (position, feature) in view.features.iter().enumerate() {
        if columns.iter().any(|(name, _)| name == &feature.name) {
            bail!(
                "{}: has a column `{}`, which is also a feature of the view",
                base_path.display(),
                feature.name
            );
        }
        let null = FeatureValue::Null;
        let values = matches
            .iter()
            .map(|m| m.map_or(&null, |row| &table.values[row][position]));
        columns.push((
            feature.name.clone(),
            feature_array(feature.value_type, values),
        ));
    }
    columns.push((
        table::FEATURE_TIME_COLUMN.into(),
        Arc::new(
            TimestampMicrosecondArray::from_iter(
                matches.iter().map(|m| m.map(|row| table.timestamps[row])),
            )
            .with_timezone("UTC"),
        ),
    ));
    let namespace = manifest.metadata.namespace.as_deref().unwrap_or("default");
    let name = manifest.metadata.name.as_deref().unwrap_or("features");
    let lineage = HashMap::from([
        (
            table::FEATURE_VIEW_KEY.to_owned(),
            format!("{namespace}/{name}"),
        ),
        (
            table::FEATURE_VIEW_SCHEMA_HASH_KEY.to_owned(),
            manifest.spec.schema_hash(),
        ),
    ]);
    table::write_parquet_with_metadata(&args.out, columns, lineage)?;
    let matched = matches.iter().filter(|m| m.is_some()).count();
    println!(
        "{}",
        json!({
            "event": "dataset", "rows": keys.len(), "withFeatures": matched,
            "seconds": started.elapsed().as_secs_f64(), "out": args.out,
        })
    );
    Ok(())
}

/// The rows of `base` whose event time lies in `[--start, --end)`; all of them without bounds.
fn within_range(
    base: arrow_array::RecordBatch,
    path: &Path,
    args: &BuildDatasetArgs,
) -> anyhow::Result<arrow_array::RecordBatch> {
    if args.start.is_none() && args.end.is_none() {
        return Ok(base);
    }
    let start = args
        .start
        .as_deref()
        .map(|text| parse_time(text, "--start"))
        .transpose()?
        .unwrap_or(Micros::MIN);
    let end = args
        .end
        .as_deref()
        .map(|text| parse_time(text, "--end"))
        .transpose()?
        .unwrap_or(Micros::MAX);
    let times = table::timestamps(&base, path, &args.event_time)?;
    let keep = BooleanArray::from_iter(times.iter().map(|t| Some((start..end).contains(t))));
    let kept = arrow_select::filter::filter_record_batch(&base, &keep)
        .with_context(|| format!("{}: selecting rows by time", path.display()))?;
    if kept.num_rows() == 0 {
        bail!(
            "{}: no rows with {} in [{}, {})",
            path.display(),
            args.event_time,
            format_time(start),
            format_time(end)
        );
    }
    Ok(kept)
}
