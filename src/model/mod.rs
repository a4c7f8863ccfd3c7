//! A DeepSeek-V3-shaped language model built from the workspace's modules: MLA attention
//! in every block, DeepSeekMoE layers after the first dense ones, optional FP8 GEMMs, and
//! multi-token prediction.
//!
//! - [`DeepSeekV3Config`] holds the shape ([`DeepSeekV3Config::deepseek_v3`],
//!   [`DeepSeekV3Config::tiny`], or [`crate::hf::HfDeepSeekConfig::model`] from a
//!   `config.json`); [`DeepSeekV3Config::init`] builds the model.
//! - [`DeepSeekV3::forward`] gives the logits and the per-layer expert counts;
//!   [`DeepSeekV3::loss`] the training objective `L_main + λ/D · Σ_k L_MTP,k` (plus the
//!   MoE balance losses) with its parts; [`DeepSeekV3::update_bias`] applies the
//!   auxiliary-loss-free balancing update after an optimizer step.
//! - [`DeepSeekV3::shard_experts`] spreads every MoE layer's experts over the ranks of a
//!   `burn_moe::comm::Comm` group (expert parallelism, the rest data-parallel);
//!   [`DeepSeekV3::sync_grads`] and [`DeepSeekV3::unshard_experts`] go with it.
//! - [`DeepSeekV3::into_stages`] cuts the model into [`ModelStage`]s for
//!   `burn_dualpipe`'s executor (DualPipe, DualPipeV, 1F1B, ZB1P over several devices);
//!   [`StageObjective`] feeds the first and scores the last.
//! - [`Session`] generates with a [`LatentCache`](burn_moe::mla::LatentCache) per layer
//!   (the prompt in one pass, then one token per step through MLA's absorbed decode);
//!   [`Batch`] serves several sequences at once over shared paged caches (continuous
//!   batching: sequences join and leave between steps); [`Speculative`] decodes greedily
//!   with the first MTP module drafting the token after next (speculative decoding).
//! - [`crate::hf::weights`] loads and saves the weights under Hugging Face's key names.
//!
//! # Example
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Int, Tensor, TensorData};
//! use burn_deepseek::model::DeepSeekV3Config;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let config = DeepSeekV3Config::tiny();
//! let model = config.init::<B>(&device);
//!
//! // Two sequences of 17 bytes: 16 positions are predicted by the main model, 15 by MTP.
//! let text: Vec<i64> = b"the quick brown fox jumps over a lazy dog!".iter().map(|&b| b as i64).collect();
//! let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(text[..34].to_vec(), [2, 17]), &device);
//! let out = model.loss(tokens);
//! assert_eq!(out.mtp_losses.len(), 1);
//! assert_eq!(out.counts.len(), 3); // MoE layers: 2 of the main model, 1 in the MTP module
//! let grads = out.loss.backward();
//! assert!(model.embed.weight.grad(&grads).is_some());
//! let model = model.update_bias(&out.counts); // after the optimizer step
//! # let _ = model;
//! ```

mod backend;
mod batch;
mod block;
mod config;
mod ep;
mod generate;
#[cfg(feature = "learner")]
pub mod learner;
mod mtp;
pub mod pipeline;
mod speculative;
mod units;

pub use backend::ModelBackend;
pub use batch::{Batch, Drawn, Request};
pub use block::{Block, DenseMlp, Ffn, Projection};
pub use config::{ConfigError, DeepSeekV3Config};
pub use ep::ExpertShard;
pub use generate::{Sampling, Session};
pub use mtp::MtpModule;
pub use pipeline::{ModelStage, SplitError, StageLoss, StageObjective, StageTail, StagedModel};
pub use speculative::{Speculative, SpeculativeError, SpeculativeStats};
pub use units::{Held, Unit, UnitError, Units};

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{backend::Backend, Int, Tensor};
use burn_moe::ep::EpError;

/// The model; built by [`DeepSeekV3Config::init`]. See the [module docs](self).
#[derive(Module, Debug)]
pub struct DeepSeekV3<B: Backend> {
    /// Token embedding `[vocab, d_model]`, shared with the MTP modules.
    pub embed: Embedding<B>,
    /// The transformer blocks.
    pub layers: Vec<Block<B>>,
    /// The final RMSNorm.
    pub norm: RmsNorm<B>,
    /// The output head `[d_model, vocab]`, shared with the MTP modules.
    pub head: Linear<B>,
    /// Multi-token-prediction modules, depth 1 first.
    pub mtp: Vec<MtpModule<B>>,
    /// `λ`, the MTP loss weight.
    #[module(skip)]
    pub mtp_loss_weight: f64,
}

/// What [`DeepSeekV3::forward`] returns.
#[derive(Clone, Debug)]
pub struct ModelOutput<B: Backend> {
    /// Next-token logits, `[B, S, vocab]`.
    pub logits: Tensor<B, 3>,
    /// The final hidden state, after the model's final norm, `[B, S, d_model]`: what the
    /// head reads and the first MTP depth's input (transformers' `last_hidden_state`; the
    /// MTP module reads `hnorm(norm(h))`, as DeepSeek's released MTP weights expect).
    pub hidden: Tensor<B, 3>,
    /// Tokens per routed expert, `[E]`, one per MoE layer in layer order.
    pub counts: Vec<Tensor<B, 1, Int>>,
    /// Sum of the MoE layers' weighted balance losses, `[1]` (`None` when α = 0).
    pub balance_loss: Option<Tensor<B, 1>>,
}

/// What [`DeepSeekV3::loss`] returns.
#[derive(Clone, Debug)]
pub struct LossOutput<B: Backend> {
    /// The objective: `lm_loss + λ / D · Σ mtp_losses + balance_loss`, `[1]`.
    pub loss: Tensor<B, 1>,
    /// Cross-entropy of the next-token prediction, `[1]`.
    pub lm_loss: Tensor<B, 1>,
    /// Cross-entropy of each MTP depth (depth `k` predicts `k + 1` tokens ahead), `[1]`.
    pub mtp_losses: Vec<Tensor<B, 1>>,
    /// Sum of the weighted balance losses, `[1]` (`None` when α = 0).
    pub balance_loss: Option<Tensor<B, 1>>,
    /// Tokens per routed expert of every MoE layer: the main model's, then the MTP
    /// modules'; the argument of [`DeepSeekV3::update_bias`].
    pub counts: Vec<Tensor<B, 1, Int>>,
}

/// Max over mean tokens per expert of each MoE layer's `counts`, averaged over the layers
/// (1 is perfect balance; 1 without MoE layers).
pub fn expert_load(counts: &[Vec<i64>]) -> f64 {
    if counts.is_empty() {
        return 1.0;
    }
    let ratio = |c: &Vec<i64>| {
        let mean = c.iter().sum::<i64>() as f64 / c.len().max(1) as f64;
        *c.iter().max().unwrap_or(&0) as f64 / mean.max(1e-9)
    };
    counts.iter().map(ratio).sum::<f64>() / counts.len() as f64
}

/// What the forward over [`Units`] gives: the output, and the embedding and head it
/// took from the units (kept for the MTP depths).
struct UnitsForward<'a, B: Backend> {
    out: ModelOutput<B>,
    embed: std::borrow::Cow<'a, Embedding<B>>,
    head: std::borrow::Cow<'a, Linear<B>>,
}

/// Adds `b` to an optional sum.
fn add<B: Backend>(sum: Option<Tensor<B, 1>>, b: Option<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    match (sum, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Mean cross-entropy of `logits [B, L, vocab]` against `tokens[:, from..from + L]`.
fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, tokens: &Tensor<B, 2, Int>, from: usize) -> Tensor<B, 1> {
    let [b, len, vocab] = logits.dims();
    let targets = tokens.clone().slice([0..b, from..from + len]).reshape([b * len]);
    CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.reshape([b * len, vocab]), targets)
}

/// `lm_loss + λ / D · Σ mtp_losses` (`D` the MTP depth).
fn language_objective<B: Backend>(lm_loss: Tensor<B, 1>, mtp_losses: &[Tensor<B, 1>], mtp_loss_weight: f64) -> Tensor<B, 1> {
    match mtp_losses.iter().cloned().reduce(|a, b| a + b) {
        Some(mtp) => lm_loss + mtp * (mtp_loss_weight / mtp_losses.len() as f64),
        None => lm_loss,
    }
}

/// Counts float parameters by their declared shapes, and those already drawn.
#[derive(Default)]
struct ParamShapes {
    declared: usize,
    drawn: usize,
}

impl<B: Backend> ModuleVisitor<B> for ParamShapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n = param.lazy_shape().num_elements();
        self.declared += n;
        if param.is_initialized() {
            self.drawn += n;
        }
    }
}

impl<B: Backend> DeepSeekV3<B> {
    /// Parameters by their declared shapes, without drawing any: Burn initializes a
    /// parameter when it is first read (`Module::num_params` reads them all), so a
    /// model at DeepSeek-V3's true shape can be built and inspected where its 685 B
    /// values would not fit.
    pub fn declared_params(&self) -> usize {
        let mut count = ParamShapes::default();
        self.visit(&mut count);
        count.declared
    }

    /// Parameters whose values exist (drawn, loaded, or created eagerly); the rest are
    /// drawn when first read.
    pub fn materialized_params(&self) -> usize {
        let mut count = ParamShapes::default();
        self.visit(&mut count);
        count.drawn
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed.weight.lazy_shape()[0]
    }

    /// The MoE layers in the order of [`LossOutput::counts`]: the main model's, then the
    /// MTP modules' (with sharded experts, this rank's part of each).
    pub fn moe_layers(&self) -> impl Iterator<Item = &burn_moe::Moe<B>> {
        self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)).filter_map(|b| match &b.ffn {
            Ffn::Moe(moe) => Some(moe),
            Ffn::ExpertParallel(shard) => Some(&shard.layer.moe),
            Ffn::Dense(_) => None,
        })
    }

    /// The balancing-bias update of every MoE layer, `bias += γ · sign(mean − count)`,
    /// after an optimizer step; `counts` as [`LossOutput::counts`] (possibly summed over
    /// several steps).
    ///
    /// # Panics
    /// When `counts` does not hold one tensor per MoE layer.
    pub fn update_bias(self, counts: &[Tensor<B, 1, Int>]) -> Self {
        let n = self.moe_layers().count();
        assert_eq!(counts.len(), n, "DeepSeekV3::update_bias: {} count tensors for {n} MoE layers", counts.len());
        let mut counts = counts.iter().cloned();
        let layers = self.layers.into_iter().map(|b| b.update_bias(&mut counts)).collect();
        let mtp = self.mtp.into_iter().map(|m| MtpModule { block: m.block.update_bias(&mut counts), ..m }).collect();
        Self { layers, mtp, ..self }
    }
}

impl<B: ModelBackend> DeepSeekV3<B> {
    /// Causal forward over positions `0..S`.
    ///
    /// # Shapes
    /// `tokens [B, S]` → logits `[B, S, vocab]`.
    ///
    /// # Panics
    /// When `S` exceeds the attention's `max_seq_len`, or a collective of a model with
    /// sharded experts fails (such a model runs [`DeepSeekV3::try_forward`]).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> ModelOutput<B> {
        self.try_forward(tokens).unwrap_or_else(|e| panic!("DeepSeekV3::forward: {e}"))
    }

    /// [`DeepSeekV3::forward`], returning the error of a failed expert-parallel step
    /// (a rank that failed or timed out, non-finite router logits) instead of panicking.
    /// Every rank of the group runs it on its own tokens.
    pub fn try_forward(&self, tokens: Tensor<B, 2, Int>) -> Result<ModelOutput<B>, EpError> {
        Ok(self.forward_units(tokens, &Held)?.out)
    }

    /// The forward with the logits of every MTP depth: depth `k` reads the first `S − k`
    /// positions of the previous depth (the main model's final hidden state for depth 1)
    /// and the embeddings of tokens `k..S`, and predicts token `i + k + 1` at position `i`
    /// (the drafts of speculative decoding; what a released MTP module computes).
    ///
    /// # Shapes
    /// `tokens [B, S]` → the forward's output and depth `k`'s logits `[B, S − k, vocab]`,
    /// depth 1 first.
    ///
    /// # Panics
    /// When `S` is not above the MTP depth, or exceeds the attention's `max_seq_len`.
    pub fn try_forward_mtp(&self, tokens: Tensor<B, 2, Int>) -> Result<(ModelOutput<B>, Vec<Tensor<B, 3>>), EpError> {
        let [b, s] = tokens.dims();
        let depth = self.mtp.len();
        assert!(s > depth, "DeepSeekV3::try_forward_mtp: tokens [{b}, {s}] are too short for MTP depth {depth}");
        let UnitsForward { out, embed, head } = self.forward_units(tokens.clone(), &Held)?;
        let mtp = mtp::run_depths(&self.mtp, &head, out.hidden.clone(), |k| embed.forward(tokens.clone().slice([0..b, k..s])), &Held)?;
        Ok((out, mtp.logits))
    }

    /// The forward with each unit taken from `units` just before its first use (the
    /// embedding, each block, the norm, then the head), and the embedding and head it
    /// took, which the MTP depths use again.
    fn forward_units<'a, U: Units<B>>(&'a self, tokens: Tensor<B, 2, Int>, units: &U) -> Result<UnitsForward<'a, B>, U::Error> {
        let embed = units.unit(&self.embed)?;
        let out = block::run_blocks(&self.layers, embed.forward(tokens), units)?;
        let norm = units.unit(&self.norm)?;
        let head = units.unit(&self.head)?;
        let hidden = norm.forward(out.hidden);
        let logits = head.forward(hidden.clone());
        let out = ModelOutput { logits, hidden, counts: out.counts, balance_loss: out.balance_loss };
        Ok(UnitsForward { out, embed, head })
    }

    /// The training objective on `tokens [B, S + 1]`: the main model reads `0..S` and
    /// predicts `1..S + 1`; MTP depth `k` reads the previous depth's first `S − k`
    /// positions with the embeddings of tokens `k..S` and predicts tokens `k + 1..S + 1`.
    ///
    /// # Panics
    /// When `S + 1` is below `mtp_depth + 2` (nothing left to predict at the last depth),
    /// `S` exceeds the attention's `max_seq_len`, or a collective of a model with sharded
    /// experts fails (such a model runs [`DeepSeekV3::try_loss`]).
    pub fn loss(&self, tokens: Tensor<B, 2, Int>) -> LossOutput<B> {
        self.try_loss(tokens).unwrap_or_else(|e| panic!("DeepSeekV3::loss: {e}"))
    }

    /// [`DeepSeekV3::loss`], returning the error of a failed expert-parallel step instead
    /// of panicking.
    ///
    /// With experts sharded over `N` ranks ([`DeepSeekV3::shard_experts`]), each rank
    /// passes its own `[B, S + 1]` tokens and `loss` is the rank's share of the objective
    /// of all `N · B` rows: `(lm_loss + λ / D · Σ mtp_losses) / N + balance_loss` (the
    /// balance loss already a share), so that the ranks' gradients, summed by
    /// [`DeepSeekV3::sync_grads`] and by the all-to-alls' backward, are those of the whole
    /// batch. `lm_loss` and `mtp_losses` are the rank's own means; `counts` are global.
    ///
    /// # Panics
    /// As [`DeepSeekV3::loss`], for the shape errors.
    pub fn try_loss(&self, tokens: Tensor<B, 2, Int>) -> Result<LossOutput<B>, EpError> {
        self.try_loss_units(tokens, &Held)
    }

    /// [`DeepSeekV3::try_loss`] with every unit — the embedding, each block, the final
    /// norm, the head, each MTP module ([`DeepSeekV3::fsdp_units`]) — taken from `units`
    /// just before the forward first uses it. Under FSDP `self` is the burn-dp `Fsdp`'s
    /// hollow module and `units` the `Fsdp`, which gathers each unit then: a block is
    /// whole from just before its forward to the end of it (the embedding and the head,
    /// which the MTP depths use again, to the end of the loss).
    ///
    /// # Panics
    /// As [`DeepSeekV3::loss`], for the shape errors.
    pub fn try_loss_units<U: Units<B>>(&self, tokens: Tensor<B, 2, Int>, units: &U) -> Result<LossOutput<B>, U::Error> {
        let [b, n] = tokens.dims();
        let depth = self.mtp.len();
        assert!(n >= depth + 2, "DeepSeekV3::loss: tokens [{b}, {n}] are too short for MTP depth {depth}: need at least {} per row", depth + 2);
        let s = n - 1;
        let UnitsForward { out, embed, head } = self.forward_units(tokens.clone().slice([0..b, 0..s]), units)?;
        let lm_loss = cross_entropy(out.logits, &tokens, 1);
        let mtp = mtp::run_depths(&self.mtp, &head, out.hidden, |k| embed.forward(tokens.clone().slice([0..b, k..s])), units)?;
        let mtp_losses: Vec<_> = mtp.logits.into_iter().enumerate().map(|(i, logits)| cross_entropy(logits, &tokens, i + 2)).collect();
        let counts = out.counts.into_iter().chain(mtp.counts).collect();
        let balance_loss = add(out.balance_loss, mtp.balance_loss);
        let mut loss = language_objective(lm_loss.clone(), &mtp_losses, self.mtp_loss_weight);
        if let Some(comm) = self.expert_group() {
            loss = loss / comm.world_size() as f64;
        }
        if let Some(bl) = &balance_loss {
            loss = loss + bl.clone();
        }
        Ok(LossOutput { loss, lm_loss, mtp_losses, balance_loss, counts })
    }
}
