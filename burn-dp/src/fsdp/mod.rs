//! FSDP (ZeRO stage 3): a module's parameters, gradients and optimizer state sharded over
//! the data-parallel ranks, the parameters gathered for the forward and the gradients
//! reduce-scattered in the backward.

mod backend;

pub use backend::{FsdpBackend, Shards};

use crate::collective::even_bounds;
use crate::layout::{dims, module_device, values, Layout};
use crate::DpError;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_comm::Comm;

/// A module whose trainable parameters live sharded over the data-parallel ranks: each
/// rank holds one flat shard of `1/W` of their elements (the shard is this module's only
/// trainable parameter, so any Burn optimizer keeps `1/W` of the state), and
/// [`Fsdp::gather`] gives the whole module for a forward.
///
/// The gather is a differentiable all-gather ([`FsdpBackend`]): its backward
/// reduce-scatters the parameters' gradients, so after `loss.backward()` each rank's
/// shard holds the mean over the data-parallel ranks of its gradient, and one
/// `optimizer.step` on every rank is the step of one device on the concatenated batch.
///
/// Wrap each block (a unit) rather than the whole model: a block's parameters are
/// gathered just before its forward and dropped with the gathered module after it. Under
/// `Autodiff<B, BalancedCheckpointing>` the backward gathers them again when it needs
/// them (FSDP's second all-gather), so only the blocks in flight are whole; under
/// Burn's default `NoCheckpointing` the graph keeps the gathered values from the forward
/// to the backward.
///
/// Parameters that are not trainable (`require_grad` off: buffers, the MoE balancing
/// bias) stay whole on every rank. The shard is cut at element boundaries
/// ([`even_bounds`]): ranks differ by at most one element.
///
/// # Example
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
/// use burn::tensor::Tensor;
/// use burn_comm::{launch, Comm, Transport};
/// use burn_dp::{DpError, Fsdp};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let linear = LinearConfig::new(4, 2).init::<B>(&device).fork(&device);
/// let weights = launch(Comm::group(2, Transport::Host), |comm| {
///     // 10 values: 5 on each rank.
///     let mut fsdp = Fsdp::new(linear.clone().fork(&device), comm.clone())?;
///     let mut optim = AdamWConfig::new().init();
///     let x = Tensor::<B, 2>::ones([3, 4], &device) * (comm.rank() as f32 + 1.0);
///     let loss = fsdp.gather()?.forward(x).mean();
///     let grads = GradientsParams::from_grads(loss.backward(), &fsdp);
///     fsdp = optim.step(1e-2, fsdp, grads);
///     Ok::<_, DpError>(fsdp.unshard()?.weight.val().into_data())
/// })
/// .unwrap();
/// assert_eq!(weights[0], weights[1]);
/// ```
#[derive(Module, Debug)]
pub struct Fsdp<B: Backend, M: Module<B>> {
    /// This rank's elements of the flattened trainable parameters.
    shard: Param<Tensor<B, 1>>,
    /// The module with its trainable parameters replaced by one-element placeholders
    /// (ids kept), filled again by a gather.
    hollow: M,
    #[module(skip)]
    plan: Plan,
}

/// What a gather needs: the parameters' order and shapes, and the sharding.
#[derive(Clone, Debug)]
struct Plan {
    layout: Layout,
    shards: Shards,
}

impl<B: Backend, M: Module<B>> Fsdp<B, M> {
    /// Shards `module` over the ranks of `comm` (the mesh's `dp` communicator): this rank
    /// keeps its `1/W` of the trainable values. Collective (checks that every rank built
    /// the same module).
    ///
    /// # Errors
    /// [`DpError::Layout`] naming the first parameter whose shape differs between ranks.
    pub fn new(module: M, comm: Comm) -> Result<Self, DpError> {
        Self::build(module, comm, None)
    }

    /// HSDP: sharded over `shard` (`dp_shard`, e.g. the GPUs of a node), the same shards
    /// held by the ranks of `replicas` (`dp_replicate`) in the other groups, gradients
    /// averaged across them. Collective over both.
    ///
    /// # Errors
    /// As [`Fsdp::new`], over either communicator.
    pub fn hybrid(module: M, shard: Comm, replicas: Comm) -> Result<Self, DpError> {
        Self::build(module, shard, Some(replicas))
    }

    fn build(module: M, comm: Comm, replicas: Option<Comm>) -> Result<Self, DpError> {
        let layout = Layout::of::<B, M>(&module);
        layout.check(&comm)?;
        if let Some(replicas) = &replicas {
            layout.check(replicas)?;
        }
        let bounds = even_bounds(layout.numel(), comm.world_size());
        let me = comm.rank();
        let device = module_device(&module);
        let full = values(&module, &layout, 0..layout.len());
        // A copy of the shard (one host round trip, at construction only): a slice can
        // be a view that keeps the whole vector alive (NdArray).
        let data = full.slice([bounds[me]..bounds[me + 1]]).into_data();
        let id = shard_id(&layout, &bounds, me);
        let shard = Param::initialized(id, Tensor::from_data(data, &device).require_grad());
        let hollow = module.map(&mut Hollow { layout: &layout });
        let shards = Shards {
            bounds,
            comm,
            replicas,
        };
        Ok(Fsdp {
            shard,
            hollow,
            plan: Plan { layout, shards },
        })
    }

    /// `self` with `f` applied to the module outside its trainable parameters: to update
    /// state that every rank keeps whole, such as the MoE balancing bias. The trainable
    /// parameters `f` sees are one-element placeholders; it must leave them as they are.
    pub fn map_module(self, f: impl FnOnce(M) -> M) -> Self {
        Fsdp {
            hollow: f(self.hollow),
            ..self
        }
    }

    /// The sharding (bounds and communicators).
    pub fn shards(&self) -> &Shards {
        &self.plan.shards
    }

    /// The wrapped module's trainable parameters (order, shapes, flat offsets).
    pub fn layout(&self) -> &Layout {
        &self.plan.layout
    }

    /// This rank's shard (the flat elements `bounds[r]..bounds[r + 1]`).
    pub fn shard(&self) -> &Param<Tensor<B, 1>> {
        &self.shard
    }

    /// A shard loaded from a record must be this sharding's: a checkpoint of another
    /// world size goes through a loader that reshards.
    fn check_shard(&self) -> Result<(), DpError> {
        let s = &self.plan.shards;
        let (have, want) = (self.shard.shape().num_elements(), s.own_len());
        if have == want {
            return Ok(());
        }
        Err(DpError::Config {
            detail: format!(
                "rank {} of {} holds an FSDP shard of {have} elements, but {} elements over \
                 {} ranks give it {want}: the shard comes from another sharding (load it \
                 through a resharding checkpoint loader)",
                s.comm.rank(),
                s.comm.world_size(),
                self.plan.layout.numel(),
                s.comm.world_size()
            ),
        })
    }

    /// The whole module for a forward, its parameters all-gathered from the shards and
    /// differentiable back to this rank's shard (on `Autodiff`; plain values on other
    /// backends). Collective: every rank of the data-parallel group gathers the same
    /// units in the same order.
    ///
    /// # Errors
    /// A shard of another sharding (a record of another world size); a failed or stalled
    /// rank.
    pub fn gather(&self) -> Result<M, DpError>
    where
        B: FsdpBackend,
    {
        self.check_shard()?;
        let layout = &self.plan.layout;
        let shard = self.shard.val().into_primitive().tensor();
        let pieces = B::fsdp_gather(shard, &self.plan.shards, &layout.offsets)?
            .into_iter()
            .map(|p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p)))
            .collect();
        Ok(self.hollow.clone().map(&mut Fill {
            layout,
            pieces,
            leaves: false,
        }))
    }

    /// The whole module with its own trainable parameters again (leaves, ids kept): to
    /// evaluate, save or hand over after training. Collective.
    ///
    /// # Errors
    /// As [`Fsdp::gather`].
    pub fn unshard(self) -> Result<M, DpError> {
        self.check_shard()?;
        let layout = &self.plan.layout;
        let pieces =
            (self.plan.shards).gather_pieces(self.shard.val().detach(), &layout.offsets)?;
        Ok(self.hollow.map(&mut Fill {
            layout,
            pieces,
            leaves: true,
        }))
    }
}

/// The shard's parameter id, the same in every run of the same module and sharding (so
/// that an optimizer record, keyed by parameter ids, resumes): a hash of the module's
/// parameter ids, the bounds and the rank.
fn shard_id(layout: &Layout, bounds: &[usize], rank: usize) -> ParamId {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same value in every process and run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for id in &layout.ids {
        id.val().hash(&mut h);
    }
    (bounds, rank).hash(&mut h);
    ParamId::from(h.finish())
}

/// Replaces each trainable parameter of the layout by a one-element placeholder that
/// needs no gradient (so optimizers and layouts see only the shard).
struct Hollow<'a> {
    layout: &'a Layout,
}

impl<B: Backend> ModuleMapper<B> for Hollow<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.layout.index(&param.id).is_none() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let placeholder = Tensor::zeros([1; D], &tensor.device());
        Param::from_mapped_value(id, placeholder, mapper)
    }
}

/// Fills the placeholders with the gathered pieces (1-D, in layout order).
struct Fill<'a, B: Backend> {
    layout: &'a Layout,
    pieces: Vec<Tensor<B, 1>>,
    /// Trainable leaves (unshard) instead of values tracked back to the shard (gather).
    leaves: bool,
}

impl<B: Backend> ModuleMapper<B> for Fill<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(i) = self.layout.index(&param.id) else {
            return param;
        };
        let (id, _placeholder, mapper) = param.consume();
        let value = self.pieces[i]
            .clone()
            .reshape(dims::<D>(&self.layout.shapes[i]));
        let value = if self.leaves {
            value.require_grad()
        } else {
            value
        };
        Param::from_mapped_value(id, value, mapper)
    }
}
