//! Pipeline schedules as data: per-rank instruction lists produced by pure generators.
//!
//! A model is cut into `S` stages; micro-batch `m` runs forward through stages
//! `0..S`, the loss after stage `S − 1`, then backward from `S − 1` to 0. A [`Task`] is one
//! micro-batch at one stage. A schedule places every stage on a rank (and a *chunk*, the
//! rank's local copy of a stage's parameters) and gives each rank its program:
//!
//! | schedule | ranks | stages `S` | chunks per rank | micro-batches |
//! |---|---|---|---|---|
//! | [`ScheduleKind::OneFOneB`] | `P` | `P` | 1 | any ≥ 1 |
//! | [`ScheduleKind::Zb1p`] | `P` | `P` | 1 | any ≥ 1 |
//! | [`ScheduleKind::DualPipe`] | `P` even | `P` | 2 (both directions) | even, ≥ `2P` |
//! | [`ScheduleKind::DualPipeV`] | `P` | `2P` | 2 (down and up the V) | ≥ `2P` |
//!
//! DualPipe runs the first half of the micro-batches from rank 0 to rank `P − 1` and the
//! second half the other way, so each rank holds two stages, `r` and `P − 1 − r`, and each
//! stage lives on two ranks (the gradients of the two copies add up). DualPipeV folds one
//! pipeline of `2P` stages into a V: stage `s` on rank `s` going down and on rank
//! `2P − 1 − s` coming back.
//!
//! Generators emit the compute order (DualPipe's eight steps, 1F1B's warm-up/steady/
//! cool-down, ZB1P's greedy zero-bubble order); [`Schedule::new`] then adds the
//! [`Instr::Recv`] before and [`Instr::Send`] after each compute whose input or output
//! crosses ranks. [`validate`] checks the invariants and [`crate::simulate`] the timing.
//!
//! # Example
//! ```
//! use burn_dualpipe::schedule::{validate, Instr, Schedule, ScheduleKind};
//!
//! let schedule = Schedule::new(ScheduleKind::DualPipeV, 4, 8).unwrap();
//! assert_eq!(schedule.stages(), 8); // a V of 2·P stages
//! assert_eq!(schedule.stage_of_chunk(0, 0), 0); // rank 0 holds the first stage
//! assert_eq!(schedule.stage_of_chunk(0, 1), 7); // and the last
//! validate(&schedule).unwrap();
//! let overlapped = schedule.programs[2].iter().filter(|i| matches!(i, Instr::ForwardBackward { .. })).count();
//! assert!(overlapped > 0, "DualPipe's overlapped forward-and-backward pairs");
//! assert!(Schedule::new(ScheduleKind::DualPipe, 3, 8).is_err()); // DualPipe needs an even rank count
//! ```

mod classic;
mod dualpipe;
mod validate;

pub use validate::validate;

use core::fmt;

/// One micro-batch at one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// Micro-batch index, `0..M`.
    pub micro_batch: usize,
    /// Stage index in the micro-batch's pipeline, `0..S`.
    pub stage: usize,
}

impl Task {
    /// Micro-batch `micro_batch` at stage `stage`.
    pub const fn new(micro_batch: usize, stage: usize) -> Self {
        Self { micro_batch, stage }
    }
}

/// What a [`Instr::Send`]/[`Instr::Recv`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Payload {
    /// The output of the task's forward, the input of the next stage's forward.
    Activation,
    /// The gradient of the task's input, the output gradient of the previous stage.
    Gradient,
}

/// One instruction of a rank's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Instr {
    /// Forward of a task (and the loss, at the last stage).
    Forward(Task),
    /// Full backward: the input gradient and the weight gradient.
    Backward(Task),
    /// The input-gradient part of the backward; the weight gradient waits for
    /// [`Instr::BackwardWeight`] of the same task.
    BackwardInput(Task),
    /// The deferred weight-gradient part of the backward.
    BackwardWeight(Task),
    /// A forward and a full backward of two tasks run together (DualPipe's overlapped
    /// F&B: one's computation hides the other's communication).
    ForwardBackward {
        /// The forward task.
        forward: Task,
        /// The backward task.
        backward: Task,
    },
    /// Hands `payload` of `task` to rank `to` (does not wait).
    Send {
        /// The task that produced the payload.
        task: Task,
        /// Activation or gradient.
        payload: Payload,
        /// Destination rank.
        to: usize,
    },
    /// Waits for `payload` of `task` from rank `from`.
    Recv {
        /// The task that produced the payload.
        task: Task,
        /// Activation or gradient.
        payload: Payload,
        /// Source rank.
        from: usize,
    },
}

impl Instr {
    /// Whether the instruction computes (as opposed to communicating).
    pub const fn is_compute(&self) -> bool {
        !matches!(self, Instr::Send { .. } | Instr::Recv { .. })
    }
}

/// The four schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// One forward, one backward (PipeDream-flush / Megatron).
    OneFOneB,
    /// Zero-bubble ZB-H1: 1F1B's memory, backward split into input and weight steps, the
    /// weight steps filling the bubbles.
    Zb1p,
    /// DeepSeek-V3's bidirectional DualPipe.
    DualPipe,
    /// DualPipe cut in half: a V over `P` ranks and `2P` stages.
    DualPipeV,
}

impl ScheduleKind {
    /// All four, for sweeps.
    pub const ALL: [ScheduleKind; 4] = [ScheduleKind::OneFOneB, ScheduleKind::Zb1p, ScheduleKind::DualPipe, ScheduleKind::DualPipeV];

    /// Stages of one micro-batch's pipeline on `ranks` ranks.
    pub const fn stages(&self, ranks: usize) -> usize {
        match self {
            ScheduleKind::DualPipeV => 2 * ranks,
            _ => ranks,
        }
    }

    /// Local stage copies per rank.
    pub const fn chunks_per_rank(&self) -> usize {
        match self {
            ScheduleKind::OneFOneB | ScheduleKind::Zb1p => 1,
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => 2,
        }
    }

    /// The fewest micro-batches the schedule runs with on `ranks` ranks.
    pub const fn min_micro_batches(&self, ranks: usize) -> usize {
        match self {
            ScheduleKind::OneFOneB | ScheduleKind::Zb1p => 1,
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => 2 * ranks,
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::OneFOneB => "1F1B",
            ScheduleKind::Zb1p => "ZB1P",
            ScheduleKind::DualPipe => "DualPipe",
            ScheduleKind::DualPipeV => "DualPipeV",
        })
    }
}

/// Why a schedule cannot be built or is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleError {
    /// No ranks.
    NoRanks,
    /// DualPipe needs an even number of ranks.
    OddRanks {
        /// The rank count given.
        ranks: usize,
    },
    /// Fewer micro-batches than the schedule needs, or an odd count for DualPipe.
    MicroBatches {
        /// The schedule.
        kind: ScheduleKind,
        /// The count given.
        micro_batches: usize,
        /// The fewest it runs with.
        min: usize,
        /// Whether the count must be even.
        even: bool,
    },
    /// A program breaks an invariant (found by [`validate`]).
    Invalid {
        /// The rank whose program breaks it.
        rank: usize,
        /// Index of the offending instruction in that program, if one is to blame.
        index: Option<usize>,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::NoRanks => write!(f, "a pipeline needs at least one rank"),
            ScheduleError::OddRanks { ranks } => write!(f, "DualPipe needs an even number of ranks, got {ranks}"),
            ScheduleError::MicroBatches { kind, micro_batches, min, even } => {
                write!(f, "{kind} needs {}at least {min} micro-batches, got {micro_batches}", if *even { "an even number of and " } else { "" })
            }
            ScheduleError::Invalid { rank, index: Some(i), reason } => write!(f, "rank {rank}, instruction {i}: {reason}"),
            ScheduleError::Invalid { rank, index: None, reason } => write!(f, "rank {rank}: {reason}"),
        }
    }
}

impl std::error::Error for ScheduleError {}

/// A schedule: the placement of stages on ranks and each rank's program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Which schedule.
    pub kind: ScheduleKind,
    /// Pipeline ranks `P`.
    pub ranks: usize,
    /// Micro-batches `M` per step.
    pub micro_batches: usize,
    /// Rank `r`'s instructions, in order.
    pub programs: Vec<Vec<Instr>>,
}

impl Schedule {
    /// Generates `kind` for `ranks` ranks and `micro_batches` micro-batches.
    ///
    /// # Errors
    /// [`ScheduleError::NoRanks`], [`ScheduleError::OddRanks`] (DualPipe) or
    /// [`ScheduleError::MicroBatches`] (too few, or odd for DualPipe).
    pub fn new(kind: ScheduleKind, ranks: usize, micro_batches: usize) -> Result<Self, ScheduleError> {
        if ranks == 0 {
            return Err(ScheduleError::NoRanks);
        }
        if kind == ScheduleKind::DualPipe && ranks % 2 == 1 {
            return Err(ScheduleError::OddRanks { ranks });
        }
        let min = kind.min_micro_batches(ranks);
        let even = kind == ScheduleKind::DualPipe;
        if micro_batches < min || (even && micro_batches % 2 == 1) {
            return Err(ScheduleError::MicroBatches { kind, micro_batches, min, even });
        }
        let mut schedule = Self { kind, ranks, micro_batches, programs: Vec::new() };
        // ZB1P's greedy run produces every rank's program at once; the others go rank by rank.
        let compute: Vec<Vec<Instr>> = match kind {
            ScheduleKind::Zb1p => classic::zb1p(ranks, micro_batches),
            ScheduleKind::OneFOneB => (0..ranks).map(|rank| classic::one_f_one_b(ranks, micro_batches, rank)).collect(),
            ScheduleKind::DualPipe | ScheduleKind::DualPipeV => (0..ranks).map(|rank| dualpipe::program(&schedule, rank)).collect(),
        };
        schedule.programs = compute.into_iter().enumerate().map(|(rank, p)| schedule.with_comm(rank, p)).collect();
        Ok(schedule)
    }

    /// Stages `S` of one micro-batch's pipeline.
    pub const fn stages(&self) -> usize {
        self.kind.stages(self.ranks)
    }

    /// The rank and local chunk that run `task`.
    ///
    /// - 1F1B, ZB1P: stage `s` on rank `s`, chunk 0;
    /// - DualPipe: micro-batches below `M / 2` go down (stage `s` on rank `s`, chunk 0),
    ///   the others up (stage `s` on rank `P − 1 − s`, chunk 1);
    /// - DualPipeV: stage `s < P` on rank `s`, chunk 0; stage `s ≥ P` on rank
    ///   `2P − 1 − s`, chunk 1.
    pub fn place(&self, task: Task) -> (usize, usize) {
        let (p, s) = (self.ranks, task.stage);
        match self.kind {
            ScheduleKind::OneFOneB | ScheduleKind::Zb1p => (s, 0),
            ScheduleKind::DualPipe => {
                if task.micro_batch < self.micro_batches / 2 {
                    (s, 0)
                } else {
                    (p - 1 - s, 1)
                }
            }
            ScheduleKind::DualPipeV => {
                if s < p {
                    (s, 0)
                } else {
                    (2 * p - 1 - s, 1)
                }
            }
        }
    }

    /// The stage that chunk `chunk` of rank `rank` holds (the inverse of
    /// [`Schedule::place`]'s rank and chunk).
    pub fn stage_of_chunk(&self, rank: usize, chunk: usize) -> usize {
        match (self.kind, chunk) {
            (ScheduleKind::DualPipe, 1) => self.ranks - 1 - rank,
            (ScheduleKind::DualPipeV, 1) => 2 * self.ranks - 1 - rank,
            _ => rank,
        }
    }

    /// `program` (compute only) with a receive before each compute whose input comes
    /// from another rank and a send after each compute whose output goes to one.
    fn with_comm(&self, rank: usize, program: Vec<Instr>) -> Vec<Instr> {
        let last = self.stages() - 1;
        let mut out = Vec::with_capacity(program.len() * 3);
        let recv = |out: &mut Vec<Instr>, producer: Option<Task>, payload| {
            if let Some(task) = producer {
                let from = self.place(task).0;
                if from != rank {
                    out.push(Instr::Recv { task, payload, from });
                }
            }
        };
        let prev = |t: Task| (t.stage > 0).then(|| Task::new(t.micro_batch, t.stage - 1));
        let next = |t: Task| (t.stage < last).then(|| Task::new(t.micro_batch, t.stage + 1));
        for instr in program {
            let (forward, backward) = match instr {
                Instr::Forward(t) => (Some(t), None),
                Instr::Backward(t) | Instr::BackwardInput(t) => (None, Some(t)),
                Instr::ForwardBackward { forward, backward } => (Some(forward), Some(backward)),
                _ => (None, None),
            };
            if let Some(t) = forward {
                recv(&mut out, prev(t), Payload::Activation);
            }
            if let Some(t) = backward {
                recv(&mut out, next(t), Payload::Gradient);
            }
            out.push(instr);
            let mut send = |to_task: Option<Task>, task: Task, payload| {
                if let Some(dst) = to_task {
                    let to = self.place(dst).0;
                    if to != rank {
                        out.push(Instr::Send { task, payload, to });
                    }
                }
            };
            if let Some(t) = forward {
                send(next(t), t, Payload::Activation);
            }
            if let Some(t) = backward {
                send(prev(t), t, Payload::Gradient);
            }
        }
        out
    }
}
