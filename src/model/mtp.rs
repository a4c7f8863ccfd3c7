//! The multi-token-prediction module (DeepSeek-V3 §2.2): depth `k` predicts token
//! `t_{i+k+1}` from the previous depth's representation of position `i` and the
//! embedding of `t_{i+k}`, through one more transformer block, sharing the model's
//! embedding and output head.

use super::block::{Block, FfnStats};
use burn::module::Module;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{backend::Backend, Tensor};
use burn_moe::ep::EpError;
use burn_moe::MoeBackend;

/// One MTP depth: `h'ᵢ = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}ᵢ)]`, then a block, then
/// its own final norm before the shared head.
///
/// The concatenation puts the embedding first, as DeepSeek's released weights do
/// (`eh_proj` is `[2·d, d]`, rows `0..d` for the embedding); the report writes the two
/// halves in the other order, which is the same model with `M`'s halves swapped.
#[derive(Module, Debug)]
pub struct MtpModule<B: Backend> {
    /// RMSNorm of the previous depth's representation (`hnorm`).
    pub hnorm: RmsNorm<B>,
    /// RMSNorm of the future token's embedding (`enorm`).
    pub enorm: RmsNorm<B>,
    /// The projection `M`, `[2·d_model, d_model]` (`eh_proj`).
    pub eh_proj: Linear<B>,
    /// The transformer block (a MoE block in DeepSeek-V3).
    pub block: Block<B>,
    /// RMSNorm before the shared head (`shared_head.norm`).
    pub norm: RmsNorm<B>,
}

impl<B: MoeBackend> MtpModule<B> {
    /// # Shapes
    /// `previous [B, L, d]`, `embedded [B, L, d]` (embeddings of the tokens `k` ahead) →
    /// `[B, L, d]`, the representation the head reads after `norm` and the next depth
    /// takes as `previous`.
    pub(crate) fn forward(&self, previous: Tensor<B, 3>, embedded: Tensor<B, 3>) -> Result<(Tensor<B, 3>, FfnStats<B>), EpError> {
        let joined = Tensor::cat(vec![self.enorm.forward(embedded), self.hnorm.forward(previous)], 2);
        self.block.forward(self.eh_proj.forward(joined))
    }
}
