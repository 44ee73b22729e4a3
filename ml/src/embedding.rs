//! Embedding tables kept outside autodiff, with sparse optimizer updates. burn's stock `Embedding` takes a dense
//! gradient of the whole table every step; here a step gathers only the batch's rows into the graph and updates
//! only those rows (Adagrad or Adam), so cost follows the batch, not the table.
//!
//! Rows are created on first touch with an initial value derived from `(seed, row id)` alone, so a table is
//! identical however its rows were first reached (any batch order, any parameter-server shard).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Row ids to slots. Every training step looks up each of its rows several times, so the map uses foldhash
/// (fixed seed, a few ns per u64) rather than the DoS-resistant SipHash default: ids come from our own hashing.
type SlotMap = HashMap<u64, usize, foldhash::fast::FixedState>;

/// The distinct keys of `keys` in order of first appearance, and for each position the index of its key among
/// them. A batch touches popular rows many times; this is how each is fetched, sent and updated once.
pub fn distinct_keys(keys: &[u64]) -> (Vec<u64>, Vec<usize>) {
    let mut index_of = SlotMap::with_capacity_and_hasher(keys.len(), Default::default());
    let mut distinct = Vec::new();
    let indices = keys
        .iter()
        .map(|&key| {
            *index_of.entry(key).or_insert_with(|| {
                distinct.push(key);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, indices)
}

/// Adds up the `width`-wide rows of `values` whose keys are the same: `indices` as [`distinct_keys`] gives them,
/// `count` distinct keys. Rows are added in order of appearance, as a dense embedding's backward would.
pub fn sum_rows(values: &[f32], width: usize, indices: &[usize], count: usize) -> Vec<f32> {
    let mut sums = vec![0.0; count * width];
    for (&index, row) in indices.iter().zip(values.chunks_exact(width.max(1))) {
        for (sum, value) in sums[index * width..(index + 1) * width].iter_mut().zip(row) {
            *sum += value;
        }
    }
    sums
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum SparseOptimizer {
    Adagrad {
        learning_rate: f32,
        initial_accumulator: f32,
        epsilon: f32,
    },
    Adam {
        learning_rate: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
    },
    Sgd {
        learning_rate: f32,
    },
}

impl SparseOptimizer {
    pub fn adagrad(learning_rate: f32) -> Self {
        SparseOptimizer::Adagrad {
            learning_rate,
            initial_accumulator: 0.0,
            epsilon: 1e-10,
        }
    }

    pub fn adam(learning_rate: f32) -> Self {
        SparseOptimizer::Adam {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        }
    }

    /// The same optimizer with its learning rate multiplied by `factor`.
    pub fn scaled(self, factor: f32) -> Self {
        match self {
            SparseOptimizer::Adagrad {
                learning_rate,
                initial_accumulator,
                epsilon,
            } => SparseOptimizer::Adagrad {
                learning_rate: learning_rate * factor,
                initial_accumulator,
                epsilon,
            },
            SparseOptimizer::Adam {
                learning_rate,
                beta1,
                beta2,
                epsilon,
            } => SparseOptimizer::Adam {
                learning_rate: learning_rate * factor,
                beta1,
                beta2,
                epsilon,
            },
            SparseOptimizer::Sgd { learning_rate } => SparseOptimizer::Sgd {
                learning_rate: learning_rate * factor,
            },
        }
    }

    /// Optimizer state floats kept per weight.
    fn state_per_weight(&self) -> usize {
        match self {
            SparseOptimizer::Adagrad { .. } => 1,
            SparseOptimizer::Adam { .. } => 2,
            SparseOptimizer::Sgd { .. } => 0,
        }
    }
}

/// One table of `dim`-wide rows addressed by `u64` ids, with its optimizer state.
#[derive(Clone, Debug)]
pub struct EmbeddingTable {
    dim: usize,
    init_std: f32,
    seed: u64,
    slots: SlotMap,
    /// Row weights, `dim` floats per slot.
    weights: Vec<f32>,
    /// Optimizer state, `dim * state_per_weight` floats per slot.
    state: Vec<f32>,
    /// Adam's per-row step counts (lazy Adam: a row's bias correction counts its own updates).
    steps: Vec<u32>,
    optimizer: SparseOptimizer,
}

impl EmbeddingTable {
    pub fn new(dim: usize, init_std: f32, seed: u64, optimizer: SparseOptimizer) -> Self {
        EmbeddingTable {
            dim,
            init_std,
            seed,
            slots: SlotMap::default(),
            weights: Vec::new(),
            state: Vec::new(),
            steps: Vec::new(),
            optimizer,
        }
    }

    /// The same rows under another optimizer, whose state starts fresh (warm starts).
    pub fn with_optimizer(&self, optimizer: SparseOptimizer) -> Self {
        self.rows_with_optimizer(optimizer, |_| true)
    }

    /// The rows whose id `keep` accepts, under another optimizer whose state starts fresh (a parameter-server
    /// shard warm-starting its share of a model).
    pub fn rows_with_optimizer(
        &self,
        optimizer: SparseOptimizer,
        keep: impl Fn(u64) -> bool,
    ) -> Self {
        let mut table = EmbeddingTable::new(self.dim, self.init_std, self.seed, optimizer);
        for (id, weights) in self.rows().into_iter().filter(|(id, _)| keep(*id)) {
            let slot = table.slot(id);
            table.weights[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(weights);
        }
        table
    }

    /// Takes over every row of `other` (weights only), e.g. to assemble a model from parameter-server shards.
    pub fn absorb(&mut self, other: &EmbeddingTable) {
        for (id, weights) in other.rows() {
            let slot = self.slot(id);
            self.weights[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(weights);
        }
    }

    /// Multiplies the learning rate of later updates by `factor`; the optimizer state is kept.
    pub fn scale_learning_rate(&mut self, factor: f32) {
        self.optimizer = self.optimizer.scaled(factor);
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows touched so far.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Appends the rows of `ids` to `out` (`ids.len() * dim` floats), creating missing rows.
    pub fn gather_into(&mut self, ids: &[u64], out: &mut Vec<f32>) {
        out.reserve(ids.len() * self.dim);
        for &id in ids {
            let slot = self.slot(id);
            out.extend_from_slice(&self.weights[slot * self.dim..(slot + 1) * self.dim]);
        }
    }

    /// Appends the rows of `ids` without creating any: an untouched row reads as its initial value.
    pub fn read_into(&self, ids: &[u64], out: &mut Vec<f32>) {
        out.reserve(ids.len() * self.dim);
        for &id in ids {
            match self.slots.get(&id) {
                Some(&slot) => {
                    out.extend_from_slice(&self.weights[slot * self.dim..(slot + 1) * self.dim])
                }
                None => out
                    .extend((0..self.dim).map(|k| initial_value(self.seed, id, k, self.init_std))),
            }
        }
    }

    /// Applies one optimizer step to the rows of `ids`, given `grads` (`ids.len() * dim`, aligned with `ids`).
    /// Repeated ids have their gradients summed first, as a dense embedding's backward would.
    pub fn apply_gradients(&mut self, ids: &[u64], grads: &[f32]) {
        let (ids, indices) = distinct_keys(ids);
        let totals = sum_rows(grads, self.dim, &indices, ids.len());
        for (row, id) in totals.chunks_exact(self.dim.max(1)).zip(ids) {
            let slot = self.slot(id);
            self.update_row(slot, row);
        }
    }

    fn update_row(&mut self, slot: usize, grad: &[f32]) {
        let dim = self.dim;
        let weights = &mut self.weights[slot * dim..(slot + 1) * dim];
        match self.optimizer {
            SparseOptimizer::Sgd { learning_rate } => {
                for (w, g) in weights.iter_mut().zip(grad) {
                    *w -= learning_rate * g;
                }
            }
            SparseOptimizer::Adagrad {
                learning_rate,
                epsilon,
                ..
            } => {
                let accumulators = &mut self.state[slot * dim..(slot + 1) * dim];
                for ((w, a), g) in weights.iter_mut().zip(accumulators.iter_mut()).zip(grad) {
                    *a += g * g;
                    *w -= learning_rate * g / (a.sqrt() + epsilon);
                }
            }
            SparseOptimizer::Adam {
                learning_rate,
                beta1,
                beta2,
                epsilon,
            } => {
                self.steps[slot] += 1;
                let t = self.steps[slot] as i32;
                let (correction1, correction2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                let state = &mut self.state[slot * dim * 2..(slot + 1) * dim * 2];
                let (first, second) = state.split_at_mut(dim);
                for (((w, m), v), g) in weights.iter_mut().zip(first).zip(second).zip(grad) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *w -=
                        learning_rate * (*m / correction1) / ((*v / correction2).sqrt() + epsilon);
                }
            }
        }
    }

    fn slot(&mut self, id: u64) -> usize {
        if let Some(&slot) = self.slots.get(&id) {
            return slot;
        }
        let slot = self.slots.len();
        self.slots.insert(id, slot);
        self.weights
            .extend((0..self.dim).map(|k| initial_value(self.seed, id, k, self.init_std)));
        let initial_state = match self.optimizer {
            SparseOptimizer::Adagrad {
                initial_accumulator,
                ..
            } => initial_accumulator,
            SparseOptimizer::Adam { .. } | SparseOptimizer::Sgd { .. } => 0.0,
        };
        self.state.extend(std::iter::repeat_n(
            initial_state,
            self.dim * self.optimizer.state_per_weight(),
        ));
        self.steps.push(0);
        slot
    }

    /// `(id, weights)` of every touched row, sorted by id: the table's content for artifacts and comparisons.
    pub fn rows(&self) -> Vec<(u64, &[f32])> {
        let mut rows: Vec<(u64, &[f32])> = self
            .slots
            .iter()
            .map(|(&id, &slot)| (id, &self.weights[slot * self.dim..(slot + 1) * self.dim]))
            .collect();
        rows.sort_by_key(|(id, _)| *id);
        rows
    }
}

/// Equal when configuration and every row (weights, optimizer state, steps) match, whatever the slot layout.
impl PartialEq for EmbeddingTable {
    fn eq(&self, other: &Self) -> bool {
        fn row(table: &EmbeddingTable, slot: usize) -> (&[f32], &[f32], u32) {
            let width = table.dim * table.optimizer.state_per_weight();
            (
                &table.weights[slot * table.dim..(slot + 1) * table.dim],
                &table.state[slot * width..(slot + 1) * width],
                table.steps[slot],
            )
        }
        self.dim == other.dim
            && self.init_std == other.init_std
            && self.seed == other.seed
            && self.optimizer == other.optimizer
            && self.slots.len() == other.slots.len()
            && self.slots.iter().all(|(id, &slot)| {
                other
                    .slots
                    .get(id)
                    .is_some_and(|&o| row(self, slot) == row(other, o))
            })
    }
}

impl EmbeddingTable {
    /// Serializes the table: header, then each touched row (id, weights, and with `with_state` the optimizer
    /// state and step count) in id order, little-endian.
    pub fn write_to(&self, out: &mut Vec<u8>, with_state: bool) {
        let per_weight = if with_state {
            self.optimizer.state_per_weight()
        } else {
            0
        };
        out.extend_from_slice(&(self.dim as u32).to_le_bytes());
        out.extend_from_slice(&self.init_std.to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        let optimizer = serde_json::to_vec(&self.optimizer).unwrap_or_default();
        out.extend_from_slice(&(optimizer.len() as u32).to_le_bytes());
        out.extend_from_slice(&optimizer);
        out.push(u8::from(with_state));
        let mut ids: Vec<(u64, usize)> = self.slots.iter().map(|(&id, &slot)| (id, slot)).collect();
        ids.sort_unstable();
        out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for (id, slot) in ids {
            out.extend_from_slice(&id.to_le_bytes());
            for w in &self.weights[slot * self.dim..(slot + 1) * self.dim] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            if with_state {
                let width = self.dim * per_weight;
                for s in &self.state[slot * width..(slot + 1) * width] {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                out.extend_from_slice(&self.steps[slot].to_le_bytes());
            }
        }
    }

    /// Reads a table written by [`EmbeddingTable::write_to`]; without saved state the optimizer starts fresh.
    pub fn read_from(input: &mut &[u8]) -> Result<Self, TableReadError> {
        let dim = read_u32(input)? as usize;
        let init_std = f32::from_le_bytes(take(input)?);
        let seed = u64::from_le_bytes(take(input)?);
        let optimizer_len = read_u32(input)? as usize;
        let optimizer = serde_json::from_slice(split(input, optimizer_len)?)
            .map_err(|_| TableReadError::Corrupt)?;
        let with_state = take::<1>(input)?[0] == 1;
        let rows = u64::from_le_bytes(take(input)?);
        if dim == 0 || dim > 65_536 {
            return Err(TableReadError::Corrupt);
        }
        let mut table = EmbeddingTable::new(dim, init_std, seed, optimizer);
        let per_weight = table.optimizer.state_per_weight();
        let row_bytes = 8
            + dim * 4
            + if with_state {
                dim * per_weight * 4 + 4
            } else {
                0
            };
        if (input.len() as u64) < rows.saturating_mul(row_bytes as u64) {
            return Err(TableReadError::Truncated);
        }
        for _ in 0..rows {
            let id = u64::from_le_bytes(take(input)?);
            let slot = table.slot(id);
            for k in 0..dim {
                table.weights[slot * dim + k] = f32::from_le_bytes(take(input)?);
            }
            if with_state {
                let width = dim * per_weight;
                for k in 0..width {
                    table.state[slot * width + k] = f32::from_le_bytes(take(input)?);
                }
                table.steps[slot] = read_u32(input)?;
            }
        }
        Ok(table)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableReadError {
    #[error("embedding table is truncated")]
    Truncated,
    #[error("embedding table is corrupt")]
    Corrupt,
}

fn split<'a>(input: &mut &'a [u8], len: usize) -> Result<&'a [u8], TableReadError> {
    if input.len() < len {
        return Err(TableReadError::Truncated);
    }
    let (head, rest) = input.split_at(len);
    *input = rest;
    Ok(head)
}

fn take<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], TableReadError> {
    let bytes = split(input, N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

fn read_u32(input: &mut &[u8]) -> Result<u32, TableReadError> {
    Ok(u32::from_le_bytes(take(input)?))
}

/// Normal(0, std) initial weight `k` of row `id`, from `(seed, id, k)` alone (SplitMix64 + Box–Muller): a
/// stateless function, so lazily created rows do not depend on creation order.
pub fn initial_value(seed: u64, id: u64, k: usize, std: f32) -> f32 {
    let base = splitmix64(
        seed ^ splitmix64(id.wrapping_add(0x9e37_79b9_7f4a_7c15))
            ^ (k as u64).wrapping_mul(0xd6e8_feb8_6659_fd93),
    );
    let u1 = ((base >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((splitmix64(base) >> 11) as f64) / (1u64 << 53) as f64;
    let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (normal * f64::from(std)) as f32
}

/// The parameter-server shard that owns row `key` among `shards`.
pub fn shard_of(key: u64, shards: usize) -> usize {
    (splitmix64(key) % shards.max(1) as u64) as usize
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_do_not_depend_on_touch_order() {
        let mut a = EmbeddingTable::new(4, 0.1, 9, SparseOptimizer::adagrad(0.1));
        let mut b = a.clone();
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        a.gather_into(&[1, 2, 3], &mut out_a);
        b.gather_into(&[3, 2, 1], &mut out_b);
        assert_eq!(a.rows(), b.rows());
        let mut untouched = Vec::new();
        a.read_into(&[77], &mut untouched);
        assert_eq!(untouched.len(), 4);
        assert!(untouched.iter().all(|x| x.abs() < 1.0));
    }

    #[test]
    fn initial_values_look_normal() {
        let values: Vec<f64> = (0..20_000)
            .map(|id| f64::from(initial_value(1, id, 0, 1.0)))
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn only_touched_rows_change_and_duplicates_are_summed() {
        let mut table = EmbeddingTable::new(2, 0.0, 0, SparseOptimizer::Sgd { learning_rate: 0.5 });
        let mut out = Vec::new();
        table.gather_into(&[1, 2], &mut out);
        table.apply_gradients(&[1, 1], &[1.0, 2.0, 3.0, 4.0]);
        let rows = table.rows();
        assert_eq!(rows[0], (1, &[-2.0f32, -3.0][..]));
        assert_eq!(rows[1], (2, &[0.0f32, 0.0][..]));
    }

    #[test]
    fn tables_round_trip_with_and_without_state() {
        let mut table = EmbeddingTable::new(3, 0.1, 4, SparseOptimizer::adam(0.01));
        let mut out = Vec::new();
        table.gather_into(&[9, 2, 700], &mut out);
        table.apply_gradients(&[9, 2], &[0.1, 0.2, 0.3, -0.1, -0.2, -0.3]);
        let mut bytes = Vec::new();
        table.write_to(&mut bytes, true);
        assert_eq!(
            EmbeddingTable::read_from(&mut bytes.as_slice()),
            Ok(table.clone())
        );
        let mut weights_only = Vec::new();
        table.write_to(&mut weights_only, false);
        let restored = EmbeddingTable::read_from(&mut weights_only.as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(restored.rows(), table.rows());
        assert_eq!(
            EmbeddingTable::read_from(&mut &bytes[..bytes.len() - 3]),
            Err(TableReadError::Truncated)
        );
    }

    #[test]
    fn adagrad_and_adam_follow_their_update_rules() {
        let mut adagrad = EmbeddingTable::new(
            1,
            0.0,
            0,
            SparseOptimizer::Adagrad {
                learning_rate: 0.1,
                initial_accumulator: 0.0,
                epsilon: 0.0,
            },
        );
        adagrad.apply_gradients(&[5], &[2.0]);
        assert!(
            (adagrad.rows()[0].1[0] - -0.1).abs() < 1e-7,
            "first Adagrad step moves by lr"
        );
        let mut adam = EmbeddingTable::new(
            1,
            0.0,
            0,
            SparseOptimizer::Adam {
                learning_rate: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 0.0,
            },
        );
        adam.apply_gradients(&[5], &[-3.0]);
        assert!(
            (adam.rows()[0].1[0] - 0.01).abs() < 1e-6,
            "first Adam step moves by lr"
        );
    }
}
