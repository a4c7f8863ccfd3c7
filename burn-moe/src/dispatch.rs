//! Token dispatch to experts and the weighted combine back, plus the grouped expert GEMM,
//! over an expert-contiguous row layout.
//!
//! A [`DispatchPlan`] is computed on the device from the routing (`indices [T, k]`,
//! `counts [E]`): slot `t·k + j` (token `t`'s `j`-th expert) lands on row
//! `positions[t·k + j]` of a `[T·k, d]` layout in which expert `e` owns rows
//! `offsets[e]..offsets[e + 1]`, in token order. Every shape is known from `T`, `k` and
//! `E` alone: nothing is read back to the host (dropless routing, no capacity factor).
//!
//! - [`dispatch`]: `x [T, d]` → `[T·k, d]`, each token's row copied to its `k` slots;
//! - [`grouped_matmul`]: `[T·k, K]` → `[T·k, N]`, each expert's rows times its `[K, N]`
//!   matrix, one launch for all experts (empty experts allowed);
//! - [`combine`]: `[T·k, d]` → `[T, d]`, each token's rows summed with its gate weights.
//!
//! All three are differentiable (dispatch and combine are each other's adjoints; combine
//! also differentiates the gate weights). On CubeCL backends they are kernels
//! ([`crate::kernel`]); elsewhere plain Burn ops ([`crate::reference`]).
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor};
//! use burn_moe::dispatch::{combine, dispatch, grouped_matmul, DispatchPlan};
//!
//! let device = Default::default();
//! // 3 tokens, 2 experts each, out of 4.
//! let indices = Tensor::<NdArray, 2, Int>::from_ints([[2, 0], [0, 3], [2, 3]], &device);
//! let counts = Tensor::<NdArray, 1, Int>::from_ints([2, 0, 2, 2], &device);
//! let plan = DispatchPlan::new(indices, counts);
//!
//! let x = Tensor::<NdArray, 2>::from_floats([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], &device);
//! let rows = dispatch(x, &plan); // expert 0: tokens 0, 1; expert 2: tokens 0, 2; ...
//! assert_eq!(rows.dims(), [6, 2]);
//! let expert_weights = Tensor::<NdArray, 3>::ones([4, 2, 5], &device);
//! let hidden = grouped_matmul(rows, expert_weights, &plan); // [6, 5]
//! let gates = Tensor::<NdArray, 2>::from_floats([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], &device);
//! let y = combine(hidden, gates, &plan);
//! assert_eq!(y.dims(), [3, 5]);
//! assert_eq!(y.into_data().to_vec::<f32>().unwrap()[..5], [3.0; 5]); // (1 + 2) per column
//! ```

use crate::backend::{MoeBackend, PlanPrimitive};
use crate::router::Routing;
use burn::tensor::{backend::Backend, Int, Tensor, TensorPrimitive};
use burn_fp8::linear::Fp8Recipe;

/// Where each routed slot goes in the expert-contiguous layout.
///
/// # Shapes
/// - positions, row_slots: `[T·k]`
/// - offsets: `[E + 1]`, `offsets[0] = 0`, `offsets[E] = T·k`
#[derive(Clone, Debug)]
pub struct DispatchPlan<B: Backend> {
    positions: Tensor<B, 1, Int>,
    row_slots: Tensor<B, 1, Int>,
    offsets: Tensor<B, 1, Int>,
    tokens: usize,
    top_k: usize,
    n_experts: usize,
}

impl<B: MoeBackend> DispatchPlan<B> {
    /// The plan of `indices [T, k]` (experts below `E`) with their per-expert `counts [E]`
    /// (as the router returns them; inconsistent counts leave rows unwritten).
    ///
    /// # Panics
    /// If `k` or `E` is zero.
    pub fn new(indices: Tensor<B, 2, Int>, counts: Tensor<B, 1, Int>) -> Self {
        let [tokens, top_k] = indices.dims();
        let [n_experts] = counts.dims();
        assert!(top_k > 0 && n_experts > 0, "DispatchPlan: indices {:?} and counts {:?} need k > 0 and E > 0", [tokens, top_k], [n_experts]);
        let device = indices.device();
        if tokens == 0 {
            return Self {
                positions: Tensor::zeros([0], &device),
                row_slots: Tensor::zeros([0], &device),
                offsets: Tensor::zeros([n_experts + 1], &device),
                tokens,
                top_k,
                n_experts,
            };
        }
        let p = B::moe_plan(indices.reshape([tokens * top_k]).into_primitive(), counts.into_primitive());
        Self {
            positions: Tensor::from_primitive(p.positions),
            row_slots: Tensor::from_primitive(p.row_slots),
            offsets: Tensor::from_primitive(p.offsets),
            tokens,
            top_k,
            n_experts,
        }
    }

    /// The plan of a [`Routing`].
    pub fn from_routing(routing: &Routing<B>) -> Self {
        Self::new(routing.indices.clone(), routing.counts.clone())
    }

    fn primitive(&self) -> PlanPrimitive<B> {
        PlanPrimitive { positions: self.positions.clone().into_primitive(), row_slots: self.row_slots.clone().into_primitive(), offsets: self.offsets.clone().into_primitive() }
    }
}

impl<B: Backend> DispatchPlan<B> {
    /// Tokens `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Experts per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Experts `E`.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }
    /// Rows of the expert-ordered layout, `T·k`.
    pub fn rows(&self) -> usize {
        self.tokens * self.top_k
    }
    /// `[T·k]`: the row of each slot.
    pub fn positions(&self) -> Tensor<B, 1, Int> {
        self.positions.clone()
    }
    /// `[T·k]`: the slot of each row.
    pub fn row_slots(&self) -> Tensor<B, 1, Int> {
        self.row_slots.clone()
    }
    /// `[E + 1]`: expert `e` owns rows `offsets[e]..offsets[e + 1]`.
    pub fn offsets(&self) -> Tensor<B, 1, Int> {
        self.offsets.clone()
    }
}

fn float<B: Backend, const D: usize>(x: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// Copies each token's row to its `k` slots in expert order.
///
/// # Shapes
/// - x: `[T, d]` → `[T·k, d]`
///
/// # Panics
/// If `x` does not have the plan's `T` rows.
pub fn dispatch<B: MoeBackend>(x: Tensor<B, 2>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    let [t, d] = x.dims();
    assert_eq!(t, plan.tokens, "dispatch: x {:?} must have the plan's {} tokens", [t, d], plan.tokens);
    if plan.rows() == 0 || d == 0 {
        return Tensor::zeros([plan.rows(), d], &x.device());
    }
    float(B::moe_gather(x.into_primitive().tensor(), plan.primitive(), plan.top_k, None))
}

/// Sums each token's `k` expert rows weighted by its gates: `y[t] = Σ_j w[t, j] ·
/// rows[positions[t·k + j]]`.
///
/// # Shapes
/// - rows: `[T·k, d]`, weights: `[T, k]` → `[T, d]`
///
/// # Panics
/// If the shapes do not match the plan.
pub fn combine<B: MoeBackend>(rows: Tensor<B, 2>, weights: Tensor<B, 2>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    let [r, d] = rows.dims();
    assert_eq!(r, plan.rows(), "combine: rows {:?} must have the plan's T·k = {} rows", [r, d], plan.rows());
    assert_eq!(weights.dims(), [plan.tokens, plan.top_k], "combine: weights {:?} must be [T, k] = {:?}", weights.dims(), [plan.tokens, plan.top_k]);
    if r == 0 || d == 0 {
        return Tensor::zeros([plan.tokens, d], &rows.device());
    }
    let w = weights.reshape([r]).into_primitive().tensor();
    float(B::moe_combine(rows.into_primitive().tensor(), plan.primitive(), plan.top_k, Some(w)))
}

/// Multiplies each expert's rows by its matrix: `out[r] = rows[r] · weights[e]` for the
/// rows `r` of expert `e`, all experts in one launch.
///
/// # Shapes
/// - rows: `[T·k, K]`, weights: `[E, K, N]` → `[T·k, N]`
///
/// # Panics
/// If the shapes do not match the plan.
pub fn grouped_matmul<B: MoeBackend>(rows: Tensor<B, 2>, weights: Tensor<B, 3>, plan: &DispatchPlan<B>) -> Tensor<B, 2> {
    grouped("grouped_matmul", rows, weights, plan, None)
}

/// [`grouped_matmul`] in FP8 (DeepSeek-V3's expert GEMM): the rows quantized in 1×128
/// tiles and each expert's matrix in 128×128 blocks (per `recipe`), multiplied by
/// burn-fp8's grouped tile-scaled GEMM ([`burn_fp8::fp8_grouped_gemm`]) with f32
/// accumulation, one launch for all experts. Under `Autodiff` the input gradient runs in
/// FP8 too (the output gradient in `recipe.grad` tiles) and the weight gradient in f32.
///
/// Keep `N` a multiple of 128 so that no weight block spans two experts (see
/// [`burn_fp8::fp8_grouped_gemm`]).
///
/// # Shapes
/// - rows: `[T·k, K]`, weights: `[E, K, N]` → `[T·k, N]`
///
/// # Panics
/// If the shapes do not match the plan.
pub fn grouped_matmul_fp8<B: MoeBackend>(rows: Tensor<B, 2>, weights: Tensor<B, 3>, plan: &DispatchPlan<B>, recipe: Fp8Recipe) -> Tensor<B, 2> {
    grouped("grouped_matmul_fp8", rows, weights, plan, Some(recipe))
}

/// The shape checks and the op of both grouped matmuls: f32, or FP8 with a recipe.
fn grouped<B: MoeBackend>(op: &str, rows: Tensor<B, 2>, weights: Tensor<B, 3>, plan: &DispatchPlan<B>, fp8: Option<Fp8Recipe>) -> Tensor<B, 2> {
    let [r, k] = rows.dims();
    let [e, wk, n] = weights.dims();
    assert!(
        r == plan.rows() && e == plan.n_experts && wk == k,
        "{op}: rows {:?} and weights {:?} must be [T·k, K] = [{}, K] and [E, K, N] with E = {}",
        [r, k],
        [e, wk, n],
        plan.rows(),
        plan.n_experts
    );
    if r == 0 || n == 0 || k == 0 {
        return Tensor::zeros([r, n], &rows.device());
    }
    let (a, b, offsets) = (rows.into_primitive().tensor(), weights.into_primitive().tensor(), plan.offsets.clone().into_primitive());
    float(match fp8 {
        None => B::moe_grouped_matmul(a, b, offsets, false),
        Some(recipe) => B::moe_grouped_matmul_fp8(a, b, offsets, false, recipe),
    })
}
