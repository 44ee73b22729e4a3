//! Feature values and entity keys.

use std::fmt;

use flywheel_ml::transform::Value;

/// One feature value. Integers stay integers so ids and counts survive the trip to Parquet and Redis exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureValue {
    Null,
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

impl FeatureValue {
    pub fn is_null(&self) -> bool {
        matches!(self, FeatureValue::Null)
    }

    /// The value as the ML core's transforms read it.
    pub fn as_ml(&self) -> Value<'_> {
        match self {
            FeatureValue::Null => Value::Missing,
            FeatureValue::Int(i) => Value::Int(*i),
            FeatureValue::Float(f) => Value::Float(*f),
            FeatureValue::Str(s) => Value::Str(s),
            FeatureValue::Bool(b) => Value::Bool(*b),
        }
    }

    /// The value as a number, for numeric statistics and aggregations; `None` for null and strings.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FeatureValue::Int(i) => Some(*i as f64),
            FeatureValue::Float(f) => Some(*f),
            FeatureValue::Bool(b) => Some(f64::from(u8::from(*b))),
            FeatureValue::Null | FeatureValue::Str(_) => None,
        }
    }

    /// The text stored in the online store (what `flywheel-serving` parses back); `None` for null, which is
    /// stored as an absent field.
    pub fn to_text(&self) -> Option<String> {
        match self {
            FeatureValue::Null => None,
            FeatureValue::Int(i) => Some(i.to_string()),
            FeatureValue::Float(f) => Some(f.to_string()),
            FeatureValue::Str(s) => Some(s.clone()),
            FeatureValue::Bool(b) => Some(b.to_string()),
        }
    }

    /// The value from a JSON event field; `None` for objects and arrays, which no scalar feature holds.
    pub fn from_json(value: &serde_json::Value) -> Option<FeatureValue> {
        Some(match value {
            serde_json::Value::Null => FeatureValue::Null,
            serde_json::Value::Bool(b) => FeatureValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => FeatureValue::Int(i),
                None => FeatureValue::Float(n.as_f64()?),
            },
            serde_json::Value::String(s) => FeatureValue::Str(s.clone()),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => return None,
        })
    }
}

/// One part of an entity key (the value of one join key).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyPart {
    Int(i64),
    Str(String),
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Int(i) => write!(f, "{i}"),
            KeyPart::Str(s) => f.write_str(s),
        }
    }
}

/// The values of a view's join keys, in the order the view lists its entities.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntityKey(pub Vec<KeyPart>);

impl fmt::Display for EntityKey {
    /// Parts joined by `:`, the suffix of the entity's Redis key; a single-entity key is just its value, which is
    /// what `flywheel-serving` looks up.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, part) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(":")?;
            }
            write!(f, "{part}")?;
        }
        Ok(())
    }
}
