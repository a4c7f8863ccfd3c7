//! CubeCL kernels and their launchers. Each file holds `#[cube]` code and `launch_*`
//! functions taking [`CubeTensor`]s; [`crate::backend`] calls them. Floats are f32 and
//! indices u32 inside the kernels (the backend impl casts on the way in and out).
//!
//! # Example
//! The kernels run behind [`crate::MoeBackend`]; here the grouped GEMM on wgpu (a GPU, or
//! Mesa's lavapipe on a CPU) against the reference:
//! ```
//! use burn::backend::Wgpu;
//! use burn::tensor::{Distribution, Int, Tensor, TensorData};
//! use burn_moe::dispatch::{dispatch, grouped_matmul, DispatchPlan};
//!
//! let device = Default::default();
//! let x = Tensor::<Wgpu, 2>::random([10, 32], Distribution::Normal(0.0, 1.0), &device);
//! let w = Tensor::<Wgpu, 3>::random([3, 32, 24], Distribution::Normal(0.0, 1.0), &device);
//! // Top-1 routing: tokens 0..4 to expert 2, 4..10 to expert 0; expert 1 gets none.
//! let experts: Vec<i64> = (0..10).map(|t| if t < 4 { 2 } else { 0 }).collect();
//! let indices = Tensor::<Wgpu, 2, Int>::from_data(TensorData::new(experts, [10, 1]), &device);
//! let counts = Tensor::<Wgpu, 1, Int>::from_data(TensorData::new(vec![6i64, 0, 4], [3]), &device);
//! let plan = DispatchPlan::new(indices, counts);
//! let rows = dispatch(x, &plan); // the dispatch kernel: expert-contiguous rows
//! let out = grouped_matmul(rows.clone(), w.clone(), &plan); // one launch for all experts
//! let reference = burn_moe::reference::grouped_matmul(rows, w, plan.offsets(), false);
//! let err = (out - reference).abs().max().into_scalar();
//! assert!(err < 1e-4, "{err}");
//! ```

#[allow(missing_docs)] // `#[cube]` generates undocumented expansion modules.
pub mod grouped;
#[allow(missing_docs)]
pub mod grouped_direct;
#[allow(missing_docs)]
pub mod mla;
#[allow(missing_docs)]
pub mod plan;
#[allow(missing_docs)]
pub mod rows;

use burn::tensor::{DType, Shape};
use burn_cubecl::{ops::numeric, tensor::CubeTensor, CubeRuntime};
use burn_fp8::codegen::{CodegenTarget, KernelVariant};
use cubecl::client::ComputeClient;

/// Units per side of the grouped GEMM kernels' square cubes (8 × 8 = 64 units), with
/// shared staging ([`grouped`]) and without ([`grouped_direct`]).
pub(crate) const UNITS: usize = 8;

/// Every kernel variant of this crate for `target` (see [`burn_fp8::codegen`]: kernels
/// defined as their launchers configure them, for compiling without a launch).
pub fn variants<R: cubecl::Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let mut all = Vec::new();
    all.extend(plan::variants(client, target));
    all.extend(rows::variants(client, target));
    all.extend(grouped::variants(client, target));
    all.extend(grouped_direct::variants(client, target));
    all.extend(mla::variants(client, target));
    all
}

/// A contiguous tensor with uninitialised memory (the kernels write every element).
pub fn empty<R: CubeRuntime, const D: usize>(client: &ComputeClient<R>, device: &R::Device, shape: [usize; D], dtype: DType) -> CubeTensor<R> {
    numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), dtype)
}

/// The widest vector (4, 2 or 1 floats) that divides every length in `dims`: the kernels
/// read rows in vectors of that many floats.
pub fn vector_width(dims: &[usize]) -> usize {
    [4, 2, 1].into_iter().find(|w| dims.iter().all(|d| d % w == 0)).unwrap_or(1)
}
