//! CubeCL kernels and their launchers. Each kernel file holds the `#[cube]` code and one
//! `launch_*` function taking and returning [`CubeTensor`]s; the backend impl in
//! [`crate::backend`] calls them.
//!
//! # Example
//! The kernels run behind the backend trait; here the quantization kernel on wgpu (a GPU, or
//! Mesa's lavapipe on a CPU) agrees bit for bit with the reference:
//! ```
//! use burn::backend::Wgpu;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::{reference, Fp8Tensor, QuantConfig};
//!
//! let device = Default::default();
//! let x = Tensor::<Wgpu, 2>::random([4, 300], Distribution::Normal(0.0, 1.0), &device);
//! let q = Fp8Tensor::quantize(x.clone(), QuantConfig::activation()); // kernel::quantize
//! let (words, scales) = reference::quantize(x, QuantConfig::activation());
//! // The packed words, as u32 (the element type of Int tensors may be signed).
//! let words_of = |t: Tensor<Wgpu, 2, burn::tensor::Int>| -> Vec<u32> { t.into_data().convert::<i64>().to_vec::<i64>().unwrap().into_iter().map(|w| w as u32).collect() };
//! assert_eq!(words_of(q.data().clone()), words_of(words));
//! assert_eq!(q.scales().clone().into_data().to_vec::<f32>().unwrap(), scales.into_data().to_vec::<f32>().unwrap());
//! ```

#[allow(missing_docs)] // `#[cube]` generates undocumented expansion modules.
pub mod codec;
pub mod dequantize;
pub mod gemm;
#[allow(missing_docs)] // `#[derive(CubeType)]` and `#[cube]` expansions.
pub mod groups;
pub mod quantize;
#[allow(missing_docs)] // `#[cube]` expansions.
pub mod tile;

pub use codec::Fp8Decode;
pub use gemm::{select_gemm_config, GemmConfig, GemmProblem};

use burn::tensor::{DType, Shape};
use burn_cubecl::{ops::numeric, tensor::CubeTensor, CubeRuntime};
use cubecl::client::ComputeClient;

/// What the launchers' pure selection rules know of a device: the one place that tells a
/// GPU from a CPU adapter (the FP8 GEMM's tiles, burn-moe's grouped GEMM staging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceClass {
    /// A GPU: plane (warp) operations, a register file of at most 255 registers per thread,
    /// shared memory faster than global memory.
    Gpu,
    /// A CPU adapter (Mesa's lavapipe): no plane operations; each unit is a SIMD lane.
    CpuAdapter,
}

impl DeviceClass {
    /// The class of `client`'s device: a GPU when it has plane operations.
    pub fn of<R: cubecl::Runtime>(client: &ComputeClient<R>) -> Self {
        if client.properties().features.plane.contains(cubecl::features::Plane::Ops) {
            DeviceClass::Gpu
        } else {
            DeviceClass::CpuAdapter
        }
    }
}

/// A contiguous tensor with uninitialised memory (the kernels write every element).
pub fn empty<R: CubeRuntime>(client: &ComputeClient<R>, device: &R::Device, shape: [usize; 2], dtype: DType) -> CubeTensor<R> {
    numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), dtype)
}
