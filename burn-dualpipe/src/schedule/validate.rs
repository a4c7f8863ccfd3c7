//! The invariants every schedule keeps, checked on its programs.

use super::{Instr, Payload, Schedule, ScheduleError, Task};
use crate::simulate::{simulate, Costs};
use std::collections::{HashMap, HashSet};

/// Which pass of a task an instruction runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    /// The input gradient (a full backward also runs the weight gradient).
    Input,
    Weight,
}

fn passes(instr: &Instr) -> Vec<(Task, Pass)> {
    match *instr {
        Instr::Forward(t) => vec![(t, Pass::Forward)],
        Instr::Backward(t) => vec![(t, Pass::Input), (t, Pass::Weight)],
        Instr::BackwardInput(t) => vec![(t, Pass::Input)],
        Instr::BackwardWeight(t) => vec![(t, Pass::Weight)],
        Instr::ForwardBackward { forward, backward } => vec![(forward, Pass::Forward), (backward, Pass::Input), (backward, Pass::Weight)],
        Instr::Send { .. } | Instr::Recv { .. } => vec![],
    }
}

/// Checks `schedule`:
///
/// - every task (micro-batch × stage) runs its forward, input-gradient and weight-gradient
///   passes exactly once each, on the rank [`Schedule::place`] gives it;
/// - on its rank, a task's forward comes before its backward, and its input gradient
///   before (or with) its weight gradient;
/// - a forward's input, and a backward's output gradient, are produced earlier on the
///   same rank or received (a `Recv` earlier in the program) from the producing rank;
/// - every send follows the compute that produced its payload and is matched by exactly
///   one receive on its destination, and every receive by one send;
/// - the programs do not deadlock (they run to the end in [`simulate`]).
///
/// # Errors
/// [`ScheduleError::Invalid`] naming the rank, the instruction and the broken rule.
pub fn validate(schedule: &Schedule) -> Result<(), ScheduleError> {
    let (m, s_count) = (schedule.micro_batches, schedule.stages());
    let invalid = |rank: usize, index: Option<usize>, reason: String| Err(ScheduleError::Invalid { rank, index, reason });
    if schedule.programs.len() != schedule.ranks {
        return invalid(0, None, format!("{} programs for {} ranks", schedule.programs.len(), schedule.ranks));
    }
    let mut seen: HashMap<(Task, Pass), usize> = HashMap::new();
    let mut sends: HashSet<(Task, Payload, usize, usize)> = HashSet::new();
    let mut recvs: HashSet<(Task, Payload, usize, usize)> = HashSet::new();
    for (rank, program) in schedule.programs.iter().enumerate() {
        let mut done: HashSet<(Task, Pass)> = HashSet::new();
        let mut received: HashSet<(Task, Payload)> = HashSet::new();
        for (i, instr) in program.iter().enumerate() {
            match *instr {
                Instr::Send { task, payload, to } => {
                    let pass = if payload == Payload::Activation { Pass::Forward } else { Pass::Input };
                    if !done.contains(&(task, pass)) {
                        return invalid(rank, Some(i), format!("sends {payload:?} of {task:?} before computing it"));
                    }
                    if !sends.insert((task, payload, rank, to)) {
                        return invalid(rank, Some(i), format!("sends {payload:?} of {task:?} to rank {to} twice"));
                    }
                }
                Instr::Recv { task, payload, from } => {
                    if !recvs.insert((task, payload, from, rank)) {
                        return invalid(rank, Some(i), format!("receives {payload:?} of {task:?} from rank {from} twice"));
                    }
                    received.insert((task, payload));
                }
                compute => {
                    for (task, pass) in passes(&compute) {
                        if task.micro_batch >= m || task.stage >= s_count {
                            return invalid(rank, Some(i), format!("{task:?} is outside {m} micro-batches × {s_count} stages"));
                        }
                        let home = schedule.place(task).0;
                        if home != rank {
                            return invalid(rank, Some(i), format!("runs {task:?}, which belongs to rank {home}"));
                        }
                        if let Some(first) = seen.insert((task, pass), rank) {
                            return invalid(rank, Some(i), format!("runs {pass:?} of {task:?} again (first on rank {first})"));
                        }
                        // What the pass needs: its own earlier pass, and its input from the
                        // neighbouring stage, here or received.
                        let (own, neighbour) = match pass {
                            Pass::Forward => (None, (task.stage > 0).then(|| (Task::new(task.micro_batch, task.stage - 1), Pass::Forward, Payload::Activation))),
                            Pass::Input => (Some(Pass::Forward), (task.stage + 1 < s_count).then(|| (Task::new(task.micro_batch, task.stage + 1), Pass::Input, Payload::Gradient))),
                            Pass::Weight => (Some(Pass::Input), None),
                        };
                        if let Some(p) = own {
                            if !(done.contains(&(task, p)) || p == Pass::Input && passes(&compute).contains(&(task, p))) {
                                return invalid(rank, Some(i), format!("runs {pass:?} of {task:?} before its {p:?}"));
                            }
                        }
                        if let Some((producer, p, payload)) = neighbour {
                            let local = schedule.place(producer).0 == rank;
                            let ready = if local { done.contains(&(producer, p)) } else { received.contains(&(producer, payload)) };
                            if !ready {
                                return invalid(
                                    rank,
                                    Some(i),
                                    format!("runs {pass:?} of {task:?} before its {payload:?} from {producer:?} is {}", if local { "computed" } else { "received" }),
                                );
                            }
                        }
                    }
                    done.extend(passes(&compute));
                }
            }
        }
    }
    let expected = m * s_count * 3;
    if seen.len() != expected {
        let missing = (0..m)
            .flat_map(|mb| (0..s_count).map(move |s| Task::new(mb, s)))
            .flat_map(|t| [Pass::Forward, Pass::Input, Pass::Weight].map(|p| (t, p)))
            .find(|k| !seen.contains_key(k))
            .expect("a missing pass");
        return invalid(schedule.place(missing.0).0, None, format!("never runs {:?} of {:?}", missing.1, missing.0));
    }
    if let Some(&(task, payload, from, to)) = sends.symmetric_difference(&recvs).next() {
        let (rank, what) = if sends.contains(&(task, payload, from, to)) { (from, "is never received") } else { (to, "is never sent") };
        return invalid(rank, None, format!("{payload:?} of {task:?} from rank {from} to rank {to} {what}"));
    }
    simulate(schedule, &Costs::unit()).map(|_| ())
}
