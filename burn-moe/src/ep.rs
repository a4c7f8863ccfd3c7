//! Expert parallelism: a DeepSeekMoE layer whose routed experts are spread over the ranks
//! of a [`Comm`] group, each rank holding the experts of its slots in a [`Placement`]
//! (contiguous blocks, or EPLB's replicas from [`crate::eplb::rebalance`]).
//!
//! Each rank runs its own tokens through [`ExpertParallelMoe::forward`]:
//! 1. route (gate, balancing bias and the shared experts are replicated on every rank);
//!    each (token, expert) pair is sent to one physical slot of its expert, the replicas
//!    taking turns;
//! 2. exchange the per-slot counts (so every rank knows what it will receive);
//! 3. dispatch the rows into slot order, which is rank order, and all-to-all them
//!    ([`all_to_all`], FP8 with per-tile scales when `dispatch_fp8` is set);
//! 4. run the received rows through the local experts with the grouped GEMM;
//! 5. all-to-all the results back (f32) and combine them with the gate weights.
//!
//! The backward goes through Burn's autodiff, the all-to-alls reversing; each rank calls
//! `backward` on its own loss and the experts receive the gradient of every rank's
//! tokens. The replicated parameters then need [`ExpertParallelMoe::sync_grads`] (the
//! all-reduce of data parallelism, and the sum over an expert's replicas).
//!
//! Node-limited routing (each token reaches at most `topk_groups` groups of ranks) is the
//! router's group-limited routing with each expert group on its own group of ranks, as
//! [`Placement::identity`] places them when the groups divide the ranks (or the ranks
//! divide the groups); [`EpOutput::max_ranks_per_token`] reports what the step did.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_moe::comm::{launch, Comm, Transport};
//! use burn_moe::ep::ExpertParallelMoe;
//! use burn_moe::eplb::Placement;
//! use burn_moe::MoeConfig;
//!
//! let device = Default::default();
//! let moe = MoeConfig::tiny().init::<NdArray>(&device); // 16 experts
//! let placement = Placement::identity(16, 2).unwrap(); // 8 experts per rank
//! let outputs = launch(Comm::group(2, Transport::Host), |comm| {
//!     let shard = ExpertParallelMoe::shard(&moe, placement.clone(), comm.rank(), &device).unwrap();
//!     let x = Tensor::<NdArray, 3>::random([2, 8, 64], Distribution::Normal(0.0, 1.0), &device);
//!     let out = shard.forward(x, &comm).unwrap();
//!     Ok::<_, burn_moe::comm::CommError>(out.moe.output.dims())
//! })
//! .unwrap();
//! assert_eq!(outputs, [[2, 8, 64], [2, 8, 64]]);
//! ```

use crate::backend::MoeBackend;
use crate::comm::{all_reduce, all_to_all, Comm, CommBackend, CommError, RankError, Splits};
use crate::dispatch::{combine, dispatch, DispatchPlan};
use crate::eplb::{EplbError, Placement};
use crate::moe::{Moe, MoeOutput, Routed, RoutedExperts, SwiGluMlp};
use crate::router::{expert_counts, index_counts, RouterError, Routing};
use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_fp8::QuantConfig;

/// Why an expert-parallel step or shard refused.
#[derive(Clone, Debug, PartialEq)]
pub enum EpError {
    /// The placement does not fit the layer or the group.
    Placement {
        /// What is wrong, with the values.
        detail: String,
    },
    /// Routing refused (non-finite router logits).
    Router(RouterError),
    /// A collective failed (names the rank).
    Comm(CommError),
}

impl core::fmt::Display for EpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EpError::Placement { detail } => write!(f, "expert placement: {detail}"),
            EpError::Router(e) => write!(f, "routing: {e}"),
            EpError::Comm(e) => write!(f, "collective: {e}"),
        }
    }
}

impl std::error::Error for EpError {}

impl From<CommError> for EpError {
    fn from(e: CommError) -> Self {
        EpError::Comm(e)
    }
}

impl RankError for EpError {
    fn as_comm(&self) -> Option<&CommError> {
        match self {
            EpError::Comm(e) => Some(e),
            _ => None,
        }
    }
}

impl From<EplbError> for EpError {
    fn from(e: EplbError) -> Self {
        EpError::Placement { detail: e.to_string() }
    }
}

impl From<RouterError> for EpError {
    fn from(e: RouterError) -> Self {
        EpError::Router(e)
    }
}

/// One rank's part of an expert-parallel DeepSeekMoE layer. See the [module docs](self).
#[derive(Module, Debug)]
pub struct ExpertParallelMoe<B: Backend> {
    /// The layer with only this rank's experts: `moe.experts` holds the physical slots
    /// `rank · S .. (rank + 1) · S` of the placement (`S` slots per rank), in slot order;
    /// gate, bias and shared experts are full copies.
    pub moe: Moe<B>,
    /// Where every expert lives.
    #[module(skip)]
    pub placement: Placement,
    /// This rank.
    #[module(skip)]
    pub rank: usize,
    /// FP8 format of the dispatched rows (`Some(QuantConfig::activation())`: E4M3 in 1×128
    /// tiles, as DeepSeek-V3 dispatches); `None` sends f32. Results return in f32.
    #[module(skip)]
    pub dispatch_fp8: Option<QuantConfig>,
}

/// What an expert-parallel forward returns.
#[derive(Clone, Debug)]
pub struct EpOutput<B: Backend> {
    /// Output, balance loss and counts. The counts are the *global* per-expert counts (the
    /// same on every rank, for [`Moe::update_bias`]); the balance loss is this rank's
    /// share, so that the sum over ranks is the single-device loss.
    pub moe: MoeOutput<B>,
    /// Rows this rank sent to and received from each rank in the dispatch.
    pub splits: Splits,
    /// The most ranks any of this rank's tokens was sent to.
    pub max_ranks_per_token: usize,
}

impl<B: Backend> ExpertParallelMoe<B> {
    /// Rank `rank`'s shard of `moe` under `placement`, copied onto `device` through host
    /// memory. The copies are fresh leaves (each rank's autodiff graph is its own) under
    /// the source's parameter ids, so an optimizer record of a shard loads into the same
    /// shard of a later run.
    pub fn shard(moe: &Moe<B>, placement: Placement, rank: usize, device: &B::Device) -> Result<Self, EpError> {
        // A placement splits its slots evenly and places every expert (its constructors
        // check): what remains is that it is this layer's.
        let (gpus, experts) = (placement.gpus(), moe.experts.n_experts());
        let bad = |detail: String| Err(EpError::Placement { detail });
        if placement.logical_experts() != experts {
            return bad(format!("the placement is for {} experts, the layer has {experts}", placement.logical_experts()));
        }
        if rank >= gpus {
            return bad(format!("rank {rank} is outside the placement's {gpus} ranks"));
        }
        let per = placement.slots_per_gpu();
        let mine: Vec<i64> = placement.phys_to_log()[rank * per..(rank + 1) * per].iter().map(|&e| e as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(mine, [per]), &moe.experts.w_gate.device());
        let slots_of = |w: &Param<Tensor<B, 3>>| leaf(w.id, w.val().select(0, ids.clone()), w.is_require_grad(), device);
        let experts = RoutedExperts { w_gate: slots_of(&moe.experts.w_gate), w_up: slots_of(&moe.experts.w_up), w_down: slots_of(&moe.experts.w_down), fp8: moe.experts.fp8 };
        let shared = moe.shared.as_ref().map(|s| SwiGluMlp::from_projections(copy_linear(&s.gate, device), copy_linear(&s.up, device), copy_linear(&s.down, device)));
        let local = Moe {
            gate: copy_linear(&moe.gate, device),
            bias: copy(&moe.bias, device),
            experts,
            shared,
            router: moe.router,
            balance_loss_weight: moe.balance_loss_weight,
            bias_update_speed: moe.bias_update_speed,
        };
        Ok(Self { moe: local, placement, rank, dispatch_fp8: None })
    }

    /// The same shard dispatching its rows in FP8 per `config` (`None`: f32).
    pub fn with_dispatch_fp8(self, config: Option<QuantConfig>) -> Self {
        Self { dispatch_fp8: config, ..self }
    }

    /// Physical slots per rank.
    pub fn slots_per_rank(&self) -> usize {
        self.placement.slots_per_gpu()
    }
}

/// `value` as a fresh leaf parameter `id` on `device`, copied through host memory (a new
/// node: the ranks' autodiff graphs share nothing with the source module).
fn leaf<B: Backend, const D: usize>(id: ParamId, value: Tensor<B, D>, require_grad: bool, device: &B::Device) -> Param<Tensor<B, D>> {
    Param::initialized(id, Tensor::from_data(value.into_data(), device).set_require_grad(require_grad))
}

fn copy<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>, device: &B::Device) -> Param<Tensor<B, D>> {
    leaf(param.id, param.val(), param.is_require_grad(), device)
}

fn copy_linear<B: Backend>(linear: &Linear<B>, device: &B::Device) -> Linear<B> {
    Linear { weight: copy(&linear.weight, device), bias: linear.bias.as_ref().map(|b| copy(b, device)) }
}

impl<B: MoeBackend + CommBackend> ExpertParallelMoe<B> {
    /// Runs this rank's tokens `x [batch, seq, d_model]` through the layer; every rank of
    /// `comm` must call it together (any batch sizes, zero included).
    ///
    /// # Errors
    /// A group that does not match the placement, non-finite router logits, and failed
    /// or stalled ranks ([`EpError::Comm`] names them).
    pub fn forward(&self, x: Tensor<B, 3>, comm: &Comm) -> Result<EpOutput<B>, EpError> {
        if comm.world_size() != self.placement.gpus() || comm.rank() != self.rank {
            let detail = format!("shard of rank {} of {} used by rank {} of {}", self.rank, self.placement.gpus(), comm.rank(), comm.world_size());
            return Err(EpError::Placement { detail });
        }
        let [b, s, d] = x.dims();
        assert_eq!(d, self.moe.d_model(), "ExpertParallelMoe: input {:?} must have d_model = {} features", [b, s, d], self.moe.d_model());
        let device = x.device();
        let (k, per) = (self.moe.router.top_k, self.slots_per_rank());
        // A rank without tokens still serves its experts to the others.
        let routed = match b * s {
            0 => None,
            _ => Some(self.moe.route(x.clone())?),
        };
        let slots = match &routed {
            Some(input) => self.slots(input.routing.indices.clone()),
            None => Tensor::zeros([0, k], &device),
        };
        let counts = expert_counts(slots.clone(), self.placement.physical_experts());
        let (local_counts, max_ranks_per_token) = self.read_counts(counts.clone(), slots.clone());

        // Every rank's batch size and per-slot counts: the receive sizes of the dispatch.
        let all = comm.all_gather_host("ep counts", (b, local_counts.clone()))?;
        let mine = self.rank * per..(self.rank + 1) * per;
        let splits = Splits {
            send: (0..comm.world_size()).map(|r| local_counts[r * per..(r + 1) * per].iter().sum()).collect(),
            recv: all.iter().map(|(_, c)| c[mine.clone()].iter().sum()).collect(),
        };

        let plan = DispatchPlan::new(slots, counts);
        let rows = match &routed {
            Some(input) => dispatch(input.x.clone(), &plan),
            None => Tensor::zeros([0, d], &device),
        };
        // Below, every rank's output depends on both all-to-alls, whatever it sends or
        // receives, so that every rank's backward takes part in both reverse exchanges.
        let received = all_to_all(rows, &splits, comm, self.dispatch_fp8)?;

        // The received rows come by source rank, each source's rows by slot: regroup them
        // by local expert for the grouped GEMM, and back.
        let (local_experts, local_counts) = local_layout(&all, mine);
        let m = local_experts.len();
        let local_plan = DispatchPlan::new(Tensor::from_data(TensorData::new(local_experts, [m, 1]), &device), Tensor::from_data(TensorData::new(local_counts, [per]), &device));
        let back = match m {
            0 => received,
            _ => {
                let hidden = self.moe.experts.forward(dispatch(received, &local_plan), &local_plan);
                combine(hidden, Tensor::ones([m, 1], &device), &local_plan)
            }
        };
        let returned = all_to_all(back, &splits.reversed(), comm, None)?;

        let mut global = vec![0i64; self.moe.router.n_experts];
        for (_, c) in &all {
            for (p, &n) in c.iter().enumerate() {
                global[self.placement.phys_to_log()[p]] += n as i64;
            }
        }
        let counts = Tensor::from_data(TensorData::new(global, [self.moe.router.n_experts]), &device);
        let mut out = match routed {
            Some(input) => {
                let output = combine(returned, input.routing.weights.clone(), &plan);
                let routing = Routing { counts, ..input.routing };
                self.moe.finish(Routed { routing, ..input }, output, [b, s])
            }
            None => MoeOutput { output: returned.reshape([b, s, d]), counts, ..self.moe.empty(&x) },
        };
        let batches: usize = all.iter().map(|(b, _)| b).sum();
        out.balance_loss = out.balance_loss.map(|l| if batches == 0 { l } else { l * (b as f64 / batches as f64) });
        Ok(EpOutput { moe: out, splits, max_ranks_per_token })
    }
}

impl<B: MoeBackend + CommBackend> ExpertParallelMoe<B> {
    /// The whole layer again, on every rank: each logical expert's weights all-gathered
    /// from the rank of its first replica, the replicated parameters this rank's copies
    /// (parameter ids kept). Every rank of the group must call it (checkpoints, and
    /// inference on one device after expert-parallel training).
    pub fn gather(&self, comm: &Comm) -> Result<Moe<B>, EpError> {
        let p = &self.placement;
        if comm.world_size() != p.gpus() {
            return Err(EpError::Placement { detail: format!("a group of {} ranks gathers a placement over {}", comm.world_size(), p.gpus()) });
        }
        let first: Vec<i64> = p.log_to_phys().iter().map(|r| r[0] as i64).collect();
        let device = self.moe.experts.w_gate.device();
        let first = Tensor::<B, 1, Int>::from_data(TensorData::new(first, [p.logical_experts()]), &device);
        let whole = |w: &Param<Tensor<B, 3>>| -> Result<Param<Tensor<B, 3>>, EpError> {
            let all = crate::comm::all_gather(w.val().detach(), comm)?; // [slots, p, q]
            Ok(Param::initialized(w.id, all.select(0, first.clone()).detach().set_require_grad(w.is_require_grad())))
        };
        let experts =
            RoutedExperts { w_gate: whole(&self.moe.experts.w_gate)?, w_up: whole(&self.moe.experts.w_up)?, w_down: whole(&self.moe.experts.w_down)?, fp8: self.moe.experts.fp8 };
        Ok(Moe { experts, ..self.moe.clone() })
    }

    /// The physical slot of each (token, expert) pair, on the device: the replicas of an
    /// expert take turns by token index plus this rank ([`Placement::route`]'s rule).
    ///
    /// # Shapes
    /// - indices: `[T, k]` logical experts → `[T, k]` slots
    fn slots(&self, indices: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        let [t, k] = indices.dims();
        let device = indices.device();
        let p = &self.placement;
        let width = p.replicas().iter().copied().max().unwrap_or(1);
        // `table[e · width + j]`: replica j of expert e (j < replicas[e]).
        let table: Vec<i64> = p.log_to_phys().iter().flat_map(|r| (0..width).map(move |j| r[j % r.len()] as i64)).collect();
        let table = Tensor::<B, 1, Int>::from_data(TensorData::new(table, [p.logical_experts() * width]), &device);
        let experts = indices.reshape([t * k]);
        let turn = if width == 1 {
            Tensor::zeros([t * k], &device)
        } else {
            let replicas = Tensor::<B, 1, Int>::from_data(TensorData::new(p.replicas().iter().map(|&r| r as i64).collect(), [p.logical_experts()]), &device);
            let token = Tensor::<B, 1, Int>::arange(self.rank as i64..(t + self.rank) as i64, &device).reshape([t, 1]).expand([t, k]).reshape([t * k]);
            token.remainder(replicas.select(0, experts.clone()))
        };
        table.select(0, experts * width as i64 + turn).reshape([t, k])
    }

    /// The per-slot counts and the most ranks any token reaches, read to the host in one
    /// transfer (the dispatch's receive sizes need them there).
    fn read_counts(&self, counts: Tensor<B, 1, Int>, slots: Tensor<B, 2, Int>) -> (Vec<usize>, usize) {
        let [t, _] = slots.dims();
        let ranks = self.placement.gpus();
        let most = match t {
            0 => Tensor::zeros([1], &counts.device()),
            _ => index_counts(slots.div_scalar(self.slots_per_rank() as i64), ranks).greater_elem(0).int().sum_dim(1).max().reshape([1]),
        };
        let host: Vec<i64> = Tensor::cat(vec![counts, most], 0).into_data().convert::<i64>().to_vec().expect("integer counts");
        let (counts, most) = host.split_at(host.len() - 1);
        (counts.iter().map(|&c| c as usize).collect(), most[0] as usize)
    }
}

/// The local expert of each received row (source-major, slot-minor) and the rows per
/// local expert.
fn local_layout(all: &[(usize, Vec<usize>)], mine: std::ops::Range<usize>) -> (Vec<i64>, Vec<i64>) {
    let mut experts = Vec::new();
    let mut counts = vec![0i64; mine.len()];
    for (_, c) in all {
        for (e, &n) in c[mine.clone()].iter().enumerate() {
            experts.extend(std::iter::repeat_n(e as i64, n));
            counts[e] += n as i64;
        }
    }
    (experts, counts)
}

impl<B: AutodiffBackend> ExpertParallelMoe<B>
where
    B::InnerBackend: MoeBackend + CommBackend,
{
    /// Makes the gradients of one step those of the whole layer: the replicated
    /// parameters (gate, shared experts) all-reduced over the ranks, and each expert's
    /// gradient summed over its replicas (EPLB), so every copy takes the same optimizer
    /// step. Every rank must call it after its `backward`.
    pub fn sync_grads(&self, mut grads: GradientsParams, comm: &Comm) -> Result<GradientsParams, EpError> {
        let mut replicated: Vec<(ParamId, [usize; 2], B::Device)> = Vec::new();
        let mut push = |p: &Param<Tensor<B, 2>>| replicated.push((p.id, p.dims(), p.device()));
        push(&self.moe.gate.weight);
        if let Some(shared) = &self.moe.shared {
            [&shared.gate, &shared.up, &shared.down].into_iter().for_each(|l| push(&l.weight));
        }
        for (id, dims, device) in replicated {
            let g = grads.remove::<B::InnerBackend, 2>(id).unwrap_or_else(|| Tensor::zeros(dims, &device));
            grads.register::<B::InnerBackend, 2>(id, all_reduce(g, comm)?);
        }
        if self.placement.replicas().iter().any(|&r| r > 1) {
            let experts = &self.moe.experts;
            for w in [&experts.w_gate, &experts.w_up, &experts.w_down] {
                let g = grads.remove::<B::InnerBackend, 3>(w.id).unwrap_or_else(|| Tensor::zeros(w.dims(), &w.device()));
                grads.register::<B::InnerBackend, 3>(w.id, self.sum_replicas(g, comm)?);
            }
        }
        Ok(grads)
    }

    /// `g [S, ..]` of this rank's slots → each slot's sum over the slots of its expert.
    fn sum_replicas(&self, g: Tensor<B::InnerBackend, 3>, comm: &Comm) -> Result<Tensor<B::InnerBackend, 3>, EpError> {
        let [per, p, q] = g.dims();
        let device = g.device();
        let all = crate::comm::all_gather(g.reshape([per, p * q]), comm)?; // [slots, p·q]
        let slots = self.placement.physical_experts();
        let mine = &self.placement.phys_to_log()[self.rank * per..(self.rank + 1) * per];
        let same: Vec<f32> = mine.iter().flat_map(|&e| self.placement.phys_to_log().iter().map(move |&f| if f == e { 1.0 } else { 0.0 })).collect();
        let same = Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(same, [per, slots]), &device);
        Ok(same.matmul(all).reshape([per, p, q]))
    }
}
