//! `log-traffic`: the sink a Rollout's feedback section runs. It consumes the prediction log and the clicks
//! topic and writes them into the offline store as Parquet parts (`predictions/` and `clicks/` under `--out`,
//! one directory per day). Offsets are committed only once a part is on disk, so a crash loses nothing: a
//! restart may write a row twice, and the training-set step keeps one row per request id.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use flywheel_auth::store_clients::KafkaClientArgs;
use flywheel_crds::common::parse_duration;
use flywheel_features::table::write_parquet;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::training_set::local_path;

/// Micro-seconds since the epoch, as the offline store's time columns hold them.
type Micros = i64;

/// Columns a predictions part always has; a logged feature of the same name is left out (counted).
pub const REQUEST_ID: &str = "request_id";
pub const EVENT_TIME: &str = "event_timestamp";
pub const SERVED_MODEL: &str = "served_model";
pub const SERVED_VERSION: &str = "served_version";
pub const SERVED_SCORE: &str = "served_score";
pub const CLICKED: &str = "clicked";
const RESERVED: [&str; 5] = [
    REQUEST_ID,
    EVENT_TIME,
    SERVED_MODEL,
    SERVED_VERSION,
    SERVED_SCORE,
];
pub const PREDICTIONS_DIR: &str = "predictions";
/// How long the sink may take to reach the brokers at start before it gives up with the reason.
const BROKER_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
pub const CLICKS_DIR: &str = "clicks";

#[derive(clap::Args)]
pub struct LogTrafficArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FLYWHEEL_KAFKA_BROKERS")]
    brokers: String,
    #[command(flatten)]
    kafka_client: KafkaClientArgs,
    /// The prediction log topic the serving replicas write.
    #[arg(long, env = "FLYWHEEL_PREDICTION_LOG_TOPIC")]
    predictions_topic: String,
    /// The clicks topic (labels by request id).
    #[arg(long, env = "FLYWHEEL_CLICKS_TOPIC")]
    clicks_topic: Option<String>,
    /// Consumer group: offsets are kept per group, so a restarted sink goes on where the last part ended.
    #[arg(long, env = "FLYWHEEL_TRAFFIC_GROUP")]
    group: String,
    /// Where the parts go: a directory on the training storage (`file://` URI or path).
    #[arg(long, env = "FLYWHEEL_TRAFFIC_LOG")]
    out: String,
    /// A part is written at least this often while messages arrive.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    flush_interval: Duration,
    /// ... and as soon as this many rows wait.
    #[arg(long, default_value_t = 100_000)]
    max_rows: usize,
    /// Where a new group starts reading: `earliest` keeps what was logged before the sink started.
    #[arg(long, default_value = "earliest")]
    offset_reset: String,
}

/// A prediction log record, as `flywheel-serving` writes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedPrediction {
    request_id: String,
    model: String,
    version: String,
    score: f64,
    #[serde(default)]
    features: serde_json::Map<String, Value>,
    timestamp_ms: i64,
}

/// A message on the clicks topic.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoggedClick {
    request_id: String,
    #[serde(default = "clicked_by_default")]
    clicked: bool,
}

fn clicked_by_default() -> bool {
    true
}

struct Click {
    request_id: String,
    clicked: bool,
    time: Micros,
}

/// Rows waiting for the next part.
#[derive(Default)]
struct Pending {
    predictions: Vec<LoggedPrediction>,
    clicks: Vec<Click>,
    malformed: u64,
}

impl Pending {
    fn rows(&self) -> usize {
        self.predictions.len() + self.clicks.len()
    }

    fn add(&mut self, topic: &str, payload: &[u8], time: Micros, args: &LogTrafficArgs) {
        if topic == args.predictions_topic {
            match serde_json::from_slice::<LoggedPrediction>(payload) {
                Ok(prediction) => self.predictions.push(prediction),
                Err(_) => self.malformed += 1,
            }
        } else {
            match serde_json::from_slice::<LoggedClick>(payload) {
                Ok(click) => self.clicks.push(Click {
                    request_id: click.request_id,
                    clicked: click.clicked,
                    time,
                }),
                Err(_) => self.malformed += 1,
            }
        }
    }
}

pub fn log_traffic(args: &LogTrafficArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: &LogTrafficArgs) -> anyhow::Result<()> {
    let out = local_path(&args.out);
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers);
    for (key, value) in args.kafka_client.settings()? {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", &args.offset_reset)
        .create()
        .context("the Kafka consumer")?;
    let mut topics = vec![args.predictions_topic.as_str()];
    topics.extend(args.clicks_topic.as_deref());
    // Brokers that refuse the credentials or the certificate would otherwise leave the sink running and reading
    // nothing: it ends here with the reason, which the Rollout's TrafficLogged condition shows.
    for topic in &topics {
        consumer
            .fetch_metadata(Some(topic), BROKER_CHECK_TIMEOUT)
            .with_context(|| {
                format!(
                    "reaching topic {topic} on the brokers {} (check the Rollout's spec.feedback brokers and \
                     security)",
                    args.brokers
                )
            })?;
    }
    consumer
        .subscribe(&topics)
        .with_context(|| format!("subscribing to {}", topics.join(", ")))?;
    let mut flush = tokio::time::interval(args.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let mut pending = Pending::default();
    eprintln!(
        "{}",
        json!({"event": "logging", "topics": topics, "group": args.group, "out": out})
    );
    loop {
        tokio::select! {
            message = consumer.recv() => match message {
                Ok(message) => {
                    let time = message
                        .timestamp()
                        .to_millis()
                        .map_or_else(now_micros, |ms| ms.saturating_mul(1000));
                    pending.add(message.topic(), message.payload().unwrap_or_default(), time, args);
                }
                Err(error) => {
                    eprintln!("{}", json!({"event": "kafkaError", "error": error.to_string()}));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = flush.tick() => write_and_commit(&consumer, &out, &mut pending)?,
            _ = terminate.recv() => {
                write_and_commit(&consumer, &out, &mut pending)?;
                return Ok(());
            }
        }
        if pending.rows() >= args.max_rows {
            write_and_commit(&consumer, &out, &mut pending)?;
        }
    }
}

fn now_micros() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}

/// Writes what waits as parts, then commits the consumed offsets: a failure before the commit leaves the
/// messages to be read again.
fn write_and_commit(
    consumer: &StreamConsumer,
    out: &Path,
    pending: &mut Pending,
) -> anyhow::Result<()> {
    if pending.rows() == 0 && pending.malformed == 0 {
        return Ok(());
    }
    let taken = std::mem::take(pending);
    let written = write_parts(out, &taken)?;
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing consumed yet on any partition: nothing to commit.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {}
        Err(error) => return Err(error).context("committing the consumed offsets"),
    }
    eprintln!(
        "{}",
        json!({
            "event": "part", "predictions": taken.predictions.len(), "clicks": taken.clicks.len(),
            "malformed": taken.malformed, "files": written,
        })
    );
    Ok(())
}

fn write_parts(out: &Path, pending: &Pending) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if let Some(first) = pending.predictions.iter().map(|p| p.timestamp_ms).min() {
        let path = part_path(&out.join(PREDICTIONS_DIR), first.saturating_mul(1000));
        write_parquet(&path, prediction_columns(&pending.predictions))?;
        written.push(path);
    }
    if let Some(first) = pending.clicks.iter().map(|c| c.time).min() {
        let path = part_path(&out.join(CLICKS_DIR), first);
        write_parquet(&path, click_columns(&pending.clicks))?;
        written.push(path);
    }
    Ok(written)
}

/// `<dir>/day=YYYY-MM-DD/part-<first µs>-<random>.parquet`: parts sort by time, and two sinks never collide.
fn part_path(dir: &Path, first: Micros) -> PathBuf {
    let day = jiff::Timestamp::from_microsecond(first).map_or_else(
        |_| "unknown".to_owned(),
        |t| t.strftime("%Y-%m-%d").to_string(),
    );
    dir.join(format!("day={day}")).join(format!(
        "part-{first:020}-{:016x}.parquet",
        rand::random::<u64>()
    ))
}

fn timestamps(values: impl Iterator<Item = Micros>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

fn prediction_columns(predictions: &[LoggedPrediction]) -> Vec<(String, ArrayRef)> {
    let mut columns: Vec<(String, ArrayRef)> = vec![
        (
            REQUEST_ID.into(),
            Arc::new(StringArray::from_iter_values(
                predictions.iter().map(|p| p.request_id.as_str()),
            )),
        ),
        (
            EVENT_TIME.into(),
            timestamps(
                predictions
                    .iter()
                    .map(|p| p.timestamp_ms.saturating_mul(1000)),
            ),
        ),
        (
            SERVED_MODEL.into(),
            Arc::new(StringArray::from_iter_values(
                predictions.iter().map(|p| p.model.as_str()),
            )),
        ),
        (
            SERVED_VERSION.into(),
            Arc::new(StringArray::from_iter_values(
                predictions.iter().map(|p| p.version.as_str()),
            )),
        ),
        (
            SERVED_SCORE.into(),
            Arc::new(Float64Array::from_iter_values(
                predictions.iter().map(|p| p.score),
            )),
        ),
    ];
    let mut names: Vec<&str> = predictions
        .iter()
        .flat_map(|p| p.features.keys().map(String::as_str))
        .filter(|name| !RESERVED.contains(name))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let values: Vec<Option<&Value>> =
            predictions.iter().map(|p| p.features.get(name)).collect();
        columns.push((name.to_owned(), feature_column(&values)));
    }
    columns
}

/// One logged feature as a typed column. Serving logs each feature typed by the model's schema, so a column
/// is all booleans, all integers, all numbers or all text; anything else is kept as text.
fn feature_column(values: &[Option<&Value>]) -> ArrayRef {
    let present = || values.iter().flatten();
    if present().all(|v| v.is_boolean()) {
        Arc::new(BooleanArray::from_iter(
            values.iter().map(|v| v.and_then(Value::as_bool)),
        ))
    } else if present().all(|v| v.is_i64()) {
        Arc::new(Int64Array::from_iter(
            values.iter().map(|v| v.and_then(Value::as_i64)),
        ))
    } else if present().all(|v| v.is_number()) {
        Arc::new(Float64Array::from_iter(
            values.iter().map(|v| v.and_then(Value::as_f64)),
        ))
    } else {
        Arc::new(StringArray::from_iter(values.iter().map(|v| {
            v.map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        })))
    }
}

fn click_columns(clicks: &[Click]) -> Vec<(String, ArrayRef)> {
    vec![
        (
            REQUEST_ID.into(),
            Arc::new(StringArray::from_iter_values(
                clicks.iter().map(|c| c.request_id.as_str()),
            )),
        ),
        (EVENT_TIME.into(), timestamps(clicks.iter().map(|c| c.time))),
        (
            CLICKED.into(),
            Arc::new(BooleanArray::from_iter(
                clicks.iter().map(|c| Some(c.clicked)),
            )),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use arrow_schema::DataType;

    fn prediction(id: &str, features: Value) -> LoggedPrediction {
        LoggedPrediction {
            request_id: id.into(),
            model: "ctr".into(),
            version: "v1".into(),
            score: 0.25,
            features: features.as_object().cloned().unwrap_or_default(),
            timestamp_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn logged_features_become_typed_columns_and_a_missing_value_is_null() {
        let columns = prediction_columns(&[
            prediction(
                "a",
                json!({"user_id": 7, "price": 9.5, "device": "ios", "new": true}),
            ),
            prediction(
                "b",
                json!({"user_id": 8, "price": 3.0, "new": false, "served_score": 1}),
            ),
        ]);
        let types: Vec<(&str, DataType)> = columns
            .iter()
            .map(|(name, array)| (name.as_str(), array.data_type().clone()))
            .collect();
        assert_eq!(
            types,
            vec![
                (REQUEST_ID, DataType::Utf8),
                (
                    EVENT_TIME,
                    DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into()))
                ),
                (SERVED_MODEL, DataType::Utf8),
                (SERVED_VERSION, DataType::Utf8),
                (SERVED_SCORE, DataType::Float64),
                ("device", DataType::Utf8),
                ("new", DataType::Boolean),
                ("price", DataType::Float64),
                ("user_id", DataType::Int64),
            ],
            "a feature named like a reserved column is left out"
        );
        let device = &columns[5].1;
        assert!(device.is_valid(0) && device.is_null(1));
    }

    #[test]
    fn a_malformed_message_is_counted_and_dropped() {
        let args = LogTrafficArgs {
            brokers: String::new(),
            kafka_client: KafkaClientArgs::default(),
            predictions_topic: "predictions".into(),
            clicks_topic: Some("clicks".into()),
            group: "g".into(),
            out: String::new(),
            flush_interval: Duration::from_secs(60),
            max_rows: 10,
            offset_reset: "earliest".into(),
        };
        let mut pending = Pending::default();
        pending.add("predictions", b"not json", 0, &args);
        pending.add("clicks", br#"{"requestId":"a"}"#, 5, &args);
        pending.add("clicks", br#"{"requestId":"b","clicked":false}"#, 6, &args);
        assert_eq!((pending.rows(), pending.malformed), (2, 1));
        assert!(pending.clicks[0].clicked && !pending.clicks[1].clicked);
    }

    #[test]
    fn parts_are_named_by_day_and_first_time() {
        let path = part_path(Path::new("/t/predictions"), 1_800_000_000_000_000);
        let text = path.display().to_string();
        assert!(
            text.starts_with("/t/predictions/day=2027-01-15/part-00001800000000000000-"),
            "{text}"
        );
        assert!(text.ends_with(".parquet"));
    }
}
