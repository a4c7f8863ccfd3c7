//! The runtime the kernel tests run on: wgpu by default (Mesa's lavapipe on a machine
//! without a GPU), CUDA with the root crate's `test-cuda` feature (tests/gpu.sh builds the
//! suites that way for an NVIDIA machine). Shared by tests/fp8 and tests/moe (`#[path]`).

#![allow(dead_code)] // each suite uses the parts it needs

/// The CubeCL runtime of the kernel tests.
#[cfg(not(feature = "test-cuda"))]
pub type KernelRuntime = burn::backend::wgpu::WgpuRuntime;
/// The CubeCL runtime of the kernel tests.
#[cfg(feature = "test-cuda")]
pub type KernelRuntime = cubecl::cuda::CudaRuntime;

/// The kernels, unfused (Burn's bool element of the runtime: u32 on wgpu, u8 on CUDA).
#[cfg(not(feature = "test-cuda"))]
pub type Cube = burn_cubecl::CubeBackend<KernelRuntime, f32, i32, u32>;
/// The kernels, unfused (Burn's bool element of the runtime: u32 on wgpu, u8 on CUDA).
#[cfg(feature = "test-cuda")]
pub type Cube = burn_cubecl::CubeBackend<KernelRuntime, f32, i32, u8>;

/// Burn's backend of the runtime (fusion over the same kernels).
#[cfg(not(feature = "test-cuda"))]
pub type Fused = burn::backend::Wgpu;
/// Burn's backend of the runtime (fusion over the same kernels).
#[cfg(feature = "test-cuda")]
pub type Fused = burn::backend::Cuda;

/// The device the kernel tests run on.
#[cfg(not(feature = "test-cuda"))]
pub fn kernel_device() -> burn::backend::wgpu::WgpuDevice {
    burn::backend::wgpu::WgpuDevice::DefaultDevice
}
/// The device the kernel tests run on.
#[cfg(feature = "test-cuda")]
pub fn kernel_device() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::default()
}
