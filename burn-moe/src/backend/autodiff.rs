//! `Autodiff<B>`: backwards for gather (dispatch), combine and the grouped matmul, each
//! written with the forward ops of `B`:
//!
//! | op | d/d(rows moved) | d/d(weights) |
//! |---|---|---|
//! | gather `y[r] = w[s]·x[s/k]` | `combine(dy, w)` | `gate_grad(x, dy)` |
//! | combine `y[t] = Σ_j w·rows[pos]` | `gather(dy, w)` | `gate_grad(dy, rows)` |
//! | grouped `y = a·B_e` | `grouped(dy, B_eᵀ)` | `wgrad(a, dy)` |
//! | FP8 grouped | `grouped_fp8(dy, B_eᵀ)`, `dy` in `recipe.grad` tiles | `wgrad(a, dy)` (f32) |
//!
//! The plan, the gate gradient and the weight gradient are not differentiated (they are
//! integer data or only used inside backwards) and run untracked.

use super::{MoeBackend, PlanPrimitive};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff, NodeId,
};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_fp8::linear::Fp8Recipe;

fn inner_plan<B: MoeBackend, C: CheckpointStrategy>(plan: PlanPrimitive<Autodiff<B, C>>) -> PlanPrimitive<B> {
    PlanPrimitive { positions: plan.positions, row_slots: plan.row_slots, offsets: plan.offsets }
}

fn register<B: MoeBackend>(grads: &mut Gradients, node: Option<NodeId>, grad: impl FnOnce() -> FloatTensor<B>) {
    if let Some(id) = node {
        grads.register::<B>(id, grad());
    }
}

/// Which of gather and combine a [`RowsBackward`] undoes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowsOp {
    Gather,
    Combine,
}

/// Backward of gather or combine; `N = 2` when weights are an input.
#[derive(Debug)]
struct RowsBackward(RowsOp);

#[derive(Clone, Debug)]
struct RowsState<B: MoeBackend> {
    plan: PlanPrimitive<B>,
    top_k: usize,
    weights: Option<FloatTensor<B>>,
    /// The rows the op moved (`x` for gather, `rows` for combine), kept when the weights
    /// need a gradient.
    moved: Option<FloatTensor<B>>,
}

impl<B: MoeBackend, const N: usize> Backward<B, N> for RowsBackward {
    type State = RowsState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let node = |i: usize| ops.parents.get(i).and_then(|p| p.as_ref()).map(|p| p.id);
        let (x_node, w_node) = (node(0), node(1));
        let s = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        if let (Some(id), Some(moved)) = (w_node, s.moved) {
            let dw = match self.0 {
                RowsOp::Gather => B::moe_gate_grad(moved, dy.clone(), s.plan.clone(), s.top_k),
                RowsOp::Combine => B::moe_gate_grad(dy.clone(), moved, s.plan.clone(), s.top_k),
            };
            grads.register::<B>(id, dw);
        }
        register::<B>(grads, x_node, || match self.0 {
            RowsOp::Gather => B::moe_combine(dy, s.plan, s.top_k, s.weights),
            RowsOp::Combine => B::moe_gather(dy, s.plan, s.top_k, s.weights),
        });
    }
}

/// Backward of the grouped matmul, f32 or FP8.
#[derive(Debug)]
struct GroupedBackward;

#[derive(Clone, Debug)]
struct GroupedState<B: MoeBackend> {
    a: Option<FloatTensor<B>>,
    b: Option<FloatTensor<B>>,
    offsets: IntTensor<B>,
    transpose_b: bool,
    /// The forward's FP8 recipe; `None` for f32.
    fp8: Option<Fp8Recipe>,
}

impl<B: MoeBackend> Backward<B, 2> for GroupedBackward {
    type State = GroupedState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [a_node, b_node] = ops.parents.map(|p| p.map(|p| p.id));
        let s = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        if let (Some(id), Some(a)) = (b_node, s.a) {
            let db = if s.transpose_b { B::moe_grouped_wgrad(dy.clone(), a, s.offsets.clone()) } else { B::moe_grouped_wgrad(a, dy.clone(), s.offsets.clone()) };
            grads.register::<B>(id, db);
        }
        if let (Some(id), Some(b)) = (a_node, s.b) {
            let da = match s.fp8 {
                None => B::moe_grouped_matmul(dy, b, s.offsets, !s.transpose_b),
                Some(recipe) => {
                    let recipe = Fp8Recipe { input: recipe.grad, ..recipe };
                    B::moe_grouped_matmul_fp8(dy, b, s.offsets, !s.transpose_b, recipe)
                }
            };
            grads.register::<B>(id, da);
        }
    }
}

type Ad<B, C> = Autodiff<B, C>;

/// Gather or combine on `Autodiff`: records a [`RowsBackward`] over `x` and the weights.
fn rows_op<B: MoeBackend, C: CheckpointStrategy>(
    op: RowsOp,
    x: FloatTensor<Ad<B, C>>,
    plan: PlanPrimitive<Ad<B, C>>,
    top_k: usize,
    weights: Option<FloatTensor<Ad<B, C>>>,
) -> FloatTensor<Ad<B, C>> {
    let plan = inner_plan(plan);
    let run = |x: FloatTensor<B>, plan: PlanPrimitive<B>, w: Option<FloatTensor<B>>| match op {
        RowsOp::Gather => B::moe_gather(x, plan, top_k, w),
        RowsOp::Combine => B::moe_combine(x, plan, top_k, w),
    };
    match weights {
        None => match RowsBackward(op).prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = RowsState { plan: plan.clone(), top_k, weights: None, moved: None };
                prep.finish(state, run(x.primitive, plan, None))
            }
            OpsKind::UnTracked(prep) => prep.finish(run(x.primitive, plan, None)),
        },
        Some(w) => {
            let w_tracked = !w.node.requirement.is_none();
            match RowsBackward(op).prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let state = RowsState { plan: plan.clone(), top_k, weights: Some(w.primitive.clone()), moved: w_tracked.then(|| x.primitive.clone()) };
                    prep.finish(state, run(x.primitive, plan, Some(w.primitive)))
                }
                OpsKind::UnTracked(prep) => prep.finish(run(x.primitive, plan, Some(w.primitive))),
            }
        }
    }
}

/// The grouped matmul (f32, or FP8 with `fp8`) on `Autodiff`: records a [`GroupedBackward`].
fn grouped_op<B: MoeBackend, C: CheckpointStrategy>(
    a: FloatTensor<Ad<B, C>>,
    b: FloatTensor<Ad<B, C>>,
    offsets: IntTensor<Ad<B, C>>,
    transpose_b: bool,
    fp8: Option<Fp8Recipe>,
) -> FloatTensor<Ad<B, C>> {
    let run = |a, b, offsets| match fp8 {
        None => B::moe_grouped_matmul(a, b, offsets, transpose_b),
        Some(recipe) => B::moe_grouped_matmul_fp8(a, b, offsets, transpose_b, recipe),
    };
    let a_tracked = !a.node.requirement.is_none();
    let b_tracked = !b.node.requirement.is_none();
    match GroupedBackward.prepare::<C>([a.node.clone(), b.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = GroupedState { a: b_tracked.then(|| a.primitive.clone()), b: a_tracked.then(|| b.primitive.clone()), offsets: offsets.clone(), transpose_b, fp8 };
            prep.finish(state, run(a.primitive, b.primitive, offsets))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(a.primitive, b.primitive, offsets)),
    }
}

impl<B: MoeBackend, C: CheckpointStrategy> MoeBackend for Autodiff<B, C> {
    fn moe_plan(indices: IntTensor<Self>, counts: IntTensor<Self>) -> PlanPrimitive<Self> {
        let p = B::moe_plan(indices, counts);
        PlanPrimitive { positions: p.positions, row_slots: p.row_slots, offsets: p.offsets }
    }

    fn moe_gather(x: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        rows_op::<B, C>(RowsOp::Gather, x, plan, top_k, weights)
    }

    fn moe_combine(rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        rows_op::<B, C>(RowsOp::Combine, rows, plan, top_k, weights)
    }

    fn moe_gate_grad(a: FloatTensor<Self>, rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize) -> FloatTensor<Self> {
        Self::from_inner(B::moe_gate_grad(Self::inner(a), Self::inner(rows), inner_plan(plan), top_k))
    }

    fn moe_grouped_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool) -> FloatTensor<Self> {
        grouped_op::<B, C>(a, b, offsets, transpose_b, None)
    }

    fn moe_grouped_matmul_fp8(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool, recipe: Fp8Recipe) -> FloatTensor<Self> {
        grouped_op::<B, C>(a, b, offsets, transpose_b, Some(recipe))
    }

    fn moe_grouped_wgrad(a: FloatTensor<Self>, d: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::moe_grouped_wgrad(Self::inner(a), Self::inner(d), offsets))
    }
}
