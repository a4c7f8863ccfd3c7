//! `Autodiff<B>` forwards FP8 ops to `B`. Quantization has no useful derivative and the
//! GEMM here consumes already-quantized operands, so the outputs are untracked constants;
//! differentiable FP8 layers register their own backward over these ops.

use super::{Fp8Backend, Fp8Layout, Fp8Primitive};
use crate::QuantConfig;
use burn::backend::autodiff::{checkpoint::strategy::CheckpointStrategy, Autodiff};
use burn::tensor::{backend::AutodiffBackend, ops::FloatTensor};

type Ad<B, C> = Autodiff<B, C>;

fn inner<B: Fp8Backend, C: CheckpointStrategy>(q: Fp8Primitive<Ad<B, C>>) -> Fp8Primitive<B> {
    Fp8Primitive { data: q.data, scales: Ad::<B, C>::inner(q.scales) }
}

impl<B: Fp8Backend, C: CheckpointStrategy> Fp8Backend for Autodiff<B, C> {
    fn fp8_quantize(x: FloatTensor<Self>, config: QuantConfig) -> Fp8Primitive<Self> {
        let q = B::fp8_quantize(Self::inner(x), config);
        Fp8Primitive { data: q.data, scales: Self::from_inner(q.scales) }
    }

    fn fp8_dequantize(q: Fp8Primitive<Self>, layout: Fp8Layout) -> FloatTensor<Self> {
        Self::from_inner(B::fp8_dequantize(inner(q), layout))
    }

    fn fp8_gemm(
        a: Fp8Primitive<Self>,
        a_layout: Fp8Layout,
        b: Fp8Primitive<Self>,
        b_layout: Fp8Layout,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::fp8_gemm(inner(a), a_layout, inner(b), b_layout))
    }
}
