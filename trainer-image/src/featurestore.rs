//! The batch side of a FeatureView: `materialize` (source events → offline feature table + online store),
//! `build-dataset` (point-in-time correct training sets, sample joining) and `generate-events` (synthetic
//! feature events for demos and benchmarks).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use flywheel_auth::store_clients::RedisClientArgs;
use flywheel_crds::FeatureView;
use flywheel_crds::common::parse_duration;
use flywheel_crds::featureview::{FeatureStatistics, FeatureViewSpec, MaterializationReport};
use flywheel_features::column::Column;
use flywheel_features::grouping::EntityIds;
use flywheel_features::offline::{Computed, values_at_events, write_partition};
use flywheel_features::online::{WRITE_BATCH, is_expired, now_micros, redis_client, redis_url};
use flywheel_features::pit::PointInTimeIndex;
use flywheel_features::samples::{Click, Windows, label_impressions};
use flywheel_features::source::SourceEvents;
use flywheel_features::stats::{Baseline, drift_of, profile};
use flywheel_features::table::{
    self, feature_array, read_batches, read_feature_rows, write_parquet,
};
use flywheel_features::view::Micros;
use flywheel_features::{FeatureValue, View};
use rand::{RngExt, SeedableRng};
use rayon::iter::{IndexedParallelIterator, IntoParallelRefIterator, ParallelIterator};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::online_writer::OnlineWriter;

/// The kubelet keeps at most this much of a termination message.
const TERMINATION_MESSAGE_LIMIT: usize = 4096;
/// How long the online store may take to accept the connection, and to take or answer one write batch.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REDIS_IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Clone)]
pub struct ViewArgs {
    /// The FeatureView manifest (YAML or JSON).
    #[arg(long, env = "FLYWHEEL_FEATURE_VIEW_FILE")]
    view: Option<PathBuf>,
    /// The FeatureView as JSON (the operator passes it so).
    #[arg(
        long,
        env = "FLYWHEEL_FEATURE_VIEW",
        hide_env_values = true,
        conflicts_with = "view"
    )]
    view_json: Option<String>,
}

#[derive(clap::Args)]
pub struct MaterializeArgs {
    #[command(flatten)]
    view: ViewArgs,
    /// The batch source (default: the view's `source.batch.uri`).
    #[arg(long)]
    source: Option<String>,
    /// The offline store directory (default: the view's `offline.uri`).
    #[arg(long)]
    offline: Option<String>,
    /// Redis `host:port` (default: the view's online store); `--no-online` skips the online store.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, env = "FLYWHEEL_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    #[command(flatten)]
    redis_client: RedisClientArgs,
    #[arg(long)]
    no_online: bool,
    /// Materialize events after this time (RFC 3339): the previous run's watermark.
    #[arg(long, env = "FLYWHEEL_SINCE")]
    since: Option<String>,
    /// Materialize events up to this time (RFC 3339, inclusive; default: all).
    #[arg(long, env = "FLYWHEEL_UNTIL")]
    until: Option<String>,
    /// Also re-read this much before `--since`, for late events (default: the view's `materialization.lookback`).
    #[arg(long)]
    lookback: Option<String>,
    #[arg(
        long,
        env = "FLYWHEEL_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    termination_log: PathBuf,
}

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

#[derive(clap::Args)]
pub struct GenerateEventsArgs {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 5_000)]
    users: i64,
    #[arg(long, default_value_t = 50_000)]
    labels: usize,
    /// Span of event times, ending at `--end`.
    #[arg(long, default_value = "1d")]
    span: String,
    /// The newest event time (RFC 3339; default: now).
    #[arg(long)]
    end: Option<String>,
    /// Added to every price: a drifted distribution.
    #[arg(long, default_value_t = 0.0)]
    price_shift: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Writes `events.parquet` and `labels.parquet` here.
    #[arg(long)]
    out: PathBuf,
}

pub fn load_view(args: &ViewArgs) -> anyhow::Result<FeatureView> {
    let text = match (&args.view, &args.view_json) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the FeatureView {}", path.display()))?,
        (None, Some(json)) => json.clone(),
        (None, None) => bail!("give the FeatureView with --view FILE or FLYWHEEL_FEATURE_VIEW"),
    };
    Ok(flywheel_features::view::parse_manifest(&text)?)
}

/// A local path from a storage URI: `file://` URIs and plain paths. Object stores are not read by this build.
fn local_path(uri: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!(
            "{uri}: {scheme}:// is not readable by this build; mount the bucket and give a file:// URI"
        );
    }
    Ok(PathBuf::from(uri))
}

fn parse_time(text: &str, flag: &str) -> anyhow::Result<Micros> {
    let time: jiff::Timestamp = text
        .parse()
        .with_context(|| format!("{flag} `{text}` is not an RFC 3339 time"))?;
    Ok(time.as_microsecond())
}

fn format_time(micros: Micros) -> String {
    jiff::Timestamp::from_microsecond(micros).map_or_else(|_| micros.to_string(), |t| t.to_string())
}

fn micros_of(text: &str, flag: &str) -> anyhow::Result<Micros> {
    let duration = parse_duration(text).with_context(|| format!("{flag} `{text}`"))?;
    i64::try_from(duration.as_micros()).with_context(|| format!("{flag} `{text}` is too long"))
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The UTC day (days since the epoch) of a time: its offline partition.
fn day_of(micros: Micros) -> i64 {
    micros.div_euclid(MICROS_PER_DAY)
}

/// The partition name of a UTC day.
fn partition_name(day: i64) -> String {
    let date = jiff::Timestamp::from_microsecond(day * MICROS_PER_DAY)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date().to_string())
        .unwrap_or_else(|_| day.to_string());
    format!("date={date}")
}

/// The baseline a view's drift is measured against, kept in its offline store.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BaselineFile {
    schema_hash: String,
    statistics: Vec<FeatureStatistics>,
    distributions: BTreeMap<String, Baseline>,
}

pub fn materialize(args: &MaterializeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut phases = Phases::new();
    let manifest = load_view(&args.view)?;
    let spec = &manifest.spec;
    let Some(batch) = &spec.source.batch else {
        bail!("spec.source.batch: the view has no batch source to materialize");
    };
    let view = View::of_manifest(&manifest, &batch.timestamp_field)?;
    let source = local_path(args.source.as_deref().unwrap_or(&batch.uri))?;
    let offline = local_path(args.offline.as_deref().unwrap_or(&spec.offline.uri))?;
    let since = args
        .since
        .as_deref()
        .map(|t| parse_time(t, "--since"))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|t| parse_time(t, "--until"))
        .transpose()?;
    let lookback = match (
        &args.lookback,
        spec.materialization
            .as_ref()
            .and_then(|m| m.lookback.as_ref()),
    ) {
        (Some(text), _) => micros_of(text, "--lookback")?,
        (None, Some(duration)) => micros_of(&duration.0, "spec.materialization.lookback")?,
        (None, None) => 0,
    };
    let schema_hash = spec.schema_hash();
    let online = connect_online(args, &manifest);

    let events = SourceEvents::read(&source, &view)?.in_time_order();
    phases.done("read");
    let computed_error = |error| anyhow::Error::new(error).context(source.display().to_string());
    let times = events.timestamps();
    // In time order, the events up to `--until` are a prefix and the new ones (after the watermark, less the
    // lookback) a range of it.
    let in_range = times.partition_point(|&t| until.is_none_or(|u| t <= u));
    let new_rows =
        times[..in_range].partition_point(|&t| since.is_some_and(|s| t <= s - lookback))..in_range;
    let mut report = MaterializationReport {
        rows: new_rows.len() as i64,
        schema_hash: schema_hash.clone(),
        ..MaterializationReport::default()
    };
    if new_rows.is_empty() {
        report.watermark = since.map(format_time);
        return finish(args, report, started, &phases);
    }
    let watermark = times[in_range - 1];
    report.watermark = Some(format_time(watermark));

    let ids = events.entity_ids(in_range);
    let computed = values_at_events(&view, &events, &ids, watermark).map_err(computed_error)?;
    phases.done("compute");

    // The online store is written by its own thread while the offline table and statistics are computed:
    // Redis runs the writes in its own process, so they overlap.
    let mut touched = vec![false; ids.len()];
    for row in new_rows.clone() {
        touched[ids.ids[row]] = true;
    }
    let (events, ids, computed, view, manifest) = (&events, &ids, &computed, &view, &manifest);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let online = online.map(|(address, connection)| {
            let touched = &touched;
            scope.spawn(move || {
                let began = Instant::now();
                let written = connection
                    .join()
                    .map_err(|_| anyhow::anyhow!("connecting to the online store panicked"))
                    .and_then(|connected| connected)
                    .and_then(|connection| {
                        write_online(
                            connection, &address, view, events, ids, computed, touched, watermark,
                        )
                    });
                (written, began.elapsed())
            })
        });
        // Offline: every partition holding a new event is rewritten whole, from all of that day's events, so
        // late events land and a re-run writes the same files. In time order, a day is a range of rows.
        let mut partitions: Vec<(String, Range<usize>)> = Vec::new();
        let mut start = new_rows.start;
        while start < new_rows.end {
            let day = day_of(times[start]);
            let first = times[..start].partition_point(|&t| day_of(t) < day);
            let end = start + times[start..in_range].partition_point(|&t| day_of(t) == day);
            partitions.push((partition_name(day), first..end));
            start = end;
        }
        // The partitions (often one large day and a small one) and the statistics share the cores: a core done
        // with its part takes up the other.
        let report_statistics = &mut report;
        let (offline_time, statistics_time) = rayon::join(
            || -> anyhow::Result<Duration> {
                let began = Instant::now();
                partitions
                    .par_iter()
                    .map(|(partition, rows)| {
                        let path = offline.join(partition).join("part-00000.parquet");
                        write_partition(&path, view, events, &computed.columns, rows.clone())
                    })
                    .collect::<Result<Vec<()>, _>>()?;
                Ok(began.elapsed())
            },
            || -> anyhow::Result<Duration> {
                let began = Instant::now();
                add_statistics(
                    report_statistics,
                    &manifest.spec,
                    view,
                    &computed.columns,
                    new_rows.clone(),
                    &offline,
                )?;
                Ok(began.elapsed())
            },
        );
        phases.record("offline (concurrent)", offline_time?);
        phases.record("statistics (concurrent)", statistics_time?);
        phases.done("offline and statistics");
        report.partitions = partitions.into_iter().map(|(name, _)| name).collect();
        if let Some(online) = online {
            let (written, elapsed) = online
                .join()
                .map_err(|_| anyhow::anyhow!("the online store writer panicked"))?;
            (report.entities_written, report.expired) = written?;
            phases.record("online (concurrent)", elapsed);
        }
        Ok(())
    })?;
    finish(args, report, started, &phases)
}

/// Statistics and drift of the new rows (`new_rows`) against the baseline kept in the offline store;
/// the first run's rows become the baseline.
fn add_statistics(
    report: &mut MaterializationReport,
    spec: &FeatureViewSpec,
    view: &View,
    features: &[Column],
    new_rows: Range<usize>,
    offline: &Path,
) -> anyhow::Result<()> {
    let baseline_path = offline.join("_flywheel").join("baseline.json");
    let existing: Option<BaselineFile> = std::fs::read(&baseline_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .filter(|b: &BaselineFile| b.schema_hash == report.schema_hash);
    let baseline = match existing {
        Some(baseline) => {
            let policy = spec.drift.clone().unwrap_or_default();
            report.drift = view
                .features
                .par_iter()
                .zip(features)
                .filter_map(|(feature, values)| {
                    drift_of(
                        &feature.name,
                        baseline.distributions.get(&feature.name)?,
                        &values.observed(new_rows.clone()),
                        policy.psi_threshold,
                        policy.ks_threshold,
                    )
                })
                .collect();
            baseline
        }
        None => {
            let profiles: Vec<_> = view
                .features
                .par_iter()
                .zip(features)
                .map(|(feature, values)| profile(&feature.name, values.observed(new_rows.clone())))
                .collect();
            let mut baseline = BaselineFile {
                schema_hash: report.schema_hash.clone(),
                statistics: Vec::with_capacity(view.features.len()),
                distributions: BTreeMap::new(),
            };
            for (feature, (statistics, distribution)) in view.features.iter().zip(profiles) {
                baseline.statistics.push(statistics);
                if let Some(distribution) = distribution {
                    baseline
                        .distributions
                        .insert(feature.name.clone(), distribution);
                }
            }
            if let Some(dir) = baseline_path.parent() {
                std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            }
            std::fs::write(&baseline_path, serde_json::to_vec(&baseline)?)
                .with_context(|| baseline_path.display().to_string())?;
            report.baseline_created = true;
            baseline
        }
    };
    report.statistics = baseline.statistics;
    Ok(())
}

/// Connects to the view's online store on a thread of its own, so the connection is ready when the values are:
/// `None` when the run writes no online store. Answers the store's address and the connection.
fn connect_online(
    args: &MaterializeArgs,
    manifest: &FeatureView,
) -> Option<(String, JoinHandle<anyhow::Result<redis::Connection>>)> {
    let online = manifest.spec.online.as_ref().filter(|_| !args.no_online)?;
    let address = args
        .redis
        .clone()
        .unwrap_or_else(|| online.redis.address.clone());
    let url = redis_url(&address, online.redis.database);
    let password = args.redis_password.clone();
    let tls = args.redis_client.tls();
    let connecting = address.clone();
    let connection = std::thread::spawn(move || {
        let client = redis_client(&url, password.as_deref(), tls?.as_ref())?;
        let connection = client
            .get_connection_with_timeout(REDIS_CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to the online store at {connecting}"))?;
        // A black-holed store fails the run (and the Job reports it) instead of hanging it until its deadline.
        connection.set_read_timeout(Some(REDIS_IO_TIMEOUT))?;
        connection.set_write_timeout(Some(REDIS_IO_TIMEOUT))?;
        Ok(connection)
    });
    Some((address, connection))
}

/// Writes the values of the `touched` entities as of the watermark, unless already stale; returns how many
/// hashes were written and how many entities were stale.
#[allow(clippy::too_many_arguments)]
fn write_online(
    connection: redis::Connection,
    address: &str,
    view: &View,
    events: &SourceEvents,
    ids: &EntityIds,
    computed: &Computed,
    touched: &[bool],
    watermark: Micros,
) -> anyhow::Result<(i64, i64)> {
    let now = now_micros();
    let times = events.timestamps();
    let touched: Vec<usize> = (0..ids.len()).filter(|&id| touched[id]).collect();
    let mut writer = OnlineWriter::new(connection, address);
    let mut expired = 0;
    for batch in touched.chunks(WRITE_BATCH) {
        let mut rows = Vec::with_capacity(batch.len());
        for &id in batch {
            let newest = times[ids.last_rows[id]];
            if is_expired(newest, view.ttl, now) {
                expired += 1;
                continue;
            }
            let values = computed.values_of(view, id)?;
            rows.push(view.online_row(&ids.keys[id], watermark, newest, &values));
        }
        writer.write(rows)?;
    }
    Ok((writer.finish()?, expired))
}

/// Seconds spent in each phase of a run, for the log line (where the time goes, without a profiler).
struct Phases {
    last: Instant,
    seconds: serde_json::Map<String, serde_json::Value>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: Instant::now(),
            seconds: serde_json::Map::new(),
        }
    }

    /// Records a phase that ran beside the others.
    fn record(&mut self, phase: &str, elapsed: Duration) {
        self.seconds
            .insert(phase.to_owned(), json!(elapsed.as_secs_f64()));
    }

    fn done(&mut self, phase: &str) {
        let now = Instant::now();
        self.seconds
            .insert(phase.to_owned(), json!((now - self.last).as_secs_f64()));
        self.last = now;
    }
}

/// Prints the report and leaves it as the termination message, cut to fit the kubelet's limit.
fn finish(
    args: &MaterializeArgs,
    mut report: MaterializationReport,
    started: Instant,
    phases: &Phases,
) -> anyhow::Result<()> {
    report.duration_seconds = started.elapsed().as_secs_f64();
    let full = serde_json::to_string(&report)?;
    println!(
        "{}",
        json!({
            "event": "materialized",
            "report": serde_json::from_str::<serde_json::Value>(&full)?,
            "phaseSeconds": phases.seconds,
        })
    );
    let mut message = full;
    if message.len() > TERMINATION_MESSAGE_LIMIT {
        report.truncated = true;
        report
            .statistics
            .iter_mut()
            .for_each(|s| s.quantiles.clear());
        message = serde_json::to_string(&report)?;
        while message.len() > TERMINATION_MESSAGE_LIMIT
            && (report.statistics.pop().is_some()
                || report.drift.pop().is_some()
                || report.partitions.pop().is_some())
        {
            message = serde_json::to_string(&report)?;
        }
    }
    if let Err(error) = std::fs::write(&args.termination_log, message) {
        eprintln!(
            "flywheel-trainer: not writing the termination message to {}: {error}",
            args.termination_log.display()
        );
    }
    Ok(())
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

pub fn generate_events(args: &GenerateEventsArgs) -> anyhow::Result<()> {
    let end = match &args.end {
        Some(text) => parse_time(text, "--end")?,
        None => now_micros(),
    };
    let span = micros_of(&args.span, "--span")?;
    if args.users < 1 {
        bail!("--users must be at least 1");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let categories = ["books", "games", "music", "sports", "travel"];
    let mut rows: Vec<(i64, Micros, f64, i64, &str)> = (0..args.events)
        .map(|_| {
            let user = rng.random_range(0..args.users);
            let time = end - rng.random_range(0..=span);
            // Users differ in what they spend; prices are log-normal around that.
            let level = 1.0 + (user % 17) as f64;
            let price = level * (rng.random::<f64>() * 2.0).exp() + args.price_shift;
            let clicks = rng.random_range(0..4);
            let category = categories[(user as usize + rng.random_range(0..2)) % categories.len()];
            (user, time, price, clicks, category)
        })
        .collect();
    rows.sort_by_key(|r| r.1);
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let timestamps = |times: Vec<Micros>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC"))
    };
    write_parquet(
        &args.out.join("events.parquet"),
        vec![
            (
                "user_id".into(),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "event_timestamp".into(),
                timestamps(rows.iter().map(|r| r.1).collect()),
            ),
            (
                "price".into(),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ),
            (
                "clicks".into(),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
            ),
            (
                "category".into(),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.4))),
            ),
        ],
    )?;
    let mut labels: Vec<(i64, Micros, i64)> = (0..args.labels)
        .map(|_| {
            (
                rng.random_range(0..args.users),
                end - rng.random_range(0..=span),
                rng.random_range(0..2),
            )
        })
        .collect();
    labels.sort_by_key(|l| l.1);
    write_parquet(
        &args.out.join("labels.parquet"),
        vec![
            (
                "user_id".into(),
                Arc::new(Int64Array::from_iter_values(labels.iter().map(|l| l.0))) as ArrayRef,
            ),
            (
                "event_timestamp".into(),
                timestamps(labels.iter().map(|l| l.1).collect()),
            ),
            (
                "label".into(),
                Arc::new(Int64Array::from_iter_values(labels.iter().map(|l| l.2))),
            ),
        ],
    )?;
    println!(
        "{}",
        json!({"event": "generated", "events": rows.len(), "labels": labels.len(), "out": args.out,
               "from": format_time(end - span), "to": format_time(end)})
    );
    Ok(())
}
