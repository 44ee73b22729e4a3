//! A batch's inputs: the example order of an epoch, the embedding keys and dense inputs of a batch, and
//! tensors read back as numbers.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::EncodedDataset;
use crate::tables::row_key;

/// The example order of `epoch`: a shuffle seeded by `(seed, epoch)` only.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    order
}

/// `rows` (one `width`-wide row per distinct key) laid out by batch position: position p holds row `positions[p]`.
pub(super) fn spread_rows(rows: &[f32], width: usize, positions: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(positions.len() * width);
    for &row in positions {
        out.extend_from_slice(&rows[row * width..(row + 1) * width]);
    }
    out
}

pub(super) fn batch_keys(data: &EncodedDataset, batch: &[usize]) -> Vec<u64> {
    let fields = data.fields;
    let mut keys = Vec::with_capacity(batch.len() * fields);
    for &row in batch {
        for (field, &index) in data.categorical[row * fields..(row + 1) * fields]
            .iter()
            .enumerate()
        {
            keys.push(row_key(field, index));
        }
    }
    keys
}

pub(super) fn batch_inputs<B: Backend>(
    data: &EncodedDataset,
    batch: &[usize],
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let width = data.numeric_width;
    let mut numeric = Vec::with_capacity(batch.len() * width.max(1));
    let mut labels = Vec::with_capacity(batch.len());
    for &row in batch {
        if width == 0 {
            numeric.push(0.0);
        } else {
            numeric.extend_from_slice(&data.numeric[row * width..(row + 1) * width]);
        }
        labels.push(data.labels[row]);
    }
    (
        Tensor::from_data(
            TensorData::new(numeric, [batch.len(), width.max(1)]),
            device,
        ),
        Tensor::from_data(TensorData::new(labels, [batch.len()]), device),
    )
}

pub(super) fn floats(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

pub(super) fn scalar(data: TensorData) -> f64 {
    floats(data)
        .first()
        .copied()
        .map(f64::from)
        .unwrap_or(f64::NAN)
}
