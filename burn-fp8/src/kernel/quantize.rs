//! Tile-wise FP8 quantization in one launch: per-tile max-abs, scale, encode, pack.
//!
//! A cube is 32×8 units and covers 128 columns. Unit `(x, y)` owns one packed word
//! (columns `4x..4x+4` of the tile column). For 1×128 tiles the cube covers 8 rows, one
//! per `y`, and each row reduces its own max-abs; for 128×128 tiles it covers 128 rows
//! (`y, y+8, …`) and the whole cube reduces one max-abs. Max-abs is computed on the f32
//! bit patterns (the order of non-negative floats is the order of their bits), so it is
//! exact and NaN/inf are caught without float comparisons.
//!
//! The input is read through its strides, so a transposed view quantizes `Xᵀ` (the 128×1
//! re-tiling that the weight-gradient GEMM needs) without a copy.

use super::codec::{encode_fp8, NAN_BITS};
use crate::codegen::{array, quant_configs, settings, CodegenTarget, KernelVariant};
use crate::config::{QuantConfig, ScaleMode, TILE_K, WORDS_PER_TILE};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

const UNITS_X: u32 = 32;
const UNITS_Y: u32 = 8;

#[cube(launch)]
fn quantize_kernel(input: &Tensor<f32>, data: &mut Array<u32>, scales: &mut Array<f32>, #[comptime] config: QuantConfig) {
    let tile_rows = comptime!(config.tile.rows());
    let rows_per_unit = comptime!(config.tile.rows().div_ceil(UNITS_Y as usize));
    let fmt_max = comptime!(config.format.max());

    let rows = input.shape(0);
    let cols = input.shape(1);
    let stride_r = input.stride(0);
    let stride_c = input.stride(1);
    let words_per_row = cols.div_ceil(TILE_K) * WORDS_PER_TILE;
    let scale_cols = cols.div_ceil(TILE_K);

    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let tile_col = CUBE_POS_X as usize;
    let col0 = tile_col * TILE_K + x * 4;
    let row_base = CUBE_POS_Y as usize * comptime!(tile_rows.max(UNITS_Y as usize)) + y;

    // 1. Local max-abs over this unit's elements, on the bits.
    let mut amax = 0u32;
    for i in 0..rows_per_unit {
        let r = row_base + i * UNITS_Y as usize;
        if r < rows {
            #[unroll]
            for q in 0..4usize {
                let c = col0 + q;
                if c < cols {
                    let bits = input[r * stride_r + c * stride_c].to_bits() & 0x7FFF_FFFF;
                    amax = max(amax, bits);
                }
            }
        }
    }

    // 2. Reduce across the 32 units of a row, then (128×128 tiles) across the 8 rows.
    let mut shared = SharedMemory::<u32>::new(comptime!((UNITS_X * UNITS_Y) as usize));
    let slot = y * UNITS_X as usize + x;
    shared[slot] = amax;
    sync_cube();
    #[unroll]
    for step in 0..5u32 {
        let stride = comptime!((16u32 >> step) as usize);
        if x < stride {
            shared[slot] = max(shared[slot], shared[slot + stride]);
        }
        sync_cube();
    }
    if comptime!(tile_rows > 1) {
        if slot == 0 {
            let mut all = shared[0];
            for row in 1..UNITS_Y as usize {
                all = max(all, shared[row * UNITS_X as usize]);
            }
            shared[0] = all;
        }
        sync_cube();
    }
    let tile_amax = if comptime!(tile_rows > 1) { shared[0] } else { shared[y * UNITS_X as usize] };

    // 3. Scale and multiplier, exactly as `QuantConfig::tile_scale` on the host.
    let amax_f = f32::from_bits(tile_amax);
    let (scale, multiplier) = match config.scale_mode {
        ScaleMode::Exact => (amax_f / fmt_max, fmt_max / amax_f),
        ScaleMode::PowerOfTwo => {
            let s = (amax_f / fmt_max).to_bits();
            let exponent = s & 0x7F80_0000;
            let up = select((s & 0x7F_FFFF) == 0, exponent, exponent + 0x80_0000);
            // At least f32's smallest normal, as on the host.
            let p = f32::from_bits(max(up, 0x80_0000u32));
            (p, 1.0 / p)
        }
    };
    let nonfinite = tile_amax >= 0x7F80_0000;
    let zero = tile_amax == 0;
    // Chosen as bits and reinterpreted once: CubeCL's CUDA compiler writes the bit cast of a
    // constant (`f32::from_bits(NAN_BITS)`) as a `reinterpret_cast` of an rvalue, which
    // NVRTC rejects (found by the CUDA compile check, tests/cuda).
    let one_bits = 0x3F80_0000u32;
    let scale = f32::from_bits(select(nonfinite, NAN_BITS, select(zero, one_bits, scale.to_bits())));
    let multiplier = f32::from_bits(select(nonfinite, NAN_BITS, select(zero, one_bits, multiplier.to_bits())));

    let scale_row = row_base / tile_rows;
    let writes_scale = if comptime!(tile_rows > 1) { slot == 0 } else { x == 0 };
    if writes_scale && row_base < rows {
        scales[scale_row * scale_cols + tile_col] = scale;
    }

    // 4. Encode and pack four codes per word, little-endian; padding columns are code 0.
    for i in 0..rows_per_unit {
        let r = row_base + i * UNITS_Y as usize;
        if r < rows {
            let mut word = 0u32;
            #[unroll]
            for q in 0..4usize {
                let c = col0 + q;
                if c < cols {
                    let v = input[r * stride_r + c * stride_c] * multiplier;
                    word |= encode_fp8(v, config.format) << comptime!((q * 8) as u32);
                }
            }
            data[r * words_per_row + tile_col * WORDS_PER_TILE + x] = word;
        }
    }
}

/// Quantizes a 2-D f32 tensor (any strides) into `data` (packed words,
/// `[rows, 32·⌈cols/128⌉]`, contiguous `u32`) and `scales` (`[⌈rows/r⌉, ⌈cols/128⌉]`,
/// contiguous f32). Every element of both outputs is written.
pub fn launch_quantize<R: CubeRuntime>(input: CubeTensor<R>, data: CubeTensor<R>, scales: CubeTensor<R>, config: QuantConfig) {
    let client = input.client.clone();
    let [rows, cols] = [input.meta.shape()[0], input.meta.shape()[1]];
    let scale_cols = cols.div_ceil(TILE_K);
    assert_eq!(input.dtype, burn::tensor::DType::F32, "launch_quantize: input must be f32");
    assert_eq!(data.meta.shape().as_slice(), &[rows, scale_cols * WORDS_PER_TILE], "launch_quantize: data shape");
    assert_eq!(scales.meta.shape().as_slice(), &config.tile.scale_shape([rows, cols]), "launch_quantize: scales shape");
    if rows == 0 || cols == 0 {
        return;
    }
    let rows_per_cube = config.tile.rows().max(UNITS_Y as usize);
    let cube_count = CubeCount::Static(scale_cols as u32, rows.div_ceil(rows_per_cube) as u32, 1);
    quantize_kernel::launch::<R>(&client, cube_count, CubeDim::new_2d(UNITS_X, UNITS_Y), input.into_tensor_arg(), data.into_array_arg(), scales.into_array_arg(), config);
}

/// The quantization kernel at every configuration [`launch_quantize`] can get: both
/// formats, both tilings, both scale roundings (it decodes nothing, so the target plays
/// no part).
pub fn variants<R: Runtime>(client: &ComputeClient<R>, _target: &CodegenTarget) -> Vec<KernelVariant> {
    quant_configs()
        .into_iter()
        .map(|config| {
            let kernel = quantize_kernel::QuantizeKernel::<R>::new(
                settings(CubeDim::new_2d(UNITS_X, UNITS_Y)),
                client.clone(),
                TensorCompilationArg { inplace: None },
                array(),
                array(),
                config,
            );
            KernelVariant::new("quantize_kernel", config, kernel)
        })
        .collect()
}
