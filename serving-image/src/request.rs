//! Inference inputs, protocol-independent: the typed feature columns a REST or gRPC request carries, their
//! validation against the model's schema, and their encoding through the model's own transforms (the same
//! `ml` code the trainer used, so a row scores as it did offline).

use flywheel_ml::schema::{FeatureSchema, ValueType};
use flywheel_ml::train::EncodedDataset;
use flywheel_ml::transform::{TransformError, Value};

/// One input tensor's values, flattened (row-major).
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    Int(Vec<i64>),
    Float(Vec<f64>),
    Str(Vec<String>),
    Bool(Vec<bool>),
    /// Values already typed by the schema, possibly missing (filled from the online store).
    Values(Vec<OwnedValue>),
}

/// A raw feature value that owns its text.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedValue {
    Missing,
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

impl std::fmt::Display for OwnedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OwnedValue::Missing => Ok(()),
            OwnedValue::Int(v) => write!(f, "{v}"),
            OwnedValue::Float(v) => write!(f, "{v}"),
            OwnedValue::Str(v) => f.write_str(v),
            OwnedValue::Bool(v) => write!(f, "{v}"),
        }
    }
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Str(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::Values(v) => v.len(),
        }
    }

    fn value(&self, row: usize) -> Value<'_> {
        match self {
            Column::Int(v) => v.get(row).map_or(Value::Missing, |x| Value::Int(*x)),
            Column::Float(v) => v.get(row).map_or(Value::Missing, |x| Value::Float(*x)),
            Column::Str(v) => v.get(row).map_or(Value::Missing, |x| Value::Str(x)),
            Column::Bool(v) => v.get(row).map_or(Value::Missing, |x| Value::Bool(*x)),
            Column::Values(v) => match v.get(row) {
                None | Some(OwnedValue::Missing) => Value::Missing,
                Some(OwnedValue::Int(x)) => Value::Int(*x),
                Some(OwnedValue::Float(x)) => Value::Float(*x),
                Some(OwnedValue::Str(x)) => Value::Str(x),
                Some(OwnedValue::Bool(x)) => Value::Bool(*x),
            },
        }
    }
}

/// A named input tensor as a protocol delivered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub name: String,
    pub shape: Vec<i64>,
    pub column: Column,
}

/// A caller's request id is remembered with every row of its request for the attribution window: longer ids
/// are refused rather than held.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The decoded body of an inference request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferRequest {
    /// The caller's request id; predictions are fed back by it.
    pub id: Option<String>,
    pub inputs: Vec<Input>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request body: {0}")]
    Body(String),
    #[error("request has no inputs")]
    NoInputs,
    #[error("request id is {len} bytes; at most {MAX_REQUEST_ID_BYTES} are accepted")]
    IdTooLong { len: usize },
    #[error("input `{0}` is given twice")]
    Duplicate(String),
    #[error("input `{0}` is not a feature of this model")]
    Unknown(String),
    #[error("input `{0}` is missing")]
    Missing(String),
    #[error("input `{input}`: {message}")]
    Shape { input: String, message: String },
    #[error("input `{input}`: datatype {got} does not fit feature type {expected}")]
    Datatype {
        input: String,
        expected: &'static str,
        got: String,
    },
    #[error("input `{input}` has {got} rows, other inputs have {expected}")]
    Rows {
        input: String,
        got: usize,
        expected: usize,
    },
    #[error("input `{input}`: {message}")]
    BadValue { input: String, message: String },
    #[error("batch of {rows} rows exceeds the limit of {limit}")]
    TooManyRows { rows: usize, limit: usize },
    #[error("{0}")]
    Transform(#[from] TransformError),
}

/// The Open Inference Protocol datatype names Flywheel accepts, and which column each decodes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Int,
    Float,
    Bytes,
}

impl Datatype {
    pub fn parse(name: &str) -> Option<Datatype> {
        Some(match name {
            "BOOL" => Datatype::Bool,
            "INT8" | "INT16" | "INT32" | "INT64" | "UINT8" | "UINT16" | "UINT32" | "UINT64" => {
                Datatype::Int
            }
            "FP32" | "FP64" => Datatype::Float,
            "BYTES" => Datatype::Bytes,
            _ => return None,
        })
    }
}

/// The datatype a client should send for a feature type (what model metadata advertises).
pub fn datatype_of(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::Int64 => "INT64",
        ValueType::Float64 => "FP64",
        ValueType::String => "BYTES",
        ValueType::Bool => "BOOL",
    }
}

/// Rows in a tensor of `shape`: `[n]` or `[n, 1]` with n ≥ 1 (one value per example).
pub fn rows_of_shape(input: &str, shape: &[i64]) -> Result<usize, RequestError> {
    let shape_error = |message: String| RequestError::Shape {
        input: input.to_owned(),
        message,
    };
    let rows = match shape {
        [n] | [n, 1] => *n,
        _ => {
            return Err(shape_error(format!(
                "shape {shape:?} is not [batch] or [batch, 1]"
            )));
        }
    };
    usize::try_from(rows)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| shape_error(format!("batch size {rows} must be positive")))
}

/// Input features of a schema: everything but crosses, which are computed from other inputs.
pub fn input_features(schema: &FeatureSchema) -> impl Iterator<Item = (&str, ValueType)> {
    schema.inputs()
}

fn fits(value_type: ValueType, column: &Column) -> bool {
    matches!(
        (value_type, column),
        (ValueType::Int64, Column::Int(_))
            | (ValueType::Float64, Column::Float(_) | Column::Int(_))
            | (ValueType::String, Column::Str(_))
            | (ValueType::Bool, Column::Bool(_))
            | (_, Column::Values(_))
    )
}

fn column_type_name(column: &Column) -> &'static str {
    match column {
        Column::Int(_) => "an integer type",
        Column::Float(_) => "a floating-point type",
        Column::Str(_) => "BYTES",
        Column::Bool(_) => "BOOL",
        Column::Values(_) => "online store values",
    }
}

fn feature_type_name(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::Int64 => "Int64",
        ValueType::Float64 => "Float64",
        ValueType::String => "String",
        ValueType::Bool => "Bool",
    }
}

/// Checks `request` against `schema` (every input feature present exactly once, no unknown inputs, types that
/// fit, one row count within `max_rows`) and encodes its rows with the schema's transforms.
pub fn encode(
    schema: &FeatureSchema,
    request: &InferRequest,
    max_rows: usize,
) -> Result<EncodedDataset, RequestError> {
    if request.inputs.is_empty() {
        return Err(RequestError::NoInputs);
    }
    if let Some(id) = &request.id
        && id.len() > MAX_REQUEST_ID_BYTES
    {
        return Err(RequestError::IdTooLong { len: id.len() });
    }
    let features: Vec<(&str, ValueType)> = input_features(schema).collect();
    let mut columns: Vec<Option<&Column>> = vec![None; features.len()];
    let mut rows = None;
    for input in &request.inputs {
        let Some(position) = features.iter().position(|(name, _)| *name == input.name) else {
            return Err(RequestError::Unknown(input.name.clone()));
        };
        if columns[position].is_some() {
            return Err(RequestError::Duplicate(input.name.clone()));
        }
        let value_type = features[position].1;
        if !fits(value_type, &input.column) {
            return Err(RequestError::Datatype {
                input: input.name.clone(),
                expected: feature_type_name(value_type),
                got: column_type_name(&input.column).to_owned(),
            });
        }
        let shape_rows = rows_of_shape(&input.name, &input.shape)?;
        if input.column.len() != shape_rows {
            return Err(RequestError::Shape {
                input: input.name.clone(),
                message: format!(
                    "shape {:?} needs {shape_rows} values, got {}",
                    input.shape,
                    input.column.len()
                ),
            });
        }
        match rows {
            None => rows = Some(shape_rows),
            Some(expected) if expected != shape_rows => {
                return Err(RequestError::Rows {
                    input: input.name.clone(),
                    got: shape_rows,
                    expected,
                });
            }
            Some(_) => {}
        }
        columns[position] = Some(&input.column);
    }
    if let Some(missing) = columns.iter().position(Option::is_none) {
        return Err(RequestError::Missing(features[missing].0.to_owned()));
    }
    let rows = rows.unwrap_or(0);
    if rows > max_rows {
        return Err(RequestError::TooManyRows {
            rows,
            limit: max_rows,
        });
    }
    let mut data = EncodedDataset {
        fields: schema.categorical().len(),
        numeric_width: schema.numeric().len(),
        ..EncodedDataset::default()
    };
    data.categorical.reserve(rows * data.fields);
    data.numeric.reserve(rows * data.numeric_width);
    let mut encoded = flywheel_ml::schema::EncodedRow::default();
    for row in 0..rows {
        schema.encode_into(
            |name| {
                features
                    .iter()
                    .position(|(feature, _)| *feature == name)
                    .and_then(|i| columns[i])
                    .map_or(Value::Missing, |column| column.value(row))
            },
            &mut encoded,
        )?;
        data.categorical.extend_from_slice(&encoded.categorical);
        data.numeric.extend_from_slice(&encoded.numeric);
        data.labels.push(0.0);
        data.groups.push(0);
    }
    Ok(data)
}

/// Each row's input features as they were scored: the request's values and those filled from the online store,
/// typed by the schema (an integer given for a Float64 feature is logged as a float), a missing value absent. The
/// prediction log carries these, so a training set built from served traffic holds exactly what was scored.
pub fn served_rows(
    schema: &FeatureSchema,
    request: &InferRequest,
    rows: usize,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut served = vec![serde_json::Map::new(); rows];
    for (name, value_type) in input_features(schema) {
        let Some(input) = request.inputs.iter().find(|input| input.name == name) else {
            continue;
        };
        for (row, values) in served.iter_mut().enumerate() {
            let logged = match (value_type, input.column.value(row)) {
                (_, Value::Missing) => continue,
                (ValueType::Float64, Value::Int(v)) => serde_json::Value::from(v as f64),
                (_, Value::Int(v)) => serde_json::Value::from(v),
                (_, Value::Float(v)) => serde_json::Value::from(v),
                (_, Value::Str(v)) => serde_json::Value::from(v),
                (_, Value::Bool(v)) => serde_json::Value::from(v),
            };
            values.insert(name.to_owned(), logged);
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_ml::synthetic::feature_schema;

    fn column_for(name: &str, rows: usize) -> Column {
        match name {
            "gender" | "device" => Column::Str((0..rows).map(|i| format!("{name}{i}")).collect()),
            "price" => Column::Float(vec![9.5; rows]),
            _ => Column::Int(vec![3; rows]),
        }
    }

    fn request(rows: usize) -> InferRequest {
        let schema = feature_schema(1000);
        InferRequest {
            id: Some("r1".into()),
            inputs: input_features(&schema)
                .map(|(name, _)| Input {
                    name: name.to_owned(),
                    shape: vec![rows as i64],
                    column: column_for(name, rows),
                })
                .collect(),
        }
    }

    #[test]
    fn served_rows_carry_each_input_typed_by_the_schema_and_leave_missing_values_out() {
        let schema = feature_schema(1000);
        let mut request = request(2);
        for input in &mut request.inputs {
            match input.name.as_str() {
                // An integer given for the float feature is logged as the float it was scored as.
                "price" => input.column = Column::Int(vec![9, 10]),
                "age" => {
                    input.column = Column::Values(vec![OwnedValue::Int(30), OwnedValue::Missing]);
                }
                _ => {}
            }
        }
        let rows = served_rows(&schema, &request, 2);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["price"], serde_json::json!(9.0));
        assert!(rows[0]["price"].is_f64());
        assert_eq!(rows[0]["gender"], serde_json::json!("gender0"));
        assert_eq!(rows[1]["device"], serde_json::json!("device1"));
        assert_eq!(rows[0]["age"], serde_json::json!(30));
        assert!(!rows[1].contains_key("age"), "a missing value is absent");
        assert_eq!(
            rows[0].len(),
            input_features(&schema).count(),
            "every input, no cross"
        );
    }

    #[test]
    fn a_complete_request_encodes_every_row() {
        let schema = feature_schema(1000);
        let data = encode(&schema, &request(3), 10).unwrap_or_default();
        assert_eq!(data.len(), 3);
        assert_eq!(data.categorical.len(), 3 * schema.categorical().len());
        assert_eq!(data.numeric.len(), 3 * schema.numeric().len());
    }

    #[test]
    fn every_bad_input_names_the_input() {
        let schema = feature_schema(1000);
        let check = |mutate: &dyn Fn(&mut InferRequest), expected: &str| {
            let mut bad = request(2);
            mutate(&mut bad);
            let message = encode(&schema, &bad, 10)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message} lacks {expected}");
        };
        check(
            &|r| r.inputs.retain(|i| i.name != "hour"),
            "`hour` is missing",
        );
        check(
            &|r| {
                r.inputs.push(Input {
                    name: "colour".into(),
                    shape: vec![2],
                    column: Column::Int(vec![1, 2]),
                })
            },
            "`colour` is not a feature",
        );
        check(
            &|r| r.inputs[0].column = Column::Float(vec![1.0, 2.0]),
            "datatype a floating-point type does not fit feature type Int64",
        );
        check(&|r| r.inputs[0].shape = vec![2, 3], "is not [batch]");
        check(&|r| r.inputs[0].shape = vec![3], "needs 3 values, got 2");
        check(
            &|r| {
                for input in &mut r.inputs {
                    if input.name == "price" {
                        input.column = Column::Float(vec![f64::NAN, 1.0]);
                    }
                }
            },
            "`price`: value is not a finite number",
        );
        let duplicated = |r: &mut InferRequest| {
            let first = r.inputs[0].clone();
            r.inputs.push(first);
        };
        check(&duplicated, "given twice");
        let limit = encode(&schema, &request(11), 10).map(|_| ());
        assert_eq!(
            limit,
            Err(RequestError::TooManyRows {
                rows: 11,
                limit: 10
            })
        );
        assert_eq!(
            encode(&schema, &InferRequest::default(), 10).map(|_| ()),
            Err(RequestError::NoInputs)
        );
    }
}
