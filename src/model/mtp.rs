//! The multi-token-prediction module (DeepSeek-V3 §2.2): depth `k` predicts token
//! `t_{i+k+1}` from the previous depth's representation of position `i` and the
//! embedding of `t_{i+k}`, through one more transformer block, sharing the model's
//! embedding and output head.

use super::add;
use super::block::{Block, FfnStats};
use super::units::Units;
use super::ModelBackend;
use burn::module::Module;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{backend::Backend, Tensor};
use burn_moe::ep::EpError;
use burn_moe::mla::{CacheError, LatentCache, SeqId};

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

impl<B: ModelBackend> MtpModule<B> {
    /// # Shapes
    /// `previous [B, L, d]`, `embedded [B, L, d]` (embeddings of the tokens `k` ahead) →
    /// `[B, L, d]`, the representation the head reads after `norm` and the next depth
    /// takes as `previous`.
    pub(crate) fn forward(&self, previous: Tensor<B, 3>, embedded: Tensor<B, 3>) -> Result<(Tensor<B, 3>, FfnStats<B>), EpError> {
        let joined = Tensor::cat(vec![self.enorm.forward(embedded), self.hnorm.forward(previous)], 2);
        self.block.forward(self.eh_proj.forward(joined))
    }

    /// The cached path of [`MtpModule::forward`]: row `i` pairs the previous depth's
    /// representation of a position with the embedding of the token after it, for
    /// sequence `ids[i]`, appended to the block's `cache`. Returns the block output,
    /// before `norm`.
    ///
    /// # Shapes
    /// `previous [n, d]`, `embedded [n, d]` → `[n, d]`.
    pub(crate) fn forward_cached(&self, previous: Tensor<B, 2>, embedded: Tensor<B, 2>, ids: &[SeqId], cache: &mut LatentCache<B>) -> Result<Tensor<B, 2>, CacheError> {
        let joined = Tensor::cat(vec![self.enorm.forward(embedded), self.hnorm.forward(previous)], 1);
        self.block.forward_cached(self.eh_proj.forward(joined), ids, cache)
    }
}

/// What [`run_depths`] gives: each depth's logits and the MoE statistics of its block.
pub(crate) struct MtpOutput<B: Backend> {
    /// Depth `k`'s logits `[B, S − k, vocab]` (predicting tokens `k + 1 ..= S`).
    pub logits: Vec<Tensor<B, 3>>,
    /// Routed tokens per expert of the depths' MoE layers, depth 1 first.
    pub counts: Vec<burn::tensor::Tensor<B, 1, burn::tensor::Int>>,
    /// The depths' weighted balance losses, summed.
    pub balance_loss: Option<Tensor<B, 1>>,
}

/// Runs the MTP depths after the main model: depth `k` reads the previous depth's first
/// `S − k` positions (`hidden [B, S, d]`, the main model's final hidden state after its
/// final norm, for depth 1; depth `k > 1` the previous depth's block output before its
/// `shared_head.norm`, as vLLM chains its MTP steps)
/// and `embedded(k)`, the embeddings of tokens `k..S` (`[B, S − k, d]`), and its logits
/// come from the shared `head`.
pub(crate) fn run_depths<B: ModelBackend, U: Units<B>>(
    modules: &[MtpModule<B>],
    head: &Linear<B>,
    hidden: Tensor<B, 3>,
    embedded: impl Fn(usize) -> Tensor<B, 3>,
    units: &U,
) -> Result<MtpOutput<B>, U::Error> {
    let [b, s, d] = hidden.dims();
    let mut out = MtpOutput { logits: Vec::with_capacity(modules.len()), counts: Vec::new(), balance_loss: None };
    let mut previous = hidden;
    for (i, module) in modules.iter().enumerate() {
        let k = i + 1;
        // Each module from `units` just before its forward, dropped after it.
        let module = units.unit(module)?;
        let (h, stats) = module.forward(previous.slice([0..b, 0..s - k, 0..d]), embedded(k))?;
        out.counts.extend(stats.counts);
        out.balance_loss = add(out.balance_loss, stats.balance_loss);
        out.logits.push(head.forward(module.norm.forward(h.clone())));
        previous = h;
    }
    Ok(out)
}
