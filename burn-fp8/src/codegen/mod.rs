//! The workspace's kernels as their launchers configure them, defined without a launch.
//!
//! A CubeCL kernel becomes device code in two steps: its `#[cube]` function is expanded into
//! a [`KernelDefinition`] (CubeCL's IR: buffers, scalars, cube dimensions and the body), and
//! a runtime's compiler turns the definition into source for its device (WGSL, CUDA C++,
//! HIP). The first step needs no device of the target's kind, so every kernel can be
//! compiled for a GPU the machine does not have — which is how CI knows that each kernel
//! compiles for NVIDIA's architectures on a CPU-only machine (`codegen::cuda`, behind the `cuda`
//! feature, runs CubeCL's CUDA compiler and NVRTC on these definitions).
//!
//! Each kernel file lists its variants — one [`KernelVariant`] per configuration its launcher
//! can choose on a [`CodegenTarget`] (tilings, FP8 decode strategies, stagings) — through a
//! `variants` function beside its launcher; [`variants`] gathers this crate's.
//!
//! # Example
//! ```
//! use burn_fp8::codegen::{variants, CodegenTarget};
//!
//! let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
//! let hopper = CodegenTarget::cuda(90);
//! let kernels = variants(&client, &hopper);
//! // Native FP8 decode exists from sm_89 on, so Hopper has both decodes of each kernel.
//! assert!(kernels.iter().any(|k| k.name.contains("Native")));
//! assert!(variants(&client, &CodegenTarget::cuda(80)).iter().all(|k| !k.name.contains("Native")));
//! # use cubecl::Runtime;
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::kernel::Fp8Decode;
use crate::{Fp8Format, QuantConfig, ScaleMode, TileShape};
use cubecl::ir::StorageType;
use cubecl::prelude::*;

/// What a compile target offers that changes what the launchers choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodegenTarget {
    /// NVIDIA compute capability as `major * 10 + minor` (80: A100, 89: L40/Ada, 90: H100).
    pub sm: u32,
    /// Whether the device converts FP8 natively (CUDA sm_89 and later).
    pub native_fp8: bool,
    /// Threads per warp (plane).
    pub plane_size: u32,
}

impl CodegenTarget {
    /// An NVIDIA GPU of compute capability `sm` (`major * 10 + minor`), with the features
    /// CubeCL's CUDA runtime registers for it.
    pub const fn cuda(sm: u32) -> Self {
        Self { sm, native_fp8: sm >= 89, plane_size: 32 }
    }

    /// The FP8 decode strategies a launcher may use on this target: the software decode
    /// everywhere (it is also the fallback), the native one where the device has it.
    pub fn decodes(&self) -> Vec<Fp8Decode> {
        if self.native_fp8 {
            vec![Fp8Decode::Software, Fp8Decode::Native]
        } else {
            vec![Fp8Decode::Software]
        }
    }

    /// The cube `CubeDim::new` gives an elementwise kernel on this target for a problem of at
    /// least 256 units: 8 planes.
    pub const fn elementwise_cube_dim(&self) -> CubeDim {
        CubeDim::new_2d(self.plane_size, 8)
    }
}

/// One kernel at one launch configuration, expanded to CubeCL's IR.
#[derive(Debug, Clone)]
pub struct KernelVariant {
    /// The kernel's function and its configuration, e.g. `dequantize_kernel[E4M3 1x128 Native]`.
    pub name: String,
    /// The expanded kernel.
    pub definition: KernelDefinition,
    /// The integer type of its addresses.
    pub address_type: StorageType,
}

impl KernelVariant {
    /// Expands `kernel` (a `#[cube(launch)]` kernel's struct, built as its launcher would).
    pub fn new<K: CubeKernel>(kernel: &str, config: impl core::fmt::Debug, built: K) -> Self {
        Self { name: format!("{kernel}[{config:?}]"), address_type: built.address_type(), definition: built.define() }
    }
}

/// Every quantization a kernel can be specialised for: both formats × both tilings × both
/// scale roundings.
pub fn quant_configs() -> Vec<QuantConfig> {
    let mut out = Vec::new();
    for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
        for tile in [TileShape::Row1x128, TileShape::Block128x128] {
            for scale_mode in [ScaleMode::Exact, ScaleMode::PowerOfTwo] {
                out.push(QuantConfig { format, tile, scale_mode });
            }
        }
    }
    out
}

/// The compilation argument of an array the launchers bind (never aliased in place).
pub const fn array() -> ArrayCompilationArg {
    ArrayCompilationArg { inplace: None }
}

/// Settings of a kernel launched with `cube_dim` and 32-bit addresses, as the launchers do.
pub fn settings(cube_dim: CubeDim) -> KernelSettings {
    KernelSettings::default().cube_dim(cube_dim).address_type(AddressType::U32)
}

/// Every kernel variant of this crate for `target`. `client` is any runtime's client: the
/// expansion does not depend on it (the kernels read no device property), only the launch
/// configurations do, and those come from `target`.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let mut all = Vec::new();
    all.extend(crate::kernel::codec::variants(client, target));
    all.extend(crate::kernel::quantize::variants(client, target));
    all.extend(crate::kernel::dequantize::variants(client, target));
    all.extend(crate::kernel::gemm::variants(client, target));
    all
}
