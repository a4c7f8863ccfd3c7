//! Distributed checkpoints of a [`DeepSeekV3`] run in any of its parallel layouts, on
//! [`burn_dcp`]: every rank saves what it holds, any world size and layout loads it.
//!
//! A rank's holdings are mapped to chunks of global tensors named by the model's Hugging
//! Face keys ([`StateNames`]):
//!
//! | holding | chunks |
//! |---|---|
//! | a replicated parameter (one device, DDP, ZeRO-1, a pipeline stage's) | the whole tensor |
//! | a stack of routed experts under expert parallelism | the rank's experts: a dim-0 slice |
//! | an FSDP/HSDP shard ([`burn_dp::Fsdp`]) | the runs of each parameter inside the shard |
//! | AdamW's moments (`{name}.exp_avg`, `{name}.exp_avg_sq`) and step count (`{name}.step`) | as their parameter, in the stored dtype (BF16 or f32) |
//!
//! so a checkpoint names each tensor once whatever the layout that wrote it, and a load
//! reads the runs the new layout holds. Tensors are stored in this crate's layout, not
//! Hugging Face's: linear weights `[in, out]` (Hugging Face: `[out, in]`), the routed
//! experts one `[E, in, out]` stack per projection (`…mlp.experts.gate_proj.weight`),
//! the rotary columns of `q_b_proj`/`kv_a_proj_with_mqa` in halves. For Hugging Face's
//! files, load into one process and write them with
//! [`save_safetensors`](crate::hf::weights::save_safetensors).
//!
//! Loading is all-or-nothing: every value is read (and checksummed) before the module
//! or the optimizer changes, so an error leaves them as they were.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn_comm::{Comm, Transport};
//! use burn_dcp::{Checkpointer, Reader, Snapshot};
//! use burn_deepseek::checkpoint::{Holding, StateNames};
//! use burn_deepseek::model::DeepSeekV3Config;
//!
//! let device = Default::default();
//! let config = DeepSeekV3Config::tiny();
//! let model = config.init::<NdArray>(&device);
//! let names = StateNames::of(&model, &config).unwrap();
//! let holding = Holding::new(&names);
//! let root = std::env::temp_dir().join(format!("burn-deepseek-doc-ckpt-{}", std::process::id()));
//! let comm = Comm::group(1, Transport::Host).remove(0);
//! let mut snapshot = Snapshot::new();
//! snapshot.chunks = holding.module_chunks(&model).unwrap();
//! Checkpointer::new(&root, &comm).unwrap().save(1, snapshot).unwrap();
//!
//! // Another model of the same config takes the saved values.
//! let other = config.init::<NdArray>(&device);
//! let names = StateNames::of(&other, &config).unwrap();
//! let reader = Reader::latest(&root).unwrap().unwrap();
//! let other = Holding::new(&names).load_module(&other, &reader).unwrap();
//! assert_eq!(other.embed.weight.val().into_data(), model.embed.weight.val().into_data());
//! # std::fs::remove_dir_all(&root).unwrap();
//! ```

mod optim;
mod params;

pub use optim::{AdamWRecord, EXP_AVG, EXP_AVG_SQ, STEP};

use crate::model::{DeepSeekV3, DeepSeekV3Config};
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn_dcp::DcpError;
use std::collections::HashMap;

/// Why a model's state could not be mapped to a checkpoint or back.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckpointError {
    /// Saving or reading the checkpoint failed.
    Dcp(DcpError),
    /// A parameter has no global name: it is not one of the model's the names were
    /// taken from ([`StateNames::of`] takes the whole model before it is sharded).
    Unnamed {
        /// The parameter's path in the module tree.
        param: String,
    },
    /// What a rank holds of a tensor does not fit the layout.
    Layout {
        /// The tensor.
        tensor: String,
        /// What does not fit.
        detail: String,
    },
}

impl core::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Dcp(e) => write!(f, "{e}"),
            Self::Unnamed { param } => write!(f, "parameter {param} is not one of the model's StateNames (take them from the whole model before sharding it)"),
            Self::Layout { tensor, detail } => write!(f, "tensor {tensor:?}: {detail}"),
        }
    }
}

impl std::error::Error for CheckpointError {}

impl From<DcpError> for CheckpointError {
    fn from(e: DcpError) -> Self {
        Self::Dcp(e)
    }
}

/// A tensor's global name and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    /// The Hugging Face key.
    pub name: String,
    /// The whole tensor's shape (every expert, on one device).
    pub shape: Vec<usize>,
}

/// Every float parameter of a model (trainable or not, e.g. the balancing bias) by id:
/// its Hugging Face key and whole shape. Ids survive expert sharding, FSDP and cutting
/// into pipeline stages, so one table names the parameters of every layout built from
/// that model.
#[derive(Clone, Debug, Default)]
pub struct StateNames {
    by_id: HashMap<ParamId, Named>,
}

impl StateNames {
    /// The names of `model`'s parameters; `model` is whole (not expert-sharded) and
    /// `config` the one it was built with.
    ///
    /// # Errors
    /// [`CheckpointError::Unnamed`] for a parameter without a Hugging Face key.
    pub fn of<B: Backend>(model: &DeepSeekV3<B>, config: &DeepSeekV3Config) -> Result<Self, CheckpointError> {
        let mut by_id = HashMap::new();
        for p in params::list(model, &Default::default(), false) {
            let name = crate::hf::weights::checkpoint_key(&p.path, config).ok_or_else(|| CheckpointError::Unnamed { param: p.path.join(".") })?;
            by_id.insert(p.id, Named { name, shape: p.shape });
        }
        Ok(StateNames { by_id })
    }

    /// Parameter `id`'s name and whole shape.
    pub fn get(&self, id: &ParamId) -> Option<&Named> {
        self.by_id.get(id)
    }

    /// Parameters named.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no parameter is named.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// How one rank holds the model's tensors: the names, and its place in the
/// expert-parallel group (rank `r` of `n` holds experts `r·E/n .. (r+1)·E/n` of each
/// stack: burn-moe's identity placement).
#[derive(Clone, Copy, Debug)]
pub struct Holding<'a> {
    /// The global names.
    pub names: &'a StateNames,
    /// `(rank, ranks)` in the expert-parallel group; `None` when the experts are whole.
    pub ep: Option<(usize, usize)>,
}

impl<'a> Holding<'a> {
    /// Holding whole tensors (no expert parallelism).
    pub fn new(names: &'a StateNames) -> Self {
        Holding { names, ep: None }
    }

    /// Rank `rank` of `ranks` of the expert-parallel group.
    pub fn with_ep(mut self, rank: usize, ranks: usize) -> Self {
        self.ep = (ranks > 1).then_some((rank, ranks));
        self
    }

    /// The name, whole shape and first element of the part of parameter `id` this
    /// rank holds as `local` (its shape here).
    fn place(&self, id: &ParamId, local: &[usize], path: impl FnOnce() -> String) -> Result<(&'a Named, usize), CheckpointError> {
        let named = self.names.get(id).ok_or_else(|| CheckpointError::Unnamed { param: path() })?;
        if local == named.shape.as_slice() {
            return Ok((named, 0));
        }
        let numel: usize = local.iter().product();
        match self.ep {
            Some((r, n)) if local.len() == named.shape.len() && local[1..] == named.shape[1..] && local[0] * n == named.shape[0] => Ok((named, r * numel)),
            _ => Err(CheckpointError::Layout {
                tensor: named.name.clone(),
                detail: format!("held as {local:?} of {:?}, which is neither whole nor this rank's expert slice (expert parallelism {:?})", named.shape, self.ep),
            }),
        }
    }
}
