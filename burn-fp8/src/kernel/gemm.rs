//! Tile-scaled FP8 GEMM: `D[M, N] = A[M, K] · B[N, K]ᵀ`, and its grouped form
//! `D[r, :] = A[r, :] · B_gᵀ` for the rows `r` of group `g` (the expert GEMM of a MoE layer:
//! `B` stacks `G` matrices of `[N, K]`, rows of `A` are grouped by `offsets [G + 1]`).
//!
//! Both operands are packed FP8 (four codes per `u32`, rows padded to whole 128-wide
//! tiles) with one f32 scale per tile; A's and B's tiles may each span 1 or 128 rows.
//!
//! Structure (DeepSeek's promotion): for each 128-wide K block the cube stages
//! `BK = 32`-code chunks of A and B through shared memory, decoding each code once on
//! load, and every unit accumulates a `TM × TN` register tile of *unscaled* partial sums in
//! f32. At the end of the K block the partials are multiplied by `scale_a[m] · scale_b[n]`
//! and added to the f32 accumulators. Shared memory holds the chunks k-major
//! (`a[kk][m]`, `b[kk][n]`) so neighbouring units read neighbouring addresses.
//!
//! The grouped form is the same kernel with a comptime switch: a cube's row tile comes
//! from the offsets ([`super::groups`]) instead of its position, and B's rows start at
//! `g · N`. One launch covers every group; empty groups cost nothing.

use super::codec::{decode_fp8, Fp8Decode};
use super::groups::{grouped_row_tile, grouped_tile_count};
use super::tile::{fma_step, store_tile, RegisterTile};
use super::DeviceClass;
use crate::codegen::{array, settings, CodegenTarget, KernelVariant};
use crate::config::{QuantConfig, TILE_K, WORDS_PER_TILE};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;
use serde::{Deserialize, Serialize};

/// Codes of K staged per shared-memory chunk.
const CHUNK_K: usize = 32;
const CHUNK_WORDS: usize = CHUNK_K / 4;

/// A GEMM problem as the kernel selector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmProblem {
    /// Rows of A and D.
    pub m: usize,
    /// Rows of B, columns of D.
    pub n: usize,
    /// Contracted dimension.
    pub k: usize,
}

/// Launch configuration of the GEMM kernel, chosen by [`select_gemm_config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemmConfig {
    /// Units along N in a cube.
    pub units_n: u32,
    /// Units along M in a cube.
    pub units_m: u32,
    /// Output rows per unit.
    pub tile_m: usize,
    /// Output columns per unit.
    pub tile_n: usize,
    /// How codes are decoded.
    pub decode_a: Fp8Decode,
    /// How codes of B are decoded.
    pub decode_b: Fp8Decode,
}

impl GemmConfig {
    /// Output rows per cube.
    pub const fn block_m(&self) -> usize {
        self.units_m as usize * self.tile_m
    }
    /// The units' register tiles ([`super::tile`]).
    pub const fn register_tile(&self) -> RegisterTile {
        RegisterTile { tm: self.tile_m, tn: self.tile_n, units_m: self.units_m as usize, units_n: self.units_n as usize }
    }
    /// Output columns per cube.
    pub const fn block_n(&self) -> usize {
        self.units_n as usize * self.tile_n
    }
    /// Shared memory used, in bytes (f32 chunks of A and B).
    pub const fn shared_bytes(&self) -> usize {
        (self.block_m() + self.block_n()) * CHUNK_K * 4
    }
}

/// Picks the tiling for a problem, so that a cube's rows match M where M is small and
/// units own large register tiles where it is not (measured on lavapipe, where fewer units
/// with more outputs each beat 256 units of 4×4; see docs/benchmarks.md):
///
/// | M | units (n×m) | outputs per unit | block (M×N) | shared memory |
/// |---|---|---|---|---|
/// | ≤ 4 | 32×1 | 1×4 | 1×128 | 16.1 KiB |
/// | ≤ 16 | 8×4 | 4×8 | 16×64 | 10 KiB |
/// | ≤ 64 | 8×8 | 8×8 | 64×64 | 16 KiB |
/// | > 64 | 8×8 | 16×8 (8×8 on a GPU) | 128×64 (64×64) | 24 KiB (16 KiB) |
///
/// On a GPU ([`DeviceClass::Gpu`]) tiles stay within 8×8: a unit keeps its tile's f32
/// accumulators and the K block's unscaled partial sums, `2 · tile_m · tile_n` registers of
/// at most 255, and 16×8 tiles spill on every NVIDIA architecture (ptxas: 255 registers and
/// 444-480 bytes of spill stores on sm_90, `tests/cuda`) where 8×8 do not (168-188
/// registers). A CPU adapter (lavapipe) has no such limit and ran the largest tiles fastest. Pure: the same problem and device class always get the same config.
/// All fit lavapipe's 32 KiB of shared memory.
pub fn select_gemm_config(problem: GemmProblem, decode_a: Fp8Decode, decode_b: Fp8Decode, device: DeviceClass) -> GemmConfig {
    let (units_n, units_m, tile_m, tile_n) = match (problem.m, device) {
        (0..=4, _) => (32, 1, 1, 4),
        (5..=16, _) => (8, 4, 4, 8),
        (17..=64, _) | (_, DeviceClass::Gpu) => (8, 8, 8, 8),
        (_, DeviceClass::CpuAdapter) => (8, 8, 16, 8),
    };
    GemmConfig { units_n, units_m, tile_m, tile_n, decode_a, decode_b }
}

/// Stages one `CHUNK_K`-code chunk of `rows` consecutive operand rows into shared memory,
/// decoded, k-major.
#[cube]
fn load_chunk(
    operand: &Array<u32>,
    shared: &mut SharedMemory<f32>,
    row0: usize,
    rows_total: usize,
    word0: usize,
    words_per_row: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] config: QuantConfig,
    #[comptime] decode: Fp8Decode,
) {
    let words = comptime!(rows * CHUNK_WORDS);
    let unit = UNIT_POS as usize;
    #[unroll]
    for l in 0..comptime!(words.div_ceil(units)) {
        let idx = unit + l * units;
        if idx < words {
            let row = idx / CHUNK_WORDS;
            let w = idx % CHUNK_WORDS;
            let global_row = row0 + row;
            let mut packed = 0u32;
            if global_row < rows_total {
                packed = operand[global_row * words_per_row + word0 + w];
            }
            #[unroll]
            for q in 0..4usize {
                let code = (packed >> comptime!((q * 8) as u32)) & 0xFF;
                shared[(w * 4 + q) * rows + row] = decode_fp8(code, config.format, decode);
            }
        }
    }
}

#[cube(launch)]
fn fp8_gemm_kernel(
    a: &Array<u32>,
    a_scales: &Array<f32>,
    b: &Array<u32>,
    b_scales: &Array<f32>,
    offsets: &Array<u32>,
    out: &mut Array<f32>,
    m: usize,
    n: usize,
    k_blocks: usize,
    groups: usize,
    #[comptime] a_config: QuantConfig,
    #[comptime] b_config: QuantConfig,
    #[comptime] cfg: GemmConfig,
    #[comptime] grouped: bool,
) {
    let block_m = comptime!(cfg.block_m());
    let block_n = comptime!(cfg.block_n());
    let units = comptime!((cfg.units_m * cfg.units_n) as usize);
    let tm = comptime!(cfg.tile_m);
    let tn = comptime!(cfg.tile_n);
    let units_m = comptime!(cfg.units_m as usize);
    let units_n = comptime!(cfg.units_n as usize);
    let tile = comptime!(cfg.register_tile());

    let words_per_row = k_blocks * WORDS_PER_TILE;
    // Rows [m0, m_end) of A and D, against B's rows [b0, b0 + n).
    let mut m0 = CUBE_POS_Y as usize * block_m;
    let mut m_end = m;
    let mut b0 = 0usize;
    if comptime!(grouped) {
        let tile = grouped_row_tile(offsets, groups, CUBE_POS_Y as usize, block_m);
        if tile.group == groups {
            terminate!();
        }
        m0 = tile.m0;
        m_end = tile.m_end;
        b0 = tile.group * n;
    }
    let n0 = CUBE_POS_X as usize * block_n;
    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;

    let mut a_sh = SharedMemory::<f32>::new(comptime!(block_m * CHUNK_K));
    let mut b_sh = SharedMemory::<f32>::new(comptime!(block_n * CHUNK_K));

    let mut acc = Array::<f32>::new(comptime!(tm * tn));
    let mut partial = Array::<f32>::new(comptime!(tm * tn));
    let mut a_reg = Array::<f32>::new(tm);
    let mut b_reg = Array::<f32>::new(tn);
    #[unroll]
    for i in 0..comptime!(tm * tn) {
        acc[i] = 0.0;
    }

    for kb in 0..k_blocks {
        #[unroll]
        for i in 0..comptime!(tm * tn) {
            partial[i] = 0.0;
        }
        #[unroll]
        for chunk in 0..comptime!(TILE_K / CHUNK_K) {
            let word0 = kb * WORDS_PER_TILE + chunk * CHUNK_WORDS;
            load_chunk(a, &mut a_sh, m0, m_end, word0, words_per_row, block_m, units, a_config, cfg.decode_a);
            load_chunk(b, &mut b_sh, b0 + n0, b0 + n, word0, words_per_row, block_n, units, b_config, cfg.decode_b);
            sync_cube();
            for kk in 0..CHUNK_K {
                fma_step(&a_sh, &b_sh, kk, &mut partial, &mut a_reg, &mut b_reg, tile);
            }
            sync_cube();
        }
        // Promotion: scale this K block's partial sums once, accumulate in f32.
        #[unroll]
        for i in 0..tm {
            let row = min(m0 + uy + i * units_m, m_end - 1);
            a_reg[i] = a_scales[(row / comptime!(a_config.tile.rows())) * k_blocks + kb];
        }
        #[unroll]
        for j in 0..tn {
            let col = b0 + min(n0 + ux + j * units_n, n - 1);
            b_reg[j] = b_scales[(col / comptime!(b_config.tile.rows())) * k_blocks + kb];
        }
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[i * tn + j] += partial[i * tn + j] * (a_reg[i] * b_reg[j]);
            }
        }
    }

    store_tile(out, &acc, 0, m0, m_end, n0, n, tile);
}

/// Launches the GEMM on packed operands: `a` `[M, 32·⌈K/128⌉]` words with its scales,
/// `b` `[N, 32·⌈K/128⌉]` words with its scales, writing every element of `out`, a
/// contiguous f32 `[M, N]` tensor.
///
/// With `offsets` (`[G + 1]` u32, non-decreasing from 0 to M) it is the grouped GEMM:
/// `b` holds `G` stacked `[N, K]` matrices (`[G·N, …]` words), `out` is `[M, N]`, and the
/// rows of group `g` are multiplied by matrix `g`; rows outside every group are left
/// unwritten.
#[allow(clippy::too_many_arguments)]
pub fn launch_gemm<R: CubeRuntime>(
    a: CubeTensor<R>,
    a_scales: CubeTensor<R>,
    a_config: QuantConfig,
    b: CubeTensor<R>,
    b_scales: CubeTensor<R>,
    b_config: QuantConfig,
    offsets: Option<CubeTensor<R>>,
    out: CubeTensor<R>,
    k: usize,
) {
    let client = a.client.clone();
    let [m, n] = [out.meta.shape()[0], out.meta.shape()[1]];
    let groups = offsets.as_ref().map_or(1, |o| o.meta.shape()[0] - 1);
    if m == 0 || n == 0 || groups == 0 {
        return;
    }
    // The selector sees the mean rows per group: the M of a typical group's GEMM.
    let problem = GemmProblem { m: m.div_ceil(groups), n, k };
    let cfg = select_gemm_config(problem, Fp8Decode::select(&client, a_config.format), Fp8Decode::select(&client, b_config.format), DeviceClass::of(&client));
    let row_tiles = match offsets {
        Some(_) => grouped_tile_count(m, groups, cfg.block_m()),
        None => m.div_ceil(cfg.block_m()),
    };
    let cube_count = CubeCount::Static(n.div_ceil(cfg.block_n()) as u32, row_tiles as u32, 1);
    let grouped = offsets.is_some();
    // The plain GEMM never reads the offsets; a one-word buffer fills the binding.
    let offsets = offsets.unwrap_or_else(|| super::empty(&client, &a.device, [1, 1], burn::tensor::DType::U32));
    // K = 0 runs no K block: the kernel writes zeros.
    fp8_gemm_kernel::launch::<R>(
        &client,
        cube_count,
        CubeDim::new_2d(cfg.units_n, cfg.units_m),
        a.into_array_arg(),
        a_scales.into_array_arg(),
        b.into_array_arg(),
        b_scales.into_array_arg(),
        offsets.into_array_arg(),
        out.into_array_arg(),
        m,
        n,
        k.div_ceil(TILE_K),
        groups,
        a_config,
        b_config,
        cfg,
        grouped,
    );
}

/// The GEMM kernel at the configurations [`launch_gemm`] chooses on `target` (a GPU), for
/// each decode the target has: the tilings of [`select_gemm_config`] (M of 1, 16, 64 and
/// 128 rows; the last two share one on a GPU), plain and grouped, for the forward and input-gradient operands (activation
/// tiles × weight blocks); and, at the largest tiling, the weight-gradient operands
/// (activation tiles × activation tiles) and E5M2 gradients against E4M3 weights — the
/// tiling and the operands' quantization change independent parts of the kernel.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, target: &CodegenTarget) -> Vec<KernelVariant> {
    let (act, weight) = (QuantConfig::activation(), QuantConfig::weight());
    let mut cases = Vec::new();
    for m in [1, 16, 64, 128] {
        for grouped in [false, true] {
            cases.push((act, weight, m, grouped));
        }
    }
    cases.push((act, act, 128, false));
    cases.push((act.with_format(crate::Fp8Format::E5M2), weight, 128, false));
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for decode in target.decodes() {
        for &(a_config, b_config, m, grouped) in &cases {
            let cfg = select_gemm_config(GemmProblem { m, n: 7168, k: 7168 }, decode, decode, DeviceClass::Gpu);
            // M of 64 and 128 share a tiling on a GPU.
            if seen.contains(&(a_config, b_config, cfg, grouped)) {
                continue;
            }
            seen.push((a_config, b_config, cfg, grouped));
            let kernel = fp8_gemm_kernel::Fp8GemmKernel::<R>::new(
                settings(CubeDim::new_2d(cfg.units_n, cfg.units_m)),
                client.clone(),
                array(),
                array(),
                array(),
                array(),
                array(),
                array(),
                (),
                (),
                (),
                (),
                a_config,
                b_config,
                cfg,
                grouped,
            );
            out.push(KernelVariant::new("fp8_gemm_kernel", (a_config.format, a_config.tile, b_config.format, b_config.tile, cfg, grouped), kernel));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a GPU no unit's tile holds more than 8×8 outputs (what fits 255 registers with the
    /// partial sums); on a CPU adapter large M keeps the 16×8 tiles lavapipe runs fastest.
    #[test]
    fn gpu_tiles_fit_the_register_file() {
        for m in [1, 4, 5, 16, 17, 64, 65, 4096] {
            let problem = GemmProblem { m, n: 7168, k: 7168 };
            let gpu = select_gemm_config(problem, Fp8Decode::Native, Fp8Decode::Native, DeviceClass::Gpu);
            assert!(gpu.tile_m * gpu.tile_n <= 64, "M {m}: {gpu:?}");
            let cpu = select_gemm_config(problem, Fp8Decode::Software, Fp8Decode::Software, DeviceClass::CpuAdapter);
            assert_eq!(cpu.tile_m * cpu.tile_n, if m > 64 { 128 } else { gpu.tile_m * gpu.tile_n }, "M {m}: {cpu:?}");
        }
    }
}
