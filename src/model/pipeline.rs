//! The model cut into pipeline stages for burn-dualpipe's executor (DualPipe, DualPipeV,
//! 1F1B, ZB1P over several Burn devices).
//!
//! [`DeepSeekV3::into_stages`] cuts the model into `n` consecutive [`ModelStage`]s: the
//! first holds the embedding, the last the final norm, the head and the MTP modules
//! (under DualPipeV both sit on rank 0, as in DeepSeek-V3's deployment), and the blocks
//! are spread as evenly as the cut allows, the tail counting as one block.
//! [`DeepSeekV3::from_stages`] puts the stages back together (for evaluation, sampling or a
//! checkpoint); parameter ids are kept both ways, so optimizer state carries over.
//!
//! The executor passes one tensor between stages. The first stage reads the token ids as
//! f32 `[B, S, 1]` ([`StageObjective::input`]; exact below 2²⁴); between stages the
//! tensor is `[B, 2S + 1, d]` (`[B, S + 1, d]` without MTP): rows `0..S` the hidden
//! state, rows `S..2S` the token embeddings that the MTP modules read (carried from the
//! embedding to the tail, so the embedding's gradient comes back through the pipeline),
//! and element `[0, 2S, 0]` the running sum of the MoE layers' balance losses (each stage
//! adds its own, and the objective adds the sum, so each layer's balance loss reaches its
//! parameters through the stages' backward). The last stage returns `[B, R, vocab]`: the
//! next-token logits (`S` rows), each MTP depth's logits (`S − k` rows) and the balance
//! loss row; [`StageObjective::loss`] turns it into the training objective, the same as
//! [`DeepSeekV3::loss`] on the micro-batch.
//!
//! Each stage records its MoE layers' expert counts as it runs;
//! [`ModelStage::take_counts`] gives the step's counts (the executor recomputes a stage's
//! forward in its backward: the records are divided by the forwards per micro-batch) and
//! [`ModelStage::update_bias`] applies the balancing update after the optimizer step.
//!
//! # Example
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::optim::{AdamConfig, Optimizer};
//! use burn::tensor::{Int, Tensor, TensorData};
//! use burn_deepseek::dualpipe::executor::Pipeline;
//! use burn_deepseek::dualpipe::schedule::{Schedule, ScheduleKind};
//! use burn_deepseek::model::DeepSeekV3Config;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let model = DeepSeekV3Config::tiny().init::<B>(&device); // 3 blocks + the tail: 4 stages
//! let schedule = Schedule::new(ScheduleKind::DualPipeV, 2, 4).unwrap(); // 2 ranks, 4 micro-batches
//! let staged = model.into_stages(schedule.stages()).unwrap();
//! let objective = staged.objective;
//! let mut pipeline = Pipeline::new(staged.stages, vec![device; 2], schedule).unwrap();
//!
//! // Four micro-batches of two 17-token rows.
//! let rows: Vec<TensorData> = (0..4).map(|m| TensorData::new((0..34).map(|i| ((i * 5 + m * 11) % 256) as i64).collect::<Vec<_>>(), [2, 17])).collect();
//! let inputs = rows.iter().map(|t| objective.input(Tensor::<B, 2, Int>::from_data(t.clone(), &device))).collect();
//! let out = pipeline
//!     .step(inputs, |y, m| objective.loss(y.clone(), Tensor::from_data(rows[m].clone(), &y.device())).loss)
//!     .unwrap();
//! assert!(out.loss > 0.0);
//! let counts: Vec<_> = pipeline.stages().iter().map(|s| s.take_counts(4)).collect();
//! let mut optim = AdamConfig::new().init();
//! pipeline.optimize(&mut optim, 1e-3, out.grads);
//! pipeline.map_stages(|s, stage| stage.update_bias(&counts[s]));
//! let model = burn_deepseek::model::DeepSeekV3::from_stages(pipeline.into_stages());
//! assert_eq!(model.moe_layers().count(), 3);
//! ```

use super::block::{run_blocks, Block};
use super::ep::{group_of, shard_block, sync_grads, unshard_block};
use super::mtp::{run_depths, MtpModule};
use super::units::Held;
use super::ModelBackend;
use super::{add, cross_entropy, language_objective, DeepSeekV3};
use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_dualpipe::executor::{copy_to_device, PipelineStage};
use burn_moe::comm::Comm;
use burn_moe::ep::EpError;
use core::fmt;
use std::any::Any;
use std::sync::{Arc, Mutex};

/// Why [`DeepSeekV3::into_stages`] cannot cut the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// Every stage needs at least one block or the tail: `1..=layers + 1` stages.
    Stages {
        /// The stages asked for.
        stages: usize,
        /// The model's blocks.
        layers: usize,
    },
    /// The model's experts are sharded over a `Comm` group; cut the whole model, then
    /// shard each stage ([`ModelStage::shard_experts`]).
    ShardedExperts,
    /// Token ids travel as f32 to the first stage: the vocabulary must stay below 2²⁴.
    Vocab {
        /// The vocabulary size.
        vocab: usize,
    },
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitError::Stages { stages, layers } => {
                write!(f, "cannot cut a model of {layers} blocks and the head/MTP tail into {stages} stages: 1 to {} stages, each with a block or the tail", layers + 1)
            }
            SplitError::ShardedExperts => {
                f.write_str("the model's experts are sharded over a Comm group (unshard_experts first, cut, then shard each stage with ModelStage::shard_experts)")
            }
            SplitError::Vocab { vocab } => write!(f, "a vocabulary of {vocab} ids is not exact in f32, the first stage's input (at most 2^24)"),
        }
    }
}

impl std::error::Error for SplitError {}

/// The final norm, the output head and the MTP modules: the last stage's tail.
#[derive(Module, Debug)]
pub struct StageTail<B: Backend> {
    /// The final RMSNorm.
    pub norm: RmsNorm<B>,
    /// The output head `[d_model, vocab]`, shared by the MTP modules.
    pub head: Linear<B>,
    /// The MTP modules, depth 1 first.
    pub mtp: Vec<MtpModule<B>>,
}

/// Each MoE layer's counts summed on the device (one sum per device the stage's copies
/// ran on) and the forwards recorded; shared by a stage's copies. Nothing is read to the
/// host until [`ModelStage::take_counts`]. The sums are `Tensor<B, 1, Int>` behind `Any`:
/// a skipped field of a Burn module cannot be generic over the backend.
#[derive(Clone, Debug, Default)]
struct CountLog(Arc<Mutex<Vec<LayerCounts>>>);

#[derive(Debug, Default)]
struct LayerCounts {
    sums: Vec<Box<dyn Any + Send>>,
    calls: usize,
}

impl CountLog {
    fn record<B: Backend>(&self, counts: Vec<Tensor<B, 1, Int>>) {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        log.resize_with(counts.len(), LayerCounts::default);
        for (layer, c) in log.iter_mut().zip(counts) {
            layer.calls += 1;
            let device = c.device();
            let same = layer.sums.iter_mut().filter_map(|s| s.downcast_mut::<Tensor<B, 1, Int>>()).find(|s| s.device() == device);
            match same {
                Some(sum) => *sum = sum.clone() + c,
                None => layer.sums.push(Box::new(c)),
            }
        }
    }

    /// Each layer's counts over the recorded forwards, on the host, and the forwards.
    fn take<B: Backend>(&self) -> Vec<(Vec<i64>, usize)> {
        let log = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        log.into_iter()
            .map(|layer| {
                let mut total: Vec<i64> = Vec::new();
                for sum in layer.sums {
                    let sum = sum.downcast::<Tensor<B, 1, Int>>().expect("a stage records the counts of its own backend");
                    let sum: Vec<i64> = sum.into_data().convert::<i64>().to_vec().expect("i64 counts");
                    total.resize(sum.len(), 0);
                    total.iter_mut().zip(sum).for_each(|(t, c)| *t += c);
                }
                (total, layer.calls)
            })
            .collect()
    }
}

/// A consecutive part of the model; see the [module docs](self).
#[derive(Module, Debug)]
pub struct ModelStage<B: Backend> {
    /// The token embedding (first stage only).
    pub embed: Option<Embedding<B>>,
    /// The stage's blocks.
    pub layers: Vec<Block<B>>,
    /// The final norm, head and MTP modules (last stage only).
    pub tail: Option<StageTail<B>>,
    /// The MTP depth of the model (the layout of the tensor between stages).
    #[module(skip)]
    mtp_depth: usize,
    /// `λ`, the MTP loss weight.
    #[module(skip)]
    mtp_loss_weight: f64,
    #[module(skip)]
    log: CountLog,
    /// The expert-parallel group of a sharded stage ([`ModelStage::shard_experts`]): its
    /// replicated gradients are summed over it, also in a stage without MoE layers.
    #[module(skip)]
    group: Option<Comm>,
}

/// What [`DeepSeekV3::into_stages`] gives: the stages and the objective that reads the
/// last one's output.
#[derive(Debug)]
pub struct StagedModel<B: Backend> {
    /// The stages, first to last.
    pub stages: Vec<ModelStage<B>>,
    /// The first stage's input and the loss of the last stage's output.
    pub objective: StageObjective,
}

/// Turns training tokens into the first stage's input and the last stage's output into
/// the training objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageObjective {
    /// The model's MTP depth `D`.
    pub mtp_depth: usize,
    /// `λ`, the MTP loss weight.
    pub mtp_loss_weight: f64,
    /// `N`, the ranks the stages' experts are sharded over, each with its own
    /// micro-batches (1 without expert parallelism): the language losses are divided by
    /// it, as [`DeepSeekV3::try_loss`] does, so that the ranks' objectives add up to the
    /// objective of all their tokens.
    pub expert_ranks: usize,
}

/// [`StageObjective::loss`]'s result.
#[derive(Clone, Debug)]
pub struct StageLoss<B: Backend> {
    /// `lm_loss + λ / D · Σ mtp_losses + balance_loss`, `[1]`.
    pub loss: Tensor<B, 1>,
    /// Cross-entropy of the next-token prediction, `[1]`.
    pub lm_loss: Tensor<B, 1>,
    /// Cross-entropy of each MTP depth, `[1]`.
    pub mtp_losses: Vec<Tensor<B, 1>>,
    /// The sum of every stage's MoE balance losses, `[1]` (zero when α = 0).
    pub balance_loss: Tensor<B, 1>,
}

/// The activations between stages: see the [module docs](self) for the packing.
struct Carry<B: Backend> {
    hidden: Tensor<B, 3>,
    embedded: Option<Tensor<B, 3>>,
    aux: Tensor<B, 1>,
}

/// `[B, 1, width]`, zero but for `aux` at `[0, 0, 0]`.
fn aux_row<B: Backend>(aux: Tensor<B, 1>, b: usize, width: usize) -> Tensor<B, 3> {
    let device = aux.device();
    Tensor::zeros([b, 1, width], &device).slice_assign([0..1, 0..1, 0..1], aux.reshape([1, 1, 1]))
}

impl<B: Backend> Carry<B> {
    fn pack(self) -> Tensor<B, 3> {
        let [b, _, d] = self.hidden.dims();
        let mut rows = vec![self.hidden];
        rows.extend(self.embedded);
        rows.push(aux_row(self.aux, b, d));
        Tensor::cat(rows, 1)
    }

    fn unpack(x: Tensor<B, 3>, mtp: bool) -> Self {
        let [b, n, d] = x.dims();
        let s = if mtp { (n - 1) / 2 } else { n - 1 };
        Self { hidden: x.clone().slice([0..b, 0..s, 0..d]), embedded: mtp.then(|| x.clone().slice([0..b, s..2 * s, 0..d])), aux: x.slice([0..1, n - 1..n, 0..1]).reshape([1]) }
    }
}

impl<B: Backend> DeepSeekV3<B> {
    /// The model cut into `n` stages (see the [module docs](self)); the blocks split as
    /// evenly as they go, earlier stages taking the remainder, the tail counting as one
    /// block.
    ///
    /// # Errors
    /// [`SplitError`] for `n` outside `1..=layers + 1`, a model with sharded experts, or
    /// a vocabulary of 2²⁴ ids or more.
    pub fn into_stages(self, n: usize) -> Result<StagedModel<B>, SplitError> {
        let layers = self.layers.len();
        if n == 0 || n > layers + 1 {
            return Err(SplitError::Stages { stages: n, layers });
        }
        if self.expert_group().is_some() {
            return Err(SplitError::ShardedExperts);
        }
        let vocab = self.vocab_size();
        if vocab > 1 << 24 {
            return Err(SplitError::Vocab { vocab });
        }
        let objective = StageObjective { mtp_depth: self.mtp.len(), mtp_loss_weight: self.mtp_loss_weight, expert_ranks: 1 };
        let (units, mut blocks) = (layers + 1, self.layers.into_iter());
        let mut embed = Some(self.embed);
        let mut tail = Some(StageTail { norm: self.norm, head: self.head, mtp: self.mtp });
        let stages = (0..n)
            .map(|i| {
                let size = units / n + usize::from(i < units % n);
                let last = i + 1 == n;
                ModelStage {
                    embed: embed.take(),
                    layers: blocks.by_ref().take(size - usize::from(last)).collect(),
                    tail: if last { tail.take() } else { None },
                    mtp_depth: objective.mtp_depth,
                    mtp_loss_weight: objective.mtp_loss_weight,
                    log: CountLog::default(),
                    group: None,
                }
            })
            .collect();
        Ok(StagedModel { stages, objective })
    }

    /// The model from the stages of [`DeepSeekV3::into_stages`], first to last.
    ///
    /// # Panics
    /// When the embedding is not in the first stage only, or the tail not in the last only.
    pub fn from_stages(stages: Vec<ModelStage<B>>) -> Self {
        let n = stages.len();
        let (mut embed, mut tail, mut layers, mut weight) = (None, None, Vec::new(), 0.0);
        for (i, stage) in stages.into_iter().enumerate() {
            assert!(
                stage.embed.is_some() == (i == 0) && stage.tail.is_some() == (i + 1 == n),
                "DeepSeekV3::from_stages: stage {i} of {n} holds the embedding: {}, the tail: {}",
                stage.embed.is_some(),
                stage.tail.is_some()
            );
            embed = embed.or(stage.embed);
            tail = tail.or(stage.tail);
            layers.extend(stage.layers);
            weight = stage.mtp_loss_weight;
        }
        let (embed, tail) = (embed.expect("checked above"), tail.expect("checked above"));
        Self { embed, layers, norm: tail.norm, head: tail.head, mtp: tail.mtp, mtp_loss_weight: weight }
    }
}

impl<B: Backend> ModelStage<B> {
    /// The stage's MoE layers, in the order of [`ModelStage::take_counts`].
    fn blocks(&self) -> impl Iterator<Item = &Block<B>> + Clone {
        self.layers.iter().chain(self.tail.iter().flat_map(|t| t.mtp.iter().map(|m| &m.block)))
    }

    /// The routed tokens per expert of each of the stage's MoE layers (its blocks', then
    /// its MTP modules') over the `micro_batches` since the last call, on the stage's
    /// device; the record is cleared.
    pub fn take_counts(&self, micro_batches: usize) -> Vec<Tensor<B, 1, Int>> {
        let log = self.log.take::<B>();
        let device = self.devices().into_iter().next().expect("a stage has parameters");
        let moe = self.blocks().filter(|b| b.is_moe()).count();
        (0..moe)
            .map(|i| {
                let (sum, calls) = log.get(i).cloned().unwrap_or_default();
                // Every forward of a micro-batch routes it the same way: the record holds
                // `calls / micro_batches` copies of the step's counts.
                let counts: Vec<i64> = sum.iter().map(|&c| (c as f64 * micro_batches as f64 / calls.max(1) as f64).round() as i64).collect();
                let e = counts.len();
                Tensor::from_data(TensorData::new(counts, [e]), &device)
            })
            .collect()
    }

    /// The balancing-bias update of the stage's MoE layers, `counts` as
    /// [`ModelStage::take_counts`] gives them.
    ///
    /// # Panics
    /// When `counts` does not hold one tensor per MoE layer of the stage.
    pub fn update_bias(self, counts: &[Tensor<B, 1, Int>]) -> Self {
        let n = self.blocks().filter(|b| b.is_moe()).count();
        assert_eq!(counts.len(), n, "ModelStage::update_bias: {} count tensors for {n} MoE layers", counts.len());
        let mut counts = counts.iter().cloned();
        let layers = self.layers.into_iter().map(|b| b.update_bias(&mut counts)).collect();
        let tail = self.tail.map(|t| StageTail { mtp: t.mtp.into_iter().map(|m| MtpModule { block: m.block.update_bias(&mut counts), ..m }).collect(), ..t });
        Self { layers, tail, ..self }
    }
}

impl<B: Backend> ModelStage<B> {
    /// This rank's copy of the stage on `device` with every MoE layer's experts sharded
    /// over `comm` (as [`DeepSeekV3::shard_experts`]): pipeline and expert parallelism
    /// together. Give each stage a rank holds its own communicator (a
    /// [`Comm::split`](burn_moe::comm::Comm::split) of the expert-parallel group per
    /// stage): the executor may run two stages of a rank at once (DualPipe's overlapped
    /// pairs), and a communicator's collectives must come in one order.
    ///
    /// # Errors
    /// [`EpError::Placement`] when the group's size does not divide a layer's experts or
    /// the stage is already sharded.
    pub fn shard_experts(&self, comm: &Comm, device: &B::Device) -> Result<Self, EpError> {
        let part = |m: &Option<_>| m.clone().map(|m| copy_to_device(m, device));
        let layers = self.layers.iter().map(|b| shard_block(b, comm, device)).collect::<Result<Vec<_>, _>>()?;
        let tail = match &self.tail {
            None => None,
            Some(t) => Some(StageTail {
                norm: copy_to_device(t.norm.clone(), device),
                head: copy_to_device(t.head.clone(), device),
                mtp: t
                    .mtp
                    .iter()
                    .map(|m| {
                        Ok(MtpModule {
                            hnorm: copy_to_device(m.hnorm.clone(), device),
                            enorm: copy_to_device(m.enorm.clone(), device),
                            eh_proj: copy_to_device(m.eh_proj.clone(), device),
                            block: shard_block(&m.block, comm, device)?,
                            norm: copy_to_device(m.norm.clone(), device),
                        })
                    })
                    .collect::<Result<Vec<_>, EpError>>()?,
            }),
        };
        Ok(Self { embed: part(&self.embed), layers, tail, log: CountLog::default(), group: Some(comm.clone()), ..self.clone() })
    }

    /// The group the stage's experts are sharded over, if they are.
    ///
    /// Each stage sharded by [`ModelStage::shard_experts`] keeps the communicator it was
    /// given.
    pub fn expert_group(&self) -> Option<&Comm> {
        self.group.as_ref().or_else(|| group_of(self.blocks()))
    }
}

impl<B: ModelBackend> ModelStage<B> {
    /// The whole stage again on every rank of its expert group (each MoE layer's experts
    /// all-gathered); the stage itself when it is not sharded. Every rank of the group
    /// calls it.
    pub fn unshard_experts(&self) -> Result<Self, EpError> {
        let layers = self.layers.iter().map(unshard_block).collect::<Result<Vec<_>, _>>()?;
        let tail = match &self.tail {
            None => None,
            Some(t) => {
                Some(StageTail { mtp: t.mtp.iter().map(|m| Ok(MtpModule { block: unshard_block(&m.block)?, ..m.clone() })).collect::<Result<Vec<_>, EpError>>()?, ..t.clone() })
            }
        };
        Ok(Self { layers, tail, log: CountLog::default(), group: None, ..self.clone() })
    }
}

impl<B: AutodiffBackend> ModelStage<B>
where
    B::InnerBackend: ModelBackend,
{
    /// The step's gradients of a stage with sharded experts made those of all the
    /// expert-parallel ranks' tokens, as [`DeepSeekV3::sync_grads`] does for the whole
    /// model; unchanged for a stage without. Every rank of the stage's group calls it
    /// after the pipeline step.
    pub fn sync_grads(&self, grads: GradientsParams) -> Result<GradientsParams, EpError> {
        sync_grads(self, self.expert_group(), self.blocks(), grads)
    }
}

impl<B: ModelBackend> ModelStage<B> {
    /// The stage's forward on the tensor of the [module docs](self).
    ///
    /// # Shapes
    /// First stage `[B, S, 1]` (token ids), others `[B, 2S + 1, d]` (`[B, S + 1, d]`
    /// without MTP) → the next stage's input, or the last stage's `[B, R, vocab]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mtp = self.mtp_depth > 0;
        let mut carry = match &self.embed {
            Some(embed) => {
                let [b, s, one] = x.dims();
                assert_eq!(one, 1, "ModelStage::forward: the first stage reads token ids [B, S, 1], got {:?}", [b, s, one]);
                let e = embed.forward(x.reshape([b, s]).int());
                let aux = Tensor::zeros([1], &e.device());
                Carry { hidden: e.clone(), embedded: mtp.then_some(e), aux }
            }
            None => Carry::unpack(x, mtp),
        };
        // The executor's stage interface has no error path: a failed expert-parallel
        // exchange ends the rank's step as a panic naming it.
        let failed = |e: EpError| -> ! { panic!("ModelStage::forward: {e}") };
        let blocks = run_blocks(&self.layers, carry.hidden, &Held).unwrap_or_else(|e| failed(e));
        carry.hidden = blocks.hidden;
        carry.aux = add(Some(carry.aux), blocks.balance_loss).expect("some");
        let mut counts = blocks.counts;
        let Some(tail) = &self.tail else {
            self.log.record(counts);
            return carry.pack();
        };
        // The MTP depths read the final hidden state after the norm, as in `DeepSeekV3`.
        let hidden = tail.norm.forward(carry.hidden);
        let logits = tail.head.forward(hidden.clone());
        let [b, _, vocab] = logits.dims();
        let embedded = carry.embedded;
        let depths = run_depths(
            &tail.mtp,
            &tail.head,
            hidden,
            |k| {
                let e = embedded.clone().expect("the MTP embeddings are carried when the depth is positive");
                let [b, s, d] = e.dims();
                e.slice([0..b, k..s, 0..d])
            },
            &Held,
        )
        .unwrap_or_else(|e| failed(e));
        counts.extend(depths.counts);
        self.log.record(counts);
        let aux = add(Some(carry.aux), depths.balance_loss).expect("some");
        let mut rows = vec![logits];
        rows.extend(depths.logits);
        rows.push(aux_row(aux, b, vocab));
        Tensor::cat(rows, 1)
    }
}

impl<B: AutodiffBackend + ModelBackend> PipelineStage<B, 3> for ModelStage<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        ModelStage::forward(self, x)
    }
}

impl StageObjective {
    /// The objective for stages whose experts are sharded over `n` ranks (see
    /// [`StageObjective::expert_ranks`]).
    pub fn with_expert_ranks(self, n: usize) -> Self {
        Self { expert_ranks: n, ..self }
    }

    /// The first stage's input for training tokens `[B, S + 1]`: tokens `0..S` as f32.
    ///
    /// # Shapes
    /// `tokens [B, S + 1]` → `[B, S, 1]`.
    ///
    /// # Panics
    /// When `S + 1` is below `mtp_depth + 2`, as [`DeepSeekV3::loss`].
    pub fn input<B: Backend>(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, n] = tokens.dims();
        self.check(b, n);
        tokens.slice([0..b, 0..n - 1]).float().reshape([b, n - 1, 1])
    }

    fn check(&self, b: usize, n: usize) {
        let depth = self.mtp_depth;
        assert!(n >= depth + 2, "StageObjective: tokens [{b}, {n}] are too short for MTP depth {depth}: need at least {} per row", depth + 2);
    }

    /// The objective of one micro-batch from the last stage's `output` and the same
    /// `tokens` that [`StageObjective::input`] read: equal to [`DeepSeekV3::loss`] of the
    /// whole model on `tokens`.
    ///
    /// # Shapes
    /// `output [B, S + Σₖ (S − k) + 1, vocab]`, `tokens [B, S + 1]` → `[1]` each.
    ///
    /// # Panics
    /// When `output` does not have the rows of `tokens`.
    pub fn loss<B: Backend>(&self, output: Tensor<B, 3>, tokens: Tensor<B, 2, Int>) -> StageLoss<B> {
        let [b, n] = tokens.dims();
        self.check(b, n);
        let s = n - 1;
        let [ob, rows, vocab] = output.dims();
        let expected = s + (1..=self.mtp_depth).map(|k| s - k).sum::<usize>() + 1;
        assert!(
            ob == b && rows == expected,
            "StageObjective::loss: the last stage's output {:?} does not fit tokens [{b}, {n}] (expected [{b}, {expected}, vocab])",
            [ob, rows, vocab]
        );
        let mut start = 0;
        let mut take = |len: usize| {
            let part = output.clone().slice([0..b, start..start + len, 0..vocab]);
            start += len;
            part
        };
        let lm_loss = cross_entropy(take(s), &tokens, 1);
        let mtp_losses: Vec<_> = (1..=self.mtp_depth).map(|k| cross_entropy(take(s - k), &tokens, k + 1)).collect();
        let balance_loss = output.slice([0..1, rows - 1..rows, 0..1]).reshape([1]);
        let loss = language_objective(lm_loss.clone(), &mtp_losses, self.mtp_loss_weight) / self.expert_ranks.max(1) as f64 + balance_loss.clone();
        StageLoss { loss, lm_loss, mtp_losses, balance_loss }
    }
}
