//! A FeatureView spec compiled into what to compute: the features in dependency order (crosses after their
//! inputs), each with its source column, its kind and the type it yields.

use flywheel_crds::FeatureView;
use flywheel_crds::featureview::{
    AggregationFunction, EntityValueType, FeatureValueType, FeatureViewSpec,
    Transform as SpecTransform,
};
use flywheel_ml::transform::Transform;

/// Microseconds since the Unix epoch: every timestamp in this crate.
pub type Micros = i64;

pub const MICROS_PER_SECOND: i64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ViewError {
    #[error("the FeatureView manifest: {0}")]
    Manifest(String),
    /// The spec breaks the API's rules (the message names each field).
    #[error("{0}")]
    Spec(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ViewError {
    ViewError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct View {
    /// Join keys and their types, in spec order.
    pub entities: Vec<(String, EntityValueType)>,
    /// The event-time column of the source this view is computed from.
    pub timestamp_field: String,
    /// Features in computation order: every cross comes after the features it crosses.
    pub features: Vec<CompiledFeature>,
    /// How long a value stays valid after its event time.
    pub ttl: Micros,
    /// Prefix of the entity hashes in Redis.
    pub key_prefix: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompiledFeature {
    pub name: String,
    /// Source column (the feature's name unless the spec names one); unused by crosses.
    pub column: String,
    pub kind: FeatureKind,
    /// What the feature yields; the spec's declared type, checked against the kind.
    pub value_type: FeatureValueType,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FeatureKind {
    /// The entity's latest non-null value of the column.
    Last,
    /// A stateless transform of the latest value.
    Transform(Transform),
    /// A cross of other features' values, by their positions in [`View::features`].
    Cross {
        inputs: Vec<usize>,
        transform: Transform,
    },
    /// An aggregation of the column over the events of the trailing window `(t − window, t]`.
    Aggregate {
        function: AggregationFunction,
        window: Micros,
    },
}

/// A FeatureView manifest: JSON (as the operator passes it) or YAML (as a user writes it).
pub fn parse_manifest(text: &str) -> Result<FeatureView, ViewError> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| ViewError::Manifest(e.to_string()))
    } else {
        serde_saphyr::from_str(text).map_err(|e| ViewError::Manifest(e.to_string()))
    }
}

impl View {
    /// Compiles a manifest's spec; its Redis keys default to the prefix `<namespace>/<name>:`.
    pub fn of_manifest(manifest: &FeatureView, timestamp_field: &str) -> Result<View, ViewError> {
        View::compile(
            &manifest.spec,
            timestamp_field,
            &manifest.online_key_prefix(),
        )
    }

    /// Compiles `spec`, computed from a source whose event time is `timestamp_field`; `default_prefix` is the key
    /// prefix when the spec's Redis store names none. Fails naming the spec field on anything it cannot compute.
    pub fn compile(
        spec: &FeatureViewSpec,
        timestamp_field: &str,
        default_prefix: &str,
    ) -> Result<View, ViewError> {
        spec.validate()
            .map_err(|violations| ViewError::Spec(violations.to_string()))?;
        let ttl = micros_of(&spec.ttl, "spec.ttl")?;
        let mut features: Vec<CompiledFeature> = Vec::with_capacity(spec.features.len());
        let mut crosses = Vec::new();
        for (index, feature) in spec.features.iter().enumerate() {
            let field = format!("spec.features[{index}]");
            let column = feature
                .column
                .clone()
                .unwrap_or_else(|| feature.name.clone());
            let kind = match (&feature.transform, &feature.aggregation) {
                (Some(SpecTransform::Cross(_)), _) => {
                    crosses.push(index);
                    continue;
                }
                (Some(transform), _) => FeatureKind::Transform(ml_transform(transform)),
                (None, Some(aggregation)) => FeatureKind::Aggregate {
                    function: aggregation.function,
                    window: micros_of(&aggregation.window, &format!("{field}.aggregation.window"))?,
                },
                (None, None) => FeatureKind::Last,
            };
            features.push(CompiledFeature {
                name: feature.name.clone(),
                column,
                kind,
                value_type: feature.value_type,
            });
        }
        // Crosses of crosses resolve in as many passes as they nest.
        while !crosses.is_empty() {
            let before = crosses.len();
            let mut unresolved = Vec::new();
            for index in crosses {
                let feature = &spec.features[index];
                let Some(SpecTransform::Cross(cross)) = &feature.transform else {
                    continue;
                };
                let positions: Option<Vec<usize>> = cross
                    .features
                    .iter()
                    .map(|name| features.iter().position(|f| &f.name == name))
                    .collect();
                match positions {
                    Some(inputs) => {
                        let kind = FeatureKind::Cross {
                            inputs,
                            transform: Transform::Cross {
                                features: cross.features.clone(),
                                buckets: cross.buckets,
                            },
                        };
                        features.push(CompiledFeature {
                            name: feature.name.clone(),
                            column: feature.name.clone(),
                            kind,
                            value_type: feature.value_type,
                        });
                    }
                    None => unresolved.push(index),
                }
            }
            if unresolved.len() == before {
                return Err(invalid(
                    format!("spec.features[{}].transform.cross", unresolved[0]),
                    "crosses form a cycle",
                ));
            }
            crosses = unresolved;
        }
        let key_prefix = spec
            .online
            .as_ref()
            .and_then(|online| online.redis.key_prefix.clone())
            .unwrap_or_else(|| default_prefix.to_owned());
        Ok(View {
            entities: spec
                .entities
                .iter()
                .map(|entity| (entity.join_key.clone(), entity.value_type))
                .collect(),
            timestamp_field: timestamp_field.to_owned(),
            features,
            ttl,
            key_prefix,
        })
    }

    /// Source columns the features read (each once, in feature order).
    pub fn source_columns(&self) -> Vec<&str> {
        let mut columns: Vec<&str> = Vec::new();
        for feature in &self.features {
            if !matches!(feature.kind, FeatureKind::Cross { .. })
                && !columns.contains(&feature.column.as_str())
            {
                columns.push(&feature.column);
            }
        }
        columns
    }

    /// The longest aggregation window: how much history before a time its values depend on.
    pub fn longest_window(&self) -> Micros {
        self.features
            .iter()
            .filter_map(|feature| match feature.kind {
                FeatureKind::Aggregate { window, .. } => Some(window),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

fn micros_of(duration: &flywheel_crds::common::Duration, field: &str) -> Result<Micros, ViewError> {
    let parsed = duration
        .parse()
        .map_err(|error| invalid(field, error.to_string()))?;
    i64::try_from(parsed.as_micros()).map_err(|_| invalid(field, "too long"))
}

fn ml_transform(transform: &SpecTransform) -> Transform {
    match transform {
        SpecTransform::HashBucket(h) => Transform::HashBucket { buckets: h.buckets },
        SpecTransform::Bucketize(b) => Transform::Bucketize {
            boundaries: b.boundaries.clone(),
        },
        SpecTransform::Log1p(_) => Transform::Log1p {},
        SpecTransform::Standardize(s) => Transform::Standardize {
            mean: s.mean,
            std: s.std,
        },
        SpecTransform::Cross(c) => Transform::Cross {
            features: c.features.clone(),
            buckets: c.buckets,
        },
    }
}
