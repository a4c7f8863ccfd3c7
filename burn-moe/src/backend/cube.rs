//! CubeCL backends (wgpu, CUDA, …): the kernels of [`crate::kernel`].

use super::{MoeBackend, PlanPrimitive};
use crate::kernel::{empty, grouped, plan::launch_plan, rows};
use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType,
};
use burn_cubecl::{
    kernel::{cast, into_contiguous},
    tensor::CubeTensor,
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use burn_fp8::linear::Fp8Recipe;

/// Contiguous f32 (the kernels compute in f32; other float dtypes are cast).
fn f32_in<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    cast(into_contiguous(x), DType::F32)
}

fn f32_out<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>) -> CubeTensor<R> {
    cast(x, F::dtype())
}

/// Contiguous u32 indices.
fn u32_in<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    cast(into_contiguous(x), DType::U32)
}

fn plan_in<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(plan: PlanPrimitive<CubeBackend<R, F, I, BT>>) -> [CubeTensor<R>; 3] {
    [u32_in(plan.positions), u32_in(plan.row_slots), u32_in(plan.offsets)]
}

impl<R, F, I, BT> MoeBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn moe_plan(indices: IntTensor<Self>, counts: IntTensor<Self>) -> PlanPrimitive<Self> {
        let (indices, counts) = (u32_in(indices), u32_in(counts));
        let (client, device) = (indices.client.clone(), indices.device.clone());
        let s = indices.meta.shape()[0];
        let e = counts.meta.shape()[0];
        let positions = empty(&client, &device, [s], DType::U32);
        let row_slots = empty(&client, &device, [s], DType::U32);
        let offsets = empty(&client, &device, [e + 1], DType::U32);
        launch_plan(indices, counts, positions.clone(), row_slots.clone(), offsets.clone());
        PlanPrimitive { positions, row_slots, offsets }
    }

    fn moe_gather(x: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let x = f32_in(x);
        let [_, row_slots, _] = plan_in(plan);
        let out = empty(&x.client, &x.device, [row_slots.meta.shape()[0], x.meta.shape()[1]], DType::F32);
        rows::launch_gather(x, row_slots, weights.map(f32_in), out.clone(), top_k);
        f32_out::<R, F>(out)
    }

    fn moe_combine(rows_in: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let rows_in = f32_in(rows_in);
        let [positions, _, _] = plan_in(plan);
        let tokens = positions.meta.shape()[0] / top_k;
        let out = empty(&rows_in.client, &rows_in.device, [tokens, rows_in.meta.shape()[1]], DType::F32);
        rows::launch_combine(rows_in, positions, weights.map(f32_in), out.clone(), top_k);
        f32_out::<R, F>(out)
    }

    fn moe_gate_grad(a: FloatTensor<Self>, rows_in: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize) -> FloatTensor<Self> {
        let (a, rows_in) = (f32_in(a), f32_in(rows_in));
        let [positions, _, _] = plan_in(plan);
        let out = empty(&a.client, &a.device, [positions.meta.shape()[0]], DType::F32);
        rows::launch_gate_grad(a, rows_in, positions, out.clone(), top_k);
        f32_out::<R, F>(out)
    }

    fn moe_grouped_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool) -> FloatTensor<Self> {
        let (a, b, offsets) = (f32_in(a), f32_in(b), u32_in(offsets));
        let n = b.meta.shape()[if transpose_b { 1 } else { 2 }];
        let out = empty(&a.client, &a.device, [a.meta.shape()[0], n], DType::F32);
        grouped::launch_grouped_matmul(a, b, offsets, out.clone(), transpose_b, grouped::Staging::Auto);
        f32_out::<R, F>(out)
    }

    fn moe_grouped_matmul_fp8(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool, recipe: Fp8Recipe) -> FloatTensor<Self> {
        let staged = grouped::Staging::Auto.shared(&a.client);
        let (a, b, offsets) = (super::float(a), super::float(b), super::int(offsets));
        if staged {
            super::prim(super::grouped_matmul_fp8::<Self>(a, b, offsets, transpose_b, &recipe))
        } else {
            super::prim(super::grouped_matmul_fp8_decoded::<Self>(a, b, offsets, transpose_b, &recipe))
        }
    }

    fn moe_grouped_wgrad(a: FloatTensor<Self>, d: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        let (a, d, offsets) = (f32_in(a), f32_in(d), u32_in(offsets));
        let e = offsets.meta.shape()[0] - 1;
        let out = empty(&a.client, &a.device, [e, a.meta.shape()[1], d.meta.shape()[1]], DType::F32);
        grouped::launch_grouped_wgrad(a, d, offsets, out.clone(), grouped::Staging::Auto);
        f32_out::<R, F>(out)
    }
}
