//! A batch source's events as the computations read them: join keys, event times and the source columns, read
//! from Parquet in time order, and numbered by entity.

use std::hash::Hash;
use std::path::Path;

use arrow_array::{Array, RecordBatch};
use arrow_buffer::ScalarBuffer;
use flywheel_crds::featureview::EntityValueType;
use flywheel_ml::transform::Value;

use crate::aggregate::EventColumns;
use crate::column::Column;
use crate::grouping::{EntityIds, group_ids};
use crate::table::{self, TableError};
use crate::value::{EntityKey, KeyPart};
use crate::view::{Micros, View};

/// A batch source's events: join-key columns, event times (µs) and the source columns the view reads.
#[derive(Clone, Debug)]
pub struct SourceEvents {
    pub(crate) keys: Vec<Column>,
    /// Shares the source column's buffer when it already holds µs.
    pub(crate) timestamps: ScalarBuffer<Micros>,
    pub(crate) columns: Vec<(String, Column)>,
}

impl EventColumns for SourceEvents {
    fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(column, _)| column == name)
    }

    fn timestamp(&self, row: usize) -> Micros {
        self.timestamps[row]
    }

    fn value(&self, column: usize, row: usize) -> Value<'_> {
        self.columns[column].1.value(row)
    }
}

/// The join key of one event, borrowed from the key columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum KeyRef<'a> {
    Int(i64),
    Str(&'a str),
}

impl SourceEvents {
    /// The source events of `view` from the Parquet file or directory `path` (only the columns it reads).
    pub fn read(path: &Path, view: &View) -> Result<SourceEvents, TableError> {
        let mut names: Vec<&str> = view.entities.iter().map(|(k, _)| k.as_str()).collect();
        names.push(&view.timestamp_field);
        names.extend(view.source_columns());
        let mut parts: Vec<SourceEvents> = Vec::new();
        for file in table::parquet_files(path)? {
            for batch in table::read_columns(&file, &names)? {
                parts.push(SourceEvents::of_batch(&batch, &file, view)?);
            }
        }
        if parts.iter().all(|part| part.timestamps.is_empty()) {
            return Err(TableError::Empty {
                path: path.to_owned(),
            });
        }
        let keys = view
            .entities
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let columns: Vec<&Column> = parts.iter().map(|p| &p.keys[i]).collect();
                Column::concat(&columns, path, name)
            })
            .collect::<Result<_, _>>()?;
        let columns = parts[0]
            .columns
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let columns: Vec<&Column> = parts.iter().map(|p| &p.columns[i].1).collect();
                Ok((name.clone(), Column::concat(&columns, path, name)?))
            })
            .collect::<Result<_, TableError>>()?;
        Ok(SourceEvents {
            keys,
            timestamps: match parts.as_slice() {
                [only] => only.timestamps.clone(),
                _ => parts
                    .iter()
                    .flat_map(|p| p.timestamps.iter().copied())
                    .collect(),
            },
            columns,
        })
    }

    /// The events of one record batch from the file `path`: join keys present and of their entity's type.
    pub fn of_batch(
        batch: &RecordBatch,
        path: &Path,
        view: &View,
    ) -> Result<SourceEvents, TableError> {
        let keys = view
            .entities
            .iter()
            .map(|(join_key, value_type)| {
                let column = Column::of_batch(batch, path, join_key)?;
                let matches = matches!(
                    (value_type, &column),
                    (EntityValueType::Int64, Column::Int(_))
                        | (EntityValueType::String, Column::Str(_))
                );
                if !matches {
                    let found = batch
                        .column_by_name(join_key)
                        .map(|a| a.data_type().to_string())
                        .unwrap_or_default();
                    return Err(TableError::WrongType {
                        path: path.to_owned(),
                        column: join_key.clone(),
                        found,
                        expected: format!("{value_type:?}"),
                    });
                }
                let missing = (column.array().null_count() > 0)
                    .then(|| (0..column.len()).find(|&r| column.value(r) == Value::Missing))
                    .flatten();
                if let Some(row) = missing {
                    return Err(TableError::BadValue {
                        path: path.to_owned(),
                        column: join_key.clone(),
                        row,
                        problem: "the join key is missing".into(),
                    });
                }
                Ok(column)
            })
            .collect::<Result<_, _>>()?;
        Ok(SourceEvents {
            keys,
            timestamps: table::timestamp_buffer(batch, path, &view.timestamp_field)?,
            columns: view
                .source_columns()
                .into_iter()
                .map(|name| Ok((name.to_owned(), Column::of_batch(batch, path, name)?)))
                .collect::<Result<_, TableError>>()?,
        })
    }

    pub fn len(&self) -> usize {
        self.timestamps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timestamps.is_empty()
    }

    pub fn timestamps(&self) -> &[Micros] {
        &self.timestamps
    }

    fn key_ref(&self, part: usize, row: usize) -> KeyRef<'_> {
        match self.keys[part].value(row) {
            Value::Str(s) => KeyRef::Str(s),
            Value::Int(i) => KeyRef::Int(i),
            // Join keys are checked present and of an entity's type when read.
            _ => KeyRef::Int(0),
        }
    }

    fn entity_key(&self, row: usize) -> EntityKey {
        EntityKey(
            (0..self.keys.len())
                .map(|part| match self.key_ref(part, row) {
                    KeyRef::Int(i) => KeyPart::Int(i),
                    KeyRef::Str(s) => KeyPart::Str(s.to_owned()),
                })
                .collect(),
        )
    }

    /// These events in time order (ties in input order); sources are mostly written so already, and are then
    /// kept as they are.
    pub fn in_time_order(self) -> SourceEvents {
        if self.timestamps.is_sorted() {
            return self;
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&r| self.timestamps[r]);
        SourceEvents {
            keys: self.keys.iter().map(|c| c.take(&order)).collect(),
            timestamps: order.iter().map(|&r| self.timestamps[r]).collect(),
            columns: self
                .columns
                .iter()
                .map(|(name, column)| (name.clone(), column.take(&order)))
                .collect(),
        }
    }

    /// Dense ids for the entities of the first `rows` events, in order of first appearance.
    pub fn entity_ids(&self, rows: usize) -> EntityIds {
        let grouped = match self.keys.len() {
            1 => group_ids(rows, |row| self.key_ref(0, row)),
            parts => group_ids(rows, |row| {
                (0..parts)
                    .map(|part| self.key_ref(part, row))
                    .collect::<Vec<_>>()
            }),
        };
        EntityIds {
            keys: grouped
                .first_rows
                .iter()
                .map(|&row| self.entity_key(row))
                .collect(),
            ids: grouped.ids,
            last_rows: grouped.last_rows,
        }
    }
}
