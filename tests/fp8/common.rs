//! Backends, devices and random inputs shared by the FP8 tests.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use burn_fp8::{Fp8Tensor, QuantConfig};

#[path = "../support/runtime.rs"]
mod runtime;
#[allow(unused_imports)] // each suite sharing this file uses some
pub use runtime::{kernel_device, Cube, Fused, KernelRuntime};

/// The pure-CPU reference backend.
pub type Ref = burn::backend::NdArray<f32>;

#[path = "../support/rng.rs"]
mod rng;
pub use rng::Rng;

pub fn tensor<B: Backend>(values: &[f32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

pub fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

pub fn words<B: Backend>(t: &Tensor<B, 2, Int>) -> Vec<u32> {
    t.to_data().convert::<i64>().to_vec::<i64>().unwrap().into_iter().map(|w| w as u32).collect()
}

/// A tensor with NaN in every element, to check kernels write all of their output.
pub fn poisoned<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::full(shape, f32::NAN, device)
}

pub fn quantize<B: burn_fp8::Fp8Backend>(values: &[f32], shape: [usize; 2], config: QuantConfig, device: &B::Device) -> Fp8Tensor<B> {
    Fp8Tensor::quantize(tensor::<B>(values, shape, device), config)
}
