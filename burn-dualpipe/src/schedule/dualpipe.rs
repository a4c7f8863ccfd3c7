//! DualPipe and DualPipeV: one generator for both (DualPipeV is DualPipe cut in half, so
//! the eight steps are the same with "half of the ranks" replaced by "the ranks").
//!
//! Each rank runs two *phases*: phase 0 is the stage micro-batches reach first from its
//! nearer end, phase 1 the other. The steps of rank `h` (its distance from the nearer
//! end) over `n` rank pairs (DualPipe: `P / 2`; DualPipeV: `P`) and `c` micro-batches
//! per phase (DualPipe: `M / 2`; DualPipeV: `M`), as in DeepSeek's DualPipe:
//!
//! 1. `2(n − h − 1)` × F0 — fill from the near end;
//! 2. `h + 1` × (F0, F1) — the far end's micro-batches arrive;
//! 3. `n − h − 1` × (B1 split, W, F1) — zero-bubble warm-up of phase 1;
//! 4. `c − 2n + h + 1` × (F0&B1, F1&B0) — the steady state, forward and backward of the
//!    two directions overlapped (the turning rank runs its first pair unoverlapped);
//! 5. `n − h − 1` × (B1, F1&B0);
//! 6. `h + 1` × (B1, B0), splitting the backward from the middle on;
//! 7. `n − h − 1` × (W, B0 split);
//! 8. `h + 1` × W — drain the deferred weight gradients.
//!
//! The k-th forward (backward) of a phase takes the phase's k-th micro-batch; a W runs
//! the oldest deferred weight gradient.

use super::{Instr, Schedule, ScheduleKind, Task};
use std::collections::VecDeque;

/// The program state of one rank while its steps are expanded.
struct Rank<'a> {
    schedule: &'a Schedule,
    rank: usize,
    /// Phase → (first micro-batch of its stream, stage).
    phases: [(usize, usize); 2],
    forwards: [usize; 2],
    backwards: [usize; 2],
    deferred: VecDeque<Task>,
    out: Vec<Instr>,
}

impl<'a> Rank<'a> {
    fn new(schedule: &'a Schedule, rank: usize) -> Self {
        let (p, m) = (schedule.ranks, schedule.micro_batches);
        let phases = match schedule.kind {
            ScheduleKind::DualPipe => {
                let down = (0, rank);
                let up = (m / 2, p - 1 - rank);
                if rank < p / 2 {
                    [down, up]
                } else {
                    [up, down]
                }
            }
            ScheduleKind::DualPipeV => [(0, rank), (0, 2 * p - 1 - rank)],
            other => unreachable!("dualpipe::program called for {other}"),
        };
        Self { schedule, rank, phases, forwards: [0; 2], backwards: [0; 2], deferred: VecDeque::new(), out: Vec::new() }
    }

    fn next_forward(&mut self, phase: usize) -> Task {
        let (first, stage) = self.phases[phase];
        let task = Task::new(first + self.forwards[phase], stage);
        self.forwards[phase] += 1;
        debug_assert_eq!(self.schedule.place(task).0, self.rank);
        task
    }

    fn next_backward(&mut self, phase: usize) -> Task {
        let (first, stage) = self.phases[phase];
        let task = Task::new(first + self.backwards[phase], stage);
        self.backwards[phase] += 1;
        task
    }

    fn f(&mut self, phase: usize) {
        let t = self.next_forward(phase);
        self.out.push(Instr::Forward(t));
    }

    /// A backward, split (weight gradient deferred) when `zero_bubble`.
    fn b(&mut self, phase: usize, zero_bubble: bool) {
        let t = self.next_backward(phase);
        if zero_bubble {
            self.deferred.push_back(t);
            self.out.push(Instr::BackwardInput(t));
        } else {
            self.out.push(Instr::Backward(t));
        }
    }

    fn w(&mut self) {
        let t = self.deferred.pop_front().expect("a W step follows a split backward");
        self.out.push(Instr::BackwardWeight(t));
    }

    /// Forward of `forward_phase` overlapped with the full backward of the other phase.
    fn fb(&mut self, forward_phase: usize) {
        let forward = self.next_forward(forward_phase);
        let backward = self.next_backward(1 - forward_phase);
        self.out.push(Instr::ForwardBackward { forward, backward });
    }
}

/// The compute instructions of `rank` (no sends or receives yet).
pub(super) fn program(schedule: &Schedule, rank: usize) -> Vec<Instr> {
    let (p, m) = (schedule.ranks, schedule.micro_batches);
    // Rank pairs, this rank's distance from its nearer end, micro-batches per phase, and
    // whether this is the rank where the two streams turn (DualPipe's middle pair,
    // DualPipeV's last rank).
    let (n, h, c) = match schedule.kind {
        ScheduleKind::DualPipe => (p / 2, rank.min(p - 1 - rank), m / 2),
        _ => (p, rank, m),
    };
    let turning = h == n - 1;
    let mut r = Rank::new(schedule, rank);

    for _ in 0..2 * (n - h - 1) {
        r.f(0);
    }
    for _ in 0..h + 1 {
        r.f(0);
        r.f(1);
    }
    for _ in 0..n - h - 1 {
        r.b(1, true);
        r.w();
        r.f(1);
    }
    for i in 0..c + h + 1 - 2 * n {
        if i == 0 && turning {
            // Not overlapped, so that the turn reaches the other direction sooner.
            r.f(0);
            r.b(1, false);
        } else {
            r.fb(0);
        }
        r.fb(1);
    }
    for _ in 0..n - h - 1 {
        r.b(1, false);
        r.fb(1);
    }
    let mut zero_bubble = false;
    for i in 0..h + 1 {
        if i == h.div_ceil(2) && h % 2 == 1 {
            zero_bubble = true;
        }
        r.b(1, zero_bubble);
        if i == h.div_ceil(2) && h % 2 == 0 {
            zero_bubble = true;
        }
        r.b(0, zero_bubble);
    }
    for _ in 0..n - h - 1 {
        r.w();
        r.b(0, true);
    }
    for _ in 0..h + 1 {
        r.w();
    }
    debug_assert!(r.deferred.is_empty());
    debug_assert_eq!((r.forwards, r.backwards), ([c; 2], [c; 2]));
    r.out
}
