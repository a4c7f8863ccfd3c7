//! The reference implementation in plain Burn tensor ops: runs on every backend, defines
//! what the kernels compute, and is what [`crate::Fp8Backend`]'s default methods call.
//!
//! It follows the kernels' arithmetic step for step (the same f32 products and the same
//! rounding rule), so quantization agrees bit for bit and the GEMM differs only in the
//! order of f32 additions.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::{reference, Fp8Layout, QuantConfig};
//!
//! let device = Default::default();
//! let x = Tensor::<NdArray, 2>::random([4, 200], Distribution::Normal(0.0, 1.0), &device);
//! let config = QuantConfig::activation();
//! let (words, scales) = reference::quantize(x.clone(), config);
//! // Four codes per u32 word, 128 columns per tile (the tail padded); one scale per 1×128 tile.
//! assert_eq!((words.dims(), scales.dims()), ([4, 64], [4, 2]));
//! let back = reference::dequantize(words, scales, Fp8Layout { shape: [4, 200], config });
//! let err = (back - x.clone()).abs().max().into_scalar() / x.abs().max().into_scalar();
//! assert!(err < 0.07, "{err}"); // E4M3 rounds to within 2⁻⁴ of each value
//! ```

use crate::config::Fp8Layout;
use crate::config::{ScaleMode, TILE_K, WORDS_PER_TILE};
use crate::{Fp8Format, QuantConfig};
use burn::tensor::{backend::Backend, ops::PadMode, ElementConversion, Int, Tensor, TensorData};

/// Quantizes `x` `[rows, cols]`; returns packed words `[rows, 32·⌈cols/128⌉]` and scales.
pub fn quantize<B: Backend>(x: Tensor<B, 2>, config: QuantConfig) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let device = x.device();
    let [rows, cols] = x.dims();
    let tile_rows = config.tile.rows();
    let [scale_rows, scale_cols] = config.tile.scale_shape([rows, cols]);
    let words = scale_cols * WORDS_PER_TILE;
    if rows == 0 || cols == 0 {
        return (Tensor::zeros([rows, words], &device), Tensor::zeros([scale_rows, scale_cols], &device));
    }
    let [pad_rows, pad_cols] = [scale_rows * tile_rows, scale_cols * TILE_K];
    let x = x.pad([(0, pad_rows - rows), (0, pad_cols - cols)], PadMode::Constant(0.0));

    // Per-tile max-abs and non-finite flags.
    let tiles = |t: Tensor<B, 2>| t.reshape([scale_rows, tile_rows, scale_cols, TILE_K]);
    let amax = tiles(x.clone().abs()).max_dim(3).max_dim(1).reshape([scale_rows, scale_cols]);
    let nonfinite = tiles(x.clone().is_nan().bool_or(x.clone().is_inf()).float()).max_dim(3).max_dim(1).reshape([scale_rows, scale_cols]).greater_elem(0.0);
    let zero = amax.clone().equal_elem(0.0);

    let fmt_max = config.format.max();
    let (scale, multiplier) = match config.scale_mode {
        ScaleMode::Exact => {
            let max = Tensor::<B, 2>::full([scale_rows, scale_cols], fmt_max, &device);
            (amax.clone().div_scalar(fmt_max), max.div(amax))
        }
        ScaleMode::PowerOfTwo => {
            let p = pow2_ceil(amax.div_scalar(fmt_max));
            // 1/p as a division: `recip` may be approximate on some backends.
            let one = Tensor::<B, 2>::ones([scale_rows, scale_cols], &device);
            (p.clone(), one.div(p))
        }
    };
    let fix = |t: Tensor<B, 2>| t.mask_fill(zero.clone(), 1.0).mask_fill(nonfinite.clone(), f32::NAN);
    let (scale, multiplier) = (fix(scale), fix(multiplier));

    // Encode v = x · multiplier; padding columns are code 0.
    let expand = |t: Tensor<B, 2>| t.reshape([scale_rows, 1, scale_cols, 1]).expand([scale_rows, tile_rows, scale_cols, TILE_K]).reshape([pad_rows, pad_cols]);
    let pad_col = Tensor::<B, 1, Int>::arange(0..pad_cols as i64, &device).greater_equal_elem(cols as i64).reshape([1, pad_cols]).expand([pad_rows, pad_cols]);
    let v = (x * expand(multiplier)).mask_fill(pad_col, 0.0);
    let codes = encode(v.slice([0..rows, 0..pad_cols]), config.format);
    (pack(codes), scale)
}

/// `2^ceil(log2(x))` for positive `x`, at least f32's smallest normal (as
/// [`QuantConfig::tile_scale`]): a float estimate corrected by exact comparisons.
fn pow2_ceil<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let x = x.clamp_min(f32::MIN_POSITIVE);
    let e = x.clone().log().div_scalar(core::f32::consts::LN_2).round();
    let p = pow2(e);
    // One correction each way brings p into [x, 2x).
    let p = p.clone().mask_where(p.clone().div_scalar(2.0).greater_equal(x.clone()), p.div_scalar(2.0));
    p.clone().mask_where(p.clone().lower(x), p.mul_scalar(2.0))
}

/// `2^e` for integer-valued `e`, exactly: a lookup in a table of the normal f32 powers of
/// two (`powf` is not exact on every backend). `e` is clamped to [-126, 127].
fn pow2<B: Backend>(e: Tensor<B, 2>) -> Tensor<B, 2> {
    let dims = e.dims();
    let table: Vec<f32> = (-126..=127).map(|i| 2f32.powi(i)).collect();
    let table = Tensor::<B, 1>::from_data(TensorData::new(table, [254]), &e.device());
    let e = e.clone().mask_fill(e.is_nan(), 0.0); // NaN elements are masked by the caller
    let index = e.clamp(-126.0, 127.0).add_scalar(126.0).int().reshape([dims[0] * dims[1]]);
    table.select(0, index).reshape(dims)
}

/// Encodes f32 values to FP8 codes (as exact small floats converted to Int), with the
/// codec's rules: nearest-even, saturation, NaN to the canonical NaN code.
pub fn encode<B: Backend>(v: Tensor<B, 2>, format: Fp8Format) -> Tensor<B, 2, Int> {
    let m = format.mantissa_bits() as f32;
    let bias = format.bias() as f32;
    let negative = v.clone().lower_elem(0.0).bool_or(v.clone().equal_elem(0.0).bool_and(v.clone().recip().lower_elem(0.0)));
    let nan = v.clone().is_nan();
    let a = v.abs();
    // Exponent of a, floor(log2 a), corrected to be exact, then clamped to the subnormal range.
    let e = a.clone().log().div_scalar(core::f32::consts::LN_2).floor();
    let p = pow2(e.clone());
    let e = e.clone().mask_where(p.clone().greater(a.clone()), e.clone().sub_scalar(1.0));
    let e = e.clone().mask_where(p.mul_scalar(2.0).lower_equal(a.clone()), e.add_scalar(1.0));
    let e = e.clamp_min(1.0 - bias);
    // code = (e + bias - 1)·2^m + round_half_even(a · 2^(m - e))
    let significand = (a * pow2(e.clone().neg().add_scalar(m))).round();
    let code = e.add_scalar(bias - 1.0).mul_scalar(2f32.powf(m)) + significand;
    let code = code.clamp_max(format.max_code() as f32).mask_fill(nan, format.nan_code() as f32);
    let code = code.clone().mask_where(negative, code.add_scalar(128.0));
    code.int()
}

/// Packs codes `[rows, cols]` (cols a multiple of 4) four to a word, little-endian.
fn pack<B: Backend>(codes: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [rows, cols] = codes.dims();
    let codes = codes.reshape([rows, cols / 4, 4]);
    let byte = |k: usize| codes.clone().slice([0..rows, 0..cols / 4, k..k + 1]).reshape([rows, cols / 4]).bitwise_left_shift_scalar(((8 * k) as i64).elem());
    byte(0).bitwise_or(byte(1)).bitwise_or(byte(2)).bitwise_or(byte(3))
}

/// Unpacks words `[rows, words]` to codes `[rows, 4·words]`.
fn unpack<B: Backend>(data: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [rows, words] = data.dims();
    let bytes: Vec<_> = (0..4).map(|k| data.clone().bitwise_right_shift_scalar(((8 * k) as i64).elem()).bitwise_and_scalar(0xFFi64.elem()).reshape([rows, words, 1])).collect();
    Tensor::cat(bytes, 2).reshape([rows, words * 4])
}

/// Decoded, unscaled codes `[rows, 128·⌈cols/128⌉]` (padding columns decode to 0).
fn decode_codes<B: Backend>(data: Tensor<B, 2, Int>, format: Fp8Format) -> Tensor<B, 2> {
    let device = data.device();
    let codes = unpack(data);
    let [rows, cols] = codes.dims();
    let table = Tensor::<B, 1>::from_data(TensorData::new(format.decode_table().to_vec(), [256]), &device);
    table.select(0, codes.reshape([rows * cols])).reshape([rows, cols])
}

/// Scales expanded to one per row: `[rows, ⌈cols/128⌉]`.
fn row_scales<B: Backend>(scales: Tensor<B, 2>, layout: Fp8Layout) -> Tensor<B, 2> {
    let [scale_rows, scale_cols] = layout.scale_shape();
    let tile_rows = layout.config.tile.rows();
    scales.reshape([scale_rows, 1, scale_cols]).expand([scale_rows, tile_rows, scale_cols]).reshape([scale_rows * tile_rows, scale_cols]).slice([0..layout.shape[0], 0..scale_cols])
}

/// Dequantizes to `[rows, cols]`.
pub fn dequantize<B: Backend>(data: Tensor<B, 2, Int>, scales: Tensor<B, 2>, layout: Fp8Layout) -> Tensor<B, 2> {
    let [rows, cols] = layout.shape;
    if rows == 0 || cols == 0 {
        return Tensor::zeros([rows, cols], &data.device());
    }
    let values = decode_codes(data, layout.config.format);
    let scale_cols = layout.scale_shape()[1];
    let scales = row_scales(scales, layout).reshape([rows, scale_cols, 1]).expand([rows, scale_cols, TILE_K]).reshape([rows, scale_cols * TILE_K]);
    (values * scales).slice([0..rows, 0..cols])
}

/// A quantized operand as the GEMM reads it: decoded codes `[k_blocks, rows, 128]` and one
/// scale per row and K block, `[k_blocks, rows]`.
struct Decoded<B: Backend> {
    values: Tensor<B, 3>,
    scales: Tensor<B, 2>,
}

impl<B: Backend> Decoded<B> {
    fn new(data: Tensor<B, 2, Int>, scales: Tensor<B, 2>, layout: Fp8Layout) -> Self {
        let [rows, k] = layout.shape;
        let k_blocks = k.div_ceil(TILE_K);
        let values = decode_codes(data, layout.config.format).reshape([rows, k_blocks, TILE_K]).swap_dims(0, 1);
        Self { values, scales: row_scales(scales, layout).transpose() }
    }

    fn rows(&self, range: core::ops::Range<usize>) -> Self {
        Self { values: self.values.clone().slice([0..self.values.dims()[0], range.clone()]), scales: self.scales.clone().slice([0..self.scales.dims()[0], range]) }
    }
}

/// `a · bᵀ`: per 128-wide K block, an f32 product of the decoded codes, scaled once by
/// `scale_a[m] · scale_b[n]`, then summed over blocks.
fn product<B: Backend>(a: Decoded<B>, b: Decoded<B>) -> Tensor<B, 2> {
    let [k_blocks, m, _] = a.values.dims();
    let n = b.values.dims()[1];
    let partial = a.values.matmul(b.values.swap_dims(1, 2)); // [k_blocks, m, n]
    let scales = a.scales.reshape([k_blocks, m, 1]) * b.scales.reshape([k_blocks, 1, n]);
    (partial * scales).sum_dim(0).reshape([m, n])
}

/// `D = A · Bᵀ`: per 128-wide K block, an f32 product of the decoded codes, scaled once by
/// `scale_a[m] · scale_b[n]`, then summed over blocks.
pub fn gemm<B: Backend>(
    a_data: Tensor<B, 2, Int>,
    a_scales: Tensor<B, 2>,
    a_layout: Fp8Layout,
    b_data: Tensor<B, 2, Int>,
    b_scales: Tensor<B, 2>,
    b_layout: Fp8Layout,
) -> Tensor<B, 2> {
    let [m, k] = a_layout.shape;
    let n = b_layout.shape[0];
    if m == 0 || n == 0 || k == 0 {
        return Tensor::zeros([m, n], &a_data.device());
    }
    product(Decoded::new(a_data, a_scales, a_layout), Decoded::new(b_data, b_scales, b_layout))
}

/// The grouped GEMM: rows `offsets[g]..offsets[g + 1]` of `A [R, K]` times `B_gᵀ`, `B_g`
/// rows `g·N..(g + 1)·N` of `B [G·N, K]`; one product per non-empty group (the offsets
/// are read back to the host).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<B: Backend>(
    a_data: Tensor<B, 2, Int>,
    a_scales: Tensor<B, 2>,
    a_layout: Fp8Layout,
    b_data: Tensor<B, 2, Int>,
    b_scales: Tensor<B, 2>,
    b_layout: Fp8Layout,
    offsets: Tensor<B, 1, Int>,
) -> Tensor<B, 2> {
    let device = a_data.device();
    let [r, k] = a_layout.shape;
    let groups = offsets.dims()[0] - 1;
    let n = b_layout.shape[0] / groups.max(1);
    if r == 0 || n == 0 || k == 0 {
        return Tensor::zeros([r, n], &device);
    }
    let offsets: Vec<i64> = offsets.into_data().convert::<i64>().to_vec().expect("offsets");
    let (a, b) = (Decoded::new(a_data, a_scales, a_layout), Decoded::new(b_data, b_scales, b_layout));
    let parts: Vec<_> =
        offsets.windows(2).enumerate().filter(|(_, w)| w[1] > w[0]).map(|(g, w)| product(a.rows(w[0] as usize..w[1] as usize), b.rows(g * n..(g + 1) * n))).collect();
    Tensor::cat(parts, 0)
}
