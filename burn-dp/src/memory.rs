//! What a rank holds, in bytes, read from the tensors themselves: its module's trainable
//! parameters, a step's gradients, and AdamW's moments.

use crate::{AdamW, AdamWState, Layout};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// Bytes of the trainable parameters of `module` (elements × their dtype's size).
pub fn param_bytes<B: Backend, M: burn::module::Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                self.0 += param.shape().num_elements() * param.val().dtype().size();
            }
        }
    }
    let mut c = Count(0);
    module.visit(&mut c);
    c.0
}

/// Bytes of the gradients in `grads` of the parameters of `layout`.
pub fn grad_bytes<B: AutodiffBackend>(grads: &GradientsParams, layout: &Layout) -> usize {
    layout
        .ids
        .iter()
        .zip(&layout.shapes)
        .map(|(id, shape)| {
            let size = |dtype: burn::tensor::DType| shape.iter().product::<usize>() * dtype.size();
            match shape.len() {
                1 => grads.get::<B::InnerBackend, 1>(*id).map_or(0, |g| size(g.dtype())),
                2 => grads.get::<B::InnerBackend, 2>(*id).map_or(0, |g| size(g.dtype())),
                3 => grads.get::<B::InnerBackend, 3>(*id).map_or(0, |g| size(g.dtype())),
                4 => grads.get::<B::InnerBackend, 4>(*id).map_or(0, |g| size(g.dtype())),
                _ => grads.get::<B::InnerBackend, 5>(*id).map_or(0, |g| size(g.dtype())),
            }
        })
        .sum()
}

/// Bytes of the moments `optim` holds for the parameters of `layout` (none for a
/// parameter it has not stepped: under [`crate::Zero1`], the other ranks' shards).
pub fn adamw_state_bytes<B: AutodiffBackend, M: AutodiffModule<B>>(optim: &OptimizerAdaptor<AdamW, M, B>, layout: &Layout) -> usize {
    fn bytes<B: Backend, const D: usize>(s: AdamWState<B, D>) -> usize {
        [s.moment_1, s.moment_2].iter().map(|m| m.shape().num_elements() * m.dtype().size()).sum()
    }
    let mut record = optim.to_record();
    layout
        .ids
        .iter()
        .zip(&layout.shapes)
        .map(|(id, shape)| match record.remove(id) {
            None => 0,
            Some(r) => match shape.len() {
                1 => bytes(r.into_state::<1>()),
                2 => bytes(r.into_state::<2>()),
                3 => bytes(r.into_state::<3>()),
                4 => bytes(r.into_state::<4>()),
                _ => bytes(r.into_state::<5>()),
            },
        })
        .sum()
}
