//! One column as the feature computations read and build it: a source column normalized to four types, and
//! a feature's output column built as its declared type.

use std::ops::Range;
use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, ArrowPrimitiveType, BooleanArray, Float64Array, Int64Array, PrimitiveArray,
    StringArray, UInt32Array,
};
use arrow_schema::ArrowError;
use flywheel_crds::featureview::FeatureValueType;
use flywheel_ml::transform::Value;

use crate::stats::{Observed, Present};

/// One column as the feature computations read it: integers of any width as Int64, floats as Float64 (NaN read
/// as missing), any string layout as Utf8, booleans.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    Int(Int64Array),
    Float(Float64Array),
    Str(StringArray),
    Bool(BooleanArray),
}

impl Column {
    pub(crate) fn array(&self) -> ArrayRef {
        match self {
            Column::Int(a) => Arc::new(a.clone()),
            Column::Float(a) => Arc::new(a.clone()),
            Column::Str(a) => Arc::new(a.clone()),
            Column::Bool(a) => Arc::new(a.clone()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Column::Int(a) => a.len(),
            Column::Float(a) => a.len(),
            Column::Str(a) => a.len(),
            Column::Bool(a) => a.len(),
        }
    }

    pub(crate) fn is_all_null(&self) -> bool {
        self.array().null_count() == self.len()
    }

    /// The values at `rows` as an array, without copying.
    pub(crate) fn slice(&self, rows: Range<usize>) -> ArrayRef {
        self.slice_typed(rows).array()
    }

    /// The values at `rows`, as a column of this kind, without copying.
    pub(crate) fn slice_typed(&self, rows: Range<usize>) -> Column {
        let (offset, length) = (rows.start, rows.len());
        match self {
            Column::Int(a) => Column::Int(a.slice(offset, length)),
            Column::Float(a) => Column::Float(a.slice(offset, length)),
            Column::Str(a) => Column::Str(a.slice(offset, length)),
            Column::Bool(a) => Column::Bool(a.slice(offset, length)),
        }
    }

    /// The values at `rows` (null where a row is null), as a column of this kind.
    pub(crate) fn gather(&self, rows: &UInt32Array) -> Result<Column, ArrowError> {
        let gathered = arrow_select::take::take(self.array().as_ref(), rows, None)?;
        Ok(match self {
            Column::Int(_) => Column::Int(gathered.as_primitive::<Int64Type>().clone()),
            Column::Float(_) => Column::Float(gathered.as_primitive::<Float64Type>().clone()),
            Column::Str(_) => Column::Str(gathered.as_string::<i32>().clone()),
            Column::Bool(_) => Column::Bool(gathered.as_boolean().clone()),
        })
    }

    /// The values at `rows`, in that order.
    pub(crate) fn take(&self, rows: &[usize]) -> Column {
        match self {
            Column::Int(a) => Column::Int(
                rows.iter()
                    .map(|&r| a.is_valid(r).then(|| a.value(r)))
                    .collect(),
            ),
            Column::Float(a) => Column::Float(
                rows.iter()
                    .map(|&r| a.is_valid(r).then(|| a.value(r)))
                    .collect(),
            ),
            Column::Str(a) => Column::Str(
                rows.iter()
                    .map(|&r| a.is_valid(r).then(|| a.value(r)))
                    .collect(),
            ),
            Column::Bool(a) => Column::Bool(
                rows.iter()
                    .map(|&r| a.is_valid(r).then(|| a.value(r)))
                    .collect(),
            ),
        }
    }

    /// The value at `row`, borrowed.
    pub fn value(&self, row: usize) -> Value<'_> {
        match self {
            Column::Int(a) if a.is_valid(row) => Value::Int(a.value(row)),
            Column::Float(a) if a.is_valid(row) => Value::Float(a.value(row)),
            Column::Str(a) if a.is_valid(row) => Value::Str(a.value(row)),
            Column::Bool(a) if a.is_valid(row) => Value::Bool(a.value(row)),
            _ => Value::Missing,
        }
    }

    /// The values at `rows`, as statistics read them.
    pub fn observed(&self, rows: Range<usize>) -> Observed<'_> {
        let present = match self {
            Column::Str(a) => Present::Texts(
                rows.clone()
                    .filter(|&r| a.is_valid(r))
                    .map(|r| a.value(r))
                    .collect(),
            ),
            Column::Int(a) => Present::Numbers(present_numbers(a, rows.clone(), |v| v as f64)),
            Column::Float(a) => Present::Numbers(present_numbers(a, rows.clone(), |v| v)),
            Column::Bool(a) => Present::Numbers(
                rows.clone()
                    .filter(|&r| a.is_valid(r))
                    .map(|r| f64::from(u8::from(a.value(r))))
                    .collect(),
            ),
        };
        Observed {
            total: rows.len(),
            present,
        }
    }
}

/// The non-null values among `rows` of `array`, as numbers; sized once (a million values grown by doubling were
/// copied twice over and faulted in twice the memory).
fn present_numbers<T: ArrowPrimitiveType>(
    array: &PrimitiveArray<T>,
    rows: Range<usize>,
    number: impl Fn(T::Native) -> f64,
) -> Vec<f64> {
    let values = &array.values()[rows.clone()];
    if array.slice(rows.start, rows.len()).null_count() == 0 {
        return values.iter().map(|&v| number(v)).collect();
    }
    let mut present = Vec::with_capacity(values.len());
    present.extend(
        rows.filter(|&r| array.is_valid(r))
            .map(|r| number(array.value(r))),
    );
    present
}

/// Builds a feature's output column as its declared type.
pub(crate) enum ColumnBuilder {
    Int(Int64Builder),
    Float(Float64Builder),
    Str(StringBuilder),
    Bool(BooleanBuilder),
}

impl ColumnBuilder {
    pub(crate) fn new(value_type: FeatureValueType, capacity: usize) -> ColumnBuilder {
        match value_type {
            FeatureValueType::Int64 => ColumnBuilder::Int(Int64Builder::with_capacity(capacity)),
            FeatureValueType::String => {
                ColumnBuilder::Str(StringBuilder::with_capacity(capacity, capacity * 8))
            }
            FeatureValueType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            _ => ColumnBuilder::Float(Float64Builder::with_capacity(capacity)),
        }
    }

    /// Appends `value` `times` times; a value the declared type cannot hold is appended as null (the
    /// computations check types before they build).
    pub(crate) fn push(&mut self, value: Value<'_>, times: usize) {
        for _ in 0..times {
            match (&mut *self, value) {
                (ColumnBuilder::Int(b), Value::Int(i)) => b.append_value(i),
                (ColumnBuilder::Float(b), Value::Float(x)) => b.append_value(x),
                (ColumnBuilder::Float(b), Value::Int(i)) => b.append_value(i as f64),
                (ColumnBuilder::Str(b), Value::Str(s)) => b.append_value(s),
                (ColumnBuilder::Bool(b), Value::Bool(x)) => b.append_value(x),
                (ColumnBuilder::Int(b), _) => b.append_null(),
                (ColumnBuilder::Float(b), _) => b.append_null(),
                (ColumnBuilder::Str(b), _) => b.append_null(),
                (ColumnBuilder::Bool(b), _) => b.append_null(),
            }
        }
    }

    pub(crate) fn finish(self) -> Column {
        match self {
            ColumnBuilder::Int(mut b) => Column::Int(b.finish()),
            ColumnBuilder::Float(mut b) => Column::Float(b.finish()),
            ColumnBuilder::Str(mut b) => Column::Str(b.finish()),
            ColumnBuilder::Bool(mut b) => Column::Bool(b.finish()),
        }
    }
}
