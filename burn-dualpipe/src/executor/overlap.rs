//! The overlap hook: how a rank runs DualPipe's `F&B` pair — the forward of one chunk and
//! the backward of the other, scheduled together so that one's work hides the other's
//! waits (in DeepSeek-V3, the all-to-all of one chunk behind the computation of the other).

use crate::schedule::Task;

/// One half of an overlapped pair, ready to run: it computes the pass and leaves its
/// result with the executor.
pub type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// An overlapped forward-and-backward pair on one rank.
pub struct OverlapPair<'a> {
    /// The rank running the pair.
    pub rank: usize,
    /// The forward's task.
    pub forward: Task,
    /// The backward's task.
    pub backward: Task,
    /// Runs the forward (of `forward`'s chunk).
    pub run_forward: Job<'a>,
    /// Runs the backward (of `backward`'s chunk, another chunk than the forward's).
    pub run_backward: Job<'a>,
}

/// Runs an overlapped pair; it must run both jobs, each once, before it returns (the
/// executor fails the step naming the rank when one did not run).
///
/// The two jobs use different chunks (different parameters), so they may run in any order
/// or at the same time. A model whose passes have phases of their own (attention,
/// dispatch, experts, combine in DeepSeek-V3) can pin threads, set priorities or order the
/// halves as suits its devices; [`Concurrent`] is the default, [`Sequential`] the baseline.
pub trait Overlap: Send + Sync {
    /// Runs `pair.run_forward` and `pair.run_backward`.
    fn run(&self, pair: OverlapPair<'_>);
}

/// The default: the forward on a helper thread while the backward runs on the rank's own
/// thread (a panic in either reaches the rank and ends the step with its message).
#[derive(Clone, Copy, Debug, Default)]
pub struct Concurrent;

impl Overlap for Concurrent {
    fn run(&self, pair: OverlapPair<'_>) {
        let OverlapPair { run_forward, run_backward, .. } = pair;
        std::thread::scope(|scope| {
            let forward = scope.spawn(run_forward);
            run_backward();
            if let Err(panic) = forward.join() {
                std::panic::resume_unwind(panic);
            }
        });
    }
}

/// The forward, then the backward, on the rank's thread: no overlap.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl Overlap for Sequential {
    fn run(&self, pair: OverlapPair<'_>) {
        (pair.run_forward)();
        (pair.run_backward)();
    }
}
