//! Grouped GEMM over the expert-contiguous layout, one launch for every expert.
//!
//! - forward: `out[r, :] = a[r, :] · B_e` for the rows `r` of expert `e`
//!   (`offsets[e] ≤ r < offsets[e + 1]`), `B_e` the `[K, N]` slice `e` of `b [E, K, N]`, or
//!   of `b [E, N, K]` transposed (the input gradient of the forward);
//! - weight gradient: `out[e] = a_eᵀ · d_e`, `a [R, K]`, `d [R, N]`, `out [E, K, N]`.
//!
//! On GPUs (devices with plane operations) every unit of an 8 × 8 cube owns a
//! `tile_m × 8` register tile of a `8·tile_m × 64` output block, and both kernels stage
//! `CHUNK`-deep slices of the operands through shared memory, k-major. On CPU adapters
//! (lavapipe) the kernels of [`grouped_direct`] read the operands straight from memory in
//! vectors of up to 4 floats ([`Staging::Direct`]). `tile_m` follows the mean rows per
//! expert ([`Tiling::select`]), so that small experts do not pay for a block of mostly
//! empty rows. The forward grid has `⌈R / block_m⌉ + E` rows of cubes; each cube finds its
//! expert and row tile by walking the offsets on the device (burn-fp8's
//! [`grouped_row_tile()`], shared with the FP8 grouped GEMM), and surplus cubes exit.
//! Empty experts get no tile in the forward and a zero gradient.

use super::{grouped_direct, UNITS};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use burn_fp8::codegen::{array, settings, CodegenTarget, KernelVariant};
use burn_fp8::kernel::groups::{grouped_row_tile, grouped_tile_count};
use burn_fp8::kernel::tile::{fma_step, store_tile, RegisterTile};
use burn_fp8::kernel::DeviceClass;
use cubecl::prelude::*;

const TILE_N: usize = 8;
/// Output columns per cube.
const BLOCK_N: usize = UNITS * TILE_N;
const CHUNK: usize = 32;

/// Register tiling of a launch: each unit owns `tile_m × 8` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    /// Output rows per unit (2, 4 or 8).
    pub tile_m: usize,
}

impl Tiling {
    /// The smallest of 2, 4 and 8 rows per unit whose block (`8·tile_m` rows) holds the
    /// mean rows per expert, `rows / experts`. Not 1: on lavapipe, 16-row blocks of 2×8
    /// tiles ran small experts (8 rows on average) faster than 8-row blocks of 1×8 tiles
    /// (0.63 against 0.52-0.56 GFLOP/s in `moe_layer --tables gemm`), padding and all.
    pub fn select(rows: usize, experts: usize) -> Self {
        let mean = rows.div_ceil(experts.max(1));
        let tile_m = match mean {
            0..=16 => 2,
            17..=32 => 4,
            _ => 8,
        };
        Self { tile_m }
    }

    /// Output rows per cube.
    pub const fn block_m(&self) -> usize {
        UNITS * self.tile_m
    }
}

/// `acc[i][j] += a_reg[i] · b_reg[j]` over the unit's `tile_m × 8` register tile.
/// The units' register tiles: `UNITS × UNITS` units of `tile_m × TILE_N` outputs.
const fn register_tile(tile_m: usize) -> RegisterTile {
    RegisterTile { tm: tile_m, tn: TILE_N, units_m: UNITS, units_n: UNITS }
}

/// Accumulates one staged chunk: `acc[i][j] += Σ_kk a_sh[kk][row_i] · b_sh[kk][col_j]`.
#[cube]
fn fma_chunk(a_sh: &SharedMemory<f32>, b_sh: &SharedMemory<f32>, acc: &mut Array<f32>, a_reg: &mut Array<f32>, b_reg: &mut Array<f32>, #[comptime] tile_m: usize) {
    for kk in 0..CHUNK {
        fma_step(a_sh, b_sh, kk, acc, a_reg, b_reg, comptime!(register_tile(tile_m)));
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn grouped_matmul_kernel(
    a: &Array<f32>,
    b: &Array<f32>,
    offsets: &Array<u32>,
    out: &mut Array<f32>,
    k: usize,
    n: usize,
    n_experts: usize,
    #[comptime] transpose_b: bool,
    #[comptime] tile_m: usize,
) {
    let block_m = comptime!(UNITS * tile_m);
    let tile = grouped_row_tile(offsets, n_experts, CUBE_POS_Y as usize, block_m);
    if tile.group == n_experts {
        terminate!();
    }
    let m0 = tile.m0;
    let m_end = tile.m_end;
    let n0 = CUBE_POS_X as usize * BLOCK_N;
    let b0 = tile.group * k * n;
    let unit = UNIT_POS as usize;
    let mut acc = Array::<f32>::new(comptime!(tile_m * TILE_N));
    let mut a_reg = Array::<f32>::new(tile_m);
    let mut b_reg = Array::<f32>::new(TILE_N);
    #[unroll]
    for i in 0..comptime!(tile_m * TILE_N) {
        acc[i] = 0.0;
    }

    let mut a_sh = SharedMemory::<f32>::new(comptime!(CHUNK * block_m));
    let mut b_sh = SharedMemory::<f32>::new(CHUNK * BLOCK_N);
    for c in 0..k.div_ceil(CHUNK) {
        let k0 = c * CHUNK;
        // A: consecutive units read consecutive k of a row.
        #[unroll]
        for l in 0..comptime!(CHUNK * block_m / (UNITS * UNITS)) {
            let idx = unit + l * UNITS * UNITS;
            let row = idx / CHUNK;
            let kk = idx % CHUNK;
            let mut v = 0.0f32;
            if m0 + row < m_end && k0 + kk < k {
                v = a[(m0 + row) * k + k0 + kk];
            }
            a_sh[kk * block_m + row] = v;
        }
        #[unroll]
        for l in 0..comptime!(CHUNK * BLOCK_N / (UNITS * UNITS)) {
            let idx = unit + l * UNITS * UNITS;
            let mut v = 0.0f32;
            if comptime!(transpose_b) {
                // b is [E, N, K]: consecutive units read consecutive k.
                let col = idx / CHUNK;
                let kk = idx % CHUNK;
                if n0 + col < n && k0 + kk < k {
                    v = b[b0 + (n0 + col) * k + k0 + kk];
                }
                b_sh[kk * BLOCK_N + col] = v;
            } else {
                let kk = idx / BLOCK_N;
                let col = idx % BLOCK_N;
                if n0 + col < n && k0 + kk < k {
                    v = b[b0 + (k0 + kk) * n + n0 + col];
                }
                b_sh[kk * BLOCK_N + col] = v;
            }
        }
        sync_cube();
        fma_chunk(&a_sh, &b_sh, &mut acc, &mut a_reg, &mut b_reg, tile_m);
        sync_cube();
    }
    store_tile(out, &acc, 0, m0, m_end, n0, n, comptime!(register_tile(tile_m)));
}

/// `out[e] = a_eᵀ · d_e`: output rows are `a`'s columns (`tile_m = 8`, 64 per cube),
/// columns `d`'s; the contraction runs over the expert's rows.
#[cube(launch)]
fn grouped_wgrad_kernel(a: &Array<f32>, d: &Array<f32>, offsets: &Array<u32>, out: &mut Array<f32>, k: usize, n: usize) {
    let expert = CUBE_POS_Z as usize;
    let i0 = CUBE_POS_Y as usize * BLOCK_N;
    let j0 = CUBE_POS_X as usize * BLOCK_N;
    let start = offsets[expert] as usize;
    let end = offsets[expert + 1] as usize;
    let unit = UNIT_POS as usize;
    let mut acc = Array::<f32>::new(TILE_N * TILE_N);
    let mut a_reg = Array::<f32>::new(TILE_N);
    let mut b_reg = Array::<f32>::new(TILE_N);
    #[unroll]
    for i in 0..TILE_N * TILE_N {
        acc[i] = 0.0;
    }

    let mut a_sh = SharedMemory::<f32>::new(CHUNK * BLOCK_N);
    let mut d_sh = SharedMemory::<f32>::new(CHUNK * BLOCK_N);
    for c in 0..(end - start).div_ceil(CHUNK) {
        let r0 = start + c * CHUNK;
        #[unroll]
        for l in 0..comptime!(CHUNK * BLOCK_N / (UNITS * UNITS)) {
            let idx = unit + l * UNITS * UNITS;
            let kk = idx / BLOCK_N;
            let col = idx % BLOCK_N;
            let mut va = 0.0f32;
            let mut vd = 0.0f32;
            if r0 + kk < end {
                if i0 + col < k {
                    va = a[(r0 + kk) * k + i0 + col];
                }
                if j0 + col < n {
                    vd = d[(r0 + kk) * n + j0 + col];
                }
            }
            a_sh[kk * BLOCK_N + col] = va;
            d_sh[kk * BLOCK_N + col] = vd;
        }
        sync_cube();
        fma_chunk(&a_sh, &d_sh, &mut acc, &mut a_reg, &mut b_reg, TILE_N);
        sync_cube();
    }
    store_tile(out, &acc, expert * k * n, i0, k, j0, n, comptime!(register_tile(TILE_N)));
}

/// How the grouped kernels read their operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Staging {
    /// By device: [`Staging::Shared`] on devices with plane (subgroup) operations, i.e.
    /// GPUs; [`Staging::Direct`] on the others (CubeCL gives none to CPU adapters). On
    /// lavapipe the direct vector reads ran 2.4x the direct scalar reads they replaced
    /// (v3-slim's up projection, 9.7 against 4.1 GFLOP/s; weight gradient 15.9 against
    /// 6.6), which had run 1.7x the shared-memory staging.
    #[default]
    Auto,
    /// `CHUNK`-deep slices of both operands staged through shared memory.
    Shared,
    /// Straight from memory in vectors of up to 4 floats, no shared memory and no
    /// barriers ([`grouped_direct`]).
    Direct,
}

impl Staging {
    /// Whether this staging reads through shared memory on `client`'s device.
    pub(crate) fn shared<R: CubeRuntime>(self, client: &ComputeClient<R>) -> bool {
        match self {
            Staging::Auto => DeviceClass::of(client) == DeviceClass::Gpu,
            Staging::Shared => true,
            Staging::Direct => false,
        }
    }
}

/// `out [R, N]` (contiguous f32, every row written) from `a [R, K]`, `b` (`[E, K, N]`, or
/// `[E, N, K]` with `transpose_b`) and `offsets [E + 1]` (u32).
pub fn launch_grouped_matmul<R: CubeRuntime>(a: CubeTensor<R>, b: CubeTensor<R>, offsets: CubeTensor<R>, out: CubeTensor<R>, transpose_b: bool, staging: Staging) {
    let client = a.client.clone();
    let [rows, k] = [a.meta.shape()[0], a.meta.shape()[1]];
    let n = out.meta.shape()[1];
    let n_experts = b.meta.shape()[0];
    if rows == 0 || n == 0 {
        return;
    }
    let tiling = Tiling::select(rows, n_experts);
    let row_tiles = grouped_tile_count(rows, n_experts, tiling.block_m());
    let (a, b, offsets, out) = (a.into_array_arg(), b.into_array_arg(), offsets.into_array_arg(), out.into_array_arg());
    if !staging.shared(&client) {
        grouped_direct::launch_direct_matmul(&client, a, b, offsets, out, [k, n, n_experts, row_tiles], transpose_b, tiling.tile_m);
        return;
    }
    let cube_count = CubeCount::Static(n.div_ceil(BLOCK_N) as u32, row_tiles as u32, 1);
    let cube_dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    grouped_matmul_kernel::launch::<R>(&client, cube_count, cube_dim, a, b, offsets, out, k, n, n_experts, transpose_b, tiling.tile_m);
}

/// `out [E, K, N]` (contiguous f32, every element written) `= a_eᵀ · d_e` per expert.
pub fn launch_grouped_wgrad<R: CubeRuntime>(a: CubeTensor<R>, d: CubeTensor<R>, offsets: CubeTensor<R>, out: CubeTensor<R>, staging: Staging) {
    let client = a.client.clone();
    let [n_experts, k, n] = [out.meta.shape()[0], out.meta.shape()[1], out.meta.shape()[2]];
    if n_experts * k * n == 0 {
        return;
    }
    let (a, d, offsets, out) = (a.into_array_arg(), d.into_array_arg(), offsets.into_array_arg(), out.into_array_arg());
    if !staging.shared(&client) {
        grouped_direct::launch_direct_wgrad(&client, a, d, offsets, out, [n_experts, k, n]);
        return;
    }
    let cube_count = CubeCount::Static(n.div_ceil(BLOCK_N) as u32, k.div_ceil(BLOCK_N) as u32, n_experts as u32);
    grouped_wgrad_kernel::launch::<R>(&client, cube_count, CubeDim::new_2d(UNITS as u32, UNITS as u32), a, d, offsets, out, k, n);
}

/// The shared-staging grouped GEMM kernels at every configuration their launchers choose on
/// a GPU: the three tilings of [`Tiling::select`], with `b` as stored and transposed, and
/// the weight gradient.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, _target: &CodegenTarget) -> Vec<KernelVariant> {
    let dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    let mut out = Vec::new();
    for tile_m in [2, 4, 8] {
        for transpose_b in [false, true] {
            let kernel = grouped_matmul_kernel::GroupedMatmulKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), (), (), (), transpose_b, tile_m);
            out.push(KernelVariant::new("grouped_matmul_kernel", (tile_m, transpose_b), kernel));
        }
    }
    let wgrad = grouped_wgrad_kernel::GroupedWgradKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), (), ());
    out.push(KernelVariant::new("grouped_wgrad_kernel", (), wgrad));
    out
}

#[cfg(test)]
mod tests {
    use super::{launch_grouped_matmul, launch_grouped_wgrad, Staging};
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive};

    type Cube = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

    fn prim<const D: usize>(t: Tensor<Cube, D>) -> burn_cubecl::tensor::CubeTensor<burn::backend::wgpu::WgpuRuntime> {
        t.into_primitive().tensor()
    }

    fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// Both readings of the operands, forward (plain and transposed `b`) and weight
    /// gradient, against the reference on the same values: tails in every dimension, an
    /// empty expert, experts of one row and of more than one block; `(k, n)` such that the
    /// direct kernels read vectors of 1, 2 and 4 floats, and of 4 along `k` with 1 along
    /// `n`. The outputs start as NaN, so a skipped element shows.
    #[test]
    fn shared_and_direct_staging_match_the_reference() {
        // Tails of the 32-deep chunks and 64-wide blocks.
        for (k, n) in [(45, 70), (46, 70), (48, 72), (48, 69)] {
            check_staging(k, n);
        }
    }

    fn check_staging(k: usize, n: usize) {
        let device = Default::default();
        let counts = [0usize, 1, 37, 0, 5, 80];
        let e = counts.len();
        let rows: usize = counts.iter().sum();
        let offsets: Vec<i64> = std::iter::once(0)
            .chain(counts.iter().scan(0, |acc, &c| {
                *acc += c;
                Some(*acc as i64)
            }))
            .collect();
        let random = |shape: Vec<usize>| Tensor::<NdArray, 1>::random([shape.iter().product::<usize>()], Distribution::Normal(0.0, 1.0), &Default::default());
        let a = random(vec![rows, k]);
        let b = random(vec![e, k, n]);
        let d = random(vec![rows, n]);
        let offs = |dev: &_| Tensor::<Cube, 1, Int>::from_data(TensorData::new(offsets.clone(), [e + 1]), dev);
        let cube = |t: &Tensor<NdArray, 1>| Tensor::<Cube, 1>::from_data(t.to_data(), &device);
        let reference_offsets = Tensor::<NdArray, 1, Int>::from_data(TensorData::new(offsets.clone(), [e + 1]), &Default::default());
        let close = |what: &str, got: Vec<f32>, want: Vec<f32>| {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| if g.is_nan() { f32::INFINITY } else { (g - w).abs() }).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{what}: off by {worst} (scale {scale})");
        };
        for staging in [Staging::Shared, Staging::Direct] {
            for transpose_b in [false, true] {
                let b_dev = cube(&b).reshape([e, k, n]);
                let b_dev = if transpose_b { b_dev.swap_dims(1, 2) } else { b_dev }; // [E, N, K] when transposed
                let out = Tensor::<Cube, 2>::full([rows, n], f32::NAN, &device);
                let (a_p, out_p) = (prim(cube(&a).reshape([rows, k])), prim(out));
                let offsets_p = burn_cubecl::kernel::cast(offs(&device).into_primitive(), burn::tensor::DType::U32);
                launch_grouped_matmul(a_p, burn_cubecl::kernel::into_contiguous(prim(b_dev)), offsets_p, out_p.clone(), transpose_b, staging);
                let got = host(Tensor::<Cube, 2>::from_primitive(TensorPrimitive::Float(out_p)));
                let want = host(crate::reference::grouped_matmul(a.clone().reshape([rows, k]), b.clone().reshape([e, k, n]), reference_offsets.clone(), false));
                close(&format!("{staging:?} forward, transpose_b {transpose_b}, k {k}, n {n}"), got, want);
            }
            let out = Tensor::<Cube, 3>::full([e, k, n], f32::NAN, &device);
            let out_p = prim(out);
            let offsets_p = burn_cubecl::kernel::cast(offs(&device).into_primitive(), burn::tensor::DType::U32);
            launch_grouped_wgrad(prim(cube(&a).reshape([rows, k])), prim(cube(&d).reshape([rows, n])), offsets_p, out_p.clone(), staging);
            let got = host(Tensor::<Cube, 3>::from_primitive(TensorPrimitive::Float(out_p)));
            let want = host(crate::reference::grouped_wgrad(a.clone().reshape([rows, k]), d.clone().reshape([rows, n]), reference_offsets.clone()));
            close(&format!("{staging:?} weight gradient, k {k}, n {n}"), got, want);
        }
    }
}
