//! Training and evaluation sets as Parquet: reading them into encoded examples through the model's feature
//! schema, and writing generated data. Every error names the file and the column.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array,
    LargeStringArray, RecordBatch, StringArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};
use flywheel_features::table;
use flywheel_ml::artifact::FeatureViewSource;
use flywheel_ml::schema::FeatureSchema;
use flywheel_ml::synthetic::Impression;
use flywheel_ml::train::EncodedDataset;
use flywheel_ml::transform::Value;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: column `{column}` is missing")]
    MissingColumn { path: PathBuf, column: String },
    #[error("{path}: column `{column}` has type {found}, which a feature cannot read")]
    UnsupportedType {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}: label column `{column}` row {row}: {problem}")]
    BadLabel {
        path: PathBuf,
        column: String,
        row: usize,
        problem: String,
    },
    #[error("{path}: row {row}: {source}")]
    Transform {
        path: PathBuf,
        row: usize,
        source: flywheel_ml::transform::TransformError,
    },
    #[error("{path}: the file holds no rows")]
    Empty { path: PathBuf },
    #[error(
        "{train} and {eval} were built from different FeatureViews or feature schemas ({train_view} and \
         {eval_view}): rebuild both from the same view"
    )]
    FeatureViewMismatch {
        train: PathBuf,
        eval: PathBuf,
        train_view: String,
        eval_view: String,
    },
}

/// Which columns hold the label (clicked or not) and the group for GAUC (e.g. the user).
#[derive(Clone, Debug)]
pub struct Columns {
    pub label: String,
    pub group: Option<String>,
}

/// A typed view of one Arrow column.
enum Column<'a> {
    Int64(&'a Int64Array),
    Int32(&'a Int32Array),
    Float64(&'a Float64Array),
    Float32(&'a Float32Array),
    Utf8(&'a StringArray),
    LargeUtf8(&'a LargeStringArray),
    Bool(&'a BooleanArray),
}

impl<'a> Column<'a> {
    fn of(array: &'a ArrayRef) -> Option<Column<'a>> {
        let any = array.as_any();
        Some(match array.data_type() {
            DataType::Int64 => Column::Int64(any.downcast_ref()?),
            DataType::Int32 => Column::Int32(any.downcast_ref()?),
            DataType::Float64 => Column::Float64(any.downcast_ref()?),
            DataType::Float32 => Column::Float32(any.downcast_ref()?),
            DataType::Utf8 => Column::Utf8(any.downcast_ref()?),
            DataType::LargeUtf8 => Column::LargeUtf8(any.downcast_ref()?),
            DataType::Boolean => Column::Bool(any.downcast_ref()?),
            _ => return None,
        })
    }

    fn value(&self, row: usize) -> Value<'a> {
        let null = match self {
            Column::Int64(a) => a.is_null(row),
            Column::Int32(a) => a.is_null(row),
            Column::Float64(a) => a.is_null(row),
            Column::Float32(a) => a.is_null(row),
            Column::Utf8(a) => a.is_null(row),
            Column::LargeUtf8(a) => a.is_null(row),
            Column::Bool(a) => a.is_null(row),
        };
        if null {
            return Value::Missing;
        }
        match self {
            Column::Int64(a) => Value::Int(a.value(row)),
            Column::Int32(a) => Value::Int(i64::from(a.value(row))),
            Column::Float64(a) => Value::Float(a.value(row)),
            Column::Float32(a) => Value::Float(f64::from(a.value(row))),
            Column::Utf8(a) => Value::Str(a.value(row)),
            Column::LargeUtf8(a) => Value::Str(a.value(row)),
            Column::Bool(a) => Value::Bool(a.value(row)),
        }
    }
}

/// The FeatureView whose features the training set `train` (and evaluation set `eval`) were joined from, as
/// `build-dataset` records it in their schema metadata; `None` for sets made any other way. Both sets must come
/// from the same view and schema, or the model would be evaluated on features it was not trained on.
pub fn feature_view_source(
    train: &Path,
    eval: &Path,
) -> Result<Option<FeatureViewSource>, DatasetError> {
    let (of_train, of_eval) = (recorded_feature_view(train)?, recorded_feature_view(eval)?);
    match (&of_train, &of_eval) {
        (Some(a), Some(b)) if a != b => Err(DatasetError::FeatureViewMismatch {
            train: train.to_owned(),
            eval: eval.to_owned(),
            train_view: format!("{}@{}", a.name, a.schema_hash),
            eval_view: format!("{}@{}", b.name, b.schema_hash),
        }),
        _ => Ok(of_train.or(of_eval)),
    }
}

fn recorded_feature_view(path: &Path) -> Result<Option<FeatureViewSource>, DatasetError> {
    let file = File::open(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| DatasetError::Parquet {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let metadata = builder.schema().metadata();
    Ok(metadata
        .get(table::FEATURE_VIEW_KEY)
        .zip(metadata.get(table::FEATURE_VIEW_SCHEMA_HASH_KEY))
        .map(|(name, schema_hash)| FeatureViewSource {
            name: name.clone(),
            schema_hash: schema_hash.clone(),
        }))
}

/// Reads `path` and encodes every row with `schema`.
pub fn read_encoded(
    path: &Path,
    schema: &FeatureSchema,
    columns: &Columns,
) -> Result<EncodedDataset, DatasetError> {
    let parquet_error = |message: String| DatasetError::Parquet {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parquet_error(e.to_string()))?
        .with_batch_size(8192)
        .build()
        .map_err(|e| parquet_error(e.to_string()))?;
    let inputs = input_columns(schema);
    let mut data = EncodedDataset {
        fields: schema.categorical().len(),
        numeric_width: schema.numeric().len(),
        ..EncodedDataset::default()
    };
    let mut row_buffer = flywheel_ml::schema::EncodedRow::default();
    let mut offset = 0;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_error(e.to_string()))?;
        let features: Vec<(&str, Column<'_>)> = inputs
            .iter()
            .map(|name| Ok((name.as_str(), column(path, &batch, name)?)))
            .collect::<Result<_, DatasetError>>()?;
        let label = column(path, &batch, &columns.label)?;
        let group = columns
            .group
            .as_deref()
            .map(|name| column(path, &batch, name))
            .transpose()?;
        for row in 0..batch.num_rows() {
            schema
                .encode_into(
                    |name| {
                        features
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map_or(Value::Missing, |(_, c)| c.value(row))
                    },
                    &mut row_buffer,
                )
                .map_err(|source| DatasetError::Transform {
                    path: path.to_owned(),
                    row: offset + row,
                    source,
                })?;
            data.categorical.extend_from_slice(&row_buffer.categorical);
            data.numeric.extend_from_slice(&row_buffer.numeric);
            data.labels.push(label_value(
                path,
                &columns.label,
                offset + row,
                label.value(row),
            )?);
            data.groups
                .push(group.as_ref().map_or(0, |g| group_key(g.value(row))));
        }
        offset += batch.num_rows();
    }
    if data.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// Columns the schema reads: every feature's own column, except crosses, which read their inputs.
fn input_columns(schema: &FeatureSchema) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for feature in &schema.features {
        match &feature.transform {
            Some(flywheel_ml::transform::Transform::Cross { features, .. }) => {
                names.extend(features.iter().cloned())
            }
            _ => names.push(feature.name.clone()),
        }
    }
    names.sort();
    names.dedup();
    names
}

fn column<'a>(path: &Path, batch: &'a RecordBatch, name: &str) -> Result<Column<'a>, DatasetError> {
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| DatasetError::MissingColumn {
            path: path.to_owned(),
            column: name.to_owned(),
        })?;
    Column::of(array).ok_or_else(|| DatasetError::UnsupportedType {
        path: path.to_owned(),
        column: name.to_owned(),
        found: array.data_type().to_string(),
    })
}

fn label_value(
    path: &Path,
    column: &str,
    row: usize,
    value: Value<'_>,
) -> Result<f32, DatasetError> {
    let bad = |problem: String| DatasetError::BadLabel {
        path: path.to_owned(),
        column: column.to_owned(),
        row,
        problem,
    };
    match value {
        Value::Bool(b) => Ok(if b { 1.0 } else { 0.0 }),
        Value::Int(0) => Ok(0.0),
        Value::Int(1) => Ok(1.0),
        Value::Float(f) if f == 0.0 || f == 1.0 => Ok(f as f32),
        Value::Float(f) if f.is_nan() => Err(bad("NaN; a label must be 0 or 1".to_owned())),
        Value::Missing => Err(bad("missing; a label must be 0 or 1".to_owned())),
        other => Err(bad(format!("{other:?} is not 0 or 1"))),
    }
}

fn group_key(value: Value<'_>) -> u64 {
    match value {
        Value::Int(i) => i as u64,
        Value::Str(s) => flywheel_ml::transform::hash_value("group", Value::Str(s)).unwrap_or(0),
        Value::Bool(b) => u64::from(b),
        Value::Float(f) => f.to_bits(),
        Value::Missing => 0,
    }
}

/// Writes generated impressions as Parquet (snappy), with the columns the synthetic schema reads plus
/// `timestamp`, `clicked` and `true_probability`.
pub fn write_impressions(path: &Path, impressions: &[Impression]) -> Result<(), DatasetError> {
    let ints = |f: fn(&Impression) -> i64| {
        Arc::new(Int64Array::from_iter_values(impressions.iter().map(f))) as ArrayRef
    };
    write_columns(
        path,
        vec![
            ("timestamp", ints(|i| i.timestamp)),
            ("user_id", ints(|i| i64::from(i.user_id))),
            ("item_id", ints(|i| i64::from(i.item_id))),
            ("category", ints(|i| i64::from(i.category))),
            ("age", ints(|i| i64::from(i.age))),
            (
                "gender",
                Arc::new(StringArray::from_iter_values(
                    impressions.iter().map(|i| i.gender),
                )),
            ),
            (
                "device",
                Arc::new(StringArray::from_iter_values(
                    impressions.iter().map(|i| i.device),
                )),
            ),
            ("hour", ints(|i| i64::from(i.hour))),
            (
                "price",
                Arc::new(Float64Array::from_iter_values(
                    impressions.iter().map(|i| i.price),
                )),
            ),
            (
                "clicked",
                Arc::new(BooleanArray::from(
                    impressions.iter().map(|i| i.clicked).collect::<Vec<_>>(),
                )),
            ),
            (
                "true_probability",
                Arc::new(Float64Array::from_iter_values(
                    impressions.iter().map(|i| i.true_probability),
                )),
            ),
        ],
    )
}

/// Writes encoded rows as model inputs, for tools outside Flywheel (the PyTorch reference) that must see
/// exactly the features this trainer sees: `c<i>` the bucket of categorical field i (`u64`), `x<j>` the
/// transformed numeric input j, `label` and `group`.
pub fn write_encoded(path: &Path, data: &EncodedDataset) -> Result<(), DatasetError> {
    let rows = data.len();
    let categorical_names: Vec<String> = (0..data.fields).map(|i| format!("c{i}")).collect();
    let numeric_names: Vec<String> = (0..data.numeric_width).map(|j| format!("x{j}")).collect();
    let mut columns: Vec<(&str, ArrayRef)> = Vec::new();
    for (i, name) in categorical_names.iter().enumerate() {
        let values = (0..rows).map(|row| data.categorical[row * data.fields + i]);
        columns.push((name, Arc::new(UInt64Array::from_iter_values(values))));
    }
    for (j, name) in numeric_names.iter().enumerate() {
        let values = (0..rows).map(|row| data.numeric[row * data.numeric_width + j]);
        columns.push((name, Arc::new(Float32Array::from_iter_values(values))));
    }
    columns.push((
        "label",
        Arc::new(Float32Array::from_iter_values(data.labels.iter().copied())),
    ));
    columns.push((
        "group",
        Arc::new(UInt64Array::from_iter_values(data.groups.iter().copied())),
    ));
    write_columns(path, columns)
}

/// Writes named columns of equal length as one Parquet file (snappy).
pub fn write_columns(path: &Path, columns: Vec<(&str, ArrayRef)>) -> Result<(), DatasetError> {
    let parquet_error = |message: String| DatasetError::Parquet {
        path: path.to_owned(),
        message,
    };
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(*name, array.data_type().clone(), array.null_count() > 0))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, array)| array).collect(),
    )
    .map_err(|e| parquet_error(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DatasetError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    let file = File::create(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))
        .map_err(|e| parquet_error(e.to_string()))?;
    writer
        .write(&batch)
        .map_err(|e| parquet_error(e.to_string()))?;
    writer.close().map_err(|e| parquet_error(e.to_string()))?;
    Ok(())
}
