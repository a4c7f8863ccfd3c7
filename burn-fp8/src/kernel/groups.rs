//! Row tiles of a grouped (expert-contiguous) layout, shared by the grouped GEMMs of this
//! crate and of `burn-moe`.
//!
//! Group `g` owns rows `offsets[g]..offsets[g + 1]`. Each group's rows are cut into tiles
//! of `block` rows that never straddle two groups, so a launch over a grid of
//! `⌈R / block⌉ + G` row tiles covers every group whatever the row counts (each group adds
//! at most one partial tile), without reading the offsets back to the host. A cube finds
//! its tile by walking the offsets; surplus cubes get no group and exit.

use cubecl::prelude::*;

/// The rows a cube computes: `[m0, m_end)` of group `group`; `group` equals the group
/// count when the tile index is past the last tile.
#[derive(CubeType, Clone, Copy)]
pub struct RowTile {
    /// The group (expert) the rows belong to.
    pub group: usize,
    /// First row of the tile.
    pub m0: usize,
    /// End of the group's rows (the tile's rows are `m0..min(m0 + block, m_end)`).
    pub m_end: usize,
}

/// Tile `tile` of the grouped layout described by `offsets [groups + 1]`.
#[cube]
pub fn grouped_row_tile(offsets: &Array<u32>, groups: usize, tile: usize, #[comptime] block: usize) -> RowTile {
    let mut seen = 0usize;
    let mut group = groups;
    let mut m0 = 0usize;
    let mut m_end = 0usize;
    for g in 0..groups {
        let start = offsets[g] as usize;
        let end = offsets[g + 1] as usize;
        let tiles = (end - start).div_ceil(block);
        if group == groups && tile < seen + tiles {
            group = g;
            m0 = start + (tile - seen) * block;
            m_end = end;
        }
        seen += tiles;
    }
    RowTile { group, m0, m_end }
}

/// Row tiles to launch for `rows` rows in `groups` groups of tiles of `block` rows.
pub const fn grouped_tile_count(rows: usize, groups: usize, block: usize) -> usize {
    rows.div_ceil(block) + groups
}
