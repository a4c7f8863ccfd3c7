//! FSDP's one backend op: the all-gather of a flat parameter shard, whose backward
//! reduce-scatters the gradient (the mean over the data-parallel ranks lands on each
//! rank's shard).
//!
//! On `Autodiff<B, C>` the op is recorded as memory-bound with a retro-forward that
//! gathers again: under `BalancedCheckpointing` the gathered parameters are not kept for
//! the backward but re-gathered when a backward step needs them (FSDP's second
//! all-gather); under `NoCheckpointing` (Burn's default) the graph keeps them from the
//! forward to the backward.

use crate::collective::{all_gather, all_reduce, reduce_scatter};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, retro_forward::RetroForward, state::BackwardStates, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff, NodeId,
};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_comm::{Comm, CommError};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// How one flat vector is sharded: rank `r` of `comm` holds `bounds[r]..bounds[r + 1]`;
/// under HSDP the ranks of `replicas` hold the same shard in the other groups.
#[derive(Clone, Debug)]
pub struct Shards {
    /// `W + 1` element offsets (`W` = the shard group's size).
    pub bounds: Vec<usize>,
    /// The ranks the vector is sharded over (`dp_shard`).
    pub comm: Comm,
    /// The groups holding the same shards (`dp_replicate`), whose gradients are averaged
    /// across.
    pub replicas: Option<Comm>,
    /// What the summed gradients are divided by: [`Shards::dp_size`] unless the group
    /// says otherwise ([`crate::ShardGroup::with_gradient_divide_factor`]).
    pub divide_factor: usize,
}

impl Shards {
    /// The elements of this rank's shard.
    pub fn own_len(&self) -> usize {
        let me = self.comm.rank();
        self.bounds[me + 1] - self.bounds[me]
    }

    /// Every data-parallel rank: the shard group times the replica groups (the divisor of
    /// the summed gradients).
    pub fn dp_size(&self) -> usize {
        self.comm.world_size() * self.replicas.as_ref().map_or(1, Comm::world_size)
    }

    /// The whole vector from this rank's shard (not differentiated).
    ///
    /// # Shapes
    /// - shard: `[own_len]` → `[bounds[W]]`
    pub fn gather<B: Backend>(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError> {
        all_gather(shard, &self.bounds, &self.comm)
    }

    /// The whole vector from this rank's shard, cut at `offsets` (not differentiated).
    ///
    /// # Shapes
    /// - shard: `[own_len]` → `[offsets[i + 1] - offsets[i]]` for each piece `i`
    pub fn gather_pieces<B: Backend>(&self, shard: Tensor<B, 1>, offsets: &[usize]) -> Result<Vec<Tensor<B, 1>>, CommError> {
        let full = self.gather(shard)?;
        Ok(offsets.windows(2).map(|w| full.clone().slice([w[0]..w[1]])).collect())
    }

    /// This rank's shard of the sum over every data-parallel rank of `full` divided by
    /// [`Shards::divide_factor`] (the mean by default): a reduce-scatter within the group,
    /// an all-reduce across the replicas.
    ///
    /// # Shapes
    /// - full: `[bounds[W]]` → `[own_len]`
    pub fn reduce_mean<B: Backend>(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError> {
        let mut mine = reduce_scatter(full, &self.bounds, &self.comm)?;
        if let Some(replicas) = &self.replicas {
            mine = all_reduce(mine, replicas)?;
        }
        Ok(mine.div_scalar(self.divide_factor as f32))
    }
}

/// A backend that can gather [`crate::Fsdp`] shards into parameters: the default body
/// is the plain all-gather (inference, and the inner backend of `Autodiff`); `Autodiff`
/// records it with a backward that reduce-scatters the gradient.
pub trait FsdpBackend: Backend {
    /// The whole flat vector gathered from every rank's shard, cut at `offsets` into a
    /// unit's parameters (the layout's offsets, `0` to `bounds[W]`). Collective over
    /// `shards.comm`.
    ///
    /// # Shapes
    /// - shard: `[shards.own_len()]` → `[offsets[i + 1] - offsets[i]]` for each piece `i`
    ///
    /// # Errors
    /// A failed or stalled rank; a shard of another length than its range.
    fn fsdp_gather(shard: FloatTensor<Self>, shards: &Shards, offsets: &[usize]) -> Result<Vec<FloatTensor<Self>>, CommError> {
        let shard = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(shard));
        Ok(shards.gather_pieces(shard, offsets)?.into_iter().map(|p| p.into_primitive().tensor()).collect())
    }
}

/// Unwinds out of a backward step (which cannot return errors) with the collective's
/// error itself, which `burn_comm::launch` reports as this rank's result.
fn unwind(what: &str, shards: &Shards, e: CommError) -> ! {
    eprintln!("FSDP {what} on rank {}: {e}", shards.comm.global_rank(shards.comm.rank()));
    std::panic::panic_any(e)
}

/// The gradients of one gather's pieces, filled by the pieces' backward steps and read by
/// the gather's (which runs after them: a parent's step comes after its children's). The
/// pieces do not register gradients on the gathered vector, so the backward costs one
/// concatenation instead of a vector-sized zero tensor per parameter (Burn's slice
/// backward).
type Slots<B> = Arc<Mutex<Vec<Option<FloatTensor<B>>>>>;

/// Backward of the all-gather: the pieces' gradients concatenated, reduce-scattered and
/// divided by the group's divide factor (the data-parallel size by default).
#[derive(Debug)]
struct GatherBackward;

#[derive(Clone, Debug)]
struct GatherState<B: Backend> {
    shards: Shards,
    offsets: Vec<usize>,
    slots: Slots<B>,
    device: B::Device,
}

impl<B: Backend> Backward<B, 1> for GatherBackward {
    type State = GatherState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [shard_node] = ops.parents.map(|p| p.map(|p| p.id));
        let s = ops.state;
        let slots = std::mem::take(&mut *s.slots.lock().expect("FSDP gradient slots"));
        let parts = slots
            .into_iter()
            .zip(s.offsets.windows(2))
            .map(|(g, w)| match g {
                Some(g) => Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(g)),
                // A parameter the loss does not depend on.
                None => Tensor::zeros([w[1] - w[0]], &s.device),
            })
            .collect();
        let full = crate::layout::flat(parts, &s.device);
        // Every rank takes part, whether or not its shard needs a gradient.
        let mine = s.shards.reduce_mean(full).unwrap_or_else(|e| unwind("gradient reduce-scatter", &s.shards, e));
        if let Some(id) = shard_node {
            grads.register::<B>(id, mine.into_primitive().tensor());
        }
    }
}

/// Backward of one piece: its gradient into the gather's slot.
#[derive(Debug)]
struct PieceBackward;

#[derive(Clone, Debug)]
struct PieceState<B: Backend> {
    slots: Slots<B>,
    index: usize,
}

impl<B: Backend> Backward<B, 1> for PieceBackward {
    type State = PieceState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        ops.state.slots.lock().expect("FSDP gradient slots")[ops.state.index] = Some(g);
    }
}

/// The all-gather again, when a backward step needs the gathered values that
/// `BalancedCheckpointing` did not keep.
#[derive(Debug)]
struct RetroGather<B: Backend> {
    shard: NodeId,
    shards: Shards,
    _backend: PhantomData<B>,
}

impl<B: Backend> RetroForward for RetroGather<B> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let shard = states.get_state::<FloatTensor<B>>(&self.shard);
        let shard = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(shard));
        let full = self.shards.gather(shard).unwrap_or_else(|e| unwind("re-gather for the backward", &self.shards, e));
        states.save(out_node, full.into_primitive().tensor())
    }
}

/// A piece cut again from the re-gathered vector.
#[derive(Debug)]
struct RetroPiece<B: Backend> {
    full: NodeId,
    range: std::ops::Range<usize>,
    _backend: PhantomData<B>,
}

impl<B: Backend> RetroForward for RetroPiece<B> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let full = states.get_state::<FloatTensor<B>>(&self.full);
        let full = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(full));
        let piece = full.slice([self.range.clone()]);
        states.save(out_node, piece.into_primitive().tensor())
    }
}

impl<B: FsdpBackend, C: CheckpointStrategy> FsdpBackend for Autodiff<B, C> {
    fn fsdp_gather(shard: FloatTensor<Self>, shards: &Shards, offsets: &[usize]) -> Result<Vec<FloatTensor<Self>>, CommError> {
        let inner = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(shard.primitive.clone()));
        let device = inner.device();
        let full_inner = shards.gather(inner)?;
        let slots: Slots<B> = Arc::new(Mutex::new(vec![None; offsets.len() - 1]));
        let retro = RetroGather::<B> { shard: shard.node.id, shards: shards.clone(), _backend: PhantomData };
        let value = full_inner.clone().into_primitive().tensor();
        let full = match <GatherBackward as Backward<B, 1>>::prepare::<C>(GatherBackward, [shard.node.clone()]).memory_bound().retro_forward(retro).parents([&shard]).stateful() {
            OpsKind::Tracked(prep) => {
                let state = GatherState { shards: shards.clone(), offsets: offsets.to_vec(), slots: slots.clone(), device };
                prep.finish(state, value)
            }
            OpsKind::UnTracked(prep) => prep.finish(value),
        };
        Ok(offsets
            .windows(2)
            .enumerate()
            .map(|(index, w)| {
                let range = w[0]..w[1];
                let value = full_inner.clone().slice([range.clone()]).into_primitive().tensor();
                let retro = RetroPiece::<B> { full: full.node.id, range, _backend: PhantomData };
                match <PieceBackward as Backward<B, 1>>::prepare::<C>(PieceBackward, [full.node.clone()]).memory_bound().retro_forward(retro).parents([&full]).stateful() {
                    OpsKind::Tracked(prep) => {
                        let state = PieceState { slots: slots.clone(), index };
                        prep.finish(state, value)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(value),
                }
            })
            .collect())
    }
}

impl<R, F, I, BT> FsdpBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

impl<B: burn_fusion::FusionBackend> FsdpBackend for burn_fusion::Fusion<B> {}

#[cfg(feature = "ndarray")]
impl FsdpBackend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl FsdpBackend for burn::backend::Flex {}
