//! CubeCL kernels and their launchers. Each kernel file holds the `#[cube]` code and one
//! `launch_*` function taking and returning [`CubeTensor`]s; the backend impl in
//! [`crate::backend`] calls them.

#[allow(missing_docs)] // `#[cube]` generates undocumented expansion modules.
pub mod codec;
pub mod dequantize;
pub mod gemm;
#[allow(missing_docs)] // `#[derive(CubeType)]` and `#[cube]` expansions.
pub mod groups;
pub mod quantize;

pub use codec::Fp8Decode;
pub use gemm::{select_gemm_config, GemmConfig, GemmProblem};

use burn::tensor::{DType, Shape};
use burn_cubecl::{ops::numeric, tensor::CubeTensor, CubeRuntime};
use cubecl::client::ComputeClient;

/// A contiguous tensor with uninitialised memory (the kernels write every element).
pub fn empty<R: CubeRuntime>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: [usize; 2],
    dtype: DType,
) -> CubeTensor<R> {
    numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), dtype)
}

