//! `Fusion<B>` (Burn's default wgpu and CUDA backends): each FP8 op is registered as a
//! custom operation in the fusion stream, which runs `B`'s implementation when the stream
//! is executed. Packed data is declared as `u32`, as the CubeCL implementation produces it.

use super::{Fp8Backend, Fp8Primitive};
use crate::config::Fp8Layout;
use crate::QuantConfig;
use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, Element, Shape,
};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use core::marker::PhantomData;

type Handles<B> = HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// The op to run when the stream executes, with its static arguments.
#[derive(Clone, Copy, Debug)]
enum Fp8Op {
    Quantize(QuantConfig),
    Dequantize(Fp8Layout),
    Gemm(Fp8Layout, Fp8Layout),
    GroupedGemm(Fp8Layout, Fp8Layout),
}

#[derive(Clone, Debug)]
struct Fp8Custom<B> {
    desc: CustomOpIr,
    op: Fp8Op,
    _backend: PhantomData<B>,
}

fn get_q<B: FusionBackend + Fp8Backend>(handles: &mut Handles<B>, data: &TensorIr, scales: &TensorIr) -> Fp8Primitive<B> {
    Fp8Primitive { data: handles.get_int_tensor::<B>(data), scales: handles.get_float_tensor::<B>(scales) }
}

impl<B: FusionBackend + Fp8Backend> Operation<B::FusionRuntime> for Fp8Custom<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        match self.op {
            Fp8Op::Quantize(config) => {
                let ([x], [data, scales]) = self.desc.as_fixed();
                let q = B::fp8_quantize(handles.get_float_tensor::<B>(x), config);
                handles.register_int_tensor::<B>(&data.id, q.data);
                handles.register_float_tensor::<B>(&scales.id, q.scales);
            }
            Fp8Op::Dequantize(layout) => {
                let ([data, scales], [out]) = self.desc.as_fixed();
                let q = get_q::<B>(handles, data, scales);
                handles.register_float_tensor::<B>(&out.id, B::fp8_dequantize(q, layout));
            }
            Fp8Op::Gemm(a_layout, b_layout) => {
                let ([a_data, a_scales, b_data, b_scales], [out]) = self.desc.as_fixed();
                let a = get_q::<B>(handles, a_data, a_scales);
                let b = get_q::<B>(handles, b_data, b_scales);
                handles.register_float_tensor::<B>(&out.id, B::fp8_gemm(a, a_layout, b, b_layout));
            }
            Fp8Op::GroupedGemm(a_layout, b_layout) => {
                let ([a_data, a_scales, b_data, b_scales, offsets], [out]) = self.desc.as_fixed();
                let a = get_q::<B>(handles, a_data, a_scales);
                let b = get_q::<B>(handles, b_data, b_scales);
                let offsets = handles.get_int_tensor::<B>(offsets);
                handles.register_float_tensor::<B>(&out.id, B::fp8_grouped_gemm(a, a_layout, b, b_layout, offsets));
            }
        }
    }
}

impl<B: FusionBackend + Fp8Backend> Fp8Backend for Fusion<B> {
    fn fp8_quantize(x: FloatTensor<Self>, config: QuantConfig) -> Fp8Primitive<Self> {
        let client = x.client.clone();
        let [rows, cols] = [x.shape[0], x.shape[1]];
        let layout = Fp8Layout { shape: [rows, cols], config };
        let data = TensorIr::uninit(client.create_empty_handle(), Shape::new(layout.data_shape()), DType::U32);
        let scales = TensorIr::uninit(client.create_empty_handle(), Shape::new(layout.scale_shape()), B::FloatElem::dtype());
        let streams = OperationStreams::with_inputs([&x]);
        let desc = CustomOpIr::new("fp8_quantize", &[x.into_ir()], &[data, scales]);
        let op = Fp8Custom::<B> { desc: desc.clone(), op: Fp8Op::Quantize(config), _backend: PhantomData };
        let [data, scales] = client.register(streams, OperationIr::Custom(desc), op).try_into().unwrap();
        Fp8Primitive { data, scales }
    }

    fn fp8_dequantize(q: Fp8Primitive<Self>, layout: Fp8Layout) -> FloatTensor<Self> {
        let client = q.data.client.clone();
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new(layout.shape), B::FloatElem::dtype());
        let streams = OperationStreams::with_inputs([&q.data, &q.scales]);
        let desc = CustomOpIr::new("fp8_dequantize", &[q.data.into_ir(), q.scales.into_ir()], &[out]);
        let op = Fp8Custom::<B> { desc: desc.clone(), op: Fp8Op::Dequantize(layout), _backend: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op).output()
    }

    fn fp8_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout) -> FloatTensor<Self> {
        let client = a.data.client.clone();
        let shape = Shape::new([a_layout.shape[0], b_layout.shape[0]]);
        let out = TensorIr::uninit(client.create_empty_handle(), shape, B::FloatElem::dtype());
        let streams = OperationStreams::with_inputs([&a.data, &a.scales, &b.data, &b.scales]);
        let inputs = [a.data.into_ir(), a.scales.into_ir(), b.data.into_ir(), b.scales.into_ir()];
        let desc = CustomOpIr::new("fp8_gemm", &inputs, &[out]);
        let op = Fp8Custom::<B> { desc: desc.clone(), op: Fp8Op::Gemm(a_layout, b_layout), _backend: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op).output()
    }

    fn fp8_grouped_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        let client = a.data.client.clone();
        let n = b_layout.shape[0] / (offsets.shape[0] - 1);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([a_layout.shape[0], n]), B::FloatElem::dtype());
        let streams = OperationStreams::with_inputs([&a.data, &a.scales, &b.data, &b.scales, &offsets]);
        let inputs = [a.data.into_ir(), a.scales.into_ir(), b.data.into_ir(), b.scales.into_ir(), offsets.into_ir()];
        let desc = CustomOpIr::new("fp8_grouped_gemm", &inputs, &[out]);
        let op = Fp8Custom::<B> { desc: desc.clone(), op: Fp8Op::GroupedGemm(a_layout, b_layout), _backend: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op).output()
    }
}
