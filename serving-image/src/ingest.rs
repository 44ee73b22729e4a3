//! `ingest`: a FeatureView's streaming pipeline. Consumes the view's Kafka topic, keeps each entity's recent
//! events in Redis, recomputes the entity's features with the feature store core (the same code as batch
//! materialization) and writes them to the online hash.
//!
//! Delivery is at least once and updates are idempotent: offsets are committed only after the Redis writes of
//! their batch succeeded, and an event is a sorted-set member named by its event id (`event_id`, or its topic
//! position when it has none), so a replayed event changes nothing. Malformed events are counted and forwarded
//! to the dead-letter topic with the reason in an `error` header; they never stop the consumer. One consumer
//! owns each partition, so with events keyed by entity, one writer owns each entity.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_features::aggregate::{Events, values_as_of};
use flywheel_features::online::add_writes;
use flywheel_features::view::{MICROS_PER_SECOND, Micros};
use flywheel_features::{EntityKey, FeatureValue, KeyPart, View};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::kafka::KafkaConnection;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("online store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("dead-letter topic `{topic}`: {message}")]
    DeadLetter { topic: String, message: String },
}

/// How often lag is reported while no event arrives.
const IDLE_REPORT: Duration = Duration::from_secs(2);

pub struct IngestSettings {
    pub kafka: KafkaConnection,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    /// Field holding an event's id; without it, the event's topic position identifies it.
    pub event_id_field: String,
    pub batch_size: usize,
    pub batch_wait: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

pub struct IngestMetrics {
    pub registry: Registry,
    events: Family<OutcomeLabel, Counter>,
    batches: Counter,
    retries: Counter,
    entities_written: Counter,
    batch_seconds: Histogram,
    lag: Family<PartitionLabel, Gauge>,
}

impl IngestMetrics {
    pub fn new() -> IngestMetrics {
        let mut registry = Registry::with_prefix("flywheel_ingest");
        let events = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "events",
            "Events consumed, by outcome (ingested, malformed)",
            events.clone(),
        );
        let batches = Counter::default();
        registry.register("batches", "Batches written and committed", batches.clone());
        let retries = Counter::default();
        registry.register(
            "retries",
            "Batches retried after a failed Redis write or commit",
            retries.clone(),
        );
        let entities_written = Counter::default();
        registry.register(
            "entities_written",
            "Entity hashes written to the online store",
            entities_written.clone(),
        );
        let batch_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "batch_seconds",
            "Time from a batch's first event to its commit",
            batch_seconds.clone(),
        );
        let lag = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "lag",
            "Events in the partition after the committed position",
            lag.clone(),
        );
        IngestMetrics {
            registry,
            events,
            batches,
            retries,
            entities_written,
            batch_seconds,
            lag,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    fn count(&self, outcome: &str, n: u64) {
        self.events
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc_by(n);
    }
}

impl Default for IngestMetrics {
    fn default() -> Self {
        IngestMetrics::new()
    }
}

/// One well-formed event: its entity, time, id and the source columns the view reads.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamEvent {
    pub entity: EntityKey,
    pub time: Micros,
    pub id: String,
    pub values: Vec<FeatureValue>,
}

impl StreamEvent {
    /// The sorted-set member standing for the event: identical for a replay of the same event.
    fn member(&self) -> String {
        let values: Vec<Value> = self.values.iter().map(json_of).collect();
        serde_json::json!([self.id, self.time, values]).to_string()
    }

    fn from_member(entity: &EntityKey, member: &str) -> Option<StreamEvent> {
        let Value::Array(parts) = serde_json::from_str::<Value>(member).ok()? else {
            return None;
        };
        let [id, time, Value::Array(values)] = parts.as_slice() else {
            return None;
        };
        Some(StreamEvent {
            entity: entity.clone(),
            time: time.as_i64()?,
            id: id.as_str()?.to_owned(),
            values: values
                .iter()
                .map(FeatureValue::from_json)
                .collect::<Option<_>>()?,
        })
    }
}

fn json_of(value: &FeatureValue) -> Value {
    match value {
        FeatureValue::Null => Value::Null,
        FeatureValue::Int(i) => Value::from(*i),
        FeatureValue::Float(f) => Value::from(*f),
        FeatureValue::Str(s) => Value::from(s.as_str()),
        FeatureValue::Bool(b) => Value::from(*b),
    }
}

/// Parses and checks one message: JSON object, join keys of their types, a time (RFC 3339 or seconds since the
/// epoch), and column values every feature can read. The error names the field.
pub fn parse_event(
    view: &View,
    payload: Option<&[u8]>,
    event_id_field: &str,
    position: (i32, i64),
) -> Result<StreamEvent, String> {
    let payload = payload.ok_or("empty message")?;
    let Value::Object(fields) =
        serde_json::from_slice::<Value>(payload).map_err(|e| format!("not JSON: {e}"))?
    else {
        return Err("not a JSON object".into());
    };
    let mut parts = Vec::with_capacity(view.entities.len());
    for (join_key, value_type) in &view.entities {
        use flywheel_crds::featureview::EntityValueType;
        let part = match (value_type, fields.get(join_key)) {
            (EntityValueType::Int64, Some(Value::Number(n))) => n.as_i64().map(KeyPart::Int),
            (EntityValueType::String, Some(Value::String(s))) => Some(KeyPart::Str(s.clone())),
            (_, None | Some(Value::Null)) => return Err(format!("`{join_key}`: missing join key")),
            _ => None,
        };
        parts.push(part.ok_or_else(|| format!("`{join_key}`: not a {value_type:?}"))?);
    }
    let time = match fields.get(&view.timestamp_field) {
        Some(Value::String(text)) => text
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_microsecond())
            .map_err(|e| format!("`{}`: {e}", view.timestamp_field))?,
        // Seconds since the epoch, within the years an RFC 3339 time can name: window arithmetic on a time
        // near the ends of the integer range would overflow.
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| s.is_finite())
            .map(|s| (s * MICROS_PER_SECOND as f64) as Micros)
            .filter(|&micros| jiff::Timestamp::from_microsecond(micros).is_ok())
            .ok_or_else(|| format!("`{}`: not a time", view.timestamp_field))?,
        _ => return Err(format!("`{}`: missing event time", view.timestamp_field)),
    };
    let id = match fields.get(event_id_field) {
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => format!("@{}:{}", position.0, position.1),
    };
    let columns = view.source_columns();
    let values = columns
        .iter()
        .map(|column| match fields.get(*column) {
            None => Ok(FeatureValue::Null),
            Some(value) => FeatureValue::from_json(value)
                .ok_or_else(|| format!("`{column}`: not a scalar value")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let event = StreamEvent {
        entity: EntityKey(parts),
        time,
        id,
        values,
    };
    // The event alone must compute: a value no feature can read (a string where a sum needs a number, say) is
    // refused here rather than poisoning its entity's features later.
    values_as_of(
        view,
        &events_of(view, std::slice::from_ref(&event)),
        &[0],
        time,
    )
    .map_err(|e| e.to_string())?;
    Ok(event)
}

fn events_of(view: &View, events: &[StreamEvent]) -> Events {
    Events {
        keys: events.iter().map(|e| e.entity.clone()).collect(),
        timestamps: events.iter().map(|e| e.time).collect(),
        columns: view
            .source_columns()
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.to_owned(),
                    events.iter().map(|e| e.values[i].clone()).collect(),
                )
            })
            .collect(),
    }
}

/// How long an entity's events are kept: the longest window, or the TTL if longer (a last value older than
/// the TTL reads as missing anyway).
fn retention(view: &View) -> Micros {
    view.longest_window().max(view.ttl)
}

/// Writes a batch of well-formed events: adds them to their entities' event sets, then recomputes and writes
/// each touched entity's features. Returns the number of entity hashes written.
pub async fn write_batch(
    view: &View,
    connection: &mut ConnectionManager,
    events: &[StreamEvent],
) -> Result<u64, redis::RedisError> {
    let mut by_entity: BTreeMap<&EntityKey, Vec<&StreamEvent>> = BTreeMap::new();
    for event in events {
        by_entity.entry(&event.entity).or_default().push(event);
    }
    let keep = retention(view);
    let mut pipeline = redis::pipe();
    for (entity, entity_events) in &by_entity {
        let key = view.events_key(entity);
        let newest = entity_events
            .iter()
            .map(|e| e.time)
            .max()
            .unwrap_or_default();
        for event in entity_events {
            pipeline.zadd(&key, event.member(), event.time).ignore();
        }
        // Trim relative to the newest event seen (the set's highest score), not this batch's newest.
        pipeline
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(newest.saturating_sub(keep))
            .ignore();
        pipeline.zrange_withscores(&key, 0, -1);
        pipeline
            .cmd("PEXPIREAT")
            .arg(&key)
            .arg(flywheel_features::online::expiry_ms(newest, keep))
            .ignore();
    }
    let stored: Vec<Vec<(String, f64)>> = pipeline.query_async(connection).await?;
    let mut rows = Vec::with_capacity(by_entity.len());
    for (entity, members) in by_entity.keys().zip(stored) {
        let mut entity_events: Vec<StreamEvent> = members
            .iter()
            .filter_map(|(member, _)| StreamEvent::from_member(entity, member))
            .collect();
        let Some(newest) = entity_events.iter().map(|e| e.time).max() else {
            continue;
        };
        entity_events.retain(|e| e.time > newest.saturating_sub(keep));
        let table = events_of(view, &entity_events);
        let all: Vec<usize> = (0..entity_events.len()).collect();
        match values_as_of(view, &table, &all, newest) {
            Ok(values) => rows.push(view.online_row(entity, newest, newest, &values)),
            Err(error) => tracing::warn!(%error, %entity, "entity features not computable"),
        }
    }
    let mut writes = redis::pipe();
    add_writes(&mut writes, &rows);
    let written: Vec<u64> = writes.query_async(connection).await?;
    Ok(written.iter().sum())
}

/// A batch as consumed: well-formed events, malformed messages (payload, key, reason) and the next offset of
/// each partition it read.
#[derive(Default)]
struct Batch {
    good: Vec<StreamEvent>,
    bad: Vec<(Vec<u8>, Option<Vec<u8>>, String)>,
    next_offsets: BTreeMap<i32, i64>,
}

impl Batch {
    fn len(&self) -> usize {
        self.good.len() + self.bad.len()
    }
}

pub struct Ingest {
    view: Arc<View>,
    settings: IngestSettings,
    consumer: StreamConsumer,
    producer: FutureProducer,
    connection: ConnectionManager,
    metrics: Arc<IngestMetrics>,
}

impl Ingest {
    /// Connects to Kafka, creates the dead-letter topic unless it exists, and subscribes.
    pub async fn connect(
        view: Arc<View>,
        settings: IngestSettings,
        connection: ConnectionManager,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Ingest, IngestError> {
        let consumer: StreamConsumer = settings
            .kafka
            .client_config()
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let producer: FutureProducer = settings
            .kafka
            .client_config()
            .set("message.timeout.ms", "30000")
            .create()?;
        ensure_topic(&settings.kafka, &settings.dead_letter_topic).await?;
        consumer.subscribe(&[&settings.topic])?;
        Ok(Ingest {
            view,
            settings,
            consumer,
            producer,
            connection,
            metrics,
        })
    }

    /// Consumes until the process is stopped.
    pub async fn run(mut self) {
        let mut last_lag = Instant::now();
        loop {
            let started = Instant::now();
            let batch = self.next_batch().await;
            if batch.len() == 0 {
                tokio::task::block_in_place(|| self.report_lag());
                continue;
            }
            // Until the batch is written and committed, retry it: committing first could lose it.
            let mut attempt = 0u32;
            loop {
                match self.deliver(&batch).await {
                    Ok(written) => {
                        self.metrics.count("ingested", batch.good.len() as u64);
                        self.metrics.count("malformed", batch.bad.len() as u64);
                        self.metrics.entities_written.inc_by(written);
                        self.metrics.batches.inc();
                        self.metrics
                            .batch_seconds
                            .observe(started.elapsed().as_secs_f64());
                        break;
                    }
                    Err(error) => {
                        attempt += 1;
                        self.metrics.retries.inc();
                        tracing::warn!(%error, attempt, "batch not written; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25))))
                            .await;
                    }
                }
            }
            if last_lag.elapsed() > Duration::from_secs(5) {
                last_lag = Instant::now();
                tokio::task::block_in_place(|| self.report_lag());
            }
        }
    }

    /// Waits for a first message (an empty batch after [`IDLE_REPORT`] without one, so lag is still reported when
    /// idle), then gathers more for at most `batch_wait`.
    async fn next_batch(&self) -> Batch {
        let mut batch = Batch::default();
        let deadline = tokio::time::sleep(self.settings.batch_wait);
        tokio::pin!(deadline);
        while batch.len() < self.settings.batch_size {
            let received = if batch.len() == 0 {
                tokio::select! {
                    message = self.consumer.recv() => message,
                    () = tokio::time::sleep(IDLE_REPORT) => break,
                }
            } else {
                tokio::select! {
                    message = self.consumer.recv() => message,
                    () = &mut deadline => break,
                }
            };
            let message = match received {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, topic = self.settings.topic, "consuming");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let position = (message.partition(), message.offset());
            batch.next_offsets.insert(position.0, position.1 + 1);
            match parse_event(
                &self.view,
                message.payload(),
                &self.settings.event_id_field,
                position,
            ) {
                Ok(event) => batch.good.push(event),
                Err(reason) => batch.bad.push((
                    message.payload().unwrap_or_default().to_vec(),
                    message.key().map(<[u8]>::to_vec),
                    reason,
                )),
            }
        }
        batch
    }

    /// Writes the batch to Redis, the malformed messages to the dead-letter topic, then commits its offsets.
    async fn deliver(&mut self, batch: &Batch) -> Result<u64, IngestError> {
        let written = if batch.good.is_empty() {
            0
        } else {
            write_batch(&self.view, &mut self.connection, &batch.good).await?
        };
        let topic = &self.settings.dead_letter_topic;
        for (payload, key, reason) in &batch.bad {
            let mut record = FutureRecord::to(topic).payload(payload.as_slice()).headers(
                OwnedHeaders::new().insert(Header {
                    key: "error",
                    value: Some(reason.as_bytes()),
                }),
            );
            if let Some(key) = key {
                record = record.key(key.as_slice());
            }
            self.producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(error, _)| IngestError::DeadLetter {
                    topic: topic.clone(),
                    message: error.to_string(),
                })?;
        }
        let mut list = TopicPartitionList::new();
        for (&partition, &next) in &batch.next_offsets {
            list.add_partition_offset(&self.settings.topic, partition, Offset::Offset(next))?;
        }
        if list.count() > 0 {
            self.consumer.commit(&list, CommitMode::Sync)?;
        }
        Ok(written)
    }

    /// Lag per assigned partition: the high watermark minus the committed position (blocking calls).
    fn report_lag(&self) {
        let timeout = Duration::from_secs(1);
        let topic = &self.settings.topic;
        let Ok(committed) = self.consumer.committed(timeout) else {
            return;
        };
        for element in committed.elements_for_topic(topic) {
            let partition = element.partition();
            let Ok((_, high)) = self.consumer.fetch_watermarks(topic, partition, timeout) else {
                continue;
            };
            let position = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            };
            self.metrics
                .lag
                .get_or_create(&PartitionLabel {
                    partition: partition.to_string(),
                })
                .set(high.saturating_sub(position));
        }
    }
}

/// Creates the dead-letter topic unless it exists.
async fn ensure_topic(kafka: &KafkaConnection, topic: &str) -> Result<(), IngestError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(IngestError::DeadLetter {
                    topic: topic.to_owned(),
                    message: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// A view of one Int64 entity with a last value, a transform and a windowed sum over one column.
    fn view() -> View {
        let manifest = json!({
            "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
            "metadata": {"name": "users", "namespace": "test"},
            "spec": {
                "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
                "source": {"stream": {"brokers": ["k:9092"], "topic": "events", "timestampField": "ts"}},
                "features": [
                    {"name": "price", "valueType": "Float64"},
                    {"name": "log_price", "column": "price", "valueType": "Float64", "transform": {"log1p": {}}},
                    {"name": "spend_1h", "column": "price", "valueType": "Float64",
                     "aggregation": {"function": "sum", "window": "1h"}},
                    {"name": "category", "valueType": "String"},
                ],
                "ttl": "1d",
                "offline": {"uri": "file:///tmp/offline"},
            },
        });
        let manifest = flywheel_features::view::parse_manifest(&manifest.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        View::of_manifest(&manifest, "ts").unwrap_or_else(|e| panic!("{e}"))
    }

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(|v| json!(v)),
            any::<f64>().prop_map(|v| json!(v)),
            any::<bool>().prop_map(|v| json!(v)),
            ".{0,12}".prop_map(|v| json!(v)),
            Just(json!(null)),
            Just(json!({"nested": [1, 2]})),
            Just(json!(u64::MAX)),
            Just(json!("2026-12-07T10:00:00Z")),
        ]
    }

    #[test]
    fn a_well_formed_event_is_read_and_a_malformed_one_names_its_field() {
        let view = view();
        let good =
            json!({"user_id": 7, "ts": "2026-12-07T10:00:00Z", "price": 2.5, "category": "a"});
        let event = parse_event(
            &view,
            Some(good.to_string().as_bytes()),
            "event_id",
            (0, 42),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.entity, EntityKey(vec![KeyPart::Int(7)]));
        assert_eq!(event.id, "@0:42");
        assert_eq!(
            StreamEvent::from_member(&event.entity, &event.member()),
            Some(event)
        );
        let bad = json!({"user_id": "seven", "ts": 1});
        let refused = parse_event(&view, Some(bad.to_string().as_bytes()), "event_id", (0, 1));
        assert_eq!(refused, Err("`user_id`: not a Int64".to_owned()));
        // Found by the property below: a time near the end of the range overflowed the window arithmetic.
        let far = json!({"user_id": 0, "ts": -9_223_372_033_255_i64});
        assert_eq!(
            parse_event(&view, Some(far.to_string().as_bytes()), "event_id", (0, 1)),
            Err("`ts`: not a time".to_owned())
        );
        let no_time = json!({"user_id": 1});
        assert!(
            parse_event(&view, Some(no_time.to_string().as_bytes()), "id", (0, 1))
                .is_err_and(|e| e.contains("`ts`"))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_event(&view(), Some(&payload), "event_id", (0, 0));
        }

        /// Events of every shape a producer could send: fields present or not, of any type. Each is either
        /// refused with a reason or read into an event that survives its sorted-set member unchanged.
        #[test]
        fn arbitrary_events_are_refused_or_round_trip(
            fields in proptest::collection::btree_map(
                prop::sample::select(vec!["user_id", "ts", "price", "category", "event_id", "other"]),
                json_value(),
                0..6,
            ),
        ) {
            let payload = serde_json::to_vec(&fields).unwrap_or_default();
            match parse_event(&view(), Some(&payload), "event_id", (3, 9)) {
                Ok(event) => prop_assert_eq!(
                    StreamEvent::from_member(&event.entity, &event.member()),
                    Some(event)
                ),
                Err(reason) => prop_assert!(!reason.is_empty()),
            }
        }
    }
}
