//! Declarative feature transforms. Trainer and server both encode features through this one module, so a
//! model sees the same numbers in training and in serving.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// A raw feature value, as read from a training row or an inference request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Missing,
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bool(bool),
}

/// One transform, written as a single key like the FeatureView API (`hashBucket: {buckets: 100000}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Transform {
    /// Categorical: `xxh3_64(name ␟ value) mod buckets`; missing → the extra index `buckets`.
    HashBucket { buckets: u64 },
    /// Categorical: the number of boundaries ≤ x (n boundaries, n + 1 buckets); missing → index n + 1.
    Bucketize { boundaries: Vec<f64> },
    /// Numeric: ln(1 + max(x, 0)), for counts and prices; missing → 0.
    Log1p {},
    /// Numeric: (x − mean) / std; missing → 0 (the mean).
    Standardize { mean: f64, std: f64 },
    /// Categorical: the hash of the crossed features' values together, mod `buckets`; any missing → `buckets`.
    Cross { features: Vec<String>, buckets: u64 },
}

/// What a transform produces: an index into an embedding table, or a number for the dense input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoded {
    Categorical(u64),
    Numeric(f64),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransformError {
    #[error("feature `{feature}`: {transform} needs {expected}, got {got}")]
    WrongType {
        feature: String,
        transform: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error("feature `{feature}`: value is not a finite number")]
    NotFinite { feature: String },
    #[error("feature `{feature}`: a cross is encoded from its input features, not from one value")]
    CrossNeedsInputs { feature: String },
}

/// Separates name and value (and crossed values) in hash inputs; it cannot appear in a feature name.
const SEPARATOR: char = '\u{1f}';

impl Transform {
    /// Rows of the embedding table this transform indexes (missing included); `None` for numeric transforms.
    pub fn cardinality(&self) -> Option<u64> {
        match self {
            Transform::HashBucket { buckets } | Transform::Cross { buckets, .. } => {
                Some(buckets + 1)
            }
            Transform::Bucketize { boundaries } => Some(boundaries.len() as u64 + 2),
            Transform::Log1p {} | Transform::Standardize { .. } => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transform::HashBucket { .. } => "hashBucket",
            Transform::Bucketize { .. } => "bucketize",
            Transform::Log1p {} => "log1p",
            Transform::Standardize { .. } => "standardize",
            Transform::Cross { .. } => "cross",
        }
    }

    /// Encodes one value of feature `feature`. Crosses go through [`Transform::apply_cross`].
    pub fn apply(&self, feature: &str, value: Value<'_>) -> Result<Encoded, TransformError> {
        match self {
            Transform::HashBucket { buckets } => Ok(Encoded::Categorical(match value {
                Value::Missing => *buckets,
                value => hash_value(feature, value)? % buckets,
            })),
            Transform::Bucketize { boundaries } => Ok(Encoded::Categorical(match value {
                Value::Missing => boundaries.len() as u64 + 1,
                value => {
                    let x = self.number(feature, value)?;
                    boundaries.partition_point(|boundary| *boundary <= x) as u64
                }
            })),
            Transform::Log1p {} => Ok(Encoded::Numeric(match value {
                Value::Missing => 0.0,
                value => self.number(feature, value)?.max(0.0).ln_1p(),
            })),
            Transform::Standardize { mean, std } => Ok(Encoded::Numeric(match value {
                Value::Missing => 0.0,
                value => (self.number(feature, value)? - mean) / std,
            })),
            Transform::Cross { .. } => Err(TransformError::CrossNeedsInputs {
                feature: feature.to_owned(),
            }),
        }
    }

    /// Encodes a cross from the values of its input features, in the order the transform lists them.
    pub fn apply_cross(
        &self,
        feature: &str,
        values: &[Value<'_>],
    ) -> Result<Encoded, TransformError> {
        let Transform::Cross { features, buckets } = self else {
            return Err(TransformError::WrongType {
                feature: feature.to_owned(),
                transform: self.name(),
                expected: "one value",
                got: "several",
            });
        };
        if values.contains(&Value::Missing) {
            return Ok(Encoded::Categorical(*buckets));
        }
        let mut key = String::new();
        for (name, value) in features.iter().zip(values) {
            if !key.is_empty() {
                key.push(SEPARATOR);
            }
            key.push_str(name);
            key.push(SEPARATOR);
            push_canonical(&mut key, feature, *value)?;
        }
        Ok(Encoded::Categorical(xxh3_64(key.as_bytes()) % buckets))
    }

    fn number(&self, feature: &str, value: Value<'_>) -> Result<f64, TransformError> {
        let x = match value {
            Value::Int(i) => i as f64,
            Value::Float(f) => f,
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Str(_) | Value::Missing => {
                return Err(TransformError::WrongType {
                    feature: feature.to_owned(),
                    transform: self.name(),
                    expected: "a number",
                    got: type_name(value),
                });
            }
        };
        if x.is_finite() {
            Ok(x)
        } else {
            Err(TransformError::NotFinite {
                feature: feature.to_owned(),
            })
        }
    }
}

/// `xxh3_64` of `name ␟ canonical(value)`: stable across runs, machines and languages (the Python reference
/// uses the `xxhash` package).
pub fn hash_value(feature: &str, value: Value<'_>) -> Result<u64, TransformError> {
    let mut key = String::with_capacity(feature.len() + 24);
    key.push_str(feature);
    key.push(SEPARATOR);
    push_canonical(&mut key, feature, value)?;
    Ok(xxh3_64(key.as_bytes()))
}

/// Integers in decimal, floats in Rust's shortest round-trip form, booleans as `true`/`false`, strings as is.
fn push_canonical(key: &mut String, feature: &str, value: Value<'_>) -> Result<(), TransformError> {
    use std::fmt::Write;
    match value {
        Value::Int(i) => {
            let _ = write!(key, "{i}");
        }
        Value::Float(f) if f.is_finite() => {
            let _ = write!(key, "{f}");
        }
        Value::Float(_) => {
            return Err(TransformError::NotFinite {
                feature: feature.to_owned(),
            });
        }
        Value::Str(s) => key.push_str(s),
        Value::Bool(b) => key.push_str(if b { "true" } else { "false" }),
        Value::Missing => {}
    }
    Ok(())
}

pub fn type_name(value: Value<'_>) -> &'static str {
    match value {
        Value::Missing => "missing",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bool(_) => "a boolean",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketize_counts_boundaries_at_or_below() {
        let t = Transform::Bucketize {
            boundaries: vec![18.0, 25.0, 35.0],
        };
        let index = |x: f64| t.apply("age", Value::Float(x));
        assert_eq!(index(10.0), Ok(Encoded::Categorical(0)));
        assert_eq!(index(18.0), Ok(Encoded::Categorical(1)));
        assert_eq!(index(30.0), Ok(Encoded::Categorical(2)));
        assert_eq!(index(99.0), Ok(Encoded::Categorical(3)));
        assert_eq!(t.apply("age", Value::Missing), Ok(Encoded::Categorical(4)));
        assert_eq!(t.cardinality(), Some(5));
    }

    #[test]
    fn numeric_transforms_refuse_strings_and_nan() {
        let t = Transform::Log1p {};
        assert_eq!(
            t.apply("price", Value::Float(-3.0)),
            Ok(Encoded::Numeric(0.0))
        );
        assert!(matches!(
            t.apply("price", Value::Str("x")),
            Err(TransformError::WrongType { .. })
        ));
        assert_eq!(
            t.apply("price", Value::Float(f64::NAN)),
            Err(TransformError::NotFinite {
                feature: "price".into()
            })
        );
        let s = Transform::Standardize {
            mean: 10.0,
            std: 2.0,
        };
        assert_eq!(s.apply("x", Value::Int(14)), Ok(Encoded::Numeric(2.0)));
    }

    #[test]
    fn hashing_depends_on_the_feature_name_and_reserves_missing() {
        let t = Transform::HashBucket { buckets: 1000 };
        let a = t.apply("user_id", Value::Str("42"));
        assert_eq!(
            a,
            t.apply("user_id", Value::Int(42)),
            "42 and \"42\" are one id"
        );
        assert_ne!(a, t.apply("item_id", Value::Int(42)));
        assert_eq!(
            t.apply("user_id", Value::Missing),
            Ok(Encoded::Categorical(1000))
        );
    }

    #[test]
    fn cross_of_missing_is_the_reserved_bucket() {
        let t = Transform::Cross {
            features: vec!["a".into(), "b".into()],
            buckets: 50,
        };
        assert_eq!(
            t.apply_cross("ab", &[Value::Int(1), Value::Missing]),
            Ok(Encoded::Categorical(50))
        );
        let both = t.apply_cross("ab", &[Value::Int(1), Value::Str("x")]);
        assert!(matches!(both, Ok(Encoded::Categorical(i)) if i < 50));
    }
}
