//! CubeCL kernels and their launchers. Each file holds `#[cube]` code and `launch_*`
//! functions taking [`CubeTensor`]s; [`crate::backend`] calls them. Floats are f32 and
//! indices u32 inside the kernels (the backend impl casts on the way in and out).

#[allow(missing_docs)] // `#[cube]` generates undocumented expansion modules.
pub mod grouped;
#[allow(missing_docs)]
pub mod mla;
#[allow(missing_docs)]
pub mod plan;
#[allow(missing_docs)]
pub mod rows;

use burn::tensor::{DType, Shape};
use burn_cubecl::{ops::numeric, tensor::CubeTensor, CubeRuntime};
use cubecl::client::ComputeClient;

/// A contiguous tensor with uninitialised memory (the kernels write every element).
pub fn empty<R: CubeRuntime, const D: usize>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor<R> {
    numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), dtype)
}
