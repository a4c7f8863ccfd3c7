//! The register tile shared by the GEMM kernels (burn-fp8's tile-scaled GEMM, burn-moe's
//! grouped GEMM with shared staging): a cube of `units_m × units_n` units computes a
//! `block_m × block_n` block of the output, each unit `tm × tn` values at rows `uy +
//! i·units_m` and columns `ux + j·units_n` of the block (strided, so that neighbouring
//! units touch neighbouring addresses), held in registers as `acc[i·tn + j]`.

use cubecl::prelude::*;

/// How a cube's outputs are spread over its units (a comptime argument of the kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegisterTile {
    /// Output rows per unit.
    pub tm: usize,
    /// Output columns per unit.
    pub tn: usize,
    /// Units along M.
    pub units_m: usize,
    /// Units along N.
    pub units_n: usize,
}

impl RegisterTile {
    /// Output rows of a cube.
    pub const fn block_m(&self) -> usize {
        self.tm * self.units_m
    }

    /// Output columns of a cube.
    pub const fn block_n(&self) -> usize {
        self.tn * self.units_n
    }
}

/// One step `kk` of the K loop over staged operands (`a_sh [chunk][block_m]`, `b_sh
/// [chunk][block_n]`, K-major): the unit's `tm` values of A and `tn` of B into registers,
/// then `acc[i·tn + j] += a[i] · b[j]`.
#[cube]
pub fn fma_step(
    a_sh: &SharedMemory<f32>,
    b_sh: &SharedMemory<f32>,
    kk: usize,
    acc: &mut Array<f32>,
    a_reg: &mut Array<f32>,
    b_reg: &mut Array<f32>,
    #[comptime] tile: RegisterTile,
) {
    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..tile.tm {
        a_reg[i] = a_sh[kk * comptime!(tile.block_m()) + uy + i * tile.units_m];
    }
    #[unroll]
    for j in 0..tile.tn {
        b_reg[j] = b_sh[kk * comptime!(tile.block_n()) + ux + j * tile.units_n];
    }
    #[unroll]
    for i in 0..tile.tm {
        #[unroll]
        for j in 0..tile.tn {
            acc[i * tile.tn + j] += a_reg[i] * b_reg[j];
        }
    }
}

/// Writes the unit's tile to rows `[m0, m_end)` and columns `[n0, n)` of a row-major
/// block with `n` columns starting at `base` (values outside those bounds are dropped).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_tile(out: &mut Array<f32>, acc: &Array<f32>, base: usize, m0: usize, m_end: usize, n0: usize, n: usize, #[comptime] tile: RegisterTile) {
    let ux = UNIT_POS_X as usize;
    let uy = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..tile.tm {
        let row = m0 + uy + i * tile.units_m;
        #[unroll]
        for j in 0..tile.tn {
            let col = n0 + ux + j * tile.units_n;
            if row < m_end && col < n {
                out[base + row * n + col] = acc[i * tile.tn + j];
            }
        }
    }
}
