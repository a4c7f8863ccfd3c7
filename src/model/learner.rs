//! Training [`DeepSeekV3`] with Burn's own loop (feature `learner`): burn-train's
//! `Learner` and `SupervisedTraining`, with Burn's metrics, checkpointing and dashboard.
//!
//! - [`TrainStep`] for `DeepSeekV3<B>` on an autodiff backend: [`DeepSeekV3::loss`] of a
//!   [`TokenBatch`], its backward, and the per-expert token counts of every MoE layer;
//!   [`TrainStep::optimize`] runs the optimizer step, then the balancing-bias update
//!   ([`DeepSeekV3::update_bias`]) with those counts. The counts travel from the step to
//!   `optimize` inside the step's [`GradientsParams`], under the id of each layer's
//!   balancing bias — a parameter that has no gradient of its own — and `optimize` takes
//!   them out before the optimizer sees the gradients. With gradient accumulation Burn
//!   sums them over the accumulated steps, which is what the update takes.
//! - [`InferenceStep`] for `DeepSeekV3<B>`: the same loss without gradients (validation).
//! - [`TokenBatcher`]: equal-length token rows (`[S + 1]` ids each) into a [`TokenBatch`].
//! - [`LmOutput`] and its host copy [`LmStats`], which feed Burn's [`LossMetric`] (the
//!   objective) and [`LmMetric`]: the next-token loss, the balance loss and the expert
//!   load (max over mean tokens per expert, averaged over the MoE layers; 1 is balance).
//!
//! Reading the step's losses and counts to the host is the metrics' read, once per step
//! ([`ItemLazy::sync`], as Burn's own outputs do); the step itself reads nothing.
//!
//! # Example
//! One step through Burn's `Learner` (the `train_learner` example runs whole epochs with
//! `SupervisedTraining`, the metrics and the dashboard):
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::data::dataloader::batcher::Batcher;
//! use burn::optim::{lr_scheduler::constant::ConstantLr, AdamWConfig};
//! use burn_deepseek::model::learner::TokenBatcher;
//! use burn_deepseek::model::DeepSeekV3Config;
//! use burn_deepseek::train::Learner;
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let model = DeepSeekV3Config::tiny().init::<B>(&device);
//! let rows: Vec<Vec<u32>> = (0..2).map(|r| (0..17).map(|t| (r * 31 + t * 7) % 256).collect()).collect();
//! let batch = TokenBatcher.batch(rows, &device); // tokens [2, 17]
//! let mut learner = Learner::new(model, AdamWConfig::new().init(), ConstantLr::new(1e-3));
//! learner.lr_step(); // the step's learning rate, as Burn's epoch loop sets it
//! let out = learner.train_step(batch);
//! learner.optimizer_step(out.grads); // AdamW, then the balancing-bias update
//! let bias = learner.model().moe_layers().next().unwrap().bias.val();
//! assert!(bias.abs().sum().into_scalar() > 0.0); // moved by γ · sign(mean − count)
//! ```

use super::{expert_load, DeepSeekV3, LossOutput, ModelBackend};
use burn::data::dataloader::batcher::Batcher;
use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData, Transaction};
use burn_train::metric::state::{FormatOptions, NumericMetricState};
use burn_train::metric::{Adaptor, LossInput, LossMetric, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry, SerializedEntry};
use burn_train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use std::sync::Arc;

/// Token rows for the language-model loss.
///
/// # Shapes
/// - tokens: `[B, S + 1]` (inputs `0..S`, targets shifted by one; MTP depth `D` needs
///   `S + 1 ≥ D + 2`)
#[derive(Clone, Debug)]
pub struct TokenBatch<B: Backend> {
    /// `[B, S + 1]` token ids.
    pub tokens: Tensor<B, 2, Int>,
}

/// Batches rows of token ids, all of one length, into a [`TokenBatch`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenBatcher;

impl<B: Backend> Batcher<B, Vec<u32>, TokenBatch<B>> for TokenBatcher {
    /// # Panics
    /// When the rows are empty or of different lengths, naming the lengths.
    fn batch(&self, rows: Vec<Vec<u32>>, device: &B::Device) -> TokenBatch<B> {
        let n = rows.first().map_or(0, Vec::len);
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        assert!(n > 0 && lengths.iter().all(|&l| l == n), "TokenBatcher: token rows must be non-empty and of one length, got lengths {lengths:?}");
        let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
        TokenBatch { tokens: Tensor::from_data(TensorData::new(ids, [rows.len(), n]), device) }
    }
}

/// One step's losses and counts on the device (what [`TrainStep::step`] and
/// [`InferenceStep::step`] return).
pub struct LmOutput<B: Backend> {
    /// The objective (`lm_loss + λ / D · Σ mtp_losses + balance_loss`), `[1]`.
    pub loss: Tensor<B, 1>,
    /// Next-token cross-entropy, `[1]`.
    pub lm_loss: Tensor<B, 1>,
    /// The weighted balance losses, `[1]` (`None` when α = 0).
    pub balance_loss: Option<Tensor<B, 1>>,
    /// Tokens per routed expert of every MoE layer.
    pub counts: Vec<Tensor<B, 1, Int>>,
    /// Rows of the batch.
    pub rows: usize,
}

impl<B: Backend> LmOutput<B> {
    fn new(out: LossOutput<B>, rows: usize) -> Self {
        Self { loss: out.loss, lm_loss: out.lm_loss, balance_loss: out.balance_loss, counts: out.counts, rows }
    }
}

/// [`LmOutput`] on the host: what the metrics read.
#[derive(Clone, Debug, PartialEq)]
pub struct LmStats {
    /// The objective.
    pub loss: f64,
    /// Next-token cross-entropy.
    pub lm_loss: f64,
    /// The weighted balance losses (0 when α = 0).
    pub balance_loss: f64,
    /// Max over mean tokens per expert, averaged over the MoE layers ([`super::expert_load`]).
    pub expert_load: f64,
    /// Rows of the batch.
    pub rows: usize,
}

impl<B: Backend> ItemLazy for LmOutput<B> {
    type ItemSync = LmStats;

    /// One transaction: the losses and every layer's counts.
    fn sync(self) -> LmStats {
        let layers = self.counts.len();
        let mut tx = Transaction::default().register(self.loss).register(self.lm_loss);
        let balanced = self.balance_loss.is_some();
        if let Some(b) = self.balance_loss {
            tx = tx.register(b);
        }
        for c in self.counts {
            tx = tx.register(c);
        }
        let mut data = tx.execute().into_iter();
        let mut scalar = || data.next().expect("a registered tensor").convert::<f64>().to_vec::<f64>().expect("f64 values")[0];
        let (loss, lm_loss) = (scalar(), scalar());
        let balance_loss = if balanced { scalar() } else { 0.0 };
        let counts: Vec<Vec<i64>> = data.take(layers).map(|d| d.convert::<i64>().to_vec().expect("counts")).collect();
        LmStats { loss, lm_loss, balance_loss, expert_load: expert_load(&counts), rows: self.rows }
    }
}

impl<B: Backend> Adaptor<LossInput<B>> for LmStats {
    fn adapt(&self) -> LossInput<B> {
        LossInput::new(Tensor::from_floats([self.loss as f32], &Default::default()))
    }
}

impl Adaptor<LmStats> for LmStats {
    fn adapt(&self) -> LmStats {
        self.clone()
    }
}

impl<B> TrainStep for DeepSeekV3<B>
where
    B: AutodiffBackend + ModelBackend,
    B::InnerBackend: ModelBackend,
{
    type Input = TokenBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: TokenBatch<B>) -> TrainOutput<LmOutput<B>> {
        let rows = batch.tokens.dims()[0];
        let out = self.loss(batch.tokens);
        let mut grads = GradientsParams::from_grads(out.loss.backward(), self);
        for (moe, counts) in self.moe_layers().zip(&out.counts) {
            grads.register::<B::InnerBackend, 1>(moe.bias.id, counts.clone().inner().float());
        }
        TrainOutput { grads, item: LmOutput::new(out, rows) }
    }

    fn optimize<BA, O>(self, optim: &mut O, lr: f64, mut grads: GradientsParams) -> Self
    where
        BA: AutodiffBackend,
        O: Optimizer<Self, BA>,
        Self: AutodiffModule<BA>,
    {
        let counts = self.take_counts(|id| grads.remove::<B::InnerBackend, 1>(id));
        optim.step(lr, self, grads).update_bias(&counts)
    }

    /// With several devices (burn-train's multi-device strategy) each device's step routed
    /// its own rows: the counts are summed over the devices, as the bias update of the
    /// whole batch needs.
    fn optimize_multi<BA, O>(self, optim: &mut O, lr: f64, mut grads: MultiGradientsParams) -> Self
    where
        BA: AutodiffBackend,
        O: Optimizer<Self, BA>,
        Self: AutodiffModule<BA>,
    {
        let counts = self.take_counts(|id| grads.remove::<B::InnerBackend, 1>(id).map(|(c, _)| c));
        optim.step_multi(lr, self, grads).update_bias(&counts)
    }
}

impl<B: AutodiffBackend + ModelBackend> DeepSeekV3<B> {
    /// The step's expert counts of every MoE layer, taken out of the gradients (`take`
    /// removes the entry under a parameter id), on the layer's device.
    fn take_counts(&self, mut take: impl FnMut(ParamId) -> Option<Tensor<B::InnerBackend, 1>>) -> Vec<Tensor<B, 1, Int>> {
        self.moe_layers()
            .map(|moe| {
                let id = moe.bias.id;
                let c = take(id).unwrap_or_else(|| panic!("DeepSeekV3::optimize: no expert counts under the balancing bias {id} (gradients not from DeepSeekV3's TrainStep?)"));
                Tensor::from_inner(c.int()).to_device(&moe.bias.val().device())
            })
            .collect()
    }
}

impl<B: ModelBackend> InferenceStep for DeepSeekV3<B> {
    type Input = TokenBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: TokenBatch<B>) -> LmOutput<B> {
        let rows = batch.tokens.dims()[0];
        LmOutput::new(self.loss(batch.tokens), rows)
    }
}

/// Which figure of [`LmStats`] an [`LmMetric`] shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LmFigure {
    /// Next-token cross-entropy.
    NextTokenLoss,
    /// The weighted balance losses.
    BalanceLoss,
    /// Max over mean tokens per expert, averaged over the MoE layers.
    ExpertLoad,
}

/// A numeric metric of the language model's step (next to Burn's [`LossMetric`], which
/// shows the objective): averaged over the epoch by rows, like Burn's loss.
#[derive(Clone)]
pub struct LmMetric {
    figure: LmFigure,
    name: MetricName,
    state: NumericMetricState,
}

impl LmMetric {
    /// The metric of `figure`.
    pub fn new(figure: LmFigure) -> Self {
        let name = match figure {
            LmFigure::NextTokenLoss => "Next-token loss",
            LmFigure::BalanceLoss => "Balance loss",
            LmFigure::ExpertLoad => "Expert load", // max over mean (a metric name is a file name: no slash)
        };
        Self { figure, name: Arc::new(name.to_string()), state: NumericMetricState::default() }
    }
}

impl Metric for LmMetric {
    type Input = LmStats;

    fn update(&mut self, stats: &LmStats, _metadata: &MetricMetadata) -> SerializedEntry {
        let (value, precision) = match self.figure {
            LmFigure::NextTokenLoss => (stats.lm_loss, 3),
            LmFigure::BalanceLoss => (stats.balance_loss, 5),
            LmFigure::ExpertLoad => (stats.expert_load, 2),
        };
        self.state.update(value, stats.rows, FormatOptions::new(self.name()).precision(precision))
    }

    fn clear(&mut self) {
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes { unit: None, higher_is_better: false }.into()
    }
}

impl Numeric for LmMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// Burn's loss metric of the objective, for [`LmStats`] (a reminder of the backend type
/// its input names: the metrics read host values).
pub type ObjectiveMetric = LossMetric<burn::backend::Flex>;
