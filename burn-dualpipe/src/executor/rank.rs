//! One rank of a step: its chunks, its communicator, and the interpreter of its
//! program. In-process ranks ([`run_threads`]) are threads of one step over a group of
//! [`Comm`] handles; a rank that is a process of its own ([`run_rank`]) runs only its
//! program over the pipeline's communicator (MPI). Activations and gradients travel as
//! point-to-point tensor messages tagged by task and payload.

use super::overlap::{Overlap, OverlapPair};
use super::{ChunkGrads, PipelineError, PipelineStage, StepOutput, Transfer};
use crate::schedule::{Instr, Payload, Schedule, Task};
use crate::timeline::{Span, Timeline};
use burn::backend::autodiff::grads::Gradients;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{backend::AutodiffBackend, Float, Tensor, TensorData};
use burn_comm::{Comm, CommError};

use burn_fp8::linear::WeightGradQueue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long one receive try waits before the rank checks the abort flag and the stall.
const POLL: Duration = Duration::from_millis(20);
const NOBODY: usize = usize::MAX;
/// The name of the executor's messages.
const OP: &str = "pipeline";

/// The message tag of `task`'s `payload`.
fn tag(task: Task, payload: Payload, stages: usize) -> u64 {
    ((task.micro_batch * stages + task.stage) * 2 + usize::from(payload == Payload::Gradient)) as u64
}

/// What one rank hands back.
pub(super) struct RankResult {
    pub(super) loss: f64,
    pub(super) grads: Vec<ChunkGrads>,
    pub(super) spans: Vec<Span>,
}

/// What the in-process ranks of one step share: the abort flag, and what each rank waits
/// for, to name the stalled rank rather than a link of a chain of waiting ranks.
struct Watch {
    abort: AtomicBool,
    /// Whom each rank is waiting for now (`NOBODY`: it is computing).
    waiting: Vec<AtomicUsize>,
    /// When each rank last stopped waiting, in µs from the start (a finished rank stays
    /// "busy" since its last receive).
    busy_since: Vec<AtomicU64>,
}

/// What every rank of a step is given.
pub(super) struct StepSetup<'a, L> {
    pub(super) schedule: &'a Schedule,
    pub(super) timeout: Duration,
    pub(super) overlap: &'a dyn Overlap,
    pub(super) inputs: &'a [TensorData],
    pub(super) loss: &'a L,
}

/// The step on one thread per rank.
pub(super) fn run_threads<B, S, L, const D: usize>(setup: StepSetup<'_, L>, devices: &[B::Device], chunks: Vec<Vec<S>>, transfer: Transfer) -> Result<StepOutput, PipelineError>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
    L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
{
    let ranks = setup.schedule.ranks;
    // The group's own timeout only bounds sends; receives poll and apply the step's rule.
    let comms = Comm::group_with_timeout(ranks, transfer, setup.timeout);
    let watch =
        Watch { abort: AtomicBool::new(false), waiting: (0..ranks).map(|_| AtomicUsize::new(NOBODY)).collect(), busy_since: (0..ranks).map(|_| AtomicU64::new(0)).collect() };
    let start = Instant::now();
    let chunks: Vec<std::sync::Mutex<Option<Vec<S>>>> = chunks.into_iter().map(|c| std::sync::Mutex::new(Some(c))).collect();
    // burn-comm's launcher: one thread per rank; of the ranks' errors it returns the one
    // that is not a consequence of another's (a rank's panic or error, a timeout naming
    // the stalled rank), not the ranks that stopped because of it.
    let results = burn_comm::launch(comms, |comm| {
        let rank = comm.rank();
        let mine = chunks[rank].lock().unwrap_or_else(|e| e.into_inner()).take().expect("each rank takes its chunks once");
        let result = catch(rank, || RankState::<B, S, D>::new(&setup, comm, devices[rank].clone(), mine, Some(&watch), start).run(setup.inputs, setup.loss));
        if result.is_err() {
            watch.abort.store(true, Ordering::SeqCst);
        }
        result
    })?;
    let mut out = StepOutput { loss: 0.0, grads: Vec::new(), timeline: Timeline { ranks: Vec::new() } };
    for r in results {
        out.loss += r.loss;
        out.grads.extend(r.grads);
        out.timeline.ranks.push(r.spans);
    }
    Ok(out)
}

/// This process's rank of the step, over `comm` (one rank per process).
pub(super) fn run_rank<B, S, L, const D: usize>(setup: StepSetup<'_, L>, comm: &Comm, device: B::Device, chunks: Vec<S>) -> Result<RankResult, PipelineError>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
    L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
{
    let rank = comm.rank();
    catch(rank, || RankState::<B, S, D>::new(&setup, comm.clone(), device, chunks, None, Instant::now()).run(setup.inputs, setup.loss))
}

/// `f`'s result, a panic as [`PipelineError::RankPanicked`].
fn catch<T>(rank: usize, f: impl FnOnce() -> Result<T, PipelineError>) -> Result<T, PipelineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| Err(PipelineError::RankPanicked { rank, message: burn_comm::panic_message(&*panic) }))
}

struct RankState<'a, B: AutodiffBackend, S, const D: usize> {
    schedule: &'a Schedule,
    timeout: Duration,
    overlap: &'a dyn Overlap,
    rank: usize,
    device: B::Device,
    chunks: Vec<S>,
    accumulators: Vec<GradientsAccumulator<S>>,
    comm: Comm,
    /// Shared with the other ranks of an in-process step.
    watch: Option<&'a Watch>,
    start: Instant,
    /// Per task in flight: its input (none at stage 0: the micro-batch input).
    activations: HashMap<Task, Option<Tensor<B::InnerBackend, D>>>,
    /// The loss of each micro-batch whose last stage ran here, `loss / M`, detached; read
    /// to the host once, at the end of the step.
    losses: Vec<Tensor<B, 1>>,
    /// Payloads produced or received here and not yet used: activations for the next
    /// stage, gradients for the previous (sent on by a `Send`, or used here when both
    /// stages live on this rank, as in DualPipeV's turn).
    local: HashMap<(Task, Payload), Tensor<B::InnerBackend, D>>,
    /// Split backwards waiting for their weight step.
    deferred: HashMap<Task, (Gradients, WeightGradQueue)>,
    spans: Vec<Span>,
}

impl<'a, B, S, const D: usize> RankState<'a, B, S, D>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
{
    fn new<L>(setup: &StepSetup<'a, L>, comm: Comm, device: B::Device, chunks: Vec<S>, watch: Option<&'a Watch>, start: Instant) -> Self {
        RankState {
            schedule: setup.schedule,
            timeout: setup.timeout,
            overlap: setup.overlap,
            rank: comm.rank(),
            device,
            accumulators: chunks.iter().map(|_| GradientsAccumulator::new()).collect(),
            chunks,
            comm,
            watch,
            start,
            activations: HashMap::new(),
            losses: Vec::new(),
            local: HashMap::new(),
            deferred: HashMap::new(),
            spans: Vec::new(),
        }
    }

    fn aborted(&self) -> bool {
        self.watch.is_some_and(|w| w.abort.load(Ordering::SeqCst))
    }

    fn run<L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync>(mut self, inputs: &[TensorData], loss: &L) -> Result<RankResult, PipelineError> {
        let program = self.schedule.programs[self.rank].clone();
        for instr in program {
            if self.aborted() {
                return Err(PipelineError::Aborted { rank: self.rank });
            }
            let begin = self.start.elapsed().as_secs_f64();
            match instr {
                Instr::Send { task, payload, to } => {
                    let x = self.local.remove(&(task, payload)).expect("a send follows the compute that produced its payload");
                    self.comm.send_tensor(OP, tag(task, payload, self.schedule.stages()), to, x).map_err(|e| self.comm_error(e))?;
                    continue;
                }
                Instr::Recv { task, payload, from } => {
                    let x = self.receive(task, payload, from)?;
                    self.local.insert((task, payload), x);
                    continue;
                }
                _ => {}
            }
            match instr {
                Instr::Send { .. } | Instr::Recv { .. } => unreachable!("handled above"),
                Instr::Forward(t) => self.forward(t, inputs),
                Instr::Backward(t) => self.backward(t, false, inputs, loss),
                Instr::BackwardInput(t) => self.backward(t, true, inputs, loss),
                Instr::BackwardWeight(t) => self.weight(t),
                Instr::ForwardBackward { forward, backward } => self.forward_backward(forward, backward, inputs, loss)?,
            }
            B::sync(&self.device).map_err(|e| PipelineError::RankPanicked { rank: self.rank, message: format!("device sync failed: {e:?}") })?;
            self.spans.push(Span { start: begin, end: self.start.elapsed().as_secs_f64(), instr });
        }
        let loss = match self.losses.into_iter().reduce(|a, b| a + b) {
            Some(total) => total.into_data().convert::<f64>().as_slice::<f64>().expect("f64 loss")[0],
            None => 0.0,
        };
        let schedule = self.schedule;
        let grads = self
            .accumulators
            .into_iter()
            .enumerate()
            .map(|(chunk, mut acc)| ChunkGrads { rank: self.rank, chunk, stage: schedule.stage_of_chunk(self.rank, chunk), grads: acc.grads() })
            .collect();
        Ok(RankResult { loss, grads, spans: self.spans })
    }

    fn comm_error(&self, e: CommError) -> PipelineError {
        match e {
            // The rank that left reports its own failure.
            CommError::RankFailed { .. } => PipelineError::Aborted { rank: self.rank },
            e => PipelineError::Comm { rank: self.rank, error: e },
        }
    }

    fn receive(&mut self, task: Task, payload: Payload, from: usize) -> Result<Tensor<B::InnerBackend, D>, PipelineError> {
        if let Some(w) = self.watch {
            w.waiting[self.rank].store(from, Ordering::SeqCst);
        }
        let result = self.wait(task, payload, from);
        if let Some(w) = self.watch {
            w.busy_since[self.rank].store(self.micros(), Ordering::SeqCst);
            w.waiting[self.rank].store(NOBODY, Ordering::SeqCst);
        }
        result
    }

    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn wait(&mut self, task: Task, payload: Payload, from: usize) -> Result<Tensor<B::InnerBackend, D>, PipelineError> {
        let tag = tag(task, payload, self.schedule.stages());
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.comm.try_recv_tensor::<B::InnerBackend, D, Float>(OP, tag, from, &self.device, POLL) {
                Ok(Some(x)) => return Ok(x),
                Ok(None) => {}
                Err(e) => return Err(self.comm_error(e)),
            }
            if self.aborted() {
                return Err(PipelineError::Aborted { rank: self.rank });
            }
            if Instant::now() <= deadline {
                continue;
            }
            match self.watch {
                // Past the deadline, keep waiting while `from` waits itself or has not yet
                // been busy for a whole timeout: only a rank waiting on the stalled one
                // reports.
                Some(w) if w.waiting[from].load(Ordering::SeqCst) != NOBODY => {}
                Some(w) => {
                    let busy = Duration::from_micros(self.micros().saturating_sub(w.busy_since[from].load(Ordering::SeqCst)));
                    if busy >= self.timeout {
                        return Err(PipelineError::Timeout { rank: self.rank, from, task });
                    }
                }
                // Ranks in other processes: the one waited for is named.
                None => return Err(PipelineError::Timeout { rank: self.rank, from, task }),
            }
        }
    }

    fn chunk(&self, task: Task) -> usize {
        self.schedule.place(task).1
    }

    /// The forward of `task`: its output goes on to the next stage.
    fn forward(&mut self, task: Task, inputs: &[TensorData]) {
        if let Some(x) = self.begin_forward(task, inputs) {
            let y = forward_pass(&self.chunks[self.chunk(task)], x);
            self.local.insert((task, Payload::Activation), y);
        }
    }

    /// Takes the forward's input and keeps it for the backward, which recomputes the
    /// forward (see [`backward_pass`]). Returns the input to run the forward on, or none
    /// at the last stage: nothing waits for its output, so its forward is left to the
    /// backward, which computes the loss from the recomputed output.
    fn begin_forward(&mut self, task: Task, inputs: &[TensorData]) -> Option<Tensor<B, D>> {
        let data = (task.stage > 0).then(|| {
            let key = (Task::new(task.micro_batch, task.stage - 1), Payload::Activation);
            self.local.remove(&key).expect("the activation was received or computed here")
        });
        let x = (task.stage + 1 < self.schedule.stages()).then(|| match &data {
            Some(x) => Tensor::from_inner(x.clone()),
            None => Tensor::from_data(inputs[task.micro_batch].clone(), &self.device),
        });
        self.activations.insert(task, data);
        x
    }

    /// The backward of `task`: whole, or with the weight gradients queued (`split`).
    fn backward<L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1>>(&mut self, task: Task, split: bool, inputs: &[TensorData], loss: &L) {
        let pass = self.begin_backward(task, inputs);
        let out = backward_pass(&self.chunks[self.chunk(task)], pass, split, loss);
        self.end_backward(task, out);
    }

    /// The backward's kept input (a fresh leaf past stage 0) and the gradient of its output.
    fn begin_backward(&mut self, task: Task, inputs: &[TensorData]) -> BackwardPass<B, D> {
        let data = self.activations.remove(&task).expect("the forward ran before the backward");
        let (leaf, input) = match data {
            Some(x) => {
                let x = Tensor::<B, D>::from_inner(x).require_grad();
                (Some(x.clone()), x)
            }
            None => (None, Tensor::from_data(inputs[task.micro_batch].clone(), &self.device)),
        };
        let root = if task.stage + 1 == self.schedule.stages() {
            Root::Loss { micro_batch: task.micro_batch, micro_batches: self.schedule.micro_batches }
        } else {
            let key = (Task::new(task.micro_batch, task.stage + 1), Payload::Gradient);
            Root::Gradient(self.local.remove(&key).expect("the gradient was received or computed here"))
        };
        BackwardPass { leaf, input, root }
    }

    fn end_backward(&mut self, task: Task, out: BackwardOut<B, D>) {
        if let Some(loss) = out.loss {
            self.losses.push(loss);
        }
        if let Some(dx) = out.dx {
            self.local.insert((task, Payload::Gradient), dx);
        }
        match out.queue {
            Some(queue) => {
                self.deferred.insert(task, (out.grads, queue));
            }
            None => self.accumulate(task, out.grads),
        }
    }

    /// DualPipe's `F&B`: the forward of one chunk and the backward of the other, run
    /// through the overlap hook.
    fn forward_backward<L>(&mut self, forward: Task, backward: Task, inputs: &[TensorData], loss: &L) -> Result<(), PipelineError>
    where
        L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
    {
        let (cf, cb) = (self.chunk(forward), self.chunk(backward));
        if cf == cb {
            // One chunk cannot run two passes at once: run them in order.
            self.forward(forward, inputs);
            self.backward(backward, false, inputs, loss);
            return Ok(());
        }
        let x = self.begin_forward(forward, inputs);
        let pass = self.begin_backward(backward, inputs);
        let (mut y, mut out) = (None, None);
        {
            let (low, high) = self.chunks.split_at_mut(cf.max(cb));
            // `&mut`, not `&`: a stage module is `Send` but need not be `Sync`.
            let (fwd, bwd) = if cf < cb { (&mut low[cf], &mut high[0]) } else { (&mut high[0], &mut low[cb]) };
            let (y, out) = (&mut y, &mut out);
            self.overlap.run(OverlapPair {
                rank: self.rank,
                forward,
                backward,
                run_forward: Box::new(move || *y = Some(x.map(|x| forward_pass(&*fwd, x)))),
                run_backward: Box::new(move || *out = Some(backward_pass(&*bwd, pass, false, loss))),
            });
        }
        let missing = |half: &str| PipelineError::RankPanicked { rank: self.rank, message: format!("the overlap hook did not run the {half} of {forward:?} & {backward:?}") };
        let y = y.ok_or_else(|| missing("forward"))?;
        let out = out.ok_or_else(|| missing("backward"))?;
        if let Some(y) = y {
            self.local.insert((forward, Payload::Activation), y);
        }
        self.end_backward(backward, out);
        Ok(())
    }

    fn weight(&mut self, task: Task) {
        let (mut grads, mut queue) = self.deferred.remove(&task).expect("the input step ran before the weight step");
        queue.flush(&mut grads);
        self.accumulate(task, grads);
    }

    fn accumulate(&mut self, task: Task, grads: Gradients) {
        let c = self.chunk(task);
        let params = GradientsParams::from_grads(grads, &self.chunks[c]);
        self.accumulators[c].accumulate(&self.chunks[c], params);
    }
}

/// A forward's output, detached, for the next stage.
fn forward_pass<B: AutodiffBackend, S: PipelineStage<B, D>, const D: usize>(stage: &S, x: Tensor<B, D>) -> Tensor<B::InnerBackend, D> {
    stage.forward(x).inner()
}

/// What starts a stage's backward: the loss (last stage) or its output's gradient.
enum Root<B: AutodiffBackend, const D: usize> {
    Loss { micro_batch: usize, micro_batches: usize },
    Gradient(Tensor<B::InnerBackend, D>),
}

/// A backward ready to run: the stage input (`leaf`: the tracked copy whose gradient goes
/// to the previous stage; none at stage 0) and its root.
struct BackwardPass<B: AutodiffBackend, const D: usize> {
    leaf: Option<Tensor<B, D>>,
    input: Tensor<B, D>,
    root: Root<B, D>,
}

/// What a backward produced.
struct BackwardOut<B: AutodiffBackend, const D: usize> {
    grads: Gradients,
    /// The queued weight-gradient GEMMs of a split backward.
    queue: Option<WeightGradQueue>,
    /// The gradient of the stage input, for the previous stage.
    dx: Option<Tensor<B::InnerBackend, D>>,
    /// The micro-batch's loss, `loss / M`, detached (last stage).
    loss: Option<Tensor<B, 1>>,
}

/// A stage's backward, whole or with its weight gradients queued (`split`).
///
/// It recomputes the stage's forward from the kept input first. Keeping each
/// micro-batch's graph from its forward to its backward, with other micro-batches'
/// forwards and backwards through the same parameters in between (as every pipeline
/// schedule does), intermittently left a stage input without a gradient on Burn 0.21's
/// autodiff (observed in tests/dualpipe with 8 ranks); a graph built right before its
/// backward is always intact. The cost is one more forward per stage and micro-batch,
/// and the memory of one stage input per micro-batch in flight instead of its graph
/// (full activation checkpointing).
fn backward_pass<B, S, L, const D: usize>(stage: &S, pass: BackwardPass<B, D>, split: bool, loss: &L) -> BackwardOut<B, D>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D>,
    L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1>,
{
    let y = stage.forward(pass.input);
    let (root, loss) = match pass.root {
        Root::Loss { micro_batch, micro_batches } => {
            let l = loss(y, micro_batch) / micro_batches as f64;
            (l.clone(), Some(l.detach()))
        }
        Root::Gradient(dy) => ((y * Tensor::from_inner(dy)).sum(), None),
    };
    let (grads, queue) = if split {
        let mut queue = WeightGradQueue::new();
        (queue.defer(|| root.backward()), Some(queue))
    } else {
        (root.backward(), None)
    };
    let dx = pass.leaf.map(|x| x.grad(&grads).expect("a stage input receives a gradient"));
    BackwardOut { grads, queue, dx, loss }
}
