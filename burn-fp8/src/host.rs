//! Host (CPU, plain Rust) quantization and an f64 GEMM: the ground truth the kernels and
//! the Burn reference are tested against. Slow by design.
//!
//! # Example
//! ```
//! use burn_fp8::host::{calc_diff, matmul_nt_f64, HostFp8};
//! use burn_fp8::QuantConfig;
//!
//! let x: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = HostFp8::quantize(&x, [2, 256], QuantConfig::activation());
//! let exact: Vec<f64> = x.iter().map(|&v| v as f64).collect();
//! // E4M3 keeps 3 mantissa bits: DeepGEMM's calc_diff of a round trip is below 1e-3.
//! assert!(calc_diff(&q.dequantize_f64(), &exact) < 1e-3);
//! let gram = matmul_nt_f64(&exact, &exact, 2, 2, 256); // x · xᵀ in f64, [2, 2]
//! assert!(gram[0] > 0.0 && gram.len() == 4);
//! ```

use crate::config::{CODES_PER_WORD, TILE_K, WORDS_PER_TILE};
use crate::{Fp8Tensor, QuantConfig};
use burn::tensor::backend::Backend;

/// A quantized matrix on the host: one code per element, row-major, plus the scale grid.
#[derive(Clone, Debug, PartialEq)]
pub struct HostFp8 {
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Layout.
    pub config: QuantConfig,
    /// `rows × cols` codes.
    pub codes: Vec<u8>,
    /// `⌈rows / tile_rows⌉ × ⌈cols / 128⌉` scales, row-major.
    pub scales: Vec<f32>,
}

impl HostFp8 {
    /// Quantizes a row-major `[rows, cols]` matrix.
    pub fn quantize(x: &[f32], shape: [usize; 2], config: QuantConfig) -> Self {
        let [rows, cols] = shape;
        assert_eq!(x.len(), rows * cols, "host quantize: {} values for shape {shape:?}", x.len());
        let [scale_rows, scale_cols] = config.tile.scale_shape(shape);
        let tile_rows = config.tile.rows();
        let mut scales = vec![0.0; scale_rows * scale_cols];
        let mut codes = vec![0u8; rows * cols];
        for tr in 0..scale_rows {
            for tc in 0..scale_cols {
                let row_range = tr * tile_rows..((tr + 1) * tile_rows).min(rows);
                let col_range = tc * TILE_K..((tc + 1) * TILE_K).min(cols);
                // Max-abs on the bits, as the kernel: exact, and NaN/inf sort above all numbers.
                let amax_bits = row_range.clone().flat_map(|r| col_range.clone().map(move |c| (r, c))).map(|(r, c)| x[r * cols + c].to_bits() & 0x7FFF_FFFF).max().unwrap_or(0);
                let s = config.tile_scale(f32::from_bits(amax_bits));
                scales[tr * scale_cols + tc] = s.scale;
                for r in row_range {
                    for c in col_range.clone() {
                        codes[r * cols + c] = config.format.encode(x[r * cols + c] * s.multiplier);
                    }
                }
            }
        }
        Self { shape, config, codes, scales }
    }

    /// Reads a quantized tensor back from a device.
    pub fn from_tensor<B: Backend>(q: &Fp8Tensor<B>) -> Self {
        let [rows, cols] = q.shape();
        let words: Vec<i64> = q.data().to_data().convert::<i64>().to_vec().expect("int data");
        let words_per_row = cols.div_ceil(TILE_K) * WORDS_PER_TILE;
        let mut codes = vec![0u8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let word = words[r * words_per_row + c / CODES_PER_WORD] as u32;
                codes[r * cols + c] = (word >> (8 * (c % CODES_PER_WORD))) as u8;
            }
        }
        let scales = q.scales().to_data().convert::<f32>().to_vec().expect("f32 scales");
        Self { shape: [rows, cols], config: q.config(), codes, scales }
    }

    /// Packed words, `[rows, 32 · ⌈cols / 128⌉]` row-major, as the device layout.
    pub fn words(&self) -> Vec<u32> {
        let [rows, cols] = self.shape;
        let words_per_row = cols.div_ceil(TILE_K) * WORDS_PER_TILE;
        let mut words = vec![0u32; rows * words_per_row];
        for r in 0..rows {
            for c in 0..cols {
                words[r * words_per_row + c / CODES_PER_WORD] |= (self.codes[r * cols + c] as u32) << (8 * (c % CODES_PER_WORD));
            }
        }
        words
    }

    /// Scale of element `(r, c)`.
    pub fn scale(&self, r: usize, c: usize) -> f32 {
        let scale_cols = self.shape[1].div_ceil(TILE_K);
        self.scales[(r / self.config.tile.rows()) * scale_cols + c / TILE_K]
    }

    /// Dequantized values in f32, `code · scale` rounded once: e.g. a checkpoint's FP8
    /// weights (DeepSeek-V3's released `weight` and `weight_scale_inv`, E4M3 in 128×128
    /// blocks: [`QuantConfig::weight`]).
    ///
    /// # Panics
    /// When `codes` or `scales` do not hold `shape`'s elements and scale grid.
    pub fn dequantize(&self) -> Vec<f32> {
        let [rows, cols] = self.shape;
        let grid = self.config.tile.scale_shape(self.shape);
        assert_eq!(self.codes.len(), rows * cols, "HostFp8::dequantize: {} codes for shape {:?}", self.codes.len(), self.shape);
        assert_eq!(self.scales.len(), grid[0] * grid[1], "HostFp8::dequantize: {} scales for the grid {grid:?}", self.scales.len());
        let table = self.config.format.decode_table();
        self.codes.iter().enumerate().map(|(i, &code)| table[code as usize] * self.scale(i / cols, i % cols)).collect()
    }

    /// Dequantized values in f64 (exact: an FP8 value times an f32 scale fits in f64).
    pub fn dequantize_f64(&self) -> Vec<f64> {
        let [rows, cols] = self.shape;
        (0..rows * cols).map(|i| self.config.format.decode(self.codes[i]) as f64 * self.scale(i / cols, i % cols) as f64).collect()
    }
}

/// `A · Bᵀ` in f64 for row-major `a` `[m, k]` and `b` `[n, k]`.
pub fn matmul_nt_f64(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = a[i * k..(i + 1) * k].iter().zip(&b[j * k..(j + 1) * k]).map(|(x, y)| x * y).sum();
        }
    }
    out
}

/// DeepGEMM's whole-output difference `1 − 2Σxy / Σ(x² + y²)`: 0 for identical outputs,
/// insensitive to a few large elements, ~1e-7 for f32 rounding, ~1e-3 for FP8 inputs.
pub fn calc_diff(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "calc_diff: lengths {} and {}", x.len(), y.len());
    let (mut xy, mut sq) = (0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        0.0
    } else {
        1.0 - 2.0 * xy / sq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TileShape;

    /// The f32 dequantization is the exact product rounded once: the f64 one cast to f32,
    /// bit for bit, on ragged shapes (tiles cut at both edges) with both tilings.
    #[test]
    fn f32_dequantization_is_the_exact_product_rounded() {
        let shape = [130, 260];
        let x: Vec<f32> = (0..shape[0] * shape[1]).map(|i| ((i as f32 * 0.61).sin() + 1.5) * 10f32.powi((i % 7) as i32 - 3)).collect();
        for tile in [TileShape::Row1x128, TileShape::Block128x128] {
            let q = HostFp8::quantize(&x, shape, QuantConfig::weight().with_tile(tile));
            let exact: Vec<f32> = q.dequantize_f64().iter().map(|&v| v as f32).collect();
            let got = q.dequantize();
            assert!(got.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits()), "{tile:?}");
        }
    }
}
