//! The feature store core behind `FeatureView`, shared by the batch side (`flywheel-trainer materialize` and
//! `build-dataset`) and the streaming side (`flywheel-serving ingest`), so a feature has one meaning whether it
//! was computed from Parquet or from Kafka:
//!
//! - [`view`]: a FeatureView spec compiled into the features to compute;
//! - [`aggregate`]: feature values as of a time (last values, transforms, windowed aggregations);
//! - [`pit`]: point-in-time correct joins of labeled events with feature rows;
//! - [`samples`]: sample joining (impressions ← clicks ← conversions, attribution windows);
//! - [`stats`]: per-feature statistics and drift against a baseline;
//! - [`online`]: the Redis layout and its conditional, idempotent writes;
//! - `column`, `table` and `offline` (feature `parquet`): one Arrow column as the computations read it, the
//!   Parquet tables of the batch side, and a materialization computed over their columns.

pub mod aggregate;
#[cfg(feature = "parquet")]
pub mod column;
#[cfg(feature = "parquet")]
pub mod grouping;
#[cfg(feature = "parquet")]
pub mod offline;
pub mod online;
pub mod pit;
pub mod samples;
#[cfg(feature = "parquet")]
pub mod source;
pub mod stats;
#[cfg(feature = "parquet")]
pub mod table;
pub mod value;
pub mod view;

/// A hash map keyed without SipHash's cost: the keys (entity ids, categories) come from the user's own data.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use value::{EntityKey, FeatureValue, KeyPart};
pub use view::{CompiledFeature, FeatureKind, View, ViewError};
