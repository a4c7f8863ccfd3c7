//! The model's units — embedding, final norm, head, each block, each MTP module — and
//! where its forward gets them: as they are ([`Held`]), or all-gathered just before
//! their use under FSDP (a burn-dp [`Fsdp`] whose shard groups are the units, from
//! [`DeepSeekV3::fsdp_units`]), so that one gathered block is whole at a time.
//!
//! # Example
//! FSDP over 2 ranks with one shard group per unit:
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::module::Module;
//! use burn::tensor::{Int, Tensor, TensorData};
//! use burn_comm::{launch, Comm, Transport};
//! use burn_deepseek::model::{DeepSeekV3Config, UnitError};
//! use burn_dp::{Fsdp, ShardGroup};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let model = DeepSeekV3Config::tiny().init::<B>(&device).fork(&device);
//! let losses = launch(Comm::group(2, Transport::Host), |comm| {
//!     let model = model.clone().fork(&device);
//!     let groups = model
//!         .fsdp_units()
//!         .into_iter()
//!         .map(|unit| ShardGroup::new(comm.clone()).with_params(unit.params))
//!         .collect();
//!     let fsdp = Fsdp::grouped(model, groups)?;
//!     let ids: Vec<i64> = (0..2 * 17).map(|i| ((i * 7 + comm.rank() * 3) % 256) as i64).collect();
//!     let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 17]), &device);
//!     // Each block gathered just before its forward, dropped after it.
//!     let out = fsdp.hollow().try_loss_units(tokens, &fsdp)?;
//!     Ok::<_, UnitError>(out.lm_loss.into_scalar())
//! })
//! .unwrap();
//! assert_eq!(losses.len(), 2);
//! ```

use super::ep::Ids;
use super::DeepSeekV3;
use burn::module::{Module, ParamId};
use burn::tensor::backend::Backend;
use burn_comm::{CommError, RankError};
use burn_dp::{DpError, Fsdp, FsdpBackend};
use burn_moe::ep::EpError;
use std::borrow::Cow;
use std::collections::HashSet;

/// Where the model's forward gets each unit just before it uses it.
pub trait Units<B: Backend> {
    /// Why a unit could not be had (and the model's own errors).
    type Error: From<EpError>;

    /// `part` (a unit of the model running the forward) ready for a forward.
    fn unit<'a, M: Module<B>>(&self, part: &'a M) -> Result<Cow<'a, M>, Self::Error>;
}

/// The units as the model holds them (one device, expert parallelism).
#[derive(Clone, Copy, Debug, Default)]
pub struct Held;

impl<B: Backend> Units<B> for Held {
    type Error = EpError;

    fn unit<'a, M: Module<B>>(&self, part: &'a M) -> Result<Cow<'a, M>, EpError> {
        Ok(Cow::Borrowed(part))
    }
}

/// Each unit all-gathered from the shards ([`Fsdp::gather_part`]) when the forward
/// reaches it: the model is the Fsdp's [`Fsdp::hollow`] module.
impl<B: FsdpBackend, M: Module<B>> Units<B> for Fsdp<B, M> {
    type Error = UnitError;

    fn unit<'a, N: Module<B>>(&self, part: &'a N) -> Result<Cow<'a, N>, UnitError> {
        Ok(Cow::Owned(self.gather_part(part)?))
    }
}

/// Why a forward through gathered units failed.
#[derive(Clone, Debug, PartialEq)]
pub enum UnitError {
    /// A unit's gather.
    Dp(DpError),
    /// The model's expert-parallel step.
    Ep(EpError),
}

impl core::fmt::Display for UnitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            UnitError::Dp(e) => write!(f, "{e}"),
            UnitError::Ep(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UnitError {}

impl From<DpError> for UnitError {
    fn from(e: DpError) -> Self {
        UnitError::Dp(e)
    }
}

impl From<EpError> for UnitError {
    fn from(e: EpError) -> Self {
        UnitError::Ep(e)
    }
}

impl From<CommError> for UnitError {
    fn from(e: CommError) -> Self {
        UnitError::Dp(DpError::Comm(e))
    }
}

impl RankError for UnitError {
    fn as_comm(&self) -> Option<&CommError> {
        match self {
            UnitError::Dp(e) => e.as_comm(),
            UnitError::Ep(e) => e.as_comm(),
        }
    }
}

/// One unit's trainable parameters (see [`DeepSeekV3::fsdp_units`]).
#[derive(Clone, Debug)]
pub struct Unit {
    /// Where it is in the model: `embed`, `norm`, `head`, `layers.{l}`, `mtp.{k}`, and
    /// `layers.{l}.experts` / `mtp.{k}.experts` for the routed experts split out.
    pub name: String,
    /// Its trainable parameters.
    pub params: HashSet<ParamId>,
    /// Whether these are routed experts (sharded by expert parallelism already: their
    /// FSDP group is the data-parallel ranks only).
    pub experts: bool,
}

impl<B: Backend> DeepSeekV3<B> {
    /// The units the forward uses one at a time, with their trainable parameters, in
    /// the forward's order: the embedding, each block, the final norm, the head, each MTP
    /// module. Each MoE layer's routed experts are a unit of their own after their
    /// block's (`experts`), so that expert parallelism can shard them over other ranks
    /// than the dense parameters. Together they hold every trainable parameter once.
    pub fn fsdp_units(&self) -> Vec<Unit> {
        let experts = self.routed_expert_ids();
        let mut units = Vec::new();
        let mut push = |name: String, part: &dyn Fn(&mut Ids)| {
            let mut ids = Ids(HashSet::new());
            part(&mut ids);
            let (routed, dense): (HashSet<_>, HashSet<_>) = ids.0.into_iter().partition(|id| experts.contains(id));
            for (params, is_experts, name) in [(dense, false, name.clone()), (routed, true, format!("{name}.experts"))] {
                if !params.is_empty() {
                    units.push(Unit { name, params, experts: is_experts });
                }
            }
        };
        push("embed".into(), &|v| self.embed.visit(v));
        for (l, block) in self.layers.iter().enumerate() {
            push(format!("layers.{l}"), &|v| block.visit(v));
        }
        push("norm".into(), &|v| self.norm.visit(v));
        push("head".into(), &|v| self.head.visit(v));
        for (k, module) in self.mtp.iter().enumerate() {
            push(format!("mtp.{k}"), &|v| module.visit(v));
        }
        units
    }
}
