//! The CTR models in burn: `logistic`, `wide_deep` and `deepfm`. The dense part (linear terms, MLP) is a burn
//! Module trained by a burn optimizer; the embedding rows come in as plain tensors gathered from
//! [`crate::embedding::EmbeddingTable`]s, so their gradients stay sparse.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    #[serde(rename = "logistic")]
    Logistic,
    #[serde(rename = "wide_deep")]
    WideDeep,
    #[serde(rename = "deepfm")]
    DeepFm,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// Width of the factor embeddings (unused by `logistic`).
    pub embedding_dim: usize,
    pub hidden_layers: Vec<usize>,
    /// Categorical fields (one embedding row each per example).
    pub fields: usize,
    /// Numeric inputs.
    pub numeric: usize,
}

impl ModelConfig {
    /// Whether the model reads factor embeddings (everything but `logistic`).
    pub fn uses_factors(&self) -> bool {
        self.architecture != Architecture::Logistic
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> CtrModel<B> {
        let numeric = LinearConfig::new(self.numeric.max(1), 1).init(device);
        let mut hidden = Vec::new();
        let mut head = None;
        if self.uses_factors() {
            let mut width = self.fields * self.embedding_dim + self.numeric;
            for &layer in &self.hidden_layers {
                hidden.push(LinearConfig::new(width, layer).init(device));
                width = layer;
            }
            head = Some(LinearConfig::new(width, 1).init(device));
        }
        CtrModel {
            numeric,
            hidden,
            head,
            fm: self.architecture == Architecture::DeepFm,
            has_numeric: self.numeric > 0,
        }
    }
}

/// The dense part of a CTR model.
#[derive(Module, Debug)]
pub struct CtrModel<B: Backend> {
    /// Linear term of the numeric inputs, with the global bias.
    numeric: Linear<B>,
    hidden: Vec<Linear<B>>,
    head: Option<Linear<B>>,
    /// Adds the factorization-machine pairwise term (DeepFM).
    fm: bool,
    has_numeric: bool,
}

impl<B: Backend> CtrModel<B> {
    /// The model with its linear term reset: numeric weights 0 and the global bias `bias`, so that, with the
    /// first-order rows starting at 0 too, a fresh linear model predicts σ(bias) for every example.
    pub fn with_linear_start(mut self, bias: f32) -> Self {
        let fill = |param: Param<Tensor<B, 1>>, value: f32| {
            param.map(|tensor| {
                let require_grad = tensor.is_require_grad();
                let replaced = Tensor::full(tensor.shape(), value, &tensor.device());
                if require_grad {
                    replaced.require_grad()
                } else {
                    replaced
                }
            })
        };
        self.numeric.bias = self.numeric.bias.map(|param| fill(param, bias));
        self.numeric.weight = self.numeric.weight.map(|tensor| {
            let require_grad = tensor.is_require_grad();
            let zeros = Tensor::zeros(tensor.shape(), &tensor.device());
            if require_grad {
                zeros.require_grad()
            } else {
                zeros
            }
        });
        self
    }

    /// Logits `[batch]` from first-order weights `[batch, fields]`, factor rows `[batch, fields, dim]` (not for
    /// `logistic`) and numeric inputs `[batch, numeric]`.
    pub fn forward(
        &self,
        first_order: Tensor<B, 2>,
        factors: Option<Tensor<B, 3>>,
        numeric: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        let [batch, fields] = first_order.dims();
        let numeric_input = if self.has_numeric {
            numeric.clone()
        } else {
            Tensor::zeros([batch, 1], &numeric.device())
        };
        // Sums over fields and factor components are matmuls with constant 0/1 matrices rather than `sum_dim`:
        // burn's `sum_dim` backward broadcasts the gradient through a strided element-by-element copy, which took
        // over a third of a training step; a matmul's backward is two contiguous gemms.
        let device = first_order.device();
        let mut logit = first_order.matmul(Tensor::ones([fields, 1], &device))
            + self.numeric.forward(numeric_input);
        if let Some(factors) = factors {
            let [_, _, dim] = factors.dims();
            let x = factors.reshape([batch, fields * dim]);
            if self.fm {
                // ½ Σ_k ((Σ_f v_fk)² − Σ_f v_fk²): all pairwise field interactions in O(fields · dim).
                let field_sum = field_sum_matrix::<B>(fields, dim, &device);
                let sum = x.clone().matmul(field_sum.clone());
                let square_of_sum = sum.clone() * sum;
                let sum_of_squares = x.clone().square().matmul(field_sum);
                let pairwise =
                    (square_of_sum - sum_of_squares).matmul(Tensor::ones([dim, 1], &device)) * 0.5;
                logit = logit + pairwise;
            }
            let mut x = x;
            if self.has_numeric {
                x = Tensor::cat(vec![x, numeric], 1);
            }
            for layer in &self.hidden {
                x = relu(layer.forward(x));
            }
            if let Some(head) = &self.head {
                logit = logit + head.forward(x);
            }
        }
        logit.reshape([batch])
    }
}

/// `[fields · dim, dim]` matrix that sums a row of `fields` concatenated `dim`-wide factors into one factor.
fn field_sum_matrix<B: Backend>(fields: usize, dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let values = (0..fields * dim)
        .flat_map(|row| (0..dim).map(move |column| if row % dim == column { 1.0f32 } else { 0.0 }))
        .collect::<Vec<_>>();
    Tensor::from_data(TensorData::new(values, [fields * dim, dim]), device)
}

/// Mean binary cross-entropy of `logits` against 0/1 `labels`, computed stably:
/// max(z, 0) − z·y + ln(1 + e^−|z|).
pub fn bce_with_logits<B: Backend>(logits: Tensor<B, 1>, labels: Tensor<B, 1>) -> Tensor<B, 1> {
    let softplus_part = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * labels + softplus_part).mean()
}

/// Every dense parameter of `model`, flattened in module order (for parameter averaging across workers).
pub fn dense_parameters<B: Backend>(model: &CtrModel<B>) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend(data.to_vec::<f32>().unwrap_or_default());
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dense parameters have {got} values, the model needs {expected}")]
pub struct DenseShapeError {
    pub expected: usize,
    pub got: usize,
}

/// `model` with its dense parameters replaced by `values` (as [`dense_parameters`] lays them out).
pub fn with_dense_parameters<B: Backend>(
    model: CtrModel<B>,
    values: &[f32],
) -> Result<CtrModel<B>, DenseShapeError> {
    let expected = model.num_params();
    if values.len() != expected {
        return Err(DenseShapeError {
            expected,
            got: values.len(),
        });
    }
    struct Load<'a>(&'a [f32]);
    impl<B: Backend> ModuleMapper<B> for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|tensor| {
                let shape = tensor.shape();
                let count = shape.num_elements();
                let (mine, rest) = self.0.split_at(count.min(self.0.len()));
                self.0 = rest;
                let require_grad = tensor.is_require_grad();
                let replaced =
                    Tensor::from_data(TensorData::new(mine.to_vec(), shape), &tensor.device());
                if require_grad {
                    replaced.require_grad()
                } else {
                    replaced
                }
            })
        }
    }
    Ok(model.map(&mut Load(values)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn dense_parameters_round_trip() {
        let config = ModelConfig {
            architecture: Architecture::DeepFm,
            embedding_dim: 3,
            hidden_layers: vec![5],
            fields: 2,
            numeric: 1,
        };
        let model = config.init::<Flex>(&Default::default());
        let values = dense_parameters(&model);
        assert_eq!(values.len(), model.num_params());
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        let other = with_dense_parameters(config.init::<Flex>(&Default::default()), &doubled)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dense_parameters(&other), doubled);
        assert!(with_dense_parameters(other, &values[1..]).is_err());
    }

    #[test]
    fn deepfm_adds_every_pairwise_field_interaction_and_the_first_order_sum() {
        let (batch, fields, dim) = (3, 4, 5);
        let config = ModelConfig {
            architecture: Architecture::DeepFm,
            embedding_dim: dim,
            hidden_layers: vec![6],
            fields,
            numeric: 1,
        };
        let device = Default::default();
        let deepfm = config.init::<Flex>(&device);
        // The same dense weights (a clone of lazily initialised parameters would draw its own).
        let mut without_fm = with_dense_parameters(deepfm.clone(), &dense_parameters(&deepfm))
            .unwrap_or_else(|e| panic!("{e}"));
        without_fm.fm = false;
        let value = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        let factors: Vec<f32> = (0..batch * fields * dim).map(value).collect();
        let first: Vec<f32> = (0..batch * fields).map(|i| value(i + 5)).collect();
        let numeric: Vec<f32> = (0..batch).map(|i| value(i + 9)).collect();
        let logits = |model: &CtrModel<Flex>, first: Vec<f32>| {
            let out = model.forward(
                Tensor::from_data(TensorData::new(first, [batch, fields]), &device),
                Some(Tensor::from_data(
                    TensorData::new(factors.clone(), [batch, fields, dim]),
                    &device,
                )),
                Tensor::from_data(TensorData::new(numeric.clone(), [batch, 1]), &device),
            );
            out.into_data()
                .to_vec::<f32>()
                .unwrap_or_else(|e| panic!("{e:?}"))
        };
        let with_pairs = logits(&deepfm, first.clone());
        let without_pairs = logits(&without_fm, first.clone());
        let shifted_first = first.iter().map(|w| w + 0.25).collect();
        let with_shifted_first = logits(&without_fm, shifted_first);
        for row in 0..batch {
            let factor = |f: usize, k: usize| factors[(row * fields + f) * dim + k];
            let mut pairs = 0.0f32;
            for i in 0..fields {
                for j in i + 1..fields {
                    pairs += (0..dim).map(|k| factor(i, k) * factor(j, k)).sum::<f32>();
                }
            }
            assert!(
                (with_pairs[row] - without_pairs[row] - pairs).abs() < 1e-4,
                "row {row}"
            );
            let first_order_shift = with_shifted_first[row] - without_pairs[row];
            assert!(
                (first_order_shift - 0.25 * fields as f32).abs() < 1e-4,
                "row {row}"
            );
        }
    }
}
