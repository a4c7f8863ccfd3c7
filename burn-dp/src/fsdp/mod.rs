//! FSDP (ZeRO stage 3): a module's parameters, gradients and optimizer state sharded over
//! the data-parallel ranks, the parameters gathered for the forward and the gradients
//! reduce-scattered in the backward.

mod backend;
mod group;

pub use backend::{FsdpBackend, Shards};
pub use group::ShardGroup;

use crate::layout::{dims, module_device, values, Layout};
use crate::DpError;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_comm::Comm;
use group::Plans;

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
/// ([`crate::collective::even_bounds`]): ranks differ by at most one element.
///
/// [`Fsdp::grouped`] shards parts of the module over different ranks, one flat shard per
/// [`ShardGroup`]: with expert parallelism, the dense parameters over every rank and the
/// routed experts (already split by `ep`) over the data-parallel ranks.
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
    /// This rank's elements of each group's flattened trainable parameters.
    flat: Vec<Param<Tensor<B, 1>>>,
    /// The module with its sharded parameters replaced by one-element placeholders
    /// (ids kept), filled again by a gather.
    hollow: M,
    #[module(skip)]
    plans: Plans,
}

impl<B: Backend, M: Module<B>> Fsdp<B, M> {
    /// Shards `module` over the ranks of `comm` (the mesh's `dp` communicator): this rank
    /// keeps its `1/W` of the trainable values. Collective (checks that every rank built
    /// the same module).
    ///
    /// # Errors
    /// [`DpError::Layout`] naming the first parameter whose shape differs between ranks.
    pub fn new(module: M, comm: Comm) -> Result<Self, DpError> {
        Self::grouped(module, vec![ShardGroup::new(comm)])
    }

    /// HSDP: sharded over `shard` (`dp_shard`, e.g. the GPUs of a node), the same shards
    /// held by the ranks of `replicas` (`dp_replicate`) in the other groups, gradients
    /// averaged across them. Collective over both.
    ///
    /// # Errors
    /// As [`Fsdp::new`], over either communicator.
    pub fn hybrid(module: M, shard: Comm, replicas: Comm) -> Result<Self, DpError> {
        Self::grouped(module, vec![ShardGroup::new(shard).with_replicas(replicas)])
    }

    /// The trainable parameters sharded group by group, one flat shard per group (in
    /// this order; every rank passes the same groups). Collective over each group's
    /// communicators, in order.
    ///
    /// # Errors
    /// [`DpError::Config`] for groups that do not partition the trainable parameters (one
    /// named twice or not the module's, two groups taking the rest, an empty group);
    /// [`DpError::Layout`] when a group's ranks built different modules.
    pub fn grouped(module: M, groups: Vec<ShardGroup>) -> Result<Self, DpError> {
        let plans = Plans::build(&Layout::of::<B, M>(&module), groups)?;
        let device = module_device(&module);
        let flat = plans
            .groups
            .iter()
            .enumerate()
            .map(|(g, plan)| {
                let (layout, bounds) = (&plan.layout, &plan.shards.bounds);
                let me = plan.shards.comm.rank();
                let full = values(&module, layout, 0..layout.len());
                // A copy of the shard (one host round trip, at construction only): a slice
                // can be a view that keeps the whole vector alive (NdArray).
                let data = full.slice([bounds[me]..bounds[me + 1]]).into_data();
                let id = shard_id(g, layout, bounds, me);
                Param::initialized(id, Tensor::from_data(data, &device).require_grad())
            })
            .collect();
        let hollow = module.map(&mut Hollow { plans: &plans });
        Ok(Fsdp { flat, hollow, plans })
    }

    /// `self` with `f` applied to the module outside its sharded parameters: to update
    /// state that every rank keeps whole, such as the MoE balancing bias. The sharded
    /// parameters `f` sees are one-element placeholders; it must leave them as they are.
    pub fn map_module(self, f: impl FnOnce(M) -> M) -> Self {
        Fsdp { hollow: f(self.hollow), ..self }
    }

    /// The shard groups (one with [`Fsdp::new`] and [`Fsdp::hybrid`]).
    pub fn num_groups(&self) -> usize {
        self.plans.groups.len()
    }

    /// Group `g`'s sharding (bounds and communicators).
    pub fn shards(&self, g: usize) -> &Shards {
        &self.plans.groups[g].shards
    }

    /// Group `g`'s trainable parameters (order, shapes, flat offsets).
    pub fn layout(&self, g: usize) -> &Layout {
        &self.plans.groups[g].layout
    }

    /// This rank's shard of group `g` (its flat elements `bounds[r]..bounds[r + 1]`).
    pub fn shard(&self, g: usize) -> &Param<Tensor<B, 1>> {
        &self.flat[g]
    }

    /// A shard loaded from a record must be this sharding's: a checkpoint of another
    /// world size goes through a loader that reshards.
    fn check_shards(&self) -> Result<(), DpError> {
        for (g, (plan, shard)) in self.plans.groups.iter().zip(&self.flat).enumerate() {
            let s = &plan.shards;
            let (have, want) = (shard.shape().num_elements(), s.own_len());
            if have == want {
                continue;
            }
            return Err(DpError::Config {
                detail: format!(
                    "rank {} of {} holds an FSDP shard (group {g}) of {have} elements, but \
                     {} elements over {} ranks give it {want}: the shard comes from another \
                     sharding (load it through a resharding checkpoint loader, e.g. \
                     burn_deepseek::checkpoint's load_fsdp)",
                    s.comm.rank(),
                    s.comm.world_size(),
                    plan.layout.numel(),
                    s.comm.world_size()
                ),
            });
        }
        Ok(())
    }

    /// The whole module for a forward, its parameters all-gathered from the shards and
    /// differentiable back to this rank's shards (on `Autodiff`; plain values on other
    /// backends): [`Fsdp::gather_part`] of the whole module. Collective: every rank of
    /// the data-parallel group gathers the same units in the same order.
    ///
    /// # Errors
    /// A shard of another sharding (a record of another world size); a failed or stalled
    /// rank.
    pub fn gather(&self) -> Result<M, DpError>
    where
        B: FsdpBackend,
    {
        self.gather_part(&self.hollow)
    }

    /// `part` of [`Fsdp::hollow`] (a block, a layer: any submodule) with its placeholders
    /// filled: every group with a parameter in `part` is all-gathered, in the groups'
    /// order, differentiably as in [`Fsdp::gather`]. With one group per block, a forward
    /// that gathers each block just before running it and drops it after holds one
    /// gathered block at a time. Collective over the groups found, which are the same on
    /// every rank that passes the same part.
    ///
    /// # Errors
    /// As [`Fsdp::gather`].
    pub fn gather_part<N: Module<B>>(&self, part: &N) -> Result<N, DpError>
    where
        B: FsdpBackend,
    {
        self.check_shards()?;
        let mut found = Groups { plans: &self.plans, found: std::collections::BTreeSet::new() };
        part.visit(&mut found);
        let mut pieces = vec![Vec::new(); self.flat.len()];
        for g in found.found {
            let plan = &self.plans.groups[g];
            let shard = self.flat[g].val().into_primitive().tensor();
            pieces[g] = B::fsdp_gather(shard, &plan.shards, &plan.layout.offsets)?.into_iter().map(|p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p))).collect();
        }
        Ok(part.clone().map(&mut Fill { plans: &self.plans, pieces, leaves: false }))
    }

    /// The module with its sharded parameters replaced by one-element placeholders: walk
    /// it to the parts to gather with [`Fsdp::gather_part`].
    pub fn hollow(&self) -> &M {
        &self.hollow
    }

    /// The whole module with its own trainable parameters again (leaves, ids kept): to
    /// evaluate, save or hand over after training. Collective.
    ///
    /// # Errors
    /// As [`Fsdp::gather`].
    pub fn unshard(self) -> Result<M, DpError> {
        self.check_shards()?;
        let mut pieces = Vec::with_capacity(self.flat.len());
        for (plan, shard) in self.plans.groups.iter().zip(&self.flat) {
            let shard = shard.val().detach();
            pieces.push((plan.shards).gather_pieces(shard, &plan.layout.offsets)?);
        }
        Ok(self.hollow.map(&mut Fill { plans: &self.plans, pieces, leaves: true }))
    }
}

/// Group `g`'s shard parameter id, the same in every run of the same module and sharding
/// (so that an optimizer record, keyed by parameter ids, resumes): a hash of the group's
/// parameter ids, the bounds and the rank.
fn shard_id(g: usize, layout: &Layout, bounds: &[usize], rank: usize) -> ParamId {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same value in every process and run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for id in &layout.ids {
        id.val().hash(&mut h);
    }
    (g, bounds, rank).hash(&mut h);
    ParamId::from(h.finish())
}

/// The groups that hold a parameter of the visited part, in order.
struct Groups<'a> {
    plans: &'a Plans,
    found: std::collections::BTreeSet<usize>,
}

impl<B: Backend> ModuleVisitor<B> for Groups<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some((g, _)) = self.plans.place(&param.id) {
            self.found.insert(g);
        }
    }
}

/// Replaces each sharded parameter by a one-element placeholder that needs no gradient
/// (so optimizers and layouts see only the shards).
struct Hollow<'a> {
    plans: &'a Plans,
}

impl<B: Backend> ModuleMapper<B> for Hollow<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.plans.place(&param.id).is_none() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let placeholder = Tensor::zeros([1; D], &tensor.device());
        Param::from_mapped_value(id, placeholder, mapper)
    }
}

/// Fills the placeholders with the gathered pieces (per group, 1-D, in layout order).
struct Fill<'a, B: Backend> {
    plans: &'a Plans,
    pieces: Vec<Vec<Tensor<B, 1>>>,
    /// Trainable leaves (unshard) instead of values tracked back to the shard (gather).
    leaves: bool,
}

impl<B: Backend> ModuleMapper<B> for Fill<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some((g, i)) = self.plans.place(&param.id) else {
            return param;
        };
        let (id, _placeholder, mapper) = param.consume();
        let shape = &self.plans.groups[g].layout.shapes[i];
        let value = self.pieces[g][i].clone().reshape(dims::<D>(shape));
        let value = if self.leaves { value.require_grad() } else { value };
        Param::from_mapped_value(id, value, mapper)
    }
}
