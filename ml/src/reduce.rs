//! Data-parallel gradient exchange: what one worker contributes to a synchronous step, and the interface of
//! whatever combines the contributions of all workers (a collective over the network, or nothing at all).
//!
//! Every worker holds a full replica of the model and its embedding tables. Each step, every worker computes
//! the gradients of its share of the global batch; after the reduction all of them hold the gradients of the
//! whole batch and apply the same update, so the replicas stay identical without ever sending weights.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::embedding::{distinct_keys, sum_rows};
use crate::model::CtrModel;

/// One worker's gradients for one step, or (after [`GradientReducer::reduce`]) the whole batch's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepGradients {
    /// Examples these gradients are the mean over.
    pub examples: usize,
    /// Gradients of every dense parameter, flattened in module order.
    pub dense: Vec<f32>,
    /// Embedding row keys (repeats allowed; repeated rows' gradients add up).
    pub keys: Vec<u64>,
    /// One gradient per key for the first-order table.
    pub first_order: Vec<f32>,
    /// `embeddingDim` gradients per key for the factor table (empty for `logistic`).
    pub factors: Vec<f32>,
}

impl StepGradients {
    /// The gradient of the mean loss over the union of `parts`' examples: each part is the mean over its own
    /// examples, so dense gradients are averaged weighted by example count and sparse ones are kept per row,
    /// scaled by the part's share. Parts are taken in the given (rank) order, so every worker that reduces
    /// the same parts gets bit-identical results.
    pub fn combine(parts: &[StepGradients]) -> StepGradients {
        let total: usize = parts.iter().map(|p| p.examples).sum();
        let dense_len = parts.iter().map(|p| p.dense.len()).max().unwrap_or(0);
        let mut combined = StepGradients {
            examples: total,
            dense: vec![0.0; dense_len],
            ..StepGradients::default()
        };
        if total == 0 {
            return combined;
        }
        for part in parts.iter().filter(|p| p.examples > 0) {
            let share = part.examples as f32 / total as f32;
            for (sum, g) in combined.dense.iter_mut().zip(&part.dense) {
                *sum += share * g;
            }
            combined.keys.extend_from_slice(&part.keys);
            combined
                .first_order
                .extend(part.first_order.iter().map(|g| share * g));
            combined
                .factors
                .extend(part.factors.iter().map(|g| share * g));
        }
        combined.sum_repeated_rows();
        combined
    }

    /// Merges repeated keys into one, adding their gradients in order of appearance (what the table's update
    /// would do): a batch touches each popular row many times, and every copy would cross the network and be
    /// added up again by every worker.
    fn sum_repeated_rows(&mut self) {
        let factor_width = if self.keys.is_empty() {
            0
        } else {
            self.factors.len() / self.keys.len()
        };
        let (keys, indices) = distinct_keys(&self.keys);
        self.first_order = sum_rows(&self.first_order, 1, &indices, keys.len());
        self.factors = sum_rows(&self.factors, factor_width, &indices, keys.len());
        self.keys = keys;
    }
}

/// Combines one step's gradients across all workers, in place.
pub trait GradientReducer {
    type Error: std::error::Error + Send + Sync + 'static;
    fn reduce(&mut self, gradients: &mut StepGradients) -> Result<(), Self::Error>;
}

/// The gradients `grads` holds for `model`'s dense parameters, flattened in module order; a parameter without
/// a gradient contributes zeros so every worker's vector has the same layout.
pub fn flatten_dense<B: AutodiffBackend>(model: &CtrModel<B>, grads: &GradientsParams) -> Vec<f32> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(grad) => {
                    let data = grad.into_data().convert::<f32>();
                    self.out.extend(data.to_vec::<f32>().unwrap_or_default());
                }
                None => self
                    .out
                    .extend(std::iter::repeat_n(0.0, param.val().shape().num_elements())),
            }
        }
    }
    let mut visitor = Flatten {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

/// Number of dense parameters of `model`: the length of [`flatten_dense`]'s vector.
pub fn dense_len<B: AutodiffBackend>(model: &CtrModel<B>) -> usize {
    struct Count(usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.val().shape().num_elements();
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// The inverse of [`flatten_dense`]: gradients for `model`'s parameters from a flat vector.
pub fn unflatten_dense<B: AutodiffBackend>(
    model: &CtrModel<B>,
    flat: &[f32],
    device: &B::Device,
) -> GradientsParams {
    struct Unflatten<'a, B: AutodiffBackend> {
        flat: &'a [f32],
        offset: usize,
        grads: GradientsParams,
        device: B::Device,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.val().shape();
            let len = shape.num_elements();
            let end = (self.offset + len).min(self.flat.len());
            let mut values = self.flat[self.offset.min(end)..end].to_vec();
            values.resize(len, 0.0);
            self.offset += len;
            let grad = Tensor::<B::InnerBackend, D>::from_data(
                TensorData::new(values, shape),
                &self.device,
            );
            self.grads.register(param.id, grad);
        }
    }
    let mut visitor = Unflatten::<B> {
        flat,
        offset: 0,
        grads: GradientsParams::new(),
        device: device.clone(),
    };
    model.visit(&mut visitor);
    visitor.grads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(examples: usize, dense: Vec<f32>, keys: Vec<u64>, first: Vec<f32>) -> StepGradients {
        StepGradients {
            examples,
            dense,
            keys,
            first_order: first,
            factors: Vec::new(),
        }
    }

    #[test]
    fn combining_weights_each_part_by_its_examples() {
        let combined = StepGradients::combine(&[
            part(3, vec![1.0, 2.0], vec![7], vec![1.0]),
            part(1, vec![5.0, 6.0], vec![7, 9], vec![2.0, 4.0]),
        ]);
        assert_eq!(combined.examples, 4);
        assert_eq!(combined.dense, vec![0.75 + 1.25, 1.5 + 1.5]);
        assert_eq!(combined.keys, vec![7, 9]);
        assert_eq!(combined.first_order, vec![0.75 + 0.5, 1.0]);
    }

    #[test]
    fn a_worker_without_examples_contributes_nothing() {
        let combined = StepGradients::combine(&[
            part(2, vec![1.0], vec![1], vec![3.0]),
            part(0, vec![0.0], vec![], vec![]),
        ]);
        assert_eq!(combined.dense, vec![1.0]);
        assert_eq!(combined.first_order, vec![3.0]);
        assert_eq!(StepGradients::combine(&[]).examples, 0);
    }

    #[test]
    fn repeated_rows_are_summed_in_order_of_appearance() {
        let mut gradients = StepGradients {
            examples: 3,
            dense: vec![1.0],
            keys: vec![4, 2, 4, 4],
            first_order: vec![1.0, 2.0, 3.0, 4.0],
            factors: vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0],
        };
        gradients.sum_repeated_rows();
        assert_eq!(gradients.keys, vec![4, 2]);
        assert_eq!(gradients.first_order, vec![8.0, 2.0]);
        assert_eq!(gradients.factors, vec![8.0, 80.0, 2.0, 20.0]);
        assert_eq!(gradients.dense, vec![1.0]);

        let mut logistic = StepGradients {
            keys: vec![1, 1],
            first_order: vec![0.5, 0.25],
            ..StepGradients::default()
        };
        logistic.sum_repeated_rows();
        assert_eq!((logistic.keys, logistic.first_order), (vec![1], vec![0.75]));
        assert!(logistic.factors.is_empty());
    }
}
