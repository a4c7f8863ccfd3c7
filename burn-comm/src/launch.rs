//! The in-process launcher: one thread per rank.

use crate::{Comm, CommError, RankError};
use std::any::Any;

/// Runs `f` once per handle, each on its own thread, and returns the results by rank.
///
/// When ranks fail, the error returned is the one that explains the others: a rank's
/// panic (as [`CommError::RankFailed`] naming it, with the panic message), else an error
/// that is not a consequence of another rank's failure (a timeout naming the stalled
/// ranks, or the rank's own error), else the first by rank. A stalled rank is still
/// waited for: `launch` returns when every thread has.
///
/// # Example
/// ```
/// use burn_comm::{launch, Comm, CommError, Transport};
///
/// let sums = launch(Comm::group(3, Transport::Host), |comm| {
///     let all = comm.all_gather_host("ranks", comm.rank())?;
///     Ok::<_, CommError>(all.iter().sum::<usize>())
/// })
/// .unwrap();
/// assert_eq!(sums, [3, 3, 3]);
/// ```
pub fn launch<T, E, F>(comms: Vec<Comm>, f: F) -> Result<Vec<T>, E>
where
    T: Send,
    E: RankError + Send,
    F: Fn(Comm) -> Result<T, E> + Sync,
{
    let results: Vec<(usize, std::thread::Result<Result<T, E>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank = comm.global_rank(comm.rank());
                let f = &f;
                (rank, scope.spawn(move || f(comm)))
            })
            .collect();
        handles.into_iter().map(|(rank, h)| (rank, h.join())).collect()
    });
    let mut errors: Vec<(u8, E)> = Vec::new();
    let mut values = Vec::new();
    for (rank, result) in results {
        match result {
            Err(panic) => match panic.downcast::<CommError>() {
                // A collective that failed inside a backward unwinds with its error.
                Ok(e) => errors.push((if e.is_consequence() { 2 } else { 1 }, E::from(*e))),
                Err(panic) => errors.push((0, CommError::RankFailed { rank, op: "launch", reason: format!("panicked: {}", panic_message(&*panic)) }.into())),
            },
            Ok(Err(e)) => {
                let consequence = e.is_consequence();
                errors.push((if consequence { 2 } else { 1 }, e));
            }
            Ok(Ok(v)) => values.push(v),
        }
    }
    match errors.into_iter().min_by_key(|(priority, _)| *priority) {
        Some((_, e)) => Err(e),
        None => Ok(values),
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>(), panic.downcast_ref::<CommError>()) {
        (Some(s), _, _) => s.clone(),
        (None, Some(s), _) => s.to_string(),
        (None, None, Some(e)) => e.to_string(),
        _ => "(no message)".to_string(),
    }
}
