//! Kafka paths of the server: the prediction log (what was scored, with the input features as scored, so a
//! training set can hold exactly what serving saw) and the click topic (labels joined to predictions by request id).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
};
use serde::{Deserialize, Serialize};

use crate::metrics::ServingMetrics;

/// Where the brokers are and how to reach them (TLS, SASL), for every client the server makes.
#[derive(Clone, Debug, Default)]
pub struct KafkaConnection {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// librdkafka's security settings (`security.protocol`, `sasl.*`, `ssl.*`).
    pub security: Vec<(&'static str, String)>,
}

impl KafkaConnection {
    /// A client configuration bound to the brokers, with the security settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.security {
            config.set(*key, value);
        }
        config
    }
}

/// One scored row as the prediction log carries it (JSON, keyed by request id).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PredictionRecord {
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub score: f64,
    /// The input features as scored (the request's and the online store's values, typed by the schema); a
    /// missing value is absent.
    pub features: serde_json::Map<String, serde_json::Value>,
    pub timestamp_ms: u64,
}

/// A message on the click topic.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClickEvent {
    pub request_id: String,
    #[serde(default = "clicked_by_default")]
    pub clicked: bool,
}

fn clicked_by_default() -> bool {
    true
}

struct DeliveryCounter {
    metrics: Arc<ServingMetrics>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((error, _)) = result {
            tracing::debug!(%error, "prediction log delivery failed");
            self.metrics.prediction_log("failed");
        }
    }
}

/// Producer of the prediction log. librdkafka's own queue, bounded at `capacity` records, is the buffer:
/// `log` never blocks, and a full queue drops the record and counts it.
pub struct PredictionLog {
    producer: ThreadedProducer<DeliveryCounter>,
    topic: String,
    metrics: Arc<ServingMetrics>,
}

impl PredictionLog {
    pub fn new(
        kafka: &KafkaConnection,
        topic: &str,
        capacity: usize,
        metrics: Arc<ServingMetrics>,
    ) -> Result<PredictionLog, KafkaError> {
        let producer = kafka
            .client_config()
            .set("queue.buffering.max.messages", capacity.max(1).to_string())
            .set("linger.ms", "20")
            .set("message.timeout.ms", "30000")
            .create_with_context(DeliveryCounter {
                metrics: metrics.clone(),
            })?;
        Ok(PredictionLog {
            producer,
            topic: topic.to_owned(),
            metrics,
        })
    }

    pub fn log(&self, record: &PredictionRecord) {
        let Ok(payload) = serde_json::to_vec(record) else {
            self.metrics.prediction_log("failed");
            return;
        };
        let message = BaseRecord::to(&self.topic)
            .key(record.request_id.as_bytes())
            .payload(&payload);
        match self.producer.send(message) {
            Ok(()) => self.metrics.prediction_log("queued"),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                self.metrics.prediction_log("dropped");
            }
            Err((error, _)) => {
                tracing::debug!(%error, "prediction log record not queued");
                self.metrics.prediction_log("failed");
            }
        }
    }
}

/// Writes labels that clients send over HTTP or gRPC to the clicks topic: every replica joins them from there,
/// so the replica that served a prediction sees its label whichever replica the client reached, and the
/// traffic log records it with the clicks.
#[derive(Clone)]
pub struct LabelForwarder {
    producer: FutureProducer,
    topic: String,
}

/// How long a forwarded label may wait for the broker's acknowledgement.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

impl LabelForwarder {
    pub fn new(kafka: &KafkaConnection, topic: &str) -> Result<LabelForwarder, KafkaError> {
        let producer = kafka
            .client_config()
            .set(
                "message.timeout.ms",
                FORWARD_TIMEOUT.as_millis().to_string(),
            )
            .create()?;
        Ok(LabelForwarder {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Writes `labels` and waits until the broker holds them all, so a client told they were taken can rely
    /// on it; an error means some may be missing, and the client should send them again.
    pub async fn forward(&self, labels: &[ClickEvent]) -> Result<(), KafkaError> {
        let sends = labels.iter().map(|label| async move {
            let payload = serde_json::to_vec(label).unwrap_or_default();
            let record = FutureRecord::to(&self.topic)
                .key(label.request_id.as_bytes())
                .payload(&payload);
            self.producer
                .send(record, FORWARD_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|(error, _)| error)
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}

/// Consumes the click topic forever, handing each event to `on_click`. Every replica reads every click (its
/// own consumer group), since each holds only its own predictions.
pub async fn consume_clicks(
    kafka: &KafkaConnection,
    topic: &str,
    group: &str,
    offset_reset: &str,
    metrics: Arc<ServingMetrics>,
    on_click: impl Fn(ClickEvent) + Send,
) -> Result<(), KafkaError> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", offset_reset)
        .create()?;
    consumer.subscribe(&[topic])?;
    loop {
        match consumer.recv().await {
            Ok(message) => match message.payload().map(serde_json::from_slice::<ClickEvent>) {
                Some(Ok(event)) => on_click(event),
                _ => metrics.feedback("kafka", "malformed", 1),
            },
            Err(error) => {
                tracing::warn!(%error, topic, "click topic");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
