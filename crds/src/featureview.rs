//! `FeatureView`: a named set of features over entities, with batch and stream sources, an offline store for
//! point-in-time training sets and an online (Redis) store for serving.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, Duration, SpecViolations};
use crate::store_access::{ClientTls, KafkaSecurity};

mod status;

pub use status::{
    FeatureDrift, FeatureStatistics, FeatureViewStatus, MaterializationReport, MaterializationRun,
};

/// Regex of a feature, entity or column name: an identifier usable in Parquet, Redis keys and model cards.
pub const IDENTIFIER_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$";
/// Regex of a storage URI Flywheel reads and writes.
pub const STORAGE_URI_PATTERN: &str = r"^(file|s3|gs|hdfs)://.+$";
/// Regex of a `host:port` address.
pub const HOST_PORT_PATTERN: &str = r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$";
/// Regex of a five-field cron schedule or an `@every <duration>` / `@hourly`-style macro.
pub const SCHEDULE_PATTERN: &str =
    r"^(@(hourly|daily|weekly|monthly)|@every ([0-9]+(ms|s|m|h|d))+|(\S+\s+){4}\S+)$";

/// Desired state of a FeatureView: its entities and features, where their raw events come from, and the offline
/// and online stores they are materialized into.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flywheel.dev",
    version = "v1alpha1",
    kind = "FeatureView",
    namespaced,
    status = "FeatureViewStatus",
    shortname = "fv",
    category = "flywheel",
    derive = "PartialEq",
    doc = "A set of features over entities, materialized offline (Parquet) and online (Redis).",
    printcolumn(
        name = "Entities",
        type_ = "string",
        json_path = ".status.entitiesSummary"
    ),
    printcolumn(
        name = "Features",
        type_ = "integer",
        json_path = ".status.featureCount"
    ),
    printcolumn(
        name = "Last Materialized",
        type_ = "date",
        json_path = ".status.lastMaterialization.time"
    ),
    printcolumn(
        name = "Rows",
        type_ = "integer",
        json_path = ".status.lastMaterialization.rows"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FeatureViewSpec {
    /// The join keys every feature row is keyed by (e.g. `user_id`, `item_id`); names are unique.
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub entities: Vec<Entity>,
    /// Where raw events come from.
    pub source: FeatureSource,
    /// The features this view computes; names are unique.
    #[schemars(length(min = 1, max = 1000), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub features: Vec<Feature>,
    /// How long an online value stays valid after its event time; older values read as missing.
    pub ttl: Duration,
    /// Offline store for training sets (point-in-time joins).
    pub offline: OfflineStore,
    /// Online store for serving; omit for an offline-only view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<OnlineStore>,
    /// When to materialize offline → online; omit to materialize only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materialization: Option<Materialization>,
    /// Drift detection against the statistics baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entity {
    /// Entity name (e.g. `user`).
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub name: String,
    /// Column holding the entity's key (e.g. `user_id`).
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub join_key: String,
    /// Type of the join key's values: `String` or `Int64`. Default `String`.
    #[serde(default = "default_entity_type")]
    pub value_type: EntityValueType,
}

fn default_entity_type() -> EntityValueType {
    EntityValueType::String
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EntityValueType {
    String,
    Int64,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.batch) || has(self.stream)").message("spec.source: set batch, stream or both"))]
pub struct FeatureSource {
    /// Parquet events that materialization Jobs read into the offline store and, when `online` is set, the
    /// online store. Set `batch`, `stream` or both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSource>,
    /// Kafka events ingested continuously into the online store by the view's `<name>-ingest` Deployment
    /// (only when `online` is set). Set `batch`, `stream` or both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamSource>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSource {
    /// Parquet file or directory (`file://`, `s3://`, `gs://`, `hdfs://`).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// Event-time column used for point-in-time joins and TTL.
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub timestamp_field: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamSource {
    /// Kafka bootstrap brokers, `host:port`.
    #[schemars(length(min = 1, max = 32), inner(pattern(HOST_PORT_PATTERN)))]
    pub brokers: Vec<String>,
    /// Kafka topic the events are read from.
    #[schemars(length(min = 1, max = 249), pattern(r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Event-time field of each message.
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub timestamp_field: String,
    /// Encoding of each message; `Json` (one JSON object per message) is the only one so far. Default `Json`.
    #[serde(default = "default_stream_format")]
    pub format: StreamFormat,
    /// TLS and SASL toward the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<KafkaSecurity>,
}

fn default_stream_format() -> StreamFormat {
    StreamFormat::Json
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StreamFormat {
    Json,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.transform) && has(self.aggregation))").message("a feature has a transform or an aggregation, not both"))]
pub struct Feature {
    /// Feature name, unique in the view; also the source column unless `column` is set.
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub name: String,
    /// Type of the feature's values. It must match what a transform or aggregation yields: `Int64` for
    /// hashBucket, bucketize, cross, count and distinctCount; `Float64` for log1p, standardize, sum, mean, min
    /// and max. The list types are not materialized yet.
    pub value_type: FeatureValueType,
    /// Source column; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(IDENTIFIER_PATTERN))]
    pub column: Option<String>,
    /// Stateless transform applied identically in training and serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
    /// Windowed aggregation over the entity's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<Aggregation>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FeatureValueType {
    Int64,
    Float64,
    String,
    Bool,
    Int64List,
    Float64List,
    StringList,
}

/// Exactly one transform, written as a single key (`hashBucket: {buckets: 100000}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Transform {
    /// Categorical: hashes the value into one of `buckets` buckets; a missing value gets the extra index
    /// `buckets`.
    HashBucket(HashBucket),
    /// Categorical: the index of the value's bucket, i.e. how many `boundaries` are at or below it; a missing
    /// value gets its own extra index.
    Bucketize(Bucketize),
    /// Numeric: ln(1 + max(x, 0)), for counts and prices; a missing value becomes 0. Takes no settings (`{}`).
    Log1p(Log1p),
    /// Numeric: (x − mean) / std; a missing value becomes 0.
    Standardize(Standardize),
    /// Categorical: hashes the values of the listed features together into one of `buckets` buckets; if any of
    /// them is missing, the extra index `buckets`.
    Cross(Cross),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct HashBucket {
    /// Number of hash buckets (1 to 1,000,000,000); the embedding table gets one more row for missing values.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub buckets: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Bucketize {
    /// Strictly increasing boundaries; n boundaries make n+1 buckets.
    #[schemars(length(min = 1, max = 1024))]
    pub boundaries: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Log1p {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Standardize {
    /// Mean subtracted from the value; must be finite.
    pub mean: f64,
    /// Must be positive.
    pub std: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Cross {
    /// Features crossed together (2 or more).
    #[schemars(length(min = 2, max = 4), inner(pattern(IDENTIFIER_PATTERN)))]
    pub features: Vec<String>,
    /// Number of hash buckets of the crossed values (1 to 1,000,000,000); the embedding table gets one more row
    /// for missing values.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub buckets: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Aggregation {
    /// Aggregate of the column's non-null values over the entity's events in the window ending at the feature's
    /// time: `count`, `sum`, `mean`, `min`, `max` or `distinctCount`.
    pub function: AggregationFunction,
    /// Window length, e.g. `7d`.
    pub window: Duration,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AggregationFunction {
    Count,
    Sum,
    Mean,
    Min,
    Max,
    DistinctCount,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct OfflineStore {
    /// Directory or bucket prefix for the offline Parquet tables.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub uri: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct OnlineStore {
    /// The Redis server the view's online values are written to and served from.
    pub redis: RedisStore,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisStore {
    /// `host:port` of the Redis server.
    #[schemars(pattern(HOST_PORT_PATTERN))]
    pub address: String,
    /// Redis logical database number, 0 to 15. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 15))]
    pub database: u8,
    /// Prefix of every key this view writes; defaults to `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub key_prefix: Option<String>,
    /// Secret (same namespace) whose `password` key holds the Redis password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub password_secret: Option<String>,
    /// Connect over TLS (`rediss://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Materialization {
    /// Cron schedule (`*/15 * * * *`) or `@every 15m`.
    #[schemars(pattern(SCHEDULE_PATTERN))]
    pub schedule: String,
    /// How far back each run re-reads, to pick up late events; defaults to the schedule period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback: Option<Duration>,
    /// How long one run may take (default `30m`). Past it the run's Job is stopped and the run fails with
    /// `DeadlineExceeded`, so a store that stops answering fails a run instead of holding up the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl Materialization {
    pub const DEFAULT_TIMEOUT: &str = "30m";

    pub fn timeout(&self) -> Duration {
        self.timeout
            .clone()
            .unwrap_or_else(|| Duration::from(Self::DEFAULT_TIMEOUT))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriftPolicy {
    /// PSI above which a feature counts as drifted.
    #[serde(default = "default_psi_threshold")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub psi_threshold: f64,
    /// KS statistic above which a numeric feature counts as drifted.
    #[serde(default = "default_ks_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ks_threshold: f64,
}

impl Default for DriftPolicy {
    fn default() -> Self {
        DriftPolicy {
            psi_threshold: default_psi_threshold(),
            ks_threshold: default_ks_threshold(),
        }
    }
}

fn default_psi_threshold() -> f64 {
    0.25
}

fn default_ks_threshold() -> f64 {
    0.2
}

impl Feature {
    /// The type the feature yields, when its transform or aggregation fixes it: categorical transforms and
    /// counts yield integers, numeric transforms and sums, means, minima and maxima yield floats.
    pub fn yields(&self) -> Option<FeatureValueType> {
        if let Some(transform) = &self.transform {
            return Some(match transform {
                Transform::HashBucket(_) | Transform::Bucketize(_) | Transform::Cross(_) => {
                    FeatureValueType::Int64
                }
                Transform::Log1p(_) | Transform::Standardize(_) => FeatureValueType::Float64,
            });
        }
        self.aggregation
            .as_ref()
            .map(|aggregation| match aggregation.function {
                AggregationFunction::Count | AggregationFunction::DistinctCount => {
                    FeatureValueType::Int64
                }
                AggregationFunction::Sum
                | AggregationFunction::Mean
                | AggregationFunction::Min
                | AggregationFunction::Max => FeatureValueType::Float64,
            })
    }

    /// Why `valueType` cannot hold what the feature yields, if it cannot.
    fn type_mismatch(&self) -> Option<String> {
        match self.yields() {
            Some(yields) if yields != self.value_type => Some(format!(
                "is {:?} but the feature yields {yields:?}",
                self.value_type
            )),
            Some(_) => None,
            None => matches!(
                self.value_type,
                FeatureValueType::Int64List
                    | FeatureValueType::Float64List
                    | FeatureValueType::StringList
            )
            .then(|| {
                format!(
                    "{:?} features are not materialized yet; use a scalar type",
                    self.value_type
                )
            }),
        }
    }
}

impl FeatureView {
    /// The prefix of the view's Redis keys (`<prefix><entity>`): `online.redis.keyPrefix`, by default
    /// `<namespace>/<name>:`.
    pub fn online_key_prefix(&self) -> String {
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or("features");
        self.spec
            .online
            .as_ref()
            .and_then(|online| online.redis.key_prefix.clone())
            .unwrap_or_else(|| format!("{namespace}/{name}:"))
    }
}

impl FeatureViewSpec {
    /// SHA-256 (hex) of the view's schema: its entities and features (names, types, columns, transforms and
    /// aggregations) as canonical JSON. It changes exactly when what a model reads from the view changes.
    pub fn schema_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::to_vec(&(&self.entities, &self.features)).unwrap_or_default();
        Sha256::digest(&canonical)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The rules OpenAPI cannot express on a 1.20 server (each mirrors a CEL rule or a cross-field check).
    pub fn validate(&self) -> Result<(), SpecViolations> {
        let mut violations = SpecViolations::default();
        if let Some(batch) = &self.source.batch {
            violations.check_storage_uri("spec.source.batch.uri", &batch.uri);
        }
        violations.check_storage_uri("spec.offline.uri", &self.offline.uri);
        let mut seen = std::collections::BTreeSet::new();
        for (index, feature) in self.features.iter().enumerate() {
            let field = format!("spec.features[{index}]");
            if !seen.insert(feature.name.as_str()) {
                violations.push(
                    format!("{field}.name"),
                    format!("duplicate feature name `{}`", feature.name),
                );
            }
            if feature.transform.is_some() && feature.aggregation.is_some() {
                violations.push(
                    &field,
                    "a feature has a transform or an aggregation, not both",
                );
            }
            match &feature.transform {
                Some(Transform::Bucketize(bucketize)) => {
                    if bucketize.boundaries.iter().any(|b| !b.is_finite())
                        || bucketize
                            .boundaries
                            .windows(2)
                            .any(|pair| pair[0] >= pair[1])
                    {
                        violations.push(
                            format!("{field}.transform.bucketize.boundaries"),
                            "boundaries must be finite and strictly increasing",
                        );
                    }
                }
                Some(Transform::Standardize(standardize)) => {
                    if !(standardize.std.is_finite()
                        && standardize.std > 0.0
                        && standardize.mean.is_finite())
                    {
                        violations.push(
                            format!("{field}.transform.standardize"),
                            "mean must be finite and std finite and positive",
                        );
                    }
                }
                Some(Transform::Cross(cross)) => {
                    for (position, crossed) in cross.features.iter().enumerate() {
                        if !self.features.iter().any(|f| &f.name == crossed) {
                            violations.push(
                                format!("{field}.transform.cross.features[{position}]"),
                                format!("`{crossed}` is not a feature of this view"),
                            );
                        }
                    }
                }
                Some(Transform::HashBucket(_) | Transform::Log1p(_)) | None => {}
            }
            if let Some(aggregation) = &feature.aggregation {
                violations
                    .check_duration(&format!("{field}.aggregation.window"), &aggregation.window);
            }
            if let Some(message) = feature.type_mismatch() {
                violations.push(format!("{field}.valueType"), message);
            }
        }
        if self.source.batch.is_none() && self.source.stream.is_none() {
            violations.push("spec.source", "set batch, stream or both");
        }
        violations.check_duration("spec.ttl", &self.ttl);
        if let Some(lookback) = self
            .materialization
            .as_ref()
            .and_then(|m| m.lookback.as_ref())
        {
            violations.check_duration("spec.materialization.lookback", lookback);
        }
        if let Some(timeout) = self
            .materialization
            .as_ref()
            .and_then(|m| m.timeout.as_ref())
        {
            violations.check_duration("spec.materialization.timeout", timeout);
        }
        violations.into_result()
    }
}
