//! The tensor-level API: [`Fp8Tensor`], quantization, dequantization and the GEMM, with
//! the shape checks.

use crate::backend::{Fp8Backend, Fp8Primitive};
use crate::config::Fp8Layout;
use crate::QuantConfig;
use burn::tensor::{backend::Backend, Int, Tensor, TensorPrimitive};

/// Errors the FP8 API reports to callers that can recover.
#[derive(Clone, Debug, PartialEq)]
pub enum Fp8Error {
    /// Some tiles held NaN or ±inf before quantization; their scale is NaN.
    NonFinite {
        /// `[tile_row, tile_col]` of the first offending tiles (at most 8).
        tiles: Vec<[usize; 2]>,
        /// Number of offending tiles.
        count: usize,
        /// Tile shape `[rows, cols]`, to turn tile indices into element ranges.
        tile: [usize; 2],
    },
    /// Parts handed to [`Fp8Tensor::from_parts`] do not fit the layout.
    Shape {
        /// What the layout requires.
        expected: [usize; 2],
        /// What was given.
        got: Vec<usize>,
        /// Which part.
        part: &'static str,
    },
}

impl core::fmt::Display for Fp8Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Fp8Error::NonFinite { tiles, count, tile } => {
                write!(f, "{count} tile(s) of {}x{} elements held NaN or infinity before FP8 quantization; first at [tile_row, tile_col] {tiles:?}", tile[0], tile[1])
            }
            Fp8Error::Shape { expected, got, part } => {
                write!(f, "FP8 {part} has shape {got:?}, the layout requires {expected:?}")
            }
        }
    }
}

impl std::error::Error for Fp8Error {}

/// A 2-D tensor quantized to FP8 with one f32 scale per tile.
///
/// `value[r, c] ≈ decode(code[r, c]) × scale[r / tile_rows, c / 128]`.
///
/// # Shapes
/// - logical: `[rows, cols]`
/// - data: `[rows, 32 · ⌈cols / 128⌉]` 32-bit words, four codes each, rows padded with zero
///   codes to whole 128-column tiles
/// - scales: `[⌈rows / tile_rows⌉, ⌈cols / 128⌉]` (tile_rows is 1 or 128)
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
/// use burn_fp8::{Fp8Tensor, QuantConfig};
///
/// let device = Default::default();
/// let x = Tensor::<NdArray, 2>::from_floats([[1.0, -2.0, 3.5], [0.25, 0.5, -448.0]], &device);
/// let q = Fp8Tensor::quantize(x.clone(), QuantConfig::activation());
/// assert_eq!(q.shape(), [2, 3]);
/// // 1.0, 2.0, 3.5, 0.25, 0.5 and 448 are all exact E4M3 values times their row's scale.
/// q.dequantize().into_data().assert_approx_eq::<f32>(&x.into_data(), Default::default());
/// ```
#[derive(Debug)]
pub struct Fp8Tensor<B: Backend> {
    data: Tensor<B, 2, Int>,
    scales: Tensor<B, 2>,
    layout: Fp8Layout,
}

impl<B: Backend> Clone for Fp8Tensor<B> {
    fn clone(&self) -> Self {
        Self { data: self.data.clone(), scales: self.scales.clone(), layout: self.layout }
    }
}

impl<B: Fp8Backend> Fp8Tensor<B> {
    /// Quantizes `x` with `config`, in one kernel launch on CubeCL backends.
    ///
    /// Non-finite inputs are not encoded as numbers: their tile gets a NaN scale and NaN
    /// codes, so they dequantize (and multiply) to NaN. Use [`Fp8Tensor::try_quantize`] or
    /// [`Fp8Tensor::check_finite`] to have them reported.
    ///
    /// # Shapes
    /// - x: `[rows, cols]`, any strides
    pub fn quantize(x: Tensor<B, 2>, config: QuantConfig) -> Self {
        let [rows, cols] = x.dims();
        let q = B::fp8_quantize(x.into_primitive().tensor(), config);
        Self::from_primitive(q, Fp8Layout { shape: [rows, cols], config })
    }

    /// Quantizes `xᵀ` without materialising the transpose: for `x` `[rows, cols]` the
    /// result is `[cols, rows]`, so 1×128 tiles run along `rows` (the 128×1 tiling of `x`
    /// that the weight-gradient GEMM needs).
    pub fn quantize_transposed(x: Tensor<B, 2>, config: QuantConfig) -> Self {
        Self::quantize(x.transpose(), config)
    }

    /// [`Fp8Tensor::quantize`], then [`Fp8Tensor::check_finite`].
    pub fn try_quantize(x: Tensor<B, 2>, config: QuantConfig) -> Result<Self, Fp8Error> {
        let q = Self::quantize(x, config);
        q.check_finite()?;
        Ok(q)
    }

    /// Reports tiles whose scale is not finite, i.e. that held NaN or ±inf.
    /// Reads the scales (1/128 or less of the data) back to the host.
    pub fn check_finite(&self) -> Result<(), Fp8Error> {
        let [_, scale_cols] = self.layout.scale_shape();
        let scales = self.scales.to_data().convert::<f32>();
        let bad: Vec<[usize; 2]> =
            scales.as_slice::<f32>().expect("f32 scales").iter().enumerate().filter(|(_, s)| !s.is_finite()).map(|(i, _)| [i / scale_cols, i % scale_cols]).collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(Fp8Error::NonFinite { count: bad.len(), tiles: bad.into_iter().take(8).collect(), tile: self.layout.config.tile.dims() })
    }

    /// Dequantizes to a float tensor of the logical shape.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(B::fp8_dequantize(self.primitive(), self.layout)))
    }

    /// `self · otherᵀ`: see [`fp8_gemm`].
    pub fn matmul_t(&self, other: &Self) -> Tensor<B, 2> {
        fp8_gemm(self, other)
    }

    fn primitive(&self) -> Fp8Primitive<B> {
        Fp8Primitive { data: self.data.clone().into_primitive(), scales: self.scales.clone().into_primitive().tensor() }
    }

    fn from_primitive(q: Fp8Primitive<B>, layout: Fp8Layout) -> Self {
        Self { data: Tensor::from_primitive(q.data), scales: Tensor::from_primitive(TensorPrimitive::Float(q.scales)), layout }
    }
}

impl<B: Backend> Fp8Tensor<B> {
    /// Builds a tensor from packed data and scales (e.g. loaded from a checkpoint),
    /// checking their shapes against the layout.
    pub fn from_parts(data: Tensor<B, 2, Int>, scales: Tensor<B, 2>, shape: [usize; 2], config: QuantConfig) -> Result<Self, Fp8Error> {
        let layout = Fp8Layout { shape, config };
        if data.dims() != layout.data_shape() {
            return Err(Fp8Error::Shape { expected: layout.data_shape(), got: data.dims().to_vec(), part: "data" });
        }
        if scales.dims() != layout.scale_shape() {
            return Err(Fp8Error::Shape { expected: layout.scale_shape(), got: scales.dims().to_vec(), part: "scales" });
        }
        Ok(Self { data, scales, layout })
    }

    /// Logical `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        self.layout.shape
    }

    /// The quantization layout.
    pub fn config(&self) -> QuantConfig {
        self.layout.config
    }

    /// Packed codes, `[rows, 32 · ⌈cols / 128⌉]`.
    pub fn data(&self) -> &Tensor<B, 2, Int> {
        &self.data
    }

    /// Scales, `[⌈rows / tile_rows⌉, ⌈cols / 128⌉]`.
    pub fn scales(&self) -> &Tensor<B, 2> {
        &self.scales
    }

    /// Device memory of data and scales, in bytes (4 per word and per scale).
    pub fn size_bytes(&self) -> usize {
        let [r, w] = self.layout.data_shape();
        let [sr, sc] = self.layout.scale_shape();
        4 * (r * w + sr * sc)
    }
}

/// Tile-scaled FP8 GEMM: `D[M, N] = A[M, K] · B[N, K]ᵀ` in f32.
///
/// Each 128-wide block of K is accumulated in f32 from the decoded codes and then scaled
/// once by `scale_a · scale_b` (DeepSeek-V3's promotion to f32 every 128 elements).
/// Either operand may use 1×128 or 128×128 tiles.
///
/// # Shapes
/// - a: `[M, K]`
/// - b: `[N, K]`
/// - output: `[M, N]`
///
/// # Panics
/// If the K dimensions differ.
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use burn_fp8::{fp8_gemm, Fp8Tensor, QuantConfig};
///
/// let device = Default::default();
/// let x = Tensor::<NdArray, 2>::random([4, 256], Distribution::Normal(0.0, 1.0), &device);
/// let w = Tensor::<NdArray, 2>::random([8, 256], Distribution::Normal(0.0, 1.0), &device);
/// let y = fp8_gemm(
///     &Fp8Tensor::quantize(x.clone(), QuantConfig::activation()),
///     &Fp8Tensor::quantize(w.clone(), QuantConfig::weight()),
/// );
/// let exact = x.matmul(w.transpose());
/// let err = (y - exact.clone()).abs().max().into_scalar() / exact.abs().max().into_scalar();
/// assert!(err < 0.1);
/// ```
pub fn fp8_gemm<B: Fp8Backend>(a: &Fp8Tensor<B>, b: &Fp8Tensor<B>) -> Tensor<B, 2> {
    assert_eq!(
        a.layout.shape[1], b.layout.shape[1],
        "fp8_gemm computes A·Bᵀ and needs A [M, K] and B [N, K] with the same K; got A {:?} and B {:?}",
        a.layout.shape, b.layout.shape
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::fp8_gemm(a.primitive(), a.layout, b.primitive(), b.layout)))
}

/// Grouped tile-scaled FP8 GEMM, one launch for every group (the expert GEMM of a MoE
/// layer): `D[r, :] = A[r, :] · B_gᵀ` for the rows `offsets[g] ≤ r < offsets[g + 1]` of
/// group `g`, where `B_g` is rows `g·N..(g + 1)·N` of `b`. Arithmetic as [`fp8_gemm`].
///
/// `offsets` are not read back to the host: they must start at 0, not decrease and end at
/// `R` (as a MoE dispatch plan's do); rows outside every group are left unwritten. Empty
/// groups are allowed and cost nothing. With 128×128 blocks for `b`, keep `N` a multiple
/// of 128 so that no block spans two groups (DeepSeek-V3's expert widths are); otherwise
/// a block's scale covers rows of both.
///
/// # Shapes
/// - a: `[R, K]`
/// - b: `[G·N, K]`
/// - offsets: `[G + 1]`
/// - output: `[R, N]`
///
/// # Panics
/// If the K dimensions differ, `G` is zero, or `b`'s rows are not a multiple of `G`.
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Int, Tensor};
/// use burn_fp8::{fp8_gemm, fp8_grouped_gemm, Fp8Tensor, QuantConfig};
///
/// let device = Default::default();
/// // Rows 0..3 go to group 0, none to group 1, rows 3..5 to group 2.
/// let x = Tensor::<NdArray, 2>::random([5, 256], Distribution::Normal(0.0, 1.0), &device);
/// let w = Tensor::<NdArray, 2>::random([3 * 128, 256], Distribution::Normal(0.0, 1.0), &device);
/// let offsets = Tensor::<NdArray, 1, Int>::from_ints([0, 3, 3, 5], &device);
/// let (xq, wq) = (Fp8Tensor::quantize(x.clone(), QuantConfig::activation()), Fp8Tensor::quantize(w.clone(), QuantConfig::weight()));
/// let y = fp8_grouped_gemm(&xq, &wq, offsets); // [5, 128]
/// let last = fp8_gemm(&Fp8Tensor::quantize(x.slice([3..5]), QuantConfig::activation()), &Fp8Tensor::quantize(w.slice([256..384]), QuantConfig::weight()));
/// y.slice([3..5]).into_data().assert_approx_eq::<f32>(&last.into_data(), Default::default());
/// ```
pub fn fp8_grouped_gemm<B: Fp8Backend>(a: &Fp8Tensor<B>, b: &Fp8Tensor<B>, offsets: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [groups_plus_one] = offsets.dims();
    let groups = groups_plus_one.saturating_sub(1);
    assert!(
        a.layout.shape[1] == b.layout.shape[1] && groups > 0 && b.layout.shape[0].is_multiple_of(groups),
        "fp8_grouped_gemm needs A [R, K], B [G·N, K] with the same K and offsets [G + 1] with G > 0; got A {:?}, B {:?}, offsets [{groups_plus_one}]",
        a.layout.shape,
        b.layout.shape
    );
    let n = b.layout.shape[0] / groups;
    let [r, k] = a.layout.shape;
    if r == 0 || n == 0 || k == 0 {
        return Tensor::zeros([r, n], &a.data.device());
    }
    Tensor::from_primitive(TensorPrimitive::Float(B::fp8_grouped_gemm(a.primitive(), a.layout, b.primitive(), b.layout, offsets.into_primitive())))
}
