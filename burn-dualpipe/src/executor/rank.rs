//! One rank's thread: its chunks, its mailbox, and the interpreter of its program.

use super::{ChunkGrads, PipelineError, PipelineStage, StepOutput};
use crate::schedule::{Instr, Payload, Schedule, Task};
use crate::timeline::{Span, Timeline};
use burn::backend::autodiff::grads::Gradients;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};
use burn_fp8::linear::WeightGradQueue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// A payload between ranks, as host data.
struct Message {
    task: Task,
    payload: Payload,
    data: TensorData,
}

const POLL: Duration = Duration::from_millis(20);
const NOBODY: usize = usize::MAX;

/// What one rank hands back.
struct RankResult {
    loss: f64,
    grads: Vec<ChunkGrads>,
    spans: Vec<Span>,
}

pub(super) fn run<B, S, L, const D: usize>(
    schedule: &Schedule,
    devices: &[B::Device],
    chunks: Vec<Vec<S>>,
    timeout: Duration,
    inputs: &[TensorData],
    loss: &L,
) -> Result<StepOutput, PipelineError>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
    L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1> + Sync,
{
    let ranks = schedule.ranks;
    let (senders, receivers): (Vec<Sender<Message>>, Vec<Receiver<Message>>) = (0..ranks).map(|_| channel()).unzip();
    let abort = AtomicBool::new(false);
    let waiting: Vec<AtomicUsize> = (0..ranks).map(|_| AtomicUsize::new(NOBODY)).collect();
    let busy_since: Vec<AtomicU64> = (0..ranks).map(|_| AtomicU64::new(0)).collect();
    let start = Instant::now();
    let results: Vec<Result<RankResult, PipelineError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = receivers
            .into_iter()
            .zip(chunks)
            .enumerate()
            .map(|(rank, (inbox, chunks))| {
                let senders = senders.clone();
                let abort = &abort;
                let waiting = &waiting[..];
                let busy_since = &busy_since[..];
                scope.spawn(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        RankState::<B, S, D> {
                            schedule,
                            rank,
                            device: devices[rank].clone(),
                            accumulators: chunks.iter().map(|_| GradientsAccumulator::new()).collect(),
                            chunks,
                            timeout,
                            inbox,
                            arrived: HashMap::new(),
                            senders,
                            abort,
                            waiting,
                            busy_since,
                            start,
                            activations: HashMap::new(),
                            losses: Vec::new(),
                            local: HashMap::new(),
                            deferred: HashMap::new(),
                            spans: Vec::new(),
                        }
                        .run(inputs, loss)
                    }))
                    .unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "non-string panic".into());
                        Err(PipelineError::RankPanicked { rank, message })
                    });
                    if result.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank threads catch their panics")).collect()
    });
    // The root cause first: a panic; else a timeout (it names the stalled rank); else any
    // failure.
    let errors: Vec<&PipelineError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let root = errors
        .iter()
        .find(|e| matches!(e, PipelineError::RankPanicked { .. }))
        .or_else(|| errors.iter().find(|e| matches!(e, PipelineError::Timeout { .. })));
    if let Some(err) = root {
        return Err((*err).clone());
    }
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        return Err(err.clone());
    }
    let mut out = StepOutput { loss: 0.0, grads: Vec::new(), timeline: Timeline { ranks: Vec::new() } };
    for result in results {
        let r = result.expect("errors returned above");
        out.loss += r.loss;
        out.grads.extend(r.grads);
        out.timeline.ranks.push(r.spans);
    }
    Ok(out)
}

struct RankState<'a, B: AutodiffBackend, S, const D: usize> {
    schedule: &'a Schedule,
    timeout: Duration,
    rank: usize,
    device: B::Device,
    chunks: Vec<S>,
    accumulators: Vec<GradientsAccumulator<S>>,
    inbox: Receiver<Message>,
    arrived: HashMap<(Task, Payload), TensorData>,
    senders: Vec<Sender<Message>>,
    abort: &'a AtomicBool,
    /// Whom each rank is waiting for now (`NOBODY`: it is computing).
    waiting: &'a [AtomicUsize],
    /// When each rank last stopped waiting, in µs from the start (a finished rank stays
    /// "busy" since its last receive).
    busy_since: &'a [AtomicU64],
    start: Instant,
    /// Per task in flight: its input (none at stage 0: the micro-batch input).
    activations: HashMap<Task, Option<TensorData>>,
    /// The loss of each micro-batch whose last stage ran here, `loss / M`, detached; read
    /// to the host once, at the end of the step.
    losses: Vec<Tensor<B, 1>>,
    /// Outputs of local neighbours: activations for the next stage, gradients for the
    /// previous, when both stages live on this rank (DualPipeV's turn).
    local: HashMap<(Task, Payload), TensorData>,
    /// Split backwards waiting for their weight step.
    deferred: HashMap<Task, (Gradients, WeightGradQueue)>,
    spans: Vec<Span>,
}

impl<'a, B, S, const D: usize> RankState<'a, B, S, D>
where
    B: AutodiffBackend<Gradients = Gradients>,
    S: PipelineStage<B, D> + Clone,
{
    fn run<L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1>>(mut self, inputs: &[TensorData], loss: &L) -> Result<RankResult, PipelineError> {
        let program = self.schedule.programs[self.rank].clone();
        for instr in program {
            if self.abort.load(Ordering::SeqCst) {
                return Err(PipelineError::Aborted { rank: self.rank });
            }
            let begin = self.start.elapsed().as_secs_f64();
            match instr {
                Instr::Send { task, payload, to } => {
                    let data = self.local.remove(&(task, payload)).expect("a send follows the compute that produced its payload");
                    // A closed mailbox means that rank has ended: the abort flag reports it.
                    let _ = self.senders[to].send(Message { task, payload, data });
                    continue;
                }
                Instr::Recv { task, payload, from } => {
                    let data = self.receive(task, payload, from)?;
                    self.local.insert((task, payload), data);
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
                Instr::ForwardBackward { forward, backward } => {
                    self.forward(forward, inputs);
                    self.backward(backward, false, inputs, loss);
                }
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

    fn receive(&mut self, task: Task, payload: Payload, from: usize) -> Result<TensorData, PipelineError> {
        self.waiting[self.rank].store(from, Ordering::SeqCst);
        let result = self.wait(task, payload, from);
        self.busy_since[self.rank].store(self.micros(), Ordering::SeqCst);
        self.waiting[self.rank].store(NOBODY, Ordering::SeqCst);
        result
    }

    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn wait(&mut self, task: Task, payload: Payload, from: usize) -> Result<TensorData, PipelineError> {
        // Past the deadline, keep waiting while `from` waits itself or has not yet been
        // busy for a whole timeout: only a rank waiting on the stalled one reports.
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(data) = self.arrived.remove(&(task, payload)) {
                return Ok(data);
            }
            if self.abort.load(Ordering::SeqCst) {
                return Err(PipelineError::Aborted { rank: self.rank });
            }
            if Instant::now() > deadline && self.waiting[from].load(Ordering::SeqCst) == NOBODY {
                let busy = Duration::from_micros(self.micros().saturating_sub(self.busy_since[from].load(Ordering::SeqCst)));
                if busy >= self.timeout {
                    return Err(PipelineError::Timeout { rank: self.rank, from, task });
                }
            }
            match self.inbox.recv_timeout(POLL) {
                Ok(m) => {
                    self.arrived.insert((m.task, m.payload), m.data);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(PipelineError::Aborted { rank: self.rank }),
            }
        }
    }

    fn chunk(&self, task: Task) -> usize {
        self.schedule.place(task).1
    }

    /// The stage's input as a fresh leaf (tracked past stage 0).
    fn input(&self, task: Task, data: &Option<TensorData>, inputs: &[TensorData]) -> (Option<Tensor<B, D>>, Tensor<B, D>) {
        match data {
            Some(d) => {
                let x = Tensor::<B, D>::from_data(d.clone(), &self.device).require_grad();
                (Some(x.clone()), x)
            }
            None => (None, Tensor::from_data(inputs[task.micro_batch].clone(), &self.device)),
        }
    }

    /// The forward of `task`: its output goes on to the next stage; only its input is
    /// kept, and the backward recomputes the forward (see [`RankState::backward`]). At the
    /// last stage nothing waits for the output, so the forward is left to the backward,
    /// which computes the loss from the recomputed output.
    fn forward(&mut self, task: Task, inputs: &[TensorData]) {
        let data = (task.stage > 0).then(|| {
            self.local.remove(&(Task::new(task.micro_batch, task.stage - 1), Payload::Activation)).expect("the activation was received or computed here")
        });
        if task.stage + 1 < self.schedule.stages() {
            let (_, x) = self.input(task, &data, inputs);
            let y = self.chunks[self.chunk(task)].forward(x).detach();
            self.local.insert((task, Payload::Activation), y.into_data());
        }
        self.activations.insert(task, data);
    }

    /// The backward of `task`: whole, or with the weight gradients queued (`split`).
    ///
    /// It recomputes the stage's forward from the kept input first. Keeping each
    /// micro-batch's graph from its forward to its backward, with other micro-batches'
    /// forwards and backwards through the same parameters in between (as every pipeline
    /// schedule does), intermittently left a stage input without a gradient on Burn 0.21's
    /// autodiff (observed in tests/dualpipe with 8 ranks); a graph built right before its
    /// backward is always intact. The cost is one more forward per stage and micro-batch,
    /// and the memory of one stage input per micro-batch in flight instead of its graph
    /// (full activation checkpointing).
    fn backward<L: Fn(Tensor<B, D>, usize) -> Tensor<B, 1>>(&mut self, task: Task, split: bool, inputs: &[TensorData], loss: &L) {
        let schedule = self.schedule;
        let data = self.activations.remove(&task).expect("the forward ran before the backward");
        let (x, input) = self.input(task, &data, inputs);
        let y = self.chunks[self.chunk(task)].forward(input);
        let root = if task.stage + 1 == schedule.stages() {
            let l = loss(y, task.micro_batch) / schedule.micro_batches as f64;
            self.losses.push(l.clone().detach());
            l
        } else {
            let data = self.local.remove(&(Task::new(task.micro_batch, task.stage + 1), Payload::Gradient)).expect("the gradient was received or computed here");
            (y * Tensor::from_data(data, &self.device)).sum()
        };
        let mut queue = WeightGradQueue::new();
        let grads = if split { queue.defer(|| root.backward()) } else { root.backward() };
        if let Some(x) = x {
            let dx = x.grad(&grads).expect("a stage input receives a gradient");
            self.local.insert((task, Payload::Gradient), dx.into_data());
        }
        if split {
            self.deferred.insert(task, (grads, queue));
        } else {
            self.accumulate(task, grads);
        }
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
