//! The CTR models in burn: `logistic`, `wide_deep` and `deepfm`. The dense part (linear terms, MLP) is a burn
//! Module trained by a burn optimizer; the embedding rows come in as plain tensors gathered from
//! [`crate::embedding::EmbeddingTable`]s, so their gradients stay sparse.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
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
        let mut logit = first_order.sum_dim(1) + self.numeric.forward(numeric_input);
        if let Some(factors) = factors {
            let [_, _, dim] = factors.dims();
            if self.fm {
                // ½ Σ_k ((Σ_f v_fk)² − Σ_f v_fk²): all pairwise field interactions in O(fields · dim).
                let sum = factors.clone().sum_dim(1);
                let square_of_sum = sum.clone() * sum;
                let sum_of_squares = (factors.clone() * factors.clone()).sum_dim(1);
                let pairwise = (square_of_sum - sum_of_squares)
                    .sum_dim(2)
                    .reshape([batch, 1])
                    * 0.5;
                logit = logit + pairwise;
            }
            let mut x = factors.reshape([batch, fields * dim]);
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

/// Mean binary cross-entropy of `logits` against 0/1 `labels`, computed stably:
/// max(z, 0) − z·y + ln(1 + e^−|z|).
pub fn bce_with_logits<B: Backend>(logits: Tensor<B, 1>, labels: Tensor<B, 1>) -> Tensor<B, 1> {
    let softplus_part = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * labels + softplus_part).mean()
}
