//! `Fusion<B>` (Burn's default wgpu and CUDA backends): each op is registered as a custom
//! operation in the fusion stream and runs `B`'s implementation when the stream executes.
//! Plan tensors are declared `u32`, as the CubeCL implementation produces them.

use super::{MoeBackend, PlanPrimitive};
use crate::custom_op::{register, register_float, CustomOp, Ft, Handles};
use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType,
};
use burn_fp8::linear::Fp8Recipe;
use burn_fusion::{Fusion, FusionBackend};
use burn_ir::TensorIr;

/// The op to run when the stream executes, with its static arguments. Inputs are laid
/// out as: tensors, then the plan's three tensors where the op takes a plan, then the
/// optional weights.
#[derive(Clone, Copy, Debug)]
enum MoeOp {
    Plan,
    Gather { top_k: usize, weighted: bool },
    Combine { top_k: usize, weighted: bool },
    GateGrad { top_k: usize },
    GroupedMatmul { transpose_b: bool },
    GroupedMatmulFp8 { transpose_b: bool, recipe: Fp8Recipe },
    GroupedWgrad,
}

fn plan_at<B: FusionBackend + MoeBackend>(h: &mut Handles<B>, ir: &[TensorIr]) -> PlanPrimitive<B> {
    PlanPrimitive { positions: h.get_int_tensor::<B>(&ir[0]), row_slots: h.get_int_tensor::<B>(&ir[1]), offsets: h.get_int_tensor::<B>(&ir[2]) }
}

impl<B: FusionBackend + MoeBackend> CustomOp<B> for MoeOp {
    fn execute(&self, inp: &[TensorIr], out: &[TensorIr], h: &mut Handles<B>) {
        let float = |h: &mut Handles<B>, i: usize| h.get_float_tensor::<B>(&inp[i]);
        match *self {
            MoeOp::Plan => {
                let p = B::moe_plan(h.get_int_tensor::<B>(&inp[0]), h.get_int_tensor::<B>(&inp[1]));
                h.register_int_tensor::<B>(&out[0].id, p.positions);
                h.register_int_tensor::<B>(&out[1].id, p.row_slots);
                h.register_int_tensor::<B>(&out[2].id, p.offsets);
            }
            MoeOp::Gather { top_k, weighted } => {
                let x = float(h, 0);
                let plan = plan_at::<B>(h, &inp[1..4]);
                let w = weighted.then(|| float(h, 4));
                h.register_float_tensor::<B>(&out[0].id, B::moe_gather(x, plan, top_k, w));
            }
            MoeOp::Combine { top_k, weighted } => {
                let rows = float(h, 0);
                let plan = plan_at::<B>(h, &inp[1..4]);
                let w = weighted.then(|| float(h, 4));
                h.register_float_tensor::<B>(&out[0].id, B::moe_combine(rows, plan, top_k, w));
            }
            MoeOp::GateGrad { top_k } => {
                let (a, rows) = (float(h, 0), float(h, 1));
                let plan = plan_at::<B>(h, &inp[2..5]);
                h.register_float_tensor::<B>(&out[0].id, B::moe_gate_grad(a, rows, plan, top_k));
            }
            MoeOp::GroupedMatmul { transpose_b } => {
                let (a, b, offsets) = (float(h, 0), float(h, 1), h.get_int_tensor::<B>(&inp[2]));
                h.register_float_tensor::<B>(&out[0].id, B::moe_grouped_matmul(a, b, offsets, transpose_b));
            }
            MoeOp::GroupedMatmulFp8 { transpose_b, recipe } => {
                let (a, b, offsets) = (float(h, 0), float(h, 1), h.get_int_tensor::<B>(&inp[2]));
                h.register_float_tensor::<B>(&out[0].id, B::moe_grouped_matmul_fp8(a, b, offsets, transpose_b, recipe));
            }
            MoeOp::GroupedWgrad => {
                let (a, d, offsets) = (float(h, 0), float(h, 1), h.get_int_tensor::<B>(&inp[2]));
                h.register_float_tensor::<B>(&out[0].id, B::moe_grouped_wgrad(a, d, offsets));
            }
        }
    }
}

fn with_plan<B: FusionBackend>(mut inputs: Vec<Ft<B>>, plan: PlanPrimitive<Fusion<B>>, weights: Option<Ft<B>>) -> Vec<Ft<B>> {
    inputs.extend([plan.positions, plan.row_slots, plan.offsets]);
    inputs.extend(weights);
    inputs
}

impl<B: FusionBackend + MoeBackend> MoeBackend for Fusion<B> {
    fn moe_plan(indices: IntTensor<Self>, counts: IntTensor<Self>) -> PlanPrimitive<Self> {
        let (s, e) = (indices.shape[0], counts.shape[0]);
        let outputs = [(vec![s], DType::U32), (vec![s], DType::U32), (vec![e + 1], DType::U32)];
        let [positions, row_slots, offsets]: [Ft<B>; 3] = register::<B, _>("moe_plan", vec![indices, counts], &outputs, MoeOp::Plan).try_into().expect("three outputs");
        PlanPrimitive { positions, row_slots, offsets }
    }

    fn moe_gather(x: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let shape = vec![plan.row_slots.shape[0], x.shape[1]];
        let op = MoeOp::Gather { top_k, weighted: weights.is_some() };
        register_float::<B, _>("moe_gather", with_plan::<B>(vec![x], plan, weights), shape, op)
    }

    fn moe_combine(rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let shape = vec![plan.positions.shape[0] / top_k, rows.shape[1]];
        let op = MoeOp::Combine { top_k, weighted: weights.is_some() };
        register_float::<B, _>("moe_combine", with_plan::<B>(vec![rows], plan, weights), shape, op)
    }

    fn moe_gate_grad(a: FloatTensor<Self>, rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize) -> FloatTensor<Self> {
        let shape = vec![plan.positions.shape[0]];
        let op = MoeOp::GateGrad { top_k };
        register_float::<B, _>("moe_gate_grad", with_plan::<B>(vec![a, rows], plan, None), shape, op)
    }

    fn moe_grouped_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool) -> FloatTensor<Self> {
        let shape = vec![a.shape[0], b.shape[if transpose_b { 1 } else { 2 }]];
        let op = MoeOp::GroupedMatmul { transpose_b };
        register_float::<B, _>("moe_grouped_matmul", vec![a, b, offsets], shape, op)
    }

    /// One custom operation: the inner backend picks the FP8 path for its device.
    fn moe_grouped_matmul_fp8(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool, recipe: Fp8Recipe) -> FloatTensor<Self> {
        let shape = vec![a.shape[0], b.shape[if transpose_b { 1 } else { 2 }]];
        let op = MoeOp::GroupedMatmulFp8 { transpose_b, recipe };
        register_float::<B, _>("moe_grouped_matmul_fp8", vec![a, b, offsets], shape, op)
    }

    fn moe_grouped_wgrad(a: FloatTensor<Self>, d: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        let shape = vec![offsets.shape[0] - 1, a.shape[1], d.shape[1]];
        register_float::<B, _>("moe_grouped_wgrad", vec![a, d, offsets], shape, MoeOp::GroupedWgrad)
    }
}
