//! A decoder-only transformer: token and position embeddings, pre-norm causal self-attention
//! and MLP blocks (burn's `TransformerEncoder` with an autoregressive mask), a final norm and a
//! linear head.
//!
//! burn 0.22: no backend generic; the model lives on the device it was initialised on (with
//! autodiff for training, `model.valid()` without).

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

#[derive(Config, Debug)]
pub struct LmConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub context: usize,
}

#[derive(Module, Debug)]
pub struct Lm {
    tokens: Embedding,
    positions: Embedding,
    blocks: TransformerEncoder,
    norm: LayerNorm,
    pub head: Linear,
}

impl LmConfig {
    pub fn init(&self, device: &Device) -> Lm {
        Lm {
            tokens: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            positions: EmbeddingConfig::new(self.context, self.d_model).init(device),
            blocks: TransformerEncoderConfig::new(
                self.d_model,
                4 * self.d_model,
                self.heads,
                self.layers,
            )
            .with_dropout(0.0)
            .with_norm_first(true)
            .init(device),
            norm: LayerNormConfig::new(self.d_model).init(device),
            head: LinearConfig::new(self.d_model, self.vocab).init(device),
        }
    }

    /// Parameters, for the table.
    pub fn params(&self) -> usize {
        let d = self.d_model;
        self.vocab * d * 2 + self.vocab + self.context * d + self.layers * (12 * d * d + 13 * d)
    }
}

impl Lm {
    /// The device of the model's parameters.
    pub fn device(&self) -> Device {
        self.head.weight.val().device()
    }

    /// `[B, T]` tokens → `[B·T, D]` final hidden states (row `b·T + t` predicts token `t + 1`).
    pub fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device)
            .reshape([1, t])
            .repeat_dim(0, b);
        let x = self.tokens.forward(tokens) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask(b, t, &device);
        let x = self
            .blocks
            .forward(TransformerEncoderInput::new(x).mask_attn(mask));
        let [_, _, d] = x.dims();
        self.norm.forward(x).reshape([b * t, d])
    }

    /// `[B, T]` tokens → `[B·T, V]` logits.
    pub fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        self.head.forward(self.hidden(tokens))
    }
}
