//! A batch materialization over Arrow columns: from the source events (`source`), grouped by entity
//! (`grouping`), every event's feature values (the offline table, by sliding each window over the entity's
//! history), the partition files, and each feature's values as statistics read them. Nothing here allocates per event beyond the output
//! columns themselves: values are read in place from the source arrays, which is what makes a run over millions
//! of events take well under a second.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, TimestampMicrosecondArray, UInt32Array};
use flywheel_crds::featureview::FeatureValueType;
use flywheel_ml::transform::Value;
use rayon::iter::{IntoParallelRefIterator, ParallelIterator};

use crate::aggregate::{ComputeError, Window, encoded, finish, owned, resolve_inputs, value_error};
use crate::column::{Column, ColumnBuilder};
use crate::grouping::{EntityIds, ties};
use crate::source::SourceEvents;
use crate::table::{FEATURE_TIME_COLUMN, TableError, write_parquet};
use crate::value::FeatureValue;
use crate::view::{CompiledFeature, FeatureKind, Micros, View};

/// A run's feature values: at every event (the offline table) and per entity as of the run's time (the online
/// store).
#[derive(Clone, Debug)]
pub struct Computed {
    /// One column per feature of [`View::features`], one value per event.
    pub columns: Vec<Column>,
    /// Per feature, per entity: the value before transforms and crosses as of the run's time.
    as_of: Vec<Vec<FeatureValue>>,
}

impl Computed {
    /// The values of entity `id` as of the run's time, in feature order.
    pub fn values_of(&self, view: &View, id: usize) -> Result<Vec<FeatureValue>, ComputeError> {
        let raw = self
            .as_of
            .iter()
            .map(|values| values.get(id).cloned().unwrap_or(FeatureValue::Null))
            .collect();
        finish(view, raw)
    }
}

/// The feature values of the first `ids.ids.len()` events of `events` (in time order) in one pass per feature,
/// each entity's state kept by its id; and each entity's values as of `as_of` (no earlier than its events).
pub fn values_at_events(
    view: &View,
    events: &SourceEvents,
    ids: &EntityIds,
    as_of: Micros,
) -> Result<Computed, ComputeError> {
    let inputs = resolve_inputs(view, events)?;
    let direct: Vec<usize> = (0..view.features.len())
        .filter(|&i| !matches!(view.features[i].kind, FeatureKind::Cross { .. }))
        .collect();
    // Computed on every core; the first failing feature in view order is the one reported.
    let computed: Vec<(usize, Column, Vec<FeatureValue>)> = direct
        .par_iter()
        .map(|&index| {
            let feature = &view.features[index];
            let column =
                inputs[index].ok_or_else(|| ComputeError::MissingColumn(feature.column.clone()))?;
            let values = &events.columns[column].1;
            let (at_events, at_end) = match feature.kind {
                FeatureKind::Aggregate { .. } => windowed(view, index, events, values, ids, as_of)?,
                _ => last_values(view, index, events, values, ids)?,
            };
            Ok((index, at_events, at_end))
        })
        .collect::<Vec<Result<_, ComputeError>>>()
        .into_iter()
        .collect::<Result<_, _>>()?;
    let rows = ids.ids.len();
    let mut columns: Vec<Option<Column>> = vec![None; view.features.len()];
    let mut at_end: Vec<Vec<FeatureValue>> = vec![Vec::new(); view.features.len()];
    for (index, values, end) in computed {
        columns[index] = Some(values);
        at_end[index] = end;
    }
    // Crosses come after the features they cross (compile order), so their inputs are ready.
    for index in 0..view.features.len() {
        let feature = &view.features[index];
        if let FeatureKind::Cross { inputs, transform } = &feature.kind {
            let crossed: Vec<&Column> =
                inputs.iter().filter_map(|&i| columns[i].as_ref()).collect();
            let mut builder = ColumnBuilder::new(feature.value_type, rows);
            let mut values = Vec::with_capacity(crossed.len());
            for row in 0..rows {
                values.clear();
                values.extend(crossed.iter().map(|column| column.value(row)));
                let value = encoded(feature, transform.apply_cross(&feature.name, &values))?;
                builder.push(value.as_ml(), 1);
            }
            columns[index] = Some(builder.finish());
        }
    }
    Ok(Computed {
        columns: columns.into_iter().flatten().collect(),
        as_of: at_end,
    })
}

/// A last value (the entity's latest present value at each event's time) or a transform of it, at every
/// event; and each entity's latest present value.
fn last_values(
    view: &View,
    index: usize,
    events: &SourceEvents,
    values: &Column,
    ids: &EntityIds,
) -> Result<(Column, Vec<FeatureValue>), ComputeError> {
    let feature = &view.features[index];
    if let FeatureKind::Last = feature.kind {
        if let Some(column) = plain_last(feature, values) {
            return latest_present(feature, column, &events.timestamps, ids);
        }
        if !values.is_all_null() {
            let found = (0..values.len())
                .map(|r| values.value(r))
                .find(|v| *v != Value::Missing)
                .unwrap_or(Value::Missing);
            return Err(value_error(
                feature,
                format!(
                    "is {:?} but got {}",
                    feature.value_type,
                    flywheel_ml::transform::type_name(found)
                ),
            ));
        }
    }
    let rows = ids.ids.len();
    let mut builder = ColumnBuilder::new(feature.value_type, rows);
    let mut latest: Vec<Option<usize>> = vec![None; ids.len()];
    // A transform is encoded once per latest value, not once per event.
    let mut encoded_latest: Vec<Option<(Option<usize>, FeatureValue)>> = match feature.kind {
        FeatureKind::Transform(_) => vec![None; ids.len()],
        _ => Vec::new(),
    };
    for tie in ties(rows, &events.timestamps) {
        for row in tie.clone() {
            if values.value(row) != Value::Missing {
                latest[ids.ids[row]] = Some(row);
            }
        }
        for row in tie {
            let entity = ids.ids[row];
            let at = latest[entity];
            let raw = at.map_or(Value::Missing, |r| values.value(r));
            match &feature.kind {
                FeatureKind::Transform(transform) => {
                    let cached = &mut encoded_latest[entity];
                    let value = match cached {
                        Some((cached_at, value)) if *cached_at == at => value,
                        _ => {
                            let value = encoded(feature, transform.apply(&feature.name, raw))?;
                            &mut cached.insert((at, value)).1
                        }
                    };
                    builder.push(value.as_ml(), 1);
                }
                _ => builder.push(raw, 1),
            }
        }
    }
    let at_end = latest
        .iter()
        .map(|at| at.map_or(FeatureValue::Null, |r| owned(values.value(r))))
        .collect();
    Ok((builder.finish(), at_end))
}

/// The source column of a plain last value, as the feature's type: itself, or integers read as floats.
/// `None` when the types do not fit (an error unless the column is all null).
fn plain_last(feature: &CompiledFeature, values: &Column) -> Option<Column> {
    use FeatureValueType as T;
    match (feature.value_type, values) {
        (T::Float64, Column::Int(ints)) => Some(Column::Float(ints.unary(|i| i as f64))),
        (T::Int64, Column::Int(_))
        | (T::Float64, Column::Float(_))
        | (T::String, Column::Str(_))
        | (T::Bool, Column::Bool(_)) => Some(values.clone()),
        _ => None,
    }
}

/// Each event's latest present value of `values` (ties at one time see each other), and each entity's.
/// Without gaps or an entity's ties, that is the column itself, shared rather than copied; otherwise one gather.
fn latest_present(
    feature: &CompiledFeature,
    values: Column,
    timestamps: &[Micros],
    ids: &EntityIds,
) -> Result<(Column, Vec<FeatureValue>), ComputeError> {
    let rows = ids.ids.len();
    let array = values.array();
    // Without gaps, and no entity with two events at one time, every event's latest value is its own and each
    // entity's is that of its last event: the column itself, with nothing to look up per event.
    if array.slice(0, rows).null_count() == 0 && !entity_has_ties(rows, timestamps, &ids.ids) {
        let at_end = ids
            .last_rows
            .iter()
            .map(|&row| owned(values.value(row)))
            .collect();
        return Ok((values.slice_typed(0..rows), at_end));
    }
    let mut latest: Vec<Option<u32>> = vec![None; ids.len()];
    let mut sources: Vec<Option<u32>> = Vec::with_capacity(rows);
    for tie in ties(rows, timestamps) {
        for row in tie.clone() {
            if array.is_valid(row) {
                latest[ids.ids[row]] = Some(row as u32);
            }
        }
        sources.extend(tie.map(|row| latest[ids.ids[row]]));
    }
    let at_end = latest
        .iter()
        .map(|at| at.map_or(FeatureValue::Null, |r| owned(values.value(r as usize))))
        .collect();
    let at_events = values
        .gather(&UInt32Array::from(sources))
        .map_err(|e| value_error(feature, e.to_string()))?;
    Ok((at_events, at_end))
}

/// Whether some entity has two of the first `rows` events at one time.
fn entity_has_ties(rows: usize, timestamps: &[Micros], ids: &[usize]) -> bool {
    let mut entities = Vec::new();
    ties(rows, timestamps)
        .filter(|tie| tie.len() > 1)
        .any(|tie| {
            entities.clear();
            entities.extend(tie.map(|row| ids[row]));
            entities.sort_unstable();
            entities.windows(2).any(|pair| pair[0] == pair[1])
        })
}

/// An aggregation over its trailing window at every event, each entity's window slid along its events; and
/// each entity's aggregate as of `as_of`.
fn windowed(
    view: &View,
    index: usize,
    events: &SourceEvents,
    values: &Column,
    ids: &EntityIds,
    as_of: Micros,
) -> Result<(Column, Vec<FeatureValue>), ComputeError> {
    let feature = &view.features[index];
    let FeatureKind::Aggregate { function, window } = feature.kind else {
        return Err(value_error(feature, "not an aggregation"));
    };
    let timestamps = &events.timestamps;
    let member = |row: usize| (timestamps[row], values.value(row));
    let rows = ids.ids.len();
    let mut builder = ColumnBuilder::new(feature.value_type, rows);
    let mut windows: Vec<Window> = (0..ids.len())
        .map(|_| Window::new(function, window))
        .collect();
    for tie in ties(rows, timestamps) {
        let time = timestamps[tie.start];
        for row in tie.clone() {
            windows[ids.ids[row]].add(row, values.value(row));
        }
        for row in tie {
            let state = &mut windows[ids.ids[row]];
            state.evict_until(time, member);
            builder.push(state.value(feature)?.as_ml(), 1);
        }
    }
    let at_end = windows
        .iter_mut()
        .map(|state| {
            state.evict_until(as_of, member);
            state.value(feature)
        })
        .collect::<Result<_, _>>()?;
    Ok((builder.finish(), at_end))
}

/// Writes the events `rows` of `events` and their feature values `features` as one partition file.
pub fn write_partition(
    path: &Path,
    view: &View,
    events: &SourceEvents,
    features: &[Column],
    rows: Range<usize>,
) -> Result<(), TableError> {
    let mut columns: Vec<(String, ArrayRef)> =
        Vec::with_capacity(view.entities.len() + 1 + features.len());
    for ((name, _), key) in view.entities.iter().zip(&events.keys) {
        columns.push((name.clone(), key.slice(rows.clone())));
    }
    columns.push((
        FEATURE_TIME_COLUMN.to_owned(),
        Arc::new(
            TimestampMicrosecondArray::new(events.timestamps.slice(rows.start, rows.len()), None)
                .with_timezone("UTC"),
        ),
    ));
    for (feature, values) in view.features.iter().zip(features) {
        columns.push((feature.name.clone(), values.slice(rows.clone())));
    }
    write_parquet(path, columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::{HOUR, view};
    use crate::aggregate::{owned, values_as_of};
    use crate::grouping::{GROUP_PART_ROWS, group_ids};
    use crate::value::{EntityKey, KeyPart};
    use arrow_array::RecordBatch;
    use arrow_array::{BooleanArray, Float64Array, Int64Array, StringArray};
    use arrow_schema::{Field, Schema};
    use proptest::prelude::*;

    type Row<'a> = (i64, Micros, Option<f64>, Option<&'a str>);

    fn batch(rows: &[Row<'_>]) -> RecordBatch {
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "user_id",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            ),
            (
                "ts",
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.1 / 1_000_000),
                )),
            ),
            (
                "price",
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            ),
            (
                "clicked",
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|r| r.2.map(|_| true)),
                )),
            ),
            (
                "category",
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.3))),
            ),
        ];
        let schema = Schema::new(
            columns
                .iter()
                .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
                .collect::<Vec<_>>(),
        );
        RecordBatch::try_new(
            Arc::new(schema),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn source(rows: &[Row<'_>]) -> SourceEvents {
        source_of(&view(), rows)
    }

    fn source_of(view: &View, rows: &[Row<'_>]) -> SourceEvents {
        SourceEvents::of_batch(&batch(rows), Path::new("events.parquet"), view)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn close(a: &FeatureValue, b: &FeatureValue) -> bool {
        match (a, b) {
            (FeatureValue::Float(x), FeatureValue::Float(y)) => {
                (x - y).abs() <= 1e-9 * (1.0 + y.abs())
            }
            _ => a == b,
        }
    }

    /// Rows split over every core number their keys exactly as one pass in row order would.
    #[test]
    fn grouping_in_parts_numbers_keys_as_one_pass_does() {
        // Enough rows for several parts; keys repeat across parts, and some first appear in a late part.
        let rows = 5 * GROUP_PART_ROWS + 123;
        let key = |row: usize| {
            if row > 4 * GROUP_PART_ROWS && row.is_multiple_of(997) {
                row
            } else {
                row.wrapping_mul(2_654_435_761) % 1_000
            }
        };
        let grouped = group_ids(rows, key);
        let mut slots: std::collections::HashMap<usize, usize> = Default::default();
        let (mut first_rows, mut last_rows) = (Vec::new(), Vec::new());
        let ids: Vec<usize> = (0..rows)
            .map(|row| {
                let id = *slots.entry(key(row)).or_insert_with(|| {
                    first_rows.push(row);
                    last_rows.push(row);
                    first_rows.len() - 1
                });
                last_rows[id] = row;
                id
            })
            .collect();
        assert!(first_rows.len() > 1_000, "some keys are new in late parts");
        assert_eq!(grouped.ids, ids);
        assert_eq!(grouped.first_rows, first_rows);
        assert_eq!(grouped.last_rows, last_rows);
    }

    #[test]
    fn events_are_put_in_time_order_and_entities_numbered_as_they_appear() {
        let events = source(&[
            (2, 3_000_000, None, None),
            (1, 2_000_000, None, Some("first")),
            (2, 1_000_000, None, None),
            (1, 2_000_000, Some(1.0), Some("second")),
        ])
        .in_time_order();
        assert_eq!(
            events.timestamps,
            [1_000_000, 2_000_000, 2_000_000, 3_000_000]
        );
        assert_eq!(
            events.columns[2].1.value(1),
            Value::Str("first"),
            "a tie keeps input order"
        );
        let ids = events.entity_ids(3);
        assert_eq!(ids.ids, [0, 1, 1]);
        assert_eq!(
            ids.keys,
            [
                EntityKey(vec![KeyPart::Int(2)]),
                EntityKey(vec![KeyPart::Int(1)])
            ]
        );
        assert_eq!(ids.last_rows, [0, 2]);
    }

    #[test]
    fn a_last_value_of_the_wrong_type_names_the_feature() {
        let spec = crate::aggregate::tests::spec(serde_json::json!([
            {"name": "category", "valueType": "Float64"},
        ]));
        let view = View::compile(&spec, "ts", "p:").unwrap_or_else(|e| panic!("{e}"));
        let events = SourceEvents::of_batch(
            &batch(&[(1, 0, None, Some("a"))]),
            Path::new("e.parquet"),
            &view,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let error = values_at_events(&view, &events, &events.entity_ids(1), 0)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("feature `category` (column `category`): is Float64 but got a string")
        );
    }

    #[test]
    fn a_last_value_reads_integers_as_floats_and_fills_gaps_from_the_entity() {
        let spec = crate::aggregate::tests::spec(serde_json::json!([
            {"name": "user_as_float", "column": "user_id", "valueType": "Float64"},
            {"name": "price", "valueType": "Float64"},
        ]));
        let view = View::compile(&spec, "ts", "p:").unwrap_or_else(|e| panic!("{e}"));
        let events = source_of(
            &view,
            &[
                (7, 1_000_000, Some(1.5), None),
                (8, 2_000_000, Some(9.0), None),
                (7, 3_000_000, None, None),
            ],
        );
        let ids = events.entity_ids(3);
        let computed =
            values_at_events(&view, &events, &ids, 3_000_000).unwrap_or_else(|e| panic!("{e}"));
        let column = |i: usize| {
            (0..3)
                .map(|r| owned(computed.columns[i].value(r)))
                .collect::<Vec<_>>()
        };
        use FeatureValue::Float;
        assert_eq!(column(0), [Float(7.0), Float(8.0), Float(7.0)]);
        assert_eq!(
            column(1),
            [Float(1.5), Float(9.0), Float(1.5)],
            "a gap takes the entity's latest value"
        );
        assert_eq!(
            computed
                .values_of(&view, 0)
                .unwrap_or_else(|e| panic!("{e}")),
            [Float(7.0), Float(1.5)]
        );
    }

    proptest! {
        /// The one-pass path (offline rows, and the online values at the end) and the direct path (streaming)
        /// agree at every event.
        #[test]
        fn one_pass_and_direct_agree(
            raw in proptest::collection::vec((0i64..3, 0i64..(6 * HOUR), proptest::option::of(0.0f64..100.0), 0usize..3), 1..60)
        ) {
            let view = view();
            let categories = ["a", "b", "c"];
            let rows: Vec<Row<'_>> =
                raw.iter().map(|&(u, t, p, c)| (u, t - t % 60_000_000, p, Some(categories[c]))).collect();
            let events = source(&rows).in_time_order();
            let ids = events.entity_ids(events.len());
            let as_of = events.timestamps[events.len() - 1] + HOUR / 2;
            let computed = values_at_events(&view, &events, &ids, as_of).unwrap_or_else(|e| panic!("{e}"));
            for entity in 0..ids.len() {
                let entity_rows: Vec<usize> = (0..events.len()).filter(|&r| ids.ids[r] == entity).collect();
                for &row in &entity_rows {
                    let time = events.timestamps[row];
                    let direct = values_as_of(&view, &events, &entity_rows, time).unwrap_or_else(|e| panic!("{e}"));
                    for (index, d) in direct.iter().enumerate() {
                        let passed = owned(computed.columns[index].value(row));
                        prop_assert!(close(&passed, d), "{} at {time}: {passed:?} vs {d:?}", view.features[index].name);
                    }
                }
                let online = computed.values_of(&view, entity).unwrap_or_else(|e| panic!("{e}"));
                let direct = values_as_of(&view, &events, &entity_rows, as_of).unwrap_or_else(|e| panic!("{e}"));
                for (index, (o, d)) in online.iter().zip(&direct).enumerate() {
                    prop_assert!(close(o, d), "{} as of {as_of}: {o:?} vs {d:?}", view.features[index].name);
                }
            }
        }
    }
}
