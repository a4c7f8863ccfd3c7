//! The backend extension trait and its implementations.
//!
//! [`Fp8Backend`]'s default methods are the reference implementation in plain Burn tensor
//! ops ([`crate::reference`]), so any backend gains FP8 support with an empty impl (as
//! [`burn::backend::NdArray`] does here). CubeCL backends override them with the kernels of
//! [`crate::kernel`]; `Fusion` registers them as custom operations; `Autodiff` forwards to
//! its inner backend for those, and records an FP8 backward for [`Fp8Backend::fp8_linear`],
//! the op behind [`crate::linear::Fp8Linear`].
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::{fp8_gemm, Fp8Backend, Fp8Tensor, QuantConfig};
//!
//! /// `x · wᵀ` through FP8 on any backend with the extension.
//! fn fp8_matmul_t<B: Fp8Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
//!     fp8_gemm(&Fp8Tensor::quantize(x, QuantConfig::activation()), &Fp8Tensor::quantize(w, QuantConfig::weight()))
//! }
//!
//! let device = Default::default();
//! let x = Tensor::<NdArray, 2>::random([8, 256], Distribution::Normal(0.0, 1.0), &device);
//! let w = Tensor::<NdArray, 2>::random([16, 256], Distribution::Normal(0.0, 1.0), &device);
//! let y = fp8_matmul_t(x.clone(), w.clone());
//! let exact = x.matmul(w.transpose());
//! // Relative error in the Frobenius norm: E4M3 keeps 3 mantissa bits, so each operand
//! // carries up to 2⁻⁴ relative rounding; over 128 outputs the norm lands near 0.04.
//! let err = (y - exact.clone()).powi_scalar(2).sum().sqrt().into_scalar() / exact.powi_scalar(2).sum().sqrt().into_scalar();
//! assert!(err < 0.08, "{err}");
//! ```

mod autodiff;
mod cube;
mod fusion;

use crate::linear::{ops, Fp8Recipe};
use crate::reference;
use crate::{Fp8Layout, QuantConfig};
use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Int, Tensor, TensorPrimitive,
};

/// Packed FP8 data and its scales as backend primitives.
///
/// `data` holds four codes per 32-bit word, little-endian along the columns (code of column
/// `c` in byte `c % 4` of word `c / 4`), each row padded with zero codes to whole 128-column
/// tiles. Its integer dtype is backend-defined (`u32` on CubeCL backends, the backend's
/// `IntElem` on the reference path); only the low 32 bits of each element are meaningful.
pub struct Fp8Primitive<B: Backend> {
    /// Packed codes, `[rows, 32 · ⌈cols / 128⌉]`.
    pub data: IntTensor<B>,
    /// f32 scales, `[⌈rows / tile_rows⌉, ⌈cols / 128⌉]`.
    pub scales: FloatTensor<B>,
}

impl<B: Backend> Clone for Fp8Primitive<B> {
    fn clone(&self) -> Self {
        Self { data: self.data.clone(), scales: self.scales.clone() }
    }
}

impl<B: Backend> core::fmt::Debug for Fp8Primitive<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Fp8Primitive").field("data", &self.data).field("scales", &self.scales).finish()
    }
}

/// FP8 operations a backend provides. Shapes are checked by the tensor-level API
/// ([`crate::Fp8Tensor`]) before these are called.
pub trait Fp8Backend: Backend {
    /// Quantizes a `[rows, cols]` float tensor (any strides) tile by tile.
    fn fp8_quantize(x: FloatTensor<Self>, config: QuantConfig) -> Fp8Primitive<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let (data, scales) = reference::quantize(x, config);
        Fp8Primitive { data: data.into_primitive(), scales: scales.into_primitive().tensor() }
    }

    /// Dequantizes to a contiguous float tensor of `layout.shape`.
    fn fp8_dequantize(q: Fp8Primitive<Self>, layout: Fp8Layout) -> FloatTensor<Self> {
        let (data, scales) = tensors::<Self>(q);
        reference::dequantize(data, scales, layout).into_primitive().tensor()
    }

    /// `D[M, N] = A[M, K] · B[N, K]ᵀ` with f32 accumulation and per-128-K-block scaling.
    fn fp8_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout) -> FloatTensor<Self> {
        let (a_data, a_scales) = tensors::<Self>(a);
        let (b_data, b_scales) = tensors::<Self>(b);
        reference::gemm(a_data, a_scales, a_layout, b_data, b_scales, b_layout).into_primitive().tensor()
    }

    /// The grouped GEMM: `D[r, :] = A[r, :] · B_gᵀ` for the rows `offsets[g] ≤ r <
    /// offsets[g + 1]` of group `g`, `B_g` the rows `g·N..(g + 1)·N` of `B [G·N, K]`;
    /// `offsets [G + 1]` (backend int dtype; `u32` on CubeCL backends).
    fn fp8_grouped_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        let (a_data, a_scales) = tensors::<Self>(a);
        let (b_data, b_scales) = tensors::<Self>(b);
        reference::grouped_gemm(a_data, a_scales, a_layout, b_data, b_scales, b_layout, Tensor::from_primitive(offsets)).into_primitive().tensor()
    }

    /// `x [M, K] · w [K, N]` (Burn's `Linear` weight layout) as an FP8 GEMM with the
    /// operands quantized per `recipe`: the Fprop of [`crate::linear::Fp8Linear`].
    ///
    /// The default composes the ops above and is what every non-autodiff backend uses.
    /// `Autodiff` overrides it to record a backward whose Dgrad and Wgrad GEMMs also run
    /// in FP8 ([`crate::linear::ops`]).
    fn fp8_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, recipe: Fp8Recipe) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let weight = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(weight));
        ops::forward(x, weight, &recipe).into_primitive().tensor()
    }
}

fn tensors<B: Backend>(q: Fp8Primitive<B>) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    (Tensor::from_primitive(q.data), Tensor::from_primitive(TensorPrimitive::Float(q.scales)))
}

#[cfg(feature = "ndarray")]
impl Fp8Backend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl Fp8Backend for burn::backend::Flex {}
