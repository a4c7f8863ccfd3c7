//! The backend extension trait and its implementations.
//!
//! [`MoeBackend`]'s default methods are the plain-Burn reference ([`crate::reference`]),
//! so any backend gains the ops with an empty impl (as [`burn::backend::NdArray`] does
//! here). Burn's Flex CPU backend runs them as host loops (`flex.rs`). CubeCL backends override them with the kernels of [`crate::kernel`]; `Fusion`
//! registers them as custom operations; `Autodiff` records backwards for the three
//! differentiable ops (gather, combine, grouped matmul), each expressed with the others.
//!
//! Shapes are checked by the tensor-level API ([`crate::dispatch`]) and empty inputs
//! handled there, before these are called.
//!
//! # Example
//! Code written against [`MoeBackend`] runs on the reference backend and on the kernels:
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_moe::dispatch::{combine, dispatch, DispatchPlan};
//! use burn_moe::router::{route, RouterConfig};
//! use burn_moe::MoeBackend;
//!
//! /// Routes `x [T, d]`, sends each token to its experts' rows and back, weighted.
//! fn round_trip<B: MoeBackend>(x: Tensor<B, 2>, logits: Tensor<B, 2>) -> Tensor<B, 2> {
//!     let routing = route(logits, None, &RouterConfig::tiny()).unwrap();
//!     let plan = DispatchPlan::from_routing(&routing);
//!     let rows = dispatch(x, &plan); // [T·k, d], expert-contiguous
//!     combine(rows, routing.weights, &plan)
//! }
//!
//! let device = Default::default();
//! let x = Tensor::<NdArray, 2>::random([6, 8], Distribution::Normal(0.0, 1.0), &device);
//! let logits = Tensor::<NdArray, 2>::random([6, 16], Distribution::Normal(0.0, 1.0), &device);
//! let y = round_trip(x.clone(), logits);
//! // Identity experts: each token comes back times the sum of its weights (2.5, the V3 route scale).
//! let err = (y - x.clone() * 2.5).abs().max().into_scalar();
//! assert!(err < 1e-5, "{err}");
//! ```

mod autodiff;
mod cube;
#[cfg(feature = "flex")]
mod flex;
mod fusion;

use crate::reference;
use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Int, Tensor, TensorPrimitive,
};
use burn_fp8::config::{TileShape, TILE_K};
use burn_fp8::linear::Fp8Recipe;
use burn_fp8::{fp8_grouped_gemm, Fp8Backend, Fp8Tensor};

/// Where each routed slot goes, as backend primitives (see [`crate::dispatch::DispatchPlan`]).
///
/// The integer dtype is backend-defined (`u32` on CubeCL backends, the backend's `IntElem`
/// on the reference path).
pub struct PlanPrimitive<B: Backend> {
    /// `[T·k]`: the expert-ordered row of slot `t·k + j`.
    pub positions: IntTensor<B>,
    /// `[T·k]`: the slot that row `r` holds (the inverse permutation).
    pub row_slots: IntTensor<B>,
    /// `[E + 1]`: expert `e` owns rows `offsets[e]..offsets[e + 1]`.
    pub offsets: IntTensor<B>,
}

impl<B: Backend> Clone for PlanPrimitive<B> {
    fn clone(&self) -> Self {
        Self { positions: self.positions.clone(), row_slots: self.row_slots.clone(), offsets: self.offsets.clone() }
    }
}

impl<B: Backend> core::fmt::Debug for PlanPrimitive<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PlanPrimitive").field("positions", &self.positions).field("row_slots", &self.row_slots).field("offsets", &self.offsets).finish()
    }
}

fn float<B: Backend, const D: usize>(x: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

fn int<B: Backend, const D: usize>(x: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(x)
}

fn prim<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}

/// The expert matrices stacked `[E·N, K]`: burn-fp8 contracts over the last dimension of
/// its B operand (a copy unless `transpose_b`, where `b [E, N, K]` already is).
fn stacked<B: Backend>(b: Tensor<B, 3>, transpose_b: bool) -> Tensor<B, 2> {
    let [e, p, q] = b.dims();
    if transpose_b {
        b.reshape([e * p, q])
    } else {
        b.swap_dims(1, 2).reshape([e * q, p])
    }
}

/// The FP8 grouped matmul as burn-fp8 ops: the rows and the stacked expert matrices
/// quantized, then burn-fp8's grouped tile-scaled GEMM.
fn grouped_matmul_fp8<B: Fp8Backend>(a: Tensor<B, 2>, b: Tensor<B, 3>, offsets: Tensor<B, 1, Int>, transpose_b: bool, recipe: &Fp8Recipe) -> Tensor<B, 2> {
    let a = Fp8Tensor::quantize(a, recipe.input);
    let b = Fp8Tensor::quantize(stacked(b, transpose_b), recipe.weight);
    fp8_grouped_gemm(&a, &b, offsets)
}

/// The same FP8 numerics with the codes decoded once: both operands quantized as in
/// [`grouped_matmul_fp8`], dequantized to f32 (each code times its tile's scale, exact),
/// and multiplied by the f32 grouped kernel. It differs from the tile-scaled GEMM only in
/// where the scales enter the f32 sums (per product here, per 128-wide K block there).
/// CubeCL backends take this path on devices without plane operations (CPU adapters),
/// where the tile-scaled GEMM's shared-memory staging is the slow part.
///
/// With 128×128 weight blocks that tile each expert's `[K, N]` exactly, a block holds the
/// same elements in either orientation, so `b [E, K, N]` is quantized as it lies (the
/// codes and scales of the stacked `[E·N, K]`, without the transposing copy) and
/// multiplied without transposition.
fn grouped_matmul_fp8_decoded<B: MoeBackend>(a: Tensor<B, 2>, b: Tensor<B, 3>, offsets: Tensor<B, 1, Int>, transpose_b: bool, recipe: &Fp8Recipe) -> Tensor<B, 2> {
    let [e, p, q] = b.dims();
    let a = Fp8Tensor::quantize(a, recipe.input).dequantize();
    let blocks_fit = recipe.weight.tile == TileShape::Block128x128 && p % TILE_K == 0 && q % TILE_K == 0;
    let decode = |b: Tensor<B, 2>, shape: [usize; 3]| Fp8Tensor::quantize(b, recipe.weight).dequantize().reshape(shape);
    let (b, transpose) = if transpose_b || blocks_fit { (decode(b.reshape([e * p, q]), [e, p, q]), transpose_b) } else { (decode(stacked(b, false), [e, q, p]), true) };
    float(B::moe_grouped_matmul(prim(a), prim(b), offsets.into_primitive(), transpose))
}

/// Token dispatch, combine and grouped expert GEMM.
///
/// In the docs below `T` is tokens, `k` experts per token, `S = T·k` slots (and rows of
/// the expert-ordered layout), `E` experts, `d` the row width.
pub trait MoeBackend: Fp8Backend {
    /// The plan of flat expert `indices [S]` with their `counts [E]`.
    fn moe_plan(indices: IntTensor<Self>, counts: IntTensor<Self>) -> PlanPrimitive<Self> {
        let [positions, row_slots, offsets] = reference::plan::<Self>(int(indices), int(counts));
        PlanPrimitive { positions: positions.into_primitive(), row_slots: row_slots.into_primitive(), offsets: offsets.into_primitive() }
    }

    /// Dispatch: `x [T, d]` → `[S, d]`, row `r` = `w[s] · x[s / k]` with `s =
    /// row_slots[r]`, `weights [S]` or `None` for 1.
    fn moe_gather(x: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        prim(reference::gather::<Self>(float(x), int(plan.row_slots), top_k, weights.map(float)))
    }

    /// Combine: `rows [S, d]` → `[T, d]`, `out[t] = Σ_j w[t·k + j] · rows[positions[t·k + j]]`.
    fn moe_combine(rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        prim(reference::combine::<Self>(float(rows), int(plan.positions), top_k, weights.map(float)))
    }

    /// The weight derivative of both: `out[s] = ⟨a[s / k], rows[positions[s]]⟩`, `a [T, d]`,
    /// `rows [S, d]` → `[S]`.
    fn moe_gate_grad(a: FloatTensor<Self>, rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize) -> FloatTensor<Self> {
        prim(reference::gate_grad::<Self>(float(a), float(rows), int(plan.positions), top_k))
    }

    /// `a [S, K]` → `[S, N]`, the rows of expert `e` times `b[e]` (`b [E, K, N]`, or
    /// `[E, N, K]` used transposed).
    fn moe_grouped_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool) -> FloatTensor<Self> {
        prim(reference::grouped_matmul::<Self>(float(a), float(b), int(offsets), transpose_b))
    }

    /// [`MoeBackend::moe_grouped_matmul`] in FP8: `a` quantized in `recipe.input` tiles
    /// (1×128), the expert matrices in `recipe.weight` blocks (128×128), multiplied by
    /// burn-fp8's grouped GEMM with f32 accumulation. `Autodiff` records a backward whose
    /// input gradient is the same FP8 op (`dy` in `recipe.grad` tiles) and whose weight
    /// gradient is [`MoeBackend::moe_grouped_wgrad`] in f32.
    fn moe_grouped_matmul_fp8(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool, recipe: Fp8Recipe) -> FloatTensor<Self> {
        prim(grouped_matmul_fp8::<Self>(float(a), float(b), int(offsets), transpose_b, &recipe))
    }

    /// `a [S, K]`, `d [S, N]` → `[E, K, N]`, per expert `a_eᵀ · d_e`.
    fn moe_grouped_wgrad(a: FloatTensor<Self>, d: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        prim(reference::grouped_wgrad::<Self>(float(a), float(d), int(offsets)))
    }
}

#[cfg(feature = "ndarray")]
impl MoeBackend for burn::backend::NdArray {}
