//! ZeRO-1: the optimizer state sharded over the data-parallel ranks.

use crate::collective::{all_gather, all_reduce, reduce_scatter};
use crate::ddp::checked_layout;
use crate::layout::{put_grads, put_values, take_grads, take_values, Layout};
use crate::DpError;
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn_comm::Comm;
use std::sync::Mutex;

/// ZeRO stage 1 around any Burn optimizer: every rank holds the whole module, but the
/// optimizer state of only its shard of the parameters.
///
/// The trainable parameters, flattened in module order, are cut into one run of whole
/// parameters per rank of about equal size ([`Layout::partition`]). A step:
/// 1. reduce-scatter the gradients: each rank receives the mean over the ranks of its
///    shard's gradients (half the bytes of an all-reduce);
/// 2. the wrapped optimizer steps the shard's parameters only, so it creates and keeps
///    state (AdamW's two moments) for them only: about `1/W` of the state on each rank;
/// 3. all-gather the updated parameters: every rank's module equals the others' again.
///
/// Same numbers as [`crate::Ddp`] with the same optimizer (the update of a parameter
/// depends on its own gradient and state only), for a `1/W` share of the optimizer's
/// memory. Per-parameter optimizer options that look at the whole gradient (gradient
/// clipping by global norm) see only the shard: use per-parameter clipping.
///
/// # Example
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams};
/// use burn::tensor::Tensor;
/// use burn_comm::{launch, Comm, Transport};
/// use burn_dp::{DpError, Zero1};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// // Burn draws weights lazily, at first use: fork draws them now, once for all ranks.
/// let model = LinearConfig::new(4, 2).init::<B>(&device).fork(&device);
/// let weights = launch(Comm::group(2, Transport::Host), |comm| {
///     let mut zero = Zero1::new(AdamWConfig::new().init(), comm.clone());
///     // Each in-process rank works on its own replica: the same values, fresh leaves.
///     let model = model.clone().fork(&device);
///     let x = Tensor::<B, 2>::ones([3, 4], &device) * (comm.rank() as f32 + 1.0);
///     let grads = GradientsParams::from_grads(model.forward(x).mean().backward(), &model);
///     let model = zero.step(1e-2, model, grads)?; // weight on rank 0, bias on rank 1
///     Ok::<_, DpError>(model.weight.val().into_data())
/// })
/// .unwrap();
/// assert_eq!(weights[0], weights[1]);
/// ```
pub struct Zero1<O> {
    optimizer: O,
    comm: Comm,
    /// HSDP's outer dimension: groups holding the same shards, whose gradients are
    /// averaged across (the mesh's `dp_replicate`).
    replicas: Option<Comm>,
    checked: Mutex<Option<Layout>>,
}

impl<O> Zero1<O> {
    /// ZeRO-1 over the ranks of `comm` (the mesh's `dp` communicator) around `optimizer`.
    pub fn new(optimizer: O, comm: Comm) -> Self {
        Zero1 { optimizer, comm, replicas: None, checked: Mutex::new(None) }
    }

    /// HSDP's 2-D layout `[dp_replicate, dp_shard]`: the state sharded over this
    /// communicator's ranks (`dp_shard`, e.g. the GPUs of one node), the shards' gradients
    /// also averaged over `replicas` (`dp_replicate`: the ranks holding the same shard in
    /// the other groups). Each rank then holds `1 / dp_shard` of the state, and only the
    /// shard's gradients cross groups.
    pub fn with_replicas(mut self, replicas: Comm) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// The wrapped optimizer, holding this rank's shard of the state (its record is this
    /// rank's part of a checkpoint).
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The same, mutable (to load a record of this rank's shard).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The data-parallel group.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// The parameter range of `layout` whose state rank `rank` holds.
    pub fn shard_of(&self, layout: &Layout, rank: usize) -> std::ops::Range<usize> {
        let bounds = layout.partition(self.comm.world_size());
        layout.params_in(bounds[rank], bounds[rank + 1])
    }

    /// One optimizer step on every rank with this rank's `grads` (of its own batch):
    /// the step the wrapped optimizer would take with the mean gradient over the ranks.
    /// Collective.
    ///
    /// # Errors
    /// [`DpError::Layout`] when the ranks' modules differ; a failed or stalled rank.
    pub fn step<B, M>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> Result<M, DpError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let layout = checked_layout(&self.checked, &module, &self.comm)?;
        let world = self.comm.world_size();
        let me = self.comm.rank();
        let bounds = layout.partition(world);
        let flat = take_grads(&module, &layout, 0..layout.len(), &mut grads);
        let mut mine = reduce_scatter(flat, &bounds, &self.comm)?;
        let mut ranks = world;
        if let Some(replicas) = &self.replicas {
            mine = all_reduce(mine, replicas)?;
            ranks *= replicas.world_size();
        }
        let mine = mine.div_scalar(ranks as f32);
        let range = layout.params_in(bounds[me], bounds[me + 1]);
        let mut own = GradientsParams::new();
        put_grads(&layout, range.clone(), mine, &mut own);
        let module = self.optimizer.step(lr, module, own);
        let shard = take_values(&module, &layout, range);
        let all = all_gather(shard, &bounds, &self.comm)?;
        Ok(put_values(module, &layout, all))
    }
}
