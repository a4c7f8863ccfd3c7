//! Grouped GEMM over the expert-contiguous layout, one launch for every expert.
//!
//! - forward: `out[r, :] = a[r, :] · B_e` for the rows `r` of expert `e`
//!   (`offsets[e] ≤ r < offsets[e + 1]`), `B_e` the `[K, N]` slice `e` of `b [E, K, N]`, or
//!   of `b [E, N, K]` transposed (the input gradient of the forward);
//! - weight gradient: `out[e] = a_eᵀ · d_e`, `a [R, K]`, `d [R, N]`, `out [E, K, N]`.
//!
//! Both stage `CHUNK`-deep slices of the operands through shared memory and give every
//! unit a `TILE × TILE` register tile of a `BLOCK × BLOCK` output block (8 × 8 units).
//! The forward grid has `⌈R / BLOCK⌉ + E` rows of cubes, an upper bound on the row tiles
//! when each expert's rows start a new tile; each cube finds its expert and tile by
//! walking the offsets (on the device: the row counts never reach the host), and surplus
//! cubes exit. Empty experts get no tile in the forward and a zero gradient.

use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

const UNITS: usize = 8;
const TILE: usize = 4;
/// Output rows and columns per cube.
pub const BLOCK: usize = UNITS * TILE;
const CHUNK: usize = 16;
const LOADS: usize = CHUNK * BLOCK / (UNITS * UNITS);

/// Accumulates one staged chunk: `acc[i][j] += Σ_kk a_sh[kk][row_i] · b_sh[kk][col_j]`.
#[cube]
fn fma_chunk(a_sh: &SharedMemory<f32>, b_sh: &SharedMemory<f32>, acc: &mut Array<f32>, a_reg: &mut Array<f32>, b_reg: &mut Array<f32>) {
    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    for kk in 0..CHUNK {
        #[unroll]
        for i in 0..TILE {
            a_reg[i] = a_sh[kk * BLOCK + uy + i * UNITS];
        }
        #[unroll]
        for j in 0..TILE {
            b_reg[j] = b_sh[kk * BLOCK + ux + j * UNITS];
        }
        #[unroll]
        for i in 0..TILE {
            #[unroll]
            for j in 0..TILE {
                acc[i * TILE + j] += a_reg[i] * b_reg[j];
            }
        }
    }
}

/// Writes the unit's register tile to rows `[m0, m_end)` and columns `[n0, n)` of a
/// row-major block with `n` columns starting at `base`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store(out: &mut Array<f32>, acc: &Array<f32>, base: usize, m0: usize, m_end: usize, n0: usize, n: usize) {
    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..TILE {
        let row = m0 + uy + i * UNITS;
        #[unroll]
        for j in 0..TILE {
            let col = n0 + ux + j * UNITS;
            if row < m_end && col < n {
                out[base + row * n + col] = acc[i * TILE + j];
            }
        }
    }
}

#[cube(launch)]
fn grouped_matmul_kernel(
    a: &Array<f32>,
    b: &Array<f32>,
    offsets: &Array<u32>,
    out: &mut Array<f32>,
    k: usize,
    n: usize,
    n_experts: usize,
    #[comptime] transpose_b: bool,
) {
    // This cube's expert and row tile.
    let tile = CUBE_POS_Y as usize;
    let mut seen = 0usize;
    let mut expert = n_experts;
    let mut m0 = 0usize;
    let mut m_end = 0usize;
    for e in 0..n_experts {
        let start = offsets[e] as usize;
        let end = offsets[e + 1] as usize;
        let tiles = (end - start).div_ceil(BLOCK);
        if expert == n_experts && tile < seen + tiles {
            expert = e;
            m0 = start + (tile - seen) * BLOCK;
            m_end = end;
        }
        seen += tiles;
    }
    if expert == n_experts {
        terminate!();
    }

    let n0 = CUBE_POS_X as usize * BLOCK;
    let b0 = expert * k * n;
    let unit = UNIT_POS as usize;
    let mut a_sh = SharedMemory::<f32>::new(CHUNK * BLOCK);
    let mut b_sh = SharedMemory::<f32>::new(CHUNK * BLOCK);
    let mut acc = Array::<f32>::new(TILE * TILE);
    let mut a_reg = Array::<f32>::new(TILE);
    let mut b_reg = Array::<f32>::new(TILE);
    #[unroll]
    for i in 0..TILE * TILE {
        acc[i] = 0.0;
    }

    for c in 0..k.div_ceil(CHUNK) {
        let k0 = c * CHUNK;
        #[unroll]
        for l in 0..LOADS {
            let idx = unit + l * UNITS * UNITS;
            let row = idx / CHUNK;
            let kk = idx % CHUNK;
            let mut v = 0.0f32;
            if m0 + row < m_end && k0 + kk < k {
                v = a[(m0 + row) * k + k0 + kk];
            }
            a_sh[kk * BLOCK + row] = v;
        }
        #[unroll]
        for l in 0..LOADS {
            let idx = unit + l * UNITS * UNITS;
            let mut v = 0.0f32;
            if comptime!(transpose_b) {
                // b is [E, N, K]: consecutive units read consecutive k.
                let col = idx / CHUNK;
                let kk = idx % CHUNK;
                if n0 + col < n && k0 + kk < k {
                    v = b[b0 + (n0 + col) * k + k0 + kk];
                }
                b_sh[kk * BLOCK + col] = v;
            } else {
                let kk = idx / BLOCK;
                let col = idx % BLOCK;
                if n0 + col < n && k0 + kk < k {
                    v = b[b0 + (k0 + kk) * n + n0 + col];
                }
                b_sh[kk * BLOCK + col] = v;
            }
        }
        sync_cube();
        fma_chunk(&a_sh, &b_sh, &mut acc, &mut a_reg, &mut b_reg);
        sync_cube();
    }
    store(out, &acc, 0, m0, m_end, n0, n);
}

#[cube(launch)]
fn grouped_wgrad_kernel(a: &Array<f32>, d: &Array<f32>, offsets: &Array<u32>, out: &mut Array<f32>, k: usize, n: usize) {
    let expert = CUBE_POS_Z as usize;
    let i0 = CUBE_POS_Y as usize * BLOCK;
    let j0 = CUBE_POS_X as usize * BLOCK;
    let start = offsets[expert] as usize;
    let end = offsets[expert + 1] as usize;
    let unit = UNIT_POS as usize;
    let mut a_sh = SharedMemory::<f32>::new(CHUNK * BLOCK);
    let mut d_sh = SharedMemory::<f32>::new(CHUNK * BLOCK);
    let mut acc = Array::<f32>::new(TILE * TILE);
    let mut a_reg = Array::<f32>::new(TILE);
    let mut b_reg = Array::<f32>::new(TILE);
    #[unroll]
    for i in 0..TILE * TILE {
        acc[i] = 0.0;
    }

    for c in 0..(end - start).div_ceil(CHUNK) {
        let r0 = start + c * CHUNK;
        #[unroll]
        for l in 0..LOADS {
            let idx = unit + l * UNITS * UNITS;
            let kk = idx / BLOCK;
            let col = idx % BLOCK;
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
            a_sh[kk * BLOCK + col] = va;
            d_sh[kk * BLOCK + col] = vd;
        }
        sync_cube();
        fma_chunk(&a_sh, &d_sh, &mut acc, &mut a_reg, &mut b_reg);
        sync_cube();
    }
    store(out, &acc, expert * k * n, i0, k, j0, n);
}

/// `out [R, N]` (contiguous f32, every row written) from `a [R, K]`, `b` (`[E, K, N]`, or
/// `[E, N, K]` with `transpose_b`) and `offsets [E + 1]` (u32).
pub fn launch_grouped_matmul<R: CubeRuntime>(
    a: CubeTensor<R>,
    b: CubeTensor<R>,
    offsets: CubeTensor<R>,
    out: CubeTensor<R>,
    transpose_b: bool,
) {
    let client = a.client.clone();
    let [rows, k] = [a.meta.shape()[0], a.meta.shape()[1]];
    let n = out.meta.shape()[1];
    let n_experts = b.meta.shape()[0];
    if rows == 0 || n == 0 {
        return;
    }
    let cube_count = CubeCount::Static(n.div_ceil(BLOCK) as u32, (rows.div_ceil(BLOCK) + n_experts) as u32, 1);
    grouped_matmul_kernel::launch::<R>(
        &client,
        cube_count,
        CubeDim::new_2d(UNITS as u32, UNITS as u32),
        a.into_array_arg(),
        b.into_array_arg(),
        offsets.into_array_arg(),
        out.into_array_arg(),
        k,
        n,
        n_experts,
        transpose_b,
    );
}

/// `out [E, K, N]` (contiguous f32, every element written) `= a_eᵀ · d_e` per expert.
pub fn launch_grouped_wgrad<R: CubeRuntime>(a: CubeTensor<R>, d: CubeTensor<R>, offsets: CubeTensor<R>, out: CubeTensor<R>) {
    let client = a.client.clone();
    let [n_experts, k, n] = [out.meta.shape()[0], out.meta.shape()[1], out.meta.shape()[2]];
    if n_experts * k * n == 0 {
        return;
    }
    let cube_count = CubeCount::Static(n.div_ceil(BLOCK) as u32, k.div_ceil(BLOCK) as u32, n_experts as u32);
    grouped_wgrad_kernel::launch::<R>(
        &client,
        cube_count,
        CubeDim::new_2d(UNITS as u32, UNITS as u32),
        a.into_array_arg(),
        d.into_array_arg(),
        offsets.into_array_arg(),
        out.into_array_arg(),
        k,
        n,
    );
}
