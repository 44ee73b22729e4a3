//! The Parquet tables of the batch side: source events in, the offline feature table (partitioned by event
//! date) out and back in, and labeled events with features joined on. Every error names the file and column.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::Int64Builder;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow_buffer::ScalarBuffer;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use flywheel_crds::featureview::{EntityValueType, FeatureValueType};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rayon::iter::{IntoParallelRefIterator, ParallelIterator};

use crate::aggregate::owned;
use crate::column::Column;
use crate::value::{EntityKey, FeatureValue, KeyPart};
use crate::view::{Micros, View};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: column `{column}` is missing")]
    MissingColumn { path: PathBuf, column: String },
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    #[error("{path}: column `{column}` row {row}: {problem}")]
    BadValue {
        path: PathBuf,
        column: String,
        row: usize,
        problem: String,
    },
    #[error("{path}: holds no Parquet rows")]
    Empty { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TableError + '_ {
    move |source| TableError::Io {
        path: path.to_owned(),
        source,
    }
}

fn parquet_error(path: &Path, message: impl ToString) -> TableError {
    TableError::Parquet {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The Parquet files of `path`: itself if a file, else every `*.parquet` below it, in path order.
pub fn parquet_files(path: &Path) -> Result<Vec<PathBuf>, TableError> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let entry_path = entry.path();
            if entry.file_type().map_err(io(&entry_path))?.is_dir() {
                pending.push(entry_path);
            } else if entry_path.extension().is_some_and(|e| e == "parquet") {
                files.push(entry_path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every record batch of one file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    batch_reader(path)?.collect()
}

/// The record batches of one file, decoded as they are asked for: a training set is encoded batch by batch,
/// never held whole.
pub fn batch_reader(
    path: &Path,
) -> Result<impl Iterator<Item = Result<RecordBatch, TableError>> + '_, TableError> {
    let file = File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|builder| builder.with_batch_size(64 * 1024).build())
        .map_err(|e| parquet_error(path, e))?;
    Ok(reader.map(move |batch| batch.map_err(|e| parquet_error(path, e))))
}

/// The key-value metadata of a file's schema (e.g. [`FEATURE_VIEW_KEY`]), read from its footer only.
pub fn schema_metadata(path: &Path) -> Result<HashMap<String, String>, TableError> {
    let file = File::open(path).map_err(io(path))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(path, e))?;
    Ok(builder
        .schema()
        .metadata()
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect())
}

/// The record batches of one file, holding only those of the columns `names` the file has. Column chunks decode
/// independently, so each column is read on its own core, in batches as large as the file (no concatenation
/// follows).
pub fn read_columns(path: &Path, names: &[&str]) -> Result<Vec<RecordBatch>, TableError> {
    let open = || File::open(path).map_err(io(path));
    let metadata = ArrowReaderMetadata::load(&open()?, ArrowReaderOptions::default())
        .map_err(|e| parquet_error(path, e))?;
    let roots: Vec<usize> = names
        .iter()
        .filter_map(|name| metadata.schema().index_of(name).ok())
        .collect();
    let rows = usize::try_from(metadata.metadata().file_metadata().num_rows())
        .unwrap_or_default()
        .max(1);
    let read = |roots: Vec<usize>| -> Result<Vec<RecordBatch>, TableError> {
        let mask = ProjectionMask::roots(metadata.parquet_schema(), roots);
        ParquetRecordBatchReaderBuilder::new_with_metadata(open()?, metadata.clone())
            .with_projection(mask)
            .with_batch_size(rows)
            .build()
            .map_err(|e| parquet_error(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| parquet_error(path, e))
    };
    if roots.len() <= 1 {
        return read(roots);
    }
    let per_column: Vec<Vec<RecordBatch>> = roots
        .par_iter()
        .map(|&root| read(vec![root]))
        .collect::<Result<_, _>>()?;
    let batches = per_column.first().map_or(0, Vec::len);
    (0..batches)
        .map(|i| {
            let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = per_column
                .iter()
                .filter_map(|column| column.get(i))
                .map(|batch| (batch.schema().field(0).clone(), batch.column(0).clone()))
                .unzip();
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .map_err(|e| parquet_error(path, e))
        })
        .collect()
}

fn column<'a>(batch: &'a RecordBatch, path: &Path, name: &str) -> Result<&'a ArrayRef, TableError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| TableError::MissingColumn {
            path: path.to_owned(),
            column: name.to_owned(),
        })
}

fn wrong_type(path: &Path, column: &str, found: &DataType, expected: &str) -> TableError {
    TableError::WrongType {
        path: path.to_owned(),
        column: column.to_owned(),
        found: found.to_string(),
        expected: expected.to_owned(),
    }
}

/// [`timestamps`], sharing the column's buffer when it already holds µs (no copy of a million times).
pub fn timestamp_buffer(
    batch: &RecordBatch,
    path: &Path,
    name: &str,
) -> Result<ScalarBuffer<Micros>, TableError> {
    let array = column(batch, path, name)?;
    if let DataType::Timestamp(TimeUnit::Microsecond, _) = array.data_type()
        && array.null_count() == 0
    {
        use arrow_array::cast::AsArray;
        return Ok(array
            .as_primitive::<TimestampMicrosecondType>()
            .values()
            .clone());
    }
    timestamps(batch, path, name).map(ScalarBuffer::from)
}

/// Event times in µs: a Timestamp column of any unit, or Int64 seconds since the epoch. Nulls are refused.
pub fn timestamps(batch: &RecordBatch, path: &Path, name: &str) -> Result<Vec<Micros>, TableError> {
    let array = column(batch, path, name)?;
    if array.null_count() > 0 {
        let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
        return Err(TableError::BadValue {
            path: path.to_owned(),
            column: name.to_owned(),
            row,
            problem: "an event has no time".into(),
        });
    }
    let scaled = |values: &[i64], per_second: i64| -> Vec<Micros> {
        values
            .iter()
            .map(|&v| match per_second {
                1 => v.saturating_mul(1_000_000),
                1_000 => v.saturating_mul(1_000),
                1_000_000 => v,
                _ => v.div_euclid(1_000),
            })
            .collect()
    };
    use arrow_array::cast::AsArray;
    Ok(match array.data_type() {
        DataType::Int64 => scaled(
            array
                .as_primitive::<arrow_array::types::Int64Type>()
                .values(),
            1,
        ),
        DataType::Timestamp(TimeUnit::Second, _) => {
            scaled(array.as_primitive::<TimestampSecondType>().values(), 1)
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => scaled(
            array.as_primitive::<TimestampMillisecondType>().values(),
            1_000,
        ),
        DataType::Timestamp(TimeUnit::Microsecond, _) => scaled(
            array.as_primitive::<TimestampMicrosecondType>().values(),
            1_000_000,
        ),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => scaled(
            array.as_primitive::<TimestampNanosecondType>().values(),
            1_000_000_000,
        ),
        other => {
            return Err(wrong_type(
                path,
                name,
                other,
                "a Timestamp or Int64 (seconds since the epoch)",
            ));
        }
    })
}

/// A column's values; integers of any width, floats, strings and booleans. NaN reads as missing.
pub fn values(
    batch: &RecordBatch,
    path: &Path,
    name: &str,
) -> Result<Vec<FeatureValue>, TableError> {
    let column = Column::of_batch(batch, path, name)?;
    Ok((0..column.len())
        .map(|row| owned(column.value(row)))
        .collect())
}

/// Entity keys from the join-key columns; a key must be present and of its entity's type.
pub fn keys(
    batch: &RecordBatch,
    path: &Path,
    entities: &[(String, EntityValueType)],
) -> Result<Vec<EntityKey>, TableError> {
    let mut parts: Vec<Vec<KeyPart>> = vec![Vec::with_capacity(entities.len()); batch.num_rows()];
    for (join_key, value_type) in entities {
        let column_values = values(batch, path, join_key)?;
        for (row, value) in column_values.into_iter().enumerate() {
            let part = match (value_type, value) {
                (EntityValueType::Int64, FeatureValue::Int(i)) => KeyPart::Int(i),
                (EntityValueType::String, FeatureValue::Str(s)) => KeyPart::Str(s),
                (_, FeatureValue::Null) => {
                    return Err(TableError::BadValue {
                        path: path.to_owned(),
                        column: join_key.clone(),
                        row,
                        problem: "the join key is missing".into(),
                    });
                }
                (_, _) => {
                    let found = column(batch, path, join_key)?.data_type().clone();
                    return Err(wrong_type(
                        path,
                        join_key,
                        &found,
                        &format!("{value_type:?}"),
                    ));
                }
            };
            parts[row].push(part);
        }
    }
    Ok(parts.into_iter().map(EntityKey).collect())
}

/// Rows of the offline feature table: an entity, a time and the view's feature values then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureRows {
    pub keys: Vec<EntityKey>,
    pub timestamps: Vec<Micros>,
    /// One vector per row, in [`View::features`] order.
    pub values: Vec<Vec<FeatureValue>>,
}

/// Name of the event-time column of the offline table and of training sets' feature timestamp.
pub const FEATURE_TIME_COLUMN: &str = "feature_timestamp";
/// Schema metadata of a training set: the FeatureView (`namespace/name`) its features were joined from.
pub const FEATURE_VIEW_KEY: &str = "flywheel.dev/feature-view";
/// Schema metadata of a training set: that FeatureView's schema hash, which a trained model records.
pub const FEATURE_VIEW_SCHEMA_HASH_KEY: &str = "flywheel.dev/feature-view-schema-hash";

/// A column of feature values as the feature's declared type.
pub fn feature_array<'a>(
    value_type: FeatureValueType,
    values: impl Iterator<Item = &'a FeatureValue>,
) -> ArrayRef {
    match value_type {
        FeatureValueType::Int64 => Arc::new(Int64Array::from_iter(values.map(|v| match v {
            FeatureValue::Int(i) => Some(*i),
            _ => None,
        }))),
        FeatureValueType::Bool => Arc::new(BooleanArray::from_iter(values.map(|v| match v {
            FeatureValue::Bool(b) => Some(*b),
            _ => None,
        }))),
        FeatureValueType::String => Arc::new(StringArray::from_iter(values.map(|v| match v {
            FeatureValue::Str(s) => Some(s.as_str()),
            _ => None,
        }))),
        _ => Arc::new(Float64Array::from_iter(values.map(|v| v.as_f64()))),
    }
}

/// Writes `columns` as one Parquet file, atomically (a temporary file renamed into place), so a re-run replaces
/// a partition whole and a reader never sees half of one.
pub fn write_parquet(path: &Path, columns: Vec<(String, ArrayRef)>) -> Result<(), TableError> {
    write_parquet_with_metadata(path, columns, HashMap::new())
}

/// [`write_parquet`] with key-value metadata in the file's schema (e.g. [`FEATURE_VIEW_KEY`]).
pub fn write_parquet_with_metadata(
    path: &Path,
    columns: Vec<(String, ArrayRef)>,
    metadata: HashMap<String, String>,
) -> Result<(), TableError> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(name, array.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(|e| parquet_error(path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let temporary = path.with_extension("parquet.tmp");
    let file = File::create(&temporary).map_err(io(&temporary))?;
    // Encodings that shrink each kind of column cheaply, instead of compressing everything: integers and times
    // as deltas (bit-packed; times in order cost a few bits), text through a dictionary (compressed: its
    // indices and any fallback are small), floats plain (Snappy rarely shrinks measured values and took half the
    // write time). The files come out smaller than with Snappy on every column, in half the time. Text columns
    // keep no min/max statistics: comparing every string took a third of their write time, and in files written
    // in time order a range of names or ids prunes nothing (the time column keeps its range).
    let properties = schema
        .fields()
        .iter()
        .fold(
            WriterProperties::builder()
                .set_compression(Compression::UNCOMPRESSED)
                .set_dictionary_enabled(false),
            |builder, field| {
                let column = ColumnPath::from(field.name().as_str());
                match field.data_type() {
                    DataType::Utf8 => builder
                        .set_column_statistics_enabled(column.clone(), EnabledStatistics::None)
                        .set_column_dictionary_enabled(column.clone(), true)
                        .set_column_compression(column, Compression::SNAPPY),
                    DataType::Int64 | DataType::Timestamp(..) => {
                        builder.set_column_encoding(column, Encoding::DELTA_BINARY_PACKED)
                    }
                    _ => builder,
                }
            },
        )
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(properties)).map_err(|e| parquet_error(path, e))?;
    writer.write(&batch).map_err(|e| parquet_error(path, e))?;
    writer.close().map_err(|e| parquet_error(path, e))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}

/// Reads the offline table under `dir` (every partition).
pub fn read_feature_rows(dir: &Path, view: &View) -> Result<FeatureRows, TableError> {
    let mut rows = FeatureRows::default();
    for file in parquet_files(dir)? {
        for batch in read_batches(&file)? {
            rows.keys.extend(keys(&batch, &file, &view.entities)?);
            rows.timestamps
                .extend(timestamps(&batch, &file, FEATURE_TIME_COLUMN)?);
            let columns: Vec<Vec<FeatureValue>> = view
                .features
                .iter()
                .map(|feature| values(&batch, &file, &feature.name))
                .collect::<Result<_, _>>()?;
            for row in 0..batch.num_rows() {
                rows.values
                    .push(columns.iter().map(|column| column[row].clone()).collect());
            }
        }
    }
    Ok(rows)
}

/// Reading a Column from Parquet batches (the errors name the file and column).
impl Column {
    /// The column `name` of `batch` (from the file `path`), normalized.
    pub fn of_batch(batch: &RecordBatch, path: &Path, name: &str) -> Result<Column, TableError> {
        let array = batch
            .column_by_name(name)
            .ok_or_else(|| TableError::MissingColumn {
                path: path.to_owned(),
                column: name.to_owned(),
            })?;
        let out_of_range = |row: usize| TableError::BadValue {
            path: path.to_owned(),
            column: name.to_owned(),
            row,
            problem: "integer out of the Int64 range".into(),
        };
        macro_rules! ints {
            ($t:ty) => {{
                let typed = array.as_primitive::<$t>();
                let mut builder = Int64Builder::with_capacity(typed.len());
                for (row, value) in typed.iter().enumerate() {
                    match value.map(i64::try_from).transpose() {
                        Ok(value) => builder.append_option(value),
                        Err(_) => return Err(out_of_range(row)),
                    }
                }
                Column::Int(builder.finish())
            }};
        }
        let without_nan = |values: Float64Array| {
            if values.values().iter().any(|x| x.is_nan()) {
                values.iter().map(|v| v.filter(|x| !x.is_nan())).collect()
            } else {
                values
            }
        };
        Ok(match array.data_type() {
            DataType::Int64 => Column::Int(array.as_primitive::<Int64Type>().clone()),
            DataType::Int8 => ints!(Int8Type),
            DataType::Int16 => ints!(Int16Type),
            DataType::Int32 => ints!(Int32Type),
            DataType::UInt8 => ints!(UInt8Type),
            DataType::UInt16 => ints!(UInt16Type),
            DataType::UInt32 => ints!(UInt32Type),
            DataType::UInt64 => ints!(UInt64Type),
            DataType::Float64 => {
                Column::Float(without_nan(array.as_primitive::<Float64Type>().clone()))
            }
            DataType::Float32 => Column::Float(without_nan(
                array
                    .as_primitive::<Float32Type>()
                    .iter()
                    .map(|v| v.map(f64::from))
                    .collect(),
            )),
            DataType::Utf8 => Column::Str(array.as_string::<i32>().clone()),
            DataType::LargeUtf8 => Column::Str(array.as_string::<i64>().iter().collect()),
            DataType::Utf8View => Column::Str(array.as_string_view().iter().collect()),
            DataType::Boolean => Column::Bool(array.as_boolean().clone()),
            other => {
                return Err(TableError::WrongType {
                    path: path.to_owned(),
                    column: name.to_owned(),
                    found: other.to_string(),
                    expected: "an integer, float, string or boolean".into(),
                });
            }
        })
    }
    /// One column from parts of the same kind, in order; parts of different kinds (files that disagree on a
    /// column's type) are refused.
    pub(crate) fn concat(parts: &[&Column], path: &Path, name: &str) -> Result<Column, TableError> {
        let arrays: Vec<ArrayRef> = parts.iter().map(|c| c.array()).collect();
        let slices: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
        let mismatch = |message: String| TableError::Parquet {
            path: path.to_owned(),
            message: format!("column `{name}`: {message}"),
        };
        let joined = arrow_select::concat::concat(&slices)
            .map_err(|e| mismatch(format!("files with different types ({e})")))?;
        Ok(match parts.first() {
            Some(Column::Int(_)) => Column::Int(joined.as_primitive::<Int64Type>().clone()),
            Some(Column::Float(_)) => Column::Float(joined.as_primitive::<Float64Type>().clone()),
            Some(Column::Str(_)) => Column::Str(joined.as_string::<i32>().clone()),
            Some(Column::Bool(_)) => Column::Bool(joined.as_boolean().clone()),
            None => return Err(mismatch("no rows".into())),
        })
    }
}
