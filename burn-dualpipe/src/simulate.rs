//! The cost simulator: runs a schedule's programs with given pass times and returns the
//! per-rank timelines (sends and receives take no time; a receive waits for its send).

use crate::schedule::{Instr, Payload, Schedule, ScheduleError, Task};
use crate::timeline::{Span, Timeline};
use std::collections::HashMap;

/// Pass times, in the table's notation (DeepSeek-V3 report, Table 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// `F`: a forward chunk.
    pub forward: f64,
    /// `B`: a full backward chunk (input and weight gradients).
    pub backward: f64,
    /// `W`: the weight-gradient part of `B` (the input-gradient part takes `B − W`).
    pub weight: f64,
    /// `F&B`: a forward and a backward chunk run overlapped.
    pub forward_backward: f64,
}

impl Costs {
    /// `F = 1, B = 2, W = 1, F&B = F + B`: backward twice the forward, half of it weight
    /// gradient, no overlap gain.
    pub const fn unit() -> Self {
        Self { forward: 1.0, backward: 2.0, weight: 1.0, forward_backward: 3.0 }
    }

    /// Time of one compute instruction (0 for communication).
    pub fn of(&self, instr: &Instr) -> f64 {
        match instr {
            Instr::Forward(_) => self.forward,
            Instr::Backward(_) => self.backward,
            Instr::BackwardInput(_) => self.backward - self.weight,
            Instr::BackwardWeight(_) => self.weight,
            Instr::ForwardBackward { .. } => self.forward_backward,
            Instr::Send { .. } | Instr::Recv { .. } => 0.0,
        }
    }
}

impl Costs {
    /// The mean measured time of each kind of pass in `timeline` (a measured one, from
    /// the executor); a kind the timeline lacks gets the table's relation to the others
    /// (`W` half of `B`, `F&B` the sum `F + B`).
    pub fn measured(timeline: &Timeline) -> Self {
        let mean = |pick: &dyn Fn(&Instr) -> bool| {
            let times: Vec<f64> = timeline.ranks.iter().flatten().filter(|s| pick(&s.instr)).map(|s| s.end - s.start).collect();
            (!times.is_empty()).then(|| times.iter().sum::<f64>() / times.len() as f64)
        };
        let forward = mean(&|i| matches!(i, Instr::Forward(_))).unwrap_or(0.0);
        let weight = mean(&|i| matches!(i, Instr::BackwardWeight(_)));
        let input = mean(&|i| matches!(i, Instr::BackwardInput(_)));
        let backward = match (mean(&|i| matches!(i, Instr::Backward(_))), input, weight) {
            (Some(b), _, _) => b,
            (None, Some(i), Some(w)) => i + w,
            _ => 0.0,
        };
        let weight = weight.unwrap_or(backward / 2.0);
        let forward_backward = mean(&|i| matches!(i, Instr::ForwardBackward { .. })).unwrap_or(forward + backward);
        Self { forward, backward, weight, forward_backward }
    }
}

/// Runs `schedule` with `costs`: each rank executes its program in order, a compute
/// starting when the rank is free, a receive completing when its send has run.
///
/// # Errors
/// [`ScheduleError::Invalid`] naming the first stuck rank and instruction when the
/// programs deadlock (a receive whose send never runs).
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Timeline, ScheduleError> {
    replay(schedule, |_, instr| costs.of(instr))
}

/// The timeline `schedule` would have with the compute times of a measured run and
/// instant communication: the bubbles its dependencies alone cause. Against the measured
/// timeline, the difference is the cost of transfers, synchronisation and contention.
///
/// # Errors
/// As [`simulate`]; a compute instruction missing from `measured` takes no time.
pub fn predict(schedule: &Schedule, measured: &Timeline) -> Result<Timeline, ScheduleError> {
    let times: HashMap<(usize, Instr), f64> = measured.ranks.iter().enumerate().flat_map(|(r, spans)| spans.iter().map(move |s| ((r, s.instr), s.end - s.start))).collect();
    replay(schedule, |rank, instr| times.get(&(rank, *instr)).copied().unwrap_or(0.0))
}

/// Runs the programs with `time(rank, instr)` per compute instruction.
fn replay(schedule: &Schedule, time: impl Fn(usize, &Instr) -> f64) -> Result<Timeline, ScheduleError> {
    let ranks = schedule.programs.len();
    let mut pc = vec![0usize; ranks];
    let mut clock = vec![0f64; ranks];
    let mut sent: HashMap<(Task, Payload, usize, usize), f64> = HashMap::new();
    let mut timeline = Timeline { ranks: vec![Vec::new(); ranks] };
    loop {
        let mut progressed = false;
        for r in 0..ranks {
            while let Some(instr) = schedule.programs[r].get(pc[r]) {
                match *instr {
                    Instr::Send { task, payload, to } => {
                        sent.insert((task, payload, r, to), clock[r]);
                    }
                    Instr::Recv { task, payload, from } => match sent.get(&(task, payload, from, r)) {
                        Some(&t) => clock[r] = clock[r].max(t),
                        None => break,
                    },
                    compute => {
                        let end = clock[r] + time(r, &compute);
                        timeline.ranks[r].push(Span { start: clock[r], end, instr: compute });
                        clock[r] = end;
                    }
                }
                pc[r] += 1;
                progressed = true;
            }
        }
        if (0..ranks).all(|r| pc[r] == schedule.programs[r].len()) {
            return Ok(timeline);
        }
        if !progressed {
            let r = (0..ranks).find(|&r| pc[r] < schedule.programs[r].len()).expect("a stuck rank");
            return Err(ScheduleError::Invalid { rank: r, index: Some(pc[r]), reason: format!("deadlock: {:?} waits for a send that never runs", schedule.programs[r][pc[r]]) });
        }
    }
}
