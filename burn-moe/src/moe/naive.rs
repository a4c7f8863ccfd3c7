//! The naive way to run a [`Moe`] layer in plain Burn: read the routing back to the host
//! and loop over the experts, gathering each one's tokens with `select` and adding its
//! weighted output back with `select_assign`. The test oracle for the layer and the
//! baseline of its benchmark.

use super::{Moe, MoeOutput};
use burn::tensor::{activation::silu, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

/// [`Moe::forward`] computed expert by expert (one host read-back, `E` small matmul
/// chains). Differentiable through Burn's autodiff.
///
/// # Shapes
/// - x: `[batch, seq, d_model]`
///
/// # Panics
/// On the same inputs as [`Moe::forward`].
pub fn forward_naive<B: Backend>(moe: &Moe<B>, x: Tensor<B, 3>) -> MoeOutput<B> {
    let [b, s, _] = x.dims();
    if b * s == 0 {
        return moe.empty(&x);
    }
    let input = moe.route(x).unwrap_or_else(|e| panic!("Moe: {e}"));
    let (x, routing) = (input.x.clone(), &input.routing);
    let [t, d] = x.dims();
    let k = moe.router.top_k;
    let device = x.device();
    let indices: Vec<i64> = routing.indices.to_data().convert::<i64>().to_vec().expect("indices");
    let weights = routing.weights.clone().reshape([t * k]);
    let mut routed = Tensor::<B, 2>::zeros([t, d], &device);
    for e in 0..moe.router.n_experts {
        let slots: Vec<i64> = (0..t * k).filter(|&i| indices[i] == e as i64).map(|i| i as i64).collect();
        if slots.is_empty() {
            continue;
        }
        let n = slots.len();
        let tokens: Vec<i64> = slots.iter().map(|&i| i / k as i64).collect();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [n]), &device);
        let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [n]), &device);
        let matrix = |w: &burn::module::Param<Tensor<B, 3>>| {
            let [_, p, q] = w.dims();
            w.val().slice([e..e + 1]).reshape([p, q])
        };
        let xe = x.clone().select(0, tokens.clone());
        let h = silu(xe.clone().matmul(matrix(&moe.experts.w_gate))) * xe.matmul(matrix(&moe.experts.w_up));
        let ye = h.matmul(matrix(&moe.experts.w_down)) * weights.clone().select(0, slots).unsqueeze_dim(1);
        routed = routed.select_assign(0, tokens, ye, IndexingUpdateOp::Add);
    }
    moe.finish(input, routed, [b, s])
}
