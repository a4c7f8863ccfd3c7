//! The grouped GEMMs for CPU adapters (lavapipe): operands read straight from memory, in
//! vectors of `N` floats (4, 2 or 1, the widest that divides the rows).
//!
//! A CPU runs an 8-unit slice of a cube as the 8 lanes of a SIMD register, and lavapipe
//! turns every per-unit memory read into a load per lane; one 4-float vector read costs
//! about what one float does. So these kernels read vectors along the contiguous
//! dimension, keep every unit's `tile_m × tile_n` accumulators in registers (no shared
//! memory, no barriers), and read each loaded vector into 4·`tile_n` (or `tile_m`)
//! multiply-adds. On lavapipe (v3-slim's up projection, 64 experts of 64 rows) this ran
//! 2.2x the scalar reads of the same tiling.
//!
//! - [`direct_matmul_kernel`](fn@direct_matmul_kernel): `out[r, :] = a[r, :] · B_e`, `b [E, K, N]`, vectors along
//!   `K` of `a` and along `N` of `b` and `out`;
//! - [`direct_matmul_bt_kernel`](fn@direct_matmul_bt_kernel): `out[r, c] = a[r, :] · b_e[c, :]`, `b [E, N, K]`,
//!   vectors along `K` of both, summed at the end;
//! - [`direct_wgrad_kernel`](fn@direct_wgrad_kernel): `out[e] = a_eᵀ · d_e`, vectors along `K` of `a` and `N` of
//!   `d` and `out`.
//!
//! Every unit of an 8 × 8 cube owns rows `m0 + uy + 8i` and columns (or column vectors)
//! `n0 + ux + 8j`; out-of-range indices are clamped for reading, and their results are
//! not stored.

// `#[cube]` expands the vector width `N` into an argument beside the kernels' own `n`
// (the output width), which this lint reads as two arguments of one name.
#![allow(clippy::duplicate_underscore_argument)]

use super::{vector_width, UNITS};
use burn_fp8::codegen::{array, settings, CodegenTarget, KernelVariant};
use burn_fp8::kernel::groups::grouped_row_tile;
use cubecl::prelude::*;

/// `out[r, :] = a[r, :] · B_e` for the rows of expert `e`. `a [R, K/N]`, `b [E, K, N/N]`,
/// `out [R, N/N]` in vectors; `k` and `n` count floats.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn direct_matmul_kernel<N: Size>(
    a: &Array<Vector<f32, N>>,
    b: &Array<Vector<f32, N>>,
    offsets: &Array<u32>,
    out: &mut Array<Vector<f32, N>>,
    k: usize,
    n: usize,
    n_experts: usize,
    #[comptime] tile_m: usize,
    #[comptime] tile_n: usize,
) {
    let width = N::value();
    let (kv, nv) = (k / width, n / width);
    let tile = grouped_row_tile(offsets, n_experts, CUBE_POS_Y as usize, comptime!(UNITS * tile_m));
    if tile.group == n_experts {
        terminate!();
    }
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let last_row = tile.m_end - 1;
    let c0 = CUBE_POS_X as usize * comptime!(UNITS * tile_n) + ux;
    let b0 = tile.group * k * nv;
    let mut acc = Array::<Vector<f32, N>>::new(comptime!(tile_m * tile_n));
    let mut a_reg = Array::<Vector<f32, N>>::new(tile_m);
    let mut b_reg = Array::<Vector<f32, N>>::new(tile_n);
    #[unroll]
    for i in 0..comptime!(tile_m * tile_n) {
        acc[i] = Vector::new(0.0);
    }
    for q in 0..kv {
        #[unroll]
        for i in 0..tile_m {
            a_reg[i] = a[min(tile.m0 + uy + i * UNITS, last_row) * kv + q];
        }
        #[unroll]
        for t in 0..width {
            #[unroll]
            for j in 0..tile_n {
                b_reg[j] = b[b0 + (q * width + t) * nv + min(c0 + j * UNITS, nv - 1)];
            }
            #[unroll]
            for i in 0..tile_m {
                let av = Vector::new(a_reg[i][t]);
                #[unroll]
                for j in 0..tile_n {
                    acc[i * tile_n + j] += av * b_reg[j];
                }
            }
        }
    }
    #[unroll]
    for i in 0..tile_m {
        let row = tile.m0 + uy + i * UNITS;
        #[unroll]
        for j in 0..tile_n {
            let col = c0 + j * UNITS;
            if row < tile.m_end && col < nv {
                out[row * nv + col] = acc[i * tile_n + j];
            }
        }
    }
}

/// `out[r, c] = a[r, :] · b_e[c, :]` for the rows of expert `e` (the input gradient of the
/// forward). `a [R, K/N]`, `b [E, N, K/N]` in vectors, `out [R, N]` in floats.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn direct_matmul_bt_kernel<N: Size>(
    a: &Array<Vector<f32, N>>,
    b: &Array<Vector<f32, N>>,
    offsets: &Array<u32>,
    out: &mut Array<f32>,
    k: usize,
    n: usize,
    n_experts: usize,
    #[comptime] tile_m: usize,
    #[comptime] tile_n: usize,
) {
    let width = N::value();
    let kv = k / width;
    let tile = grouped_row_tile(offsets, n_experts, CUBE_POS_Y as usize, comptime!(UNITS * tile_m));
    if tile.group == n_experts {
        terminate!();
    }
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let last_row = tile.m_end - 1;
    let c0 = CUBE_POS_X as usize * comptime!(UNITS * tile_n) + ux;
    let b0 = tile.group * n * kv;
    let mut acc = Array::<Vector<f32, N>>::new(comptime!(tile_m * tile_n));
    let mut a_reg = Array::<Vector<f32, N>>::new(tile_m);
    let mut b_reg = Array::<Vector<f32, N>>::new(tile_n);
    #[unroll]
    for i in 0..comptime!(tile_m * tile_n) {
        acc[i] = Vector::new(0.0);
    }
    for q in 0..kv {
        #[unroll]
        for i in 0..tile_m {
            a_reg[i] = a[min(tile.m0 + uy + i * UNITS, last_row) * kv + q];
        }
        #[unroll]
        for j in 0..tile_n {
            b_reg[j] = b[b0 + min(c0 + j * UNITS, n - 1) * kv + q];
        }
        #[unroll]
        for i in 0..tile_m {
            #[unroll]
            for j in 0..tile_n {
                acc[i * tile_n + j] += a_reg[i] * b_reg[j];
            }
        }
    }
    #[unroll]
    for i in 0..tile_m {
        let row = tile.m0 + uy + i * UNITS;
        #[unroll]
        for j in 0..tile_n {
            let col = c0 + j * UNITS;
            if row < tile.m_end && col < n {
                let v = acc[i * tile_n + j];
                let mut sum = 0.0f32;
                #[unroll]
                for t in 0..width {
                    sum += v[t];
                }
                out[row * n + col] = sum;
            }
        }
    }
}

/// `out[e] = a_eᵀ · d_e` over expert `e`'s rows (`CUBE_POS_Z`). `a [R, K/N]`, `d [R, N/N]`,
/// `out [E, K, N/N]` in vectors. A unit owns `tile_m` vectors of `a`'s columns (`N·tile_m`
/// output rows) and `tile_n` vectors of `d`'s.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn direct_wgrad_kernel<N: Size>(
    a: &Array<Vector<f32, N>>,
    d: &Array<Vector<f32, N>>,
    offsets: &Array<u32>,
    out: &mut Array<Vector<f32, N>>,
    k: usize,
    n: usize,
    #[comptime] tile_m: usize,
    #[comptime] tile_n: usize,
) {
    let width = N::value();
    let (kv, nv) = (k / width, n / width);
    let expert = CUBE_POS_Z as usize;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let r0 = CUBE_POS_Y as usize * comptime!(UNITS * tile_m) + uy;
    let c0 = CUBE_POS_X as usize * comptime!(UNITS * tile_n) + ux;
    let start = offsets[expert] as usize;
    let end = offsets[expert + 1] as usize;
    let mut acc = Array::<Vector<f32, N>>::new(comptime!(tile_m * tile_n * width));
    let mut a_reg = Array::<Vector<f32, N>>::new(tile_m);
    let mut d_reg = Array::<Vector<f32, N>>::new(tile_n);
    #[unroll]
    for i in 0..comptime!(tile_m * tile_n * width) {
        acc[i] = Vector::new(0.0);
    }
    for r in start..end {
        #[unroll]
        for i in 0..tile_m {
            a_reg[i] = a[r * kv + min(r0 + i * UNITS, kv - 1)];
        }
        #[unroll]
        for j in 0..tile_n {
            d_reg[j] = d[r * nv + min(c0 + j * UNITS, nv - 1)];
        }
        #[unroll]
        for i in 0..tile_m {
            #[unroll]
            for t in 0..width {
                let av = Vector::new(a_reg[i][t]);
                #[unroll]
                for j in 0..tile_n {
                    acc[(i * width + t) * tile_n + j] += av * d_reg[j];
                }
            }
        }
    }
    let base = expert * k * nv;
    #[unroll]
    for i in 0..tile_m {
        let rv = r0 + i * UNITS;
        #[unroll]
        for t in 0..width {
            let row = rv * width + t;
            #[unroll]
            for j in 0..tile_n {
                let col = c0 + j * UNITS;
                if rv < kv && col < nv {
                    out[base + row * nv + col] = acc[(i * width + t) * tile_n + j];
                }
            }
        }
    }
}

/// Column vectors per unit of [`direct_matmul_kernel`](fn@direct_matmul_kernel): 4 (8 rows × 4 vectors: 9.7 GFLOP/s
/// on lavapipe for v3-slim's up projection, against 7.6 with 2).
const TILE_N: usize = 4;
/// Columns per unit of [`direct_matmul_bt_kernel`](fn@direct_matmul_bt_kernel): 8 (4 rows × 8: 6.3 GFLOP/s on the same
/// shapes, against 5.1 with 4).
const TILE_N_BT: usize = 8;
/// The weight-gradient tile, `a`-column vectors × `d`-column vectors per unit: 4 × 4 (15.9
/// GFLOP/s, against 13.2 for 2 × 4).
const WGRAD_TILE: [usize; 2] = [4, 4];

/// Launches [`direct_matmul_kernel`](fn@direct_matmul_kernel) (or, with `transpose_b`, [`direct_matmul_bt_kernel`](fn@direct_matmul_bt_kernel))
/// over `row_tiles` row tiles of `8·tile_m` rows.
#[allow(clippy::too_many_arguments)]
pub fn launch_direct_matmul<R: cubecl::Runtime>(
    client: &ComputeClient<R>,
    a: ArrayArg<R>,
    b: ArrayArg<R>,
    offsets: ArrayArg<R>,
    out: ArrayArg<R>,
    [k, n, n_experts, row_tiles]: [usize; 4],
    transpose_b: bool,
    tile_m: usize,
) {
    let dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    if transpose_b {
        let width = vector_width(&[k]);
        let count = CubeCount::Static(n.div_ceil(UNITS * TILE_N_BT) as u32, row_tiles as u32, 1);
        direct_matmul_bt_kernel::launch::<R>(client, count, dim, width, a, b, offsets, out, k, n, n_experts, tile_m, TILE_N_BT);
    } else {
        let width = vector_width(&[k, n]);
        let count = CubeCount::Static((n / width).div_ceil(UNITS * TILE_N) as u32, row_tiles as u32, 1);
        direct_matmul_kernel::launch::<R>(client, count, dim, width, a, b, offsets, out, k, n, n_experts, tile_m, TILE_N);
    }
}

/// Launches [`direct_wgrad_kernel`](fn@direct_wgrad_kernel) for `out [E, K, N]`.
pub fn launch_direct_wgrad<R: cubecl::Runtime>(client: &ComputeClient<R>, a: ArrayArg<R>, d: ArrayArg<R>, offsets: ArrayArg<R>, out: ArrayArg<R>, [n_experts, k, n]: [usize; 3]) {
    let width = vector_width(&[k, n]);
    let [tile_m, tile_n] = WGRAD_TILE;
    let count = CubeCount::Static((n / width).div_ceil(UNITS * tile_n) as u32, (k / width).div_ceil(UNITS * tile_m) as u32, n_experts as u32);
    direct_wgrad_kernel::launch::<R>(client, count, CubeDim::new_2d(UNITS as u32, UNITS as u32), width, a, d, offsets, out, k, n, tile_m, tile_n);
}

/// The direct-staging kernels (the CPU adapters' path, also chosen on a GPU with
/// [`super::grouped::Staging::Direct`]) at every configuration their launchers choose:
/// vectors of 4, 2 and 1 floats, the three row tilings, and the weight gradient.
pub fn variants<R: Runtime>(client: &ComputeClient<R>, _target: &CodegenTarget) -> Vec<KernelVariant> {
    let dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    let mut out = Vec::new();
    for width in [4, 2, 1] {
        for tile_m in [2, 4, 8] {
            let plain = direct_matmul_kernel::DirectMatmulKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), (), (), (), width, tile_m, TILE_N);
            out.push(KernelVariant::new("direct_matmul_kernel", (width, tile_m), plain));
            let bt =
                direct_matmul_bt_kernel::DirectMatmulBtKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), (), (), (), width, tile_m, TILE_N_BT);
            out.push(KernelVariant::new("direct_matmul_bt_kernel", (width, tile_m), bt));
        }
        let [tile_m, tile_n] = WGRAD_TILE;
        let wgrad = direct_wgrad_kernel::DirectWgradKernel::<R>::new(settings(dim), client.clone(), array(), array(), array(), array(), (), (), width, tile_m, tile_n);
        out.push(KernelVariant::new("direct_wgrad_kernel", width, wgrad));
    }
    out
}
