//! Quantization layouts: tile shapes, scale rounding, and their Burn `QuantScheme` names.
//!
//! # Example
//! ```
//! use burn_fp8::{QuantConfig, ScaleMode, TileShape};
//!
//! // DeepSeek-V3's recipe: 1×128 tiles for activations, 128×128 blocks for weights.
//! let weights = QuantConfig::weight();
//! assert_eq!(weights.tile, TileShape::Block128x128);
//! assert_eq!(weights.tile.scale_shape([256, 300]), [2, 3]); // one scale per block, tails included
//! // Power-of-two scales (UE8M0), as FP8 dispatch uses: amax 100 → 2^ceil(log2(100 / 448)).
//! let dispatch = QuantConfig::activation().with_scale_mode(ScaleMode::PowerOfTwo);
//! assert_eq!(dispatch.tile_scale(100.0).scale, 0.25);
//! ```

use crate::Fp8Format;
use burn::tensor::quantization::{QuantLevel, QuantMode, QuantParam, QuantScheme, QuantStore};
use serde::{Deserialize, Serialize};

/// Width of every scaling tile along the contracted (K) dimension, DeepSeek-V3's N_C.
pub const TILE_K: usize = 128;

/// Codes packed in one `u32` word of an [`crate::Fp8Tensor`]'s data.
pub const CODES_PER_WORD: usize = 4;

/// Words per 128-wide tile of one row.
pub const WORDS_PER_TILE: usize = TILE_K / CODES_PER_WORD;

/// Which elements share one scale.
///
/// Tiles always span [`TILE_K`] = 128 columns (the K dimension of the GEMM that consumes
/// the tensor); they differ in how many rows they span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TileShape {
    /// 1×128: one scale per row per 128 columns. DeepSeek-V3's activation tiling.
    #[default]
    Row1x128,
    /// 128×128: one scale per block. DeepSeek-V3's weight tiling.
    Block128x128,
}

impl TileShape {
    /// Rows covered by one tile.
    pub const fn rows(self) -> usize {
        match self {
            TileShape::Row1x128 => 1,
            TileShape::Block128x128 => 128,
        }
    }

    /// `[rows, cols]` of one tile.
    pub const fn dims(self) -> [usize; 2] {
        [self.rows(), TILE_K]
    }

    /// Shape of the scale grid for a `[rows, cols]` tensor: `[ceil(rows / r), ceil(cols / 128)]`.
    pub const fn scale_shape(self, shape: [usize; 2]) -> [usize; 2] {
        [shape[0].div_ceil(self.rows()), shape[1].div_ceil(TILE_K)]
    }
}

/// How a tile's scale is derived from its max-abs value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScaleMode {
    /// `scale = amax / fmt_max`; inputs are multiplied by `fmt_max / amax`.
    #[default]
    Exact,
    /// `scale = 2^ceil(log2(amax / fmt_max))`, representable as UE8M0 (an 8-bit exponent):
    /// scaling is then exact, as DeepSeek-V3 uses for FP8 dispatch.
    PowerOfTwo,
}

/// A complete description of how a tensor is quantized.
///
/// # Example
/// ```
/// use burn_fp8::{QuantConfig, TileShape, Fp8Format, ScaleMode};
/// let act = QuantConfig::activation();
/// assert_eq!(act.tile, TileShape::Row1x128);
/// let w = QuantConfig::weight().with_scale_mode(ScaleMode::PowerOfTwo);
/// assert_eq!((w.tile, w.format), (TileShape::Block128x128, Fp8Format::E4M3));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantConfig {
    /// Element format.
    pub format: Fp8Format,
    /// Tile shape sharing one scale.
    pub tile: TileShape,
    /// Scale rounding.
    pub scale_mode: ScaleMode,
}

impl QuantConfig {
    /// DeepSeek-V3 activations: E4M3, 1×128 tiles, exact scales.
    pub const fn activation() -> Self {
        Self { format: Fp8Format::E4M3, tile: TileShape::Row1x128, scale_mode: ScaleMode::Exact }
    }

    /// DeepSeek-V3 weights: E4M3, 128×128 blocks, exact scales.
    pub const fn weight() -> Self {
        Self { format: Fp8Format::E4M3, tile: TileShape::Block128x128, scale_mode: ScaleMode::Exact }
    }

    /// Same config with another element format.
    pub const fn with_format(mut self, format: Fp8Format) -> Self {
        self.format = format;
        self
    }

    /// Same config with another tile shape.
    pub const fn with_tile(mut self, tile: TileShape) -> Self {
        self.tile = tile;
        self
    }

    /// Same config with another scale rounding.
    pub const fn with_scale_mode(mut self, scale_mode: ScaleMode) -> Self {
        self.scale_mode = scale_mode;
        self
    }

    /// The scale and the multiplier applied before encoding, for a tile whose max-abs is `amax`.
    ///
    /// An all-zero tile gets scale 1. A non-finite `amax` (the tile holds NaN or ±inf)
    /// gives a NaN scale and multiplier: the tile then encodes to NaN codes and dequantizes
    /// to NaN, and [`crate::Fp8Tensor::check_finite`] names it.
    pub fn tile_scale(&self, amax: f32) -> TileScale {
        if !amax.is_finite() {
            return TileScale { scale: f32::NAN, multiplier: f32::NAN };
        }
        if amax == 0.0 {
            return TileScale { scale: 1.0, multiplier: 1.0 };
        }
        let max = self.format.max();
        match self.scale_mode {
            ScaleMode::Exact => TileScale { scale: amax / max, multiplier: max / amax },
            ScaleMode::PowerOfTwo => {
                let scale = pow2_ceil(amax / max);
                TileScale { scale, multiplier: 1.0 / scale }
            }
        }
    }

    /// This layout as Burn's [`QuantScheme`]: FP8 values packed four to a `u32` along the
    /// last dimension, one f32 scale per block, symmetric.
    ///
    /// The description is exact: our packed data words and scale grid follow the same
    /// conventions. Burn 0.21's own quantized-tensor kernels, however, need blocks that
    /// divide the shape and native FP8 conversions (absent on wgpu), and its matmul
    /// dequantizes to float before multiplying, so this crate keeps its own tensor type and
    /// GEMM; the scheme documents the layout and lets data be handed to Burn on the host.
    pub fn quant_scheme(&self) -> QuantScheme {
        QuantScheme::default()
            .with_value(self.format.quant_value())
            .with_param(QuantParam::F32)
            .with_store(QuantStore::PackedU32(0))
            .with_mode(QuantMode::Symmetric)
            .with_level(QuantLevel::block([self.tile.rows() as u8, TILE_K as u8]))
    }
}

/// A tile's scale (stored) and multiplier (applied to inputs before encoding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileScale {
    /// Dequantized value = decoded code × scale.
    pub scale: f32,
    /// Quantized code = encode(value × multiplier).
    pub multiplier: f32,
}

/// Smallest power of two ≥ `x`, for finite positive `x`; at least 2⁻¹²⁶ (f32's smallest
/// normal), so that its reciprocal stays finite. Exact: works on the bits.
pub(crate) fn pow2_ceil(x: f32) -> f32 {
    if x <= f32::MIN_POSITIVE {
        return f32::MIN_POSITIVE;
    }
    let bits = x.to_bits();
    let exponent = bits & 0x7F80_0000;
    if bits & 0x007F_FFFF == 0 {
        f32::from_bits(exponent)
    } else {
        f32::from_bits(exponent + 0x0080_0000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_ceil_is_exact() {
        assert_eq!(pow2_ceil(1.0), 1.0);
        assert_eq!(pow2_ceil(1.0000001), 2.0);
        assert_eq!(pow2_ceil(0.75), 1.0);
        assert_eq!(pow2_ceil(3.0 / 448.0), 1.0 / 128.0);
        assert_eq!(pow2_ceil(1e-40), f32::MIN_POSITIVE);
    }

    #[test]
    fn scales() {
        let c = QuantConfig::activation();
        assert_eq!(c.tile_scale(0.0), TileScale { scale: 1.0, multiplier: 1.0 });
        assert_eq!(c.tile_scale(448.0 * 2.0).scale, 2.0);
        assert!(c.tile_scale(f32::INFINITY).scale.is_nan());
        assert!(c.tile_scale(f32::NAN).multiplier.is_nan());
        let p = c.with_scale_mode(ScaleMode::PowerOfTwo);
        let s = p.tile_scale(100.0);
        assert_eq!(s.scale, 0.25);
        assert!(100.0 * s.multiplier <= 448.0);
    }

    #[test]
    fn scheme_names_the_layout() {
        let scheme = QuantConfig::weight().quant_scheme();
        assert_eq!(scheme.level, QuantLevel::block([128, 128]));
        assert_eq!(scheme.num_quants(), CODES_PER_WORD);
        assert_eq!(TileShape::Block128x128.scale_shape([129, 300]), [2, 3]);
    }
}

/// The static description of a quantized 2-D tensor: logical shape and quantization layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp8Layout {
    /// Logical `[rows, cols]` of the unquantized tensor.
    pub shape: [usize; 2],
    /// Element format, tile shape and scale rounding.
    pub config: QuantConfig,
}

impl Fp8Layout {
    /// Shape of the packed data: `[rows, 32 · ⌈cols / 128⌉]` words.
    pub const fn data_shape(&self) -> [usize; 2] {
        [self.shape[0], self.shape[1].div_ceil(TILE_K) * WORDS_PER_TILE]
    }

    /// Shape of the scale grid.
    pub const fn scale_shape(&self) -> [usize; 2] {
        self.config.tile.scale_shape(self.shape)
    }
}
