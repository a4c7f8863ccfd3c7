//! The DeepSeekMoE layer: shared experts plus routed experts, dropless.
//!
//! `y = shared(x) + Σ_{e ∈ topk(x)} g_e(x) · expert_e(x)`, every expert a SwiGLU MLP. The
//! routed path runs as route → [`dispatch`] → three [`grouped_matmul`](crate::dispatch::grouped_matmul)s → [`combine`],
//! so all experts run in a handful of launches whatever their loads, and every forward
//! returns the per-expert token counts for logging and for the balancing-bias update.
//!
//! # Example
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Distribution, Tensor};
//! use burn_moe::{Moe, MoeConfig};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let moe: Moe<B> = MoeConfig::tiny().init(&device);
//! let x = Tensor::<B, 3>::random([2, 8, 64], Distribution::Normal(0.0, 1.0), &device);
//! let out = moe.forward(x);
//! assert_eq!(out.output.dims(), [2, 8, 64]);
//! assert_eq!(out.counts.clone().sum().into_scalar(), 2 * 8 * 4); // T·k routed slots
//! let loss = out.output.powi_scalar(2).mean() + out.balance_loss.unwrap();
//! let grads = loss.backward();
//! assert!(moe.experts.w_gate.grad(&grads).is_some());
//! assert!(moe.bias.grad(&grads).is_none()); // the balancing bias is not trained by gradients
//! let moe = moe.update_bias(out.counts); // after the optimizer step
//! ```

mod experts;
mod naive;

pub use experts::{RoutedExperts, SwiGluMlp};
pub use naive::forward_naive;

use crate::backend::MoeBackend;
use crate::dispatch::{combine, dispatch, DispatchPlan};
use crate::router::{route, scores, sequence_balance_loss, update_bias, RouterConfig, RouterError, Routing};
use burn::config::Config;
use burn::module::{Module, Param, ParamId};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Int, Tensor};
use burn_fp8::linear::Fp8Recipe;

/// Configuration of a [`Moe`] layer. Presets: [`MoeConfig::deepseek_v3`], [`MoeConfig::tiny`].
#[derive(Config, Debug)]
pub struct MoeConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each expert (`moe_intermediate_size`).
    pub d_expert: usize,
    /// Shared experts, run on every token as one SwiGLU of width `n_shared · d_expert`
    /// (0: none).
    pub n_shared_experts: usize,
    /// Routing rules (routed expert count, top-k, groups, score function, scale).
    pub router: RouterConfig,
    /// Sequence-wise balance loss weight α (0: not computed).
    #[config(default = 0.0001)]
    pub balance_loss_weight: f64,
    /// Balancing-bias update speed γ.
    #[config(default = 0.001)]
    pub bias_update_speed: f64,
    /// Standard deviation of the normal weight initialization.
    #[config(default = 0.006)]
    pub init_std: f64,
    /// FP8 recipe for the routed experts' GEMMs (DeepSeek-V3:
    /// `Some(Fp8Recipe::deepseek_v3())`); `None` runs them in f32. The router and the shared
    /// experts stay in f32.
    #[config(default = "None")]
    pub fp8: Option<Fp8Recipe>,
}

impl MoeConfig {
    /// DeepSeek-V3: d_model 7168, 256 routed experts of width 2048 (top-8 over 4 of 8
    /// groups, sigmoid, scale 2.5) and 1 shared expert; α = 1e-4, γ = 0.001, std 0.006.
    pub fn deepseek_v3() -> Self {
        Self::new(7168, 2048, 1, RouterConfig::deepseek_v3())
    }

    /// The same rules at toy size: d_model 64, 16 experts of width 32 (top-4 over 2 of 4
    /// groups), 1 shared expert.
    pub fn tiny() -> Self {
        Self::new(64, 32, 1, RouterConfig::tiny())
    }

    /// Checks the routing rules and initializes the layer (the balancing bias at zero).
    pub fn try_init<B: Backend>(&self, device: &B::Device) -> Result<Moe<B>, RouterError> {
        self.router.validate()?;
        let init = Initializer::Normal { mean: 0.0, std: self.init_std };
        let (d, e) = (self.d_model, self.router.n_experts);
        Ok(Moe {
            gate: LinearConfig::new(d, e).with_bias(false).with_initializer(init.clone()).init(device),
            bias: Param::initialized(ParamId::new(), Tensor::zeros([e], device).set_require_grad(false)),
            experts: RoutedExperts::new(e, d, self.d_expert, &init, device).with_fp8(self.fp8),
            shared: (self.n_shared_experts > 0).then(|| SwiGluMlp::new(d, self.n_shared_experts * self.d_expert, &init, device)),
            router: self.router,
            balance_loss_weight: self.balance_loss_weight,
            bias_update_speed: self.bias_update_speed,
        })
    }

    /// [`MoeConfig::try_init`], panicking with the error on invalid routing rules.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Moe<B> {
        self.try_init(device).unwrap_or_else(|e| panic!("MoeConfig: {e}"))
    }
}

/// A DeepSeekMoE layer. See the [module docs](self).
///
/// The balancing bias is a parameter without gradient: it is saved in the record and
/// changed only by [`Moe::update_bias`].
#[derive(Module, Debug)]
pub struct Moe<B: Backend> {
    /// Router projection `d_model → E` (no bias); logits in f32.
    pub gate: Linear<B>,
    /// Balancing bias `[E]`, used for expert selection only.
    pub bias: Param<Tensor<B, 1>>,
    /// The routed experts.
    pub experts: RoutedExperts<B>,
    /// The shared experts, if any.
    pub shared: Option<SwiGluMlp<B>>,
    /// Routing rules.
    #[module(skip)]
    pub router: RouterConfig,
    /// Sequence-wise balance loss weight α.
    #[module(skip)]
    pub balance_loss_weight: f64,
    /// Balancing-bias update speed γ.
    #[module(skip)]
    pub bias_update_speed: f64,
}

/// What a [`Moe`] forward returns.
#[derive(Clone, Debug)]
pub struct MoeOutput<B: Backend> {
    /// The layer output, `[batch, seq, d_model]`.
    pub output: Tensor<B, 3>,
    /// Tokens routed to each expert, `[E]` (sums to `batch · seq · k`).
    pub counts: Tensor<B, 1, Int>,
    /// `α ·` the sequence-wise balance loss, `[1]`; `None` when α = 0.
    pub balance_loss: Option<Tensor<B, 1>>,
}

/// What [`Moe::route`] gives for `T` tokens.
pub(crate) struct Routed<B: Backend> {
    /// The input as rows, `[T, d_model]`.
    pub x: Tensor<B, 2>,
    /// Router logits, `[T, E]`.
    pub logits: Tensor<B, 2>,
    /// Each token's experts and weights.
    pub routing: Routing<B>,
}

impl<B: Backend> Moe<B> {
    /// Model width.
    pub fn d_model(&self) -> usize {
        self.gate.weight.dims()[0]
    }

    /// The balancing update after an optimizer step: `bias += γ · sign(mean − counts)`;
    /// `counts` may be summed over several forwards.
    pub fn update_bias(self, counts: Tensor<B, 1, Int>) -> Self {
        let gamma = self.bias_update_speed;
        Self { bias: self.bias.map(|b| update_bias(b, counts, gamma)), ..self }
    }

    /// The flattened input of `x [batch, seq, d_model]`, its router logits and routing.
    pub(crate) fn route(&self, x: Tensor<B, 3>) -> Result<Routed<B>, RouterError> {
        let [b, s, d] = x.dims();
        assert_eq!(d, self.d_model(), "Moe: input {:?} must have d_model = {} features", [b, s, d], self.d_model());
        let x = x.reshape([b * s, d]);
        let logits = self.gate.forward(x.clone());
        let routing = route(logits.clone(), Some(self.bias.val()), &self.router)?;
        Ok(Routed { x, logits, routing })
    }

    /// Shared experts, balance loss and reshaping around the routed output `[T, d]` of
    /// the tokens `input` routed.
    pub(crate) fn finish(&self, input: Routed<B>, routed: Tensor<B, 2>, [b, s]: [usize; 2]) -> MoeOutput<B> {
        let Routed { x, logits, routing } = input;
        let d = x.dims()[1];
        let output = match &self.shared {
            Some(shared) => routed + shared.forward(x),
            None => routed,
        };
        let balance_loss = (self.balance_loss_weight > 0.0).then(|| {
            let (e, k) = (self.router.n_experts, self.router.top_k);
            let scores = scores(logits, self.router.score_fn).reshape([b, s, e]);
            sequence_balance_loss(scores, routing.indices.reshape([b, s, k]), self.balance_loss_weight)
        });
        MoeOutput { output: output.reshape([b, s, d]), counts: routing.counts, balance_loss }
    }

    /// The output for an input without tokens.
    pub(crate) fn empty(&self, x: &Tensor<B, 3>) -> MoeOutput<B> {
        let device = x.device();
        MoeOutput {
            output: Tensor::zeros(x.dims(), &device),
            counts: Tensor::zeros([self.router.n_experts], &device),
            balance_loss: (self.balance_loss_weight > 0.0).then(|| Tensor::zeros([1], &device)),
        }
    }
}

impl<B: MoeBackend> Moe<B> {
    /// Runs the layer on `x [batch, seq, d_model]`.
    ///
    /// # Panics
    /// On a wrong width, or non-finite router logits (the message names their positions);
    /// [`Moe::try_forward`] returns the latter as an error.
    pub fn forward(&self, x: Tensor<B, 3>) -> MoeOutput<B> {
        self.try_forward(x).unwrap_or_else(|e| panic!("Moe: {e}"))
    }

    /// [`Moe::forward`], returning routing errors (non-finite logits) instead of panicking.
    pub fn try_forward(&self, x: Tensor<B, 3>) -> Result<MoeOutput<B>, RouterError> {
        let [b, s, _] = x.dims();
        if b * s == 0 {
            return Ok(self.empty(&x));
        }
        let input = self.route(x)?;
        let plan = DispatchPlan::from_routing(&input.routing);
        let hidden = self.experts.forward(dispatch(input.x.clone(), &plan), &plan);
        let routed = combine(hidden, input.routing.weights.clone(), &plan);
        Ok(self.finish(input, routed, [b, s]))
    }
}
