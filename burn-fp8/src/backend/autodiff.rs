//! `Autodiff<B>`: the quantization ops forward to `B` untracked (quantization has no
//! useful derivative and the GEMM consumes already-quantized operands), while
//! [`Fp8Backend::fp8_linear`] records a backward whose two GEMMs also run in FP8.

use super::{Fp8Backend, Fp8Primitive};
use crate::config::Fp8Layout;
use crate::linear::{ops, Fp8Recipe, WgradTask};
use crate::{Fp8Tensor, QuantConfig};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::AutodiffBackend,
    ops::{FloatTensor, IntTensor},
    Tensor, TensorPrimitive,
};

type Ad<B, C> = Autodiff<B, C>;

fn inner<B: Fp8Backend, C: CheckpointStrategy>(q: Fp8Primitive<Ad<B, C>>) -> Fp8Primitive<B> {
    Fp8Primitive { data: q.data, scales: Ad::<B, C>::inner(q.scales) }
}

fn float<B: Fp8Backend>(x: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// Backward of `y = x · W` in FP8: Dgrad now, Wgrad now or queued ([`WgradTask::submit`]).
#[derive(Debug)]
struct Fp8LinearBackward;

/// What the backward keeps: the input in FP8, tiled along the tokens (only if the weight
/// needs a gradient), and the f32 weight (only if the input needs one; it is the
/// parameter itself, so this costs no memory).
#[derive(Clone, Debug)]
struct Fp8LinearState<B: Fp8Backend> {
    x_t: Option<Fp8Tensor<B>>,
    weight: Option<FloatTensor<B>>,
    recipe: Fp8Recipe,
}

impl<B: Fp8Backend> Backward<B, 2> for Fp8LinearBackward {
    type State = Fp8LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, w_node] = ops.parents;
        let state = ops.state;
        let dy = float::<B>(grads.consume::<B>(&ops.node));
        if let (Some(node), Some(x_t)) = (w_node, state.x_t) {
            let dy_t = ops::save_output_grad(dy.clone(), &state.recipe);
            WgradTask { node: node.id, x_t, dy_t }.submit(grads);
        }
        if let (Some(node), Some(weight)) = (x_node, state.weight) {
            let dx = ops::backward_input(dy, float(weight), &state.recipe);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

impl<B: Fp8Backend, C: CheckpointStrategy> Fp8Backend for Autodiff<B, C> {
    fn fp8_quantize(x: FloatTensor<Self>, config: QuantConfig) -> Fp8Primitive<Self> {
        let q = B::fp8_quantize(Self::inner(x), config);
        Fp8Primitive { data: q.data, scales: Self::from_inner(q.scales) }
    }

    fn fp8_dequantize(q: Fp8Primitive<Self>, layout: Fp8Layout) -> FloatTensor<Self> {
        Self::from_inner(B::fp8_dequantize(inner(q), layout))
    }

    fn fp8_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout) -> FloatTensor<Self> {
        Self::from_inner(B::fp8_gemm(inner(a), a_layout, inner(b), b_layout))
    }

    fn fp8_grouped_gemm(a: Fp8Primitive<Self>, a_layout: Fp8Layout, b: Fp8Primitive<Self>, b_layout: Fp8Layout, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fp8_grouped_gemm(inner(a), a_layout, inner(b), b_layout, offsets))
    }

    fn fp8_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, recipe: Fp8Recipe) -> FloatTensor<Self> {
        let prep = Fp8LinearBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful();
        let x_tracked = !x.node.requirement.is_none();
        let w_tracked = !weight.node.requirement.is_none();
        let (x, weight) = (float::<B>(x.primitive), float::<B>(weight.primitive));
        let xq = Fp8Tensor::quantize(x.clone(), recipe.input);
        match prep {
            OpsKind::Tracked(prep) => {
                let state = Fp8LinearState { x_t: w_tracked.then(|| ops::save_input(x, &recipe)), weight: x_tracked.then(|| weight.clone().into_primitive().tensor()), recipe };
                prep.finish(state, ops::forward_quantized(&xq, weight, &recipe).into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => prep.finish(ops::forward_quantized(&xq, weight, &recipe).into_primitive().tensor()),
        }
    }
}
