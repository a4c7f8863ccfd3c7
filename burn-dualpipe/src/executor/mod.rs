//! The executor: runs any [`Schedule`] over several Burn devices, one rank per thread
//! ([`Pipeline::step`]) or one rank per process ([`Pipeline::step_rank`], over an MPI
//! communicator of burn-comm).
//!
//! Each rank owns a device, its stage chunks (copies of the user's stage modules forked
//! to that device) and a [`burn_comm::Comm`] handle. Activations and gradients cross
//! ranks as point-to-point tensor messages tagged by micro-batch, stage and payload:
//! between threads as host copies (`TensorData`, [`Transfer::Host`], the default), the
//! transfer that works between any two Burn devices (Burn 0.21's `to_device` between two
//! wgpu devices panics), or with Burn's device-to-device `to_device`
//! ([`Transfer::Device`]; on CUDA, CubeCL moves the tensor with NCCL send/receive);
//! between processes as host bytes over MPI. A stage's input is a fresh leaf with
//! `require_grad`, so each stage's backward is its own autodiff pass: `Backward` runs it
//! whole, `BackwardInput` runs it under burn-fp8's [`WeightGradQueue`](burn_fp8::linear::WeightGradQueue) (the weight GEMMs of
//! `Fp8Linear` layers are queued) and `BackwardWeight` flushes the queue. Gradients
//! accumulate over micro-batches per chunk.
//!
//! An overlapped `F&B` pair runs through an [`Overlap`] hook: by default ([`Concurrent`])
//! the forward on a helper thread while the backward runs on the rank's thread.
//!
//! After a step, [`Pipeline::optimize`] sums the chunk copies of each stage's gradients on
//! the stage module's device and applies any Burn optimizer; the next step forks the
//! updated stages to the ranks again.
//!
//! In-process ranks start from burn-comm's launcher. A rank that panics or errs sets a
//! shared abort flag; ranks waiting on a receive see it within a poll interval and stop,
//! and a receive that waits longer than the timeout fails naming the stalled rank (a rank
//! waiting on a rank that is itself waiting keeps waiting): a step ends with an error,
//! never a hang. Between processes the rank waited for is named, and a failed process
//! ends the job (burn-comm's `mpi::launch`).
//!
//! # Example
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::SgdConfig;
//! use burn::tensor::backend::{AutodiffBackend, Backend};
//! use burn::tensor::{Distribution, Tensor};
//! use burn_dualpipe::executor::{Pipeline, PipelineStage};
//! use burn_dualpipe::schedule::{Schedule, ScheduleKind};
//!
//! #[derive(Module, Debug)]
//! struct Stage<B: Backend> {
//!     linear: Linear<B>,
//! }
//!
//! impl<B: AutodiffBackend> PipelineStage<B, 2> for Stage<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.linear.forward(x).tanh()
//!     }
//! }
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! // 1F1B over two ranks (threads, a device each), four micro-batches.
//! let schedule = Schedule::new(ScheduleKind::OneFOneB, 2, 4).unwrap();
//! let stages = (0..2).map(|_| Stage { linear: LinearConfig::new(8, 8).init::<B>(&device) }).collect();
//! let mut pipeline = Pipeline::new(stages, vec![device; 2], schedule).unwrap();
//! let inputs = (0..4).map(|_| Tensor::<B, 2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device)).collect();
//! let out = pipeline.step(inputs, |y, _micro_batch| y.powi_scalar(2).mean()).unwrap();
//! assert!(out.loss > 0.0);
//! assert_eq!(out.timeline.ranks.len(), 2); // the measured compute spans of each rank
//! let mut optim = SgdConfig::new().init();
//! pipeline.optimize(&mut optim, 0.1, out.grads);
//! ```

mod devices;
mod overlap;
mod rank;

pub use devices::copy_to_device;
pub use overlap::{Concurrent, Job, Overlap, OverlapPair, Sequential};

use crate::schedule::{validate, Schedule, ScheduleError, Task};
use crate::timeline::Timeline;
use burn::backend::autodiff::grads::Gradients;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Bool, Int, Tensor};
use core::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A pipeline stage: a Burn module mapping a `D`-dimensional tensor to one of the same
/// rank (the activations passed between stages).
pub trait PipelineStage<B: AutodiffBackend, const D: usize>: AutodiffModule<B> + Send + 'static {
    /// The stage's forward.
    fn forward(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

/// Why a step failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineError {
    /// Stage modules or devices do not fit the schedule.
    Mismatch {
        /// What does not fit.
        what: &'static str,
        /// What the schedule needs.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A rank panicked while running `task`.
    RankPanicked {
        /// The rank.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// A rank stalled: `from` computed (or had ended) for longer than the timeout while
    /// `rank` waited for its payload. Ranks waiting on ranks that are themselves waiting
    /// keep waiting, so the error names the stalled rank, not a link of the chain.
    Timeout {
        /// The waiting rank.
        rank: usize,
        /// The stalled rank it waited for.
        from: usize,
        /// The task whose payload it waited for.
        task: Task,
    },
    /// The schedule is not valid (a hand-built or edited one; generated schedules are).
    Schedule(ScheduleError),
    /// A rank stopped because another one failed.
    Aborted {
        /// The rank that stopped.
        rank: usize,
    },
    /// The communicator failed (a message of another operation, a payload that does not
    /// decode).
    Comm {
        /// The rank that saw it.
        rank: usize,
        /// The error.
        error: burn_comm::CommError,
    },
    /// What [`Pipeline::step_rank`] cannot run yet.
    Unsupported(&'static str),
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Mismatch { what, expected, got } => write!(f, "the schedule needs {expected} {what}, got {got}"),
            PipelineError::RankPanicked { rank, message } => write!(f, "rank {rank} panicked: {message}"),
            PipelineError::Timeout { rank, from, task } => {
                write!(f, "rank {from} stalled: busy beyond the timeout while rank {rank} waited for its {task:?}")
            }
            PipelineError::Schedule(e) => write!(f, "invalid schedule: {e}"),
            PipelineError::Aborted { rank } => write!(f, "rank {rank} stopped because another rank failed"),
            PipelineError::Comm { rank, error } => write!(f, "rank {rank}: {error}"),
            PipelineError::Unsupported(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for PipelineError {}

impl From<burn_comm::CommError> for PipelineError {
    /// A rank's panic caught by the launcher, or a communicator error.
    fn from(e: burn_comm::CommError) -> Self {
        match e {
            burn_comm::CommError::RankFailed { rank, reason, .. } => PipelineError::RankPanicked { rank, message: reason },
            error => PipelineError::Comm { rank: 0, error },
        }
    }
}

impl burn_comm::RankError for PipelineError {
    fn as_comm(&self) -> Option<&burn_comm::CommError> {
        match self {
            PipelineError::Comm { error, .. } => Some(error),
            _ => None,
        }
    }

    fn is_consequence(&self) -> bool {
        matches!(self, PipelineError::Aborted { .. })
    }
}

/// The gradients one rank's chunk accumulated over the step.
#[derive(Debug)]
pub struct ChunkGrads {
    /// The rank.
    pub rank: usize,
    /// The chunk on that rank.
    pub chunk: usize,
    /// The stage the chunk holds.
    pub stage: usize,
    /// Its parameters' gradients, on the rank's device, keyed by the stage module's
    /// parameter ids (copies of a stage share them).
    pub grads: GradientsParams,
}

/// What a step returns.
#[derive(Debug)]
pub struct StepOutput {
    /// The loss of the batch: the sum over micro-batches of `loss / M`.
    pub loss: f64,
    /// Every chunk's gradients (DualPipe: two chunks per stage, to be summed).
    pub grads: Vec<ChunkGrads>,
    /// The measured compute spans of every rank, in seconds from the step's start.
    pub timeline: Timeline,
}

/// Initializes every lazily initialized parameter of `module` now, in the module's order.
///
/// Burn draws a parameter's initial values when the parameter is first read, so the
/// values depend on what ran before on the backend's random stream. Materializing right
/// after `init` (after seeding) gives the same weights however the module is used next:
/// whole, cut into stages, or sharded.
pub fn materialize<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(module: &M) {
    module.visit(&mut Materialize);
}

/// Initializes every lazy parameter of a module by reading it.
struct Materialize;

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
        let _ = param.val();
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        let _ = param.val();
    }
}

/// A pipeline: stage modules, one device per rank and a schedule; `D` is the rank of the
/// activation tensors passed between stages.
pub struct Pipeline<B: AutodiffBackend, S, const D: usize> {
    stages: Vec<S>,
    devices: Vec<B::Device>,
    schedule: Schedule,
    timeout: Duration,
    overlap: Arc<dyn Overlap>,
    transfer: Transfer,
}

/// How activations and gradients move between in-process ranks: burn-comm's
/// [`Transport`](burn_comm::Transport) — through host memory (`Host`, the default: any
/// two Burn devices) or with Burn's `to_device` (`Device`: device to device where the
/// backend has it, CUDA's NCCL send/receive through CubeCL; panics between two wgpu
/// devices in Burn 0.21). Ranks that are processes ([`Pipeline::step_rank`]) move host
/// bytes over their communicator.
pub type Transfer = burn_comm::Transport;

impl<B, S, const D: usize> Pipeline<B, S, D>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
{
    /// `stages[s]` runs stage `s` (`schedule.stages()` of them) on the devices of the
    /// ranks the schedule places it on.
    ///
    /// # Errors
    /// [`PipelineError::Mismatch`] when the stage or device count does not fit;
    /// [`PipelineError::Schedule`] when the schedule does not pass [`validate`].
    pub fn new(stages: Vec<S>, devices: Vec<B::Device>, schedule: Schedule) -> Result<Self, PipelineError> {
        if stages.len() != schedule.stages() {
            return Err(PipelineError::Mismatch { what: "stage modules", expected: schedule.stages(), got: stages.len() });
        }
        if devices.len() != schedule.ranks {
            return Err(PipelineError::Mismatch { what: "devices (one per rank)", expected: schedule.ranks, got: devices.len() });
        }
        validate(&schedule).map_err(PipelineError::Schedule)?;
        // Burn initializes parameters lazily, and each clone of a lazy parameter on its
        // own: without this, the ranks' copies of a stage would start from different
        // weights.
        for stage in &stages {
            materialize(stage);
        }
        Ok(Self { stages, devices, schedule, timeout: Duration::from_secs(120), overlap: Arc::new(Concurrent), transfer: Transfer::Host })
    }

    /// How activations and gradients move between ranks (default [`Transfer::Host`]).
    pub fn with_transfer(self, transfer: Transfer) -> Self {
        Self { transfer, ..self }
    }

    /// How ranks run overlapped forward-and-backward pairs (default [`Concurrent`]).
    pub fn with_overlap(self, overlap: impl Overlap + 'static) -> Self {
        Self { overlap: Arc::new(overlap), ..self }
    }

    /// The longest a rank waits for one payload before the step fails (default 120 s).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The stage modules.
    pub fn stages(&self) -> &[S] {
        &self.stages
    }

    /// The stage modules, e.g. to save them after training.
    pub fn into_stages(self) -> Vec<S> {
        self.stages
    }

    /// Each stage's gradients (`result[s]`), its chunk copies summed on the device of
    /// stage module `s`.
    pub fn stage_grads(&self, grads: Vec<ChunkGrads>) -> Vec<GradientsParams> {
        let mut sums: Vec<GradientsAccumulator<S>> = self.stages.iter().map(|_| GradientsAccumulator::new()).collect();
        for chunk in grads {
            let stage = &self.stages[chunk.stage];
            let grads = match stage.devices().first() {
                Some(device) => devices::grads_to(chunk.grads, stage, device, self.transfer),
                None => chunk.grads,
            };
            sums[chunk.stage].accumulate(stage, grads);
        }
        sums.iter_mut().map(|s| s.grads()).collect()
    }

    /// Applies `optim` with learning rate `lr` to every stage with the step's gradients
    /// (one optimizer for all stages: its state is keyed by parameter id).
    pub fn optimize<O: Optimizer<S, B>>(&mut self, optim: &mut O, lr: f64, grads: Vec<ChunkGrads>) {
        let grads = self.stage_grads(grads);
        self.optimize_stages(optim, lr, grads);
    }

    /// [`Pipeline::optimize`] with each stage's gradients given (`grads[s]`, e.g. those of
    /// [`Pipeline::stage_grads`] after a sync across data- or expert-parallel ranks); a
    /// stage with no gradients is left as it is.
    ///
    /// # Panics
    /// When `grads` does not hold one entry per stage.
    pub fn optimize_stages<O: Optimizer<S, B>>(&mut self, optim: &mut O, lr: f64, grads: Vec<GradientsParams>) {
        assert_eq!(grads.len(), self.stages.len(), "Pipeline::optimize_stages: {} gradient sets for {} stages", grads.len(), self.stages.len());
        let stages = std::mem::take(&mut self.stages);
        self.stages = stages.into_iter().zip(grads).map(|(stage, g)| if g.is_empty() { stage } else { optim.step(lr, stage, g) }).collect();
    }

    /// Replaces every stage module `s` by `f(s, stage)`, e.g. to apply an update that is
    /// not a gradient step (a balancing bias) between steps.
    pub fn map_stages(&mut self, mut f: impl FnMut(usize, S) -> S) {
        let stages = std::mem::take(&mut self.stages);
        self.stages = stages.into_iter().enumerate().map(|(s, stage)| f(s, stage)).collect();
    }

    /// Runs one step: micro-batch `m` is `inputs[m]` (on any device), its loss is
    /// `loss(output, m)`; every micro-batch's loss is divided by `M`, so the gradients are
    /// those of the mean loss.
    ///
    /// # Errors
    /// The first rank's failure ([`PipelineError::RankPanicked`], [`PipelineError::Timeout`]),
    /// or [`PipelineError::Mismatch`] when `inputs` is not one tensor per micro-batch.
    pub fn step<L>(&self, inputs: Vec<Tensor<B, D>>, loss: L) -> Result<StepOutput, PipelineError>
    where
        L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
    {
        if inputs.len() != self.schedule.micro_batches {
            return Err(PipelineError::Mismatch { what: "input micro-batches", expected: self.schedule.micro_batches, got: inputs.len() });
        }
        let inputs: Vec<_> = inputs.into_iter().map(|x| x.into_data()).collect();
        let chunks: Vec<Vec<S>> = (0..self.schedule.ranks).map(|r| self.chunks_of(r, self.transfer)).collect();
        let setup = rank::StepSetup { schedule: &self.schedule, timeout: self.timeout, overlap: self.overlap.as_ref(), inputs: &inputs, loss: &loss };
        rank::run_threads(setup, &self.devices, chunks, self.transfer)
    }

    /// Copies of the stages rank `r` runs, forked to its device.
    fn chunks_of(&self, r: usize, transfer: Transfer) -> Vec<S> {
        (0..self.schedule.kind.chunks_per_rank()).map(|c| devices::fork(self.stages[self.schedule.stage_of_chunk(r, c)].clone(), &self.devices[r], transfer)).collect()
    }

    /// Runs this process's rank of one step, rank `comm.rank()` of the schedule, with
    /// the other ranks in other processes over `comm` (MPI: burn-comm's `mpi` feature).
    /// Every rank passes the same `inputs` and `loss` (the first and last stages read
    /// them). The step's `loss` is the whole batch's on every rank (summed over `comm`);
    /// `grads` are this rank's chunks'; the timeline holds every rank's spans, each
    /// measured from its own start of the step (the ranks start at a barrier).
    /// [`Pipeline::optimize`] with these gradients updates this rank's stages.
    ///
    /// # Errors
    /// As [`Pipeline::step`]; a rank that stalls past the timeout is named by the ranks
    /// waiting for it. [`PipelineError::Mismatch`] when `comm` has another size than the
    /// schedule's ranks; [`PipelineError::Unsupported`] for DualPipe, whose two copies of
    /// every stage live on two ranks (their gradients would have to be summed across
    /// processes): run DualPipeV.
    pub fn step_rank<L>(&self, comm: &burn_comm::Comm, inputs: Vec<Tensor<B, D>>, loss: L) -> Result<StepOutput, PipelineError>
    where
        L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
    {
        if comm.world_size() != self.schedule.ranks {
            return Err(PipelineError::Mismatch { what: "ranks in the communicator", expected: self.schedule.ranks, got: comm.world_size() });
        }
        if self.schedule.kind == crate::schedule::ScheduleKind::DualPipe {
            return Err(PipelineError::Unsupported(
                "DualPipe keeps two copies of every stage on two ranks; step_rank runs schedules with one copy per stage (DualPipeV, 1F1B, ZB1P)",
            ));
        }
        if inputs.len() != self.schedule.micro_batches {
            return Err(PipelineError::Mismatch { what: "input micro-batches", expected: self.schedule.micro_batches, got: inputs.len() });
        }
        let rank = comm.rank();
        // Host read, once per step before any rank runs, as in `step`: the first stage's
        // chunk re-creates each micro-batch on its own device.
        let inputs: Vec<_> = inputs.into_iter().map(|x| x.into_data()).collect();
        let chunks = self.chunks_of(rank, Transfer::Host);
        comm.barrier("pipeline step").map_err(|error| PipelineError::Comm { rank, error })?;
        let setup = rank::StepSetup { schedule: &self.schedule, timeout: self.timeout, overlap: self.overlap.as_ref(), inputs: &inputs, loss: &loss };
        let mine = rank::run_rank(setup, comm, self.devices[rank].clone(), chunks)?;
        // The loss and the timeline of the whole step, on every rank.
        let all = comm.all_gather_host("pipeline step end", (mine.loss, mine.spans)).map_err(|error| PipelineError::Comm { rank, error })?;
        let loss = all.iter().map(|(l, _)| l).sum();
        Ok(StepOutput { loss, grads: mine.grads, timeline: Timeline { ranks: all.into_iter().map(|(_, s)| s).collect() } })
    }
}
