#![warn(missing_docs)]
//! # burn-fp8
//!
//! FP8 training and inference building blocks for [Burn](https://burn.dev), after the
//! recipe of DeepSeek-V3 (arXiv 2412.19437 §3.3):
//!
//! - [`Fp8Format`]: E4M3 and E5M2 with a round-to-nearest-even, saturating host codec;
//! - [`Fp8Tensor`]: tile-wise quantization with f32 scales, per 1×128 tile (activations)
//!   or 128×128 block (weights), and the transposed tiling the backward pass needs;
//! - [`fp8_gemm`]: `A · Bᵀ` over FP8 operands with f32 accumulation, scales applied once
//!   per 128-wide K block, and [`fp8_grouped_gemm`], its grouped form (one launch for all
//!   the experts of a MoE layer, rows grouped by offsets);
//! - [`linear::Fp8Linear`]: a Burn `Linear` whose forward, input-gradient and
//!   weight-gradient GEMMs run in FP8, with a backward that can be split into an
//!   input step and a deferred weight step ([`linear::WeightGradQueue`]);
//! - [`codegen`]: every kernel at every launch configuration, defined without a launch,
//!   and (feature `cuda`) compiled to CUDA PTX with NVRTC on a machine without a GPU;
//! - [`Fp8Backend`]: the backend extension trait. CubeCL backends (wgpu, CUDA, and Burn's
//!   fused versions of them) run custom kernels; every other backend, e.g. `NdArray`, runs
//!   the reference implementation written in plain Burn tensor ops ([`reference`](mod@reference)).
//!
//! Kernels decode FP8 in software from codes packed four to a `u32` (portable to runtimes
//! without FP8 types, such as wgpu on lavapipe) or with the native FP8 conversion where the
//! runtime has one ([`kernel::Fp8Decode`]).
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::{fp8_gemm, Fp8Tensor, QuantConfig};
//!
//! let device = Default::default();
//! let x = Tensor::<NdArray, 2>::random([16, 384], Distribution::Normal(0.0, 1.0), &device);
//! let w = Tensor::<NdArray, 2>::random([32, 384], Distribution::Normal(0.0, 0.02), &device);
//! let xq = Fp8Tensor::quantize(x, QuantConfig::activation()); // 1×128 tiles
//! let wq = Fp8Tensor::quantize(w, QuantConfig::weight()); // 128×128 blocks
//! let y = fp8_gemm(&xq, &wq); // [16, 32] = x · wᵀ
//! assert_eq!(y.dims(), [16, 32]);
//! ```

pub mod backend;
pub mod codegen;
pub mod config;
pub mod format;
pub mod host;
pub mod kernel;
pub mod linear;
pub mod reference;
mod tensor;

pub use backend::{Fp8Backend, Fp8Primitive};
pub use config::{Fp8Layout, QuantConfig, ScaleMode, TileScale, TileShape, TILE_K};
pub use format::Fp8Format;
pub use tensor::{fp8_gemm, fp8_grouped_gemm, Fp8Error, Fp8Tensor};
