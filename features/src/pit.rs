//! Point-in-time correct joins: each labeled event gets the feature values its entity had at the event's time,
//! never a value from its future, and nothing older than the view's TTL.

use std::collections::HashMap;

use crate::value::EntityKey;
use crate::view::Micros;

/// Feature rows by entity, ordered by time, for as-of lookups.
pub struct PointInTimeIndex<'a> {
    by_key: HashMap<&'a EntityKey, Vec<(Micros, usize)>>,
}

impl<'a> PointInTimeIndex<'a> {
    /// Indexes the rows of a feature table (one key and one event time per row).
    pub fn new(keys: &'a [EntityKey], timestamps: &[Micros]) -> PointInTimeIndex<'a> {
        let mut by_key: HashMap<&EntityKey, Vec<(Micros, usize)>> = HashMap::new();
        for (row, key) in keys.iter().enumerate() {
            by_key.entry(key).or_default().push((timestamps[row], row));
        }
        for rows in by_key.values_mut() {
            // Stable: among rows at the same time, the last one written wins.
            rows.sort_by_key(|&(time, _)| time);
        }
        PointInTimeIndex { by_key }
    }

    /// The row with `key`'s values as of `time`: its latest row at or before `time`, if that row is at most
    /// `ttl` old (valid through `row time + ttl`); `None` when the entity has no such row.
    pub fn lookup(&self, key: &EntityKey, time: Micros, ttl: Micros) -> Option<usize> {
        let rows = self.by_key.get(key)?;
        let visible = rows.partition_point(|&(at, _)| at <= time);
        let (at, row) = *rows.get(visible.checked_sub(1)?)?;
        (time.saturating_sub(at) <= ttl).then_some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::KeyPart;

    fn key(id: i64) -> EntityKey {
        EntityKey(vec![KeyPart::Int(id)])
    }

    /// A user's feature changes at t=100 and t=200; a label at t=150 must see the t=100 value, although a naive
    /// "latest value per user" join hands it the t=200 one.
    #[test]
    fn never_reads_a_value_from_the_future() {
        let keys = vec![key(1), key(1), key(2)];
        let times = vec![200, 100, 120];
        let index = PointInTimeIndex::new(&keys, &times);
        assert_eq!(index.lookup(&key(1), 150, 1_000), Some(1));
        assert_eq!(
            index.lookup(&key(1), 200, 1_000),
            Some(0),
            "a value is visible at its own time"
        );
        assert_eq!(
            index.lookup(&key(1), 99, 1_000),
            None,
            "nothing before the first value"
        );
        assert_eq!(index.lookup(&key(3), 500, 1_000), None, "unknown entity");
        // The naive join: the latest row of user 1 regardless of time.
        let naive = (0..keys.len())
            .filter(|&row| keys[row] == key(1))
            .max_by_key(|&row| times[row]);
        assert_eq!(
            naive,
            Some(0),
            "the naive join leaks the t=200 value into the t=150 label"
        );
    }

    #[test]
    fn ttl_is_inclusive_and_expires_after() {
        let keys = vec![key(1)];
        let index = PointInTimeIndex::new(&keys, &[100]);
        assert_eq!(index.lookup(&key(1), 150, 50), Some(0));
        assert_eq!(index.lookup(&key(1), 151, 50), None);
    }

    #[test]
    fn same_time_rows_resolve_to_the_last_written() {
        let keys = vec![key(1), key(1)];
        let index = PointInTimeIndex::new(&keys, &[100, 100]);
        assert_eq!(index.lookup(&key(1), 100, 10), Some(1));
    }
}
