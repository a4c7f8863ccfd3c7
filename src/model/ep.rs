//! The model under expert parallelism: every MoE layer's routed experts spread over the
//! ranks of a [`Comm`] group ([`ExpertParallelMoe`]), everything else replicated, each
//! rank training on its own batch (data parallelism for the replicated parameters).
//!
//! One step on every rank: [`DeepSeekV3::try_loss`] on the rank's tokens (the MoE layers
//! exchange rows with all-to-alls), `backward`, [`DeepSeekV3::sync_grads`] (the
//! replicated gradients summed over the ranks), the optimizer step, and
//! [`DeepSeekV3::update_bias`] with the counts of the step, which are global. The sum of
//! the ranks' objectives is the objective of the whole batch, so the ranks take exactly
//! the step one device would take on all their tokens.
//!
//! # Example
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Int, Tensor, TensorData};
//! use burn_deepseek::model::DeepSeekV3Config;
//! use burn_moe::comm::{launch, Comm, Transport};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let model = DeepSeekV3Config::tiny().init::<B>(&device); // 16 experts per MoE layer
//! let losses = launch(Comm::group(2, Transport::Host), |comm| {
//!     let rank = comm.rank();
//!     let shard = model.shard_experts(&comm, &device)?; // 8 experts per layer on this rank
//!     let ids: Vec<i64> = (0..2 * 17).map(|i| ((i * 7 + rank * 3) % 256) as i64).collect();
//!     let out = shard.try_loss(Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 17]), &device))?;
//!     let grads = GradientsParams::from_grads(out.loss.backward(), &shard);
//!     let _grads = shard.sync_grads(grads)?; // then the optimizer step and update_bias
//!     let whole = shard.unshard_experts()?; // all 16 experts again, e.g. for a checkpoint
//!     assert_eq!(whole.moe_layers().count(), 3);
//!     Ok::<_, burn_moe::ep::EpError>(out.lm_loss.into_scalar())
//! })
//! .unwrap();
//! assert_eq!(losses.len(), 2);
//! ```

use super::block::{Block, Ffn};
use super::mtp::MtpModule;
use super::DeepSeekV3;
use super::ModelBackend;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use burn_dp::layout::{put_grads, take_grads, Layout};
use burn_dualpipe::executor::copy_to_device;
use burn_moe::comm::Comm;
use burn_moe::ep::{EpError, ExpertParallelMoe};
use burn_moe::eplb::Placement;
use std::collections::HashSet;

/// `block` on `device` with its MoE layer's experts sharded over `comm`
/// ([`Placement::identity`]); a dense block copied.
pub(crate) fn shard_block<B: Backend>(block: &Block<B>, comm: &Comm, device: &B::Device) -> Result<Block<B>, EpError> {
    let ffn = match &block.ffn {
        Ffn::Moe(moe) => {
            let placement = Placement::identity(moe.experts.n_experts(), comm.world_size())?;
            Ffn::ExpertParallel(ExpertShard { layer: ExpertParallelMoe::shard(moe, placement, comm.rank(), device)?, comm: comm.clone() })
        }
        Ffn::ExpertParallel(_) => return Err(EpError::Placement { detail: "the model's experts are already sharded".into() }),
        dense => copy_to_device(dense.clone(), device),
    };
    Ok(Block {
        attn_norm: copy_to_device(block.attn_norm.clone(), device),
        attn: copy_to_device(block.attn.clone(), device),
        ffn_norm: copy_to_device(block.ffn_norm.clone(), device),
        ffn,
    })
}

/// The group of the first sharded MoE layer of `blocks`.
pub(crate) fn group_of<'a, B: Backend>(mut blocks: impl Iterator<Item = &'a Block<B>>) -> Option<&'a Comm> {
    blocks.find_map(|b| match &b.ffn {
        Ffn::ExpertParallel(shard) => Some(&shard.comm),
        _ => None,
    })
}

/// One rank's part of a MoE layer under expert parallelism, with the group it exchanges
/// rows in.
#[derive(Module, Debug)]
pub struct ExpertShard<B: Backend> {
    /// The rank's experts, and full copies of the gate, bias and shared experts.
    pub layer: ExpertParallelMoe<B>,
    /// The group (every MoE layer of a model uses the same one).
    #[module(skip)]
    pub comm: Comm,
}

impl<B: Backend> DeepSeekV3<B> {
    /// This rank's copy of the model on `device`: each MoE layer keeps the experts
    /// `rank · E / N .. (rank + 1) · E / N` of its `E` ([`Placement::identity`] over the
    /// `N` ranks of `comm`), every other parameter is a full copy. Parameter ids are
    /// kept, so optimizer records of one run load into the next run's shards.
    ///
    /// # Errors
    /// [`EpError::Placement`] when `N` does not divide a layer's experts.
    pub fn shard_experts(&self, comm: &Comm, device: &B::Device) -> Result<Self, EpError> {
        self.map_blocks(|block| shard_block(block, comm, device), Some(device))
    }

    /// The ids of every MoE layer's routed-expert weights (main and MTP blocks; under
    /// expert parallelism this rank's experts): the parameters expert parallelism splits,
    /// e.g. to shard them over the data-parallel ranks only (burn-dp's
    /// `ShardGroup::with_params`) while the dense ones shard over every rank.
    pub fn routed_expert_ids(&self) -> HashSet<ParamId> {
        let mut ids = Ids(HashSet::new());
        for block in self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)) {
            match &block.ffn {
                Ffn::Moe(moe) => moe.experts.visit(&mut ids),
                Ffn::ExpertParallel(shard) => shard.layer.moe.experts.visit(&mut ids),
                Ffn::Dense(_) => {}
            }
        }
        ids.0
    }

    /// The group the experts are sharded over; `None` for a model on one device.
    pub fn expert_group(&self) -> Option<&Comm> {
        group_of(self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)))
    }

    /// The model with `f` applied to every block (main and MTP); the other parts copied
    /// to `device` when one is given, else cloned.
    fn map_blocks<E>(&self, f: impl Fn(&Block<B>) -> Result<Block<B>, E>, device: Option<&B::Device>) -> Result<Self, E> {
        fn part<B: Backend, M: Module<B>>(m: &M, device: Option<&B::Device>) -> M {
            match device {
                Some(device) => copy_to_device(m.clone(), device),
                None => m.clone(),
            }
        }
        let layers = self.layers.iter().map(&f).collect::<Result<Vec<_>, E>>()?;
        let mtp = self
            .mtp
            .iter()
            .map(|m| {
                Ok(MtpModule { hnorm: part(&m.hnorm, device), enorm: part(&m.enorm, device), eh_proj: part(&m.eh_proj, device), block: f(&m.block)?, norm: part(&m.norm, device) })
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Self { embed: part(&self.embed, device), layers, norm: part(&self.norm, device), head: part(&self.head, device), mtp, mtp_loss_weight: self.mtp_loss_weight })
    }
}

impl<B: ModelBackend> DeepSeekV3<B> {
    /// The whole model again on every rank (each layer's experts all-gathered, see
    /// [`ExpertParallelMoe::gather`]); the model itself when it is not sharded. Every rank
    /// must call it.
    pub fn unshard_experts(&self) -> Result<Self, EpError> {
        self.map_blocks(unshard_block, None)
    }
}

/// `block` with its sharded MoE layer's experts all-gathered (collective over its group).
pub(crate) fn unshard_block<B: ModelBackend>(block: &Block<B>) -> Result<Block<B>, EpError> {
    let ffn = match &block.ffn {
        Ffn::ExpertParallel(shard) => Ffn::Moe(shard.layer.gather(&shard.comm)?),
        other => other.clone(),
    };
    Ok(Block { ffn, ..block.clone() })
}

impl<B: AutodiffBackend> DeepSeekV3<B>
where
    B::InnerBackend: ModelBackend,
{
    /// Makes one step's gradients those of the whole batch on every rank: each MoE layer's
    /// replicated parameters through [`ExpertParallelMoe::sync_grads`], every other
    /// trainable parameter summed over the ranks in one all-reduce of all of them
    /// flattened together. Every rank must call it after its `backward`; a model on one
    /// device gets its gradients back unchanged.
    pub fn sync_grads(&self, grads: GradientsParams) -> Result<GradientsParams, EpError> {
        sync_grads(self, self.expert_group(), self.layers.iter().chain(self.mtp.iter().map(|m| &m.block)), grads)
    }
}

/// The gradient sync of a module whose MoE `blocks` may be sharded over `group`: each
/// sharded layer's replicated parameters through [`ExpertParallelMoe::sync_grads`], every
/// other trainable parameter of `module` summed over the group in one all-reduce of all
/// of them flattened together (burn-dp's reduce-scatter + all-gather). Unchanged without a group.
pub(crate) fn sync_grads<'a, B, M>(module: &M, group: Option<&Comm>, blocks: impl Iterator<Item = &'a Block<B>>, mut grads: GradientsParams) -> Result<GradientsParams, EpError>
where
    B: AutodiffBackend,
    B::InnerBackend: ModelBackend,
    M: Module<B>,
{
    let Some(comm) = group else { return Ok(grads) };
    let mut layer_params = Ids(HashSet::new());
    for block in blocks {
        if let Ffn::ExpertParallel(shard) = &block.ffn {
            grads = shard.layer.sync_grads(grads, comm)?;
            shard.visit(&mut layer_params);
        }
    }
    let layout = Layout::of::<B, M>(module).without(&layer_params.0);
    if layout.is_empty() {
        return Ok(grads);
    }
    let flat = take_grads(module, &layout, 0..layout.len(), &mut grads);
    let summed = burn_dp::collective::all_reduce(flat, comm)?;
    put_grads(&layout, 0..layout.len(), summed, &mut grads);
    Ok(grads)
}

/// Collects the ids of the trainable float parameters it visits.
pub(crate) struct Ids(pub HashSet<ParamId>);

impl<B: Backend> ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.is_require_grad() {
            self.0.insert(param.id);
        }
    }
}
