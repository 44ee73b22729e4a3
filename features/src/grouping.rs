//! Rows grouped by key, in parallel over parts of the rows: the entities of a run's events, and the ties of
//! events at one time.

use std::hash::Hash;
use std::ops::Range;

use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

use crate::FastMap;
use crate::value::EntityKey;
use crate::view::Micros;

/// Rows below which grouping stays on one core: splitting costs a merge of the parts' keys.
pub(crate) const GROUP_PART_ROWS: usize = 1 << 16;

/// Rows grouped by key: `ids[row]` numbers each row's key in order of first appearance; `first_rows[id]` and
/// `last_rows[id]` are the key's first and last rows.
pub(crate) struct Grouped {
    pub(crate) ids: Vec<usize>,
    pub(crate) first_rows: Vec<usize>,
    pub(crate) last_rows: Vec<usize>,
}

/// One part's grouping: its keys' local ids, and each local id's first and last row.
struct PartGroups<K> {
    slots: FastMap<K, usize>,
    first_rows: Vec<usize>,
    last_rows: Vec<usize>,
}

/// Groups the first `rows` rows by `key`. Contiguous parts are grouped on every core, each with its own ids;
/// then the parts' keys, in order, are numbered after those of the parts before them, which keeps the order of
/// first appearance over all rows, and each part's ids are translated.
pub(crate) fn group_ids<K: Hash + Eq + Send>(
    rows: usize,
    key: impl Fn(usize) -> K + Sync,
) -> Grouped {
    let parts = rayon::current_num_threads()
        .min(rows / GROUP_PART_ROWS)
        .max(1);
    let part_rows = rows.div_ceil(parts).max(1);
    let mut ids = vec![0; rows];
    let parts: Vec<PartGroups<K>> = ids
        .par_chunks_mut(part_rows)
        .enumerate()
        .map(|(part, ids)| {
            let offset = part * part_rows;
            let mut slots: FastMap<K, usize> = FastMap::default();
            let (mut first_rows, mut last_rows) = (Vec::new(), Vec::new());
            for (i, id) in ids.iter_mut().enumerate() {
                let row = offset + i;
                *id = *slots.entry(key(row)).or_insert_with(|| {
                    first_rows.push(row);
                    last_rows.push(row);
                    first_rows.len() - 1
                });
                last_rows[*id] = row;
            }
            PartGroups {
                slots,
                first_rows,
                last_rows,
            }
        })
        .collect();
    let mut parts = parts.into_iter();
    let Some(PartGroups {
        mut slots,
        first_rows,
        last_rows,
    }) = parts.next()
    else {
        return Grouped {
            ids,
            first_rows: Vec::new(),
            last_rows: Vec::new(),
        };
    };
    let mut all = Grouped {
        ids: Vec::new(),
        first_rows,
        last_rows,
    };
    let translations: Vec<Vec<usize>> = parts
        .map(|part| {
            part.first_rows
                .iter()
                .zip(&part.last_rows)
                .map(|(&first, &last)| {
                    let id = *slots.entry(key(first)).or_insert_with(|| {
                        all.first_rows.push(first);
                        all.last_rows.push(last);
                        all.first_rows.len() - 1
                    });
                    all.last_rows[id] = last;
                    id
                })
                .collect()
        })
        .collect();
    ids.par_chunks_mut(part_rows)
        .skip(1)
        .zip(&translations)
        .for_each(|(ids, translation)| {
            for id in ids {
                *id = translation[*id];
            }
        });
    all.ids = ids;
    all
}

/// The entities of a run's events: `ids[row]` numbers the entity of each event, `keys[id]` is its key and
/// `last_rows[id]` its newest event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityIds {
    pub ids: Vec<usize>,
    pub keys: Vec<EntityKey>,
    pub last_rows: Vec<usize>,
}

impl EntityIds {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The rows `0..rows` grouped by event time (the events are in time order): events at one time see each other.
pub(crate) fn ties(rows: usize, timestamps: &[Micros]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= rows {
            return None;
        }
        let time = timestamps[start];
        let end = start
            + timestamps[start..rows]
                .iter()
                .take_while(|&&t| t == time)
                .count();
        let tie = start..end;
        start = end;
        Some(tie)
    })
}
