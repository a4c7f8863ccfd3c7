//! The expert MLPs: routed experts as stacked SwiGLU weights run by the grouped GEMM, and
//! the dense SwiGLU of the shared experts.

use crate::backend::MoeBackend;
use crate::dispatch::{grouped_matmul, grouped_matmul_fp8, DispatchPlan};
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{activation::silu, backend::Backend, Tensor};
use burn_fp8::linear::{Fp8Recipe, LinearLayer};

/// `E` SwiGLU experts `x ↦ (silu(x·W_gate) ⊙ (x·W_up)) · W_down`, stacked, run in f32 or,
/// with an FP8 recipe, through the FP8 grouped GEMM ([`grouped_matmul_fp8`]).
///
/// # Shapes
/// - w_gate, w_up: `[E, d_model, d_expert]`
/// - w_down: `[E, d_expert, d_model]`
#[derive(Module, Debug)]
pub struct RoutedExperts<B: Backend> {
    /// Gate projections.
    pub w_gate: Param<Tensor<B, 3>>,
    /// Up projections.
    pub w_up: Param<Tensor<B, 3>>,
    /// Down projections.
    pub w_down: Param<Tensor<B, 3>>,
    /// FP8 recipe of the three GEMMs; `None` runs them in f32.
    #[module(skip)]
    pub fp8: Option<Fp8Recipe>,
}

impl<B: Backend> RoutedExperts<B> {
    /// `n_experts` experts of width `d_model → d_expert → d_model`.
    pub fn new(n_experts: usize, d_model: usize, d_expert: usize, init: &Initializer, device: &B::Device) -> Self {
        let w = |shape: [usize; 3], fan_in: usize, fan_out: usize| init.init_with(shape, Some(fan_in), Some(fan_out), device);
        Self {
            w_gate: w([n_experts, d_model, d_expert], d_model, d_expert),
            w_up: w([n_experts, d_model, d_expert], d_model, d_expert),
            w_down: w([n_experts, d_expert, d_model], d_expert, d_model),
            fp8: None,
        }
    }

    /// The same experts with their GEMMs in FP8 per `recipe` (or f32 with `None`).
    pub fn with_fp8(self, recipe: Option<Fp8Recipe>) -> Self {
        Self { fp8: recipe, ..self }
    }

    /// Expert count `E`.
    pub fn n_experts(&self) -> usize {
        self.w_gate.dims()[0]
    }
}

impl<B: MoeBackend> RoutedExperts<B> {
    /// Runs each row through its expert (rows in the plan's expert order).
    ///
    /// # Shapes
    /// - rows: `[T·k, d_model]` → `[T·k, d_model]`
    pub fn forward(&self, rows: Tensor<B, 2>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
        let matmul = |x: Tensor<B, 2>, w: &Param<Tensor<B, 3>>| match self.fp8 {
            Some(recipe) => grouped_matmul_fp8(x, w.val(), plan, recipe),
            None => grouped_matmul(x, w.val(), plan),
        };
        let gate = matmul(rows.clone(), &self.w_gate);
        let up = matmul(rows, &self.w_up);
        matmul(silu(gate) * up, &self.w_down)
    }
}

/// A dense SwiGLU MLP, `(silu(x·W_gate) ⊙ x·W_up) · W_down`, over any bias-free
/// projection `L`: Burn's `Linear` (the shared experts here, fused into one of width
/// `n_shared · d_expert`) or an FP8 one (`burn_fp8::linear::Fp8Linear`, or the
/// DeepSeek-V3 model's dense MLPs).
///
/// # Shapes
/// - input `[..., d_model]` → `[..., d_model]`
#[derive(Module, Debug)]
pub struct SwiGluMlp<B: Backend, L: Module<B> = Linear<B>> {
    /// `d_model → d_hidden`.
    pub gate: L,
    /// `d_model → d_hidden`.
    pub up: L,
    /// `d_hidden → d_model`.
    pub down: L,
    #[module(skip)]
    backend: core::marker::PhantomData<B>,
}

impl<B: Backend, L: Module<B>> SwiGluMlp<B, L> {
    /// The MLP from its three projections.
    pub fn from_projections(gate: L, up: L, down: L) -> Self {
        Self { gate, up, down, backend: core::marker::PhantomData }
    }
}

impl<B: Backend, L: LinearLayer<B>> SwiGluMlp<B, L> {
    /// Bias-free projections initialized with `init`.
    pub fn new(d_model: usize, d_hidden: usize, init: &Initializer, device: &B::Device) -> Self {
        let linear = |i, o| L::init(&LinearConfig::new(i, o).with_bias(false).with_initializer(init.clone()), device);
        Self::from_projections(linear(d_model, d_hidden), linear(d_model, d_hidden), linear(d_hidden, d_model))
    }

    /// `(silu(x·W_gate) ⊙ (x·W_up)) · W_down`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.down.forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}
