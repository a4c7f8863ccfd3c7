//! CubeCL backends (wgpu, CUDA, …): the kernels of [`crate::kernel`].

use super::{Fp8Backend, Fp8Primitive};
use crate::config::Fp8Layout;
use crate::kernel::{dequantize::launch_dequantize, empty, gemm::launch_gemm, quantize::launch_quantize};
use crate::QuantConfig;
use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType,
};
use burn_cubecl::{
    kernel::{cast, into_contiguous},
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};

/// The kernels compute in f32; other float dtypes are cast on the way in and out.
fn to_f32<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.dtype == DType::F32 {
        x
    } else {
        cast(x, DType::F32)
    }
}

fn from_f32<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = F::dtype();
    if dtype == DType::F32 {
        x
    } else {
        cast(x, dtype)
    }
}

/// Contiguous words and f32 scales, whatever views the caller holds.
fn packed<R: CubeRuntime>(q: Fp8Primitive<CubeBackend<R, impl FloatElement, impl IntElement, impl BoolElement>>) -> (CubeTensor<R>, CubeTensor<R>) {
    let data = into_contiguous(q.data);
    assert_eq!(data.dtype.size(), 4, "FP8 packed data must have a 32-bit integer dtype, got {:?}", data.dtype);
    (data, into_contiguous(to_f32(q.scales)))
}

impl<R, F, I, BT> Fp8Backend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fp8_quantize(x: FloatTensor<Self>, config: QuantConfig) -> Fp8Primitive<Self> {
        let x = to_f32(x);
        let layout = Fp8Layout { shape: [x.meta.shape()[0], x.meta.shape()[1]], config };
        let data = empty(&x.client, &x.device, layout.data_shape(), DType::U32);
        let scales = empty(&x.client, &x.device, layout.scale_shape(), DType::F32);
        launch_quantize(x, data.clone(), scales.clone(), config);
        Fp8Primitive { data, scales: from_f32::<R, F>(scales) }
    }

    fn fp8_dequantize(q: Fp8Primitive<Self>, layout: Fp8Layout) -> FloatTensor<Self> {
        let (data, scales) = packed(q);
        let out = empty(&data.client, &data.device, layout.shape, DType::F32);
        launch_dequantize(data, scales, out.clone(), layout.config);
        from_f32::<R, F>(out)
    }

    fn fp8_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout) -> FloatTensor<Self> {
        let (a_data, a_scales) = packed(a);
        let (b_data, b_scales) = packed(b);
        let out = empty(&a_data.client, &a_data.device, [a_layout.shape[0], b_layout.shape[0]], DType::F32);
        launch_gemm(a_data, a_scales, a_layout.config, b_data, b_scales, b_layout.config, None, out.clone(), a_layout.shape[1]);
        from_f32::<R, F>(out)
    }

    fn fp8_grouped_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        let (a_data, a_scales) = packed(a);
        let (b_data, b_scales) = packed(b);
        let offsets = cast(into_contiguous(offsets), DType::U32);
        let groups = offsets.meta.shape()[0] - 1;
        let n = b_layout.shape[0] / groups;
        let out = empty(&a_data.client, &a_data.device, [a_layout.shape[0], n], DType::F32);
        launch_gemm(a_data, a_scales, a_layout.config, b_data, b_scales, b_layout.config, Some(offsets), out.clone(), a_layout.shape[1]);
        from_f32::<R, F>(out)
    }
}
