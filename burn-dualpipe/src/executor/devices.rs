//! Moving stage modules and their gradients between devices the way [`Transfer`] moves
//! activations: through the host, or with Burn's `to_device`.

use super::Transfer;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor};

/// A copy of `module` on `device`, with the same parameter ids, its parameters fresh
/// leaves (so each rank's autodiff graphs are its own).
pub(super) fn fork<B: AutodiffBackend, M: AutodiffModule<B>>(module: M, device: &B::Device, transfer: Transfer) -> M {
    let here = module.devices().iter().all(|d| d == device);
    match transfer {
        Transfer::Host if !here => copy_to_device(module, device),
        _ => module.fork(device),
    }
}

/// A copy of `module` on `device` through host memory (`into_data`, then `from_data`):
/// works between any two Burn devices, where `Module::to_device` between two wgpu
/// devices panics in Burn 0.21. Parameter ids and gradient requirements are kept; every
/// parameter is a fresh leaf, so the copy's autodiff graph shares nothing with the
/// source (a rank's replica in data or expert parallelism, a pipeline stage).
pub fn copy_to_device<B: Backend, M: Module<B>>(module: M, device: &B::Device) -> M {
    module.map(&mut HostCopy { device })
}

/// `grads` (of `module`'s parameters) moved to `device`.
pub(super) fn grads_to<B: AutodiffBackend, M: AutodiffModule<B>>(grads: GradientsParams, module: &M, device: &B::Device, transfer: Transfer) -> GradientsParams {
    match transfer {
        Transfer::Device => grads.to_device(device, module),
        Transfer::Host => {
            // Gradients already on `device` are left where they are.
            let mut visitor = HostGrads::<B> { device, grads };
            module.visit(&mut visitor);
            visitor.grads
        }
    }
}

/// Copies every parameter to `device` through host memory; ids and gradient requirement
/// kept, each copy a fresh leaf.
struct HostCopy<'a, B: Backend> {
    device: &'a B::Device,
}

impl<B: Backend> ModuleMapper<B> for HostCopy<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let copy = Tensor::from_data(value.to_data(), self.device).set_require_grad(value.is_require_grad());
        Param::from_mapped_value(id, copy, mapper)
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<B, D, Int>>) -> Param<Tensor<B, D, Int>> {
        let (id, value, mapper) = param.consume();
        Param::from_mapped_value(id, Tensor::from_data(value.to_data(), self.device), mapper)
    }

    fn map_bool<const D: usize>(&mut self, param: Param<Tensor<B, D, Bool>>) -> Param<Tensor<B, D, Bool>> {
        let (id, value, mapper) = param.consume();
        Param::from_mapped_value(id, Tensor::from_data(value.to_data(), self.device), mapper)
    }
}

/// Moves the gradient of every float parameter it visits through host memory.
struct HostGrads<'a, B: AutodiffBackend> {
    device: &'a B::Device,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for HostGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            if &g.device() == self.device {
                self.grads.register::<B::InnerBackend, D>(param.id, g);
                return;
            }
            self.grads.register::<B::InnerBackend, D>(param.id, Tensor::from_data(g.into_data(), self.device));
        }
    }
}
