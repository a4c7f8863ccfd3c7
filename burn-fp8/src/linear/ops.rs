//! The three GEMMs of an FP8 Linear layer, on plain (untracked) tensors.
//!
//! With Burn's weight layout `W [d_input, d_output]` and `y = x · W`:
//!
//! | GEMM | computes | A operand (tiles along K) | B operand (tiles along K) |
//! |---|---|---|---|
//! | Fprop | `y [M, N] = x · W` | `x [M, K]`, 1×128 | `Wᵀ [N, K]`, 128×128 |
//! | Dgrad | `dx [M, K] = dy · Wᵀ` | `dy [M, N]`, 1×128 | `W [K, N]`, 128×128 |
//! | Wgrad | `dW [K, N] = xᵀ · dy` | `xᵀ [K, M]`, 1×128 along tokens | `dyᵀ [N, M]`, 1×128 along tokens |
//!
//! A 128×128 block holds the same elements whichever way the weight is read, so Fprop and
//! Dgrad quantize the same blocks (the codes and scales are identical, only their order
//! differs). Wgrad contracts over the tokens, so its operands are tiled 128×1 in the
//! original orientation: [`Fp8Tensor::quantize_transposed`] produces that tiling straight
//! from the f32 tensor, without a second rounding of already-quantized values.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::linear::{ops, Fp8Recipe};
//!
//! type B = NdArray;
//! let device = Default::default();
//! let recipe = Fp8Recipe::deepseek_v3();
//! let x = Tensor::<B, 2>::random([4, 256], Distribution::Normal(0.0, 1.0), &device);
//! let w = Tensor::<B, 2>::random([256, 128], Distribution::Normal(0.0, 0.05), &device);
//! let dy = Tensor::<B, 2>::random([4, 128], Distribution::Normal(0.0, 1.0), &device);
//! let y = ops::forward(x.clone(), w.clone(), &recipe); // Fprop
//! let dx = ops::backward_input(dy.clone(), w.clone(), &recipe); // Dgrad
//! let dw = ops::backward_weight(&ops::save_input(x.clone(), &recipe), &ops::save_output_grad(dy.clone(), &recipe)); // Wgrad
//! // Relative error in the Frobenius norm: each E4M3 operand carries up to 2⁻⁴ relative
//! // rounding (3 mantissa bits); the norm of the error lands near 0.04 of the result's.
//! let rel = |a: Tensor<B, 2>, b: Tensor<B, 2>| (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar() / b.powi_scalar(2).sum().sqrt().into_scalar();
//! assert!(rel(y, x.clone().matmul(w.clone())) < 0.08);
//! assert!(rel(dx, dy.clone().matmul(w.transpose())) < 0.08);
//! assert!(rel(dw, x.transpose().matmul(dy)) < 0.08);
//! ```

use super::Fp8Recipe;
use crate::{fp8_gemm, Fp8Backend, Fp8Tensor};
use burn::tensor::Tensor;

/// Fprop: `x [M, K] · W [K, N]` with `x` in 1×128 tiles and `W` in 128×128 blocks.
pub fn forward<B: Fp8Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, recipe: &Fp8Recipe) -> Tensor<B, 2> {
    let x = Fp8Tensor::quantize(x, recipe.input);
    forward_quantized(&x, weight, recipe)
}

/// Fprop with an input that is already quantized (1×128 tiles along `d_input`).
pub fn forward_quantized<B: Fp8Backend>(x: &Fp8Tensor<B>, weight: Tensor<B, 2>, recipe: &Fp8Recipe) -> Tensor<B, 2> {
    fp8_gemm(x, &Fp8Tensor::quantize_transposed(weight, recipe.weight))
}

/// The input as the weight-gradient GEMM needs it: `xᵀ [K, M]`, tiled along the tokens.
/// This is what an [`super::Fp8Linear`] keeps for backward instead of the f32 input.
pub fn save_input<B: Fp8Backend>(x: Tensor<B, 2>, recipe: &Fp8Recipe) -> Fp8Tensor<B> {
    Fp8Tensor::quantize_transposed(x, recipe.input)
}

/// Dgrad: `dy [M, N] · Wᵀ` with `dy` in 1×128 tiles and `W` in 128×128 blocks.
pub fn backward_input<B: Fp8Backend>(dy: Tensor<B, 2>, weight: Tensor<B, 2>, recipe: &Fp8Recipe) -> Tensor<B, 2> {
    fp8_gemm(&Fp8Tensor::quantize(dy, recipe.grad), &Fp8Tensor::quantize(weight, recipe.weight))
}

/// The output gradient as the weight-gradient GEMM needs it: `dyᵀ [N, M]`, tiled along
/// the tokens.
pub fn save_output_grad<B: Fp8Backend>(dy: Tensor<B, 2>, recipe: &Fp8Recipe) -> Fp8Tensor<B> {
    Fp8Tensor::quantize_transposed(dy, recipe.grad)
}

/// Wgrad: `xᵀ · dy` from the two token-tiled operands, `[K, N]` like the weight.
pub fn backward_weight<B: Fp8Backend>(x_t: &Fp8Tensor<B>, dy_t: &Fp8Tensor<B>) -> Tensor<B, 2> {
    fp8_gemm(x_t, dy_t)
}
