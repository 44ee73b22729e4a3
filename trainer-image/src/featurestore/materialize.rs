//! `materialize`: a view's source events into its offline feature table (one partition per UTC day), its
//! online store and its statistics, drift against the baseline, and the run's report.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flywheel_auth::store_clients::RedisClientArgs;
use flywheel_crds::FeatureView;
use flywheel_crds::featureview::{FeatureStatistics, FeatureViewSpec, MaterializationReport};
use flywheel_features::View;
use flywheel_features::column::Column;
use flywheel_features::grouping::EntityIds;
use flywheel_features::offline::{Computed, values_at_events, write_partition};
use flywheel_features::online::{WRITE_BATCH, is_expired, now_micros, redis_client, redis_url};
use flywheel_features::source::SourceEvents;
use flywheel_features::stats::{Baseline, drift_of, profile};
use flywheel_features::view::Micros;
use rayon::iter::{IndexedParallelIterator, IntoParallelRefIterator, ParallelIterator};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::online_writer::OnlineWriter;

use super::{ViewArgs, format_time, load_view, local_path, micros_of, parse_time};

/// The kubelet keeps at most this much of a termination message.
const TERMINATION_MESSAGE_LIMIT: usize = 4096;
/// How long the online store may take to accept the connection, and to take or answer one write batch.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REDIS_IO_TIMEOUT: Duration = Duration::from_secs(60);
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
    let new_rows = times[..in_range]
        .partition_point(|&t| since.is_some_and(|s| t <= s.saturating_sub(lookback)))
        ..in_range;
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
