//! FP8 dequantization: `out[r, c] = decode(code[r, c]) × scale[r / tile_rows, c / 128]`.
//! One unit per packed word.

use super::codec::{decode_fp8, Fp8Decode};
use crate::codegen::{array, quant_configs, settings, CodegenTarget, KernelVariant};
use crate::config::{QuantConfig, TILE_K, WORDS_PER_TILE};
use crate::ScaleMode;
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

#[cube(launch)]
fn dequantize_kernel(data: &Array<u32>, scales: &Array<f32>, output: &mut Array<f32>, rows: usize, cols: usize, #[comptime] config: QuantConfig, #[comptime] decode: Fp8Decode) {
    let words_per_row = cols.div_ceil(4);
    let word = ABSOLUTE_POS;
    if word >= rows * words_per_row {
        terminate!();
    }
    let r = word / words_per_row;
    let c0 = (word % words_per_row) * 4;
    let scale_cols = cols.div_ceil(TILE_K);
    let scale = scales[(r / comptime!(config.tile.rows())) * scale_cols + c0 / TILE_K];
    let packed = data[r * scale_cols * WORDS_PER_TILE + c0 / 4];
    #[unroll]
    for q in 0..4usize {
        let c = c0 + q;
        if c < cols {
            let code = (packed >> comptime!((q * 8) as u32)) & 0xFF;
            output[r * cols + c] = decode_fp8(code, config.format, decode) * scale;
        }
    }
}

/// Dequantizes packed words and scales into `output`, a contiguous f32 `[rows, cols]`
/// tensor whose shape is the logical shape. Every element of `output` is written.
pub fn launch_dequantize<R: CubeRuntime>(data: CubeTensor<R>, scales: CubeTensor<R>, output: CubeTensor<R>, config: QuantConfig) {
    let client = data.client.clone();
    let shape = [output.meta.shape()[0], output.meta.shape()[1]];
    let words = shape[0] * shape[1].div_ceil(4);
    if words == 0 {
        return;
    }
    let decode = Fp8Decode::select(&client, config.format);
    let cube_dim = CubeDim::new(&client, words);
    let cube_count = cubecl::calculate_cube_count_elemwise(&client, words, cube_dim);
    dequantize_kernel::launch::<R>(&client, cube_count, cube_dim, data.into_array_arg(), scales.into_array_arg(), output.into_array_arg(), shape[0], shape[1], config, decode);
}

/// The dequantization kernel at every configuration [`launch_dequantize`] can choose on
/// `target`: both formats, both tilings, each decode the target has (the scale rounding plays no part
/// in decoding).
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let mut out = Vec::new();
    for config in quant_configs().into_iter().filter(|c| c.scale_mode == ScaleMode::Exact) {
        for decode in target.decodes() {
            let kernel = dequantize_kernel::DequantizeKernel::<R>::new(settings(target.elementwise_cube_dim()), client.clone(), array(), array(), array(), (), (), config, decode);
            out.push(KernelVariant::new("dequantize_kernel", (config, decode), kernel));
        }
    }
    out
}
