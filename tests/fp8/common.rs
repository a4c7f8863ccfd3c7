//! Backends, devices and random inputs shared by the FP8 tests.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use burn_fp8::{Fp8Tensor, QuantConfig};

/// The kernels, unfused.
pub type Cube = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
/// Burn's default wgpu backend (fused).
pub type Fused = burn::backend::Wgpu;
/// The pure-CPU reference backend.
pub type Ref = burn::backend::NdArray<f32>;

pub fn wgpu() -> burn::backend::wgpu::WgpuDevice {
    burn::backend::wgpu::WgpuDevice::DefaultDevice
}

/// A seeded xorshift generator; the seed comes from `FP8_TEST_SEED` or, by default, from
/// the test's name (FNV-1a), so every run draws the same inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Self {
        let seed = std::env::var("FP8_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)));
        eprintln!("{test}: FP8_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller), never exactly zero.
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
        if z == 0.0 {
            1e-3
        } else {
            z
        }
    }

    /// `[rows, cols]` normal values, each row scaled by 10^u with u uniform in [-2, 2], so
    /// that 1×128 tiles get scales across four decades (activations: tokens differ in size).
    pub fn matrix(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        self.matrix_blocks(rows, cols, 1)
    }

    /// As [`Rng::matrix`], with one magnitude per `block_rows` rows (weights: a 128×128
    /// block shares its scale, so its rows are drawn at one magnitude).
    pub fn matrix_blocks(&mut self, rows: usize, cols: usize, block_rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * cols);
        let mut magnitude = 1.0;
        for r in 0..rows {
            if r % block_rows == 0 {
                magnitude = 10f32.powf(self.uniform() * 4.0 - 2.0);
            }
            out.extend((0..cols).map(|_| self.normal() * magnitude));
        }
        out
    }
}

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
