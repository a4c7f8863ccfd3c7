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

pub use codec::Fp8Decode;
pub use gemm::{select_gemm_config, GemmConfig, GemmProblem, RegisterFile};

use burn::tensor::{DType, Shape};
use burn_cubecl::{ops::numeric, tensor::CubeTensor, CubeRuntime};
use cubecl::client::ComputeClient;

/// A contiguous tensor with uninitialised memory (the kernels write every element).
pub fn empty<R: CubeRuntime>(client: &ComputeClient<R>, device: &R::Device, shape: [usize; 2], dtype: DType) -> CubeTensor<R> {
    numeric::empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new(shape), dtype)
}
