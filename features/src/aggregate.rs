//! Feature values as of a time. A feature's value at `t` reads the entity's events at or before `t`: a last
//! value is the latest non-null value of its column, a transform encodes that value, an aggregation covers the
//! events in `(t − window, t]` (nulls skipped), and a cross hashes the values of the features it crosses. Events
//! at the same time are all visible at that time, whatever their order, so results do not depend on input order.
//!
//! [`values_as_of`] evaluates one time directly over any [`EventColumns`]: the streaming side's decoded events
//! ([`Events`]) or a batch run's Arrow columns. The batch side's sliding path over every event of an entity (the
//! offline table) lives in `offline` and shares this module's `Window`; the two are tested against each other.

use std::collections::BTreeMap;

use flywheel_crds::featureview::{AggregationFunction, FeatureValueType};
use flywheel_ml::transform::{Encoded, TransformError, Value};

use crate::value::{EntityKey, FeatureValue};
use crate::view::{CompiledFeature, FeatureKind, Micros, View};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ComputeError {
    #[error("feature `{feature}` (column `{column}`): {message}")]
    Value {
        feature: String,
        column: String,
        message: String,
    },
    #[error("column `{0}` the view reads is not in the events")]
    MissingColumn(String),
}

/// Events column by column, as the feature computations read them: an event time per row and the source
/// columns by name.
pub trait EventColumns {
    /// The position of the source column `name`.
    fn column_index(&self, name: &str) -> Option<usize>;
    fn timestamp(&self, row: usize) -> Micros;
    fn value(&self, column: usize, row: usize) -> Value<'_>;
}

/// Decoded events (the streaming side): one entity key and event time per event, and the source columns the
/// view reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Events {
    pub keys: Vec<EntityKey>,
    pub timestamps: Vec<Micros>,
    pub columns: Vec<(String, Vec<FeatureValue>)>,
}

impl EventColumns for Events {
    fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(column, _)| column == name)
    }

    fn timestamp(&self, row: usize) -> Micros {
        self.timestamps[row]
    }

    fn value(&self, column: usize, row: usize) -> Value<'_> {
        self.columns[column].1[row].as_ml()
    }
}

/// The source column of each feature (`None` for crosses), resolved once.
pub(crate) fn resolve_inputs(
    view: &View,
    events: &impl EventColumns,
) -> Result<Vec<Option<usize>>, ComputeError> {
    view.features
        .iter()
        .map(|feature| match feature.kind {
            FeatureKind::Cross { .. } => Ok(None),
            _ => events
                .column_index(&feature.column)
                .map(Some)
                .ok_or_else(|| ComputeError::MissingColumn(feature.column.clone())),
        })
        .collect()
}

/// The feature values of one entity at `time`, from its events `rows` (any order; later ones are ignored).
pub fn values_as_of(
    view: &View,
    events: &impl EventColumns,
    rows: &[usize],
    time: Micros,
) -> Result<Vec<FeatureValue>, ComputeError> {
    let inputs = resolve_inputs(view, events)?;
    let mut visible: Vec<usize> = rows
        .iter()
        .copied()
        .filter(|&row| events.timestamp(row) <= time)
        .collect();
    visible.sort_by_key(|&row| events.timestamp(row));
    let raw = view
        .features
        .iter()
        .zip(&inputs)
        .map(|(feature, input)| {
            let Some(column) = *input else {
                return Ok(FeatureValue::Null);
            };
            match feature.kind {
                FeatureKind::Aggregate { function, window } => {
                    let mut state = Window::new(function, window);
                    for (position, &row) in visible.iter().enumerate() {
                        if events.timestamp(row) > time.saturating_sub(window) {
                            state.add(position, events.value(column, row));
                        }
                    }
                    state.value(feature)
                }
                _ => Ok(visible
                    .iter()
                    .rev()
                    .map(|&row| events.value(column, row))
                    .find(|value| !matches!(value, Value::Missing))
                    .map_or(FeatureValue::Null, owned)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    finish(view, raw)
}

/// A borrowed value as an owned feature value.
pub(crate) fn owned(value: Value<'_>) -> FeatureValue {
    match value {
        Value::Missing => FeatureValue::Null,
        Value::Int(i) => FeatureValue::Int(i),
        Value::Float(f) => FeatureValue::Float(f),
        Value::Str(s) => FeatureValue::Str(s.to_owned()),
        Value::Bool(b) => FeatureValue::Bool(b),
    }
}

/// A value as a number, for aggregations; `None` for missing values and strings.
fn number(value: Value<'_>) -> Option<f64> {
    match value {
        Value::Int(i) => Some(i as f64),
        Value::Float(f) => Some(f),
        Value::Bool(b) => Some(f64::from(u8::from(b))),
        Value::Missing | Value::Str(_) => None,
    }
}

/// Applies transforms and crosses to the raw values (last values and aggregates), checking declared types.
pub(crate) fn finish(
    view: &View,
    mut values: Vec<FeatureValue>,
) -> Result<Vec<FeatureValue>, ComputeError> {
    for index in 0..view.features.len() {
        let feature = &view.features[index];
        let value = match &feature.kind {
            FeatureKind::Last => coerce(
                feature,
                std::mem::replace(&mut values[index], FeatureValue::Null),
            )?,
            FeatureKind::Aggregate { .. } => continue,
            FeatureKind::Transform(transform) => encoded(
                feature,
                transform.apply(&feature.name, values[index].as_ml()),
            )?,
            FeatureKind::Cross { inputs, transform } => {
                let crossed: Vec<Value<'_>> = inputs.iter().map(|&i| values[i].as_ml()).collect();
                encoded(feature, transform.apply_cross(&feature.name, &crossed))?
            }
        };
        values[index] = value;
    }
    Ok(values)
}

pub(crate) fn value_error(feature: &CompiledFeature, message: impl Into<String>) -> ComputeError {
    ComputeError::Value {
        feature: feature.name.clone(),
        column: feature.column.clone(),
        message: message.into(),
    }
}

pub(crate) fn encoded(
    feature: &CompiledFeature,
    result: Result<Encoded, TransformError>,
) -> Result<FeatureValue, ComputeError> {
    match result {
        Ok(Encoded::Categorical(index)) => i64::try_from(index)
            .map(FeatureValue::Int)
            .map_err(|_| value_error(feature, "bucket index out of range")),
        Ok(Encoded::Numeric(x)) => Ok(FeatureValue::Float(x)),
        Err(error) => Err(value_error(feature, error.to_string())),
    }
}

/// A last value as its declared type: integers widen to floats; anything else must already match.
pub fn coerce(
    feature: &CompiledFeature,
    value: FeatureValue,
) -> Result<FeatureValue, ComputeError> {
    use FeatureValueType as T;
    match (feature.value_type, value) {
        (_, FeatureValue::Null) => Ok(FeatureValue::Null),
        (T::Int64, value @ FeatureValue::Int(_))
        | (T::Float64, value @ FeatureValue::Float(_))
        | (T::String, value @ FeatureValue::Str(_))
        | (T::Bool, value @ FeatureValue::Bool(_)) => Ok(value),
        (T::Float64, FeatureValue::Int(i)) => Ok(FeatureValue::Float(i as f64)),
        (declared, value) => Err(value_error(
            feature,
            format!(
                "is {declared:?} but got {}",
                flywheel_ml::transform::type_name(value.as_ml())
            ),
        )),
    }
}

/// Total order on floats for the min/max multiset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ordered(i64);

impl Ordered {
    fn of(x: f64) -> Ordered {
        let bits = x.to_bits() as i64;
        Ordered(bits ^ (((bits >> 63) as u64) >> 1) as i64)
    }

    fn value(self) -> f64 {
        let bits = self.0 ^ ((((self.0 >> 63) as u64) >> 1) as i64);
        f64::from_bits(bits as u64)
    }
}

/// One aggregation over a trailing window: the events added and not yet evicted, in time order.
pub(crate) struct Window {
    function: AggregationFunction,
    length: Micros,
    /// Positions (into the entity's ordered events) still in the window, oldest first.
    members: std::collections::VecDeque<usize>,
    count: i64,
    sum: f64,
    numbers: BTreeMap<Ordered, usize>,
    distinct: BTreeMap<String, usize>,
    /// The first value an aggregation could not read, reported when its value is asked for.
    bad: Option<String>,
}

impl Window {
    pub(crate) fn new(function: AggregationFunction, length: Micros) -> Window {
        Window {
            function,
            length,
            members: Default::default(),
            count: 0,
            sum: 0.0,
            numbers: BTreeMap::new(),
            distinct: BTreeMap::new(),
            bad: None,
        }
    }

    pub(crate) fn add(&mut self, position: usize, value: Value<'_>) {
        self.members.push_back(position);
        self.update(value, 1);
    }

    /// Drops the members at or before `time − length`; `member` gives a position's time and value.
    pub(crate) fn evict_until<'v>(
        &mut self,
        time: Micros,
        member: impl Fn(usize) -> (Micros, Value<'v>),
    ) {
        while let Some(&oldest) = self.members.front() {
            let (at, value) = member(oldest);
            if at > time.saturating_sub(self.length) {
                break;
            }
            self.members.pop_front();
            self.update(value, -1);
        }
    }

    fn update(&mut self, value: Value<'_>, sign: i64) {
        if matches!(value, Value::Missing) {
            return;
        }
        self.count += sign;
        match self.function {
            AggregationFunction::Count => {}
            AggregationFunction::DistinctCount => {
                let key = match value {
                    Value::Str(s) => format!("s{s}"),
                    other => format!("n{}", number(other).unwrap_or(f64::NAN)),
                };
                multiset_update(&mut self.distinct, key, sign);
            }
            AggregationFunction::Sum
            | AggregationFunction::Mean
            | AggregationFunction::Min
            | AggregationFunction::Max => match number(value) {
                Some(x) if x.is_finite() => {
                    self.sum += sign as f64 * x;
                    if matches!(
                        self.function,
                        AggregationFunction::Min | AggregationFunction::Max
                    ) {
                        multiset_update(&mut self.numbers, Ordered::of(x), sign);
                    }
                }
                _ => {
                    if self.bad.is_none() {
                        self.bad = Some(format!(
                            "{:?} needs finite numbers, got {}",
                            self.function,
                            flywheel_ml::transform::type_name(value)
                        ));
                    }
                }
            },
        }
    }

    pub(crate) fn value(&self, feature: &CompiledFeature) -> Result<FeatureValue, ComputeError> {
        if let Some(bad) = &self.bad {
            return Err(value_error(feature, bad.clone()));
        }
        Ok(match self.function {
            AggregationFunction::Count => FeatureValue::Int(self.count),
            AggregationFunction::DistinctCount => FeatureValue::Int(self.distinct.len() as i64),
            // An emptied window reads exactly 0, not the rounding residue of its evictions.
            AggregationFunction::Sum if self.count == 0 => FeatureValue::Float(0.0),
            AggregationFunction::Sum => FeatureValue::Float(self.sum),
            AggregationFunction::Mean if self.count == 0 => FeatureValue::Null,
            AggregationFunction::Mean => FeatureValue::Float(self.sum / self.count as f64),
            AggregationFunction::Min => self
                .numbers
                .keys()
                .next()
                .map_or(FeatureValue::Null, |x| FeatureValue::Float(x.value())),
            AggregationFunction::Max => self
                .numbers
                .keys()
                .next_back()
                .map_or(FeatureValue::Null, |x| FeatureValue::Float(x.value())),
        })
    }
}

fn multiset_update<K: Ord>(set: &mut BTreeMap<K, usize>, key: K, sign: i64) {
    if sign > 0 {
        *set.entry(key).or_default() += 1;
    } else if let Some(count) = set.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            set.remove(&key);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::value::KeyPart;
    use flywheel_crds::featureview::FeatureViewSpec;

    pub(crate) fn spec(features: serde_json::Value) -> FeatureViewSpec {
        let spec = serde_json::json!({
            "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
            "source": {"batch": {"uri": "file:///data/events", "timestampField": "ts"}},
            "features": features,
            "ttl": "1d",
            "offline": {"uri": "file:///data/offline"},
        });
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("spec: {e}"))
    }

    pub(crate) fn view() -> View {
        let spec = spec(serde_json::json!([
            {"name": "price", "valueType": "Float64"},
            {"name": "clicks_1h", "column": "clicked", "valueType": "Int64",
             "aggregation": {"function": "count", "window": "1h"}},
            {"name": "spend_1h", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "sum", "window": "1h"}},
            {"name": "mean_price_1h", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "mean", "window": "1h"}},
            {"name": "max_price_2h", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "max", "window": "2h"}},
            {"name": "min_price_2h", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "min", "window": "2h"}},
            {"name": "categories_1h", "column": "category", "valueType": "Int64",
             "aggregation": {"function": "distinctCount", "window": "1h"}},
            {"name": "log_price", "column": "price", "valueType": "Float64", "transform": {"log1p": {}}},
            {"name": "category", "valueType": "String"},
            {"name": "category_x_price", "valueType": "Int64",
             "transform": {"cross": {"features": ["category", "log_price"], "buckets": 1000}}},
        ]));
        View::compile(&spec, "ts", "test:").unwrap_or_else(|e| panic!("compile: {e}"))
    }

    pub(crate) const HOUR: Micros = 3_600_000_000;

    fn events(rows: &[(i64, Micros, Option<f64>, Option<&str>)]) -> Events {
        Events {
            keys: rows
                .iter()
                .map(|r| EntityKey(vec![KeyPart::Int(r.0)]))
                .collect(),
            timestamps: rows.iter().map(|r| r.1).collect(),
            columns: vec![
                (
                    "price".into(),
                    rows.iter()
                        .map(|r| r.2.map_or(FeatureValue::Null, FeatureValue::Float))
                        .collect(),
                ),
                (
                    "clicked".into(),
                    rows.iter()
                        .map(|r| r.2.map_or(FeatureValue::Null, |_| FeatureValue::Bool(true)))
                        .collect(),
                ),
                (
                    "category".into(),
                    rows.iter()
                        .map(|r| {
                            r.3.map_or(FeatureValue::Null, |c| FeatureValue::Str(c.into()))
                        })
                        .collect(),
                ),
            ],
        }
    }

    fn named(view: &View, values: &[FeatureValue], name: &str) -> FeatureValue {
        let index = view
            .features
            .iter()
            .position(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        values[index].clone()
    }

    #[test]
    fn windows_are_half_open_and_nulls_are_skipped() {
        let view = view();
        let events = events(&[
            (1, 0, Some(10.0), Some("a")),
            (1, HOUR / 2, Some(20.0), Some("b")),
            (1, HOUR, None, Some("b")), // the first event leaves the 1h window exactly now
            (1, 3 * HOUR, Some(5.0), Some("a")), // everything else left every window
        ]);
        let rows: Vec<usize> = (0..4).collect();
        let at: Vec<Vec<FeatureValue>> = events
            .timestamps
            .iter()
            .map(|&time| {
                values_as_of(&view, &events, &rows, time).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        assert_eq!(named(&view, &at[0], "clicks_1h"), FeatureValue::Int(1));
        assert_eq!(named(&view, &at[1], "spend_1h"), FeatureValue::Float(30.0));
        assert_eq!(
            named(&view, &at[1], "mean_price_1h"),
            FeatureValue::Float(15.0)
        );
        // At t = 1h: (0, 1h] holds the 0.5h and 1h events; the null price is skipped, the last price stays 20.
        assert_eq!(named(&view, &at[2], "spend_1h"), FeatureValue::Float(20.0));
        assert_eq!(named(&view, &at[2], "clicks_1h"), FeatureValue::Int(1));
        assert_eq!(named(&view, &at[2], "categories_1h"), FeatureValue::Int(1));
        assert_eq!(named(&view, &at[2], "price"), FeatureValue::Float(20.0));
        assert_eq!(
            named(&view, &at[2], "max_price_2h"),
            FeatureValue::Float(20.0)
        );
        assert_eq!(
            named(&view, &at[2], "min_price_2h"),
            FeatureValue::Float(10.0)
        );
        assert_eq!(named(&view, &at[3], "spend_1h"), FeatureValue::Float(5.0));
        assert_eq!(
            named(&view, &at[3], "min_price_2h"),
            FeatureValue::Float(5.0)
        );
        assert_eq!(
            named(&view, &at[3], "log_price"),
            FeatureValue::Float(6f64.ln())
        );
        // As of a time with no event in the window: counts 0, sum 0, mean missing, last value kept.
        let later =
            values_as_of(&view, &events, &rows, 10 * HOUR).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named(&view, &later, "clicks_1h"), FeatureValue::Int(0));
        assert_eq!(named(&view, &later, "spend_1h"), FeatureValue::Float(0.0));
        assert_eq!(named(&view, &later, "mean_price_1h"), FeatureValue::Null);
        assert_eq!(named(&view, &later, "price"), FeatureValue::Float(5.0));
        assert!(
            matches!(named(&view, &later, "category_x_price"), FeatureValue::Int(b) if (0..1000).contains(&b))
        );
    }

    #[test]
    fn a_string_in_a_summed_column_names_the_feature() {
        let spec = spec(serde_json::json!([
            {"name": "spend", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "sum", "window": "1h"}},
        ]));
        let view = View::compile(&spec, "ts", "p:").unwrap_or_else(|e| panic!("{e}"));
        let events = Events {
            keys: vec![EntityKey(vec![KeyPart::Int(1)])],
            timestamps: vec![0],
            columns: vec![("price".into(), vec![FeatureValue::Str("x".into())])],
        };
        let error = values_as_of(&view, &events, &[0], 0)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("feature `spend` (column `price`): Sum needs finite numbers, got a string")
        );
    }

    #[test]
    fn a_declared_type_the_feature_cannot_yield_is_refused() {
        let spec = spec(serde_json::json!([
            {"name": "n", "column": "price", "valueType": "Float64",
             "aggregation": {"function": "count", "window": "1h"}},
        ]));
        let error = View::compile(&spec, "ts", "p:")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("spec.features[0].valueType: is Float64 but the feature yields Int64")
        );
    }
}
