//! Examples as the model reads them: embedding indices and numbers per row, after the transforms.

use super::MIN_VALIDATION_ROWS;
use crate::schema::FeatureSchema;
use crate::transform::{TransformError, Value};

/// Encoded examples, row-major: `fields` embedding indices and `numeric_width` numbers per example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedDataset {
    pub fields: usize,
    pub numeric_width: usize,
    pub categorical: Vec<u64>,
    pub numeric: Vec<f32>,
    pub labels: Vec<f32>,
    /// Group (user) of each example, for GAUC.
    pub groups: Vec<u64>,
}

impl EncodedDataset {
    /// Encodes `rows` with `schema`; `value_of(row, column)`, `label_of(row)` and `group_of(row)` read a row.
    pub fn encode<'a, R: 'a>(
        schema: &FeatureSchema,
        rows: impl IntoIterator<Item = &'a R>,
        value_of: impl Fn(&'a R, &str) -> Value<'a>,
        label_of: impl Fn(&R) -> bool,
        group_of: impl Fn(&R) -> u64,
    ) -> Result<Self, TransformError> {
        let mut data = EncodedDataset {
            fields: schema.categorical().len(),
            numeric_width: schema.numeric().len(),
            ..EncodedDataset::default()
        };
        let mut row_buffer = crate::schema::EncodedRow::default();
        for row in rows {
            schema.encode_into(|column| value_of(row, column), &mut row_buffer)?;
            data.categorical.extend_from_slice(&row_buffer.categorical);
            data.numeric.extend_from_slice(&row_buffer.numeric);
            data.labels.push(if label_of(row) { 1.0 } else { 0.0 });
            data.groups.push(group_of(row));
        }
        Ok(data)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Share of examples with a click.
    pub fn positive_rate(&self) -> f64 {
        let clicks = self.labels.iter().filter(|&&y| y > 0.5).count();
        clicks as f64 / self.len().max(1) as f64
    }

    /// Splits off the last `fraction` of the examples (the newest, for a set in time order) as a held-out
    /// validation set; `None` when that share would hold fewer than [`MIN_VALIDATION_ROWS`] examples or a
    /// single class, and then nothing is split off.
    pub fn split_validation(&mut self, fraction: f64) -> Option<EncodedDataset> {
        let held = (self.len() as f64 * fraction.clamp(0.0, 0.5)).round() as usize;
        let keep = self.len() - held;
        let labels = &self.labels[keep..];
        let clicks = labels.iter().filter(|&&y| y > 0.5).count();
        if held < MIN_VALIDATION_ROWS || clicks == 0 || clicks == held {
            return None;
        }
        let validation = EncodedDataset {
            fields: self.fields,
            numeric_width: self.numeric_width,
            categorical: self.categorical.split_off(keep * self.fields),
            numeric: self.numeric.split_off(keep * self.numeric_width),
            labels: self.labels.split_off(keep),
            groups: self.groups.split_off(keep),
        };
        Some(validation)
    }
}
