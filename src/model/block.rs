//! One transformer block of the model: pre-norm MLA attention and a pre-norm MLP that is
//! either a dense SwiGLU (optionally FP8) or the DeepSeekMoE layer.

use super::ep::ExpertShard;
use super::units::Units;
use super::ModelBackend;
use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig, RmsNorm};
use burn::tensor::{backend::Backend, Int, Tensor};
use burn_fp8::linear::{Fp8Linear, Fp8Recipe, LinearLayer};
use burn_fp8::Fp8Backend;
use burn_moe::ep::EpError;
use burn_moe::mla::{CacheError, LatentCache, SeqId};
use burn_moe::moe::SwiGluMlp;
use burn_moe::{Mla, Moe};

/// A bias-free projection in f32 (Burn's `Linear`) or FP8 (`Fp8Linear`); both keep the
/// f32 master weight `[d_input, d_output]`.
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// f32 GEMMs.
    F32(Linear<B>),
    /// FP8 GEMMs (forward, input and weight gradients), DeepSeek-V3's recipe.
    Fp8(Fp8Linear<B>),
}

impl<B: Backend> Projection<B> {
    fn new(d_input: usize, d_output: usize, init: &Initializer, fp8: Option<Fp8Recipe>, device: &B::Device) -> Self {
        let linear = LinearConfig::new(d_input, d_output).with_bias(false).with_initializer(init.clone()).init(device);
        match fp8 {
            Some(recipe) => Self::Fp8(Fp8Linear::from(linear).with_recipe(recipe)),
            None => Self::F32(linear),
        }
    }

    /// The f32 weight `[d_input, d_output]`.
    pub fn weight(&self) -> Tensor<B, 2> {
        match self {
            Self::F32(l) => l.weight.val(),
            Self::Fp8(l) => l.weight.val(),
        }
    }
}

impl<B: Fp8Backend> LinearLayer<B> for Projection<B> {
    /// An f32 projection (wrap an `Fp8Linear` in [`Projection::Fp8`] for FP8).
    fn init(config: &LinearConfig, device: &B::Device) -> Self {
        Self::F32(config.init(device))
    }

    /// `x · W`.
    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::F32(l) => l.forward(x),
            Self::Fp8(l) => l.forward(x),
        }
    }
}

/// The dense SwiGLU MLP of the first layers, `(silu(x·W_gate) ⊙ x·W_up) · W_down`:
/// burn-moe's SwiGLU over [`Projection`]s (f32 or FP8).
pub type DenseMlp<B> = SwiGluMlp<B, Projection<B>>;

/// Normal(0, `std`) weights; FP8 GEMMs with `fp8`.
pub(crate) fn dense_mlp<B: Backend>(d_model: usize, d_ffn: usize, std: f64, fp8: Option<Fp8Recipe>, device: &B::Device) -> DenseMlp<B> {
    let init = Initializer::Normal { mean: 0.0, std };
    let projection = |i, o| Projection::new(i, o, &init, fp8, device);
    SwiGluMlp::from_projections(projection(d_model, d_ffn), projection(d_model, d_ffn), projection(d_ffn, d_model))
}

/// A block's MLP.
#[derive(Module, Debug)]
pub enum Ffn<B: Backend> {
    /// The dense MLP (the first `n_dense_layers`).
    Dense(DenseMlp<B>),
    /// The DeepSeekMoE layer.
    Moe(Moe<B>),
    /// This rank's part of the DeepSeekMoE layer under expert parallelism
    /// ([`DeepSeekV3::shard_experts`](super::DeepSeekV3::shard_experts)).
    ExpertParallel(ExpertShard<B>),
}

/// What an MLP adds to the block's statistics: the routed tokens per expert and the
/// weighted balance loss (MoE layers only).
pub(crate) struct FfnStats<B: Backend> {
    pub counts: Option<Tensor<B, 1, Int>>,
    pub balance_loss: Option<Tensor<B, 1>>,
}

impl<B: Backend> Block<B> {
    /// The block with its MoE layer's balancing bias updated from `counts` (the next
    /// count tensor of the model's MoE layers); a dense block is returned as it is.
    pub(crate) fn update_bias(self, counts: &mut impl Iterator<Item = Tensor<B, 1, Int>>) -> Self {
        let mut next = || counts.next().expect("one count tensor per MoE layer (checked by the caller)");
        let ffn = match self.ffn {
            Ffn::Moe(moe) => Ffn::Moe(moe.update_bias(next())),
            Ffn::ExpertParallel(mut shard) => {
                shard.layer.moe = shard.layer.moe.update_bias(next());
                Ffn::ExpertParallel(shard)
            }
            dense => dense,
        };
        Self { ffn, ..self }
    }

    /// Whether the MLP is a MoE layer (whole or sharded).
    pub(crate) fn is_moe(&self) -> bool {
        !matches!(self.ffn, Ffn::Dense(_))
    }
}

/// What [`run_blocks`] gives: the last block's output and the blocks' MoE statistics.
pub(crate) struct BlocksOutput<B: Backend> {
    pub hidden: Tensor<B, 3>,
    /// Routed tokens per expert of each MoE block, in order.
    pub counts: Vec<Tensor<B, 1, Int>>,
    /// The MoE blocks' weighted balance losses, summed.
    pub balance_loss: Option<Tensor<B, 1>>,
}

/// `x [B, S, d_model]` through `blocks` in order (training forward), each block taken
/// from `units` just before its forward and dropped after it.
pub(crate) fn run_blocks<B: ModelBackend, U: Units<B>>(blocks: &[Block<B>], x: Tensor<B, 3>, units: &U) -> Result<BlocksOutput<B>, U::Error> {
    let mut out = BlocksOutput { hidden: x, counts: Vec::new(), balance_loss: None };
    for block in blocks {
        let (h, stats) = units.unit(block)?.forward(out.hidden)?;
        out.hidden = h;
        out.counts.extend(stats.counts);
        out.balance_loss = super::add(out.balance_loss, stats.balance_loss);
    }
    Ok(out)
}

/// `x + MLA(norm(x))`, then `h + MLP(norm(h))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// RMSNorm before attention (`input_layernorm`).
    pub attn_norm: RmsNorm<B>,
    /// Multi-head Latent Attention.
    pub attn: Mla<B>,
    /// RMSNorm before the MLP (`post_attention_layernorm`).
    pub ffn_norm: RmsNorm<B>,
    /// The MLP.
    pub ffn: Ffn<B>,
}

impl<B: ModelBackend> Block<B> {
    /// Training forward (causal over positions `0..S`).
    ///
    /// # Shapes
    /// `x [B, S, d_model]` → `[B, S, d_model]`.
    pub(crate) fn forward(&self, x: Tensor<B, 3>) -> Result<(Tensor<B, 3>, FfnStats<B>), EpError> {
        let h = x.clone() + self.attn.forward(self.attn_norm.forward(x));
        self.mlp(h)
    }

    /// The cached path: `x [n, d_model]`, row `i` the next token of sequence `ids[i]`,
    /// appended to `cache` (a prompt: one id `n` times; a decode step of a batch: one row
    /// per sequence). Runs on models whose experts are not sharded
    /// ([`Session::new`](super::Session::new) checks).
    pub(crate) fn forward_cached(&self, x: Tensor<B, 2>, ids: &[SeqId], cache: &mut LatentCache<B>) -> Result<Tensor<B, 2>, CacheError> {
        let normed = self.attn_norm.forward(x.clone());
        let attn = self.attn.decode(normed, ids, cache)?;
        let (h, _) = self.mlp((x + attn).unsqueeze_dim(0)).expect("sessions run on models with unsharded experts");
        Ok(h.squeeze_dim(0))
    }

    fn mlp(&self, h: Tensor<B, 3>) -> Result<(Tensor<B, 3>, FfnStats<B>), EpError> {
        let normed = self.ffn_norm.forward(h.clone());
        let out = match &self.ffn {
            Ffn::Dense(mlp) => return Ok((h + mlp.forward(normed), FfnStats { counts: None, balance_loss: None })),
            Ffn::Moe(moe) => moe.forward(normed),
            Ffn::ExpertParallel(shard) => shard.layer.forward(normed, &shard.comm)?.moe,
        };
        Ok((h + out.output, FfnStats { counts: Some(out.counts), balance_loss: out.balance_loss }))
    }
}
