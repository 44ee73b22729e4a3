//! Training and evaluation sets as Parquet: reading them into encoded examples through the model's feature
//! schema, and writing generated data. Every error names the file and the column.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, StringArray, UInt64Array,
};
use flywheel_features::column::Column;
use flywheel_features::table::{self, TableError};
use flywheel_ml::artifact::FeatureViewSource;
use flywheel_ml::schema::FeatureSchema;
use flywheel_ml::synthetic::Impression;
use flywheel_ml::train::EncodedDataset;
use flywheel_ml::transform::Value;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Table(#[from] TableError),
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
    let metadata = table::schema_metadata(path)?;
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
    let inputs = input_columns(schema);
    let mut data = EncodedDataset {
        fields: schema.categorical().len(),
        numeric_width: schema.numeric().len(),
        ..EncodedDataset::default()
    };
    let mut row_buffer = flywheel_ml::schema::EncodedRow::default();
    let mut offset = 0;
    for batch in table::batch_reader(path)? {
        let batch = batch?;
        let features: Vec<(&str, Column)> = inputs
            .iter()
            .map(|name| Ok((name.as_str(), Column::of_batch(&batch, path, name)?)))
            .collect::<Result<_, TableError>>()?;
        let label = Column::of_batch(&batch, path, &columns.label)?;
        let group = columns
            .group
            .as_deref()
            .map(|name| Column::of_batch(&batch, path, name))
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
        Value::Missing => Err(bad(
            "missing (null or NaN); a label must be 0 or 1".to_owned()
        )),
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

/// Writes generated impressions as Parquet, with the columns the synthetic schema reads plus
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

/// Writes named columns of equal length as one Parquet file, through the feature store's writer.
pub fn write_columns(path: &Path, columns: Vec<(&str, ArrayRef)>) -> Result<(), DatasetError> {
    let columns = columns
        .into_iter()
        .map(|(name, array)| (name.to_owned(), array))
        .collect();
    Ok(table::write_parquet(path, columns)?)
}
