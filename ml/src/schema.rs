//! The feature schema of a model: which features it reads, of what type, through which transform. Its hash is
//! recorded in every artifact and ModelVersion, and a server refuses to score inputs of another schema.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::transform::{Encoded, Transform, TransformError, Value};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    Int64,
    Float64,
    String,
    Bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FeatureSpec {
    pub name: String,
    pub value_type: ValueType,
    /// Stateless transform; numbers without one enter the dense input as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct FeatureSchema {
    pub features: Vec<FeatureSpec>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("feature `{0}` is listed twice")]
    Duplicate(String),
    #[error("feature `{feature}`: {message}")]
    Invalid { feature: String, message: String },
}

/// A row after the transforms: one embedding index per categorical feature, one number per numeric feature,
/// each in schema order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedRow {
    pub categorical: Vec<u64>,
    pub numeric: Vec<f32>,
}

impl FeatureSchema {
    /// Checks the rules a model needs: unique names, known cross inputs, sorted boundaries, positive std, and a
    /// transform for every string feature (strings have no numeric value).
    pub fn validate(&self) -> Result<(), SchemaError> {
        let mut seen = std::collections::BTreeSet::new();
        for feature in &self.features {
            if !seen.insert(feature.name.as_str()) {
                return Err(SchemaError::Duplicate(feature.name.clone()));
            }
            let invalid = |message: &str| SchemaError::Invalid {
                feature: feature.name.clone(),
                message: message.to_owned(),
            };
            match &feature.transform {
                None if feature.value_type == ValueType::String => {
                    return Err(invalid(
                        "a string feature needs a hashBucket or cross transform",
                    ));
                }
                Some(Transform::HashBucket { buckets } | Transform::Cross { buckets, .. })
                    if *buckets == 0 =>
                {
                    return Err(invalid("buckets must be positive"));
                }
                Some(Transform::Bucketize { boundaries })
                    if boundaries.iter().any(|b| !b.is_finite())
                        || boundaries.windows(2).any(|w| w[0] >= w[1]) =>
                {
                    return Err(invalid("boundaries must be finite and strictly increasing"));
                }
                Some(Transform::Standardize { mean, std })
                    if !(mean.is_finite() && std.is_finite() && *std > 0.0) =>
                {
                    return Err(invalid("mean must be finite and std finite and positive"));
                }
                Some(Transform::Cross { features, .. }) => {
                    if let Some(unknown) = features
                        .iter()
                        .find(|name| !self.features.iter().any(|f| &f.name == *name))
                    {
                        return Err(invalid(&format!("crosses unknown feature `{unknown}`")));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// SHA-256 (hex) of the schema's canonical JSON: names, types and transforms in order.
    pub fn hash(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// `(name, type)` of each input feature: everything a row must carry, which is every feature but the
    /// crosses (computed from other inputs).
    pub fn inputs(&self) -> impl Iterator<Item = (&str, ValueType)> {
        self.features
            .iter()
            .filter(|f| !matches!(f.transform, Some(Transform::Cross { .. })))
            .map(|f| (f.name.as_str(), f.value_type))
    }

    /// `(name, rows)` of each categorical feature: the embedding tables a model needs.
    pub fn categorical(&self) -> Vec<(&str, u64)> {
        self.features
            .iter()
            .filter_map(|f| Some((f.name.as_str(), f.transform.as_ref()?.cardinality()?)))
            .collect()
    }

    /// Names of the numeric (dense) features.
    pub fn numeric(&self) -> Vec<&str> {
        self.features
            .iter()
            .filter(|f| is_numeric(f))
            .map(|f| f.name.as_str())
            .collect()
    }

    /// Encodes one row; `value_of(name)` gives the raw value of an input feature.
    pub fn encode<'a>(
        &self,
        value_of: impl Fn(&str) -> Value<'a>,
    ) -> Result<EncodedRow, TransformError> {
        let mut row = EncodedRow::default();
        self.encode_into(value_of, &mut row)?;
        Ok(row)
    }

    /// Like [`FeatureSchema::encode`], reusing `row`'s buffers.
    pub fn encode_into<'a>(
        &self,
        value_of: impl Fn(&str) -> Value<'a>,
        row: &mut EncodedRow,
    ) -> Result<(), TransformError> {
        row.categorical.clear();
        row.numeric.clear();
        for feature in &self.features {
            let encoded = match &feature.transform {
                Some(cross @ Transform::Cross { features, .. }) => {
                    let inputs: Vec<Value<'a>> =
                        features.iter().map(|name| value_of(name)).collect();
                    cross.apply_cross(&feature.name, &inputs)?
                }
                Some(transform) => transform.apply(&feature.name, value_of(&feature.name))?,
                None => raw_numeric(&feature.name, value_of(&feature.name))?,
            };
            match encoded {
                Encoded::Categorical(index) => row.categorical.push(index),
                Encoded::Numeric(x) => row.numeric.push(x as f32),
            }
        }
        Ok(())
    }
}

fn is_numeric(feature: &FeatureSpec) -> bool {
    match &feature.transform {
        Some(transform) => transform.cardinality().is_none(),
        None => feature.value_type != ValueType::String,
    }
}

fn raw_numeric(feature: &str, value: Value<'_>) -> Result<Encoded, TransformError> {
    let x = match value {
        Value::Missing => 0.0,
        Value::Int(i) => i as f64,
        Value::Float(f) => f,
        Value::Bool(b) => f64::from(u8::from(b)),
        Value::Str(_) => {
            return Err(TransformError::WrongType {
                feature: feature.to_owned(),
                transform: "none",
                expected: "a number",
                got: "a string",
            });
        }
    };
    if x.is_finite() {
        Ok(Encoded::Numeric(x))
    } else {
        Err(TransformError::NotFinite {
            feature: feature.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> FeatureSchema {
        serde_json::from_value(serde_json::json!({"features": [
            {"name": "user_id", "valueType": "String", "transform": {"hashBucket": {"buckets": 100}}},
            {"name": "age", "valueType": "Int64", "transform": {"bucketize": {"boundaries": [18.0, 30.0]}}},
            {"name": "price", "valueType": "Float64", "transform": {"log1p": {}}},
            {"name": "hour", "valueType": "Int64"},
            {"name": "user_x_age", "valueType": "String", "transform": {"cross": {"features": ["user_id", "age"], "buckets": 50}}},
        ]}))
        .unwrap_or_default()
    }

    #[test]
    fn schema_splits_categorical_and_numeric_in_order() {
        let schema = schema();
        assert_eq!(schema.validate(), Ok(()));
        assert_eq!(
            schema.categorical(),
            vec![("user_id", 101), ("age", 4), ("user_x_age", 51)]
        );
        assert_eq!(schema.numeric(), vec!["price", "hour"]);
        let row = schema
            .encode(|name| match name {
                "user_id" => Value::Str("u1"),
                "age" => Value::Int(25),
                "price" => Value::Float(0.0),
                "hour" => Value::Int(13),
                _ => Value::Missing,
            })
            .unwrap_or_default();
        assert_eq!(row.categorical.len(), 3);
        assert_eq!(row.categorical[1], 1);
        assert_eq!(row.numeric, vec![0.0, 13.0]);
    }

    #[test]
    fn the_hash_follows_every_change() {
        let a = schema();
        let mut b = schema();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
        b.features[1].transform = Some(Transform::Bucketize {
            boundaries: vec![18.0, 31.0],
        });
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn invalid_schemas_name_the_feature() {
        let mut s = schema();
        s.features[4].transform = Some(Transform::Cross {
            features: vec!["nope".into()],
            buckets: 5,
        });
        assert!(
            matches!(s.validate(), Err(SchemaError::Invalid { feature, .. }) if feature == "user_x_age")
        );
        let mut s = schema();
        s.features[0].transform = None;
        assert!(
            matches!(s.validate(), Err(SchemaError::Invalid { feature, .. }) if feature == "user_id")
        );
    }
}
